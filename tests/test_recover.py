"""Data-free recovery: repair (Neuron Merging / least squares) and distillation
on probes, checked against float64 loop references; the deprecated names still
give the same results."""

from __future__ import annotations

import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fitness_nets import random_net, random_unit_masks, row, tiny_all_ops, tiny_bn
from flax import nnx

import gapruning as gp
from gapruning import recover
from gapruning.augment import shift_flip
from gapruning.models import GraphBuilder
from gapruning.progress import format_seconds

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


def _kl_reference(teacher_logits, student_logits, t):
    """T^2 * mean_b KL(softmax(teacher / T) || softmax(student / T)), float64."""

    def log_softmax(z):
        z = np.asarray(z, np.float64) / t
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lp, lq = log_softmax(teacher_logits), log_softmax(student_logits)
    return t * t * float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def _inputs(net, num=64, seed=1):
    return jax.random.uniform(
        jax.random.key(seed), (num, *net.input_shape), minval=-1, maxval=1
    )


def test_merge_exact_for_positive_multiple_dense():
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
    repaired = recover.repair(net, masks, method="merge")
    np.testing.assert_allclose(
        gp.masked_apply(repaired, masks, x), dense, rtol=1e-5, atol=1e-5
    )
    small = gp.compact(repaired, masks)
    np.testing.assert_allclose(small.model(x), dense, rtol=1e-5, atol=1e-5)
    assert small.model.layers["fc2"].kernel[...].shape == (7, 6)


def test_merge_exact_in_post_batchnorm_space():
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
    repaired = recover.repair(net, masks)
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


@pytest.mark.parametrize("case", ["plain", "prior", "cross"])
def test_lstsq_update_matches_float64_normal_equations(case):
    """min ||X_k W'_k - Y W||^2 + lam ||W'_k - P_k||^2 (P = W without a prior,
    Y = X without a cross term); removed rows are those of P."""
    rng = np.random.default_rng(["plain", "prior", "cross"].index(case))
    x = rng.normal(size=(50, 7)) @ rng.normal(size=(7, 7))
    y = x + 0.3 * rng.normal(size=x.shape) if case == "cross" else x
    w = rng.normal(size=(7, 3))
    prior = rng.normal(size=(7, 3)) if case != "plain" else w
    mask = np.array([1, 0, 1, 1, 0, 1, 1], bool)
    gram = x.T @ x
    ridge = 0.05
    lam = ridge * np.mean(np.diag(gram))
    k, r = np.flatnonzero(mask), np.flatnonzero(~mask)
    want = prior.copy()
    want[k] = np.linalg.solve(
        gram[np.ix_(k, k)] + lam * np.eye(len(k)),
        x[:, k].T @ (y @ w) + lam * prior[k],
    )
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    got = recover.lstsq_update(
        f32(gram),
        f32(w),
        mask,
        ridge,
        f32(prior) if case != "plain" else None,
        f32(x.T @ y) if case == "cross" else None,
    )
    np.testing.assert_allclose(got[k], want[k], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(got[r], np.float32(prior[r]))


def _ridge_fit(xp, xd, w, keep, ridge, prior):
    """float64 reference: kept rows of ``min ||xp_k W' - xd W||^2 + lam ||W' -
    prior_k||^2``, the others those of ``prior``; ``lam`` is ``ridge`` times the
    mean of diag(xp^T xp) over all rows (``xp`` the tensor before its mask)."""
    gram = xp.T @ xp
    lam = ridge * np.mean(np.diag(gram))
    out = prior.copy()
    out[keep] = np.linalg.solve(
        gram[np.ix_(keep, keep)] + lam * np.eye(len(keep)),
        xp[:, keep].T @ (xd @ w) + lam * prior[keep],
    )
    return out


def test_sequential_lstsq_matches_float64_layer_by_layer_reference():
    """fc2 is fit on the (unpruned) fc1 features, then ``out`` on the features
    of the network with fc2 already repaired, each to the dense pre-activations."""
    net = tiny_mlp(seed=3)
    masks = {
        "fc1": np.array([1, 0, 1, 1, 0, 1, 1, 0], bool),
        "fc2": np.array([1, 1, 0, 1, 0, 1], bool),
    }
    x = np.asarray(_inputs(net, 200, seed=5), np.float64)
    p = {
        name: (
            np.asarray(net.model.layers[name].kernel[...], np.float64),
            np.asarray(net.model.layers[name].bias[...], np.float64),
        )
        for name in ("fc1", "fc2", "out")
    }
    ones = np.ones((len(x), 1))
    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    h1 = relu(x @ p["fc1"][0] + p["fc1"][1])
    want = {}
    dense_in = pruned_in = h1  # consumer inputs before their masks
    for name, group in (("fc2", "fc1"), ("out", "fc2")):
        wb = np.vstack([p[name][0], p[name][1][None]])
        keep = np.flatnonzero(np.append(masks[group], True))
        fit = _ridge_fit(
            np.hstack([pruned_in, ones]),
            np.hstack([dense_in, ones]),
            wb,
            keep,
            0.01,
            wb,
        )
        want[name] = fit
        if name == "fc2":
            dense_in = relu(h1 @ p["fc2"][0] + p["fc2"][1])
            pruned_in = relu(np.hstack([h1 * masks["fc1"], ones]) @ fit)
    repaired = recover.repair(
        net, masks, jnp.asarray(x, jnp.float32), "lstsq", prior="dense", ridge=0.01
    )
    assert repaired.card["repair"]["sequential"] is True
    for name, wb in want.items():
        layer = repaired.model.layers[name]
        np.testing.assert_allclose(layer.kernel[...], wb[:-1], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(layer.bias[...], wb[-1], rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(  # fc1 reads the input: unchanged
        repaired.model.layers["fc1"].kernel[...], net.model.layers["fc1"].kernel[...]
    )


@pytest.mark.parametrize("make", [tiny_bn, tiny_all_ops])
def test_sequential_lstsq_first_consumer_as_parallel_and_output_closer(make):
    """The first consumer sees dense inputs either way, so sequential and parallel
    fit it alike; the outputs of the sequential repair are nearer the dense ones on
    held-out probes than without repair."""
    net = make()
    masks = row(random_unit_masks(net.space, 1, 0.5, seed=3), 0)
    masks = {g: np.asarray(m, bool) for g, m in masks.items()}
    probes = gp.make_probes(net, "gaussian", 256, seed=0)
    held_out = gp.make_probes(net, "gaussian", 256, seed=7)
    seq = recover.repair(net, masks, probes, "lstsq")
    par = recover.repair(net, masks, probes, "lstsq", sequential=False)
    assert par.card["repair"]["sequential"] is False
    first = gp.models.consumers(net.model)[0].layer
    np.testing.assert_allclose(
        seq.model.layers[first].kernel[...],
        par.model.layers[first].kernel[...],
        rtol=1e-4,
        atol=1e-5,
    )
    dense = net.model(held_out)

    def error(model):
        return float(jnp.mean((gp.masked_apply(model, masks, held_out) - dense) ** 2))

    assert error(seq) < error(net)


def test_lstsq_with_merge_prior_interpolates_merge_and_lstsq():
    """A huge ridge gives Neuron Merging, a tiny one plain least squares."""
    net = tiny_mlp()
    masks = {"fc1": np.array([1, 0, 1, 1, 0, 1, 1, 0], bool), "fc2": np.ones(6, bool)}
    x = _inputs(net, 64, seed=9)
    opts = dict(method="lstsq", probes="gaussian", num_probes=256)

    def out(repaired):
        return gp.masked_apply(repaired, masks, x)

    merged = out(recover.repair(net, masks))
    far = out(recover.repair(net, masks, prior="merge", ridge=1e7, **opts))
    np.testing.assert_allclose(far, merged, rtol=1e-3, atol=1e-3)
    near = out(recover.repair(net, masks, prior="merge", ridge=1e-7, **opts))
    plain = out(recover.repair(net, masks, prior="dense", ridge=1e-7, **opts))
    np.testing.assert_allclose(near, plain, rtol=1e-3, atol=1e-3)
    assert float(jnp.abs(merged - plain).max()) > 1e-2  # the two ends differ
    with pytest.raises(recover.RecoverError, match="prior"):
        recover.repair(net, masks, prior="mean", **opts)


def _consumer_error(dense_net, pretrained, masks, x, layers):
    """Mean squared error of the consumers' pre-activations under ``masks`` in
    ``pretrained`` vs the dense network ``dense_net``."""
    _, dense = dense_net.model(x, taps=layers)
    masked = gp.forward.with_unit_masks(
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
    repaired = recover.repair(net, masks, probes=fit_probes, method="lstsq")
    layers = tuple(c.layer for c in gp.models.consumers(net.model))
    before = _consumer_error(net, net, masks, held_out, layers)
    after = _consumer_error(net, repaired, masks, held_out, layers)
    for layer in layers:
        # the first consumer sees dense inputs: its error must drop clearly
        assert after[layer] < before[layer], (layer, before, after)
    assert after[layers[0]] < 0.7 * before[layers[0]]


def test_merge_skips_coupled_groups_and_keeps_uncoupled():
    net = tiny_all_ops()
    rep = recover.Repair(net, "merge")
    coupled = {g.name for g in net.space.groups if len(g.members) > 1}
    assert coupled and not {c.group for c in rep.consumers} & coupled


@pytest.mark.parametrize("method", ["merge", "lstsq"])
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


def test_repair_errors():
    net = tiny_mlp()
    with pytest.raises(recover.RecoverError, match="unknown merge method"):
        recover.repair(net, net.space.full_masks(), method="average")
    with pytest.raises(gp.MaskError):
        recover.repair(net, {"fc1": np.ones(8, bool)})


def _leaves(net):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(net.model))]


@pytest.mark.parametrize("method", ["merge", "cosine", "lstsq"])
@pytest.mark.parametrize("sequential", [True, False])
def test_deprecated_merge_equals_repair_bit_for_bit(method, sequential):
    """``merge`` (deprecated) and the method name ``"cosine"`` (deprecated) warn
    and give exactly ``repair``'s result; the card keeps ``"cosine"`` as the name
    of Neuron Merging."""
    net = tiny_bn()
    masks = {
        g: np.asarray(m, bool)
        for g, m in row(random_unit_masks(net.space, 1, 0.5, seed=3), 0).items()
    }
    kw = dict(probes="gaussian", num_probes=64, sequential=sequential)
    new_name = "merge" if method == "cosine" else method
    want = recover.repair(net, masks, method=new_name, **kw)
    with pytest.deprecated_call(match="recover.repair"):
        old = recover.merge(net, masks, method=new_name, **kw)
    if method == "cosine":
        with pytest.deprecated_call(match='"merge"'):
            old = recover.repair(net, masks, method="cosine", **kw)
    for a, b in zip(_leaves(want), _leaves(old), strict=True):
        np.testing.assert_array_equal(a, b)
    assert old.card["repair"] == want.card["repair"]
    assert want.card["repair"]["method"] == {"merge": "cosine"}.get(new_name, new_name)


def test_cosine_prior_is_a_deprecated_name_of_merge():
    net = tiny_mlp()
    masks = {"fc1": np.array([1, 0, 1, 1, 0, 1, 1, 0], bool), "fc2": np.ones(6, bool)}
    want = recover.repair(net, masks, method="lstsq", prior="merge")
    with pytest.deprecated_call(match="prior"):
        old = recover.repair(net, masks, method="lstsq", prior="cosine")
    for a, b in zip(_leaves(want), _leaves(old), strict=True):
        np.testing.assert_array_equal(a, b)


def test_repair_aliases_and_consumers_reexport():
    """gp.prune's spellings map onto the two repair methods; the graph queries
    live in gapruning.models and are still reachable from gapruning.recover."""
    aliases = {"merge": "merge", "cosine": "merge", "lstsq": "lstsq"}
    assert recover.REPAIR_ALIASES == aliases
    assert set(recover.REPAIR_ALIASES.values()) == set(recover.REPAIR_METHODS)
    assert recover.consumers is gp.models.consumers
    assert recover.group_consumers is gp.models.group_consumers
    assert recover.Consumer is gp.models.Consumer
    rep = recover.Repair(tiny_mlp(), "merge")
    assert rep.method == "merge"


def test_distill_config_presets_follow_the_teacher():
    """A BatchNorm teacher gets BATCHNORM_PRESET, another PLAIN_PRESET; settings
    given win; resolving turns the feature term off without masks; a config and
    the same settings as keywords distill alike, bit for bit."""
    bn, mlp = tiny_conv_bn(), tiny_mlp()
    assert recover.DistillConfig.for_teacher(bn) == recover.BATCHNORM_PRESET
    assert recover.DistillConfig.for_teacher(mlp) == recover.PLAIN_PRESET
    assert recover.BATCHNORM_PRESET.learning_rate == 3e-4
    assert recover.PLAIN_PRESET.adversarial == 3
    assert recover.DistillConfig.for_teacher(bn, steps=7).steps == 7
    masks = {"c1": np.array([1, 0, 1, 1, 0], bool)}
    cfg = recover.DistillConfig(adversarial=1)
    assert cfg.resolved(bn, masks).feature_weight == 1.0
    assert cfg.resolved(bn, None).feature_weight == 0.0
    assert cfg.resolved(bn, masks).adversarial == 1
    assert cfg.resolved(bn, masks).augment is True
    assert cfg.resolved(mlp, None).augment is False
    small = gp.compact(bn, masks)
    probes = gp.make_probes(bn, "gaussian", 32, seed=0)
    config = recover.DistillConfig(steps=3, batch_size=16, mixup=0.2)
    a = recover.distill(small, bn, probes, masks=masks, config=config)
    kw = dict(steps=3, batch_size=16, mixup=0.2)
    b = recover.distill(small, bn, probes, masks=masks, **kw)
    for x, y in zip(_leaves(a), _leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.card["distill"] == b.card["distill"]
    with pytest.raises(TypeError):
        recover.distill(small, bn, probes, steps=1, not_a_setting=1)


# ------------------------------------------------------------------ in the fitness


@pytest.mark.parametrize("method", ["merge", "lstsq"])
def test_repaired_fitness_scores_the_repaired_network(method):
    """fit(pop)[i] is the fidelity (T=4 KL to the dense outputs) of individual i
    after its repair, the same repair ``merge`` gives (probe seed 1)."""
    net = tiny_bn()
    fit = gp.fitness.compose(net, "fidelity", probes="gaussian", num_probes=32)
    rfit = recover.repaired_fitness(fit, method, num_probes=64)
    pop = random_unit_masks(net.space, 2, 0.5, seed=4)
    scores = rfit(pop)
    dense = net.model(fit.probes)
    for i in range(2):
        masks = {g: np.asarray(m, bool) for g, m in row(pop, i).items()}
        repaired = recover.repair(
            net,
            masks,
            method=method,
            probes="gaussian",
            num_probes=64,
            seed=1,
            sequential=False,
        )
        logits = gp.masked_apply(repaired, masks, fit.probes)
        want = _kl_reference(dense, logits, 4.0)
        np.testing.assert_allclose(scores[i], want, rtol=1e-3, atol=1e-6)
        assert abs(float(scores[i]) - float(fit.single(row(pop, i)))) > 1e-6


# ------------------------------------------------------------------ distillation


def test_distill_lowers_kl_on_held_out_probes():
    net = tiny_bn()
    masks = {
        g: np.asarray(m, bool)
        for g, m in row(random_unit_masks(net.space, 1, 0.5, seed=5), 0).items()
    }
    small = gp.compact(net, masks)
    held_out = gp.make_probes(net, "gaussian", 256, seed=123)
    student = recover.distill(
        small,
        net,
        probes="gaussian",
        steps=60,
        num_probes=128,
        batch_size=64,
        masks=masks,
        feature_weight=0.1,
        seed=0,
        # the plain scheme: constant Adam, probes regenerated, no mixup/push
        optimizer=optax.adam(1e-3),
        regenerate=True,
        adversarial=0,
        mixup=0.0,
    )
    t = net.model(held_out)
    before = _kl_reference(t, small.model(held_out), 4.0)
    after = _kl_reference(t, student.model(held_out), 4.0)
    assert after < 0.6 * before, (before, after)
    np.testing.assert_allclose(
        recover.distill_loss(student, net, held_out), after, rtol=1e-4
    )
    assert student.card["distill"]["steps"] == 60
    # the input model is not modified
    np.testing.assert_allclose(
        small.model(held_out), gp.compact(net, masks).model(held_out), 1e-6
    )


def test_adversarial_probes_increase_kl_inside_the_box():
    net = tiny_mlp()
    masks = {"fc1": np.array([1, 0, 1, 1, 0, 1, 1, 0], bool), "fc2": np.ones(6, bool)}
    small = gp.compact(net, masks)
    x = gp.make_probes(net, "gaussian", 128, seed=3)
    pushed = recover.adversarial_probes(small, net, x, steps=3, step_size=0.05)
    assert pushed.shape == x.shape
    assert float(pushed.min()) >= -1.0 and float(pushed.max()) <= 1.0
    # each probe moved by at most steps * step_size * box width per coordinate
    assert float(jnp.abs(pushed - x).max()) <= 3 * 0.05 * 2.0 + 1e-5
    before = recover.distill_loss(small, net, x)
    after = recover.distill_loss(small, net, pushed)
    assert after > 1.5 * before, (before, after)


def test_distill_with_adversarial_and_mixup_probes_lowers_held_out_kl():
    """Trained on a fixed pool with mixup and disagreement probes, the student's
    KL drops on held-out probes of the pool's kind and on disagreement probes
    pushed from them; the card records the options."""
    net = tiny_mlp()
    masks = {"fc1": np.array([1, 0, 1, 1, 0, 1, 1, 0], bool), "fc2": np.ones(6, bool)}
    small = gp.compact(net, masks)
    pool = gp.make_probes(net, "gaussian", 128, seed=0)
    held_out = gp.make_probes(net, "gaussian", 256, seed=123)
    kw = dict(probes=pool, steps=80, batch_size=32, seed=0)
    student = recover.distill(small, net, adversarial=2, mixup=0.5, **kw)
    before = recover.distill_loss(small, net, held_out)
    after = recover.distill_loss(student, net, held_out)
    assert after < 0.6 * before, (before, after)
    hard = recover.adversarial_probes(small, net, held_out, steps=3)
    assert recover.distill_loss(student, net, hard) < 0.6 * recover.distill_loss(
        small, net, hard
    )
    card = student.card["distill"]
    assert (card["adversarial"], card["mixup"]) == (2, 0.5)
    with pytest.raises(recover.RecoverError, match="adversarial"):
        recover.distill(small, net, adversarial=-1, **kw)
    with pytest.raises(recover.RecoverError, match="mixup"):
        recover.distill(small, net, mixup=2.0, **kw)


def test_distill_settings_left_at_none_follow_batchnorm():
    """``None`` settings take the teacher's preset (``DistillConfig.for_teacher``,
    the deprecated ``DISTILL_DEFAULTS``) by whether the teacher has BatchNorm
    (the feature term only with masks); explicit values win."""
    bn, mlp = tiny_conv_bn(), tiny_mlp()
    bn_masks = {"c1": np.array([1, 0, 1, 1, 0], bool)}
    mlp_masks = {
        "fc1": np.array([1, 0, 1, 1, 0, 1, 1, 0], bool),
        "fc2": np.ones(6, bool),
    }
    keys = ("feature_weight", "recalibrate_bn", "adversarial", "learning_rate")

    def settings(net, masks, **kw):
        probes = gp.make_probes(net, "gaussian", 32, seed=0)
        student = recover.distill(
            gp.compact(net, masks), net, probes=probes, steps=1, masks=masks, **kw
        )
        return tuple(student.card["distill"][k] for k in keys)

    assert settings(bn, bn_masks) == (1.0, False, 0, 3e-4)
    assert settings(mlp, mlp_masks) == (0.0, True, 3, 1e-3)
    with pytest.deprecated_call():
        assert recover.DISTILL_DEFAULTS[True] == dict(
            zip(keys, (1.0, False, 0, 3e-4), strict=True)
        )
    assert settings(bn, bn_masks, adversarial=1, learning_rate=0.01)[2:] == (1, 0.01)
    probes = gp.make_probes(bn, "gaussian", 32, seed=0)
    no_masks = recover.distill(gp.compact(bn, bn_masks), bn, probes=probes, steps=1)
    assert no_masks.card["distill"]["feature_weight"] == 0.0
    with pytest.raises(recover.RecoverError, match="learning_rate"):
        recover.distill(gp.compact(bn, bn_masks), bn, steps=1, learning_rate=0)


def test_distill_warns_when_training_raises_the_probe_kl():
    net = tiny_mlp()
    masks = {"fc1": np.array([1, 0, 1, 1, 0, 1, 1, 0], bool), "fc2": np.ones(6, bool)}
    small = gp.compact(net, masks)
    kw = dict(probes=gp.make_probes(net, "gaussian", 64, seed=0), masks=masks)
    with pytest.warns(RuntimeWarning, match="raised the KL on the probes"):
        hurt = recover.distill(small, net, steps=20, learning_rate=30.0, **kw)
    card = hurt.card["distill"]
    assert card["kl_after"] > card["kl_before"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recover.distill(small, net, steps=20, **kw)


def test_distill_augments_image_probes_with_shifts_and_flips(monkeypatch):
    """By default (image inputs) every step's batch goes through ``shift_flip``
    with the box's low end as fill, which changes the trained student; flat
    inputs are not augmented by default and refuse ``augment=True``."""
    net = tiny_conv_bn()
    masks = {"c1": np.array([1, 0, 1, 1, 0], bool)}
    small = gp.compact(net, masks)
    kw = dict(probes=gp.make_probes(net, "gaussian", 64, seed=0), steps=6)
    calls = []

    def recording(key, x, shift=2, fill=0.0):
        calls.append((x.shape, fill))
        return shift_flip(key, x, shift, fill)

    monkeypatch.setattr(recover.distillation, "shift_flip", recording)
    augmented = recover.distill(small, net, batch_size=16, **kw)
    # the check views (all 64 probes, eagerly), then traced once in the jitted step
    assert calls == [((64, 6, 6, 2), -1.0), ((16, 6, 6, 2), -1.0)]
    assert augmented.card["distill"]["augment"] is True
    plain = recover.distill(small, net, augment=False, batch_size=16, **kw)
    assert len(calls) == 2 and plain.card["distill"]["augment"] is False
    kernel = lambda m: np.asarray(m.model.layers["c1"].kernel[...])  # noqa: E731
    assert not np.allclose(kernel(augmented), kernel(plain))
    flat = recover.distill(tiny_mlp(), tiny_mlp(), steps=1)
    assert len(calls) == 2 and flat.card["distill"]["augment"] is False
    with pytest.raises(recover.RecoverError, match="image inputs"):
        recover.distill(tiny_mlp(), tiny_mlp(), steps=1, augment=True)


def test_recalibrate_batchnorm_layer_by_layer():
    """Plain re-estimation equals each BN's batch statistics on the probes,
    computed after the earlier BNs were updated; with the dense teacher and full
    masks the shift-corrected version leaves the statistics unchanged."""
    net = tiny_bn()
    x = gp.make_probes(net, "gaussian", 64, seed=2)
    copy = gp.Pretrained(nnx.clone(net.model), dict(net.card))
    recover.recalibrate_batchnorm(copy, x)
    h = jax.nn.relu
    for name in ("b1", "b2"):
        layer = copy.model.layers[name]
        _, taps = copy.model(
            x,
            taps=(
                copy.model.nodes[[n.name for n in copy.model.nodes].index(name)].inputs[
                    0
                ],
            ),
        )
        v = np.asarray(next(iter(taps.values())), np.float64)
        axes = tuple(range(v.ndim - 1))
        np.testing.assert_allclose(layer.mean[...], v.mean(axes), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.var[...], v.var(axes), rtol=1e-3, atol=1e-5)
    del h
    same = gp.Pretrained(nnx.clone(net.model), dict(net.card))
    recover.recalibrate_batchnorm(same, x, net, net.space.full_masks())
    for name in ("b1", "b2"):
        np.testing.assert_allclose(
            same.model.layers[name].mean[...],
            net.model.layers[name].mean[...],
            rtol=1e-4,
            atol=1e-5,
        )
        np.testing.assert_allclose(
            same.model.layers[name].var[...],
            net.model.layers[name].var[...],
            rtol=1e-4,
            atol=1e-5,
        )


def test_distill_errors():
    net = tiny_mlp()
    with pytest.raises(recover.RecoverError, match="steps"):
        recover.distill(net, net, steps=0)
    with pytest.raises(recover.RecoverError, match="masks"):
        recover.distill(net, net, steps=1, feature_weight=1.0)
    with pytest.raises(recover.RecoverError, match="input shape"):
        recover.distill(net, tiny_bn(), steps=1)


# ------------------------------------------------------------------ gp.prune, CLI


def test_prune_with_repair_and_recovery():
    net = tiny_mlp()
    kw = dict(
        strategy="ga",
        target=0.5,
        fitness="fidelity",
        generations=2,
        population=4,
        num_probes=32,
        probes="gaussian",
        progress=False,
    )
    merged = gp.prune(net, repair="lstsq", **kw)
    want = gp.compact(
        recover.repair(
            net, merged.masks, method="lstsq", probes="gaussian", num_probes=32, seed=1
        ),
        merged.masks,
    )
    x = _inputs(net)
    np.testing.assert_allclose(merged.pruned.model(x), want.model(x), 1e-5, 1e-5)
    assert merged.settings["repair"] == "lstsq"
    # the search scored repaired individuals: its best fitness is the repaired one
    fit = gp.fitness.compose(net, "fidelity", probes="gaussian", num_probes=32)
    rfit = recover.repaired_fitness(fit, "lstsq", num_probes=32, seed=1)
    best = {g: jnp.asarray(m, jnp.float32) for g, m in merged.masks.items()}
    np.testing.assert_allclose(merged.search.best_fitness, rfit.single(best), 1e-5)
    assert abs(merged.search.best_fitness - float(fit.single(best))) > 1e-6
    # the all-at-once repair the search scored, on request
    scored = gp.prune(
        net, repair="lstsq", recover_options={"merge": {"sequential": False}}, **kw
    )
    chosen = {g: jnp.asarray(m, jnp.float32) for g, m in scored.masks.items()}
    want = gp.masked_apply(rfit.repair(chosen), chosen, x)
    np.testing.assert_allclose(scored.pruned.model(x), want, 1e-5, 1e-5)
    distilled = gp.prune(
        net,
        recover=("merge", "distill"),
        recover_options={
            "distill": {"steps": 3, "num_probes": 32, "probes": "gaussian"}
        },
        **kw,
    )
    assert distilled.pruned.card["distill"]["steps"] == 3
    assert distilled.pruned.card["repair"]["method"] == "cosine"
    with pytest.raises(ValueError, match="unknown recover"):
        gp.prune(net, recover=("finetune",), **kw)
    with pytest.raises(ValueError, match="one merge method"):
        gp.prune(net, repair="merge", recover=("lstsq",), **kw)


def test_cli_repair_and_distill_flags(tmp_path, monkeypatch):
    from gapruning import cli, zoo

    net = tiny_mlp()
    zoo.save(net, tmp_path / "mlp")
    out = tmp_path / "run"
    cli.main(
        [
            "prune",
            "--model",
            str(tmp_path / "mlp"),
            "--target",
            "0.5",
            "--generations",
            "2",
            "--population",
            "4",
            "--num-probes",
            "32",
            "--probes",
            "gaussian",
            "--fitness",
            "fidelity",
            "--repair",
            "merge",
            "--distill-steps",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    pruned = gp.load(out / "model")
    assert pruned.card["distill"]["steps"] == 2
    assert pruned.card["repair"]["method"] == "cosine"


def test_cli_default_recovery_repairs_then_distills(tmp_path, capsys):
    """Without recovery flags the result gets the default recovery: least
    squares, then as many distillation steps as the search's probe evaluations
    pay for, each stage named as it starts (unless --quiet); --no-recover keeps
    the found weights."""
    import json

    from gapruning import cli, zoo
    from gapruning.defaults import default_distill_steps

    net = tiny_mlp()
    zoo.save(net, tmp_path / "mlp")
    base = ["prune", "--model", str(tmp_path / "mlp"), "--target", "0.5"]
    sizes = ["--generations", "60", "--population", "8", "--num-probes", "512"]
    capsys.readouterr()
    cli.main([*base, *sizes, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert f"repairing {net.name} (lstsq)" in err
    assert "inversion probes of" in err and "for all" in err
    card = gp.load(tmp_path / "run" / "model").card
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    steps = default_distill_steps(net, report["search"]["evaluations"] * 512)
    assert steps >= 100 and card["distill"]["steps"] == steps
    assert card["repair"]["method"] == "lstsq"
    plain = [*base, *sizes, "--no-recover", "--out", str(tmp_path / "plain")]
    cli.main([*plain, "--quiet"])
    assert "probes of" not in capsys.readouterr().err
    card = gp.load(tmp_path / "plain" / "model").card
    assert "repair" not in card and "distill" not in card


def test_solve_under_vmap_equals_a_loop_of_solves():
    """The population's ridge solves (a per-example loop on CPU) equal one
    float64 solve per example, with the matrix batched or shared."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 7, 7))
    a = x @ x.transpose(0, 2, 1) + 7 * np.eye(7)
    rhs = rng.normal(size=(5, 7, 3))
    batched = jax.vmap(recover.lstsq.solve_pos)(jnp.asarray(a, jnp.float32), rhs)
    shared = jax.vmap(recover.lstsq.solve_pos, in_axes=(None, 0))(a[0], rhs)
    for i in range(5):
        np.testing.assert_allclose(batched[i], np.linalg.solve(a[i], rhs[i]), atol=1e-5)
        np.testing.assert_allclose(shared[i], np.linalg.solve(a[0], rhs[i]), atol=1e-5)


_TWO_REPAIRS = """
import jax, jax.numpy as jnp
from gapruning.recover import lstsq_update
def spd(key, n):
    x = jax.random.normal(key, (32, n, n))
    return x @ x.transpose(0, 2, 1)
def two(g1, g2, w1, w2, m1, m2):
    fit = jax.vmap(lambda g, w, m: lstsq_update(g, w, m, 0.01))
    return fit(g1, w1, m1), fit(g2, w2, m2)
k = jax.random.split(jax.random.key(0), 4)
args = (spd(k[0], 301), spd(k[1], 101),
        jax.random.normal(k[2], (32, 301, 100)), jax.random.normal(k[3], (32, 101, 10)),
        jnp.ones((32, 301)).at[:, ::2].set(0), jnp.ones((32, 101)).at[:, ::2].set(0))
f = jax.jit(two)
for _ in range(100):
    jax.block_until_ready(f(*args))
print("done")
"""


def test_concurrent_population_repairs_do_not_deadlock():
    """Two consumers' least-squares repairs vmapped over a population in one
    program: with jaxlib 0.10's batched CPU solves this hung within a few calls
    on a 2-core CPU (both pool threads waiting on their own batch tasks)."""
    done = subprocess.run(
        [sys.executable, "-c", _TWO_REPAIRS],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "done"


def test_distill_prints_its_expected_time_after_two_steps(monkeypatch):
    from gapruning.recover import distillation

    # start; steps 0 and 1 (both may compile); steps 2 and 3 (2 s each)
    clock = iter([0.0, 10.0, 20.0, 22.0, 24.0])
    monkeypatch.setattr(distillation.time, "perf_counter", lambda: next(clock))
    timer = distillation.StepTimer(304)
    assert [timer.estimate(i) for i in range(3)] == [None] * 3
    # 24 s so far, then 300 more steps at 2 s each
    assert timer.estimate(3) == "distill: 304 steps, about 10.4 min in all"
    assert format_seconds(42) == "42 s"
    assert format_seconds(3 * 3600) == "3.0 h"


def test_default_prune_makes_its_bn_stats_probes_once(monkeypatch):
    """A default run on a BatchNorm network searches, repairs and distills on one
    ``bn_stats`` probe set: made once, not again for the repair or distillation;
    a distillation that regenerates its probes makes the later epochs' sets."""
    from gapruning import probes as probes_module

    made = []
    generate = probes_module._generate

    def counting(pretrained, kind, num, seed, cfg):
        made.append((kind, num, seed))
        return generate(pretrained, kind, num, seed, cfg)

    monkeypatch.setattr(probes_module, "_generate", counting)
    probes_module.clear_probe_cache()
    net = tiny_bn()
    sizes = dict(generations=10, population=4, num_probes=16, progress=False)
    distill = {"distill": {"steps": 2}}
    result = gp.prune(
        net, target=0.5, recover=("auto", "distill"), recover_options=distill, **sizes
    )
    assert result.pruned.card["repair"]["method"] == "lstsq"
    assert result.pruned.card["distill"]["probes"] == "bn_stats"
    assert made == [("bn_stats", 16, 0)]
    small = gp.compact(net, result.masks)
    options = dict(num_probes=16, batch_size=8, steps=4, regenerate=True)
    recover.distill(small, net, "bn_stats", **options)
    assert made == [("bn_stats", 16, 0), ("bn_stats", 16, 1)]
