"""Waiting in tests and benchmarks, in one place: readiness and the hang limit.

Nothing here measures time. Every limit only turns a hang (a peer that never starts, an agent
that never answers) into a failure that says what was awaited, instead of a stuck suite.

* :func:`wait_until` blocks until a predicate holds: a line in a child's output (woken by the
  reader thread through its :class:`threading.Condition`), a file with the expected content,
  a port that listens. :func:`await_until` is the same for a coroutine on the event loop.
* :func:`wait_listening` is :func:`wait_until` on :func:`is_listening`: a server process is up
  once its port is in the kernel's listen table (read from ``/proc``, no connection made).
* :func:`run` runs a test's coroutine with a hang limit.
* :class:`ThreadResult` runs a function in a thread (the other end of a blocking handshake);
  its :meth:`~ThreadResult.result` joins within a limit and returns or re-raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

Describe = str | Callable[[], str]


class _Process(Protocol):
    """What :func:`wait_listening` needs to notice that a server exited instead of listening."""

    name: str

    def exited(self) -> str | None: ...


def _failure(what: Describe, timeout: float, ended: bool) -> AssertionError:
    if callable(what):
        return AssertionError(what())
    if ended:
        return AssertionError(f"gave up waiting for: {what} (it can no longer happen)")
    return AssertionError(f"timed out after {timeout:g} s waiting for: {what}")


def wait_until(
    ready: Callable[[], bool],
    what: Describe,
    timeout: float = 10.0,
    *,
    ended: Callable[[], bool] | None = None,
    cond: threading.Condition | None = None,
    interval: float = 0.02,
) -> None:
    """Block until ``ready()`` is true.

    Gives up with an :class:`AssertionError` after ``timeout`` seconds, or as soon as
    ``ended()`` is true (what would make ``ready()`` true is gone: the process exited and its
    output is all read). ``what`` names what is awaited; a callable is called at that moment
    and its text is the whole message (say, with the output so far).

    With ``cond``, ``ready`` and ``ended`` are evaluated with ``cond`` held and the wait wakes
    when it is notified; without, the predicate is polled every ``interval`` seconds.
    """
    deadline = time.monotonic() + timeout
    lock = cond if cond is not None else contextlib.nullcontext()
    with lock:
        while not ready():
            if ended is not None and ended():
                raise _failure(what, timeout, ended=True)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _failure(what, timeout, ended=False)
            if cond is not None:
                cond.wait(min(remaining, 0.1))
            else:
                time.sleep(min(remaining, interval))


async def await_until(
    ready: Callable[[], bool], what: Describe, timeout: float = 10.0, *, interval: float = 0.005
) -> None:
    """:func:`wait_until` for a coroutine: poll ``ready()`` without blocking the event loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ready():
        if loop.time() > deadline:
            raise _failure(what, timeout, ended=False)
        await asyncio.sleep(interval)


def is_listening(port: int) -> bool:
    """Whether a socket listens on TCP ``port`` (read from /proc, no connection made).

    Probing with a connection would use up the only accept of ``s_server -naccept 1``, and
    ``-quiet``/``-brief`` servers print no "ACCEPT" line to wait for.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_listening(port: int, timeout: float = 10.0, proc: _Process | None = None) -> None:
    """Wait until something listens on ``port`` (a server process starting up).

    With ``proc``, fail at once, with its own words, if it exits first.
    """
    def ended() -> bool:
        return proc is not None and proc.exited() is not None

    def describe() -> str:
        if proc is not None and (reason := proc.exited()) is not None:
            return f"{proc.name} exited: {reason}"
        return f"nothing listens on port {port}"

    wait_until(lambda: is_listening(port), describe, timeout, ended=ended, interval=0.01)


def run(coro: Coroutine[Any, Any, Any], limit: float = 60.0) -> Any:
    """Run a test coroutine; a hang becomes a failure instead of a stuck suite."""
    return asyncio.run(asyncio.wait_for(coro, limit))


class ThreadResult:
    """Run ``fn`` in a daemon thread; :meth:`result` joins it and returns or re-raises."""

    def __init__(self, fn: Callable[[], object]) -> None:
        self._value: object = None
        self._error: BaseException | None = None

        def run() -> None:
            try:
                self._value = fn()
            except BaseException as exc:
                self._error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def result(self, timeout: float) -> Any:
        """``fn``'s value (or its exception raised here); fails if it runs past ``timeout``."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "gave up waiting for the other end"
        if self._error is not None:
            raise self._error
        return self._value
