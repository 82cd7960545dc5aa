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
skips it), and its weights are written back into the dense shapes for
``gp.prune`` to compact.

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

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .. import search
from ..compact import compact, kept_index
from ..encoding import l1_unit_scores, standardize_per_group
from ..zoo import Pretrained
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


def expand(small: Pretrained, net: Pretrained, masks) -> Pretrained:
    """``net`` with the weights of its compacted copy ``small`` written back into
    the kept positions (the inverse of :func:`~gapruning.compact.compact`)."""
    from flax import nnx

    space = net.space
    index = {
        n.name: kept_index(space, masks, n.name, n.shape[-1]) for n in net.model.nodes
    }
    graphdef, state = nnx.split(net.model)
    pure = nnx.to_pure_dict(state)
    small_pure = nnx.to_pure_dict(nnx.state(small.model))
    for n in net.model.nodes:
        if n.name not in pure.get("layers", {}):
            continue
        big, sm = pure["layers"][n.name], small_pure["layers"][n.name]
        out = index[n.name]
        for k, v in sm.items():
            v, b = np.asarray(v), np.array(big[k])
            if k == "kernel" and n.op == "dense":
                b[np.ix_(index[n.inputs[0]], out)] = v
            elif k == "kernel":
                b[:, :, index[n.inputs[0]][:, None], out[None, :]] = v
            else:
                b[out] = v
            big[k] = jnp.asarray(b)
    nnx.replace_by_pure_dict(state, pure)
    return Pretrained(nnx.merge(graphdef, state), dict(net.card))


def gwcs(
    ctx: MethodContext,
    *,
    stages: int = 3,
    fitness: Any = None,
    distill_steps: int = 200,
    distill_options: dict | None = None,
    ga_options: dict | None = None,
    chunk: int = 10,
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
    from ..fitness import Fitness, compose

    t0 = time.perf_counter()
    net, space = ctx.net, ctx.space
    prior = standardize_per_group(l1_unit_scores(net.model, space), space)
    quota = space.kept(ctx.decode(prior))  # exact budget: channels per group
    plan = stage_groups(space, stages)
    has_conv = any(g.kind == "conv" for g in space.groups)
    base = ctx.fitness
    if isinstance(base, Fitness):
        default = {"wavelet": 1.0, "fidelity": 1.0} if has_conv else "fidelity"
        spec = fitness or default
        fit = compose(net, spec, probes=base.probes, normalize=True)
        probes = base.probes
    else:  # a user callable: used as the stage fitness as is
        fit, probes = base, None
    masks = {
        g: np.ones(s, bool) for g, s in zip(space.group_names, space.sizes, strict=True)
    }
    offsets = dict(zip(space.group_names, space.offsets, strict=True))
    sizes = dict(zip(space.group_names, space.sizes, strict=True))
    gens = max(1, ctx.generations // len(plan))
    history: dict[str, list] = {}
    evaluations, compile_s, best = 0, 0.0, None
    total = float(space.num_units)

    def kept_fraction(m):
        return space.flat(m).astype(jnp.float32).sum() / total

    for s, groups in enumerate(plan):
        fixed = {g: jnp.asarray(m) for g, m in masks.items()}
        starts = np.cumsum([0] + [sizes[g] for g in groups])

        def decode(genome, groups=groups, starts=starts, fixed=fixed):
            out = dict(fixed)
            for g, a, b in zip(groups, starts[:-1], starts[1:], strict=True):
                o = offsets[g]
                score = genome[a:b] + 1e-3 * jnp.tanh(prior[o : o + sizes[g]])
                _, top = jax.lax.top_k(score, quota[g])
                out[g] = jnp.zeros(sizes[g], bool).at[top].set(True)
            return out

        def encode(m, groups=groups):
            return jnp.concatenate([jnp.asarray(m[g], jnp.float32) for g in groups])

        problem = search.Problem(decode, fit, kept_fraction, encode)
        strategy = search.make_strategy(
            "ga", ctx.population, int(starts[-1]), **dict(ga_options or {})
        )
        center = jnp.concatenate(
            [jnp.asarray(prior[offsets[g] : offsets[g] + sizes[g]]) for g in groups]
        )
        result = search.run(
            strategy,
            problem,
            jax.random.PRNGKey(ctx.seed + s),
            gens,
            chunk=chunk,
            center=center,
        )
        masks.update({g: np.asarray(result.best_masks[g], bool) for g in groups})
        for k, v in result.history.items():
            history.setdefault(k, []).append(v)
        evaluations += result.evaluations
        compile_s += result.compile_seconds
        best = result.best_fitness
    out_net = net
    distilled = None
    if distill_steps > 0:
        from .. import recover

        opts = {"steps": distill_steps, "seed": ctx.seed, "masks": masks}
        if probes is not None:
            opts["probes"] = probes
        opts.update(distill_options or {})
        small = recover.distill(compact(net, masks), net, **opts)
        out_net = expand(small, net, masks)
        distilled = {
            "steps": distill_steps,
            "probes": "fitness probes" if probes is not None else "distill default",
        }
    details = {
        "stages": plan,
        "generations_per_stage": gens,
        "kept_per_group": {g: int(m.sum()) for g, m in masks.items()},
        "stage_fitness": fit.describe() if isinstance(fit, Fitness) else "callable",
        "distill": distilled,
    }
    return MethodResult(
        masks,
        out_net,
        history={k: np.concatenate(v) for k, v in history.items()},
        evaluations=evaluations,
        seconds=time.perf_counter() - t0,
        compile_seconds=compile_s,
        best_fitness=best,
        details=details,
    )


register_method(
    "gwcs",
    gwcs,
    "multi-stage GA on channel bits with the wavelet fitness, then data-free "
    "distillation (Chen et al. 2021)",
)
