"""A long ``gapruning prune`` survives SIGKILL: resumed runs equal an uninterrupted one.

The search runs in a subprocess with a checkpoint after every generation; the test
watches the checkpoint directory, kills the process (SIGKILL, no cleanup) twice at
different generations, damages the newest checkpoint once, and resumes with
``--resume`` until the run completes. Masks, the fitness history and the pruned
weights must equal those of a run that was never interrupted.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import gapruning as gp

GENERATIONS = 40
ARGS = (
    "--model",
    "paoding_mlp-fmnist",
    "--target",
    "0.6",
    "--fitness",
    "fidelity",
    "--probes",
    "gaussian",
    "--num-probes",
    "32",
    "--population",
    "8",
    "--generations",
    str(GENERATIONS),
    "--chunk",
    "1",
    "--checkpoint-every",
    "1",
    "--seed",
    "5",
    "--quiet",
)


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "gapruning.cli", "prune", *ARGS, "--out", str(out)]


def _steps(out: Path) -> list[int]:
    steps = out / "checkpoints" / "steps"
    if not steps.is_dir():
        return []
    return sorted(int(p.name) for p in steps.iterdir() if p.name.isdigit())


def _kill_after(cmd: list[str], step: int, timeout: float = 600) -> int:
    """Starts ``cmd``, SIGKILLs it once a checkpoint of generation >= ``step``
    exists; returns the newest step seen."""
    out = Path(cmd[cmd.index("--out") + 1])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            seen = _steps(out)
            if seen and seen[-1] >= step:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=60)
                return seen[-1]
            if proc.poll() is not None:
                pytest.fail(
                    f"the run ended (rc {proc.returncode}) before generation {step}: "
                    + proc.stderr.read().decode()[-2000:]
                )
            time.sleep(0.05)
        pytest.fail(f"no checkpoint of generation {step} within {timeout} s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def _finish(cmd: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _weights(run: Path) -> dict:
    net = gp.load(run / "model")
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(net.model)))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _damage(step_dir: Path) -> None:
    """Overwrites every file of a checkpoint step with garbage (a torn write)."""
    files = [f for f in step_dir.rglob("*") if f.is_file()]
    assert files
    for f in files:
        f.write_bytes(os.urandom(37))


def test_sigkill_twice_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    _finish(_cmd(reference))

    first = _kill_after(_cmd(killed), 6)
    assert first < GENERATIONS
    assert not (killed / "report.json").exists()
    second = _kill_after([*_cmd(killed), "--resume"], first + 10)
    assert first < second < GENERATIONS, (first, second)
    assert not (killed / "report.json").exists()

    # a torn newest checkpoint: detected, the previous one used, with a warning
    steps = _steps(killed)
    assert len(steps) >= 2, steps
    _damage(killed / "checkpoints" / "steps" / str(steps[-1]))
    r = _finish([*_cmd(killed), "--resume"])
    assert f"checkpoint step {steps[-1]}" in r.stderr and "unreadable" in r.stderr
    assert "Traceback" not in r.stderr

    for name in ("masks.json", "history.json"):
        a = json.loads((reference / name).read_text())
        b = json.loads((killed / name).read_text())
        assert a == b, name
    history = json.loads((reference / "history.json").read_text())
    assert len(history["best_so_far"]) == GENERATIONS
    assert all(v is not None for v in history["best_so_far"])
    wa, wb = _weights(reference), _weights(killed)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)
    ra = json.loads((reference / "report.json").read_text())
    rb = json.loads((killed / "report.json").read_text())
    assert ra["fitness"] == rb["fitness"] and ra["params"] == rb["params"]
    assert ra["groups"] == rb["groups"]


def test_resume_of_a_different_run_is_refused(tmp_path):
    out = tmp_path / "run"
    _kill_after(_cmd(out), 2)
    cmd = [*_cmd(out), "--resume"]
    cmd[cmd.index("--seed") + 1] = "6"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "holds a different run: seed is 5 there but 6 now" in lines[0]
    assert _steps(out), "the refused resume must not touch the checkpoints"
