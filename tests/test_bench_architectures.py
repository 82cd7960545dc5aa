"""benchmarks/architectures.py (issue 29B): its quick mode on two torchvision
builders (every stage of resnet18 passes), the report, and the paths where a
worker hangs or a stage fails."""

import json

import pytest
from conftest import load_benchmark

arch = load_benchmark("architectures")
pytest.importorskip("torch")
try:
    arch.import_torchvision()
except ImportError:
    pytest.skip("torchvision is not installed", allow_module_level=True)

STATUSES = {"ok", "failed", "skipped"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("arch") / "architectures"
    # a generous timeout: a loaded machine makes the stages slow, not wrong
    args = arch.parse(["--quick", "--out", str(out), "--timeout", "3000"])
    assert args.models == list(arch.QUICK) and args.sizes[0] == 32
    return arch.run(args, log=lambda *a: None), out


def test_quick_rows(quick):
    report, _ = quick
    rows = {r["model"]: r for r in report["rows"]}
    assert set(rows) == set(arch.QUICK)
    for row in rows.values():
        assert row["status"] == "ran" and row["input"] == 32 and not row["input_note"]
        assert set(row["stages"]) == set(arch.STAGES)
        for stage, entry in row["stages"].items():
            assert entry["status"] in STATUSES, (row["model"], stage, entry)
            if entry["status"] == "failed":
                assert entry["error"] and "\n" not in entry["error"]
            if entry["status"] == "skipped":
                need = arch.NEEDS[stage]
                assert entry["error"] == f"needs {need}"
                assert row["stages"][need]["status"] != "ok"
            if entry["status"] == "ok":
                assert entry["s"] >= 0
    resnet = rows["resnet18"]["stages"]
    dynamo = arch.STAGES if _has_onnxscript() else arch.STAGES[:-1]
    assert all(resnet[s]["status"] == "ok" for s in dynamo), resnet
    assert resnet["parity"]["rel_error"] <= arch.TOL
    assert resnet["compact"]["params"] < resnet["compact"]["params_dense"]
    # 30% of FLOPs removed, met by decoding
    assert resnet["prune"]["flops_kept"] <= 0.7 + 0.01


def _has_onnxscript():
    try:
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


def test_quick_report_files(quick):
    report, out = quick
    saved = json.loads(out.with_suffix(".json").read_text())
    assert [r["model"] for r in saved["rows"]] == sorted(arch.QUICK)
    md = out.with_suffix(".md").read_text()
    assert "Quick mode" in md and "| resnet18 | 32x32 |" in md
    counts = arch.counts(report)
    assert f"| convert | {counts['convert']['ok']} |" in md
    for stage in arch.STAGES:
        assert sum(counts[stage].values()) == len(arch.QUICK)
    failures = sum(c["failed"] for c in counts.values())
    assert md.count("✗ [") == failures
    out.with_suffix(".md").unlink()
    arch.main(["--render-only", "--out", str(out)])
    assert out.with_suffix(".md").read_text() == md
    planned = arch.markdown(report, planned=[*arch.QUICK, "vgg11"])
    assert "Not run (the sweep was stopped): vgg11." in planned


def test_a_hung_worker_fails_its_stage(tmp_path):
    """A worker killed by the timeout before its first stage fails the build;
    one killed inside a stage fails that stage, the rest are skipped."""
    args = arch.parse(["--models", "resnet18", "--timeout", "1"])
    row = arch.run_isolated("resnet18", args, log=lambda *a: None)
    assert row["status"] == "failed" and "timed out after 1 s" in row["reason"]
    assert "failed: building the torch model" in arch.summary(row)
    row = {"model": "m", "status": "ran", "stages": {"convert": {"status": "ok"}}}
    row["stages"]["parity"] = {"status": "running"}
    arch.close_row(row, "timed out after 9 s")
    failed = {"status": "failed", "error": "timed out after 9 s"}
    assert row["stages"]["parity"] == failed
    assert row["stages"]["onnx_dynamo"]["status"] == "skipped"


def test_mismatch_and_first_line():
    import numpy as np

    ref = np.ones((2, 3))
    assert arch.check_close(ref + 1e-6, ref, "x")["rel_error"] < arch.TOL
    with pytest.raises(arch.Mismatch, match="x: relative error 1.00e-02 > 0.0001"):
        arch.check_close(ref + 1e-2, ref, "x")
    with pytest.raises(arch.Mismatch, match="output shape"):
        arch.check_close(np.ones((2, 4)), ref, "x")
    err = ValueError("first line\nsecond line")
    assert arch.first_line(err) == "ValueError: first line"
    assert arch.first_line(RuntimeError()) == "RuntimeError"


def test_family_first_order():
    names = ["resnet101", "vgg11", "resnet18", "swin_b", "swin_t", "alexnet"]
    assert arch.family_first(names) == [
        "alexnet",
        "resnet18",
        "swin_t",
        "vgg11",
        "resnet101",
        "swin_b",
    ]


def test_parse_and_update(tmp_path):
    with pytest.raises(SystemExit):
        arch.parse(["--timeout", "0"])
    out = tmp_path / "architectures"
    with pytest.raises(SystemExit, match="no saved report"):
        arch.updated({}, out.with_suffix(".json"), ["resnet18"])
    saved = {
        "command": "first",
        "settings": {"a": 1},
        "rows": [{"model": "resnet18"}, {"model": "vgg11"}],
    }
    out.with_suffix(".json").write_text(json.dumps(saved))
    new = {"command": "second", "settings": {"a": 1}, "rows": []}
    merged = arch.updated(new, out.with_suffix(".json"), ["resnet18"])
    assert merged["rows"] == [{"model": "vgg11"}]
    assert merged["command"] == "first; second"
    with pytest.raises(SystemExit, match="other settings"):
        arch.updated(dict(new, settings={"a": 2}), out.with_suffix(".json"), [])
    longer = dict(new, settings={"a": 1, "timeout_s": 9})
    assert arch.updated(longer, out.with_suffix(".json"), [])["rows"] == saved["rows"]
