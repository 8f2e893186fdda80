"""A tiny, test-only TLS 1.3 record protector used to prove that captured secrets are right.

Deliberately independent of ktlsd's own key schedule and record layer: it derives the write key
and IV from a traffic secret (RFC 8446 §7.3) with ``cryptography``'s HKDFExpand and protects or
opens single records (§5.2) with AES-GCM or ChaCha20-Poly1305. Only the protocol numbers come
from ktlsd (:mod:`ktlsd.tls.protocol`).
"""

from __future__ import annotations

import socket
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from ktlsd.tls.protocol import ContentType, HandshakeType, ProtocolVersion
from ktlsd.tls.session import CipherSuite

NEW_SESSION_TICKET = HandshakeType.NEW_SESSION_TICKET  # what read_application_data skips


def hkdf_expand_label(secret: bytes, label: bytes, length: int, hash_name: str) -> bytes:
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00"
    algorithm = hashes.SHA384() if hash_name == "sha384" else hashes.SHA256()
    return HKDFExpand(algorithm, length, info).derive(secret)


def _aead(suite: CipherSuite, secret: bytes) -> tuple[AESGCM | ChaCha20Poly1305, bytes]:
    key = hkdf_expand_label(secret, b"key", suite.key_length, suite.hash_name)
    iv = hkdf_expand_label(secret, b"iv", 12, suite.hash_name)
    if suite is CipherSuite.TLS_CHACHA20_POLY1305_SHA256:
        return ChaCha20Poly1305(key), iv
    return AESGCM(key), iv


def _nonce(iv: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))


def seal(
    suite: CipherSuite,
    secret: bytes,
    seq: int,
    payload: bytes,
    content_type: int = ContentType.APPLICATION_DATA,
) -> bytes:
    """One protected record carrying ``payload`` at sequence number ``seq``."""
    aead, iv = _aead(suite, secret)
    inner = payload + bytes([content_type])
    header = struct.pack(
        "!BHH", ContentType.APPLICATION_DATA, ProtocolVersion.TLS_1_2, len(inner) + 16
    )
    return header + aead.encrypt(_nonce(iv, seq), inner, header)


def open_record(suite: CipherSuite, secret: bytes, seq: int, record: bytes) -> tuple[int, bytes]:
    """Decrypt one record; return (inner content type, payload). Raises InvalidTag if wrong."""
    aead, iv = _aead(suite, secret)
    header, body = record[:5], record[5:]
    inner = aead.decrypt(_nonce(iv, seq), body, header).rstrip(b"\x00")
    return inner[-1], inner[:-1]


def recv_record(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Read exactly one TLS record from a blocking socket."""
    sock.settimeout(timeout)
    try:
        header = _recv_exactly(sock, 5)
        (length,) = struct.unpack("!H", header[3:5])
        return header + _recv_exactly(sock, length)
    finally:
        sock.settimeout(None)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return buf


def read_application_data(
    sock: socket.socket, suite: CipherSuite, secret: bytes, seq: int
) -> tuple[bytes, int, list[int]]:
    """Read records from ``seq`` on, skipping post-handshake messages (NewSessionTicket), until
    one carries application data. Returns (data, next seq, handshake message types skipped)."""
    skipped: list[int] = []
    while True:
        ctype, payload = open_record(suite, secret, seq, recv_record(sock))
        seq += 1
        if ctype == ContentType.APPLICATION_DATA:
            return payload, seq, skipped
        if ctype != ContentType.HANDSHAKE:
            raise AssertionError(f"unexpected record type {ctype}")
        skipped.append(payload[0])
