"""Real TLS peer processes for tests: openssl s_server/s_client, gnutls-serv/gnutls-cli, tlslite-ng.

Every peer is a child process whose output is collected by a thread, so a test can wait for a
line (:meth:`Peer.wait_for`) or read everything it printed. Servers are started on a free
loopback port and returned only once they print their "listening" line. Peers are always reaped:
use them as context managers (``with openssl_server(...) as peer:``); :meth:`Peer.close`
terminates, then kills (:class:`tests.processes.ChildProcess`).

The tlslite-ng peer is ``tests/tlslite_peers.py`` run as a script (``tlslite-server ...``):
a small independent TLS 1.3 implementation that does external PSKs with SHA-384, which neither
GnuTLS 3.7 nor the openssl CLI can do. After its handshake it echoes back one application record
(upper-cased), which lets a test prove that ktlsd's traffic secrets are right.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from tests.processes import ChildProcess

READY_TIMEOUT = 10.0
TLSLITE_SCRIPT = str(Path(__file__).with_name("tlslite_peers.py"))


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Peer(ChildProcess):
    """A child process with its combined stdout/stderr collected in the background."""

    def __init__(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, name: str | None = None
    ) -> None:
        super().__init__(
            argv,
            name=name or Path(argv[0]).name,
            merge_stderr=True,
            env={**os.environ, **(env or {})},
        )

    def output(self) -> str:
        return self.snapshot(self.out)

    def wait_for(self, text: str, timeout: float = READY_TIMEOUT) -> str:
        """Wait until the output contains ``text``; return the output so far."""
        self.wait_output(
            lambda: text.encode() in self.out,
            lambda: f"{self.name} never printed {text!r}; output:\n{self.output()}",
            timeout,
        )
        return self.output()

    def send(self, data: bytes) -> None:
        """Write to the peer's stdin (openssl/gnutls send it as application data)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait_exit(self, timeout: float = READY_TIMEOUT) -> int:
        return super().wait_exit(timeout)


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
        TLSLITE_SCRIPT,
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
        TLSLITE_SCRIPT,
        "tlslite-client",
        str(port),
        identity.hex(),
        key.hex(),
        hash_name,
    ]
    return Peer(argv, name="tlslite-client")
