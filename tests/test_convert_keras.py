"""Keras -> Flax: .keras and .h5 files of real Keras models, Keras 2 layouts, errors."""

import json
import os

import h5py
import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "jax")
keras = pytest.importorskip("keras")
from convert_nets import TOL, flax_out, inputs, rel_diff  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning.convert import (  # noqa: E402
    ModelFormatError,
    ShapeMismatchError,
    UnsupportedLayerError,
    from_keras,
)
from gapruning.models import channel_spaces  # noqa: E402

L = keras.layers


Z = {"kernel_initializer": "zeros"}  # Keras' random initialisers compile slowly
DZ = {"depthwise_initializer": "zeros"}


def randomize(model, seed=1):
    """Random weights everywhere, non-trivial BatchNorm statistics included."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        for w in layer.weights:
            role, shape = w.path.split("/")[-1], tuple(w.shape)
            if role == "kernel":
                value = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
            elif role in ("gamma", "moving_variance", "variance"):
                value = rng.uniform(0.5, 1.5, shape)
            elif role == "count":
                continue
            else:  # bias, beta, moving_mean
                value = rng.normal(0, 0.3, shape)
            w.assign(value.astype(np.float32))
        if isinstance(layer, L.Normalization):
            layer.finalize_state()  # its call reads copies made from the weights
    return model


def keras_mlp():
    return randomize(
        keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                L.Flatten(),
                L.Dense(300, activation="relu", **Z),
                L.Dropout(0.5),
                L.Dense(100, **Z),
                L.ReLU(),
                L.Dense(10, **Z),
            ]
        )
    )


def keras_lenet5():
    return randomize(
        keras.Sequential(
            [
                keras.Input((28, 28, 1)),
                L.Conv2D(6, 5, padding="same", activation="relu", **Z),
                L.MaxPooling2D(),
                L.Conv2D(16, 5, activation="relu", **Z),
                L.AveragePooling2D(2),
                L.Flatten(),
                L.Dense(120, activation="relu", **Z),
                L.Dense(84, activation="sigmoid", **Z),
                L.Dense(10, activation="softmax", **Z),
            ]
        )
    )


def keras_vgg():
    x = inp = keras.Input((20, 20, 3))
    for i, (c, pool) in enumerate([(8, "max"), (16, "avg"), (16, None)]):
        x = L.Conv2D(c, 3, padding="same", use_bias=False, name=f"conv{i}", **Z)(x)
        x = L.BatchNormalization(scale=i != 1, name=f"bn{i}")(x)
        x = L.Activation("relu")(x)
        if pool == "max":
            x = L.MaxPooling2D(3, strides=2, padding="same")(x)
        elif pool == "avg":
            x = L.AveragePooling2D(3, strides=2, padding="same")(x)
    x = L.GlobalAveragePooling2D()(x)
    out = L.Dense(10, name="classifier", **Z)(x)
    return randomize(keras.Model(inp, out))


def keras_resnet():
    """Two stages; the second downsamples with a 1x1 conv + BN projection."""
    inp = keras.Input((12, 12, 2))
    x = L.Activation("relu")(
        L.BatchNormalization()(L.Conv2D(4, 3, padding="same", **Z)(inp))
    )
    for stage, (c, stride) in enumerate([(4, 1), (8, 2)], start=1):
        h = L.Conv2D(c, 3, strides=stride, padding="same", name=f"s{stage}_conv1", **Z)(
            x
        )
        h = L.ReLU()(L.BatchNormalization()(h))
        h = L.BatchNormalization()(
            L.Conv2D(c, 3, padding="same", name=f"s{stage}_conv2", **Z)(h)
        )
        short = x
        if stride != 1:
            short = L.Conv2D(c, 1, strides=stride, name=f"s{stage}_proj", **Z)(x)
            short = L.BatchNormalization()(short)
        x = L.ReLU()(L.Add(name=f"s{stage}_add")([h, short]))
    out = L.Dense(5, **Z)(L.GlobalAveragePooling2D()(x))
    return randomize(keras.Model(inp, out))


def keras_mobile():
    """MobileNetV2/V3-style: Rescaling, ZeroPadding2D before valid stride-2 and
    depthwise convolutions, ReLU6, hard_swish, an SE block gated by V3's
    ``relu6(x + 3) * (1 / 6)`` (Keras ops), a residual, silu and gelu heads."""
    inp = keras.Input((10, 10, 3))
    x = L.Rescaling(1 / 127.5, offset=-1.0)(inp)
    x = L.ZeroPadding2D(((0, 1), (0, 1)))(x)
    x = L.Conv2D(8, 3, strides=2, use_bias=False, name="stem", **Z)(x)
    stem = L.ReLU(6.0)(L.BatchNormalization()(x))
    h = L.Conv2D(16, 1, name="expand", **Z)(stem)
    h = L.Activation("hard_swish")(L.BatchNormalization()(h))
    h = L.ZeroPadding2D(1)(h)
    h = L.DepthwiseConv2D(3, use_bias=False, name="dw", **DZ)(h)
    h = L.Activation("relu6")(L.BatchNormalization()(h))
    s = L.GlobalAveragePooling2D(keepdims=True)(h)
    s = L.Conv2D(4, 1, activation="relu", name="squeeze", **Z)(s)
    s = L.Conv2D(16, 1, name="excite", **Z)(s)
    s = L.ReLU(6.0, name="gate_relu6")(s + 3.0) * (1.0 / 6.0)
    h = L.Multiply(name="se_mul")([h, s])
    h = L.BatchNormalization()(L.Conv2D(8, 1, name="project", **Z)(h))
    x = L.Add(name="res")([stem, h])
    x = L.Conv2D(12, 1, activation="silu", name="head", **Z)(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(6, activation="gelu", name="fc", **Z)(x)
    return randomize(keras.Model(inp, L.Dense(5, name="out", **Z)(x)))


def keras_efficient():
    """EfficientNet-style: Normalization, a depth-multiplier-2 depthwise conv, an
    SE gate through Reshape((1, 1, C)) with swish and sigmoid, hard_sigmoid, a
    grouped conv, Dropout with a noise shape, Keras ops with constants."""
    inp = keras.Input((8, 8, 3))
    x = L.Normalization(axis=-1, name="norm")(inp)
    x = L.Conv2D(6, 3, padding="same", activation="swish", name="stem", **Z)(x)
    x = (2.0 - x) / 4.0  # Keras ops of a constant: affine maps
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw2", **DZ)(x)
    x = L.BatchNormalization()(x)
    s = L.GlobalAveragePooling2D()(x)
    s = L.Reshape((1, 1, 12))(s)
    s = L.Conv2D(3, 1, activation="swish", name="squeeze", **Z)(s)
    s = L.Conv2D(12, 1, activation="sigmoid", name="excite", **Z)(s)
    x = L.Multiply(name="se_mul")([s, x])
    x = L.Dropout(0.2, noise_shape=(None, 1, 1, 1))(x)
    x = L.Conv2D(8, 1, groups=2, activation="hard_sigmoid", name="grouped", **Z)(x)
    x = L.Conv2D(10, 3, strides=2, name="conv", **Z)(x)
    x = L.Flatten()(x)
    return randomize(keras.Model(inp, L.Dense(4, name="out", **Z)(x)))


def keras_densenet():
    """DenseNet/ResNet-style stems and blocks: ZeroPadding2D before a 7x7 valid
    conv and before a max pool, Concatenate, average pooling, LayerNormalization,
    a channels-last Dense, MobileNet's 1x1-conv head on a (1, 1, C) tensor."""
    inp = keras.Input((12, 12, 3))
    x = L.ZeroPadding2D(3)(inp)
    x = L.Conv2D(8, 7, strides=2, name="stem", **Z)(x)
    x = L.Activation("relu")(L.BatchNormalization()(x))
    x = L.ZeroPadding2D(((1, 1), (1, 1)))(x)
    x = L.MaxPooling2D(3, strides=2, name="pool")(x)
    for i in range(2):
        h = L.Activation("relu")(L.BatchNormalization()(x))
        h = L.Conv2D(4, 3, padding="same", name=f"grow{i}", **Z)(h)
        x = L.Concatenate(name=f"cat{i}")([x, h])
    x = L.Conv2D(8, 1, name="transition", **Z)(x)
    x = L.AveragePooling2D(2, strides=1)(x)
    x = L.LayerNormalization(name="ln")(x)
    x = L.Dense(6, activation="relu", name="mlp", **Z)(x)
    x = L.GlobalAveragePooling2D(keepdims=True)(x)
    x = L.Conv2D(5, 1, name="logits", **Z)(x)
    return randomize(keras.Model(inp, L.Reshape((5,))(x)))


MODELS = {
    "mlp": (keras_mlp, (28, 28, 1)),
    "lenet5": (keras_lenet5, (28, 28, 1)),
    "vgg-bn": (keras_vgg, (20, 20, 3)),
    "resnet-projection": (keras_resnet, (12, 12, 2)),
    "mobile": (keras_mobile, (10, 10, 3)),
    "efficient": (keras_efficient, (8, 8, 3)),
    "densenet": (keras_densenet, (12, 12, 3)),
}


def keras_out(model, x):
    return np.asarray(model(x, training=False))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every model saved as .keras and as legacy .h5, with reference outputs."""
    root = tmp_path_factory.mktemp("keras")
    out = {}
    for name, (build, shape) in MODELS.items():
        model = build()
        x, _ = inputs(shape)
        model.save(root / f"{name}.keras")
        model.save(root / f"{name}.h5")
        out[name] = (model, root, x, keras_out(model, x))
    return out


@pytest.mark.parametrize("fmt", ["keras", "h5"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_parity(saved, name, fmt):
    model, root, x, ref = saved[name]
    net = from_keras(root / f"{name}.{fmt}")
    assert rel_diff(flax_out(net, x), ref) < TOL
    assert net.card["origin"]["framework"] == "keras"
    assert net.card["origin"]["format"] == fmt
    assert net.card["input"]["shape"] == list(x.shape[1:])


def test_layers_epsilon_and_coupling(saved):
    model, root, x, _ = saved["resnet-projection"]
    net = from_keras(root / "resnet-projection.keras", input_box=(-3, 3))
    nodes = {n.name: n for n in net.model.nodes}
    bns = [n for n in nodes.values() if n.op == "batchnorm"]
    assert bns and all(n.attr("epsilon") == pytest.approx(1e-3) for n in bns)
    assert all(n.attr("momentum") == pytest.approx(0.99) for n in bns)
    spaces = channel_spaces(net.model.nodes)
    sid = spaces.space_of["s2_add"]
    assert spaces.space_of["s2_conv2"] == sid == spaces.space_of["s2_proj"]
    assert spaces.prunable[sid] in net.model.masks
    assert spaces.space_of["s1_add"] == spaces.space_of["s1_conv2"]
    assert spaces.space_of["s1_add"] != sid
    assert net.card["input"]["box"] == [-3.0, 3.0]


def test_softmax_output_is_not_prunable(saved):
    _, root, _, _ = saved["lenet5"]
    net = from_keras(root / "lenet5.keras")
    assert net.model.nodes[-1].op == "softmax"
    spaces = channel_spaces(net.model.nodes)
    assert spaces.space_of[net.model.nodes[-2].name] not in spaces.prunable
    assert len(net.model.masks) == 4  # conv, conv, dense, dense: not the last one
    assert net.model.nodes[-2].name not in net.model.masks


NEW_LAYERS = ("mobile", "efficient", "densenet")


@pytest.mark.parametrize("name", NEW_LAYERS)
def test_new_layers_compact_exactly(saved, name):
    """Random unit masks: the compacted model computes the masked model's outputs
    and has exactly the parameters the space counts."""
    _, root, x, _ = saved[name]
    net = from_keras(root / f"{name}.keras")
    rng = np.random.default_rng(0)
    masks = {}
    for g in net.space.groups:
        m = rng.random(g.size) < 0.5
        m[0] = True
        masks[g.name] = m
    small = gp.compact(net, masks)
    want = np.asarray(gp.masked_apply(net, masks, x))
    assert rel_diff(flax_out(small, x), want) <= TOL
    assert gp.param_count(small) == net.space.params(masks) < net.space.dense_params


def test_new_layers_groups_follow_the_couplings(saved):
    """MobileNet-style: the depthwise conv and the SE gate's excite conv are
    pruned with the expansion, the squeeze conv is a group of its own, the
    residual ties the stem and the projection. EfficientNet-style: grouped convs
    (depth multiplier 2 too) leave their inputs unprunable. DenseNet-style:
    concatenated pieces keep their groups, LayerNorm's input is prunable (it
    normalizes over the kept channels)."""
    ops, spaces, nets = {}, {}, {}
    for name in NEW_LAYERS:
        net = nets[name] = from_keras(saved[name][1] / f"{name}.keras")
        ops[name] = {n.name: n.op for n in net.model.nodes}
        spaces[name] = net.space
    sp = spaces["mobile"]
    assert [g.name for g in sp.groups] == ["stem", "expand", "squeeze", "head", "fc"]
    assert sp.group_of("dw") == sp.group_of("excite") == "expand"
    assert sp.group_of("se_mul") == "expand"
    assert sp.group_of("project") == sp.group_of("res") == "stem"
    assert {"dwconv", "relu6", "hardswish", "mul", "silu", "gelu"} <= set(
        ops["mobile"].values()
    )
    # relu6(x + 3) * (1 / 6) of Keras ops: one hard sigmoid, no affine maps
    (hard,) = [n for n in nets["mobile"].model.nodes if n.op == "hardsigmoid"]
    assert hard.inputs == ("excite",) and "gate_relu6" not in ops["mobile"]
    assert ops["mobile"]["rescaling"] == "batchnorm"
    sp = spaces["efficient"]
    assert [g.name for g in sp.groups] == ["squeeze", "conv"]
    affine = [n for n in nets["efficient"].model.nodes if n.op == "batchnorm"][:3]
    assert affine[0].inputs == ("input",) and affine[1].inputs == ("stem_silu",)
    assert affine[2].inputs == (affine[1].name,)  # (2 - x) / 4: two affine maps
    assert all(n.attr("epsilon") == 0 for n in affine)
    assert ops["efficient"]["dw2"] == ops["efficient"]["grouped"] == "grouped_conv"
    assert {"hardsigmoid", "sigmoid", "silu", "mul"} <= set(ops["efficient"].values())
    sp = spaces["densenet"]
    names = ["stem", "grow0", "grow1", "transition", "mlp"]
    assert [g.name for g in sp.groups] == names
    assert sp.pieces_of("cat1") == ("cat0", "grow1")
    assert sp.pieces_of("cat0") == ("pool", "grow0")
    assert sp.group_of("ln") == "transition" and ops["densenet"]["ln"] == "layernorm"
    assert ops["densenet"]["mlp"] == "conv" and ops["densenet"]["logits"] == "dense"


def test_new_layers_prune_with_the_ga(saved):
    _, root, x, _ = saved["mobile"]
    net = from_keras(root / "mobile.keras")
    result = gp.prune(
        net,
        budget="flops",
        target=0.5,
        generations=1,
        population=4,
        num_probes=4,
        progress=False,
        recover=(),
    )
    space = net.space
    assert space.flops(result.masks) <= 0.5 * space.dense_flops
    assert gp.param_count(result.pruned) == space.params(result.masks)
    want = gp.masked_apply(net, result.masks, x)
    assert rel_diff(flax_out(result.pruned, x), want) <= TOL


# ------------------------------------------------------------------ Keras 2 files


def _keras2_layer(layer, inbound):
    cfg = {k: v for k, v in layer.get_config().items() if k != "dtype"}
    cfg["dtype"] = "float32"
    if isinstance(layer, keras.layers.InputLayer):
        cfg = {"batch_input_shape": [None, *layer.batch_shape[1:]], "name": layer.name}
    return {
        "class_name": type(layer).__name__,
        "config": cfg,
        "name": layer.name,
        "inbound_nodes": [[[src, 0, 0, {}] for src in inbound]] if inbound else [],
    }


def write_keras2_h5(model, path, sequential):
    """A tf.keras 2.x style .h5 file (Keras 2 config layout, ':0' weight names)."""
    k3 = json.loads(model.to_json())["config"]["layers"]
    inbound = {}
    for item in k3:
        names = []

        def walk(o, names=names):
            if isinstance(o, dict):
                if o.get("class_name") == "__keras_tensor__":
                    names.append(o["config"]["keras_history"][0])
                    return
                for v in o.values():
                    walk(v)
            elif isinstance(o, list):
                for v in o:
                    walk(v)

        for node in item.get("inbound_nodes", []):
            walk(node["args"])
        inbound[item["config"]["name"]] = names
    layers = [_keras2_layer(layer, inbound.get(layer.name)) for layer in model.layers]
    if sequential:  # Keras 2 Sequential: no InputLayer, shape on the first layer
        layers = [x for x in layers if x["class_name"] != "InputLayer"]
        layers[0]["config"]["batch_input_shape"] = [None, *model.input_shape[1:]]
        config = {
            "class_name": "Sequential",
            "config": {"name": "seq", "layers": layers},
        }
    else:
        assert layers[0]["class_name"] == "InputLayer"
        config = {
            "class_name": "Functional",
            "config": {
                "name": "model",
                "layers": layers,
                "input_layers": [[layers[0]["name"], 0, 0]],
                "output_layers": [[layers[-1]["name"], 0, 0]],
            },
        }
    with h5py.File(path, "w") as f:
        f.attrs["model_config"] = json.dumps(config).encode()
        f.attrs["keras_version"] = b"2.13.1"
        f.attrs["backend"] = b"tensorflow"
        mw = f.create_group("model_weights")
        mw.attrs["layer_names"] = [layer.name.encode() for layer in model.layers]
        for layer in model.layers:
            g = mw.create_group(layer.name)
            names = [f"{layer.name}/{w.path.split('/')[-1]}:0" for w in layer.weights]
            g.attrs["weight_names"] = [n.encode() for n in names]
            for n, w in zip(names, layer.get_weights(), strict=True):
                g.create_dataset(n, data=w)


@pytest.mark.parametrize(
    "name,sequential", [("mlp", True), ("resnet-projection", False)]
)
def test_keras2_h5(saved, tmp_path, name, sequential):
    model, _, x, ref = saved[name]
    path = tmp_path / "k2.h5"
    write_keras2_h5(model, path, sequential)
    net = from_keras(path)
    assert net.card["origin"]["keras_version"] == "2.13.1"
    assert rel_diff(flax_out(net, x), ref) < TOL


# ------------------------------------------------------------------ bad input


def test_unsupported_layer_named_with_position(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((6,)),
            L.Dense(4, **Z),
            L.LeakyReLU(name="leaky"),
            L.Dense(2, **Z),
        ]
    )
    model.save(tmp_path / "leaky.keras")
    with pytest.raises(
        UnsupportedLayerError, match=r"'leaky' \(position 1\).*class LeakyReLU"
    ):
        from_keras(tmp_path / "leaky.keras")
    model = keras.Sequential([keras.Input((6,)), L.Dense(4, activation="tanh", **Z)])
    model.save(tmp_path / "tanh.h5")
    with pytest.raises(UnsupportedLayerError, match="activation 'tanh'"):
        from_keras(tmp_path / "tanh.h5")


UNSUPPORTED = {
    "relu_max_3": (lambda x: L.ReLU(3.0, name="r")(x), "ReLU with max_value=3"),
    "pad_flatten": (
        lambda x: L.Flatten(name="r")(L.ZeroPadding2D(1)(x)),
        "Flatten reading a ZeroPadding2D output",
    ),
    "pad_maxpool_signed": (
        lambda x: L.MaxPooling2D(3, name="r")(L.ZeroPadding2D(1)(L.Conv2D(2, 1)(x))),
        "may be negative",
    ),
    "pad_same_conv": (
        lambda x: L.Conv2D(2, 3, padding="same", name="r")(L.ZeroPadding2D(1)(x)),
        "padding='same' after a ZeroPadding2D",
    ),
    "dilation": (
        lambda x: L.Conv2D(2, 3, dilation_rate=2, name="r")(x),
        "Conv2D with dilation_rate",
    ),
    "reshape": (lambda x: L.Reshape((12, 6), name="r")(x), r"Reshape of \(6, 6, 2\)"),
    "rms_norm": (
        lambda x: L.LayerNormalization(rms_scaling=True, name="r")(x),
        "rms_scaling",
    ),
    "concat_h": (
        lambda x: L.Concatenate(axis=1, name="r")([x, x]),
        "Concatenate along axis 1",
    ),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_new_layers_fail_naming_the_layer(tmp_path, case):
    build, what = UNSUPPORTED[case]
    inp = keras.Input((6, 6, 2))
    x = build(inp)
    x = L.GlobalAveragePooling2D()(x) if len(x.shape) == 4 else L.Flatten()(x)
    keras.Model(inp, L.Dense(3, name="out")(x)).save(tmp_path / "m.keras")
    with pytest.raises(
        UnsupportedLayerError, match=rf"layer 'r' \(position \d+\): .*{what}"
    ):
        from_keras(tmp_path / "m.keras")


def test_bad_files(saved, tmp_path):
    model, root, _, _ = saved["mlp"]
    model.save_weights(tmp_path / "only.weights.h5")
    with pytest.raises(ModelFormatError, match="weights only"):
        from_keras(tmp_path / "only.weights.h5")
    for ext in ("keras", "h5"):
        data = (root / f"mlp.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ModelFormatError, match=f"cut.{ext}"):
            from_keras(tmp_path / f"cut.{ext}")
    (tmp_path / "notes.h5").write_text("hello")
    with pytest.raises(ModelFormatError, match="neither"):
        from_keras(tmp_path / "notes.h5")
    with pytest.raises(FileNotFoundError):
        from_keras(tmp_path / "missing.keras")


def test_weight_shape_mismatch_names_layer(saved, tmp_path):
    _, root, _, _ = saved["mlp"]
    path = tmp_path / "bad.h5"
    path.write_bytes((root / "mlp.h5").read_bytes())
    with h5py.File(path, "r+") as f:
        g = f["model_weights"]
        layer = [k for k in g if "dense" in k][1]
        names = [
            n.decode() if isinstance(n, bytes) else n
            for n in g[layer].attrs["weight_names"]
        ]
        kernel = [n for n in names if "kernel" in n][0]
        del g[layer][kernel]
        g[layer].create_dataset(kernel, data=np.zeros((299, 100), np.float32))
    with pytest.raises(
        ShapeMismatchError, match=r"kernel has shape \(299, 100\).*\(300, 100\)"
    ):
        from_keras(path)


@pytest.mark.parametrize("name", ["resnet-projection", "efficient"])
def test_keras3_file_without_var_names(saved, tmp_path, name):
    """Older Keras 3 files name weight groups only by path (dense, dense_1...)."""
    import io
    import zipfile

    model, root, x, ref = saved[name]
    with zipfile.ZipFile(root / f"{name}.keras") as z:
        files = {n: z.read(n) for n in z.namelist()}
    buf = io.BytesIO(files["model.weights.h5"])
    with h5py.File(buf, "r+") as f:
        groups = []
        f.visititems(
            lambda name, obj: groups.append(obj) if name.endswith("vars") else None
        )
        for g in groups:
            if "name" in g.attrs:
                del g.attrs["name"]
        assert len(groups) > 10
    files["model.weights.h5"] = buf.getvalue()
    with zipfile.ZipFile(tmp_path / "old.keras", "w") as z:
        for n, data in files.items():
            z.writestr(n, data)
    assert rel_diff(flax_out(from_keras(tmp_path / "old.keras"), x), ref) < TOL
