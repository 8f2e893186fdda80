#!/usr/bin/env python3
"""Handshakes per second through the handshake service, one agent process against two workers.

Starts two real agents side by side (``ktlsd run --kernel no``), one with ``--workers 1``
(every handshake in the agent's own process: the single-process agent) and one with
``--workers 2`` (two worker processes behind the supervisor), and drives each in turn from
this bench client: for each connection it makes a loopback TCP pair and submits *both* ends
to the service (the agent is TLS client and server), keeping ``--inflight`` connections
going. The client is lean on purpose (SUBMIT messages encoded once, DONE read for its status
only) so that the CPU goes to the agent; it still takes some, on the same cores.

Per round and agent it prints handshakes (connections, both ends) per wall-second and per
agent CPU-second (the supervisor and its workers, from /proc), the agent's CPU per handshake
and the supervisor's part of it, the client's CPU, and the ratio of the two agents' wall
rates. Rounds are interleaved (1, 2, 2, 1, 1, 2, ...) so slow
drift in the machine's load hits both alike; the summary gives the median and the range.
The CPU-bound case is x509 (ECDSA P-256 server certificate sent inline, the client verifying
it against a CA file); ``--auth psk`` measures external PSKs.

"agent cores" (agent CPU-seconds per wall-second) shows how much of the machine the agent got:
on a shared machine the other work takes the rest.

Usage: python bench/service_workers.py [--rounds 5] [--count 600] [--inflight 64]
                                       [--auth x509|psk|both]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pki import Authority  # noqa: E402
from waiting import wait_until  # noqa: E402

from ktlsd.request import (  # noqa: E402
    AuthMode,
    HandshakeRequest,
    InlineMaterial,
    InlinePsk,
    MessageType,
)
from ktlsd.upcall.nlattr import decode_attrs  # noqa: E402
from ktlsd.upcall.wire import connect_service, encode_submit  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
CONFIG = """[ktlsd]
max_concurrent = 256
pending_limit = 1024
uid_max_connections = 100000
uid_max_pending = 100000
uid_max_in_flight = 100000
service_max_connections = 100000
"""


@dataclass
class Agent:
    workers: int
    path: str
    process: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> tuple[float, float]:
        """CPU time of the agent's own process and of its live children (the workers)."""
        return (process_cpu(self.process.pid),
                sum(process_cpu(pid) for pid in children(self.process.pid)))


def process_cpu(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def start_agent(tmp: Path, workers: int) -> Agent:
    config = tmp / f"agent{workers}.conf"
    config.write_text(CONFIG)
    path = str(tmp / f"agent{workers}.sock")
    log = tmp / f"agent{workers}.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "ktlsd", "run", "--kernel", "no", "--socket", path,
             "-c", str(config), "--workers", str(workers)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
    wait_until(lambda: b"ktlsd agent running" in log.read_bytes() or process.poll() is not None,
               f"agent with --workers {workers} to start", timeout=120)
    if process.poll() is not None:
        raise SystemExit(f"agent --workers {workers} failed:\n{log.read_text()}")
    return Agent(workers, path, process, log)


def submits(tmp: Path, auth: str) -> tuple[bytes, bytes]:
    """The client end's and the server end's SUBMIT, encoded once."""
    if auth == "psk":
        inline = InlineMaterial(psk_keys=(InlinePsk(b"bench-host", bytes(range(32))),))
        client = HandshakeRequest(sockfd=-1, message_type=MessageType.CLIENTHELLO,
                                  auth_mode=AuthMode.PSK, inline=inline)
        server = HandshakeRequest(sockfd=-1, message_type=MessageType.SERVERHELLO,
                                  auth_mode=AuthMode.PSK, inline=inline)
    else:
        ca = Authority.create(tmp / "pki", "ecdsa", "Bench CA")
        issued = ca.issue_server()
        client = HandshakeRequest(
            sockfd=-1, message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.X509,
            peername="localhost", inline=InlineMaterial(truststore=str(ca.cert_path)))
        server = HandshakeRequest(
            sockfd=-1, message_type=MessageType.SERVERHELLO, auth_mode=AuthMode.X509,
            inline=InlineMaterial(certificate_chain=issued.chain_der,
                                  private_key=issued.key_der))
    return encode_submit(client), encode_submit(server)


def done_status(data: bytes) -> int:
    """DONE's status attribute, without decoding the session (the client stays lean)."""
    for attr_type, payload in decode_attrs(data[20:]):
        if attr_type == 1:
            return int(struct.unpack("=I", payload)[0])
    return -1


async def request(path: str, message: bytes, sock: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    conn = await connect_service(path)
    try:
        conn.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  struct.pack("=i", sock.fileno()))])
        data = await loop.sock_recv(conn, 65536)
        return done_status(data)
    finally:
        conn.close()


async def drive(path: str, listener: socket.socket, messages: tuple[bytes, bytes],
                count: int, inflight: int) -> int:
    """``count`` connections, ``inflight`` at a time; returns the failures."""
    failures = 0
    remaining = count

    async def lane() -> None:
        nonlocal failures, remaining
        while remaining > 0:
            remaining -= 1
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            with client, server:
                statuses = await asyncio.gather(request(path, messages[0], client),
                                                request(path, messages[1], server))
            failures += sum(1 for status in statuses if status != 0)

    await asyncio.gather(*(lane() for _ in range(inflight)))
    return failures


@dataclass
class Sample:
    wall_rate: float
    cpu_rate: float
    agent_cpu: float  # ms per handshake, supervisor and workers
    supervisor_cpu: float  # ms per handshake, the agent's own process
    client_cpu: float
    agent_cores: float  # agent CPU-seconds per wall-second


def measure(agent: Agent, listener: socket.socket, messages: tuple[bytes, bytes],
            count: int, inflight: int) -> Sample:
    (own0, kids0), client0, wall0 = (agent.cpu_seconds(), time.process_time(),
                                     time.perf_counter())
    failures = asyncio.run(drive(agent.path, listener, messages, count, inflight))
    wall = time.perf_counter() - wall0
    client = time.process_time() - client0
    own1, kids1 = agent.cpu_seconds()
    own, cpu = own1 - own0, own1 - own0 + kids1 - kids0
    if failures:
        raise SystemExit(f"--workers {agent.workers}: {failures} failed requests; see "
                         f"{agent.log}")
    return Sample(count / wall, count / cpu if cpu else float("inf"), cpu / count * 1000,
                  own / count * 1000, client / count * 1000, cpu / wall)


def spread(values: list[float]) -> str:
    return (f"median {statistics.median(values):.0f}, range {min(values):.0f}-"
            f"{max(values):.0f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=600, help="connections per measurement")
    parser.add_argument("--inflight", type=int, default=64, help="connections at once")
    parser.add_argument("--auth", choices=("x509", "psk", "both"), default="x509")
    args = parser.parse_args()
    kinds = ("x509", "psk") if args.auth == "both" else (args.auth,)

    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f} "
          "(other work on the machine shares the CPUs: read the ranges, not one figure)")
    with tempfile.TemporaryDirectory() as directory, socket.socket() as listener:
        tmp = Path(directory)
        listener.bind(("127.0.0.1", 0))
        listener.listen(4096)
        agents = {n: start_agent(tmp, n) for n in (1, 2)}
        try:
            for kind in kinds:
                messages = submits(tmp, kind)
                for agent in agents.values():  # warm up: contexts, imports, caches
                    measure(agent, listener, messages, 40, args.inflight)
                samples: dict[int, list[Sample]] = {1: [], 2: []}
                ratios: list[float] = []
                print(f"\n{kind}: {args.count} connections (both ends through the service) "
                      f"per measurement, {args.inflight} at once, {args.rounds} rounds")
                print(f"{'round':<7}{'workers':>8}{'hs/s wall':>11}{'hs/agent-CPU-s':>16}"
                      f"{'agent CPU ms/hs':>17}{'of it supervisor':>18}"
                      f"{'client CPU ms/hs':>18}{'agent cores':>13}")
                for round_ in range(args.rounds):
                    order = (1, 2) if round_ % 2 == 0 else (2, 1)
                    for n in order:
                        sample = measure(agents[n], listener, messages, args.count,
                                         args.inflight)
                        samples[n].append(sample)
                        print(f"{round_ + 1:<7}{n:>8}{sample.wall_rate:>11.0f}"
                              f"{sample.cpu_rate:>16.0f}{sample.agent_cpu:>17.2f}"
                              f"{sample.supervisor_cpu:>18.2f}{sample.client_cpu:>18.2f}"
                              f"{sample.agent_cores:>13.2f}")
                    ratios.append(samples[2][-1].wall_rate / samples[1][-1].wall_rate)
                for n in (1, 2):
                    wall = [s.wall_rate for s in samples[n]]
                    cpu = [s.cpu_rate for s in samples[n]]
                    print(f"{kind} workers={n}: {spread(wall)} hs/s wall; {spread(cpu)} hs per "
                          "agent CPU-second")
                print(f"ratio {kind} 2 workers / 1 (wall, same round): median "
                      f"{statistics.median(ratios):.2f}, range {min(ratios):.2f}-"
                      f"{max(ratios):.2f} over {len(ratios)} rounds")
        finally:
            for agent in agents.values():
                agent.process.terminate()
            for agent in agents.values():
                agent.process.wait(60)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
