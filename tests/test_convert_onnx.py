"""ONNX -> Flax: graphs exported by PyTorch and written by hand, against onnxruntime."""

import warnings

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
torch = pytest.importorskip("torch")
from convert_nets import (  # noqa: E402
    TOL,
    flax_out,
    inputs,
    rel_diff,
    tiny_convnext,
    tiny_shufflenet,
    torch_lenet5,
    torch_mlp,
    torch_out,
    torch_resnet,
    torch_vgg,
)
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from gapruning.convert import (  # noqa: E402
    ConversionError,
    ModelFormatError,
    ShapeMismatchError,
    UnsupportedLayerError,
    from_onnx,
)
from gapruning.models import channel_spaces  # noqa: E402


def checked_model(nodes, inits, name, in_shape, output, opset):
    """A checked ONNX model of ``nodes``: input ``x`` of ``in_shape``, ``output``
    = (name, shape), IR version 8."""
    out_name, out_shape = output
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def export_torch(module, shape_hwc, path, dynamic=True):
    c = (shape_hwc[2], shape_hwc[0], shape_hwc[1]) if len(shape_hwc) == 3 else shape_hwc
    kw = {"dynamic_axes": {"x": {0: "N"}, "y": {0: "N"}}} if dynamic else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (torch.zeros(1, *c),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            **kw,
        )
    return path


def ort_out(model_or_path, x_fw):
    data = model_or_path if isinstance(model_or_path, bytes) else str(model_or_path)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x_fw})[0]


CASES = {
    "mlp": (torch_mlp, (28, 28, 1)),
    "lenet5": (torch_lenet5, (28, 28, 1)),
    "vgg-bn": (torch_vgg, (28, 28, 1)),
    "resnet-projection": (torch_resnet, (16, 16, 1)),
}


@pytest.mark.parametrize("dynamic", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_torch_exported_parity(tmp_path, name, dynamic):
    build, shape = CASES[name]
    module = build()
    path = export_torch(module, shape, tmp_path / f"{name}.onnx", dynamic)
    net = from_onnx(path)
    x, x_fw = inputs(shape)
    ours = flax_out(net, x)
    n = len(x) if dynamic else 1  # a static export has batch size 1
    assert rel_diff(ours[:n], ort_out(path, x_fw[:n])) < TOL
    assert rel_diff(ours, torch_out(module, x_fw)) < TOL
    assert net.card["origin"]["framework"] == "onnx"
    assert net.card["origin"]["opset"] == 17


def test_resnet_residual_coupling(tmp_path):
    path = export_torch(torch_resnet(blocks=2), (16, 16, 1), tmp_path / "r.onnx")
    net = from_onnx(path)
    spaces = channel_spaces(net.model.nodes)
    adds = [n for n in net.model.nodes if n.op == "add"]
    assert len(adds) == 6
    stage_spaces = []
    for pair in (adds[0:2], adds[2:4], adds[4:6]):
        ids = {spaces.space_of[i] for a in pair for i in (*a.inputs, a.name)}
        assert len(ids) == 1
        stage_spaces.append(ids.pop())
    assert len(set(stage_spaces)) == 3
    for sid in stage_spaces:
        assert spaces.prunable[sid] in net.model.masks
        members = [n for n in net.model.nodes if spaces.space_of[n.name] == sid]
        assert sum(n.op == "conv" for n in members) >= 2  # both branches' convs


def handmade(with_softmax=True):
    """Every supported op that PyTorch's exporter does not emit above."""
    rng = np.random.default_rng(0)

    def init(name, arr):
        return numpy_helper.from_array(np.asarray(arr, np.float32), name)

    inits = [
        init("w", rng.normal(0, 0.3, (6, 3, 3, 3))),
        init("cb", rng.normal(0, 0.3, (1, 6, 1, 1))),
        init("s", rng.uniform(0.5, 1.5, 6)),
        init("b", rng.normal(0, 0.3, 6)),
        init("m", rng.normal(0, 0.3, 6)),
        init("v", rng.uniform(0.5, 1.5, 6)),
        init("mm", rng.normal(0, 0.3, (6, 7))),
        init("mb", rng.normal(0, 0.3, 7)),
        init("gw", rng.normal(0, 0.3, (7, 5))),
        init("gb", rng.normal(0, 0.3, (1, 5))),
        init("k", rng.uniform(0.5, 2.0, 5)),
        numpy_helper.from_array(np.array([-1, 6], np.int64), "shape"),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "w"], ["c"], pads=[1, 0, 1, 2], strides=[1, 1]),
        n("Add", ["c", "cb"], ["cbias"]),
        n("BatchNormalization", ["cbias", "s", "b", "m", "v"], ["bn"], epsilon=1e-3),
        n("Relu", ["bn"], ["r"]),
        n(
            "AveragePool",
            ["r"],
            ["ap"],
            kernel_shape=[3, 3],
            strides=[2, 2],
            pads=[1, 1, 1, 1],
        ),
        n(
            "MaxPool",
            ["ap"],
            ["mp"],
            kernel_shape=[2, 2],
            strides=[1, 1],
            pads=[0, 0, 1, 1],
        ),
        n("GlobalAveragePool", ["mp"], ["gap"]),
        n("Reshape", ["gap", "shape"], ["flat"]),
        n("MatMul", ["flat", "mm"], ["mmo"]),
        n("Add", ["mmo", "mb"], ["dense"]),
        n("Dropout", ["dense"], ["drop"]),
        n("Sigmoid", ["drop"], ["sig"]),
        n("Identity", ["sig"], ["id"]),
        n("Gemm", ["id", "gw", "gb"], ["gemm"], alpha=0.5, beta=2.0),
        n("Mul", ["gemm", "k"], ["scaled"]),
    ]
    last = "scaled"
    if with_softmax:
        nodes.append(n("Softmax", ["scaled"], ["y"], axis=1))
        last = "y"
    return checked_model(nodes, inits, "handmade", ["N", 3, 9, 8], (last, ["N", 5]), 17)


def test_handmade_ops_parity():
    for softmax in (False, True):
        model = handmade(softmax)
        net = from_onnx(model, input_box=(0, 1))
        x, x_fw = inputs((9, 8, 3))
        assert (
            rel_diff(flax_out(net, x), ort_out(model.SerializeToString(), x_fw)) < TOL
        )
    ops = [n.op for n in net.model.nodes]
    # the Add after Conv and after MatMul became biases, the Mul an affine BatchNorm
    assert ops.count("add") == 0 and ops.count("batchnorm") == 2
    assert net.model.nodes[-1].op == "softmax"
    assert net.card["name"] == "handmade" and net.card["input"]["box"] == [0.0, 1.0]


def test_input_shape_for_symbolic_spatial_dims(tmp_path):
    model = handmade()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(ConversionError, match="input_shape"):
        from_onnx(model)
    net = from_onnx(model, input_shape=(9, 8, 3))
    assert net.input_shape == (9, 8, 3)
    with pytest.raises(ConversionError, match="contradicts"):
        from_onnx(model, input_shape=(9, 8, 4))


# ------------------------------------------------------------------ bad input


def test_unsupported_op_named_with_position():
    model = handmade()
    model.graph.node[3].op_type = "Tanh"  # the Relu
    model.graph.node[3].name = "act"
    with pytest.raises(
        UnsupportedLayerError, match=r"op Tanh in node 'act' \(position 3\)"
    ):
        from_onnx(model)


def test_weight_shape_mismatch():
    model = handmade()
    model.graph.initializer[8].CopyFrom(
        numpy_helper.from_array(np.zeros((6, 5), np.float32), "gw")
    )
    with pytest.raises(ShapeMismatchError, match=r"shape \(5, 6\).*7 features"):
        from_onnx(model)


def test_bad_files(tmp_path):
    path = export_torch(torch_mlp(), (28, 28, 1), tmp_path / "ok.onnx")
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.onnx").write_text("hello, not a model")
    for name in ("cut.onnx", "text.onnx"):
        with pytest.raises(ModelFormatError, match=name):
            from_onnx(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        from_onnx(tmp_path / "missing.onnx")


def reduce_mean_graph(keepdims: int, opset: int, axes=(2, 3)):
    """Conv -> Relu -> ReduceMean(axes) -> [Flatten] -> Gemm whose weight is an
    Identity of an initializer (as torch's exporters write them)."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.3, (6, 3, 3, 3)).astype("f4"), "w"),
        numpy_helper.from_array(rng.normal(0, 0.3, (4, 6)).astype("f4"), "gw0"),
        numpy_helper.from_array(rng.normal(0, 0.3, 4).astype("f4"), "gb"),
    ]
    n = helper.make_node
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array(axes, np.int64), "axes"))
        mean = n("ReduceMean", ["r", "axes"], ["m"], keepdims=keepdims)
    else:
        mean = n("ReduceMean", ["r"], ["m"], axes=list(axes), keepdims=keepdims)
    nodes = [
        n("Identity", ["gw0"], ["gw"]),
        n("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        n("Relu", ["c"], ["r"]),
        mean,
    ]
    flat = "m"
    if keepdims:
        nodes.append(n("Flatten", ["m"], ["f"]))
        flat = "f"
    nodes.append(n("Gemm", [flat, "gw", "gb"], ["y"], transB=1))
    return checked_model(
        nodes, inits, "reduce_mean", ["N", 3, 7, 5], ("y", ["N", 4]), opset
    )


@pytest.mark.parametrize("keepdims", [0, 1])
@pytest.mark.parametrize("opset", [17, 18])
def test_reduce_mean_is_global_average_pooling(keepdims, opset):
    """torch's dynamo exporter writes global average pooling as ReduceMean over
    H, W (axes an attribute before opset 18, an input from 18 on)."""
    model = reduce_mean_graph(keepdims, opset)
    net = from_onnx(model)
    x, x_fw = inputs((7, 5, 3))
    assert rel_diff(flax_out(net, x), ort_out(model.SerializeToString(), x_fw)) < TOL
    ops = [n.op for n in net.model.nodes]
    assert "global_avgpool" in ops and "flatten" not in ops


def test_reduce_mean_over_other_axes_is_refused():
    model = reduce_mean_graph(1, 17, axes=(1,))
    with pytest.raises(
        UnsupportedLayerError, match=r"ReduceMean over axes \[1\].*only over H and W"
    ):
        from_onnx(model)


def test_torch_dynamo_export_of_global_pooling(tmp_path):
    """The default exporter of torch >= 2.9 (dynamo), end to end, where
    onnxscript is installed."""
    pytest.importorskip("onnxscript")
    module = torch_resnet(blocks=1, projection=True)
    path = tmp_path / "dynamo.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (torch.zeros(2, 1, 16, 16),), path)
    assert "ReduceMean" in {n.op_type for n in onnx.load(path).graph.node}
    net = from_onnx(path)
    x, x_fw = inputs((16, 16, 1))
    assert rel_diff(flax_out(net, x), torch_out(module, x_fw)) < TOL


def mobile_block():
    """Depthwise and grouped convolutions, ReLU6, Hardswish, Hardsigmoid, SiLU,
    a squeeze-and-excitation gate, a concat and a ceil-mode max pool."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.ReLU6())
            self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)
            self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.Hardswish())
            self.grouped = nn.Sequential(nn.Conv2d(8, 8, 1, groups=2), nn.SiLU())
            self.se = nn.Sequential(
                nn.AdaptiveAvgPool2d(1),
                nn.Conv2d(16, 4, 1),
                nn.ReLU(),
                nn.Conv2d(4, 16, 1),
                nn.Hardsigmoid(),
            )
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            x = self.pool(self.stem(x))
            x = torch.cat([self.dw(x), self.grouped(x)], 1)
            x = x * self.se(x)
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    with torch.no_grad():
        return Block().eval()


@pytest.mark.parametrize("dynamo", [False, True])
def test_mobile_ops_parity(tmp_path, dynamo):
    if dynamo:
        pytest.importorskip("onnxscript")
    module = mobile_block()
    path = tmp_path / "block.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {} if dynamo else {"opset_version": 17}
        torch.onnx.export(
            module, (torch.zeros(2, 3, 11, 11),), path, dynamo=dynamo, **kw
        )
    net = from_onnx(path)
    x, x_fw = inputs((11, 11, 3))
    assert rel_diff(flax_out(net, x), torch_out(module, x_fw)) < TOL
    ops = {n.op for n in net.model.nodes}
    assert {"concat", "mul", "hardswish", "hardsigmoid", "relu6"} <= ops


def test_unsupported_clip_and_hardsigmoid_are_named():
    model = handmade()
    relu = model.graph.node[3]  # Relu(bn) -> r
    relu.op_type, relu.name = "Clip", "clip"
    relu.attribute.extend([helper.make_attribute("min", -1.0)])
    model.opset_import[0].version = 10
    with pytest.raises(UnsupportedLayerError, match=r"Clip to \[-1.0, None\].*'clip'"):
        from_onnx(model)
    model = handmade()
    relu = model.graph.node[3]
    relu.op_type, relu.name = "HardSigmoid", "hs"
    with pytest.raises(UnsupportedLayerError, match=r"alpha=0.2, beta=0.5.*'hs'"):
        from_onnx(model)


@pytest.mark.parametrize("dynamo", [False, True])
@pytest.mark.parametrize("family", ["convnext", "shufflenet_v2"])
def test_torchvision_families_through_onnx(tmp_path, family, dynamo):
    """Either exporter at its default opset: Transposes around
    LayerNormalization, MatMul on channels-last maps, a layer scale, Split or
    Slice of channels, the Reshape-Transpose-Reshape channel shuffle."""
    if dynamo:
        pytest.importorskip("onnxscript")
    module = {"convnext": tiny_convnext, "shufflenet_v2": tiny_shufflenet}[family]()
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, 3, 32, 32),), path, dynamo=dynamo)
    net = from_onnx(path)
    x, x_fw = inputs((32, 32, 3), n=2)
    assert rel_diff(flax_out(net, x), torch_out(module, x_fw)) < 1e-4
    ops = {n.op for n in net.model.nodes}
    want = {"layernorm", "gelu", "dwconv"} if family == "convnext" else set()
    assert want | ({"channel_shuffle"} if family != "convnext" else set()) <= ops
    assert net.space.groups


def gelu_graph(form: str):
    """Dense -> GELU written with Erf (three orders of its products) -> Dense."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (4, 6)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 1, (6, 3)).astype(np.float32), "w2"),
    ]
    for name, v in [("r2", 2**0.5), ("ir2", 2**-0.5), ("one", 1.0), ("half", 0.5)]:
        inits.append(numpy_helper.from_array(np.array(v, np.float32), name))
    n = helper.make_node
    if form == "x_then_half":
        tail = [n("Mul", ["h", "p"], ["xp"]), n("Mul", ["xp", "half"], ["g"])]
    elif form == "half_then_x":
        tail = [n("Mul", ["p", "half"], ["hp"]), n("Mul", ["h", "hp"], ["g"])]
    else:  # (x * 0.5) * (1 + erf)
        tail = [n("Mul", ["h", "half"], ["hx"]), n("Mul", ["hx", "p"], ["g"])]
    scaled = n("Div", ["h", "r2"], ["d"])
    if form == "half_then_x":
        scaled = n("Mul", ["ir2", "h"], ["d"])
    nodes = [
        n("MatMul", ["x", "w1"], ["h"]),
        scaled,
        n("Erf", ["d"], ["e"]),
        n("Add", ["one", "e"] if form == "x_half_first" else ["e", "one"], ["p"]),
        *tail,
        n("MatMul", ["g", "w2"], ["y"]),
    ]
    return checked_model(nodes, inits, "gelu", ["N", 4], ("y", ["N", 3]), 17)


@pytest.mark.parametrize("form", ["x_then_half", "half_then_x", "x_half_first"])
def test_gelu_written_with_erf_is_one_op(form):
    model = gelu_graph(form)
    net = from_onnx(model)
    assert [n.op for n in net.model.nodes if n.op not in ("mask",)] == [
        "input",
        "dense",
        "gelu",
        "dense",
    ]
    x, _ = inputs((4,), n=8)
    assert rel_diff(flax_out(net, x), ort_out(model.SerializeToString(), x)) < TOL


def test_erf_read_elsewhere_is_not_fused():
    model = gelu_graph("x_then_half")
    model.graph.node[-1].input[0] = "e"  # the Erf's value is also read
    with pytest.raises(UnsupportedLayerError, match=r"op Erf in node"):
        from_onnx(model)


def split_shuffle_graph(opset: int):
    """Split of channels (sizes as an input, or ``num_outputs`` at opset 18), a
    Conv on one part, Concat, Reshape-Transpose-Reshape channel shuffle."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 1, (2, 2, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.normal(0, 1, (3, 4)).astype(np.float32), "fc"),
        numpy_helper.from_array(np.array([0, 2, 2, 5, 5], np.int64), "groups"),
        numpy_helper.from_array(np.array([0, 4, 5, 5], np.int64), "back"),
    ]
    n = helper.make_node
    if opset >= 18:
        split = n("Split", ["x"], ["a", "b"], axis=1, num_outputs=2)
    else:
        inits.append(numpy_helper.from_array(np.array([2, 2], np.int64), "sizes"))
        split = n("Split", ["x", "sizes"], ["a", "b"], axis=1)
    nodes = [
        split,
        n("Conv", ["b", "w"], ["c"], pads=[1, 1, 1, 1]),
        n("Relu", ["c"], ["r"]),
        n("Concat", ["a", "r"], ["cat"], axis=1),
        n("Reshape", ["cat", "groups"], ["g"]),
        n("Transpose", ["g"], ["t"], perm=[0, 2, 1, 3, 4]),
        n("Reshape", ["t", "back"], ["s"]),
        n("Conv", ["s", "fcw"], ["mix"]),
        n("GlobalAveragePool", ["mix"], ["p"]),
        n("Flatten", ["p"], ["f"]),
        n("MatMul", ["f", "fc"], ["y"]),
    ]
    inits.append(
        numpy_helper.from_array(
            rng.normal(0, 1, (3, 4, 1, 1)).astype(np.float32), "fcw"
        )
    )
    return checked_model(
        nodes, inits, "split_shuffle", ["N", 4, 5, 5], ("y", ["N", 4]), opset
    )


@pytest.mark.parametrize("opset", [17, 18])
def test_split_and_channel_shuffle(opset):
    model = split_shuffle_graph(opset)
    net = from_onnx(model)
    x, x_fw = inputs((5, 5, 4))
    assert rel_diff(flax_out(net, x), ort_out(model.SerializeToString(), x_fw)) < TOL
    ops = [n.op for n in net.model.nodes]
    assert ops.count("channel_map") == 2 and "channel_shuffle" in ops
    assert [g.name for g in net.space.groups] == ["Conv_7"]  # the shuffled are not
