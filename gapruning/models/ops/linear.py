"""Dense and Conv: the producers of prunable units.

Their output channels are a new prunable group; a mask is put in front of them
when they read a prunable tensor, and the executor folds it into the contraction
(:mod:`~gapruning.models.masked_layers`). Compaction keeps the kernel rows of the
kept input units and the columns of the kept output units.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from ..masked_layers import conv_op, dense_op
from .base import LinearOp, pair_terms, unit_terms


def _with_bias(y, p, bias: bool):
    return y + p["bias"] if bias and "bias" in p else y


class Producer(LinearOp):
    """Shared parts of Dense and Conv (kernel ``(..., in, out)``, optional bias)."""

    flow = "producer"
    reads_masked = True
    variables = ("kernel", "bias")

    def window(self, node) -> int:
        """Kernel positions per input-output pair."""
        return 1

    def area(self, node) -> int:
        """Output positions per sample (multiply-accumulates per kernel weight)."""
        return 1

    def cost(self, node, ref):
        ins, outs, k = ref(node.inputs[0]), ref(node.name), self.window(node)
        params = pair_terms(k, ins, outs)
        if node.attr("use_bias"):
            params += unit_terms(1, outs)
        return params, pair_terms(self.area(node) * k, ins, outs)

    def compact_params(self, node, p, rows, cols):
        q = {"kernel": p["kernel"][..., rows, :][..., cols]}
        if "bias" in p:
            q["bias"] = p["bias"][cols]
        return q

    def compact_attrs(self, node, attrs, cols, in_index):
        return {**attrs, "features": len(cols)}

    def contraction(self, node):
        """``op(x, kernel)`` of :mod:`~gapruning.models.masked_layers`."""
        raise NotImplementedError

    def torch(self, graph, node, ins, in_shape):
        return getattr(graph, node.name)(ins[0])

    def torch_state(self, node, p, chw):
        out = {"weight": self.torch_weight(p["kernel"], chw)}
        if "bias" in p:
            out["bias"] = p["bias"]
        return out

    def torch_weight(self, kernel, chw):
        """The kernel in torch's layout."""
        raise NotImplementedError


class Dense(Producer):
    """On the last axis: of a vector, or of each token of a ``(T, C)`` sequence."""

    name = "dense"

    def area(self, node):
        return math.prod(node.shape[:-1])

    def layer(self, node, in_shape, rngs):
        return nnx.Linear(
            in_shape[-1],
            node.attr("features"),
            use_bias=node.attr("use_bias"),
            rngs=rngs,
        )

    def contraction(self, node):
        return dense_op

    def linear(self, node, p, x, *, absolute, bias):
        k = jnp.abs(p["kernel"]) if absolute else p["kernel"]
        return _with_bias(x @ k, p, bias)

    def torch_weight(self, kernel, chw):
        from ...convert.common import hwc_rows_to_chw

        k = kernel if chw is None else hwc_rows_to_chw(kernel, chw)
        return k.T.copy()

    def onnx(self, w, node, ins):
        p = w.params[node.name]
        if len(node.shape) == 1:
            args = w.weighted(node, ins[0], p["kernel"].T.copy())
            return w.emit("Gemm", args, node.name, transB=1)
        kernel = w.const(f"{node.name}.weight", p["kernel"])
        if "bias" not in p:
            return w.emit("MatMul", [ins[0], kernel], node.name)
        y = w.emit("MatMul", [ins[0], kernel], f"{node.name}.matmul")
        return w.emit("Add", [y, w.const(f"{node.name}.bias", p["bias"])], node.name)

    def torch_layer(self, node, in_shape):
        from torch import nn

        return nn.Linear(
            in_shape[-1], node.attr("features"), bias=node.attr("use_bias")
        )


class Conv(Producer):
    name = "conv"

    def window(self, node):
        return math.prod(node.attr("kernel_size"))

    def area(self, node):
        return math.prod(node.shape[:-1])

    def layer(self, node, in_shape, rngs):
        return nnx.Conv(
            in_shape[-1],
            node.attr("features"),
            kernel_size=node.attr("kernel_size"),
            strides=node.attr("strides"),
            padding=node.attr("padding"),
            use_bias=node.attr("use_bias"),
            rngs=rngs,
        )

    def torch_weight(self, kernel, chw):
        return kernel.transpose(3, 2, 0, 1).copy()

    def contraction(self, node):
        return conv_op(node.attr("strides"), node.attr("padding"))

    def linear(self, node, p, x, *, absolute, bias):
        k = jnp.abs(p["kernel"]) if absolute else p["kernel"]
        dtype = jnp.promote_types(x.dtype, k.dtype)
        # a ConvOp: its gradients stay fast inside loops (lipschitz's power
        # iteration; see ConvOp.transpose)
        y = self.contraction(node)(x.astype(dtype), k.astype(dtype))
        return _with_bias(y, p, bias)

    def onnx(self, w, node, ins):
        kernel = w.params[node.name]["kernel"].transpose(3, 2, 0, 1)
        return w.emit(
            "Conv",
            w.weighted(node, ins[0], kernel),
            node.name,
            **w.window_attrs(node, node.attr("kernel_size")),
        )

    def torch_layer(self, node, in_shape):
        from torch import nn

        return nn.Conv2d(
            in_shape[-1],
            node.attr("features"),
            tuple(node.attr("kernel_size")),
            stride=tuple(node.attr("strides")),
            bias=node.attr("use_bias"),
        )

    def torch(self, graph, node, ins, in_shape):
        from torch.nn import functional as F

        return getattr(graph, node.name)(F.pad(ins[0], torch_pads(node, in_shape)))


def torch_pads(node, in_shape, window=None) -> tuple[int, int, int, int]:
    """``F.pad`` amounts ``(left, right, top, bottom)`` of a windowed node."""
    from ...convert.export import explicit_pads

    k = window or node.attr("kernel_size") or node.attr("window")
    (t, b), (lf, r) = explicit_pads(
        node.attr("padding"), in_shape[:2], k, node.attr("strides")
    )
    return lf, r, t, b
