"""Keras networks into Flax: ``.h5`` (Keras 2 / tf.keras legacy) and ``.keras``.

Reads the file's own architecture description (the ``model_config`` attribute of
an ``.h5`` file, ``config.json`` inside a ``.keras`` zip) and its weights with
h5py alone: neither TensorFlow nor Keras is needed. Sequential and functional
models (single input, single output, every layer called once) of these layers
are supported: Dense (on vectors), Conv2D (channels_last, no dilation or
groups), BatchNormalization (last axis; epsilon 1e-3 and momentum 0.99 unless
the config says otherwise), MaxPooling2D, AveragePooling2D (Keras' "same"
average pooling excludes the padding, as ours does), GlobalAveragePooling2D,
Flatten, Dropout/SpatialDropout2D, Activation/ReLU/Softmax with relu, sigmoid,
softmax or linear, and Add. Keras is channels-last like our graphs, so kernels
(``HWIO``, ``(in, out)``) and flatten order need no conversion.

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
from typing import Any

import numpy as np

from ..models.graph import GraphBuilder
from ..zoo import Pretrained
from .common import (
    ConversionError,
    ModelFormatError,
    ShapeMismatchError,
    UnsupportedLayerError,
    check_input_shape,
    imported,
    pair,
    unique_name,
)

ACTIVATIONS = ("linear", "relu", "sigmoid", "softmax")
_WEIGHTED = {
    "Dense": "dense",
    "Conv2D": "conv2d",
    "BatchNormalization": "batch_normalization",
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
    out_of: dict[str, str] = {}  # keras layer name -> our node holding its output
    current = g.input
    if not sequential:
        cfg = config.get("config", {})
        first = _endpoint(cfg.get("input_layers", []), "inputs", where)
        last = _endpoint(cfg.get("output_layers", []), "outputs", where)
    skipped = 0
    for pos, layer in enumerate(layers):
        lname = _layer_name(layer)
        lcls = _ALIASES.get(layer.get("class_name"), layer.get("class_name"))
        if lcls == "InputLayer":
            out_of[lname] = g.input
            skipped += 1
            continue
        if sequential:  # positions as in model.layers, which omits the InputLayer
            pos -= skipped
        if sequential:
            inputs = [current]
        else:
            srcs = _inbound(layer, where, pos)
            missing = [s for s in srcs if s not in out_of]
            if missing or not srcs:
                raise ConversionError(
                    f"{where}: layer {lname!r} (position {pos}) reads "
                    f"{missing or 'nothing'}, not produced before it"
                )
            inputs = [out_of[s] for s in srcs]
        ctx = _Ctx(g, taken, params, weights.get(lname), lname, pos, where)
        current = ctx.layer(lcls, layer.get("config", {}), inputs)
        out_of[lname] = current
    if not sequential:
        if first not in out_of or out_of[first] != g.input:
            raise ConversionError(f"{where}: input layer {first!r} not found")
        if last not in out_of:
            raise ConversionError(f"{where}: output layer {last!r} not found")
        current = out_of[last]
    if g.nodes[-1].name != current:
        raise ConversionError(
            f"{where}: the output layer is not the last layer of the config"
        )
    if current == g.input:
        raise ConversionError(f"{where}: the model has no layers")
    return g.build(current), params


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


class _Ctx:
    """Translates one Keras layer (config + weights) into graph nodes."""

    def __init__(self, g, taken, params, weights, lname, pos, where):
        self.g, self.taken, self.params = g, taken, params
        self.weights, self.lname, self.pos, self.where = weights, lname, pos, where
        self.base = unique_name(lname, taken)

    def fail(self, what: str):
        raise UnsupportedLayerError(
            f"{self.where}: unsupported layer {self.lname!r} (position {self.pos}): "
            f"{what}"
        )

    def name(self, suffix: str = "") -> str:
        if not suffix:
            return self.base
        return unique_name(f"{self.base}_{suffix}", self.taken)

    def layer(self, cls: str, cfg: dict, inputs: list[str]) -> str:
        if cls == "Add":
            if len(inputs) < 2:
                self.fail("Add of fewer than two tensors")
            shapes = {self.g.shape(i) for i in inputs}
            if len(shapes) != 1:
                raise ShapeMismatchError(
                    f"{self.where}: Add {self.lname!r} of shapes {sorted(shapes)}"
                )
            return self.g.add(*inputs, name=self.base)
        if len(inputs) != 1:
            self.fail(f"{cls} with {len(inputs)} inputs")
        x = inputs[0]
        if cfg.get("data_format", "channels_last") != "channels_last":
            self.fail(f"{cls} with data_format={cfg.get('data_format')!r}")
        handler = getattr(self, f"_{cls}", None)
        if handler is None:
            self.fail(f"layer class {cls}")
        return handler(cfg, x)

    # -- weights

    def _arrays(self, roles: list[str]) -> dict[str, np.ndarray]:
        got = self.weights
        if got is None or len(got) != len(roles):
            n = 0 if got is None else len(got)
            raise ModelFormatError(
                f"{self.where}: layer {self.lname!r} needs {len(roles)} weight "
                f"arrays ({', '.join(roles)}), the file has {n}"
            )
        out = {}
        for want, (role, value) in zip(roles, got, strict=True):
            if role is not None and role != want:
                raise ModelFormatError(
                    f"{self.where}: layer {self.lname!r}: expected weight {want!r}, "
                    f"found {role!r}"
                )
            out[want] = value
        return out

    def _shape(self, key: str, arr: np.ndarray, want) -> None:
        if arr.shape != tuple(want):
            raise ShapeMismatchError(
                f"{self.where}: {self.lname}/{key} has shape {arr.shape}, the "
                f"architecture needs {tuple(want)}"
            )

    def _activation(self, x: str, act) -> str:
        if act in (None, "linear"):
            return x
        if isinstance(act, dict):
            act = act.get("config", {}).get("name") or act.get("class_name")
        if act == "relu":
            return self.g.relu(x, name=self.name("relu"))
        if act == "sigmoid":
            return self.g.sigmoid(x, name=self.name("sigmoid"))
        if act == "softmax":
            return self.g.softmax(x, name=self.name("softmax"))
        self.fail(f"activation {act!r} (supported: {', '.join(ACTIVATIONS)})")

    # -- layers

    def _Dense(self, cfg, x):
        if len(self.g.shape(x)) != 1:
            self.fail(f"Dense on a tensor of shape {self.g.shape(x)} (not flat)")
        use_bias = bool(cfg.get("use_bias", True))
        w = self._arrays(["kernel", "bias"] if use_bias else ["kernel"])
        units = int(cfg["units"])
        self._shape("kernel", w["kernel"], (self.g.shape(x)[0], units))
        if use_bias:
            self._shape("bias", w["bias"], (units,))
        node = self.g.dense(x, units, use_bias=use_bias, name=self.name())
        self.params[node] = w
        return self._activation(node, cfg.get("activation"))

    def _Conv2D(self, cfg, x):
        if len(self.g.shape(x)) != 3:
            self.fail(f"Conv2D on a tensor of shape {self.g.shape(x)}")
        if (
            tuple(pair(cfg.get("dilation_rate", 1))) != (1, 1)
            or cfg.get("groups", 1) != 1
        ):
            self.fail("Conv2D with dilation or groups")
        use_bias = bool(cfg.get("use_bias", True))
        w = self._arrays(["kernel", "bias"] if use_bias else ["kernel"])
        k, filters = pair(cfg["kernel_size"]), int(cfg["filters"])
        self._shape("kernel", w["kernel"], (*k, self.g.shape(x)[-1], filters))
        if use_bias:
            self._shape("bias", w["bias"], (filters,))
        node = self.g.conv(
            x,
            filters,
            k,
            strides=pair(cfg.get("strides", 1)),
            padding=_padding(cfg.get("padding", "valid"), self),
            use_bias=use_bias,
            name=self.name(),
        )
        self.params[node] = w
        return self._activation(node, cfg.get("activation"))

    def _BatchNormalization(self, cfg, x):
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        rank = len(self.g.shape(x)) + 1
        if not isinstance(axis, int) or axis % rank != rank - 1:
            self.fail(f"BatchNormalization over axis {cfg.get('axis')} (last only)")
        center, scale = cfg.get("center", True), cfg.get("scale", True)
        roles = (["gamma"] if scale else []) + (["beta"] if center else [])
        w = self._arrays([*roles, "moving_mean", "moving_variance"])
        c = self.g.shape(x)[-1]
        for key, arr in w.items():
            self._shape(key, arr, (c,))
        node = self.g.batchnorm(
            x,
            epsilon=float(cfg.get("epsilon", 1e-3)),
            momentum=float(cfg.get("momentum", 0.99)),
            name=self.name(),
        )
        self.params[node] = {
            "scale": w.get("gamma", np.ones(c, np.float32)),
            "bias": w.get("beta", np.zeros(c, np.float32)),
            "mean": w["moving_mean"],
            "var": w["moving_variance"],
        }
        return node

    def _pool(self, cfg, x, kind):
        if len(self.g.shape(x)) != 3:
            self.fail(f"pooling a tensor of shape {self.g.shape(x)}")
        k = pair(cfg.get("pool_size", 2))
        s = cfg.get("strides")
        s = k if s is None else pair(s)
        pad = _padding(cfg.get("padding", "valid"), self)
        if kind == "max":
            return self.g.maxpool(x, k, s, pad, name=self.name())
        return self.g.avgpool(x, k, s, pad, count_include_pad=False, name=self.name())

    def _MaxPooling2D(self, cfg, x):
        return self._pool(cfg, x, "max")

    def _AveragePooling2D(self, cfg, x):
        return self._pool(cfg, x, "avg")

    def _GlobalAveragePooling2D(self, cfg, x):
        if cfg.get("keepdims", False):
            self.fail("GlobalAveragePooling2D with keepdims=True")
        if len(self.g.shape(x)) != 3:
            self.fail(f"pooling a tensor of shape {self.g.shape(x)}")
        return self.g.global_avgpool(x, name=self.name())

    def _Flatten(self, cfg, x):
        if len(self.g.shape(x)) == 1:
            return x
        return self.g.flatten(x, name=self.name())

    def _Dropout(self, cfg, x):
        return x

    _SpatialDropout2D = _Dropout

    def _Activation(self, cfg, x):
        act = cfg.get("activation")
        if act in (None, "linear"):
            return x
        return self._activation(x, act)

    def _ReLU(self, cfg, x):
        if (
            cfg.get("max_value") is not None
            or cfg.get("negative_slope", 0)
            or cfg.get("threshold", 0)
        ):
            self.fail("ReLU with max_value, negative_slope or threshold")
        return self.g.relu(x, name=self.name())

    def _Softmax(self, cfg, x):
        axis = cfg.get("axis", -1)
        if axis not in (-1, [-1], len(self.g.shape(x))):
            self.fail(f"Softmax over axis {axis} (last only)")
        return self.g.softmax(x, name=self.name())


def _padding(pad: Any, ctx: _Ctx) -> str:
    pad = str(pad).lower()
    if pad not in ("same", "valid"):
        ctx.fail(f"padding {pad!r}")
    return pad.upper()
