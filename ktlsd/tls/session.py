"""What a completed TLS 1.3 handshake leaves behind: the :class:`Session`.

A :class:`Session` is the hand-off value between the handshake engine
(:mod:`ktlsd.tls.handshake`) and a record layer (:mod:`ktlsd.tls.record`, :mod:`ktlsd.tls.ktls`):
the negotiated cipher suite, both application traffic secrets, the record sequence
numbers at hand-off and who the peer turned out to be.

A :class:`Session` is a value: after a KeyUpdate the holder replaces it with the one
:func:`ktlsd.tls.keyschedule.advance_session` returns (next secret, generation + 1, sequence 0
for the direction that moved). That function is the only place a session moves forward, for a
program's own connection and for a kept session the agent updates alike.

Traffic secrets are kept out of ``repr`` so that a session can be logged or put in an
exception message without leaking key material.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ktlsd.tls.protocol import MAX_PLAINTEXT as MAX_FRAGMENT


class Role(enum.Enum):
    """Which end of the TLS connection this side plays."""

    CLIENT = "client"
    SERVER = "server"


@dataclass(frozen=True)
class _SuiteInfo:
    iana_name: str
    code: int
    hash_name: str  # "sha256" or "sha384"
    key_length: int
    ktls_cipher_type: int


class CipherSuite(enum.Enum):
    """The TLS 1.3 cipher suites that both OpenSSL and kTLS implement."""

    TLS_AES_128_GCM_SHA256 = _SuiteInfo("TLS_AES_128_GCM_SHA256", 0x1301, "sha256", 16, 51)
    TLS_AES_256_GCM_SHA384 = _SuiteInfo("TLS_AES_256_GCM_SHA384", 0x1302, "sha384", 32, 52)
    TLS_CHACHA20_POLY1305_SHA256 = _SuiteInfo(
        "TLS_CHACHA20_POLY1305_SHA256", 0x1303, "sha256", 32, 54
    )

    @property
    def iana_name(self) -> str:
        return self.value.iana_name

    @property
    def code(self) -> int:
        """The two-byte IANA cipher suite value."""
        return self.value.code

    @property
    def hash_name(self) -> str:
        """The suite's hash, as ``hashlib``/``cryptography`` spell it."""
        return self.value.hash_name

    @property
    def hash_length(self) -> int:
        return 48 if self.value.hash_name == "sha384" else 32

    @property
    def key_length(self) -> int:
        """AEAD key length in bytes."""
        return self.value.key_length

    @property
    def iv_length(self) -> int:
        """TLS 1.3 write IV length (always 12)."""
        return 12

    @property
    def ktls_cipher_type(self) -> int:
        """The ``TLS_CIPHER_*`` number from ``include/uapi/linux/tls.h``."""
        return self.value.ktls_cipher_type

    @classmethod
    def from_name(cls, name: str) -> CipherSuite:
        """Look a suite up by its IANA name (case-insensitive)."""
        for suite in cls:
            if suite.iana_name.lower() == name.strip().lower():
                return suite
        known = ", ".join(s.iana_name for s in cls)
        raise ValueError(f"unknown TLS 1.3 cipher suite {name!r} (known: {known})")

    @classmethod
    def from_code(cls, code: int) -> CipherSuite:
        for suite in cls:
            if suite.code == code:
                return suite
        raise ValueError(f"unsupported cipher suite 0x{code:04x}")

    @classmethod
    def for_hash(cls, hash_name: str) -> tuple[CipherSuite, ...]:
        """Suites usable with an external PSK bound to ``hash_name``."""
        return tuple(s for s in cls if s.hash_name == hash_name)


@dataclass(frozen=True)
class PeerIdentity:
    """Who the peer authenticated as.

    ``psk_identity`` is set when an external PSK was used (the identity that was
    selected); ``certificate_chain`` holds the peer's certificates (DER, leaf first)
    when it presented any. ``psk_serial`` is the keyring serial of the PSK used, when
    the key came from a keyring.
    """

    psk_identity: bytes | None = None
    psk_serial: int | None = None
    certificate_chain: tuple[bytes, ...] = ()

    @property
    def authenticated(self) -> bool:
        return self.psk_identity is not None or bool(self.certificate_chain)

    def describe(self) -> str:
        """A one-line, secret-free description for logs."""
        if self.psk_identity is not None:
            return "psk:" + self.psk_identity.decode("utf-8", "backslashreplace")
        if self.certificate_chain:
            try:
                from cryptography import x509

                cert = x509.load_der_x509_certificate(self.certificate_chain[0])
                return "x509:" + cert.subject.rfc4514_string()
            except ValueError:
                return "x509:<unparseable certificate>"
        return "anonymous"


@dataclass(frozen=True)
class Session:
    """The state a record layer needs to carry on a TLS 1.3 connection.

    ``client_secret``/``server_secret`` are the *current* application traffic secrets
    (generation ``client_generation``/``server_generation``; 0 right after the
    handshake; each KeyUpdate adds one, see :func:`ktlsd.tls.keyschedule.advance_session`).
    ``tx_seq``/``rx_seq`` are the record numbers of the next record to send/receive under
    those secrets.

    ``psk_binder_hash`` is, when an external PSK was used, the hash it was bound to in this
    handshake (its binder and key schedule: ``"sha256"``/``"sha384"``, always the suite's);
    ``legacy_psk_binding`` says a SHA-384 PSK was bound to SHA-256 the way tlshd 1.0 does
    (``[ktlsd] legacy_psk_sha384``).

    Record size limits (RFC 8449, ``record_size_limit``; TLS 1.3 counts the inner content
    type byte): ``peer_record_size_limit`` is the limit the peer advertised (None: it sent
    none), bounding the records we send (:attr:`max_send_fragment`);
    ``record_size_limit`` is the limit we advertised when the peer took part in the
    negotiation (None: not negotiated), bounding the records we accept
    (:attr:`max_recv_inner`).
    ``group`` is the key exchange group negotiated (OpenSSL's name: ``X25519MLKEM768``,
    ``X25519``, ``secp256r1``); ``signature_scheme``/``peer_signature_scheme`` the schemes
    this side and the peer signed their CertificateVerify with (``mldsa65``,
    ``ecdsa_secp256r1_sha256``; None when that side sent no certificate, as with a PSK):
    with two chains configured, ``signature_scheme`` says which one was sent.
    """

    role: Role
    suite: CipherSuite
    client_secret: bytes = field(repr=False)
    server_secret: bytes = field(repr=False)
    tx_seq: int = 0
    rx_seq: int = 0
    peer: PeerIdentity = field(default_factory=PeerIdentity)
    group: str | None = None
    signature_scheme: str | None = None
    peer_signature_scheme: str | None = None
    client_generation: int = 0
    server_generation: int = 0
    psk_binder_hash: str | None = None
    legacy_psk_binding: bool = False
    peer_record_size_limit: int | None = None
    record_size_limit: int | None = None

    @property
    def max_send_fragment(self) -> int:
        """The most application bytes one record we send may carry: 2^14, or less when the
        peer advertised a smaller record_size_limit (its limit minus the content type)."""
        limit = self.peer_record_size_limit
        return MAX_FRAGMENT if limit is None else max(1, min(MAX_FRAGMENT, limit - 1))

    @property
    def max_recv_inner(self) -> int:
        """The most bytes of inner plaintext (content, content type and padding) a record
        we receive may hold: 2^14+1, or the smaller limit we advertised."""
        limit = self.record_size_limit
        return MAX_FRAGMENT + 1 if limit is None else min(MAX_FRAGMENT + 1, limit)

    @property
    def tx_secret(self) -> bytes:
        """The secret protecting records this side sends."""
        return self.client_secret if self.role is Role.CLIENT else self.server_secret

    @property
    def rx_secret(self) -> bytes:
        """The secret protecting records this side receives."""
        return self.server_secret if self.role is Role.CLIENT else self.client_secret

    @property
    def tx_generation(self) -> int:
        return self.client_generation if self.role is Role.CLIENT else self.server_generation

    @property
    def rx_generation(self) -> int:
        return self.server_generation if self.role is Role.CLIENT else self.client_generation
