"""``gapruning bench``: run a benchmark script of the repository."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import UsageError

BENCHMARKS = ("peers",)


def _benchmarks_dir() -> Path:
    """The repository's ``benchmarks/`` folder (next to the installed package)."""
    here = Path(__file__).resolve().parents[2] / "benchmarks"
    if not (here / "common.py").is_file():
        raise UsageError(
            f"no benchmarks folder at {here}: the benchmarks ship with the "
            "repository, not the package; run from an editable install "
            "(pip install -e .) of a gapruning checkout"
        )
    return here


def add_parser(sub) -> None:
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
    be.set_defaults(func=run)


def run(args) -> None:
    """Runs ``benchmarks/<args.benchmark>.py`` with the options given."""
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
