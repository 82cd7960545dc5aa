"""benchmarks/zoo_pruning.py keeps working: its quick mode on lenet300, and
rows of other cases kept when a case is re-run."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
zoo_pruning = load_benchmark("zoo_pruning")


def test_quick_mode_writes_a_row(tmp_path):
    out = tmp_path / "zoo"
    script = str(ROOT / "benchmarks" / "zoo_pruning.py")
    cmd = [sys.executable, script, "--quick", "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert (row["model"], row["target"], row["sizes"]) == (
        "lenet300-fmnist",
        0.3,
        "2 x 4 x 16",
    )
    assert row["recover"] == ["lstsq"] and row["seconds"] > 0
    assert 0 <= row["accuracy"] <= 100 and 0 <= row["dense"] <= 100
    assert row["flops_kept"] <= 0.7 + 0.01
    assert row["params"][1] < row["params"][0]
    kept = row["kept"]
    assert set(kept) == {"fc1", "fc2"} and all(0 < k <= n for k, n in kept.values())
    md = out.with_suffix(".md").read_text()
    assert "| lenet300-fmnist | 30% |" in md and "fc1 " in md


def test_a_rerun_case_replaces_only_its_own_row():
    old = {"rows": [_row("a", 0.3, 1.0), _row("a", 0.5, 2.0), _row("b", 0.3, 3.0)]}
    new = {"machine": {}, "rows": [_row("a", 0.5, 9.0)]}
    merged = zoo_pruning.merge(old, new)
    assert [(r["model"], r["target"], r["seconds"]) for r in merged["rows"]] == [
        ("a", 0.3, 1.0),
        ("a", 0.5, 9.0),
        ("b", 0.3, 3.0),
    ]


def _row(model, target, seconds):
    return {"model": model, "target": target, "seconds": seconds}


def test_unknown_models_and_bad_targets_are_refused(capsys):
    for argv in (["--models", "nope"], ["--targets", "1.5"]):
        try:
            zoo_pruning.parse(argv)
        except SystemExit as stop:
            assert stop.code == 2
        else:
            raise AssertionError(f"{argv} was accepted")
    assert "nope" in capsys.readouterr().err
