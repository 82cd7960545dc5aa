"""Export to ONNX (checked with onnxruntime) and PyTorch, and ONNX round trips."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
from convert_nets import TOL, flax_out, inputs, rel_diff, torch_out  # noqa: E402

from gapruning.convert import (  # noqa: E402
    ConversionError,
    from_onnx,
    from_torch,
    to_onnx,
    to_torch_module,
    to_torch_state_dict,
)
from gapruning.convert.common import build_pretrained  # noqa: E402
from gapruning.models import MODELS, Net  # noqa: E402

ZOO = {
    "lenet300": ({}, (28, 28, 1)),
    "lenet5": ({}, (28, 28, 1)),
    "vgg11": ({"width": 0.125}, (28, 28, 1)),
    "resnet20": ({"input_shape": (14, 14, 1)}, (14, 14, 1)),
}


def random_zoo(arch, seed=0, **kw):
    """A zoo model with random weights and BatchNorm statistics (numpy-initialised:
    no per-shape compilation of JAX random initialisers)."""
    nodes = MODELS[arch](**kw)
    rng = np.random.default_rng(seed)
    shapes = nnx.to_pure_dict(
        nnx.state(nnx.eval_shape(lambda: Net(nodes, rngs=nnx.Rngs(0))))
    )
    params = {}
    for name, variables in shapes["layers"].items():
        params[name] = {}
        for var, spec in variables.items():
            shape = tuple(spec.shape)
            if var == "kernel":
                value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
            elif var in ("scale", "var"):
                value = rng.uniform(0.5, 1.5, shape)
            else:
                value = rng.normal(0, 0.3, shape)
            params[name][var] = value.astype(np.float32)
    return build_pretrained(nodes, params, {"name": arch, "arch": arch}, source=arch)


def ort_run(path, x_fw):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x_fw})[0]


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_onnx_export_and_round_trip(tmp_path, arch):
    kw, shape = ZOO[arch]
    net = random_zoo(arch, **kw)
    x, x_fw = inputs(shape)
    ours = flax_out(net, x)
    path = to_onnx(net, tmp_path / f"{arch}.onnx")
    assert rel_diff(ort_run(path, x_fw), ours) < TOL
    back = from_onnx(path)
    assert rel_diff(flax_out(back, x), ours) < TOL
    sizes = sorted(m[...].shape[0] for m in net.model.masks.values())
    assert sorted(m[...].shape[0] for m in back.model.masks.values()) == sizes
    assert sum(n.op == "channel_map" for n in back.model.nodes) == sum(
        n.op == "channel_map" for n in net.model.nodes
    )


@pytest.mark.parametrize("arch", sorted(ZOO))
def test_torch_state_dict(arch):
    kw, shape = ZOO[arch]
    net = random_zoo(arch, **kw)
    x, x_fw = inputs(shape)
    ours = flax_out(net, x)
    sd = to_torch_state_dict(net)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    module = to_torch_module(net)
    assert set(module.state_dict()) == set(sd)
    assert rel_diff(torch_out(module, x_fw), ours) < TOL
    if arch != "resnet20":  # its stride-2 "SAME" padding is not PyTorch's symmetric
        back = from_torch(sd, arch=arch, **kw)
        assert rel_diff(flax_out(back, x), ours) < TOL


def test_lenet5_state_dict_layout():
    sd = to_torch_state_dict(random_zoo("lenet5"))
    assert tuple(sd["conv1.weight"].shape) == (6, 1, 5, 5)  # OIHW
    assert tuple(sd["fc1.weight"].shape) == (120, 400)  # (out, in), C,H,W rows
    assert tuple(sd["out.bias"].shape) == (10,)


def masked(net, zero):
    for group, idx in zero.items():
        m = np.ones(net.model.masks[group][...].shape, np.float32)
        m[list(idx)] = 0.0
        net.model.masks[group][...] = jnp.asarray(m)
    return net


def test_masks_exported_as_mul_and_folded(tmp_path):
    net = masked(
        random_zoo("lenet5"), {"conv1": [0, 3], "conv2": [1, 2, 5], "fc1": [7]}
    )
    x, x_fw = inputs((28, 28, 1))
    ours = flax_out(net, x)
    assert rel_diff(ours, flax_out(random_zoo("lenet5"), x)) > 1e-3  # masks matter
    path = to_onnx(net, tmp_path / "masked.onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("Mul") == 3
    assert rel_diff(ort_run(path, x_fw), ours) < TOL
    assert rel_diff(flax_out(from_onnx(path), x), ours) < TOL
    # the state dict folds the masks into the weights that read them
    back = from_torch(to_torch_state_dict(net), arch="lenet5")
    assert rel_diff(flax_out(back, x), ours) < TOL
    assert rel_diff(torch_out(to_torch_module(net), x_fw), ours) < TOL


def test_export_errors_write_nothing(tmp_path):
    net = random_zoo("resnet20", input_shape=(14, 14, 1))
    masked(net, {"stage1": [0]})
    with pytest.raises(ConversionError, match="stage1.*compact"):
        to_torch_state_dict(net)
    net = random_zoo("lenet300")
    net.model.masks["fc1"].set_value(jnp.ones((4, 300)))
    with pytest.raises(ConversionError, match="population"):
        to_onnx(net, tmp_path / "pop.onnx")
    assert list(tmp_path.iterdir()) == []
