"""Composing metrics into one population fitness ``fit(masks_batch) -> (P,)``.

``compose`` makes the probes, runs every metric's mask-free preparation once (dense
outputs, dense interval bounds, dense spectral norms...), and returns a
:class:`Fitness`: a pure, traceable function of the masks, vmapped over the
population, safe to call inside ``jax.jit`` and ``jax.lax.scan`` (no host
callbacks, no Python per individual). With ``s_i = 1``, or with ``normalize`` the
term's mean over random half-pruned masks, the total is

- ``combine="sum"``: ``sum_i w_i * m_i / s_i``;
- ``combine="log"``: ``sum_i w_i * symlog(m_i / (LOG_FLOOR * s_i))`` with
  ``symlog(z) = sign(z) * log(1 + |z|)``: each term counts by its relative change
  (a term halving is worth the same wherever it stands), is 0 where the term is
  0 and stays monotone for terms that can go negative;

an individual whose outputs on the probes or whose total is NaN/Inf scores
``+inf``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..encoding import Budget, UnitEncoding
from ..forward import Plan, auto_plan, map_chunks, mask_kind
from ..probes import batchnorm_nodes, make_probes, validate_probes
from ..space import MaskError
from ..zoo import Pretrained
from .base import METRICS, FitnessError, PrunedApply, dense_logits

# The composite ``gp.prune`` uses (``compose(net, "default")``: normalized, log
# combination): output agreement on probes (top-1, KL) and the layer-wise feature
# error track accuracy within a pruning level, the probe-free Lipschitz term
# separates pruning levels. How it was chosen, and how well it tracks real test
# accuracy: docs/fitness.md.
DEFAULT_SPEC: dict[str, Any] = {
    "fidelity_top1": 1.0,
    "fidelity": {"weight": 0.5, "temperature": 1.0},
    "fidelity_features": 1.0,
    "lipschitz": 0.5,
}
DEFAULT_COMBINE = "log"
COMBINES = ("sum", "log")
# ``combine="log"``: a term's change counts relative to this fraction of its scale
LOG_FLOOR = 0.01
# normalization: each term divided by its mean over this many random masks that
# remove CALIBRATION_TARGET of the units (drawn with the compose seed)
CALIBRATION_MASKS = 16
CALIBRATION_TARGET = 0.5
# Probes ``probes="auto"`` makes: BatchNorm statistics when the network has them.
DEFAULT_PROBES_BN = "bn_stats"
DEFAULT_PROBES_NO_BN = "inversion"


@dataclasses.dataclass(frozen=True)
class Term:
    """One weighted metric of a composite: ``label`` -> ``weight * metric(params)``."""

    label: str
    metric: str
    weight: float
    params: Mapping[str, Any]


def parse_spec(spec) -> tuple[Term, ...]:
    """Turns ``"default"``, a metric name, or ``{label: weight | {weight, metric,
    **params}}`` into terms. ``metric`` defaults to the label."""
    if isinstance(spec, str):
        spec = DEFAULT_SPEC if spec == "default" else {spec: 1.0}
    if not isinstance(spec, Mapping) or not spec:
        raise FitnessError(
            "fitness spec must be 'default', a metric name, or a non-empty dict "
            f"{{metric: weight}}; got {spec!r}"
        )
    terms = []
    for label, value in spec.items():
        if isinstance(value, Mapping):
            params = dict(value)
            weight = params.pop("weight", 1.0)
            metric = params.pop("metric", label)
        else:
            weight, metric, params = value, label, {}
        if metric not in METRICS:
            raise FitnessError(
                f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}"
            )
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise FitnessError(f"weight of {label!r} must be a number") from None
        if not np.isfinite(weight):
            raise FitnessError(f"weight of {label!r} must be finite, got {weight}")
        METRICS[metric].params(**params)  # unknown parameters fail here
        terms.append(Term(str(label), metric, weight, params))
    return tuple(terms)


def _needs_probes(term: Term) -> bool:
    m = METRICS[term.metric]
    return m.needs_probes or m.params(**term.params).get("region") == "probes"


class Fitness:
    """A composed population fitness (lower is better). Build with :func:`compose`.

    Attributes:
        pretrained: the dense model.
        probes: the probe set (model input space), or ``None`` if unused.
        probe_kind: how the probes were made ("gaussian", ..., "array", None).
        terms: the weighted metrics.
        combine: how weighted terms add up, ``"sum"`` or ``"log"`` (module doc).
    """

    def __init__(
        self,
        pretrained,
        terms,
        probes,
        probe_kind,
        chunk_size,
        normalize,
        seed,
        combine="sum",
    ):
        self.pretrained = pretrained
        self.terms = terms
        self.combine = combine
        self.probes = probes
        self.probe_kind = probe_kind
        self.chunk_size = chunk_size
        self.repair: Callable[[Mapping], Any] | None = None
        self._fns: list[tuple[Term, Any, Callable]] = []
        for term in terms:
            cache, fn = METRICS[term.metric].build(pretrained, probes, **term.params)
            self._fns.append((term, cache, fn))
        # every term's taps on the probes, computed in the one pass they share
        tapped = (METRICS[t.metric].taps for t in terms)
        self._shared_taps = tuple(
            dict.fromkeys(n for taps in tapped if taps for n in taps(pretrained.model))
        )
        self._batched_components = jax.jit(self._batch_components)
        self.scales = {t.label: 1.0 for t in terms}
        if normalize:
            self.scales = self._calibrate(seed)
        self._batched = jax.jit(self._batch)

    def with_repair(self, repair: Callable[[Mapping], Any]) -> Fitness:
        """A copy scoring each individual on ``repair(masks)`` (a network with
        compensated weights, see :class:`gapruning.recover.Repair`) instead of the
        dense network; probes, caches and normalization are shared."""
        new = copy.copy(self)
        new.repair = repair
        new._batched = jax.jit(new._batch)
        new._batched_components = jax.jit(new._batch_components)
        return new

    def _pruned_apply(self, masks, plan: Plan | None, probes) -> PrunedApply:
        """The forward passes of one individual; ``probes``: the probes as the
        metrics receive them (every individual shares them)."""
        if self.repair is not None:  # weights per individual: plain passes
            net, plan = self.repair(masks), None
        else:
            net = self.pretrained.model
        return PrunedApply(
            net,
            share=True,
            shared_input=probes,
            plan=plan,
            shared_taps=self._shared_taps,
        )

    def _calibrate(self, seed: int) -> dict[str, float]:
        """Mean of each term over random masks removing half the units."""
        space = self.pretrained.space
        if not space.groups:
            raise FitnessError("normalize needs a network with prunable groups")
        enc = UnitEncoding(space, Budget("units", CALIBRATION_TARGET))
        key = jax.random.fold_in(jax.random.key(seed), 0x5CA1E)
        genomes = jax.random.normal(key, (CALIBRATION_MASKS, enc.num_genes))
        masks = jax.vmap(enc.decode)(genomes)
        values = self._batched_components(self._prepare_masks(masks))
        scales = {}
        for label, v in values.items():
            v = np.asarray(v, np.float64)
            mean = float(np.mean(v[np.isfinite(v)])) if np.isfinite(v).any() else 0
            scales[label] = mean if mean > 0 else 1.0
        return scales

    # -------------------------------------------------------------- one individual

    def _consts(self):
        """Probes and caches behind an optimization barrier: inside ``jit`` they
        are constants, and XLA would otherwise spend a long time constant-folding
        the mask-free part of the forward passes (docs/fitness.md)."""
        return jax.lax.optimization_barrier(
            (self.probes, [cache for _, cache, _ in self._fns])
        )

    def _values(self, masks, apply: PrunedApply, consts) -> dict[str, jax.Array]:
        probes, caches = consts
        return {
            term.label: jnp.asarray(fn(cache, apply, masks, probes))
            for (term, _, fn), cache in zip(self._fns, caches, strict=True)
        }

    def _components(self, masks, plan: Plan | None = None) -> dict[str, jax.Array]:
        consts = self._consts()
        apply = self._pruned_apply(masks, plan, consts[0])
        return self._values(masks, apply, consts)

    def _term(self, value: jax.Array, scale: float) -> jax.Array:
        """One term's contribution before its weight (see the module doc)."""
        if self.combine == "sum":
            return value / scale
        z = value / (LOG_FLOOR * scale)
        return jnp.sign(z) * jnp.log1p(jnp.abs(z))

    def single(self, masks: Mapping, plan: Plan | None = None) -> jax.Array:
        """The fitness of one individual (masks without a population axis);
        ``plan``: how the population it is vmapped over is batched."""
        # the terms and the finiteness check share each forward pass (XLA's CSE
        # did not merge them inside the engine's scan)
        consts = self._consts()
        apply = self._pruned_apply(masks, plan, consts[0])
        values = self._values(masks, apply, consts)
        total = sum(
            (
                term.weight * self._term(values[term.label], self.scales[term.label])
                for term, _, _ in self._fns
                if term.weight != 0
            ),
            jnp.zeros((), jnp.float32),
        )
        ok = jnp.isfinite(total)
        if self.probes is not None:
            ok &= jnp.all(jnp.isfinite(apply(masks, consts[0])))
        return jnp.where(ok, total, jnp.inf)

    # -------------------------------------------------------------- population

    def _prepare_masks(self, masks: Mapping) -> dict:
        if not isinstance(masks, Mapping):
            raise MaskError(f"masks must be a dict of arrays, got {type(masks)}")
        kind = mask_kind(self.pretrained.model, masks)
        if kind == "units":
            self.pretrained.space.validate(masks, allow_empty=True, population=True)
        else:
            only = [t.metric for t in self.terms if METRICS[t.metric].unit_masks_only]
            if only:
                raise FitnessError(
                    f"metric(s) {only} need structured (group) masks, not kernel masks"
                )
            for name, m in masks.items():
                want = tuple(self.pretrained.model.layers[name].kernel[...].shape)
                if tuple(jnp.shape(m)[1:]) != want:
                    raise MaskError(
                        f"kernel mask {name!r} has shape {jnp.shape(m)}, "
                        f"expected (P, {', '.join(map(str, want))})"
                    )
        sizes = {int(jnp.shape(m)[0]) for m in masks.values()}
        if len(sizes) != 1:
            raise MaskError(f"mask leaves disagree on the population size: {sizes}")
        return {k: jnp.asarray(v).astype(jnp.float32) for k, v in masks.items()}

    def _plan(self, masks) -> Plan:
        p = next(iter(masks.values())).shape[0]
        batch = 1 if self.probes is None else len(self.probes)
        kernel_masks = mask_kind(self.pretrained.model, masks) == "weights"
        return auto_plan(
            self.pretrained,
            p,
            batch,
            chunk_size=self.chunk_size,
            kernel_masks=kernel_masks,
        )

    def _map(self, fn, masks):
        plan = self._plan(masks)
        return map_chunks(jax.vmap(lambda m: fn(m, plan)), masks, plan.individuals)

    def _batch(self, masks):
        return self._map(self.single, masks)

    def _batch_components(self, masks):
        return self._map(self._components, masks)

    def __call__(self, masks_batch: Mapping) -> jax.Array:
        """Fitness ``(P,)`` of a population (every mask leaf has a leading ``P``)."""
        return self._batched(self._prepare_masks(masks_batch))

    def components(self, masks_batch: Mapping) -> dict[str, jax.Array]:
        """Each term's raw value (unweighted, not normalized), ``{label: (P,)}``."""
        return self._batched_components(self._prepare_masks(masks_batch))

    def spec(self) -> dict:
        """The ``compose`` spec of these terms (``{label: {weight, metric,
        **params}}``), to build the same fitness on another network."""
        return {
            t.label: {"weight": t.weight, "metric": t.metric, **dict(t.params)}
            for t in self.terms
        }

    def describe(self) -> dict:
        """The terms, weights, parameters and probes of this fitness."""
        return {
            "terms": [
                {
                    "label": t.label,
                    "metric": t.metric,
                    "weight": t.weight,
                    "params": METRICS[t.metric].params(**t.params),
                    "scale": self.scales[t.label],
                }
                for t in self.terms
            ],
            "combine": self.combine,
            "probes": self.probe_kind,
            "num_probes": None if self.probes is None else int(len(self.probes)),
        }

    def __repr__(self) -> str:
        inner = " + ".join(f"{t.weight:g}*{t.label}" for t in self.terms)
        return f"Fitness({self.combine}: {inner}; probes={self.probe_kind})"


def cast_pretrained(net: Pretrained, dtype) -> Pretrained:
    """A copy of ``net`` whose floating-point variables (weights, BatchNorm
    statistics, masks) are ``dtype``."""
    from flax import nnx

    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise FitnessError(f"unknown dtype {dtype!r}") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise FitnessError(f"dtype must be a floating-point type, got {dtype}")
    graphdef, state = nnx.split(net.model)
    state = jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
        state,
    )
    return Pretrained(nnx.merge(graphdef, state), dict(net.card))


def compose(
    net: Pretrained,
    spec="default",
    *,
    probes="auto",
    num_probes: int = 512,
    seed: int = 0,
    probe_options: Mapping[str, Any] | None = None,
    chunk_size: int | str | None = "auto",
    normalize: bool | None = None,
    combine: str | None = None,
    dtype=None,
) -> Fitness:
    """Builds a population fitness from weighted metrics.

    Args:
        net: the dense pretrained model.
        spec: ``"default"`` (:data:`DEFAULT_SPEC`), a metric name, or
            ``{label: weight}`` / ``{label: {"weight": w, "metric": name,
            **params}}`` over :data:`~gapruning.fitness.METRICS`.
        probes: a probe kind (``"gaussian"``, ``"uniform"``, ``"bn_stats"``,
            ``"inversion"``), ``"auto"`` (``bn_stats`` with BatchNorm, else
            ``inversion``), or an array of unlabeled model inputs.
        num_probes: number of probes to make.
        seed: probe randomness.
        probe_options: extra keyword arguments of :func:`~gapruning.make_probes`.
        chunk_size: evaluate the population this many individuals at a time
            (``jax.lax.map`` over chunks, ``vmap`` inside); ``"auto"``: the
            largest divisor of the population within the activation budget
            (:func:`~gapruning.forward.auto_chunk_size`); ``None``: all at once.
        normalize: divide each term by its mean over random half-pruned masks
            (``CALIBRATION_MASKS`` of them, drawn from ``seed``; mask-free, done
            once), so weights compare terms of different units. Default: on for
            ``"default"``, off otherwise.
        combine: ``"sum"`` of the weighted (normalized) terms, or ``"log"``: the
            weighted sum of their symmetric logs, so each term counts by its
            relative change (module doc). Default: :data:`DEFAULT_COMBINE` for
            ``"default"``, ``"sum"`` otherwise.
        dtype: evaluate in this dtype (e.g. ``"bfloat16"``): the probes are made
            in float32, then probes, weights and statistics are cast; the total is
            float32. ``fit.pretrained`` is then the cast copy. ``None``: as is.

    Returns:
        A :class:`Fitness`; ``fit(masks_batch)`` gives ``(P,)``, lower is better.

    Example:
        >>> fit = compose(gp.load("lenet300-fmnist"), {"fidelity": 1.0,
        ...               "robustness": 0.5}, probes="gaussian", num_probes=256)
        >>> fit({g: jnp.ones((4, s)) for g, s in zip(
        ...     fit.pretrained.space.group_names, fit.pretrained.space.sizes)})
        Array([0., 0., 0., 0.], dtype=float32)
    """
    if not isinstance(net, Pretrained):
        raise TypeError(f"compose needs a gapruning Pretrained, got {type(net)}")
    terms = parse_spec(spec)
    if any(t.metric == "bn_drift" for t in terms) and not batchnorm_nodes(net):
        raise FitnessError(
            f"metric 'bn_drift' needs BatchNorm layers; {net.name} has none"
        )
    if combine not in (None, *COMBINES):
        raise FitnessError(f"combine must be one of {COMBINES}, got {combine!r}")
    if chunk_size not in (None, "auto") and int(chunk_size) < 1:
        raise FitnessError(f"chunk_size must be positive, got {chunk_size}")
    x, kind = None, None
    if any(_needs_probes(t) for t in terms):
        if isinstance(probes, str):
            kind = probes
            if probes == "auto":
                kind = (
                    DEFAULT_PROBES_BN if batchnorm_nodes(net) else DEFAULT_PROBES_NO_BN
                )
            x = make_probes(net, kind, num_probes, seed, **dict(probe_options or {}))
        else:
            x, kind = validate_probes(net, probes), "array"
    if dtype is not None and str(dtype) != "float32":
        net = cast_pretrained(net, dtype)
        x = None if x is None else jnp.asarray(x, jnp.dtype(dtype))
    if x is not None:
        dense_logits(net, x)  # fails early on a dense model giving NaN/Inf
    is_default = isinstance(spec, str) and spec == "default"
    if normalize is None:
        normalize = is_default
    if combine is None:
        combine = DEFAULT_COMBINE if is_default else "sum"
    chunk = chunk_size if chunk_size in (None, "auto") else int(chunk_size)
    return Fitness(
        net, terms, x, kind, chunk, bool(normalize), int(seed), combine=combine
    )
