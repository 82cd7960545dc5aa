"""Pruned (or any) gapruning models out to ONNX and PyTorch, for deployment.

:func:`to_onnx` writes the node tuple directly with ``onnx.helper`` (opset 17,
NCHW input ``(N, C, H, W)`` or ``(N, features)``, symbolic batch size): Dense ->
Gemm, Conv -> Conv with explicit pads (our "SAME" is TensorFlow's, extra padding
at the end), BatchNorm -> BatchNormalization, pools with explicit pads, global
average pooling -> GlobalAveragePool + Flatten, flatten of a feature map ->
Transpose to NHWC + Flatten (our flatten order), residual Add -> Add, the
parameter-free shortcut ``channel_map`` -> Slice + Pad/Gather (+ Mul for zero
channels that are not a padding), masks -> Mul by the mask constant, omitted when
all ones (a compacted model has none left). Masks with a population axis cannot
be exported. :func:`gapruning.convert.from_onnx` reads every op written here.

:func:`to_torch_module` builds an ``nn.Module`` executing the same graph in NCHW
(one submodule per layer, named like the graph's node), and
:func:`to_torch_state_dict` its state dict: PyTorch layouts (``OIHW``,
``(out, in)``, rows of a Dense after a flatten in ``C,H,W`` order), BatchNorm
running statistics, masks folded into the weights of the layers that read them
(exact for 0/1 masks read by Dense/Conv, or by a Dense through a flatten). For a
zoo architecture its keys (``conv1.weight``, ``fc1.bias``...) are the zoo's node
names, which :func:`gapruning.convert.from_torch` maps back by name.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..files import replaced_atomically
from ..models.graph import Node
from ..zoo import Pretrained
from .common import LAYER_VARS, ConversionError, flatten_source, hwc_rows_to_chw

ONNX_OPSET = 17


def _layer_arrays(pretrained: Pretrained) -> dict[str, dict[str, np.ndarray]]:
    ops = {n.name: n.op for n in pretrained.model.nodes}
    out = {}
    for name, layer in pretrained.model.layers.items():
        out[name] = {
            var: np.asarray(getattr(layer, var)[...], np.float32)
            for var in LAYER_VARS[ops[name]]
            if getattr(layer, var, None) is not None
        }
    return out


def _masks(pretrained: Pretrained) -> dict[str, np.ndarray]:
    masks = {
        g: np.asarray(m[...], np.float32) for g, m in pretrained.model.masks.items()
    }
    for g, m in masks.items():
        if m.ndim != 1:
            raise ConversionError(
                f"mask {g!r} has a population axis (shape {m.shape}); export one "
                "individual's masks"
            )
    return masks


def _explicit_pads(padding, in_hw, kernel, strides) -> tuple[tuple[int, int], ...]:
    """((top, bottom), (left, right)) for our padding spec (TF "SAME" rule)."""
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":
        out = []
        for size, k, s in zip(in_hw, kernel, strides, strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _is_padding_index(index, c) -> bool:
    return tuple(index[:c]) == tuple(range(c)) and all(i == -1 for i in index[c:])


# ------------------------------------------------------------------ ONNX


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
    from onnx import TensorProto, helper, numpy_helper

    nodes: tuple[Node, ...] = pretrained.model.nodes
    params = _layer_arrays(pretrained)
    masks = _masks(pretrained)
    shapes = {n.name: n.shape for n in nodes}
    inits, onnx_nodes = [], []
    tensor: dict[str, str] = {}  # our node -> ONNX tensor name

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def emit(op, inputs, out, **attrs):
        onnx_nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    for n in nodes:
        ins = [tensor[i] for i in n.inputs]
        in_shape = shapes[n.inputs[0]] if n.inputs else None
        p = params.get(n.name, {})
        if n.op == "input":
            tensor[n.name] = "input"
            continue
        if n.op == "dense":
            args = [ins[0], const(f"{n.name}.weight", p["kernel"].T.copy())]
            if "bias" in p:
                args.append(const(f"{n.name}.bias", p["bias"]))
            out = emit("Gemm", args, n.name, transB=1)
        elif n.op == "conv":
            k, s = n.attr("kernel_size"), n.attr("strides")
            (t, b), (left, r) = _explicit_pads(n.attr("padding"), in_shape[:2], k, s)
            args = [
                ins[0],
                const(f"{n.name}.weight", p["kernel"].transpose(3, 2, 0, 1)),
            ]
            if "bias" in p:
                args.append(const(f"{n.name}.bias", p["bias"]))
            out = emit(
                "Conv",
                args,
                n.name,
                kernel_shape=list(k),
                strides=list(s),
                pads=[t, left, b, r],
            )
        elif n.op == "batchnorm":
            args = [ins[0]] + [
                const(f"{n.name}.{k}", p[k]) for k in ("scale", "bias", "mean", "var")
            ]
            out = emit("BatchNormalization", args, n.name, epsilon=n.attr("epsilon"))
        elif n.op in ("relu", "sigmoid"):
            out = emit({"relu": "Relu", "sigmoid": "Sigmoid"}[n.op], ins, n.name)
        elif n.op == "softmax":
            out = emit("Softmax", ins, n.name, axis=1)
        elif n.op in ("maxpool", "avgpool"):
            k, s = n.attr("window"), n.attr("strides")
            (t, b), (left, r) = _explicit_pads(n.attr("padding"), in_shape[:2], k, s)
            attrs = {
                "kernel_shape": list(k),
                "strides": list(s),
                "pads": [t, left, b, r],
            }
            if n.op == "avgpool":
                include = bool(n.attr("count_include_pad")) and not isinstance(
                    n.attr("padding"), str
                )
                attrs["count_include_pad"] = int(include)
            op = "MaxPool" if n.op == "maxpool" else "AveragePool"
            out = emit(op, ins, n.name, **attrs)
        elif n.op == "global_avgpool":
            pooled = emit("GlobalAveragePool", ins, f"{n.name}.pooled")
            out = emit("Flatten", [pooled], n.name, axis=1)
        elif n.op == "flatten":
            src = ins[0]
            if len(in_shape) == 3 and in_shape[0] * in_shape[1] > 1 and in_shape[2] > 1:
                src = emit("Transpose", [src], f"{n.name}.nhwc", perm=[0, 2, 3, 1])
            out = emit("Flatten", [src], n.name, axis=1)
        elif n.op == "add":
            out = ins[0]
            for i, other in enumerate(ins[1:], start=1):
                name = n.name if i == len(ins) - 1 else f"{n.name}.{i}"
                out = emit("Add", [out, other], name)
        elif n.op == "channel_map":
            out = _onnx_channel_map(n, ins[0], in_shape, const, emit)
        elif n.op == "mask":
            m = masks[n.attr("group")]
            if np.all(m == 1.0):
                tensor[n.name] = ins[0]
                continue
            shape = (-1, 1, 1) if len(n.shape) == 3 else (-1,)
            out = emit(
                "Mul", [ins[0], const(f"{n.name}.value", m.reshape(shape))], n.name
            )
        else:
            raise ConversionError(f"node {n.name!r}: op {n.op!r} has no ONNX export")
        tensor[n.name] = out

    last = nodes[-1]
    final = emit("Identity", [tensor[last.name]], "output")
    in_shape = nodes[0].shape
    fw_in = in_shape if len(in_shape) == 1 else (in_shape[2], in_shape[0], in_shape[1])
    graph = helper.make_graph(
        onnx_nodes,
        pretrained.name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *fw_in])],
        [
            helper.make_tensor_value_info(
                final, TensorProto.FLOAT, ["batch", *_fw_shape(last.shape)]
            )
        ],
        initializer=inits,
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


def _onnx_channel_map(n, x, in_shape, const, emit):
    stride, index = n.attr("stride"), list(n.attr("index"))
    c = in_shape[-1]
    out = x
    if stride > 1:
        big = np.iinfo(np.int64).max
        out = emit(
            "Slice",
            [
                out,
                const(f"{n.name}.starts", np.zeros(2, np.int64)),
                const(f"{n.name}.ends", np.full(2, big, np.int64)),
                const(f"{n.name}.axes", np.array([2, 3], np.int64)),
                const(f"{n.name}.steps", np.full(2, stride, np.int64)),
            ],
            f"{n.name}.sliced",
        )
    if index == list(range(c)):
        return emit("Identity", [out], n.name)
    if _is_padding_index(index, c):
        pads = np.zeros(8, np.int64)
        pads[5] = len(index) - c
        return emit(
            "Pad", [out, const(f"{n.name}.pads", pads)], n.name, mode="constant"
        )
    picked = np.maximum(np.asarray(index, np.int64), 0)
    if all(i >= 0 for i in index):
        return emit("Gather", [out, const(f"{n.name}.index", picked)], n.name, axis=1)
    out = emit(
        "Gather", [out, const(f"{n.name}.index", picked)], f"{n.name}.gathered", axis=1
    )
    keep = (np.asarray(index) >= 0).astype(np.float32).reshape(-1, 1, 1)
    return emit("Mul", [out, const(f"{n.name}.keep", keep)], n.name)


# ------------------------------------------------------------------ PyTorch


def to_torch_module(pretrained: Pretrained):
    """An ``nn.Module`` (eval mode) computing ``pretrained`` on NCHW inputs.

    Layers are submodules named after the graph's nodes; masks are applied as
    non-persistent buffers (not part of the state dict). Its state dict is
    :func:`to_torch_state_dict`'s when all masks are ones.

    Example:
        >>> module = to_torch_module(gp.load("lenet300-fmnist"))
        >>> logits = module(torch.rand(8, 1, 28, 28))
    """
    import torch

    module = _torch_graph_class()(pretrained.model.nodes, _masks(pretrained))
    state = _torch_state(pretrained, fold=False)
    module.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
    return module.eval()


def to_torch_state_dict(pretrained: Pretrained) -> dict[str, Any]:
    """PyTorch state dict of ``pretrained`` (see module docstring).

    Returns:
        ``{name: torch.Tensor}``, loadable into :func:`to_torch_module`'s module
        and, for zoo architectures, into any PyTorch module whose layer names and
        order match (``from_torch(sd, arch=...)`` reads it back).

    Raises:
        ConversionError: a non-binary mask, or a mask that no weight can absorb
            (read by a parameter-free shortcut): compact the model first.
    """
    import torch

    state = _torch_state(pretrained, fold=True)
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}


def _fold_masks(nodes, params, masks):
    """Multiplies every mask into the weights of the layers reading it."""
    by_name = {n.name: n for n in nodes}
    readers: dict[str, list[Node]] = {}
    for n in nodes:
        for i in n.inputs:
            readers.setdefault(i, []).append(n)
    params = {k: dict(v) for k, v in params.items()}
    for n in nodes:
        if n.op != "mask":
            continue
        m = masks[n.attr("group")]
        if np.all(m == 1.0):
            continue
        for r in readers.get(n.name, []):
            if r.op == "dense":
                params[r.name]["kernel"] = params[r.name]["kernel"] * m[:, None]
            elif r.op == "conv":
                params[r.name]["kernel"] = params[r.name]["kernel"] * m[:, None]
            elif r.op == "flatten" and all(
                q.op == "dense" for q in readers.get(r.name, [])
            ):
                h, w, _ = by_name[n.name].shape
                tiled = np.tile(m, h * w)
                for q in readers[r.name]:
                    params[q.name]["kernel"] = params[q.name]["kernel"] * tiled[:, None]
            else:
                raise ConversionError(
                    f"mask {n.attr('group')!r} is read by {r.op} {r.name!r} and cannot "
                    "be folded into weights: compact the model first"
                )
    return params


def _torch_state(pretrained: Pretrained, *, fold: bool) -> dict[str, np.ndarray]:
    nodes = pretrained.model.nodes
    params = _layer_arrays(pretrained)
    if fold:
        params = _fold_masks(nodes, params, _masks(pretrained))
    shapes = {n.name: n.shape for n in nodes}
    state = {}
    for n in nodes:
        p = params.get(n.name)
        if p is None:
            continue
        flat = flatten_source(nodes, n.name)
        chw = None
        if flat is not None:
            h, w, c = shapes[flat.inputs[0]]
            chw = (c, h, w)
        if n.op == "dense":
            k = p["kernel"] if chw is None else hwc_rows_to_chw(p["kernel"], chw)
            state[f"{n.name}.weight"] = k.T.copy()
        elif n.op == "conv":
            state[f"{n.name}.weight"] = p["kernel"].transpose(3, 2, 0, 1).copy()
        else:
            names = {
                "scale": "weight",
                "bias": "bias",
                "mean": "running_mean",
                "var": "running_var",
            }
            for ours, theirs in names.items():
                v = p[ours]
                state[f"{n.name}.{theirs}"] = (
                    v if chw is None else hwc_rows_to_chw(v, chw)
                )
            state[f"{n.name}.num_batches_tracked"] = np.zeros((), np.int64)
            continue
        if "bias" in p:
            state[f"{n.name}.bias"] = p["bias"]
    return state


_TORCH_GRAPH = None


def _torch_graph_class():
    """The ``nn.Module`` class executing a node tuple (made once torch is there)."""
    global _TORCH_GRAPH
    if _TORCH_GRAPH is not None:
        return _TORCH_GRAPH
    import torch
    from torch import nn
    from torch.nn import functional as F

    class TorchGraph(nn.Module):
        """Executes a gapruning node tuple in PyTorch (NCHW)."""

        def __init__(self, nodes: tuple[Node, ...], masks: dict[str, np.ndarray]):
            super().__init__()
            self.nodes = tuple(nodes)
            shapes = {n.name: n.shape for n in nodes}
            self._mask_names = {}
            for i, (g, m) in enumerate(masks.items()):
                self.register_buffer(f"_mask{i}", torch.from_numpy(m), persistent=False)
                self._mask_names[g] = f"_mask{i}"
            for n in nodes:
                in_shape = shapes[n.inputs[0]] if n.inputs else None
                if n.op in ("dense", "conv", "batchnorm") and hasattr(self, n.name):
                    raise ConversionError(
                        f"node name {n.name!r} clashes with nn.Module"
                    )
                if n.op == "dense":
                    layer = nn.Linear(
                        in_shape[-1], n.attr("features"), bias=n.attr("use_bias")
                    )
                elif n.op == "conv":
                    layer = nn.Conv2d(
                        in_shape[-1],
                        n.attr("features"),
                        tuple(n.attr("kernel_size")),
                        stride=tuple(n.attr("strides")),
                        bias=n.attr("use_bias"),
                    )
                elif n.op == "batchnorm":
                    cls = nn.BatchNorm2d if len(n.shape) == 3 else nn.BatchNorm1d
                    layer = cls(
                        n.shape[-1],
                        eps=n.attr("epsilon"),
                        momentum=1.0 - n.attr("momentum"),
                    )
                else:
                    continue
                self.add_module(n.name, layer)
            self._shapes = shapes

        def forward(self, x):
            vals = {}
            for n in self.nodes:
                ins = [vals[i] for i in n.inputs]
                in_shape = self._shapes[n.inputs[0]] if n.inputs else None
                if n.op == "input":
                    y = x
                elif n.op == "dense":
                    y = getattr(self, n.name)(ins[0])
                elif n.op == "conv":
                    k, s = n.attr("kernel_size"), n.attr("strides")
                    (t, b), (lf, r) = _explicit_pads(
                        n.attr("padding"), in_shape[:2], k, s
                    )
                    y = getattr(self, n.name)(F.pad(ins[0], (lf, r, t, b)))
                elif n.op == "batchnorm":
                    y = getattr(self, n.name)(ins[0])
                elif n.op == "relu":
                    y = torch.relu(ins[0])
                elif n.op == "sigmoid":
                    y = torch.sigmoid(ins[0])
                elif n.op == "softmax":
                    y = torch.softmax(ins[0], dim=1)
                elif n.op in ("maxpool", "avgpool"):
                    y = _torch_pool(n, ins[0], in_shape, F)
                elif n.op == "global_avgpool":
                    y = ins[0].mean(dim=(2, 3))
                elif n.op == "flatten":
                    y = torch.flatten(ins[0], 1)
                elif n.op == "add":
                    y = ins[0]
                    for other in ins[1:]:
                        y = y + other
                elif n.op == "channel_map":
                    s, index = n.attr("stride"), torch.tensor(n.attr("index"))
                    v = ins[0][:, :, ::s, ::s]
                    picked = v.index_select(1, index.clamp(min=0))
                    keep = (index >= 0).to(v.dtype).view(1, -1, 1, 1)
                    y = picked * keep
                elif n.op == "mask":
                    m = getattr(self, self._mask_names[n.attr("group")])
                    y = ins[0] * (m.view(1, -1, 1, 1) if ins[0].dim() == 4 else m)
                else:
                    raise ConversionError(f"op {n.op!r} has no PyTorch form")
                vals[n.name] = y
            return vals[self.nodes[-1].name]

    _TORCH_GRAPH = TorchGraph
    return TorchGraph


def _torch_pool(n, x, in_shape, F):
    k, s = tuple(n.attr("window")), tuple(n.attr("strides"))
    (t, b), (lf, r) = _explicit_pads(n.attr("padding"), in_shape[:2], k, s)
    if n.op == "maxpool":
        return F.max_pool2d(F.pad(x, (lf, r, t, b), value=-math.inf), k, s)
    total = F.avg_pool2d(F.pad(x, (lf, r, t, b)), k, s) * (k[0] * k[1])
    if n.attr("count_include_pad") and not isinstance(n.attr("padding"), str):
        return total / (k[0] * k[1])
    ones = F.pad(x.new_ones((1, 1, *x.shape[2:])), (lf, r, t, b))
    return total / (F.avg_pool2d(ones, k, s) * (k[0] * k[1]))
