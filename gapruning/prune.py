"""``gp.prune``: data-free pruning of a pretrained network, as a pipeline of stages.

0. :mod:`gapruning.defaults`: search sizes left at ``None`` follow the network's
   cost; ``recover="auto"`` becomes a least squares repair where it applies.
1. :func:`make_problem`: the space, the exact budget and the data-free fitness
   (probes made from the model only), handed to the search as a ``MethodContext``.
2. :func:`find_masks`: the engine search (``strategy="ga"``...) or a method
   (``strategy="paoding"``...), both returning a ``MethodResult``.
3. :func:`finish`: repair (optional), compact, distill (optional).

The options of every stage live in one :class:`~gapruning.config.PruneConfig`.
Nothing here reads a dataset.
"""

from __future__ import annotations

import dataclasses
import logging
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import recover as recover_lib
from .compact import compact, param_count, sparsify
from .config import PruneConfig, make_config
from .deadline import MIN_DISTILL_SHARE, SEARCH_SHARE, Deadline
from .defaults import check_memory, with_default_recovery, with_default_sizes
from .encoding import Budget
from .methods import METHODS, MethodContext, MethodResult, run_method
from .methods.engine_search import engine_search
from .progress import format_seconds
from .zoo import Pretrained, check_finite, load

log = logging.getLogger(__name__)


@dataclasses.dataclass
class PruneResult:
    """What :func:`prune` found: ``masks`` (group -> bool), the compacted ``pruned``
    model, the per-generation ``history``, the ``search`` details (a
    ``MethodResult``) and the run's ``config``; ``settings`` is its JSON form."""

    masks: dict[str, np.ndarray]
    pruned: Pretrained
    history: dict[str, np.ndarray]
    net: Pretrained
    search: MethodResult
    settings: dict[str, Any]
    config: PruneConfig | None = None

    def report(self) -> dict:
        """A JSON-able summary: costs before/after, kept units per group, timing."""
        space = self.net.space
        after = self._after()
        s = self.search
        return {
            "model": self.net.name,
            "settings": self.settings,
            "params": {"before": space.dense_params, "after": after.pop("params")},
            "flops": {"before": space.dense_flops, "after": after.pop("flops")},
            "units": {
                "before": space.num_units,
                "after": int(sum(after["kept"].values())),
            },
            "groups": [
                dict(row, kept=after["kept"][row["group"]]) for row in space.describe()
            ],
            **after.get("extra", {}),
            "fitness": {
                "best": s.best_fitness,
                "first_generation_best": _end(self.history.get("best"), 0),
                "last_generation_mean": _end(self.history.get("mean"), -1),
            },
            "search": {
                "seconds": round(s.seconds, 3),
                "compile_seconds": round(s.compile_seconds, 3),
                "evaluations": s.evaluations,
                "evaluations_per_second": round(
                    s.evaluations / max(s.seconds - s.compile_seconds, 1e-9), 1
                ),
            },
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "host": platform.node(),
            "jax": jax.__version__,
        }

    def _after(self) -> dict:
        """Params, FLOPs and kept units after pruning (unstructured: nonzero
        weights and MACs, every unit kept, plus the per-layer details)."""
        space = self.net.space
        card = self.pruned.card.get("pruning", {})
        if card.get("kind") != "unstructured":
            return {
                "params": param_count(self.pruned),
                "flops": int(space.flops(self.masks)),
                "kept": space.kept(self.masks),
            }
        keys = ("kept_weights", "layer_sizes", "nonzero_params")
        return {
            "params": card["params"]["after"],
            "flops": card["flops"]["after"],
            "kept": dict(zip(space.group_names, space.sizes, strict=True)),
            "extra": {"unstructured": {k: card[k] for k in keys}},
        }


def _end(values, index: int) -> float | None:
    """``values[index]`` as a float, ``None`` when missing or not finite."""
    if values is None or len(values) == 0:
        return None
    x = float(values[index])
    return x if np.isfinite(x) else None


def prune(
    net: Pretrained | str, *args, config: PruneConfig | None = None, **options
) -> PruneResult:
    """Prunes ``net`` without data.

    Args:
        net: a :class:`Pretrained` or the name/directory of a saved model.
        *args: ``strategy, target, budget, fitness, generations, population,
            num_probes, seed, checkpoint_dir, progress`` by position.
        config: a :class:`~gapruning.config.PruneConfig` to start from.
        **options: any :class:`~gapruning.config.PruneConfig` field by name
            (``strategy="ga"``, ``target=0.7``, ``budget="units"``, ...); the
            old name ``chunk`` still works (deprecated: ``generations_per_scan``).

    Returns:
        A :class:`PruneResult`.

    Example:
        >>> result = gp.prune(gp.load("lenet300-fmnist"), target=0.7, generations=50)
        >>> result.report()["params"], result.pruned
    """
    config = make_config(config, args, options)
    clock = Deadline(config.time_budget) if config.time_budget else None
    net = _pretrained(net)
    config = with_default_sizes(config, net.space.dense_flops)
    if config.strategy not in METHODS and not callable(config.fitness):
        given = config.probes is not None and not isinstance(config.probes, str)
        check_memory(net, len(config.probes) if given else config.num_probes)
    ctx = make_problem(net, config, clock)
    found = find_masks(ctx, config)
    config = with_default_recovery(config, net, found)
    pruned = finish(ctx, config, found, clock)
    settings = config.settings()
    pruned.card["pruning"]["method"] = {
        "search": settings,
        "best_fitness": found.best_fitness,
        "details": found.details,
    }
    return PruneResult(found.masks, pruned, found.history, net, found, settings, config)


def _pretrained(net) -> Pretrained:
    net = load(net) if isinstance(net, str | Path) else net
    if not isinstance(net, Pretrained):
        raise TypeError(f"net must be a gp.Pretrained or a model name, got {type(net)}")
    check_finite(net.model, f"cannot prune {net.name}")
    return net


def make_problem(
    net: Pretrained, config: PruneConfig, clock: Deadline | None = None
) -> MethodContext:
    """Stage 1: the exact budget and the data-free fitness (built on first use);
    under a time budget (``clock``), the search's deadline."""
    n_devices = len(jax.devices() if config.devices is None else config.devices)
    if config.strategy not in METHODS and config.population % n_devices:
        raise ValueError(
            f"population {config.population} is not divisible by the {n_devices} "
            "devices; choose a multiple of the device count"
        )
    budget = Budget(
        config.budget,
        config.target,
        per_group=config.per_group,
        min_keep=config.min_keep,
    )
    return MethodContext(
        net,
        budget,
        seed=config.seed,
        population=config.population,
        generations=config.generations,
        progress=config.progress,
        make_fitness=lambda: make_fitness(net, config),
        deadline=None if clock is None else clock.at(SEARCH_SHARE),
    )


def make_fitness(net: Pretrained, config: PruneConfig) -> Callable:
    """The search's fitness ``masks_batch -> (P,)``: ``config.fitness`` composed
    on probes (or the user's callable), scored after ``config.repair`` if set."""
    if callable(config.fitness):
        return config.fitness
    from . import fitness as fitness_lib

    kwargs = {
        "num_probes": config.num_probes,
        "seed": config.seed,
        "chunk_size": config.chunk_size,
    }
    if config.dtype is not None:
        kwargs["dtype"] = config.dtype
    if config.probes is not None:
        kwargs["probes"] = config.probes
    fit = fitness_lib.compose(net, config.fitness, **kwargs)
    if config.repair is None:
        return fit
    options = {k: v for k, v in repair_options(config).items() if k != "sequential"}
    return recover_lib.repaired_fitness(fit, config.repair_method, **options)


def find_masks(ctx: MethodContext, config: PruneConfig) -> MethodResult:
    """Stage 2: a registered method, or else the engine search."""
    if config.strategy in METHODS:
        return run_method(config.strategy, ctx, config.strategy_options)
    return engine_search(ctx, config)


def finish(
    ctx: MethodContext,
    config: PruneConfig,
    found: MethodResult,
    clock: Deadline | None = None,
) -> Pretrained:
    """Stage 3: repair (optional), compact, distill (optional; under a time
    budget, for the time left, at most the ``steps`` given). Kernel masks of an
    unstructured method are applied by zeroing weights instead."""
    method = METHODS.get(config.strategy)
    if method is not None and not method.structured:
        return sparsify(found.net, found.masks)
    small = found.pruned
    if small is not None and config.repair_method is not None:
        raise ValueError(
            f"method {config.strategy!r} returns a compacted network; it cannot be "
            "repaired afterwards (drop repair= and the recover repair step)"
        )
    if small is None:
        small = compact(repaired(found, config), found.masks)
    if not config.distill:
        return small
    options = {
        "seed": config.seed,
        "progress": config.progress,
        "num_probes": config.num_probes,
    }
    if isinstance(config.probes, str):
        options["probes"] = config.probes
    options.update(config.recover_options.get("distill", {}))
    if clock is not None:
        left = clock.remaining()
        if left < MIN_DISTILL_SHARE * clock.seconds:
            text = format_seconds(max(left, 0))
            log.info("time budget: %s left, too little to distill", text)
            return small
        options["time_budget"] = left
    return recover_lib.distill(small, ctx.net, masks=found.masks, **options)


def repaired(found: MethodResult, config: PruneConfig) -> Pretrained:
    """``found.net`` repaired for ``found.masks`` as ``config`` asks (or as is)."""
    if config.repair_method is None:
        return found.net
    log.info("repairing %s (%s)", found.net.name, config.repair_method)
    return recover_lib.repair(
        found.net, found.masks, method=config.repair_method, **repair_options(config)
    )


def repair_options(config: PruneConfig) -> dict[str, Any]:
    """Keyword arguments of the repair: the search scores, and the result gets,
    the same one. Scored inside the search, lstsq fits on probes of another seed
    than the fitness's; repairing only the result, on the same seed (so with
    BatchNorm it reuses the fitness's ``bn_stats`` probes instead of making more)."""
    seed = config.seed + 1 if config.repair else config.seed
    options = {"seed": seed, "num_probes": config.num_probes}
    options.update(config.recover_options.get("repair", {}))
    if isinstance(config.probes, str):
        options.setdefault("probes", config.probes)
    return options
