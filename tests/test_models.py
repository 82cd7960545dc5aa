import jax.numpy as jnp
import numpy as np
import pytest
import reference
from flax import nnx

from gapruning import models
from gapruning.models import GraphBuilder, Net, channel_spaces


def test_all_ones_masks_compute_the_unmasked_network(zoo_net, batch):
    name, net = zoo_net
    assert all(bool(jnp.all(m[...] == 1)) for m in net.masks.values())
    got = np.asarray(net(batch), np.float64)
    want = reference.forward(net, np.asarray(batch), use_masks=False)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_random_masks_match_the_float64_reference(zoo_net, batch):
    _, net = zoo_net
    rng = np.random.default_rng(0)
    for m in net.masks.values():
        m[...] = jnp.asarray(rng.random(m[...].shape) < 0.6, jnp.float32)
    got = np.asarray(net(batch), np.float64)
    want = reference.forward(net, np.asarray(batch))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_every_prunable_unit_has_its_own_mask_variable(zoo_net):
    name, net = zoo_net
    masks = nnx.state(net, models.Mask)
    sizes = {g: m[...].shape for g, m in net.masks.items()}
    assert len(nnx.to_flat_state(masks)) == len(sizes) > 0
    hidden = [
        n for n in net.nodes if n.op in ("dense", "conv") and n is not net.nodes[-1]
    ]
    assert sum(s[0] for s in sizes.values()) <= sum(n.shape[-1] for n in hidden)
    # every hidden producer's units (channels, or heads) are covered by exactly
    # one group of equal size
    spaces = channel_spaces(net.nodes)
    for n in hidden:
        group = spaces.prunable[spaces.space_of[n.name]]
        assert sizes[group] == (n.shape[-1] // spaces.unit_of(n.name),)


def test_zeroing_a_unit_equals_deleting_it_by_hand():
    net = models.build("lenet300", seed=3)
    net.eval()
    x = np.random.default_rng(1).normal(size=(5, 28, 28, 1)).astype(np.float32)
    j = 17
    mask = np.ones(300, np.float32)
    mask[j] = 0
    net.masks["fc1"][...] = jnp.asarray(mask)
    got = np.asarray(net(jnp.asarray(x)))
    p = {
        k: {n: np.asarray(v) for n, v in d.items()}
        for k, d in nnx.to_pure_dict(nnx.state(net.layers)).items()
    }
    keep = np.arange(300) != j
    h = np.maximum(
        x.reshape(5, -1) @ p["fc1"]["kernel"][:, keep] + p["fc1"]["bias"][keep], 0
    )
    h = np.maximum(h @ p["fc2"]["kernel"][keep] + p["fc2"]["bias"], 0)
    want = h @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_population_masks_fold_into_the_batch(batch):
    net = models.build("lenet5", seed=0)
    net.eval()
    rng = np.random.default_rng(0)
    pop = {
        g: (rng.random((4, *m[...].shape)) < 0.5).astype(np.float32)
        for g, m in net.masks.items()
    }
    graphdef, params, _ = nnx.split(net, nnx.Param, ...)
    batched = nnx.merge(
        graphdef,
        params,
        nnx.State({"masks": {g: models.Mask(jnp.asarray(v)) for g, v in pop.items()}}),
    )
    out = np.asarray(batched(batch))
    assert out.shape == (4, 3, 10)
    for i in range(4):
        want = reference.forward(
            net, np.asarray(batch), {g: v[i] for g, v in pop.items()}
        )
        np.testing.assert_allclose(out[i], want, rtol=1e-4, atol=1e-4)


def test_resnet_residual_channels_share_one_group_per_stage():
    net = models.build("resnet20")
    spaces = channel_spaces(net.nodes)
    for s in (1, 2, 3):
        conv2s = [
            n.name
            for n in net.nodes
            if n.name.startswith(f"s{s}b") and n.name.endswith("conv2")
        ]
        groups = {spaces.prunable[spaces.space_of[c]] for c in conv2s}
        assert groups == {f"stage{s}"}
    assert spaces.prunable[spaces.space_of["stem_conv"]] == "stage1"
    assert "s1b0_conv1" in net.masks and net.masks["stage2"][...].shape == (32,)


def test_output_layer_and_input_are_never_prunable():
    net = models.build("lenet300")
    assert set(net.masks) == {"fc1", "fc2"}


def test_builder_rejects_bad_graphs():
    g = GraphBuilder((4, 4, 2))
    with pytest.raises(ValueError, match="a vector or tokens"):
        g.dense(g.input, 3)
    with pytest.raises(ValueError, match="unknown node"):
        g.relu("nope")
    a = g.conv(g.input, 3, 1, name="a")
    b = g.conv(g.input, 4, 1, name="b")
    with pytest.raises(ValueError, match="different shapes"):
        g.add(a, b)
    with pytest.raises(ValueError, match="duplicate"):
        g.conv(g.input, 3, 1, name="a")


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(KeyError, match="lenet300"):
        models.build("alexnet")


def test_register_model_adds_a_user_architecture():
    def tiny(num_classes=10, input_shape=(28, 28, 1)):
        g = GraphBuilder(input_shape)
        h = g.relu(g.dense(g.flatten(g.input), 8, name="fc1"))
        return g.build(g.dense(h, num_classes, name="out"))

    models.register_model("tiny_test_mlp", tiny)
    try:
        net = models.build("tiny_test_mlp")
        assert isinstance(net, Net) and set(net.masks) == {"fc1"}
        with pytest.raises(ValueError, match="already registered"):
            models.register_model("tiny_test_mlp", tiny)
    finally:
        del models.MODELS["tiny_test_mlp"]


def test_wrong_input_shape_is_refused():
    net = models.build("lenet5")
    with pytest.raises(ValueError, match="does not match"):
        net(jnp.ones((2, 32, 32, 1)))


def test_build_returns_an_inference_ready_model():
    net = models.build("resnet20")
    before = np.asarray(net.layers["stem_bn"].mean[...])
    x = jnp.ones((2, 28, 28, 1))
    first = np.asarray(net(x))
    np.testing.assert_array_equal(np.asarray(net(x)), first)
    np.testing.assert_array_equal(np.asarray(net.layers["stem_bn"].mean[...]), before)


def test_graph_reexports_the_builder_and_runs_shape_ops():
    """The node tuple lives in models.builder; models.graph (the executor) and
    models export the same objects, and apply_shape_op refuses other ops."""
    from gapruning.models import builder, graph

    for name in ("GraphBuilder", "Node", "PRODUCERS", "channel_spaces", "mask_read"):
        assert getattr(graph, name) is getattr(builder, name)
    assert models.GraphBuilder is builder.GraphBuilder
    g = GraphBuilder((4, 4, 2))
    gap = g.global_avgpool(g.input)
    nodes = g.build(g.dense(gap, 3, name="out"))
    x = jnp.arange(32.0).reshape(1, 4, 4, 2)
    node = next(n for n in nodes if n.name == gap)
    np.testing.assert_allclose(graph.apply_shape_op(node, x), x.mean(axis=(1, 2)))
    with pytest.raises(ValueError, match="not a shape op"):
        graph.apply_shape_op(nodes[-1], x)
