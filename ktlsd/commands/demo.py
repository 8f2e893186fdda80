"""``ktlsd demo``: the agent serving two built-in consumers on this machine.

Needs no kTLS and no kernel handshake family: it starts the agent with the user-space
handshake service on a private socket, then runs two sessions between demo consumers over
loopback TCP, each consumer handing its socket to the agent exactly as a kernel consumer does:

* x509, mutual authentication (a throwaway CA, server and client certificates);
* PSK, SHA-384, with an NVMe/TCP retained PSK derived from an ``NVMeTLSkey-1:02:`` string.

On each connection the demo exchanges data both ways, performs a KeyUpdate (asking the peer
to update too), exchanges more data, checks every byte, closes with close_notify and prints
a table of what happened. Exit status 0 when everything checked out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import logging
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DATA_SIZE = 1 << 20  # per direction, per phase


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "demo", help="run the agent with two built-in consumers (x509 and PSK) on loopback",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--record-layer", choices=("auto", "kernel", "user"), default="auto")
    p.add_argument("-v", "--verbose", action="store_true", help="show the agent's log lines")
    p.set_defaults(func=run_demo)


# --- throwaway PKI -------------------------------------------------------------------------


def _write_pki(directory: Path) -> dict[str, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ktlsd demo CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem"}
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"demo {name}")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        paths[f"{name}_cert"] = directory / f"{name}.pem"
        paths[f"{name}_key"] = directory / f"{name}.key"
        paths[f"{name}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        os.chmod(paths[f"{name}_key"], 0o600)
    return paths


# --- the consumers -------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    role: str
    suite: str = "-"
    peer: str = "-"
    layer: str = "-"
    session_id: int = 0
    sent: int = 0
    received: int = 0
    key_updates_sent: int = 0
    key_updates_received: int = 0
    ok: bool = False
    note: str = ""


def _pattern(seed: str, size: int) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


async def _consumer(
    name: str, sock: socket.socket, role: str, service: str, record_layer: str, outcome: Outcome,
    **params: object,
) -> None:
    from ktlsd import client
    from ktlsd.tls.connection import TlsConnection

    done = await client.submit(sock, role=role, service_path=service, **params)  # type: ignore[arg-type]
    conn: TlsConnection = client.connection_from_done(sock, done, record_layer=record_layer)
    assert done.session is not None
    outcome.suite = done.session.suite.iana_name
    outcome.peer = done.session.peer.describe()
    outcome.layer = conn.layer.kind
    outcome.session_id = done.session_id
    mine = role
    theirs = "server" if role == "client" else "client"
    for phase in (1, 2):
        outgoing = _pattern(f"{name}:{mine}:{phase}", DATA_SIZE)
        expected = _pattern(f"{name}:{theirs}:{phase}", DATA_SIZE)
        sender = asyncio.create_task(conn.asend(outgoing))
        got = bytearray()
        while len(got) < len(expected):
            # At most what this phase still owes: the peer may already be sending the next
            # phase, and a receive joins consecutive records (TLS data is a byte stream).
            chunk = await conn.arecv(min(65536, len(expected) - len(got)))
            if not chunk:
                raise ConnectionError("peer closed early")
            got += chunk
        await sender
        outcome.sent += len(outgoing)
        outcome.received += len(got)
        if bytes(got) != expected:
            raise ValueError(f"phase {phase}: received data differs")
        if phase == 1 and role == "client":
            await conn.akey_update(request_peer=True)  # the server answers with its own
    await conn.aclose()
    tail = await conn.arecv(1)
    if tail:
        raise ValueError("data after the peer's close_notify")
    outcome.key_updates_sent = conn.key_updates_sent
    outcome.key_updates_received = conn.key_updates_received
    outcome.ok = True


async def _pair(
    name: str, service: str, record_layer: str, server_params: dict[str, object],
    client_params: dict[str, object],
) -> list[Outcome]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.setblocking(False)
    loop = asyncio.get_running_loop()
    outcomes = [Outcome(name, "server"), Outcome(name, "client")]
    client_sock = socket.create_connection(("127.0.0.1", port))
    server_sock, _ = await loop.sock_accept(listener)
    listener.close()
    try:
        tasks = [
            asyncio.create_task(_consumer(name, server_sock, "server", service, record_layer,
                                          outcomes[0], **server_params)),
            asyncio.create_task(_consumer(name, client_sock, "client", service, record_layer,
                                          outcomes[1], **client_params)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if any(t.done() and t.exception() is not None for t in tasks):
            # One end failed: its peer would wait for data that never comes. Shutting both
            # sockets down ends the other end too (it sees the connection end early).
            for sock in (server_sock, client_sock):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for outcome, result in zip(outcomes, results, strict=True):
            if isinstance(result, BaseException):
                outcome.note = f"{type(result).__name__}: {result}".splitlines()[0]
    finally:
        server_sock.close()
        client_sock.close()
    return outcomes


async def _run(args: argparse.Namespace, workdir: Path) -> list[Outcome]:
    from ktlsd import keyring
    from ktlsd.agent import Agent
    from ktlsd.nvme import keys as nvme_keys
    from ktlsd.settings import AgentSettings
    from ktlsd.upcall.service import HandshakeService

    # A private session keyring, as `ktlsd run` uses: the kept session states live there and
    # vanish with this process instead of lingering in the caller's keyring.
    keyring.join_session_keyring(None)
    pki = _write_pki(workdir)
    service_path = str(workdir / "handshake.sock")
    service = HandshakeService(service_path, mode=0o600)
    await service.start()
    agent = Agent(AgentSettings(max_concurrent=8), [service])
    agent_task = asyncio.create_task(agent.run())
    try:
        x509_outcomes = await _pair(
            "x509", service_path, args.record_layer,
            {"auth": "x509", "certificate": pki["server_cert"], "private_key": pki["server_key"],
             "truststore": pki["ca"], "require_client_cert": True},
            {"auth": "x509", "certificate": pki["client_cert"], "private_key": pki["client_key"],
             "truststore": pki["ca"], "peername": "localhost"},
        )
        hostnqn = "nqn.2014-08.org.nvmexpress:uuid:6ae4e8b8-1e8e-4d7a-9d2c-5f1c7a1f0001"
        subsysnqn = "nqn.2026-11.io.ktlsd:demo"
        configured = nvme_keys.generate_configured_psk(nvme_keys.HashId.SHA384)
        interchange = nvme_keys.format_interchange(configured, nvme_keys.HashId.SHA384)
        parsed = nvme_keys.parse_interchange(interchange)
        derived = nvme_keys.derive_nvme_tls_key(
            parsed.key, parsed.hash_id, hostnqn, subsysnqn, version=1
        )
        psk = [(str(derived.identity), derived.tls_psk, "sha384")]
        psk_outcomes = await _pair(
            "psk", service_path, args.record_layer,
            {"auth": "psk", "psk": psk}, {"auth": "psk", "psk": psk},
        )
    finally:
        await agent.stop()
        await agent_task
    return x509_outcomes + psk_outcomes


def _table(outcomes: list[Outcome]) -> str:
    header = ("session", "role", "suite", "peer authenticated as", "layer", "sent", "received",
              "KU sent", "KU recv", "result")
    rows = [header]
    for o in outcomes:
        peer = o.peer if len(o.peer) <= 48 else o.peer[:45] + "..."
        rows.append((
            o.name, o.role, o.suite, peer, o.layer, f"{o.sent:,}", f"{o.received:,}",
            str(o.key_updates_sent), str(o.key_updates_received),
            "ok" if o.ok else f"FAILED {o.note}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_demo(args: argparse.Namespace) -> int:
    from ktlsd.daemon import setup_logging

    setup_logging("info" if args.verbose else "error")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ktlsd-demo-") as tmp:
        outcomes = asyncio.run(_run(args, Path(tmp)))
    print("ktlsd demo: the agent served two sessions through its user-space handshake service")
    print()
    print(_table(outcomes))
    print()
    ok = all(o.ok for o in outcomes)
    elapsed = time.monotonic() - started
    print(f"{'all checks passed' if ok else 'FAILED'} in {elapsed:.2f} s "
          f"(1 MiB each way before and after a KeyUpdate, every byte compared)")
    if not ok:
        logging.getLogger("ktlsd").error("demo failed")
    return 0 if ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(argparse.Namespace(record_layer="auto", verbose=True)))
