"""Physical compaction: remove masked units, giving a smaller network, same outputs.

Generic over the graph, each op compacting itself (the op table's
:meth:`~gapruning.models.ops.Op.compact_params` / ``compact_attrs``): each
Dense/Conv keeps the rows of its kept input units and the columns of its kept
output units, BatchNorm keeps the entries of its kept channels, a Dense after
Flatten keeps every spatial position of the kept channels, a parameter-free
shortcut (``channel_map``) re-indexes into the kept channels, and a unit spanning
several channels (an attention head) keeps or loses all of them.
Coupled groups are removed from every member at once. The compacted network still
has (all-ones) masks, so it can be pruned again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from .models import Net, assemble
from .models.ops import op_of
from .space import PruneSpace
from .zoo import Pretrained


def kept_index(space: PruneSpace, masks: Mapping, tensor: str, width: int):
    """Indices into ``tensor``'s last axis that survive compaction."""
    node = space.node(tensor)
    if op_of(node).flow == "reshape":
        src = space.node(node.inputs[0])
        inner = kept_index(space, masks, src.name, src.shape[-1])
        positions = math.prod(src.shape[:-1])
        return (np.arange(positions)[:, None] * src.shape[-1] + inner[None, :]).ravel()
    pieces = space.pieces_of(tensor)
    if pieces:
        starts = np.cumsum([0] + [space.node(t).shape[-1] for t in pieces])
        return np.concatenate(
            [
                start + kept_index(space, masks, t, space.node(t).shape[-1])
                for start, t in zip(starts, pieces, strict=False)
            ]
        )
    group = space.group_of(tensor)
    if group is None:
        return np.arange(width)
    units = np.flatnonzero(np.asarray(masks[group]).astype(bool))
    unit = space.unit_width(tensor)
    return (units[:, None] * unit + np.arange(unit)[None, :]).ravel()


def compact(
    pretrained: Pretrained, masks: Mapping, *, allow_empty: bool = False
) -> Pretrained:
    """A physically smaller copy of ``pretrained`` with the masked units removed.

    Args:
        pretrained: the network (its own masks are ignored; ``masks`` decides).
        masks: group name -> boolean/0-1 array of kept units (see ``PruneSpace``).
        allow_empty: allow removing every unit of a group (a zero-width layer).

    Returns:
        A :class:`Pretrained` whose outputs equal ``pretrained`` masked by ``masks``;
        its card records the parent, the kept units and params/FLOPs before/after.
    """
    space = PruneSpace(pretrained.model)
    space.validate(masks, allow_empty=allow_empty)
    masks = {g: np.asarray(masks[g]).astype(bool) for g in space.group_names}
    # NumPy: slicing jax arrays would compile one gather per layer shape
    old_params = jax.tree.map(
        np.asarray, nnx.to_pure_dict(nnx.state(pretrained.model.layers))
    )
    index = {}
    nodes = []
    for n in pretrained.model.nodes:
        out = kept_index(space, masks, n.name, n.shape[-1])
        index[n.name] = out
        shape = (*n.shape[:-1], len(out))
        rows = index[n.inputs[0]] if n.inputs else None
        attrs = op_of(n).compact_attrs(n, dict(n.attrs), out, rows)
        nodes.append(
            dataclasses.replace(n, shape=shape, attrs=tuple(sorted(attrs.items())))
        )
    new_params = {
        n.name: op_of(n).compact_params(
            n, old_params[n.name], index[n.inputs[0]], index[n.name]
        )
        for n in pretrained.model.nodes
        if n.name in old_params
    }
    model = assemble(tuple(nodes), new_params)
    before = {"params": space.dense_params, "flops": space.dense_flops}
    after = {"params": int(space.params(masks)), "flops": int(space.flops(masks))}
    card = dict(pretrained.card)
    card["name"] = f"{pretrained.name}-pruned"
    card["pruning"] = {
        "parent": pretrained.name,
        "kept": space.kept(masks),
        "dense_width": {g.name: g.size for g in space.groups},
        "params": {"before": before["params"], "after": after["params"]},
        "flops": {"before": before["flops"], "after": after["flops"]},
    }
    return Pretrained(model, card)


def param_count(model: Pretrained | Net) -> int:
    """Number of parameter elements (``nnx.Param``) of a model."""
    net = model.model if isinstance(model, Pretrained) else model
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(net, nnx.Param)))


def sparsify(pretrained: Pretrained, kernel_masks: Mapping) -> Pretrained:
    """Unstructured pruning: a copy of ``pretrained`` (same architecture and
    shapes) whose Dense/Conv kernels are zeroed where ``kernel_masks`` (layer name
    -> kernel-shaped bool/0-1 array) is false. Its outputs equal
    ``gp.masked_apply(pretrained, kernel_masks, x)``; its card records nonzero
    parameter counts and nonzero kernel multiply-accumulates before/after."""
    from .forward import mask_kind, with_kernel_masks

    net = pretrained.model
    if mask_kind(net, kernel_masks) != "weights":
        raise ValueError("sparsify takes kernel masks keyed by Dense/Conv layer name")
    for name, m in kernel_masks.items():
        want = tuple(net.layers[name].kernel[...].shape)
        if tuple(np.shape(m)) != want:
            raise ValueError(
                f"kernel mask {name!r} has shape {np.shape(m)}, expected {want}"
            )
    masks = {k: np.asarray(v).astype(bool) for k, v in kernel_masks.items()}
    sparse = with_kernel_masks(net, masks)
    space = pretrained.space

    def nonzero(model: Net) -> int:
        leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
        return sum(int(np.count_nonzero(np.asarray(x))) for x in leaves)

    def macs(model: Net) -> int:
        total = 0
        for n in model.nodes:
            if op_of(n).flow == "producer":
                area = op_of(n).area(n)
                kernel = np.asarray(model.layers[n.name].kernel[...])
                total += area * int(np.count_nonzero(kernel))
        return total

    card = dict(pretrained.card)
    card["name"] = f"{pretrained.name}-sparse"
    card["pruning"] = {
        "parent": pretrained.name,
        "kind": "unstructured",
        "kept_weights": {k: int(v.sum()) for k, v in masks.items()},
        "layer_sizes": {k: int(v.size) for k, v in masks.items()},
        "params": {"before": space.dense_params, "after": nonzero(sparse)},
        "nonzero_params": {"before": nonzero(net), "after": nonzero(sparse)},
        "flops": {"before": space.dense_flops, "after": macs(sparse)},
    }
    return Pretrained(sparse, card)
