"""The README's commands and examples are true."""

import re
from pathlib import Path

from gapruning import models

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _bash_blocks():
    return re.findall(r"```bash\n(.*?)```", README, re.S)


def test_readme_starts_with_the_two_commands():
    main_cmd, test_cmd = (b.strip() for b in _bash_blocks()[:2])
    assert (
        "gapruning" in main_cmd
        and "apt-get install -y dataset-fashion-mnist" in main_cmd
    )
    assert "pytest" in test_cmd


def test_ci_runs_the_readme_test_command():
    test_cmd = _bash_blocks()[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines()


def test_adding_a_model_example_runs():
    block = next(
        b
        for b in re.findall(r"```python\n(.*?)```", README, re.S)
        if "register_model" in b
    )
    namespace = {}
    try:
        exec(compile(block, "README.md", "exec"), namespace)
        net = namespace["net"]
        assert set(net.masks) == {"conv1"}
    finally:
        models.MODELS.pop("tiny_cnn", None)
