import importlib.util
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, os.path.dirname(__file__))

from gapruning import models  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load_benchmark(name: str):
    """The module ``benchmarks/<name>.py``, imported as ``_<name>_test`` (the
    benchmarks folder joins ``sys.path`` for their ``common`` import)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(
        f"_{name}_test", BENCHMARKS / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def randomize(net, seed: int = 0):
    """Gives every BatchNorm random running statistics and affine parameters, so
    tests exercise them (fresh BatchNorms are the identity)."""
    rng = np.random.default_rng(seed)
    for layer in net.layers.values():
        if isinstance(layer, nnx.BatchNorm):
            c = layer.mean[...].shape
            layer.mean[...] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)
            layer.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)
            layer.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
            layer.bias[...] = jnp.asarray(rng.normal(0, 0.2, c), jnp.float32)
    net.eval()
    return net


@pytest.fixture(params=sorted(models.MODELS))
def zoo_net(request):
    """Every zoo architecture, freshly built with random BatchNorm statistics."""
    return request.param, randomize(models.build(request.param, seed=1))


@pytest.fixture
def batch():
    return jax.random.normal(jax.random.key(0), (3, 28, 28, 1))


@pytest.fixture
def no_datasets():
    """Makes every dataset reader raise during the test."""
    from gapruning import data

    def forbidden(*args, **kwargs):
        raise AssertionError("a dataset was opened during data-free work")

    with pytest.MonkeyPatch.context() as mp:
        for name in ("fashion_mnist", "read_idx", "load_dataset"):
            mp.setattr(data, name, forbidden)
        yield


def pytest_configure(config):
    """One persistent XLA compilation cache per test session (also used by the
    subprocesses the CLI tests start): tests build the same jitted functions many
    times over, and a cache hit skips their recompilation."""
    import tempfile

    cache = os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="gapruning-xla-cache-")
    )
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
