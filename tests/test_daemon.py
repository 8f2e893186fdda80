"""``ktlsd run`` as a real process: SIGTERM drain, SIGHUP reload, the per-handshake log line,
bad service messages, and the secret scan of a full debug-logged run.

Each test starts ``python -m ktlsd run --socket <tmp> -c <tmp config> --kernel no`` and talks
to it only as consumers do, through ``ktlsd.client`` and real loopback TCP sockets. Readiness
comes from the agent's own log lines; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import pytest

from ktlsd import __version__, keyring
from ktlsd.client import connection_from_done, key_update, submit
from ktlsd.request import KeyUpdateType
from ktlsd.tls.session import Session
from ktlsd.upcall.netlink import AcceptAttr
from ktlsd.upcall.nlattr import encode_attr, encode_genl, u32
from ktlsd.upcall.wire import (
    MAX_MESSAGE_SIZE,
    connect_service,
    decode_done_message,
    recv_message,
    send_message,
)
from tests.agent_helpers import (
    ONE_UID_FOR_ALL_CONFIG,
    REPO,
    AgentProcess,
    GatedRelay,
    NotifyListener,
    find_secrets,
    parse_handshake_line,
    tcp_pair,
)
from tests.pki import Authority
from tests.waiting import run

PSK_256 = bytes.fromhex("5a17" * 16)
PSK_384 = bytes.fromhex("c3a9e1" * 16)


def psk_calls(path: str, a: socket.socket, b: socket.socket, identity: str,
              key: bytes = PSK_256, hash_name: str = "sha256",
              **kw: Any) -> tuple[Coroutine[Any, Any, Any], Coroutine[Any, Any, Any]]:
    psk = [(identity, key, hash_name)]
    return (submit(a, role="client", auth="psk", psk=psk, service_path=path, **kw),
            submit(b, role="server", auth="psk", psk=psk, service_path=path, **kw))


async def psk_pair(path: str, a: socket.socket, b: socket.socket, identity: str,
                   key: bytes = PSK_256, hash_name: str = "sha256", **kw: Any) -> tuple[Any, Any]:
    return await asyncio.gather(*psk_calls(path, a, b, identity, key, hash_name, **kw))


async def echo_both_ways(da: Any, a: socket.socket, db: Any, b: socket.socket,
                         payload: bytes) -> None:
    """Application data a->b and b->a through user-space record layers, byte-exact."""
    ca = connection_from_done(a, da, record_layer="user")
    cb = connection_from_done(b, db, record_layer="user")
    for sender, receiver, data in ((ca, cb, payload), (cb, ca, payload[::-1])):
        await sender.asend(data)
        received = b""
        while len(received) < len(data):
            chunk = await receiver.arecv()
            assert chunk, "unexpected end of stream"
            received += chunk
        assert received == data


# --- SIGTERM and SIGHUP -----------------------------------------------------------------------


def test_sigterm_finishes_requests_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    """20 connections (40 handshakes) are in flight behind a relay that holds every byte;
    SIGTERM arrives; new submits get ESRCH; the relay opens; all 40 complete byte-exact and
    the process exits 0 with its summary line."""
    ca = Authority.create(tmp_path / "pki")
    server_cert = ca.issue_server()
    pairs = 20

    def arguments(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        if i % 3 == 0:
            psk = [(f"drain-{i}", PSK_256, "sha256")]
            return {"auth": "psk", "psk": psk}, {"auth": "psk", "psk": psk}
        if i % 3 == 1:
            psk = [(f"drain-{i}", PSK_384, "sha384")]
            return {"auth": "psk", "psk": psk}, {"auth": "psk", "psk": psk}
        return ({"auth": "x509", "peername": "localhost", "truststore": ca.cert_path},
                {"auth": "x509", "certificate": server_cert.cert_path,
                 "private_key": server_cert.key_path})

    with AgentProcess(tmp_path, "[ktlsd]\nmax_concurrent = 64\n" + ONE_UID_FOR_ALL_CONFIG,
                      extra=["--debug"]) as agent:
        path = agent.socket_path

        async def main() -> None:
            relay = GatedRelay()
            try:
                ends = [await relay.connect() for _ in range(pairs)]
                answers = []
                for i, (a, b) in enumerate(ends):
                    client_args, server_args = arguments(i)
                    answers.append(asyncio.gather(
                        submit(a, role="client", service_path=path, timeout=30, **client_args),
                        submit(b, role="server", service_path=path, timeout=30, **server_args),
                    ))
                await agent.await_for(r"request taken", 2 * pairs)
                agent.signal(signal.SIGTERM)
                await agent.await_for(rf"SIGTERM: no new requests; finishing {2 * pairs} in flight")
                await agent.await_for(r"service: closed")
                late_a, late_b = tcp_pair()
                with late_a, late_b:
                    late = await submit(late_a, role="client", auth="psk",
                                        psk=[("late", PSK_256)], service_path=path)
                    assert late.status == errno.ESRCH, late.reason
                relay.open()
                dones = await asyncio.gather(*answers)
                for i, ((da, db), (a, b)) in enumerate(zip(dones, ends, strict=True)):
                    assert (da.status, da.reason, db.status, db.reason) == (0, "", 0, ""), i
                    await echo_both_ways(da, a, db, b, f"in flight {i} ".encode() * 300)
                for a, b in ends:
                    a.close()
                    b.close()
            finally:
                await relay.aclose()

        run(main())
        assert agent.wait_exit() == 0
        assert agent.matching(rf"stopped: {2 * pairs} handshakes completed, 0 failed")
        assert len(agent.matching(r"handshake source=service .* status=0 \(ok\)")) == 2 * pairs


@pytest.fixture
def shared_ring(ring: int) -> str:
    """A named keyring another process (the agent) may find, link and search, with one PSK."""
    keyring.set_perm(ring, 0x3F3F0000)  # possessor and owner: everything
    keyring.add_key("user", "hup-identity", PSK_256, ring)
    return keyring.describe_key(ring).description


async def lookup_pair(path: str) -> tuple[int, int]:
    """A server with no key of its own looks the client's identity up in its keyrings."""
    a, b = tcp_pair()
    with a, b:
        da, db = await asyncio.gather(
            submit(a, role="client", auth="psk", psk=[("hup-identity", PSK_256)],
                   service_path=path, timeout=5),
            submit(b, role="server", auth="psk", service_path=path, timeout=5),
        )
    return da.status, db.status


def test_sighup_reloads_the_configuration(tmp_path: Path, shared_ring: str) -> None:
    with AgentProcess(tmp_path, "[ktlsd]\nmax_concurrent = 8\n") as agent:
        assert agent.matching(r"max 8 handshakes at once")
        assert run(lookup_pair(agent.socket_path)) == (errno.EKEYREJECTED, errno.EKEYREJECTED)
        agent.config_path.write_text(f"[authenticate]\nkeyrings = {shared_ring}\n"
                                     "[ktlsd]\nmax_concurrent = 3\nsession_lifetime = 600\n")
        agent.signal(signal.SIGHUP)
        line = agent.wait_for(r"configuration reloaded")[0]
        assert "max_concurrent 8 -> 3" in line and "session_lifetime 86400 -> 600" in line
        assert agent.matching(rf"keyrings linked: {shared_ring}$")
        # The keyring named in the reloaded configuration is now searched.
        assert run(lookup_pair(agent.socket_path)) == (0, 0)
        # A broken file is refused with file:line and the agent keeps its settings.
        agent.config_path.write_text("[ktlsd]\nmax_concurrent = many\n")
        agent.signal(signal.SIGHUP)
        error = agent.wait_for(r"SIGHUP: configuration not reloaded")[0]
        assert f"{agent.config_path}:2" in error and "many" in error

        async def main() -> None:
            a, b = tcp_pair()
            with a, b:
                da, db = await psk_pair(agent.socket_path, a, b, "after-hup")
                assert (da.status, db.status) == (0, 0), (da.reason, db.reason)

        run(main())
    assert agent.wait_exit() == 0
    assert len(agent.matching(r"configuration reloaded")) == 1


# --- the service manager: readiness, reload, stop (sd_notify) ---------------------------------


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_is_sent_once_the_service_takes_requests(tmp_path: Path, abstract: bool) -> None:
    """READY=1 arrives on a real $NOTIFY_SOCKET (a path, or '@' for an abstract socket) and at
    that moment a request through the service is already served; STOPPING=1 on SIGTERM."""
    with NotifyListener(tmp_path, abstract=abstract) as manager:
        agent = AgentProcess(tmp_path, env={"NOTIFY_SOCKET": manager.address})
        try:
            ready = manager.receive()
            assert ready["READY"] == "1"
            assert ready["STATUS"] == f"serving service {agent.socket_path}"
            assert os.path.exists(agent.socket_path)

            async def main() -> None:
                a, b = tcp_pair()
                with a, b:
                    da, db = await psk_pair(agent.socket_path, a, b, "just-ready")
                assert (da.status, db.status) == (0, 0), (da.reason, db.reason)

            run(main())
            assert manager.pending() == []  # READY once, nothing else while serving
            agent.signal(signal.SIGTERM)
            stopping = manager.receive()
            assert stopping["STOPPING"] == "1" and stopping["STATUS"].startswith("draining")
            assert agent.wait_exit() == 0
        finally:
            agent.stop()
        assert manager.pending() == []
    assert agent.matching(r"ktlsd: NOTICE ktlsd \S+ starting \(configuration: ")


def test_no_notify_socket_no_notification_and_no_error(tmp_path: Path) -> None:
    with AgentProcess(tmp_path) as agent:
        assert agent.matching(r"ktlsd agent running")
    assert agent.wait_exit() == 0
    assert not agent.matching(r"ERROR|WARNING")


def test_sigusr1_reloads_without_dropping_a_request(tmp_path: Path) -> None:
    """tlshd 1.4 reloads on SIGUSR1 as on SIGHUP. A handshake in flight across the reload
    completes, a new one during the reload window is served, and the service manager sees
    RELOADING=1 (with MONOTONIC_USEC) then READY=1."""
    with NotifyListener(tmp_path) as manager:
        agent = AgentProcess(tmp_path, "[ktlsd]\nmax_concurrent = 8\n", extra=["--debug"],
                             env={"NOTIFY_SOCKET": manager.address})
        try:
            assert manager.receive()["READY"] == "1"

            async def main() -> None:
                relay = GatedRelay()
                try:
                    a, b = await relay.connect()
                    in_flight = asyncio.gather(
                        *psk_calls(agent.socket_path, a, b, "across-reload"))
                    await agent.await_for(r"request taken", 2)
                    agent.config_path.write_text("[ktlsd]\nmax_concurrent = 5\n")
                    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                    agent.signal(signal.SIGUSR1)
                    reloading = await asyncio.to_thread(manager.receive)
                    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
                    assert reloading["RELOADING"] == "1"
                    assert before <= int(reloading["MONOTONIC_USEC"]) <= after
                    assert (await asyncio.to_thread(manager.receive))["READY"] == "1"
                    line = (await agent.await_for(r"configuration reloaded"))[0]
                    assert "max_concurrent 8 -> 5" in line
                    c, d = tcp_pair()
                    with c, d:
                        dc, dd = await psk_pair(agent.socket_path, c, d, "after-reload")
                    assert (dc.status, dd.status) == (0, 0), (dc.reason, dd.reason)
                    relay.open()
                    da, db = await in_flight
                    assert (da.status, db.status) == (0, 0), (da.reason, db.reason)
                    await echo_both_ways(da, a, db, b, b"still keyed " * 100)
                    a.close()
                    b.close()
                finally:
                    await relay.aclose()

            run(main())
            assert agent.proc.poll() is None
        finally:
            assert agent.stop() == 0
    statuses = [parse_handshake_line(line)["status"] for line in agent.matching(r"handshake ")
                if "request taken" not in line]
    assert statuses == ["0", "0", "0", "0"]
    assert not agent.matching(r"configuration not reloaded")


# --- logging for the journal --------------------------------------------------------------------


def test_journal_lines_carry_their_priority_and_warnings_are_the_failed_handshakes(
    tmp_path: Path,
) -> None:
    """stderr is the journal when $JOURNAL_STREAM names it: every line starts with <N> and no
    prefix of ours; `journalctl -p warning` (priority <= 4) would list the failed handshakes
    and nothing else."""
    conf = tmp_path / "ktlsd.conf"
    conf.write_text("")
    socket_path = str(tmp_path / "handshake.sock")
    journal = tmp_path / "journal"
    with NotifyListener(tmp_path) as manager, open(journal, "wb") as stream:
        st = os.fstat(stream.fileno())
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
        env.update(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}", NOTIFY_SOCKET=manager.address,
                   PYTHONPATH=str(REPO))
        proc = subprocess.Popen(
            [sys.executable, "-m", "ktlsd", "run", "--socket", socket_path, "-c", str(conf),
             "--kernel", "no"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stream, env=env,
        )
        try:
            assert manager.receive()["READY"] == "1"

            async def main() -> None:
                a, b = tcp_pair()
                with a, b:
                    da, db = await psk_pair(socket_path, a, b, "journal-ok")
                assert (da.status, db.status) == (0, 0)
                c, d = tcp_pair()
                with c, d:
                    dc, dd = await asyncio.gather(
                        submit(c, role="client", auth="psk", psk=[("journal-bad", PSK_256)],
                               service_path=socket_path, timeout=10),
                        submit(d, role="server", auth="psk",
                               psk=[("journal-bad", bytes(32))], service_path=socket_path,
                               timeout=10),
                    )
                assert dc.status != 0 and dd.status != 0

            run(main())
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
    lines = journal.read_text().splitlines()
    assert lines and all(re.match(r"<[0-7]>\S", line) for line in lines), lines
    assert lines[0] == f"<5>ktlsd {__version__} starting (configuration: {conf})"
    assert any(line.startswith(f"<6>service: listening on {socket_path} (") for line in lines)
    assert not [line for line in lines if "ktlsd: " in line or line.startswith("<6>INFO")]
    handshakes = [line for line in lines if line[3:].startswith("handshake ")]
    assert len(handshakes) == 4
    ok = [line for line in handshakes if parse_handshake_line("ktlsd: I " + line[3:])["status"]
          == "0"]
    assert len(ok) == 2 and all(line.startswith("<6>") for line in ok)
    warnings = [line for line in lines if int(line[1]) <= 4]
    assert sorted(warnings) == sorted(set(handshakes) - set(ok))
    assert lines[-1] == "<5>stopped: 2 handshakes completed, 2 failed"


# --- the per-handshake log line -----------------------------------------------------------


def test_one_log_line_per_handshake_with_every_field(tmp_path: Path) -> None:
    ca = Authority.create(tmp_path / "pki")
    server_cert = ca.issue_server()
    client_cert = ca.issue_client("host1")
    with AgentProcess(tmp_path) as agent:
        path = agent.socket_path

        async def main() -> dict[str, Any]:
            seen: dict[str, Any] = {}
            a, b = tcp_pair()
            with a, b:
                seen["x509"] = (a.getsockname(), b.getsockname())
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="x509", peername="localhost",
                           truststore=ca.cert_path, certificate=client_cert.cert_path,
                           private_key=client_cert.key_path, service_path=path),
                    submit(b, role="server", auth="x509", truststore=ca.cert_path,
                           certificate=server_cert.cert_path, private_key=server_cert.key_path,
                           require_client_cert=True, service_path=path),
                )
                assert (da.status, db.status) == (0, 0), (da.reason, db.reason)
            a, b = tcp_pair()
            with a, b:
                seen["psk"] = (a.getsockname(), b.getsockname())
                da, db = await psk_pair(path, a, b, "NVMe0R02 hostnqn subnqn", PSK_384,
                                        "sha384", peername="subsys.example")
                assert (da.status, db.status) == (0, 0), (da.reason, db.reason)
            a, b = tcp_pair()
            with a, b:
                seen["fail"] = (a.getsockname(), b.getsockname())
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=[("alice", PSK_256)],
                           service_path=path, timeout=5),
                    submit(b, role="server", auth="psk", psk=[("bob", PSK_256)],
                           service_path=path, timeout=5),
                )
                seen["fail_status"] = (da.status, db.status)
            return seen

        seen = run(main())
        lines = agent.wait_for(r"handshake source=", 6)
    assert len(lines) == 6
    fields = [parse_handshake_line(line) for line in lines]

    def line_for(peer_of: tuple[str, int]) -> dict[str, str]:
        # The agent logs the *peer* address of the consumer's socket: the other end.
        wanted = f"{peer_of[0]}:{peer_of[1]}"
        matches = [f for f in fields if f["peer"] == wanted]
        assert len(matches) == 1, (wanted, lines)
        return matches[0]

    a_addr, b_addr = seen["x509"]
    client, server = line_for(b_addr), line_for(a_addr)
    assert (client["role"], client["auth"], client["peername"]) == ("client", "x509", "localhost")
    assert (server["role"], server["auth"], server["peername"]) == ("server", "x509", "-")
    assert client["identity"] == "x509:CN=server,O=ktlsd tests"
    assert server["identity"] == "x509:CN=host1,O=ktlsd tests"
    for f in (client, server):
        assert f["suite"].startswith("TLS_") and f["status"] == "0"
        assert f["duration"].endswith("ms") and float(f["duration"][:-2]) >= 0
        assert f["source"] == "service"

    a_addr, b_addr = seen["psk"]
    client, server = line_for(b_addr), line_for(a_addr)
    assert (client["role"], client["auth"], client["peername"]) == (
        "client", "psk", "subsys.example")
    assert server["role"] == "server" and server["auth"] == "psk"
    for f in (client, server):
        assert f["suite"] == "TLS_AES_256_GCM_SHA384" and f["status"] == "0"
        assert "NVMe0R02" in f["identity"]

    a_addr, b_addr = seen["fail"]
    client, server = line_for(b_addr), line_for(a_addr)
    assert (int(client["status"]), int(server["status"])) == seen["fail_status"]
    assert client["suite"] == "-" and int(client["status"]) == errno.EKEYREJECTED
    failed = next(line for line in lines if f"peer={b_addr[0]}:{b_addr[1]}" in line)
    assert "(EKEYREJECTED) reason=" in failed and "WARNING" in failed


# --- bad service messages through the real process ----------------------------------------


def _frame(attrs: bytes) -> bytes:
    return encode_genl(0x4B54, 2, attrs, seq=7, version=1)


async def raw_submit(path: str, data: bytes, fds: list[int]) -> Any:
    conn = await connect_service(path)
    try:
        await send_message(conn, data, fds)
        reply, extra, _ = await asyncio.wait_for(recv_message(conn), 10)
        for fd in extra:
            os.close(fd)
        return decode_done_message(reply)[1]
    finally:
        conn.close()


def test_bad_service_messages_get_a_status_and_a_log_line_and_the_agent_keeps_serving(
    tmp_path: Path,
) -> None:
    hello_psk = encode_attr(AcceptAttr.MESSAGE_TYPE, u32(1)) + encode_attr(
        AcceptAttr.AUTH_MODE, u32(2))
    good = _frame(hello_psk)
    cases = [
        ("truncated", good[:-3], errno.EINVAL, "bad nlmsg_len"),
        ("truncated header", good[:10], errno.EINVAL, "bad message header"),
        ("oversized", good + b"\0" * (MAX_MESSAGE_SIZE + 10), errno.EINVAL, "too large"),
        ("unknown auth mode", _frame(encode_attr(AcceptAttr.MESSAGE_TYPE, u32(1))
                                     + encode_attr(AcceptAttr.AUTH_MODE, u32(9))),
         errno.EINVAL, "auth-mode"),
        ("unknown message type", _frame(encode_attr(AcceptAttr.MESSAGE_TYPE, u32(7))
                                        + encode_attr(AcceptAttr.AUTH_MODE, u32(2))),
         errno.EINVAL, "message-type"),
    ]
    with AgentProcess(tmp_path) as agent:
        path = agent.socket_path

        async def main() -> None:
            for number, (name, data, status, words) in enumerate(cases, start=1):
                a, b = tcp_pair()
                with a, b:
                    done = await raw_submit(path, data, [a.fileno()])
                    assert done.status == status, (name, done.reason)
                    assert words in done.reason, (name, done.reason)
                    rejected = await agent.await_for(r"rejected request", number)
                    assert words in rejected[-1], (name, rejected[-1])
                a, b = tcp_pair()
                with a, b:
                    da, db = await psk_pair(path, a, b, f"after-{number}")
                    assert (da.status, db.status) == (0, 0), (name, da.reason, db.reason)

        run(main())
    assert len(agent.matching(r"rejected request")) == len(cases)
    assert len(agent.matching(r"handshake source=service .*status=0 \(ok\)")) == 2 * len(cases)


# --- secrets never reach the logs ------------------------------------------------------------


def test_no_secret_reaches_the_debug_log_of_a_full_run(tmp_path: Path) -> None:
    """x509 (keys passed as files and as DER), PSK SHA-256 and SHA-384, KeyUpdates through the
    service of every type: every secret the test knows is absent from the agent's output."""
    ca = Authority.create(tmp_path / "pki")
    server_cert = ca.issue_server()
    client_cert = ca.issue_client("host1")
    known: dict[str, bytes] = {
        "psk256": PSK_256, "psk384": PSK_384,
        "server key": server_cert.key_der, "client key": client_cert.key_der,
    }
    for name, issued in (("server", server_cert), ("client", client_cert)):
        numbers = issued.key.private_numbers()  # type: ignore[union-attr]
        scalar = getattr(numbers, "private_value", None) or getattr(numbers, "d", 0)
        known[f"{name} private scalar"] = scalar.to_bytes((scalar.bit_length() + 7) // 8, "big")

    def remember(label: str, session: Session | None) -> None:
        assert session is not None
        gen = (session.client_generation, session.server_generation)
        known[f"{label} client secret {gen}"] = session.client_secret
        known[f"{label} server secret {gen}"] = session.server_secret

    with AgentProcess(tmp_path, "[debug]\nloglevel = 1\ntls = 1\n", extra=["--debug"]) as agent:
        path = agent.socket_path

        async def key_updates(label: str, a: socket.socket, da: Any, b: socket.socket,
                              db: Any) -> None:
            """The client asks the agent for SEND, RECEIVED and RECEIVED_REQUEST_UPDATE
            updates (kernel-style); the server end is a plain connection."""
            from ktlsd.tls.record import UserRecordLayer

            a.setblocking(False)
            layer = UserRecordLayer(a, da.session)
            peer = connection_from_done(b, db, record_layer="user")
            state = da.session
            done = await key_update(a, role="client", session_id=da.session_id,
                                    record_seqs=layer.sequence_numbers(), service_path=path)
            assert done.status == 0, done.reason
            remember(label, done.session)
            layer.install_tx_key(done.session.client_secret)
            await layer.asend(b"after send")
            assert await peer.arecv() == b"after send"
            for kind, request_peer in ((KeyUpdateType.RECEIVED, False),
                                       (KeyUpdateType.RECEIVED_REQUEST_UPDATE, True)):
                await peer.akey_update(request_peer=request_peer)
                await peer.asend(b"x")
                record = await layer.arecv()
                assert record.content_type == 22
                with pytest.raises(OSError) as info:
                    await layer.arecv()
                assert info.value.errno == errno.EKEYEXPIRED
                done = await key_update(a, role="client", session_id=da.session_id,
                                        key_update_type=kind,
                                        record_seqs=layer.sequence_numbers(), service_path=path)
                assert done.status == 0, done.reason
                remember(label, done.session)
                state = done.session
                layer.install_rx_key(state.server_secret)
                if kind is KeyUpdateType.RECEIVED_REQUEST_UPDATE:
                    layer.install_tx_key(state.client_secret)
                assert (await layer.arecv()).data == b"x"
            await layer.asend(b"final")
            assert await peer.arecv() == b"final"
            assert (state.client_generation, state.server_generation) == (2, 2)

        async def main() -> None:
            a, b = tcp_pair()
            with a, b:
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="x509", peername="localhost",
                           truststore=ca.cert_path, certificate_chain=client_cert.chain_der,
                           private_key_der=client_cert.key_der, service_path=path,
                           keep_session=True),
                    submit(b, role="server", auth="x509", truststore=ca.cert_path,
                           certificate=server_cert.cert_path, private_key=server_cert.key_path,
                           require_client_cert=True, service_path=path),
                )
                assert (da.status, db.status) == (0, 0), (da.reason, db.reason)
                remember("x509", da.session)
                await key_updates("x509", a, da, b, db)
            for label, key, hash_name in (("psk256", PSK_256, "sha256"),
                                          ("psk384", PSK_384, "sha384")):
                a, b = tcp_pair()
                with a, b:
                    da, db = await psk_pair(path, a, b, f"scan-{label}", key, hash_name,
                                            keep_session=True)
                    assert (da.status, db.status) == (0, 0), (da.reason, db.reason)
                    remember(label, da.session)
                    await key_updates(label, a, da, b, db)
            a, b = tcp_pair()  # and one failure: a wrong key
            with a, b:
                wrong = bytes(reversed(PSK_256))
                known["wrong psk"] = wrong
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=[("w", PSK_256)],
                           service_path=path, timeout=5),
                    submit(b, role="server", auth="psk", psk=[("w", wrong)],
                           service_path=path, timeout=5),
                )
                assert da.status != 0 and db.status != 0

        run(main())
    assert agent.wait_exit() == 0
    output = agent.text + agent.stdout.decode("utf-8", "replace")
    assert "DEBUG" in output and len(agent.matching(r"handshake source=")) == 8 + 9
    # 3 sessions x generations 0..2 of both directions, 3 PSKs, 2 private keys (DER + scalar).
    assert len(set(known.values())) == 3 * 6 + 3 + 4
    assert find_secrets(output, known) == []
    # The scanner itself works: it finds a secret planted in every spelling it checks.
    planted = known["psk384"]
    for form in (planted.hex(), planted.hex().upper(),
                 __import__("base64").b64encode(b"\x01" + planted).decode()):
        assert find_secrets(f"noise {form} noise", {"p": planted}) == ["p"]


def test_encode_genl_frame_is_what_the_service_expects() -> None:
    """The raw frames above are built right: a well-formed SUBMIT parses (guards the
    bad-message test against passing for the wrong reason)."""
    from ktlsd.upcall.wire import decode_submit

    attrs = encode_attr(AcceptAttr.MESSAGE_TYPE, u32(1)) + encode_attr(AcceptAttr.AUTH_MODE,
                                                                       u32(2))
    _, request = decode_submit(_frame(attrs), sockfd=3)
    assert request.sockfd == 3
    assert struct.unpack_from("=I", _frame(attrs))[0] == len(_frame(attrs))


def test_a_key_update_whose_peer_stopped_reading_times_out_without_stalling_others(
    tmp_path: Path,
) -> None:
    """The consumer's socket is in blocking mode and its send buffer is full (the peer stopped
    reading). SEND must not block the agent: other handshakes complete meanwhile, and the
    update ends with ETIMEDOUT within its own timeout."""
    with AgentProcess(tmp_path) as agent:
        path = agent.socket_path

        async def main() -> None:
            a, b = tcp_pair()
            with a, b:
                da, db = await psk_pair(path, a, b, "stalled", keep_session=True)
                assert (da.status, db.status) == (0, 0)
                # Fixed small buffers (no autotuning), then fill them to the last byte.
                b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                a.setblocking(False)
                filled = quiet = 0
                while quiet < 10:  # until the zero window holds: nothing fits any more
                    try:
                        filled += a.send(b"\0" * 4096)
                        quiet = 0
                    except BlockingIOError:
                        quiet += 1
                        select.select([], [], [], 0.02)
                a.setblocking(True)  # O_NONBLOCK off, shared with the agent's descriptor
                assert filled > 0
                update = asyncio.create_task(key_update(
                    a, role="client", session_id=da.session_id, record_seqs=(0, 0),
                    timeout=2, service_path=path))
                for i in range(3):  # served while the update waits
                    c, d = tcp_pair()
                    with c, d:
                        dc, dd = await asyncio.wait_for(psk_pair(path, c, d, f"other-{i}"), 10)
                        assert (dc.status, dd.status) == (0, 0)
                done = await asyncio.wait_for(update, 10)
                assert done.status == errno.ETIMEDOUT, done.reason
                assert "not reading" in done.reason

        run(main())
        line = agent.wait_for(r"handshake source=service .*\(ETIMEDOUT\)")[0]
        assert "role=client" in line and "not reading" in line
