import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gapruning as gp
from gapruning import cli


@pytest.fixture(scope="module")
def lenet300():
    return gp.load("lenet300-fmnist")


def _kl_fitness(net, n=64):
    """A small self-contained data-free fitness (KL to the dense model on noise)."""
    lo, hi = net.input_box
    x = jax.random.uniform(
        jax.random.key(0), (n, *net.input_shape), minval=lo, maxval=hi
    )
    dense = jax.nn.log_softmax(net.model(x))

    def kl(masks):
        out = jax.nn.log_softmax(gp.population_apply(net, masks, x))
        return (jnp.exp(dense) * (dense - out)).sum(-1).mean(-1)

    return kl


@pytest.mark.parametrize(
    "budget, target", [("units", 0.7), ("params", 0.5), ("flops", 0.6)]
)
def test_prune_meets_the_budget_and_compacts(lenet300, budget, target):
    result = gp.prune(
        lenet300,
        "ga",
        target,
        budget,
        fitness=_kl_fitness(lenet300),
        generations=4,
        population=8,
        progress=False,
        recover=(),  # compaction alone: the outputs of the masked network
    )
    space = lenet300.space
    kept = {
        "units": sum(space.kept(result.masks).values()) / space.num_units,
        "params": space.params(result.masks) / space.dense_params,
        "flops": space.flops(result.masks) / space.dense_flops,
    }[budget]
    if budget == "units":
        assert kept == pytest.approx(1 - target, abs=1 / space.num_units)
    else:
        assert 1 - target - 0.01 < kept <= 1 - target
    assert gp.param_count(result.pruned) == space.params(result.masks)
    x = jax.random.normal(jax.random.key(1), (5, 28, 28, 1))
    np.testing.assert_allclose(
        result.pruned.model(x), gp.masked_apply(lenet300, result.masks, x), atol=1e-5
    )
    assert len(result.history["best"]) == 4
    report = result.report()
    assert report["params"]["after"] == gp.param_count(result.pruned)
    assert json.loads(json.dumps(report)) == report


def test_prune_is_reproducible_and_seed_dependent(lenet300):
    fit = _kl_fitness(lenet300)

    def run(seed, init="l1"):
        return gp.prune(
            lenet300,
            "ga",
            0.7,
            fitness=fit,
            generations=3,
            population=8,
            progress=False,
            seed=seed,
            init=init,
        )

    a, b, c = run(1), run(1), run(2, init=None)
    for g in a.masks:
        np.testing.assert_array_equal(a.masks[g], b.masks[g])
    assert any(not np.array_equal(a.masks[g], c.masks[g]) for g in a.masks)


def test_profile_encoding_with_an_evosax_strategy(lenet300):
    result = gp.prune(
        lenet300,
        "evosax:CMA_ES",
        0.5,
        fitness=_kl_fitness(lenet300),
        generations=3,
        population=8,
        progress=False,
        encoding="profile",
    )
    assert sum(lenet300.space.kept(result.masks).values()) == 200


def test_prune_with_the_default_data_free_fitness_never_reads_data(
    no_datasets, lenet300
):
    result = gp.prune(
        lenet300,
        "ga",
        0.5,
        generations=2,
        population=4,
        num_probes=32,
        progress=False,
        per_group=True,
    )
    assert result.pruned.model.layers["fc1"].kernel[...].shape == (784, 150)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"strategy": "simulated_annealing"}, "unknown strategy"),
        ({"target": 1.2}, "strictly between 0 and 1"),
        ({"target": 0.0}, "strictly between 0 and 1"),
        ({"population": 1}, "population must be at least 2"),
        ({"generations": 0}, "generations must be at least 1"),
        ({"budget": "bytes"}, "unknown budget"),
        ({"encoding": "profile", "strategy": "ga"}, "use encoding='units'"),
        ({"resume": True}, "resume needs a checkpoint_dir"),
    ],
)
def test_bad_arguments_are_named(lenet300, kwargs, message):
    args = {
        "strategy": "ga",
        "target": 0.5,
        "generations": 2,
        "population": 4,
        "fitness": _kl_fitness(lenet300),
        "progress": False,
        **kwargs,
    }
    with pytest.raises((ValueError, KeyError), match=message):
        gp.prune(lenet300, **args)


def test_cli_prune_writes_a_readable_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "prune",
        "--model",
        "paoding_mlp-fmnist",
        "--target",
        "0.6",
        "--generations",
        "3",
        "--population",
        "4",
        "--num-probes",
        "32",
        "--out",
        str(out),
        "--quiet",
    ]
    assert cli.main(args) == 0
    for name in ("report.json", "report.md", "fitness.png", "profile.png"):
        assert (out / name).stat().st_size > 0
    report = json.loads((out / "report.json").read_text())
    assert report["units"] == {"before": 320, "after": 128}
    net = gp.load(out / "model")
    assert gp.param_count(net) == report["params"]["after"]
    # an existing run is not overwritten by accident
    assert cli.main(args) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert cli.main(["show", str(out)]) == 0
    assert "paoding_mlp-fmnist" in capsys.readouterr().out
