"""Search throughput: the jitted engine against a per-individual Python loop.

For lenet300 (shipped weights, default data-free fitness) and resnet20 (fidelity
on Gaussian probes; speed does not depend on the weights) at P in {16, 64, 256}:
fitness evaluations per second and wall time per generation of

* the engine: generations as one jitted ``lax.scan`` (compile time reported apart);
* the engine with one generation per host round trip (``chunk=1``): its extra time
  is the host overhead per generation;
* a per-individual loop: the same GA (jitted ask/tell) but the same fitness called
  through a jitted single-individual function, once per individual.

Run: ``python benchmarks/search_throughput.py [--quick]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, write  # noqa: E402

import gapruning as gp  # noqa: E402
from gapruning import search  # noqa: E402
from gapruning.encoding import Budget, UnitEncoding  # noqa: E402


def problem_for(net, fitness):
    enc = UnitEncoding(net.space, Budget("units", 0.7))
    return enc, search.Problem(
        enc.decode,
        fitness,
        lambda m: net.space.flat(m).astype(jnp.float32).mean(),
        enc.encode,
    )


def engine_rate(strategy, problem, generations, chunk):
    result = search.run(
        strategy, problem, jax.random.PRNGKey(0), generations, chunk=chunk
    )
    run_s = result.seconds - result.compile_seconds
    return {
        "seconds_per_generation": run_s / generations,
        "evals_per_second": result.evaluations / run_s,
        "compile_seconds": result.compile_seconds,
    }


def loop_rate(strategy, problem, fitness, generations):
    """Same GA, fitness called one individual at a time (jitted single function)."""
    single = jax.jit(lambda g: fitness.single(problem.decode(g)))
    ask = jax.jit(strategy.ask)
    tell = jax.jit(strategy.tell)
    state = search.engine.init(strategy, problem, jax.random.PRNGKey(0), generations)
    s, key = state.strategy_state, state.key
    genomes, _ = ask(key, s)
    jax.block_until_ready(single(genomes[0]))  # compile outside the timing
    t0 = time.perf_counter()
    for _ in range(generations):
        key, k1, k2 = jax.random.split(key, 3)
        genomes, s = ask(k1, s)
        fit = jnp.stack([single(genomes[i]) for i in range(genomes.shape[0])])
        s = tell(k2, genomes, fit, s)
    jax.block_until_ready(s)
    dt = time.perf_counter() - t0
    return {
        "seconds_per_generation": dt / generations,
        "evals_per_second": generations * strategy.population_size / dt,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    lenet = gp.load("lenet300-fmnist")
    resnet = gp.Pretrained(
        gp.models.build("resnet20"), {"name": "resnet20 (random init)"}
    )
    plan = [
        (
            "lenet300-fmnist",
            lenet,
            {"spec": "default", "num_probes": 512},
            (16, 64, 256),
            10,
        ),
        (
            "resnet20",
            resnet,
            {"spec": "fidelity", "probes": "gaussian", "num_probes": 64},
            (16, 64, 256),
            2,
        ),
    ]
    if args.quick:
        plan = [
            ("lenet300-fmnist", lenet, {"spec": "default", "num_probes": 128}, (16,), 3)
        ]
    rows = []
    for name, net, fit_kw, pops, generations in plan:
        spec = fit_kw.pop("spec")
        fitness = gp.fitness.compose(net, spec, seed=0, **fit_kw)
        enc, problem = problem_for(net, fitness)
        for p in pops:
            strategy = search.make_strategy("ga", p, enc.num_genes)
            scan = engine_rate(strategy, problem, generations, chunk=generations)
            hop = engine_rate(strategy, problem, generations, chunk=1)
            loop = loop_rate(strategy, problem, fitness, generations)
            rows.append(
                {
                    "model": name,
                    "fitness": repr(fitness),
                    "P": p,
                    "generations": generations,
                    "engine": scan,
                    "engine_chunk1": hop,
                    "loop": loop,
                    "speedup_vs_loop": scan["evals_per_second"]
                    / loop["evals_per_second"],
                    "host_overhead": hop["seconds_per_generation"]
                    / scan["seconds_per_generation"]
                    - 1,
                }
            )
            print(rows[-1], flush=True)
    info = machine()
    lines = [
        "# Search throughput (binary GA, 70% of units removed)",
        "",
        f"{info['date']}, {info['cores']} CPU cores, jax {info['jax']}, load average "
        f"at start {info['load_average_at_start']:.1f}. Engine: jitted scan; loop: "
        "the same fitness through a jitted single-individual function, once per "
        "individual. Host overhead: one host round trip per generation (chunk=1) "
        "against the scan.",
        "",
        "| model | P | engine evals/s | s/generation | compile s | loop evals/s | "
        "speed-up | host overhead |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        e = r["engine"]
        lines.append(
            f"| {r['model']} | {r['P']} | {e['evals_per_second']:.0f} | "
            f"{e['seconds_per_generation']:.3f} | {e['compile_seconds']:.1f} | "
            f"{r['loop']['evals_per_second']:.0f} | {r['speedup_vs_loop']:.1f}x | "
            f"{r['host_overhead']:+.1%} |"
        )
    write(
        "search_throughput" + ("_quick" if args.quick else ""),
        {"machine": info, "rows": rows},
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
