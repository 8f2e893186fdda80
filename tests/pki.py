"""Throwaway X.509 PKI for tests: CAs, server and client certificates, expired ones, CRLs.

Everything is made with ``cryptography`` in a test's tmp dir. Keys are ECDSA P-256 (fast) or
RSA-2048. Each :class:`Issued` has the DER forms (as keyrings hold them) and PEM files (as
configuration files name them), so tests can feed either path into ktlsd or into a peer process.

Example::

    ca = Authority.create(tmp_path, "rsa")
    server = ca.issue_server(dns=("localhost",), ips=("127.0.0.1",))
    client = ca.issue_client("host1")
    revoked_list = ca.write_crl([client])
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

KeyType = Literal["ecdsa", "rsa"]

_counter = itertools.count(1)
_rsa_cache: list[rsa.RSAPrivateKey] = []


def new_key(key_type: KeyType) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    """A fresh private key. RSA-2048 generation is slow, so a small pool is reused round-robin
    (different certificates may share an RSA key; tests never rely on keys being distinct)."""
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        if len(_rsa_cache) < 4:
            _rsa_cache.append(rsa.generate_private_key(public_exponent=65537, key_size=2048))
            return _rsa_cache[-1]
        return _rsa_cache[next(_counter) % len(_rsa_cache)]
    raise ValueError(f"unknown key type {key_type!r}")


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ktlsd tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@dataclass
class Issued:
    """A certificate and its key, in DER and as PEM files."""

    name: str
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(repr=False)
    cert_path: Path
    key_path: Path
    chain: tuple[x509.Certificate, ...] = ()  # intermediates after the leaf, if any

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def chain_der(self) -> tuple[bytes, ...]:
        extra = (c.public_bytes(serialization.Encoding.DER) for c in self.chain)
        return (self.cert_der, *extra)

    @property
    def key_der(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


@dataclass
class Authority:
    """A CA that signs certificates into ``directory``."""

    directory: Path
    name: str
    key_type: KeyType
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey = field(repr=False)
    cert: x509.Certificate
    parent: Authority | None = None

    @classmethod
    def create(
        cls, directory: Path, key_type: KeyType = "ecdsa", name: str | None = None
    ) -> Authority:
        directory.mkdir(parents=True, exist_ok=True)
        name = name or f"Test CA {next(_counter)}"
        key = new_key(key_type)
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        ca = cls(directory, name, key_type, key, cert)
        ca.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    @property
    def slug(self) -> str:
        return self.name.replace(" ", "_")

    @property
    def cert_path(self) -> Path:
        """PEM file with this CA's certificate: a truststore for ktlsd and for peers."""
        return self.directory / f"{self.slug}.pem"

    @property
    def cert_der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    def intermediate(self, name: str | None = None) -> Authority:
        """A sub-CA signed by this one (its certificates carry it in their chain)."""
        name = name or f"Intermediate CA {next(_counter)}"
        issued = self._issue(
            name, key_type=self.key_type, is_ca=True, dns=(), ips=(), eku=None, expired=False
        )
        sub = Authority(self.directory, name, self.key_type, issued.key, issued.cert, self)
        sub.cert_path.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
        return sub

    def _intermediates(self) -> tuple[x509.Certificate, ...]:
        chain: list[x509.Certificate] = []
        ca: Authority | None = self
        while ca is not None and ca.parent is not None:
            chain.append(ca.cert)
            ca = ca.parent
        return tuple(chain)

    def _issue(
        self,
        cn: str,
        *,
        key_type: KeyType | None,
        is_ca: bool,
        dns: tuple[str, ...],
        ips: tuple[str, ...],
        eku: x509.ObjectIdentifier | None,
        expired: bool,
    ) -> Issued:
        key = new_key(key_type or self.key_type)
        now = _now()
        if expired:
            not_before = now - datetime.timedelta(days=10)
            not_after = now - datetime.timedelta(days=1)
        else:
            not_before = now - datetime.timedelta(days=1)
            not_after = now + datetime.timedelta(days=30)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if eku is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        if is_ca:
            builder = builder.add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        slug = f"{cn.replace(' ', '_')}-{next(_counter)}"
        cert_path = self.directory / f"{slug}.crt"
        key_path = self.directory / f"{slug}.key"
        chain = self._intermediates()
        cert_path.write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (cert, *chain))
        )
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return Issued(cn, cert, key, cert_path, key_path, chain)

    def issue_server(
        self,
        cn: str = "server",
        *,
        dns: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1", "::1"),
        key_type: KeyType | None = None,
        expired: bool = False,
    ) -> Issued:
        """A server certificate with the given DNS and IP SANs (serverAuth EKU)."""
        return self._issue(
            cn,
            key_type=key_type,
            is_ca=False,
            dns=dns,
            ips=ips,
            eku=ExtendedKeyUsageOID.SERVER_AUTH,
            expired=expired,
        )

    def issue_client(
        self,
        cn: str = "client",
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        key_type: KeyType | None = None,
        expired: bool = False,
    ) -> Issued:
        """A client certificate (clientAuth EKU), optionally with SANs."""
        return self._issue(
            cn,
            key_type=key_type,
            is_ca=False,
            dns=dns,
            ips=ips,
            eku=ExtendedKeyUsageOID.CLIENT_AUTH,
            expired=expired,
        )

    def write_crl(self, revoked: list[Issued], name: str | None = None) -> Path:
        """A PEM CRL from this CA revoking ``revoked``; returns its path."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - datetime.timedelta(hours=1))
            .next_update(now + datetime.timedelta(days=7))
        )
        for item in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(item.cert.serial_number)
                .revocation_date(now - datetime.timedelta(minutes=5))
                .build()
            )
        crl = builder.sign(self.key, hashes.SHA256())
        path = self.directory / (name or f"{self.slug}-{next(_counter)}.crl")
        path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        return path


def self_signed(directory: Path, cn: str = "localhost") -> tuple[str, str]:
    """A self-signed ECDSA P-256 certificate (``CN=cn``, no SAN) and its key as PEM files, made
    by the openssl CLI, for peers that use it as its own trust anchor: (cert path, key path)."""
    import subprocess

    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", f"/CN={cn}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)
