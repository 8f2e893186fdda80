"""Where log lines go: journal detection on real descriptors, the destination rule, syslog(3)
received on a real /dev/log socket (in a private mount namespace), sd_notify addresses."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ktlsd import log_output, sdnotify
from ktlsd.log_output import (
    NOTICE,
    Destination,
    JournalFormatter,
    choose_destinations,
    stream_is_journal,
    stream_is_usable,
    syslog_priority,
)
from tests.agent_helpers import REPO


def test_journal_stream_matches_only_the_file_it_names(tmp_path: Path) -> None:
    with open(tmp_path / "a", "wb") as a, open(tmp_path / "b", "wb") as b:
        st = os.fstat(a.fileno())
        named = f"{st.st_dev}:{st.st_ino}"
        assert stream_is_journal(a.fileno(), named)
        assert not stream_is_journal(b.fileno(), named)
        assert not stream_is_journal(a.fileno(), "")
        assert not stream_is_journal(a.fileno(), "garbage")
        assert not stream_is_journal(a.fileno(), f"{st.st_dev}")
    read_end, write_end = os.pipe()
    try:
        pipe = os.fstat(write_end)
        assert stream_is_journal(write_end, f"{pipe.st_dev}:{pipe.st_ino}")
        assert not stream_is_journal(write_end, named)
    finally:
        os.close(read_end)
        os.close(write_end)
    assert not stream_is_journal(9999, named)  # not open


def test_devnull_and_closed_descriptors_are_not_usable(tmp_path: Path) -> None:
    with open(os.devnull, "wb") as null, open(tmp_path / "f", "wb") as regular:
        assert not stream_is_usable(null.fileno())
        assert stream_is_usable(regular.fileno())
    read_end, write_end = os.pipe()
    os.close(read_end)
    assert stream_is_usable(write_end)
    os.close(write_end)
    assert not stream_is_usable(write_end)


@pytest.mark.parametrize(("stderr", "syslog", "journal", "usable", "expected"), [
    (False, False, True, True, [Destination.JOURNAL]),
    (True, False, True, True, [Destination.JOURNAL]),
    (False, False, False, True, [Destination.STDERR]),
    (True, False, False, False, [Destination.STDERR]),
    (False, False, False, False, [Destination.SYSLOG]),
    (False, True, True, True, [Destination.SYSLOG]),
    (True, True, True, True, [Destination.SYSLOG, Destination.JOURNAL]),
    (True, True, False, True, [Destination.SYSLOG, Destination.STDERR]),
])
def test_the_destination_rule(stderr: bool, syslog: bool, journal: bool, usable: bool,
                              expected: list[Destination]) -> None:
    assert choose_destinations(want_stderr=stderr, want_syslog=syslog,
                               stderr_is_journal=journal, stderr_is_usable=usable) == expected


def test_priorities_and_the_journal_prefix() -> None:
    assert [syslog_priority(level) for level in (logging.DEBUG, logging.INFO, NOTICE,
            logging.WARNING, logging.ERROR, logging.CRITICAL)] == [7, 6, 5, 4, 3, 2]
    record = logging.LogRecord("ktlsd", logging.WARNING, __file__, 1, "two\nlines", None, None)
    assert JournalFormatter().format(record) == "<4>two\n<4>lines"
    assert logging.getLevelName(NOTICE) == "NOTICE"


SYSLOG_CHILD = """
import os, socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.bind("/dev/log")
from ktlsd import log_output
import logging
assert log_output.configure("debug", want_syslog=True) == [log_output.Destination.SYSLOG]
log = logging.getLogger("ktlsd")
log.debug("d"); log.info("i"); log.log(log_output.NOTICE, "n"); log.warning("w"); log.error("e")
print(os.getpid())
for _ in range(5):
    print(sock.recv(4096).decode())
"""


def test_syslog_gets_tlshds_facility_and_each_lines_priority(tmp_path: Path) -> None:
    """syslog(3) writes to /dev/log: a private mount namespace gets its own /dev with a real
    datagram socket there, so nothing reaches (or needs) the host's syslog."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs unshare(1) and root for a private mount namespace")
    script = tmp_path / "child.py"
    script.write_text(SYSLOG_CHILD)
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         'mount -t tmpfs none /dev && exec "$0" "$1"', sys.executable, str(script)],
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    if result.returncode != 0 and "mount" in result.stderr and "ktlsd" not in result.stderr:
        pytest.skip(f"no private mount namespace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    pid, *messages = result.stdout.splitlines()
    auth = 4 << 3  # LOG_AUTH, as tlshd's openlog()
    for message, (priority, text) in zip(messages, [(7, "d"), (6, "i"), (5, "n"), (4, "w"),
                                                    (3, "e")], strict=True):
        assert message.startswith(f"<{auth + priority}>")
        assert message.endswith(f" ktlsd[{pid}]: {text}")


def test_configure_replaces_handlers_and_sets_the_level(tmp_path: Path) -> None:
    logger = logging.getLogger("ktlsd")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    try:
        assert log_output.configure("notice", destinations=[Destination.STDERR]) == [
            Destination.STDERR]
        assert len(logger.handlers) == 1 and not logger.propagate
        assert logger.level == NOTICE
        log_output.set_level("debug")
        assert logger.level == logging.DEBUG
    finally:
        logger.handlers[:], logger.propagate, logger.level = saved


# --- sd_notify addresses -------------------------------------------------------------------------


def test_notify_addresses() -> None:
    assert sdnotify.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert sdnotify.notify_address("@abstract/name") == b"\0abstract/name"
    for unusable in ("", "@", "relative/path", "vsock:2:1234"):
        assert sdnotify.notify_address(unusable) is None


def test_notify_without_a_manager_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.ready("serving") is False


def test_notify_sends_one_datagram_and_refuses_broken_lines(tmp_path: Path) -> None:
    from tests.agent_helpers import NotifyListener

    with NotifyListener(tmp_path) as manager:
        assert sdnotify.notify("READY=1", "STATUS=up", address=manager.address)
        assert manager.receive() == {"READY": "1", "STATUS": "up"}
        with pytest.raises(ValueError):
            sdnotify.notify("READY=1\nSTOPPING=1", address=manager.address)
        with pytest.raises(ValueError):
            sdnotify.notify("READY", address=manager.address)
        assert sdnotify.status_line("two\nlines  here") == "STATUS=two lines here"
    # a manager that went away: not an error, just False
    assert sdnotify.notify("READY=1", address=str(tmp_path / "gone.sock")) is False
