"""Where ``ktlsd run`` writes its log lines, and how each line carries its priority.

Three destinations:

* **the journal** -- stderr is the journal when ``$JOURNAL_STREAM`` (``device:inode``, set by
  systemd for ``StandardError=journal``) names the file stderr is open on. Each line then
  starts with its syslog priority in the sd-daemon(3) form (``<3>`` error, ``<4>`` warning,
  ``<5>`` notice, ``<6>`` info, ``<7>`` debug) and nothing else: the journal adds the time,
  the host, ``ktlsd[pid]``, and files the priority, so ``journalctl -p warning -u ktlsd``
  filters on it;
* **syslog** -- syslog(3) with ident ``ktlsd``, the process id, and tlshd's facility
  (``LOG_AUTH``: an admin's rules for tlshd's messages keep working), the priority per line;
* **stderr** -- ``ktlsd: LEVEL message``, for a terminal, a pipe or a file.

The rule (:func:`choose_destinations`), tlshd's flags read for a drop-in: tlshd always logs
to syslog and ``-s`` copies the lines to stderr; ktlsd logs

1. to syslog when ``--syslog`` is given, and then to stderr too when ``-s`` is given;
2. else to the journal when stderr is the journal (what a systemd unit gets by default: one
   copy, with priorities, and no syslog round trip);
3. else to stderr when ``-s`` is given or stderr is open on anything but ``/dev/null``;
4. else (stderr closed or ``/dev/null``: a daemon started by a script) to syslog, as tlshd.

Levels: Python's, plus :data:`NOTICE` between info and warning (tlshd logs its start-up and
shutdown at notice). Warnings and errors are for what an admin must look at -- a failed
handshake is a warning -- so routine lines stay at notice or below.
"""

from __future__ import annotations

import enum
import logging
import os
import stat
import sys
from collections.abc import Sequence

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

ENV_JOURNAL_STREAM = "JOURNAL_STREAM"
LOGGER = "ktlsd"
SYSLOG_IDENT = "ktlsd"
PLAIN_FORMAT = "ktlsd: %(levelname)s %(message)s"


class Destination(enum.Enum):
    JOURNAL = "journal"
    SYSLOG = "syslog"
    STDERR = "stderr"


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a Python level: 2 crit, 3 err, 4 warning, 5 notice, 6 info,
    7 debug."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= NOTICE:
        return 5
    if levelno >= logging.INFO:
        return 6
    return 7


def stream_is_journal(fd: int = 2, journal_stream: str | None = None) -> bool:
    """True when ``fd`` is the stream ``$JOURNAL_STREAM`` (``device:inode``) names."""
    value = journal_stream if journal_stream is not None else os.environ.get(ENV_JOURNAL_STREAM)
    if not value:
        return False
    device, _, inode = value.partition(":")
    try:
        expected = (int(device), int(inode))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == expected


def stream_is_usable(fd: int = 2) -> bool:
    """False when ``fd`` is closed or ``/dev/null``: nobody reads what is written there."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    if stat.S_ISCHR(st.st_mode):
        try:
            null = os.stat(os.devnull)
        except OSError:
            return True
        return st.st_rdev != null.st_rdev
    return True


def choose_destinations(*, want_stderr: bool, want_syslog: bool, stderr_is_journal: bool,
                        stderr_is_usable: bool) -> list[Destination]:
    """The rule in this module's docstring, as a pure function."""
    if want_syslog:
        out = [Destination.SYSLOG]
        if want_stderr:
            out.append(Destination.JOURNAL if stderr_is_journal else Destination.STDERR)
        return out
    if stderr_is_journal:
        return [Destination.JOURNAL]
    if want_stderr or stderr_is_usable:
        return [Destination.STDERR]
    return [Destination.SYSLOG]


class JournalFormatter(logging.Formatter):
    """``<priority>message``; every line of a multi-line message gets the prefix."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


class SyslogHandler(logging.Handler):
    """syslog(3), ident ``ktlsd`` with the pid, facility ``LOG_AUTH`` (tlshd's)."""

    def __init__(self, ident: str = SYSLOG_IDENT, facility: int | None = None) -> None:
        super().__init__()
        import syslog

        self._syslog = syslog
        syslog.openlog(ident, syslog.LOG_PID | syslog.LOG_NDELAY,
                       syslog.LOG_AUTH if facility is None else facility)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            priority = syslog_priority(record.levelno)
            for line in self.format(record).split("\n"):
                self._syslog.syslog(priority, line)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        self._syslog.closelog()
        super().close()


def _handler(destination: Destination) -> logging.Handler:
    if destination is Destination.SYSLOG:
        return SyslogHandler()
    handler = logging.StreamHandler(sys.stderr)
    if destination is Destination.JOURNAL:
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(PLAIN_FORMAT))
    return handler


def configure(level: str = "info", *, want_stderr: bool = False, want_syslog: bool = False,
              destinations: Sequence[Destination] | None = None) -> list[Destination]:
    """Send the ``ktlsd`` logger's lines where the rule says; returns the destinations."""
    if destinations is None:
        destinations = choose_destinations(
            want_stderr=want_stderr, want_syslog=want_syslog,
            stderr_is_journal=stream_is_journal(2), stderr_is_usable=stream_is_usable(2),
        )
    logger = logging.getLogger(LOGGER)
    for old in logger.handlers:
        old.close()
    logger.handlers[:] = [_handler(d) for d in destinations]
    logger.propagate = False
    set_level(level)
    return list(destinations)


def set_level(level: str) -> None:
    """``debug``, ``info``, ``notice``, ``warning`` or ``error``."""
    logging.getLogger(LOGGER).setLevel(level.upper())
