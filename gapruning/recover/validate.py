"""What recovery accepts: the repair method names and their aliases, the error it
raises when it cannot do what is asked, and the checks shared by its modules."""

from __future__ import annotations

import warnings

from ..zoo import Pretrained

REPAIR_METHODS = ("merge", "lstsq")
# spellings of a repair method accepted by gp.prune, the CLI and :func:`repair`
# -> the method; "cosine" is the old name of "merge"
REPAIR_ALIASES = {"merge": "merge", "cosine": "merge", "lstsq": "lstsq"}
# the name a model card records for each method ("cosine": the name cards have
# always recorded for Neuron Merging, kept so saved cards read the same)
CARD_NAMES = {"merge": "cosine", "lstsq": "lstsq"}
LSTSQ_PRIORS = ("merge", "dense")


class RecoverError(ValueError):
    """Recovery cannot be done as asked (unknown method, missing probes...)."""


def deprecated_cosine(name: str, what: str) -> str:
    """``name``, with ``"cosine"`` replaced by ``"merge"`` and a DeprecationWarning."""
    if name != "cosine":
        return name
    warnings.warn(
        f'{what} "cosine" is now called "merge"', DeprecationWarning, stacklevel=3
    )
    return "merge"


def repair_method(method: str) -> str:
    """The repair method ``method`` names (``"merge"`` or ``"lstsq"``)."""
    method = deprecated_cosine(method, "the repair method")
    if method not in REPAIR_METHODS:
        raise RecoverError(
            f"unknown merge method {method!r} for repair; known: "
            f"{', '.join(REPAIR_METHODS)}"
        )
    return method


def lstsq_prior(prior: str) -> str:
    """The ``"lstsq"`` prior ``prior`` names (``"merge"`` or ``"dense"``)."""
    prior = deprecated_cosine(prior, "the lstsq prior")
    if prior not in LSTSQ_PRIORS:
        raise RecoverError(f"prior must be 'merge' or 'dense', got {prior!r}")
    return prior


def require_pretrained(net) -> Pretrained:
    """``net`` if it is a :class:`~gapruning.zoo.Pretrained`, else a TypeError."""
    if not isinstance(net, Pretrained):
        raise TypeError(f"expected a gapruning Pretrained, got {type(net).__name__}")
    return net
