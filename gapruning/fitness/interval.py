"""Interval metrics: Paoding's data-free impact score, by interval arithmetic.

Paoding (Meng et al., 2022, "Paoding: Supervised Robustness-preserving Data-free
Neural Network Pruning") bounds, by interval arithmetic from the input range, the
change that pruning a hidden unit causes at the output. With the output impact
intervals ``[dl_c, du_c]`` (one per output ``c``) it scores

* ``L = sum_c (du_c - dl_c)``, the L1 norm of the impact interval widths, and
* ``ENT``, the interval entropy of Dai et al. (2016): with
  ``S_ij = 1 - (|dl_i - dl_j| + |du_i - du_j|) / (2 |U|)`` where ``U`` is the
  union of all intervals and ``[0, 0]`` (width 0.001 if empty), ``p_i`` the share
  of intervals ``j`` with ``S_ij >= 0.9``, ``ENT = -sum_i p_i log p_i``;

``score = alpha * sigmoid(L) + beta * sigmoid(ENT)`` (``alpha, beta = 0.75, 0.25``).

What differs from Paoding:

* Sound differential bounds. Paoding propagates the impact interval of the
  removed units through later layers as if it were an activation (affine map,
  then ReLU), which is not a bound. Here the pruned output minus the dense output
  is bounded soundly (in the spirit of ReluDiff, Paulsen et al., 2020): the dense
  network's interval bounds ``[l, u]`` of every tensor are computed once, and the
  difference ``d`` between pruned and dense tensors is propagated: linear layers
  map it without bias; a mask ``m`` gives ``m d + (m - 1) a`` with ``a`` in the
  dense ``[l, u]`` (Paoding's ``-a w_a`` impact); ReLU keeps ``d`` where both
  networks are surely active, 0 where both are surely inactive, else
  ``[min(0, dl), max(0, du)]`` intersected with ``[-max(0, u), max(0, u + du)]``;
  sigmoid scales by its Lipschitz constant 1/4; max pooling takes the window's
  min/max of ``d``; a final softmax is bounded by half the largest ``|d|``.
* Whole masks at once. Paoding scores one unit pair at a time, where ``L`` is
  small; for a whole pruned network ``L`` is in output units and large, so by
  default it is divided by the dense network's own output interval width
  (``normalize=True``; ``False`` gives the original ``sigmoid(L)``).
* The score is shifted by its value for the unpruned network,
  ``(alpha + beta) / 2``, so that it is 0 there (its minimum) like every metric.
* ``region="probes"`` propagates small boxes ``[x - eps, x + eps]`` (pixel
  units, intersected with the input box) around the first ``max_probes`` probes
  instead of the whole input box, and averages the scores.

``interval_width`` is the plain variant: the growth of the output interval width
relative to the dense network, ``sum_c (du_c - dl_c) / sum_c (u_c - l_c)`` (the
pruned output lies in ``[l + dl, u + du]``, whose width exceeds the dense width
``u - l`` by exactly that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from ..models import Net, Node
from ..models.builder import input_mask
from ..models.ops import OPS, op_of
from ..models.ops.activations import Activation
from ..zoo import Pretrained
from .base import FitnessError, register_metric


def _net(model) -> Net:
    return model.model if isinstance(model, Pretrained) else model


def _check_ops(net: Net) -> None:
    bad = [
        f"{n.name} ({n.op})"
        for n in net.nodes
        if n.op != "input"
        and (
            n.op not in OPS
            or not (OPS[n.op].supports("bounds") and OPS[n.op].supports("delta"))
        )
    ]
    if bad:
        raise FitnessError(f"interval propagation does not support nodes {bad}")


def layer_params(net: Net) -> dict:
    return nnx.to_pure_dict(nnx.state(net.layers))


def linear_bound(n: Node, p: dict, x, *, absolute: bool, bias: bool):
    """The node's linear map on ``x`` (|weights| if ``absolute``; bias optional);
    the op table's :meth:`~gapruning.models.ops.LinearOp.linear`."""
    return op_of(n).linear(n, p, x, absolute=absolute, bias=bias)


def _params_of(n: Node, params: dict, masks: Mapping | None, by_name: dict):
    """What the op's bounds read: a mask node's mask vector (None: every unit
    kept), another node's layer variables (with ``"mask"``, the vector of the
    mask it reads, for the ops that need it)."""
    op = op_of(n)
    if op.uses_masks:
        return None if masks is None else op.mask_vector(n, masks.__getitem__)
    if op.needs_input_mask:
        mask = None if masks is None else input_mask(n, by_name, masks.__getitem__)
        return {**params.get(n.name, {}), "mask": mask}
    return params.get(n.name)


def propagate_bounds(
    net: Net, lo, hi, masks: Mapping | None = None, *, keep: frozenset | None = None
) -> dict:
    """Interval bounds of every node's output (interval bound propagation).

    Args:
        net: the network.
        lo, hi: input bounds, shape ``(B, *input_shape)``.
        masks: one individual's group masks (``None``: the network's own masks are
            ignored and every unit is kept, i.e. the dense network).
        keep: node names whose bounds to return (default: all).

    Returns:
        ``{node: (lower, upper)}``.
    """
    _check_ops(net)
    params = layer_params(net)
    by_name = {n.name: n for n in net.nodes}
    vals: dict = {}
    out: dict = {}
    for n in net.nodes:
        if n.op == "input":
            y = (lo, hi)
        else:
            ins = [vals[i] for i in n.inputs]
            y = op_of(n).bounds(n, _params_of(n, params, masks, by_name), ins)
        vals[n.name] = y
        if keep is None or n.name in keep:
            out[n.name] = y
    return out


def interval_bounds(model, masks: Mapping | None = None, low=None, high=None):
    """Output bounds of the (masked) network over an input region.

    Args:
        model: a :class:`~gapruning.Pretrained` or :class:`~gapruning.models.Net`.
        masks: one individual's group masks (default: every unit kept).
        low, high: the input region, arrays broadcastable to ``(B, *input_shape)``
            or scalars; default: the whole input box of a Pretrained.

    Returns:
        ``(lower, upper)`` of shape ``(B, outputs)`` containing the outputs of every
        input in the region.
    """
    net = _net(model)
    if low is None or high is None:
        if not isinstance(model, Pretrained):
            raise FitnessError("pass low/high, or a Pretrained with an input box")
        low, high = model.input_box
    low = jnp.asarray(low, jnp.float32)
    high = jnp.asarray(high, jnp.float32)
    shape = jnp.broadcast_shapes(low.shape, high.shape)
    batch = shape[:1] if len(shape) == len(net.input_shape) + 1 else (1,)
    full = (*batch, *net.input_shape)
    low, high = jnp.broadcast_to(low, full), jnp.broadcast_to(high, full)
    last = net.nodes[-1].name
    return propagate_bounds(net, low, high, masks, keep=frozenset({last}))[last]


def _needed(net: Net) -> frozenset:
    """Tensors whose dense bounds the impact pass reads."""
    return frozenset(
        i for n in net.nodes if op_of(n).needs_dense_bounds for i in n.inputs
    ) | {net.nodes[-1].name}


def activation_delta(op: str, dense_bounds, c, r):
    """Centre and radius bounding ``act(z + d) - act(z)`` for ``z`` in the dense
    pre-activation bounds and ``d`` in ``[c - r, c + r]``, for the activation
    named ``op`` (its :meth:`~gapruning.models.ops.Op.delta`: exact per-unit
    cases for ``"relu"``, the slope range for the others)."""
    act = OPS.get(op)
    if not isinstance(act, Activation):
        raise ValueError(f"no difference bound for activation {op!r}")
    return act.delta(None, None, [(c, r)], [dense_bounds])


def impact_bounds(net: Net, masks: Mapping, dense: dict):
    """Bounds ``(dl, du)`` of (pruned output - dense output) over the region whose
    dense bounds ``dense`` (from :func:`propagate_bounds`) were computed."""
    params = layer_params(net)
    by_name = {n.name: n for n in net.nodes}
    vals: dict = {}  # node -> (centre, radius) of the difference
    for n in net.nodes:
        if n.op == "input":
            lo = dense[net.nodes[-1].name][0]
            zero = jnp.zeros((lo.shape[0], *n.shape), lo.dtype)
            vals[n.name] = (zero, zero)
            continue
        op = op_of(n)
        ins = [vals[i] for i in n.inputs]
        ref = [dense[i] for i in n.inputs] if op.needs_dense_bounds else None
        vals[n.name] = op.delta(n, _params_of(n, params, masks, by_name), ins, ref)
    c, r = vals[net.nodes[-1].name]
    return c - r, c + r


def paoding_entropy(lo, hi, threshold: float = 0.9):
    """Interval entropy (Dai et al., 2016, as implemented by Paoding) over the last
    axis: ``-sum_i p_i log p_i`` with ``p_i`` the share of intervals ``j`` whose
    similarity ``1 - (|lo_i - lo_j| + |hi_i - hi_j|) / (2 |U|)`` is at least
    ``threshold`` (``U``: union of the intervals and 0). Leading axes are kept."""
    ulo = jnp.minimum(lo.min(-1, keepdims=True), 0.0)
    uhi = jnp.maximum(hi.max(-1, keepdims=True), 0.0)
    width = uhi - ulo
    width = jnp.where(width == 0, 0.001, width)[..., None]
    dist = jnp.abs(lo[..., :, None] - lo[..., None, :]) + jnp.abs(
        hi[..., :, None] - hi[..., None, :]
    )
    sim = 1.0 - 0.5 * dist / width
    p = (sim >= threshold).mean(-1)
    return -(p * jnp.log(p)).sum(-1)


@dataclasses.dataclass(frozen=True)
class RegionOptions:
    """The input region of the interval metrics.

    Attributes:
        region: ``"box"`` (the whole input box) or ``"probes"`` (boxes of
            half-width ``eps`` around the first ``max_probes`` probes).
        eps: half-width of the probe boxes, in pixel units.
        max_probes: how many probes ``region="probes"`` uses.
    """

    region: str = "box"
    eps: float = 0.05
    max_probes: int = 64


@dataclasses.dataclass(frozen=True)
class IntervalOptions(RegionOptions):
    """Options of Paoding's ``interval`` score (module docstring).

    Attributes:
        alpha, beta: weights of ``sigmoid(L)`` and ``sigmoid(ENT)``.
        threshold: similarity threshold of the interval entropy.
        normalize: divide ``L`` by the dense output interval width.
    """

    alpha: float = 0.75
    beta: float = 0.25
    threshold: float = 0.9
    normalize: bool = True


def _region(pretrained: Pretrained, probes, opts: RegionOptions):
    lo, hi = pretrained.input_box
    if opts.region == "box":
        shape = (1, *pretrained.input_shape)
        return jnp.full(shape, lo, jnp.float32), jnp.full(shape, hi, jnp.float32)
    if opts.region == "probes":
        if probes is None:
            raise FitnessError("interval region='probes' needs probes")
        x = probes[: opts.max_probes]
        e = float(opts.eps) / pretrained.std
        return jnp.clip(x - e, lo, hi), jnp.clip(x + e, lo, hi)
    raise FitnessError(
        f"interval region must be 'box' or 'probes', got {opts.region!r}"
    )


def _prepare(pretrained, probes, opts: RegionOptions):
    net = pretrained.model
    _check_ops(net)
    lo, hi = _region(pretrained, probes, opts)
    keep = _needed(net)
    dense = jax.jit(lambda lo, hi: propagate_bounds(net, lo, hi, keep=keep))(lo, hi)
    out_lo, out_hi = dense[net.nodes[-1].name]
    width = (out_hi - out_lo).sum(-1).mean()
    if not bool(jnp.isfinite(width)):
        raise FitnessError(
            "the dense network's interval bounds overflow (Inf/NaN) on this region"
        )
    return {"dense": dense, "width": jnp.maximum(width, 1e-12)}


def _impact(cache, pruned_apply, masks):
    return impact_bounds(pruned_apply.net, masks, cache["dense"])


def paoding_interval(cache, pruned_apply, masks, probes, opts: IntervalOptions):
    """Paoding's score ``alpha sigmoid(L) + beta sigmoid(ENT) - (alpha + beta) / 2``.

    ``L`` is the summed output impact-interval width (divided by the dense output
    interval width if ``normalize``), ``ENT`` the interval entropy with similarity
    threshold ``threshold`` (see the module docstring); 0 for the unpruned network.
    """
    dl, du = _impact(cache, pruned_apply, masks)
    big_l = (du - dl).sum(-1)
    if opts.normalize:
        big_l = big_l / cache["width"]
    ent = paoding_entropy(dl, du, opts.threshold)
    alpha, beta = opts.alpha, opts.beta
    score = alpha * jax.nn.sigmoid(big_l) + beta * jax.nn.sigmoid(ent)
    return (score - (alpha + beta) / 2).mean()


def interval_width(cache, pruned_apply, masks, probes, opts: RegionOptions):
    """Growth of the output interval width relative to the dense network.

    ``W = sum_c (du_c - dl_c) / sum_c (u_c - l_c)``: the pruned outputs lie in
    ``[l + dl, u + du]``, wider than the dense bounds ``[l, u]`` by this fraction.
    """
    dl, du = _impact(cache, pruned_apply, masks)
    return (du - dl).sum(-1).mean() / cache["width"]


register_metric(
    "interval",
    paoding_interval,
    _prepare,
    description=(
        "Paoding: alpha*sigmoid(L)+beta*sigmoid(ENT) of the output impact "
        "intervals from the input box"
    ),
    options=IntervalOptions,
    needs_probes=False,
    unit_masks_only=True,
)
register_metric(
    "interval_width",
    interval_width,
    _prepare,
    description="growth of the output interval width over the dense model's",
    options=RegionOptions,
    needs_probes=False,
    unit_masks_only=True,
)
