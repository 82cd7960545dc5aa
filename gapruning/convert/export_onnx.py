"""Gapruning models out to ONNX (opset 17, NCHW, symbolic batch size).

See :mod:`gapruning.convert.export` for how each op is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..files import replaced_atomically
from ..models.graph import Node
from ..zoo import Pretrained
from .common import ConversionError
from .export import explicit_pads, layer_arrays, vector_masks

ONNX_OPSET = 17


def to_onnx(
    pretrained: Pretrained, path: str | os.PathLike, *, opset: int = ONNX_OPSET
) -> Path:
    """Writes ``pretrained`` as an ONNX model (see module docstring), atomically.

    Args:
        pretrained: any gapruning model, typically a compacted pruned one.
        path: the ``.onnx`` file to write (replaced if it exists).
        opset: the ONNX opset (13 or later).

    Returns:
        The path written.

    Raises:
        ConversionError: population masks, or an op without an ONNX form.
    """
    import onnx

    model = build_onnx(pretrained, opset=opset)
    with replaced_atomically(path) as tmp:
        onnx.save(model, tmp)
    return Path(path)


def build_onnx(pretrained: Pretrained, *, opset: int = ONNX_OPSET):
    """The ``onnx.ModelProto`` that :func:`to_onnx` writes."""
    import onnx
    from onnx import TensorProto, helper

    nodes: tuple[Node, ...] = pretrained.model.nodes
    w = _OnnxWriter(pretrained)
    for n in nodes:
        w.tensor[n.name] = w.write(n)
    last = nodes[-1]
    final = w.emit("Identity", [w.tensor[last.name]], "output")
    graph = helper.make_graph(
        w.nodes,
        pretrained.name,
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", *_fw_shape(nodes[0].shape)]
            )
        ],
        [
            helper.make_tensor_value_info(
                final, TensorProto.FLOAT, ["batch", *_fw_shape(last.shape)]
            )
        ],
        initializer=w.inits,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="gapruning",
    )
    model.ir_version = min(model.ir_version, 8)
    onnx.checker.check_model(model)
    return model


def _fw_shape(shape):
    return shape if len(shape) == 1 else (shape[2], shape[0], shape[1])


def _is_padding_index(index, c) -> bool:
    return tuple(index[:c]) == tuple(range(c)) and all(i == -1 for i in index[c:])


class _OnnxWriter:
    """Collects the ONNX nodes and initializers of a node tuple, node by node."""

    def __init__(self, pretrained: Pretrained):
        self.params = layer_arrays(pretrained)
        self.masks = vector_masks(pretrained)
        self.shapes = {n.name: n.shape for n in pretrained.model.nodes}
        self.inits, self.nodes = [], []
        self.tensor: dict[str, str] = {}  # our node -> ONNX tensor name

    def const(self, name, value):
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def emit(self, op, inputs, out, **attrs):
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def write(self, n: Node) -> str:
        """Emits node ``n``; returns the ONNX tensor holding its value."""
        if n.op == "input":
            return "input"
        ins = [self.tensor[i] for i in n.inputs]
        if n.op in ("relu", "sigmoid"):
            return self.emit({"relu": "Relu", "sigmoid": "Sigmoid"}[n.op], ins, n.name)
        if n.op == "softmax":
            return self.emit("Softmax", ins, n.name, axis=1)
        write = getattr(self, f"_{n.op}", None)
        if write is None:
            raise ConversionError(f"node {n.name!r}: op {n.op!r} has no ONNX export")
        return write(n, ins)

    def _in_shape(self, n: Node):
        return self.shapes[n.inputs[0]]

    def _weighted(self, n: Node, x: str, kernel: np.ndarray) -> list[str]:
        args = [x, self.const(f"{n.name}.weight", kernel)]
        p = self.params[n.name]
        if "bias" in p:
            args.append(self.const(f"{n.name}.bias", p["bias"]))
        return args

    def _dense(self, n: Node, ins):
        args = self._weighted(n, ins[0], self.params[n.name]["kernel"].T.copy())
        return self.emit("Gemm", args, n.name, transB=1)

    def _conv(self, n: Node, ins):
        k, s = n.attr("kernel_size"), n.attr("strides")
        in_hw = self._in_shape(n)[:2]
        (t, b), (left, r) = explicit_pads(n.attr("padding"), in_hw, k, s)
        kernel = self.params[n.name]["kernel"].transpose(3, 2, 0, 1)
        return self.emit(
            "Conv",
            self._weighted(n, ins[0], kernel),
            n.name,
            kernel_shape=list(k),
            strides=list(s),
            pads=[t, left, b, r],
        )

    def _batchnorm(self, n: Node, ins):
        p = self.params[n.name]
        args = [ins[0]] + [
            self.const(f"{n.name}.{k}", p[k]) for k in ("scale", "bias", "mean", "var")
        ]
        return self.emit("BatchNormalization", args, n.name, epsilon=n.attr("epsilon"))

    def _maxpool(self, n: Node, ins):
        k, s = n.attr("window"), n.attr("strides")
        in_hw = self._in_shape(n)[:2]
        (t, b), (left, r) = explicit_pads(n.attr("padding"), in_hw, k, s)
        attrs = {"kernel_shape": list(k), "strides": list(s), "pads": [t, left, b, r]}
        if n.op == "avgpool":
            include = bool(n.attr("count_include_pad")) and not isinstance(
                n.attr("padding"), str
            )
            attrs["count_include_pad"] = int(include)
        op = "MaxPool" if n.op == "maxpool" else "AveragePool"
        return self.emit(op, ins, n.name, **attrs)

    _avgpool = _maxpool

    def _global_avgpool(self, n: Node, ins):
        pooled = self.emit("GlobalAveragePool", ins, f"{n.name}.pooled")
        return self.emit("Flatten", [pooled], n.name, axis=1)

    def _flatten(self, n: Node, ins):
        src, in_shape = ins[0], self._in_shape(n)
        if len(in_shape) == 3 and in_shape[0] * in_shape[1] > 1 and in_shape[2] > 1:
            src = self.emit("Transpose", [src], f"{n.name}.nhwc", perm=[0, 2, 3, 1])
        return self.emit("Flatten", [src], n.name, axis=1)

    def _add(self, n: Node, ins):
        out = ins[0]
        for i, other in enumerate(ins[1:], start=1):
            name = n.name if i == len(ins) - 1 else f"{n.name}.{i}"
            out = self.emit("Add", [out, other], name)
        return out

    def _mask(self, n: Node, ins):
        m = self.masks[n.attr("group")]
        if np.all(m == 1.0):
            return ins[0]
        shape = (-1, 1, 1) if len(n.shape) == 3 else (-1,)
        value = self.const(f"{n.name}.value", m.reshape(shape))
        return self.emit("Mul", [ins[0], value], n.name)

    def _channel_map(self, n: Node, ins):
        stride, index = n.attr("stride"), list(n.attr("index"))
        c = self._in_shape(n)[-1]
        out = ins[0]
        if stride > 1:
            out = self._slice(n, out, stride)
        if index == list(range(c)):
            return self.emit("Identity", [out], n.name)
        if _is_padding_index(index, c):
            pads = np.zeros(8, np.int64)
            pads[5] = len(index) - c
            pads = self.const(f"{n.name}.pads", pads)
            return self.emit("Pad", [out, pads], n.name, mode="constant")
        picked = self.const(
            f"{n.name}.index", np.maximum(np.asarray(index, np.int64), 0)
        )
        if all(i >= 0 for i in index):
            return self.emit("Gather", [out, picked], n.name, axis=1)
        out = self.emit("Gather", [out, picked], f"{n.name}.gathered", axis=1)
        keep = (np.asarray(index) >= 0).astype(np.float32).reshape(-1, 1, 1)
        return self.emit("Mul", [out, self.const(f"{n.name}.keep", keep)], n.name)

    def _slice(self, n: Node, x: str, stride: int) -> str:
        big = np.iinfo(np.int64).max
        args = [
            x,
            self.const(f"{n.name}.starts", np.zeros(2, np.int64)),
            self.const(f"{n.name}.ends", np.full(2, big, np.int64)),
            self.const(f"{n.name}.axes", np.array([2, 3], np.int64)),
            self.const(f"{n.name}.steps", np.full(2, stride, np.int64)),
        ]
        return self.emit("Slice", args, f"{n.name}.sliced")
