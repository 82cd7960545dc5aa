"""The ``gapruning`` command: ``train``, ``eval``, ``list``, ``convert``, ``bench``.

Errors the user can fix (bad names, missing files, bad values) print one line and
exit with status 2; ``--debug`` shows the full traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path


class UsageError(RuntimeError):
    """A problem with the command line the user can fix."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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
    zoo.save(zoo.Pretrained(model, card), out, overwrite=args.overwrite)
    print(f"saved {out} (test accuracy {acc:.4f}, {seconds:.0f} s)")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _cmd_eval(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from . import zoo
    from .data import load_dataset
    from .evaluate import evaluate

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


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def _cmd_list(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from . import fitness, models, search, zoo

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
    from .methods import METHODS

    console.print(
        table(
            "pruning methods (gapruning.methods.METHODS; --strategy NAME)",
            [(n, m.description) for n, m in METHODS.items()],
        )
    )
    console.print(
        table("fitness metrics (gapruning.fitness.METRICS)", fitness.describe_metrics())
    )


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _cmd_convert(args) -> None:
    from . import convert, zoo

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise UsageError(f"{out} already exists and is not empty (use --overwrite)")
    kwargs = {"name": args.name} if args.name else {}
    if args.input_shape:
        kwargs["input_shape"] = args.input_shape
    if args.input_box:
        if len(args.input_box) != 2:
            raise UsageError(f"--input-box takes LOW,HIGH, got {args.input_box}")
        kwargs["input_box"] = args.input_box
    arch_kwargs = {}
    for item in args.arch_arg or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--arch-arg takes KEY=VALUE, got {item!r}")
        try:
            arch_kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            arch_kwargs[key] = value
    if args.num_classes is not None:
        arch_kwargs["num_classes"] = args.num_classes
    if args.source == "torch":
        net = convert.from_torch(args.file, arch=args.arch, **kwargs, **arch_kwargs)
    else:
        if args.arch or arch_kwargs:
            raise UsageError("--arch/--num-classes/--arch-arg apply to --from torch")
        reader = convert.from_keras if args.source == "keras" else convert.from_onnx
        net = reader(args.file, **kwargs)
    argv = getattr(args, "argv", None) or sys.argv[1:]
    net.card["origin"]["command"] = "gapruning " + shlex.join(argv)
    zoo.save(net, out, overwrite=args.overwrite)
    box = net.card["input"]["box"]
    default = net.card["input"]["box_source"] == "default"
    note = " (default: pass --input-box)" if default else ""
    print(
        f"saved {out}: {args.source} model {args.file}, input "
        f"{tuple(net.input_shape)} in [{box[0]:g}, {box[1]:g}]{note}, "
        f"{len(net.model.masks)} prunable groups"
    )


def _fitness_spec(text: str):
    """A metric name, or a JSON object of metric weights."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(
                f"--fitness is not valid JSON: {err}"
            ) from None
    return text


def _cmd_prune(args) -> None:
    out = Path(args.out)
    run_files = ("report.json", "model")
    if (
        out.exists()
        and any((out / f).exists() for f in run_files)
        and not (args.overwrite or args.resume)
    ):
        raise UsageError(f"{out} already holds a run (use --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if args.checkpoint_every < 0:
        raise UsageError(
            f"--checkpoint-every must be 0 (never) or more, got {args.checkpoint_every}"
        )
    if args.distill_steps < 0:
        raise UsageError(f"--distill-steps must be 0 or more, got {args.distill_steps}")
    created = not out.exists()
    try:
        _prune_into(args, out)
    except BaseException:
        # a failed run leaves nothing behind, except checkpoints to resume from
        steps = out / "checkpoints" / "steps"
        if created and out.is_dir() and not (steps.is_dir() and any(steps.iterdir())):
            shutil.rmtree(out, ignore_errors=True)
        raise


def _prune_into(args, out: Path) -> None:
    from . import zoo
    from .prune import prune
    from .report import write_run

    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UsageError(f"cannot write to {out}: {err.strerror}") from None
    net = zoo.load(args.model)
    checkpoints = (
        out / "checkpoints" if (args.checkpoint_every or args.resume) else None
    )
    strategy, strategy_options = args.strategy, {}
    if args.profile:  # apply a saved layer-wise profile (no search)
        from .methods.profile import ProfileError, check_profile, load_profile

        try:
            check_profile(net, load_profile(args.profile))
        except ProfileError as err:
            raise UsageError(str(err)) from None
        if strategy not in ("profile_random", "profile_rl"):
            strategy = "profile_random"
        strategy_options = {"profile": args.profile}
    result = prune(
        net,
        strategy,
        args.target,
        args.budget,
        fitness=args.fitness,
        generations=args.generations,
        population=args.population,
        num_probes=args.num_probes,
        seed=args.seed,
        checkpoint_dir=checkpoints,
        progress=not args.quiet,
        probes=args.probes,
        encoding=args.encoding,
        per_group=args.per_group,
        chunk=args.chunk,
        checkpoint_every=args.checkpoint_every or 1,
        resume=args.resume,
        dtype=args.dtype,
        chunk_size=_chunk_size(args.chunk_size),
        repair=args.repair,
        recover=("distill",) if args.distill_steps else (),
        recover_options={"distill": {"steps": args.distill_steps}},
        strategy_options=strategy_options,
    )
    report = write_run(result, out, overwrite=True)
    p, f = report["params"], report["flops"]
    print(
        f"pruned {net.name}: params {p['before']:,} -> {p['after']:,}, "
        f"FLOPs {f['before']:,} -> {f['after']:,}; wrote {out}/"
    )


def _chunk_size(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError:
        raise UsageError(
            f"--chunk-size takes a positive integer, 'auto' or 'none', got {text!r}"
        ) from None


def _cmd_show(args) -> None:
    from rich.console import Console
    from rich.markdown import Markdown

    report = Path(args.run_dir) / "report.md"
    if not report.is_file():
        raise UsageError(
            f"{args.run_dir} has no report.md: not a gapruning run directory"
        )
    Console().print(Markdown(report.read_text()))


BENCHMARKS = ("peers",)


def _benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder (next to the installed package)."""
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (here / "common.py").is_file():
        raise UsageError(
            f"no benchmarks folder at {here}: the benchmarks ship with the "
            "repository, not the package; run from an editable install "
            "(pip install -e .) of a gapruning checkout"
        )
    return here


def _cmd_bench(args) -> None:
    import importlib.util

    folder = _benchmarks_dir()
    script = folder / f"{args.benchmark}.py"
    if not script.is_file():
        raise UsageError(f"benchmark script {script} is missing")
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"_bench_{args.benchmark}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--part", args.part, "--repeats", str(args.repeats)]
    if args.quick:
        argv.append("--quick")
    if args.generations is not None:
        argv += ["--generations", str(args.generations)]
    if args.prune_generations is not None:
        argv += ["--prune-generations", str(args.prune_generations)]
    code = module.main(argv)
    if code:
        raise UsageError(f"benchmark {args.benchmark} exited with status {code}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gapruning", description=__doc__.splitlines()[0])
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
        type=_floats,
        default=(0.01, 0.05, 0.1),
        help="comma-separated radii in pixel units",
    )
    e.add_argument("--pgd-steps", type=int, default=10)
    e.add_argument("--limit", type=int, help="evaluate the first N test samples only")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(func=_cmd_eval)

    pr = sub.add_parser("prune", help="prune a model without data (genetic search)")
    pr.add_argument(
        "--model", required=True, help="shipped model name or model directory"
    )
    pr.add_argument(
        "--strategy", default="ga", help="ga, random, evosax:<Algorithm>, ..."
    )
    pr.add_argument(
        "--target", type=float, default=0.7, help="fraction to remove, (0, 1)"
    )
    pr.add_argument("--budget", default="units", choices=("units", "params", "flops"))
    pr.add_argument(
        "--fitness",
        type=_fitness_spec,
        default="default",
        help="metric name or JSON weights, e.g. '{\"fidelity\": 1}'",
    )
    pr.add_argument("--generations", type=int, default=200)
    pr.add_argument("--population", type=int, default=64)
    pr.add_argument("--num-probes", type=int, default=512)
    pr.add_argument(
        "--probes", help="probe kind (gaussian, uniform, bn_stats, inversion)"
    )
    pr.add_argument("--encoding", default="units", choices=("units", "profile"))
    pr.add_argument(
        "--profile",
        help="apply a saved layer-wise profile JSON (from profile_random/profile_rl) "
        "to this model of the same architecture, under --target/--budget",
    )
    pr.add_argument(
        "--per-group", action="store_true", help="same ratio in every group"
    )
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument(
        "--chunk",
        type=int,
        default=10,
        help="generations per jitted scan; progress and checkpoints in between",
    )
    pr.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="checkpoint the search every N chunks (0: never)",
    )
    pr.add_argument(
        "--resume", action="store_true", help="continue a killed run in --out"
    )
    pr.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="dtype of the population fitness (compaction stays float32)",
    )
    pr.add_argument(
        "--chunk-size",
        default="auto",
        help="individuals evaluated at once: N, 'auto' (memory-bounded) or 'none'",
    )
    pr.add_argument(
        "--repair",
        choices=("merge", "lstsq"),
        help="score each individual after merging compensation, and compensate "
        "the result (merge: Neuron Merging; lstsq: least squares on probes)",
    )
    pr.add_argument(
        "--distill-steps",
        type=int,
        default=0,
        help="distill the pruned model from the dense one on probes (N steps)",
    )
    pr.add_argument("--out", required=True, help="run directory")
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("--quiet", action="store_true")
    pr.set_defaults(func=_cmd_prune)

    sh = sub.add_parser("show", help="print the report of a run directory")
    sh.add_argument("run_dir")
    sh.set_defaults(func=_cmd_show)

    be = sub.add_parser(
        "bench",
        help="run a benchmark of the repository (writes benchmarks/results/)",
    )
    be.add_argument("benchmark", choices=BENCHMARKS)
    be.add_argument("--quick", action="store_true", help="few generations, to check")
    be.add_argument("--part", choices=("throughput", "quality", "all"), default="all")
    be.add_argument("--repeats", type=int, default=3, help="timed repeats")
    be.add_argument("--generations", type=int, help="generations of the timed GA")
    be.add_argument(
        "--prune-generations", type=int, help="gp.prune generations (quality)"
    )
    be.set_defaults(func=_cmd_bench)

    li = sub.add_parser("list", help="list architectures and shipped models")
    li.set_defaults(func=_cmd_list)

    c = sub.add_parser(
        "convert", help="import a PyTorch, Keras or ONNX model as a gapruning model"
    )
    c.add_argument(
        "--from", dest="source", required=True, choices=("torch", "keras", "onnx")
    )
    c.add_argument("file", help=".pt/.pth/.safetensors, .h5/.keras or .onnx file")
    c.add_argument("--arch", help="zoo architecture to map a torch state dict onto")
    c.add_argument("--num-classes", type=int, help="classes of the zoo architecture")
    c.add_argument(
        "--arch-arg", action="append", help="KEY=VALUE for the zoo builder, repeatable"
    )
    c.add_argument("--input-shape", type=_ints, help="H,W,C (or F) as the model takes")
    c.add_argument(
        "--input-box",
        type=_floats,
        help="LOW,HIGH: range of valid model inputs (--input-box=-1,1 if LOW < 0)",
    )
    c.add_argument("--name", help="model name for the card")
    c.add_argument("--out", required=True, help="output model directory")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except (
        UsageError,
        FileNotFoundError,
        FileExistsError,
        KeyError,
        ValueError,
        RuntimeError,
        OSError,
    ) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"gapruning {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
