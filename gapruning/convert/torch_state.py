"""A PyTorch state dict mapped onto a zoo architecture (``from_torch(..., arch=)``).

The state dict's layers (grouped by name prefix) are matched to the Dense, Conv
and BatchNorm nodes of ``gapruning.models.MODELS[arch](**arch_kwargs)``: by name
first (the zoo's node names, torchvision-style ResNet names), else in definition
order with kinds and shapes checked. Each layer's tensors are moved to Flax
layouts and the node's attributes (bias, padding, BatchNorm epsilon/momentum) are
set from the tensors present and, when a module is given, from its submodules.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from ..models import MODELS
from ..models.graph import Node
from .common import (
    ConversionError,
    ShapeMismatchError,
    UnsupportedLayerError,
    chw_rows_to_hwc,
    flatten_source,
)

TORCH_BN_EPS, TORCH_BN_MOMENTUM = 1e-5, 0.1


@dataclasses.dataclass
class _TorchLayer:
    prefix: str
    kind: str  # "dense" | "conv" | "batchnorm"
    tensors: dict[str, np.ndarray]


def _group_layers(state: dict[str, np.ndarray], where: str) -> list[_TorchLayer]:
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        groups.setdefault(prefix, {})[leaf] = value
    layers = []
    for pos, (prefix, tensors) in enumerate(groups.items()):
        weight = tensors.get("weight")
        if "running_mean" in tensors:
            kind = "batchnorm"
        elif weight is not None and weight.ndim == 2:
            kind = "dense"
        elif weight is not None and weight.ndim == 4:
            kind = "conv"
        else:
            desc = ", ".join(f"{k} {v.shape}" for k, v in tensors.items())
            raise UnsupportedLayerError(
                f"{where}: layer {prefix or '<root>'!r} (position {pos}) holds "
                f"{desc}: not a Linear, Conv2d or BatchNorm layer"
            )
        allowed = {
            "dense": {"weight", "bias"},
            "conv": {"weight", "bias"},
            "batchnorm": {"weight", "bias", "running_mean", "running_var"},
        }[kind]
        extra = sorted(set(tensors) - allowed)
        if extra:
            raise UnsupportedLayerError(
                f"{where}: layer {prefix!r} (position {pos}) has unexpected "
                f"tensors {extra} for a {kind} layer"
            )
        layers.append(_TorchLayer(prefix, kind, tensors))
    return layers


_RESNET = re.compile(r"^layer(\d+)\.(\d+)\.(conv|bn)(\d+)$")
_SHORTCUT = re.compile(r"(^|\.)(downsample|shortcut)\.\d+$")


def _zoo_name(prefix: str, slots: dict[str, Node]) -> str | None:
    """The zoo node a torch layer name denotes, if the name says so."""
    p = prefix.removeprefix("module.")
    if p in slots:
        return p
    m = _RESNET.match(p)
    if m:
        s, b, kind, z = m.groups()
        return f"s{s}b{b}_{kind}{z}"
    if "stem_conv" in slots:
        return {
            "conv1": "stem_conv",
            "bn1": "stem_bn",
            "fc": "out",
            "linear": "out",
        }.get(p)
    return None


def onto_arch(state, module, arch, arch_kwargs, where):
    """-> (node tuple of ``arch`` with attributes set, Flax params per layer)."""
    if arch not in MODELS:
        raise ConversionError(
            f"unknown architecture {arch!r}; known: {', '.join(sorted(MODELS))}"
        )
    try:
        nodes = MODELS[arch](**arch_kwargs)
    except TypeError as err:
        raise ConversionError(f"bad arguments for {arch!r}: {err}") from None
    layers = _group_layers(state, where)
    slots = {n.name: n for n in nodes if n.op in ("dense", "conv", "batchnorm")}
    shortcuts = [t.prefix for t in layers if _SHORTCUT.search(t.prefix)]
    if shortcuts and not any(_SHORTCUT.search(s) for s in slots):
        raise ConversionError(
            f"{where}: {shortcuts[0]!r} is a projection shortcut, but {arch} has "
            "parameter-free shortcuts; convert the nn.Module without arch= to keep "
            "its projection shortcuts"
        )
    pairs = _match_by_name(layers, slots)
    if pairs is None:
        pairs = _match_by_order(layers, list(slots.values()), arch, where)
    modules = dict(module.named_modules()) if module is not None else {}
    params, replaced = {}, {}
    last_dense = [n.name for n in nodes if n.op == "dense"][-1:]
    for t, node in pairs:
        mod = modules.get(t.prefix)
        if node.op == "dense":
            params[node.name], replaced[node.name] = _dense(
                t, node, nodes, arch, where, node.name in last_dense
            )
        elif node.op == "conv":
            params[node.name], replaced[node.name] = _conv(t, node, nodes, mod, where)
        else:
            params[node.name], replaced[node.name] = _bn(t, node, mod, where)
    return tuple(replaced.get(n.name, n) for n in nodes), params


def _match_by_name(layers, slots):
    names = [_zoo_name(t.prefix, slots) for t in layers]
    if None in names or len(set(names)) != len(names) or set(names) != set(slots):
        return None
    if any(slots[n].op != t.kind for n, t in zip(names, layers, strict=True)):
        return None
    return [(t, slots[n]) for t, n in zip(layers, names, strict=True)]


def _match_by_order(layers, slots, arch, where):
    kinds = [t.kind for t in layers]
    want = [n.op for n in slots]
    if kinds != want:
        if len(kinds) == len(want):
            i = next(
                i for i, (a, b) in enumerate(zip(kinds, want, strict=True)) if a != b
            )
            raise ConversionError(
                f"{where}: layer {layers[i].prefix!r} (position {i}) is a {kinds[i]} "
                f"layer but {arch} has a {want[i]} layer {slots[i].name!r} there"
            )
        raise ConversionError(
            f"{where}: the state dict has {len(kinds)} layers "
            f"({_count(kinds)}) but {arch} has {len(want)} ({_count(want)})"
        )
    return list(zip(layers, slots, strict=True))


def _count(kinds):
    return ", ".join(f"{kinds.count(k)} {k}" for k in ("conv", "batchnorm", "dense"))


def _in_features(nodes, node):
    by_name = {n.name: n for n in nodes}
    return by_name[node.inputs[0]].shape[-1]


def _set_attrs(node: Node, **attrs) -> Node:
    return dataclasses.replace(
        node, attrs=tuple(sorted(dict(node.attrs, **attrs).items()))
    )


def _dense(t, node, nodes, arch, where, is_last):
    w = t.tensors["weight"]
    want = (node.attr("features"), _in_features(nodes, node))
    if w.shape != want:
        if is_last and w.shape[1] == want[1] and w.shape[0] != want[0]:
            raise ShapeMismatchError(
                f"{where}: the state dict is for {w.shape[0]} classes but {arch} was "
                f"built with num_classes={want[0]} (tensor {t.prefix}.weight has "
                f"shape {w.shape}, layer {node.name!r} needs {want}); pass "
                f"num_classes={w.shape[0]}"
            )
        raise ShapeMismatchError(
            f"{where}: tensor {t.prefix}.weight has shape {w.shape} but {arch} layer "
            f"{node.name!r} needs {want}"
        )
    kernel = w.T.copy()
    flat = flatten_source(nodes, node.name)
    if flat is not None:
        h, wd, c = next(n.shape for n in nodes if n.name == flat.inputs[0])
        kernel = chw_rows_to_hwc(kernel, (c, h, wd))
    p = {"kernel": kernel}
    if "bias" in t.tensors:
        _check(t, "bias", (want[0],), node, where)
        p["bias"] = t.tensors["bias"]
    return p, _set_attrs(node, use_bias="bias" in t.tensors)


def _conv(t, node, nodes, mod, where):
    w = t.tensors["weight"]
    kh, kw = node.attr("kernel_size")
    want = (node.attr("features"), _in_features(nodes, node), kh, kw)
    if w.shape != want:
        raise ShapeMismatchError(
            f"{where}: tensor {t.prefix}.weight has shape {w.shape} but layer "
            f"{node.name!r} needs {want}"
        )
    strides = node.attr("strides")
    if mod is not None:
        if tuple(mod.stride) != tuple(strides) or tuple(mod.dilation) != (1, 1):
            raise ConversionError(
                f"{where}: {t.prefix!r} has stride {tuple(mod.stride)} and dilation "
                f"{tuple(mod.dilation)}, layer {node.name!r} stride {tuple(strides)}"
            )
        if mod.groups != 1 or mod.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"{where}: {t.prefix!r} uses groups={mod.groups}, padding_mode="
                f"{mod.padding_mode!r}; only groups=1 with zero padding is supported"
            )
        pads = conv_pads(mod, (kh, kw))
    else:
        pad = node.attr("padding")
        if pad == "VALID":
            pads = ((0, 0), (0, 0))
        elif pad == "SAME":
            pads = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        else:
            pads = pad
    h, wd, _ = next(n.shape for n in nodes if n.name == node.inputs[0])
    out = tuple(
        (size + lo + hi - k) // s + 1
        for size, (lo, hi), k, s in zip((h, wd), pads, (kh, kw), strides, strict=True)
    )
    if out != tuple(node.shape[:2]):
        raise ShapeMismatchError(
            f"{where}: {t.prefix!r} with padding {pads} gives {out} outputs per "
            f"channel, layer {node.name!r} needs {tuple(node.shape[:2])}"
        )
    p = {"kernel": w.transpose(2, 3, 1, 0).copy()}
    if "bias" in t.tensors:
        _check(t, "bias", (want[0],), node, where)
        p["bias"] = t.tensors["bias"]
    return p, _set_attrs(node, use_bias="bias" in t.tensors, padding=pads)


def _bn(t, node, mod, where):
    c = node.shape[-1]
    for key in ("running_mean", "running_var", "weight", "bias"):
        if key in t.tensors:
            _check(t, key, (c,), node, where)
    p = {
        "scale": t.tensors.get("weight", np.ones(c, np.float32)),
        "bias": t.tensors.get("bias", np.zeros(c, np.float32)),
        "mean": t.tensors["running_mean"],
        "var": t.tensors["running_var"],
    }
    eps = getattr(mod, "eps", TORCH_BN_EPS)
    momentum = getattr(mod, "momentum", TORCH_BN_MOMENTUM)
    return p, _set_attrs(node, epsilon=float(eps), momentum=flax_momentum(momentum))


def flax_momentum(torch_momentum) -> float:
    """Flax's BatchNorm momentum equal to PyTorch's ``momentum``."""
    # torch: running = (1 - m) * running + m * batch; flax: m' * running + ...
    # torch's m=None (cumulative average) has no flax equivalent: use the default.
    return 1.0 - float(TORCH_BN_MOMENTUM if torch_momentum is None else torch_momentum)


def _check(t, key, want, node, where):
    got = t.tensors[key].shape
    if got != tuple(want):
        raise ShapeMismatchError(
            f"{where}: tensor {t.prefix}.{key} has shape {got} but layer "
            f"{node.name!r} needs {tuple(want)}"
        )


def conv_pads(mod, kernel) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))`` of a Conv2d module with ``kernel``."""
    pad = mod.padding
    if pad == "valid":
        return ((0, 0), (0, 0))
    if pad == "same":  # torch puts the odd extra padding at the end
        return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel)
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    return ((int(ph), int(ph)), (int(pw), int(pw)))
