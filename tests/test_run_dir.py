"""Run directories a person can read: every file, the report's content, ``show``."""

import json

import jax.numpy as jnp

import gapruning as gp
from gapruning import cli
from gapruning.report import write_run


def _fitness(masks):
    return next(iter(masks.values())).sum(-1).astype(jnp.float32)


def test_run_directory_holds_a_readable_report(tmp_path, capsys):
    result = gp.prune(
        "paoding_mlp-fmnist",
        target=0.5,
        fitness=_fitness,
        generations=3,
        population=4,
        progress=False,
    )
    evaluation = {
        "accuracy": 0.81,
        "num_samples": 100,
        "fgsm": {0.05: 0.4},
        "robustness_preservation": {"fgsm": {0.05: 0.45}},
    }
    out = tmp_path / "run"
    write_run(result, out, extra={"evaluation": evaluation})
    for name in (
        "report.json",
        "report.md",
        "history.json",
        "masks.json",
        "fitness.png",
        "profile.png",
    ):
        assert (out / name).stat().st_size > 0, name
    assert (out / "model" / "model.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries
    md = (out / "report.md").read_text()
    for needle in (
        "paoding_mlp-fmnist",  # model
        "remove 50% of units",  # budget
        "Strategy `ga`",  # method
        "| params | 125,898 |",  # params before
        "| flops |",
        "| fc1 | dense | 128 |",  # per-layer kept units
        "Fitness: best",  # history summary
        "| fgsm | 0.05 | 0.4000 | 0.4500 |",  # evaluation table
    ):
        assert needle in md, needle
    history = json.loads((out / "history.json").read_text())
    assert len(history["best_so_far"]) == 3
    masks = json.loads((out / "masks.json").read_text())
    assert sum(len(v) for v in masks.values()) == 160
    assert cli.main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "paoding_mlp-fmnist" in shown and "fc1" in shown


def test_list_describes_models_strategies_and_metrics(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("lenet300", "paoding_mlp-fmnist", "ga", "random", "fidelity"):
        assert name in out, name
    assert "The binary GA" in out  # one-line descriptions
