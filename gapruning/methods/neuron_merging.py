"""Neuron merging: one-shot L1 selection, then each removed unit merged into its
most similar kept unit.

Implements the pipeline of Kim, Park, Lee & Kwak (2020, "Neuron Merging:
Compensating for Pruned Neurons", NeurIPS), in the spirit of Srinivas & Babu
(2015, "Data-free parameter pruning for Deep Neural Networks"), as the method
``neuron_merging``:

1. select the kept units by the L1 norm of their incoming weights, under the
   exact budget (the ``l1`` criterion and :class:`~gapruning.encoding.BudgetDecoder`);
2. compensate: every removed unit ``j`` is matched with the kept unit ``i`` of its
   group whose incoming weights (and bias) are the most cosine-similar, and the
   consumer layers' rows get ``W[i] += s * W[j]``, ``s = ||v_j|| / ||v_i||``
   (exact when ``v_j = s v_i`` and the activation is positively homogeneous).

The compensation is :func:`gapruning.recover.repair` (``method="merge"``), shared
with ``gp.prune(..., repair="merge")``; what differs from the paper is listed
there (matching on the dense network's incoming weights, not layer after layer;
BatchNorm folded into the incoming vector; residual-coupled groups left
uncompensated). Other differences: the paper selects per layer with a fixed ratio
(``per_group=True`` here) and keeps a match only above a cosine threshold ``t``
(``threshold``, default 0: every removed unit is merged into its best match).
"""

from __future__ import annotations

import time

from ..encoding import l1_unit_scores
from . import MethodContext, MethodResult, register_method


def neuron_merging(ctx: MethodContext, threshold: float = 0.0) -> MethodResult:
    """L1 selection under the budget, then cosine merging compensation."""
    from ..recover import repair

    t0 = time.perf_counter()
    masks = ctx.decode(l1_unit_scores(ctx.net.model, ctx.space))
    repaired = repair(ctx.net, masks, method="merge", threshold=threshold)
    return MethodResult(
        masks,
        repaired,
        seconds=time.perf_counter() - t0,
        details={"selection": "l1", "repair": "merge", "threshold": threshold},
    )


register_method(
    "neuron_merging",
    neuron_merging,
    "one-shot L1 selection + merging into the most similar kept unit (Kim et al.)",
)
