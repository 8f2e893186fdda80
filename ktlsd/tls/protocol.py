"""TLS 1.3 protocol numbers: the values RFC 8446 puts on the wire, in one place.

Every module that reads or writes a TLS byte names it from here, never by its number:

* :class:`ContentType` — ``TLSPlaintext.type`` / ``TLSInnerPlaintext.type`` (RFC 8446 §5.1);
* :class:`AlertLevel` and :class:`AlertDescription` — the two bytes of an alert (§6);
* :class:`HandshakeType` — ``Handshake.msg_type`` (§4), for the TLS 1.3 messages;
* :class:`KeyUpdateRequest` — the one-byte body of a KeyUpdate (§4.6.3);
* :class:`ProtocolVersion` — ``legacy_record_version`` (§5.1) and ``supported_versions`` (§4.2.1);
* the record and handshake framing sizes (§4, §5.1, §5.2).

Reserved values of earlier TLS versions are left out: a TLS 1.3 endpoint never sends them, and
one received is reported by its number (:func:`alert_name`, :attr:`HandshakeType.title`).
The enums are ``IntEnum`` so that members go straight into ``bytes((...))`` and compare equal to
the plain integers a socket hands back; a value read from the peer stays an ``int`` until it is
known to be one of ours.

Pure constants; nothing here touches a socket or a secret.
"""

from __future__ import annotations

import enum
from typing import Final

__all__ = [
    "HANDSHAKE_HEADER_LENGTH",
    "KEY_UPDATE_LENGTH",
    "MAX_CIPHERTEXT",
    "MAX_PLAINTEXT",
    "RECORD_HEADER_LENGTH",
    "AlertDescription",
    "AlertLevel",
    "ContentType",
    "HandshakeType",
    "KeyUpdateRequest",
    "ProtocolVersion",
    "alert_name",
]


class ContentType(enum.IntEnum):
    """The record content types (RFC 8446 §5.1)."""

    CHANGE_CIPHER_SPEC = 20
    ALERT = 21
    HANDSHAKE = 22
    APPLICATION_DATA = 23


class AlertLevel(enum.IntEnum):
    """``AlertLevel`` (RFC 8446 §6). TLS 1.3 ignores it on receipt: the description decides."""

    WARNING = 1
    FATAL = 2


class AlertDescription(enum.IntEnum):
    """``AlertDescription`` (RFC 8446 §6; values marked _RESERVED there are left out)."""

    CLOSE_NOTIFY = 0
    UNEXPECTED_MESSAGE = 10
    BAD_RECORD_MAC = 20
    RECORD_OVERFLOW = 22
    HANDSHAKE_FAILURE = 40
    BAD_CERTIFICATE = 42
    UNSUPPORTED_CERTIFICATE = 43
    CERTIFICATE_REVOKED = 44
    CERTIFICATE_EXPIRED = 45
    CERTIFICATE_UNKNOWN = 46
    ILLEGAL_PARAMETER = 47
    UNKNOWN_CA = 48
    ACCESS_DENIED = 49
    DECODE_ERROR = 50
    DECRYPT_ERROR = 51
    PROTOCOL_VERSION = 70
    INSUFFICIENT_SECURITY = 71
    INTERNAL_ERROR = 80
    INAPPROPRIATE_FALLBACK = 86
    USER_CANCELED = 90
    MISSING_EXTENSION = 109
    UNSUPPORTED_EXTENSION = 110
    UNRECOGNIZED_NAME = 112
    BAD_CERTIFICATE_STATUS_RESPONSE = 113
    UNKNOWN_PSK_IDENTITY = 115
    CERTIFICATE_REQUIRED = 116
    NO_APPLICATION_PROTOCOL = 120


def alert_name(description: int) -> str:
    """The RFC's name of an alert description (``"decode_error"``), or ``"alert N"``."""
    try:
        return AlertDescription(description).name.lower()
    except ValueError:
        return f"alert {description}"


class HandshakeType(enum.IntEnum):
    """``HandshakeType`` (RFC 8446 §4), the values TLS 1.3 uses."""

    CLIENT_HELLO = 1
    SERVER_HELLO = 2
    NEW_SESSION_TICKET = 4
    END_OF_EARLY_DATA = 5
    ENCRYPTED_EXTENSIONS = 8
    CERTIFICATE = 11
    CERTIFICATE_REQUEST = 13
    CERTIFICATE_VERIFY = 15
    FINISHED = 20
    KEY_UPDATE = 24
    MESSAGE_HASH = 254

    @property
    def title(self) -> str:
        """The message's name as the RFC's structures spell it (``"NewSessionTicket"``)."""
        if self is HandshakeType.MESSAGE_HASH:
            return "message_hash"  # a transcript construct (§4.4.1), not a message struct
        return "".join(word.capitalize() for word in self.name.split("_"))

    @classmethod
    def describe(cls, msg_type: int) -> str:
        """:attr:`title` of a received ``msg_type``, or ``"type N"`` when it is not ours."""
        try:
            return cls(msg_type).title
        except ValueError:
            return f"type {msg_type}"


class KeyUpdateRequest(enum.IntEnum):
    """The body of a KeyUpdate message (RFC 8446 §4.6.3)."""

    UPDATE_NOT_REQUESTED = 0
    UPDATE_REQUESTED = 1


class ProtocolVersion(enum.IntEnum):
    """Version numbers on the wire: TLS 1.3 records carry ``legacy_record_version`` 0x0303
    (§5.1); 0x0304 is what ``supported_versions`` negotiates (§4.2.1)."""

    TLS_1_2 = 0x0303
    TLS_1_3 = 0x0304


#: ``TLSPlaintext``/``TLSCiphertext`` header: type u8, legacy_record_version u16, length u16 (§5.1).
RECORD_HEADER_LENGTH: Final = 5
#: Largest plaintext of one record: 2^14 bytes (§5.1).
MAX_PLAINTEXT: Final = 2**14
#: Largest ``TLSCiphertext.length`` a TLS 1.3 peer may send: 2^14 + 256 (§5.2).
MAX_CIPHERTEXT: Final = 2**14 + 256
#: ``Handshake`` header: msg_type u8, length u24 (§4).
HANDSHAKE_HEADER_LENGTH: Final = 4
#: A KeyUpdate message is the handshake header plus its one-byte body (§4.6.3).
KEY_UPDATE_LENGTH: Final = HANDSHAKE_HEADER_LENGTH + 1
