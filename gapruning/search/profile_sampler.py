"""Random or exhaustive search over layer-wise keep-ratio profiles (Venkatesan et
al., 2020, "Out-of-the-box channel pruned networks": random sampling of profiles),
as an evosax-style algorithm the jitted engine runs.

A genome is one keep ratio per prunable group (:class:`~gapruning.encoding.
ProfileEncoding`; the decoder rescales the profile to meet the budget exactly).
Each generation asks ``population_size`` fresh profiles: uniform ratios in
``[low, 1]`` per group, or, with a ``grid`` (an ``(M, G)`` array of profiles),
the next ``population_size`` rows of the grid (exhaustive enumeration; it wraps
around when the grid is exhausted). Nothing is learned; no evaluation is spent
on a start population.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from evosax.algorithms.base import EvolutionaryAlgorithm
from evosax.algorithms.base import Params as BaseParams
from evosax.algorithms.base import State as BaseState
from flax import struct


@struct.dataclass
class State(BaseState):
    best_solution: jax.Array
    best_fitness: jax.Array
    generation_counter: jax.Array


@struct.dataclass
class Params(BaseParams):
    low: float  # smallest sampled keep ratio


class ProfileSampler(EvolutionaryAlgorithm):
    """Fresh random (or grid) profiles every generation."""

    def __init__(self, population_size: int, num_groups: int, grid=None):
        super().__init__(population_size, jnp.zeros((num_groups,), jnp.float32))
        if grid is not None:
            grid = np.asarray(grid, np.float32)
            if grid.ndim != 2 or grid.shape[1] != num_groups:
                raise ValueError(
                    f"grid must have shape (M, {num_groups}), got {grid.shape}"
                )
        self.grid = grid

    @property
    def _default_params(self) -> Params:
        return Params(low=0.05)

    def _init(self, key, params: Params) -> State:
        return State(
            best_solution=jnp.zeros((self.num_dims,)),
            best_fitness=jnp.array(jnp.inf),
            generation_counter=jnp.array(0, jnp.int32),
        )

    def _ask(self, key, state: State, params: Params):
        p = self.population_size
        if self.grid is None:
            shape = (p, self.num_dims)
            return jax.random.uniform(key, shape, minval=params.low, maxval=1.0), state
        rows = (state.generation_counter * p + jnp.arange(p)) % len(self.grid)
        return jnp.asarray(self.grid)[rows], state

    def _tell(self, key, population, fitness, state: State, params: Params):
        return state  # nothing is learned; the base tell keeps the best
