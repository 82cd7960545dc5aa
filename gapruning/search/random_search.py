"""Random search under the same budget: the honest baseline every strategy must beat.

Each generation draws ``population_size`` fresh genomes from the initial sampling
distribution (standard normal unit scores, so the decoded masks are uniformly random
among those meeting the budget); nothing is learned. Written as an evosax
population-based algorithm so it runs through the same engine.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from evosax.algorithms.population_based.base import (
    Params as BaseParams,
)
from evosax.algorithms.population_based.base import (
    PopulationBasedAlgorithm,
)
from evosax.algorithms.population_based.base import (
    State as BaseState,
)
from flax import struct


@struct.dataclass
class State(BaseState):
    pass


@struct.dataclass
class Params(BaseParams):
    scale: float  # standard deviation of the sampled genes


class RandomSearch(PopulationBasedAlgorithm):
    """Fresh standard-normal genomes every generation."""

    @property
    def _default_params(self) -> Params:
        return Params(scale=1.0)

    def _init(self, key: jax.Array, params: Params) -> State:
        return State(
            population=jnp.zeros((self.population_size, self.num_dims)),
            fitness=jnp.full((self.population_size,), jnp.inf),
            best_solution=jnp.zeros((self.num_dims,)),
            best_fitness=jnp.inf,
            generation_counter=0,
        )

    def _ask(self, key, state: State, params: Params):
        shape = (self.population_size, self.num_dims)
        return params.scale * jax.random.normal(key, shape), state

    def _tell(self, key, population, fitness, state: State, params: Params) -> State:
        return state.replace(population=population, fitness=fitness)
