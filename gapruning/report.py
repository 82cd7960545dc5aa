"""Run directories a person can read: pruned model, report.json/.md and plots.

Layout of ``write_run(result, out)``::

    out/model/        the compacted model (gp.load(out / "model"))
    out/report.json   PruneResult.report()
    out/report.md     the same, as Markdown
    out/history.json  per-generation fitness (best, mean, best so far, kept)
    out/masks.json    kept unit indices per group of the dense model
    out/fitness.png   best / mean / best-so-far fitness per generation
    out/profile.png   kept units per group against the dense width

Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .files import replaced_atomically, write_text_atomic
from .zoo import save


def _finite(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def plot_fitness(history: dict, path: Path) -> None:
    """Fitness per generation (lower is better)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    curves = (
        ("mean", "population mean", "#9aa", 1),
        ("best", "generation best", "#48c", 1),
        ("best_so_far", "best so far", "#c33", 2),
    )
    drawn = [c for c in curves if len(history.get(c[0], ())) > 0]
    for key, label, color, width in drawn:
        steps = np.arange(1, len(history[key]) + 1)
        ax.plot(steps, history[key], label=label, color=color, lw=width)
    if drawn:
        ax.legend(frameon=False)
    else:
        ax.text(0.5, 0.5, "one-shot method: no search", ha="center", va="center")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (lower is better)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def plot_profile(report: dict, path: Path) -> None:
    """Kept units per group, drawn over the dense width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = report["groups"]
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(groups) + 2), 3.6), dpi=120)
    ax.bar(x, [g["size"] for g in groups], color="#dde", label="dense width")
    ax.bar(x, [g["kept"] for g in groups], color="#48c", label="kept")
    ax.set_xticks(x, [g["group"] for g in groups], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("units")
    ax.legend(frameon=False)
    fig.tight_layout()
    with replaced_atomically(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)


def markdown(report: dict) -> str:
    """The report as Markdown."""
    s = report["settings"]
    lines = [
        f"# Pruning report: {report['model']}",
        "",
        f"Strategy `{s['strategy']}`, remove {s['target']:.0%} of {s['budget']} "
        f"({s['encoding']} encoding), fitness `{s['fitness']}`, "
        f"{s['generations']} generations x {s['population']} individuals, "
        f"seed {s['seed']}.",
        "",
        "| | before | after | kept |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key in ("params", "flops", "units"):
        b, a = report[key]["before"], report[key]["after"]
        lines.append(f"| {key} | {b:,} | {a:,} | {a / b:.1%} |")
    lines += ["", "| group | kind | dense | kept |", "| --- | --- | ---: | ---: |"]
    lines += [
        f"| {g['group']} | {g['kind']} | {g['size']} | {g['kept']} |"
        for g in report["groups"]
    ]
    f, srch = report["fitness"], report["search"]
    best = "none (no fitness used)" if f["best"] is None else f"{f['best']:.6g}"
    lines += [
        "",
        f"Fitness: best {best} (first generation best "
        f"{f.get('first_generation_best')}, last generation mean "
        f"{f.get('last_generation_mean')}).",
        f"Search: {srch['evaluations']:,} evaluations in {srch['seconds']:.1f} s "
        f"({srch['compile_seconds']:.1f} s compiling), "
        f"{srch['evaluations_per_second']:,} evaluations/s on {report['device']}.",
    ]
    if "evaluation" in report:
        lines += ["", "## Evaluation (real test data)", ""]
        lines += _evaluation_table(report["evaluation"])
    return "\n".join(lines) + "\n"


def _evaluation_table(ev: dict) -> list[str]:
    """``gp.evaluate`` metrics as a Markdown table (JSON for anything else)."""
    if not isinstance(ev, dict) or "accuracy" not in ev:
        return ["```", json.dumps(ev, indent=2), "```"]
    rows = [
        "| attack | eps | accuracy | robustness preservation |",
        "| --- | ---: | ---: | ---: |",
        f"| clean | 0 | {float(ev['accuracy']):.4f} | |",
    ]
    preservation = ev.get("robustness_preservation", {})
    for attack, by_eps in ev.items():
        if attack in ("accuracy", "robustness_preservation") or not isinstance(
            by_eps, dict
        ):
            continue
        for eps, acc in by_eps.items():
            rp = preservation.get(attack, {}).get(eps)
            rp = "" if rp is None else f"{float(rp):.4f}"
            rows.append(f"| {attack} | {float(eps):g} | {float(acc):.4f} | {rp} |")
    if "num_samples" in ev:
        rows += ["", f"{ev['num_samples']} test samples."]
    return rows


def write_run(
    result, out: str | Path, *, extra: dict | None = None, overwrite: bool = False
) -> dict:
    """Writes the run directory (see module docstring); returns the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = result.report()
    if extra:
        report.update(extra)
    save(result.pruned, out / "model", overwrite=overwrite)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
    history = {k: [_finite(v) for v in np.ravel(a)] for k, a in result.history.items()}
    masks = {g: np.flatnonzero(m).tolist() for g, m in result.masks.items()}
    write_text_atomic(out / "history.json", json.dumps(history) + "\n")
    write_text_atomic(out / "masks.json", json.dumps(masks) + "\n")
    plot_fitness(result.history, out / "fitness.png")
    plot_profile(report, out / "profile.png")
    return report
