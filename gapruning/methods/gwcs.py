"""``gwcs``: multi-stage genetic channel search with a wavelet fitness, then
knowledge distillation (after Chen et al., 2021, GWCS).

The prunable groups are split, shallow to deep, into ``stages`` contiguous
stages of convolutional groups (an MLP: of its dense groups; the dense groups of
a conv network join the last stage). Stage by stage, a binary GA (the engine's
``ga`` strategy, one jitted scan per stage) searches the channel bits of the
stage's groups with the wavelet channel-aggregation fitness
(:mod:`gapruning.fitness.wavelet`) plus output fidelity on probes; earlier stages
stay fixed at their found masks (the next stage starts from the pruned result),
later stages are still dense. Finally the compacted network is distilled to the
dense one on data-free probes (``gp.recover.distill``; ``distill_steps=0``
skips it) and returned as the method's compacted result
(``MethodResult.pruned``).

What differs from GWCS:

* **Data-free.** Feature maps and the distillation use synthetic probes (those of
  the call's fitness when it is a composed one), not training images.
* **How many channels.** The number of channels kept per group is fixed up front
  by the exact budget decoding of the per-group standardized L1 norms (so any
  ``units``/``params``/``flops`` budget is met exactly); the GA decides which
  channels (bits; ties broken by L1) inside each group of its stage.
* **Fitness.** ``wavelet + fidelity`` (both normalized, weights in ``fitness``);
  an MLP has no feature maps, so ``fidelity`` alone. A stage's generations are
  ``generations // stages``.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import search
from ..compact import compact
from ..encoding import (
    Budget,
    kept_fraction_fn,
    l1_unit_scores,
    standardize_per_group,
)
from . import MethodContext, MethodResult, register_method


def stage_groups(space, stages: int) -> list[list[str]]:
    """Groups per stage, shallow to deep (conv groups split evenly; dense groups
    of a conv network in the last stage)."""
    conv = [g.name for g in space.groups if g.kind == "conv"]
    rest = [g.name for g in space.groups if g.kind != "conv"]
    main, tail = (conv, rest) if conv else (rest, [])
    n = max(1, min(stages, len(main)))
    parts = [list(a) for a in np.array_split(np.array(main, object), n)]
    parts[-1].extend(tail)
    return [p for p in parts if p]


def stage_fitness(ctx: MethodContext, spec: Any = None):
    """``(fitness, probes)`` of the stages: the wavelet + fidelity composite (MLPs:
    fidelity) on the call's probes, or the user's callable as is (no probes)."""
    from ..fitness import Fitness, compose

    base = ctx.fitness
    if not isinstance(base, Fitness):
        return base, None
    has_conv = any(g.kind == "conv" for g in ctx.space.groups)
    default = {"wavelet": 1.0, "fidelity": 1.0} if has_conv else "fidelity"
    fit = compose(ctx.net, spec or default, probes=base.probes, normalize=True)
    return fit, base.probes


def stage_problem(ctx: MethodContext, fit, prior, quota, masks, groups):
    """The search problem of one stage: the channel bits of ``groups`` (each
    group keeps its ``quota``: the top bits, ties broken by ``prior``), the
    other groups fixed at ``masks``; and the L1 ``center`` of its genome."""
    space = ctx.space
    offsets = dict(zip(space.group_names, space.offsets, strict=True))
    sizes = dict(zip(space.group_names, space.sizes, strict=True))
    fixed = {g: jnp.asarray(m) for g, m in masks.items()}
    starts = np.cumsum([0] + [sizes[g] for g in groups])

    def decode(genome):
        out = dict(fixed)
        for g, a, b in zip(groups, starts[:-1], starts[1:], strict=True):
            o = offsets[g]
            score = genome[a:b] + 1e-3 * jnp.tanh(prior[o : o + sizes[g]])
            _, top = jax.lax.top_k(score, quota[g])
            out[g] = jnp.zeros(sizes[g], bool).at[top].set(True)
        return out

    def encode(m):
        return jnp.concatenate([jnp.asarray(m[g], jnp.float32) for g in groups])

    # the kept share of units (what the GA decides), whatever the budget's kind
    kept = kept_fraction_fn(space, Budget("units", ctx.budget.target))
    center = jnp.concatenate(
        [jnp.asarray(prior[offsets[g] : offsets[g] + sizes[g]]) for g in groups]
    )
    return search.Problem(decode, fit, kept, encode), center


def search_stages(ctx: MethodContext, plan, fit, gens, ga_options, scan):
    """The GA stage by stage (earlier stages fixed at their found masks); a
    result without ``seconds`` and ``details``."""
    space = ctx.space
    prior = standardize_per_group(l1_unit_scores(ctx.net.model, space), space)
    quota = ctx.quotas(prior)  # exact budget: channels per group
    masks = {
        g: np.ones(s, bool) for g, s in zip(space.group_names, space.sizes, strict=True)
    }
    history: dict[str, list] = {}
    found = MethodResult(masks, ctx.net)
    for s, groups in enumerate(plan):
        problem, center = stage_problem(ctx, fit, prior, quota, masks, groups)
        strategy = search.make_strategy(
            "ga", ctx.population, len(center), **dict(ga_options or {})
        )
        key = jax.random.PRNGKey(ctx.seed + s)
        result = search.run(
            strategy, problem, key, gens, generations_per_scan=scan, center=center
        )
        masks.update({g: np.asarray(result.best_masks[g], bool) for g in groups})
        for k, v in result.history.items():
            history.setdefault(k, []).append(v)
        found.evaluations += result.evaluations
        found.compile_seconds += result.compile_seconds
        found.best_fitness = result.best_fitness
    found.history = {k: np.concatenate(v) for k, v in history.items()}
    return found


def distill_compacted(ctx: MethodContext, masks, probes, steps, options):
    """The network compacted under ``masks`` and distilled to the dense one on
    ``probes`` (default: distill's own), and a description of the distillation."""
    from .. import recover

    opts = {"steps": steps, "seed": ctx.seed, "masks": masks}
    if probes is not None:
        opts["probes"] = probes
    opts.update(options or {})
    small = recover.distill(compact(ctx.net, masks), ctx.net, **opts)
    return small, {
        "steps": steps,
        "probes": "fitness probes" if probes is not None else "distill default",
    }


def gwcs(
    ctx: MethodContext,
    *,
    stages: int = 3,
    fitness: Any = None,
    distill_steps: int = 200,
    distill_options: dict | None = None,
    ga_options: dict | None = None,
    generations_per_scan: int = 10,
) -> MethodResult:
    """Multi-stage GA with the wavelet fitness, then distillation; module doc.

    Args:
        stages: number of stages (at most the number of conv groups).
        fitness: compose spec of the stage fitness (default ``{"wavelet": 1,
            "fidelity": 1}``, MLPs ``"fidelity"``).
        distill_steps: distillation steps on probes (0: none).
        distill_options: more keyword arguments of ``gp.recover.distill``.
        ga_options: options of the ``ga`` strategy.
    """
    from ..fitness import Fitness

    t0 = time.perf_counter()
    plan = stage_groups(ctx.space, stages)
    fit, probes = stage_fitness(ctx, fitness)
    gens = max(1, ctx.generations // len(plan))
    found = search_stages(ctx, plan, fit, gens, ga_options, generations_per_scan)
    small, distilled = None, None
    if distill_steps > 0:
        small, distilled = distill_compacted(
            ctx, found.masks, probes, distill_steps, distill_options
        )
    details = {
        "stages": plan,
        "generations_per_stage": gens,
        "kept_per_group": {g: int(m.sum()) for g, m in found.masks.items()},
        "stage_fitness": fit.describe() if isinstance(fit, Fitness) else "callable",
        "distill": distilled,
    }
    return dataclasses.replace(
        found, seconds=time.perf_counter() - t0, details=details, pruned=small
    )


register_method(
    "gwcs",
    gwcs,
    "multi-stage GA on channel bits with the wavelet fitness, then data-free "
    "distillation (Chen et al. 2021)",
)
