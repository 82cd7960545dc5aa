"""How well each data-free fitness ranks sub-networks WITHIN ONE BUDGET (issue 27).

A search only ever compares candidates of the same budget, so what matters is the
ranking of masks that all remove the same share of units (or FLOPs). For each case
(model x budget kind x target) and each seed of masks this script draws

* ``random`` masks: random genomes decoded at exactly the budget
  (``UnitEncoding(space, Budget(kind, target))``, the decoder the search uses);
* ``frontier`` masks: the population of the engine GA (``strategy="ga"``,
  L1-seeded start, the default data-free fitness, population = the number of
  masks) half-way through a short search, i.e. after ``--search-generations / 2``
  generations: where a search makes its choices. Duplicate masks in that
  population are dropped (their count is recorded),

and measures every mask on real data (this benchmark only; nothing in
``gapruning/`` reads a dataset while pruning):

* test accuracy of the masked model on the first ``--test`` Fashion-MNIST test
  images (``gp.masked_apply``, which equals the compacted model's outputs);
* the **oracle**: top-1 disagreement with the dense model on the first
  ``--oracle`` Fashion-MNIST *training* images (not data-free: the reference a
  data-free fitness should approach);

and scores it with every registered metric alone (``compose(net, {name: 1.0})``
on the default probes of the model, ``probes="auto"``), the default composite
(``compose(net, "default")``), and the default composite on each probe kind of
``gapruning.probes.PROBE_KINDS``. A metric that cannot be built for a model
(e.g. ``bn_drift`` without BatchNorm) is recorded with its error message.

The summary is the Spearman correlation of each score with test accuracy over the
masks of one case x seed x mask kind (lower fitness should mean higher accuracy:
-1 is perfect), then its mean and standard deviation over seeds. Probes and the
search use the seed of the masks. The default composite was chosen on masks of
seeds 0 and 1 (benchmarks/fitness_correlation.py), so the default seeds here are
2, 3, 4 (held out).

Usage:
    python benchmarks/fitness_ranking.py                       # all four cases
    python benchmarks/fitness_ranking.py --models lenet300-fmnist,lenet5-fmnist
    python benchmarks/fitness_ranking.py --quick               # seconds, lenet300

Writes benchmarks/results/fitness_ranking.{json,md,png} (``--out`` changes the
stem; ``--quick`` writes ``fitness_ranking_quick.*``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, machine  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning import search  # noqa: E402
from gapruning.config import PruneConfig  # noqa: E402
from gapruning.encoding import Budget, UnitEncoding, kept_fraction_fn  # noqa: E402
from gapruning.files import replaced_atomically, write_text_atomic  # noqa: E402
from gapruning.fitness.compose import (  # noqa: E402
    DEFAULT_PROBES_BN,
    DEFAULT_PROBES_NO_BN,
)
from gapruning.methods import MethodContext  # noqa: E402
from gapruning.methods.engine_search import make_search  # noqa: E402
from gapruning.probes import PROBE_KINDS  # noqa: E402

# model -> (budget kind, fraction removed)
CASES = {
    "lenet300-fmnist": ("units", 0.7),
    "lenet5-fmnist": ("units", 0.5),
    "resnet20-fmnist": ("flops", 0.5),
    "vgg11-fmnist": ("flops", 0.5),
}
MASK_KINDS = ("random", "frontier")
ORACLE = "oracle: top-1 disagreement, real train images"
DEFAULT = "default composite [auto probes]"
QUICK = dict(
    models="lenet300-fmnist",
    masks=16,
    seeds="2",
    num_probes=64,
    search_generations=6,
    test=1000,
    probe_kinds="gaussian",
    metrics="fidelity_top1,fidelity,lipschitz",
)
# individuals measured on real data at once (bounds memory on the convnets)
EVAL_CHUNK = 8


# ------------------------------------------------------------------ the masks


def budget_of(model: str, kind: str | None = None, target: float | None = None):
    d_kind, d_target = CASES.get(model, ("units", 0.5))
    return Budget(kind or d_kind, d_target if target is None else target)


def random_masks(net, budget: Budget, num: int, seed: int) -> dict:
    """``num`` masks of random genomes decoded at exactly ``budget``."""
    enc = UnitEncoding(net.space, budget)
    genomes = jax.random.normal(jax.random.key(seed), (num, enc.num_genes))
    masks = jax.vmap(enc.decode)(genomes)
    return {g: np.asarray(m, bool) for g, m in masks.items()}


def frontier_masks(net, budget: Budget, fitness, num: int, generations: int, seed):
    """The population of the engine GA after ``generations`` generations (what
    ``gp.prune(strategy="ga", init="l1")`` runs), decoded; duplicates dropped.

    Returns ``(masks, info)``; ``info`` has the search's history and timing."""
    space = net.space
    ctx = MethodContext(net, budget, make_fitness=lambda: fitness)
    config = PruneConfig(target=budget.target, budget=budget.kind, population=num)
    setup = make_search(ctx, config)  # what gp.prune(strategy="ga") builds
    found = search.run(
        setup.strategy,
        setup.problem,
        jax.random.PRNGKey(seed),
        generations,
        generations_per_scan=generations,
        center=setup.center,
        noise=setup.noise,
        mesh=setup.mesh,
    )
    population = found.state.strategy_state.population
    decode = setup.problem.decode
    flat = np.asarray(jax.vmap(lambda g: space.flat(decode(g)))(population), bool)
    _, first = np.unique(flat, axis=0, return_index=True)
    keep = np.sort(first)
    masks = {g: m[keep] for g, m in space.unflat(flat).items()}
    info = {
        "generations": generations,
        "population": num,
        "unique_masks": len(keep),
        "best_fitness": found.best_fitness,
        "best_per_generation": [float(v) for v in found.history["best"]],
        "mean_per_generation": [float(v) for v in found.history["mean"]],
        "seconds": round(found.seconds, 2),
    }
    return masks, info


def concat(parts: list[dict]) -> dict:
    return {g: np.concatenate([p[g] for p in parts]) for g in parts[0]}


def pad(masks: dict, multiple: int) -> tuple[dict, int]:
    """Masks repeated up to a multiple of ``multiple`` (keeps fitness chunking
    efficient whatever the count); returns the padded masks and the count."""
    n = len(next(iter(masks.values())))
    extra = -n % multiple
    idx = np.concatenate([np.arange(n), np.zeros(extra, int)])
    return {g: m[idx] for g, m in masks.items()}, n


def hex_masks(net, masks: dict) -> list[str]:
    flat = np.concatenate(
        [np.asarray(masks[g], bool) for g in net.space.group_names], 1
    )
    return [np.packbits(row).tobytes().hex() for row in flat]


# -------------------------------------------------------------- ground truth


def ground_truth(net, masks: dict, x_test, y_test, x_oracle) -> tuple:
    """Test accuracy and the oracle (top-1 disagreement with the dense model on
    ``x_oracle``) of every mask, masks evaluated ``EVAL_CHUNK`` at a time."""
    dense = gp.masked_apply(
        net,
        {
            g: jnp.ones(s)
            for g, s in zip(net.space.group_names, net.space.sizes, strict=True)
        },
        net.normalize(x_oracle),
    ).argmax(-1)

    @jax.jit
    def stats(m, x, y, xo, dense):
        def one(mm):
            acc = (gp.masked_apply(net, mm, x).argmax(-1) == y).sum()
            dis = (gp.masked_apply(net, mm, xo).argmax(-1) != dense).mean()
            return acc, dis

        return jax.lax.map(one, m)

    n = len(next(iter(masks.values())))
    padded, _ = pad(masks, EVAL_CHUNK)
    xt, xo = net.normalize(x_test), net.normalize(x_oracle)
    acc, dis = [], []
    for i in range(0, len(next(iter(padded.values()))), EVAL_CHUNK):
        part = {
            g: jnp.asarray(m[i : i + EVAL_CHUNK], jnp.float32)
            for g, m in padded.items()
        }
        a, d = stats(part, xt, y_test, xo, dense)
        acc.append(np.asarray(a))
        dis.append(np.asarray(d))
    acc = np.concatenate(acc)[:n] / len(y_test)
    dis = np.concatenate(dis)[:n]
    return acc.astype(float), dis.astype(float)


# ------------------------------------------------------------------- scores


def fitness_specs(net, metrics, probe_kinds) -> dict:
    """label -> keyword arguments of ``gp.fitness.compose`` for every row."""
    specs = {DEFAULT: dict(spec="default", probes="auto")}
    for kind in probe_kinds:
        specs[f"default composite [{kind}]"] = dict(spec="default", probes=kind)
    for name in metrics:
        specs[f"{name} [auto probes]"] = dict(spec={name: 1.0}, probes="auto")
    return specs


def auto_kind(net) -> str:
    """The probe kind ``probes="auto"`` makes for ``net``."""
    if gp.probes.batchnorm_nodes(net):
        return DEFAULT_PROBES_BN
    return DEFAULT_PROBES_NO_BN


def score(net, kwargs, masks, num_probes, seed, fit=None):
    """Scores of ``masks`` (a padded batch) by ``fit``, or by the fitness that
    ``kwargs`` composes; ``(values, description, seconds)``, values ``None`` and
    the error message as description when it cannot be built."""
    t = time.perf_counter()
    try:
        if fit is None:
            fit = gp.fitness.compose(net, num_probes=num_probes, seed=seed, **kwargs)
        values = np.asarray(fit({g: jnp.asarray(m) for g, m in masks.items()}))
    except (gp.fitness.FitnessError, gp.probes.ProbeError, ValueError) as err:
        return None, f"{type(err).__name__}: {err}", time.perf_counter() - t
    return values.astype(float), fit.describe(), time.perf_counter() - t


# ---------------------------------------------------------------- statistics


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties); NaN if constant."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    try:
        from scipy.stats import spearmanr

        return float(spearmanr(a, b).statistic)
    except ImportError:  # rank with numpy

        def ranks(v):
            order = np.argsort(v, kind="mergesort")
            r = np.empty(len(v))
            r[order] = np.arange(len(v))
            for val in np.unique(v):
                idx = v == val
                r[idx] = r[idx].mean()
            return r

        return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def summarize(rows: list[dict], labels: list[str]) -> dict:
    """case -> label -> mask kind -> {mean, std, per_seed} of the Spearman with
    test accuracy over the masks of each seed."""
    out: dict = {}
    for case in dict.fromkeys(r["case"] for r in rows):
        out[case] = {}
        for label in labels:
            out[case][label] = {}
            for kind in MASK_KINDS:
                per_seed = {}
                for seed in sorted({r["seed"] for r in rows if r["case"] == case}):
                    sel = [
                        r
                        for r in rows
                        if r["case"] == case and r["seed"] == seed and r["kind"] == kind
                    ]
                    vals = [r["scores"].get(label) for r in sel]
                    if not sel or any(v is None for v in vals):
                        continue
                    per_seed[seed] = spearman(vals, [r["accuracy"] for r in sel])
                v = np.array([x for x in per_seed.values() if np.isfinite(x)])
                out[case][label][kind] = {
                    "mean": float(v.mean()) if len(v) else None,
                    "std": float(v.std()) if len(v) else None,
                    "per_seed": per_seed,
                }
    return out


# -------------------------------------------------------------------- the run


def run_case(model, budget, args, data, log=print) -> tuple[list, dict]:
    net = gp.load(model)
    x_test, y_test, x_oracle = data
    metrics = args.metrics or list(gp.fitness.METRICS)
    specs = fitness_specs(net, metrics, args.probe_kinds)
    rows, info = [], {"seeds": {}, "errors": {}, "specs": {}, "seconds": {}}
    t_case = time.perf_counter()
    dense_acc = float(
        (
            gp.masked_apply(
                net,
                {
                    g: jnp.ones(s)
                    for g, s in zip(net.space.group_names, net.space.sizes, strict=True)
                },
                net.normalize(x_test),
            ).argmax(-1)
            == y_test
        ).mean()
    )
    info["dense_accuracy"] = dense_acc
    case = f"{model} {budget.kind} {budget.target:g}"
    for seed in args.seeds:
        t0 = time.perf_counter()
        default = gp.fitness.compose(
            net, "default", num_probes=args.num_probes, seed=seed
        )
        rnd = random_masks(net, budget, args.masks, seed)
        front, search_info = frontier_masks(
            net, budget, default, args.masks, args.search_generations // 2, seed
        )
        kinds = ["random"] * args.masks + ["frontier"] * search_info["unique_masks"]
        masks = concat([rnd, front])
        acc, oracle = ground_truth(net, masks, x_test, y_test, x_oracle)
        t_truth = time.perf_counter() - t0
        padded, n = pad(masks, 16)
        scores = {ORACLE: oracle}
        timing = {"masks_search_and_ground_truth": round(t_truth, 2)}
        for label, kwargs in specs.items():
            # the search's own fitness is the default row (built once), and the
            # row of the default's own probe kind
            own = kwargs["probes"] in ("auto", auto_kind(net))
            fit = default if kwargs["spec"] == "default" and own else None
            values, desc, secs = score(
                net, kwargs, padded, args.num_probes, seed, fit=fit
            )
            timing[label] = round(secs, 2)
            if values is None:
                info["errors"][label] = desc
                log(f"  {label:45s} n/a: {desc[:90]}")
                continue
            info["specs"][label] = desc
            scores[label] = values[:n]
            sel = np.array(kinds) == "random"
            log(
                f"  {label:45s} random {spearman(values[:n][sel], acc[sel]):+.3f}  "
                f"frontier {spearman(values[:n][~sel], acc[~sel]):+.3f}  ({secs:.1f} s)"
            )
        codes = hex_masks(net, masks)
        kept = np.asarray(
            jax.vmap(kept_fraction_fn(net.space, budget))(
                {g: jnp.asarray(m, jnp.float32) for g, m in masks.items()}
            )
        )
        for i in range(n):
            rows.append(
                {
                    "case": case,
                    "model": model,
                    "budget": budget.kind,
                    "target": budget.target,
                    "seed": seed,
                    "kind": kinds[i],
                    "accuracy": float(acc[i]),
                    "kept_fraction": float(kept[i]),
                    "mask_hex": codes[i],
                    "scores": {k: float(v[i]) for k, v in scores.items()},
                }
            )
        sel = np.array(kinds) == "random"
        info["seeds"][seed] = {
            "search": search_info,
            "accuracy": {
                k: [
                    float(acc[m].mean()),
                    float(acc[m].std()),
                    float(acc[m].min()),
                    float(acc[m].max()),
                ]
                for k, m in (("random", sel), ("frontier", ~sel))
            },
            "seconds": round(time.perf_counter() - t0, 1),
            "timings": timing,
        }
        log(
            f"{case} seed {seed}: oracle random {spearman(oracle[sel], acc[sel]):+.3f}"
            f" frontier {spearman(oracle[~sel], acc[~sel]):+.3f}; accuracy random "
            f"{acc[sel].mean():.3f}, frontier {acc[~sel].mean():.3f} "
            f"({search_info['unique_masks']} unique); {time.perf_counter() - t0:.0f} s"
        )
    info["seconds"] = round(time.perf_counter() - t_case, 1)
    info["labels"] = [ORACLE, *specs]
    return rows, info


def load_data(num_test: int, num_oracle: int):
    test = gp.data.fashion_mnist("test")
    train = gp.data.fashion_mnist("train")
    return (
        jnp.asarray(test.images[:num_test]),
        jnp.asarray(test.labels[:num_test]),
        jnp.asarray(train.images[:num_oracle]),
    )


def run(args, log=print) -> dict:
    """The whole benchmark for ``args`` (see :func:`parse`); the report dict."""
    t0 = time.perf_counter()
    info = machine()
    data = load_data(args.test, args.oracle)
    rows, cases = [], {}
    for model in args.models:
        budget = budget_of(model, args.budget, args.target)
        log(f"== {model}, {budget.target:.0%} of {budget.kind} removed")
        r, case_info = run_case(model, budget, args, data, log)
        case_info["config"] = config(args)
        rows += r
        cases[r[0]["case"]] = case_info
    labels = list(dict.fromkeys(lab for c in cases.values() for lab in c["labels"]))
    info["load_average_at_end"] = os.getloadavg()[0]
    return {
        "machine": info,
        "config": config(args),
        "cases": cases,
        "summary": summarize(rows, labels),
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def config(args) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("out", "merge")}


def merge(old: dict, new: dict) -> dict:
    """``new`` with the cases of ``old`` it did not rerun (their rows, timings
    and machine notes kept); the summary recomputed over all rows."""
    cases = {k: v for k, v in old["cases"].items() if k not in new["cases"]}
    cases.update(new["cases"])
    rows = [r for r in old["rows"] if r["case"] not in new["cases"]] + new["rows"]
    labels = list(dict.fromkeys(lab for c in cases.values() for lab in c["labels"]))
    runs = old.get(
        "runs",
        [
            {
                "machine": old["machine"],
                "seconds": old["seconds"],
                "cases": list(old["cases"]),
            }
        ],
    )
    runs.append(
        {
            "machine": new["machine"],
            "seconds": new["seconds"],
            "cases": list(new["cases"]),
        }
    )
    return dict(
        new,
        cases=cases,
        summary=summarize(rows, labels),
        rows=rows,
        runs=runs,
        seconds=round(sum(r["seconds"] for r in runs), 1),
    )


# ------------------------------------------------------------------ outputs


def fmt(cell) -> str:
    if cell is None or cell.get("mean") is None:
        return "n/a"
    n = len(cell["per_seed"])
    if n == 1:
        return f"{cell['mean']:+.3f}"
    return f"{cell['mean']:+.3f} ± {cell['std']:.3f}"


def markdown(report) -> str:
    runs = report.get("runs") or [
        {"machine": report["machine"], "seconds": report["seconds"]}
    ]
    when = "; ".join(
        f"{r['machine']['date']}, {r['machine']['cores']} cores, jax "
        f"{r['machine']['jax']} on {r['machine']['devices'][0]}, load average "
        f"{r['machine']['load_average_at_start']:.2f} at start and "
        f"{r['machine'].get('load_average_at_end', float('nan')):.2f} at end, "
        f"{r['seconds']:.0f} s"
        + (f" ({', '.join(r['cases'])})" if "cases" in r else "")
        for r in runs
    )
    lines = [
        "# Within-budget ranking: Spearman of each fitness with test accuracy",
        "",
        f"Generated by `benchmarks/fitness_ranking.py`: {when}.",
        "",
        "Per case and seed of masks (the default composite was chosen on masks of "
        "seeds 0 and 1, so seeds from 2 on are held out): N **random** masks "
        "decoded at exactly the budget, and the **frontier** masks: the population "
        "of the L1-seeded engine GA (population N, the default data-free fitness) "
        "half-way through a short search, duplicates dropped. Ground truth: "
        "accuracy on the first Fashion-MNIST test images. The **oracle** row is "
        "top-1 disagreement with the dense model on the first Fashion-MNIST "
        "**training** images (real data, not data-free: the reference). Probes "
        "and search use the seed of the masks; metric rows are each metric alone "
        "on the model's default probes (`probes='auto'`: inversion without "
        "BatchNorm, bn_stats with it). Cells: Spearman with test accuracy within "
        "one budget, mean ± std over seeds (lower fitness = better, so -1 is "
        "perfect; the issue's goal for the default composite is <= -0.9). Seconds: "
        "building (probes, calibration, compile) and scoring one seed's masks; "
        "the default composite is built once per seed for the search, so its "
        "seconds are scoring only.",
        "",
    ]
    lines += [
        "## Summary: the default composite against the oracle",
        "",
        "Each case's default composite is the one of the run that measured it "
        "(its terms are listed in the case's section).",
        "",
        "| case | oracle, random | oracle, frontier | default, random "
        "| default, frontier |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for case, table in report["summary"].items():
        cells = [table[k][kind] for k in (ORACLE, DEFAULT) for kind in MASK_KINDS]
        lines.append(f"| {case} | " + " | ".join(fmt(c) for c in cells) + " |")
    lines.append("")
    for case, table in report["summary"].items():
        ci = report["cases"][case]
        cfg = ci.get("config", report["config"])
        acc = {
            k: np.mean([s["accuracy"][k][0] for s in ci["seeds"].values()])
            for k in MASK_KINDS
        }
        uniq = [s["search"]["unique_masks"] for s in ci["seeds"].values()]
        lines += [
            f"## {case}",
            "",
            f"Seeds {', '.join(map(str, cfg['seeds']))}; {cfg['masks']} random "
            f"masks per seed; frontier: GA population after "
            f"{cfg['search_generations'] // 2} of {cfg['search_generations']} "
            f"generations ({'/'.join(map(str, uniq))} unique masks per seed); "
            f"{cfg['num_probes']} probes; {cfg['test']} test images, oracle on "
            f"{cfg['oracle']} training images. Dense test accuracy "
            f"{ci['dense_accuracy']:.4f}; mean accuracy of the random masks "
            f"{acc['random']:.4f}, of the frontier masks {acc['frontier']:.4f}; "
            f"{ci['seconds']:.0f} s.",
            "",
        ]
        terms = ci["specs"].get(DEFAULT, {}).get("terms", [])
        if terms:
            lines += [
                "Default composite of this run: "
                + ", ".join(f"{t['label']} ({t['weight']:g})" for t in terms)
                + ".",
                "",
            ]
        skipped = [k for k in table if k not in ci["labels"]]
        if skipped:
            lines += [
                "Not run for this case (left out with `--metrics`/`--probe-kinds` "
                "to save time): " + ", ".join(skipped) + ".",
                "",
            ]
        lines += [
            "| score | random | frontier | seconds per seed |",
            "| --- | ---: | ---: | ---: |",
        ]
        for label, cells in table.items():
            if label in ci["errors"]:
                lines.append(f"| {label} | n/a: {ci['errors'][label][:80]} | | |")
                continue
            if label not in ci["labels"]:
                continue
            secs = [s["timings"].get(label) for s in ci["seeds"].values()]
            secs = [s for s in secs if s is not None]
            t = f"{np.mean(secs):.1f}" if secs else ""
            name = f"**{label}**" if label in (ORACLE, DEFAULT) else label
            lines.append(
                f"| {name} | {fmt(cells.get('random'))} | "
                f"{fmt(cells.get('frontier'))} | {t} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(report, path: Path) -> None:
    """A bar chart per case: Spearman (mean ± std over seeds) of every score, for
    random and frontier masks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(report["summary"])
    fig, axes = plt.subplots(
        len(cases), 1, figsize=(11, 4.2 * len(cases)), squeeze=False
    )
    for ax, case in zip(axes[:, 0], cases, strict=True):
        table = {
            k: v
            for k, v in report["summary"][case].items()
            if k not in report["cases"][case]["errors"]
        }
        labels = list(table)
        x = np.arange(len(labels))
        for j, kind in enumerate(MASK_KINDS):
            mean = [table[k][kind]["mean"] or np.nan for k in labels]
            std = [table[k][kind]["std"] or 0.0 for k in labels]
            ax.bar(x + (j - 0.5) * 0.4, mean, 0.4, yerr=std, label=kind, capsize=2)
        ax.axhline(-0.9, color="k", lw=0.8, ls="--")
        ax.set_xticks(x)
        ax.set_xticklabels(
            [
                lab.replace(" [auto probes]", "").replace(", real train images", "")
                for lab in labels
            ],
            rotation=35,
            ha="right",
            fontsize=8,
        )
        ax.set_ylim(-1.05, 1.05)
        ax.set_ylabel("Spearman with test accuracy")
        ax.set_title(case)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def write_report(report, stem: Path) -> None:
    write_text_atomic(stem.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    write_text_atomic(stem.with_suffix(".md"), markdown(report))
    plot(report, stem.with_suffix(".png"))


# ---------------------------------------------------------------------- CLI


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seconds: lenet300, tiny N")
    ap.add_argument("--models", default=",".join(CASES), help="comma-separated")
    ap.add_argument(
        "--budget",
        choices=("units", "params", "flops"),
        default=None,
        help="budget kind (default: per model, see CASES)",
    )
    ap.add_argument(
        "--target",
        type=float,
        default=None,
        help="fraction removed (default: per model)",
    )
    ap.add_argument("--masks", type=int, default=48, help="masks per kind and seed")
    ap.add_argument("--seeds", default="2,3,4")
    ap.add_argument("--num-probes", type=int, default=512)
    ap.add_argument(
        "--search-generations",
        type=int,
        default=40,
        help="frontier masks: the GA population after half of these",
    )
    ap.add_argument("--test", type=int, default=3000, help="first N test images")
    ap.add_argument("--oracle", type=int, default=512, help="first N train images")
    ap.add_argument(
        "--probe-kinds",
        default=",".join(PROBE_KINDS),
        help="probe kinds for the default composite rows",
    )
    ap.add_argument(
        "--metrics",
        default=None,
        help="comma-separated metric names (default: every registered)",
    )
    ap.add_argument("--out", default=None, help="output stem (no suffix)")
    ap.add_argument(
        "--merge",
        action="store_true",
        help="keep the cases of an existing output that this run does not redo",
    )
    ap.add_argument(
        "--render-only",
        action="store_true",
        help="only rewrite the .md and .png of --out from its .json",
    )
    args = ap.parse_args(argv)
    if args.quick:
        defaults = ap.parse_args([])
        for k, v in QUICK.items():  # quick values, unless given explicitly
            if getattr(args, k) == getattr(defaults, k):
                setattr(args, k, v)
    args.models = [m for m in args.models.split(",") if m]
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s]
    args.probe_kinds = [k for k in args.probe_kinds.split(",") if k]
    if args.metrics:
        args.metrics = [k for k in args.metrics.split(",") if k]
    if args.out is None:
        args.out = str(RESULTS / ("fitness_ranking" + ("_quick" if args.quick else "")))
    return args


def main(argv=None):
    args = parse(argv)
    if args.render_only:  # rewrite .md and .png from the .json
        report = json.loads(Path(args.out).with_suffix(".json").read_text())
        write_report(report, Path(args.out))
        print(markdown(report))
        return
    report = run(args)
    stem = Path(args.out)
    if args.merge and stem.with_suffix(".json").exists():
        report = merge(json.loads(stem.with_suffix(".json").read_text()), report)
    write_report(report, Path(args.out))
    print(markdown(report))
    print(f"wrote {args.out}.json/.md/.png in {report['seconds']} s")


if __name__ == "__main__":
    main()
