"""BatchNorm statistics of a pruned network re-estimated on probes, optionally
shift-corrected against the dense teacher so only the change the pruning causes is
applied, not the probes' own mismatch with the training data."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..probes import batchnorm_nodes, bn_batch_stats
from ..zoo import Pretrained


def teacher_reference(teacher: Pretrained, probes, nodes, masks: Mapping) -> dict:
    """``{node: (probe mean, probe var, running mean, running var)}`` of the
    teacher's BatchNorms on the kept channels."""
    space = teacher.space
    reference = {}
    t_stats = bn_batch_stats(teacher, probes)
    for n in nodes:
        group = space.group_of(n.name)
        keep = (
            np.arange(n.shape[-1])
            if group is None
            else np.flatnonzero(np.asarray(masks[group]).astype(bool))
        )
        layer = teacher.model.layers[n.name]
        mean, var = t_stats[n.name]
        reference[n.name] = (
            mean[keep],
            var[keep],
            layer.mean[...][keep],
            layer.var[...][keep],
        )
    return reference


def recalibrate_batchnorm(
    student: Pretrained,
    probes: jax.Array,
    teacher: Pretrained | None = None,
    masks: Mapping | None = None,
) -> Pretrained:
    """Re-estimates every BatchNorm's running statistics on ``probes``.

    Layer by layer in graph order (each layer's statistics after the earlier ones
    are updated). With the ``teacher`` and the ``masks`` that made the student,
    the estimate is shift-corrected: ``mean = running + (student - teacher)`` and
    ``var = running * student / teacher`` on the probes. Modifies ``student`` in
    place and returns it."""
    net = student.model
    nodes = batchnorm_nodes(net)
    if not nodes:
        return student
    reference = None
    if teacher is not None and masks is not None:
        reference = teacher_reference(teacher, probes, nodes, masks)
    graphdef, _ = nnx.split(net)
    stats = jax.jit(lambda s, x: bn_batch_stats(nnx.merge(graphdef, s), x))
    for n in nodes:
        mean, var = stats(nnx.state(net), probes)[n.name]
        if reference is not None:
            t_mean, t_var, r_mean, r_var = reference[n.name]
            mean = r_mean + (mean - t_mean)
            var = r_var * var / jnp.maximum(t_var, 1e-8)
        net.layers[n.name].mean[...] = mean
        net.layers[n.name].var[...] = var
    return student
