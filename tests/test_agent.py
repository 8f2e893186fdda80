"""The agent (ktlsd.agent.Agent) behind the real handshake service: bad parameters, bad peers,
timeouts, cancellation and keyring material, each proved with real sockets and keys.

Every bad request must produce a DONE with the documented status, exactly one agent log line
carrying that status and a reason, and leave the agent serving: each test ends with a good
handshake. Keys live in a keyring of the test's own (linked into the session keyring, so
the in-process agent possesses them) that is revoked afterwards.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from ktlsd import keyring
from ktlsd.agent import Agent
from ktlsd.client import submit
from ktlsd.request import (
    AuthMode,
    HandshakeDone,
    HandshakeRequest,
    KeyDelivery,
    KeyUpdateType,
    MessageType,
)
from ktlsd.session_store import POSSESSOR_ONLY, SessionStore
from ktlsd.settings import AgentSettings
from ktlsd.upcall.service import HandshakeService
from tests.agent_helpers import (
    REPO,
    DirectRequest,
    LogLines,
    parse_handshake_line,
    running_agent,
    tcp_pair,
)
from tests.pki import Authority, Issued
from tests.waiting import run

PSK = bytes.fromhex("a1b2c3d4" * 8)
PSK_384 = bytes.fromhex("0f1e2d" * 16)


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Authority, Issued, Issued]:
    ca = Authority.create(tmp_path / "pki")
    return ca, ca.issue_server(), ca.issue_client("host1")


def no_keeping() -> AgentSettings:
    return AgentSettings(keep_sessions=False, max_concurrent=16)


async def good_pair(path: str, name: str = "good") -> None:
    """The agent still serves: a fresh PSK handshake between two consumers succeeds."""
    a, b = tcp_pair()
    with a, b:
        psk = [(name, PSK)]
        da, db = await asyncio.gather(
            submit(a, role="client", auth="psk", psk=psk, service_path=path),
            submit(b, role="server", auth="psk", psk=psk, service_path=path),
        )
    assert (da.status, da.reason, db.status, db.reason) == (0, "", 0, "")


def check_failure(logs: LogLines, done: HandshakeDone, status: int, words: str) -> None:
    """DONE has the status and a reason; the agent logged exactly one line saying the same."""
    assert done.status == status, (errno.errorcode.get(done.status), done.reason)
    assert words in done.reason, done.reason
    assert done.session is None and done.session_id == 0
    lines = logs.handshake_lines()
    assert len(lines) == 1, lines
    fields = parse_handshake_line("ktlsd: WARNING " + lines[0])
    assert int(fields["status"]) == status
    assert f"({errno.errorcode[status]})" in lines[0]
    assert words in fields["reason"]
    assert fields["suite"] == "-"


# --- bad parameters: one request, one DONE, one log line, agent keeps serving ------------------

BadCase = Callable[[str, socket.socket, int, tuple[Authority, Issued, Issued], Path],
                   Awaitable[HandshakeDone]]


async def missing_serial(path: str, sock: socket.socket, ring: int, *_: Any) -> HandshakeDone:
    absent = keyring.add_key("user", "soon gone", PSK, ring)
    keyring.invalidate_key(absent)
    return await submit(sock, role="client", auth="psk", psk_serials=[absent],
                        service_path=path)


async def revoked_serial(path: str, sock: socket.socket, ring: int, *_: Any) -> HandshakeDone:
    serial = keyring.add_key("user", "revoked-identity", PSK, ring)
    keyring.revoke_key(serial)
    return await submit(sock, role="client", auth="psk", psk_serials=[serial],
                        service_path=path)


async def wrong_type(path: str, sock: socket.socket, ring: int, *_: Any) -> HandshakeDone:
    inner = keyring.add_key("keyring", "not-a-psk", None, ring)
    return await submit(sock, role="client", auth="psk", psk_serials=[inner],
                        service_path=path)


async def wrong_type_certificate(path: str, sock: socket.socket, ring: int, pki: Any,
                                 *_: Any) -> HandshakeDone:
    # Serials of keys that hold no certificate / no private key.
    junk = keyring.add_key("user", "junk-cert", b"\x30\x03\x02\x01\x00", ring)
    return await submit(sock, role="server", auth="x509", certificate_serial=junk,
                        private_key_serial=junk, service_path=path)


async def missing_certificate_file(path: str, sock: socket.socket, ring: int, pki: Any,
                                   tmp: Path) -> HandshakeDone:
    _, server, _ = pki
    return await submit(sock, role="server", auth="x509", certificate=tmp / "absent.pem",
                        private_key=server.key_path, service_path=path)


async def unreadable_certificate_file(path: str, sock: socket.socket, ring: int, pki: Any,
                                      tmp: Path) -> HandshakeDone:
    _, server, _ = pki
    (tmp / "a-directory.pem").mkdir()  # root reads any file; a directory cannot be read
    return await submit(sock, role="server", auth="x509", certificate=tmp / "a-directory.pem",
                        private_key=server.key_path, service_path=path)


async def garbage_certificate_file(path: str, sock: socket.socket, ring: int, pki: Any,
                                   tmp: Path) -> HandshakeDone:
    _, server, _ = pki
    bad = tmp / "garbage.pem"
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
    return await submit(sock, role="server", auth="x509", certificate=bad,
                        private_key=server.key_path, service_path=path)


async def certificate_without_key(path: str, sock: socket.socket, ring: int, pki: Any,
                                  *_: Any) -> HandshakeDone:
    _, server, _ = pki
    return await submit(sock, role="server", auth="x509", certificate=server.cert_path,
                        service_path=path)


async def certificate_serial_without_key(path: str, sock: socket.socket, ring: int, pki: Any,
                                         *_: Any) -> HandshakeDone:
    _, server, _ = pki
    cert = keyring.add_key("user", "cert-only", server.cert_der, ring)
    return await submit(sock, role="server", auth="x509", certificate_serial=cert,
                        service_path=path)


async def psk_client_without_psk(path: str, sock: socket.socket, *_: Any) -> HandshakeDone:
    return await submit(sock, role="client", auth="psk", service_path=path)


async def x509_server_without_certificate(path: str, sock: socket.socket,
                                          *_: Any) -> HandshakeDone:
    return await submit(sock, role="server", auth="x509", service_path=path)


BAD_CASES: list[tuple[str, BadCase, int, str]] = [
    ("missing serial", missing_serial, errno.ENOKEY, "no such key"),
    ("revoked serial", revoked_serial, errno.ENOKEY, "revoked"),
    ("key of the wrong type", wrong_type, errno.ENOKEY, "type 'keyring'"),
    ("certificate serials holding junk", wrong_type_certificate, errno.ENOKEY, "not DER X.509"),
    ("missing certificate file", missing_certificate_file, errno.ENOKEY, "absent.pem"),
    ("unreadable certificate file", unreadable_certificate_file, errno.ENOKEY, "cannot read"),
    ("garbage certificate file", garbage_certificate_file, errno.ENOKEY, "no PEM certificate"),
    ("certificate without key", certificate_without_key, errno.ENOKEY, "together"),
    ("certificate serial without key", certificate_serial_without_key, errno.ENOKEY,
     "together"),
    ("PSK client without a PSK", psk_client_without_psk, errno.ENOKEY, "no PSK"),
    ("x509 server without a certificate", x509_server_without_certificate, errno.ENOKEY,
     "no certificate"),
]


@pytest.mark.parametrize(("case", "status", "words"), [c[1:] for c in BAD_CASES],
                         ids=[c[0] for c in BAD_CASES])
def test_bad_parameters_get_a_status_and_one_log_line(
    sock_path: str, ring: int, pki: Any, tmp_path: Path, case: BadCase, status: int,
    words: str,
) -> None:
    async def main() -> None:
        logs = LogLines()
        async with running_agent(sock_path, no_keeping()):
            a, b = tcp_pair()
            with a, b, logs.attached():
                done = await case(sock_path, a, ring, pki, tmp_path)
            check_failure(logs, done, status, words)
            await good_pair(sock_path)

    run(main())


SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK) or os.getuid() != 0,
                    reason="needs root and a system python3 that uid 65534 can run")
def test_unprivileged_consumer_cannot_use_a_file_it_cannot_read(
    pki: Any, tmp_path: Path
) -> None:
    """A consumer running as nobody names the agent's (root-only) key file: ENOKEY, although
    the agent itself could read it."""
    _, server, _ = pki
    os.chmod(server.key_path, 0o600)
    public = Path(tempfile.mkdtemp(prefix="ktlsd-agent-test-"))
    public.chmod(0o755)
    sock_path = str(public / "handshake.sock")
    consumer = (
        "import asyncio, socket, sys\n"
        "from ktlsd.client import submit\n"
        "async def main():\n"
        "    listener = socket.create_server(('127.0.0.1', 0))\n"
        "    a = socket.create_connection(listener.getsockname())\n"
        "    done = await submit(a, role='server', auth='x509', certificate=sys.argv[2],\n"
        "                        private_key=sys.argv[3], service_path=sys.argv[1])\n"
        "    print(done.status, done.reason)\n"
        "asyncio.run(main())\n"
    )

    async def main() -> None:
        logs = LogLines()
        async with running_agent(sock_path, no_keeping(), mode=0o666):
            with logs.attached():
                proc = await asyncio.create_subprocess_exec(
                    SYSTEM_PYTHON, "-c", consumer, sock_path, str(server.cert_path),
                    str(server.key_path), stdout=subprocess.PIPE, user=65534, group=65534,
                    extra_groups=[], cwd="/", env={**os.environ, "PYTHONPATH": str(REPO)},
                )
                out, _ = await proc.communicate()
            status, _, reason = out.decode().strip().partition(" ")
            assert int(status) == errno.ENOKEY, out
            assert "not readable by uid 65534" in reason
            assert len(logs.handshake_lines()) == 1
            await good_pair(sock_path)

    try:
        run(main())
    finally:
        shutil.rmtree(public, ignore_errors=True)


# --- bad peers -----------------------------------------------------------------------------


async def serve_garbage(sock: socket.socket) -> None:
    """A peer that reads the ClientHello and answers with a well-framed record of nonsense."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    await loop.sock_recv(sock, 65536)
    await loop.sock_sendall(sock, b"\x16\x03\x03\x00\x20" + bytes(range(0x20)))


@pytest.mark.parametrize("reply", [b"\x16\x03\x03\x00\x20" + bytes(range(0x20)),
                                   b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4],
                         ids=["bad handshake record", "not tls"])
def test_a_peer_that_sends_garbage_gets_eio(sock_path: str, reply: bytes) -> None:
    async def main() -> None:
        logs = LogLines()
        async with running_agent(sock_path, no_keeping()):
            a, b = tcp_pair()
            with a, b, logs.attached():
                b.setblocking(False)
                loop = asyncio.get_running_loop()

                async def peer() -> None:
                    await loop.sock_recv(b, 65536)
                    await loop.sock_sendall(b, reply)

                done, _ = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=[("g", PSK)], timeout=10,
                           service_path=sock_path),
                    peer(),
                )
            assert done.status == errno.EIO, done.reason
            assert done.reason and "\n" not in done.reason
            assert len(logs.handshake_lines()) == 1 and "(EIO)" in logs.handshake_lines()[0]
            await good_pair(sock_path)

    run(main())


def test_a_peer_that_never_answers_gets_etimedout_within_the_timeout(sock_path: str) -> None:
    timeout = 1.0
    slack = 2.0

    async def main() -> None:
        logs = LogLines()
        async with running_agent(sock_path, no_keeping()):
            a, b = tcp_pair()
            with a, b, logs.attached():
                started = time.monotonic()
                done = await submit(a, role="client", auth="psk", psk=[("s", PSK)],
                                    timeout=timeout, service_path=sock_path)
                elapsed = time.monotonic() - started
                # The silent peer really got a ClientHello (the handshake had started).
                assert b.recv(5)[:1] == b"\x16"
            check_failure(logs, done, errno.ETIMEDOUT, "1 s")
            assert elapsed < timeout + slack, elapsed
            fields = parse_handshake_line("ktlsd: W " + logs.handshake_lines()[0])
            assert float(fields["duration"][:-2]) < (timeout + slack) * 1000
            await good_pair(sock_path)

    run(main())


@pytest.mark.parametrize(
    ("server_psk", "client_status", "server_status", "client_words"),
    [
        (("same-id", bytes(reversed(PSK))), errno.EACCES, errno.EACCES, "wrong key"),
        (("other-id", PSK), errno.EKEYREJECTED, errno.EKEYREJECTED, "unknown PSK identity"),
    ],
    ids=["wrong PSK", "unknown identity"],
)
def test_psk_mismatches(sock_path: str, server_psk: tuple[str, bytes], client_status: int,
                        server_status: int, client_words: str) -> None:
    async def main() -> None:
        logs = LogLines()
        async with running_agent(sock_path, no_keeping()):
            a, b = tcp_pair()
            with a, b, logs.attached():
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=[("same-id", PSK)],
                           service_path=sock_path, timeout=5),
                    submit(b, role="server", auth="psk", psk=[server_psk],
                           service_path=sock_path, timeout=5),
                )
            assert (da.status, db.status) == (client_status, server_status), (da.reason,
                                                                              db.reason)
            assert client_words in da.reason
            lines = logs.handshake_lines()
            assert len(lines) == 2
            assert sorted(int(parse_handshake_line("ktlsd: W " + line)["status"])
                          for line in lines) == sorted((client_status, server_status))
            for line in lines:
                assert PSK.hex() not in line and server_psk[1].hex() not in line
            await good_pair(sock_path)

    run(main())


def test_failures_never_disturb_concurrent_good_handshakes(
    sock_path: str, ring: int, pki: Any, tmp_path: Path
) -> None:
    """Every bad case above, plus garbage and silent peers, at once with 12 good pairs."""

    async def main() -> None:
        logs = LogLines()
        async with running_agent(sock_path, AgentSettings(keep_sessions=False,
                                                          max_concurrent=64)):
            sockets: list[socket.socket] = []

            async def bad(case: BadCase, status: int, index: int) -> None:
                a, b = tcp_pair()
                sockets.extend((a, b))
                sub = tmp_path / f"case{index}"
                sub.mkdir()
                done = await case(sock_path, a, ring, pki, sub)
                assert done.status == status, done.reason

            async def silent() -> None:
                a, b = tcp_pair()
                sockets.extend((a, b))
                done = await submit(a, role="client", auth="psk", psk=[("s", PSK)],
                                    timeout=1, service_path=sock_path)
                assert done.status == errno.ETIMEDOUT

            async def garbage() -> None:
                a, b = tcp_pair()
                sockets.extend((a, b))
                done, _ = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=[("g", PSK)],
                           service_path=sock_path),
                    serve_garbage(b))
                assert done.status == errno.EIO

            with logs.attached():
                await asyncio.gather(
                    *(bad(case, status, i) for i, (_, case, status, _) in enumerate(BAD_CASES)),
                    silent(), garbage(),
                    *(good_pair(sock_path, f"good-{i}") for i in range(12)),
                )
            for sock in sockets:
                sock.close()
            lines = logs.handshake_lines()
            assert len(lines) == len(BAD_CASES) + 2 + 24
            assert sum("status=0 (ok)" in line for line in lines) == 24

    run(main())


# --- cancellation --------------------------------------------------------------------------


def test_a_consumer_that_disconnects_mid_handshake_frees_its_slot(sock_path: str) -> None:
    """With two handshake slots, a silent peer holds one for 30 s; its consumer gives up and
    the agent aborts at once, so a pair (which needs both slots) completes."""

    async def main() -> None:
        logs = LogLines()
        async with running_agent(sock_path, AgentSettings(keep_sessions=False,
                                                          max_concurrent=2)):
            a, b = tcp_pair()
            with a, b, logs.attached():
                waiting = asyncio.create_task(
                    submit(a, role="client", auth="psk", psk=[("c", PSK)], timeout=30,
                           service_path=sock_path))
                await asyncio.to_thread(b.recv, 5)  # the ClientHello: the slot is taken
                waiting.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await waiting
                await asyncio.wait_for(good_pair(sock_path), 15)
            lines = logs.handshake_lines()
            cancelled = [line for line in lines if "cancelled" in line]
            assert len(cancelled) == 1 and "(ETIMEDOUT)" in cancelled[0]
            assert sum("status=0 (ok)" in line for line in lines) == 2

    run(main())


# --- keyring material (the kernel's way of naming keys) --------------------------------------


def test_psk_by_serial_and_server_lookup_by_identity(sock_path: str, ring: int) -> None:
    """Client: PSK by key serial ("user" key: this host has no "psk" key type). Server: no
    key given, the agent looks the offered identity up in the keyring the request names.
    DONE's remote-auth is the PSK's serial on both ends."""
    identity = "NVMe0R02 nqn.host nqn.subsys"
    serial = keyring.add_key("user", identity, PSK_384, ring)

    async def main() -> None:
        logs = LogLines()
        async with running_agent(sock_path, no_keeping()):
            a, b = tcp_pair()
            with a, b, logs.attached():
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk_serials=[serial],
                           service_path=sock_path),
                    submit(b, role="server", auth="psk", keyring=ring, service_path=sock_path),
                )
            assert (da.status, da.reason, db.status, db.reason) == (0, "", 0, "")
            assert da.session is not None and db.session is not None
            assert da.session.suite.iana_name == "TLS_AES_256_GCM_SHA384"  # NVMe hash 02
            assert da.remote_auth == db.remote_auth == (serial,)
            assert db.session.peer.psk_identity == identity.encode()
            assert hmac.compare_digest(da.session.client_secret, db.session.client_secret)
            assert all("status=0 (ok)" in line and "NVMe0R02" in line
                       for line in logs.handshake_lines())

    run(main())


def test_server_lookup_of_an_identity_it_does_not_hold_is_ekeyrejected(
    sock_path: str, ring: int
) -> None:
    keyring.add_key("user", "known-identity", PSK, ring)

    async def main() -> None:
        async with running_agent(sock_path, no_keeping()):
            a, b = tcp_pair()
            with a, b:
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=[("unknown-identity", PSK)],
                           service_path=sock_path, timeout=5),
                    submit(b, role="server", auth="psk", keyring=ring, service_path=sock_path,
                           timeout=5),
                )
            assert (da.status, db.status) == (errno.EKEYREJECTED, errno.EKEYREJECTED)
            await good_pair(sock_path)

    run(main())


def test_sessions_are_kept_for_key_updates_only_when_configured(
    sock_path: str, ring: int
) -> None:
    """keep_sessions: DONE's session id names a possessor-only key holding the state; with
    keeping off the id is 0."""
    store = SessionStore(keyring_id=ring, lifetime=60)

    async def main() -> None:
        for keep in (True, False):
            settings = AgentSettings(keep_sessions=keep, session_lifetime=60)
            service_path = f"{sock_path}.{keep}"
            from ktlsd.agent import Agent
            from ktlsd.upcall.service import HandshakeService

            service = HandshakeService(service_path)
            await service.start()
            agent = Agent(settings, [service], store=store)
            task = asyncio.create_task(agent.run())
            try:
                a, b = tcp_pair()
                with a, b:
                    psk = [("kept", PSK)]
                    da, db = await asyncio.gather(
                        submit(a, role="client", auth="psk", psk=psk, service_path=service_path,
                               keep_session=True),
                        submit(b, role="server", auth="psk", psk=psk, service_path=service_path,
                               keep_session=True),
                    )
                assert (da.status, db.status) == (0, 0)
                if not keep:
                    assert da.session_id == db.session_id == 0
                    continue
                assert da.session_id and db.session_id and da.session_id != db.session_id
                info = keyring.describe_key(da.session_id)
                assert info.perm == POSSESSOR_ONLY
                kept = store.load(da.session_id, owner=os.getuid())
                assert hmac.compare_digest(kept.client_secret,
                                           da.session.client_secret)  # type: ignore[union-attr]
                with pytest.raises(Exception) as info_exc:
                    store.load(da.session_id, owner=12345)
                assert getattr(info_exc.value, "errno", None) == errno.ENOKEY
            finally:
                await agent.stop()
                await asyncio.wait_for(task, 30)

    run(main())


# --- reload changes the concurrency bound at once -----------------------------------------


def test_reload_resizes_the_concurrency_bound(sock_path: str) -> None:
    """A request is taken exactly when its (silent) peer receives a ClientHello. With one
    slot the second request waits in the service; growing the bound lets it start at once;
    shrinking it keeps a third waiting until the running ones are below the new bound."""

    async def main() -> None:
        logs = LogLines()
        loop = asyncio.get_running_loop()
        async with running_agent(sock_path, AgentSettings(keep_sessions=False,
                                                          max_concurrent=1)) as agent:
            service = agent.sources[0]
            pairs = [tcp_pair() for _ in range(3)]
            for _, peer in pairs:
                peer.setblocking(False)

            def start(i: int) -> asyncio.Task[HandshakeDone]:
                return asyncio.create_task(submit(
                    pairs[i][0], role="client", auth="psk", psk=[(f"r{i}", PSK)], timeout=30,
                    service_path=sock_path))

            async def queued(count: int) -> None:
                """Wait until the service has admitted ``count`` requests in all."""
                while sum("submitted" in m for m in logs.messages) < count:
                    await asyncio.sleep(0.005)

            async def taken(i: int) -> None:
                assert (await loop.sock_recv(pairs[i][1], 1)) == b"\x16"

            with logs.attached():
                first = start(0)
                await taken(0)
                second = start(1)
                await asyncio.wait_for(queued(2), 10)
                assert len(agent.in_flight) == 1 and service.pending == 1  # type: ignore[attr-defined]
                agent.reload(AgentSettings(keep_sessions=False, max_concurrent=3))
                await asyncio.wait_for(taken(1), 10)
                agent.reload(AgentSettings(keep_sessions=False, max_concurrent=1))
                third = start(2)
                await asyncio.wait_for(queued(3), 10)
                first.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await first
                while len(agent.in_flight) > 1:
                    await asyncio.sleep(0.005)
                with pytest.raises(BlockingIOError):  # one running, bound 1: not started
                    pairs[2][1].recv(1)
                second.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await second
                await asyncio.wait_for(taken(2), 10)
                third.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await third
            for a, b in pairs:
                a.close()
                b.close()
            reloads = [m for m in logs.messages if m.startswith("configuration reloaded")]
            assert reloads == ["configuration reloaded: max_concurrent 1 -> 3",
                               "configuration reloaded: max_concurrent 3 -> 1"]
            agent.reload(AgentSettings(keep_sessions=False, max_concurrent=2))
            await good_pair(sock_path)  # both ends at once: needs the two slots

    run(main())


# --- requests as the kernel sends them (serials only, no consumer credentials) ----------------


KERNEL_BAD = [
    ("no auth mode", dict(message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.UNSPEC),
     errno.EINVAL, "auth mode unspec"),
    ("no message type", dict(message_type=MessageType.UNSPEC, auth_mode=AuthMode.PSK),
     errno.EOPNOTSUPP, "message type unspec"),
    ("psk without identities", dict(message_type=MessageType.CLIENTHELLO,
                                     auth_mode=AuthMode.PSK), errno.ENOKEY, "no PSK"),
    ("absent psk serial", dict(message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.PSK,
                               peer_identities=(0x7FFF_FFF1,)), errno.ENOKEY, "no such key"),
    ("key update without session", dict(message_type=MessageType.SERVERKEYUPDATE,
                                        auth_mode=AuthMode.UNSPEC,
                                        key_update_type=KeyUpdateType.SEND),
     errno.ENOKEY, "no session id"),
    ("key update of unknown session", dict(message_type=MessageType.CLIENTKEYUPDATE,
                                           auth_mode=AuthMode.UNSPEC, session_id=0x7FFF_FFF2,
                                           key_update_type=KeyUpdateType.RECEIVED),
     errno.ENOKEY, "unknown or expired"),
]


@pytest.mark.parametrize(("fields", "status", "words"), [c[1:] for c in KERNEL_BAD],
                         ids=[c[0] for c in KERNEL_BAD])
def test_kernel_requests_with_bad_parameters(fields: dict[str, Any], status: int,
                                             words: str) -> None:
    """The kernel path's own checks (the service's decoder never sees these requests)."""

    async def main() -> None:
        logs = LogLines()
        agent = Agent(AgentSettings(keep_sessions=False), [])
        a, b = tcp_pair()
        with a, b, logs.attached():
            pending = DirectRequest(HandshakeRequest(sockfd=os.dup(a.fileno()), **fields),
                                    source_name="kernel", delivery=KeyDelivery.INSTALL_KTLS)
            answer = await agent.serve(pending)
            assert pending.answers == [answer]
            check_failure(logs, answer, status, words)
            assert "source=kernel" in logs.handshake_lines()[0]
            assert (agent.completed, agent.failed) == (0, 1)

    run(main())


def test_a_request_taken_after_the_bound_shrank_gets_esrch_when_the_agent_stops(
    sock_path: str
) -> None:
    async def main() -> None:
        logs = LogLines()
        loop = asyncio.get_running_loop()
        service = HandshakeService(sock_path)
        await service.start()
        # Three slots, two running: the agent already holds the third slot while it waits
        # for the next request, which arrives only after the bound shrank to one.
        agent = Agent(AgentSettings(keep_sessions=False, max_concurrent=3), [service])
        running = asyncio.create_task(agent.run())
        pairs = [tcp_pair() for _ in range(3)]
        try:
            with logs.attached():
                waiting = []
                for i in range(2):
                    pairs[i][1].setblocking(False)
                    waiting.append(asyncio.create_task(submit(
                        pairs[i][0], role="client", auth="psk", psk=[("x", PSK)], timeout=1,
                        service_path=sock_path)))
                    assert await loop.sock_recv(pairs[i][1], 1) == b"\x16"
                agent.reload(AgentSettings(keep_sessions=False, max_concurrent=1))
                third = asyncio.create_task(submit(
                    pairs[2][0], role="client", auth="psk", psk=[("x", PSK)], timeout=1,
                    service_path=sock_path))
                while service.pending or sum("submitted" in m for m in logs.messages) < 3:
                    await asyncio.sleep(0.005)
                await agent.stop()
                done = await asyncio.wait_for(third, 10)
                assert done.status == errno.ESRCH and "shutting down" in done.reason
                # The two that were running finish in their own time (their timeout).
                assert [d.status for d in await asyncio.gather(*waiting)] == [errno.ETIMEDOUT] * 2
            await asyncio.wait_for(running, 10)
            assert (agent.completed, agent.failed) == (0, 3)
            assert sum("(ESRCH)" in line for line in logs.handshake_lines()) == 1
        finally:
            for a, b in pairs:
                a.close()
                b.close()

    run(main())
