"""The user-space handshake service: the kernel's handshake upcall, offered to programs.

In-kernel consumers (NVMe/TCP, NFS) ask for a TLS handshake through the ``handshake``
generic netlink family; this module gives user-space programs the same mechanism over a
local socket, so that one agent (:mod:`ktlsd.agent`) serves both the same way. It is an
:class:`~ktlsd.request.UpcallSource`: the agent iterates :meth:`HandshakeService.requests`
and answers each :class:`ServiceRequest` with ``done()``, exactly as for the kernel.

The protocol -- transport, framing, every attribute, limits and status values -- is
specified in :mod:`ktlsd.upcall.wire`, which also holds its codec and message I/O; this
module is the server only (listening socket, admission, queue, cancellation, DONE).
Consumers (:mod:`ktlsd.client`) never import it.

Admission mirrors the kernel's ``handshake_req_submit()``: ESRCH while closing, EAGAIN at
the pending limit (``pending_limit``, default :func:`default_pending_limit`) or at the
consumer uid's share of it, EBUSY for a socket that already has a request, ESRCH when no
:meth:`HandshakeService.requests` iterator is open -- in that order, after the envelope and
decoding checks (EINVAL).

Fairness between local users (:class:`~ktlsd.settings.ServiceLimits`, per uid from
``SO_PEERCRED``): a uid holds at most ``uid_max_connections`` connections (a further one is
answered EAGAIN on connecting and closed), ``uid_max_pending`` queued requests and
``uid_max_in_flight`` requests taken by the agent. :meth:`HandshakeService.requests` hands
queued requests out round-robin between uids and skips a uid at its in-flight share, so a
uid whose peers stall holds its own share and nothing more. A connection that sends no
SUBMIT within ``submit_timeout_ms`` is closed. :meth:`HandshakeService.configure` applies new
limits (the agent calls it on reload).

Descriptors: every descriptor received is closed on every path -- a refused or malformed
SUBMIT, extra descriptors, anything sent after SUBMIT, a connection that drops, a request
withdrawn from the queue -- except the one SUBMIT socket of an accepted request, which
belongs to the request until ``done()`` (or its withdrawal) closes it. Passed descriptors are
inspected in place (``fstat``, then ``getsockopt`` on a borrowed socket object), never
duplicated.

With worker processes (:mod:`ktlsd.workers`), a :class:`ServiceFront` reads the SUBMITs in
the workers: this module still accepts every connection, applies the connection caps, and
then admits, queues and watches the requests the front reports, on its own copy of each
connection (see :meth:`HandshakeService.admit_from_front`).

Notes for the agent
===================

* Take a request from :meth:`HandshakeService.requests` only when you can start it: the
  pending limit counts requests not yet taken, so an agent that takes everything at once
  defeats it (the kernel, likewise, does not limit accepted requests).
* ``request.sockfd`` belongs to the source: do not close it; ``done()`` closes it. Its open
  file description (and so O_NONBLOCK) is shared with the consumer's socket.
* :attr:`ServiceRequest.cancelled` is an :class:`asyncio.Event` set when the consumer goes
  away; await it next to the handshake to abort early. ``done()`` after cancellation only
  releases the descriptor (the kernel likewise ignores DONE for a cancelled request).
* :attr:`ServiceRequest.credentials` holds the consumer's pid/uid/gid (``SO_PEERCRED``):
  key serials and file names come from a possibly unprivileged user and should be checked
  against that uid before a privileged agent uses them.
* ``ktlsd status``: a connection whose first message is a STATUS request (the protocol's
  "STATUS" section) gets :attr:`HandshakeService.status_provider`'s report when its uid is 0,
  else a one-line EACCES refusal that costs nothing more. :class:`StatusListener` answers
  STATUS alone on a root-only socket, for an agent that runs without this service.
* :meth:`HandshakeService.close` stops accepting (new submits get ESRCH), answers queued
  requests ESRCH and ends :meth:`~HandshakeService.requests`; requests in flight keep their
  connections and get their DONE; :meth:`~HandshakeService.wait_closed` waits for them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

from ktlsd.request import ConsumerCredentials, HandshakeDone, HandshakeRequest, KeyDelivery
from ktlsd.settings import (
    DEFAULT_SERVICE_MODE,
    DEFAULT_SERVICE_PATH,
    DEFAULT_SUBMIT_TIMEOUT_MS,
    AgentSettings,
    ServiceLimits,
)
from ktlsd.upcall.wire import (
    MAX_MESSAGE_SIZE,
    ServiceFormatError,
    decode_status_request,
    decode_submit,
    encode_done_message,
    encode_error_done,
    encode_status_answer,
    is_status_request,
    recv_message,
    recv_message_now,
    send_message,
)

log = logging.getLogger("ktlsd.upcall.service")



SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13 (asm-generic value)


def peer_credentials(sock: socket.socket) -> ConsumerCredentials:
    """The consumer process, from ``SO_PEERCRED`` (and its supplementary groups from
    ``SO_PEERGROUPS``) at connect time."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    try:
        # Python caps the buffer at 1024 bytes (256 groups); with more, or on an older kernel,
        # the consumer's files are read without its supplementary groups: fewer rights.
        packed = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = struct.unpack(f"{len(packed) // 4}I", packed[: len(packed) // 4 * 4])
    except OSError:
        groups = ()
    return ConsumerCredentials(pid, uid, gid, tuple(groups))


RUNTIME_DIRECTORY = "/run/ktlsd"
"""The runtime directory when no service manager names one (``RuntimeDirectory=ktlsd``)."""


def creatable_directory(directory: str) -> bool:
    """True if ``start()`` may create ``directory``: it is the runtime directory
    (``$RUNTIME_DIRECTORY``, colon-separated as systemd sets it, or /run/ktlsd) or inside it.
    No other directory is ever created; the socket's directory must then exist."""
    roots = [r for r in os.environ.get("RUNTIME_DIRECTORY", "").split(":") if r]
    target = os.path.normpath(os.path.abspath(directory))
    for root in [*roots, RUNTIME_DIRECTORY]:
        root = os.path.normpath(os.path.abspath(root))
        if os.path.commonpath([root, target]) == root:
            return True
    return False


def default_pending_limit() -> int:
    """The kernel's per-netns limit: ``clamp(totalram / (25 * mem_unit), 3, 50)``.

    ``totalram`` counts ``mem_unit``-sized units (pages), so on any real machine this is 50.
    """
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 50
    return max(3, min(50, pages // 25))


class CancelEvent(asyncio.Event):
    """``ServiceRequest.cancelled``: an :class:`asyncio.Event` that also runs callbacks when
    set, so that a waiter needs no task of its own (:mod:`ktlsd.workers` waits on thousands)."""

    def __init__(self) -> None:
        super().__init__()
        self._callbacks: list[Callable[[], None]] = []

    def set(self) -> None:
        super().set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def add_callback(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once when the event is set: at once when it already is (a
        consumer that left before the waiter came is not missed)."""
        if self.is_set():
            callback()
            return
        self._callbacks.append(callback)

    def remove_callback(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._callbacks.remove(callback)


class _State(enum.Enum):
    WAITING = "waiting"  # connected, SUBMIT not yet received
    QUEUED = "queued"
    IN_FLIGHT = "in flight"
    FINISHED = "finished"


class ServiceFront(Protocol):
    """Reads and runs service requests in other processes (:mod:`ktlsd.workers`): the service
    accepts each connection, applies the connection caps, and offers it to the front, which
    reads the SUBMIT there and reports back (:meth:`HandshakeService.admit_from_front`,
    :meth:`~HandshakeService.forward_from_front`, :meth:`~HandshakeService.abandon_from_front`).
    Admission, the queue, the per-uid shares and cancellation stay here, on the service's own
    copy of the connection, which also answers whatever the front cannot."""

    def take_connection(self, conn: socket.socket, creds: ConsumerCredentials) -> int | None:
        """Hand a copy of ``conn`` to a worker: its front id, or None (served here)."""
        ...

    def drop(self, front_id: int) -> None:
        """The service answered or withdrew the request: the front forgets its copies."""
        ...


@dataclass(eq=False)
class ServiceRequest:
    """A request submitted through the service: the :class:`~ktlsd.request.PendingRequest`.

    A user-space consumer: its ``credentials`` (``SO_PEERCRED``) bound the material it may use
    and own its kept session; it gets the session's secrets back in DONE. ``cancelled`` is set
    when the consumer disconnects (or breaks protocol) before DONE; the agent then aborts the
    handshake. ``done()`` must be called exactly once for every request taken from
    :meth:`HandshakeService.requests`.
    """

    request: HandshakeRequest
    credentials: ConsumerCredentials
    source_name: str = "service"
    delivery: KeyDelivery = KeyDelivery.RETURN_SECRETS
    cancelled: asyncio.Event = field(default_factory=CancelEvent)
    _service: HandshakeService | None = field(default=None, repr=False)
    _conn: socket.socket | None = field(default=None, repr=False)
    _seq: int = 0
    _identity: tuple[int, int] = (0, 0)
    _state: _State = _State.QUEUED
    _watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    submit_message: bytes = field(default=b"", repr=False)
    """The SUBMIT as the consumer sent it (inline keys included: never shown), so that a
    worker pool can pass it on without encoding the request again."""
    front_id: int | None = None
    """Set when a :class:`ServiceFront` (a worker) read this request and holds its socket
    (``request.sockfd`` is then -1 here, ``request`` carries no material): the front runs it."""
    peer_label: str = "-"
    """The TCP peer's address, as the front saw it (a request the front holds)."""
    answered_by_front: bool = False
    """The front sent DONE to the consumer itself: ``done()`` only releases the request."""

    async def done(self, answer: HandshakeDone) -> None:
        """Close the agent's descriptor and send DONE (a no-op after cancellation)."""
        if self._state is _State.FINISHED:
            log.warning("service: done() called twice for a request of pid %d",
                        self.credentials.pid)
            return
        assert self._service is not None
        await self._service._finish(self, answer)


class _RequestStream:
    """The agent's view of the queue; while one is open the service has a consumer."""

    def __init__(self, service: HandshakeService) -> None:
        self._service = service
        self._open = True
        service._consumers += 1

    def __aiter__(self) -> _RequestStream:
        return self

    async def __anext__(self) -> ServiceRequest:
        service = self._service
        while self._open:
            item = service._take()
            if item is not None:
                return item
            if service._closing:
                break
            service._wakeup.clear()
            await service._wakeup.wait()
        self._release()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._service._consumers -= 1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release()


class HandshakeService:
    """Listen on an AF_UNIX SEQPACKET socket and queue handshake requests for the agent.

    Use as ``async with HandshakeService(path) as service:`` (or ``await start()`` /
    ``await close()``) and consume :meth:`requests`.

    ``mode``/``group``: permissions of the socket file (who may submit); ``limits``: the
    totals and each uid's share (:class:`~ktlsd.settings.ServiceLimits`; default its
    defaults); ``pending_limit`` (requests queued but not yet taken before EAGAIN; default the
    kernel's) and ``submit_wait`` (seconds a new connection may stay silent) override those
    two of ``limits``.
    """

    name = "service"

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_SERVICE_PATH,
        *,
        mode: int = DEFAULT_SERVICE_MODE,
        group: int | str | None = None,
        limits: ServiceLimits | None = None,
        pending_limit: int | None = None,
        submit_wait: float | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.mode = mode
        self.group = group
        limits = limits or ServiceLimits()
        if pending_limit is not None:
            limits = dataclasses.replace(limits, pending_limit=pending_limit)
        if submit_wait is not None:
            limits = dataclasses.replace(limits, submit_timeout_ms=round(submit_wait * 1000))
        self.limits = _checked(limits)
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        # Queued requests per uid; the dict's order is the round-robin order of the uids.
        self._queues: dict[int, collections.deque[ServiceRequest]] = {}
        self._queued = 0
        self._in_flight: set[ServiceRequest] = set()
        self._in_flight_by_uid: collections.Counter[int] = collections.Counter()
        self._by_socket: dict[tuple[int, int], ServiceRequest] = {}
        self._connections: dict[asyncio.Task[None], int] = {}  # connection task -> uid
        self._connections_by_uid: collections.Counter[int] = collections.Counter()
        # Connections a front is reading (front id -> our copy and its credentials).
        self.front: ServiceFront | None = None
        self._handed: dict[int, tuple[socket.socket, ConsumerCredentials]] = {}
        self._watched: set[ServiceRequest] = set()  # front-read requests' connections
        self._reading: set[ServiceRequest] = set()  # ... with a reader registered
        self._answering: set[asyncio.Task[None]] = set()  # ... answered when there is room
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._consumers = 0
        self._closing = False
        self.counters: collections.Counter[str] = collections.Counter()
        self.status_provider: StatusProvider | None = None
        """Makes the STATUS report (JSON) for root; None: STATUS answers EOPNOTSUPP."""

    # -- public state ----------------------------------------------------------------

    @property
    def pending_limit(self) -> int:
        """Requests queued (all uids) before EAGAIN."""
        return self.limits.pending_limit or default_pending_limit()

    @property
    def pending(self) -> int:
        """Requests submitted but not yet taken by the agent."""
        return self._queued

    def pending_of(self, uid: int) -> int:
        """Requests of ``uid`` queued, not yet taken by the agent."""
        return len(self._queues.get(uid, ()))

    def in_flight_of(self, uid: int) -> int:
        """Requests of ``uid`` taken by the agent and not yet answered."""
        return self._in_flight_by_uid[uid]

    def connections_of(self, uid: int) -> int:
        """Service connections ``uid`` holds open."""
        return self._connections_by_uid[uid]

    def configure(self, settings: AgentSettings) -> None:
        """Apply new limits (SIGHUP): at once for admission; what a uid already holds beyond a
        lowered share is kept until it ends."""
        limits = _checked(settings.service_limits)
        if limits != self.limits:
            self.limits = limits
            log.info("service: limits now %s", _describe(limits))
        self._wakeup.set()  # a larger in-flight share may let queued requests go

    @property
    def in_flight(self) -> int:
        """Requests taken by the agent and not yet answered with done()."""
        return len(self._in_flight)

    @property
    def connections(self) -> int:
        """Service connections open now (waiting, queued or in flight): those this process
        serves, those a front is reading and those of requests a front read (each once)."""
        return len(self._connections) + len(self._handed) + len(self._watched)

    def refused(self) -> dict[str, int]:
        """Requests refused before the agent took them, by the status they got (errno
        name; ``dropped``: closed without an answer at ``service_max_connections``)."""
        out = {name: self.counters[name] for name in ("EAGAIN", "EBUSY", "ESRCH")
               if self.counters[name]}
        if self.counters["invalid"]:
            out["EINVAL"] = self.counters["invalid"]
        if self.counters["overloaded"]:
            out["dropped"] = self.counters["overloaded"]
        return out

    @property
    def serving(self) -> bool:
        return self._listener is not None and not self._closing

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> HandshakeService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind the socket (atomically replacing a stale one) and start accepting."""
        if self._listener is not None:
            raise RuntimeError("service already started")
        listener = _bind_listener(self.path, self.mode, self.group)
        self._listener = listener
        self._inode = os.stat(self.path).st_ino
        self._accept_task = asyncio.create_task(self._accept_loop(), name="ktlsd-service-accept")
        log.info("service: listening on %s (mode %o, pending limit %d; %s)",
                 self.path, self.mode, self.pending_limit, _describe(self.limits))

    def requests(self) -> AsyncIterator[ServiceRequest]:
        """Requests in submission order. While the returned iterator is open (from this
        call until it ends or is closed), the service counts as served; with no open
        iterator every submit gets ESRCH, as the kernel answers when nobody listens."""
        return _RequestStream(self)

    async def close(self) -> None:
        """Stop accepting (new submits: ESRCH), answer queued requests ESRCH, end
        :meth:`requests`. In-flight requests keep their connections and get their DONE."""
        if self._closing:
            return
        self._closing = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            self._listener.close()
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        while self._queues:
            item = self._unqueue_first()
            await self._answer_and_release(
                item, HandshakeDone(errno.ESRCH, -1, reason="handshake service is shutting down")
            )
        self._wakeup.set()
        log.info("service: closed (%d in flight)", len(self._in_flight))

    async def wait_closed(self) -> None:
        """After :meth:`close`, wait until every in-flight request has been answered."""
        while self._in_flight or self._connections or self._handed or self._watched:
            self._idle.clear()
            await self._idle.wait()

    # -- connections ------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self._closing:
                    return
                log.warning("service: accept failed: %s", exc.strerror or exc)
                await asyncio.sleep(0.05)  # EMFILE and friends: do not spin
                continue
            conn.setblocking(False)
            if self.connections >= self.limits.max_connections:
                self.counters["overloaded"] += 1
                log.warning("service: too many connections (%d), dropping one",
                            self.limits.max_connections)
                conn.close()
                continue
            try:
                creds = peer_credentials(conn)
            except OSError:
                creds = ConsumerCredentials(0, -1, -1)
            if self._connections_by_uid[creds.uid] >= self.limits.uid_max_connections:
                self._refuse_connection(conn, creds)
                continue
            front_id = self.front.take_connection(conn, creds) if self.front else None
            self._connections_by_uid[creds.uid] += 1
            if front_id is not None:
                self._handed[front_id] = (conn, creds)
                continue
            self._connection_task(self._serve(conn, creds), creds.uid)

    def _connection_task(self, work: Coroutine[Any, Any, None], uid: int) -> None:
        """Run the task that owns a connection (already counted for ``uid``)."""
        task = asyncio.create_task(work)
        self._connections[task] = uid
        task.add_done_callback(self._connection_ended)

    # -- connections a front reads ------------------------------------------------------

    def unread(self, front_id: int) -> bool:
        """Whether a front still reads the connection ``front_id`` (no SUBMIT reported)."""
        return front_id in self._handed

    def front_requests(self) -> set[int]:
        """The front ids of the requests a front read that are still queued or in flight
        here (each will reach the agent or :meth:`ServiceFront.drop`)."""
        return {item.front_id for item in self._watched
                if item.front_id is not None and item._state is not _State.FINISHED}

    def _from_front(self, front_id: int) -> tuple[socket.socket, ConsumerCredentials] | None:
        return self._handed.pop(front_id, None)

    def admit_from_front(self, front_id: int, seq: int, identity: tuple[int, int],
                         request: HandshakeRequest, peer_label: str) -> None:
        """The front read a SUBMIT it can run (decoded and checked there; ``request`` holds
        what admission and the log line need, ``sockfd`` -1): admit and queue it as one read
        here, or answer the refusal on our copy and tell the front to drop it."""
        handed = self._from_front(front_id)
        if handed is None:  # we closed it meanwhile
            if self.front is not None:
                self.front.drop(front_id)
            return
        conn, creds = handed
        item = ServiceRequest(request=request, credentials=creds, _service=self, _conn=conn,
                              _seq=seq, _identity=identity, front_id=front_id,
                              peer_label=peer_label)
        refusal = self._admission(identity, creds)
        if refusal is not None:
            status, reason = refusal
            item._state = _State.FINISHED
            self._drop_at_front(item)
            self._watched.add(item)
            self._answer_then_close(item, encode_error_done(status, reason, seq=seq))
            return
        # Watched by a reader callback, not a task: the consumer leaving (or sending
        # anything more) cancels the request, as for one read here -- once it waits in the
        # queue: the agent usually takes it at once and its worker watches it from then on
        # (a consumer gone meanwhile is seen there, the socket's end of file stays).
        self._watched.add(item)
        self._queue(item)
        asyncio.get_running_loop().call_soon(self._watch_if_queued, item)

    def _watch_if_queued(self, item: ServiceRequest) -> None:
        if item._state is _State.QUEUED and item._conn is not None:
            self._reading.add(item)
            asyncio.get_running_loop().add_reader(item._conn.fileno(), self._front_conn_event,
                                                  item)

    def _front_conn_event(self, item: ServiceRequest) -> None:
        """Our copy of a front-read request's connection is readable: the consumer left or
        broke protocol (what :meth:`_watch` does for one read here)."""
        assert item._conn is not None
        try:
            received = recv_message_now(item._conn, 16)
        except OSError:
            received = (b"", [], 0)
        if received is None:
            return
        data, fds, _ = received
        self._unwatch(item)
        self._consumer_moved(item, data, fds)

    def hand_watch_to_front(self, item: ServiceRequest) -> None:
        """The front runs ``item`` from now on and watches the consumer itself (it answers
        the consumer, which then closes its end: only the front can tell that from a
        withdrawal). Our copy stays open, to answer if the front dies."""
        self._stop_reading(item)

    def _stop_reading(self, item: ServiceRequest) -> None:
        if item in self._reading:
            self._reading.discard(item)
            assert item._conn is not None
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(item._conn.fileno())

    def _unwatch(self, item: ServiceRequest) -> None:
        """Stop watching a front-read request's connection and close our copy (once); the
        front forgets the request too (:meth:`ServiceFront.drop` again is harmless)."""
        if item not in self._watched:
            return
        self._watched.discard(item)
        self._drop_at_front(item)
        self._stop_reading(item)
        assert item._conn is not None
        item._conn.close()
        self._uncount(item.credentials.uid)
        self._maybe_idle()

    def _answer_then_close(self, item: ServiceRequest, message: bytes) -> None:
        """Send ``message`` on a front-read request's connection, then close it."""
        assert item._conn is not None
        try:
            item._conn.send(message)
        except (BlockingIOError, InterruptedError):  # rare: finish in a task
            async def later() -> None:
                assert item._conn is not None
                try:
                    await _try_send(item._conn, message)
                finally:
                    self._unwatch(item)

            # The item stays watched (counted, waited for by wait_closed) until later()
            # has sent; the task is only kept alive here.
            task = asyncio.get_running_loop().create_task(later())
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)
            return
        except OSError:
            pass
        self._unwatch(item)

    def forward_from_front(self, front_id: int, data: bytes, fds: list[int], flags: int) -> None:
        """The front passes a SUBMIT on for this process to serve (key updates, kept sessions,
        anything it does not run itself, malformed ones)."""
        handed = self._from_front(front_id)
        if handed is None:
            for fd in fds:
                _close_fd(fd)
            return
        conn, creds = handed
        self._connection_task(self._serve_received(conn, creds, data, fds, flags), creds.uid)

    def abandon_from_front(self, front_id: int, reason: str | None = None, *,
                           rejected: bool = False) -> None:
        """The front will not serve this connection: it sent nothing in time, or left, or
        sent a malformed SUBMIT that the front answered (``rejected``; counted as here), all
        closed quietly (``reason`` None); or the front died (EIO with ``reason``)."""
        if rejected:
            self.counters["invalid"] += 1
        handed = self._from_front(front_id)
        if handed is None:
            return
        conn, creds = handed
        # A SUBMIT the front never read must go first: closing a SEQPACKET socket with unread
        # messages resets the consumer's end, which then never sees the answer.
        with contextlib.suppress(OSError):
            while (unread := recv_message_now(conn)) is not None and (unread[0] or unread[1]):
                for fd in unread[1]:
                    _close_fd(fd)
        if reason is not None:
            with contextlib.suppress(OSError):
                conn.send(encode_error_done(errno.EIO, reason))
        conn.close()
        self._uncount(creds.uid)
        self._maybe_idle()

    def _refuse_connection(self, conn: socket.socket, creds: ConsumerCredentials) -> None:
        """A uid at its connection share: answer EAGAIN at once (without reading what it
        sent; closing the connection frees any descriptor it passed) and close."""
        limit = self.limits.uid_max_connections
        reason = f"too many handshake service connections of uid {creds.uid} ({limit})"
        self.counters["EAGAIN"] += 1
        self.counters["uid connections"] += 1
        log.info("service: pid %d uid %d: connection refused: %s", creds.pid, creds.uid, reason)
        with contextlib.suppress(OSError):  # non-blocking; a fresh connection has room
            conn.send(encode_error_done(errno.EAGAIN, reason))
        conn.close()

    def _uncount(self, uid: int) -> None:
        self._connections_by_uid[uid] -= 1
        if self._connections_by_uid[uid] <= 0:
            del self._connections_by_uid[uid]

    def _connection_ended(self, task: asyncio.Task[None]) -> None:
        uid = self._connections.pop(task, None)
        if uid is not None:
            self._uncount(uid)
        if not task.cancelled() and task.exception() is not None:
            log.error("service: connection handler failed: %r", task.exception())
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not (self._in_flight or self._connections or self._handed or self._watched):
            self._idle.set()

    async def _serve(self, conn: socket.socket, creds: ConsumerCredentials) -> None:
        """One consumer connection: receive SUBMIT, admit or refuse, then watch for EOF.

        This task owns ``conn`` and every descriptor received on it, and closes them when it
        ends; once a request is queued, answering it (or cancelling it) ends the task. A
        request still queued when the task ends otherwise is withdrawn.
        """
        fds: list[int] = []
        try:
            try:
                # Usually there already (consumers send it right after connecting): then
                # without a task and a timer. (While no agent has opened requests() yet, as
                # at start-up, the SUBMIT waits its turn on the loop as it always did.)
                received = recv_message_now(conn) if self._consumers else None
                if received is None:
                    received = await asyncio.wait_for(
                        recv_message(conn), self.limits.submit_timeout_ms / 1000)
                data, fds, flags = received
            except (TimeoutError, OSError):
                log.info("service: pid %d uid %d sent no request", creds.pid, creds.uid)
                return
            if not data and not fds:
                return  # connected and left
            passed, fds = fds, []  # _serve_received owns them now
            await self._serve_received(conn, creds, data, passed, flags, owns_conn=False)
        finally:
            for fd in fds:
                _close_fd(fd)
            conn.close()

    async def _serve_received(self, conn: socket.socket, creds: ConsumerCredentials,
                              data: bytes, fds: list[int], flags: int, *,
                              owns_conn: bool = True) -> None:
        """A SUBMIT received on ``conn``: check, admit and queue it, then watch the
        connection. Owns ``fds`` (and ``conn`` unless the caller keeps it)."""
        item: ServiceRequest | None = None
        try:
            if is_status_request(data):
                # Root only (checked first); its descriptors, if any, are closed below.
                await _try_send(conn, status_answer(data, fds, creds, self.status_provider))
                return
            seq = struct.unpack_from("=I", data, 8)[0] if len(data) >= 12 else 0
            try:
                check_submit_envelope(data, fds, flags)
                seq, request = decode_submit(data, fds[0])
                identity = _socket_identity(fds[0])
            except ServiceFormatError as exc:
                self.counters["invalid"] += 1
                log.warning("service: pid %d uid %d: rejected request: %s",
                            creds.pid, creds.uid, exc)
                await _try_send(conn, encode_error_done(exc.status, str(exc), seq=seq))
                return
            refusal = self._admission(identity, creds)
            if refusal is not None:
                status, reason = refusal
                await _try_send(conn, encode_error_done(status, reason, seq=seq))
                return
            item = ServiceRequest(request=request, credentials=creds, _service=self,
                                  _conn=conn, _seq=seq, _identity=identity,
                                  _watcher=asyncio.current_task(), submit_message=data)
            fds = []  # the descriptor now belongs to the request (released by _release)
            self._queue(item)
            await self._watch(item)
        finally:
            for fd in fds:
                _close_fd(fd)
            if item is not None and item._state is _State.QUEUED:
                self._withdraw(item)  # this task was cancelled with its request queued
            if owns_conn:
                conn.close()

    def _drop_at_front(self, item: ServiceRequest) -> None:
        if item.front_id is not None and self.front is not None:
            self.front.drop(item.front_id)

    def _queue(self, item: ServiceRequest) -> None:
        creds, request = item.credentials, item.request
        self._by_socket[item._identity] = item
        self._queues.setdefault(creds.uid, collections.deque()).append(item)
        self._queued += 1
        self.counters["queued"] += 1
        # Debug: the request's one log line is the agent's, when it ends.
        if log.isEnabledFor(logging.DEBUG):
            log.debug("service: pid %d uid %d gid %d submitted a %s %s request",
                      creds.pid, creds.uid, creds.gid, request.message_type.name.lower(),
                      request.auth_mode.name.lower())
        self._wakeup.set()

    def _admission(self, identity: tuple[int, int],
                   creds: ConsumerCredentials) -> tuple[int, str] | None:
        """None when a SUBMIT for the socket ``identity`` from ``creds`` may be queued; else
        the refusal's status and reason, counted and logged here (one line)."""
        refusal = self._refusal(identity, creds.uid)
        if refusal is not None:
            status, reason = refusal
            self.counters[errno.errorcode[status]] += 1
            log.info("service: pid %d uid %d: %s (%s)", creds.pid, creds.uid,
                     errno.errorcode[status], reason)
        return refusal

    def _refusal(self, identity: tuple[int, int], uid: int) -> tuple[int, str] | None:
        """The kernel's order: draining/no listener, pending limit (all uids, then the
        consumer's share), duplicate socket."""
        if self._closing:
            return errno.ESRCH, "handshake service is shutting down"
        if self._queued >= self.pending_limit:
            return errno.EAGAIN, f"too many pending handshake requests ({self.pending_limit})"
        if self.pending_of(uid) >= self.limits.uid_max_pending:
            return errno.EAGAIN, (f"too many pending handshake requests of uid {uid} "
                                  f"({self.limits.uid_max_pending})")
        if identity in self._by_socket:
            return errno.EBUSY, "this socket already has a handshake request"
        if self._consumers == 0:
            return errno.ESRCH, "no handshake agent is serving requests"
        return None

    async def _watch(self, item: ServiceRequest) -> None:
        """Wait for the consumer to go away; finishing the request cancels this wait."""
        assert item._conn is not None
        try:
            data, fds, _ = await recv_message(item._conn, 16)
        except asyncio.CancelledError:
            if item._state is _State.FINISHED:
                return  # answered: the normal end
            raise
        except OSError:
            data, fds = b"", []
        self._consumer_moved(item, data, fds)

    def _consumer_moved(self, item: ServiceRequest, data: bytes, fds: list[int]) -> None:
        """The consumer of a request left (``data`` empty) or sent more after its SUBMIT
        (``fds``: what came with it, closed here): the request is cancelled unless it was
        answered already. Queued, it is withdrawn; in flight, the agent still owns the
        socket, and done() releases it and sends nothing."""
        for fd in fds:
            _close_fd(fd)
        if item._state is _State.FINISHED:
            return
        why = "disconnected" if not data else "sent a second message"
        log.info("service: pid %d %s: request cancelled (%s)", item.credentials.pid, why,
                 item._state.value)
        self.counters["cancelled"] += 1
        if item._state is _State.QUEUED:
            self._withdraw(item)
        item.cancelled.set()

    # -- the queue ---------------------------------------------------------------------

    def _take(self) -> ServiceRequest | None:
        """The next request for the agent: round-robin between uids, skipping a uid that
        has its in-flight share; None when no queued request may start now."""
        cap = self.limits.uid_max_in_flight
        for uid in list(self._queues):
            if self._in_flight_by_uid[uid] >= cap:
                continue
            queue = self._queues.pop(uid)
            item = queue.popleft()
            if queue:
                self._queues[uid] = queue  # the uid goes to the end of the round
            self._queued -= 1
            item._state = _State.IN_FLIGHT
            self._in_flight.add(item)
            self._in_flight_by_uid[uid] += 1
            return item
        return None

    def _unqueue_first(self) -> ServiceRequest:
        uid = next(iter(self._queues))
        queue = self._queues[uid]
        item = queue.popleft()
        if not queue:
            del self._queues[uid]
        self._queued -= 1
        return item

    def _withdraw(self, item: ServiceRequest) -> None:
        """Take a queued request out of the queue and close its descriptor."""
        uid = item.credentials.uid
        queue = self._queues.get(uid)
        if queue is not None and item in queue:
            queue.remove(item)
            self._queued -= 1
            if not queue:
                del self._queues[uid]
        item.cancelled.set()
        self._release(item)

    async def _finish(self, item: ServiceRequest, answer: HandshakeDone) -> None:
        if item._state is not _State.IN_FLIGHT:
            raise RuntimeError(f"done() on a request that is {item._state.value}")
        if item.cancelled.is_set():
            self._release(item)  # like the kernel: DONE for a cancelled request is a no-op
            return
        await self._answer_and_release(item, answer)

    async def _answer_and_release(self, item: ServiceRequest, answer: HandshakeDone) -> None:
        # Close our copy first: when the consumer reads DONE it is the socket's only owner.
        self._release(item)
        if item.answered_by_front:  # the front sent DONE (after closing its own copy)
            self._unwatch(item)
            self.counters["answered"] += 1
            return
        try:
            message = encode_done_message(answer, seq=item._seq)
        except ValueError as exc:
            message = encode_error_done(errno.EIO, f"cannot encode the answer: {exc}",
                                        seq=item._seq)
        if item._conn is not None:
            await _try_send(item._conn, message)
            self.counters["answered"] += 1
        self._unwatch(item)  # a front-read request's connection
        # Ending the connection's task closes the connection.
        if item._watcher is not None and item._watcher is not asyncio.current_task():
            item._watcher.cancel()

    def _release(self, item: ServiceRequest) -> None:
        """Forget the request and close the agent's copy of the socket (once)."""
        if item._state is _State.FINISHED:
            return
        item._state = _State.FINISHED
        if item.front_id is None:
            _close_fd(item.request.sockfd)
        else:
            self._drop_at_front(item)  # the front's copies (nothing if it ran the request)
        if self._by_socket.get(item._identity) is item:
            del self._by_socket[item._identity]
        if item in self._in_flight:
            self._in_flight.discard(item)
            uid = item.credentials.uid
            self._in_flight_by_uid[uid] -= 1
            if self._in_flight_by_uid[uid] <= 0:
                del self._in_flight_by_uid[uid]
            self._wakeup.set()  # the uid may be below its share again
        self._maybe_idle()


StatusProvider = Callable[[], bytes]
"""Makes the status report (:func:`ktlsd.status.report_to_json`): called only for root."""

ROOT_ONLY = "ktlsd status is for root only"


def status_answer(data: bytes, fds: list[int], creds: ConsumerCredentials,
                  provider: StatusProvider | None) -> bytes:
    """The answer to a STATUS request (the protocol's "STATUS" section): a refusal for any
    uid but 0 before anything else is looked at; the report from ``provider`` for root."""
    if creds.uid != 0:
        log.debug("service: pid %d uid %d: status refused (not root)", creds.pid, creds.uid)
        return encode_status_answer(errno.EACCES, reason=f"{ROOT_ONLY} (uid {creds.uid})")
    try:
        seq = decode_status_request(data)
        if fds:
            raise ServiceFormatError("a STATUS request carries no descriptor")
    except ServiceFormatError as exc:
        return encode_status_answer(exc.status, reason=str(exc))
    if provider is None:
        return encode_status_answer(errno.EOPNOTSUPP, reason="no status here", seq=seq)
    try:
        return encode_status_answer(0, report=provider(), seq=seq)
    except Exception as exc:  # a broken report must not take the listener down
        log.error("service: status report failed: %s", exc)
        return encode_status_answer(errno.EIO, reason=f"status report failed: {exc}", seq=seq)


class StatusListener:
    """STATUS requests alone, on a socket only root may use (mode 0600, owner root):
    ``ktlsd status`` for an agent that runs without the handshake service.

    Each connection sends one STATUS request within ``submit_timeout`` seconds and gets one
    answer (:func:`status_answer`); at most ``max_connections`` are served at once, more
    are closed at once. Any other message gets EINVAL.
    """

    def __init__(self, path: str | os.PathLike[str], provider: StatusProvider, *,
                 submit_timeout: float = DEFAULT_SUBMIT_TIMEOUT_MS / 1000,
                 max_connections: int = 16) -> None:
        self.path = os.fspath(path)
        self.provider = provider
        self.submit_timeout = submit_timeout
        self.max_connections = max_connections
        self._listener: socket.socket | None = None
        self._inode = 0
        self._accept_task: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._listener = _bind_listener(self.path, 0o600, None)
        self._inode = os.stat(self.path).st_ino
        self._accept_task = asyncio.create_task(self._accept_loop(), name="ktlsd-status")
        log.info("status: listening on %s (root only)", self.path)

    async def close(self) -> None:
        if self._listener is None:
            return
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._listener.close()
        self._listener = None
        tasks = [t for t in (self._accept_task, *self._connections) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                log.warning("status: accept failed: %s", exc.strerror or exc)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            if len(self._connections) >= self.max_connections:
                conn.close()
                continue
            task = asyncio.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket) -> None:
        fds: list[int] = []
        try:
            try:
                creds = peer_credentials(conn)
                data, fds, _ = await asyncio.wait_for(recv_message(conn), self.submit_timeout)
            except (TimeoutError, OSError):
                return
            if not data:
                return
            if not is_status_request(data) and creds.uid == 0:
                answer = encode_status_answer(errno.EINVAL, reason="this socket answers "
                                              "STATUS requests only")
            else:
                answer = status_answer(data, fds, creds, self.provider)
            await _try_send(conn, answer)
        finally:
            for fd in fds:
                _close_fd(fd)
            conn.close()


def _bind_listener(path: str, mode: int, group: int | str | None) -> socket.socket:
    """A listening non-blocking SEQPACKET socket at ``path`` with ``mode``/``group``, bound
    under a temporary name and renamed into place (atomically replacing a stale socket):
    no moment exists where the public path is more open than ``mode``."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        if not creatable_directory(directory):
            raise FileNotFoundError(
                errno.ENOENT, f"directory {directory} does not exist (ktlsd creates only "
                "its runtime directory, $RUNTIME_DIRECTORY or /run/ktlsd)")
        os.makedirs(directory, mode=0o755, exist_ok=True)
    _check_not_served(path)
    temp = f"{path}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temp)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        listener.bind(temp)
        os.chmod(temp, mode)
        if group is not None:
            os.chown(temp, -1, _group_id(group))
        listener.listen(socket.SOMAXCONN)
        listener.setblocking(False)
        os.rename(temp, path)
    except BaseException:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    return listener


def _check_not_served(path: str) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(path)
    except OSError:
        return  # stale: replaced by the rename
    finally:
        probe.close()
    raise FileExistsError(f"another ktlsd is already listening on {path}")


def check_submit_envelope(data: bytes, fds: list[int], flags: int) -> None:
    """A SUBMIT's size and descriptor checks, before any attribute is parsed (raises
    :class:`~ktlsd.upcall.wire.ServiceFormatError`). The descriptor is inspected in place and
    stays the caller's."""
    if flags & socket.MSG_TRUNC or len(data) > MAX_MESSAGE_SIZE:
        raise ServiceFormatError(f"message too large (> {MAX_MESSAGE_SIZE} bytes)")
    if flags & socket.MSG_CTRUNC:
        raise ServiceFormatError("too many descriptors passed")
    if not fds:
        raise ServiceFormatError("SUBMIT without a socket (pass the TCP socket as SCM_RIGHTS)")
    if len(fds) > 1:
        raise ServiceFormatError(f"SUBMIT with {len(fds)} descriptors, expected exactly one")
    # Inspected in place: the descriptor stays in ``fds`` (closed by the caller on every
    # path), the socket object only borrows it and is detached, never closed.
    try:
        is_socket = stat.S_ISSOCK(os.fstat(fds[0]).st_mode)
    except OSError:
        is_socket = False
    if not is_socket:
        raise ServiceFormatError("the passed descriptor is not a socket")
    try:
        probe = socket.socket(fileno=fds[0])
    except OSError:
        raise ServiceFormatError("the passed descriptor is not a socket") from None
    try:
        if probe.family not in (socket.AF_INET, socket.AF_INET6):
            raise ServiceFormatError("the passed socket is not an IPv4/IPv6 socket")
        proto = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
        if probe.type != socket.SOCK_STREAM or proto != socket.IPPROTO_TCP:
            raise ServiceFormatError("the passed socket is not a TCP socket")
        try:
            probe.getpeername()
        except OSError:
            raise ServiceFormatError("the passed TCP socket is not connected") from None
    finally:
        probe.detach()


def _checked(limits: ServiceLimits) -> ServiceLimits:
    for name in ("max_connections", "submit_timeout_ms", "uid_max_connections",
                 "uid_max_pending", "uid_max_in_flight"):
        if getattr(limits, name) < 1:
            raise ValueError(f"service limit {name} must be at least 1")
    if limits.pending_limit < 0:
        raise ValueError("pending limit must be at least 1 (0: the kernel's rule)")
    return limits


def _describe(limits: ServiceLimits) -> str:
    return (f"per uid: {limits.uid_max_connections} connections, {limits.uid_max_pending} "
            f"pending, {limits.uid_max_in_flight} in flight; {limits.max_connections} "
            f"connections in all; SUBMIT within {limits.submit_timeout_ms} ms")


def _group_id(group: int | str) -> int:
    if isinstance(group, int):
        return group
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r} for the service socket") from None


def _socket_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


async def _try_send(conn: socket.socket, message: bytes) -> None:
    try:  # at once when the socket has room (nearly always: one answer per connection)
        conn.send(message)
        return
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:  # a vanished consumer: nothing to tell
        return
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(send_message(conn, message), 5.0)


__all__ = [
    "CancelEvent",
    "HandshakeService",
    "ServiceFront",
    "ServiceRequest",
    "StatusListener",
    "StatusProvider",
    "check_submit_envelope",
    "default_pending_limit",
    "peer_credentials",
    "status_answer",
]
