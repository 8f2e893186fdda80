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

:func:`plan_key_update` decides, purely, what to send and which secrets advance (each exactly
once per update); :func:`apply_key_update` carries the plan out on a :class:`KeyInstaller` —
a kTLS socket for kernel consumers, or the user-space record layer of a consumer that emulates
the kernel through the handshake service. The kept state (:mod:`ktlsd.session_store`) is
updated only after the keys are in place, so a failed update leaves the old generation kept
and the consumer can reconnect cleanly.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

from ktlsd import ktls
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.keyschedule import encode_key_update
from ktlsd.request import KeyUpdateType, MessageType
from ktlsd.session import CipherSuite, Role, Session
from ktlsd.session_store import advanced

CONTENT_TYPE_HANDSHAKE = 22


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
    ours_client = state.role is Role.CLIENT
    if kind is KeyUpdateType.SEND:
        new = advanced(state, client=ours_client, server=not ours_client)
        return KeyUpdatePlan(new, False, encode_key_update(request_peer), True)
    if kind is KeyUpdateType.RECEIVED:
        new = advanced(state, client=not ours_client, server=ours_client)
        return KeyUpdatePlan(new, True, None, False)
    if kind is KeyUpdateType.RECEIVED_REQUEST_UPDATE:
        new = advanced(state, client=True, server=True)
        return KeyUpdatePlan(new, True, encode_key_update(False), True)
    raise HandshakeError(FailureCause.INVALID_REQUEST, "key-update request without a type")


class KeyInstaller(Protocol):
    """Where the keys live: a kTLS socket, or a user-space record layer."""

    def send_handshake(self, message: bytes) -> None: ...

    def install_tx_key(self, secret: bytes) -> None: ...

    def install_rx_key(self, secret: bytes) -> None: ...


class KtlsInstaller:
    """A kernel consumer's socket, already handed to kTLS."""

    def __init__(self, sock: socket.socket, suite: CipherSuite) -> None:
        self.sock = sock
        self.suite = suite

    def send_handshake(self, message: bytes) -> None:
        ktls.send_record(self.sock, CONTENT_TYPE_HANDSHAKE, message)

    def install_tx_key(self, secret: bytes) -> None:
        ktls.install_tx_key(self.sock, self.suite, secret, 0)

    def install_rx_key(self, secret: bytes) -> None:
        ktls.install_rx_key(self.sock, self.suite, secret, 0)


def apply_key_update(plan: KeyUpdatePlan, installer: KeyInstaller) -> Session:
    """Carry out ``plan``: RX first (reads resume), then KeyUpdate under the old key, then TX."""
    new = plan.new_state
    try:
        if plan.install_rx:
            installer.install_rx_key(new.rx_secret)
        if plan.send_message is not None:
            installer.send_handshake(plan.send_message)
        if plan.install_tx:
            installer.install_tx_key(new.tx_secret)
    except OSError as exc:
        raise HandshakeError(
            FailureCause.PROTOCOL_ERROR, f"key update failed: {exc.strerror or exc}"
        ) from None
    return new
