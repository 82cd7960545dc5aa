"""The lipschitz metric against spectral norms computed by numpy's SVD."""

import jax
import jax.numpy as jnp
import numpy as np

import gapruning as gp
from gapruning.encoding import Budget, UnitEncoding
from gapruning.fitness.lipschitz import _operator, _power
from gapruning.models.graph import GraphBuilder


def test_lipschitz_on_dense_layers_equals_the_svd_reference():
    """LeNet-300-100: sum over layers of log sigma(W) - log sigma(masked W), with
    enough power iterations to converge (the default 20 is an estimate)."""
    net = gp.load("lenet300-fmnist")
    spec = {"lipschitz": {"weight": 1.0, "iterations": 400}}
    fit = gp.fitness.compose(net, spec, normalize=False)
    enc = UnitEncoding(net.space, Budget("units", 0.5))
    masks = jax.vmap(enc.decode)(jax.random.normal(jax.random.key(0), (3, 400)))
    got = np.asarray(fit.components(masks)["lipschitz"])
    layers = net.model.layers
    for i in range(3):
        m = {k: np.asarray(v[i], np.float64) for k, v in masks.items()}
        ones = np.ones(10)
        want = 0.0
        for name, m_in, m_out in (
            ("fc1", np.ones(784), m["fc1"]),
            ("fc2", m["fc1"], m["fc2"]),
            ("out", m["fc2"], ones),
        ):
            w = np.asarray(layers[name].kernel[...], np.float64)
            masked = m_in[:, None] * w * m_out[None, :]
            want += np.log(np.linalg.norm(w, 2)) - np.log(np.linalg.norm(masked, 2))
        np.testing.assert_allclose(got[i], want, rtol=1e-3)


def test_power_iteration_on_a_strided_conv_operator_equals_the_svd():
    """The conv operator (masks on both sides; its adjoint from ``jax.vjp``
    through ConvOp's tangent): the power iteration finds the largest singular
    value of the explicit matrix."""
    g = GraphBuilder((7, 7, 2))
    g.conv(g.input, 3, 3, strides=2, padding="SAME", name="c")
    node = g.build("c")[-1]
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 2, 3))
    m_in = jnp.broadcast_to(jnp.asarray([1.0, 0.0]), (7, 7, 2))
    m_out = jnp.asarray([1.0, 1.0, 0.0])
    apply = _operator(node, {"kernel": kernel}, None, None, m_in, m_out)
    matrix = jax.jacfwd(lambda v: apply(v.reshape(1, 7, 7, 2)).ravel())(jnp.zeros(98))
    v0 = jax.random.normal(jax.random.key(2), (1, 7, 7, 2))
    sigma, _ = _power(apply, v0, 300)
    np.testing.assert_allclose(sigma, np.linalg.norm(np.asarray(matrix), 2), rtol=1e-4)
