"""``gapruning eval``: accuracy and robustness of a model on real test data."""

from __future__ import annotations

import json

from .common import floats


def add_parser(sub) -> None:
    e = sub.add_parser(
        "eval", help="accuracy and robustness of a model on real test data"
    )
    e.add_argument(
        "--model", required=True, help="shipped model name or model directory"
    )
    e.add_argument("--dataset", default="fashion-mnist")
    e.add_argument("--attacks", default="fgsm,pgd", help="comma-separated: fgsm,pgd")
    e.add_argument(
        "--eps",
        type=floats,
        default=(0.01, 0.05, 0.1),
        help="comma-separated radii in pixel units",
    )
    e.add_argument("--pgd-steps", type=int, default=10)
    e.add_argument("--limit", type=int, help="evaluate the first N test samples only")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=run)


def run(args) -> None:
    """Prints the accuracy table (or JSON) of ``args.model``."""
    from rich.console import Console
    from rich.table import Table

    from .. import zoo
    from ..data import load_dataset
    from ..evaluate import evaluate

    net = zoo.load(args.model)
    data = load_dataset(args.dataset, "test")
    if args.limit:
        data = data._replace(
            images=data.images[: args.limit], labels=data.labels[: args.limit]
        )
    attacks = tuple(a for a in args.attacks.split(",") if a)
    metrics = evaluate(
        net, data, attacks=attacks, eps=args.eps, pgd_steps=args.pgd_steps
    )
    if args.json:
        print(json.dumps(_jsonable(metrics), indent=2))
        return
    table = Table(title=f"{net.name} on {data.name} ({metrics['num_samples']} samples)")
    table.add_column("attack")
    table.add_column("eps", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("robustness preservation", justify="right")
    table.add_row("clean", "0", f"{metrics['accuracy']:.4f}", "")
    for a in attacks:
        for e, acc in metrics[a].items():
            rp = metrics["robustness_preservation"][a][e]
            table.add_row(a, f"{e:g}", f"{acc:.4f}", f"{rp:.4f}")
    Console().print(table)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return obj
