"""PruneSpace: what can be pruned in a network, and what any pruning costs.

Derived from the network's graph (never written per model): the prunable groups
are the channel spaces of :func:`gapruning.models.channel_spaces` (units tied by
residual additions already share one group), in graph order. Parameters and FLOPs
of a masked network are bilinear in the number of kept units of each group, so they
are stored as a short list of terms ``coef * kept[a] * kept[b]`` and evaluated
exactly for any masks, in NumPy (exact integers) or inside ``jit``/``vmap``.

Counting conventions (equal to the physically compacted model's):

* params: every ``nnx.Param`` element (kernels, biases, BatchNorm and LayerNorm
  scale and bias, class token and position embedding tables; not BatchNorm
  running statistics, not masks);
* FLOPs: multiply-accumulates of Dense and Conv layers and of attention's matrix
  products (the usual pruning-paper convention; normalizations, activations,
  pooling and additions are not counted).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .models import Net, channel_spaces
from .models.graph import Node
from .models.ops import op_of


@dataclasses.dataclass(frozen=True)
class Group:
    """A prunable group: ``size`` units of ``kind`` "dense" (hidden units), "conv"
    (output channels) or "heads" (attention heads). ``members`` are the producer
    layers whose outputs it masks (several when a residual addition couples them).
    A unit may span several channels (:meth:`PruneSpace.unit_width`: an attention
    head's query, key and value channels)."""

    name: str
    size: int
    kind: str
    members: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CostTerm:
    """``coef * kept[a] * kept[b]``; index ``-1`` stands for the constant 1."""

    coef: int
    a: int
    b: int


class MaskError(ValueError):
    """Masks that do not fit the PruneSpace (names, shapes, emptied groups)."""


class PruneSpace:
    """The prunable groups of a network and exact cost accounting.

    Args:
        model: a :class:`~gapruning.models.Net`.

    Example:
        >>> space = PruneSpace(gp.load("lenet300-fmnist").model)
        >>> [(g.name, g.size) for g in space.groups]
        [('fc1', 300), ('fc2', 100)]
        >>> space.params(space.full_masks())
        266610
    """

    def __init__(self, model: Net):
        nodes = model.nodes
        spaces = channel_spaces(nodes)
        by_name = {n.name: n for n in nodes}
        names = list(dict.fromkeys(spaces.prunable[s] for s in sorted(spaces.prunable)))
        order = {}
        for n in nodes:  # groups in the order their first mask appears
            for g in op_of(n).mask_groups(n):
                order.setdefault(g, len(order))
        names.sort(key=lambda g: order.get(g, len(order)))
        index = {g: i for i, g in enumerate(names)}
        space_group = {s: index[g] for s, g in spaces.prunable.items()}
        groups = []
        for g in names:
            sid = next(s for s, name in spaces.prunable.items() if name == g)
            members = tuple(
                n.name
                for n in nodes
                if op_of(n).flow == "producer" and spaces.space_of[n.name] == sid
            )
            size = by_name[members[0]].shape[-1] // spaces.units.get(sid, 1)
            groups.append(Group(g, size, spaces.kinds[sid], members))
        self.groups: tuple[Group, ...] = tuple(groups)
        self.nodes: tuple[Node, ...] = nodes
        self._space_of = spaces.space_of
        self._spaces = spaces
        self._pieces = spaces.pieces
        self._space_group = space_group
        self._by_name = by_name
        self.param_terms, self.flop_terms = self._cost_terms()

    # ------------------------------------------------------------- structure

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g.name for g in self.groups)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(g.size for g in self.groups)

    @property
    def num_units(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Start of each group's units in the flat unit vector."""
        return tuple(int(o) for o in np.cumsum((0, *self.sizes))[:-1])

    def node(self, name: str) -> Node:
        """The graph node called ``name``."""
        return self._by_name[name]

    def group_of(self, node_name: str) -> str | None:
        """The group whose units index ``node_name``'s channels, if prunable."""
        g = self._space_group.get(self._space_of[node_name])
        return None if g is None else self.groups[g].name

    def unit_width(self, tensor: str) -> int:
        """Channels per prunable unit of ``tensor`` (an attention op's heads:
        ``head_dim``; else 1)."""
        return self._spaces.unit_of(tensor)

    def pieces_of(self, tensor: str) -> tuple[str, ...]:
        """The tensors a concatenation put one after the other to make
        ``tensor``'s channels (empty unless it is made of pieces)."""
        return self._pieces.get(self._space_of[tensor], ())

    def unit_ref(self, tensor: str) -> list[tuple[int, int]]:
        """The pieces ``(mult, g)`` of the tensor's last axis: it has
        ``sum(mult * kept[g])`` entries (``g = -1``: a constant ``mult``). One
        piece, except after a concatenation; flatten multiplies by the spatial
        size."""
        node = self._by_name[tensor]
        if op_of(node).flow == "reshape":
            src = self._by_name[node.inputs[0]]
            size = math.prod(src.shape[:-1])
            return [(mult * size, g) for mult, g in self.unit_ref(src.name)]
        pieces = self.pieces_of(tensor)
        if pieces:
            return [p for t in pieces for p in self.unit_ref(t)]
        g = self._space_group.get(self._space_of[tensor], -1)
        return [(self.unit_width(tensor), g)] if g >= 0 else [(node.shape[-1], -1)]

    def _cost_terms(self):
        """Each op's terms from the op table (:meth:`~gapruning.models.ops.Op.cost`)."""
        params, flops = [], []
        for n in self.nodes:
            p, f = op_of(n).cost(n, self.unit_ref)
            params += [CostTerm(*t) for t in p]
            flops += [CostTerm(*t) for t in f]
        return tuple(params), tuple(flops)

    # ------------------------------------------------------------- masks

    def full_masks(self) -> dict[str, np.ndarray]:
        """All units kept."""
        return {g.name: np.ones(g.size, bool) for g in self.groups}

    def validate(
        self, masks: Mapping, *, allow_empty: bool = False, population: bool = False
    ) -> None:
        """Raises :class:`MaskError` naming the first problem with ``masks``."""
        missing = [g for g in self.group_names if g not in masks]
        extra = [g for g in masks if g not in self.group_names]
        if missing or extra:
            raise MaskError(
                f"masks do not match the prunable groups: missing {missing}, "
                f"unknown {extra}; groups are {list(self.group_names)}"
            )
        for g in self.groups:
            shape = np.shape(masks[g.name])
            want = shape[:1] + (g.size,) if population else (g.size,)
            if shape != want or (population and len(shape) != 2):
                expect = f"(P, {g.size})" if population else f"({g.size},)"
                raise MaskError(f"mask {g.name!r} has shape {shape}, expected {expect}")
            if not allow_empty and _is_concrete(masks[g.name]):
                kept = np.asarray(masks[g.name]).astype(bool).sum(axis=-1)
                if np.any(kept == 0):
                    raise MaskError(
                        f"mask {g.name!r} removes every unit of the group; pass "
                        "allow_empty=True to allow removing whole layers"
                    )

    def kept(self, masks: Mapping) -> dict[str, int]:
        """Number of kept units per group."""
        return {
            g: int(np.asarray(masks[g]).astype(bool).sum()) for g in self.group_names
        }

    # ------------------------------------------------------------- costs

    def counts(self, masks: Mapping):
        """Kept units per group as a vector (leading axes of the masks preserved)."""
        leaves = [masks[g] for g in self.group_names]
        if all(_is_concrete(m) for m in leaves):
            return np.stack([np.asarray(m).astype(bool).sum(-1) for m in leaves], -1)
        return jnp.stack([(jnp.asarray(m) > 0).sum(-1) for m in leaves], -1)

    def cost_of_counts(self, counts, which: str = "params"):
        """Exact cost for a kept-count vector (NumPy int64, or jnp float32 in jit)."""
        terms = {"params": self.param_terms, "flops": self.flop_terms}[which]
        xp = np if isinstance(counts, np.ndarray) else jnp
        c = counts.astype(np.int64) if xp is np else counts.astype(jnp.float32)
        ones = xp.ones(c.shape[:-1] + (1,), c.dtype)
        c = xp.concatenate([c, ones], axis=-1)
        a = np.array([t.a for t in terms])
        b = np.array([t.b for t in terms])
        coef = np.array([t.coef for t in terms], np.int64 if xp is np else np.float32)
        return (coef * c[..., a] * c[..., b]).sum(-1)

    def params(self, masks: Mapping):
        """Parameter count of the network compacted with ``masks``."""
        return _scalar(self.cost_of_counts(self.counts(masks), "params"))

    def flops(self, masks: Mapping):
        """Multiply-accumulates per sample of the network compacted with ``masks``."""
        return _scalar(self.cost_of_counts(self.counts(masks), "flops"))

    @property
    def dense_params(self) -> int:
        return int(self.params(self.full_masks()))

    @property
    def dense_flops(self) -> int:
        return int(self.flops(self.full_masks()))

    def flat(self, masks: Mapping):
        """Concatenates group masks into one unit vector (keeps leading axes)."""
        leaves = [masks[g] for g in self.group_names]
        xp = np if all(_is_concrete(m) for m in leaves) else jnp
        return xp.concatenate([xp.asarray(m) for m in leaves], axis=-1)

    def unflat(self, units) -> dict:
        """Splits a unit vector (leading axes allowed) into group masks."""
        return {
            g.name: units[..., o : o + g.size]
            for g, o in zip(self.groups, self.offsets, strict=True)
        }

    def describe(self, masks: Mapping | None = None) -> list[dict]:
        """One row per group: name, kind, size, kept."""
        kept = self.kept(masks) if masks is not None else {}
        return [
            {
                "group": g.name,
                "kind": g.kind,
                "size": g.size,
                "kept": kept.get(g.name, g.size),
            }
            for g in self.groups
        ]

    def __repr__(self) -> str:
        inner = ", ".join(f"{g.name}:{g.size}" for g in self.groups)
        return (
            f"PruneSpace({inner}; params={self.dense_params}, flops={self.dense_flops})"
        )


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _scalar(x):
    return int(x) if isinstance(x, np.ndarray) and x.ndim == 0 else x
