"""``ktlsd status``: ask the running agent how it is doing (root only).

Connects to the handshake service socket (``--socket``, else ``$KTLSD_SERVICE_PATH``, else
the default), or, when nothing listens there, to the root-only status socket an agent
without the service opens (:data:`ktlsd.status.DEFAULT_STATUS_PATH`, or
``$RUNTIME_DIRECTORY/status.sock``); sends one STATUS request (:mod:`ktlsd.upcall.wire`,
"STATUS") and prints the report: as text, ``--json``, or ``--openmetrics`` (the OpenMetrics
text format, for a node exporter's textfile collector or a scrape). ``--output FILE`` writes
it atomically instead (a temporary file in the same directory, flushed, then renamed over
FILE, mode 0644), so a collector never reads half a file.

Exit status: 0 with a report; 1 when the agent refused (not root) or is not reachable, with
one line on stderr saying why.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import socket
import sys
import tempfile

SUMMARY = "show the running agent's handshakes, failures, workers and limits (root only)"
ANSWER_TIMEOUT = 10.0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "status", help=SUMMARY,
        description="Ask the running ktlsd agent for its status over its service socket (or "
        "its root-only status socket when the service is disabled): requests in flight and "
        "pending per source, completed and failed requests by cause, kept sessions, workers, "
        "uptime, the effective limits and the configuration file. Root only.",
    )
    form = p.add_mutually_exclusive_group()
    form.add_argument("--openmetrics", action="store_true",
                      help="print the OpenMetrics text format (node exporter textfile "
                      "collector, scrapes)")
    form.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--output", metavar="FILE",
                   help="write to FILE atomically (temporary file + rename) instead of stdout")
    p.add_argument("--socket", metavar="PATH",
                   help="the agent's service or status socket (default: $KTLSD_SERVICE_PATH, "
                   "the service's default path, then the status socket)")
    p.set_defaults(func=status_command)


def candidate_paths(explicit: str | None) -> list[str]:
    """Where to ask, in order."""
    if explicit:
        return [explicit]
    from ktlsd.daemon import status_socket_path
    from ktlsd.settings import DEFAULT_SERVICE_PATH

    service = os.environ.get("KTLSD_SERVICE_PATH") or DEFAULT_SERVICE_PATH
    return list(dict.fromkeys([service, status_socket_path()]))


class StatusError(Exception):
    """``str()`` is the one line to print."""


def ask(path: str, timeout: float = ANSWER_TIMEOUT) -> bytes:
    """One STATUS exchange with the agent at ``path``: the report's JSON bytes, or
    :class:`StatusError` (refused, unreachable, malformed) / OSError from connect."""
    from ktlsd.upcall.wire import (
        MAX_MESSAGE_SIZE,
        ServiceFormatError,
        decode_status_answer,
        encode_status_request,
    )

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.send(encode_status_request(seq=1))
        try:
            data = conn.recv(MAX_MESSAGE_SIZE)
        except TimeoutError:
            raise StatusError(f"no answer from {path} within {timeout:g} s") from None
    if not data:
        raise StatusError(f"{path} closed the connection without an answer "
                          "(an older ktlsd without status?)")
    try:
        _, status, reason, report = decode_status_answer(data)
    except ServiceFormatError as exc:
        raise StatusError(f"unreadable answer from {path}: {exc}") from None
    if status:
        name = errno.errorcode.get(status, str(status))
        raise StatusError(f"{path}: {reason or os.strerror(status)} ({name})")
    return report


def fetch_report(explicit: str | None) -> bytes:
    """Ask at each candidate path until one answers (the next is tried only when nothing
    listens at one)."""
    problems: list[str] = []
    for path in candidate_paths(explicit):
        try:
            return ask(path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            problems.append(f"{path}: {exc.strerror}")
        except PermissionError as exc:
            raise StatusError(f"{path}: {exc.strerror} (ktlsd status is for root only)") from None
        except OSError as exc:
            raise StatusError(f"{path}: {exc.strerror or exc}") from None
    raise StatusError("no ktlsd agent answers: " + "; ".join(problems))


def write_atomically(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, flushed
    to disk, then renamed over ``path`` (mode 0644: a collector may run as another user)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), 0o644)
            os.fsync(handle.fileno())
        os.rename(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def status_command(args: argparse.Namespace) -> int:
    from ktlsd.status import render_openmetrics, render_text, report_from_json

    try:
        raw = fetch_report(args.socket)
        report = report_from_json(raw)
    except (StatusError, ValueError) as exc:
        print(f"ktlsd status: {exc}", file=sys.stderr)
        return 1
    if args.openmetrics:
        text = render_openmetrics(report)
    elif args.json:
        text = raw.decode("utf-8") + "\n"
    else:
        text = render_text(report)
    if args.output:
        try:
            write_atomically(args.output, text)
        except OSError as exc:
            print(f"ktlsd status: cannot write {args.output}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0
