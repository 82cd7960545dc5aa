"""BatchNorm drift: do the pruned network's internal statistics stay put?

The BatchNorm statistics term of ZeroQ (Cai et al., 2020) and DeepInversion (Yin
et al., 2020) measures how far a batch's per-channel mean and standard deviation
at every BatchNorm input are from the stored running statistics; those papers use
it to synthesise data, and data-free pruning/quantization work uses it to judge a
compressed network. Here it scores a pruned network: the batch statistics of its
BatchNorm inputs on the probes, compared per channel (standardized by the running
variance, :func:`gapruning.probes.stats_distance`), averaged over kept channels
and BatchNorm layers.

What differs: ``reference="dense"`` (default) compares with the DENSE network's
batch statistics on the same probes, so the score is 0 for the unpruned network
whatever the probes; with ``bn_stats`` probes those are close to the running
statistics anyway. ``reference="running"`` compares with the running statistics,
minus the dense network's own distance (again 0 unpruned; it can go negative when
a pruned network happens to match the running statistics better).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from ..probes import batchnorm_nodes, bn_batch_stats, running_stats, stats_distance
from ..space import PruneSpace
from .base import FitnessError, register_metric


@dataclasses.dataclass(frozen=True)
class BNDriftOptions:
    """Options of the ``bn_drift`` metric.

    Attributes:
        reference: ``"dense"`` (the dense network's batch statistics on the
            probes) or ``"running"`` (the stored running statistics).
    """

    reference: str = "dense"


def _prepare(pretrained, probes, opts: BNDriftOptions):
    net = pretrained.model
    if not batchnorm_nodes(net):
        raise FitnessError(
            f"bn_drift needs BatchNorm layers; {pretrained.name} has none "
            "(use 'fidelity' or 'interval' instead)"
        )
    if opts.reference not in ("dense", "running"):
        raise FitnessError(
            f"bn_drift reference must be 'dense' or 'running', got {opts.reference!r}"
        )
    stats = bn_batch_stats(net, probes)
    return {"dense": {k: (m, v) for k, (m, v) in stats.items()}}


def bn_drift(cache, pruned_apply, masks, probes, opts: BNDriftOptions):
    """Standardized distance of the pruned BN batch statistics to the reference.

    ``BND = mean_l sum_c m_c [(mu'_c - mu_c)^2 + (s'_c - s_c)^2] / (v_c + eps)
    / sum_c m_c`` with primes the pruned network's batch mean/std on the probes,
    ``mu, s`` the dense network's (``reference="dense"``), ``v`` the running
    variance and ``m`` the kept channels of each BatchNorm (all channels of an
    unprunable one). ``reference="running"``: distance to the running statistics
    minus the dense network's own distance.
    """
    net = pruned_apply.net
    space = PruneSpace(net)
    running = running_stats(net)
    weights = {}
    for n in batchnorm_nodes(net):
        g = space.group_of(n.name)
        if g is not None:
            weights[n.name] = jnp.asarray(masks[g], jnp.float32)
    stats = bn_batch_stats(pruned_apply.model(masks), probes)
    if opts.reference == "dense":
        ref = {k: (m, v, running[k][2]) for k, (m, v) in cache["dense"].items()}
        return stats_distance(stats, ref, weights, normalizer=running)
    return stats_distance(stats, running, weights) - stats_distance(
        cache["dense"], running, weights
    )


register_metric(
    "bn_drift",
    bn_drift,
    _prepare,
    description=(
        "standardized drift of BatchNorm batch statistics on probes (needs BatchNorm)"
    ),
    options=BNDriftOptions,
    unit_masks_only=True,
)
