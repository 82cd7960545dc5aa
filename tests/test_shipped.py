"""The shipped weights load and reach the accuracy their model cards state."""

import json

import pytest

import gapruning as gp
from gapruning import zoo

SHIPPED = zoo.shipped_models()
# The accuracies issue #2 asks of the shipped models.
REQUIRED = {
    "lenet300-fmnist": 0.895,
    "paoding_mlp-fmnist": 0.89,
    "lenet5-fmnist": 0.90,
    "vgg11-fmnist": 0.93,
    "resnet20-fmnist": 0.925,
}


@pytest.fixture(scope="module")
def test_set():
    return gp.data.fashion_mnist("test")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reaches_its_card_accuracy(name, test_set):
    net = gp.load(name)
    measured = gp.evaluate(net, test_set, attacks=())["accuracy"]
    assert measured == pytest.approx(net.card["test_accuracy"], abs=0.001)
    card = json.loads((zoo.WEIGHTS_DIR / name / "model.json").read_text())
    for key in ("arch", "input", "dataset", "test_accuracy", "training"):
        assert key in card
    assert card["training"]["command"].startswith("gapruning train")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_meets_the_required_accuracy(name):
    card = gp.load(name).card
    assert card["test_accuracy"] >= REQUIRED.get(name, 0.0)


def test_the_mlp_and_lenet_weights_are_shipped():
    assert {"lenet300-fmnist", "paoding_mlp-fmnist", "lenet5-fmnist"} <= set(SHIPPED)
