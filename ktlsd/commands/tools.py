"""``ktlsd connect`` and ``ktlsd listen``: openssl s_client/s_server-like tools for TLS to storage.

They run a handshake with ktlsd's engine on a TCP connection, hand the session to a record
layer (kTLS, or ktlsd's user-space one) exactly as the agent does for the kernel, and relay
stdin → peer and peer → stdout until end of stream; then they close with close_notify.
``listen --www`` instead answers each connection's HTTP request with a small page and closes
(like ``openssl s_server -www``), which is what TLS test suites such as tlsfuzzer expect.

``listen`` serves its connections concurrently on one event loop, each with an idle timeout
(``--idle-timeout``), so a silent peer never holds up the others. A fatal error on a
connection (the record layer sends the fatal alert, never a close_notify after it) ends that
connection at once, without waiting for stdin.

Standard error shows what an admin debugging an NVMe/TCP or NFS TLS problem wants to know —
suite, group, record layer, peer identity, KeyUpdates counted — and one line with the cause
on failure. Exit status: 0 after an orderly close, 1 on a handshake or I/O failure, 2 on bad
usage. Secrets are never printed; with ``SSLKEYLOGFILE`` set (as for other TLS tools) they are
written to that file in the NSS key log format for Wireshark (:mod:`ktlsd.tls.keylog`), with
a warning on standard error at start. The suites and groups are the system crypto policy's
(:mod:`ktlsd.tls.policy`), narrowed by ``--ciphers``/``--groups``.

This module is the commands themselves: registration, connecting, accepting, the handshake,
and the status lines and exit status of each connection. Their options and the TLS
configuration built from them are :mod:`ktlsd.commands.tool_options`; what happens on a
connection after the handshake (the stdin/stdout relay, the ``--www`` answer) is
:mod:`ktlsd.commands.relay`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import socket
import sys
from typing import TYPE_CHECKING

from ktlsd.commands.relay import CHUNK, answer_www, describe_session, relay
from ktlsd.commands.tool_options import (
    UsageError,
    add_listen_options,
    add_tls_options,
    build_config,
    parse_address,
)
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.tls.handshake import TlsConfig, perform_handshake
from ktlsd.tls.keylog import ENV_KEY_LOG, KeyLogError, key_log_from_environment
from ktlsd.tls.policy import CryptoPolicyError
from ktlsd.tls.record import AlertReceived
from ktlsd.tls.session import Role, Session

if TYPE_CHECKING:
    from ktlsd.tls.connection import TlsConnection

#: After a failure, how long and how much of what the peer still sends is read and dropped
#: before the socket is closed (see :func:`_linger`).
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 1 << 20

#: Alerts by which a TLS 1.3 server refuses a client's certificate (RFC 8446 §6.2):
#: handshake_failure, bad/unsupported/revoked/expired/unknown certificate, unknown_ca,
#: access_denied, decrypt_error, certificate_required.
_REFUSAL_ALERTS = frozenset((40, 42, 43, 44, 45, 46, 48, 49, 51, 116))


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"ktlsd: {message}", file=sys.stderr, flush=True)


def _fail(message: str) -> None:
    print(f"ktlsd: {message}", file=sys.stderr, flush=True)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = subparsers.add_parser(
        "connect", help="TLS 1.3 client: handshake, then relay stdin/stdout",
        description="Connect to HOST:PORT, run a TLS 1.3 handshake with ktlsd's engine, hand "
        "the session to a record layer and relay stdin to the peer and the peer to stdout.",
    )
    c.add_argument("address", metavar="HOST:PORT")
    add_tls_options(c, server=False)
    c.set_defaults(func=run_connect)

    s = subparsers.add_parser(
        "listen", help="TLS 1.3 server: accept, handshake, relay stdin/stdout",
        description="Listen on [HOST:]PORT, serve one connection (or --count N, --forever): "
        "handshake, hand the session to a record layer, relay stdin/stdout.",
    )
    s.add_argument("address", metavar="[HOST:]PORT")
    add_tls_options(s, server=True)
    add_listen_options(s)
    s.set_defaults(func=run_listen)


def _open_connection(
    sock: socket.socket, session: Session, args: argparse.Namespace
) -> TlsConnection:
    """``session`` on the ``--record-layer`` record layer over ``sock``, sending a KeyUpdate
    every ``--key-update-every`` bytes."""
    from ktlsd.tls.connection import TlsConnection
    from ktlsd.tls.record import open_record_layer

    sock.setblocking(False)
    layer = open_record_layer(sock, session, args.record_layer)
    _say(args, f"record layer: {layer.kind}")
    return TlsConnection(
        layer, session,
        rekey_after_bytes=args.key_update_every,
        rekey_request_peer=args.key_update_every is not None,
    )


def _idle_timeout(args: argparse.Namespace) -> float | None:
    return getattr(args, "idle_timeout", None) or None


async def _linger(sock: socket.socket) -> None:
    """Shut down our write side, then read and drop what the peer still sends until it closes.

    Closing a socket with unread data makes the kernel reset the connection (RST), and a peer
    that is still sending may then never read the fatal alert we sent before. So after a
    failure we wait for the peer's end of stream, at most :data:`LINGER_TIMEOUT` seconds and
    :data:`LINGER_BYTES` bytes; a peer that closes at once costs nothing.
    """
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)
    loop = asyncio.get_running_loop()
    left = LINGER_BYTES
    with contextlib.suppress(OSError, TimeoutError):
        sock.setblocking(False)
        async with asyncio.timeout(LINGER_TIMEOUT):
            while left > 0:
                data = await loop.sock_recv(sock, min(left, CHUNK))
                if not data:
                    return
                left -= len(data)


async def _serve_one(sock: socket.socket, config: TlsConfig, args: argparse.Namespace) -> int:
    status = await _run_connection(sock, config, args)
    if status:
        await _linger(sock)
    return status


async def _run_connection(
    sock: socket.socket, config: TlsConfig, args: argparse.Namespace
) -> int:
    try:
        session = await perform_handshake(sock, config, timeout=args.timeout)
    except HandshakeError as exc:
        _fail(f"handshake failed: {exc}")
        return 1
    _say(args, f"handshake ok: {describe_session(session)}")
    try:
        conn = _open_connection(sock, session, args)
        if getattr(args, "www", False):
            result = await answer_www(conn, session, idle_timeout=_idle_timeout(args))
        else:
            result = await relay(
                conn, key_update_every=args.key_update_every, idle_timeout=_idle_timeout(args)
            )
    except AlertReceived as exc:
        if session.role is Role.CLIENT and exc.description in _REFUSAL_ALERTS:
            # TLS 1.3: the client finishes its handshake before the server has checked the
            # client's certificate, so a refusal of it arrives as the first record after.
            _fail(
                f"handshake failed: {FailureCause.PEER_REJECTED.label}: the server refused "
                f"our credentials after the handshake ({exc})"
            )
        else:
            _fail(f"connection failed: {exc}")
        return 1
    except (OSError, HandshakeError) as exc:
        _fail(f"connection failed: {exc}")
        return 1
    if config.key_log is not None:
        try:
            config.key_log.write_key_updates(
                session, result.key_updates_sent, result.key_updates_received
            )
        except KeyLogError as exc:
            _fail(f"secrets after KeyUpdates not logged: {exc}")
    _say(
        args,
        f"closed: sent={result.sent} received={result.received} "
        f"key_updates_sent={result.key_updates_sent} "
        f"key_updates_received={result.key_updates_received}",
    )
    return 0


def _with_key_log(config: TlsConfig) -> TlsConfig:
    """``config`` writing its secrets to ``$SSLKEYLOGFILE`` when that is set: the file is
    checked now (:class:`KeyLogError`) and a warning goes to standard error, even with -q."""
    key_log = key_log_from_environment()
    if key_log is None:
        return config
    key_log.check()
    _fail(f"warning: {ENV_KEY_LOG} is set: TLS secrets are written to {key_log.path} "
          "(anyone who can read it can decrypt these sessions)")
    return dataclasses.replace(config, key_log=key_log)


def run_connect(args: argparse.Namespace) -> int:
    try:
        host, port = parse_address(args.address)
        config = _with_key_log(build_config(args, Role.CLIENT, host))
    except UsageError as exc:
        _fail(str(exc))
        return 2
    except (HandshakeError, CryptoPolicyError, KeyLogError) as exc:
        _fail(str(exc))
        return 1
    try:
        sock = socket.create_connection((host, port), timeout=args.timeout)
    except OSError as exc:
        _fail(f"cannot connect to {host}:{port}: {exc.strerror or exc}")
        return 1
    sock.settimeout(None)
    _say(args, f"connected to {host}:{port}")
    with sock:
        return asyncio.run(_serve_one(sock, config, args))


def run_listen(args: argparse.Namespace) -> int:
    try:
        host, port = parse_address(args.address, default_host="")
        config = _with_key_log(build_config(args, Role.SERVER, None))
    except UsageError as exc:
        _fail(str(exc))
        return 2
    except (HandshakeError, CryptoPolicyError, KeyLogError) as exc:
        _fail(str(exc))
        return 1
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(16)
    except OSError as exc:
        _fail(f"cannot listen on {args.address}: {exc.strerror or exc}")
        return 1
    _say(args, f"listening on {host or '*'}:{listener.getsockname()[1]}")
    with listener:
        return asyncio.run(_serve(listener, config, args))


async def _serve(listener: socket.socket, config: TlsConfig, args: argparse.Namespace) -> int:
    """Accept ``--count`` connections (or without end) and serve them concurrently.

    Exit status 1 if any connection failed. With ``--count`` the listening socket is closed as
    soon as the last connection was accepted.
    """
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    running: set[asyncio.Task[int]] = set()
    statuses: list[int] = []

    async def serve(sock: socket.socket) -> int:
        with sock:
            status = await _serve_one(sock, config, args)
        statuses.append(status)
        return status

    accepted = 0
    try:
        while args.forever or accepted < args.count:
            sock, peer = await loop.sock_accept(listener)
            accepted += 1
            _say(args, f"connection from {peer[0]}:{peer[1]}")
            task = asyncio.create_task(serve(sock))
            running.add(task)
            task.add_done_callback(running.discard)
        listener.close()
        await asyncio.gather(*running)
    finally:
        for task in running:
            task.cancel()
    return 1 if any(statuses) else 0
