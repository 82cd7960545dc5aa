"""Supervised training of zoo models: how the shipped weights in ``weights/`` are made.

This is the only place besides :mod:`gapruning.evaluate` that reads real data. Each
mini-batch is one jitted step (augmentation included).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from . import models
from .augment import shift_flip
from .data import Dataset
from .progress import progress_bar

# Fashion-MNIST pixel statistics (training split).
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training recipe. ``optimizer`` is "sgd" (Nesterov momentum 0.9) or "adamw"."""

    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    augment: bool = True  # random 2-pixel shifts and horizontal flips
    seed: int = 0
    arch_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


_ADAMW_MLP = TrainConfig(
    epochs=40, optimizer="adamw", learning_rate=1e-3, weight_decay=1e-4, augment=False
)
# The recipes used for the shipped weights (see weights/*/model.json).
RECIPES: dict[str, TrainConfig] = {
    "lenet300": _ADAMW_MLP,
    "paoding_mlp": _ADAMW_MLP,
    "lenet5": dataclasses.replace(_ADAMW_MLP, learning_rate=2e-3, augment=True),
    "vgg11": TrainConfig(epochs=15, learning_rate=0.05, arch_kwargs={"width": 0.5}),
    "resnet20": TrainConfig(epochs=20, learning_rate=0.1),
    "mobilenet": TrainConfig(epochs=15, learning_rate=0.1, weight_decay=4e-5),
    "vit": TrainConfig(
        epochs=15,
        optimizer="adamw",
        learning_rate=1e-3,
        weight_decay=0.05,
        warmup_epochs=2,
        label_smoothing=0.1,
    ),
}


def _optimizer(cfg: TrainConfig, steps_per_epoch: int) -> optax.GradientTransformation:
    total = cfg.epochs * steps_per_epoch
    warmup = max(1, min(cfg.warmup_epochs * steps_per_epoch, total // 2))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, total)
    if cfg.optimizer == "adamw":
        return optax.adamw(schedule, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return optax.chain(
            optax.add_decayed_weights(cfg.weight_decay),
            optax.sgd(schedule, momentum=0.9, nesterov=True),
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known: sgd, adamw")


def train(
    arch: str,
    train_set: Dataset,
    cfg: TrainConfig,
    *,
    mean: float = FMNIST_MEAN,
    std: float = FMNIST_STD,
    eval_set: Dataset | None = None,
    progress: bool = True,
):
    """Trains ``arch`` from scratch; returns ``(model, log)``, the model in eval mode.

    Inputs are pixels in [0, 1]; the model receives ``(x - mean) / std``.
    """
    model = models.build(
        arch,
        seed=cfg.seed,
        num_classes=int(train_set.labels.max()) + 1,
        input_shape=train_set.images.shape[1:],
        **cfg.arch_kwargs,
    )
    n = len(train_set.labels)
    steps = n // cfg.batch_size
    tx = _optimizer(cfg, steps)
    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt_state = tx.init(params)
    images, labels = train_set.images, train_set.labels

    # BatchNorm statistics are updated in place by the merged module, so they are
    # traced together with the parameters (flax forbids mutating a Variable that
    # lives outside the differentiated trace); their gradient is discarded.
    def loss_fn(variables, x, y):
        m = nnx.merge(graphdef, *variables)
        logits = m(x)
        onehot = optax.smooth_labels(
            jax.nn.one_hot(y, logits.shape[-1]), cfg.label_smoothing
        )
        loss = optax.softmax_cross_entropy(logits, onehot).mean()
        return loss, (nnx.state(m, nnx.Not(nnx.Param)), (logits.argmax(-1) == y).mean())

    @jax.jit
    def step(params, rest, opt_state, key, x, y):
        if cfg.augment:
            x = shift_flip(key, x)
        x = (x - mean) / std
        (loss, (rest, acc)), (grads, _) = jax.value_and_grad(loss_fn, has_aux=True)(
            (params, rest), x, y
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), rest, opt_state, loss, acc

    # A Python loop over a jitted step, not lax.scan: XLA:CPU runs convolutions
    # inside a scanned loop many times slower than at top level.
    order_rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    log = []
    with progress_bar(enabled=progress) as bar:
        task = bar.add_task(f"train {arch}", total=cfg.epochs * steps)
        for e in range(cfg.epochs):
            t0 = time.perf_counter()
            order = order_rng.permutation(n)
            losses, accs = [], []
            for i in range(steps):
                idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
                key, sub = jax.random.split(key)
                params, rest, opt_state, loss, acc = step(
                    params, rest, opt_state, sub, images[idx], labels[idx]
                )
                losses.append(loss)
                accs.append(acc)
                bar.advance(task)
            row = {
                "epoch": e + 1,
                "loss": float(jnp.mean(jnp.stack(losses))),
                "train_accuracy": float(jnp.mean(jnp.stack(accs))),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            if eval_set is not None and (e + 1 == cfg.epochs or (e + 1) % 5 == 0):
                m = nnx.merge(graphdef, params, rest)
                m.eval()
                row["test_accuracy"] = accuracy(m, eval_set, mean, std)
            log.append(row)
            bar.console.log(
                " ".join(
                    f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in row.items()
                )
            )
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return model, log


def accuracy(
    model: nnx.Module, data: Dataset, mean: float, std: float, batch_size: int = 1000
) -> float:
    """Top-1 accuracy of ``model`` on pixel images ``data`` normalised by mean/std."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def correct(state, x, y):
        logits = nnx.merge(graphdef, state)((x - mean) / std)
        return (logits.argmax(-1) == y).sum()

    total = 0
    for i in range(0, len(data.labels), batch_size):
        total += int(
            correct(
                state, data.images[i : i + batch_size], data.labels[i : i + batch_size]
            )
        )
    return total / len(data.labels)
