"""``gapruning convert``: each route end to end, and failures that write nothing."""

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnx")
from convert_nets import (  # noqa: E402
    TOL,
    flax_out,
    inputs,
    rel_diff,
    torch_lenet5,
    torch_mlp,
    torch_out,
)
from test_convert_onnx import export_torch, handmade  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning import cli  # noqa: E402


def convert(capsys, *args):
    rc = cli.main(["convert", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_torch_file_onto_arch(tmp_path, capsys):
    module = torch_lenet5()
    torch.save(module.state_dict(), tmp_path / "lenet.pth")
    out = tmp_path / "model"
    rc, stdout, _ = convert(
        capsys, "--from", "torch", tmp_path / "lenet.pth", "--arch", "lenet5",
        "--input-box=-1,1", "--out", out,
    )  # fmt: skip
    assert rc == 0 and "saved" in stdout
    net = gp.load(out)
    x, x_fw = inputs((28, 28, 1))
    assert rel_diff(flax_out(net, x), torch_out(module, x_fw)) < TOL
    card = net.card
    assert card["origin"]["framework"] == "torch" and card["arch"] == "lenet5"
    assert card["input"]["box"] == [-1.0, 1.0] and card["input"]["box_source"] == "user"
    assert card["origin"]["command"].startswith("gapruning convert --from torch")


def test_onnx_and_keras_files(tmp_path, capsys):
    path = export_torch(torch_mlp(), (28, 28, 1), tmp_path / "mlp.onnx")
    rc, stdout, _ = convert(capsys, "--from", "onnx", path, "--out", tmp_path / "o")
    assert rc == 0 and "default" in stdout  # says the input box is a default
    assert gp.load(tmp_path / "o").card["input"]["box_source"] == "default"
    os.environ.setdefault("KERAS_BACKEND", "jax")
    keras = pytest.importorskip("keras")
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="relu", kernel_initializer="zeros"),
            keras.layers.Dense(3, kernel_initializer="ones"),
        ]
    )
    model.save(tmp_path / "k.h5")
    rc, _, _ = convert(
        capsys, "--from", "keras", tmp_path / "k.h5", "--out", tmp_path / "k"
    )
    assert rc == 0
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    net = gp.load(tmp_path / "k")
    assert rel_diff(flax_out(net, x), np.asarray(model(x))) < TOL


@pytest.fixture
def bad_inputs(tmp_path):
    torch.save(torch_mlp(hidden=(256, 100)).state_dict(), tmp_path / "wide.pt")
    torch.save(torch_mlp(classes=100).state_dict(), tmp_path / "c100.pt")
    torch.save(torch_mlp().state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.onnx").write_text("not a model")
    model = handmade()
    model.graph.node[3].op_type = "Tanh"
    model.graph.node[3].name = "act"
    import onnx

    onnx.save(model, str(tmp_path / "tanh.onnx"))
    return tmp_path


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["torch", "wide.pt", "--arch", "lenet300"],
            r"1.weight.*\(256, 784\).*\(300, 784\)",
        ),
        (["torch", "c100.pt", "--arch", "lenet300"], "100 classes"),
        (["torch", "cut.pt", "--arch", "lenet300"], "cut.pt: not a readable"),
        (["torch", "ok.pt"], "pass arch="),
        (["onnx", "notes.onnx"], "notes.onnx: not a readable ONNX"),
        (["onnx", "tanh.onnx"], r"op Tanh in node 'act' \(position 3\)"),
        (["keras", "ok.pt"], "ok.pt: not a .keras model archive"),
        (["keras", "notes.onnx"], "neither an HDF5"),
        (["onnx", "missing.onnx"], "no such file"),
    ],
)
def test_failures_exit_2_and_write_nothing(bad_inputs, capsys, args, message):
    import re

    out = bad_inputs / "out"
    fw, file, *rest = args
    rc, _, err = convert(capsys, "--from", fw, bad_inputs / file, *rest, "--out", out)
    assert rc == 2
    assert re.search(message, err), err
    assert not out.exists()
    assert not [p for p in os.listdir(bad_inputs) if p.startswith(".out")]


def test_refuses_non_empty_out(tmp_path, capsys):
    torch.save(torch_mlp().state_dict(), tmp_path / "ok.pt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    rc, _, err = convert(
        capsys, "--from", "torch", tmp_path / "ok.pt", "--arch", "lenet300",
        "--out", tmp_path / "out",
    )  # fmt: skip
    assert rc == 2 and "not empty" in err
    assert os.listdir(tmp_path / "out") == ["keep.txt"]
