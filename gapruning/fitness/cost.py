"""Cost: the size of the pruned network, for multi-objective use.

Not a quality signal: the exact parameter (or FLOP) count of the compacted
network from :class:`~gapruning.space.PruneSpace` (bilinear in the kept units per
group), relative to the dense network. With budgets met exactly by decoding (see
:mod:`gapruning.encoding`) it is nearly constant under a ``units`` budget; it
matters with a weight in multi-objective fitness or when the budget is loose.
For unstructured kernel masks it counts kept kernel weights (times the output
area for FLOPs of convolutions).
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from ..forward import mask_kind
from ..space import PruneSpace
from .base import FitnessError, register_metric


def _cost(cache, pruned_apply, masks, probes, which="params"):
    """Kept ``which`` ("params" or "flops") over the dense network's; 1 unpruned.

    ``COST = cost(kept units) / cost(all units)``, exact (``PruneSpace``).
    """
    net = pruned_apply.net
    if which not in ("params", "flops"):
        raise FitnessError(f"cost 'which' must be 'params' or 'flops', got {which!r}")
    space = PruneSpace(net)
    dense = space.dense_params if which == "params" else space.dense_flops
    if mask_kind(net, masks) == "units":
        counts = jnp.stack(
            [(jnp.asarray(masks[g]) > 0).sum(-1) for g in space.group_names], -1
        )
        return space.cost_of_counts(counts, which) / dense
    by_name = {n.name: n for n in net.nodes}
    removed = 0.0
    for name, m in masks.items():
        n = by_name[name]
        area = math.prod(n.shape[:-1]) if (n.op == "conv" and which == "flops") else 1
        gone = (jnp.asarray(m) <= 0).sum()
        removed = removed + area * gone
    return (dense - removed) / dense


def params_cost(cache, pruned_apply, masks, probes):
    """Parameters of the compacted network over the dense network's (1 unpruned)."""
    return _cost(cache, pruned_apply, masks, probes, "params")


def flops_cost(cache, pruned_apply, masks, probes):
    """Multiply-accumulates of the compacted network over the dense network's."""
    return _cost(cache, pruned_apply, masks, probes, "flops")


register_metric(
    "cost",
    params_cost,
    None,
    description="parameters kept / dense parameters (exact, multi-objective use)",
    needs_probes=False,
    degrades_with_pruning=False,
)
register_metric(
    "cost_flops",
    flops_cost,
    None,
    description="FLOPs (MACs) kept / dense FLOPs (exact, multi-objective use)",
    needs_probes=False,
    degrades_with_pruning=False,
)
