"""Test accuracy against wall-clock time of a whole pruning run (issue 28).

For each model at its budget, one row per way to get a pruned network, every row
timed from the loaded dense model to the compacted result (evaluation excluded):

* ``old defaults``: the search before the defaults followed the model's cost (64
  individuals x 512 probes, no repair; 200 generations), one run per
  ``--old-generations`` entry while they fit ``--old-cap`` seconds in all;
* ``new defaults``: ``gp.prune`` as called with no option (sizes by
  :mod:`gapruning.defaults`, least squares repair);
* ``new, no repair``: the same search, ``recover=()``;
* ``repair in the loop``: every individual scored after least squares
  (``repair="lstsq"``);
* ``new + distill N``: the defaults, then ``N`` distillation steps;
* ``Torch-Pruning``: its MagnitudePruner (L2 importance, the same ratio in every
  layer, bisected to the same FLOPs as gapruning counts them), no fine-tuning;
  ``+ distill N``: then gapruning's data-free distillation.

Writes ``benchmarks/results/time_to_result.{json,md,png}``. ``--quick`` runs tiny
versions of the rows on lenet300 (the suite's check).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import RESULTS, machine  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning.files import write_text_atomic  # noqa: E402

CASES = {
    "lenet300-fmnist": ("units", 0.7),
    "lenet5-fmnist": ("units", 0.5),
    "resnet20-fmnist": ("flops", 0.5),
    "vgg11-fmnist": ("flops", 0.5),
}
OLD_DEFAULTS = {"generations": 200, "population": 64, "num_probes": 512}


@dataclasses.dataclass
class Case:
    """One model at one budget, with its test set and the rows' settings."""

    model: str
    budget: str
    target: float
    test: tuple
    args: argparse.Namespace

    def accuracy(self, pruned) -> float:
        result = gp.evaluate(pruned, self.test, attacks=())
        return round(100 * float(result["accuracy"]), 2)

    def prune(self, **options):
        """``gp.prune`` of a freshly loaded model: (result, seconds)."""
        t0 = time.perf_counter()
        net = gp.load(self.model)
        options = {"progress": False, **self.args.sizes, **options}
        result = gp.prune(net, target=self.target, budget=self.budget, **options)
        return result, time.perf_counter() - t0


def row(label: str, seconds: float, accuracy: float, **extra) -> dict:
    return {"row": label, "seconds": round(seconds, 1), "accuracy": accuracy, **extra}


def old_defaults(case: Case, log) -> list[dict]:
    """Runs of the old default sizes for each of ``--old-generations``, while the
    next run's expected time (the last one's, scaled by generations) fits the
    remaining ``--old-cap`` seconds."""
    sizes = {**OLD_DEFAULTS, **case.args.old_sizes}
    rows, spent, last = [], 0.0, None
    for g in case.args.old_generations:
        if last is not None and spent + last[1] * g / last[0] > case.args.old_cap:
            log(f"  old defaults, {g} generations: skipped (over --old-cap)")
            break
        result, seconds = case.prune(**{**sizes, "generations": g}, recover=())
        spent, last = spent + seconds, (g, seconds)
        sizes_text = f"{g} x {sizes['population']} x {sizes['num_probes']}"
        acc = case.accuracy(result.pruned)
        rows.append(row("old defaults", seconds, acc, sizes=sizes_text))
        log(f"  {rows[-1]}")
    return rows


def new_rows(case: Case, log) -> list[dict]:
    """The new defaults, without repair, with repair in the loop, with distillation."""
    rows = []
    result, seconds = case.prune()
    c = result.config
    sizes = f"{c.generations} x {c.population} x {c.num_probes}"
    rows.append(row("new defaults", seconds, case.accuracy(result.pruned), sizes=sizes))
    log(f"  {rows[-1]}")
    variants = [("new, no repair", {"recover": ()})]
    if not case.args.skip_repair_in_loop:
        variants.append(("repair in the loop", {"repair": "lstsq"}))
    for steps in case.args.distill_steps:
        distill = {"distill": {"steps": steps}}
        variants.append(
            (
                f"new + distill {steps}",
                {"recover": ("auto", "distill"), "recover_options": distill},
            )
        )
    for label, options in variants:
        result, seconds = case.prune(**options)
        rows.append(row(label, seconds, case.accuracy(result.pruned), sizes=sizes))
        log(f"  {rows[-1]}")
    return rows


def torch_pruning_rows(case: Case, log) -> list[dict]:
    """Torch-Pruning magnitude at the same FLOPs, then with gapruning's distillation."""
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        log("  Torch-Pruning is not installed (pip install torch-pruning): skipped")
        return []
    t0 = time.perf_counter()
    net = gp.load(case.model)
    masks, ratio = magnitude_masks_at(net, case.budget, case.target)
    small = gp.compact(net, masks)
    seconds = time.perf_counter() - t0
    rows = [row("Torch-Pruning magnitude", seconds, case.accuracy(small), ratio=ratio)]
    log(f"  {rows[-1]}")
    for steps in case.args.distill_steps:
        t1 = time.perf_counter()
        student = gp.recover.distill(small, net, masks=masks, steps=steps)
        total = seconds + time.perf_counter() - t1
        label = f"Torch-Pruning + distill {steps}"
        rows.append(row(label, total, case.accuracy(student), ratio=ratio))
        log(f"  {rows[-1]}")
    return rows


def magnitude_masks_at(net, budget: str, target: float) -> tuple[dict, float]:
    """Torch-Pruning's magnitude masks at the smallest per-layer ratio whose
    network removes at least ``target`` of ``budget`` (bisection)."""
    cost = {"units": net.space.num_units, "flops": net.space.dense_flops}[budget]
    low, high, best = 0.0, 1.0, None
    for _ in range(12):
        ratio = (low + high) / 2
        masks = torch_pruning_masks(net, ratio)
        kept = (
            net.space.flops(masks)
            if budget == "flops"
            else sum(int(m.sum()) for m in masks.values())
        )
        if kept <= (1 - target) * cost:
            high, best = ratio, (masks, ratio)
        else:
            low = ratio
    return best[0], round(best[1], 4)


def torch_pruning_masks(net, ratio: float) -> dict:
    """The units Torch-Pruning's MagnitudePruner keeps at ``ratio`` in every layer
    (group name -> bool), from its pruning history on the exported module."""
    import torch
    import torch_pruning as tp

    module = gp.convert.to_torch_module(net)
    example = torch.zeros(1, *_nchw(net.input_shape))
    last = [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]
    pruner = tp.pruner.MagnitudePruner(
        module,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[last],
    )
    pruner.step()
    removed = {}
    for name, out_channels, idxs in pruner.pruning_history():
        if out_channels:
            removed[name] = set(int(i) for i in idxs)
    masks = {}
    for g in net.space.groups:
        gone = set().union(*(removed.get(m, set()) for m in g.members))
        masks[g.name] = np.array([i not in gone for i in range(g.size)])
    return masks


def _nchw(shape: tuple) -> tuple:
    return (shape[-1], *shape[:-1]) if len(shape) == 3 else shape


def run_case(model: str, args, log=print) -> dict:
    budget, target = CASES[model]
    test = gp.data.load_dataset("fashion-mnist", "test")
    if args.test_samples:
        test = (test.images[: args.test_samples], test.labels[: args.test_samples])
    case = Case(model, budget, target, test, args)
    dense = case.accuracy(gp.load(model))
    log(f"{model}: {budget} {target:.0%} removed, dense {dense}%")
    rows = []
    for name in args.rows:
        rows += ROWS[name](case, log)
    return {
        "model": model,
        "budget": budget,
        "target": target,
        "dense": dense,
        "rows": rows,
    }


ROWS = {"old": old_defaults, "new": new_rows, "torch_pruning": torch_pruning_rows}


def markdown(report: dict) -> str:
    lines = [
        "# Time to result",
        "",
        "Test accuracy (Fashion-MNIST test set) against the wall-clock seconds of the",
        "whole run, from loading the dense model to the compacted result. Machine: "
        f"{json.dumps(report['machine'])}.",
        "",
        "| model | budget | row | sizes | seconds | accuracy % | below dense |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    for case in report["cases"]:
        for r in case["rows"]:
            below = round(case["dense"] - r["accuracy"], 2)
            lines.append(
                f"| {case['model']} | {case['target']:.0%} {case['budget']} | "
                f"{r['row']} | {r.get('sizes', '')} | {r['seconds']} | "
                f"{r['accuracy']} | {below} |"
            )
    lines += ["", __doc__.split("\n\n", 1)[1].split("Writes")[0].strip(), ""]
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = report["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4), squeeze=False)
    for ax, case in zip(axes[0], cases, strict=True):
        for r in case["rows"]:
            family = r["row"].split(",")[0]
            ax.scatter(r["seconds"], r["accuracy"], label=family)
        ax.axhline(case["dense"], color="gray", linestyle="--", label="dense")
        ax.set(
            title=f"{case['model']} ({case['target']:.0%} {case['budget']})",
            xlabel="seconds (log)",
            ylabel="test accuracy %",
            xscale="log",
        )
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)


def merge(old: dict | None, new: dict) -> dict:
    """``new``'s cases replace ``old``'s of the same model; the others stay."""
    if not old:
        return new
    done = {c["model"] for c in new["cases"]}
    kept = [c for c in old["cases"] if c["model"] not in done]
    order = list(CASES)
    cases = sorted(kept + new["cases"], key=lambda c: order.index(c["model"]))
    return {**new, "cases": cases}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(CASES))
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--distill-steps", default="1000")
    p.add_argument("--old-generations", default="10,20,50,100,200")
    p.add_argument("--old-cap", type=float, default=900.0)
    p.add_argument("--skip-repair-in-loop", action="store_true")
    p.add_argument("--test-samples", type=int, default=0, help="0: all 10,000")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "time_to_result")
    args = p.parse_args(argv)
    args.models = args.models.split(",")
    args.rows = args.rows.split(",")
    args.distill_steps = [int(s) for s in args.distill_steps.split(",") if s]
    args.old_generations = [int(g) for g in str(args.old_generations).split(",")]
    args.sizes, args.old_sizes = {}, {}
    if args.quick:
        args.models, args.test_samples = ["lenet300-fmnist"], 500
        args.old_generations = [2, 4]
        args.distill_steps = [3]
        args.sizes = {"generations": 2, "population": 4, "num_probes": 16}
        args.old_sizes = {"population": 4, "num_probes": 16}
    unknown = [m for m in args.models if m not in CASES]
    unknown += [r for r in args.rows if r not in ROWS]
    if unknown:
        p.error(
            f"unknown model(s)/row(s) {unknown}; known: {list(CASES)}, {list(ROWS)}"
        )
    return args


def main(argv=None) -> int:
    """Runs the cases one by one, writing the results after each (a stopped run
    keeps the cases it finished)."""
    args = parse(argv)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    new = {
        "machine": machine(),
        "settings": json.loads(json.dumps(settings, default=str)),
        "cases": [],
    }
    stem = args.out
    old = (
        json.loads(stem.with_suffix(".json").read_text())
        if stem.with_suffix(".json").exists() and not args.quick
        else None
    )
    for model in args.models:
        new["cases"].append(run_case(model, args))
        report = merge(old, new)
        write(report, stem)
    print(markdown(report))
    return 0


def write(report: dict, stem: Path) -> None:
    """``stem.{json,md,png}``, each written whole or not at all."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_text_atomic(stem.with_suffix(".md"), markdown(report))
    plot(report, stem.with_suffix(".png"))


if __name__ == "__main__":
    raise SystemExit(main())
