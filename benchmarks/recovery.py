"""Data-free recovery on LeNet-300-100 (Fashion-MNIST): merging compensation and
distillation on probes after L1 and after the GA search.

Rows per level of hidden units removed (50/60/70/80 %): L1, L1 + merge (Neuron
Merging, cosine), L1 + lstsq (least squares on probes), L1 + merge + distill, GA
(gp.prune default fitness, searched WITH the merge repair inside the fitness) +
merge, and + distill. Each row: clean test accuracy, FGSM and PGD robust accuracy
at eps 0.05 (pixel units), and retention (accuracy / dense accuracy) next to the
published Neuron Merging retention (Kim et al., 2020, LeNet-300-100 on
Fashion-MNIST: 98.8/96.8/92.1/89.1 % at 50/60/70/80 %). Only evaluation reads
the test set; pruning and recovery are data-free.

    python benchmarks/recovery.py [--quick] [--levels 0.5,0.6] [--limit N]

Writes benchmarks/results/recovery.{json,md} after every row.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from common import RESULTS, machine

import gapruning as gp

PUBLISHED = {0.5: 98.8, 0.6: 96.8, 0.7: 92.1, 0.8: 89.1}
EPS = 0.05


def _row(name, level, net, dense_acc, test, seconds):
    m = gp.evaluate(net, test, attacks=("fgsm", "pgd"), eps=(EPS,))
    return {
        "method": name,
        "removed": level,
        "accuracy": m["accuracy"],
        "fgsm": m["fgsm"][EPS],
        "pgd": m["pgd"][EPS],
        "retention": 100 * m["accuracy"] / dense_acc,
        "published_retention": PUBLISHED.get(level),
        "params": gp.param_count(net),
        "seconds": round(seconds, 1),
    }


def _markdown(result) -> str:
    d = result["dense"]
    lines = [
        "# Data-free recovery on lenet300-fmnist",
        "",
        f"Dense: accuracy {100 * d['accuracy']:.2f} %, FGSM@{EPS} "
        f"{100 * d['fgsm']:.2f} %, PGD@{EPS} {100 * d['pgd']:.2f} %. "
        f"Settings: {json.dumps(result['settings'])}. Machine: "
        f"{json.dumps(result['machine'])}",
        "",
        "| removed | method | acc % | retention % | goal % | FGSM % | PGD % "
        "| params | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        goal = r["published_retention"]
        mark = "" if goal is None else (" ✓" if r["retention"] >= goal else " ✗")
        lines.append(
            f"| {100 * r['removed']:.0f} % | {r['method']} | "
            f"{100 * r['accuracy']:.2f} | {r['retention']:.1f}{mark} | "
            f"{goal if goal is not None else '-'} | {100 * r['fgsm']:.2f} | "
            f"{100 * r['pgd']:.2f} | {r['params']:,} | {r['seconds']} |"
        )
    lines += [
        "",
        "✓/✗: retention meets / misses the published Neuron Merging retention. "
        "merge = cosine Neuron Merging, lstsq = ridge least squares on "
        "inversion probes, distill = KL distillation (T=4) on one set of 1024 "
        "inversion probes (not regenerated, to save CPU time); L1 removes the "
        "same share of every layer (as Neuron Merging); GA rows search with the "
        "merge repair inside the fitness.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--levels", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--limit", type=int, help="evaluate on the first N test images")
    ap.add_argument("--generations", type=int, default=30)
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument("--distill-steps", type=int, default=300)
    args = ap.parse_args()
    levels = [float(v) for v in args.levels.split(",")]
    gens = 3 if args.quick else args.generations
    steps = 10 if args.quick else args.distill_steps
    net = gp.load("lenet300-fmnist")
    # one set of inversion probes for every distillation (regenerating them each
    # epoch, the default, costs minutes per row on a shared 2-core CPU)
    probes = gp.make_probes(net, "inversion", 1024, seed=100)
    distill_opts = {"steps": steps, "probes": probes, "batch_size": 128}
    test = gp.data.fashion_mnist("test")
    if args.limit:
        test = (test.images[: args.limit], test.labels[: args.limit])
    dense = _row("dense", 0.0, net, 1.0, test, 0.0)
    dense_acc = dense["accuracy"]
    result = {
        "model": net.name,
        "dense": dense,
        "settings": {
            "generations": gens,
            "population": args.population,
            "distill": {"steps": steps, "batch_size": 128, "probes": "inversion x1024"},
            "eps": EPS,
            "test_samples": args.limit or "all",
        },
        "machine": machine(),
        "rows": [],
    }

    def add(name, level, model, t0):
        seconds = time.perf_counter() - t0
        result["rows"].append(_row(name, level, model, dense_acc, test, seconds))
        print(json.dumps(result["rows"][-1]), flush=True)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "recovery.json").write_text(json.dumps(result, indent=1))
        (RESULTS / "recovery.md").write_text(_markdown(result))

    for level in levels:
        t0 = time.perf_counter()
        l1 = gp.prune(net, strategy="l1", target=level, per_group=True, progress=False)
        masks = l1.masks
        add("L1", level, l1.pruned, t0)
        t0 = time.perf_counter()
        merged = gp.compact(gp.recover.merge(net, masks), masks)
        add("L1 + merge", level, merged, t0)
        t0 = time.perf_counter()
        lstsq = gp.compact(gp.recover.merge(net, masks, method="lstsq"), masks)
        add("L1 + lstsq", level, lstsq, t0)
        t0 = time.perf_counter()
        student = gp.recover.distill(merged, net, masks=masks, **distill_opts)
        add("L1 + merge + distill", level, student, t0)
        t0 = time.perf_counter()
        ga = gp.prune(
            net,
            target=level,
            generations=gens,
            population=args.population,
            repair="merge",
            progress=False,
        )
        add("GA(repair=merge) + merge", level, ga.pruned, t0)
        t0 = time.perf_counter()
        student = gp.recover.distill(ga.pruned, net, masks=ga.masks, **distill_opts)
        add("GA(repair=merge) + merge + distill", level, student, t0)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
