"""The quick mode of benchmarks/search_regret.py (issue 27) keeps working: four
methods per seed, the same recovery for all, the regret in points."""

import pytest
from conftest import load_benchmark

sr = load_benchmark("search_regret")


@pytest.fixture(scope="module")
def report():
    args = sr.parse(
        [
            "--quick",
            "--generations",
            "2",
            "--population",
            "4",
            "--num-probes",
            "16",
            "--test",
            "200",
            "--oracle",
            "32",
        ]
    )
    assert args.models == ["lenet300-fmnist"] and args.seeds == [0]
    return sr.run(args, log=lambda *a: None)


def test_structure_and_regret(report):
    (case,) = report["cases"]
    assert case == "lenet300-fmnist units 0.7"
    c = report["cases"][case]
    runs = c["runs"]
    assert [r["method"] for r in runs] == list(sr.METHODS)
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 1.0
        assert 0.0 <= r["accuracy_before_recovery"] <= 1.0
    # every method gets gp.prune's default recovery, the same one
    assert len({tuple(r["recover"]) for r in runs}) == 1
    acc = {r["method"]: r["accuracy"] for r in runs}
    regret = c["summary"]["regret_points"]
    assert regret["per_seed"] == [
        pytest.approx(100 * (acc["ga oracle"] - acc["ga default"]))
    ]
    assert 0.5 < c["dense_accuracy"] <= 1.0
    md = sr.markdown(report)
    assert "| lenet300-fmnist units 0.7 |" in md and "regret" in md
