"""Pruning methods that are not a generic engine search: one-shot criteria (L1,
SynFlow...), pipelines of their own (Paoding's progressive merging, GWCS's stages,
RL profiles) and searches with their own encoding (GA on weight scores).

A method is a function ``method(ctx: MethodContext, **options) -> MethodResult``
registered in :data:`METHODS`; ``gp.prune(net, strategy=name)`` runs it, then
compacts ``result.net`` (the dense network, its weights possibly compensated, e.g.
by merging removed units into kept ones) under ``result.masks``, unless the
method already did (``result.pruned``, e.g. GWCS's distilled network). Like
everything inside ``prune``, a method never reads a dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ..encoding import Budget, BudgetDecoder
from ..space import PruneSpace
from ..zoo import Pretrained


@dataclasses.dataclass
class MethodContext:
    """What :func:`gapruning.prune` hands a method: the dense ``net``, the exact
    ``budget``, the search size (``population``, ``generations``; a method spends
    at most ``population * generations`` fitness evaluations, plus one initial
    population), ``seed``, the data-free fitness the user asked for, built on
    first use by :meth:`fitness`, and the search's ``deadline`` (a
    ``time.perf_counter()`` value, or ``None``) under a time budget."""

    net: Pretrained
    budget: Budget
    seed: int = 0
    population: int = 64
    generations: int = 200
    progress: bool = False
    make_fitness: Callable[[], Callable] | None = None
    deadline: float | None = None

    @property
    def space(self) -> PruneSpace:
        return self.net.space

    @functools.cached_property
    def fitness(self) -> Callable:
        """The composed data-free fitness ``masks_batch -> (P,)`` (lower better)."""
        if self.make_fitness is None:
            raise ValueError("this prune call has no fitness to give the method")
        return self.make_fitness()

    def decode(self, scores, prior=None) -> dict[str, np.ndarray]:
        """Unit scores (higher kept first) -> group masks meeting the budget."""
        kept = BudgetDecoder(self.space, self.budget, prior)(np.asarray(scores))
        return {k: np.asarray(v, bool) for k, v in self.space.unflat(kept).items()}

    def quotas(self, scores) -> dict[str, int]:
        """Units kept per group when ``scores`` are decoded under the budget: how
        many units a method that picks the units itself keeps in each group."""
        return self.space.kept(self.decode(scores))


@dataclasses.dataclass
class MethodResult:
    """``masks`` (group -> bool units, or layer -> bool kernel for unstructured
    methods), ``net`` (the dense network to compact: the input one, or a copy with
    compensated weights), the per-step ``history`` (name -> array, may be empty),
    fitness ``evaluations`` spent, wall ``seconds``, ``best_fitness`` (``None``
    for criteria that use no fitness), JSON-able ``details``, and ``pruned``: the
    network the method already compacted (and possibly distilled) for ``masks``,
    which ``gp.prune`` then uses as the compacted result (``None``: compact
    ``net`` under ``masks``)."""

    masks: dict[str, np.ndarray]
    net: Pretrained
    history: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    evaluations: int = 0
    seconds: float = 0.0
    compile_seconds: float = 0.0
    best_fitness: float | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    pruned: Pretrained | None = None


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., MethodResult]
    description: str
    structured: bool = True  # False: kernel masks (unstructured sparsity)
    per_group: bool = True  # False: the method chooses per-layer ratios itself


METHODS: dict[str, Method] = {}


def register_method(
    name: str,
    fn: Callable[..., MethodResult],
    description: str,
    *,
    structured: bool = True,
    per_group: bool = True,
) -> Method:
    """Adds ``fn(ctx: MethodContext, **options) -> MethodResult`` to :data:`METHODS`
    under ``name`` (usable as ``gp.prune(..., strategy=name)``). ``structured=False``
    marks kernel-mask methods; ``per_group=False`` marks methods that choose the
    per-layer ratios themselves and so refuse a per-group budget."""
    from ..search import STRATEGIES

    if name in METHODS or name in STRATEGIES:
        raise ValueError(f"method or strategy {name!r} is already registered")
    method = Method(name, fn, description, structured, per_group)
    METHODS[name] = method
    return method


def run_method(name: str, ctx: MethodContext, options: Mapping[str, Any]):
    """Runs a registered method and checks what it returns."""
    method = METHODS[name]
    if ctx.budget.per_group and not method.per_group:
        raise ValueError(
            f"method {name!r} chooses a keep ratio per layer itself; a per-group "
            "budget leaves it nothing to choose: use a global budget (per_group=False)"
        )
    options = dict(options)
    if "chunk" in options:  # the old name of generations_per_scan
        warnings.warn(
            f"{name} option chunk= is deprecated; use generations_per_scan=",
            DeprecationWarning,
            stacklevel=2,
        )
        options["generations_per_scan"] = options.pop("chunk")
    result = method.fn(ctx, **options)
    if not isinstance(result, MethodResult):
        raise TypeError(f"method {name!r} returned {type(result)}, not MethodResult")
    return result


# importing the method modules registers them
from . import (  # noqa: E402,F401
    ga_scores,
    gwcs,
    neuron_merging,
    oneshot,
    paoding,
    profile,
)

__all__ = [
    "METHODS",
    "Method",
    "MethodContext",
    "MethodResult",
    "register_method",
    "run_method",
]
