"""Token sequences of channels-first frameworks: vision transformers.

A framework's ``(N, T, C)`` token tensor is our ``(T, C)`` tensor of kind
``"tokens"``; its ``layout`` is ``"nhwc"`` when the framework sees ``(T, C)``
(channels last: Linear, LayerNorm and attention read it) and ``"nchw"`` when it
sees ``(C, T)`` (a feature map reshaped to ``(N, C, H * W)``, before it is
transposed). :class:`TokenOps` (mixed into
:class:`~gapruning.convert.nchw.NCHWGraph`) emits the patch tokens, the class
token and position embedding, the class token read before the head, and
multi-head self-attention as q, k, v Dense projections, an ``attention`` node
and the output projection.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .nchw_layout import Val


@dataclasses.dataclass(frozen=True)
class Batched:
    """A constant repeated over the batch (``class_token.expand(N, -1, -1)``)."""

    value: np.ndarray


class TokenOps:
    """Token-sequence operations (mixed into
    :class:`~gapruning.convert.nchw.NCHWGraph`)."""

    def tokens(self, x: Val, *, name: str) -> Val:
        """A feature map ``(C, H, W)`` viewed as ``(C, H * W)``."""
        x = self._need(x, ("map",), "token view", name)
        return Val(self.g.tokens(x.node, name=self.name(name)), "tokens")

    def prepend_tokens(self, parts: list, axis: int, *, name: str) -> Val:
        """``torch.cat([token, x], 1)``: learned tokens (batch-expanded
        constants of shape ``(1, K, C)``) before the tokens ``x``."""
        *consts, x = parts
        ok = isinstance(x, Val) and x.kind == "tokens" and x.layout == "nhwc"
        ok = ok and axis % 3 == 1 and all(isinstance(c, Batched) for c in consts)
        c = self.fw_shape(x)[-1] if ok else None
        values = [np.asarray(b.value, np.float32) for b in consts] if ok else []
        if not ok or any(v.ndim != 3 or v.shape[::2] != (1, c) for v in values):
            self.unsupported(
                f"concatenation {name!r} along axis {axis} (only learned tokens "
                "(1, K, C) put before a (N, T, C) token sequence)"
            )
        table = np.concatenate([v[0] for v in values])
        node = self.g.class_token(x.node, len(table), name=self.name(name))
        self.params[node] = {"embedding": table}
        return dataclasses.replace(x, node=node)

    def pos_embedding(self, x: Val, value, *, name: str) -> Val:
        """Adds a constant broadcast to the tokens' ``(T, C)`` (a learned
        position embedding)."""
        shape = self.g.shape(x.node)
        v = np.asarray(value, np.float32)
        if x.layout != "nhwc" or v.ndim > 3 or (v.ndim == 3 and v.shape[0] != 1):
            self.unsupported(
                f"addition {name!r} of a constant of shape {v.shape} to tokens of "
                f"shape {self.fw_shape(x)} (only (1, T, C) to (N, T, C))"
            )
        try:
            table = np.broadcast_to(v[0] if v.ndim == 3 else v, shape)
        except ValueError:
            self.unsupported(f"addition {name!r} of shape {v.shape} to {shape}")
        node = self.g.pos_embedding(x.node, name=self.name(name))
        self.params[node] = {"embedding": table.copy()}
        return dataclasses.replace(x, node=node)

    def select_token(self, x: Val, index, *, name: str) -> Val:
        """``x[:, i]`` of channels-last tokens: a vector."""
        full = slice(None, None, None)
        ok = x.kind == "tokens" and x.layout == "nhwc" and isinstance(index, tuple)
        ok = ok and len(index) == 2 and index[0] == full and type(index[1]) is int
        if not ok:
            self.unsupported(
                f"indexing {name!r} of tokens of shape {self.fw_shape(x)} with "
                f"{index!r} (only x[:, i] of (N, T, C) tokens)"
            )
        node = self.g.select_token(x.node, index[1], name=self.name(name))
        return Val(node, "flat")

    def self_attention(self, x: Val, weights, heads: int, *, name: str) -> Val:
        """Multi-head self-attention of channels-last tokens; ``weights`` holds
        the framework's ``(in_weight (3C, C), in_bias, out_weight (C, C),
        out_bias)`` (biases may be None)."""
        if x.kind != "tokens" or x.layout != "nhwc":
            self.unsupported(
                f"attention {name!r} of a tensor of shape {self.fw_shape(x)} (only "
                "(N, T, C) tokens)"
            )
        in_w, in_b, out_w, out_b = weights
        parts = np.split(np.asarray(in_w, np.float32), 3)
        biases = [None] * 3 if in_b is None else np.split(np.asarray(in_b), 3)
        qkv = [
            self.linear(x, w, b, name=f"{name}_{t}").node
            for w, b, t in zip(parts, biases, "qkv", strict=True)
        ]
        node = self.g.attention(*qkv, heads, name=self.name(name))
        return self.linear(
            dataclasses.replace(x, node=node), out_w, out_b, name=f"{name}_out"
        )
