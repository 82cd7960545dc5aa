"""Evolutionary search: strategies (registries ``STRATEGIES``, units genome, and
``GENOME_STRATEGIES``, genomes of their own) and the jitted engine."""

from .binary_ga import BinaryGA
from .engine import (
    Checkpointer,
    Problem,
    SearchResult,
    SearchState,
    population_mesh,
    run,
)
from .profile_sampler import ProfileSampler
from .random_search import RandomSearch
from .score_ga import ScoreGA
from .strategies import (
    GENOME_KINDS,
    GENOME_STRATEGIES,
    STRATEGIES,
    Strategy,
    make_genome_strategy,
    make_strategy,
    register_strategy,
)

__all__ = [
    "GENOME_KINDS",
    "GENOME_STRATEGIES",
    "STRATEGIES",
    "BinaryGA",
    "Checkpointer",
    "Problem",
    "ProfileSampler",
    "RandomSearch",
    "ScoreGA",
    "SearchResult",
    "SearchState",
    "Strategy",
    "make_genome_strategy",
    "make_strategy",
    "population_mesh",
    "register_strategy",
    "run",
]
