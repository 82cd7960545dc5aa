"""Channel shuffle (ShuffleNet): the channels seen as ``groups`` groups, then
interleaved.

Output channel ``j`` is input channel ``(j % g) * (C / g) + j // g`` (PyTorch's
``view(N, g, C / g, H, W).transpose(1, 2).view(N, C, H, W)``). Pruning would have
to follow the permutation through every space it mixes, so the channels it reads
are not prunable (flow ``couple``): in a ShuffleNet block that fixes the
concatenated branch outputs, while the units inside each branch stay prunable.
A permutation is linear with 0/1 coefficients: bounds move with the channels.
"""

from __future__ import annotations

import numpy as np

from .base import ShapeOp


def shuffle_index(channels: int, groups: int) -> np.ndarray:
    """The input channel of each output channel."""
    j = np.arange(channels)
    return (j % groups) * (channels // groups) + j // groups


class ChannelShuffle(ShapeOp):
    name = "channel_shuffle"
    flow = "couple"

    def shape_apply(self, node, x):
        g, c = node.attr("groups"), x.shape[-1]
        y = x.reshape(*x.shape[:-1], g, c // g)
        return y.swapaxes(-1, -2).reshape(x.shape)

    def onnx(self, w, node, ins):
        h, wd, c = node.shape
        g, n = node.attr("groups"), node.name
        grouped = w.const(f"{n}.grouped", np.array([0, g, c // g, h, wd], np.int64))
        flat = w.const(f"{n}.shape", np.array([0, c, h, wd], np.int64))
        x = w.emit("Reshape", [ins[0], grouped], f"{n}.groups")
        x = w.emit("Transpose", [x], f"{n}.swapped", perm=[0, 2, 1, 3, 4])
        return w.emit("Reshape", [x, flat], n)

    def torch(self, graph, node, ins, in_shape):
        x, g = ins[0], node.attr("groups")
        n, c, h, w = x.shape
        return x.view(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)
