"""The user-space handshake service: wire codec, admission answers, cancellation, robustness.

Everything runs over real AF_UNIX SEQPACKET sockets with real TCP sockets on loopback passed
as SCM_RIGHTS. The "agent" here is a small in-test loop over ``service.requests()``, so the
service is tested exactly as the real agent consumes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ktlsd.request import (
    AuthMode,
    HandshakeDone,
    HandshakeRequest,
    InlineMaterial,
    InlinePsk,
    KeyUpdateType,
    MessageType,
)
from ktlsd.settings import ServiceLimits
from ktlsd.tls.session import CipherSuite, PeerIdentity, Role, Session
from ktlsd.upcall.netlink import AcceptAttr, DoneAttr, decode_accept_reply
from ktlsd.upcall.nlattr import (
    as_u32,
    decode_attrs,
    decode_genl,
    encode_attr,
    encode_genl,
    s32,
    u32,
)
from ktlsd.upcall.service import HandshakeService, ServiceRequest, default_pending_limit
from ktlsd.upcall.wire import (
    MAX_MESSAGE_SIZE,
    SERVICE_MSG_TYPE,
    DoneExtAttr,
    ServiceCommand,
    ServiceFormatError,
    connect_service,
    decode_done_message,
    decode_submit,
    encode_done_message,
    encode_submit,
)
from tests.waiting import await_until as until
from tests.waiting import run

CLIENT_SECRET = bytes(range(0x40, 0x70))  # 48 bytes: a SHA-384 suite
SERVER_SECRET = bytes(range(0x90, 0xC0))
PSK_KEY = bytes.fromhex("5c" * 16 + "a7" * 16)


class TcpPairs:
    """Connected TCP socket pairs on loopback; closed at the end of the test."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.sockets: list[socket.socket] = []

    def pair(self) -> tuple[socket.socket, socket.socket]:
        consumer = socket.create_connection(self.listener.getsockname())
        peer, _ = self.listener.accept()
        self.sockets += [consumer, peer]
        return consumer, peer

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.listener.close()


@pytest.fixture
def tcp() -> Any:
    pairs = TcpPairs()
    yield pairs
    pairs.close()


@pytest.fixture
def sock_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Overrides the shared one: a runtime directory that does not exist yet (the service
    makes it, as it may for ``$RUNTIME_DIRECTORY``)."""
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    return str(tmp_path / "run" / "handshake.sock")


def full_request(sockfd: int = -1) -> HandshakeRequest:
    return HandshakeRequest(
        sockfd=sockfd,
        message_type=MessageType.SERVERHELLO,
        auth_mode=AuthMode.X509,
        timeout_ms=4321,
        peer_identities=(0x1234, 0x5678),
        certificate=0x111,
        private_key=0x222,
        peername="storage.example",
        keyring=0x333,
        inline=InlineMaterial(
            psk_keys=(InlinePsk(b"NVMe0R01 host subsys", PSK_KEY, "sha256"),
                      InlinePsk(b"id-384", PSK_KEY + PSK_KEY[:16], "sha384")),
            certificate_chain=(b"\x30\x82leaf", b"\x30\x82intermediate"),
            private_key=b"\x30\x82private",
            certificate_file="/etc/ktlsd/cert.pem",
            private_key_file="/etc/ktlsd/key.pem",
            truststore="/etc/ssl/ca.pem",
            crl="/etc/ssl/crl.pem",
            ciphersuites=("TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"),
            require_client_cert=True,
        ),
    )


def full_session() -> Session:
    return Session(
        role=Role.SERVER,
        suite=CipherSuite.TLS_AES_256_GCM_SHA384,
        client_secret=CLIENT_SECRET,
        server_secret=SERVER_SECRET,
        tx_seq=2**40 + 3,
        rx_seq=7,
        peer=PeerIdentity(psk_identity=b"host-1", psk_serial=0x2A2A,
                          certificate_chain=(b"leaf-der", b"ca-der")),
        group="x25519",
        client_generation=2,
        server_generation=5,
    )


# --- codec --------------------------------------------------------------------------------


def test_submit_round_trips_every_parameter() -> None:
    request = full_request()
    seq, decoded = decode_submit(encode_submit(request, seq=77), sockfd=42)
    assert seq == 77
    expected = full_request(sockfd=42)
    assert decoded == expected


def test_submit_uses_the_kernel_accept_attributes_without_sockfd() -> None:
    message = encode_submit(full_request(), seq=1)
    header = decode_genl(message)
    assert (header.msg_type, header.cmd, header.version) == (SERVICE_MSG_TYPE,
                                                             ServiceCommand.SUBMIT, 1)
    attrs = decode_attrs(header.attrs)
    types = [t for t, _ in attrs]
    assert AcceptAttr.SOCKFD not in types
    assert (AcceptAttr.MESSAGE_TYPE, u32(MessageType.SERVERHELLO)) in attrs
    assert (AcceptAttr.TIMEOUT, u32(4321)) in attrs
    assert [as_u32(p) for t, p in attrs if t == AcceptAttr.PEER_IDENTITY] == [0x1234, 0x5678]
    # The kernel path's decoder reads the same bytes once a sockfd is put in front.
    kernel_view = decode_accept_reply(encode_attr(AcceptAttr.SOCKFD, s32(9)) + header.attrs)
    assert kernel_view.peername == "storage.example"
    assert (kernel_view.certificate, kernel_view.private_key, kernel_view.keyring) == (
        0x111, 0x222, 0x333)
    assert all(t < 100 or t >= 100 for t in types) and max(types) >= 100


def test_key_update_request_round_trips() -> None:
    request = HandshakeRequest(
        sockfd=-1, message_type=MessageType.CLIENTKEYUPDATE, auth_mode=AuthMode.PSK,
        key_update_type=KeyUpdateType.SEND, session_id=0xABCDEF, request_peer_update=True,
        record_seqs=(2**33, 5),
    )
    _, decoded = decode_submit(encode_submit(request), sockfd=3)
    assert decoded.key_update_type is KeyUpdateType.SEND
    assert (decoded.session_id, decoded.request_peer_update, decoded.record_seqs) == (
        0xABCDEF, True, (2**33, 5))


def _frame(attrs: bytes, cmd: int = ServiceCommand.SUBMIT) -> bytes:
    return encode_genl(SERVICE_MSG_TYPE, cmd, attrs)


@pytest.mark.parametrize(
    ("attrs", "words"),
    [
        (encode_attr(AcceptAttr.SOCKFD, s32(0)) + encode_attr(AcceptAttr.MESSAGE_TYPE, u32(1)),
         "sockfd"),
        (encode_attr(AcceptAttr.AUTH_MODE, u32(2)), "message type"),
        (encode_attr(AcceptAttr.MESSAGE_TYPE, u32(1)), "auth mode"),
        (encode_attr(AcceptAttr.MESSAGE_TYPE, u32(9)), "unknown value"),
        (encode_attr(AcceptAttr.MESSAGE_TYPE, b"\x01"), "expected 4 bytes"),
        (encode_attr(AcceptAttr.MESSAGE_TYPE, u32(1)) + encode_attr(AcceptAttr.AUTH_MODE, u32(2))
         + encode_attr(150, b"x"), "unknown attribute 150"),
        (encode_attr(AcceptAttr.MESSAGE_TYPE, u32(1)) + encode_attr(AcceptAttr.AUTH_MODE, u32(2))
         + encode_attr(103, b"relative/cert.pem\0"), "absolute"),
        (encode_attr(AcceptAttr.MESSAGE_TYPE, u32(1)) + encode_attr(AcceptAttr.AUTH_MODE, u32(2))
         + encode_attr(107, b"TLS_RSA_WITH_RC4\0"), "unknown TLS 1.3 cipher suite"),
        (encode_attr(AcceptAttr.MESSAGE_TYPE, u32(3)) + encode_attr(AcceptAttr.AUTH_MODE, u32(2)),
         "session-id"),
    ],
)
def test_submit_rejects_bad_attributes_with_a_reason(attrs: bytes, words: str) -> None:
    with pytest.raises(ServiceFormatError, match=words) as info:
        decode_submit(_frame(attrs), sockfd=5)
    assert info.value.status == errno.EINVAL
    assert "\n" not in str(info.value)


def test_inline_psk_with_a_bad_hash_is_rejected_without_echoing_the_key() -> None:
    psk = encode_attr(1, b"ident") + encode_attr(2, PSK_KEY) + encode_attr(3, b"md5\0")
    attrs = (encode_attr(AcceptAttr.MESSAGE_TYPE, u32(1)) + encode_attr(AcceptAttr.AUTH_MODE,
             u32(2)) + encode_attr(100, psk, nested=True))
    with pytest.raises(ServiceFormatError, match="sha256 or sha384") as info:
        decode_submit(_frame(attrs), sockfd=5)
    assert PSK_KEY.hex() not in str(info.value) and "\\x5c" not in str(info.value)


def test_every_truncation_of_a_submit_is_rejected() -> None:
    message = encode_submit(full_request())
    for cut in range(len(message)):
        with pytest.raises(ServiceFormatError):
            decode_submit(message[:cut], sockfd=5)
    with pytest.raises(ServiceFormatError, match="does not match"):
        decode_submit(message + b"\0\0\0\0", sockfd=5)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=2000), st.binary(max_size=8))
def test_decoders_never_fail_with_anything_but_a_format_error(
    junk: bytes, position: int, patch: bytes
) -> None:
    for message in (encode_submit(full_request()),
                    encode_done_message(HandshakeDone(0, -1, session=full_session()))):
        at = position % len(message)
        mutated = message[:at] + patch + message[at + len(patch):]
        for data in (junk, mutated, _frame(junk), _frame(junk, ServiceCommand.DONE)):
            for decode in (lambda d: decode_submit(d, 5), decode_done_message):
                with contextlib.suppress(ServiceFormatError):
                    decode(data)


def test_done_round_trips_the_session_and_reason() -> None:
    done = HandshakeDone(status=0, sockfd=17, remote_auth=(0x2A2A, 7), session_id=0x99,
                         session=full_session(), reason="ok")
    seq, decoded = decode_done_message(encode_done_message(done, seq=5))
    assert seq == 5
    assert decoded.session == full_session()
    assert decoded.session is not None and decoded.session.tx_secret == SERVER_SECRET
    assert (decoded.status, decoded.remote_auth, decoded.session_id, decoded.reason) == (
        0, (0x2A2A, 7), 0x99, "ok")


def test_done_carries_the_kernel_done_attributes() -> None:
    message = encode_done_message(HandshakeDone(errno.EKEYREJECTED, 3, remote_auth=(11,),
                                                reason="unknown PSK identity"))
    attrs = decode_attrs(decode_genl(message).attrs)
    assert (DoneAttr.STATUS, u32(errno.EKEYREJECTED)) in attrs
    assert (DoneAttr.REMOTE_AUTH, u32(11)) in attrs
    assert (DoneExtAttr.REASON, b"unknown PSK identity\0") in attrs
    assert DoneExtAttr.SESSION not in [t for t, _ in attrs]


def test_failed_done_never_carries_a_session() -> None:
    done = HandshakeDone(status=errno.EACCES, sockfd=3, session=full_session())
    _, decoded = decode_done_message(encode_done_message(done))
    assert decoded.session is None
    assert CLIENT_SECRET not in encode_done_message(done)


def test_a_long_peer_chain_is_trimmed_to_the_size_limit_keeping_the_leaf() -> None:
    chain = tuple(bytes([i]) * 20_000 for i in range(6))
    session = Session(Role.CLIENT, CipherSuite.TLS_AES_128_GCM_SHA256, b"c" * 32, b"s" * 32,
                      peer=PeerIdentity(certificate_chain=chain))
    message = encode_done_message(HandshakeDone(0, -1, session=session))
    assert len(message) <= MAX_MESSAGE_SIZE
    _, decoded = decode_done_message(message)
    assert decoded.session is not None
    kept = decoded.session.peer.certificate_chain
    assert kept == chain[: len(kept)] and 1 <= len(kept) < len(chain)


def test_successful_done_without_session_is_rejected() -> None:
    with pytest.raises(ServiceFormatError, match="without a session"):
        decode_done_message(encode_done_message(HandshakeDone(0, -1)))


def test_default_pending_limit_is_the_kernels_clamp() -> None:
    assert 3 <= default_pending_limit() <= 50


# --- live service helpers ---------------------------------------------------------------------


Answer = Callable[[ServiceRequest], Awaitable[HandshakeDone]]


async def ok_answer(pending: ServiceRequest) -> HandshakeDone:
    return HandshakeDone(0, pending.request.sockfd, remote_auth=(1,), session=full_session())


class EchoAgent:
    """Takes requests one at a time and answers each with ``answer`` (default: success)."""

    def __init__(self, service: HandshakeService, answer: Answer = ok_answer) -> None:
        self.service = service
        self.answer = answer
        self.seen: list[ServiceRequest] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for pending in self.service.requests():
            self.seen.append(pending)
            await pending.done(await self.answer(pending))

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


async def raw_exchange(path: str, data: bytes, fds: list[int]) -> list[bytes]:
    """Send one raw message; return every message received until the service closes."""
    loop = asyncio.get_running_loop()
    conn = await connect_service(path)
    try:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        conn.sendmsg([data], anc if fds else [])
        answers = []
        while True:
            message = await loop.sock_recv(conn, MAX_MESSAGE_SIZE)
            if not message:
                return answers
            answers.append(message)
    finally:
        conn.close()


async def submit_raw(path: str, sock: socket.socket, request: HandshakeRequest | None = None,
                     ) -> HandshakeDone:
    """Submit through the wire protocol; insist on exactly one answer, then EOF."""
    answers = await raw_exchange(path, encode_submit(request or client_request()),
                                 [sock.fileno()])
    assert len(answers) == 1, f"expected exactly one answer, got {len(answers)}"
    return decode_done_message(answers[0])[1]


def client_request() -> HandshakeRequest:
    return HandshakeRequest(sockfd=-1, message_type=MessageType.CLIENTHELLO,
                            auth_mode=AuthMode.PSK, timeout_ms=2000,
                            inline=InlineMaterial(psk_keys=(InlinePsk(b"id", PSK_KEY),)))


# --- live service -------------------------------------------------------------------------


def test_parameters_and_the_socket_reach_the_agent(sock_path: str, tcp: TcpPairs) -> None:
    async def main() -> None:
        consumer, peer = tcp.pair()

        async def answer(pending: ServiceRequest) -> HandshakeDone:
            # The agent's end of the passed socket is the consumer's TCP connection.
            agent_sock = socket.socket(fileno=os.dup(pending.request.sockfd))
            agent_sock.setblocking(True)
            agent_sock.sendall(b"from the agent")
            received = agent_sock.recv(100)
            agent_sock.close()
            assert received == b"from the peer"
            return await ok_answer(pending)

        async with HandshakeService(sock_path) as service:
            agent = EchoAgent(service, answer)
            peer.sendall(b"from the peer")
            done = await submit_raw(sock_path, consumer, full_request())
            await agent.stop()
        assert peer.recv(100) == b"from the agent"
        assert done.status == 0 and done.session == full_session()
        assert done.remote_auth == (1,)
        (pending,) = agent.seen
        request = pending.request
        assert request.sockfd >= 0 and request.sockfd != consumer.fileno()
        request.sockfd = -1
        assert request == full_request()
        assert pending.credentials.pid == os.getpid()
        assert pending.credentials.uid == os.getuid()
        assert service.pending == service.in_flight == 0

    run(main())


def test_socket_file_mode_and_stale_file_replacement(sock_path: str) -> None:
    async def main() -> None:
        os.makedirs(os.path.dirname(sock_path))
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        stale.bind(sock_path)
        stale.close()  # a socket file nobody listens on: left behind by a crash
        async with HandshakeService(sock_path, mode=0o600) as service:
            mode = os.stat(sock_path).st_mode
            assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
            second = HandshakeService(sock_path)
            with pytest.raises(FileExistsError, match="already listening"):
                await second.start()
            assert service.serving
        assert not os.path.exists(sock_path)
        async with HandshakeService(sock_path):
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o660

    run(main())


def test_pending_limit_answers_eagain_and_nothing_is_lost(sock_path: str, tcp: TcpPairs) -> None:
    """200 concurrent submits against a pending limit of 5 and a slow agent."""

    async def main() -> None:
        async def slow(pending: ServiceRequest) -> HandshakeDone:
            await asyncio.sleep(0.002)
            return await ok_answer(pending)

        # All 200 consumers run as this test's uid: no per-uid share applies here.
        one_uid_for_all = ServiceLimits(uid_max_connections=1000, uid_max_pending=1000)
        async with HandshakeService(sock_path, limits=one_uid_for_all,
                                    pending_limit=5) as service:
            agent = EchoAgent(service, slow)
            pairs = [tcp.pair() for _ in range(200)]
            answers = await asyncio.gather(*(submit_raw(sock_path, c) for c, _ in pairs))
            await agent.stop()
            statuses = [a.status for a in answers]
            assert set(statuses) <= {0, errno.EAGAIN}
            assert statuses.count(errno.EAGAIN) > 0, "the limit of 5 was never reached"
            assert statuses.count(0) == len(agent.seen)
            assert all("pending" in a.reason for a in answers if a.status)
            assert service.pending == service.in_flight == 0
            assert service.counters["EAGAIN"] == statuses.count(errno.EAGAIN)

    run(main())


def test_ebusy_for_a_socket_that_already_has_a_request(sock_path: str, tcp: TcpPairs) -> None:
    async def main() -> None:
        release = asyncio.Event()
        taken = asyncio.Event()

        async def hold(pending: ServiceRequest) -> HandshakeDone:
            taken.set()
            await release.wait()
            return await ok_answer(pending)

        async with HandshakeService(sock_path) as service:
            agent = EchoAgent(service, hold)
            consumer, _ = tcp.pair()
            first = asyncio.create_task(submit_raw(sock_path, consumer))
            await taken.wait()
            again = await submit_raw(sock_path, consumer)
            duplicate = socket.socket(fileno=os.dup(consumer.fileno()))
            via_dup = await submit_raw(sock_path, duplicate)
            duplicate.close()
            other, _ = tcp.pair()
            release.set()
            assert (again.status, via_dup.status) == (errno.EBUSY, errno.EBUSY)
            assert "already has a handshake request" in again.reason
            assert (await first).status == 0
            # Once answered, the socket may ask again (e.g. after a failed attempt).
            assert (await submit_raw(sock_path, consumer)).status == 0
            assert (await submit_raw(sock_path, other)).status == 0
            await agent.stop()

    run(main())


def test_esrch_when_no_agent_consumes(sock_path: str, tcp: TcpPairs) -> None:
    async def main() -> None:
        async with HandshakeService(sock_path) as service:
            consumer, _ = tcp.pair()
            done = await submit_raw(sock_path, consumer)
            assert done.status == errno.ESRCH and "no handshake agent" in done.reason
            stream = service.requests()  # an agent attaches ...
            agent_task = asyncio.create_task(anext(stream))  # type: ignore[arg-type]
            submit = asyncio.create_task(submit_raw(sock_path, consumer))
            pending = await agent_task
            await pending.done(HandshakeDone(0, pending.request.sockfd, session=full_session()))
            assert (await submit).status == 0
            await stream.aclose()  # type: ignore[attr-defined]
            assert (await submit_raw(sock_path, consumer)).status == errno.ESRCH  # ... and goes

    run(main())


def test_queued_request_is_dropped_when_its_consumer_disconnects(
    sock_path: str, tcp: TcpPairs
) -> None:
    async def main() -> None:
        async with HandshakeService(sock_path, pending_limit=1) as service:
            stream = service.requests()  # an agent that is busy: it takes nothing yet
            quitter_sock, _ = tcp.pair()
            quitter = await connect_service(sock_path)
            quitter.sendmsg([encode_submit(client_request())], [(
                socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", quitter_sock.fileno()))])
            await until(lambda: service.pending == 1, "the request is queued")
            consumer, _ = tcp.pair()
            assert (await submit_raw(sock_path, consumer)).status == errno.EAGAIN
            quitter.close()
            await until(lambda: service.pending == 0, "the slot is freed")
            waiting = asyncio.create_task(submit_raw(sock_path, consumer))
            pending = await anext(stream)  # type: ignore[arg-type]
            # The agent gets the second consumer's socket, never the cancelled one.
            agent_sock = socket.socket(fileno=os.dup(pending.request.sockfd))
            assert agent_sock.getsockname() == consumer.getsockname()
            agent_sock.close()
            await pending.done(HandshakeDone(0, pending.request.sockfd, session=full_session()))
            assert (await waiting).status == 0
            assert service.counters["cancelled"] == 1
            await stream.aclose()  # type: ignore[attr-defined]

    run(main())


def test_in_flight_request_learns_of_cancellation_and_done_is_a_no_op(
    sock_path: str, tcp: TcpPairs
) -> None:
    async def main() -> None:
        async with HandshakeService(sock_path) as service:
            stream = service.requests()
            consumer, _ = tcp.pair()
            conn = await connect_service(sock_path)
            conn.sendmsg([encode_submit(client_request())], [(
                socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", consumer.fileno()))])
            pending = await anext(stream)  # type: ignore[arg-type]
            assert not pending.cancelled.is_set()
            conn.close()
            await asyncio.wait_for(pending.cancelled.wait(), 10)
            assert service.in_flight == 1  # the agent still owns the descriptor
            agent_fd = pending.request.sockfd
            await pending.done(HandshakeDone(0, agent_fd, session=full_session()))
            assert service.in_flight == 0
            with pytest.raises(OSError) as info:
                os.fstat(agent_fd)
            assert info.value.errno == errno.EBADF
            # The socket is free again: a new request for it is accepted, not EBUSY.
            again = asyncio.create_task(submit_raw(sock_path, consumer))
            second = await anext(stream)  # type: ignore[arg-type]
            await second.done(HandshakeDone(errno.EACCES, second.request.sockfd, reason="no"))
            assert (await again).status == errno.EACCES
            await stream.aclose()  # type: ignore[attr-defined]

    run(main())


def _bad_messages(tcp: TcpPairs) -> list[tuple[str, bytes, list[int], str]]:
    good = encode_submit(client_request())
    consumer, _ = tcp.pair()
    read_end, write_end = os.pipe()
    unconnected = socket.socket()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.connect(("127.0.0.1", 9))
    tcp.sockets += [unconnected, udp]
    fd = consumer.fileno()
    return [
        ("garbage", os.urandom(40), [fd], "header"),
        ("empty", b"", [fd], "too short"),
        ("truncated", good[: len(good) // 2], [fd], "nlmsg_len"),
        ("oversized", good + b"\0" * (MAX_MESSAGE_SIZE + 100), [fd], "too large"),
        ("unknown command", _frame(b"", cmd=7), [fd], "unknown or unexpected command 7"),
        ("wrong type", encode_genl(0x10, ServiceCommand.SUBMIT, b""), [fd], "not a ktlsd"),
        ("no descriptor", good, [], "without a socket"),
        ("two descriptors", good, [fd, fd], "expected exactly one"),
        ("a pipe", good, [read_end], "not a socket"),
        ("unconnected", good, [unconnected.fileno()], "not connected"),
        ("udp", good, [udp.fileno()], "not a TCP socket"),
        ("sockfd attribute", _frame(encode_attr(AcceptAttr.SOCKFD, s32(0)) + good[20:]), [fd],
         "sockfd"),
        ("pipe, other end", good, [write_end], "not a socket"),
    ]


def test_malformed_messages_get_einval_and_the_service_keeps_serving(
    sock_path: str, tcp: TcpPairs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ktlsd")

    async def main() -> None:
        async with HandshakeService(sock_path) as service:
            agent = EchoAgent(service)
            bad = _bad_messages(tcp)
            for name, data, fds, words in bad:
                answers = await raw_exchange(sock_path, data, fds)
                assert len(answers) == 1, name
                _, done = decode_done_message(answers[0])
                assert done.status == errno.EINVAL, name
                assert words in done.reason, (name, done.reason)
                assert words in caplog.text, name
            assert agent.seen == []
            consumer, _ = tcp.pair()
            assert (await submit_raw(sock_path, consumer)).status == 0
            assert service.counters["invalid"] == len(bad)
            for fd in bad[-1][2] + bad[-5][2]:  # the pipe
                os.close(fd)
            await agent.stop()

    run(main())


def test_a_silent_consumer_is_dropped_and_a_second_message_cancels(
    sock_path: str, tcp: TcpPairs
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        async with HandshakeService(sock_path, submit_wait=0.2) as service:
            stream = service.requests()
            silent = await connect_service(sock_path)
            assert await loop.sock_recv(silent, 100) == b""  # closed by the service
            silent.close()
            consumer, _ = tcp.pair()
            chatty = await connect_service(sock_path)
            chatty.sendmsg([encode_submit(client_request())], [(
                socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", consumer.fileno()))])
            await until(lambda: service.pending == 1, "queued")
            chatty.send(b"again")
            await until(lambda: service.pending == 0, "cancelled by the second message")
            chatty.close()
            await stream.aclose()  # type: ignore[attr-defined]

    run(main())


def test_close_answers_queued_esrch_and_in_flight_still_get_done(
    sock_path: str, tcp: TcpPairs
) -> None:
    async def main() -> None:
        service = HandshakeService(sock_path)
        await service.start()
        stream = service.requests()
        first_sock, _ = tcp.pair()
        second_sock, _ = tcp.pair()
        first = asyncio.create_task(submit_raw(sock_path, first_sock))
        in_flight = await anext(stream)  # type: ignore[arg-type]
        second = asyncio.create_task(submit_raw(sock_path, second_sock))
        await until(lambda: service.pending == 1, "second queued")
        await service.close()
        queued_answer = await second
        assert queued_answer.status == errno.ESRCH and "shutting down" in queued_answer.reason
        with pytest.raises(StopAsyncIteration):
            await anext(stream)  # type: ignore[arg-type]
        assert not os.path.exists(sock_path)
        with pytest.raises(FileNotFoundError):
            await submit_raw(sock_path, second_sock)
        assert not first.done()
        await in_flight.done(HandshakeDone(0, in_flight.request.sockfd, session=full_session()))
        assert (await first).status == 0
        await asyncio.wait_for(service.wait_closed(), 10)

    run(main())


def test_secrets_never_reach_logs_or_reprs(
    sock_path: str, tcp: TcpPairs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secrets = (PSK_KEY, CLIENT_SECRET, SERVER_SECRET)

    def assert_clean(text: str) -> None:
        for secret in secrets:
            assert secret.hex() not in text
            assert repr(secret)[2:-1] not in text

    async def main() -> None:
        async with HandshakeService(sock_path) as service:
            agent = EchoAgent(service)
            consumer, _ = tcp.pair()
            done = await submit_raw(sock_path, consumer, full_request())
            await agent.stop()
        assert done.session is not None and done.session.client_secret == CLIENT_SECRET
        (pending,) = agent.seen
        assert pending.request.inline is not None
        assert pending.request.inline.psk_keys[0].key == PSK_KEY
        for text in (repr(done), str(done), repr(pending), repr(pending.request), caplog.text):
            assert_clean(text)
        assert f"pid {os.getpid()}" in caplog.text  # the consumer is identified in the log

    run(main())


def test_socket_group_by_name_and_unknown_group(sock_path: str) -> None:
    import grp

    group = grp.getgrgid(os.getgid() if os.getgid() != 0 else 1)

    async def main() -> None:
        async with HandshakeService(sock_path, group=group.gr_name):
            assert os.stat(sock_path).st_gid == group.gr_gid
        with pytest.raises(ValueError, match="unknown group"):
            await HandshakeService(sock_path, group="no-such-group-ktlsd").start()
        assert not os.path.exists(sock_path)

    run(main())
