"""Fitness metrics: registry contract, interval soundness, Haar, compose, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fitness_nets import (
    full_masks,
    random_unit_masks,
    row,
    stack,
    tiny_all_ops,
    tiny_bn,
)
from flax import nnx

import gapruning as gp
from gapruning import fitness as F
from gapruning.fitness.interval import impact_bounds, propagate_bounds

NUM_PROBES = 32


# probes and fitness are data-free by construction, not by convention
pytestmark = pytest.mark.usefixtures("no_datasets")


@pytest.fixture(scope="module")
def bn_net():
    return tiny_bn()


@pytest.fixture(scope="module")
def bn_probes(bn_net):
    return gp.make_probes(bn_net, "gaussian", NUM_PROBES, seed=0)


@pytest.fixture(scope="module")
def lenet300():
    return gp.load("lenet300-fmnist")


@pytest.fixture(scope="module")
def population(bn_net):
    """Row 0 keeps everything; rows 1-3 are random masks keeping 20%."""
    space = bn_net.space
    return stack(full_masks(space), random_unit_masks(space, 3, 0.2, seed=1))


# ------------------------------------------------------------- registry contract


@pytest.mark.parametrize("name", sorted(F.METRICS))
def test_metric_contract(name, bn_net, bn_probes, population):
    """Every registered metric on the same tiny conv+BN net: minimum (0, or 1.0 for
    costs) at the all-ones mask, worse (cheaper for costs) at 80% removal,
    vmapped == looped, finite."""
    metric = F.METRICS[name]
    assert metric.description and "\n" not in metric.description
    fit = F.compose(bn_net, {name: 1.0}, probes=bn_probes)
    values = np.asarray(fit(population))  # weight 1: the metric itself
    assert np.all(np.isfinite(values)), values
    if metric.degrades_with_pruning:
        assert values[0] == pytest.approx(0.0, abs=1e-5)
        assert np.all(values[1:] > values[0] + 1e-4), values
    else:
        assert values[0] == pytest.approx(1.0)
        assert np.all(values[1:] < values[0]), values
    looped = np.array([jax.jit(fit.single)(row(population, i)) for i in range(4)])
    np.testing.assert_allclose(values, looped, rtol=2e-4, atol=1e-5)


def test_register_metric_runs_a_user_metric_through_compose(bn_net, bn_probes):
    def l1(cache, pruned_apply, masks, probes):
        """mean absolute logit error"""
        return jnp.abs(pruned_apply(masks, probes) - cache["z"]).mean()

    F.register_metric("test_l1", l1, lambda net, x: {"z": net.model(x)})
    try:
        assert F.METRICS["test_l1"].description == "mean absolute logit error"
        with pytest.raises(F.FitnessError, match="already registered"):
            F.register_metric("test_l1", l1)
        fit = F.compose(bn_net, "test_l1", probes=bn_probes)
        space = bn_net.space
        v = np.asarray(
            fit(stack(full_masks(space), random_unit_masks(space, 2, 0.2, 0)))
        )
        assert v[0] == pytest.approx(0.0, abs=1e-6) and np.all(v[1:] > 1e-3)
    finally:
        del F.METRICS["test_l1"]


def test_metric_options_are_one_frozen_dataclass_per_metric():
    """A metric's parameters are the fields of its options dataclass, defaults
    included; compose passes overrides through it."""
    import dataclasses

    from gapruning.fitness.interval import IntervalOptions, RegionOptions

    interval = F.METRICS["interval"]
    assert interval.options is IntervalOptions
    assert interval.defaults == {
        "region": "box",
        "eps": 0.05,
        "max_probes": 64,
        "alpha": 0.75,
        "beta": 0.25,
        "threshold": 0.9,
        "normalize": True,
    }
    assert F.METRICS["interval_width"].defaults == dataclasses.asdict(RegionOptions())
    assert F.METRICS["fidelity_top1"].options is None
    assert F.METRICS["fidelity_top1"].defaults == {}
    for metric in F.METRICS.values():
        if metric.options is not None:
            assert dataclasses.is_dataclass(metric.options)
            assert metric.options.__dataclass_params__.frozen
    with pytest.raises(F.FitnessError, match="no parameter"):
        interval.params(gamma=1.0)


def test_register_metric_with_options_passes_them_to_prepare_and_fn(bn_net, bn_probes):
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class ScaleOptions:
        scale: float = 1.0
        offset: float = 0.0

    seen = []

    def prepare(net, x, opts):
        seen.append(opts)
        return {"z": net.model(x)}

    def scaled_l1(cache, pruned_apply, masks, probes, opts):
        err = jnp.abs(pruned_apply(masks, probes) - cache["z"]).mean()
        return opts.scale * err + opts.offset

    F.register_metric("test_scaled", scaled_l1, prepare, options=ScaleOptions)
    try:
        assert F.METRICS["test_scaled"].defaults == {"scale": 1.0, "offset": 0.0}
        masks = stack(full_masks(bn_net.space), full_masks(bn_net.space))
        spec = {"test_scaled": {"offset": 2.0}}
        v = np.asarray(F.compose(bn_net, spec, probes=bn_probes)(masks))
        assert seen[-1] == ScaleOptions(scale=1.0, offset=2.0)
        np.testing.assert_allclose(v, 2.0, atol=1e-6)
    finally:
        del F.METRICS["test_scaled"]


def test_register_metric_still_takes_keyword_defaults(bn_net, bn_probes):
    """The old ``defaults=`` form warns and behaves as before: ``prepare`` and
    ``fn`` get the parameters as keywords."""

    def prepare(net, x, offset):
        return {"z": net.model(x), "offset": offset}

    def shifted_l1(cache, pruned_apply, masks, probes, offset):
        err = jnp.abs(pruned_apply(masks, probes) - cache["z"]).mean()
        return err + offset + 0 * cache["offset"]

    with pytest.warns(DeprecationWarning, match="defaults"):
        F.register_metric("test_old", shifted_l1, prepare, defaults={"offset": 1.0})
    try:
        assert F.METRICS["test_old"].defaults == {"offset": 1.0}
        masks = stack(full_masks(bn_net.space), full_masks(bn_net.space))
        v = np.asarray(
            F.compose(bn_net, {"test_old": {"offset": 3.0}}, probes=bn_probes)(masks)
        )
        np.testing.assert_allclose(v, 3.0, atol=1e-6)
    finally:
        del F.METRICS["test_old"]


def test_register_metric_refuses_options_that_are_not_declarations():
    import dataclasses

    @dataclasses.dataclass
    class Mutable:
        a: int = 1

    @dataclasses.dataclass(frozen=True)
    class NoDefault:
        a: int

    def fn(cache, pruned_apply, masks, probes, opts):
        return 0.0

    for bad, match in ((Mutable, "frozen"), (NoDefault, "default"), (dict, "type")):
        with pytest.raises(F.FitnessError, match=match):
            F.register_metric("test_bad_options", fn, options=bad)
    assert "test_bad_options" not in F.METRICS


def test_terms_that_tap_share_one_forward_pass(bn_net, bn_probes, population):
    """Outputs and every term's declared taps come from one pass per individual
    (traced once), with the values each term has alone; a request the shared taps
    do not cover gets its own pass."""
    spec = {"fidelity": 1.0, "fidelity_features": 1.0, "wavelet": 1.0}
    fit = F.compose(bn_net, spec, probes=bn_probes)
    passes = []
    forward = F.PrunedApply._forward

    def recorded(self, masks, x, names):
        passes.append(names)
        return forward(self, masks, x, names)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F.PrunedApply, "_forward", recorded)
        together = np.asarray(fit(population))
    assert len(passes) == 1
    wanted = {
        n
        for m in ("fidelity_features", "wavelet")
        for n in F.METRICS[m].taps(bn_net.model)
    }
    assert set(passes[0]) == wanted and len(wanted) >= 2
    alone = sum(
        np.asarray(F.compose(bn_net, {name: 1.0}, probes=bn_probes)(population))
        for name in spec
    )
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)

    one = row(population, 1)
    first, everything = passes[0][:1], tuple(sorted(wanted))
    apply = F.PrunedApply(
        bn_net.model, share=True, shared_input=bn_probes, shared_taps=first
    )
    passes.clear()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(F.PrunedApply, "_forward", recorded)
        out = apply(one, bn_probes)
        _, tapped = apply.taps(one, bn_probes, first)
        _, more = apply.taps(one, bn_probes, everything)
        apply(one, bn_probes[:8])
    assert passes == [first, everything, ()]
    direct_out, direct = apply.model(one)(bn_probes, taps=everything)
    np.testing.assert_allclose(out, direct_out, rtol=1e-6)
    for name in everything:
        np.testing.assert_allclose(more[name], direct[name], rtol=1e-6)
    np.testing.assert_allclose(tapped[first[0]], direct[first[0]], rtol=1e-6)


def test_metric_functions_have_formula_docstrings():
    for name, m in F.METRICS.items():
        assert m.fn.__doc__ and len(m.fn.__doc__.strip()) > 40, name


# ------------------------------------------------------------- interval bounds


def test_dense_logits_equals_the_model_and_compiles_once_per_architecture():
    from gapruning.fitness.base import _forward, dense_logits

    first, second = gp.load("lenet5-fmnist"), gp.load("lenet5-fmnist")
    x = np.random.default_rng(0).normal(size=(8, *first.input_shape))
    x = jnp.asarray(x, jnp.float32)
    np.testing.assert_array_equal(dense_logits(first, x), first.model(x))
    compiled = _forward._cache_size()
    # another copy of the architecture, other weights: no new compilation
    state = nnx.state(second.model)
    nnx.update(second.model, jax.tree.map(lambda a: a * 2.0, state))
    np.testing.assert_array_equal(dense_logits(second, x), second.model(x))
    assert _forward._cache_size() == compiled


def test_interval_bounds_contain_1000_random_points():
    net = tiny_all_ops()
    lo, hi = net.input_box
    space = net.space
    masks = row(random_unit_masks(space, 1, 0.5, seed=2), 0)
    x = jax.random.uniform(
        jax.random.key(0), (1000, *net.input_shape), minval=lo, maxval=hi
    )
    x = x.at[:2].set(
        jnp.stack([jnp.full(net.input_shape, lo), jnp.full(net.input_shape, hi)])
    )
    apply = jax.jit(F.PrunedApply(net.model))
    ones = {g.name: jnp.ones(g.size) for g in space.groups}
    dense_out, pruned_out = apply(ones, x), apply(masks, x)
    bounds = jax.jit(lambda m: F.interval_bounds(net, m))
    for m, out in ((ones, dense_out), (masks, pruned_out)):
        low, high = bounds(m)
        assert np.all(np.asarray(low) <= np.asarray(out) + 1e-5)
        assert np.all(np.asarray(out) <= np.asarray(high) + 1e-5)
    # differential (impact) bounds contain pruned - dense at every point
    shape = (1, *net.input_shape)
    dense = jax.jit(lambda a, b: propagate_bounds(net.model, a, b))(
        jnp.full(shape, lo), jnp.full(shape, hi)
    )
    impact = jax.jit(lambda m: impact_bounds(net.model, m, dense))
    dl, du = impact(masks)
    diff = np.asarray(pruned_out - dense_out)
    assert np.all(np.asarray(dl) <= diff + 1e-5) and np.all(
        diff <= np.asarray(du) + 1e-5
    )
    # and they collapse to 0 when nothing is pruned
    dl0, du0 = impact(ones)
    assert float(jnp.abs(dl0).max()) == 0.0 and float(jnp.abs(du0).max()) == 0.0


def test_interval_bounds_of_a_point_region_are_the_output(bn_net):
    x = gp.make_probes(bn_net, "uniform", 3, cache=False)
    low, high = jax.jit(lambda x: F.interval_bounds(bn_net, None, x, x))(x)
    np.testing.assert_allclose(low, bn_net.model(x), atol=1e-4)
    np.testing.assert_allclose(high, bn_net.model(x), atol=1e-4)


def test_paoding_entropy_matches_a_hand_computation():
    # Paoding's own example: union [-5, 5]; neighbours of one sign are 0.9
    # similar, others at most 0.3 -> every p_i = 2/4 -> ENT = 2 log 2
    lo = jnp.array([-5.0, -4.0, 3.0, 4.0])
    hi = jnp.array([-4.0, -3.0, 4.0, 5.0])
    assert float(F.paoding_entropy(lo, hi, 0.8)) == pytest.approx(
        2 * np.log(2), rel=1e-6
    )
    # at threshold 0.95 each interval is only similar to itself: p_i = 1/4
    assert float(F.paoding_entropy(lo, hi, 0.95)) == pytest.approx(np.log(4), rel=1e-6)
    zero = jnp.zeros(4)
    assert float(F.paoding_entropy(zero, zero, 0.9)) == 0.0


# ------------------------------------------------------------- fidelity


def test_feature_fidelity_matches_masked_features_computed_directly():
    """Reference: the masked inputs of every Dense/Conv layer after the first, read
    as the mask nodes' outputs, errors summed in float64."""
    net = tiny_all_ops()
    probes = gp.make_probes(net, "gaussian", 16, seed=0)
    masks = random_unit_masks(net.space, 3, 0.5, seed=2)
    fit = F.compose(net, "fidelity_features", probes=probes)
    got = np.asarray(fit(masks))
    model = net.model
    by_name = {n.name: n for n in model.nodes}
    first = model.nodes[0].name
    read = []
    for n in model.nodes:
        if n.op in ("dense", "conv") and n.inputs[0] != first:
            read.append(n.inputs[0])
    read = list(dict.fromkeys(read))
    assert any(by_name[r].op == "flatten" for r in read)  # the flatten case is hit
    _, dense = model(probes, taps=tuple(read))
    for i in range(3):
        one = row(masks, i)
        _, pruned = F.PrunedApply(model).taps(one, probes, tuple(read))
        errs = [
            np.sum((np.float64(pruned[r]) - np.float64(dense[r])) ** 2)
            / np.sum(np.float64(dense[r]) ** 2)
            for r in read
        ]
        assert got[i] == pytest.approx(np.mean(errs), rel=1e-4)
    assert float(fit(full_masks(net.space))[0]) == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------- wavelet


def test_haar_transform_matches_a_hand_computed_2x2_case():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 2, 2, 1)
    ll, lh, hl, hh = (float(b[0, 0, 0, 0]) for b in F.haar_dwt2(x))
    assert (ll, lh, hl, hh) == (5.0, -2.0, -1.0, 0.0)
    # orthonormal: energy is preserved
    y = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
    energy = sum(float((b**2).sum()) for b in F.haar_dwt2(y))
    assert energy == pytest.approx(float((y**2).sum()), rel=1e-5)
    # odd sizes repeat the last row/column
    assert F.haar_dwt2(jnp.ones((1, 3, 3, 1)))[0].shape == (1, 2, 2, 1)


# ------------------------------------------------------------- compose


def test_compose_is_traceable_in_jit_and_scan(bn_net, bn_probes, population):
    fit = F.compose(bn_net, {"fidelity": 1.0, "interval": 0.5}, probes=bn_probes)
    direct = np.asarray(fit(population))
    jitted = np.asarray(jax.jit(lambda m: fit(m))(population))

    def body(carry, _):
        return carry, fit(population)

    _, scanned = jax.lax.scan(body, 0, None, length=2)
    np.testing.assert_allclose(jitted, direct, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(scanned[1]), direct, rtol=1e-5)
    bools = {k: v.astype(bool) for k, v in population.items()}
    np.testing.assert_allclose(np.asarray(fit(bools)), direct, rtol=1e-6)
    assert fit(population).shape == (4,)


def test_weighted_sum_and_normalization(bn_net, bn_probes, population):
    spec = {"fidelity": 2.0, "fidelity_mse": 0.5}
    fit = F.compose(bn_net, spec, probes=bn_probes, normalize=True)
    s = fit.scales
    assert s["fidelity"] > 0 and s["fidelity_mse"] > 0 and s["fidelity"] != 1.0
    comps = fit.components(population)
    want = (
        2.0 * comps["fidelity"] / s["fidelity"]
        + 0.5 * comps["fidelity_mse"] / s["fidelity_mse"]
    )
    np.testing.assert_allclose(np.asarray(fit(population)), np.asarray(want), rtol=1e-4)
    assert F.compose(bn_net, spec, probes=bn_probes).scales == {
        "fidelity": 1.0,
        "fidelity_mse": 1.0,
    }


def test_log_combination_matches_a_float64_reference(bn_net, bn_probes, population):
    """combine="log": sum_i w_i * sign(z) * log(1 + |z|), z = m_i / (0.01 * s_i)."""
    spec = {"fidelity": 2.0, "fidelity_mse": 0.5, "cost": 1.0}
    fit = F.compose(bn_net, spec, probes=bn_probes, normalize=True, combine="log")
    comps = {
        k: np.asarray(v, np.float64) for k, v in fit.components(population).items()
    }
    want = np.zeros(len(comps["cost"]))
    for label, w in spec.items():
        z = comps[label] / (F.LOG_FLOOR * fit.scales[label])
        want += w * np.sign(z) * np.log(1.0 + np.abs(z))
    np.testing.assert_allclose(np.asarray(fit(population)), want, rtol=1e-4)
    assert fit.describe()["combine"] == "log" and "log:" in repr(fit)
    # a term that is negative stays monotone: symlog(-z) = -symlog(z)
    assert float(fit._term(jnp.float32(-0.5), 1.0)) == pytest.approx(-np.log(51.0))


def test_kernel_masks_work_for_output_metrics(lenet300):
    rng = np.random.default_rng(0)
    masks = {
        name: jnp.asarray(rng.random((2, *layer.kernel[...].shape)) < 0.3)
        for name, layer in lenet300.model.layers.items()
    }
    probes = gp.make_probes(lenet300, "gaussian", NUM_PROBES)
    fit = F.compose(lenet300, {"fidelity": 1.0, "cost": 1.0}, probes=probes)
    v = np.asarray(fit(masks))
    assert v.shape == (2,) and np.all(np.isfinite(v)) and np.all(v > 0)
    with pytest.raises(F.FitnessError, match="structured"):
        F.compose(lenet300, "interval_width")(masks)


# ------------------------------------------------------------- bad input


def test_nan_outputs_score_inf_never_nan(bn_net, bn_probes, population):
    fit = F.compose(bn_net, {"fidelity_top1": 1.0, "cost": 1.0}, probes=bn_probes)
    bad = {k: v.at[2, 0].set(jnp.nan) for k, v in population.items()}
    v = np.asarray(fit(bad))
    assert v[2] == np.inf and np.all(np.isfinite(v[[0, 1, 3]]))
    inf = {k: v.at[1, 0].set(jnp.inf) for k, v in population.items()}
    assert np.asarray(fit(inf))[1] == np.inf


def test_bad_specs_and_probes_fail_clearly(bn_net, lenet300):
    with pytest.raises(F.FitnessError, match="unknown metric 'accuracy'"):
        F.compose(lenet300, {"accuracy": 1.0})
    with pytest.raises(F.FitnessError, match="has no parameter"):
        F.compose(lenet300, {"fidelity": {"weight": 1.0, "temp": 2}})
    with pytest.raises(F.FitnessError, match="combine must be one of"):
        F.compose(lenet300, "cost", combine="product")
    with pytest.raises(F.FitnessError, match="bn_drift.*BatchNorm"):
        F.compose(lenet300, "bn_drift", probes="gaussian")
    with pytest.raises(F.FitnessError, match="convolutional channel groups"):
        F.compose(lenet300, "wavelet", probes="gaussian", num_probes=4)
    with pytest.raises(gp.probes.ProbeError, match="expected"):
        F.compose(lenet300, "fidelity", probes=np.zeros((4, 28, 28)))
    nan = np.zeros((4, 28, 28, 1), np.float32)
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(gp.probes.ProbeError, match="NaN"):
        F.compose(lenet300, "fidelity", probes=nan)
    fit = F.compose(bn_net, "cost")
    with pytest.raises(gp.MaskError, match="neither the prunable groups"):
        fit({"conv1": jnp.ones((2, 4))})
    with pytest.raises(gp.MaskError, match=r"expected \(P, 4\)"):
        fit({"c1": jnp.ones((2, 5)), "c2": jnp.ones((2, 6))})
    with pytest.raises(gp.MaskError, match="population size"):
        fit({"c1": jnp.ones((2, 4)), "c2": jnp.ones((3, 6))})


def test_default_composite_never_opens_a_dataset_and_ranks_masks(lenet300):
    """The composite gp.prune uses, with inversion probes and normalization (the
    module fixture makes every dataset reader raise), ranks the unpruned network
    first and 90% removal below 50% removal."""
    with pytest.raises(AssertionError, match="dataset was opened"):
        gp.data.fashion_mnist("test")  # the guard is active
    gp.probes.clear_probe_cache()
    fit = F.compose(
        lenet300, "default", num_probes=NUM_PROBES, probe_options={"steps": 5}
    )
    assert fit.probe_kind == "inversion" and fit.combine == F.DEFAULT_COMBINE
    assert [t["metric"] for t in fit.describe()["terms"]] == list(F.DEFAULT_SPEC)
    space = lenet300.space
    masks = stack(
        full_masks(space),
        random_unit_masks(space, 2, 0.5, seed=0),
        random_unit_masks(space, 2, 0.1, seed=0),
    )
    v = np.asarray(fit(masks))
    assert v[0] == pytest.approx(0.0, abs=1e-3)  # log terms: float noise / 0.01
    assert v[1:3].max() > 1.0
    assert v[1:3].max() < v[3:].min()  # removing 90% is worse than removing 50%
