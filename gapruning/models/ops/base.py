"""The op table's protocol: everything gapruning knows about one op, in one class.

Each op of the graph (``Node.op``) is one :class:`Op` instance in :data:`OPS`.
Every stage that used to dispatch on the op's name asks the table instead:

* compute: :meth:`Op.layer` (its NNX layer, if it has parameters) and
  :meth:`Op.apply`;
* channel flow: :attr:`Op.flow` says how the channel (last) axis of its output
  relates to its inputs' (see :data:`FLOWS`), :attr:`Op.reads_masked` whether a
  mask is put in front of it when it reads a prunable tensor (and
  :attr:`Op.needs_input_mask` whether it reads that mask's vector too),
  :meth:`Op.unit_width` how many channels one prunable unit spans (attention
  heads), :meth:`Op.group_name` what it names the group of its output;
* compaction: :meth:`Op.compact_params` and :meth:`Op.compact_attrs`;
* cost: :meth:`Op.cost`, exact parameter and FLOP terms;
* bounds: :meth:`Op.bounds` (interval bound propagation) and :meth:`Op.delta`
  (bounds of the pruned-minus-dense difference), for the interval metrics;
* export: :meth:`Op.onnx`, :meth:`Op.torch_layer` and :meth:`Op.torch`.

A method an op does not override raises :class:`UnsupportedOpError` naming the op,
the node and what is missing; :meth:`Op.supports` says beforehand.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

# How the channel axis of an op's output relates to its inputs':
FLOWS = {
    "source": "the graph input; its channels are fixed",
    "producer": "new units (Dense/Conv outputs): a prunable group of their own",
    "channelwise": "the input's channels, unit for unit (activations, BatchNorm, "
    "pooling, depthwise and groupwise convolution, LayerNorm over the kept "
    "channels)",
    "join": "every input and the output index the same units (add, multiply)",
    "couple": "the input's channels, mixed (softmax): the space is not prunable",
    "reshape": "a new axis made of the input's (flatten)",
    "remap": "a parameter-free re-indexing of the input's channels (channel_map)",
    "concat": "the inputs' channels one after the other (concatenation): a space "
    "made of pieces of other spaces",
    "opaque": "new channels tied to the input's in a way pruning cannot follow "
    "(a grouped convolution changing the width): both spaces are not prunable",
}

# (coef, a, b): coef * kept[a] * kept[b], index -1 standing for the constant 1.
Term = tuple[int, int, int]
# ref(tensor) -> pieces ((mult, g), ...): the tensor's last axis has
# sum(mult * kept[g]) entries (one piece, except after a concatenation).
UnitRef = Callable[[str], list[tuple[int, int]]]


class UnsupportedOpError(ValueError):
    """An op the table does not know, or a capability an op does not have."""


class Op:
    """One op of the graph. Subclasses set :attr:`name` and :attr:`flow` and
    override the methods that apply to them."""

    name: str = ""
    flow: str = "opaque"
    reads_masked: bool = False
    variables: tuple[str, ...] = ()  # Flax variable names of its layer
    needs_dense_bounds = False  # delta reads its inputs' dense interval bounds
    uses_masks = False  # reads the group masks (see mask_vector)
    # reads through a mask (reads_masked) and needs its vector: apply, bounds and
    # delta then get their variables as a dict ``p`` whose ``p["mask"]`` is the
    # vector of the mask node read (None where the input is not masked)
    needs_input_mask = False

    def missing(self, node, what: str):
        """Raises :class:`UnsupportedOpError`: ``node`` has no ``what``."""
        where = f" (node {node.name!r})" if node is not None else ""
        raise UnsupportedOpError(f"op {self.name!r}{where} has no {what}")

    def supports(self, capability: str) -> bool:
        """Whether this op overrides ``capability`` (a method name, e.g.
        ``"onnx"``, ``"torch"``, ``"bounds"``, ``"delta"``)."""
        return getattr(type(self), capability) is not getattr(Op, capability)

    # ------------------------------------------------------------- compute

    def layer(self, node, in_shape: tuple[int, ...], rngs) -> Any:
        """The NNX layer holding the node's parameters (None: it has none)."""
        return None

    def apply(self, node, layer, xs: list) -> Any:
        """The node's output from its inputs' values ``xs`` (batch axis first);
        ``layer`` as :meth:`layer` made it (see :attr:`needs_input_mask`)."""
        self.missing(node, "computation")

    def mask_vector(self, node, lookup: Callable[[str], Any]):
        """For ops that read the group masks: the vector multiplying the input,
        ``lookup(group)`` giving one group's mask."""
        self.missing(node, "mask vector")

    def mask_groups(self, node) -> dict[str, int]:
        """For ops that read the group masks: ``{group: units}`` they read."""
        return {}

    def group_name(self, node) -> str | None:
        """The name this op gives the prunable group of its output's space
        (None: none); the first free name given in graph order wins, else the
        group is named after its first producer."""
        return None

    def unit_width(self, node) -> int:
        """Channels per prunable unit of the space of the node's output (1; an
        attention op's heads: ``head_dim``). Masks then hold one entry per unit,
        repeated over its channels."""
        return 1

    # ------------------------------------------------------------- cost

    def cost(self, node, ref: UnitRef) -> tuple[list[Term], list[Term]]:
        """``(param_terms, flop_terms)`` of the node in the compacted network."""
        return [], []

    # ------------------------------------------------------------- compaction

    def compact_params(self, node, p: dict, rows, cols) -> dict:
        """The node's variables keeping input channels ``rows`` and output
        channels ``cols`` (default: per-channel vectors indexed by ``cols``)."""
        return {k: v[cols] for k, v in p.items()}

    def compact_attrs(self, node, attrs: dict, cols, in_index) -> dict:
        """The node's attributes once compacted (``in_index``: kept indices of
        its first input)."""
        return attrs

    # ------------------------------------------------------------- bounds

    def bounds(self, node, p: dict | None, ins: list) -> tuple:
        """``(lower, upper)`` of the output given ``(lower, upper)`` of each input."""
        self.missing(node, "interval bounds")

    def delta(self, node, p: dict | None, ins: list, dense: list) -> tuple:
        """``(centre, radius)`` bounding pruned minus dense output, given each
        input's difference ``(centre, radius)`` and dense bounds ``(lo, hi)``."""
        self.missing(node, "difference bounds")

    # ------------------------------------------------------------- export

    def onnx(self, w, node, ins: list[str]) -> str:
        """Emits the node with the ONNX writer ``w``; returns its tensor name."""
        self.missing(node, "ONNX export")

    def torch_layer(self, node, in_shape) -> Any:
        """The ``torch.nn`` layer holding the node's parameters (None: none)."""
        return None

    def torch_state(self, node, p: dict, chw) -> dict:
        """The torch layer's state dict entries (key without the layer name) from
        the node's Flax variables ``p``; ``chw``: the ``(C, H, W)`` map a flatten
        before it read, if any (rows are then reordered)."""
        self.missing(node, "PyTorch state dict")

    def torch(self, graph, node, ins: list, in_shape) -> Any:
        """The node on NCHW torch tensors ``ins`` inside the exported module."""
        self.missing(node, "PyTorch export")


class LinearOp(Op):
    """An op that is affine in its (single) input: bounds and differences follow
    from :meth:`linear` (centre through the map, radius through ``|map|``)."""

    def linear(self, node, p: dict | None, x, *, absolute: bool, bias: bool):
        """The map on ``x`` (with ``|weights|`` if ``absolute``, bias optional)."""
        self.missing(node, "linear map")

    def apply(self, node, layer, xs):
        return self.linear(node, layer_vars(layer), xs[0], absolute=False, bias=True)

    def bounds(self, node, p, ins):
        (a, b) = ins[0]
        c, r = (a + b) / 2, (b - a) / 2
        cc = self.linear(node, p, c, absolute=False, bias=True)
        rr = self.linear(node, p, r, absolute=True, bias=False)
        return cc - rr, cc + rr

    def delta(self, node, p, ins, dense):
        c, r = ins[0]
        return (
            self.linear(node, p, c, absolute=False, bias=False),
            self.linear(node, p, r, absolute=True, bias=False),
        )


class ShapeOp(LinearOp):
    """A linear, parameter-free op with nonnegative coefficients (pooling by
    averaging, flatten, re-indexing): the map is the op itself."""

    flow = "channelwise"

    def shape_apply(self, node, x):
        """The op on ``x``."""
        self.missing(node, "computation")

    def apply(self, node, layer, xs):
        return self.shape_apply(node, xs[0])

    def linear(self, node, p, x, *, absolute, bias):
        return self.shape_apply(node, x)


def pair_terms(coef: int, ins, outs) -> list[Term]:
    """``coef * units(in) * units(out)`` as terms, over the pieces of both."""
    return [(coef * mi * mo, gi, go) for mi, gi in ins for mo, go in outs]


def unit_terms(coef: int, outs) -> list[Term]:
    """``coef * units(out)`` as terms, over its pieces."""
    return [(coef * mo, go, -1) for mo, go in outs]


def layer_vars(layer) -> dict:
    """A layer's variables as ``{name: array}`` (what :meth:`LinearOp.linear`
    reads; the same names as ``nnx.to_pure_dict`` gives)."""
    if layer is None:
        return {}
    out = {}
    for name in ("kernel", "bias", "scale", "mean", "var", "embedding"):
        v = getattr(layer, name, None)
        if v is not None:
            out[name] = v[...]
    return out


def hull(*values):
    """Elementwise ``(min, max)`` of several arrays."""
    stack = jnp.stack(jnp.broadcast_arrays(*values))
    return stack.min(0), stack.max(0)


def centre_radius(lo, hi):
    return (lo + hi) / 2, (hi - lo) / 2


def bounds_difference(bounds, difference, dense, dense_bounds=None):
    """``(centre, radius)`` bounding pruned minus dense output of an op, from
    its input bounds map ``bounds`` (``(lo, hi) -> (lo, hi)``): the pruned
    network's bounds (the input's ``dense`` bounds moved by its ``difference``)
    minus the dense network's (through ``dense_bounds``, default ``bounds``)."""
    (c, r), (lo, hi) = difference, dense
    pruned_lo, pruned_hi = bounds(lo + c - r, hi + c + r)
    dense_lo, dense_hi = (dense_bounds or bounds)(lo, hi)
    return centre_radius(pruned_lo - dense_hi, pruned_hi - dense_lo)
