"""The search engine: many generations of ask -> decode -> fitness -> tell in one jit.

A generation is :func:`step`. :func:`run` executes ``generations_per_scan``
generations at a time as one jitted ``jax.lax.scan``, so the host only reports
progress and checkpoints between scans. The whole search state (strategy state,
key, best so far, history) is one pytree, :class:`SearchState`, which orbax
checkpoints atomically; a resumed run produces exactly the masks of an
uninterrupted one.

With several devices the population axis is sharded over a 1-D mesh
(``NamedSharding``); each device evaluates its slice of individuals. For a multi-host
TPU/GPU slice, call ``jax.distributed.initialize()`` in every process before
``gp.prune``: ``jax.devices()`` then spans all hosts and the same mesh covers them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ..deadline import stop_before_scan
from .strategies import Strategy

HISTORY_KEYS = ("best", "mean", "best_so_far", "kept")


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """What is searched: genome -> masks, masks batch -> fitness (P,), and the
    kept fraction of the budget measure for one individual's masks."""

    decode: Callable[[jax.Array], dict]
    fitness: Callable[[dict], jax.Array]
    kept_fraction: Callable[[dict], jax.Array]
    encode: Callable[[dict], jax.Array] | None = None

    def evaluate(self, genomes: jax.Array) -> jax.Array:
        """Fitness of each genome; NaN or Inf (failed individuals) become +inf."""
        fitness = self.fitness(jax.vmap(self.decode)(genomes))
        return jnp.where(jnp.isfinite(fitness), fitness, jnp.inf)


@struct.dataclass
class SearchState:
    strategy_state: Any
    key: jax.Array  # raw uint32[2]
    generation: jax.Array  # generations completed
    best_genome: jax.Array
    best_fitness: jax.Array
    history: dict  # each (generations,) float32, NaN until filled


def population_mesh(population_size: int, devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all) for the population axis."""
    devices = list(jax.devices() if devices is None else devices)
    if population_size % len(devices):
        raise ValueError(
            f"population {population_size} is not divisible by the {len(devices)} "
            "devices; choose a multiple of the device count"
        )
    return Mesh(np.array(devices), ("population",))


def _shard(x: jax.Array, mesh: Mesh | None) -> jax.Array:
    if mesh is None or mesh.size == 1:
        return x
    spec = PartitionSpec("population", *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def init(
    strategy: Strategy,
    problem: Problem,
    key: jax.Array,
    generations: int,
    *,
    center: jax.Array | None = None,
    noise: float = 1.0,
    mesh: Mesh | None = None,
) -> SearchState:
    """The starting state: an initial population around ``center`` (unit scores;
    binary genomes are the decoded masks of those scores), evaluated when the
    strategy needs it."""
    if generations < 1:
        raise ValueError(f"generations must be at least 1, got {generations}")
    p, d = strategy.population_size, strategy.num_genes
    center = jnp.zeros((d,), jnp.float32) if center is None else jnp.asarray(center)
    key, k_pop, k_init = jax.random.split(key, 3)
    genomes = center + noise * jax.random.normal(k_pop, (p, d))
    if strategy.genome == "binary":
        if problem.encode is None:
            raise ValueError(
                f"strategy {strategy.name!r} evolves bits; the encoding "
                "must provide encode()"
            )
        genomes = jax.vmap(lambda g: problem.encode(problem.decode(g)))(genomes)
    genomes = _shard(genomes, mesh)
    if strategy.needs_evaluated_start:
        fitness = problem.evaluate(genomes)
        i = jnp.argmin(fitness)
        best_genome, best_fitness = genomes[i], fitness[i]
    else:
        fitness = jnp.full((p,), jnp.inf)
        best_genome, best_fitness = center, jnp.array(jnp.inf)
    state = strategy.init(k_init, genomes, fitness, center)
    history = {k: jnp.full((generations,), jnp.nan, jnp.float32) for k in HISTORY_KEYS}
    return SearchState(
        state,
        key,
        jnp.array(0, jnp.int32),
        best_genome,
        jnp.asarray(best_fitness, jnp.float32),
        history,
    )


def step(
    strategy: Strategy, problem: Problem, state: SearchState, mesh: Mesh | None = None
) -> SearchState:
    """One generation: ask, decode, evaluate (population sharded), tell, record."""
    key, k_ask, k_tell = jax.random.split(state.key, 3)
    genomes, s = strategy.ask(k_ask, state.strategy_state)
    genomes = _shard(genomes, mesh)
    fitness = problem.evaluate(genomes)
    s = strategy.tell(k_tell, genomes, fitness, s)
    i = jnp.argmin(fitness)
    better = fitness[i] < state.best_fitness
    best_genome = jnp.where(better, genomes[i], state.best_genome)
    best_fitness = jnp.where(better, fitness[i], state.best_fitness)
    finite = jnp.isfinite(fitness)
    mean = jnp.sum(jnp.where(finite, fitness, 0.0)) / jnp.maximum(finite.sum(), 1)
    row = {
        "best": fitness[i],
        "mean": jnp.where(finite.any(), mean, jnp.inf),
        "best_so_far": best_fitness,
        "kept": problem.kept_fraction(problem.decode(genomes[i])),
    }
    g = state.generation
    history = {
        k: state.history[k].at[g].set(jnp.asarray(row[k], jnp.float32))
        for k in HISTORY_KEYS
    }
    return SearchState(
        s, key, g + 1, best_genome, best_fitness.astype(jnp.float32), history
    )


def make_scan(
    strategy: Strategy, problem: Problem, length: int, mesh: Mesh | None = None
):
    """A jitted function advancing a state by ``length`` generations in one scan."""

    def scan(state: SearchState) -> SearchState:
        def body(s, _):
            return step(strategy, problem, s, mesh), None

        return jax.lax.scan(body, state, None, length=length)[0]

    return jax.jit(scan, donate_argnums=0)


@dataclasses.dataclass
class SearchResult:
    state: SearchState
    best_genome: np.ndarray
    best_masks: dict
    best_fitness: float
    history: dict  # numpy arrays, one entry per generation
    seconds: float
    compile_seconds: float
    evaluations: int
    generations: int  # run: fewer than asked when a deadline stopped the search


class Checkpointer:
    """Saves and restores :class:`SearchState` with orbax (atomic per step).

    ``signature`` (JSON-able) describes the run; a directory holding a run with a
    different signature is refused, naming the first difference.
    """

    def __init__(self, directory: str | Path, signature: dict, max_to_keep: int = 2):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        self.signature = signature
        self.directory.mkdir(parents=True, exist_ok=True)
        sig_file = self.directory / "search.json"
        if sig_file.exists():
            saved = json.loads(sig_file.read_text())
            for k in sorted(set(saved) | set(signature)):
                if saved.get(k) != signature.get(k):
                    raise ValueError(
                        f"checkpoint directory {self.directory} holds a different run: "
                        f"{k} is {saved.get(k)!r} there but {signature.get(k)!r} now"
                    )
        else:
            tmp = sig_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(signature, indent=2, sort_keys=True))
            tmp.replace(sig_file)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.directory / "steps",
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def save(self, state: SearchState) -> None:
        step = int(state.generation)
        self.manager.save(step, args=self._ocp.args.StandardSave(state), force=True)
        self.manager.wait_until_finished()

    def restore(self, like: SearchState) -> SearchState | None:
        """The newest readable checkpoint (falling back past damaged ones)."""
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), like)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.manager.restore(
                    step, args=self._ocp.args.StandardRestore(abstract)
                )
            except Exception as err:  # a damaged step: use the previous one
                # moved aside (not deleted), so the step can be saved again
                aside = self.directory / f"damaged-step-{step}"
                shutil.rmtree(aside, ignore_errors=True)
                (self.directory / "steps" / str(step)).rename(aside)
                self.manager.reload()
                warnings.warn(
                    f"checkpoint step {step} in {self.directory} is unreadable "
                    f"({type(err).__name__}); moved to {aside.name}, trying an "
                    "earlier one",
                    stacklevel=2,
                )
        return None


def scan_length(generations_per_scan: int, chunk: int | None) -> int:
    """Generations per scan, checked; ``chunk`` is its deprecated name."""
    name = "generations_per_scan"
    if chunk is not None:
        warnings.warn(
            "search.run(chunk=) is deprecated; use generations_per_scan=",
            DeprecationWarning,
            stacklevel=3,
        )
        name, generations_per_scan = "chunk", chunk
    if generations_per_scan < 1:
        raise ValueError(f"{name} must be at least 1, got {generations_per_scan}")
    return generations_per_scan


def run(
    strategy: Strategy,
    problem: Problem,
    key: jax.Array,
    generations: int,
    *,
    generations_per_scan: int = 10,
    center=None,
    noise: float = 1.0,
    mesh: Mesh | None = None,
    callback: Callable[[SearchState], None] | None = None,
    checkpointer: Checkpointer | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    chunk: int | None = None,
    deadline: float | None = None,
) -> SearchResult:
    """Runs ``generations`` generations of ``strategy`` on ``problem``.

    Args:
        key: a raw ``jax.random.PRNGKey``.
        generations_per_scan: generations per jitted scan; the host reports
            between scans. ``chunk`` is its deprecated name.
        center, noise: the initial population is ``center + noise * N(0, 1)``.
        mesh: shard the population over this mesh (see :func:`population_mesh`).
        callback: called with the state after every scan (progress display).
        checkpointer: save the state every ``checkpoint_every`` scans; with
            ``resume`` start from its newest checkpoint.
        deadline: a ``time.perf_counter()`` value: the search stops before a
            scan that would end after it (:func:`gapruning.deadline.stop_before_scan`);
            the unrun generations' history stays NaN.
    """
    generations_per_scan = scan_length(generations_per_scan, chunk)
    t0 = time.perf_counter()
    start = (
        jax.jit(
            lambda k: init(
                strategy, problem, k, generations, center=center, noise=noise, mesh=mesh
            )
        )
        .lower(key)
        .compile()
    )
    compile_seconds = time.perf_counter() - t0
    state = start(key)
    if resume and checkpointer is not None:
        restored = checkpointer.restore(state)
        if restored is not None:
            state = restored
    jax.block_until_ready(state)
    scans: dict[int, Callable] = {}
    done = int(state.generation)
    n_scans, last_scan = 0, 0.0
    while done < generations and not stop_before_scan(deadline, done, last_scan):
        scan_start = time.perf_counter()
        length = min(generations_per_scan, generations - done)
        if length not in scans:
            c0 = time.perf_counter()
            scans[length] = (
                make_scan(strategy, problem, length, mesh).lower(state).compile()
            )
            compile_seconds += time.perf_counter() - c0
        state = scans[length](state)
        done += length
        n_scans += 1
        if callback is not None:
            callback(state)
        if checkpointer is not None and (
            n_scans % checkpoint_every == 0 or done == generations
        ):
            checkpointer.save(state)
        last_scan = time.perf_counter() - scan_start
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t0
    best_genome = np.asarray(state.best_genome)
    best_masks = {
        k: np.asarray(v).astype(bool)
        for k, v in problem.decode(jnp.asarray(best_genome)).items()
    }
    start_evals = strategy.population_size if strategy.needs_evaluated_start else 0
    return SearchResult(
        state=state,
        best_genome=best_genome,
        best_masks=best_masks,
        best_fitness=float(state.best_fitness),
        history={k: np.asarray(v) for k, v in state.history.items()},
        seconds=seconds,
        compile_seconds=compile_seconds,
        evaluations=start_evals + done * strategy.population_size,
        generations=done,
    )
