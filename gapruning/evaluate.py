"""Accuracy and adversarial robustness on real labelled data (evaluation only).

Attacks work in pixel space: images are in [0, 1], epsilon is an L-infinity radius
in pixel units, and the model sees ``pretrained.normalize(pixels)``.

* FGSM (Goodfellow et al., 2015): ``x + eps * sign(grad)``, clipped to [0, 1].
* PGD (Madry et al., 2018): uniform random start in the eps-ball, ``steps`` signed
  gradient steps of size ``2.5 * eps / steps``, projection onto the ball and [0, 1].
* Robustness preservation (Paoding, Meng et al., 2022): among the samples the model
  classifies correctly, the share that stays correct under the attack.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .data import Dataset
from .zoo import Pretrained

ATTACKS = ("fgsm", "pgd")


def _as_arrays(dataset) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(dataset, Dataset):
        x, y = dataset.images, dataset.labels
    else:
        try:
            x, y = dataset
        except (TypeError, ValueError):
            raise TypeError(
                "dataset must be a gapruning Dataset or an (inputs, labels) pair"
            ) from None
    x, y = np.asarray(x, np.float32), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"{len(x)} inputs but {len(y)} labels")
    if len(x) == 0:
        raise ValueError("the dataset is empty")
    return x, y.astype(np.int32)


def _attack(logits_fn, x, y, eps, kind: str, steps: int, key):
    def loss(xa):
        logits = logits_fn(xa)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()

    if kind == "fgsm":
        return jnp.clip(x + eps * jnp.sign(jax.grad(loss)(x)), 0.0, 1.0)
    step_size = 2.5 * eps / steps
    start = x + jax.random.uniform(key, x.shape, minval=-eps, maxval=eps)

    def body(_, xa):
        xa = xa + step_size * jnp.sign(jax.grad(loss)(xa))
        return jnp.clip(jnp.clip(xa, x - eps, x + eps), 0.0, 1.0)

    return jax.lax.fori_loop(0, steps, body, jnp.clip(start, 0.0, 1.0))


def evaluate(
    pretrained: Pretrained,
    dataset,
    attacks: Sequence[str] = ATTACKS,
    eps: Sequence[float] = (0.01, 0.05, 0.1),
    *,
    pgd_steps: int = 10,
    batch_size: int = 500,
    seed: int = 0,
) -> dict:
    """Clean accuracy, robust accuracy per attack and epsilon, robustness preservation.

    Args:
        pretrained: the model (its masks, if any, are applied).
        dataset: a :class:`~gapruning.data.Dataset` or ``(images, labels)`` with
            images in [0, 1] of the model's input shape.
        attacks: any of ``"fgsm"``, ``"pgd"``.
        eps: L-infinity radii in pixel units.

    Returns:
        ``{"accuracy", "num_samples", "<attack>": {eps: acc},
        "robustness_preservation": {"<attack>": {eps: share}}}``.

    Example:
        >>> m = evaluate(gp.load("lenet300-fmnist"), gp.data.fashion_mnist("test"))
        >>> m["accuracy"], m["fgsm"][0.05]
    """
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack(s) {unknown}; known: {', '.join(ATTACKS)}")
    eps = tuple(float(e) for e in eps)
    if any(not 0.0 <= e <= 1.0 for e in eps):
        raise ValueError(f"eps must lie in [0, 1] (pixel units), got {eps}")
    x_all, y_all = _as_arrays(dataset)
    if x_all.shape[1:] != pretrained.input_shape:
        raise ValueError(
            f"dataset inputs have shape {x_all.shape[1:]}, the model "
            f"expects {pretrained.input_shape}"
        )
    graphdef, state = nnx.split(pretrained.model)
    attacks = tuple(attacks)

    @jax.jit
    def batch_stats(state, x, y, valid, key):
        model = nnx.merge(graphdef, state)

        def logits_fn(pixels):
            return model(pretrained.normalize(pixels))

        clean = logits_fn(x).argmax(-1) == y
        out = {"clean": (clean & valid).sum()}
        for a in attacks:
            for i, e in enumerate(eps):
                xa = _attack(
                    logits_fn, x, y, e, a, pgd_steps, jax.random.fold_in(key, i)
                )
                adv = logits_fn(xa).argmax(-1) == y
                out[f"{a}@{i}"] = (adv & valid).sum()
                out[f"{a}@{i}:kept"] = (adv & clean & valid).sum()
        return out

    n = len(y_all)
    totals: dict = {}
    key = jax.random.key(seed)
    for start in range(0, n, batch_size):
        x, y = x_all[start : start + batch_size], y_all[start : start + batch_size]
        valid = np.ones(len(y), bool)
        if len(y) < batch_size:  # pad the last batch: one compiled shape
            pad = batch_size - len(y)
            x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
            y = np.concatenate([y, np.zeros(pad, y.dtype)])
            valid = np.concatenate([valid, np.zeros(pad, bool)])
        stats = batch_stats(state, x, y, valid, jax.random.fold_in(key, start))
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + int(v)

    result: dict = {
        "accuracy": totals["clean"] / n,
        "num_samples": n,
        "robustness_preservation": {},
    }
    for a in attacks:
        result[a] = {e: totals[f"{a}@{i}"] / n for i, e in enumerate(eps)}
        result["robustness_preservation"][a] = {
            e: totals[f"{a}@{i}:kept"] / max(totals["clean"], 1)
            for i, e in enumerate(eps)
        }
    return result
