"""Fidelity: how closely the pruned network reproduces the dense one on probes.

Knowledge-distillation style agreement (Hinton et al., 2015, "Distilling the
Knowledge in a Neural Network"), used as a data-free pruning fitness in place of
the labelled accuracy of Pham Van et al. (2022, "GA pruning without the training
set"): the dense network's own outputs on synthetic probes are the targets, so no
label and no dataset is needed. What differs from the GA paper: it scores accuracy
on training images; here the pruned network is scored against the dense network on
probes made from the model alone.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..forward import mask_kind
from ..models.graph import PRODUCERS, Node, mask_read
from ..models.ops import op_of
from .base import FitnessError, dense_logits, register_metric


@dataclasses.dataclass(frozen=True)
class KLOptions:
    """Options of the ``fidelity`` (KL) metric.

    Attributes:
        temperature: softmax temperature ``T``.
    """

    temperature: float = 4.0


@dataclasses.dataclass(frozen=True)
class FeatureOptions:
    """Options of the ``fidelity_features`` metric.

    Attributes:
        max_probes: how many probes the feature error is measured on.
    """

    max_probes: int = 128


def _prepare(pretrained, probes, opts=None):
    """The dense logits (``opts``, when the metric has any, are not needed)."""
    return {"logits": dense_logits(pretrained, probes)}


def kl_fidelity(cache, pruned_apply, masks, probes, opts: KLOptions):
    """KL(dense || pruned) of temperature-softened softmax outputs, times T^2.

    ``F = T^2 / B * sum_b sum_c p_c(z_b / T) [log p_c(z_b / T) - log p_c(z'_b / T)]``
    with ``z`` the dense and ``z'`` the pruned logits on probe ``b``, ``p`` the
    softmax (Hinton et al., 2015). 0 iff the softened outputs agree on every probe.
    """
    t = float(opts.temperature)
    z = cache["logits"]
    zp = pruned_apply(masks, probes)
    logp = jax.nn.log_softmax(z / t, axis=-1)
    logq = jax.nn.log_softmax(zp / t, axis=-1)
    kl = (jnp.exp(logp) * (logp - logq)).sum(-1).mean()
    return kl * t * t


def top1_disagreement(cache, pruned_apply, masks, probes):
    """Share of probes whose top-1 class differs between dense and pruned.

    ``F = 1/B * sum_b [argmax z'_b != argmax z_b]`` (1 minus top-1 agreement).
    """
    zp = pruned_apply(masks, probes)
    agree = zp.argmax(-1) == cache["logits"].argmax(-1)
    # NaN outputs must not look like agreement: argmax of NaN is arbitrary
    bad = ~jnp.all(jnp.isfinite(zp))
    return jnp.where(bad, jnp.nan, 1.0 - agree.mean())


def logit_mse(cache, pruned_apply, masks, probes):
    """Mean squared difference of dense and pruned logits.

    ``F = 1/(B C) * sum_b sum_c (z'_bc - z_bc)^2``.
    """
    zp = pruned_apply(masks, probes)
    return jnp.mean((zp - cache["logits"]) ** 2)


def _feature_tensors(net) -> dict[str, Node | None]:
    """Inputs of every Dense/Conv layer except those reading the network input:
    the tensor before its mask -> the mask node (``None`` if unmasked)."""
    by_name = {n.name: n for n in net.nodes}
    first = net.nodes[0].name
    out: dict[str, Node | None] = {}
    for n in net.nodes:
        if n.op not in PRODUCERS or n.inputs[0] == first:
            continue
        mask = mask_read(n, by_name)  # the error is the same before flattening
        if mask is None:
            out[n.inputs[0]] = None
        else:
            out[mask.inputs[0]] = mask
    return out


def _prepare_features(pretrained, probes, opts: FeatureOptions):
    net = pretrained.model
    tensors = _feature_tensors(net)
    if not tensors:
        raise FitnessError("fidelity_features needs at least two Dense/Conv layers")
    _, feats = net(probes[: opts.max_probes], taps=tuple(tensors))
    return {"feats": feats}


def feature_fidelity(cache, pruned_apply, masks, probes, opts: FeatureOptions):
    """Relative reconstruction error of every layer's input features.

    ``F = 1/L sum_l ||m_l * h'_l - h_l||^2 / ||h_l||^2`` over the inputs ``h_l`` of
    the Dense/Conv layers after the first, ``h'_l`` the pruned network's features
    before the layer's mask ``m_l`` (removed units count as zeros), on the first
    ``max_probes`` probes: the layer-wise reconstruction objective of channel
    pruning (He et al., 2017; ThiNet, Luo et al., 2017), on probes instead of
    training images. Computed per unit, for 0/1 masks, as
    ``sum_i m_i ||h'_i - h_i||^2 + (1 - m_i) ||h_i||^2``: where ``h'_l`` does not
    depend on the masks (layers before the first mask) the sums over probes are
    then shared by the whole population instead of repeated per individual. The
    features are tapped on all probes, in the pass a composite's terms share.
    Kernel masks (``ga_scores``) remove no unit: every ``m_l`` is then one.
    """
    dense = cache["feats"]
    groups = _feature_tensors(pruned_apply.net)
    if mask_kind(pruned_apply.net, masks) == "weights":  # every unit is there
        groups = dict.fromkeys(groups)
    _, feats = pruned_apply.taps(masks, probes, tuple(dense))
    errs = []
    for name, h in dense.items():
        axes = tuple(range(h.ndim - 1))
        kept_err = jnp.sum((feats[name][: opts.max_probes] - h) ** 2, axis=axes)
        removed_err = jnp.sum(h**2, axis=axes)
        node = groups[name]
        m = 1.0 if node is None else op_of(node).mask_vector(node, masks.__getitem__)
        m = jnp.asarray(m, h.dtype)
        err = jnp.sum(m * kept_err + (1 - m) * removed_err)
        errs.append(err / (jnp.sum(removed_err) + 1e-12))
    return sum(errs) / len(errs)


register_metric(
    "fidelity",
    kl_fidelity,
    _prepare,
    description="KL(dense || pruned) of softened outputs on probes (temperature T)",
    options=KLOptions,
)
register_metric(
    "fidelity_top1",
    top1_disagreement,
    _prepare,
    description="share of probes whose top-1 class changes (1 - agreement)",
)
register_metric(
    "fidelity_mse",
    logit_mse,
    _prepare,
    description="mean squared error between dense and pruned logits on probes",
)
register_metric(
    "fidelity_features",
    feature_fidelity,
    _prepare_features,
    description=(
        "relative reconstruction error of every layer's input features on probes"
    ),
    options=FeatureOptions,
    taps=lambda net: tuple(_feature_tensors(net)),
)
