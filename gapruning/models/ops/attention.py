"""Multi-head scaled dot-product attention; its prunable units are heads.

``attention(q, k, v)`` reads three token tensors ``(T, H * d)`` (the query, key
and value projections: Dense layers) and returns ``(T, H * d)``: per head ``h``
(channels ``h * d`` to ``h * d + d - 1``), ``softmax(q_h k_h^T / sqrt(d)) v_h``.
The four tensors index the same heads (flow ``join``), so the q, k and v
projections and the attention output are one group whose unit is one head
(:meth:`unit_width` = ``head_dim``): its mask sits in front of the output
projection, which reads the attention output, and masking head ``h`` there
equals removing its channels from q, k, v and that projection's rows. The group
is named after the attention node.
Compaction keeps whole heads (fewer heads, the same ``head_dim`` and scale).

Cost (the convention of :mod:`gapruning.space`): no parameters (the projections
are Dense layers); FLOPs are the multiply-accumulates of the two matrix products
per head, ``T * T * d`` for ``q k^T`` and ``T * T * d`` for the weighted sum of
``v``, i.e. ``2 T^2`` per kept channel; the scaling and the softmax are not
counted.

Bounds: each output is a convex combination of ``v`` over the tokens, so it lies
within ``v``'s bounds over all tokens; the pruned-minus-dense difference lies
between the extremes of the pruned and the dense ranges (sound, loose).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .base import Op, bounds_difference, unit_terms


def _over_tokens(lo, hi):
    """Each channel's lowest ``lo`` and highest ``hi`` over the token axis."""
    a = jnp.broadcast_to(lo.min(-2, keepdims=True), lo.shape)
    return a, jnp.broadcast_to(hi.max(-2, keepdims=True), hi.shape)


class Attention(Op):
    name = "attention"
    flow = "join"
    needs_dense_bounds = True

    def group_name(self, node):
        return node.name

    def unit_width(self, node):
        return node.attr("head_dim")

    def apply(self, node, layer, xs):
        d = node.attr("head_dim")
        q, k, v = (x.reshape(*x.shape[:-1], x.shape[-1] // d, d) for x in xs)
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(d)
        out = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(scores, -1), v)
        return out.reshape(xs[2].shape)

    def cost(self, node, ref):
        tokens = node.shape[-2]
        return [], unit_terms(2 * tokens * tokens, ref(node.name))

    def compact_attrs(self, node, attrs, cols, in_index):
        return {**attrs, "heads": len(cols) // attrs["head_dim"]}

    def bounds(self, node, p, ins):
        return _over_tokens(*ins[2])

    def delta(self, node, p, ins, dense):
        return bounds_difference(_over_tokens, ins[2], dense[2])

    def onnx(self, w, node, ins):
        n, d = node.name, node.attr("head_dim")
        t, width = node.shape
        split = w.const(f"{n}.split", np.array([0, t, width // d, d], np.int64))
        merged = w.const(f"{n}.merged", np.array([0, t, width], np.int64))

        def heads(x, tag, perm):
            x = w.emit("Reshape", [x, split], f"{n}.{tag}.heads")
            return w.emit("Transpose", [x], f"{n}.{tag}.t", perm=perm)

        q = heads(ins[0], "q", [0, 2, 1, 3])
        k = heads(ins[1], "k", [0, 2, 3, 1])
        v = heads(ins[2], "v", [0, 2, 1, 3])
        scale = w.const(f"{n}.scale", np.array(1 / math.sqrt(d), np.float32))
        s = w.emit("MatMul", [q, k], f"{n}.scores")
        s = w.emit("Mul", [s, scale], f"{n}.scaled")
        a = w.emit("Softmax", [s], f"{n}.weights", axis=-1)
        out = w.emit("MatMul", [a, v], f"{n}.out")
        out = w.emit("Transpose", [out], f"{n}.out.t", perm=[0, 2, 1, 3])
        return w.emit("Reshape", [out, merged], n)

    def torch(self, graph, node, ins, in_shape):
        d = node.attr("head_dim")
        q, k, v = (x.unflatten(-1, (-1, d)).transpose(1, 2) for x in ins)
        a = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
        return (a @ v).transpose(1, 2).flatten(2)
