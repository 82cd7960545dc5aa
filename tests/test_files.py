"""Files are replaced whole or not at all."""

import pytest

from gapruning.files import replaced_atomically, write_text_atomic


def test_write_text_atomic_replaces_and_creates_folders(tmp_path):
    path = tmp_path / "new" / "rows.json"
    write_text_atomic(path, "first")
    write_text_atomic(path, "second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["rows.json"]


def test_write_text_atomic_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text("old rows")
    # a lone surrogate fails to encode after the temporary file is opened
    with pytest.raises(UnicodeEncodeError):
        write_text_atomic(path, "new rows \ud800")
    assert path.read_text() == "old rows"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.json"]


def test_replaced_atomically_keeps_the_suffix_and_cleans_up_on_error(tmp_path):
    path = tmp_path / "fitness.png"
    path.write_bytes(b"old plot")
    with pytest.raises(RuntimeError, match="plot failed"):
        with replaced_atomically(path) as tmp:
            assert (tmp.parent, tmp.suffix) == (tmp_path, ".png")
            tmp.write_bytes(b"half a plot")
            raise RuntimeError("plot failed")
    assert path.read_bytes() == b"old plot"
    assert [p.name for p in tmp_path.iterdir()] == ["fitness.png"]
    with replaced_atomically(path) as tmp:
        tmp.write_bytes(b"new plot")
    assert path.read_bytes() == b"new plot"
    assert [p.name for p in tmp_path.iterdir()] == ["fitness.png"]
