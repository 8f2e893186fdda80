"""The ``ktlsd`` command line: one sub-command family per module.

Each module listed in :data:`COMMAND_MODULES` provides ``register(subparsers)``, which adds
its sub-commands and sets ``func`` (taking the parsed namespace, returning an exit code)
as the parser default.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ktlsd import __version__

COMMAND_MODULES: tuple[str, ...] = (
    "ktlsd.daemon",  # run
    "ktlsd.commands.demo",  # demo
    "ktlsd.commands.tools",  # connect, listen
    "ktlsd.nvme.cli",  # nvme gen-tls-key, check-tls-key, gen-dhchap-key
    "ktlsd.commands.doctor",  # doctor
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ktlsd",
        description="TLS 1.3 handshake agent for in-kernel TLS consumers and user-space programs.",
    )
    parser.add_argument("--version", action="version", version=f"ktlsd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args))
    except KeyboardInterrupt:
        print("ktlsd: interrupted", file=sys.stderr)
        return 130
