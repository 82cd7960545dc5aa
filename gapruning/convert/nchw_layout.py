"""Layout changes of channels-first tensors (permutes, group views, splits).

A framework tensor lives in our graph as a :class:`Val`; its ``layout`` says how
the framework sees our ``(H, W, C)`` tensor:

* ``"nchw"``: ``(C, H, W)``, the usual case;
* ``"nhwc"``: ``(H, W, C)``, after a permute to channels-last (ConvNeXt blocks):
  nothing moves in our graph, a Linear then acts on the channel axis (a 1x1
  convolution) and a LayerNorm normalizes the channels;
* ``"grouped"``: ``(g, C / g, H, W)``, a view of the channels as ``g`` groups, and
  ``"swapped"``: ``(C / g, g, H, W)``, those two axes transposed; viewing a
  swapped tensor back as ``(C, H, W)`` is a channel shuffle (ShuffleNet).

Splitting the channels (``chunk``/``split``, ONNX Split or Slice) gives pending
channel selections, emitted as ``channel_map`` nodes when read.
"""

from __future__ import annotations

import dataclasses

from .common import UnsupportedLayerError

LAYOUTS = ("nchw", "nhwc", "grouped", "swapped")


@dataclasses.dataclass(frozen=True)
class Val:
    """A framework tensor as it lives in our graph.

    ``kind`` is ``"map"`` (framework ``(C, H, W)``, ours ``(H, W, C)``), ``"flat"``
    (framework ``(F,)``, ours ``(F,)`` with framework feature ``i`` at our index
    ``perm[i]``) or ``"pooled"`` (framework ``(C, 1, 1)``, ours ``(C,)``).
    ``stride``/``index`` describe a pending ``channel_map`` not yet emitted;
    ``layout`` and ``groups`` how the framework sees a map (module docstring).
    """

    node: str
    kind: str
    perm: tuple[int, ...] | None = None
    stride: int = 1
    index: tuple[int, ...] | None = None
    layout: str = "nchw"
    groups: int = 1


def laid_out(chw: tuple[int, int, int], layout: str, groups: int) -> tuple:
    """The framework's shape of a ``(C, H, W)`` tensor in ``layout``."""
    c, h, w = chw
    return {
        "nchw": (c, h, w),
        "nhwc": (h, w, c),
        "grouped": (groups, c // max(groups, 1), h, w),
        "swapped": (c // max(groups, 1), groups, h, w),
    }[layout]


# framework axis permutations (batch axis included) that change only the layout
PERMUTES = {
    ("nchw", (0, 2, 3, 1)): "nhwc",
    ("nhwc", (0, 3, 1, 2)): "nchw",
    ("grouped", (0, 2, 1, 3, 4)): "swapped",
    ("swapped", (0, 2, 1, 3, 4)): "grouped",
    ("nchw", (0, 2, 1)): "nhwc",  # tokens (N, C, T) <-> (N, T, C)
    ("nhwc", (0, 2, 1)): "nchw",
}


class LayoutOps:
    """Permutes, channel-group views and channel splits (mixed into
    :class:`~gapruning.convert.nchw.NCHWGraph`)."""

    def unsupported(self, what: str):
        raise UnsupportedLayerError(f"{self.where}: unsupported {what}")

    def channel_axis(self, x: Val) -> int:
        """The framework axis (batch axis 0) that indexes ``x``'s channels."""
        if x.kind == "flat" or x.layout == "nchw":
            return 1
        if x.layout == "nhwc":
            return 3
        self.unsupported(f"channel axis of a {x.layout} view {self.fw_shape(x)}")

    def permute(self, x: Val, dims, *, name: str) -> Val:
        """``x.permute(dims)``: NCHW <-> NHWC, or swapping the two group axes of
        a grouped view; other permutations are unsupported."""
        x = self._real(x)
        rank = len(self.fw_shape(x)) + 1
        dims = tuple(int(d) % rank for d in dims)
        if dims == tuple(range(rank)):
            return x
        layout = PERMUTES.get((x.layout, dims))
        if layout is None or x.kind == "flat":
            self.unsupported(
                f"permute {name!r} of a tensor of shape {self.fw_shape(x)} to axes "
                f"{dims} (only NCHW <-> NHWC, and the group axes of a channel "
                "shuffle)"
            )
        return dataclasses.replace(x, layout=layout)

    def transpose(self, x: Val, a: int, b: int, *, name: str) -> Val:
        """``x.transpose(a, b)``, as the permutation swapping axes ``a`` and ``b``."""
        dims = list(range(len(self.fw_shape(x)) + 1))
        dims[a], dims[b] = dims[b], dims[a]
        return self.permute(x, dims, name=name)

    def reshape(self, x: Val, shape, *, name: str) -> Val:
        """``x.view(shape)`` (batch entry ``-1``, ``0`` or the batch size): to
        ``(N, features)``, a map to ``(N, C, H * W)`` (tokens), a map to
        ``(N, g, C / g, H, W)`` and such a view back to ``(N, C, H, W)`` (a
        channel shuffle when the groups were swapped)."""
        x = self._real(x)
        have, want = self.fw_shape(x), tuple(int(d) for d in shape[1:])
        total = 1
        for d in have:
            total *= d
        if want == have:
            return x
        if len(want) == 1 and want[0] in (-1, total) and x.layout in ("nchw", "nhwc"):
            return self.flatten(x, name=name)
        if x.kind == "map" and x.layout == "nchw" and len(want) == 2:
            c, h, w = have
            if want in ((c, h * w), (c, -1), (-1, h * w)):
                return self.tokens(x, name=name)
        if x.kind == "map" and x.layout == "nchw" and len(want) == 4:
            g = want[0]
            c, h, w = have
            if g > 0 and c % g == 0 and want[1:] in ((c // g, h, w), (-1, h, w)):
                return dataclasses.replace(x, layout="grouped", groups=g)
        if x.layout in ("grouped", "swapped") and len(want) == 3:
            c, h, w = self.g.shape(x.node)[-1], *have[2:]
            if want in ((c, h, w), (-1, h, w), (c, -1, w), (c, h, -1)):
                return self.ungroup(x, name=name)
        self.unsupported(
            f"reshape {name!r} of a tensor of shape {have} to {tuple(shape)} (only "
            "to (N, features), (N, C, H * W) tokens, and the channel-group views "
            "of a channel shuffle)"
        )

    def ungroup(self, x: Val, *, name: str) -> Val:
        """A grouped view seen as ``(C, H, W)`` again; swapped groups are a
        ``channel_shuffle``."""
        plain = dataclasses.replace(x, layout="nchw", groups=1)
        if x.layout == "grouped":
            return plain
        node = self.g.channel_shuffle(x.node, x.groups, name=self.name(name))
        return dataclasses.replace(plain, node=node)

    def split(self, x: Val, sizes, axis: int, *, name: str) -> list[Val]:
        """``x`` cut into consecutive channel ranges of ``sizes`` (channel axis
        only): each a pending channel selection."""
        c = self.fw_shape(x)[0]
        if x.kind != "map" or x.layout != "nchw" or axis % 4 != 1:
            self.unsupported(
                f"split {name!r} of a tensor of shape {self.fw_shape(x)} along axis "
                f"{axis} (only the channels of a feature map)"
            )
        if sum(sizes) != c or min(sizes) < 1:
            self.unsupported(f"split {name!r} of {c} channels into {tuple(sizes)}")
        out, start = [], 0
        for size in sizes:
            part = range(start, start + size)
            out.append(self.select_channels(x, part, name=f"{name}_{len(out)}"))
            start += size
        return out


def chunk_sizes(c: int, chunks: int) -> list[int]:
    """The sizes ``torch.chunk`` cuts ``c`` entries into."""
    step = -(-c // chunks)
    return [min(step, c - s) for s in range(0, c, step)]
