"""Least-squares repair: the ``"lstsq"`` method, made data-free with probes.

The layer-wise reconstruction of ThiNet (Luo et al., 2017) and He et al. (2017),
fit on synthetic probes instead of data. For each consumer, with ``X`` its input
features on the probes (im2col patches for a Conv, plus a column of ones when it
has a bias) and ``G = X^T X``, the kept rows are re-fit so the consumer's
pre-activations match the dense ones: ``min ||X M W' - X W||^2 + lam ||M (W' -
P)||^2`` with ``lam = ridge * mean(diag G)``, whose solution is ``W'_k = P_k +
(G_kk + lam I)^{-1} G_k: (W - M P)``. The prior ``P`` is the Neuron Merging rows
(``prior="merge"``: a large ``lam`` gives ``"merge"``, a small one plain least
squares) or the rows themselves (``prior="dense"``, ThiNet's ridge). It needs only
the consumer's input, so BatchNorm before it and coupled (residual) groups are
handled as any other input; what a coupled group loses through the parameter-free
shortcut itself cannot be compensated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_batching import custom_vmap

from ..models import Consumer, consumers
from ..probes import batchnorm_nodes, make_probes
from ..zoo import Pretrained


def features(x: jax.Array, node, c: Consumer) -> jax.Array:
    """``(samples, rows)`` input features of a consumer: rows ordered as its kernel
    reshaped to ``(rows, out)`` (each token a sample for a Dense on tokens)."""
    if c.op == "dense" and len(node.shape) == 2:
        return x.reshape(-1, x.shape[-1])
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


def design(x: jax.Array, node, c: Consumer, bias: bool) -> jax.Array:
    """The consumer's least-squares design matrix: its input features, plus a
    column of ones when it has a bias."""
    f = features(x.astype(jnp.float32), node, c)
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
            f = design(taps[c.tensor], by_name[c.layer], c, bias)
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
    """Re-fits the kept rows of ``weights`` in least squares.

    ``weights`` is ``(rows, out)`` (bias as last row if any); ``X (M W')`` is fit
    to ``Y W`` with a ridge pulling ``W'`` towards ``prior`` (default ``W``), given
    ``gram = X^T X`` and ``cross = X^T Y`` (default ``gram``: ``Y = X``): ``W'_k =
    P_k + (G_kk + lam I)^{-1} (C_k: W - G_k: M P)``. Removed rows are returned as
    in ``prior``. Traceable."""
    m = row_mask.astype(gram.dtype)
    prior = weights if prior is None else prior
    lam = ridge * jnp.mean(jnp.diag(gram))
    a = m[:, None] * gram * m[None, :] + jnp.diag(lam * m + (1 - m))
    if cross is None:  # one product: no cancellation between two large ones
        rhs = m[:, None] * (gram @ (weights - m[:, None] * prior))
    else:
        rhs = m[:, None] * (cross @ weights - gram @ (m[:, None] * prior))
    return prior + solve_pos(a, rhs)


def cholesky_solve(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """``a^{-1} rhs`` for a symmetric positive definite ``a``."""
    return jax.scipy.linalg.solve(a, rhs, assume_a="pos")


@custom_vmap
def solve_pos(a: jax.Array, rhs: jax.Array) -> jax.Array:
    """:func:`cholesky_solve`, with a batching rule that avoids a CPU deadlock.

    Under ``vmap`` with a batched ``a`` on CPU it does one unbatched solve per
    example (a ``lax.map``): jaxlib 0.10's batched CPU LAPACK kernels split their
    batch over XLA's intra-op thread pool and block waiting for it, so as many
    batched solves at once as the pool has threads (two consumers' repairs on a
    2-core CPU) deadlock the process. Batched on other platforms; a shared ``a``
    is factorized once, whatever the platform."""
    return cholesky_solve(a, rhs)


@solve_pos.def_vmap
def solve_pos_vmap(axis_size, in_batched, a, rhs):
    """The batching rule of :func:`solve_pos`."""
    a_batched, rhs_batched = in_batched
    if not a_batched:  # unbatched LAPACK calls, the right-hand sides side by side
        return jax.vmap(cholesky_solve, in_axes=(None, 0))(a, rhs), True
    if not rhs_batched:
        rhs = jnp.broadcast_to(rhs, (axis_size, *rhs.shape))
    solved = jax.lax.platform_dependent(
        a,
        rhs,
        cpu=lambda a, rhs: jax.lax.map(lambda ar: cholesky_solve(*ar), (a, rhs)),
        default=jax.vmap(cholesky_solve),
    )
    return solved, True


def refit(layer, mask, units: int, gram, ridge: float, prior_kernel=None, cross=None):
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


def lstsq_probes(
    pretrained: Pretrained, probes, num_probes: int, seed: int
) -> jax.Array:
    """The probes least squares fits on: an array as given, else ``probes`` (a
    kind; default ``bn_stats`` with BatchNorm, else ``gaussian``) made here."""
    if probes is None:
        probes = "bn_stats" if batchnorm_nodes(pretrained.model) else "gaussian"
    return make_probes(pretrained, probes, num_probes, seed)
