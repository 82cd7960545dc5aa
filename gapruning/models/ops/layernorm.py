"""LayerNorm over the channel (last) axis, over the kept channels only.

Its mean and variance mix the channels it normalizes, so removing a channel
changes the others; as in ViT-Slim (Chavan et al., 2022) and NViT (Yang et al.,
2023) a pruned LayerNorm therefore takes them over the kept channels,
``mean = sum(m x) / sum(m)`` and ``var = sum(m (x - mean)^2) / sum(m)``, and
outputs its bias at the removed ones (which every reader ignores: they read
through masks). That is exactly the LayerNorm of the compacted, narrower
network, so its channels are channel-wise for pruning (flow ``channelwise``: a
ViT's residual stream is one group). It reads its input through a mask and
needs that mask (:attr:`~gapruning.models.ops.Op.needs_input_mask`): with every
channel kept it is the plain LayerNorm. Exported masked (not compacted), it is
PyTorch's LayerNorm on the kept channels; ONNX export needs the compacted model.

Interval bounds (:func:`normalized_bounds`): for ``x`` in a box, ``x_c - mean``
is linear in ``x``, so it lies in an interval; the variance lies between the mean
square of those intervals' distances from 0 and of their largest magnitudes, so
each normalized value is bounded by the corners of the quotient; it is never
beyond ``sqrt(K - 1)`` in size (a zero-mean vector of ``K`` kept values with mean
square below 1). Masks are 0/1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import Op, bounds_difference, centre_radius, unit_terms


def _kept(x, mask):
    """``(m, k)``: the mask as a vector (ones if None) and its kept count."""
    x = jnp.asarray(x)
    m = jnp.ones(x.shape[-1], x.dtype) if mask is None else jnp.asarray(mask, x.dtype)
    return m, jnp.maximum(m.sum(), 1.0)


def normalize(x, mask, eps: float):
    """``m (x - mean) / sqrt(var + eps)`` over the last axis, the mean and the
    variance over the channels where ``mask`` is 1 (all where it is None)."""
    m, k = _kept(x, mask)
    mean = (m * x).sum(-1, keepdims=True) / k
    d = m * (x - mean)
    return d * jax.lax.rsqrt((d * d).sum(-1, keepdims=True) / k + eps)


def normalized_bounds(lo, hi, eps: float, mask=None):
    """Bounds of :func:`normalize` for every ``x`` with ``lo <= x <= hi``."""
    m, k = _kept(lo, mask)
    cap = jnp.sqrt(k - 1.0)
    # x_c - mean = (1 - 1/K) x_c - (1/K) sum_{kept j != c} x_j
    spread = m * (hi - lo) / k
    d_lo = lo - (m * hi).sum(-1, keepdims=True) / k + spread
    d_hi = hi - (m * lo).sum(-1, keepdims=True) / k - spread
    # |x_c - mean| is at least the distance of [d_lo, d_hi] from 0
    near = jnp.maximum(jnp.maximum(d_lo, -d_hi), 0) ** 2
    var_lo = (m * near).sum(-1, keepdims=True) / k
    var_hi = (m * jnp.maximum(d_lo**2, d_hi**2)).sum(-1, keepdims=True) / k
    # floored: with eps 0 and no spread only the size bound (the clip) holds
    s_lo = jnp.maximum(jnp.sqrt(var_lo + eps), 1e-30)
    s_hi = jnp.sqrt(var_hi + eps)
    corners = jnp.stack([d_lo / s_lo, d_lo / s_hi, d_hi / s_lo, d_hi / s_hi])
    return (
        m * jnp.clip(corners.min(0), -cap, cap),
        m * jnp.clip(corners.max(0), -cap, cap),
    )


def _removed(mask) -> bool:
    """Whether the mask vector ``mask`` (None: no mask) removes channels."""
    return mask is not None and not np.all(np.asarray(mask) == 1.0)


def _torch_kept(layer, x, mask):
    """The ``nn.LayerNorm`` ``layer`` on the channels ``mask`` keeps of ``x``
    (channels last), its bias at the others."""
    if not _removed(mask):
        return layer(x)
    from torch.nn import functional as F

    kept = np.flatnonzero(np.asarray(mask)).tolist()
    w, b = layer.weight[kept], layer.bias[kept]
    y = layer.bias.expand_as(x).clone()
    y[..., kept] = F.layer_norm(x[..., kept], (len(kept),), w, b, layer.eps)
    return y


class LayerNorm(Op):
    name = "layernorm"
    flow = "channelwise"
    reads_masked = True
    needs_input_mask = True
    variables = ("scale", "bias")
    needs_dense_bounds = True

    def layer(self, node, in_shape, rngs):
        return nnx.LayerNorm(in_shape[-1], epsilon=node.attr("epsilon"), rngs=rngs)

    def apply(self, node, layer, xs):
        z = normalize(xs[0], layer["mask"], node.attr("epsilon"))
        return z * layer["scale"] + layer["bias"]

    def bounds(self, node, p, ins):
        eps = node.attr("epsilon")
        z_lo, z_hi = normalized_bounds(*ins[0], eps, p["mask"])
        c, r = centre_radius(z_lo, z_hi)
        c, r = c * p["scale"] + p["bias"], r * jnp.abs(p["scale"])
        return c - r, c + r

    def delta(self, node, p, ins, dense):
        """The pruned LayerNorm (over the kept channels) minus the dense one."""
        full = {**p, "mask": None}
        return bounds_difference(
            lambda lo, hi: self.bounds(node, p, [(lo, hi)]),
            ins[0],
            dense[0],
            lambda lo, hi: self.bounds(node, full, [(lo, hi)]),
        )

    def cost(self, node, ref):
        return unit_terms(2, ref(node.name)), []

    def onnx(self, w, node, ins):
        if _removed(w.input_mask(node)):
            self.missing(node, "ONNX export with channels masked (compact it first)")
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
        layer, x, mask = getattr(graph, node.name), ins[0], graph.input_mask(node)
        if x.dim() != 4:
            return _torch_kept(layer, x, mask)
        return _torch_kept(layer, x.permute(0, 2, 3, 1), mask).permute(0, 3, 1, 2)

    def torch_state(self, node, p, chw):
        if chw is not None:
            self.missing(node, "PyTorch form after a flatten of a feature map")
        return {"weight": p["scale"], "bias": p["bias"]}
