import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gapruning as gp
from gapruning import search
from gapruning.encoding import (
    Budget,
    ProfileEncoding,
    UnitEncoding,
    WeightEncoding,
    kept_fraction_fn,
)
from gapruning.methods.ga_scores import kernel_kept_fraction_fn

CONTRACT = [
    *sorted(search.STRATEGIES),
    "evosax:SimpleGA",
    "evosax:CMA_ES",
    "evosax:DifferentialEvolution",
    "evosax:Open_ES",
]


@pytest.fixture(scope="module")
def planted():
    """A target-mask problem: fitness = Hamming distance to a planted mask that
    meets the budget (optimum 0)."""
    space = gp.PruneSpace(gp.models.build("paoding_mlp"))
    enc = UnitEncoding(space, Budget("units", 0.75))
    target = jnp.asarray(
        enc.encode(enc.decode(np.random.default_rng(0).normal(size=space.num_units)))
    )

    def fitness(masks):
        return jnp.abs(space.flat(masks).astype(jnp.float32) - target).sum(-1)

    problem = search.Problem(
        enc.decode,
        fitness,
        lambda m: space.flat(m).astype(jnp.float32).mean(),
        enc.encode,
    )
    return space, enc, problem


def _run(name, problem, enc, generations=12, chunk=4, seed=0, population=16):
    strategy = search.make_strategy(name, population, enc.num_genes)
    return search.run(
        strategy,
        problem,
        jax.random.PRNGKey(seed),
        generations,
        generations_per_scan=chunk,
    )


def _check_contract(make, problem, population=16, generations=12):
    """What every strategy meets, whatever its genome: best so far never worse,
    (P, genes) populations, a scan over chunks equal to a Python loop of single
    generations, the same result for the same seed. Returns the run's result."""
    result = search.run(
        make(), problem, jax.random.PRNGKey(0), generations, generations_per_scan=4
    )
    best = result.history["best_so_far"]
    assert np.all(np.diff(best) <= 0), "best fitness got worse"
    assert result.best_fitness == best[-1] <= result.history["best"].min()
    # scan over chunks == a Python loop of single generations
    strategy = make()
    state = search.engine.init(strategy, problem, jax.random.PRNGKey(0), generations)
    genomes, _ = strategy.ask(jax.random.PRNGKey(1), state.strategy_state)
    assert genomes.shape == (population, strategy.num_genes)
    one = jax.jit(lambda s: search.engine.step(strategy, problem, s))
    for _ in range(generations):
        state = one(state)
    np.testing.assert_array_equal(np.asarray(state.best_genome), result.best_genome)
    for k in search.engine.HISTORY_KEYS:
        np.testing.assert_allclose(
            np.asarray(state.history[k]), result.history[k], rtol=1e-6
        )
    # same seed, same result
    again = search.run(
        make(), problem, jax.random.PRNGKey(0), generations, generations_per_scan=4
    )
    np.testing.assert_array_equal(again.best_genome, result.best_genome)
    return result


@pytest.mark.parametrize("name", CONTRACT)
def test_strategy_contract(name, planted):
    space, enc, problem = planted
    result = _check_contract(
        lambda: search.make_strategy(name, 16, enc.num_genes), problem
    )
    # every generation's best individual met the budget exactly
    np.testing.assert_allclose(result.history["kept"], 80 / 320)
    assert sum(space.kept(result.best_masks).values()) == 80


def _small_mlp():
    g = gp.models.GraphBuilder((8,))
    h = g.relu(g.dense(g.input, 40, name="fc1"))
    h = g.relu(g.dense(h, 24, name="fc2"))
    return gp.models.Net(
        g.build(g.dense(h, 3, name="out")), rngs=__import__("flax").nnx.Rngs(0)
    )


def _hamming_to(target, flat):
    return lambda masks: jnp.abs(flat(masks) - target).sum(-1)


@pytest.fixture(scope="module")
def genome_problems():
    """genome kind -> (problem, num_genes, the kept fraction every decoded genome
    has): planted-mask problems for the strategies of GENOME_STRATEGIES."""
    model = _small_mlp()
    rng = np.random.default_rng(2)
    weights = WeightEncoding(model, keep=0.25)

    def kernels(masks):
        parts = [masks[n].reshape(*masks[n].shape[:-2], -1) for n in weights.layers]
        return jnp.concatenate(parts, -1).astype(jnp.float32)

    target = kernels(weights.decode(rng.normal(size=weights.num_genes)))
    by_weights = search.Problem(
        weights.decode, _hamming_to(target, kernels), kernel_kept_fraction_fn(weights)
    )
    space = gp.PruneSpace(model)
    budget = Budget("units", 0.5)
    profile = ProfileEncoding(model, space, budget)

    def units(masks):
        return space.flat(masks).astype(jnp.float32)

    target = units(profile.decode(rng.uniform(0.1, 1.0, profile.num_genes)))
    by_profile = search.Problem(
        profile.decode, _hamming_to(target, units), kept_fraction_fn(space, budget)
    )
    kept_weights = sum(weights.keep.values()) / weights.num_genes
    return {
        "weights": (by_weights, weights.num_genes, kept_weights),
        "profile": (by_profile, profile.num_genes, 0.5),
    }


@pytest.mark.parametrize("name", sorted(search.GENOME_STRATEGIES))
def test_genome_strategy_contract(name, genome_problems):
    factory = search.GENOME_STRATEGIES[name]
    kind = factory(16, 10).genome
    problem, num_genes, kept = genome_problems[kind]
    result = _check_contract(
        lambda: search.make_genome_strategy(name, 16, num_genes), problem
    )
    np.testing.assert_allclose(result.history["kept"], kept, rtol=1e-6)
    assert result.history["best_so_far"][-1] < result.history["best"][0]


def test_genome_strategies_are_not_prune_strategies():
    both = set(search.STRATEGIES) & set(search.GENOME_STRATEGIES)
    assert not both and not set(search.GENOME_STRATEGIES) & set(gp.methods.METHODS)
    for name, factory in search.GENOME_STRATEGIES.items():
        assert factory(4, 6).genome in search.GENOME_KINDS
        with pytest.raises(KeyError, match="unknown strategy"):
            search.make_strategy(name, 4, 6)
    for factory in search.STRATEGIES.values():
        assert factory(4, 6).genome in ("binary", "real")
    with pytest.raises(KeyError, match="profile_sampler, score_ga"):
        search.make_genome_strategy("ga", 4, 6)
    with pytest.raises(ValueError, match="unknown genome kind"):
        search.Strategy("x", None, None, genome="bits")


def test_score_ga_layers_must_cover_the_genome():
    strategy = search.make_genome_strategy("score_ga", 4, 6, layer_sizes=[2, 4])
    assert strategy.algorithm.layer_sizes == (2, 4)
    with pytest.raises(ValueError, match="sum to 5, not 6"):
        search.make_genome_strategy("score_ga", 4, 6, layer_sizes=[2, 3])


def test_binary_ga_solves_a_planted_mask():
    space = gp.PruneSpace(_small_mlp())
    enc = UnitEncoding(space, Budget("units", 0.5))
    target = jnp.asarray(
        enc.encode(enc.decode(np.random.default_rng(1).normal(size=space.num_units)))
    )

    def hamming(masks):
        return jnp.abs(space.flat(masks).astype(jnp.float32) - target).sum(-1)

    problem = search.Problem(enc.decode, hamming, lambda m: 0.5, enc.encode)
    result = _run("ga", problem, enc, generations=200, chunk=100, population=32)
    assert result.best_fitness == 0.0
    assert result.history["best_so_far"][0] >= 16


def test_ga_beats_random_search_on_the_planted_mask(planted):
    _, enc, problem = planted
    ga = _run("ga", problem, enc, generations=60, chunk=60)
    rnd = _run("random", problem, enc, generations=60, chunk=60)
    assert ga.best_fitness < rnd.best_fitness - 20


@pytest.mark.parametrize(
    "selection, crossover",
    [("rank", "one_point"), ("tournament", "two_point"), ("rank", "uniform")],
)
def test_ga_operators_all_make_progress(planted, selection, crossover):
    _, enc, problem = planted
    strategy = search.make_strategy(
        "ga", 16, enc.num_genes, selection=selection, crossover=crossover
    )
    result = search.run(
        strategy, problem, jax.random.PRNGKey(1), 40, generations_per_scan=40
    )
    assert result.best_fitness < result.history["best"][0] - 10


def test_nan_individuals_lose_and_the_run_continues(planted):
    space, enc, problem = planted

    def flaky(masks):
        f = problem.fitness(masks)
        return jnp.where(jnp.arange(f.shape[0]) % 2 == 0, jnp.nan, f)

    bad = search.Problem(enc.decode, flaky, problem.kept_fraction, enc.encode)
    result = _run("ga", bad, enc, generations=10)
    assert np.isfinite(result.best_fitness)
    assert np.all(np.isfinite(result.history["best"]))


def test_resume_after_interruption_equals_an_uninterrupted_run(planted, tmp_path):
    _, enc, problem = planted
    strategy = search.make_strategy("ga", 16, enc.num_genes)
    sig = {"test": "resume"}
    full = search.run(
        strategy, problem, jax.random.PRNGKey(3), 12, generations_per_scan=2
    )

    class Stop(Exception):
        pass

    calls = []

    def interrupt(state):
        calls.append(int(state.generation))
        if len(calls) == 3:
            raise Stop

    ck = search.Checkpointer(tmp_path / "ck", sig)
    with pytest.raises(Stop):
        search.run(
            strategy,
            problem,
            jax.random.PRNGKey(3),
            12,
            generations_per_scan=2,
            callback=interrupt,
            checkpointer=ck,
        )
    ck = search.Checkpointer(tmp_path / "ck", sig)
    resumed = search.run(
        strategy,
        problem,
        jax.random.PRNGKey(3),
        12,
        generations_per_scan=2,
        checkpointer=ck,
        resume=True,
    )
    np.testing.assert_array_equal(resumed.best_genome, full.best_genome)
    for k in search.engine.HISTORY_KEYS:
        np.testing.assert_array_equal(resumed.history[k], full.history[k])


def test_checkpoint_of_a_different_run_is_refused(tmp_path):
    search.Checkpointer(tmp_path, {"model": "lenet300-fmnist", "population": 16})
    with pytest.raises(
        ValueError, match="model is 'lenet300-fmnist' there but 'lenet5"
    ):
        search.Checkpointer(tmp_path, {"model": "lenet5-fmnist", "population": 16})


def test_unknown_strategy_lists_the_known_ones():
    with pytest.raises(KeyError, match="ga, random"):
        search.make_strategy("annealing", 8, 10)
    with pytest.raises(KeyError, match="CMA_ES"):
        search.make_strategy("evosax:NoSuchES", 8, 10)
    with pytest.raises(ValueError, match="at least 2"):
        search.make_strategy("ga", 1, 10)


def test_register_strategy_adds_a_user_strategy(planted):
    _, enc, problem = planted

    def greedy_random(population_size, num_genes):
        return search.make_strategy("random", population_size, num_genes)

    search.register_strategy("my_random", greedy_random)
    try:
        assert "my_random" in search.STRATEGIES
        result = _run("my_random", problem, enc, generations=4)
        assert np.isfinite(result.best_fitness)
    finally:
        del search.STRATEGIES["my_random"]


SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import gapruning as gp
    from gapruning import search
    from gapruning.encoding import Budget, UnitEncoding
    net = gp.load("lenet300-fmnist")
    x = jax.random.normal(jax.random.key(0), (32, 28, 28, 1))
    dense = jax.nn.log_softmax(net.model(x))
    def kl(masks):
        out = jax.nn.log_softmax(gp.population_apply(net, masks, x))
        return (jnp.exp(dense) * (dense - out)).sum(-1).mean(-1)
    try:
        r = gp.prune(net, "ga", 0.7, fitness=kl, generations=6,
                     population=int(sys.argv[1]), progress=False,
                     generations_per_scan=3)
    except ValueError as err:
        print(json.dumps({"error": str(err)})); raise SystemExit
    print(json.dumps({"devices": jax.device_count(), "fitness": r.search.best_fitness,
                      "history": r.history["best"].tolist(),
                      "masks": {k: v.astype(int).tolist()
                                for k, v in r.masks.items()}}))
""")


def _in_subprocess(devices, population):
    env = dict(
        os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"
    )
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(population)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_four_devices_equal_one_device():
    one, four = _in_subprocess(1, 8), _in_subprocess(4, 8)
    assert one["devices"] == 1 and four["devices"] == 4
    assert one["masks"] == four["masks"]
    assert one["fitness"] == pytest.approx(four["fitness"], rel=1e-6)
    np.testing.assert_allclose(one["history"], four["history"], rtol=1e-6)
    bad = _in_subprocess(4, 6)
    assert "not divisible by the 4 devices" in bad["error"]
