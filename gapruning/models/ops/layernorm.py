"""LayerNorm over the channel (last) axis.

Its mean and variance mix the channels it normalizes, so removing one changes
every other: the channels it reads are not prunable (flow ``couple``, like
softmax).

Interval bounds (:func:`normalized_bounds`): for ``x`` in a box, ``x_c - mean``
is linear in ``x``, so it lies in an interval; the variance lies between the mean
square of those intervals' distances from 0 and of their largest magnitudes, so
each normalized value is bounded by the corners of the quotient; it is never
beyond ``sqrt(C - 1)`` in size (a zero-mean vector of ``C`` values with mean
square below 1).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from .base import Op, bounds_difference, centre_radius, unit_terms


def normalized_bounds(lo, hi, eps: float):
    """Bounds of ``(x - mean) / sqrt(var + eps)`` over the last axis for every
    ``x`` with ``lo <= x <= hi``."""
    c = lo.shape[-1]
    cap = jnp.sqrt(c - 1.0)
    # x_c - mean = (1 - 1/C) x_c - (1/C) sum_{j != c} x_j
    d_lo = lo - hi.sum(-1, keepdims=True) / c + (hi - lo) / c
    d_hi = hi - lo.sum(-1, keepdims=True) / c - (hi - lo) / c
    # |x_c - mean| is at least the distance of [d_lo, d_hi] from 0
    var_lo = (jnp.maximum(jnp.maximum(d_lo, -d_hi), 0) ** 2).mean(-1, keepdims=True)
    var_hi = jnp.maximum(d_lo**2, d_hi**2).mean(-1, keepdims=True)
    # floored: with eps 0 and no spread only the size bound (the clip) holds
    s_lo = jnp.maximum(jnp.sqrt(var_lo + eps), 1e-30)
    s_hi = jnp.sqrt(var_hi + eps)
    corners = jnp.stack([d_lo / s_lo, d_lo / s_hi, d_hi / s_lo, d_hi / s_hi])
    return (
        jnp.clip(corners.min(0), -cap, cap),
        jnp.clip(corners.max(0), -cap, cap),
    )


class LayerNorm(Op):
    name = "layernorm"
    flow = "couple"
    variables = ("scale", "bias")
    needs_dense_bounds = True

    def layer(self, node, in_shape, rngs):
        return nnx.LayerNorm(in_shape[-1], epsilon=node.attr("epsilon"), rngs=rngs)

    def apply(self, node, layer, xs):
        return layer(xs[0])

    def bounds(self, node, p, ins):
        z_lo, z_hi = normalized_bounds(*ins[0], node.attr("epsilon"))
        c, r = centre_radius(z_lo, z_hi)
        c, r = c * p["scale"] + p["bias"], r * jnp.abs(p["scale"])
        return c - r, c + r

    def delta(self, node, p, ins, dense):
        return bounds_difference(
            lambda lo, hi: self.bounds(node, p, [(lo, hi)]), ins[0], dense[0]
        )

    def cost(self, node, ref):
        return unit_terms(2, ref(node.name)), []

    def onnx(self, w, node, ins):
        p, x, n = w.params[node.name], ins[0], node.name
        args = [w.const(f"{n}.scale", p["scale"]), w.const(f"{n}.bias", p["bias"])]
        eps = node.attr("epsilon")
        if len(node.shape) != 3:  # a vector, or tokens (N, T, C)
            return w.emit("LayerNormalization", [x, *args], n, axis=-1, epsilon=eps)
        x = w.emit("Transpose", [x], f"{n}.nhwc", perm=[0, 2, 3, 1])
        y = w.emit("LayerNormalization", [x, *args], f"{n}.ln", axis=-1, epsilon=eps)
        return w.emit("Transpose", [y], n, perm=[0, 3, 1, 2])

    def torch_layer(self, node, in_shape):
        from torch import nn

        return nn.LayerNorm(node.shape[-1], eps=node.attr("epsilon"))

    def torch(self, graph, node, ins, in_shape):
        layer, x = getattr(graph, node.name), ins[0]
        if x.dim() != 4:
            return layer(x)
        return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def torch_state(self, node, p, chw):
        if chw is not None:
            self.missing(node, "PyTorch form after a flatten of a feature map")
        return {"weight": p["scale"], "bias": p["bias"]}
