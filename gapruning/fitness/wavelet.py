"""Wavelet channel-aggregation metric (GWCS-style), on probe feature maps.

GWCS (Chen et al., 2021) searches channel masks with a genetic algorithm whose
fitness aggregates the Haar wavelet sub-bands of each channel's feature maps: the
kept channels should represent the layer's full wavelet picture and differ from
each other. The paper gives the idea, not a formula; this module's exact formula:

For every convolutional prunable group ``g`` (its tensor: the input of the group's
first mask node, i.e. the post-activation feature map of ``C`` channels):

1. Haar DWT (one level, orthonormal, :func:`haar_dwt2`) of each channel's map on
   every probe ``b``; sub-band energies ``e_{b,c,s}`` = mean squared coefficient of
   sub-band ``s`` in {LL, LH, HL, HH}.
2. Channel aggregation: ``A_{b,s} = sum_c e_{b,c,s}`` for the dense network and
   ``A'_{b,s} = (C / k) sum_c m_c e'_{b,c,s}`` for the pruned one (``e'`` from the
   pruned network's feature maps, ``k = sum_c m_c`` kept channels; the ``C / k``
   rescaling compares like with like).
3. Representativeness error ``R_g = mean_b sum_s |A'_{b,s} - A_{b,s}| / sum_s
   A_{b,s}`` (relative L1 error of the kept channels' sub-band energy profile).
4. Discriminability: channel signatures ``sigma_c`` = ``log(1 + e_{:,c,:})`` of the
   dense network over all probes and sub-bands, centred and normalized; redundancy
   ``rho(m) = sum_{c != c'} m_c m_c' |cos(sigma_c, sigma_c')| / (k (k - 1))``; the
   penalty is ``max(0, rho(m) - rho(1))`` (kept channels more alike than the
   layer's channels on average).

``WAV = mean_g [R_g + gamma * max(0, rho_g(m) - rho_g(1))]``; 0 for the unpruned
network. Only convolutional groups are scored (Haar of a 1x1 "map" carries no
structure); a network without convolutional groups is an error. What differs from
GWCS: feature maps come from synthetic probes instead of training images, and the
score is one scalar for the whole network instead of a per-stage fitness.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ..space import PruneSpace
from .base import FitnessError, register_metric


def haar_dwt2(x: jax.Array):
    """One-level orthonormal 2-D Haar transform of NHWC feature maps.

    For each 2x2 block ``[[a, b], [c, d]]`` of each channel:
    ``LL = (a + b + c + d) / 2``, ``LH = (a + b - c - d) / 2`` (row difference),
    ``HL = (a - b + c - d) / 2`` (column difference), ``HH = (a - b - c + d) / 2``.
    Odd heights/widths are padded by repeating the last row/column.

    Returns:
        ``(LL, LH, HL, HH)``, each of shape ``(B, ceil(H/2), ceil(W/2), C)``.
    """
    if x.ndim != 4:
        raise FitnessError(f"haar_dwt2 expects NHWC feature maps, got shape {x.shape}")
    h, w = x.shape[1], x.shape[2]
    if h % 2 or w % 2:
        x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    a, b = x[:, 0::2, 0::2], x[:, 0::2, 1::2]
    c, d = x[:, 1::2, 0::2], x[:, 1::2, 1::2]
    return (
        (a + b + c + d) / 2,
        (a + b - c - d) / 2,
        (a - b + c - d) / 2,
        (a - b - c + d) / 2,
    )


def subband_energies(x: jax.Array) -> jax.Array:
    """``(B, C, 4)`` mean squared Haar coefficients per probe, channel, sub-band."""
    bands = haar_dwt2(x)
    return jnp.stack([(s**2).mean(axis=(1, 2)) for s in bands], axis=-1)


def _tensors(net) -> dict[str, str]:
    """Conv group -> the tensor its first mask node reads."""
    space = PruneSpace(net)
    conv = {g.name for g in space.groups if g.kind == "conv"}
    out: dict[str, str] = {}
    for n in net.nodes:
        if n.op == "mask" and n.attr("group") in conv and len(n.shape) == 3:
            out.setdefault(n.attr("group"), n.inputs[0])
    return out


@dataclasses.dataclass(frozen=True)
class WaveletOptions:
    """Options of the ``wavelet`` metric.

    Attributes:
        gamma: weight of the redundancy term against representativeness.
    """

    gamma: float = 0.5


def _prepare(pretrained, probes, opts: WaveletOptions):
    net = pretrained.model
    tensors = _tensors(net)
    if not tensors:
        raise FitnessError(
            f"the wavelet metric scores convolutional channel groups; "
            f"{pretrained.name} has none (its groups are "
            f"{[g.name for g in PruneSpace(net).groups]})"
        )
    _, feats = net(probes, taps=tuple(tensors.values()))
    cache = {}
    for g, t in tensors.items():
        e = subband_energies(feats[t])
        sig = jnp.log1p(e).transpose(1, 0, 2).reshape(e.shape[1], -1)
        sig = sig - sig.mean(-1, keepdims=True)
        sig = sig / (jnp.linalg.norm(sig, axis=-1, keepdims=True) + 1e-12)
        gram = jnp.abs(sig @ sig.T) * (1 - jnp.eye(sig.shape[0]))
        c = sig.shape[0]
        cache[g] = {
            "agg": e.sum(1),
            "gram": gram,
            "rho": gram.sum() / max(c * (c - 1), 1),
        }
    return cache


def wavelet(cache, pruned_apply, masks, probes, opts: WaveletOptions):
    """``mean_g [R_g + gamma * max(0, rho_g(m) - rho_g(1))]`` (module docstring)."""
    tensors = _tensors(pruned_apply.net)
    _, feats = pruned_apply.taps(masks, probes, tuple(tensors.values()))
    scores = []
    for g, t in tensors.items():
        m = jnp.asarray(masks[g], jnp.float32)
        c = m.shape[-1]
        k = m.sum()
        e = subband_energies(feats[t])
        agg = (e * m[:, None]).sum(1) * (c / jnp.maximum(k, 1.0))
        ref = cache[g]["agg"]
        rep = (jnp.abs(agg - ref).sum(-1) / (ref.sum(-1) + 1e-12)).mean()
        rho = m @ cache[g]["gram"] @ m / jnp.maximum(k * (k - 1), 1.0)
        scores.append(rep + opts.gamma * jax.nn.relu(rho - cache[g]["rho"]))
    return sum(scores) / len(scores)


register_metric(
    "wavelet",
    wavelet,
    _prepare,
    description=(
        "GWCS-style Haar sub-band energy aggregation of kept conv channels: "
        "representativeness + redundancy"
    ),
    options=WaveletOptions,
    unit_masks_only=True,
    taps=lambda net: tuple(_tensors(net).values()),
)
