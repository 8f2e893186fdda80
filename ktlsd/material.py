"""Authentication material for one request: keyrings, inline material and configured files.

A :class:`~ktlsd.request.HandshakeRequest` names its material indirectly: PSK key serials,
certificate/private-key serials, or nothing (then the configured files apply, as in tlshd).
User-space consumers may pass keys and certificates inline instead. :func:`build_tls_config`
resolves all of that into the engine's :class:`~ktlsd.tls.handshake.TlsConfig`, raising
:class:`~ktlsd.errors.HandshakeError` with ``MISSING_MATERIAL`` (ENOKEY) or
``INVALID_REQUEST`` (EINVAL) when something is absent, unusable or malformed — never another
exception (which the agent would report as an internal error, EIO).

Suites and groups follow the system crypto policy (:mod:`ktlsd.tls.policy`): the OpenSSL
configuration's TLS 1.3 suites that kTLS carries, narrowed by a request's own list (EINVAL
when nothing is left), and ``[ktlsd] groups`` narrowed to the system's groups
(:func:`crypto_policy_problems` is what ``ktlsd run`` checks at start).

Off the event loop. Building the material reads keyrings and files and parses keys, so
:func:`build_tls_config` (a coroutine) runs :func:`build_tls_config_blocking` in a thread of
its own (started per request, so it has the agent's keyrings as they are now), builds the
engine's ``SSL_CTX`` there too (:func:`~ktlsd.tls.handshake.prepare_context`), and waits for it
with a timeout. Files — the ones a consumer names and the ones the configuration names — are
read by :mod:`ktlsd.files`: a consumer's with the consumer's own uid, gid and supplementary
groups, the configuration's with the agent's; regular files only, at most ``max_file_bytes``,
looked up once. Their bytes go to the engine, so OpenSSL never opens a consumer's path. A
consumer's truststore must be a file; a directory is accepted (and searched by OpenSSL, as a
hashed directory) only when the agent's configuration names it.

Keyring conventions (the kernel's and nvme-cli's):

* a TLS PSK is a key of type ``psk`` whose description is the PSK identity and whose payload
  is the TLS PSK itself (32 bytes for SHA-256, 48 for SHA-384); NVMe identities also name the
  hash (``NVMe0R01`` = SHA-256, ``...02`` = SHA-384);
* a server with no identity serial (nvmet passes 0) looks the identity the client offered up
  among the ``psk`` keys in the keyrings it possesses (its session keyring, where the agent
  links ``.nvme``, ``.nfs``, ``.nfsd`` and the configured keyrings);
* certificates and private keys passed by serial hold DER.

A configured ``x509.private_key`` may be a ``pkcs11:`` URI: a key that stays in a PKCS#11 token
(:mod:`ktlsd.hardware_key`). Only the agent's configuration may name one; a service consumer
that names one (as its key or certificate file) gets ``INVALID_REQUEST`` (EINVAL).
"""

from __future__ import annotations

import _thread
import asyncio
import concurrent.futures
import errno
import hmac
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ktlsd import hardware_key, keyring
from ktlsd.credentials import X509Credentials, read_truststore
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.files import (
    AGENT,
    DEFAULT_READ_TIMEOUT,
    FileAccess,
    FileIdentity,
    read_file,
    read_file_identified,
)
from ktlsd.pkcs11_uri import is_pkcs11_uri, redact
from ktlsd.request import (
    AuthMode,
    ConsumerCredentials,
    HandshakeRequest,
    InlineMaterial,
    MessageType,
)
from ktlsd.settings import (
    DEFAULT_LEGACY_PSK_SHA384,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_RECORD_SIZE_LIMIT,
    LegacyPskSha384,
    X509Files,
)
from ktlsd.tls import policy
from ktlsd.tls.handshake import (
    ClientAuth,
    HashName,
    PskKey,
    TlsConfig,
    credentials_parsed_by_openssl,
    library_has_ml_dsa,
    library_version,
    prepare_context,
)
from ktlsd.tls.keylog import KeyLogFile
from ktlsd.tls.session import CipherSuite, Role

log = logging.getLogger("ktlsd.material")

PSK_KEY_TYPE = "psk"
PSK_KEY_TYPES = ("psk", "user")  # kernel consumers use "psk"; programs may use "user" keys
_NVME_IDENTITY = re.compile(r"^NVMe[01][RG](0[0-2]) ")
MATERIAL_TIMEOUT = 5.0  # seconds to build one request's material, file reads included


def _missing(reason: str) -> HandshakeError:
    return HandshakeError(FailureCause.MISSING_MATERIAL, reason)


@dataclass(frozen=True)
class Consumer:
    """Who asked: ``uid`` None for the kernel (trusted), else the service consumer's uid, gid
    and supplementary groups (``SO_PEERCRED``/``SO_PEERGROUPS``; a gid of None = unknown).

    The agent runs with more rights than an unprivileged consumer, and the consumer gets the
    session's traffic secrets back. So an unprivileged consumer may use only material it could
    use itself: keys it owns, files it can read (with its own uid, gid and groups — the kernel
    decides, see :mod:`ktlsd.files`), and what it sends inline — never the agent's keyrings or
    the host's configured certificate and key, which would let it impersonate this host.
    """

    uid: int | None = None
    gid: int | None = None
    groups: tuple[int, ...] = ()

    @classmethod
    def from_credentials(cls, credentials: ConsumerCredentials | None) -> Consumer:
        """The consumer a request declares (uid, gid, supplementary groups), or (None) the
        kernel, which is :data:`TRUSTED`."""
        if credentials is None:
            return TRUSTED
        return cls(uid=credentials.uid, gid=credentials.gid, groups=tuple(credentials.groups))

    @property
    def privileged(self) -> bool:
        return self.uid is None or self.uid == 0

    @property
    def file_access(self) -> FileAccess:
        """The rights this consumer's files are read with."""
        if self.uid is None or self.privileged:
            return AGENT
        return FileAccess.of_consumer(self.uid, self.gid, self.groups)

    def check_key(self, serial: int, what: str) -> None:
        if self.privileged:
            return
        try:
            owner = keyring.describe_key(serial).uid
        except keyring.KeyringError as exc:
            raise _missing(f"{what} key {serial:#x}: {_key_error(exc)}") from None
        if owner != self.uid:
            raise _missing(f"{what} key {serial:#x} does not belong to uid {self.uid}")

    def read_file(
        self,
        path: str,
        what: str,
        *,
        max_bytes: int = DEFAULT_MAX_FILE_BYTES,
        timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> bytes:
        """The bytes of a file the consumer named, read once with its rights (blocking; see
        :func:`ktlsd.files.read_file`). An unprivileged consumer must name absolute paths."""
        self.check_path(path, what)
        return read_file(path, what, self.file_access, max_bytes=max_bytes, timeout=timeout)

    def check_path(self, path: str, what: str) -> None:
        """A path from an unprivileged consumer must be absolute (it would otherwise resolve
        against the agent's working directory)."""
        if not self.privileged and not os.path.isabs(path):
            raise HandshakeError(
                FailureCause.INVALID_REQUEST, f"{what} {path} must be an absolute path"
            )

    def check_file(self, path: str, what: str) -> None:
        """Raise ``MISSING_MATERIAL`` unless the consumer could read ``path`` itself (it is
        read with the consumer's rights, and the bytes are dropped)."""
        self.read_file(path, what)


TRUSTED = Consumer()


def psk_hash_for(identity: str, key_length: int) -> HashName:
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
    """The suites for a request: the system crypto policy's that kTLS carries, narrowed to
    the request's own list when it names one (:mod:`ktlsd.tls.policy`)."""
    try:
        requested = tuple(CipherSuite.from_name(n) for n in names) if names else None
        return policy.effective_suites(requested)
    except policy.CryptoPolicyError as exc:
        cause = FailureCause.INVALID_REQUEST if names else FailureCause.MISSING_MATERIAL
        raise HandshakeError(cause, str(exc)) from None
    except ValueError as exc:
        raise HandshakeError(FailureCause.INVALID_REQUEST, str(exc)) from None


def _groups(configured: str | None) -> str | None:
    """The configured groups (``[ktlsd] groups``) narrowed to the system crypto policy; None
    leaves the library's default, which is the system policy's."""
    if not configured:
        return None
    try:
        return policy.effective_groups(configured)
    except policy.CryptoPolicyError as exc:
        raise HandshakeError(FailureCause.MISSING_MATERIAL, str(exc)) from None


def crypto_policy_problems(groups: str | None) -> list[str]:
    """What makes the agent's configuration unusable under the system crypto policy (one
    line each; ``ktlsd run`` refuses to start, ``--check`` reports them): no cipher suite
    left, no key-exchange group left."""
    problems: list[str] = []
    try:
        policy.effective_suites()
    except policy.CryptoPolicyError as exc:
        problems.append(str(exc))
    if groups:
        try:
            policy.effective_groups(groups)
        except policy.CryptoPolicyError as exc:
            problems.append(f"[ktlsd] groups: {exc}")
    return problems


@dataclass(frozen=True)
class _Reads:
    """The file reads of one material build: whose rights, the size cap, one deadline."""

    consumer: Consumer
    max_bytes: int
    deadline: float = field(compare=False)

    def _remaining(self) -> float:
        """How long a read may wait for room (the reads of one uid are capped)."""
        return max(0.0, self.deadline - time.monotonic())

    def consumer_file(self, path: str, what: str) -> bytes:
        return self.consumer.read_file(
            path, what, max_bytes=self.max_bytes, timeout=self._remaining()
        )

    def agent_file(self, path: str, what: str) -> bytes:
        return read_file(
            path, what, AGENT, max_bytes=self.max_bytes, timeout=self._remaining()
        )

    def consumer_file_identified(self, path: str, what: str) -> tuple[bytes, FileIdentity]:
        self.consumer.check_path(path, what)
        return read_file_identified(
            path, what, self.consumer.file_access, max_bytes=self.max_bytes,
            timeout=self._remaining(),
        )

    def agent_file_identified(self, path: str, what: str) -> tuple[bytes, FileIdentity]:
        return read_file_identified(
            path, what, AGENT, max_bytes=self.max_bytes, timeout=self._remaining()
        )

    def consumer_truststore(self, path: str) -> bytes:
        self.consumer.check_path(path, "truststore")
        contents = read_truststore(
            path, self.consumer.file_access, allow_directory=False,
            max_bytes=self.max_bytes, timeout=self._remaining(),
        )
        assert contents is not None  # a directory was refused
        return contents

    def agent_truststore(self, path: str) -> bytes | None:
        return read_truststore(
            path, AGENT, max_bytes=self.max_bytes, timeout=self._remaining()
        )


def _inline_psks(inline: InlineMaterial) -> tuple[PskKey, ...]:
    keys: list[PskKey] = []
    for p in inline.psk_keys:
        if p.hash_name not in ("sha256", "sha384"):
            raise HandshakeError(
                FailureCause.INVALID_REQUEST, "inline PSK hash must be sha256 or sha384"
            )
        hash_name: HashName = "sha384" if p.hash_name == "sha384" else "sha256"
        try:
            keys.append(PskKey(identity=p.identity, key=p.key, hash_name=hash_name))
        except ValueError as exc:
            raise HandshakeError(FailureCause.INVALID_REQUEST, f"inline PSK: {exc}") from None
    return tuple(keys)


# --- parsed certificate chains and keys ----------------------------------------------------------
# Parsing a chain and its key with cryptography (and checking that they match) costs more than
# the rest of a request's material; the same files and blobs come back request after request.
# The files are still opened, checked and read every time, with the reader's rights (a consumer
# that cannot read them fails as before); only the parsing is skipped when the bytes are those
# parsed last time from the same files.
PARSED_CREDENTIALS_CACHE_SIZE = 32


class _ParsedCredentials:
    """Bounded LRU of :class:`X509Credentials` by what they were parsed from.

    The key says where the bytes came from: ``("files", cert identity, key identity)`` (the
    :data:`~ktlsd.files.FileIdentity` of each file as read) or ``("der", certificate bytes)``
    (keyring blobs, inline DER). A hit also needs the very same bytes: the certificate compared
    plainly, the private key in constant time; so a file rewritten within one timestamp tick,
    or another key with the same certificate, is parsed anew. Errors are never cached.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[Hashable, tuple[bytes, bytes, X509Credentials]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()  # material threads build concurrently
        self.hits = self.misses = 0

    def get(self, key: Hashable, cert_data: bytes, key_data: bytes) -> X509Credentials | None:
        with self._lock:
            entry = self._entries.get(key)
            if (entry is not None and entry[0] == cert_data
                    and hmac.compare_digest(entry[1], key_data)):
                self._entries.move_to_end(key)
                self.hits += 1
                return entry[2]
            self.misses += 1
            return None

    def put(self, key: Hashable, cert_data: bytes, key_data: bytes,
            credentials: X509Credentials) -> None:
        with self._lock:
            self._entries[key] = (cert_data, key_data, credentials)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> tuple[int, int, int]:
        with self._lock:
            return self.hits, self.misses, len(self._entries)


_parsed_credentials = _ParsedCredentials(PARSED_CREDENTIALS_CACHE_SIZE)


def clear_material_cache() -> None:
    """Forget every parsed chain and key (the agent's reload calls this)."""
    _parsed_credentials.clear()


def material_cache_stats() -> tuple[int, int, int]:
    """``(hits, misses, entries)`` of the parsed-credentials cache since the process started
    (or since the counters were last read by a test; the counters never reset)."""
    return _parsed_credentials.stats()


def _credentials_from_der(cert_der: bytes, key_der: bytes) -> X509Credentials:
    key = ("der", cert_der)
    found = _parsed_credentials.get(key, cert_der, key_der)
    if found is None:
        found = X509Credentials.from_der(cert_der, key_der)
        _parsed_credentials.put(key, cert_der, key_der, found)
    return found


def _credentials_from_files(
    cert_file: str,
    key_file: str,
    read: Callable[[str, str], tuple[bytes, FileIdentity]],
) -> X509Credentials:
    cert_data, cert_identity = read(cert_file, "certificate file")
    key_data, key_identity = read(key_file, "private key file")
    key = ("files", cert_identity, key_identity)
    found = _parsed_credentials.get(key, cert_data, key_data)
    if found is None:
        found = X509Credentials.from_pem(
            cert_data, key_data, cert_name=cert_file, key_name=key_file
        )
        _parsed_credentials.put(key, cert_data, key_data, found)
    return found


def _x509_credentials(
    request: HandshakeRequest, inline: InlineMaterial, files: X509Files, reads: _Reads
) -> X509Credentials | None:
    consumer = reads.consumer
    if request.certificate or request.private_key:
        if not (request.certificate and request.private_key):
            raise _missing("certificate and private key serials must be given together")
        consumer.check_key(request.certificate, "certificate")
        consumer.check_key(request.private_key, "private")
        return _credentials_from_der(
            _blob_from_keyring(request.certificate, "certificate"),
            _blob_from_keyring(request.private_key, "private"),
        )
    if inline.certificate_chain:
        return _credentials_from_der(b"".join(inline.certificate_chain), inline.private_key)
    if inline.certificate_file or inline.private_key_file or not consumer.privileged:
        cert_file, key_file = inline.certificate_file, inline.private_key_file
        read = reads.consumer_file_identified
        if is_pkcs11_uri(key_file) or is_pkcs11_uri(cert_file):
            # Never for a consumer (root's too): it would pick the module the root agent
            # loads or sign with the administrator's token keys (see ktlsd.hardware_key).
            raise HandshakeError(
                FailureCause.INVALID_REQUEST,
                "pkcs11: URIs are accepted only in the agent's configuration, not from "
                "service consumers",
            )
    else:
        cert_file, key_file = files.certificate, files.private_key
        read = reads.agent_file_identified
        if cert_file and is_pkcs11_uri(key_file):
            assert key_file is not None
            return _token_credentials(cert_file, key_file, files, reads)
    if cert_file and key_file:
        return _credentials_from_files(cert_file, key_file, read)
    if cert_file or key_file:
        raise _missing("x509.certificate and x509.private_key must be configured together")
    return None


def _uses_configured_files(
    request: HandshakeRequest, inline: InlineMaterial, consumer: Consumer
) -> bool:
    """Whether the request's certificate comes from the configured files (no serials, no
    inline material, a trusted consumer): only then does the configured PQ chain apply."""
    return not (
        request.certificate or request.private_key or inline.certificate_chain
        or inline.certificate_file or inline.private_key_file or not consumer.privileged
    )


def pq_credentials(
    files: X509Files, read: Callable[[str, str], bytes]
) -> X509Credentials | None:
    """tlshd's ``x509.pq.certificate``/``x509.pq.private_key``: an ML-DSA chain, parsed by
    the system OpenSSL (the Python ``cryptography`` package may not know ML-DSA). None when
    none is configured, or when the library has no ML-DSA (then only the classic chain is
    served; the agent warned at start). A chain that is not ML-DSA is refused, as tlshd
    ignores one: raises ``HandshakeError(MISSING_MATERIAL)``."""
    if not (files.pq_certificate and files.pq_private_key) or not library_has_ml_dsa():
        return None
    cert_name, key_name = files.pq_certificate, files.pq_private_key
    credentials, key_type = credentials_parsed_by_openssl(
        read(cert_name, "PQ certificate file"), read(key_name, "PQ private key file"),
        cert_name=cert_name, key_name=key_name,
    )
    if not key_type.upper().startswith("ML-DSA"):
        raise _missing(f"{cert_name} / {key_name}: x509.pq.certificate holds a {key_type} "
                       "key, not ML-DSA")
    return credentials


def pq_configuration_notes(roles: dict[str, X509Files]) -> list[tuple[int, str]]:
    """What the configured PQ chains will do, as (logging level, message) pairs for the
    agent's start and ``run --check``: a warning where they are ignored (the library has no
    ML-DSA) or cannot be used, a note of the chain each peer gets otherwise. ``roles`` maps a
    section name (``authenticate.server``) to its files. Reads the files (blocking)."""
    notes: list[tuple[int, str]] = []
    for section, files in roles.items():
        if not (files.pq_certificate and files.pq_private_key):
            continue
        if not library_has_ml_dsa():
            notes.append((logging.WARNING,
                          f"[{section}] x509.pq.certificate is ignored: the system library "
                          f"({library_version()}) has no ML-DSA; every peer gets the classic "
                          "chain (x509.certificate)"))
            continue
        try:
            reads = _Reads(TRUSTED, DEFAULT_MAX_FILE_BYTES, time.monotonic() + MATERIAL_TIMEOUT)
            pq_credentials(files, reads.agent_file)
        except HandshakeError as exc:
            notes.append((logging.WARNING, f"[{section}] x509.pq.certificate cannot be used "
                          f"(its handshakes will fail): {exc.reason}"))
            continue
        other = "x509.certificate" if files.certificate else "no other chain"
        notes.append((logging.INFO,
                      f"[{section}] ML-DSA chain {files.pq_certificate} for peers whose "
                      f"signature_algorithms prefer ML-DSA, {other} for the others"))
    return notes


def _token_credentials(
    cert_file: str, uri: str, files: X509Files, reads: _Reads
) -> X509Credentials:
    """The configured certificate file with a key held by a PKCS#11 token, loaded once per
    configuration (``files``; a reload loads it again): :mod:`ktlsd.hardware_key`."""
    cert_data = reads.agent_file(cert_file, "certificate file")
    key = hardware_key.token_key(
        uri, files.pkcs11_module, owner=files, timeout=reads._remaining()
    )
    return X509Credentials.from_pem_and_token_key(
        cert_data, key, cert_name=cert_file, key_name=redact(uri)
    )


def _trust(inline: InlineMaterial, files: X509Files, reads: _Reads) -> dict[str, Any]:
    """The truststore and CRL fields of a TlsConfig: a consumer's files read with its rights
    (its truststore must be a file), the configuration's with the agent's."""
    fields: dict[str, Any] = {}
    if inline.truststore:
        fields["truststore"] = inline.truststore
        fields["truststore_contents"] = reads.consumer_truststore(inline.truststore)
    elif files.truststore:
        fields["truststore"] = files.truststore
        # None for a configured hashed directory: OpenSSL searches it.
        fields["truststore_contents"] = reads.agent_truststore(files.truststore)
    if inline.crl:
        fields["crl"] = inline.crl
        fields["crl_contents"] = reads.consumer_file(inline.crl, "CRL file")
    elif files.crl:
        fields["crl"] = files.crl
        fields["crl_contents"] = reads.agent_file(files.crl, "CRL file")
    return fields


def build_tls_config_blocking(
    request: HandshakeRequest,
    *,
    x509_files: X509Files,
    psk_keyrings: Sequence[int] = (keyring.KEY_SPEC_SESSION_KEYRING,),
    groups: str | None = None,
    consumer: Consumer = TRUSTED,
    legacy_psk_sha384: LegacyPskSha384 = DEFAULT_LEGACY_PSK_SHA384,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    timeout: float = MATERIAL_TIMEOUT,
    record_size_limit: int = DEFAULT_RECORD_SIZE_LIMIT,
    key_log_file: str | None = None,
) -> TlsConfig:
    """Resolve a request's material into the engine's configuration. Blocks the calling
    thread (keyring and file reads, key parsing): not for the event loop thread, where
    :func:`build_tls_config` is the way. ``key_log_file`` (the agent's ``[ktlsd]
    key_log_file``, never a consumer's wish): the handshake's secrets are written there."""
    if request.message_type is MessageType.CLIENTHELLO:
        role = Role.CLIENT
    elif request.message_type is MessageType.SERVERHELLO:
        role = Role.SERVER
    else:
        raise HandshakeError(
            FailureCause.UNSUPPORTED, f"message type {request.message_type.name.lower()}"
        )
    inline = request.inline or InlineMaterial()
    suites = _suites(inline.ciphersuites)
    reads = _Reads(consumer, max_file_bytes, time.monotonic() + timeout)
    common: dict[str, Any] = {
        "role": role,
        "ciphersuites": suites,
        "groups": _groups(groups),
        "peername": request.peername,
        "legacy_psk_sha384": legacy_psk_sha384,
        "record_size_limit": record_size_limit,
        "key_log": KeyLogFile(key_log_file) if key_log_file else None,
    }

    if request.auth_mode is AuthMode.PSK:
        if role is Role.CLIENT:
            for serial in request.peer_identities:
                if serial:
                    consumer.check_key(serial, "PSK")
            keys = tuple(psk_from_keyring(s) for s in request.peer_identities if s)
            keys += _inline_psks(inline)
            if not keys:
                raise _missing("PSK client request carries no PSK")
            return TlsConfig(psk_keys=keys, **common)
        for serial in request.peer_identities:
            if serial:
                consumer.check_key(serial, "PSK")
        # An unprivileged consumer never gets a search of the agent's keyrings (.nvme...).
        rings = psk_keyrings if consumer.privileged else ()
        lookup = _server_lookup(request, inline, rings)
        return TlsConfig(psk_lookup=lookup, **common)

    if request.auth_mode in (AuthMode.X509, AuthMode.UNAUTH):
        mutual = request.auth_mode is AuthMode.X509
        if role is Role.CLIENT:
            # unauth (NFS xprtsec=tls): we stay anonymous but still verify the server, as tlshd
            # does; presenting a certificate would make nfsd treat us as peer-authenticated.
            credentials = (
                _x509_credentials(request, inline, x509_files, reads) if mutual else None
            )
            first, second = (
                _with_pq_chain(credentials, request, inline, x509_files, reads)
                if mutual else (None, None)
            )
            return TlsConfig(credentials=first, second_credentials=second,
                             **_trust(inline, x509_files, reads), **common)
        credentials = _x509_credentials(request, inline, x509_files, reads)
        first, second = _with_pq_chain(credentials, request, inline, x509_files, reads)
        if first is None:
            raise _missing("x509 server has no certificate and private key")
        required = inline.require_client_cert or x509_files.require_client_cert
        client_auth: ClientAuth = (
            "require" if mutual and required else ("request" if mutual else "none")
        )
        # The configured allow list is the host's policy for the kernel's servers (nfsd,
        # nvmet); a service consumer's server brings its own (peername), with its own
        # truststore and clients. A list means a listed certificate is required, in any mode.
        allowed = x509_files.client_allowed_sans if consumer.uid is None else ()
        if allowed:
            client_auth = "require"
        trust = _trust(inline, x509_files, reads) if client_auth != "none" else {}
        return TlsConfig(
            credentials=first, second_credentials=second, client_auth=client_auth,
            client_allowed_sans=allowed, **trust, **common,
        )

    raise HandshakeError(
        FailureCause.INVALID_REQUEST, f"auth mode {request.auth_mode.name.lower()}"
    )


def _with_pq_chain(
    credentials: X509Credentials | None,
    request: HandshakeRequest,
    inline: InlineMaterial,
    files: X509Files,
    reads: _Reads,
) -> tuple[X509Credentials | None, X509Credentials | None]:
    """The TlsConfig's ``credentials`` and ``second_credentials``: the classic chain, plus
    the configured ML-DSA chain when the configured files apply and the library has ML-DSA
    (alone, it is the only chain)."""
    pq = None
    if _uses_configured_files(request, inline, reads.consumer):
        pq = pq_credentials(files, reads.agent_file)
    if credentials is None:
        return pq, None
    return credentials, pq


def _in_a_fresh_thread(
    fn: Callable[[HandshakeRequest, dict[str, Any]], TlsConfig],
    request: HandshakeRequest,
    kwargs: dict[str, Any],
) -> concurrent.futures.Future[TlsConfig]:
    """Run one build in a thread started now: it inherits the calling thread's credentials
    and keyrings as they are at this request (a pooled thread would keep those it was born
    with, e.g. an older session keyring). A build waits on its file reads for at most its
    timeout, so these threads end on their own."""
    future: concurrent.futures.Future[TlsConfig] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(request, kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    # The bare thread API: no start-up handshake with the event loop thread (which a
    # threading.Thread makes), and like a daemon it never holds up the agent's exit.
    _thread.start_new_thread(run, ())
    return future


def _touches_nothing(request: HandshakeRequest) -> bool:
    """A PSK request without key serials: building it reads no keyring and no file and
    parses nothing, so it needs no thread (a server's keyring search happens later, per
    offered identity)."""
    return request.auth_mode is AuthMode.PSK and not any(request.peer_identities)


def _build_and_prepare(request: HandshakeRequest, kwargs: dict[str, Any]) -> TlsConfig:
    config = build_tls_config_blocking(request, **kwargs)
    prepare_context(config)  # parse certificates, keys, truststore and CRLs here, not on the loop
    return config


async def build_tls_config(
    request: HandshakeRequest,
    *,
    x509_files: X509Files,
    psk_keyrings: Sequence[int] = (keyring.KEY_SPEC_SESSION_KEYRING,),
    groups: str | None = None,
    consumer: Consumer = TRUSTED,
    legacy_psk_sha384: LegacyPskSha384 = DEFAULT_LEGACY_PSK_SHA384,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    timeout: float = MATERIAL_TIMEOUT,
    record_size_limit: int = DEFAULT_RECORD_SIZE_LIMIT,
    key_log_file: str | None = None,
) -> TlsConfig:
    """:func:`build_tls_config_blocking` in a thread of its own, with its ``SSL_CTX`` built
    there too; the event loop only waits, at most ``timeout`` seconds (``TIMEOUT`` after).
    A PSK request without key serials touches nothing and is built right here."""
    kwargs: dict[str, Any] = {
        "x509_files": x509_files, "psk_keyrings": tuple(psk_keyrings), "groups": groups,
        "consumer": consumer, "legacy_psk_sha384": legacy_psk_sha384,
        "max_file_bytes": max_file_bytes, "timeout": timeout, "key_log_file": key_log_file,
        "record_size_limit": record_size_limit,
    }
    if _touches_nothing(request):
        return build_tls_config_blocking(request, **kwargs)
    future = _in_a_fresh_thread(_build_and_prepare, request, kwargs)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout)
    except TimeoutError:
        raise HandshakeError(
            FailureCause.TIMEOUT,
            f"preparing the keys and certificates took longer than {timeout:g} s",
        ) from None


def _server_lookup(
    request: HandshakeRequest, inline: InlineMaterial, psk_keyrings: Sequence[int]
) -> Callable[[bytes], PskKey | None]:
    """Server PSK selection: inline keys, a given serial, or a search of our keyrings."""
    inline_keys = list(_inline_psks(inline))
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
