"""Gapruning models out to ONNX (opset 17, NCHW, symbolic batch size).

See :mod:`gapruning.convert.export` for how each op is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..files import replaced_atomically
from ..models.builder import input_mask
from ..models.graph import Node
from ..models.ops import OPS, UnsupportedOpError
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


class _OnnxWriter:
    """Collects the ONNX nodes and initializers of a node tuple, node by node."""

    def __init__(self, pretrained: Pretrained):
        self.params = layer_arrays(pretrained)
        self.masks = vector_masks(pretrained)
        self.shapes = {n.name: n.shape for n in pretrained.model.nodes}
        self.by_name = {n.name: n for n in pretrained.model.nodes}
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
        """Emits node ``n`` (the op table's :meth:`~gapruning.models.ops.Op.onnx`);
        returns the ONNX tensor holding its value."""
        op = OPS.get(n.op)
        if op is None or not op.supports("onnx"):
            raise ConversionError(f"node {n.name!r}: op {n.op!r} has no ONNX export")
        try:
            return op.onnx(self, n, [self.tensor[i] for i in n.inputs])
        except UnsupportedOpError as err:
            raise ConversionError(str(err)) from None

    def input_mask(self, n: Node):
        """The vector of the mask ``n`` reads (None: its input is not masked)."""
        return input_mask(n, self.by_name, self.masks.__getitem__)

    def in_shape(self, n: Node):
        """The shape of ``n``'s first input (channels last)."""
        return self.shapes[n.inputs[0]]

    def weighted(self, n: Node, x: str, kernel: np.ndarray) -> list[str]:
        """``[x, weight, bias?]``: the inputs of a Gemm/Conv of layer ``n``."""
        args = [x, self.const(f"{n.name}.weight", kernel)]
        p = self.params[n.name]
        if "bias" in p:
            args.append(self.const(f"{n.name}.bias", p["bias"]))
        return args

    def window_attrs(self, n: Node, kernel) -> dict:
        """``kernel_shape``, ``strides`` and explicit ``pads`` of a windowed node."""
        s = n.attr("strides")
        (t, b), (left, r) = explicit_pads(
            n.attr("padding"), self.in_shape(n)[:2], kernel, s
        )
        return {
            "kernel_shape": list(kernel),
            "strides": list(s),
            "pads": [t, left, b, r],
        }

    def slice(self, n: Node, x: str, stride: int) -> str:
        """``x[:, :, ::stride, ::stride]``."""
        big = np.iinfo(np.int64).max
        args = [
            x,
            self.const(f"{n.name}.starts", np.zeros(2, np.int64)),
            self.const(f"{n.name}.ends", np.full(2, big, np.int64)),
            self.const(f"{n.name}.axes", np.array([2, 3], np.int64)),
            self.const(f"{n.name}.steps", np.full(2, stride, np.int64)),
        ]
        return self.emit("Slice", args, f"{n.name}.sliced")
