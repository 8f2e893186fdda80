"""Handshake worker processes (``ktlsd run --workers N``): crashes, reload, limits.

Each agent test starts the real ``python -m ktlsd run --workers 2`` and talks to it only as
consumers do (``ktlsd.client``, loopback TCP, a gated relay that holds every byte until the
test opens it). Worker process ids come from the agent's own log ("worker 0 (pid
N) started"), and readiness from its lines; nothing sleeps to synchronise, nothing is timed.

* A worker killed with SIGKILL while 100 requests are in flight: every request gets a DONE
  with a status (those on the dead worker EIO, naming the signal), nothing hangs, a new
  worker takes its place and later handshakes succeed.
* A worker that stops answering (SIGSTOP) is killed once its request's timeout has passed,
  and its request is answered EIO.
* A consumer that withdraws its request reaches the worker running it.
* SIGHUP: a changed setting (the key-exchange group) is used by every worker afterwards.
* Limits stay the supervisor's: a uid's in-flight share and the kept-session cap hold
  across workers; kernel-style requests (kTLS installed by the worker, DONE by the source)
  keep their own slots.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import signal
import socket
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ktlsd.agent import Agent
from ktlsd.client import key_update, submit
from ktlsd.config import AgentConfig, ConfigError, config_from_keyfile, parse_key_file
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.request import (
    AuthMode,
    ConsumerCredentials,
    HandshakeRequest,
    InlineMaterial,
    InlinePsk,
    KeyDelivery,
    KeyUpdateType,
    MessageType,
)
from ktlsd.settings import (
    WORKERS_AUTO,
    AgentSettings,
    ServiceLimits,
    X509Files,
    worker_processes,
)
from ktlsd.tls import ktls
from ktlsd.tls.session import Role
from ktlsd.upcall.service import CancelEvent, HandshakeService, ServiceRequest
from ktlsd.upcall.wire import connect_service, encode_submit, send_message
from ktlsd.workers import (
    _HEADER,
    DROP,
    WorkerPool,
    decode_job,
    decode_settings,
    describe_exit,
    encode_job,
    encode_settings,
)
from tests.agent_helpers import (
    ONE_UID_FOR_ALL_CONFIG,
    AgentProcess,
    DirectRequest,
    GatedRelay,
    parse_handshake_line,
    tcp_pair,
)
from tests.test_admission import NOBODY, SYSTEM_PYTHON, Nobody, public_dir
from tests.test_request_contract import (
    IDENTITY,
    ThirdRequest,
    ThirdSource,
    client_request,
    engine_server,
)
from tests.test_request_contract import PSK as CONTRACT_PSK
from tests.waiting import await_until, run

__all__ = ["public_dir"]  # the fixture, imported for the cross-uid test

PSK = bytes.fromhex("7c" * 32)
STARTED = re.compile(r"ktlsd: INFO worker (\d+) \(pid (\d+)\) started")


def worker_pids(agent: AgentProcess) -> dict[int, int]:
    """index -> pid of the workers started so far (the latest one per index)."""
    pids: dict[int, int] = {}
    for line in agent.matching(STARTED.pattern):
        match = STARTED.search(line)
        assert match is not None
        pids[int(match.group(1))] = int(match.group(2))
    return pids


def handed_to(agent: AgentProcess, since: int = 0) -> set[int]:
    """The worker pids that were handed requests, in log lines from ``since`` on."""
    found = set()
    with agent._cond:
        lines = list(agent.lines[since:])
    for line in lines:
        match = re.search(r"request handed to worker \d+ \(pid (\d+)\)", line)
        if match:
            found.add(int(match.group(1)))
    return found


async def psk_pair(path: str, a: socket.socket, b: socket.socket, identity: str,
                   **kw: Any) -> tuple[Any, Any]:
    psk = [(identity, PSK)]
    return await asyncio.gather(
        submit(a, role="client", auth="psk", psk=psk, service_path=path, **kw),
        submit(b, role="server", auth="psk", psk=psk, service_path=path, **kw),
    )


async def fresh_pairs(path: str, count: int, label: str) -> list[tuple[Any, Any]]:
    results = []
    for i in range(count):
        a, b = tcp_pair()
        with a, b:
            results.append(await psk_pair(path, a, b, f"{label}-{i}"))
    return results


# --- the channel's codec -----------------------------------------------------------------


def test_settings_and_jobs_cross_the_channel_intact() -> None:
    settings = AgentSettings(
        client_x509=X509Files(truststore="/etc/ca.pem", crl="/etc/crl.pem"),
        server_x509=X509Files(certificate="/c.pem", private_key="/k.pem",
                              require_client_cert=True),
        keyrings=(".nvme", "mine"), groups="P-256:X25519", legacy_psk_sha384="offer",
        max_file_bytes=8192, service_limits=ServiceLimits(uid_max_in_flight=3),
    )
    assert decode_settings(encode_settings(settings)) == settings

    request = HandshakeRequest(
        sockfd=7, message_type=MessageType.SERVERHELLO, auth_mode=AuthMode.PSK,
        timeout_ms=1234, peername="host.example", keep_session=True,
        inline=InlineMaterial(psk_keys=(InlinePsk(b"id", PSK, "sha384"),),
                              truststore="/tmp/ca.pem", ciphersuites=("TLS_AES_256_GCM_SHA384",)),
    )
    creds = ConsumerCredentials(pid=42, uid=1000, gid=100, groups=(4, 24, 27))
    message = encode_job(99, DirectRequest(request, credentials=creds), 4321)
    _, flags, _, aux, job = struct.unpack_from("=BBHIQ", message)
    assert (job, aux) == (99, 4321)
    decoded = decode_job(flags, aux, message[16:], sockfd=5)
    assert decoded.credentials == creds
    assert decoded.delivery is KeyDelivery.RETURN_SECRETS
    assert decoded.request.sockfd == 5
    assert decoded.request.inline == request.inline
    assert (decoded.request.peername, decoded.request.keep_session) == ("host.example", True)

    kernel = DirectRequest(client_request_of(3), credentials=None,
                           delivery=KeyDelivery.INSTALL_KTLS)
    message = encode_job(1, kernel, 10)
    _, flags, _, aux, _ = struct.unpack_from("=BBHIQ", message)
    decoded = decode_job(flags, aux, message[16:], sockfd=3)
    assert decoded.credentials is None and decoded.delivery is KeyDelivery.INSTALL_KTLS


def client_request_of(fd: int) -> HandshakeRequest:
    return HandshakeRequest(sockfd=fd, message_type=MessageType.CLIENTHELLO,
                            auth_mode=AuthMode.PSK, peer_identities=(0x1234,))


def parse_config_text(text: str, path: str = "<config>") -> AgentConfig:
    return config_from_keyfile(parse_key_file(text, path))


def test_workers_key_and_option() -> None:
    assert parse_config_text("").workers == 1  # the default: one process (see settings)
    assert parse_config_text("[ktlsd]\nworkers = auto\n").workers == WORKERS_AUTO
    assert parse_config_text("[ktlsd]\nworkers = 3\n").workers == 3
    for bad in ("-1", "many", "257"):
        with pytest.raises(ConfigError, match=r":2: .*workers"):
            parse_config_text(f"[ktlsd]\nworkers = {bad}\n", path="/etc/x.conf")
    assert worker_processes(0) == worker_processes(1) == 0  # in the agent's own process
    assert worker_processes(4) == 4
    assert worker_processes(WORKERS_AUTO) == ((os.cpu_count() or 1) if (os.cpu_count() or 1)
                                              >= 2 else 0)
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)"
    assert describe_exit(3) == "exited with status 3"


# --- a crashed worker ----------------------------------------------------------------------

WORKERS_CONFIG = ("[ktlsd]\nworkers = 2\nmax_concurrent = 128\npending_limit = 256\n"
                  + ONE_UID_FOR_ALL_CONFIG)


def test_kill_9_of_a_worker_during_100_requests(tmp_path: Path) -> None:
    """100 requests (the agent as TLS client; ktlsd's engine in this process as each peer)
    wait in two workers behind a closed relay; one worker is killed with SIGKILL. Every
    request is answered with a status: those on the dead worker EIO naming the signal, the
    others complete once the relay opens; a new worker starts; later handshakes succeed."""
    requests = 100
    with AgentProcess(tmp_path, WORKERS_CONFIG, extra=["--verbose"]) as agent:
        path = agent.socket_path
        pids = worker_pids(agent)
        assert sorted(pids) == [0, 1], agent.text
        victim = pids[0]

        async def one(a: socket.socket, b: socket.socket) -> Any:
            peer = asyncio.create_task(engine_server(b))
            done = await submit(a, role="client", auth="psk", psk=[(IDENTITY, CONTRACT_PSK)],
                                service_path=path, timeout=20)
            if done.status:
                a.close()  # the peer then sees the connection end
                with contextlib.suppress(Exception):
                    await peer
            else:
                session = await peer
                assert done.session is not None
                assert session.client_secret == done.session.client_secret
            return done

        async def main() -> None:
            relay = GatedRelay()
            try:
                ends = [await relay.connect() for _ in range(requests)]
                answers = asyncio.gather(*(one(a, b) for a, b in ends))
                await agent.await_for(r"request handed to worker", requests)
                assert handed_to(agent) == set(pids.values())
                os.kill(victim, signal.SIGKILL)
                lost = (await agent.await_for(
                    rf"worker 0 \(pid {victim}\) was killed by signal 9 "
                    r"\(SIGKILL\); (\d+) requests in flight on it answered EIO"))[0]
                on_victim = int(re.findall(r"; (\d+) requests", lost)[0])
                assert 0 < on_victim < requests
                relay.open()
                dones = await answers
                assert len(dones) == requests  # every one answered, none hangs
                killed = [d for d in dones if d.status]
                assert len(killed) == on_victim
                assert {d.status for d in killed} == {errno.EIO}
                assert all(f"handshake worker 0 (pid {victim}) was killed by signal 9 (SIGKILL)"
                           in d.reason for d in killed), {d.reason for d in killed}
                for a, b in ends:
                    a.close()
                    b.close()
            finally:
                await relay.aclose()

        run(main(), 120)
        new = agent.wait_for(r"INFO worker 0 \(pid \d+\) started", count=2)[-1]
        assert str(victim) not in new
        mark = len(agent.lines)
        later = run(fresh_pairs(path, 6, "after"))
        assert all((da.status, db.status) == (0, 0) for da, db in later), later
        assert handed_to(agent, mark) == set(worker_pids(agent).values())
        assert victim not in worker_pids(agent).values()
        lines = agent.wait_for(r"ktlsd: \w+ handshake source=service", requests + 12)
        assert len(lines) == requests + 12  # one line per request, every one with a status
        assert all(parse_handshake_line(line)["status"].isdigit() for line in lines)
    assert agent.wait_exit() == 0
    assert agent.matching(r"stopped: \d+ handshakes completed, \d+ failed")


def test_a_worker_that_stops_answering_is_killed_and_its_request_answered(
        tmp_path: Path) -> None:
    """SIGSTOP one worker: its request is answered EIO once the request's timeout (plus the
    grace) has passed, the worker is killed and replaced; the other end times out."""
    with AgentProcess(tmp_path, WORKERS_CONFIG, extra=["--verbose"]) as agent:
        pids = worker_pids(agent)
        os.kill(pids[1], signal.SIGSTOP)
        try:
            a, b = tcp_pair()
            with a, b:
                da, db = run(psk_pair(agent.socket_path, a, b, "stopped", timeout=1))
        finally:
            with_suppressed_lookup(lambda: os.kill(pids[1], signal.SIGCONT))
        statuses = sorted([(da.status, da.reason), (db.status, db.reason)])
        assert statuses[0][0] == errno.EIO and "did not answer" in statuses[0][1], statuses
        assert statuses[1][0] == errno.ETIMEDOUT, statuses
        agent.wait_for(rf"worker 1 \(pid {pids[1]}\) was killed by signal 9")
        agent.wait_for(r"INFO worker 1 \(pid \d+\) started", count=2)
        later = run(fresh_pairs(agent.socket_path, 2, "revived"))
        assert all((da.status, db.status) == (0, 0) for da, db in later)
    assert agent.wait_exit() == 0


def with_suppressed_lookup(action: Any) -> None:
    with contextlib.suppress(ProcessLookupError):
        action()


def test_a_withdrawn_request_reaches_its_worker(tmp_path: Path) -> None:
    """The consumer closes its service connection while its handshake waits in a worker:
    the worker gives up at once (no timeout), the agent logs the cancellation."""
    with AgentProcess(tmp_path, WORKERS_CONFIG, extra=["--verbose"]) as agent:

        async def main() -> None:
            relay = GatedRelay()
            try:
                a, _b = await relay.connect()
                request = HandshakeRequest(
                    sockfd=-1, message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.PSK,
                    timeout_ms=30_000, inline=InlineMaterial(psk_keys=(InlinePsk(b"w", PSK),)))
                conn = await connect_service(agent.socket_path)
                await send_message(conn, encode_submit(request), (a.fileno(),))
                await agent.await_for(r"request handed to worker")
                conn.close()
                line = (await agent.await_for(r"handshake source=service"))[0]
                fields = parse_handshake_line(line)
                assert fields["status"] == str(errno.ETIMEDOUT)
                assert "consumer cancelled the request" in line
                a.close()
            finally:
                await relay.aclose()

        run(main())
    assert agent.wait_exit() == 0


# --- reload ------------------------------------------------------------------------------------


def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    """The key-exchange group is a setting the workers use: after SIGHUP, every handshake on
    either worker uses the new one."""
    config = "[ktlsd]\nworkers = 2\ngroups = X25519\n"
    with AgentProcess(tmp_path, config, extra=["--verbose"]) as agent:
        before = run(fresh_pairs(agent.socket_path, 4, "before"))
        assert {d.session.group for pair in before for d in pair} == {"x25519"}, before
        assert handed_to(agent) == set(worker_pids(agent).values())
        agent.config_path.write_text("[ktlsd]\nworkers = 2\ngroups = P-256\n")
        agent.signal(signal.SIGHUP)
        reloaded = agent.wait_for(r"configuration reloaded")[0]
        assert "groups 'X25519' -> 'P-256'" in reloaded
        mark = len(agent.lines)
        after = run(fresh_pairs(agent.socket_path, 4, "after"))
        assert {d.session.group for pair in after for d in pair} == {"secp256r1"}, after
        assert handed_to(agent, mark) == set(worker_pids(agent).values())
        # The number of workers is read at start only, and a reload that changes it says so.
        agent.config_path.write_text("[ktlsd]\nworkers = 3\ngroups = P-256\n")
        agent.signal(signal.SIGHUP)
        agent.wait_for(r"SIGHUP: \[ktlsd\] workers takes effect at the next start")
        assert len(worker_pids(agent)) == 2
    assert agent.wait_exit() == 0


# --- limits across workers --------------------------------------------------------------------

NOBODY_PAIR = """
import asyncio, socket, sys
from ktlsd.client import submit

async def main():
    listener = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(listener.getsockname())
    b = listener.accept()[0]
    psk = [("nobody", b"\\x22" * 32)]
    da, db = await asyncio.gather(
        submit(a, role="client", auth="psk", psk=psk, service_path=sys.argv[1]),
        submit(b, role="server", auth="psk", psk=psk, service_path=sys.argv[1]))
    print(da.status, db.status, flush=True)

asyncio.run(main())
"""


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK) or os.getuid() != 0,
                    reason="needs root and a system python3 that uid 65534 can run")
def test_a_uids_in_flight_share_holds_across_workers(public_dir: Path) -> None:
    """uid 0 has a share of 2 in flight and queues 3 pairs behind a closed relay; with two
    workers idle, uid 65534's pair is taken and completes while uid 0's other 4 requests
    stay queued; opened, uid 0's 3 pairs complete two requests at a time."""
    config = ("[ktlsd]\nworkers = 2\nmax_concurrent = 16\nservice_mode = 666\n"
              "uid_max_in_flight = 2\nuid_max_pending = 16\nuid_max_connections = 64\n")
    with AgentProcess(public_dir, config, extra=["--verbose"]) as agent:
        path = agent.socket_path

        async def main() -> None:
            relay = GatedRelay()
            try:
                ends = [await relay.connect() for _ in range(3)]
                tasks = []
                for i, (a, b) in enumerate(ends):  # queued in pair order: a0 b0 a1 b1 a2 b2
                    psk = [(f"root-{i}", PSK)]
                    for sock, role in ((a, Role.CLIENT), (b, Role.SERVER)):
                        tasks.append(asyncio.create_task(submit(
                            sock, role=role, auth="psk", psk=psk, service_path=path)))
                        await agent.await_for(r"uid 0 gid 0 submitted", len(tasks))
                await agent.await_for(r"request handed to worker", 2)
                nobody = await Nobody.start(NOBODY_PAIR, path)
                try:
                    assert (await nobody.lines_at_least(1))[0] == "0 0"
                finally:
                    await nobody.stop()
                # uid 0 held its share: 2 of its requests taken, plus uid 65534's two.
                assert len(agent.matching(r"request taken")) == 4
                assert len(agent.matching(rf"uid {NOBODY} gid {NOBODY} submitted")) == 2
                relay.open()
                dones = await asyncio.gather(*tasks)
                assert [d.status for d in dones] == [0] * 6, [d.reason for d in dones]
                for a, b in ends:
                    a.close()
                    b.close()
            finally:
                await relay.aclose()

        run(main(), 120)
        in_flight = [int(m.group(1)) for line in agent.matching(r"request taken")
                     if (m := re.search(r"in_flight=(\d+)", line))]
        assert len(in_flight) == 8 and max(in_flight) <= 4
        assert handed_to(agent) == set(worker_pids(agent).values())
    assert agent.wait_exit() == 0


def test_kept_session_caps_hold_across_workers(tmp_path: Path) -> None:
    """A uid may keep 2 sessions: of 4 kept from handshakes spread over two workers, the two
    oldest are evicted (a key update on them answers ENOKEY) and the two newest work."""
    config = "[ktlsd]\nworkers = 2\nuid_max_kept_sessions = 2\n"
    with AgentProcess(tmp_path, config, extra=["--verbose"]) as agent:
        path = agent.socket_path

        async def main() -> None:
            kept = []
            for i in range(4):
                a, b = tcp_pair()
                psk = [(f"kept-{i}", PSK)]
                da, db = await asyncio.gather(  # the client end's session is kept
                    submit(a, role="client", auth="psk", psk=psk, service_path=path,
                           keep_session=True),
                    submit(b, role="server", auth="psk", psk=psk, service_path=path))
                assert (da.status, db.status, db.session_id) == (0, 0, 0)
                kept.append((a, b, da))
            statuses = []
            for a, b, da in kept:
                with a, b:
                    done = await key_update(a, role="client", session_id=da.session_id,
                                            key_update_type=KeyUpdateType.SEND,
                                            record_seqs=(0, 0), service_path=path, timeout=5)
                    statuses.append(done.status)
            assert statuses == [errno.ENOKEY, errno.ENOKEY, 0, 0], statuses

        run(main())
        assert handed_to(agent) == set(worker_pids(agent).values())
    assert agent.wait_exit() == 0


def test_kernel_style_requests_keep_their_slots_with_workers(sock_path: str) -> None:
    """The agent in this process, with a pool of two real workers: a kernel-style request
    (credentials None, keys installed into kTLS by the worker, DONE by its source) completes
    while service requests of a stalled uid hold every service slot. (Without kTLS here the
    worker's install fails, and says so: EIO.)"""
    with_ktls = ktls.probe().usable

    async def main() -> None:
        kernel = ThirdSource()
        limits = ServiceLimits(uid_max_in_flight=100, uid_max_pending=100,
                               uid_max_connections=100)
        async with in_process_agent(2, sock_path, limits, AgentSettings(max_concurrent=2),
                                    kernel, front=False) as (_pool, service, relay):
            stalled = []
            for i in range(2):
                a, far = await relay.connect()
                stalled.append((a, far, asyncio.create_task(submit(
                    a, role="client", auth="psk", psk=[(f"stall-{i}", PSK)],
                    service_path=sock_path, timeout=30))))
            while service.in_flight < 2:
                await asyncio.sleep(0.01)
            a, b = tcp_pair()
            with a, b:
                pending = ThirdRequest(client_request(a), credentials=None,
                                       delivery=KeyDelivery.INSTALL_KTLS)
                peer = asyncio.create_task(engine_server(b))
                kernel.submit(pending)
                answer = await asyncio.wait_for(asyncio.shield(pending.answer), 60)
                await peer
                if with_ktls:
                    assert answer.status == 0, answer.reason
                    assert answer.session is None  # kTLS installed, no secrets in DONE
                    ulp = a.getsockopt(socket.SOL_TCP, ktls.TCP_ULP, 16).rstrip(b"\0")
                    assert ulp == b"tls"
                else:
                    assert answer.status == errno.EIO, answer.reason
                    assert "kTLS install failed" in answer.reason
            assert service.in_flight == 2  # the stalled ones still hold the service's slots
            for _, far, _ in stalled:
                far.close()  # the stalled handshakes' peers leave
            relay.open()
            for a, _, waiting in stalled:
                assert (await waiting).status == errno.ETIMEDOUT
                a.close()

    run(main(), 120)


@contextlib.asynccontextmanager
async def in_process_agent(
    workers: int, sock_path: str, limits: ServiceLimits,
    settings: AgentSettings | None = None, *extra_sources: Any, front: bool = True,
) -> AsyncIterator[tuple[WorkerPool, HandshakeService, GatedRelay]]:
    """The agent in this process with a pool of real workers and the handshake service
    (``front``: the workers read its requests), and a relay for the TCP pairs; all of it
    stopped and closed at the end."""
    pool = WorkerPool(workers)
    await pool.start()
    service = HandshakeService(sock_path, limits=limits)
    await service.start()
    if front:
        pool.serve_service(service)
    agent = Agent(settings or AgentSettings(), [service, *extra_sources], runner=pool)
    task = asyncio.create_task(agent.run())
    relay = GatedRelay()
    try:
        yield pool, service, relay
    finally:
        await relay.aclose()
        await agent.stop()
        await asyncio.wait_for(task, 30)
        await service.close()
        await pool.close()


# --- service requests read by the workers -----------------------------------------------------


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_workers_read_service_requests_and_refusals_leave_nothing_behind(tmp_path: Path) -> None:
    """The workers read the service's SUBMITs; admission stays the supervisor's: with a uid
    share of 2 in flight and 2 queued, a fifth request behind a closed relay is answered
    EAGAIN, a malformed SUBMIT EINVAL; the queued ones run once those in flight are done.
    Afterwards the workers hold no descriptor more than before."""
    config = ("[ktlsd]\nworkers = 2\nuid_max_in_flight = 2\nuid_max_pending = 2\n"
              "uid_max_connections = 64\n")
    with AgentProcess(tmp_path, config, extra=["--verbose"]) as agent:
        path = agent.socket_path
        pids = list(worker_pids(agent).values())
        warm = run(fresh_pairs(path, 2, "warm"))  # both workers have loaded the engine
        assert all((da.status, db.status) == (0, 0) for da, db in warm), warm
        # Logged: the workers have closed their copies (they do before reporting).
        agent.wait_for(r"ktlsd: \w+ handshake source=service", 4)
        baseline = {pid: fd_count(pid) for pid in pids}

        async def main() -> None:
            relay = GatedRelay()
            try:
                ends = [await relay.connect() for _ in range(5)]
                peers = [asyncio.create_task(engine_server(b)) for _, b in ends[:4]]
                tasks = []
                for i, (a, _) in enumerate(ends):
                    tasks.append(asyncio.create_task(submit(
                        a, role="client", auth="psk", psk=[(IDENTITY, CONTRACT_PSK)],
                        service_path=path, timeout=20)))
                    if i < 4:
                        await agent.await_for(r"uid 0 gid 0 submitted", 4 + i + 1)
                refused = await tasks[4]
                assert refused.status == errno.EAGAIN, refused.reason
                assert "too many pending handshake requests of uid 0" in refused.reason
                conn = await connect_service(path)  # a SUBMIT without its socket
                request = HandshakeRequest(sockfd=-1, message_type=MessageType.CLIENTHELLO,
                                           auth_mode=AuthMode.PSK)
                await send_message(conn, encode_submit(request))
                answer = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(conn, 4096),
                                                20)
                conn.close()
                assert struct.unpack_from("=I", answer, 0)[0] == len(answer)
                assert b"without a socket" in answer
                relay.open()
                dones = await asyncio.gather(*tasks[:4])
                assert [d.status for d in dones] == [0] * 4, [d.reason for d in dones]
                await asyncio.gather(*peers)
                for a, b in ends:
                    a.close()
                    b.close()
            finally:
                await relay.aclose()

        run(main(), 120)
        later = run(fresh_pairs(path, 2, "after"))
        assert all((da.status, db.status) == (0, 0) for da, db in later)
        lines = agent.wait_for(r"ktlsd: \w+ handshake source=service", 4 + 4 + 4)
        assert len(lines) == 4 + 4 + 4  # one per request the agent took
        assert {pid: fd_count(pid) for pid in pids} == baseline
    assert agent.wait_exit() == 0


def test_a_queued_request_read_by_a_worker_is_withdrawn_when_its_consumer_leaves(
        tmp_path: Path) -> None:
    """uid 0 may run one request at a time: a second, read by a worker and queued in the
    supervisor, is withdrawn when its consumer closes the service connection (the agent never
    takes it), and the worker lets go of its copies; the first completes."""
    config = ("[ktlsd]\nworkers = 2\nuid_max_in_flight = 1\nuid_max_pending = 4\n"
              "uid_max_connections = 64\n")
    with AgentProcess(tmp_path, config, extra=["--verbose"]) as agent:
        path = agent.socket_path
        pids = list(worker_pids(agent).values())
        baseline = {pid: fd_count(pid) for pid in pids}

        async def main() -> None:
            relay = GatedRelay()
            try:
                (a, b), (c, _d) = [await relay.connect() for _ in range(2)]
                peer = asyncio.create_task(engine_server(b))
                first = asyncio.create_task(submit(
                    a, role="client", auth="psk", psk=[(IDENTITY, CONTRACT_PSK)],
                    service_path=path, timeout=20))
                await agent.await_for(r"request handed to worker")
                request = HandshakeRequest(
                    sockfd=-1, message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.PSK,
                    timeout_ms=20_000, inline=InlineMaterial(psk_keys=(InlinePsk(b"q", PSK),)))
                conn = await connect_service(path)
                await send_message(conn, encode_submit(request), (c.fileno(),))
                await agent.await_for(r"uid 0 gid 0 submitted", 2)
                conn.close()
                await agent.await_for(r"disconnected: request cancelled \(queued\)")
                relay.open()
                assert (await first).status == 0
                await peer
                for sock in (a, b, c, _d):
                    sock.close()
            finally:
                await relay.aclose()

        run(main(), 60)
        agent.wait_for(r"ktlsd: \w+ handshake source=service")
        assert len(agent.matching(r"request taken")) == 1
        assert {pid: fd_count(pid) for pid in pids} == baseline
    assert agent.wait_exit() == 0


# --- cancellation and DROP on a busy channel ---------------------------------------------------


def test_a_cancel_event_runs_a_callback_added_after_it_was_set() -> None:
    async def main() -> None:
        called: list[str] = []
        event = CancelEvent()
        event.add_callback(lambda: called.append("before"))
        assert called == []
        event.set()
        assert called == ["before"]
        event.add_callback(lambda: called.append("after"))  # already set: at once
        assert called == ["before", "after"]

    run(main())


def test_a_consumer_leaving_while_its_job_waits_for_the_channel_reaches_the_worker() -> None:
    """A service request's consumer leaves while the pool waits to send its JOB (another
    send holds the channel): once the JOB is out, CANCEL follows; the worker answers at once
    and lives on. (Missed, the pool would wait out the request's timeout, then kill the
    worker.)"""

    async def main() -> None:
        pool = WorkerPool(1)
        await pool.start()
        worker = pool.workers[0]
        assert worker is not None
        a, b = tcp_pair()  # b never speaks: the handshake waits for its peer
        item = ServiceRequest(request=client_request(a),
                              credentials=ConsumerCredentials(os.getpid(), 0, 0))
        try:
            async with worker.send_lock:
                task = asyncio.create_task(pool.handshake(item, AgentSettings(), 600))
                while not worker.jobs:  # the job waits for the channel
                    await asyncio.sleep(0)
                item.cancelled.set()
            with pytest.raises(HandshakeError) as caught:
                await asyncio.wait_for(task, 30)
            assert caught.value.cause is FailureCause.PEER_CLOSED, caught.value
            assert "consumer cancelled the request" in caught.value.reason
            assert not worker.gone and not worker.kill_reason
            assert pool.pids == [worker.pid]
        finally:
            os.close(item.request.sockfd)
            a.close()
            b.close()
            await pool.close()

    run(main(), 60)


def test_a_drop_on_a_full_channel_still_reaches_the_worker(tmp_path: Path) -> None:
    """A worker reads a SUBMIT and reports ADMIT; the service refuses it (ESRCH: no agent) and
    drops it at the worker while the channel to that worker is full (the worker stopped):
    the DROP goes out once there is room, and the worker closes its copies of the service
    connection and of the TCP socket (a lost DROP would leave them open for ever)."""
    path = str(tmp_path / "handshake.sock")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = WorkerPool(1)
        await pool.start()
        worker = pool.workers[0]
        assert worker is not None
        service = HandshakeService(path)
        await service.start()
        pool.serve_service(service)
        a, b = tcp_pair()
        conn = await connect_service(path)
        stopped = False
        try:
            # The ADMIT waits in the channel until this test lets the pool read it.
            loop.remove_reader(worker.channel.fileno())
            request = HandshakeRequest(
                sockfd=-1, message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.PSK,
                inline=InlineMaterial(psk_keys=(InlinePsk(b"d", PSK),)))
            await send_message(conn, encode_submit(request), (a.fileno(),))
            a.close()

            def admitted() -> bool:
                try:
                    return bool(worker.channel.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
                except BlockingIOError:
                    return False

            await await_until(admitted, "the worker's ADMIT")
            os.kill(worker.pid, signal.SIGSTOP)
            stopped = True
            filler = 1 << 40  # DROPs of connections nobody has: ignored by the worker
            with pytest.raises(BlockingIOError):
                while True:
                    worker.channel.send(_HEADER.pack(DROP, 0, 0, 0, filler))
                    filler += 1
            pool._readable(worker)  # ADMIT -> ESRCH -> drop() on the full channel
            loop.add_reader(worker.channel.fileno(), pool._readable, worker)
            answer = await asyncio.wait_for(loop.sock_recv(conn, 4096), 10)
            assert b"no handshake agent is serving requests" in answer
            os.kill(worker.pid, signal.SIGCONT)
            stopped = False
            # The worker's copies closed too: the consumer's connection and the TCP peer end.
            assert await asyncio.wait_for(loop.sock_recv(conn, 16), 30) == b""
            b.setblocking(False)
            assert await asyncio.wait_for(loop.sock_recv(b, 16), 30) == b""
            assert not worker.gone and not worker.kill_reason
        finally:
            if stopped:
                os.kill(worker.pid, signal.SIGCONT)
            conn.close()
            b.close()
            await service.close()
            await pool.close()

    run(main(), 90)


def test_requests_a_worker_read_count_as_service_connections(sock_path: str) -> None:
    """``service_max_connections`` and the status report's connection count include the
    connections of requests a worker read (queued or running there): with a cap of one, a
    request running in a worker makes the next connection be dropped; once it is answered
    the count is back to zero."""

    async def main() -> None:
        limits = ServiceLimits(max_connections=1, uid_max_in_flight=10, uid_max_pending=10,
                               uid_max_connections=10)
        async with in_process_agent(1, sock_path, limits) as (_pool, service, relay):
            a, b = await relay.connect()
            peer = asyncio.create_task(engine_server(b))
            first = asyncio.create_task(submit(
                a, role="client", auth="psk", psk=[(IDENTITY, CONTRACT_PSK)],
                service_path=sock_path, timeout=30))
            await await_until(lambda: service.in_flight == 1, "the first request running")
            assert service.connections == 1
            c, d = tcp_pair()
            with c, d:
                second = await submit(c, role="client", auth="psk", psk=[("over", PSK)],
                                      service_path=sock_path, timeout=10)
            assert second.status != 0, second
            assert service.refused() == {"dropped": 1}
            relay.open()
            done = await first
            assert done.status == 0, done.reason
            await peer
            await await_until(lambda: service.connections == 0, "the count back to zero")
            a.close()
            b.close()

    run(main(), 90)


def test_a_silent_connection_read_by_a_worker_is_logged(tmp_path: Path) -> None:
    """A consumer that connects and sends nothing within ``submit_timeout_ms`` is logged as
    without workers ("sent no request"), by the worker that read it; one that connects and
    leaves is not."""
    config = "[ktlsd]\nworkers = 2\nsubmit_timeout_ms = 300\n"
    with AgentProcess(tmp_path, config) as agent:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as left:
            left.connect(agent.socket_path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as silent:
            silent.connect(agent.socket_path)
            silent.settimeout(30)
            assert silent.recv(16) == b""  # closed once the submit timeout has passed
        [line] = agent.wait_for(r"worker \d: service: pid \d+ uid \d+ sent no request")
        assert f"pid {os.getpid()} uid {os.getuid()} sent no request" in line
        assert len(agent.matching(r"sent no request")) == 1
    assert agent.wait_exit() == 0


def test_requests_queued_on_a_worker_that_dies_are_answered_and_forgotten(
        sock_path: str) -> None:
    """One worker reads two requests of a uid that may run one at a time: the first runs
    there, the second waits in the supervisor's queue. The worker is killed: both are
    answered EIO naming it (the queued one when the agent takes it), and the pool keeps no
    record of either afterwards."""

    async def main() -> None:
        limits = ServiceLimits(uid_max_in_flight=1, uid_max_pending=10, uid_max_connections=10)
        async with in_process_agent(1, sock_path, limits) as (pool, service, relay):
            worker = pool.workers[0]
            assert worker is not None
            ends = [await relay.connect() for _ in range(2)]
            answers = [asyncio.create_task(submit(
                a, role="client", auth="psk", psk=[(f"lost-{i}", PSK)],
                service_path=sock_path, timeout=30)) for i, (a, _) in enumerate(ends)]
            await await_until(lambda: service.in_flight == 1 and service.pending == 1,
                              "one request running, one queued")
            os.kill(worker.pid, signal.SIGKILL)
            dones = await asyncio.gather(*answers)
            assert [d.status for d in dones] == [errno.EIO, errno.EIO], dones
            assert all(f"(pid {worker.pid}) was killed by signal 9" in d.reason
                       for d in dones), [d.reason for d in dones]
            assert pool._lost_fronts == {} and pool._fronts == {}
            await await_until(lambda: service.connections == 0, "every connection closed")
            for a, b in ends:
                a.close()
                b.close()

    run(main(), 90)
