"""Data-free probes: kinds, caching, BatchNorm matching, validation, report."""

import logging
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fitness_nets import tiny_affine_bn, tiny_bn

import gapruning as gp
from gapruning import probes as P

# probes and fitness are data-free by construction, not by convention
pytestmark = pytest.mark.usefixtures("no_datasets")


@pytest.fixture(scope="module")
def lenet300():
    return gp.load("lenet300-fmnist")


@pytest.fixture(scope="module")
def bn_net():
    return tiny_bn()


@pytest.mark.parametrize("kind", ["gaussian", "uniform"])
def test_random_probes_are_seeded_inside_the_box(lenet300, kind):
    lo, hi = lenet300.input_box
    a = gp.make_probes(lenet300, kind, 64, seed=3, cache=False)
    b = gp.make_probes(lenet300, kind, 64, seed=3, cache=False)
    c = gp.make_probes(lenet300, kind, 64, seed=4, cache=False)
    assert a.shape == (64, 28, 28, 1) and a.dtype == jnp.float32
    assert float(a.min()) >= lo - 1e-6 and float(a.max()) <= hi + 1e-6
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_gaussian_probes_are_standardized_for_a_normalized_model(lenet300):
    x = np.asarray(gp.make_probes(lenet300, "gaussian", 256, cache=False))
    lo, hi = lenet300.input_box
    # N(0, 1) clipped to the box: Phi(lo) of the mass sits on lo, 1 - Phi(hi) on hi
    phi = jax.scipy.stats.norm.cdf
    assert (x <= lo + 1e-6).mean() == pytest.approx(float(phi(lo)), abs=0.01)
    assert (x >= hi - 1e-6).mean() == pytest.approx(1 - float(phi(hi)), abs=0.005)


def test_cache_returns_the_same_probes_without_recomputing(lenet300):
    P.clear_probe_cache()
    a = gp.make_probes(lenet300, "uniform", 16, seed=1)
    b = gp.make_probes(lenet300, "uniform", 16, seed=1)
    c = gp.make_probes(lenet300, "uniform", 16, seed=2)
    assert a is b and a is not c
    P.clear_probe_cache()
    assert gp.make_probes(lenet300, "uniform", 16, seed=1) is not a


def test_bn_stats_reduce_the_mismatch_tenfold_from_their_random_start(bn_net):
    start = gp.make_probes(bn_net, "gaussian", 64, seed=0, cache=False)
    probes = gp.make_probes(
        bn_net, "bn_stats", 64, seed=0, steps=60, batch_size=64, cache=False
    )
    before = float(P.bn_mismatch(bn_net, start))
    after = float(P.bn_mismatch(bn_net, probes))
    assert before > 0.1  # a real mismatch to remove
    assert after <= before / 10, (before, after)
    lo, hi = bn_net.input_box
    assert float(probes.min()) >= lo - 1e-6 and float(probes.max()) <= hi + 1e-6


def test_bn_batch_stats_match_a_manual_computation(bn_net):
    x = gp.make_probes(bn_net, "uniform", 8, cache=False)
    stats = P.bn_batch_stats(bn_net, x)
    conv1 = bn_net.model.layers["c1"](x)  # b1's input
    np.testing.assert_allclose(stats["b1"][0], conv1.mean((0, 1, 2)), atol=1e-5)
    np.testing.assert_allclose(stats["b1"][1], conv1.var((0, 1, 2)), atol=1e-5)
    # bn_mismatch is zero for statistics equal to the running ones
    ref = P.running_stats(bn_net)
    same = {k: (m, v) for k, (m, v, _) in ref.items()}
    assert float(P.stats_distance(same, ref)) == pytest.approx(0.0, abs=1e-7)


def test_bn_stats_on_a_network_without_batchnorm_is_a_clear_error(lenet300):
    with pytest.raises(P.ProbeError, match="no BatchNorm.*inversion"):
        gp.make_probes(lenet300, "bn_stats", 8)
    with pytest.raises(P.ProbeError, match="no BatchNorm"):
        P.bn_mismatch(lenet300, jnp.zeros((2, 28, 28, 1)))


def test_inversion_probes_are_class_balanced_and_confident(lenet300):
    x = gp.make_probes(lenet300, "inversion", 40, steps=40, batch_size=20, cache=False)
    noise = gp.make_probes(lenet300, "gaussian", 40, cache=False)
    inv, gauss = P.probe_report(lenet300, x), P.probe_report(lenet300, noise)
    assert inv["classes_hit"] == 10
    assert inv["tv_from_uniform"] < gauss["tv_from_uniform"]
    # probe i targets class i mod 10
    pred = np.asarray(lenet300.model(x).argmax(-1))
    assert (pred == np.arange(40) % 10).mean() >= 0.9


def test_user_probes_are_validated(lenet300):
    good = np.zeros((3, 28, 28, 1), np.float32)
    np.testing.assert_array_equal(np.asarray(gp.make_probes(lenet300, good)), good)
    with pytest.raises(P.ProbeError, match=r"expected \(N, 28, 28, 1\)"):
        gp.make_probes(lenet300, np.zeros((3, 28, 28)))
    with pytest.raises(P.ProbeError, match="without a batch axis"):
        gp.make_probes(lenet300, np.zeros((28, 28, 1)))
    with pytest.raises(P.ProbeError, match="empty"):
        gp.make_probes(lenet300, np.zeros((0, 28, 28, 1)))
    bad = good.copy()
    bad[1, 2, 3, 0] = np.nan
    with pytest.raises(P.ProbeError, match=r"NaN/Inf.*\(1, 2, 3, 0\)"):
        gp.make_probes(lenet300, bad)
    with pytest.warns(UserWarning, match="outside the model's input box"):
        gp.make_probes(lenet300, good + 50.0)
    with pytest.raises(P.ProbeError, match="unknown probe kind 'noise'"):
        gp.make_probes(lenet300, "noise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        P.validate_probes(lenet300, good)  # in the box: no warning


def test_probe_report_counts_classes_and_distance_from_uniform(lenet300):
    x = gp.make_probes(lenet300, "gaussian", 1, cache=False)
    rep = P.probe_report(lenet300, jnp.repeat(x, 5, axis=0))  # one class only
    assert sum(rep["class_histogram"]) == pytest.approx(1.0)
    assert rep["classes_hit"] == 1
    assert rep["tv_from_uniform"] == pytest.approx(0.9)  # 0.5 * (0.9 + 9 * 0.1)
    p = jax.nn.softmax(lenet300.model(x), -1)
    assert rep["mean_confidence"] == pytest.approx(float(p.max()), rel=1e-5)
    assert "bn_mismatch" not in rep


def test_taps_return_intermediates_without_changing_outputs(bn_net):
    net = bn_net.model
    x = gp.make_probes(bn_net, "uniform", 4, cache=False)
    out, taps = net(x, taps=("c1", "r2"))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(net(x)))
    np.testing.assert_allclose(taps["c1"], net.layers["c1"](x), atol=1e-6)
    with pytest.raises(ValueError, match="unknown node"):
        net(x, taps=("nope",))
    # population masks: taps get the (P, B, ...) layout, row p = individual p
    fit_apply = gp.fitness.PrunedApply(net)
    masks = {"c1": jnp.array([[1, 1, 0, 1], [1, 0, 1, 1.0]]), "c2": jnp.ones((2, 6))}
    _, pop = fit_apply.model(masks)(x, taps=("r2",))
    assert pop["r2"].shape == (2, 4, 6, 6, 6)
    for i in range(2):
        one = {k: v[i] for k, v in masks.items()}
        _, single = fit_apply.taps(one, x, ("r2",))
        np.testing.assert_allclose(pop["r2"][i], single["r2"], atol=1e-5)


def test_inversion_moment_prior_follows_the_card(lenet300):
    """On a standardized card the default inversion probes are pulled towards batch
    mean 0 / std 1 (the data's statistics); a card without mean/std gets no prior."""

    def stats(net, **kw):
        x = np.asarray(
            gp.make_probes(net, "inversion", 20, steps=60, cache=False, **kw)
        )
        return abs(x.mean()) + abs(x.std() - 1.0)

    assert "mean" in lenet300.card["input"]
    assert stats(lenet300) < 0.5 * stats(lenet300, moment_weight=0.0)
    plain = {
        k: v for k, v in lenet300.card["input"].items() if k not in ("mean", "std")
    }
    card = dict(lenet300.card, input=plain)
    raw = gp.zoo.Pretrained(lenet300.model, card)
    assert stats(raw) == pytest.approx(stats(raw, moment_weight=0.0))


@pytest.mark.parametrize("kind", ["inversion", "bn_stats"])
def test_optimised_probes_are_deterministic_by_seed(lenet300, bn_net, kind):
    """Same seed, same probes; another seed, other probes (no dataset is read:
    the module's fixture makes every reader raise)."""
    net = lenet300 if kind == "inversion" else bn_net
    make = lambda seed: np.asarray(  # noqa: E731
        gp.make_probes(net, kind, 8, seed=seed, steps=5, cache=False)
    )
    a, b, c = make(3), make(3), make(4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_optimised_probes_log_what_they_make_and_the_expected_time(bn_net, caplog):
    """Optimised kinds can take minutes on a CPU: they say so (the CLI prints the
    ``gapruning`` logger's INFO lines), with the time the first batch took."""
    with caplog.at_level(logging.INFO, logger="gapruning"):
        gp.make_probes(bn_net, "bn_stats", 8, steps=2, batch_size=4, cache=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "gapruning.probes"]
    assert (
        lines[0] == f"making 8 bn_stats probes of {bn_net.name}: 2 batch(es) of 2 steps"
    )
    assert lines[1].startswith("  first batch in ") and " for all" in lines[1]
    assert len(lines) == 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gapruning"):
        gp.make_probes(bn_net, "gaussian", 8, cache=False)
    assert not [r for r in caplog.records if r.name == "gapruning.probes"]


def test_affine_maps_written_as_batchnorm_are_not_statistics():
    """An importer's epsilon-0 affine node (mean 0, variance 1) says nothing about
    the data: bn_stats leaves it out (its zero-variance channel made the probes
    NaN through sqrt(var + 0)), and recalibration leaves its values alone."""
    net = tiny_affine_bn()
    assert [n.name for n in P.batchnorm_nodes(net)] == ["b2"]
    x = gp.make_probes(net, "bn_stats", 32, seed=0, steps=5, cache=False)
    assert np.isfinite(np.asarray(x)).all()
    gp.recover.recalibrate_batchnorm(net, x)
    np.testing.assert_array_equal(np.asarray(net.model.layers["scale"].var[...]), 1.0)
