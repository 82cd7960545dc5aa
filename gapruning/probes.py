"""Data-free probes: synthetic model inputs made from the pretrained network alone.

Pruning never reads a dataset (see DESIGN.md, "Data-free means data-free"): the
fitness metrics compare the dense and the pruned network on *probes*, inputs made
from the model's input range, its weights and its BatchNorm statistics. Every probe
set lives in MODEL input space (what the network receives, after the card's
normalization) and inside ``pretrained.input_box``.

Kinds (:data:`PROBE_KINDS`):

* ``"gaussian"``: ``N(c, s^2)`` clipped to the input box, where ``c = 0, s = 1``
  when the card normalizes its inputs (the standardized data distribution), else
  ``c`` = box centre and ``s`` = box width / 4.
* ``"uniform"``: uniform in the input box.
* ``"bn_stats"``: ZeroQ "distilled data" (Cai et al., 2020) / the feature term of
  DeepInversion (Yin et al., 2020): starting from the ``"gaussian"`` probes of the
  same seed (when ``num`` is a multiple of ``batch_size``), Adam steps minimise
  the BatchNorm-statistics mismatch (:func:`bn_mismatch`) plus a small
  total-variation and L2 prior; after each step the probes are clipped to the box.
* ``"inversion"`` (for networks without BatchNorm; DeepInversion without the BN
  term, Yin et al., 2020): probe ``i`` is pushed towards class ``i mod classes``
  (class-balanced) by label-smoothed cross-entropy, with a strong total-variation
  prior, an L2 prior, random 2-pixel jitter at every step (as DeepInversion) and a
  diversity term (mean squared cosine similarity of penultimate features between
  probes of the same class), so probes of one class are not all alike. When the
  card standardizes its inputs (``mean``/``std``), a moment prior pulls the batch
  mean and standard deviation of the probes to 0 and 1, the statistics of the
  standardized data; without it the probes are low-contrast textures. On a
  network with BatchNorm the BN mismatch is added as in DeepInversion. How the
  default settings were chosen, with the measurements: docs/fitness.md.
* an array: user-supplied unlabeled inputs, validated by :func:`validate_probes`.

Optimisation runs batch by batch (``batch_size`` probes share their BatchNorm
statistics, as in ZeroQ); each batch is one jitted ``lax.scan`` over the steps, so
the whole optimisation is one compiled program, which is what accelerators want.

Caching: :func:`make_probes` keeps its results in an in-process dictionary keyed on
the identity of the model object (``id(pretrained.model)``, checked against a weak
reference so a recycled id never hits) and every argument, so composing several
fitness functions on one model generates each probe set once. Modifying a model's
weights in place after making probes does not invalidate the cache: pass
``cache=False`` or call :func:`clear_probe_cache`.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from .models import Net, Node
from .progress import format_seconds
from .zoo import Pretrained

PROBE_KINDS = ("gaussian", "uniform", "bn_stats", "inversion")

# default optimisation settings of the optimised kinds (the inversion prior: strong
# TV, 2-pixel jitter, moment prior on standardized inputs; see docs/fitness.md)
DEFAULT_STEPS = {"bn_stats": 100, "inversion": 300}
DEFAULT_LEARNING_RATE = {"bn_stats": 0.1, "inversion": 0.3}
DEFAULT_TV = {"bn_stats": 1e-2, "inversion": 10.0}
DEFAULT_JITTER = {"bn_stats": 0, "inversion": 2}
DEFAULT_MOMENT = {"bn_stats": 0.0, "inversion": 30.0}

_CACHE: dict = {}
log = logging.getLogger(__name__)


class ProbeError(ValueError):
    """Probes that cannot be made or used (bad shape, NaN, missing BatchNorm...)."""


def _net(model: Pretrained | Net) -> Net:
    return model.model if isinstance(model, Pretrained) else model


# ---------------------------------------------------------------- validation


def validate_probes(pretrained: Pretrained | Net, probes) -> jax.Array:
    """Checks user-supplied probes and returns them as a float32 array.

    Args:
        pretrained: the model the probes are for.
        probes: unlabeled inputs of shape ``(N, *input_shape)`` in model input space.

    Raises:
        ProbeError: wrong rank or shape, no probes, NaN or Inf values.
    """
    net = _net(pretrained)
    shape = tuple(net.input_shape)
    try:
        arr = np.asarray(probes, np.float32)
    except (TypeError, ValueError) as err:
        raise ProbeError(f"probes must be a numeric array: {err}") from None
    if arr.shape == shape:
        raise ProbeError(
            f"probes have shape {arr.shape}, the model's input shape without a "
            f"batch axis; pass shape (N, {', '.join(map(str, shape))})"
        )
    if arr.ndim != len(shape) + 1 or arr.shape[1:] != shape:
        raise ProbeError(
            f"probes have shape {arr.shape}, expected (N, "
            f"{', '.join(map(str, shape))}) for this model"
        )
    if arr.shape[0] == 0:
        raise ProbeError("probes are empty (N = 0)")
    bad = ~np.isfinite(arr)
    if bad.any():
        first = np.argwhere(bad)[0]
        raise ProbeError(
            f"probes contain {int(bad.sum())} NaN/Inf value(s), the first at "
            f"index {tuple(int(i) for i in first)}"
        )
    if isinstance(pretrained, Pretrained):
        lo, hi = pretrained.input_box
        tol = 1e-3 * (hi - lo)
        if arr.min() < lo - tol or arr.max() > hi + tol:
            warnings.warn(
                f"probes range over [{arr.min():.3g}, {arr.max():.3g}], outside "
                f"the model's input box [{lo:.3g}, {hi:.3g}]; probes are model "
                "inputs: pass pixels through pretrained.normalize() first",
                stacklevel=2,
            )
    return jnp.asarray(arr)


# ---------------------------------------------------------------- BatchNorm


def batchnorm_nodes(model: Pretrained | Net) -> tuple[Node, ...]:
    """The BatchNorm nodes that hold statistics of the training data, in graph
    order: those with ``epsilon > 0``. The importers write fixed per-channel
    affine maps (Keras ``Rescaling``, layer scales, constants) as BatchNorm nodes
    with ``epsilon = 0``, mean 0 and variance 1; their "statistics" say nothing
    about the data, so probes, metrics and recalibration leave them out."""
    return tuple(
        n for n in _net(model).nodes if n.op == "batchnorm" and n.attr("epsilon") > 0
    )


def bn_batch_stats(model: Pretrained | Net, x: jax.Array) -> dict:
    """Batch mean and variance of the input of every BatchNorm node on ``x``.

    Returns:
        ``{bn_name: (mean, var)}``, each of shape ``(channels,)``, statistics over
        every axis but the channel axis (as BatchNorm computes them in training).
        With population masks on the model the arrays get a leading ``P`` axis.
    """
    net = _net(model)
    nodes = batchnorm_nodes(net)
    if not nodes:
        return {}
    _, taps = net(x, taps=tuple(n.inputs[0] for n in nodes))
    out = {}
    for n in nodes:
        v = taps[n.inputs[0]]
        axes = tuple(range(v.ndim - len(n.shape) - 1, v.ndim - 1))  # batch, space
        out[n.name] = (v.mean(axis=axes), v.var(axis=axes))
    return out


def running_stats(model: Pretrained | Net) -> dict:
    """``{bn_name: (running_mean, running_var, epsilon)}`` of every BatchNorm."""
    net = _net(model)
    return {
        n.name: (
            net.layers[n.name].mean[...],
            net.layers[n.name].var[...],
            float(n.attr("epsilon")),
        )
        for n in batchnorm_nodes(net)
    }


def stats_distance(
    stats: dict,
    reference: dict,
    weights: dict | None = None,
    normalizer: dict | None = None,
):
    """Mean over BatchNorm layers of the standardized statistics distance

    ``D_l = sum_c w_c [(mu_c - mu_ref_c)^2 + (s_c - s_ref_c)^2] / (v_c + eps)
    / sum_c w_c`` with ``s = sqrt(var + eps)``; ``stats`` maps layer ->
    ``(mean, var)``, ``reference`` maps layer -> ``(mean, var, eps)``, and ``v`` is
    the reference variance unless ``normalizer`` (layer -> ``(mean, var, eps)``,
    e.g. the running statistics) gives another. ``weights`` (layer ->
    ``(channels,)``) restricts the sum to kept channels. Leading axes of ``stats``
    (a population) are kept.
    """
    total = []
    for name, (mu, var) in stats.items():
        ref_mu, ref_var, eps = reference[name][:3]
        norm_var = ref_var if normalizer is None else normalizer[name][1]
        d = (mu - ref_mu) ** 2 + (jnp.sqrt(var + eps) - jnp.sqrt(ref_var + eps)) ** 2
        d = d / (norm_var + eps)
        if weights is not None and name in weights:
            w = weights[name]
            total.append((d * w).sum(-1) / jnp.maximum(w.sum(-1), 1.0))
        else:
            total.append(d.mean(-1))
    return sum(total) / len(total)


def bn_mismatch(model: Pretrained | Net, x: jax.Array) -> jax.Array:
    """How far the batch statistics of ``x`` are from the stored running statistics.

    The ZeroQ / DeepInversion objective, standardized per channel so layers are
    comparable: the mean over BatchNorm layers of :func:`stats_distance` between
    the batch mean/std of each BatchNorm input on ``x`` and its running mean/std.
    0 means the probes reproduce the training data's statistics exactly.

    Raises:
        ProbeError: the network has no BatchNorm.
    """
    net = _net(model)
    if not batchnorm_nodes(net):
        raise ProbeError(
            "the network has no BatchNorm layer: there are no statistics to match"
        )
    return stats_distance(bn_batch_stats(net, x), running_stats(net))


# ---------------------------------------------------------------- generation


def _box(pretrained: Pretrained) -> tuple[float, float]:
    lo, hi = pretrained.input_box
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ProbeError(f"the model's input box ({lo}, {hi}) is not a finite range")
    return lo, hi


def _standardized(pretrained: Pretrained) -> bool:
    """Whether the card maps pixels through ``mean``/``std`` (so the data seen by
    the network have mean 0 and standard deviation 1)."""
    spec = pretrained.card.get("input", {})
    return "mean" in spec or "std" in spec


def _gaussian(pretrained: Pretrained, key, num: int) -> jax.Array:
    lo, hi = _box(pretrained)
    standardized = _standardized(pretrained)
    centre, scale = (0.0, 1.0) if standardized else ((lo + hi) / 2, (hi - lo) / 4)
    x = centre + scale * jax.random.normal(key, (num, *pretrained.input_shape))
    return jnp.clip(x, lo, hi)


def _tv(x: jax.Array) -> jax.Array:
    """Mean squared difference of neighbouring pixels (0 for non-image inputs)."""
    if x.ndim != 4:
        return jnp.zeros((), x.dtype)
    dh = jnp.diff(x, axis=1) ** 2
    dw = jnp.diff(x, axis=2) ** 2
    return dh.mean() + dw.mean()


def _jitter(x: jax.Array, key, pixels: int) -> jax.Array:
    """Random translation by up to ``pixels`` in each spatial direction (wrapping),
    as DeepInversion applies at every step; identity for non-image inputs."""
    if pixels <= 0 or x.ndim != 4:
        return x
    dh, dw = jax.random.randint(key, (2,), -pixels, pixels + 1)
    return jnp.roll(x, (dh, dw), axis=(1, 2))


def _optimise(
    pretrained: Pretrained, kind: str, x0: jax.Array, targets, cfg: dict, key
):
    """Adam on the probes with projection onto the input box; one jitted scan."""
    net = pretrained.model
    lo, hi = _box(pretrained)
    graphdef, state = nnx.split(net)
    has_bn = bool(batchnorm_nodes(net))
    reference = running_stats(net)
    bn_taps = tuple(n.inputs[0] for n in batchnorm_nodes(net))
    feature = net.nodes[-1].inputs[0]
    num_classes = net.num_outputs
    tx = optax.adam(cfg["learning_rate"])

    def loss_fn(x, state, key):
        model = nnx.merge(graphdef, state)
        taps = bn_taps + ((feature,) if kind == "inversion" else ())
        logits, tapped = model(_jitter(x, key, cfg["jitter"]), taps=taps)
        loss = cfg["tv_weight"] * _tv(x) + cfg["l2_weight"] * jnp.mean(x**2)
        if cfg["moment_weight"] > 0:  # standardized inputs: batch mean 0, std 1
            moments = jnp.mean(x) ** 2 + (jnp.std(x) - 1.0) ** 2
            loss = loss + cfg["moment_weight"] * moments
        if has_bn and cfg["bn_weight"] > 0:
            stats = {}
            for n in batchnorm_nodes(net):
                v = tapped[n.inputs[0]]
                axes = tuple(range(v.ndim - 1))
                stats[n.name] = (v.mean(axis=axes), v.var(axis=axes))
            loss = loss + cfg["bn_weight"] * stats_distance(stats, reference)
        if kind == "inversion":
            onehot = jax.nn.one_hot(targets, num_classes)
            smooth = cfg["label_smoothing"]
            soft = onehot * (1 - smooth) + smooth / num_classes
            loss = loss + optax.softmax_cross_entropy(logits, soft).mean()
            h = tapped[feature].reshape(x.shape[0], -1)
            h = h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-8)
            sim = h @ h.T
            same = (targets[:, None] == targets[None, :]) & ~jnp.eye(
                x.shape[0], dtype=bool
            )
            div = jnp.where(same, sim**2, 0.0).sum() / jnp.maximum(same.sum(), 1)
            loss = loss + cfg["diversity_weight"] * div
        return loss

    @jax.jit
    def run(x, state, key):
        def step(carry, i):
            x, opt = carry
            k = jax.random.fold_in(key, i)
            loss, grad = jax.value_and_grad(loss_fn)(x, state, k)
            updates, opt = tx.update(grad, opt, x)
            x = jnp.clip(optax.apply_updates(x, updates), lo, hi)
            return (x, opt), loss

        steps = jnp.arange(cfg["steps"])
        (x, _), losses = jax.lax.scan(step, (x, tx.init(x)), steps)
        return x, losses

    return run(x0, state, key)


def make_probes(
    pretrained: Pretrained,
    kind="gaussian",
    num: int = 512,
    seed: int = 0,
    *,
    steps: int | None = None,
    learning_rate: float | None = None,
    batch_size: int | None = None,
    tv_weight: float | None = None,
    l2_weight: float = 1e-4,
    bn_weight: float = 1.0,
    diversity_weight: float = 1.0,
    label_smoothing: float = 0.1,
    jitter: int | None = None,
    moment_weight: float | None = None,
    cache: bool = True,
) -> jax.Array:
    """Synthetic probes for ``pretrained`` in model input space (see module doc).

    Args:
        pretrained: the dense model.
        kind: one of :data:`PROBE_KINDS`, or an array of user-supplied unlabeled
            inputs ``(N, *input_shape)`` (validated and returned as is).
        num: number of probes.
        seed: randomness of the start point (and of the whole result).
        steps: optimisation steps (``bn_stats`` / ``inversion``; defaults in
            :data:`DEFAULT_STEPS`).
        learning_rate: Adam step size, in model-input units (default per kind:
            :data:`DEFAULT_LEARNING_RATE`).
        batch_size: probes optimised together (sharing BatchNorm statistics);
            default ``min(num, 256)``.
        tv_weight, l2_weight: weights of the total-variation and L2 priors
            (``tv_weight`` default per kind: :data:`DEFAULT_TV`).
        bn_weight: weight of the BatchNorm-statistics term (``bn_stats``, and
            ``inversion`` on a network with BatchNorm).
        diversity_weight: weight of the same-class feature similarity penalty
            (``inversion``).
        label_smoothing: smoothing of the class targets (``inversion``); keeps
            probes from saturating the softmax.
        jitter: random translation (pixels, wrapping) of the probes before each
            optimisation step, as in DeepInversion (image inputs only; default
            per kind: :data:`DEFAULT_JITTER`).
        moment_weight: weight of a penalty pulling the batch mean/std of the
            probes to 0/1, the statistics of data the card standardizes (default
            per kind: :data:`DEFAULT_MOMENT` when the card has ``mean``/``std``,
            else 0).
        cache: reuse an identical earlier call's result (see module doc).

    Returns:
        ``(num, *input_shape)`` float32 probes inside ``pretrained.input_box``.

    Example:
        >>> net = gp.load("lenet5-fmnist")
        >>> probes = make_probes(net, "inversion", num=256, seed=0)
        >>> probe_report(net, probes)["tv_from_uniform"]
    """
    if not isinstance(pretrained, Pretrained):
        raise TypeError(
            "make_probes needs a gapruning Pretrained (its card gives the input "
            f"range), got {type(pretrained).__name__}"
        )
    if not isinstance(kind, str):
        return validate_probes(pretrained, kind)
    num = _check_request(kind, num)
    given = dict(
        steps=steps,
        learning_rate=learning_rate,
        batch_size=batch_size,
        tv_weight=tv_weight,
        l2_weight=l2_weight,
        bn_weight=bn_weight,
        diversity_weight=diversity_weight,
        label_smoothing=label_smoothing,
        jitter=jitter,
        moment_weight=moment_weight,
    )
    cfg = _settings(pretrained, kind, num, given)
    if not cache:
        return _generate(pretrained, kind, num, int(seed), cfg)
    return _cached(pretrained, kind, num, int(seed), cfg)


def _check_request(kind: str, num) -> int:
    """``num`` as an int, once ``kind`` and ``num`` are known to be valid."""
    if kind not in PROBE_KINDS:
        raise ProbeError(
            f"unknown probe kind {kind!r}; known: {', '.join(PROBE_KINDS)}, or an "
            "array of inputs"
        )
    if int(num) < 1:
        raise ProbeError(f"num must be a positive number of probes, got {num}")
    return int(num)


def _settings(pretrained: Pretrained, kind: str, num: int, given: dict) -> dict:
    """The optimisation settings of :func:`make_probes` (its arguments ``given``,
    ``None`` replaced by the per-kind default)."""

    def per_kind(name: str, defaults: dict, cast):
        value = given[name]
        return cast(defaults.get(kind, 0) if value is None else value)

    moment = DEFAULT_MOMENT if _standardized(pretrained) else {}
    batch_size = given["batch_size"]
    return dict(
        steps=per_kind("steps", DEFAULT_STEPS, int),
        learning_rate=per_kind("learning_rate", DEFAULT_LEARNING_RATE, float),
        batch_size=min(num, 256) if batch_size is None else int(batch_size),
        tv_weight=per_kind("tv_weight", DEFAULT_TV, float),
        l2_weight=float(given["l2_weight"]),
        bn_weight=float(given["bn_weight"]),
        diversity_weight=float(given["diversity_weight"]),
        label_smoothing=float(given["label_smoothing"]),
        jitter=per_kind("jitter", DEFAULT_JITTER, int),
        moment_weight=per_kind("moment_weight", moment, float),
    )


def _cached(pretrained: Pretrained, kind: str, num: int, seed: int, cfg: dict):
    """:func:`_generate`'s result, from the cache when an identical call made it
    (module docstring)."""
    model = pretrained.model
    key = (
        id(model),
        kind,
        num,
        seed,
        pretrained.input_box,
        tuple(sorted(cfg.items())) if kind in DEFAULT_STEPS else (),
    )
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is model:
        return hit[1]
    probes = _generate(pretrained, kind, num, seed, cfg)
    _CACHE[key] = (weakref.ref(model), probes)
    return probes


def _generate(pretrained: Pretrained, kind: str, num: int, seed: int, cfg: dict):
    key = jax.random.key(seed)
    if kind == "uniform":
        lo, hi = _box(pretrained)
        return jax.random.uniform(
            key, (num, *pretrained.input_shape), minval=lo, maxval=hi
        )
    if kind == "gaussian":
        return _gaussian(pretrained, key, num)
    has_bn = bool(batchnorm_nodes(pretrained))
    if kind == "bn_stats" and not has_bn:
        raise ProbeError(
            f"{pretrained.name} has no BatchNorm layer, so 'bn_stats' probes have "
            "nothing to match; use kind='inversion' (or 'gaussian')"
        )
    if cfg["steps"] < 1:
        raise ProbeError(f"{kind!r} probes need steps >= 1, got {cfg['steps']}")
    bs = cfg["batch_size"]
    if bs < 2:
        raise ProbeError(f"batch_size must be at least 2, got {bs}")
    batches = -(-num // bs)
    start = _gaussian(pretrained, key, batches * bs)  # = "gaussian" probes
    out, t0 = [], time.perf_counter()
    log.info(
        "making %d %s probes of %s: %d batch(es) of %d steps",
        num,
        kind,
        pretrained.name,
        batches,
        cfg["steps"],
    )
    for b in range(batches):
        targets = (jnp.arange(bs) + b * bs) % pretrained.model.num_outputs
        x, _ = _optimise(
            pretrained,
            kind,
            start[b * bs : (b + 1) * bs],
            targets,
            cfg,
            jax.random.fold_in(key, b + 1),
        )
        out.append(x)
        if b == 0 and batches > 1:
            jax.block_until_ready(x)
            first = time.perf_counter() - t0
            log.info(
                "  first batch in %s (with compilation); about %s for all",
                format_seconds(first),
                format_seconds(first * batches),
            )
    return jnp.concatenate(out)[:num]


def clear_probe_cache() -> None:
    """Forgets every cached probe set."""
    _CACHE.clear()


# ---------------------------------------------------------------- report


def probe_report(pretrained: Pretrained | Net, probes, *, batch_size: int = 1024):
    """What the dense model says about a probe set: are the probes informative?

    Returns:
        dict with ``num``, ``class_histogram`` (share of probes predicted as each
        class), ``mean_confidence`` (mean top-1 softmax probability),
        ``mean_entropy`` (nats), ``tv_from_uniform`` (total-variation distance
        ``0.5 * sum_c |h_c - 1/C|`` of the histogram from uniform: 0 = every class
        equally often, ``1 - 1/C`` = one class only), ``classes_hit`` (classes
        predicted at least once) and, for networks with BatchNorm,
        ``bn_mismatch`` (:func:`bn_mismatch`). Informative probes hit every class,
        are far from uniform in confidence but close to uniform in histogram.
    """
    net = _net(pretrained)
    x = validate_probes(pretrained, probes)
    logits = jnp.concatenate(
        [net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    )
    p = jax.nn.softmax(logits, axis=-1)
    classes = logits.shape[-1]
    hist = np.bincount(np.asarray(logits.argmax(-1)), minlength=classes) / len(x)
    report = {
        "num": int(len(x)),
        "class_histogram": [float(h) for h in hist],
        "mean_confidence": float(p.max(-1).mean()),
        "mean_entropy": float(-(p * jnp.log(p + 1e-12)).sum(-1).mean()),
        "tv_from_uniform": float(0.5 * np.abs(hist - 1.0 / classes).sum()),
        "classes_hit": int((hist > 0).sum()),
    }
    if batchnorm_nodes(net):
        report["bn_mismatch"] = float(bn_mismatch(net, x))
    return report
