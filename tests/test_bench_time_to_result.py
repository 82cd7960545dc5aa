"""benchmarks/time_to_result.py keeps working: its quick mode on lenet300."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_time_to_result_quick_mode_writes_every_row(tmp_path):
    out = tmp_path / "ttr"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "time_to_result.py"),
            "--quick",
            "--rows",
            "old,new",
            "--skip-repair-in-loop",
            "--out",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    report = json.loads(out.with_suffix(".json").read_text())
    (case,) = report["cases"]
    labels = [r["row"] for r in case["rows"]]
    assert labels == [
        "old defaults",
        "old defaults",
        "new defaults",
        "new, no repair",
        "new + distill 3",
    ]
    assert all(0 <= r["accuracy"] <= 100 and r["seconds"] > 0 for r in case["rows"])
    assert (
        "| lenet300-fmnist | 70% units | new defaults |"
        in out.with_suffix(".md").read_text()
    )
    assert out.with_suffix(".png").stat().st_size > 0
