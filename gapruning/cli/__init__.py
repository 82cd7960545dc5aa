"""The ``gapruning`` command: ``train``, ``eval``, ``list``, ``convert``, ``bench``.

Errors the user can fix (bad names, missing files, bad values) print one line and
exit with status 2; ``--debug`` shows the full traceback instead. Each subcommand
lives in its own module with ``add_parser(subparsers)`` and ``run(args)``.
"""

from __future__ import annotations

import argparse
import sys

from . import bench, convert, evaluate, listing, prune, show, train
from .common import Parser, UsageError

__all__ = ["UsageError", "build_parser", "main"]

SUBCOMMANDS = (train, evaluate, prune, show, bench, listing, convert)
"""The subcommand modules, in the order ``--help`` lists them."""


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``gapruning`` command and all its subcommands."""
    p = Parser(prog="gapruning", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Runs the command line ``argv`` (default: ``sys.argv[1:]``); the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.func(args)
    except (
        UsageError,
        FileNotFoundError,
        FileExistsError,
        KeyError,
        ValueError,
        RuntimeError,
        OSError,
    ) as err:
        if args.debug:
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"gapruning {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
