"""The population batching rule of ``masked_contraction`` (the op behind masked
Dense/Conv layers) against a loop over individuals, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gapruning.models.masked_layers import conv_op, dense_op, masked_contraction


@pytest.mark.parametrize(
    "op, x_shape, k_shape",
    [
        (dense_op, (5, 6), (6, 3)),
        (conv_op((1, 1), "SAME"), (2, 6, 6, 4), (3, 3, 4, 5)),
        (conv_op((1, 1), "VALID"), (2, 6, 6, 1), (3, 3, 1, 5)),
    ],
)
def test_population_of_masks_on_a_shared_input_equals_a_loop(op, x_shape, k_shape):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    masks = jnp.asarray(rng.random((4, x_shape[-1])) < 0.6, jnp.float32)
    got = jax.vmap(lambda m: masked_contraction(op, x, m, k))(masks)
    for i in range(len(masks)):
        np.testing.assert_allclose(got[i], op(x * masks[i], k), rtol=1e-5, atol=1e-5)

    def loss(x, k):
        return jnp.sum(jax.vmap(lambda m: masked_contraction(op, x, m, k))(masks) ** 2)

    def reference(x, k):
        return sum(jnp.sum(op(x * m, k) ** 2) for m in masks)

    g, want = jax.grad(loss, (0, 1))(x, k), jax.grad(reference, (0, 1))(x, k)
    for a, b in zip(g, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
