"""Forward passes with masks: one individual, or a whole population at once.

Structured masks (group name -> units) act on activations: the weights stay
unbatched and shared, the population is folded into the batch axis, and everything
before the first masked layer is computed once for the whole population (see
:class:`~gapruning.models.Net`). Unstructured masks (layer name -> kernel-shaped)
mask the kernels of each individual; they are evaluated in chunks of individuals
(``jax.lax.map``) so memory stays bounded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from .models import Mask, Net
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


def _with_unit_masks(net: Net, masks: Mapping) -> Net:
    graphdef, params, _, rest = nnx.split(net, nnx.Param, Mask, ...)
    mask_state = nnx.State(
        {"masks": {g: Mask(jnp.asarray(m, jnp.float32)) for g, m in masks.items()}}
    )
    return nnx.merge(graphdef, params, mask_state, rest)


def _with_kernel_masks(net: Net, masks: Mapping) -> Net:
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
        return _with_unit_masks(net, masks)(x)
    return _with_kernel_masks(net, masks)(x)


# Largest folded activation (bytes) one chunk of the population may produce. On
# CPUs, folding many individuals into one huge convolution batch is memory bound:
# measured on resnet20 with 512 probes, P=8 folded at once took 8.2 s, in chunks
# of one individual 3.1 s (benchmarks/results/population_forward.md).
ACTIVATION_BUDGET_BYTES = 32 * 2**20


def auto_chunk_size(model: Pretrained | Net, population: int, batch: int) -> int:
    """The largest divisor of ``population`` whose folded activations stay within
    :data:`ACTIVATION_BUDGET_BYTES`."""
    net = _net(model)
    first_mask = next((i for i, n in enumerate(net.nodes) if n.op == "mask"), 0)
    folded = net.nodes[first_mask:]  # the nodes that carry the population axis
    per_individual = batch * 4 * max(math.prod(n.shape) for n in folded)
    limit = max(1, ACTIVATION_BUDGET_BYTES // max(per_individual, 1))
    return max(
        d for d in range(1, population + 1) if population % d == 0 and d <= limit
    )


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
            bound memory; ``"auto"`` picks it from the activation sizes (see
            :func:`auto_chunk_size`); ``None`` evaluates all at once (structured
            masks) or in chunks of up to 8 (unstructured kernel masks).
    """
    net = _net(model)
    kind = mask_kind(net, masks)
    pop = {int(jnp.shape(m)[0]) for m in masks.values()}
    if len(pop) != 1:
        raise MaskError(f"mask leaves disagree on the population size: {sorted(pop)}")
    (p,) = pop
    if chunk_size == "auto":
        chunk_size = auto_chunk_size(net, p, x.shape[0])
    if kind == "units":

        def run(chunk):
            return _with_unit_masks(net, chunk)(x)
    else:
        chunk_size = chunk_size or min(p, 8)

        def run(chunk):
            return jax.vmap(lambda m: _with_kernel_masks(net, m)(x))(chunk)

    if chunk_size is None or chunk_size >= p:
        return run(masks)
    if p % chunk_size:
        raise MaskError(f"population {p} is not a multiple of chunk_size {chunk_size}")
    chunks = jax.tree.map(
        lambda m: m.reshape(p // chunk_size, chunk_size, *m.shape[1:]), dict(masks)
    )
    out = jax.lax.map(run, chunks)
    return out.reshape(p, *out.shape[2:])
