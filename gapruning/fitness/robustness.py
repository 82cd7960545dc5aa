"""Data-free robustness: does pruning make the network easier to fool on probes?

Paoding (Meng et al., 2022) prunes so as to *preserve robustness*, measured there
with FGSM/PGD on labelled test images (robustness preservation). Here no label
exists: each probe's label is the dense network's own prediction ``y_b``, and the
attacks are FGSM (Goodfellow et al., 2015) or PGD (Madry et al., 2018) in an
L-infinity ball of radius ``eps`` PIXEL units (``eps / std`` in model units, as
:func:`gapruning.evaluate` counts it), clipped to the input box. The score is how
much MORE the pruned network's prediction changes under attack than the dense
network's: among the probes where the dense prediction survives the attack (the
data-free analogue of Paoding's robustness preservation), how often the pruned
prediction does not, and how far its margin falls below the dense one. It is 0
for the unpruned network. What differs from Paoding: labels are dense predictions
on synthetic probes; PGD starts at the probe (no random start) so the metric is
deterministic. Synthetic probes lie closer to decision boundaries than data (on
Gaussian probes LeNet-5 flips on every probe at eps 0.05), so ``eps="auto"``
(default) halves eps from 0.05 until the dense network survives on at least
``robust_share`` (default half) of the probes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from .base import FitnessError, dense_logits, register_metric

# eps="auto": the largest of 0.05, 0.025, ... (pixel units; AUTO_HALVINGS
# halvings) at which the dense network keeps its prediction on at least
# robust_share of the probes
AUTO_START = 0.05
AUTO_HALVINGS = 6


@dataclasses.dataclass(frozen=True)
class RobustnessOptions:
    """Options of the ``robustness`` metric.

    Attributes:
        eps: attack radius in pixel units, or ``"auto"`` (module docstring).
        attack: ``"fgsm"`` or ``"pgd"``.
        steps: PGD steps.
        source: ``"pruned"`` (attack the network scored) or ``"dense"`` (a
            transfer attack on the dense network, computed once).
        weight: weight of the margin drop against the flip rate.
        robust_share: with ``eps="auto"``, the share of probes on which the
            dense network must keep its prediction.
    """

    eps: float | str = "auto"
    attack: str = "fgsm"
    steps: int = 5
    source: str = "pruned"
    weight: float = 1.0
    robust_share: float = 0.5


def _attack(logits_fn, x, y, eps, lo, hi, attack: str, steps: int):
    def loss(xa):
        return optax.softmax_cross_entropy_with_integer_labels(logits_fn(xa), y).sum()

    if attack == "fgsm":
        return jnp.clip(x + eps * jnp.sign(jax.grad(loss)(x)), lo, hi)
    step = 2.5 * eps / steps

    def body(_, xa):
        xa = xa + step * jnp.sign(jax.grad(loss)(xa))
        return jnp.clip(jnp.clip(xa, x - eps, x + eps), lo, hi)

    return jax.lax.fori_loop(0, steps, body, x)


def _margin(logits, y):
    """Probability margin ``p_y - max_{c != y} p_c`` (in [-1, 1])."""
    p = jax.nn.softmax(logits, axis=-1)
    py = jnp.take_along_axis(p, y[:, None], axis=-1)[:, 0]
    other = jnp.where(jax.nn.one_hot(y, p.shape[-1], dtype=bool), -1.0, p).max(-1)
    return py - other


def _adv_predictions(logits_fn, x, y, eps, lo, hi, attack, steps, x_adv=None):
    if x_adv is None:
        x_adv = _attack(logits_fn, x, y, eps, lo, hi, attack, steps)
    return x_adv, logits_fn(x_adv)


def _prepare(pretrained, probes, opts: RobustnessOptions):
    attack, steps, source = opts.attack, opts.steps, opts.source
    eps, robust_share = opts.eps, opts.robust_share
    if attack not in ("fgsm", "pgd"):
        raise FitnessError(f"robustness attack must be 'fgsm' or 'pgd', got {attack!r}")
    if source not in ("pruned", "dense"):
        raise FitnessError(f"robustness source must be 'pruned' or 'dense': {source!r}")
    lo, hi = pretrained.input_box
    y = dense_logits(pretrained, probes).argmax(-1)

    @jax.jit
    def attack_dense(eps_model, probes, y):
        x_adv, adv = _adv_predictions(
            pretrained.model, probes, y, eps_model, lo, hi, attack, int(steps)
        )
        return x_adv, adv, (adv.argmax(-1) == y).astype(jnp.float32)

    def dense_attack(eps_pixels):
        return attack_dense(jnp.float32(eps_pixels / pretrained.std), probes, y)

    if eps == "auto":
        if not 0.0 < robust_share <= 1.0:
            raise FitnessError(f"robust_share must lie in (0, 1], got {robust_share}")
        for k in range(AUTO_HALVINGS + 1):
            eps_pixels = AUTO_START / 2**k
            x_adv, adv, robust = dense_attack(eps_pixels)
            if float(robust.mean()) >= robust_share:
                break
    else:
        eps_pixels = float(eps)
        if not 0.0 <= eps_pixels <= 1.0:
            raise FitnessError(f"eps must lie in [0, 1] (pixel units), got {eps}")
        x_adv, adv, robust = dense_attack(eps_pixels)
    if float(robust.sum()) == 0:
        raise FitnessError(
            f"the dense model's prediction flips on every probe under {attack} at "
            f"eps={eps_pixels:g} (pixel units): nothing to preserve; use a smaller "
            "eps or eps='auto'"
        )
    eps_model = eps_pixels / pretrained.std
    cache = {
        "y": y,
        "robust": robust,
        "margin": _margin(adv, y),
        "eps": jnp.float32(eps_model),
        "eps_pixels": jnp.float32(eps_pixels),
        "box": jnp.array([lo, hi], jnp.float32),
    }
    if source == "dense":
        cache["x_adv"] = x_adv
    return cache


def robustness(cache, pruned_apply, masks, probes, opts: RobustnessOptions):
    """Robustness lost on the probes where the dense network is robust.

    With ``y_b`` the dense prediction on probe ``b``, ``x~_b`` its adversarial
    version (FGSM/PGD against ``y_b``, attacking the network scored; with
    ``source="dense"`` a transfer attack on the dense network computed once), and
    ``S`` the probes on which the dense network keeps ``y_b`` under its own
    attack (data-free robustness preservation, after Paoding):

    ``R = 1/|S| sum_{b in S} ([argmax f'(x~'_b) != y_b]
    + weight * max(0, m(f(x~_b), y_b) - m(f'(x~'_b), y_b)))``

    the pruned network's flip rate on ``S`` plus its one-sided drop of the
    probability margin ``m(p, y) = p_y - max_{c != y} p_c`` below the dense
    network's adversarial margin (primes: pruned). Flips count clean
    disagreement too. 0 for the unpruned network, >= 0 always.
    """
    lo, hi = cache["box"][0], cache["box"][1]

    def logits_fn(x):
        return pruned_apply(masks, x)

    _, adv = _adv_predictions(
        logits_fn,
        probes,
        cache["y"],
        cache["eps"],
        lo,
        hi,
        opts.attack,
        int(opts.steps),
        cache.get("x_adv"),
    )
    y, robust = cache["y"], cache["robust"]
    flip = (adv.argmax(-1) != y).astype(jnp.float32)
    drop = jax.nn.relu(cache["margin"] - _margin(adv, y))
    score = ((flip + opts.weight * drop) * robust).sum() / robust.sum()
    return jnp.where(jnp.all(jnp.isfinite(adv)), score, jnp.nan)


register_metric(
    "robustness",
    robustness,
    _prepare,
    description=(
        "pruned flip rate + margin drop under FGSM/PGD on probes where the dense "
        "model is robust (labels = dense predictions)"
    ),
    options=RobustnessOptions,
)
