"""Fair admission: no local user can hold back another user's handshake, or the kernel's.

The attacker is a real second uid (65534, a child process started with ``user=``): its
peers accept TCP connections and never answer, its requests ask for a 600 s timeout, and it
submits more than its share. The real agent serves the real service and a kernel-style
source (credentials None, keys installed into kTLS) at once. Checked, without timing
anything: while the attacker's stalled handshakes still hold its whole in-flight share,
another uid's handshake and a kernel-style handshake complete; the attacker gets EAGAIN past
its pending share; its stalled requests end at the agent's timeout cap, not at 600 s; the
service hands queued requests out round-robin between uids; a uid past its connection share
is answered EAGAIN at once, and silent connections are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ktlsd.agent import Agent
from ktlsd.client import submit
from ktlsd.request import HandshakeDone, KeyDelivery
from ktlsd.settings import AgentSettings, ServiceLimits
from ktlsd.tls import ktls
from ktlsd.upcall.service import HandshakeService
from ktlsd.upcall.wire import connect_service, encode_submit
from tests.agent_helpers import REPO, tcp_pair
from tests.test_request_contract import ThirdRequest, ThirdSource, client_request, engine_server
from tests.test_service import client_request as service_client_request
from tests.waiting import await_until, run

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
PSK = bytes.fromhex("2e" * 32)
CAP_MS = 3000

pytestmark = pytest.mark.skipif(
    not os.access(SYSTEM_PYTHON, os.X_OK) or os.getuid() != 0,
    reason="needs root and a system python3 that uid 65534 can run")

STALLER = """
import asyncio, json, socket, sys
from ktlsd.client import submit

async def main():
    path = sys.argv[1]
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    keep, tasks = [], []

    async def one():
        sock = socket.create_connection(listener.getsockname())
        keep.append(sock)
        keep.append(listener.accept()[0])  # the peer: accepted, never answered
        done = await submit(sock, role="client", auth="psk", psk=[("stall", b"\\x11" * 32)],
                            timeout=600, service_path=path)
        print(json.dumps({"status": done.status, "reason": done.reason}), flush=True)

    while line := await asyncio.to_thread(sys.stdin.readline):  # "N": N more requests
        tasks += [asyncio.create_task(one()) for _ in range(int(line))]
    await asyncio.gather(*tasks)

asyncio.run(main())
"""

SILENT = """
import socket, struct, sys
from ktlsd.upcall.wire import decode_done_message
path, count = sys.argv[1], int(sys.argv[2])
silent = []
for _ in range(count):
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(path)
    silent.append(conn)
extra = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
extra.settimeout(30)
extra.connect(path)
done = decode_done_message(extra.recv(65536))[1]
print(done.status, done.reason, flush=True)
for conn in silent:
    conn.settimeout(30)
    print("closed" if conn.recv(100) == b"" else "data", flush=True)
"""

ONE_SUBMIT = """
import socket, struct, sys
from ktlsd.upcall.wire import decode_done_message
path, message = sys.argv[1], bytes.fromhex(sys.argv[2])
listener = socket.create_server(("127.0.0.1", 0))
tcp = socket.create_connection(listener.getsockname())
conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
conn.settimeout(30)
conn.connect(path)
conn.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", tcp.fileno()))])
print(decode_done_message(conn.recv(65536))[1].status, flush=True)
"""


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory uid 65534 can reach (the test's tmp_path may not be)."""
    path = Path(tempfile.mkdtemp(prefix="ktlsd-admission-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Nobody:
    """A Python program running as uid 65534; its stdout lines are collected."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, code: str, *args: str) -> Nobody:
        proc = await asyncio.create_subprocess_exec(
            SYSTEM_PYTHON, "-c", code, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            user=NOBODY,
            group=NOBODY, extra_groups=[], cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode().strip())

    async def tell(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        await self.proc.stdin.drain()

    async def lines_at_least(self, count: int) -> list[str]:
        await await_until(lambda: len(self.lines) >= count or self._reader.done(),
                          lambda: f"uid {NOBODY} printed {self.lines}", timeout=60)
        assert len(self.lines) >= count, self.lines
        return self.lines

    async def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        await self._reader


@contextlib.asynccontextmanager
async def agent_with_kernel_source(
    path: str, settings: AgentSettings, limits: ServiceLimits
) -> AsyncIterator[tuple[HandshakeService, ThirdSource]]:
    service = HandshakeService(path, mode=0o666, limits=limits)
    await service.start()
    kernel = ThirdSource()  # stands for the kernel's handshake family
    agent = Agent(settings, [service, kernel])
    task = asyncio.create_task(agent.run())
    try:
        yield service, kernel
    finally:
        await agent.stop()
        await asyncio.wait_for(task, 30)


async def psk_pair(path: str) -> tuple[HandshakeDone, HandshakeDone]:
    a, b = tcp_pair()
    with a, b:
        psk = [("fair", PSK)]
        return await asyncio.gather(
            submit(a, role="client", auth="psk", psk=psk, service_path=path),
            submit(b, role="server", auth="psk", psk=psk, service_path=path),
        )


async def kernel_style_handshake(kernel: ThirdSource) -> HandshakeDone:
    a, b = tcp_pair()
    with a, b:
        pending = ThirdRequest(client_request(a), credentials=None,
                               delivery=KeyDelivery.INSTALL_KTLS)
        peer = asyncio.create_task(engine_server(b))
        kernel.submit(pending)
        answer = await asyncio.wait_for(asyncio.shield(pending.answer), 60)
        await peer
        return answer


def test_a_stalling_uid_holds_only_its_share(public_dir: Path) -> None:
    """uid 65534 submits 8 requests whose peers never answer, with 600 s timeouts, against
    shares of 2 in flight and 3 pending, on an agent with 4 service slots."""
    path = str(public_dir / "handshake.sock")
    limits = ServiceLimits(uid_max_in_flight=2, uid_max_pending=3, uid_max_connections=16)
    settings = AgentSettings(keep_sessions=False, max_concurrent=4,
                             max_consumer_timeout_ms=CAP_MS)

    async def main() -> None:
        async with agent_with_kernel_source(path, settings, limits) as (service, kernel):
            staller = await Nobody.start(STALLER, path)

            def held() -> str:
                return (f"uid {NOBODY} holds {service.in_flight_of(NOBODY)} in flight, "
                        f"{service.pending_of(NOBODY)} pending; it printed {staller.lines}")

            try:
                await staller.tell("2")
                await await_until(lambda: service.in_flight_of(NOBODY) == 2, held, timeout=60)
                await staller.tell("3")
                await await_until(lambda: service.pending_of(NOBODY) == 3, held, timeout=60)
                await staller.tell("3")
                refused = await staller.lines_at_least(3)
                assert (service.in_flight_of(NOBODY), service.pending_of(NOBODY)) == (2, 3)
                for line in refused:
                    answer = json.loads(line)
                    assert answer["status"] == errno.EAGAIN, answer
                    assert f"of uid {NOBODY} (3)" in answer["reason"], answer
                # Another uid, and the kernel, while the staller holds its whole share.
                (da, db), kernel_answer = await asyncio.gather(psk_pair(path),
                                                               kernel_style_handshake(kernel))
                assert (da.status, da.reason, db.status, db.reason) == (0, "", 0, "")
                assert kernel_answer.session is None
                if ktls.probe().usable:
                    assert kernel_answer.status == 0, kernel_answer.reason
                else:  # the handshake completed; only this host's missing kTLS failed it
                    assert kernel_answer.status == errno.EIO
                    assert "kTLS install failed" in kernel_answer.reason
                # ... and none of that waited for the staller: its share is still held.
                assert service.in_flight_of(NOBODY) == 2
                # The stalled ones end at the cap, not after the 600 s they asked for.
                ended = (await staller.lines_at_least(5))[3:5]
                for line in ended:
                    answer = json.loads(line)
                    assert answer["status"] == errno.ETIMEDOUT, answer
                    assert f"within {CAP_MS / 1000:g} s" in answer["reason"], answer
            finally:
                await staller.stop()
            await await_until(lambda: service.pending == service.in_flight == 0,
                              "the staller's requests are gone", timeout=60)

    run(main(), 120)


def test_queued_requests_go_round_robin_between_uids(public_dir: Path) -> None:
    """Three requests of uid 0 queued, then one of uid 65534: the agent is handed uid 0's
    first, then 65534's, then the rest of uid 0's."""
    path = str(public_dir / "handshake.sock")

    async def main() -> None:
        async with HandshakeService(path, mode=0o666) as service:
            stream = service.requests()
            pairs = [tcp_pair() for _ in range(3)]
            conns = []
            for consumer, _ in pairs:
                conn = await connect_service(path)
                conn.sendmsg([encode_submit(service_client_request())], [(
                    socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", consumer.fileno()))])
                conns.append(conn)
            await await_until(lambda: service.pending_of(0) == 3, "uid 0's three queued")
            other = await Nobody.start(ONE_SUBMIT, path, encode_submit(
                service_client_request()).hex())
            try:
                await await_until(lambda: service.pending_of(NOBODY) == 1,
                                  f"uid {NOBODY}'s request queued", timeout=60)
                order = []
                for _ in range(4):
                    pending = await anext(stream)  # type: ignore[arg-type]
                    order.append(pending.credentials.uid)
                    await pending.done(HandshakeDone(errno.EACCES, pending.request.sockfd,
                                                     reason="test"))
                assert order == [0, NOBODY, 0, 0]
                assert await other.lines_at_least(1) == [str(errno.EACCES)]
            finally:
                await other.stop()
                await stream.aclose()  # type: ignore[attr-defined]
                for conn in conns:
                    conn.close()
                for a, b in pairs:
                    a.close()
                    b.close()

    run(main(), 120)


def test_connections_past_a_uids_share_get_eagain_and_silent_ones_are_closed(
    public_dir: Path
) -> None:
    path = str(public_dir / "handshake.sock")
    limits = ServiceLimits(uid_max_connections=4, submit_timeout_ms=500)
    settings = AgentSettings(keep_sessions=False)

    async def main() -> None:
        async with agent_with_kernel_source(path, settings, limits) as (service, _):
            silent = await Nobody.start(SILENT, path, "4")
            try:
                first = (await silent.lines_at_least(1))[0]
                assert first.startswith(f"{errno.EAGAIN} "), first
                assert f"connections of uid {NOBODY} (4)" in first
                # Another uid is served meanwhile (the nobody connections may still be open).
                da, db = await psk_pair(path)
                assert (da.status, db.status) == (0, 0), (da.reason, db.reason)
                # The silent connections are closed by the service, without an answer.
                assert (await silent.lines_at_least(5))[1:5] == ["closed"] * 4
            finally:
                await silent.stop()
            assert service.counters["uid connections"] == 1
            await await_until(lambda: service.connections_of(NOBODY) == 0, "all closed")

    run(main(), 120)
