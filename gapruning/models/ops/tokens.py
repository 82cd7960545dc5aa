"""Token sequences ``(T, C)``, channels last, as vision transformers use them.

``tokens`` turns a feature map ``(H, W, C)`` into its ``H * W`` positions in
row-major order (a ViT's patch embedding: a convolution with stride = patch, then
this); ``class_token`` puts ``K`` learned tokens before the sequence (a class
token, a distillation token); ``pos_embedding`` adds a learned ``(T, C)`` table;
``select_token`` takes one token (``x[:, 0]``, the class token before the head).
All four keep the channels of their input (flow ``channelwise``), so a mask and
compaction act on the channel (last) axis as for feature maps; the learned
tables keep the columns of the kept channels. In a transformer these channels,
with the residual additions and LayerNorms they reach, are the residual stream:
one group, which ``tokens`` names ``"stream"``. Exported tensors are ``(N, T, C)``,
as PyTorch's transformers have them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .base import LinearOp, Op, ShapeOp, unit_terms


class Embedding(nnx.Module):
    """A learned table ``embedding`` (tokens, channels)."""

    def __init__(self, shape: tuple[int, int], rngs: nnx.Rngs):
        self.embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), shape))


class Tokens(ShapeOp):
    """``(H, W, C) -> (H * W, C)``."""

    name = "tokens"

    def group_name(self, node):
        return "stream"

    def shape_apply(self, node, x):
        return x.reshape(*x.shape[:-3], -1, x.shape[-1])

    def onnx(self, w, node, ins):
        shape = w.const(
            f"{node.name}.shape", np.array([0, node.shape[-1], -1], np.int64)
        )
        x = w.emit("Reshape", [ins[0], shape], f"{node.name}.chw")
        return w.emit("Transpose", [x], node.name, perm=[0, 2, 1])

    def torch(self, graph, node, ins, in_shape):
        return ins[0].flatten(2).transpose(1, 2)


class TableOp(Op):
    """An op holding one learned ``(tokens, C)`` table (exported as an
    ``nn.Embedding``'s weight)."""

    flow = "channelwise"
    variables = ("embedding",)

    def rows(self, node) -> int:
        """The table's number of tokens (each table op says how it knows)."""
        self.missing(node, "table row count")

    def layer(self, node, in_shape, rngs):
        return Embedding((self.rows(node), node.shape[-1]), rngs)

    def cost(self, node, ref):
        return unit_terms(self.rows(node), ref(node.name)), []

    def compact_params(self, node, p, rows, cols):
        return {"embedding": p["embedding"][:, cols]}

    def torch_layer(self, node, in_shape):
        from torch import nn

        return nn.Embedding(self.rows(node), node.shape[-1])

    def torch_state(self, node, p, chw):
        return {"weight": p["embedding"]}


class ClassToken(TableOp):
    """``count`` learned tokens put before the sequence: ``(T, C) -> (T + K, C)``."""

    name = "class_token"

    def rows(self, node):
        return node.attr("count")

    def apply(self, node, layer, xs):
        return self._prepend(layer.embedding[...], xs[0])

    def _prepend(self, table, x):
        table = jnp.broadcast_to(table.astype(x.dtype), (*x.shape[:-2], *table.shape))
        return jnp.concatenate([table, x], axis=-2)

    def bounds(self, node, p, ins):
        lo, hi = ins[0]
        return self._prepend(p["embedding"], lo), self._prepend(p["embedding"], hi)

    def delta(self, node, p, ins, dense):
        c, r = ins[0]
        zero = jnp.zeros_like(p["embedding"])
        return self._prepend(zero, c), self._prepend(zero, r)

    def onnx(self, w, node, ins):
        n, (k, c) = node.name, w.params[node.name]["embedding"].shape
        table = w.const(f"{n}.table", w.params[n]["embedding"][None])
        batch = w.emit("Shape", [ins[0]], f"{n}.batch", start=0, end=1)
        rest = w.const(f"{n}.rest", np.array([k, c], np.int64))
        shape = w.emit("Concat", [batch, rest], f"{n}.shape", axis=0)
        tokens = w.emit("Expand", [table, shape], f"{n}.tokens")
        return w.emit("Concat", [tokens, ins[0]], n, axis=1)

    def torch(self, graph, node, ins, in_shape):
        import torch

        table = getattr(graph, node.name).weight
        return torch.cat([table.expand(ins[0].shape[0], -1, -1), ins[0]], 1)


class PosEmbedding(TableOp, LinearOp):
    """``x + embedding``, a learned ``(T, C)`` table."""

    name = "pos_embedding"

    def rows(self, node):
        return node.shape[0]

    def linear(self, node, p, x, *, absolute, bias):
        return x + p["embedding"] if bias else x

    def onnx(self, w, node, ins):
        table = w.const(f"{node.name}.table", w.params[node.name]["embedding"])
        return w.emit("Add", [ins[0], table], node.name)

    def torch(self, graph, node, ins, in_shape):
        return ins[0] + getattr(graph, node.name).weight


class SelectToken(ShapeOp):
    """Token ``index`` of the sequence: ``(T, C) -> (C,)``."""

    name = "select_token"

    def shape_apply(self, node, x):
        return x[..., node.attr("index"), :]

    def onnx(self, w, node, ins):
        index = w.const(f"{node.name}.index", np.array(node.attr("index"), np.int64))
        return w.emit("Gather", [ins[0], index], node.name, axis=1)

    def torch(self, graph, node, ins, in_shape):
        return ins[0][:, node.attr("index")]
