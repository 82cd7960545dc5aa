"""PyTorch networks into Flax: modules, state dicts, ``.pt``/``.pth``, safetensors.

Two routes:

* **onto a zoo architecture** (``arch="lenet300"``, ...): the state dict's layers
  are matched to the layers of ``gapruning.models.MODELS[arch](**arch_kwargs)``.
  Names are tried first (the zoo's own node names, e.g. ``fc1``/``conv1``/``out``,
  and torchvision-style ResNet names ``conv1``/``bn1``/``layerX.Y.convZ``/``bnZ``/
  ``fc``); when they do not cover every layer, layers are matched in definition
  order (nn.Sequential indices, ``fc1``/``fc2``/``fc3``, anything), with the kind
  (Linear, Conv2d, BatchNorm) and every shape checked. Convolutions get PyTorch's
  symmetric padding (the module's own when a module is given, else ``k // 2`` for
  the zoo's "SAME" convolutions), BatchNorm its epsilon/momentum (the module's,
  else PyTorch's defaults ``1e-5``/``0.1``), biases are kept when present and
  dropped when absent.
* **without** ``arch``, an ``nn.Module`` is traced with ``torch.fx`` and every call
  is translated (see :mod:`gapruning.convert.nchw`): Linear, Conv2d (groups=1,
  dilation 1, zero padding), BatchNorm1d/2d with running statistics, ReLU,
  Sigmoid, Softmax, MaxPool2d/AvgPool2d (no ceil mode), AdaptiveAvgPool2d(1),
  Flatten/``torch.flatten``/``view``/``reshape`` to 2-D, Dropout, Identity and
  residual ``+``; projection shortcuts are ordinary Conv2d+BatchNorm branches.
  A bare state dict has no architecture and needs ``arch``.

Both routes move PyTorch's layouts to ours: ``OIHW -> HWIO`` conv kernels,
``(out, in) -> (in, out)`` matrices, and the rows of the first Dense after a
flatten from ``C,H,W`` to ``H,W,C`` order. Files: ``.pt``/``.pth`` are read with
``torch.load(weights_only=True)`` (a state dict, or a dict holding one under
``state_dict``/``model_state_dict``/``model``); ``.safetensors`` with the
safetensors package, without torch.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..models import MODELS
from ..models.graph import Node
from ..zoo import Pretrained
from .common import (
    ConversionError,
    ModelFormatError,
    ShapeMismatchError,
    UnsupportedLayerError,
    build_pretrained,
    check_input_shape,
    chw_rows_to_hwc,
    flatten_source,
    make_card,
    sanitize,
)
from .nchw import NCHWGraph, Val

TORCH_BN_EPS, TORCH_BN_MOMENTUM = 1e-5, 0.1


def from_torch(
    source: Any,
    arch: str | None = None,
    *,
    input_shape: tuple[int, ...] | None = None,
    input_box: tuple[float, float] | None = None,
    name: str | None = None,
    **arch_kwargs,
) -> Pretrained:
    """Converts a PyTorch network into a :class:`~gapruning.zoo.Pretrained`.

    Args:
        source: an ``nn.Module``, a state dict (names to tensors or arrays), or
            the path of a ``.pt``/``.pth``/``.safetensors`` file.
        arch: a zoo architecture (``gapruning.models.MODELS``) to map the weights
            onto; without it ``source`` must be an ``nn.Module`` (traced).
        input_shape: ``(H, W, C)`` or ``(features,)`` as the model receives it;
            passed to the zoo builder with ``arch``, required to trace a module
            that does not start with a Linear layer.
        input_box: ``(low, high)``, the range of valid (already normalized)
            inputs; recorded in the card (default: see
            :data:`gapruning.convert.common.DEFAULT_INPUT_BOX`).
        name: the card's name (default: the file stem or the architecture).
        **arch_kwargs: keyword arguments of the zoo builder (``num_classes``...).

    Returns:
        The converted model, in eval mode, with a card recording its origin.

    Raises:
        ModelFormatError: unreadable, truncated or non-state-dict file.
        UnsupportedLayerError: a layer or call without a translation.
        ShapeMismatchError: a tensor whose shape the architecture cannot take.
        ConversionError: any other reason the conversion is impossible.

    Example:
        >>> net = from_torch("lenet.pth", arch="lenet300", num_classes=10)
    """
    if input_shape is not None:
        input_shape = check_input_shape(input_shape)
    state, module, file, kind = _read_source(source)
    where = str(file) if file is not None else f"torch {kind}"
    if arch is not None:
        if input_shape is not None:
            arch_kwargs["input_shape"] = input_shape
        nodes, params = _onto_arch(state, module, arch, arch_kwargs, where)
        extra = {"source": kind, "mapping": "zoo architecture"}
    else:
        if module is None:
            raise ConversionError(
                f"{where}: a state dict holds no architecture; pass arch= (one of "
                f"{', '.join(sorted(MODELS))}) or the nn.Module itself"
            )
        nodes, params = _trace(module, input_shape, where)
        extra = {"source": kind, "mapping": "torch.fx trace"}
    card = make_card(
        framework="torch",
        model=nodes,
        name=name,
        file=file,
        arch=arch,
        arch_kwargs={k: _jsonable(v) for k, v in arch_kwargs.items()} or None,
        input_box=input_box,
        extra=dict(extra, module=type(module).__name__ if module is not None else None),
    )
    return build_pretrained(nodes, params, card, source=where)


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


# ------------------------------------------------------------------ reading


def _read_source(source):
    """-> (state dict of float32 numpy arrays, module or None, file or None, kind)."""
    try:
        import torch
    except ImportError:  # safetensors and numpy state dicts work without torch
        torch = None
    if torch is not None and isinstance(source, torch.nn.Module):
        return _numpy_state(source.state_dict(), "nn.Module"), source, None, "module"
    if isinstance(source, Mapping):
        return _numpy_state(source, "state dict"), None, None, "state_dict"
    if not isinstance(source, (str, os.PathLike)):
        raise ConversionError(
            f"from_torch takes an nn.Module, a state dict or a file path, got "
            f"{type(source).__name__}"
        )
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ModelFormatError(
                f"{path}: not a readable safetensors file ({err})"
            ) from None
        return _numpy_state(state, str(path)), None, path, "safetensors"
    if torch is None:
        raise ConversionError(f"{path}: reading .pt/.pth files needs torch installed")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for damaged/foreign files
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise ModelFormatError(
            f"{path}: not a readable PyTorch state dict file "
            f"({type(err).__name__}: {first[:200]})"
        ) from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ModelFormatError(
            f"{path}: holds a {type(obj).__name__}, not a state dict "
            "(save model.state_dict(), not the model)"
        )
    return _numpy_state(obj, str(path)), None, path, "file"


def _numpy_state(state: Mapping, where: str) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state.items():
        if str(key).endswith("num_batches_tracked"):
            continue
        if hasattr(value, "detach"):
            value = value.detach().cpu().float().numpy()
        elif not isinstance(value, np.ndarray):
            raise ModelFormatError(
                f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor"
            )
        out[str(key)] = np.asarray(value, np.float32)
    if not out:
        raise ModelFormatError(f"{where}: holds no tensors")
    return out


# ------------------------------------------------------------------ onto a zoo arch


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


def _onto_arch(state, module, arch, arch_kwargs, where):
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
        pads = _torch_conv_pads(mod, (kh, kw))
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
    return p, _set_attrs(node, epsilon=float(eps), momentum=_flax_momentum(momentum))


def _flax_momentum(torch_momentum) -> float:
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


def _torch_conv_pads(mod, kernel) -> tuple[tuple[int, int], tuple[int, int]]:
    pad = mod.padding
    if pad == "valid":
        return ((0, 0), (0, 0))
    if pad == "same":  # torch puts the odd extra padding at the end
        return tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in kernel)
    ph, pw = (pad, pad) if isinstance(pad, int) else pad
    return ((int(ph), int(ph)), (int(pw), int(pw)))


# ------------------------------------------------------------------ fx tracing


def _trace(module, input_shape, where):
    import torch
    import torch.fx
    from torch.nn import functional as F

    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as err:
        raise UnsupportedLayerError(
            f"{where}: {type(module).__name__} cannot be traced with torch.fx "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); pass arch= "
            "to map its state dict onto a zoo architecture instead"
        ) from None
    fx_nodes = list(gm.graph.nodes)
    if input_shape is None:
        input_shape = _guess_input(gm, fx_nodes, where)
    fw = input_shape if len(input_shape) == 1 else (input_shape[2], *input_shape[:2])
    g = NCHWGraph(fw, where=where)
    vals: dict[Any, Any] = {}
    out = None
    position = 0

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return vals[a]
        return a

    def unsupported(what):
        raise UnsupportedLayerError(
            f"{where}: unsupported {what} (position {position} in the traced graph)"
        )

    for n in fx_nodes:
        if n.op == "placeholder":
            if vals:
                unsupported(f"second input {n.name!r}")
            vals[n] = g.input
            continue
        if n.op == "output":
            out = arg(n.args[0])
            break
        position += 1
        args = [arg(a) for a in n.args]
        kw = {k: arg(v) for k, v in n.kwargs.items()}
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            vals[n] = _module_call(g, mod, str(n.target), args, unsupported)
        elif n.op == "call_function":
            vals[n] = _function_call(g, n, args, kw, unsupported, torch, F)
        elif n.op == "call_method":
            vals[n] = _method_call(g, n, args, kw, unsupported)
        else:
            unsupported(f"{n.op} {n.target!r}")
    if not isinstance(out, Val):
        raise UnsupportedLayerError(f"{where}: the module must return one tensor")
    return g.finish(out), g.params


def _guess_input(gm, fx_nodes, where):
    from torch import nn

    for n in fx_nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, nn.Linear):
                return (mod.in_features,)
            break
    raise ConversionError(
        f"{where}: input_shape=(H, W, C) is required to trace a module that does "
        "not start with a Linear layer"
    )


def _np(t):
    return None if t is None else t.detach().cpu().float().numpy()


def _module_call(g: NCHWGraph, mod, target, args, unsupported):
    from torch import nn

    name = sanitize(target)
    x = args[0] if args else None
    if not isinstance(x, Val) or len(args) != 1:
        unsupported(f"call of {target!r} ({type(mod).__name__}) with these arguments")
    if isinstance(mod, nn.Linear):
        return g.linear(x, _np(mod.weight), _np(mod.bias), name=name)
    if isinstance(mod, nn.Conv2d):
        if mod.groups != 1 or tuple(mod.dilation) != (1, 1):
            unsupported(
                f"layer {target!r} (Conv2d with groups={mod.groups}, "
                f"dilation={tuple(mod.dilation)})"
            )
        if mod.padding_mode != "zeros":
            unsupported(f"layer {target!r} (Conv2d padding_mode={mod.padding_mode!r})")
        (t, b), (left, r) = _torch_conv_pads(mod, tuple(mod.kernel_size))
        return g.conv(
            x,
            _np(mod.weight),
            _np(mod.bias),
            strides=tuple(mod.stride),
            pads=(t, left, b, r),
            name=name,
        )
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if mod.running_mean is None:
            unsupported(f"layer {target!r} (BatchNorm without running statistics)")
        c = mod.num_features
        return g.batchnorm(
            x,
            _np(mod.weight) if mod.affine else np.ones(c, np.float32),
            _np(mod.bias) if mod.affine else np.zeros(c, np.float32),
            _np(mod.running_mean),
            _np(mod.running_var),
            epsilon=mod.eps,
            momentum=_flax_momentum(mod.momentum),
            name=name,
        )
    if isinstance(mod, nn.ReLU):
        return g.relu(x, name=name)
    if isinstance(mod, nn.Sigmoid):
        return g.sigmoid(x, name=name)
    if isinstance(mod, nn.Softmax):
        return g.softmax(x, -1 if mod.dim is None else mod.dim, name=name)
    if isinstance(mod, (nn.Dropout, nn.Dropout2d, nn.Identity)):
        return x
    if isinstance(mod, nn.Flatten):
        if mod.start_dim != 1 or mod.end_dim != -1:
            unsupported(f"layer {target!r} (Flatten({mod.start_dim}, {mod.end_dim}))")
        return g.flatten(x, name=name)
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        if mod.ceil_mode or (
            isinstance(mod, nn.MaxPool2d) and _pair(mod.dilation) != (1, 1)
        ):
            unsupported(
                f"layer {target!r} ({type(mod).__name__} with ceil_mode/dilation)"
            )
        k, s, p = (
            _pair(mod.kernel_size),
            _pair(mod.stride or mod.kernel_size),
            _pair(mod.padding),
        )
        pads = (p[0], p[1], p[0], p[1])
        if isinstance(mod, nn.MaxPool2d):
            if mod.return_indices:
                unsupported(f"layer {target!r} (MaxPool2d returning indices)")
            return g.maxpool(x, k, s, pads, name=name)
        if mod.divisor_override is not None:
            unsupported(f"layer {target!r} (AvgPool2d with divisor_override)")
        return g.avgpool(
            x, k, s, pads, count_include_pad=mod.count_include_pad, name=name
        )
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        if _pair(mod.output_size) != (1, 1):
            unsupported(
                f"layer {target!r} (AdaptiveAvgPool2d({mod.output_size}); only "
                "output size 1 is supported)"
            )
        return g.global_avgpool(x, name=name)
    unsupported(f"layer {target!r} ({type(mod).__name__})")


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def _function_call(g: NCHWGraph, n, args, kw, unsupported, torch, F):
    fn = n.target
    name = sanitize(n.name)
    x = args[0] if args else None
    if fn in (torch.relu, F.relu, torch.nn.functional.relu):
        return g.relu(x, name=name)
    if fn in (torch.sigmoid, F.sigmoid):
        return g.sigmoid(x, name=name)
    if fn in (torch.softmax, F.softmax):
        dim = args[1] if len(args) > 1 else kw.get("dim")
        return g.softmax(x, -1 if dim is None else dim, name=name)
    if fn is torch.flatten:
        start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
        if start != 1 or end != -1:
            unsupported(f"call {n.name!r} (torch.flatten from dim {start} to {end})")
        return g.flatten(x, name=name)
    if fn in (F.dropout, F.dropout2d):
        return x
    if fn in (F.max_pool2d, F.avg_pool2d, torch.max_pool2d):
        is_max = fn is not F.avg_pool2d
        names = ["input", "kernel_size", "stride", "padding"] + (
            ["dilation", "ceil_mode", "return_indices"]
            if is_max
            else ["ceil_mode", "count_include_pad", "divisor_override"]
        )
        bound = dict(zip(names, args, strict=False)) | kw
        k = _pair(bound["kernel_size"])
        st = bound.get("stride")
        s = _pair(st) if st not in (None, [], ()) else k
        ph, pw = _pair(bound.get("padding", 0))
        if (
            bound.get("ceil_mode")
            or bound.get("return_indices")
            or bound.get("divisor_override") is not None
            or _pair(bound.get("dilation", 1)) != (1, 1)
        ):
            unsupported(f"call {n.name!r} ({fn.__name__} with ceil_mode/dilation)")
        if is_max:
            return g.maxpool(x, k, s, (ph, pw, ph, pw), name=name)
        return g.avgpool(
            x,
            k,
            s,
            (ph, pw, ph, pw),
            count_include_pad=bound.get("count_include_pad", True),
            name=name,
        )
    if fn in (F.adaptive_avg_pool2d,):
        size = args[1] if len(args) > 1 else kw.get("output_size")
        if _pair(size) != (1, 1):
            unsupported(f"call {n.name!r} (adaptive_avg_pool2d to {size})")
        return g.global_avgpool(x, name=name)
    if fn is operator.getitem and isinstance(x, Val):
        stride = _spatial_stride(args[1])
        if stride is None:
            unsupported(f"indexing {n.name!r} ({args[1]!r}; only x[:, :, ::s, ::s])")
        return g.subsample(x, stride, name=name)
    if fn is F.pad and isinstance(x, Val):
        pad = tuple(args[1] if len(args) > 1 else kw["pad"])
        mode = args[2] if len(args) > 2 else kw.get("mode", "constant")
        value = args[3] if len(args) > 3 else kw.get("value", None)
        if mode != "constant" or value not in (None, 0, 0.0) or len(pad) != 6:
            unsupported(f"call {n.name!r} (F.pad{pad}; only zero channel padding)")
        if any(pad[:4]) or min(pad) < 0:
            unsupported(f"call {n.name!r} (F.pad{pad}; only zero channel padding)")
        c = g.fw_shape(x)[0]
        index = (-1,) * pad[4] + tuple(range(c)) + (-1,) * pad[5]
        return g.select_channels(x, index, name=name)
    if fn in (operator.add, operator.iadd, torch.add):
        a, b = args[0], args[1]
        if kw.get("alpha", 1) != 1:
            unsupported(f"call {n.name!r} (torch.add with alpha)")
        if isinstance(a, Val) and isinstance(b, Val):
            return g.add(a, b, name=name)
        v, c = (a, b) if isinstance(a, Val) else (b, a)
        if isinstance(c, (int, float)):
            return g.affine(v, shift=float(c), name=name)
    if fn in (operator.mul, torch.mul):
        a, b = args[0], args[1]
        v, c = (a, b) if isinstance(a, Val) else (b, a)
        if isinstance(v, Val) and isinstance(c, (int, float)):
            return g.affine(v, scale=float(c), name=name)
    unsupported(f"call {n.name!r} ({getattr(fn, '__name__', fn)})")


def _spatial_stride(index) -> int | None:
    """``s`` for an index ``[:, :, ::s, ::s]`` (or ``[:, :]``), else None."""
    index = index if isinstance(index, tuple) else (index,)
    full = slice(None, None, None)
    if len(index) not in (2, 4) or index[:2] != (full, full):
        return None
    if len(index) == 2:
        return 1
    a, b = index[2:]
    if not (isinstance(a, slice) and isinstance(b, slice)):
        return None
    if a.start not in (None, 0) or b.start not in (None, 0) or a.stop or b.stop:
        return None
    if (a.step or 1) != (b.step or 1):
        return None
    return int(a.step or 1)


class _Size(int):
    """A traced ``x.size(0)``: only usable as the batch size of a view/reshape."""


def _method_call(g: NCHWGraph, n, args, kw, unsupported):
    m = n.target
    name = sanitize(n.name)
    x = args[0] if args else None
    if not isinstance(x, Val):
        unsupported(f"method call {n.name!r} (.{m} on a non-tensor)")
    if m == "size":
        return _Size(-1)
    if m in ("relu", "relu_"):
        return g.relu(x, name=name)
    if m in ("sigmoid", "sigmoid_"):
        return g.sigmoid(x, name=name)
    if m == "softmax":
        dim = args[1] if len(args) > 1 else kw.get("dim")
        return g.softmax(x, dim, name=name)
    if m == "flatten":
        start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
        if start != 1 or (args[2] if len(args) > 2 else kw.get("end_dim", -1)) != -1:
            unsupported(f"method call {n.name!r} (.flatten from dim {start})")
        return g.flatten(x, name=name)
    if m in ("view", "reshape"):
        shape = args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        total = int(np.prod(g.fw_shape(x)))
        if (
            len(shape) == 2
            and (isinstance(shape[0], _Size) or shape[0] == -1)
            and shape[1] in (-1, total)
        ):
            return g.flatten(x, name=name)
        unsupported(f"method call {n.name!r} (.{m}{tuple(shape)}; only to 2-D)")
    unsupported(f"method call {n.name!r} (.{m})")
