"""VGG-11 with BatchNorm (Simonyan & Zisserman, 2015) for 28x28 or 32x32 inputs."""

from __future__ import annotations

from .graph import GraphBuilder, Node

VGG11_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)


def vgg11(
    num_classes: int = 10, input_shape=(28, 28, 1), width: float = 1.0, hidden: int = 0
) -> tuple[Node, ...]:
    """Conv3x3-BN-ReLU stacks with max pooling, global average pool, classifier.

    Args:
        width: multiplier on every conv width (0.25 gives 16-32-64-...-128).
        hidden: width of an extra Dense-ReLU layer before the classifier (0: none).
    """
    g = GraphBuilder(input_shape)
    x, i = g.input, 0
    for item in VGG11_CONFIG:
        if item == "M":
            x = g.maxpool(x, 2, name=f"pool{i}")
            continue
        i += 1
        x = g.conv(x, max(1, round(item * width)), 3, use_bias=False, name=f"conv{i}")
        x = g.relu(g.batchnorm(x, name=f"bn{i}"), name=f"relu{i}")
    x = g.global_avgpool(x, name="gap")
    if hidden:
        x = g.relu(g.dense(x, hidden, name="fc1"), name="relu_fc1")
    return g.build(g.dense(x, num_classes, name="out"))
