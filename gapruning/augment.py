"""Label-preserving image augmentation: random shifts and horizontal flips.

The transforms the shipped convnets (LeNet-5, VGG-11, ResNet-20) were trained
with (:mod:`gapruning.train`), reused by :func:`gapruning.recover.distill` to
vary its probes from step to step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def shift_flip(key: jax.Array, x: jax.Array, shift: int = 2, fill: float = 0.0):
    """Each image of the NHWC batch ``x`` shifted by a random whole number of
    pixels in ``[-shift, shift]`` along each axis (vacated pixels set to
    ``fill``) and, with probability 1/2, mirrored left to right."""
    if x.ndim != 4:
        raise ValueError(f"shift_flip needs an NHWC batch, got shape {x.shape}")
    b, h, w, c = x.shape
    kshift, kflip = jax.random.split(key)
    padded = jnp.pad(
        x, ((0, 0), (shift, shift), (shift, shift), (0, 0)), constant_values=fill
    )
    offsets = jax.random.randint(kshift, (b, 2), 0, 2 * shift + 1)
    crop = jax.vmap(
        lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
    )
    x = crop(padded, offsets)
    flip = jax.random.bernoulli(kflip, 0.5, (b, 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1, :], x)
