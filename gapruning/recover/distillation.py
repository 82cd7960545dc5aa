"""Distillation on probes: the compacted network is trained to match the dense
teacher's temperature-softened logits (Hinton et al., 2015) on data-free probes (as
in DAFL / DeepInversion, Chen et al., 2019; Yin et al., 2020), optionally with a
feature term on the kept channels, after re-estimating BatchNorm statistics on the
probes. Written as the Flax examples train: a frozen :class:`DistillConfig`, a
jitted train step, a loop. Nothing here reads a dataset.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..augment import shift_flip
from ..deadline import Deadline, check_time_budget
from ..models import consumers
from ..probes import batchnorm_nodes, make_probes
from ..progress import format_seconds
from ..zoo import Pretrained
from .adversarial import distill_loss, kl, push
from .batchnorm import recalibrate_batchnorm
from .validate import RecoverError, require_pretrained

# optimizer steps when neither ``steps`` nor ``time_budget`` is given
DEFAULT_STEPS = 500
# steps timed (after one that compiles) to size a time-budgeted distillation
TRIAL_STEPS = 3
# the step at which a time-budgeted run fits its steps again, at the loop's pace
# (measured over the steps since REFIT_AT // 2); never more than first fitted
REFIT_AT = 40
# the probes of ``probes="auto"`` without BatchNorm (with it: ``bn_stats``)
AUTO_DISTILL_PROBES = ("inversion", "gaussian")
# the settings whose ``None`` follows the teacher (:meth:`DistillConfig.for_teacher`)
TEACHER_SETTINGS = ("feature_weight", "recalibrate_bn", "adversarial", "learning_rate")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Settings of :func:`distill`; those left at ``None`` follow the teacher.

    Attributes:
        steps: optimizer steps (``None``: :data:`DEFAULT_STEPS`, or with
            ``time_budget`` as many as fit).
        temperature: softmax temperature of the KL.
        seed: probe and batch-order randomness.
        num_probes, batch_size: probes per epoch, probes per step.
        regenerate: new probes every epoch, seed ``seed + epoch`` (probe kinds
            only; costly for optimised kinds).
        feature_weight: weight of a feature term: mean squared error, relative to
            the teacher's energy, between the student's pruned tensors and the
            teacher's on the kept channels (needs the masks; without: 0).
        recalibrate_bn: re-estimate BatchNorm statistics on the probes first
            (:func:`recalibrate_batchnorm`, shift-corrected with the masks).
        adversarial: each step's batch is pushed by this many signed-gradient
            ascent steps on the teacher-student KL inside the input box
            (:func:`adversarial_probes`), and the student is trained on the batch
            and its pushed copy together. 0: off.
        adversarial_step: ascent step size, as a fraction of the input box width.
        mixup: each step, every probe is mixed with a random other probe of the
            set, ``x + lam (x' - x)`` with ``lam ~ U(0, mixup)`` (mixup, Zhang et
            al., 2018, on probes), before any adversarial push.
        augment: each step, every probe (an image) is shifted by up to 2 pixels
            and mirrored with probability 1/2 (:func:`gapruning.augment.shift_flip`;
            vacated pixels take the input box's low end), before mixup. ``None``:
            on for image inputs ``(height, width, channels)``.
        learning_rate: peak of the default Adam's cosine-decayed schedule.
        time_budget: seconds the whole call may take: the steps are as many as
            fit in the time left once the probes are made, at the pace of a few
            trial steps (:func:`steps_within`), at most ``steps`` when given.
    """

    steps: int | None = None
    temperature: float = 4.0
    seed: int = 0
    num_probes: int = 512
    batch_size: int = 128
    regenerate: bool = False
    feature_weight: float | None = None
    recalibrate_bn: bool | None = None
    adversarial: int | None = None
    adversarial_step: float = 0.02
    mixup: float = 0.5
    augment: bool | None = None
    learning_rate: float | None = None
    time_budget: float | None = None

    @classmethod
    def for_teacher(cls, teacher: Pretrained, **settings) -> DistillConfig:
        """:data:`BATCHNORM_PRESET` for a teacher with BatchNorm, else
        :data:`PLAIN_PRESET`, with ``settings`` replaced."""
        preset = BATCHNORM_PRESET if batchnorm_nodes(teacher) else PLAIN_PRESET
        return dataclasses.replace(preset, **settings)

    def resolved(self, teacher: Pretrained, masks: Mapping | None) -> DistillConfig:
        """This config with every ``None`` setting decided for ``teacher``: the
        preset's, the feature term off without ``masks``, augmentation on for
        image inputs."""
        preset = DistillConfig.for_teacher(teacher)
        fill = {k: getattr(preset, k) for k in TEACHER_SETTINGS}
        if masks is None:
            fill["feature_weight"] = 0.0
        fill = {k: v for k, v in fill.items() if getattr(self, k) is None}
        image = len(teacher.model.input_shape) == 3
        fill["augment"] = image if self.augment is None else bool(self.augment)
        if self.steps is None and self.time_budget is None:
            fill["steps"] = DEFAULT_STEPS
        return dataclasses.replace(self, **fill)


# Without BatchNorm: the adversarial push, mixup and BN re-estimation, Adam from
# 1e-3. With it: the feature term (with masks) and mixup, no push, the statistics
# as trained, Adam from 3e-4 (a plain KL overfits a small ``bn_stats`` probe set,
# and the push and re-estimation hurt there). See docs/recovery-notes.md.
PLAIN_PRESET = DistillConfig(
    feature_weight=0.0, recalibrate_bn=True, adversarial=3, learning_rate=1e-3
)
BATCHNORM_PRESET = DistillConfig(
    feature_weight=1.0, recalibrate_bn=False, adversarial=0, learning_rate=3e-4
)


def check(config: DistillConfig, pruned: Pretrained, teacher: Pretrained, masks):
    """Raises :class:`RecoverError` if ``config`` (resolved) cannot distill
    ``pruned`` from ``teacher``."""
    c = config
    if c.steps is not None and c.steps < 1:
        raise RecoverError(f"steps must be at least 1, got {c.steps}")
    if c.time_budget is not None:
        try:
            check_time_budget(c.time_budget)
        except ValueError as err:
            raise RecoverError(str(err)) from None
    if c.temperature <= 0:
        raise RecoverError(f"temperature must be positive, got {c.temperature}")
    shape = teacher.model.input_shape
    if pruned.model.input_shape != shape:
        raise RecoverError(
            f"student input shape {pruned.model.input_shape} differs from the "
            f"teacher's {shape}"
        )
    if pruned.model.num_outputs != teacher.model.num_outputs:
        raise RecoverError("student and teacher have different numbers of outputs")
    if c.adversarial < 0 or not 0 <= c.mixup <= 1 or not c.learning_rate > 0:
        raise RecoverError(
            "adversarial must be >= 0, mixup in [0, 1] and learning_rate > 0, got "
            f"{c.adversarial}, {c.mixup}, {c.learning_rate}"
        )
    if c.augment and len(shape) != 3:
        raise RecoverError(
            f"augment needs image inputs (height, width, channels), got input "
            f"shape {shape}"
        )
    if c.feature_weight > 0 and masks is None:
        raise RecoverError("feature_weight needs the masks that made the student")
    if masks is not None:
        teacher.space.validate(masks)


def probe_kinds(probes, teacher: Pretrained) -> tuple[str, ...] | None:
    """The probe kinds ``probes`` names (``"auto"`` resolved), ``None`` for an
    array of model inputs."""
    if isinstance(probes, str):
        if probes == "auto":
            return ("bn_stats",) if batchnorm_nodes(teacher) else AUTO_DISTILL_PROBES
        return (probes,)
    if isinstance(probes, tuple | list) and all(isinstance(k, str) for k in probes):
        if not probes:
            raise RecoverError("probes is an empty tuple of kinds")
        return tuple(probes)
    return None


def probe_set(teacher, probes, kinds, config: DistillConfig, epoch: int):
    """The probes of ``epoch``: ``probes`` itself when an array, else
    ``config.num_probes`` of ``kinds`` (split evenly), seed ``seed + epoch``. The
    first set comes from the probe cache (a search's probes of the same kind, size
    and seed are not made twice); regenerated ones are not kept there."""
    if kinds is None:
        return make_probes(teacher, probes)
    share = -(-config.num_probes // len(kinds))
    seed = config.seed + epoch
    parts = [make_probes(teacher, k, share, seed, cache=epoch == 0) for k in kinds]
    return jnp.concatenate(parts)[: config.num_probes]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What the train step closes over: graph definitions, optimizer, resolved
    config, feature taps and their kept channels, input box. ``tx`` is the
    user's optimizer, or (``peak`` set) Adam's scaling, whose updates the step
    multiplies by the cosine-decayed learning rate (:func:`cosine_rate`)."""

    student: nnx.GraphDef
    teacher: nnx.GraphDef
    tx: object
    config: DistillConfig
    taps: tuple[str, ...]
    keep: dict
    box: tuple[float, float]
    peak: float | None = None


def cosine_rate(peak: float, step, total) -> jax.Array:
    """``optax.cosine_decay_schedule(peak, total)(step)`` with ``total`` a traced
    value, so one compiled train step serves any number of steps."""
    step = jnp.minimum(step, total)
    return peak * (0.5 * (1 + jnp.cos(jnp.pi * step / total)))


def feature_taps(teacher: Pretrained, masks, weight: float):
    """``(taps, {tap: kept channels})`` of the feature term (none at weight 0)."""
    if not weight > 0:
        return (), {}
    cons = consumers(teacher.model)
    keep = {
        c.tensor: np.flatnonzero(np.asarray(c.channel_mask(masks)).astype(bool))
        for c in cons
    }
    return tuple(dict.fromkeys(c.tensor for c in cons)), keep


def loss_fn(ctx: StepContext, params, rest, t_state, xb):
    """KL to the teacher's logits on ``xb``, plus the weighted feature term."""
    taps = ctx.taps

    def forward(model, xb):
        return model(xb, taps=taps) if taps else (model(xb), {})

    t_out, t_taps = forward(nnx.merge(ctx.teacher, t_state), xb)
    s_out, s_taps = forward(nnx.merge(ctx.student, params, rest), xb)
    loss = kl(jax.lax.stop_gradient(t_out), s_out, ctx.config.temperature)
    if taps:
        feat = [
            jnp.mean((s_taps[t] - t_taps[t][..., ctx.keep[t]]) ** 2)
            / (jnp.mean(t_taps[t] ** 2) + 1e-8)
            for t in taps
        ]
        loss = loss + ctx.config.feature_weight * sum(feat) / len(feat)
    return loss


def probe_batch(ctx: StepContext, params, rest, t_state, x, idx, key):
    """The step's probes: a batch of the set, augmented, mixed up and pushed."""
    c, (lo, hi) = ctx.config, ctx.box
    xb = x[idx]
    if c.augment:
        xb = shift_flip(jax.random.fold_in(key, 1), xb, fill=lo)
    if c.mixup > 0:
        k1, k2 = jax.random.split(key)
        lam = c.mixup * jax.random.uniform(k1, (len(idx),) + (1,) * (x.ndim - 1))
        other = x[jax.random.randint(k2, (len(idx),), 0, len(x))]
        xb = xb + lam * (other - xb)
    if c.adversarial > 0:
        pushed = push(
            lambda z: nnx.merge(ctx.student, params, rest)(z),
            lambda z: nnx.merge(ctx.teacher, t_state)(z),
            xb,
            c.adversarial,
            c.adversarial_step * (hi - lo),
            (lo, hi),
            c.temperature,
        )
        xb = jnp.concatenate([xb, pushed])
    return xb


def make_train_step(ctx: StepContext):
    """The jitted step ``(params, opt_state, rest, t_state, x, idx, key, step,
    total) -> (params, opt_state, loss)``: update number ``step`` of ``total``."""
    import optax

    @jax.jit
    def train_step(params, opt_state, rest, t_state, x, idx, key, step, total):
        xb = probe_batch(ctx, params, rest, t_state, x, idx, key)
        loss, grads = jax.value_and_grad(functools.partial(loss_fn, ctx))(
            params, rest, t_state, xb
        )
        updates, opt_state = ctx.tx.update(grads, opt_state, params)
        if ctx.peak is not None:
            rate = -cosine_rate(ctx.peak, step, total)
            updates = jax.tree.map(lambda u: rate.astype(u.dtype) * u, updates)
        return optax.apply_updates(params, updates), opt_state, loss

    return train_step


def train(
    ctx: StepContext,
    step,
    state,
    x,
    new_probes,
    progress: bool,
    name: str,
    clock: Deadline | None = None,
):
    """Runs ``config.steps`` of the train ``step`` from ``state = (params, rest,
    t_state)``: batches in a new order every epoch, new probes every epoch from
    ``new_probes(epoch)`` when it is not ``None``. Under a time budget
    (``clock``) the number of steps is fitted once more at step
    :data:`REFIT_AT`, at the loop's own pace. Returns the trained params, the
    last probe set and the steps run."""
    from ..progress import progress_bar

    c = ctx.config
    params, rest, t_state = state
    opt_state = ctx.tx.init(params)
    per_epoch = max(1, len(x) // c.batch_size)
    key = jax.random.key(c.seed)
    mix = jax.random.fold_in(key, 2**31 - 1)  # mixup randomness, apart from orders
    total, i, refit = c.steps, 0, Refit(clock)
    with progress_bar(progress) as bar:
        task = bar.add_task(f"distill {name}", total=total)
        timer = StepTimer(total)
        while i < total:
            epoch, b = divmod(i, per_epoch)
            if b == 0:
                if epoch > 0 and new_probes is not None:
                    x = new_probes(epoch)
                order = jax.random.permutation(jax.random.fold_in(key, epoch), len(x))
            idx = order[b * c.batch_size : (b + 1) * c.batch_size]
            step_key = jax.random.fold_in(mix, i)
            params, opt_state, loss = step(
                params, opt_state, rest, t_state, x, idx, step_key, i, total
            )
            i += 1
            total = refit.total(i, total, loss)
            if progress:
                text = f"distill  KL {float(loss):.4g}"
                bar.update(task, total=total, completed=i, description=text)
                estimate = timer.estimate(i - 1)
                if estimate:
                    bar.console.print(estimate)
    return params, x, total


class Refit:
    """Under a time budget (``clock``), the steps of a run fitted once more at
    step :data:`REFIT_AT` at the loop's own pace, timed over the steps since
    ``REFIT_AT // 2``; never more than first fitted. Without a clock: unchanged."""

    def __init__(self, clock: Deadline | None):
        self.clock = clock
        self.mark = None

    def total(self, i: int, total: int, loss) -> int:
        """The run's steps once ``i`` steps have run (``loss``: the last step's)."""
        if self.clock is None or i not in (REFIT_AT // 2, REFIT_AT):
            return total
        jax.block_until_ready(loss)
        now = time.perf_counter()
        if i == REFIT_AT // 2:
            self.mark = now
            return total
        pace = (now - self.mark) / (REFIT_AT - REFIT_AT // 2)
        return max(i, min(total, int(0.97 * self.clock.remaining() / pace) + i))


class StepTimer:
    """The time a loop of ``steps`` steps will take, from its first steps."""

    def __init__(self, steps: int):
        self.steps = steps
        self.start = time.perf_counter()
        self.warm = None

    def estimate(self, i: int) -> str | None:
        """After step ``i`` (0-based): at step 4, a line with the expected total
        (the first two steps may compile; the next two give the pace), else
        ``None``."""
        now = time.perf_counter()
        if i == 1:
            self.warm = now
        if i != 3 or self.steps < 5:
            return None
        total = now - self.start + (now - self.warm) / 2 * (self.steps - 4)
        return f"distill: {self.steps} steps, about {format_seconds(total)} in all"


def distill(
    pruned: Pretrained,
    teacher: Pretrained,
    probes="auto",
    *,
    masks: Mapping | None = None,
    optimizer=None,
    progress: bool = False,
    config: DistillConfig | None = None,
    **settings,
) -> Pretrained:
    """Trains the compacted ``pruned`` network to match the dense ``teacher``'s
    logits on synthetic probes. Never reads a dataset.

    Each step is one jitted Adam (or ``optimizer``) update on a batch of probes
    refreshed inside the step (augmented, mixed up, pushed towards disagreement:
    see :class:`DistillConfig`). BatchNorm layers are in inference mode. Settings
    left at ``None`` follow the teacher (:meth:`DistillConfig.for_teacher`). A
    RuntimeWarning says when training ends with a KL more than 1% above the one it
    started with, both on the probes augmented as in training
    (:func:`check_views`).

    Args:
        pruned: the compacted network (the student); not modified.
        teacher: the dense network.
        probes: a probe kind, a tuple of kinds (a mixture, ``num_probes`` split
            evenly), or an array of model inputs (then never regenerated).
            ``"auto"``: ``bn_stats`` with BatchNorm, else ``("inversion",
            "gaussian")``.
        masks: the masks that made ``pruned`` from ``teacher`` (group -> kept
            units); needed by the feature term and the shift-corrected BN
            re-estimation.
        optimizer: an ``optax`` transformation (default Adam, ``learning_rate``
            cosine-decayed to 0 over ``steps``).
        progress: draw a progress bar.
        config: a :class:`DistillConfig` (default ``DistillConfig()``).
        **settings: fields of :class:`DistillConfig`, replacing ``config``'s.

    Returns:
        A new :class:`Pretrained` with the trained weights; its card records the
        distillation settings and the KL before/after on the check views.
    """
    import optax

    pruned, teacher = require_pretrained(pruned), require_pretrained(teacher)
    c = dataclasses.replace(config or DistillConfig(), **settings)
    c = c.resolved(teacher, masks)
    check(c, pruned, teacher, masks)
    clock = None if c.time_budget is None else Deadline(c.time_budget)
    kinds = probe_kinds(probes, teacher)
    student = Pretrained(nnx.clone(pruned.model), dict(pruned.card))
    x = probe_set(teacher, probes, kinds, c, 0)
    c = dataclasses.replace(c, batch_size=min(c.batch_size, len(x)))
    if c.recalibrate_bn:
        recalibrate_batchnorm(student, x, teacher, masks)
    taps, keep = feature_taps(teacher, masks, c.feature_weight)
    graphdef, params, rest = nnx.split(student.model, nnx.Param, ...)
    t_graph, t_state = nnx.split(teacher.model)
    tx = optax.scale_by_adam() if optimizer is None else optimizer
    peak = c.learning_rate if optimizer is None else None
    ctx = StepContext(graphdef, t_graph, tx, c, taps, keep, teacher.input_box, peak)
    step = make_train_step(ctx)
    state = (params, rest, t_state)
    if clock is not None:
        c = dataclasses.replace(c, steps=steps_within(ctx, step, state, x, clock))
        ctx = dataclasses.replace(ctx, config=c)
    views = check_views(ctx, t_state, x)
    before = distill_loss(student, teacher, views, c.temperature)
    new_probes = None
    if c.regenerate and kinds is not None:
        new_probes = functools.partial(probe_set, teacher, probes, kinds, c)
    params, x, steps = train(
        ctx, step, state, x, new_probes, progress, pruned.name, clock
    )
    c = dataclasses.replace(c, steps=steps)
    student.model = nnx.merge(graphdef, params, rest)
    student.card = distill_card(student, teacher, c, kinds, views, before, optimizer)
    return student


def steps_within(ctx: StepContext, step, state, x, clock: Deadline) -> int:
    """How many calls of the train ``step`` fit in the time left on ``clock``
    (at most ``ctx.config.steps`` when set): the first trial call compiles, the
    next :data:`TRIAL_STEPS` give the pace; the trial's updates are dropped."""
    params, rest, t_state = state
    opt_state = ctx.tx.init(params)
    idx, key = jnp.arange(ctx.config.batch_size), jax.random.key(ctx.config.seed)
    seconds = []
    for _ in range(1 + TRIAL_STEPS):
        start = time.perf_counter()
        out = step(params, opt_state, rest, t_state, x, idx, key, 0, DEFAULT_STEPS)
        jax.block_until_ready(out)
        seconds.append(time.perf_counter() - start)
    pace = float(np.median(seconds[1:]))
    fit = int(0.95 * clock.remaining() / pace)
    if fit < 1:
        raise RecoverError(
            f"a time budget of {clock.seconds:.3g} s fits no distillation step "
            f"(compiling took {seconds[0]:.1f} s, a step takes {pace:.3f} s)"
        )
    cap = ctx.config.steps
    return fit if cap is None else min(fit, cap)


def check_views(ctx: StepContext, t_state, x) -> jax.Array:
    """The first probes as training sees them (shifted and flipped, mixed up; no
    push), drawn with a key no step uses: where the KL before and after is
    measured. The clean probes can be the very inputs a repair was fitted on, so
    their KL would rise under any training that generalises."""
    plain = dataclasses.replace(
        ctx, config=dataclasses.replace(ctx.config, adversarial=0)
    )
    key = jax.random.fold_in(jax.random.key(ctx.config.seed), 2**31 - 2)
    return probe_batch(plain, None, None, t_state, x, jnp.arange(len(x)), key)


def distill_card(student, teacher, c: DistillConfig, kinds, views, before, optimizer):
    """The student's card with ``"distill"``: the settings and the KL before and
    after on the check views (:func:`check_views`); warns when training raised
    that KL."""
    after = distill_loss(student, teacher, views, c.temperature)
    card = dict(student.card)
    card["distill"] = {
        "steps": int(c.steps),
        "temperature": float(c.temperature),
        "probes": "+".join(kinds) if kinds else "array",
        "num_probes": int(len(views)),
        "feature_weight": float(c.feature_weight),
        "adversarial": int(c.adversarial),
        "adversarial_step": float(c.adversarial_step),
        "mixup": float(c.mixup),
        "augment": c.augment,
        "recalibrate_bn": bool(c.recalibrate_bn),
        "learning_rate": None if optimizer is not None else float(c.learning_rate),
        "kl_before": before,
        "kl_after": after,
    }
    if c.time_budget is not None:
        card["distill"]["time_budget"] = float(c.time_budget)
    if not after <= 1.01 * before + 1e-4:  # beyond rounding: the training hurt
        warnings.warn(
            f"distillation raised the KL on the probes (augmented as in training) "
            f"from {before:.4g} to "
            f"{after:.4g}; try a lower learning_rate or fewer adversarial steps",
            RuntimeWarning,
            stacklevel=3,
        )
    return card
