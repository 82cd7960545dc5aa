"""Data-free means data-free: no path inside ``gp.prune`` takes a dataset or labels
(DESIGN.md). Checked three ways: the modules ``gapruning.prune`` imports never
import the dataset, evaluation or training modules; ``gp.prune`` has no option
that accepts labels and refuses labelled pairs given as probes; a default run
succeeds while every dataset reader raises."""

import ast
import dataclasses
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

import gapruning as gp
from gapruning.config import PruneConfig

ROOT = Path(gp.__file__).resolve().parent
# modules that read or use real data: evaluation and training only
DATA_MODULES = ("gapruning.data", "gapruning.evaluate", "gapruning.train")


def module_file(module: str) -> Path | None:
    path = ROOT.parent / module.replace(".", "/")
    if (path / "__init__.py").exists():
        return path / "__init__.py"
    return path.with_suffix(".py") if path.with_suffix(".py").exists() else None


def imported_modules(module: str) -> set[str]:
    """The ``gapruning`` modules ``module`` imports (relative or absolute)."""
    path = module_file(module)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            if node.level:
                base = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("gapruning") and module_file(m)}


def test_prune_imports_no_dataset_module():
    """Every module reachable from gapruning.prune by imports (the package root,
    which re-exports the whole public API, aside) is free of the data modules."""
    seen, todo, via = set(), ["gapruning.prune"], {}
    while todo:
        module = todo.pop()
        if module in seen or module == "gapruning":
            continue
        seen.add(module)
        for child in imported_modules(module):
            via.setdefault(child, module)
            todo.append(child)
    assert "gapruning.probes" in seen and "gapruning.fitness.compose" in seen
    for bad in DATA_MODULES:
        assert bad not in seen, f"gapruning.prune reaches {bad} via {via.get(bad)}"


def test_prune_has_no_option_for_labels_and_refuses_labelled_probes():
    names = {f.name for f in dataclasses.fields(PruneConfig)}
    for word in ("label", "dataset", "data", "train"):
        assert not any(word in n for n in names), names
    net = gp.load("lenet300-fmnist")
    x = np.zeros((8, 28, 28, 1), np.float32)
    y = np.zeros(8, np.int32)
    with pytest.raises(gp.probes.ProbeError):
        gp.prune(net, probes=(x, y), generations=1, population=4, progress=False)


def test_a_default_prune_opens_no_dataset(no_datasets):
    with pytest.raises(AssertionError, match="dataset was opened"):
        gp.data.fashion_mnist("test")  # the guard is active
    net = gp.load("lenet300-fmnist")
    result = gp.prune(
        net, target=0.5, generations=2, population=4, num_probes=8, progress=False
    )
    out = result.pruned.model(jnp.zeros((2, 28, 28, 1)))
    assert out.shape == (2, 10) and np.isfinite(np.asarray(out)).all()
