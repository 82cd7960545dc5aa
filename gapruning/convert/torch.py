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
  is translated (see :mod:`gapruning.convert.nchw`): Linear, Conv2d (any groups:
  depthwise or grouped; dilation 1, zero padding; a 1x1 Conv2d of a pooled map is
  a Linear), BatchNorm1d/2d with running statistics, ReLU, ReLU6, Hardswish,
  Hardsigmoid, SiLU, GELU, Sigmoid, Softmax, MaxPool2d (ceil mode too),
  AvgPool2d (no ceil mode), AdaptiveAvgPool2d (any output size),
  Flatten/``torch.flatten``/``view``/``reshape`` to 2-D, Dropout, Identity,
  residual ``+``, the product of two tensors (squeeze-excite gates),
  ``torch.cat`` along channels, permutes between NCHW and NHWC (LayerNorm,
  Linear and per-channel parameters such as layer scales on channels-last
  maps: ConvNeXt), ``chunk``/``split`` of channels and the view-transpose-view
  channel shuffle (ShuffleNetV2); projection shortcuts are ordinary
  Conv2d+BatchNorm branches.
  A bare state dict has no architecture and needs ``arch``.

Both routes move PyTorch's layouts to ours: ``OIHW -> HWIO`` conv kernels,
``(out, in) -> (in, out)`` matrices, and the rows of the first Dense after a
flatten from ``C,H,W`` to ``H,W,C`` order. Files: ``.pt``/``.pth`` are read with
``torch.load(weights_only=True)`` (a state dict, or a dict holding one under
``state_dict``/``model_state_dict``/``model``); ``.safetensors`` with the
safetensors package, without torch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..models import MODELS
from ..zoo import Pretrained
from .common import (
    ConversionError,
    ModelFormatError,
    check_input_shape,
    imported,
)
from .torch_state import onto_arch
from .torch_trace import trace


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
        **arch_kwargs: keyword arguments of the zoo builder (``num_classes``...)
            with ``arch``; without it only ``num_classes``, checked against the
            traced module's output width (an error when it differs).

    Returns:
        The converted model, in eval mode, with a card recording its origin.

    Raises:
        ModelFormatError: unreadable, truncated or non-state-dict file.
        UnsupportedLayerError: a layer or call without a translation.
        ShapeMismatchError: a tensor whose shape the architecture cannot take.
        ConversionError: an unknown keyword, a ``num_classes`` that does not
            apply, or any other reason the conversion is impossible.

    Example:
        >>> net = from_torch("lenet.pth", arch="lenet300", num_classes=10)
    """
    if input_shape is not None:
        input_shape = check_input_shape(input_shape)
    state, module, file, kind = _read_source(source)
    where = str(file) if file is not None else f"torch {kind}"
    if module is not None:  # errors name the class: "torch module ResNet: ..."
        where = f"torch module {type(module).__name__}"
    if arch is not None:
        if input_shape is not None:
            arch_kwargs["input_shape"] = input_shape
        nodes, params = onto_arch(state, module, arch, arch_kwargs, where)
        extra = {"source": kind, "mapping": "zoo architecture"}
    else:
        if module is None:
            raise ConversionError(
                f"{where}: a state dict holds no architecture; pass arch= (one of "
                f"{', '.join(sorted(MODELS))}) or the nn.Module itself"
            )
        nodes, params = trace(module, input_shape, where)
        check_traced_options(arch_kwargs, nodes, where)
        extra = {"source": kind, "mapping": "torch.fx trace"}
    extra["module"] = type(module).__name__ if module is not None else None
    return imported(
        nodes,
        params,
        source=where,
        framework="torch",
        name=name,
        file=file,
        arch=arch,
        arch_kwargs={k: _jsonable(v) for k, v in arch_kwargs.items()} or None,
        input_box=input_box,
        extra=extra,
    )


def check_traced_options(options: dict[str, Any], nodes, where: str) -> None:
    """The keywords a traced module (no ``arch``) takes besides the named ones:
    only ``num_classes``, which must equal the module's output width (a traced
    module is converted as it is, its classifier is not rebuilt).

    Raises:
        ConversionError: an unknown keyword (named), or a ``num_classes`` the
            module does not have.
    """
    unknown = sorted(set(options) - {"num_classes"})
    if unknown:
        raise ConversionError(
            f"{where}: unknown keyword(s) {', '.join(map(repr, unknown))} for "
            "from_torch without arch= (it takes input_shape, input_box, name and "
            "num_classes; zoo builder keywords need arch=)"
        )
    if "num_classes" in options:
        have, want = int(nodes[-1].shape[-1]), options["num_classes"]
        if not isinstance(want, int) or isinstance(want, bool) or want != have:
            raise ConversionError(
                f"{where}: num_classes={want!r}, but the module outputs {have} "
                "values; a traced module is converted as it is (build it with "
                "the number of classes you want)"
            )


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
