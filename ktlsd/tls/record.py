"""The TLS 1.3 record layer after the handshake, with the kernel's kTLS semantics.

A :class:`RecordLayer` protects records on a connected stream socket with the traffic keys of
a :class:`~ktlsd.tls.session.Session`. Two implementations share one API and one behaviour:

* :class:`KernelRecordLayer` hands the keys to kTLS (:mod:`ktlsd.tls.ktls`): the kernel encrypts
  and decrypts, we only label non-data records.
* :class:`UserRecordLayer` does the same work in user space with ``cryptography``'s AEADs,
  for kernels without kTLS (or without kTLS rekey), for tests, and as a reference.

The semantics follow what Linux kTLS does, so code above (:mod:`ktlsd.tls.connection`) cannot
tell the two apart:

* ``send(data, content_type)`` emits one record per call (at most 2^14 bytes); TX never pauses.
* ``recv()`` returns one :class:`Record`. Application data, handshake and other records come
  back with their content type; alerts never do: close_notify becomes the end-of-stream
  record (``Record(23, b"")``, ``.eof`` is true), user_canceled is skipped and any other alert
  raises :class:`AlertReceived`. Zero-length application data records are skipped so that
  empty data always means end of stream.
* Once a handshake record whose first byte is a KeyUpdate (24) has been delivered, every
  further ``recv`` raises ``OSError(EKEYEXPIRED)`` until ``install_rx_key`` — exactly the
  kernel's check (``tls_check_pending_rekey``), which looks at that first byte only.
* A record that fails authentication raises ``OSError(EBADMSG)``; an oversized one
  ``OSError(EMSGSIZE)``. Both are sticky, as the kernel's socket error is.

Fatal errors (RFC 8446 §6): when a received record breaks the protocol — it fails
authentication, overflows, has no or an unexpected content type, holds a malformed alert —
the layer sends the matching fatal alert (bad_record_mac, record_overflow, unexpected_message,
decode_error) exactly once and shuts down its write side; it never sends close_notify after
that. A fatal alert from the peer, or a connection cut in the middle of a record, ends the
connection the same way without an alert of ours. :meth:`RecordLayer.abort` does the same for
errors found above the record layer (a bad KeyUpdate in :mod:`ktlsd.tls.connection`). From then
on the connection is unusable: ``recv`` raises the error again and ``send`` raises
``BrokenPipeError``. The alert goes out at once unless another thread or task is in the middle
of sending a record; that sender sends it right after its record, so bytes never interleave.
With kTLS the alert is best effort: the kernel may refuse to send after its own receive error.

Differences that remain: the kernel may merge consecutive application data records into one
``recv`` (stream semantics), and only the user layer can report :meth:`pending` plaintext.

Blocking and asyncio: ``send``/``recv`` are for blocking sockets (or sockets with a timeout).
``asend``/``arecv``/``aclose`` are the asyncio versions and need a non-blocking socket
(``sock.setblocking(False)``); they share every line of protocol logic with the blocking
methods and differ only in how they wait for the socket. The user layer reads exactly one
record's bytes off the socket at a time, never more, so socket readiness (``select``, the
event loop) stays truthful: when :meth:`pending` is 0 and the socket is not readable, there
is nothing to read.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import socket
import threading
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ktlsd.tls import ktls
from ktlsd.tls.keyschedule import record_nonce, traffic_keys
from ktlsd.tls.protocol import (
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    RECORD_HEADER_LENGTH,
    AlertDescription,
    AlertLevel,
    ContentType,
    HandshakeType,
    ProtocolVersion,
    alert_name,
)
from ktlsd.tls.session import CipherSuite, Session

__all__ = [
    "AlertReceived",
    "KernelRecordLayer",
    "Record",
    "RecordError",
    "RecordLayer",
    "UserRecordLayer",
    "open_record_layer",
]

TAG_SIZE = 16  # every TLS 1.3 AEAD here (AES-GCM, ChaCha20-Poly1305) has a 16-byte tag
_LEGACY_VERSION = ProtocolVersion.TLS_1_2.to_bytes(2, "big")  # legacy_record_version
_CLOSE_NOTIFY = bytes((AlertLevel.WARNING, AlertDescription.CLOSE_NOTIFY))

#: kTLS receive errors that are TLS protocol errors, and the alert each calls for.
_KERNEL_ERROR_ALERTS = {
    errno.EBADMSG: AlertDescription.BAD_RECORD_MAC,  # failed authentication (or no content type)
    errno.EMSGSIZE: AlertDescription.RECORD_OVERFLOW,
    errno.EINVAL: AlertDescription.DECODE_ERROR,  # bad record header (version)
}


@dataclass(frozen=True)
class Record:
    """One received record: its TLS content type and plaintext.

    ``Record(23, b"")`` is the end-of-stream signal (close_notify or TCP EOF); see :attr:`eof`.
    """

    content_type: int
    data: bytes

    @property
    def eof(self) -> bool:
        """True for the end-of-stream record: no more data will come."""
        return self.content_type == ContentType.APPLICATION_DATA and not self.data


EOF_RECORD = Record(ContentType.APPLICATION_DATA, b"")


class AlertReceived(OSError):
    """The peer sent a fatal alert (anything but close_notify/user_canceled)."""

    def __init__(self, description: int) -> None:
        self.description = description
        self.alert = alert_name(description)
        super().__init__(errno.ECONNABORTED, f"peer sent TLS alert {self.alert}")

    def __str__(self) -> str:
        return str(self.strerror)


class RecordError(OSError):
    """A received record broke the protocol; ``alert`` names the fatal alert it calls for.

    ``description`` is that alert's number (RFC 8446 §6.2), which the layer sends to the peer.
    """

    def __init__(self, err: int, message: str, description: int) -> None:
        super().__init__(err, message)
        self.description = description
        self.alert = alert_name(description)

    def __str__(self) -> str:
        return str(self.strerror)


def _interpret_alert(data: bytes) -> Record | None:
    """close_notify -> end of stream; user_canceled -> ignore (None); others raise."""
    if len(data) != 2:
        raise RecordError(
            errno.EBADMSG,
            f"malformed TLS alert record ({len(data)} bytes)",
            AlertDescription.DECODE_ERROR,
        )
    description = data[1]
    if description == AlertDescription.CLOSE_NOTIFY:
        return EOF_RECORD
    if description == AlertDescription.USER_CANCELED:
        return None
    raise AlertReceived(description)


def _check_send(data: bytes, content_type: int) -> None:
    if not 0 < content_type < 256:
        raise ValueError(f"invalid TLS content type {content_type}")
    if len(data) > MAX_PLAINTEXT:
        raise ValueError(f"record plaintext of {len(data)} bytes exceeds 2^14 (16384)")
    if not data and content_type != ContentType.APPLICATION_DATA:
        raise ValueError(f"records of content type {content_type} must not be empty")


def _require_nonblocking(sock: socket.socket) -> None:
    if sock.gettimeout() != 0.0:
        raise ValueError("asyncio record I/O needs a non-blocking socket (sock.setblocking(False))")


async def _wait(sock: socket.socket, *, write: bool) -> None:
    """Wait until the event loop reports ``sock`` readable (or writable)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    fd = sock.fileno()
    if write:
        loop.add_writer(fd, ready)
    else:
        loop.add_reader(fd, ready)
    try:
        await future
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


class RecordLayer(abc.ABC):
    """The record layer interface; see the module docstring for the shared semantics."""

    #: "kernel" or "user".
    kind: str

    def __init__(self, sock: socket.socket, session: Session) -> None:
        self._sock = sock
        self.suite: CipherSuite = session.suite
        self._write_closed = False  # close_notify sent, or the connection failed
        self._send_lock: asyncio.Lock | None = None
        # One record at a time on the wire for the blocking API (a reader may send an alert
        # while a writer thread sends data).
        self._send_mutex = threading.Lock()
        self._failure: OSError | None = None  # the fatal error; sticky
        self._alert_due: int | None = None  # fatal alert to send for it, not sent yet
        self._shutdown_due = False  # the failure's alert/shutdown still to be done

    # -- the API ------------------------------------------------------------------------

    def send(self, data: bytes, content_type: int = ContentType.APPLICATION_DATA) -> None:
        """Protect and send ``data`` as one record (at most 2^14 bytes)."""
        try:
            with self._send_mutex:
                self._check_writable()
                _check_send(data, content_type)
                try:
                    if data:  # like kTLS: an empty application data send emits nothing
                        self._send_record(data, content_type)
                finally:
                    self._finish_failure()  # a reader failed the connection meanwhile
        finally:
            # A reader that failed just before we let go found the lock taken: its alert is
            # ours to send.
            self._try_finish_failure()

    @abc.abstractmethod
    def recv(self, bufsize: int = MAX_PLAINTEXT) -> Record:
        """Receive one record (at most ``bufsize`` bytes of it; the rest comes next time)."""

    async def asend(self, data: bytes, content_type: int = ContentType.APPLICATION_DATA) -> None:
        """asyncio version of :meth:`send` (non-blocking socket)."""
        _require_nonblocking(self._sock)
        async with self._lock():
            self._check_writable()
            _check_send(data, content_type)
            try:
                if data:
                    await self._asend_record(data, content_type)
            finally:
                await self._afinish_failure()

    @abc.abstractmethod
    def _send_record(self, data: bytes, content_type: int) -> None:
        """Put one non-empty record on the wire (blocking); no checks, no locking."""

    @abc.abstractmethod
    async def _asend_record(self, data: bytes, content_type: int) -> None:
        """asyncio version of :meth:`_send_record`."""

    @abc.abstractmethod
    async def arecv(self, bufsize: int = MAX_PLAINTEXT) -> Record:
        """asyncio version of :meth:`recv` (non-blocking socket)."""

    @abc.abstractmethod
    def install_tx_key(self, secret: bytes, seq: int = 0) -> None:
        """Protect records sent from now on with keys from ``secret``, first record ``seq``."""

    @abc.abstractmethod
    def install_rx_key(self, secret: bytes, seq: int = 0) -> None:
        """Open records received from now on with keys from ``secret``; lifts EKEYEXPIRED."""

    @abc.abstractmethod
    def sequence_numbers(self) -> tuple[int, int]:
        """``(tx_seq, rx_seq)``: numbers of the next record to send and to receive."""

    def pending(self) -> int:
        """Decrypted bytes already buffered and returned by the next ``recv`` without I/O."""
        return 0

    def fileno(self) -> int:
        return self._sock.fileno()

    @property
    def socket(self) -> socket.socket:
        return self._sock

    @property
    def failure(self) -> OSError | None:
        """The fatal error that ended the connection, or None."""
        return self._failure

    def close(self) -> None:
        """Send close_notify, then shut down the write side. Idempotent; the fd stays open.

        After a fatal error there is no close_notify: only the fatal alert, if still due.
        """
        with self._send_mutex:
            if self._failure is not None:
                self._finish_failure()
                return
            if self._write_closed:
                return
            # The peer may be gone already; closing must still succeed.
            with contextlib.suppress(OSError):
                self._send_record(_CLOSE_NOTIFY, ContentType.ALERT)
            self._shutdown_write()

    async def aclose(self) -> None:
        """asyncio version of :meth:`close`."""
        _require_nonblocking(self._sock)
        async with self._lock():
            if self._failure is not None:
                await self._afinish_failure()
                return
            if self._write_closed:
                return
            with contextlib.suppress(OSError):
                await self._asend_record(_CLOSE_NOTIFY, ContentType.ALERT)
            self._shutdown_write()

    def abort(self, error: OSError, alert: int | None) -> None:
        """End the connection for a fatal ``error`` found above the record layer.

        Sends ``alert`` (a description, RFC 8446 §6.2) as a fatal alert unless the connection
        failed already or our close_notify went out before, then shuts down the write side.
        From then on ``recv`` raises ``error`` and ``send`` raises ``BrokenPipeError``.
        """
        self._fail(error, alert)
        self._try_finish_failure()

    async def aabort(self, error: OSError, alert: int | None) -> None:
        """asyncio version of :meth:`abort`."""
        self._fail(error, alert)
        await self._atry_finish_failure()

    # -- shared helpers -----------------------------------------------------------------

    def _shutdown_write(self) -> None:
        self._write_closed = True
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def _check_writable(self) -> None:
        if self._failure is not None:
            raise BrokenPipeError(
                errno.EPIPE, f"TLS connection failed, nothing more can be sent: {self._failure}"
            )
        if self._write_closed:
            raise BrokenPipeError(errno.EPIPE, "TLS write side already closed (close_notify sent)")

    def _fail(self, error: OSError, alert: int | None) -> OSError:
        """Record the fatal ``error`` (the first one counts) and the alert it calls for.

        Sans-I/O: the alert and the shutdown are only queued; the holder of the send lock
        does them (:meth:`_finish_failure`). Returns ``error`` for ``raise``.
        """
        if self._failure is None:
            self._failure = error
            if not self._write_closed:  # never an alert after our close_notify
                self._alert_due = alert
            self._write_closed = True
            self._shutdown_due = True
        return error

    def _fatal_alert_for(self, error: OSError) -> tuple[bool, int | None]:
        """Whether ``error`` out of the receive path ends the connection, and with which alert."""
        if isinstance(error, RecordError):
            return True, error.description
        if isinstance(error, AlertReceived):
            return True, None
        return False, None

    def _check_recv_error(self, error: OSError) -> None:
        """Blocking receive path: fail the connection if ``error`` is fatal; send its alert."""
        fatal, alert = self._fatal_alert_for(error)
        if fatal:
            self._fail(error, alert)
        self._try_finish_failure()

    async def _acheck_recv_error(self, error: OSError) -> None:
        fatal, alert = self._fatal_alert_for(error)
        if fatal:
            self._fail(error, alert)
        await self._atry_finish_failure()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure.with_traceback(None)

    def _alert_record(self) -> bytes | None:
        alert, self._alert_due = self._alert_due, None
        return None if alert is None else bytes((AlertLevel.FATAL, alert))

    def _finish_failure(self) -> None:
        """Send the due fatal alert, then shut down the write side; caller holds the lock."""
        if not self._shutdown_due:
            return
        self._shutdown_due = False
        alert = self._alert_record()
        if alert is not None:
            with contextlib.suppress(OSError):
                self._send_record(alert, ContentType.ALERT)
        self._shutdown_write()

    async def _afinish_failure(self) -> None:
        if not self._shutdown_due:
            return
        self._shutdown_due = False
        alert = self._alert_record()
        if alert is not None:
            with contextlib.suppress(OSError):
                await self._asend_record(alert, ContentType.ALERT)
        self._shutdown_write()

    def _try_finish_failure(self) -> None:
        # Never wait for a writer: one in the middle of a record finishes the job after it.
        if self._shutdown_due and self._send_mutex.acquire(blocking=False):
            try:
                self._finish_failure()
            finally:
                self._send_mutex.release()

    async def _atry_finish_failure(self) -> None:
        if not self._shutdown_due:
            return
        if self._sock.gettimeout() != 0.0:
            self._try_finish_failure()  # a blocking layer used from a coroutine
            return
        lock = self._lock()
        if not lock.locked():
            async with lock:
                await self._afinish_failure()

    def _lock(self) -> asyncio.Lock:
        # One sender at a time: two coroutines writing records must not interleave bytes.
        if self._send_lock is None:
            self._send_lock = asyncio.Lock()
        return self._send_lock


# --- user space ------------------------------------------------------------------------


class _Protection:
    """One direction's AEAD state: key, write IV and the next record number."""

    def __init__(self, suite: CipherSuite, secret: bytes, seq: int) -> None:
        keys = traffic_keys(suite, secret)
        if suite is CipherSuite.TLS_CHACHA20_POLY1305_SHA256:
            self._aead: AESGCM | ChaCha20Poly1305 = ChaCha20Poly1305(keys.key)
        else:
            self._aead = AESGCM(keys.key)
        self._iv = keys.iv
        if not 0 <= seq < 2**64:
            raise ValueError(f"record sequence number {seq} outside 0..2^64-1")
        self.seq = seq

    def __repr__(self) -> str:
        return f"_Protection(seq={self.seq})"

    def _next_nonce(self) -> bytes:
        if self.seq >= 2**64 - 1:
            raise OSError(errno.EOVERFLOW, "record sequence numbers exhausted: rekey first")
        nonce = record_nonce(self._iv, self.seq)
        self.seq += 1
        return nonce

    def seal(self, content_type: int, data: bytes) -> bytes:
        inner = bytes(data) + bytes((content_type,))
        header = (
            bytes((ContentType.APPLICATION_DATA,))
            + _LEGACY_VERSION
            + (len(inner) + TAG_SIZE).to_bytes(2, "big")
        )
        return header + self._aead.encrypt(self._next_nonce(), inner, header)

    def open(self, header: bytes, body: bytes) -> tuple[int, bytes]:
        nonce = record_nonce(self._iv, self.seq)
        try:
            inner = self._aead.decrypt(nonce, body, header)
        except InvalidTag:
            raise RecordError(
                errno.EBADMSG,
                "TLS record failed authentication (bad_record_mac)",
                AlertDescription.BAD_RECORD_MAC,
            ) from None
        self.seq += 1
        stripped = inner.rstrip(b"\x00")
        if not stripped:
            raise RecordError(
                errno.EBADMSG,
                "TLS record has no content type (all padding)",
                AlertDescription.UNEXPECTED_MESSAGE,
            )
        if len(stripped) - 1 > MAX_PLAINTEXT:
            raise RecordError(
                errno.EMSGSIZE,
                "TLS record plaintext exceeds 2^14 (record_overflow)",
                AlertDescription.RECORD_OVERFLOW,
            )
        return stripped[-1], stripped[:-1]


class _RecordReader:
    """Sans-I/O framing: says how many bytes the next record still needs, never more."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.eof = False

    def need(self) -> int:
        if len(self._buf) < RECORD_HEADER_LENGTH:
            return RECORD_HEADER_LENGTH - len(self._buf)
        return RECORD_HEADER_LENGTH + self._length() - len(self._buf)

    def _length(self) -> int:
        return int.from_bytes(self._buf[3:5], "big")

    def feed(self, data: bytes) -> None:
        if not data:
            self.eof = True
            return
        self._buf += data
        if len(self._buf) >= RECORD_HEADER_LENGTH:
            self._check_header()

    def _check_header(self) -> None:
        outer = self._buf[0]
        if outer != ContentType.APPLICATION_DATA:
            raise RecordError(
                errno.EBADMSG,
                f"unexpected outer record type {outer} (protected TLS 1.3 records are 23)",
                AlertDescription.UNEXPECTED_MESSAGE,
            )
        if bytes(self._buf[1:3]) != _LEGACY_VERSION:
            raise RecordError(
                errno.EBADMSG,
                f"bad record version 0x{self._buf[1:3].hex()}",
                AlertDescription.DECODE_ERROR,
            )
        length = self._length()
        if length > MAX_CIPHERTEXT:
            raise RecordError(
                errno.EMSGSIZE,
                f"TLS record of {length} bytes exceeds 2^14+256 (record_overflow)",
                AlertDescription.RECORD_OVERFLOW,
            )
        if length > MAX_PLAINTEXT + 1 + TAG_SIZE:
            # RFC 8446 §5.4: the inner plaintext, padding included, is at most 2^14+1 bytes;
            # kTLS checks it on the length alone as well, before decrypting.
            raise RecordError(
                errno.EMSGSIZE,
                f"TLS record of {length} bytes carries more than 2^14+1 bytes of plaintext "
                "and padding (record_overflow)",
                AlertDescription.RECORD_OVERFLOW,
            )
        if length < TAG_SIZE + 1:
            raise RecordError(
                errno.EBADMSG,
                f"TLS record of {length} bytes is too short",
                AlertDescription.BAD_RECORD_MAC,
            )

    def take(self) -> tuple[bytes, bytes] | None:
        """The next complete record as ``(header, body)``, or None if more bytes are needed."""
        if self.need() > 0:
            if self.eof and self._buf:
                raise ConnectionResetError(
                    errno.ECONNRESET, "connection closed in the middle of a TLS record"
                )
            return None
        header = bytes(self._buf[:RECORD_HEADER_LENGTH])
        body = bytes(self._buf[RECORD_HEADER_LENGTH:])
        self._buf.clear()
        return header, body


class UserRecordLayer(RecordLayer):
    """TLS 1.3 records protected in user space; same semantics as :class:`KernelRecordLayer`."""

    kind = "user"

    def __init__(self, sock: socket.socket, session: Session) -> None:
        super().__init__(sock, session)
        self._tx = _Protection(session.suite, session.tx_secret, session.tx_seq)
        self._rx = _Protection(session.suite, session.rx_secret, session.rx_seq)
        self._reader = _RecordReader()
        self._plain_type: int = ContentType.APPLICATION_DATA
        self._plain = b""
        self._key_expired = False
        self._eof = False

    def __repr__(self) -> str:
        tx, rx = self.sequence_numbers()
        return f"UserRecordLayer(suite={self.suite.iana_name}, tx_seq={tx}, rx_seq={rx})"

    # -- TX ------------------------------------------------------------------------------

    def seal(self, data: bytes, content_type: int = ContentType.APPLICATION_DATA) -> bytes | None:
        """Protect ``data`` as the next record and return its wire bytes without sending them
        (the TX sequence number advances); None for empty data, which kTLS would not send.

        For callers that must write the record themselves, e.g. the agent sending a KeyUpdate
        on a consumer's socket without blocking its event loop.
        """
        self._check_writable()
        _check_send(data, content_type)
        if not data:
            return None  # like kTLS: an empty application data send emits nothing
        return self._tx.seal(content_type, data)

    def _send_record(self, data: bytes, content_type: int) -> None:
        self._sock.sendall(self._tx.seal(content_type, data))

    async def _asend_record(self, data: bytes, content_type: int) -> None:
        wire = self._tx.seal(content_type, data)
        await asyncio.get_running_loop().sock_sendall(self._sock, wire)

    def install_tx_key(self, secret: bytes, seq: int = 0) -> None:
        self._tx = _Protection(self.suite, secret, seq)

    # -- RX ------------------------------------------------------------------------------

    def install_rx_key(self, secret: bytes, seq: int = 0) -> None:
        self._rx = _Protection(self.suite, secret, seq)
        self._key_expired = False

    def sequence_numbers(self) -> tuple[int, int]:
        return self._tx.seq, self._rx.seq

    def pending(self) -> int:
        return len(self._plain)

    def recv(self, bufsize: int = MAX_PLAINTEXT) -> Record:
        try:
            while True:
                step = self._step(bufsize)
                if isinstance(step, Record):
                    return step
                self._feed(self._sock.recv(step))
        except OSError:
            self._try_finish_failure()  # the fatal alert, if this error called for one
            raise

    async def arecv(self, bufsize: int = MAX_PLAINTEXT) -> Record:
        _require_nonblocking(self._sock)
        loop = asyncio.get_running_loop()
        try:
            while True:
                step = self._step(bufsize)
                if isinstance(step, Record):
                    return step
                self._feed(await loop.sock_recv(self._sock, step))
        except OSError:
            await self._atry_finish_failure()
            raise

    def _broken(self, exc: OSError) -> OSError:
        """A fatal error of the received stream: recorded, sticky, its alert queued."""
        return self._fail(exc, exc.description if isinstance(exc, RecordError) else None)

    def _feed(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
        except OSError as exc:
            raise self._broken(exc) from None

    def _deliver(self, bufsize: int) -> Record:
        chunk, self._plain = self._plain[:bufsize], self._plain[bufsize:]
        return Record(self._plain_type, chunk)

    def _step(self, bufsize: int) -> Record | int:
        """Advance as far as possible without I/O: a Record, or how many bytes to read next."""
        if bufsize <= 0:
            raise ValueError("bufsize must be positive")
        if self._plain:
            return self._deliver(bufsize)
        self._raise_failure()
        while True:
            if self._eof:
                return EOF_RECORD
            if self._key_expired:
                raise OSError(
                    errno.EKEYEXPIRED,
                    "peer updated its traffic keys: install the next receive key",
                )
            try:
                raw = self._reader.take()
            except OSError as exc:
                raise self._broken(exc) from None
            if raw is None:
                if self._reader.eof:
                    self._eof = True  # TCP EOF on a record boundary
                    continue
                return self._reader.need()
            try:
                content_type, data = self._rx.open(*raw)
            except OSError as exc:
                raise self._broken(exc) from None
            if content_type == ContentType.ALERT:
                try:
                    record = _interpret_alert(data)
                except OSError as exc:
                    raise self._broken(exc) from None
                if record is not None:
                    self._eof = True
                    return record
                continue
            if content_type == ContentType.APPLICATION_DATA and not data:
                continue
            if content_type == ContentType.HANDSHAKE and data[:1] == bytes(
                (HandshakeType.KEY_UPDATE,)
            ):
                self._key_expired = True  # the kernel's rule: first byte of the record
            self._plain_type, self._plain = content_type, data
            return self._deliver(bufsize)


# --- kernel ----------------------------------------------------------------------------


class KernelRecordLayer(RecordLayer):
    """Records protected by Linux kTLS; the socket must be a connected TCP socket."""

    kind = "kernel"

    def __init__(self, sock: socket.socket, session: Session) -> None:
        super().__init__(sock, session)
        self._eof = False
        # Set when a KeyUpdate record was delivered. The kernel then fails reads with
        # EKEYEXPIRED, but only once recvmsg runs: a socket with a timeout polls first, and
        # poll reports no input during the pause, so the read would just time out. Raising
        # here keeps the semantics identical whatever the socket's timeout.
        self._key_expired = False
        ktls.attach_ulp(sock)
        ktls.install_tx_key(sock, session.suite, session.tx_secret, session.tx_seq)
        ktls.install_rx_key(sock, session.suite, session.rx_secret, session.rx_seq)

    def __repr__(self) -> str:
        return f"KernelRecordLayer(suite={self.suite.iana_name}, fd={self._sock.fileno()})"

    def _send_record(self, data: bytes, content_type: int) -> None:
        ktls.send_record(self._sock, content_type, data)

    async def _asend_record(self, data: bytes, content_type: int) -> None:
        view = memoryview(bytes(data))
        while view:
            try:
                view = view[ktls.send_record_some(self._sock, content_type, view) :]
            except (BlockingIOError, InterruptedError):
                await _wait(self._sock, write=True)

    def _fatal_alert_for(self, error: OSError) -> tuple[bool, int | None]:
        if isinstance(error, ktls.KtlsError) and error.errno in _KERNEL_ERROR_ALERTS:
            return True, _KERNEL_ERROR_ALERTS[error.errno]
        return super()._fatal_alert_for(error)

    def _check_expired(self) -> None:
        if self._key_expired:
            raise ktls.KtlsError(
                errno.EKEYEXPIRED, "peer updated its traffic keys: install the next receive key"
            )

    def _classify(self, content_type: int, data: bytes) -> Record | None:
        if content_type == ContentType.HANDSHAKE and data[:1] == bytes((HandshakeType.KEY_UPDATE,)):
            self._key_expired = True
        if content_type == ContentType.APPLICATION_DATA and not data:
            self._eof = True
            return EOF_RECORD
        if content_type == ContentType.ALERT:
            record = _interpret_alert(data)
            if record is not None:
                self._eof = True
            return record
        return Record(content_type, data)

    def recv(self, bufsize: int = MAX_PLAINTEXT) -> Record:
        self._raise_failure()
        try:
            while not self._eof:
                self._check_expired()
                record = self._classify(*ktls.recv_record(self._sock, bufsize))
                if record is not None:
                    return record
        except OSError as exc:
            self._check_recv_error(exc)
            raise
        return EOF_RECORD

    async def arecv(self, bufsize: int = MAX_PLAINTEXT) -> Record:
        _require_nonblocking(self._sock)
        self._raise_failure()
        try:
            while not self._eof:
                self._check_expired()
                try:
                    received = ktls.recv_record(self._sock, bufsize)
                except (BlockingIOError, InterruptedError):
                    await _wait(self._sock, write=False)
                    continue
                record = self._classify(*received)
                if record is not None:
                    return record
        except OSError as exc:
            await self._acheck_recv_error(exc)
            raise
        return EOF_RECORD

    def install_tx_key(self, secret: bytes, seq: int = 0) -> None:
        ktls.install_tx_key(self._sock, self.suite, secret, seq)

    def install_rx_key(self, secret: bytes, seq: int = 0) -> None:
        ktls.install_rx_key(self._sock, self.suite, secret, seq)
        self._key_expired = False

    def sequence_numbers(self) -> tuple[int, int]:
        tx = ktls.read_key_state(self._sock, ktls.TLS_TX).rec_seq
        rx = ktls.read_key_state(self._sock, ktls.TLS_RX).rec_seq
        return tx, rx


LayerKind = Literal["auto", "kernel", "user"]


def open_record_layer(sock: socket.socket, session: Session, kind: str = "auto") -> RecordLayer:
    """Put a record layer on ``sock`` for ``session``.

    ``"kernel"`` insists on kTLS (a clear :class:`ktlsd.tls.ktls.KtlsError` when the kernel has
    none), ``"user"`` never uses it, ``"auto"`` uses kTLS when :func:`ktlsd.tls.ktls.probe`
    (cached per process) says it works on this kernel and the socket is TCP. With "auto" on
    a kernel that has kTLS but no rekey (< 6.14), a later KeyUpdate fails with a clear error.
    On a TCP socket, TCP_NODELAY is set (see the comment below).
    """
    is_tcp = sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == (
        socket.SOCK_STREAM
    )
    if is_tcp and kind in ("user", "kernel", "auto"):
        # A KeyUpdate is a small record followed at once by data: with Nagle on, the data
        # waits for the peer's delayed ACK (~40 ms per KeyUpdate). Records are whole writes
        # already, so nothing is gained by coalescing.
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if kind == "user":
        return UserRecordLayer(sock, session)
    if kind == "kernel":
        return KernelRecordLayer(sock, session)
    if kind == "auto":
        if is_tcp and ktls.cached_probe().usable:
            return KernelRecordLayer(sock, session)
        return UserRecordLayer(sock, session)
    raise ValueError(f"record layer kind must be auto, kernel or user, not {kind!r}")
