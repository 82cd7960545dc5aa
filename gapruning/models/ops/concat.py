"""Concatenation along the channel axis, and the composite mask read after it.

``concat`` puts its inputs' channels one after the other: its output indexes no
group of its own but *pieces* of its inputs' spaces (flow ``concat``), so its
channel ``offset_i + c`` is channel ``c`` of input ``i``. Compaction keeps the
kept channels of every piece, costs sum over the pieces, and a layer reading the
concatenation (or anything channel-wise after it, such as a BatchNorm) reads it
through a ``concat_mask``: the pieces' group masks one after the other (ones for
pieces that are not prunable). A concatenation whose output is also joined with
another space (added to a tensor, concatenated again into a mixed space) makes
its pieces unprunable instead (see :func:`~gapruning.models.channel_spaces`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .base import Op
from .structure import Mask


class Concat(Op):
    name = "concat"
    flow = "concat"

    def apply(self, node, layer, xs):
        return jnp.concatenate(xs, axis=-1)

    def bounds(self, node, p, ins):
        return self.apply(node, None, [i[0] for i in ins]), self.apply(
            node, None, [i[1] for i in ins]
        )

    def delta(self, node, p, ins, dense):
        return self.bounds(node, p, ins)

    def onnx(self, w, node, ins):
        return w.emit("Concat", ins, node.name, axis=1)

    def torch(self, graph, node, ins, in_shape):
        import torch

        return torch.cat(ins, dim=1)


class ConcatMask(Mask):
    """``x * [m_1, ..., m_k]``: attribute ``pieces`` holds ``(group, width)`` per
    piece (group ``""``: a piece that is not prunable, kept whole). Bounds and
    export are the mask's, with this vector."""

    name = "concat_mask"

    def mask_vector(self, node, lookup):
        return jnp.concatenate(
            [
                jnp.asarray(lookup(g), jnp.float32) if g else jnp.ones(w, jnp.float32)
                for g, w in node.attr("pieces")
            ]
        )

    def mask_groups(self, node):
        return {g: w for g, w in node.attr("pieces") if g}

    def compact_attrs(self, node, attrs, cols, in_index):
        """Each piece's width becomes its number of kept channels."""
        widths = [w for _, w in attrs["pieces"]]
        ends = np.cumsum(widths)
        kept = [
            int(((cols >= e - w) & (cols < e)).sum())
            for w, e in zip(widths, ends, strict=True)
        ]
        pieces = tuple((g, k) for (g, _), k in zip(attrs["pieces"], kept, strict=True))
        return {**attrs, "pieces": pieces}

    def torch(self, graph, node, ins, in_shape):
        import torch

        m = self.mask_vector(node, lambda g: graph.mask(g).numpy())
        m = torch.from_numpy(np.array(m))
        return ins[0] * (m.view(1, -1, 1, 1) if ins[0].dim() == 4 else m)
