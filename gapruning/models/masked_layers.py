"""Dense and Conv layers that read a masked input: ``op(x * m, kernel)``.

Masking the input channels of a linear layer is the same as masking the rows of its
kernel: ``(x * m) @ W == x @ (m[:, None] * W)``. Which side to mask matters once a
population is vmapped. When the input ``x`` is shared by every individual (layers
before the first mask are computed once) and only the mask carries the population
axis, masking ``x`` materializes ``P`` copies of the activation and then runs ``P``
small matmuls folded into the batch; masking the kernel instead stacks the ``P``
masked kernels along the output axis and runs ONE wide matmul or convolution on the
shared input, which is much faster (measured in
benchmarks/results/population_forward.md).

A convolution with a ``k x k`` window has a cheaper form still when the population
is at least as large as its input channels: ``conv(x * m, W) = sum_c m_c conv(x_c,
W_c)``, so the ``C_in`` per-channel convolutions of the shared input are computed
once (:func:`per_channel_parts`, one grouped convolution, ``k^2 C_in C_out``
multiply-adds per pixel) and each individual only mixes them with its mask
(:func:`mix_parts`, ``C_in C_out`` per pixel) instead of running the whole
convolution: ``k^2`` times fewer operations per individual. For LeNet-5's second
convolution (6 -> 16 channels, 5x5) at P=64 on 512 probes this halved a KL + top-1
fitness evaluation on 2 CPU cores. The mix is one matrix product with the
``(P, C_in)`` masks as its left operand, so its output comes out population-major;
with the masks on the right, XLA transposed the ``(pixels, P)`` product, which took
as long as the rest of the network. :func:`gapruning.forward.split_apply` computes
the parts once per population and mixes them on cache-sized tiles of probes.

The choice needs to know which arguments are batched, which only a batching rule
sees: :func:`masked_contraction` is a ``jax.custom_batching.custom_vmap`` function
(kernel-side masking when only the mask is batched, the plain formula otherwise),
wrapped in a ``jax.custom_jvp`` whose tangent is written with ordinary, transposable
operations, so gradients (training, FGSM, probe synthesis) work as before.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.custom_batching import custom_vmap

# op(x, kernel): linear in each argument, contracting the last axis of ``x`` with
# axis -2 of ``kernel`` (Dense ``(in, out)``, Conv ``HWIO``).
LinearOp = Callable[[jax.Array, jax.Array], jax.Array]


def dense_op(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return x @ kernel


@dataclasses.dataclass(frozen=True)
class ConvOp:
    """A NHWC / HWIO convolution with fixed strides and padding."""

    strides: tuple[int, ...]
    padding: Any  # "SAME" / "VALID" or ((lo, hi), ...) per spatial axis

    def __call__(self, x: jax.Array, kernel: jax.Array, groups: int = 1):
        """The convolution; gradients with respect to ``x`` run
        :meth:`transpose` (see :func:`_conv`)."""
        if groups == 1:
            return _conv(self, x, kernel)
        if groups == x.shape[-1] == kernel.shape[-1]:
            return self.depthwise(x, kernel)
        return self.raw(x, kernel, groups)

    def depthwise(self, x: jax.Array, kernel: jax.Array) -> jax.Array:
        """The depthwise convolution (kernel ``(kh, kw, 1, C)``) as a sum of
        ``kh * kw`` strided slices of the padded input times one kernel row
        each: the same values as :meth:`raw`, and several times faster than
        XLA:CPU's grouped convolution, its gradient even more so (see
        benchmarks/results/depthwise.md)."""
        (kh, kw), (sh, sw) = kernel.shape[:2], self.strides
        pads = self.padding
        if isinstance(pads, str):
            pads = jax.lax.padtype_to_pads(x.shape[1:3], (kh, kw), self.strides, pads)
        zero = jnp.zeros((), x.dtype)
        xp = jax.lax.pad(
            x, zero, [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)]
        )
        n, h, w, c = xp.shape
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        out = 0
        for i in range(kh):
            for j in range(kw):
                end = (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c)
                tap = jax.lax.slice(xp, (0, i, j, 0), end, (1, sh, sw, 1))
                out = out + tap * kernel[i, j, 0]
        return out

    def raw(self, x: jax.Array, kernel: jax.Array, groups: int = 1) -> jax.Array:
        """The convolution, differentiated by JAX's own rules."""
        return jax.lax.conv_general_dilated(
            x,
            kernel,
            self.strides,
            self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
        )

    def linear(self, dx: jax.Array, kernel: jax.Array) -> jax.Array:
        """``self(dx, kernel)`` for a tangent ``dx``, written as the transpose of
        :meth:`transpose`: reverse mode (input gradients: attacks, probe
        synthesis) transposes it back into that fast form (same values, several
        times faster than differentiating the raw convolution)."""
        out = jax.eval_shape(self.raw, dx, kernel)
        adjoint = functools.partial(self.transpose, kernel=kernel, in_hw=dx.shape[1:3])
        return jax.linear_transpose(adjoint, out)(dx)[0]

    def transpose(
        self, y: jax.Array, kernel: jax.Array, in_hw: tuple[int, int]
    ) -> jax.Array:
        """The adjoint of ``x -> self(x, kernel)`` (inputs of height and width
        ``in_hw``) applied to ``y``: ``y`` dilated by the strides, convolved with
        the flipped kernel. The same values as ``jax.vjp``'s, but its kernel is an
        ordinary HWIO one: XLA:CPU ran JAX's own transpose (a reversed kernel
        read in swapped order) 17x slower inside a loop (jaxlib 0.10)."""
        k_hw = kernel.shape[:2]
        pads = self.padding
        if isinstance(pads, str):
            pads = jax.lax.padtype_to_pads(in_hw, k_hw, self.strides, pads)
        adjoint_pads = [
            (k - 1 - lo, n + lo - (o - 1) * s - 1)
            for k, (lo, _), n, o, s in zip(
                k_hw, pads, in_hw, y.shape[1:3], self.strides, strict=True
            )
        ]
        return jax.lax.conv_general_dilated(
            y,
            jnp.flip(kernel, (0, 1)).swapaxes(2, 3),
            (1, 1),
            adjoint_pads,
            lhs_dilation=self.strides,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _conv(op: ConvOp, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``op.raw(x, kernel)`` with its tangent in ``x`` from :meth:`ConvOp.linear`."""
    return op.raw(x, kernel)


@functools.partial(_conv.defjvp, symbolic_zeros=True)
def _conv_jvp(op, primals, tangents):
    x, kernel = primals
    dx, dkernel = tangents
    y = op.raw(x, kernel)
    terms = []
    if not _is_zero(dx):
        terms.append(op.linear(dx, kernel))
    if not _is_zero(dkernel):
        terms.append(op.raw(x, dkernel))
    return y, _sum_tangents(terms, y)


def _sum_tangents(terms: list, like: jax.Array) -> jax.Array:
    """The sum of the non-zero tangent terms (zeros like ``like`` if none)."""
    return sum(terms[1:], terms[0]) if terms else jnp.zeros_like(like)


def _linear_in_x(op: LinearOp) -> LinearOp:
    """``op`` for arguments that are tangents in ``x`` (see :meth:`ConvOp.linear`)."""
    return op.linear if isinstance(op, ConvOp) else op


def conv_op(strides, padding) -> ConvOp:
    """A NHWC / HWIO convolution with fixed strides and padding (hashable)."""
    if not isinstance(padding, str):
        padding = tuple(tuple(int(v) for v in pair) for pair in padding)
    return ConvOp(tuple(int(v) for v in strides), padding)


def masked_contraction(
    op: LinearOp, x: jax.Array, mask: jax.Array, kernel: jax.Array
) -> jax.Array:
    """``op(x * mask, kernel)``, with the population-aware batching rule above."""
    return _masked(op)(x, mask, kernel)


@functools.cache
def _masked(op: LinearOp):
    @custom_vmap
    def primal(x, mask, kernel):
        return op(x * mask, kernel)

    @primal.def_vmap
    def rule(axis_size, in_batched, x, mask, kernel):
        x_batched, mask_batched, kernel_batched = in_batched
        if mask_batched and not x_batched and not kernel_batched:
            if _per_channel_pays(op, kernel, axis_size):
                return _per_channel_sums(op, x, mask, kernel), True
            return _stacked_kernels(op, x, mask, kernel), True
        axes = tuple(0 if b else None for b in in_batched)
        return jax.vmap(lambda a, m, k: op(a * m, k), in_axes=axes)(
            x, mask, kernel
        ), True

    @jax.custom_jvp
    def masked(x, mask, kernel):
        return primal(x, mask, kernel)

    @functools.partial(masked.defjvp, symbolic_zeros=True)
    def masked_jvp(primals, tangents):
        x, mask, kernel = primals
        dx, dmask, dkernel = tangents
        y = masked(x, mask, kernel)
        terms = []
        if not _is_zero(dx):
            terms.append(_linear_in_x(op)(dx * mask, kernel))
        if not _is_zero(dmask):
            terms.append(_linear_in_x(op)(x * dmask, kernel))
        if not _is_zero(dkernel):
            terms.append(op(x * mask, dkernel))
        return y, _sum_tangents(terms, y)

    return masked


def _is_zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _stacked_kernels(op, x, masks, kernel):
    """``(P, *op(x, kernel).shape)``: the ``P`` masked kernels side by side along the
    output axis, one ``op`` call on the shared ``x``."""
    p, out = masks.shape[0], kernel.shape[-1]
    rows = masks.reshape(p, *([1] * (kernel.ndim - 2)), masks.shape[-1], 1)
    stacked = jnp.moveaxis(kernel * rows, 0, -2).reshape(*kernel.shape[:-1], p * out)
    y = op(x, stacked)
    return jnp.moveaxis(y.reshape(*y.shape[:-1], p, out), -2, 0)


def per_channel_population(op, kernel_shape) -> int | None:
    """The fewest individuals for which a population of masks on a shared input
    takes the :func:`_per_channel_sums` route (its input channels, so the
    intermediate is no larger than the output), or ``None`` if it never does
    (not a convolution, or a 1x1 window)."""
    if not isinstance(op, ConvOp) or math.prod(kernel_shape[:-2]) <= 1:
        return None
    return int(kernel_shape[-2])


def _per_channel_pays(op, kernel, population: int) -> bool:
    """Whether :func:`_per_channel_sums` beats stacked kernels for ``population``."""
    fewest = per_channel_population(op, kernel.shape)
    return fewest is not None and fewest <= population


def per_channel_parts(op: ConvOp, x: jax.Array, kernel: jax.Array) -> jax.Array:
    """``(*op(x, kernel).shape[:-1], C_in, C_out)``: the convolution of each input
    channel of ``x`` with its slice of ``kernel`` (one grouped convolution); their
    sum over ``C_in`` is ``op(x, kernel)``."""
    cin, cout = kernel.shape[-2:]
    grouped = kernel.reshape(*kernel.shape[:-2], 1, cin * cout)  # group c: W[.., c, :]
    parts = op(x, grouped, groups=cin)
    return parts.reshape(*parts.shape[:-1], cin, cout)


def mix_parts(parts: jax.Array, mask: jax.Array) -> jax.Array:
    """One individual's masked convolution from :func:`per_channel_parts`:
    ``sum_c mask[c] * parts[..., c, :]``, a contraction (vmapped over a population
    it is one matrix product with the ``(P, C_in)`` masks)."""
    return jnp.einsum("c,...co->...o", mask, parts)


def _per_channel_sums(op: ConvOp, x, masks, kernel):
    """``(P, *op(x, kernel).shape)`` as ``sum_c masks[:, c] * conv(x_c, W_c)``: the
    per-input-channel convolutions of the shared ``x`` once, then each
    individual's mask-weighted sum of them."""
    parts = per_channel_parts(op, x, kernel)
    return jax.vmap(mix_parts, in_axes=(None, 0))(parts, masks.astype(parts.dtype))
