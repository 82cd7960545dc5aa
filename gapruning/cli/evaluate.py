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
    e.add_argument(
        "--no-dense",
        action="store_true",
        help="for a pruned model, skip measuring its dense parent beside it",
    )
    e.set_defaults(func=run)


def run(args) -> None:
    """Prints the accuracy table (or JSON) of ``args.model``, and of its dense
    parent beside it when the model is a pruned one whose parent loads."""
    from rich.console import Console

    from .. import zoo
    from ..data import load_dataset

    net = zoo.load(args.model)
    data = load_dataset(args.dataset, "test")
    if args.limit:
        data = data._replace(
            images=data.images[: args.limit], labels=data.labels[: args.limit]
        )
    attacks = tuple(a for a in args.attacks.split(",") if a)
    metrics = _measure(net, data, attacks, args)
    parent = None if args.no_dense else dense_parent(net)
    dense = None if parent is None else _measure(parent, data, attacks, args)
    if args.json:
        out = metrics if dense is None else {**metrics, "dense": dense}
        print(json.dumps(_jsonable(out), indent=2))
        return
    Console().print(_table(net, data, metrics, dense, attacks))


def dense_parent(net):
    """The dense model a pruned ``net`` was made from, or ``None`` (not pruned,
    or its parent is not a shipped or saved model that loads)."""
    from .. import zoo

    parent = net.card.get("pruning", {}).get("parent")
    if not parent:
        return None
    try:
        return zoo.load(parent)
    except zoo.ModelFileError:
        return None


def _measure(net, data, attacks, args) -> dict:
    from ..evaluate import evaluate

    return evaluate(net, data, attacks=attacks, eps=args.eps, pgd_steps=args.pgd_steps)


def _table(net, data, metrics, dense, attacks):
    """Rows: clean, then every attack and eps; a dense column when measured."""
    from rich.table import Table

    title = f"{net.name} on {data.name} ({metrics['num_samples']} samples)"
    table = Table(title=title)
    accuracy = ["dense", "pruned"] if dense else ["accuracy"]
    for name in ("attack", "eps", *accuracy):
        table.add_column(name, justify="left" if name == "attack" else "right")
    table.add_column("robustness preservation", justify="right")

    def row(label, eps, acc, dense_acc, rp=""):
        cells = [label, eps, *([f"{dense_acc:.4f}"] if dense else []), f"{acc:.4f}"]
        table.add_row(*cells, rp)

    row("clean", "0", metrics["accuracy"], dense and dense["accuracy"])
    for a in attacks:
        for e, acc in metrics[a].items():
            rp = f"{metrics['robustness_preservation'][a][e]:.4f}"
            row(a, f"{e:g}", acc, dense and dense[a][e], rp)
    return table


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    return obj
