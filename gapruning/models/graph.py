"""A network as a small static graph of layers, executed by one NNX module.

Every model gapruning handles (the zoo, and later networks imported from PyTorch,
Keras or ONNX) is a :class:`Net`: an ordered tuple of :class:`Node` s (static, part
of the NNX graphdef) plus the parameters of the nodes that have any. One generic
description serves every later stage: the PruneSpace, the population forward pass
and physical compaction all read the same nodes instead of being written per model.

Prunable units sit behind :class:`Mask` variables. Masks are inserted automatically
by :func:`insert_masks`: the graph is split into *channel spaces* (tensors whose
last axis indexes the same units: a layer's output and everything channel-wise
downstream of it, joined across residual additions), and each tensor of a
prunable space is multiplied by its space's mask just before a layer that mixes
channels reads it. A zero mask entry is therefore exactly the removal of that unit.

Masks may carry a leading population axis ``P``: the executor then vmaps the
one-individual pass over it, so everything before the first mask is computed once
and the (unbatched) weights are shared by all individuals; Dense/Conv layers that
read a mask choose how to batch in :mod:`~gapruning.models.masked_layers`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .masked_layers import conv_op, dense_op, masked_contraction, mix_parts

# Ops that keep the channel (last) axis as it is, unit for unit.
CHANNELWISE = frozenset(
    {"batchnorm", "relu", "sigmoid", "maxpool", "avgpool", "global_avgpool", "mask"}
)
# Ops whose output units are new, prunable units.
PRODUCERS = frozenset({"dense", "conv"})
# Ops that keep the channel axis but mix its entries (softmax): they join their
# input's channel space, and being in neither set above they make it unprunable.
CHANNEL_COUPLING = frozenset({"softmax"})


class Mask(nnx.Variable):
    """0/1 float mask over the units of one prunable group (shape ``(units,)``)."""


@dataclasses.dataclass(frozen=True)
class Node:
    """One operation. ``attrs`` is a sorted tuple of ``(key, value)`` pairs."""

    op: str
    name: str
    inputs: tuple[str, ...]
    shape: tuple[int, ...]  # output shape without the batch axis
    attrs: tuple[tuple[str, Any], ...] = ()

    def attr(self, key: str, default: Any = None) -> Any:
        return dict(self.attrs).get(key, default)


def _window_out(size: int, k: int, s: int, padding) -> int:
    if padding == "SAME":
        return -(-size // s)
    if padding == "VALID":
        return (size - k) // s + 1
    lo, hi = padding
    return (size + lo + hi - k) // s + 1


def _norm_padding(padding, ndim: int = 2):
    if isinstance(padding, str):
        padding = padding.upper()
        if padding not in ("SAME", "VALID"):
            raise ValueError(
                f"padding must be 'SAME', 'VALID' or pairs, got {padding!r}"
            )
        return padding
    if isinstance(padding, int):
        return tuple((padding, padding) for _ in range(ndim))
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


class GraphBuilder:
    """Builds the node tuple of a :class:`Net` while tracking shapes.

    Each method appends one node and returns its name, to be passed on as input.

    Example:
        >>> g = GraphBuilder((28, 28, 1))
        >>> h = g.relu(g.dense(g.flatten(g.input), 300, name="fc1"))
        >>> spec = g.build(g.dense(h, 10, name="out"))
    """

    def __init__(self, input_shape: tuple[int, ...]):
        self.nodes: list[Node] = []
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.input = self._add("input", "input", (), tuple(int(d) for d in input_shape))

    def _add(self, op, name, inputs, shape, **attrs) -> str:
        if name in self._shapes:
            raise ValueError(f"duplicate node name {name!r}")
        for i in inputs:
            if i not in self._shapes:
                raise ValueError(f"node {name!r} reads unknown node {i!r}")
        node = Node(op, name, tuple(inputs), tuple(shape), tuple(sorted(attrs.items())))
        self.nodes.append(node)
        self._shapes[name] = node.shape
        return name

    def _name(self, op: str, name: str | None) -> str:
        return name or f"{op}{len(self.nodes)}"

    def shape(self, x: str) -> tuple[int, ...]:
        if x not in self._shapes:
            raise ValueError(f"unknown node {x!r}")
        return self._shapes[x]

    def dense(self, x, features: int, *, use_bias: bool = True, name=None) -> str:
        if len(self.shape(x)) != 1:
            raise ValueError(
                f"dense expects a flat input, {x!r} has shape {self.shape(x)}"
            )
        return self._add(
            "dense",
            self._name("dense", name),
            (x,),
            (features,),
            features=features,
            use_bias=use_bias,
        )

    def conv(
        self,
        x,
        features: int,
        kernel_size,
        *,
        strides=1,
        padding="SAME",
        use_bias: bool = True,
        name=None,
    ) -> str:
        h, w, _ = self.shape(x)
        k, s, p = _pair(kernel_size), _pair(strides), _norm_padding(padding)
        ph, pw = (p, p) if isinstance(p, str) else p
        shape = (
            _window_out(h, k[0], s[0], ph),
            _window_out(w, k[1], s[1], pw),
            features,
        )
        return self._add(
            "conv",
            self._name("conv", name),
            (x,),
            shape,
            features=features,
            kernel_size=k,
            strides=s,
            padding=p,
            use_bias=use_bias,
        )

    def batchnorm(self, x, *, epsilon=1e-5, momentum=0.9, name=None) -> str:
        return self._add(
            "batchnorm",
            self._name("bn", name),
            (x,),
            self.shape(x),
            epsilon=float(epsilon),
            momentum=float(momentum),
        )

    def relu(self, x, name=None) -> str:
        return self._add("relu", self._name("relu", name), (x,), self.shape(x))

    def sigmoid(self, x, name=None) -> str:
        return self._add("sigmoid", self._name("sigmoid", name), (x,), self.shape(x))

    def softmax(self, x, name=None) -> str:
        """Softmax over the last (channel) axis; its input space is not prunable."""
        return self._add("softmax", self._name("softmax", name), (x,), self.shape(x))

    def _pool(self, op, x, window, strides, padding, name, **extra) -> str:
        h, w, c = self.shape(x)
        k = _pair(window)
        s = _pair(strides if strides is not None else window)
        p = _norm_padding(padding)
        ph, pw = (p, p) if isinstance(p, str) else p
        shape = (_window_out(h, k[0], s[0], ph), _window_out(w, k[1], s[1], pw), c)
        return self._add(
            op,
            self._name(op, name),
            (x,),
            shape,
            window=k,
            strides=s,
            padding=p,
            **extra,
        )

    def maxpool(self, x, window=2, strides=None, padding="VALID", name=None) -> str:
        return self._pool("maxpool", x, window, strides, padding, name)

    def avgpool(
        self,
        x,
        window=2,
        strides=None,
        padding="VALID",
        *,
        count_include_pad: bool = True,
        name=None,
    ) -> str:
        return self._pool(
            "avgpool",
            x,
            window,
            strides,
            padding,
            name,
            count_include_pad=count_include_pad,
        )

    def global_avgpool(self, x, name=None) -> str:
        return self._add(
            "global_avgpool", self._name("gap", name), (x,), self.shape(x)[-1:]
        )

    def flatten(self, x, name=None) -> str:
        return self._add(
            "flatten", self._name("flatten", name), (x,), (math.prod(self.shape(x)),)
        )

    def add(self, *xs: str, group: str | None = None, name=None) -> str:
        shapes = {self.shape(x) for x in xs}
        if len(shapes) != 1:
            raise ValueError(f"add of tensors with different shapes: {sorted(shapes)}")
        return self._add(
            "add", self._name("add", name), xs, self.shape(xs[0]), group=group
        )

    def channel_map(self, x, features: int, *, stride: int = 1, index=None, name=None):
        """Parameter-free shortcut: spatial subsampling by ``stride``, then output
        channel ``j`` copies input channel ``index[j]`` (``-1``: zeros). The default
        index is the identity padded with zero channels ("option A" of He et al.)."""
        h, w, c = self.shape(x)
        if index is None:
            index = tuple(j if j < c else -1 for j in range(features))
        if len(index) != features or max(index) >= c:
            raise ValueError(
                f"channel_map index does not fit {c} -> {features} channels"
            )
        shape = (-(-h // stride), -(-w // stride), features)
        return self._add(
            "channel_map",
            self._name("shortcut", name),
            (x,),
            shape,
            stride=int(stride),
            index=tuple(int(i) for i in index),
        )

    def build(self, output: str) -> tuple[Node, ...]:
        """The finished node tuple, with ``output`` as the last node."""
        if self.nodes[-1].name != output:
            raise ValueError("the output must be the last node added")
        return tuple(self.nodes)


# --------------------------------------------------------------------- analysis


@dataclasses.dataclass(frozen=True)
class ChannelSpaces:
    """Which tensors index the same units (see module docstring)."""

    space_of: dict[str, int]  # node name -> space id
    prunable: dict[int, str]  # space id -> group name, for prunable spaces only
    kinds: dict[int, str]  # space id -> "dense" | "conv"


def channel_spaces(nodes: tuple[Node, ...]) -> ChannelSpaces:
    """Union-find over node outputs: channel-wise ops and additions share a space."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for n in nodes:
        parent[n.name] = n.name
        if n.op in CHANNELWISE or n.op in CHANNEL_COUPLING:
            parent[n.name] = find(n.inputs[0])
        elif n.op == "add":
            for other in n.inputs:
                parent[find(other)] = find(n.name)
        elif (
            n.op == "flatten"
            and len(n.shape) == 1
            and n.shape == _shape(nodes, n.inputs[0])
        ):
            parent[n.name] = find(n.inputs[0])

    roots = sorted({find(n.name) for n in nodes}, key=[n.name for n in nodes].index)
    ids = {r: i for i, r in enumerate(roots)}
    space_of = {n.name: ids[find(n.name)] for n in nodes}

    members: dict[int, list[Node]] = {}
    for n in nodes:
        members.setdefault(space_of[n.name], []).append(n)
    output_space = space_of[nodes[-1].name]
    prunable, kinds = {}, {}
    for sid, ms in members.items():
        producers = [m for m in ms if m.op in PRODUCERS]
        fixed = [
            m
            for m in ms
            if m.op not in PRODUCERS | CHANNELWISE | {"add", "channel_map"}
        ]
        if not producers or fixed or sid == output_space:
            continue
        adds = [m.attr("group") for m in ms if m.op == "add" and m.attr("group")]
        prunable[sid] = adds[0] if adds else producers[0].name
        kinds[sid] = producers[0].op
    return ChannelSpaces(space_of, prunable, kinds)


def _shape(nodes, name):
    return next(n.shape for n in nodes if n.name == name)


def insert_masks(nodes: tuple[Node, ...]) -> tuple[Node, ...]:
    """Adds one ``mask`` node after every prunable tensor that a channel-mixing op
    (dense, conv, flatten, channel_map) reads, and rewires those readers to it."""
    if any(n.op == "mask" for n in nodes):
        return nodes
    spaces = channel_spaces(nodes)
    mixing = {"dense", "conv", "flatten", "channel_map"}
    needs_mask = {
        i
        for n in nodes
        if n.op in mixing
        for i in n.inputs
        if spaces.space_of[i] in spaces.prunable
    }
    out: list[Node] = []
    for n in nodes:
        if n.op in mixing:
            n = dataclasses.replace(
                n, inputs=tuple(f"{i}.mask" if i in needs_mask else i for i in n.inputs)
            )
        out.append(n)
        if n.name in needs_mask:
            group = spaces.prunable[spaces.space_of[n.name]]
            out.append(
                Node("mask", f"{n.name}.mask", (n.name,), n.shape, (("group", group),))
            )
    return tuple(out)


# --------------------------------------------------------------------- executor


def _make_layer(
    node: Node, in_shape: tuple[int, ...], rngs: nnx.Rngs
) -> nnx.Module | None:
    a = dict(node.attrs)
    if node.op == "dense":
        return nnx.Linear(
            in_shape[-1], a["features"], use_bias=a["use_bias"], rngs=rngs
        )
    if node.op == "conv":
        return nnx.Conv(
            in_shape[-1],
            a["features"],
            kernel_size=a["kernel_size"],
            strides=a["strides"],
            padding=a["padding"],
            use_bias=a["use_bias"],
            rngs=rngs,
        )
    if node.op == "batchnorm":
        return nnx.BatchNorm(
            in_shape[-1], epsilon=a["epsilon"], momentum=a["momentum"], rngs=rngs
        )
    return None


def apply_pool(x, node: Node, kind: str):
    k, s, p = node.attr("window"), node.attr("strides"), node.attr("padding")
    dims, strides = (1, *k, 1), (1, *s, 1)
    pad = p if isinstance(p, str) else ((0, 0), *p, (0, 0))
    if kind == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pad)
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
    if node.attr("count_include_pad") and not isinstance(p, str):
        return total / math.prod(k)
    ones = jnp.ones((1, *x.shape[1:3], 1), x.dtype)
    return total / jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pad)


def mask_read(n: Node, by_name: dict[str, Node]) -> Node | None:
    """The mask node a Dense/Conv ``n`` reads (directly or through a flatten), or
    ``None``."""
    if n.op not in PRODUCERS:
        return None
    src = by_name[n.inputs[0]]
    if src.op == "flatten" and by_name[src.inputs[0]].op == "mask":
        src = by_name[src.inputs[0]]
    return src if src.op == "mask" else None


class Net(nnx.Module):
    """Executes a node tuple. Layers live in ``self.layers``, masks in ``self.masks``.

    Args:
        nodes: the graph from :class:`GraphBuilder` (masks are inserted if absent).
        rngs: initialisation randomness.
    """

    def __init__(self, nodes: tuple[Node, ...], *, rngs: nnx.Rngs):
        nodes = insert_masks(tuple(nodes))
        self.nodes = nodes
        shapes = {n.name: n.shape for n in nodes}
        layers = {}
        for n in nodes:
            layer = _make_layer(n, shapes[n.inputs[0]] if n.inputs else n.shape, rngs)
            if layer is not None:
                layers[n.name] = layer
        self.layers = nnx.Dict(layers)
        sizes = {}
        for n in nodes:
            if n.op == "mask":
                sizes.setdefault(n.attr("group"), n.shape[-1])
        self.masks = nnx.Dict(
            {g: Mask(jnp.ones((c,), jnp.float32)) for g, c in sizes.items()}
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.nodes[0].shape

    @property
    def num_outputs(self) -> int:
        return self.nodes[-1].shape[-1]

    def population_size(self) -> int | None:
        """``P`` when the masks carry a leading population axis, else ``None``."""
        ndims = {m[...].ndim for m in self.masks.values()}
        if len(ndims) > 1:
            raise ValueError("all masks must have the same number of axes")
        return (
            None
            if not ndims or ndims == {1}
            else int(next(iter(self.masks.values()))[...].shape[0])
        )

    def __call__(
        self,
        x: jax.Array,
        *,
        keep_population_axis: bool = False,
        taps: tuple[str, ...] = (),
        given: dict[str, jax.Array] | None = None,
        parts: dict[str, jax.Array] | None = None,
    ) -> jax.Array:
        """Forward pass on a batch ``x`` of shape ``(B, *input_shape)``.

        With population masks of leading size ``P`` the result has shape
        ``(P, B, outputs)`` (``keep_population_axis`` is then implied).

        ``taps`` (node names) also returns those nodes' outputs: the result is then
        ``(outputs, {name: value})`` with values of shape ``(B, *node.shape)``, or
        ``(P, B, *node.shape)`` with population masks (or ``keep_population_axis``).
        The outputs are the same as without taps. Data-free probes and fitness
        metrics use it to read BatchNorm inputs and feature maps.

        ``given`` (node name -> value on ``x``) and ``parts`` (Conv node name ->
        its per-input-channel contributions, see
        :func:`~gapruning.models.masked_layers.per_channel_parts`) are work done
        beforehand (:func:`gapruning.forward.split_apply`): those nodes are not
        computed, nor what only they need.
        """
        if x.shape[1:] != self.input_shape:
            raise ValueError(
                f"input shape {x.shape[1:]} does not match the model's "
                f"{self.input_shape}"
            )
        unknown = sorted(set(taps) - {n.name for n in self.nodes})
        if unknown:
            raise ValueError(f"taps name unknown node(s) {unknown}")
        pop = self.population_size()
        if pop is not None:
            graphdef, masks, rest = nnx.split(self, Mask, ...)
            return jax.vmap(
                lambda m: nnx.merge(graphdef, m, rest)(
                    x, taps=taps, given=given, parts=parts
                )
            )(masks)
        vals = self.values(x, (self.nodes[-1].name, *taps), given, parts)
        out = vals[self.nodes[-1].name]
        if keep_population_axis:
            out = out[None]
        if not taps:
            return out
        tapped = {t: vals[t][None] if keep_population_axis else vals[t] for t in taps}
        return out, tapped

    def reads(self, n: Node, by_name: dict[str, Node]) -> tuple[str, ...]:
        """The nodes whose values computing ``n`` reads: a Dense/Conv layer reading
        a mask (directly or through a flatten) reads the mask's input, the mask
        itself being folded into the contraction."""
        mask = mask_read(n, by_name)
        return n.inputs if mask is None else (mask.inputs[0],)

    def values(
        self,
        x: jax.Array,
        targets: tuple[str, ...],
        given: dict[str, jax.Array] | None = None,
        parts: dict[str, jax.Array] | None = None,
    ) -> dict[str, jax.Array]:
        """Values of the nodes ``targets`` need (one individual's masks), computing
        only those; ``given`` and ``parts`` as in :meth:`__call__`."""
        given, parts = dict(given or {}), dict(parts or {})
        by_name = {n.name: n for n in self.nodes}
        needed, stack = set(), list(targets)
        while stack:
            name = stack.pop()
            if name in needed:
                continue
            needed.add(name)
            if name not in given and name not in parts:
                stack.extend(self.reads(by_name[name], by_name))
        vals: dict[str, jax.Array] = {}
        for n in self.nodes:
            if n.name not in needed:
                continue
            if n.name in given:
                y = given[n.name]
            elif n.name in parts:
                y = self._linear(n, vals, by_name, parts[n.name])
            elif n.op == "input":
                y = x
            elif n.op == "mask":
                y = vals[n.inputs[0]] * self.masks[n.attr("group")][...].astype(x.dtype)
            elif n.op == "add":
                y = sum((vals[i] for i in n.inputs[1:]), vals[n.inputs[0]])
            elif n.op in PRODUCERS:
                y = self._linear(n, vals, by_name)
            else:
                y = self._apply(n, vals[n.inputs[0]])
            vals[n.name] = y
        return vals

    def _masked_input(
        self, node: Node, vals, by_name
    ) -> tuple[jax.Array | None, jax.Array | None]:
        """The unmasked input of a Dense/Conv ``node`` (``None`` if not computed)
        and the mask over its input features, when it reads a mask (directly, or
        through a flatten)."""
        src = mask_read(node, by_name)
        if src is None:
            return vals[node.inputs[0]], None
        x = vals.get(src.inputs[0])
        mask = self.masks[src.attr("group")][...]
        if by_name[node.inputs[0]].op == "flatten":
            x = None if x is None else x.reshape(x.shape[0], -1)
            mask = jnp.tile(mask, math.prod(src.shape[:-1]))
        return x, mask

    def _linear(self, n: Node, vals, by_name, parts=None) -> jax.Array:
        """A Dense or Conv node; a masked input is handled by
        :func:`~gapruning.models.masked_layers.masked_contraction`, or mixes the
        node's precomputed per-channel ``parts``."""
        layer = self.layers[n.name]
        x, mask = self._masked_input(n, vals, by_name)
        if parts is not None:
            y = mix_parts(parts, mask.astype(parts.dtype))
        else:
            op = (
                dense_op
                if n.op == "dense"
                else conv_op(n.attr("strides"), n.attr("padding"))
            )
            kernel = layer.kernel[...]
            if mask is None:
                y = op(x, kernel)
            else:
                y = masked_contraction(op, x, mask.astype(x.dtype), kernel)
        return y if layer.bias is None else y + layer.bias[...]

    def _apply(self, n: Node, x: jax.Array) -> jax.Array:
        op = n.op
        if op == "batchnorm":
            return self.layers[n.name](x)
        if op == "relu":
            return jax.nn.relu(x)
        if op == "sigmoid":
            return jax.nn.sigmoid(x)
        if op == "softmax":
            return jax.nn.softmax(x, axis=-1)
        if op == "maxpool":
            return apply_pool(x, n, "max")
        if op == "avgpool":
            return apply_pool(x, n, "avg")
        if op == "global_avgpool":
            return x.mean(axis=(1, 2))
        if op == "flatten":
            return x.reshape(x.shape[0], -1)
        if op == "channel_map":
            s, index = n.attr("stride"), jnp.asarray(n.attr("index"))
            x = x[:, ::s, ::s, :]
            picked = jnp.take(x, jnp.maximum(index, 0), axis=-1)
            return jnp.where(index >= 0, picked, 0.0)
        raise ValueError(f"unknown op {op!r} in node {n.name!r}")


def abstract_net(nodes: tuple[Node, ...]) -> Net:
    """A :class:`Net` of ``nodes`` holding shapes only (no initialisation compute)."""
    return nnx.eval_shape(lambda: Net(nodes, rngs=nnx.Rngs(0)))


def assemble(nodes: tuple[Node, ...], layers: dict, masks: dict | None = None) -> Net:
    """A :class:`Net` of ``nodes`` holding the given variables, in eval mode.

    ``layers`` maps layer name -> {variable: array} in Flax layouts (the caller
    guarantees the shapes); ``masks`` defaults to all ones. Building from shapes
    avoids random initialisation, which would compile once per layer shape.
    """
    graphdef, state = nnx.split(abstract_net(nodes))
    if masks is None:
        masks = {
            g: jnp.ones(m.shape, m.dtype)
            for g, m in nnx.to_pure_dict(state).get("masks", {}).items()
        }
    layers = jax.tree.map(jnp.asarray, layers)
    nnx.replace_by_pure_dict(state, {"layers": layers, "masks": masks})
    model = nnx.merge(graphdef, state)
    model.eval()
    return model
