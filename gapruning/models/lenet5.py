"""LeNet-5 (LeCun et al., 1998) in its common modern form (ReLU, max pooling)."""

from __future__ import annotations

from .graph import GraphBuilder, Node


def lenet5(num_classes: int = 10, input_shape=(28, 28, 1)) -> tuple[Node, ...]:
    """conv(6, 5x5, same)-pool-conv(16, 5x5, valid)-pool-fc120-fc84-fc(classes)."""
    g = GraphBuilder(input_shape)
    x = g.relu(g.conv(g.input, 6, 5, padding="SAME", name="conv1"), name="relu1")
    x = g.maxpool(x, 2, name="pool1")
    x = g.relu(g.conv(x, 16, 5, padding="VALID", name="conv2"), name="relu2")
    x = g.flatten(g.maxpool(x, 2, name="pool2"), name="flatten")
    x = g.relu(g.dense(x, 120, name="fc1"), name="relu3")
    x = g.relu(g.dense(x, 84, name="fc2"), name="relu4")
    return g.build(g.dense(x, num_classes, name="out"))
