"""The jitted engine search as a way to find masks, beside the registered methods.

``gp.prune(strategy="ga")`` (or any ``gp.search.STRATEGIES`` name, or
``"evosax:<Name>"``) runs this: a genome encoding under the exact budget, the
initial population, the strategy, sharding over devices and checkpoints, then
:func:`gapruning.search.run`. It returns a :class:`MethodResult` like every method.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import jax

from .. import search
from ..config import PruneConfig
from ..encoding import (
    ProfileEncoding,
    UnitEncoding,
    kept_fraction_fn,
    l1_unit_scores,
    standardize_per_group,
)
from ..progress import progress_bar
from ..zoo import architecture_digest
from . import MethodContext, MethodResult

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, eq=False)
class SearchSetup:
    """What :func:`gapruning.search.run` needs for one engine search: the
    strategy, the problem, the first population's ``center``/``noise`` and the
    device ``mesh`` (``None`` on one device)."""

    strategy: search.Strategy
    problem: search.Problem
    center: jax.Array | None
    noise: float
    mesh: Any
    num_devices: int


def make_search(ctx: MethodContext, config: PruneConfig) -> SearchSetup:
    """The engine search ``config`` asks for, built but not run."""
    encoding = make_encoding(ctx, config)
    strategy = search.make_strategy(
        config.strategy,
        config.population,
        encoding.num_genes,
        **config.strategy_options,
    )
    if strategy.genome == "binary" and encoding.name != "units":
        raise ValueError(
            f"strategy {config.strategy!r} evolves one bit per unit; "
            "use encoding='units'"
        )
    problem = search.Problem(
        encoding.decode,
        ctx.fitness,
        kept_fraction_fn(ctx.space, ctx.budget),
        encoding.encode if encoding.name == "units" else None,
    )
    center, noise = encoding.search_start(config.init)
    devices = list(jax.devices() if config.devices is None else config.devices)
    mesh = (
        search.population_mesh(config.population, devices) if len(devices) > 1 else None
    )
    return SearchSetup(strategy, problem, center, noise, mesh, len(devices))


def engine_search(ctx: MethodContext, config: PruneConfig) -> MethodResult:
    """Searches masks for ``ctx`` with the engine strategy ``config.strategy``."""
    setup = make_search(ctx, config)
    with progress_bar(config.progress) as bar:
        found = search.run(
            setup.strategy,
            setup.problem,
            jax.random.PRNGKey(config.seed),
            config.generations,
            generations_per_scan=config.generations_per_scan,
            center=setup.center,
            noise=setup.noise,
            mesh=setup.mesh,
            callback=progress_callback(bar, ctx, config),
            checkpointer=make_checkpointer(ctx, config, setup.num_devices),
            checkpoint_every=config.checkpoint_every,
            resume=config.resume,
            deadline=ctx.deadline,
        )
    if found.generations < config.generations:
        log.info(
            "time budget: the search stopped after %d of %d generations",
            found.generations,
            config.generations,
        )
    return MethodResult(
        masks=found.best_masks,
        net=ctx.net,
        history=found.history,
        evaluations=found.evaluations,
        seconds=found.seconds,
        compile_seconds=found.compile_seconds,
        best_fitness=found.best_fitness,
        details={"generations": found.generations},
    )


def make_encoding(ctx: MethodContext, config: PruneConfig):
    """The genome encoding ``config.encoding`` asks for ("units" or "profile")."""
    if config.encoding == "units":
        l1 = l1_unit_scores(ctx.net.model, ctx.space)
        return UnitEncoding(
            ctx.space, ctx.budget, prior=standardize_per_group(l1, ctx.space)
        )
    return ProfileEncoding(ctx.net.model, ctx.space, ctx.budget, rule="l1")


def make_checkpointer(ctx: MethodContext, config: PruneConfig, num_devices: int):
    """A checkpointer whose signature names the run (``None``: no checkpoints)."""
    if config.checkpoint_dir is None:
        return None
    signature = dict(
        config.settings(),
        model=ctx.net.name,
        graph=architecture_digest(ctx.net),
        num_devices=num_devices,
    )
    return search.Checkpointer(config.checkpoint_dir, signature)


def progress_callback(bar, ctx: MethodContext, config: PruneConfig):
    """Updates ``bar`` with the best/mean fitness and rate after every scan."""
    title = f"{config.strategy} on {ctx.net.name}"
    task = bar.add_task(title, total=config.generations)
    t0 = time.perf_counter()

    def report(state: search.SearchState) -> None:
        g = int(state.generation)
        h = {k: float(v[g - 1]) for k, v in state.history.items()}
        rate = g * config.population / max(time.perf_counter() - t0, 1e-9)
        bar.update(
            task,
            completed=g,
            description=(
                f"{title}  best {h['best_so_far']:.4g}  mean {h['mean']:.4g}  "
                f"removed {1 - h['kept']:.1%}  {rate:.0f} evals/s"
            ),
        )

    return report
