"""Elementwise product of two tensors: squeeze-excite gates.

``mul(x, gate)`` multiplies a feature map ``(H, W, C)`` by a gate of the same
shape or a per-channel gate ``(C,)`` (broadcast over positions). Both index the
same channels, so the op joins their channel spaces (flow ``join``): pruning a
channel of ``x`` removes the same channel of the layer that produced the gate.
Bounds multiply intervals; the difference of ``(a + da)(b + db) - a b`` is
bounded by ``a db + b da + da db`` in interval arithmetic.
"""

from __future__ import annotations

import numpy as np

from .base import Op, centre_radius, hull


def _like(gate, x):
    """``gate`` reshaped to broadcast against ``x`` (a ``(B, C)`` gate against a
    ``(B, H, W, C)`` map)."""
    if gate.ndim == x.ndim:
        return gate
    return gate.reshape(gate.shape[0], *([1] * (x.ndim - gate.ndim)), gate.shape[-1])


def _times(a, b):
    """Interval product of ``a = (lo, hi)`` and ``b = (lo, hi)``."""
    return hull(a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1])


class Mul(Op):
    name = "mul"
    flow = "join"
    needs_dense_bounds = True

    def apply(self, node, layer, xs):
        x, gate = xs
        return x * _like(gate, x)

    def bounds(self, node, p, ins):
        (xa, xb), (ga, gb) = ins
        return _times((xa, xb), (_like(ga, xa), _like(gb, xa)))

    def delta(self, node, p, ins, dense):
        (cx, rx), (cg, rg) = ins
        cg, rg = _like(cg, cx), _like(rg, cx)
        ax, (ga, gb) = dense[0], dense[1]
        ag = (_like(ga, cx), _like(gb, cx))
        dx, dg = (cx - rx, cx + rx), (cg - rg, cg + rg)
        terms = [_times(ax, dg), _times(ag, dx), _times(dx, dg)]
        return centre_radius(sum(t[0] for t in terms), sum(t[1] for t in terms))

    def onnx(self, w, node, ins):
        x, gate = ins
        if len(w.shapes[node.inputs[1]]) < len(node.shape):
            axes = w.const(f"{node.name}.axes", np.array([2, 3], np.int64))
            gate = w.emit("Unsqueeze", [gate, axes], f"{node.name}.gate")
        return w.emit("Mul", [x, gate], node.name)

    def torch(self, graph, node, ins, in_shape):
        x, gate = ins
        if gate.dim() < x.dim():
            gate = gate.view(gate.shape[0], -1, 1, 1)
        return x * gate
