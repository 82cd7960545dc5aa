"""Keras networks into Flax: ``.h5`` (Keras 2 / tf.keras legacy) and ``.keras``.

Reads the file's own architecture description (the ``model_config`` attribute of
an ``.h5`` file, ``config.json`` inside a ``.keras`` zip) and its weights with
h5py alone: neither TensorFlow nor Keras is needed. Sequential and functional
models (single input, single output, every layer called once) of these layers
are supported (channels_last; the translations are in
:mod:`~gapruning.convert.keras_ops`): Dense (on vectors, or on the channels of
a map), Conv2D (also grouped; no dilation), DepthwiseConv2D (any depth
multiplier), BatchNormalization and LayerNormalization (last axis),
MaxPooling2D, AveragePooling2D (Keras' "same" average pooling excludes the
padding, as ours does), GlobalAveragePooling2D (also ``keepdims=True``),
ZeroPadding2D before a valid convolution or pooling, Flatten, Reshape between
``(C,)`` and ``(1, 1, C)``, Dropout/SpatialDropout2D, Rescaling, Normalization,
Activation/ReLU/Softmax with relu, relu6 (``ReLU(max_value=6)``), sigmoid,
hard_sigmoid, hard_silu/hard_swish, silu/swish, gelu, softmax or linear, Add,
Multiply (equal shapes, or a map by a ``(1, 1, C)`` squeeze-excite gate),
Concatenate along channels, and Keras ops adding, subtracting, multiplying or
dividing a tensor by a number (``x + 3.0``).

Weights: in an ``.h5`` file they are found through each layer's ``weight_names``;
in a ``.keras`` file through the ``name`` attribute of each ``layers/*/vars``
group (older Keras 3 files without it: by Keras' own per-class path names).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from ..models.graph import GraphBuilder
from ..zoo import Pretrained
from .common import (
    ConversionError,
    ModelFormatError,
    UnsupportedLayerError,
    check_input_shape,
    imported,
)
from .keras_ops import KTensor, LayerTranslator

_WEIGHTED = {
    "Dense": "dense",
    "Conv2D": "conv2d",
    "DepthwiseConv2D": "depthwise_conv2d",
    "BatchNormalization": "batch_normalization",
    "LayerNormalization": "layer_normalization",
    "Normalization": "normalization",
}
_ALIASES = {
    "MaxPool2D": "MaxPooling2D",
    "AvgPool2D": "AveragePooling2D",
    "GlobalAvgPool2D": "GlobalAveragePooling2D",
    "Convolution2D": "Conv2D",
}


def from_keras(
    path: str | os.PathLike,
    *,
    input_shape: tuple[int, ...] | None = None,
    input_box: tuple[float, float] | None = None,
    name: str | None = None,
) -> Pretrained:
    """Converts a saved Keras model into a :class:`~gapruning.zoo.Pretrained`.

    Args:
        path: a ``.h5`` file saved with its architecture (``model.save``, not
            ``save_weights``) or a ``.keras`` file.
        input_shape: ``(H, W, C)`` or ``(features,)``; needed only when the file
            does not say it.
        input_box: ``(low, high)``, the range of valid inputs as the model
            receives them; recorded in the card (default: see
            :data:`gapruning.convert.common.DEFAULT_INPUT_BOX`).
        name: the card's name (default: the file stem).

    Returns:
        The converted model, in eval mode.

    Raises:
        ModelFormatError: not a Keras model file, truncated, or weights only.
        UnsupportedLayerError: a layer (named, with its position) without a
            translation.
        ShapeMismatchError: weights whose shapes contradict the architecture.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if input_shape is not None:
        input_shape = check_input_shape(input_shape)
    config, weights, fmt, version = _read(path)
    nodes, params = _build(config, weights, input_shape, str(path))
    origin = {
        "format": fmt,
        "keras_version": version,
        "model_class": config.get("class_name"),
    }
    return imported(
        nodes,
        params,
        source=str(path),
        framework="keras",
        name=name,
        file=path,
        input_box=input_box,
        extra=origin,
    )


# ------------------------------------------------------------------ reading


def _read(path: Path):
    """-> (model config, {layer name: [(role, array)]}, format, keras version)."""
    import h5py

    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                config = json.loads(z.read("config.json"))
                meta = (
                    json.loads(z.read("metadata.json"))
                    if "metadata.json" in z.namelist()
                    else {}
                )
                blob = z.read("model.weights.h5")
        except KeyError as err:
            raise ModelFormatError(
                f"{path}: not a .keras model archive (no {err})"
            ) from None
        except (zipfile.BadZipFile, json.JSONDecodeError, OSError, EOFError) as err:
            raise ModelFormatError(f"{path}: damaged .keras archive ({err})") from None
        try:
            with h5py.File(io.BytesIO(blob), "r") as f:
                weights = _keras3_weights(f, config)
        except OSError as err:
            raise ModelFormatError(
                f"{path}: damaged model.weights.h5 ({err})"
            ) from None
        return config, weights, "keras", meta.get("keras_version")
    if magic != b"\x89HDF\r\n\x1a\n":
        raise ModelFormatError(f"{path}: neither an HDF5 (.h5) nor a .keras file")
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("model_config")
            if raw is None:
                raise ModelFormatError(
                    f"{path}: holds no model_config (weights only, saved with "
                    "save_weights?); save the whole model"
                )
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            version = f.attrs.get("keras_version")
            group = f["model_weights"] if "model_weights" in f else f
            weights = _h5_weights(group, path)
    except OSError as err:
        raise ModelFormatError(
            f"{path}: unreadable or truncated HDF5 file ({err})"
        ) from None
    except json.JSONDecodeError as err:
        raise ModelFormatError(
            f"{path}: model_config is not valid JSON ({err})"
        ) from None
    if isinstance(version, bytes):
        version = version.decode()
    return config, weights, "h5", None if version is None else str(version)


def _h5_weights(group, path):
    out = {}
    for layer in group:
        g = group[layer]
        names = g.attrs.get("weight_names", [])
        arrays = []
        for wn in names:
            wn = wn.decode() if isinstance(wn, bytes) else str(wn)
            if wn not in g:
                raise ModelFormatError(
                    f"{path}: weight {wn!r} of layer {layer!r} is missing"
                )
            role = wn.split("/")[-1].split(":")[0]
            arrays.append((role, np.asarray(g[wn][()], np.float32)))
        out[layer] = arrays
    return out


def _keras3_weights(f, config):
    by_name, by_path = {}, {}

    def visit(path, obj):
        if path.endswith("/vars") or path == "vars":
            keys = sorted(obj.keys(), key=int)
            arrays = [np.asarray(obj[k][()], np.float32) for k in keys]
            owner = path[: -len("/vars")] if path != "vars" else ""
            by_path[owner] = arrays
            name = obj.attrs.get("name")
            if name is not None:
                by_name[name.decode() if isinstance(name, bytes) else str(name)] = (
                    arrays
                )

    f.visititems(visit)
    out = dict(by_name)
    # Older Keras 3 files: vars groups carry no name; use Keras' path naming.
    counts: dict[str, int] = {}
    for layer in _layer_list(config):
        cls = _ALIASES.get(layer.get("class_name"), layer.get("class_name"))
        if cls not in _WEIGHTED:
            continue
        base = _WEIGHTED[cls]
        k = counts.get(base, 0)
        counts[base] = k + 1
        lname = _layer_name(layer)
        key = f"layers/{base}" + (f"_{k}" if k else "")
        if lname not in out and key in by_path:
            out[lname] = by_path[key]
    return {k: [(None, a) for a in v] for k, v in out.items()}


# ------------------------------------------------------------------ building


def _layer_list(config) -> list[dict]:
    cfg = config.get("config", config)
    layers = cfg if isinstance(cfg, list) else cfg.get("layers", [])
    return list(layers)


def _layer_name(layer: dict) -> str:
    return str(layer.get("name") or layer.get("config", {}).get("name"))


def _inbound(layer: dict, where: str, pos: int) -> list[str]:
    nodes = layer.get("inbound_nodes") or []
    if not nodes:
        return []
    if len(nodes) > 1:
        raise UnsupportedLayerError(
            f"{where}: layer {_layer_name(layer)!r} (position {pos}) is called "
            f"{len(nodes)} times; shared layers are not supported"
        )
    node = nodes[0]
    names: list[str] = []

    def collect(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") == "__keras_tensor__":
                names.append(str(obj["config"]["keras_history"][0]))
                return
            for v in obj.values():
                collect(v)
        elif isinstance(obj, list):
            if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int):
                names.append(obj[0])  # Keras 2: [name, node_index, tensor_index, kw]
                return
            for v in obj:
                collect(v)

    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        collect(node.get("args", []))
    else:
        collect(node)
    return names


def _endpoint(spec, what: str, where: str) -> str:
    """The single layer name of ``input_layers`` / ``output_layers``."""
    if isinstance(spec, list) and spec and isinstance(spec[0], str):
        return spec[0]
    if isinstance(spec, list) and len(spec) == 1 and isinstance(spec[0], list):
        return spec[0][0]
    raise UnsupportedLayerError(
        f"{where}: the model has {len(spec)} {what}; exactly one is supported"
    )


def _batch_shape(layer: dict):
    cfg = layer.get("config", {})
    for key in ("batch_shape", "batch_input_shape"):
        if cfg.get(key) is not None:
            return tuple(cfg[key][1:])
    return None


def _build(config: dict, weights: dict, input_shape, where: str):
    cls = config.get("class_name")
    layers = _layer_list(config)
    if cls not in ("Sequential", "Functional", "Model"):
        raise UnsupportedLayerError(
            f"{where}: top-level model class {cls!r} (Sequential or functional "
            "models only)"
        )
    if not layers:
        raise ModelFormatError(f"{where}: the model config lists no layers")
    sequential = cls == "Sequential"
    if not sequential:
        layers = fuse_hard_sigmoid(layers, where)
    shape = _model_input_shape(config, layers, sequential)
    if input_shape is not None:
        shape = input_shape
    if shape is None or any(d is None for d in shape):
        raise ConversionError(
            f"{where}: the file does not give the input shape ({shape}); pass "
            "input_shape=(H, W, C)"
        )
    g = GraphBuilder(tuple(int(d) for d in shape))
    taken = {g.input}
    params: dict[str, dict[str, np.ndarray]] = {}
    out_of: dict[str, KTensor] = {}  # keras layer name -> its output
    current = KTensor(g.input)
    if not sequential:
        cfg = config.get("config", {})
        first = _endpoint(cfg.get("input_layers", []), "inputs", where)
        last = _endpoint(cfg.get("output_layers", []), "outputs", where)
    skipped = 0
    for pos, layer in enumerate(layers):
        lname = _layer_name(layer)
        lcls = _ALIASES.get(layer.get("class_name"), layer.get("class_name"))
        if lcls == "InputLayer":
            out_of[lname] = KTensor(g.input)
            skipped += 1
            continue
        if _is_op(layer):
            lcls = f"ops.{lcls}"  # a Keras op on tensors (x + 3.0), not a layer
        if sequential:  # positions as in model.layers, which omits the InputLayer
            pos -= skipped
            inputs = [current]
        else:
            inputs = _inputs(layer, out_of, where, pos)
        ctx = LayerTranslator(g, taken, params, weights.get(lname), lname, pos, where)
        current = ctx.layer(lcls, layer.get("config", {}), inputs)
        out_of[lname] = current
    if not sequential:
        if first not in out_of or out_of[first].node != g.input:
            raise ConversionError(f"{where}: input layer {first!r} not found")
        if last not in out_of:
            raise ConversionError(f"{where}: output layer {last!r} not found")
        current = out_of[last]
    if current.pads is not None or current.pooled:
        raise UnsupportedLayerError(
            f"{where}: the output is a ZeroPadding2D's or a (1, 1, C) tensor; "
            "flatten or reshape it to (C,) in the model"
        )
    if g.nodes[-1].name != current.node:
        raise ConversionError(
            f"{where}: the output layer is not the last layer of the config"
        )
    if current.node == g.input:
        raise ConversionError(f"{where}: the model has no layers")
    return g.build(current.node), params


def fuse_hard_sigmoid(layers: list[dict], where: str) -> list[dict]:
    """``ReLU(6)(x + 3) * (1 / 6)`` (Keras ops around a ReLU, as MobileNetV3
    writes its hard sigmoid) as one ``Activation("hard_sigmoid")`` layer, where
    the two intermediate tensors have no other reader."""
    readers: dict[str, list[dict]] = {}
    for pos, layer in enumerate(layers):
        for src in _inbound(layer, where, pos):
            readers.setdefault(src, []).append(layer)
    drop: set[str] = set()
    fused: dict[str, dict] = {}
    for layer in layers:
        add = _constant_op(layer, "Add", 3.0)
        relu = readers.get(_layer_name(layer), [])
        if add is None or len(relu) != 1 or not _is_relu6(relu[0]):
            continue
        mul = readers.get(_layer_name(relu[0]), [])
        if len(mul) != 1 or _constant_op(mul[0], "Multiply", 1 / 6) is None:
            continue
        drop.update((_layer_name(layer), _layer_name(relu[0])))
        name = _layer_name(mul[0])
        fused[name] = {
            "class_name": "Activation",
            "name": name,
            "config": {"name": name, "activation": "hard_sigmoid"},
            "inbound_nodes": [{"args": [add], "kwargs": {}}],
        }
    return [
        fused.get(_layer_name(layer), layer)
        for layer in layers
        if _layer_name(layer) not in drop
    ]


def _constant_op(layer: dict, op: str, value: float):
    """The tensor argument of a Keras op ``op`` of a tensor and ``value``, else
    None."""
    if layer.get("class_name") != op or not _is_op(layer):
        return None
    args = _call_args(layer)
    numbers = [a for a in args if isinstance(a, int | float)]
    tensors = [a for a in args if isinstance(a, dict)]
    if len(args) != 2 or len(tensors) != 1 or len(numbers) != 1:
        return None
    return tensors[0] if abs(numbers[0] - value) < 1e-9 else None


def _is_relu6(layer: dict) -> bool:
    cfg = layer.get("config", {})
    return (
        layer.get("class_name") == "ReLU"
        and cfg.get("max_value") is not None
        and float(cfg["max_value"]) == 6.0
        and not cfg.get("negative_slope")
        and not cfg.get("threshold")
    )


def _call_args(layer: dict) -> list:
    """The positional arguments of a Keras 3 layer's (first) call."""
    node = (layer.get("inbound_nodes") or [{}])[0]
    return list(node.get("args", [])) if isinstance(node, dict) else []


def _is_op(layer: dict) -> bool:
    """A Keras op on tensors (``x + 3.0``), not a layer: said by its module, or
    (legacy ``.h5`` configs, without modules) by a number among its arguments."""
    module = layer.get("module")
    if module is not None:
        return str(module).startswith("keras.src.ops")
    return any(isinstance(a, int | float) for a in _call_args(layer))


def _inputs(layer: dict, out_of: dict, where: str, pos: int) -> list:
    """What a functional model's layer reads: :class:`KTensor` outputs of earlier
    layers and, for Keras ops, number constants, in call order."""
    lname = _layer_name(layer)
    srcs = _inbound(layer, where, pos)
    missing = [s for s in srcs if s not in out_of]
    if missing or not srcs:
        raise ConversionError(
            f"{where}: layer {lname!r} (position {pos}) reads "
            f"{missing or 'nothing'}, not produced before it"
        )
    if not _is_op(layer):
        return [out_of[s] for s in srcs]
    out = []
    for arg in _call_args(layer):
        if isinstance(arg, dict) and arg.get("class_name") == "__keras_tensor__":
            out.append(out_of[str(arg["config"]["keras_history"][0])])
        else:
            out.append(arg)
    return out


def _model_input_shape(config, layers, sequential):
    for layer in layers:
        shape = _batch_shape(layer)
        if shape is not None:
            return shape
        if sequential:
            break
    build = config.get("build_config") or {}
    shape = build.get("input_shape")
    if shape:
        return tuple(shape[1:])
    return None
