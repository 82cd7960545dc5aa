"""Paoding: progressive, data-free merging of hidden units, scored by intervals.

Implements Meng, Bai, Teo, Hou, Xiao, Lin & Dong (2022), "Paoding: Supervised
Robustness-preserving Data-free Neural Network Pruning" (code: mark-h-meng/nnprune,
PyPI ``paoding-dl``), as the method ``paoding``.

Dense hidden units are removed in *epochs*: in each epoch every Dense layer that
has not reached its quota nominates ``ceil(step * width)`` pairs ``(i, j)`` of
live units (``step`` = 1.5625% by default) and merges each: unit ``i`` is kept and
takes over ``j``'s outgoing weights (``w_out[i] += w_out[j]``), unit ``j`` is
removed. Pairs come from the saliency matrix

    ``S[i, j] = ||w_in_i - w_in_j|| * ||w_out_j||``
    (``bias_aware``: ``(|b_i - b_j| / |b_i + b_j| + ||w_in_i - w_in_j||) ||w_out_j||``),

lowest first, disjoint inside an epoch. Modes:

* ``baseline``: the pairs of lowest saliency;
* ``impact`` (the original's "greedy"): a pool of ``pooling_multiplier`` times
  as many lowest-saliency pairs, each scored by the interval metric below; the
  best-scored pairs are merged;
* ``stochastic``: every disjoint pair, in saliency order, is scored and walked
  with simulated annealing: a pair is accepted when its score is at most the
  layer's current target score (which it then becomes), else with probability
  ``exp(-(score - target) / T)``, ``T = 1.0001 - touched / width`` (``touched``:
  units already merged in this layer); walks repeat until the epoch's quota.

The interval score of merging ``(keep, remove)``: the merge changes the next
layer's pre-activation by ``delta = (h_keep - h_remove) * w_out_remove`` (before
the merge that layer received ``h_keep w_keep + h_remove w_remove``, after it
``h_keep (w_keep + w_remove)``), with ``h`` ranging over the unit's interval
bounds from the input box. ``delta`` is propagated to the output, giving impact
intervals ``[dl_c, du_c]``, scored ``alpha * sigmoid(L) + beta * sigmoid(ENT)``
with ``L = sum_c (du_c - dl_c)`` and ``ENT`` the interval entropy (the metric of
:mod:`gapruning.fitness.interval`, whose ``paoding_entropy`` is reused; ``alpha,
beta = 0.75, 0.25``, the original's defaults). Scoring all candidates of a layer
is one jitted call, ``vmap`` ped over the candidate pairs.

Convolutional layers (and Dense groups that cannot be merged: coupled groups,
several consumers, a non-chain tail) are pruned in one shot by the L1 norm of
each channel's incoming kernel divided by the kernel size, the original's
``SamplingMode.SCALE``.

What differs from the original:

* **The merge delta.** The original code merges ``w_out[a] += w_out[b]`` (keeps
  ``a``, removes ``b``) but scores the pair with ``(h_a - h_b) * w_out[a]``, the
  outgoing weights of the *kept* unit, where the removed unit's belong. The
  correct delta is used by default; ``original_delta=True`` restores the
  original's.
* **Sound propagation.** The original propagates the impact interval through
  later layers as if it were an activation (affine map with bias, then ReLU
  clamping), which is not a bound on the output change. Here the difference is
  propagated with the sound rules of :func:`gapruning.fitness.interval.impact_bounds`
  (linear maps without bias, ReLU by the current network's pre-activation bounds).
* **Exact budgets.** The original removes a percentage of every Dense layer.
  Here the kept count of every group is fixed first by the library's budget
  decoder from a uniform-ratio ranking (units, params or FLOPs, exact as
  :class:`~gapruning.encoding.BudgetDecoder`), and each layer merges until it
  reaches its count (the last epoch of a layer merges only what is left).
* Saliency and unit bounds are recomputed from the current (merged) weights at
  every epoch (the original caches the baseline saliency matrix across epochs).
* ``recursive=True`` (the original's ``recursive_pruning``) lets a kept unit be
  merged again in later epochs; when fewer eligible pairs than needed remain, the
  touched units are released. The stochastic walk re-walks only unaccepted pairs
  (the original re-walks the whole list) and, after ``max_walks`` walks, accepts
  the best-scored remaining pairs, so it always ends.
* ``normalize=True`` divides ``L`` by the current network's output interval
  width. Off by default, as in the original; but from the whole input box the
  impact widths of a pair of LeNet-300-100 units are large, ``sigmoid(L)`` is
  then 1 for every pair (scores measured in [0.875, 0.99] in the stochastic walk
  of fc1: only ``ENT`` ranks the pairs), while with ``normalize=True`` they
  spread over [0.50, 0.61].
* The input region is the model's input box (the original uses pixels in
  [0, 1], i.e. the same box before normalisation).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..fitness.interval import activation_delta, paoding_entropy, propagate_bounds
from ..models import Net, Node
from ..recover import group_consumers
from ..space import PruneSpace
from ..zoo import Pretrained
from . import MethodContext, MethodResult, register_method

MODES = ("baseline", "impact", "stochastic")
TAIL_OPS = frozenset(
    {"dense", "relu", "sigmoid", "mask", "batchnorm", "softmax", "flatten"}
)


# ------------------------------------------------------------------ pure pieces


def pair_saliency(w_in, w_out, bias=None) -> np.ndarray:
    """``S[i, j] = ||w_in_i - w_in_j|| * ||w_out_j||`` (``bias``: the bias-aware
    variant), in float64; ``w_in`` is ``(units, fan_in)``, ``w_out`` ``(units,
    fan_out)``. The diagonal is ``inf`` (a unit is never merged with itself)."""
    w_in = np.asarray(w_in, np.float64)
    w_out = np.asarray(w_out, np.float64)
    sq = (w_in**2).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * w_in @ w_in.T, 0.0))
    if bias is not None:
        b = np.asarray(bias, np.float64)
        den = b[:, None] + b[None, :]
        term = (b[:, None] - b[None, :]) / np.where(den == 0, 1e-12, den)
        dist = dist + np.abs(term)
    s = dist * np.linalg.norm(w_out, axis=1)[None, :]
    np.fill_diagonal(s, np.inf)
    return s


def merge_pair(w_out, keep: int, remove: int) -> np.ndarray:
    """Outgoing weights ``(units, fan_out)`` after merging ``remove`` into ``keep``:
    ``w_out[keep] += w_out[remove]``, ``w_out[remove] = 0``."""
    w = np.array(w_out, copy=True)
    w[keep] = w[keep] + w[remove]
    w[remove] = 0
    return w


def merge_delta(h_lo, h_hi, w_out, keep, remove, *, original: bool = False):
    """Interval ``(lower, upper)`` of the change of the next layer's pre-activation
    caused by merging ``remove`` into ``keep``: ``(h_keep - h_remove) *
    w_out[remove]`` with ``h`` in ``[h_lo, h_hi]`` (``original``: times
    ``w_out[keep]``, as the original code). Works on arrays of pairs."""
    a_lo = h_lo[keep] - h_hi[remove]
    a_hi = h_hi[keep] - h_lo[remove]
    w = w_out[keep] if original else w_out[remove]
    mid, rad = (a_lo + a_hi) / 2, (a_hi - a_lo) / 2
    c = mid[..., None] * w
    r = rad[..., None] * jnp.abs(w)
    return c - r, c + r


def propagate_delta(tail: tuple[Node, ...], params, bounds, masks, lo, hi):
    """Bounds of the output change caused by a change in ``[lo, hi]`` of the
    tensor read by ``tail[0]`` (sound rules of ``impact_bounds``); ``bounds``: the
    current network's interval bounds of the tensors the ReLUs read."""
    c, r = (lo + hi) / 2, (hi - lo) / 2
    for n in tail:
        if n.op == "dense":
            k = params[n.name]["kernel"]
            c, r = c @ k, r @ jnp.abs(k)
        elif n.op == "batchnorm":
            p = params[n.name]
            s = p["scale"] * jax.lax.rsqrt(p["var"] + n.attr("epsilon"))
            c, r = c * s, r * jnp.abs(s)
        elif n.op == "mask":
            m = masks[n.attr("group")]
            c, r = c * m, r * m
        elif n.op in ("relu", "sigmoid"):
            c, r = activation_delta(n.op, bounds[n.inputs[0]], c, r)
        elif n.op == "softmax":
            big = jnp.abs(jnp.stack([c - r, c + r])).max()
            c, r = jnp.zeros_like(c), jnp.full_like(r, big / 2)
        # flatten of a flat tensor: nothing to do
    return c - r, c + r


def interval_score(dl, du, alpha=0.75, beta=0.25, threshold=0.9, scale=1.0):
    """``alpha * sigmoid(L) + beta * sigmoid(ENT)`` of output impact intervals
    (``L`` divided by ``scale``)."""
    big_l = (du - dl).sum(-1) / scale
    ent = paoding_entropy(dl, du, threshold)
    return alpha * jax.nn.sigmoid(big_l) + beta * jax.nn.sigmoid(ent)


# ------------------------------------------------------------------ structure


class _Layer:
    """A mergeable Dense group: producer ``prod``, the mask it is read through,
    the single Dense consumer ``cons`` and the chain of nodes after it."""

    def __init__(self, group, offset, prod, mask, cons, tail):
        self.group, self.offset, self.prod = group, offset, prod
        self.mask, self.cons, self.tail = mask, cons, tail
        self.size = group.size


def _mergeable(model: Net, space: PruneSpace, g, offset) -> _Layer | None:
    if g.kind != "dense" or len(g.members) != 1:
        return None
    cons = group_consumers(model, g.name)
    if len(cons) != 1 or cons[0][1] != 1 or space.node(cons[0][0]).op != "dense":
        return None
    masks = [n for n in model.nodes if n.op == "mask" and n.attr("group") == g.name]
    if len(masks) != 1:
        return None
    readers: dict[str, list[str]] = {}
    for n in model.nodes:
        for i in n.inputs:
            readers.setdefault(i, []).append(n.name)
    tail, name = [], cons[0][0]
    while name != model.nodes[-1].name:
        nxt = readers.get(name, [])
        if len(nxt) != 1:
            return None
        node = space.node(nxt[0])
        if node.op not in TAIL_OPS or len(node.inputs) != 1:
            return None
        if node.op == "flatten" and len(space.node(name).shape) != 1:
            return None
        tail.append(node)
        name = node.name
    return _Layer(g, offset, g.members[0], masks[0], cons[0][0], tuple(tail))


def scale_scores(model: Net, space: PruneSpace) -> np.ndarray:
    """Paoding's conv criterion: L1 norm of each unit's incoming kernel divided by
    the kernel size (summed over coupled producers)."""
    scores = []
    for g in space.groups:
        total = np.zeros(g.size)
        for layer in g.members:
            k = np.abs(np.asarray(model.layers[layer].kernel[...]))
            k = k.reshape(-1, k.shape[-1])
            total += k.sum(0) / k.shape[0]
        scores.append(total)
    return np.concatenate(scores)


def _quotas(ctx: MethodContext) -> np.ndarray:
    """Kept units per group meeting the budget, from a uniform-ratio ranking."""
    space = ctx.space
    pos = np.concatenate([-(np.arange(s) + 1.0) / s for s in space.sizes])
    masks = ctx.decode(pos)
    return np.array([int(masks[g].sum()) for g in space.group_names])


def _disjoint_pairs(sal: np.ndarray, eligible: np.ndarray, limit: int):
    """Up to ``limit`` disjoint ``(keep, remove)`` pairs of eligible units, lowest
    saliency first (ties by index)."""
    idx = np.flatnonzero(eligible)
    if len(idx) < 2:
        return []
    sub = sal[np.ix_(idx, idx)]
    order = np.argsort(sub, axis=None, kind="stable")
    used = np.zeros(len(idx), bool)
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), len(idx))
        if i == j or used[i] or used[j] or not np.isfinite(sub[i, j]):
            continue
        used[i] = used[j] = True
        pairs.append((int(idx[i]), int(idx[j])))
        if len(pairs) >= limit:
            break
    return pairs


# ------------------------------------------------------------------ the method


def paoding(
    ctx: MethodContext,
    mode: str = "stochastic",
    step: float = 0.015625,
    alpha: float = 0.75,
    beta: float = 0.25,
    pooling_multiplier: int = 2,
    bias_aware: bool = False,
    recursive: bool = True,
    original_delta: bool = False,
    normalize: bool = False,
    max_walks: int = 100,
) -> MethodResult:
    """Paoding's progressive pair merging (see the module docstring).

    Args:
        mode: "baseline", "impact" or "stochastic".
        step: fraction of each Dense layer's width merged per epoch.
        alpha, beta: weights of ``sigmoid(L)`` and ``sigmoid(ENT)``.
        pooling_multiplier: candidate pool size over the pairs needed ("impact").
        bias_aware: the bias-aware saliency.
        recursive: a kept unit may be merged again in later epochs.
        original_delta: score with the original code's ``(h_a - h_b) w_out[a]``.
        normalize: divide ``L`` by the current network's output interval width
            (the original does not).
        max_walks: simulated-annealing walks per epoch before accepting the
            best-scored remaining pairs.
    """
    if mode not in MODES:
        raise ValueError(f"unknown paoding mode {mode!r}; known: {', '.join(MODES)}")
    if not 0.0 < step <= 1.0:
        raise ValueError(f"step must be in (0, 1], got {step}")
    t0 = time.perf_counter()
    rng = np.random.default_rng(ctx.seed)
    space = ctx.space
    work = nnx.clone(ctx.net.model)
    quota_keep = _quotas(ctx)
    alive = np.ones(space.num_units, bool)

    layers, merged = [], {}
    scale_groups = []
    for gi, (g, o) in enumerate(zip(space.groups, space.offsets, strict=True)):
        lay = _mergeable(work, space, g, o)
        if lay is None:
            scale_groups.append(g.name)
            part = scale_scores(work, space)[o : o + g.size]
            order = np.lexsort((np.arange(g.size), -part))
            alive[o + order[quota_keep[gi] :]] = False
        else:
            lay.keep = int(quota_keep[gi])
            lay.step = max(1, math.ceil(step * g.size))
            lay.touched = np.zeros(g.size, bool)
            lay.target = None
            layers.append(lay)
            merged[g.name] = []

    lo_box, hi_box = ctx.net.input_box
    shape = (1, *ctx.net.input_shape)
    x_lo = jnp.full(shape, lo_box, jnp.float32)
    x_hi = jnp.full(shape, hi_box, jnp.float32)
    graphdef, state = nnx.split(work)
    needed = frozenset(
        {lay.mask.inputs[0] for lay in layers}
        | {n.inputs[0] for lay in layers for n in lay.tail if n.op == "relu"}
        | {work.nodes[-1].name}
    )

    @jax.jit
    def bounds_fn(state, masks):
        return propagate_bounds(
            nnx.merge(graphdef, state), x_lo, x_hi, masks, keep=needed
        )

    score_fns = {}

    def scorer(lay: _Layer):
        if lay.group.name not in score_fns:

            @jax.jit
            def fn(params, bounds, masks, h_lo, h_hi, w_out, keep, remove, scale):
                dlo, dhi = merge_delta(
                    h_lo, h_hi, w_out, keep, remove, original=original_delta
                )

                def one(lo, hi):
                    dl, du = propagate_delta(lay.tail, params, bounds, masks, lo, hi)
                    return interval_score(dl[None], du[None], alpha, beta, 0.9, scale)[
                        0
                    ]

                return jax.vmap(one)(dlo, dhi)

            score_fns[lay.group.name] = fn
        return score_fns[lay.group.name]

    evaluations, epochs = 0, 0
    history = {"removed": []}

    def unfinished() -> bool:
        return any(
            alive[lay.offset : lay.offset + lay.size].sum() > lay.keep for lay in layers
        )

    while unfinished():
        epochs += 1
        for lay in layers:
            sl = slice(lay.offset, lay.offset + lay.size)
            live = alive[sl]
            need = min(lay.step, int(live.sum()) - lay.keep)
            if need <= 0:
                continue
            pure = nnx.to_pure_dict(nnx.state(work.layers))
            k_in = np.asarray(pure[lay.prod]["kernel"])
            w_in = k_in.reshape(-1, lay.size).T
            w_out = np.asarray(pure[lay.cons]["kernel"])
            bias = np.asarray(pure[lay.prod]["bias"]) if bias_aware else None
            sal = pair_saliency(w_in, w_out, bias)
            eligible = live & ~lay.touched
            if eligible.sum() < 2 * need:
                lay.touched[:] = False
                eligible = live.copy()
            if mode == "baseline":
                chosen = _disjoint_pairs(sal, eligible, need)
            else:
                limit = need * pooling_multiplier if mode == "impact" else lay.size
                pool = _disjoint_pairs(sal, eligible, limit)
                masks = space.unflat(jnp.asarray(alive, jnp.float32))
                bounds = bounds_fn(nnx.state(work), masks)
                h_lo, h_hi = (b[0] for b in bounds[lay.mask.inputs[0]])
                scale = 1.0
                if normalize:
                    o_lo, o_hi = bounds[work.nodes[-1].name]
                    scale = jnp.maximum((o_hi - o_lo).sum(), 1e-12)
                bnd = {k: (v[0][0], v[1][0]) for k, v in bounds.items()}
                size = 1 << max(0, (len(pool) - 1).bit_length())  # pad: few shapes
                keep_i = np.array([p[0] for p in pool] + [0] * (size - len(pool)))
                rem_i = np.array([p[1] for p in pool] + [1] * (size - len(pool)))
                scores = np.asarray(
                    scorer(lay)(
                        pure,
                        bnd,
                        masks,
                        h_lo,
                        h_hi,
                        jnp.asarray(w_out),
                        keep_i,
                        rem_i,
                        scale,
                    )
                )[: len(pool)]
                evaluations += len(pool)
                if mode == "impact":
                    best = np.argsort(scores, kind="stable")[:need]
                    chosen = [pool[i] for i in sorted(best)]
                else:
                    chosen = _anneal(pool, scores, need, lay, rng, max_walks)
            for keep, remove in chosen:
                w_out = merge_pair(w_out, keep, remove)
                alive[lay.offset + remove] = False
                lay.touched[remove] = True
                lay.touched[keep] = not recursive
                merged[lay.group.name].append((keep, remove))
            work.layers[lay.cons].kernel[...] = jnp.asarray(w_out)
        history["removed"].append(int((~alive).sum()))
    masks = {k: np.asarray(v, bool) for k, v in space.unflat(alive).items()}
    result_net = Pretrained(work, dict(ctx.net.card))
    return MethodResult(
        masks,
        result_net,
        history={k: np.asarray(v) for k, v in history.items()},
        evaluations=evaluations,
        seconds=time.perf_counter() - t0,
        details={
            "mode": mode,
            "epochs": epochs,
            "step": step,
            "merged_pairs": {g: len(p) for g, p in merged.items()},
            "scale_mode_groups": scale_groups,
            "original_delta": original_delta,
        },
    )


def _anneal(pool, scores, need, lay, rng, max_walks):
    """Simulated-annealing walk over ``pool`` (saliency order) until ``need``
    pairs are accepted; updates ``lay.target``."""
    accepted, pending = [], list(range(len(pool)))
    touched = int(lay.touched.sum())
    for _ in range(max_walks):
        rest = []
        for i in pending:
            if len(accepted) >= need:
                rest.append(i)
                continue
            s = float(scores[i])
            if lay.target is None or s <= lay.target:
                ok = True
            else:
                temperature = 1.0001 - (touched + 2 * len(accepted)) / lay.size
                temperature = max(temperature, 1e-4)
                ok = rng.random() < math.exp(-(s - lay.target) / temperature)
            if ok:
                lay.target = s
                accepted.append(i)
            else:
                rest.append(i)
        pending = rest
        if len(accepted) >= need or not pending:
            break
    if len(accepted) < need:
        pending.sort(key=lambda i: float(scores[i]))
        accepted += pending[: need - len(accepted)]
    return [pool[i] for i in sorted(accepted)]


register_method(
    "paoding",
    paoding,
    "Paoding (Meng et al. 2022): progressive pair merging scored by interval impact",
)
