#!/usr/bin/env python3
"""Handshakes per second of ktlsd's engine, both ends ktlsd on TCP loopback, next to openssl s_time.

Measures, in one run:

* sequential: one handshake at a time (client and server driven on one event loop);
* concurrent: 64 handshakes in flight on one event loop;

for an x509 handshake (ECDSA P-256 server certificate, server-only auth) and an external-PSK
(SHA-256) handshake; then ``openssl s_time -new`` against ``openssl s_server`` with the same
certificate, as the C reference (its client only; s_server runs in its own process).

Rates are wall-clock handshakes per second; "CPU ms/hs" is this process's CPU time per handshake
for BOTH ends together. ``--rss N`` instead runs N x509 + N PSK handshakes and prints the resident
set size along the way, to show that SSL/SSL_CTX objects are freed (it should stay flat).

Usage: python bench/handshake_rate.py [--count 400] [--seconds 3] [--rss 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pki import Authority
from waiting import wait_listening

from ktlsd.credentials import X509Credentials
from ktlsd.tls.handshake import PskKey, TlsConfig, perform_handshake
from ktlsd.tls.session import Role


def tcp_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    return client, server


async def one(
    listener: socket.socket, ccfg: TlsConfig, scfg: TlsConfig, *, strict: bool = True
) -> None:
    client, server = tcp_pair(listener)
    with client, server:
        await asyncio.gather(
            perform_handshake(client, ccfg, timeout=30),
            perform_handshake(server, scfg, timeout=30),
            return_exceptions=not strict,
        )


async def run_sequential(
    listener: socket.socket, ccfg: TlsConfig, scfg: TlsConfig, n: int, *, strict: bool = True
) -> None:
    for _ in range(n):
        await one(listener, ccfg, scfg, strict=strict)


async def run_concurrent(
    listener: socket.socket, ccfg: TlsConfig, scfg: TlsConfig, n: int, inflight: int
) -> None:
    sem = asyncio.Semaphore(inflight)

    async def task() -> None:
        async with sem:
            await one(listener, ccfg, scfg)

    await asyncio.gather(*(task() for _ in range(n)))


def measure(coro_factory, n: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Return (handshakes/s wall, CPU ms per handshake) for ``n`` handshakes."""
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    asyncio.run(coro_factory())
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return n / wall, cpu * 1000 / n


def s_time_rate(cert: Path, key: Path, seconds: int) -> tuple[float, float]:
    """openssl s_time -new against s_server: (connections per real second, per client user s)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            "openssl",
            "s_server",
            "-accept",
            f"127.0.0.1:{port}",
            "-tls1_3",
            "-quiet",
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-num_tickets",
            "0",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_listening(port)
        out = subprocess.run(
            [
                "openssl",
                "s_time",
                "-connect",
                f"127.0.0.1:{port}",
                "-new",
                "-tls1_3",
                "-time",
                str(seconds),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            check=True,
        ).stdout
    finally:
        server.terminate()
        server.wait()
    real = re.search(r"(\d+) connections in (\d+) real seconds", out)
    user = re.search(r"([\d.]+) connections/user sec", out)
    if not real or not user:
        raise RuntimeError(f"cannot parse s_time output: {out!r}")
    return int(real.group(1)) / int(real.group(2)), float(user.group(1))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def configs(tmp: Path) -> dict[str, tuple[TlsConfig, TlsConfig]]:
    ca = Authority.create(tmp, "ecdsa", "Bench CA")
    srv = ca.issue_server()
    creds = X509Credentials.from_pem_files(str(srv.cert_path), str(srv.key_path))
    psk = PskKey(b"bench-host", bytes(range(32)))
    return {
        "x509": (
            TlsConfig(role=Role.CLIENT, truststore=str(ca.cert_path), peername="localhost"),
            TlsConfig(role=Role.SERVER, credentials=creds),
        ),
        "psk": (
            TlsConfig(role=Role.CLIENT, psk_keys=(psk,)),
            TlsConfig(role=Role.SERVER, psk_lookup={psk.identity: psk}.get),
        ),
        "failing (unknown PSK identity)": (
            TlsConfig(role=Role.CLIENT, psk_keys=(PskKey(b"stranger", bytes(32)),)),
            TlsConfig(role=Role.SERVER, psk_lookup={psk.identity: psk}.get),
        ),
        "_files": (srv.cert_path, srv.key_path),  # type: ignore[dict-item]
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=400, help="handshakes per measurement")
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--seconds", type=int, default=3, help="s_time duration")
    ap.add_argument("--rss", type=int, default=0, help="leak check: N handshakes of each kind")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as d, socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        cfg = configs(Path(d))
        cert, key = cfg.pop("_files")  # type: ignore[misc]

        if args.rss:
            print(f"RSS check: {args.rss} handshakes per kind")
            for kind in ("x509", "psk", "failing (unknown PSK identity)"):
                ccfg, scfg = cfg[kind]
                strict = not kind.startswith("failing")
                asyncio.run(run_sequential(listener, ccfg, scfg, 50, strict=strict))  # warm up
                start = rss_mb()
                step = max(args.rss // 4, 1)
                marks = []
                for _ in range(0, args.rss, step):
                    asyncio.run(run_sequential(listener, ccfg, scfg, step, strict=strict))
                    marks.append(f"{rss_mb():.1f}")
                print(
                    f"  {kind}: RSS after warm-up {start:.1f} MB; then "
                    + " -> ".join(marks)
                    + " MB"
                )
            return 0

        print(
            f"ktlsd engine, both ends in this process, TCP loopback, {args.count} handshakes each"
        )
        print(f"{'case':<28}{'hs/s':>10}{'CPU ms/hs':>12}")
        results: dict[str, float] = {}
        for kind in ("x509", "psk"):
            ccfg, scfg = cfg[kind]
            asyncio.run(run_sequential(listener, ccfg, scfg, 20))  # warm up contexts
            rate, cpu = measure(
                lambda c=ccfg, s=scfg: run_sequential(listener, c, s, args.count), args.count
            )
            results[f"{kind} sequential"] = rate
            print(f"{kind + ' sequential':<28}{rate:>10.0f}{cpu:>12.2f}")
            rate, cpu = measure(
                lambda c=ccfg, s=scfg: run_concurrent(listener, c, s, args.count, args.inflight),
                args.count,
            )
            results[f"{kind} {args.inflight} in flight"] = rate
            print(f"{kind + f' {args.inflight} in flight':<28}{rate:>10.0f}{cpu:>12.2f}")

        real, user = s_time_rate(cert, key, args.seconds)
        print(
            f"openssl s_time -new (x509, ECDSA P-256, C client vs s_server): "
            f"{real:.0f} hs/s real, {user:.0f} per client user-second"
        )
        for name, rate in results.items():
            if name.startswith("x509"):
                print(f"ratio ktlsd {name} / s_time real: {rate / real:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
