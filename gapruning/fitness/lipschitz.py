"""Lipschitz metric: how much of the dense network's layer-wise gain pruning loses.

The product of per-layer spectral norms is the classic upper bound on a network's
Lipschitz constant (Szegedy et al., 2014, "Intriguing properties of neural
networks"); spectral norms are estimated by power iteration (as in spectral
normalization, Miyato et al., 2018). Each Dense/Conv layer is taken as the linear
operator ``x -> m_out * s * W(m_in * x)`` on its full input tensor, where
``m_in``/``m_out`` are the masks of its input/output units and ``s`` the scale of
a BatchNorm directly after it (``gamma / sqrt(var + eps)``); convolutions are
operators on the feature map (padding and stride included), not reshaped kernels.

Removing units can only shrink these norms, so the masked bound never exceeds the
dense one; the metric is the log-ratio

``LIP = sum_l log sigma_l(dense) - log sigma_l(masked) = -log(prod_l sigma_l(masked)
/ prod_l sigma_l(dense)) >= 0``

i.e. how much of the dense network's gain (its dominant directions) the pruned
network loses; 0 for the unpruned network. What differs from the sources: they use
the bound to certify or regularize robustness; here it is a pruning signal, and
for residual networks the shortcuts are ignored (the plain product of the layers).
Dense norms and the dense top singular vectors are computed once (100 iterations);
each masked estimate starts from the masked dense vector (``iterations`` steps).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..models.ops import op_of
from ..space import PruneSpace
from .base import register_metric
from .interval import layer_params, linear_bound


def _layers(net):
    """Per Dense/Conv node: (node, input shape, input-mask spec, output group, bn)."""
    space = PruneSpace(net)
    by_name = {n.name: n for n in net.nodes}
    consumers: dict[str, list] = {}
    for n in net.nodes:
        for i in n.inputs:
            consumers.setdefault(i, []).append(by_name[n.name])
    out = []
    for n in net.nodes:
        if n.op not in ("dense", "conv"):
            continue
        src = by_name[n.inputs[0]]
        in_spec = None  # (mask node, its shape); flattened if needed
        if src.op == "mask":
            in_spec = (src, src.shape)
        elif src.op == "flatten" and by_name[src.inputs[0]].op == "mask":
            m = by_name[src.inputs[0]]
            in_spec = (m, m.shape)
        nexts = consumers.get(n.name, [])
        bn = nexts[0].name if len(nexts) == 1 and nexts[0].op == "batchnorm" else None
        out.append((n, src.shape, in_spec, space.group_of(n.name), bn))
    return out


def _operator(n, p, bn_p, bn_node, m_in, m_out):
    def apply(v):
        y = linear_bound(n, p, v * m_in, absolute=False, bias=False)
        if bn_p is not None:
            y = y * bn_p["scale"] * jax.lax.rsqrt(bn_p["var"] + bn_node.attr("epsilon"))
        return y * m_out

    return apply


def _power(apply, v, iterations: int):
    def norm(a):
        return jnp.sqrt(jnp.sum(a * a))

    def body(_, v):
        _, vjp = jax.vjp(apply, v)
        w = vjp(apply(v))[0]
        return w / (norm(w) + 1e-30)

    v = jax.lax.fori_loop(0, iterations, body, v / (norm(v) + 1e-30))
    return norm(apply(v)), v


def _start(v, m_in):
    """Warm start: the dense top singular vector restricted to the kept inputs
    (plus a small uniform part, in case the restriction vanishes)."""
    return v * m_in + 1e-3 * m_in / jnp.sqrt(jnp.maximum(m_in.sum(), 1.0))


def _masks_for(spec, masks, shape, dtype):
    if spec is None or masks is None:
        return jnp.ones(shape, dtype)
    node, mshape = spec
    m = op_of(node).mask_vector(node, masks.__getitem__)
    return jnp.broadcast_to(jnp.asarray(m, dtype), mshape).reshape(shape)


def _out_mask(group, masks, n, dtype):
    if group is None or masks is None:
        return jnp.ones(n.shape[-1:], dtype)
    m = jnp.asarray(masks[group], dtype)  # a unit may span several channels
    return jnp.repeat(m, n.shape[-1] // m.shape[-1], axis=-1)


@dataclasses.dataclass(frozen=True)
class LipschitzOptions:
    """Options of the ``lipschitz`` metric.

    Attributes:
        iterations: power-iteration steps of each masked estimate.
        seed: randomness of the dense power iterations' start vectors.
    """

    iterations: int = 20
    seed: int = 0


def _prepare(pretrained, probes, opts: LipschitzOptions):
    net = pretrained.model
    params = layer_params(net)
    by_name = {n.name: n for n in net.nodes}
    layers = _layers(net)
    rng = np.random.default_rng(opts.seed)
    starts = [
        jnp.asarray(rng.normal(size=(1, *in_shape)), jnp.float32)
        for _, in_shape, _, _, _ in layers
    ]

    @jax.jit
    def reference(starts):
        sigmas, vectors = [], []
        for (n, in_shape, _, _, bn), v0 in zip(layers, starts, strict=True):
            ones = jnp.ones(in_shape, jnp.float32)
            apply = _operator(
                n,
                params[n.name],
                params.get(bn) if bn else None,
                by_name.get(bn),
                ones,
                jnp.ones(n.shape[-1:], jnp.float32),
            )
            _, v = _power(apply, v0, 100)
            # the dense reference runs exactly what a full mask runs in lipschitz()
            sigma, _ = _power(apply, _start(v, ones), int(opts.iterations))
            sigmas.append(sigma)
            vectors.append(v)
        return jnp.log(jnp.stack(sigmas) + 1e-30), vectors

    log_sigma, vectors = reference(starts)
    return {"log_sigma": log_sigma, "v": vectors}


def lipschitz(cache, pruned_apply, masks, probes, opts: LipschitzOptions):
    """``sum_l log sigma_l(dense) - log sigma_l(masked)`` (>= 0, 0 unpruned).

    ``sigma_l`` is the spectral norm of layer ``l`` as an operator with its input
    and output masks applied (power iteration; see the module docstring).
    """
    net = pruned_apply.net
    params = layer_params(net)
    by_name = {n.name: n for n in net.nodes}
    logs = []
    layers = _layers(net)
    for (n, in_shape, in_spec, group, bn), v in zip(layers, cache["v"], strict=True):
        m_in = _masks_for(in_spec, masks, in_shape, v.dtype)
        m_out = _out_mask(group, masks, n, v.dtype)
        apply = _operator(
            n,
            params[n.name],
            params.get(bn) if bn else None,
            by_name.get(bn),
            m_in,
            m_out,
        )
        sigma, _ = _power(apply, _start(v, m_in), int(opts.iterations))
        logs.append(jnp.log(sigma + 1e-30))
    return jnp.sum(cache["log_sigma"] - jnp.stack(logs))


register_metric(
    "lipschitz",
    lipschitz,
    _prepare,
    description=(
        "log-ratio of the product of per-layer spectral norms, dense over masked "
        "(power iteration)"
    ),
    options=LipschitzOptions,
    needs_probes=False,
    unit_masks_only=True,
)
