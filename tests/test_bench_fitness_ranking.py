"""The quick mode of benchmarks/fitness_ranking.py (issue 27's evidence script)
keeps working: output structure, recorded failures, and an oracle that ranks."""

import json
import math

import numpy as np
import pytest
from conftest import load_benchmark

fr = load_benchmark("fitness_ranking")


@pytest.fixture(scope="module")
def report():
    # the quick mode, smaller still: 32 probes, the default's own probe kind
    # (inversion: its row reuses the search's fitness), two metrics (one that
    # cannot be built on lenet300: bn_drift needs BatchNorm)
    args = fr.parse(
        [
            "--quick",
            "--num-probes",
            "32",
            "--probe-kinds",
            "inversion",
            "--metrics",
            "fidelity_top1,bn_drift",
        ]
    )
    assert args.models == ["lenet300-fmnist"] and args.seeds == [2]
    assert args.masks == 16
    return fr.run(args, log=lambda *a: None)


def test_structure(report):
    (case,) = report["cases"]
    assert case == "lenet300-fmnist units 0.7"
    info = report["cases"][case]
    assert set(info["seeds"]) == {2}
    labels = [
        fr.ORACLE,
        fr.DEFAULT,
        "default composite [inversion]",
        "fidelity_top1 [auto probes]",
        "bn_drift [auto probes]",
    ]
    assert info["labels"] == labels
    assert "BatchNorm" in info["errors"]["bn_drift [auto probes]"]
    rows = report["rows"]
    kinds = [r["kind"] for r in rows]
    assert kinds.count("random") == 16
    # the GA population: 16 individuals, duplicates dropped
    n_front = info["seeds"][2]["search"]["unique_masks"]
    assert kinds.count("frontier") == n_front and 2 < n_front <= 16
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 1.0
        s = r["scores"]
        assert s["default composite [inversion]"] == s[fr.DEFAULT]
        # every mask meets the budget (70% of units removed, within one unit)
        assert abs(r["kept_fraction"] - 0.3) <= 1 / 400 + 1e-6
        assert set(r["scores"]) == set(labels) - {"bn_drift [auto probes]"}
        assert all(math.isfinite(v) for v in r["scores"].values())
    # frontier masks are distinct
    codes = [r["mask_hex"] for r in rows if r["kind"] == "frontier"]
    assert len(set(codes)) == len(codes)
    summary = report["summary"][case]
    for label in labels:
        if label in info["errors"]:
            continue
        for kind in fr.MASK_KINDS:
            cell = summary[label][kind]
            assert -1.0 <= cell["mean"] <= 1.0 and cell["std"] == 0.0
            assert set(cell["per_seed"]) == {2}
    # the report is JSON (as written) and renders a table per case
    json.dumps(report)
    md = fr.markdown(report)
    assert f"## {case}" in md and "| score | random | frontier |" in md
    assert "n/a: FitnessError" in md


def test_oracle_ranks(report):
    """Disagreement with the dense model on real training images ranks the masks
    of one budget like test accuracy does (-0.86 to -0.99 over 12 seeds of 16
    random masks when measured)."""
    s = report["summary"]["lenet300-fmnist units 0.7"][fr.ORACLE]
    assert s["random"]["mean"] < -0.5
    assert s["frontier"]["mean"] < 0.0


def test_spearman():
    a = np.arange(10.0)
    assert fr.spearman(a, a**3) == pytest.approx(1.0)
    assert fr.spearman(a, -a) == pytest.approx(-1.0)
    assert math.isnan(fr.spearman(a, np.ones(10)))


def test_merge_keeps_other_cases(report, tmp_path):
    other = json.loads(json.dumps(report))
    for r in other["rows"]:
        r["case"] = "other"
    other["cases"] = {"other": other["cases"]["lenet300-fmnist units 0.7"]}
    merged = fr.merge(other, json.loads(json.dumps(report)))
    assert set(merged["cases"]) == {"other", "lenet300-fmnist units 0.7"}
    assert len(merged["rows"]) == 2 * len(report["rows"])
    assert len(merged["runs"]) == 2
    fr.write_report(merged, tmp_path / "ranking")
    for suffix in (".json", ".md", ".png"):
        assert (tmp_path / f"ranking{suffix}").stat().st_size > 0
