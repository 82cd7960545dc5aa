"""The population batching rule of ``masked_contraction`` (the op behind masked
Dense/Conv layers) against a loop over individuals, values and gradients."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gapruning as gp
from gapruning.forward import auto_chunk_size, per_channel_chunk, population_footprint
from gapruning.models import masked_layers
from gapruning.models.masked_layers import conv_op, dense_op, masked_contraction

POPULATION = 4


@pytest.mark.parametrize(
    "op, x_shape, k_shape, per_channel",
    [
        (dense_op, (5, 6), (6, 3), False),
        (conv_op((1, 1), "SAME"), (2, 6, 6, 4), (3, 3, 4, 5), True),
        (conv_op((1, 1), "VALID"), (2, 6, 6, 1), (3, 3, 1, 5), True),
        (conv_op((2, 1), ((1, 2), (0, 1))), (2, 7, 6, 3), (3, 2, 3, 5), True),
        (conv_op((1, 1), "SAME"), (2, 6, 6, 6), (3, 3, 6, 5), False),  # C_in > P
        (conv_op((1, 1), "SAME"), (2, 6, 6, 3), (1, 1, 3, 5), False),  # 1x1
    ],
)
def test_population_of_masks_on_a_shared_input_equals_a_loop(
    op, x_shape, k_shape, per_channel
):
    """Both population routes (per-channel sums, stacked kernels) equal the loop."""
    assert masked_layers._per_channel_pays(op, np.zeros(k_shape), POPULATION) == (
        per_channel
    )
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    k = jnp.asarray(rng.normal(size=k_shape), jnp.float32)
    masks = jnp.asarray(rng.random((POPULATION, x_shape[-1])) < 0.6, jnp.float32)
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


@pytest.mark.parametrize(
    "model, floor",
    [("lenet5-fmnist", 6), ("lenet300-fmnist", 1), ("resnet20-fmnist", 1)],
)
def test_auto_chunks_are_large_enough_for_the_per_channel_route(model, floor):
    """LeNet-5's second convolution (6 input channels, 80% of the per-individual
    work) gets chunks of at least 6 individuals; ResNet-20, whose shared-input
    convolution is 5% of the work, and MLPs keep the activation budget."""
    net = gp.load(model)
    assert per_channel_chunk(net) == floor
    assert per_channel_chunk(net, kernel_masks=True) == 1
    tight = population_footprint(net, 512)  # a budget of one individual
    assert auto_chunk_size(net, 64, 512, budget=tight) == (8 if floor == 6 else 1)
    assert auto_chunk_size(net, 4, 512, budget=tight) == (4 if floor == 6 else 1)
    assert auto_chunk_size(net, 64, 512, budget=64 * tight) == 64


@pytest.mark.parametrize(
    "size, window, stride, padding",
    [
        (28, 3, 1, "SAME"),
        (28, 3, 2, "SAME"),
        (27, 3, 2, "SAME"),
        (14, 5, 1, "VALID"),
        (15, 5, 2, "VALID"),  # the last input rows are never read
        (28, 1, 2, "SAME"),
        (10, 4, 3, ((2, 1), (1, 2))),
    ],
)
def test_conv_gradients_equal_jax_own(size, window, stride, padding):
    """The convolution's tangent in x is written through ``transpose``: input and
    kernel gradients, forward-mode derivatives and the masked contraction's
    input gradient equal those of JAX's own rules."""
    op = masked_layers.conv_op((stride, stride), padding)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    kernel = jax.random.normal(jax.random.key(1), (window, window, 3, 4))
    mask = jnp.asarray([1.0, 0.0, 1.0])

    def loss(conv):
        return lambda x, k: jnp.sum(jnp.sin(conv(x, k)))

    for got, want in (
        (
            jax.grad(loss(op), (0, 1))(x, kernel),
            jax.grad(loss(op.raw), (0, 1))(x, kernel),
        ),
        (
            jax.jvp(op, (x, kernel), (x, kernel)),
            jax.jvp(op.raw, (x, kernel), (x, kernel)),
        ),
        (
            jax.grad(
                loss(lambda x, k: masked_layers.masked_contraction(op, x, mask, k))
            )(x, kernel),
            jax.grad(loss(lambda x, k: op.raw(x * mask, k)))(x, kernel),
        ),
    ):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "size, window, stride, padding",
    [
        (28, 3, 2, "SAME"),
        (15, 5, 2, "VALID"),
        (10, 4, 3, ((2, 1), (1, 2))),
    ],
)
def test_conv_transpose_equals_the_vjp(size, window, stride, padding):
    op = masked_layers.conv_op((stride, stride), padding)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    kernel = jax.random.normal(jax.random.key(1), (window, window, 3, 4))
    y, vjp = jax.vjp(lambda v: op(v, kernel), x)
    ct = jax.random.normal(jax.random.key(2), y.shape)
    np.testing.assert_allclose(
        op.transpose(ct, kernel, (size, size)), vjp(ct)[0], rtol=1e-5, atol=1e-5
    )


def test_input_gradients_inside_a_loop_use_plain_hwio_kernels():
    """JAX's own conv transpose (kernel read as ``01oi``) ran 17x slower inside
    XLA:CPU loops; the written-out tangent keeps every kernel ``01io``."""
    net = gp.load("lenet5-fmnist").model

    def pgd_like(x):
        def body(_, v):
            return v + jax.grad(lambda u: jnp.sum(net(u)))(v)

        return jax.lax.fori_loop(0, 2, body, x)

    hlo = jax.jit(pgd_like).lower(jnp.zeros((2, 28, 28, 1))).compile().as_text()
    labels = re.findall(r"dim_labels=([^,}\s]+)", hlo)
    assert labels and all("_01io->" in label for label in labels), labels


@pytest.mark.parametrize(
    "strides, padding, x_shape, k_hw",
    [
        ((1, 1), "SAME", (2, 6, 6, 3), (3, 3)),
        ((2, 2), "SAME", (2, 7, 8, 3), (3, 3)),  # SAME pads unevenly at stride 2
        ((2, 1), "VALID", (1, 9, 7, 2), (5, 3)),
        ((1, 2), ((2, 0), (1, 1)), (2, 5, 6, 4), (3, 2)),
    ],
)
def test_depthwise_shifted_products_equal_the_grouped_convolution(
    strides, padding, x_shape, k_hw
):
    """Depthwise convolutions run as shifted products: the same values and
    gradients as XLA's grouped convolution, in float64."""
    op = conv_op(strides, padding)
    rng = np.random.default_rng(2)
    with jax.enable_x64():
        x = jnp.asarray(rng.normal(size=x_shape))
        k = jnp.asarray(rng.normal(size=(*k_hw, 1, x_shape[-1])))
        groups = x_shape[-1]
        np.testing.assert_allclose(op(x, k, groups), op.raw(x, k, groups), atol=1e-12)

        def loss(f):
            return lambda x, k: jnp.sum(jnp.sin(f(x, k, groups)))

        got = jax.grad(loss(op), (0, 1))(x, k)
        want = jax.grad(loss(op.raw), (0, 1))(x, k)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-12)
