"""The code stays easy to enter: short functions and modules, no private names
imported across modules, a short README whose relative links (and those of docs/)
resolve, and the current JAX release allowed by the package's requirements."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gapruning"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 100
MAX_MODULE_LINES = 600
MAX_README_LINES = 250


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def test_no_function_is_longer_than_a_screenful():
    long = [
        f"{_rel(path)}:{node.lineno} {node.name} ({n} lines)"
        for path in MODULES
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and (n := node.end_lineno - node.lineno + 1) > MAX_FUNCTION_LINES
    ]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_module_is_too_long():
    long = [
        f"{_rel(p)} ({n} lines)"
        for p in MODULES
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def _private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom):
            found += [
                f"{_rel(path)}:{node.lineno} {a.name}"
                for a in node.names
                if a.name.startswith("_") and not a.name.startswith("__")
            ]
        elif (  # module._name where module was imported
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
            and node.value.id in _imported_modules(path)
        ):
            found.append(f"{_rel(path)}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and (
            node.level or "gapruning" in str(node.module)
        ):
            names |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {
                a.asname or a.name for a in node.names if a.name.startswith("gapruning")
            }
    return names


def test_no_private_name_is_imported_across_modules():
    found = [hit for path in MODULES for hit in _private_imports(path)]
    assert not found, f"private names used from another module: {found}"


def test_the_checker_sees_a_private_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from . import forward\nfrom .x import _y\nforward._z(1)\n")
    hits = _private_imports(bad)
    assert [h.split(" ")[-1] for h in hits] == ["_y", "forward._z"]


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text().splitlines())
    assert n <= MAX_README_LINES, f"README.md has {n} lines"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _relative_links(page: Path) -> list[str]:
    return [
        link.split("#")[0]
        for link in LINK.findall(page.read_text())
        if not re.match(r"[a-z]+:", link) and not link.startswith("#")
    ]


PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: _rel(p))
def test_every_relative_link_resolves(page):
    missing = [
        link for link in _relative_links(page) if not (page.parent / link).exists()
    ]
    assert not missing, f"{_rel(page)} links to missing {missing}"


def test_docs_exist_and_the_readme_links_each_page():
    readme = (ROOT / "README.md").read_text()
    pages = sorted((ROOT / "docs").glob("*.md"))
    assert pages, "docs/ has no pages"
    unlinked = [p.name for p in pages if f"docs/{p.name}" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_current_jax_release_is_allowed():
    text = (ROOT / "pyproject.toml").read_text()
    spec = re.search(r'"jax([^"]*)"', text).group(1)
    upper = re.search(r"<\s*([\d.]+)", spec)
    assert upper is None or tuple(map(int, upper.group(1).split("."))) > (0, 12), spec
