"""The TLS 1.3 handshake engine: a sans-I/O core over OpenSSL plus a thin asyncio driver.

:class:`TlsHandshake` is the core. It never touches a socket: the driver gives it the bytes the
peer sent and sends whatever it produces. :meth:`TlsHandshake.receive` takes any number of
records at once (all complete ones go to OpenSSL in one step) and says how many bytes it took.
That is what makes the hand-off to a record layer exact: OpenSSL reads one record at a time
from its memory BIO and stops after the handshake's last one, so once the handshake completes
the bytes after that record are not taken. The driver peeks at the socket (``MSG_PEEK``) and
then consumes exactly the bytes the core took, so nothing after the handshake's last record
leaves the socket. kTLS (or ktlsd's user-space record layer) then starts at exactly the next
record, with sequence numbers 0/0:

* as a server we send no NewSessionTicket (``SSL_CTX_set_num_tickets(0)``), so our first
  application record is record 0 under the application secret;
* as a client, tickets a server sends after its Finished stay unread in the socket. The record
  layer reads them at receive sequence 0, 1, ... as handshake-type records and skips them.

An incomplete record at the end of what was peeked is taken (and held by the core) only while
the handshake still wants input: then the next record can only belong to the handshake.

:func:`perform_handshake` is the asyncio driver. The socket belongs to someone else (a kernel fd,
or an fd shared over ``SCM_RIGHTS`` with a consumer process), so the driver never changes its
``O_NONBLOCK`` flag: every ``recv``/``send`` carries ``MSG_DONTWAIT`` and waits for readiness
with ``loop.add_reader``/``add_writer``. It runs in event-loop callbacks, one turn per flight
the peer sends (peek, hand over, consume, answer). Many handshakes therefore share one event
loop. The traffic secrets come from OpenSSL's keylog callback, which OpenSSL calls five times
per handshake and end; the two lines needed are kept as they come and parsed once, at the end.

External PSKs. OpenSSL's public API offers exactly one external PSK per ClientHello: the
``psk_use_session`` callback returns a single identity (a resumption ticket is the only other
PSK that can ride along). A client given several :class:`PskKey` s offers the first one whose
hash the configured suites allow, and says so in its log line; the server side accepts any of
the identities a client offers, choosing the first one ``psk_lookup`` knows. The suites are cut
down to the PSK's hash on both sides, because a peer that prefers the other hash silently
declines the PSK. An unknown identity makes our server fail the handshake with an
``unknown_psk_identity`` alert, which a client can tell apart from other refusals.

SHA-384 PSKs and old tlshd (``TlsConfig.legacy_psk_sha384``). tlshd 1.0 on GnuTLS < 3.8.11
binds every external PSK to SHA-256: for a SHA-384 PSK it sends a 32-byte binder and wants a
SHA-256 suite. Our server sees this in the ClientHello before any PSK is chosen: the
client-hello callback parses the ``pre_shared_key`` extension (:mod:`ktlsd.tls.client_hello`)
and pairs each identity with its binder's length. With ``accept`` (the default) a SHA-384 PSK
offered with a 32-byte binder is used as a SHA-256 PSK with the SHA-256 suites, and a warning
names the peer and the setting; with ``refuse`` the handshake fails at once with a
``handshake_failure`` alert and a reason that says why. With ``offer`` our client, too, binds
SHA-384 PSKs to SHA-256 the old way, to reach servers that run the old tlshd. Anything else is
spec-strict: SHA-384 PSKs go out with TLS_AES_256_GCM_SHA384 and a 48-byte binder. The
:class:`Session` reports the suite OpenSSL negotiated, the binder's hash, and whether the
legacy binding was used. Nothing is guessed by retrying.

Record size limit (RFC 8449). OpenSSL has no support for the ``record_size_limit`` extension
(28), so it rides as a custom extension (:mod:`ktlsd.tls._openssl`): our client offers
``TlsConfig.record_size_limit`` (2^14+1 unless configured smaller) in its ClientHello; our
server answers a client that offered one with its own in EncryptedExtensions, and says
nothing to a client that did not. The peer's value must be exactly two bytes (else
``decode_error``) and at least 64 (else ``illegal_parameter``); a server that sends it
unasked gets ``unsupported_extension`` (OpenSSL's rule for all custom extensions). Values above
2^14+1 are allowed and mean 2^14+1. The handshake records OpenSSL sends after the peer's
value arrived (a server's certificate flight) are cut to it as well, but OpenSSL goes no lower
than 512 bytes of plaintext per record. The :class:`Session` reports the peer's limit
(``peer_record_size_limit``: the records we send carry at most that minus one byte of
content) and ours when the negotiation completed (``record_size_limit``). GnuTLS (tlshd 1.4)
behaves the same on the wire, except that it ignores a client's value below 512 rather than
honouring it.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import hashlib
import ipaddress
import logging
import socket
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from ktlsd.credentials import X509Credentials, read_crl, read_truststore
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.settings import (
    DEFAULT_LEGACY_PSK_SHA384,
    DEFAULT_RECORD_SIZE_LIMIT,
    LEGACY_PSK_SHA384_MODES,
    MAX_RECORD_SIZE_LIMIT,
    MIN_RECORD_SIZE_LIMIT,
    LegacyPskSha384,
)
from ktlsd.tls import _openssl as ossl
from ktlsd.tls import policy
from ktlsd.tls.allowed_sans import AllowedSans
from ktlsd.tls.client_hello import MalformedPskExtension, OfferedPsk, parse_pre_shared_key
from ktlsd.tls.keylog import KeyLogError, KeyLogFile
from ktlsd.tls.protocol import (
    MAX_CIPHERTEXT,
    RECORD_HEADER_LENGTH,
    AlertDescription,
    ContentType,
    ProtocolVersion,
)
from ktlsd.tls.session import CipherSuite, PeerIdentity, Role, Session

__all__ = [
    "ML_DSA_SCHEMES",
    "PskKey",
    "TlsConfig",
    "TlsHandshake",
    "credentials_parsed_by_openssl",
    "handshake_blocking",
    "library_has_ml_dsa",
    "library_version",
    "perform_handshake",
    "prepare_context",
]

log = logging.getLogger(__name__)

HashName = Literal["sha256", "sha384"]
ClientAuth = Literal["none", "request", "require"]

_RECORD_TYPES = frozenset(int(t) for t in ContentType)
_MAJOR_VERSION = ProtocolVersion.TLS_1_2 >> 8  # any 3.x: a ClientHello may say 3.1
_RECORD_HEADER = struct.Struct(">BHH")  # content type, legacy version, length

# Alerts received that mean the peer refused us (rather than a protocol error).
_REJECTION_ALERTS = frozenset(
    {
        AlertDescription.BAD_RECORD_MAC,  # the peer could not decrypt us (different keys)
        AlertDescription.HANDSHAKE_FAILURE,
        AlertDescription.BAD_CERTIFICATE,
        AlertDescription.UNSUPPORTED_CERTIFICATE,
        AlertDescription.CERTIFICATE_REVOKED,
        AlertDescription.CERTIFICATE_EXPIRED,
        AlertDescription.CERTIFICATE_UNKNOWN,
        AlertDescription.UNKNOWN_CA,
        AlertDescription.ACCESS_DENIED,
        AlertDescription.DECRYPT_ERROR,  # e.g. a PSK binder that does not verify
        AlertDescription.INSUFFICIENT_SECURITY,
        AlertDescription.CERTIFICATE_REQUIRED,
    }
)


@dataclass(frozen=True)
class PskKey:
    """An external TLS 1.3 PSK: the identity sent in the clear and the key (never logged).

    ``hash_name`` binds the key to a hash; only suites with that hash can use it.
    ``serial`` is the keyring serial the key came from, if any (reported as remote-auth).
    """

    identity: bytes
    key: bytes = field(repr=False)
    hash_name: HashName = "sha256"
    serial: int | None = None

    def __post_init__(self) -> None:
        if self.hash_name not in ("sha256", "sha384"):
            raise ValueError(f"PSK hash must be sha256 or sha384, not {self.hash_name!r}")
        if not self.identity:
            raise ValueError("PSK identity is empty")
        if len(self.identity) > 0xFFFF:
            raise ValueError("PSK identity longer than 65535 bytes")
        if not self.key:
            raise ValueError(f"PSK {self.describe()} has an empty key")

    def describe(self) -> str:
        """The identity (and serial) for logs; never the key."""
        text = self.identity.decode("utf-8", "backslashreplace")
        return f"{text!r}" + (f" (key {self.serial:#x})" if self.serial is not None else "")


_MAX_PSK_LOOKUPS = 16
"""Offered PSK identities our server looks up per ClientHello, at most: a lookup may search
keyrings, and a hostile client can offer hundreds of identities in one ClientHello."""
_SHOWN_IDENTITIES = 4  # unknown identities named in a failure reason, at most
_SHOWN_IDENTITY_BYTES = 64  # of each (an identity may be 65535 bytes long)


@dataclass(frozen=True)
class TlsConfig:
    """Everything one handshake needs to know besides the socket.

    Client: ``psk_keys`` are offered in order (only the first usable one goes on the wire, see
    the module docstring); with no PSK the server is authenticated by certificate against the
    truststore (see below) and, when ``peername`` is set, must carry it as a DNS or IP SAN.
    ``credentials`` are sent when the server asks for a certificate; without them the client is
    anonymous.

    Server: ``psk_lookup`` maps an identity the client offered to a key (or None);
    ``credentials`` are required for certificate handshakes; ``client_auth`` decides whether a
    client certificate is asked for; ``peername`` optionally checks the client's certificate;
    ``client_allowed_sans``, when not empty, lets in only a client certificate carrying one of
    those names as a DNS or IP SAN (:mod:`ktlsd.tls.allowed_sans`; tlshd's
    ``x509.client_allowed_sans``). It is judged while OpenSSL verifies the certificate, so a
    refused client gets a ``bad_certificate`` alert; the failure is ``UNTRUSTED_CERTIFICATE``.

    Truststore and CRL: ``truststore_contents``/``crl_contents`` are the files' bytes (PEM, or
    one DER value), read by the caller (the agent reads them with the consumer's rights, see
    :mod:`ktlsd.files`); the engine parses them from memory and OpenSSL never opens a path.
    ``truststore``/``crl`` name where they came from (errors, logs). Given only a name, the
    engine reads the file itself with the process's own rights (command-line tools, tests);
    a ``truststore`` that is a directory is handed to OpenSSL's hashed-directory lookup, which
    is for the agent's own configuration and operators only — never a consumer's path.
    No truststore at all means OpenSSL's default locations.

    ``second_credentials``: another chain whose key is of another type (tlshd's
    ``x509.pq.certificate``, an ML-DSA chain next to a classic one). OpenSSL keeps one chain
    per key type and signs with the first scheme in the peer's signature_algorithms (a
    server's CertificateRequest, for a client) that one of them can make: the peer's list
    chooses the chain, and the result says which (:attr:`Session.signature_scheme`).

    ``verify_peer=False`` accepts any peer certificate (testing only).
    ``ciphersuites`` are used as given; the default is the system crypto policy's TLS 1.3
    suites that kTLS can carry (:func:`ktlsd.tls.policy.default_suites`; ValueError when there
    are none). Callers narrow a list they were given with
    :func:`ktlsd.tls.policy.effective_suites` first.
    ``groups`` is an OpenSSL groups list such as ``"X25519:P-256"``; None keeps the library's
    default (the system policy's groups, see :mod:`ktlsd.tls.policy`).
    ``legacy_psk_sha384`` (``[ktlsd] legacy_psk_sha384``): ``accept`` lets our server take a
    SHA-384 PSK that a client bound to SHA-256 (tlshd 1.0); ``offer`` does that and makes our
    client bind SHA-384 PSKs to SHA-256 too; ``refuse`` is spec-strict both ways (see the
    module docstring).
    ``record_size_limit`` is the RFC 8449 limit we advertise: the largest record we accept,
    content type included (64..2^14+1; see the module docstring).
    ``key_log``: write this handshake's secrets there when it ends, for debugging
    (:mod:`ktlsd.tls.keylog`); not part of the context (no effect on the context cache).
    """

    role: Role
    psk_keys: tuple[PskKey, ...] = ()
    psk_lookup: Callable[[bytes], PskKey | None] | None = None
    credentials: X509Credentials | None = None
    second_credentials: X509Credentials | None = None
    truststore: str | None = None
    crl: str | None = None
    truststore_contents: bytes | None = field(default=None, repr=False)
    crl_contents: bytes | None = field(default=None, repr=False)
    peername: str | None = None
    client_auth: ClientAuth = "none"
    client_allowed_sans: tuple[str, ...] = ()
    verify_peer: bool = True
    ciphersuites: tuple[CipherSuite, ...] = field(default_factory=policy.default_suites)
    groups: str | None = None
    legacy_psk_sha384: LegacyPskSha384 = DEFAULT_LEGACY_PSK_SHA384
    record_size_limit: int = DEFAULT_RECORD_SIZE_LIMIT
    key_log: KeyLogFile | None = field(default=None, compare=False)
    # Derived once here rather than in every handshake (not settings: not compared or shown):
    # the configured suites of each hash with their OpenSSL list, and the context cache key.
    _suites_by_hash: dict[str, tuple[tuple[CipherSuite, ...], bytes]] = field(
        init=False, repr=False, compare=False
    )
    _context_key: _ContextKey = field(init=False, repr=False, compare=False)
    _allowed_sans: AllowedSans = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.legacy_psk_sha384 not in LEGACY_PSK_SHA384_MODES:
            raise ValueError(
                "legacy_psk_sha384 must be refuse, accept or offer, "
                f"not {self.legacy_psk_sha384!r}"
            )
        if not MIN_RECORD_SIZE_LIMIT <= self.record_size_limit <= MAX_RECORD_SIZE_LIMIT:
            raise ValueError(
                f"record_size_limit must be {MIN_RECORD_SIZE_LIMIT}..{MAX_RECORD_SIZE_LIMIT}, "
                f"not {self.record_size_limit}"
            )
        if not isinstance(self.role, Role):
            raise ValueError(f"role must be a Role, not {self.role!r}")
        if self.client_auth not in ("none", "request", "require"):
            raise ValueError(f"client_auth must be none, request or require: {self.client_auth!r}")
        if self.client_allowed_sans and (
            self.role is not Role.SERVER or self.client_auth == "none"
        ):
            raise ValueError("client_allowed_sans needs a server that asks for client certificates")
        object.__setattr__(self, "_allowed_sans", AllowedSans(tuple(self.client_allowed_sans)))
        if not self.ciphersuites:
            raise ValueError("no cipher suites configured")
        if self.second_credentials is not None and self.credentials is None:
            raise ValueError("a second certificate chain needs a first one")
        for suite in self.ciphersuites:
            if not isinstance(suite, CipherSuite):
                raise ValueError(f"not a CipherSuite: {suite!r}")
        by_hash = {}
        for hash_name in ("sha256", "sha384"):
            suites = tuple(s for s in self.ciphersuites if s.hash_name == hash_name)
            by_hash[hash_name] = (suites, _suite_names(suites).encode())
        object.__setattr__(self, "_suites_by_hash", by_hash)
        object.__setattr__(self, "_context_key", _ContextKey(self))

    def suites_for(self, hash_name: str) -> tuple[CipherSuite, ...]:
        """The configured suites whose hash is ``hash_name`` (for a PSK bound to it)."""
        return self._suites_by_hash[hash_name][0]

    def suite_list_for(self, hash_name: str) -> bytes:
        """:meth:`suites_for` as an OpenSSL cipher suite list."""
        return self._suites_by_hash[hash_name][1]

    @property
    def allowed_sans(self) -> AllowedSans:
        """``client_allowed_sans`` as the check that judges a client certificate."""
        return self._allowed_sans

    @property
    def uses_psk(self) -> bool:
        if self.role is Role.CLIENT:
            return bool(self.psk_keys)
        return self.psk_lookup is not None


def _suite_names(suites: tuple[CipherSuite, ...]) -> str:
    return ":".join(s.iana_name for s in suites)


_SUITES_BY_CODE = {suite.code: suite for suite in CipherSuite}


@functools.lru_cache(maxsize=256)
def _is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# --- SSL_CTX cache --------------------------------------------------------------------------------
# Building an SSL_CTX (parsing the chain, loading a truststore) costs more than a handshake's CPU,
# so contexts are shared between handshakes with the same non-PSK settings. PSK keys never enter
# the context or the cache key: they are handed out per connection by callbacks.
_CTX_CACHE_SIZE = 32
_ctx_cache: OrderedDict[_ContextKey, ossl.SslContext] = OrderedDict()
_ctx_lock = threading.Lock()


def _digest(contents: bytes | None) -> bytes | None:
    # The cache keeps a digest, not up to max_file_bytes of truststore or CRL per context.
    return None if contents is None else hashlib.sha256(contents).digest()


_ctx_hits = _ctx_misses = 0


class _ContextKey:
    """The settings an SSL_CTX is built from, with the hash computed once (a configuration is
    looked up once per handshake; hashing its enums and credentials each time adds up)."""

    __slots__ = ("_hash", "settings")

    def __init__(self, config: TlsConfig) -> None:
        self.settings = (
            config.role,
            config.credentials,
            config.second_credentials,
            config.truststore,
            config.crl,
            _digest(config.truststore_contents),
            _digest(config.crl_contents),
            config.client_auth,
            config.verify_peer,
            config.ciphersuites,
            config.groups,
            config.uses_psk,
        )
        self._hash = hash(self.settings)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ContextKey) and (
            other is self or (other._hash == self._hash and other.settings == self.settings)
        )


def context_cache_stats() -> tuple[int, int, int]:
    """``(hits, misses, contexts held)`` of the SSL_CTX cache since the process started."""
    with _ctx_lock:
        return _ctx_hits, _ctx_misses, len(_ctx_cache)


def _build_context(config: TlsConfig) -> ossl.SslContext:
    server = config.role is Role.SERVER
    ctx = ossl.SslContext(server=server)
    try:
        ctx.set_ciphersuites(_suite_names(config.ciphersuites))
        if config.groups:
            ctx.set_groups(config.groups)
        if config.credentials is not None:
            ctx.use_certificate_chain(config.credentials.chain, config.credentials.private_key)
        if config.second_credentials is not None:
            _use_second_chain(ctx, config)
        need_trust = config.verify_peer and (
            (not server and not config.uses_psk) or (server and config.client_auth != "none")
        )
        if need_trust:
            _load_trust(ctx, config)
        if server:
            mode = {
                "none": ossl.SSL_VERIFY_NONE,
                "request": ossl.SSL_VERIFY_PEER,
                "require": ossl.SSL_VERIFY_PEER | ossl.SSL_VERIFY_FAIL_IF_NO_PEER_CERT,
            }[config.client_auth]
        else:
            mode = ossl.SSL_VERIFY_PEER
        ctx.set_verify(mode, accept_any=not config.verify_peer)
    except ossl.OpenSSLError as exc:
        ctx.free()
        raise HandshakeError(FailureCause.MISSING_MATERIAL, str(exc)) from None
    except BaseException:
        ctx.free()
        raise
    return ctx


def _use_second_chain(ctx: ossl.SslContext, config: TlsConfig) -> None:
    """Install the second chain next to the first: OpenSSL files each certificate and key
    under its key type (provider key types such as ML-DSA get slots of their own), so two
    chains of different types live side by side and the peer's signature_algorithms pick
    one per handshake. Two chains of one type would replace each other: refused."""
    first, second = config.credentials, config.second_credentials
    assert first is not None and second is not None
    first_type = ossl.key_type_name(first.private_key)
    second_type = ossl.key_type_name(second.private_key)
    if first_type == second_type:
        raise ossl.OpenSSLError(
            "cannot use the second certificate chain",
            [f"its key type ({second_type}) is the first chain's; OpenSSL keeps one chain "
             "per key type"],
        )
    ctx.use_certificate_chain(second.chain, second.private_key)


ML_DSA_SCHEMES = ossl.ML_DSA_SCHEMES


def library_has_ml_dsa() -> bool:
    """Whether the system OpenSSL signs and verifies TLS handshakes with ML-DSA (3.5 does,
    3.0 does not)."""
    return ossl.knows_signature_scheme("mldsa65")


def library_version() -> str:
    """The system OpenSSL's version line, for messages."""
    return ossl.library_version()


def credentials_parsed_by_openssl(
    cert_data: bytes, key_data: bytes, *, cert_name: str, key_name: str
) -> tuple[X509Credentials, str]:
    """A PEM chain (leaf first) and an unencrypted PEM private key parsed by the system
    OpenSSL itself, for key types the Python ``cryptography`` package may not know (ML-DSA);
    returns the credentials and OpenSSL's name of the key type (``ML-DSA-65``). Raises
    ``HandshakeError(MISSING_MATERIAL)`` with a one-line reason naming the files."""
    where = f"{cert_name} / {key_name}"
    try:
        chain, key_der, key_type = ossl.certificate_key_pair(cert_data, key_data, where)
    except ossl.OpenSSLError as exc:
        raise HandshakeError(FailureCause.MISSING_MATERIAL, str(exc)) from None
    try:
        return X509Credentials(chain=chain, private_key=bytes(key_der)), key_type
    finally:
        key_der[:] = bytes(len(key_der))


def _load_trust(ctx: ossl.SslContext, config: TlsConfig) -> None:
    """Trust anchors and CRLs into ``ctx``, from memory (see :class:`TlsConfig`)."""
    anchors = config.truststore_contents
    if anchors is None and config.truststore is not None:
        anchors = read_truststore(config.truststore)  # None: a hashed directory
    if anchors is not None:
        ctx.add_trust_anchors(anchors, config.truststore or "(in memory)")
    elif config.truststore is not None:
        ctx.load_truststore_directory(config.truststore)
    else:
        ctx.load_default_truststore()
    crls = config.crl_contents
    if crls is None and config.crl is not None:
        crls = read_crl(config.crl)
    if crls is not None:
        ctx.add_crls(crls, config.crl or "(in memory)")


def prepare_context(config: TlsConfig) -> None:
    """Build (or find) the ``SSL_CTX`` for ``config`` now — in a worker thread, so that parsing
    certificates, keys, truststores and CRLs stays off the event loop and the handshake finds
    the context cached. Raises :class:`HandshakeError` (``MISSING_MATERIAL``) as the handshake
    would for unusable material."""
    _get_context(config)


def _get_context(config: TlsConfig) -> ossl.SslContext:
    global _ctx_hits, _ctx_misses
    key = config._context_key
    with _ctx_lock:
        ctx = _ctx_cache.get(key)
        if ctx is not None:
            _ctx_hits += 1
            _ctx_cache.move_to_end(key)
            return ctx
        _ctx_misses += 1
    ctx = _build_context(config)
    with _ctx_lock:
        _ctx_cache[key] = ctx
        while len(_ctx_cache) > _CTX_CACHE_SIZE:
            _ctx_cache.popitem(last=False)  # connections hold their own reference
    return ctx


def clear_context_cache() -> None:
    """Forget cached contexts (e.g. after files named only by path, which are cached by name,
    changed on disk; contexts built from ``*_contents`` follow the bytes anyway)."""
    with _ctx_lock:
        _ctx_cache.clear()


# --- the sans-I/O core ---------------------------------------------------------------------------
class TlsHandshake(ossl.ConnectionHooks):
    """One TLS 1.3 handshake, driven by records in and bytes out; no I/O of its own.

    Use: ``data = hs.start()``; send it; while :attr:`wants_input`: ``taken, data =
    hs.receive(received)``, drop ``taken`` bytes of what was received, send ``data``; then
    ``hs.check()`` (raises on failure) and ``hs.session()``. :meth:`receive_record` is the same
    for exactly one complete record. Always call :meth:`close` (or use it as a context manager).
    """

    def __init__(
        self,
        config: TlsConfig,
        *,
        peer: str | None = None,
        peer_socket: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.role = config.role
        # The peer's address for log lines and reasons: ``peer``, or looked up from
        # ``peer_socket`` when first needed (most handshakes never need it).
        self._peer = peer
        self._peer_socket = peer_socket
        self.complete = False
        self.failure: HandshakeError | None = None
        self._secrets: tuple[bytes, bytes] | None = None  # (client, server) traffic secrets
        self._held = bytearray()  # an incomplete record taken by receive(), see there
        self._offered_psk: PskKey | None = None
        self._selected_psk: PskKey | None = None
        # The hash the offered/selected PSK is bound to (binder, key schedule, suites): the
        # key's own hash, or SHA-256 for a SHA-384 PSK bound the old tlshd way.
        self._psk_hash: str | None = None
        self._legacy_binding = False
        self._psk_refusal: HandshakeError | None = None
        self._unknown_identities: list[bytes] | None = None
        self._offered_count = 0
        self._lookup_error: HandshakeError | None = None
        self._conn: ossl.SslConnection | None = None
        self._records_in = 0
        self._peer_record_size_limit: int | None = None  # what the peer advertised
        self._record_size_limit_refusal: HandshakeError | None = None
        self._client_hellos = 0  # server: ClientHellos seen (2 after a HelloRetryRequest)
        self._first_record_size_limit: bytes | None = None  # in the first ClientHello

        server = self.role is Role.SERVER
        if server and config.credentials is None and config.psk_lookup is None:
            raise HandshakeError(
                FailureCause.MISSING_MATERIAL, "server has neither a certificate nor PSKs"
            )
        if not server and config.psk_keys:
            usable = [k for k in config.psk_keys if config.suites_for(self._client_binding(k))]
            if not usable:
                raise HandshakeError(
                    FailureCause.MISSING_MATERIAL,
                    "no PSK whose hash the configured cipher suites allow",
                )
            self._offered_psk = usable[0]
            self._psk_hash = self._client_binding(self._offered_psk)
            self._legacy_binding = self._psk_hash != self._offered_psk.hash_name
            if self._legacy_binding:
                log.debug(
                    "offering SHA-384 PSK %s to %s bound to SHA-256, as tlshd 1.0 does "
                    "([ktlsd] legacy_psk_sha384 = offer)",
                    self._offered_psk.describe(), self.peer,
                )
            if len(config.psk_keys) > 1:
                log.debug(
                    "offering PSK %s only (OpenSSL offers one external PSK per ClientHello)",
                    self._offered_psk.describe(),
                )
        ctx = _get_context(config)
        try:
            self._conn = ossl.SslConnection(ctx, self, server=server)
            self._conn.keep_all_secret_lines = config.key_log is not None
            if self._psk_hash is not None:
                self._conn.set_ciphersuites(config.suite_list_for(self._psk_hash))
            if config.peername:
                self._set_peername(config.peername, server=server)
            if server and config.allowed_sans and config.verify_peer:
                self._conn.enable_leaf_check()
        except ossl.OpenSSLError as exc:
            self.close()
            raise HandshakeError(FailureCause.MISSING_MATERIAL, str(exc)) from None

    @property
    def peer(self) -> str:
        """The peer's address (``host:port``), for log lines and failure reasons."""
        if self._peer is None:
            label = _peer_label(self._peer_socket) if self._peer_socket is not None else None
            self._peer = label or "(no address)"
        return self._peer

    def _set_peername(self, name: str, *, server: bool) -> None:
        """Client: send ``name`` as SNI when it is a DNS name. Both roles: when the peer's
        certificate is verified, require ``name`` among its DNS or IP SANs."""
        assert self._conn is not None
        is_ip = _is_ip_address(name)
        if not server and not is_ip:
            self._conn.set_server_name(name)
        if not self.config.verify_peer or (not server and self._offered_psk is not None):
            return
        if is_ip:
            self._conn.set_expected_ip(name)
        else:
            self._conn.set_expected_host(name)

    def check_peer_leaf(self, certificate: bytes) -> None:
        """Server: the client's certificate (its chain verified) against the allowed SANs."""
        verdict = self.config.allowed_sans.check(certificate)
        if not verdict.allowed:
            raise HandshakeError(FailureCause.UNTRUSTED_CERTIFICATE, verdict.reason)
        log.debug("client %s: %s", self.peer, verdict.reason)

    def _psk_suites(self, hash_name: str) -> tuple[CipherSuite, ...]:
        return self.config.suites_for(hash_name)

    def _client_binding(self, psk: PskKey) -> str:
        """The hash our client binds ``psk`` to: its own, except that ``offer`` binds SHA-384
        PSKs to SHA-256 (when SHA-256 suites are configured at all)."""
        if (
            psk.hash_name == "sha384"
            and self.config.legacy_psk_sha384 == "offer"
            and self._psk_suites("sha256")
        ):
            return "sha256"
        return psk.hash_name

    # context manager / cleanup
    def __enter__(self) -> TlsHandshake:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the OpenSSL connection. The captured secrets are dropped too, after they went
        to the configured key log file, if any."""
        if self._conn is not None:
            key_log = self.config.key_log
            if key_log is not None and self._conn.secret_lines:
                try:
                    key_log.write_handshake(list(self._conn.secret_lines))
                except KeyLogError as exc:
                    log.warning("handshake with %s: secrets not logged: %s", self.peer, exc)
            self._conn.free()
            self._conn = None
        self._secrets = None

    # --- OpenSSL callbacks (ConnectionHooks) ---------------------------------------------------
    def psk_for_client(self, md_size: int | None) -> tuple[bytes, bytes, int] | None:
        psk = self._offered_psk
        if psk is None or self._psk_hash is None:
            return None
        suite = self._psk_suites(self._psk_hash)[0]
        if md_size is not None and md_size != suite.hash_length:
            return None  # after a HelloRetryRequest with another hash: offer nothing
        return psk.identity, psk.key, suite.code

    def on_client_hello(self, psk_extension: bytes | None) -> int:
        alert = self._check_retried_record_size_limit()
        if alert:
            return alert
        # Called again for the second ClientHello after a HelloRetryRequest: decide afresh.
        self._selected_psk = None
        self._psk_hash = None
        lookup = self.config.psk_lookup
        if lookup is None:
            return 0  # a certificate-only server: OpenSSL ignores the PSKs it cannot find
        if psk_extension is None:
            if self.config.credentials is None:
                self._unknown_identities = []
                return AlertDescription.HANDSHAKE_FAILURE
            return 0
        try:
            offered = parse_pre_shared_key(psk_extension)
        except MalformedPskExtension as exc:
            self._psk_refusal = HandshakeError(
                FailureCause.PROTOCOL_ERROR,
                f"client {self.peer} sent a malformed pre_shared_key extension: {exc}",
            )
            return AlertDescription.DECODE_ERROR
        for offer in offered[:_MAX_PSK_LOOKUPS]:
            try:
                psk = lookup(offer.identity)
            except HandshakeError as exc:
                self._lookup_error = exc
                return AlertDescription.INTERNAL_ERROR
            if psk is None:
                continue
            binding = self._server_binding(psk, offer)
            if binding is None:
                continue
            if not self._psk_suites(binding):
                continue
            assert self._conn is not None
            self._conn.set_ciphersuites(self.config.suite_list_for(binding))
            self._selected_psk = psk
            self._psk_hash = binding
            self._psk_refusal = None
            if binding != psk.hash_name and not self._legacy_binding:
                self._legacy_binding = True
                log.warning(
                    "client %s bound SHA-384 PSK %s to SHA-256 (32-byte binder, as tlshd 1.0 "
                    "on GnuTLS < 3.8.11 does); accepted as a SHA-256 PSK with a SHA-256 suite "
                    "([ktlsd] legacy_psk_sha384 = %s)",
                    self.peer, psk.describe(), self.config.legacy_psk_sha384,
                )
            return 0
        if self._psk_refusal is not None:
            # The client did mean one of our PSKs, bound in a way we do not take: say so
            # rather than fall back to a certificate the client does not expect.
            return AlertDescription.HANDSHAKE_FAILURE
        if self.config.credentials is not None:
            return 0  # fall back to a certificate handshake
        self._unknown_identities = [o.identity for o in offered[:_MAX_PSK_LOOKUPS]]
        self._offered_count = len(offered)
        return AlertDescription.UNKNOWN_PSK_IDENTITY

    def _server_binding(self, psk: PskKey, offer: OfferedPsk) -> str | None:
        """The hash to bind a known PSK to, judged by the binder the client sent for it; None
        (with :attr:`_psk_refusal` set) when we do not take that binding."""
        if offer.binder_hash == psk.hash_name:
            return psk.hash_name
        size = f"{offer.binder_length}-byte binder"
        if psk.hash_name == "sha384" and offer.binder_hash == "sha256":
            if self.config.legacy_psk_sha384 != "refuse":
                return "sha256"
            reason = (
                f"client {self.peer} bound SHA-384 PSK {psk.describe()} to SHA-256 ({size}, "
                "as tlshd 1.0 on GnuTLS < 3.8.11 does); refused by "
                "[ktlsd] legacy_psk_sha384 = refuse"
            )
        else:
            bound = psk.hash_name.upper().replace("SHA", "SHA-")
            reason = f"client {self.peer} sent a {size} for {bound} PSK {psk.describe()}"
        if self._psk_refusal is None:
            self._psk_refusal = HandshakeError(FailureCause.PEER_REJECTED, reason)
        return None

    def _check_retried_record_size_limit(self) -> int:
        """Server: a second ClientHello (after a HelloRetryRequest) must carry the same
        record_size_limit as the first (RFC 8446 §4.1.2); OpenSSL does not check custom
        extensions, so it is checked here."""
        assert self._conn is not None
        body = self._conn.client_hello_extension(ossl.TLSEXT_TYPE_record_size_limit)
        self._client_hellos += 1
        if self._client_hellos == 1:
            self._first_record_size_limit = body
            return 0
        if body != self._first_record_size_limit:
            self._record_size_limit_refusal = HandshakeError(
                FailureCause.PROTOCOL_ERROR,
                f"client {self.peer} changed its record_size_limit extension in the "
                "ClientHello after HelloRetryRequest",
            )
            return AlertDescription.ILLEGAL_PARAMETER
        return 0

    def record_size_limit_to_send(self) -> bytes | None:
        return self.config.record_size_limit.to_bytes(2, "big")

    def on_record_size_limit(self, body: bytes) -> int:
        # A client's value, or (with OpenSSL's check that our client offered it) a server's.
        who = "client" if self.role is Role.SERVER else "server"
        if len(body) != 2:
            self._record_size_limit_refusal = HandshakeError(
                FailureCause.PROTOCOL_ERROR,
                f"{who} {self.peer} sent a record_size_limit extension of {len(body)} bytes "
                "(not 2)",
            )
            return AlertDescription.DECODE_ERROR
        limit = int.from_bytes(body, "big")
        if limit < MIN_RECORD_SIZE_LIMIT:
            self._record_size_limit_refusal = HandshakeError(
                FailureCause.PROTOCOL_ERROR,
                f"{who} {self.peer} sent record_size_limit {limit} "
                f"(RFC 8449 forbids values below {MIN_RECORD_SIZE_LIMIT})",
            )
            return AlertDescription.ILLEGAL_PARAMETER
        self._peer_record_size_limit = min(limit, MAX_RECORD_SIZE_LIMIT)
        if limit < MAX_RECORD_SIZE_LIMIT:
            # OpenSSL's own handshake records after this point (a server's certificate
            # flight) are cut to the limit too, as far as OpenSSL goes down (512 bytes).
            assert self._conn is not None
            self._conn.set_max_send_fragment(limit - 1)
        return 0

    def psk_for_identity(self, identity: bytes) -> tuple[bytes, int] | None:
        psk = self._selected_psk
        if psk is None or self._psk_hash is None or psk.identity != identity:
            return None
        return psk.key, self._psk_suites(self._psk_hash)[0].code

    # --- driving -------------------------------------------------------------------------------
    @property
    def _ssl(self) -> ossl.SslConnection:
        if self._conn is None:
            raise HandshakeError(FailureCause.PROTOCOL_ERROR, "handshake already closed")
        return self._conn

    def start(self) -> bytes:
        """Begin; return the bytes to send (the ClientHello, or nothing for a server)."""
        if self.role is Role.SERVER:
            return b""  # a server's first step only finds that there is no input yet
        return self._advance()[1]

    def receive(self, data: bytes | bytearray | memoryview) -> tuple[int, bytes]:
        """Feed bytes as they came from the peer; return ``(taken, out)``.

        ``data`` may hold any number of records, the last one possibly incomplete. ``taken`` is
        how many of its bytes the handshake took: the caller drops exactly those from its input
        and keeps the rest. ``out`` is what to send. All complete records go to OpenSSL in one
        step; once the handshake completes, the bytes after its last record are not taken, so
        the record layer that follows starts at exactly the next record. A trailing incomplete
        record is taken (and held here until it is complete) only while the handshake still
        wants input, when it can only belong to the handshake. ``data`` is not kept.
        """
        if self.complete or self.failure is not None:
            raise HandshakeError(FailureCause.PROTOCOL_ERROR, "record after the handshake ended")
        held = len(self._held)
        view = memoryview(self._held + data) if held else memoryview(data).cast("B")
        size = len(view)
        ends: list[int] = []  # where each complete record ends in view
        offset = 0
        unpack = _RECORD_HEADER.unpack_from
        oversized = 0
        while size - offset >= RECORD_HEADER_LENGTH:
            content_type, version, length = unpack(view, offset)
            if content_type not in _RECORD_TYPES or version >> 8 != _MAJOR_VERSION:
                self.failure = HandshakeError(
                    FailureCause.PROTOCOL_ERROR,
                    "peer sent data that is not a TLS record "
                    f"(starts {view[offset : offset + 3].hex()})",
                )
                raise self.failure
            if length > MAX_CIPHERTEXT:
                # OpenSSL gets the header alone: it refuses the record from its length and
                # answers with the record_overflow alert the peer must get (RFC 8446 §5.2).
                oversized = length
                break
            end = offset + RECORD_HEADER_LENGTH + length
            if end > size:
                break
            ends.append(end)
            offset = end
        if oversized:
            taken, out = self._advance(view[: offset + RECORD_HEADER_LENGTH], ends, header=True)
            if not self.complete and self.failure is None:  # OpenSSL waits for the body
                self.failure = HandshakeError(
                    FailureCause.PROTOCOL_ERROR,
                    f"TLS record of {oversized} bytes exceeds 2^14+256",
                )
            return (taken - held if taken > held else 0), out
        taken, out = self._advance(view[:offset], ends) if offset else (0, b"")
        if offset < size and not self.complete and self.failure is None:
            self._held = bytearray(view[offset:])
            taken = size
        elif held:
            self._held = bytearray()
        return (taken - held if taken > held else 0), out

    @property
    def holds_partial_record(self) -> bool:
        """Whether :meth:`receive` holds the start of a record it still needs the rest of."""
        return bool(self._held)

    def receive_record(self, record: bytes) -> bytes:
        """Feed exactly one complete record from the peer; return the bytes to send."""
        taken, out = self.receive(record)
        if self.complete and taken != len(record):
            self.complete = False
            self.failure = HandshakeError(
                FailureCause.PROTOCOL_ERROR,
                f"{len(record) - taken} bytes left unconsumed after the handshake",
            )
        return out

    @property
    def wants_input(self) -> bool:
        return not self.complete and self.failure is None

    def check(self) -> None:
        """Raise the failure, if the handshake failed."""
        if self.failure is not None:
            raise self.failure

    def _advance(
        self,
        records: memoryview | None = None,
        ends: list[int] | None = None,
        *,
        header: bool = False,
    ) -> tuple[int, bytes]:
        """Feed ``records`` (complete ones, ending at ``ends``; with ``header``, then the
        header of an oversized record), run OpenSSL as far as it goes; return how many of the
        fed bytes it took and what it wants sent."""
        conn = self._ssl
        step, out, unread = conn.step(records)
        taken = fed = records.nbytes if records is not None else 0
        if fed:
            if unread:
                taken = fed - unread
                if not header and (
                    step == ossl.HandshakeStep.WANT_READ
                    or (step == ossl.HandshakeStep.DONE and taken not in (ends or ()))
                ):
                    # OpenSSL reads exactly one record at a time from a memory BIO and only
                    # stops reading when it is done: anything else would lose or repeat bytes.
                    self.failure = HandshakeError(
                        FailureCause.PROTOCOL_ERROR,
                        f"OpenSSL left {unread} of {fed} bytes unread mid-handshake",
                    )
                    return taken, out
            self._records_in += bisect.bisect_right(ends, taken) if ends else 0
        if step == ossl.HandshakeStep.DONE:
            self._finish_checks()
        elif step == ossl.HandshakeStep.FAILED:
            self.failure = self.explain(self._classify(conn))
        return taken, out

    def _finish_checks(self) -> None:
        conn = self._ssl
        if self.role is Role.CLIENT and self._offered_psk is not None and not conn.session_reused():
            self.failure = HandshakeError(
                FailureCause.PEER_REJECTED,
                f"server did not accept PSK {self._offered_psk.describe()}",
            )
            return
        if (
            self.role is Role.SERVER
            and self._selected_psk is not None
            and not conn.session_reused()
        ):
            self._selected_psk = None  # accepted by certificate instead
            self._psk_hash = None
            self._legacy_binding = False
        self._secrets = conn.traffic_secrets()
        if self._secrets is None:
            self.failure = HandshakeError(
                FailureCause.PROTOCOL_ERROR, "OpenSSL did not report the traffic secrets"
            )
            return
        self.complete = True

    def _classify(self, conn: ossl.SslConnection) -> HandshakeError:
        """Turn OpenSSL's state after a failed step into one cause and a one-line reason."""
        reasons = [e.reason for e in conn.errors]
        detail = "; ".join(dict.fromkeys(reasons)) or "no detail from OpenSSL"
        if conn.callback_error is not None:
            if isinstance(conn.callback_error, HandshakeError):
                return conn.callback_error
            return HandshakeError(
                FailureCause.PROTOCOL_ERROR,
                f"internal error in a TLS callback: {type(conn.callback_error).__name__}",
            )
        if self._lookup_error is not None:
            return self._lookup_error
        if self._record_size_limit_refusal is not None:
            return self._record_size_limit_refusal
        if self._psk_refusal is not None:
            return self._psk_refusal
        if self._unknown_identities is not None:
            if not self._unknown_identities:
                return HandshakeError(
                    FailureCause.UNKNOWN_PSK_IDENTITY, "client offered no PSK identity"
                )
            shown = self._unknown_identities[:_SHOWN_IDENTITIES]
            names = ", ".join(
                repr(i[:_SHOWN_IDENTITY_BYTES].decode("utf-8", "backslashreplace"))
                + ("..." if len(i) > _SHOWN_IDENTITY_BYTES else "")
                for i in shown
            )
            if self._offered_count > len(shown):
                names += f" and {self._offered_count - len(shown)} more"
            return HandshakeError(
                FailureCause.UNKNOWN_PSK_IDENTITY, f"client offered unknown PSK identity {names}"
            )
        received = conn.received_alert()
        if received is not None:
            text = f"peer sent alert {ossl.alert_description(received)}"
            if received == AlertDescription.UNKNOWN_PSK_IDENTITY:
                return HandshakeError(FailureCause.UNKNOWN_PSK_IDENTITY, text)
            if received == AlertDescription.CLOSE_NOTIFY:
                return HandshakeError(FailureCause.PEER_CLOSED, "peer closed the connection")
            if received in _REJECTION_ALERTS:
                return HandshakeError(FailureCause.PEER_REJECTED, text)
            if (
                received == AlertDescription.ILLEGAL_PARAMETER
                and self._offered_psk is not None
                and self._records_in == 1
            ):
                # OpenSSL servers answer a PSK binder that does not verify (a wrong key) with
                # illegal_parameter straight after our ClientHello; GnuTLS servers do the same
                # for an unknown identity too (they hide which identities exist).
                return HandshakeError(
                    FailureCause.PEER_REJECTED,
                    f"{text} (server refused our PSK: wrong key or unknown identity)",
                )
            return HandshakeError(FailureCause.PROTOCOL_ERROR, text)
        verify = conn.verify_result()
        if self._offered_psk is not None and "certificate verify failed" in reasons:
            return HandshakeError(
                FailureCause.PEER_REJECTED,
                f"server did not accept PSK {self._offered_psk.describe()} and sent a certificate",
            )
        if verify != ossl.X509_V_OK and "certificate verify failed" in reasons:
            who = "server" if self.role is Role.CLIENT else "client"
            return HandshakeError(
                FailureCause.UNTRUSTED_CERTIFICATE,
                f"{who} certificate: {ossl.verify_error_string(verify)}",
            )
        if "peer did not return a certificate" in reasons:
            return HandshakeError(
                FailureCause.PEER_REJECTED, "client sent no certificate but one is required"
            )
        if "binder does not verify" in reasons:
            return HandshakeError(
                FailureCause.PEER_REJECTED, "client's PSK binder does not verify (wrong key)"
            )
        if "decryption failed or bad record mac" in reasons:
            return HandshakeError(FailureCause.PEER_REJECTED, f"cannot decrypt peer: {detail}")
        return HandshakeError(FailureCause.PROTOCOL_ERROR, detail)

    def explain(self, error: HandshakeError) -> HandshakeError:
        """``error``, with a hint about the SHA-384 binding added when our client's SHA-384 PSK
        was turned down straight after our ClientHello (the driver passes its own failures,
        such as the peer closing, through here too)."""
        psk = self._offered_psk
        if (
            self.role is not Role.CLIENT
            or psk is None
            or psk.hash_name != "sha384"
            or self._records_in > 1
            or self.complete
            or error.cause in (FailureCause.UNKNOWN_PSK_IDENTITY, FailureCause.MISSING_MATERIAL)
        ):
            return error
        if self._legacy_binding:
            hint = (
                "our SHA-384 PSK went out bound to SHA-256 as tlshd 1.0 does it, by "
                "[ktlsd] legacy_psk_sha384 = offer, which a spec-conformant server refuses"
            )
        else:
            hint = (
                "a server running tlshd 1.0 on GnuTLS < 3.8.11 takes a SHA-384 PSK only "
                "bound to SHA-256, which [ktlsd] legacy_psk_sha384 = offer sends"
            )
        return HandshakeError(error.cause, f"{error.reason}; {hint}")

    # --- result --------------------------------------------------------------------------------
    def session(self) -> Session:
        """The hand-off :class:`Session` (sequence numbers 0/0, see the module docstring)."""
        self.check()
        if not self.complete:
            raise HandshakeError(FailureCause.PROTOCOL_ERROR, "handshake not complete")
        conn = self._ssl
        secrets = self._secrets
        assert secrets is not None  # set when the handshake completed
        server = self.role is Role.SERVER
        code = conn.cipher_code()
        suite = _SUITES_BY_CODE.get(code)
        if suite is None:
            raise HandshakeError(
                FailureCause.PROTOCOL_ERROR, f"unsupported cipher suite 0x{code:04x}"
            )
        psk = self._offered_psk if not server else self._selected_psk
        if psk is not None and suite.hash_name != self._psk_hash:
            raise HandshakeError(
                FailureCause.PROTOCOL_ERROR,
                f"negotiated {suite.iana_name} for a PSK bound to {self._psk_hash}",
            )
        peer = PeerIdentity(
            psk_identity=psk.identity if psk is not None else None,
            psk_serial=psk.serial if psk is not None else None,
            certificate_chain=() if psk is not None else conn.peer_chain(),
        )
        return Session(
            role=self.role,
            suite=suite,
            client_secret=secrets[0],
            server_secret=secrets[1],
            tx_seq=0,
            rx_seq=0,
            peer=peer,
            group=conn.group_name(),
            signature_scheme=ossl.own_signature_scheme(conn) if psk is None else None,
            peer_signature_scheme=ossl.peer_signature_scheme(conn) if psk is None else None,
            psk_binder_hash=self._psk_hash if psk is not None else None,
            legacy_psk_binding=psk is not None and self._legacy_binding,
            peer_record_size_limit=self._peer_record_size_limit,
            # Both sides sent one (a server sends its own exactly when the client did).
            record_size_limit=(
                self.config.record_size_limit
                if self._peer_record_size_limit is not None
                else None
            ),
        )


# --- the asyncio driver --------------------------------------------------------------------------
_READ_CHUNK = 1 << 15  # bytes peeked per read; a flight larger than this takes several reads
# Plain ints: or-ing the socket module's IntFlag members costs an enum call each time.
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)
_DONTWAIT = int(socket.MSG_DONTWAIT)
_SEND_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
_per_thread = threading.local()


def _read_buffer() -> memoryview:
    """This thread's peek buffer, allocated once (the driver runs in event-loop callbacks, which
    never interleave within one thread; the core copies what it keeps)."""
    try:
        view: memoryview = _per_thread.read
    except AttributeError:
        view = _per_thread.read = memoryview(bytearray(_READ_CHUNK))
    return view


class _Driver:
    """Runs one :class:`TlsHandshake` on a socket from event-loop callbacks.

    Each time the socket is readable, one callback peeks at everything there (``MSG_PEEK``),
    hands it to the core at once, consumes exactly the bytes the core took and sends the
    answer: one event-loop turn per flight, two ``recv`` calls per flight, and the reader stays
    registered for the whole handshake. What the core did not take (records after the
    handshake's last one) stays in the socket. ``done`` resolves when the handshake completed
    or failed and everything we had to send (a Finished, an alert) went out.
    """

    __slots__ = (
        "_buf",
        "_fd",
        "_hs",
        "_loop",
        "_reading",
        "_sock",
        "_timeout",
        "_timer",
        "_unsent",
        "_writing",
        "done",
    )

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, hs: TlsHandshake,
        timeout: float,
    ) -> None:
        self._hs = hs
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._buf = _read_buffer()
        self._timeout = timeout
        self._unsent = b""
        self._reading = self._writing = False
        self.done: asyncio.Future[None] = loop.create_future()
        self._timer = loop.call_later(timeout, self._on_timeout)

    def start(self) -> None:
        try:
            hs = self._hs
            if hs.role is Role.SERVER:
                self._read()  # the ClientHello is often there already
            else:
                self._send(hs.start())
            self._settle()
        except Exception as exc:
            self._finish(exc)

    def stop(self) -> None:
        """Unregister from the event loop (idempotent; the socket is left as it was)."""
        self._timer.cancel()
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)
        if self._writing:
            self._writing = False
            self._loop.remove_writer(self._fd)

    def _finish(self, error: BaseException | None) -> None:
        self.stop()
        if not self.done.done():
            if error is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(error)

    def _settle(self) -> None:
        """Register for what the handshake waits for next, or finish."""
        hs = self._hs
        if self._unsent and not self._writing:
            self._writing = True
            self._loop.add_writer(self._fd, self._on_writable)
        if not hs.complete and hs.failure is None:
            if not self._reading:
                self._reading = True
                self._loop.add_reader(self._fd, self._on_readable)
        elif not self._unsent:
            self._finish(None)

    def _on_timeout(self) -> None:
        self._finish(
            self._hs.explain(
                HandshakeError(
                    FailureCause.TIMEOUT, f"handshake did not finish within {self._timeout:g} s"
                )
            )
        )

    def _on_readable(self) -> None:
        try:
            self._read()
            self._settle()
        except Exception as exc:
            self._finish(exc)

    def _on_writable(self) -> None:
        try:
            data, self._unsent = self._unsent, b""
            self._send(data)
            if not self._unsent and self._writing:
                self._writing = False
                self._loop.remove_writer(self._fd)
            self._settle()
        except Exception as exc:
            self._finish(exc)

    def _read(self) -> None:
        hs, sock, buf = self._hs, self._sock, self._buf
        while True:
            try:
                n = sock.recv_into(buf, _READ_CHUNK, _PEEK)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionError as exc:
                raise hs.explain(
                    HandshakeError(
                        FailureCause.PEER_CLOSED, f"connection lost: {exc.strerror or exc}"
                    )
                ) from None
            if not n:
                where = (
                    "in the middle of a record"
                    if hs.holds_partial_record
                    else "before the handshake ended"
                )
                raise hs.explain(
                    HandshakeError(FailureCause.PEER_CLOSED, f"peer closed the connection {where}")
                )
            try:
                taken, out = hs.receive(buf[:n])
            except HandshakeError as exc:
                raise hs.explain(exc) from None
            if taken:
                try:
                    got = sock.recv_into(buf, taken, _DONTWAIT)
                except OSError:
                    got = 0
                if got != taken:
                    self._consume(buf, taken - got)
            if out:
                self._send(out)
            if n < _READ_CHUNK or hs.complete or hs.failure is not None:
                return  # everything there was taken, or the handshake is over

    def _consume(self, buf: memoryview, count: int) -> None:
        """Drop the ``count`` bytes a first ``recv`` left of those the core took."""
        while count:
            try:
                got = self._sock.recv_into(buf, count, _DONTWAIT)
            except InterruptedError:
                continue
            except OSError:
                got = 0
            if not got:
                raise HandshakeError(
                    FailureCause.PROTOCOL_ERROR,
                    "bytes peeked from the socket vanished (is someone else reading it?)",
                )
            count -= got

    def _send(self, data: bytes) -> None:
        if not data:
            return
        if self._unsent:  # queue behind what the socket did not take yet
            self._unsent += data
            return
        try:
            sent = self._sock.send(data, _SEND_FLAGS)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except ConnectionError as exc:
            if self._hs.failure is not None:
                return  # the alert did not get out; the failure says what happened
            raise HandshakeError(
                FailureCause.PEER_CLOSED, f"connection lost: {exc.strerror or exc}"
            ) from None
        if sent < len(data):
            self._unsent = data[sent:]


def _borrow(sock: socket.socket) -> socket.socket:
    """A second Python socket object on the same fd with no Python-level timeout.

    A socket object with a timeout polls before every ``recv``; this view does not, and it is
    created without touching the fd's flags (unless a global default timeout is set, which the
    agent never does). The caller must ``detach()`` it so the fd is not closed.
    """
    return socket.socket(sock.family, sock.type, sock.proto, fileno=sock.fileno())


def _peer_label(sock: socket.socket) -> str | None:
    """``host:port`` (``[v6]:port``) of the connected peer, for log lines; None if unknown."""
    try:
        address = sock.getpeername()
    except OSError:
        return None
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = str(address[0]), address[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return None


async def perform_handshake(sock: socket.socket, config: TlsConfig, *, timeout: float) -> Session:
    """Run one TLS 1.3 handshake on a connected stream socket; return the hand-off Session.

    Raises :class:`HandshakeError`. Nothing past the handshake's last record is read from the
    socket; the socket's blocking mode is left as it was.
    """
    if sock.type != socket.SOCK_STREAM:
        raise HandshakeError(FailureCause.INVALID_REQUEST, "handshake needs a stream socket")
    loop = asyncio.get_running_loop()
    # A socket object with a timeout polls before every recv; use a view without one.
    view = sock if sock.gettimeout() in (None, 0.0) else _borrow(sock)
    try:
        with TlsHandshake(config, peer_socket=sock) as hs:
            driver = _Driver(loop, view, hs, timeout)
            try:
                driver.start()
                await driver.done
            finally:
                driver.stop()
            hs.check()
            return hs.session()
    finally:
        if view is not sock:
            view.detach()


def handshake_blocking(sock: socket.socket, config: TlsConfig, *, timeout: float) -> Session:
    """:func:`perform_handshake` for command-line tools: runs it in a private event loop."""
    with asyncio.Runner() as runner:
        return runner.run(perform_handshake(sock, config, timeout=timeout))
