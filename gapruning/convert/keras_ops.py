"""Keras layers onto the op table: one method per Keras layer class.

:class:`LayerTranslator` turns one layer (its config, its weights, the tensors it
reads) into graph nodes. Keras is channels-last like our graphs, so kernels
(``HWIO``, ``(in, out)``) and flatten order need no conversion. Two Keras views
of a tensor are kept apart from our nodes (:class:`KTensor`):

* ``pooled``: Keras sees ``(1, 1, C)`` (``GlobalAveragePooling2D(keepdims=True)``,
  ``Reshape((1, 1, C))``), our node is ``(C,)``; a 1x1 Conv2D or a Dense on it is
  a dense layer, a Multiply of a map by it a per-channel gate (squeeze-excite).
* ``pads``: a ``ZeroPadding2D`` not yet applied; the valid-padded Conv2D,
  DepthwiseConv2D or pooling layer reading it takes the padding as its own
  (max pooling only of non-negative inputs, where zero and -inf padding agree).

A per-channel affine map (``Rescaling``, ``Normalization``, a Keras op adding or
multiplying a constant such as MobileNetV3's ``relu6(x + 3) * (1 / 6)``) is a
BatchNorm with identity statistics (``mean 0, var 1, epsilon 0``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .common import (
    ModelFormatError,
    ShapeMismatchError,
    UnsupportedLayerError,
    pair,
    unique_name,
)

# Keras activation name -> (op of the table, attributes)
ACTIVATIONS = {
    "relu": ("relu", {}),
    "sigmoid": ("sigmoid", {}),
    "softmax": ("softmax", {}),
    "relu6": ("relu6", {}),
    "hard_sigmoid": ("hardsigmoid", {}),
    "hard_silu": ("hardswish", {}),
    "hard_swish": ("hardswish", {}),
    "silu": ("silu", {}),
    "swish": ("silu", {}),
    "gelu": ("gelu", {"approximate": False}),
}
# ops whose outputs are never negative: zero padding before a max pool is exact
NON_NEGATIVE = ("relu", "relu6", "sigmoid", "hardsigmoid", "softmax")
# layers that take a pending ZeroPadding2D as their own padding
ABSORB_PADDING = ("Conv2D", "DepthwiseConv2D", "MaxPooling2D", "AveragePooling2D")
# Keras ops (``keras.src.ops``) of a tensor and a constant: affine maps
CONSTANT_OPS = ("Add", "Subtract", "Multiply", "Divide", "TrueDivide")


@dataclasses.dataclass(frozen=True)
class KTensor:
    """A Keras tensor: our node, and how Keras sees it (see module docstring)."""

    node: str
    pooled: bool = False
    pads: tuple[tuple[int, int], tuple[int, int]] | None = None


class LayerTranslator:
    """Translates one Keras layer (config + weights) into graph nodes.

    Args:
        g: the :class:`GraphBuilder` being filled.
        taken: node names in use.
        params: our parameters by node, filled in (Flax layouts).
        weights: the layer's ``[(role or None, array)]`` from the file.
        lname, pos, where: the layer's name and position, and the file, for
            error messages.
    """

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

    def layer(self, cls: str, cfg: dict, inputs: list) -> KTensor:
        """The output of layer class ``cls`` (``ops.X`` for a Keras op) applied
        to ``inputs`` (:class:`KTensor`, and constants for Keras ops)."""
        if cls.startswith("ops."):
            return self.constant_op(cls[4:], inputs)
        padded = [x for x in inputs if x.pads is not None]
        if padded and cls not in ABSORB_PADDING:
            self.fail(
                f"{cls} reading a ZeroPadding2D output (only "
                f"{', '.join(ABSORB_PADDING)} with padding='valid' take zero padding)"
            )
        if cls in ("Add", "Multiply", "Concatenate"):
            return getattr(self, f"_{cls}")(cfg, inputs)
        if len(inputs) != 1:
            self.fail(f"{cls} with {len(inputs)} inputs")
        x = inputs[0]
        if cfg.get("data_format", "channels_last") != "channels_last":
            self.fail(f"{cls} with data_format={cfg.get('data_format')!r}")
        handler = getattr(self, f"_{cls}", None)
        if handler is None:
            self.fail(f"layer class {cls} has no translation")
        return handler(cfg, x)

    # -- helpers

    def shape(self, x: KTensor) -> tuple[int, ...]:
        """The shape as Keras sees it (without the batch axis)."""
        s = self.g.shape(x.node)
        return (1, 1, *s) if x.pooled else s

    def need_map(self, x: KTensor, what: str) -> None:
        if len(self.g.shape(x.node)) != 3 or x.pooled:
            self.fail(f"{what} of a tensor of shape {self.shape(x)}")

    def arrays(self, roles: list[str]) -> dict[str, np.ndarray]:
        """The layer's weights by role, in the order Keras stores them."""
        got = self.weights
        if got is None or len(got) != len(roles):
            n = 0 if got is None else len(got)
            raise ModelFormatError(
                f"{self.where}: layer {self.lname!r} needs {len(roles)} weight "
                f"arrays ({', '.join(roles)}), the file has {n}"
            )
        out = {}
        for want, (role, value) in zip(roles, got, strict=True):
            if role is not None and role not in (want, f"depthwise_{want}"):
                raise ModelFormatError(
                    f"{self.where}: layer {self.lname!r}: expected weight {want!r}, "
                    f"found {role!r}"
                )
            out[want] = value
        return out

    def check(self, key: str, arr: np.ndarray, want) -> None:
        if arr.shape != tuple(want):
            raise ShapeMismatchError(
                f"{self.where}: {self.lname}/{key} has shape {arr.shape}, the "
                f"architecture needs {tuple(want)}"
            )

    def kernel_bias(self, cfg, kernel_shape, out: int) -> dict[str, np.ndarray]:
        use_bias = bool(cfg.get("use_bias", True))
        w = self.arrays(["kernel", "bias"] if use_bias else ["kernel"])
        self.check("kernel", w["kernel"], kernel_shape)
        if use_bias:
            self.check("bias", w["bias"], (out,))
        return w

    def activation(self, x: KTensor, act, *, own: bool = False) -> KTensor:
        """``x`` through a Keras activation given by name; ``own``: the layer is
        the activation (its node takes the layer's name)."""
        if isinstance(act, dict):
            act = act.get("config", {}).get("name") or act.get("class_name")
        if act in (None, "linear"):
            return x
        if act not in ACTIVATIONS:
            self.fail(
                f"activation {act!r} (supported: linear, {', '.join(ACTIVATIONS)})"
            )
        op, attrs = ACTIVATIONS[act]
        name = self.name("" if own else op)
        if op == "softmax":  # not elementwise: its own builder method
            node = self.g.softmax(x.node, name=name)
        else:
            node = self.g.activation(x.node, op, name=name, **attrs)
        return dataclasses.replace(x, node=node)

    def affine(self, x: KTensor, scale, shift, name: str = "") -> KTensor:
        """``x * scale + shift``, per channel or scalar, as an affine BatchNorm."""
        c = self.g.shape(x.node)[-1]
        try:
            s = np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (c,))
            b = np.broadcast_to(np.asarray(shift, np.float32).reshape(-1), (c,))
        except ValueError:
            self.fail(
                f"a scale or offset of shape {np.shape(scale)}/{np.shape(shift)} "
                f"on {c} channels (scalars or one per channel only)"
            )
        node = self.g.batchnorm(x.node, epsilon=0.0, name=self.name(name))
        self.params[node] = {
            "scale": s.copy(),
            "bias": b.copy(),
            "mean": np.zeros(c, np.float32),
            "var": np.ones(c, np.float32),
        }
        return dataclasses.replace(x, node=node)

    def constant_op(self, op: str, operands: list) -> KTensor:
        """A Keras op (``x + 3.0``...) of one tensor and one scalar constant."""
        tensors = [i for i, v in enumerate(operands) if isinstance(v, KTensor)]
        if op not in CONSTANT_OPS or len(operands) != 2 or len(tensors) != 1:
            self.fail(
                f"Keras op {op} of {len(tensors)} tensor(s) and "
                f"{len(operands) - len(tensors)} constant(s) (only "
                f"{', '.join(CONSTANT_OPS)} of one tensor and one number)"
            )
        i = tensors[0]
        x, c = operands[i], operands[1 - i]
        if not isinstance(c, int | float):
            self.fail(f"Keras op {op} with a constant {c!r} (only numbers)")
        if x.pads is not None:
            self.fail(f"Keras op {op} of a ZeroPadding2D output")
        if op == "Add":
            return self.affine(x, 1.0, c)
        if op == "Multiply":
            return self.affine(x, c, 0.0)
        if op == "Subtract":
            return self.affine(x, 1.0, -c) if i == 0 else self.affine(x, -1.0, c)
        if i == 1:
            self.fail(f"Keras op {op} of a constant by a tensor")
        return self.affine(x, 1.0 / c, 0.0)

    # -- joins

    def _Add(self, cfg, xs):
        if len(xs) < 2:
            self.fail("Add of fewer than two tensors")
        shapes = {self.shape(x) for x in xs}
        if len(shapes) != 1:
            raise ShapeMismatchError(
                f"{self.where}: Add {self.lname!r} of shapes {sorted(shapes)}"
            )
        return KTensor(self.g.add(*(x.node for x in xs), name=self.base), xs[0].pooled)

    def _Multiply(self, cfg, xs):
        if len(xs) != 2:
            self.fail(f"Multiply of {len(xs)} tensors (two only)")
        a, b = xs
        if a.pooled and not b.pooled:
            a, b = b, a
        gate = b.pooled and not a.pooled and len(self.g.shape(a.node)) == 3
        if self.shape(a) != self.shape(b) and not gate:
            raise ShapeMismatchError(
                f"{self.where}: Multiply {self.lname!r} of shapes {self.shape(a)} "
                f"and {self.shape(b)} (equal shapes, or a map and a (1, 1, C) gate)"
            )
        if self.g.shape(b.node)[-1] != self.g.shape(a.node)[-1]:
            raise ShapeMismatchError(
                f"{self.where}: Multiply {self.lname!r} of {self.shape(a)} by a "
                f"gate of shape {self.shape(b)}"
            )
        return KTensor(self.g.mul(a.node, b.node, name=self.base), a.pooled)

    def _Concatenate(self, cfg, xs):
        rank = len(self.shape(xs[0])) + 1
        axis = cfg.get("axis", -1)
        if not isinstance(axis, int) or axis % rank != rank - 1:
            self.fail(f"Concatenate along axis {axis} (the channel axis only)")
        if len({x.pooled for x in xs}) != 1 or len(xs) < 2:
            self.fail("Concatenate of fewer than two tensors, or of mixed shapes")
        node = self.g.concat(*(x.node for x in xs), name=self.base)
        return KTensor(node, xs[0].pooled)

    # -- weighted layers

    def _Dense(self, cfg, x):
        shape = self.g.shape(x.node)
        units = int(cfg["units"])
        w = self.kernel_bias(cfg, (shape[-1], units), units)
        if len(shape) == 1:
            node = self.g.dense(x.node, units, use_bias="bias" in w, name=self.name())
        else:  # on the last axis of a map: a 1x1 convolution
            node = self.g.conv(
                x.node,
                units,
                1,
                padding="VALID",
                use_bias="bias" in w,
                name=self.name(),
            )
            w["kernel"] = w["kernel"][None, None]
        self.params[node] = w
        return self.activation(KTensor(node, x.pooled), cfg.get("activation"))

    def _Conv2D(self, cfg, x):
        return self.conv(cfg, x, int(cfg["filters"]), int(cfg.get("groups", 1)))

    def _DepthwiseConv2D(self, cfg, x):
        mult = int(cfg.get("depth_multiplier", 1))
        c = self.g.shape(x.node)[-1]
        return self.conv(cfg, x, c * mult, c, depthwise=mult)

    def conv(self, cfg, x, filters: int, groups: int, *, depthwise: int = 0):
        """Conv2D (``groups``) or DepthwiseConv2D (``depthwise`` = multiplier)."""
        cls = "DepthwiseConv2D" if depthwise else "Conv2D"
        if tuple(pair(cfg.get("dilation_rate", 1))) != (1, 1):
            self.fail(f"{cls} with dilation_rate={cfg.get('dilation_rate')}")
        c, k = self.g.shape(x.node)[-1], pair(cfg["kernel_size"])
        per_group = (*k, c, depthwise) if depthwise else (*k, c // groups, filters)
        w = self.kernel_bias(cfg, per_group, filters)
        if depthwise:  # (kh, kw, C, m) -> (kh, kw, 1, C * m): out channel c * m + j
            w["kernel"] = w["kernel"].reshape(*k, 1, filters)
        if x.pooled:  # a (1, 1, C) tensor: a 1x1 convolution is a dense layer
            if k != (1, 1) or groups != 1:
                self.fail(f"{cls} with kernel {k} and {groups} groups of a (1, 1, C)")
            node = self.g.dense(x.node, filters, use_bias="bias" in w, name=self.name())
            w["kernel"] = w["kernel"][0, 0]
        else:
            self.need_map(x, cls)
            try:
                node = self.g.conv(
                    x.node,
                    filters,
                    k,
                    strides=pair(cfg.get("strides", 1)),
                    padding=self.padding(cfg, x),
                    use_bias="bias" in w,
                    groups=groups,
                    name=self.name(),
                )
            except ValueError as err:
                self.fail(str(err))
        self.params[node] = w
        return self.activation(KTensor(node, x.pooled), cfg.get("activation"))

    def padding(self, cfg, x: KTensor) -> Any:
        """The padding of a windowed layer, a pending ZeroPadding2D included."""
        pad = str(cfg.get("padding", "valid")).lower()
        if pad not in ("same", "valid"):
            self.fail(f"padding {pad!r}")
        if x.pads is None:
            return pad.upper()
        if pad != "valid":
            self.fail("padding='same' after a ZeroPadding2D")
        return x.pads

    def _BatchNormalization(self, cfg, x):
        self.last_axis(cfg, x, "BatchNormalization")
        center, scale = cfg.get("center", True), cfg.get("scale", True)
        roles = (["gamma"] if scale else []) + (["beta"] if center else [])
        w = self.arrays([*roles, "moving_mean", "moving_variance"])
        c = self.g.shape(x.node)[-1]
        for key, arr in w.items():
            self.check(key, arr, (c,))
        node = self.g.batchnorm(
            x.node,
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
        return KTensor(node, x.pooled)

    def last_axis(self, cfg, x: KTensor, cls: str) -> None:
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        rank = len(self.shape(x)) + 1
        if not isinstance(axis, int) or axis % rank != rank - 1:
            self.fail(f"{cls} over axis {cfg.get('axis')} (the last axis only)")

    def _LayerNormalization(self, cfg, x):
        self.last_axis(cfg, x, "LayerNormalization")
        if cfg.get("rms_scaling"):
            self.fail("LayerNormalization with rms_scaling=True")
        center, scale = cfg.get("center", True), cfg.get("scale", True)
        w = self.arrays((["gamma"] if scale else []) + (["beta"] if center else []))
        c = self.g.shape(x.node)[-1]
        for key, arr in w.items():
            self.check(key, arr, (c,))
        eps = float(cfg.get("epsilon", 1e-3))
        node = self.g.layernorm(x.node, epsilon=eps, name=self.name())
        self.params[node] = {
            "scale": w.get("gamma", np.ones(c, np.float32)),
            "bias": w.get("beta", np.zeros(c, np.float32)),
        }
        return KTensor(node, x.pooled)

    def _Normalization(self, cfg, x):
        """``(x - mean) / max(sqrt(variance), 1e-7)``, Keras' inference form."""
        self.last_axis(cfg, x, "Normalization")
        if cfg.get("invert"):
            self.fail("Normalization with invert=True")
        c = self.g.shape(x.node)[-1]
        if cfg.get("mean") is not None and cfg.get("variance") is not None:
            mean, var = cfg["mean"], cfg["variance"]
        else:
            w = self.arrays(["mean", "variance", "count"])
            mean, var = w["mean"], w["variance"]
        mean = np.broadcast_to(np.asarray(mean, np.float64).reshape(-1), (c,))
        var = np.broadcast_to(np.asarray(var, np.float64).reshape(-1), (c,))
        inv = 1.0 / np.maximum(np.sqrt(var), 1e-7)
        return self.affine(x, inv, -mean * inv)

    def _Rescaling(self, cfg, x):
        return self.affine(x, cfg.get("scale", 1.0), cfg.get("offset", 0.0))

    # -- windows and shapes

    def _ZeroPadding2D(self, cfg, x):
        self.need_map(x, "ZeroPadding2D")
        p = cfg.get("padding", 1)
        if isinstance(p, int):
            p = ((p, p), (p, p))
        elif all(isinstance(v, int) for v in p):
            p = ((p[0], p[0]), (p[1], p[1]))
        p = tuple((int(a), int(b)) for a, b in p)
        if x.pads is not None:
            p = tuple((a + c, b + d) for (a, b), (c, d) in zip(p, x.pads, strict=True))
        return KTensor(x.node, pads=p)

    def pool(self, cfg, x, kind):
        self.need_map(x, f"{kind} pooling")
        k = pair(cfg.get("pool_size", 2))
        s = cfg.get("strides")
        s = k if s is None else pair(s)
        pad = self.padding(cfg, x)
        if kind == "max":
            producer = next(n for n in self.g.nodes if n.name == x.node)
            if x.pads is not None and (
                producer.op not in NON_NEGATIVE or max(max(p) for p in x.pads) >= min(k)
            ):
                self.fail(
                    "MaxPooling2D after a ZeroPadding2D of a tensor that may be "
                    f"negative (its producer is {producer.op!r}, not one of "
                    f"{', '.join(NON_NEGATIVE)}) or padded by a whole window"
                )
            return KTensor(self.g.maxpool(x.node, k, s, pad, name=self.name()))
        node = self.g.avgpool(
            x.node, k, s, pad, count_include_pad=x.pads is not None, name=self.name()
        )
        return KTensor(node)

    def _MaxPooling2D(self, cfg, x):
        return self.pool(cfg, x, "max")

    def _AveragePooling2D(self, cfg, x):
        return self.pool(cfg, x, "avg")

    def _GlobalAveragePooling2D(self, cfg, x):
        self.need_map(x, "GlobalAveragePooling2D")
        node = self.g.global_avgpool(x.node, name=self.name())
        return KTensor(node, pooled=bool(cfg.get("keepdims", False)))

    def _Flatten(self, cfg, x):
        if len(self.g.shape(x.node)) == 1:
            return KTensor(x.node)
        return KTensor(self.g.flatten(x.node, name=self.name()))

    def _Reshape(self, cfg, x):
        """Only between ``(C,)`` and ``(1, 1, C)`` (squeeze-excite blocks)."""
        target = tuple(int(d) for d in cfg.get("target_shape", ()))
        c = self.g.shape(x.node)[-1]
        if len(self.g.shape(x.node)) == 1:
            if target in ((1, 1, c), (1, 1, -1)):
                return KTensor(x.node, pooled=True)
            if target in ((c,), (-1,)):
                return KTensor(x.node)
        self.fail(
            f"Reshape of {self.shape(x)} to {target} (only between (C,) and (1, 1, C))"
        )

    def _Dropout(self, cfg, x):
        return x

    _SpatialDropout2D = _Dropout

    def _Activation(self, cfg, x):
        return self.activation(x, cfg.get("activation"), own=True)

    def _ReLU(self, cfg, x):
        if cfg.get("negative_slope", 0) or cfg.get("threshold", 0):
            self.fail("ReLU with negative_slope or threshold")
        top = cfg.get("max_value")
        if top is not None and float(top) != 6.0:
            self.fail(f"ReLU with max_value={top} (only None or 6)")
        return self.activation(x, "relu" if top is None else "relu6", own=True)

    def _Softmax(self, cfg, x):
        axis = cfg.get("axis", -1)
        if axis not in (-1, [-1], len(self.shape(x))):
            self.fail(f"Softmax over axis {axis} (last only)")
        return self.activation(x, "softmax", own=True)
