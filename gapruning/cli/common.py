"""What the subcommands share: the usage error, the parser class, value types."""

from __future__ import annotations

import argparse
from pathlib import Path


class UsageError(RuntimeError):
    """A problem with the command line the user can fix."""


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage text is in ``--help``)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _comma_separated(kind: type, what: str):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


floats = _comma_separated(float, "numbers")
"""``"0.1,0.2"`` -> ``(0.1, 0.2)``, an argparse type."""

ints = _comma_separated(int, "integers")
"""``"28,28,1"`` -> ``(28, 28, 1)``, an argparse type."""


def check_new_dir(out: Path, overwrite: bool) -> None:
    """Refuses an ``out`` that holds files unless ``overwrite``."""
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"{out} already exists and is not empty (use --overwrite)")
