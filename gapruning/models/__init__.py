"""Model zoo. ``MODELS`` maps an architecture name to a function returning its graph.

Add a model by writing a function that builds its nodes with
:class:`~gapruning.models.graph.GraphBuilder` and calling :func:`register_model`.
"""

from __future__ import annotations

from collections.abc import Callable

from flax import nnx

from .consumers import Consumer, consumers, group_consumers
from .graph import (
    GraphBuilder,
    Mask,
    Net,
    Node,
    abstract_net,
    assemble,
    channel_spaces,
    insert_masks,
)
from .lenet5 import lenet5
from .mlp import lenet300, paoding_mlp
from .mobilenet import mobilenet
from .resnet import resnet20, resnet32, resnet56
from .vgg import vgg11
from .vit import vit

MODELS: dict[str, Callable[..., tuple[Node, ...]]] = {
    "lenet300": lenet300,
    "paoding_mlp": paoding_mlp,
    "lenet5": lenet5,
    "vgg11": vgg11,
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet56": resnet56,
    "mobilenet": mobilenet,
    "vit": vit,
}


def register_model(name: str, builder: Callable[..., tuple[Node, ...]]) -> None:
    """Adds ``builder`` (keyword arguments -> node tuple) to :data:`MODELS`."""
    if name in MODELS:
        raise ValueError(f"model {name!r} is already registered")
    MODELS[name] = builder


def build(arch: str, *, seed: int = 0, **kwargs) -> Net:
    """A freshly initialised :class:`Net` of architecture ``arch``, in eval mode
    (BatchNorm uses running statistics; call ``.train()`` to train it)."""
    if arch not in MODELS:
        raise KeyError(
            f"unknown architecture {arch!r}; known: {', '.join(sorted(MODELS))}"
        )
    net = Net(MODELS[arch](**kwargs), rngs=nnx.Rngs(seed))
    net.eval()
    return net


__all__ = [
    "abstract_net",
    "assemble",
    "MODELS",
    "GraphBuilder",
    "Mask",
    "Net",
    "Node",
    "build",
    "channel_spaces",
    "Consumer",
    "consumers",
    "group_consumers",
    "insert_masks",
    "register_model",
]
