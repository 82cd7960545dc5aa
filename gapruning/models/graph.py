"""A network as a small static graph of layers, executed by one NNX module.

Every model gapruning handles (the zoo, and later networks imported from PyTorch,
Keras or ONNX) is a :class:`Net`: an ordered tuple of :class:`Node` s (static, part
of the NNX graphdef) plus the parameters of the nodes that have any. One generic
description serves every later stage: the PruneSpace, the population forward pass
and physical compaction all read the same nodes instead of being written per model.

The nodes, :class:`GraphBuilder` and the channel-space analysis live in
:mod:`~gapruning.models.builder` (and are importable from here); this module
executes a node tuple.

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

import math

import jax
import jax.numpy as jnp
from flax import nnx

from .builder import (
    PRODUCERS,
    ChannelSpaces,
    GraphBuilder,
    Node,
    channel_spaces,
    input_mask,
    insert_masks,
    mask_read,
)
from .masked_layers import masked_contraction, mix_parts
from .ops import ShapeOp, apply_pool, op_of
from .ops.base import layer_vars

__all__ = [
    "PRODUCERS",
    "ChannelSpaces",
    "GraphBuilder",
    "Mask",
    "Net",
    "Node",
    "abstract_net",
    "apply_pool",
    "apply_shape_op",
    "assemble",
    "channel_spaces",
    "insert_masks",
    "mask_read",
]


class Mask(nnx.Variable):
    """0/1 float mask over the units of one prunable group (shape ``(units,)``)."""


# --------------------------------------------------------------------- executor


def apply_shape_op(n: Node, x: jax.Array) -> jax.Array:
    """A linear, parameter-free op with nonnegative coefficients (the table's
    :class:`~gapruning.models.ops.ShapeOp` s: pooling by averaging, flatten,
    channel_map) on ``x``."""
    op = op_of(n)
    if not isinstance(op, ShapeOp):
        raise ValueError(f"{n.op!r} (node {n.name!r}) is not a shape op")
    return op.shape_apply(n, x)


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
            in_shape = shapes[n.inputs[0]] if n.inputs else n.shape
            layer = op_of(n).layer(n, in_shape, rngs)
            if layer is not None:
                layers[n.name] = layer
        self.layers = nnx.Dict(layers)
        sizes = {}
        for n in nodes:
            for g, units in op_of(n).mask_groups(n).items():
                sizes.setdefault(g, units)
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
            elif op_of(n).uses_masks:
                mask = op_of(n).mask_vector(n, lambda g: self.masks[g][...])
                y = op_of(n).apply(n, mask, [vals[n.inputs[0]]])
            elif op_of(n).flow == "producer":
                y = self._linear(n, vals, by_name)
            elif op_of(n).needs_input_mask:
                p = layer_vars(self.layers[n.name] if n.name in self.layers else None)
                p["mask"] = input_mask(n, by_name, lambda g: self.masks[g][...])
                y = op_of(n).apply(n, p, [vals[i] for i in n.inputs])
            else:
                layer = self.layers[n.name] if n.name in self.layers else None
                y = op_of(n).apply(n, layer, [vals[i] for i in n.inputs])
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
        mask = op_of(src).mask_vector(src, lambda g: self.masks[g][...])
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
            op = op_of(n).contraction(n)
            kernel = layer.kernel[...]
            if mask is None:
                y = op(x, kernel)
            else:
                y = masked_contraction(op, x, mask.astype(x.dtype), kernel)
        return y if layer.bias is None else y + layer.bias[...]


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
