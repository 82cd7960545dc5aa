"""Shared helpers for the benchmarks: timing, machine description, result files."""

from __future__ import annotations

import datetime
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from gapruning.files import write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"
# what benchmarks build once and reuse (virtual environments, trained models)
CACHE = Path(
    os.environ.get("GAPRUNING_BENCH_CACHE", Path.home() / ".cache" / "gapruning-bench")
)


def timeit(fn, *args, repeats: int = 5, warmup: int = 1) -> dict:
    """Median and spread of wall time of ``fn(*args)`` (blocked), warm-up excluded."""
    run = functools.partial(fn, *args)
    return timeit_interleaved({"fn": run}, repeats=repeats, warmup=warmup)["fn"]


def timeit_interleaved(fns: dict, repeats: int = 7, warmup: int = 1) -> dict:
    """:func:`timeit` of several functions run in turn (a, b, a, b, ...), so
    that a change of machine load hits all of them alike; name -> stats."""
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {
        name: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "repeats": repeats,
        }
        for name, t in times.items()
    }


def matmul_flops_per_second(n: int = 1024, repeats: int = 5) -> float:
    """Dense float32 matmul throughput of this machine (2 n^3 FLOPs per product)."""
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda a: a @ a)
    t = timeit(f, a, repeats=repeats)["median_s"]
    return 2 * n**3 / t


def machine() -> dict:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.date.today().isoformat(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "load_average_at_start": load,
    }


def write(name: str, payload: dict, markdown: str) -> None:
    write_text_atomic(RESULTS / f"{name}.json", json.dumps(payload, indent=2) + "\n")
    write_text_atomic(RESULTS / f"{name}.md", markdown)
    print(markdown)


def sync(x):
    return jax.block_until_ready(jnp.asarray(x))


# the two ops torchvision's _meta_registrations registers whether or not its C
# extension loaded (torchvision 0.28); the others are registered only when it did
_TORCHVISION_UNGUARDED_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def import_torchvision():
    """``import torchvision`` that also works on a CPU-only torch.

    PyPI's torchvision wheels are CUDA builds: on the ``+cpu`` torch their C
    extension cannot load, and torchvision 0.28 then fails on import
    ("operator torchvision::nms does not exist") because it registers fake
    kernels for ``nms``/``qnms`` unconditionally. The model builders need no C
    op, so when that happens the two op schemas are declared (without kernels:
    calling ``torchvision.ops.nms`` still fails) and the import is retried.
    Raises ImportError when torchvision is not installed.
    """
    import sys

    try:
        import torchvision
    except RuntimeError as err:
        if "torchvision::" not in str(err):
            raise
        import torch

        for name in [m for m in sys.modules if m.split(".")[0] == "torchvision"]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for schema in _TORCHVISION_UNGUARDED_OPS:
            lib.define(schema)
        _KEEP.append(lib)  # a Library object unregisters its ops when collected
        import torchvision
    return torchvision


_KEEP: list = []
