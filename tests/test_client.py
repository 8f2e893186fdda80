"""The consumer API (ktlsd.client) against a real handshake service and the real agent.

Handshakes here run for real: two consumers on loopback lend their TCP sockets to one
ktlsd agent (ktlsd.agent.Agent over the service), which runs both ends with the system
OpenSSL; the consumers then exchange application data with the record layer built from the
sessions they got back, byte for byte. Peers outside ktlsd (openssl s_server) prove the
secrets interoperate.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from ktlsd.agent import Agent
from ktlsd.client import (
    HandshakeFailed,
    HandshakeOptions,
    build_request,
    connection_from_done,
    handshake,
    key_update,
    submit,
    submit_request,
)
from ktlsd.request import AuthMode, HandshakeDone, MessageType
from ktlsd.settings import AgentSettings, ServiceLimits
from ktlsd.tls.connection import TlsConnection
from ktlsd.tls.record import open_record_layer
from ktlsd.tls.session import CipherSuite, Role
from ktlsd.upcall.service import HandshakeService
from tests.agent_helpers import tcp_pair
from tests.peers import openssl_server
from tests.pki import Authority
from tests.waiting import run

ONE_UID_FOR_ALL = ServiceLimits(uid_max_connections=10_000, uid_max_pending=10_000,
                                uid_max_in_flight=10_000)
PSK_256 = bytes.fromhex("0b" * 32)
PSK_384 = bytes.fromhex("3c" * 48)


@contextlib.asynccontextmanager
async def running_agent(path: str, *, concurrency: int = 0, **service_args: Any) -> Any:
    """The real agent serving the real service at ``path``. Every consumer here runs as this
    test's uid, standing for many local programs: no per-uid share applies."""
    service = HandshakeService(path, limits=ONE_UID_FOR_ALL, **service_args)
    await service.start()
    agent = Agent(AgentSettings(keep_sessions=False, max_concurrent=concurrency), [service])
    task = asyncio.create_task(agent.run())
    try:
        yield service
    finally:
        await agent.stop()
        await asyncio.wait_for(task, 30)


def exchange(a: socket.socket, da: HandshakeDone, b: socket.socket, db: HandshakeDone,
             payload: bytes) -> None:
    """Send ``payload`` a→b and its reverse b→a through user-space record layers."""
    assert da.session is not None and db.session is not None
    for sock in (a, b):
        sock.setblocking(True)
        sock.settimeout(10)
    layer_a = open_record_layer(a, da.session, "user")
    layer_b = open_record_layer(b, db.session, "user")
    for sender, receiver, data in ((layer_a, layer_b, payload), (layer_b, layer_a, payload[::-1])):
        for start in range(0, len(data), 16384):  # one record carries at most 2^14 bytes
            sender.send(data[start : start + 16384])
        received = b""
        while len(received) < len(data):
            received += receiver.recv().data
        assert received == data


# --- arguments ----------------------------------------------------------------------------


def test_build_request_maps_arguments_to_the_kernel_parameters(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    request = build_request(
        role="server", auth="x509", certificate="cert.pem", private_key="key.pem",
        truststore=tmp_path / "ca.pem", peername="host1", timeout=2.5, psk_serials=(7,),
        psk=[("id", PSK_384, "sha384"), (b"id2", PSK_256)], ciphersuites=["TLS_AES_128_GCM_SHA256"],
        certificate_serial=11, private_key_serial=12, keyring=13,
    )
    assert request.message_type is MessageType.SERVERHELLO
    assert request.auth_mode is AuthMode.X509
    assert request.timeout_ms == 2500
    assert (request.peer_identities, request.certificate, request.private_key,
            request.keyring) == ((7,), 11, 12, 13)
    inline = request.inline
    assert inline is not None
    assert inline.certificate_file == str(tmp_path / "cert.pem")  # absolute for the agent
    assert inline.private_key_file == str(tmp_path / "key.pem")
    assert [(p.identity, p.hash_name) for p in inline.psk_keys] == [(b"id", "sha384"),
                                                                    (b"id2", "sha256")]
    assert build_request(role="client", auth="unauth").inline is None


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"role": "both", "auth": "psk"}, "role must be"),
        ({"role": "client", "auth": "kerberos"}, "auth must be"),
        ({"role": "client", "auth": "psk", "psk": [("id", PSK_256, "md5")]}, "sha256 or sha384"),
        ({"role": "client", "auth": "psk", "psk": [("", PSK_256)]}, "non-empty"),
        ({"role": "client", "auth": "psk", "timeout": 0}, "timeout"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, Any], words: str) -> None:
    with pytest.raises(ValueError, match=words) as info:
        build_request(**kwargs)
    assert PSK_256.hex() not in str(info.value)


def test_options_value_and_keywords_build_the_same_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    fields: dict[str, Any] = {
        "role": "server", "auth": "psk", "psk": [("id", PSK_384, "sha384")],
        "private_key_der": b"0\x82-secret-der", "peername": "host1", "timeout": 2.5,
        "certificate": "cert.pem",
    }
    base = HandshakeOptions(**fields)
    assert build_request(base) == build_request(**fields)
    assert build_request(options=base) == build_request(**fields)
    text = repr(base)
    assert "peername='host1'" in text
    assert repr(PSK_384)[2:-1] not in text and "secret-der" not in text  # secrets stay out
    changed = build_request(base, role="client", peername="host2")
    assert changed.message_type is MessageType.CLIENTHELLO and changed.peername == "host2"
    assert changed.inline is not None and changed.inline.certificate_file == str(
        tmp_path / "cert.pem")
    assert base.peername == "host1" and base.role == "server"  # the value itself is frozen
    with pytest.raises(TypeError, match="need auth"):
        build_request(role="client")
    with pytest.raises(TypeError, match="need role and auth"):
        build_request()


def test_the_consumer_library_does_not_load_the_server() -> None:
    """ktlsd.client speaks the protocol (ktlsd.upcall.wire) without importing the server."""
    import subprocess
    import sys

    code = ("import sys, ktlsd.client\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('ktlsd.upcall'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True).stdout.split()
    assert "ktlsd.upcall.wire" in loaded
    assert "ktlsd.upcall.service" not in loaded


def test_handshake_failed_is_an_oserror_with_the_errno_name() -> None:
    failure = HandshakeFailed(errno.EKEYREJECTED, "peer does not know\nthe identity")
    assert isinstance(failure, OSError)
    assert failure.errno == failure.status == errno.EKEYREJECTED
    assert failure.errno_name == "EKEYREJECTED"
    assert str(failure) == "handshake failed: EKEYREJECTED: peer does not know the identity"
    with pytest.raises(HandshakeFailed, match="ESRCH"), socket.socket() as unused:
        connection_from_done(unused, HandshakeDone(errno.ESRCH, -1, reason="x"))


# --- refusals -------------------------------------------------------------------------------


def test_no_service_is_esrch(sock_path: str) -> None:
    async def main() -> None:
        a, b = tcp_pair()
        with a, b:
            done = await submit(a, role="client", auth="unauth", service_path=sock_path)
            assert done.status == errno.ESRCH and sock_path in done.reason
            stale = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            stale.bind(sock_path)  # a socket file nobody listens on
            done = await submit(a, role="client", auth="unauth", service_path=sock_path)
            stale.close()
            assert done.status == errno.ESRCH

    run(main())


def test_consumer_gives_up_with_etimedout_and_the_agent_learns_it(sock_path: str) -> None:
    async def main() -> None:
        async with HandshakeService(sock_path) as service:
            stream = service.requests()
            a, b = tcp_pair()
            with a, b:
                request = build_request(role="client", auth="unauth")
                waiting = asyncio.create_task(
                    submit_request(a, request, service_path=sock_path, answer_timeout=0.3))
                pending = await anext(stream)  # type: ignore[arg-type]
                done = await waiting
                assert done.status == errno.ETIMEDOUT
                await asyncio.wait_for(pending.cancelled.wait(), 10)
                await pending.done(HandshakeDone(0, pending.request.sockfd))  # a no-op now
                assert service.in_flight == 0
            await stream.aclose()  # type: ignore[attr-defined]

    run(main())


# --- real handshakes through the real agent -----------------------------------------------


@pytest.mark.parametrize(
    ("key", "hash_name", "suite"),
    [(PSK_256, "sha256", CipherSuite.TLS_AES_128_GCM_SHA256),
     (PSK_384, "sha384", CipherSuite.TLS_AES_256_GCM_SHA384)],
    ids=["sha256", "sha384"],
)
def test_psk_handshake_between_two_consumers(
    sock_path: str, key: bytes, hash_name: str, suite: CipherSuite
) -> None:
    async def main() -> None:
        async with running_agent(sock_path):
            a, b = tcp_pair()
            with a, b:
                psk = [(b"NVMe0R01 host subsys", key, hash_name)]
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=psk, service_path=sock_path,
                           timeout=10),
                    submit(b, role="server", auth="psk", psk=psk, service_path=sock_path,
                           timeout=10),
                )
                assert (da.status, da.reason, db.status, db.reason) == (0, "", 0, "")
                assert da.session is not None and db.session is not None
                assert da.session.role is Role.CLIENT and db.session.role is Role.SERVER
                assert da.session.suite is db.session.suite is suite
                assert da.session.client_secret == db.session.client_secret
                assert db.session.peer.psk_identity == b"NVMe0R01 host subsys"
                exchange(a, da, b, db, os.urandom(20_000))

    run(main())


def test_x509_mutual_handshake_between_two_consumers(sock_path: str, tmp_path: Path) -> None:
    ca = Authority.create(tmp_path / "pki")
    server = ca.issue_server()
    client = ca.issue_client("host1")

    async def main() -> None:
        async with running_agent(sock_path):
            a, b = tcp_pair()
            with a, b:
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="x509", peername="localhost",
                           truststore=ca.cert_path, certificate=client.cert_path,
                           private_key=client.key_path, service_path=sock_path),
                    submit(b, role="server", auth="x509", truststore=ca.cert_path,
                           certificate_chain=server.chain_der, private_key_der=server.key_der,
                           require_client_cert=True, service_path=sock_path),
                )
                assert (da.status, da.reason, db.status, db.reason) == (0, "", 0, "")
                assert da.session is not None and db.session is not None
                assert da.session.peer.certificate_chain[0] == server.cert_der
                assert db.session.peer.certificate_chain[0] == client.cert_der
                exchange(a, da, b, db, b"x509 " * 1000)

    run(main())


def test_handshake_failures_come_back_as_status_and_reason(sock_path: str) -> None:
    async def main() -> None:
        async with running_agent(sock_path):
            a, b = tcp_pair()
            with a, b:
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=[("alice", PSK_256)],
                           service_path=sock_path, timeout=5),
                    submit(b, role="server", auth="psk", psk=[("bob", PSK_256)],
                           service_path=sock_path, timeout=5),
                )
            assert da.status != 0 and db.status != 0
            assert da.session is None and db.session is None
            assert da.reason and db.reason
            # The agent keeps serving: a following good pair succeeds.
            a, b = tcp_pair()
            with a, b:
                psk = [("alice", PSK_256)]
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=psk, service_path=sock_path),
                    submit(b, role="server", auth="psk", psk=psk, service_path=sock_path),
                )
                assert (da.status, db.status) == (0, 0)

    run(main())


def test_psk_client_against_openssl_s_server(sock_path: str) -> None:
    """The secrets the agent hands over work against a peer outside ktlsd."""
    with openssl_server("-psk", PSK_256.hex(), "-psk_identity", "ossl-id", "-nocert",
                        "-ciphersuites", "TLS_AES_128_GCM_SHA256", "-num_tickets", "0") as peer:

        async def main() -> None:
            async with running_agent(sock_path):
                sock = socket.create_connection(("127.0.0.1", peer.port))
                with sock:
                    done = await submit(sock, role="client", auth="psk",
                                        psk=[("ossl-id", PSK_256)], service_path=sock_path)
                    assert done.status == 0, done.reason
                    assert done.session is not None
                    sock.setblocking(True)
                    sock.settimeout(10)
                    layer = open_record_layer(sock, done.session, "user")
                    layer.send(b"hello from a ktlsd consumer\n")
                    peer.wait_for("hello from a ktlsd consumer")
                    peer.send(b"hello back\n")
                    record = layer.recv()
                    while record.content_type != 23:  # skip any post-handshake messages
                        record = layer.recv()
                    assert record.data == b"hello back\n"

        run(main())


def test_handshake_returns_connections_ready_for_data_and_key_update(sock_path: str) -> None:
    async def main() -> None:
        async with running_agent(sock_path):
            a, b = tcp_pair()
            with a, b:
                psk = [("demo", PSK_384, "sha384")]
                client, server = await asyncio.gather(
                    handshake(a, role="client", auth="psk", psk=psk, service_path=sock_path,
                              record_layer="user"),
                    handshake(b, role="server", auth="psk", psk=psk, service_path=sock_path,
                              record_layer="user"),
                )
                assert isinstance(client, TlsConnection) and isinstance(server, TlsConnection)
                payload = os.urandom(50_000)
                await client.asend(payload)
                received = b""
                while len(received) < len(payload):
                    received += await server.arecv()
                assert received == payload
                await client.akey_update(request_peer=True)
                await client.asend(b"after the update")
                assert await server.arecv() == b"after the update"
                await server.asend(b"answered")  # carries the peer's own KeyUpdate first
                assert await client.arecv() == b"answered"
                assert client.session.client_generation == 1
                assert server.session.server_generation == 1

    run(main())


def test_submit_and_handshake_take_one_options_value(sock_path: str) -> None:
    async def main() -> None:
        async with running_agent(sock_path):
            a, b = tcp_pair()
            with a, b:
                server = HandshakeOptions(role="server", auth="psk",
                                          psk=[(b"options", PSK_256)], timeout=10)
                client_conn, server_done = await asyncio.gather(
                    handshake(a, server, role="client", service_path=sock_path,
                              record_layer="user"),
                    submit(b, server, service_path=sock_path),
                )
                assert server_done.status == 0 and server_done.session is not None
                assert client_conn.session.role is Role.CLIENT
                assert server_done.session.peer.psk_identity == b"options"
                assert client_conn.session.client_secret == server_done.session.client_secret

    run(main())


def test_handshake_raises_handshake_failed_with_the_status(sock_path: str) -> None:
    async def main() -> None:
        a, b = tcp_pair()
        with a, b:
            with pytest.raises(HandshakeFailed) as info:
                await handshake(a, role="client", auth="unauth", service_path=sock_path)
            assert info.value.errno == errno.ESRCH and info.value.errno_name == "ESRCH"

    run(main())


async def _submit_retrying(sock: socket.socket, counts: dict[str, int], **kwargs: Any,
                           ) -> HandshakeDone:
    """What a well-behaved consumer does with EAGAIN: try again a little later."""
    while True:
        done = await submit(sock, **kwargs)
        if done.status != errno.EAGAIN:
            return done
        counts["EAGAIN"] += 1
        await asyncio.sleep(0.01)


def test_200_concurrent_mixed_requests_with_a_small_pending_limit(
    tmp_path: Path
) -> None:
    """100 connections = 200 requests, PSK SHA-256 / SHA-384 and mutual x509, all submitted
    at once. The ends of each connection go to two agents: a "limited" one (pending limit 5,
    16 handshakes at a time) serving both roles, and a roomy one for the other ends, so that
    no connection can starve waiting for its own other end. Rejected requests see EAGAIN,
    every request gets exactly one answer, and every connection carries data byte-exact."""
    ca = Authority.create(tmp_path / "pki")
    server_cert = ca.issue_server()
    client_cert = ca.issue_client("host")
    counts = {"EAGAIN": 0}
    limited_path = str(tmp_path / "limited.sock")
    roomy_path = str(tmp_path / "roomy.sock")

    def arguments(i: int) -> tuple[dict[str, Any], dict[str, Any]]:
        client_path, server_path = (limited_path, roomy_path) if i % 2 else (roomy_path,
                                                                            limited_path)
        client = {"service_path": client_path, "timeout": 20, "role": "client"}
        server = {"service_path": server_path, "timeout": 20, "role": "server"}
        if i % 3 == 0:
            psk = [(f"id-{i}", PSK_256, "sha256")]
            return ({**client, "auth": "psk", "psk": psk}, {**server, "auth": "psk", "psk": psk})
        if i % 3 == 1:
            psk = [(f"id-{i}", PSK_384, "sha384")]
            return ({**client, "auth": "psk", "psk": psk}, {**server, "auth": "psk", "psk": psk})
        return (
            {**client, "auth": "x509", "peername": "localhost", "truststore": ca.cert_path,
             "certificate": client_cert.cert_path, "private_key": client_cert.key_path},
            {**server, "auth": "x509", "truststore": ca.cert_path,
             "certificate": server_cert.cert_path, "private_key": server_cert.key_path,
             "require_client_cert": True},
        )

    async def one(i: int) -> None:
        a, b = tcp_pair()
        with a, b:
            client_args, server_args = arguments(i)
            da, db = await asyncio.gather(_submit_retrying(a, counts, **client_args),
                                          _submit_retrying(b, counts, **server_args))
            assert (da.status, da.reason, db.status, db.reason) == (0, "", 0, ""), i
            payload = f"connection {i} ".encode() * 50
            await asyncio.to_thread(exchange, a, da, b, db, payload)

    async def main() -> None:
        async with (
            running_agent(limited_path, pending_limit=5, concurrency=16) as limited,
            running_agent(roomy_path, pending_limit=50, concurrency=256) as roomy,
        ):
            await asyncio.gather(*(one(i) for i in range(100)))
            for service in (limited, roomy):
                assert service.pending == service.in_flight == 0
                assert service.counters["answered"] == 100
            assert limited.counters["EAGAIN"] > 0
            assert limited.counters["EAGAIN"] + roomy.counters["EAGAIN"] == counts["EAGAIN"]

    run(main(), limit=120)


def test_key_update_through_the_service_for_a_user_space_record_layer(sock_path: str) -> None:
    """The consumer asks the agent to send its KeyUpdate (as the proposed kernel upcall does),
    installs the new TX secret from DONE, and the peer follows."""

    async def main() -> None:
        service = HandshakeService(sock_path)
        await service.start()
        agent = Agent(AgentSettings(keep_sessions=True), [service])
        task = asyncio.create_task(agent.run())
        try:
            a, b = tcp_pair()
            with a, b:
                psk = [("ku", PSK_256)]
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=psk, service_path=sock_path,
                           keep_session=True),
                    submit(b, role="server", auth="psk", psk=psk, service_path=sock_path),
                )
                assert (da.status, db.status) == (0, 0), (da.reason, db.reason)
                assert da.session is not None and da.session_id > 0
                a.setblocking(True)
                layer_a = open_record_layer(a, da.session, "user")
                server = connection_from_done(b, db, record_layer="user")
                await asyncio.to_thread(layer_a.send, b"before")
                assert await server.arecv() == b"before"
                done = await key_update(a, role="client", session_id=da.session_id,
                                        record_seqs=layer_a.sequence_numbers(),
                                        service_path=sock_path)
                assert done.status == 0, done.reason
                assert done.session is not None
                assert done.session.client_generation == 1
                assert done.session.client_secret != da.session.client_secret
                layer_a.install_tx_key(done.session.client_secret, 0)
                await asyncio.to_thread(layer_a.send, b"after")
                assert await server.arecv() == b"after"
                assert server.session.client_generation == 1
        finally:
            await agent.stop()
            await asyncio.wait_for(task, 30)

    run(main())
