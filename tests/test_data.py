import gzip

import numpy as np
import pytest

from gapruning import data


def _write_idx(path, array, gz=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_fashion_mnist_test_split_is_real_and_normalised():
    ds = data.fashion_mnist("test")
    assert ds.images.shape == (10000, 28, 28, 1) and ds.images.dtype == np.float32
    assert ds.labels.shape == (10000,) and set(np.unique(ds.labels)) == set(range(10))
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert np.bincount(ds.labels).tolist() == [1000] * 10


def test_read_idx_round_trip(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "x-idx3-ubyte.gz", a)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "x-idx3-ubyte"), a)
    _write_idx(tmp_path / "y-idx1-ubyte", a[0, 0], gz=False)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "y-idx1-ubyte"), a[0, 0])


def test_missing_directory_says_how_to_install(tmp_path):
    with pytest.raises(data.DataError, match="apt-get install dataset-fashion-mnist"):
        data.fashion_mnist("test", root=tmp_path / "nowhere")


def test_missing_file_says_how_to_install(tmp_path):
    with pytest.raises(data.DataError, match="not found.*apt-get install"):
        data.fashion_mnist("test", root=tmp_path)


def test_env_variable_selects_the_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("GAPRUNING_DATA", str(tmp_path))
    with pytest.raises(data.DataError, match=str(tmp_path)):
        data.fashion_mnist("train")


def test_truncated_and_corrupt_files_are_named(tmp_path):
    images = np.zeros((10000, 28, 28), np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    raw = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(10000, np.uint8))
    with pytest.raises(data.DataError, match="t10k-images.*truncated"):
        data.fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(data.DataError, match="corrupt"):
        data.fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(b"not an idx file")
    )
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.fashion_mnist("test", root=tmp_path)


def test_wrong_shapes_are_refused(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28), np.uint8))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5, np.uint8))
    with pytest.raises(data.DataError, match="shapes"):
        data.fashion_mnist("test", root=tmp_path)


def test_unknown_split_and_dataset():
    with pytest.raises(ValueError, match="split"):
        data.fashion_mnist("validation")
    with pytest.raises(KeyError, match="fashion-mnist"):
        data.load_dataset("imagenet")
