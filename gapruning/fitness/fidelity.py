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

from .base import dense_logits, register_metric


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
