"""User-space record layer throughput, next to references measured in the same run.

    python bench/record_throughput.py [--mib 64]

Prints, one way over an AF_UNIX socket pair with 16 KiB records:
- the plain socket copy rate (no TLS) and the bare AEAD seal rate of `cryptography` — the two
  ceilings the record layer sits between;
- the record layer's rate per suite and its ratio to the bare AEAD;
- the rate with a KeyUpdate before every record, and KeyUpdate(update_requested) + answer
  round trips per second.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ktlsd.tls.connection import TlsConnection
from ktlsd.tls.record import UserRecordLayer
from ktlsd.tls.session import CipherSuite, Role, Session

BLOB = 1 << 20
RECORD = 1 << 14


def _pair(suite: CipherSuite, rekey_after_records: int | None = None
          ) -> tuple[TlsConnection, TlsConnection]:
    a, b = socket.socketpair()
    c, s = os.urandom(suite.hash_length), os.urandom(suite.hash_length)
    cs = Session(Role.CLIENT, suite, client_secret=c, server_secret=s)
    ss = Session(Role.SERVER, suite, client_secret=c, server_secret=s)
    tx = TlsConnection(UserRecordLayer(a, cs), cs, rekey_after_records=rekey_after_records)
    return tx, TlsConnection(UserRecordLayer(b, ss), ss)


def record_rate(suite: CipherSuite, total: int, rekey_after_records: int | None = None
                ) -> tuple[float, int]:
    tx, rx = _pair(suite, rekey_after_records)
    blob = os.urandom(BLOB)
    got = 0

    def reader() -> None:
        nonlocal got
        while data := rx.recv(BLOB):
            got += len(data)

    thread = threading.Thread(target=reader)
    thread.start()
    started = time.perf_counter()
    for _ in range(total // BLOB):
        tx.send(blob)
    tx.close()
    thread.join()
    elapsed = time.perf_counter() - started
    assert got == total, (got, total)
    return total / elapsed / 1e6, tx.key_updates_sent


def socket_rate(total: int) -> float:
    a, b = socket.socketpair()
    blob = os.urandom(BLOB)

    def reader() -> None:
        left = total
        while left:
            left -= len(b.recv(min(left, BLOB)))

    thread = threading.Thread(target=reader)
    thread.start()
    started = time.perf_counter()
    for _ in range(total // BLOB):
        a.sendall(blob)
    thread.join()
    return total / (time.perf_counter() - started) / 1e6


def aead_rate(suite: CipherSuite, total: int) -> float:
    key = os.urandom(suite.key_length)
    aead = ChaCha20Poly1305(key) if "CHACHA" in suite.iana_name else AESGCM(key)
    record = os.urandom(RECORD)
    nonce = os.urandom(12)
    started = time.perf_counter()
    for _ in range(total // RECORD):
        aead.encrypt(nonce, record, b"hdr01")
    return total / (time.perf_counter() - started) / 1e6


def key_update_round_trips(count: int) -> float:
    x, y = _pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    started = time.perf_counter()
    for _ in range(count):
        x.key_update(True)
        x.send(b"p")
        y.recv()
        y.send(b"q")  # carries the answering KeyUpdate first
        x.recv()
    assert x.key_updates_sent == count and x.key_updates_received == count
    return count / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64, help="MiB per measurement")
    total = ap.parse_args().mib * BLOB
    print(f"plain socket copy: {socket_rate(total):.0f} MB/s (reference, no TLS)")
    for suite in CipherSuite:
        bare = aead_rate(suite, total)
        rate, _ = record_rate(suite, total)
        print(f"{suite.iana_name}: record layer {rate:.0f} MB/s, bare AEAD {bare:.0f} MB/s, "
              f"ratio {rate / bare:.2f}")
    rate, updates = record_rate(CipherSuite.TLS_AES_128_GCM_SHA256, total // 4, 1)
    print(f"AES-128-GCM with a KeyUpdate before every record: {rate:.0f} MB/s "
          f"({updates} KeyUpdates)")
    print(f"KeyUpdate(update_requested) + answer round trips: {key_update_round_trips(2000):.0f}/s")


if __name__ == "__main__":
    main()
