"""Reduced-precision evaluation and the memory knob of the population fitness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import spearmanr

import gapruning as gp
from gapruning.encoding import Budget, UnitEncoding


@pytest.fixture(scope="module")
def setup():
    net = gp.load("paoding_mlp-fmnist")
    enc = UnitEncoding(net.space, Budget("units", 0.5))
    genomes = jax.random.normal(jax.random.key(3), (32, enc.num_genes))
    return net, jax.vmap(enc.decode)(genomes)


def test_bfloat16_ranks_a_fixed_population_like_float32(setup):
    net, masks = setup
    kwargs = {"num_probes": 128, "seed": 0}
    f32 = gp.fitness.compose(net, "default", **kwargs)
    bf16 = gp.fitness.compose(net, "default", dtype="bfloat16", **kwargs)
    assert bf16.probes.dtype == jnp.bfloat16
    kernel = bf16.pretrained.model.layers["fc1"].kernel[...]
    assert kernel.dtype == jnp.bfloat16
    a, b = np.asarray(f32(masks)), np.asarray(bf16(masks))
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(b))
    assert not np.array_equal(a, b)  # really evaluated in another precision
    assert spearmanr(a, b).statistic >= 0.95


def test_prune_in_bfloat16_compacts_in_float32(setup):
    net, _ = setup
    result = gp.prune(
        net,
        target=0.5,
        fitness="fidelity",
        probes="gaussian",
        num_probes=32,
        generations=2,
        population=4,
        progress=False,
        dtype="bfloat16",
        recover=(),  # compaction alone: the outputs of the masked network
    )
    assert result.settings["dtype"] == "bfloat16"
    kernel = result.pruned.model.layers["fc1"].kernel[...]
    assert kernel.dtype == jnp.float32 and kernel.shape[1] < 128
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    np.testing.assert_allclose(
        result.pruned.model(x), gp.masked_apply(net, result.masks, x), atol=1e-5
    )


def test_chunk_size_changes_memory_not_scores(setup):
    net, masks = setup
    scores = {
        c: np.asarray(
            gp.fitness.compose(
                net, "fidelity", probes="gaussian", num_probes=64, chunk_size=c
            )(masks)
        )
        for c in (None, 4, "auto")
    }
    np.testing.assert_allclose(scores[4], scores[None], rtol=1e-5)
    np.testing.assert_allclose(scores["auto"], scores[None], rtol=1e-5)
