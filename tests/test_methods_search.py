"""ga_scores, profile_random, profile_rl and gwcs on a tiny conv net: budgets,
determinism, no data read, profile transfer, sparsify, GA operators by hand."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fitness_nets import tiny_bn

import gapruning as gp
from gapruning.compact import sparsify
from gapruning.methods import profile as profile_lib
from gapruning.search import score_ga

KW = dict(fitness="fidelity", num_probes=16, progress=False)


@pytest.fixture(scope="module")
def net():
    return tiny_bn(0)


def _prune(net, name, seed=0, target=0.5, **opts):
    return gp.prune(
        net,
        name,
        target,
        generations=4,
        population=4,
        seed=seed,
        strategy_options=opts,
        **KW,
    )


# ------------------------------------------------------------------ operators


def test_roulette_probabilities_by_hand():
    g = jnp.array([1.0, 2.0, 0.0, 1.0])
    np.testing.assert_allclose(
        score_ga.roulette_probabilities(g, 1.0), [0.25, 0.5, 0, 0.25]
    )
    np.testing.assert_allclose(
        score_ga.roulette_probabilities(g, 2.0), [1 / 6, 4 / 6, 0, 1 / 6], rtol=1e-6
    )
    np.testing.assert_allclose(
        score_ga.goodness(jnp.array([0.0, 1.0, jnp.inf]), "inverse"), [1, 0.5, 0]
    )
    np.testing.assert_allclose(
        score_ga.goodness(jnp.array([0.1, 0.3]), "complement"), [0.9, 0.7]
    )


def test_layer_crossover_and_mutation_by_hand():
    a = jnp.array([1.0, 2, 3, 4, 5])
    b = -a
    # two layers: sizes 3 and 2; cuts 1 and 2
    layer_of = jnp.array([0, 0, 0, 1, 1])
    position = jnp.array([0, 1, 2, 0, 1])
    c1, c2 = score_ga.layer_crossover(a, b, jnp.array([1, 2]), layer_of, position)
    np.testing.assert_array_equal(c1, [-1, 2, 3, -4, -5])
    np.testing.assert_array_equal(c2, [1, -2, -3, 4, 5])
    m = score_ga.mutate(a, jnp.array([True, False, False, False, True]), jnp.zeros(5))
    np.testing.assert_array_equal(m, [0, 2, 3, 4, 0])
    sched = ((0.8, 0.1), (0.9, 0.01))
    assert float(score_ga.scheduled_rate(0.5, 0.15, sched)) == pytest.approx(0.15)
    assert float(score_ga.scheduled_rate(0.85, 0.15, sched)) == pytest.approx(0.1)
    assert float(score_ga.scheduled_rate(0.95, 0.15, sched)) == pytest.approx(0.01)


def test_score_ga_kaiming_start_and_elites():
    algo = score_ga.ScoreGA(6, [4, 2], [16, 4], elitism=0.5)
    state = algo.init(jax.random.key(0), algo.default_params)
    pop = np.asarray(state.population)
    assert np.abs(pop[:, :4]).max() <= 0.25 and np.abs(pop[:, 4:]).max() <= 0.5
    fitness = jnp.arange(6.0)[::-1]
    state, _ = algo.tell(
        jax.random.key(1), state.population, fitness, state, algo.default_params
    )
    children, _ = algo.ask(jax.random.key(2), state, algo.default_params)
    # the 3 best (lowest fitness: last rows) come first, unchanged
    np.testing.assert_array_equal(children[:3], pop[[5, 4, 3]])


# ------------------------------------------------------------------ ga_scores


def test_ga_scores_budget_determinism_sparsify(no_datasets, net):
    r = _prune(net, "ga_scores", elitism=0.2, power=2.0)
    for name, m in r.masks.items():
        assert m.shape == net.model.layers[name].kernel[...].shape
        assert m.sum() == round(0.5 * m.size)
    again = _prune(net, "ga_scores", elitism=0.2, power=2.0)
    for k in r.masks:
        np.testing.assert_array_equal(r.masks[k], again.masks[k])
    x = jax.random.normal(jax.random.key(3), (4, 12, 12, 1))
    np.testing.assert_allclose(
        r.pruned.model(x), gp.masked_apply(net, r.masks, x), rtol=1e-5, atol=1e-6
    )
    rep = r.report()
    kernels = sum(m.size for m in r.masks.values())
    assert rep["params"]["after"] <= rep["params"]["before"] - kernels // 2
    assert rep["flops"]["after"] == rep["flops"]["before"] // 2
    assert r.search.details["data_free"] is True
    assert r.search.evaluations == 16


def test_sparsify_equals_masked_apply(net):
    rng = np.random.default_rng(0)
    masks = {
        n: rng.random(net.model.layers[n].kernel[...].shape) < 0.3
        for n in ("c1", "c2", "out")
    }
    sparse = sparsify(net, masks)
    x = jax.random.normal(jax.random.key(0), (3, 12, 12, 1))
    np.testing.assert_allclose(
        sparse.model(x), gp.masked_apply(net, masks, x), rtol=1e-5, atol=1e-6
    )
    card = sparse.card["pruning"]
    assert card["kept_weights"] == {k: int(v.sum()) for k, v in masks.items()}
    assert card["nonzero_params"]["after"] < card["nonzero_params"]["before"]


# ------------------------------------------------------------------ profiles


@pytest.mark.parametrize("name", ["profile_random", "profile_rl"])
def test_profile_methods_budget_determinism_transfer(no_datasets, net, tmp_path, name):
    path = tmp_path / "profile.json"
    opts = (
        {"save_profile": str(path), "exhaustive": False}
        if name == "profile_random"
        else {"save_profile": str(path), "copies": 1}
    )
    r = _prune(net, name, **opts)
    assert sum(net.space.kept(r.masks).values()) == 5
    again = _prune(net, name, **opts)
    for k in r.masks:
        np.testing.assert_array_equal(r.masks[k], again.masks[k])
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(r.search.details["profile"]))
    # transfer to another model of the same architecture
    other = tiny_bn(1)
    t = _prune(other, name, profile=str(path))
    assert net.space.kept(t.masks) == net.space.kept(r.masks)
    assert t.search.evaluations == 0


def test_profile_mismatch_is_refused(net):
    masks = net.space.full_masks()
    prof = profile_lib.make_profile(
        net, masks, method="x", rule="l1", budget=gp.encoding.Budget()
    )
    other = gp.load("lenet300-fmnist")
    with pytest.raises(profile_lib.ProfileError, match="does not fit"):
        profile_lib.check_profile(other, prof)


def test_profile_random_exhaustive_grid(net):
    r = _prune(net, "profile_random")
    assert r.search.details["search"] == "exhaustive"
    assert r.search.details["grid_size"] == 16


# ------------------------------------------------------------------ gwcs


def test_gwcs_budget_determinism(no_datasets, net):
    opts = dict(stages=2, distill_steps=2, distill_options={"batch_size": 8})
    r = _prune(net, "gwcs", target=0.4, **opts)
    assert sum(net.space.kept(r.masks).values()) == 6
    assert r.search.details["stages"] == [["c1"], ["c2"]]
    again = _prune(net, "gwcs", target=0.4, **opts)
    for k in r.masks:
        np.testing.assert_array_equal(r.masks[k], again.masks[k])
    x = jax.random.normal(jax.random.key(0), (2, 12, 12, 1))
    assert np.all(np.isfinite(np.asarray(r.pruned.model(x))))
