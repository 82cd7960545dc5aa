"""The benchmarks' result files are replaced whole or not at all."""

import pytest
from conftest import load_benchmark


def test_write_text_atomic_replaces_and_creates_folders(tmp_path):
    write = load_benchmark("common").write_text_atomic
    path = tmp_path / "new" / "rows.json"
    write(path, "first")
    write(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.json"]


def test_write_text_atomic_failure_keeps_the_old_file(tmp_path):
    write = load_benchmark("common").write_text_atomic
    path = tmp_path / "rows.json"
    path.write_text("old rows")
    # a lone surrogate fails to encode after the temporary file is opened
    with pytest.raises(UnicodeEncodeError):
        write(path, "new rows \ud800")
    assert path.read_text() == "old rows"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]
