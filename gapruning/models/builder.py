"""The node tuple of a network: :class:`Node`, :class:`GraphBuilder`, and the
channel-space analysis that decides where :mod:`~gapruning.models.graph` puts masks.

A graph is an ordered tuple of :class:`Node` s, each naming its inputs and output
shape; :func:`channel_spaces` finds which tensors index the same units and
:func:`insert_masks` adds the ``mask`` nodes (see the module docstring of
:mod:`gapruning.models.graph`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from .ops import OPS, op_of

# The built-in producers of prunable units (the table's "producer" flow:
# :data:`~gapruning.models.ops.OPS`), for code that needs only their names.
PRODUCERS = frozenset({"dense", "conv"})


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
        """A dense layer on the last axis of a vector or of tokens ``(T, C)``."""
        shape = self.shape(x)
        if len(shape) not in (1, 2):
            raise ValueError(
                f"dense expects a vector or tokens (T, C), {x!r} has shape {shape}"
            )
        return self._add(
            "dense",
            self._name("dense", name),
            (x,),
            (*shape[:-1], features),
            features=features,
            use_bias=use_bias,
        )

    def _windowed(self, x, kernel_size, strides, padding, features):
        """(k, s, p, output shape) of a windowed op on ``x``."""
        h, w, _ = self.shape(x)
        k, s, p = _pair(kernel_size), _pair(strides), _norm_padding(padding)
        ph, pw = (p, p) if isinstance(p, str) else p
        shape = (
            _window_out(h, k[0], s[0], ph),
            _window_out(w, k[1], s[1], pw),
            features,
        )
        return k, s, p, shape

    def conv(
        self,
        x,
        features: int,
        kernel_size,
        *,
        strides=1,
        padding="SAME",
        use_bias: bool = True,
        groups: int = 1,
        name=None,
    ) -> str:
        """A convolution; ``groups`` equal to the input channels and to
        ``features`` is a depthwise ``dwconv``, other ``groups > 1`` with as many
        output channels as input channels a ``groupwise_conv`` (pruned in whole
        groups), any other a ``grouped_conv`` (not prunable)."""
        c = self.shape(x)[-1]
        k, s, p, shape = self._windowed(x, kernel_size, strides, padding, features)
        attrs = dict(kernel_size=k, strides=s, padding=p, use_bias=use_bias)
        if groups == 1:
            op, attrs["features"] = "conv", features
        elif groups == c == features:
            op = "dwconv"
        elif c % groups or features % groups:
            raise ValueError(
                f"conv of {c} -> {features} channels in {groups} groups: the "
                "groups must divide both"
            )
        elif c == features:
            op, attrs["groups"] = "groupwise_conv", groups
        else:
            op, attrs["features"], attrs["groups"] = "grouped_conv", features, groups
        return self._add(op, self._name(op, name), (x,), shape, **attrs)

    def batchnorm(self, x, *, epsilon=1e-5, momentum=0.9, name=None) -> str:
        return self._add(
            "batchnorm",
            self._name("bn", name),
            (x,),
            self.shape(x),
            epsilon=float(epsilon),
            momentum=float(momentum),
        )

    def layernorm(self, x, *, epsilon=1e-5, name=None) -> str:
        """LayerNorm over the channel axis (over the kept channels, when they
        are pruned)."""
        return self._add(
            "layernorm",
            self._name("ln", name),
            (x,),
            self.shape(x),
            epsilon=float(epsilon),
        )

    def relu(self, x, name=None) -> str:
        return self._add("relu", self._name("relu", name), (x,), self.shape(x))

    def sigmoid(self, x, name=None) -> str:
        return self._add("sigmoid", self._name("sigmoid", name), (x,), self.shape(x))

    def activation(self, x, op: str, *, name=None, **attrs) -> str:
        """An elementwise activation of the op table by name (``relu6``,
        ``hardswish``, ``hardsigmoid``, ``silu``, ``gelu`` with attribute
        ``approximate``...)."""
        from .ops.activations import Activation

        if not isinstance(OPS.get(op), Activation):
            known = sorted(k for k, v in OPS.items() if isinstance(v, Activation))
            raise ValueError(f"{op!r} is not an activation; known: {known}")
        return self._add(op, self._name(op, name), (x,), self.shape(x), **attrs)

    def mul(self, x, gate, name=None) -> str:
        """``x * gate``: a gate of ``x``'s shape, or per channel (``(C,)``)."""
        shape, g = self.shape(x), self.shape(gate)
        if g != shape and g != shape[-1:]:
            raise ValueError(
                f"mul of shapes {shape} and {g}: the gate must be "
                f"{shape} or {shape[-1:]}"
            )
        return self._add("mul", self._name("mul", name), (x, gate), shape)

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

    def adaptive_avgpool(self, x, output_size, name=None) -> str:
        """Average pooling to ``output_size`` positions, windows as PyTorch's
        ``AdaptiveAvgPool2d``."""
        h, w, c = self.shape(x)
        size = _pair(output_size)
        return self._add(
            "adaptive_avgpool",
            self._name("apool", name),
            (x,),
            (*size, c),
            output_size=size,
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

    def concat(self, *xs: str, name=None) -> str:
        """Concatenation along the channel (last) axis."""
        shapes = [self.shape(x) for x in xs]
        if len({s[:-1] for s in shapes}) != 1:
            raise ValueError(f"concat of tensors with different shapes: {shapes}")
        shape = (*shapes[0][:-1], sum(s[-1] for s in shapes))
        return self._add("concat", self._name("concat", name), xs, shape)

    def channel_shuffle(self, x, groups: int, name=None) -> str:
        """ShuffleNet's channel shuffle in ``groups`` groups; the channels it
        reads are not prunable."""
        c = self.shape(x)[-1]
        if groups < 1 or c % groups:
            raise ValueError(f"channel_shuffle of {c} channels in {groups} groups")
        return self._add(
            "channel_shuffle",
            self._name("shuffle", name),
            (x,),
            self.shape(x),
            groups=int(groups),
        )

    def tokens(self, x, name=None) -> str:
        """A feature map ``(H, W, C)`` as ``H * W`` tokens ``(H * W, C)``."""
        h, w, c = self._need_rank(x, 3, "tokens")
        return self._add("tokens", self._name("tokens", name), (x,), (h * w, c))

    def class_token(self, x, count: int = 1, name=None) -> str:
        """``count`` learned tokens put before the tokens ``x``."""
        t, c = self._need_rank(x, 2, "class_token")
        return self._add(
            "class_token", self._name("cls", name), (x,), (t + count, c), count=count
        )

    def pos_embedding(self, x, name=None) -> str:
        """Adds a learned ``(T, C)`` table to the tokens ``x``."""
        shape = self._need_rank(x, 2, "pos_embedding")
        return self._add("pos_embedding", self._name("pos", name), (x,), shape)

    def select_token(self, x, index: int = 0, name=None) -> str:
        """Token ``index`` of ``x``: ``(T, C) -> (C,)``."""
        t, c = self._need_rank(x, 2, "select_token")
        if not -t <= index < t:
            raise ValueError(f"select_token {index} of {t} tokens")
        return self._add(
            "select_token", self._name("token", name), (x,), (c,), index=index % t
        )

    def attention(self, q, k, v, heads: int, name=None) -> str:
        """Multi-head scaled dot-product attention of tokens ``q, k, v`` (the
        outputs of Dense projections, equal shapes ``(T, heads * head_dim)``);
        its prunable units are the heads."""
        shapes = {self._need_rank(x, 2, "attention") for x in (q, k, v)}
        (t, c), *rest = shapes
        if rest or heads < 1 or c % heads:
            raise ValueError(
                f"attention of shapes {sorted(shapes)} in {heads} heads: q, k and "
                "v must have one shape, its channels a multiple of the heads"
            )
        return self._add(
            "attention",
            self._name("attention", name),
            (q, k, v),
            (t, c),
            heads=int(heads),
            head_dim=c // heads,
        )

    def _need_rank(self, x, rank: int, op: str) -> tuple[int, ...]:
        shape = self.shape(x)
        if len(shape) != rank:
            want = "a feature map (H, W, C)" if rank == 3 else "tokens (T, C)"
            raise ValueError(f"{op} expects {want}, {x!r} has shape {shape}")
        return shape

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
    # space id -> the tensors a concatenation puts one after the other, for the
    # spaces made of pieces of others (a concat and channel-wise ops after it)
    pieces: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # space id -> channels per prunable unit, where more than one (attention heads)
    units: dict[int, int] = dataclasses.field(default_factory=dict)

    def unit_of(self, tensor: str) -> int:
        """Channels per prunable unit of ``tensor``'s space."""
        return self.units.get(self.space_of[tensor], 1)

    def mask_pieces(self, tensor: str, nodes_by_name) -> tuple[tuple[str, int], ...]:
        """``(group or "", width)`` of each piece of ``tensor``'s channels."""
        sid = self.space_of[tensor]
        if sid in self.pieces:
            return tuple(
                p for t in self.pieces[sid] for p in self.mask_pieces(t, nodes_by_name)
            )
        return ((self.prunable.get(sid, ""), nodes_by_name[tensor].shape[-1]),)


def channel_spaces(nodes: tuple[Node, ...]) -> ChannelSpaces:
    """Union-find over node outputs: ops whose flow (the op table's
    :data:`~gapruning.models.ops.FLOWS`) keeps or joins channels share a space."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    fixed_inputs: set[str] = set()  # tensors read by opaque ops
    for n in nodes:
        parent[n.name] = n.name
        flow = op_of(n).flow
        if flow in ("channelwise", "couple"):
            parent[n.name] = find(n.inputs[0])
        elif flow == "join":
            for other in n.inputs:
                parent[find(other)] = find(n.name)
        elif (
            flow == "reshape"
            and len(n.shape) == 1
            and n.shape == _shape(nodes, n.inputs[0])
        ):
            parent[n.name] = find(n.inputs[0])
        elif flow == "opaque":
            fixed_inputs.update(n.inputs)

    roots = sorted({find(n.name) for n in nodes}, key=[n.name for n in nodes].index)
    ids = {r: i for i, r in enumerate(roots)}
    space_of = {n.name: ids[find(n.name)] for n in nodes}

    members: dict[int, list[Node]] = {}
    for n in nodes:
        members.setdefault(space_of[n.name], []).append(n)
    output_space = space_of[nodes[-1].name]
    pieces, fixed_spaces = _concat_pieces(nodes, space_of, members)
    fixed_spaces |= {space_of[t] for t in fixed_inputs}
    units, mixed = _unit_widths(nodes, space_of, pieces)
    fixed_spaces |= mixed
    allowed = ("producer", "channelwise", "join", "remap")
    prunable, kinds = {}, {}
    for sid, ms in members.items():
        producers = [m for m in ms if op_of(m).flow == "producer"]
        fixed = [m for m in ms if op_of(m).flow not in allowed]
        if not producers or fixed or sid == output_space or sid in fixed_spaces:
            continue
        given = [op_of(m).group_name(m) for m in ms]
        free = [g for g in given if g and g not in prunable.values()]
        prunable[sid] = free[0] if free else producers[0].name
        kinds[sid] = "heads" if sid in units else producers[0].op
    return ChannelSpaces(space_of, prunable, kinds, pieces, units)


def _unit_widths(nodes, space_of, pieces):
    """``(units, fixed)``: channels per unit of the spaces whose ops group their
    channels (:meth:`~gapruning.models.ops.Op.unit_width`), and the spaces that
    cannot be pruned in such units (two different widths, or a piece of a
    concatenation)."""
    units, fixed = {}, set()
    for n in nodes:
        width = op_of(n).unit_width(n)
        if width > 1 and units.setdefault(space_of[n.name], width) != width:
            fixed.add(space_of[n.name])
    fixed |= {space_of[t] for ts in pieces.values() for t in ts} & set(units)
    return units, fixed


def _concat_pieces(nodes, space_of, members):
    """``(pieces, fixed)``: the composite spaces (a concat followed by channel-wise
    ops only) and their input tensors; the spaces that must not be pruned because
    a concatenation of them is mixed with something else (added, gated...)."""
    pieces, stack = {}, []
    for c in nodes:
        if op_of(c).flow != "concat":
            continue
        sid = space_of[c.name]
        others = [m for m in members[sid] if m.name != c.name]
        if all(op_of(m).flow == "channelwise" for m in others):
            pieces[sid] = c.inputs
        else:
            stack += [space_of[t] for t in c.inputs]
    fixed = set()
    while stack:  # a fixed space made of pieces fixes its pieces
        sid = stack.pop()
        if sid not in fixed:
            fixed.add(sid)
            stack += [space_of[t] for t in pieces.pop(sid, ())]
    return pieces, fixed


def _shape(nodes, name):
    return next(n.shape for n in nodes if n.name == name)


def insert_masks(nodes: tuple[Node, ...]) -> tuple[Node, ...]:
    """Adds one ``mask`` node after every prunable tensor that an op reading
    through masks (:attr:`~gapruning.models.ops.Op.reads_masked`: dense, conv,
    flatten, channel_map, layernorm) reads, and rewires those readers to it.
    Mask nodes already there are taken out first: the masks always follow the
    current rules, also in graphs saved by older versions."""
    nodes = _without_masks(nodes)
    spaces = channel_spaces(nodes)
    by_name = {n.name: n for n in nodes}
    mixing = {n.name for n in nodes if op_of(n).reads_masked}
    masks = {}  # tensor -> its mask node
    for n in nodes:
        for i in n.inputs if n.name in mixing else ():
            pieces = spaces.mask_pieces(i, by_name)
            if i in masks or not any(g for g, _ in pieces):
                continue
            if len(pieces) == 1:
                unit = spaces.unit_of(i)
                attrs = (("group", pieces[0][0]),) + ((("unit", unit),) * (unit > 1))
                masks[i] = Node("mask", f"{i}.mask", (i,), by_name[i].shape, attrs)
            else:
                attrs = (("pieces", pieces),)
                shape = by_name[i].shape
                masks[i] = Node("concat_mask", f"{i}.mask", (i,), shape, attrs)
    out: list[Node] = []
    for n in nodes:
        if n.name in mixing:
            n = dataclasses.replace(
                n, inputs=tuple(masks[i].name if i in masks else i for i in n.inputs)
            )
        out.append(n)
        if n.name in masks:
            out.append(masks[n.name])
    return tuple(out)


def _without_masks(nodes: tuple[Node, ...]) -> tuple[Node, ...]:
    """``nodes`` without mask nodes, their readers reading the masked tensors."""
    source = {n.name: n.inputs[0] for n in nodes if op_of(n).uses_masks}
    return tuple(
        dataclasses.replace(n, inputs=tuple(source.get(i, i) for i in n.inputs))
        for n in nodes
        if n.name not in source
    )


def mask_read(n: Node, by_name: dict[str, Node]) -> Node | None:
    """The mask node a Dense/Conv ``n`` reads (directly or through a flatten), or
    ``None``."""
    if op_of(n).flow != "producer":
        return None
    src = by_name[n.inputs[0]]
    if op_of(src).flow == "reshape" and by_name[src.inputs[0]].op == "mask":
        src = by_name[src.inputs[0]]
    return src if src.op == "mask" else None


def input_mask(n: Node, by_name: dict[str, Node], lookup):
    """The vector of the mask node ``n`` reads (``lookup(group)`` giving one
    group's mask), or ``None`` where ``n``'s input is not masked."""
    src = by_name[n.inputs[0]]
    op = op_of(src)
    return op.mask_vector(src, lookup) if op.uses_masks else None
