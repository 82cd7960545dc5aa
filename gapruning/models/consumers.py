"""Graph queries about pruned tensors: which Dense/Conv layers read them.

A *consumer* is a layer whose input rows are the units of a pruned group; repair
rewrites its weights and the one-shot criteria read them.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from .graph import Net, mask_read


@dataclasses.dataclass(frozen=True)
class Consumer:
    """A Dense/Conv layer reading the masked tensor ``tensor`` of ``group``.

    ``positions`` is how many times each unit appears in its input rows (the
    spatial size when it reads through a flatten, else 1); ``unit`` how many
    consecutive rows one unit spans (an attention head's channels, else 1)."""

    layer: str
    op: str
    group: str
    tensor: str
    positions: int
    unit: int = 1

    def channel_mask(self, masks):
        """The group's mask in ``masks`` with one entry per input channel."""
        m = masks[self.group]
        return m if self.unit == 1 else jnp.repeat(jnp.asarray(m), self.unit, -1)


def consumers(net: Net) -> tuple[Consumer, ...]:
    """Every Dense/Conv layer that reads a pruned tensor, in graph order."""
    by_name = {n.name: n for n in net.nodes}
    out = []
    for n in net.nodes:
        mask = mask_read(n, by_name)
        if mask is None:
            continue
        flat = by_name[n.inputs[0]].op == "flatten"
        positions = math.prod(mask.shape[:-1]) if flat else 1
        group, unit = mask.attr("group"), mask.attr("unit", 1)
        out.append(Consumer(n.name, n.op, group, mask.inputs[0], positions, unit))
    return tuple(out)


def group_consumers(net: Net, group: str) -> list[tuple[str, int]]:
    """``(layer, positions)`` of the :func:`consumers` reading ``group``'s units
    (the kernel's input rows are ``position * units + unit``)."""
    return [(c.layer, c.positions) for c in consumers(net) if c.group == group]
