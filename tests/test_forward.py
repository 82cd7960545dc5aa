import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import gapruning as gp
from gapruning.encoding import Budget, UnitEncoding, WeightEncoding
from gapruning.forward import (
    PROBE_TILE_BYTES,
    Plan,
    auto_chunk_size,
    auto_plan,
    per_channel_nodes,
    population_footprint,
    split_apply,
    with_unit_masks,
)
from gapruning.space import MaskError


def _population(space, p, seed=0):
    enc = UnitEncoding(space, Budget("units", 0.6))
    genomes = jax.random.normal(jax.random.key(seed), (p, enc.num_genes))
    return jax.vmap(enc.decode)(genomes)


def test_population_forward_equals_a_loop_over_individuals(zoo_net, batch):
    _, net = zoo_net
    masks = _population(gp.PruneSpace(net), 4)
    out = jax.jit(lambda m: gp.population_apply(net, m, batch))(masks)
    assert out.shape == (4, batch.shape[0], 10)
    for i in range(4):
        one = {k: v[i] for k, v in masks.items()}
        np.testing.assert_allclose(
            out[i], gp.masked_apply(net, one, batch), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("probe_chunk", [None, 2])
def test_split_apply_equals_the_plain_pass(zoo_net, probe_chunk):
    """Mask-free nodes once, per-channel parts, probe tiles: the outputs and the
    taps (one mask-free, one mask-dependent node) of every individual equal its
    plain masked pass."""
    _, net = zoo_net
    x = jax.random.normal(jax.random.key(2), (4, 28, 28, 1))
    masks = _population(gp.PruneSpace(net), 6, seed=1)
    taps = (net.nodes[1].name, net.nodes[-2].name)
    per_channel = per_channel_nodes(net, 6)

    def one(m):
        return split_apply(
            with_unit_masks(net, m),
            x,
            taps=taps,
            probe_chunk=probe_chunk,
            per_channel=per_channel,
        )

    out, tapped = jax.jit(jax.vmap(one))(masks)
    for i in range(6):
        want, want_taps = with_unit_masks(net, {k: v[i] for k, v in masks.items()})(
            x, taps=taps
        )
        np.testing.assert_allclose(out[i], want, rtol=1e-5, atol=1e-5)
        for t in taps:
            np.testing.assert_allclose(tapped[t][i], want_taps[t], rtol=1e-5, atol=1e-5)


def test_per_channel_parts_are_precomputed_only_for_large_enough_populations():
    lenet5 = gp.load("lenet5-fmnist")
    assert per_channel_nodes(lenet5, 6) == ("conv2",)  # 6 input channels
    assert per_channel_nodes(lenet5, 5) == ()
    assert per_channel_nodes(gp.load("lenet300-fmnist"), 64) == ()  # no convolution


def test_given_values_replace_their_nodes_and_what_only_they_need(batch):
    net = gp.load("lenet5-fmnist").model
    other = jax.random.normal(jax.random.key(5), batch.shape)
    given = {"pool1": net.values(other, ("pool1",))["pool1"]}
    vals = net.values(batch, ("out",), given)
    assert "conv1" not in vals and "input" not in vals
    np.testing.assert_allclose(vals["out"], net(other), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(net(batch, given=given), net(other), rtol=1e-5)


def test_auto_plan():
    """LeNet-5's second convolution (per-channel parts) carries its work: the
    whole population runs on probe tiles within the tile budget; LeNet-300-100
    keeps the individual chunks and all probes; explicit chunks and kernel masks
    are taken as they are."""
    lenet5, lenet300 = gp.load("lenet5-fmnist"), gp.load("lenet300-fmnist")
    plan = auto_plan(lenet5, 64, 512)
    assert (plan.individuals, plan.per_channel) == (64, ("conv2",))
    tile = 64 * population_footprint(lenet5, 1)
    assert (
        plan.probe_chunk * tile <= PROBE_TILE_BYTES["cpu"] < 2 * plan.probe_chunk * tile
    )
    assert 512 % plan.probe_chunk == 0
    huge = auto_plan(lenet5, 1024, 512)  # even one probe of it overflows the tile
    assert huge.probe_chunk == 1 and 1024 % huge.individuals == 0
    one_probe = population_footprint(lenet5, 1)
    assert huge.individuals * one_probe <= PROBE_TILE_BYTES["cpu"]
    assert 2 * huge.individuals * one_probe > PROBE_TILE_BYTES["cpu"]
    assert auto_plan(lenet5, 64, 512, chunk_size=2) == Plan(2)
    assert auto_plan(lenet5, 64, 512, chunk_size=None) == Plan(64, None, ("conv2",))
    assert auto_plan(lenet5, 64, 512, kernel_masks=True) == Plan(
        auto_chunk_size(lenet5, 64, 512, kernel_masks=True)
    )
    assert auto_plan(lenet300, 64, 512) == Plan(auto_chunk_size(lenet300, 64, 512))


def test_fitness_on_probe_tiles_equals_plain_passes(monkeypatch):
    """The fitness's own probes take the split pass (tiles of 16 probes here); a
    chunk of 1 individual (no per-channel parts) and the one-individual
    ``single`` take plain passes: same values."""
    net = gp.load("lenet5-fmnist")
    tile = 8 * 16 * population_footprint(net, 1)
    monkeypatch.setitem(PROBE_TILE_BYTES, "cpu", tile)
    calls = []

    def recorded(*args, **kwargs):
        calls.append(kwargs["probe_chunk"])
        return split_apply(*args, **kwargs)

    monkeypatch.setattr(gp.fitness.base, "split_apply", recorded)
    spec = {"fidelity": 1.0, "fidelity_top1": 1.0, "fidelity_mse": 1.0}
    tiled = gp.fitness.compose(net, spec, probes="gaussian", num_probes=64)
    plain = gp.fitness.compose(
        net, spec, probes="gaussian", num_probes=64, chunk_size=1
    )
    masks = _population(net.space, 8, seed=4)
    assert tiled._plan(masks) == Plan(8, 16, ("conv2",))
    scores = tiled(masks)
    assert calls == [16]  # traced once; the terms share one split pass
    np.testing.assert_allclose(scores, plain(masks), rtol=1e-4, atol=1e-5)
    one = {k: v[3] for k, v in masks.items()}
    np.testing.assert_allclose(tiled(masks)[3], plain.single(one), rtol=1e-4)


def test_chunked_population_equals_unchunked(batch):
    net = gp.load("lenet5-fmnist")
    masks = _population(net.space, 6, seed=3)
    full = gp.population_apply(net, masks, batch)
    chunked = gp.population_apply(net, masks, batch, chunk_size=2)
    np.testing.assert_allclose(full, chunked, rtol=1e-6, atol=1e-6)


def test_unstructured_kernel_masks_per_individual(batch):
    net = gp.load("lenet300-fmnist")
    enc = WeightEncoding(net.model, keep=0.4)
    genomes = jax.random.normal(jax.random.key(0), (4, enc.num_genes))
    masks = jax.vmap(enc.decode)(genomes)
    out = jax.jit(lambda m: gp.population_apply(net, m, batch, chunk_size=2))(masks)
    for i in range(4):
        layers = {}
        for name in enc.layers:
            layer = net.model.layers[name]
            layers[name] = {
                "kernel": np.asarray(layer.kernel[...]) * np.asarray(masks[name][i]),
                "bias": np.asarray(layer.bias[...]),
            }
        pruned = gp.models.assemble(net.model.nodes, layers)
        want = reference.forward(pruned, np.asarray(batch))
        np.testing.assert_allclose(out[i], want, rtol=1e-4, atol=1e-4)


def test_masked_apply_leaves_the_model_untouched(batch):
    net = gp.load("lenet300-fmnist")
    before = np.asarray(net.model(batch))
    masks = net.space.full_masks()
    masks["fc1"][:150] = False
    assert not np.allclose(gp.masked_apply(net, masks, batch), before)
    np.testing.assert_array_equal(np.asarray(net.model(batch)), before)


def test_bad_population_masks_are_named(batch):
    net = gp.load("lenet300-fmnist")
    with pytest.raises(MaskError, match="neither the prunable groups"):
        gp.population_apply(net, {"fc7": jnp.ones((2, 3))}, batch)
    mixed = {"fc1": jnp.ones((2, 300)), "fc2": jnp.ones((3, 100))}
    with pytest.raises(MaskError, match="disagree on the population size"):
        gp.population_apply(net, mixed, batch)
    with pytest.raises(MaskError, match="multiple of chunk_size"):
        gp.population_apply(
            net,
            {"fc1": jnp.ones((3, 300)), "fc2": jnp.ones((3, 100))},
            batch,
            chunk_size=2,
        )
