"""TlsConnection tests over real sockets: bulk data, KeyUpdate in every combination, errors.

Two connections talk through a real TCP loopback relay (or a socket pair) that records every
byte each way; the lock-step tests decrypt that capture with keys the test derives itself
from the initial secrets (its own HKDF-Expand-Label on ``cryptography``), independently of
:mod:`ktlsd.tls.keyschedule`, following each KeyUpdate it sees in the plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import os
import random
import select
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from tlslite.api import HandshakeSettings, TLSConnection, X509CertChain, parsePEMKey

from ktlsd.tls.connection import (
    DEFAULT_REKEY_AFTER_RECORDS,
    TlsConnection,
    TlsProtocolError,
)
from ktlsd.tls.record import AlertReceived, UserRecordLayer
from ktlsd.tls.session import CipherSuite, Role, Session

AES128 = CipherSuite.TLS_AES_128_GCM_SHA256
AES256 = CipherSuite.TLS_AES_256_GCM_SHA384
CHACHA = CipherSuite.TLS_CHACHA20_POLY1305_SHA256


# --- an independent decryptor for captured traffic --------------------------------------


def _expand_label(suite: CipherSuite, secret: bytes, label: bytes, length: int) -> bytes:
    algorithm = hashes.SHA384() if suite.hash_name == "sha384" else hashes.SHA256()
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    return HKDFExpand(algorithm, length, info).derive(secret)


@dataclass
class Decryptor:
    """Follows one direction of captured ciphertext, KeyUpdate by KeyUpdate."""

    suite: CipherSuite
    secret: bytes
    seq: int = 0
    generation: int = 0
    key_updates: list[bool] = field(default_factory=list)
    records: list[tuple[int, bytes]] = field(default_factory=list)

    def _aead(self) -> tuple[AESGCM | ChaCha20Poly1305, bytes]:
        key = _expand_label(self.suite, self.secret, b"key", self.suite.key_length)
        iv = _expand_label(self.suite, self.secret, b"iv", 12)
        cls = ChaCha20Poly1305 if self.suite is CHACHA else AESGCM
        return cls(key), iv

    def feed(self, stream: bytes) -> None:
        aead, iv = self._aead()
        offset = 0
        while offset < len(stream):
            header = stream[offset : offset + 5]
            length = int.from_bytes(header[3:5], "big")
            body = stream[offset + 5 : offset + 5 + length]
            assert len(body) == length, "capture ends inside a record"
            offset += 5 + length
            nonce = bytes(a ^ b for a, b in zip(iv, self.seq.to_bytes(12, "big"), strict=True))
            inner = aead.decrypt(nonce, body, header).rstrip(b"\x00")
            self.seq += 1
            content_type, data = inner[-1], inner[:-1]
            self.records.append((content_type, data))
            if content_type == 22 and data[:1] == b"\x18":
                assert data[:4] == b"\x18\x00\x00\x01"
                self.key_updates.append(data[4] == 1)
                self.secret = _expand_label(
                    self.suite, self.secret, b"traffic upd", self.suite.hash_length
                )
                self.generation += 1
                self.seq = 0
                aead, iv = self._aead()

    def application_data(self) -> bytes:
        return b"".join(data for content_type, data in self.records if content_type == 23)


# --- plumbing ----------------------------------------------------------------------------


class Tap:
    """A TCP relay between two endpoints that records every byte in each direction."""

    def __init__(self) -> None:
        self.to_server = bytearray()
        self.to_client = bytearray()
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(2)
            self.client = socket.create_connection(listener.getsockname())
            self._relay_client, _ = listener.accept()
            self.server = socket.create_connection(listener.getsockname())
            self._relay_server, _ = listener.accept()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        routes = {
            self._relay_client: (self._relay_server, self.to_server),
            self._relay_server: (self._relay_client, self.to_client),
        }
        open_ends = set(routes)
        while open_ends:
            readable, _, _ = select.select(list(open_ends), [], [], 10)
            if not readable:
                return
            for sock in readable:
                target, log = routes[sock]
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    open_ends.discard(sock)
                    with contextlib.suppress(OSError):
                        target.shutdown(socket.SHUT_WR)
                    continue
                log += data
                try:
                    target.sendall(data)
                except OSError:
                    open_ends.discard(sock)

    def close(self) -> None:
        for sock in (self.client, self.server):
            sock.close()
        self._thread.join(10)
        self._relay_client.close()
        self._relay_server.close()


def sessions(suite: CipherSuite) -> tuple[Session, Session]:
    c, s = os.urandom(suite.hash_length), os.urandom(suite.hash_length)
    return (
        Session(Role.CLIENT, suite, client_secret=c, server_secret=s),
        Session(Role.SERVER, suite, client_secret=c, server_secret=s),
    )


@pytest.fixture
def tap() -> Iterator[Tap]:
    relay = Tap()
    relay.client.settimeout(20)
    relay.server.settimeout(20)
    yield relay
    relay.close()


def connect(tap: Tap, suite: CipherSuite = AES128, **options) -> tuple[TlsConnection, ...]:
    client_session, server_session = sessions(suite)
    client = TlsConnection(UserRecordLayer(tap.client, client_session), client_session, **options)
    server = TlsConnection(UserRecordLayer(tap.server, server_session), server_session, **options)
    return client, server, client_session, server_session


def read_all(conn: TlsConnection) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def read_exact(conn: TlsConnection, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        assert chunk, "unexpected EOF"
        out += chunk
    return out


def assert_lock_step(a: TlsConnection, b: TlsConnection) -> None:
    sa, sb = a.session, b.session
    assert hmac.compare_digest(sa.client_secret, sb.client_secret)
    assert hmac.compare_digest(sa.server_secret, sb.server_secret)
    assert (sa.client_generation, sa.server_generation) == (
        sb.client_generation,
        sb.server_generation,
    )


# --- bulk data ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suite", "options"),
    [
        (AES128, {}),
        (CHACHA, {"rekey_after_records": 10}),
        (AES256, {"rekey_after_bytes": 100_000}),
    ],
)
def test_one_mebibyte_each_way_byte_exact(tap: Tap, suite: CipherSuite, options: dict) -> None:
    client, server, client_session, server_session = connect(tap, suite, **options)
    up, down = os.urandom(1 << 20), os.urandom(1 << 20)
    results: dict[str, bytes] = {}

    def writer(conn: TlsConnection, data: bytes) -> None:
        rng = random.Random(len(data))
        offset = 0
        while offset < len(data):
            step = rng.choice((1, 100, 4096, 16384, 16385, 70000))
            conn.send(data[offset : offset + step])
            offset += step
        conn.close()

    def reader(name: str, conn: TlsConnection) -> None:
        results[name] = read_all(conn)

    threads = [
        threading.Thread(target=writer, args=(client, up)),
        threading.Thread(target=writer, args=(server, down)),
        threading.Thread(target=reader, args=("server", server)),
        threading.Thread(target=reader, args=("client", client)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results["server"] == up
    assert results["client"] == down
    assert client.bytes_sent == server.bytes_received == 1 << 20
    assert server.bytes_sent == client.bytes_received == 1 << 20
    assert client.records_sent == server.records_received
    if options:
        assert client.key_updates_sent > 0 and server.key_updates_sent > 0
    else:
        assert client.key_updates_sent == server.key_updates_sent == 0
    assert client.key_updates_sent == server.key_updates_received
    assert server.key_updates_sent == client.key_updates_received
    assert_lock_step(client, server)
    tap.close()
    for stream, secret, expected in (
        (tap.to_server, client_session.client_secret, up),
        (tap.to_client, server_session.server_secret, down),
    ):
        decryptor = Decryptor(suite, secret)
        decryptor.feed(bytes(stream))
        assert decryptor.application_data() == expected
        assert all(len(data) <= 16384 for _, data in decryptor.records)
        assert decryptor.records[-1] == (21, b"\x01\x00")  # close_notify last


# --- KeyUpdate ---------------------------------------------------------------------------


@pytest.mark.parametrize("request_peer", [False, True])
@pytest.mark.parametrize("initiator", ["client", "server"])
def test_key_update_each_direction(tap: Tap, request_peer: bool, initiator: str) -> None:
    client, server, _, _ = connect(tap)
    a, b = (client, server) if initiator == "client" else (server, client)
    a.key_update(request_peer)
    a.send(b"after update")
    assert read_exact(b, 12) == b"after update"
    assert b.key_updates_received == 1
    assert b.key_updates_sent == (1 if request_peer else 0)
    b.send(b"reply")
    assert read_exact(a, 5) == b"reply"
    assert a.key_updates_received == (1 if request_peer else 0)
    assert_lock_step(client, server)
    tx_generation = a.session.client_generation if a is client else a.session.server_generation
    assert tx_generation == 1


def test_session_reflects_generations_and_seqs(tap: Tap) -> None:
    client, server, client_session, _ = connect(tap)
    client.send(b"x" * 10)
    read_exact(server, 10)
    client.key_update(True)
    client.send(b"z")
    assert read_exact(server, 1) == b"z"  # the server reads the request and answers it
    server.send(b"y")
    assert read_exact(client, 1) == b"y"
    session = client.session
    assert session.client_generation == 1 and session.server_generation == 1
    assert session.tx_seq == 1  # one data record under our new key
    assert session.rx_seq == 1  # one data record under the peer's new key
    expected = _expand_label(AES128, client_session.client_secret, b"traffic upd", 32)
    assert hmac.compare_digest(session.client_secret, expected)
    assert session.client_secret.hex() not in repr(session) + repr(client)


def test_thousand_key_updates_interleaved_in_lock_step(tap: Tap) -> None:
    client, server, client_session, server_session = connect(tap, rekey_after_records=None)
    rng = random.Random(1000)
    sent = {"client": bytearray(), "server": bytearray()}
    got = {"client": bytearray(), "server": bytearray()}
    done = threading.Event()

    def reader(name: str, conn: TlsConnection) -> None:
        while chunk := conn.recv(65536):
            got[name] += chunk

    readers = [
        threading.Thread(target=reader, args=("client", client)),
        threading.Thread(target=reader, args=("server", server)),
    ]
    for thread in readers:
        thread.start()
    for i in range(1000):
        conn, name = (client, "client") if rng.random() < 0.5 else (server, "server")
        conn.key_update(request_peer=rng.random() < 0.5)
        payload = f"{name}:{i};".encode() * rng.randint(1, 20)
        conn.send(payload)
        sent[name] += payload
    client.close()
    server.close()
    for thread in readers:
        thread.join(60)
    done.set()
    assert bytes(got["server"]) == bytes(sent["client"])
    assert bytes(got["client"]) == bytes(sent["server"])
    assert client.key_updates_sent + server.key_updates_sent >= 1000
    assert client.key_updates_sent == server.key_updates_received
    assert server.key_updates_sent == client.key_updates_received
    assert_lock_step(client, server)
    tap.close()
    up = Decryptor(AES128, client_session.client_secret)
    up.feed(bytes(tap.to_server))
    down = Decryptor(AES128, server_session.server_secret)
    down.feed(bytes(tap.to_client))
    assert up.application_data() == bytes(sent["client"])
    assert down.application_data() == bytes(sent["server"])
    assert up.generation == client.key_updates_sent == client.session.client_generation
    assert down.generation == server.key_updates_sent == server.session.server_generation
    assert hmac.compare_digest(up.secret, client.session.client_secret)
    assert hmac.compare_digest(down.secret, server.session.server_secret)


@pytest.mark.parametrize(("first", "second"), [(True, True), (True, False), (False, False)])
def test_simultaneous_key_updates_are_safe(tap: Tap, first: bool, second: bool) -> None:
    client, server, _, _ = connect(tap)
    for _ in range(3):
        client.key_update(first)  # both sent before either side reads
        server.key_update(second)
        client.send(b"c")
        server.send(b"s")
        assert read_exact(server, 1) == b"c"
        assert read_exact(client, 1) == b"s"
    # Drain any answers still in flight by one more round trip each way.
    client.send(b"C")
    assert read_exact(server, 1) == b"C"
    server.send(b"S")
    assert read_exact(client, 1) == b"S"
    client.send(b"!")
    assert read_exact(server, 1) == b"!"
    assert client.key_updates_sent == server.key_updates_received
    assert server.key_updates_sent == client.key_updates_received
    assert_lock_step(client, server)


def test_several_requests_in_a_row_are_answered_in_lock_step(tap: Tap) -> None:
    client, server, _, _ = connect(tap)
    for _ in range(3):
        server.key_update(True)
    server.send(b"go")
    # The client reads all three requests and the data before it sends anything.
    client_layer = client.layer
    assert read_exact(client, 2) == b"go"
    assert client.key_updates_received == 3
    # Each request was answered at once (the reader sends when no writer is busy): three
    # KeyUpdates, or fewer if they arrived together; never more than requested.
    assert 1 <= client.key_updates_sent <= 3
    client.send(b"ok")
    assert read_exact(server, 2) == b"ok"
    assert_lock_step(client, server)
    assert client_layer.kind == "user"


def test_automatic_rekey_by_records_both_directions(tap: Tap) -> None:
    client, server, _, _ = connect(tap, rekey_after_records=5)
    for i in range(23):
        client.send(bytes([i]))
    assert read_exact(server, 23) == bytes(range(23))
    assert client.key_updates_sent == 4  # before records 6, 11, 16 and 21
    assert server.key_updates_sent == 0  # the client rekeys in time: no request needed
    server.send(b"x")
    assert read_exact(client, 1) == b"x"
    assert_lock_step(client, server)


def test_peer_that_never_rekeys_is_asked_to(tap: Tap) -> None:
    client, server, _, _ = connect(tap, rekey_after_records=None)
    server_session = server.session
    server = TlsConnection(server.layer, server_session, rekey_after_records=5)
    for i in range(12):
        client.send(bytes([i]))
    assert read_exact(server, 12) == bytes(range(12))
    assert server.key_updates_sent == 1  # update_requested after the 6th record
    server.send(b"x")
    assert read_exact(client, 1) == b"x"
    assert client.key_updates_received == 1
    assert client.key_updates_sent == 1  # the answer
    client.send(b"y")
    assert read_exact(server, 1) == b"y"
    assert server.key_updates_received == 1
    assert_lock_step(client, server)


def test_default_rekey_limit_is_below_the_aes_gcm_limit() -> None:
    assert DEFAULT_REKEY_AFTER_RECORDS == 2**23
    assert DEFAULT_REKEY_AFTER_RECORDS < 2**24.5


# --- NewSessionTicket --------------------------------------------------------------------


def _nst(size: int) -> bytes:
    # No 0x18 byte: a record that continues a ticket must not start like a KeyUpdate (the
    # kernel's first-byte rule would pause on it).
    body = os.urandom(size).replace(b"\x18", b"\x19")
    return b"\x04" + len(body).to_bytes(3, "big") + body


def test_new_session_tickets_skipped_at_rx_seq_zero_onwards() -> None:
    a, b = socket.socketpair()
    with a, b:
        client_session, server_session = sessions(AES128)
        server_layer = UserRecordLayer(b, server_session)
        # Three tickets at receive sequence 0, 1, 2 (one alone, two coalesced, one split in
        # two records), then data.
        first, second, third = _nst(40), _nst(100), _nst(300)
        server_layer.send(first, 22)
        server_layer.send(second + third[:50], 22)
        server_layer.send(third[50:], 22)
        server_layer.send(b"hello")
        server_layer.close()
        client = TlsConnection(UserRecordLayer(a, client_session), client_session)
        assert client.recv() == b"hello"
        assert client.recv() == b""
        assert client.tickets_skipped == 3
        assert client.session.rx_seq == 5


# --- errors ------------------------------------------------------------------------------


def test_close_notify_is_eof(tap: Tap) -> None:
    client, server, _, _ = connect(tap)
    client.send(b"bye")
    client.close()
    assert server.recv() == b"bye"
    assert server.recv() == b""
    assert server.recv() == b""
    with pytest.raises(BrokenPipeError):
        client.send(b"more")


def test_tampered_record_raises_ebadmsg(tap: Tap) -> None:
    a, b = socket.socketpair()
    with a, b:
        client_session, server_session = sessions(AES128)
        sender = UserRecordLayer(a, client_session)
        wire = bytearray(sender._tx.seal(23, b"payload"))
        wire[-1] ^= 0x80
        a.sendall(bytes(wire))
        conn = TlsConnection(UserRecordLayer(b, server_session), server_session)
        with pytest.raises(OSError) as info:
            conn.recv()
        assert info.value.errno == errno.EBADMSG


@pytest.mark.parametrize(
    ("records", "alert", "text"),
    [
        ([b"\x0d\x00\x00\x02\x00\x00"], "unexpected_message", "CertificateRequest"),
        ([_nst(10) + b"\x18\x00\x00\x01\x00"], "unexpected_message", "KeyUpdate not"),
        ([b"\x18\x00\x00\x01\x00\x00"], "unexpected_message", "not alone"),
        ([b"\x18\x00\x00\x01\x07"], "illegal_parameter", "0 or 1"),
        ([b"\x04\xff\xff\xff"], "decode_error", "too large"),
    ],
)
def test_protocol_errors_send_an_alert(records: list[bytes], alert: str, text: str) -> None:
    a, b = socket.socketpair()
    a.settimeout(10)
    with a, b:
        client_session, server_session = sessions(AES128)
        peer = UserRecordLayer(a, client_session)
        for record in records:
            peer.send(record, 22)
        conn = TlsConnection(UserRecordLayer(b, server_session), server_session)
        with pytest.raises(TlsProtocolError) as info:
            conn.recv()
        assert text in str(info.value)
        assert info.value.alert == alert
        assert info.value.errno == errno.EPROTO
        assert "\n" not in str(info.value)
        with pytest.raises(AlertReceived) as sent:
            while True:
                peer.recv()
        assert sent.value.alert == alert
        with pytest.raises(TlsProtocolError, match="failed earlier"):
            conn.send(b"x")


def test_unexpected_content_type_is_a_protocol_error() -> None:
    a, b = socket.socketpair()
    with a, b:
        client_session, server_session = sessions(AES128)
        UserRecordLayer(a, client_session).send(b"\x01", 20)  # change_cipher_spec
        conn = TlsConnection(UserRecordLayer(b, server_session), server_session)
        with pytest.raises(TlsProtocolError, match="content type 20"):
            conn.recv()


def test_invalid_options_rejected(tap: Tap) -> None:
    client_session, _ = sessions(AES128)
    layer = UserRecordLayer(tap.client, client_session)
    with pytest.raises(ValueError, match="rekey_after_records must be positive"):
        TlsConnection(layer, client_session, rekey_after_records=0)
    conn = TlsConnection(layer, client_session)
    with pytest.raises(ValueError, match="bufsize"):
        conn.recv(0)


# --- asyncio -----------------------------------------------------------------------------


def test_asyncio_bulk_and_key_updates() -> None:
    async def main() -> None:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
        with a, b:
            a.setblocking(False)
            b.setblocking(False)
            client_session, server_session = sessions(CHACHA)
            client = TlsConnection(
                UserRecordLayer(a, client_session), client_session, rekey_after_records=7
            )
            server = TlsConnection(UserRecordLayer(b, server_session), server_session)
            up, down = os.urandom(256 * 1024), os.urandom(256 * 1024)

            async def write(conn: TlsConnection, data: bytes) -> None:
                for i in range(0, len(data), 10000):
                    if i % 50000 == 0:
                        await conn.akey_update(request_peer=True)
                    await conn.asend(data[i : i + 10000])
                await conn.aclose()

            async def read(conn: TlsConnection) -> bytes:
                chunks = []
                while chunk := await conn.arecv(65536):
                    chunks.append(chunk)
                return b"".join(chunks)

            _, _, got_up, got_down = await asyncio.gather(
                write(client, up), write(server, down), read(server), read(client)
            )
            assert got_up == up
            assert got_down == down
            assert client.key_updates_sent >= 6 and server.key_updates_sent >= 6
            assert client.key_updates_sent == server.key_updates_received
            assert server.key_updates_sent == client.key_updates_received
            assert_lock_step(client, server)

    asyncio.run(main())


# --- interoperability with OpenSSL (handshake by tlslite-ng, then handed to us) -----------


def _make_certificate(tmp_path) -> tuple[str, str]:
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=localhost"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def _tls13_settings() -> HandshakeSettings:
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    settings.ticket_count = 0
    return settings


def _session_from_tlslite(tls: TLSConnection, role: Role) -> Session:
    """What a handshake engine hands over: suite and both application traffic secrets."""
    return Session(
        role,
        CipherSuite.from_code(tls.session.cipherSuite),
        client_secret=bytes(tls.session.cl_app_secret),
        server_secret=bytes(tls.session.sr_app_secret),
    )


def _read_line(conn: TlsConnection) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        chunk = conn.recv()
        assert chunk, f"EOF after {out!r}"
        out += chunk
    return out


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@needs_openssl
@pytest.mark.parametrize("suite", [AES256])
def test_openssl_server_answers_our_key_updates(tmp_path, suite: CipherSuite) -> None:
    """OpenSSL ``s_server -rev`` echoes lines reversed; we update keys before every line.

    OpenSSL also sends two NewSessionTickets at receive sequence 0 and 1, which we skip, and
    must answer every update_requested with a KeyUpdate of its own.
    """
    cert, key = _make_certificate(tmp_path)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", cert, "-key", key,
         "-tls1_3", "-rev", "-num_tickets", "2", "-ciphersuites", suite.iana_name],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        while b"ACCEPT" not in (line := server.stdout.readline()):
            assert line, "openssl s_server did not start"
        sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        with sock:
            tls = TLSConnection(sock)
            tls.handshakeClientCert(settings=_tls13_settings())
            session = _session_from_tlslite(tls, Role.CLIENT)
            assert session.suite is suite
            conn = TlsConnection(UserRecordLayer(sock, session), session)
            conn.send(b"hello\n")
            assert _read_line(conn) == b"olleh\n"
            assert conn.tickets_skipped == 2
            # s_server -rev sleeps one second after every read that yields no data, which
            # a KeyUpdate always causes: keep the count small.
            for i in range(4):
                conn.key_update(request_peer=i % 2 == 0)
                conn.send(b"line %d\n" % i)
                assert _read_line(conn) == (b"line %d" % i)[::-1] + b"\n"
            assert conn.key_updates_sent == 4
            assert conn.key_updates_received == 2  # one answer per update_requested
            assert conn.session.server_generation == 2
            conn.close()
            assert conn.recv() == b""  # OpenSSL answers close_notify with its own
    finally:
        server.kill()
        server.wait()


@needs_openssl
@pytest.mark.parametrize("suite", list(CipherSuite))
def test_openssl_client_key_updates_reach_us(tmp_path, suite: CipherSuite) -> None:
    """``openssl s_client`` sends KeyUpdates on the "K"/"k" commands; we follow and answer."""
    cert, key = _make_certificate(tmp_path)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = subprocess.Popen(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{listener.getsockname()[1]}",
             "-tls1_3", "-ciphersuites", suite.iana_name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        listener.settimeout(20)
        sock, _ = listener.accept()
    assert client.stdin is not None and client.stdout is not None
    try:
        with sock:
            sock.settimeout(20)
            tls = TLSConnection(sock)
            chain = X509CertChain()
            with open(cert) as handle:
                chain.parsePemList(handle.read())
            with open(key) as handle:
                private_key = parsePEMKey(handle.read(), private=True)
            tls.handshakeServer(certChain=chain, privateKey=private_key, settings=_tls13_settings())
            session = _session_from_tlslite(tls, Role.SERVER)
            conn = TlsConnection(UserRecordLayer(sock, session), session)

            def typed(text: bytes) -> None:
                client.stdin.write(text)
                client.stdin.flush()

            def client_prints(text: bytes) -> None:
                while text not in (line := client.stdout.readline()):
                    assert line, f"s_client ended before printing {text!r}"

            typed(b"hello\n")
            assert _read_line(conn) == b"hello\n"
            for i in range(6):
                typed(b"K\n" if i % 2 == 0 else b"k\n")
                client_prints(b"KEYUPDATE")  # s_client reads one command per read of stdin
                typed(b"after %d\n" % i)
                assert _read_line(conn) == b"after %d\n" % i
                assert conn.key_updates_received == i + 1
                conn.send(b"pong %d\n" % i)
                client_prints(b"pong %d" % i)  # OpenSSL decrypted it under our current key
            assert conn.key_updates_sent == 3  # answers to the three "K" requests
            client.stdin.close()
            assert conn.recv() == b""
    finally:
        client.kill()
        client.wait()


def test_automatic_rekey_can_request_the_peer(tap: Tap) -> None:
    client, server, _, _ = connect(tap, rekey_after_records=3)
    client = TlsConnection(client.layer, client.session, rekey_after_records=3,
                           rekey_request_peer=True)  # fmt: skip
    for i in range(7):
        client.send(bytes([i]))
    assert read_exact(server, 7) == bytes(range(7))
    assert client.key_updates_sent == 2  # before records 4 and 7, both update_requested
    assert server.key_updates_sent == 2  # one answer each
    server.send(b"x")
    assert read_exact(client, 1) == b"x"
    assert client.key_updates_received == 2
    assert_lock_step(client, server)
