"""Population forward pass: folded/vmapped population vs one individual at a time.

For lenet300, lenet5 and resnet20 with P in {8, 32, 128} and 512 probes:
time per population evaluation, achieved FLOP/s (the masked network computes the
dense FLOPs) against a dense matmul measured in the same run, and the speed-up over
a Python loop calling the same jitted single-individual function. Also the latency
of compacted models at 50% and 80% of units removed against the dense model.

Run: ``python benchmarks/population_forward.py [--quick]``
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    machine,
    matmul_flops_per_second,
    timeit,
    timeit_interleaved,
    write,
)

import gapruning as gp  # noqa: E402
from gapruning.encoding import Budget, UnitEncoding  # noqa: E402
from gapruning.forward import auto_plan  # noqa: E402


def model(name: str) -> gp.Pretrained:
    shipped = f"{name}-fmnist"
    if shipped in gp.zoo.shipped_models():
        return gp.load(shipped)
    return gp.Pretrained(gp.models.build(name), {"name": name})


def bench_population(net, pops, num_probes, repeats):
    x = jax.random.normal(jax.random.key(0), (num_probes, *net.input_shape))
    enc = UnitEncoding(net.space, Budget("units", 0.5))
    # probes are arguments, not constants: XLA would fold the unmasked prefix
    batched = jax.jit(lambda m, x: gp.population_apply(net, m, x))
    single = jax.jit(lambda m, x: gp.masked_apply(net, m, x))
    rows = []
    for p in pops:
        genomes = jax.random.normal(jax.random.key(p), (p, enc.num_genes))
        masks = jax.vmap(enc.decode)(genomes)
        one = [{k: v[i] for k, v in masks.items()} for i in range(p)]
        t_vmap = timeit(batched, masks, x, repeats=repeats)
        t_loop = timeit(lambda one=one: [single(m, x) for m in one], repeats=repeats)
        # FLOPs the P individuals represent (each a full masked forward pass)
        flops = 2 * net.space.dense_flops * num_probes * p
        steps = auto_plan(net, p, num_probes)
        rows.append(
            {
                "P": p,
                "chunk": steps.individuals,
                "probe_chunk": steps.probe_chunk or num_probes,
                "vmapped_s": t_vmap["median_s"],
                "loop_s": t_loop["median_s"],
                "speedup": t_loop["median_s"] / t_vmap["median_s"],
                "flop_per_s": flops / t_vmap["median_s"],
                "spread_vmapped_s": [t_vmap["min_s"], t_vmap["max_s"]],
            }
        )
    return rows


def bench_compacted(net, batch, repeats):
    """Dense and compacted (50% / 80% of units removed, per-layer L1) forward
    passes, timed in turn; fastest repeat of each (load spikes only add time)."""
    x = jax.random.normal(jax.random.key(1), (batch, *net.input_shape))
    fns = {"dense": jax.jit(lambda x: net.model(x))}
    out = {}
    for target in (0.5, 0.8):
        enc = UnitEncoding(net.space, Budget("units", target, per_group=True))
        masks = enc.decode(
            jnp.asarray(gp.encoding.l1_unit_scores(net.model, net.space))
        )
        small = gp.compact(net, masks)
        fns[f"removed_{int(target * 100)}"] = jax.jit(lambda x, m=small.model: m(x))
        out[f"removed_{int(target * 100)}_params"] = gp.param_count(small)
    times = timeit_interleaved(
        {name: functools.partial(f, x) for name, f in fns.items()},
        repeats=max(9, repeats),
    )
    for name, t in times.items():
        out[f"{name}_s"] = t["min_s"]
    # the ceiling a population pass can hope for: XLA's own speed on the dense net
    out["dense_flop_per_s"] = 2 * net.space.dense_flops * batch / out["dense_s"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    args = ap.parse_args()
    repeats = 2 if args.quick else 3
    num_probes = 512
    matmul = matmul_flops_per_second()
    plan = {"lenet300": (8, 32, 128), "lenet5": (8, 32, 128), "resnet20": (8, 32)}
    if args.quick:
        plan = {"lenet300": (8, 32), "lenet5": (8,)}
    results = {
        "machine": machine(),
        "matmul_flop_per_s": matmul,
        "num_probes": num_probes,
        "models": {},
    }
    for name, pops in plan.items():
        net = model(name)
        results["models"][name] = {
            "dense_macs_per_sample": net.space.dense_flops,
            "population": bench_population(net, pops, num_probes, repeats),
            "compacted_latency_batch_512": bench_compacted(net, 512, repeats),
        }
    lines = [
        "# Population forward pass",
        "",
        f"{results['machine']['date']}, {results['machine']['cores']} CPU cores, "
        f"jax {results['machine']['jax']}, load average at start "
        f"{results['machine']['load_average_at_start']:.1f}; dense matmul "
        f"{matmul / 1e9:.1f} GFLOP/s; {num_probes} probes; median of {repeats}. "
        "GFLOP/s counts the FLOPs the P masked networks represent; layers before "
        "the first mask run once for the whole population, so dense nets can "
        "exceed the matmul rate. chunk: individuals x probes evaluated together "
        "(auto_plan); loop: the same jitted single-individual pass called P "
        "times.",
        "",
        "| model | P | chunk | population pass (s) | loop of P (s) | speed-up | "
        "GFLOP/s | % of matmul |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["models"].items():
        for row in r["population"]:
            lines.append(
                f"| {name} | {row['P']} | {row['chunk']} x {row['probe_chunk']} | "
                f"{row['vmapped_s']:.4f} | "
                f"{row['loop_s']:.4f} | "
                f"{row['speedup']:.2f}x | {row['flop_per_s'] / 1e9:.1f} | "
                f"{row['flop_per_s'] / matmul:.0%} |"
            )
    lines += [
        "",
        "Compacted models (batch 512, per-layer L1 masks; the three timed in turn, "
        "fastest of 9 repeats each; dense GFLOP/s: one dense forward pass, the "
        "rate XLA itself reaches on this network):",
        "",
        "| model | dense (s) | dense GFLOP/s | 50% units removed (s) | "
        "80% removed (s) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, r in results["models"].items():
        c = r["compacted_latency_batch_512"]
        lines.append(
            f"| {name} | {c['dense_s']:.4f} | {c['dense_flop_per_s'] / 1e9:.1f} | "
            f"{c['removed_50_s']:.4f} | "
            f"{c['removed_80_s']:.4f} |"
        )
    write(
        "population_forward" + ("_quick" if args.quick else ""),
        results,
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
