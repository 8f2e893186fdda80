"""The kernel TLS edge: ``include/uapi/linux/tls.h`` spelled in Python, plus thin socket calls.

Everything the kernel needs to take over a TLS 1.3 connection is one ``setsockopt`` per
direction carrying a ``struct tls12_crypto_info_*``; everything it reports back comes from
``getsockopt``, a control message on ``recvmsg`` and ``/proc/net/tls_stat``. This module builds
and parses those byte layouts (pure, testable anywhere) and wraps the few socket calls so that
every failure becomes one clear line instead of a bare errno.

The structures, as the uapi header lays them out (no padding: every member after the two
``__u16`` is an ``unsigned char`` array)::

    struct tls_crypto_info { __u16 version; __u16 cipher_type; };      /* host byte order */
    struct tls12_crypto_info_aes_gcm_128 {      /* 40 bytes */
        struct tls_crypto_info info; iv[8]; key[16]; salt[4]; rec_seq[8]; };
    struct tls12_crypto_info_aes_gcm_256 {      /* 56 bytes */
        struct tls_crypto_info info; iv[8]; key[32]; salt[4]; rec_seq[8]; };
    struct tls12_crypto_info_chacha20_poly1305 { /* 56 bytes */
        struct tls_crypto_info info; iv[12]; key[32]; salt[0]; rec_seq[8]; };

For TLS 1.3 AES-GCM the 12-byte write IV is split: ``salt`` = its first 4 bytes, ``iv`` = its
last 8. ChaCha20-Poly1305 takes the whole write IV in ``iv``. ``rec_seq`` is the big-endian
number of the next record.

The peer's RFC 8449 record size limit goes to the kernel as ``TLS_TX_MAX_PAYLOAD_LEN``
(``setsockopt(SOL_TLS, 5, __u16)``, Linux >= 6.19): the most plaintext per transmitted record,
not counting TLS 1.3's content type byte, so the value is the peer's limit minus one
(64..16384; 63 is also taken once TLS 1.3 TX keys are installed, which is why ktlsd sets it
after ``TLS_TX``). ``getsockopt`` reads back what was set (16384 by default); older kernels
answer ``ENOPROTOOPT`` to both (:func:`apply_record_size_limit`).

Key material handling: derived keys are copied into a ``bytearray`` that is overwritten with
zeros right after the ``setsockopt``. Python's immutable ``bytes`` (the HKDF output) cannot be
wiped; the copies are dropped as soon as possible, which is as far as Python allows.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

from ktlsd.tls.keyschedule import traffic_keys
from ktlsd.tls.protocol import MAX_PLAINTEXT, ContentType, ProtocolVersion
from ktlsd.tls.session import CipherSuite, Session

__all__ = [
    "SOL_TLS",
    "TCP_ULP",
    "TLS_1_3_VERSION",
    "TLS_GET_RECORD_TYPE",
    "TLS_RX",
    "TLS_RX_EXPECT_NO_PAD",
    "TLS_SET_RECORD_TYPE",
    "TLS_TX",
    "TLS_TX_MAX_PAYLOAD_LEN",
    "TLS_TX_ZEROCOPY_RO",
    "CryptoInfo",
    "KtlsError",
    "KtlsSupport",
    "apply_record_size_limit",
    "attach_ulp",
    "crypto_info",
    "crypto_info_size",
    "install_rx_key",
    "install_tx_key",
    "parse_crypto_info",
    "probe",
    "read_key_state",
    "read_tls_stat",
    "read_tx_max_payload",
    "recv_record",
    "send_record",
    "send_record_some",
    "set_tx_max_payload",
]

log = logging.getLogger(__name__)

# --- include/uapi/linux/tls.h and friends -------------------------------------------------
SOL_TLS = 282
TCP_ULP = 31  # include/uapi/linux/tcp.h

TLS_TX = 1
TLS_RX = 2
TLS_TX_ZEROCOPY_RO = 3
TLS_RX_EXPECT_NO_PAD = 4
TLS_TX_MAX_PAYLOAD_LEN = 5

TLS_SET_RECORD_TYPE = 1
TLS_GET_RECORD_TYPE = 2

TLS_1_3_VERSION = int(ProtocolVersion.TLS_1_3)  # uapi: TLS_VERSION_NUMBER(TLS_1_3)

TLS_CIPHER_AES_GCM_128 = 51
TLS_CIPHER_AES_GCM_256 = 52
TLS_CIPHER_CHACHA20_POLY1305 = 54

_HEADER = struct.Struct("=HH")  # struct tls_crypto_info, host byte order


@dataclass(frozen=True)
class _Layout:
    iv_size: int
    key_size: int
    salt_size: int
    rec_seq_size: int = 8

    @property
    def size(self) -> int:
        return _HEADER.size + self.iv_size + self.key_size + self.salt_size + self.rec_seq_size


_LAYOUTS: dict[int, _Layout] = {
    TLS_CIPHER_AES_GCM_128: _Layout(iv_size=8, key_size=16, salt_size=4),
    TLS_CIPHER_AES_GCM_256: _Layout(iv_size=8, key_size=32, salt_size=4),
    TLS_CIPHER_CHACHA20_POLY1305: _Layout(iv_size=12, key_size=32, salt_size=0),
}

_MAX_CRYPTO_INFO = max(layout.size for layout in _LAYOUTS.values())

_DIRECTION_NAMES = {TLS_TX: "TLS_TX", TLS_RX: "TLS_RX"}


class KtlsError(OSError):
    """A kTLS operation failed; ``errno`` is the kernel's, ``str()`` is one explanatory line."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, " ".join(message.split()))

    def __str__(self) -> str:
        return f"{self.strerror} [{errno.errorcode.get(self.errno or 0, self.errno)}]"


def crypto_info_size(cipher_type: int) -> int:
    """``sizeof(struct tls12_crypto_info_*)`` for a ``TLS_CIPHER_*`` number."""
    try:
        return _LAYOUTS[cipher_type].size
    except KeyError:
        raise ValueError(f"unsupported kTLS cipher type {cipher_type}") from None


def crypto_info(suite: CipherSuite, key: bytes, iv: bytes, rec_seq: int) -> bytearray:
    """Build the ``struct tls12_crypto_info_*`` for ``suite`` (TLS 1.3).

    ``iv`` is the full 12-byte TLS 1.3 write IV; ``rec_seq`` is the number of the next record.
    Returns a ``bytearray`` so the caller can wipe it after handing it to the kernel.
    """
    layout = _LAYOUTS[suite.ktls_cipher_type]
    if len(key) != layout.key_size:
        raise ValueError(f"{suite.iana_name} key must be {layout.key_size} bytes, got {len(key)}")
    if len(iv) != 12:
        raise ValueError(f"TLS 1.3 write IV must be 12 bytes, got {len(iv)}")
    if not 0 <= rec_seq < 2**64:
        raise ValueError(f"record sequence number {rec_seq} outside 0..2^64-1")
    salt, explicit_iv = iv[: layout.salt_size], iv[layout.salt_size :]
    buf = bytearray(layout.size)
    _HEADER.pack_into(buf, 0, TLS_1_3_VERSION, suite.ktls_cipher_type)
    offset = _HEADER.size
    for part in (explicit_iv, key, salt, rec_seq.to_bytes(layout.rec_seq_size, "big")):
        buf[offset : offset + len(part)] = part
        offset += len(part)
    return buf


@dataclass(frozen=True)
class CryptoInfo:
    """A parsed ``struct tls12_crypto_info_*``: what the kernel holds for one direction.

    ``iv`` is reassembled into the 12-byte TLS 1.3 write IV (salt + explicit part) so it
    compares directly with :func:`ktlsd.tls.keyschedule.traffic_keys`. ``key`` and ``iv`` are
    hidden from ``repr``.
    """

    version: int
    cipher_type: int
    key: bytes = field(repr=False)
    iv: bytes = field(repr=False)
    rec_seq: int

    @property
    def suite(self) -> CipherSuite:
        for suite in CipherSuite:
            if suite.ktls_cipher_type == self.cipher_type:
                return suite
        raise ValueError(f"unsupported kTLS cipher type {self.cipher_type}")


def parse_crypto_info(data: bytes) -> CryptoInfo:
    """Parse a ``struct tls12_crypto_info_*`` (as built by :func:`crypto_info` or read back)."""
    data = bytes(data)
    if len(data) < _HEADER.size:
        raise ValueError(f"crypto_info truncated ({len(data)} bytes)")
    version, cipher_type = _HEADER.unpack_from(data, 0)
    layout = _LAYOUTS.get(cipher_type)
    if layout is None:
        raise ValueError(f"unsupported kTLS cipher type {cipher_type}")
    if len(data) != layout.size:
        raise ValueError(
            f"crypto_info for cipher type {cipher_type} must be {layout.size} bytes, "
            f"got {len(data)}"
        )
    offset = _HEADER.size
    explicit_iv = data[offset : offset + layout.iv_size]
    offset += layout.iv_size
    key = data[offset : offset + layout.key_size]
    offset += layout.key_size
    salt = data[offset : offset + layout.salt_size]
    offset += layout.salt_size
    rec_seq = int.from_bytes(data[offset : offset + layout.rec_seq_size], "big")
    return CryptoInfo(
        version=version, cipher_type=cipher_type, key=key, iv=salt + explicit_iv, rec_seq=rec_seq
    )


# --- socket calls ------------------------------------------------------------------------

_NO_KTLS = "kernel has no kTLS (tls module not loaded?)"


def attach_ulp(sock: socket.socket) -> None:
    """Attach the ``tls`` upper-layer protocol to a connected TCP socket."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    except OSError as exc:
        err = exc.errno or errno.EIO
        if err in (errno.ENOENT, errno.ENOPROTOOPT):
            raise KtlsError(err, _NO_KTLS) from None
        if err == errno.EEXIST:
            raise KtlsError(err, "socket already has an upper-layer protocol attached") from None
        if err == errno.ENOTCONN:
            raise KtlsError(err, "kTLS needs a connected TCP socket") from None
        if err == errno.EOPNOTSUPP:
            raise KtlsError(err, "kTLS needs a TCP socket") from None
        raise KtlsError(err, f"cannot attach the tls ULP: {os.strerror(err)}") from None


def _install_key(
    sock: socket.socket, direction: int, suite: CipherSuite, secret: bytes, seq: int
) -> None:
    keys = traffic_keys(suite, secret)
    info = crypto_info(suite, keys.key, keys.iv, seq)
    del keys
    name = _DIRECTION_NAMES[direction]
    try:
        sock.setsockopt(SOL_TLS, direction, info)
    except OSError as exc:
        err = exc.errno or errno.EIO
        if err == errno.EBUSY:
            raise KtlsError(err, "kernel cannot rekey kTLS (needs Linux >= 6.14)") from None
        if err in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            raise KtlsError(
                err, f"cannot set {name}: tls ULP not attached to this socket"
            ) from None
        if err == errno.EINVAL:
            raise KtlsError(
                err,
                f"kernel rejected {name} for {suite.iana_name} (cipher not built in, "
                "or a rekey that changes cipher or version)",
            ) from None
        if err == errno.ENOENT:
            raise KtlsError(err, f"kernel lacks the {suite.iana_name} AEAD for kTLS") from None
        raise KtlsError(err, f"cannot set {name}: {os.strerror(err)}") from None
    finally:
        info[:] = bytes(len(info))


def install_tx_key(sock: socket.socket, suite: CipherSuite, secret: bytes, seq: int = 0) -> None:
    """Derive key/IV from ``secret`` and install them as the kernel's transmit state.

    A second call on the same socket is a rekey (Linux >= 6.14; earlier kernels: EBUSY).
    """
    _install_key(sock, TLS_TX, suite, secret, seq)


def install_rx_key(sock: socket.socket, suite: CipherSuite, secret: bytes, seq: int = 0) -> None:
    """Derive key/IV from ``secret`` and install them as the kernel's receive state."""
    _install_key(sock, TLS_RX, suite, secret, seq)


def send_record(sock: socket.socket, content_type: int, data: bytes) -> None:
    """Send ``data`` as records of ``content_type`` through kTLS.

    Application data goes through a plain ``sendmsg``; every other type carries a
    ``(SOL_TLS, TLS_SET_RECORD_TYPE)`` control message, which makes the kernel close the open
    record and emit one of that type. A partial send (non-blocking socket) is completed with
    further calls, so the bytes arrive in order but may then span records.
    """
    view = memoryview(bytes(data))
    while True:
        view = view[send_record_some(sock, content_type, view) :]
        if not view:
            return


def send_record_some(sock: socket.socket, content_type: int, data: bytes | memoryview) -> int:
    """One ``sendmsg`` of a record of ``content_type``; returns how many bytes were taken.

    The building block of :func:`send_record` and of asyncio senders, which wait for the
    socket to become writable between calls. ``BlockingIOError`` passes through unchanged.
    """
    if not 0 < content_type < 256:
        raise ValueError(f"invalid TLS content type {content_type}")
    ancdata = (
        []
        if content_type == ContentType.APPLICATION_DATA
        else [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes((content_type,)))]
    )
    try:
        return sock.sendmsg([data], ancdata)
    except (BlockingIOError, InterruptedError):
        raise
    except OSError as exc:
        raise _io_error(exc, "send") from None


def recv_record(sock: socket.socket, bufsize: int) -> tuple[int, bytes]:
    """Receive from a kTLS socket: ``(content_type, data)``.

    The kernel labels every non-application-data record with a ``(SOL_TLS,
    TLS_GET_RECORD_TYPE)`` control message and returns it alone; without that message the
    data is application data (type 23), possibly from several records. ``b""`` with type 23
    is TCP end of stream.
    """
    try:
        data, ancdata, flags, _addr = sock.recvmsg(bufsize, socket.CMSG_SPACE(1))
    except (BlockingIOError, InterruptedError):
        raise
    except OSError as exc:
        raise _io_error(exc, "receive") from None
    if flags & socket.MSG_CTRUNC:
        raise KtlsError(errno.EIO, "kTLS record type control message truncated")
    content_type: int = ContentType.APPLICATION_DATA
    for level, kind, value in ancdata:
        if level == SOL_TLS and kind == TLS_GET_RECORD_TYPE and len(value) >= 1:
            content_type = value[0]
    return content_type, data


def _io_error(exc: OSError, action: str) -> OSError:
    err = exc.errno or errno.EIO
    if err == errno.EKEYEXPIRED:
        return KtlsError(err, "peer updated its traffic keys: install the next receive key")
    if err == errno.EBADMSG:
        return KtlsError(err, "TLS record failed authentication or is malformed")
    if err == errno.EMSGSIZE:
        return KtlsError(err, "TLS record too large (record_overflow)")
    if err in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
        return exc  # keep the familiar ConnectionError subclasses
    return KtlsError(err, f"kTLS {action} failed: {os.strerror(err)}")


def read_key_state(sock: socket.socket, direction: int) -> CryptoInfo:
    """Read back the kernel's state for ``TLS_TX``/``TLS_RX``: key, IV and next ``rec_seq``."""
    name = _DIRECTION_NAMES.get(direction)
    if name is None:
        raise ValueError(f"direction must be TLS_TX ({TLS_TX}) or TLS_RX ({TLS_RX})")
    try:
        raw = sock.getsockopt(SOL_TLS, direction, _MAX_CRYPTO_INFO)
    except OSError as exc:
        err = exc.errno or errno.EIO
        if err in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            raise KtlsError(err, f"cannot read {name}: tls ULP not attached") from None
        if err == errno.EBUSY:
            raise KtlsError(err, f"cannot read {name}: no key installed yet") from None
        raise KtlsError(err, f"cannot read {name}: {os.strerror(err)}") from None
    return parse_crypto_info(raw)


TLS_STAT_PATH = "/proc/net/tls_stat"


def read_tls_stat(path: str = TLS_STAT_PATH) -> dict[str, int]:
    """The kTLS counters of this network namespace (``TlsTxRekeyOk``, ``TlsDecryptError``...)."""
    try:
        with open(path, encoding="ascii") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise KtlsError(errno.ENOENT, f"no {path}: {_NO_KTLS}") from None
    stats: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            stats[parts[0]] = int(parts[1])
    return stats


@dataclass(frozen=True)
class KtlsSupport:
    """What :func:`probe` found. ``reasons`` maps each missing feature to one line.

    Features: ``ulp`` (the tls ULP attaches and TX/RX keys install: kTLS usable at all),
    ``rekey`` (a second TLS_TX is accepted: KeyUpdate with kTLS, Linux >= 6.14) and
    ``tls_stat`` (``/proc/net/tls_stat`` readable).
    """

    ulp: bool
    rekey: bool
    tls_stat: bool
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return self.ulp

    @property
    def reason(self) -> str:
        """All missing features in one line (empty when everything works)."""
        return "; ".join(f"{name}: {why}" for name, why in self.reasons.items())


def _loopback_pair() -> tuple[socket.socket, socket.socket]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname(), timeout=5)
        try:
            server, _ = listener.accept()
        except OSError:
            client.close()
            raise
    return client, server


def probe() -> KtlsSupport:
    """Find out, on a throwaway loopback TCP pair, what kTLS this kernel offers.

    Uses a random throwaway AES-128-GCM secret; nothing is sent over the pair.
    """
    reasons: dict[str, str] = {}
    ulp = rekey = False
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    pair: tuple[socket.socket, socket.socket] | None
    try:
        pair = _loopback_pair()
    except OSError as exc:
        reasons["ulp"] = f"cannot open a loopback TCP pair: {os.strerror(exc.errno or 0)}"
        pair = None
    if pair is not None:
        client, server = pair
        with client, server:
            try:
                attach_ulp(client)
                install_tx_key(client, suite, os.urandom(32))
                install_rx_key(client, suite, os.urandom(32))
                ulp = True
            except (KtlsError, ValueError) as exc:
                reasons["ulp"] = str(exc)
            if ulp:
                try:
                    install_tx_key(client, suite, os.urandom(32))
                    rekey = True
                except KtlsError as exc:
                    reasons["rekey"] = str(exc)
            else:
                reasons["rekey"] = "no kTLS"
    tls_stat = False
    try:
        read_tls_stat()
        tls_stat = True
    except OSError as exc:
        reasons["tls_stat"] = str(exc)
    return KtlsSupport(ulp=ulp, rekey=rekey, tls_stat=tls_stat, reasons=reasons)


_probe_cache: KtlsSupport | None = None


def cached_probe(refresh: bool = False) -> KtlsSupport:
    """:func:`probe` once per process (the kernel's kTLS support does not change under us,
    except when the tls module is loaded later: pass ``refresh=True`` then)."""
    global _probe_cache
    if _probe_cache is None or refresh:
        _probe_cache = probe()
    return _probe_cache


def set_tx_max_payload(sock: socket.socket, size: int) -> None:
    """Cap the plaintext per transmitted record (RFC 8449 record_size_limit - 1 for TLS 1.3).

    ``TLS_TX_MAX_PAYLOAD_LEN`` (Linux >= 6.19): a ``__u16``, 64..2^14 (63..2^14 once TX
    carries TLS 1.3 keys: the content type byte is not counted). Kernels without it answer
    ``ENOPROTOOPT``, kept as the error's ``errno``.
    """
    try:
        sock.setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, struct.pack("=H", size))
    except OSError as exc:
        err = exc.errno or errno.EIO
        raise KtlsError(err, f"cannot set TLS_TX_MAX_PAYLOAD_LEN: {os.strerror(err)}") from None


def read_tx_max_payload(sock: socket.socket) -> int:
    """The kernel's current plaintext cap per transmitted record (2^14 unless set)."""
    try:
        raw = sock.getsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, 2)
    except OSError as exc:
        err = exc.errno or errno.EIO
        raise KtlsError(err, f"cannot read TLS_TX_MAX_PAYLOAD_LEN: {os.strerror(err)}") from None
    value: int = struct.unpack("=H", raw[:2])[0]
    return value


_cap_missing_logged = False


def apply_record_size_limit(sock: socket.socket, session: Session) -> bool:
    """Make kTLS TX honour the peer's RFC 8449 ``record_size_limit`` (call after TX keys).

    Returns True when the records the kernel sends respect the peer's limit: nothing to do
    (the peer advertised none, or one of 2^14+1), or ``TLS_TX_MAX_PAYLOAD_LEN`` set to
    :attr:`Session.max_send_fragment`. Returns False when the kernel has no such option
    (< 6.19; logged once per process): the caller decides (the user's record layer cuts its
    writes to size instead; the agent fails the handshake, see ``ktlsd.agent``). Other
    errors raise :class:`KtlsError`.
    """
    global _cap_missing_logged
    size = session.max_send_fragment
    if session.peer_record_size_limit is None or size >= MAX_PLAINTEXT:
        return True
    try:
        set_tx_max_payload(sock, size)
    except KtlsError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            raise
        if not _cap_missing_logged:
            _cap_missing_logged = True
            log.warning(
                "kernel has no TLS_TX_MAX_PAYLOAD_LEN (Linux >= 6.19): kTLS cannot cap its "
                "records at a peer's record_size_limit"
            )
        return False
    return True
