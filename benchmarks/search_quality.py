"""Search quality: does the GA find better sub-networks than random search and L1?

lenet300-fmnist, 70% of hidden units removed, the default data-free fitness, the
same number of fitness evaluations for every search (generations x population).
Test accuracy and FGSM robust accuracy (eps 0.05) on the real Fashion-MNIST test set,
over 3 seeds. Nothing is fine-tuned; the test set is only used for this table.

Run: ``python benchmarks/search_quality.py [--quick]``
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    generations, population = (10, 16) if args.quick else (100, 64)
    seeds = (0,) if args.quick else (0, 1, 2)
    target = 0.7
    net = gp.load("lenet300-fmnist")
    test = gp.data.fashion_mnist("test")
    methods = {
        "ga (L1-seeded)": {"strategy": "ga", "init": "l1"},
        "ga (random start)": {"strategy": "ga", "init": None},
        "random search": {"strategy": "random", "init": None},
    }
    rows = []
    for seed in seeds:
        fitness = gp.fitness.compose(net, "default", num_probes=512, seed=seed)
        for label, kw in methods.items():
            t0 = time.perf_counter()
            r = gp.prune(
                net,
                target=target,
                fitness=fitness,
                generations=generations,
                population=population,
                seed=seed,
                progress=False,
                **kw,
            )
            m = gp.evaluate(r.pruned, test, attacks=("fgsm",), eps=(0.05,))
            rows.append(
                {
                    "method": label,
                    "seed": seed,
                    "fitness": r.search.best_fitness,
                    "accuracy": m["accuracy"],
                    "fgsm_0.05": m["fgsm"][0.05],
                    "seconds": time.perf_counter() - t0,
                    "evaluations": r.search.evaluations,
                }
            )
            print(rows[-1], flush=True)
        # the standard L1 baseline: the same ratio removed from every layer
        enc = UnitEncoding(net.space, Budget("units", target, per_group=True))
        masks = enc.decode(jnp.asarray(l1_unit_scores(net.model, net.space)))
        f = float(fitness({k: v[None] for k, v in masks.items()})[0])
        m = gp.evaluate(gp.compact(net, masks), test, attacks=("fgsm",), eps=(0.05,))
        rows.append(
            {
                "method": "L1 one-shot (per layer)",
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
    for label in [*methods, "L1 one-shot (per layer)"]:
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
        "# Search quality: lenet300-fmnist, 70% of hidden units removed",
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
    write(
        "search_quality" + ("_quick" if args.quick else ""),
        {
            "machine": info,
            "dense": dense,
            "rows": rows,
            "summary": summary,
            "generations": generations,
            "population": population,
        },
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
