"""`gapruning bench peers` is wired up, and the peers benchmark compares like with
like: its NumPy decoding and masked forward equal gapruning's (no peer library,
no network access needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_benchmark

import gapruning as gp
from gapruning.cli import build_parser
from gapruning.encoding import Budget, UnitEncoding


def test_bench_peers_parses():
    args = build_parser().parse_args(["bench", "peers", "--quick", "--part", "quality"])
    assert (args.benchmark, args.quick, args.part) == ("peers", True, "quality")


def test_bench_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["bench", "--help"])
    assert e.value.code == 0
    assert "peers" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["lenet300-fmnist", "lenet5-fmnist"])
def test_numpy_peer_matches_gapruning(model):
    peers = load_benchmark("peers")
    net = gp.load(model)
    sizes = [g.size for g in net.space.groups]
    enc = UnitEncoding(net.space, Budget("units", 0.5))
    dec = peers.NumpyDecoder(sizes, 0.5)
    npnet = peers.NumpyNet(net, net.card["arch"])
    x = np.random.default_rng(0).normal(size=(8, *net.input_shape)).astype(np.float32)
    genes = (np.random.default_rng(1).random((3, dec.n)) < 0.5).astype(np.float32)
    genes[2] = 0.0  # all ties: the lower index wins, one unit per group forced
    for g in genes:
        kept = dec(g)
        ref = np.asarray(net.space.flat(enc.decode(jnp.asarray(g))))
        np.testing.assert_array_equal(kept, ref)
        want = gp.masked_apply(net, net.space.unflat(jnp.asarray(kept)), x)
        got = npnet.logits(x, kept[None])[0]
        np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)
    dense = np.asarray(jax.jit(net.model)(x))
    assert peers.np_fitness(dense[None], dense)[0] == pytest.approx(0.0, abs=1e-6)
