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
  impact widths of a pair of units of an MLP such as LeNet-300-100 can be so
  large that ``sigmoid(L)`` saturates near 1 for every pair (only ``ENT`` then
  ranks the pairs), while with ``normalize=True`` the scores spread out.
* The input region is the model's input box (the original uses pixels in
  [0, 1], i.e. the same box before normalisation).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..encoding import per_unit, rank_in_groups
from ..fitness.interval import activation_delta, paoding_entropy, propagate_bounds
from ..models import Net, Node, group_consumers
from ..models.ops import op_of
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
            m = op_of(n).mask_vector(n, masks.__getitem__)
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


@dataclasses.dataclass
class _Layer:
    """A mergeable Dense group: producer ``prod``, the mask it is read through,
    the single Dense consumer ``cons`` and the chain of nodes after it; while
    merging, the units it ``keep`` s, the pairs per epoch (``step``), the units
    already ``touched`` and the annealing ``target`` score."""

    group: Any
    offset: int
    prod: str
    mask: Node
    cons: str
    tail: tuple[Node, ...]
    keep: int = 0
    step: int = 1
    touched: np.ndarray | None = None
    target: float | None = None

    @property
    def size(self) -> int:
        return self.group.size

    @property
    def units(self) -> slice:
        return slice(self.offset, self.offset + self.size)


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
            total += per_unit(k.sum(0) / k.shape[0], g.size)
        scores.append(total)
    return np.concatenate(scores)


def uniform_ranking(space: PruneSpace) -> np.ndarray:
    """Unit scores that rank every group's units at the same relative positions
    (decoded under a budget: the same keep ratio in every group, exactly)."""
    return np.concatenate([-(np.arange(s) + 1.0) / s for s in space.sizes])


def plan_layers(model: Net, space: PruneSpace, quotas, step: float):
    """``(layers, scale_groups, alive)``: the mergeable Dense groups, each to
    merge down to its quota ``step`` of its width at a time, and the other groups,
    pruned at once to their quota by :func:`scale_scores` (``alive``: the units
    kept so far)."""
    alive = np.ones(space.num_units, bool)
    layers, scale_groups, ranks = [], [], None
    for g, o in zip(space.groups, space.offsets, strict=True):
        lay = _mergeable(model, space, g, o)
        if lay is None:
            scale_groups.append(g.name)
            if ranks is None:
                ranks = rank_in_groups(scale_scores(model, space), space)
            alive[o : o + g.size] = ranks[o : o + g.size] < quotas[g.name]
        else:
            lay.keep = int(quotas[g.name])
            lay.step = max(1, math.ceil(step * g.size))
            lay.touched = np.zeros(g.size, bool)
            layers.append(lay)
    return layers, scale_groups, alive


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


def bounds_function(net: Pretrained, model: Net, layers: list[_Layer]):
    """A jitted ``(state, masks) -> bounds`` of ``model`` (same graph as
    ``net``'s) from ``net``'s input box: the tensors the layers' masks and tail
    ReLUs read, and the output."""
    lo_box, hi_box = net.input_box
    shape = (1, *net.input_shape)
    x_lo = jnp.full(shape, lo_box, jnp.float32)
    x_hi = jnp.full(shape, hi_box, jnp.float32)
    graphdef, _ = nnx.split(model)
    needed = frozenset(
        {lay.mask.inputs[0] for lay in layers}
        | {n.inputs[0] for lay in layers for n in lay.tail if n.op == "relu"}
        | {model.nodes[-1].name}
    )

    @jax.jit
    def bounds_fn(state, masks):
        return propagate_bounds(
            nnx.merge(graphdef, state), x_lo, x_hi, masks, keep=needed
        )

    return bounds_fn


def pair_scorer(lay: _Layer, alpha: float, beta: float, original_delta: bool):
    """A jitted scorer of candidate pairs ``(keep, remove)`` of ``lay``: the
    interval score of each merge's output impact, ``vmap`` ped over the pairs."""

    @jax.jit
    def fn(params, bounds, masks, h_lo, h_hi, w_out, keep, remove, scale):
        dlo, dhi = merge_delta(h_lo, h_hi, w_out, keep, remove, original=original_delta)

        def one(lo, hi):
            dl, du = propagate_delta(lay.tail, params, bounds, masks, lo, hi)
            return interval_score(dl[None], du[None], alpha, beta, 0.9, scale)[0]

        return jax.vmap(one)(dlo, dhi)

    return fn


# ------------------------------------------------------------------ the method


@dataclasses.dataclass(frozen=True)
class PaodingOptions:
    """The options of :func:`paoding` (documented there)."""

    mode: str = "stochastic"
    step: float = 0.015625
    alpha: float = 0.75
    beta: float = 0.25
    pooling_multiplier: int = 2
    bias_aware: bool = False
    recursive: bool = True
    original_delta: bool = False
    normalize: bool = False
    max_walks: int = 100

    def __post_init__(self):
        if self.mode not in MODES:
            known = ", ".join(MODES)
            raise ValueError(f"unknown paoding mode {self.mode!r}; known: {known}")
        if not 0.0 < self.step <= 1.0:
            raise ValueError(f"step must be in (0, 1], got {self.step}")


class Merger:
    """The state of one Paoding run: the network being merged (``work``), the
    ``alive`` units, the mergeable ``layers``; :meth:`epoch` merges every
    unfinished layer by one step."""

    def __init__(self, ctx: MethodContext, opts: PaodingOptions):
        self.ctx, self.opts, self.space = ctx, opts, ctx.space
        self.rng = np.random.default_rng(ctx.seed)
        self.work = nnx.clone(ctx.net.model)
        quotas = ctx.quotas(uniform_ranking(self.space))
        self.layers, self.scale_groups, self.alive = plan_layers(
            self.work, self.space, quotas, opts.step
        )
        self.merged = {lay.group.name: [] for lay in self.layers}
        self.bounds_fn = bounds_function(ctx.net, self.work, self.layers)
        self.scorers = {
            lay.group.name: pair_scorer(lay, opts.alpha, opts.beta, opts.original_delta)
            for lay in self.layers
        }
        self.evaluations, self.epochs, self.removed = 0, 0, []

    def unfinished(self) -> bool:
        return any(self.alive[lay.units].sum() > lay.keep for lay in self.layers)

    def epoch(self) -> None:
        self.epochs += 1
        for lay in self.layers:
            self.merge_layer(lay)
        self.removed.append(int((~self.alive).sum()))

    def merge_layer(self, lay: _Layer) -> None:
        """Merges up to ``lay.step`` pairs of ``lay`` (no more than its quota)."""
        live = self.alive[lay.units]
        need = min(lay.step, int(live.sum()) - lay.keep)
        if need <= 0:
            return
        pure = nnx.to_pure_dict(nnx.state(self.work.layers))
        w_in = np.asarray(pure[lay.prod]["kernel"]).reshape(-1, lay.size).T
        w_out = np.asarray(pure[lay.cons]["kernel"])
        bias = np.asarray(pure[lay.prod]["bias"]) if self.opts.bias_aware else None
        sal = pair_saliency(w_in, w_out, bias)
        eligible = live & ~lay.touched
        if eligible.sum() < 2 * need:
            lay.touched[:] = False
            eligible = live.copy()
        for keep, remove in self.choose(lay, pure, w_out, sal, eligible, need):
            w_out = merge_pair(w_out, keep, remove)
            self.alive[lay.offset + remove] = False
            lay.touched[remove] = True
            lay.touched[keep] = not self.opts.recursive
            self.merged[lay.group.name].append((keep, remove))
        self.work.layers[lay.cons].kernel[...] = jnp.asarray(w_out)

    def choose(self, lay: _Layer, pure, w_out, sal, eligible, need: int):
        """The ``need`` pairs to merge, by the mode."""
        mode = self.opts.mode
        if mode == "baseline":
            return _disjoint_pairs(sal, eligible, need)
        limit = need * self.opts.pooling_multiplier if mode == "impact" else lay.size
        pool = _disjoint_pairs(sal, eligible, limit)
        scores = self.score_pool(lay, pure, w_out, pool)
        self.evaluations += len(pool)
        if mode == "impact":
            best = np.argsort(scores, kind="stable")[:need]
            return [pool[i] for i in sorted(best)]
        return _anneal(pool, scores, need, lay, self.rng, self.opts.max_walks)

    def score_pool(self, lay: _Layer, pure, w_out, pool) -> np.ndarray:
        """Interval scores of merging each pair of ``pool`` (one jitted call)."""
        masks = self.space.unflat(jnp.asarray(self.alive, jnp.float32))
        bounds = self.bounds_fn(nnx.state(self.work), masks)
        h_lo, h_hi = (b[0] for b in bounds[lay.mask.inputs[0]])
        scale = 1.0
        if self.opts.normalize:
            o_lo, o_hi = bounds[self.work.nodes[-1].name]
            scale = jnp.maximum((o_hi - o_lo).sum(), 1e-12)
        bnd = {k: (v[0][0], v[1][0]) for k, v in bounds.items()}
        size = 1 << max(0, (len(pool) - 1).bit_length())  # pad: few shapes
        keep_i = np.array([p[0] for p in pool] + [0] * (size - len(pool)))
        rem_i = np.array([p[1] for p in pool] + [1] * (size - len(pool)))
        fn = self.scorers[lay.group.name]
        scores = fn(
            pure, bnd, masks, h_lo, h_hi, jnp.asarray(w_out), keep_i, rem_i, scale
        )
        return np.asarray(scores)[: len(pool)]

    def result(self, seconds: float) -> MethodResult:
        masks = {
            k: np.asarray(v, bool) for k, v in self.space.unflat(self.alive).items()
        }
        details = {
            "mode": self.opts.mode,
            "epochs": self.epochs,
            "step": self.opts.step,
            "merged_pairs": {g: len(p) for g, p in self.merged.items()},
            "scale_mode_groups": self.scale_groups,
            "original_delta": self.opts.original_delta,
        }
        net = Pretrained(self.work, dict(self.ctx.net.card))
        history = {"removed": np.asarray(self.removed)}
        return MethodResult(
            masks,
            net,
            history=history,
            evaluations=self.evaluations,
            seconds=seconds,
            details=details,
        )


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
    opts = PaodingOptions(
        mode,
        step,
        alpha,
        beta,
        pooling_multiplier,
        bias_aware,
        recursive,
        original_delta,
        normalize,
        max_walks,
    )
    t0 = time.perf_counter()
    merger = Merger(ctx, opts)
    while merger.unfinished():
        merger.epoch()
    return merger.result(time.perf_counter() - t0)


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
