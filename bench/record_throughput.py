#!/usr/bin/env python3
"""User-space record layer: MB of application data per CPU-second, next to a C floor.

Both programs move data one way over an AF_UNIX socket pair in one process, a writer thread
and a reader thread, 16 KiB records, the same AEAD from OpenSSL:

* ktlsd: ``TlsConnection.send`` of 1 MiB blobs on one end, ``recv(1 MiB)`` on the other, over
  ``UserRecordLayer`` (``cryptography``'s AESGCM / ChaCha20Poly1305);
* the C floor: bench/c/record_floor.c, built here with ``cc`` against the system libcrypto,
  sealing each blob's records into one buffer and writing it at once, reading into a 256 KiB
  buffer and opening every complete record in place (EVP AEAD).

CPU is getrusage (user + system) of the whole process, both threads, over the transfer. The
rounds interleave ktlsd and C (each in its own child process, the order alternating); the
summary prints medians and ranges, and ratio lines ``ktlsd/C-floor <suite>: <median>``.
Then the CPU of a KeyUpdate round trip (``key_update(request_peer=True)``, a 1-byte record
each way, the answering KeyUpdate; both ends).

The AEAD is the same algorithm but not the same code: ``cryptography`` carries its own
OpenSSL, the C floor uses the system's. Each program also measures its bare AEAD (sealing
16 KiB records in a loop), and the line ``... with the C floor's AEAD speed`` puts ktlsd's
other work next to the C floor's AEAD time: ktlsd's time per byte minus its two AEAD passes
(seal and open) plus the C floor's two — what ktlsd would reach with the system's AEAD.

    python bench/record_throughput.py [--rounds 3] [--mib 256] [--suites aes128,aes256,chacha20]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cfloor
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ktlsd.tls.connection import TlsConnection
from ktlsd.tls.protocol import MAX_PLAINTEXT
from ktlsd.tls.record import UserRecordLayer
from ktlsd.tls.session import CipherSuite, Role, Session

BLOB = 1 << 20
SUITES = {
    "aes128": (CipherSuite.TLS_AES_128_GCM_SHA256, "aes128gcm", "AES-128-GCM"),
    "aes256": (CipherSuite.TLS_AES_256_GCM_SHA384, "aes256gcm", "AES-256-GCM"),
    "chacha20": (CipherSuite.TLS_CHACHA20_POLY1305_SHA256, "chacha20", "ChaCha20-Poly1305"),
}


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def connection_pair(suite: CipherSuite) -> tuple[TlsConnection, TlsConnection]:
    a, b = socket.socketpair()
    client_secret, server_secret = os.urandom(suite.hash_length), os.urandom(suite.hash_length)
    client = Session(Role.CLIENT, suite, client_secret=client_secret, server_secret=server_secret)
    server = Session(Role.SERVER, suite, client_secret=client_secret, server_secret=server_secret)
    return (
        TlsConnection(UserRecordLayer(a, client), client),
        TlsConnection(UserRecordLayer(b, server), server),
    )


def ktlsd_rate(suite: CipherSuite, total: int) -> float:
    """MB of application data per CPU-second, one way, writer and reader thread."""
    tx, rx = connection_pair(suite)
    blob = os.urandom(BLOB)
    received = 0

    def reader() -> None:
        nonlocal received
        while data := rx.recv(BLOB):
            received += len(data)

    thread = threading.Thread(target=reader)
    before = cpu_seconds()
    thread.start()
    for _ in range(total // BLOB):
        tx.send(blob)
    tx.close()
    thread.join()
    spent = cpu_seconds() - before
    if received != total:
        raise SystemExit(f"lost data: {received} of {total} bytes")
    return total / spent / 1e6


def bare_aead_rate(suite: CipherSuite) -> float:
    """MB per CPU-second of sealing 16 KiB (+1 byte) records, the AEAD alone."""
    key = os.urandom(suite.key_length)
    chacha = suite is CipherSuite.TLS_CHACHA20_POLY1305_SHA256
    aead = ChaCha20Poly1305(key) if chacha else AESGCM(key)
    record, header = os.urandom(MAX_PLAINTEXT + 1), b"\x17\x03\x03\x40\x11"
    out = bytearray(len(record) + 16)
    rounds = 4096
    before = cpu_seconds()
    for seq in range(rounds):
        aead.encrypt_into(seq.to_bytes(12, "big"), record, header, out)
    return rounds * len(record) / (cpu_seconds() - before) / 1e6


def equal_aead_ratio(ktlsd: float, ktlsd_aead: float, floor: float, floor_aead: float) -> float:
    """The ratio with ktlsd's two AEAD passes per byte costing what the C floor's do."""
    ktlsd_other = 1 / ktlsd - 2 / ktlsd_aead  # CPU seconds per MB besides the AEAD
    return (1 / floor) / (ktlsd_other + 2 / floor_aead)


def key_update_cpu(count: int) -> float:
    """CPU microseconds per KeyUpdate(update_requested) round trip, both ends."""
    x, y = connection_pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    before = cpu_seconds()
    for _ in range(count):
        x.key_update(True)
        x.send(b"p")
        y.recv()
        y.send(b"q")  # carries the answering KeyUpdate first
        x.recv()
    spent = cpu_seconds() - before
    if x.key_updates_sent != count or x.key_updates_received != count:
        raise SystemExit("KeyUpdates out of step")
    return spent * 1e6 / count


def run_child(*args: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", *args],
        capture_output=True, text=True, check=True, timeout=900,
    ).stdout.split()
    return float(out[-1])


def spread(values: list[float]) -> str:
    return (f"{statistics.median(values):.0f} (range {min(values):.0f}-{max(values):.0f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=256, help="MiB per measurement")
    ap.add_argument("--suites", default=",".join(SUITES))
    ap.add_argument("--key-updates", type=int, default=2000, help="round trips measured")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "key-update":
            print(f"{key_update_cpu(int(args.child[1])):.1f}")
        elif args.child[0] == "aead":
            print(f"{bare_aead_rate(SUITES[args.child[1]][0]):.1f}")
        else:
            print(f"{ktlsd_rate(SUITES[args.child[0]][0], int(args.child[1]) * BLOB):.1f}")
        return 0

    names = [n.strip() for n in args.suites.split(",") if n.strip()]
    if unknown := set(names) - set(SUITES):
        ap.error(f"unknown suite(s): {', '.join(sorted(unknown))}")
    floor = cfloor.build("record_floor")
    results: dict[str, dict[str, list[float]]] = {
        n: {"ktlsd": [], "C floor": [], "ratio": [], "equal": [], "aead k": [], "aead C": []}
        for n in names
    }
    key_updates: list[float] = []
    print(f"MB of application data per CPU-second, one way over an AF_UNIX socket pair, 16 KiB "
          f"records, {args.mib} MiB per figure, {args.rounds} interleaved rounds; load average "
          f"{os.getloadavg()[0]:.1f}")
    for r in range(args.rounds):
        for name in names:
            measured: dict[str, float] = {}
            order = ("ktlsd", "C floor") if r % 2 == 0 else ("C floor", "ktlsd")
            for who in order:
                if who == "ktlsd":
                    measured[who] = run_child(name, str(args.mib))
                    measured["aead k"] = run_child("aead", name)
                else:
                    line = cfloor.run_floor(floor, SUITES[name][1], str(args.mib))
                    measured[who] = line["mb_per_cpu_second"]
                    measured["aead C"] = line["aead_mb_per_cpu_second"]
            ratio = measured["ktlsd"] / measured["C floor"]
            equal = equal_aead_ratio(
                measured["ktlsd"], measured["aead k"], measured["C floor"], measured["aead C"]
            )
            for who, value in measured.items():
                results[name][who].append(value)
            results[name]["ratio"].append(ratio)
            results[name]["equal"].append(equal)
            print(f"round {r + 1} {SUITES[name][2]:>17}: ktlsd {measured['ktlsd']:5.0f}, "
                  f"C floor {measured['C floor']:5.0f} MB/CPU-s, ratio {ratio:.2f}; bare AEAD "
                  f"{measured['aead k']:.0f} vs {measured['aead C']:.0f} MB/CPU-s, ratio with "
                  f"the C floor's AEAD speed {equal:.2f}", flush=True)
        key_updates.append(run_child("key-update", str(args.key_updates)))
        print(f"round {r + 1} KeyUpdate round trip: {key_updates[-1]:.0f} us CPU", flush=True)
    print()
    for name in names:
        figures = results[name]
        print(f"{SUITES[name][2]}: ktlsd {spread(figures['ktlsd'])} MB/CPU-s, "
              f"C floor {spread(figures['C floor'])} MB/CPU-s; bare AEAD: cryptography "
              f"{spread(figures['aead k'])}, system libcrypto {spread(figures['aead C'])}")
    print(f"KeyUpdate(update_requested) round trip, both ends: {spread(key_updates)} us CPU")
    for name in names:
        ratios = results[name]["ratio"]
        print(f"ktlsd/C-floor {SUITES[name][2]}: {statistics.median(ratios):.2f} "
              f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")
    for name in names:
        equal = results[name]["equal"]
        print(f"ktlsd/C-floor {SUITES[name][2]} with the C floor's AEAD speed: "
              f"{statistics.median(equal):.2f} (rounds: {', '.join(f'{x:.2f}' for x in equal)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
