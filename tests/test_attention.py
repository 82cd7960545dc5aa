"""Attention heads as prunable units: masking a head equals removing it (against
a float64 loop over the kept heads, and against torchvision's ViT with the head
removed), compaction keeps whole heads with exact costs, and unsupported
attention variants fail in one line naming the module."""

import copy

import jax.numpy as jnp
import numpy as np
import pytest
from test_ops import random_pretrained

import gapruning as gp
from gapruning.models import GraphBuilder

HEADS, HEAD_DIM, WIDTH = 3, 4, 6
INPUT = (4, 4, 2)


def attention_net():
    """Patch tokens (2x2), a class token, position embedding, three heads of
    four channels, the output projection and a head on the class token."""
    g = GraphBuilder(INPUT)
    x = g.conv(g.input, WIDTH, 2, strides=2, padding="VALID", name="patch")
    x = g.pos_embedding(g.class_token(g.tokens(x)), name="pos")
    q, k, v = (g.dense(x, HEADS * HEAD_DIM, name=t) for t in "qkv")
    a = g.attention(q, k, v, HEADS, name="attn")
    out = g.dense(g.select_token(g.dense(a, WIDTH, name="proj")), 3, name="out")
    return random_pretrained(g.build(out))


def reference(net, x, kept):
    """The network's output in float64 with only the ``kept`` heads, each head
    computed on its own (a loop), the removed ones absent."""
    _, taps = net.model(x, taps=("pos",))
    h = np.asarray(taps["pos"], np.float64)
    p = {
        k: {n: np.asarray(v, np.float64) for n, v in d.items()}
        for k, d in params(net).items()
    }
    y = np.zeros((*h.shape[:-1], WIDTH)) + p["proj"]["bias"]
    for head in kept:
        cols = slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)
        q, k, v = (h @ p[t]["kernel"][:, cols] + p[t]["bias"][cols] for t in "qkv")
        s = q @ k.transpose(0, 2, 1) / np.sqrt(HEAD_DIM)
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        y += (w @ v) @ p["proj"]["kernel"][cols]
    return y[:, 0] @ p["out"]["kernel"] + p["out"]["bias"]


def params(net):
    return {
        name: {"kernel": layer.kernel[...], "bias": layer.bias[...]}
        for name, layer in net.model.layers.items()
        if name in ("q", "k", "v", "proj", "out")
    }


def inputs(n=5):
    x = np.random.default_rng(1).normal(size=(n, *INPUT))
    return jnp.asarray(x, jnp.float32)


def test_the_heads_are_one_group_of_units():
    space = attention_net().space
    assert [(g.name, g.size, g.kind) for g in space.groups] == [
        ("stream", WIDTH, "conv"),
        ("attn", HEADS, "heads"),
        ("proj", WIDTH, "dense"),
    ]
    assert {space.group_of(t) for t in ("q", "k", "v", "attn")} == {"attn"}
    assert space.unit_width("attn") == HEAD_DIM
    assert space.unit_ref("attn") == [(HEAD_DIM, 1)]


@pytest.mark.parametrize("kept", [(0, 1, 2), (0, 2), (1,)])
def test_a_masked_head_equals_the_head_removed(kept):
    net, x = attention_net(), inputs()
    masks = net.space.full_masks()
    masks["attn"] = np.isin(np.arange(HEADS), kept)
    want = reference(net, x, kept)
    got = np.asarray(gp.masked_apply(net, masks, x), np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    small = gp.compact(net, masks)
    np.testing.assert_allclose(np.asarray(small.model(x)), want, rtol=1e-5, atol=1e-5)


def test_compaction_removes_whole_heads_with_exact_costs():
    net = attention_net()
    masks = net.space.full_masks()
    masks["attn"] = np.array([True, False, True])
    masks["stream"][[1, 4]] = False
    small = gp.compact(net, masks)
    node = next(n for n in small.model.nodes if n.op == "attention")
    assert (node.attr("heads"), node.attr("head_dim")) == (2, HEAD_DIM)
    assert small.model.layers["q"].kernel[...].shape == (4, 2 * HEAD_DIM)
    assert small.model.layers["proj"].kernel[...].shape == (2 * HEAD_DIM, WIDTH)
    assert net.space.params(masks) == gp.param_count(small)
    t, c, kept = 5, 4, 2 * HEAD_DIM  # tokens, kept patch channels, head channels
    flops = 4 * (2 * 2 * 2 * c) + 3 * t * c * kept + 2 * t * t * kept
    flops += t * kept * WIDTH + WIDTH * 3
    assert net.space.flops(masks) == flops
    assert small.space.dense_flops == flops


def test_attention_needs_equal_shapes_and_whole_heads():
    g = GraphBuilder((5, 6))
    q, k = g.dense(g.input, 6), g.dense(g.input, 4)
    with pytest.raises(ValueError, match="q, k and v must have one shape"):
        g.attention(q, k, k, 2)
    with pytest.raises(ValueError, match="a multiple of the heads"):
        g.attention(q, q, q, 4)


# ------------------------------------------------------------ torchvision's ViT


def test_a_masked_vit_head_equals_torch_with_the_head_removed():
    torch = pytest.importorskip("torch")
    from convert_nets import inputs as torch_inputs
    from convert_nets import rel_diff, tiny_vit, torch_out

    module = tiny_vit(heads=4)
    net = gp.convert.from_torch(module, input_shape=(32, 32, 3))
    group = "encoder_layers_encoder_layer_1_self_attention"
    masks = net.space.full_masks()
    masks[group][2] = False
    removed = copy.deepcopy(module)
    with torch.no_grad():  # head 2's channels no longer reach the projection
        removed.encoder.layers[1].self_attention.out_proj.weight[:, 8:12] = 0.0
    x, x_fw = torch_inputs((32, 32, 3), n=3)
    want = torch_out(removed, x_fw)
    assert rel_diff(gp.masked_apply(net, masks, jnp.asarray(x)), want) <= 1e-4
    assert rel_diff(torch_out(module, x_fw), want) > 1e-3  # the head mattered


def _module(attention, call):
    torch = pytest.importorskip("torch")

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Conv2d(3, 8, 4, stride=4)
            self.attn = attention
            self.fc = torch.nn.Linear(8, 2)

        def forward(self, x):
            t = self.proj(x).flatten(2).transpose(1, 2)
            return self.fc(call(self.attn, t)[0][:, 0])

    return Net().eval()


@pytest.mark.parametrize(
    "kw, call, match",
    [
        ({"batch_first": False}, lambda a, t: a(t, t, t), "batch_first=False"),
        ({"batch_first": True}, lambda a, t: a(t, t.relu(), t), "not self-attention"),
        ({"batch_first": True, "add_bias_kv": True}, lambda a, t: a(t, t, t), "bias_k"),
        ({"batch_first": True, "kdim": 4}, lambda a, t: a(t, t, t), "kdim/vdim"),
    ],
)
def test_unsupported_attention_fails_naming_the_module(kw, call, match):
    torch = pytest.importorskip("torch")
    from gapruning.convert import UnsupportedLayerError

    attention = torch.nn.MultiheadAttention(8, 2, **kw)
    with pytest.raises(UnsupportedLayerError, match=f"'attn'.*{match}") as err:
        gp.convert.from_torch(_module(attention, call), input_shape=(8, 8, 3))
    assert "\n" not in str(err.value)


def test_unsupported_vit_variant_fails_naming_the_module():
    pytest.importorskip("torch")
    from convert_nets import tiny_vit

    from gapruning.convert import UnsupportedLayerError

    with pytest.raises(UnsupportedLayerError, match=r"'heads\.act' \(Tanh\)") as err:
        gp.convert.from_torch(tiny_vit(representation_size=8), input_shape=(32, 32, 3))
    assert "\n" not in str(err.value)
