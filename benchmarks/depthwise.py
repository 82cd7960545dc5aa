"""Depthwise convolutions: shifted products against XLA's grouped convolution.

``ConvOp.depthwise`` (what ``dwconv`` nodes run) against ``ConvOp.raw`` with
``feature_group_count`` equal to the channels, at the depthwise layers of the
shipped MobileNet (batch 128, 3x3 kernels): forward pass, and forward plus the
gradient with respect to input and kernel (a training step's share). The two
are timed in turn (a, b, a, b, ...) so that load hits both alike.

Run: ``python benchmarks/depthwise.py [--quick]``
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, timeit_interleaved, write  # noqa: E402

from gapruning.models.masked_layers import conv_op  # noqa: E402

# (height = width, channels, stride) of the MobileNet's depthwise layers
SHAPES = ((14, 16, 1), (14, 64, 2), (7, 96, 1), (7, 96, 2), (4, 128, 1), (4, 256, 1))


def timings(size, channels, stride, batch, repeats):
    op = conv_op((stride, stride), "SAME")
    x = jax.random.normal(jax.random.key(0), (batch, size, size, channels))
    k = jax.random.normal(jax.random.key(1), (3, 3, 1, channels))
    fns = {"xla": lambda x, k: op.raw(x, k, channels), "shifted": op.depthwise}
    forward = {n: jax.jit(f) for n, f in fns.items()}
    grad = {
        n: jax.jit(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) ** 2), (0, 1)))
        for n, f in fns.items()
    }
    runs = {f"{n} forward": lambda f=f: f(x, k) for n, f in forward.items()}
    runs |= {f"{n} gradient": lambda f=f: f(x, k) for n, f in grad.items()}
    return {n: t["median_s"] for n, t in timeit_interleaved(runs, repeats).items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 8, 3 repeats")
    args = ap.parse_args()
    batch, repeats = (8, 3) if args.quick else (128, 9)
    rows = [
        {"size": s, "channels": c, "stride": st, **timings(s, c, st, batch, repeats)}
        for s, c, st in SHAPES
    ]
    info = machine()
    md = [
        "# Depthwise convolution: shifted products vs XLA's grouped convolution\n",
        f"{info['date']}, {info['cores']} CPU cores, jax {info['jax']}, devices "
        f"{', '.join(info['devices'])}, load average at start "
        f"{info['load_average_at_start']:.1f}; batch {batch}, 3x3 kernels, SAME "
        f"padding; median of {repeats}, the two run in turn. Gradient: forward "
        "and the gradient with respect to input and kernel.\n",
        "| input | stride | XLA forward (ms) | shifted (ms) | speed-up | "
        "XLA gradient (ms) | shifted (ms) | speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        fx, fs = r["xla forward"] * 1e3, r["shifted forward"] * 1e3
        gx, gs = r["xla gradient"] * 1e3, r["shifted gradient"] * 1e3
        md.append(
            f"| {r['size']}x{r['size']}x{r['channels']} | {r['stride']} | "
            f"{fx:.2f} | {fs:.2f} | {fx / fs:.1f}x | {gx:.2f} | {gs:.2f} | "
            f"{gx / gs:.1f}x |"
        )
    name = "depthwise_quick" if args.quick else "depthwise"
    write(name, {"machine": info, "batch": batch, "rows": rows}, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
