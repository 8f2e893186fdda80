"""X.509 material for the handshake: our certificate chain and private key, and CRLs.

The material arrives in two shapes: PEM files named in the configuration (like tlshd's
``x509.certificate`` / ``x509.private_key``), or DER blobs as the Linux keyrings hold them (the
kernel passes key serials of an ``asymmetric``/``x509`` certificate and its private key). Both
are normalised here to DER certificates, leaf first, and a PKCS#8 DER private key, so the
OpenSSL edge (:mod:`ktlsd.tls._openssl`) only ever parses one format.

Every problem with the material is reported as ``HandshakeError(MISSING_MATERIAL, ...)``: from
the consumer's point of view the handshake cannot start because a key or certificate is absent
or unusable. Messages name the file, never its contents.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from ktlsd.errors import FailureCause, HandshakeError

__all__ = ["X509Credentials", "load_crls", "split_der_sequence"]


def _missing(reason: str) -> HandshakeError:
    return HandshakeError(FailureCause.MISSING_MATERIAL, reason)


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise _missing(f"cannot read {what} {path}: {exc.strerror or exc}") from None


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
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class X509Credentials:
    """Our certificate chain (DER, leaf first) and the leaf's private key (PKCS#8 DER).

    Build it with :meth:`from_pem_files` or :meth:`from_der`; both check that the key belongs
    to the leaf certificate, so a mismatch is reported before any peer is contacted.
    """

    chain: tuple[bytes, ...]
    private_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not self.chain:
            raise _missing("certificate chain is empty")
        if not self.private_key:
            raise _missing("private key is empty")

    @classmethod
    def from_pem_files(cls, cert_path: str, key_path: str) -> X509Credentials:
        """Load a PEM certificate file (leaf first, then intermediates) and a PEM key file."""
        cert_data = _read(cert_path, "certificate file")
        key_data = _read(key_path, "private key file")
        try:
            certs = x509.load_pem_x509_certificates(cert_data)
        except ValueError:
            raise _missing(f"no PEM certificate in {cert_path}") from None
        try:
            key = serialization.load_pem_private_key(key_data, password=None)
        except (ValueError, TypeError):
            raise _missing(f"no usable unencrypted PEM private key in {key_path}") from None
        chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
        return cls._checked(chain, key, f"{cert_path} / {key_path}")

    @classmethod
    def from_der(cls, cert_der: bytes, key_der: bytes) -> X509Credentials:
        """Use DER blobs as keyrings hold them: one certificate or a concatenated chain, leaf
        first, and a private key in PKCS#8 or the algorithm's traditional DER form."""
        try:
            chain_items = split_der_sequence(cert_der)
            certs = [x509.load_der_x509_certificate(item) for item in chain_items]
        except ValueError:
            raise _missing("certificate blob is not DER X.509") from None
        try:
            key = serialization.load_der_private_key(key_der, password=None)
        except (ValueError, TypeError):
            raise _missing("private key blob is not an unencrypted DER private key") from None
        chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in certs)
        return cls._checked(chain, key, "DER material")

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
        leaf = x509.load_der_x509_certificate(chain[0])
        if _public_bytes(leaf.public_key()) != _public_bytes(key.public_key()):
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


def load_crls(path: str) -> list[bytes]:
    """Read one DER CRL or any number of PEM CRLs from ``path``; return them as DER."""
    data = _read(path, "CRL file")
    crls: list[bytes] = []
    if b"-----BEGIN X509 CRL-----" in data:
        marker_end = b"-----END X509 CRL-----"
        for chunk in data.split(marker_end)[:-1]:
            pem = chunk[chunk.index(b"-----BEGIN X509 CRL-----") :] + marker_end + b"\n"
            try:
                crl = x509.load_pem_x509_crl(pem)
            except ValueError:
                raise _missing(f"bad PEM CRL in {path}") from None
            crls.append(crl.public_bytes(serialization.Encoding.DER))
    else:
        try:
            crls.append(x509.load_der_x509_crl(data).public_bytes(serialization.Encoding.DER))
        except ValueError:
            raise _missing(f"no CRL in {path}") from None
    return crls


def check_truststore(path: str) -> None:
    """Fail early, with the right cause, when a configured truststore does not exist."""
    if not os.path.exists(path):
        raise _missing(f"truststore {path} does not exist")
