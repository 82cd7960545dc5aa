"""Data-free fitness metrics and their composition (lower is better).

``METRICS`` maps a name to a :class:`Metric` (one line of description each, for
``gapruning list``); :func:`register_metric` adds one; :func:`compose` builds a
population fitness ``fit(masks_batch) -> (P,)``. One module per metric family:

=================  ===========================================================
fidelity*          dense vs pruned on probes (KL, top-1, logit MSE, features)
robustness         extra FGSM/PGD prediction change on probes (Paoding's goal)
interval*          Paoding's interval-arithmetic impact score, interval width
lipschitz          loss of the product of per-layer spectral norms
wavelet            GWCS-style Haar sub-band channel aggregation
bn_drift           BatchNorm batch-statistics drift on probes
cost*              exact params/FLOPs ratio (multi-objective)
=================  ===========================================================
"""

from . import bn_drift, cost, fidelity, interval, lipschitz, robustness, wavelet
from .base import METRICS, FitnessError, Metric, PrunedApply, register_metric
from .compose import (
    COMBINES,
    DEFAULT_COMBINE,
    DEFAULT_SPEC,
    LOG_FLOOR,
    Fitness,
    compose,
    parse_spec,
)
from .interval import interval_bounds, paoding_entropy
from .wavelet import haar_dwt2


def describe_metrics() -> list[tuple[str, str]]:
    """``(name, one-line description)`` of every registered metric."""
    return [(name, m.description) for name, m in METRICS.items()]


__all__ = [
    "COMBINES",
    "DEFAULT_COMBINE",
    "DEFAULT_SPEC",
    "LOG_FLOOR",
    "METRICS",
    "Fitness",
    "FitnessError",
    "Metric",
    "PrunedApply",
    "bn_drift",
    "compose",
    "cost",
    "describe_metrics",
    "fidelity",
    "haar_dwt2",
    "interval",
    "interval_bounds",
    "lipschitz",
    "paoding_entropy",
    "parse_spec",
    "register_metric",
    "robustness",
    "wavelet",
]
