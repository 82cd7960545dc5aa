"""Neuron Merging (Kim et al., NeurIPS 2020): the ``"merge"`` repair method.

Each removed unit ``j`` is matched with the kept unit ``i`` of the same group whose
incoming weights and bias are the most cosine-similar, and the consumer's rows get
``W[i] += s * W[j]`` with ``s = ||v_j|| / ||v_i||``. With a positively homogeneous
activation (ReLU, max/avg pooling) and ``v_j = s * v_i`` this is exact. A
BatchNorm right after the producer is folded into the incoming vector (``v = a *
[w, b - mean] + [0, beta]`` with ``a = gamma / sqrt(var + eps)``), so units are
merged in the post-BatchNorm space, where the activation acts, and merging stays
exact there. Differences from the paper: units are matched on the dense network's
incoming weights (not layer after layer on already merged ones), and a removed
unit whose best cosine is below ``threshold`` is simply dropped. Groups coupled by
a residual addition are left alone: a residual channel is a sum of branches, not
one affine map of one input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..models import Net
from ..space import PruneSpace


def incoming(net: Net, group) -> jax.Array | None:
    """``(units, fan_in + 1)`` incoming weights and bias of a single-producer
    group, in the post-BatchNorm space when a BatchNorm follows the producer;
    ``None`` for coupled groups."""
    if len(group.members) != 1:
        return None
    (name,) = group.members
    layer = net.layers[name]
    kernel = layer.kernel[...]
    w = kernel.reshape(-1, kernel.shape[-1]).T.astype(jnp.float32)
    b = (
        jnp.zeros(w.shape[0], jnp.float32)
        if layer.bias is None
        else layer.bias[...].astype(jnp.float32)
    )
    bn = next(
        (n for n in net.nodes if n.op == "batchnorm" and n.inputs[0] == name), None
    )  # BatchNorm (or an affine map) directly after the producer
    if bn is not None:
        p = net.layers[bn.name]
        a = p.scale[...] / jnp.sqrt(p.var[...] + bn.attr("epsilon"))
        w = w * a[:, None]
        b = a * (b - p.mean[...]) + p.bias[...]
    return jnp.concatenate([w, b[:, None]], axis=1)


def similarities(net: Net, space: PruneSpace) -> dict[str, tuple]:
    """``{group: (cosine similarities (units, units), norms (units,))}`` of the
    incoming vectors of every single-producer group (the mask-free part)."""
    out = {}
    for g in space.groups:
        v = incoming(net, g)
        if v is None:
            continue
        norms = jnp.linalg.norm(v, axis=1)
        unit = v / jnp.maximum(norms, 1e-12)[:, None]
        out[g.name] = (unit @ unit.T, norms)
    return out


def merge_matrix(sim, norms, mask, threshold: float = 0.0) -> jax.Array:
    """The ``(units, units)`` matrix ``Z`` of Neuron Merging for one group.

    The consumer's rows become ``Z @ W``. ``Z = I + sum_j s_j e_{i(j)} e_j^T`` over
    removed units ``j`` whose most similar kept unit ``i(j)`` has cosine above
    ``threshold``, ``s_j = norms[j] / norms[i(j)]``. Traceable (``vmap``-able over
    ``mask``)."""
    kept = mask > 0
    masked = jnp.where(kept[None, :], sim, -jnp.inf)
    best = jnp.argmax(masked, axis=1)
    cos = jnp.take_along_axis(sim, best[:, None], axis=1)[:, 0]
    scale = norms / jnp.maximum(norms[best], 1e-12)
    weight = jnp.where(~kept & (cos > threshold) & kept.any(), scale, 0.0)
    n = mask.shape[-1]
    return (
        jnp.eye(n, dtype=sim.dtype)
        + jax.nn.one_hot(best, n, dtype=sim.dtype).T * (weight[None, :])
    )


def merged_kernel(kernel, sim, norms, mask, units: int, threshold: float):
    """A consumer ``kernel`` with its rows merged by :func:`merge_matrix`: the
    rows of unit ``i`` at every position become ``sum_j Z[i, j] W[j]``."""
    z = merge_matrix(sim, norms, mask, threshold)
    rows = kernel.reshape(*kernel.shape[:-2], -1, units, kernel.shape[-1])
    rows = jnp.einsum("ij,...jo->...io", z, rows)
    return rows.reshape(kernel.shape).astype(kernel.dtype)
