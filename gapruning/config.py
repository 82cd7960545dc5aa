"""``PruneConfig``: every option of :func:`gapruning.prune` in one object.

``gp.prune(net, strategy, target, ...)`` builds one from its arguments, checks it
before any work starts, and the run's report stores :meth:`PruneConfig.settings`.
A config can also be built once and reused: ``gp.prune(net, config=cfg, seed=1)``.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .deadline import check_time_budget

BUDGETS = ("units", "params", "flops")
ENCODINGS = ("units", "profile")
DTYPES = ("float32", "bfloat16")
REPAIRS = ("merge", "cosine", "lstsq")  # "cosine": the old name of "merge"
# "auto": the default repair where it applies (gapruning.defaults)
RECOVER_STEPS = ("auto", *REPAIRS, "distill")

# old keyword -> new keyword; the old one still works and warns
DEPRECATED_KEYWORDS = {"chunk": "generations_per_scan"}

# gp.prune's positional parameters after ``net``, in order
POSITIONAL = (
    "strategy",
    "target",
    "budget",
    "fitness",
    "generations",
    "population",
    "num_probes",
    "seed",
    "checkpoint_dir",
    "progress",
)


@dataclasses.dataclass(frozen=True)
class PruneConfig:
    """The options of one :func:`gapruning.prune` run.

    Attributes:
        strategy: an engine search strategy (``gp.search.STRATEGIES``,
            ``"evosax:<Name>"``) or a method (``gp.methods.METHODS``).
        target: fraction of ``budget`` to remove, in (0, 1).
        budget: "units", "params" or "flops"; met exactly by decoding.
        fitness: a metric spec for ``gp.fitness.compose`` ("default", or a dict
            of metric weights), or a callable ``masks_batch -> (P,)``, lower better.
        generations, population: search length and width.
        num_probes: how many synthetic probes the fitness (and repair) uses.
            Any of the three left at ``None`` follows the network's cost
            (:func:`gapruning.defaults.default_sizes`).
        seed: the run's seed: same seed and device count, same masks.
        checkpoint_dir: save the search state there (orbax, atomic).
        progress: show a progress bar.
        probes: the probes' kind (``None``: the fitness's choice) or an array of
            unlabeled inputs.
        encoding: "units" (one gene per unit) or "profile" (one ratio per group).
        per_group: with the units budget, remove the same ratio from every group.
        min_keep: units every group keeps at least.
        init: "l1" seeds the initial population around the L1-norm ranking;
            ``None`` starts from unbiased random genomes.
        generations_per_scan: generations per jitted ``lax.scan`` (progress and
            checkpoints happen between scans).
        strategy_options: keyword arguments of the strategy or method.
        checkpoint_every: save every N scans.
        resume: continue from the newest checkpoint in ``checkpoint_dir``.
        devices: devices to shard the population over (default: all local).
        dtype: evaluate the population fitness in this dtype (``"bfloat16"``
            halves activation memory; the result stays float32). ``None``: the
            model's dtype.
        chunk_size: individuals the fitness evaluates at once (``"auto"``:
            bounded by activation memory, ``None``: all).
        repair: score every individual repaired (``"merge"``: Neuron Merging, or
            ``"lstsq"``: least squares; see :mod:`gapruning.recover`) and repair
            the result the same way.
        recover: recovery of the found masks, in order: a repair (``"merge"`` /
            ``"lstsq"``) before compaction, ``"distill"`` after it; ``"auto"``
            (the default) is a least squares repair where it applies
            (:func:`gapruning.defaults.with_default_recovery`), so ``("auto",
            "distill")`` repairs and distills; ``()``: no recovery.
        recover_options: ``{"repair": {...}, "distill": {...}}`` keyword
            arguments of ``gp.recover.repair`` / ``gp.recover.distill``.
        time_budget: seconds of wall-clock time for the whole run
            (:mod:`gapruning.deadline`): the search stops early when it would
            spend more than half, and distillation (the default recovery's, or
            one asked for) trains for the time left, at most the ``steps`` that
            ``recover_options`` gives it.
    """

    strategy: str = "ga"
    target: float = 0.7
    budget: str = "units"
    fitness: str | Mapping[str, float] | Callable = "default"
    generations: int | None = None
    population: int | None = None
    num_probes: int | None = None
    seed: int = 0
    checkpoint_dir: str | Path | None = None
    progress: bool = True
    probes: Any = None
    encoding: str = "units"
    per_group: bool = False
    min_keep: int = 1
    init: str | None = "l1"
    generations_per_scan: int = 10
    strategy_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    checkpoint_every: int = 1
    resume: bool = False
    devices: Any = None
    dtype: str | None = None
    chunk_size: int | str | None = "auto"
    repair: str | None = None
    recover: tuple[str, ...] = ("auto",)
    recover_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(
        default_factory=dict
    )
    time_budget: float | None = None

    def __post_init__(self):
        steps = (self.recover,) if isinstance(self.recover, str) else self.recover
        object.__setattr__(self, "recover", tuple(steps))
        object.__setattr__(self, "target", float(self.target))
        object.__setattr__(self, "strategy_options", dict(self.strategy_options or {}))
        object.__setattr__(self, "recover_options", _recover_options(self))
        if self.time_budget is not None:
            object.__setattr__(self, "time_budget", check_time_budget(self.time_budget))
        self._check()

    def _check(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(
                f"unknown budget {self.budget!r}; known: {', '.join(BUDGETS)}"
            )
        _at_least(self.generations, 1, "generations")
        _at_least(self.population, 2, "population")
        if self.probes is None and not callable(self.fitness):
            _at_least(self.num_probes, 1, "num_probes")
        if self.encoding not in ENCODINGS:
            raise ValueError(
                f"unknown encoding {self.encoding!r}; known: {', '.join(ENCODINGS)}"
            )
        if self.resume and self.checkpoint_dir is None:
            raise ValueError("resume needs a checkpoint_dir")
        _at_least(self.generations_per_scan, 1, "generations_per_scan")
        _at_least(self.checkpoint_every, 1, "checkpoint_every")
        if self.dtype is not None and str(self.dtype) not in DTYPES:
            raise ValueError(
                f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}"
            )
        self._check_recovery()

    def _check_recovery(self) -> None:
        unknown = [s for s in self.recover if s not in RECOVER_STEPS]
        if unknown:
            raise ValueError(
                f"unknown recover step(s) {unknown}; known: {RECOVER_STEPS}"
            )
        if self.repair is not None and self.repair not in REPAIRS:
            raise ValueError(f"unknown repair {self.repair!r}; known: {REPAIRS}")
        if self.repair is not None and callable(self.fitness):
            raise ValueError("repair needs a composed fitness (a spec), not a callable")
        if len({_repair_name(s) for s in self.repair_steps}) > 1:
            steps = sorted(self.repair_steps)
            raise ValueError(f"repair: choose one merge method, got {steps}")

    @property
    def repair_steps(self) -> tuple[str, ...]:
        """Every repair asked for, by ``repair=`` or in ``recover``."""
        named = (self.repair, *self.recover)
        return tuple(s for s in named if s not in (None, "auto", "distill"))

    @property
    def repair_method(self) -> str | None:
        """The repair the result gets ("merge", "lstsq") or ``None``."""
        return _repair_name(self.repair_steps[0]) if self.repair_steps else None

    @property
    def distill(self) -> bool:
        return "distill" in self.recover

    def settings(self) -> dict[str, Any]:
        """The JSON-able options the run's report and model card store."""
        fitness = self.fitness
        out = {
            **{k: getattr(self, k) for k in POSITIONAL[:8]},
            "fitness": fitness
            if isinstance(fitness, str | dict)
            else getattr(fitness, "__name__", "callable"),
            "encoding": self.encoding,
            "per_group": self.per_group,
            "min_keep": self.min_keep,
            "init": self.init,
            "strategy_options": dict(self.strategy_options),
        }
        if self.dtype not in (None, "float32"):
            out["dtype"] = str(self.dtype)
        if self.chunk_size != "auto":
            out["chunk_size"] = self.chunk_size
        if self.repair or self.recover not in ((), ("auto",)):
            out["repair"] = self.repair
            out["recover"] = list(self.recover)
        if self.time_budget is not None:
            out["time_budget"] = self.time_budget
        return out


def _at_least(value: int | None, low: int, name: str) -> None:
    """Refuses ``value < low``; ``None`` (decided later) passes."""
    if value is not None and value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")


def _repair_name(name: str) -> str:
    return "merge" if name == "cosine" else name


def _recover_options(config: PruneConfig) -> dict[str, dict[str, Any]]:
    """``recover_options`` as plain dicts, the old key "merge" read as "repair"."""
    options = {k: dict(v) for k, v in (config.recover_options or {}).items()}
    if "merge" in options:
        warnings.warn(
            'recover_options key "merge" is deprecated; use "repair"',
            DeprecationWarning,
            stacklevel=5,
        )
        options["repair"] = {**options.pop("merge"), **options.get("repair", {})}
    unknown = sorted(set(options) - {"repair", "distill"})
    if unknown:
        raise ValueError(
            f"unknown recover_options key(s) {unknown}; known: 'repair', 'distill'"
        )
    return options


def make_config(
    base: PruneConfig | None, args: tuple, options: Mapping[str, Any]
) -> PruneConfig:
    """``base`` (or the defaults) with gp.prune's positional ``args`` and keyword
    ``options`` applied; deprecated keywords warn, unknown ones are refused."""
    if len(args) > len(POSITIONAL):
        raise TypeError(
            f"prune takes at most {len(POSITIONAL) + 1} positional arguments "
            f"(net, {', '.join(POSITIONAL)}), got {len(args) + 1}"
        )
    named = dict(zip(POSITIONAL, args, strict=False))
    for key, value in options.items():
        new = DEPRECATED_KEYWORDS.get(key, key)
        if new != key:
            warnings.warn(
                f"prune(..., {key}=) is deprecated; use {new}=",
                DeprecationWarning,
                stacklevel=3,
            )
        if new in named:
            raise TypeError(f"prune got {new!r} twice")
        named[new] = value
    fields = {f.name for f in dataclasses.fields(PruneConfig)}
    unknown = sorted(set(named) - fields)
    if unknown:
        known = ", ".join(sorted(fields))
        raise TypeError(f"prune got unknown keyword(s) {unknown}; known: {known}")
    try:
        return dataclasses.replace(base or PruneConfig(), **named)
    except ValueError as error:  # name the keyword as the caller wrote it
        message = str(error)
        for old, new in DEPRECATED_KEYWORDS.items():
            if old in options and message.startswith(new):
                raise ValueError(old + message[len(new) :]) from None
        raise
