"""``gapruning list``: architectures, shipped models, strategies, methods, metrics."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    li = sub.add_parser("list", help="list architectures and shipped models")
    li.set_defaults(func=run)


def run(args) -> None:
    """Prints one table per registry."""
    from rich.console import Console
    from rich.table import Table

    from .. import fitness, models, search, zoo

    def table(title, rows, columns=("name", "description")):
        t = Table(title=title)
        for col in columns:
            t.add_column(col)
        for row in rows:
            t.add_row(*row)
        return t

    console = Console()
    console.print(
        table(
            "architectures (gapruning.models.MODELS)",
            [(n, _first_line(f.__doc__)) for n, f in models.MODELS.items()],
        )
    )
    shipped = []
    for name in zoo.shipped_models():
        card = json.loads((zoo.WEIGHTS_DIR / name / zoo.CARD_FILE).read_text())
        shipped.append(
            (
                name,
                card.get("arch", "?"),
                card.get("dataset", "?"),
                f"{card.get('test_accuracy', float('nan')):.4f}",
            )
        )
    console.print(
        table(
            "shipped pretrained models (weights/)",
            shipped,
            ("name", "arch", "dataset", "test accuracy"),
        )
    )
    strategies = [(n, _first_line(f.__doc__)) for n, f in search.STRATEGIES.items()]
    strategies.append(("evosax:<Name>", "any evosax algorithm, e.g. evosax:CMA_ES"))
    console.print(table("search strategies (gapruning.search.STRATEGIES)", strategies))
    from ..methods import METHODS

    console.print(
        table(
            "pruning methods (gapruning.methods.METHODS; --strategy NAME)",
            [(n, m.description) for n, m in METHODS.items()],
        )
    )
    console.print(
        table("fitness metrics (gapruning.fitness.METRICS)", fitness.describe_metrics())
    )


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""
