"""The user-space record layer's bulk paths: many records per write and per read.

``send_data`` seals a batch of records into one write; ``recv_many`` peeks at the socket, opens
what it shows and consumes exactly those records. The wire is checked with the independent
test protector (:mod:`tls13_records`), and kTLS's rule is pinned: nothing after a KeyUpdate
record leaves the socket before the next key is installed.
"""

from __future__ import annotations

import errno
import itertools
import os
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from tls13_records import open_record, seal

from ktlsd.tls.connection import TlsConnection
from ktlsd.tls.keyschedule import encode_key_update, next_traffic_secret
from ktlsd.tls.protocol import MAX_PLAINTEXT, ContentType
from ktlsd.tls.record import Record, RecordError, UserRecordLayer
from ktlsd.tls.session import CipherSuite, Role, Session

AES128 = CipherSuite.TLS_AES_128_GCM_SHA256


def sessions(suite: CipherSuite = AES128) -> tuple[Session, Session]:
    c, s = os.urandom(suite.hash_length), os.urandom(suite.hash_length)
    return (
        Session(Role.CLIENT, suite, client_secret=c, server_secret=s),
        Session(Role.SERVER, suite, client_secret=c, server_secret=s),
    )


@pytest.fixture(params=["socketpair", "tcp"])
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[socket.socket, socket.socket]]:
    """Both kinds of stream socket: TCP drops consumed bytes without a copy (MSG_TRUNC)."""
    if request.param == "socketpair":
        a, b = socket.socketpair()
    else:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
    for sock in (a, b):
        sock.settimeout(10)
    with a, b:
        yield a, b


def read_records(sock: socket.socket, count: int) -> list[bytes]:
    records = []
    for _ in range(count):
        header = sock.recv(5, socket.MSG_WAITALL)
        length = int.from_bytes(header[3:5], "big")
        records.append(header + sock.recv(length, socket.MSG_WAITALL))
    return records


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_send_data_writes_the_records_send_would(pair, suite: CipherSuite) -> None:
    a, b = pair
    client, _ = sessions(suite)
    layer = UserRecordLayer(a, client)
    data = os.urandom(2 * MAX_PLAINTEXT + 7232)
    assert layer.send_data(data) == 3
    assert layer.sequence_numbers()[0] == 3
    pieces = [data[:MAX_PLAINTEXT], data[MAX_PLAINTEXT : 2 * MAX_PLAINTEXT], data[-7232:]]
    for seq, record in enumerate(read_records(b, 3)):
        assert open_record(suite, client.client_secret, seq, record) == (23, pieces[seq])
    assert layer.send_data(b"") == 0
    layer.send(b"one more")  # the single-record path goes on from the same sequence number
    assert open_record(suite, client.client_secret, 3, read_records(b, 1)[0]) == (23, b"one more")


def test_recv_many_merges_data_records_and_counts_them(pair) -> None:
    a, b = pair
    client, server = sessions()
    receiver = UserRecordLayer(b, server)
    payloads = [os.urandom(n) for n in (1, MAX_PLAINTEXT, 500, 0, 3000)]
    a.sendall(b"".join(seal(AES128, client.client_secret, i, p) for i, p in enumerate(payloads)))
    record, count = receiver.recv_many(1 << 20)
    assert record == Record(23, b"".join(payloads))
    assert count == 4  # the empty record is skipped, as kTLS skips it
    assert receiver.sequence_numbers()[1] == 5
    assert receiver.pending() == 0


def test_recv_many_stops_at_bufsize_and_recv_stays_one_record(pair) -> None:
    a, b = pair
    client, server = sessions()
    receiver = UserRecordLayer(b, server)
    payloads = [bytes([n]) * 1000 for n in range(5)]
    a.sendall(b"".join(seal(AES128, client.client_secret, i, p) for i, p in enumerate(payloads)))
    assert receiver.recv() == Record(23, payloads[0])
    record, count = receiver.recv_many(1500)
    assert (record, count) == (Record(23, payloads[1] + payloads[2][:500]), 2)
    assert receiver.pending() == 500
    assert receiver.recv_many(1 << 20) == (Record(23, payloads[2][500:]), 0)
    assert receiver.recv_many(1 << 20) == (Record(23, payloads[3] + payloads[4]), 2)


def test_nothing_after_a_key_update_leaves_the_socket(pair) -> None:
    """Data, data, KeyUpdate, data under the next key, in one write: the data before the
    KeyUpdate comes merged, then the KeyUpdate alone; the record after it stays in the socket
    (readable, not buffered) until the next receive key is installed."""
    a, b = pair
    client, server = sessions()
    receiver = UserRecordLayer(b, server)
    secret = client.client_secret
    following = next_traffic_secret(AES128, secret)
    after = seal(AES128, following, 0, b"under the next key")
    a.sendall(
        seal(AES128, secret, 0, b"one")
        + seal(AES128, secret, 1, b"two")
        + seal(AES128, secret, 2, encode_key_update(False), ContentType.HANDSHAKE)
        + after
    )
    assert receiver.recv_many(1 << 20) == (Record(23, b"onetwo"), 2)
    assert receiver.recv_many(1 << 20) == (Record(22, encode_key_update(False)), 1)
    with pytest.raises(OSError) as info:
        receiver.recv_many(1 << 20)
    assert info.value.errno == errno.EKEYEXPIRED
    assert receiver.pending() == 0
    assert select.select([b], [], [], 0)[0] == [b]
    assert b.recv(len(after) + 10, socket.MSG_PEEK) == after
    receiver.install_rx_key(following)
    assert receiver.recv_many(1 << 20) == (Record(23, b"under the next key"), 1)


def test_a_bad_record_comes_after_the_data_before_it(pair) -> None:
    a, b = pair
    client, server = sessions()
    receiver = UserRecordLayer(b, server)
    tampered = bytearray(seal(AES128, client.client_secret, 2, b"three"))
    tampered[-1] ^= 1
    a.sendall(
        seal(AES128, client.client_secret, 0, b"one")
        + seal(AES128, client.client_secret, 1, b"two")
        + bytes(tampered)
    )
    assert receiver.recv_many(1 << 20) == (Record(23, b"onetwo"), 2)
    for _ in range(2):
        with pytest.raises(RecordError) as info:
            receiver.recv_many(1 << 20)
        assert info.value.alert == "bad_record_mac"


def test_records_written_in_pieces_are_put_together(pair) -> None:
    """A writer that dribbles the records a few bytes at a time: headers and bodies split
    anywhere; the reader takes the pieces over and reads exactly the rest of each record."""
    a, b = pair
    client, server = sessions()
    receiver = UserRecordLayer(b, server)
    payloads = [os.urandom(n) for n in (10, 2000, 17, MAX_PLAINTEXT)]
    wire = b"".join(seal(AES128, client.client_secret, i, p) for i, p in enumerate(payloads))

    def writer() -> None:
        sizes = itertools.cycle((1, 3, 7, 997))
        start = 0
        while start < len(wire):
            end = start + next(sizes)
            a.sendall(wire[start:end])
            start = end
            time.sleep(0.0002)
        a.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=writer)
    thread.start()
    received = []
    while not (record := receiver.recv_many(1 << 20)[0]).eof:
        received.append(record.data)
    thread.join()
    assert b"".join(received) == b"".join(payloads)


def test_connection_batches_stop_where_the_key_wears_out(pair) -> None:
    """One send of 13 records with a rekey every 5 records: KeyUpdates go out before records
    6 and 11, exactly where record-by-record sending puts them."""
    a, b = pair
    client, server = sessions()
    sender = TlsConnection(UserRecordLayer(a, client), client, rekey_after_records=5)
    receiver = TlsConnection(UserRecordLayer(b, server), server)
    data = os.urandom(12 * MAX_PLAINTEXT + 5)
    got: list[bytes] = []

    def reader() -> None:
        size = 0
        while size < len(data):
            chunk = receiver.recv(1 << 20)
            got.append(chunk)
            size += len(chunk)

    thread = threading.Thread(target=reader)
    thread.start()
    sender.send(data)
    thread.join(10)
    assert b"".join(got) == data
    assert sender.key_updates_sent == 2
    assert receiver.key_updates_received == 2
    assert sender.records_sent == receiver.records_received == 13
    assert sender.session.tx_seq == 3  # records 11, 12 and 13 under the third key
