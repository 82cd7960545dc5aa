"""The README's commands, and the examples in it and in docs/, are true."""

import argparse
import re
from pathlib import Path

import pytest

from gapruning import models

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# The documentation as a whole: the README, then every docs/ page. Checks about
# what the documentation covers read DOCS; the first two commands, which CI
# runs, stay in README.md.
DOCS = "\n".join(
    [README, *(page.read_text() for page in sorted((ROOT / "docs").glob("*.md")))]
)


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
        for b in re.findall(r"```python\n(.*?)```", DOCS, re.S)
        if "register_model" in b
    )
    namespace = {}
    try:
        exec(compile(block, "docs", "exec"), namespace)
        net = namespace["net"]
        assert set(net.masks) == {"conv1"}
    finally:
        models.MODELS.pop("tiny_cnn", None)


TESTED = "<!-- runs in tests/test_readme.py -->\n```python\n(.*?)```"


def _tested_blocks():
    return re.findall(TESTED, DOCS, re.S)


def test_readme_has_tested_examples_for_the_api_and_every_extension():
    blocks = _tested_blocks()
    for needle in (
        "gp.prune(",
        "register_strategy",
        "register_metric",
        "register_model",
    ):
        assert any(needle in b for b in blocks), needle


def test_readme_sections_cover_every_cli_command():
    from gapruning import cli

    parser = cli.build_parser()
    commands = next(
        a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    for name in commands:
        assert f"### `gapruning {name}" in DOCS, name
    for heading in ("## Python API", "## Command line", "## Extending"):
        assert heading in DOCS


@pytest.mark.parametrize("index", range(len(_tested_blocks())))
def test_readme_example_runs(index, no_datasets):
    from gapruning import fitness, search

    registries = (search.STRATEGIES, fitness.METRICS, models.MODELS)
    before = [dict(r) for r in registries]
    try:
        exec(compile(_tested_blocks()[index], "docs", "exec"), {})
    finally:
        for registry, saved in zip(registries, before, strict=True):
            registry.clear()
            registry.update(saved)
