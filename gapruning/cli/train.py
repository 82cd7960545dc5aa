"""``gapruning train``: train a zoo model on a real dataset and save it."""

from __future__ import annotations

import dataclasses
import datetime
import platform
import shlex
import time
from pathlib import Path

from .common import UsageError, check_new_dir


def add_parser(sub) -> None:
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
    t.set_defaults(func=run)


def run(args) -> None:
    """Trains ``args.model`` and saves it with its card in ``args.out``."""
    from .. import models, train, zoo
    from ..data import load_dataset

    if args.model not in train.RECIPES and args.model not in models.MODELS:
        raise UsageError(
            f"unknown model {args.model!r}; known: {', '.join(sorted(models.MODELS))}"
        )
    out = Path(args.out)
    check_new_dir(out, args.overwrite)
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
    card = _card(args, out, cfg, model, acc, seconds, log)
    zoo.save(zoo.Pretrained(model, card), out, overwrite=args.overwrite)
    print(f"saved {out} (test accuracy {acc:.4f}, {seconds:.0f} s)")


def _card(args, out: Path, cfg, model, acc: float, seconds: float, log) -> dict:
    """The model card of a model trained by this command."""
    import jax

    from .. import train

    short = {"fashion-mnist": "fmnist"}.get(args.dataset, args.dataset)
    return {
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
            "command": "gapruning " + shlex.join(args.argv),
            "recipe": dataclasses.asdict(cfg),
            "seed": cfg.seed,
            "date": datetime.date.today().isoformat(),
            "seconds": round(seconds, 1),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()
            + f", jax {jax.__version__} on {jax.devices()[0].platform}",
            "log": log,
        },
    }
