"""A MobileNetV2-style network (Sandler et al., 2018) for 28x28 inputs.

Inverted residual blocks: a 1x1 expansion (BN, ReLU6), a 3x3 depthwise
convolution (BN, ReLU6), a squeeze-excite gate (Hu et al., 2018) on the expanded
channels, and a linear 1x1 projection (BN); blocks with stride 1 and equal widths
add their input. The expanded channels of a block are one prunable group (its
depthwise convolution and gate follow them); the outputs of a stage's residual
blocks are one coupled group, named ``stage{k}``.
"""

from __future__ import annotations

from .graph import GraphBuilder, Node

# (expansion, output channels, blocks, stride of the first block) per stage
MOBILENET_CONFIG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 3, 2), (4, 64, 2, 1))


def _conv_bn(g: GraphBuilder, x: str, features: int, k: int, name: str, **kw) -> str:
    x = g.conv(x, features, k, use_bias=False, name=name + "conv", **kw)
    return g.batchnorm(x, name=name + "bn")


def _squeeze_excite(g: GraphBuilder, x: str, reduction: int, name: str) -> str:
    c = g.shape(x)[-1]
    s = g.global_avgpool(x, name=name + "se_pool")
    s = g.relu(g.dense(s, max(1, c // reduction), name=name + "se_fc1"))
    s = g.sigmoid(g.dense(s, c, name=name + "se_fc2"), name=name + "se_gate")
    return g.mul(x, s, name=name + "se_mul")


def _inverted_residual(g, x, expansion, features, stride, se_reduction, name):
    c = g.shape(x)[-1]
    h = x
    if expansion != 1:
        h = _conv_bn(g, h, c * expansion, 1, name + "expand_")
        h = g.activation(h, "relu6", name=name + "expand_relu")
    width = g.shape(h)[-1]
    h = _conv_bn(g, h, width, 3, name + "dw_", strides=stride, groups=width)
    h = g.activation(h, "relu6", name=name + "dw_relu")
    if se_reduction and expansion != 1:
        h = _squeeze_excite(g, h, se_reduction, name)
    h = _conv_bn(g, h, features, 1, name + "project_")
    return h, stride == 1 and c == features


def mobilenet(
    num_classes: int = 10,
    input_shape=(28, 28, 1),
    stem: int = 16,
    stem_stride: int = 2,
    head: int = 256,
    se_reduction: int = 4,
    config=MOBILENET_CONFIG,
) -> tuple[Node, ...]:
    """Stem conv3x3 of stride ``stem_stride`` (28x28 inputs become 14x14 maps),
    the inverted residual stages of ``config``, a 1x1 head conv, global average
    pool, classifier. ``se_reduction=0`` leaves out the gates."""
    g = GraphBuilder(input_shape)
    x = _conv_bn(g, g.input, stem, 3, "stem_", strides=stem_stride)
    x = g.activation(x, "relu6", name="stem_relu")
    for s, (expansion, features, blocks, stride) in enumerate(config, start=1):
        for b in range(blocks):
            p = f"s{s}b{b}_"
            h, residual = _inverted_residual(
                g, x, expansion, features, stride if b == 0 else 1, se_reduction, p
            )
            x = g.add(x, h, group=f"stage{s}", name=p + "add") if residual else h
    x = g.activation(_conv_bn(g, x, head, 1, "head_"), "relu6", name="head_relu")
    x = g.global_avgpool(x, name="gap")
    return g.build(g.dense(x, num_classes, name="out"))
