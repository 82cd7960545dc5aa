"""Least-squares repair layer after layer: each consumer, in graph order, is fit on
the inputs of the pruned network as repaired so far to the dense network's
pre-activations, so it also corrects the error of every layer before it (as
ThiNet, Luo et al., 2017, and He et al., 2017, reconstruct layer after layer).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..forward import with_unit_masks
from ..models import Consumer, Net, consumers
from ..zoo import Pretrained
from .in_search import Repair, with_layers
from .lstsq import design, refit


@functools.partial(jax.jit, static_argnums=(0, 3))
def tap_outputs(graphdef, state, x, names):
    """The outputs of nodes ``names``: compiled once per architecture (the dense
    and every masked or repaired network share it)."""
    return nnx.merge(graphdef, state)(x, taps=names)[1]


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def cross_grams(pruned, dense, node, c: Consumer, bias: bool):
    """``(X_p^T X_p, X_p^T X_d)`` of the consumer's design matrices."""
    xp, xd = design(pruned, node, c, bias), design(dense, node, c, bias)
    return xp.T @ xp, xp.T @ xd


def sequential_lstsq(
    pretrained: Pretrained,
    masks: Mapping,
    probes: jax.Array,
    *,
    ridge: float = 1e-2,
    prior: str = "merge",
    threshold: float = 0.0,
    batch_size: int = 128,
) -> Net:
    """``"lstsq"`` repair fit consumer after consumer, in graph order.

    Each consumer is fit on the inputs of the pruned network as repaired so far to
    the dense network's pre-activations: ``min ||X_p M W' - X_d W||^2 + lam ||M
    (W' - P)||^2`` with ``X_p`` the pruned and ``X_d`` the dense features on the
    probes. The parallel :class:`~gapruning.recover.in_search.Repair` fits every
    consumer to the dense inputs at once. ``ridge``, ``prior`` and ``threshold``
    as :class:`~gapruning.recover.in_search.Repair`. Returns the dense-shaped
    network."""
    net = pretrained.model
    masks = {g: jnp.asarray(np.asarray(m), jnp.float32) for g, m in masks.items()}
    by_name = {n.name: n for n in net.nodes}
    sizes = {g.name: g.size for g in pretrained.space.groups}
    merging = Repair(
        pretrained, "merge", ridge=ridge, threshold=threshold, prior=prior
    )  # validates the options
    priors = merging.layers(masks) if merging.prior == "merge" else {}
    taps = tuple(dict.fromkeys(c.tensor for c in consumers(net)))
    graphdef, dense_state = nnx.split(net)
    layers = {}
    for c in consumers(net):
        node = by_name[c.layer]
        bias = net.layers[c.layer].bias is not None
        _, state = nnx.split(with_unit_masks(with_layers(net, layers), masks))
        gram = cross = 0.0
        for i in range(0, len(probes), batch_size):
            x = probes[i : i + batch_size]
            pruned = tap_outputs(graphdef, state, x, taps)[c.tensor]
            dense = tap_outputs(graphdef, dense_state, x, taps)[c.tensor]
            g, gx = cross_grams(pruned, dense, node, c, bias)
            gram, cross = gram + g, cross + gx
        prior = priors[c.layer]["kernel"] if c.layer in priors else None
        layers[c.layer] = refit(
            net.layers[c.layer],
            c.channel_mask(masks),
            sizes[c.group] * c.unit,
            gram,
            ridge,
            prior,
            cross,
        )
    return with_layers(net, layers)
