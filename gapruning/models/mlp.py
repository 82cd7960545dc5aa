"""Multi-layer perceptrons: LeNet-300-100 and the MLP of the Paoding paper."""

from __future__ import annotations

from .graph import GraphBuilder, Node


def mlp(
    hidden: tuple[int, ...],
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (28, 28, 1),
) -> tuple[Node, ...]:
    """Flatten, then ``Dense -> ReLU`` per hidden width, then a Dense classifier."""
    g = GraphBuilder(input_shape)
    x = g.flatten(g.input, name="flatten")
    for i, width in enumerate(hidden, start=1):
        x = g.relu(g.dense(x, width, name=f"fc{i}"), name=f"relu{i}")
    return g.build(g.dense(x, num_classes, name="out"))


def lenet300(num_classes: int = 10, input_shape=(28, 28, 1)) -> tuple[Node, ...]:
    """LeNet-300-100 (LeCun et al., 1998): 784-300-100-10, ReLU."""
    return mlp((300, 100), num_classes, input_shape)


def paoding_mlp(num_classes: int = 10, input_shape=(28, 28, 1)) -> tuple[Node, ...]:
    """784-128-128-64-10 ReLU MLP used in the Paoding paper (Meng et al., 2022)."""
    return mlp((128, 128, 64), num_classes, input_shape)
