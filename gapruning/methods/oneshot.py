"""One-shot pruning criteria: score every unit once from the weights alone, keep
the best-scored units under the exact budget (no search, no fitness, no data).

* ``l1``: L1 norm of each unit's incoming weights (summed over coupled producers),
  the magnitude criterion of Li et al. (2017, "Pruning Filters for Efficient
  ConvNets").
* ``random_mask``: uniform random scores (seeded), the sanity baseline.
"""

from __future__ import annotations

import time

import numpy as np

from ..encoding import l1_unit_scores
from . import MethodContext, MethodResult, register_method


def l1(ctx: MethodContext) -> MethodResult:
    """Keeps the units with the largest incoming-weight L1 norm."""
    t0 = time.perf_counter()
    masks = ctx.decode(l1_unit_scores(ctx.net.model, ctx.space))
    return MethodResult(masks, ctx.net, seconds=time.perf_counter() - t0)


def random_mask(ctx: MethodContext) -> MethodResult:
    """Keeps uniformly random units (seeded by ``ctx.seed``)."""
    t0 = time.perf_counter()
    scores = np.random.default_rng(ctx.seed).random(ctx.space.num_units)
    masks = ctx.decode(scores)
    return MethodResult(masks, ctx.net, seconds=time.perf_counter() - t0)


register_method("l1", l1, "one-shot: largest L1 norm of incoming weights per unit")
register_method("random_mask", random_mask, "one-shot: uniformly random units")
