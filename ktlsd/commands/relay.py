"""What ``ktlsd connect`` and ``ktlsd listen`` do with a connection after its handshake.

:func:`relay` copies standard input to the peer and the peer to standard output until both
directions ended; :func:`answer_www` (``listen --www``) answers one HTTP request head with a
small page, like ``openssl s_server -www``. Both take a
:class:`~ktlsd.tls.connection.TlsConnection` already on its record layer and own it from then
on: they end at once on any failure of it (raising; after a fatal error no close_notify is
sent), close it on every path without waiting more than :data:`CLOSE_TIMEOUT` for a peer that
does not read, and return a :class:`RelayResult`. With an ``idle_timeout``,
:class:`IdleTimeout` is raised when nothing moved either way for that long. Standard input has
one reader for the whole process (:class:`StdinPump`), shared by the connections one
``listen`` serves. Status lines on standard error are the caller's; the ``--www`` page shows
the suite, group and peer identity, never a secret.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import os
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ktlsd.tls.session import Session

if TYPE_CHECKING:
    from ktlsd.tls.connection import TlsConnection

__all__ = [
    "CHUNK",
    "CLOSE_TIMEOUT",
    "MAX_WWW_REQUEST",
    "STDIN_BACKLOG",
    "IdleTimeout",
    "RelayResult",
    "StdinPump",
    "answer_www",
    "describe_session",
    "relay",
]

CHUNK = 16384

#: How long closing may wait for a peer that does not read (close_notify must fit the socket).
CLOSE_TIMEOUT = 5.0
#: ``--www``: largest HTTP request head read before answering anyway.
MAX_WWW_REQUEST = 65536

@dataclass
class RelayResult:
    sent: int = 0
    received: int = 0
    key_updates_sent: int = 0
    key_updates_received: int = 0


def describe_session(session: Session) -> str:
    return (
        f"suite={session.suite.iana_name} group={session.group or '-'} "
        f"sig={session.signature_scheme or '-'} peer_sig={session.peer_signature_scheme or '-'} "
        f"peer={session.peer.describe()}"
    )


class StdinPump:
    """The one reader of standard input for the whole process, shared by its connections.

    stdin may be a file, a pipe or a terminal, none of which asyncio can wait on portably,
    so a thread reads it. One thread for the process, not one per connection: with
    ``listen --count/--forever`` a per-connection thread left blocked in ``read`` when its
    connection ended would swallow the first line typed for the next connection. Chunks wait
    here until a connection takes them; at most :data:`STDIN_BACKLOG` chunks are read ahead,
    so a fast stdin never outruns the peer. End of input is sticky: every later ``get``
    returns ``b""`` at once.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._room = threading.Semaphore(STDIN_BACKLOG)
        # Connections of a listen serving several at once may all be waiting.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread: threading.Thread | None = None

    def _read_loop(self) -> None:
        while True:
            self._room.acquire()
            try:
                data = os.read(self._fd, CHUNK) if self._fd >= 0 else b""
            except OSError:
                data = b""
            with self._lock:
                self._chunks.append(data)
                waiters, self._waiters = self._waiters, []
            for loop, future in waiters:
                # The loop may be gone (its connection ended): the chunk stays for the next.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_wake, future)
            if not data:
                return

    async def get(self) -> bytes:
        """The next chunk of stdin, ``b""`` at (and after) its end."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._read_loop, name="stdin", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._chunks:
                    if not self._chunks[0]:
                        return b""  # end of input stays queued for whoever comes next
                    self._room.release()
                    return self._chunks.popleft()
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            await future


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


STDIN_BACKLOG = 64
_stdin_pump: StdinPump | None = None


def _stdin() -> StdinPump:
    global _stdin_pump
    if _stdin_pump is None:
        _stdin_pump = StdinPump(sys.stdin.fileno() if sys.stdin is not None else -1)
    return _stdin_pump


class IdleTimeout(OSError):
    """Nothing was received or sent on the connection for ``--idle-timeout`` seconds."""

    def __init__(self, seconds: float) -> None:
        super().__init__(errno.ETIMEDOUT, f"idle for {seconds:g} s: nothing received or sent")

    def __str__(self) -> str:
        return str(self.strerror)


def _receiver(conn: TlsConnection, idle: float | None) -> Callable[[], Awaitable[bytes]]:
    """``conn.arecv`` that raises :class:`IdleTimeout` after ``idle`` seconds without traffic.

    Traffic is either direction: a peer that only reads what we stream to it is not idle.
    """

    def moved() -> int:
        return int(conn.bytes_sent + conn.bytes_received + conn.key_updates_sent)

    async def recv() -> bytes:
        while True:
            before = moved()
            try:
                return await asyncio.wait_for(conn.arecv(65536), idle)
            except TimeoutError:
                if moved() == before:
                    raise IdleTimeout(idle or 0) from None

    return recv


async def _close(conn: TlsConnection) -> None:
    """close_notify (nothing after a fatal error), without waiting forever for a stuck peer."""
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(conn.aclose(), CLOSE_TIMEOUT)


async def relay(
    conn: TlsConnection, *, key_update_every: int | None, idle_timeout: float | None
) -> RelayResult:
    """Relay stdin to ``conn`` and ``conn`` to stdout until EOF, then close ``conn``.

    Any failure of the connection ends the relay at once (stdin is not waited for); after a
    fatal error no close_notify is sent. ``key_update_every`` cuts what is sent so that each
    key protects exactly that many bytes (``conn`` sends the KeyUpdates).
    """
    result = RelayResult()
    out = sys.stdout.buffer
    stdin = _stdin()
    recv = _receiver(conn, idle_timeout)

    every = key_update_every

    async def pump_out() -> None:
        while True:
            data = await stdin.get()
            if not data:
                await conn.aclose()  # close_notify; reading goes on
                return
            while data:
                # Cut at multiples of --key-update-every so that each key protects exactly
                # BYTES, whatever sizes the reads from stdin happen to return; the
                # connection then sends its KeyUpdate before the first byte past the mark.
                piece = data[: every - result.sent % every] if every else data
                await conn.asend(piece)
                result.sent += len(piece)
                data = data[len(piece) :]

    async def next_data() -> bytes:
        # While stdin is still being sent, a failed send ends the relay as well.
        if sender.done():
            return await recv()
        receiving = asyncio.ensure_future(recv())
        await asyncio.wait({receiving, sender}, return_when=asyncio.FIRST_COMPLETED)
        if sender.done() and sender.exception() is not None and not receiving.done():
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving
            await sender  # raises its error
        return await receiving

    sender = asyncio.create_task(pump_out())
    try:
        while True:
            data = await next_data()
            if not data:
                break
            out.write(data)
            out.flush()
            result.received += len(data)
        # The peer's close_notify ends only its direction (RFC 8446 §6.1): keep relaying our
        # stdin until it ends too — unless a person is typing at a terminal.
        if not sender.done() and sys.stdin is not None and sys.stdin.isatty():
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await conn.aclose()
        else:
            await sender  # propagate its errors
    finally:
        if not sender.done():
            sender.cancel()
        result.key_updates_sent = conn.key_updates_sent
        result.key_updates_received = conn.key_updates_received
        await _close(conn)
    return result


def _www_page(request: bytes, session: Session) -> bytes:
    """The answer of ``listen --www``: a small HTTP/1.0 response, no secrets."""
    line = request.split(b"\n", 1)[0].strip()
    if len(request) > MAX_WWW_REQUEST:
        status = "413 Request Entity Too Large"
    elif line.startswith((b"GET ", b"HEAD ")):
        status = "200 OK"
    else:
        status = "400 Bad Request"
    body = (
        f"ktlsd {status.split(' ', 1)[1]}\n"
        f"protocol=TLSv1.3 {describe_session(session)}\n"
    ).encode("utf-8", "replace")
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + (b"" if line.startswith(b"HEAD ") else body)


def _request_complete(request: bytes) -> bool:
    return b"\r\n\r\n" in request or b"\n\n" in request or len(request) > MAX_WWW_REQUEST


async def answer_www(
    conn: TlsConnection, session: Session, *, idle_timeout: float | None
) -> RelayResult:
    """Read one HTTP request head on ``conn``, answer it in one record, close with close_notify.

    Then read on until the peer's close_notify (or TCP EOF), so that the peer's own
    close_notify never meets a closed socket, whose reset could destroy our answer in flight.
    ``session`` is ``conn``'s, described in the page.
    """
    result = RelayResult()
    recv = _receiver(conn, idle_timeout)
    try:
        request = b""
        while not _request_complete(request):
            data = await recv()
            if not data:
                break
            request += data
        result.received = len(request)
        if request:
            page = _www_page(request, session)
            await conn.asend(page)
            result.sent = len(page)
        await conn.aclose()
        while data := await recv():
            result.received += len(data)
    finally:
        result.key_updates_sent = conn.key_updates_sent
        result.key_updates_received = conn.key_updates_received
        await _close(conn)
    return result

