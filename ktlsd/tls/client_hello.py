"""The ClientHello (RFC 8446 §4.1.2), parsed from hostile input: its ``pre_shared_key``
extension, and the suites and groups it offers.

A TLS 1.3 client that offers external PSKs lists their identities and, in the same order, one
binder per identity. A binder is an HMAC under the hash the client bound that PSK to, so its
length tells the server which hash the client used (32 bytes: SHA-256, 48 bytes: SHA-384)
before any key is touched. ktlsd's server reads it to recognise clients that bind a SHA-384
PSK to SHA-256 (tlshd 1.0 on GnuTLS < 3.8.11), see ``[ktlsd] legacy_psk_sha384``.

Contract: :func:`parse_pre_shared_key` takes the extension body exactly as the client sent it
(OpenSSL's ``SSL_client_hello_get0_ext``) and returns every offered PSK, or raises
:class:`MalformedPskExtension` with a one-line reason. Every length is checked against what is
left before it is used; the whole extension must be consumed; identity and binder counts must
match; vector minimums from the RFC are enforced. Nothing here allocates more than the input's
size, and the work is linear in it. No OpenSSL, no I/O: a pure function.

:func:`parse_client_hello` takes a ClientHello as TLS records (what a client writes first) and
returns its cipher suites, ``supported_groups`` and ``key_share`` groups
(:class:`ClientHelloLists`), or raises :class:`MalformedClientHello`; the system crypto policy
(:mod:`ktlsd.tls.policy`) reads what the library offers that way. Same rules: every length
checked before use, pure.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BINDER_HASHES",
    "MAX_EXTENSION_BYTES",
    "ClientHelloLists",
    "MalformedClientHello",
    "MalformedPskExtension",
    "OfferedPsk",
    "parse_client_hello",
    "parse_pre_shared_key",
]

BINDER_HASHES = {32: "sha256", 48: "sha384"}
"""Binder length -> the hash it implies (TLS 1.3 defines PSK hashes SHA-256 and SHA-384 only)."""

MAX_EXTENSION_BYTES = 0xFFFF
"""An extension's body is at most 2^16-1 bytes (``extension_data<0..2^16-1>``)."""

_MIN_IDENTITIES_BYTES = 7  # PskIdentity identities<7..2^16-1>
_MIN_BINDERS_BYTES = 33  # PskBinderEntry binders<33..2^16-1>
_MIN_BINDER = 32  # opaque PskBinderEntry<32..255>


class MalformedClientHello(ValueError):
    """A ClientHello that RFC 8446 does not allow; ``str()`` says how, in one line."""


class MalformedPskExtension(MalformedClientHello):
    """The ``pre_shared_key`` extension does not follow RFC 8446 §4.2.11; ``str()`` says how
    (one line, no prefix: the caller names the extension and the peer)."""


@dataclass(frozen=True)
class OfferedPsk:
    """One offered PSK: its identity and the length of the binder sent for it.

    The binder's bytes are not kept: only its length matters before OpenSSL verifies it.
    """

    identity: bytes
    obfuscated_ticket_age: int
    binder_length: int

    @property
    def binder_hash(self) -> str | None:
        """``"sha256"``/``"sha384"`` as the binder's length implies; None for other lengths."""
        return BINDER_HASHES.get(self.binder_length)


class _Reader:
    """A cursor over bytes that never reads past the end (every read is bounds-checked)."""

    def __init__(self, data: bytes, error: type[MalformedClientHello] = MalformedClientHello
                 ) -> None:
        self._data = data
        self._pos = 0
        self._error = error

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise self._error(f"{what} needs {n} bytes, only {self.remaining} left")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def take_all(self) -> bytes:
        return self.take(self.remaining, "the rest")

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "big")

    def vector(self, length_size: int, what: str) -> _Reader:
        length = self.uint(length_size, f"the length of {what}")
        return _Reader(self.take(length, what), self._error)


def parse_pre_shared_key(extension: bytes) -> tuple[OfferedPsk, ...]:
    """The PSKs a ClientHello offers, identities paired with their binders' lengths, in order.

    Raises :class:`MalformedPskExtension` for anything RFC 8446 does not allow: a truncated or
    overlong length, trailing bytes, no identity, an empty identity, a binder shorter than 32
    bytes, or a different number of binders than identities.
    """
    if len(extension) > MAX_EXTENSION_BYTES:
        raise MalformedPskExtension(
            f"{len(extension)} bytes, more than an extension can hold ({MAX_EXTENSION_BYTES})"
        )
    outer = _Reader(bytes(extension), MalformedPskExtension)
    identities = outer.vector(2, "identities")
    binders = outer.vector(2, "binders")
    if outer.remaining:
        raise MalformedPskExtension(f"{outer.remaining} bytes after the binders")
    if identities.remaining < _MIN_IDENTITIES_BYTES:
        raise MalformedPskExtension("the identities list is shorter than one identity")
    if binders.remaining < _MIN_BINDERS_BYTES:
        raise MalformedPskExtension("the binders list is shorter than one binder")

    offered: list[tuple[bytes, int]] = []
    while identities.remaining:
        identity = identities.vector(2, "a PSK identity").take_all()
        if not identity:
            raise MalformedPskExtension("an empty PSK identity")
        age = identities.uint(4, "obfuscated_ticket_age")
        offered.append((identity, age))

    lengths: list[int] = []
    while binders.remaining:
        length = binders.uint(1, "the length of a binder")
        if length < _MIN_BINDER:
            raise MalformedPskExtension(f"a binder of {length} bytes (at least {_MIN_BINDER})")
        binders.take(length, "a binder")
        lengths.append(length)

    if len(lengths) != len(offered):
        raise MalformedPskExtension(f"{len(offered)} identities but {len(lengths)} binders")
    return tuple(
        OfferedPsk(identity, age, length)
        for (identity, age), length in zip(offered, lengths, strict=True)
    )


@dataclass(frozen=True)
class ClientHelloLists:
    """What a ClientHello offers: suites and groups (IANA codes) and the key-share groups."""

    suites: tuple[int, ...]
    groups: tuple[int, ...]
    key_shares: tuple[int, ...]


_HANDSHAKE_RECORD = 22
_CLIENT_HELLO = 1
_SUPPORTED_GROUPS = 10
_KEY_SHARE = 51


def _u16_list(reader: _Reader, what: str) -> tuple[int, ...]:
    if reader.remaining % 2:
        raise MalformedClientHello(f"{what}: an odd number of bytes")
    return tuple(reader.uint(2, what) for _ in range(reader.remaining // 2))


def parse_client_hello(records: bytes) -> ClientHelloLists:
    """The cipher suites, ``supported_groups`` and ``key_share`` groups of the ClientHello in
    ``records`` (TLS records as sent, handshake records joined). Raises
    :class:`MalformedClientHello` when it is not one."""
    body = bytearray()
    outer = _Reader(bytes(records))
    while outer.remaining:
        content_type = outer.uint(1, "a record's type")
        outer.take(2, "a record's version")
        payload = outer.vector(2, "a record").take_all()
        if content_type == _HANDSHAKE_RECORD:
            body += payload
    message = _Reader(bytes(body))
    if message.uint(1, "the handshake type") != _CLIENT_HELLO:
        raise MalformedClientHello("not a ClientHello")
    hello = message.vector(3, "the ClientHello")
    hello.take(2 + 32, "legacy_version and random")
    hello.vector(1, "legacy_session_id")
    suites = _u16_list(hello.vector(2, "cipher_suites"), "cipher_suites")
    hello.vector(1, "legacy_compression_methods")
    extensions = hello.vector(2, "extensions")
    groups: tuple[int, ...] = ()
    shares: list[int] = []
    while extensions.remaining:
        ext_type = extensions.uint(2, "an extension's type")
        ext = extensions.vector(2, "an extension")
        if ext_type == _SUPPORTED_GROUPS:
            groups = _u16_list(ext.vector(2, "supported_groups"), "supported_groups")
        elif ext_type == _KEY_SHARE:
            entries = ext.vector(2, "client_shares")
            while entries.remaining:
                shares.append(entries.uint(2, "a key share's group"))
                entries.vector(2, "a key share")
    return ClientHelloLists(suites, groups, tuple(shares))
