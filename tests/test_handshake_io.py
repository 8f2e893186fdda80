"""How the handshake engine takes bytes: bulk reads that stop at exactly the handshake's last
record, records in any pieces, peer alerts read from OpenSSL's error queue, the context cache.

The driver peeks at the socket and consumes only what the core took; these tests pin the
boundary from both ends with real sockets (bytes after the last handshake record stay in the
socket, whole or partial) and from the sans-I/O core with every way of cutting the stream.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from pki import Authority
from tls13_records import recv_record
from waiting import ThreadResult

from ktlsd.credentials import X509Credentials
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.tls.handshake import (
    PskKey,
    TlsConfig,
    TlsHandshake,
    context_cache_stats,
    handshake_blocking,
    perform_handshake,
)
from ktlsd.tls.session import Role, Session

TIMEOUT = 10.0
PSK = PskKey(b"io-test", bytes(range(7, 39)))


def client_psk() -> TlsConfig:
    return TlsConfig(role=Role.CLIENT, psk_keys=(PSK,))


def server_psk() -> TlsConfig:
    return TlsConfig(role=Role.SERVER, psk_lookup={PSK.identity: PSK}.get)


def split_records(data: bytes) -> list[bytes]:
    records = []
    while data:
        end = 5 + int.from_bytes(data[3:5], "big")
        records.append(data[:end])
        data = data[end:]
    return records


# A record of application data type with a made-up body, a partial one, three stray bytes.
TRAILERS = {
    "whole record": b"\x17\x03\x03\x00\x20" + bytes(range(32)),
    "two records": (b"\x17\x03\x03\x00\x11" + bytes(17)) * 2,
    "partial record": b"\x17\x03\x03\x04\x00" + bytes(100),
    "three bytes": b"\x17\x03\x03",
}


@pytest.mark.parametrize("trailer", TRAILERS.values(), ids=TRAILERS.keys())
def test_client_leaves_what_follows_the_server_finished_in_the_socket(trailer: bytes) -> None:
    """The server's whole last flight and more in ONE write: the client takes the flight and
    not one byte of what follows, whole records, a partial one or a stray header."""
    csock, ssock = socket.socketpair()
    with csock, ssock:
        client = ThreadResult(lambda: handshake_blocking(csock, client_psk(), timeout=TIMEOUT))
        with TlsHandshake(server_psk()) as server:
            assert server.start() == b""
            flight = server.receive_record(recv_record(ssock))
            ssock.sendall(flight + trailer)
            session = client.result(TIMEOUT)
            assert isinstance(session, Session)
            while server.wants_input:  # the client's last flight
                server.receive_record(recv_record(ssock))
            server.check()
            assert server.session().server_secret == session.server_secret
        csock.setblocking(False)
        assert csock.recv(65536) == trailer


def test_server_leaves_what_follows_the_client_finished_in_the_socket() -> None:
    csock, ssock = socket.socketpair()
    with csock, ssock:
        server = ThreadResult(lambda: handshake_blocking(ssock, server_psk(), timeout=TIMEOUT))
        with TlsHandshake(client_psk()) as client:
            csock.sendall(client.start())
            out = b""
            while client.wants_input:
                out = client.receive_record(recv_record(csock))
            client.check()
        trailer = TRAILERS["two records"]
        csock.sendall(out + trailer)
        assert isinstance(server.result(TIMEOUT), Session)
        ssock.setblocking(False)
        assert ssock.recv(65536) == trailer


def dribble(sock: socket.socket, data: bytes, piece: int) -> None:
    """Write ``data`` a few bytes at a time, pausing so that the reader sees the pieces."""
    for start in range(0, len(data), piece):
        sock.sendall(data[start : start + piece])
        time.sleep(0.0005)


@pytest.mark.parametrize("piece", [1, 3, 7, 64])
def test_records_that_arrive_in_pieces(piece: int) -> None:
    """The server's flight written a few bytes at a time (records split anywhere, headers
    included): the client puts them together and still leaves the trailer in the socket."""
    csock, ssock = socket.socketpair()
    with csock, ssock:
        client = ThreadResult(lambda: handshake_blocking(csock, client_psk(), timeout=TIMEOUT))
        with TlsHandshake(server_psk()) as server:
            server.start()
            flight = server.receive_record(recv_record(ssock))
            trailer = TRAILERS["partial record"]
            dribble(ssock, flight + trailer, piece)
            assert isinstance(client.result(TIMEOUT), Session)
        csock.setblocking(False)
        assert csock.recv(65536) == trailer


class Stream:
    """One direction of a connection as a byte string the receiver takes from."""

    def __init__(self) -> None:
        self.bytes = b""

    def offer(self, receiver: TlsHandshake, piece: int) -> None:
        """Show ``receiver`` the next ``piece`` bytes (as a peek would); drop what it took."""
        shown = self.bytes[:piece]
        taken, out = receiver.receive(shown)
        assert 0 <= taken <= len(shown)
        self.bytes = self.bytes[taken:]
        self.reply = out


@pytest.mark.parametrize("piece", [1, 2, 5, 6, 100, 1 << 16])
def test_core_takes_exactly_the_handshake_bytes_however_they_are_cut(piece: int) -> None:
    """Sans-I/O: two cores, the byte streams cut into pieces of every size, a trailer after
    each side's last flight. Each core takes all handshake bytes and never the trailer."""
    trailer = TRAILERS["whole record"] + TRAILERS["partial record"]
    with TlsHandshake(client_psk()) as client, TlsHandshake(server_psk()) as server:
        to_server, to_client = Stream(), Stream()
        to_server.bytes = client.start()
        assert server.start() == b""
        for _ in range(100_000):
            if not (client.wants_input or server.wants_input):
                break
            if to_server.bytes and server.wants_input:
                to_server.offer(server, piece)
                to_client.bytes += to_server.reply
                if not server.wants_input:
                    to_client.bytes += trailer
            if to_client.bytes and client.wants_input:
                to_client.offer(client, piece)
                to_server.bytes += to_client.reply
                if not client.wants_input:
                    to_server.bytes += trailer
        client.check()
        server.check()
        assert to_client.bytes == trailer
        assert to_server.bytes == trailer
        assert client.session().client_secret == server.session().client_secret


def test_receive_after_the_end_is_refused() -> None:
    with TlsHandshake(client_psk()) as client, TlsHandshake(server_psk()) as server:
        flight = server.receive(client.start())[1]
        client_finished = client.receive(flight)[1]
        server.receive(client_finished)
        assert client.complete and server.complete
        with pytest.raises(HandshakeError, match="after the handshake ended"):
            client.receive(b"\x17\x03\x03\x00\x11" + bytes(17))


ALERTS = {
    0: (FailureCause.PEER_CLOSED, "peer closed the connection"),
    40: (FailureCause.PEER_REJECTED, "peer sent alert handshake failure"),
    48: (FailureCause.PEER_REJECTED, "peer sent alert unknown CA"),
    50: (FailureCause.PROTOCOL_ERROR, "peer sent alert decode error"),
    115: (FailureCause.UNKNOWN_PSK_IDENTITY, "peer sent alert unknown PSK identity"),
}


@pytest.mark.parametrize("description", ALERTS, ids=[str(a) for a in ALERTS])
def test_the_peers_alert_is_read_from_the_error_queue(description: int) -> None:
    """No info callback: the alert a peer answers our ClientHello with comes from OpenSSL's
    error queue (close_notify from SSL_ERROR_ZERO_RETURN) and decides the cause."""
    csock, ssock = socket.socketpair()
    with csock, ssock:
        client = ThreadResult(lambda: handshake_blocking(csock, client_psk(), timeout=TIMEOUT))
        recv_record(ssock)
        level = 1 if description == 0 else 2
        ssock.sendall(bytes((21, 3, 3, 0, 2, level, description)))
        with pytest.raises(HandshakeError) as info:
            client.result(TIMEOUT)
    cause, reason = ALERTS[description]
    assert info.value.cause is cause
    assert info.value.reason.startswith(reason)


def test_equal_configurations_share_one_context(tmp_path) -> None:
    """The SSL_CTX cache is keyed by value: configurations built anew for every handshake (as
    the agent builds them) find the context the first one built."""
    ca = Authority.create(tmp_path, "ecdsa", "IO CA")
    server_cert = ca.issue_server()

    def configs() -> tuple[TlsConfig, TlsConfig]:
        credentials = X509Credentials.from_pem_files(
            str(server_cert.cert_path), str(server_cert.key_path)
        )
        return (
            TlsConfig(role=Role.CLIENT, truststore=str(ca.cert_path), peername="localhost"),
            TlsConfig(role=Role.SERVER, credentials=credentials),
        )

    async def one() -> None:
        client, server = configs()
        a, b = socket.socketpair()
        with a, b:
            await asyncio.gather(
                perform_handshake(a, client, timeout=TIMEOUT),
                perform_handshake(b, server, timeout=TIMEOUT),
            )

    hits, misses, _ = context_cache_stats()
    for _ in range(4):
        asyncio.run(one())
    hits_after, misses_after, held = context_cache_stats()
    assert misses_after - misses == 2  # one context per end, built once
    assert hits_after - hits == 6
    assert held >= 2
