"""What gp.prune's ``None``/``"auto"`` options become for one network.

* Search sizes (``generations``, ``population``, ``num_probes`` left at ``None``)
  follow the network's cost so that a default search spends at most
  :data:`SEARCH_FLOPS`: small networks get the full search, larger ones a narrower
  and shorter one. They depend on the network alone (never on the machine), so a
  default run stays reproducible by seed.
* The recover step ``"auto"`` (the default) repairs the found masks by least
  squares before compaction, then distills the result for as many probe
  evaluations as the search spent, when the masks came from a search over the
  dense network; methods that change the weights themselves, compact themselves
  or prune weights are left as they are.

The chosen values are written into the run's config and report. A search whose
activations cannot fit in the machine's memory is refused before it starts.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from .config import PruneConfig
from .forward import population_footprint
from .methods import METHODS, MethodResult
from .recover import DistillConfig
from .zoo import Pretrained

# The full search: generations, population, probes.
FULL_SEARCH = (200, 64, 512)
# A larger network's search: this population and probes, fewer generations.
NARROW_POPULATION, NARROW_PROBES = 32, 256
MIN_GENERATIONS = 10
# Dense-network FLOPs (as ``PruneSpace.flops`` counts them) x individuals x probes x
# generations a default search may spend; see docs/user-guide.md for the times.
SEARCH_FLOPS = 5e12
# The default distillation's bounds (steps), and the settings its cost reads.
MIN_DISTILL_STEPS, MAX_DISTILL_STEPS = 100, 2000
DISTILL_COST_KEYS = ("batch_size", "adversarial")


def default_sizes(dense_flops: int) -> tuple[int, int, int]:
    """``(generations, population, num_probes)`` of a default search of a network
    of ``dense_flops``: :data:`FULL_SEARCH` when it fits in :data:`SEARCH_FLOPS`,
    else the narrow population and probes for as many generations as fit (a
    multiple of 10, at least :data:`MIN_GENERATIONS`)."""
    generations, population, probes = FULL_SEARCH
    if generations * population * probes * dense_flops <= SEARCH_FLOPS:
        return FULL_SEARCH
    per_generation = NARROW_POPULATION * NARROW_PROBES * max(dense_flops, 1)
    fit = 10 * round(SEARCH_FLOPS / per_generation / 10)
    return (
        min(max(fit, MIN_GENERATIONS), generations),
        NARROW_POPULATION,
        NARROW_PROBES,
    )


def with_default_sizes(config: PruneConfig, dense_flops: int) -> PruneConfig:
    """``config`` with every search size left at ``None`` set by
    :func:`default_sizes`."""
    sizes = dict(
        zip(
            ("generations", "population", "num_probes"),
            default_sizes(dense_flops),
            strict=True,
        )
    )
    unset = {k: v for k, v in sizes.items() if getattr(config, k) is None}
    return dataclasses.replace(config, **unset) if unset else config


def with_default_recovery(
    config: PruneConfig, dense: Pretrained, found: MethodResult
) -> PruneConfig:
    """``config`` with the recover step ``"auto"`` replaced by what it means for
    ``found``. When ``found`` holds structured masks of the ``dense`` network as
    given (not compensated, not compacted) and no repair was named (``repair=``
    or a recover step): ``"lstsq"``, then ``"distill"`` for
    :func:`default_distill_steps` unless distillation was asked for already or
    the search was too short to pay for it; under a time budget, distillation
    for the time left (no steps set here). Otherwise nothing."""
    if "auto" not in config.recover:
        return config
    method = METHODS.get(config.strategy)
    repairable = (
        not config.repair_steps
        and found.pruned is None
        and found.net is dense
        and (method is None or method.structured)
    )
    steps = [s for s in config.recover if s != "auto"]
    options = dict(config.recover_options)
    if repairable:
        steps.insert(0, "lstsq")
        distill = dict(options.get("distill", {}))
        n = default_distill_steps(dense, found.evaluations * config.num_probes, distill)
        if "distill" not in steps and (n or config.time_budget):
            steps.append("distill")
            timed = config.time_budget is not None
            options["distill"] = distill if timed else {"steps": n, **distill}
    return dataclasses.replace(config, recover=tuple(steps), recover_options=options)


def default_distill_steps(
    dense: Pretrained, probe_evaluations: int, options: dict | None = None
) -> int:
    """Distillation steps that spend as many probe evaluations as the search did
    (a step evaluates its batch on the teacher and the student, backward, and
    once more per adversarial push), at most :data:`MAX_DISTILL_STEPS`; 0 when
    that is under :data:`MIN_DISTILL_STEPS` (too short to pay for itself).
    ``options``: the distillation's own settings (batch size, pushes)."""
    known = {k: v for k, v in (options or {}).items() if k in DISTILL_COST_KEYS}
    c = DistillConfig.for_teacher(dense, **known)
    per_step = c.batch_size * 4 * (1 + c.adversarial)
    steps = min(probe_evaluations // per_step, MAX_DISTILL_STEPS)
    return steps if steps >= MIN_DISTILL_STEPS else 0


def memory_bytes() -> int:
    """Memory of the first device (its allocator's limit), or the host's RAM
    where the device does not say (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_memory(net: Pretrained, num_probes: int, limit: int | None = None) -> None:
    """Refuses a search whose single individual's activations on ``num_probes``
    probes (the largest tensor, its input and output at once) cannot fit in
    ``limit`` bytes (default :func:`memory_bytes`), before any work starts."""
    limit = memory_bytes() if limit is None else limit
    need = 2 * population_footprint(net, num_probes)
    if need > limit:
        raise MemoryError(
            f"{net.name}: one individual on {num_probes} probes needs about "
            f"{need / 2**30:.1f} GiB of activations, more than the "
            f"{limit / 2**30:.1f} GiB of memory here; use fewer probes (num_probes=)"
        )
