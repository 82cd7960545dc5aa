"""ONNX ops of the op table's newer entries, as a mixin of the ONNX importer.

Grouped and depthwise Conv (``group``), MaxPool with ``ceil_mode=1``, the
activations HardSwish, HardSigmoid (``alpha=1/6, beta=0.5``), Clip to ``[0, 6]``
(ReLU6) and Gelu, LayerNormalization over the last axis, Split and Slice of
channel ranges, Mul of two tensors (SiLU's ``x * sigmoid(x)``, a squeeze-and-
excitation gate) and Concat of tensors along the channel axis (the last three in
:mod:`gapruning.convert.onnx` itself, beside their older cases). Each method reads
the current node through the importer's helpers (``x``, ``const``, ``out``,
``fail``) and emits through its :class:`~gapruning.convert.nchw.NCHWGraph`.
"""

from __future__ import annotations

import numpy as np

from .nchw_layout import chunk_sizes


def ceil_extra(size: int, k: int, s: int, before: int, after: int) -> int:
    """Padding to add after the input so that a floor-mode pooling gives
    ``ceil_mode=1``'s output size (a last window that would start in the end
    padding is dropped, as PyTorch and onnxruntime do)."""
    span = size + before + after
    out = -(-(span - k) // s) + 1
    if (out - 1) * s >= size + before:
        out -= 1
    return max((out - 1) * s + k - span, 0)


class OnnxChannelOps:
    """``_<OpType>`` handlers mixed into the ONNX importer."""

    def conv_groups(self, a, w) -> int:
        """The ``group`` of a Conv, checked against its kernel."""
        groups = int(a.get("group", 1))
        c = self.g.fw_shape(self.x())[0]
        if groups < 1 or c % groups or w.shape[1] * groups != c:
            self.fail(f"Conv with group={groups} for {c} input channels")
        return groups

    def ceil_pads(self, a, kernel, strides, pads, op):
        """``pads`` grown at the bottom/right for ``ceil_mode=1``."""
        if not a.get("ceil_mode", 0):
            return pads
        if isinstance(pads, str):
            self.fail(f"{op} with ceil_mode=1 and auto_pad")
        h, w = self.g.fw_shape(self.x())[1:]
        t, left, b, r = pads
        eh = ceil_extra(h, kernel[0], strides[0], t, b)
        ew = ceil_extra(w, kernel[1], strides[1], left, r)
        return (t, left, b + eh, r + ew)

    def _HardSwish(self, a):
        self.out(self.g.activation(self.x(), "hardswish", name=self.label))

    def _HardSigmoid(self, a):
        alpha, beta = float(a.get("alpha", 0.2)), float(a.get("beta", 0.5))
        if not (np.isclose(alpha, 1 / 6) and np.isclose(beta, 0.5)):
            self.fail(
                f"HardSigmoid with alpha={alpha:g}, beta={beta:g} (only 1/6, 0.5)"
            )
        self.out(self.g.activation(self.x(), "hardsigmoid", name=self.label))

    def _Clip(self, a):
        if len(self.node.input) > 1:  # opset >= 11: min and max are inputs
            lo, hi = (self.const(i, required=False) for i in (1, 2))
        else:
            lo, hi = a.get("min"), a.get("max")
        lo = None if lo is None else float(np.asarray(lo).reshape(()))
        hi = None if hi is None else float(np.asarray(hi).reshape(()))
        if (lo, hi) == (0.0, 6.0):
            self.out(self.g.activation(self.x(), "relu6", name=self.label))
        elif lo == 0.0 and hi is None:
            self.out(self.g.relu(self.x(), name=self.label))
        else:
            self.fail(f"Clip to [{lo}, {hi}] (only [0, 6]: ReLU6, and [0, inf): ReLU)")

    def _Gelu(self, a):
        form = a.get("approximate", b"none")
        form = form.decode() if isinstance(form, bytes) else form
        self.out(
            self.g.activation(
                self.x(), "gelu", name=self.label, approximate=form == "tanh"
            )
        )

    def _LayerNormalization(self, a):
        """LayerNorm over the last axis (channels of a channels-last map)."""
        x = self.x()
        rank = len(self.g.fw_shape(x)) + 1
        if int(a.get("axis", -1)) % rank != rank - 1:
            self.fail(f"LayerNormalization over axes from {a.get('axis')} (only -1)")
        scale, bias = self.const(1), self.const(2, required=False)
        if bias is None:
            bias = np.zeros_like(scale)
        eps = float(a.get("epsilon", 1e-5))
        self.out(self.g.layernorm(x, scale, bias, epsilon=eps, name=self.label))

    def channel_range(self, x, start: int, end: int):
        """Channels ``start:end`` of ``x`` (ONNX Slice bounds, clipped)."""
        c = self.g.fw_shape(x)[0] if x.kind == "map" else 0
        start, end = (min(max(v + c if v < 0 else v, 0), c) for v in (start, end))
        if x.kind != "map" or x.layout != "nchw" or end <= start:
            self.fail(f"Slice of channels {start}:{end} of {self.g.fw_shape(x)}")
        return self.g.select_channels(x, range(start, end), name=self.label)

    def _Split(self, a):
        """Consecutive channel ranges (``split`` sizes, or equal parts)."""
        x, outs = self.x(), list(self.node.output)
        sizes = self.const(1, required=False) if len(self.node.input) > 1 else None
        sizes = a.get("split") if sizes is None else sizes
        c = self.g.fw_shape(x)[0]
        if sizes is None:
            sizes = chunk_sizes(c, int(a.get("num_outputs", len(outs))))
        parts = self.g.split(
            x, [int(v) for v in np.ravel(sizes)], int(a.get("axis", 0)), name=self.label
        )
        if len(parts) != len(outs):
            self.fail(f"Split into {len(parts)} parts for {len(outs)} outputs")
        for name, part in zip(outs, parts, strict=True):
            self.vals[name] = part

    # -- shape arithmetic of exported chunk/split sizes

    def shape_binary(self, op: str):
        """``Add``/``Sub``/``Mul``/``Div`` of shape values (the batch size, None,
        stays unknown)."""
        fns = {
            "Add": lambda a, b: a + b,
            "Sub": lambda a, b: a - b,
            "Mul": lambda a, b: a * b,
            "Div": lambda a, b: int(a / b),  # integer Div truncates towards 0
        }
        if op not in fns:
            self.fail(f"{op} of shape values")
        a, b = (self.shape_operand(i) for i in range(2))
        a, b = np.broadcast_arrays(a, b)
        out = [
            None if u is None or v is None else fns[op](int(u), int(v))
            for u, v in zip(a.ravel(), b.ravel(), strict=True)
        ]
        self.shape_vals[self.node.output[0]] = np.asarray(out, object).reshape(a.shape)

    def int_input(self, i: int, required: bool = True):
        """Input ``i`` as integers: a constant, or a known shape value."""
        if i < len(self.node.input) and self.node.input[i] in self.shape_vals:
            v = self.shape_vals[self.node.input[i]]
            if any(d is None for d in np.ravel(v)):
                self.fail(f"{self.node.op_type} bounds that depend on the batch size")
            return np.asarray(v, np.int64)
        return self.const(i, required)
