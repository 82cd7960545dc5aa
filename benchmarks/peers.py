"""gapruning side by side with the tools a user would pick instead.

Two parts, each resumable on its own (``--part throughput|quality|all``); every
part updates its section of ``benchmarks/results/peers.json`` and the Markdown
and PNG are redrawn from the JSON.

**Throughput** of the same genetic search on lenet300-fmnist and lenet5-fmnist:
one bit per hidden unit, 50% of the units removed (the same exact-budget decoding
for everyone: keep the ``round(0.5 N)`` highest genes, ties to the lower index,
at least one unit per layer), the same population (64), generations, probes
(512 inversion probes made once by gapruning and handed to every peer as NumPy)
and fitness definition (KL(dense || pruned) of T=4 softened outputs times T^2,
plus the top-1 disagreement, both against the dense model on the probes).

* ``gapruning``: ``search.engine`` (jitted ``lax.scan`` over generations,
  vmapped population); compile time measured apart.
* ``torch loop``: the approach of the original GA-pruning code
  (sun-asterisk-research/ga_pruning_research): a Python loop over individuals,
  each one's masks written into the model, one forward pass on the whole probe
  batch under ``torch.inference_mode``; GA operators (the same as gapruning's:
  tournament 3, uniform crossover 0.9, bit-flip 1/d, 2 elites) in NumPy.
* ``PyGAD``: ``pygad.GA`` with its batch fitness API (``fitness_batch_size`` =
  population) and a vectorized NumPy fitness; tournament 3, uniform crossover
  0.9, random mutation 1/d over ``gene_space=[0, 1]``, ``keep_elitism=2``.
* ``DEAP``: ``algorithms.eaSimple`` with ``cxUniform``, ``mutFlipBit`` (1/d),
  ``selTournament`` (3) and a NumPy fitness per individual (DEAP's
  ``toolbox.evaluate``, builtin ``map``).

Evaluations per second count the fitness calls each tool really made (PyGAD
keeps its elites' fitness, DEAP only re-evaluates changed individuals).

**Quality** at 50% and 80% of the hidden units removed on lenet300-fmnist and
paoding_mlp-fmnist: test accuracy and FGSM (eps 0.05) robust accuracy, all with
``gp.evaluate`` on the Fashion-MNIST test set, of gapruning's data-free pipeline
(``gp.prune`` defaults: GA, default fitness), gapruning's one-shot ``l1``, the
real paoding-dl package (PyPI, run in its own virtual environment with the
TensorFlow it needs, on the network exported to a Keras .h5) and Torch-Pruning's
magnitude pruning (no fine-tuning) on the network exported to PyTorch. Nothing is
tuned on the test set.

Run: ``python benchmarks/peers.py [--quick] [--part throughput|quality|all]``
or ``gapruning bench peers [...]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections import OrderedDict
from importlib import metadata
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CACHE, RESULTS, machine  # noqa: E402

from gapruning.files import write_text_atomic  # noqa: E402

NAME = "peers"
TARGET_THROUGHPUT = 0.5
POPULATION = 64
NUM_PROBES = 512
TEMPERATURE = 4.0
SPEC = {"fidelity": 1.0, "fidelity_top1": 1.0}
PAODING_VERSION = "1.0.0.post3"
PAODING_TF = "tensorflow-cpu==2.15.1"  # paoding-dl needs tf.keras 2 (TF < 2.16)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------ shared problem


class NumpyDecoder:
    """The units budget of :class:`gapruning.encoding.BudgetDecoder` (no prior)
    in NumPy: keep the ``keep`` highest genes, ties to the lower index, the best
    unit of every group always kept."""

    def __init__(self, sizes, target):
        self.sizes = list(sizes)
        self.offsets = np.cumsum([0, *self.sizes])
        self.n = int(self.offsets[-1])
        self.keep = int(round((1.0 - target) * self.n))

    def __call__(self, genes: np.ndarray) -> np.ndarray:
        genes = np.asarray(genes, np.float32)
        key = genes.copy()
        for lo, hi in zip(self.offsets[:-1], self.offsets[1:], strict=True):
            key[lo + int(np.argmax(genes[lo:hi]))] = np.inf
        kept = np.zeros(self.n, bool)
        kept[np.argsort(-key, kind="stable")[: self.keep]] = True
        return kept


class NumpyGA:
    """gapruning's binary GA operators in NumPy (for the per-individual loop)."""

    def __init__(self, num_genes, population, seed, elites=2, tournament=3):
        self.d, self.p, self.elites, self.t = num_genes, population, elites, tournament
        self.rng = np.random.default_rng(seed)

    def next(self, pop: np.ndarray, fit: np.ndarray) -> np.ndarray:
        n = self.p - self.elites
        rng = self.rng

        def select():
            entrants = rng.integers(0, self.p, (n, self.t))
            return entrants[np.arange(n), np.argmin(fit[entrants], axis=1)]

        mothers, fathers = pop[select()], pop[select()]
        take_b = rng.random((n, self.d)) < 0.5
        crossed = np.where(take_b, fathers, mothers)
        children = np.where(rng.random((n, 1)) < 0.9, crossed, mothers)
        flips = rng.random(children.shape) < 1.0 / self.d
        children = np.where(flips, 1.0 - children, children)
        return np.concatenate([pop[np.argsort(fit)[: self.elites]], children])


def np_weights(net) -> dict[str, dict[str, np.ndarray]]:
    return {
        name: {
            v: np.asarray(getattr(layer, v)[...], np.float32)
            for v in ("kernel", "bias")
            if getattr(layer, v, None) is not None
        }
        for name, layer in net.model.layers.items()
    }


def _conv_nhwc(x, kernel, bias, padding):
    """x (N,H,W,C), kernel (kh,kw,C,O), stride 1, TF padding."""
    kh, kw = kernel.shape[:2]
    if padding == "SAME":
        x = np.pad(
            x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2), (0, 0))
        )
    win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
    n, h, w, c = win.shape[:4]
    cols = win.transpose(0, 1, 2, 4, 5, 3).reshape(n * h * w, kh * kw * c)
    out = cols @ kernel.reshape(kh * kw * c, -1)
    return (out + bias).reshape(n, h, w, -1)


def _maxpool2(x):
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class NumpyNet:
    """Masked forward of lenet300 / paoding_mlp / lenet5 in NumPy, vectorized over
    a leading population axis of the masks (the probes are shared)."""

    def __init__(self, net, arch: str):
        self.w = np_weights(net)
        self.arch = arch
        self.groups = [g.name for g in net.space.groups]
        self.sizes = [g.size for g in net.space.groups]

    def _split(self, kept):  # (P, N) -> list of (P, size)
        out, o = [], 0
        for s in self.sizes:
            out.append(kept[:, o : o + s].astype(np.float32))
            o += s
        return out

    def logits(self, x: np.ndarray, kept: np.ndarray, chunk: int = 4) -> np.ndarray:
        kept = np.atleast_2d(kept)
        if self.arch == "lenet5":
            return np.concatenate(
                [
                    self._lenet5(x, kept[i : i + chunk])
                    for i in range(0, len(kept), chunk)
                ]
            )
        m = self._split(kept)
        h = x.reshape(len(x), -1)
        w = self.w
        h = np.maximum(h @ w[self.groups[0]]["kernel"] + w[self.groups[0]]["bias"], 0)
        h = h[None] * m[0][:, None, :]  # (P, B, units)
        for g, mg in zip(self.groups[1:], m[1:], strict=True):
            h = np.maximum(h @ w[g]["kernel"] + w[g]["bias"], 0) * mg[:, None, :]
        return h @ w["out"]["kernel"] + w["out"]["bias"]

    def _lenet5(self, x, kept):
        w, (m1, m2, m3, m4) = self.w, self._split(kept)
        p, b = len(kept), len(x)
        c1 = np.maximum(
            _conv_nhwc(x, w["conv1"]["kernel"], w["conv1"]["bias"], "SAME"), 0
        )
        h = c1[None] * m1[:, None, None, None, :]  # (P, B, 28, 28, 6)
        h = _maxpool2(h.reshape(p * b, *h.shape[2:]))
        h = np.maximum(
            _conv_nhwc(h, w["conv2"]["kernel"], w["conv2"]["bias"], "VALID"), 0
        )
        h = _maxpool2(h).reshape(p, b, -1, 16) * m2[:, None, None, :]
        h = h.reshape(p, b, -1)
        h = np.maximum(h @ w["fc1"]["kernel"] + w["fc1"]["bias"], 0) * m3[:, None, :]
        h = np.maximum(h @ w["fc2"]["kernel"] + w["fc2"]["bias"], 0) * m4[:, None, :]
        return h @ w["out"]["kernel"] + w["out"]["bias"]


def np_fitness(logits: np.ndarray, dense: np.ndarray, t: float = TEMPERATURE):
    """(P, B, C) pruned logits -> (P,) KL * T^2 + top-1 disagreement."""

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    logp = log_softmax(dense / t)
    logq = log_softmax(logits / t)
    kl = (np.exp(logp) * (logp - logq)).sum(-1).mean(-1) * t * t
    dis = (logits.argmax(-1) != dense.argmax(-1)).mean(-1)
    return kl + dis


class TorchLoop:
    """The original GA-pruning approach: per individual, write its masks into
    the model and run one forward pass over the whole probe batch."""

    def __init__(self, net, probes_nhwc, dense_logits):
        import torch

        import gapruning as gp

        self.torch = torch
        self.module = gp.convert.to_torch_module(net)
        self.x = torch.from_numpy(
            np.ascontiguousarray(probes_nhwc.transpose(0, 3, 1, 2))
        )
        self.threads, self.thread_ms = self._pick_threads()
        self.dense = torch.from_numpy(dense_logits)
        self.buffers = [
            getattr(self.module, self.module._mask_names[g.name])
            for g in net.space.groups
        ]
        self.sizes = [g.size for g in net.space.groups]

    def _pick_threads(self):
        """torch.set_num_threads(cores) as PyTorch recommends, unless one thread
        is faster on this machine (an oversubscribed CPU makes OpenMP spin):
        the faster of the two, measured on the forward pass, is kept."""
        torch = self.torch
        ms = {}
        for n in dict.fromkeys((os.cpu_count() or 1, 1)):
            torch.set_num_threads(n)
            with torch.inference_mode():
                for _ in range(3):
                    self.module(self.x)
                t0 = time.perf_counter()
                for _ in range(10):
                    self.module(self.x)
            ms[n] = (time.perf_counter() - t0) / 10 * 1e3
        best = min(ms, key=ms.get)
        torch.set_num_threads(best)
        return best, ms

    def fitness(self, kept: np.ndarray) -> float:
        torch = self.torch
        with torch.inference_mode():
            o = 0
            for buf, s in zip(self.buffers, self.sizes, strict=True):
                buf.copy_(torch.from_numpy(kept[o : o + s].astype(np.float32)))
                o += s
            z = self.module(self.x)
            logp = torch.log_softmax(self.dense / TEMPERATURE, -1)
            logq = torch.log_softmax(z / TEMPERATURE, -1)
            kl = (logp.exp() * (logp - logq)).sum(-1).mean() * TEMPERATURE**2
            dis = (z.argmax(-1) != self.dense.argmax(-1)).float().mean()
            return float(kl + dis)


# ------------------------------------------------------------- throughput


def _timed(run, repeats):
    run()  # warm-up, excluded
    times, evals = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = run()
        times.append(time.perf_counter() - t0)
        evals.append(n)
    return times, evals


def _rate(times, evals, generations):
    order = np.argsort(times)
    med = order[len(order) // 2]
    return {
        "seconds_per_generation": times[med] / generations,
        "seconds_per_generation_spread": [
            min(times) / generations,
            max(times) / generations,
        ],
        "evals_per_second": evals[med] / times[med],
        "evals_per_second_spread": [
            min(e / t for e, t in zip(evals, times, strict=True)),
            max(e / t for e, t in zip(evals, times, strict=True)),
        ],
        "evals_per_generation": evals[med] / generations,
        "repeats": len(times),
        "times_s": times,
    }


def engine_rate(strategy, problem, generations: int, repeats: int) -> dict:
    """gapruning's steady-state speed: ``generations`` as one jitted scan of the
    engine (``search.engine.make_scan``), compiled ahead and timed apart."""
    import jax
    import jax.numpy as jnp

    from gapruning import search

    state = jax.jit(
        lambda k: search.engine.init(strategy, problem, k, generations + 1)
    )(jax.random.PRNGKey(0))
    jax.block_until_ready(state)
    c0 = time.perf_counter()
    scan = search.engine.make_scan(strategy, problem, generations)
    scan = scan.lower(state).compile()
    compile_s = time.perf_counter() - c0

    def run():
        jax.block_until_ready(scan(jax.tree.map(jnp.copy, state)))
        return strategy.population_size * generations

    r = _rate(*_timed(run, repeats), generations)
    r["compile_seconds"] = compile_s
    return r


def throughput_model(model: str, generations: int, repeats: int, log) -> dict:
    import jax

    import gapruning as gp
    from gapruning import search
    from gapruning.encoding import Budget, UnitEncoding

    net = gp.load(model)
    arch = net.card["arch"]
    fit = gp.fitness.compose(
        net, SPEC, probes="inversion", num_probes=NUM_PROBES, seed=0, normalize=False
    )
    probes = np.asarray(fit.probes, np.float32)
    dense = np.asarray(net.model(jax.numpy.asarray(probes)), np.float32)
    sizes = [g.size for g in net.space.groups]
    dec = NumpyDecoder(sizes, TARGET_THROUGHPUT)
    d = dec.n
    enc = UnitEncoding(net.space, Budget("units", TARGET_THROUGHPUT))
    problem = search.Problem(
        enc.decode,
        fit,
        lambda m: net.space.flat(m).astype(jax.numpy.float32).mean(),
        enc.encode,
    )
    npnet = NumpyNet(net, arch)
    loop = TorchLoop(net, probes, dense)

    # --- equivalence checks: the same decoding and fitness for everyone
    rng = np.random.default_rng(1)
    genomes = (rng.random((4, d)) < 0.5).astype(np.float32)
    checks = []
    for g in genomes:
        kept = dec(g)
        ref = np.asarray(net.space.flat(enc.decode(jax.numpy.asarray(g))))
        f_gp = float(fit.single(net.space.unflat(jax.numpy.asarray(kept))))
        f_np = float(np_fitness(npnet.logits(probes, kept[None]), dense)[0])
        f_t = loop.fitness(kept)
        checks.append(
            {
                "decode_equal": bool((ref == kept).all()),
                "gapruning": f_gp,
                "numpy": f_np,
                "torch": f_t,
            }
        )
    ok = all(c["decode_equal"] for c in checks) and all(
        abs(c["numpy"] - c["gapruning"]) < 1e-3 * (1 + abs(c["gapruning"]))
        and abs(c["torch"] - c["gapruning"]) < 1e-3 * (1 + abs(c["gapruning"]))
        for c in checks
    )
    log(f"{model}: equivalence {'ok' if ok else 'FAILED'} {checks[0]}")
    init_pop = (np.random.default_rng(0).random((POPULATION, d)) < 0.5).astype(
        np.float32
    )
    out = {
        "model": model,
        "genes": d,
        "population": POPULATION,
        "generations": generations,
        "num_probes": len(probes),
        "equivalence_checks": checks,
        "equivalent": ok,
        "tools": {},
    }

    # (a) gapruning: the jitted engine
    strategy = search.make_strategy("ga", POPULATION, enc.num_genes)
    r = engine_rate(strategy, problem, generations, repeats)
    out["tools"]["gapruning"] = r
    log(f"  gapruning {r['evals_per_second']:.0f} evals/s")

    # (b) per-individual PyTorch loop, the original approach
    def torch_run():
        ga = NumpyGA(d, POPULATION, seed=0)
        pop, n = init_pop.copy(), 0
        for _ in range(generations):
            f = np.array([loop.fitness(dec(ind)) for ind in pop])
            n += len(pop)
            pop = ga.next(pop, f)
        return n

    out["tools"]["torch_loop"] = _rate(*_timed(torch_run, repeats), generations)
    out["tools"]["torch_loop"]["torch_threads"] = loop.threads
    out["tools"]["torch_loop"]["forward_ms_by_threads"] = loop.thread_ms
    log(f"  torch loop {out['tools']['torch_loop']['evals_per_second']:.0f} evals/s")

    # (c) PyGAD, batch fitness API with a vectorized NumPy fitness
    import pygad

    def pygad_run(gens=generations):
        count = [0]

        def fitness_func(ga, solutions, idx):
            sol = np.atleast_2d(solutions)
            kept = np.stack([dec(s) for s in sol])
            count[0] += len(sol)
            return list(-np_fitness(npnet.logits(probes, kept), dense))

        ga = pygad.GA(
            num_generations=gens,
            num_parents_mating=POPULATION // 2,
            fitness_func=fitness_func,
            fitness_batch_size=POPULATION,
            initial_population=init_pop.copy(),
            gene_type=int,
            gene_space=[0, 1],
            parent_selection_type="tournament",
            K_tournament=3,
            crossover_type="uniform",
            crossover_probability=0.9,
            mutation_type="random",
            mutation_probability=1.0 / d,
            keep_elitism=2,
            random_seed=0,
            suppress_warnings=True,
        )
        ga.run()
        return count[0]

    out["tools"]["pygad"] = _rate(*_timed(pygad_run, repeats), generations)
    log(f"  pygad {out['tools']['pygad']['evals_per_second']:.0f} evals/s")

    # (d) DEAP, eaSimple with a NumPy fitness per individual
    from deap import algorithms, base, creator, tools

    if not hasattr(creator, "FitnessMin"):
        creator.create("FitnessMin", base.Fitness, weights=(-1.0,))
        creator.create("Individual", list, fitness=creator.FitnessMin)

    def deap_run():
        import random

        random.seed(0)
        count = [0]

        def evaluate(ind):
            count[0] += 1
            kept = dec(np.asarray(ind, np.float32))
            return (float(np_fitness(npnet.logits(probes, kept[None]), dense)[0]),)

        tb = base.Toolbox()
        tb.register("evaluate", evaluate)
        tb.register("mate", tools.cxUniform, indpb=0.5)
        tb.register("mutate", tools.mutFlipBit, indpb=1.0 / d)
        tb.register("select", tools.selTournament, tournsize=3)
        pop = [creator.Individual(map(int, row)) for row in init_pop]
        algorithms.eaSimple(
            pop, tb, cxpb=0.9, mutpb=1.0, ngen=generations, verbose=False
        )
        return count[0] - POPULATION  # the initial population is evaluated apart

    out["tools"]["deap"] = _rate(*_timed(deap_run, repeats), generations)
    log(f"  deap {out['tools']['deap']['evals_per_second']:.0f} evals/s")
    base_rate = out["tools"]["torch_loop"]["evals_per_second"]
    out["speedup_vs_torch_loop"] = {
        k: v["evals_per_second"] / base_rate for k, v in out["tools"].items()
    }
    return out


THROUGHPUT_NOTES = [
    "Same population (64), generations, 512 inversion probes (made once by "
    "gapruning, shared as NumPy), fitness (KL*T^2 at T=4 + top-1 disagreement "
    "vs the dense model) and exact 50%-of-units decoding for every tool; the "
    "benchmark checks that gapruning, the NumPy and the torch fitness agree "
    "(rel. 1e-3) and that the NumPy decoding equals gapruning's on random genomes.",
    "Warm-up run excluded; gapruning's compile time reported apart; medians of "
    "the repeats with min-max spread.",
    "torch loop: gp.convert.to_torch_module (an nn.Module with mask buffers), "
    "masks copied into the buffers per individual, one forward over all probes "
    "under torch.inference_mode, torch.set_num_threads(os.cpu_count()) unless "
    "1 thread measured faster (recorded per row: torch_threads), the "
    "GA operators (gapruning's) in NumPy; every individual evaluated every "
    "generation, as in the original code. No torch.compile.",
    "PyGAD: fitness_batch_size = population with a population-vectorized NumPy "
    "forward (the documented batch API; elites keep their fitness, so fewer than "
    "64 calls per generation), gene_space=[0,1], tournament 3, uniform "
    "crossover 0.9, random mutation 1/d, keep_elitism=2; no parallel_processing "
    "(2 shared cores).",
    "DEAP: algorithms.eaSimple (cxpb 0.9, mutFlipBit indpb 1/d, selTournament 3, "
    "no elitism), toolbox.evaluate = NumPy forward of one individual, builtin "
    "map (no multiprocessing pool on 2 shared cores); only changed individuals "
    "are evaluated.",
]


# ----------------------------------------------------------------- quality


PAODING_RUNNER = r"""
import json, sys, os
import numpy as np
cfg = json.load(open(sys.argv[1]))
import tensorflow as tf
from paoding.pruner import Pruner
from paoding.sampler import Sampler
from paoding.utility.option import ModelType, SamplingMode
w = np.load(cfg["weights"])
shape = tuple(cfg["input_shape"])
layers = [tf.keras.layers.Flatten(input_shape=shape, name="flatten")]
n = len(cfg["units"])
for i, u in enumerate(cfg["units"]):
    name = "dense" if i == 0 else f"dense_{i}"
    act = "relu" if i < n - 1 else None
    layers.append(tf.keras.layers.Dense(u, activation=act, name=name))
model = tf.keras.Sequential(layers)
model.set_weights([w[f"arr_{i}"] for i in range(len(w.files))])
model.save(cfg["h5"])
sampler = Sampler()
sampler.set_strategy(mode=SamplingMode.IMPACT, params=(0.75, 0.25))
pruner = Pruner(cfg["h5"], target=cfg["target"], step=cfg["step"],
                sample_strategy=sampler, input_interval=tuple(cfg["input_box"]),
                model_type=ModelType.MNIST, seed_val=0)
pruner.load_model()
pruner.prune(evaluator=None, save_file=False, model_name="bench")
np.savez(cfg["out"], *pruner.model.get_weights())
print("PAODING_DONE")
"""


def paoding_venv(log) -> tuple[Path | None, str]:
    """The cached virtual environment running paoding-dl (made on first use)."""
    venv = CACHE / "paoding-venv"
    py = venv / "bin" / "python"
    marker = venv / ".gapruning-ready"
    if marker.exists():
        return py, marker.read_text()
    CACHE.mkdir(parents=True, exist_ok=True)
    log(f"creating {venv} (paoding-dl {PAODING_VERSION}, {PAODING_TF}) ...")
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        # paoding-dl's metadata has an invalid specifier ("opencv-python
        # (>=4.5numpy)") that pip >= 24.1 rejects; its dependencies are installed
        # by hand (no OpenCV: paoding's dense pruning does not import it)
        [str(py), "-m", "pip", "install", "-q", "pip<24.1"],
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            PAODING_TF,
            "scikit-learn",
            "pandas",
            "tabulate",
            "pydot",
            "importlib_metadata",
            "h5py",
        ],
        [
            str(py),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            f"paoding-dl=={PAODING_VERSION}",
        ],
    ]
    for cmd in steps:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            return None, f"`{' '.join(cmd)}` failed: {r.stderr[-2000:]}"
    r = subprocess.run(
        [
            str(py),
            "-c",
            "import paoding, tensorflow as tf; "
            "print(paoding.__version__, tf.__version__)",
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode:
        return None, f"paoding import failed: {r.stderr[-2000:]}"
    info = f"paoding-dl {r.stdout.split()[0]}, tensorflow {r.stdout.split()[1]}"
    marker.write_text(info)
    return py, info


def with_weights(model_name: str, arrays: list[np.ndarray]):
    """A fresh copy of the zoo model with Dense (kernel, bias) pairs replaced."""
    import jax.numpy as jnp

    import gapruning as gp

    net = gp.load(model_name)
    names = list(net.model.layers)
    assert len(arrays) == 2 * len(names), (len(arrays), names)
    for i, name in enumerate(names):
        layer = net.model.layers[name]
        layer.kernel.value = jnp.asarray(arrays[2 * i])
        layer.bias.value = jnp.asarray(arrays[2 * i + 1])
    return net


def removed_units(arrays: list[np.ndarray]) -> tuple[int, int]:
    """Hidden units that no longer reach the output (all-zero outgoing weights or
    all-zero incoming weights and bias), out of all hidden units."""
    removed = total = 0
    for i in range(0, len(arrays) - 2, 2):
        k, b, k_next = arrays[i], arrays[i + 1], arrays[i + 2]
        dead = (np.abs(k_next).sum(1) == 0) | ((np.abs(k).sum(0) == 0) & (b == 0))
        removed += int(dead.sum())
        total += len(b)
    return removed, total


def run_paoding(model, target, quick, log, workdir: Path) -> dict:
    import gapruning as gp

    py, info = paoding_venv(log)
    if py is None:
        return {"error": info}
    net = gp.load(model)
    w = np_weights(net)
    arrays = [
        a for name in net.model.layers for a in (w[name]["kernel"], w[name]["bias"])
    ]
    run_dir = workdir / f"paoding-{model}-{target}"
    run_dir.mkdir(parents=True, exist_ok=True)
    np.savez(run_dir / "dense.npz", *arrays)
    step = 0.05 if quick else 0.025  # paoding-dl's default step is 0.025
    # paoding-dl removes ceil(step * size) units of every hidden layer per step
    # and stops once the float sum of steps reaches its target; ask for the
    # number of steps that removes closest to `target` of all hidden units (a
    # hair less than steps * step: 0.05 * 10 sums to 0.4999...)
    sizes = [a.shape[1] for a in arrays[:-2:2]]
    per_step = sum(math.ceil(step * n) for n in sizes)
    steps = max(1, round(target * sum(sizes) / per_step))
    paoding_target = steps * step - 1e-6
    cfg = {
        "weights": str(run_dir / "dense.npz"),
        "units": [a.shape[1] for a in arrays[::2]],
        "input_shape": list(net.input_shape),
        "input_box": list(net.input_box),
        "target": paoding_target,
        "step": step,
        "h5": str(run_dir / "model.h5"),
        "out": str(run_dir / "pruned.npz"),
    }
    (run_dir / "cfg.json").write_text(json.dumps(cfg))
    (run_dir / "runner.py").write_text(PAODING_RUNNER)
    t0 = time.perf_counter()
    r = subprocess.run(
        [str(py), str(run_dir / "runner.py"), str(run_dir / "cfg.json")],
        cwd=run_dir,
        capture_output=True,
        text=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
    )
    seconds = time.perf_counter() - t0
    (run_dir / "log.txt").write_text(r.stdout[-20000:] + "\n" + r.stderr[-20000:])
    if r.returncode or "PAODING_DONE" not in r.stdout:
        return {"error": f"paoding run failed (rc {r.returncode}): {r.stderr[-1500:]}"}
    pruned = np.load(run_dir / "pruned.npz")
    out = [pruned[f"arr_{i}"] for i in range(len(pruned.files))]
    rem, tot = removed_units(out)
    return {
        "net": with_weights(model, out),
        "seconds": seconds,
        "removed_units": rem,
        "hidden_units": tot,
        "options": f"{info}; Sampler IMPACT (0.75, 0.25), step {step}, "
        f"target {paoding_target:.4f} ({steps} steps of {per_step} units), "
        f"input_interval = the model's input box, ModelType.MNIST, seed 0, "
        "no surgery (pruned units zeroed in place, merged into kept ones)",
    }


def run_torch_pruning(model, target, log) -> dict:
    import torch
    import torch_pruning as tp
    from torch import nn

    import gapruning as gp

    torch.set_num_threads(os.cpu_count() or 1)
    net = gp.load(model)
    w = np_weights(net)
    names = list(net.model.layers)
    mods = [("flatten", nn.Flatten())]
    for i, name in enumerate(names):
        k = w[name]["kernel"]
        lin = nn.Linear(k.shape[0], k.shape[1])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(k.T.copy()))
            lin.bias.copy_(torch.from_numpy(w[name]["bias"].copy()))
        mods.append((name, lin))
        if i < len(names) - 1:
            mods.append((f"relu{i}", nn.ReLU()))
    module = nn.Sequential(OrderedDict(mods)).eval()
    dense_w = {n: getattr(module, n).weight.detach().clone() for n in names}
    example = torch.zeros(1, *net.input_shape[::-1])  # any shape flattening to 784
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        module,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=target,
        ignored_layers=[getattr(module, names[-1])],
    )
    pruner.step()
    seconds = time.perf_counter() - t0
    # map the physically smaller layers back to the dense shapes (zeros for the
    # removed units) so that gp.evaluate sees the same network
    arrays, kept_in = [], np.arange(dense_w[names[0]].shape[1])
    for name in names:
        small = getattr(module, name)
        wd = dense_w[name][:, kept_in]
        sw = small.weight.detach()
        kept_out = np.array([int(torch.argmin((wd - row).abs().sum(1))) for row in sw])
        k = np.zeros(dense_w[name].shape[::-1], np.float32)
        k[np.ix_(kept_in, kept_out)] = sw.numpy().T
        b = np.zeros(dense_w[name].shape[0], np.float32)
        b[kept_out] = small.bias.detach().numpy()
        arrays += [k, b]
        kept_in = kept_out
    pruned_net = with_weights(model, arrays)
    # sanity: the physically pruned torch module == the mapped-back network
    x = np.random.default_rng(0).normal(size=(16, *net.input_shape)).astype(np.float32)
    with torch.inference_mode():
        zt = module(torch.from_numpy(x)).numpy()
    zg = np.asarray(pruned_net.model(x))
    rem, tot = removed_units(arrays)
    return {
        "net": pruned_net,
        "seconds": seconds,
        "removed_units": rem,
        "hidden_units": tot,
        "max_abs_diff_torch_vs_mapped": float(np.abs(zt - zg).max()),
        "options": f"torch-pruning {_version('torch-pruning')}: MagnitudePruner, "
        f"MagnitudeImportance(p=2), pruning_ratio {target} per hidden layer, "
        "output layer ignored, no fine-tuning",
    }


def quality(models, targets, generations, quick, log, workdir, only=None) -> list[dict]:
    """Rows of the quality table; ``only``: run just the methods whose label
    contains it (the others are left out of the returned rows)."""
    import gapruning as gp

    test = gp.data.fashion_mnist("test")

    def score(pnet):
        m = gp.evaluate(pnet, test, attacks=("fgsm",), eps=(0.05,))
        return {"accuracy": m["accuracy"], "fgsm_0.05": m["fgsm"][0.05]}

    rows = []
    for model in models:
        net = gp.load(model)
        if only is None:
            rows.append(
                {"model": model, "target": 0.0, "method": "dense", **score(net)}
            )
            log(rows[-1])
        for target in targets:
            base = {"model": model, "target": target}
            variants = [
                ("gapruning GA (default fitness)", {"strategy": "ga"}),
                (
                    "gapruning l1 per layer (one-shot)",
                    {"strategy": "l1", "per_group": True},
                ),
            ]
            if hasattr(gp, "recover"):  # data-free recovery, when the checkout has it
                variants.append(
                    (
                        "gapruning GA + recover (merge, distill)",
                        {"strategy": "ga", "recover": ("merge", "distill")},
                    )
                )
            for label, kw in variants:
                if only is not None and only not in label:
                    continue
                t0 = time.perf_counter()
                try:
                    res = gp.prune(
                        gp.load(model),
                        recover=(),
                        target=target,
                        budget="units",
                        generations=generations,
                        population=POPULATION,
                        num_probes=NUM_PROBES,
                        seed=0,
                        progress=False,
                        **kw,
                    )
                except Exception as err:  # a variant failing is a result
                    rows.append(
                        {
                            **base,
                            "method": label,
                            "error": f"{type(err).__name__}: {err}",
                        }
                    )
                    log(rows[-1])
                    continue
                sec = time.perf_counter() - t0
                kept = int(np.asarray(net.space.flat(res.masks)).sum())
                rows.append(
                    {
                        **base,
                        "method": label,
                        "seconds": sec,
                        "removed_units": net.space.num_units - kept,
                        "hidden_units": net.space.num_units,
                        "options": f"gp.prune(budget='units', fitness='default', "
                        f"generations={generations}, population={POPULATION}, "
                        f"num_probes={NUM_PROBES}, seed=0, "
                        + ", ".join(f"{k}={v!r}" for k, v in kw.items())
                        + ")",
                        **score(res.pruned),
                    }
                )
                log(rows[-1])
            for label, fn, fargs in (
                ("Torch-Pruning magnitude", run_torch_pruning, (model, target, log)),
                ("paoding-dl", run_paoding, (model, target, quick, log, workdir)),
            ):
                if only is not None and only not in label:
                    continue
                try:
                    r = fn(*fargs)
                except Exception as err:  # a peer failing is a result, not a crash
                    r = {"error": f"{type(err).__name__}: {err}"}
                pnet = r.pop("net", None)
                row = {**base, "method": label, **r}
                if pnet is not None:
                    row.update(score(pnet))
                rows.append(row)
                log({k: v for k, v in row.items() if k != "options"})
    return rows


# ------------------------------------------------------------------ output


def _load() -> dict:
    path = RESULTS / f"{NAME}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _end_load(m: dict) -> str:
    end = m.get("load_average_at_end")
    return "" if end is None else f" (at end {end:.2f})"


def render(payload: dict) -> str:
    lines = ["# gapruning next to the tools a user would pick instead", ""]
    th = payload.get("throughput")
    if th:
        m = th["machine"]
        lines += [
            "## Throughput of the same genetic search",
            "",
            f"{m['date']}, {m['cpu']}, {m['cores']} CPU cores, load average at start "
            f"{m['load_average_at_start']:.2f}{_end_load(m)}, jax {m['jax']}, torch "
            f"{th['versions'].get('torch')}, pygad {th['versions'].get('pygad')}, deap "
            f"{th['versions'].get('deap')}{' (quick run)' if th['quick'] else ''}.",
            "",
            "| model | tool | evals/s (min-max) | s/generation (min-max) | "
            "compile s | vs torch loop |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in th["rows"]:
            for tool, v in r["tools"].items():
                lo, hi = v["seconds_per_generation_spread"]
                eps = v["evals_per_second"]
                elo, ehi = v.get(
                    "evals_per_second_spread",
                    [
                        v["evals_per_generation"] / hi
                        if "evals_per_generation" in v
                        else eps,
                        v["evals_per_generation"] / lo
                        if "evals_per_generation" in v
                        else eps,
                    ],
                )
                comp = v.get("compile_seconds")
                lines.append(
                    f"| {r['model']} | {tool} | {eps:.0f} ({elo:.0f}-{ehi:.0f}) | "
                    f"{v['seconds_per_generation']:.4f} ({lo:.4f}-{hi:.4f}) | "
                    f"{'' if comp is None else f'{comp:.1f}'} | "
                    f"{r['speedup_vs_torch_loop'][tool]:.1f}x |"
                )
        lines += [""]
        r0 = th["rows"][0]
        lines += [
            f"P={r0['population']}, {r0['generations']} generations, "
            f"{th['repeats']} repeats, {r0['num_probes']} probes. Equivalence "
            "checks (decoding, fitness values across gapruning/NumPy/torch): "
            + ", ".join(
                f"{r['model']} {'ok' if r['equivalent'] else 'FAILED'}"
                for r in th["rows"]
            )
            + ".",
            "",
        ]
        lines += [f"- {n}" for n in th["notes"]]
        for r in th["rows"]:
            tl = r["tools"]["torch_loop"]
            ms = {
                k: round(v, 1) for k, v in tl.get("forward_ms_by_threads", {}).items()
            }
            lines.append(
                f"- torch threads chosen on {r['model']}: {tl.get('torch_threads')} "
                f"(ms per forward by thread count: {ms})"
            )
        goal = [
            f"{r['model']} {r['speedup_vs_torch_loop']['gapruning']:.1f}x"
            for r in th["rows"]
        ]
        miss = [
            r["model"]
            for r in th["rows"]
            if r["speedup_vs_torch_loop"]["gapruning"] < 10
        ]
        lines += [
            "",
            "Goal: gapruning >= 10x the per-individual PyTorch loop at P=64: "
            + ", ".join(goal)
            + (f" -- **not met** on {', '.join(miss)}." if miss else " -- met."),
            "",
        ]
    q = payload.get("quality")
    if q:
        m = q["machine"]
        lines += [
            "## Quality at equal hidden-unit sparsity (no fine-tuning)",
            "",
            f"{m['date']}, load average at start {m['load_average_at_start']:.2f}"
            f"{_end_load(m)}"
            f"{' (quick run)' if q['quick'] else ''}. Test accuracy and FGSM "
            "(eps 0.05, pixel units) robust accuracy on the 10,000 Fashion-MNIST "
            "test images, all through gp.evaluate. Removed = hidden units that no "
            "longer reach the output.",
            "",
            "| model | removed target | method | removed units | accuracy | "
            "FGSM 0.05 | prune s |",
            "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
        ]
        for r in q["rows"]:
            if "error" in r:
                lines.append(
                    f"| {r['model']} | {r['target']:.0%} | {r['method']} | "
                    f"failed: {r['error'][:120].replace('|', '/')} | | | |"
                )
                continue
            rem = (
                f"{r['removed_units']}/{r['hidden_units']}"
                if "removed_units" in r
                else ""
            )
            sec = f"{r['seconds']:.1f}" if "seconds" in r else ""
            lines.append(
                f"| {r['model']} | {r['target']:.0%} | {r['method']} | {rem} | "
                f"{r['accuracy']:.4f} | {r['fgsm_0.05']:.4f} | {sec} |"
            )
        lines += [""] + [f"- {n}" for n in q["notes"]] + [""]
    return "\n".join(lines)


def plot(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    th, q = payload.get("throughput"), payload.get("quality")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    if th:
        ax = axes[0]
        tools = list(th["rows"][0]["tools"])
        width = 0.8 / len(th["rows"])
        for i, r in enumerate(th["rows"]):
            vals = [r["tools"][t]["evals_per_second"] for t in tools]
            ax.bar(np.arange(len(tools)) + i * width, vals, width, label=r["model"])
        ax.set_xticks(np.arange(len(tools)) + width / 2, tools)
        ax.set_yscale("log")
        ax.set_ylabel("fitness evaluations / s (log)")
        ax.set_title(f"same GA, P={POPULATION}")
        ax.legend(fontsize=8)
    if q:
        for ax, metric, title in (
            (axes[1], "accuracy", "test accuracy"),
            (axes[2], "fgsm_0.05", "FGSM eps 0.05 accuracy"),
        ):
            models = sorted({r["model"] for r in q["rows"]})
            methods = [
                m for m in dict.fromkeys(r["method"] for r in q["rows"]) if m != "dense"
            ]
            markers = "os^vD"
            for mi, model in enumerate(models):
                for j, meth in enumerate(methods):
                    pts = [
                        (r["target"], r[metric])
                        for r in q["rows"]
                        if r["model"] == model and r["method"] == meth and metric in r
                    ]
                    if pts:
                        x, y = zip(*sorted(pts), strict=True)
                        ax.plot(
                            x,
                            y,
                            marker=markers[j % 5],
                            ls="-" if mi == 0 else "--",
                            color=f"C{j}",
                            label=f"{meth} ({model})",
                        )
            ax.set_xlabel("hidden units removed (target)")
            ax.set_title(title)
        axes[1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{NAME}.png", dpi=110)
    plt.close(fig)


def save(payload: dict) -> None:
    write_text_atomic(RESULTS / f"{NAME}.json", json.dumps(payload, indent=2) + "\n")
    write_text_atomic(RESULTS / f"{NAME}.md", render(payload))
    plot(payload)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="gapruning bench peers",
        description="gapruning next to PyTorch-loop/PyGAD/DEAP (speed) and "
        "paoding-dl/Torch-Pruning (quality).",
    )
    ap.add_argument("--quick", action="store_true", help="few generations, to check")
    ap.add_argument("--part", choices=("throughput", "quality", "all"), default="all")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--generations",
        type=int,
        default=None,
        help="throughput generations (default 10, quick 2)",
    )
    ap.add_argument(
        "--prune-generations",
        type=int,
        default=None,
        help="gp.prune generations in the quality part (default 200, quick 3)",
    )
    ap.add_argument(
        "--only",
        help="quality part: re-run only the methods whose label contains this "
        "text (e.g. paoding-dl) and replace their rows in the existing results",
    )
    args = ap.parse_args(argv)

    def log(msg):
        print(msg, flush=True)

    payload = _load()
    if args.part in ("throughput", "all"):
        info = machine()
        info["cpu"] = platform.processor() or platform.machine()
        gens = args.generations or (2 if args.quick else 10)
        models = ["lenet300-fmnist", "lenet5-fmnist"]
        part_name = "throughput"
        rows = [throughput_model(m, gens, args.repeats, log) for m in models]
        payload["throughput"] = {
            "machine": info,
            "quick": args.quick,
            "repeats": args.repeats,
            "versions": {p: _version(p) for p in ("torch", "pygad", "deap", "numpy")},
            "notes": THROUGHPUT_NOTES,
            "rows": rows,
        }
        payload[part_name]["machine"]["load_average_at_end"] = os.getloadavg()[0]
        save(payload)
    if args.part in ("quality", "all"):
        info = machine()
        gens = args.prune_generations or (3 if args.quick else 200)
        workdir = CACHE / "runs"
        part_name = "quality"
        rows = quality(
            ["lenet300-fmnist", "paoding_mlp-fmnist"],
            (0.5, 0.8),
            gens,
            args.quick,
            log,
            workdir,
            only=args.only,
        )
        if args.only is not None:  # replace just those rows of the last run
            old = payload.get("quality", {}).get("rows", [])
            fresh = {(r["model"], r["target"], r["method"]): r for r in rows}
            keys = [(r["model"], r["target"], r["method"]) for r in old]
            rows = [fresh.pop(k, r) for k, r in zip(keys, old, strict=True)]
            rows += list(fresh.values())
            info = payload.get("quality", {}).get("machine", info)
            info["rerun_of_" + args.only] = machine()
        payload["quality"] = {
            "machine": info,
            "quick": args.quick,
            "prune_generations": gens,
            "versions": {
                p: _version(p) for p in ("torch", "torch-pruning", "jax", "gapruning")
            },
            "notes": [
                "gapruning removes the target share of all hidden units (global "
                "budget, at least one unit per layer); paoding-dl and Torch-Pruning "
                "remove it from every hidden layer. Same total count.",
                "paoding-dl runs in its own virtual environment "
                f"({CACHE / 'paoding-venv'}), on the network written to a Keras .h5 "
                "from the shipped weights (Flatten + Dense layers); its pruned "
                "weights are read back into the same gapruning model.",
                "Torch-Pruning runs on the network as an nn.Sequential of "
                "nn.Linear; its physically smaller layers are mapped back to the "
                "dense shapes with zeros for removed units (checked against the "
                "pruned torch module's outputs).",
                (
                    "gp.recover exists in this checkout: the recovery row runs "
                    "gp.prune(..., recover=('merge', 'distill'))."
                    if hasattr(gp_module(), "recover")
                    else "gp.recover (data-free recovery) does not exist yet in "
                    "this checkout: no recovery row."
                ),
                "paoding-dl removes ceil(step * size) units of every hidden layer "
                "per step (default step 0.025) until the summed steps reach its "
                "target; the benchmark asks for the number of steps that removes "
                "closest to the target, so its removed count can differ slightly "
                "(see 'removed units', counted from the weights it returns).",
                "gapruning l1 per layer: gp.prune(strategy='l1', per_group=True), "
                "the same per-layer ratio as the peers.",
                "No method saw the test set; no fine-tuning anywhere.",
            ],
            "rows": rows,
        }
        payload[part_name]["machine"]["load_average_at_end"] = os.getloadavg()[0]
        save(payload)
    return 0


def gp_module():
    import gapruning

    return gapruning


if __name__ == "__main__":
    sys.exit(main())
