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

import jax
import jax.numpy as jnp

from .base import FitnessError, dense_logits, register_metric


def _prepare(pretrained, probes, **_):
    return {"logits": dense_logits(pretrained, probes)}


def kl_fidelity(cache, pruned_apply, masks, probes, temperature: float = 4.0):
    """KL(dense || pruned) of temperature-softened softmax outputs, times T^2.

    ``F = T^2 / B * sum_b sum_c p_c(z_b / T) [log p_c(z_b / T) - log p_c(z'_b / T)]``
    with ``z`` the dense and ``z'`` the pruned logits on probe ``b``, ``p`` the
    softmax (Hinton et al., 2015). 0 iff the softened outputs agree on every probe.
    """
    t = float(temperature)
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


def _feature_tensors(net) -> tuple[str, ...]:
    """Inputs of every Dense/Conv layer except those reading the network input."""
    first = net.nodes[0].name
    return tuple(
        dict.fromkeys(
            n.inputs[0]
            for n in net.nodes
            if n.op in ("dense", "conv") and n.inputs[0] != first
        )
    )


def _prepare_features(pretrained, probes, max_probes=128):
    net = pretrained.model
    names = _feature_tensors(net)
    if not names:
        raise FitnessError("fidelity_features needs at least two Dense/Conv layers")
    _, feats = net(probes[:max_probes], taps=names)
    return {"feats": feats}


def feature_fidelity(cache, pruned_apply, masks, probes, max_probes=128):
    """Relative reconstruction error of every layer's input features.

    ``F = 1/L sum_l ||h'_l - h_l||^2 / ||h_l||^2`` over the inputs ``h_l`` of the
    Dense/Conv layers after the first (removed units included, as zeros in the
    pruned network ``h'``), on the first ``max_probes`` probes: the layer-wise
    reconstruction objective of channel pruning (He et al., 2017; ThiNet, Luo et
    al., 2017), here on probes instead of training images.
    """
    dense = cache["feats"]
    _, feats = pruned_apply.taps(masks, probes[:max_probes], tuple(dense))
    errs = [
        jnp.sum((feats[k] - v) ** 2) / (jnp.sum(v**2) + 1e-12) for k, v in dense.items()
    ]
    return sum(errs) / len(errs)


register_metric(
    "fidelity",
    kl_fidelity,
    _prepare,
    description="KL(dense || pruned) of softened outputs on probes (temperature T)",
    defaults={"temperature": 4.0},
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
    defaults={"max_probes": 128},
)
