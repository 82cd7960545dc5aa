"""Search quality: does the GA find better sub-networks than random search and L1?

By default lenet300-fmnist, 70% of hidden units removed; ``--model``, ``--budget``
and ``--target`` choose another case. The default data-free fitness, the same number
of fitness evaluations for every search (generations x population). Each row records
the best data-free fitness the search reached next to the test accuracy and FGSM
robust accuracy (eps 0.05) on the real Fashion-MNIST test set, so a search that wins
on fitness but loses on accuracy shows up as a fitness/accuracy mismatch. Nothing is
fine-tuned; the test set is only used for this table.

Run: ``python benchmarks/search_quality.py [--quick]``, or e.g.
``python benchmarks/search_quality.py --model vgg11-fmnist --budget flops
--target 0.5 --generations 20 --population 32 --num-probes 256`` (the settings of
``benchmarks/methods.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning.encoding import Budget, UnitEncoding, l1_unit_scores  # noqa: E402

BUDGET_WORDS = {"units": "hidden units", "params": "parameters", "flops": "FLOPs"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="lenet300-fmnist")
    ap.add_argument("--budget", default="units", choices=("units", "params", "flops"))
    ap.add_argument("--target", type=float, default=0.7)
    ap.add_argument("--generations", type=int, default=100)
    ap.add_argument("--population", type=int, default=64)
    ap.add_argument("--num-probes", type=int, default=512)
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    generations, population = (
        (10, 16) if args.quick else (args.generations, args.population)
    )
    seeds = [int(s) for s in args.seeds.split(",")][: 1 if args.quick else None]
    target, budget = args.target, args.budget
    # the one-shot baseline removes the same share from every layer under the
    # units budget, and follows the global budget otherwise (as benchmarks/methods)
    per_group = budget == "units"
    l1_label = f"L1 one-shot ({'per layer' if per_group else 'global budget'})"
    net = gp.load(args.model)
    test = gp.data.fashion_mnist("test")
    methods = {
        "ga (L1-seeded)": {"strategy": "ga", "init": "l1"},
        "ga (random start)": {"strategy": "ga", "init": None},
        "random search": {"strategy": "random", "init": None},
    }
    rows = []
    for seed in seeds:
        fitness = gp.fitness.compose(
            net, "default", num_probes=args.num_probes, seed=seed
        )
        for label, kw in methods.items():
            t0 = time.perf_counter()
            r = gp.prune(
                net,
                target=target,
                budget=budget,
                fitness=fitness,
                generations=generations,
                population=population,
                seed=seed,
                progress=False,
                recover=(),  # the searches' masks as found
                **kw,
            )
            m = gp.evaluate(r.pruned, test, attacks=("fgsm",), eps=(0.05,))
            rows.append(
                {
                    "method": label,
                    "seed": seed,
                    "fitness": float(r.search.best_fitness),
                    "accuracy": m["accuracy"],
                    "fgsm_0.05": m["fgsm"][0.05],
                    "seconds": time.perf_counter() - t0,
                    "evaluations": r.search.evaluations,
                }
            )
            print(rows[-1], flush=True)
        enc = UnitEncoding(net.space, Budget(budget, target, per_group=per_group))
        masks = enc.decode(jnp.asarray(l1_unit_scores(net.model, net.space)))
        f = float(fitness({k: v[None] for k, v in masks.items()})[0])
        m = gp.evaluate(gp.compact(net, masks), test, attacks=("fgsm",), eps=(0.05,))
        rows.append(
            {
                "method": l1_label,
                "seed": seed,
                "fitness": f,
                "accuracy": m["accuracy"],
                "fgsm_0.05": m["fgsm"][0.05],
                "seconds": 0.0,
                "evaluations": 0,
            }
        )
    dense = gp.evaluate(net, test, attacks=("fgsm",), eps=(0.05,))
    summary = {}
    for label in [*methods, l1_label]:
        sel = [r for r in rows if r["method"] == label]
        summary[label] = {
            k: statistics.mean(r[k] for r in sel)
            for k in ("fitness", "accuracy", "fgsm_0.05")
        }
        summary[label]["accuracy_min_max"] = [
            min(r["accuracy"] for r in sel),
            max(r["accuracy"] for r in sel),
        ]
    info = machine()
    lines = [
        f"# Search quality: {args.model}, {target:.0%} of {BUDGET_WORDS[budget]} "
        "removed",
        "",
        f"{info['date']}; default data-free fitness ({fitness!r}), "
        f"{generations} generations x {population} individuals per search, "
        f"{len(seeds)} seed(s), no fine-tuning. Dense model: accuracy "
        f"{dense['accuracy']:.4f}, FGSM(0.05) {dense['fgsm'][0.05]:.4f}.",
        "",
        "| method | data-free fitness | test accuracy (mean) | min-max | FGSM 0.05 |",
        "| --- | ---: | ---: | --- | ---: |",
    ]
    for label, s in summary.items():
        lo, hi = s["accuracy_min_max"]
        lines.append(
            f"| {label} | {s['fitness']:.4f} | {s['accuracy']:.4f} | "
            f"{lo:.4f}-{hi:.4f} | {s['fgsm_0.05']:.4f} |"
        )
    name = "search_quality"
    if (args.model, budget, target) != ("lenet300-fmnist", "units", 0.7):
        name += f"_{args.model}_{budget}_{round(100 * target)}"
    write(
        name + ("_quick" if args.quick else ""),
        {
            "machine": info,
            "dense": dense,
            "rows": rows,
            "summary": summary,
            "generations": generations,
            "population": population,
            "model": args.model,
            "budget": budget,
            "target": target,
            "num_probes": args.num_probes,
        },
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
