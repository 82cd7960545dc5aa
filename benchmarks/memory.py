"""Peak memory of a population fitness evaluation against the population size.

ResNet-56 (28x28x1, 16/32/64 channels, BatchNorm; built, not trained: memory does
not depend on the weights) scored by the default composite fitness (top-1 + KL +
layer-wise features + Lipschitz, ``normalize=False`` to skip the calibration
passes) on 1024 Gaussian probes (how probes are made does not change the memory of
an evaluation; making 1024 BatchNorm-statistics probes for ResNet-56 alone takes
minutes on CPU), for populations up to 256.

For every population size and chunking mode the jitted fitness is compiled once and
XLA's ``memory_analysis()`` gives the bytes the evaluation needs: arguments, outputs,
constants (probes and dense caches baked into the program) and temporaries (every
intermediate buffer live at the peak; the number that grows with the population).
Modes:

* ``auto``: ``compose(..., chunk_size="auto")`` on this backend (CPU: 16 MiB of
  population-batched activations per chunk, ``gapruning.forward``);
* ``auto-accelerator``: the chunk ``auto`` picks on a GPU/TPU (2 GiB budget),
  compiled here on CPU (XLA's CPU buffer assignment; an accelerator's differs);
* ``none``: the whole population at once, for comparison (compiled only).

Optionally (``--evaluate P``) one real evaluation of a population under ``auto``
runs and the process peak RSS is recorded (``ru_maxrss``, monotone over the run).
A full evaluation of P = 256 is about 256 ResNet-56 forward passes on 1024 probes,
minutes on a shared 2-core CPU, so by default only the compiled analysis is reported.

Run: ``python benchmarks/memory.py [--populations 16,64,256] [--probes 1024]
[--evaluate 8]``
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning.encoding import Budget, UnitEncoding  # noqa: E402
from gapruning.forward import (  # noqa: E402
    ACCELERATOR_ACTIVATION_BUDGET_BYTES,
    activation_budget,
    auto_chunk_size,
    population_footprint,
)

MiB = 2**20
# The stated limit: under ``auto`` chunking the evaluation's temporaries stay below
# this for every population size (checked below; the benchmark fails otherwise).
LIMIT_TEMP_BYTES = 1024 * MiB


def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def analyse(fit, masks) -> dict:
    t0 = time.perf_counter()
    compiled = fit._batched.lower(fit._prepare_masks(masks)).compile()
    seconds = time.perf_counter() - t0
    m = compiled.memory_analysis()
    return {
        "compile_s": round(seconds, 1),
        "temp_bytes": int(m.temp_size_in_bytes),
        "argument_bytes": int(m.argument_size_in_bytes),
        "output_bytes": int(m.output_size_in_bytes),
        "constant_bytes": int(getattr(m, "generated_code_size_in_bytes", 0) or 0)
        + int(getattr(m, "constant_size_in_bytes", 0) or 0),
        "rss_after_compile_bytes": rss_bytes(),
        "_compiled": compiled,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--populations", default="16,64,256")
    ap.add_argument("--probes", type=int, default=1024)
    ap.add_argument("--modes", default="auto,auto-accelerator,none")
    ap.add_argument("--evaluate", type=int, default=0, help="also run P under auto")
    args = ap.parse_args()
    pops = [int(p) for p in args.populations.split(",")]
    modes = args.modes.split(",")

    net = gp.Pretrained(gp.models.build("resnet56", seed=0), {"name": "resnet56"})
    t0 = time.perf_counter()
    footprint = population_footprint(net, args.probes)
    enc = UnitEncoding(net.space, Budget("units", 0.5))
    rows = []
    fits = {}
    for mode in modes:
        for p in pops:
            if mode == "auto":
                chunk = auto_chunk_size(net, p, args.probes)
                spec = "auto"
            elif mode == "auto-accelerator":
                chunk = auto_chunk_size(
                    net, p, args.probes, budget=ACCELERATOR_ACTIVATION_BUDGET_BYTES
                )
                spec = chunk
            else:
                chunk, spec = p, None
            if spec not in fits:
                fits[spec] = gp.fitness.compose(
                    net,
                    "default",
                    num_probes=args.probes,
                    seed=0,
                    probes="gaussian",
                    chunk_size=spec,
                    normalize=False,
                )
            fit = fits[spec]
            genomes = jax.random.normal(jax.random.key(p), (p, enc.num_genes))
            masks = jax.vmap(enc.decode)(genomes)
            row = {"mode": mode, "population": p, "chunk": chunk, **analyse(fit, masks)}
            compiled = row.pop("_compiled")
            if mode == "auto" and p == args.evaluate:
                x = fit._prepare_masks(masks)
                e0 = time.perf_counter()
                scores = np.asarray(jax.block_until_ready(compiled(x)))
                row["evaluate_s"] = round(time.perf_counter() - e0, 1)
                row["rss_after_evaluate_bytes"] = rss_bytes()
                row["finite_scores"] = int(np.isfinite(scores).sum())
            del compiled
            rows.append(row)
            print(
                f"{mode:17s} P={p:4d} chunk={chunk:4d} temp "
                f"{row['temp_bytes'] / MiB:9.1f} MiB  compile {row['compile_s']} s",
                flush=True,
            )
    auto = [r for r in rows if r["mode"] == "auto"]
    within = all(r["temp_bytes"] <= LIMIT_TEMP_BYTES for r in auto)
    payload = {
        "machine": machine(),
        "model": "resnet56 (28x28x1, widths 16/32/64, untrained)",
        "fitness": "default composite, normalize=False",
        "num_probes": args.probes,
        "population_footprint_bytes_per_individual": footprint,
        "activation_budget_bytes": activation_budget(),
        "accelerator_activation_budget_bytes": ACCELERATOR_ACTIVATION_BUDGET_BYTES,
        "limit_temp_bytes_auto": LIMIT_TEMP_BYTES,
        "auto_within_limit": within,
        "rows": rows,
        "total_s": round(time.perf_counter() - t0, 1),
    }
    md = [
        "# Memory of a population fitness evaluation (ResNet-56, "
        f"{args.probes} probes)",
        "",
        "`python benchmarks/memory.py` on "
        f"{payload['machine']['cpu']} ({payload['machine']['cores']} cores, "
        f"load {payload['machine']['load_average_at_start']:.1f} at start), "
        f"jax {payload['machine']['jax']}. Default composite fitness (normalize "
        "off), Gaussian probes; the largest population-batched "
        f"activation is {footprint / MiB:.1f} MiB per individual. Bytes from XLA's "
        "`memory_analysis()` of the compiled evaluation (temporaries = buffers live "
        "at the peak, beyond arguments, outputs and constants).",
        "",
        "| mode | population | chunk | temporaries (MiB) | arguments (MiB) "
        "| constants+code (MiB) | compile (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        md.append(
            f"| {r['mode']} | {r['population']} | {r['chunk']} | "
            f"{r['temp_bytes'] / MiB:,.1f} | {r['argument_bytes'] / MiB:,.2f} | "
            f"{r['constant_bytes'] / MiB:,.1f} | {r['compile_s']} |"
        )
    evaluated = [r for r in rows if "evaluate_s" in r]
    md += [""]
    for r in evaluated:
        md.append(
            f"Evaluated P = {r['population']} under `auto` (chunk {r['chunk']}): "
            f"{r['evaluate_s']} s, {r['finite_scores']} finite scores, process peak "
            f"RSS {r['rss_after_evaluate_bytes'] / MiB:,.0f} MiB (whole process: "
            "JAX, compiled programs, probes)."
        )
    if not evaluated:
        md.append(
            "Only compiled: a full evaluation of P = 256 (256 ResNet-56 passes on "
            f"{args.probes} probes) takes minutes on this CPU."
        )
    md += [
        "",
        f'**Limit**: with `chunk_size="auto"` the evaluation\'s temporaries stay '
        f"below {LIMIT_TEMP_BYTES / MiB:,.0f} MiB for every population size: "
        f"{'met' if within else 'NOT met'} (largest "
        f"{max(r['temp_bytes'] for r in auto) / MiB:,.1f} MiB). Under `auto` the "
        "chunk, not the population, sets the peak; without chunking (`none`) the "
        "temporaries grow linearly with the population.",
        "",
    ]
    write("memory", payload, "\n".join(md))
    if not within:
        raise SystemExit("auto chunking exceeded the stated memory limit")


if __name__ == "__main__":
    main()
