"""Gapruning models out to PyTorch: an ``nn.Module`` and its state dict.

See :mod:`gapruning.convert.export` for the layouts and how masks are handled.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..models.graph import Node
from ..zoo import Pretrained
from .common import ConversionError, flatten_source, hwc_rows_to_chw
from .export import explicit_pads, layer_arrays, vector_masks


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

    module = _torch_graph_class()(pretrained.model.nodes, vector_masks(pretrained))
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
    params = layer_arrays(pretrained)
    if fold:
        params = _fold_masks(nodes, params, vector_masks(pretrained))
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
                layer = _torch_layer(n, in_shape)
                if layer is not None:
                    self.add_module(n.name, layer)
            self._shapes = shapes

        def forward(self, x):
            vals = {}
            for n in self.nodes:
                ins = [vals[i] for i in n.inputs]
                in_shape = self._shapes[n.inputs[0]] if n.inputs else None
                vals[n.name] = (
                    x if n.op == "input" else _torch_op(self, n, ins, in_shape)
                )
            return vals[self.nodes[-1].name]

    _TORCH_GRAPH = TorchGraph
    return TorchGraph


def _torch_layer(n: Node, in_shape):
    """The ``nn`` layer holding node ``n``'s parameters, None if it has none."""
    from torch import nn

    if n.op == "dense":
        return nn.Linear(in_shape[-1], n.attr("features"), bias=n.attr("use_bias"))
    if n.op == "conv":
        return nn.Conv2d(
            in_shape[-1],
            n.attr("features"),
            tuple(n.attr("kernel_size")),
            stride=tuple(n.attr("strides")),
            bias=n.attr("use_bias"),
        )
    if n.op == "batchnorm":
        cls = nn.BatchNorm2d if len(n.shape) == 3 else nn.BatchNorm1d
        return cls(
            n.shape[-1], eps=n.attr("epsilon"), momentum=1.0 - n.attr("momentum")
        )
    return None


def _torch_op(graph, n: Node, ins, in_shape):
    """Node ``n`` of ``graph`` (a TorchGraph) applied to its inputs ``ins``."""
    import torch
    from torch.nn import functional as F

    if n.op in ("dense", "batchnorm"):
        return getattr(graph, n.name)(ins[0])
    if n.op == "conv":
        k, s = n.attr("kernel_size"), n.attr("strides")
        (t, b), (lf, r) = explicit_pads(n.attr("padding"), in_shape[:2], k, s)
        return getattr(graph, n.name)(F.pad(ins[0], (lf, r, t, b)))
    if n.op == "relu":
        return torch.relu(ins[0])
    if n.op == "sigmoid":
        return torch.sigmoid(ins[0])
    if n.op == "softmax":
        return torch.softmax(ins[0], dim=1)
    if n.op in ("maxpool", "avgpool"):
        return _torch_pool(n, ins[0], in_shape, F)
    if n.op == "global_avgpool":
        return ins[0].mean(dim=(2, 3))
    if n.op == "flatten":
        return torch.flatten(ins[0], 1)
    if n.op == "add":
        y = ins[0]
        for other in ins[1:]:
            y = y + other
        return y
    if n.op == "channel_map":
        s, index = n.attr("stride"), torch.tensor(n.attr("index"))
        v = ins[0][:, :, ::s, ::s]
        picked = v.index_select(1, index.clamp(min=0))
        keep = (index >= 0).to(v.dtype).view(1, -1, 1, 1)
        return picked * keep
    if n.op == "mask":
        m = getattr(graph, graph._mask_names[n.attr("group")])
        return ins[0] * (m.view(1, -1, 1, 1) if ins[0].dim() == 4 else m)
    raise ConversionError(f"op {n.op!r} has no PyTorch form")


def _torch_pool(n, x, in_shape, F):
    k, s = tuple(n.attr("window")), tuple(n.attr("strides"))
    (t, b), (lf, r) = explicit_pads(n.attr("padding"), in_shape[:2], k, s)
    if n.op == "maxpool":
        return F.max_pool2d(F.pad(x, (lf, r, t, b), value=-math.inf), k, s)
    total = F.avg_pool2d(F.pad(x, (lf, r, t, b)), k, s) * (k[0] * k[1])
    if n.attr("count_include_pad") and not isinstance(n.attr("padding"), str):
        return total / (k[0] * k[1])
    ones = F.pad(x.new_ones((1, 1, *x.shape[2:])), (lf, r, t, b))
    return total / (F.avg_pool2d(ones, k, s) * (k[0] * k[1]))
