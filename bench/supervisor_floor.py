"""The least CPU a supervisor can spend per service request a worker runs.

What ktlsd's supervisor must do per request when workers read and run service requests
(docs/architecture.md, "Workers"): accept the consumer's connection, read its credentials
(``SO_PEERCRED``), pass a copy of it to a worker (CONN, ``SCM_RIGHTS``), read the worker's
ADMIT, send GO, read the worker's RESULT, write the log line and close its copy. This script
does exactly those system calls, with the least Python around them (no asyncio, no decoding),
against a worker process that answers at once and a consumer process that connects, waits for
its answer and closes, one request at a time. It prints the supervisor's CPU per request
(user + system, ``getrusage``) — the floor under ``bench/service_workers.py``'s "of it
supervisor" column (which counts two requests per handshake: both ends).

Usage: ``python bench/supervisor_floor.py [--rounds 3] [--count 5000]``
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import struct
import sys
import tempfile
from pathlib import Path

HEADER = struct.Struct("=BBHII")  # kind, flags, spare, aux, id: the shape of workers.py's header
CONN, ADMIT, GO, RESULT = 1, 2, 3, 4
FD = struct.Struct("=i")
LOG_LINE = ("handshake source=service peer=- peername=- role=server auth=psk "
            "identity=psk:bench-host suite=TLS_AES_128_GCM_SHA256 group=x25519 sig=- "
            "peer_sig=- duration=3.2ms status=0 (ok)\n")


def worker(channel: socket.socket) -> None:
    """Answer CONN with ADMIT, GO with RESULT (closing the connection's copy first)."""
    held = -1
    while True:
        data, ancdata, _, _ = channel.recvmsg(256, socket.CMSG_SPACE(FD.size))
        if not data:
            return
        kind, _, _, _, ident = HEADER.unpack_from(data)
        if kind == CONN:
            held = FD.unpack(ancdata[0][2][: FD.size])[0]
            channel.send(HEADER.pack(ADMIT, 0, 0, 0, ident) + bytes(40))
        elif kind == GO:
            os.close(held)
            channel.send(HEADER.pack(RESULT, 0, 0, 0, ident) + bytes(60))


def consumer(path: str, count: int) -> None:
    for _ in range(count):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(path)
            conn.recv(1)


def one_round(count: int) -> tuple[float, float]:
    """(user, system) microseconds of supervisor CPU per request."""
    with tempfile.TemporaryDirectory() as directory:
        path = str(Path(directory) / "floor.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(4096)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        worker_pid = os.fork()
        if worker_pid == 0:
            ours.close()
            listener.close()
            worker(theirs)
            os._exit(0)
        theirs.close()
        consumer_pid = os.fork()
        if consumer_pid == 0:
            listener.close()
            ours.close()
            consumer(path, count)
            os._exit(0)
        with open(os.devnull, "w") as log:
            before = resource.getrusage(resource.RUSAGE_SELF)
            for ident in range(count):
                conn, _ = listener.accept()
                conn.setblocking(False)
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
                ours.sendmsg([HEADER.pack(CONN, 0, 0, 0, ident) + creds],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, FD.pack(conn.fileno()))])
                ours.recv(256)  # ADMIT
                ours.send(HEADER.pack(GO, 0, 0, 0, ident))
                ours.recv(256)  # RESULT
                log.write(LOG_LINE)
                log.flush()
                conn.send(b"d")  # what the consumer waits for (the worker's DONE, here)
                conn.close()
            after = resource.getrusage(resource.RUSAGE_SELF)
        ours.close()
        listener.close()
        for pid in (worker_pid, consumer_pid):
            os.waitpid(pid, 0)
    return ((after.ru_utime - before.ru_utime) / count * 1e6,
            (after.ru_stime - before.ru_stime) / count * 1e6)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=5000, help="requests per round")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}; "
          f"{args.count} requests per round, one at a time")
    totals = []
    for round_ in range(args.rounds):
        user, system = one_round(args.count)
        totals.append(user + system)
        print(f"round {round_ + 1}: {user + system:.1f} us CPU per request "
              f"(user {user:.1f}, system {system:.1f})")
    print(f"supervisor floor: median {statistics.median(totals):.1f} us per request, range "
          f"{min(totals):.1f}-{max(totals):.1f}; per handshake (both ends): "
          f"{2 * statistics.median(totals) / 1000:.3f} ms")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
