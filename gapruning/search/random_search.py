"""Random search under the same budget: the honest baseline every strategy must beat.

Each generation draws ``population_size`` fresh genomes from the initial sampling
distribution (standard normal unit scores, so the decoded masks are uniformly random
among those meeting the budget); nothing is learned. Written as an evosax
population-based algorithm so it runs through the same engine.
"""

from __future__ import annotations

import jax
from evosax.algorithms.population_based.base import (
    Params as BaseParams,
)
from flax import struct

from .generational import GenerationalAlgorithm, State


@struct.dataclass
class Params(BaseParams):
    scale: float  # standard deviation of the sampled genes


class RandomSearch(GenerationalAlgorithm):
    """Fresh standard-normal genomes every generation."""

    @property
    def _default_params(self) -> Params:
        return Params(scale=1.0)

    def _ask(self, key, state: State, params: Params):
        shape = (self.population_size, self.num_dims)
        return params.scale * jax.random.normal(key, shape), state
