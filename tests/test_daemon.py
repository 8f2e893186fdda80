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
import select
import signal
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from ktlsd import keyring
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
    AgentProcess,
    GatedRelay,
    find_secrets,
    parse_handshake_line,
    tcp_pair,
)
from tests.pki import Authority
from tests.waiting import run

PSK_256 = bytes.fromhex("5a17" * 16)
PSK_384 = bytes.fromhex("c3a9e1" * 16)


async def psk_pair(path: str, a: socket.socket, b: socket.socket, identity: str,
                   key: bytes = PSK_256, hash_name: str = "sha256", **kw: Any) -> tuple[Any, Any]:
    psk = [(identity, key, hash_name)]
    return await asyncio.gather(
        submit(a, role="client", auth="psk", psk=psk, service_path=path, **kw),
        submit(b, role="server", auth="psk", psk=psk, service_path=path, **kw),
    )


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
                      extra=["-v"]) as agent:
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

    with AgentProcess(tmp_path, "[debug]\nloglevel = 1\ntls = 1\n", extra=["-v"]) as agent:
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
