import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import gapruning as gp
from gapruning import models
from gapruning.space import MaskError, PruneSpace


def _pretrained(net):
    return gp.Pretrained(net, {"name": "t"})


def _random_masks(space, rng, keep=0.5):
    masks = {g.name: rng.random(g.size) < keep for g in space.groups}
    for m in masks.values():
        m[rng.integers(len(m))] = True  # never empty a group
    return masks


def test_all_ones_costs_equal_the_dense_counts(zoo_net):
    _, net = zoo_net
    space = PruneSpace(net)
    full = space.full_masks()
    assert space.params(full) == gp.param_count(net) == space.dense_params
    assert space.flops(full) == reference.flops(net) == space.dense_flops


def test_compacted_outputs_equal_masked_outputs(zoo_net, batch):
    name, net = zoo_net
    space = PruneSpace(net)
    masks = _random_masks(space, np.random.default_rng(hash(name) % 2**32))
    small = gp.compact(_pretrained(net), masks)
    masked = gp.masked_apply(net, masks, batch)
    out = small.model(batch)
    scale = float(jnp.abs(masked).max())
    assert float(jnp.abs(out - masked).max()) <= 1e-5 * max(1.0, scale)
    # exact accounting: the compacted model really has these counts
    assert space.params(masks) == gp.param_count(small) < space.dense_params
    assert space.flops(masks) == reference.flops(small.model) < space.dense_flops
    card = small.card["pruning"]
    assert card["params"] == {
        "before": space.dense_params,
        "after": gp.param_count(small),
    }
    assert card["kept"] == space.kept(masks)
    # the compacted model is again prunable, with all-ones masks of the kept widths
    assert PruneSpace(small.model).sizes == tuple(
        card["kept"][g] for g in space.group_names
    )


def test_compaction_shrinks_real_layers():
    net = gp.load("lenet5-fmnist")
    masks = net.space.full_masks()
    masks["conv2"][::2] = False
    small = gp.compact(net, masks)
    assert small.model.layers["conv2"].kernel[...].shape == (5, 5, 6, 8)
    # the Dense after Flatten lost the rows of the removed channels at every position
    assert small.model.layers["fc1"].kernel[...].shape == (5 * 5 * 8, 120)


def test_coupled_resnet_channels_get_one_mask():
    net = models.build("resnet20")
    space = PruneSpace(net)
    stage2 = next(g for g in space.groups if g.name == "stage2")
    assert stage2.size == 32 and len(stage2.members) == 3  # conv2 of every s2 block
    assert set(stage2.members) == {"s2b0_conv2", "s2b1_conv2", "s2b2_conv2"}
    stage1 = next(g for g in space.groups if g.name == "stage1")
    assert "stem_conv" in stage1.members
    assert len(space.groups) == 12
    masks = space.full_masks()
    masks["stage2"][5] = False
    small = gp.compact(_pretrained(net), masks)
    for layer in stage2.members:
        assert small.model.layers[layer].kernel[...].shape[-1] == 31
    assert small.model.layers["s3b0_conv1"].kernel[...].shape[2] == 31  # reads stage2
    assert small.model.layers["s3b1_conv1"].kernel[...].shape[2] == 64
    assert small.model.layers["s2b1_conv1"].kernel[...].shape[2] == 31


def test_costs_work_inside_jit_and_vmap():
    space = gp.load("lenet300-fmnist").space
    rng = np.random.default_rng(0)
    batch = {g.name: rng.random((5, g.size)) < 0.5 for g in space.groups}
    jitted = jax.jit(jax.vmap(space.params))(
        {k: jnp.asarray(v) for k, v in batch.items()}
    )
    exact = [space.params({k: v[i] for k, v in batch.items()}) for i in range(5)]
    np.testing.assert_allclose(np.asarray(jitted), exact, rtol=1e-6)


def test_bad_masks_are_named():
    space = gp.load("lenet300-fmnist").space
    with pytest.raises(MaskError, match="unknown \\['fc9'\\]"):
        space.validate({"fc1": np.ones(300), "fc2": np.ones(100), "fc9": np.ones(3)})
    with pytest.raises(MaskError, match="missing \\['fc2'\\]"):
        space.validate({"fc1": np.ones(300)})
    with pytest.raises(MaskError, match=r"'fc2' has shape \(99,\), expected \(100,\)"):
        space.validate({"fc1": np.ones(300), "fc2": np.ones(99)})
    empty = {"fc1": np.ones(300), "fc2": np.zeros(100)}
    with pytest.raises(MaskError, match="'fc2' removes every unit.*allow_empty"):
        space.validate(empty)
    space.validate(empty, allow_empty=True)
    with pytest.raises(MaskError, match="every unit"):
        gp.compact(gp.load("lenet300-fmnist"), empty)


def test_describe_lists_kept_units():
    space = gp.load("paoding_mlp-fmnist").space
    masks = space.full_masks()
    masks["fc3"][:10] = False
    rows = space.describe(masks)
    assert rows[2] == {"group": "fc3", "kind": "dense", "size": 64, "kept": 54}
