"""Real TLS peer processes for tests: openssl s_server/s_client, gnutls-serv/gnutls-cli, tlslite-ng.

Every peer is a child process whose output is collected by a thread, so a test can wait for a
line (:meth:`Peer.wait_for`) or read everything it printed. Servers are started on a free
loopback port and returned only once they print their "listening" line. Peers are always reaped:
use them as context managers (``with openssl_server(...) as peer:``); :meth:`Peer.close`
terminates, then kills.

The tlslite-ng peer is this file run as a script (``python tests/peers.py tlslite-server ...``):
a small independent TLS 1.3 implementation that does external PSKs with SHA-384, which neither
GnuTLS 3.7 nor the openssl CLI can do. After its handshake it echoes back one application record
(upper-cased), which lets a test prove that ktlsd's traffic secrets are right.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

READY_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peer:
    """A child process with its combined stdout/stderr collected in the background."""

    def __init__(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, name: str | None = None
    ) -> None:
        self.argv = list(argv)
        self.name = name or Path(argv[0]).name
        self._buf = bytearray()
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            chunk = self.proc.stdout.read1(65536)
            with self._cond:
                if not chunk:
                    self._cond.notify_all()
                    return
                self._buf += chunk
                self._cond.notify_all()

    def output(self) -> str:
        with self._cond:
            return self._buf.decode("utf-8", "replace")

    def wait_for(self, text: str, timeout: float = READY_TIMEOUT) -> str:
        """Wait until the output contains ``text``; return the output so far."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while text.encode() not in self._buf:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    out = self._buf.decode("utf-8", "replace")
                    raise AssertionError(f"{self.name} never printed {text!r}; output:\n{out}")
                self._cond.wait(min(remaining, 0.1))
            return self._buf.decode("utf-8", "replace")

    def send(self, data: bytes) -> None:
        """Write to the peer's stdin (openssl/gnutls send it as application data)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float = READY_TIMEOUT) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        self._reader.join(3)
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ServerPeer(Peer):
    port: int


def _server(argv: list[str], port: int, ready: str, **kw: object) -> ServerPeer:
    peer = ServerPeer(argv, **kw)  # type: ignore[arg-type]
    peer.port = port
    try:
        peer.wait_for(ready)
    except BaseException:
        peer.close()
        raise
    return peer


def openssl_server(*args: str, port: int | None = None) -> ServerPeer:
    """``openssl s_server`` limited to TLS 1.3 on 127.0.0.1; extra ``args`` as for s_server."""
    port = port or free_port()
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", *args]
    return _server(argv, port, "ACCEPT", name="s_server")


def openssl_client(port: int, *args: str) -> Peer:
    """``openssl s_client`` to 127.0.0.1:port, TLS 1.3 only."""
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", *args]
    return Peer(argv, name="s_client")


GNUTLS_TLS13 = "NORMAL:-VERS-ALL:+VERS-TLS1.3"
GNUTLS_TLS13_PSK = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+ECDHE-PSK:+DHE-PSK:+PSK"


def gnutls_server(
    *args: str, port: int | None = None, env: dict[str, str] | None = None
) -> ServerPeer:
    """``gnutls-serv --echo`` on a free port (it listens on all addresses)."""
    port = port or free_port()
    argv = ["gnutls-serv", "--echo", "-p", str(port), *args]
    # It prints "...done" once the IPv4 socket is listening.
    return _server(argv, port, f"IPv4 0.0.0.0 port {port}...done", name="gnutls-serv", env=env)


def gnutls_client(port: int, *args: str, env: dict[str, str] | None = None) -> Peer:
    argv = ["gnutls-cli", "-p", str(port), *args, "127.0.0.1"]
    return Peer(argv, name="gnutls-cli", env=env)


def tlslite_server(
    identity: bytes, key: bytes, hash_name: str, *, port: int | None = None
) -> ServerPeer:
    """A tlslite-ng TLS 1.3 server with one external PSK; echoes one record upper-cased."""
    port = port or free_port()
    argv = [
        sys.executable,
        __file__,
        "tlslite-server",
        str(port),
        identity.hex(),
        key.hex(),
        hash_name,
    ]
    return _server(argv, port, "READY", name="tlslite-server")


def tlslite_client(port: int, identity: bytes, key: bytes, hash_name: str) -> Peer:
    """A tlslite-ng TLS 1.3 client with one external PSK; echoes one record upper-cased."""
    argv = [
        sys.executable,
        __file__,
        "tlslite-client",
        str(port),
        identity.hex(),
        key.hex(),
        hash_name,
    ]
    return Peer(argv, name="tlslite-client")


def _tlslite_main(argv: list[str]) -> int:
    """Entry point of the tlslite-ng peer process."""
    from tlslite.api import HandshakeSettings, TLSConnection

    mode, port_text, identity_hex, key_hex, hash_name = argv
    settings = HandshakeSettings()
    settings.minVersion = (3, 4)
    settings.maxVersion = (3, 4)
    settings.pskConfigs = [(bytes.fromhex(identity_hex), bytes.fromhex(key_hex), hash_name)]
    settings.ticket_count = 0
    if mode == "tlslite-server":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", int(port_text)))
        listener.listen(1)
        print("READY", flush=True)
        sock, _ = listener.accept()
        listener.close()
        conn = TLSConnection(sock)
        conn.handshakeServer(settings=settings)
    else:
        sock = socket.create_connection(("127.0.0.1", int(port_text)))
        conn = TLSConnection(sock)
        conn.handshakeClientCert(settings=settings)
    print("HANDSHAKE-OK", conn.getCipherName(), flush=True)
    data = conn.read(max=16384)
    print("GOT", bytes(data).hex(), flush=True)
    conn.write(bytes(data).upper())
    with contextlib.suppress(Exception):
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(_tlslite_main(sys.argv[1:]))
