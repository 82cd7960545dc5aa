"""``gapruning prune``: prune a model without data into a run directory."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
from pathlib import Path

from .common import UsageError


def add_parser(sub) -> None:
    pr = sub.add_parser("prune", help="prune a model without data (genetic search)")
    pr.add_argument(
        "--model", required=True, help="shipped model name or model directory"
    )
    _add_search_options(pr)
    _add_run_options(pr)
    pr.set_defaults(func=run)


def _add_search_options(pr) -> None:
    pr.add_argument(
        "--strategy", default="ga", help="ga, random, evosax:<Algorithm>, ..."
    )
    pr.add_argument(
        "--target", type=float, default=0.7, help="fraction to remove, (0, 1)"
    )
    pr.add_argument("--budget", default="units", choices=("units", "params", "flops"))
    pr.add_argument(
        "--fitness",
        type=fitness_spec,
        default="default",
        help="metric name or JSON weights, e.g. '{\"fidelity\": 1}'",
    )
    sizes = "default: follows the model's cost (200 x 64 x 512 for small models)"
    pr.add_argument("--generations", type=int, help=sizes)
    pr.add_argument("--population", type=int, help=sizes)
    pr.add_argument("--num-probes", type=int, help=sizes)
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


def _add_run_options(pr) -> None:
    pr.add_argument(
        "--generations-per-scan",
        type=int,
        default=10,
        help="generations per jitted scan; progress and checkpoints in between",
    )
    # the old name of --generations-per-scan
    pr.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    pr.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="checkpoint the search every N scans (0: never)",
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
    pr.add_argument(
        "--time-budget",
        type=duration,
        help="finish within this wall-clock time (900, 30m, 1.5h): the search "
        "takes at most half, distillation fills the time left (at most "
        "--distill-steps when given)",
    )
    pr.add_argument(
        "--no-recover",
        action="store_true",
        help="keep the found masks' weights as they are (default: least squares "
        "repair, then distillation sized by the search; see docs/user-guide.md)",
    )
    pr.add_argument("--out", required=True, help="run directory")
    pr.add_argument("--overwrite", action="store_true")
    pr.add_argument("--quiet", action="store_true")


def duration(text: str) -> float:
    """Seconds in a duration such as ``900``, ``30m`` or ``1.5h``."""
    from ..deadline import parse_duration

    try:
        return parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def fitness_spec(text: str):
    """A metric name, or a JSON object of metric weights."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise argparse.ArgumentTypeError(
                f"--fitness is not valid JSON: {err}"
            ) from None
    return text


def run(args) -> None:
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
    from .. import zoo
    from ..prune import prune
    from ..report import write_run

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
    strategy, strategy_options = _strategy(args, net)
    with messages_shown(not args.quiet):
        result = prune(
            net,
            strategy,
            strategy_options=strategy_options,
            **_prune_options(args, checkpoints),
        )
    report = write_run(result, out, overwrite=True)
    p, f = report["params"], report["flops"]
    print(
        f"pruned {net.name}: params {p['before']:,} -> {p['after']:,}, "
        f"FLOPs {f['before']:,} -> {f['after']:,}; wrote {out}/"
    )


@contextlib.contextmanager
def messages_shown(enabled: bool):
    """Inside, the library's INFO messages (probe generation, repair) are
    printed to stderr as plain lines, once: not also by a root handler (importing
    orbax gives the root logger one)."""
    if not enabled:
        yield
        return
    logger = logging.getLogger("gapruning")
    level, propagate = logger.level, logger.propagate
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _prune_options(args, checkpoints) -> dict:
    """``gp.prune``'s keyword arguments from the command line."""
    return dict(
        target=args.target,
        budget=args.budget,
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
        **_generations_per_scan(args),
        checkpoint_every=args.checkpoint_every or 1,
        resume=args.resume,
        dtype=args.dtype,
        chunk_size=_chunk_size(args.chunk_size),
        repair=args.repair,
        recover=_recover(args),
        recover_options=(
            {"distill": {"steps": args.distill_steps}} if args.distill_steps else {}
        ),
        time_budget=args.time_budget,
    )


def _recover(args) -> tuple[str, ...]:
    """The recover steps: the default recovery unless ``--no-recover``, with
    distillation for ``--distill-steps N``."""
    default = () if args.no_recover else ("auto",)
    return (*default, "distill") if args.distill_steps else default


def _generations_per_scan(args) -> dict[str, int]:
    """``--generations-per-scan``, or the deprecated ``--chunk`` as ``chunk=``
    (which warns, and names ``chunk`` in its errors)."""
    if args.chunk is None:
        return {"generations_per_scan": args.generations_per_scan}
    return {"chunk": args.chunk}


def _chunk_size(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        return int(text)
    except ValueError:
        raise UsageError(
            f"--chunk-size takes a positive integer, 'auto' or 'none', got {text!r}"
        ) from None


def _strategy(args, net) -> tuple[str, dict]:
    """The method and its options: ``--strategy``, or a saved ``--profile``."""
    if not args.profile:
        return args.strategy, {}
    # apply a saved layer-wise profile (no search)
    from ..methods.profile import ProfileError, check_profile, load_profile

    try:
        check_profile(net, load_profile(args.profile))
    except ProfileError as err:
        raise UsageError(str(err)) from None
    strategy = args.strategy
    if strategy not in ("profile_random", "profile_rl"):
        strategy = "profile_random"
    return strategy, {"profile": args.profile}
