"""An ``nn.Module`` traced with ``torch.fx`` and translated call by call."""

from __future__ import annotations

from typing import Any

from .common import ConversionError, UnsupportedLayerError
from .nchw import NCHWGraph, Val
from .torch_ops import function_call, method_call, module_call


def trace(module, input_shape, where):
    """-> (node tuple, Flax params) of ``module``, its input ``(H, W, C)`` or
    ``(F,)`` (guessed from a first Linear layer when None)."""
    import torch
    import torch.fx

    try:
        gm = torch.fx.symbolic_trace(module)
    except Exception as err:
        raise UnsupportedLayerError(
            f"{where}: {type(module).__name__} cannot be traced with torch.fx "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); pass arch= "
            "to map its state dict onto a zoo architecture instead"
        ) from None
    fx_nodes = list(gm.graph.nodes)
    if input_shape is None:
        input_shape = _guess_input(gm, fx_nodes, where)
    fw = input_shape if len(input_shape) == 1 else (input_shape[2], *input_shape[:2])
    g = NCHWGraph(fw, where=where)
    vals: dict[Any, Any] = {}
    out = None
    position = 0

    def arg(a):
        if isinstance(a, torch.fx.Node):
            return vals[a]
        if isinstance(a, (list, tuple)):  # torch.cat([a, b]), shapes...
            return type(a)(arg(v) for v in a)
        return a

    def unsupported(what):
        raise UnsupportedLayerError(
            f"{where}: unsupported {what} (position {position} in the traced "
            f"graph{module_path(n)})"
        )

    for n in fx_nodes:
        if n.op == "placeholder":
            if vals:
                unsupported(f"second input {n.name!r}")
            vals[n] = g.input
            continue
        if n.op == "output":
            out = arg(n.args[0])
            break
        position += 1
        args = [arg(a) for a in n.args]
        kw = {k: arg(v) for k, v in n.kwargs.items()}
        try:
            vals[n] = _translate(g, gm, n, args, kw, unsupported)
        except ConversionError as err:
            if "traced graph" in str(err):
                raise
            raise type(err)(
                f"{err} (position {position} in the traced graph{module_path(n)})"
            ) from None
    if not isinstance(out, Val):
        raise UnsupportedLayerError(f"{where}: the module must return one tensor")
    return g.finish(out), g.params


def _translate(g, gm, n, args, kw, unsupported):
    """The value of traced node ``n`` (a call, or a parameter read directly)."""
    import torch
    from torch.nn import functional as F

    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        return module_call(g, mod, str(n.target), args, unsupported, kw)
    if n.op == "call_function":
        return function_call(g, n, args, kw, unsupported, torch, F)
    if n.op == "call_method":
        return method_call(g, n, args, kw, unsupported)
    if n.op == "get_attr":  # a parameter used directly (a layer scale)
        return _attribute(gm, n.target)
    unsupported(f"{n.op} {n.target!r}")


def module_path(n) -> str:
    """``, in module 'a.b'`` for a traced node made inside submodule ``a.b``."""
    stack = n.meta.get("nn_module_stack") if n is not None else None
    if not stack:
        return ""
    return f", in module {next(reversed(stack.values()))[0]!r}"


def _attribute(gm, target: str):
    """The module's tensor attribute ``target`` as a float32 array."""
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    if not hasattr(value, "detach"):
        return value
    return value.detach().cpu().float().numpy()


def _guess_input(gm, fx_nodes, where):
    from torch import nn

    for n in fx_nodes:
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            if isinstance(mod, nn.Linear):
                return (mod.in_features,)
            break
    raise ConversionError(
        f"{where}: input_shape=(H, W, C) is required to trace a module that does "
        "not start with a Linear layer"
    )
