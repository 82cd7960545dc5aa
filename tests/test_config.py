"""PruneConfig: gp.prune's options in one checked object."""

import dataclasses
import json

import numpy as np
import pytest

import gapruning as gp
from gapruning.config import POSITIONAL, PruneConfig, make_config


def test_defaults_follow_the_documented_call():
    config = PruneConfig()
    assert (config.strategy, config.target, config.budget) == ("ga", 0.7, "units")
    # sizes follow the network (gapruning.defaults); the recovery is decided after
    # the search
    assert (config.generations, config.population, config.num_probes) == (None,) * 3
    assert config.generations_per_scan == 10 and config.chunk_size == "auto"
    assert config.recover == ("auto",)
    assert config.repair_method is None and not config.distill
    assert PruneConfig(recover=("auto", "distill")).distill


def test_positional_arguments_map_onto_fields_in_order():
    args = ("random", 0.5, "params", "fidelity", 3, 8, 16, 4, None, False)
    config = make_config(None, args, {})
    assert [getattr(config, k) for k in POSITIONAL] == list(args)


def test_settings_are_json_and_carry_only_what_was_asked():
    plain = PruneConfig().settings()
    assert json.loads(json.dumps(plain)) == plain
    assert "dtype" not in plain and "repair" not in plain and "chunk_size" not in plain
    asked = PruneConfig(
        dtype="bfloat16", chunk_size=8, repair="lstsq", recover="distill"
    ).settings()
    assert asked["dtype"] == "bfloat16" and asked["chunk_size"] == 8
    assert asked["repair"] == "lstsq" and asked["recover"] == ["distill"]
    assert PruneConfig(fitness=len).settings()["fitness"] == "len"


def test_unknown_and_repeated_keywords_are_refused_by_name():
    with pytest.raises(TypeError, match=r"unknown keyword\(s\) \['generation'\]"):
        make_config(None, (), {"generation": 3})
    with pytest.raises(TypeError, match="'strategy' twice"):
        make_config(None, ("ga",), {"strategy": "random"})
    with pytest.raises(TypeError, match="at most 11 positional"):
        make_config(None, tuple(range(11)), {})


def test_the_old_keyword_chunk_warns_and_names_itself_in_errors():
    with pytest.warns(DeprecationWarning, match="generations_per_scan"):
        config = make_config(None, (), {"chunk": 3})
    assert config.generations_per_scan == 3
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError) as error:
        make_config(None, (), {"chunk": 0})
    assert str(error.value) == "chunk must be at least 1, got 0"
    with pytest.raises(ValueError, match="^generations_per_scan must be at least 1"):
        make_config(None, (), {"generations_per_scan": 0})


def test_repair_names_and_recover_steps():
    assert PruneConfig(repair="cosine").repair_method == "merge"
    assert PruneConfig(recover=("lstsq", "distill")).repair_method == "lstsq"
    assert PruneConfig(recover=("lstsq", "distill")).distill
    assert PruneConfig(repair="merge", recover=("merge",)).repair_method == "merge"
    with pytest.raises(ValueError, match="one merge method"):
        PruneConfig(repair="merge", recover=("lstsq",))
    with pytest.raises(ValueError, match="unknown recover step"):
        PruneConfig(recover=("finetune",))
    with pytest.raises(ValueError, match="unknown repair 'prune'"):
        PruneConfig(repair="prune")
    with pytest.raises(ValueError, match="composed fitness"):
        PruneConfig(repair="merge", fitness=len)


def test_recover_options_key_merge_is_read_as_repair():
    with pytest.warns(DeprecationWarning, match='"repair"'):
        config = PruneConfig(recover_options={"merge": {"ridge": 0.1}})
    assert config.recover_options == {"repair": {"ridge": 0.1}}
    with pytest.raises(ValueError, match="unknown recover_options key"):
        PruneConfig(recover_options={"finetune": {}})


def test_a_config_is_reused_and_overridden_by_keywords():
    net = gp.load("paoding_mlp-fmnist")
    base = PruneConfig(
        target=0.5,
        fitness="fidelity",
        probes="gaussian",
        num_probes=16,
        generations=2,
        population=4,
        progress=False,
    )
    by_config = gp.prune(net, config=base, seed=1)
    by_keywords = gp.prune(net, **{**dataclasses.asdict(base), "seed": 1})
    # the result's config is the one that ran: "auto" became the lstsq repair
    assert by_config.config == dataclasses.replace(base, seed=1, recover=("lstsq",))
    for group, mask in by_config.masks.items():
        np.testing.assert_array_equal(mask, by_keywords.masks[group])
    assert by_config.report()["settings"] == by_keywords.report()["settings"]


def test_default_sizes_follow_the_network_cost():
    from gapruning.defaults import FULL_SEARCH, SEARCH_FLOPS, default_sizes

    assert default_sizes(266_200) == FULL_SEARCH  # lenet300
    gens, pop, probes = default_sizes(30_821_248)  # resnet20
    assert (pop, probes) == (32, 256) and gens % 10 == 0
    assert (
        abs(gens * pop * probes * 30_821_248 - SEARCH_FLOPS)
        <= 5 * pop * probes * 30_821_248
    )
    assert default_sizes(10**12) == (10, 32, 256)  # never fewer than 10 generations
    sized = gp.prune(gp.load("lenet300-fmnist"), "l1", 0.5, progress=False).config
    assert (sized.generations, sized.population, sized.num_probes) == FULL_SEARCH
    given = gp.prune(
        gp.load("lenet300-fmnist"), "l1", 0.5, population=8, progress=False
    )
    assert given.config.population == 8 and given.config.generations == 200


def test_auto_recovery_repairs_only_masks_of_the_dense_network():
    net = gp.load("lenet300-fmnist")
    fast = dict(target=0.5, progress=False)
    l1 = gp.prune(net, "l1", **fast)
    assert l1.config.recover == ("lstsq",)
    assert l1.pruned.card["repair"]["method"] == "lstsq"
    # a one-shot method spends no search: nothing to pay a distillation with
    assert "distill" not in l1.pruned.card
    plain = gp.prune(net, "l1", recover=(), **fast)
    assert plain.config.recover == () and "repair" not in plain.pruned.card
    # neuron merging returns compensated weights: nothing more to repair
    assert gp.prune(net, "neuron_merging", **fast).config.recover == ()
    # a named repair replaces the default one; distill follows it
    named = PruneConfig(recover=("auto", "merge"))
    assert named.repair_method == "merge"
    both = gp.prune(
        net,
        "l1",
        recover=("auto", "distill"),
        recover_options={"distill": {"steps": 2, "batch_size": 8}},
        **fast,
    )
    assert both.config.recover == ("lstsq", "distill")
    assert both.pruned.card["distill"]["steps"] == 2


def test_a_search_that_cannot_fit_in_memory_is_refused_up_front(monkeypatch):
    from gapruning import defaults
    from gapruning.defaults import check_memory

    net = gp.load("resnet20-fmnist")
    check_memory(net, 512)  # fits this machine
    with pytest.raises(
        MemoryError, match=r"resnet20-fmnist: one individual on 512 probes"
    ):
        check_memory(net, 512, limit=2**20)
    monkeypatch.setattr(defaults, "memory_bytes", lambda: 2**20)
    with pytest.raises(MemoryError, match="use fewer probes"):
        gp.prune(net, target=0.5, budget="flops", progress=False)


def test_default_distillation_spends_what_the_search_spent():
    from gapruning.defaults import default_distill_steps

    resnet, lenet = gp.load("resnet20-fmnist"), gp.load("lenet300-fmnist")
    # 20 x 32 individuals on 256 probes; 128 probes a step, teacher + student
    # forward and backward (4 passes), no adversarial push with BatchNorm
    assert default_distill_steps(resnet, 20 * 32 * 256) == 20 * 32 * 256 // (128 * 4)
    # without BatchNorm, 3 pushes: 16 passes a step; capped at 2000
    assert default_distill_steps(lenet, 200 * 64 * 512) == 2000
    assert default_distill_steps(lenet, 100 * 2048) == 100
    assert default_distill_steps(lenet, 99 * 2048) == 0  # too short to pay
    assert default_distill_steps(lenet, 100 * 2048, {"batch_size": 256}) == 0
    run = gp.prune(
        lenet,
        target=0.5,
        generations=4,
        population=8,
        num_probes=32,
        progress=False,
        recover_options={"distill": {"steps": 5, "batch_size": 8}},
    )
    # the search's (4 + 1) x 8 individuals x 32 probes pay for 10 steps of 8
    # probes x 16 passes: under 100, so no distillation
    assert run.config.recover == ("lstsq",)
    # on 512 probes they pay for 160 steps: distilled, for the steps asked
    longer = gp.prune(
        lenet,
        target=0.5,
        generations=4,
        population=8,
        num_probes=512,
        progress=False,
        recover_options={"distill": {"steps": 5, "batch_size": 8}},
    )
    assert longer.config.recover == ("lstsq", "distill")
    assert longer.pruned.card["distill"]["steps"] == 5
