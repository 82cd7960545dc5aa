"""PyTorch modules using the op table's newer ops convert exactly, and prune and
compact exactly: a MobileNetV2-style inverted residual, a squeeze-excite block
(MobileNetV3-style: hardswish, hardsigmoid gate, conv 1x1 on the pooled map),
activations, adaptive pooling and max pooling with ceil_mode; tiny torchvision
ConvNeXt, ShuffleNetV2 (permutes to channels-last, LayerNorm, layer scale,
channel split and shuffle) and ViT (tokens, class token, position embedding,
multi-head attention) convert, prune, compact and export."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from convert_nets import (  # noqa: E402
    flax_out,
    inputs,
    rel_diff,
    tiny_convnext,
    tiny_shufflenet,
    tiny_vit,
    torch_out,
)
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning.convert import UnsupportedLayerError, from_torch  # noqa: E402

TOL = 1e-4  # relative logit error


class InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1, depthwise 3x3, project 1x1, residual add."""

    def __init__(self, c=6, expand=3):
        super().__init__()
        h = c * expand
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c))
        self.expand = nn.Sequential(
            nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6()
        )
        self.dw = nn.Sequential(
            nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False),
            nn.BatchNorm2d(h),
            nn.ReLU6(inplace=True),
        )
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.project(self.dw(self.expand(x)))
        x = F.adaptive_avg_pool2d(x, (1, 1))
        return self.head(torch.flatten(x, 1))


class SqueezeExcite(nn.Module):
    """MobileNetV3: hardswish conv, depthwise conv, SE gate (conv 1x1 on the
    pooled map, hardsigmoid), grouped conv, adaptive pooling to 2x2, GELU/SiLU,
    LayerNorm of the features."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.act = nn.Hardswish()
        self.dw = nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.gate = nn.Hardsigmoid()
        self.grouped = nn.Conv2d(c, c, 3, padding=1, groups=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(4 * c, 6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        x = self.act(self.conv(x))
        x = F.silu(self.dw(x))
        s = F.adaptive_avg_pool2d(x, 1)
        s = self.gate(self.fc2(F.relu(self.fc1(s))))
        x = nn.functional.gelu(self.grouped(x * s))
        return self.out(self.ln(self.fc(torch.flatten(self.pool(x), 1))))


class Inception(nn.Module):
    """GoogLeNet-style: branches concatenated, then BatchNorm and a convolution."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.b1 = nn.Conv2d(6, 4, 1)
        self.b2 = nn.Sequential(
            nn.Conv2d(6, 3, 1), nn.ReLU(), nn.Conv2d(3, 5, 3, padding=1)
        )
        self.pool = nn.MaxPool2d(3, 1, padding=1)
        self.bn = nn.BatchNorm2d(15)
        self.conv = nn.Conv2d(15, 7, 3)
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([self.b1(x), self.b2(x), self.pool(x)], 1)
        x = self.conv(F.relu(self.bn(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def stochastic_depth(input, p, mode, training=True):
    """Named like torchvision.ops.stochastic_depth (identity in eval mode)."""
    return input if not training else input * (torch.rand(()) > p)


torch.fx.wrap("stochastic_depth")


class MeanHead(nn.Module):
    """EfficientNet/MNASNet idioms: stochastic depth on a residual branch,
    ``x.mean([2, 3])`` as the global pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.branch = nn.Conv2d(6, 6, 3, padding=1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.silu(self.conv(x))
        x = x + stochastic_depth(self.branch(x), 0.2, "row", self.training)
        return self.fc(x.mean([2, 3]))


class CeilPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 5, 3)
        self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.fc = nn.Linear(5 * 3 * 3, 4)

    def forward(self, x):
        x = F.relu6(self.conv(x))
        x = F.max_pool2d(self.pool(x), 2, 1, ceil_mode=True)
        return self.fc(torch.flatten(x, 1))


class ChannelsLast(nn.Module):
    """timm's ConvNeXt idioms: LayerNorm, Linear layers and a per-channel scale of
    shape ``(C,)`` on a channels-last map, added back to the NCHW map."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.norm = nn.LayerNorm(6)
        self.fc1 = nn.Linear(6, 12)
        self.fc2 = nn.Linear(12, 6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.conv(x)
        y = self.fc2(F.gelu(self.fc1(self.norm(x.permute(0, 2, 3, 1)))))
        x = x + (self.gamma * y).permute(0, 3, 1, 2)
        return self.head(x.mean([2, 3]))


def _randomize(module, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.3, generator=gen)
    return module.eval()


CASES = {
    "inverted_residual": (InvertedResidual, (8, 8, 3)),
    "squeeze_excite": (SqueezeExcite, (8, 8, 3)),
    "ceil_pool": (CeilPool, (10, 10, 2)),
    "inception": (Inception, (8, 8, 3)),
    "mean_head": (MeanHead, (6, 6, 3)),
    "channels_last": (ChannelsLast, (6, 6, 3)),
}


def _converted(case):
    cls, shape = CASES[case]
    torch.manual_seed(0)
    module = _randomize(cls())
    return module, from_torch(module, input_shape=shape), shape


@pytest.mark.parametrize("case", sorted(CASES))
def test_converts_within_tolerance(case):
    module, net, shape = _converted(case)
    x, x_fw = inputs(shape)
    assert rel_diff(flax_out(net, x), torch_out(module, x_fw)) <= TOL


@pytest.mark.parametrize("case", sorted(CASES))
def test_prunes_and_compacts_exactly(case):
    _, net, shape = _converted(case)
    space = net.space
    rng = np.random.default_rng(0)
    masks = {}
    for g in space.groups:
        m = rng.random(g.size) < 0.5
        m[0] = True
        masks[g.name] = m
    small = gp.compact(net, masks)
    x = inputs(shape)[0]
    np.testing.assert_allclose(
        np.asarray(small.model(x)),
        np.asarray(gp.masked_apply(net, masks, x)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert gp.param_count(small) == space.params(masks)


def test_groups_follow_the_couplings():
    """Inverted residual: the depthwise conv is in the expansion's group, the
    residual joins the stem and the projection. SE: the gate's second conv is in
    the gated map's group, and so is the grouped conv (as many channels out as in),
    whose prunable unit is one of its 2 groups; the features a LayerNorm reads are
    a group. Channels-last: the residual stream through the LayerNorm is one group
    of the conv and the second Linear."""
    _, net, _ = _converted("inverted_residual")
    names = {n.op: n.name for n in net.model.nodes}
    space = net.space
    assert space.group_of(names["dwconv"]) == space.group_of("expand_0")
    assert len(space.groups) == 2
    _, net, _ = _converted("squeeze_excite")
    space = net.space
    assert space.group_of("fc2") == space.group_of("grouped") == "conv"
    assert [(g.name, g.size) for g in space.groups] == [
        ("conv", 2),
        ("fc1", 4),
        ("fc", 6),
    ]
    _, net, _ = _converted("inception")
    assert {g.name for g in net.space.groups} == {"stem", "b1", "b2_0", "b2_2", "conv"}
    _, net, _ = _converted("channels_last")
    assert [(g.name, g.size) for g in net.space.groups] == [("conv", 6), ("fc1", 12)]
    assert net.space.groups[0].members == ("conv", "fc2")


def test_unsupported_layers_fail_naming_them():
    class Dilated(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(2, 4, 3, dilation=2), nn.ReLU())
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.adaptive_avg_pool2d(self.body(x), 1).flatten(1))

    with pytest.raises(UnsupportedLayerError, match=r"'body\.0'.*dilation"):
        from_torch(Dilated(), input_shape=(8, 8, 2))

    class CeilAvg(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(9, 2)

        def forward(self, x):
            return self.fc(F.avg_pool2d(x, 3, 2, ceil_mode=True).flatten(1))

    with pytest.raises(UnsupportedLayerError, match="avg_pool2d with ceil_mode"):
        from_torch(CeilAvg(), input_shape=(7, 7, 1))


# ------------------------------------------------------------ torchvision families

FAMILIES = {
    "convnext": tiny_convnext,
    "shufflenet_v2": tiny_shufflenet,
    "vit": tiny_vit,
}
SIZE = (32, 32, 3)
# the prunable groups: ConvNeXt's residual stream of each stage (named after the
# stem or downsampling conv) and MLP hidden units (Linear(C, 4C) of each block);
# ShuffleNetV2's stem, head conv and the 1x1 conv opening each block's branch
# (with the depthwise conv after it): the concatenated, shuffled channels are not;
# ViT's residual stream (normalized by LayerNorms over the kept channels), and the
# attention heads and MLP hidden units of each block
FAMILY_GROUPS = {
    "convnext": {
        "features_0_0": 8,
        "features_1_0_block_3": 32,
        "features_2_1": 16,
        "features_3_0_block_3": 64,
    },
    "shufflenet_v2": {"conv1_0": 8, "conv5_0": 48}
    | {f"stage{s}_{b}_branch2_0": c for s, b, c in [(2, 0, 8), (2, 1, 8), (3, 0, 16)]}
    | {"stage4_0_branch2_0": 32},
    "vit": {"stream": 16}
    | {
        f"encoder_layers_encoder_layer_{i}_{part}": size
        for i in range(2)
        for part, size in (("self_attention", 4), ("mlp_0", 32))
    },
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    torch.manual_seed(0)
    module = FAMILIES[request.param]()
    return request.param, module, from_torch(module, input_shape=SIZE)


def test_torchvision_family_converts(family):
    _, module, net = family
    x, x_fw = inputs(SIZE, n=4)
    assert rel_diff(flax_out(net, x), torch_out(module, x_fw)) <= TOL


def test_torchvision_family_groups(family):
    name, _, net = family
    space = net.space
    assert {g.name: g.size for g in space.groups} == FAMILY_GROUPS[name]
    ops = {n.op for n in net.model.nodes}
    if name == "convnext":
        assert {"layernorm", "gelu", "dwconv"} <= ops
        # the depthwise conv and the layer scale are in the stage's stream
        assert space.group_of("features_1_0_block_0") == "features_0_0"
        assert space.group_of("mul") == space.group_of("add") == "features_0_0"
    elif name == "vit":
        assert {"tokens", "class_token", "pos_embedding", "attention"} <= ops
        assert "select_token" in ops and space.group_of("conv_proj") == "stream"
        stream = ("cat", "encoder_ln", "encoder_layers_encoder_layer_1_mlp_3")
        assert {space.group_of(t) for t in stream} == {"stream"}
        attn = "encoder_layers_encoder_layer_0_self_attention"
        assert space.group_of(f"{attn}_v") == attn and space.unit_width(attn) == 4
    else:
        assert {"channel_shuffle", "channel_map", "concat"} <= ops
        assert space.group_of("stage2_1_branch2_3") == "stage2_1_branch2_0"
        assert space.group_of("stage2_1_branch2_5") is None


def test_torchvision_family_prunes_compacts_and_exports(family, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    _, _, net = family
    result = gp.prune(
        net,
        strategy="ga",
        target=0.3,
        budget="flops",
        generations=2,
        population=4,
        num_probes=8,
        seed=0,
        progress=False,
        recover=(),
    )
    masks = result.masks
    assert sum(m.sum() for m in masks.values()) < net.space.num_units
    small = gp.compact(net, masks)
    x, x_fw = inputs(SIZE, n=4)
    want = np.asarray(gp.masked_apply(net, masks, x))
    got = flax_out(small, x)
    assert rel_diff(got, want) <= 1e-5
    assert gp.param_count(small) == net.space.params(masks) < net.space.dense_params
    exported = gp.convert.to_torch_module(small)
    assert rel_diff(torch_out(exported, x_fw), got) <= TOL
    path = gp.convert.to_onnx(small, tmp_path / "small.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert rel_diff(sess.run(None, {"input": x_fw})[0], got) <= TOL


class Swap(nn.Module):
    """``x.permute(0, 3, 2, 1)``: not a change between NCHW and NHWC."""

    def forward(self, x):
        return x.permute(0, 3, 2, 1)


class Split(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, x):
        return torch.cat(x.chunk(2, dim=self.dim), 1)


def _head(*body):
    pool = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    return nn.Sequential(nn.Conv2d(3, 4, 3), *body, *pool)


@pytest.mark.parametrize(
    "body, match",
    [
        ((Swap(),), r"permute 'permute' .* to axes \(0, 3, 2, 1\) .*module '1'"),
        ((nn.LayerNorm(6),), r"layer norm '1' over the last axis.*\(4, 6, 6\)"),
        ((Split(2),), r"split 'chunk' .* along axis 2 .*module '1'"),
    ],
)
def test_unsupported_layouts_fail_naming_op_module_and_limit(body, match):
    with pytest.raises(UnsupportedLayerError, match=match) as err:
        from_torch(_head(*body), input_shape=(8, 8, 3))
    assert "\n" not in str(err.value)
