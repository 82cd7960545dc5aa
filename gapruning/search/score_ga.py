"""The real-valued score GA of Pham Van et al. (2022), "Pruning deep neural networks
without the training set" (code: sun-asterisk-research/ga_pruning_research), as an
evosax-style algorithm the jitted engine runs.

A genome is one real score per kernel weight (flattened layer by layer; the
encoding keeps the top-k ``|score|`` of each layer). Operators, as in the paper's
code:

* initial population: every layer's scores Kaiming-uniform (PyTorch's
  ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``);
* selection: roulette wheel, parent ``i`` drawn with probability proportional to
  ``goodness_i ** power`` (``power`` 1 in the base strategy, 2 in "increase
  discrepancy"), both parents drawn with replacement from the whole population;
* crossover: for every layer one cut ``c`` uniform in ``[0, size]`` on the
  flattened scores; a pair of parents ``(a, b)`` gives ``b[:c] + a[c:]`` and
  ``a[:c] + b[c:]`` (always applied);
* mutation: every gene of a child is replaced by ``U(-1, 1)`` with probability
  ``mutation_rate``;
* elitism: the best ``elitism`` fraction (0, 0.2 or 0.5 in the paper) is copied
  unchanged, children fill the rest.

What differs:

* **Minimisation.** evosax (and gapruning) minimise a fitness ``f``; the roulette
  needs a positive "higher is better" value. ``goodness`` converts:
  ``"inverse"``: ``g = 1 / (1 + f)`` (for the non-negative data-free composite;
  ``g`` in (0, 1], 1 for a perfect copy), ``"complement"``: ``g = 1 - f``
  (with ``f = 1 - accuracy`` this is the paper's accuracy exactly), ``"window"``:
  ``g = max(f) - f + (max(f) - min(f)) / P`` (any sign). Failed individuals
  (``f = inf``) get ``g = 0``.
* **Schedule.** The paper grows the population (50 -> 100 -> 150 -> 300 -> 600)
  and lowers the mutation rate (0.15 -> 0.1 -> 0.05 -> 0.025 -> 0.01) when the
  population's mean accuracy passes 0.8 / 0.85 / 0.9 / 0.95. A jitted scan needs
  a fixed shape, so here the population stays fixed and only the mutation rate
  follows the schedule, on the mean goodness, with the paper's rule (the highest
  threshold passed this generation sets the rate; if none is passed the rate is
  unchanged).
* The engine evaluates the Kaiming population as generation 1 (the paper's first
  ``evaluate_population``), so ``generations * population`` evaluations in all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms.base import EvolutionaryAlgorithm
from evosax.algorithms.base import Params as BaseParams
from evosax.algorithms.base import State as BaseState
from flax import struct

GOODNESS = ("inverse", "complement", "window")
# the paper's schedule: (mean accuracy threshold, mutation rate), initial rate 0.15
PAPER_SCHEDULE = ((0.8, 0.1), (0.85, 0.05), (0.9, 0.025), (0.95, 0.01))
PAPER_INITIAL_RATE = 0.15


@struct.dataclass
class State(BaseState):
    population: jax.Array
    fitness: jax.Array
    mutation_rate: jax.Array
    best_solution: jax.Array
    best_fitness: jax.Array
    generation_counter: jax.Array


@struct.dataclass
class Params(BaseParams):
    mutation_rate: float  # initial per-gene replacement probability
    power: float  # roulette weight = goodness ** power


def goodness(fitness: jax.Array, kind: str = "inverse") -> jax.Array:
    """Positive "higher is better" values from a minimised fitness (0 for inf)."""
    finite = jnp.isfinite(fitness)
    f = jnp.where(finite, fitness, 0.0)
    if kind == "inverse":
        g = 1.0 / (1.0 + jnp.maximum(f, 0.0))
    elif kind == "complement":
        g = jnp.maximum(1.0 - f, 0.0)
    elif kind == "window":
        hi = jnp.max(jnp.where(finite, f, -jnp.inf))
        lo = jnp.min(jnp.where(finite, f, jnp.inf))
        g = hi - f + (hi - lo) / f.shape[0]
        g = jnp.where(hi > lo, g, 1.0)
    else:
        raise ValueError(f"unknown goodness {kind!r}; known: {', '.join(GOODNESS)}")
    return jnp.where(finite, g, 0.0)


def roulette_probabilities(goodness_values: jax.Array, power: float) -> jax.Array:
    """Selection probabilities ``g ** power / sum(g ** power)`` (uniform if all 0)."""
    w = jnp.maximum(goodness_values, 0.0) ** power
    total = w.sum()
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 1.0 / w.size)


def layer_crossover(a, b, cuts, layer_of, position):
    """Per-layer single-point crossover of two flattened genomes.

    ``cuts[l]`` in ``[0, size_l]``; ``layer_of``/``position`` give each gene's
    layer and its index inside the layer. Returns ``(b[:c] + a[c:], a[:c] +
    b[c:])`` layer by layer."""
    take_b = position < cuts[layer_of]
    return jnp.where(take_b, b, a), jnp.where(take_b, a, b)


def mutate(genome, replace, values):
    """Genes where ``replace`` is true become ``values`` (the paper's U(-1, 1))."""
    return jnp.where(replace, values, genome)


def scheduled_rate(mean_goodness, current, schedule) -> jax.Array:
    """The paper's rule: the highest threshold passed sets the rate; else keep."""
    rate = current
    for threshold, value in schedule:  # ascending thresholds: the last passed wins
        rate = jnp.where(mean_goodness > threshold, value, rate)
    return rate


class ScoreGA(EvolutionaryAlgorithm):
    """Pham Van et al.'s GA on real-valued per-weight scores.

    Args:
        population_size: individuals per generation (fixed).
        layer_sizes: number of genes of each layer, in genome order.
        fan_in: each layer's fan-in (Kaiming-uniform bound ``1/sqrt(fan_in)``).
        elitism: fraction of the population copied unchanged (0, 0.2, 0.5).
        goodness: ``"inverse"``, ``"complement"`` or ``"window"`` (module doc).
        schedule: ``((threshold, rate), ...)`` on the mean goodness, ascending;
            ``"paper"`` for :data:`PAPER_SCHEDULE`; ``None``: a fixed rate.
    """

    def __init__(
        self,
        population_size: int,
        layer_sizes: Sequence[int],
        fan_in: Sequence[int],
        *,
        elitism: float = 0.0,
        goodness: str = "inverse",
        schedule=None,
    ):
        if population_size < 2:
            raise ValueError(f"population must be at least 2, got {population_size}")
        if not 0.0 <= elitism < 1.0:
            raise ValueError(f"elitism must be a fraction in [0, 1), got {elitism}")
        if goodness not in GOODNESS:
            raise ValueError(
                f"unknown goodness {goodness!r}; known: {', '.join(GOODNESS)}"
            )
        if len(layer_sizes) != len(fan_in):
            raise ValueError("layer_sizes and fan_in must have the same length")
        d = int(sum(layer_sizes))
        super().__init__(population_size, jnp.zeros((d,), jnp.float32))
        self.layer_sizes = tuple(int(s) for s in layer_sizes)
        self.bounds = np.repeat(
            1.0 / np.sqrt(np.asarray(fan_in, np.float64)), self.layer_sizes
        ).astype(np.float32)
        self.layer_of = np.repeat(np.arange(len(self.layer_sizes)), self.layer_sizes)
        starts = np.cumsum([0, *self.layer_sizes[:-1]])
        self.position = np.arange(d) - np.repeat(starts, self.layer_sizes)
        self.num_elites_kept = int(math.floor(elitism * population_size))
        self.goodness_kind = goodness
        if schedule == "paper":
            schedule = PAPER_SCHEDULE
        self.schedule = tuple(sorted((float(t), float(r)) for t, r in schedule or ()))

    @property
    def _default_params(self) -> Params:
        return Params(mutation_rate=PAPER_INITIAL_RATE, power=1.0)

    def kaiming_population(self, key) -> jax.Array:
        u = jax.random.uniform(key, (self.population_size, self.num_dims), minval=-1)
        return u * jnp.asarray(self.bounds)

    def _init(self, key, params: Params) -> State:
        p, d = self.population_size, self.num_dims
        return State(
            population=self.kaiming_population(key),
            fitness=jnp.full((p,), jnp.inf),
            mutation_rate=jnp.asarray(params.mutation_rate, jnp.float32),
            best_solution=jnp.zeros((d,)),
            best_fitness=jnp.array(jnp.inf),
            generation_counter=jnp.array(0, jnp.int32),
        )

    def _offspring(self, key, state: State, params: Params) -> jax.Array:
        p, n_el = self.population_size, self.num_elites_kept
        n_children = p - n_el
        n_pairs = (n_children + 1) // 2
        k_sel, k_cut, k_mut, k_val = jax.random.split(key, 4)
        probs = roulette_probabilities(
            goodness(state.fitness, self.goodness_kind), params.power
        )
        parents = jax.random.choice(k_sel, p, (n_pairs, 2), p=probs)
        sizes = jnp.asarray(self.layer_sizes)
        cuts = jax.random.randint(k_cut, (n_pairs, len(self.layer_sizes)), 0, sizes + 1)
        layer_of, position = jnp.asarray(self.layer_of), jnp.asarray(self.position)
        c1, c2 = jax.vmap(
            lambda i, c: layer_crossover(
                state.population[i[0]], state.population[i[1]], c, layer_of, position
            )
        )(parents, cuts)
        children = jnp.stack([c1, c2], 1).reshape(2 * n_pairs, -1)[:n_children]
        replace = jax.random.bernoulli(k_mut, state.mutation_rate, children.shape)
        values = jax.random.uniform(k_val, children.shape, minval=-1.0, maxval=1.0)
        children = mutate(children, replace, values)
        elites = state.population[jnp.argsort(state.fitness)[:n_el]]
        return jnp.concatenate([elites, children])

    def _ask(self, key, state: State, params: Params):
        """The Kaiming population first (evaluated as generation 1), then
        offspring of the last evaluated one."""
        first = state.generation_counter == 0
        population = jax.lax.cond(
            first,
            lambda: state.population,
            lambda: self._offspring(key, state, params),
        )
        return population, state

    def _tell(self, key, population, fitness, state: State, params: Params):
        """Stores the evaluated population and follows the mutation schedule (the
        base ``tell`` keeps the best and counts generations)."""
        fitness = jnp.where(jnp.isnan(fitness), jnp.inf, fitness)
        mean_g = goodness(fitness, self.goodness_kind).mean()
        rate = scheduled_rate(mean_g, state.mutation_rate, self.schedule)
        return state.replace(
            population=population,
            fitness=fitness,
            mutation_rate=jnp.asarray(rate, jnp.float32),
        )
