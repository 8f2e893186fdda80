"""RFC 8449 record_size_limit: negotiated with real peers, honoured on the wire.

The peers: tlslite-ng (which implements the extension, ``HandshakeSettings.record_size_limit``,
and enforces it both ways: it refuses records larger than it advertised), GnuTLS (tlshd's
library, which offers 2^14+1 by default and a smaller value with ``--recordsize``) and OpenSSL
(which does not know the extension: nothing changes). Between tlslite-ng and ktlsd sits a relay
thread that forwards the bytes and keeps a copy, so every record length checked is read off the
wire. kTLS TX is covered by the VM scenario ``record-size-limit``; tlsfuzzer's
``test-record-size-limit`` runs against ``ktlsd listen`` (the last test).
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from tlslite.api import HandshakeSettings, TLSConnection

from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.tls.connection import TlsConnection
from ktlsd.tls.handshake import PskKey, TlsConfig, handshake_blocking
from ktlsd.tls.protocol import AlertDescription
from ktlsd.tls.record import AlertReceived, UserRecordLayer
from ktlsd.tls.session import CipherSuite, Role, Session
from ktlsd.upcall.wire import decode_done_message, encode_done_message
from testbed.scenarios.tls_wire import RecordingRelay, record_list
from tests.peers import GNUTLS_TLS13_PSK, gnutls_server, openssl_server

IDENTITY = b"rsl-peer"
KEY = bytes(range(32))
PAYLOAD = 64 * 1024
TAG = 16


def protected_lengths(stream: bytes) -> list[int]:
    """Lengths of the protected (type 23) records in a captured stream, which must parse."""
    return [length for kind, length in record_list(stream) if kind == 23]


def tlslite_settings(limit: int | None) -> HandshakeSettings:
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    settings.pskConfigs = [(IDENTITY, KEY, "sha256")]
    settings.ticket_count = 0
    settings.record_size_limit = limit
    return settings


def ktlsd_config(role: Role, limit: int | None = None) -> TlsConfig:
    extra = {} if limit is None else {"record_size_limit": limit}
    psk = PskKey(IDENTITY, KEY)
    if role is Role.CLIENT:
        return TlsConfig(role=role, psk_keys=(psk,), **extra)  # type: ignore[arg-type]
    return TlsConfig(
        role=role, psk_lookup=lambda i: psk if i == IDENTITY else None, **extra  # type: ignore[arg-type]
    )


def exchange_with_tlslite(
    ktlsd_role: Role, *, peer_limit: int | None, our_limit: int | None
) -> tuple[Session, RecordingRelay, dict[str, object]]:
    """Handshake ktlsd (user record layer) with tlslite-ng through a relay; each side sends
    :data:`PAYLOAD` random bytes, tlslite-ng first, and checks what it gets."""
    relay = RecordingRelay()
    peer_data, our_data = os.urandom(PAYLOAD), os.urandom(PAYLOAD)
    result: dict[str, object] = {}

    def tlslite_side() -> None:
        try:
            tls = TLSConnection(relay.far_end)
            settings = tlslite_settings(peer_limit)
            if ktlsd_role is Role.SERVER:
                tls.handshakeClientCert(settings=settings)
            else:
                tls.handshakeServer(settings=settings)
            tls.write(peer_data)
            got = bytearray()
            while len(got) < PAYLOAD:  # tlslite-ng refuses records above its own limit
                got += tls.read(max=PAYLOAD, min=1)
            result["peer_got"] = bytes(got)
            tls.close()
        except BaseException as exc:
            result["peer_error"] = exc

    thread = threading.Thread(target=tlslite_side)
    thread.start()
    session = handshake_blocking(relay.near_end, ktlsd_config(ktlsd_role, our_limit), timeout=10)
    conn = TlsConnection(UserRecordLayer(relay.near_end, session), session)
    got = bytearray()
    while len(got) < PAYLOAD:
        data = conn.recv(65536)
        assert data, "tlslite-ng closed early"
        got += data
    conn.send(our_data)
    thread.join(30)
    assert not thread.is_alive()
    assert "peer_error" not in result, result.get("peer_error")
    assert result["peer_got"] == our_data
    assert bytes(got) == peer_data
    conn.close()
    return session, relay, result


@pytest.mark.parametrize("ktlsd_role", [Role.SERVER, Role.CLIENT])
def test_peer_limit_caps_every_record_we_send(ktlsd_role: Role) -> None:
    session, relay, _ = exchange_with_tlslite(ktlsd_role, peer_limit=256, our_limit=None)
    try:
        assert session.peer_record_size_limit == 256
        assert session.record_size_limit == 2**14 + 1  # negotiated: both sent one
        assert session.max_send_fragment == 255
        ours = protected_lengths(bytes(relay.from_near))
        # 64 KiB of data at most 255 bytes per record, and no record above the limit.
        assert max(ours) - TAG <= 256
        assert len(ours) >= PAYLOAD // 255
        # Control: tlslite-ng was free to send full-size records to us, and did.
        assert max(protected_lengths(bytes(relay.from_far))) - TAG == 2**14 + 1
    finally:
        relay.close()


def test_our_advertised_limit_is_honoured_by_the_peer() -> None:
    session, relay, _ = exchange_with_tlslite(Role.SERVER, peer_limit=2**14 + 1, our_limit=512)
    try:
        assert session.record_size_limit == 512
        assert session.peer_record_size_limit == 2**14 + 1
        theirs = protected_lengths(bytes(relay.from_far))
        assert max(theirs) - TAG <= 512
        assert len(theirs) >= PAYLOAD // 511
        assert max(protected_lengths(bytes(relay.from_near))) - TAG == 2**14 + 1
    finally:
        relay.close()


def test_peer_without_the_extension_changes_nothing() -> None:
    session, relay, _ = exchange_with_tlslite(Role.SERVER, peer_limit=None, our_limit=300)
    try:
        # tlslite-ng sent none, so our server sent none: nothing negotiated either way.
        assert session.peer_record_size_limit is None and session.record_size_limit is None
        assert session.max_send_fragment == 2**14 and session.max_recv_inner == 2**14 + 1
        assert max(protected_lengths(bytes(relay.from_near))) - TAG == 2**14 + 1
    finally:
        relay.close()


def sessions_over_socketpair(
    receiver_limit: int,
) -> tuple[UserRecordLayer, UserRecordLayer]:
    """Two user layers on a socketpair; the sender ignores the receiver's limit (it was told
    of none), the receiver advertised ``receiver_limit``."""
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    client_secret, server_secret = os.urandom(32), os.urandom(32)
    a, b = socket.socketpair()
    sender = UserRecordLayer(a, Session(Role.CLIENT, suite, client_secret, server_secret))
    receiver = UserRecordLayer(
        b,
        Session(Role.SERVER, suite, client_secret, server_secret,
                peer_record_size_limit=2**14 + 1, record_size_limit=receiver_limit),
    )  # fmt: skip
    return sender, receiver


def test_record_above_our_limit_is_refused_with_record_overflow() -> None:
    sender, receiver = sessions_over_socketpair(256)
    with sender.socket, receiver.socket:
        sender.send(b"x" * 255)  # 256 bytes of inner plaintext: allowed
        assert receiver.recv().data == b"x" * 255
        sender.send(b"y" * 256)  # 257: one too many
        with pytest.raises(OSError) as caught:
            receiver.recv()
        assert caught.value.errno == errno.EMSGSIZE
        assert "record_size_limit" in str(caught.value)
        with pytest.raises(AlertReceived) as alert:
            sender.recv()
        assert alert.value.description == AlertDescription.RECORD_OVERFLOW


def test_send_splits_data_and_refuses_oversized_other_records() -> None:
    suite = CipherSuite.TLS_CHACHA20_POLY1305_SHA256
    secrets = os.urandom(32), os.urandom(32)
    a, b = socket.socketpair()
    with a, b:
        layer = UserRecordLayer(
            a, Session(Role.CLIENT, suite, *secrets, peer_record_size_limit=100)
        )
        assert layer.max_fragment == 99
        with pytest.raises(ValueError, match="record_size_limit"):
            layer.send(b"h" * 100, 22)  # a handshake record may not be cut silently
        layer.send(b"d" * 250)  # application data: 99 + 99 + 52, as kTLS would cut it
        wire = b.recv(65536)
        assert [length - TAG - 1 for length in protected_lengths(wire)] == [99, 99, 52]


def test_malformed_values_get_the_right_alerts() -> None:
    """The engine's own judgement of the peer's extension body (tlsfuzzer sends these on the
    wire, see test_tlsfuzzer_record_size_limit)."""
    from ktlsd.tls.handshake import TlsHandshake

    with TlsHandshake(ktlsd_config(Role.SERVER), peer="test") as hs:
        assert hs.on_record_size_limit(b"\x40") == AlertDescription.DECODE_ERROR
        assert hs.on_record_size_limit(b"\x00\x40\x00") == AlertDescription.DECODE_ERROR
        assert hs.on_record_size_limit((63).to_bytes(2, "big")) == (
            AlertDescription.ILLEGAL_PARAMETER
        )
        assert hs.on_record_size_limit((64).to_bytes(2, "big")) == 0
        assert hs.on_record_size_limit(b"\xff\xff") == 0  # above 2^14+1: means 2^14+1


def test_config_refuses_limits_outside_the_rfc() -> None:
    for bad in (63, 2**14 + 2, 0):
        with pytest.raises(ValueError, match="record_size_limit"):
            ktlsd_config(Role.CLIENT, bad)
    assert ktlsd_config(Role.CLIENT, 64).record_size_limit == 64


def test_openssl_peer_sends_no_limit() -> None:
    args = ["-nocert", "-psk_identity", IDENTITY.decode(), "-psk", KEY.hex()]
    with openssl_server(*args) as peer:
        sock = socket.create_connection(("127.0.0.1", peer.port), timeout=10)
        with sock:
            session = handshake_blocking(sock, ktlsd_config(Role.CLIENT, 1000), timeout=10)
    assert session.peer_record_size_limit is None and session.record_size_limit is None
    assert session.max_send_fragment == 2**14


@pytest.mark.parametrize(("recordsize", "expected"), [(None, 2**14 + 1), (600, 601)])
def test_gnutls_peer_limit(tmp_path: Path, recordsize: int | None, expected: int) -> None:
    """GnuTLS (tlshd 1.4's library) advertises its receive size plus the content type."""
    passwd = tmp_path / "psk.passwd"
    passwd.write_text(f"{IDENTITY.decode()}:{KEY.hex()}\n")
    extra = [] if recordsize is None else [f"--recordsize={recordsize}"]
    with gnutls_server("--pskpasswd", str(passwd), "--priority", GNUTLS_TLS13_PSK, *extra) as peer:
        sock = socket.create_connection(("127.0.0.1", peer.port), timeout=10)
        with sock:
            session = handshake_blocking(sock, ktlsd_config(Role.CLIENT), timeout=10)
    assert session.peer_record_size_limit == expected
    assert session.record_size_limit == 2**14 + 1


def test_illegal_server_value_fails_our_client() -> None:
    """tlslite-ng as a server with a limit of 63 is refused on its settings; a hostile server
    is simulated by feeding the engine's hook directly instead: the failure is one line."""
    from ktlsd.tls.handshake import TlsHandshake

    with TlsHandshake(ktlsd_config(Role.CLIENT), peer="srv:1") as hs:
        assert hs.on_record_size_limit(b"\x00\x10") == AlertDescription.ILLEGAL_PARAMETER
        error = hs._record_size_limit_refusal
        assert isinstance(error, HandshakeError) and error.cause is FailureCause.PROTOCOL_ERROR
        assert "record_size_limit 16" in str(error) and "\n" not in str(error)


def test_limits_travel_in_the_service_answer() -> None:
    from ktlsd.request import HandshakeDone

    session = Session(
        Role.CLIENT, CipherSuite.TLS_AES_128_GCM_SHA256, os.urandom(32), os.urandom(32),
        peer_record_size_limit=257, record_size_limit=16385,
    )  # fmt: skip
    message = encode_done_message(HandshakeDone(status=0, sockfd=-1, session=session))
    _, done = decode_done_message(message)
    assert done.session is not None
    assert done.session.peer_record_size_limit == 257
    assert done.session.record_size_limit == 16385
    assert done.session.max_send_fragment == 256
    bare = Session(Role.SERVER, CipherSuite.TLS_AES_128_GCM_SHA256, os.urandom(32), os.urandom(32))
    _, done = decode_done_message(encode_done_message(HandshakeDone(0, -1, session=bare)))
    assert done.session is not None and done.session.peer_record_size_limit is None


# --- tlsfuzzer ------------------------------------------------------------------------------

#: The script's TLS 1.3 cases ktlsd passes (run by name). Left out, with the reason:
#: "check if server accepts minimal size in TLS 1.3" (a limit of 64: OpenSSL cuts its own
#: handshake records no lower than 512 bytes, so the certificate flight exceeds it);
#: "... with max_fragment_length" (RFC 8449 §5 wants max_fragment_length ignored when both
#: come; OpenSSL answers it and offers no way to refuse it); the two "TLS 1.3 session
#: resumption" cases (ktlsd's server issues no tickets).
TLSFUZZER_CASES = [
    "sanity in TLS 1.3",
    "check server sent size in TLS 1.3",
    "check if server accepts maximum size in TLS 1.3",
    "Invalid value in extension in TLS 1.3",
    "empty extension in TLS 1.3",
    "padded extension in TLS 1.3",
    "too large record payload in TLS 1.3",
    "too large record payload in TLS 1.3 with padding",
    "HRR sanity",
    "modified extension in 2nd CH in HRR handshake",
    "removed extension in 2nd CH in HRR handshake",
    "added extension in 2nd CH in HRR handshake",
]


@pytest.mark.tlsfuzzer
def test_tlsfuzzer_record_size_limit(tmp_path: Path) -> None:
    from tests.cli_peers import start_ktlsd_listen
    from tests.pki import Authority
    from tests.test_tlsfuzzer import TLSFUZZER_DIR, _check_prerequisites, parse_results

    _check_prerequisites()
    server = Authority.create(tmp_path, "rsa").issue_server()
    proc, port = start_ktlsd_listen(
        "--www", "--forever", "--cert", str(server.cert_path), "--key", str(server.key_path),
        "--record-layer", "user", "--timeout", "5", "--idle-timeout", "10",
        name="ktlsd-www",
    )  # fmt: skip
    try:
        # The reply size: the --www page names suite, group and signature schemes
        # (AES-128-GCM, secp256r1, rsa_pss_rsae_sha256 here).
        argv = ["-h", "127.0.0.1", "-p", str(port), "--reply-AD-size", "201",
                "--supported-groups", "--hrr-supported-groups", *TLSFUZZER_CASES]  # fmt: skip
        done = subprocess.run(
            [sys.executable, "-m", "tlsfuzzer._apps.test_record_size_limit", *argv],
            env={**os.environ, "PYTHONPATH": str(TLSFUZZER_DIR)}, capture_output=True,
            text=True, timeout=300, check=False,
        )  # fmt: skip
    finally:
        proc.close()
    run = parse_results("test-record-size-limit", "ktlsd", done.stdout + done.stderr)
    assert run.cases >= set(TLSFUZZER_CASES), run.tail()
    assert not run.failed, f"ktlsd fails {sorted(run.failed)}:\n{run.tail()}"


# --- connect/listen -------------------------------------------------------------------------


class PortRelay:
    """Listen on a port, forward one connection to ``target_port``, keep both directions."""

    def __init__(self, target_port: int) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._target = target_port
        self.from_client = bytearray()
        self.from_server = bytearray()
        self._threads: list[threading.Thread] = []
        self._sockets: list[socket.socket] = []
        accept = threading.Thread(target=self._accept, daemon=True)
        accept.start()
        self._threads.append(accept)

    def _accept(self) -> None:
        client, _ = self._listener.accept()
        server = socket.create_connection(("127.0.0.1", self._target))
        self._sockets += [client, server]
        for args in ((client, server, self.from_client), (server, client, self.from_server)):
            thread = threading.Thread(target=RecordingRelay._pump, args=args, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        self._listener.close()
        for thread in self._threads:
            thread.join(10)
        for sock in self._sockets:
            sock.close()


def test_listen_option_limits_what_connect_sends() -> None:
    from tests.cli_peers import Proc, exchange, ktlsd, start_ktlsd_listen

    psk = ["--psk-identity", IDENTITY.decode(), "--psk", KEY.hex(), "--record-layer", "user"]
    listen, port = start_ktlsd_listen("--record-size-limit", "300", *psk)
    relay = PortRelay(port)
    connect = Proc(ktlsd("connect", f"127.0.0.1:{relay.port}", *psk))
    try:
        exchange(connect, listen, size=64 * 1024)
        listen.close_stdin()  # the peer closed first: listen ends when its stdin does
        assert connect.wait_exit() == 0
        assert listen.wait_exit() == 0
    finally:
        connect.close()
        listen.close()
        relay.close()
    from_connect = protected_lengths(bytes(relay.from_client))
    assert max(from_connect) - TAG <= 300
    assert len(from_connect) >= 64 * 1024 // 299
    # connect advertised the default: listen sent full records.
    assert max(protected_lengths(bytes(relay.from_server))) - TAG == 2**14 + 1


def test_option_range_is_checked() -> None:
    from tests.cli_peers import ktlsd

    done = subprocess.run(
        ktlsd("connect", "127.0.0.1:1", "--record-size-limit", "63"), capture_output=True,
        text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--record-size-limit: must be 64..16385" in done.stderr


# --- the agent: [ktlsd] record_size_limit, and the limits in DONE ---------------------------


def test_config_key_reaches_the_agent_and_the_consumer(sock_path: str) -> None:
    """``[ktlsd] record_size_limit = 300``: the agent advertises 300 for a service consumer;
    the tlslite-ng server's 256 comes back in DONE, and the consumer's record layer honours it
    (tlslite-ng refuses any record above its limit)."""
    import asyncio

    from ktlsd.client import connection_from_done, submit
    from ktlsd.config import ConfigError, config_from_keyfile, parse_key_file
    from tests.agent_helpers import running_agent

    def settings_of(text: str):  # type: ignore[no-untyped-def]
        return config_from_keyfile(parse_key_file(text, "test.conf")).agent_settings()

    assert settings_of("").record_size_limit == 2**14 + 1
    with pytest.raises(ConfigError, match=r"test\.conf:2: \[ktlsd\] record_size_limit"):
        settings_of("[ktlsd]\nrecord_size_limit = 63\n")
    settings = settings_of("[ktlsd]\nrecord_size_limit = 300\n")
    assert settings.record_size_limit == 300

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    data = os.urandom(PAYLOAD)
    result: dict[str, object] = {}

    def tlslite_server() -> None:
        try:
            sock, _ = listener.accept()
            tls = TLSConnection(sock)
            tls.handshakeServer(settings=tlslite_settings(256))
            result["send_limit"] = tls._send_record_limit
            got = bytearray()
            while len(got) < PAYLOAD:
                got += tls.read(max=PAYLOAD, min=1)
            result["got"] = bytes(got)
            tls.close()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=tlslite_server)
    thread.start()

    async def main() -> None:
        async with running_agent(sock_path, settings):
            sock = socket.create_connection(("127.0.0.1", port))
            with sock:
                done = await submit(
                    sock, role="client", auth="psk", psk=[(IDENTITY, KEY, "sha256")],
                    service_path=sock_path, timeout=10,
                )  # fmt: skip
                assert (done.status, done.reason) == (0, "")
                assert done.session is not None
                assert done.session.peer_record_size_limit == 256
                assert done.session.record_size_limit == 300
                conn = connection_from_done(sock, done, record_layer="user")
                await conn.asend(data)
                await asyncio.to_thread(thread.join, 30)

    try:
        asyncio.run(main())
    finally:
        listener.close()
        thread.join(30)
    assert "error" not in result, result.get("error")
    assert result["got"] == data
    assert result["send_limit"] == 299  # tlslite-ng took our 300 (minus the content type)


def test_apply_to_a_socket_the_kernel_cannot_cap(caplog: pytest.LogCaptureFixture) -> None:
    """ENOPROTOOPT (a kernel < 6.19, here: a TCP socket without the tls ULP) is reported as
    False and logged once; nothing to cap is True without a setsockopt."""
    import logging

    from ktlsd.tls import ktls

    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    limited = Session(Role.CLIENT, suite, bytes(32), bytes(32), peer_record_size_limit=256)
    default = Session(Role.CLIENT, suite, bytes(32), bytes(32), peer_record_size_limit=2**14 + 1)
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as sock:
        assert ktls.apply_record_size_limit(sock, default) is True
        unlimited = Session(Role.CLIENT, suite, bytes(32), bytes(32))
        assert ktls.apply_record_size_limit(sock, unlimited) is True
        ktls._cap_missing_logged = False
        with caplog.at_level(logging.WARNING, logger="ktlsd.tls.ktls"):
            assert ktls.apply_record_size_limit(sock, limited) is False
            assert ktls.apply_record_size_limit(sock, limited) is False
        lines = [
            r.getMessage() for r in caplog.records if "TLS_TX_MAX_PAYLOAD_LEN" in r.getMessage()
        ]
        assert len(lines) == 1 and "6.19" in lines[0]

