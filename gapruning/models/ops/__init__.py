"""The op table: one :class:`Op` per graph op, in :data:`OPS`.

Adding an op is one class (usually one file in this package) and one
:func:`register_op` line below; see ``docs/extending.md``. The protocol is in
:mod:`~gapruning.models.ops.base`.
"""

from __future__ import annotations

from .activations import (
    GELU,
    Hardsigmoid,
    Hardswish,
    ReLU,
    ReLU6,
    Sigmoid,
    SiLU,
    Softmax,
)
from .attention import Attention
from .base import FLOWS, LinearOp, Op, ShapeOp, UnsupportedOpError
from .batchnorm import BatchNorm
from .concat import Concat, ConcatMask
from .grouped import DepthwiseConv, GroupedConv, GroupwiseConv
from .layernorm import LayerNorm
from .linear import Conv, Dense
from .multiply import Mul
from .pooling import AdaptiveAvgPool, AvgPool, GlobalAvgPool, MaxPool, apply_pool
from .shuffle import ChannelShuffle
from .structure import Add, ChannelMap, Flatten, Input, Mask
from .tokens import ClassToken, PosEmbedding, SelectToken, Tokens

__all__ = [
    "FLOWS",
    "OPS",
    "LinearOp",
    "Op",
    "ShapeOp",
    "UnsupportedOpError",
    "apply_pool",
    "op_of",
    "register_op",
]

OPS: dict[str, Op] = {}


def register_op(op: Op) -> Op:
    """Adds ``op`` (an :class:`Op` instance) to :data:`OPS` under ``op.name``."""
    if not op.name:
        raise ValueError(f"{type(op).__name__} has no name")
    if op.flow not in FLOWS:
        raise ValueError(
            f"op {op.name!r}: flow {op.flow!r} is not one of {list(FLOWS)}"
        )
    OPS[op.name] = op
    return op


def op_of(node) -> Op:
    """The :class:`Op` of ``node``; an unknown op fails naming the node."""
    op = OPS.get(node.op)
    if op is None:
        raise UnsupportedOpError(
            f"node {node.name!r}: unknown op {node.op!r}; known ops are {sorted(OPS)}"
        )
    return op


register_op(Input())
register_op(Mask())
register_op(Dense())
register_op(Conv())
register_op(BatchNorm())
register_op(ReLU())
register_op(Sigmoid())
register_op(Softmax())
register_op(ReLU6())
register_op(Hardsigmoid())
register_op(Hardswish())
register_op(SiLU())
register_op(GELU())
register_op(MaxPool())
register_op(AvgPool())
register_op(GlobalAvgPool())
register_op(AdaptiveAvgPool())
register_op(Flatten())
register_op(Add())
register_op(ChannelMap())
register_op(DepthwiseConv())
register_op(GroupedConv())
register_op(GroupwiseConv())
register_op(Mul())
register_op(Concat())
register_op(ConcatMask())
register_op(LayerNorm())
register_op(ChannelShuffle())
register_op(Tokens())
register_op(ClassToken())
register_op(PosEmbedding())
register_op(SelectToken())
register_op(Attention())
