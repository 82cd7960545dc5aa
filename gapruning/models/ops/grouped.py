"""Grouped convolutions: depthwise (``dwconv``), square (``groupwise_conv``) and
general (``grouped_conv``).

A depthwise convolution filters each channel on its own: output channel ``c``
reads input channel ``c`` only, so its output is its input's channel space
(flow ``channelwise``: pruning a channel removes it from the layer's input,
kernel and output at once). A grouped convolution with as many output channels
as input channels (ResNeXt's and RegNet's 3x3 convolutions) maps each group onto
itself: group ``g``'s outputs read group ``g``'s inputs only, so it too keeps its
input's channel space, whose prunable unit is one whole group
(:meth:`GroupwiseConv.unit_width`); compaction keeps whole groups (fewer groups,
the same channels per group). Any other grouped convolution mixes channels
within groups of different widths on its two sides; removing channels would need
equal counts per group, so its input and output channels are not prunable (flow
``opaque``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from ..masked_layers import conv_op
from .base import LinearOp, unit_terms
from .linear import torch_pads


class GroupedConvBase(LinearOp):
    """A convolution with ``feature_group_count`` groups; kernel ``(kh, kw,
    in / groups, out)``."""

    variables = ("kernel", "bias")

    def groups(self, node, in_channels: int) -> int:
        raise NotImplementedError

    def features(self, node, in_channels: int) -> int:
        raise NotImplementedError

    def layer(self, node, in_shape, rngs):
        c = in_shape[-1]
        return nnx.Conv(
            c,
            self.features(node, c),
            kernel_size=node.attr("kernel_size"),
            strides=node.attr("strides"),
            padding=node.attr("padding"),
            feature_group_count=self.groups(node, c),
            use_bias=node.attr("use_bias"),
            rngs=rngs,
        )

    def linear(self, node, p, x, *, absolute, bias):
        k = jnp.abs(p["kernel"]) if absolute else p["kernel"]
        dtype = jnp.promote_types(x.dtype, k.dtype)
        op = conv_op(node.attr("strides"), node.attr("padding"))
        groups = x.shape[-1] // k.shape[-2]
        y = op(x.astype(dtype), k.astype(dtype), groups)
        return y + p["bias"] if bias and "bias" in p else y

    def onnx(self, w, node, ins):
        p = w.params[node.name]
        kernel = p["kernel"].transpose(3, 2, 0, 1)
        groups = w.in_shape(node)[-1] // kernel.shape[1]
        return w.emit(
            "Conv",
            w.weighted(node, ins[0], kernel),
            node.name,
            group=groups,
            **w.window_attrs(node, node.attr("kernel_size")),
        )

    def torch_layer(self, node, in_shape):
        from torch import nn

        c = in_shape[-1]
        return nn.Conv2d(
            c,
            self.features(node, c),
            tuple(node.attr("kernel_size")),
            stride=tuple(node.attr("strides")),
            groups=self.groups(node, c),
            bias=node.attr("use_bias"),
        )

    def torch(self, graph, node, ins, in_shape):
        from torch.nn import functional as F

        return getattr(graph, node.name)(F.pad(ins[0], torch_pads(node, in_shape)))

    def torch_state(self, node, p, chw):
        out = {"weight": p["kernel"].transpose(3, 2, 0, 1).copy()}
        if "bias" in p:
            out["bias"] = p["bias"]
        return out


class DepthwiseConv(GroupedConvBase):
    """One ``kh x kw`` filter per channel (groups = channels, multiplier 1)."""

    name = "dwconv"
    flow = "channelwise"

    def per_group(self, node) -> int:
        """Channels in (and out) per group."""
        return 1

    def groups(self, node, in_channels):
        return in_channels // self.per_group(node)

    def features(self, node, in_channels):
        return in_channels

    def cost(self, node, ref):
        outs = ref(node.name)
        k = math.prod(node.attr("kernel_size")) * self.per_group(node)
        params = unit_terms(k, outs)
        if node.attr("use_bias"):
            params += unit_terms(1, outs)
        return params, unit_terms(math.prod(node.shape[:-1]) * k, outs)

    def compact_params(self, node, p, rows, cols):
        return {k: v[..., cols] for k, v in p.items()}


class GroupwiseConv(DepthwiseConv):
    """The depthwise convolution's generalisation: ``groups`` groups of ``C /
    groups`` channels in and out; the prunable unit is one group."""

    name = "groupwise_conv"

    def per_group(self, node):
        return node.shape[-1] // node.attr("groups")

    def unit_width(self, node):
        return self.per_group(node)

    def compact_attrs(self, node, attrs, cols, in_index):
        return {**attrs, "groups": len(cols) // self.per_group(node)}


def node_width(pieces) -> int:
    """The width of a tensor whose pieces are all of fixed width."""
    assert all(g == -1 for _, g in pieces), "a grouped conv's channels are fixed"
    return sum(m for m, _ in pieces)


class GroupedConv(GroupedConvBase):
    """``groups`` groups of ``in / groups`` input channels each; not prunable."""

    name = "grouped_conv"
    flow = "opaque"

    def groups(self, node, in_channels):
        return node.attr("groups")

    def features(self, node, in_channels):
        return node.attr("features")

    def cost(self, node, ref):
        ci, co = node_width(ref(node.inputs[0])), node_width(ref(node.name))
        k = math.prod(node.attr("kernel_size")) * ci // node.attr("groups") * co
        params = [(k, -1, -1)] + ([(co, -1, -1)] if node.attr("use_bias") else [])
        return params, [(math.prod(node.shape[:-1]) * k, -1, -1)]

    def compact_params(self, node, p, rows, cols):
        return p
