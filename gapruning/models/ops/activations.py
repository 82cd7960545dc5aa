"""Elementwise activations and softmax.

An activation keeps its input's channels unit for unit. Its interval bounds are
its values at the interval's ends (nondecreasing functions) or, for functions
that fall to one minimum and rise again (SiLU, GELU, Hardswish), the minimum where
the interval reaches its ``valley``. The pruned-minus-dense difference is bounded
by the range of the derivative: ``f(z + d) - f(z) = s d`` for some slope ``s`` in
:attr:`Activation.slope` (ReLU has exact per-unit cases instead).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from .base import Op, centre_radius, hull

# Half-width of the region around a valley's minimum treated as reaching it:
# the tabulated minima are accurate to well within it.
VALLEY_MARGIN = 0.01


class Activation(Op):
    """An elementwise function :meth:`fn`; subclasses set :attr:`slope` (a range
    containing every value of the derivative) and, if not nondecreasing,
    :attr:`valley` ``(x_min, lower bound of f)``."""

    flow = "channelwise"
    needs_dense_bounds = True
    slope: tuple[float, float] = (0.0, 1.0)
    valley: tuple[float, float] | None = None
    torch_name = ""  # torch.nn.functional's name of the function

    def fn(self, node, x):
        raise NotImplementedError

    def apply(self, node, layer, xs):
        return self.fn(node, xs[0])

    def bounds(self, node, p, ins):
        a, b = ins[0]
        fa, fb = self.fn(node, a), self.fn(node, b)
        if self.valley is None:
            return fa, fb
        x0, f0 = self.valley
        dips = (a <= x0 + VALLEY_MARGIN) & (b >= x0 - VALLEY_MARGIN)
        return jnp.where(dips, f0, jnp.minimum(fa, fb)), jnp.maximum(fa, fb)

    def delta(self, node, p, ins, dense):
        c, r = ins[0]
        lo, hi = self.slope
        return centre_radius(
            *hull(lo * (c - r), lo * (c + r), hi * (c - r), hi * (c + r))
        )

    def torch(self, graph, node, ins, in_shape):
        from torch.nn import functional as F

        return getattr(F, self.torch_name)(ins[0])


class ReLU(Activation):
    name = "relu"
    torch_name = "relu"

    def fn(self, node, x):
        return jax.nn.relu(x)

    def delta(self, node, p, ins, dense):
        """Exact per-unit cases: always active, always inactive, else clipped."""
        c, r = ins[0]
        lz, uz = dense[0]
        dl, du = c - r, c + r
        lo = jnp.maximum(jnp.minimum(0.0, dl), -jax.nn.relu(uz))
        hi = jnp.minimum(jnp.maximum(0.0, du), jax.nn.relu(uz + du))
        active = (lz >= 0) & (lz + dl >= 0)
        inactive = (uz <= 0) & (uz + du <= 0)
        lo = jnp.where(active, dl, jnp.where(inactive, 0.0, lo))
        hi = jnp.where(active, du, jnp.where(inactive, 0.0, hi))
        return centre_radius(lo, hi)

    def onnx(self, w, node, ins):
        return w.emit("Relu", ins, node.name)


class Sigmoid(Activation):
    name = "sigmoid"
    slope = (0.0, 0.25)
    torch_name = "sigmoid"

    def fn(self, node, x):
        return jax.nn.sigmoid(x)

    def onnx(self, w, node, ins):
        return w.emit("Sigmoid", ins, node.name)


class ReLU6(Activation):
    name = "relu6"
    torch_name = "relu6"

    def fn(self, node, x):
        return jax.nn.relu6(x)

    def onnx(self, w, node, ins):
        lo = w.const(f"{node.name}.min", np.float32(0.0))
        hi = w.const(f"{node.name}.max", np.float32(6.0))
        return w.emit("Clip", [ins[0], lo, hi], node.name)


class Hardsigmoid(Activation):
    name = "hardsigmoid"
    slope = (0.0, 1 / 6)
    torch_name = "hardsigmoid"

    def fn(self, node, x):
        return jax.nn.hard_sigmoid(x)

    def onnx(self, w, node, ins):
        return w.emit("HardSigmoid", ins, node.name, alpha=1 / 6, beta=0.5)


class Hardswish(Activation):
    name = "hardswish"
    slope = (-0.5, 1.5)
    valley = (-1.5, -0.375)
    torch_name = "hardswish"

    def fn(self, node, x):
        return jax.nn.hard_swish(x)

    def onnx(self, w, node, ins):
        gate = w.emit("HardSigmoid", ins, f"{node.name}.gate", alpha=1 / 6, beta=0.5)
        return w.emit("Mul", [ins[0], gate], node.name)


class SiLU(Activation):
    name = "silu"
    slope = (-0.0999, 1.0999)
    valley = (-1.2785, -0.27847)
    torch_name = "silu"

    def fn(self, node, x):
        return jax.nn.silu(x)

    def onnx(self, w, node, ins):
        gate = w.emit("Sigmoid", ins, f"{node.name}.gate")
        return w.emit("Mul", [ins[0], gate], node.name)


class GELU(Activation):
    """GELU; attribute ``approximate``: the tanh form instead of the erf one."""

    name = "gelu"
    slope = (-0.1290, 1.1290)
    valley = (-0.752, -0.17005)

    def fn(self, node, x):
        return jax.nn.gelu(x, approximate=bool(node.attr("approximate")))

    def onnx(self, w, node, ins):
        if node.attr("approximate"):
            self.missing(node, "ONNX export of the tanh approximation")
        n = node.name
        root = w.const(f"{n}.sqrt2", np.float32(math.sqrt(2.0)))
        erf = w.emit("Erf", [w.emit("Div", [ins[0], root], f"{n}.s")], f"{n}.erf")
        one = w.emit("Add", [erf, w.const(f"{n}.one", np.float32(1.0))], f"{n}.e1")
        out = w.emit("Mul", [ins[0], one], f"{n}.xe")
        return w.emit("Mul", [out, w.const(f"{n}.half", np.float32(0.5))], n)

    def torch(self, graph, node, ins, in_shape):
        from torch.nn import functional as F

        form = "tanh" if node.attr("approximate") else "none"
        return F.gelu(ins[0], approximate=form)


class Softmax(Op):
    """Softmax over the channel axis: it mixes the channels, so its input's space
    cannot be pruned."""

    name = "softmax"
    flow = "couple"

    def apply(self, node, layer, xs):
        return jax.nn.softmax(xs[0], axis=-1)

    def bounds(self, node, p, ins):
        """``lower_i = 1 / (1 + sum_{j != i} e^{u_j - l_i})`` and symmetrically for
        the upper bound, in log space (stable for wide intervals)."""
        lo, hi = ins[0]
        eye = jnp.eye(lo.shape[-1], dtype=bool)

        def others(v):  # logsumexp over j != i, for every i
            return jax.nn.logsumexp(jnp.where(eye, -jnp.inf, v[..., None, :]), axis=-1)

        return jax.nn.sigmoid(lo - others(hi)), jax.nn.sigmoid(hi - others(lo))

    def delta(self, node, p, ins, dense):
        """Half the largest ``|d|`` (softmax is 1/2-Lipschitz in the max norm)."""
        c, r = ins[0]
        big = jnp.abs(jnp.stack([c - r, c + r])).max(axis=(0, -1), keepdims=True)
        return jnp.zeros_like(c), jnp.broadcast_to(big[0] / 2, c.shape)

    def onnx(self, w, node, ins):
        return w.emit("Softmax", ins, node.name, axis=1)

    def torch(self, graph, node, ins, in_shape):
        import torch

        return torch.softmax(ins[0], dim=1)
