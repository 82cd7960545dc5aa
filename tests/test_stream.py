"""A Vision Transformer's residual stream is one prunable group: LayerNorm
normalizes over the kept channels (against a float64 loop), so the masked
network equals the compacted, narrower one, with exact costs, sound interval
bounds, and exports of the compacted model (GraphBuilder's ``vit`` and
torchvision's)."""

import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx
from test_ops import random_masks, random_pretrained

import gapruning as gp
from gapruning.fitness.interval import (
    impact_bounds,
    interval_bounds,
    propagate_bounds,
)
from gapruning.models import GraphBuilder
from gapruning.models.builder import Node
from gapruning.models.ops import OPS
from gapruning.models.ops.layernorm import normalize, normalized_bounds
from gapruning.models.vit import vit

SHAPE = (8, 8, 1)
WIDTH = 8


def small_vit(seed=0):
    nodes = vit(input_shape=SHAPE, patch=4, width=WIDTH, depth=2, heads=2, mlp=8)
    return random_pretrained(nodes, seed)


def inputs(n=6, shape=SHAPE, seed=1):
    return jnp.asarray(np.random.default_rng(seed).random((n, *shape)), jnp.float32)


def stream_masks(net, seed):
    """Random masks of every group, the stream keeping 3 to 7 of its 8."""
    masks = random_masks(net.space, seed)
    rng = np.random.default_rng(seed)
    keep = rng.permutation(WIDTH)[: rng.integers(3, WIDTH)]
    masks["stream"] = np.isin(np.arange(WIDTH), keep)
    return masks


def test_the_vit_stream_is_one_group():
    space = small_vit().space
    stream = space.groups[0]
    assert (stream.name, stream.size, stream.kind) == ("stream", WIDTH, "conv")
    assert stream.members == ("patch", "b0_proj", "b0_fc2", "b1_proj", "b1_fc2")
    nodes = [n.name for n in space.nodes if n.op in ("layernorm", "add")]
    nodes += ["tokens", "cls", "cls_out"]
    assert {space.group_of(t) for t in nodes} == {"stream"}
    for n in space.nodes:  # every LayerNorm reads the stream through its mask
        if n.op == "layernorm":
            assert space.node(n.inputs[0]).attr("group") == "stream"
    names = [g.name for g in space.groups]
    assert names == ["stream", "b0_attention", "b0_fc1", "b1_attention", "b1_fc1"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_masked_stream_equals_the_compacted_vit(seed):
    net, x = small_vit(), inputs()
    masks = stream_masks(net, seed)
    kept = int(masks["stream"].sum())
    small = gp.compact(net, masks)
    got = np.asarray(small.model(x))
    want = np.asarray(gp.masked_apply(net, masks, x))
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    assert np.abs(want - np.asarray(net.model(x))).max() > 1e-3  # it mattered
    assert net.space.params(masks) == gp.param_count(small) < net.space.dense_params
    assert net.space.flops(masks) == reference.flops(small.model)
    layers = small.model.layers
    for ln in ("b0_ln1", "b1_ln2", "ln"):
        assert layers[ln].scale[...].shape == layers[ln].bias[...].shape == (kept,)
    assert layers["cls"].embedding[...].shape == (1, kept)
    assert layers["patch"].kernel[...].shape[-1] == kept
    assert layers["out"].kernel[...].shape == (kept, 10)
    assert small.space.groups[0].size == kept


def _loop_reference(x, mask, scale, bias, eps):
    """LayerNorm in float64, each row over its kept channels; bias elsewhere."""
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    kept = np.flatnonzero(mask)
    out = np.tile(np.asarray(bias, np.float64), (len(x), 1))
    for i, row in enumerate(x):
        v = row[kept]
        mean = sum(v) / len(v)
        var = sum((a - mean) ** 2 for a in v) / len(v)
        out[i, kept] = (v - mean) / np.sqrt(var + eps) * scale[kept] + bias[kept]
    return out


def _layernorm(c, eps):
    rng = np.random.default_rng(c)
    node = Node("layernorm", "ln", ("x",), (5, c), (("epsilon", eps),))
    scale = rng.uniform(0.5, 1.5, c).astype(np.float32)
    bias = rng.normal(0, 0.3, c).astype(np.float32)
    x = (rng.normal(0, 2, (3, 5, c)) + rng.normal(0, 3, c)).astype(np.float32)
    return node, scale, bias, x


@pytest.mark.parametrize("c, eps", [(8, 1e-6), (5, 1e-5), (16, 1e-3)])
def test_masked_layernorm_is_layernorm_over_the_kept_channels(c, eps):
    node, scale, bias, x = _layernorm(c, eps)
    for seed in range(3):
        mask = np.random.default_rng(seed).random(c) < 0.6
        mask[seed % c] = True
        p = {"scale": scale, "bias": bias, "mask": jnp.asarray(mask, jnp.float32)}
        # masked readers: the input arrives zero at the removed channels
        got = OPS["layernorm"].apply(node, p, [jnp.asarray(x * mask)])
        want = _loop_reference(x, mask, scale, bias, eps)
        np.testing.assert_allclose(
            np.asarray(got).reshape(want.shape), want, rtol=1e-5, atol=1e-5
        )


def test_all_channels_kept_is_the_plain_layernorm():
    node, scale, bias, x = _layernorm(12, 1e-6)
    layer = nnx.LayerNorm(12, epsilon=1e-6, rngs=nnx.Rngs(0))
    layer.scale[...], layer.bias[...] = jnp.asarray(scale), jnp.asarray(bias)
    plain = np.asarray(layer(jnp.asarray(x)))
    ln = OPS["layernorm"]
    p = {"scale": scale, "bias": bias}
    ones = ln.apply(node, {**p, "mask": jnp.ones(12)}, [jnp.asarray(x)])
    unmasked = ln.apply(node, {**p, "mask": None}, [jnp.asarray(x)])
    np.testing.assert_array_equal(np.asarray(ones), np.asarray(unmasked))
    np.testing.assert_allclose(np.asarray(ones), plain, rtol=1e-5, atol=2e-6)
    want = _loop_reference(x, np.ones(12, bool), scale, bias, 1e-6)
    np.testing.assert_allclose(np.asarray(ones).reshape(want.shape), want, atol=2e-6)


def test_masked_layernorm_bounds_contain_every_normalized_point():
    """float64 sampling, box corners included, over the kept channels (zero at
    the removed ones), and a point box (exact value)."""
    rng = np.random.default_rng(0)
    for c, eps in ((3, 1e-5), (6, 1e-3), (16, 1e-6), (4, 0.0)):
        mask = rng.random(c) < 0.6
        mask[:2] = True
        m = jnp.asarray(mask, jnp.float32)
        centre, radius = rng.normal(0, 2, (1, c)), rng.uniform(0, 1.5, (1, c))
        lo, hi = centre - radius, centre + radius
        corners = rng.integers(0, 2, (200, c))
        x = np.concatenate([rng.uniform(lo, hi, (2000, c)), np.where(corners, hi, lo)])
        z = np.zeros_like(x)
        v = x[:, mask]
        z[:, mask] = (v - v.mean(-1, keepdims=True)) / np.sqrt(
            v.var(-1, keepdims=True) + eps
        )
        z_lo, z_hi = map(np.asarray, normalized_bounds(lo, hi, eps, m))
        assert np.all(z >= z_lo - 1e-5) and np.all(z <= z_hi + 1e-5)
        assert np.all(z_hi - z_lo <= 2 * np.sqrt(mask.sum() - 1) + 1e-5)
        assert np.all(z_lo[:, ~mask] == 0) and np.all(z_hi[:, ~mask] == 0)
        point = normalized_bounds(centre, centre, eps, m)
        want = normalize(jnp.asarray(centre, jnp.float32), m, eps)
        np.testing.assert_allclose(point[0], want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(point[1], want, rtol=1e-5, atol=1e-5)


def test_interval_bounds_of_a_pruned_stream_contain_the_outputs():
    net = small_vit()
    masks = {k: v.astype(np.float32) for k, v in stream_masks(net, 0).items()}
    x = inputs(256, seed=2)
    y = np.asarray(gp.masked_apply(net, masks, x))
    lo, hi = map(np.asarray, interval_bounds(net, masks, 0.0, 1.0))
    assert np.all(y >= lo - 1e-4) and np.all(y <= hi + 1e-4)
    box = jnp.zeros((1, *SHAPE)), jnp.ones((1, *SHAPE))
    dl, du = impact_bounds(net.model, masks, propagate_bounds(net.model, *box))
    diff = y - np.asarray(net.model(x))
    assert np.all(diff >= np.asarray(dl) - 1e-4)
    assert np.all(diff <= np.asarray(du) + 1e-4)


def test_softmax_keeps_the_stream_unprunable():
    def net(softmax):
        g = GraphBuilder(SHAPE)
        x = g.tokens(g.conv(g.input, 6, 4, strides=4, padding="VALID", name="p"))
        h = g.layernorm(x)
        h = g.softmax(h) if softmax else h
        return random_pretrained(g.build(g.dense(g.select_token(h), 3)))

    assert net(False).space.group_of("p") == "stream"
    assert net(True).space.group_of("p") is None
    assert net(True).space.groups == ()


# ------------------------------------------------------------ torchvision's ViT


def test_torchvision_vit_stream_pruned_compacted_and_exported(tmp_path):
    pytest.importorskip("torch")
    from convert_nets import inputs as torch_inputs
    from convert_nets import rel_diff, tiny_vit, torch_out

    from gapruning.convert import ConversionError, to_onnx, to_torch_module

    net = gp.convert.from_torch(tiny_vit(), input_shape=(32, 32, 3))
    masks = net.space.full_masks()
    masks["stream"][[0, 3, 4, 9, 15]] = False
    x, x_fw = torch_inputs((32, 32, 3), n=3)
    want = np.asarray(gp.masked_apply(net, masks, jnp.asarray(x)))
    small = gp.compact(net, masks)
    got = np.asarray(small.model(jnp.asarray(x)))
    assert rel_diff(got, want) <= 1e-5
    assert rel_diff(want, np.asarray(net.model(jnp.asarray(x)))) > 1e-3
    assert gp.param_count(small) == net.space.params(masks)
    module = to_torch_module(small)
    assert module.encoder_ln.normalized_shape == (11,)
    assert rel_diff(torch_out(module, x_fw), got) <= 1e-5
    ort = pytest.importorskip("onnxruntime")
    path = to_onnx(small, tmp_path / "small.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert rel_diff(sess.run(None, {"input": x_fw})[0], got) <= 1e-5
    for g, m in masks.items():  # masked, not compacted
        net.model.masks[g][...] = jnp.asarray(m, jnp.float32)
    assert rel_diff(torch_out(to_torch_module(net), x_fw), want) <= 1e-5
    with pytest.raises(ConversionError, match="channels masked.*compact"):
        to_onnx(net, tmp_path / "masked.onnx")
