"""Handshake worker processes: every CPU for the handshakes, one process for everything else.

``ktlsd run --workers N`` (``[ktlsd] workers``) runs the TLS handshakes themselves in N worker
processes. The agent's own process -- the *supervisor* -- keeps everything that must exist
once: the upcall sources (the kernel's ACCEPT and DONE, the service socket with its per-uid
admission, queues and consumer connections), the agent's slots per source, kept sessions
(the store with its caps, key updates and their per-session locks), each request's DONE and
its log line. A worker runs what costs CPU: the request's material (files read with the
consumer's rights, keyring keys), the TLS handshake and, for a kernel consumer, the kTLS
install. The supervisor's :class:`~ktlsd.agent.Agent` hands those to a :class:`WorkerPool`
(its :class:`~ktlsd.agent.HandshakeRunner`); everything else is the single-process agent,
unchanged.

One request
===========

1. The agent takes a request from its source, within its slots and (service) the uid's
   in-flight share, exactly as without workers. (Most service requests take the shorter
   path below.)
2. The pool picks the worker with the fewest requests in flight (a service request that
   names files to read with an unprivileged consumer's rights always goes to worker
   ``uid % N``, so the per-uid cap on file reads in flight, stuck ones included, holds
   across workers) and sends it a JOB: the request (encoded with
   :func:`ktlsd.upcall.wire.encode_submit`), the consumer's credentials, how the keys are
   delivered and the timeout, with a duplicate of the TCP socket as ``SCM_RIGHTS``. Before
   a worker's first job under new settings it gets them (CONFIGURE), so a request runs with
   the settings it started under, as in one process.
3. The worker runs :func:`ktlsd.agent.run_handshake` on its copy of the socket, closes that
   copy, and answers RESULT: the status, a reason, and on success the
   :class:`~ktlsd.tls.session.Session` (encoded as the service's DONE,
   :func:`ktlsd.upcall.wire.encode_done_message`).
4. The supervisor keeps the session if asked (one store, global caps), sends the one DONE --
   the kernel's from the process that ACCEPTed and still holds the socket, the service's to
   the consumer's connection -- and logs the one line.

A consumer that withdraws its request (``cancelled``) makes the pool send CANCEL; the worker
ends the handshake and answers, as the in-process agent would.

Service requests: read and answered by the workers
==================================================

For the handshake service (``ktlsd run`` attaches the pool to it, :meth:`WorkerPool.
serve_service`), the per-request work that does not have to happen once -- reading and
checking the SUBMIT, decoding it, encoding and sending DONE -- runs in the workers too, so
that the supervisor's share of a request is small (one supervisor would otherwise cap the
rate whatever the number of workers):

1. The service accepts the connection and applies the connection caps (per uid, in all), as
   without workers, then hands a copy of it to the least loaded worker (CONN, the consumer's
   credentials with the descriptor) and keeps its own copy.
2. The worker reads the SUBMIT (within ``submit_timeout_ms``), checks and decodes it. A
   malformed one it answers itself (EINVAL, as the service would) and reports ABANDON. A key
   update, a request whose session is to be kept, or an unprivileged consumer's request that
   names files (per-uid read caps: worker ``uid % N``) it passes on unchanged (FORWARD, with
   the TCP socket): the supervisor serves those as any it read itself (steps above). Any
   other request it keeps, with its socket and material, and reports ADMIT: the sequence
   number, the socket's identity and what the agent's timeout and log line need.
3. The service admits and queues it exactly as one it read (ESRCH, pending limits, the uid's
   share, EBUSY; the "submitted" line), on its own copy of the connection, which it then
   watches for the consumer going away; a refusal it answers there, and tells the worker to
   DROP its copies (as when the request is withdrawn while queued).
4. The agent takes it within its slots and the uid's in-flight share, as any request; the
   pool sends GO to the worker holding it (after CONFIGURE when needed) and logs "request
   handed to ...". From then on the worker watches the consumer (leaving cancels the
   handshake), not the supervisor: a consumer closes its end once it has DONE, which only
   the worker can tell from a withdrawal. The worker runs the handshake, closes the TCP
   socket, sends DONE to the consumer itself -- with the session tags the peer earned,
   evaluated as the agent does on ``tags_directory``, which the worker reads on its first
   CONFIGURE and again on each later one (a reload; kept when unreadable, as the agent keeps
   them) -- and answers RESULT with the flag "answered" and the log line's fields (peer
   identity, suite, the tags sent). On failure it answers RESULT with the status, and the
   supervisor sends DONE on its copy, as for a JOB.
5. The agent logs the one line; the service releases the request without sending anything.

A worker that dies: every request it had admitted is answered EIO by the supervisor on its
own copy of the connection (running ones at once, queued ones when the agent takes them), and
every connection it had not yet reported is answered EIO there too (after the unread SUBMIT
is drained: closing a SEQPACKET socket with unread messages would reset the consumer's end).
A worker that reports nothing on a connection within ``submit_timeout_ms`` plus
:data:`WORKER_GRACE` is taken for stuck and killed. A connection that sends nothing in time
is logged by the worker as the service logs one it reads ("service: pid P uid U sent no
request").

One race is left, on a crash only: a worker that dies after sending its success DONE to the
consumer and before its RESULT reaches the supervisor. The supervisor cannot tell that from
a death before the DONE, so it answers EIO on its own copy of the connection, logs the
request as failed (EIO, the worker's death as the reason) and counts it so. The consumer
got the success DONE first: the first message on a service connection is the answer, and
:func:`ktlsd.client.submit` reads exactly one message and closes the connection, so it
reports success (its TCP socket carries the established session); the EIO after it is never
read (or not even delivered, when the consumer has closed its end already). A consumer of
its own that keeps reading would see it second, and must take the first.

Crashes
=======

A worker that dies (killed, crashed, or stuck past a request's timeout plus
:data:`WORKER_GRACE` seconds, when the pool kills it) closes its end of the channel. The pool
then waits until the process is gone -- so its copies of the sockets are closed -- and
answers each of its requests in flight ``EIO`` with the reason ("handshake worker 1 (pid
1234) was killed by signal 9 (SIGKILL)"); the agent sends those DONEs as for any failure.
Nothing is lost silently. A new worker starts in its place (after a pause that doubles, up to
:data:`MAX_RESPAWN_DELAY`, while workers keep dying young); requests wait for a live worker
within their own timeout.

Why the kernel's requests go through the supervisor too: the kernel gives a request to
whichever process ACCEPTs it and installs the socket in *that* process's descriptor table;
DONE names the socket by descriptor number, looked up in the *sender's* table
(``sockfd_lookup()`` in ``handshake_nl_done_doit()``), and nothing in ``net/handshake``
notices a handler that goes away: an accepted request has no timer, and a closed netlink
socket or descriptor does not complete it. If a worker ACCEPTed for itself and died
mid-handshake, the request would stay accepted until the consumer's own handshake timeout
cancelled it (``handshake_req_cancel()``), with no DONE. ACCEPT and DONE in the supervisor,
the handshake in a worker on a passed duplicate, gives every kernel request its DONE with a
status, the same as a service request.

Reload: the supervisor re-reads the configuration (SIGHUP); the next job each worker gets
carries the new settings first. The number of workers is read at start only.

Shutdown: workers ignore SIGTERM, SIGINT, SIGHUP and SIGUSR1 (a service manager signals the
whole control group; the supervisor drains): they finish what they were given and exit when
the supervisor closes their channel (or dies).

The channel
===========

One ``AF_UNIX`` ``SOCK_SEQPACKET`` socket pair per worker, private to the two processes; the
worker is a new interpreter running :func:`worker_main` (``python -c ... --channel FD``),
started fresh (never a fork of the multi-threaded supervisor). Each message is a 16-byte header
(:data:`_HEADER`: kind u8, flags u8, reserved u16, aux u32, job u64; host byte order) and a
payload:

=========  =========  ==========================================================
kind       direction  payload
=========  =========  ==========================================================
HELLO      worker     aux = :data:`PROTOCOL_VERSION`; sent once at start
CONFIGURE  pool       the :class:`~ktlsd.settings.AgentSettings` as JSON
JOB        pool       aux = timeout in ms; flags: 1 install kTLS, 2 credentials;
                      [pid i32, uid i32, gid i32, n u16, n groups u32]; SUBMIT;
                      one descriptor (the TCP socket)
CANCEL     pool       none: the consumer withdrew job ``job``
RESULT     worker     DONE (status, reason, session) for job ``job``; aux = the
                      :class:`~ktlsd.errors.FailureCause` of a failure (its position
                      in the enum, from 1; 0: success or none), so the supervisor
                      counts it by cause (EACCES alone does not say which); with
                      flags 1 (answered) only the log line's fields: peer identity,
                      suite, group, our and the peer's signature schemes, the
                      session tags sent (comma-separated; each a u16 size and text)
CONN       pool       job = connection id, aux = submit_timeout_ms; the consumer's
                      credentials; one descriptor (the service connection)
ADMIT      worker     for connection ``job``: seq u32, socket dev u64, ino u64,
                      timeout ms u32, type u8, auth u8, peername (u16 size, text),
                      the TCP peer's address
FORWARD    worker     for connection ``job``: the SUBMIT (or STATUS) as received
                      (flags: 1 it was truncated, 2 its descriptors were); the
                      first descriptor that came with it (a SUBMIT's TCP socket)
ABANDON    worker     connection ``job`` sent no usable SUBMIT (flags: 1 a malformed
                      one, which the worker answered)
GO         pool       aux = timeout in ms; connection id u64: run it as job ``job``
DROP       pool       forget connection ``job`` (refused or withdrawn)
=========  =========  ==========================================================

The channel carries the requests' inline keys and the sessions' traffic secrets between the
two processes only; nothing of it is logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import itertools
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ktlsd.agent import (
    AnsweredByWorker,
    _peer_address,
    _remote_auth,
    _session_tags,
    run_handshake,
)
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.request import (
    AuthMode,
    ConsumerCredentials,
    HandshakeDone,
    HandshakeRequest,
    InlineMaterial,
    KeyDelivery,
    MessageType,
    PendingRequest,
)
from ktlsd.session_tags import TagConfig, load_tags_directory, reload_tags
from ktlsd.settings import AgentSettings, ServiceLimits
from ktlsd.tls.session import Session
from ktlsd.upcall.service import (
    CancelEvent,
    HandshakeService,
    ServiceRequest,
    _socket_identity,
    _try_send,
    check_submit_envelope,
)
from ktlsd.upcall.wire import (
    MAX_MESSAGE_SIZE,
    ServiceFormatError,
    decode_done_message,
    decode_submit,
    encode_done_message,
    encode_error_done,
    encode_submit,
    is_status_request,
    recv_message,
    recv_message_now,
    send_message,
)

log = logging.getLogger("ktlsd.workers")

PROTOCOL_VERSION = 2
"""HELLO's version: 2 since service connections are read by the workers (CONN ... DROP, and
RESULT's aux and flags)."""
WORKER_GRACE = 2.0
"""Seconds past a request's timeout before the pool takes its worker for stuck and kills it
(less than the consumer library's own grace, so the consumer hears the EIO)."""
START_TIMEOUT = 60.0
"""Seconds a new worker has to say HELLO."""
MIN_UPTIME = 5.0
"""A worker that dies younger than this is respawned only after a pause."""
MAX_RESPAWN_DELAY = 30.0
EXIT_GRACE = 5.0
"""Seconds a worker has to exit after its channel is closed, before it is killed."""

_HEADER = struct.Struct("=BBHIQ")
_CREDENTIALS = struct.Struct("=iiiH")
_MAX_GROUPS = 65535
_BUFFER = 2 * MAX_MESSAGE_SIZE + 4096  # a JOB: header, credentials and a SUBMIT
_ANCBUF = socket.CMSG_SPACE(4 * 4)  # room to notice (and close) stray descriptors

HELLO, CONFIGURE, JOB, CANCEL, RESULT = 1, 2, 3, 4, 5
_Result = tuple[int, int, bytes]
"""A RESULT as the pool keeps it: (flags, aux = cause code, the payload)."""
CONN, ADMIT, FORWARD, ABANDON, GO, DROP = 6, 7, 8, 9, 10, 11
_ADMIT = struct.Struct("=IQQIBBH")  # seq, socket dev, ino, timeout ms, type, auth, peername len
_FRONT_ID = struct.Struct("=Q")
_ANSWERED_FIELD = struct.Struct("=H")  # the size of each text field of an answered RESULT
_ANSWERED = 1  # RESULT flag: the worker sent DONE to the consumer itself
_TRUNCATED, _CTRUNCATED = 1, 2  # FORWARD flags: how the worker's recvmsg saw the SUBMIT
_REJECTED = 1  # ABANDON flag: the worker answered a malformed SUBMIT (EINVAL)

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKER_PROGRAM = (
    # The same ktlsd as the supervisor's: its directory is searched first only when the
    # interpreter would not search it anyway (a source tree), never ahead of the standard
    # library for an installed package.
    "import sys; path = sys.argv.pop(1)\n"
    "if path not in sys.path: sys.path.insert(0, path)\n"
    "from ktlsd.workers import worker_main; sys.exit(worker_main(sys.argv[1:]))"
)
_INSTALL_KTLS, _HAS_CREDENTIALS = 1, 2


class WorkerStartError(RuntimeError):
    """Worker processes could not be started; ``str()`` is one line saying why."""


# --- the channel's codec (pure) ------------------------------------------------------------


def encode_settings(settings: AgentSettings) -> bytes:
    """The settings as JSON (plain values: paths, numbers, names; the one secret that can be
    there, a ``pin-value`` in a ``pkcs11:`` key URI, crosses only this root-only channel)."""
    return json.dumps(dataclasses.asdict(settings), separators=(",", ":")).encode()


def decode_settings(data: bytes) -> AgentSettings:
    """The inverse of :func:`encode_settings`."""
    settings: AgentSettings = _from_plain(AgentSettings, json.loads(data))
    return settings


def _from_plain(cls: Any, raw: dict[str, Any]) -> Any:
    """A (frozen) dataclass from ``dataclasses.asdict`` output: nested dataclasses rebuilt
    from their field defaults' types, lists back to tuples."""
    values: dict[str, Any] = {}
    for item in dataclasses.fields(cls):
        if item.name not in raw:
            continue
        value = raw[item.name]
        if item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = item.default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = _from_plain(type(default), value)
        elif isinstance(value, list):
            value = tuple(value)
        values[item.name] = value
    return cls(**values)


def encode_job(job: int, pending: PendingRequest, timeout_ms: int) -> bytes:
    """A JOB message for ``pending`` (its socket travels as SCM_RIGHTS)."""
    flags = _INSTALL_KTLS if pending.delivery is KeyDelivery.INSTALL_KTLS else 0
    credentials = b""
    if pending.credentials is not None:
        flags |= _HAS_CREDENTIALS
        credentials = _encode_credentials(pending.credentials)
    timeout_ms = max(1, min(timeout_ms, 0xFFFFFFFF))
    # A service request's SUBMIT as its consumer sent it (ServiceRequest.submit_message): the
    # same request, not encoded a second time; the kernel's are encoded here.
    submit = getattr(pending, "submit_message", b"") or encode_submit(pending.request)
    return _HEADER.pack(JOB, flags, 0, timeout_ms, job) + credentials + submit


def _encode_credentials(creds: ConsumerCredentials) -> bytes:
    groups = creds.groups[:_MAX_GROUPS]
    return (_CREDENTIALS.pack(creds.pid, creds.uid, creds.gid, len(groups))
            + struct.pack(f"={len(groups)}I", *groups))


def _decode_credentials(payload: bytes) -> tuple[ConsumerCredentials, int]:
    """The credentials at the start of ``payload`` and where they end."""
    if len(payload) < _CREDENTIALS.size:
        raise ServiceFormatError("message too short for its credentials")
    pid, uid, gid, count = _CREDENTIALS.unpack_from(payload)
    end = _CREDENTIALS.size + 4 * count
    if len(payload) < end:
        raise ServiceFormatError("message too short for its groups")
    groups = struct.unpack_from(f"={count}I", payload, _CREDENTIALS.size)
    return ConsumerCredentials(pid, uid, gid, tuple(groups)), end


def encode_admit(front_id: int, seq: int, identity: tuple[int, int],
                 request: HandshakeRequest, peer_label: str) -> bytes:
    """ADMIT: what the supervisor needs of a request a worker read (its material stays in the
    worker): admission (the socket's identity), the agent's timeout and log line."""
    peername = (request.peername or "").encode()[:0xFFFF]
    return (_HEADER.pack(ADMIT, 0, 0, 0, front_id)
            + _ADMIT.pack(seq, identity[0], identity[1], max(0, request.timeout_ms),
                          int(request.message_type), int(request.auth_mode), len(peername))
            + peername + peer_label.encode("utf-8", "backslashreplace"))


def decode_admit(payload: bytes) -> tuple[int, tuple[int, int], HandshakeRequest, str]:
    """The inverse of :func:`encode_admit` (after the header): seq, socket identity, the
    request as the supervisor sees it (``sockfd`` -1, no material) and the peer's address."""
    if len(payload) < _ADMIT.size:
        raise ServiceFormatError("ADMIT too short")
    seq, dev, ino, timeout_ms, message_type, auth_mode, size = _ADMIT.unpack_from(payload)
    end = _ADMIT.size + size
    if len(payload) < end:
        raise ServiceFormatError("ADMIT too short for its peer name")
    peername = payload[_ADMIT.size:end].decode("utf-8", "replace") or None
    request = HandshakeRequest(sockfd=-1, message_type=MessageType(message_type),
                               auth_mode=AuthMode(auth_mode), timeout_ms=timeout_ms,
                               peername=peername)
    return seq, (dev, ino), request, payload[end:].decode("utf-8", "replace")


@dataclass
class _WorkerRequest:
    """A JOB as the worker sees it: what :func:`ktlsd.agent.run_handshake` reads."""

    request: HandshakeRequest
    credentials: ConsumerCredentials | None
    delivery: KeyDelivery
    timeout_ms: int
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    source_name: str = "worker"

    async def done(self, answer: HandshakeDone) -> None:
        raise RuntimeError("a worker never answers a request itself; the supervisor does")


def decode_job(flags: int, aux: int, payload: bytes, sockfd: int) -> _WorkerRequest:
    """Parse a JOB's payload; ``sockfd`` is the descriptor that came with it.

    Raises :class:`~ktlsd.upcall.wire.ServiceFormatError` (one line) when it does not parse.
    """
    credentials: ConsumerCredentials | None = None
    offset = 0
    if flags & _HAS_CREDENTIALS:
        credentials, offset = _decode_credentials(payload)
    _, request = decode_submit(payload[offset:], sockfd)
    delivery = (KeyDelivery.INSTALL_KTLS if flags & _INSTALL_KTLS
                else KeyDelivery.RETURN_SECRETS)
    return _WorkerRequest(request, credentials, delivery, aux)


def _cause(status: int) -> FailureCause:
    """The failure cause for a DONE status (EACCES: the first of its two causes)."""
    for cause in FailureCause:
        if cause.errno == status:
            return cause
    return FailureCause.PROTOCOL_ERROR


_CAUSES = tuple(FailureCause)


def cause_code(cause: FailureCause | None) -> int:
    """RESULT's aux: the cause's position in :class:`~ktlsd.errors.FailureCause` from 1;
    0 for none."""
    return 0 if cause is None else _CAUSES.index(cause) + 1


def _cause_from_code(code: int) -> FailureCause | None:
    return _CAUSES[code - 1] if 1 <= code <= len(_CAUSES) else None


def describe_exit(returncode: int | None) -> str:
    """``exited with status 3`` / ``was killed by signal 9 (SIGKILL)``."""
    if returncode is None:
        return "is gone"
    if returncode < 0:
        try:
            name = f" ({signal.Signals(-returncode).name})"
        except ValueError:
            name = ""
        return f"was killed by signal {-returncode}{name}"
    return f"exited with status {returncode}"


def _received_fds(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % 4
            fds.extend(struct.unpack(f"={usable // 4}i", cdata[:usable]))
    return fds


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --- the supervisor's side ---------------------------------------------------------------------


class _Worker:
    """One worker process and the supervisor's end of its channel."""

    def __init__(self, index: int, process: asyncio.subprocess.Process,
                 channel: socket.socket) -> None:
        self.index = index
        self.process = process
        self.pid = process.pid
        self.channel = channel
        self.started = time.monotonic()
        self.jobs: dict[int, asyncio.Future[_Result]] = {}
        self.fronts: set[int] = set()  # service connections it holds, not yet running
        self.configured: AgentSettings | None = None
        self.send_lock = asyncio.Lock()
        self.hello = asyncio.get_running_loop().create_future()
        self.ready = False  # said HELLO, not yet gone
        self.started_serving = False  # said HELLO once
        self.gone = False
        self.kill_reason = ""

    @property
    def name(self) -> str:
        return f"worker {self.index} (pid {self.pid})"

    def kill(self, reason: str) -> None:
        if not self.gone and not self.kill_reason:
            self.kill_reason = reason
            log.error("%s %s; killing it", self.name, reason)
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


class WorkerPool:
    """N worker processes running handshakes for the agent (a
    :class:`~ktlsd.agent.HandshakeRunner`); see the module docstring.

    ``await start()`` starts them (raises :class:`WorkerStartError`); ``await close()`` stops
    them once the agent has drained.
    """

    def __init__(self, count: int, *, python: str = sys.executable) -> None:
        if count < 1:
            raise ValueError("a worker pool needs at least one worker")
        self.count = count
        self.python = python
        self.workers: list[_Worker | None] = [None] * count
        self.respawned = 0
        self._jobs = itertools.count(1)
        self._changed = asyncio.Event()  # a worker became ready or went away
        self._next = 0
        self._closing = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._delays = [0.0] * count
        # Service connections read by the workers (see "Service requests" above).
        self._service: HandshakeService | None = None
        self._front_ids = itertools.count(1)
        self._fronts: dict[int, _Worker] = {}  # held by a worker, not yet running there
        self._front_timers: dict[int, asyncio.TimerHandle] = {}
        self._lost_fronts: dict[int, str] = {}  # admitted, but their worker died

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Start every worker and wait for each one's HELLO."""
        try:
            await asyncio.gather(*(self._spawn(i) for i in range(self.count)))
        except BaseException:
            await self.close()
            raise
        log.info("worker processes: %d (pids %s)", self.count,
                 ", ".join(str(w.pid) for w in self.workers if w is not None))

    @property
    def pids(self) -> list[int]:
        """The live workers' process ids (tests, status)."""
        return [w.pid for w in self.workers if w is not None and not w.gone]

    def serve_sources(self, sources: Iterable[object]) -> None:
        """:meth:`serve_service` for the handshake service among ``sources``, if any."""
        for source in sources:
            if isinstance(source, HandshakeService):
                self.serve_service(source)

    def serve_service(self, service: HandshakeService) -> None:
        """Let the workers read and run ``service``'s requests (its front, see "Service
        requests" above); admission, the queue and the log line stay with ``service`` and
        the agent here."""
        self._service = service
        service.front = self

    def take_connection(self, conn: socket.socket, creds: ConsumerCredentials) -> int | None:
        """:class:`~ktlsd.upcall.service.ServiceFront`: a copy of ``conn`` to the least loaded
        worker; its id, or None when no worker can take it now (then the service reads it)."""
        if self._closing:
            return None
        worker = self._least_loaded()
        if worker is None:
            return None
        front_id = next(self._front_ids)
        limits = self._service.limits if self._service is not None else ServiceLimits()
        message = (_HEADER.pack(CONN, 0, 0, limits.submit_timeout_ms, front_id)
                   + _encode_credentials(creds))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("=i", conn.fileno()))]
        try:
            worker.channel.sendmsg([message], anc)
        except OSError:  # the channel is full or broken: this process reads it
            return None
        worker.fronts.add(front_id)
        self._fronts[front_id] = worker
        self._front_timers[front_id] = asyncio.get_running_loop().call_later(
            limits.submit_timeout_ms / 1000 + WORKER_GRACE, self._front_late, front_id)
        return front_id

    def _front_late(self, front_id: int) -> None:
        self._front_timers.pop(front_id, None)
        worker = self._fronts.get(front_id)
        if worker is not None and self._service is not None and self._service.unread(front_id):
            worker.kill(f"did not answer service connection {front_id} in time")

    def _front_reported(self, front_id: int) -> _Worker | None:
        timer = self._front_timers.pop(front_id, None)
        if timer is not None:
            timer.cancel()
        return self._fronts.get(front_id)

    def _front_gone(self, front_id: int) -> _Worker | None:
        """Forget that a worker holds ``front_id``; the worker it was, if any."""
        self._front_reported(front_id)
        worker = self._fronts.pop(front_id, None)
        if worker is not None:
            worker.fronts.discard(front_id)
        return worker

    def drop(self, front_id: int) -> None:
        """:class:`~ktlsd.upcall.service.ServiceFront`: the service answered or withdrew the
        request before its worker ran it; the worker closes its copies."""
        self._lost_fronts.pop(front_id, None)
        worker = self._front_gone(front_id)
        if worker is None or worker.gone:
            return
        message = _HEADER.pack(DROP, 0, 0, 0, front_id)
        try:
            # At once, the usual case (its order among other messages does not matter).
            worker.channel.send(message)
        except (BlockingIOError, InterruptedError):
            # The channel is full: in turn with the other senders, for a lost DROP would
            # leave the worker holding the connection and the TCP socket.
            self._send_later(worker, message)
        except OSError:
            pass  # broken: the worker is going away, and its copies with it

    def _send_later(self, worker: _Worker, message: bytes) -> None:
        """Send ``message`` to ``worker`` in turn with the other senders (a task: the channel
        is full or another send is waiting); nothing when the channel breaks meanwhile."""

        async def send() -> None:
            with contextlib.suppress(OSError):
                async with worker.send_lock:
                    if not worker.gone:
                        await send_message(worker.channel, message)

        task = asyncio.get_running_loop().create_task(send())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _spawn(self, index: int) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setblocking(False)
            env = {k: v for k, v in os.environ.items()
                   if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")}
            # The supervisor's interpreter options (-X importtime, -B, -I, ...), as
            # multiprocessing's spawn passes them.
            options = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
            process = await asyncio.create_subprocess_exec(
                self.python, *options, "-c", _WORKER_PROGRAM, _PACKAGE_PARENT,
                "--channel", str(theirs.fileno()),
                "--index", str(index), "--log-level", _log_level(),
                "--log-to", ",".join(_log_destinations()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(theirs.fileno(),), env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        worker = _Worker(index, process, ours)
        self.workers[index] = worker
        asyncio.get_running_loop().add_reader(ours.fileno(), self._readable, worker)
        watcher = asyncio.create_task(self._watch(worker))
        self._tasks.add(watcher)
        watcher.add_done_callback(self._tasks.discard)
        try:
            version = await asyncio.wait_for(asyncio.shield(worker.hello), START_TIMEOUT)
        except TimeoutError:
            worker.kill(f"said nothing within {START_TIMEOUT:g} s of starting")
            raise WorkerStartError(f"{worker.name} did not start in time") from None
        except WorkerStartError:
            raise
        if version != PROTOCOL_VERSION:
            worker.kill(f"speaks protocol {version}, not {PROTOCOL_VERSION}")
            raise WorkerStartError(f"{worker.name} speaks another protocol version "
                                   f"({version}; a different ktlsd installed meanwhile?)")
        worker.ready = worker.started_serving = True
        self._changed.set()
        log.info("%s started", worker.name)
        return worker

    async def close(self) -> None:
        """Stop respawning; close every channel (workers exit when it ends) and reap them."""
        self._closing = True
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            if worker is not None and not worker.gone:
                with contextlib.suppress(Exception):
                    loop.remove_reader(worker.channel.fileno())
                with contextlib.suppress(OSError):
                    worker.channel.shutdown(socket.SHUT_RDWR)
        for worker in self.workers:
            if worker is None:
                continue
            try:
                await asyncio.wait_for(worker.process.wait(), EXIT_GRACE)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.kill()
                await worker.process.wait()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    # -- the channel -----------------------------------------------------------------------

    def _readable(self, worker: _Worker) -> None:
        while True:
            try:
                data, ancdata, _, _ = worker.channel.recvmsg(
                    _BUFFER, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancdata = b"", []
            fds = _received_fds(ancdata)  # only a FORWARD passes one
            if not data:
                _close_fds(fds)
                self._lost(worker)
                return
            if len(data) < _HEADER.size:
                _close_fds(fds)
                worker.kill("sent a malformed message")
                continue
            kind, flags, _, aux, job = _HEADER.unpack_from(data)
            if kind == FORWARD and self._fronts.get(job) is worker:
                self._front_gone(job)
                assert self._service is not None
                msg_flags = ((socket.MSG_TRUNC if flags & _TRUNCATED else 0)
                             | (socket.MSG_CTRUNC if flags & _CTRUNCATED else 0))
                self._service.forward_from_front(job, data[_HEADER.size:], fds, msg_flags)
                continue
            _close_fds(fds)
            if kind == RESULT:
                future = worker.jobs.pop(job, None)
                if future is not None and not future.done():
                    future.set_result((flags, aux, data[_HEADER.size:]))
            elif kind == ADMIT and self._fronts.get(job) is worker:
                self._front_reported(job)
                assert self._service is not None
                try:
                    seq, identity, request, peer = decode_admit(data[_HEADER.size:])
                except (ServiceFormatError, ValueError):
                    worker.kill("sent a malformed ADMIT")
                    continue
                self._service.admit_from_front(job, seq, identity, request, peer)
            elif kind == ABANDON and self._fronts.get(job) is worker:
                self._front_gone(job)
                assert self._service is not None
                self._service.abandon_from_front(job, rejected=bool(flags & _REJECTED))
            elif kind == HELLO and not worker.hello.done():
                worker.hello.set_result(aux)
            else:
                worker.kill(f"sent an unexpected message (kind {kind})")

    def _lost(self, worker: _Worker) -> None:
        """The worker's end of the channel closed: it exited, or is about to."""
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(worker.channel.fileno())
        worker.ready = False
        self._changed.set()
        if not self._closing:
            # Usually it died; if it closed the channel but lives on, it may still hold
            # sockets: make sure it is gone. (Not at once: signalling reaps a dead child
            # first, and its exit status would be lost to the watcher.)
            task = asyncio.get_running_loop().create_task(self._reap_later(worker))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _reap_later(self, worker: _Worker) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(worker.process.wait()), EXIT_GRACE)
            return
        worker.kill("closed its channel")

    async def _watch(self, worker: _Worker) -> None:
        """Wait for the process to end; answer its jobs; start another one."""
        returncode = await worker.process.wait()
        worker.gone = True
        worker.ready = False
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(worker.channel.fileno())
        worker.channel.close()
        how = describe_exit(returncode)
        reason = f"{worker.name} {how}"
        if worker.kill_reason:
            reason += f" ({worker.kill_reason})"
        if not worker.hello.done():
            worker.hello.set_exception(WorkerStartError(reason))
        jobs = list(worker.jobs.values())
        worker.jobs.clear()
        for future in jobs:
            if not future.done():
                future.set_exception(HandshakeError(FailureCause.PROTOCOL_ERROR,
                                                    f"handshake {reason}"))
        lost_fronts = 0
        admitted = self._service.front_requests() if self._service is not None else set()
        for front_id in sorted(worker.fronts):
            self._front_gone(front_id)
            lost_fronts += 1
            if self._service is not None and self._service.unread(front_id):
                self._service.abandon_from_front(front_id, f"handshake {reason}")
            elif front_id in admitted:
                # Admitted and queued: answered EIO when the agent takes it. The entry goes
                # then, or when the service forgets the request (drop()); anything else
                # has nothing left to answer.
                self._lost_fronts[front_id] = reason
        self._changed.set()
        if self._closing or not worker.started_serving:
            if returncode and self._closing:
                log.warning("%s", reason)
            return
        log.error("%s; %d requests in flight on it answered EIO; starting another",
                  reason, len(jobs) + lost_fronts)
        if worker.started_serving:  # else its spawner is told, and retries or gives up
            await self._respawn(worker)

    async def _respawn(self, dead: _Worker) -> None:
        index = dead.index
        young = time.monotonic() - dead.started < MIN_UPTIME
        delay = min(MAX_RESPAWN_DELAY, max(1.0, 2 * self._delays[index])) if young else 0.0
        self._delays[index] = delay
        while not self._closing:
            if delay:
                log.warning("worker %d: starting again in %.0f s", index, delay)
                await asyncio.sleep(delay)
            try:
                await self._spawn(index)
                self.respawned += 1
                return
            except (WorkerStartError, OSError) as exc:
                log.error("worker %d could not be started: %s", index, exc)
                delay = min(MAX_RESPAWN_DELAY, max(1.0, 2 * delay))
                self._delays[index] = delay

    # -- running a handshake --------------------------------------------------------------

    async def _pick(self, pending: PendingRequest, deadline: float) -> _Worker:
        """A ready worker for this request; waits (until ``deadline``) while none is."""
        loop = asyncio.get_running_loop()
        affinity = _file_reader_uid(pending)
        while True:
            if affinity is not None:
                candidate = self.workers[affinity % self.count]
                chosen = candidate if candidate is not None and candidate.ready else None
            else:
                chosen = self._least_loaded()
            if chosen is not None:
                return chosen
            if self._closing:
                raise HandshakeError(FailureCause.PROTOCOL_ERROR,
                                     "the handshake workers are shutting down")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise HandshakeError(FailureCause.PROTOCOL_ERROR,
                                     "no handshake worker available (restarting)")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def _least_loaded(self) -> _Worker | None:
        best: _Worker | None = None
        for offset in range(self.count):
            worker = self.workers[(self._next + offset) % self.count]
            if worker is None or not worker.ready:
                continue
            if best is None or (len(worker.jobs) + len(worker.fronts)
                                < len(best.jobs) + len(best.fronts)):
                best = worker
        if best is not None:
            self._next = (best.index + 1) % self.count
        return best

    async def handshake(
        self, pending: PendingRequest, settings: AgentSettings, timeout: float
    ) -> Session | AnsweredByWorker:
        """Run ``pending``'s handshake in a worker; the session, or HandshakeError."""
        if pending.cancelled.is_set():
            raise HandshakeError(FailureCause.PEER_CLOSED, "consumer cancelled the request")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout + WORKER_GRACE
        if isinstance(pending, ServiceRequest) and pending.front_id is not None:
            return await self._run_at_front(pending, pending.front_id, settings, deadline)
        while True:
            worker = await self._pick(pending, deadline)
            delivered = await self._deliver(worker, pending, settings, deadline)
            if delivered is not None:
                job, future = delivered
                break
            # The channel broke before the job got through (the worker is dying): the job
            # is not lost, another worker takes it.
        log.debug("request handed to %s (job %d, %d in flight there)", worker.name, job,
                  len(worker.jobs))
        try:
            _, cause_code, payload = await self._answer(worker, job, future, pending, deadline)
        except asyncio.CancelledError:
            self._cancel(worker, job)
            worker.jobs.pop(job, None)
            raise
        return _session_from(cause_code, payload)

    async def _run_at_front(self, pending: ServiceRequest, front_id: int,
                            settings: AgentSettings, deadline: float,
                            ) -> Session | AnsweredByWorker:
        """GO for a request the worker holding it read; that worker answers the consumer on
        success (unless the session is to be kept, which a worker never takes on)."""
        loop = asyncio.get_running_loop()
        worker = self._front_gone(front_id)
        if worker is None or worker.gone:
            reason = self._lost_fronts.pop(front_id, None) or "worker is gone"
            raise HandshakeError(FailureCause.PROTOCOL_ERROR, f"handshake {reason}")
        job = next(self._jobs)
        remaining_ms = round(max(0.0, deadline - loop.time() - WORKER_GRACE) * 1000)
        future: asyncio.Future[_Result] = loop.create_future()
        worker.jobs[job] = future
        message = (_HEADER.pack(GO, 0, 0, max(1, min(remaining_ms, 0xFFFFFFFF)), job)
                   + _FRONT_ID.pack(front_id))
        try:
            sent = False
            if worker.configured is settings and not worker.send_lock.locked():
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    worker.channel.send(message)  # at once: nothing to wait for
                    sent = True
            if not sent:
                async with worker.send_lock:
                    if worker.configured is not settings:
                        await self._configure(worker, settings)
                    await send_message(worker.channel, message)
        except OSError as exc:
            worker.jobs.pop(job, None)
            if not future.done():
                future.cancel()
            # Only that worker has the socket: nobody else can run the request.
            raise HandshakeError(FailureCause.PROTOCOL_ERROR,
                                 f"handshake {worker.name}: channel broken "
                                 f"({exc.strerror or exc})") from None
        except asyncio.CancelledError:
            self._cancel(worker, job)
            worker.jobs.pop(job, None)
            raise
        log.debug("request handed to %s (job %d, %d in flight there)", worker.name, job,
                  len(worker.jobs))
        if self._service is not None:
            self._service.hand_watch_to_front(pending)
        try:
            flags, cause_code, payload = await self._answer(worker, job, future, pending,
                                                            deadline)
        except asyncio.CancelledError:
            self._cancel(worker, job)
            worker.jobs.pop(job, None)
            raise
        if flags & _ANSWERED:
            pending.answered_by_front = True
            return _answered_from(payload)
        return _session_from(cause_code, payload)

    async def _configure(self, worker: _Worker, settings: AgentSettings) -> None:
        level = logging.getLogger("ktlsd").getEffectiveLevel()
        await send_message(worker.channel,
                           _HEADER.pack(CONFIGURE, 0, 0, level, 0) + encode_settings(settings))
        worker.configured = settings

    async def _deliver(
        self, worker: _Worker, pending: PendingRequest, settings: AgentSettings,
        deadline: float,
    ) -> tuple[int, asyncio.Future[_Result]] | None:
        """Send the JOB (after CONFIGURE when the worker has other settings); its id and the
        future of its RESULT, or None when the channel is broken (nothing was delivered)."""
        loop = asyncio.get_running_loop()
        job = next(self._jobs)
        remaining_ms = round(max(0.0, deadline - loop.time() - WORKER_GRACE) * 1000)
        try:
            message = encode_job(job, pending, remaining_ms)
        except ValueError as exc:
            raise HandshakeError(FailureCause.INVALID_REQUEST, str(exc)) from None
        future: asyncio.Future[_Result] = loop.create_future()
        worker.jobs[job] = future
        try:
            async with worker.send_lock:
                if worker.configured is not settings:
                    await self._configure(worker, settings)
                await send_message(worker.channel, message, (pending.request.sockfd,))
        except OSError as exc:
            worker.jobs.pop(job, None)
            if future.done():  # the pool learnt of the worker's end meanwhile
                future.exception()
            else:
                future.cancel()
            log.warning("%s: channel broken (%s); the request goes to another worker",
                        worker.name, exc.strerror or exc)
            if worker.ready:
                self._lost(worker)
            return None
        except asyncio.CancelledError:
            self._cancel(worker, job)
            worker.jobs.pop(job, None)
            raise
        return job, future

    async def _answer(self, worker: _Worker, job: int, future: asyncio.Future[_Result],
                      pending: PendingRequest, deadline: float) -> _Result:
        """The worker's RESULT for ``job``; CANCEL when the consumer withdraws, the worker
        killed when it is past the deadline. One waiter woken by callbacks (this runs once
        per request in the one supervisor process, so it stays lean)."""
        loop = asyncio.get_running_loop()
        wake: asyncio.Future[None] = loop.create_future()

        def woken(_: object = None) -> None:
            if not wake.done():
                wake.set_result(None)

        future.add_done_callback(woken)
        timer = loop.call_at(deadline, woken)
        cancelled = pending.cancelled
        watcher: asyncio.Task[Any] | None = None
        if isinstance(cancelled, CancelEvent):  # a service request's: a callback, no task
            cancelled.add_callback(woken)
        else:
            watcher = loop.create_task(cancelled.wait())
            watcher.add_done_callback(woken)
        try:
            await wake
            if not future.done() and cancelled.is_set() and loop.time() < deadline:
                self._cancel(worker, job)  # the worker answers at once
                wake = loop.create_future()
                future.add_done_callback(woken)
                await wake
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.remove_done_callback(woken)
                watcher.cancel()
            elif isinstance(cancelled, CancelEvent):
                cancelled.remove_callback(woken)
        if not future.done():
            worker.kill(f"did not answer job {job} within its timeout")
            # Its jobs are answered once the process is gone.
            await asyncio.wait({future}, timeout=EXIT_GRACE + WORKER_GRACE)
        if not future.done():
            worker.jobs.pop(job, None)
            raise HandshakeError(FailureCause.PROTOCOL_ERROR,
                                 f"handshake {worker.name} did not answer")
        return _result(future)

    def _cancel(self, worker: _Worker, job: int) -> None:
        """Tell the worker its job was withdrawn (best effort; the job answers anyway)."""
        if worker.gone or job not in worker.jobs:
            return
        self._send_later(worker, _HEADER.pack(CANCEL, 0, 0, 0, job))


def _result(future: asyncio.Future[_Result]) -> _Result:
    return future.result()  # raises the HandshakeError of a worker that went away


def encode_answered(session: Session, tags: tuple[str, ...] = ()) -> bytes:
    """A RESULT's payload when the worker answered the consumer: the log line's fields
    (identity, suite, group, our and the peer's signature schemes, the session tags sent,
    comma-separated: a tag name has no comma), each u16 size + text."""
    fields = (session.peer.describe(), session.suite.iana_name, session.group or "",
              session.signature_scheme or "", session.peer_signature_scheme or "",
              ",".join(tags))
    out = bytearray()
    for text in fields:
        data = text.encode("utf-8", "backslashreplace")[:0xFFFF]
        out += _ANSWERED_FIELD.pack(len(data)) + data
    return bytes(out)


def _answered_from(payload: bytes) -> AnsweredByWorker:
    fields: list[str] = []
    pos = 0
    while len(fields) < 6:
        if pos + _ANSWERED_FIELD.size > len(payload):
            raise HandshakeError(FailureCause.PROTOCOL_ERROR,
                                 "short answer from a handshake worker")
        (size,) = _ANSWERED_FIELD.unpack_from(payload, pos)
        pos += _ANSWERED_FIELD.size
        fields.append(payload[pos:pos + size].decode("utf-8", "replace"))
        pos += size
    identity, suite, group, sig, peer_sig, tags = fields
    return AnsweredByWorker(identity, suite, group or None, sig or None, peer_sig or None,
                            tuple(tags.split(",")) if tags else ())


def _session_from(cause_code: int, payload: bytes) -> Session:
    try:
        _, done = decode_done_message(payload)
    except ServiceFormatError as exc:
        raise HandshakeError(FailureCause.PROTOCOL_ERROR,
                             f"unreadable answer from a handshake worker: {exc}") from None
    if done.status != 0:
        cause = _cause_from_code(cause_code) or _cause(done.status)
        raise HandshakeError(cause, done.reason or os.strerror(done.status))
    assert done.session is not None  # decode_done_message checks this
    return done.session


def _file_reader_uid(pending: PendingRequest) -> int | None:
    """The uid whose rights a request's files are read with, when it is an unprivileged
    consumer's (its reads in flight are capped per uid, in one process); else None."""
    return _reader_uid(pending.credentials, pending.request.inline)


def _reader_uid(credentials: ConsumerCredentials | None,
                inline: InlineMaterial | None) -> int | None:
    if credentials is None or credentials.uid == 0 or inline is None:
        return None
    if inline.certificate_file or inline.private_key_file or inline.truststore or inline.crl:
        return max(credentials.uid, 0)
    return None


# --- the worker's side -------------------------------------------------------------------------


@dataclass(eq=False)
class _Held:
    """A service connection the supervisor handed to this worker (CONN): our copy of it, the
    consumer's credentials, and once read, its request (``sockfd``: our TCP socket)."""

    conn: socket.socket
    credentials: ConsumerCredentials
    seq: int = 0
    request: HandshakeRequest | None = None

    def close(self) -> None:
        self.conn.close()
        if self.request is not None:
            _close_fds([self.request.sockfd])
            self.request = None


class _WorkerServer:
    """The worker process: jobs in, handshakes run, results out, until the channel ends."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.settings: AgentSettings | None = None
        self.tags: TagConfig | None = None  # tags.d, read on CONFIGURE
        self.jobs: dict[int, tuple[asyncio.Task[None], _WorkerRequest]] = {}
        self.held: dict[int, _Held] = {}
        self.send_lock = asyncio.Lock()
        self.ended = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await send_message(self.channel, _HEADER.pack(HELLO, 0, 0, PROTOCOL_VERSION, 0))
        loop.add_reader(self.channel.fileno(), self._readable)
        try:
            await self.ended.wait()
        finally:
            loop.remove_reader(self.channel.fileno())
        # The supervisor closed the channel (shutdown) or died: nobody will read a result.
        tasks = [task for task, _ in self.jobs.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for held in self.held.values():
            held.close()
        self.held.clear()

    def _readable(self) -> None:
        while not self.ended.is_set():
            try:
                data, ancdata, flags, _ = self.channel.recvmsg(
                    _BUFFER, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, ancdata, flags = b"", [], 0
            fds = _received_fds(ancdata)
            if not data:
                _close_fds(fds)
                self.ended.set()
                return
            try:
                self._handle(data, fds, flags)
            except Exception as exc:  # never take the worker down for one message
                _close_fds(fds)
                log.error("bad message from the supervisor: %s", exc)

    def _handle(self, data: bytes, fds: list[int], flags: int) -> None:
        if len(data) < _HEADER.size or flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            _close_fds(fds)
            log.error("truncated message from the supervisor ignored")
            return
        kind, job_flags, _, aux, job = _HEADER.unpack_from(data)
        payload = data[_HEADER.size:]
        if kind == JOB:
            self._start(job, job_flags, aux, payload, fds)
            return
        if kind == CONN:
            self._take(job, aux, payload, fds)
            return
        _close_fds(fds)
        if kind == GO:
            self._go(job, aux, payload)
            return
        if kind == DROP:
            held = self.held.pop(job, None)
            if held is not None:
                held.close()
            return
        if kind == CONFIGURE:  # at start, and after each reload
            from ktlsd.agent import forget_parsed_material

            forget_parsed_material()
            self.settings = decode_settings(payload)
            # The session tags, as the agent holds them: read at the first configuration,
            # again at each later one (a reload), kept when the directory cannot be read.
            # (The supervisor's agent logs what it read; these lines would repeat it.)
            directory = self.settings.tags_directory
            self.tags = (load_tags_directory(directory) if self.tags is None
                         else reload_tags(self.tags, directory))
            if aux:  # the supervisor's log level, which a reload may have changed
                logging.getLogger("ktlsd").setLevel(aux)
        elif kind == CANCEL:
            entry = self.jobs.get(job)
            if entry is not None:
                entry[1].cancelled.set()
        else:
            log.error("unknown message kind %d from the supervisor ignored", kind)

    def _start(self, job: int, flags: int, aux: int, payload: bytes, fds: list[int]) -> None:
        if len(fds) != 1 or self.settings is None:
            _close_fds(fds)
            why = "no configuration yet" if self.settings is None else "no socket"
            self._spawn(self._answer(job, HandshakeDone(errno.EIO, -1, reason=f"worker: {why}")))
            return
        try:
            pending = decode_job(flags, aux, payload, fds[0])
        except ServiceFormatError as exc:
            _close_fds(fds)
            self._spawn(self._answer(job, HandshakeDone(exc.status, -1, reason=str(exc))))
            return
        task = self._spawn(self._run(job, pending, self.settings))
        self.jobs[job] = (task, pending)
        task.add_done_callback(lambda _: self.jobs.pop(job, None))

    def _spawn(self, work: Any) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(work)

    # -- service connections (CONN ... ADMIT/FORWARD/ABANDON ... GO/DROP) ------------------

    def _take(self, front_id: int, submit_ms: int, payload: bytes, fds: list[int]) -> None:
        if len(fds) != 1:
            _close_fds(fds)
            log.error("CONN without exactly one connection ignored")
            return
        try:
            credentials, _ = _decode_credentials(payload)
            conn = socket.socket(fileno=fds[0])
        except (ServiceFormatError, OSError) as exc:
            _close_fds(fds)
            log.error("bad CONN from the supervisor ignored: %s", exc)
            return
        conn.setblocking(False)
        held = self.held[front_id] = _Held(conn, credentials)
        self._spawn(self._read_submit(front_id, held, submit_ms / 1000))

    async def _report(self, message: bytes, fds: tuple[int, ...] = ()) -> None:
        """One message to the supervisor: at once when the channel has room and no other
        send is waiting, else in turn."""
        if not self.send_lock.locked():
            anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(fds)}i", *fds))]
                   if fds else [])
            try:
                self.channel.sendmsg([message], anc)
                return
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return
        with contextlib.suppress(OSError):
            async with self.send_lock:
                await send_message(self.channel, message, fds)

    async def _read_submit(self, front_id: int, held: _Held, wait: float) -> None:
        """Read the SUBMIT (within ``wait`` seconds, the service's ``submit_timeout_ms``);
        ADMIT a handshake this worker can run, FORWARD anything else to the supervisor,
        answer a malformed one here; ABANDON when nothing came."""
        received: tuple[bytes, list[int], int] | None
        try:
            received = recv_message_now(held.conn)
            if received is None:
                received = await asyncio.wait_for(recv_message(held.conn), wait)
        except (TimeoutError, OSError):
            received = None
        if self.held.get(front_id) is not held:  # the supervisor dropped it meanwhile
            if received is not None:
                _close_fds(received[1])
            return
        if received is None or not (received[0] or received[1]):
            if received is None:  # the line the service logs for a connection it reads
                log.info("service: pid %d uid %d sent no request", held.credentials.pid,
                         held.credentials.uid)
            self._forget(front_id)
            await self._report(_HEADER.pack(ABANDON, 0, 0, 0, front_id))
            return
        data, fds, flags = received
        forward_flags = ((_TRUNCATED if flags & socket.MSG_TRUNC else 0)
                         | (_CTRUNCATED if flags & socket.MSG_CTRUNC else 0))
        if is_status_request(data):
            # The counters are the supervisor's: it answers (root only, checked there), and
            # refuses a STATUS with descriptors (EINVAL): they go with it, as for a SUBMIT.
            self._forget(front_id)
            await self._report(_HEADER.pack(FORWARD, forward_flags, 0, 0, front_id) + data,
                               tuple(fds[:1]))
            _close_fds(fds)
            return
        seq = struct.unpack_from("=I", data, 8)[0] if len(data) >= 12 else 0
        creds = held.credentials
        try:
            check_submit_envelope(data, fds, flags)
            seq, request = decode_submit(data, fds[0])
            identity = _socket_identity(fds[0])
        except ServiceFormatError as exc:
            _close_fds(fds)
            log.warning("service: pid %d uid %d: rejected request: %s", creds.pid, creds.uid,
                        exc)
            await _try_send(held.conn, encode_error_done(exc.status, str(exc), seq=seq))
            self._forget(front_id)
            await self._report(_HEADER.pack(ABANDON, _REJECTED, 0, 0, front_id))
            return
        if (request.message_type.is_key_update or request.keep_session
                or _reader_uid(creds, request.inline) is not None):
            # Kept sessions and key updates live in the supervisor; a consumer's file reads
            # are capped per uid in one worker (the supervisor picks it).
            self._forget(front_id)
            await self._report(_HEADER.pack(FORWARD, forward_flags, 0, 0, front_id) + data,
                               (fds[0],))
            _close_fds(fds)
            return
        held.seq, held.request = seq, request
        await self._report(encode_admit(front_id, seq, identity, request,
                                        _peer_of(request.sockfd)))

    def _forget(self, front_id: int) -> None:
        held = self.held.pop(front_id, None)
        if held is not None:
            held.close()

    def _go(self, job: int, timeout_ms: int, payload: bytes) -> None:
        front_id = _FRONT_ID.unpack_from(payload)[0] if len(payload) >= _FRONT_ID.size else 0
        held = self.held.pop(front_id, None)
        if held is None or held.request is None or self.settings is None:
            if held is not None:
                held.close()
            why = "no configuration yet" if self.settings is None else "no such request"
            self._spawn(self._answer(job, HandshakeDone(errno.EIO, -1, reason=f"worker: {why}")))
            return
        pending = _WorkerRequest(held.request, held.credentials, KeyDelivery.RETURN_SECRETS,
                                 timeout_ms)
        held.request = None  # the socket is the job's now
        # The consumer leaving cancels the handshake (the supervisor stopped watching).
        asyncio.get_running_loop().add_reader(held.conn.fileno(), self._consumer_event,
                                              held, pending)
        task = self._spawn(self._run_front(job, pending, held, self.settings))
        self.jobs[job] = (task, pending)
        task.add_done_callback(lambda _: self.jobs.pop(job, None))

    def _consumer_event(self, held: _Held, pending: _WorkerRequest) -> None:
        """The consumer of a request running here left (or sent more): cancel it, as the
        service's watch does."""
        try:
            received = recv_message_now(held.conn, 16)
        except OSError:
            received = (b"", [], 0)
        if received is None:
            return
        _close_fds(received[1])
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(held.conn.fileno())
        why = "disconnected" if not received[0] else "sent a second message"
        log.info("service: pid %d %s: request cancelled (in flight)",
                 held.credentials.pid, why)
        pending.cancelled.set()

    async def _run_front(self, job: int, pending: _WorkerRequest, held: _Held,
                         settings: AgentSettings) -> None:
        """Run a request this worker read; on success send DONE to the consumer here and
        tell the supervisor what its log line needs; on failure the supervisor answers."""
        try:
            session, answer, cause = await self._handshake(pending, settings)
        finally:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(held.conn.fileno())
        message = b""
        tags: tuple[str, ...] = ()
        if session is not None:
            try:
                # The tags the peer earned, evaluated as the agent does (settings.tags_directory
                # read on CONFIGURE); in DONE and, through the supervisor, in the log line.
                if self.tags is not None:
                    tags = _session_tags(self.tags, pending.request, session)
                message = encode_done_message(
                    HandshakeDone(status=0, sockfd=-1, remote_auth=_remote_auth(pending, session),
                                  session=session, tags=tags), seq=held.seq)
            except ValueError as exc:
                answer = HandshakeDone(errno.EIO, -1, reason=f"worker: {exc}")
        # Our copies are closed before the supervisor hears (the TCP socket already is): once
        # it has logged the request, this worker holds nothing of it.
        if session is None or not message:
            held.close()
            await self._answer(job, answer, cause)
            return
        try:
            await _try_send(held.conn, message)
        finally:
            held.close()
        await self._report(_HEADER.pack(RESULT, _ANSWERED, 0, 0, job)
                           + encode_answered(session, tags))

    async def _handshake(self, pending: _WorkerRequest, settings: AgentSettings,
                         ) -> tuple[Session | None, HandshakeDone, FailureCause | None]:
        """:func:`ktlsd.agent.run_handshake` on the request's socket, closed afterwards: the
        session, or None, the failure's DONE and its cause (None: not a HandshakeError; the
        supervisor then counts it by errno)."""
        fd = pending.request.sockfd
        sock: socket.socket | None = None
        try:
            sock = socket.socket(fileno=fd)
            session = await run_handshake(pending, sock, settings, pending.timeout_ms / 1000)
            return session, HandshakeDone(status=0, sockfd=-1, session=session), None
        except HandshakeError as exc:
            return None, HandshakeDone(status=exc.errno, sockfd=-1, reason=exc.reason), exc.cause
        except OSError as exc:
            return None, HandshakeDone(status=errno.EIO, sockfd=-1,
                                       reason=f"socket: {exc.strerror or exc}"), None
        except Exception as exc:  # the worker keeps serving whatever went wrong here
            reason = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
            return None, HandshakeDone(status=errno.EIO, sockfd=-1, reason=reason), None
        finally:
            # Closed before the answer: when the consumer gets DONE, its socket is its own.
            if sock is not None:
                sock.close()
            else:
                _close_fds([fd])

    async def _run(self, job: int, pending: _WorkerRequest, settings: AgentSettings) -> None:
        # The TLS engine is loaded by the first request, as in the single-process agent: an
        # idle worker stays small.
        _, answer, cause = await self._handshake(pending, settings)
        await self._answer(job, answer, cause)

    async def _answer(self, job: int, answer: HandshakeDone,
                      cause: FailureCause | None = None) -> None:
        try:
            done = encode_done_message(answer)
        except ValueError as exc:
            done = encode_done_message(HandshakeDone(errno.EIO, -1, reason=f"worker: {exc}"))
        await self._report(_HEADER.pack(RESULT, 0, 0, cause_code(cause), job) + done)


def _peer_of(fd: int) -> str:
    """``host:port`` of a TCP socket's peer, for the supervisor's log line."""
    try:
        probe = socket.socket(fileno=fd)
    except OSError:
        return "-"
    try:
        return _peer_address(probe)
    finally:
        probe.detach()


def _log_level() -> str:
    """The supervisor's level, for a new worker."""
    return logging.getLevelName(logging.getLogger("ktlsd").getEffectiveLevel())


def _log_destinations() -> list[str]:
    """Where the supervisor's ``ktlsd`` logger writes (:mod:`ktlsd.log_output`), so that a
    worker's lines go to the same places in the same form; stderr when it has no handler."""
    from ktlsd import log_output

    found: list[str] = []
    for handler in logging.getLogger("ktlsd").handlers:
        if isinstance(handler, log_output.SyslogHandler):
            found.append(log_output.Destination.SYSLOG.value)
        elif isinstance(handler, logging.StreamHandler):
            journal = isinstance(handler.formatter, log_output.JournalFormatter)
            found.append((log_output.Destination.JOURNAL if journal
                          else log_output.Destination.STDERR).value)
    return list(dict.fromkeys(found)) or [log_output.Destination.STDERR.value]


class _Prefix(logging.Filter):
    """``worker N: `` before each of a worker's log lines."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "ktlsd_worker", False):  # once, whatever the handlers
            record.msg = self.prefix + record.getMessage()
            record.args = ()
            record.ktlsd_worker = True
        return True


def _ignore_stop_signals() -> None:
    """The supervisor decides when a worker stops: it drains, then closes the channel."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def worker_main(argv: list[str] | None = None) -> int:
    """``--channel FD --index N``: serve one supervisor's channel (:data:`_WORKER_PROGRAM`
    calls this in a new interpreter)."""
    parser = argparse.ArgumentParser(prog="ktlsd.workers", description=__doc__.split("\n")[0])
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-to", default="stderr",
                        help="the supervisor's log destinations: journal, syslog, stderr")
    args = parser.parse_args(argv)
    _ignore_stop_signals()
    from ktlsd import log_output

    log_output.configure(args.log_level, destinations=[
        log_output.Destination(name) for name in args.log_to.split(",") if name])
    prefix = _Prefix(f"worker {args.index}: ")
    for handler in logging.getLogger("ktlsd").handlers:  # child loggers' records too
        handler.addFilter(prefix)
    channel = socket.socket(fileno=args.channel)
    channel.setblocking(False)
    os.set_inheritable(channel.fileno(), False)
    try:
        asyncio.run(_WorkerServer(channel).run())
    finally:
        channel.close()
    return 0


__all__ = [
    "PROTOCOL_VERSION",
    "WorkerPool",
    "WorkerStartError",
    "decode_settings",
    "describe_exit",
    "encode_settings",
    "worker_main",
]
