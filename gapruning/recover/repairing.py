"""Repair of one network for one set of masks, before compaction: the removed
units' contribution is folded into the consumer layers (Neuron Merging, or least
squares on probes), the network keeps its dense shape, and ``gp.compact(repaired,
masks)`` then removes the units.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

from ..zoo import Pretrained
from .in_search import Repair
from .lstsq import lstsq_probes
from .sequential import sequential_lstsq
from .validate import CARD_NAMES, repair_method, require_pretrained


def repair(
    pretrained: Pretrained,
    masks: Mapping,
    probes=None,
    method: str = "merge",
    *,
    sequential: bool = True,
    **options,
) -> Pretrained:
    """Repair of ``pretrained`` for ``masks`` (see :mod:`gapruning.recover`).

    Args:
        pretrained: the dense network.
        masks: group -> kept units (bool or 0/1), as for ``gp.compact``.
        probes: ``"lstsq"`` only: an array of model inputs or a probe kind
            (default ``bn_stats`` with BatchNorm, else ``gaussian``).
        method: ``"merge"`` (Neuron Merging, Kim et al., 2020) or ``"lstsq"``
            (ridge re-fit of the consumers on probes); ``"cosine"``: deprecated
            name of ``"merge"``.
        sequential: ``"lstsq"`` only: fit the consumers one after another on
            the repaired pruned network's inputs (:func:`sequential_lstsq`);
            ``False``: all at once on the dense inputs, as :class:`Repair` does
            inside the fitness.
        **options: ``num_probes``, ``seed``, ``ridge``, ``threshold``, ``prior`` of
            :class:`Repair`.

    Returns:
        A dense-shaped :class:`Pretrained` with the consumer layers' weights
        repaired: ``gp.masked_apply(repaired, masks, x)`` is the repaired pruned
        network, ``gp.compact(repaired, masks)`` its compact form. Its card
        records the repair (``"cosine"`` names Neuron Merging there).

    Example:
        >>> net = gp.load("lenet300-fmnist")
        >>> masks = gp.prune(net, strategy="l1", target=0.5).masks
        >>> small = gp.compact(gp.recover.repair(net, masks), masks)
    """
    pretrained = require_pretrained(pretrained)
    pretrained.space.validate(masks)
    masks = {g: jnp.asarray(np.asarray(m), jnp.float32) for g, m in masks.items()}
    method = repair_method(method)
    sequential = sequential and method == "lstsq"
    if sequential:
        fit = dict(options)
        x = lstsq_probes(
            pretrained, probes, fit.pop("num_probes", 512), fit.pop("seed", 0)
        )
        model = sequential_lstsq(pretrained, masks, x, **fit)
    else:
        model = Repair(pretrained, method, probes, **options)(masks)
    card = dict(pretrained.card)
    card["repair"] = {
        "method": CARD_NAMES[method],
        "sequential": sequential,
        **options,
    }
    return Pretrained(model, card)


def merge(*args, **kwargs) -> Pretrained:
    """Deprecated name of :func:`repair` (same arguments, same result)."""
    warnings.warn(
        "gapruning.recover.merge is deprecated; use gapruning.recover.repair",
        DeprecationWarning,
        stacklevel=2,
    )
    return repair(*args, **kwargs)
