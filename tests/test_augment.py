"""gapruning.augment: random shifts and flips, checked against a plain loop."""

import jax
import numpy as np
import pytest

from gapruning.augment import shift_flip


def _shifted(img, dy, dx, fill):
    """``img`` (HWC) moved down by ``dy`` and right by ``dx`` pixels, a loop."""
    h, w, _ = img.shape
    out = np.full_like(img, fill)
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[i, j] = img[i - dy, j - dx]
    return out


def test_each_image_is_one_shift_and_maybe_a_flip_of_its_input():
    """Every output image equals exactly one of the 25 shifts (each optionally
    mirrored) of its input, vacated pixels hold ``fill``, and over a large
    batch every shift and both flips occur."""
    x = np.asarray(jax.random.normal(jax.random.key(0), (1000, 7, 6, 2)))
    out = np.asarray(shift_flip(jax.random.key(1), x, shift=2, fill=-3.0))
    seen = set()
    for img, res in zip(x, out, strict=True):
        matches = [
            (dy, dx, flip)
            for dy in range(-2, 3)
            for dx in range(-2, 3)
            for flip in (False, True)
            if np.array_equal(
                res, (lambda s: s[:, ::-1] if flip else s)(_shifted(img, dy, dx, -3.0))
            )
        ]
        assert len(matches) == 1, matches
        seen.add(matches[0])
    assert len(seen) == 50


def test_shift_flip_rejects_non_image_batches():
    with pytest.raises(ValueError, match="NHWC"):
        shift_flip(jax.random.key(0), np.zeros((4, 784)))
