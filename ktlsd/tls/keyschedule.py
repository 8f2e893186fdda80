"""The slice of the TLS 1.3 key schedule (RFC 8446 §7) a record layer needs after a handshake.

The handshake engine hands over *traffic secrets*; everything a record layer does later is a
pure function of those: the AEAD key and write IV for a secret (§7.3), the per-record nonce
(§5.3), and the next-generation secret a KeyUpdate moves to (§7.2). The KeyUpdate handshake
message itself (§4.6.3) is five bytes and lives here too, so that the kernel path
(:mod:`ktlsd.tls.ktls`) and the user-space path (:mod:`ktlsd.tls.record`) share one encoder and one
strict decoder.

KeyUpdate lock-step is :func:`advance_session`, the one function that moves a
:class:`~ktlsd.tls.session.Session` to its next generation. Both places that follow KeyUpdates
use it: :class:`ktlsd.tls.connection.TlsConnection` (a program's own connection) and
:mod:`ktlsd.keyupdate` (the agent updating a consumer's kept session).

Everything here is pure and built on ``cryptography``'s HKDF-Expand; nothing touches a socket.
Secrets and keys never appear in a ``repr`` or an exception message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from ktlsd.tls.protocol import (
    HANDSHAKE_HEADER_LENGTH,
    KEY_UPDATE_LENGTH,
    HandshakeType,
    KeyUpdateRequest,
)
from ktlsd.tls.session import CipherSuite, Role, Session

__all__ = [
    "TrafficKeys",
    "advance_session",
    "decode_key_update",
    "encode_key_update",
    "hkdf_expand_label",
    "next_traffic_secret",
    "record_nonce",
    "traffic_keys",
]

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
}

_LABEL_PREFIX = b"tls13 "


def _hash_algorithm(hash_name: str) -> hashes.HashAlgorithm:
    try:
        return _HASHES[hash_name.lower()]()
    except KeyError:
        raise ValueError(
            f"unsupported hash {hash_name!r} (TLS 1.3 uses sha256 or sha384)"
        ) from None


def hkdf_expand_label(
    hash_name: str, secret: bytes, label: bytes, context: bytes, length: int
) -> bytes:
    """HKDF-Expand-Label from RFC 8446 §7.1.

    ``label`` is given *without* the ``"tls13 "`` prefix (``b"key"``, ``b"traffic upd"``);
    ``context`` is the transcript hash for Derive-Secret or empty for traffic keys.
    The ``HkdfLabel`` structure is ``u16 length || u8 len || "tls13 " label || u8 len || context``.
    """
    algorithm = _hash_algorithm(hash_name)
    full_label = _LABEL_PREFIX + bytes(label)
    if not 0 < length <= 255 * algorithm.digest_size:
        raise ValueError(f"HKDF-Expand-Label length {length} out of range")
    if len(full_label) > 255 or len(context) > 255:
        raise ValueError("HKDF-Expand-Label label or context longer than 255 bytes")
    info = (
        struct.pack("!HB", length, len(full_label))
        + full_label
        + struct.pack("!B", len(context))
        + bytes(context)
    )
    return HKDFExpand(algorithm=algorithm, length=length, info=info).derive(bytes(secret))


@dataclass(frozen=True)
class TrafficKeys:
    """The AEAD key and the 12-byte write IV derived from one traffic secret (RFC 8446 §7.3).

    Both fields are secret; ``repr`` shows only their lengths.
    """

    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"TrafficKeys(key=<{len(self.key)} bytes>, iv=<{len(self.iv)} bytes>)"


def _check_secret(suite: CipherSuite, secret: bytes) -> None:
    if len(secret) != suite.hash_length:
        raise ValueError(
            f"traffic secret for {suite.iana_name} must be {suite.hash_length} bytes, "
            f"got {len(secret)}"
        )


def traffic_keys(suite: CipherSuite, secret: bytes) -> TrafficKeys:
    """Derive ``[sender]_write_key`` and ``[sender]_write_iv`` from a traffic secret."""
    _check_secret(suite, secret)
    key = hkdf_expand_label(suite.hash_name, secret, b"key", b"", suite.key_length)
    iv = hkdf_expand_label(suite.hash_name, secret, b"iv", b"", suite.iv_length)
    return TrafficKeys(key=key, iv=iv)


def next_traffic_secret(suite: CipherSuite, secret: bytes) -> bytes:
    """The next generation of a traffic secret (RFC 8446 §7.2).

    ``application_traffic_secret_N+1 =
    HKDF-Expand-Label(application_traffic_secret_N, "traffic upd", "", Hash.length)``.
    Each KeyUpdate moves one direction forward by exactly one generation; both ends must
    apply this the same number of times, which is why the secret (not the derived key) is
    what a saved session keeps.
    """
    _check_secret(suite, secret)
    return hkdf_expand_label(suite.hash_name, secret, b"traffic upd", b"", suite.hash_length)


def advance_session(session: Session, *, tx: bool = False, rx: bool = False) -> Session:
    """``session`` with the chosen directions moved to their next generation (RFC 8446 §4.6.3).

    ``tx`` is the direction this side sends (its own KeyUpdate went out), ``rx`` the direction
    it receives (it read the peer's KeyUpdate); both for an update that answers a request.
    Each chosen direction gets :func:`next_traffic_secret` of its current secret, its
    generation counter goes up by one, and its record sequence number restarts at 0, as every
    new key's does (§5.3). The other direction is left exactly as it was.

    This is the one place a :class:`Session` is advanced: applied once per KeyUpdate message
    sent or read, it keeps both ends in lock-step.
    """
    if not (tx or rx):
        raise ValueError("advance_session needs tx, rx or both")
    suite = session.suite
    client = tx if session.role is Role.CLIENT else rx
    server = rx if session.role is Role.CLIENT else tx
    out = session
    if client:
        out = replace(
            out,
            client_secret=next_traffic_secret(suite, out.client_secret),
            client_generation=out.client_generation + 1,
        )
    if server:
        out = replace(
            out,
            server_secret=next_traffic_secret(suite, out.server_secret),
            server_generation=out.server_generation + 1,
        )
    if tx:
        out = replace(out, tx_seq=0)
    if rx:
        out = replace(out, rx_seq=0)
    return out


def record_nonce(iv: bytes, seq: int) -> bytes:
    """The per-record AEAD nonce: the write IV XOR the 64-bit record number, left-padded (§5.3).

    The record number must fit in 64 bits; TLS forbids wrapping it (a rekey comes first).
    """
    if len(iv) < 8:
        raise ValueError(f"write IV must be at least 8 bytes, got {len(iv)}")
    if not 0 <= seq < 2**64:
        raise ValueError(f"record sequence number {seq} outside 0..2^64-1")
    padded = seq.to_bytes(len(iv), "big")
    return bytes(a ^ b for a, b in zip(iv, padded, strict=True))


def encode_key_update(request_update: bool) -> bytes:
    """The KeyUpdate handshake message: ``0x18 00 00 01`` then 1 (update_requested) or 0."""
    request = KeyUpdateRequest(int(request_update))  # UPDATE_REQUESTED is 1
    return bytes((HandshakeType.KEY_UPDATE,)) + (1).to_bytes(3, "big") + bytes((request,))


def decode_key_update(msg: bytes) -> bool:
    """Parse a complete KeyUpdate message and return its ``request_update`` flag.

    Strict: exactly five bytes, type 24, length 1, and a flag of 0 or 1 — RFC 8446 §4.6.3
    makes any other value an ``illegal_parameter``. Raises :class:`ValueError` with a one-line
    message otherwise.
    """
    msg = bytes(msg)
    if len(msg) < HANDSHAKE_HEADER_LENGTH:
        raise ValueError(f"KeyUpdate message truncated ({len(msg)} bytes)")
    if msg[0] != HandshakeType.KEY_UPDATE:
        raise ValueError(f"not a KeyUpdate message (handshake type {msg[0]})")
    body_length = int.from_bytes(msg[1:HANDSHAKE_HEADER_LENGTH], "big")
    if body_length != KEY_UPDATE_LENGTH - HANDSHAKE_HEADER_LENGTH:
        raise ValueError(f"KeyUpdate body must be 1 byte, header says {body_length}")
    if len(msg) != KEY_UPDATE_LENGTH:
        raise ValueError(f"KeyUpdate message must be 5 bytes, got {len(msg)}")
    request = msg[HANDSHAKE_HEADER_LENGTH]
    if request not in tuple(KeyUpdateRequest):
        raise ValueError(f"KeyUpdate request_update must be 0 or 1, got {request}")
    return request == KeyUpdateRequest.UPDATE_REQUESTED
