"""The metric protocol, the registry, and what every metric shares.

A metric is a pure function ``fn(cache, pruned_apply, masks, probes) -> scalar``
for ONE individual (``masks``: group -> ``(units,)`` 0/1 array, or layer ->
kernel-shaped array for unstructured masks), lower is better; ``compose`` vmaps it
over the population. ``cache`` holds everything that does not depend on the mask
(the dense model's outputs on the probes, its interval bounds, its spectral
norms...), made once by the metric's ``prepare(pretrained, probes)``. A metric with
parameters declares them once, as a frozen dataclass whose fields carry the
defaults (its ``options``): ``prepare`` and ``fn`` then get one instance of it as
their last argument, ``prepare(pretrained, probes, opts)`` and
``fn(cache, pruned_apply, masks, probes, opts)``.
``pruned_apply`` is a :class:`PrunedApply`: ``pruned_apply(masks, x)`` gives the
masked network's outputs, ``pruned_apply.taps(masks, x, names)`` also returns
intermediate tensors, ``pruned_apply.net`` is the (dense) network. A metric that
taps tensors on the probes names them in ``taps`` when it registers: a composite
then computes every term's outputs and taps in one forward pass.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ..forward import (
    Plan,
    mask_kind,
    split_apply,
    with_kernel_masks,
    with_unit_masks,
)
from ..models import Net
from ..zoo import Pretrained


class FitnessError(ValueError):
    """A metric cannot be used as asked (unknown name, missing BatchNorm...)."""


class PrunedApply:
    """Forward passes of the network under one individual's masks.

    Args:
        net: the dense :class:`~gapruning.models.Net` (weights are shared, never
            copied per individual: masks act on activations).
        share: compute each forward pass (same masks, inputs and taps) once and
            hand the same result to every caller; :class:`Fitness` uses one such
            view per individual, so its terms never repeat a forward pass.
        shared_input: an input every individual of the population shares (the
            fitness's probes): passes on it (that very array) run
            :func:`~gapruning.forward.split_apply` as ``plan`` says, so their
            mask-free work is done once for the whole population.
        plan: a :class:`~gapruning.forward.Plan` (``None``: plain passes).
        shared_taps: with ``share``, the tensors the first pass on
            ``shared_input`` taps, whatever it is asked for: every later pass on
            it whose taps are among them is read from that one pass.
    """

    def __init__(
        self,
        net: Net,
        *,
        share: bool = False,
        shared_input: jax.Array | None = None,
        plan: Plan | None = None,
        shared_taps: tuple[str, ...] = (),
    ):
        self.net = net
        self._shared: dict | None = {} if share else None
        self._shared_input = shared_input
        self._plan = plan
        self._shared_taps = tuple(shared_taps)

    def _once(self, masks, x, names, compute):
        if self._shared is None:
            return compute()
        key = (id(masks), id(x), names)
        if key not in self._shared:
            # the entry holds masks and x, so their ids stay unique meanwhile
            self._shared[key] = (compute(), masks, x)
        return self._shared[key][0]

    def model(self, masks: Mapping) -> Net:
        """The network with ``masks`` applied (a view sharing the weights)."""
        if mask_kind(self.net, masks) == "units":
            return with_unit_masks(self.net, masks)
        return with_kernel_masks(self.net, masks)

    def _forward(self, masks, x, names) -> tuple[jax.Array, dict]:
        model = self.model(masks)
        split = (
            self._plan is not None
            and x is self._shared_input
            and mask_kind(self.net, masks) == "units"
        )
        if not split:
            out = model(x, taps=names)
        else:
            out = split_apply(
                model,
                x,
                taps=names,
                probe_chunk=self._plan.probe_chunk,
                per_channel=self._plan.per_channel,
            )
        return out if names else (out, {})

    def _pass(self, masks, x, names):
        """``(outputs, taps)``; the shared taps cover a request on the shared
        input when they include its taps."""
        asked = names
        shared = self._shared is not None and x is self._shared_input
        if shared and set(names) <= set(self._shared_taps):
            names = self._shared_taps
        out, tapped = self._once(
            masks, x, names, lambda: self._forward(masks, x, names)
        )
        return out, {t: tapped[t] for t in asked}

    def __call__(self, masks: Mapping, x: jax.Array) -> jax.Array:
        """Outputs ``(B, classes)`` of the masked network on ``x``."""
        return self._pass(masks, x, ())[0]

    def taps(self, masks: Mapping, x: jax.Array, names: tuple[str, ...]):
        """``(outputs, {name: tensor})`` of the masked network on ``x``."""
        return self._pass(masks, x, tuple(names))


@dataclasses.dataclass(frozen=True)
class Metric:
    """A registered metric.

    Attributes:
        name: registry key.
        fn: ``fn(cache, pruned_apply, masks, probes[, opts]) -> scalar``.
        prepare: ``prepare(pretrained, probes[, opts]) -> cache`` (mask-free work,
            done once when composing); ``None``: the cache is ``{}``.
        description: one line for ``gapruning list``.
        options: the metric's parameters, a frozen dataclass whose fields have
            defaults; ``prepare`` and ``fn`` receive one instance as ``opts``
            (``None``: the metric has no parameters and gets no ``opts``).
        needs_probes: whether the metric looks at probes at all.
        unit_masks_only: structured (group) masks only.
        degrades_with_pruning: ``True`` for quality metrics: 0 for the unpruned
            network (their minimum) and larger the more damage; ``False`` for
            costs, which fall as units are removed (1.0 for the unpruned network).
        taps: ``taps(net) -> names`` of the tensors ``fn`` taps on the probes
            (``pruned_apply.taps(masks, probes, names)``), so a composite computes
            them in the pass its terms share; ``None``: it taps none.
    """

    name: str
    fn: Callable[..., jax.Array]
    prepare: Callable[..., Any] | None
    description: str
    options: type | None = None
    needs_probes: bool = True
    unit_masks_only: bool = False
    degrades_with_pruning: bool = True
    taps: Callable[[Net], tuple[str, ...]] | None = None

    @property
    def defaults(self) -> dict[str, Any]:
        """Default parameters, from the fields of :attr:`options`."""
        if self.options is None:
            return {}
        return {f.name: f.default for f in dataclasses.fields(self.options)}

    def params(self, **overrides) -> dict:
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise FitnessError(
                f"metric {self.name!r} has no parameter(s) {unknown}; its "
                f"parameters are {sorted(self.defaults) or 'none'}"
            )
        return {**self.defaults, **overrides}

    def build(self, pretrained: Pretrained, probes, **overrides):
        """``(cache, fn4)``: the mask-free cache and the 4-argument metric."""
        params = self.params(**overrides)
        opts = () if self.options is None else (self.options(**params),)
        cache = {} if self.prepare is None else self.prepare(pretrained, probes, *opts)

        def fn4(cache, pruned_apply, masks, probes):
            return self.fn(cache, pruned_apply, masks, probes, *opts)

        return cache, fn4


METRICS: dict[str, Metric] = {}


def check_options(name: str, options: type) -> None:
    """Raises :class:`FitnessError` unless ``options`` is a frozen dataclass type
    whose every field has a default (a metric's parameters, see :class:`Metric`)."""
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise FitnessError(f"options of metric {name!r} must be a dataclass type")
    if not options.__dataclass_params__.frozen:
        raise FitnessError(f"options of metric {name!r} must be a frozen dataclass")
    missing = [
        f.name for f in dataclasses.fields(options) if f.default is dataclasses.MISSING
    ]
    if missing:
        raise FitnessError(
            f"options of metric {name!r} need a default for every field: {missing}"
        )


def register_metric(
    name: str,
    fn: Callable[..., jax.Array],
    prepare: Callable[..., Any] | None = None,
    *,
    description: str = "",
    options: type | None = None,
    needs_probes: bool = True,
    unit_masks_only: bool = False,
    degrades_with_pruning: bool = True,
    taps: Callable[[Net], tuple[str, ...]] | None = None,
    overwrite: bool = False,
    defaults: Mapping[str, Any] | None = None,
) -> Metric:
    """Adds a metric to :data:`METRICS` (see :class:`Metric` for the arguments).

    Raises:
        FitnessError: ``name`` is taken (unless ``overwrite``), or ``options`` is
            not a frozen dataclass whose every field has a default.

    Example:
        >>> def l2(cache, pruned_apply, masks, probes):
        ...     return jnp.mean((pruned_apply(masks, probes) - cache["dense"]) ** 2)
        >>> register_metric("l2", l2, lambda net, x: {"dense": net.model(x)},
        ...                 description="mean squared logit error")
    """
    if name in METRICS and not overwrite:
        raise FitnessError(f"metric {name!r} is already registered")
    if defaults is not None:
        fn, prepare, options = _from_defaults(name, fn, prepare, options, defaults)
    if options is not None:
        check_options(name, options)
    if not description:
        doc = (fn.__doc__ or "").strip()
        description = doc.splitlines()[0] if doc else name
    metric = Metric(
        name,
        fn,
        prepare,
        description,
        options,
        needs_probes,
        unit_masks_only,
        degrades_with_pruning,
        taps,
    )
    METRICS[name] = metric
    return metric


def _from_defaults(name, fn, prepare, options, defaults):
    """The deprecated ``defaults=`` form (keyword parameters of ``fn`` and
    ``prepare``) as an ``options`` dataclass with wrappers that unpack it."""
    warnings.warn(
        "register_metric(defaults=) is deprecated; declare options= as a frozen "
        "dataclass",
        DeprecationWarning,
        stacklevel=3,
    )
    if options is not None:
        raise FitnessError(f"metric {name!r}: give options= or defaults=, not both")
    fields = [(k, Any, dataclasses.field(default=v)) for k, v in defaults.items()]
    options = dataclasses.make_dataclass(f"{name}_options", fields, frozen=True)

    def unpacked(f):
        return lambda *args: f(*args[:-1], **dataclasses.asdict(args[-1]))

    return unpacked(fn), prepare and unpacked(prepare), options


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def dense_logits(pretrained: Pretrained, probes, batch_size: int = 1024):
    """The dense model's outputs on the probes (checked to be finite). Jitted once
    per architecture and batch shape, which is much faster than running op by op
    (docs/fitness.md)."""
    net = pretrained.model if isinstance(pretrained, Pretrained) else pretrained
    graphdef, state = nnx.split(net)
    out = jnp.concatenate(
        [
            _forward(graphdef, state, probes[i : i + batch_size])
            for i in range(0, len(probes), batch_size)
        ]
    )
    if not bool(jnp.all(jnp.isfinite(out))):
        raise FitnessError(
            "the dense model gives NaN/Inf outputs on the probes; check its "
            "weights and the probes' range"
        )
    return out
