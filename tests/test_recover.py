"""Data-free recovery: merging compensation (cosine / least squares) and
distillation on probes, checked against float64 loop references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fitness_nets import random_net, random_unit_masks, row, tiny_all_ops, tiny_bn

import gapruning as gp
from gapruning import recover
from gapruning.models import GraphBuilder

pytestmark = pytest.mark.usefixtures("no_datasets")


def tiny_mlp(seed: int = 0) -> gp.Pretrained:
    """6 -> 8 -> 6 -> 4 ReLU MLP."""
    g = GraphBuilder((6,))
    x = g.relu(g.dense(g.input, 8, name="fc1"), name="r1")
    x = g.relu(g.dense(x, 6, name="fc2"), name="r2")
    net = random_net(g.build(g.dense(x, 4, name="out")), seed)
    return gp.Pretrained(net, {"name": "mlp", "input": {"box": [-1.0, 1.0]}})


def tiny_conv_bn(seed: int = 0) -> gp.Pretrained:
    """conv5-BN-ReLU-maxpool-flatten-dense3 on 6x6x2."""
    g = GraphBuilder((6, 6, 2))
    x = g.relu(g.batchnorm(g.conv(g.input, 5, 3, name="c1"), name="b1"), name="r1")
    x = g.flatten(g.maxpool(x, 2, name="p1"), name="fl")
    net = random_net(g.build(g.dense(x, 3, name="out")), seed)
    return gp.Pretrained(net, {"name": "convbn", "input": {"box": [-1.0, 1.0]}})


def _inputs(net, num=64, seed=1):
    return jax.random.uniform(
        jax.random.key(seed), (num, *net.input_shape), minval=-1, maxval=1
    )


def test_cosine_merge_exact_for_positive_multiple_dense():
    net = tiny_mlp()
    fc1 = net.model.layers["fc1"]
    fc1.kernel[...] = fc1.kernel[...].at[:, 5].set(2.5 * fc1.kernel[...][:, 2])
    fc1.bias[...] = fc1.bias[...].at[5].set(2.5 * fc1.bias[...][2])
    masks = net.space.full_masks()
    masks["fc1"][5] = False
    x = _inputs(net)
    dense = net.model(x)
    unrepaired = gp.masked_apply(net, masks, x)
    assert float(jnp.abs(unrepaired - dense).max()) > 1e-2  # the unit mattered
    repaired = recover.merge(net, masks, method="cosine")
    np.testing.assert_allclose(
        gp.masked_apply(repaired, masks, x), dense, rtol=1e-5, atol=1e-5
    )
    small = gp.compact(repaired, masks)
    np.testing.assert_allclose(small.model(x), dense, rtol=1e-5, atol=1e-5)
    assert small.model.layers["fc2"].kernel[...].shape == (7, 6)


def test_cosine_merge_exact_in_post_batchnorm_space():
    """Channel 4 has the same conv kernel as channel 1 but 1.7x the BN scale and
    shift: only merging in the post-BN space (scale 1.7, not 1) is exact."""
    net = tiny_conv_bn()
    c1, b1 = net.model.layers["c1"], net.model.layers["b1"]
    c1.kernel[...] = c1.kernel[...].at[..., 4].set(c1.kernel[...][..., 1])
    c1.bias[...] = c1.bias[...].at[4].set(c1.bias[...][1])
    for name, factor in (("mean", 1), ("var", 1), ("scale", 1.7), ("bias", 1.7)):
        v = getattr(b1, name)
        v[...] = v[...].at[4].set(factor * v[...][1])
    masks = {"c1": np.array([1, 1, 1, 1, 0], bool)}
    x = _inputs(net)
    repaired = recover.merge(net, masks)
    np.testing.assert_allclose(
        gp.masked_apply(repaired, masks, x), net.model(x), rtol=1e-5, atol=1e-5
    )


def _merge_matrix_reference(v, mask, threshold):
    """Neuron Merging as loops in float64: removed j -> most cosine-similar kept
    i, scale ||v_j|| / ||v_i||."""
    v = np.asarray(v, np.float64)
    n = len(v)
    z = np.eye(n)
    kept = np.flatnonzero(mask)
    for j in np.flatnonzero(~mask):
        cos = [v[j] @ v[i] / np.linalg.norm(v[j]) / np.linalg.norm(v[i]) for i in kept]
        i = kept[int(np.argmax(cos))]
        if max(cos) > threshold:
            z[i, j] += np.linalg.norm(v[j]) / np.linalg.norm(v[i])
    return z


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3])
def test_merge_matrix_matches_loop_reference(threshold):
    rng = np.random.default_rng(0)
    v = rng.normal(size=(9, 5))
    mask = rng.uniform(size=9) < 0.5
    mask[0] = True
    norms = np.linalg.norm(v, axis=1)
    unit = v / norms[:, None]
    z = recover.merge_matrix(
        jnp.asarray(unit @ unit.T, jnp.float32),
        jnp.asarray(norms, jnp.float32),
        jnp.asarray(mask, jnp.float32),
        threshold,
    )
    np.testing.assert_allclose(z, _merge_matrix_reference(v, mask, threshold), 1e-5)


def test_lstsq_update_matches_float64_normal_equations():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 7)) @ rng.normal(size=(7, 7))
    w = rng.normal(size=(7, 3))
    mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    gram = x.T @ x
    ridge = 0.05
    lam = ridge * np.mean(np.diag(gram))
    k, r = np.flatnonzero(mask), np.flatnonzero(~mask)
    # min ||X_k W'_k - X W||^2 + lam ||W'_k - W_k||^2
    want = w.copy()
    want[k] = np.linalg.solve(
        gram[np.ix_(k, k)] + lam * np.eye(len(k)), x[:, k].T @ (x @ w) + lam * w[k]
    )
    got = recover.lstsq_update(
        jnp.asarray(gram, jnp.float32), jnp.asarray(w, jnp.float32), mask, ridge
    )
    np.testing.assert_allclose(got[k], want[k], rtol=2e-3, atol=2e-3)
    np.testing.assert_array_equal(got[r], np.float32(w[r]))


def _consumer_error(dense_net, pretrained, masks, x, layers):
    """Mean squared error of the consumers' pre-activations under ``masks`` in
    ``pretrained`` vs the dense network ``dense_net``."""
    _, dense = dense_net.model(x, taps=layers)
    masked = gp.forward._with_unit_masks(
        pretrained.model, {g: jnp.asarray(m, jnp.float32) for g, m in masks.items()}
    )
    _, pruned = masked(x, taps=layers)
    return {k: float(jnp.mean((pruned[k] - dense[k]) ** 2)) for k in layers}


@pytest.mark.parametrize("make", [tiny_mlp, tiny_bn, tiny_all_ops])
def test_lstsq_reduces_next_layer_error_on_held_out_probes(make):
    net = make()
    masks = row(random_unit_masks(net.space, 1, 0.5, seed=3), 0)
    masks = {g: np.asarray(m, bool) for g, m in masks.items()}
    fit_probes = gp.make_probes(net, "gaussian", 256, seed=0)
    held_out = gp.make_probes(net, "gaussian", 256, seed=7)
    repaired = recover.merge(net, masks, probes=fit_probes, method="lstsq")
    layers = tuple(c.layer for c in recover.consumers(net.model))
    before = _consumer_error(net, net, masks, held_out, layers)
    after = _consumer_error(net, repaired, masks, held_out, layers)
    for layer in layers:
        # the first consumer sees dense inputs: its error must drop clearly
        assert after[layer] < before[layer], (layer, before, after)
    assert after[layers[0]] < 0.7 * before[layers[0]]


def test_cosine_skips_coupled_groups_and_keeps_uncoupled():
    net = tiny_all_ops()
    rep = recover.Repair(net, "cosine")
    coupled = {g.name for g in net.space.groups if len(g.members) > 1}
    assert coupled and not {c.group for c in rep.consumers} & coupled


@pytest.mark.parametrize("method", ["cosine", "lstsq"])
def test_repair_vmaps_over_a_population(method):
    net = tiny_bn()
    rep = recover.Repair(net, method, probes="gaussian", num_probes=64)
    pop = random_unit_masks(net.space, 3, 0.5, seed=2)
    batched = jax.jit(jax.vmap(rep.layers))(pop)
    for i in range(3):
        single = rep.layers(row(pop, i))
        for layer, params in single.items():
            for k, v in params.items():
                np.testing.assert_allclose(batched[layer][k][i], v, 1e-4, 1e-5)


def test_merge_errors():
    net = tiny_mlp()
    with pytest.raises(recover.RecoverError, match="unknown merge method"):
        recover.merge(net, net.space.full_masks(), method="average")
    with pytest.raises(gp.MaskError):
        recover.merge(net, {"fc1": np.ones(8, bool)})
