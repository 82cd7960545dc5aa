"""``ga_scores``: GA pruning without the training set (Pham Van et al., 2022,
"Pruning deep neural networks without the training set"; code:
sun-asterisk-research/ga_pruning_research), unstructured.

The weights stay frozen; a genome is one real-valued score per kernel weight of
every Dense/Conv layer (:class:`~gapruning.encoding.WeightEncoding`), the mask of
a layer keeps its ``keep`` fraction of weights with the largest ``|score|``, and
the GA of :mod:`gapruning.search.score_ga` (Kaiming-uniform scores, roulette on
fitness or fitness squared, per-layer single-point crossover, U(-1, 1) mutation,
elitism none / 20% / 50%, optional mutation-rate schedule) evolves the scores,
all generations in the jitted engine's scan. The result is the network with the
pruned kernel weights zeroed (:func:`gapruning.compact.sparsify`; same shapes).

What differs from the paper:

* **Fitness.** The paper's fitness is accuracy on the labelled test set. Here it
  is the data-free composite of the ``gp.prune`` call, restricted to the terms
  that accept kernel masks (metrics marked ``unit_masks_only``, e.g. the
  Lipschitz term of the default composite, are dropped and named in
  ``details["dropped_terms"]``; the remaining terms are re-normalized on the same
  probes). ``labelled_fitness=(x, y)`` reproduces the paper: fitness ``1 -
  accuracy`` on those labelled arrays. **That option reads labelled data and is
  NOT data-free**; it is recorded in ``details["data_free"] = False``.
* **Minimisation.** The roulette uses ``goodness = 1 / (1 + f)`` of the minimised
  fitness (``1 - f``, i.e. the accuracy, with ``labelled_fitness``); see
  :mod:`gapruning.search.score_ga`.
* **Schedule.** Population fixed; only the mutation rate follows the paper's
  thresholds (``schedule="paper"``), on the mean goodness.
* **Budget.** The paper keeps 50% of every layer. Here every layer keeps
  ``1 - target`` of its kernel weights, which removes ``target`` of the kernel
  weights and of the kernel multiply-accumulates whatever ``budget`` kind was
  asked (biases and BatchNorm are not pruned; the card reports the exact
  nonzero counts).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..encoding import WeightEncoding
from ..search import GENOME_STRATEGIES, engine
from . import MethodContext, MethodResult, register_method


def kernel_fitness(ctx: MethodContext):
    """The call's data-free fitness, usable with kernel masks: ``(fit, dropped)``."""
    from ..fitness import METRICS, Fitness, compose

    fit = ctx.fitness
    if not isinstance(fit, Fitness):
        return fit, []
    dropped = [t.label for t in fit.terms if METRICS[t.metric].unit_masks_only]
    if not dropped:
        return fit, []
    kept = [t for t in fit.terms if t.label not in dropped]
    if not kept or fit.probes is None:
        raise ValueError(
            f"ga_scores prunes single weights, but every term of the fitness "
            f"({', '.join(dropped)}) needs structured masks; pass a fitness such "
            "as 'fidelity'"
        )
    spec = {k: v for k, v in fit.spec().items() if k not in dropped}
    return (
        compose(
            fit.pretrained,
            spec,
            probes=fit.probes,
            normalize=True,
            combine=fit.combine,
        ),
        dropped,
    )


def kernel_kept_fraction_fn(enc: WeightEncoding):
    """Kernel masks -> kept fraction of the encoded kernel weights (the
    unstructured twin of :func:`gapruning.encoding.kept_fraction_fn`)."""
    total = float(enc.num_genes)

    def kept_fraction(masks: Mapping):
        return sum(jnp.sum(m) for m in masks.values()) / total

    return kept_fraction


def labelled_accuracy_fitness(net, x, y, batch: int | None = None):
    """NOT data-free: ``1 - accuracy`` of each individual's kernel-masked network
    on the labelled arrays ``(x, y)`` (the paper's fitness)."""
    from ..forward import population_apply

    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y).astype(jnp.int32)

    def fitness(masks):
        logits = population_apply(net, masks, x)
        return 1.0 - (logits.argmax(-1) == y[None]).mean(-1)

    return fitness


def ga_scores(
    ctx: MethodContext,
    *,
    power: float = 1.0,
    elitism: float = 0.0,
    mutation_rate: float = 0.05,
    schedule: Any = None,
    goodness: str | None = None,
    labelled_fitness: tuple[Any, Any] | None = None,
    layers: tuple[str, ...] | None = None,
    generations_per_scan: int = 10,
) -> MethodResult:
    """Evolves per-weight scores; returns kernel masks (layer -> bool kernel).

    Args:
        power: roulette weight exponent (1: fitness, 2: fitness squared).
        elitism: fraction copied unchanged (the paper: 0, 0.2, 0.5).
        mutation_rate: per-gene replacement probability (initial, with schedule).
        schedule: ``"paper"``, ``((threshold, rate), ...)`` or ``None``.
        goodness: fitness -> roulette value (default ``"inverse"``, or
            ``"complement"`` with ``labelled_fitness``).
        labelled_fitness: ``(x, y)`` labelled arrays; **not data-free** (the
            paper's fitness, for reproducing it).
        layers: Dense/Conv layers to prune (default: all).
        generations_per_scan: generations per jitted scan.
    """
    t0 = time.perf_counter()
    net = ctx.net
    enc = WeightEncoding(net.model, keep=1.0 - float(ctx.budget.target), layers=layers)
    dropped: list[str] = []
    if labelled_fitness is not None:
        x, y = labelled_fitness
        fit = labelled_accuracy_fitness(net, x, y)
        goodness = goodness or "complement"
    else:
        fit, dropped = kernel_fitness(ctx)
        goodness = goodness or "inverse"
    strategy = GENOME_STRATEGIES["score_ga"](
        ctx.population,
        enc.num_genes,
        layer_sizes=enc.sizes,
        fan_in=[math.prod(enc.shapes[n][:-1]) for n in enc.layers],
        elitism=elitism,
        goodness=goodness,
        schedule=schedule,
        mutation_rate=mutation_rate,
        power=power,
    )
    problem = engine.Problem(enc.decode, fit, kernel_kept_fraction_fn(enc))
    result = engine.run(
        strategy,
        problem,
        jax.random.PRNGKey(ctx.seed),
        ctx.generations,
        generations_per_scan=generations_per_scan,
    )
    masks = {k: np.asarray(v, bool) for k, v in result.best_masks.items()}
    details = {
        "encoding": "weights",
        "keep_per_layer": {
            n: enc.keep[n] / s for n, s in zip(enc.layers, enc.sizes, strict=True)
        },
        "goodness": goodness,
        "power": power,
        "elitism": elitism,
        "mutation_rate": mutation_rate,
        "final_mutation_rate": float(result.state.strategy_state.mutation_rate),
        "schedule": [list(s) for s in strategy.algorithm.schedule],
        "dropped_terms": dropped,
        "data_free": labelled_fitness is None,
    }
    return MethodResult(
        masks,
        net,
        history=result.history,
        evaluations=result.evaluations,
        seconds=time.perf_counter() - t0,
        compile_seconds=result.compile_seconds,
        best_fitness=result.best_fitness,
        details=details,
    )


register_method(
    "ga_scores",
    ga_scores,
    "GA on per-weight scores, top-k |score| per layer (Pham Van et al. 2022), "
    "unstructured",
    structured=False,
)
