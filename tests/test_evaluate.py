import numpy as np
import pytest

import gapruning as gp
from gapruning import train


@pytest.fixture(scope="module")
def lenet300():
    return gp.load("lenet300-fmnist")


@pytest.fixture(scope="module")
def test_subset():
    ds = gp.data.fashion_mnist("test")
    return ds.images[:1000], ds.labels[:1000]


def test_fgsm_at_eps_zero_equals_clean_accuracy(lenet300, test_subset):
    m = gp.evaluate(lenet300, test_subset, attacks=("fgsm",), eps=(0.0,))
    assert m["fgsm"][0.0] == m["accuracy"]
    assert m["robustness_preservation"]["fgsm"][0.0] == 1.0


def test_robust_accuracy_does_not_rise_with_eps(lenet300, test_subset):
    eps = (0.0, 0.01, 0.03, 0.05, 0.1)
    m = gp.evaluate(lenet300, test_subset, eps=eps)
    for attack in ("fgsm", "pgd"):
        accs = [m[attack][e] for e in eps]
        assert accs == sorted(accs, reverse=True), (attack, accs)
        assert accs[-1] < accs[0] - 0.3  # attacks really bite at eps=0.1
    # the iterative attack is at least as strong as the one-step attack
    for e in eps[1:]:
        assert m["pgd"][e] <= m["fgsm"][e] + 0.01


def test_clean_accuracy_matches_an_independent_count(lenet300, test_subset):
    x, y = test_subset
    m = gp.evaluate(lenet300, (x, y), attacks=())
    ref = train.accuracy(
        lenet300.model, gp.data.Dataset(x, y), lenet300.mean, lenet300.std
    )
    assert m["accuracy"] == pytest.approx(ref, abs=1e-9)
    assert m["num_samples"] == 1000


def test_robustness_preservation_is_consistent(lenet300, test_subset):
    m = gp.evaluate(lenet300, test_subset, attacks=("fgsm",), eps=(0.05,))
    rp = m["robustness_preservation"]["fgsm"][0.05]
    # kept-correct / clean-correct can never exceed adversarial / clean accuracy ratio
    assert 0.0 < rp <= m["fgsm"][0.05] / m["accuracy"] + 1e-9


def test_batches_do_not_change_the_result(lenet300, test_subset):
    x, y = test_subset
    a = gp.evaluate(lenet300, (x[:333], y[:333]), eps=(0.05,), batch_size=100)
    b = gp.evaluate(
        lenet300, (x[:333], y[:333]), attacks=("fgsm",), eps=(0.05,), batch_size=333
    )
    assert a["accuracy"] == b["accuracy"] and a["fgsm"] == b["fgsm"]


def test_bad_arguments_are_named(lenet300, test_subset):
    x, y = test_subset
    with pytest.raises(ValueError, match="unknown attack"):
        gp.evaluate(lenet300, (x, y), attacks=("cw",))
    with pytest.raises(ValueError, match="eps must lie in"):
        gp.evaluate(lenet300, (x, y), eps=(2.0,))
    with pytest.raises(ValueError, match=r"shape \(32, 32, 1\)"):
        gp.evaluate(lenet300, (np.zeros((4, 32, 32, 1)), np.zeros(4)))
    with pytest.raises(ValueError, match="4 inputs but 3 labels"):
        gp.evaluate(lenet300, (x[:4], y[:3]))
    with pytest.raises(ValueError, match="empty"):
        gp.evaluate(lenet300, (x[:0], y[:0]))
