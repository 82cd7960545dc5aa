"""A wall-clock budget for one pruning run (``gp.prune(time_budget=...)``).

The search gets :data:`SEARCH_SHARE` of the budget at most: it stops early (between
two scans) when the next scan would pass its share. Distillation then trains for as
many steps as fit in the time left (:func:`gapruning.recover.distill` with
``time_budget=``). A run bounded this way depends on the machine's speed; its report
and model card record the generations and steps it ran, so it can be repeated
exactly with those sizes.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time

# the largest part of the budget the search may spend (the rest: distillation)
SEARCH_SHARE = 0.5
# distillation is skipped when less than this part of the budget is left
MIN_DISTILL_SHARE = 0.1

_UNITS = {"": 1, "s": 1, "m": 60, "min": 60, "h": 3600}


class TimeBudgetError(ValueError):
    """A time budget too small for the work it must cover."""


@dataclasses.dataclass(frozen=True)
class Deadline:
    """A budget of ``seconds`` of wall-clock time that began at ``start`` (a
    ``time.perf_counter()`` value)."""

    seconds: float
    start: float = dataclasses.field(default_factory=time.perf_counter)

    def at(self, share: float = 1.0) -> float:
        """The ``time.perf_counter()`` value when ``share`` of the budget is spent."""
        return self.start + share * self.seconds

    def remaining(self) -> float:
        """Seconds left (negative once the budget is spent)."""
        return self.at() - time.perf_counter()


def check_time_budget(seconds) -> float:
    """``seconds`` as a positive finite float, else a :class:`TimeBudgetError`."""
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise TimeBudgetError(
            f"time_budget must be a positive number of seconds, got {seconds!r}"
        )
    return value


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a number with an optional unit, ``s``, ``m``/``min``
    or ``h`` (``"90"``, ``"90s"``, ``"30m"``, ``"1.5h"``)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|m|min|h)?\s*", str(text))
    if match is None:
        raise TimeBudgetError(
            f"cannot read the duration {text!r}: use seconds or a number with "
            "s, m or h (e.g. 900, 30m, 1.5h)"
        )
    return check_time_budget(float(match[1]) * _UNITS[match[2] or ""])


def stop_before_scan(deadline: float | None, done: int, last_scan: float) -> bool:
    """Whether a search should stop before its next scan: ``deadline`` (a
    ``time.perf_counter()`` value) has passed, or the next scan, lasting as long
    as the last one (``last_scan`` seconds), would pass it. A deadline that
    passed before the first generation (``done == 0``) is a
    :class:`TimeBudgetError`."""
    if deadline is None:
        return False
    now = time.perf_counter()
    if now + last_scan <= deadline:
        return False
    if done == 0:
        over = now - deadline
        raise TimeBudgetError(
            f"the time budget for the search was spent before its first generation "
            f"({over:.1f} s over, in making the probes and compiling); give a "
            "larger time budget or fewer probes (num_probes=)"
        )
    return True
