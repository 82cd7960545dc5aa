"""LayerNorm over the channel (last) axis.

Its mean and variance mix the channels it normalizes, so removing one changes
every other: the channels it reads are not prunable (flow ``couple``, like
softmax). It has no interval bounds: the interval metrics refuse networks with
it, naming the node.
"""

from __future__ import annotations

from flax import nnx

from .base import Op, unit_terms


class LayerNorm(Op):
    name = "layernorm"
    flow = "couple"
    variables = ("scale", "bias")

    def layer(self, node, in_shape, rngs):
        return nnx.LayerNorm(in_shape[-1], epsilon=node.attr("epsilon"), rngs=rngs)

    def apply(self, node, layer, xs):
        return layer(xs[0])

    def cost(self, node, ref):
        return unit_terms(2, ref(node.name)), []

    def onnx(self, w, node, ins):
        p, x, n = w.params[node.name], ins[0], node.name
        args = [w.const(f"{n}.scale", p["scale"]), w.const(f"{n}.bias", p["bias"])]
        eps = node.attr("epsilon")
        if len(node.shape) != 3:  # a vector, or tokens (N, T, C)
            return w.emit("LayerNormalization", [x, *args], n, axis=-1, epsilon=eps)
        x = w.emit("Transpose", [x], f"{n}.nhwc", perm=[0, 2, 3, 1])
        y = w.emit("LayerNormalization", [x, *args], f"{n}.ln", axis=-1, epsilon=eps)
        return w.emit("Transpose", [y], n, perm=[0, 3, 1, 2])

    def torch_layer(self, node, in_shape):
        from torch import nn

        return nn.LayerNorm(node.shape[-1], eps=node.attr("epsilon"))

    def torch(self, graph, node, ins, in_shape):
        layer, x = getattr(graph, node.name), ins[0]
        if x.dim() != 4:
            return layer(x)
        return layer(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    def torch_state(self, node, p, chw):
        if chw is not None:
            self.missing(node, "PyTorch form after a flatten of a feature map")
        return {"weight": p["scale"], "bias": p["bias"]}
