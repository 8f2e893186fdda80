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

Record size limit (RFC 8449): a layer never sends a record whose plaintext exceeds
:attr:`RecordLayer.max_fragment` (``Session.max_send_fragment``: 2^14, or the peer's
``record_size_limit`` minus the content type byte): application data is
cut into records of that size (``send`` too, as kTLS does), a larger record of another type
is refused with ``ValueError``. The kernel layer has kTLS do it (``TLS_TX_MAX_PAYLOAD_LEN``)
and, on kernels without that option, cuts its writes to that size itself (kTLS closes a
record at the end of every ``sendmsg``). The user layer also refuses records larger than the
limit we advertised (``Session.max_recv_inner``) with ``record_overflow``, as RFC 8449 asks;
kTLS cannot check that limit (it accepts up to 2^14+1).

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
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from ktlsd.tls import ktls
from ktlsd.tls.keyschedule import traffic_keys
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
_KEY_UPDATE = bytes((HandshakeType.KEY_UPDATE,))

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


def _byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _records_in(record: Record) -> int:
    """How many records at least made ``record`` (kTLS merges application data ones)."""
    if record.content_type != ContentType.APPLICATION_DATA:
        return 1
    return max(1, -(-len(record.data) // MAX_PLAINTEXT))


def _check_send(data: bytes, content_type: int, max_fragment: int = MAX_PLAINTEXT) -> None:
    if not 0 < content_type < 256:
        raise ValueError(f"invalid TLS content type {content_type}")
    if len(data) > MAX_PLAINTEXT:
        raise ValueError(f"record plaintext of {len(data)} bytes exceeds 2^14 (16384)")
    if len(data) > max_fragment:
        raise ValueError(
            f"record plaintext of {len(data)} bytes exceeds the peer's record_size_limit "
            f"({max_fragment} bytes of content)"
        )
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
        #: The most plaintext one record we send carries (the peer's record_size_limit).
        self.max_fragment = session.max_send_fragment

    # -- the API ------------------------------------------------------------------------

    def send(self, data: bytes, content_type: int = ContentType.APPLICATION_DATA) -> None:
        """Protect and send ``data`` as one record (at most 2^14 bytes; application data
        beyond the peer's record size limit goes out as several records, as with kTLS)."""
        try:
            with self._send_mutex:
                self._check_writable()
                split = content_type == ContentType.APPLICATION_DATA
                _check_send(data, content_type, MAX_PLAINTEXT if split else self.max_fragment)
                try:
                    if len(data) > self.max_fragment:
                        self._send_data(_byte_view(data))
                    elif data:  # like kTLS: an empty application data send emits nothing
                        self._send_record(data, content_type)
                finally:
                    self._finish_failure()  # a reader failed the connection meanwhile
        finally:
            # A reader that failed just before we let go found the lock taken: its alert is
            # ours to send.
            self._try_finish_failure()

    def send_data(self, data: bytes | bytearray | memoryview) -> int:
        """Protect and send application data as records of at most 2^14 bytes each, in as
        few writes as the layer can; returns how many records that made.

        The records are those :meth:`send` would make of each 2^14-byte piece in turn; the
        user layer seals them all into one buffer and writes it with one ``sendall``.
        """
        view = _byte_view(data)
        try:
            with self._send_mutex:
                self._check_writable()
                try:
                    return self._send_data(view) if len(view) else 0
                finally:
                    self._finish_failure()  # a reader failed the connection meanwhile
        finally:
            self._try_finish_failure()

    async def asend_data(self, data: bytes | bytearray | memoryview) -> int:
        """asyncio version of :meth:`send_data` (non-blocking socket)."""
        _require_nonblocking(self._sock)
        view = _byte_view(data)
        async with self._lock():
            self._check_writable()
            try:
                return await self._asend_data(view) if len(view) else 0
            finally:
                await self._afinish_failure()

    def _send_data(self, view: memoryview) -> int:
        """Put application data on the wire as records (blocking); no checks, no locking."""
        records = 0
        step = self.max_fragment
        for start in range(0, len(view), step):
            self._send_record(view[start : start + step], ContentType.APPLICATION_DATA)
            records += 1
        return records

    async def _asend_data(self, view: memoryview) -> int:
        """asyncio version of :meth:`_send_data`."""
        records = 0
        step = self.max_fragment
        for start in range(0, len(view), step):
            chunk = view[start : start + step]
            await self._asend_record(chunk, ContentType.APPLICATION_DATA)
            records += 1
        return records

    @abc.abstractmethod
    def recv(self, bufsize: int = MAX_PLAINTEXT) -> Record:
        """Receive one record (at most ``bufsize`` bytes of it; the rest comes next time)."""

    def recv_many(self, bufsize: int) -> tuple[Record, int]:
        """Like :meth:`recv`, but the application data of consecutive records may come as one
        :class:`Record` of up to ``bufsize`` bytes (never across a record of another type, as
        kTLS does); also returns how many records were received for it (0 for the rest of a
        record that came in part before)."""
        record = self.recv(min(bufsize, _MERGE))
        return record, _records_in(record)

    async def arecv_many(self, bufsize: int) -> tuple[Record, int]:
        """asyncio version of :meth:`recv_many`."""
        record = await self.arecv(min(bufsize, _MERGE))
        return record, _records_in(record)

    async def asend(self, data: bytes, content_type: int = ContentType.APPLICATION_DATA) -> None:
        """asyncio version of :meth:`send` (non-blocking socket)."""
        _require_nonblocking(self._sock)
        async with self._lock():
            self._check_writable()
            split = content_type == ContentType.APPLICATION_DATA
            _check_send(data, content_type, MAX_PLAINTEXT if split else self.max_fragment)
            try:
                if len(data) > self.max_fragment:
                    await self._asend_data(_byte_view(data))
                elif data:
                    await self._asend_record(data, content_type)
            finally:
                await self._afinish_failure()

    @abc.abstractmethod
    def _send_record(self, data: bytes | memoryview, content_type: int) -> None:
        """Put one non-empty record on the wire (blocking); no checks, no locking."""

    @abc.abstractmethod
    async def _asend_record(self, data: bytes | memoryview, content_type: int) -> None:
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


_HEADER = struct.Struct(">BHH")  # outer content type, legacy version, length
_VERSION = int(ProtocolVersion.TLS_1_2)
_MIN_BODY = TAG_SIZE + 1
_SEQ_LIMIT = 2**64 - 1


_Bytes = bytes | bytearray | memoryview
_IntoCall = Callable[[bytes, _Bytes, _Bytes, memoryview], object]


def _into_calls(aead: AESGCM | ChaCha20Poly1305) -> tuple[_IntoCall, _IntoCall]:
    """``encrypt_into``/``decrypt_into`` of ``aead``, or equivalents with one copy where the
    installed cryptography predates them (they came in 45; Debian 13 ships 43)."""
    encrypt_into = getattr(aead, "encrypt_into", None)
    decrypt_into = getattr(aead, "decrypt_into", None)
    if encrypt_into is not None and decrypt_into is not None:
        return encrypt_into, decrypt_into

    def encrypt_copy(nonce: bytes, data: _Bytes, aad: _Bytes, out: memoryview) -> None:
        out[:] = aead.encrypt(nonce, bytes(data), bytes(aad))

    def decrypt_copy(nonce: bytes, data: _Bytes, aad: _Bytes, out: memoryview) -> None:
        out[:] = aead.decrypt(nonce, bytes(data), bytes(aad))

    return encrypt_copy, decrypt_copy


class _Protection:
    """One direction's AEAD state: key, write IV and the next record number.

    The nonce of record ``seq`` is the write IV xor ``seq`` (RFC 8446 §5.3), computed from the
    IV kept as an integer. ``seal_into``/``open_into`` work on caller buffers: one AEAD call
    per record and no copy of their own.
    """

    __slots__ = ("_aead", "_decrypt_into", "_encrypt_into", "_iv", "seq")

    def __init__(self, suite: CipherSuite, secret: bytes, seq: int) -> None:
        keys = traffic_keys(suite, secret)
        if suite is CipherSuite.TLS_CHACHA20_POLY1305_SHA256:
            self._aead: AESGCM | ChaCha20Poly1305 = ChaCha20Poly1305(keys.key)
        else:
            self._aead = AESGCM(keys.key)
        self._encrypt_into, self._decrypt_into = _into_calls(self._aead)
        self._iv = int.from_bytes(keys.iv, "big")
        if not 0 <= seq < 2**64:
            raise ValueError(f"record sequence number {seq} outside 0..2^64-1")
        self.seq = seq

    def __repr__(self) -> str:
        return f"_Protection(seq={self.seq})"

    def _nonce(self) -> bytes:
        if self.seq >= _SEQ_LIMIT:
            raise OSError(errno.EOVERFLOW, "record sequence numbers exhausted: rekey first")
        return (self._iv ^ self.seq).to_bytes(12, "big")

    def seal(self, content_type: int, data: bytes | memoryview) -> bytes:
        inner = bytes(data) + bytes((content_type,))
        header = _HEADER.pack(ContentType.APPLICATION_DATA, ProtocolVersion.TLS_1_2,
                              len(inner) + TAG_SIZE)
        sealed = header + self._aead.encrypt(self._nonce(), inner, header)
        self.seq += 1
        return sealed

    def seal_into(
        self, content_type: int, data: memoryview, out: memoryview, scratch: memoryview
    ) -> int:
        """Seal ``data`` (at most 2^14 bytes) as the next record at the start of ``out``;
        return the record's length. ``scratch`` holds the inner plaintext on the way."""
        size = len(data)
        length = size + 1 + TAG_SIZE
        _HEADER.pack_into(out, 0, ContentType.APPLICATION_DATA, ProtocolVersion.TLS_1_2, length)
        scratch[:size] = data
        scratch[size] = content_type
        end = RECORD_HEADER_LENGTH + length
        self._encrypt_into(
            self._nonce(), scratch[: size + 1], out[:RECORD_HEADER_LENGTH],
            out[RECORD_HEADER_LENGTH:end],
        )
        self.seq += 1
        return end

    def seal_data(
        self, view: memoryview, wire: memoryview, scratch: memoryview,
        fragment: int = MAX_PLAINTEXT,
    ) -> int:
        """Seal all of ``view`` as application data records of ``fragment`` bytes (the last
        one shorter) one after the other into ``wire``; return their total length. The loop
        of :meth:`seal_into`, with the per-record work kept to the minimum."""
        total = len(view)
        seq, iv = self.seq, self._iv
        if seq + -(-total // fragment) > _SEQ_LIMIT:
            raise OSError(errno.EOVERFLOW, "record sequence numbers exhausted: rekey first")
        encrypt_into, pack_into = self._encrypt_into, _HEADER.pack_into
        data_type, version = ContentType.APPLICATION_DATA, ProtocolVersion.TLS_1_2
        end = 0
        try:
            for start in range(0, total, fragment):
                chunk = view[start : start + fragment]
                size = len(chunk)
                body = end + RECORD_HEADER_LENGTH
                length = size + 1 + TAG_SIZE
                pack_into(wire, end, data_type, version, length)
                scratch[:size] = chunk
                scratch[size] = data_type
                encrypt_into(
                    (iv ^ seq).to_bytes(12, "big"), scratch[: size + 1], wire[end:body],
                    wire[body : body + length],
                )
                seq += 1
                end = body + length
        finally:
            self.seq = seq
        return end

    def open(self, header: bytes, body: bytes) -> tuple[int, bytes]:
        out = bytearray(len(body) - TAG_SIZE)
        content_type, size = self.open_into(header, body, memoryview(out))
        return content_type, bytes(out[:size])

    def open_into(
        self, header: bytes | memoryview, body: bytes | memoryview, out: memoryview
    ) -> tuple[int, int]:
        """Open the next record into ``out`` (room for its inner plaintext at least);
        return its content type and how many bytes of content ``out`` now starts with."""
        inner = len(body) - TAG_SIZE
        try:
            self._decrypt_into(self._nonce(), body, header, out[:inner])
        except InvalidTag:
            raise RecordError(
                errno.EBADMSG,
                "TLS record failed authentication (bad_record_mac)",
                AlertDescription.BAD_RECORD_MAC,
            ) from None
        self.seq += 1
        end = inner
        if not out[end - 1]:  # padding: zeros after the content type (rare)
            end = len(out[:inner].tobytes().rstrip(b"\x00"))
            if not end:
                raise RecordError(
                    errno.EBADMSG,
                    "TLS record has no content type (all padding)",
                    AlertDescription.UNEXPECTED_MESSAGE,
                )
        if end - 1 > MAX_PLAINTEXT:
            raise RecordError(
                errno.EMSGSIZE,
                "TLS record plaintext exceeds 2^14 (record_overflow)",
                AlertDescription.RECORD_OVERFLOW,
            )
        return out[end - 1], end - 1


def _record_length(header: bytes | bytearray | memoryview, max_body: int = 0) -> int:
    """The body length a protected record's header announces; raises for a bad header, and
    for a body longer than ``max_body`` (our advertised record_size_limit plus the tag)."""
    outer, version, length = _HEADER.unpack_from(header)
    if outer != ContentType.APPLICATION_DATA:
        raise RecordError(
            errno.EBADMSG,
            f"unexpected outer record type {outer} (protected TLS 1.3 records are 23)",
            AlertDescription.UNEXPECTED_MESSAGE,
        )
    if version != ProtocolVersion.TLS_1_2:
        raise RecordError(
            errno.EBADMSG,
            f"bad record version 0x{version:04x}",
            AlertDescription.DECODE_ERROR,
        )
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
    if max_body and length > max_body:
        raise RecordError(
            errno.EMSGSIZE,
            f"TLS record of {length} bytes carries more than the {max_body - TAG_SIZE} bytes "
            "of plaintext our record_size_limit allows (record_overflow)",
            AlertDescription.RECORD_OVERFLOW,
        )
    return int(length)


# The user layer's receive window: what one peek at the socket may show, and how much
# plaintext one recv_many call may merge (16 full records each).
_WINDOW = 1 << 18
_MERGE = 1 << 18
_PEEK = -1  # I/O requests of UserRecordLayer._step: peek at the socket
_ADOPT = -2  # take the incomplete record the window shows off the socket
_PEEK_FLAGS = int(socket.MSG_PEEK)
_PEEK_NOW = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
# Consuming bytes already peeked at: TCP discards them without copying; other stream
# sockets ignore the flag and copy them into the buffer given, which is then overwritten.
_DISCARD = int(socket.MSG_TRUNC)


class UserRecordLayer(RecordLayer):
    """TLS 1.3 records protected in user space; same semantics as :class:`KernelRecordLayer`.

    Receiving peeks at the socket (``MSG_PEEK``, up to 256 KiB at a time), opens the complete
    records it shows one after the other and then consumes exactly the bytes of those it
    opened: never past a KeyUpdate record, so what follows one stays in the socket until the
    next key is installed, as with kTLS, and socket readiness stays truthful. A record the
    socket holds only part of is taken off it and completed with reads of exactly the missing
    bytes. Sending seals all records of a :meth:`send_data` call into one buffer (reused)
    and writes it at once.
    """

    kind = "user"

    def __init__(self, sock: socket.socket, session: Session) -> None:
        super().__init__(sock, session)
        self._tx = _Protection(session.suite, session.tx_secret, session.tx_seq)
        self._rx = _Protection(session.suite, session.rx_secret, session.rx_seq)
        self._plain_type: int = ContentType.APPLICATION_DATA
        self._plain = b""  # the undelivered rest of a record
        self._stash: Record | None = None  # an opened record due after the data before it
        self._key_expired = False
        self._eof = False
        # Receive window, allocated at first use: _wend bytes peeked (still in the socket),
        # the first _wpos of them opened (consumed before the next peek).
        self._window: memoryview | None = None
        self._wpos = self._wend = 0
        self._partial = bytearray()  # a record read off the socket in pieces
        self._out: memoryview | None = None  # plaintext of the records being delivered
        self._wire: memoryview | None = None  # records sealed by send_data
        self._scratch: memoryview | None = None  # one inner plaintext on its way to the AEAD
        # The longest record body we accept: our advertised record_size_limit plus the tag.
        self._max_body = session.max_recv_inner + TAG_SIZE

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
        _check_send(data, content_type, self.max_fragment)
        if not data:
            return None  # like kTLS: an empty application data send emits nothing
        return self._tx.seal(content_type, data)

    def _send_record(self, data: bytes | memoryview, content_type: int) -> None:
        self._sock.sendall(self._tx.seal(content_type, data))

    async def _asend_record(self, data: bytes | memoryview, content_type: int) -> None:
        wire = self._tx.seal(content_type, data)
        await asyncio.get_running_loop().sock_sendall(self._sock, wire)

    def _seal_data(self, view: memoryview) -> tuple[memoryview, int]:
        """All records of ``view`` sealed one after the other into the wire buffer."""
        total = len(view)
        fragment = self.max_fragment
        records = -(-total // fragment)
        size = total + records * (RECORD_HEADER_LENGTH + 1 + TAG_SIZE)
        wire = self._wire
        if wire is None or len(wire) < size:
            wire = self._wire = memoryview(bytearray(max(size, _MERGE)))
        scratch = self._scratch
        if scratch is None:
            scratch = self._scratch = memoryview(bytearray(MAX_PLAINTEXT + 1))
        return wire[: self._tx.seal_data(view, wire, scratch, fragment)], records

    def _send_data(self, view: memoryview) -> int:
        wire, records = self._seal_data(view)
        self._sock.sendall(wire)
        return records

    async def _asend_data(self, view: memoryview) -> int:
        wire, records = self._seal_data(view)
        # The wire buffer is reused only under the send lock, which this coroutine holds.
        await asyncio.get_running_loop().sock_sendall(self._sock, wire)
        return records

    def install_tx_key(self, secret: bytes, seq: int = 0) -> None:
        self._tx = _Protection(self.suite, secret, seq)

    # -- RX ------------------------------------------------------------------------------

    def install_rx_key(self, secret: bytes, seq: int = 0) -> None:
        self._rx = _Protection(self.suite, secret, seq)
        self._key_expired = False

    def sequence_numbers(self) -> tuple[int, int]:
        return self._tx.seq, self._rx.seq

    def pending(self) -> int:
        return len(self._plain) + (len(self._stash.data) if self._stash is not None else 0)

    def recv(self, bufsize: int = MAX_PLAINTEXT) -> Record:
        return self._recv(bufsize, merge=False)[0]

    def recv_many(self, bufsize: int) -> tuple[Record, int]:
        return self._recv(bufsize, merge=True)

    async def arecv(self, bufsize: int = MAX_PLAINTEXT) -> Record:
        return (await self._arecv(bufsize, merge=False))[0]

    async def arecv_many(self, bufsize: int) -> tuple[Record, int]:
        return await self._arecv(bufsize, merge=True)

    def _recv(self, bufsize: int, *, merge: bool) -> tuple[Record, int]:
        try:
            while True:
                step = self._step(bufsize, merge)
                if not isinstance(step, int):
                    self._settle()
                    return step
                self._io(step, _PEEK_FLAGS)
        except OSError:
            with contextlib.suppress(OSError):
                self._settle()  # a record that failed is taken off the socket too
            self._try_finish_failure()  # the fatal alert, if this error called for one
            raise

    async def _arecv(self, bufsize: int, *, merge: bool) -> tuple[Record, int]:
        _require_nonblocking(self._sock)
        try:
            while True:
                step = self._step(bufsize, merge)
                if not isinstance(step, int):
                    self._settle()
                    return step
                while True:
                    try:
                        self._io(step, _PEEK_NOW)
                        break
                    except (BlockingIOError, InterruptedError):
                        await _wait(self._sock, write=False)
        except OSError:
            with contextlib.suppress(OSError):
                self._settle()
            await self._atry_finish_failure()
            raise

    # I/O of the receive path; blocking or not as the socket is (asyncio: non-blocking).

    def _io(self, request: int, peek_flags: int) -> None:
        """Carry out what :meth:`_step` asked for: a peek, taking over an incomplete record,
        or reading ``request`` more bytes of one."""
        sock = self._sock
        if request == _PEEK:
            self._settle()
            window = self._window
            if window is None:
                window = self._window = memoryview(bytearray(_WINDOW))
            size = sock.recv_into(window, _WINDOW, peek_flags)
            if not size:
                self._eof_from_socket()
            self._wend = size
        elif request == _ADOPT:
            assert self._window is not None
            size, self._wend = self._wend, 0
            self._partial = bytearray(self._window[:size])
            self._discard(size)
        else:
            data = sock.recv(request)
            if not data:
                self._eof_from_socket()
            self._partial += data

    def _eof_from_socket(self) -> None:
        if self._partial or self._wend > self._wpos:
            raise self._broken(
                ConnectionResetError(
                    errno.ECONNRESET, "connection closed in the middle of a TLS record"
                )
            )
        self._eof = True  # TCP EOF on a record boundary

    def _settle(self) -> None:
        """Consume the bytes of the records opened from the window; forget the window."""
        opened, self._wpos, self._wend = self._wpos, 0, 0
        if opened:
            self._discard(opened)

    def _discard(self, count: int) -> None:
        assert self._window is not None
        while count:
            try:
                got = self._sock.recv_into(self._window, count, _DISCARD)
            except InterruptedError:
                continue
            if not got:
                raise self._broken(
                    ConnectionResetError(
                        errno.ECONNRESET, "bytes peeked from the socket vanished"
                    )
                )
            count -= got

    # The sans-I/O part of the receive path.

    def _broken(self, exc: OSError) -> OSError:
        """A fatal error of the received stream: recorded, sticky, its alert queued."""
        return self._fail(exc, exc.description if isinstance(exc, RecordError) else None)

    def _deliver(self, bufsize: int) -> Record:
        chunk, self._plain = self._plain[:bufsize], self._plain[bufsize:]
        return Record(self._plain_type, chunk)

    def _release(self, record: Record, bufsize: int) -> Record:
        """Hand out an opened record of its own: end of stream, or a non-data record."""
        if record.eof:
            self._eof = True
            return record
        if record.content_type == ContentType.HANDSHAKE and record.data[:1] == _KEY_UPDATE:
            self._key_expired = True  # the kernel's rule: first byte of the record
        if len(record.data) > bufsize:
            self._plain_type, self._plain = record.content_type, record.data
            return self._deliver(bufsize)
        return record

    def _next_ciphertext(self) -> tuple[memoryview, memoryview, int] | None:
        """Header, body and window size of the next complete record, or None."""
        partial = self._partial
        if partial:
            if len(partial) < RECORD_HEADER_LENGTH:
                return None
            length = _record_length(partial, self._max_body)
            if len(partial) < RECORD_HEADER_LENGTH + length:
                return None
            view = memoryview(partial)
            return view[:RECORD_HEADER_LENGTH], view[RECORD_HEADER_LENGTH:], 0
        start = self._wpos
        if self._wend - start < RECORD_HEADER_LENGTH:
            return None
        window = self._window
        assert window is not None
        body = start + RECORD_HEADER_LENGTH
        length = _record_length(window[start:body], self._max_body)
        if self._wend - body < length:
            return None
        return window[start:body], window[body : body + length], RECORD_HEADER_LENGTH + length

    def _request(self) -> int:
        """What to read next, now that no complete record is at hand."""
        partial = self._partial
        if partial:
            if len(partial) < RECORD_HEADER_LENGTH:
                return RECORD_HEADER_LENGTH - len(partial)
            return RECORD_HEADER_LENGTH + _record_length(partial, self._max_body) - len(partial)
        if self._wpos == 0 and self._wend:
            # The socket held only the start of the next record when we looked. It can only
            # be the next record we need: take it over and read exactly the rest.
            return _ADOPT
        return _PEEK

    def _step(self, bufsize: int, merge: bool) -> tuple[Record, int] | int:
        """Advance as far as possible without I/O: ``(record, records received)``, or an I/O
        request for :meth:`_io`. ``merge`` joins the data of consecutive application data
        records up to ``bufsize`` bytes."""
        if bufsize <= 0:
            raise ValueError("bufsize must be positive")
        if self._plain:
            return self._deliver(bufsize), 0
        if self._stash is not None:
            record, self._stash = self._stash, None
            return self._release(record, bufsize), 1
        self._raise_failure()
        if self._eof:
            return EOF_RECORD, 0
        if self._key_expired:
            raise OSError(
                errno.EKEYEXPIRED,
                "peer updated its traffic keys: install the next receive key",
            )
        out = self._out
        if out is None:
            out = self._out = memoryview(bytearray(_MERGE + MAX_PLAINTEXT + 1))
        limit = min(bufsize, _MERGE) if merge else 0
        size = count = 0  # application data opened into out, and its records
        window, open_into, unpack_from = self._window, self._rx.open_into, _HEADER.unpack_from
        max_body = self._max_body
        while True:
            try:
                if self._partial or window is None:
                    found = self._next_ciphertext()
                    if found is None:
                        break
                    header, body, _ = found
                    self._partial = bytearray()  # taken: whether it opens or not
                else:  # the next record in the window, the common case written out
                    start = self._wpos
                    if self._wend - start < RECORD_HEADER_LENGTH:
                        break
                    outer, version, length = unpack_from(window, start)
                    if outer != ContentType.APPLICATION_DATA or version != _VERSION or not (
                        _MIN_BODY <= length <= max_body
                    ):
                        # raises
                        _record_length(window[start : start + RECORD_HEADER_LENGTH], max_body)
                    begin = start + RECORD_HEADER_LENGTH
                    end = begin + length
                    if self._wend < end:
                        break
                    self._wpos = end  # taken off the socket, whether it opens or not
                    header, body = window[start:begin], window[begin:end]
                content_type, length = open_into(header, body, out[size:])
                del header, body
                if content_type == ContentType.APPLICATION_DATA:
                    if length:
                        size += length
                        count += 1
                        if size >= limit:
                            break
                    continue  # zero-length application data is skipped: empty means EOF
                record = Record(content_type, out[size : size + length].tobytes())
                if content_type == ContentType.ALERT:
                    alert = _interpret_alert(record.data)
                    if alert is None:
                        continue  # user_canceled
                    record = alert
            except OSError as exc:
                error = self._broken(exc)
                if not count:
                    raise error from None
                break  # deliver the data before it; the error comes next time
            if count:
                self._stash = record
                break
            return self._release(record, bufsize), 1
        if count:
            data = out[:size].tobytes()
            if size > bufsize:
                self._plain_type, self._plain = ContentType.APPLICATION_DATA, data[bufsize:]
                data = data[:bufsize]
            return Record(ContentType.APPLICATION_DATA, data), count
        return self._request()


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
        # The peer's record_size_limit: kTLS caps its records (TLS_TX_MAX_PAYLOAD_LEN), or,
        # on kernels without that, every write here is cut to the limit (kTLS closes a
        # record at the end of each sendmsg).
        capped = ktls.apply_record_size_limit(sock, session)
        self._write_size = 0 if capped else self.max_fragment
        ktls.install_rx_key(sock, session.suite, session.rx_secret, session.rx_seq)

    def __repr__(self) -> str:
        return f"KernelRecordLayer(suite={self.suite.iana_name}, fd={self._sock.fileno()})"

    def _send_record(self, data: bytes | memoryview, content_type: int) -> None:
        ktls.send_record(self._sock, content_type, bytes(data))

    async def _asend_record(self, data: bytes | memoryview, content_type: int) -> None:
        view = memoryview(bytes(data))
        while view:
            try:
                view = view[ktls.send_record_some(self._sock, content_type, view) :]
            except (BlockingIOError, InterruptedError):
                await _wait(self._sock, write=True)

    def _send_data(self, view: memoryview) -> int:
        # One sendmsg: the kernel cuts application data into records of max_fragment bytes
        # itself (unless it cannot cap them: then one sendmsg per record).
        records = -(-len(view) // self.max_fragment)
        for chunk in self._writes(view):
            while chunk:  # a partial write leaves the record open: complete just this one
                sent = ktls.send_record_some(self._sock, ContentType.APPLICATION_DATA, chunk)
                chunk = chunk[sent:]
        return records

    def _writes(self, view: memoryview) -> list[memoryview]:
        size = self._write_size
        if not size:
            return [view]
        return [view[start : start + size] for start in range(0, len(view), size)]

    async def _asend_data(self, view: memoryview) -> int:
        records = -(-len(view) // self.max_fragment)
        for chunk in self._writes(view):
            while chunk:  # as in _send_data: complete one write before the next
                try:
                    sent = ktls.send_record_some(self._sock, ContentType.APPLICATION_DATA, chunk)
                except (BlockingIOError, InterruptedError):
                    await _wait(self._sock, write=True)
                    continue
                chunk = chunk[sent:]
        return records

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
