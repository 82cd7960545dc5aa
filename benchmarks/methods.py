"""Every pruning method on the same models and budgets.

MLPs (default): lenet300-fmnist and paoding_mlp-fmnist with 50/60/70/80% of the
hidden units removed, the same ratio from every layer (``per_group=True``, as in
the published reference; the profile methods, which choose the per-layer ratios,
get the same total as a global budget), for every method registered in
``gp.methods.METHODS`` (structured ones) plus the engine searches ``ga`` and
``random``; search methods all get the same fitness-evaluation budget
(``generations x population``) and the default data-free fitness. ``--convnets``
adds resnet20-fmnist and vgg11-fmnist at 30/50/70% of FLOPs removed (slow on a
small CPU).

Reported per (model, target, method), mean ± std over seeds: test accuracy
(Fashion-MNIST test set, 10,000 images), FGSM and PGD (10 steps) robust accuracy
at eps 0.05 (on the first ``--attack-samples`` test images), params, FLOPs,
search seconds. Methods that do not depend on the seed (l1, l2_out, synflow,
neuron_merging) run once and are reported with std 0. Nothing is fine-tuned; the
test set is only used for these numbers.

Rows are appended to ``results/methods_rows.json`` as they finish (a rerun skips
finished rows), then ``results/methods.{json,md,png}`` are written.

Run: ``python benchmarks/methods.py [--quick] [--convnets] [--seeds 0,1,2]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine, write  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning.files import write_text_atomic  # noqa: E402
from gapruning.methods import METHODS  # noqa: E402

SEED_FREE = {"l1", "l2_out", "synflow", "neuron_merging"}
SEARCHES = ("ga", "random")
# published reference, LeNet-300-100 on Fashion-MNIST (Kim et al., 2020; dense 89.80%)
REFERENCE = {
    "neuron merging (published)": {0.5: 88.69, 0.6: 86.92, 0.7: 82.75, 0.8: 80.02},
    "L1 only (published)": {0.5: 88.40, 0.6: 85.17, 0.7: 71.26, 0.8: 66.76},
}


def method_names() -> list[str]:
    names = [n for n, m in METHODS.items() if m.structured]
    return [*SEARCHES, *sorted(names)]


def run_one(net, name, target, budget, seed, args, data) -> dict:
    kw = dict(
        target=target,
        budget=budget,
        seed=seed,
        generations=args.generations,
        population=args.population,
        num_probes=args.num_probes,
        progress=False,
        # profile methods choose per-layer ratios: they get the global budget
        per_group=budget == "units"
        and (name not in METHODS or METHODS[name].per_group),
    )
    if name == "paoding":
        kw["strategy_options"] = {"step": args.paoding_step}
    t0 = time.perf_counter()
    r = gp.prune(net, name, recover=(), **kw)  # the methods as they are
    seconds = time.perf_counter() - t0
    test, attack_set = data
    clean = gp.evaluate(r.pruned, test, attacks=(), eps=())
    adv = gp.evaluate(r.pruned, attack_set, attacks=("fgsm", "pgd"), eps=(0.05,))
    space = net.space
    return {
        "model": net.name,
        "method": name,
        "target": target,
        "budget": budget,
        "seed": seed,
        "accuracy": clean["accuracy"],
        "fgsm_0.05": adv["fgsm"][0.05],
        "pgd_0.05": adv["pgd"][0.05],
        "params": int(space.params(r.masks)),
        "flops": int(space.flops(r.masks)),
        "kept_units": int(sum(space.kept(r.masks).values())),
        "seconds": seconds,
        "evaluations": int(getattr(r.search, "evaluations", 0)),
    }


def summarize(rows):
    groups = {}
    for r in rows:
        if "error" in r:
            continue
        groups.setdefault((r["model"], r["method"], r["target"]), []).append(r)
    out = []
    for (model, method, target), sel in sorted(groups.items()):
        row = {"model": model, "method": method, "target": target, "n": len(sel)}
        for k in ("accuracy", "fgsm_0.05", "pgd_0.05", "seconds"):
            vals = [s[k] for s in sel]
            row[k] = statistics.mean(vals)
            row[k + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["params"], row["flops"] = sel[0]["params"], sel[0]["flops"]
        row["evaluations"] = sel[0]["evaluations"]
        out.append(row)
    return out


def plot(summary, dense, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({s["model"] for s in summary})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5))
    axes = np.atleast_1d(axes)
    for ax, model in zip(axes, models, strict=True):
        sel = [s for s in summary if s["model"] == model]
        for method in sorted({s["method"] for s in sel}):
            pts = sorted(
                (s["target"], s["accuracy"], s["accuracy_std"])
                for s in sel
                if s["method"] == method
            )
            x, y, e = (np.array(v) for v in zip(*pts, strict=True))
            ax.errorbar(
                100 * x, 100 * y, yerr=100 * e, marker="o", label=method, capsize=2
            )
        if model.startswith("lenet300"):
            for label, ref in REFERENCE.items():
                xs = sorted(ref)
                ax.plot(
                    [100 * t for t in xs],
                    [ref[t] for t in xs],
                    "k--" if "merging" in label else "k:",
                    label=label,
                )
        if model in dense:
            ax.axhline(
                100 * dense[model]["accuracy"], color="grey", lw=0.8, label="dense"
            )
        ax.set_title(model)
        ax.set_xlabel("% removed (hidden units, or FLOPs for convnets)")
        ax.set_ylabel("test accuracy % (no fine-tuning; gwcs distills)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown(summary, dense, settings, info, errors) -> str:
    lines = [
        "# Methods: accuracy and robustness vs sparsity",
        "",
        f"{info['date']}, {info['cores']} CPU cores, load average "
        f"{info['load_average_at_start']:.1f} at start and "
        f"{settings['load_average_at_end']:.1f} at the end (shared machine: "
        "seconds are indicative). Same ratio removed from every layer; no "
        "fine-tuning except gwcs's own distillation on probes (200 steps, "
        "gp.recover.DistillConfig.for_teacher); search methods: "
        f"{settings['generations']} generations x {settings['population']} "
        f"individuals, default data-free fitness on {settings['num_probes']} "
        f"probes; Paoding: stochastic mode, step {settings['paoding_step']}. "
        "Test accuracy on the 10,000 test images; FGSM/PGD (10 steps) at eps 0.05 "
        f"on the first {settings['attack_samples']} test images. Seeds "
        f"{settings['seeds']} (seed-free methods run once). Models run: "
        f"{', '.join(settings['models'])}.",
        "",
    ]
    for model, d in dense.items():
        lines.append(
            f"Dense {model}: accuracy {100 * d['accuracy']:.2f}, FGSM "
            f"{100 * d['fgsm']:.2f}, PGD {100 * d['pgd']:.2f}, params {d['params']}, "
            f"FLOPs {d['flops']}."
        )
    lines += [
        "",
        "| model | removed | method | runs | test acc % | FGSM 0.05 % | PGD 0.05 % | "
        "params | FLOPs | search s |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def pm(s, k):
        return f"{100 * s[k]:.2f} ± {100 * s[k + '_std']:.2f}"

    for s in summary:
        lines.append(
            f"| {s['model']} | {100 * s['target']:.0f}% | {s['method']} | {s['n']} | "
            f"{pm(s, 'accuracy')} | {pm(s, 'fgsm_0.05')} | {pm(s, 'pgd_0.05')} | "
            f"{s['params']} | {s['flops']} | {s['seconds']:.1f} |"
        )
    lines += [
        "",
        "Published reference, LeNet-300-100 on Fashion-MNIST (Kim et al., 2020, "
        "dense 89.80%), test accuracy at 50/60/70/80% removed:",
        "",
    ]
    for label, ref in REFERENCE.items():
        lines.append(f"- {label}: " + " / ".join(f"{v:.2f}" for v in ref.values()))
    if errors:
        lines += ["", "Runs that failed:", ""]
        lines += [
            f"- {e['model']} {e['method']} {e['target']}: {e['error']}" for e in errors
        ]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--convnets", action="store_true")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--population", type=int, default=32)
    ap.add_argument("--num-probes", type=int, default=256)
    ap.add_argument("--paoding-step", type=float, default=0.03125)
    ap.add_argument("--attack-samples", type=int, default=2000)
    ap.add_argument("--methods", default="", help="comma-separated subset")
    ap.add_argument("--models", default="", help="comma-separated subset")
    ap.add_argument(
        "--report-only", action="store_true", help="write the tables from saved rows"
    )
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    plans = [
        ("lenet300-fmnist", "units", (0.5, 0.6, 0.7, 0.8)),
        ("paoding_mlp-fmnist", "units", (0.5, 0.6, 0.7, 0.8)),
    ]
    if args.convnets:
        plans += [
            ("resnet20-fmnist", "flops", (0.3, 0.5, 0.7)),
            ("vgg11-fmnist", "flops", (0.3, 0.5, 0.7)),
        ]
    if args.quick:
        plans, seeds = [("lenet300-fmnist", "units", (0.5,))], seeds[:1]
    if args.models:
        plans = [p for p in plans if p[0] in args.models.split(",")]
    names = method_names()
    if args.methods:
        names = [n for n in names if n in args.methods.split(",")]
    test = gp.data.fashion_mnist("test")
    attack_set = (
        test.images[: args.attack_samples],
        test.labels[: args.attack_samples],
    )
    suffix = "_quick" if args.quick else ""
    rows_path = RESULTS / f"methods_rows{suffix}.json"
    rows = json.loads(rows_path.read_text()) if rows_path.exists() else []
    done = {(r["model"], r["method"], r["target"], r["seed"]) for r in rows}
    info = machine()
    dense = {}
    for model, budget, targets in plans:
        if args.report_only and not any(r["model"] == model for r in rows):
            continue
        net = gp.load(model)
        clean = gp.evaluate(net, test, attacks=(), eps=())
        adv = gp.evaluate(net, attack_set, attacks=("fgsm", "pgd"), eps=(0.05,))
        dense[model] = {
            "accuracy": clean["accuracy"],
            "fgsm": adv["fgsm"][0.05],
            "pgd": adv["pgd"][0.05],
            "params": net.space.dense_params,
            "flops": net.space.dense_flops,
        }
        for target in targets if not args.report_only else ():
            for name in names:
                for seed in seeds[:1] if name in SEED_FREE else seeds:
                    if (model, name, target, seed) in done:
                        continue
                    try:
                        row = run_one(
                            net, name, target, budget, seed, args, (test, attack_set)
                        )
                    except Exception as err:  # recorded, the table goes on
                        row = {
                            "model": model,
                            "method": name,
                            "target": target,
                            "seed": seed,
                            "error": f"{type(err).__name__}: {err}",
                        }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    write_text_atomic(rows_path, json.dumps(rows, indent=1) + "\n")
    summary = summarize(rows)
    errors = [r for r in rows if "error" in r]
    settings = {
        "generations": args.generations,
        "population": args.population,
        "num_probes": args.num_probes,
        "paoding_step": args.paoding_step,
        "attack_samples": args.attack_samples,
        "seeds": seeds,
        "models": sorted({r["model"] for r in rows if "error" not in r}),
        "methods": names,
        "load_average_at_end": os.getloadavg()[0],
    }
    write(
        "methods" + suffix,
        {
            "machine": info,
            "settings": settings,
            "dense": dense,
            "summary": summary,
            "rows": rows,
        },
        markdown(summary, dense, settings, info, errors),
    )
    plot(summary, dense, RESULTS / f"methods{suffix}.png")


if __name__ == "__main__":
    main()
