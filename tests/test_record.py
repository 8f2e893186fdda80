"""Record layer tests: RFC 8448 records byte-exact, kTLS semantics, errors, asyncio.

Everything runs over real socket pairs. Sessions use the RFC 8448 §3 secrets where the RFC has
the records to compare with, and random secrets elsewhere. The kernel layer needs a kTLS
kernel; here it is only checked to fail clearly (the VM suite proves the rest).
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import socket

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ktlsd.tls import ktls
from ktlsd.tls.keyschedule import encode_key_update, next_traffic_secret, record_nonce, traffic_keys
from ktlsd.tls.record import (
    AlertReceived,
    KernelRecordLayer,
    Record,
    RecordError,
    UserRecordLayer,
    open_record_layer,
)
from ktlsd.tls.session import CipherSuite, Role, Session

AES128 = CipherSuite.TLS_AES_128_GCM_SHA256


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", ""))


# RFC 8448 §3 (Simple 1-RTT Handshake), typed in from the RFC.
C_AP = h("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
S_AP = h("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
PAYLOAD = bytes(range(0x32))
C_APP_REC = h(
    "17 03 03 00 43 a2 3f 70 54 b6 2c 94 d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa 66 bc"
    "ab 3f 2b 98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62 92 a2 97 70 14 bd"
    "1e 3d ea e6 3a ee bb 21 69 49 15 e4"
)
S_APP_REC = h(
    "17 03 03 00 43 2e 93 7e 11 ef 4a c7 40 e5 38 ad 36 00 5f c4 a4 69 32 fc 32 25 d0 5f 82 aa"
    "1b 36 e3 0e fa f9 7d 90 e6 df fc 60 2d cb 50 1a 59 a8 fc c4 9c 4b f2 e5 f0 a2 1c 00 47 c2"
    "ab f3 32 54 0d d0 32 e1 67 c2 95 5d"
)
C_ALERT_REC = h("17 03 03 00 13 c9 87 27 60 65 56 66 b7 4d 7f f1 15 3e fd 6d b6 d0 b0 e3")
S_ALERT_REC = h("17 03 03 00 13 b5 8f d6 71 66 eb f5 99 d2 47 20 cf be 7e fa 7a 88 64 a9")
# {server} NewSessionTicket, the first record under the server application key (seq 0).
S_NST_REC = h(
    "17 03 03 00 de 3a 6b 8f 90 41 4a 97 d6 95 9c 34 87 68 0d e5 13 4a 2b 24 0e 6c ff ac 11 6e"
    "95 d4 1d 6a f8 f6 b5 80 dc f3 d1 1d 63 c7 58 db 28 9a 01 59 40 25 2f 55 71 3e 06 1d c1 3e"
    "07 88 91 a3 8e fb cf 57 53 ad 8e f1 70 ad 3c 73 53 d1 6d 9d a7 73 b9 ca 7f 2b 9f a1 b6 c0"
    "d4 a3 d0 3f 75 e0 9c 30 ba 1e 62 97 2a c4 6f 75 f7 b9 81 be 63 43 9b 29 99 ce 13 06 46 15"
    "13 98 91 d5 e4 c5 b4 06 f1 6e 3f c1 81 a7 7c a4 75 84 00 25 db 2f 0a 77 f8 1b 5a b0 5b 94"
    "c0 13 46 75 5f 69 23 2c 86 51 9d 86 cb ee ac 87 aa c3 47 d1 43 f9 60 5d 64 f6 50 db 4d 02"
    "3e 70 e9 52 ca 49 fe 51 37 12 1c 74 bc 26 97 68 7e 24 87 46 d6 df 35 30 05 f3 bc e1 86 96"
    "12 9c 81 53 55 6b 3b 6c 67 79 b3 7b f1 59 85 68 4f"
)


def rfc_session(role: Role, tx_seq: int, rx_seq: int) -> Session:
    return Session(role, AES128, client_secret=C_AP, server_secret=S_AP, tx_seq=tx_seq,
                   rx_seq=rx_seq)  # fmt: skip


def random_sessions(suite: CipherSuite) -> tuple[Session, Session]:
    c, s = os.urandom(suite.hash_length), os.urandom(suite.hash_length)
    return (
        Session(Role.CLIENT, suite, client_secret=c, server_secret=s),
        Session(Role.SERVER, suite, client_secret=c, server_secret=s),
    )


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "peer closed early"
        out += chunk
    return out


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    with a, b:
        yield a, b


@pytest.fixture
def layers(pair):
    a, b = pair
    client, server = random_sessions(AES128)
    return UserRecordLayer(a, client), UserRecordLayer(b, server), a, b


# --- RFC 8448 byte-exact -----------------------------------------------------------------


def test_rfc8448_client_records_byte_exact(pair) -> None:
    sock, peer = pair
    layer = UserRecordLayer(sock, rfc_session(Role.CLIENT, tx_seq=0, rx_seq=1))
    layer.send(PAYLOAD)
    assert recv_exact(peer, len(C_APP_REC)) == C_APP_REC
    layer.close()
    assert recv_exact(peer, len(C_ALERT_REC)) == C_ALERT_REC
    assert peer.recv(1) == b""  # write side shut down after close_notify
    peer.sendall(S_APP_REC + S_ALERT_REC)
    assert layer.recv() == Record(23, PAYLOAD)
    record = layer.recv()
    assert record.eof and record == Record(23, b"")
    assert layer.recv().eof  # stays at EOF
    assert layer.sequence_numbers() == (2, 3)


def test_rfc8448_server_records_byte_exact(pair) -> None:
    sock, peer = pair
    layer = UserRecordLayer(sock, rfc_session(Role.SERVER, tx_seq=1, rx_seq=0))
    layer.send(PAYLOAD)
    assert recv_exact(peer, len(S_APP_REC)) == S_APP_REC
    layer.close()
    assert recv_exact(peer, len(S_ALERT_REC)) == S_ALERT_REC
    peer.sendall(C_APP_REC + C_ALERT_REC)
    assert layer.recv().data == PAYLOAD
    assert layer.recv().eof


def test_rfc8448_new_session_ticket_delivered_as_handshake_record(pair) -> None:
    sock, peer = pair
    layer = UserRecordLayer(sock, rfc_session(Role.CLIENT, tx_seq=0, rx_seq=0))
    peer.sendall(S_NST_REC + S_APP_REC)
    ticket = layer.recv()
    assert ticket.content_type == 22
    assert ticket.data[0] == 4  # NewSessionTicket
    assert int.from_bytes(ticket.data[1:4], "big") == len(ticket.data) - 4
    assert layer.recv() == Record(23, PAYLOAD)  # a NewSessionTicket does not pause RX


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_round_trip_every_suite(pair, suite: CipherSuite) -> None:
    a, b = pair
    client, server = random_sessions(suite)
    left, right = UserRecordLayer(a, client), UserRecordLayer(b, server)
    for size in (1, 100, 16384):
        data = os.urandom(size)
        left.send(data)
        assert right.recv() == Record(23, data)
        handshake = b"\x04" + data[1:]  # never starts with 0x18, which would pause RX
        right.send(handshake, content_type=22)
        assert left.recv() == Record(22, handshake)
    assert left.sequence_numbers() == (3, 3)
    assert right.sequence_numbers() == (3, 3)


def test_small_bufsize_returns_the_rest_next_time(layers) -> None:
    left, right, _, _ = layers
    left.send(b"abcdefghij")
    assert right.recv(4) == Record(23, b"abcd")
    assert right.pending() == 6
    assert right.recv(100) == Record(23, b"efghij")
    assert right.pending() == 0


def test_empty_application_send_is_a_no_op_and_empty_records_are_skipped(layers) -> None:
    left, right, a, _ = layers
    left.send(b"")
    assert left.sequence_numbers()[0] == 0
    # A peer may send a zero-length application data record; it must not look like EOF.
    a.sendall(left._tx.seal(23, b"") + left._tx.seal(23, b"after"))
    assert right.recv() == Record(23, b"after")


def test_padding_is_stripped(pair) -> None:
    a, b = pair
    client, server = random_sessions(AES128)
    receiver = UserRecordLayer(b, server)
    # Seal by hand with padding zeros after the content type.
    k = traffic_keys(AES128, client.client_secret)
    inner = b"padded" + b"\x17" + bytes(100)
    header = b"\x17\x03\x03" + (len(inner) + 16).to_bytes(2, "big")
    a.sendall(header + AESGCM(k.key).encrypt(record_nonce(k.iv, 0), inner, header))
    assert receiver.recv() == Record(23, b"padded")


# --- KeyUpdate semantics -----------------------------------------------------------------


def test_key_update_record_pauses_rx_until_new_key(pair) -> None:
    a, b = pair
    client, server = random_sessions(AES128)
    left, right = UserRecordLayer(a, client), UserRecordLayer(b, server)
    next_secret = next_traffic_secret(AES128, client.client_secret)
    left.send(encode_key_update(False), content_type=22)
    left.install_tx_key(next_secret)  # TX never pauses: send under the new key at once
    left.send(b"under the new key")
    assert right.recv() == Record(22, encode_key_update(False))
    for _ in range(3):
        with pytest.raises(OSError) as info:
            right.recv()
        assert info.value.errno == errno.EKEYEXPIRED
    # Nothing was read past the KeyUpdate record: the data is still in the socket.
    assert right.pending() == 0
    assert select.select([b], [], [], 0)[0] == [b]
    right.send(b"tx still works")  # our TX is not affected
    assert left.recv() == Record(23, b"tx still works")
    right.install_rx_key(next_secret)
    assert right.recv() == Record(23, b"under the new key")
    assert right.sequence_numbers() == (1, 1)


def test_handshake_record_not_starting_with_key_update_does_not_pause(layers) -> None:
    left, right, _, _ = layers
    left.send(b"\x04\x00\x00\x01\x00", content_type=22)  # looks like a NewSessionTicket
    left.send(b"data")
    assert right.recv().content_type == 22
    assert right.recv() == Record(23, b"data")


# --- errors ------------------------------------------------------------------------------


def test_tampered_record_is_ebadmsg_and_sticky(layers) -> None:
    left, right, a, _ = layers
    wire = bytearray(left._tx.seal(23, b"secret payload"))
    wire[10] ^= 0x01
    a.sendall(bytes(wire))
    for _ in range(2):
        with pytest.raises(OSError) as info:
            right.recv()
        assert info.value.errno == errno.EBADMSG
        assert "bad_record_mac" in str(info.value)
        assert "\n" not in str(info.value)


def test_oversize_send_rejected(layers) -> None:
    left, _, _, _ = layers
    with pytest.raises(ValueError, match="exceeds 2\\^14"):
        left.send(bytes(16385))
    with pytest.raises(ValueError, match="must not be empty"):
        left.send(b"", content_type=22)
    assert left.sequence_numbers()[0] == 0


def test_oversize_record_on_the_wire_is_emsgsize(layers) -> None:
    _, right, a, _ = layers
    a.sendall(b"\x17\x03\x03" + (2**14 + 257).to_bytes(2, "big"))
    with pytest.raises(OSError) as info:
        right.recv()
    assert info.value.errno == errno.EMSGSIZE
    assert "record_overflow" in str(info.value)


def test_oversize_plaintext_inside_a_valid_record_is_emsgsize(pair) -> None:
    a, b = pair
    client, server = random_sessions(AES128)
    receiver = UserRecordLayer(b, server)
    k = traffic_keys(AES128, client.client_secret)
    inner = bytes(2**14 + 1) + b"\x17"
    header = b"\x17\x03\x03" + (len(inner) + 16).to_bytes(2, "big")
    a.sendall(header + AESGCM(k.key).encrypt(record_nonce(k.iv, 0), inner, header))
    with pytest.raises(OSError) as info:
        receiver.recv()
    assert info.value.errno == errno.EMSGSIZE


def test_plaintext_outer_type_rejected(layers) -> None:
    _, right, a, _ = layers
    a.sendall(b"\x15\x03\x03\x00\x02\x02\x28")  # a plaintext alert after the handshake
    with pytest.raises(OSError) as info:
        right.recv()
    assert info.value.errno == errno.EBADMSG


def test_fatal_alert_raises_with_its_name(layers) -> None:
    left, right, _, _ = layers
    left.send(b"\x01\x5a", content_type=21)  # user_canceled: skipped
    left.send(b"\x02\x50", content_type=21)  # internal_error
    with pytest.raises(AlertReceived) as info:
        right.recv()
    assert info.value.alert == "internal_error"
    assert info.value.errno == errno.ECONNABORTED
    assert str(info.value) == "peer sent TLS alert internal_error"


def test_tcp_eof_on_record_boundary_is_eof_and_mid_record_is_an_error(layers) -> None:
    left, right, a, _ = layers
    left.send(b"last")
    a.shutdown(socket.SHUT_WR)
    assert right.recv() == Record(23, b"last")
    assert right.recv().eof


def test_tcp_eof_mid_record_is_connection_reset(layers) -> None:
    left, right, a, _ = layers
    wire = left._tx.seal(23, b"cut short")
    a.sendall(wire[:-3])
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionResetError, match="middle of a TLS record"):
        right.recv()


def test_send_after_close_is_epipe(layers) -> None:
    left, right, _, _ = layers
    left.close()
    left.close()  # idempotent
    with pytest.raises(BrokenPipeError):
        left.send(b"late")
    assert right.recv().eof


def test_repr_hides_secrets(pair) -> None:
    a, _ = pair
    session = rfc_session(Role.CLIENT, 0, 0)
    layer = UserRecordLayer(a, session)
    text = repr(layer) + repr(layer._tx) + repr(session)
    for secret in (C_AP, S_AP, traffic_keys(AES128, C_AP).key):
        assert secret.hex() not in text


# --- fatal errors: one alert, no close_notify after it, unusable afterwards --------------


def read_until_eof(layer: UserRecordLayer) -> list[Record]:
    """Every record ``layer`` receives until end of stream (TCP EOF or close_notify)."""
    records = []
    while not (record := layer.recv()).eof:
        records.append(record)
    return records


def test_fatal_error_sends_its_alert_once_then_nothing(layers) -> None:
    """A bad record: the matching fatal alert goes out at once, then TCP EOF — close() adds no
    close_notify, send() raises, recv() raises the same error again."""
    left, right, a, _ = layers
    wire = bytearray(left._tx.seal(23, b"payload"))
    wire[-1] ^= 0x01
    a.sendall(bytes(wire))
    with pytest.raises(RecordError) as info:
        right.recv()
    assert info.value.errno == errno.EBADMSG
    assert info.value.alert == "bad_record_mac"
    right.close()
    right.close()
    with pytest.raises(BrokenPipeError, match="connection failed"):
        right.send(b"late")
    with pytest.raises(RecordError, match="bad_record_mac"):
        right.recv()
    assert right.failure is info.value
    with pytest.raises(AlertReceived) as sent:
        read_until_eof(left)
    assert sent.value.alert == "bad_record_mac"
    assert a.recv(100) == b""  # nothing after the alert: end of stream


@pytest.mark.parametrize(
    ("wire", "alert"),
    [
        (b"\x17\x03\x03\x40\x12" + bytes(16402), "record_overflow"),  # 2^14+1 plaintext + 1
        (b"\x14\x03\x03\x00\x01\x01", "unexpected_message"),  # change_cipher_spec
        (b"\x17\x03\x02\x00\x20" + bytes(32), "decode_error"),  # bad version
        (b"\x17\x03\x03\x00\x08" + bytes(8), "bad_record_mac"),  # shorter than a tag
    ],
)
def test_bad_header_alerts(layers, wire: bytes, alert: str) -> None:
    left, right, a, _ = layers
    a.sendall(wire)
    with pytest.raises(RecordError) as info:
        right.recv()
    assert info.value.alert == alert
    with pytest.raises(AlertReceived) as sent:
        read_until_eof(left)
    assert sent.value.alert == alert


def test_peer_fatal_alert_gets_no_answer(layers) -> None:
    left, right, a, _ = layers
    left.send(b"\x02\x28", content_type=21)  # handshake_failure
    with pytest.raises(AlertReceived):
        right.recv()
    right.close()  # no close_notify after a fatal alert either way
    with pytest.raises(BrokenPipeError):
        right.send(b"late")
    assert a.recv(100) == b""


def test_abort_sends_the_alert_once_and_never_close_notify(layers) -> None:
    left, right, _, _ = layers
    error = OSError(errno.EPROTO, "bad KeyUpdate")
    right.abort(error, 47)
    right.abort(OSError(errno.EPROTO, "second"), 10)  # the first failure counts
    right.close()
    with pytest.raises(OSError, match="bad KeyUpdate"):
        right.recv()
    with pytest.raises(AlertReceived) as sent:
        read_until_eof(left)
    assert sent.value.alert == "illegal_parameter"


def test_no_alert_after_our_close_notify(layers) -> None:
    left, right, a, _ = layers
    right.close()  # close_notify: our write side is done
    a.sendall(b"\x14\x03\x03\x00\x01\x01")
    with pytest.raises(RecordError):
        right.recv()
    wire = b""
    while chunk := a.recv(4096):
        wire += chunk
    assert len(wire) == 5 + 2 + 1 + 16  # the close_notify record alone: no alert after it
    assert left._rx.open(wire[:5], wire[5:]) == (21, b"\x01\x00")


def test_async_fatal_error_sends_its_alert_and_no_close_notify() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        b.setblocking(False)
        with a, b:
            client, server = random_sessions(AES128)
            left, right = UserRecordLayer(a, client), UserRecordLayer(b, server)
            left.send(b"\x02", content_type=21)  # an alert of one byte: malformed
            with pytest.raises(RecordError) as info:
                await right.arecv()
            assert info.value.alert == "decode_error"
            await right.aclose()
            with pytest.raises(BrokenPipeError):
                await right.asend(b"late")
            with pytest.raises(AlertReceived) as sent:
                read_until_eof(left)
            assert sent.value.alert == "decode_error"

    asyncio.run(main())


# --- asyncio -----------------------------------------------------------------------------


def test_async_round_trip_and_eof() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        a.setblocking(False)
        b.setblocking(False)
        with a, b:
            client, server = random_sessions(CipherSuite.TLS_CHACHA20_POLY1305_SHA256)
            left, right = UserRecordLayer(a, client), UserRecordLayer(b, server)
            blob = os.urandom(16384)

            async def writer() -> None:
                for _ in range(64):
                    await left.asend(blob)
                await left.aclose()

            task = asyncio.create_task(writer())
            received = 0
            while True:
                record = await right.arecv()
                if record.eof:
                    break
                assert record.data == blob
                received += len(record.data)
            await task
            assert received == 64 * 16384

    asyncio.run(main())


def test_async_needs_a_non_blocking_socket(layers) -> None:
    left, _, _, _ = layers
    with pytest.raises(ValueError, match="non-blocking"):
        asyncio.run(left.arecv())


# --- choosing a layer --------------------------------------------------------------------


def test_open_record_layer_kinds(pair) -> None:
    a, _ = pair
    client, _ = random_sessions(AES128)
    assert open_record_layer(a, client, "user").kind == "user"
    assert open_record_layer(a, client, "auto").kind == "user"  # not TCP
    with pytest.raises(ValueError, match="auto, kernel or user"):
        open_record_layer(a, client, "fast")


@pytest.mark.skipif(ktls.probe().ulp, reason="this kernel has kTLS")
def test_kernel_layer_without_ktls_is_a_clear_error() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()) as sock:
            client, _ = random_sessions(AES128)
            with pytest.raises(ktls.KtlsError, match="kernel has no kTLS"):
                open_record_layer(sock, client, "kernel")
            with pytest.raises(ktls.KtlsError, match="kernel has no kTLS"):
                KernelRecordLayer(sock, client)
            assert open_record_layer(sock, client, "auto").kind == "user"


# --- cryptography without encrypt_into/decrypt_into (before 45; Debian 13 ships 43) --------


class _AeadWithoutInto:
    """An AEAD object as cryptography < 45 offers it: encrypt and decrypt only."""

    def __init__(self, aead: object) -> None:
        self._aead = aead

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, data, aad)  # type: ignore[attr-defined, no-any-return]

    def decrypt(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        return self._aead.decrypt(nonce, data, aad)  # type: ignore[attr-defined, no-any-return]


def test_records_are_the_same_without_the_into_calls(pair, monkeypatch) -> None:
    """RFC 8448's records come out byte for byte, and are read back, when the installed
    cryptography has no encrypt_into/decrypt_into (the guest's and the .deb's python3-
    cryptography 43): the record layer falls back to encrypt/decrypt with one copy."""
    from ktlsd.tls import record

    native = record._into_calls
    fallbacks: list[object] = []

    def without_into(aead: object) -> object:
        calls = native(_AeadWithoutInto(aead))  # type: ignore[arg-type]
        fallbacks.append(calls)
        return calls

    monkeypatch.setattr(record, "_into_calls", without_into)
    sock, peer = pair
    layer = UserRecordLayer(sock, rfc_session(Role.CLIENT, tx_seq=0, rx_seq=1))
    assert fallbacks, "the record layer did not ask for its AEAD calls"
    layer.send(PAYLOAD)
    assert recv_exact(peer, len(C_APP_REC)) == C_APP_REC
    peer.sendall(S_APP_REC)
    assert layer.recv() == Record(23, PAYLOAD)
    big = os.urandom(3 * 16384 + 5)  # several records in one send, and their reading
    a, b = socket.socketpair()
    with a, b:
        client, server = random_sessions(AES128)
        left, right = UserRecordLayer(a, client), UserRecordLayer(b, server)
        left.send_data(big)
        got = b""
        while len(got) < len(big):
            got += right.recv().data
        assert got == big
