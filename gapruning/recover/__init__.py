"""Data-free recovery of a pruned network: repair and distillation.

Without the training set a pruned network cannot be fine-tuned on data, but it can
be recovered from the model alone, in two ways:

* **repair** (:func:`repair`, :class:`Repair`): before compaction, what the removed
  units contributed is folded into the *consumer* layers (the Dense/Conv layers
  that read the pruned tensor); the network keeps its dense shape and
  ``gp.compact(repaired, masks)`` then removes the units. Two methods:
  ``"merge"``, Neuron Merging (Kim et al., 2020; :mod:`.merging`), and
  ``"lstsq"``, least squares on probes (ThiNet's layer-wise reconstruction made
  data-free; :mod:`.lstsq`, :mod:`.sequential`). Both have a traceable form in the
  masks, so ``gp.prune(..., repair="merge")`` scores every individual after its
  repair (:mod:`.in_search`).
* **distill** (:func:`distill`, :mod:`.distillation`): the compacted network is
  trained to match the dense teacher's softened logits on synthetic probes.

Deprecated names, kept working: :func:`merge` (use :func:`repair`), the method and
prior name ``"cosine"`` (use ``"merge"``), ``DISTILL_DEFAULTS`` (use
:class:`DistillConfig` presets), and ``Consumer``/``consumers``/``group_consumers``
(now in :mod:`gapruning.models`).
"""

from __future__ import annotations

import warnings

from ..models import Consumer, consumers, group_consumers
from . import (
    adversarial,
    batchnorm,
    distillation,
    in_search,
    lstsq,
    merging,
    repairing,
    sequential,
    validate,
)
from .adversarial import adversarial_probes, distill_loss
from .batchnorm import recalibrate_batchnorm
from .distillation import (
    AUTO_DISTILL_PROBES,
    BATCHNORM_PRESET,
    PLAIN_PRESET,
    TEACHER_SETTINGS,
    DistillConfig,
    distill,
)
from .in_search import Repair, repaired_fitness
from .lstsq import gram_matrices, lstsq_update
from .merging import merge_matrix
from .repairing import merge, repair
from .sequential import sequential_lstsq
from .validate import REPAIR_ALIASES, REPAIR_METHODS, RecoverError


def __getattr__(name: str):
    if name == "DISTILL_DEFAULTS":  # deprecated: {has BatchNorm: settings}
        warnings.warn(
            "DISTILL_DEFAULTS is deprecated; use DistillConfig.for_teacher, "
            "PLAIN_PRESET or BATCHNORM_PRESET",
            DeprecationWarning,
            stacklevel=2,
        )
        return {
            bn: {k: getattr(preset, k) for k in TEACHER_SETTINGS}
            for bn, preset in ((False, PLAIN_PRESET), (True, BATCHNORM_PRESET))
        }
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AUTO_DISTILL_PROBES",
    "BATCHNORM_PRESET",
    "Consumer",
    "DistillConfig",
    "PLAIN_PRESET",
    "REPAIR_ALIASES",
    "REPAIR_METHODS",
    "RecoverError",
    "Repair",
    "adversarial",
    "adversarial_probes",
    "batchnorm",
    "consumers",
    "distill",
    "distill_loss",
    "distillation",
    "gram_matrices",
    "group_consumers",
    "in_search",
    "lstsq",
    "lstsq_update",
    "merge",
    "merge_matrix",
    "merging",
    "recalibrate_batchnorm",
    "repair",
    "repaired_fitness",
    "repairing",
    "sequential",
    "sequential_lstsq",
    "validate",
]
