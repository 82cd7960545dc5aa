"""The teacher-student KL of distillation and disagreement probes that raise it:
the min-max game of Data-Free Adversarial Distillation (Fang et al., 2019) and of
zero-shot KD by adversarial belief matching (Micaelli & Storkey, 2019), with the
generator replaced by a few signed-gradient ascent steps on the probes themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ..zoo import Pretrained
from .validate import require_pretrained


def kl(teacher_logits, student_logits, temperature: float) -> jax.Array:
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over the batch."""
    t = jax.nn.log_softmax(teacher_logits / temperature)
    s = jax.nn.log_softmax(student_logits / temperature)
    return temperature**2 * jnp.mean(jnp.sum(jnp.exp(t) * (t - s), axis=-1))


def push(s_apply, t_apply, x, steps: int, step: float, box, temperature: float):
    """``steps`` signed-gradient ascent steps of ``x`` on the summed
    teacher-student KL, projected onto ``box``; traceable."""
    lo, hi = box

    def total_kl(xa):
        return kl(t_apply(xa), s_apply(xa), temperature) * xa.shape[0]

    def body(_, xa):
        return jnp.clip(xa + step * jnp.sign(jax.grad(total_kl)(xa)), lo, hi)

    return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, body, x))


def adversarial_probes(
    student: Pretrained,
    teacher: Pretrained,
    probes: jax.Array,
    steps: int = 3,
    step_size: float = 0.02,
    temperature: float = 4.0,
) -> jax.Array:
    """Disagreement probes: ``probes`` moved where ``student`` and ``teacher``
    disagree most.

    Each of ``steps`` signed-gradient (FGSM/PGD-style) ascent steps of size
    ``step_size`` x the input box width increases the summed ``KL(teacher ||
    student)`` at ``temperature``; the result is clipped to the input box (cheap,
    and it stays near the probe distribution). ``distill`` with ``adversarial >
    0`` does this inside its jitted step."""
    student, teacher = require_pretrained(student), require_pretrained(teacher)
    lo, hi = teacher.input_box
    x = jnp.asarray(probes, jnp.float32)
    return push(
        student.model,
        teacher.model,
        x,
        int(steps),
        float(step_size) * (hi - lo),
        (lo, hi),
        temperature,
    )


def distill_loss(
    student: Pretrained,
    teacher: Pretrained,
    probes: jax.Array,
    temperature: float = 4.0,
) -> float:
    """The distillation KL of ``student`` to ``teacher`` on ``probes``."""
    return float(kl(teacher.model(probes), student.model(probes), temperature))
