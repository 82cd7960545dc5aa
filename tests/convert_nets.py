"""Small real PyTorch networks for the converter tests, and output comparison.

Each builder returns a module in eval mode with random weights and (where it has
BatchNorm) random, non-trivial running statistics.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

TOL = 1e-5  # max abs difference, relative to the output's scale


def inputs(shape_hwc, n=6, seed=0):
    """Random NHWC inputs, and the same as NCHW (or flat) for the frameworks."""
    x = np.random.default_rng(seed).normal(size=(n, *shape_hwc)).astype(np.float32)
    fw = x.transpose(0, 3, 1, 2).copy() if len(shape_hwc) == 3 else x
    return x, fw


def rel_diff(ours, theirs) -> float:
    ours = np.asarray(ours, np.float64).reshape(len(theirs), -1)
    theirs = np.asarray(theirs, np.float64).reshape(len(theirs), -1)
    return float(np.abs(ours - theirs).max() / max(np.abs(theirs).max(), 1e-12))


def flax_out(pretrained, x):
    """The converted model's outputs (jitted: one compile beats many eager ops)."""
    return np.asarray(_apply(pretrained.model, jnp.asarray(x)))


@nnx.jit
def _apply(model, x):
    return model(x)


def torch_out(module, x_fw):
    import torch

    with torch.no_grad():
        return module.eval()(torch.from_numpy(x_fw)).numpy()


def randomize_bn(module, seed=1):
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            c = m.num_features
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
    return module.eval()


def torch_mlp(hidden=(300, 100), classes=10, bias=True):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, d = [nn.Flatten()], 784
    for h in hidden:
        layers += [nn.Linear(d, h, bias=bias), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, classes, bias=bias))
    return nn.Sequential(*layers).eval()


def torch_lenet5(classes=10):
    import torch
    from torch import nn
    from torch.nn import functional as F

    class LeNet5(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, classes)

        def forward(self, x):
            x = F.max_pool2d(F.relu(self.conv1(x)), 2)
            x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = x.view(x.size(0), -1)
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    torch.manual_seed(0)
    return LeNet5().eval()


VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)


def torch_vgg(width=0.125, classes=10, eps=1e-5, momentum=0.1):
    """VGG-11-BN as gapruning's zoo has it (no conv bias, GAP, one classifier)."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers, c = [], 1
    for v in VGG11:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            continue
        v = max(1, round(v * width))
        layers += [
            nn.Conv2d(c, v, 3, padding=1, bias=False),
            nn.BatchNorm2d(v, eps=eps, momentum=momentum),
            nn.ReLU(inplace=True),
        ]
        c = v

    class VGG(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(c, classes)

        def forward(self, x):
            return self.classifier(torch.flatten(self.pool(self.features(x)), 1))

    return randomize_bn(VGG())


def torch_resnet(blocks=1, widths=(4, 8, 16), projection=True, classes=10):
    """CIFAR-style ResNet, torchvision names (conv1/bn1/layerX.Y.convZ/bnZ/fc).

    ``projection``: downsampling blocks use a 1x1 conv + BN shortcut
    (``downsample.0/1``); otherwise option A (subsample, zero-pad channels).
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.pad = 0
            self.downsample = None
            if projection and (stride != 1 or cin != cout):
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )
            elif stride != 1 or cin != cout:
                self.pad = cout - cin

        def forward(self, x):
            h = F.relu(self.bn1(self.conv1(x)))
            h = self.bn2(self.conv2(h))
            if self.downsample is not None:
                short = self.downsample(x)
            elif self.pad:
                short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 0, self.pad))
            else:
                short = x
            return F.relu(h + short)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            c = widths[0]
            for i, w in enumerate(widths, 1):
                layer = []
                for b in range(blocks):
                    layer.append(Block(c, w, 2 if (i > 1 and b == 0) else 1))
                    c = w
                setattr(self, f"layer{i}", nn.Sequential(*layer))
            self.fc = nn.Linear(c, classes)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    torch.manual_seed(0)
    return randomize_bn(ResNet())


def torchvision():
    """torchvision (imported as ``benchmarks/common.py`` does on a CPU torch), or
    the test is skipped."""
    import pytest
    from conftest import load_benchmark

    try:
        return load_benchmark("common").import_torchvision()
    except ImportError:
        pytest.skip("torchvision is not installed")


def randomize_norms(module, seed=2):
    """Random LayerNorm affine parameters and ConvNeXt layer scales (fresh ones
    are ones/zeros and 1e-6: a wrong block would hide behind them)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "layer_scale" or (leaf == "weight" and p.dim() == 1):
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            elif leaf == "bias" and p.dim() == 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return randomize_bn(module)


def tiny_convnext(classes=5):
    """torchvision's ConvNeXt with two stages of one block (8 and 16 channels)."""
    torchvision()
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    settings = [CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)]
    return randomize_norms(ConvNeXt(settings, num_classes=classes))


def tiny_shufflenet(classes=5):
    """torchvision's ShuffleNetV2 with stages of 2, 1 and 1 blocks (the first
    block of a stage concatenates two branches, the others split the input)."""
    torchvision()
    from torchvision.models.shufflenetv2 import ShuffleNetV2

    return randomize_bn(ShuffleNetV2([2, 1, 1], [8, 16, 32, 64, 48], classes))


def tiny_vit(classes=5, heads=4, **kw):
    """torchvision's VisionTransformer on 32x32 inputs: 8x8 patches, two blocks
    of ``heads`` heads (16 channels), MLPs of 32 hidden units; random class
    token, position embedding, LayerNorms and head (fresh ones are zeros/ones)."""
    import torch

    torchvision()
    from torchvision.models import VisionTransformer

    size = dict(image_size=32, patch_size=8, num_layers=2, hidden_dim=16, mlp_dim=32)
    vit = VisionTransformer(**size, num_heads=heads, num_classes=classes, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (vit.class_token, vit.encoder.pos_embedding, vit.heads.head.weight):
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return randomize_norms(vit).eval()
