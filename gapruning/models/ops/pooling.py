"""Pooling: max, average, global average and adaptive average pooling.

All keep their input's channels unit for unit. Averages are linear with
nonnegative coefficients (bounds follow from the map itself); max pooling is
monotone (bounds are the pooled bounds, a difference lies between the window's
smallest and largest difference).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .base import Op, ShapeOp, centre_radius
from .linear import torch_pads


def apply_pool(x, node, kind: str):
    """``kind`` ("max" or "avg") pooling of ``x`` as the node's attributes say."""
    k, s, p = node.attr("window"), node.attr("strides"), node.attr("padding")
    dims, strides = (1, *k, 1), (1, *s, 1)
    pad = p if isinstance(p, str) else ((0, 0), *p, (0, 0))
    if kind == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pad)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
    if node.attr("count_include_pad") and not isinstance(p, str):
        return total / math.prod(k)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    return total / jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pad)


def _onnx_pool(w, node, ins, op: str, **extra):
    attrs = w.window_attrs(node, node.attr("window"))
    return w.emit(op, ins, node.name, **attrs, **extra)


class MaxPool(Op):
    name = "maxpool"
    flow = "channelwise"

    def apply(self, node, layer, xs):
        return apply_pool(xs[0], node, "max")

    def bounds(self, node, p, ins):
        a, b = ins[0]
        return apply_pool(a, node, "max"), apply_pool(b, node, "max")

    def delta(self, node, p, ins, dense):
        c, r = ins[0]
        lo, hi = -apply_pool(-(c - r), node, "max"), apply_pool(c + r, node, "max")
        return centre_radius(lo, hi)

    def onnx(self, w, node, ins):
        return _onnx_pool(w, node, ins, "MaxPool")

    def torch(self, graph, node, ins, in_shape):
        from torch.nn import functional as F

        k, s = tuple(node.attr("window")), tuple(node.attr("strides"))
        x = F.pad(ins[0], torch_pads(node, in_shape), value=-math.inf)
        return F.max_pool2d(x, k, s)


class AvgPool(ShapeOp):
    name = "avgpool"

    def shape_apply(self, node, x):
        return apply_pool(x, node, "avg")

    def onnx(self, w, node, ins):
        include = bool(node.attr("count_include_pad")) and not isinstance(
            node.attr("padding"), str
        )
        return _onnx_pool(w, node, ins, "AveragePool", count_include_pad=int(include))

    def torch(self, graph, node, ins, in_shape):
        from torch.nn import functional as F

        k, s, x = tuple(node.attr("window")), tuple(node.attr("strides")), ins[0]
        pads = torch_pads(node, in_shape)
        total = F.avg_pool2d(F.pad(x, pads), k, s) * (k[0] * k[1])
        if node.attr("count_include_pad") and not isinstance(node.attr("padding"), str):
            return total / (k[0] * k[1])
        ones = F.pad(x.new_ones((1, 1, *x.shape[2:])), pads)
        return total / (F.avg_pool2d(ones, k, s) * (k[0] * k[1]))


class GlobalAvgPool(ShapeOp):
    """Mean over the spatial axes: ``(H, W, C) -> (C,)``."""

    name = "global_avgpool"

    def shape_apply(self, node, x):
        return x.mean(axis=(1, 2))

    def onnx(self, w, node, ins):
        pooled = w.emit("GlobalAveragePool", ins, f"{node.name}.pooled")
        return w.emit("Flatten", [pooled], node.name, axis=1)

    def torch(self, graph, node, ins, in_shape):
        return ins[0].mean(dim=(2, 3))


def adaptive_matrix(size: int, out: int) -> np.ndarray:
    """``(out, size)`` averaging weights of PyTorch's adaptive pooling: output
    ``i`` averages inputs ``floor(i size / out)`` to ``ceil((i + 1) size / out)``."""
    m = np.zeros((out, size), np.float32)
    for i in range(out):
        lo, hi = (i * size) // out, -(-((i + 1) * size) // out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


class AdaptiveAvgPool(ShapeOp):
    """Adaptive average pooling to ``(H_out, W_out)`` (attribute ``output_size``),
    windows as in PyTorch's ``AdaptiveAvgPool2d``."""

    name = "adaptive_avgpool"

    def shape_apply(self, node, x):
        (h, w), (oh, ow) = x.shape[1:3], node.shape[:2]
        mh = jnp.asarray(adaptive_matrix(h, oh), x.dtype)
        mw = jnp.asarray(adaptive_matrix(w, ow), x.dtype)
        return jnp.einsum("bhwc,ih,jw->bijc", x, mh, mw)

    def onnx(self, w, node, ins):
        (h, wd), (oh, ow) = w.in_shape(node)[:2], node.shape[:2]
        if h % oh or wd % ow:
            self.missing(
                node, f"ONNX export from {h}x{wd} to {oh}x{ow} (not a divisor)"
            )
        k = (h // oh, wd // ow)
        pads = [0, 0, 0, 0]
        return w.emit(
            "AveragePool",
            ins,
            node.name,
            kernel_shape=list(k),
            strides=list(k),
            pads=pads,
        )

    def torch(self, graph, node, ins, in_shape):
        from torch.nn import functional as F

        return F.adaptive_avg_pool2d(ins[0], tuple(node.shape[:2]))
