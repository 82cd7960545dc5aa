"""A float64 NumPy interpreter of gapruning graphs: the simple reference that the
jitted executor, the population pass and compaction are checked against."""

from __future__ import annotations

import math

import numpy as np
from flax import nnx


def _pad(x, padding, k, s):
    if padding == "VALID":
        return x
    if padding == "SAME":
        pads = []
        for size, kk, ss in zip(x.shape[1:3], k, s, strict=False):
            out = -(-size // ss)
            total = max((out - 1) * ss + kk - size, 0)
            pads.append((total // 2, total - total // 2))
    else:
        pads = padding
    return np.pad(x, ((0, 0), *pads, (0, 0)))


def _windows(x, k, s):
    """(B, H', W', kh, kw, C) view of all windows."""
    b, h, w, c = x.shape
    oh, ow = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
    out = np.empty((b, oh, ow, k[0], k[1], c))
    for i in range(k[0]):
        for j in range(k[1]):
            out[:, :, :, i, j, :] = x[
                :, i : i + s[0] * oh : s[0], j : j + s[1] * ow : s[1], :
            ]
    return out


def _gelu(x):
    return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / np.sqrt(2.0)))


_ELEMENTWISE = {
    "relu6": lambda x: np.clip(x, 0.0, 6.0),
    "gelu": _gelu,
}


def _attention(q, k, v, heads, d):
    """Multi-head attention, one head and one batch element at a time."""
    out = np.zeros_like(v)
    for b in range(len(q)):
        for h in range(heads):
            cols = slice(h * d, (h + 1) * d)
            s = q[b][:, cols] @ k[b][:, cols].T / np.sqrt(d)
            w = np.exp(s - s.max(-1, keepdims=True))
            out[b][:, cols] = (w / w.sum(-1, keepdims=True)) @ v[b][:, cols]
    return out


def forward(net, x, masks=None, use_masks=True):
    """Output of ``net`` (a gapruning Net) on ``x`` in float64.

    ``masks`` maps group -> (units,) array (defaults to the net's own masks);
    ``use_masks=False`` skips every mask node (the unmasked network).
    """
    params = {
        k: {n: np.asarray(v, np.float64) for n, v in d.items()}
        for k, d in nnx.to_pure_dict(nnx.state(net.layers)).items()
    }
    if masks is None:
        masks = {g: np.asarray(m[...]) for g, m in net.masks.items()}
    vals, kept = {}, {}  # kept: mask node -> its kept channels
    for n in net.nodes:
        a = dict(n.attrs)
        ins = [vals[i] for i in n.inputs]
        if n.op == "input":
            y = np.asarray(x, np.float64)
        elif n.op == "mask":
            m = np.repeat(np.asarray(masks[a["group"]], np.float64), a.get("unit", 1))
            kept[n.name] = m > 0 if use_masks else np.ones(len(m), bool)
            y = ins[0] * m if use_masks else ins[0]
        elif n.op == "dense":
            p = params[n.name]
            y = ins[0] @ p["kernel"] + p.get("bias", 0.0)
        elif n.op == "conv":
            p = params[n.name]
            xp = _pad(ins[0], a["padding"], a["kernel_size"], a["strides"])
            win = _windows(xp, a["kernel_size"], a["strides"])
            y = np.einsum("bhwijc,ijco->bhwo", win, p["kernel"]) + p.get("bias", 0.0)
        elif n.op == "dwconv":
            p = params[n.name]
            xp = _pad(ins[0], a["padding"], a["kernel_size"], a["strides"])
            win = _windows(xp, a["kernel_size"], a["strides"])
            y = np.einsum("bhwijc,ijc->bhwc", win, p["kernel"][:, :, 0])
            y = y + p.get("bias", 0.0)
        elif n.op in _ELEMENTWISE:
            y = _ELEMENTWISE[n.op](ins[0])
        elif n.op == "mul":
            gate = ins[1]
            y = ins[0] * (gate[:, None, None, :] if gate.ndim < ins[0].ndim else gate)
        elif n.op == "layernorm":  # over the kept channels; the bias elsewhere
            p, x = params[n.name], ins[0]
            on = kept.get(n.inputs[0], np.ones(x.shape[-1], bool))
            z = x[..., on] - x[..., on].mean(-1, keepdims=True)
            std = np.sqrt((z**2).mean(-1, keepdims=True) + a["epsilon"])
            y = np.broadcast_to(p["bias"], x.shape).copy()
            y[..., on] = z / std * p["scale"][on] + p["bias"][on]
        elif n.op == "tokens":
            y = ins[0].reshape(len(ins[0]), -1, ins[0].shape[-1])
        elif n.op == "class_token":
            table = params[n.name]["embedding"]
            y = np.concatenate(
                [np.broadcast_to(table, (len(ins[0]), *table.shape)), ins[0]], 1
            )
        elif n.op == "pos_embedding":
            y = ins[0] + params[n.name]["embedding"]
        elif n.op == "select_token":
            y = ins[0][:, a["index"]]
        elif n.op == "attention":
            y = _attention(*ins, a["heads"], a["head_dim"])
        elif n.op == "batchnorm":
            p = params[n.name]
            y = (ins[0] - p["mean"]) / np.sqrt(p["var"] + a["epsilon"]) * p[
                "scale"
            ] + p["bias"]
        elif n.op == "relu":
            y = np.maximum(ins[0], 0.0)
        elif n.op == "sigmoid":
            y = 1.0 / (1.0 + np.exp(-ins[0]))
        elif n.op == "maxpool":
            xp = (
                ins[0]
                if a["padding"] == "VALID"
                else _pad(ins[0], a["padding"], a["window"], a["strides"])
            )
            y = _windows(xp, a["window"], a["strides"]).max(axis=(3, 4))
        elif n.op == "avgpool":
            y = _windows(
                _pad(ins[0], a["padding"], a["window"], a["strides"]),
                a["window"],
                a["strides"],
            ).mean(axis=(3, 4))
        elif n.op == "global_avgpool":
            y = ins[0].mean(axis=(1, 2))
        elif n.op == "flatten":
            y = ins[0].reshape(len(ins[0]), -1)
        elif n.op == "add":
            y = sum(ins)
        elif n.op == "channel_map":
            s = a["stride"]
            src = ins[0][:, ::s, ::s, :]
            y = np.stack(
                [
                    src[..., i] if i >= 0 else np.zeros(src.shape[:-1])
                    for i in a["index"]
                ],
                axis=-1,
            )
        else:
            raise ValueError(n.op)
        vals[n.name] = y
    return vals[net.nodes[-1].name]


def flops(net) -> int:
    """Multiply-accumulates of every layer with a kernel: output positions (or
    tokens) times kernel entries, and of attention's two matrix products per
    head, ``T * T * head_dim`` each (the convention of :mod:`gapruning.space`)."""
    total = 0
    for n in net.nodes:
        kernel = (
            getattr(net.layers[n.name], "kernel", None)
            if n.name in net.layers
            else None
        )
        if kernel is not None:
            total += math.prod(n.shape[:-1]) * kernel[...].size
        if n.op == "attention":
            t = n.shape[0]
            total += 2 * n.attr("heads") * t * t * n.attr("head_dim")
    return total
