"""The ``sharpkit`` command.

Exit codes: 0 success; 1 the measurement or experiment failed; 2 bad usage or
bad input (a one-line reason on stderr). Sub-commands may document more.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from sharpkit import __version__

__all__ = ["main"]

#: sub-command modules under sharpkit._commands, in help order
_COMMANDS = ("info", "experiment", "measure")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sharpkit",
        description="Sharpness-Aware Minimization, measured.",
    )
    parser.add_argument("--version", action="version", version=f"sharpkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"sharpkit._commands.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
