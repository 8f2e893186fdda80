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
# at the first bytes and keeps these two lines unparsed: they are parsed once, at the end.
TRAFFIC_SECRET_LABELS = (b"CLIENT_TRAFFIC_SECRET_0", b"SERVER_TRAFFIC_SECRET_0")
_TRAFFIC_SECRET_PREFIXES = tuple(label + b" " for label in TRAFFIC_SECRET_LABELS)


def _keylog_cb(ssl: int | None, line: bytes | None) -> None:
    if line and line.startswith(_TRAFFIC_SECRET_PREFIXES):
        conn = _lookup(ssl)
        if conn is not None:
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

    def use_certificate_chain(self, chain_der: tuple[bytes, ...], key_der: bytes) -> None:
        """Install our certificate (leaf first, then intermediates) and its private key."""
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
        buf = ctypes.create_string_buffer(key_der, len(key_der))
        ptr = c_void_p(ctypes.addressof(buf))
        pkey = d2i_AutoPrivateKey(None, ctypes.byref(ptr), len(key_der))
        ctypes.memset(buf, 0, len(key_der))
        if not pkey:
            raise _fail("cannot parse private key")
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
        # Keylog lines of the two application traffic secrets (see traffic_secrets).
        self.secret_lines: list[bytes] = []
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
