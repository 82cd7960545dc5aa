"""The ``gapruning`` command: ``train``, ``eval``, ``list``.

Errors the user can fix (bad names, missing files, bad values) print one line and
exit with status 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import shlex
import sys
import time
from pathlib import Path


class UsageError(RuntimeError):
    """A problem with the command line the user can fix."""


def _cmd_train(args) -> None:
    import jax

    from . import models, train, zoo
    from .data import load_dataset

    if args.model not in train.RECIPES and args.model not in models.MODELS:
        raise UsageError(
            f"unknown model {args.model!r}; known: {', '.join(sorted(models.MODELS))}"
        )
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} already exists and is not empty (use --overwrite)")
    cfg = train.RECIPES.get(args.model, train.TrainConfig())
    overrides = {
        k: v
        for k, v in (
            ("epochs", args.epochs),
            ("seed", args.seed),
            ("learning_rate", args.lr),
        )
        if v is not None
    }
    if args.width is not None:
        overrides["arch_kwargs"] = dict(cfg.arch_kwargs, width=args.width)
    cfg = dataclasses.replace(cfg, **overrides)
    train_set, test_set = (
        load_dataset(args.dataset, "train"),
        load_dataset(args.dataset, "test"),
    )
    t0 = time.perf_counter()
    model, log = train.train(
        args.model, train_set, cfg, eval_set=test_set, progress=not args.quiet
    )
    seconds = time.perf_counter() - t0
    acc = train.accuracy(model, test_set, train.FMNIST_MEAN, train.FMNIST_STD)
    short = {"fashion-mnist": "fmnist"}.get(args.dataset, args.dataset)
    card = {
        "name": out.name,
        "arch": args.model,
        "arch_kwargs": dict(cfg.arch_kwargs),
        "num_classes": model.num_outputs,
        "input": {
            "shape": list(model.input_shape),
            "mean": train.FMNIST_MEAN,
            "std": train.FMNIST_STD,
            "pixel_range": [0.0, 1.0],
        },
        "dataset": args.dataset,
        "test_accuracy": acc,
        "origin": f"trained by gapruning on {short}",
        "training": {
            "command": "gapruning " + shlex.join(sys.argv[1:]),
            "recipe": dataclasses.asdict(cfg),
            "seed": cfg.seed,
            "date": datetime.date.today().isoformat(),
            "seconds": round(seconds, 1),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
            + f", jax {jax.__version__} on {jax.devices()[0].platform}",
            "log": log,
        },
    }
    zoo.save(zoo.Pretrained(model, card), out, overwrite=args.overwrite)
    print(f"saved {out} (test accuracy {acc:.4f}, {seconds:.0f} s)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gapruning", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a zoo model on a real dataset")
    t.add_argument("--model", required=True, help="zoo architecture, e.g. lenet300")
    t.add_argument("--dataset", default="fashion-mnist")
    t.add_argument("--out", required=True, help="output directory (e.g. weights/NAME)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--seed", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--width", type=float, help="width multiplier (vgg11)")
    t.add_argument("--overwrite", action="store_true")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (
        UsageError,
        FileNotFoundError,
        FileExistsError,
        KeyError,
        ValueError,
        RuntimeError,
    ) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"gapruning {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
