"""Key-update requests: move an established connection to its next traffic keys.

The proposed kernel series (``clientkeyupdate``/``serverkeyupdate`` with a ``key-update-type``
and a ``session-id``) asks the agent, long after the handshake, to do one of:

``SEND``
    emit a KeyUpdate handshake record under the current TX key (``request_update`` as asked),
    then install the next TX key at sequence 0;
``RECEIVED``
    the consumer read the peer's KeyUpdate (reads now fail with EKEYEXPIRED): install the next
    RX key at sequence 0;
``RECEIVED_REQUEST_UPDATE``
    as ``RECEIVED``, and the peer asked for an update: also send our own KeyUpdate with
    ``update_not_requested`` and install the next TX key.

:func:`plan_key_update` decides, purely, what to send and which directions advance (each exactly
once per update, by :func:`ktlsd.tls.keyschedule.advance_session`, the same function a
program's own :class:`~ktlsd.tls.connection.TlsConnection` uses); :func:`apply_key_update`
(a coroutine) carries the plan out on a :class:`KeyInstaller` — a kTLS socket for kernel
consumers, or the user-space record layer of a consumer that emulates the kernel through the
handshake service. The KeyUpdate record is written without ever blocking the agent's event
loop: a consumer whose peer stopped reading gets ETIMEDOUT after the request's timeout, and
every other request keeps being served.

The kept state (:mod:`ktlsd.session_store`) is updated only after the keys are in place, so a
failed update leaves the old generation kept and the consumer can reconnect cleanly.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass, replace
from typing import Protocol

from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.request import KeyUpdateType, MessageType
from ktlsd.tls import ktls
from ktlsd.tls.keyschedule import advance_session, encode_key_update
from ktlsd.tls.protocol import ContentType
from ktlsd.tls.session import CipherSuite, Role, Session


@dataclass(frozen=True)
class KeyUpdatePlan:
    """What one key-update request does."""

    new_state: Session
    install_rx: bool
    send_message: bytes | None  # the KeyUpdate handshake message to send under the old TX key
    install_tx: bool


def plan_key_update(
    state: Session,
    message_type: MessageType,
    kind: KeyUpdateType,
    *,
    request_peer: bool = False,
) -> KeyUpdatePlan:
    """Decide what a request does to ``state`` (the kept state, generation N)."""
    expected = Role.CLIENT if message_type is MessageType.CLIENTKEYUPDATE else Role.SERVER
    if not message_type.is_key_update:
        raise HandshakeError(FailureCause.INVALID_REQUEST, "not a key-update request")
    if state.role is not expected:
        raise HandshakeError(
            FailureCause.INVALID_REQUEST,
            f"{message_type.name.lower()} for a session kept as {state.role.value}",
        )
    if kind is KeyUpdateType.SEND:
        new = advance_session(state, tx=True)
        return KeyUpdatePlan(new, False, encode_key_update(request_peer), True)
    if kind is KeyUpdateType.RECEIVED:
        new = advance_session(state, rx=True)
        return KeyUpdatePlan(new, True, None, False)
    if kind is KeyUpdateType.RECEIVED_REQUEST_UPDATE:
        new = advance_session(state, tx=True, rx=True)
        return KeyUpdatePlan(new, True, encode_key_update(False), True)
    raise HandshakeError(FailureCause.INVALID_REQUEST, "key-update request without a type")


class KeyInstaller(Protocol):
    """Where the keys live: a kTLS socket, or a consumer's user-space record layer.

    Sending never blocks: :meth:`send_some` makes one ``MSG_DONTWAIT`` attempt and raises
    ``BlockingIOError`` when the socket cannot take anything, and :func:`apply_key_update`
    waits for writability on the event loop. The consumer's socket may be in blocking mode
    (its ``O_NONBLOCK`` is shared with the agent's descriptor and must not be changed), and a
    consumer whose peer stopped reading must not stall every other request of the agent.
    """

    def fileno(self) -> int: ...

    def wire_bytes(self, message: bytes) -> bytes:
        """What goes on the socket for a handshake ``message`` (kTLS frames it itself)."""
        ...

    def send_some(self, data: memoryview) -> int: ...

    def install_tx_key(self, secret: bytes) -> None: ...

    def install_rx_key(self, secret: bytes) -> None: ...


class KtlsInstaller:
    """A kernel consumer's socket, already handed to kTLS."""

    def __init__(self, sock: socket.socket, suite: CipherSuite) -> None:
        self.sock = sock
        self.suite = suite

    def fileno(self) -> int:
        return self.sock.fileno()

    def wire_bytes(self, message: bytes) -> bytes:
        return message

    def send_some(self, data: memoryview) -> int:
        # The record-type control message makes kTLS emit one handshake record; a partial
        # send is continued by the next call, as ktls.send_record does.
        record_type = [(ktls.SOL_TLS, ktls.TLS_SET_RECORD_TYPE, bytes((ContentType.HANDSHAKE,)))]
        return self.sock.sendmsg([data], record_type, socket.MSG_DONTWAIT)

    def install_tx_key(self, secret: bytes) -> None:
        ktls.install_tx_key(self.sock, self.suite, secret, 0)

    def install_rx_key(self, secret: bytes) -> None:
        ktls.install_rx_key(self.sock, self.suite, secret, 0)


class UserLayerInstaller:
    """A service consumer that runs the user-space record layer (emulating kTLS).

    The agent protects the KeyUpdate record with the consumer's current TX secret at the
    record number the consumer sent (``record_seqs``); installing keys is the consumer's own
    business once DONE has brought it the new secrets, so the install calls do nothing here.
    """

    def __init__(self, sock: socket.socket, state: Session, record_seqs: tuple[int, int]) -> None:
        from ktlsd.tls.record import UserRecordLayer

        self.sock = sock
        self._layer = UserRecordLayer(
            sock, replace(state, tx_seq=record_seqs[0], rx_seq=record_seqs[1])
        )

    def fileno(self) -> int:
        return self.sock.fileno()

    def wire_bytes(self, message: bytes) -> bytes:
        sealed = self._layer.seal(message, ContentType.HANDSHAKE)  # one record, not sent
        assert sealed is not None
        return sealed

    def send_some(self, data: memoryview) -> int:
        return self.sock.send(data, socket.MSG_DONTWAIT)

    def install_tx_key(self, secret: bytes) -> None:
        pass

    def install_rx_key(self, secret: bytes) -> None:
        pass


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def _send_all(installer: KeyInstaller, wire: bytes, deadline: float) -> None:
    """Write ``wire`` completely without blocking the event loop, by ``deadline``."""
    loop = asyncio.get_running_loop()
    view = memoryview(wire)
    while view:
        try:
            view = view[installer.send_some(view) :]
            continue
        except (BlockingIOError, InterruptedError):
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            sent = len(wire) - len(view)
            raise HandshakeError(
                FailureCause.TIMEOUT,
                "KeyUpdate not sent in time: the peer is not reading"
                + (f" ({sent} of {len(wire)} bytes written; drop the connection)" if sent else ""),
            )
        writable = loop.create_future()
        fd = installer.fileno()
        loop.add_writer(fd, _wake, writable)
        try:
            await asyncio.wait_for(writable, remaining)
        except TimeoutError:
            pass
        finally:
            loop.remove_writer(fd)


async def apply_key_update(
    plan: KeyUpdatePlan, installer: KeyInstaller, *, timeout: float = 10.0
) -> Session:
    """Carry out ``plan``: RX first (reads resume), then KeyUpdate under the old key, then TX.

    ``timeout`` bounds the wait for the socket to take the KeyUpdate record (ETIMEDOUT).
    """
    new = plan.new_state
    deadline = asyncio.get_running_loop().time() + timeout
    try:
        if plan.install_rx:
            installer.install_rx_key(new.rx_secret)
        if plan.send_message is not None:
            await _send_all(installer, installer.wire_bytes(plan.send_message), deadline)
        if plan.install_tx:
            installer.install_tx_key(new.tx_secret)
    except OSError as exc:
        raise HandshakeError(
            FailureCause.PROTOCOL_ERROR, f"key update failed: {exc.strerror or exc}"
        ) from None
    return new
