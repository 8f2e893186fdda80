"""Authentication material for one request: keyrings, inline material and configured files.

A :class:`~ktlsd.request.HandshakeRequest` names its material indirectly: PSK key serials,
certificate/private-key serials, or nothing (then the configured files apply, as in tlshd).
User-space consumers may pass keys and certificates inline instead. :func:`build_tls_config`
resolves all of that into the engine's :class:`~ktlsd.tls.handshake.TlsConfig`, raising
:class:`~ktlsd.errors.HandshakeError` with ``MISSING_MATERIAL`` (ENOKEY) or
``INVALID_REQUEST`` (EINVAL) when something is absent or unusable.

Keyring conventions (the kernel's and nvme-cli's):

* a TLS PSK is a key of type ``psk`` whose description is the PSK identity and whose payload
  is the TLS PSK itself (32 bytes for SHA-256, 48 for SHA-384); NVMe identities also name the
  hash (``NVMe0R01`` = SHA-256, ``...02`` = SHA-384);
* a server with no identity serial (nvmet passes 0) looks the identity the client offered up
  among the ``psk`` keys in the keyrings it possesses (its session keyring, where the agent
  links ``.nvme``, ``.nfs``, ``.nfsd`` and the configured keyrings);
* certificates and private keys passed by serial hold DER.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ktlsd import keyring
from ktlsd.credentials import X509Credentials
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.request import (
    AuthMode,
    ConsumerCredentials,
    HandshakeRequest,
    InlineMaterial,
    MessageType,
)
from ktlsd.settings import DEFAULT_LEGACY_PSK_SHA384, LegacyPskSha384, X509Files
from ktlsd.tls.handshake import PskKey, TlsConfig
from ktlsd.tls.session import CipherSuite, Role

PSK_KEY_TYPE = "psk"
PSK_KEY_TYPES = ("psk", "user")  # kernel consumers use "psk"; programs may use "user" keys
_NVME_IDENTITY = re.compile(r"^NVMe[01][RG](0[0-2]) ")


def _missing(reason: str) -> HandshakeError:
    return HandshakeError(FailureCause.MISSING_MATERIAL, reason)


@dataclass(frozen=True)
class Consumer:
    """Who asked: ``uid`` None for the kernel (trusted), else the service consumer's uid.

    The agent runs with more rights than an unprivileged consumer, and the consumer gets the
    session's traffic secrets back. So an unprivileged consumer may use only material it could
    use itself: keys it owns, files it owns or that are world-readable, and what it sends
    inline — never the agent's keyrings or the host's configured certificate and key, which
    would let it impersonate this host.
    """

    uid: int | None = None

    @classmethod
    def from_credentials(cls, credentials: ConsumerCredentials | None) -> Consumer:
        """The consumer a request declares: its process's uid, or (None) the kernel."""
        return cls() if credentials is None else cls(credentials.uid)

    @property
    def privileged(self) -> bool:
        return self.uid is None or self.uid == 0

    def check_key(self, serial: int, what: str) -> None:
        if self.privileged:
            return
        try:
            owner = keyring.describe_key(serial).uid
        except keyring.KeyringError as exc:
            raise _missing(f"{what} key {serial:#x}: {_key_error(exc)}") from None
        if owner != self.uid:
            raise _missing(f"{what} key {serial:#x} does not belong to uid {self.uid}")

    def check_file(self, path: str, what: str) -> None:
        """The consumer could read ``path`` itself: every directory on the way is searchable
        by it and the file is readable by it (owner bits if it owns them, else the "other"
        bits; group membership is not consulted, so group-only access is refused)."""
        if self.privileged:
            return
        real = os.path.realpath(path)
        try:
            st = os.stat(real)
        except OSError as exc:
            raise _missing(f"cannot read {what} {path}: {exc.strerror or exc}") from None
        if not self._allowed(st, stat.S_IRUSR, stat.S_IROTH):
            raise _missing(f"{what} {path} is not readable by uid {self.uid}")
        parent = os.path.dirname(real)
        while True:
            if not self._allowed(os.stat(parent), stat.S_IXUSR, stat.S_IXOTH):
                raise _missing(
                    f"{what} {path} is not readable by uid {self.uid} "
                    f"(directory {parent} is closed to it)"
                )
            if parent == os.path.dirname(parent):
                return
            parent = os.path.dirname(parent)

    def _allowed(self, st: os.stat_result, owner_bit: int, other_bit: int) -> bool:
        return bool(st.st_mode & (owner_bit if st.st_uid == self.uid else other_bit))


TRUSTED = Consumer()


def psk_hash_for(identity: str, key_length: int) -> str:
    """The hash a PSK is bound to: from an NVMe identity's ``hh`` field, else its length."""
    match = _NVME_IDENTITY.match(identity)
    if match and match.group(1) == "02":
        return "sha384"
    if match and match.group(1) == "01":
        return "sha256"
    if key_length == 48:
        return "sha384"
    if key_length == 32:
        return "sha256"
    # Other lengths are usable with either hash; SHA-256 is what every peer supports.
    return "sha256"


def psk_from_keyring(serial: int) -> PskKey:
    """Load a ``psk`` key by serial (identity = description, key = payload)."""
    try:
        info = keyring.describe_key(serial)
    except keyring.KeyringError as exc:
        raise _missing(f"PSK key {serial:#x}: {_key_error(exc)}") from None
    if info.type not in PSK_KEY_TYPES:
        raise _missing(f"key {serial:#x} has type {info.type!r}, not {PSK_KEY_TYPE!r}")
    try:
        payload = keyring.read_key(serial)
    except keyring.KeyringError as exc:
        raise _missing(f"PSK key {serial:#x}: {_key_error(exc)}") from None
    if not payload:
        raise _missing(f"PSK key {serial:#x} is empty")
    return PskKey(
        identity=info.description.encode(),
        key=payload,
        hash_name=psk_hash_for(info.description, len(payload)),
        serial=serial,
    )


def _key_error(exc: keyring.KeyringError) -> str:
    names = {
        errno.ENOKEY: "no such key",
        errno.EKEYREVOKED: "key was revoked",
        errno.EKEYEXPIRED: "key has expired",
        errno.EACCES: "permission denied",
    }
    return names.get(exc.errno or 0, str(exc))


def _blob_from_keyring(serial: int, what: str) -> bytes:
    try:
        data = keyring.read_key(serial)
    except keyring.KeyringError as exc:
        raise _missing(f"{what} key {serial:#x}: {_key_error(exc)}") from None
    if not data:
        raise _missing(f"{what} key {serial:#x} is empty")
    return data


def make_psk_lookup(
    keyrings: Sequence[int], allowed: Callable[[PskKey], bool] | None = None
) -> Callable[[bytes], PskKey | None]:
    """A server-side lookup: find the ``psk`` key whose description is the offered identity.

    ``keyrings`` are searched in order (``KEYCTL_SEARCH`` recurses into linked keyrings).
    """

    def lookup(identity: bytes) -> PskKey | None:
        try:
            description = identity.decode()
        except UnicodeDecodeError:
            return None
        if not description or "\0" in description:
            return None
        for ring in keyrings:
            for key_type in PSK_KEY_TYPES:
                try:
                    serial = keyring.search_keyring(ring, key_type, description)
                    key = psk_from_keyring(serial)
                except (keyring.KeyringError, ValueError, HandshakeError):
                    continue
                if allowed is None or allowed(key):
                    return key
        return None

    return lookup


def _suites(names: Sequence[str]) -> tuple[CipherSuite, ...]:
    try:
        return tuple(CipherSuite.from_name(n) for n in names)
    except ValueError as exc:
        raise HandshakeError(FailureCause.INVALID_REQUEST, str(exc)) from None


def _x509_credentials(
    request: HandshakeRequest, inline: InlineMaterial, files: X509Files, consumer: Consumer
) -> X509Credentials | None:
    if request.certificate or request.private_key:
        if not (request.certificate and request.private_key):
            raise _missing("certificate and private key serials must be given together")
        consumer.check_key(request.certificate, "certificate")
        consumer.check_key(request.private_key, "private")
        return X509Credentials.from_der(
            _blob_from_keyring(request.certificate, "certificate"),
            _blob_from_keyring(request.private_key, "private"),
        )
    if inline.certificate_chain:
        return X509Credentials.from_der(b"".join(inline.certificate_chain), inline.private_key)
    if inline.certificate_file or inline.private_key_file or not consumer.privileged:
        cert_file, key_file = inline.certificate_file, inline.private_key_file
    else:
        cert_file, key_file = files.certificate, files.private_key
    for path, what in ((cert_file, "certificate file"), (key_file, "private key file")):
        if path:
            consumer.check_file(path, what)
    if cert_file and key_file:
        return X509Credentials.from_pem_files(cert_file, key_file)
    if cert_file or key_file:
        raise _missing("x509.certificate and x509.private_key must be configured together")
    return None


def build_tls_config(
    request: HandshakeRequest,
    *,
    x509_files: X509Files,
    psk_keyrings: Sequence[int] = (keyring.KEY_SPEC_SESSION_KEYRING,),
    groups: str | None = None,
    consumer: Consumer = TRUSTED,
    legacy_psk_sha384: LegacyPskSha384 = DEFAULT_LEGACY_PSK_SHA384,
) -> TlsConfig:
    """Resolve a request's material into the engine's configuration."""
    if request.message_type is MessageType.CLIENTHELLO:
        role = Role.CLIENT
    elif request.message_type is MessageType.SERVERHELLO:
        role = Role.SERVER
    else:
        raise HandshakeError(
            FailureCause.UNSUPPORTED, f"message type {request.message_type.name.lower()}"
        )
    inline = request.inline or InlineMaterial()
    suites = _suites(inline.ciphersuites) if inline.ciphersuites else tuple(CipherSuite)
    truststore = inline.truststore or x509_files.truststore
    crl = inline.crl or x509_files.crl
    for path, what in ((inline.truststore, "truststore"), (inline.crl, "CRL")):
        if path:
            consumer.check_file(path, what)
    common = {
        "role": role,
        "ciphersuites": suites,
        "groups": groups,
        "peername": request.peername,
        "legacy_psk_sha384": legacy_psk_sha384,
    }

    if request.auth_mode is AuthMode.PSK:
        if role is Role.CLIENT:
            for serial in request.peer_identities:
                if serial:
                    consumer.check_key(serial, "PSK")
            keys = tuple(psk_from_keyring(s) for s in request.peer_identities if s)
            keys += tuple(
                PskKey(identity=p.identity, key=p.key, hash_name=p.hash_name)
                for p in inline.psk_keys
            )
            if not keys:
                raise _missing("PSK client request carries no PSK")
            return TlsConfig(psk_keys=keys, **common)  # type: ignore[arg-type]
        for serial in request.peer_identities:
            if serial:
                consumer.check_key(serial, "PSK")
        # An unprivileged consumer never gets a search of the agent's keyrings (.nvme...).
        rings = psk_keyrings if consumer.privileged else ()
        lookup = _server_lookup(request, inline, rings)
        return TlsConfig(psk_lookup=lookup, **common)  # type: ignore[arg-type]

    if request.auth_mode in (AuthMode.X509, AuthMode.UNAUTH):
        mutual = request.auth_mode is AuthMode.X509
        if role is Role.CLIENT:
            # unauth (NFS xprtsec=tls): we stay anonymous but still verify the server, as tlshd
            # does; presenting a certificate would make nfsd treat us as peer-authenticated.
            credentials = (
                _x509_credentials(request, inline, x509_files, consumer) if mutual else None
            )
            return TlsConfig(
                credentials=credentials, truststore=truststore, crl=crl,
                **common,  # type: ignore[arg-type]
            )
        credentials = _x509_credentials(request, inline, x509_files, consumer)
        if credentials is None:
            raise _missing("x509 server has no certificate and private key")
        required = inline.require_client_cert or x509_files.require_client_cert
        client_auth = "require" if mutual and required else ("request" if mutual else "none")
        return TlsConfig(
            credentials=credentials, truststore=truststore, crl=crl,
            client_auth=client_auth, **common,  # type: ignore[arg-type]
        )

    raise HandshakeError(
        FailureCause.INVALID_REQUEST, f"auth mode {request.auth_mode.name.lower()}"
    )


def _server_lookup(
    request: HandshakeRequest, inline: InlineMaterial, psk_keyrings: Sequence[int]
) -> Callable[[bytes], PskKey | None]:
    """Server PSK selection: inline keys, a given serial, or a search of our keyrings."""
    import hmac

    inline_keys = [
        PskKey(identity=p.identity, key=p.key, hash_name=p.hash_name) for p in inline.psk_keys
    ]
    serials = [s for s in request.peer_identities if s]
    fixed = [psk_from_keyring(s) for s in serials]
    candidates = inline_keys + fixed
    search = make_psk_lookup(psk_keyrings) if not candidates and psk_keyrings else None

    def lookup(identity: bytes) -> PskKey | None:
        for key in candidates:
            if hmac.compare_digest(key.identity, identity):
                return key
        return search(identity) if search is not None else None

    return lookup
