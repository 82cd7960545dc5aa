"""Forward passes with masks: one individual, or a whole population at once.

Structured masks (group name -> units) act on activations: the weights stay
unbatched and shared, the one-individual pass is vmapped over the population (a
batched activation is folded into the batch axis of each layer, a mask on a tensor
every individual shares is folded into stacked kernels; see
:mod:`~gapruning.models.masked_layers`). On an input the population shares (the
fitness's probes), :func:`split_apply` computes the mask-free nodes once (and the
per-input-channel parts of convolutions whose masked input is shared), then the
mask-dependent nodes on tiles of probes small enough to stay in cache.
Unstructured masks (layer name -> kernel-shaped) mask the kernels of each
individual. Either way the population runs in chunks of individuals
(``jax.lax.map``) sized so memory stays bounded; :func:`auto_plan` picks the
chunks and tiles.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .models import Mask, Net
from .models.graph import mask_read
from .models.masked_layers import conv_op, per_channel_parts, per_channel_population
from .models.ops import op_of
from .space import MaskError
from .zoo import Pretrained


def _net(model: Pretrained | Net) -> Net:
    return model.model if isinstance(model, Pretrained) else model


def mask_kind(model: Pretrained | Net, masks: Mapping) -> str:
    """ "units" when ``masks`` are keyed by prunable group, "weights" when keyed by
    Dense/Conv layer (kernel masks)."""
    net = _net(model)
    keys = set(masks)
    if keys == set(net.masks):
        return "units"
    ops = {n.name: n.op for n in net.nodes}
    if keys and all(ops.get(k) in ("dense", "conv") for k in keys):
        return "weights"
    raise MaskError(
        f"mask names {sorted(keys)} are neither the prunable groups "
        f"{sorted(net.masks)} nor Dense/Conv layer names"
    )


def with_unit_masks(net: Net, masks: Mapping) -> Net:
    graphdef, params, _, rest = nnx.split(net, nnx.Param, Mask, ...)
    mask_state = nnx.State(
        {"masks": {g: Mask(jnp.asarray(m, jnp.float32)) for g, m in masks.items()}}
    )
    return nnx.merge(graphdef, params, mask_state, rest)


def with_kernel_masks(net: Net, masks: Mapping) -> Net:
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    for name, m in masks.items():
        kernel = pure["layers"][name]["kernel"]
        pure["layers"][name]["kernel"] = kernel * jnp.asarray(m, kernel.dtype)
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params, rest)


def masked_apply(model: Pretrained | Net, masks: Mapping, x: jax.Array) -> jax.Array:
    """Outputs of ``model`` on ``x`` with one individual's ``masks`` applied
    (nothing is removed). ``x`` has shape ``(B, *input_shape)``; returns ``(B, out)``.
    """
    net = _net(model)
    if mask_kind(net, masks) == "units":
        return with_unit_masks(net, masks)(x)
    return with_kernel_masks(net, masks)(x)


# Largest population-batched activation (bytes) one chunk of individuals may
# produce. On CPUs the elementwise work between layers is memory bound and wants
# chunks that stay near the caches: resnet20 with 64 probes ran fastest one or two
# individuals at a time (3-6 MB), LeNet-300-100 with 512 probes fastest with 64 at
# once (13 MB); accelerators want big batches and are only bounded by memory.
ACTIVATION_BUDGET_BYTES = {"cpu": 16 * 2**20}
ACCELERATOR_ACTIVATION_BUDGET_BYTES = 2 * 2**30


def activation_budget() -> int:
    """:data:`ACTIVATION_BUDGET_BYTES` for the default backend."""
    return ACTIVATION_BUDGET_BYTES.get(
        jax.default_backend(), ACCELERATOR_ACTIVATION_BUDGET_BYTES
    )


def _batched_nodes(net: Net, kernel_masks: bool) -> set[str]:
    """Names of the nodes computed per individual: Dense/Conv layers reading a mask
    (with ``kernel_masks``: every Dense/Conv layer), any other node reading a mask,
    and everything downstream (a unit mask on a shared tensor is folded into the
    kernel, never materialized)."""
    by_name = {n.name: n for n in net.nodes}
    batched: set[str] = set()
    for n in net.nodes:
        if n.op in ("dense", "conv"):
            own = kernel_masks or mask_read(n, by_name) is not None
        else:
            own = n.op not in ("mask", "flatten") and (
                op_of(n).uses_masks or any(by_name[i].op == "mask" for i in n.inputs)
            )
        if own or batched & set(net.reads(n, by_name)):
            batched.add(n.name)
    return batched


def per_channel_nodes(model: Pretrained | Net, individuals: int) -> tuple[str, ...]:
    """The convolutions reading a masked input that every individual shares whose
    per-input-channel parts :func:`split_apply` computes once for a chunk of
    ``individuals`` (at least their input channels: see
    :func:`~gapruning.models.masked_layers.per_channel_population`)."""
    net = _net(model)
    batched = _batched_nodes(net, False)
    by_name = {n.name: n for n in net.nodes}
    picked = []
    for n in net.nodes:
        if n.op != "conv" or mask_read(n, by_name) is None:
            continue
        (src,) = net.reads(n, by_name)
        fewest = per_channel_population(
            conv_op(n.attr("strides"), n.attr("padding")),
            net.layers[n.name].kernel[...].shape,
        )
        if src not in batched and fewest is not None and fewest <= individuals:
            picked.append(n.name)
    return tuple(picked)


def split_apply(
    net: Net,
    x: jax.Array,
    *,
    taps: tuple[str, ...] = (),
    probe_chunk: int | None = None,
    per_channel: tuple[str, ...] = (),
):
    """One individual's masked forward pass (``net`` carries its masks) on an input
    the whole population shares, in two phases: the mask-free nodes on all of
    ``x`` (vmapped over individuals they stay unbatched: computed once, and inside
    a search XLA hoists them out of the generation loop), with the per-channel
    parts of the convolutions named in ``per_channel``; then the mask-dependent
    nodes ``probe_chunk`` inputs at a time (``jax.lax.map``), so a population's
    intermediates stay cache-sized. Same values as ``net(x, taps=taps)``.
    """
    by_name = {n.name: n for n in net.nodes}
    batched = _batched_nodes(net, False)
    boundary = {
        r for n in net.nodes if n.name in batched for r in net.reads(n, by_name)
    } - batched
    early = tuple(t for t in taps if t not in batched)
    shared = net.values(x, (*boundary, *early))
    given = {k: shared[k] for k in boundary}
    parts = {}
    for name in per_channel:
        n = by_name[name]
        (src,) = net.reads(n, by_name)
        op = conv_op(n.attr("strides"), n.attr("padding"))
        parts[name] = per_channel_parts(op, given[src], net.layers[name].kernel[...])
    late = tuple(t for t in taps if t in batched)

    last = net.nodes[-1].name

    def run(args):
        xs, gs, ps = args
        vals = net.values(xs, (last, *late), gs, ps)
        return vals[last], {t: vals[t] for t in late}

    out, tapped = map_chunks(
        run, (x, given, parts), probe_chunk or x.shape[0], what="probe count"
    )
    if not taps:
        return out
    return out, {t: tapped[t] if t in tapped else shared[t] for t in taps}


def population_footprint(
    model: Pretrained | Net, batch: int, kernel_masks: bool = False
) -> int:
    """Bytes per individual of the largest tensor that carries the population axis
    (see :func:`_batched_nodes`)."""
    net = _net(model)
    batched = _batched_nodes(net, kernel_masks)
    largest = max(
        (math.prod(n.shape) for n in net.nodes if n.name in batched), default=1
    )
    return batch * 4 * largest


def per_channel_chunk(model: Pretrained | Net, kernel_masks: bool = False) -> int:
    """Individuals a chunk needs so that the convolutions reading a masked shared
    input take the per-channel route of
    :func:`~gapruning.models.masked_layers.masked_contraction` (the largest
    :func:`~gapruning.models.masked_layers.per_channel_population`), when those
    convolutions carry at least half of the per-individual multiply-adds; else 1
    (then the per-channel route does not pay for the larger chunk, and the
    activation budget decides)."""
    if kernel_masks:
        return 1
    net = _net(model)
    batched = _batched_nodes(net, kernel_masks)
    by_name = {n.name: n for n in net.nodes}
    macs, shared_macs, chunk = 0, 0, 1
    for n in net.nodes:
        if n.op not in ("dense", "conv") or n.name not in batched:
            continue
        kernel = net.layers[n.name].kernel[...].shape
        work = math.prod(n.shape) * math.prod(kernel[:-1])
        macs += work
        mask = mask_read(n, by_name)
        if mask is None or mask.inputs[0] in batched or n.op != "conv":
            continue
        fewest = per_channel_population(
            conv_op(n.attr("strides"), n.attr("padding")), kernel
        )
        if fewest is not None:
            shared_macs += work
            chunk = max(chunk, fewest)
    return chunk if 2 * shared_macs >= macs else 1


def auto_chunk_size(
    model: Pretrained | Net,
    population: int,
    batch: int,
    budget: int | None = None,
    kernel_masks: bool = False,
) -> int:
    """The largest divisor of ``population`` whose batched activations stay within
    ``budget`` bytes (default :func:`activation_budget`), raised to the smallest
    divisor of at least :func:`per_channel_chunk` individuals."""
    budget = activation_budget() if budget is None else budget
    footprint = population_footprint(model, batch, kernel_masks)
    chunk = _largest_divisor(population, budget // max(footprint, 1))
    floor = per_channel_chunk(model, kernel_masks)
    return max(chunk, _smallest_divisor(population, floor))


def _largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (at least 1)."""
    return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(limit, 1))


def _smallest_divisor(n: int, floor: int) -> int:
    """The smallest divisor of ``n`` not below ``floor`` (``n`` at most)."""
    return min(d for d in range(1, n + 1) if n % d == 0 and d >= min(floor, n))


# Largest population-batched tensor (bytes) of one probe chunk when per-channel
# parts carry the work (see :func:`auto_plan`): the mix, ReLU, pooling and the next
# layer then run on a cache-sized tile. LeNet-5, P=64, 512 probes, 2 CPU cores:
# tiles of 8 probes (3.3 MB) were the fastest, 16 (6.6 MB) and 4 slower.
PROBE_TILE_BYTES = {"cpu": 4 * 2**20}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a population's forward pass on a shared input is batched.

    Attributes:
        individuals: individuals evaluated together (one ``jax.lax.map`` step).
        probe_chunk: inputs per step of :func:`split_apply` (``None``: all).
        per_channel: convolutions whose per-channel parts are computed once.
    """

    individuals: int
    probe_chunk: int | None = None
    per_channel: tuple[str, ...] = ()


def auto_plan(
    model: Pretrained | Net,
    population: int,
    batch: int,
    *,
    chunk_size: int | str | None = "auto",
    kernel_masks: bool = False,
) -> Plan:
    """The :class:`Plan` for ``population`` individuals on ``batch`` inputs.

    ``chunk_size`` fixes the individuals per step (``None``: all). With
    ``"auto"``, a network whose work is dominated by convolutions reading a
    masked shared input (:func:`per_channel_chunk`) runs the whole population at
    once on tiles of probes within :data:`PROBE_TILE_BYTES`; any other takes
    :func:`auto_chunk_size` individuals and all probes at once.
    """
    if chunk_size == "auto":
        floor = per_channel_chunk(model, kernel_masks)
        if floor > 1:
            tile = PROBE_TILE_BYTES.get(jax.default_backend(), activation_budget())
            per_probe = population_footprint(model, 1)
            # the whole population, unless even one probe of it overflows the tile
            individuals = max(
                _largest_divisor(population, tile // per_probe),
                _smallest_divisor(population, floor),
            )
            probe_chunk = _largest_divisor(batch, tile // (individuals * per_probe))
        else:
            individuals = auto_chunk_size(
                model, population, batch, kernel_masks=kernel_masks
            )
            probe_chunk = None
    else:
        individuals, probe_chunk = chunk_size or population, None
    if kernel_masks:
        return Plan(individuals)
    return Plan(individuals, probe_chunk, per_channel_nodes(model, individuals))


def population_apply(
    model: Pretrained | Net,
    masks: Mapping,
    x: jax.Array,
    *,
    chunk_size: int | str | None = "auto",
) -> jax.Array:
    """Outputs ``(P, B, out)`` for a population of masks (every leaf has a leading
    population axis ``P``).

    Args:
        chunk_size: evaluate this many individuals at a time (``jax.lax.map``) to
            bound memory; ``"auto"`` picks it, and for structured masks how the
            probes are tiled, from the activation sizes (see :func:`auto_plan`);
            ``None`` evaluates all at once (structured masks) or in chunks of up
            to 8 (unstructured kernel masks).
    """
    net = _net(model)
    kind = mask_kind(net, masks)
    pop = {int(jnp.shape(m)[0]) for m in masks.values()}
    if len(pop) != 1:
        raise MaskError(f"mask leaves disagree on the population size: {sorted(pop)}")
    (p,) = pop
    if kind == "units":
        plan = auto_plan(net, p, x.shape[0], chunk_size=chunk_size)

        def one(m):
            return split_apply(
                with_unit_masks(net, m),
                x,
                probe_chunk=plan.probe_chunk,
                per_channel=plan.per_channel,
            )
    else:
        if chunk_size == "auto":
            chunk_size = auto_chunk_size(net, p, x.shape[0], kernel_masks=True)
        plan = Plan(chunk_size or min(p, 8))

        def one(m):
            return with_kernel_masks(net, m)(x)

    return map_chunks(jax.vmap(one), dict(masks), plan.individuals)


def map_chunks(fn, tree, size: int, what: str = "population"):
    """``fn`` on ``size`` entries at a time of the leading axis every leaf of
    ``tree`` shares (``jax.lax.map``), the outputs joined back along it; ``fn``
    on all of them when ``size`` covers the axis."""
    n = int(jnp.shape(jax.tree.leaves(tree)[0])[0])
    if size >= n:
        return fn(tree)
    if n % size:
        raise MaskError(f"{what} {n} is not a multiple of chunk_size {size}")
    chunks = jax.tree.map(lambda v: v.reshape(n // size, size, *v.shape[1:]), tree)
    out = jax.lax.map(fn, chunks)
    return jax.tree.map(lambda v: v.reshape(n, *v.shape[2:]), out)
