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
  It needs only the consumer's input, so BatchNorm before it and coupled
  (residual) groups are handled as any other input; what a coupled group loses
  through the parameter-free shortcut itself cannot be compensated.

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
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models import Net
from .probes import batchnorm_nodes, make_probes
from .space import PruneSpace
from .zoo import Pretrained

MERGE_METHODS = ("cosine", "lstsq")
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
        if n.op not in ("dense", "conv"):
            continue
        src, positions = by_name[n.inputs[0]], 1
        if src.op == "flatten" and by_name[src.inputs[0]].op == "mask":
            src = by_name[src.inputs[0]]
            positions = math.prod(src.shape[:-1])
        if src.op == "mask":
            out.append(
                Consumer(n.name, n.op, src.attr("group"), src.inputs[0], positions)
            )
    return tuple(out)


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
            f = _features(taps[c.tensor].astype(jnp.float32), by_name[c.layer], c)
            if net.layers[c.layer].bias is not None:
                f = jnp.concatenate([f, jnp.ones((f.shape[0], 1), f.dtype)], 1)
            out[c.layer] = f.T @ f
        return out

    total = None
    for i in range(0, len(probes), batch_size):
        g = batch(state, probes[i : i + batch_size])
        total = g if total is None else jax.tree.map(jnp.add, total, g)
    return total


def lstsq_update(gram, weights, row_mask, ridge: float) -> jax.Array:
    """Re-fits the kept rows of ``weights`` (``(rows, out)``, bias as last row if
    any) so ``X (M W')`` matches ``X W`` in least squares with a ridge pulling
    ``W'`` towards ``W``; removed rows are returned unchanged. Traceable."""
    m = row_mask.astype(gram.dtype)
    lam = ridge * jnp.mean(jnp.diag(gram))
    a = m[:, None] * gram * m[None, :] + jnp.diag(lam * m + (1 - m))
    rhs = m[:, None] * (gram @ ((1 - m)[:, None] * weights))
    return weights + jax.scipy.linalg.solve(a, rhs, assume_a="pos")


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
    ):
        pretrained = _pretrained(pretrained)
        method = REPAIR_ALIASES.get(method, method)
        if method not in MERGE_METHODS:
            raise RecoverError(
                f"unknown merge method {method!r}; known: {', '.join(MERGE_METHODS)}"
            )
        if ridge <= 0:
            raise RecoverError(f"ridge must be positive, got {ridge}")
        self.pretrained = pretrained
        self.method = method
        self.ridge = float(ridge)
        self.threshold = float(threshold)
        net = pretrained.model
        space = pretrained.space
        self.consumers = consumers(net)
        self._sizes = {g.name: g.size for g in space.groups}
        if method == "cosine":
            self._sim = {}
            for g in space.groups:
                v = _incoming(net, space, g)
                if v is None:
                    continue
                norms = jnp.linalg.norm(v, axis=1)
                unit = v / jnp.maximum(norms, 1e-12)[:, None]
                self._sim[g.name] = (unit @ unit.T, norms)
            self.consumers = tuple(c for c in self.consumers if c.group in self._sim)
        else:
            if probes is None:
                probes = "bn_stats" if batchnorm_nodes(net) else "inversion"
            x = make_probes(pretrained, probes, num_probes, seed)
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
            if self.method == "cosine":
                sim, norms = self._sim[c.group]
                z = merge_matrix(sim, norms, mask, self.threshold)
                rows = jnp.einsum("ij,...jo->...io", z, _rows(kernel, c, units))
                new = {"kernel": rows.reshape(kernel.shape).astype(kernel.dtype)}
                if bias is not None:
                    new["bias"] = bias
            else:
                w = kernel.reshape(-1, kernel.shape[-1]).astype(jnp.float32)
                row_mask = jnp.tile(mask, w.shape[0] // units)
                if bias is not None:
                    w = jnp.concatenate([w, bias[None].astype(jnp.float32)])
                    row_mask = jnp.concatenate([row_mask, jnp.ones(1)])
                w = lstsq_update(self._gram[c.layer], w, row_mask, self.ridge)
                new = {"kernel": w[: kernel.size // kernel.shape[-1]]}
                new["kernel"] = new["kernel"].reshape(kernel.shape).astype(kernel.dtype)
                if bias is not None:
                    new["bias"] = w[-1].astype(bias.dtype)
            out[c.layer] = new
        return out

    def __call__(self, masks: Mapping) -> Net:
        """The dense-shaped network with compensated consumer weights."""
        graphdef, params, rest = nnx.split(self.pretrained.model, nnx.Param, ...)
        pure = nnx.to_pure_dict(params)
        for name, new in self.layers(masks).items():
            pure["layers"][name].update(new)
        nnx.replace_by_pure_dict(params, pure)
        return nnx.merge(graphdef, params, rest)


def merge(
    pretrained: Pretrained,
    masks: Mapping,
    probes=None,
    method: str = "cosine",
    **options,
) -> Pretrained:
    """Merging compensation of ``pretrained`` for ``masks`` (see module doc).

    Args:
        pretrained: the dense network.
        masks: group -> kept units (bool or 0/1), as for ``gp.compact``.
        probes: ``"lstsq"`` only: an array of model inputs or a probe kind
            (default ``bn_stats`` with BatchNorm, else ``inversion``).
        method: ``"cosine"`` (Neuron Merging, Kim et al., 2020; alias
            ``"merge"``) or ``"lstsq"`` (ridge re-fit of the consumers on probes).
        **options: ``num_probes``, ``seed``, ``ridge``, ``threshold`` of
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
    repair = Repair(pretrained, method, probes, **options)
    masks = {g: jnp.asarray(np.asarray(m), jnp.float32) for g, m in masks.items()}
    model = repair(masks)
    card = dict(pretrained.card)
    card["repair"] = {"method": repair.method, **options}
    return Pretrained(model, card)
