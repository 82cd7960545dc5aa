"""Layer-wise profiles: ``profile_random`` and ``profile_rl``, and profile transfer.

After Venkatesan et al. (2020), "Out-of-the-box channel pruned networks": a
pruned network is described by its **profile**, one keep ratio per prunable
layer (group); the channels inside a layer matter less than how many are kept,
and a good profile found on one network transfers to other networks of the same
architecture. Here a profile is decoded by
:class:`~gapruning.encoding.ProfileEncoding` (inside a group, units by
incoming-weight L1 norm, ``rule="l1"``, or a seeded random order,
``rule="random"``; the profile is rescaled by one factor so the budget is met
exactly).

* ``profile_random``: random search over profiles (uniform ratios in ``[low, 1]``
  per group), or an exhaustive enumeration of a grid of ratio ``levels`` when the
  grid fits the evaluation budget (``exhaustive="auto"``), scored by the
  data-free fitness, ``population * generations`` evaluations, one jitted scan
  (:mod:`gapruning.search.profile_sampler`).
* ``profile_rl``: REINFORCE (Williams, 1992) with an optax Adam optimizer. The
  policy is a diagonal Gaussian over per-group logits ``z`` (ratios
  ``sigmoid(z)``); the reward of a sampled profile is ``-fitness`` of its
  budget-decoded masks minus ``compression_weight * (raw kept fraction -
  (1 - target))**2``, the term driving the policy's own expected compression
  to the target; advantages are normalized per model. The policy is trained on
  several models of the same architecture at once: the given network plus
  ``copies`` copies with multiplicatively perturbed kernels (``perturbation``),
  or the ``models`` given (e.g. other training seeds); sample ``j`` of a step is
  scored on model ``j mod M``, so the budget stays ``population * generations``.
  All steps are one jitted ``lax.scan``.
* Transfer: ``details["profile"]`` holds the found profile; ``save_profile=path``
  writes it as JSON, and ``gapruning prune --profile path`` (or
  ``strategy_options={"profile": path}``) applies it to another model of the
  same architecture (same graph; a mismatch is refused naming the difference),
  decoded under that call's budget.

What differs from the paper: the paper scores profiles by accuracy after
fine-tuning on the training set, and its RL agent uses training data; here the
reward is the data-free fitness (no fine-tuning inside the search), and the
"other models" are perturbed copies unless the user passes real ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ..encoding import Budget, ProfileEncoding, kept_fraction_fn
from ..files import write_text_atomic
from ..search import GENOME_STRATEGIES, engine
from ..space import PruneSpace
from ..zoo import Pretrained, architecture_digest
from . import MethodContext, MethodResult, register_method

PROFILE_FORMAT = "gapruning-profile/1"


class ProfileError(ValueError):
    """A profile that does not fit the model it is applied to."""


def profile_of(net: Pretrained, masks: Mapping) -> dict[str, float]:
    """Kept fraction of each group."""
    kept = net.space.kept(masks)
    return {g.name: kept[g.name] / g.size for g in net.space.groups}


def make_profile(
    net: Pretrained, masks: Mapping, *, method: str, rule: str, budget: Budget
) -> dict[str, Any]:
    """The JSON-able profile record of ``masks`` on ``net``."""
    kept = net.space.kept(masks)
    return {
        "format": PROFILE_FORMAT,
        "method": method,
        "model": net.name,
        "architecture": architecture_digest(net),
        "rule": rule,
        "budget": {"kind": budget.kind, "target": budget.target},
        "groups": {
            g.name: {
                "size": g.size,
                "kept": kept[g.name],
                "keep": kept[g.name] / g.size,
            }
            for g in net.space.groups
        },
    }


def save_profile(profile: Mapping, path: str | Path) -> Path:
    """Writes a profile record as JSON (atomically)."""
    return write_text_atomic(path, json.dumps(profile, indent=2, sort_keys=True))


def load_profile(path: str | Path) -> dict[str, Any]:
    """Reads a profile JSON written by :func:`save_profile`."""
    path = Path(path)
    try:
        profile = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ProfileError(f"profile file {path} is not valid JSON: {err}") from None
    if not isinstance(profile, dict) or profile.get("format") != PROFILE_FORMAT:
        raise ProfileError(f"{path} is not a gapruning profile ({PROFILE_FORMAT})")
    return profile


def check_profile(net: Pretrained, profile: Mapping) -> None:
    """Raises :class:`ProfileError` unless ``profile`` fits ``net``'s architecture."""
    groups = profile.get("groups", {})
    mine = {g.name: g.size for g in net.space.groups}
    theirs = {k: v.get("size") for k, v in groups.items()}
    if mine != theirs:
        diff = sorted(set(mine.items()) ^ set(theirs.items()))
        raise ProfileError(
            f"profile from {profile.get('model')!r} does not fit {net.name!r}: "
            f"group sizes differ ({diff[:4]}; this model: {mine})"
        )
    if profile.get("architecture") not in (None, architecture_digest(net)):
        raise ProfileError(
            f"profile from {profile.get('model')!r} was found on another "
            f"architecture than {net.name!r} (graph digest "
            f"{profile.get('architecture')} vs {architecture_digest(net)})"
        )


def apply_profile(
    net: Pretrained, profile: Mapping, budget: Budget, rule: str | None = None
) -> dict[str, np.ndarray]:
    """Masks of ``net`` following ``profile``'s shape under ``budget`` (exact)."""
    check_profile(net, profile)
    rule = rule or profile.get("rule", "l1")
    enc = ProfileEncoding(net.model, net.space, budget, rule=rule)
    ratios = np.array(
        [profile["groups"][g]["keep"] for g in net.space.group_names], np.float32
    )
    return {k: np.asarray(v, bool) for k, v in enc.decode(ratios).items()}


def _resolve(profile) -> dict:
    return load_profile(profile) if isinstance(profile, str | Path) else dict(profile)


def _applied(ctx: MethodContext, profile, rule, name) -> MethodResult:
    t0 = time.perf_counter()
    profile = _resolve(profile)
    masks = apply_profile(ctx.net, profile, ctx.budget, rule)
    details = {
        "applied_profile_from": profile.get("model"),
        "profile": make_profile(
            ctx.net,
            masks,
            method=name,
            rule=rule or profile.get("rule", "l1"),
            budget=ctx.budget,
        ),
    }
    return MethodResult(
        masks, ctx.net, seconds=time.perf_counter() - t0, details=details
    )


def _finish(ctx, masks, name, rule, save, result_kw, extra) -> MethodResult:
    profile = make_profile(ctx.net, masks, method=name, rule=rule, budget=ctx.budget)
    details = {"profile": profile, **extra}
    if save is not None:
        details["saved_to"] = str(save_profile(profile, save))
    return MethodResult(masks, ctx.net, details=details, **result_kw)


# ------------------------------------------------------------------ random search


def profile_random(
    ctx: MethodContext,
    *,
    rule: str = "l1",
    low: float = 0.05,
    levels: Sequence[float] = (0.25, 0.5, 0.75, 1.0),
    exhaustive: bool | str = "auto",
    save_profile: str | Path | None = None,
    profile=None,
    generations_per_scan: int = 10,
) -> MethodResult:
    """Random (or exhaustive grid) search over profiles; see the module doc.

    Args:
        rule: units inside a group: "l1" or "random".
        low: smallest sampled ratio (random search).
        levels, exhaustive: enumerate every profile in ``levels ** G`` instead
            (``"auto"``: when that grid fits ``population * generations``).
        save_profile: write the found profile there (JSON).
        profile: apply this saved profile (path or record) instead of searching.
    """
    if profile is not None:
        return _applied(ctx, profile, rule, "profile_random")
    t0 = time.perf_counter()
    space, p = ctx.space, ctx.population
    enc = ProfileEncoding(ctx.net.model, space, ctx.budget, rule=rule, seed=ctx.seed)
    g = len(space.groups)
    n_grid = len(levels) ** g if g < 32 else math.inf
    use_grid = exhaustive is True or (
        exhaustive == "auto" and n_grid <= p * ctx.generations
    )
    grid, generations = None, ctx.generations
    if use_grid:
        if n_grid > 10**6:
            raise ValueError(f"a grid of {len(levels)}^{g} profiles is too large")
        grid = np.array(list(itertools.product(levels, repeat=g)), np.float32)
        generations = max(1, math.ceil(len(grid) / p))
    strategy = GENOME_STRATEGIES["profile_sampler"](p, g, grid=grid, low=low)
    problem = engine.Problem(
        enc.decode, ctx.fitness, kept_fraction_fn(space, ctx.budget)
    )
    result = engine.run(
        strategy,
        problem,
        jax.random.PRNGKey(ctx.seed),
        generations,
        generations_per_scan=generations_per_scan,
    )
    masks = {k: np.asarray(v, bool) for k, v in result.best_masks.items()}
    extra = {
        "search": "exhaustive" if use_grid else "random",
        "grid_size": None if grid is None else len(grid),
    }
    kw = dict(
        history=result.history,
        evaluations=result.evaluations,
        seconds=time.perf_counter() - t0,
        compile_seconds=result.compile_seconds,
        best_fitness=result.best_fitness,
    )
    return _finish(ctx, masks, "profile_random", rule, save_profile, kw, extra)


# ------------------------------------------------------------------ REINFORCE


def perturbed_copy(net: Pretrained, scale: float, seed: int) -> Pretrained:
    """``net`` with every kernel multiplied by ``1 + scale * N(0, 1)``."""
    graphdef, params, rest = nnx.split(net.model, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    rng = np.random.default_rng(seed)
    for layer in pure.get("layers", {}).values():
        if "kernel" in layer:
            k = np.asarray(layer["kernel"])
            noise = 1.0 + scale * rng.standard_normal(k.shape)
            layer["kernel"] = jnp.asarray(k * noise, k.dtype)
    nnx.replace_by_pure_dict(params, pure)
    card = dict(net.card, name=f"{net.name}-perturbed{seed}")
    return Pretrained(nnx.merge(graphdef, params, rest), card)


def training_models(ctx: MethodContext, rule, copies, perturbation, models):
    """``(nets, fitnesses)`` the policy trains on: ``ctx.net`` first, then the
    given ``models`` (checked to share its architecture) or ``copies`` perturbed
    copies (none when the fitness is a user callable), each with the call's
    fitness spec on the same probes."""
    from ..fitness import Fitness, compose

    net, space, budget = ctx.net, ctx.space, ctx.budget
    base_fit = ctx.fitness
    if models is not None:
        others = list(models)
        mine = make_profile(
            net, space.full_masks(), method="", rule=rule, budget=budget
        )
        for m in others:
            check_profile(m, mine)
    elif isinstance(base_fit, Fitness):
        others = [
            perturbed_copy(net, perturbation, ctx.seed * 1000 + i + 1)
            for i in range(copies)
        ]
    else:  # a user callable: only the given network can be scored
        others = []
    fits = [base_fit]
    for m in others:
        fits.append(
            compose(
                m,
                base_fit.spec(),
                probes=base_fit.probes,
                normalize=True,
                combine=base_fit.combine,
            )
        )
    return [net, *others], fits


def expected_kept_fn(space: PruneSpace, budget: Budget) -> Callable:
    """Ratios ``(G,)`` -> the kept fraction of the budget's measure if every group
    kept exactly ``ratio * size`` units (fractional counts, before decoding)."""
    sizes = jnp.asarray(space.sizes, jnp.float32)
    dense = {
        "units": float(space.num_units),
        "params": float(space.dense_params),
        "flops": float(space.dense_flops),
    }[budget.kind]

    def raw_kept(r):
        counts = r * sizes
        if budget.kind == "units":
            return counts.sum() / dense
        return space.cost_of_counts(counts, budget.kind) / dense

    return raw_kept


@dataclasses.dataclass(frozen=True, eq=False)
class Reinforce:
    """REINFORCE over per-group logits ``z`` (ratios ``sigmoid(z)``), a diagonal
    Gaussian policy trained with ``opt``; sample ``j`` of a step is scored on
    model ``j mod M`` (``encs``, ``fits``: one per model)."""

    encs: list
    fits: list
    raw_kept: Callable
    opt: Any
    keep: float  # 1 - target
    compression_weight: float
    population: int

    @property
    def owner(self) -> np.ndarray:
        return np.arange(self.population) % len(self.encs)

    @property
    def index(self) -> list[np.ndarray]:
        return [np.flatnonzero(self.owner == m) for m in range(len(self.encs))]

    def evaluate(self, z):
        """``(P, G)`` logits -> ``(P,)`` fitness, sample ``j`` on model ``j % M``."""
        r = jax.nn.sigmoid(z)
        out = jnp.zeros((self.population,), jnp.float32)
        for m, idx in enumerate(self.index):
            masks = jax.vmap(self.encs[m].decode)(r[idx])
            out = out.at[idx].set(jnp.asarray(self.fits[m](masks), jnp.float32))
        return out

    def advantages(self, reward):
        """Rewards normalized per model."""
        adv = jnp.zeros_like(reward)
        for idx in self.index:
            rm = reward[idx]
            adv = adv.at[idx].set((rm - rm.mean()) / (rm.std() + 1e-8))
        return adv

    def step(self, carry, key):
        """One policy-gradient step on ``population`` samples (a scan body)."""
        params, opt_state, best_z, best_f = carry
        sigma = jnp.exp(params["log_sigma"])
        z = params["mu"] + sigma * jax.random.normal(key, (self.population, len(sigma)))
        f = self.evaluate(z)
        finite = jnp.isfinite(f)
        worst = jnp.max(jnp.where(finite, f, -jnp.inf))
        f_safe = jnp.where(finite, f, jnp.where(jnp.isfinite(worst), worst + 1, 1e3))
        kept = jax.vmap(self.raw_kept)(jax.nn.sigmoid(z))
        reward = -f_safe - self.compression_weight * (kept - self.keep) ** 2
        adv = self.advantages(reward)

        def loss(prm):
            s = jnp.exp(prm["log_sigma"])
            logp = (-0.5 * ((z - prm["mu"]) / s) ** 2 - prm["log_sigma"]).sum(-1)
            return -(jax.lax.stop_gradient(adv) * logp).mean()

        grads = jax.grad(loss)(params)
        updates, opt_state = self.opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        f0 = jnp.where(jnp.asarray(self.owner == 0), f, jnp.inf)
        i = jnp.argmin(f0)
        better = f0[i] < best_f
        best_z = jnp.where(better, z[i], best_z)
        best_f = jnp.where(better, f0[i], best_f)
        row = {"best": f0[i], "mean": f_safe.mean(), "reward": reward.mean()}
        row["kept"] = kept.mean()
        return (params, opt_state, best_z, best_f), row

    def train(self, key, init_sigma: float, generations: int):
        """All steps in one jitted scan from the policy centred on the budget's
        ratio: ``((params, opt_state, best_z, best_f), history rows)``."""
        g = self.encs[0].num_genes  # one ratio per group
        mu0 = jnp.full((g,), math.log(self.keep / (1.0 - self.keep)), jnp.float32)
        params0 = {"mu": mu0, "log_sigma": jnp.full((g,), math.log(init_sigma))}

        @jax.jit
        def run(key):
            carry = (params0, self.opt.init(params0), mu0, jnp.array(jnp.inf))
            keys = jax.random.split(key, generations)
            return jax.lax.scan(self.step, carry, keys)

        return run(key)


def choose_profile(rl: Reinforce, params, best_z, best_f):
    """The policy mean's profile or the best sample, whichever scores better on
    model 0: ``(chosen, masks, fitness, mean ratios, mean fitness)``."""
    mean_r = np.asarray(jax.nn.sigmoid(params["mu"]))
    mean_masks = rl.encs[0].decode(mean_r)
    mean_f = float(rl.fits[0](jax.tree.map(lambda a: a[None], mean_masks))[0])
    if mean_f <= float(best_f):
        chosen, masks, best = "policy_mean", mean_masks, mean_f
    else:
        chosen, best = "best_sample", float(best_f)
        masks = rl.encs[0].decode(np.asarray(jax.nn.sigmoid(best_z)))
    masks = {k: np.asarray(v, bool) for k, v in masks.items()}
    return chosen, masks, best, mean_r, mean_f


def profile_rl(
    ctx: MethodContext,
    *,
    rule: str = "l1",
    copies: int = 2,
    perturbation: float = 0.1,
    models: Sequence[Pretrained] | None = None,
    learning_rate: float = 0.1,
    init_sigma: float = 0.5,
    compression_weight: float = 1.0,
    save_profile: str | Path | None = None,
    profile=None,
) -> MethodResult:
    """REINFORCE over per-group keep ratios, on several models; see module doc.

    Args:
        copies, perturbation: train on ``net`` plus this many perturbed copies.
        models: other models of the same architecture to train on instead of
            perturbed copies (``net`` is always model 0).
        learning_rate, init_sigma: Adam step size; initial policy std (logits).
        compression_weight: weight of the expected-compression term.
        save_profile, profile: as in :func:`profile_random`.
    """
    if profile is not None:
        return _applied(ctx, profile, rule, "profile_rl")
    t0 = time.perf_counter()
    space, budget, p = ctx.space, ctx.budget, ctx.population
    nets, fits = training_models(ctx, rule, copies, perturbation, models)
    encs = [
        ProfileEncoding(m.model, space, budget, rule=rule, seed=ctx.seed) for m in nets
    ]
    if p < len(nets):
        raise ValueError(f"population {p} is smaller than the {len(nets)} models")
    rl = Reinforce(
        encs,
        fits,
        expected_kept_fn(space, budget),
        optax.adam(learning_rate),
        1.0 - float(budget.target),
        compression_weight,
        p,
    )
    key = jax.random.PRNGKey(ctx.seed)
    (params, _, best_z, best_f), rows = rl.train(key, init_sigma, ctx.generations)
    history = {k: np.asarray(v) for k, v in rows.items()}
    history["best_so_far"] = np.minimum.accumulate(history["best"])
    chosen, masks, best, mean_r, mean_f = choose_profile(rl, params, best_z, best_f)
    extra = {
        "chosen": chosen,
        "policy_mean_profile": dict(
            zip(space.group_names, mean_r.tolist(), strict=True)
        ),
        "policy_mean_fitness": mean_f,
        "best_sample_fitness": float(best_f),
        "models": [m.name for m in nets],
    }
    kw = dict(
        history=history,
        evaluations=p * ctx.generations + 1,
        seconds=time.perf_counter() - t0,
        best_fitness=best,
    )
    return _finish(ctx, masks, "profile_rl", rule, save_profile, kw, extra)


register_method(
    "profile_random",
    profile_random,
    "random/exhaustive search over layer-wise keep-ratio profiles "
    "(Venkatesan et al. 2020)",
    per_group=False,
)
register_method(
    "profile_rl",
    profile_rl,
    "REINFORCE policy over layer-wise keep ratios trained on several models, "
    "transferable profile (Venkatesan et al. 2020)",
    per_group=False,
)
