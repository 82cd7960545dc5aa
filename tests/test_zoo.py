import dataclasses
import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import randomize
from flax import nnx

import gapruning as gp
from gapruning import models, zoo


def _pretrained(arch="lenet5"):
    net = randomize(models.build(arch, seed=2))
    return gp.Pretrained(
        net,
        {
            "name": "t",
            "arch": arch,
            "input": {"shape": [28, 28, 1], "mean": 0.5, "std": 0.25},
        },
    )


def _leaves(model):
    return nnx.to_flat_state(nnx.state(model))


def test_save_load_round_trip_is_bit_exact(tmp_path):
    pre = _pretrained("resnet20")
    pre.model.masks["stage2"][...] = pre.model.masks["stage2"][...].at[3].set(0.0)
    out = gp.save(pre, tmp_path / "m")
    back = gp.load(out)
    a, b = _leaves(pre.model), _leaves(back.model)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, va), (_, vb) in zip(a, b, strict=False):
        np.testing.assert_array_equal(
            np.asarray(va[...]), np.asarray(vb[...]), err_msg=str(path)
        )
    assert back.card["arch"] == "resnet20" and back.model.nodes == pre.model.nodes
    x = jnp.ones((2, 28, 28, 1))
    np.testing.assert_array_equal(np.asarray(pre.model(x)), np.asarray(back.model(x)))
    assert back.input_box == ((0 - 0.5) / 0.25, (1 - 0.5) / 0.25)


def test_save_refuses_to_overwrite_and_leaves_no_temporary(tmp_path):
    pre = _pretrained()
    gp.save(pre, tmp_path / "m")
    with pytest.raises(FileExistsError, match="overwrite"):
        gp.save(pre, tmp_path / "m")
    gp.save(pre, tmp_path / "m", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_save_refuses_nan_weights_and_writes_nothing(tmp_path):
    pre = _pretrained("lenet300")
    k = pre.model.layers["fc2"].kernel
    k[...] = k[...].at[0, 0].set(jnp.nan)
    with pytest.raises(zoo.ModelFileError, match="fc2.*NaN"):
        gp.save(pre, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_unknown_name_lists_shipped_models():
    with pytest.raises(zoo.ModelFileError, match="lenet300-fmnist"):
        gp.load("no-such-model")


def test_directory_without_card(tmp_path):
    with pytest.raises(zoo.ModelFileError, match="no model.json"):
        gp.load(tmp_path)


def test_corrupt_card(tmp_path):
    gp.save(_pretrained(), tmp_path / "m")
    (tmp_path / "m" / "model.json").write_text("{ not json")
    with pytest.raises(zoo.ModelFileError, match="model.json is corrupt"):
        gp.load(tmp_path / "m")


def test_card_and_checkpoint_shape_mismatch_is_named(tmp_path):
    gp.save(_pretrained("lenet300"), tmp_path / "m")
    card_file = tmp_path / "m" / "model.json"
    card = json.loads(card_file.read_text())
    other = zoo.graph_to_json(models.MODELS["paoding_mlp"]())
    card["graph"] = other
    card_file.write_text(json.dumps(card))
    with pytest.raises(
        zoo.ModelFileError, match=r"layers/fc1/bias has shape \(300,\).*\(128,\)"
    ):
        gp.load(tmp_path / "m")


def test_nan_in_checkpoint_is_refused(tmp_path):
    pre = _pretrained("lenet300")
    gp.save(pre, tmp_path / "m")
    k = pre.model.layers["fc1"].bias
    k[...] = k[...].at[0].set(jnp.inf)
    # write the bad state through orbax directly, as a damaged file would hold it
    ckpt = zoo._checkpointer()
    ckpt.save(
        (tmp_path / "bad" / "state").absolute(), nnx.to_pure_dict(nnx.state(pre.model))
    )
    ckpt.wait_until_finished()
    (tmp_path / "bad" / "model.json").write_text(
        (tmp_path / "m" / "model.json").read_text()
    )
    with pytest.raises(zoo.ModelFileError, match="fc1/bias contains NaN or Inf"):
        gp.load(tmp_path / "bad")


def test_missing_or_damaged_checkpoint(tmp_path):
    gp.save(_pretrained(), tmp_path / "m")
    for f in (tmp_path / "m" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"\x00garbage")
    with pytest.raises(zoo.ModelFileError, match="cannot read checkpoint"):
        gp.load(tmp_path / "m")
    import shutil

    shutil.rmtree(tmp_path / "m" / "state")
    with pytest.raises(zoo.ModelFileError, match="no state/"):
        gp.load(tmp_path / "m")


def _without_stream_masks(nodes):
    """``nodes`` as a version that could not prune the ViT stream saved them."""
    source = {
        n.name: n.inputs[0]
        for n in nodes
        if n.op == "mask" and n.attr("group") == "stream"
    }
    return tuple(
        dataclasses.replace(n, inputs=tuple(source.get(i, i) for i in n.inputs))
        for n in nodes
        if n.name not in source
    )


def test_a_model_saved_before_a_group_existed_loads_with_it(tmp_path):
    """Mask nodes follow the current rules: a ViT saved when its residual stream
    was not prunable (no stream masks in its graph or checkpoint) loads with an
    all-ones stream group and the same outputs."""
    import orbax.checkpoint as ocp

    net = _pretrained("vit")
    old_nodes = _without_stream_masks(net.model.nodes)
    assert len(old_nodes) < len(net.model.nodes)
    assert models.insert_masks(old_nodes) == net.model.nodes
    path = gp.save(net, tmp_path / "vit")
    card = json.loads((path / zoo.CARD_FILE).read_text())
    card["graph"] = zoo.graph_to_json(old_nodes)
    (path / zoo.CARD_FILE).write_text(json.dumps(card))
    state = nnx.to_pure_dict(nnx.state(net.model))
    del state["masks"]["stream"]
    shutil.rmtree(path / zoo.STATE_DIR)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(path / zoo.STATE_DIR, state)
    ckpt.wait_until_finished()
    back = gp.load(path)
    assert back.model.nodes == net.model.nodes
    assert bool(jnp.all(back.model.masks["stream"][...] == 1))
    x = jnp.asarray(np.random.default_rng(0).random((2, 28, 28, 1)), jnp.float32)
    np.testing.assert_allclose(back.model(x), net.model(x), rtol=1e-6, atol=1e-6)
