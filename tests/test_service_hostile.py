"""A hostile consumer passes bad descriptors: the agent closes every one it receives.

The real ``ktlsd run`` runs as a child process; this test is its consumer and sends 10,000
SUBMITs whose descriptors are wrong in every way a local user can make them wrong (not a
socket at all, a socket of the wrong kind, several descriptors, more than the service reads,
a good socket with a malformed message, a connection dropped before the answer, more
descriptors after SUBMIT). The agent's descriptor count (``/proc/PID/fd``) must come back to
what it was, and a valid handshake must still work. Before the fix every non-socket
descriptor leaked the ``dup`` made to inspect it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ktlsd.client import submit
from ktlsd.request import AuthMode, HandshakeRequest, InlineMaterial, InlinePsk, MessageType
from ktlsd.upcall.wire import MAX_MESSAGE_SIZE, decode_done_message, encode_submit
from tests.agent_helpers import AgentProcess, tcp_pair
from tests.waiting import run, wait_until

PSK = bytes.fromhex("1d" * 32)
SUBMITS = 10_000
WORKERS = 8  # concurrent consumers: well below the service's per-uid connection share


def good_submit() -> bytes:
    request = HandshakeRequest(sockfd=-1, message_type=MessageType.CLIENTHELLO,
                               auth_mode=AuthMode.PSK, timeout_ms=2000,
                               inline=InlineMaterial(psk_keys=(InlinePsk(b"id", PSK),)))
    return encode_submit(request)


@dataclass
class Case:
    """One kind of bad SUBMIT: the message, the descriptors passed with it, what happens."""

    name: str
    data: bytes
    fds: list[int]
    answer: bool = True  # False: the consumer drops the connection without reading
    after: list[int] | None = None  # descriptors sent in a second message


class Descriptors:
    """Every kind of descriptor a consumer can pass, made once and passed many times."""

    def __init__(self, tmp: Path) -> None:
        self.owned: list[int] = []
        self.sockets: list[socket.socket] = []
        read_end, write_end = os.pipe()
        self.owned += [read_end, write_end]
        regular = tmp / "regular-file"
        regular.write_bytes(b"not a socket\n")
        self.pipe, self.pipe_w = read_end, write_end
        self.regular = self._own(os.open(regular, os.O_RDONLY))
        self.devnull = self._own(os.open(os.devnull, os.O_RDWR))
        self.directory = self._own(os.open(tmp, os.O_RDONLY | os.O_DIRECTORY))
        self.eventfd = self._own(os.eventfd(0))
        self.memfd = self._own(os.memfd_create("ktlsd-hostile"))
        udp = self._sock(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        udp.connect(("127.0.0.1", 9))
        self.udp = udp.fileno()
        self.unconnected = self._sock(socket.socket()).fileno()
        listening = self._sock(socket.create_server(("127.0.0.1", 0)))
        self.listening = listening.fileno()
        unix_a, unix_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock(unix_a)
        self._sock(unix_b)
        self.unix = unix_a.fileno()
        self.udp6 = self._sock(socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)).fileno()
        a, b = tcp_pair()
        self._sock(a)
        self._sock(b)
        self.tcp = a.fileno()  # connected TCP: the right kind, sent with wrong messages

    def _own(self, fd: int) -> int:
        self.owned.append(fd)
        return fd

    def _sock(self, sock: socket.socket) -> socket.socket:
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for fd in self.owned:
            os.close(fd)
        for sock in self.sockets:
            sock.close()

    def cases(self) -> list[Case]:
        good = good_submit()
        wrong_kinds = [
            ("pipe", self.pipe), ("pipe write end", self.pipe_w), ("regular file", self.regular),
            ("/dev/null", self.devnull), ("directory", self.directory),
            ("eventfd", self.eventfd), ("memfd", self.memfd), ("udp", self.udp),
            ("udp6 unconnected", self.udp6), ("unconnected tcp", self.unconnected),
            ("listening tcp", self.listening), ("af_unix", self.unix),
        ]
        cases = [Case(name, good, [fd]) for name, fd in wrong_kinds]
        cases += [
            Case("three at once", good, [self.pipe, self.tcp, self.devnull]),
            Case("twelve at once (more than the service reads)", good,
                 [self.devnull, self.eventfd, self.tcp] * 4),
            Case("garbage with a good socket", os.urandom(64), [self.tcp]),
            Case("garbage with a pipe", os.urandom(64), [self.pipe]),
            Case("empty message with descriptors", b"", [self.memfd, self.udp]),
            Case("oversized with descriptors", good + b"\0" * (MAX_MESSAGE_SIZE + 16),
                 [self.regular, self.unix]),
            Case("dropped before the answer", good, [self.pipe, self.memfd], answer=False),
            Case("second message with descriptors", good, [self.eventfd],
                 after=[self.devnull, self.pipe]),
        ]
        return cases


def exchange(path: str, case: Case) -> int | None:
    """One bad SUBMIT over a blocking connection; the answer's status (None: not awaited)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(30)
    try:
        conn.connect(path)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(case.fds)}i",
                                                                 *case.fds))]
        conn.sendmsg([case.data], anc)
        if case.after is not None:
            extra = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                      struct.pack(f"{len(case.after)}i", *case.after))]
            # The service may have answered and closed already: fine.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                conn.sendmsg([b"more"], extra)
        if not case.answer:
            return None
        try:
            data = conn.recv(MAX_MESSAGE_SIZE)
        except ConnectionResetError:
            # The service closed with our second message unread: AF_UNIX reports that as
            # ECONNRESET, ahead of an answer that may be queued.
            return -1
        if not data:
            return -1  # closed without an answer
        return decode_done_message(data)[1].status
    finally:
        conn.close()


def blast(path: str, cases: list[Case], count: int, workers: int = WORKERS) -> dict[str, set[int]]:
    """``count`` bad SUBMITs cycling through ``cases`` from ``workers`` threads; the statuses
    seen per case."""
    seen: dict[str, set[int]] = {case.name: set() for case in cases}
    lock = threading.Lock()
    counter: Iterator[int] = iter(range(count))
    failures: list[BaseException] = []

    def worker() -> None:
        while not failures:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            case = cases[index % len(cases)]
            try:
                status = exchange(path, case)
            except BaseException as exc:
                failures.append(exc)
                raise
            if status is not None:
                with lock:
                    seen[case.name].add(status)

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise AssertionError(f"a consumer failed: {failures[0]!r}") from failures[0]
    return seen


def withdrawn(path: str, rounds: int) -> set[int]:
    """Valid SUBMITs, each on a fresh TCP connection whose peer never answers, withdrawn
    while queued or in flight: by a second message carrying descriptors, or by dropping the
    connection. The statuses seen (-1: closed without an answer, as for a cancellation)."""
    seen: set[int] = set()
    for i in range(rounds):
        a, b = tcp_pair()
        with a, b:
            extra = [] if i % 2 else [a.fileno(), b.fileno()]
            case = Case("withdrawn", good_submit(), [a.fileno()], after=extra or None,
                        answer=bool(extra))
            status = exchange(path, case)
            if status is not None:
                seen.add(status)
    return seen


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def psk_handshake(path: str) -> tuple[int, int]:
    a, b = tcp_pair()
    with a, b:
        psk = [("after-the-storm", PSK)]
        da, db = await asyncio.gather(
            submit(a, role="client", auth="psk", psk=psk, service_path=path),
            submit(b, role="server", auth="psk", psk=psk, service_path=path),
        )
    return da.status, db.status


@pytest.fixture
def descriptors(tmp_path: Path) -> Iterator[Descriptors]:
    made = Descriptors(tmp_path)
    yield made
    made.close()


def test_ten_thousand_bad_descriptors_leak_nothing(
    tmp_path: Path, descriptors: Descriptors
) -> None:
    # A short socket path: tmp_path can be longer than an AF_UNIX address allows.
    home = Path(tempfile.mkdtemp(prefix="ktlsd-hostile-"))
    try:
        with AgentProcess(home) as agent:
            pid = agent.proc.pid
            # Warm up first: right after "running" the agent still checks the system crypto
            # policy (it loads the TLS engine after READY, which briefly opens a file), so a
            # count taken then can include that descriptor.
            assert run(psk_handshake(agent.socket_path)) == (0, 0)
            baseline = fd_count(pid)  # idle: listener, loop, standard streams
            assert run(psk_handshake(agent.socket_path)) == (0, 0)
            wait_until(lambda: fd_count(pid) == baseline,
                       lambda: f"agent holds {fd_count(pid)} descriptors after a good "
                               f"handshake, {baseline} before", timeout=30)
            cases = descriptors.cases()
            seen = blast(agent.socket_path, cases, SUBMITS)
            for case in cases:
                if case.after is not None:  # answered, or reset with the answer unread
                    assert seen[case.name] <= {errno.EINVAL, -1}, (case.name, seen[case.name])
                elif case.answer:
                    assert seen[case.name] == {errno.EINVAL}, (case.name, seen[case.name])
            assert withdrawn(agent.socket_path, 200) <= {-1, errno.EAGAIN}
            wait_until(lambda: fd_count(pid) == baseline,
                       lambda: f"agent holds {fd_count(pid)} descriptors, {baseline} before "
                               f"{SUBMITS} bad SUBMITs", timeout=30)
            assert run(psk_handshake(agent.socket_path)) == (0, 0)
            wait_until(lambda: fd_count(pid) == baseline,
                       lambda: f"agent holds {fd_count(pid)} descriptors after a good "
                               f"handshake, {baseline} before", timeout=30)
            assert agent.proc.poll() is None
    finally:
        for leftover in home.iterdir():
            leftover.unlink()
        home.rmdir()
