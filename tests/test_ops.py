"""Contract tests of the op table: every registered op, in a small network, is
compacted exactly, costed exactly, bounded soundly and exported faithfully."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx

import gapruning as gp
from gapruning.compact import param_count
from gapruning.convert.common import build_pretrained
from gapruning.fitness.base import FitnessError
from gapruning.fitness.interval import (
    impact_bounds,
    interval_bounds,
    propagate_bounds,
)
from gapruning.models import GraphBuilder, Net
from gapruning.models.builder import Node
from gapruning.models.ops import OPS, UnsupportedOpError, op_of, register_op
from gapruning.models.ops.base import Op
from gapruning.models.ops.layernorm import normalized_bounds
from gapruning.models.ops.pooling import adaptive_matrix
from gapruning.space import PruneSpace

INPUT = (6, 6, 2)


def _se(g, x):
    """Squeeze-excite: a per-channel sigmoid gate from the pooled map."""
    squeeze = g.relu(g.dense(g.global_avgpool(x), 2, name="se1"))
    return g.mul(x, g.sigmoid(g.dense(squeeze, 4, name="se2")), name="gate")


def _concat(g, x):
    """Inception/DenseNet-like: branches and the input itself, concatenated,
    then a BatchNorm (nonzero at removed channels: the mask must follow it)."""
    a = g.conv(x, 3, 3, name="ca")
    b = g.relu(g.conv(x, 2, 1, name="cb"))
    return g.relu(g.batchnorm(g.concat(a, x, b, name="cat"), name="cat_bn"))


def _shuffle(g, x):
    """ShuffleNet-like: a branch concatenated with the input, then shuffled; the
    branch's inner conv stays prunable, the concatenated channels do not."""
    inner = g.relu(g.conv(x, 3, 1, name="inner"))
    b = g.relu(g.conv(g.conv(inner, 3, 3, groups=3, name="dw"), 4, 1, name="outer"))
    return g.channel_shuffle(g.concat(x, b, name="cat"), 2, name="shuffle")


def _flat_head(g, x):
    h = g.relu(g.dense(g.flatten(g.maxpool(x, 2)), 7, name="fc"))
    return g.dense(h, 3, name="out")


def _ln_head(g, x):
    """LayerNorm on the map and on a vector; the prunable group is ``fc``."""
    h = g.relu(g.dense(g.global_avgpool(g.conv(x, 5, 3, name="c2")), 7, name="fc"))
    return g.dense(g.layernorm(g.dense(h, 4, name="fc2")), 3, name="out")


def _token_head(g, x):
    """A dense layer on each token (a prunable group), then the first token."""
    h = g.relu(g.dense(x, 5, name="tf"))
    return g.dense(g.select_token(h), 3, name="out")


def _attention(g, x):
    """Patch tokens, a class token and position embedding, two heads of
    attention: the q, k, v projections and the attention output are one group
    of heads."""
    x = g.pos_embedding(g.class_token(g.tokens(x), 2))
    q, k, v = (g.dense(x, 6, name=t) for t in "qkv")
    return g.attention(q, k, v, 2, name="attn")


def _conv_head(g, x):
    h = g.relu(g.conv(x, 5, 3, name="c2"))
    return g.dense(g.global_avgpool(h), 3, name="out")


# op -> (body on the stem's 4-channel map, head)
BODIES = {
    "input": (lambda g, x: x, _conv_head),
    "mask": (lambda g, x: x, _conv_head),
    "conv": (lambda g, x: g.conv(x, 6, 3, strides=2, padding="VALID"), _conv_head),
    "dense": (lambda g, x: x, _flat_head),
    "flatten": (lambda g, x: x, _flat_head),
    "batchnorm": (lambda g, x: g.batchnorm(x, name="bn"), _conv_head),
    "relu": (lambda g, x: g.relu(x), _conv_head),
    "sigmoid": (lambda g, x: g.sigmoid(x), _conv_head),
    "softmax": (lambda g, x: x, lambda g, x: g.softmax(_conv_head(g, x))),
    "maxpool": (lambda g, x: g.maxpool(x, 3, 1, padding=((1, 1), (0, 1))), _conv_head),
    "avgpool": (
        lambda g, x: g.avgpool(x, 3, 1, padding=1, count_include_pad=False),
        _conv_head,
    ),
    "global_avgpool": (lambda g, x: x, _conv_head),
    "adaptive_avgpool": (lambda g, x: g.adaptive_avgpool(x, 3), _conv_head),
    "add": (lambda g, x: g.add(x, g.conv(x, 4, 3, name="c1b")), _conv_head),
    "channel_map": (
        lambda g, x: g.add(g.conv(x, 6, 3, strides=2), g.channel_map(x, 6, stride=2)),
        _conv_head,
    ),
    "dwconv": (lambda g, x: g.relu(g.conv(x, 4, 3, groups=4, name="dw")), _conv_head),
    "grouped_conv": (lambda g, x: g.conv(x, 6, 3, groups=2, name="gc"), _conv_head),
    "groupwise_conv": (
        lambda g, x: g.relu(g.conv(x, 4, 3, groups=2, name="gw")),
        _conv_head,
    ),
    "mul": (_se, _conv_head),
    "concat": (_concat, _conv_head),
    "concat_mask": (_concat, _flat_head),
    "layernorm": (lambda g, x: g.layernorm(x), _ln_head),
    "channel_shuffle": (_shuffle, _conv_head),
    "tokens": (lambda g, x: g.tokens(x), _token_head),
    "class_token": (lambda g, x: g.class_token(g.tokens(x)), _token_head),
    "pos_embedding": (lambda g, x: g.pos_embedding(g.tokens(x)), _token_head),
    "select_token": (lambda g, x: g.tokens(x), _token_head),
    "attention": (_attention, _token_head),
}
for _act in ("relu6", "hardswish", "hardsigmoid", "silu"):
    BODIES[_act] = (lambda g, x, a=_act: g.activation(x, a), _conv_head)
BODIES["gelu"] = (lambda g, x: g.activation(x, "gelu", approximate=False), _conv_head)


def random_pretrained(nodes, seed=0):
    """A network of ``nodes`` with random weights and BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    shapes = nnx.to_pure_dict(
        nnx.state(nnx.eval_shape(lambda: Net(nodes, rngs=nnx.Rngs(0))))
    )
    params = {}
    for name, variables in shapes.get("layers", {}).items():
        params[name] = {}
        for var, spec in variables.items():
            shape = tuple(spec.shape)
            if var == "kernel":
                value = rng.normal(0, 1.5 / np.sqrt(np.prod(shape[:-1])), shape)
            elif var in ("scale", "var"):
                value = rng.uniform(0.5, 1.5, shape)
            else:
                value = rng.normal(0, 0.3, shape)
            params[name][var] = value.astype(np.float32)
    return build_pretrained(nodes, params, {"name": "ops"}, source="test")


def network(op: str, seed: int = 0):
    body, head = BODIES[op]
    g = GraphBuilder(INPUT)
    x = g.relu(g.conv(g.input, 4, 3, name="c1"))
    out = head(g, body(g, x))
    return random_pretrained(g.build(out), seed)


def random_masks(space: PruneSpace, seed: int = 0):
    rng = np.random.default_rng(seed)
    masks = {}
    for grp in space.groups:
        m = rng.random(grp.size) < 0.6
        m[rng.integers(grp.size)] = True
        masks[grp.name] = m
    return masks


def inputs(n=16, seed=1):
    return jnp.asarray(np.random.default_rng(seed).random((n, *INPUT)), jnp.float32)


def test_every_op_has_a_contract_case():
    assert set(OPS) <= set(BODIES)


@pytest.mark.parametrize("op", sorted(BODIES))
def test_the_case_uses_the_op(op):
    assert op in {n.op for n in network(op).model.nodes}


@pytest.mark.parametrize("op", sorted(BODIES))
def test_compaction_is_exact_and_costs_are_the_compacted_counts(op):
    net = network(op)
    space = net.space
    assert space.groups, "the case must have something to prune"
    masks = random_masks(space)
    small = gp.compact(net, masks)
    x = inputs()
    np.testing.assert_allclose(
        np.asarray(small.model(x)),
        np.asarray(gp.masked_apply(net, masks, x)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert space.params(masks) == param_count(small)
    assert space.flops(masks) == reference.flops(small.model)
    assert space.dense_params == param_count(net)
    assert space.dense_flops == reference.flops(net.model)


@pytest.mark.parametrize("op", sorted(BODIES))
def test_interval_bounds_contain_sampled_outputs(op):
    net = network(op)
    masks = {k: v.astype(np.float32) for k, v in random_masks(net.space).items()}
    lo, hi = interval_bounds(net, masks)
    x = inputs(256, seed=2)
    y = np.asarray(gp.masked_apply(net, masks, x))
    assert np.all(y >= np.asarray(lo) - 1e-5) and np.all(y <= np.asarray(hi) + 1e-5)
    box = jnp.zeros((1, *INPUT)), jnp.ones((1, *INPUT))
    dense = propagate_bounds(net.model, *box)
    dl, du = impact_bounds(net.model, masks, dense)
    diff = y - np.asarray(net.model(x))
    assert np.all(diff >= np.asarray(dl) - 1e-5) and np.all(
        diff <= np.asarray(du) + 1e-5
    )


def test_interval_metrics_name_an_op_without_bounds(monkeypatch):
    class NoBounds(type(OPS["layernorm"])):
        bounds = Op.bounds

    monkeypatch.setitem(OPS, "layernorm", NoBounds())
    with pytest.raises(FitnessError, match=r"does not support nodes \[.*\(layernorm\)"):
        interval_bounds(network("layernorm"))


def test_layernorm_bounds_contain_every_normalized_point():
    """float64 sampling, box corners included, and a point box (exact value)."""
    rng = np.random.default_rng(0)
    for c, eps in ((2, 1e-5), (5, 1e-3), (16, 1e-6), (3, 0.0)):
        centre, radius = rng.normal(0, 2, (1, c)), rng.uniform(0, 1.5, (1, c))
        lo, hi = centre - radius, centre + radius
        corners = rng.integers(0, 2, (200, c))
        x = np.concatenate([rng.uniform(lo, hi, (2000, c)), np.where(corners, hi, lo)])
        z = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps)
        z_lo, z_hi = map(np.asarray, normalized_bounds(lo, hi, eps))
        assert np.all(z >= z_lo - 1e-5) and np.all(z <= z_hi + 1e-5)
        assert np.all(z_hi - z_lo <= 2 * np.sqrt(c - 1) + 1e-5)
        point = normalized_bounds(centre, centre, eps)
        want = (centre - centre.mean()) / np.sqrt(centre.var() + eps)
        np.testing.assert_allclose(point[0], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(point[1], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", sorted(BODIES))
def test_export_round_trip(op, tmp_path):
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    from gapruning.convert import to_onnx, to_torch_module

    net = network(op)
    small = gp.compact(net, random_masks(net.space))
    x = np.asarray(inputs(4))
    want = np.asarray(small.model(jnp.asarray(x)))
    x_fw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    with torch.no_grad():
        got = to_torch_module(small)(torch.from_numpy(x_fw)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    path = to_onnx(small, tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x_fw})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_channel_flow_couplings():
    """A depthwise conv shares its input's group; a squeeze-excite gate's
    producer joins the gated map's group; a grouped conv prunes neither side."""
    dw = network("dwconv").space
    assert dw.group_of("dw") == dw.group_of("c1") == "c1"
    se = network("mul").space
    assert se.group_of("se2") == se.group_of("gate") == se.group_of("c1")
    assert {g.name for g in se.groups} == {"c1", "se1", "c2"}
    gc = network("grouped_conv").space
    assert gc.group_of("c1") is None and gc.group_of("gc") is None
    gw = network("groupwise_conv").space
    assert gw.group_of("c1") == gw.group_of("gw") == "c1"
    assert {g.name: g.size for g in gw.groups}["c1"] == 2  # groups of 2 channels
    shuffle = network("channel_shuffle").space
    assert [g.name for g in shuffle.groups] == ["inner", "c2"]
    assert shuffle.group_of("dw") == "inner"
    cat = network("concat").space
    assert [g.name for g in cat.groups] == ["c1", "ca", "cb", "c2"]
    assert [cat.group_of(t) for t in cat.pieces_of("cat_bn")] == ["ca", "c1", "cb"]
    assert cat.unit_ref("cat_bn") == [(1, 1), (1, 0), (1, 2)]


def test_a_concatenation_mixed_with_another_space_is_not_pruned():
    g = GraphBuilder(INPUT)
    x = g.relu(g.conv(g.input, 4, 3, name="c1"))
    cat = g.concat(g.conv(x, 3, 3, name="ca"), x, name="cat")
    y = g.add(cat, g.conv(x, 7, 3, name="wide"))
    out = g.dense(g.global_avgpool(g.relu(g.conv(y, 5, 3, name="c2"))), 3)
    space = random_pretrained(g.build(out)).space
    assert [grp.name for grp in space.groups] == ["c2"]


def test_channel_shuffle_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((2, 3, 2, 6)).astype(np.float32)
    node = Node("channel_shuffle", "s", ("x",), (3, 2, 6), (("groups", 3),))
    got = np.asarray(OPS["channel_shuffle"].apply(node, None, [jnp.asarray(x)]))
    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    want = t.view(2, 3, 2, 3, 2).transpose(1, 2).reshape(2, 6, 3, 2).numpy()
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1))
    assert not np.allclose(got, x)


def test_adaptive_pooling_matches_torch_for_uneven_windows():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((2, 7, 5, 3)).astype(np.float32)
    node = Node("adaptive_avgpool", "p", ("x",), (3, 2, 3), (("output_size", (3, 2)),))
    got = np.asarray(OPS["adaptive_avgpool"].apply(node, None, [jnp.asarray(x)]))
    want = torch.nn.functional.adaptive_avg_pool2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)), (3, 2)
    ).numpy()
    np.testing.assert_allclose(got, want.transpose(0, 2, 3, 1), rtol=1e-6)
    np.testing.assert_allclose(adaptive_matrix(5, 2).sum(1), 1.0)


@pytest.mark.parametrize("op", ["relu6", "hardswish", "hardsigmoid", "silu", "gelu"])
def test_activation_bounds_and_slopes_are_sound(op):
    """Bounds contain f on random intervals; differences lie in the slope range."""
    act = OPS[op]
    node = Node(op, op, ("x",), (1,), (("approximate", False),))
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(0, 3, 4000), jnp.float32)
    b = a + jnp.asarray(rng.exponential(1.0, 4000), jnp.float32)
    lo, hi = act.bounds(node, None, [(a, b)])
    t = jnp.linspace(0, 1, 201)[:, None]
    f = act.fn(node, a + t * (b - a))
    assert bool(jnp.all(f >= lo - 1e-6)) and bool(jnp.all(f <= hi + 1e-6))
    z, d = a, b - a - 0.5
    c, r = act.delta(node, None, [(d, jnp.zeros_like(d))], [(z, z)])
    change = act.fn(node, z + d) - act.fn(node, z)
    assert bool(jnp.all(change >= c - r - 1e-5)) and bool(
        jnp.all(change <= c + r + 1e-5)
    )


def test_unknown_ops_fail_naming_the_node():
    with pytest.raises(UnsupportedOpError, match=r"node 'x1'.*unknown op 'bogus'"):
        op_of(Node("bogus", "x1", (), (1,)))
    with pytest.raises(UnsupportedOpError, match="op 'input' .*no computation"):
        OPS["input"].apply(Node("input", "in", (), (1,)), None, [])


def test_register_op_checks_the_flow():
    class Odd(type(OPS["relu"])):
        name, flow = "odd_test_op", "sideways"

    with pytest.raises(ValueError, match="flow 'sideways'"):
        register_op(Odd())
    assert "odd_test_op" not in OPS


def test_gelu_tanh_form_has_no_onnx_export():
    pytest.importorskip("onnx")
    from gapruning.convert import ConversionError, to_onnx

    g = GraphBuilder((4,))
    out = g.dense(g.activation(g.dense(g.input, 3), "gelu", approximate=True), 2)
    net = random_pretrained(g.build(out))
    with pytest.raises(ConversionError, match="tanh approximation"):
        to_onnx(net, "/tmp/never.onnx")
    x = jnp.linspace(-3, 3, 8).reshape(2, 4)
    assert np.isfinite(np.asarray(jax.jit(net.model)(x))).all()


@pytest.mark.parametrize("op", ["concat", "mul", "dwconv", "attention", "layernorm"])
def test_population_fitness_matches_one_individual_at_a_time(op):
    """The vmapped population pass (split into shared and per-individual nodes)
    gives each individual the fitness it gets alone."""
    net = network(op)
    fit = gp.fitness.compose(net, "fidelity", num_probes=16, seed=0)
    masks = [random_masks(net.space, seed) for seed in range(3)]
    batch = {g: np.stack([m[g] for m in masks]).astype(np.float32) for g in masks[0]}
    together = np.asarray(fit(batch))
    alone = [float(fit({g: v[None] for g, v in m.items()})[0]) for m in masks]
    assert len(set(np.round(together, 6))) == 3
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "op",
    ["concat", "gelu", "adaptive_avgpool", "dwconv", "channel_shuffle", "attention"],
)
def test_save_and_load_keep_the_op(op, tmp_path):
    net = network(op)
    small = gp.compact(net, random_masks(net.space))
    gp.save(small, tmp_path / "m")
    back = gp.load(tmp_path / "m")
    assert back.model.nodes == small.model.nodes
    x = inputs(4)
    np.testing.assert_allclose(np.asarray(back.model(x)), np.asarray(small.model(x)))
