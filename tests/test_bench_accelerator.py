"""The quick mode of benchmarks/accelerator.py (issue 28's accelerator benchmark)
keeps working on CPU: the row's structure, its timings and memory fields, the
report files, and rows that cannot run recorded with their reason."""

import json
import math

import jax
import pytest
from conftest import load_benchmark

acc = load_benchmark("accelerator")


@pytest.fixture(scope="module")
def report():
    args = acc.parse(["--quick"])
    assert args.models == ["resnet20-fmnist"] and args.dtypes == ["float32"]
    assert (args.population, args.probes, args.generations) == (4, 8, 2)
    assert not args.isolate
    return acc.run(args, log=lambda *a: None)


def test_row(report):
    (row,) = report["rows"]
    assert row["status"] == "ok", row.get("reason")
    assert (row["model"], row["dtype"]) == ("resnet20-fmnist", "float32")
    g = row["generation"]
    assert g["per_generation_s"] > 0 and g["compile_s"] > 0
    assert g["per_generation_min_s"] <= g["per_generation_s"]
    assert g["per_generation_s"] <= g["per_generation_max_s"]
    assert g["evaluations_per_s"] == pytest.approx(4 / g["per_generation_s"])
    assert g["finite_best"]
    t = row["time_to_result"]
    # the GA evaluates its initial population, then 4 individuals a generation
    assert t["evaluations"] in (2 * 4, 3 * 4)
    assert 0 < t["search_compile_s"] < t["search_s"] < t["total_s"]
    assert t["fitness_build_s"] > 0 and t["finish_s"] >= 0
    # 50% of FLOPs removed, met by decoding
    assert t["flops_kept"] == pytest.approx(0.5, abs=0.02)
    assert math.isfinite(t["best_fitness"])
    mem = row["memory"]
    assert "peak_bytes" in mem["device"] and mem["host_peak_rss_bytes"] > 0
    if jax.default_backend() == "cpu":
        assert mem["device"] == {"peak_bytes": None, "note": "n/a (CPU)"}
    else:
        assert mem["device"]["peak_bytes"] > 0
    assert set(g["compiled_memory"]) <= {"temp_bytes", "argument_bytes", "output_bytes"}


def test_report_files(report, tmp_path):
    acc.write_report(report, tmp_path / "accelerator")
    saved = json.loads((tmp_path / "accelerator.json").read_text())
    assert saved["rows"][0]["model"] == "resnet20-fmnist"
    md = (tmp_path / "accelerator.md").read_text()
    assert "| resnet20-fmnist | float32 |" in md
    assert "Quick mode" in md
    if jax.default_backend() == "cpu":
        assert "figures from a 2-core CPU" in md or "-core CPU, no accelerator" in md
    assert jax.__version__ in md


def test_rows_that_cannot_run():
    """ResNet-50 without torchvision (or on a CPU) is skipped with its reason;
    an error inside a row is recorded, not raised."""
    args = acc.parse(["--quick", "--models", "resnet50-224"])
    row = acc.measure("resnet50-224", "float32", args, log=lambda *a: None)
    try:
        from common import import_torchvision

        import_torchvision()
        expect = "CPU" if jax.default_backend() == "cpu" else None
    except ImportError:
        expect = "torchvision not installed"
    if expect is not None:
        assert row["status"] == "skipped" and expect in row["reason"]
        md = acc.markdown(
            {
                "machine": dict(
                    report_machine(), load_average_at_end=0.0, platform="cpu"
                ),
                "settings": vars(args),
                "rows": [row],
                "total_s": 0.0,
            }
        )
        assert f"skipped: {row['reason']}" in md
    bad = acc.parse(["--quick", "--target", "1.5"])
    failed = acc.measure("resnet20-fmnist", "float32", bad, log=lambda *a: None)
    assert failed["status"] == "failed" and "target" in failed["reason"]


def report_machine():
    from common import machine

    return dict(machine(), device_kind="cpu", device_count=1)


def test_parse_rejects_unknown():
    with pytest.raises(SystemExit, match="unknown model"):
        acc.parse(["--models", "resnet18"])
    with pytest.raises(SystemExit):
        acc.parse(["--population", "0"])


def test_merge(report):
    """A second run (e.g. ResNet-50 alone on the same GPU) adds its rows to the
    saved report; another device kind or other settings are refused."""
    other = json.loads(json.dumps(report))
    other["rows"][0]["dtype"] = "bfloat16"
    other["command"] = "second"
    merged = acc.merge(other, json.loads(json.dumps(report)))
    assert [(r["model"], r["dtype"]) for r in merged["rows"]] == [
        ("resnet20-fmnist", "float32"),
        ("resnet20-fmnist", "bfloat16"),
    ]
    assert merged["command"].endswith("; second")
    # the same row measured again replaces the saved one
    again = acc.merge(json.loads(json.dumps(report)), merged)
    assert len(again["rows"]) == 2
    bigger = json.loads(json.dumps(report))
    bigger["settings"]["population"] = 64
    with pytest.raises(SystemExit, match="settings"):
        acc.merge(bigger, report)
    gpu = json.loads(json.dumps(report))
    gpu["machine"]["device_kind"] = "NVIDIA H100 80GB HBM3"
    with pytest.raises(SystemExit, match="machine"):
        acc.merge(gpu, report)
