"""Child processes for tests: output collected in the background, waiting on it, teardown.

:class:`ChildProcess` is the one implementation behind the peers (:class:`tests.peers.Peer`,
stdout and stderr merged), the ``ktlsd connect/listen`` processes (:class:`tests.cli_peers.Proc`,
streams apart) and the agent process (:class:`tests.agent_helpers.AgentProcess`):

* one reader thread per pipe appends what the child writes to :attr:`out` / :attr:`err` and
  notifies a condition, so :meth:`wait_output` wakes on new output instead of polling;
* :meth:`wait_output` gives up when the child has exited and its output is all read, so a
  peer that dies says so at once instead of after the timeout;
* :meth:`stop` always reaps: SIGTERM, ``grace`` seconds, then SIGKILL; stdin, the readers and
  the pipes are closed on every path. Use the class as a context manager.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
from collections.abc import Callable, Sequence
from typing import IO, Any, Self

from tests.waiting import Describe, wait_until

STOP_GRACE = 3.0


class ChildProcess:
    """A child process whose stdout (and stderr, unless merged) are collected by threads."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        stdin: int | IO[Any] | None = subprocess.PIPE,
        merge_stderr: bool = False,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
    ) -> None:
        self.argv = list(argv)
        self.name = name
        self.out = bytearray()
        self.err = bytearray()
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            env=env,
            cwd=cwd,
        )
        streams = [(self.proc.stdout, self.out)]
        if not merge_stderr:
            streams.append((self.proc.stderr, self.err))
        self._readers = [
            threading.Thread(target=self._read, args=(stream, buf), daemon=True)
            for stream, buf in streams
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[bytes], buf: bytearray) -> None:
        while True:
            try:
                chunk = stream.read1(65536)  # type: ignore[attr-defined]
            except (OSError, ValueError):
                chunk = b""
            with self._cond:
                self._received(buf, chunk)
                self._cond.notify_all()
            if not chunk:
                return

    def _received(self, buf: bytearray, chunk: bytes) -> None:
        """Keep ``chunk`` read into ``buf`` (b"" at the end of the stream); lock held."""
        buf += chunk

    # -- waiting -------------------------------------------------------------------------------

    def ended(self) -> bool:
        """The child has exited and everything it wrote has been read."""
        return self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)

    def wait_output(self, ready: Callable[[], bool], what: Describe, timeout: float) -> None:
        """Wait until ``ready()`` (called with the output lock held) is true."""
        wait_until(ready, what, timeout, ended=self.ended, cond=self._cond)

    def snapshot(self, buf: bytearray) -> str:
        """``buf`` (:attr:`out` or :attr:`err`) so far, as text."""
        with self._cond:
            return buf.decode("utf-8", "replace")

    def exited(self) -> str | None:
        """None while the child runs; else its exit status and what it wrote."""
        if self.proc.poll() is None:
            return None
        output = self.snapshot(self.out) + self.snapshot(self.err)
        return f"rc={self.proc.returncode}, output:\n{output}"

    # -- ending --------------------------------------------------------------------------------

    def join_readers(self, timeout: float) -> None:
        for reader in self._readers:
            reader.join(timeout)

    def _close_pipes(self) -> None:
        """Close the output pipes once their readers are done (a grandchild may hold them)."""
        if any(r.is_alive() for r in self._readers):
            return
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def wait_exit(self, timeout: float) -> int:
        """Wait for the child to exit on its own; its output is then all read."""
        rc = self.proc.wait(timeout)
        self.join_readers(timeout)
        self._close_pipes()
        return rc

    def stop(self, grace: float = STOP_GRACE) -> int:
        """SIGTERM, up to ``grace`` seconds, then SIGKILL; close every pipe; the exit status."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        self.join_readers(STOP_GRACE)
        self._close_pipes()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
