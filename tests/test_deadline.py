"""Time budgets: durations, the search stopping at its deadline, distillation sized
to the time left, and gp.prune / the CLI under a budget (bad budgets named)."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fitness_nets import random_net

import gapruning as gp
from gapruning import recover, search
from gapruning.deadline import (
    Deadline,
    TimeBudgetError,
    parse_duration,
    stop_before_scan,
)
from gapruning.encoding import Budget, UnitEncoding
from gapruning.models import GraphBuilder

pytestmark = pytest.mark.usefixtures("no_datasets")


SIZES = dict(generations=4, population=4, num_probes=32, progress=False)


def tiny_mlp() -> gp.Pretrained:
    """6 -> 8 -> 6 -> 4 ReLU MLP with random weights."""
    g = GraphBuilder((6,))
    x = g.relu(g.dense(g.input, 8, name="fc1"), name="r1")
    x = g.relu(g.dense(x, 6, name="fc2"), name="r2")
    net = random_net(g.build(g.dense(x, 4, name="out")), 0)
    return gp.Pretrained(net, {"name": "mlp", "input": {"box": [-1.0, 1.0]}})


@pytest.mark.parametrize(
    "text, seconds",
    [("900", 900), ("90s", 90), ("30m", 1800), (" 2 min ", 120), ("1.5h", 5400)],
)
def test_durations_are_read_in_seconds(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["abc", "-5", "0", "5d", "", "0s"])
def test_bad_durations_are_named(text):
    with pytest.raises(TimeBudgetError, match="duration|positive"):
        parse_duration(text)


@pytest.mark.parametrize("budget", [0, -1.0, float("nan"), float("inf"), "soon"])
def test_prune_refuses_a_bad_time_budget_before_any_work(budget):
    with pytest.raises(ValueError, match="time_budget must be a positive number"):
        gp.prune(tiny_mlp(), target=0.5, time_budget=budget)


def test_stop_before_scan_reads_the_clock_and_the_last_scan():
    """No deadline never stops; a scan that would end past it stops the search;
    a deadline passed before the first generation is an error."""
    now = time.perf_counter()
    assert not stop_before_scan(None, 0, 1e9)
    assert not stop_before_scan(now + 100, 3, 1.0)
    assert stop_before_scan(now + 100, 3, 200.0)
    with pytest.raises(TimeBudgetError, match="before its first generation"):
        stop_before_scan(now - 1, 0, 0.0)
    clock = Deadline(10.0, start=now)
    assert clock.at(0.5) == now + 5 and 9 < clock.remaining() <= 10


def planted_problem():
    space = gp.PruneSpace(gp.models.build("paoding_mlp"))
    enc = UnitEncoding(space, Budget("units", 0.75))
    target = jnp.asarray(enc.encode(enc.decode(np.arange(space.num_units) % 7)))

    def fitness(masks):
        return jnp.abs(space.flat(masks).astype(jnp.float32) - target).sum(-1)

    kept = lambda m: space.flat(m).astype(jnp.float32).mean()  # noqa: E731
    return enc, search.Problem(enc.decode, fitness, kept, enc.encode)


def test_the_search_stops_at_its_deadline_with_the_generations_it_ran():
    """Scans that take 0.3 s (a slow callback) against a deadline 0.5 s away:
    the search stops after one or two scans, counts only the generations run and
    leaves the rest of the history NaN; without a deadline it runs them all."""
    enc, problem = planted_problem()
    strategy = search.make_strategy("ga", 8, enc.num_genes)
    key = jax.random.PRNGKey(0)
    slow = lambda state: time.sleep(0.3)  # noqa: E731
    full = search.run(strategy, problem, key, 12, generations_per_scan=2)
    assert full.generations == 12 and full.evaluations == 8 + 12 * 8
    cut = search.run(
        strategy,
        problem,
        key,
        12,
        generations_per_scan=2,
        callback=slow,
        deadline=time.perf_counter() + 0.5,
    )
    assert cut.generations in (2, 4)
    assert cut.evaluations == 8 + cut.generations * 8
    best = cut.history["best"]
    assert np.isfinite(best[: cut.generations]).all()
    assert np.isnan(best[cut.generations :]).all()
    np.testing.assert_array_equal(
        best[: cut.generations], full.history["best"][: cut.generations]
    )
    with pytest.raises(TimeBudgetError, match="first generation"):
        search.run(strategy, problem, key, 4, deadline=time.perf_counter() - 1)


def test_distill_trains_for_the_steps_its_time_budget_fits():
    """With ``time_budget`` the card records the budget and the steps trained
    (at least one, at most ``steps`` when given); a budget that fits no step is
    refused naming the pace."""
    net = tiny_mlp()
    masks = {"fc1": np.arange(8) % 2 == 0, "fc2": np.ones(6, bool)}
    small = gp.compact(net, masks)
    options = dict(probes="gaussian", num_probes=64, batch_size=32, adversarial=0)
    student = recover.distill(small, net, time_budget=8.0, **options)
    card = student.card["distill"]
    assert card["time_budget"] == 8.0 and card["steps"] >= 1
    capped = recover.distill(small, net, time_budget=60.0, steps=3, **options)
    assert capped.card["distill"]["steps"] == 3
    with pytest.raises(recover.RecoverError, match="fits no distillation step"):
        recover.distill(small, net, time_budget=1e-6, **options)
    with pytest.raises(recover.RecoverError, match="positive number"):
        recover.distill(small, net, time_budget=-3, **options)


def test_prune_under_a_time_budget_distills_in_the_time_left():
    """A generous budget: the whole search runs, then the default recovery
    repairs and distills within the time left, at most the steps given (the card
    records the budget it had); the settings keep the budget."""
    result = gp.prune(
        tiny_mlp(),
        target=0.5,
        time_budget=60.0,
        recover_options={"distill": {"steps": 2}},
        **SIZES,
    )
    assert result.search.details["generations"] == 4
    distill = result.pruned.card["distill"]
    assert 0 < distill["time_budget"] < 60.0 and distill["steps"] == 2
    assert result.pruned.card["repair"]["method"] == "lstsq"
    assert result.settings["time_budget"] == 60.0


def test_cli_time_budget(tmp_path, capsys):
    """--time-budget: recorded in the report; too small for one generation, one
    line and no run directory left; an unreadable duration is named."""
    from gapruning import cli, zoo

    zoo.save(tiny_mlp(), tmp_path / "mlp")
    base = ["prune", "--model", str(tmp_path / "mlp"), "--target", "0.5", "--quiet"]
    base += ["--generations", "4", "--population", "4", "--num-probes", "32"]
    base += ["--probes", "gaussian", "--distill-steps", "2"]
    out = tmp_path / "run"
    assert cli.main([*base, "--time-budget", "1m", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["time_budget"] == 60.0
    assert gp.load(out / "model").card["distill"]["time_budget"] < 60.0
    capsys.readouterr()
    late = tmp_path / "late"
    assert cli.main([*base, "--time-budget", "0.001", "--out", str(late)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "spent before its first generation" in err[0]
    assert not late.exists()
    with pytest.raises(SystemExit):
        cli.main([*base, "--time-budget", "soon", "--out", str(late)])
    assert "cannot read the duration 'soon'" in capsys.readouterr().err


def test_distill_fits_its_steps_again_at_the_loops_own_pace(monkeypatch):
    """When the trial steps promise far more steps than the loop can run (here
    100,000 in 3 s), the refit at step REFIT_AT cuts the run to what fits."""
    from gapruning.recover import distillation

    monkeypatch.setattr(distillation, "steps_within", lambda *args: 100_000)
    net = tiny_mlp()
    masks = {"fc1": np.arange(8) % 2 == 0, "fc2": np.ones(6, bool)}
    options = dict(probes="gaussian", num_probes=64, batch_size=32, adversarial=0)
    student = recover.distill(gp.compact(net, masks), net, time_budget=3.0, **options)
    assert distillation.REFIT_AT <= student.card["distill"]["steps"] < 100_000
