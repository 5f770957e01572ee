"""The ``openqpm`` command line: the only module that reads argv, prints and picks paths."""

from __future__ import annotations

import argparse
import sys

import openqpm


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openqpm",
        description="Train globally interpretable image classifiers with QPM.",
    )
    parser.add_argument("--version", action="version", version=f"openqpm {openqpm.__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the process exit code."""
    parser = _build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
