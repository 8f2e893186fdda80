"""The ``ktlsd`` command line: one sub-command family per module, imported only when used.

:data:`COMMANDS` names every sub-command, the module that implements it and its one-line
summary. The module of the chosen sub-command provides ``register(subparsers)``, which adds
its sub-commands and sets ``func`` (taking the parsed namespace, returning an exit code) as
the parser default; the other sub-commands appear in the help from :data:`COMMANDS` alone.
So ``ktlsd --help`` and ``ktlsd --version`` import no command module, and ``ktlsd run``
imports neither the NVMe toolkit, nor demo/tools/doctor, nor the TLS engine (the agent
loads it with its first handshake).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from ktlsd import __version__


@dataclass(frozen=True)
class Command:
    name: str
    module: str
    summary: str


COMMANDS: tuple[Command, ...] = (
    Command("run", "ktlsd.daemon",
            "run the handshake agent (kernel upcalls and the user-space service)"),
    Command("demo", "ktlsd.commands.demo",
            "run the agent with two built-in consumers (x509 and PSK) on loopback"),
    Command("connect", "ktlsd.commands.tools",
            "TLS 1.3 client: handshake, then relay stdin/stdout"),
    Command("listen", "ktlsd.commands.tools",
            "TLS 1.3 server: accept, handshake, relay stdin/stdout"),
    Command("nvme", "ktlsd.nvme.cli", "NVMe/TCP TLS PSK and DH-HMAC-CHAP key tools"),
    Command("doctor", "ktlsd.commands.doctor",
            "report what this machine supports (kTLS, handshake family, keyrings, libssl)"),
    Command("status", "ktlsd.commands.status",
            "show the running agent's handshakes, failures, workers and limits (root only)"),
)
"""Every sub-command, in help order; ``summary`` is what its module's parser says
(tests/test_cli.py holds them equal)."""


def chosen_command(argv: Sequence[str]) -> str | None:
    """The sub-command ``argv`` names: its first word that is not an option (the top-level
    parser's options take no values), or None."""
    for arg in argv:
        if arg == "--":
            return None
        if not arg.startswith("-"):
            return arg
    return None


def terminal_columns() -> int:
    """What ``shutil.get_terminal_size().columns`` answers, without importing shutil (and with
    it bz2/lzma): ``$COLUMNS``, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, its width found without the ``import shutil`` argparse does each
    time it makes one (``add_argument`` makes one per argument)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:  # fmt: skip
        if width is None:
            width = terminal_columns() - 2  # as argparse does
        super().__init__(prog, indent_increment, max_help_position, width)


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that formats with :class:`HelpFormatter` where argparse's
    default formatter was asked for; ``add_subparsers`` makes the sub-command parsers of this
    class too (it uses the parent's type)."""

    def _get_formatter(self) -> argparse.HelpFormatter:
        if self.formatter_class is argparse.HelpFormatter:
            return HelpFormatter(prog=self.prog)
        return super()._get_formatter()


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: only the chosen sub-command's module is imported (every
    module when ``argv`` is None, for tools that want the full parser)."""
    parser = ArgumentParser(
        prog="ktlsd",
        description="TLS 1.3 handshake agent for in-kernel TLS consumers and user-space programs.",
    )
    parser.add_argument("--version", action="version", version=f"ktlsd {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = chosen_command(argv) if argv is not None else None
    modules = [c.module for c in COMMANDS if argv is None or c.name == wanted]
    for module in dict.fromkeys(modules):
        importlib.import_module(module).register(subparsers)
    for command in COMMANDS:  # the others: a name and a summary, nothing imported
        if command.name not in subparsers.choices:
            subparsers.add_parser(command.name, help=command.summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(func(args))
    except KeyboardInterrupt:
        print("ktlsd: interrupted", file=sys.stderr)
        return 130
