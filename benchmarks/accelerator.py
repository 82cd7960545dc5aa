"""Per-generation time, time-to-result and peak memory of ``gp.prune`` on a device.

Issue 28 ("Accelerators"): for resnet20-fmnist, vgg11-fmnist (shipped weights) and
a torchvision ResNet-50 at 224x224 (random weights, 10 classes, converted with
``gp.convert.from_torch``; speed and memory do not depend on the weights), in
float32 and bfloat16, at 50% of FLOPs with the default data-free fitness,
population 64 and 256 probes:

* **time to result**: ``gp.prune``'s three stages (``make_problem`` with the
  fitness built, probes included; ``find_masks``, the engine search with
  ``--generations``; ``finish``, compaction), timed apart; their sum is the wall
  time of ``gp.prune(net, target=0.5, budget="flops", dtype=...)``;
* **per generation**: the engine's generation scan (``search.engine.make_scan``,
  ``--scan-length`` generations per scan) built exactly as ``engine_search`` does
  (encoding with the L1 prior, strategy, problem, initial population), compiled
  apart, then timed ``--repeats`` times after a warm-up (blocked): median, min, max;
* **memory**: the device's ``peak_bytes_in_use`` (GPU/TPU; CPU devices report no
  statistics: "n/a (CPU)"), XLA's ``memory_analysis()`` of the compiled generation
  scan (temporaries, arguments, outputs: available on every backend) and the
  process's peak RSS.

Each (model, dtype) row runs in a fresh process by default (``--isolate``), so a
device's peak memory is that row's own. A row that cannot run is recorded as
skipped or failed with its reason, never with made-up numbers.

The report is rewritten after every row (a run killed part-way keeps its finished
rows); ``--merge`` adds this run's rows to a saved report of the same device kind
and settings (e.g. ResNet-50 measured in a second call); ``--row-timeout`` bounds an
isolated row.

Run: ``python benchmarks/accelerator.py`` (on a GPU), or ``--quick`` (population 4,
8 probes, 2 generations, resnet20-fmnist float32: under a minute on CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, import_torchvision, machine  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning import search  # noqa: E402
from gapruning.config import PruneConfig  # noqa: E402
from gapruning.files import write_text_atomic  # noqa: E402
from gapruning.methods.engine_search import make_search  # noqa: E402

# ``gapruning.prune`` the module (``gp.prune`` is the function)
prune_stages = importlib.import_module("gapruning.prune")

MODELS = ("resnet20-fmnist", "vgg11-fmnist", "resnet50-224")
DTYPES = ("float32", "bfloat16")
RESNET50 = "resnet50-224"
# the valid range of ImageNet-normalized inputs: (0 - 0.485) / 0.229 ..
# (1 - 0.406) / 0.225
IMAGENET_BOX = (-2.12, 2.64)
MiB = 2**20


class Skip(Exception):
    """A row that cannot run here; the message says why."""


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated")
    ap.add_argument("--population", type=int, default=64)
    ap.add_argument("--probes", type=int, default=256, help="num_probes")
    ap.add_argument(
        "--generations", type=int, default=20, help="of the time-to-result run"
    )
    ap.add_argument("--target", type=float, default=0.5, help="fraction of FLOPs")
    ap.add_argument("--scan-length", type=int, default=2, help="generations per scan")
    ap.add_argument("--repeats", type=int, default=3, help="timed scans")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one process per row (default: on, except in --quick)",
    )
    ap.add_argument(
        "--allow-slow-cpu",
        action="store_true",
        help=f"run {RESNET50} on a CPU too (hours at full size)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny, for the test suite")
    ap.add_argument("--out", default=str(RESULTS / "accelerator"), help="file stem")
    ap.add_argument("--note", default="", help="a sentence for the report's header")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of OUT.json this run does not measure (same device "
        "kind and settings required)",
    )
    ap.add_argument(
        "--row-timeout",
        type=float,
        default=None,
        help="seconds one isolated row may take (then recorded as failed)",
    )
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)  # model dtype json
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.dtypes = "resnet20-fmnist", "float32"
        args.population, args.probes, args.generations = 4, 8, 2
        args.scan_length, args.repeats = 1, 2
    if args.isolate is None:
        args.isolate = not args.quick
    args.models = _names(args.models, MODELS, "model")
    args.dtypes = _names(args.dtypes, DTYPES, "dtype")
    for name in ("population", "probes", "generations", "scan_length", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def _names(text, known, what) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"unknown {what}(s) {unknown}; known: {', '.join(known)}")
    return names


# ------------------------------------------------------------------ models


def load_model(name: str, allow_slow_cpu: bool = False):
    """-> (gp.Pretrained, a note on where it came from); :class:`Skip` if not here."""
    if name != RESNET50:
        return gp.load(name), "shipped weights"
    try:
        torchvision = import_torchvision()
    except ImportError as err:
        raise Skip(f"torchvision not installed ({err})") from None
    if jax.default_backend() == "cpu" and not allow_slow_cpu:
        raise Skip(
            "CPU: one generation is 64 x 256 ResNet-50 passes at 224x224 "
            "(about 130 TFLOP), hours here; --allow-slow-cpu runs it anyway"
        )
    module = torchvision.models.resnet50(weights=None, num_classes=10).eval()
    net = gp.convert.from_torch(
        module, input_shape=(224, 224, 3), input_box=IMAGENET_BOX, name=RESNET50
    )
    return net, f"torchvision {torchvision.__version__} resnet50, random weights"


# ------------------------------------------------------------------ memory


def device_memory() -> dict:
    """Peak bytes in use on the local devices, or why there is no figure."""
    peaks = []
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # some backends raise instead of returning None
            stats = None
        if not stats or "peak_bytes_in_use" not in stats:
            kind = "CPU" if d.platform == "cpu" else d.platform
            return {"peak_bytes": None, "note": f"n/a ({kind})"}
        peaks.append(int(stats["peak_bytes_in_use"]))
    return {"peak_bytes": max(peaks), "per_device": peaks, "note": ""}


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def compiled_memory(compiled) -> dict:
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return {}
    if m is None:
        return {}
    keys = ("temp", "argument", "output")
    return {f"{k}_bytes": int(getattr(m, f"{k}_size_in_bytes", 0) or 0) for k in keys}


# ------------------------------------------------------------------ measuring


def config_for(args, dtype: str) -> PruneConfig:
    return PruneConfig(
        target=args.target,
        budget="flops",
        generations=args.generations,
        population=args.population,
        num_probes=args.probes,
        seed=args.seed,
        progress=False,
        dtype=dtype,
    )


def time_to_result(net, config: PruneConfig) -> tuple[dict, object, object]:
    """``gp.prune``'s stages, timed apart -> (timings, the context, the result)."""
    t0 = time.perf_counter()
    ctx = prune_stages.make_problem(net, config)
    ctx.fitness  # noqa: B018  (built on first use: probes, calibration)
    t1 = time.perf_counter()
    found = prune_stages.find_masks(ctx, config)
    t2 = time.perf_counter()
    pruned = prune_stages.finish(ctx, config, found)
    jax.block_until_ready(jax.tree.leaves(nnx.state(pruned.model)))
    t3 = time.perf_counter()
    space = net.space
    timings = {
        "generations": config.generations,
        "fitness_build_s": t1 - t0,
        "search_s": found.seconds,
        "search_compile_s": found.compile_seconds,
        "search_generations_s": found.seconds - found.compile_seconds,
        "evaluations": int(found.evaluations),
        "finish_s": t3 - t2,
        "total_s": t3 - t0,
        "flops_kept": space.flops(found.masks) / space.dense_flops,
        "best_fitness": found.best_fitness,
    }
    return timings, ctx, found


def steady_generation(ctx, config: PruneConfig, length: int, repeats: int) -> dict:
    """The engine's generation scan as ``engine_search`` builds it: compile time,
    compiled memory, and seconds per generation over ``repeats`` timed scans."""
    setup = make_search(ctx, config)
    strategy, problem, mesh = setup.strategy, setup.problem, setup.mesh
    center, noise = setup.center, setup.noise
    key = jax.random.PRNGKey(config.seed)
    state = jax.jit(
        lambda k: search.engine.init(
            strategy, problem, k, length, center=center, noise=noise, mesh=mesh
        )
    )(key)
    jax.block_until_ready(state)
    c0 = time.perf_counter()
    scan = search.engine.make_scan(strategy, problem, length, mesh)
    compiled = scan.lower(state).compile()
    compile_s = time.perf_counter() - c0
    times = []
    for i in range(repeats + 1):  # the first one is the warm-up
        s = jax.block_until_ready(jax.tree.map(jnp.copy, state))  # donated
        t = time.perf_counter()
        out = jax.block_until_ready(compiled(s))
        if i:
            times.append((time.perf_counter() - t) / length)
    per_gen = statistics.median(times)
    finite = bool(jnp.isfinite(out.best_fitness))
    return {
        "scan_length": length,
        "repeats": repeats,
        "compile_s": compile_s,
        "per_generation_s": per_gen,
        "per_generation_min_s": min(times),
        "per_generation_max_s": max(times),
        "evaluations_per_s": config.population / per_gen,
        "finite_best": finite,
        "compiled_memory": compiled_memory(compiled),
    }


def measure(model: str, dtype: str, args, log=print) -> dict:
    """One row: time to result, steady generation time and memory."""
    row = {
        "model": model,
        "dtype": dtype,
        "population": args.population,
        "num_probes": args.probes,
        "budget": f"flops {args.target:g}",
    }
    try:
        t0 = time.perf_counter()
        net, source = load_model(model, args.allow_slow_cpu)
        row["source"] = source
        row["load_s"] = time.perf_counter() - t0
        row["dense_flops"] = int(net.space.dense_flops)
        config = config_for(args, dtype)
        log(f"{model} {dtype}: time to result ({args.generations} generations)")
        row["time_to_result"], ctx, _ = time_to_result(net, config)
        log(f"{model} {dtype}: steady generation time")
        row["generation"] = steady_generation(
            ctx, config, args.scan_length, args.repeats
        )
    except Skip as err:
        return dict(row, status="skipped", reason=str(err))
    except Exception as err:  # recorded, the other rows still run
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"
        return dict(row, status="failed", reason=reason, memory=_memory())
    row["memory"] = _memory()
    row["status"] = "ok"
    return row


def _memory() -> dict:
    return {"device": device_memory(), "host_peak_rss_bytes": rss_bytes()}


def measure_isolated(
    model: str, dtype: str, argv: list[str], log=print, timeout: float | None = None
) -> dict:
    """:func:`measure` in a fresh process (the device's peak is the row's own)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        cmd = [sys.executable, __file__, *argv, "--child", model, dtype, str(out)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{model} {dtype}: timed out after {timeout:g} s")
            return {
                "model": model,
                "dtype": dtype,
                "status": "failed",
                "reason": f"timed out after {timeout:g} s (--row-timeout)",
            }
        if proc.returncode == 0 and out.exists():
            return json.loads(out.read_text())
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        log(f"{model} {dtype}: process failed ({proc.returncode})")
        return {
            "model": model,
            "dtype": dtype,
            "status": "failed",
            "reason": f"process exit {proc.returncode}: {' | '.join(tail)[:400]}",
        }


SETTINGS = (
    "population",
    "probes",
    "generations",
    "target",
    "scan_length",
    "repeats",
    "seed",
    "isolate",
    "quick",
)


def run(args, argv: list[str] | None = None, log=print, on_row=None) -> dict:
    """Every (model, dtype) row -> the report (nothing written); ``on_row`` gets
    the report so far after every row (to save partial results)."""
    info = machine()
    info["platform"] = jax.default_backend()
    info["device_kind"] = jax.devices()[0].device_kind
    info["device_count"] = jax.device_count()
    t0 = time.perf_counter()
    report = {
        "machine": info,
        "settings": {k: getattr(args, k) for k in SETTINGS},
        "note": args.note,
        "command": "python benchmarks/accelerator.py " + _shell(argv or []),
        "rows": [],
    }
    for model in args.models:
        for dtype in args.dtypes:
            if args.isolate:
                row = measure_isolated(
                    model, dtype, argv or [], log, timeout=args.row_timeout
                )
            else:
                row = measure(model, dtype, args, log)
            log(json.dumps(_summary(row)))
            report["rows"].append(row)
            info["load_average_at_end"] = os.getloadavg()[0]
            report["total_s"] = time.perf_counter() - t0
            if on_row is not None:
                on_row(report)
    return report


def _shell(argv: list[str]) -> str:
    import shlex

    skip = {"--note", "--out"}
    kept, i = [], 0
    while i < len(argv):
        if argv[i] in skip:
            i += 2
            continue
        kept.append(argv[i])
        i += 1
    return shlex.join(kept)


def check_mergeable(old: dict, machine_part: dict, settings: dict) -> None:
    """Refuses (one line) to merge rows of another device kind or settings."""
    parts = (("machine", machine_part, ("platform", "device_kind")),)
    parts += (("settings", settings, SETTINGS),)
    for part, new, keys in parts:
        a = {k: old[part].get(k) for k in keys}
        b = {k: new.get(k) for k in keys}
        if a != b:
            raise SystemExit(
                f"--merge: the saved report differs in {part}: {a} there, {b} now"
            )


def merge(new: dict, old: dict) -> dict:
    """``new`` plus the rows of ``old`` it did not measure, in model/dtype order;
    refused when the two ran on different device kinds or settings."""
    check_mergeable(old, new["machine"], new["settings"])
    done = {(r["model"], r["dtype"]) for r in new["rows"]}
    rows = new["rows"] + [
        r for r in old["rows"] if (r["model"], r["dtype"]) not in done
    ]
    order = {m: i for i, m in enumerate(MODELS)}
    rows.sort(key=lambda r: (order.get(r["model"], 99), DTYPES.index(r["dtype"])))
    notes = [n for n in (old.get("note"), new.get("note")) if n]
    merged = dict(new, rows=rows, note="\n\n".join(dict.fromkeys(notes)))
    commands = [old.get("command"), new.get("command")]
    merged["command"] = "; ".join(dict.fromkeys(c for c in commands if c))
    merged["total_s"] = new.get("total_s", 0.0) + old.get("total_s", 0.0)
    merged["merged_from"] = old.get("merged_from", []) + [
        {k: old["machine"].get(k) for k in ("date", "load_average_at_start")}
    ]
    return merged


def _summary(row) -> dict:
    g = row.get("generation", {})
    return {
        "model": row["model"],
        "dtype": row["dtype"],
        "status": row.get("status"),
        "s/gen": g.get("per_generation_s"),
        "ttr_s": row.get("time_to_result", {}).get("total_s"),
        "reason": row.get("reason"),
    }


# ------------------------------------------------------------------ report


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / MiB:,.0f}"


def markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    on_cpu = m["platform"] == "cpu"
    load = m["load_average_at_start"]
    where = (
        f"**figures from a {m['cores']}-core CPU, no accelerator**"
        if on_cpu
        else f"**{m['device_count']} x {m['device_kind']}** ({m['platform']})"
    )
    lines = [
        "# Accelerator benchmark: per-generation time, time to result, memory",
        "",
        f"{where}. `jax.devices()`: {', '.join(m['devices'])}; jax {m['jax']}; "
        f"{m['date']}; host {m['cpu']} with {m['cores']} cores, load average "
        f"{load:.1f} at start and {m['load_average_at_end']:.1f} at the end"
        + (" (the machine was shared with another benchmark)" if on_cpu else "")
        + ".",
        "",
        f'`gp.prune(net, target={s["target"]:g}, budget="flops", dtype=...)`: '
        f"the default data-free fitness, GA, population {s['population']}, "
        f"{s['probes']} probes. **Time to result**: gp.prune's stages with "
        f"{s['generations']} generations: the fitness built (probes, "
        "calibration), the search (compilation included, split out below), "
        "compaction. **s/generation**: the engine's generation scan "
        f"({s['scan_length']} generation(s) per scan) compiled apart, median of "
        f"{s['repeats']} timed scans after a warm-up (min-max). **Memory**: the "
        "device's `peak_bytes_in_use` (CPU devices report none), XLA's compiled "
        "footprint of the generation scan (temporaries + arguments + outputs), "
        "the process's peak RSS"
        + (" (each row in its own process)." if s["isolate"] else "."),
    ]
    if s["quick"]:
        lines += ["", "Quick mode (the test suite's size): not representative."]
    lines += [
        "",
        "| model | dtype | s/generation (min-max) | evals/s | compile s | "
        "time to result s | of which fitness build / search / compile | "
        "FLOPs kept | device peak MiB | compiled MiB | host RSS MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in report["rows"]:
        if r.get("status") != "ok":
            why = r.get("reason", "")
            lines.append(
                f"| {r['model']} | {r['dtype']} | {r.get('status')}: {why} "
                "| | | | | | | | |"
            )
            continue
        g, t, mem = r["generation"], r["time_to_result"], r["memory"]
        dev = mem["device"]
        peak = dev["note"] if dev["peak_bytes"] is None else _mib(dev["peak_bytes"])
        cm = g["compiled_memory"]
        compiled = _mib(sum(cm.values())) if cm else "n/a"
        lines.append(
            f"| {r['model']} | {r['dtype']} | {g['per_generation_s']:.3g} "
            f"({g['per_generation_min_s']:.3g}-{g['per_generation_max_s']:.3g}) | "
            f"{g['evaluations_per_s']:,.0f} | {g['compile_s']:.1f} | "
            f"{t['total_s']:.1f} | {t['fitness_build_s']:.1f} / "
            f"{t['search_s']:.1f} / {t['search_compile_s']:.1f} | "
            f"{t['flops_kept']:.3f} | {peak} | {compiled} | "
            f"{_mib(mem['host_peak_rss_bytes'])} |"
        )
    if report.get("note"):
        lines += ["", report["note"]]
    lines += [
        "",
        f"Total benchmark time {report.get('total_s', 0.0):.0f} s. The time to result "
        f"covers {s['generations']} generations; a run of G generations takes "
        "about fitness build + search compile + G x s/generation (+ compaction). "
        f"Command: `{report.get('command', 'python benchmarks/accelerator.py')}`.",
        "",
    ]
    return "\n".join(lines)


def write_report(report: dict, stem: str | Path) -> None:
    stem = Path(stem)
    write_text_atomic(
        stem.with_suffix(".json"), json.dumps(report, indent=2, default=str) + "\n"
    )
    write_text_atomic(stem.with_suffix(".md"), markdown(report))


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    if args.child:
        model, dtype, out = args.child
        with contextlib.redirect_stdout(sys.stderr):
            row = measure(model, dtype, args, log=lambda *a: None)
        write_text_atomic(Path(out), json.dumps(row, default=str))
        return
    old = None
    saved = Path(args.out).with_suffix(".json")
    if args.merge and saved.exists():
        old = json.loads(saved.read_text())
        here = {"platform": jax.default_backend()}
        here["device_kind"] = jax.devices()[0].device_kind
        check_mergeable(old, here, {k: getattr(args, k) for k in SETTINGS})

    def save(report):
        write_report(report if old is None else merge(report, old), args.out)

    report = run(args, argv, on_row=save)
    print(markdown(report if old is None else merge(report, old)))


if __name__ == "__main__":
    main()
