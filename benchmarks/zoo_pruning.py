"""The plain data-free run on shipped models at several FLOP budgets.

For each model and target: ``gp.prune(model, target=T, budget="flops")`` with
every other option at its default (what ``gapruning prune --model M --budget
flops --target T`` runs: search sizes from the model's cost, least squares
repair, distillation as long as the search), seed 0, timed from loading the
dense model to the compacted result; then the pruned and dense models' accuracy
on the Fashion-MNIST test set, and the widths the search kept.

Writes ``benchmarks/results/zoo_pruning.{json,md}``; rows of other model/target
pairs already there are kept, so the cases can be run one at a time.

Run: ``python benchmarks/zoo_pruning.py [--models M,..] [--targets 0.3,0.5]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, machine  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning.files import write_text_atomic  # noqa: E402

MODELS = ("mobilenet-fmnist", "vit-fmnist")


def accuracy(net, test) -> float:
    return round(100 * float(gp.evaluate(net, test, attacks=())["accuracy"]), 2)


def run_case(model: str, target: float, test, sizes: dict) -> dict:
    """One plain run: its time, accuracy, sizes, recovery and kept widths."""
    t0 = time.perf_counter()
    result = gp.prune(
        gp.load(model), target=target, budget="flops", progress=False, **sizes
    )
    seconds = time.perf_counter() - t0
    c, space = result.config, result.net.space
    return {
        "model": model,
        "target": target,
        "seconds": round(seconds, 1),
        "dense": accuracy(result.net, test),
        "accuracy": accuracy(result.pruned, test),
        "sizes": f"{c.generations} x {c.population} x {c.num_probes}",
        "recover": list(c.recover),
        "distill_steps": c.recover_options.get("distill", {}).get("steps"),
        "flops_kept": round(space.flops(result.masks) / space.dense_flops, 4),
        "params": [space.dense_params, int(space.params(result.masks))],
        "kept": {
            g.name: [int(result.masks[g.name].sum()), g.size] for g in space.groups
        },
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Plain data-free pruning of the shipped models",
        "",
        f"{m['date']}, {m['cores']} CPU cores, jax {m['jax']}, load average at the "
        f"start {m['load_average_at_start']:.1f}. Full Fashion-MNIST test set; seconds "
        "from loading the dense model to the compacted result.",
        "",
        "| model | FLOPs removed | kept | search | recovery | seconds | accuracy % "
        "| dense % | below dense | params |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        steps = f" ({r['distill_steps']} steps)" if r["distill_steps"] else ""
        lines.append(
            f"| {r['model']} | {r['target']:.0%} | {r['flops_kept']:.1%} | "
            f"{r['sizes']} | {', '.join(r['recover']) or 'none'}{steps} | "
            f"{r['seconds']} | "
            f"{r['accuracy']} | {r['dense']} | {r['dense'] - r['accuracy']:.2f} | "
            f"{r['params'][0]:,} -> {r['params'][1]:,} |"
        )
    lines += ["", "Kept units per group (kept / dense):", ""]
    for r in report["rows"]:
        kept = ", ".join(f"{g} {k}/{n}" for g, (k, n) in r["kept"].items())
        lines.append(f"- {r['model']} at {r['target']:.0%}: {kept}")
    return "\n".join(lines) + "\n"


def merge(old: dict | None, new: dict) -> dict:
    """``new``'s rows replace ``old``'s of the same model and target."""
    done = {(r["model"], r["target"]) for r in new["rows"]}
    kept = [
        r for r in (old or {}).get("rows", []) if (r["model"], r["target"]) not in done
    ]
    return {
        **new,
        "rows": sorted(kept + new["rows"], key=lambda r: (r["model"], r["target"])),
    }


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--targets", default="0.3,0.5")
    p.add_argument(
        "--quick", action="store_true", help="tiny runs on lenet300, 500 images"
    )
    p.add_argument("--out", type=Path, default=RESULTS / "zoo_pruning")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.targets = [float(t) for t in args.targets.split(",")]
    args.sizes, args.test_samples = {}, None
    if args.quick:
        args.models, args.targets, args.test_samples = ["lenet300-fmnist"], [0.3], 500
        args.sizes = {"generations": 2, "population": 4, "num_probes": 16}
    unknown = [m for m in args.models if m not in gp.zoo.shipped_models()]
    bad = [t for t in args.targets if not 0 < t < 1]
    if unknown or bad:
        p.error(f"unknown model(s) {unknown} or target(s) outside (0, 1) {bad}")
    return args


def main(argv=None) -> int:
    """Runs the cases one by one, writing the results after each."""
    args = parse(argv)
    test = gp.data.load_dataset("fashion-mnist", "test")
    if args.test_samples:
        test = (test.images[: args.test_samples], test.labels[: args.test_samples])
    json_path, md_path = (
        args.out.with_name(args.out.name + s) for s in (".json", ".md")
    )
    old = json.loads(json_path.read_text()) if json_path.exists() else None
    new = {"machine": machine(), "rows": []}
    for model in args.models:
        for target in args.targets:
            new["rows"].append(run_case(model, target, test, args.sizes))
            print(json.dumps(new["rows"][-1]))
            report = merge(old, new)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
            write_text_atomic(md_path, markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
