"""Genomes <-> masks, each decoding meeting its budget exactly.

Every structured encoding turns a genome into one score per unit and hands the
scores to a :class:`Budget` decoder, so "which units" (the encoding) and "how many"
(the budget) are separate ideas:

* ``units``: one gene per prunable unit (real scores, or bits);
* ``profile`` (Venkatesan et al., 2020): one keep-ratio per group; inside a group,
  units are taken in a fixed order (L1 norm of incoming weights, or a seeded random
  permutation). Unit ``j`` (0-based in that order) of group ``g`` scores
  ``log r_g - log((j + 1) / size_g)``, so the decoded profile is ``r`` scaled by the
  one factor that meets the budget;
* ``weights`` (Pham Van et al., 2022, unstructured): one score per kernel weight,
  mask = top-k of ``|score|`` per layer.

Budgets (``Budget.kind``): ``units`` keeps exactly ``round((1 - target) * N)`` units
(globally with at least ``min_keep`` per group, or the same ratio in every group);
``params``/``flops`` keep units in score order until the next one would exceed
``(1 - target)`` of the dense cost (so the budget is met within one unit). All
decoders are pure ``jnp`` functions: ``jit``- and ``vmap``-friendly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from .models import Net
from .space import MaskError, PruneSpace

BUDGET_KINDS = ("units", "params", "flops")


@dataclasses.dataclass(frozen=True)
class Budget:
    """How much to remove: ``target`` in (0, 1) of ``kind`` ("units", "params",
    "flops"). ``per_group`` (units only): remove the same ratio from every group.
    ``min_keep``: units every group keeps (no layer is emptied)."""

    kind: str = "units"
    target: float = 0.5
    per_group: bool = False
    min_keep: int = 1

    def __post_init__(self):
        if self.kind not in BUDGET_KINDS:
            raise ValueError(
                f"unknown budget {self.kind!r}; known: {', '.join(BUDGET_KINDS)}"
            )
        if not 0.0 < float(self.target) < 1.0:
            raise ValueError(
                f"target must be a fraction to remove strictly between 0 and 1, "
                f"got {self.target}"
            )
        if self.min_keep < 1:
            raise ValueError(f"min_keep must be at least 1, got {self.min_keep}")
        if self.per_group and self.kind != "units":
            raise ValueError("per_group applies to the 'units' budget only")


def kept_fraction_fn(space: PruneSpace, budget: Budget) -> Callable:
    """Masks -> kept fraction of the budget's measure (units, params or FLOPs)."""
    if budget.kind == "units":
        return lambda masks: space.flat(masks).astype(jnp.float32).mean()
    dense = space.dense_params if budget.kind == "params" else space.dense_flops
    return lambda masks: space.cost_of_counts(space.counts(masks), budget.kind) / dense


class BudgetDecoder:
    """Maps unit scores ``(N,)`` to kept units ``(N,) bool`` meeting a budget.

    Ties are broken by ``prior`` (higher first, e.g. an L1-norm ranking), then by
    unit index; the ``min_keep`` best units of every group are always kept.

    Sorting is slow on XLA:CPU, so units
    are laid out once in tie-break order (a static permutation) and selected with
    ``lax.top_k``, whose ties go to the lower index: the budgets without a cost
    (``units``) need no sort at all.
    """

    def __init__(self, space: PruneSpace, budget: Budget, prior=None):
        self.space, self.budget = space, budget
        sizes = np.array(space.sizes)
        if np.any(sizes < budget.min_keep):
            small = [g.name for g in space.groups if g.size < budget.min_keep]
            raise MaskError(f"groups {small} have fewer than min_keep units")
        group_ids = np.repeat(np.arange(len(sizes)), sizes)
        self.group_ids = jnp.asarray(group_ids)
        self.prior = (
            np.zeros(space.num_units, np.float32)
            if prior is None
            else np.asarray(prior, np.float32)
        )
        # tie-break order: prior descending, then unit index
        self.order = np.lexsort((np.arange(space.num_units), -self.prior))
        # per group, its units' positions in that order, padded with N (a -inf)
        slots = np.full((len(sizes), sizes.max()), space.num_units)
        for g in range(len(sizes)):
            mine = np.flatnonzero(group_ids[self.order] == g)
            slots[g, : len(mine)] = mine
        self.slots = slots
        n, keep_frac = space.num_units, 1.0 - float(budget.target)
        forced = np.full(len(sizes), budget.min_keep)
        if budget.kind == "units" and budget.per_group:
            self.keep_per_group = np.maximum(
                np.round(keep_frac * sizes).astype(int), budget.min_keep
            )
        elif budget.kind == "units":
            self.keep = int(round(keep_frac * n))
            if self.keep < forced.sum():
                raise MaskError(
                    f"target {budget.target} keeps {self.keep} units, fewer than "
                    f"min_keep={budget.min_keep} in each of {len(sizes)} groups"
                )
        else:
            dense = space.dense_params if budget.kind == "params" else space.dense_flops
            self.limit = keep_frac * dense
            floor = int(space.cost_of_counts(forced, budget.kind))
            if floor > self.limit:
                raise MaskError(
                    f"{budget.kind} target {budget.target} is out of reach: keeping "
                    f"min_keep={budget.min_keep} unit(s) per group already costs "
                    f"{floor} of {dense} ({floor / dense:.1%} kept, the target "
                    f"allows {keep_frac:.1%})"
                )

    def _best_in_groups(self, ordered, k) -> jax.Array:
        """``(N,) bool`` in tie-break order: the ``k`` (per group: int or ``(G,)``)
        best units of every group."""
        padded = jnp.append(ordered, -jnp.inf)[self.slots]
        k_max = int(np.max(k))
        _, best = jax.lax.top_k(padded, k_max)
        take = jnp.arange(k_max) < jnp.asarray(k).reshape(-1, 1)
        picked = jnp.where(take, jnp.take_along_axis(self.slots, best, 1), len(ordered))
        return jnp.zeros(len(ordered) + 1, bool).at[picked].set(True)[:-1]

    def __call__(self, scores) -> jax.Array:
        scores = jnp.nan_to_num(jnp.asarray(scores, jnp.float32), nan=-jnp.inf)
        ordered = scores[self.order]
        if self.budget.kind == "units" and self.budget.per_group:
            kept = self._best_in_groups(ordered, self.keep_per_group)
        else:
            forced = self._best_in_groups(ordered, self.budget.min_keep)
            key = jnp.where(forced, jnp.inf, ordered)
            if self.budget.kind == "units":
                _, top = jax.lax.top_k(key, self.keep)
                kept = jnp.zeros(ordered.shape, bool).at[top].set(True)
            else:
                kept = self._greedy(jnp.argsort(-key, stable=True), forced)
        return jnp.zeros(scores.shape, bool).at[self.order].set(kept)

    def _greedy(self, order, forced):
        """Adds units (positions in tie-break order) in ``order`` until the next
        would exceed the cost limit."""
        g_of = self.group_ids[self.order][order]
        num_groups = len(self.space.sizes)

        def step(carry, inputs):
            counts, open_ = carry
            g, must = inputs
            trial = counts.at[g].add(1)
            fits = self.space.cost_of_counts(trial, self.budget.kind) <= self.limit
            take = must | (open_ & fits)
            open_ = open_ & (must | fits)
            return (jnp.where(take, trial, counts), open_), take

        init = (jnp.zeros(num_groups, jnp.int32), jnp.array(True))
        _, taken = jax.lax.scan(step, init, (g_of, forced[order]))
        return jnp.zeros(order.shape, bool).at[order].set(taken)


def rank_in_groups(scores: np.ndarray, space: PruneSpace) -> np.ndarray:
    """Rank of each unit inside its group (0 = highest score, ties by index)."""
    ranks = np.empty(space.num_units, np.int64)
    for g, o in zip(space.groups, space.offsets, strict=True):
        part = np.asarray(scores[o : o + g.size])
        ranks[o + np.lexsort((np.arange(g.size), -part))] = np.arange(g.size)
    return ranks


# ------------------------------------------------------------------- encodings


class UnitEncoding:
    """One gene per prunable unit; higher genes are kept first.

    Example:
        >>> enc = UnitEncoding(space, Budget("units", 0.7))
        >>> masks = enc.decode(jax.random.normal(key, (enc.num_genes,)))
    """

    name = "units"

    def __init__(self, space: PruneSpace, budget: Budget, prior=None):
        self.space, self.budget, self.prior = space, budget, prior
        self.decoder = BudgetDecoder(space, budget, prior)
        self.num_genes = space.num_units

    def search_start(self, init: str | None) -> tuple[jax.Array | None, float]:
        """``(center, noise)`` of a search's first population: around the prior
        (``init="l1"``) or unbiased (``None``), unit noise."""
        if init not in ("l1", None):
            raise ValueError(f"unknown init {init!r}; known: 'l1', None")
        center = jnp.asarray(self.prior) if init == "l1" else None
        return center, 1.0

    def decode(self, genome) -> dict[str, jax.Array]:
        return self.space.unflat(self.decoder(genome))

    def encode(self, masks: Mapping):
        """0/1 genes of the kept units (NumPy for concrete masks, traceable)."""
        return self.space.flat(masks).astype(np.float32)


def l1_unit_scores(model: Net, space: PruneSpace) -> np.ndarray:
    """L1 norm of each unit's incoming weights (summed over coupled producers,
    and over the channels of a unit spanning several: an attention head)."""
    scores = []
    for g in space.groups:
        total = np.zeros(g.size)
        for layer in g.members:
            kernel = np.asarray(model.layers[layer].kernel[...])
            total += per_unit(
                np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(0), g.size
            )
        scores.append(total)
    return np.concatenate(scores)


def per_unit(per_channel: np.ndarray, size: int) -> np.ndarray:
    """Per-channel values of a group of ``size`` units summed per unit (a unit
    spans several consecutive channels for an attention head)."""
    return per_channel.reshape(size, -1).sum(1)


def standardize_per_group(scores: np.ndarray, space: PruneSpace) -> np.ndarray:
    """``scores`` (one per unit, in ``space`` order) minus their group's mean,
    divided by its standard deviation: comparable across layers."""
    out = np.empty(len(scores), np.float32)
    for g, o in zip(space.groups, space.offsets, strict=True):
        part = scores[o : o + g.size]
        out[o : o + g.size] = (part - part.mean()) / (part.std() + 1e-12)
    return out


class ProfileEncoding:
    """One keep-ratio gene per group; units chosen inside groups by ``rule``.

    Args:
        rule: "l1" (largest incoming-weight L1 norm first) or "random" (a fixed
            permutation drawn from ``seed``).
    """

    name = "profile"

    def __init__(
        self,
        model: Net,
        space: PruneSpace,
        budget: Budget,
        rule: str = "l1",
        seed: int = 0,
    ):
        if rule == "l1":
            order_score = l1_unit_scores(model, space)
        elif rule == "random":
            order_score = np.random.default_rng(seed).random(space.num_units)
        else:
            raise ValueError(f"unknown profile rule {rule!r}; known: l1, random")
        if budget.per_group:
            raise ValueError("a profile sets per-group ratios; use a global budget")
        self.space, self.budget, self.rule = space, budget, rule
        self.decoder = BudgetDecoder(space, budget)
        rank = rank_in_groups(order_score.astype(np.float32), space)
        sizes = np.array(space.sizes)[self.decoder.group_ids]
        self.unit_rank = rank  # position of each unit in its group's fixed order
        self._log_position = np.log((rank + 1.0) / sizes).astype(np.float32)
        self.num_genes = len(space.groups)

    def search_start(self, init: str | None) -> tuple[jax.Array, float]:
        """``(center, noise)`` of a search's first population: every group keeps
        the budget's ratio, small noise (``init`` has no effect)."""
        keep = 1.0 - float(self.budget.target)
        return jnp.full((self.num_genes,), keep, jnp.float32), 0.15

    def decode(self, genome) -> dict[str, jax.Array]:
        ratios = jnp.clip(jnp.asarray(genome, jnp.float32), 1e-6, 1.0)
        scores = jnp.log(ratios)[self.decoder.group_ids] - self._log_position
        return self.space.unflat(self.decoder(scores))

    def encode(self, masks: Mapping) -> np.ndarray:
        return np.array(
            [
                self.space.kept(masks)[g] / s
                for g, s in zip(self.space.group_names, self.space.sizes, strict=True)
            ],
            np.float32,
        )


class WeightEncoding:
    """One score per kernel weight of every Dense/Conv layer; per layer, the
    ``keep`` fraction with the largest ``|score|`` is kept (unstructured)."""

    name = "weights"

    def __init__(
        self, model: Net, keep: float = 0.5, layers: tuple[str, ...] | None = None
    ):
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must lie in (0, 1], got {keep}")
        if layers is None:
            layers = tuple(n.name for n in model.nodes if n.op in ("dense", "conv"))
        self.layers = layers
        self.shapes = {
            name: tuple(model.layers[name].kernel[...].shape) for name in layers
        }
        self.sizes = [math.prod(self.shapes[name]) for name in layers]
        self.keep = {
            name: max(1, round(keep * s))
            for name, s in zip(layers, self.sizes, strict=True)
        }
        self.num_genes = sum(self.sizes)

    def decode(self, genome) -> dict[str, jax.Array]:
        genome = jnp.asarray(genome, jnp.float32)
        out, start = {}, 0
        for name, size in zip(self.layers, self.sizes, strict=True):
            part = jnp.abs(genome[start : start + size])
            _, idx = jax.lax.top_k(part, self.keep[name])
            out[name] = (
                jnp.zeros(size, bool).at[idx].set(True).reshape(self.shapes[name])
            )
            start += size
        return out

    def encode(self, masks: Mapping) -> np.ndarray:
        return np.concatenate(
            [np.asarray(masks[n], np.float32).ravel() for n in self.layers]
        )
