"""The ops that route tensors: input, mask, add, flatten and channel_map.

``mask`` multiplies a tensor by its group's mask, each entry repeated over the
``unit`` channels of one unit (attention heads); its "parameters" ``p`` in
:meth:`~gapruning.models.ops.base.Op.bounds` and ``delta``, and the ``layer`` the
executor passes, are that channel vector. ``add`` joins its inputs' channel spaces
into one group (residual connections); ``flatten`` and ``channel_map`` read their
input through a mask like Dense/Conv do, because they move channels.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .base import Op, ShapeOp


class Input(Op):
    name = "input"
    flow = "source"

    def onnx(self, w, node, ins):
        return "input"


class Mask(Op):
    name = "mask"
    flow = "channelwise"
    needs_dense_bounds = True
    uses_masks = True

    def mask_vector(self, node, lookup):
        m, unit = lookup(node.attr("group")), node.attr("unit", 1)
        return m if unit == 1 else jnp.repeat(jnp.asarray(m), unit, axis=-1)

    def mask_groups(self, node):
        return {node.attr("group"): node.shape[-1] // node.attr("unit", 1)}

    def apply(self, node, layer, xs):
        return xs[0] * layer.astype(xs[0].dtype)

    def bounds(self, node, p, ins):
        a, b = ins[0]
        if p is None:
            return a, b
        m = jnp.asarray(p, a.dtype)
        return a * m, b * m  # masks are >= 0

    def delta(self, node, p, ins, dense):
        """``m d + (m - 1) a`` with ``a`` in the dense bounds (Paoding's impact)."""
        c, r = ins[0]
        m = jnp.asarray(p, c.dtype)
        a, b = dense[0]
        ac, ar = (a + b) / 2, (b - a) / 2
        return m * c + (m - 1) * ac, jnp.abs(m) * r + jnp.abs(m - 1) * ar

    def onnx(self, w, node, ins):
        m = np.asarray(self.mask_vector(node, w.masks.__getitem__), np.float32)
        if np.all(m == 1.0):
            return ins[0]
        shape = (-1, 1, 1) if len(node.shape) == 3 else (-1,)
        value = w.const(f"{node.name}.value", m.reshape(shape))
        return w.emit("Mul", [ins[0], value], node.name)

    def torch(self, graph, node, ins, in_shape):
        m = graph.mask(node.attr("group")).repeat_interleave(node.attr("unit", 1))
        return ins[0] * (m.view(1, -1, 1, 1) if ins[0].dim() == 4 else m)


class Add(Op):
    """Elementwise sum of equally shaped tensors; joins their channel spaces."""

    name = "add"
    flow = "join"

    def group_name(self, node):
        return node.attr("group")

    def apply(self, node, layer, xs):
        return sum(xs[1:], xs[0])

    def bounds(self, node, p, ins):
        return sum(i[0] for i in ins), sum(i[1] for i in ins)

    def delta(self, node, p, ins, dense):
        return self.bounds(node, p, ins)

    def onnx(self, w, node, ins):
        out = ins[0]
        for i, other in enumerate(ins[1:], start=1):
            name = node.name if i == len(ins) - 1 else f"{node.name}.{i}"
            out = w.emit("Add", [out, other], name)
        return out

    def torch(self, graph, node, ins, in_shape):
        return sum(ins[1:], ins[0])


class Flatten(ShapeOp):
    """Everything after the batch axis as one axis, in ``H, W, C`` order."""

    name = "flatten"
    flow = "reshape"
    reads_masked = True

    def shape_apply(self, node, x):
        return x.reshape(x.shape[0], -1)

    def onnx(self, w, node, ins):
        src, in_shape = ins[0], w.in_shape(node)
        if len(in_shape) == 3 and in_shape[0] * in_shape[1] > 1 and in_shape[2] > 1:
            src = w.emit("Transpose", [src], f"{node.name}.nhwc", perm=[0, 2, 3, 1])
        return w.emit("Flatten", [src], node.name, axis=1)

    def torch(self, graph, node, ins, in_shape):
        import torch

        return torch.flatten(ins[0], 1)


def _is_padding_index(index, c) -> bool:
    return tuple(index[:c]) == tuple(range(c)) and all(i == -1 for i in index[c:])


class ChannelMap(ShapeOp):
    """Parameter-free shortcut: spatial subsampling by ``stride``, then output
    channel ``j`` copies input channel ``index[j]`` (``-1``: zeros)."""

    name = "channel_map"
    flow = "remap"
    reads_masked = True

    def shape_apply(self, node, x):
        s, index = node.attr("stride"), jnp.asarray(node.attr("index"))
        x = x[:, ::s, ::s, :]
        picked = jnp.take(x, jnp.maximum(index, 0), axis=-1)
        return jnp.where(index >= 0, picked, 0.0)

    def compact_attrs(self, node, attrs, cols, in_index):
        position = {int(c): i for i, c in enumerate(in_index)}
        index = tuple(position.get(int(attrs["index"][j]), -1) for j in cols)
        return {**attrs, "index": index}

    def onnx(self, w, node, ins):
        stride, index = node.attr("stride"), list(node.attr("index"))
        c = w.in_shape(node)[-1]
        out = w.slice(node, ins[0], stride) if stride > 1 else ins[0]
        if index == list(range(c)):
            return w.emit("Identity", [out], node.name)
        if _is_padding_index(index, c):
            pads = np.zeros(8, np.int64)
            pads[5] = len(index) - c
            pads = w.const(f"{node.name}.pads", pads)
            return w.emit("Pad", [out, pads], node.name, mode="constant")
        picked = w.const(
            f"{node.name}.index", np.maximum(np.asarray(index, np.int64), 0)
        )
        if all(i >= 0 for i in index):
            return w.emit("Gather", [out, picked], node.name, axis=1)
        out = w.emit("Gather", [out, picked], f"{node.name}.gathered", axis=1)
        keep = (np.asarray(index) >= 0).astype(np.float32).reshape(-1, 1, 1)
        return w.emit("Mul", [out, w.const(f"{node.name}.keep", keep)], node.name)

    def torch(self, graph, node, ins, in_shape):
        import torch

        s, index = node.attr("stride"), torch.tensor(node.attr("index"))
        v = ins[0][:, :, ::s, ::s]
        picked = v.index_select(1, index.clamp(min=0))
        keep = (index >= 0).to(v.dtype).view(1, -1, 1, 1)
        return picked * keep
