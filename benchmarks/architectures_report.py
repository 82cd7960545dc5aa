"""The report of benchmarks/architectures.py: pass counts per stage, one table
row per torchvision builder, the first error line of every failure."""

from __future__ import annotations

import json
from pathlib import Path

from gapruning.files import write_text_atomic

STAGES = (
    *("convert", "parity", "prune", "compact", "export_torch", "export_onnx"),
    *("onnx_legacy", "onnx_dynamo"),
)


LABELS = dict(zip(STAGES, ("convert", "parity", "prune", "compact"), strict=False))
LABELS |= {"export_torch": "export torch", "export_onnx": "export ONNX"}
LABELS |= {"onnx_legacy": "ONNX in (legacy)", "onnx_dynamo": "ONNX in (dynamo)"}


def counts(report: dict) -> dict:
    """stage -> {"ok": n, "failed": n, "skipped": n} over the rows that ran."""
    out = {s: {"ok": 0, "failed": 0, "skipped": 0} for s in STAGES}
    for row in report["rows"]:
        if row.get("status") != "ran":
            continue
        for s in STAGES:
            status = row["stages"].get(s, {}).get("status", "skipped")
            out[s][status if status in out[s] else "failed"] += 1
    return out


def cell(entry: dict, notes: list[str], model: str, stage: str) -> str:
    status = entry.get("status", "skipped")
    if status == "ok":
        return f"ok {entry['s']:.1f} s"
    if status == "skipped":
        return "–"
    notes.append(f"{model} / {LABELS[stage]}: {entry.get('error', '?')}")
    return f"✗ [{len(notes)}]"


def markdown(report: dict, planned=()) -> str:
    """The Markdown page; builders of ``planned`` without a row are listed as
    not run (a sweep stopped part-way)."""
    rows, m = report["rows"], report["machine"]
    ran = [r for r in rows if r.get("status") == "ran"]
    lines = [
        "# torchvision architectures: convert, prune, compact, export",
        "",
        f"`{report['command']}`, {m['date']}: torch {m['torch']}, torchvision "
        f"{m['torchvision']}, jax {m['jax']}, {m['cores']} CPU cores "
        f"(devices {', '.join(m['devices'])}); {len(rows)} builders, "
        f"{len(ran)} run, {report.get('total_s', 0):.0f} s in all. Random weights "
        "(BatchNorm statistics too), 10 classes, batch of 4; parity and equal "
        f"outputs mean relative logit error <= {report['settings']['tolerance']:g}. "
        "Stages are described in `benchmarks/architectures.py`; – is a stage "
        "skipped because one it needs failed or its worker was stopped (timeout). "
        f"Load average at the start: {m.get('load_average_at_start') or 0:.1f} "
        "(a shared machine: times and timeouts depend on it).",
        "",
    ]
    if report.get("note"):  # written by hand about a sweep's circumstances
        lines += [f"Note: {report['note']}", ""]
    if report["settings"].get("quick"):
        lines += ["Quick mode: two small builders.", ""]
    c = counts(report)
    lines += [
        "| stage | ok | failed | skipped |",
        "|---|---|---|---|",
        *(
            f"| {LABELS[s]} | {c[s]['ok']} | {c[s]['failed']} | {c[s]['skipped']} |"
            for s in STAGES
        ),
        "",
        "| model | input | params | " + " | ".join(LABELS[s] for s in STAGES) + " |",
        "|---|---|---|" + "---|" * len(STAGES),
    ]
    notes: list[str] = []
    for row in rows:
        if row.get("status") != "ran":
            lines.append(
                f"| {row['model']} | | | {row.get('status')}: {row.get('reason')} |"
                + " |" * (len(STAGES) - 1)
            )
            continue
        size = f"{row['input']}x{row['input']}" + ("*" if row["input_note"] else "")
        cells = [cell(row["stages"].get(s, {}), notes, row["model"], s) for s in STAGES]
        lines.append(
            f"| {row['model']} | {size} | {row['params_torch'] / 1e6:.1f}M | "
            + " | ".join(cells)
            + " |"
        )
    smaller = [r for r in ran if r["input_note"]]
    if smaller:
        lines += ["", "\\* input size: the smallest that the torch model accepts:", ""]
        lines += [f"- {r['model']}: {r['input_note']}" for r in smaller]
    missing = sorted(set(planned) - {r["model"] for r in rows})
    if missing:
        lines += ["", f"Not run (the sweep was stopped): {', '.join(missing)}."]
    if notes:
        lines += ["", "First error line of each failure:", ""]
        lines += [f"{i}. {n}" for i, n in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path, planned=()) -> None:
    """``out``.json and ``out``.md, each replaced whole."""
    write_text_atomic(out.with_suffix(".json"), json.dumps(report, indent=1) + "\n")
    write_text_atomic(out.with_suffix(".md"), markdown(report, planned))
