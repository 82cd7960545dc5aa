import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import gapruning as gp
from gapruning.encoding import Budget, UnitEncoding, WeightEncoding
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
