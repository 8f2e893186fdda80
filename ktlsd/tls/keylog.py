"""Key logs for debugging: a session's TLS secrets in the NSS key log format, for Wireshark.

A key log lets anyone who holds it decrypt every session it lists, so it is written only when
asked for: by ``SSLKEYLOGFILE`` for ``ktlsd connect``/``listen`` (as other TLS tools do), and
for the agent only by ``[ktlsd] key_log_file`` in its configuration (never by a consumer;
the agent warns at start and in every handshake's log line). The secrets go to that file and
nowhere else.

Format (NSS, one line per secret: ``LABEL <client random, hex> <secret, hex>``): the lines
OpenSSL's keylog callback gives the engine -- the one capture per handshake in
:mod:`ktlsd.tls._openssl`, which keeps all lines for a connection whose configuration has a
key log (:attr:`~ktlsd.tls.handshake.TlsConfig.key_log`): ``CLIENT_HANDSHAKE_TRAFFIC_SECRET``,
``SERVER_HANDSHAKE_TRAFFIC_SECRET``, ``CLIENT_TRAFFIC_SECRET_0``, ``SERVER_TRAFFIC_SECRET_0``,
``EXPORTER_SECRET``. They are written when the handshake ends, successful or not (a failed
handshake's handshake secrets help debug it). After KeyUpdates, ``connect``/``listen`` add
the ``CLIENT_TRAFFIC_SECRET_N``/``SERVER_TRAFFIC_SECRET_N`` lines when the connection ends
(:meth:`KeyLogFile.write_key_updates`); Wireshark derives them from ``_0`` on its own anyway.

The file (:meth:`KeyLogFile.write`), opened for every write so that a worker process, a
reload or a removed file need nothing special:

* ``open(O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC | O_NOCTTY | O_NONBLOCK,
  0600)``: a symbolic link is never followed, a FIFO without a reader never blocks;
* the opened descriptor is checked (``fstat``), not the path: it must be a regular file with
  one link, owned by this process's effective uid, and readable by nobody else (no group or
  other permission bits); anything else is refused with a one-line :class:`KeyLogError`;
* the lines go out in one ``write`` (``O_APPEND``: lines from concurrent handshakes and
  processes never interleave).

Writing is a few system calls on a local file per handshake, made only while key logging is
on (a debugging setting); they run where the handshake runs, on its event loop.
"""

from __future__ import annotations

import collections
import hashlib
import os
import stat
import threading

from ktlsd.tls.session import Role, Session

__all__ = ["ENV_KEY_LOG", "KeyLogError", "KeyLogFile", "key_log_from_environment"]

ENV_KEY_LOG = "SSLKEYLOGFILE"

_OPEN_FLAGS = (
    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
    | os.O_NONBLOCK
)
_MODE = 0o600
_REMEMBERED_SESSIONS = 1024  # client randoms kept for write_key_updates, at most


class KeyLogError(Exception):
    """The key log file cannot be used; ``str()`` is one line naming the file and why."""


class KeyLogFile:
    """Where TLS secrets are written for debugging (see the module docstring). The object
    holds the path only (``repr`` shows it); it is shared by every handshake of a
    configuration, across threads."""

    def __init__(self, path: str) -> None:
        if not path:
            raise KeyLogError("key log file: empty path")
        self.path = path
        self._lock = threading.Lock()
        # sha256(CLIENT_TRAFFIC_SECRET_0) -> client random (hex), for write_key_updates.
        self._randoms: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()

    def __repr__(self) -> str:
        return f"KeyLogFile({self.path!r})"

    def _open(self) -> int:
        try:  # never even open a device or FIFO (the descriptor is checked below anyway)
            found = os.lstat(self.path)
        except OSError:
            found = None
        if found is not None and not (stat.S_ISREG(found.st_mode) or stat.S_ISLNK(found.st_mode)):
            raise KeyLogError(f"key log file {self.path} is not a regular file")
        try:
            fd = os.open(self.path, _OPEN_FLAGS, _MODE)
        except OSError as exc:
            raise KeyLogError(f"key log file {self.path}{_reason(exc)}") from None
        try:
            self._check_fd(fd)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _check_fd(self, fd: int) -> None:
        info = os.fstat(fd)
        what = f"key log file {self.path}"
        if not stat.S_ISREG(info.st_mode):
            raise KeyLogError(f"{what} is not a regular file")
        if info.st_uid != os.geteuid():
            raise KeyLogError(f"{what} belongs to uid {info.st_uid}, not to us "
                              f"(uid {os.geteuid()})")
        if info.st_mode & 0o077:
            raise KeyLogError(
                f"{what} has mode {stat.S_IMODE(info.st_mode):04o}: others may read it "
                "(chmod 600 it, or remove it and let it be created 0600)"
            )
        if info.st_nlink != 1:
            raise KeyLogError(f"{what} has {info.st_nlink} links")

    def check(self) -> None:
        """Open (creating it 0600 if needed) and check the file now, so that a problem shows
        at start; raises :class:`KeyLogError`."""
        os.close(self._open())

    def write(self, lines: list[bytes]) -> None:
        """Append NSS key log ``lines`` (without their newlines) in one write; raises
        :class:`KeyLogError` (the message never holds a secret)."""
        if not lines:
            return
        data = b"".join(line + b"\n" for line in lines)
        with self._lock:
            fd = self._open()
            try:
                written = os.write(fd, data)
            except OSError as exc:
                raise KeyLogError(f"key log file {self.path}{_reason(exc)}") from None
            finally:
                os.close(fd)
        if written != len(data):
            raise KeyLogError(f"key log file {self.path}: short write ({written} bytes)")

    def write_handshake(self, lines: list[bytes]) -> None:
        """:meth:`write` the lines one handshake captured, remembering its client random for
        :meth:`write_key_updates`."""
        for line in lines:
            fields = line.split(b" ")
            if len(fields) == 3 and fields[0] == b"CLIENT_TRAFFIC_SECRET_0":
                try:
                    secret = bytes.fromhex(fields[2].decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    continue
                with self._lock:
                    self._randoms[hashlib.sha256(secret).digest()] = fields[1]
                    while len(self._randoms) > _REMEMBERED_SESSIONS:
                        self._randoms.popitem(last=False)
        self.write(lines)

    def write_key_updates(self, session: Session, sent: int, received: int) -> None:
        """After ``sent``/``received`` KeyUpdates on a connection that started with
        ``session`` (generation 0), write the ``*_TRAFFIC_SECRET_1..N`` lines."""
        from ktlsd.tls.keyschedule import next_traffic_secret  # (cryptography: only here)

        with self._lock:
            random = self._randoms.pop(hashlib.sha256(session.client_secret).digest(), None)
        if random is None or not (sent or received):
            return
        client_updates, server_updates = (
            (sent, received) if session.role is Role.CLIENT else (received, sent)
        )
        lines: list[bytes] = []
        for label, secret, count in ((b"CLIENT_TRAFFIC_SECRET_", session.client_secret,
                                      client_updates),
                                     (b"SERVER_TRAFFIC_SECRET_", session.server_secret,
                                      server_updates)):
            for generation in range(1, count + 1):
                secret = next_traffic_secret(session.suite, secret)
                lines.append(b"%s%d %s %s" % (label, generation, random,
                                              secret.hex().encode()))
        self.write(lines)


def _reason(exc: OSError) -> str:
    """What follows the file's name in a :class:`KeyLogError`."""
    import errno

    if exc.errno == errno.ELOOP:
        return " is a symbolic link (not followed)"
    if exc.errno == errno.ENXIO:
        return " is a FIFO or socket nobody reads"
    return f": {exc.strerror or exc}"


def key_log_from_environment(environ: dict[str, str] | None = None) -> KeyLogFile | None:
    """The key log ``$SSLKEYLOGFILE`` names (unset or empty: None)."""
    path = (os.environ if environ is None else environ).get(ENV_KEY_LOG, "")
    return KeyLogFile(path) if path else None
