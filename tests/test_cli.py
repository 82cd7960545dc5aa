import json
import logging
import subprocess
import sys

import pytest

import gapruning as gp
from gapruning import cli


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "gapruning.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_train_writes_a_loadable_model_with_a_full_card(tmp_path):
    out = tmp_path / "tiny"
    assert (
        cli.main(
            [
                "train",
                "--model",
                "paoding_mlp",
                "--out",
                str(out),
                "--epochs",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    net = gp.load(out)
    card = net.card
    assert card["arch"] == "paoding_mlp" and card["dataset"] == "fashion-mnist"
    assert card["training"]["seed"] == 0 and card["training"]["recipe"]["epochs"] == 1
    assert "gapruning train --model paoding_mlp" in card["training"]["command"]
    assert 0.75 < card["test_accuracy"] < 1.0
    measured = gp.evaluate(net, gp.data.fashion_mnist("test"), attacks=())["accuracy"]
    assert measured == pytest.approx(card["test_accuracy"], abs=1e-9)


def test_eval_prints_json_metrics():
    r = run(
        "eval",
        "--model",
        "lenet300-fmnist",
        "--limit",
        "300",
        "--eps",
        "0.05",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    assert set(m) >= {"accuracy", "fgsm", "pgd", "robustness_preservation"}
    assert m["pgd"]["0.05"] <= m["accuracy"]


def test_eval_prints_a_table():
    r = run("eval", "--model", "lenet300-fmnist", "--limit", "200", "--attacks", "fgsm")
    assert r.returncode == 0 and "fgsm" in r.stdout and "clean" in r.stdout


def test_list_shows_architectures_and_shipped_models():
    r = run("list")
    assert r.returncode == 0
    for name in (
        "lenet300",
        "resnet56",
        "lenet300-fmnist",
        "ga",
        "random",
        "evosax:<Name>",
        "fidelity",
    ):
        assert name in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("eval", "--model", "nope"), "no model 'nope'"),
        (("train", "--model", "alexnet", "--out", "x"), "unknown model 'alexnet'"),
        (("eval", "--model", "lenet300-fmnist", "--attacks", "cw"), "unknown attack"),
    ],
)
def test_bad_input_gives_one_clear_line(args, message):
    r = run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_missing_dataset_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("GAPRUNING_DATA", str(tmp_path))
    assert cli.main(["eval", "--model", "lenet300-fmnist"]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_debug_shows_the_traceback():
    r = run("--debug", "eval", "--model", "nope")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_eval_of_a_pruned_model_shows_its_dense_parent_beside_it(tmp_path, capsys):
    pruned = gp.prune("paoding_mlp-fmnist", "l1", 0.5, progress=False).pruned
    gp.save(pruned, tmp_path / "model")
    args = ["eval", "--model", str(tmp_path / "model"), "--limit", "200"]
    args += ["--attacks", "fgsm", "--eps", "0.05"]
    assert cli.main([*args, "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    test = gp.data.fashion_mnist("test")
    first = (test.images[:200], test.labels[:200])
    dense = gp.evaluate(gp.load("paoding_mlp-fmnist"), first, attacks=())
    assert m["dense"]["accuracy"] == dense["accuracy"]
    assert m["accuracy"] == gp.evaluate(pruned, first, attacks=())["accuracy"]
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "dense" in table and f"{dense['accuracy']:.4f}" in table
    assert cli.main([*args, "--json", "--no-dense"]) == 0
    assert "dense" not in json.loads(capsys.readouterr().out)


def test_prune_messages_are_printed_once_beside_a_root_handler(capsys):
    """Library INFO lines appear once on stderr during a prune, even when the root
    logger has a stderr handler of its own (importing orbax adds one), and not at
    all with messages off; the logger is left as it was."""
    from gapruning.cli.prune import messages_shown

    root = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(root)
    logger = logging.getLogger("gapruning.probes")
    try:
        with messages_shown(True):
            logger.info("making 4 probes")
        with messages_shown(False):
            logger.info("unseen")
    finally:
        logging.getLogger().removeHandler(root)
    assert capsys.readouterr().err.count("making 4 probes") == 1
    assert logging.getLogger("gapruning").propagate
