"""A small Vision Transformer (Dosovitskiy et al., 2021) for 28x28 inputs.

Patch embedding (a strided convolution), a class token, learned position
embeddings, pre-norm encoder blocks (LayerNorm, multi-head self-attention, add;
LayerNorm, GELU MLP, add), a final LayerNorm and a classifier on the class
token. The prunable units are each block's attention heads and MLP hidden units,
and the residual stream's channels (one group, ``"stream"``: the patch
embedding, the tokens, every block's output projections and additions, the
LayerNorms, which normalize over the kept channels, and the classifier's input).
"""

from __future__ import annotations

from .graph import GraphBuilder, Node


def _attention_block(g: GraphBuilder, x: str, heads: int, name: str) -> str:
    width = g.shape(x)[-1]
    h = g.layernorm(x, epsilon=1e-6, name=name + "ln1")
    q, k, v = (g.dense(h, width, name=name + part) for part in ("q", "k", "v"))
    a = g.attention(q, k, v, heads, name=name + "attention")
    return g.add(x, g.dense(a, width, name=name + "proj"), name=name + "add1")


def _mlp_block(g: GraphBuilder, x: str, hidden: int, name: str) -> str:
    h = g.layernorm(x, epsilon=1e-6, name=name + "ln2")
    h = g.activation(g.dense(h, hidden, name=name + "fc1"), "gelu", name=name + "gelu")
    return g.add(x, g.dense(h, g.shape(x)[-1], name=name + "fc2"), name=name + "add2")


def vit(
    num_classes: int = 10,
    input_shape=(28, 28, 1),
    patch: int = 4,
    width: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp: int = 128,
) -> tuple[Node, ...]:
    """ViT of ``depth`` blocks on ``patch x patch`` patches, ``width`` channels
    in ``heads`` heads, MLPs of ``mlp`` hidden units."""
    g = GraphBuilder(input_shape)
    x = g.conv(g.input, width, patch, strides=patch, padding="VALID", name="patch")
    x = g.pos_embedding(g.class_token(g.tokens(x, name="tokens"), name="cls"))
    for i in range(depth):
        x = _attention_block(g, x, heads, f"b{i}_")
        x = _mlp_block(g, x, mlp, f"b{i}_")
    x = g.select_token(g.layernorm(x, epsilon=1e-6, name="ln"), 0, name="cls_out")
    return g.build(g.dense(x, num_classes, name="out"))
