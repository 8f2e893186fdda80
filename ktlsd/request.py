"""One handshake request, whichever upcall source it came from, and its DONE answer.

The kernel's ``handshake`` generic netlink family and ktlsd's user-space handshake
service both produce a :class:`HandshakeRequest` (the ACCEPT reply) and take a
:class:`HandshakeDone` back. The enum values are the kernel's
(``Documentation/netlink/specs/handshake.yaml``), plus the proposed KeyUpdate additions.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class HandlerClass(enum.IntEnum):
    NONE = 0
    TLSHD = 1


class MessageType(enum.IntEnum):
    """What the consumer asks for (``handshake-msg-type``)."""

    UNSPEC = 0
    CLIENTHELLO = 1  # we are the TLS client
    SERVERHELLO = 2  # we are the TLS server
    CLIENTKEYUPDATE = 3  # proposed: key update on a client-side session
    SERVERKEYUPDATE = 4  # proposed: key update on a server-side session

    @property
    def is_key_update(self) -> bool:
        return self in (MessageType.CLIENTKEYUPDATE, MessageType.SERVERKEYUPDATE)


class AuthMode(enum.IntEnum):
    """How the peer is to be authenticated (``handshake-auth``)."""

    UNSPEC = 0
    UNAUTH = 1
    PSK = 2
    X509 = 3


class KeyUpdateType(enum.IntEnum):
    """Proposed ``key-update-type``: which KeyUpdate the consumer asks the agent to run."""

    UNSPEC = 0
    SEND = 1
    RECEIVED = 2
    RECEIVED_REQUEST_UPDATE = 3


DEFAULT_TIMEOUT_MS = 10_000
"""Handshake timeout when the request carries none."""

MAX_PEER_IDENTITIES = 5
MAX_REMOTE_AUTH = 5


@dataclass
class HandshakeRequest:
    """The parameters of an accepted handshake request (the ACCEPT reply).

    ``sockfd`` is a file descriptor owned by the agent until DONE. ``peer_identities``
    are key serials: PSKs to offer (client, in order) or, for a server, one serial or 0
    meaning "look the identity up yourself". ``certificate``/``private_key`` are key
    serials of DER blobs; 0 means "use the configured files".
    """

    sockfd: int
    message_type: MessageType
    auth_mode: AuthMode
    handler_class: HandlerClass = HandlerClass.TLSHD
    timeout_ms: int = 0
    peer_identities: tuple[int, ...] = ()
    certificate: int = 0
    private_key: int = 0
    peername: str | None = None
    keyring: int = 0
    key_update_type: KeyUpdateType = KeyUpdateType.UNSPEC
    session_id: int = 0

    @property
    def effective_timeout_ms(self) -> int:
        return self.timeout_ms if self.timeout_ms > 0 else DEFAULT_TIMEOUT_MS


@dataclass
class HandshakeDone:
    """The agent's answer (DONE). ``status`` is a positive errno, 0 on success."""

    status: int
    sockfd: int
    remote_auth: tuple[int, ...] = ()
    session_id: int = 0
    extra: dict[str, object] = field(default_factory=dict)
