"""The request contract: the agent serves any upcall source by what its requests declare.

A third kind of source (here a minimal in-test one, standing for a key-update upcall, QUIC or a
test double) is written against :class:`~ktlsd.request.PendingRequest` alone: no source name the
agent knows, no imitation of the kernel's or the service's request classes. The agent must
honour what it declares -- the key delivery (kTLS installed vs secrets in DONE), the consumer
credentials (material it may use, owner of the kept session), the cancellation event -- and
the configured ``default_timeout_ms`` for requests without a timeout. Real sockets, a real
TLS 1.3 handshake against ktlsd's own engine on the other end, the real agent loop.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import time
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from typing import Any

import pytest

from ktlsd import keyring
from ktlsd.agent import Agent
from ktlsd.errors import HandshakeError
from ktlsd.request import (
    AuthMode,
    ConsumerCredentials,
    HandshakeDone,
    HandshakeRequest,
    InlineMaterial,
    InlinePsk,
    KeyDelivery,
    MessageType,
    UpcallSource,
)
from ktlsd.session_store import KERNEL_OWNER, SessionStore
from ktlsd.settings import AgentSettings
from ktlsd.tls import ktls
from ktlsd.tls.handshake import PskKey, TlsConfig, perform_handshake
from ktlsd.tls.session import Role, Session
from tests.agent_helpers import LogLines, parse_handshake_line, tcp_pair

IDENTITY = b"third-source-test"
PSK = bytes(range(32))
TCP_ULP = 31


class ThirdRequest:
    """A pending request of a third kind of source: only what the protocol declares."""

    def __init__(self, request: HandshakeRequest, *, credentials: ConsumerCredentials | None,
                 delivery: KeyDelivery) -> None:
        self.request = request
        self.source_name = "third"
        self.credentials = credentials
        self.delivery = delivery
        self.cancelled = asyncio.Event()
        self.answer: asyncio.Future[HandshakeDone] = asyncio.get_running_loop().create_future()

    async def done(self, answer: HandshakeDone) -> None:
        os.close(self.request.sockfd)  # the socket goes back: our copy closes
        self.answer.set_result(answer)


class ThirdSource:
    """An upcall source fed by the test: requests are queued by :meth:`submit`."""

    name = "third"

    def __init__(self) -> None:
        self._queue: asyncio.Queue[ThirdRequest | None] = asyncio.Queue()

    def submit(self, pending: ThirdRequest) -> None:
        self._queue.put_nowait(pending)

    async def requests(self) -> AsyncIterator[ThirdRequest]:
        while (pending := await self._queue.get()) is not None:
            yield pending

    async def close(self) -> None:
        self._queue.put_nowait(None)


def run(coro: Coroutine[Any, Any, Any], limit: float = 60.0) -> Any:
    return asyncio.run(asyncio.wait_for(coro, limit))


@pytest.fixture
def store() -> Iterator[SessionStore]:
    """Kept sessions in a keyring of the test's own, revoked afterwards."""
    ring = keyring.add_key("keyring", f"ktlsd-contract-test-{os.getpid()}-{time.monotonic_ns()}",
                           None, keyring.KEY_SPEC_SESSION_KEYRING)
    try:
        yield SessionStore(keyring_id=ring, lifetime=120)
    finally:
        keyring.revoke_key(ring)
        keyring.unlink_key(ring, keyring.KEY_SPEC_SESSION_KEYRING)


def client_request(sock: socket.socket, **fields: Any) -> HandshakeRequest:
    """The agent as TLS client with an inline PSK (what the engine on the other end knows)."""
    return HandshakeRequest(
        sockfd=os.dup(sock.fileno()), message_type=MessageType.CLIENTHELLO,
        auth_mode=AuthMode.PSK,
        inline=InlineMaterial(psk_keys=(InlinePsk(identity=IDENTITY, key=PSK),)), **fields,
    )


async def engine_server(sock: socket.socket) -> Session:
    """ktlsd's own TLS engine as the peer, knowing the one PSK."""
    key = PskKey(identity=IDENTITY, key=PSK)
    config = TlsConfig(role=Role.SERVER, psk_lookup=lambda identity: key
                       if identity == IDENTITY else None)
    return await perform_handshake(sock, config, timeout=20)


def third_agent(settings: AgentSettings, store: SessionStore | None = None
                ) -> tuple[Agent, ThirdSource]:
    """The real agent with the third source as its only source (typed as the protocol: the
    source and its requests must satisfy it under mypy, with no base class to lean on)."""
    source = ThirdSource()
    sources: Sequence[UpcallSource] = [source]
    return Agent(settings, sources, store=store), source


async def serve_one(agent: Agent, source: ThirdSource, pending: ThirdRequest) -> HandshakeDone:
    running = asyncio.create_task(agent.run())
    try:
        source.submit(pending)
        return await asyncio.wait_for(asyncio.shield(pending.answer), 30)
    finally:
        await agent.stop()
        await asyncio.wait_for(running, 30)


def ulp_of(sock: socket.socket) -> bytes:
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_ULP, 16).rstrip(b"\0")


def test_secrets_back_to_a_consumer_that_owns_its_kept_session(store: SessionStore) -> None:
    """RETURN_SECRETS with credentials: DONE carries the session (the peer's secrets), no kTLS
    is attached, and the kept session belongs to the declared uid, not to the kernel."""

    async def main() -> None:
        logs = LogLines()
        agent, source = third_agent(AgentSettings(keep_sessions=True), store)
        me = ConsumerCredentials(os.getpid(), os.getuid(), os.getgid())
        a, b = tcp_pair()
        with a, b, logs.attached():
            pending = ThirdRequest(client_request(a, keep_session=True), credentials=me,
                                   delivery=KeyDelivery.RETURN_SECRETS)
            peer = asyncio.create_task(engine_server(b))
            answer = await serve_one(agent, source, pending)
            peer_session = await peer
            assert answer.status == 0, answer.reason
            assert answer.session is not None
            assert answer.session.client_secret == peer_session.client_secret
            assert answer.session.server_secret == peer_session.server_secret
            assert ulp_of(a) == b""  # the agent installed nothing
            assert answer.session_id != 0
            assert store.load(answer.session_id, os.getuid()).suite == peer_session.suite
            with pytest.raises(HandshakeError):
                store.load(answer.session_id, KERNEL_OWNER)
            fields = parse_handshake_line("ktlsd: INFO " + logs.handshake_lines()[0])
            assert fields["source"] == "third" and fields["status"] == "0"

    run(main())


def test_install_ktls_delivery_gives_no_secrets_back() -> None:
    """INSTALL_KTLS, whatever the source is called: the agent installs the keys into kTLS on
    the socket and DONE carries no session; where the kernel has no kTLS (this host) the
    install is attempted and fails with EIO, still without secrets in DONE."""

    async def main() -> None:
        agent, source = third_agent(AgentSettings(keep_sessions=False))
        a, b = tcp_pair()
        with a, b:
            pending = ThirdRequest(client_request(a), credentials=None,
                                   delivery=KeyDelivery.INSTALL_KTLS)
            peer = asyncio.create_task(engine_server(b))
            answer = await serve_one(agent, source, pending)
            await peer
            assert answer.session is None
            if ktls.probe().usable:
                assert answer.status == 0, answer.reason
                assert ulp_of(a) == b"tls"
            else:
                assert answer.status == errno.EIO
                assert "kTLS install failed" in answer.reason

    run(main())


def test_only_a_secrets_consumer_gets_the_kept_state_when_forgetting_it(
    store: SessionStore,
) -> None:
    """Ending a kept session answers with its last state only under RETURN_SECRETS: under
    INSTALL_KTLS DONE carries no secrets on this path either. Both forget the state."""

    async def main() -> None:
        a, b = tcp_pair()
        with a, b:
            client = TlsConfig(role=Role.CLIENT,
                               psk_keys=(PskKey(identity=IDENTITY, key=PSK),))
            kept, _ = await asyncio.gather(perform_handshake(a, client, timeout=20),
                                           engine_server(b))
        for delivery, returned in ((KeyDelivery.INSTALL_KTLS, False),
                                   (KeyDelivery.RETURN_SECRETS, True)):
            session_id = store.save(kept, KERNEL_OWNER)
            agent, source = third_agent(AgentSettings(keep_sessions=True), store)
            a, b = tcp_pair()
            with a, b:
                request = HandshakeRequest(
                    sockfd=os.dup(a.fileno()), message_type=MessageType.CLIENTKEYUPDATE,
                    auth_mode=AuthMode.UNSPEC, session_id=session_id, forget_session=True)
                pending = ThirdRequest(request, credentials=None, delivery=delivery)
                answer = await serve_one(agent, source, pending)
            assert answer.status == 0, answer.reason
            if returned:
                assert answer.session is not None
                assert answer.session.client_secret == kept.client_secret
            else:
                assert answer.session is None
            with pytest.raises(HandshakeError):
                store.load(session_id, KERNEL_OWNER)

    run(main())


def test_declared_credentials_bound_the_material() -> None:
    """An unprivileged uid declared by the request may not use a key it does not own; the
    same request without credentials (the kernel: trusted) may."""

    async def main() -> None:
        serial = keyring.add_key("user", IDENTITY.decode(), PSK, keyring.KEY_SPEC_SESSION_KEYRING)
        try:
            stranger = ConsumerCredentials(os.getpid(), 4242, 4242)
            for credentials, status in ((stranger, errno.ENOKEY), (None, 0)):
                agent, source = third_agent(AgentSettings(keep_sessions=False))
                a, b = tcp_pair()
                with a, b:
                    request = HandshakeRequest(
                        sockfd=os.dup(a.fileno()), message_type=MessageType.CLIENTHELLO,
                        auth_mode=AuthMode.PSK, peer_identities=(serial,))
                    pending = ThirdRequest(request, credentials=credentials,
                                           delivery=KeyDelivery.RETURN_SECRETS)
                    peer = asyncio.create_task(engine_server(b)) if status == 0 else None
                    answer = await serve_one(agent, source, pending)
                    assert answer.status == status, answer.reason
                    if peer is not None:
                        await peer
                    else:
                        assert "does not belong to uid 4242" in answer.reason
        finally:
            keyring.revoke_key(serial)
            keyring.unlink_key(serial, keyring.KEY_SPEC_SESSION_KEYRING)

    run(main())


def test_the_declared_cancellation_ends_the_handshake() -> None:
    async def main() -> None:
        agent, source = third_agent(AgentSettings(keep_sessions=False))
        a, b = tcp_pair()
        with a, b:  # b never answers: only the cancellation can end this request early
            b.setblocking(False)
            pending = ThirdRequest(client_request(a, timeout_ms=600_000), credentials=None,
                                   delivery=KeyDelivery.RETURN_SECRETS)
            running = asyncio.create_task(agent.run())
            try:
                source.submit(pending)
                while not agent.in_flight:
                    await asyncio.sleep(0)
                assert await asyncio.get_running_loop().sock_recv(b, 1)  # ClientHello sent
                pending.cancelled.set()
                answer = await asyncio.wait_for(asyncio.shield(pending.answer), 30)
            finally:
                await agent.stop()
                await asyncio.wait_for(running, 30)
            assert answer.status == errno.ETIMEDOUT
            assert "consumer cancelled the request" in answer.reason

    run(main())


def test_requests_without_a_timeout_get_the_configured_default() -> None:
    """``default_timeout_ms`` from the settings applies when the request carries none; a
    request's own timeout wins."""

    async def main() -> None:
        for settings_ms, request_ms, reason in ((250, 0, "within 0.25 s"),
                                                (250, 300, "within 0.3 s")):
            agent, source = third_agent(
                AgentSettings(keep_sessions=False, default_timeout_ms=settings_ms))
            a, b = tcp_pair()
            with a, b:  # b never answers
                pending = ThirdRequest(client_request(a, timeout_ms=request_ms),
                                       credentials=None, delivery=KeyDelivery.RETURN_SECRETS)
                answer = await serve_one(agent, source, pending)
                assert answer.status == errno.ETIMEDOUT
                assert reason in answer.reason, answer.reason

    run(main())
