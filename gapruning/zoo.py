"""Pretrained models: the :class:`Pretrained` bundle, and loading/saving it.

A saved model is a directory holding ``model.json`` (the model card: graph,
architecture, input normalization, provenance, measured accuracy) and ``state/``
(an orbax checkpoint of every variable: parameters, BatchNorm statistics, masks).
Shipped models live in ``weights/<name>/`` and load by name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .models import Net, Node, abstract_net, assemble

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
CARD_FILE = "model.json"
STATE_DIR = "state"


class ModelFileError(RuntimeError):
    """A saved model is missing, incomplete, corrupt or inconsistent."""


@dataclasses.dataclass
class Pretrained:
    """A pretrained network: ``model`` (a :class:`Net`), its model ``card`` (dict).

    The card's ``"input"`` entry says what the model expects: ``shape`` (H, W, C),
    and ``mean``/``std`` mapping pixels in [0, 1] to model inputs.
    """

    model: Net
    card: dict[str, Any]

    @functools.cached_property
    def space(self):
        """The :class:`~gapruning.space.PruneSpace` of the model."""
        from .space import PruneSpace

        return PruneSpace(self.model)

    @property
    def name(self) -> str:
        return self.card.get("name", "model")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.model.input_shape

    @property
    def mean(self) -> float:
        return float(self.card.get("input", {}).get("mean", 0.0))

    @property
    def std(self) -> float:
        return float(self.card.get("input", {}).get("std", 1.0))

    def normalize(self, pixels: jax.Array) -> jax.Array:
        """Maps pixels in [0, 1] to the inputs the model expects."""
        return (pixels - self.mean) / self.std

    @property
    def input_box(self) -> tuple[float, float]:
        """The range of valid model inputs: pixels [0, 1] through the normalization."""
        box = self.card.get("input", {}).get("box")
        if box is not None:
            return float(box[0]), float(box[1])
        return (0.0 - self.mean) / self.std, (1.0 - self.mean) / self.std


# ------------------------------------------------------------------ graph <-> JSON


def _to_json(value):
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(value):
    if isinstance(value, list):
        return tuple(_from_json(v) for v in value)
    return value


def graph_to_json(nodes: tuple[Node, ...]) -> list[dict]:
    return [
        {
            "op": n.op,
            "name": n.name,
            "inputs": list(n.inputs),
            "shape": list(n.shape),
            "attrs": {k: _to_json(v) for k, v in n.attrs},
        }
        for n in nodes
    ]


def graph_from_json(items: list[dict]) -> tuple[Node, ...]:
    return tuple(
        Node(
            d["op"],
            d["name"],
            tuple(d["inputs"]),
            tuple(d["shape"]),
            tuple(sorted((k, _from_json(v)) for k, v in d.get("attrs", {}).items())),
        )
        for d in items
    )


# ------------------------------------------------------------------ save / load


def architecture_digest(net: Pretrained) -> str:
    """Hash of the graph (ops, names, inputs, shapes): equal for same-architecture
    models whatever their weights."""
    text = json.dumps([(n.op, n.name, n.inputs, n.shape) for n in net.model.nodes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _checkpointer():
    import orbax.checkpoint as ocp  # slow import, only when saving or loading

    return ocp.StandardCheckpointer()


def _path_name(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def check_finite(model: Net, where: str) -> None:
    """Raises :class:`ModelFileError` naming the first variable holding NaN or Inf."""
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))
    for path, leaf in leaves:
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ModelFileError(
                f"{where}: variable {_path_name(path)} contains NaN or Inf values"
            )


def save(
    pretrained: Pretrained, directory: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Writes ``pretrained`` to ``directory`` atomically.

    Everything is written to a temporary sibling directory which is renamed into
    place only once complete, so a crash never leaves a half-written model.
    """
    target = Path(directory).absolute()
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{target} already exists and is not empty "
            "(pass overwrite=True / --overwrite to replace it)"
        )
    check_finite(pretrained.model, f"refusing to save {pretrained.name}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        card = dict(pretrained.card, graph=graph_to_json(pretrained.model.nodes))
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
        ckpt = _checkpointer()
        ckpt.save(tmp / STATE_DIR, nnx.to_pure_dict(nnx.state(pretrained.model)))
        ckpt.wait_until_finished()
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            tmp.rename(target)
            shutil.rmtree(old)
        else:
            tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve(name_or_dir: str | os.PathLike) -> Path:
    path = Path(name_or_dir)
    if path.is_dir():
        return path.absolute()
    shipped = WEIGHTS_DIR / str(name_or_dir)
    if shipped.is_dir():
        return shipped
    known = shipped_models()
    raise ModelFileError(
        f"no model {str(name_or_dir)!r}: not a directory and not a shipped "
        f"model; shipped models: {', '.join(known) or 'none'}"
    )


def load(name_or_dir: str | os.PathLike) -> Pretrained:
    """Loads a shipped model by name (``"lenet300-fmnist"``) or a saved directory."""
    path = _resolve(name_or_dir)
    card_file = path / CARD_FILE
    if not card_file.is_file():
        raise ModelFileError(
            f"{path} has no {CARD_FILE}: not a gapruning model directory"
        )
    try:
        card = json.loads(card_file.read_text())
        nodes = graph_from_json(card["graph"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ModelFileError(f"{card_file} is corrupt or incomplete: {err!r}") from None
    abstract = nnx.to_pure_dict(nnx.state(abstract_net(nodes)))
    if not (path / STATE_DIR).is_dir():
        raise ModelFileError(f"{path} has no {STATE_DIR}/ checkpoint directory")
    restored = _restore(path / STATE_DIR, abstract)
    _keep_new_groups(restored, abstract)
    _check_shapes(restored, abstract, path)
    model = assemble(nodes, restored["layers"], restored.get("masks"))
    check_finite(model, str(path))
    card = {k: v for k, v in card.items() if k != "graph"}
    return Pretrained(model, card)


def _restore(ckpt_dir: Path, abstract):
    ckpt = _checkpointer()
    try:
        return ckpt.restore(ckpt_dir)
    except Exception as err:  # orbax raises many types for damaged files
        raise ModelFileError(
            f"cannot read checkpoint {ckpt_dir}: {type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}"
        ) from None


def _keep_new_groups(restored, abstract) -> None:
    """All-ones masks for the groups a model saved by an older version did not
    have (channels that version could not prune: every unit was kept)."""
    if "masks" not in abstract:
        return
    masks = restored.setdefault("masks", {})
    for group, spec in abstract["masks"].items():
        if group not in masks:
            masks[group] = np.ones(spec.shape, spec.dtype)


def _check_shapes(restored, abstract, path: Path) -> None:
    got = {
        _path_name(p): np.shape(v)
        for p, v in jax.tree_util.tree_leaves_with_path(restored)
    }
    want = {
        _path_name(p): tuple(v.shape)
        for p, v in jax.tree_util.tree_leaves_with_path(abstract)
    }
    for key, shape in want.items():
        if key not in got:
            raise ModelFileError(
                f"{path}: checkpoint lacks variable {key} "
                f"(the card's graph expects shape {shape})"
            )
        if got[key] != shape:
            raise ModelFileError(
                f"{path}: variable {key} has shape {got[key]} in the "
                f"checkpoint but {shape} in the card's graph"
            )
    extra = sorted(set(got) - set(want))
    if extra:
        raise ModelFileError(
            f"{path}: checkpoint holds variables the card's graph does not "
            f"have: {', '.join(extra[:5])}"
        )


def shipped_models() -> list[str]:
    """Names of the models in ``weights/``."""
    return sorted(
        p.name
        for p in WEIGHTS_DIR.iterdir()
        if not p.name.startswith(".") and (p / CARD_FILE).is_file()
    )
