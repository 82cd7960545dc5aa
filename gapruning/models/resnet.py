"""CIFAR-style ResNets (He et al., 2016, section 4.2) with identity shortcuts.

Three stages of ``n`` basic blocks (conv3x3-BN-ReLU-conv3x3-BN, add, ReLU). Where a
stage halves the resolution and doubles the width, the shortcut subsamples and pads
the new channels with zeros ("option A"), so every shortcut is parameter-free and
the residual channels of a stage are one coupled group, named ``stage{k}``.
"""

from __future__ import annotations

from .graph import GraphBuilder, Node


def resnet(
    depth: int,
    num_classes: int = 10,
    input_shape=(28, 28, 1),
    widths: tuple[int, int, int] = (16, 32, 64),
) -> tuple[Node, ...]:
    """ResNet-``depth`` with ``depth = 6n + 2``."""
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    g = GraphBuilder(input_shape)
    x = g.conv(g.input, widths[0], 3, use_bias=False, name="stem_conv")
    x = g.relu(g.batchnorm(x, name="stem_bn"), name="stem_relu")
    for s, width in enumerate(widths, start=1):
        for b in range(n):
            p = f"s{s}b{b}_"
            stride = 2 if (s > 1 and b == 0) else 1
            h = g.conv(x, width, 3, strides=stride, use_bias=False, name=p + "conv1")
            h = g.relu(g.batchnorm(h, name=p + "bn1"), name=p + "relu1")
            h = g.conv(h, width, 3, use_bias=False, name=p + "conv2")
            h = g.batchnorm(h, name=p + "bn2")
            short = x
            if stride != 1 or g.shape(x)[-1] != width:
                short = g.channel_map(x, width, stride=stride, name=p + "shortcut")
            x = g.relu(
                g.add(h, short, group=f"stage{s}", name=p + "add"), name=p + "relu2"
            )
    x = g.global_avgpool(x, name="gap")
    return g.build(g.dense(x, num_classes, name="out"))


def resnet20(**kw) -> tuple[Node, ...]:
    """ResNet-20: 3 stages of 3 basic blocks, 16/32/64 channels."""
    return resnet(20, **kw)


def resnet32(**kw) -> tuple[Node, ...]:
    """ResNet-32: 3 stages of 5 basic blocks, 16/32/64 channels."""
    return resnet(32, **kw)


def resnet56(**kw) -> tuple[Node, ...]:
    """ResNet-56: 3 stages of 9 basic blocks, 16/32/64 channels."""
    return resnet(56, **kw)
