"""The agent: take accepted requests from the upcall sources, run each handshake, answer DONE.

One :class:`Agent` serves any number of :class:`~ktlsd.request.UpcallSource` objects (the
kernel's ``handshake`` family, the user-space handshake service) on one asyncio loop:

* concurrency is bounded per source: each source has its own ``max_concurrent`` slots and
  is asked for its next request only while one of them is free, so requests beyond the
  bound stay queued *in the source*, where the kernel's (or the service's) pending limit
  protects everyone, and no source's requests can take another's slots: local users of the
  service can never delay a kernel (NVMe, NFS) handshake;
* what a consumer may ask for is bounded: its timeout is clamped to
  ``max_consumer_timeout_ms`` (requests with credentials; the kernel's are its own), and a
  session is kept for later key updates only when the consumer asked for it (the kernel's
  when ``keep_kernel_sessions`` is set), within the store's per-owner and total caps;
* every request runs in its own task with nothing shared but the configuration; whatever
  happens inside — a bad peer, a missing key, a C error, a bug — ends as one DONE with a
  status and one log line, never as a crashed agent;
* DONE is sent exactly once per request, always with an explicit status.

The agent never asks which source a request came from: it reads what the request declares
(:class:`~ktlsd.request.PendingRequest`). Its :class:`~ktlsd.request.KeyDelivery` decides what
a successful handshake hands over: the session keys installed into kTLS before DONE (a kernel
consumer; the kernel then owns the encrypted connection), or the
:class:`~ktlsd.tls.session.Session` in DONE (a user-space consumer, which then runs a record
layer itself). Its credentials decide which material it may use and who owns its kept session;
its ``cancelled`` event ends the handshake early when the consumer withdraws.

The handshake step itself (:func:`run_handshake`: material, TLS handshake, kTLS install) runs
in this process, or, with a :class:`HandshakeRunner` (``ktlsd run --workers N``:
:mod:`ktlsd.workers`), in worker processes; slots, kept sessions, key updates, DONE and the
log line stay with the agent either way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ktlsd import keyring
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.request import (
    AuthMode,
    ConfigurableSource,
    HandshakeDone,
    HandshakeRequest,
    KeyDelivery,
    MessageType,
    PendingRequest,
    UpcallSource,
)
from ktlsd.session_store import KERNEL_OWNER, SessionStore
from ktlsd.session_tags import TagConfig, load_tags_directory, log_tag_config, reload_tags
from ktlsd.settings import AgentSettings
from ktlsd.status import STOPPING, RequestCounters, outcome_of
from ktlsd.tls.session import Role, Session

if TYPE_CHECKING:
    from ktlsd.keyupdate import KeyInstaller

# The TLS engine (ktlsd.tls.handshake, ktlsd.material, ktlsd.keyupdate: libssl, cryptography)
# is imported by the first request that needs it, not at start-up: ``ktlsd run`` is ready
# (and idles) without it.

log = logging.getLogger("ktlsd")

def link_keyrings(names: Sequence[str], into: int = keyring.KEY_SPEC_SESSION_KEYRING) -> list[str]:
    """Link named keyrings (``.nvme``, configured ones) into ours, as tlshd does at start.

    Returns the names that were linked; absent keyrings are normal (no nvme module loaded).
    """
    linked: list[str] = []
    for name in dict.fromkeys(n.strip() for n in names if n.strip()):  # once each, in order
        try:
            # tlshd's configuration names keyrings; a number is taken as a keyring serial.
            serial = _keyring_serial(name)
            if serial is None:
                serial = keyring.find_keyring(name)
            keyring.link_key(serial, into)
        except keyring.KeyringError as exc:
            log.debug("keyring %s not linked: %s", name, exc)
            continue
        linked.append(name)
    return linked


def _keyring_serial(name: str) -> int | None:
    """``123`` or ``0x7b`` as a serial; None for a name."""
    text = name.strip()
    try:
        value = int(text, 16) if text.lower().startswith("0x") else int(text, 10)
    except ValueError:
        return None
    return value if value > 0 else None


def forget_parsed_material() -> None:
    """Drop the certificate chains and keys parsed so far (:mod:`ktlsd.material`'s cache), as
    a reload does; nothing to drop before the first request loaded the TLS engine."""
    material = sys.modules.get("ktlsd.material")
    if material is not None:
        material.clear_material_cache()


def _peer_address(sock: socket.socket) -> str:
    try:
        peer = sock.getpeername()
    except OSError:
        return "-"
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer) or "-"


def _role(request: HandshakeRequest) -> str:
    if request.message_type in (MessageType.CLIENTHELLO, MessageType.CLIENTKEYUPDATE):
        return Role.CLIENT.value
    if request.message_type in (MessageType.SERVERHELLO, MessageType.SERVERKEYUPDATE):
        return Role.SERVER.value
    return "?"


class _KeyedLocks:
    """One asyncio lock per key, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[int, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: int) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class _Slots:
    """A counting limit whose size can change while it is in use (SIGHUP reload).

    ``asyncio.Semaphore`` cannot be resized; this one wakes waiters in order whenever a slot
    is released or the limit grows.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def acquire(self) -> None:
        while self.used >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # we were handed a slot we will not take: pass it on
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.used += 1

    def release(self) -> None:
        self.used -= 1
        self._wake()

    def resize(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.used
        for waiter in list(self._waiters):
            if free <= 0:
                break
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


@dataclass(frozen=True)
class AnsweredByWorker:
    """A handshake whose DONE the worker sent to the consumer itself (:mod:`ktlsd.workers`,
    service requests it read): what the agent still needs for the log line."""

    identity: str
    suite: str
    group: str | None = None
    signature_scheme: str | None = None
    peer_signature_scheme: str | None = None
    tags: tuple[str, ...] = ()
    """The session tags the worker put in DONE (evaluated there as :func:`_session_tags`)."""


class HandshakeRunner(Protocol):
    """Runs the CPU-heavy part of a handshake request elsewhere (:mod:`ktlsd.workers`: in
    worker processes): material, TLS handshake and, for :attr:`KeyDelivery.INSTALL_KTLS`, the
    kTLS install -- what :func:`run_handshake` does in this process. It watches
    ``pending.cancelled`` itself. Everything else stays with the agent: admission and slots,
    kept sessions, DONE and the log line."""

    async def handshake(
        self, pending: PendingRequest, settings: AgentSettings, timeout: float
    ) -> Session | AnsweredByWorker:
        """The session, or :class:`~ktlsd.errors.HandshakeError` with the DONE status;
        :class:`AnsweredByWorker` when the worker answered the consumer itself (a service
        request it read; then never one whose session is to be kept)."""
        ...


async def run_handshake(
    pending: PendingRequest, sock: socket.socket, settings: AgentSettings, timeout: float
) -> Session:
    """Material, handshake and (kernel consumers) kTLS install for one request, in this
    process: what a worker process runs for the agent (:class:`HandshakeRunner`)."""
    from ktlsd.material import Consumer, build_tls_config
    from ktlsd.tls.handshake import perform_handshake

    request = pending.request
    files = (
        settings.client_x509
        if request.message_type is MessageType.CLIENTHELLO
        else settings.server_x509
    )
    psk_keyrings = [keyring.KEY_SPEC_SESSION_KEYRING, keyring.KEY_SPEC_PROCESS_KEYRING]
    if request.keyring:
        psk_keyrings.insert(0, request.keyring)
    config = await build_tls_config(
        request, x509_files=files, groups=settings.groups, psk_keyrings=psk_keyrings,
        consumer=Consumer.from_credentials(pending.credentials),
        legacy_psk_sha384=settings.legacy_psk_sha384,
        max_file_bytes=settings.max_file_bytes,
        record_size_limit=settings.record_size_limit,
        key_log_file=settings.key_log_file,
    )
    session = await _unless_cancelled(
        pending.cancelled, perform_handshake(sock, config, timeout=timeout)
    )
    if pending.delivery is KeyDelivery.INSTALL_KTLS:
        _install_ktls(sock, session)
    return session


class Agent:
    """Serve handshake requests from the given sources until :meth:`stop`.

    ``runner`` (optional) runs the handshakes themselves in other processes
    (:class:`HandshakeRunner`); key updates and everything around a handshake stay here.
    """

    def __init__(
        self,
        settings: AgentSettings,
        sources: Sequence[UpcallSource],
        *,
        store: SessionStore | None = None,
        runner: HandshakeRunner | None = None,
        counters: RequestCounters | None = None,
        tags: TagConfig | None = None,
    ) -> None:
        self.settings = settings
        # TLS session tags (tags.d): read now, again on reload; matched per server x509 DONE.
        self.tags = tags if tags is not None else load_tags_directory(settings.tags_directory)
        self.sources = list(sources)
        # Where handshakes run: here (None), or in worker processes (ktlsd.workers).
        self.runner = runner
        # A store given by the caller keeps its own lifetime and caps; ours follows the
        # settings.
        self._own_store = store is None
        self.store = store or SessionStore(
            lifetime=settings.session_lifetime,
            max_sessions=settings.max_kept_sessions,
            max_per_owner=settings.uid_max_kept_sessions,
        )
        self._session_locks = _KeyedLocks()
        # One pool of slots per source: the kernel's are never taken by service requests.
        self._slots = {id(source): _Slots(settings.concurrency) for source in self.sources}
        self._tasks: set[asyncio.Task[HandshakeDone]] = set()
        self._consumers: list[asyncio.Task[None]] = []
        self._streams_open = 0
        self.serving = asyncio.Event()
        """Set once the agent takes requests from every source (their streams are open)."""
        self._stopping = False
        self.completed = 0
        self.failed = 0
        # Every request counted once, where it ends (``ktlsd status``; ktlsd.status).
        self.counters = counters or RequestCounters()

    @property
    def in_flight(self) -> set[asyncio.Task[HandshakeDone]]:
        """Requests being served right now."""
        return self._tasks

    def reload(self, settings: AgentSettings) -> None:
        """Use new settings for requests that start from now on (SIGHUP).

        Requests in flight keep what they started with. The concurrency bound changes at
        once: a lower bound lets running handshakes finish and takes new ones only below it.
        Sources with limits of their own (:class:`~ktlsd.request.ConfigurableSource`: the
        service's per-uid shares) get the new settings; so does the agent's own session
        store (lifetime for sessions kept from now on, caps at the next save). The log line
        names what changed (settings hold paths and numbers, never secrets).
        """
        old, self.settings = self.settings, settings
        forget_parsed_material()
        for slots in self._slots.values():
            slots.resize(settings.concurrency)
        for source in self.sources:
            if isinstance(source, ConfigurableSource):
                source.configure(settings)
        previous_tags, self.tags = self.tags, reload_tags(self.tags, settings.tags_directory)
        if self.tags is not previous_tags:  # kept: reload_tags said why
            log_tag_config(self.tags, reloaded=True)
        if self._own_store:
            # New sessions get the new lifetime; kept ones at their next key update.
            self.store.configure(lifetime=settings.session_lifetime,
                                 max_sessions=settings.max_kept_sessions,
                                 max_per_owner=settings.uid_max_kept_sessions)
        before, after = vars(old), vars(settings)
        changes = [
            f"{name} {before[name]!r} -> {after[name]!r}"
            for name in AgentSettings.__dataclass_fields__
            if before[name] != after[name]
        ]
        log.info("configuration reloaded: %s", "; ".join(changes) if changes else "no changes")

    async def run(self) -> None:
        """Consume every source until all of them end (after :meth:`stop`)."""
        self._announce_tags()
        self._consumers = [asyncio.create_task(self._consume(s)) for s in self.sources]
        try:
            await asyncio.gather(*self._consumers, return_exceptions=True)
        finally:
            await self._drain()

    def _announce_tags(self) -> None:
        """Once at start: the tag files read, and whether every source can take the tags
        (a kernel whose DONE declares no tag attribute cannot: sources say so with
        ``accepts_session_tags``)."""
        log_tag_config(self.tags)
        if not self.tags.tags:
            return
        for source in self.sources:
            if getattr(source, "accepts_session_tags", True) is False:
                log.warning("session tags: %d defined, but the %s source cannot carry them "
                            "(its DONE declares no tag attribute): not sent to its consumers",
                            len(self.tags.tags), source.name)

    async def stop(self) -> None:
        """Stop taking requests; requests in flight finish within their own timeouts."""
        if self._stopping:
            return
        self._stopping = True
        for source in self.sources:
            with contextlib.suppress(Exception):
                await source.close()
        for consumer in self._consumers:
            consumer.cancel()

    async def _drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _consume(self, source: UpcallSource) -> None:
        slots = self._slots[id(source)]
        iterator = source.requests().__aiter__()
        self._streams_open += 1
        if self._streams_open == len(self.sources):
            self.serving.set()
        while not self._stopping:
            await slots.acquire()
            try:
                pending = await iterator.__anext__()
            except (StopAsyncIteration, asyncio.CancelledError):
                slots.release()
                return
            except Exception as exc:  # a broken source must not take the agent down
                slots.release()
                log.error("upcall source %s failed: %s", source.name, exc)
                return
            if slots.used > slots.limit:
                # The bound shrank (SIGHUP) while this slot was waiting for a request: start
                # the request only once the running ones are below the new bound.
                slots.release()
                try:
                    await slots.acquire()
                except asyncio.CancelledError:
                    await self._refuse(pending, "the agent is shutting down")
                    return
            task = asyncio.create_task(self.serve(pending))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, slots))

    async def _refuse(self, pending: PendingRequest, reason: str) -> None:
        """Answer a request taken but never started: ESRCH, as for one still queued."""
        answer = HandshakeDone(status=errno.ESRCH, sockfd=pending.request.sockfd, reason=reason)
        try:
            await pending.done(answer)
        except Exception as exc:
            log.error("DONE for fd %d failed: %s", pending.request.sockfd, exc)
        self.failed += 1
        self.counters.ended(pending.source_name, STOPPING, started=False)
        self._log(pending, answer, None, "-", 0.0)

    def _finished(self, slots: _Slots, task: asyncio.Task[HandshakeDone]) -> None:
        self._tasks.discard(task)
        slots.release()

    async def serve(self, pending: PendingRequest) -> HandshakeDone:
        """Run one request to its DONE. Never raises."""
        request = pending.request
        settings = self.settings  # a reload meanwhile applies to later requests
        timeout_ms = request.timeout_ms_or(settings.default_timeout_ms)
        if pending.credentials is not None:  # a consumer's wish, within the agent's cap
            timeout_ms = min(timeout_ms, settings.max_consumer_timeout_ms)
        timeout = timeout_ms / 1000
        started = time.monotonic()
        if log.isEnabledFor(logging.DEBUG):  # its arguments cost more than the check
            log.debug(
                "request taken: source=%s role=%s auth=%s type=%s timeout=%dms in_flight=%d",
                pending.source_name, _role(request), _auth_name(request.auth_mode),
                request.message_type.name.lower(), timeout_ms, len(self._tasks),
            )
        sock: socket.socket | None = None
        session: Session | AnsweredByWorker | None = None
        cause: FailureCause | None = None
        self.counters.started(pending.source_name)
        # A service request a worker read holds its socket there, not here.
        held_by_worker: str | None = getattr(pending, "peer_label", None)
        if getattr(pending, "front_id", None) is None:
            held_by_worker = None
        try:
            if held_by_worker is None:
                sock = _borrowed_socket(request.sockfd)
            if request.message_type.is_key_update:
                assert sock is not None  # a worker never reads a key update
                answer, session = await self._key_update(pending, sock, timeout)
            else:
                answer, session = await self._handshake(pending, sock, settings, timeout)
        except HandshakeError as exc:
            cause = exc.cause
            answer = HandshakeDone(status=exc.errno, sockfd=request.sockfd, reason=exc.reason)
        except OSError as exc:
            cause = FailureCause.PROTOCOL_ERROR
            reason = f"socket: {exc.strerror or exc}"
            answer = HandshakeDone(status=errno.EIO, sockfd=request.sockfd, reason=reason)
        except Exception as exc:  # the agent keeps serving whatever went wrong here
            cause = FailureCause.PROTOCOL_ERROR
            reason = f"internal error: {type(exc).__name__}: {exc}".splitlines()[0]
            answer = HandshakeDone(status=errno.EIO, sockfd=request.sockfd, reason=reason)
        peer = _peer_address(sock) if sock is not None else (held_by_worker or "-")
        if sock is not None:
            sock.close()
        try:
            await pending.done(answer)
        except Exception as exc:
            log.error("DONE for fd %d failed: %s", request.sockfd, exc)
        if answer.status == 0:
            self.completed += 1
        else:
            self.failed += 1
        self.counters.ended(pending.source_name, outcome_of(cause))
        self._log(pending, answer, session, peer, time.monotonic() - started, settings)
        return answer

    async def _handshake(
        self, pending: PendingRequest, sock: socket.socket | None, settings: AgentSettings,
        timeout: float,
    ) -> tuple[HandshakeDone, Session | AnsweredByWorker | None]:
        request = pending.request
        if self.runner is None:
            assert sock is not None
            session = await run_handshake(pending, sock, settings, timeout)
        else:  # in a worker process, on its own copy of the socket
            result = await self.runner.handshake(pending, settings, timeout)
            if isinstance(result, AnsweredByWorker):  # DONE sent, tags in it: logged here
                return HandshakeDone(status=0, sockfd=request.sockfd, tags=result.tags), result
            session = result
        session_id = self._keep(pending, session, settings)
        return (
            HandshakeDone(
                status=0,
                sockfd=request.sockfd,
                remote_auth=_remote_auth(pending, session),
                session_id=session_id,
                session=_delivered(pending, session),
                tags=_session_tags(self.tags, request, session),
            ),
            session,
        )

    def _keep(self, pending: PendingRequest, session: Session, settings: AgentSettings) -> int:
        """Keep the session's secrets for later key updates when asked to (a consumer's
        request) or configured to (the kernel's); 0 when not kept."""
        wanted = (settings.keep_kernel_sessions if pending.credentials is None
                  else pending.request.keep_session)
        if not (settings.keep_sessions and wanted):
            return 0
        try:
            return self.store.save(session, _owner(pending))
        except (keyring.KeyringError, ValueError) as exc:
            # The connection works without it; only a later key update will need a reconnect.
            log.warning("session state not kept (key updates will need a reconnect): %s", exc)
            return 0

    async def _key_update(
        self, pending: PendingRequest, sock: socket.socket, timeout: float
    ) -> tuple[HandshakeDone, Session | None]:
        """Run a key-update request against the kept state of ``request.session_id``."""
        request = pending.request
        async with self._session_locks.hold(request.session_id):
            # Updates of one session, in both directions, run one at a time so each
            # secret advances exactly once per update.
            owner = _owner(pending)
            state = self.store.load(request.session_id, owner)
            if request.forget_session:  # the consumer's connection ended
                self.store.drop(request.session_id)
                # The answer carries the last kept state (the owner's own secrets) to a
                # consumer that gets secrets, as every successful DONE to it does; session
                # id 0: nothing is kept any more.
                answer = HandshakeDone(
                    status=0, sockfd=request.sockfd, session=_delivered(pending, state)
                )
                return answer, None
            from ktlsd.keyupdate import apply_key_update, plan_key_update

            plan = plan_key_update(
                state, request.message_type, request.key_update_type,
                request_peer=request.request_peer_update,
            )
            new_state = await apply_key_update(
                plan, _installer_for(pending, sock, state), timeout=timeout
            )
            session_id = request.session_id
            try:
                self.store.update(session_id, new_state, owner)
            except (keyring.KeyringError, ValueError) as exc:
                # The keys moved on the wire (and in kTLS) already, so the update succeeded;
                # only the next one will need a reconnect. Session id 0 says "not kept".
                log.warning("session %#x: new state not kept (it expired or was dropped "
                            "meanwhile): %s", session_id, exc)
                session_id = 0
        return (
            HandshakeDone(
                status=0,
                sockfd=request.sockfd,
                session_id=session_id,
                session=_delivered(pending, new_state),
            ),
            new_state,
        )

    def _log(
        self,
        pending: PendingRequest,
        answer: HandshakeDone,
        session: Session | AnsweredByWorker | None,
        peer: str,
        duration: float,
        settings: AgentSettings | None = None,
    ) -> None:
        settings = settings or self.settings
        request = pending.request
        if isinstance(session, AnsweredByWorker):
            identity, suite = session.identity, session.suite
        else:
            identity = session.peer.describe() if session is not None else "-"
            suite = session.suite.iana_name if session is not None else "-"
        status = "ok" if answer.status == 0 else errno.errorcode.get(answer.status, "?")
        line = (
            f"handshake source={pending.source_name} peer={_field(peer)} "
            f"peername={_field(request.peername or '-')} role={_role(request)} "
            f"auth={_auth_name(request.auth_mode)} identity={_field(identity)} suite={suite} "
            f"{_negotiated(session)}"
            f"duration={duration * 1000:.1f}ms status={answer.status} ({status})"
        )
        if answer.tags:
            line += f" tags={_field(','.join(answer.tags))}"
        if settings.key_log_file and not request.message_type.is_key_update:
            # A warning on every handshake while secrets go to a file ([ktlsd] key_log_file).
            line += f" key_log={_field(settings.key_log_file)}"
        if answer.status:
            log.warning("%s reason=%s", line, _field(answer.reason or "-"))
        elif settings.key_log_file and not request.message_type.is_key_update:
            log.warning("%s", line)
        else:
            log.info("%s", line)


def _negotiated(session: Session | AnsweredByWorker | None) -> str:
    """The key exchange group and the signature schemes (ours: which chain we sent; the
    peer's) of a completed handshake, as log line fields (``-`` for none: PSK, key update)."""
    if session is None:
        return "group=- sig=- peer_sig=- "
    return (
        f"group={_field(session.group or '-')} sig={_field(session.signature_scheme or '-')} "
        f"peer_sig={_field(session.peer_signature_scheme or '-')} "
    )


_PLAIN_FIELD = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.:-_/[]@,+=()*<>"
)


def _field(value: str) -> str:
    """One ``key=value`` field of the handshake log line, parseable and single-line.

    Identities, peer names and reasons come partly from consumers and peers (a certificate
    subject in unauthenticated mode, a peer name): values with spaces, quotes or control
    characters are double-quoted with backslash escapes, so no value can split the line,
    forge another field or start a forged log line.
    """
    if value and _PLAIN_FIELD.issuperset(value):  # in C: this runs for every request
        return value
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable() and char.isascii():
            out.append(char)
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return '"' + "".join(out) + '"'


def _session_tags(tags: TagConfig, request: HandshakeRequest, session: Session) -> tuple[str, ...]:
    """The session tags the peer earned: evaluated, as tlshd 1.4 does, only when we are the
    TLS server of an x509 handshake, on the peer's leaf certificate (a client that sent none
    earns only tags made of ``not`` filters, or of no filters)."""
    if (request.message_type is not MessageType.SERVERHELLO
            or request.auth_mode is not AuthMode.X509):
        return ()
    chain = session.peer.certificate_chain
    return tags.match(chain[0] if chain else None)


def _owner(pending: PendingRequest) -> int:
    """Who may use a kept session later: the kernel, or the consumer's uid."""
    credentials = pending.credentials
    return KERNEL_OWNER if credentials is None else credentials.uid


def _delivered(pending: PendingRequest, session: Session) -> Session | None:
    """What DONE carries: the session with its secrets only when the consumer gets them."""
    return session if pending.delivery is KeyDelivery.RETURN_SECRETS else None


async def _unless_cancelled(cancelled: asyncio.Event, work: Awaitable[Session]) -> Session:
    """Run ``work`` but give up as soon as the consumer cancels the request."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(cancelled.wait())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()  # we are being cancelled: the handshake must not outlive us
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, HandshakeError):
        await task
    raise HandshakeError(FailureCause.PEER_CLOSED, "consumer cancelled the request")


def _installer_for(pending: PendingRequest, sock: socket.socket, state: Session) -> KeyInstaller:
    """kTLS for consumers whose keys the agent installs, and for consumers that installed kTLS
    themselves (no record numbers sent); else the consumer's user-space record layer state."""
    from ktlsd.keyupdate import KtlsInstaller, UserLayerInstaller

    seqs = pending.request.record_seqs
    if pending.delivery is KeyDelivery.INSTALL_KTLS or seqs is None:
        return KtlsInstaller(sock, state.suite)
    return UserLayerInstaller(sock, state, seqs)


def _auth_name(mode: AuthMode) -> str:
    return mode.name.lower()


def _borrowed_socket(fd: int) -> socket.socket:
    """A socket object on a duplicate of the source's descriptor (the source keeps its own);
    the duplicate is closed again when it is not a socket."""
    dup = os.dup(fd)
    try:
        return socket.socket(fileno=dup)
    except BaseException:
        os.close(dup)
        raise


def _remote_auth(pending: PendingRequest, session: Session) -> tuple[int, ...]:
    """remote-auth: the PSK's serial, or (kernel consumers, which read keys by serial) a
    keyring key holding the peer's certificate. A consumer that gets the session back has
    the chain in it: no key is added for it, so consumers cannot fill root's key quota."""
    if session.peer.psk_serial is not None:
        return (session.peer.psk_serial,)
    if session.peer.certificate_chain and pending.delivery is KeyDelivery.INSTALL_KTLS:
        try:
            serial = keyring.add_key(
                "asymmetric", "", session.peer.certificate_chain[0],
                keyring.KEY_SPEC_SESSION_KEYRING,
            )
        except (keyring.KeyringError, ValueError) as exc:
            log.debug("peer certificate not added to the keyring: %s", exc)
            return ()
        return (serial,)
    return ()


def _install_ktls(sock: socket.socket, session: Session) -> None:
    """Hand the connection to kTLS: attach the ULP and install both directions' keys."""
    from ktlsd.tls import ktls

    try:
        ktls.attach_ulp(sock)
        ktls.install_tx_key(sock, session.suite, session.tx_secret, session.tx_seq)
        # The peer's record_size_limit (RFC 8449). Like tlshd 1.4 (EIO when its
        # setsockopt fails), a kernel that cannot cap its records fails the handshake, but
        # only when the peer asked for records smaller than kTLS sends.
        if not ktls.apply_record_size_limit(sock, session):
            raise HandshakeError(
                FailureCause.PROTOCOL_ERROR,
                f"peer's record_size_limit is {session.peer_record_size_limit} but this "
                "kernel cannot cap kTLS records (no TLS_TX_MAX_PAYLOAD_LEN, Linux < 6.19)",
            )
        ktls.install_rx_key(sock, session.suite, session.rx_secret, session.rx_seq)
    except OSError as exc:
        raise HandshakeError(
            FailureCause.PROTOCOL_ERROR, f"kTLS install failed: {exc.strerror or exc}"
        ) from None
