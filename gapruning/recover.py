"""Data-free recovery of a pruned network: merging compensation and distillation.

Without the training set a pruned network cannot be fine-tuned on data, but it can
be repaired from the model alone.

**Merging compensation** (:func:`merge`, :class:`Repair`) folds what removed units
contributed into the *consumer* layers (the Dense/Conv layers that read the pruned
tensor), so the network keeps its architecture (dense-shaped, consumer weights
changed) and ``gp.compact(repaired, masks)`` then removes the units:

* ``"cosine"``: Neuron Merging (Kim et al., NeurIPS 2020). Each removed unit ``j``
  is matched with the kept unit ``i`` of the same group whose incoming weights and
  bias are the most cosine-similar, and the consumer's rows get
  ``W[i] += s * W[j]`` with ``s = ||v_j|| / ||v_i||``. With a positively
  homogeneous activation (ReLU, max/avg pooling) and ``v_j = s * v_i`` this is
  exact. A BatchNorm right after the producer is folded into the incoming vector
  (``v = a * [w, b - mean] + [0, beta]`` with ``a = gamma / sqrt(var + eps)``), so
  units are merged in the post-BatchNorm space, where the activation acts, and
  merging stays exact there. Differences from the paper: units are matched on the
  dense network's incoming weights (not layer after layer on already merged ones),
  and a removed unit whose best cosine is below ``threshold`` is simply dropped.
  Groups coupled by a residual addition are left uncompensated by this method: a
  residual channel is a sum of branches, not one affine map of one input.
* ``"lstsq"``: a least-squares variant (the layer-wise reconstruction of ThiNet,
  Luo et al., 2017, and He et al., 2017, made data-free with synthetic probes).
  For each consumer, with ``X`` its input features on the probes (im2col patches
  for a Conv, plus a column of ones when it has a bias) and ``G = X^T X``, the
  kept rows are re-fit so the consumer's pre-activations match the dense ones:
  ``min ||X M W' - X W||^2 + lam ||M (W' - W)||^2``, whose solution is
  ``W'_k = W_k + (G_kk + lam I)^{-1} G_kr W_r``. ``lam = ridge * mean(diag G)``.
  By default (``prior="cosine"``) the ridge pulls towards the Neuron Merging
  weights ``P = Z W`` instead of ``W``: ``min ||X M W' - X W||^2 + lam ||M (W'
  - P)||^2``, which interpolates between ``"cosine"`` (large ``lam``) and plain
  least squares (small ``lam``).
  It needs only the consumer's input, so BatchNorm before it and coupled
  (residual) groups are handled as any other input; what a coupled group loses
  through the parameter-free shortcut itself cannot be compensated.
  :func:`merge` fits the consumers one after another on the inputs of the
  network repaired so far (:func:`sequential_lstsq`), so each also corrects the
  layers before it; inside the fitness (:class:`Repair`) all are fit at once on
  the dense inputs, which is vmappable.

Both are fixed-shape functions of the masks (``jit``/``vmap``-able), with the
mask-free part (cosine similarities, Gram matrices) computed once, so
``gp.prune(..., repair="merge")`` scores every individual after its repair (see
:func:`repaired_fitness` for the cost).

**Distillation on probes** (:func:`distill`): the compacted network is trained to
match the dense teacher's temperature-softened logits (Hinton et al., 2015) on
synthetic probes regenerated every epoch, optionally with a feature term on the
kept channels, after re-estimating BatchNorm statistics on the probes. Nothing
here reads a dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.custom_batching import custom_vmap

from .augment import shift_flip
from .forward import with_unit_masks
from .models import Net
from .models.graph import mask_read
from .probes import batchnorm_nodes, make_probes
from .space import PruneSpace
from .zoo import Pretrained

MERGE_METHODS = ("cosine", "lstsq")
# distill's "auto" probes without BatchNorm: inversion + gaussian (a mixture beat
# inversion alone on LeNet-300-100, see benchmarks/results/recovery.md)
AUTO_DISTILL_PROBES = ("inversion", "gaussian")
# distill's settings left at ``None``, by whether the teacher has BatchNorm. Without:
# chosen on LeNet-300-100 (held-out train slice, benchmarks/results/recovery.md).
# With: chosen on ResNet-20 (recovery_resnet20.md); there, on the masks gwcs finds
# at 50% of FLOPs, the first set (lr 1e-3, adversarial push, BN re-estimation) took
# held-out accuracy from 36.9 to 32.2% (the KL on the probes rose, 2.59 -> 5.12),
# this one to 87.0%. ``feature_weight`` applies when the masks are given.
DISTILL_DEFAULTS = {
    False: {
        "feature_weight": 0.0,
        "recalibrate_bn": True,
        "adversarial": 3,
        "learning_rate": 1e-3,
    },
    True: {
        "feature_weight": 1.0,
        "recalibrate_bn": False,
        "adversarial": 0,
        "learning_rate": 3e-4,
    },
}
# ``repair``/``recover`` spellings accepted by gp.prune and the CLI
REPAIR_ALIASES = {"merge": "cosine", "cosine": "cosine", "lstsq": "lstsq"}


class RecoverError(ValueError):
    """Recovery cannot be done as asked (unknown method, missing probes...)."""


@dataclasses.dataclass(frozen=True)
class Consumer:
    """A Dense/Conv layer reading the masked tensor ``tensor`` of ``group``.

    ``positions`` is how many times each unit appears in its input rows (the
    spatial size when it reads through a flatten, else 1)."""

    layer: str
    op: str
    group: str
    tensor: str
    positions: int


def consumers(net: Net) -> tuple[Consumer, ...]:
    """Every Dense/Conv layer that reads a pruned tensor, in graph order."""
    by_name = {n.name: n for n in net.nodes}
    out = []
    for n in net.nodes:
        mask = mask_read(n, by_name)
        if mask is None:
            continue
        flat = by_name[n.inputs[0]].op == "flatten"
        positions = math.prod(mask.shape[:-1]) if flat else 1
        out.append(
            Consumer(n.name, n.op, mask.attr("group"), mask.inputs[0], positions)
        )
    return tuple(out)


def group_consumers(net: Net, group: str) -> list[tuple[str, int]]:
    """``(layer, positions)`` of the :func:`consumers` reading ``group``'s units
    (the kernel's input rows are ``position * units + unit``)."""
    return [(c.layer, c.positions) for c in consumers(net) if c.group == group]


def _pretrained(net) -> Pretrained:
    if not isinstance(net, Pretrained):
        raise TypeError(f"expected a gapruning Pretrained, got {type(net).__name__}")
    return net


# ------------------------------------------------------------------ cosine


def _incoming(net: Net, space: PruneSpace, group) -> jax.Array | None:
    """``(units, fan_in + 1)`` incoming weights and bias of a single-producer
    group, in the post-BatchNorm space when a BatchNorm follows the producer;
    ``None`` for coupled groups."""
    if len(group.members) != 1:
        return None
    (name,) = group.members
    layer = net.layers[name]
    kernel = layer.kernel[...]
    w = kernel.reshape(-1, kernel.shape[-1]).T.astype(jnp.float32)
    b = (
        jnp.zeros(w.shape[0], jnp.float32)
        if layer.bias is None
        else layer.bias[...].astype(jnp.float32)
    )
    bn = next(
        (n for n in batchnorm_nodes(net) if n.inputs[0] == name), None
    )  # BatchNorm directly after the producer
    if bn is not None:
        p = net.layers[bn.name]
        a = p.scale[...] / jnp.sqrt(p.var[...] + bn.attr("epsilon"))
        w = w * a[:, None]
        b = a * (b - p.mean[...]) + p.bias[...]
    return jnp.concatenate([w, b[:, None]], axis=1)


def merge_matrix(sim, norms, mask, threshold: float = 0.0) -> jax.Array:
    """The ``(units, units)`` matrix ``Z`` of Neuron Merging for one group: the
    consumer's rows become ``Z @ W``. ``Z = I + sum_j s_j e_{i(j)} e_j^T`` over
    removed units ``j`` whose most similar kept unit ``i(j)`` has cosine above
    ``threshold``, ``s_j = norms[j] / norms[i(j)]``. Traceable (``vmap``-able
    over ``mask``)."""
    kept = mask > 0
    masked = jnp.where(kept[None, :], sim, -jnp.inf)
    best = jnp.argmax(masked, axis=1)
    cos = jnp.take_along_axis(sim, best[:, None], axis=1)[:, 0]
    scale = norms / jnp.maximum(norms[best], 1e-12)
    weight = jnp.where(~kept & (cos > threshold) & kept.any(), scale, 0.0)
    n = mask.shape[-1]
    return (
        jnp.eye(n, dtype=sim.dtype)
        + jax.nn.one_hot(best, n, dtype=sim.dtype).T * (weight[None, :])
    )


def _rows(kernel, c: Consumer, units: int):
    """The consumer kernel as ``(..., units, out)`` (rows of one unit last-but-one)."""
    return kernel.reshape(*kernel.shape[:-2], -1, units, kernel.shape[-1])


# ------------------------------------------------------------------ least squares


def _features(x: jax.Array, node, c: Consumer) -> jax.Array:
    """``(samples, rows)`` input features of a consumer: rows ordered as its kernel
    reshaped to ``(rows, out)``."""
    if c.op == "dense":
        return x.reshape(x.shape[0], -1)
    kh, kw = node.attr("kernel_size")
    patches = jax.lax.conv_general_dilated_patches(
        x,
        (kh, kw),
        node.attr("strides"),
        node.attr("padding"),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )  # channels ordered (c, kh, kw)
    cin = x.shape[-1]
    patches = patches.reshape(*patches.shape[:-1], cin, kh * kw)
    return jnp.swapaxes(patches, -1, -2).reshape(-1, kh * kw * cin)


def _design(x: jax.Array, node, c: Consumer, bias: bool) -> jax.Array:
    """The consumer's least-squares design matrix: its input features, plus a
    column of ones when it has a bias."""
    f = _features(x.astype(jnp.float32), node, c)
    if bias:
        f = jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], 1)
    return f


def gram_matrices(
    pretrained: Pretrained, probes: jax.Array, batch_size: int = 128
) -> dict[str, jax.Array]:
    """``{consumer: X^T X}`` over the probes (a ones column appended for a bias),
    from the dense network's activations."""
    net = pretrained.model
    cons = consumers(net)
    by_name = {n.name: n for n in net.nodes}
    graphdef, state = nnx.split(net)

    @jax.jit
    def batch(state, x):
        model = nnx.merge(graphdef, state)
        _, taps = model(x, taps=tuple({c.tensor for c in cons}))
        out = {}
        for c in cons:
            bias = net.layers[c.layer].bias is not None
            f = _design(taps[c.tensor], by_name[c.layer], c, bias)
            out[c.layer] = f.T @ f
        return out

    total = None
    for i in range(0, len(probes), batch_size):
        g = batch(state, probes[i : i + batch_size])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


def lstsq_update(
    gram, weights, row_mask, ridge: float, prior=None, cross=None
) -> jax.Array:
    """Re-fits the kept rows of ``weights`` (``(rows, out)``, bias as last row if
    any) so ``X (M W')`` matches ``Y W`` in least squares with a ridge pulling
    ``W'`` towards ``prior`` (default ``W``), given ``gram = X^T X`` and ``cross
    = X^T Y`` (default ``gram``: ``Y = X``): ``W'_k = P_k + (G_kk + lam I)^{-1}
    (C_k: W - G_k: M P)``. Removed rows are returned as in ``prior``. Traceable."""
    m = row_mask.astype(gram.dtype)
    prior = weights if prior is None else prior
    lam = ridge * jnp.mean(jnp.diag(gram))
    a = m[:, None] * gram * m[None, :] + jnp.diag(lam * m + (1 - m))
    if cross is None:  # one product: no cancellation between two large ones
        rhs = m[:, None] * (gram @ (weights - m[:, None] * prior))
    else:
        rhs = m[:, None] * (cross @ weights - gram @ (m[:, None] * prior))
    return prior + _solve_pos(a, rhs)


def _cholesky_solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """``a^{-1} rhs`` for a symmetric positive definite ``a``."""
    return jax.scipy.linalg.solve(a, rhs, assume_a="pos")


@custom_vmap
def _solve_pos(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """:func:`_cholesky_solve`, but under ``vmap`` with a batched ``a`` on CPU one
    unbatched solve per example (a ``lax.map``): jaxlib 0.10's batched CPU LAPACK
    kernels split their batch over XLA's intra-op thread pool and block waiting
    for it, so as many batched solves at once as the pool has threads (two
    consumers' repairs on a 2-core CPU) deadlock the process. Batched on other
    platforms; a shared ``a`` is factorized once, whatever the platform."""
    return _cholesky_solve(a, rhs)


@_solve_pos.def_vmap
def _solve_pos_vmap(axis_size, in_batched, a, rhs):
    a_batched, rhs_batched = in_batched
    if not a_batched:  # unbatched LAPACK calls, the right-hand sides side by side
        return jax.vmap(_cholesky_solve, in_axes=(None, 0))(a, rhs), True
    if not rhs_batched:
        rhs = jnp.broadcast_to(rhs, (axis_size, *rhs.shape))
    solved = jax.lax.platform_dependent(
        a,
        rhs,
        cpu=lambda a, rhs: jax.lax.map(lambda ar: _cholesky_solve(*ar), (a, rhs)),
        default=jax.vmap(_cholesky_solve),
    )
    return solved, True


def _refit(layer, mask, units: int, gram, ridge: float, prior_kernel=None, cross=None):
    """``{"kernel", "bias"?}`` of the consumer ``layer`` re-fit by
    :func:`lstsq_update`: the kernel as ``(rows, out)`` rows (bias as the last
    row, always kept), the rows of unit ``i`` kept where ``mask[i]`` (``units``
    per position), the ridge pulling towards ``prior_kernel`` (default the
    kernel). Traceable."""
    kernel = layer.kernel[...]
    w = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
    rows = len(w)
    prior = None
    if prior_kernel is not None:
        prior = prior_kernel.reshape(w.shape).astype(jnp.float32)
    row_mask = jnp.tile(mask, rows // units)
    bias = None if layer.bias is None else layer.bias[...]
    if bias is not None:
        w = jnp.concatenate([w, bias[None].astype(jnp.float32)])
        row_mask = jnp.concatenate([row_mask, jnp.ones(1)])
        if prior is not None:
            prior = jnp.concatenate([prior, w[-1:]])
    w = lstsq_update(gram, w, row_mask, ridge, prior, cross)
    new = {"kernel": w[:rows].reshape(kernel.shape).astype(kernel.dtype)}
    if bias is not None:
        new["bias"] = w[-1].astype(bias.dtype)
    return new


def _lstsq_probes(
    pretrained: Pretrained, probes, num_probes: int, seed: int
) -> jax.Array:
    """The probes least squares fits on: an array as given, else ``probes`` (a
    kind; default ``bn_stats`` with BatchNorm, else ``gaussian``) made here."""
    if probes is None:
        probes = "bn_stats" if batchnorm_nodes(pretrained.model) else "gaussian"
    return make_probes(pretrained, probes, num_probes, seed)


# ------------------------------------------------------------------ Repair


class Repair:
    """Merging compensation for one network, as a function of the masks.

    Built once (the mask-free part: cosine similarities, or Gram matrices on
    probes); ``repair.layers(masks)`` gives the compensated consumer weights and
    ``repair(masks)`` the whole network with them, both traceable and
    ``vmap``-able over a population of masks.

    Args:
        pretrained: the dense network.
        method: ``"cosine"`` (Neuron Merging) or ``"lstsq"`` (see module doc).
        probes: model inputs for ``"lstsq"`` (an array, or a probe kind for
            :func:`~gapruning.make_probes`); unused by ``"cosine"``.
        num_probes, seed: for probes made here.
        ridge: ``"lstsq"`` regularisation, relative to the mean Gram diagonal.
        threshold: ``"cosine"``: merge only matches with a higher cosine.
        prior: ``"lstsq"``: what the ridge pulls the kept rows towards,
            ``"cosine"`` (default: the Neuron Merging rows, so a large ``ridge``
            gives ``"cosine"`` and a small one plain least squares) or
            ``"dense"`` (the pruned rows, unchanged: ThiNet's ridge).
    """

    def __init__(
        self,
        pretrained: Pretrained,
        method: str = "cosine",
        probes=None,
        *,
        num_probes: int = 512,
        seed: int = 0,
        ridge: float = 1e-2,
        threshold: float = 0.0,
        prior: str = "cosine",
    ):
        pretrained = _pretrained(pretrained)
        method = REPAIR_ALIASES.get(method, method)
        if method not in MERGE_METHODS:
            raise RecoverError(
                f"unknown merge method {method!r}; known: {', '.join(MERGE_METHODS)}"
            )
        if ridge <= 0:
            raise RecoverError(f"ridge must be positive, got {ridge}")
        prior = REPAIR_ALIASES.get(prior, prior)
        if prior not in ("dense", "cosine"):
            raise RecoverError(f"prior must be 'dense' or 'cosine', got {prior!r}")
        self.prior = prior
        self.pretrained = pretrained
        self.method = method
        self.ridge = float(ridge)
        self.threshold = float(threshold)
        net = pretrained.model
        space = pretrained.space
        self.consumers = consumers(net)
        self._sizes = {g.name: g.size for g in space.groups}
        self._sim = {}
        if method == "cosine" or prior == "cosine":
            for g in space.groups:
                v = _incoming(net, space, g)
                if v is None:
                    continue
                norms = jnp.linalg.norm(v, axis=1)
                unit = v / jnp.maximum(norms, 1e-12)[:, None]
                self._sim[g.name] = (unit @ unit.T, norms)
        if method == "cosine":
            self.consumers = tuple(c for c in self.consumers if c.group in self._sim)
        else:
            x = _lstsq_probes(pretrained, probes, num_probes, seed)
            self._gram = gram_matrices(pretrained, x)

    def layers(self, masks: Mapping) -> dict[str, dict[str, jax.Array]]:
        """``{layer: {"kernel", "bias"?}}``: compensated weights of every consumer."""
        net = self.pretrained.model
        out = {}
        for c in self.consumers:
            layer = net.layers[c.layer]
            kernel = layer.kernel[...]
            bias = None if layer.bias is None else layer.bias[...]
            mask = jnp.asarray(masks[c.group], jnp.float32)
            units = self._sizes[c.group]
            merged = kernel
            if c.group in self._sim:
                sim, norms = self._sim[c.group]
                z = merge_matrix(sim, norms, mask, self.threshold)
                rows = jnp.einsum("ij,...jo->...io", z, _rows(kernel, c, units))
                merged = rows.reshape(kernel.shape).astype(kernel.dtype)
            if self.method == "cosine":
                new = {"kernel": merged}
                if bias is not None:
                    new["bias"] = bias
            else:
                prior = merged if self.prior == "cosine" else None
                new = _refit(layer, mask, units, self._gram[c.layer], self.ridge, prior)
            out[c.layer] = new
        return out

    def __call__(self, masks: Mapping) -> Net:
        """The dense-shaped network with compensated consumer weights."""
        return _with_layers(self.pretrained.model, self.layers(masks))


def _with_layers(net: Net, layers: Mapping) -> Net:
    """A copy of ``net`` with ``{layer: {"kernel", "bias"?}}`` replaced."""
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    for name, new in layers.items():
        pure["layers"][name].update(new)
    nnx.replace_by_pure_dict(params, pure)
    return nnx.merge(graphdef, params, rest)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _taps(graphdef, state, x, names):
    """The outputs of nodes ``names``: compiled once per architecture (the dense
    and every masked or repaired network share it)."""
    return nnx.merge(graphdef, state)(x, taps=names)[1]


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _cross_grams(pruned, dense, node, c: Consumer, bias: bool):
    """``(X_p^T X_p, X_p^T X_d)`` of the consumer's design matrices."""
    xp, xd = _design(pruned, node, c, bias), _design(dense, node, c, bias)
    return xp.T @ xp, xp.T @ xd


def sequential_lstsq(
    pretrained: Pretrained,
    masks: Mapping,
    probes: jax.Array,
    *,
    ridge: float = 1e-2,
    prior: str = "cosine",
    threshold: float = 0.0,
    batch_size: int = 128,
) -> Net:
    """``"lstsq"`` merging compensation fit consumer after consumer, in graph
    order, each on the inputs of the pruned network as repaired so far, to the
    dense network's pre-activations: ``min ||X_p M W' - X_d W||^2 + lam ||M (W'
    - P)||^2`` with ``X_p`` the pruned and ``X_d`` the dense features on the
    probes. Each consumer so also corrects the error of every layer before it
    (as ThiNet and He et al., 2017, reconstruct layer after layer); the
    parallel :class:`Repair` fits every consumer to the dense inputs at once.
    On ResNet-20 at 50 % of FLOPs removed by L1 this raised held-out accuracy
    from 23 % to 83 % (benchmarks/results/recovery_resnet20.md). ``ridge`` and
    ``prior``, ``threshold`` as :class:`Repair`. Returns the dense-shaped
    network."""
    net = pretrained.model
    masks = {g: jnp.asarray(np.asarray(m), jnp.float32) for g, m in masks.items()}
    by_name = {n.name: n for n in net.nodes}
    sizes = {g.name: g.size for g in pretrained.space.groups}
    cosine = Repair(
        pretrained, "cosine", ridge=ridge, threshold=threshold, prior=prior
    )  # validates the options
    priors = cosine.layers(masks) if cosine.prior == "cosine" else {}
    taps = tuple(dict.fromkeys(c.tensor for c in consumers(net)))
    graphdef, dense_state = nnx.split(net)
    layers = {}
    for c in consumers(net):
        node = by_name[c.layer]
        bias = net.layers[c.layer].bias is not None
        _, state = nnx.split(with_unit_masks(_with_layers(net, layers), masks))
        gram = cross = 0.0
        for i in range(0, len(probes), batch_size):
            x = probes[i : i + batch_size]
            pruned = _taps(graphdef, state, x, taps)[c.tensor]
            dense = _taps(graphdef, dense_state, x, taps)[c.tensor]
            g, gx = _cross_grams(pruned, dense, node, c, bias)
            gram, cross = gram + g, cross + gx
        prior = priors[c.layer]["kernel"] if c.layer in priors else None
        layers[c.layer] = _refit(
            net.layers[c.layer],
            masks[c.group],
            sizes[c.group],
            gram,
            ridge,
            prior,
            cross,
        )
    return _with_layers(net, layers)


def merge(
    pretrained: Pretrained,
    masks: Mapping,
    probes=None,
    method: str = "cosine",
    *,
    sequential: bool = True,
    **options,
) -> Pretrained:
    """Merging compensation of ``pretrained`` for ``masks`` (see module doc).

    Args:
        pretrained: the dense network.
        masks: group -> kept units (bool or 0/1), as for ``gp.compact``.
        probes: ``"lstsq"`` only: an array of model inputs or a probe kind
            (default ``bn_stats`` with BatchNorm, else ``gaussian``: on
            LeNet-300-100 least squares on inversion probes generalised worse,
            see benchmarks/results/recovery.md).
        method: ``"cosine"`` (Neuron Merging, Kim et al., 2020; alias
            ``"merge"``) or ``"lstsq"`` (ridge re-fit of the consumers on probes).
        sequential: ``"lstsq"`` only: fit the consumers one after another on
            the repaired pruned network's inputs (:func:`sequential_lstsq`);
            ``False``: all at once on the dense inputs, as :class:`Repair` does
            inside the fitness.
        **options: ``num_probes``, ``seed``, ``ridge``, ``threshold``, ``prior`` of
            :class:`Repair`.

    Returns:
        A dense-shaped :class:`Pretrained` with the consumer layers' weights
        compensated: ``gp.masked_apply(repaired, masks, x)`` is the repaired
        pruned network, ``gp.compact(repaired, masks)`` its compact form.

    Example:
        >>> net = gp.load("lenet300-fmnist")
        >>> masks = gp.prune(net, strategy="l1", target=0.5).masks
        >>> small = gp.compact(gp.recover.merge(net, masks), masks)
    """
    pretrained = _pretrained(pretrained)
    pretrained.space.validate(masks)
    masks = {g: jnp.asarray(np.asarray(m), jnp.float32) for g, m in masks.items()}
    sequential = sequential and REPAIR_ALIASES.get(method, method) == "lstsq"
    if sequential:
        fit = dict(options)
        x = _lstsq_probes(
            pretrained, probes, fit.pop("num_probes", 512), fit.pop("seed", 0)
        )
        model = sequential_lstsq(pretrained, masks, x, **fit)
        method = "lstsq"
    else:
        repair = Repair(pretrained, method, probes, **options)
        model = repair(masks)
        method = repair.method
    card = dict(pretrained.card)
    card["repair"] = {"method": method, "sequential": sequential, **options}
    return Pretrained(model, card)


# ------------------------------------------------------------------ in the fitness


def repaired_fitness(fit, method: str = "cosine", probes=None, **options):
    """A copy of the composed fitness ``fit`` that scores every individual after
    merging compensation: ``fit.single(masks)`` runs on ``Repair(masks)``.

    Cost: per individual, the compensated consumer kernels are materialized
    (``population chunk x consumer weights`` more memory; the chunking of the
    fitness bounds it) and ``"lstsq"`` solves one ``rows x rows`` system per
    consumer (``rows`` = its fan-in: 300 and 100 on LeNet-300-100, up to
    ``9 x 64`` on ResNet-20), i.e. ``O(sum fan_in^3)`` flops per individual;
    ``"cosine"`` costs one argmax and one ``units x units`` matmul per consumer.
    The weights of layers that read no pruned tensor stay shared.

    Args:
        fit: a :class:`~gapruning.fitness.compose.Fitness`.
        method, probes, **options: as :class:`Repair`. ``"lstsq"`` defaults to
            probes of the fitness's kind with seed 1 (``compose``'s default seed
            is 0), so it is not fit on the very probes it is scored on.
    """
    if probes is None and fit.probe_kind not in (None, "array"):
        probes = fit.probe_kind
    options.setdefault("seed", 1)
    return fit.with_repair(Repair(fit.pretrained, method, probes, **options))


# ------------------------------------------------------------------ distillation


def recalibrate_batchnorm(
    student: Pretrained,
    probes: jax.Array,
    teacher: Pretrained | None = None,
    masks: Mapping | None = None,
) -> Pretrained:
    """Re-estimates every BatchNorm's running statistics on ``probes``, layer by
    layer in graph order (each layer's statistics after the earlier ones are
    updated). With the ``teacher`` and the ``masks`` that made the student, the
    estimate is shift-corrected: ``mean = running + (student - teacher)`` and
    ``var = running * student / teacher`` on the probes, so only the change the
    pruning causes is applied, not the probes' own mismatch with the data.
    Modifies ``student`` in place and returns it."""
    from .probes import bn_batch_stats

    net = student.model
    nodes = batchnorm_nodes(net)
    if not nodes:
        return student
    reference = None
    if teacher is not None and masks is not None:
        space = teacher.space
        reference = {}
        t_stats = bn_batch_stats(teacher, probes)
        for n in nodes:
            group = space.group_of(n.name)
            keep = (
                np.arange(n.shape[-1])
                if group is None
                else np.flatnonzero(np.asarray(masks[group]).astype(bool))
            )
            layer = teacher.model.layers[n.name]
            mean, var = t_stats[n.name]
            reference[n.name] = (
                mean[keep],
                var[keep],
                layer.mean[...][keep],
                layer.var[...][keep],
            )
    graphdef, _ = nnx.split(net)
    stats = jax.jit(lambda s, x: bn_batch_stats(nnx.merge(graphdef, s), x))
    for n in nodes:
        mean, var = stats(nnx.state(net), probes)[n.name]
        if reference is not None:
            t_mean, t_var, r_mean, r_var = reference[n.name]
            mean = r_mean + (mean - t_mean)
            var = r_var * var / jnp.maximum(t_var, 1e-8)
        net.layers[n.name].mean[...] = mean
        net.layers[n.name].var[...] = var
    return student


def _kl(teacher_logits, student_logits, temperature: float) -> jax.Array:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over the batch."""
    t = jax.nn.log_softmax(teacher_logits / temperature)
    s = jax.nn.log_softmax(student_logits / temperature)
    return temperature**2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def _push(s_apply, t_apply, x, steps: int, step: float, box, temperature: float):
    """``steps`` signed-gradient ascent steps of ``x`` on the summed
    teacher-student KL, projected onto ``box``; traceable."""
    lo, hi = box

    def total_kl(xa):
        return _kl(t_apply(xa), s_apply(xa), temperature) * xa.shape[0]

    def body(_, xa):
        return jnp.clip(xa + step * jnp.sign(jax.grad(total_kl)(xa)), lo, hi)

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, x))


def adversarial_probes(
    student: Pretrained,
    teacher: Pretrained,
    probes: jax.Array,
    steps: int = 3,
    step_size: float = 0.02,
    temperature: float = 4.0,
) -> jax.Array:
    """Disagreement probes: ``probes`` moved where ``student`` and ``teacher``
    disagree most. Each of ``steps`` signed-gradient (FGSM/PGD-style) ascent steps
    of size ``step_size`` x the input box width increases the summed
    ``KL(teacher || student)`` at ``temperature``; the result is clipped to the
    input box. The min-max game of Data-Free Adversarial Distillation (Fang et
    al., 2019) and of zero-shot KD by adversarial belief matching (Micaelli &
    Storkey, 2019), with the generator replaced by a few ascent steps on the
    probes themselves (cheap, and it stays near the probe distribution).
    :func:`distill` with ``adversarial > 0`` does this inside its jitted step."""
    student, teacher = _pretrained(student), _pretrained(teacher)
    lo, hi = teacher.input_box
    x = jnp.asarray(probes, jnp.float32)
    return _push(
        student.model,
        teacher.model,
        x,
        int(steps),
        float(step_size) * (hi - lo),
        (lo, hi),
        temperature,
    )


def distill_loss(
    student: Pretrained,
    teacher: Pretrained,
    probes: jax.Array,
    temperature: float = 4.0,
) -> float:
    """The distillation KL (see :func:`distill`) of ``student`` to ``teacher``."""
    return float(_kl(teacher.model(probes), student.model(probes), temperature))


def distill(
    pruned: Pretrained,
    teacher: Pretrained,
    probes="auto",
    steps: int = 500,
    optimizer=None,
    temperature: float = 4.0,
    seed: int = 0,
    progress: bool = False,
    *,
    num_probes: int = 512,
    batch_size: int = 128,
    regenerate: bool = False,
    masks: Mapping | None = None,
    feature_weight: float | None = None,
    recalibrate_bn: bool | None = None,
    adversarial: int | None = None,
    adversarial_step: float = 0.02,
    mixup: float = 0.5,
    augment: bool | None = None,
    learning_rate: float | None = None,
) -> Pretrained:
    """Trains the compacted ``pruned`` network to match the dense ``teacher``'s
    logits on synthetic probes (knowledge distillation, Hinton et al., 2015, on
    data-free probes as in DAFL / DeepInversion, Chen et al., 2019; Yin et al.,
    2020). Never reads a dataset.

    Each step is one jitted Adam (or ``optimizer``) update on a batch of probes
    refreshed inside the step: shifted and flipped (images), mixed up with other
    probes of the set and, optionally, pushed towards teacher-student
    disagreement (``augment``, ``mixup``, ``adversarial``). An epoch is a pass
    over ``num_probes`` probes, and with ``regenerate`` a new probe set (seed
    ``seed + epoch``) is made every epoch (costly for optimised kinds). BatchNorm
    layers are in inference mode during training; their statistics can be
    re-estimated on the probes first (:func:`recalibrate_batchnorm`,
    shift-corrected when ``masks`` are given). Settings left at ``None`` take
    :data:`DISTILL_DEFAULTS` for the teacher (with or without BatchNorm), each
    chosen on a held-out slice of training images: without BatchNorm
    (LeNet-300-100) the adversarial push, mixup and re-estimation raised
    accuracy; with BatchNorm (ResNet-20) the feature term and mixup beat a plain
    KL, which overfits a small ``bn_stats`` probe set, and the push and the
    re-estimation hurt (benchmarks/results/recovery.md, recovery_resnet20.md).
    A warning says when training ends with a KL on the probes more than 1% above
    the one it started with.

    Args:
        pruned: the compacted network (the student); not modified.
        teacher: the dense network.
        probes: a probe kind, a tuple of kinds (a mixture, ``num_probes``
            split evenly), or an array of model inputs (then never regenerated).
            ``"auto"``: ``bn_stats`` with BatchNorm, else ``("inversion",
            "gaussian")``.
        steps: optimizer steps.
        optimizer: an ``optax`` transformation (default Adam, ``learning_rate``
            cosine-decayed to 0 over ``steps``).
        temperature: softmax temperature of the KL.
        seed: probe and batch-order randomness.
        progress: draw a progress bar.
        num_probes, batch_size: probes per epoch, probes per step.
        regenerate: new probes every epoch (probe kinds only).
        masks: the masks that made ``pruned`` from ``teacher`` (group -> kept
            units); needed by ``feature_weight`` and the shift-corrected BN
            re-estimation.
        feature_weight: weight of a feature term: mean squared error, relative to
            the teacher's energy, between the student's pruned tensors and the
            teacher's on the kept channels (``None`` without ``masks``: 0).
        recalibrate_bn: re-estimate BatchNorm statistics on the probes first.
        adversarial: disagreement probes (see :func:`adversarial_probes`): each
            step's batch is pushed by this many signed-gradient ascent steps
            on the teacher-student KL inside the input box, and the student is
            trained on the batch and its pushed copy together. 0: off.
        adversarial_step: ascent step size, as a fraction of the input box width.
        mixup: each step, every probe is mixed with a random other probe of the
            set, ``x + lam (x' - x)`` with ``lam ~ U(0, mixup)`` (mixup,
            Zhang et al., 2018, on probes), before any adversarial push.
        augment: each step, every probe (an image) is shifted by up to 2 pixels
            and mirrored with probability 1/2 (:func:`gapruning.augment.shift_flip`,
            the shipped convnets' training transforms; vacated pixels take the
            input box's low end, black), before mixup. ``None``: on
            for image inputs ``(height, width, channels)``, else off.
        learning_rate: peak of the default optimizer's schedule (not used with
            ``optimizer``).

    Returns:
        A new :class:`Pretrained` with the trained weights; its card records the
        distillation settings and the KL before/after on the last probes.
    """
    import optax

    from .progress import progress_bar

    pruned, teacher = _pretrained(pruned), _pretrained(teacher)
    defaults = DISTILL_DEFAULTS[bool(batchnorm_nodes(teacher))]
    if feature_weight is None:
        feature_weight = defaults["feature_weight"] if masks is not None else 0.0
    if recalibrate_bn is None:
        recalibrate_bn = defaults["recalibrate_bn"]
    if adversarial is None:
        adversarial = defaults["adversarial"]
    if learning_rate is None:
        learning_rate = defaults["learning_rate"]
    if steps < 1:
        raise RecoverError(f"steps must be at least 1, got {steps}")
    if temperature <= 0:
        raise RecoverError(f"temperature must be positive, got {temperature}")
    if pruned.model.input_shape != teacher.model.input_shape:
        raise RecoverError(
            f"student input shape {pruned.model.input_shape} differs from the "
            f"teacher's {teacher.model.input_shape}"
        )
    if pruned.model.num_outputs != teacher.model.num_outputs:
        raise RecoverError("student and teacher have different numbers of outputs")
    if adversarial < 0 or not 0 <= mixup <= 1 or not learning_rate > 0:
        raise RecoverError(
            "adversarial must be >= 0, mixup in [0, 1] and learning_rate > 0, got "
            f"{adversarial}, {mixup}, {learning_rate}"
        )
    image = len(teacher.model.input_shape) == 3
    augment = image if augment is None else bool(augment)
    if augment and not image:
        raise RecoverError(
            "augment needs image inputs (height, width, channels), got input "
            f"shape {teacher.model.input_shape}"
        )
    if feature_weight > 0 and masks is None:
        raise RecoverError("feature_weight needs the masks that made the student")
    if masks is not None:
        teacher.space.validate(masks)
    kinds = None
    if isinstance(probes, str):
        kinds = (probes,)
        if probes == "auto":
            kinds = ("bn_stats",) if batchnorm_nodes(teacher) else AUTO_DISTILL_PROBES
    elif isinstance(probes, tuple | list) and all(isinstance(k, str) for k in probes):
        kinds = tuple(probes)
    fixed = kinds is None
    if not fixed and not kinds:
        raise RecoverError("probes is an empty tuple of kinds")
    kind = "+".join(kinds) if kinds else "array"

    def probe_set(epoch: int) -> jax.Array:
        if fixed:
            return make_probes(teacher, probes)
        share = -(-num_probes // len(kinds))
        parts = [
            make_probes(teacher, k, share, seed + epoch, cache=False) for k in kinds
        ]
        return jnp.concatenate(parts)[:num_probes]

    student = Pretrained(nnx.clone(pruned.model), dict(pruned.card))
    x = probe_set(0)
    batch_size = min(batch_size, len(x))
    if recalibrate_bn:
        recalibrate_batchnorm(student, x, teacher, masks)

    taps = ()
    keep = {}
    if feature_weight > 0:
        cons = consumers(teacher.model)
        taps = tuple(dict.fromkeys(c.tensor for c in cons))
        for c in cons:
            keep[c.tensor] = np.flatnonzero(np.asarray(masks[c.group]).astype(bool))
    tx = optimizer
    if tx is None:
        tx = optax.adam(optax.cosine_decay_schedule(learning_rate, steps))
    graphdef, params, rest = nnx.split(student.model, nnx.Param, ...)
    t_graph, t_state = nnx.split(teacher.model)
    opt_state = tx.init(params)

    def forward(model, xb):
        return model(xb, taps=taps) if taps else (model(xb), {})

    def loss_fn(params, rest, t_state, xb):
        t_out, t_taps = forward(nnx.merge(t_graph, t_state), xb)
        s_out, s_taps = forward(nnx.merge(graphdef, params, rest), xb)
        loss = _kl(jax.lax.stop_gradient(t_out), s_out, temperature)
        if taps:
            feat = [
                jnp.mean((s_taps[t] - t_taps[t][..., keep[t]]) ** 2)
                / (jnp.mean(t_taps[t] ** 2) + 1e-8)
                for t in taps
            ]
            loss = loss + feature_weight * sum(feat) / len(feat)
        return loss

    lo, hi = teacher.input_box

    def batch(params, rest, t_state, x, idx, key):
        """The step's probes: a batch of the set, augmented, mixed up and pushed."""
        xb = x[idx]
        if augment:
            xb = shift_flip(jax.random.fold_in(key, 1), xb, fill=lo)
        if mixup > 0:
            k1, k2 = jax.random.split(key)
            lam = mixup * jax.random.uniform(k1, (len(idx),) + (1,) * (x.ndim - 1))
            other = x[jax.random.randint(k2, (len(idx),), 0, len(x))]
            xb = xb + lam * (other - xb)
        if adversarial > 0:
            pushed = _push(
                lambda z: nnx.merge(graphdef, params, rest)(z),
                lambda z: nnx.merge(t_graph, t_state)(z),
                xb,
                adversarial,
                adversarial_step * (hi - lo),
                (lo, hi),
                temperature,
            )
            xb = jnp.concatenate([xb, pushed])
        return xb

    @jax.jit
    def step(params, opt_state, rest, t_state, x, idx, key):
        xb = batch(params, rest, t_state, x, idx, key)
        loss, grads = jax.value_and_grad(loss_fn)(params, rest, t_state, xb)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    before = distill_loss(student, teacher, x, temperature)
    per_epoch = max(1, len(x) // batch_size)
    key = jax.random.key(seed)
    mix = jax.random.fold_in(key, 2**31 - 1)  # mixup randomness, apart from orders
    with progress_bar(progress) as bar:
        task = bar.add_task(f"distill {pruned.name}", total=steps)
        for i in range(steps):
            epoch, b = divmod(i, per_epoch)
            if b == 0:
                if epoch > 0 and regenerate and not fixed:
                    x = probe_set(epoch)
                order = jax.random.permutation(jax.random.fold_in(key, epoch), len(x))
            idx = order[b * batch_size : (b + 1) * batch_size]
            params, opt_state, loss = step(
                params, opt_state, rest, t_state, x, idx, jax.random.fold_in(mix, i)
            )
            if progress:
                bar.update(
                    task, completed=i + 1, description=f"distill  KL {float(loss):.4g}"
                )
    student.model = nnx.merge(graphdef, params, rest)
    student.card = dict(student.card)
    student.card["distill"] = {
        "steps": int(steps),
        "temperature": float(temperature),
        "probes": kind,
        "num_probes": int(len(x)),
        "feature_weight": float(feature_weight),
        "adversarial": int(adversarial),
        "adversarial_step": float(adversarial_step),
        "mixup": float(mixup),
        "augment": augment,
        "recalibrate_bn": bool(recalibrate_bn),
        "learning_rate": None if optimizer is not None else float(learning_rate),
        "kl_before": before,
        "kl_after": distill_loss(student, teacher, x, temperature),
    }
    after = student.card["distill"]["kl_after"]
    if not after <= 1.01 * before + 1e-4:  # beyond rounding: the training hurt
        warnings.warn(
            f"distillation raised the KL on the probes from {before:.4g} to "
            f"{after:.4g}; try a lower learning_rate or fewer adversarial steps",
            RuntimeWarning,
            stacklevel=2,
        )
    return student
