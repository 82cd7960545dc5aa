"""Tiny networks for the probe and fitness tests (fast to compile on CPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import gapruning as gp
from gapruning.models import GraphBuilder, Net, abstract_net, assemble
from gapruning.probes import batchnorm_nodes, bn_batch_stats

CARD = {"name": "tiny", "input": {"mean": 0.3, "std": 0.35}}


def smooth_pixels(num: int, shape=(12, 12, 1), seed: int = 0) -> np.ndarray:
    """Blurred uniform noise in [0, 1]: stands in for 'training data'."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (num, *shape))
    x = (x + np.roll(x, 1, 1) + np.roll(x, 1, 2) + np.roll(x, (1, 1), (1, 2))) / 4
    return np.clip(1.2 * x - 0.1, 0, 1).astype(np.float32)


def calibrate(pretrained: gp.Pretrained, seed: int = 0) -> gp.Pretrained:
    """Sets every BatchNorm's running statistics to those of smooth 'data', layer
    by layer, like a trained network (random statistics can be unreachable)."""
    data = pretrained.normalize(jnp.asarray(smooth_pixels(256, seed=seed)))
    net = pretrained.model
    graphdef, state = nnx.split(net)
    stats = jax.jit(lambda state, x: bn_batch_stats(nnx.merge(graphdef, state), x))
    for n in batchnorm_nodes(net):
        mean, var = stats(nnx.state(net), data)[n.name]
        net.layers[n.name].mean[...] = mean
        net.layers[n.name].var[...] = var
    return pretrained


def tiny_bn(seed: int = 0) -> gp.Pretrained:
    """conv4-BN-ReLU-maxpool-conv6-BN-ReLU-GAP-dense10 on 12x12x1."""
    g = GraphBuilder((12, 12, 1))
    x = g.conv(g.input, 4, 3, use_bias=False, name="c1")
    x = g.relu(g.batchnorm(x, name="b1"), name="r1")
    x = g.maxpool(x, 2, name="p1")
    x = g.conv(x, 6, 3, use_bias=False, name="c2")
    x = g.relu(g.batchnorm(x, name="b2"), name="r2")
    x = g.global_avgpool(x, name="gap")
    net = random_net(g.build(g.dense(x, 10, name="out")), seed)
    return calibrate(gp.Pretrained(net, dict(CARD)), seed)


def tiny_affine_bn(seed: int = 0) -> gp.Pretrained:
    """:func:`tiny_bn` with a fixed per-channel affine map after ``c1``: a
    BatchNorm node with epsilon 0, mean 0, variance 1, as the importers write a
    layer scale; ``c1``'s first channel is constant, so the map's input has zero
    variance there."""
    g = GraphBuilder((12, 12, 1))
    x = g.conv(g.input, 4, 3, name="c1")
    x = g.relu(g.batchnorm(x, epsilon=0.0, name="scale"), name="r1")
    x = g.conv(x, 6, 3, use_bias=False, name="c2")
    x = g.relu(g.batchnorm(x, name="b2"), name="r2")
    x = g.global_avgpool(x, name="gap")
    net = random_net(g.build(g.dense(x, 10, name="out")), seed)
    net.layers["c1"].kernel[..., 0] = 0.0
    net.layers["c1"].bias[0] = 0.5
    net.layers["scale"].mean[...] = jnp.zeros(4)
    net.layers["scale"].var[...] = jnp.ones(4)
    return calibrate(gp.Pretrained(net, dict(CARD)), seed)


def tiny_all_ops(seed: int = 0) -> gp.Pretrained:
    """Every op interval propagation supports: conv (SAME/VALID/padded, strided),
    BN, ReLU, sigmoid, max/avg pooling, residual add with a channel_map shortcut,
    global average pooling, flatten, dense, final softmax."""
    g = GraphBuilder((10, 10, 1))
    x = g.conv(g.input, 4, 3, name="c1")
    x = g.relu(g.batchnorm(x, name="b1"), name="r1")
    h = g.conv(x, 4, 3, padding=((1, 1), (1, 1)), name="c2")
    h = g.sigmoid(g.batchnorm(h, name="b2"), name="s2")
    x = g.add(h, x, group="res", name="add")
    x = g.maxpool(x, 2, name="p1")  # 5x5
    s = g.channel_map(x, 6, stride=2, name="short")  # 3x3x6
    h = g.relu(g.conv(x, 6, 3, strides=2, padding="SAME", name="c3"), name="r3")
    x = g.add(h, s, group="res2", name="add2")
    a = g.avgpool(x, 2, strides=1, padding="VALID", name="ap")  # 2x2
    y = g.relu(g.dense(g.flatten(a, name="fl"), 8, name="fc"), name="rf")
    z = g.global_avgpool(x, name="gap")
    y = g.dense(y, 5, name="o1")
    zz = g.dense(z, 5, name="o2")
    out = g.softmax(g.add(y, zz, name="sum"), name="prob")
    net = random_net(g.build(out), seed)
    return gp.Pretrained(net, {"name": "all-ops", "input": {"box": [-1.0, 1.0]}})


def random_net(nodes, seed: int) -> Net:
    """A Net of ``nodes`` with random NumPy weights (He-scaled kernels, random
    BatchNorm statistics and affine parameters), assembled without per-layer
    initialisation compiles."""
    rng = np.random.default_rng(seed)
    abstract = nnx.to_pure_dict(nnx.state(abstract_net(tuple(nodes))))
    layers = {}
    for name, params in abstract["layers"].items():
        out = {}
        for key, v in params.items():
            shape = v.shape
            if key == "kernel":
                fan_in = int(np.prod(shape[:-1]))
                out[key] = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
            elif key == "bias":
                out[key] = rng.normal(0, 0.1, shape)
            elif key == "mean":
                out[key] = rng.normal(0, 0.5, shape)
            elif key == "var":
                out[key] = rng.uniform(0.5, 2.0, shape)
            elif key == "scale":
                out[key] = rng.uniform(0.5, 1.5, shape)
            else:
                raise AssertionError(key)
        layers[name] = {k: v.astype(np.float32) for k, v in out.items()}
    return assemble(abstract_net(tuple(nodes)).nodes, layers)


def random_unit_masks(space, num: int, keep: float, seed: int) -> dict:
    """``num`` random masks keeping ``keep`` of each group (at least one unit)."""
    rng = np.random.default_rng(seed)
    out = {}
    for g in space.groups:
        k = max(1, round(keep * g.size))
        rows = np.zeros((num, g.size), np.float32)
        for i in range(num):
            rows[i, rng.choice(g.size, k, replace=False)] = 1.0
        out[g.name] = jnp.asarray(rows)
    return out


def full_masks(space, num: int = 1) -> dict:
    return {g.name: jnp.ones((num, g.size), jnp.float32) for g in space.groups}


def stack(*mask_dicts) -> dict:
    return {k: jnp.concatenate([m[k] for m in mask_dicts]) for k in mask_dicts[0]}


def row(masks: dict, i: int) -> dict:
    return jax.tree.map(lambda m: m[i], masks)
