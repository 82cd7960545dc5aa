"""Bad input fails cleanly, through the API and the command line.

Every case: a non-zero exit (CLI status 2) or a ``ValueError``/``KeyError``/
``RuntimeError`` subclass (API), one line naming the problem, no traceback unless
``--debug``, and nothing half-written (the output directory is not created, or is
left as it was).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gapruning as gp
from gapruning import cli, search, zoo

FAST = settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
MODEL = "paoding_mlp-fmnist"
SMALL = ("--generations", "2", "--population", "4", "--num-probes", "16", "--quiet")


@pytest.fixture(scope="module")
def net():
    return gp.load(MODEL)


def _quick_fitness(masks):
    """A data-free stand-in fitness: fewer kept units in the first group is better."""
    return next(iter(masks.values())).sum(-1).astype(jnp.float32)


def _prune(net, **kwargs):
    args = {
        "strategy": "ga",
        "target": 0.5,
        "generations": 2,
        "population": 4,
        "fitness": _quick_fitness,
        "progress": False,
        **kwargs,
    }
    return gp.prune(net, **args)


def _cli(capsys, *args) -> tuple[int, str]:
    """Runs the CLI in-process; returns the exit status and stderr."""
    try:
        rc = cli.main(list(args))
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    return rc, capsys.readouterr().err


def _one_clear_line(rc, err, message):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert message in lines[0], err
    assert "Traceback" not in err


# ------------------------------------------------------------------ the API


@FAST
@given(
    target=st.one_of(
        st.floats(max_value=0.0),
        st.floats(min_value=1.0),
        st.just(float("nan")),
    )
)
def test_api_target_outside_the_open_interval(net, target):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        _prune(net, target=target)


@FAST
@given(population=st.integers(max_value=1))
def test_api_population_below_two(net, population):
    with pytest.raises(ValueError, match="population must be at least 2"):
        _prune(net, population=population)


@FAST
@given(generations=st.integers(max_value=0))
def test_api_generations_below_one(net, generations):
    with pytest.raises(ValueError, match="generations must be at least 1"):
        _prune(net, generations=generations)


@FAST
@given(num_probes=st.integers(max_value=0))
def test_api_zero_or_negative_probes(net, num_probes):
    with pytest.raises(ValueError, match="num_probes must be at least 1"):
        _prune(net, fitness="fidelity", num_probes=num_probes)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"strategy": "annealing"}, KeyError, "unknown strategy 'annealing'"),
        ({"fitness": "accuracy"}, ValueError, "unknown metric 'accuracy'"),
        ({"fitness": {"fidelity": "heavy"}}, ValueError, "must be a number"),
        ({"budget": "bytes"}, ValueError, "unknown budget"),
        ({"encoding": "bits"}, ValueError, "unknown encoding 'bits'"),
        ({"dtype": "int8"}, ValueError, "unknown dtype 'int8'"),
        ({"chunk": 0}, ValueError, "chunk must be at least 1"),
        ({"checkpoint_every": 0}, ValueError, "checkpoint_every must be at least 1"),
        ({"target": 0.999}, ValueError, "keeps 0 units, fewer than min_keep=1"),
        ({"target": 0.9999, "budget": "params"}, ValueError, "out of reach"),
        ({"population": 5, "devices": [None, None]}, ValueError, "not divisible"),
    ],
)
def test_api_bad_arguments_are_named(net, kwargs, error, message):
    with pytest.raises(error, match=message):
        _prune(net, **kwargs)


@pytest.mark.parametrize(
    "probes, message",
    [
        (np.zeros((8, 28, 28)), "shape"),
        (np.zeros((8, 14, 14, 1)), "shape"),
        (np.full((8, 28, 28, 1), np.nan), "NaN"),
        (np.zeros((0, 28, 28, 1)), "empty"),
        ("noise", "unknown probe kind 'noise'"),
    ],
)
def test_api_bad_probes_are_named(net, probes, message):
    with pytest.raises(ValueError, match=message):
        _prune(net, fitness="fidelity", probes=probes)


def test_api_model_with_nan_weights_is_refused(net):
    bad = zoo.Pretrained(nnx.clone(net.model), dict(net.card))
    k = bad.model.layers["fc2"].kernel
    k[...] = k[...].at[3, 4].set(jnp.nan)
    with pytest.raises(zoo.ModelFileError, match="fc2/kernel contains NaN or Inf"):
        _prune(bad)


def test_api_unknown_model_lists_the_shipped_ones():
    with pytest.raises(zoo.ModelFileError, match="no model 'lenet9'.*lenet300-fmnist"):
        gp.prune("lenet9", progress=False)


def test_api_checkpoint_dir_of_a_different_run_is_refused(net, tmp_path):
    search.Checkpointer(tmp_path / "ck", {"model": "lenet5-fmnist"})
    with pytest.raises(ValueError, match="ck holds a different run: "):
        _prune(net, checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "ck" / "steps" / "1").exists()


# ------------------------------------------------------------------ numerical safety


@pytest.mark.parametrize("bad", [jnp.nan, -jnp.inf, jnp.inf])
def test_nan_or_inf_individuals_score_inf_and_never_become_best(net, bad):
    """Individual 0 of every generation returns NaN/-Inf/Inf; with -Inf taken at
    face value it would always win."""
    from gapruning.encoding import Budget, UnitEncoding

    enc = UnitEncoding(net.space, Budget("units", 0.5))

    def fitness(masks):
        f = _quick_fitness(masks)
        return f.at[0].set(bad)

    problem = search.Problem(enc.decode, fitness, lambda m: jnp.float32(0.5))
    scores = problem.evaluate(jnp.zeros((4, enc.num_genes)))
    assert scores[0] == jnp.inf and bool(jnp.all(jnp.isfinite(scores[1:])))
    strategy = search.make_strategy("evosax:SimpleGA", 8, enc.num_genes)
    result = search.run(
        strategy, problem, jax.random.PRNGKey(0), 4, generations_per_scan=2
    )
    assert np.isfinite(result.best_fitness)
    assert np.all(np.isfinite(result.history["best_so_far"]))
    assert result.best_fitness == result.history["best_so_far"][-1]


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize(
    "args, message",
    [
        (("--model", "lenet9"), "no model 'lenet9'"),
        (("--strategy", "annealing"), "unknown strategy 'annealing'"),
        (("--fitness", "accuracy"), "unknown metric 'accuracy'"),
        (("--fitness", "{oops"), "--fitness is not valid JSON"),
        (("--target", "1.5"), "strictly between 0 and 1"),
        (("--target", "0"), "strictly between 0 and 1"),
        (("--target", "nan"), "strictly between 0 and 1"),
        (("--target", "0.999"), "keeps 0 units"),
        (("--population", "1"), "population must be at least 2"),
        (("--population", "four"), "invalid int value: 'four'"),
        (("--generations", "0"), "generations must be at least 1"),
        (("--num-probes", "0"), "num_probes must be at least 1"),
        (("--probes", "noise"), "unknown probe kind 'noise'"),
        (("--budget", "bytes"), "invalid choice: 'bytes'"),
        (("--dtype", "float16"), "invalid choice: 'float16'"),
        (("--chunk", "0"), "chunk must be at least 1"),
        (("--chunk-size", "many"), "--chunk-size takes a positive integer"),
        (("--chunk-size", "0"), "chunk_size must be positive"),
        (("--checkpoint-every", "-1"), "--checkpoint-every must be 0"),
    ],
)
def test_cli_bad_prune_arguments(capsys, tmp_path, args, message):
    out = tmp_path / "run"
    argv = ["prune", "--model", MODEL, *SMALL, "--out", str(out), *args]
    rc, err = _cli(capsys, *argv)
    _one_clear_line(rc, err, message)
    assert not out.exists(), "a failed run must leave nothing behind"


def test_cli_unwritable_output_directory(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    rc, err = _cli(
        capsys, "prune", "--model", MODEL, *SMALL, "--out", str(blocker / "run")
    )
    _one_clear_line(rc, err, f"cannot write to {blocker / 'run'}")
    rc, err = _cli(capsys, "prune", "--model", MODEL, *SMALL, "--out", str(blocker))
    _one_clear_line(rc, err, "exists and is not a directory")
    assert blocker.read_text() == "not a directory"
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        rc, err = _cli(capsys, "prune", "--model", MODEL, *SMALL, "--out", str(ro))
        _one_clear_line(rc, err, "cannot write to")


def test_cli_output_directory_holding_another_run_is_refused(capsys, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "report.json").write_text('{"model": "someone else"}')
    (out / "model").mkdir()
    rc, err = _cli(capsys, "prune", "--model", MODEL, *SMALL, "--out", str(out))
    _one_clear_line(rc, err, "already holds a run (use --overwrite")
    assert json.loads((out / "report.json").read_text()) == {"model": "someone else"}
    assert sorted(p.name for p in out.iterdir()) == ["model", "report.json"]


def _copy_model(tmp_path) -> Path:
    return Path(shutil.copytree(zoo.WEIGHTS_DIR / MODEL, tmp_path / "model"))


def _state_files(model_dir: Path) -> list[Path]:
    return sorted(f for f in (model_dir / "state").rglob("*") if f.is_file())


@pytest.mark.parametrize("damage", ["truncate", "random"])
def test_cli_corrupted_weights_file(capsys, tmp_path, damage):
    model = _copy_model(tmp_path)
    rng = np.random.default_rng(0)
    for f in _state_files(model):
        data = f.read_bytes()
        if damage == "truncate":
            f.write_bytes(data[: len(data) // 3])
        else:
            f.write_bytes(rng.bytes(max(len(data), 16)))
    out = tmp_path / "run"
    rc, err = _cli(capsys, "prune", "--model", str(model), *SMALL, "--out", str(out))
    _one_clear_line(rc, err, f"cannot read checkpoint {model / 'state'}")
    assert not out.exists()


def test_cli_corrupted_model_card(capsys, tmp_path):
    model = _copy_model(tmp_path)
    card = model / "model.json"
    card.write_text(card.read_text()[:100])
    rc, err = _cli(capsys, "eval", "--model", str(model))
    _one_clear_line(rc, err, "model.json is corrupt or incomplete")


def test_cli_model_with_nan_weights(capsys, tmp_path):
    net = gp.load(MODEL)
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text(
        (zoo.WEIGHTS_DIR / MODEL / "model.json").read_text()
    )
    b = net.model.layers["fc3"].bias
    b[...] = b[...].at[0].set(jnp.nan)
    # written through orbax directly: gp.save refuses NaN weights
    ckpt = zoo._checkpointer()
    ckpt.save((model / "state").absolute(), nnx.to_pure_dict(nnx.state(net.model)))
    ckpt.wait_until_finished()
    out = tmp_path / "run"
    rc, err = _cli(capsys, "prune", "--model", str(model), *SMALL, "--out", str(out))
    _one_clear_line(rc, err, "fc3/bias contains NaN or Inf")
    assert not out.exists()


def test_cli_resume_without_checkpoints_or_of_another_run(capsys, tmp_path):
    out = tmp_path / "run"
    search.Checkpointer(out / "checkpoints", {"model": "lenet5-fmnist"})
    rc, err = _cli(
        capsys, "prune", "--model", MODEL, *SMALL, "--out", str(out), "--resume"
    )
    _one_clear_line(rc, err, "holds a different run: ")
    assert (out / "checkpoints" / "search.json").is_file()


def test_cli_show_of_a_directory_without_a_run(capsys, tmp_path):
    rc, err = _cli(capsys, "show", str(tmp_path))
    _one_clear_line(rc, err, "not a gapruning run directory")


def _subprocess(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "gapruning.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_cli_population_not_divisible_by_devices(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    out = tmp_path / "run"
    r = _subprocess(
        "prune",
        "--model",
        MODEL,
        *SMALL,
        "--population",
        "5",
        "--out",
        str(out),
        env=env,
    )
    _one_clear_line(
        r.returncode, r.stderr, "population 5 is not divisible by the 2 devices"
    )
    assert not out.exists()


def test_cli_traceback_only_with_debug(tmp_path):
    args = ("prune", "--model", MODEL, *SMALL, "--target", "2", "--out")
    plain = _subprocess(*args, str(tmp_path / "a"))
    _one_clear_line(plain.returncode, plain.stderr, "strictly between 0 and 1")
    debug = _subprocess("--debug", *args, str(tmp_path / "b"))
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "strictly between 0 and 1" in debug.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
