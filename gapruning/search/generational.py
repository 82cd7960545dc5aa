"""Shared base of the generational algorithms: each generation replaces the whole
population (elites, if any, are re-inserted by ``_ask``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


class GenerationalAlgorithm(PopulationBasedAlgorithm):
    """An evosax population-based algorithm whose state is just the last
    evaluated population; subclasses write ``_ask`` and ``_default_params``."""

    def _init(self, key: jax.Array, params) -> State:
        return State(
            population=jnp.zeros((self.population_size, self.num_dims)),
            fitness=jnp.full((self.population_size,), jnp.inf),
            best_solution=jnp.zeros((self.num_dims,)),
            best_fitness=jnp.inf,
            generation_counter=0,
        )

    def _tell(self, key, population, fitness, state: State, params) -> State:
        return state.replace(population=population, fitness=fitness)
