"""Converters: pretrained PyTorch, Keras and ONNX networks into Flax, and back out.

Importers (:func:`from_torch`, :func:`from_keras`, :func:`from_onnx`) build a
:class:`~gapruning.models.Net` graph with :class:`~gapruning.models.GraphBuilder`
(so every prunable unit gets a mask and residual additions couple channels),
load the source weights into it and return a :class:`~gapruning.zoo.Pretrained`
whose card records the origin and the valid input range. Exporters
(:func:`to_onnx`, :func:`to_torch_state_dict`) let a user deploy what gapruning
pruned. Framework packages are imported only when a converter needs them.
"""

from .common import (
    DEFAULT_INPUT_BOX,
    ConversionError,
    ModelFormatError,
    ShapeMismatchError,
    UnsupportedLayerError,
)
from .export_onnx import to_onnx
from .export_torch import to_torch_module, to_torch_state_dict
from .keras import from_keras
from .onnx import from_onnx
from .torch import from_torch

__all__ = [
    "DEFAULT_INPUT_BOX",
    "ConversionError",
    "ModelFormatError",
    "ShapeMismatchError",
    "UnsupportedLayerError",
    "from_keras",
    "from_onnx",
    "from_torch",
    "to_onnx",
    "to_torch_module",
    "to_torch_state_dict",
]
