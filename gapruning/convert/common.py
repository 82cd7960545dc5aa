"""Pieces every converter shares: errors, weight loading with shape checks, cards.

An imported network is a :class:`~gapruning.models.Net` built from a node tuple
(so masks and channel couplings come from the graph itself) whose layer variables
are then overwritten with the source framework's weights, converted to Flax
layouts beforehand: ``nnx.Linear`` kernel ``(in, out)``, ``nnx.Conv`` kernel
``HWIO``, ``nnx.BatchNorm`` ``scale``/``bias``/``mean``/``var``.

Input range: the card records ``input.box``, the range of valid inputs as the
imported model receives them (already normalized, hence ``mean=0``, ``std=1``).
Without an explicit ``input_box`` the converters record :data:`DEFAULT_INPUT_BOX`
and mark it with ``input.box_source = "default"``.
"""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..models.graph import Node, abstract_net, assemble
from ..models.ops import op_of
from ..zoo import ModelFileError, Pretrained

DEFAULT_INPUT_BOX = (0.0, 1.0)
"""Input range assumed when an importer is given no ``input_box``: raw pixels."""


class ConversionError(ValueError):
    """A model cannot be converted: unsupported layer, wrong shape, bad option."""


class UnsupportedLayerError(ConversionError):
    """The source model uses a layer or op the converter does not support."""


class ShapeMismatchError(ConversionError):
    """A source tensor does not have the shape the target graph needs."""


class ModelFormatError(ConversionError, ModelFileError):
    """A file is unreadable, truncated, or holds no model of the expected kind."""


def sanitize(name: str) -> str:
    """A node name made of ``[A-Za-z0-9_]`` from any framework's layer name."""
    clean = re.sub(r"[^A-Za-z0-9_]+", "_", str(name)).strip("_")
    return clean or "node"


def unique_name(name: str, taken: set[str]) -> str:
    """``sanitize(name)``, suffixed with ``_2``, ``_3``... until not in ``taken``."""
    base = sanitize(name)
    out, k = base, 2
    while out in taken:
        out, k = f"{base}_{k}", k + 1
    taken.add(out)
    return out


def chw_rows_to_hwc(rows: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """Reorders the rows of a kernel that reads a ``C,H,W``-flattened tensor so it
    reads our ``H,W,C``-flattened tensor instead (first axis is the input axis)."""
    c, h, w = chw
    return _reorder_rows(rows, (c, h, w), (1, 2, 0))


def hwc_rows_to_chw(rows: np.ndarray, chw: tuple[int, int, int]) -> np.ndarray:
    """Inverse of :func:`chw_rows_to_hwc`."""
    c, h, w = chw
    return _reorder_rows(rows, (h, w, c), (2, 0, 1))


def _reorder_rows(rows: np.ndarray, grid: tuple[int, int, int], perm) -> np.ndarray:
    """Rows read as a ``grid``-shaped tensor, its axes permuted by ``perm``."""
    rest = rows.shape[1:]
    return (
        rows.reshape(*grid, *rest)
        .transpose(*perm, *range(3, rows.ndim + 2))
        .reshape(int(np.prod(grid)), *rest)
    )


def pair(v) -> tuple[int, int]:
    """``(v, v)`` for an int, else the two ints of ``v`` (kernel sizes, strides)."""
    if isinstance(v, int):
        return (int(v), int(v))
    return tuple(int(a) for a in v)


def flatten_source(nodes: tuple[Node, ...], name: str) -> Node | None:
    """The ``flatten`` node that feeds ``name`` through channel-wise ops only, if its
    input was a spatial ``(H, W, C)`` map with more than one position and channel
    (that is, where C,H,W and H,W,C flattening orders differ)."""
    by_name = {n.name: n for n in nodes}
    node = by_name[name]
    cur = by_name[node.inputs[0]]
    while op_of(cur).flow == "channelwise" and cur.inputs:
        cur = by_name[cur.inputs[0]]
    if cur.op != "flatten":
        return None
    shape = by_name[cur.inputs[0]].shape
    if len(shape) == 3 and shape[0] * shape[1] > 1 and shape[2] > 1:
        return cur
    return None


def build_pretrained(
    nodes: tuple[Node, ...],
    params: dict[str, dict[str, np.ndarray]],
    card: dict[str, Any],
    *,
    source: str,
) -> Pretrained:
    """A :class:`Net` of ``nodes`` holding ``params`` (Flax layouts), in eval mode.

    Every layer of the graph must receive every one of its variables; each array
    must have exactly the shape the layer has. ``source`` names the origin in
    error messages.
    """
    abstract = abstract_net(nodes)
    want = nnx.to_pure_dict(nnx.state(abstract))
    ops = {n.name: n.op for n in abstract.nodes}
    layers = {}
    for name, variables in want.get("layers", {}).items():
        given = params.get(name)
        if given is None:
            raise ConversionError(f"{source}: no weights for layer {name!r}")
        extra = sorted(set(given) - set(variables))
        if extra:
            raise ConversionError(
                f"{source}: layer {name!r} ({ops[name]}) has no {', '.join(extra)} "
                "but weights were given for it"
            )
        layers[name] = {}
        for var, spec in variables.items():
            if var not in given:
                raise ConversionError(f"{source}: layer {name!r} lacks its {var}")
            value = np.asarray(given[var], dtype=np.float32)
            if value.shape != tuple(spec.shape):
                raise ShapeMismatchError(
                    f"{source}: {name}.{var} has shape {value.shape}, "
                    f"the layer needs {tuple(spec.shape)}"
                )
            layers[name][var] = jnp.asarray(value)
    unused = sorted(set(params) - set(layers))
    if unused:
        raise ConversionError(
            f"{source}: weights given for unknown layers {', '.join(unused)}"
        )
    return Pretrained(assemble(nodes, layers), card)


def imported(
    nodes: tuple[Node, ...],
    params: dict[str, dict[str, np.ndarray]],
    *,
    source: str,
    **card: Any,
) -> Pretrained:
    """What an importer returns: :func:`build_pretrained` of ``nodes`` and
    ``params`` with the card ``make_card(model=nodes, **card)``."""
    card = make_card(model=nodes, **card)
    return build_pretrained(nodes, params, card, source=source)


def make_card(
    *,
    framework: str,
    model: tuple[Node, ...],
    name: str | None,
    file: str | os.PathLike | None,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    input_box: tuple[float, float] | None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card of an imported network (see module docstring)."""
    try:
        from importlib.metadata import version

        converter = f"gapruning {version('gapruning')}"
    except Exception:  # running from a source tree that is not installed
        converter = "gapruning"
    if input_box is None:
        box, box_source = DEFAULT_INPUT_BOX, "default"
    else:
        box, box_source = check_box(input_box), "user"
    default_name = Path(file).stem if file is not None else (arch or "imported")
    origin = {
        "framework": framework,
        "file": str(file) if file is not None else None,
        "arch": arch,
        "converted_by": converter,
        "date": datetime.date.today().isoformat(),
    }
    origin.update(extra or {})
    card = {
        "name": name or sanitize(default_name),
        "arch": arch or "imported",
        "num_classes": int(model[-1].shape[-1]),
        "input": {
            "shape": list(model[0].shape),
            "mean": 0.0,
            "std": 1.0,
            "box": [float(box[0]), float(box[1])],
            "box_source": box_source,
        },
        "origin": origin,
    }
    if arch_kwargs:
        card["arch_kwargs"] = dict(arch_kwargs)
    if box_source == "default":
        card["input"]["box_note"] = (
            "no input_box given at conversion: assumed inputs in "
            f"[{box[0]}, {box[1]}] (raw pixels); pass input_box=(low, high) for "
            "the range the model really receives"
        )
    return card


def check_box(box) -> tuple[float, float]:
    """``(low, high)`` as floats, with ``low < high`` and both finite."""
    try:
        lo, hi = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ConversionError(
            f"input_box must be a pair (low, high), got {box!r}"
        ) from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ConversionError(f"input_box must have finite low < high, got {box!r}")
    return lo, hi


def check_input_shape(shape) -> tuple[int, ...]:
    """``shape`` as a tuple of positive ints, ``(H, W, C)`` or ``(F,)``."""
    try:
        out = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise ConversionError(
            f"input_shape must be a tuple of ints, got {shape!r}"
        ) from None
    if len(out) not in (1, 3) or min(out) < 1:
        raise ConversionError(
            f"input_shape must be (H, W, C) or (features,) with positive sizes, "
            f"got {shape!r}"
        )
    return out
