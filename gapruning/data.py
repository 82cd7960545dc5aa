"""Real datasets, for training the shipped weights and for evaluation only.

Nothing in ``gapruning.prune`` may call this module: pruning is data-free.
Fashion-MNIST is read from the IDX files of Debian's ``dataset-fashion-mnist``
package; nothing is ever downloaded.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = (
    "install it with `apt-get install dataset-fashion-mnist` (Debian), or point "
    "GAPRUNING_DATA (or the `root` argument) at a directory holding the IDX files"
)
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 60000),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 10000),
}


class DataError(RuntimeError):
    """A dataset file is missing or unreadable."""


class Dataset(NamedTuple):
    """Images as float32 in [0, 1] with shape (N, H, W, C), labels as int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray
    name: str = ""


def _open(path: Path):
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            raw = candidate.read_bytes()
            if candidate.suffix == ".gz":
                try:
                    raw = gzip.decompress(raw)
                except (OSError, EOFError) as err:
                    raise DataError(
                        f"{candidate} is corrupt ({err}); {INSTALL_HINT}"
                    ) from None
            return candidate, raw
    raise DataError(f"Fashion-MNIST file {path}(.gz) not found; {INSTALL_HINT}")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzipped) of unsigned bytes into an array."""
    where, raw = _open(Path(path))
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{where} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{where} is truncated (header)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(
            f"{where} is truncated or corrupt: {len(raw)} bytes, "
            f"expected {expected} for shape {dims}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def fashion_mnist(
    split: str = "test", root: str | os.PathLike | None = None
) -> Dataset:
    """Fashion-MNIST ``split`` ("train" or "test") as a :class:`Dataset`.

    The directory is ``root``, else ``$GAPRUNING_DATA``, else
    ``/usr/share/datasets/fashion-mnist``.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = Path(root or os.environ.get("GAPRUNING_DATA") or DEFAULT_FASHION_MNIST_DIR)
    if not base.is_dir():
        raise DataError(
            f"Fashion-MNIST directory {base} does not exist; {INSTALL_HINT}"
        )
    img_file, lbl_file, count = _FILES[split]
    images = read_idx(base / img_file)
    labels = read_idx(base / lbl_file)
    if images.shape != (count, 28, 28) or labels.shape != (count,):
        raise DataError(
            f"Fashion-MNIST {split} files in {base} have shapes "
            f"{images.shape} and {labels.shape}, expected ({count}, 28, 28)"
        )
    if labels.max() > 9:
        raise DataError(f"Fashion-MNIST labels in {base / lbl_file} exceed 9")
    x = (images.astype(np.float32) / 255.0)[..., None]
    return Dataset(x, labels.astype(np.int32), f"fashion-mnist/{split}")


DATASETS = {"fashion-mnist": fashion_mnist}


def load_dataset(name: str, split: str = "test") -> Dataset:
    """A dataset from :data:`DATASETS` by name."""
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name](split)
