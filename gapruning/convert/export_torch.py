"""Gapruning models out to PyTorch: an ``nn.Module`` and its state dict.

See :mod:`gapruning.convert.export` for the layouts and how masks are handled.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..models.builder import input_mask
from ..models.graph import Node
from ..models.ops import OPS, UnsupportedOpError, op_of
from ..zoo import Pretrained
from .common import ConversionError, flatten_source
from .export import layer_arrays, vector_masks


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
        op = op_of(n)
        if not op.uses_masks:
            continue
        m = np.asarray(op.mask_vector(n, masks.__getitem__), np.float32)
        if np.all(m == 1.0):
            continue
        for r in readers.get(n.name, []):
            if op_of(r).flow == "producer":
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
                    f"mask {n.attr('group') or n.name!r} is read by {r.op} "
                    f"{r.name!r} and cannot be folded into weights: compact the "
                    "model first"
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
        for key, value in op_of(n).torch_state(n, p, chw).items():
            state[f"{n.name}.{key}"] = value
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
                layer = _torch_layer(n, in_shape)
                if layer is not None and hasattr(self, n.name):
                    raise ConversionError(
                        f"node name {n.name!r} clashes with nn.Module"
                    )
                if layer is not None:
                    self.add_module(n.name, layer)
            self._shapes = shapes
            self._by_name = {n.name: n for n in nodes}

        def mask(self, group: str):
            """The mask buffer of ``group``."""
            return getattr(self, self._mask_names[group])

        def input_mask(self, node: Node):
            """The vector of the mask ``node`` reads (None: its input is not
            masked)."""
            return input_mask(node, self._by_name, lambda g: self.mask(g).numpy())

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
    op = OPS.get(n.op)
    return None if op is None else op.torch_layer(n, in_shape)


def _torch_op(graph, n: Node, ins, in_shape):
    """Node ``n`` of ``graph`` (a TorchGraph) applied to its inputs ``ins`` (the op
    table's :meth:`~gapruning.models.ops.Op.torch`)."""
    op = OPS.get(n.op)
    if op is None or not op.supports("torch"):
        raise ConversionError(f"op {n.op!r} has no PyTorch form")
    try:
        return op.torch(graph, n, ins, in_shape)
    except UnsupportedOpError as err:
        raise ConversionError(str(err)) from None
