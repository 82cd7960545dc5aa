"""ONNX graphs into Flax: a generic importer for convolutional and dense networks.

Supported ops (one input, one output; weights as initializers or Constant nodes):
Gemm (``transA=0``), MatMul by a constant matrix, Conv (2-D, grouped or
depthwise, no dilation; explicit pads or ``auto_pad`` VALID/SAME_UPPER),
BatchNormalization (inference), Relu, Sigmoid, HardSwish, HardSigmoid, Clip to
[0, 6] (ReLU6), Gelu, Softmax (over the channel/feature axis), MaxPool (2-D, also
``ceil_mode=1``) and AveragePool (2-D, ``ceil_mode=0``), GlobalAveragePool,
ReduceMean over H and W (global average pooling as torch's dynamo exporter writes
it, ``keepdims`` 0 or 1), Flatten (``axis=1``), Reshape to 2-D, Concat along the
channel axis, Add (of two tensors, or of a constant: folded into the producing
Gemm/MatMul/Conv bias when possible), Mul of two tensors (SiLU, squeeze-and-
excitation gates), Mul/Sub/Div by a per-channel constant, Identity (of a tensor
or of a constant, which torch's exporter writes for shared initializers) and
Dropout (the newer ops in :mod:`gapruning.convert.onnx_ops`); plus the shortcut ops
gapruning's own exporter writes: Slice (strided spatial subsampling), Pad (zero
channels), Gather (channel selection). Transpose between NCHW and NHWC (a LayerNorm
or MatMul on channels-last maps), Split/Slice of channel ranges and the
Reshape-Transpose-Reshape of a channel shuffle; GELU written with Erf is fused into
one op (:mod:`gapruning.convert.onnx_patterns`).

ONNX tensors are NCHW; they are laid out channels-last with
:class:`~gapruning.convert.nchw.NCHWGraph` (conv kernels ``OIHW -> HWIO``, rows of
the Dense after a flatten reordered). The shape arithmetic of dynamic-batch exports
(``x.view(x.size(0), -1)``: Shape, Gather, Unsqueeze, Concat, Cast on shape
values) is evaluated to find a Reshape's target; other shape computations are
not supported.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..zoo import Pretrained
from .common import (
    ConversionError,
    ModelFormatError,
    UnsupportedLayerError,
    check_input_shape,
    imported,
)
from .nchw import NCHWGraph, Val
from .onnx_ops import OnnxChannelOps
from .onnx_patterns import fuse_gelu, fuse_restride


def from_onnx(
    source: str | os.PathLike | Any,
    *,
    input_shape: tuple[int, ...] | None = None,
    input_box: tuple[float, float] | None = None,
    name: str | None = None,
) -> Pretrained:
    """Converts an ONNX model into a :class:`~gapruning.zoo.Pretrained`.

    Args:
        source: the path of an ``.onnx`` file, or an ``onnx.ModelProto``.
        input_shape: ``(H, W, C)`` or ``(features,)``; needed only where the
            graph's input has symbolic spatial sizes (must agree with fixed ones).
        input_box: ``(low, high)``, the range of valid inputs as the model
            receives them; recorded in the card (default: see
            :data:`gapruning.convert.common.DEFAULT_INPUT_BOX`).
        name: the card's name (default: the file stem or the graph name).

    Returns:
        The converted model, in eval mode; masks on every prunable unit and
        residual Add nodes coupling channels.

    Raises:
        ModelFormatError: not an ONNX file, or truncated.
        UnsupportedLayerError: an op (named, with its position) without a
            translation.
        ShapeMismatchError: weights whose shapes do not fit their inputs.
    """
    import onnx
    from onnx import numpy_helper

    if isinstance(source, onnx.ModelProto):
        model, file = source, None
    else:
        file = Path(source)
        if not file.is_file():
            raise FileNotFoundError(f"no such file: {file}")
        try:
            model = onnx.load(str(file))
        except Exception as err:  # protobuf DecodeError and friends
            raise ModelFormatError(
                f"{file}: not a readable ONNX model ({type(err).__name__}: "
                f"{str(err)[:200]})"
            ) from None
        if not model.graph.node:
            raise ModelFormatError(f"{file}: holds no ONNX graph")
    where = str(file) if file is not None else f"onnx graph {model.graph.name!r}"
    if input_shape is not None:
        input_shape = check_input_shape(input_shape)
    opset = next(
        (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13
    )
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes, params = _Importer(model.graph, consts, opset, where, numpy_helper).run(
        input_shape
    )
    producer = f"{model.producer_name} {model.producer_version}".strip()
    return imported(
        nodes,
        params,
        source=where,
        framework="onnx",
        name=name or (None if file is not None else model.graph.name or None),
        file=file,
        input_box=input_box,
        extra={"opset": int(opset), "producer": producer},
    )


def _attrs(node) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class _Importer(OnnxChannelOps):
    def __init__(self, graph, consts, opset, where, numpy_helper):
        self.graph, self.consts, self.opset = graph, consts, opset
        self.where, self.nh = where, numpy_helper
        self.vals: dict[str, Val] = {}
        self.shape_vals: dict[str, np.ndarray] = {}  # shape arithmetic; None=batch
        outputs = [o.name for o in graph.output]
        self.nodes = fuse_gelu(fuse_restride(list(graph.node), consts), consts, outputs)
        self.uses: dict[str, int] = {}
        for n in self.nodes:
            for i in n.input:
                self.uses[i] = self.uses.get(i, 0) + 1
        for o in graph.output:
            self.uses[o.name] = self.uses.get(o.name, 0) + 1

    # ---------------------------------------------------------------- driver

    def run(self, input_shape):
        inputs = [i for i in self.graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise UnsupportedLayerError(
                f"{self.where}: the graph has {len(inputs)} inputs "
                f"({', '.join(i.name for i in inputs)}); exactly one is supported"
            )
        if len(self.graph.output) != 1:
            raise UnsupportedLayerError(
                f"{self.where}: the graph has {len(self.graph.output)} outputs; "
                "exactly one is supported"
            )
        fw = self._input_shape(inputs[0], input_shape)
        self.g = NCHWGraph(fw, where=self.where)
        self.vals[inputs[0].name] = self.g.input
        for pos, node in enumerate(self.nodes):
            self.pos, self.node = pos, node
            self.label = node.name or f"{node.op_type}_{pos}"
            handler = getattr(self, f"_{node.op_type}", None)
            if node.domain not in ("", "ai.onnx") or handler is None:
                self.fail(f"op {node.op_type}")
            try:
                handler(_attrs(node))
            except ConversionError as err:
                if "(position" in str(err):
                    raise
                raise type(err)(
                    f"{err} (node {self.label!r}, position {pos})"
                ) from None
        out = self.graph.output[0].name
        if out not in self.vals:
            raise ConversionError(
                f"{self.where}: the graph output {out!r} is not a supported tensor"
            )
        return self.g.finish(self.vals[out]), self.g.params

    def _input_shape(self, inp, given):
        dims = [
            d.dim_value if d.HasField("dim_value") else None
            for d in inp.type.tensor_type.shape.dim
        ]
        if len(dims) not in (2, 4):
            raise UnsupportedLayerError(
                f"{self.where}: input {inp.name!r} has rank {len(dims)}; (N, C, H, W) "
                "or (N, features) is supported"
            )
        file_shape = tuple(dims[1:])
        self.batch = dims[0]
        if given is not None:
            fw = given if len(given) == 1 else (given[2], given[0], given[1])
            if len(fw) != len(file_shape) or any(
                d is not None and d != f for d, f in zip(file_shape, fw, strict=True)
            ):
                raise ConversionError(
                    f"{self.where}: input_shape {given} contradicts the graph's "
                    f"input shape {tuple(dims)} (N, C, H, W)"
                )
            return fw
        if any(d is None for d in file_shape):
            raise ConversionError(
                f"{self.where}: input {inp.name!r} has symbolic sizes {tuple(dims)}; "
                "pass input_shape=(H, W, C)"
            )
        return file_shape

    # ---------------------------------------------------------------- helpers

    def fail(self, what: str):
        raise UnsupportedLayerError(
            f"{self.where}: unsupported {what} in node {self.label!r} (position "
            f"{self.pos})"
        )

    def x(self, i: int = 0) -> Val:
        name = self.node.input[i]
        if name in self.shape_vals:
            self.fail(f"use of the shape value {name!r} by {self.node.op_type}")
        if name not in self.vals:
            if name in self.consts:
                self.fail(f"{self.node.op_type} of a constant input {name!r}")
            raise ConversionError(
                f"{self.where}: node {self.label!r} (position {self.pos}) reads "
                f"{name!r}, which no earlier node produces"
            )
        return self.vals[name]

    def const(self, i: int, required: bool = True):
        if i >= len(self.node.input) or not self.node.input[i]:
            if required:
                self.fail(f"{self.node.op_type} without input {i}")
            return None
        name = self.node.input[i]
        if name not in self.consts:
            self.fail(f"{self.node.op_type} whose input {name!r} is not a constant")
        return np.asarray(self.consts[name])

    def is_const(self, i: int) -> bool:
        return self.node.input[i] in self.consts

    def out(self, v: Val) -> None:
        self.vals[self.node.output[0]] = v
        for extra in self.node.output[1:]:
            if extra and self.uses.get(extra):
                self.fail(f"use of the secondary output {extra!r}")

    def pads(self, a, kernel, op):
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto == "VALID":
            return "VALID"
        if auto == "SAME_UPPER":
            return "SAME"
        if auto != "NOTSET":
            self.fail(f"{op} with auto_pad={auto}")
        pads = list(a.get("pads", [0] * 2 * len(kernel)))
        if len(pads) != 4:
            self.fail(f"{op} with pads {pads} (2-D only)")
        return (pads[0], pads[1], pads[2], pads[3])

    # ---------------------------------------------------------------- ops

    def _Constant(self, a):
        if "value" not in a:
            self.fail("Constant without a tensor value")
        self.consts[self.node.output[0]] = self.nh.to_array(a["value"])

    def _Identity(self, a):
        name = self.node.input[0]
        if name in self.consts:  # exporters alias shared initializers this way
            self.consts[self.node.output[0]] = self.consts[name]
        elif name in self.shape_vals:
            self.shape_vals[self.node.output[0]] = self.shape_vals[name]
        else:
            self.out(self.x())

    def _Dropout(self, a):
        self.out(self.x())

    def _Gemm(self, a):
        if a.get("transA", 0):
            self.fail("Gemm with transA=1")
        b = self.const(1)
        if b.ndim != 2:
            self.fail(f"Gemm with a {b.ndim}-D weight")
        weight = (b if a.get("transB", 0) else b.T) * float(a.get("alpha", 1.0))
        c = self.const(2, required=False)
        bias = None
        if c is not None:
            c = np.asarray(c, np.float32) * float(a.get("beta", 1.0))
            out = weight.shape[0]
            if c.size == 1:
                bias = np.full(out, float(c.reshape(())), np.float32)
            elif c.size == out and c.shape[-1] == out:
                bias = c.reshape(out)
            else:
                self.fail(f"Gemm with a bias of shape {c.shape} (per-output only)")
        self.out(self.g.linear(self.x(), weight, bias, name=self.label))

    def _MatMul(self, a):
        if self.is_const(0) or not self.is_const(1):
            self.fail("MatMul that is not (tensor @ constant matrix)")
        b = self.const(1)
        if b.ndim != 2:
            self.fail(f"MatMul by a {b.ndim}-D constant")
        self.out(self.g.linear(self.x(), b.T, None, name=self.label))

    def _Conv(self, a):
        w = self.const(1)
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            self.fail(f"Conv with dilations {a.get('dilations')}")
        if w.ndim != 4:
            self.fail(f"Conv with a {w.ndim}-D kernel (2-D convolutions only)")
        kernel = tuple(a.get("kernel_shape", w.shape[2:]))
        self.out(
            self.g.conv(
                self.x(),
                w,
                self.const(2, required=False),
                strides=tuple(a.get("strides", [1, 1])),
                pads=self.pads(a, kernel, "Conv"),
                name=self.label,
                groups=self.conv_groups(a, w),
            )
        )

    def _BatchNormalization(self, a):
        if a.get("training_mode", 0):
            self.fail("BatchNormalization in training mode")
        scale, bias, mean, var = (self.const(i) for i in range(1, 5))
        self.out(
            self.g.batchnorm(
                self.x(),
                scale,
                bias,
                mean,
                var,
                epsilon=float(a.get("epsilon", 1e-5)),
                momentum=float(a.get("momentum", 0.9)),
                name=self.label,
            )
        )

    def _Relu(self, a):
        self.out(self.g.relu(self.x(), name=self.label))

    def _Sigmoid(self, a):
        self.out(self.g.sigmoid(self.x(), name=self.label))

    def _Softmax(self, a):
        axis = a.get("axis", -1 if self.opset >= 13 else 1)
        x = self.x()
        if x.kind != "flat" and self.opset < 13:
            self.fail("Softmax (opset < 13) of a feature map")
        self.out(self.g.softmax(x, axis, name=self.label))

    def _pool_args(self, a, op):
        kernel = tuple(a["kernel_shape"])
        if len(kernel) != 2:
            self.fail(f"{op} over {len(kernel)} dimensions")
        if a.get("ceil_mode", 0) and op != "MaxPool":
            self.fail(f"{op} with ceil_mode=1")
        if any(d != 1 for d in a.get("dilations", [1, 1])):
            self.fail(f"{op} with dilations")
        strides = tuple(a.get("strides", [1, 1]))
        pads = self.ceil_pads(a, kernel, strides, self.pads(a, kernel, op), op)
        return kernel, strides, pads

    def _MaxPool(self, a):
        k, s, p = self._pool_args(a, "MaxPool")
        self.out(self.g.maxpool(self.x(), k, s, p, name=self.label))

    def _AveragePool(self, a):
        k, s, p = self._pool_args(a, "AveragePool")
        include = bool(a.get("count_include_pad", 0))
        self.out(
            self.g.avgpool(
                self.x(), k, s, p, count_include_pad=include, name=self.label
            )
        )

    def _GlobalAveragePool(self, a):
        self.out(self.g.global_avgpool(self.x(), name=self.label))

    def _ReduceMean(self, a):
        """The mean over H and W (keepdims 1 or 0): global average pooling, as
        torch's dynamo exporter writes ``adaptive_avg_pool2d(x, 1)``/``mean``."""
        if len(self.node.input) > 1 and self.node.input[1]:
            axes = [int(v) for v in self.const(1).reshape(-1)]
        else:
            axes = list(a.get("axes", []))
        x = self.x()
        if x.kind != "map" or sorted(v % 4 for v in axes) != [2, 3]:
            shape = self.g.fw_shape(x)
            self.fail(
                f"ReduceMean over axes {axes} of a tensor of shape {shape} (only "
                "over H and W of a feature map: global average pooling)"
            )
        pooled = self.g.global_avgpool(x, name=self.label)
        self.out(pooled if a.get("keepdims", 1) else Val(pooled.node, "flat"))

    def _Flatten(self, a):
        if a.get("axis", 1) != 1:
            self.fail(f"Flatten with axis={a.get('axis')}")
        self.out(self.g.flatten(self.x(), name=self.label))

    def _Reshape(self, a):
        target = self.node.input[1]
        if target in self.shape_vals:
            shape = [
                -1 if d is None else int(d) for d in self.shape_vals[target].ravel()
            ]
        else:
            shape = [int(d) for d in self.const(1).reshape(-1)]
        x = self.x()
        total = int(np.prod(self.g.fw_shape(x)))
        batch = (-1, 0, self.batch) if self.batch else (-1, 0)  # static batch size
        if shape[0] not in batch and not (len(shape) == 2 and shape[1] == total):
            self.fail(f"Reshape to {shape} (the batch axis must stay)")
        self.out(self.g.reshape(x, shape, name=self.label))

    def _Transpose(self, a):
        self.out(self.g.permute(self.x(), a.get("perm", []), name=self.label))

    def _binary(self, op):
        if any(i in self.shape_vals for i in self.node.input):
            self.shape_binary(op)  # chunk sizes: (C + 1) // 2 ...
            return
        if not self.is_const(0) and not self.is_const(1):
            if op not in ("Add", "Mul"):
                self.fail(f"{op} of two tensors")
            both = self.x(0), self.x(1)
            if op == "Mul":  # x * sigmoid(x), squeeze-and-excitation gates
                self.out(self.g.mul(*both, name=self.label))
            else:
                self.out(self.g.add(*both, name=self.label))
            return
        if self.is_const(0) and self.is_const(1):
            self.fail(f"{op} of two constants")
        i = 0 if not self.is_const(0) else 1
        if op in ("Sub", "Div") and i == 1:
            self.fail(f"{op} with the tensor as second operand")
        x, c = self.x(i), self.const(1 - i).astype(np.float32)
        if op == "Add":
            if self.uses.get(self.node.input[i], 0) == 1 and self.g.fold_bias(x, c):
                self.out(x)
                return
            self.out(self.g.affine(x, shift=c, name=self.label))
        elif op == "Sub":
            self.out(self.g.affine(x, shift=-c, name=self.label))
        elif op == "Mul":
            self.out(self.g.affine(x, scale=c, name=self.label))
        else:
            self.out(self.g.affine(x, scale=1.0 / c, name=self.label))

    def _Add(self, a):
        self._binary("Add")

    def _Sub(self, a):
        self._binary("Sub")

    def _Mul(self, a):
        self._binary("Mul")

    def _Div(self, a):
        self._binary("Div")

    def _Slice(self, a):
        x = self.x()
        if len(self.node.input) > 1:
            starts, ends = self.int_input(1), self.int_input(2)
            axes = self.int_input(3, required=False)
            steps = self.int_input(4, required=False)
        else:
            starts, ends = np.asarray(a["starts"]), np.asarray(a["ends"])
            axes, steps = a.get("axes"), None
        axes = list(range(len(starts))) if axes is None else [int(v) for v in axes]
        steps = [1] * len(starts) if steps is None else [int(v) for v in steps]
        if [v % 4 for v in axes] == [1] and steps == [1]:  # a range of channels
            self.out(self.channel_range(x, int(starts[0]), int(ends[0])))
            return
        shape = self.g.fw_shape(x)
        spec = {}
        for ax, st, en, sp in zip(axes, starts, ends, steps, strict=True):
            ax = ax % 4
            if ax not in (2, 3) or int(st) != 0 or int(en) < shape[ax - 1] or sp < 1:
                self.fail("Slice other than x[:, :, ::s, ::s]")
            spec[ax] = sp
        if set(spec) != {2, 3} or spec[2] != spec[3]:
            self.fail("Slice other than x[:, :, ::s, ::s]")
        self.out(self.g.subsample(x, spec[2], name=self.label))

    def _Pad(self, a):
        x = self.x()
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        pads = self.const(1) if len(self.node.input) > 1 else np.asarray(a["pads"])
        value = self.const(2, required=False) if len(self.node.input) > 2 else None
        value = (
            float(a.get("value", 0.0)) if value is None else float(value.reshape(()))
        )
        pads = [int(p) for p in pads]
        if mode != "constant" or value != 0.0 or len(pads) != 8 or x.kind != "map":
            self.fail("Pad other than zero channel padding")
        if any(pads[i] for i in (0, 2, 3, 4, 6, 7)) or min(pads) < 0:
            self.fail(f"Pad {pads} (only of the channel axis)")
        c = self.g.fw_shape(x)[0]
        index = (-1,) * pads[1] + tuple(range(c)) + (-1,) * pads[5]
        self.out(self.g.select_channels(x, index, name=self.label))

    def _Gather(self, a):
        idx = self.const(1)
        if self.node.input[0] in self.shape_vals:
            if a.get("axis", 0) != 0:
                self.fail("Gather on a shape with axis != 0")
            vals = self.shape_vals[self.node.input[0]]
            self.shape_vals[self.node.output[0]] = np.take(vals, idx.astype(np.int64))
            return
        x = self.x()
        if a.get("axis", 0) != 1 or idx.ndim != 1 or x.kind != "map":
            self.fail("Gather other than of channels (axis 1, 1-D constant indices)")
        c = self.g.fw_shape(x)[0]
        self.out(self.g.select_channels(x, [int(i) % c for i in idx], name=self.label))

    # -- shape arithmetic of dynamic-batch exports: x.view(x.size(0), -1)

    def shape_operand(self, i: int) -> np.ndarray:
        name = self.node.input[i]
        if name in self.shape_vals:
            return self.shape_vals[name]
        return np.asarray(self.const(i)).astype(object)

    def _Shape(self, a):
        x = self.x()
        dims = np.asarray([None, *self.g.fw_shape(x)], dtype=object)
        start, end = a.get("start", 0), a.get("end", len(dims))
        self.shape_vals[self.node.output[0]] = dims[start:end]

    def _Unsqueeze(self, a):
        axes = a.get("axes")
        if axes is None:
            axes = [int(v) for v in self.const(1).reshape(-1)]
        if self.node.input[0] not in self.shape_vals:
            self.fail("Unsqueeze of a tensor (only of shape values)")
        v = self.shape_vals[self.node.input[0]]
        self.shape_vals[self.node.output[0]] = np.expand_dims(v, tuple(axes))

    def _Concat(self, a):
        inputs = range(len(self.node.input))
        if any(self.is_const(i) for i in inputs) and not any(
            i in self.shape_vals for i in self.node.input
        ):
            self.fail("Concat with a constant input")
        if not any(i in self.shape_vals for i in self.node.input):
            xs = [self.x(i) for i in inputs]
            self.out(self.g.concat(xs, int(a.get("axis", 1)), name=self.label))
            return
        parts = [self.shape_operand(i).reshape(-1) for i in inputs]
        self.shape_vals[self.node.output[0]] = np.concatenate(parts)

    def _Cast(self, a):
        if self.node.input[0] not in self.shape_vals:
            self.fail("Cast of a tensor (only of shape values)")
        self.shape_vals[self.node.output[0]] = self.shape_vals[self.node.input[0]]
