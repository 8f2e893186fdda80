"""X.509 material for the handshake: our certificate chain and private key, and CRLs.

The material arrives in two shapes: PEM files (named in the configuration, like tlshd's
``x509.certificate`` / ``x509.private_key``, or by a consumer), or DER blobs as the Linux keyrings
hold them (the kernel passes key serials of an ``asymmetric``/``x509`` certificate and its
private key) or a consumer sends inline. Both are normalised here to DER certificates, leaf
first, and a PKCS#8 DER private key, so the OpenSSL edge (:mod:`ktlsd.tls._openssl`) only ever
parses one format, from memory.

Files are never opened here by path: :mod:`ktlsd.files` reads them (with the rights of whoever
named them; :data:`~ktlsd.files.AGENT` = the process's own) and this module parses the bytes.
Truststores and CRLs stay bytes (PEM, or one DER value); the engine parses them with OpenSSL
from memory when it builds a context.

Every problem with the material — absent, unreadable, malformed, a key that does not match
or cannot sign — is reported as ``HandshakeError(MISSING_MATERIAL, ...)`` (ENOKEY) with a
one-line reason: from the consumer's point of view the handshake cannot start because a key or
certificate is absent or unusable. Never a bare ``ValueError`` (which the agent would report as
an internal error, EIO). Messages name the file, never its contents.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.files import (
    AGENT,
    DEFAULT_READ_TIMEOUT,
    FileAccess,
    FileRefused,
    read_file,
)
from ktlsd.settings import DEFAULT_MAX_FILE_BYTES
from ktlsd.tls._openssl import OpenSSLError, TokenKey

__all__ = ["X509Credentials", "read_crl", "read_truststore", "split_der_sequence"]

# What cryptography raises for material it cannot use (UnsupportedAlgorithm is no ValueError).
_PARSE_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm)


def _missing(reason: str) -> HandshakeError:
    return HandshakeError(FailureCause.MISSING_MATERIAL, reason)


def split_der_sequence(blob: bytes) -> list[bytes]:
    """Split concatenated DER ``SEQUENCE`` values (a keyring payload may hold a whole chain).

    Raises ``ValueError`` when the blob is not a clean concatenation of definite-length
    SEQUENCEs.
    """
    items: list[bytes] = []
    pos = 0
    while pos < len(blob):
        if blob[pos] != 0x30 or pos + 2 > len(blob):
            raise ValueError("not a DER SEQUENCE")
        first = blob[pos + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or pos + 2 + count > len(blob):
                raise ValueError("bad DER length")
            length = int.from_bytes(blob[pos + 2 : pos + 2 + count], "big")
            header = 2 + count
        end = pos + header + length
        if end > len(blob):
            raise ValueError("truncated DER value")
        items.append(blob[pos:end])
        pos = end
    if not items:
        raise ValueError("empty")
    return items


def _public_bytes(key: object) -> bytes:
    encoded: bytes = key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return encoded


@dataclass(frozen=True)
class X509Credentials:
    """Our certificate chain (DER, leaf first) and the leaf's private key (PKCS#8 DER, or a
    :class:`~ktlsd.tls._openssl.TokenKey` that stays in its PKCS#11 token).

    Build it with :meth:`from_pem`, :meth:`from_pem_files`, :meth:`from_der` or
    :meth:`from_pem_and_token_key`; all check that the key belongs to the leaf certificate, so
    a mismatch is reported before any peer is contacted.
    """

    chain: tuple[bytes, ...]
    private_key: bytes | TokenKey = field(repr=False)

    def __post_init__(self) -> None:
        if not self.chain:
            raise _missing("certificate chain is empty")
        if not self.private_key:
            raise _missing("private key is empty")

    @classmethod
    def from_pem_files(
        cls,
        cert_path: str,
        key_path: str,
        access: FileAccess = AGENT,
        *,
        max_bytes: int = DEFAULT_MAX_FILE_BYTES,
        timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> X509Credentials:
        """Read a PEM certificate file (leaf first, then intermediates) and a PEM key file with
        ``access``'s rights (:func:`ktlsd.files.read_file`; blocks the calling thread)."""
        cert_data = read_file(
            cert_path, "certificate file", access, max_bytes=max_bytes, timeout=timeout
        )
        key_data = read_file(
            key_path, "private key file", access, max_bytes=max_bytes, timeout=timeout
        )
        return cls.from_pem(cert_data, key_data, cert_name=cert_path, key_name=key_path)

    @classmethod
    def from_pem(
        cls,
        cert_data: bytes,
        key_data: bytes,
        *,
        cert_name: str = "PEM certificate",
        key_name: str = "PEM private key",
    ) -> X509Credentials:
        """Parse PEM certificates (leaf first) and an unencrypted PEM private key; the names
        (file names) only appear in error messages."""
        try:
            certs = x509.load_pem_x509_certificates(cert_data)
        except _PARSE_ERRORS:
            raise _missing(f"no PEM certificate in {cert_name}") from None
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except _PARSE_ERRORS:
            raise _missing(f"no usable unencrypted PEM private key in {key_name}") from None
        chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
        return cls._checked(chain, key, f"{cert_name} / {key_name}")

    @classmethod
    def from_der(cls, cert_der: bytes, key_der: bytes) -> X509Credentials:
        """Use DER blobs as keyrings hold them: one certificate or a concatenated chain, leaf
        first, and a private key in PKCS#8 or the algorithm's traditional DER form."""
        try:
            chain_items = split_der_sequence(cert_der)
            certs = [x509.load_der_x509_certificate(item) for item in chain_items]
        except _PARSE_ERRORS:
            raise _missing("certificate blob is not DER X.509") from None
        try:
            key = serialization.load_der_private_key(key_der, password=None)
        except _PARSE_ERRORS:
            raise _missing("private key blob is not an unencrypted DER private key") from None
        chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
        return cls._checked(chain, key, "DER material")

    @classmethod
    def from_pem_and_token_key(
        cls, cert_data: bytes, key: TokenKey, *, cert_name: str, key_name: str
    ) -> X509Credentials:
        """PEM certificates (leaf first) and a key held by a PKCS#11 token (see
        :mod:`ktlsd.hardware_key`); ``key_name`` is the URI with any PIN redacted."""
        try:
            certs = x509.load_pem_x509_certificates(cert_data)
        except _PARSE_ERRORS:
            raise _missing(f"no PEM certificate in {cert_name}") from None
        chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
        where = f"{cert_name} / {key_name}"
        try:
            leaf_key = _public_bytes(certs[0].public_key())
        except _PARSE_ERRORS as exc:
            raise _missing(f"{where}: unusable public key in the certificate ({exc})") from None
        try:
            token_public = key.public_key_der()
        except OpenSSLError as exc:
            raise _missing(f"{where}: {exc}") from None
        if leaf_key != token_public:
            raise _missing(f"{where}: private key does not match the certificate")
        return cls(chain=chain, private_key=key)

    @classmethod
    def _checked(cls, chain: tuple[bytes, ...], key: object, where: str) -> X509Credentials:
        if not isinstance(
            key,
            (
                rsa.RSAPrivateKey,
                ec.EllipticCurvePrivateKey,
                ed25519.Ed25519PrivateKey,
                ed448.Ed448PrivateKey,
            ),
        ):
            raise _missing(f"{where}: key type cannot sign TLS 1.3 handshakes")
        try:
            leaf_key = _public_bytes(x509.load_der_x509_certificate(chain[0]).public_key())
        except _PARSE_ERRORS as exc:  # e.g. an invalid EC point, an unknown key algorithm
            raise _missing(f"{where}: unusable public key in the certificate ({exc})") from None
        if leaf_key != _public_bytes(key.public_key()):
            raise _missing(f"{where}: private key does not match the certificate")
        key_der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cls(chain=chain, private_key=key_der)

    def describe(self) -> str:
        """Subject of the leaf, for logs."""
        return x509.load_der_x509_certificate(self.chain[0]).subject.rfc4514_string()


def read_truststore(
    path: str,
    access: FileAccess = AGENT,
    *,
    allow_directory: bool = True,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    timeout: float = DEFAULT_READ_TIMEOUT,
) -> bytes | None:
    """The bytes of the truststore file ``path`` (PEM certificates, or one DER certificate),
    read with ``access``'s rights; blocks the calling thread.

    None when ``path`` is a directory and ``allow_directory``: a hashed directory, which
    OpenSSL then searches itself, by path — for the agent's own configuration and an
    operator's command line only. A consumer's truststore must be a file.
    """
    try:
        return read_file(path, "truststore", access, max_bytes=max_bytes, timeout=timeout)
    except FileRefused as exc:
        if exc.file_type == "a directory" and allow_directory:
            return None
        raise


def read_crl(
    path: str,
    access: FileAccess = AGENT,
    *,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    timeout: float = DEFAULT_READ_TIMEOUT,
) -> bytes:
    """The bytes of the CRL file ``path`` (PEM CRLs, or one DER CRL), read with ``access``'s
    rights; blocks the calling thread."""
    return read_file(path, "CRL file", access, max_bytes=max_bytes, timeout=timeout)
