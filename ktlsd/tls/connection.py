"""A TLS 1.3 connection after the handshake: application data plus KeyUpdate, on any record layer.

:class:`TlsConnection` is what programs and the CLI hold once a handshake has produced a
:class:`~ktlsd.tls.session.Session`. It sits on a :class:`~ktlsd.tls.record.RecordLayer` (kTLS or
user space — the same code runs on both) and owns the post-handshake protocol:

* ``send`` splits data into records of at most 16 KiB, or of the peer's RFC 8449
  ``record_size_limit`` less its content type byte when it sent a smaller one
  (:attr:`RecordLayer.max_fragment`); ``recv`` returns application data and ``b""`` at end
  of stream (close_notify or TCP EOF).
* Post-handshake handshake records are consumed here: NewSessionTicket (a server may send
  them right after the handshake, at receive sequence 0, 1, ...) is skipped; KeyUpdate moves
  the receive secret one generation forward and installs the next receive key (which also
  lifts the record layer's EKEYEXPIRED pause); anything else is a protocol error that fails
  the connection: the record layer sends the fatal alert once (:meth:`RecordLayer.abort`),
  never a close_notify after it, and every later ``send``/``recv`` raises.
* ``key_update(request_peer)`` sends a KeyUpdate under the current key and then installs the
  next transmit key at sequence 0 — the order kTLS requires (TX never pauses).
* Automatic rekeying before a key protects too much data (see
  :data:`DEFAULT_REKEY_AFTER_RECORDS`).

Answering a peer's ``update_requested`` (RFC 8446 §4.6.3): we must send a KeyUpdate of our own
before our next application data record. The answer is *due* from the moment the request is
read, and whoever next holds the transmit lock sends it: the writer before its next record, or
the reader right away when no writer is busy and the socket has room. Several requests read
before the answer goes out get a single answer, as §4.6.3 allows. One more case needs no
answer: when our own KeyUpdate with ``update_requested`` is still unanswered and the peer's
request arrives, the two crossed on the wire; the peer receives our KeyUpdate after sending its
request, which fulfils it from the peer's point of view, and the peer's KeyUpdate fulfils ours.
Answering anyway would be harmless, merely one more update. Lock-step is never at risk: each
side moves its receive secret exactly once per KeyUpdate message it reads, whatever the timing.

Structure: the protocol logic is a small sans-I/O core that turns events into a list of typed
actions — :class:`SendRecord` (one record to write) and :class:`SwitchTxKey` (move the transmit
direction to its next key, after the KeyUpdate record went out). The drivers are thin: the
blocking methods write a :class:`SendRecord` with ``layer.send``, the asyncio methods with
``await layer.asend``, and both hand every action back to the core once it is done
(``_completed``), where the bookkeeping lives: counting records, and for :class:`SwitchTxKey`
installing the next key (a synchronous call on the layer in both APIs). Only the waiting
differs; the logic is written once.

Key state: the connection holds one :class:`~ktlsd.tls.session.Session` value and replaces it
on every KeyUpdate sent or read with what :func:`~ktlsd.tls.keyschedule.advance_session`
returns — the same function the agent uses for kept sessions (:mod:`ktlsd.keyupdate`). A reader
and a writer thread each move their own direction of that one value, so the swap is done under
a small lock.

Thread safety: one reader and one writer may use a connection concurrently (blocking API):
all transmission, including a KeyUpdate and its key installation, happens under one lock, so
no record can slip between a KeyUpdate and the switch to the next key. The asyncio API has
the same guarantee with an ``asyncio.Lock``. Do not mix the two APIs on one connection.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import select
import threading
from dataclasses import dataclass, field
from typing import Final, assert_never

from ktlsd.tls.keyschedule import advance_session, decode_key_update, encode_key_update
from ktlsd.tls.protocol import (
    HANDSHAKE_HEADER_LENGTH,
    KEY_UPDATE_LENGTH,
    MAX_PLAINTEXT,
    AlertDescription,
    ContentType,
    HandshakeType,
    alert_name,
)
from ktlsd.tls.record import Record, RecordLayer
from ktlsd.tls.session import Session

__all__ = [
    "DEFAULT",
    "DEFAULT_REKEY_AFTER_RECORDS",
    "Action",
    "SendData",
    "SendRecord",
    "SwitchTxKey",
    "TlsConnection",
    "TlsProtocolError",
]

#: Records protected under one key before we rekey on our own: 2^23 (8,388,608).
#:
#: RFC 8446 §5.5 says AES-GCM may protect at most 2^24.5 (about 23.7 million) full-size records
#: with one key, keeping an attacker's advantage below 2^-57. 2^23 stays a factor of ~2.8
#: below that, leaves room for records the kernel splits on its own, and still means a rekey
#: only every 128 GiB of full records — negligible cost. The same number is used for
#: ChaCha20-Poly1305, whose limit is far higher, so that behaviour does not depend on the suite.
DEFAULT_REKEY_AFTER_RECORDS: Final = 2**23


class _Default:
    def __repr__(self) -> str:
        return "DEFAULT"


#: Sentinel for "use :data:`DEFAULT_REKEY_AFTER_RECORDS`".
DEFAULT: Final = _Default()

#: Largest post-handshake handshake message we buffer (a NewSessionTicket may be large).
MAX_HANDSHAKE_MESSAGE = 2**16 + HANDSHAKE_HEADER_LENGTH


@dataclass(frozen=True, slots=True)
class SendRecord:
    """Action: write one record of ``content_type`` carrying ``payload``.

    ``repr`` shows the payload's length only (it may be application data).
    """

    content_type: ContentType
    payload: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"SendRecord({self.content_type.name}, <{len(self.payload)} bytes>)"


@dataclass(frozen=True, slots=True)
class SendData:
    """Action: write ``payload`` as application data, ``records`` records of at most 2^14
    bytes each, in as few writes as the record layer can (:meth:`RecordLayer.send_data`).

    ``repr`` shows the payload's length only.
    """

    payload: bytes | memoryview = field(repr=False)
    records: int

    def __repr__(self) -> str:
        return f"SendData(<{len(self.payload)} bytes>, records={self.records})"


@dataclass(frozen=True, slots=True)
class SwitchTxKey:
    """Action: our KeyUpdate is out; move the transmit direction to its next key (sequence 0).

    ``request_peer``: that KeyUpdate carried ``update_requested``. No secret travels in the
    action; the core derives the next key from its own :class:`Session` when it completes.
    """

    request_peer: bool


#: What the sans-I/O core asks its drivers to do, in order.
Action = SendRecord | SendData | SwitchTxKey

#: Application data records sealed and written at once, at most (256 KiB of data; more,
#: smaller records when the peer's record size limit is below 2^14).
BATCH_RECORDS: Final = 16


class TlsProtocolError(OSError):
    """The peer broke the post-handshake protocol; we sent ``alert`` and gave up."""

    def __init__(self, alert: int, message: str) -> None:
        self.alert = alert_name(alert)
        super().__init__(errno.EPROTO, f"{' '.join(message.split())} (sent {self.alert})")

    def __str__(self) -> str:
        return str(self.strerror)


class TlsConnection:
    """Application data and KeyUpdate over a record layer, after a completed handshake.

    ``session`` must describe the state the layer was opened with (secrets, generations).
    ``rekey_after_records`` / ``rekey_after_bytes``: send a KeyUpdate on our own once our
    transmit key has protected that many application records / plaintext bytes, and ask the
    peer to update once its key has protected as many towards us. ``None`` disables a limit;
    the default is :data:`DEFAULT_REKEY_AFTER_RECORDS` records and no byte limit.
    ``rekey_request_peer``: our own automatic KeyUpdates carry ``update_requested`` (what
    ``ktlsd connect/listen --key-update-every`` does), so both directions move together.
    """

    def __init__(
        self,
        layer: RecordLayer,
        session: Session,
        *,
        rekey_after_records: int | _Default | None = DEFAULT,
        rekey_after_bytes: int | None = None,
        rekey_request_peer: bool = False,
    ) -> None:
        if isinstance(rekey_after_records, _Default):
            rekey_after_records = DEFAULT_REKEY_AFTER_RECORDS
        for name, value in (("records", rekey_after_records), ("bytes", rekey_after_bytes)):
            if value is not None and value <= 0:
                raise ValueError(f"rekey_after_{name} must be positive or None, not {value}")
        self._layer = layer
        # Secrets and generations are current; the sequence numbers are those of the last key
        # change (the layer counts records from there, see :attr:`session`).
        self._session = session
        self._session_lock = threading.Lock()  # reader and writer each advance one direction
        self._rekey_records = rekey_after_records
        self._rekey_bytes = rekey_after_bytes
        self._rekey_request_peer = rekey_request_peer

        self._tx_lock = threading.RLock()
        self._atx_lock: asyncio.Lock | None = None
        self._handshake = bytearray()
        self._rx_buffer = b""
        self._eof = False
        self._closed = False
        # (alert, message) of a protocol error
        self._failure: tuple[AlertDescription, str] | None = None
        self._pending_alert: AlertDescription | None = None

        self._response_due = False  # peer asked for an update we have not sent yet
        self._request_due = False  # we want the peer to update (its key grew old)
        self._awaiting_peer = False  # our update_requested is not answered yet

        self._tx_records_key = self._tx_bytes_key = 0
        self._rx_records_key = self._rx_bytes_key = 0
        self._key_updates_sent = self._key_updates_received = 0
        self._records_sent = self._records_received = 0
        self._bytes_sent = self._bytes_received = 0
        self._tickets_skipped = 0

    def __repr__(self) -> str:
        state = self._session
        return (
            f"TlsConnection(kind={self._layer.kind}, suite={state.suite.iana_name}, "
            f"role={state.role.value}, tx_generation={state.tx_generation}, "
            f"rx_generation={state.rx_generation})"
        )

    # -- state ---------------------------------------------------------------------------

    @property
    def layer(self) -> RecordLayer:
        return self._layer

    @property
    def session(self) -> Session:
        """The current state: secrets and generations advanced, the layer's sequence numbers.

        Save it only when :attr:`buffered` is 0, or the buffered plaintext is lost with it.
        """
        tx_seq, rx_seq = self._layer.sequence_numbers()
        return dataclasses.replace(self._session, tx_seq=tx_seq, rx_seq=rx_seq)

    def _advance(self, *, tx: bool = False, rx: bool = False) -> None:
        """Move the chosen direction(s) one generation on and install the next key(s)."""
        with self._session_lock:
            following = advance_session(self._session, tx=tx, rx=rx)
            if tx:
                self._layer.install_tx_key(following.tx_secret, following.tx_seq)
            if rx:
                self._layer.install_rx_key(following.rx_secret, following.rx_seq)
            self._session = following

    @property
    def buffered(self) -> int:
        """Application bytes received but not yet returned by ``recv``."""
        return len(self._rx_buffer) + self._layer.pending()

    key_updates_sent = property(lambda self: self._key_updates_sent, doc="KeyUpdates we sent.")
    key_updates_received = property(
        lambda self: self._key_updates_received, doc="KeyUpdates the peer sent us."
    )
    records_sent = property(lambda self: self._records_sent, doc="Application data records sent.")
    records_received = property(
        lambda self: self._records_received, doc="Application data records received."
    )
    bytes_sent = property(lambda self: self._bytes_sent, doc="Application bytes sent.")
    bytes_received = property(lambda self: self._bytes_received, doc="Application bytes received.")
    tickets_skipped = property(
        lambda self: self._tickets_skipped, doc="NewSessionTicket messages ignored."
    )

    # -- sans-I/O core: transmit ---------------------------------------------------------

    def _plan_key_update(self, request_peer: bool) -> list[Action]:
        self._response_due = False  # any KeyUpdate of ours answers a pending request
        if request_peer:
            self._request_due = False
        return [
            SendRecord(ContentType.HANDSHAKE, encode_key_update(request_peer)),
            SwitchTxKey(request_peer),
        ]

    def _completed(self, action: Action) -> None:
        """Bookkeeping once a driver has carried ``action`` out (the send did not raise)."""
        match action:
            case SendRecord(content_type=ContentType.APPLICATION_DATA):
                self._count_tx(len(action.payload))
            case SendRecord():
                pass
            case SendData(payload=payload, records=records):
                self._count_tx(len(payload), records)
            case SwitchTxKey(request_peer=request_peer):
                self._advance(tx=True)
                self._key_updates_sent += 1
                self._tx_records_key = self._tx_bytes_key = 0
                if request_peer:
                    self._awaiting_peer = True
            case _:
                assert_never(action)

    def _plan_due(self, upcoming_bytes: int) -> list[Action]:
        """KeyUpdates that must or should go out before the next application record."""
        if self._response_due:
            return self._plan_key_update(False)  # §4.6.3: the answer is update_not_requested
        if self._request_due:
            return self._plan_key_update(True)
        if upcoming_bytes and self._tx_key_worn(upcoming_bytes):
            return self._plan_key_update(self._rekey_request_peer)
        return []

    def _tx_key_worn(self, upcoming_bytes: int) -> bool:
        records, size = self._rekey_records, self._rekey_bytes
        return (records is not None and self._tx_records_key >= records) or (
            size is not None
            and self._tx_bytes_key > 0
            and self._tx_bytes_key + upcoming_bytes > size
        )

    def _plan_data(self, view: memoryview) -> tuple[list[Action], int]:
        """The actions for the next part of ``view``: the KeyUpdates due, then as many records
        (up to :data:`BATCH_RECORDS`) as the transmit key may still protect. Returns them and
        how many bytes of ``view`` they send."""
        total = len(view)
        fragment = self._layer.max_fragment  # the peer's record size limit, or 2^14
        actions = self._plan_due(min(total, fragment))
        # A KeyUpdate planned above starts the next key from zero.
        used_records, used_bytes = (
            (0, 0) if actions else (self._tx_records_key, self._tx_bytes_key)
        )
        limit_records, limit_bytes = self._rekey_records, self._rekey_bytes
        # Smaller records (a peer's record size limit) come in larger batches: ~256 KiB each.
        batch = BATCH_RECORDS * (MAX_PLAINTEXT // fragment)
        records = min(batch, -(-total // fragment))
        size = min(total, records * fragment)
        if limit_bytes is not None or (
            limit_records is not None and used_records + records > limit_records
        ):
            # Stop before the record that would wear the key out (the first one is fine:
            # _plan_due rekeyed if it was not). The same rule as _tx_key_worn, per record.
            records = size = 0
            while size < total and records < batch:
                chunk = min(fragment, total - size)
                if records and (
                    (limit_records is not None and used_records + records >= limit_records)
                    or (
                        limit_bytes is not None
                        and used_bytes + size > 0
                        and used_bytes + size + chunk > limit_bytes
                    )
                ):
                    break
                records += 1
                size += chunk
        actions.append(SendData(view[:size], records))
        return actions, size

    def _count_tx(self, size: int, records: int = 1) -> None:
        self._records_sent += records
        self._bytes_sent += size
        self._tx_records_key += records
        self._tx_bytes_key += size

    def _data_view(self, data: bytes | bytearray | memoryview) -> memoryview:
        self._check_usable()
        if self._closed:
            raise BrokenPipeError(errno.EPIPE, "TLS connection closed for sending")
        view = memoryview(data)
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")

    # -- sans-I/O core: receive ----------------------------------------------------------

    def _on_record(self, record: Record, records: int = 1) -> bytes | None:
        """Digest one record (or ``records`` records of application data merged into one):
        application bytes, b"" (nothing for the caller) or None (EOF)."""
        if record.eof:
            return None
        if record.content_type == ContentType.APPLICATION_DATA:
            self._records_received += records
            self._bytes_received += len(record.data)
            self._rx_records_key += records
            self._rx_bytes_key += len(record.data)
            if self._rx_key_worn() and not self._awaiting_peer:
                self._request_due = True
            return record.data
        if record.content_type == ContentType.HANDSHAKE:
            self._on_handshake(record.data)
            return b""
        raise self._protocol_error(
            AlertDescription.UNEXPECTED_MESSAGE,
            f"unexpected record of content type {record.content_type}",
        )

    def _rx_key_worn(self) -> bool:
        # Strictly more than our own limit: a peer rekeying at the same limit never triggers
        # a request; one that does not rekey at all gets asked.
        records, size = self._rekey_records, self._rekey_bytes
        return (records is not None and self._rx_records_key > records) or (
            size is not None and self._rx_bytes_key > size
        )

    def _on_handshake(self, data: bytes) -> None:
        if data[:1] == bytes((HandshakeType.KEY_UPDATE,)):
            # The record layer paused on this record (the kernel's first-byte rule). Only a
            # KeyUpdate alone in its record can be followed safely: anything sharing the
            # record was decrypted with a key the peer no longer uses, or vice versa.
            if not self._handshake and len(data) >= 4 and data[1:4] != b"\x00\x00\x01":
                raise self._protocol_error(
                    AlertDescription.DECODE_ERROR,
                    f"KeyUpdate of {int.from_bytes(data[1:4], 'big')} bytes (must be 1)",
                )
            if self._handshake or len(data) != KEY_UPDATE_LENGTH:
                raise self._protocol_error(
                    AlertDescription.UNEXPECTED_MESSAGE, "KeyUpdate not alone in its record"
                )
            try:
                requested = decode_key_update(data)
            except ValueError as exc:
                raise self._protocol_error(AlertDescription.ILLEGAL_PARAMETER, str(exc)) from None
            self._on_key_update(requested)
            return
        self._handshake += data
        while len(self._handshake) >= HANDSHAKE_HEADER_LENGTH:
            msg_type = self._handshake[0]
            length = int.from_bytes(self._handshake[1:HANDSHAKE_HEADER_LENGTH], "big")
            size = HANDSHAKE_HEADER_LENGTH + length
            if size > MAX_HANDSHAKE_MESSAGE:
                raise self._protocol_error(
                    AlertDescription.DECODE_ERROR,
                    f"post-handshake message of {length} bytes is too large",
                )
            if msg_type != HandshakeType.NEW_SESSION_TICKET:
                if msg_type == HandshakeType.KEY_UPDATE:
                    raise self._protocol_error(
                        AlertDescription.UNEXPECTED_MESSAGE,
                        "KeyUpdate not at the start of its record",
                    )
                raise self._protocol_error(
                    AlertDescription.UNEXPECTED_MESSAGE,
                    f"unexpected post-handshake message {HandshakeType.describe(msg_type)}",
                )
            if len(self._handshake) < size:
                return  # a ticket continued in the next record
            del self._handshake[:size]
            self._tickets_skipped += 1

    def _on_key_update(self, requested: bool) -> None:
        self._advance(rx=True)
        self._key_updates_received += 1
        self._rx_records_key = self._rx_bytes_key = 0
        if requested and not self._awaiting_peer:
            self._response_due = True
        # Whatever the peer sent, it answers (or crossed) our outstanding request.
        self._awaiting_peer = False
        self._request_due = False

    def _protocol_error(self, alert: AlertDescription, message: str) -> TlsProtocolError:
        self._failure = (alert, message)
        self._pending_alert = alert
        return TlsProtocolError(alert, message)

    def _check_usable(self) -> None:
        if self._failure is not None:
            alert, message = self._failure
            raise TlsProtocolError(alert, f"connection failed earlier: {message}")

    def _take(self, bufsize: int) -> bytes:
        chunk, self._rx_buffer = self._rx_buffer[:bufsize], self._rx_buffer[bufsize:]
        return chunk

    # -- blocking API --------------------------------------------------------------------

    def _run(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendData):
                self._layer.send_data(action.payload)
            elif isinstance(action, SendRecord):
                self._layer.send(action.payload, action.content_type)
            self._completed(action)

    def send(self, data: bytes | bytearray | memoryview) -> None:
        """Send application data (any length; records of at most 16 KiB, written up to
        :data:`BATCH_RECORDS` at a time)."""
        view = self._data_view(data)
        while view:
            with self._tx_lock:
                actions, size = self._plan_data(view)
                self._run(actions)
            view = view[size:]
        self._flush_due()  # a reader may have made a KeyUpdate due while we held the lock

    def key_update(self, request_peer: bool = False) -> None:
        """Send a KeyUpdate and switch to the next transmit key.

        ``request_peer`` asks the peer to update its own transmit key too.
        """
        self._check_usable()
        with self._tx_lock:
            self._run(self._plan_key_update(request_peer))
        self._flush_due()

    def _can_flush(self) -> bool:
        """Whether the reader may send a due KeyUpdate itself, right now.

        Only when no KeyUpdate is due does this cost nothing. Otherwise the reader sends only
        if the socket has room: a reader blocked in a send stops draining its socket, and two
        such readers facing each other would wait forever. A KeyUpdate left unsent here goes
        out before our next application record, which is all RFC 8446 §4.6.3 requires.
        """
        if not (self._response_due or self._request_due) or self._closed:
            return False
        poller = select.poll()
        poller.register(self._layer.fileno(), select.POLLOUT)
        return bool(poller.poll(0))

    def _flush_due(self) -> None:
        # Reader side: never wait for the writer; if one holds the lock, it sends the
        # KeyUpdate before its next record.
        if not self._can_flush():
            return
        if self._tx_lock.acquire(blocking=False):
            try:
                self._run(self._plan_due(0))
            finally:
                self._tx_lock.release()

    def _send_alert(self, error: TlsProtocolError) -> None:
        # The record layer sends the alert once (never after our close_notify) and fails
        # the connection for good: no close_notify follows, later sends raise.
        alert, self._pending_alert = self._pending_alert, None
        self._layer.abort(error, alert)

    def recv(self, bufsize: int = MAX_PLAINTEXT) -> bytes:
        """Up to ``bufsize`` bytes of application data; ``b""`` at end of stream."""
        if bufsize <= 0:
            raise ValueError("bufsize must be positive")
        while True:
            if self._rx_buffer:
                return self._take(bufsize)
            if self._eof:
                return b""
            self._check_usable()
            record, records = self._layer.recv_many(max(bufsize, MAX_PLAINTEXT))
            try:
                data = self._on_record(record, records)
            except TlsProtocolError as exc:
                self._send_alert(exc)
                raise
            self._flush_due()
            if data is None:
                self._eof = True
            else:
                self._rx_buffer = data

    def close(self) -> None:
        """Send close_notify and shut down our write side (idempotent). Reading stays possible."""
        if self._closed:
            return
        with self._tx_lock:
            self._closed = True
            self._layer.close()

    def __enter__(self) -> TlsConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- asyncio API ---------------------------------------------------------------------

    def _alock(self) -> asyncio.Lock:
        if self._atx_lock is None:
            self._atx_lock = asyncio.Lock()
        return self._atx_lock

    async def _arun(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, SendData):
                await self._layer.asend_data(action.payload)
            elif isinstance(action, SendRecord):
                await self._layer.asend(action.payload, action.content_type)
            self._completed(action)

    async def asend(self, data: bytes | bytearray | memoryview) -> None:
        """asyncio version of :meth:`send` (the layer's socket must be non-blocking)."""
        view = self._data_view(data)
        while view:
            async with self._alock():
                actions, size = self._plan_data(view)
                await self._arun(actions)
            view = view[size:]
        await self._aflush_due()

    async def akey_update(self, request_peer: bool = False) -> None:
        """asyncio version of :meth:`key_update`."""
        self._check_usable()
        async with self._alock():
            await self._arun(self._plan_key_update(request_peer))
        await self._aflush_due()

    async def _aflush_due(self) -> None:
        if not self._can_flush():
            return
        lock = self._alock()
        if not lock.locked():
            async with lock:
                await self._arun(self._plan_due(0))

    async def _asend_alert(self, error: TlsProtocolError) -> None:
        alert, self._pending_alert = self._pending_alert, None
        await self._layer.aabort(error, alert)

    async def arecv(self, bufsize: int = MAX_PLAINTEXT) -> bytes:
        """asyncio version of :meth:`recv`."""
        if bufsize <= 0:
            raise ValueError("bufsize must be positive")
        while True:
            if self._rx_buffer:
                return self._take(bufsize)
            if self._eof:
                return b""
            self._check_usable()
            record, records = await self._layer.arecv_many(max(bufsize, MAX_PLAINTEXT))
            try:
                data = self._on_record(record, records)
            except TlsProtocolError as exc:
                await self._asend_alert(exc)
                raise
            await self._aflush_due()
            if data is None:
                self._eof = True
            else:
                self._rx_buffer = data

    async def aclose(self) -> None:
        """asyncio version of :meth:`close`."""
        if self._closed:
            return
        async with self._alock():
            self._closed = True
            await self._layer.aclose()
