"""One-shot pruning criteria: score every unit from the weights alone, keep the
best-scored units under the exact budget (no search, no fitness, no data).

* ``l1``: L1 norm of each unit's incoming weights (summed over coupled producers),
  the magnitude criterion of Li et al. (2017, "Pruning Filters for Efficient
  ConvNets").
* ``l2_out``: L2 norm of each unit's outgoing weights (every kernel entry that
  reads the unit, over every consumer; after a flatten, every spatial position),
  the "onorm" criterion of He et al. (2014, "Reshaping deep neural network for
  fast decoding by node-pruning"), which uses the average L1 norm: the L2 norm is
  used here, as the issue asks.
* ``random_mask``: uniform random scores (seeded), the sanity baseline.
* ``synflow``: Iterative Synaptic Flow Pruning (Tanaka, Kunin, Yamins & Ganguli,
  2020, "Pruning neural networks without any data by iteratively conserving
  synaptic flow"). Every parameter (BatchNorm running statistics included) is
  replaced by its absolute value, the network (eval mode) is run on one all-ones
  input, ``R = sum(outputs)``, and a parameter's score is ``|dR/dθ ⊙ θ|``.
  Pruning is iterative: after iteration ``k`` of ``n`` the kept share of the
  budget's measure is ``(1 - target) ** (k / n)`` (the paper's exponential
  schedule), masked units staying masked; the last iteration meets the budget
  exactly.

  What differs from SynFlow: the paper prunes single weights; here pruning is
  structured, so a **unit's score is the sum of the scores of the parameters
  that only it owns**: its column of every producer kernel (coupled groups: every
  member layer), its bias entries, and the scale/bias of the BatchNorm layers on
  its channel. Scores are computed in float64 (``jax.enable_x64``)
  as in the paper's reference code. ``iterations`` defaults to 100 (the paper's
  value).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..encoding import Budget, l1_unit_scores
from ..models import Net, group_consumers
from ..space import PruneSpace
from ..zoo import Pretrained
from . import MethodContext, MethodResult, register_method


def l1(ctx: MethodContext) -> MethodResult:
    """Keeps the units with the largest incoming-weight L1 norm."""
    t0 = time.perf_counter()
    masks = ctx.decode(l1_unit_scores(ctx.net.model, ctx.space))
    return MethodResult(masks, ctx.net, seconds=time.perf_counter() - t0)


def random_mask(ctx: MethodContext) -> MethodResult:
    """Keeps uniformly random units (seeded by ``ctx.seed``)."""
    t0 = time.perf_counter()
    scores = np.random.default_rng(ctx.seed).random(ctx.space.num_units)
    masks = ctx.decode(scores)
    return MethodResult(masks, ctx.net, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------- outgoing norm


def outgoing_rows(model: Net, group: str, size: int) -> list[np.ndarray]:
    """For each consumer of ``group``: its kernel as ``(units, fan_out)`` rows, the
    outgoing weights of every unit."""
    rows = []
    for layer, positions in group_consumers(model, group):
        k = np.asarray(model.layers[layer].kernel[...])
        if k.ndim == 2:  # dense (positions * units, out)
            k = k.reshape(positions, size, -1).transpose(1, 0, 2)
        else:  # conv HWIO
            k = np.moveaxis(k, -2, 0)
        rows.append(k.reshape(size, -1))
    return rows


def l2_out_scores(model: Net, space: PruneSpace) -> np.ndarray:
    """L2 norm of every unit's outgoing weights, over all its consumers."""
    scores = []
    for g in space.groups:
        sq = np.zeros(g.size)
        for r in outgoing_rows(model, g.name, g.size):
            sq += (r.astype(np.float64) ** 2).sum(1)
        scores.append(np.sqrt(sq))
    return np.concatenate(scores)


def l2_out(ctx: MethodContext) -> MethodResult:
    """Keeps the units with the largest outgoing-weight L2 norm."""
    t0 = time.perf_counter()
    masks = ctx.decode(l2_out_scores(ctx.net.model, ctx.space))
    return MethodResult(masks, ctx.net, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------- SynFlow


def _unit_owned(space: PruneSpace, params: dict) -> list[tuple[str, str, int, int]]:
    """``(layer, variable, group offset, group size)`` of every parameter whose last
    axis indexes a group's channels: the variables of the group's nodes (``params``:
    layer -> variable -> array) as wide as the node's output (producer kernels and
    biases, depthwise kernels, BatchNorm and LayerNorm scale and bias, token
    tables)."""
    owned = []
    for g, o in zip(space.groups, space.offsets, strict=True):
        for n in space.nodes:
            if space.group_of(n.name) != g.name:
                continue
            for var, value in params.get(n.name, {}).items():
                if value.ndim and value.shape[-1] == n.shape[-1]:
                    owned.append((n.name, var, o, g.size))
    return owned


def _synflow_fn(model: Net, space: PruneSpace):
    """A jitted float64 ``masks -> per-unit scores`` for ``model`` (x64 on)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def absolute(tree):
        return jax.tree.map(lambda a: jnp.abs(jnp.asarray(a, jnp.float64)), tree)

    pure = absolute(nnx.to_pure_dict(params))
    rest_pure = absolute(nnx.to_pure_dict(rest))
    owned = _unit_owned(space, pure.get("layers", {}))

    def flow(p, masks):
        ps, rs = nnx.State(params), nnx.State(rest)
        nnx.replace_by_pure_dict(ps, p)
        nnx.replace_by_pure_dict(rs, {**rest_pure, "masks": masks})
        m = nnx.merge(graphdef, ps, rs)
        return m(jnp.ones((1, *m.input_shape), jnp.float64)).sum()

    @jax.jit
    def scores(masks):
        grads = jax.grad(flow)(pure, masks)
        out = jnp.zeros(space.num_units, jnp.float64)
        for layer, var, o, size in owned:
            s = jnp.abs(grads["layers"][layer][var] * pure["layers"][layer][var])
            per_unit = s.reshape(-1, size, s.shape[-1] // size)  # heads: d channels
            out = out.at[o : o + size].add(per_unit.sum((0, 2)))
        return out

    return scores


def synflow_scores(net: Pretrained | Net, masks=None) -> np.ndarray:
    """One SynFlow pass: per-unit sums of ``|dR/dθ ⊙ θ|`` (float64), ``R`` the
    summed output of the ``|θ|`` network on an all-ones input under ``masks``
    (group -> 0/1 units; default all kept)."""
    model = net.model if isinstance(net, Pretrained) else net
    space = PruneSpace(model)
    masks = space.full_masks() if masks is None else masks
    with jax.enable_x64(True):
        fn = _synflow_fn(model, space)
        m = {g: jnp.asarray(masks[g], jnp.float64) for g in space.group_names}
        return np.asarray(fn(m))


def _select(space: PruneSpace, budget: Budget, scores: np.ndarray) -> np.ndarray:
    """NumPy twin of :class:`BudgetDecoder` for the intermediate SynFlow steps:
    the best ``min_keep`` units of every group, then units in score order (stable)
    while the budget allows. Not the decoder itself: it ranks the float64 scores
    exactly (the decoder ranks float32 ones, where close scores tie) and compiles
    nothing per step."""
    order = np.argsort(-scores, kind="stable")
    gid = np.repeat(np.arange(len(space.groups)), space.sizes)
    keep_frac = 1.0 - float(budget.target)
    kept = np.zeros(space.num_units, bool)
    counts = np.zeros(len(space.groups), np.int64)
    for u in order:  # forced
        if counts[gid[u]] < budget.min_keep:
            kept[u], counts[gid[u]] = True, counts[gid[u]] + 1
    if budget.kind == "units":
        sizes = np.array(space.sizes)
        if budget.per_group:
            quota = np.maximum(np.round(keep_frac * sizes), budget.min_keep)
        else:
            total = int(round(keep_frac * space.num_units))
        for u in order:
            if kept[u]:
                continue
            if budget.per_group and counts[gid[u]] >= quota[gid[u]]:
                continue
            if not budget.per_group and counts.sum() >= total:
                break
            kept[u], counts[gid[u]] = True, counts[gid[u]] + 1
        return kept
    dense = space.dense_params if budget.kind == "params" else space.dense_flops
    for u in order:
        if kept[u]:
            continue
        trial = counts.copy()
        trial[gid[u]] += 1
        if space.cost_of_counts(trial, budget.kind) > keep_frac * dense:
            break
        kept[u], counts = True, trial
    return kept


def synflow(ctx: MethodContext, iterations: int = 100) -> MethodResult:
    """Iterative SynFlow (see the module docstring)."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    t0 = time.perf_counter()
    space, budget = ctx.space, ctx.budget
    alive = np.ones(space.num_units, bool)
    keep_final = 1.0 - float(budget.target)
    with jax.enable_x64(True):
        fn = _synflow_fn(ctx.net.model, space)
        for k in range(1, iterations + 1):
            masks = {
                g: jnp.asarray(m, jnp.float64)
                for g, m in space.unflat(alive.astype(np.float64)).items()
            }
            scores = np.where(alive, np.asarray(fn(masks)), -np.inf)
            if k < iterations:
                step = Budget(
                    budget.kind,
                    1.0 - keep_final ** (k / iterations),
                    per_group=budget.per_group,
                    min_keep=budget.min_keep,
                )
                alive = _select(space, step, scores) & alive
    masks = ctx.decode(scores)
    return MethodResult(
        masks,
        ctx.net,
        seconds=time.perf_counter() - t0,
        details={"iterations": iterations, "unit_score": "sum of owned params"},
    )


register_method("l1", l1, "one-shot: largest L1 norm of incoming weights per unit")
register_method("random_mask", random_mask, "one-shot: uniformly random units")
register_method("l2_out", l2_out, "one-shot: largest L2 norm of outgoing weights")
register_method(
    "synflow",
    synflow,
    "iterative SynFlow (Tanaka et al. 2020): data-free synaptic-flow unit scores",
)
