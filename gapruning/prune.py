"""``gp.prune``: data-free pruning of a pretrained network, end to end.

Builds the PruneSpace, the budgeted encoding, the data-free fitness (probes made
from the model only), and the strategy; runs the jitted search engine; decodes the
best masks and compacts the network. Nothing here reads a dataset.
"""

from __future__ import annotations

import dataclasses
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import recover as recover_lib
from . import search
from .compact import compact, param_count, sparsify
from .encoding import (
    Budget,
    ProfileEncoding,
    UnitEncoding,
    kept_fraction_fn,
    l1_unit_scores,
    standardize_per_group,
)
from .methods import METHODS, MethodContext, MethodResult, run_method
from .progress import progress_bar
from .zoo import Pretrained, architecture_digest, check_finite, load

ENCODINGS = ("units", "profile")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass
class PruneResult:
    """What :func:`prune` found: ``masks`` (group -> bool), the compacted ``pruned``
    model, the per-generation ``history`` and the search details."""

    masks: dict[str, np.ndarray]
    pruned: Pretrained
    history: dict[str, np.ndarray]
    net: Pretrained
    search: search.SearchResult | MethodResult
    settings: dict[str, Any]

    def report(self) -> dict:
        """A JSON-able summary: costs before/after, kept units per group, timing."""
        space = self.net.space
        card = self.pruned.card.get("pruning", {})
        unstructured = card.get("kind") == "unstructured"
        s = self.search
        if unstructured:  # kernel masks: nonzero weights and MACs, no unit removed
            kept = dict(zip(space.group_names, space.sizes, strict=True))
            after_params, after_flops = card["params"]["after"], card["flops"]["after"]
        else:
            kept = space.kept(self.masks)
            after_params = param_count(self.pruned)
            after_flops = int(space.flops(self.masks))
        extra = {}
        if unstructured:
            keys = ("kept_weights", "layer_sizes", "nonzero_params")
            extra = {"unstructured": {k: card[k] for k in keys}}
        return {
            "model": self.net.name,
            "settings": self.settings,
            "params": {"before": space.dense_params, "after": after_params},
            "flops": {"before": space.dense_flops, "after": after_flops},
            "units": {"before": space.num_units, "after": int(sum(kept.values()))},
            "groups": [dict(row, kept=kept[row["group"]]) for row in space.describe()],
            **extra,
            "fitness": {
                "best": s.best_fitness,
                "first_generation_best": _first(self.history.get("best")),
                "last_generation_mean": _last(self.history.get("mean")),
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


def _float(x) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def _first(values) -> float | None:
    return None if values is None or len(values) == 0 else _float(values[0])


def _last(values) -> float | None:
    return None if values is None or len(values) == 0 else _float(values[-1])


def prune(
    net: Pretrained | str,
    strategy: str = "ga",
    target: float = 0.7,
    budget: str = "units",
    fitness: str | Mapping[str, float] | Callable = "default",
    generations: int = 200,
    population: int = 64,
    num_probes: int = 512,
    seed: int = 0,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    *,
    probes: Any = None,
    encoding: str = "units",
    per_group: bool = False,
    min_keep: int = 1,
    init: str | None = "l1",
    chunk: int = 10,
    strategy_options: Mapping[str, Any] | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    devices=None,
    dtype: str | None = None,
    chunk_size: int | str | None = "auto",
    repair: str | None = None,
    recover: Sequence[str] = (),
    recover_options: Mapping[str, Mapping[str, Any]] | None = None,
) -> PruneResult:
    """Prunes ``net`` without data.

    Args:
        net: a :class:`Pretrained` or the name/directory of a saved model.
        strategy: a name in ``gp.search.STRATEGIES`` or ``"evosax:<Algorithm>"``.
        target: fraction of ``budget`` to remove, in (0, 1).
        budget: "units", "params" or "flops"; met exactly by decoding.
        fitness: a metric spec for ``gp.fitness.compose`` ("default", or a dict of
            metric weights), or a callable ``masks_batch -> (P,)``, lower is better.
        generations, population: search length and width.
        num_probes, probes: how many synthetic probes, and their kind (``None``:
            the composite's choice) or an array of unlabeled inputs.
        checkpoint_dir: save the search state there (orbax, atomic).
        encoding: "units" (one gene per unit) or "profile" (one ratio per group).
        per_group: with the units budget, remove the same ratio from every group.
        init: "l1" seeds the initial population around the L1-norm ranking;
            ``None`` starts from unbiased random genomes. Neither wins on every
            model: ``benchmarks/search_quality.py`` compares them.
        chunk: generations per jitted scan (progress and checkpoints between).
        resume: continue from the newest checkpoint in ``checkpoint_dir``.
        devices: devices to shard the population over (default: all local).
        dtype: evaluate the population fitness in this dtype (``"bfloat16"``
            halves activation memory on accelerators; params and probes are cast,
            the compacted result stays float32). ``None``: the model's dtype.
        chunk_size: individuals evaluated at once by the fitness (``"auto"``:
            bounded by activation memory, see ``gp.forward.auto_chunk_size``).
        repair: score every individual after merging compensation (``"merge"``:
            Neuron Merging, or ``"lstsq"``; see :mod:`gapruning.recover`); the
            result is then compensated the same way (``"lstsq"``: by
            ``gp.recover.merge``'s layer-after-layer fit, which the search's
            all-at-once one approximates; ``recover_options={"merge":
            {"sequential": False}}`` gives the scored repair exactly).
        recover: data-free recovery of the found masks, in order: a merge
            (``"merge"``/``"lstsq"``) before compaction, ``"distill"`` after.
        recover_options: ``{"merge": {...}, "distill": {...}}`` keyword
            arguments of ``gp.recover.merge`` / ``gp.recover.distill``.

    Returns:
        A :class:`PruneResult`.

    Example:
        >>> result = gp.prune(gp.load("lenet300-fmnist"), target=0.7, generations=50)
        >>> result.report()["params"], result.pruned
    """
    net = load(net) if isinstance(net, str | Path) else net
    if not isinstance(net, Pretrained):
        raise TypeError(f"net must be a gp.Pretrained or a model name, got {type(net)}")
    check_finite(net.model, f"cannot prune {net.name}")
    if generations < 1:
        raise ValueError(f"generations must be at least 1, got {generations}")
    if population < 2:
        raise ValueError(f"population must be at least 2, got {population}")
    if encoding not in ENCODINGS:
        raise ValueError(
            f"unknown encoding {encoding!r}; known: {', '.join(ENCODINGS)}"
        )
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs a checkpoint_dir")
    if num_probes < 1 and probes is None and not callable(fitness):
        raise ValueError(f"num_probes must be at least 1, got {num_probes}")
    if chunk < 1:
        raise ValueError(f"chunk must be at least 1, got {chunk}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be at least 1, got {checkpoint_every}")
    if dtype is not None and str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    n_devices = len(jax.devices() if devices is None else devices)
    if strategy not in METHODS and population % n_devices:
        raise ValueError(
            f"population {population} is not divisible by the {n_devices} devices; "
            "choose a multiple of the device count"
        )
    merge_method, distill = _recovery_plan(repair, recover, fitness)
    space = net.space
    budget_spec = Budget(budget, float(target), per_group=per_group, min_keep=min_keep)
    settings = {
        "strategy": strategy,
        "target": float(target),
        "budget": budget,
        "fitness": fitness
        if isinstance(fitness, str | dict)
        else getattr(fitness, "__name__", "callable"),
        "generations": generations,
        "population": population,
        "num_probes": num_probes,
        "seed": seed,
        "encoding": encoding,
        "per_group": per_group,
        "min_keep": min_keep,
        "init": init,
        "strategy_options": dict(strategy_options or {}),
    }
    if dtype not in (None, "float32"):
        settings["dtype"] = str(dtype)
    if chunk_size != "auto":
        settings["chunk_size"] = chunk_size
    if repair or recover:
        settings["repair"] = repair
        settings["recover"] = [recover] if isinstance(recover, str) else list(recover)
    rec_opts = {k: dict(v) for k, v in (recover_options or {}).items()}
    # the search scores, and the result gets, the same repair (lstsq: on probes of
    # the fitness's kind, with another seed than the fitness's own probes)
    merge_opts = {"seed": seed + 1, "num_probes": num_probes}
    merge_opts.update(rec_opts.get("merge", {}))
    if isinstance(probes, str):
        merge_opts.setdefault("probes", probes)

    def make_fit():
        fit = _fitness(net, fitness, probes, num_probes, seed, dtype, chunk_size)
        if repair is None:
            return fit
        opts = {k: v for k, v in merge_opts.items() if k != "sequential"}
        return recover_lib.repaired_fitness(fit, repair, **opts)

    def finish(base: Pretrained, masks) -> Pretrained:
        """Merge (optional), compact, distill (optional)."""
        if merge_method is not None:
            base = recover_lib.merge(base, masks, method=merge_method, **merge_opts)
        small = compact(base, masks)
        if distill:
            opts = {"seed": seed, "progress": progress, "num_probes": num_probes}
            if isinstance(probes, str):
                opts["probes"] = probes
            opts.update(rec_opts.get("distill", {}))
            small = recover_lib.distill(small, net, masks=masks, **opts)
        return small

    if strategy in METHODS:
        ctx = MethodContext(
            net,
            budget_spec,
            seed=seed,
            population=population,
            generations=generations,
            progress=progress,
            make_fitness=make_fit,
        )
        found = run_method(strategy, ctx, strategy_options or {})
        if METHODS[strategy].structured:
            pruned = finish(found.net, found.masks)
        else:  # kernel masks: same shapes, pruned weights zeroed
            pruned = sparsify(found.net, found.masks)
        pruned.card["pruning"]["method"] = {
            "search": settings,
            "best_fitness": found.best_fitness,
            "details": found.details,
        }
        return PruneResult(found.masks, pruned, found.history, net, found, settings)
    l1 = l1_unit_scores(net.model, space)
    l1_rank = standardize_per_group(l1, space)
    if encoding == "units":
        enc = UnitEncoding(space, budget_spec, prior=l1_rank)
        center = jnp.asarray(l1_rank) if init == "l1" else None
        noise = 1.0
    else:
        enc = ProfileEncoding(net.model, space, budget_spec, rule="l1")
        center = jnp.full((enc.num_genes,), 1.0 - float(target), jnp.float32)
        noise = 0.15
    strat = search.make_strategy(
        strategy, population, enc.num_genes, **dict(strategy_options or {})
    )
    if strat.genome == "binary" and encoding != "units":
        raise ValueError(
            f"strategy {strategy!r} evolves one bit per unit; use encoding='units'"
        )
    fit = make_fit()
    problem = search.Problem(
        enc.decode,
        fit,
        kept_fraction_fn(space, budget_spec),
        enc.encode if encoding == "units" else None,
    )
    devices = list(jax.devices() if devices is None else devices)
    mesh = search.population_mesh(population, devices) if len(devices) > 1 else None
    checkpointer = None
    if checkpoint_dir is not None:
        signature = dict(
            settings,
            model=net.name,
            graph=architecture_digest(net),
            num_devices=len(devices),
        )
        checkpointer = search.Checkpointer(checkpoint_dir, signature)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"{strategy} on {net.name}", total=generations)
        t0 = time.perf_counter()

        def report_progress(state: search.SearchState) -> None:
            g = int(state.generation)
            h = {k: float(v[g - 1]) for k, v in state.history.items()}
            rate = g * population / max(time.perf_counter() - t0, 1e-9)
            bar.update(
                task,
                completed=g,
                description=(
                    f"{strategy} on {net.name}  best {h['best_so_far']:.4g}  mean "
                    f"{h['mean']:.4g}  removed {1 - h['kept']:.1%}  {rate:.0f} evals/s"
                ),
            )

        result = search.run(
            strat,
            problem,
            jax.random.PRNGKey(seed),
            generations,
            chunk=chunk,
            center=center,
            noise=noise,
            mesh=mesh,
            callback=report_progress,
            checkpointer=checkpointer,
            checkpoint_every=checkpoint_every,
            resume=resume,
        )
    masks = result.best_masks
    pruned = finish(net, masks)
    pruned.card["pruning"]["method"] = {
        "search": settings,
        "best_fitness": result.best_fitness,
    }
    return PruneResult(masks, pruned, result.history, net, result, settings)


def _recovery_plan(repair, steps, fitness) -> tuple[str | None, bool]:
    """``(merge method or None, distill?)`` from ``repair`` and ``recover``."""
    known = (*recover_lib.REPAIR_ALIASES, "distill")
    steps = (steps,) if isinstance(steps, str) else tuple(steps)
    unknown = [s for s in steps if s not in known]
    if unknown:
        raise ValueError(f"unknown recover step(s) {unknown}; known: {known}")
    if repair is not None and repair not in recover_lib.REPAIR_ALIASES:
        raise ValueError(
            f"unknown repair {repair!r}; known: {tuple(recover_lib.REPAIR_ALIASES)}"
        )
    if repair is not None and callable(fitness):
        raise ValueError("repair needs a composed fitness (a spec), not a callable")
    named = [s for s in (repair, *steps) if s not in (None, "distill")]
    merges = {recover_lib.REPAIR_ALIASES[s] for s in named}
    if len(merges) > 1:
        raise ValueError(f"choose one merge method, got {sorted(merges)}")
    return (next(iter(merges)) if merges else None), "distill" in steps


def _fitness(net, spec, probes, num_probes, seed, dtype=None, chunk_size="auto"):
    if callable(spec):
        return spec
    from . import fitness as fitness_lib

    kwargs = {"num_probes": num_probes, "seed": seed, "chunk_size": chunk_size}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if probes is not None:
        kwargs["probes"] = probes
    return fitness_lib.compose(net, spec, **kwargs)
