"""PyTorch -> Flax: parity on real torch models, file formats, layouts, errors."""

import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from convert_nets import (  # noqa: E402
    TOL,
    flax_out,
    inputs,
    rel_diff,
    torch_lenet5,
    torch_mlp,
    torch_out,
    torch_resnet,
    torch_vgg,
)
from torch import nn  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning.convert import (  # noqa: E402
    ConversionError,
    ModelFormatError,
    ShapeMismatchError,
    UnsupportedLayerError,
    from_torch,
)
from gapruning.models import channel_spaces  # noqa: E402

CASES = {
    "mlp-lenet300": (torch_mlp, {"arch": "lenet300"}, (28, 28, 1)),
    "mlp-traced": (torch_mlp, {"input_shape": (28, 28, 1)}, (28, 28, 1)),
    "lenet5-arch": (torch_lenet5, {"arch": "lenet5"}, (28, 28, 1)),
    "lenet5-traced": (torch_lenet5, {"input_shape": (28, 28, 1)}, (28, 28, 1)),
    "vgg-bn-arch": (torch_vgg, {"arch": "vgg11", "width": 0.125}, (28, 28, 1)),
    "vgg-bn-traced": (torch_vgg, {"input_shape": (28, 28, 1)}, (28, 28, 1)),
    "resnet-projection-traced": (
        torch_resnet,
        {"input_shape": (16, 16, 1)},
        (16, 16, 1),
    ),
    "resnet-optionA-traced": (
        lambda: torch_resnet(projection=False),
        {"input_shape": (16, 16, 1)},
        (16, 16, 1),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_module_parity(case):
    build, kwargs, shape = CASES[case]
    module = build()
    net = from_torch(module, **kwargs)
    x, x_fw = inputs(shape)
    assert rel_diff(flax_out(net, x), torch_out(module, x_fw)) < TOL
    assert net.card["origin"]["framework"] == "torch"
    assert net.card["input"]["shape"] == list(shape)


@pytest.mark.parametrize(
    "build,arch,kw,shape",
    [
        (torch_mlp, "lenet300", {}, (28, 28, 1)),
        (torch_lenet5, "lenet5", {}, (28, 28, 1)),
        (torch_vgg, "vgg11", {"width": 0.125}, (28, 28, 1)),
        (
            lambda: torch_resnet(blocks=3, widths=(16, 32, 64), projection=False),
            "resnet20",
            {"input_shape": (16, 16, 1)},
            (16, 16, 1),
        ),
    ],
)
def test_state_dict_onto_arch(build, arch, kw, shape):
    module = build()
    net = from_torch(module.state_dict(), arch=arch, **kw)
    x, x_fw = inputs(shape)
    assert rel_diff(flax_out(net, x), torch_out(module, x_fw)) < TOL
    assert net.card["arch"] == arch


def test_resnet_residual_channels_share_one_mask_group():
    net = from_torch(torch_resnet(blocks=2), input_shape=(16, 16, 1))
    nodes = net.model.nodes
    spaces = channel_spaces(nodes)
    adds = [n for n in nodes if n.op == "add"]
    assert len(adds) == 6
    per_stage = [
        {spaces.space_of[n] for a in adds[i : i + 2] for n in (*a.inputs, a.name)}
        for i in (0, 2, 4)
    ]
    # one coupled space per stage, holding both branches of both blocks
    assert all(len(ids) == 1 for ids in per_stage)
    assert len(set.union(*per_stage)) == 3
    sid = spaces.space_of["layer2_0_conv2"]
    assert spaces.space_of["layer2_0_downsample_0"] == sid
    assert spaces.space_of["layer2_1_conv2"] == sid
    group = spaces.prunable[sid]
    assert group in net.model.masks and net.model.masks[group][...].shape == (8,)
    # every mask on a residual-stream tensor uses the same group
    for n in nodes:
        if n.op == "mask" and spaces.space_of[n.inputs[0]] == sid:
            assert n.attr("group") == group
    # the convs inside blocks are separate, prunable groups
    assert spaces.space_of["layer2_0_conv1"] != sid
    assert "layer2_0_conv1" in net.model.masks


def test_files_pt_checkpoint_dict_and_safetensors(tmp_path, monkeypatch):
    from safetensors.numpy import save_file

    module = torch_lenet5()
    sd = module.state_dict()
    torch.save(sd, tmp_path / "plain.pt")
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    save_file({k: v.numpy() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    x, x_fw = inputs((28, 28, 1))
    ref = torch_out(module, x_fw)
    for f in ("plain.pt", "ckpt.pth"):
        net = from_torch(tmp_path / f, arch="lenet5")
        assert rel_diff(flax_out(net, x), ref) < TOL
        assert net.card["origin"]["file"].endswith(f)
        assert net.card["name"] == f.split(".")[0]
    # safetensors needs no torch at all
    monkeypatch.setitem(sys.modules, "torch", None)
    net = from_torch(tmp_path / "w.safetensors", arch="lenet5")
    assert rel_diff(flax_out(net, x), ref) < TOL


def test_bias_absent_and_batchnorm_eps_momentum():
    module = torch_mlp(bias=False)
    net = from_torch(module, arch="lenet300")
    assert all(not n.attr("use_bias") for n in net.model.nodes if n.op == "dense")
    assert all(net.model.layers[k].bias is None for k in ("fc1", "fc2", "out"))
    x, x_fw = inputs((28, 28, 1))
    assert rel_diff(flax_out(net, x), torch_out(module, x_fw)) < TOL

    vgg = torch_vgg(eps=1e-3, momentum=0.3)
    for kw in ({"arch": "vgg11", "width": 0.125}, {"input_shape": (28, 28, 1)}):
        net = from_torch(vgg, **kw)
        bns = [n for n in net.model.nodes if n.op == "batchnorm"]
        assert len(bns) == 8
        assert all(n.attr("epsilon") == pytest.approx(1e-3) for n in bns)
        assert all(n.attr("momentum") == pytest.approx(0.7) for n in bns)
        assert rel_diff(flax_out(net, x), torch_out(vgg, x_fw)) < TOL


def test_nchw_flatten_rows_are_permuted():
    # A conv followed directly by a Dense: wrong row order would change outputs.
    module = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 4, 4)
    ).eval()
    net = from_torch(module, input_shape=(5, 4, 2))
    x, x_fw = inputs((5, 4, 2))
    assert rel_diff(flax_out(net, x), torch_out(module, x_fw)) < TOL


def test_card_input_box():
    net = from_torch(torch_mlp(), arch="lenet300")
    assert net.card["input"]["box"] == list(gp.convert.DEFAULT_INPUT_BOX)
    assert net.card["input"]["box_source"] == "default"
    assert net.input_box == gp.convert.DEFAULT_INPUT_BOX
    net = from_torch(torch_mlp(), arch="lenet300", input_box=(-0.5, 2.0), name="m")
    assert net.card["input"] | {} == net.card["input"]
    assert net.card["input"]["box"] == [-0.5, 2.0]
    assert net.card["input"]["box_source"] == "user"
    assert (net.card["input"]["mean"], net.card["input"]["std"]) == (0.0, 1.0)
    assert net.input_box == (-0.5, 2.0) and net.name == "m"
    assert net.card["origin"]["arch"] == "lenet300"
    with pytest.raises(ConversionError, match="input_box"):
        from_torch(torch_mlp(), arch="lenet300", input_box=(1.0, 0.0))


# ------------------------------------------------------------------ bad input


def test_unsupported_layer_is_named_with_position():
    module = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    with pytest.raises(
        UnsupportedLayerError,
        match=r"^torch module Sequential: unsupported layer '1' \(Tanh\).*position 2",
    ):
        from_torch(module)
    sd = {"norm.weight": torch.ones(5), "norm.bias": torch.zeros(5)}
    with pytest.raises(UnsupportedLayerError, match="'norm' \\(position 0\\)"):
        from_torch(sd, arch="lenet300")


def test_shape_mismatch_names_tensor_and_shapes():
    module = torch_mlp(hidden=(256, 100))
    with pytest.raises(ShapeMismatchError) as err:
        from_torch(module.state_dict(), arch="lenet300")
    msg = str(err.value)
    assert "1.weight" in msg and "(256, 784)" in msg and "(300, 784)" in msg


def test_state_dict_for_other_number_of_classes():
    module = torch_mlp(classes=100)
    with pytest.raises(ShapeMismatchError, match="100 classes.*num_classes=10"):
        from_torch(module.state_dict(), arch="lenet300")
    net = from_torch(module.state_dict(), arch="lenet300", num_classes=100)
    assert net.model.num_outputs == 100


def test_bad_files(tmp_path):
    sd = torch_lenet5().state_dict()
    good = tmp_path / "good.pt"
    torch.save(sd, good)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("not a model\n")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "pickled.pt")
    for name in ("cut.pt", "text.pt", "cut.safetensors", "pickled.pt"):
        with pytest.raises(ModelFormatError, match=name):
            from_torch(tmp_path / name, arch="lenet5")
    with pytest.raises(FileNotFoundError):
        from_torch(tmp_path / "missing.pt", arch="lenet5")


def test_state_dict_without_arch_and_unknown_arch():
    with pytest.raises(ConversionError, match="pass arch="):
        from_torch(torch_mlp().state_dict())
    with pytest.raises(ConversionError, match="unknown architecture"):
        from_torch(torch_mlp().state_dict(), arch="alexnet")


def test_projection_shortcuts_do_not_fit_option_a_resnet():
    module = torch_resnet(blocks=3, widths=(16, 32, 64), projection=True)
    with pytest.raises(ConversionError, match="downsample.*projection shortcut"):
        from_torch(module.state_dict(), arch="resnet20", input_shape=(16, 16, 1))


def test_layer_kind_order_mismatch():
    sd = torch_lenet5().state_dict()
    with pytest.raises(ConversionError, match="conv.*lenet300|layers"):
        from_torch(sd, arch="lenet300")


def test_traced_input_shape_required():
    with pytest.raises(ConversionError, match="input_shape"):
        from_torch(torch_lenet5())
    assert np.isfinite(
        flax_out(from_torch(torch_mlp()[1:]), np.zeros((1, 784), np.float32))
    ).all()


def test_traced_options_are_checked():
    """Without arch= a misspelt keyword or a num_classes the module does not have
    is an error naming it; the module's own num_classes is accepted."""
    module = torch_lenet5()
    shape = (28, 28, 1)
    net = from_torch(module, input_shape=shape, num_classes=10)
    assert net.model.num_outputs == 10 and net.card["num_classes"] == 10
    with pytest.raises(ConversionError, match="unknown keyword.*'num_clases'"):
        from_torch(module, input_shape=shape, num_clases=10)
    with pytest.raises(ConversionError, match="'width'.*need arch="):
        from_torch(module, input_shape=shape, width=0.5)
    with pytest.raises(ConversionError, match="num_classes=100.*outputs 10 values"):
        from_torch(module, input_shape=shape, num_classes=100)
    with pytest.raises(ConversionError, match="num_classes='10'"):
        from_torch(module, input_shape=shape, num_classes="10")
