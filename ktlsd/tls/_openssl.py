"""The one place where ktlsd touches the system OpenSSL (``libssl.so.3`` / ``libcrypto.so.3``).

Why ctypes over the system library: it is the only engine on these machines that does TLS 1.3
external PSKs of both hashes, lets session tickets be switched off, and hands out per-connection
traffic secrets (see the handshake row and the design decisions in ``docs/architecture.md``).
Only the public OpenSSL 3.0 API is used.

Rules this module keeps, because breaking them caused real failures before:

* Every function gets ``argtypes`` and ``restype`` declared, so 64-bit pointers are never
  truncated to ``int``.
* OpenSSL keeps pointers we give it (callbacks, PSK identities). The C callbacks here are
  module-level objects that live as long as the process; per-connection data is looked up through
  a registry keyed by the ``SSL*`` address, and every buffer the C side may keep is owned by the
  :class:`SslConnection` that uses it, which lives until ``SSL_free``.
* OpenSSL's error queue is drained after every failing call, so one connection's errors never
  show up in another's report.

The wrappers are deliberately thin; policy (which suites, what a failure means) lives in
:mod:`ktlsd.tls.handshake`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

c_void_p = ctypes.c_void_p
c_int = ctypes.c_int
c_long = ctypes.c_long
c_ulong = ctypes.c_ulong
c_size_t = ctypes.c_size_t
c_char_p = ctypes.c_char_p
c_uint = ctypes.c_uint
c_uint16 = ctypes.c_uint16
c_uint64 = ctypes.c_uint64
POINTER = ctypes.POINTER


def _load(name: str, fallback: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(name)
    except OSError:
        found = ctypes.util.find_library(fallback)
        if found is None:
            raise
        return ctypes.CDLL(found)


_ssl = _load("libssl.so.3", "ssl")
_crypto = _load("libcrypto.so.3", "crypto")


def _bind(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> Callable[..., Any]:
    fn: Any = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)
    bound: Callable[..., Any] = fn
    return bound


# --- constants (include/openssl/ssl.h, tls1.h, x509_vfy.h) -----------------------------------
TLS1_3_VERSION = 0x0304
SSL_CTRL_MODE = 33
SSL_MODE_NO_AUTO_CHAIN = 0x8
SSL_CTRL_CHAIN_CERT = 89
SSL_CTRL_SET_GROUPS_LIST = 92
SSL_CTRL_SET_MIN_PROTO_VERSION = 123
SSL_CTRL_SET_MAX_PROTO_VERSION = 124
SSL_CTRL_GET_NEGOTIATED_GROUP = 134
SSL_CTRL_SET_TLSEXT_HOSTNAME = 55
SSL_CTRL_SET_MAX_SEND_FRAGMENT = 52
SSL3_RT_MIN_SEND_FRAGMENT = 512  # the smallest SSL_set_max_send_fragment takes
SSL3_RT_MAX_PLAIN_LENGTH = 16384
TLSEXT_NAMETYPE_host_name = 0

SSL_VERIFY_NONE = 0x00
SSL_VERIFY_PEER = 0x01
SSL_VERIFY_FAIL_IF_NO_PEER_CERT = 0x02

SSL_ERROR_NONE = 0
SSL_ERROR_SSL = 1
SSL_ERROR_WANT_READ = 2
SSL_ERROR_WANT_WRITE = 3
SSL_ERROR_SYSCALL = 5
SSL_ERROR_ZERO_RETURN = 6

# A fatal alert from the peer is queued as an SSL library error with this reason plus the
# alert's description (SSL_AD_REASON_OFFSET in ssl.h).
ERR_LIB_SSL = 20
SSL_AD_REASON_OFFSET = 1000
ERR_SYSTEM_FLAG = 0x80000000

SSL_CLIENT_HELLO_SUCCESS = 1
SSL_CLIENT_HELLO_ERROR = 0

X509_V_OK = 0
X509_V_ERR_CERT_REJECTED = 28  # "certificate rejected": OpenSSL answers bad_certificate
X509_V_FLAG_CRL_CHECK = 0x4

ERR_LIB_PEM = 9
PEM_R_NO_START_LINE = 108  # "no more PEM blocks": the normal end of a PEM read loop

TLSEXT_TYPE_pre_shared_key = 41
TLSEXT_TYPE_record_size_limit = 28  # RFC 8449; OpenSSL has no built-in support for it

# SSL_CTX_add_custom_ext context bits (ssl.h): where a custom extension may appear.
SSL_EXT_TLS1_3_ONLY = 0x00020
SSL_EXT_CLIENT_HELLO = 0x00080
SSL_EXT_TLS1_3_ENCRYPTED_EXTENSIONS = 0x00400
TLSEXT_NID_UNKNOWN = 0x1000000  # marks a TLS group id where a NID is expected

# --- callback types -----------------------------------------------------------------------------
KEYLOG_CB = ctypes.CFUNCTYPE(None, c_void_p, c_char_p)
# int (*)(SSL *, const EVP_MD *, const unsigned char **id, size_t *idlen, SSL_SESSION **)
PSK_USE_CB = ctypes.CFUNCTYPE(
    c_int, c_void_p, c_void_p, POINTER(c_void_p), POINTER(c_size_t), POINTER(c_void_p)
)
# int (*)(SSL *, const unsigned char *identity, size_t len, SSL_SESSION **)
PSK_FIND_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t, POINTER(c_void_p))
# int (*)(SSL *, int *al, void *arg)
CLIENT_HELLO_CB = ctypes.CFUNCTYPE(c_int, c_void_p, POINTER(c_int), c_void_p)
# int (*)(int preverify_ok, X509_STORE_CTX *)
VERIFY_CB = ctypes.CFUNCTYPE(c_int, c_int, c_void_p)
# int (*)(char *buf, int size, int rwflag, void *u)
PEM_PASSWORD_CB = ctypes.CFUNCTYPE(c_int, c_void_p, c_int, c_int, c_void_p)
# int (*)(SSL *, unsigned int ext_type, unsigned int context, const unsigned char **out,
#         size_t *outlen, X509 *, size_t chainidx, int *al, void *add_arg)
CUSTOM_EXT_ADD_CB = ctypes.CFUNCTYPE(
    c_int, c_void_p, c_uint, c_uint, POINTER(c_void_p), POINTER(c_size_t), c_void_p, c_size_t,
    POINTER(c_int), c_void_p,
)
# void (*)(SSL *, unsigned int ext_type, unsigned int context, const unsigned char *out,
#          void *add_arg)
CUSTOM_EXT_FREE_CB = ctypes.CFUNCTYPE(None, c_void_p, c_uint, c_uint, c_void_p, c_void_p)
# int (*)(SSL *, unsigned int ext_type, unsigned int context, const unsigned char *in,
#         size_t inlen, X509 *, size_t chainidx, int *al, void *parse_arg)
CUSTOM_EXT_PARSE_CB = ctypes.CFUNCTYPE(
    c_int, c_void_p, c_uint, c_uint, c_void_p, c_size_t, c_void_p, c_size_t, POINTER(c_int),
    c_void_p,
)

# --- libcrypto ----------------------------------------------------------------------------------
ERR_get_error = _bind(_crypto, "ERR_get_error", c_ulong)
ERR_clear_error = _bind(_crypto, "ERR_clear_error", None)
ERR_error_string_n = _bind(_crypto, "ERR_error_string_n", None, c_ulong, c_char_p, c_size_t)
ERR_reason_error_string = _bind(_crypto, "ERR_reason_error_string", c_char_p, c_ulong)

BIO_s_mem = _bind(_crypto, "BIO_s_mem", c_void_p)
BIO_new = _bind(_crypto, "BIO_new", c_void_p, c_void_p)
BIO_free = _bind(_crypto, "BIO_free", c_int, c_void_p)
BIO_write = _bind(_crypto, "BIO_write", c_int, c_void_p, c_void_p, c_int)
BIO_read = _bind(_crypto, "BIO_read", c_int, c_void_p, c_void_p, c_int)
BIO_ctrl_pending = _bind(_crypto, "BIO_ctrl_pending", c_size_t, c_void_p)
BIO_new_mem_buf = _bind(_crypto, "BIO_new_mem_buf", c_void_p, c_void_p, c_int)

d2i_X509 = _bind(_crypto, "d2i_X509", c_void_p, c_void_p, POINTER(c_void_p), c_long)
i2d_X509 = _bind(_crypto, "i2d_X509", c_int, c_void_p, POINTER(c_void_p))
X509_free = _bind(_crypto, "X509_free", None, c_void_p)
d2i_X509_CRL = _bind(_crypto, "d2i_X509_CRL", c_void_p, c_void_p, POINTER(c_void_p), c_long)
X509_CRL_free = _bind(_crypto, "X509_CRL_free", None, c_void_p)
d2i_AutoPrivateKey = _bind(
    _crypto, "d2i_AutoPrivateKey", c_void_p, c_void_p, POINTER(c_void_p), c_long
)
EVP_PKEY_free = _bind(_crypto, "EVP_PKEY_free", None, c_void_p)
EVP_MD_get_size = _bind(_crypto, "EVP_MD_get_size", c_int, c_void_p)
X509_STORE_add_crl = _bind(_crypto, "X509_STORE_add_crl", c_int, c_void_p, c_void_p)
X509_STORE_add_cert = _bind(_crypto, "X509_STORE_add_cert", c_int, c_void_p, c_void_p)
PEM_read_bio_X509_AUX = _bind(
    _crypto, "PEM_read_bio_X509_AUX", c_void_p, c_void_p, c_void_p, PEM_PASSWORD_CB, c_void_p
)
PEM_read_bio_X509_CRL = _bind(
    _crypto, "PEM_read_bio_X509_CRL", c_void_p, c_void_p, c_void_p, PEM_PASSWORD_CB, c_void_p
)
X509_STORE_set_flags = _bind(_crypto, "X509_STORE_set_flags", c_int, c_void_p, c_ulong)
X509_verify_cert_error_string = _bind(_crypto, "X509_verify_cert_error_string", c_char_p, c_long)
X509_VERIFY_PARAM_set1_ip_asc = _bind(
    _crypto, "X509_VERIFY_PARAM_set1_ip_asc", c_int, c_void_p, c_char_p
)
X509_VERIFY_PARAM_set1_host = _bind(
    _crypto, "X509_VERIFY_PARAM_set1_host", c_int, c_void_p, c_char_p, c_size_t
)
X509_STORE_CTX_get_error_depth = _bind(
    _crypto, "X509_STORE_CTX_get_error_depth", c_int, c_void_p
)
X509_STORE_CTX_get_current_cert = _bind(
    _crypto, "X509_STORE_CTX_get_current_cert", c_void_p, c_void_p
)
X509_STORE_CTX_set_error = _bind(_crypto, "X509_STORE_CTX_set_error", None, c_void_p, c_int)
X509_STORE_CTX_get_ex_data = _bind(
    _crypto, "X509_STORE_CTX_get_ex_data", c_void_p, c_void_p, c_int
)
OPENSSL_sk_num = _bind(_crypto, "OPENSSL_sk_num", c_int, c_void_p)
OPENSSL_sk_value = _bind(_crypto, "OPENSSL_sk_value", c_void_p, c_void_p, c_int)
OBJ_nid2sn = _bind(_crypto, "OBJ_nid2sn", c_char_p, c_int)
CRYPTO_free = _bind(_crypto, "CRYPTO_free", None, c_void_p, c_char_p, c_int)
# The configuration file API (the system crypto policy, ktlsd.tls.policy): read only.
CONF_get1_default_config_file = _bind(_crypto, "CONF_get1_default_config_file", c_void_p)
NCONF_new = _bind(_crypto, "NCONF_new", c_void_p, c_void_p)
NCONF_free = _bind(_crypto, "NCONF_free", None, c_void_p)
NCONF_load = _bind(_crypto, "NCONF_load", c_int, c_void_p, c_char_p, POINTER(c_long))
NCONF_get_section = _bind(_crypto, "NCONF_get_section", c_void_p, c_void_p, c_char_p)

# --- libssl -------------------------------------------------------------------------------------
TLS_method = _bind(_ssl, "TLS_method", c_void_p)
SSL_CTX_new = _bind(_ssl, "SSL_CTX_new", c_void_p, c_void_p)
SSL_CTX_free = _bind(_ssl, "SSL_CTX_free", None, c_void_p)
SSL_CTX_ctrl = _bind(_ssl, "SSL_CTX_ctrl", c_long, c_void_p, c_int, c_long, c_void_p)
SSL_CTX_set_options = _bind(_ssl, "SSL_CTX_set_options", c_uint64, c_void_p, c_uint64)
SSL_CTX_set_ciphersuites = _bind(_ssl, "SSL_CTX_set_ciphersuites", c_int, c_void_p, c_char_p)
SSL_CTX_set_num_tickets = _bind(_ssl, "SSL_CTX_set_num_tickets", c_int, c_void_p, c_size_t)
SSL_CTX_set_keylog_callback = _bind(_ssl, "SSL_CTX_set_keylog_callback", None, c_void_p, KEYLOG_CB)
SSL_CTX_set_psk_use_session_callback = _bind(
    _ssl, "SSL_CTX_set_psk_use_session_callback", None, c_void_p, PSK_USE_CB
)
SSL_CTX_set_psk_find_session_callback = _bind(
    _ssl, "SSL_CTX_set_psk_find_session_callback", None, c_void_p, PSK_FIND_CB
)
SSL_CTX_set_client_hello_cb = _bind(
    _ssl, "SSL_CTX_set_client_hello_cb", None, c_void_p, CLIENT_HELLO_CB, c_void_p
)
SSL_CTX_set_verify = _bind(_ssl, "SSL_CTX_set_verify", None, c_void_p, c_int, VERIFY_CB)
SSL_CTX_set_default_verify_paths = _bind(_ssl, "SSL_CTX_set_default_verify_paths", c_int, c_void_p)
SSL_CTX_load_verify_locations = _bind(
    _ssl, "SSL_CTX_load_verify_locations", c_int, c_void_p, c_char_p, c_char_p
)
SSL_CTX_get_cert_store = _bind(_ssl, "SSL_CTX_get_cert_store", c_void_p, c_void_p)
SSL_CTX_use_certificate = _bind(_ssl, "SSL_CTX_use_certificate", c_int, c_void_p, c_void_p)
SSL_CTX_use_PrivateKey = _bind(_ssl, "SSL_CTX_use_PrivateKey", c_int, c_void_p, c_void_p)
SSL_CTX_check_private_key = _bind(_ssl, "SSL_CTX_check_private_key", c_int, c_void_p)
SSL_CTX_add_custom_ext = _bind(
    _ssl, "SSL_CTX_add_custom_ext", c_int, c_void_p, c_uint, c_uint, CUSTOM_EXT_ADD_CB,
    CUSTOM_EXT_FREE_CB, c_void_p, CUSTOM_EXT_PARSE_CB, c_void_p,
)
SSL_CTX_get_ciphers = _bind(_ssl, "SSL_CTX_get_ciphers", c_void_p, c_void_p)

SSL_new = _bind(_ssl, "SSL_new", c_void_p, c_void_p)
SSL_free = _bind(_ssl, "SSL_free", None, c_void_p)
SSL_ctrl = _bind(_ssl, "SSL_ctrl", c_long, c_void_p, c_int, c_long, c_void_p)
SSL_set_bio = _bind(_ssl, "SSL_set_bio", None, c_void_p, c_void_p, c_void_p)
SSL_set_connect_state = _bind(_ssl, "SSL_set_connect_state", None, c_void_p)
SSL_set_accept_state = _bind(_ssl, "SSL_set_accept_state", None, c_void_p)
SSL_do_handshake = _bind(_ssl, "SSL_do_handshake", c_int, c_void_p)
SSL_get_error = _bind(_ssl, "SSL_get_error", c_int, c_void_p, c_int)
SSL_set_ciphersuites = _bind(_ssl, "SSL_set_ciphersuites", c_int, c_void_p, c_char_p)
SSL_set_verify = _bind(_ssl, "SSL_set_verify", None, c_void_p, c_int, VERIFY_CB)
SSL_get_verify_mode = _bind(_ssl, "SSL_get_verify_mode", c_int, c_void_p)
SSL_get_ex_data_X509_STORE_CTX_idx = _bind(_ssl, "SSL_get_ex_data_X509_STORE_CTX_idx", c_int)
SSL_set1_host = _bind(_ssl, "SSL_set1_host", c_int, c_void_p, c_char_p)
SSL_get0_param = _bind(_ssl, "SSL_get0_param", c_void_p, c_void_p)
SSL_get_current_cipher = _bind(_ssl, "SSL_get_current_cipher", c_void_p, c_void_p)
SSL_CIPHER_get_protocol_id = _bind(_ssl, "SSL_CIPHER_get_protocol_id", c_uint16, c_void_p)
SSL_CIPHER_find = _bind(_ssl, "SSL_CIPHER_find", c_void_p, c_void_p, c_char_p)
SSL_get_client_random = _bind(_ssl, "SSL_get_client_random", c_size_t, c_void_p, c_void_p, c_size_t)
SSL_get_peer_cert_chain = _bind(_ssl, "SSL_get_peer_cert_chain", c_void_p, c_void_p)
SSL_get1_peer_certificate = _bind(_ssl, "SSL_get1_peer_certificate", c_void_p, c_void_p)
SSL_get_verify_result = _bind(_ssl, "SSL_get_verify_result", c_long, c_void_p)
SSL_session_reused = _bind(_ssl, "SSL_session_reused", c_int, c_void_p)
SSL_group_to_name = _bind(_ssl, "SSL_group_to_name", c_char_p, c_void_p, c_int)
SSL_alert_desc_string_long = _bind(_ssl, "SSL_alert_desc_string_long", c_char_p, c_int)
SSL_client_hello_get0_ext = _bind(
    _ssl,
    "SSL_client_hello_get0_ext",
    c_int,
    c_void_p,
    c_uint,
    POINTER(c_void_p),
    POINTER(c_size_t),
)

SSL_SESSION_new = _bind(_ssl, "SSL_SESSION_new", c_void_p)
SSL_SESSION_free = _bind(_ssl, "SSL_SESSION_free", None, c_void_p)
SSL_SESSION_set1_master_key = _bind(
    _ssl, "SSL_SESSION_set1_master_key", c_int, c_void_p, c_char_p, c_size_t
)
SSL_SESSION_set_cipher = _bind(_ssl, "SSL_SESSION_set_cipher", c_int, c_void_p, c_void_p)
SSL_SESSION_set_protocol_version = _bind(
    _ssl, "SSL_SESSION_set_protocol_version", c_int, c_void_p, c_int
)


# --- errors -------------------------------------------------------------------------------------
class OpenSSLError(Exception):
    """A libssl/libcrypto call failed; the message holds OpenSSL's own (secret-free) reasons."""

    def __init__(self, what: str, reasons: list[str]) -> None:
        self.what = what
        self.reasons = reasons
        detail = "; ".join(reasons) if reasons else "no detail from OpenSSL"
        super().__init__(f"{what}: {detail}")


@dataclass(frozen=True)
class QueuedError:
    """One entry of OpenSSL's error queue: the packed code and its reason string."""

    code: int
    reason: str

    @property
    def reason_code(self) -> int:
        # ERR_GET_REASON in OpenSSL 3: low 23 bits (system errors aside).
        return self.code & 0x7FFFFF

    @property
    def library(self) -> int:
        # ERR_GET_LIB in OpenSSL 3 (system errors aside).
        return (self.code >> 23) & 0xFF

    @property
    def received_alert(self) -> int | None:
        """The description of the fatal alert from the peer this error reports, if it does."""
        if self.code & ERR_SYSTEM_FLAG or self.library != ERR_LIB_SSL:
            return None
        alert = self.reason_code - SSL_AD_REASON_OFFSET
        return alert if 0 <= alert < 256 else None


def drain_errors() -> list[QueuedError]:
    """Empty this thread's OpenSSL error queue and return what was in it."""
    errors: list[QueuedError] = []
    while True:
        code = ERR_get_error()
        if code == 0:
            return errors
        reason = ERR_reason_error_string(code)
        if reason is None:
            buf = ctypes.create_string_buffer(256)
            ERR_error_string_n(code, buf, len(buf))
            text = buf.value.decode("ascii", "replace")
        else:
            text = reason.decode("ascii", "replace")
        errors.append(QueuedError(code, text))


def _fail(what: str) -> OpenSSLError:
    return OpenSSLError(what, [e.reason for e in drain_errors()])


def _check(ok: int, what: str) -> None:
    if ok != 1:
        raise _fail(what)


# --- DER helpers --------------------------------------------------------------------------------
def x509_from_der(der: bytes) -> int:
    """Parse one DER certificate into a new ``X509*`` (caller frees with ``X509_free``)."""
    buf = ctypes.create_string_buffer(der, len(der))
    ptr = c_void_p(ctypes.addressof(buf))
    x509 = d2i_X509(None, ctypes.byref(ptr), len(der))
    if not x509:
        raise _fail("cannot parse certificate")
    return int(x509)


def x509_to_der(x509: int) -> bytes:
    length = i2d_X509(x509, None)
    if length <= 0:
        raise _fail("cannot encode certificate")
    buf = ctypes.create_string_buffer(length)
    ptr = c_void_p(ctypes.addressof(buf))
    i2d_X509(x509, ctypes.byref(ptr))
    return buf.raw


def verify_error_string(code: int) -> str:
    text = X509_verify_cert_error_string(code)
    return text.decode("ascii", "replace") if text else f"verify error {code}"


def alert_description(code: int) -> str:
    text = SSL_alert_desc_string_long(code)
    return text.decode("ascii", "replace") if text else f"alert {code}"


# --- per-connection callback dispatch ------------------------------------------------------------
class ConnectionHooks:
    """What the C callbacks of one ``SSL*`` call into.

    The engine (:class:`ktlsd.tls.handshake.TlsHandshake`) subclasses this and passes itself to
    :class:`SslConnection`; the defaults do nothing. Exceptions raised here never unwind into C:
    they are stored in ``SslConnection.callback_error`` and the callback reports failure.
    """

    def psk_for_client(self, md_size: int | None) -> tuple[bytes, bytes, int] | None:
        """Client: (identity, key, cipher code) to offer, or None."""
        return None

    def psk_for_identity(self, identity: bytes) -> tuple[bytes, int] | None:
        """Server: (key, cipher code) for an identity the client offered, or None."""
        return None

    def on_client_hello(self, psk_extension: bytes | None) -> int:
        """Server, before the PSK is chosen: the raw ``pre_shared_key`` extension body of the
        ClientHello (None when it has none; unparsed, so hostile); return 0 to go on or an
        alert number to fail the handshake with."""
        return 0

    def record_size_limit_to_send(self) -> bytes | None:
        """The ``record_size_limit`` extension body (RFC 8449) to put in our ClientHello or
        EncryptedExtensions, or None to leave it out. A server is asked only when the client
        sent the extension."""
        return None

    def on_record_size_limit(self, body: bytes) -> int:
        """The peer's ``record_size_limit`` extension body (unparsed, so hostile); return 0
        to go on or an alert number to fail the handshake with."""
        return 0

    def check_peer_leaf(self, certificate: bytes) -> None:
        """The peer's own certificate (DER), once OpenSSL verified its chain; raise
        :class:`Exception` (a HandshakeError) to refuse it. Called only on connections that
        asked for it (:meth:`SslConnection.enable_leaf_check`)."""


_registry: dict[int, SslConnection] = {}
_registry_lock = threading.Lock()


def _lookup(ssl: int | None) -> SslConnection | None:
    if not ssl:
        return None
    return _registry.get(ssl)


def _make_psk_session(ssl: int, key: bytes, cipher_code: int) -> int:
    cipher = SSL_CIPHER_find(ssl, cipher_code.to_bytes(2, "big"))
    if not cipher:
        return 0
    sess = SSL_SESSION_new()
    if not sess:
        return 0
    if (
        SSL_SESSION_set1_master_key(sess, key, len(key)) != 1
        or SSL_SESSION_set_cipher(sess, cipher) != 1
        or SSL_SESSION_set_protocol_version(sess, TLS1_3_VERSION) != 1
    ):
        SSL_SESSION_free(sess)
        return 0
    return int(sess)


# The keylog lines the hand-off needs. OpenSSL logs five secrets per handshake and end (the
# handshake traffic secrets and the exporter secret too); the callback drops the other three
# at the first bytes and keeps these two lines unparsed: they are parsed once, at the end. A
# connection with ``keep_all_secret_lines`` (a key log is configured: ktlsd.tls.keylog) keeps
# all five.
TRAFFIC_SECRET_LABELS = (b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0")
_TRAFFIC_SECRET_PREFIXES = tuple(label + b" " for label in TRAFFIC_SECRET_LABELS)


def _keylog_cb(ssl: int | None, line: bytes | None) -> None:
    if not line:
        return
    wanted = line.startswith(_TRAFFIC_SECRET_PREFIXES)
    conn = _lookup(ssl)
    if conn is not None and (wanted or conn.keep_all_secret_lines):
        conn.secret_lines.append(line)


def _psk_use_cb(ssl, md, id_out, idlen_out, sess_out) -> int:  # type: ignore[no-untyped-def]
    conn = _lookup(ssl)
    sess_out[0] = None
    idlen_out[0] = 0
    if conn is None:
        return 1
    try:
        md_size = EVP_MD_get_size(md) if md else None
        choice = conn.hooks.psk_for_client(md_size)
        if choice is None:
            return 1
        identity, key, cipher_code = choice
        sess = _make_psk_session(ssl, key, cipher_code)
        if not sess:
            return 0
        # OpenSSL keeps the identity pointer until the handshake ends: the connection owns it.
        conn.keep_alive.append(buf := ctypes.create_string_buffer(identity, len(identity)))
        id_out[0] = ctypes.addressof(buf)
        idlen_out[0] = len(identity)
        sess_out[0] = sess  # ownership passes to OpenSSL
        return 1
    except Exception as exc:
        conn.callback_error = exc
        return 0


def _psk_find_cb(ssl, identity_ptr, identity_len, sess_out) -> int:  # type: ignore[no-untyped-def]
    conn = _lookup(ssl)
    sess_out[0] = None
    if conn is None:
        return 1
    try:
        identity = ctypes.string_at(identity_ptr, identity_len)
        found = conn.hooks.psk_for_identity(identity)
        if found is None:
            return 1  # not this identity; OpenSSL tries the next one or goes without PSK
        key, cipher_code = found
        sess = _make_psk_session(ssl, key, cipher_code)
        if not sess:
            return 0
        sess_out[0] = sess
        return 1
    except Exception as exc:
        conn.callback_error = exc
        return 0


def _client_hello_cb(ssl, alert_out, _arg) -> int:  # type: ignore[no-untyped-def]
    conn = _lookup(ssl)
    if conn is None:
        return SSL_CLIENT_HELLO_SUCCESS
    try:
        out = c_void_p()
        outlen = c_size_t()
        psk_extension: bytes | None = None
        if SSL_client_hello_get0_ext(
            ssl, TLSEXT_TYPE_pre_shared_key, ctypes.byref(out), ctypes.byref(outlen)
        ):
            # A copy of the extension body exactly as the client sent it (OpenSSL checked only
            # that it fits in the ClientHello): parsing it is the hook's job.
            length = outlen.value
            psk_extension = ctypes.string_at(out.value, length) if out.value and length else b""
        alert = conn.hooks.on_client_hello(psk_extension)
        if alert:
            alert_out[0] = alert
            return SSL_CLIENT_HELLO_ERROR
        return SSL_CLIENT_HELLO_SUCCESS
    except Exception as exc:
        conn.callback_error = exc
        alert_out[0] = 80  # internal_error
        return SSL_CLIENT_HELLO_ERROR


def _rsl_add_cb(  # type: ignore[no-untyped-def]
    ssl, _ext_type, _context, out, outlen, _x509, _chainidx, alert_out, _arg
) -> int:
    """record_size_limit: the body for our ClientHello/EncryptedExtensions, from the hooks."""
    conn = _lookup(ssl)
    if conn is None:
        return 0  # not ours: leave the extension out
    try:
        body = conn.hooks.record_size_limit_to_send()
        if body is None:
            return 0
        # OpenSSL copies the body into the message before the next callback; the connection
        # keeps the buffer alive anyway, until SSL_free.
        conn.keep_alive.append(buf := ctypes.create_string_buffer(body, len(body)))
        out[0] = ctypes.addressof(buf)
        outlen[0] = len(body)
        return 1
    except Exception as exc:
        conn.callback_error = exc
        alert_out[0] = 80  # internal_error
        return -1


def _rsl_parse_cb(  # type: ignore[no-untyped-def]
    ssl, _ext_type, _context, data, size, _x509, _chainidx, alert_out, _arg
) -> int:
    """record_size_limit: the peer's body (a copy) to the hooks, which may refuse it."""
    conn = _lookup(ssl)
    if conn is None:
        return 1
    try:
        body = ctypes.string_at(data, size) if data and size else b""
        alert = conn.hooks.on_record_size_limit(body)
        if alert:
            alert_out[0] = alert
            return 0
        return 1
    except Exception as exc:
        conn.callback_error = exc
        alert_out[0] = 80  # internal_error
        return 0


def _accept_any_cb(_ok: int, _store_ctx: int | None) -> int:
    return 1


def _verify_leaf_cb(ok: int, store_ctx: int | None) -> int:
    """OpenSSL's verification stays in charge (``ok`` 0 stays a failure); once the chain
    verified, the leaf (depth 0, reported last) goes to the connection's hook. A refusal is
    reported as "certificate rejected", which OpenSSL turns into a bad_certificate alert."""
    if not ok or not store_ctx:
        return 0
    if X509_STORE_CTX_get_error_depth(store_ctx) != 0:
        return 1
    conn = _lookup(X509_STORE_CTX_get_ex_data(store_ctx, SSL_get_ex_data_X509_STORE_CTX_idx()))
    if conn is None:
        X509_STORE_CTX_set_error(store_ctx, X509_V_ERR_CERT_REJECTED)
        return 0  # a connection we cannot judge is not let in
    try:
        cert = X509_STORE_CTX_get_current_cert(store_ctx)
        if not cert:
            raise ValueError("OpenSSL gave no certificate to check")
        conn.hooks.check_peer_leaf(x509_to_der(cert))
        return 1
    except Exception as exc:
        conn.callback_error = exc
        X509_STORE_CTX_set_error(store_ctx, X509_V_ERR_CERT_REJECTED)
        return 0


def _no_password_cb(_buf: int | None, _size: int, _rwflag: int, _u: int | None) -> int:
    return -1  # never prompt on a terminal for an encrypted PEM block: refuse it


# Module-level C callback objects: alive for the life of the process, so OpenSSL can never call
# a freed trampoline.
_KEYLOG = KEYLOG_CB(_keylog_cb)
_PSK_USE = PSK_USE_CB(_psk_use_cb)
_PSK_FIND = PSK_FIND_CB(_psk_find_cb)
_CLIENT_HELLO = CLIENT_HELLO_CB(_client_hello_cb)
_ACCEPT_ANY = VERIFY_CB(_accept_any_cb)
_VERIFY_LEAF = VERIFY_CB(_verify_leaf_cb)
_NO_VERIFY_CB = VERIFY_CB()  # a NULL function pointer: OpenSSL's default verification
_NO_PASSWORD = PEM_PASSWORD_CB(_no_password_cb)
_RSL_ADD = CUSTOM_EXT_ADD_CB(_rsl_add_cb)
_RSL_FREE = CUSTOM_EXT_FREE_CB()  # NULL: the connection owns the buffer (keep_alive)
_RSL_PARSE = CUSTOM_EXT_PARSE_CB(_rsl_parse_cb)


# --- parsing from memory ---------------------------------------------------------------------
def _pem_objects(
    data: bytes, read: Callable[..., int | None], free: Callable[[int], None], what: str
) -> list[int]:
    """Every PEM block of one type in ``data`` (blocks of other types are skipped), as new
    objects the caller frees; raises on a malformed block of that type."""
    buf = ctypes.create_string_buffer(data, len(data))  # alive while the BIO reads it
    bio = BIO_new_mem_buf(buf, len(data))
    if not bio:
        raise _fail("BIO_new_mem_buf")
    objects: list[int] = []
    try:
        ERR_clear_error()
        while True:
            obj = read(bio, None, _NO_PASSWORD, None)
            if not obj:
                break
            objects.append(obj)
        errors = drain_errors()
        ends = [e for e in errors
                if e.library == ERR_LIB_PEM and e.reason_code == PEM_R_NO_START_LINE]
        if len(ends) != len(errors):
            raise OpenSSLError(f"cannot parse {what}", [e.reason for e in errors])
        return objects
    except BaseException:
        for obj in objects:
            free(obj)
        raise
    finally:
        BIO_free(bio)


def _der_object(
    data: bytes, d2i: Callable[..., int | None], free: Callable[[int], None], what: str
) -> int:
    """One DER value filling all of ``data``, as a new object the caller frees."""
    buf = ctypes.create_string_buffer(data, len(data))
    ptr = c_void_p(ctypes.addressof(buf))
    obj = d2i(None, ctypes.byref(ptr), len(data))
    if not obj:
        raise _fail(f"cannot parse {what} (neither PEM nor DER)")
    if (ptr.value or 0) - ctypes.addressof(buf) != len(data):
        free(obj)
        raise OpenSSLError(f"cannot parse {what}", ["trailing data after the DER value"])
    return obj


def _is_pem(data: bytes) -> bool:
    return b"-----BEGIN " in data


# --- the configuration file (read only) ----------------------------------------------------------
class _ConfValue(ctypes.Structure):
    _fields_ = [("section", c_char_p), ("name", c_char_p), ("value", c_char_p)]


def default_config_file() -> str | None:
    """The OpenSSL configuration file the library reads: ``$OPENSSL_CONF``, else
    ``OPENSSLDIR/openssl.cnf`` (``CONF_get1_default_config_file``)."""
    ptr = CONF_get1_default_config_file()
    if not ptr:
        drain_errors()
        return None
    try:
        return ctypes.string_at(ptr).decode("utf-8", "surrogateescape")
    finally:
        CRYPTO_free(ptr, None, 0)


class ConfigFile:
    """An OpenSSL configuration file loaded with the library's own parser (``NCONF_load``:
    its syntax, ``.include`` and variable expansion), for reading sections; a context manager.
    Raises :class:`OpenSSLError` when the file cannot be loaded."""

    def __init__(self, path: str) -> None:
        self.path = path
        conf = NCONF_new(None)
        if not conf:
            raise _fail("NCONF_new")
        self._conf: int | None = conf
        line = c_long(0)
        if NCONF_load(conf, path.encode("utf-8", "surrogateescape"), ctypes.byref(line)) != 1:
            self.close()
            where = f" (line {line.value})" if line.value > 0 else ""
            raise _fail(f"cannot load OpenSSL configuration {path}{where}")

    def section(self, name: str) -> list[tuple[str, str]] | None:
        """The ``name = value`` pairs of a section in file order, or None when it is absent
        (``default`` is the part before the first section header)."""
        if self._conf is None:
            raise ValueError("configuration already closed")
        stack = NCONF_get_section(self._conf, name.encode("utf-8", "surrogateescape"))
        if not stack:
            drain_errors()
            return None
        pairs: list[tuple[str, str]] = []
        for i in range(OPENSSL_sk_num(stack)):
            value = ctypes.cast(OPENSSL_sk_value(stack, i), POINTER(_ConfValue)).contents
            if value.name is not None and value.value is not None:
                pairs.append((value.name.decode("utf-8", "replace"),
                              value.value.decode("utf-8", "replace")))
        return pairs

    def close(self) -> None:
        if self._conf is not None:
            NCONF_free(self._conf)
            self._conf = None

    def __enter__(self) -> ConfigFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- SSL_CTX -------------------------------------------------------------------------------------
class SslContext:
    """An owned ``SSL_CTX`` for TLS 1.3 only, with ktlsd's callbacks installed.

    ``SSL_new`` takes its own reference on the ``SSL_CTX``, so :meth:`free` (or garbage
    collection) while connections are still alive is safe.
    """

    def __init__(self, *, server: bool) -> None:
        ctx = SSL_CTX_new(TLS_method())
        if not ctx:
            raise _fail("SSL_CTX_new")
        self._ptr: int | None = ctx
        try:
            for ctrl in (SSL_CTRL_SET_MIN_PROTO_VERSION, SSL_CTRL_SET_MAX_PROTO_VERSION):
                if SSL_CTX_ctrl(ctx, ctrl, TLS1_3_VERSION, None) != 1:
                    raise _fail("cannot restrict to TLS 1.3")
            if server:
                # No NewSessionTicket: the server's send sequence stays 0 at hand-off.
                _check(SSL_CTX_set_num_tickets(ctx, 0), "SSL_CTX_set_num_tickets")
                SSL_CTX_set_psk_find_session_callback(ctx, _PSK_FIND)
                SSL_CTX_set_client_hello_cb(ctx, _CLIENT_HELLO, None)
            else:
                SSL_CTX_set_psk_use_session_callback(ctx, _PSK_USE)
            # Send exactly the configured chain; don't complete it from the trust store.
            SSL_CTX_ctrl(ctx, SSL_CTRL_MODE, SSL_MODE_NO_AUTO_CHAIN, None)
            # No info callback: OpenSSL calls it at every state change (about 15 times per
            # handshake and end); received alerts are read from the error queue instead.
            SSL_CTX_set_keylog_callback(ctx, _KEYLOG)
            # record_size_limit (RFC 8449) as a custom extension: ClientHello and
            # EncryptedExtensions; the hooks decide what goes out and judge what comes in.
            _check(
                SSL_CTX_add_custom_ext(
                    ctx, TLSEXT_TYPE_record_size_limit,
                    SSL_EXT_TLS1_3_ONLY | SSL_EXT_CLIENT_HELLO
                    | SSL_EXT_TLS1_3_ENCRYPTED_EXTENSIONS,
                    _RSL_ADD, _RSL_FREE, None, _RSL_PARSE, None,
                ),
                "cannot add the record_size_limit extension",
            )
        except BaseException:
            self.free()
            raise

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise ValueError("SSL_CTX already freed")
        return self._ptr

    def free(self) -> None:
        if self._ptr is not None:
            SSL_CTX_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.free()

    def set_ciphersuites(self, names: str) -> None:
        _check(SSL_CTX_set_ciphersuites(self.ptr, names.encode()), "cannot set cipher suites")

    def cipher_codes(self) -> list[int]:
        """The IANA codes of the context's cipher list in preference order (TLS 1.3 suites
        first, then the TLS 1.2 ones: ``SSL_CTX_get_ciphers``)."""
        stack = SSL_CTX_get_ciphers(self.ptr)
        if not stack:
            return []
        return [int(SSL_CIPHER_get_protocol_id(OPENSSL_sk_value(stack, i)))
                for i in range(OPENSSL_sk_num(stack))]

    def set_groups(self, groups: str) -> None:
        if SSL_CTX_ctrl(self.ptr, SSL_CTRL_SET_GROUPS_LIST, 0, groups.encode()) != 1:
            raise _fail(f"cannot set groups {groups!r}")

    def set_verify(self, mode: int, *, accept_any: bool = False) -> None:
        SSL_CTX_set_verify(self.ptr, mode, _ACCEPT_ANY if accept_any else _NO_VERIFY_CB)

    def load_default_truststore(self) -> None:
        _check(SSL_CTX_set_default_verify_paths(self.ptr), "cannot load the default truststore")

    def load_truststore_directory(self, capath: str) -> None:
        """Let OpenSSL look CA certificates up in a hashed directory (``openssl rehash``).

        OpenSSL opens files there by path, so only for directories the agent's own
        configuration or an operator's command line names, never a consumer's.
        """
        ok = SSL_CTX_load_verify_locations(self.ptr, None, capath.encode())
        _check(ok, f"cannot load truststore {capath}")

    def add_trust_anchors(self, data: bytes, source: str) -> int:
        """Trust the certificates in ``data`` (PEM, ``CERTIFICATE`` or ``TRUSTED CERTIFICATE``
        blocks; or one DER certificate); ``source`` names it in errors. Returns how many."""
        what = f"truststore {source}"
        if _is_pem(data):
            certs = _pem_objects(data, PEM_read_bio_X509_AUX, X509_free, what)
        else:
            certs = [_der_object(data, d2i_X509, X509_free, what)]
        if not certs:
            raise OpenSSLError(f"cannot use {what}", ["no certificate in it"])
        store = SSL_CTX_get_cert_store(self.ptr)
        try:
            for cert in certs:
                _check(X509_STORE_add_cert(store, cert), f"cannot add a certificate of {what}")
        finally:
            for cert in certs:
                X509_free(cert)  # the store holds its own references
        return len(certs)

    def add_crls(self, data: bytes, source: str) -> int:
        """Add the CRLs in ``data`` (PEM ``X509 CRL`` blocks, or one DER CRL) to the trust
        store and check every chain element against them. Returns how many."""
        what = f"CRL file {source}"
        if _is_pem(data):
            crls = _pem_objects(data, PEM_read_bio_X509_CRL, X509_CRL_free, what)
        else:
            crls = [_der_object(data, d2i_X509_CRL, X509_CRL_free, what)]
        if not crls:
            raise OpenSSLError(f"cannot use {what}", ["no CRL in it"])
        store = SSL_CTX_get_cert_store(self.ptr)
        try:
            for crl in crls:
                _check(X509_STORE_add_crl(store, crl), f"cannot add a CRL of {what}")
        finally:
            for crl in crls:
                X509_CRL_free(crl)  # the store holds its own references
        _check(X509_STORE_set_flags(store, X509_V_FLAG_CRL_CHECK), "cannot enable CRL checks")
        return len(crls)

    def use_certificate_chain(
        self, chain_der: tuple[bytes, ...], key_der: bytes | TokenKey
    ) -> None:
        """Install our certificate (leaf first, then intermediates) and its private key
        (PKCS#8 DER, or a :class:`TokenKey` whose private half stays in its token)."""
        leaf = x509_from_der(chain_der[0])
        try:
            _check(SSL_CTX_use_certificate(self.ptr, leaf), "cannot use certificate")
        finally:
            X509_free(leaf)  # SSL_CTX_use_certificate took its own reference
        for der in chain_der[1:]:
            extra = x509_from_der(der)
            try:
                # SSL_CTX_add1_chain_cert: the ctrl with larg=1 takes its own reference.
                if SSL_CTX_ctrl(self.ptr, SSL_CTRL_CHAIN_CERT, 1, extra) != 1:
                    raise _fail("cannot add chain certificate")
            finally:
                X509_free(extra)
        if isinstance(key_der, TokenKey):
            # SSL_CTX_use_PrivateKey takes its own reference on the token's EVP_PKEY.
            _check(SSL_CTX_use_PrivateKey(self.ptr, key_der.ptr), "cannot use the token key")
            _check(SSL_CTX_check_private_key(self.ptr),
                   "the token key does not match the certificate")
            return
        pkey = _private_key_from_der(key_der)
        try:
            _check(SSL_CTX_use_PrivateKey(self.ptr, pkey), "cannot use private key")
        finally:
            EVP_PKEY_free(pkey)
        _check(SSL_CTX_check_private_key(self.ptr), "private key does not match certificate")


# --- SSL -----------------------------------------------------------------------------------------
_BIO_MEM = BIO_s_mem()  # a static method table inside libcrypto

# Output is read from the write BIO through one buffer per thread, allocated once.
_OUTPUT_CHUNK = 1 << 14
_per_thread = threading.local()


def _output_buffer() -> tuple[ctypes.Array[ctypes.c_char], memoryview]:
    try:
        pair: tuple[ctypes.Array[ctypes.c_char], memoryview] = _per_thread.output
    except AttributeError:
        buf = ctypes.create_string_buffer(_OUTPUT_CHUNK)
        pair = _per_thread.output = (buf, memoryview(buf).cast("B"))
    return pair


def _read_bio(bio: int) -> bytes:
    """Everything a memory BIO holds, read through this thread's output buffer."""
    buf, view = _output_buffer()
    n = BIO_read(bio, buf, _OUTPUT_CHUNK)
    if n <= 0:
        return b""
    if n < _OUTPUT_CHUNK:
        return view[:n].tobytes()
    parts = [view.tobytes()]
    while (n := BIO_read(bio, buf, _OUTPUT_CHUNK)) > 0:
        parts.append(view[:n].tobytes())
    return b"".join(parts)


class HandshakeStep:
    """Outcome of one :meth:`SslConnection.do_handshake` call."""

    DONE = "done"
    WANT_READ = "want_read"
    FAILED = "failed"


class SslConnection:
    """An owned ``SSL*`` over two memory BIOs: records in, records out, no socket.

    ``hooks`` receives the callbacks for this connection. ``keep_alive`` holds every buffer whose
    address was handed to OpenSSL; it is cleared only after ``SSL_free``.
    """

    def __init__(self, ctx: SslContext, hooks: ConnectionHooks, *, server: bool) -> None:
        self.ctx = ctx  # keep the Python context (and its settings) alive
        self.hooks = hooks
        self.keep_alive: list[object] = []
        self.callback_error: Exception | None = None
        self.errors: list[QueuedError] = []
        self.last_error = SSL_ERROR_NONE  # SSL_get_error after the last failed step
        # Keylog lines of the two application traffic secrets (see traffic_secrets), or of
        # all secrets with keep_all_secret_lines (for a key log file).
        self.secret_lines: list[bytes] = []
        self.keep_all_secret_lines = False
        ssl = SSL_new(ctx.ptr)
        if not ssl:
            raise _fail("SSL_new")
        self._ptr: int | None = ssl
        rbio = BIO_new(_BIO_MEM)
        wbio = BIO_new(_BIO_MEM)
        if not rbio or not wbio:
            for bio in (rbio, wbio):
                if bio:
                    BIO_free(bio)
            self.free()
            raise _fail("BIO_new")
        SSL_set_bio(ssl, rbio, wbio)  # the SSL owns both BIOs from here on
        self._rbio = rbio
        self._wbio = wbio
        with _registry_lock:
            _registry[ssl] = self
        if server:
            SSL_set_accept_state(ssl)
        else:
            SSL_set_connect_state(ssl)

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise ValueError("SSL already freed")
        return self._ptr

    def free(self) -> None:
        if self._ptr is not None:
            with _registry_lock:
                _registry.pop(self._ptr, None)
            SSL_free(self._ptr)
            self._ptr = None
            self.keep_alive.clear()
            self.secret_lines.clear()

    def __del__(self) -> None:
        self.free()

    # configuration
    def set_ciphersuites(self, names: str | bytes) -> None:
        encoded = names.encode() if isinstance(names, str) else names
        _check(SSL_set_ciphersuites(self.ptr, encoded), "cannot set cipher suites")

    def enable_leaf_check(self) -> None:
        """Have :meth:`ConnectionHooks.check_peer_leaf` judge the peer's certificate once its
        chain verified (the verification mode stays the context's)."""
        SSL_set_verify(self.ptr, SSL_get_verify_mode(self.ptr), _VERIFY_LEAF)

    def set_expected_host(self, name: str) -> None:
        _check(SSL_set1_host(self.ptr, name.encode()), f"cannot set expected host {name!r}")

    def set_expected_ip(self, address: str) -> None:
        param = SSL_get0_param(self.ptr)
        ok = X509_VERIFY_PARAM_set1_ip_asc(param, address.encode())
        _check(ok, f"cannot set expected address {address!r}")

    def set_server_name(self, name: str) -> None:
        encoded = ctypes.create_string_buffer(name.encode())
        self.keep_alive.append(encoded)
        ok = SSL_ctrl(self.ptr, SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name, encoded)
        _check(int(ok), "cannot set server name")

    def client_hello_extension(self, ext_type: int) -> bytes | None:
        """Server, inside the client-hello callback only: a copy of the body of extension
        ``ext_type`` in the ClientHello being processed (unparsed), or None without it."""
        out = c_void_p()
        outlen = c_size_t()
        found = SSL_client_hello_get0_ext(
            self.ptr, ext_type, ctypes.byref(out), ctypes.byref(outlen)
        )
        if not found:
            return None
        length = outlen.value
        return ctypes.string_at(out.value, length) if out.value and length else b""

    def set_max_send_fragment(self, size: int) -> None:
        """Cap the plaintext of the handshake records OpenSSL sends (``SSL_set_max_send_
        fragment``); clamped to what OpenSSL takes, 512..16384."""
        size = max(SSL3_RT_MIN_SEND_FRAGMENT, min(SSL3_RT_MAX_PLAIN_LENGTH, size))
        ok = SSL_ctrl(self.ptr, SSL_CTRL_SET_MAX_SEND_FRAGMENT, size, None)
        _check(int(ok), "cannot set the maximum send fragment")

    # the handshake
    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Give OpenSSL bytes that arrived from the peer (copied; no reference is kept).

        A writable buffer (a bytearray or a memoryview of one) is handed to C in place.
        """
        size = data.nbytes if isinstance(data, memoryview) else len(data)
        if not size:
            return
        source: bytes | int
        if isinstance(data, bytes):
            source = data
        else:
            try:
                source = ctypes.addressof(ctypes.c_char.from_buffer(data))
            except TypeError:  # a read-only buffer
                data = source = bytes(data)
        # ``data`` holds the buffer until BIO_write has copied it.
        if BIO_write(self._rbio, source, size) != size:
            raise _fail("BIO_write")

    def unread_input(self) -> int:
        """How many fed bytes OpenSSL has not consumed yet."""
        return int(BIO_ctrl_pending(self._rbio))

    def take_output(self) -> bytes:
        """Everything OpenSSL wants sent to the peer so far."""
        return _read_bio(self._wbio)

    def step(self, data: memoryview | None = None) -> tuple[str, bytes, int]:
        """:meth:`feed` ``data`` (if any), :meth:`do_handshake`, :meth:`take_output`: one call
        per flight; returns the step, the output and how many fed bytes OpenSSL left unread."""
        ssl, rbio = self._ptr, self._rbio
        if ssl is None:
            raise ValueError("SSL already freed")
        if data is not None:
            size = data.nbytes
            if size:
                try:  # a writable buffer goes to C in place; ``data`` keeps it alive
                    source: bytes | int = ctypes.addressof(ctypes.c_char.from_buffer(data))
                except TypeError:  # a read-only buffer
                    source = data.tobytes()
                if BIO_write(rbio, source, size) != size:
                    raise _fail("BIO_write")
        ERR_clear_error()  # SSL_get_error reads the queue: start it empty
        ret = SSL_do_handshake(ssl)
        if ret == 1:
            step = HandshakeStep.DONE
        else:
            code = SSL_get_error(ssl, ret)
            if code == SSL_ERROR_WANT_READ:
                step = HandshakeStep.WANT_READ
            else:
                step = HandshakeStep.FAILED
                self.last_error = code
                self.errors = drain_errors()
        out = _read_bio(self._wbio)
        return step, out, (int(BIO_ctrl_pending(rbio)) if data is not None else 0)

    def do_handshake(self) -> str:
        """Advance the handshake; on FAILED, :attr:`errors` holds OpenSSL's error queue and
        :attr:`last_error` the ``SSL_ERROR_*`` code."""
        ssl = self.ptr
        ERR_clear_error()  # SSL_get_error reads the queue: start it empty
        ret = SSL_do_handshake(ssl)
        if ret == 1:
            return HandshakeStep.DONE
        code = SSL_get_error(ssl, ret)
        if code == SSL_ERROR_WANT_READ:
            return HandshakeStep.WANT_READ
        self.last_error = code
        self.errors = drain_errors()
        return HandshakeStep.FAILED

    # results
    def cipher_code(self) -> int:
        cipher = SSL_get_current_cipher(self.ptr)
        return int(SSL_CIPHER_get_protocol_id(cipher)) if cipher else 0

    def client_random(self) -> bytes:
        buf, view = _output_buffer()
        n = SSL_get_client_random(self.ptr, buf, 32)
        return view[:n].tobytes()

    def traffic_secrets(self) -> tuple[bytes, bytes] | None:
        """The client and server application traffic secrets OpenSSL logged for this
        connection, or None when either is missing or was logged with another client random."""
        random_hex = self.client_random().hex().encode()
        found: dict[bytes, bytes] = {}
        for line in self.secret_lines:
            fields = line.split(b" ")
            if len(fields) == 3 and fields[1].lower() == random_hex:
                try:
                    found[fields[0]] = bytes.fromhex(fields[2].decode("ascii"))
                except (UnicodeDecodeError, ValueError):
                    return None
        client, server = (found.get(label) for label in TRAFFIC_SECRET_LABELS)
        if not client or not server:
            return None
        return client, server

    def received_alert(self) -> int | None:
        """The alert the peer sent that ended the last (failed) step, if any: close_notify (0)
        or the fatal alert OpenSSL queued as an error."""
        for error in self.errors:
            alert = error.received_alert
            if alert is not None:
                return alert
        if self.last_error == SSL_ERROR_ZERO_RETURN:
            return 0  # close_notify
        return None

    def verify_result(self) -> int:
        return int(SSL_get_verify_result(self.ptr))

    def session_reused(self) -> bool:
        return bool(SSL_session_reused(self.ptr))

    def group_name_for_code(self, code: int) -> str | None:
        """The library's name of the TLS group with IANA number ``code``, or None when it
        does not know it (``SSL_group_to_name`` takes a TLS id marked TLSEXT_nid_unknown)."""
        name = SSL_group_to_name(self.ptr, TLSEXT_NID_UNKNOWN | code)
        return name.decode("ascii", "replace") if name else None

    def group_name(self) -> str | None:
        nid = int(SSL_ctrl(self.ptr, SSL_CTRL_GET_NEGOTIATED_GROUP, 0, None))
        if nid <= 0:
            return None
        name = SSL_group_to_name(self.ptr, nid)
        if name is None:
            name = OBJ_nid2sn(nid)
        return name.decode("ascii", "replace") if name else None

    def peer_chain(self) -> tuple[bytes, ...]:
        """The peer's certificates, DER, leaf first (empty when it sent none)."""
        leaf = SSL_get1_peer_certificate(self.ptr)
        if not leaf:
            return ()
        try:
            chain = [x509_to_der(leaf)]
        finally:
            X509_free(leaf)
        stack = SSL_get_peer_cert_chain(self.ptr)
        if stack:
            # Documented to start with the leaf on the client only; in practice OpenSSL 3.0
            # keeps it first on the server too. Skip it wherever it shows up first.
            for i in range(OPENSSL_sk_num(stack)):
                der = x509_to_der(OPENSSL_sk_value(stack, i))
                if i == 0 and der == chain[0]:
                    continue
                chain.append(der)
        return tuple(chain)


# --- signature schemes, key types, second certificate chains (post-quantum) -------------------
# Added for ML-DSA (OpenSSL 3.5) next to a classic chain; everything below also runs on 3.0.
SSL_CTRL_SET_SIGALGS_LIST = 98
SSL_CTRL_GET_PEER_SIGNATURE_NID = 108
SSL_CTRL_GET_SIGNATURE_NID = 132

SSL_get_peer_signature_type_nid = _bind(
    _ssl, "SSL_get_peer_signature_type_nid", c_int, c_void_p, POINTER(c_int)
)
SSL_get_signature_type_nid = _bind(
    _ssl, "SSL_get_signature_type_nid", c_int, c_void_p, POINTER(c_int)
)
EVP_PKEY_get0_type_name = _bind(_crypto, "EVP_PKEY_get0_type_name", c_char_p, c_void_p)
X509_get0_pubkey = _bind(_crypto, "X509_get0_pubkey", c_void_p, c_void_p)
X509_check_private_key = _bind(_crypto, "X509_check_private_key", c_int, c_void_p, c_void_p)
PEM_read_bio_PrivateKey = _bind(
    _crypto, "PEM_read_bio_PrivateKey", c_void_p, c_void_p, c_void_p, PEM_PASSWORD_CB, c_void_p
)
EVP_PKEY2PKCS8 = _bind(_crypto, "EVP_PKEY2PKCS8", c_void_p, c_void_p)
i2d_PKCS8_PRIV_KEY_INFO = _bind(
    _crypto, "i2d_PKCS8_PRIV_KEY_INFO", c_int, c_void_p, POINTER(c_void_p)
)
PKCS8_PRIV_KEY_INFO_free = _bind(_crypto, "PKCS8_PRIV_KEY_INFO_free", None, c_void_p)
OPENSSL_cleanse = _bind(_crypto, "OPENSSL_cleanse", None, c_void_p, c_size_t)


def _bind_optional(
    lib: ctypes.CDLL, name: str, restype: object, *argtypes: object
) -> Callable[..., Any] | None:
    """A function this library may lack (ENGINEs in a no-engine build, newer additions)."""
    return _bind(lib, name, restype, *argtypes) if hasattr(lib, name) else None


# Newer libraries (not 3.0, not Debian 13's 3.5.9): the IANA name of the scheme used.
SSL_get0_peer_signature_name = _bind_optional(
    _ssl, "SSL_get0_peer_signature_name", c_int, c_void_p, POINTER(c_char_p)
)
SSL_get0_signature_name = _bind_optional(
    _ssl, "SSL_get0_signature_name", c_int, c_void_p, POINTER(c_char_p)
)

# NIDs (obj_mac.h) of the TLS 1.3 signature schemes OpenSSL 3.0 reports as (type, hash).
_NID_SHA256, _NID_SHA384, _NID_SHA512 = 672, 673, 674
_NID_EC, _NID_RSA, _NID_RSA_PSS, _NID_ED25519, _NID_ED448 = 408, 6, 912, 1087, 1088
_SCHEME_BY_NIDS = {
    (_NID_EC, _NID_SHA256): "ecdsa_secp256r1_sha256",
    (_NID_EC, _NID_SHA384): "ecdsa_secp384r1_sha384",
    (_NID_EC, _NID_SHA512): "ecdsa_secp521r1_sha512",
    # A TLS 1.3 peer signs with RSA-PSS whatever its key; OpenSSL 3.0 reports the type
    # rsassaPss for both rsa_pss_rsae_* (an RSA key) and rsa_pss_pss_* (an RSA-PSS key).
    (_NID_RSA_PSS, _NID_SHA256): "rsa_pss_sha256",
    (_NID_RSA_PSS, _NID_SHA384): "rsa_pss_sha384",
    (_NID_RSA_PSS, _NID_SHA512): "rsa_pss_sha512",
    (_NID_ED25519, 0): "ed25519",
    (_NID_ED448, 0): "ed448",
}

# OpenSSL 3.5 reports an ML-DSA signature as the key type alone (no separate hash); its
# short name (``id-ml-dsa-65``) becomes the TLS scheme's name (``mldsa65``).
_SCHEME_BY_KEY_NAME = {f"id-ml-dsa-{n}": f"mldsa{n}" for n in ("44", "65", "87")}

ML_DSA_SCHEMES = ("mldsa44", "mldsa65", "mldsa87")
"""The TLS signature schemes of ML-DSA (draft-ietf-tls-mldsa; OpenSSL 3.5 names)."""


def _scheme_name(
    ssl: int,
    named: Callable[..., Any] | None,
    type_nid: Callable[..., Any],
    hash_ctrl: int,
) -> str | None:
    if named is not None:
        text = c_char_p()
        if named(ssl, ctypes.byref(text)) == 1 and text.value:
            return text.value.decode("ascii", "replace")
    nid = c_int(0)
    if type_nid(ssl, ctypes.byref(nid)) != 1 or nid.value <= 0:
        return None
    hash_nid = c_int(0)
    if SSL_ctrl(ssl, hash_ctrl, 0, ctypes.byref(hash_nid)) != 1:
        hash_nid.value = 0
    known = _SCHEME_BY_NIDS.get((nid.value, hash_nid.value))
    if known is not None:
        return known
    raw = OBJ_nid2sn(nid.value)
    name = raw.decode("ascii", "replace") if raw else f"nid{nid.value}"
    return _SCHEME_BY_KEY_NAME.get(name, name)


def peer_signature_scheme(conn: SslConnection) -> str | None:
    """The scheme the peer signed its CertificateVerify with (None: it sent none, e.g. PSK):
    OpenSSL's IANA name where the library reports it (``SSL_get0_peer_signature_name``, newer
    than 3.5), else derived from the key type and hash it reports (``mldsa65``,
    ``ecdsa_secp256r1_sha256``; ``rsa_pss_sha256`` stands for both RSA-PSS schemes)."""
    return _scheme_name(conn.ptr, SSL_get0_peer_signature_name,
                        SSL_get_peer_signature_type_nid, SSL_CTRL_GET_PEER_SIGNATURE_NID)


def own_signature_scheme(conn: SslConnection) -> str | None:
    """The scheme we signed our CertificateVerify with, which names the chain we sent."""
    return _scheme_name(conn.ptr, SSL_get0_signature_name,
                        SSL_get_signature_type_nid, SSL_CTRL_GET_SIGNATURE_NID)


@functools.lru_cache(maxsize=8)
def knows_signature_scheme(name: str) -> bool:
    """Whether this libssl can sign and verify TLS handshakes with the scheme ``name``
    (``mldsa65``: OpenSSL 3.5 with its default provider; 3.0 knows no ML-DSA)."""
    ctx = SSL_CTX_new(TLS_method())
    if not ctx:
        drain_errors()
        return False
    try:
        return bool(SSL_CTX_ctrl(ctx, SSL_CTRL_SET_SIGALGS_LIST, 0, name.encode()) == 1)
    finally:
        SSL_CTX_free(ctx)
        drain_errors()


def _private_key_from_der(key_der: bytes) -> int:
    """A new ``EVP_PKEY*`` (the caller frees it) parsed from a DER private key; the copy
    handed to C is wiped. Raises :class:`OpenSSLError` when this library cannot parse it."""
    buf = ctypes.create_string_buffer(key_der, len(key_der))
    ptr = c_void_p(ctypes.addressof(buf))
    pkey = d2i_AutoPrivateKey(None, ctypes.byref(ptr), len(key_der))
    ctypes.memset(buf, 0, len(key_der))
    if not pkey:
        raise _fail("cannot parse private key")
    return int(pkey)


def key_type_name(key_der: bytes | TokenKey) -> str:
    """OpenSSL's name of the key type of a DER private key or a token key (``EC``, ``RSA``,
    ``ED25519``, ``ML-DSA-65``); raises :class:`OpenSSLError` when this library cannot parse
    it."""
    if isinstance(key_der, TokenKey):
        name = EVP_PKEY_get0_type_name(key_der.ptr)
        return name.decode("ascii", "replace") if name else "unknown"
    pkey = _private_key_from_der(key_der)
    try:
        name = EVP_PKEY_get0_type_name(pkey)
        return name.decode("ascii", "replace") if name else "unknown"
    finally:
        EVP_PKEY_free(pkey)


def certificate_key_pair(cert_pem: bytes, key_pem: bytes, what: str
                         ) -> tuple[tuple[bytes, ...], bytearray, str]:
    """Parse a PEM chain (leaf first) and an unencrypted PEM private key with OpenSSL itself,
    for key types the Python ``cryptography`` package may not know (ML-DSA). Returns the chain
    as DER, the key as PKCS#8 DER (a bytearray the caller may wipe) and the key type name;
    raises :class:`OpenSSLError` (unparsable, no certificate, key not the leaf's). ``what``
    names the material in errors."""
    certs = _pem_objects(cert_pem, PEM_read_bio_X509_AUX, X509_free, f"certificates of {what}")
    if not certs:
        raise OpenSSLError(f"cannot use {what}", ["no PEM certificate in it"])
    pkey = None
    try:
        chain = tuple(x509_to_der(c) for c in certs)
        buf = ctypes.create_string_buffer(key_pem, len(key_pem))
        bio = BIO_new_mem_buf(buf, len(key_pem))
        if not bio:
            raise _fail("BIO_new_mem_buf")
        try:
            ERR_clear_error()
            pkey = PEM_read_bio_PrivateKey(bio, None, _NO_PASSWORD, None)
        finally:
            BIO_free(bio)
            OPENSSL_cleanse(buf, len(key_pem))
        if not pkey:
            raise OpenSSLError(f"cannot use {what}",
                               ["no usable unencrypted PEM private key"] +
                               [e.reason for e in drain_errors()])
        if X509_check_private_key(certs[0], pkey) != 1:
            drain_errors()
            raise OpenSSLError(f"cannot use {what}",
                               ["private key does not match the certificate"])
        type_name = EVP_PKEY_get0_type_name(pkey)
        p8 = EVP_PKEY2PKCS8(pkey)
        if not p8:
            raise _fail(f"cannot encode the private key of {what}")
        try:
            length = i2d_PKCS8_PRIV_KEY_INFO(p8, None)
            if length <= 0:
                raise _fail(f"cannot encode the private key of {what}")
            out = ctypes.create_string_buffer(length)
            ptr = c_void_p(ctypes.addressof(out))
            i2d_PKCS8_PRIV_KEY_INFO(p8, ctypes.byref(ptr))
            key_der = bytearray(out.raw)
            OPENSSL_cleanse(out, length)
        finally:
            PKCS8_PRIV_KEY_INFO_free(p8)
        return chain, key_der, (type_name.decode("ascii", "replace") if type_name else "unknown")
    finally:
        for cert in certs:
            X509_free(cert)
        if pkey:
            EVP_PKEY_free(pkey)


OpenSSL_version = _bind(_crypto, "OpenSSL_version", c_char_p, c_int)


def library_version() -> str:
    """The system library's version line (``OpenSSL 3.5.9 29 Sep 2026``)."""
    text = OpenSSL_version(0)
    return text.decode("ascii", "replace") if text else "OpenSSL (unknown version)"


# --- private keys held by a PKCS#11 token --------------------------------------------------------
# A key in a token never leaves it: OpenSSL gets an EVP_PKEY whose private operations the token
# performs. Two ways exist, chosen at run time by what this libcrypto and the system offer:
# the ``pkcs11`` provider (pkcs11-provider; OpenSSL >= 3.2 for OSSL_PROVIDER_try_load_ex, which
# passes the module path) through OSSL_STORE, else the ``pkcs11`` ENGINE (libp11's
# libengine-pkcs11-openssl; OpenSSL 3.0 still has ENGINEs) through ENGINE_load_private_key.
# One PKCS#11 module per process: both load it once and keep it until the process ends.
# Nothing here ever prompts: the PIN is handed over by the caller, or there is none.

OSSL_PARAM_UTF8_STRING = 4
OSSL_STORE_INFO_PUBKEY = 3
OSSL_STORE_INFO_PKEY = 4


class OsslParam(ctypes.Structure):
    _fields_ = [
        ("key", c_char_p),
        ("data_type", c_uint),
        ("data", c_void_p),
        ("data_size", c_size_t),
        ("return_size", c_size_t),
    ]


i2d_PUBKEY = _bind(_crypto, "i2d_PUBKEY", c_int, c_void_p, POINTER(c_void_p))
UI_null = _bind(_crypto, "UI_null", c_void_p)
UI_UTIL_wrap_read_pem_callback = _bind(
    _crypto, "UI_UTIL_wrap_read_pem_callback", c_void_p, PEM_PASSWORD_CB, c_int
)
UI_destroy_method = _bind(_crypto, "UI_destroy_method", None, c_void_p)
OSSL_STORE_open_ex = _bind(
    _crypto, "OSSL_STORE_open_ex", c_void_p,
    c_char_p, c_void_p, c_char_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
)
OSSL_STORE_expect = _bind(_crypto, "OSSL_STORE_expect", c_int, c_void_p, c_int)
OSSL_STORE_load = _bind(_crypto, "OSSL_STORE_load", c_void_p, c_void_p)
OSSL_STORE_eof = _bind(_crypto, "OSSL_STORE_eof", c_int, c_void_p)
OSSL_STORE_error = _bind(_crypto, "OSSL_STORE_error", c_int, c_void_p)
OSSL_STORE_close = _bind(_crypto, "OSSL_STORE_close", c_int, c_void_p)
OSSL_STORE_INFO_get_type = _bind(_crypto, "OSSL_STORE_INFO_get_type", c_int, c_void_p)
OSSL_STORE_INFO_get1_PKEY = _bind(_crypto, "OSSL_STORE_INFO_get1_PKEY", c_void_p, c_void_p)
OSSL_STORE_INFO_get1_PUBKEY = _bind(_crypto, "OSSL_STORE_INFO_get1_PUBKEY", c_void_p, c_void_p)
OSSL_STORE_INFO_free = _bind(_crypto, "OSSL_STORE_INFO_free", None, c_void_p)
OSSL_PROVIDER_try_load_ex = _bind_optional(
    _crypto, "OSSL_PROVIDER_try_load_ex", c_void_p, c_void_p, c_char_p, POINTER(OsslParam), c_int
)
ENGINE_by_id = _bind_optional(_crypto, "ENGINE_by_id", c_void_p, c_char_p)
ENGINE_ctrl_cmd_string = _bind_optional(
    _crypto, "ENGINE_ctrl_cmd_string", c_int, c_void_p, c_char_p, c_char_p, c_int
)
ENGINE_init = _bind_optional(_crypto, "ENGINE_init", c_int, c_void_p)
ENGINE_free = _bind_optional(_crypto, "ENGINE_free", c_int, c_void_p)
ENGINE_load_private_key = _bind_optional(
    _crypto, "ENGINE_load_private_key", c_void_p, c_void_p, c_char_p, c_void_p, c_void_p
)


class TokenKeyError(Exception):
    """A token key could not be loaded. ``kind`` says why, for the caller's message and status:
    ``unsupported`` (no PKCS#11 support in OpenSSL), ``module`` (the module cannot be loaded),
    ``pin`` (the token refused the PIN), ``not_found`` (no such private key), ``other``.
    ``reasons`` are OpenSSL's (and the token's) own error strings; never the PIN."""

    def __init__(self, kind: str, what: str, reasons: list[str]) -> None:
        self.kind = kind
        self.reasons = reasons
        detail = "; ".join(dict.fromkeys(reasons)) if reasons else "no detail from OpenSSL"
        super().__init__(f"{what}: {detail}")


class TokenKey:
    """An owned ``EVP_PKEY*`` whose private half stays in a PKCS#11 token.

    Compared by identity: a key loaded again (after a reload) is another key, so whatever was
    built from the old one (an ``SSL_CTX``) is not taken for the new one. ``SSL_CTX``s take
    their own reference, so :meth:`free` while they live is safe.
    """

    def __init__(self, pkey: int, backend: str) -> None:
        self._ptr: int | None = pkey
        self.backend = backend  # "provider" or "engine"

    @property
    def ptr(self) -> int:
        if self._ptr is None:
            raise ValueError("token key already freed")
        return self._ptr

    def public_key_der(self) -> bytes:
        """The key's SubjectPublicKeyInfo, DER (to check it against the certificate)."""
        out = c_void_p()
        length = i2d_PUBKEY(self.ptr, ctypes.byref(out))
        if length <= 0 or not out.value:
            raise _fail("cannot encode the token key's public key")
        try:
            return ctypes.string_at(out.value, length)
        finally:
            CRYPTO_free(out, None, 0)

    def free(self) -> None:
        if self._ptr is not None:
            EVP_PKEY_free(self._ptr)
            self._ptr = None

    def __del__(self) -> None:
        self.free()

    def __repr__(self) -> str:
        return f"<TokenKey via pkcs11 {self.backend}>"


_token_lock = threading.Lock()
_token_backend: tuple[str, int, str | None] | None = None  # (kind, provider/engine, module)


def _pin_cb(buf: int | None, size: int, _rwflag: int, u: int | None) -> int:
    """Hands the caller's PIN (``u``: a NUL-terminated buffer the loader owns) to the token;
    no PIN: -1, never a prompt."""
    if not u or not buf:
        return -1
    pin = ctypes.string_at(u)
    if not pin or len(pin) > size:
        return -1
    ctypes.memmove(buf, pin, len(pin))
    return len(pin)


_PIN_CB = PEM_PASSWORD_CB(_pin_cb)


def _token_errors() -> list[str]:
    return [e.reason for e in drain_errors()]


def _load_pkcs11_provider(module: str | None) -> int | None:
    """The ``pkcs11`` provider in the default library context, next to the default provider
    (``retain_fallbacks``), with ``module`` as its PKCS#11 module; None when it cannot load."""
    if OSSL_PROVIDER_try_load_ex is None:
        return None
    params = (OsslParam * 2)()
    keep: list[object] = []
    if module:
        value = ctypes.create_string_buffer(module.encode())
        keep.append(value)
        params[0] = OsslParam(b"pkcs11-module-path", OSSL_PARAM_UTF8_STRING,
                              ctypes.addressof(value), len(module.encode()), 0)
    ERR_clear_error()
    prov = OSSL_PROVIDER_try_load_ex(None, b"pkcs11", params, 1)
    drain_errors()
    return int(prov) if prov else None


def _load_pkcs11_engine(module: str | None) -> int:
    if (ENGINE_by_id is None or ENGINE_ctrl_cmd_string is None or ENGINE_init is None
            or ENGINE_free is None):
        raise TokenKeyError(
            "unsupported", "no PKCS#11 support in this OpenSSL",
            ["neither the pkcs11 provider (OpenSSL >= 3.2) nor ENGINEs are available"],
        )
    ERR_clear_error()
    engine = ENGINE_by_id(b"pkcs11")
    if not engine:
        drain_errors()
        raise TokenKeyError(
            "unsupported", "no PKCS#11 support in this OpenSSL",
            ["install pkcs11-provider (OpenSSL >= 3.2) or libengine-pkcs11-openssl"],
        )
    ENGINE_ctrl_cmd_string(engine, b"QUIET", None, 0)  # libp11 prints to stderr otherwise
    if module and not ENGINE_ctrl_cmd_string(engine, b"MODULE_PATH", module.encode(), 0):
        reasons = _token_errors()
        ENGINE_free(engine)
        raise TokenKeyError("module", f"cannot use PKCS#11 module {module}", reasons)
    if not ENGINE_init(engine):
        reasons = _token_errors()
        ENGINE_free(engine)
        raise TokenKeyError(
            "module", f"cannot load PKCS#11 module {module or '(p11-kit proxy)'}", reasons
        )
    drain_errors()
    return int(engine)  # kept (with its functional reference) until the process ends


def _token_backend_for(module: str | None) -> tuple[str, int]:
    """The provider or engine for ``module``, loaded once per process (caller holds the
    lock). Another module later is refused: a module stays loaded while keys from it live."""
    global _token_backend
    if _token_backend is not None:
        kind, handle, loaded = _token_backend
        if loaded != module:
            raise TokenKeyError(
                "module", f"PKCS#11 module {module or '(p11-kit proxy)'} requested",
                [f"this process already uses {loaded or '(p11-kit proxy)'}; restart to change it"],
            )
        return kind, handle
    provider = _load_pkcs11_provider(module)
    if provider is not None:
        _token_backend = ("provider", provider, module)
    else:
        _token_backend = ("engine", _load_pkcs11_engine(module), module)
    return _token_backend[0], _token_backend[1]


def pkcs11_backend() -> str | None:
    """Which PKCS#11 route this process uses ("provider" or "engine"), once one is loaded."""
    with _token_lock:
        return None if _token_backend is None else _token_backend[0]


def _classify(reasons: list[str]) -> str:
    text = " ".join(reasons).lower()
    if "load pkcs#11 module" in text or "module not found" in text:
        return "module"
    if "pin" in text and any(w in text for w in ("incorrect", "invalid", "locked", "len")):
        return "pin"
    if "not found" in text or "no key" in text or "could not find" in text:
        return "not_found"
    return "other"


def load_token_key(uri: str, pin: bytes | None, module: str | None) -> TokenKey:
    """The private key a ``pkcs11:`` URI names (without any PIN attribute: the PIN is
    ``pin``), through the provider or the engine for ``module`` (None: the library's
    default, p11-kit's proxy). Blocks (token I/O); raises :class:`TokenKeyError`."""
    # The PIN sits in a buffer we own and wipe; C reads it through the callback or the ctrl.
    pin_buf = ctypes.create_string_buffer(pin or b"", len(pin or b"") + 1)
    try:
        with _token_lock:
            kind, handle = _token_backend_for(module)
            if kind == "provider":
                pkey = _store_load(uri, pin_buf if pin else None)
            else:
                pkey = _engine_load(handle, uri, pin_buf if pin else None)
        return TokenKey(pkey, kind)
    finally:
        ctypes.memset(pin_buf, 0, len(pin_buf))


def _store_first(uri: str, expect: int, ui: int | None, ui_data: int | None) -> int:
    """The first object of type ``expect`` that OSSL_STORE finds at ``uri`` (a new
    ``EVP_PKEY*`` for PKEY/PUBKEY), or 0."""
    store = OSSL_STORE_open_ex(uri.encode(), None, None, ui, ui_data, None, None, None)
    if not store:
        return 0
    found = 0
    try:
        OSSL_STORE_expect(store, expect)
        while not found and not OSSL_STORE_eof(store):
            info = OSSL_STORE_load(store)
            if not info:
                if OSSL_STORE_error(store):
                    break
                continue
            try:
                if OSSL_STORE_INFO_get_type(info) == expect:
                    found = (OSSL_STORE_INFO_get1_PKEY(info) if expect == OSSL_STORE_INFO_PKEY
                             else OSSL_STORE_INFO_get1_PUBKEY(info)) or 0
            finally:
                OSSL_STORE_INFO_free(info)
    finally:
        OSSL_STORE_close(store)
    return int(found)


def _public_twin(uri: str) -> str:
    """``uri`` naming the public key of the same object (``type=public``)."""
    path, sep, query = uri[len("pkcs11:"):].partition("?")
    attrs = [a for a in path.split(";") if a and not a.lower().startswith("type=")]
    return "pkcs11:" + ";".join([*attrs, "type=public"]) + sep + query


def _store_load(uri: str, pin_buf: ctypes.Array[ctypes.c_char] | None) -> int:
    ui = UI_UTIL_wrap_read_pem_callback(_PIN_CB, 0)
    if not ui:
        raise TokenKeyError("other", "UI_UTIL_wrap_read_pem_callback", _token_errors())
    ERR_clear_error()
    try:
        pkey = _store_first(uri, OSSL_STORE_INFO_PKEY, ui,
                            ctypes.addressof(pin_buf) if pin_buf else None)
        reasons = _token_errors()
        if pkey:
            return pkey
        kind = _classify(reasons)
        if kind == "other" or not reasons:
            kind = "not_found"
            # OSSL_STORE drops the provider's login errors: a refused PIN looks like a missing
            # key. The public half is visible without a login; if it is there, the private
            # key was hidden by a failed login.
            if pin_buf is not None:
                twin = _store_first(_public_twin(uri), OSSL_STORE_INFO_PUBKEY, None, None)
                drain_errors()
                if twin:
                    EVP_PKEY_free(twin)
                    kind = "pin"
                    reasons = ["no private key after logging in, but its public key is there"]
        raise TokenKeyError(kind, "no private key loaded", reasons or ["no such private key"])
    finally:
        UI_destroy_method(ui)


def _engine_load(engine: int, uri: str, pin_buf: ctypes.Array[ctypes.c_char] | None) -> int:
    assert ENGINE_ctrl_cmd_string is not None and ENGINE_load_private_key is not None
    ERR_clear_error()
    # libp11 keeps one PIN per engine (for logging in again later): set this key's.
    if pin_buf is not None and not ENGINE_ctrl_cmd_string(engine, b"PIN", pin_buf, 0):
        raise TokenKeyError("other", "cannot hand the PIN to the pkcs11 engine", _token_errors())
    # UI_null: the engine must never prompt on a terminal for a PIN it was not given.
    pkey = ENGINE_load_private_key(engine, uri.encode(), UI_null(), None)
    reasons = _token_errors()
    if not pkey:
        kind = _classify(reasons)
        raise TokenKeyError(kind, "no private key loaded", reasons or ["no such private key"])
    return int(pkey)
