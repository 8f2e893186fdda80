"""keyupdate-agent: the agent's kTLS KeyUpdate path on a real kernel (issue 5's VM acceptance).

``ktlsd run --kernel no --socket /run/ktlsd.sock`` serves user-space consumers. Consumer A
behaves as a kernel consumer would with the *proposed* key-update upcall: it gets a
handshake through the service, puts kTLS on its own socket from the DONE's session (raw
``ktlsd.tls.ktls`` calls, as the kernel would), and from then on never rekeys by itself. It asks
the agent with ``ktlsd.client.key_update(..., record_seqs=None)``, so the agent takes its
kTLS path (``ktlsd.keyupdate.KtlsInstaller``): send the KeyUpdate record through kTLS on the
lent socket, install the next TX and/or RX key with setsockopt. Peer B got its half of the
same handshake through the service too and runs a plain :class:`ktlsd.tls.connection.TlsConnection`
on the user-space record layer, answering KeyUpdates as any TLS 1.3 peer does.

A's socket is blocking without a timeout: after a KeyUpdate record the kernel then fails the
next read with EKEYEXPIRED at once (with a timeout Python polls first and just waits, see
docs/testbed.md). The agent's dup of the socket shares the file's O_NONBLOCK flag, so A sets
its socket blocking again after every request it lends the socket for.

Checked: data byte-exact under every generation, EKEYEXPIRED after each KeyUpdate A reads and
the read resuming after the agent's RECEIVED/RECEIVED_REQUEST_UPDATE, /proc/net/tls_stat
rekey counters moving by exactly what A's socket did, and ENOKEY for an unknown session id.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import (
    PROJECT,
    Agent,
    Scenario,
    ScenarioFailed,
    modprobe,
    tls_stat,
    write_tlshd_conf,
)

SERVICE = "/run/ktlsd.sock"
CHUNK = 16 * 1024
DATA = 64 * 1024  # per direction, between updates (TCG is slow)
HANDSHAKE = 22
APPLICATION = 23


def start_service(sc: Scenario) -> Agent:
    """``ktlsd run`` as the user-space service only; ready when its socket accepts."""
    conf = write_tlshd_conf(Path("/tmp/ktlsd-keyupdate.conf"))
    log = Path("/tmp/agent-ktlsd-service.log")
    Path(SERVICE).unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "ktlsd",
        "run",
        "--kernel",
        "no",
        "--socket",
        SERVICE,
        "-c",
        str(conf),
        "--debug",
    ]
    print(f"$ {' '.join(argv)}", flush=True)
    out = open(log, "wb")  # noqa: SIM115 - owned by the child's lifetime
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd="/tmp",
        env=dict(os.environ, PYTHONPATH=str(PROJECT)),
    )
    agent = Agent("ktlsd", proc, log)
    sc.cleanup(agent.stop, "stop ktlsd service")
    sc.agents.append(agent)
    while True:
        if proc.poll() is not None:
            raise ScenarioFailed(
                f"ktlsd exited at start ({proc.returncode}): {agent.output().strip()[-300:]}"
            )
        if time.monotonic() - started > 60:
            raise ScenarioFailed("ktlsd's service socket did not accept within 60 s")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(SERVICE)
            break
        except OSError:
            time.sleep(0.05)
        finally:
            probe.close()
    sc.figure("agent_ready_seconds", round(time.monotonic() - started, 2))
    return agent


class ConsumerA:
    """The kernel-consumer stand-in: raw kTLS on a socket, every rekey done by the agent."""

    def __init__(self, sc: Scenario, sock: socket.socket, session_id: int) -> None:
        self.sc, self.sock, self.session_id = sc, sock, session_id
        self.tx_rekeys = self.rx_rekeys = self.keyupdates_read = 0
        self.requests = 0

    def ask(self, kind: object, *, request_peer: bool = False, session_id: int | None = None):  # type: ignore[no-untyped-def]
        from ktlsd import client

        started = time.monotonic()
        done = asyncio.run(
            client.key_update(
                self.sock,
                role="client",
                session_id=session_id or self.session_id,
                key_update_type=kind,
                request_peer_update=request_peer,  # type: ignore[arg-type]
                service_path=SERVICE,
                timeout=10,
            )
        )
        self.sock.setblocking(True)  # the agent's dup shares O_NONBLOCK with us
        self.requests += 1
        if done.status == 0 and session_id is None:
            self.sc.check(done.session_id > 0, "the agent still keeps the session after the update")
            self.session_id = done.session_id
        return done, time.monotonic() - started

    def send(self, data: bytes) -> None:
        from ktlsd.tls import ktls

        for off in range(0, len(data), CHUNK):
            ktls.send_record(self.sock, APPLICATION, data[off : off + CHUNK])

    def recv(self, nbytes: int, label: str) -> bytes:
        """Read ``nbytes`` of application data; follow the peer's KeyUpdates via the agent."""
        from ktlsd.request import KeyUpdateType
        from ktlsd.tls import ktls

        got = bytearray()
        while len(got) < nbytes:
            ctype, data = ktls.recv_record(self.sock, CHUNK)
            if ctype == APPLICATION:
                if not data:
                    raise ScenarioFailed(f"{label}: end of stream after {len(got)} bytes")
                got += data
                continue
            if ctype != HANDSHAKE or len(data) != 5 or data[0] != 24:
                raise ScenarioFailed(f"{label}: unexpected record type {ctype} ({len(data)} B)")
            requested = data[4] == 1
            self.keyupdates_read += 1
            try:
                ktls.recv_record(self.sock, CHUNK)
                outcome = "no error"
            except OSError as exc:
                outcome = errno.errorcode.get(exc.errno or 0, str(exc))
            self.sc.check(
                outcome == "EKEYEXPIRED",
                f"{label}: read after the peer's KeyUpdate fails with EKEYEXPIRED",
            )
            kind = KeyUpdateType.RECEIVED_REQUEST_UPDATE if requested else KeyUpdateType.RECEIVED
            done, seconds = self.ask(kind)
            self.sc.check(
                done.status == 0,
                f"{label}: agent answered {kind.name} (status {done.status} {done.reason})",
            )
            self.rx_rekeys += 1
            if requested:
                self.tx_rekeys += 1
            self.sc.detail(f"{label}: {kind.name} via the agent in {seconds:.2f} s")
        return bytes(got)


def exchange(sc: Scenario, a: ConsumerA, b, label: str) -> int:  # type: ignore[no-untyped-def]
    """DATA bytes A -> B, then DATA bytes B -> A; both byte-exact."""
    up, down = os.urandom(DATA), os.urandom(DATA)
    received: list[bytes] = []
    errors: list[BaseException] = []

    def read_b() -> None:
        try:
            buf = bytearray()
            while len(buf) < DATA:
                chunk = b.recv(CHUNK)
                if not chunk:
                    raise ConnectionError("B saw end of stream")
                buf += chunk
            received.append(bytes(buf))
        except BaseException as exc:
            errors.append(exc)

    reader = threading.Thread(target=read_b)
    reader.start()
    a.send(up)
    reader.join(60)
    if errors or not received:
        raise ScenarioFailed(f"{label}: B failed reading: {errors[0] if errors else 'hung'}")
    sc.check(
        hashlib.sha256(received[0]).digest() == hashlib.sha256(up).digest(),
        f"{label}: {DATA // 1024} KiB A -> B byte-exact",
    )
    writer = threading.Thread(target=lambda: b.send(down))
    writer.start()
    got = a.recv(DATA, label)
    writer.join(60)
    sc.check(
        hashlib.sha256(got).digest() == hashlib.sha256(down).digest(),
        f"{label}: {DATA // 1024} KiB B -> A byte-exact",
    )
    return 2 * DATA


async def handshake_pair(a_sock: socket.socket, b_sock: socket.socket, psk: bytes):  # type: ignore[no-untyped-def]
    """Both halves of one PSK handshake through the service, concurrently."""
    from ktlsd import client

    ident = "ktlsd-keyupdate-agent"
    return await asyncio.gather(
        client.submit(  # A's key updates run through the agent: it must keep the session
            a_sock, role="client", auth="psk", psk=[(ident, psk)], service_path=SERVICE, timeout=20,
            keep_session=True,
        ),
        client.submit(
            b_sock, role="server", auth="psk", psk=[(ident, psk)], service_path=SERVICE, timeout=20
        ),
    )


def main() -> None:
    with Scenario() as sc:
        from ktlsd.request import KeyUpdateType
        from ktlsd.tls import ktls
        from ktlsd.tls.connection import TlsConnection
        from ktlsd.tls.record import UserRecordLayer

        modprobe(sc, "tls")
        agent = start_service(sc)
        lsock = socket.create_server(("127.0.0.1", 0))
        a_sock = socket.create_connection(lsock.getsockname())
        b_sock, _ = lsock.accept()
        lsock.close()
        sc.cleanup(a_sock.close)
        sc.cleanup(b_sock.close)
        started = time.monotonic()
        done_a, done_b = asyncio.run(handshake_pair(a_sock, b_sock, os.urandom(32)))
        sc.figure("handshake_seconds", round(time.monotonic() - started, 2))
        sc.check(
            done_a.status == 0 and done_b.status == 0,
            f"handshake through the service (A {done_a.status} {done_a.reason!r}, "
            f"B {done_b.status} {done_b.reason!r})",
        )
        sc.check(done_a.session_id > 0, "A's DONE carries a session id (the kept state)")
        assert done_a.session is not None and done_b.session is not None
        sc.detail(f"suite {done_a.session.suite.iana_name}, session id {done_a.session_id:#x}")

        before = tls_stat()
        a_sock.setblocking(True)
        session = done_a.session
        ktls.attach_ulp(a_sock)
        ktls.install_tx_key(a_sock, session.suite, session.tx_secret, session.tx_seq)
        ktls.install_rx_key(a_sock, session.suite, session.rx_secret, session.rx_seq)
        a = ConsumerA(sc, a_sock, done_a.session_id)
        b_sock.setblocking(True)
        b = TlsConnection(UserRecordLayer(b_sock, done_b.session), done_b.session)

        verified = exchange(sc, a, b, "initial keys")
        # 1. A sends KeyUpdate(update_not_requested) twice, through the agent.
        for i in range(2):
            done, seconds = a.ask(KeyUpdateType.SEND)
            sc.check(done.status == 0, f"SEND #{i + 1}: status {done.status} {done.reason}")
            a.tx_rekeys += 1
            sc.detail(f"SEND #{i + 1} via the agent in {seconds:.2f} s")
            verified += exchange(sc, a, b, f"after SEND #{i + 1}")
        # 2. A sends KeyUpdate(update_requested): B answers with its own; A follows it.
        done, seconds = a.ask(KeyUpdateType.SEND, request_peer=True)
        sc.check(done.status == 0, f"SEND(request) status {done.status} {done.reason}")
        a.tx_rekeys += 1
        sc.detail(f"SEND with update_requested via the agent in {seconds:.2f} s")
        verified += exchange(sc, a, b, "after SEND(request)")
        # 3. B sends KeyUpdate(update_not_requested) twice: RECEIVED each time.
        for i in range(2):
            b.key_update(request_peer=False)
            verified += exchange(sc, a, b, f"after B's KeyUpdate #{i + 1}")
        # 4. B sends KeyUpdate(update_requested): RECEIVED_REQUEST_UPDATE, both directions.
        b.key_update(request_peer=True)
        verified += exchange(sc, a, b, "after B's KeyUpdate(request)")
        verified += exchange(sc, a, b, "final")

        after = tls_stat()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if "Rekey" in k}
        sc.figure("tls_stat_rekey_delta", delta)
        sc.figure(
            "consumer_counts",
            {
                "tx_rekeys": a.tx_rekeys,
                "rx_rekeys": a.rx_rekeys,
                "keyupdates_read": a.keyupdates_read,
                "agent_requests": a.requests,
            },
        )
        sc.figure("bytes_verified", verified)
        sc.check(
            a.tx_rekeys == 4 and a.rx_rekeys == 4,
            f"A's socket rekeyed 4 times each way (tx {a.tx_rekeys}, rx {a.rx_rekeys})",
        )
        sc.check(
            delta.get("TlsTxRekeyOk") == a.tx_rekeys, f"TlsTxRekeyOk moved by exactly {a.tx_rekeys}"
        )
        sc.check(
            delta.get("TlsRxRekeyOk") == a.rx_rekeys, f"TlsRxRekeyOk moved by exactly {a.rx_rekeys}"
        )
        sc.check(
            delta.get("TlsRxRekeyReceived") == a.keyupdates_read,
            f"TlsRxRekeyReceived moved by exactly {a.keyupdates_read}",
        )
        sc.check(
            delta.get("TlsTxRekeyError", 0) == 0 and delta.get("TlsRxRekeyError", 0) == 0,
            "no rekey errors counted",
        )
        stats = {"sent": b.key_updates_sent, "received": b.key_updates_received}
        sc.figure("peer_b_key_updates", stats)
        sc.check(stats == {"sent": 4, "received": 4}, f"B sent 4 and received 4 ({stats})")

        # 5. An unknown session id: ENOKEY, and the connection is untouched.
        done, _ = a.ask(KeyUpdateType.SEND, session_id=0x7FFFFFF0)
        sc.figure("unknown_session_status", errno.errorcode.get(done.status, str(done.status)))
        sc.check(done.status == errno.ENOKEY, f"unknown session id -> ENOKEY ({done.status})")
        verified += exchange(sc, a, b, "after the refused request")
        sc.figure("bytes_verified", verified)
        sc.check(
            delta == {k: after.get(k, 0) - before.get(k, 0) for k in after if "Rekey" in k}
            and tls_stat().get("TlsTxRekeyOk") == after.get("TlsTxRekeyOk"),
            "the refused request rekeyed nothing",
        )
        log = agent.output()
        sc.check("Traceback" not in log, "agent log has no traceback")


if __name__ == "__main__":
    main()
