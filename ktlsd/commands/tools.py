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
usage. Secrets are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import os
import socket
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ktlsd.credentials import X509Credentials
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.material import psk_hash_for
from ktlsd.tls.handshake import ClientAuth, HashName, PskKey, TlsConfig, perform_handshake
from ktlsd.tls.record import AlertReceived
from ktlsd.tls.session import CipherSuite, Role, Session

if TYPE_CHECKING:
    from ktlsd.tls.connection import TlsConnection

CHUNK = 16384

#: Default ``listen --idle-timeout``: seconds with nothing received or sent on a connection.
DEFAULT_IDLE_TIMEOUT = 300.0
#: How long closing may wait for a peer that does not read (close_notify must fit the socket).
CLOSE_TIMEOUT = 5.0
#: ``--www``: largest HTTP request head read before answering anyway.
MAX_WWW_REQUEST = 65536
#: After a failure, how long and how much of what the peer still sends is read and dropped
#: before the socket is closed (see :func:`_linger`).
LINGER_TIMEOUT = 1.0
LINGER_BYTES = 1 << 20

#: Alerts by which a TLS 1.3 server refuses a client's certificate (RFC 8446 §6.2):
#: handshake_failure, bad/unsupported/revoked/expired/unknown certificate, unknown_ca,
#: access_denied, decrypt_error, certificate_required.
_REFUSAL_ALERTS = frozenset((40, 42, 43, 44, 45, 46, 48, 49, 51, 116))


class UsageError(Exception):
    """A bad option value; reported in one line with exit status 2."""


def _say(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"ktlsd: {message}", file=sys.stderr, flush=True)


def _fail(message: str) -> None:
    print(f"ktlsd: {message}", file=sys.stderr, flush=True)


# --- options -------------------------------------------------------------------------------


def _add_tls_options(p: argparse.ArgumentParser, *, server: bool) -> None:
    g = p.add_argument_group("PSK")
    g.add_argument("--psk-identity", metavar="ID", help="PSK identity to offer / accept")
    g.add_argument(
        "--psk", metavar="KEY",
        help="PSK as hex, or an NVMe 'NVMeTLSkey-1:hh:...:' interchange string (then the "
        "identity and TLS PSK are derived from --hostnqn/--subsysnqn unless --psk-identity "
        "is given)",
    )
    g.add_argument(
        "--psk-file", metavar="PATH",
        help="read the PSK (hex or an NVMe interchange string) from PATH instead of the command "
        "line, where `ps` and shell history would show it",
    )
    g.add_argument("--psk-hash", choices=("sha256", "sha384"), help="hash the PSK is bound to")
    g.add_argument("--hostnqn", help="host NQN, for an NVMe interchange PSK")
    g.add_argument("--subsysnqn", help="subsystem NQN, for an NVMe interchange PSK")
    g.add_argument(
        "--identity-version", type=int, choices=(0, 1), default=1,
        help="NVMe PSK identity version for a derived identity (default 1)",
    )
    g.add_argument(
        "--compat", action="store_true",
        help="derive NVMe keys like libnvme < 1.16 (nvme-cli < 2.16)",
    )
    g = p.add_argument_group("x509")
    g.add_argument("--cert", help="our certificate chain (PEM, leaf first)")
    g.add_argument("--key", help="our private key (PEM)")
    g.add_argument("--ca", help="trusted CA file or directory (default: the system's)")
    g.add_argument("--crl", help="CRL file (PEM or DER) to check the peer against")
    g.add_argument(
        "--peername",
        help="name (DNS or IP) the peer's certificate must carry"
        + ("" if server else " (default: HOST)"),
    )
    g.add_argument("--no-verify", action="store_true", help="accept any peer certificate")
    if server:
        g.add_argument(
            "--require-client-cert", action="store_true", help="refuse clients without one"
        )
        g.add_argument(
            "--request-client-cert", action="store_true",
            help="ask for a client certificate but accept clients without one",
        )
    g = p.add_argument_group("session")
    g.add_argument(
        "--ciphers", metavar="LIST",
        help="colon-separated TLS 1.3 suites (default: all three kTLS suites)",
    )
    g.add_argument("--groups", metavar="LIST", help="key-exchange groups, e.g. X25519:P-256")
    g.add_argument(
        "--record-layer", choices=("auto", "kernel", "user"), default="auto",
        help="kTLS (kernel), ktlsd's user-space record layer, or kTLS when available (auto)",
    )
    g.add_argument(
        "--key-update-every", metavar="BYTES", type=_size,
        help="send a KeyUpdate (update_requested) after every BYTES sent",
    )
    g.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS",
        help="handshake timeout (default 10)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no status lines on stderr")


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    try:
        value = int(t[:-1] if t[-1:] in units else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    c = subparsers.add_parser(
        "connect", help="TLS 1.3 client: handshake, then relay stdin/stdout",
        description="Connect to HOST:PORT, run a TLS 1.3 handshake with ktlsd's engine, hand "
        "the session to a record layer and relay stdin to the peer and the peer to stdout.",
    )
    c.add_argument("address", metavar="HOST:PORT")
    _add_tls_options(c, server=False)
    c.set_defaults(func=run_connect)

    s = subparsers.add_parser(
        "listen", help="TLS 1.3 server: accept, handshake, relay stdin/stdout",
        description="Listen on [HOST:]PORT, serve one connection (or --count N, --forever): "
        "handshake, hand the session to a record layer, relay stdin/stdout.",
    )
    s.add_argument("address", metavar="[HOST:]PORT")
    _add_tls_options(s, server=True)
    s.add_argument(
        "--count", type=_count, default=1, help="connections to serve (default 1)"
    )
    s.add_argument("--forever", action="store_true", help="keep serving connections")
    s.add_argument(
        "--www", action="store_true",
        help="answer each connection's HTTP request with a small page and close (like "
        "openssl s_server -www); stdin is not read",
    )
    s.add_argument(
        "--idle-timeout", type=_seconds, default=DEFAULT_IDLE_TIMEOUT, metavar="SECONDS",
        help="end a connection on which nothing was received or sent for SECONDS "
        f"(default {DEFAULT_IDLE_TIMEOUT:g}; 0: never)",
    )
    s.set_defaults(func=run_listen)


def parse_address(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise UsageError(f"address {text!r} needs HOST:PORT")
        host, port = default_host, text
    host = host.strip("[]") or (default_host or "")
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"port {number} out of range")
    return host, number


# --- configuration -------------------------------------------------------------------------


def _psk_text(args: argparse.Namespace) -> str | None:
    if args.psk and args.psk_file:
        raise UsageError("--psk and --psk-file exclude each other")
    if args.psk_file:
        try:
            with open(args.psk_file, encoding="ascii") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
            raise UsageError(f"--psk-file {args.psk_file}: {reason}") from None
    psk: str | None = args.psk
    return psk


def _psk_key(args: argparse.Namespace) -> PskKey | None:
    psk_text = _psk_text(args)
    if not psk_text:
        if args.psk_identity:
            raise UsageError("--psk-identity needs --psk or --psk-file")
        return None
    text = psk_text.strip()
    if text.startswith("NVMeTLSkey-1:"):
        from ktlsd.nvme import keys as nvme_keys

        try:
            parsed = nvme_keys.parse_interchange(text)
        except nvme_keys.KeyFormatError as exc:
            raise UsageError(f"--psk: {exc}") from None
        if args.psk_identity:
            identity, key = args.psk_identity, parsed.key
        else:
            if not (args.hostnqn and args.subsysnqn):
                raise UsageError(
                    "an NVMe interchange --psk needs --hostnqn and --subsysnqn "
                    "(or an explicit --psk-identity)"
                )
            variant = nvme_keys.Variant.COMPAT if args.compat else nvme_keys.Variant.SPEC
            derived = nvme_keys.derive_nvme_tls_key(
                parsed.key, parsed.hash_id, args.hostnqn, args.subsysnqn,
                version=args.identity_version, variant=variant,
            )
            identity, key = str(derived.identity), derived.tls_psk
    else:
        if not args.psk_identity:
            raise UsageError("--psk needs --psk-identity")
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise UsageError("--psk is neither hex nor an NVMeTLSkey-1 string") from None
        identity = args.psk_identity
        if not key:
            raise UsageError("--psk is empty")
    bound_to = args.psk_hash or psk_hash_for(identity, len(key))  # "sha256" or "sha384"
    hash_name: HashName = "sha384" if bound_to == "sha384" else "sha256"
    return PskKey(identity=identity.encode(), key=key, hash_name=hash_name)


def build_config(args: argparse.Namespace, role: Role, host: str | None) -> TlsConfig:
    suites = tuple(CipherSuite)
    if args.ciphers:
        try:
            suites = tuple(CipherSuite.from_name(n) for n in args.ciphers.split(":") if n)
        except ValueError as exc:
            raise UsageError(f"--ciphers: {exc}") from None
    credentials = None
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise UsageError("--cert and --key go together")
        credentials = X509Credentials.from_pem_files(args.cert, args.key)
    psk = _psk_key(args)
    common: dict[str, object] = {
        "role": role,
        "credentials": credentials,
        "truststore": args.ca,
        "crl": args.crl,
        "verify_peer": not args.no_verify,
        "ciphersuites": suites,
        "groups": args.groups,
    }
    if role is Role.CLIENT:
        peername = args.peername or (host if not psk else None)
        return TlsConfig(psk_keys=(psk,) if psk else (), peername=peername, **common)  # type: ignore[arg-type]
    if psk is None and credentials is None:
        raise UsageError("listen needs --psk/--psk-identity or --cert/--key")
    client_auth: ClientAuth = (
        "require" if args.require_client_cert
        else "request" if args.request_client_cert else "none"
    )

    def lookup(identity: bytes) -> PskKey | None:
        import hmac

        if psk is not None and hmac.compare_digest(identity, psk.identity):
            return psk
        return None

    return TlsConfig(
        psk_lookup=lookup if psk else None, client_auth=client_auth,
        peername=args.peername, **common,  # type: ignore[arg-type]
    )


# --- relay ---------------------------------------------------------------------------------


@dataclass
class RelayResult:
    sent: int = 0
    received: int = 0
    key_updates_sent: int = 0
    key_updates_received: int = 0


def _describe_session(session: Session) -> str:
    return (
        f"suite={session.suite.iana_name} group={session.group or '-'} "
        f"peer={session.peer.describe()}"
    )


class StdinPump:
    """The one reader of standard input for the whole process, shared by its connections.

    stdin may be a file, a pipe or a terminal, none of which asyncio can wait on portably,
    so a thread reads it. One thread for the process, not one per connection: with
    ``listen --count/--forever`` a per-connection thread left blocked in ``read`` when its
    connection ended would swallow the first line typed for the next connection. Chunks wait
    here until a connection takes them; at most :data:`STDIN_BACKLOG` chunks are read ahead,
    so a fast stdin never outruns the peer. End of input is sticky: every later ``get``
    returns ``b""`` at once.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._lock = threading.Lock()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._room = threading.Semaphore(STDIN_BACKLOG)
        # Connections of a listen serving several at once may all be waiting.
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._thread: threading.Thread | None = None

    def _read_loop(self) -> None:
        while True:
            self._room.acquire()
            try:
                data = os.read(self._fd, CHUNK) if self._fd >= 0 else b""
            except OSError:
                data = b""
            with self._lock:
                self._chunks.append(data)
                waiters, self._waiters = self._waiters, []
            for loop, future in waiters:
                # The loop may be gone (its connection ended): the chunk stays for the next.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_wake, future)
            if not data:
                return

    async def get(self) -> bytes:
        """The next chunk of stdin, ``b""`` at (and after) its end."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._read_loop, name="stdin", daemon=True)
            self._thread.start()
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if self._chunks:
                    if not self._chunks[0]:
                        return b""  # end of input stays queued for whoever comes next
                    self._room.release()
                    return self._chunks.popleft()
                future: asyncio.Future[None] = loop.create_future()
                self._waiters.append((loop, future))
            await future


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


STDIN_BACKLOG = 64
_stdin_pump: StdinPump | None = None


def _stdin() -> StdinPump:
    global _stdin_pump
    if _stdin_pump is None:
        _stdin_pump = StdinPump(sys.stdin.fileno() if sys.stdin is not None else -1)
    return _stdin_pump


class IdleTimeout(OSError):
    """Nothing was received or sent on the connection for ``--idle-timeout`` seconds."""

    def __init__(self, seconds: float) -> None:
        super().__init__(errno.ETIMEDOUT, f"idle for {seconds:g} s: nothing received or sent")

    def __str__(self) -> str:
        return str(self.strerror)


def _receiver(conn: TlsConnection, idle: float | None) -> Callable[[], Awaitable[bytes]]:
    """``conn.arecv`` that raises :class:`IdleTimeout` after ``idle`` seconds without traffic.

    Traffic is either direction: a peer that only reads what we stream to it is not idle.
    """

    def moved() -> int:
        return int(conn.bytes_sent + conn.bytes_received + conn.key_updates_sent)

    async def recv() -> bytes:
        while True:
            before = moved()
            try:
                return await asyncio.wait_for(conn.arecv(65536), idle)
            except TimeoutError:
                if moved() == before:
                    raise IdleTimeout(idle or 0) from None

    return recv


async def _close(conn: TlsConnection) -> None:
    """close_notify (nothing after a fatal error), without waiting forever for a stuck peer."""
    with contextlib.suppress(OSError, TimeoutError):
        await asyncio.wait_for(conn.aclose(), CLOSE_TIMEOUT)


def _open_connection(
    sock: socket.socket, session: Session, args: argparse.Namespace
) -> TlsConnection:
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


async def relay(sock: socket.socket, session: Session, args: argparse.Namespace) -> RelayResult:
    """Hand ``session`` to a record layer on ``sock`` and relay stdin/stdout until EOF.

    Any failure of the connection ends the relay at once (stdin is not waited for); after a
    fatal error no close_notify is sent.
    """
    conn = _open_connection(sock, session, args)
    result = RelayResult()
    out = sys.stdout.buffer
    stdin = _stdin()
    recv = _receiver(conn, _idle_timeout(args))

    every = args.key_update_every

    async def pump_out() -> None:
        while True:
            data = await stdin.get()
            if not data:
                await conn.aclose()  # close_notify; reading goes on
                return
            while data:
                # Cut at multiples of --key-update-every so that each key protects exactly
                # BYTES, whatever sizes the reads from stdin happen to return; the
                # connection then sends its KeyUpdate before the first byte past the mark.
                piece = data[: every - result.sent % every] if every else data
                await conn.asend(piece)
                result.sent += len(piece)
                data = data[len(piece) :]

    async def next_data() -> bytes:
        # While stdin is still being sent, a failed send ends the relay as well.
        if sender.done():
            return await recv()
        receiving = asyncio.ensure_future(recv())
        await asyncio.wait({receiving, sender}, return_when=asyncio.FIRST_COMPLETED)
        if sender.done() and sender.exception() is not None and not receiving.done():
            receiving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await receiving
            await sender  # raises its error
        return await receiving

    sender = asyncio.create_task(pump_out())
    try:
        while True:
            data = await next_data()
            if not data:
                break
            out.write(data)
            out.flush()
            result.received += len(data)
        # The peer's close_notify ends only its direction (RFC 8446 §6.1): keep relaying our
        # stdin until it ends too — unless a person is typing at a terminal.
        if not sender.done() and sys.stdin is not None and sys.stdin.isatty():
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            await conn.aclose()
        else:
            await sender  # propagate its errors
    finally:
        if not sender.done():
            sender.cancel()
        result.key_updates_sent = conn.key_updates_sent
        result.key_updates_received = conn.key_updates_received
        await _close(conn)
    return result


def _www_page(request: bytes, session: Session) -> bytes:
    """The answer of ``listen --www``: a small HTTP/1.0 response, no secrets."""
    line = request.split(b"\n", 1)[0].strip()
    if len(request) > MAX_WWW_REQUEST:
        status = "413 Request Entity Too Large"
    elif line.startswith((b"GET ", b"HEAD ")):
        status = "200 OK"
    else:
        status = "400 Bad Request"
    body = (
        f"ktlsd {status.split(' ', 1)[1]}\n"
        f"protocol=TLSv1.3 {_describe_session(session)}\n"
    ).encode("utf-8", "replace")
    head = (
        f"HTTP/1.0 {status}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head + (b"" if line.startswith(b"HEAD ") else body)


def _request_complete(request: bytes) -> bool:
    return b"\r\n\r\n" in request or b"\n\n" in request or len(request) > MAX_WWW_REQUEST


async def answer_www(
    sock: socket.socket, session: Session, args: argparse.Namespace
) -> RelayResult:
    """Read one HTTP request head, answer it in one record, close with close_notify.

    Then read on until the peer's close_notify (or TCP EOF), so that the peer's own
    close_notify never meets a closed socket, whose reset could destroy our answer in flight.
    """
    conn = _open_connection(sock, session, args)
    result = RelayResult()
    recv = _receiver(conn, _idle_timeout(args))
    try:
        request = b""
        while not _request_complete(request):
            data = await recv()
            if not data:
                break
            request += data
        result.received = len(request)
        if request:
            page = _www_page(request, session)
            await conn.asend(page)
            result.sent = len(page)
        await conn.aclose()
        while data := await recv():
            result.received += len(data)
    finally:
        result.key_updates_sent = conn.key_updates_sent
        result.key_updates_received = conn.key_updates_received
        await _close(conn)
    return result


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
    _say(args, f"handshake ok: {_describe_session(session)}")
    try:
        if getattr(args, "www", False):
            result = await answer_www(sock, session, args)
        else:
            result = await relay(sock, session, args)
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
    _say(
        args,
        f"closed: sent={result.sent} received={result.received} "
        f"key_updates_sent={result.key_updates_sent} "
        f"key_updates_received={result.key_updates_received}",
    )
    return 0


def run_connect(args: argparse.Namespace) -> int:
    try:
        host, port = parse_address(args.address)
        config = build_config(args, Role.CLIENT, host)
    except UsageError as exc:
        _fail(str(exc))
        return 2
    except HandshakeError as exc:
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
        config = build_config(args, Role.SERVER, None)
    except UsageError as exc:
        _fail(str(exc))
        return 2
    except HandshakeError as exc:
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
