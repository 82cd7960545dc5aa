"""``gapruning show``: print the report of a run directory."""

from __future__ import annotations

from pathlib import Path

from .common import UsageError


def add_parser(sub) -> None:
    sh = sub.add_parser("show", help="print the report of a run directory")
    sh.add_argument("run_dir")
    sh.set_defaults(func=run)


def run(args) -> None:
    """Renders ``report.md`` of ``args.run_dir`` in the terminal."""
    from rich.console import Console
    from rich.markdown import Markdown

    report = Path(args.run_dir) / "report.md"
    if not report.is_file():
        raise UsageError(
            f"{args.run_dir} has no report.md: not a gapruning run directory"
        )
    Console().print(Markdown(report.read_text()))
