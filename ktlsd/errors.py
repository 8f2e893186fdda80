"""Why a handshake failed, as a small set of causes each mapped to the kernel's DONE status.

Every failure the engine, the keyring edge or the agent can meet is reported as a
:class:`HandshakeError` carrying one :class:`FailureCause` and a one-line, secret-free
reason. The cause decides the positive errno the agent puts in DONE's STATUS attribute,
following what tlshd sends and what the in-kernel consumers understand:

=====================  ============  ==================================================
cause                  DONE status   meaning
=====================  ============  ==================================================
PEER_REJECTED          EACCES        the peer refused us, or authentication failed
UNKNOWN_PSK_IDENTITY   EKEYREJECTED  no PSK identity in common (unknown_psk_identity)
UNTRUSTED_CERTIFICATE  EACCES        peer chain not trusted, expired, revoked, wrong name
PEER_CLOSED            ETIMEDOUT     the peer closed before the handshake finished
TIMEOUT                ETIMEDOUT     the handshake did not finish within its timeout
PROTOCOL_ERROR         EIO           garbage, unexpected messages, internal TLS errors
MISSING_MATERIAL       ENOKEY        a key, certificate or key serial we need is absent
UNSUPPORTED            EOPNOTSUPP    a request we cannot serve (mode, message type)
INVALID_REQUEST        EINVAL        malformed request parameters
=====================  ============  ==================================================
"""

from __future__ import annotations

import enum
import errno


class FailureCause(enum.Enum):
    """The reason class of a failed handshake; ``.errno`` is the DONE status."""

    PEER_REJECTED = errno.EACCES
    UNKNOWN_PSK_IDENTITY = errno.EKEYREJECTED
    UNTRUSTED_CERTIFICATE = -errno.EACCES  # distinct member, same errno (see .errno)
    PEER_CLOSED = errno.ETIMEDOUT
    TIMEOUT = -errno.ETIMEDOUT
    PROTOCOL_ERROR = errno.EIO
    MISSING_MATERIAL = errno.ENOKEY
    UNSUPPORTED = errno.EOPNOTSUPP
    INVALID_REQUEST = errno.EINVAL

    @property
    def errno(self) -> int:
        """The positive errno to report in DONE's STATUS attribute."""
        return abs(self.value)

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


class HandshakeError(Exception):
    """A handshake (or the preparation of one) failed.

    ``str(error)`` is a single line: ``"<cause label>: <reason>"``. The reason must never
    contain key material; callers build it from names, serials and library error strings.
    """

    def __init__(self, cause: FailureCause, reason: str) -> None:
        self.cause = cause
        self.reason = " ".join(reason.split())  # always one line
        super().__init__(f"{cause.label}: {self.reason}")

    @property
    def errno(self) -> int:
        return self.cause.errno
