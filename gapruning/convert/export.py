"""Pruned (or any) gapruning models out to ONNX and PyTorch, for deployment.

:func:`to_onnx` writes the node tuple directly with ``onnx.helper`` (opset 17,
NCHW input ``(N, C, H, W)`` or ``(N, features)``, symbolic batch size): Dense ->
Gemm, Conv -> Conv with explicit pads (our "SAME" is TensorFlow's, extra padding
at the end), BatchNorm -> BatchNormalization, pools with explicit pads, global
average pooling -> GlobalAveragePool + Flatten, flatten of a feature map ->
Transpose to NHWC + Flatten (our flatten order), residual Add -> Add, the
parameter-free shortcut ``channel_map`` -> Slice + Pad/Gather (+ Mul for zero
channels that are not a padding), masks -> Mul by the mask constant, omitted when
all ones (a compacted model has none left). Masks with a population axis cannot
be exported. :func:`gapruning.convert.from_onnx` reads every op written here.

:func:`to_torch_module` builds an ``nn.Module`` executing the same graph in NCHW
(one submodule per layer, named like the graph's node), and
:func:`to_torch_state_dict` its state dict: PyTorch layouts (``OIHW``,
``(out, in)``, rows of a Dense after a flatten in ``C,H,W`` order), BatchNorm
running statistics, masks folded into the weights of the layers that read them
(exact for 0/1 masks read by Dense/Conv, or by a Dense through a flatten). For a
zoo architecture its keys (``conv1.weight``, ``fc1.bias``...) are the zoo's node
names, which :func:`gapruning.convert.from_torch` maps back by name.
"""

from __future__ import annotations

import numpy as np

from ..models.ops import OPS
from ..zoo import Pretrained
from .common import ConversionError


def layer_arrays(pretrained: Pretrained) -> dict[str, dict[str, np.ndarray]]:
    """Every layer's variables as float32 NumPy arrays (Flax layouts)."""
    ops = {n.name: n.op for n in pretrained.model.nodes}
    out = {}
    for name, layer in pretrained.model.layers.items():
        out[name] = {
            var: np.asarray(getattr(layer, var)[...], np.float32)
            for var in OPS[ops[name]].variables
            if getattr(layer, var, None) is not None
        }
    return out


def vector_masks(pretrained: Pretrained) -> dict[str, np.ndarray]:
    """The model's masks as float32 vectors; population masks are refused."""
    masks = {
        g: np.asarray(m[...], np.float32) for g, m in pretrained.model.masks.items()
    }
    for g, m in masks.items():
        if m.ndim != 1:
            raise ConversionError(
                f"mask {g!r} has a population axis (shape {m.shape}); export one "
                "individual's masks"
            )
    return masks


def explicit_pads(padding, in_hw, kernel, strides) -> tuple[tuple[int, int], ...]:
    """((top, bottom), (left, right)) for our padding spec (TF "SAME" rule)."""
    if padding == "VALID":
        return ((0, 0), (0, 0))
    if padding == "SAME":
        out = []
        for size, k, s in zip(in_hw, kernel, strides, strict=True):
            total = max((-(-size // s) - 1) * s + k - size, 0)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple((int(lo), int(hi)) for lo, hi in padding)
