"""Evolutionary search: strategies (registry ``STRATEGIES``) and the jitted engine."""

from .binary_ga import BinaryGA
from .engine import (
    Checkpointer,
    Problem,
    SearchResult,
    SearchState,
    population_mesh,
    run,
)
from .random_search import RandomSearch
from .strategies import STRATEGIES, Strategy, make_strategy, register_strategy

__all__ = [
    "STRATEGIES",
    "BinaryGA",
    "Checkpointer",
    "Problem",
    "RandomSearch",
    "SearchResult",
    "SearchState",
    "Strategy",
    "make_strategy",
    "population_mesh",
    "register_strategy",
    "run",
]
