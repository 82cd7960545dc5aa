"""Translates networks written for channels-first (NCHW) frameworks into our graph.

PyTorch modules (traced with ``torch.fx``) and ONNX graphs both describe tensors as
``(N, C, H, W)`` and flatten them in ``C, H, W`` order; our :class:`GraphBuilder`
graphs are channels-last and flatten in ``H, W, C`` order. :class:`NCHWGraph`
offers one method per framework operation, takes weights in the framework's own
layout (``OIHW`` conv kernels, ``(out, in)`` matrices) and emits the equivalent
nodes and Flax-layout parameters, so each importer is a thin dispatch table.

How the layouts are reconciled:

* a feature map ``(C, H, W)`` is our ``(H, W, C)`` tensor, conv kernels are
  transposed ``OIHW -> HWIO``;
* flattening a feature map produces a vector whose framework order differs from
  ours; the vector carries that permutation until a Dense or BatchNorm reads it,
  whose rows are then reordered (exact, no transpose op in the graph);
* global average pooling (``(N, C, 1, 1)`` in the framework) is our ``(C,)``
  tensor directly;
* strided spatial slicing and channel gathering/zero-padding (shortcut branches)
  become one ``channel_map`` node;
* a multiplication or addition by a per-channel constant (a layer scale) becomes
  an affine BatchNorm with identity statistics (``mean 0, var 1, epsilon 0``), or
  is folded into the bias of the Dense/Conv that produced the tensor;
* permutes to channels-last and back, channel-group views (channel shuffle) and
  channel splits change only how the framework sees a tensor
  (:mod:`~gapruning.convert.nchw_layout`): a dense layer on a channels-last map
  is a 1x1 convolution, a LayerNorm there normalizes the channels;
* a feature map reshaped to ``(N, C, H * W)`` and transposed is a token
  sequence (:mod:`~gapruning.convert.nchw_tokens`: vision transformers).

Limits: only vector outputs (a flattened feature map with more than one position
and channel cannot be the model's output, its order would differ); dense layers
read vectors, channels-last maps and channels-last tokens only.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..models.graph import GraphBuilder, Node
from .common import ConversionError, ShapeMismatchError, unique_name
from .nchw_layout import LayoutOps, Val, laid_out
from .nchw_tokens import TokenOps

__all__ = ["NCHWGraph", "Val"]


# layouts whose channels per-channel values can address (the last axis of a
# channels-last tensor: Linear, LayerNorm, a per-channel scale)
LAST = ("nchw", "nhwc")


class NCHWGraph(LayoutOps, TokenOps):
    """Builds a node tuple and its parameters from channels-first operations.

    Args:
        input_shape: the framework's input shape without batch, ``(C, H, W)`` or
            ``(F,)``.
        where: names the source in error messages (a file or module).
    """

    def __init__(self, input_shape: tuple[int, ...], *, where: str):
        self.where = where
        shape = tuple(int(d) for d in input_shape)
        if len(shape) == 3:
            c, h, w = shape
            self.g = GraphBuilder((h, w, c))
            self.input = Val(self.g.input, "map")
        elif len(shape) == 1:
            self.g = GraphBuilder(shape)
            self.input = Val(self.g.input, "flat")
        else:
            raise ConversionError(
                f"{where}: input shape {shape} is neither (C, H, W) nor (features,)"
            )
        self.params: dict[str, dict[str, np.ndarray]] = {}
        self.taken: set[str] = {self.g.input}
        self.bias_free: set[str] = set()  # dense/conv nodes created without bias

    # ---------------------------------------------------------------- helpers

    def name(self, hint: str) -> str:
        return unique_name(hint, self.taken)

    def fw_shape(self, v: Val) -> tuple[int, ...]:
        """The framework's shape of ``v`` (without batch axis)."""
        shape = self.g.shape(v.node)
        if v.kind == "map":
            h, w, c = shape
            if v.stride > 1:
                h, w = -(-h // v.stride), -(-w // v.stride)
            if v.index is not None:
                c = len(v.index)
            return laid_out((c, h, w), v.layout, v.groups)
        if v.kind == "pooled":
            return laid_out((shape[-1], 1, 1), v.layout, v.groups)
        if v.kind == "tokens" and v.layout == "nchw":
            return shape[::-1]
        return shape

    def _real(self, v: Val) -> Val:
        """Emits a pending channel_map so that ``v.node`` holds the value."""
        if v.stride == 1 and v.index is None:
            return v
        c = self.g.shape(v.node)[-1]
        index = v.index if v.index is not None else tuple(range(c))
        node = self.g.channel_map(
            v.node,
            len(index),
            stride=v.stride,
            index=index,
            name=self.name(f"{v.node}_map"),
        )
        return Val(node, v.kind, layout=v.layout, groups=v.groups)

    def _need(
        self, v: Val, kinds: tuple[str, ...], op: str, name: str, layouts=("nchw",)
    ) -> Val:
        """``v`` emitted; an error unless its kind and layout are as given."""
        v = self._real(v)
        if v.kind not in kinds or v.layout not in layouts:
            what = {
                "map": f"a feature map of shape {self.fw_shape(v)}",
                "flat": f"a vector of {self.fw_shape(v)[0]} features",
                "pooled": f"a pooled map of shape {self.fw_shape(v)}",
                "tokens": f"tokens of shape {self.fw_shape(v)}",
            }[v.kind]
            if v.layout != "nchw":
                what = f"{what} in {v.layout.upper()} layout"
            raise ConversionError(f"{self.where}: {op} {name!r} cannot read {what}")
        return v

    def _like(self, x: Val, node: str) -> Val:
        """``node``'s value, laid out as ``x`` (an op that keeps the layout)."""
        return dataclasses.replace(x, node=node, stride=1, index=None)

    def _per_feature(self, v: Val, values: np.ndarray) -> np.ndarray:
        """Per-feature framework values reordered to our order (flat perm)."""
        if v.kind == "flat" and v.perm is not None:
            out = np.empty_like(values)
            out[np.asarray(v.perm)] = values
            return out
        return values

    def _check(self, tensor: str, got, want) -> None:
        if tuple(got) != tuple(want):
            raise ShapeMismatchError(
                f"{self.where}: {tensor} has shape {tuple(got)}, expected {tuple(want)}"
            )

    def _store(self, node: str, kernel: np.ndarray, bias, out: int, name: str):
        """Records the Dense/Conv ``node``'s kernel and its bias, if any."""
        p = {"kernel": kernel}
        if bias is not None:
            bias = np.asarray(bias, np.float32).reshape(-1)
            self._check(f"bias of {name!r}", bias.shape, (out,))
            p["bias"] = bias
        else:
            self.bias_free.add(node)
        self.params[node] = p

    # ---------------------------------------------------------------- layers

    def linear(self, x: Val, weight, bias, *, name: str) -> Val:
        """``y = x @ weight.T + bias``, ``weight`` of shape ``(out, in)``; on a
        channels-last map a 1x1 convolution (a Dense per position)."""
        kinds = ("flat", "map", "pooled", "tokens")
        x = self._need(x, kinds, "dense layer", name, LAST)
        if x.kind != "flat" and x.layout != "nhwc":
            x = self._need(x, ("flat",), "dense layer", name)
        weight = np.asarray(weight, np.float32)
        features = self.fw_shape(x)[-1]
        if x.kind == "map":
            kernel = weight[:, :, None, None] if weight.ndim == 2 else weight
            out = self.conv(
                dataclasses.replace(x, layout="nchw"),
                kernel,
                bias,
                strides=(1, 1),
                pads="VALID",
                name=name,
            )
            return dataclasses.replace(out, layout="nhwc")
        if weight.ndim != 2 or weight.shape[1] != features:
            raise ShapeMismatchError(
                f"{self.where}: weight of {name!r} has shape {weight.shape}, "
                f"its input has {features} features"
            )
        out = weight.shape[0]
        node = self.g.dense(
            x.node, out, use_bias=bias is not None, name=self.name(name)
        )
        self._store(node, self._per_feature(x, weight.T.copy()), bias, out, name)
        return Val(node, x.kind, layout=x.layout)  # new features: ours in order

    def conv(
        self, x: Val, weight, bias, *, strides, pads, name: str, groups: int = 1
    ) -> Val:
        """2-D convolution, ``weight`` ``OIHW`` (``I`` = input channels / groups),
        ``pads`` ``(top, left, bottom, right)`` or ``"SAME"`` (extra padding at
        the end) or ``"VALID"``. A 1x1 convolution of a pooled ``(C, 1, 1)`` map
        is a dense layer (squeeze-excite blocks)."""
        weight = np.asarray(weight, np.float32)
        x = self._real(x)  # once: a pending channel map is emitted here
        pointwise = _pointwise(weight, strides, pads, groups)
        if x.kind == "pooled" and x.layout == "nchw" and pointwise:
            out = self.linear(Val(x.node, "flat"), weight[:, :, 0, 0], bias, name=name)
            return Val(out.node, "pooled")
        x = self._need(x, ("map",), "convolution", name)
        c = self.fw_shape(x)[0]
        if weight.ndim != 4 or weight.shape[1] * groups != c:
            raise ShapeMismatchError(
                f"{self.where}: weight of {name!r} has shape {weight.shape}, "
                f"its input has {c} channels in {groups} group(s) (expected "
                f"(out, {c // max(groups, 1)}, kh, kw))"
            )
        out, _, kh, kw = weight.shape
        if not isinstance(pads, str):
            t, left, b, r = (int(p) for p in pads)
            pads = ((t, b), (left, r))
        node = self.g.conv(
            x.node,
            out,
            (kh, kw),
            strides=tuple(int(s) for s in strides),
            padding=pads,
            use_bias=bias is not None,
            groups=int(groups),
            name=self.name(name),
        )
        self._store(node, weight.transpose(2, 3, 1, 0).copy(), bias, out, name)
        return Val(node, "map")

    def batchnorm(
        self,
        x: Val,
        scale,
        bias,
        mean,
        var,
        *,
        epsilon,
        momentum,
        name: str,
        layouts=("nchw",),
    ) -> Val:
        """Inference BatchNorm; ``momentum`` in Flax's convention (weight of the old
        running average). Per-channel values apply to channels-last tensors
        too where ``layouts`` allows it (an affine map)."""
        x = self._need(x, ("map", "flat", "pooled"), "batch norm", name, layouts)
        n = self.g.shape(x.node)[-1]
        arrays = {}
        for key, value in (("scale", scale), ("bias", bias), ("mean", mean)):
            arrays[key] = np.asarray(value, np.float32).reshape(-1)
        arrays["var"] = np.asarray(var, np.float32).reshape(-1)
        for key, value in arrays.items():
            self._check(f"{key} of {name!r}", value.shape, (n,))
        node = self.g.batchnorm(
            x.node,
            epsilon=float(epsilon),
            momentum=float(momentum),
            name=self.name(name),
        )
        self.params[node] = {k: self._per_feature(x, v) for k, v in arrays.items()}
        return self._like(x, node)

    def layernorm(self, x: Val, scale, bias, *, epsilon, name: str) -> Val:
        """LayerNorm over the last axis: the features of a vector, or the
        channels of a channels-last map."""
        kinds = ("flat", "map", "pooled", "tokens")
        x = self._need(x, kinds, "layer norm", name, LAST)
        if x.kind != "flat" and x.layout != "nhwc":
            self.unsupported(
                f"layer norm {name!r} over the last axis of a tensor of shape "
                f"{self.fw_shape(x)} (only over channels: of a vector, or of a map "
                "permuted to channels-last)"
            )
        n = self.g.shape(x.node)[-1]
        arrays = {"scale": scale, "bias": bias}
        for key, value in arrays.items():
            arrays[key] = np.asarray(value, np.float32).reshape(-1)
            self._check(f"{key} of {name!r}", arrays[key].shape, (n,))
        node = self.g.layernorm(x.node, epsilon=float(epsilon), name=self.name(name))
        self.params[node] = {k: self._per_feature(x, v) for k, v in arrays.items()}
        return self._like(x, node)

    def affine(self, x: Val, scale=None, shift=None, *, name: str) -> Val:
        """``x * scale + shift`` with per-channel (or scalar) constants; a
        constant added to tokens is a position embedding."""
        if x.kind == "tokens" and scale is None:
            return self.pos_embedding(x, shift, name=name)
        x = self._need(x, ("map", "flat", "pooled"), "affine", name, LAST)
        n, kind = self.g.shape(x.node)[-1], "flat" if x.layout == "nhwc" else x.kind
        s = np.ones(n, np.float32) if scale is None else _per_channel(scale, n, kind)
        b = np.zeros(n, np.float32) if shift is None else _per_channel(shift, n, kind)
        if s is None or b is None:
            raise ConversionError(
                f"{self.where}: {name!r} multiplies or adds a constant that is not "
                f"per-channel (shape {np.shape(scale if s is None else shift)}, "
                f"{n} channels)"
            )
        return self.batchnorm(
            x,
            s,
            b,
            np.zeros(n, np.float32),
            np.ones(n, np.float32),
            epsilon=0.0,
            momentum=0.9,
            name=name,
            layouts=LAST,
        )

    def fold_bias(self, x: Val, shift) -> bool:
        """Adds a constant to the bias-free Dense/Conv that produced ``x``, if so.

        Returns False (nothing done) when ``x`` is not such a layer's output or
        the constant is not per-channel.
        """
        if x.stride != 1 or x.index is not None or x.node not in self.bias_free:
            return False
        n, kind = self.g.shape(x.node)[-1], "flat" if x.layout == "nhwc" else x.kind
        b = _per_channel(shift, n, kind)
        if b is None:
            return False
        i = next(i for i, node in enumerate(self.g.nodes) if node.name == x.node)
        node = self.g.nodes[i]
        attrs = dict(node.attrs, use_bias=True)
        self.g.nodes[i] = dataclasses.replace(node, attrs=tuple(sorted(attrs.items())))
        self.params[x.node]["bias"] = b
        self.bias_free.discard(x.node)
        return True

    def relu(self, x: Val, *, name: str) -> Val:
        x = self._real(x)
        return self._like(x, self.g.relu(x.node, name=self.name(name)))

    def sigmoid(self, x: Val, *, name: str) -> Val:
        x = self._real(x)
        return self._like(x, self.g.sigmoid(x.node, name=self.name(name)))

    def softmax(self, x: Val, axis: int, *, name: str) -> Val:
        """Softmax over the channel axis (1 of NCHW, 3 of NHWC, -1 of vectors)."""
        x = self._real(x)
        rank = len(self.fw_shape(x)) + 1
        if axis % rank != self.channel_axis(x):
            raise ConversionError(
                f"{self.where}: softmax {name!r} over axis {axis} of a rank-{rank} "
                "tensor; only the channel/feature axis is supported"
            )
        return self._like(x, self.g.softmax(x.node, name=self.name(name)))

    def activation(self, x: Val, op: str, *, name: str, **attrs) -> Val:
        """An elementwise activation of the op table (``relu6``, ``silu``...)."""
        x = self._real(x)
        node = self.g.activation(x.node, op, name=self.name(name), **attrs)
        return self._like(x, node)

    def mul(self, a: Val, b: Val, *, name: str) -> Val:
        """``a * b`` of two tensors: equal layouts, or a feature map times a
        pooled ``(C, 1, 1)`` gate (either order)."""
        a, b = self._real(a), self._real(b)
        if a.kind == "pooled" and b.kind == "map":
            a, b = b, a
        same = a.kind == b.kind and a.perm == b.perm and a.layout == b.layout
        gate = a.kind == "map" and b.kind == "pooled" and a.layout == b.layout
        if not (same or gate) or self.g.shape(b.node)[-1] != self.g.shape(a.node)[-1]:
            raise ShapeMismatchError(
                f"{self.where}: mul {name!r} of shapes {self.fw_shape(a)} and "
                f"{self.fw_shape(b)}"
            )
        return self._like(a, self.g.mul(a.node, b.node, name=self.name(name)))

    def maxpool(self, x: Val, kernel, strides, pads, *, name: str) -> Val:
        x = self._need(x, ("map",), "max pooling", name)
        return Val(
            self.g.maxpool(
                x.node, tuple(kernel), tuple(strides), _pads(pads), name=self.name(name)
            ),
            "map",
        )

    def avgpool(
        self, x: Val, kernel, strides, pads, *, count_include_pad: bool, name: str
    ) -> Val:
        x = self._need(x, ("map",), "average pooling", name)
        node = self.g.avgpool(
            x.node,
            tuple(kernel),
            tuple(strides),
            _pads(pads),
            count_include_pad=bool(count_include_pad),
            name=self.name(name),
        )
        return Val(node, "map")

    def global_avgpool(self, x: Val, *, name: str) -> Val:
        x = self._need(x, ("map", "pooled"), "global average pooling", name)
        if x.kind == "pooled":
            return x
        return Val(self.g.global_avgpool(x.node, name=self.name(name)), "pooled")

    def adaptive_avgpool(self, x: Val, size, *, name: str) -> Val:
        """Adaptive average pooling to ``size`` ``(H_out, W_out)``."""
        if tuple(size) == (1, 1):
            return self.global_avgpool(x, name=name)
        x = self._need(x, ("map",), "adaptive average pooling", name)
        node = self.g.adaptive_avgpool(x.node, tuple(size), name=self.name(name))
        return Val(node, "map")

    def flatten(self, x: Val, *, name: str) -> Val:
        """Flattens everything after the batch axis, in the framework's order
        (a channels-last map's is ours)."""
        x = self._need(x, ("map", "flat", "pooled"), "flatten", name, LAST)
        if x.kind == "flat":
            return x
        if x.kind == "pooled":
            return Val(x.node, "flat")
        if x.layout == "nhwc":
            return Val(self.g.flatten(x.node, name=self.name(name)), "flat")
        h, w, c = self.g.shape(x.node)
        node = self.g.flatten(x.node, name=self.name(name))
        perm = np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).ravel()
        identity = bool(np.all(perm == np.arange(perm.size)))
        return Val(node, "flat", None if identity else tuple(int(i) for i in perm))

    def add(self, a: Val, b: Val, *, name: str) -> Val:
        a, b = self._real(a), self._real(b)
        if a.kind != b.kind or a.perm != b.perm or a.layout != b.layout:
            raise ConversionError(
                f"{self.where}: add {name!r} of tensors laid out differently "
                f"({self.fw_shape(a)} and {self.fw_shape(b)})"
            )
        if self.g.shape(a.node) != self.g.shape(b.node):
            raise ShapeMismatchError(
                f"{self.where}: add {name!r} of shapes {self.fw_shape(a)} and "
                f"{self.fw_shape(b)}"
            )
        return self._like(a, self.g.add(a.node, b.node, name=self.name(name)))

    def concat(self, xs: list[Val], axis: int, *, name: str) -> Val:
        """Concatenation along the channel axis (1) of maps, pooled maps or
        vectors in our order."""
        xs = [self._real(x) for x in xs]
        kinds = {x.kind for x in xs}
        rank = 2 if kinds == {"flat"} else 4
        nchw = all(x.layout == "nchw" for x in xs)
        if len(kinds) != 1 or axis % rank != 1 or any(x.perm for x in xs) or not nchw:
            shapes = [self.fw_shape(x) for x in xs]
            raise ConversionError(
                f"{self.where}: concat {name!r} of {shapes} along axis {axis}; only "
                "the channel axis (1) of equally laid out tensors is supported"
            )
        node = self.g.concat(*(x.node for x in xs), name=self.name(name))
        return Val(node, xs[0].kind)

    def subsample(self, x: Val, stride: int, *, name: str) -> Val:
        """``x[:, :, ::stride, ::stride]`` (a strided spatial slice)."""
        if x.kind != "map" or x.layout != "nchw":
            raise ConversionError(
                f"{self.where}: {name!r} slices a tensor that is not a feature map"
            )
        if x.index is not None and x.stride > 1:
            x = self._real(x)
        return dataclasses.replace(x, stride=x.stride * int(stride))

    def select_channels(self, x: Val, index, *, name: str) -> Val:
        """Output channel ``j`` is input channel ``index[j]`` (``-1``: zeros)."""
        if x.kind != "map" or x.layout != "nchw":
            raise ConversionError(
                f"{self.where}: {name!r} picks channels of a tensor that is not a "
                "feature map"
            )
        c = self.fw_shape(x)[0]
        index = tuple(int(i) for i in index)
        if any(i < -1 or i >= c for i in index):
            raise ConversionError(
                f"{self.where}: {name!r} picks channels {index} of {c} channels"
            )
        if x.index is not None:
            index = tuple(x.index[i] if i >= 0 else -1 for i in index)
        return dataclasses.replace(x, index=index)

    def finish(self, out: Val) -> tuple[Node, ...]:
        """The node tuple with ``out`` as the model output."""
        out = self._real(out)
        if out.kind == "map" or out.layout in ("grouped", "swapped"):
            raise ConversionError(
                f"{self.where}: the output is a feature map of shape "
                f"{self.fw_shape(out)}; only vector outputs are supported"
            )
        if out.perm is not None:
            raise ConversionError(
                f"{self.where}: the output is a flattened feature map, whose C,H,W "
                "order a channels-last graph cannot reproduce"
            )
        if self.g.nodes[-1].name != out.node:
            raise ConversionError(
                f"{self.where}: the output {out.node!r} is not the last operation"
            )
        return self.g.build(out.node)


def _pointwise(weight, strides, pads, groups) -> bool:
    """A 1x1, stride-1, unpadded, ungrouped convolution kernel."""
    no_pads = pads in ("VALID", "SAME") or not any(int(p) for p in pads)
    return (
        weight.ndim == 4
        and weight.shape[2:] == (1, 1)
        and tuple(int(s) for s in strides) == (1, 1)
        and no_pads
        and groups == 1
    )


def _pads(pads):
    if isinstance(pads, str):
        return pads
    t, left, b, r = (int(p) for p in pads)
    return ((t, b), (left, r))


def _per_channel(value, n: int, kind: str) -> np.ndarray | None:
    """A constant broadcast against a ``kind`` tensor as a per-channel vector of
    length ``n``, or None if it is not one: scalars, and ``(n, 1, 1)``-like shapes
    for feature maps or ``(n,)``-like shapes for vectors."""
    v = np.asarray(value, np.float32)
    if v.size == 1:
        return np.full(n, float(v.reshape(())), np.float32)
    if kind == "flat":
        ok = v.shape[-1] == n and v.size == n
    else:
        ok = v.ndim >= 3 and v.shape[-2:] == (1, 1) and v.shape[-3] == n
        ok = ok and v.size == n
    return v.reshape(n).copy() if ok else None
