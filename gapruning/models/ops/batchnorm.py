"""BatchNorm (inference): a per-channel affine map with running statistics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import LinearOp, unit_terms


class BatchNorm(LinearOp):
    name = "batchnorm"
    flow = "channelwise"
    variables = ("scale", "bias", "mean", "var")

    def layer(self, node, in_shape, rngs):
        return nnx.BatchNorm(
            in_shape[-1],
            epsilon=node.attr("epsilon"),
            momentum=node.attr("momentum"),
            rngs=rngs,
        )

    def apply(self, node, layer, xs):
        return layer(xs[0])

    def scale(self, node, p):
        """``gamma / sqrt(var + eps)`` per channel."""
        return p["scale"] * jax.lax.rsqrt(p["var"] + node.attr("epsilon"))

    def linear(self, node, p, x, *, absolute, bias):
        s = self.scale(node, p)
        if absolute:
            return x * jnp.abs(s)
        return (x - p["mean"]) * s + p["bias"] if bias else x * s

    def cost(self, node, ref):
        return unit_terms(2, ref(node.name)), []

    def onnx(self, w, node, ins):
        p = w.params[node.name]
        args = [ins[0]] + [
            w.const(f"{node.name}.{k}", p[k]) for k in ("scale", "bias", "mean", "var")
        ]
        return w.emit(
            "BatchNormalization", args, node.name, epsilon=node.attr("epsilon")
        )

    def torch_layer(self, node, in_shape):
        from torch import nn

        cls = nn.BatchNorm2d if len(node.shape) == 3 else nn.BatchNorm1d
        return cls(
            node.shape[-1],
            eps=node.attr("epsilon"),
            momentum=1.0 - node.attr("momentum"),
        )

    def torch_state(self, node, p, chw):
        from ...convert.common import hwc_rows_to_chw

        names = {
            "scale": "weight",
            "bias": "bias",
            "mean": "running_mean",
            "var": "running_var",
        }
        out = {
            theirs: p[ours] if chw is None else hwc_rows_to_chw(p[ours], chw)
            for ours, theirs in names.items()
        }
        out["num_batches_tracked"] = np.zeros((), np.int64)
        return out

    def torch(self, graph, node, ins, in_shape):
        return getattr(graph, node.name)(ins[0])
