"""One traced ``torch.fx`` call (module, function or method) into :class:`NCHWGraph`.

Each translator takes the graph, the call and its already-translated arguments,
and returns the translated value; anything without a translation goes to
``unsupported(what)``, which raises with the call's position.
"""

from __future__ import annotations

import operator

import numpy as np

from .common import pair, sanitize
from .nchw import NCHWGraph, Val
from .nchw_layout import chunk_sizes
from .nchw_tokens import Batched
from .torch_state import conv_pads, flax_momentum


def _np(t):
    return None if t is None else t.detach().cpu().float().numpy()


def module_call(g: NCHWGraph, mod, target, args, unsupported, kw=None):
    """The call of submodule ``mod`` (named ``target``) on ``args`` and ``kw``."""
    from torch import nn

    name = sanitize(target)
    x = args[0] if args else None
    if isinstance(mod, nn.MultiheadAttention):
        return _attention_module(g, mod, target, args, kw or {}, unsupported)
    if not isinstance(x, Val) or len(args) != 1:
        unsupported(f"call of {target!r} ({type(mod).__name__}) with these arguments")
    if isinstance(mod, nn.Linear):
        return g.linear(x, _np(mod.weight), _np(mod.bias), name=name)
    if isinstance(mod, nn.Conv2d):
        return _conv_module(g, mod, target, x, unsupported)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _batchnorm_module(g, mod, target, x, unsupported)
    if isinstance(mod, nn.ReLU):
        return g.relu(x, name=name)
    if isinstance(mod, nn.Sigmoid):
        return g.sigmoid(x, name=name)
    act = _module_activation(mod)
    if act is not None:
        return g.activation(x, act[0], name=name, **act[1])
    if isinstance(mod, nn.Softmax):
        return g.softmax(x, -1 if mod.dim is None else mod.dim, name=name)
    if isinstance(mod, nn.LayerNorm):
        return _layernorm_module(g, mod, target, x, unsupported)
    if isinstance(mod, (nn.Dropout, nn.Dropout2d, nn.Identity)):
        return x
    if isinstance(mod, nn.Flatten):
        if mod.start_dim != 1 or mod.end_dim != -1:
            unsupported(f"layer {target!r} (Flatten({mod.start_dim}, {mod.end_dim}))")
        return g.flatten(x, name=name)
    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)):
        return _pool_module(g, mod, target, x, unsupported)
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        if None in pair_or_none(mod.output_size):
            unsupported(f"layer {target!r} (AdaptiveAvgPool2d({mod.output_size}))")
        return g.adaptive_avgpool(x, pair(mod.output_size), name=name)
    unsupported(f"layer {target!r} ({type(mod).__name__})")


def _attention_module(g: NCHWGraph, mod, target, args, kw, unsupported):
    """``nn.MultiheadAttention`` as self-attention of ``(N, T, C)`` tokens:
    ``(output, None)`` (the attention weights are not computed)."""
    names = ["query", "key", "value", "key_padding_mask", "need_weights"]
    bound = _bind([*names, "attn_mask", "average_attn_weights", "is_causal"], args, kw)
    q = bound.get("query")
    same = bound.get("key") is q and bound.get("value") is q
    limits = {
        "not self-attention (query, key and value differ)": not same,
        "a query that is not a tensor": not isinstance(q, Val),
        "batch_first=False": not mod.batch_first,
        "kdim/vdim other than embed_dim": mod.in_proj_weight is None,
        "bias_k/bias_v": mod.bias_k is not None,
        "add_zero_attn": mod.add_zero_attn,
        "a mask": any(
            bound.get(k) is not None for k in ("key_padding_mask", "attn_mask")
        ),
        "is_causal": bool(bound.get("is_causal", False)),
    }
    missing = [what for what, bad in limits.items() if bad]
    if missing:
        unsupported(f"layer {target!r} (MultiheadAttention with {', '.join(missing)})")
    out = mod.out_proj
    weights = (
        _np(mod.in_proj_weight),
        _np(mod.in_proj_bias),
        _np(out.weight),
        _np(out.bias),
    )
    return g.self_attention(q, weights, mod.num_heads, name=sanitize(target)), None


def _module_activation(mod) -> tuple[str, dict] | None:
    """``(op, attrs)`` of an activation module of the op table, else None."""
    from torch import nn

    if isinstance(mod, nn.Hardtanh) and (mod.min_val, mod.max_val) == (0.0, 6.0):
        return "relu6", {}
    if isinstance(mod, nn.GELU):
        return "gelu", {"approximate": mod.approximate == "tanh"}
    simple = {nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid", nn.SiLU: "silu"}
    op = simple.get(type(mod))
    return None if op is None else (op, {})


def pair_or_none(v) -> tuple:
    """``(v, v)`` for a single value, else the tuple (entries may be None)."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def ceil_pads(in_hw, k, s, p) -> tuple[int, int]:
    """Extra bottom/right padding that makes a pooling window count of
    ``ceil_mode=True`` (PyTorch's rule: the last window starts inside the input
    or its left padding)."""
    extra = []
    for size, kk, ss, pp in zip(in_hw, k, s, p, strict=True):
        out = -(-(size + 2 * pp - kk) // ss) + 1
        if (out - 1) * ss >= size + pp:
            out -= 1
        extra.append(max((out - 1) * ss + kk - (size + 2 * pp), 0))
    return tuple(extra)


def _conv_module(g: NCHWGraph, mod, target, x, unsupported):
    if tuple(mod.dilation) != (1, 1):
        unsupported(f"layer {target!r} (Conv2d with dilation={tuple(mod.dilation)})")
    if mod.padding_mode != "zeros":
        unsupported(f"layer {target!r} (Conv2d padding_mode={mod.padding_mode!r})")
    (t, b), (left, r) = conv_pads(mod, tuple(mod.kernel_size))
    return g.conv(
        x,
        _np(mod.weight),
        _np(mod.bias),
        strides=tuple(mod.stride),
        pads=(t, left, b, r),
        groups=mod.groups,
        name=sanitize(target),
    )


def _layernorm_module(g: NCHWGraph, mod, target, x, unsupported):
    norm = (mod.normalized_shape, _np(mod.weight), _np(mod.bias), mod.eps)
    return layer_norm(g, x, norm, target, f"layer {target!r}", unsupported)


def layer_norm(g: NCHWGraph, x, norm, name, what, unsupported):
    """LayerNorm ``norm = (shape, weight, bias, eps)`` over one axis: the
    features of a vector or the channels of a channels-last map (missing
    weight/bias: ones/zeros)."""
    shape, weight, bias, eps = norm
    shape = tuple(shape)
    if len(shape) != 1 or shape[0] != g.fw_shape(x)[-1]:
        unsupported(
            f"{what} (LayerNorm{shape} of a tensor of shape {g.fw_shape(x)}; only "
            "over the last axis, the features of a vector or the channels of a "
            "channels-last map)"
        )
    c = shape[0]
    return g.layernorm(
        x,
        np.ones(c, np.float32) if weight is None else weight,
        np.zeros(c, np.float32) if bias is None else bias,
        epsilon=eps,
        name=sanitize(name),
    )


def _batchnorm_module(g: NCHWGraph, mod, target, x, unsupported):
    if mod.running_mean is None:
        unsupported(f"layer {target!r} (BatchNorm without running statistics)")
    c = mod.num_features
    return g.batchnorm(
        x,
        _np(mod.weight) if mod.affine else np.ones(c, np.float32),
        _np(mod.bias) if mod.affine else np.zeros(c, np.float32),
        _np(mod.running_mean),
        _np(mod.running_var),
        epsilon=mod.eps,
        momentum=flax_momentum(mod.momentum),
        name=sanitize(target),
    )


def _pool_module(g: NCHWGraph, mod, target, x, unsupported):
    from torch import nn

    name = sanitize(target)
    is_max = isinstance(mod, nn.MaxPool2d)
    if (mod.ceil_mode and not is_max) or (is_max and pair(mod.dilation) != (1, 1)):
        unsupported(f"layer {target!r} ({type(mod).__name__} with ceil_mode/dilation)")
    k, s, p = (
        pair(mod.kernel_size),
        pair(mod.stride or mod.kernel_size),
        pair(mod.padding),
    )
    eh, ew = ceil_pads(g.fw_shape(x)[1:], k, s, p) if mod.ceil_mode else (0, 0)
    pads = (p[0], p[1], p[0] + eh, p[1] + ew)
    if isinstance(mod, nn.MaxPool2d):
        if mod.return_indices:
            unsupported(f"layer {target!r} (MaxPool2d returning indices)")
        return g.maxpool(x, k, s, pads, name=name)
    if mod.divisor_override is not None:
        unsupported(f"layer {target!r} (AvgPool2d with divisor_override)")
    return g.avgpool(x, k, s, pads, count_include_pad=mod.count_include_pad, name=name)


def function_call(g: NCHWGraph, n, args, kw, unsupported, torch, F):
    """The call of function ``n.target`` (torch, ``F`` or operator) on ``args``."""
    fn = n.target
    name = sanitize(n.name)
    x = args[0] if args else None
    if fn in (torch.relu, F.relu, torch.nn.functional.relu):
        return g.relu(x, name=name)
    if fn in (torch.sigmoid, F.sigmoid):
        return g.sigmoid(x, name=name)
    act = _function_activation(fn, kw, torch, F)
    if act is not None:
        return g.activation(x, act[0], name=name, **act[1])
    if fn in (torch.softmax, F.softmax):
        dim = args[1] if len(args) > 1 else kw.get("dim")
        return g.softmax(x, -1 if dim is None else dim, name=name)
    if fn is torch.flatten:
        start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kw.get("end_dim", -1)
        if start != 1 or end != -1:
            unsupported(f"call {n.name!r} (torch.flatten from dim {start} to {end})")
        return g.flatten(x, name=name)
    if fn in (F.dropout, F.dropout2d):
        return x
    if getattr(fn, "__name__", "") == "stochastic_depth":  # torchvision.ops
        training = args[3] if len(args) > 3 else kw.get("training", True)
        if training:
            unsupported(f"call {n.name!r} (stochastic_depth in training mode)")
        return x
    if fn in (F.max_pool2d, F.avg_pool2d, torch.max_pool2d):
        is_max = fn is not F.avg_pool2d
        return _pool_function(g, n, args, kw, unsupported, is_max=is_max)
    if fn in (F.adaptive_avg_pool2d,):
        size = args[1] if len(args) > 1 else kw.get("output_size")
        if None in pair_or_none(size):
            unsupported(f"call {n.name!r} (adaptive_avg_pool2d to {size})")
        return g.adaptive_avgpool(x, pair(size), name=name)
    if fn is F.layer_norm:
        bound = _bind(["input", "normalized_shape", "weight", "bias", "eps"], args, kw)
        norm = (bound["normalized_shape"], bound.get("weight"), bound.get("bias"))
        norm += (bound.get("eps", 1e-5),)
        return layer_norm(g, x, norm, n.name, f"call {n.name!r}", unsupported)
    if fn in (torch.permute, torch.transpose, torch.chunk, torch.split):
        if not isinstance(x, Val):
            unsupported(f"call {n.name!r} ({fn.__name__} of a non-tensor)")
        return layout_call(g, n, fn.__name__, args, kw, unsupported)
    if fn is operator.getitem and isinstance(x, (tuple, list)):
        return x[args[1]]  # a part of a chunk/split, or of x.size()
    if fn in _INT_OPS and _plain_ints(args):
        return fn(*args)  # shape arithmetic (channels per group, patch counts)
    if fn is getattr and args[1:] == ["shape"] and isinstance(x, Val):
        return _size(g, x, None)
    if fn is torch._assert:
        if args[0] is False:
            unsupported(f"call {n.name!r} (torch._assert failed: {args[1]})")
        return None
    if fn is torch.cat:
        dim = args[1] if len(args) > 1 else kw.get("dim", 0)
        if any(isinstance(v, Batched) for v in x):
            return g.prepend_tokens(list(x), dim, name=name)
        if not all(isinstance(v, Val) for v in x):
            unsupported(f"call {n.name!r} (torch.cat of non-tensors)")
        return g.concat(list(x), dim, name=name)
    if fn is operator.getitem and isinstance(x, Val) and x.kind == "tokens":
        return g.select_token(x, args[1], name=name)
    if fn is operator.getitem and isinstance(x, Val):
        stride = _spatial_stride(args[1])
        if stride is None:
            unsupported(f"indexing {n.name!r} ({args[1]!r}; only x[:, :, ::s, ::s])")
        return g.subsample(x, stride, name=name)
    if fn is F.pad and isinstance(x, Val):
        return _pad_function(g, n, args, kw, unsupported)
    out = _arithmetic(g, n, args, kw, unsupported, torch)
    if out is None:
        unsupported(f"call {n.name!r} ({getattr(fn, '__name__', fn)})")
    return out


_INT_OPS = frozenset({operator.floordiv, operator.mul, operator.eq})


def _bind(names, args, kw) -> dict:
    """Positional ``args`` named by ``names``, with the keywords ``kw``."""
    return dict(zip(names, args, strict=False)) | kw


def _plain_ints(values) -> bool:
    return all(isinstance(v, int) and not isinstance(v, _Size) for v in values)


def layout_call(g: NCHWGraph, n, m, args, kw, unsupported):
    """``permute``, ``transpose``, ``chunk`` or ``split`` (method or function)."""
    x, name = args[0], sanitize(n.name)
    if m == "permute":
        dims = kw.get("dims", args[1:])
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
        return g.permute(x, dims, name=name)
    if m == "transpose":
        a = _bind(["input", "dim0", "dim1"], args, kw)
        return g.transpose(x, a["dim0"], a["dim1"], name=name)
    c = g.fw_shape(x)[0]  # the channels, where split can apply
    if m == "chunk":
        a = _bind(["input", "chunks", "dim"], args, kw)
        sizes = chunk_sizes(c, a["chunks"])
    else:
        a = _bind(["input", "split_size_or_sections", "dim"], args, kw)
        sizes = a.get("split_size_or_sections", a.get("split_size"))
        if isinstance(sizes, int):
            sizes = [min(sizes, c - s) for s in range(0, c, sizes)]
    return tuple(g.split(x, list(sizes), a.get("dim", 0), name=name))


def _function_activation(fn, kw, torch, F) -> tuple[str, dict] | None:
    """``(op, attrs)`` of an activation function of the op table, else None."""
    if fn is F.gelu:
        return "gelu", {"approximate": kw.get("approximate", "none") == "tanh"}
    simple = {
        F.relu6: "relu6",
        F.hardswish: "hardswish",
        F.hardsigmoid: "hardsigmoid",
        F.silu: "silu",
    }
    op = simple.get(fn)
    return None if op is None else (op, {})


def _pool_function(g: NCHWGraph, n, args, kw, unsupported, *, is_max: bool):
    names = ["input", "kernel_size", "stride", "padding"] + (
        ["dilation", "ceil_mode", "return_indices"]
        if is_max
        else ["ceil_mode", "count_include_pad", "divisor_override"]
    )
    bound = dict(zip(names, args, strict=False)) | kw
    k = pair(bound["kernel_size"])
    st = bound.get("stride")
    s = pair(st) if st not in (None, [], ()) else k
    ph, pw = pair(bound.get("padding", 0))
    if (
        (bound.get("ceil_mode") and not is_max)
        or bound.get("return_indices")
        or bound.get("divisor_override") is not None
        or pair(bound.get("dilation", 1)) != (1, 1)
    ):
        unsupported(f"call {n.name!r} ({n.target.__name__} with ceil_mode/dilation)")
    x, name = args[0], sanitize(n.name)
    if is_max:
        extra = (0, 0)
        if bound.get("ceil_mode"):
            extra = ceil_pads(g.fw_shape(x)[1:], k, s, (ph, pw))
        return g.maxpool(x, k, s, (ph, pw, ph + extra[0], pw + extra[1]), name=name)
    return g.avgpool(
        x,
        k,
        s,
        (ph, pw, ph, pw),
        count_include_pad=bound.get("count_include_pad", True),
        name=name,
    )


def _pad_function(g: NCHWGraph, n, args, kw, unsupported):
    """``F.pad`` of the channel axis with zeros (a shortcut's extra channels)."""
    pad = tuple(args[1] if len(args) > 1 else kw["pad"])
    mode = args[2] if len(args) > 2 else kw.get("mode", "constant")
    value = args[3] if len(args) > 3 else kw.get("value", None)
    if mode != "constant" or value not in (None, 0, 0.0) or len(pad) != 6:
        unsupported(f"call {n.name!r} (F.pad{pad}; only zero channel padding)")
    if any(pad[:4]) or min(pad) < 0:
        unsupported(f"call {n.name!r} (F.pad{pad}; only zero channel padding)")
    x = args[0]
    c = g.fw_shape(x)[0]
    index = (-1,) * pad[4] + tuple(range(c)) + (-1,) * pad[5]
    return g.select_channels(x, index, name=sanitize(n.name))


def _arithmetic(g: NCHWGraph, n, args, kw, unsupported, torch):
    """``a + b``, ``x + c`` or ``x * c`` (``c`` a number); None for anything else."""
    fn, name = n.target, sanitize(n.name)
    if fn in (operator.add, operator.iadd, torch.add):
        a, b = args[0], args[1]
        if kw.get("alpha", 1) != 1:
            unsupported(f"call {n.name!r} (torch.add with alpha)")
        if isinstance(a, Val) and isinstance(b, Val):
            return g.add(a, b, name=name)
        v, c = (a, b) if isinstance(a, Val) else (b, a)
        if isinstance(v, Val) and isinstance(c, (int, float, np.ndarray)):
            return g.affine(v, shift=c, name=name)
    if fn in (operator.mul, torch.mul):
        a, b = args[0], args[1]
        if isinstance(a, Val) and isinstance(b, Val):
            return g.mul(a, b, name=name)
        v, c = (a, b) if isinstance(a, Val) else (b, a)
        if isinstance(v, Val) and isinstance(c, (int, float, np.ndarray)):
            return g.affine(v, scale=c, name=name)  # a layer scale, a constant
    return None


def _spatial_stride(index) -> int | None:
    """``s`` for an index ``[:, :, ::s, ::s]`` (or ``[:, :]``), else None."""
    index = index if isinstance(index, tuple) else (index,)
    full = slice(None, None, None)
    if len(index) not in (2, 4) or index[:2] != (full, full):
        return None
    if len(index) == 2:
        return 1
    a, b = index[2:]
    if not (isinstance(a, slice) and isinstance(b, slice)):
        return None
    if a.start not in (None, 0) or b.start not in (None, 0) or a.stop or b.stop:
        return None
    if (a.step or 1) != (b.step or 1):
        return None
    return int(a.step or 1)


class _Size(int):
    """A traced ``x.size(0)``: only usable as the batch size of a view/reshape."""


def method_call(g: NCHWGraph, n, args, kw, unsupported):
    """The call of tensor method ``n.target`` on ``args[0]``."""
    m = n.target
    name = sanitize(n.name)
    x = args[0] if args else None
    if m == "expand" and isinstance(x, np.ndarray) and isinstance(args[1], _Size):
        return Batched(x)  # a learned token repeated over the batch
    if not isinstance(x, Val):
        unsupported(f"method call {n.name!r} (.{m} on a non-tensor)")
    if m == "dim":
        return len(g.fw_shape(x)) + 1
    if m == "size":
        return _size(g, x, args[1] if len(args) > 1 else kw.get("dim"))
    if m == "contiguous":
        return x
    if m in ("permute", "transpose", "chunk", "split"):
        return layout_call(g, n, m, args, kw, unsupported)
    if m in ("relu", "relu_"):
        return g.relu(x, name=name)
    if m in ("sigmoid", "sigmoid_"):
        return g.sigmoid(x, name=name)
    if m == "mean":
        dims = args[1] if len(args) > 1 else kw.get("dim")
        dims = tuple(dims) if isinstance(dims, (list, tuple)) else (dims,)
        keep = args[2] if len(args) > 2 else kw.get("keepdim", False)
        if sorted(d % 4 for d in dims) != [2, 3] or keep or x.kind != "map":
            unsupported(f"method call {n.name!r} (.mean over {dims}; only H, W)")
        return Val(g.global_avgpool(x, name=name).node, "flat")  # (N, C)
    if m == "softmax":
        dim = args[1] if len(args) > 1 else kw.get("dim")
        return g.softmax(x, dim, name=name)
    if m == "flatten":
        start = args[1] if len(args) > 1 else kw.get("start_dim", 0)
        if start == 2 and x.kind == "map":
            return g.tokens(x, name=name)  # (N, C, H * W)
        if start != 1 or (args[2] if len(args) > 2 else kw.get("end_dim", -1)) != -1:
            unsupported(f"method call {n.name!r} (.flatten from dim {start})")
        return g.flatten(x, name=name)
    if m in ("view", "reshape"):
        shape = args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if not (isinstance(shape[0], _Size) or shape[0] == -1):
            unsupported(f"method call {n.name!r} (.{m}{tuple(shape)}; batch changes)")
        return g.reshape(x, shape, name=name)
    unsupported(f"method call {n.name!r} (.{m})")


def _size(g: NCHWGraph, x: Val, dim):
    """``x.size()`` or ``x.size(dim)``: the batch size is symbolic."""
    shape = (_Size(-1), *g.fw_shape(x))
    return shape if dim is None else shape[dim]
