"""Helpers for the ``ktlsd connect`` / ``ktlsd listen`` tests: processes with separate streams.

:mod:`tests.peers` merges a peer's stdout and stderr, which is right for waiting on status
lines but wrong for relay tests, where stdout carries the application data that must come
out byte-exact. :class:`Proc` keeps the two apart, lets a test wait until stdout has N bytes
or stderr contains a line, and writes stdin from a thread so that a full pipe never blocks
the test while the other side's output is waiting to be read.

:func:`ktlsd` builds the argv for ``python -m ktlsd ...`` (the tools as a user runs them).
:func:`exchange` is the shape of every relay test: both ends get 1 MiB on stdin, each must
print exactly what the other was given, then the sides close and must exit 0.
:class:`RawTlsPeer` is the peer for fatal-error tests: tlslite-ng runs a real handshake, then
records are written and read raw, so a test can send what no TLS library would and see every
record that comes back, alerts included.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from tests.peers import TLSLITE_SCRIPT
from tests.processes import ChildProcess

TIMEOUT = 30.0
MIB = 1 << 20


def text_data(size: int = MIB) -> bytes:
    """At least ``size`` bytes of random base64 text in 76-character lines.

    For peers that handle lines rather than bytes (gnutls-serv --echo) or that read commands
    from stdin (openssl without -quiet).
    """
    return base64.encodebytes(os.urandom(size * 3 // 4 + 3))


def digit_data(size: int) -> bytes:
    """``size`` bytes of random decimal digits in 76-character lines.

    Safe to type into an interactive ``openssl s_client``/``s_server``: OpenSSL 3.0 takes the
    first byte of every read from stdin as a possible command (Q, R, k, K, c, ...), and reads
    split the stream anywhere; a digit is never a command.
    """
    digits = bytes(48 + b % 10 for b in os.urandom(size))
    lines = [digits[i : i + 75] + b"\n" for i in range(0, size, 75)]
    return b"".join(lines)[:size]


def ktlsd(*args: str) -> list[str]:
    """argv running the installed ktlsd package with this interpreter."""
    return [sys.executable, "-m", "ktlsd", *args]


_STDIN_MODES = {True: subprocess.PIPE, False: subprocess.DEVNULL}


class Proc(ChildProcess):
    """A child process whose stdout and stderr are collected separately in the background."""

    def __init__(
        self, argv: Sequence[str], *, name: str | None = None, stdin: bool | int = True
    ) -> None:
        """``stdin``: True for a pipe (:meth:`feed`), False for /dev/null, or an fd to pass."""
        argv = list(argv)
        is_ktlsd = argv[1:3] == ["-m", "ktlsd"]
        super().__init__(
            argv,
            name=name or ("ktlsd" if is_ktlsd else os.path.basename(argv[0])),
            stdin=_STDIN_MODES[stdin] if isinstance(stdin, bool) else stdin,
        )
        self._writer: threading.Thread | None = None

    # -- waiting ---------------------------------------------------------------------------

    def wait_for(self, done: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        """Wait until ``done()`` (called with the output lock held) is true."""
        self.wait_output(
            done,
            lambda: (
                f"{self.name} never {what}; rc={self.proc.poll()} "
                f"stdout={len(self.out)} bytes, stderr:\n{self.stderr_text}"
            ),
            timeout,
        )

    def wait_stdout_bytes(self, count: int, timeout: float = TIMEOUT) -> None:
        self.wait_for(lambda: len(self.out) >= count, f"printed {count} bytes", timeout)

    def wait_stdout(self, text: bytes, timeout: float = TIMEOUT) -> None:
        self.wait_for(lambda: text in self.out, f"printed {text!r} on stdout", timeout)

    def wait_stderr(self, pattern: str, timeout: float = TIMEOUT) -> re.Match[str]:
        """Wait until stderr matches the regular expression ``pattern``; return the match."""
        found: list[re.Match[str]] = []

        def done() -> bool:
            m = re.search(pattern, self.err.decode("utf-8", "replace"))
            if m:
                found.append(m)
            return m is not None

        self.wait_for(done, f"matched {pattern!r} on stderr", timeout)
        return found[0]

    @property
    def stderr_text(self) -> str:
        return self.snapshot(self.err)

    # -- stdin -----------------------------------------------------------------------------

    def feed(self, data: bytes, *, close: bool = False) -> None:
        """Write ``data`` to stdin from a thread (a full pipe must not block the test)."""
        self.join_feed()

        def write() -> None:
            assert self.proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ValueError, OSError):
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
                if close:
                    self.proc.stdin.close()

        self._writer = threading.Thread(target=write, daemon=True)
        self._writer.start()

    def type(self, data: bytes) -> None:
        """Write a little to stdin right now (an interactive command)."""
        self.join_feed()
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def join_feed(self, timeout: float = TIMEOUT) -> None:
        if self._writer is not None:
            self._writer.join(timeout)
            assert not self._writer.is_alive(), f"{self.name} stopped reading its stdin"
            self._writer = None

    def close_stdin(self) -> None:
        self.join_feed()
        with contextlib.suppress(BrokenPipeError, OSError):
            if self.proc.stdin is not None:
                self.proc.stdin.close()

    # -- ending ----------------------------------------------------------------------------

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        try:
            return super().wait_exit(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{self.name} did not exit within {timeout}s; stderr:\n{self.stderr_text}"
            ) from None


def start_ktlsd_listen(*args: str, name: str = "ktlsd-listen") -> tuple[Proc, int]:
    """``ktlsd listen 127.0.0.1:0 ...``; returns the process and the port it printed."""
    proc = Proc(ktlsd("listen", "127.0.0.1:0", *args), name=name)
    try:
        m = proc.wait_stderr(r"listening on \S+:(\d+)\n")
    except BaseException:
        proc.close()
        raise
    return proc, int(m.group(1))


@dataclass
class Exchange:
    """What :func:`exchange` checked, for further assertions by the test."""

    to_ktlsd: bytes
    to_peer: bytes


def exchange(
    ktlsd_proc: Proc,
    peer: Proc,
    *,
    size: int = MIB,
    peer_data: bytes | None = None,
    ktlsd_data: bytes | None = None,
    echo: bool = False,
    rounds: int = 1,
    ktlsd_closes: bool = True,
) -> Exchange:
    """Relay ``size`` bytes each way between ``ktlsd_proc`` and ``peer`` and check them.

    Both stdins are written at the same time (from threads), both stdouts are collected; the
    sides are closed only after each received everything, so no data races the close. Then
    ktlsd's stdin is closed (close_notify; or the peer's with ``ktlsd_closes=False``) and the
    other side must follow. With ``echo`` the peer sends back what it receives (gnutls-serv
    --echo): ktlsd must then print exactly its own input, which proves both directions.

    ``rounds`` > 1 sends the data in that many steps, each waiting until both sides received
    the previous one. Loopback buffers hold megabytes, so in one step a peer may write all
    its data before it reads anything; in steps, each side writes again only after reading
    what the other sent — including any KeyUpdate request, which it must then answer.
    """
    to_peer = ktlsd_data if ktlsd_data is not None else os.urandom(size)
    to_ktlsd = to_peer if echo else (peer_data if peer_data is not None else os.urandom(size))
    step_out = -(-len(to_peer) // rounds)
    step_in = -(-len(to_ktlsd) // rounds)
    for r in range(rounds):
        ktlsd_proc.feed(to_peer[r * step_out : (r + 1) * step_out])
        if not echo:
            peer.feed(to_ktlsd[r * step_in : (r + 1) * step_in])
        ktlsd_proc.wait_stdout_bytes(min(len(to_ktlsd), (r + 1) * step_in))
        if not echo:
            peer.wait_stdout_bytes(min(len(to_peer), (r + 1) * step_out))
    assert bytes(ktlsd_proc.out) == to_ktlsd, "ktlsd printed other bytes"
    if not echo:
        assert bytes(peer.out[: len(to_peer)]) == to_peer, f"{peer.name} printed other bytes"
    if ktlsd_closes:
        ktlsd_proc.close_stdin()
    else:
        peer.close_stdin()
    return Exchange(to_ktlsd=to_ktlsd, to_peer=to_peer)


def tlslite_echo(mode: str, port: int, identity: bytes, key: bytes, hash_name: str) -> Proc:
    """tlslite-ng as a TLS 1.3 external-PSK echo peer (``mode`` "server" or "client").

    It sends back every application record it reads until the peer's close_notify, then
    closes in turn and exits 0. Being pure Python, it is an implementation independent of
    OpenSSL and GnuTLS, and the one here that does SHA-384 PSKs. The key travels on argv
    (hex): it is a throwaway made by the test.
    """
    argv = [sys.executable, TLSLITE_SCRIPT, "tlslite-echo", mode, str(port), identity.hex(),
            key.hex(), hash_name]  # fmt: skip
    return Proc(argv, name=f"tlslite-{mode}")


_RAW_SUITES = {  # tlslite-ng's cipher suite number -> (AEAD, key length, hash)
    0x1301: (AESGCM, 16, hashes.SHA256),
    0x1302: (AESGCM, 32, hashes.SHA384),
    0x1303: (ChaCha20Poly1305, 32, hashes.SHA256),
}


class _RawKeys:
    """One direction's record protection, derived here (RFC 8446 §7.3), not by ktlsd."""

    def __init__(self, suite: int, secret: bytes) -> None:
        aead, key_size, hash_type = _RAW_SUITES[suite]

        def expand(label: bytes, length: int) -> bytes:
            full = b"tls13 " + label
            info = length.to_bytes(2, "big") + bytes((len(full),)) + full + b"\x00"
            return HKDFExpand(hash_type(), length, info).derive(secret)

        self.aead = aead(expand(b"key", key_size))
        self.iv = expand(b"iv", 12)
        self.seq = 0

    def nonce(self) -> bytes:
        nonce = (int.from_bytes(self.iv, "big") ^ self.seq).to_bytes(12, "big")
        self.seq += 1
        return nonce


class RawTlsPeer:
    """A TLS 1.3 peer (external PSK) whose records after the handshake are raw.

    tlslite-ng (independent of OpenSSL and of ktlsd) runs the handshake and hands over its
    application traffic secrets; from there :meth:`send` protects whatever inner content type
    and bytes a test wants (or :meth:`send_raw` puts any bytes on the wire), and
    :meth:`read_records` decrypts everything the other side sends until it closes TCP.
    """

    def __init__(self, sock: socket.socket, *, server: bool, settings_psk: tuple) -> None:  # type: ignore[type-arg]
        from tlslite.api import HandshakeSettings, TLSConnection

        settings = HandshakeSettings()
        settings.minVersion = settings.maxVersion = (3, 4)
        settings.pskConfigs = [settings_psk]
        settings.ticket_count = 0
        sock.settimeout(TIMEOUT)
        self.sock = sock
        conn = TLSConnection(sock)
        if server:
            conn.handshakeServer(settings=settings)
        else:
            conn.handshakeClientCert(settings=settings)
        session = conn.session
        ours, theirs = session.cl_app_secret, session.sr_app_secret
        if server:
            ours, theirs = theirs, ours
        self._tx = _RawKeys(session.cipherSuite, bytes(ours))
        self._rx = _RawKeys(session.cipherSuite, bytes(theirs))

    @classmethod
    def connect(cls, port: int, identity: bytes, key: bytes) -> RawTlsPeer:
        sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        return cls(sock, server=False, settings_psk=(identity, key, "sha256"))

    @classmethod
    def accept(cls, listener: socket.socket, identity: bytes, key: bytes) -> RawTlsPeer:
        listener.settimeout(TIMEOUT)
        sock, _ = listener.accept()
        return cls(sock, server=True, settings_psk=(identity, key, "sha256"))

    def seal(self, content_type: int, data: bytes, *, padding: int = 0) -> bytes:
        inner = data + bytes((content_type,)) + bytes(padding)
        header = b"\x17\x03\x03" + (len(inner) + 16).to_bytes(2, "big")
        return header + self._tx.aead.encrypt(self._tx.nonce(), inner, header)

    def send(self, content_type: int, data: bytes, *, padding: int = 0) -> None:
        self.sock.sendall(self.seal(content_type, data, padding=padding))

    def send_raw(self, wire: bytes) -> None:
        self.sock.sendall(wire)

    def read_records(self) -> list[tuple[int, bytes]]:
        """Every record received until the other side closes TCP: ``(content_type, data)``."""
        stream = bytearray()
        while chunk := self.sock.recv(65536):
            stream += chunk
        records = []
        while stream:
            assert len(stream) >= 5, f"{len(stream)} stray bytes after the last record"
            header, length = bytes(stream[:5]), int.from_bytes(stream[3:5], "big")
            assert header[:3] == b"\x17\x03\x03", f"unprotected record header {header.hex()}"
            assert len(stream) >= 5 + length, "connection closed in the middle of a record"
            body = bytes(stream[5 : 5 + length])
            del stream[: 5 + length]
            inner = self._rx.aead.decrypt(self._rx.nonce(), body, header).rstrip(b"\x00")
            records.append((inner[-1], inner[:-1]))
        return records

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawTlsPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
