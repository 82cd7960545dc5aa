"""Contract tests of every registered pruning method, and the numerics of the
one-shot baselines and of Paoding's merging."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from fitness_nets import random_net, tiny_bn
from flax import nnx

import gapruning as gp
from gapruning.methods import METHODS
from gapruning.methods.oneshot import l2_out_scores, synflow_scores
from gapruning.methods.paoding import (
    merge_delta,
    merge_pair,
    pair_saliency,
    propagate_delta,
)
from gapruning.models import GraphBuilder, assemble

SMALL = {"generations": 2, "population": 4, "num_probes": 16, "progress": False}
# unit-mask methods (kernel-mask ga_scores is tested in test_methods_search.py)
STRUCTURED = sorted(name for name, m in METHODS.items() if m.structured)
# the contract tests check budgets and determinism, not quality: cheapest settings
FAST_OPTIONS = {"gwcs": {"distill_steps": 2}, "profile_rl": {"copies": 1}}


def tiny_mlp(seed: int = 0, hidden=(12, 8)) -> gp.Pretrained:
    """(4, 4, 1) -> hidden ReLU layers -> 5 outputs, random weights."""
    g = GraphBuilder((4, 4, 1))
    x = g.flatten(g.input, name="flatten")
    for i, width in enumerate(hidden, start=1):
        x = g.relu(g.dense(x, width, name=f"fc{i}"), name=f"relu{i}")
    net = random_net(g.build(g.dense(x, 5, name="out")), seed)
    return gp.Pretrained(net, {"name": "tiny-mlp", "input": {"box": [0.0, 1.0]}})


@pytest.fixture(scope="module")
def mlp():
    return tiny_mlp()


def _run(net, method, target=0.5, budget="units", seed=0, **kw):
    kw.setdefault("strategy_options", FAST_OPTIONS.get(method))
    return gp.prune(net, method, target, budget=budget, seed=seed, **SMALL, **kw)


# ------------------------------------------------------------- registry contract


@pytest.mark.parametrize("method", STRUCTURED)
@pytest.mark.parametrize("per_group", [False, True])
def test_every_method_meets_the_units_budget(no_datasets, mlp, method, per_group):
    if per_group and not METHODS[method].per_group:
        with pytest.raises(ValueError, match="per-group budget"):
            _run(mlp, method, 0.5, per_group=per_group)
        return
    result = _run(mlp, method, 0.5, per_group=per_group)
    kept = mlp.space.kept(result.masks)
    assert sum(kept.values()) == 10
    if per_group:
        assert kept == {"fc1": 6, "fc2": 4}
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (3, 4, 4, 1)), jnp.float32)
    assert result.pruned.model(x).shape == (3, 5)


@pytest.mark.parametrize("method", STRUCTURED)
def test_every_method_meets_a_flops_budget_or_refuses(no_datasets, mlp, method):
    try:
        result = _run(mlp, method, 0.6, budget="flops")
    except ValueError as err:  # a clear refusal is allowed
        assert "budget" in str(err)
        return
    space = mlp.space
    flops = space.flops(result.masks)
    assert flops <= 0.4 * space.dense_flops
    # within one unit: adding the cheapest removed unit would break the budget
    assert flops > 0.4 * space.dense_flops - 8 * 12 - 12 * 5


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_is_deterministic_by_seed(no_datasets, mlp, method):
    a = _run(mlp, method, 0.5, seed=3)
    b = _run(mlp, method, 0.5, seed=3)
    for g in a.masks:
        np.testing.assert_array_equal(a.masks[g], b.masks[g])
    for name in ("fc1", "fc2", "out"):
        ka = a.search.net.model.layers[name].kernel[...]
        kb = b.search.net.model.layers[name].kernel[...]
        np.testing.assert_array_equal(np.asarray(ka), np.asarray(kb))


def test_random_mask_depends_on_the_seed(mlp):
    a, b = _run(mlp, "random_mask", seed=0), _run(mlp, "random_mask", seed=1)
    assert any(not np.array_equal(a.masks[g], b.masks[g]) for g in a.masks)


@pytest.mark.parametrize("method", ["l2_out", "synflow", "paoding"])
def test_conv_network_flops_budget(no_datasets, method):
    net = tiny_bn()
    result = gp.prune(net, method, 0.5, budget="flops", recover=(), **SMALL)
    assert net.space.flops(result.masks) <= 0.5 * net.space.dense_flops
    x = jnp.zeros((2, 12, 12, 1))
    out = gp.masked_apply(result.search.net, result.masks, x)
    np.testing.assert_allclose(result.pruned.model(x), out, rtol=1e-5, atol=1e-5)


def test_methods_are_listed_by_the_cli(capsys, monkeypatch):
    from gapruning.cli import main

    monkeypatch.setenv("COLUMNS", "300")
    main(["list"])
    out = capsys.readouterr().out
    for name, method in METHODS.items():
        assert name in out
        assert method.description in out


# ------------------------------------------------------------- one-shot numerics


def test_l2_out_scores_by_hand():
    net = tiny_mlp(hidden=(3, 2))
    w2 = np.asarray(net.model.layers["fc2"].kernel[...], np.float64)
    w3 = np.asarray(net.model.layers["out"].kernel[...], np.float64)
    want = np.concatenate([np.linalg.norm(w2, axis=1), np.linalg.norm(w3, axis=1)])
    np.testing.assert_allclose(l2_out_scores(net.model, net.space), want, rtol=1e-6)


def _synflow_reference(net, masks) -> np.ndarray:
    """SynFlow unit scores of an MLP by a plain loop in float64: the gradient of
    R (summed outputs of the |θ| network on ones) w.r.t. every parameter by
    central differences (R is affine in each single parameter here)."""
    names = ["fc1", "fc2", "out"]
    params = {
        n: {
            k: np.abs(np.asarray(getattr(net.model.layers[n], k)[...], np.float64))
            for k in ("kernel", "bias")
        }
        for n in names
    }
    m = [np.asarray(masks["fc1"], np.float64), np.asarray(masks["fc2"], np.float64)]

    def flow(p):
        h = np.ones(16)
        for i, n in enumerate(names):
            h = h @ p[n]["kernel"] + p[n]["bias"]
            if i < 2:
                h = np.maximum(h, 0.0) * m[i]
        return h.sum()

    scores = []
    for n in ("fc1", "fc2"):
        width = params[n]["bias"].shape[0]
        unit = np.zeros(width)
        for k in ("kernel", "bias"):
            arr = params[n][k]
            for idx in np.ndindex(arr.shape):
                old = arr[idx]
                arr[idx] = old + 1e-3
                up = flow(params)
                arr[idx] = old - 1e-3
                down = flow(params)
                arr[idx] = old
                grad = (up - down) / 2e-3
                unit[idx[-1]] += abs(grad * old)
        scores.append(unit)
    return np.concatenate(scores)


def test_synflow_scores_match_a_plain_loop():
    net = tiny_mlp(seed=4, hidden=(6, 4))
    masks = {
        "fc1": np.array([1, 1, 0, 1, 1, 1], np.float32),
        "fc2": np.array([1, 0, 1, 1], np.float32),
    }
    for m in (net.space.full_masks(), masks):
        got = synflow_scores(net, m)
        want = _synflow_reference(net, m)
        np.testing.assert_allclose(got, want, rtol=1e-7, atol=1e-9)
    assert got[2] == 0.0 and got[6 + 1] == 0.0


def test_synflow_counts_every_parameter_a_group_owns():
    """SynFlow's conservation (Tanaka et al., 2020): with no biases the network
    is homogeneous in each layer's weights, so each layer's scores sum to R. The
    stem's group owns its kernel and the depthwise kernel after it: 2R in all."""
    g = GraphBuilder((6, 6, 2))
    x = g.relu(g.conv(g.input, 3, 3, use_bias=False, name="c1"))
    x = g.relu(g.conv(x, 3, 3, groups=3, use_bias=False, name="dw"))
    out = g.dense(g.global_avgpool(x), 2, use_bias=False, name="out")
    model = random_net(g.build(out), 0)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(jnp.abs, params))
    flow = reference.forward(model, np.ones((1, 6, 6, 2))).sum()
    nnx.update(model, params)
    scores = synflow_scores(model)
    assert scores.shape == (3,)
    np.testing.assert_allclose(scores.sum(), 2 * flow, rtol=1e-9)


# ------------------------------------------------------------- Paoding numerics


def two_unit_net(w1, b1, w2, b2) -> gp.Pretrained:
    """1 input -> 2 ReLU units -> 2 outputs, given weights."""
    g = GraphBuilder((1,))
    x = g.relu(g.dense(g.input, 2, name="fc1"), name="relu1")
    nodes = g.build(g.dense(x, 2, name="out"))
    layers = {
        "fc1": {
            "kernel": np.asarray(w1, np.float32),
            "bias": np.asarray(b1, np.float32),
        },
        "out": {
            "kernel": np.asarray(w2, np.float32),
            "bias": np.asarray(b2, np.float32),
        },
    }
    net = assemble(gp.models.abstract_net(nodes).nodes, layers)
    return gp.Pretrained(net, {"name": "two", "input": {"box": [0.0, 1.0]}})


def test_paoding_merge_on_two_units_equals_the_hand_computation():
    w1, b1 = [[1.0, 2.0]], [0.0, 1.0]
    w2, b2 = [[3.0, -1.0], [0.5, 2.0]], [0.1, -0.2]
    # merge unit 1 into unit 0: out = relu(x) * (w2[0] + w2[1]) + b2
    merged = merge_pair(np.array(w2), keep=0, remove=1)
    np.testing.assert_allclose(merged, [[3.5, 1.0], [0.0, 0.0]])
    net = two_unit_net(w1, b1, w2, b2)
    net.model.layers["out"].kernel[...] = jnp.asarray(merged, jnp.float32)
    small = gp.compact(net, {"fc1": np.array([True, False])})
    for x in (0.0, 0.3, 1.0):
        want = max(x, 0.0) * np.array([3.5, 1.0]) + np.array([0.1, -0.2])
        np.testing.assert_allclose(small.model(jnp.array([[x]])), [want], rtol=1e-6)
    # delta interval: h0 = x in [0, 1], h1 = 2x + 1 in [1, 3]
    h_lo, h_hi = jnp.array([0.0, 1.0]), jnp.array([1.0, 3.0])
    lo, hi = merge_delta(h_lo, h_hi, jnp.asarray(w2), 0, 1)
    # (h0 - h1) in [0 - 3, 1 - 1] = [-3, 0], times w2[1] = (0.5, 2.0)
    np.testing.assert_allclose(lo, [-1.5, -6.0])
    np.testing.assert_allclose(hi, [0.0, 0.0])
    # the original code's variant multiplies by the kept unit's weights (3, -1)
    lo, hi = merge_delta(h_lo, h_hi, jnp.asarray(w2), 0, 1, original=True)
    np.testing.assert_allclose(lo, [-9.0, 0.0])
    np.testing.assert_allclose(hi, [0.0, 3.0])
    # the true change (merged - dense) at x lies in the delta interval
    for x in np.linspace(0, 1, 11):
        h = np.array([x, 2 * x + 1])
        true = h[0] * np.array(merged[0]) - h @ np.array(w2)
        lo, hi = merge_delta(h_lo, h_hi, jnp.asarray(w2), 0, 1)
        assert np.all(lo - 1e-6 <= true) and np.all(true <= hi + 1e-6)


def test_propagated_delta_bounds_the_true_output_change():
    from gapruning.fitness.interval import propagate_bounds

    net = tiny_mlp(seed=2, hidden=(6, 4))
    x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (64, 4, 4, 1)), jnp.float32)
    dense_out = np.asarray(net.model(x))
    bounds = propagate_bounds(
        net.model, jnp.zeros((1, 4, 4, 1)), jnp.ones((1, 4, 4, 1))
    )
    bnd = {k: (v[0][0], v[1][0]) for k, v in bounds.items()}
    w2 = np.asarray(net.model.layers["fc2"].kernel[...])
    tail = tuple(n for n in net.model.nodes if n.name in ("relu2", "fc2.mask", "out"))
    params = {"out": {"kernel": net.model.layers["out"].kernel[...]}}
    masks = {"fc1": jnp.ones(6), "fc2": jnp.ones(4)}
    largest = 0.0
    for keep, remove in [(0, 3), (1, 2), (4, 5), (5, 0), (2, 4)]:
        dlo, dhi = merge_delta(*bnd["relu1"], jnp.asarray(w2), keep, remove)
        dl, du = propagate_delta(tail, params, bnd, masks, dlo, dhi)
        net.model.layers["fc2"].kernel[...] = jnp.asarray(merge_pair(w2, keep, remove))
        kept = {"fc1": np.arange(6) != remove, "fc2": np.ones(4)}
        change = np.asarray(gp.masked_apply(net, kept, x)) - dense_out
        net.model.layers["fc2"].kernel[...] = jnp.asarray(w2)
        largest = max(largest, np.abs(change).max())
        assert np.all(change >= np.asarray(dl) - 1e-4)
        assert np.all(change <= np.asarray(du) + 1e-4)
    assert largest > 1e-3


def identical_pairs_net() -> gp.Pretrained:
    """fc1 and fc2 of 4 units each, units (0, 1) and (2, 3) identical."""
    rng = np.random.default_rng(5)
    w1 = rng.normal(0, 0.5, (16, 2)).astype(np.float32)
    b1 = rng.normal(0, 0.1, 2).astype(np.float32)
    w2 = rng.normal(0, 0.5, (4, 2)).astype(np.float32)
    b2 = rng.normal(0, 0.1, 2).astype(np.float32)
    net = tiny_mlp(hidden=(4, 4))
    layers = net.model.layers
    layers["fc1"].kernel[...] = jnp.asarray(np.repeat(w1, 2, axis=1))
    layers["fc1"].bias[...] = jnp.asarray(np.repeat(b1, 2))
    layers["fc2"].kernel[...] = jnp.asarray(np.repeat(w2, 2, axis=1))
    layers["fc2"].bias[...] = jnp.asarray(np.repeat(b2, 2))
    return net


@pytest.mark.parametrize("mode", ["baseline", "impact", "stochastic"])
def test_merging_identical_units_never_changes_outputs(no_datasets, mode):
    net = identical_pairs_net()
    x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (32, 4, 4, 1)), jnp.float32)
    dense = np.asarray(net.model(x))
    result = gp.prune(
        net,
        "paoding",
        0.5,
        per_group=True,
        strategy_options={"mode": mode, "step": 1.0},
        **SMALL,
    )
    assert net.space.kept(result.masks) == {"fc1": 2, "fc2": 2}
    for g in ("fc1", "fc2"):
        m = result.masks[g]
        assert m[0] != m[1] and m[2] != m[3]
    np.testing.assert_allclose(result.pruned.model(x), dense, rtol=1e-5, atol=1e-5)


def test_pair_saliency_by_hand():
    w_in = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    w_out = np.array([[1.0], [2.0], [0.5]])
    s = pair_saliency(w_in, w_out)
    assert np.isinf(np.diag(s)).all()
    np.testing.assert_allclose(s[0, 1], 5.0 * 2.0)
    np.testing.assert_allclose(s[1, 0], 5.0 * 1.0)
    np.testing.assert_allclose(s[0, 2], 1.0 * 0.5)
    sb = pair_saliency(w_in, w_out, bias=np.array([1.0, 3.0, 1.0]))
    np.testing.assert_allclose(sb[0, 1], (5.0 + 0.5) * 2.0)


@pytest.mark.parametrize("mode", ["baseline", "impact", "stochastic"])
def test_paoding_modes_progress_to_the_budget(no_datasets, mode):
    net = tiny_mlp(seed=1, hidden=(64, 32))
    result = gp.prune(
        net, "paoding", 0.7, strategy_options={"mode": mode, "step": 0.05}, **SMALL
    )
    assert sum(net.space.kept(result.masks).values()) == round(0.3 * 96)
    details = result.search.details
    assert details["epochs"] > 1
    assert sum(details["merged_pairs"].values()) == 96 - round(0.3 * 96)
    if mode != "baseline":
        assert result.search.evaluations > 0


def test_paoding_rejects_unknown_modes(mlp):
    with pytest.raises(ValueError, match="unknown paoding mode"):
        _run(mlp, "paoding", strategy_options={"mode": "greedy"})


def test_neuron_merging_of_scaled_copies_never_changes_outputs(no_datasets):
    """Units 1 and 3 are positive multiples (0.5x) of units 0 and 2: L1 keeps 0
    and 2, and merging 1 into 0 and 3 into 2 is exact under ReLU."""
    rng = np.random.default_rng(7)
    net = tiny_mlp(hidden=(4, 4))
    for name, fan_in in (("fc1", 16), ("fc2", 4)):
        w = rng.normal(0, 0.5, (fan_in, 2)).astype(np.float32)
        b = rng.normal(0, 0.1, 2).astype(np.float32)
        scale = np.array([1.0, 0.5], np.float32)
        layer = net.model.layers[name]
        layer.kernel[...] = jnp.asarray(
            np.stack([w[:, 0], 0.5 * w[:, 0], w[:, 1], 0.5 * w[:, 1]], 1)
        )
        layer.bias[...] = jnp.asarray(np.repeat(b, 2) * np.tile(scale, 2))
    x = jnp.asarray(np.random.default_rng(1).uniform(0, 1, (32, 4, 4, 1)), jnp.float32)
    dense = np.asarray(net.model(x))
    result = gp.prune(net, "neuron_merging", 0.5, per_group=True, **SMALL)
    for g in ("fc1", "fc2"):
        np.testing.assert_array_equal(result.masks[g], [True, False, True, False])
    np.testing.assert_allclose(result.pruned.model(x), dense, rtol=1e-4, atol=1e-5)
