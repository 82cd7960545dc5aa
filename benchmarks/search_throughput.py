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

from common import machine, timeit, timeit_interleaved, write  # noqa: E402

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


def engine_rate(strategy, problem, generations, repeats, chunk):
    """Steady-state engine speed: ``generations`` as ONE jitted scan (the
    throughput), and the same generations in chunks of ``chunk`` with a host round
    trip after each (the host reads the generation counter, as the progress bar
    does): its extra time per generation is the host overhead. Compile time and
    the initial population are measured apart."""
    t0 = time.perf_counter()
    state = jax.jit(
        lambda k: search.engine.init(strategy, problem, k, generations + 1)
    )(jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    init_s = time.perf_counter() - t0
    c0 = time.perf_counter()
    make = search.engine.make_scan
    scan = make(strategy, problem, generations).lower(state).compile()
    hop = make(strategy, problem, chunk).lower(state).compile()
    compile_s = time.perf_counter() - c0

    def scanned():
        return scan(jax.tree.map(jnp.copy, state))

    def hopped():
        s = jax.tree.map(jnp.copy, state)
        for _ in range(generations // chunk):
            s = hop(s)
            int(s.generation)  # the host reads progress after every chunk
        return s

    t = timeit_interleaved({"scan": scanned, "hop": hopped}, repeats=repeats)
    t_scan, t_hop = t["scan"], t["hop"]
    per_gen = t_scan["median_s"] / generations
    return {
        "seconds_per_generation": per_gen,
        "seconds_per_generation_spread": [
            t_scan["min_s"] / generations,
            t_scan["max_s"] / generations,
        ],
        "evals_per_second": strategy.population_size / per_gen,
        "compile_seconds": compile_s,
        "init_seconds_with_compile": init_s,
        "chunk": chunk,
        "chunked_seconds_per_generation": t_hop["median_s"] / generations,
        # host overhead from the fastest repeats: load spikes only add time
        "host_overhead_min": t_hop["min_s"] / t_scan["min_s"] - 1,
        "host_overhead_median": t_hop["median_s"] / t_scan["median_s"] - 1,
    }


def loop_rate(strategy, problem, fitness, generations, repeats):
    """Same GA (jitted ask/tell), the fitness called one individual at a time
    through a jitted single-individual function (the per-individual loop)."""
    single = jax.jit(lambda g: fitness.single(problem.decode(g)))
    ask = jax.jit(strategy.ask)
    tell = jax.jit(strategy.tell)
    state = search.engine.init(strategy, problem, jax.random.PRNGKey(0), generations)
    genomes, _ = ask(state.key, state.strategy_state)
    jax.block_until_ready(single(genomes[0]))  # compile outside the timing

    def generations_loop():
        s, key = state.strategy_state, state.key
        for _ in range(generations):
            key, k1, k2 = jax.random.split(key, 3)
            genomes, s = ask(k1, s)
            fit = jnp.stack([single(genomes[i]) for i in range(genomes.shape[0])])
            s = tell(k2, genomes, fit, s)
        return s

    t = timeit(generations_loop, repeats=repeats)
    per_gen = t["median_s"] / generations
    return {
        "seconds_per_generation": per_gen,
        "seconds_per_generation_spread": [
            t["min_s"] / generations,
            t["max_s"] / generations,
        ],
        "evals_per_second": strategy.population_size / per_gen,
    }


def _spread(rate) -> str:
    lo, hi = rate["seconds_per_generation_spread"]
    return f"{rate['seconds_per_generation']:.4f} ({lo:.4f}-{hi:.4f})"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    info = machine()
    repeats = 7
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
            20,
            10,
        ),
        (
            "resnet20",
            resnet,
            {"spec": "fidelity", "probes": "gaussian", "num_probes": 64},
            (16, 64),
            2,
            1,
        ),
    ]
    if args.quick:
        plan = [
            (
                "lenet300-fmnist",
                lenet,
                {"spec": "default", "num_probes": 128},
                (16,),
                4,
                2,
            )
        ]
    rows = []
    for name, net, fit_kw, pops, generations, chunk in plan:
        spec = fit_kw.pop("spec")
        fitness = gp.fitness.compose(net, spec, seed=0, **fit_kw)
        enc, problem = problem_for(net, fitness)
        for p in pops:
            strategy = search.make_strategy("ga", p, enc.num_genes)
            engine = engine_rate(strategy, problem, generations, repeats, chunk)
            loop = loop_rate(strategy, problem, fitness, generations, repeats)
            rows.append(
                {
                    "model": name,
                    "fitness": repr(fitness),
                    "P": p,
                    "generations": generations,
                    "repeats": repeats,
                    "engine": engine,
                    "loop": loop,
                    "speedup_vs_loop": engine["evals_per_second"]
                    / loop["evals_per_second"],
                    "host_overhead": engine["host_overhead_min"],
                }
            )
            print(rows[-1], flush=True)
    lines = [
        "# Search throughput (binary GA, 70% of units removed)",
        "",
        f"{info['date']}, {info['cores']} CPU cores, jax {info['jax']}, load average "
        f"at start {info['load_average_at_start']:.1f}; medians of {repeats} "
        "repeats (s/generation: min-max), warm-up and compile excluded. Engine: the "
        "generations as one jitted scan; loop: the same GA, the same fitness through "
        "a jitted single-individual function, once per individual. Host overhead: "
        "the same generations in chunks (gp.prune's default of 10 generations for "
        "lenet300; 1 for resnet20), progress read after each, against one scan, "
        "the two timed in turn; overhead from the fastest repeat of each (load "
        "spikes only add time), the median-based value in brackets.",
        "",
        "| model | P | engine evals/s | s/generation | compile s | loop evals/s | "
        "loop s/generation | speed-up | chunk | host overhead |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        e, lo = r["engine"], r["loop"]
        lines.append(
            f"| {r['model']} | {r['P']} | {e['evals_per_second']:.0f} | "
            f"{_spread(e)} | {e['compile_seconds']:.1f} | "
            f"{lo['evals_per_second']:.0f} | {_spread(lo)} | "
            f"{r['speedup_vs_loop']:.1f}x | {e['chunk']} | {r['host_overhead']:+.1%} "
            f"({e['host_overhead_median']:+.1%}) |"
        )
    write(
        "search_throughput" + ("_quick" if args.quick else ""),
        {"machine": info, "rows": rows},
        "\n".join(lines) + "\n",
    )


if __name__ == "__main__":
    main()
