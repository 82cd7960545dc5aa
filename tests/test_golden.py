"""Golden results: short ``gp.prune`` runs whose masks, fitness and pruned outputs
were recorded before the pipeline restructure and must not change.

Regenerate (only when a change of results is intended and explained in the commit):
``GAPRUNING_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py``.
"""

import json
import os
from pathlib import Path

import jax
import numpy as np
import pytest

import gapruning as gp

GOLDEN = Path(__file__).parent / "golden" / "prune.json"
REGENERATE = os.environ.get("GAPRUNING_REGEN_GOLDEN") == "1"
SMALL = {"generations": 2, "population": 8, "num_probes": 32, "progress": False}

# name -> (model, gp.prune keyword arguments)
CASES = {
    "ga-units-fidelity": (
        "lenet300-fmnist",
        dict(strategy="ga", target=0.7, fitness="fidelity", probes="gaussian"),
    ),
    "ga-units-default": ("lenet300-fmnist", dict(strategy="ga", target=0.7)),
    "random-params": (
        "paoding_mlp-fmnist",
        dict(strategy="random", target=0.5, budget="params"),
    ),
    "ga-flops-lenet5": (
        "lenet5-fmnist",
        dict(strategy="ga", target=0.5, budget="flops"),
    ),
    "ga-flops-resnet20": (
        "resnet20-fmnist",
        dict(strategy="ga", target=0.5, budget="flops", population=4, num_probes=8),
    ),
    "ga-profile": (
        "lenet300-fmnist",
        dict(strategy="evosax:CMA_ES", target=0.5, encoding="profile"),
    ),
    "simplega-units": ("lenet300-fmnist", dict(strategy="evosax:SimpleGA", target=0.6)),
    "ga-per-group-noinit": (
        "lenet300-fmnist",
        dict(strategy="ga", target=0.6, per_group=True, init=None, seed=3),
    ),
    "ga-repair-lstsq": (
        "lenet300-fmnist",
        dict(strategy="ga", target=0.7, repair="lstsq"),
    ),
    "ga-recover-merge-distill": (
        "lenet300-fmnist",
        dict(
            strategy="ga",
            target=0.7,
            recover=("merge", "distill"),
            recover_options={"distill": {"steps": 3, "batch_size": 16}},
        ),
    ),
    "l1": ("lenet300-fmnist", dict(strategy="l1", target=0.5)),
    "l2_out-flops": (
        "lenet5-fmnist",
        dict(strategy="l2_out", target=0.5, budget="flops"),
    ),
    "synflow": ("lenet300-fmnist", dict(strategy="synflow", target=0.5)),
    "random_mask": (
        "lenet300-fmnist",
        dict(strategy="random_mask", target=0.5, seed=2),
    ),
    "neuron_merging": ("lenet300-fmnist", dict(strategy="neuron_merging", target=0.5)),
    "paoding": ("paoding_mlp-fmnist", dict(strategy="paoding", target=0.5)),
    "profile_random": ("lenet300-fmnist", dict(strategy="profile_random", target=0.5)),
    "profile_rl": ("lenet300-fmnist", dict(strategy="profile_rl", target=0.5)),
    "gwcs": (
        "lenet300-fmnist",
        dict(
            strategy="gwcs",
            target=0.5,
            strategy_options={"stages": 2, "distill_steps": 3},
        ),
    ),
    "ga_scores": ("lenet300-fmnist", dict(strategy="ga_scores", target=0.5)),
}


def _bits(mask) -> str:
    return np.packbits(np.asarray(mask, bool).ravel()).tobytes().hex()


def _run(model: str, kwargs: dict) -> dict:
    result = gp.prune(gp.load(model), **{**SMALL, **kwargs})
    x = jax.random.uniform(jax.random.key(7), (4, *result.net.input_shape))
    best = result.search.best_fitness
    return {
        "masks": {k: _bits(v) for k, v in sorted(result.masks.items())},
        "best_fitness": None if best is None else float(best),
        "history_best": [float(v) for v in result.history.get("best", [])],
        "outputs": np.asarray(result.pruned.model(x), np.float64).round(6).tolist(),
        "params_after": int(gp.param_count(result.pruned)),
    }


def _recorded() -> dict:
    return json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}


@pytest.mark.parametrize("name", sorted(CASES))
def test_prune_results_match_the_recorded_ones(name):
    got = _run(*CASES[name])
    if REGENERATE:
        recorded = _recorded()
        recorded[name] = got
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        return
    want = _recorded()[name]
    assert got["masks"] == want["masks"]
    assert got["params_after"] == want["params_after"]
    if want["best_fitness"] is None:
        assert got["best_fitness"] is None
    else:
        assert got["best_fitness"] == pytest.approx(want["best_fitness"], rel=1e-5)
    np.testing.assert_allclose(got["history_best"], want["history_best"], rtol=1e-5)
    np.testing.assert_allclose(got["outputs"], want["outputs"], rtol=1e-4, atol=1e-4)
