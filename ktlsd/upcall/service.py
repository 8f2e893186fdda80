"""The user-space handshake service: the kernel's handshake upcall, offered to programs.

In-kernel consumers (NVMe/TCP, NFS) ask for a TLS handshake through the ``handshake``
generic netlink family; this module gives user-space programs the same mechanism over a
local socket, so that one agent (:mod:`ktlsd.agent`) serves both the same way. It is an
:class:`~ktlsd.request.UpcallSource`: the agent iterates :meth:`HandshakeService.requests`
and answers each :class:`ServiceRequest` with ``done()``, exactly as for the kernel.

Wire protocol
=============

Transport: an ``AF_UNIX`` ``SOCK_SEQPACKET`` socket (default :data:`DEFAULT_SERVICE_PATH`,
mode 0660). **One connection carries one request**: the consumer connects, sends one
SUBMIT message with its connected TCP socket attached as ``SCM_RIGHTS``, and receives one
DONE message; then the service closes the connection. Closing the connection before DONE
cancels the request (like a kernel consumer cancelling its handshake). Any further message
from the consumer after SUBMIT is a protocol violation and also cancels the request.

Every message is framed like a generic netlink message, so the kernel path's codecs
(:mod:`ktlsd.upcall.nlattr`, :mod:`ktlsd.upcall.netlink`) parse its attributes::

    nlmsghdr   { u32 len = whole message; u16 type = 0x4b54 ("KT"); u16 flags = 0;
                 u32 seq (echoed in DONE); u32 pid = 0 }
    genlmsghdr { u8 cmd (SUBMIT = 2, DONE = 3); u8 version = 1; u16 reserved = 0 }
    attributes (struct nlattr, host byte order, 4-byte aligned)

``nlmsg_len`` must equal the message length; a message may not exceed
:data:`MAX_MESSAGE_SIZE` (64 KiB).

SUBMIT (consumer → service) carries the attributes of the kernel's ACCEPT reply
(:class:`~ktlsd.upcall.netlink.AcceptAttr`: message-type, timeout, auth-mode, peer-identity,
certificate (nested cert/privkey serials), peername, keyring, key-update-request,
session-id) **except sockfd**: the socket travels as the single ``SCM_RIGHTS`` descriptor and
a SUBMIT that names a sockfd is rejected. Extension attributes (:class:`SubmitAttr`,
numbers >= 100) carry the :class:`~ktlsd.request.InlineMaterial`:

=====  =====================  ==========================================================
100    INLINE_PSK (nested,    1 identity (bytes), 2 key (bytes), 3 hash (string,
       repeated)              "sha256" or "sha384")
101    CERTIFICATE_DER        one certificate (DER), repeated, leaf first
102    PRIVATE_KEY_DER        private key (DER)
103    CERTIFICATE_FILE       PEM file the agent reads (absolute path)
104    PRIVATE_KEY_FILE       PEM file the agent reads (absolute path)
105    TRUSTSTORE             CA file (absolute path)
106    CRL                    CRL file (absolute path)
107    CIPHERSUITE            IANA suite name, repeated
108    REQUIRE_CLIENT_CERT    u32 0/1
109    REQUEST_PEER_UPDATE    u32 0/1 (KeyUpdate requests: ask the peer to update too)
110    RECORD_SEQS            u64 tx, u64 rx: the consumer's user-space record layer's next
                              record numbers (KeyUpdate requests)
111    FORGET_SESSION         u32 0/1 (with a KeyUpdate message type and session-id: the
                              connection ended, drop the kept session)
=====  =====================  ==========================================================

DONE (service → consumer) carries the kernel's DONE attributes
(:class:`~ktlsd.upcall.netlink.DoneAttr`: status (positive errno, 0 = success), remote-auth
(repeated), session-id (attribute 4 is always session-id here)) plus :class:`DoneExtAttr`:

=====  =====================  ==========================================================
100    REASON                 one-line, secret-free explanation (string)
101    SESSION (nested,       1 role (u32: 0 client, 1 server), 2 suite (u32 IANA code),
       success only)          3 client secret, 4 server secret, 5 tx seq (u64),
                              6 rx seq (u64), 7 client generation (u32),
                              8 server generation (u32), 9 peer PSK identity (bytes),
                              10 peer PSK serial (u32), 11 peer certificate (DER,
                              repeated, leaf first), 12 group (string)
=====  =====================  ==========================================================

The SESSION attribute carries traffic secrets: they are the consumer's own, needed to run
the user-space record layer; the socket mode and the peer-credential log are what keep
other users away from them.

Answers mirror the kernel's ``handshake_req_submit()``, checked in this order:

* ``ESRCH``  — the service is closing, or no agent is consuming requests;
* ``EAGAIN`` — the pending limit is reached (requests submitted but not yet taken by the
  agent; default the kernel's ``clamp(totalram / (25 * mem_unit), 3, 50)``);
* ``EBUSY``  — that socket (same inode) already has a request queued or in flight;
* ``EINVAL`` — a malformed message (truncated, oversized, unknown command, missing or extra
  descriptors, not a connected TCP socket, bad attribute), with a reason;

Notes for the agent
===================

* Take a request from :meth:`HandshakeService.requests` only when you can start it: the
  pending limit counts requests not yet taken, so an agent that takes everything at once
  defeats it (the kernel, likewise, does not limit accepted requests).
* ``request.sockfd`` belongs to the source: do not close it; ``done()`` closes it. Its open
  file description (and so O_NONBLOCK) is shared with the consumer's socket.
* :attr:`ServiceRequest.cancelled` is an :class:`asyncio.Event` set when the consumer goes
  away; await it next to the handshake to abort early. ``done()`` after cancellation only
  releases the descriptor (the kernel likewise ignores DONE for a cancelled request).
* :attr:`ServiceRequest.credentials` holds the consumer's pid/uid/gid (``SO_PEERCRED``):
  key serials and file names come from a possibly unprivileged user and should be checked
  against that uid before a privileged agent uses them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import errno
import logging
import os
import socket
import stat
import struct
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field

from ktlsd.request import (
    AuthMode,
    HandshakeDone,
    HandshakeRequest,
    InlineMaterial,
    InlinePsk,
    MessageType,
)
from ktlsd.tls.session import CipherSuite, PeerIdentity, Role, Session
from ktlsd.upcall.netlink import (
    AcceptAttr,
    DoneAttr,
    DoneAttr4,
    DoneAttributes,
    decode_accept_reply,
    decode_done,
    encode_accept_reply,
    encode_done,
)
from ktlsd.upcall.nlattr import (
    Attribute,
    NetlinkFormatError,
    as_string,
    as_u32,
    decode_attrs,
    decode_genl,
    encode_attr,
    encode_attrs,
    encode_genl,
    s32,
    string,
    u32,
)

log = logging.getLogger("ktlsd.upcall.service")

DEFAULT_SERVICE_PATH = "/run/ktlsd/handshake.sock"
"""Where the agent listens unless configured otherwise (clients: ``$KTLSD_SERVICE_PATH``)."""

SERVICE_MSG_TYPE = 0x4B54  # "KT": marks a ktlsd service message in nlmsghdr.type
SERVICE_VERSION = 1
MAX_MESSAGE_SIZE = 64 * 1024
MAX_INLINE_PSKS = 16
MAX_CERTIFICATES = 10
SUBMIT_WAIT_SECONDS = 10.0
"""How long a freshly connected consumer may take to send SUBMIT before being dropped."""
MAX_CONNECTIONS = 1024
"""Connections the service keeps open at once (waiting, queued or in flight)."""

_SESSION_ATTR_DONE = DoneAttributes(DoneAttr4.SESSION_ID)
_ANCBUF = socket.CMSG_SPACE(8 * 4)  # room to notice (and close) up to 8 passed descriptors


class ServiceCommand(enum.IntEnum):
    SUBMIT = 2  # mirrors ACCEPT: it carries the ACCEPT reply's attributes
    DONE = 3


class SubmitAttr(enum.IntEnum):
    """Service-only SUBMIT attributes (the InlineMaterial)."""

    INLINE_PSK = 100
    CERTIFICATE_DER = 101
    PRIVATE_KEY_DER = 102
    CERTIFICATE_FILE = 103
    PRIVATE_KEY_FILE = 104
    TRUSTSTORE = 105
    CRL = 106
    CIPHERSUITE = 107
    REQUIRE_CLIENT_CERT = 108
    REQUEST_PEER_UPDATE = 109
    RECORD_SEQS = 110
    FORGET_SESSION = 111


class PskAttr(enum.IntEnum):
    IDENTITY = 1
    KEY = 2
    HASH = 3


class DoneExtAttr(enum.IntEnum):
    """Service-only DONE attributes."""

    REASON = 100
    SESSION = 101


class SessionAttr(enum.IntEnum):
    ROLE = 1
    SUITE = 2
    CLIENT_SECRET = 3
    SERVER_SECRET = 4
    TX_SEQ = 5
    RX_SEQ = 6
    CLIENT_GENERATION = 7
    SERVER_GENERATION = 8
    PEER_PSK_IDENTITY = 9
    PEER_PSK_SERIAL = 10
    PEER_CERTIFICATE = 11
    GROUP = 12


class ServiceFormatError(ValueError):
    """A service message that cannot be accepted; ``status`` is the errno to answer with."""

    def __init__(self, reason: str, status: int = errno.EINVAL) -> None:
        super().__init__(reason)
        self.status = status


# --- codec (pure) ------------------------------------------------------------------------


def _u64(value: int) -> bytes:
    return struct.pack("=Q", value)


def _as_u64(payload: bytes, name: str) -> int:
    if len(payload) != 8:
        raise NetlinkFormatError(f"{name}: expected 8 bytes, got {len(payload)}")
    return int(struct.unpack("=Q", payload)[0])


def _frame(cmd: ServiceCommand, attrs: bytes, seq: int) -> bytes:
    return encode_genl(SERVICE_MSG_TYPE, cmd, attrs, seq=seq, version=SERVICE_VERSION)


def _unframe(data: bytes, expected: ServiceCommand) -> tuple[int, bytes]:
    """Check the header strictly; return (seq, attribute bytes)."""
    try:
        msg = decode_genl(data)
    except NetlinkFormatError as exc:
        raise ServiceFormatError(f"bad message header: {exc}") from None
    if msg.msg_type != SERVICE_MSG_TYPE:
        raise ServiceFormatError(f"not a ktlsd service message (type 0x{msg.msg_type:04x})")
    if msg.version != SERVICE_VERSION:
        raise ServiceFormatError(f"unsupported protocol version {msg.version}")
    length = struct.unpack_from("=I", data, 0)[0]
    if length != len(data):
        raise ServiceFormatError(f"message length {length} does not match {len(data)} bytes")
    if msg.cmd != expected:
        raise ServiceFormatError(f"unknown or unexpected command {msg.cmd}")
    return msg.seq, msg.attrs


def encode_submit(request: HandshakeRequest, *, seq: int = 0) -> bytes:
    """Encode a SUBMIT message for ``request`` (its ``sockfd`` is not sent: SCM_RIGHTS is)."""
    kernel_attrs = encode_accept_reply(request)
    # The service never carries SOCKFD (the descriptor itself is passed); the kernel's
    # encoding leads with it, as one 8-byte attribute.
    length, first = struct.unpack_from("=HH", kernel_attrs, 0)
    if length != 8 or first != AcceptAttr.SOCKFD:
        raise AssertionError("encode_accept_reply no longer leads with SOCKFD")
    attrs = kernel_attrs[8:] + _encode_inline(request.inline)
    extra: list[Attribute] = []
    if request.request_peer_update:
        extra.append((SubmitAttr.REQUEST_PEER_UPDATE, u32(1)))
    if request.record_seqs is not None:
        tx, rx = request.record_seqs
        extra.append((SubmitAttr.RECORD_SEQS, struct.pack("=QQ", tx, rx)))
    if request.forget_session:
        extra.append((SubmitAttr.FORGET_SESSION, u32(1)))
    attrs += encode_attrs(extra)
    message = _frame(ServiceCommand.SUBMIT, attrs, seq)
    if len(message) > MAX_MESSAGE_SIZE:
        raise ValueError(f"request too large ({len(message)} > {MAX_MESSAGE_SIZE} bytes)")
    return message


def _encode_inline(inline: InlineMaterial | None) -> bytes:
    if inline is None:
        return b""
    out: list[bytes] = []
    for psk in inline.psk_keys:
        inner = encode_attrs(
            [(PskAttr.IDENTITY, psk.identity), (PskAttr.KEY, psk.key),
             (PskAttr.HASH, string(psk.hash_name))]
        )
        out.append(encode_attr(SubmitAttr.INLINE_PSK, inner, nested=True))
    attrs: list[Attribute] = [(SubmitAttr.CERTIFICATE_DER, der) for der in inline.certificate_chain]
    if inline.private_key:
        attrs.append((SubmitAttr.PRIVATE_KEY_DER, inline.private_key))
    for attr, value in (
        (SubmitAttr.CERTIFICATE_FILE, inline.certificate_file),
        (SubmitAttr.PRIVATE_KEY_FILE, inline.private_key_file),
        (SubmitAttr.TRUSTSTORE, inline.truststore),
        (SubmitAttr.CRL, inline.crl),
    ):
        if value:
            attrs.append((attr, string(value)))
    attrs.extend((SubmitAttr.CIPHERSUITE, string(name)) for name in inline.ciphersuites)
    if inline.require_client_cert:
        attrs.append((SubmitAttr.REQUIRE_CLIENT_CERT, u32(1)))
    out.append(encode_attrs(attrs))
    return b"".join(out)


def decode_submit(data: bytes, sockfd: int) -> tuple[int, HandshakeRequest]:
    """Parse a SUBMIT message; ``sockfd`` is the descriptor that came with it.

    Returns (seq, request). Raises :class:`ServiceFormatError` (EINVAL, or EOPNOTSUPP for
    message types the service does not serve) with a one-line reason.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise ServiceFormatError(f"message too large (> {MAX_MESSAGE_SIZE} bytes)")
    seq, attrs = _unframe(data, ServiceCommand.SUBMIT)
    try:
        parsed = decode_attrs(attrs)
        if any(t == AcceptAttr.SOCKFD for t, _ in parsed):
            raise ServiceFormatError("SUBMIT must not carry a sockfd attribute")
        unknown = sorted({t for t, _ in parsed if t > AcceptAttr.SESSION_ID and t < 100})
        unknown += sorted({t for t, _ in parsed if t >= 100 and t not in set(SubmitAttr)})
        if unknown:
            raise ServiceFormatError(f"unknown attribute {unknown[0]}")
        request = decode_accept_reply(encode_attr(AcceptAttr.SOCKFD, s32(sockfd)) + attrs)
        inline = _decode_inline(parsed)
        for attr_type, payload in parsed:
            if attr_type == SubmitAttr.REQUEST_PEER_UPDATE:
                request.request_peer_update = as_u32(payload, "request-peer-update") != 0
            elif attr_type == SubmitAttr.RECORD_SEQS:
                if len(payload) != 16:
                    raise NetlinkFormatError(f"record-seqs: expected 16 bytes, got {len(payload)}")
                tx, rx = struct.unpack("=QQ", payload)
                request.record_seqs = (tx, rx)
            elif attr_type == SubmitAttr.FORGET_SESSION:
                request.forget_session = as_u32(payload, "forget-session") != 0
    except NetlinkFormatError as exc:
        raise ServiceFormatError(f"bad attribute: {exc}") from None
    if request.message_type is MessageType.UNSPEC:
        raise ServiceFormatError("SUBMIT without a message type (client or server)")
    if request.message_type.is_key_update:
        if not request.session_id:
            raise ServiceFormatError("key update request without a session-id")
    elif request.auth_mode is AuthMode.UNSPEC:
        raise ServiceFormatError("SUBMIT without an auth mode (unauth, psk or x509)")
    request.inline = inline
    return seq, request


_REQUEST_ATTRS = (SubmitAttr.REQUEST_PEER_UPDATE, SubmitAttr.RECORD_SEQS, SubmitAttr.FORGET_SESSION)


def _decode_inline(parsed: list[Attribute]) -> InlineMaterial | None:
    psks: list[InlinePsk] = []
    chain: list[bytes] = []
    private_key = b""
    files: dict[SubmitAttr, str] = {}
    suites: list[str] = []
    require_client_cert = False
    seen = False
    for attr_type, payload in parsed:
        if attr_type < 100 or attr_type in _REQUEST_ATTRS:
            continue
        seen = True
        kind = SubmitAttr(attr_type)
        if kind is SubmitAttr.INLINE_PSK:
            if len(psks) >= MAX_INLINE_PSKS:
                raise ServiceFormatError(f"more than {MAX_INLINE_PSKS} inline PSKs")
            psks.append(_decode_psk(payload))
        elif kind is SubmitAttr.CERTIFICATE_DER:
            if len(chain) >= MAX_CERTIFICATES:
                raise ServiceFormatError(f"more than {MAX_CERTIFICATES} certificates")
            if not payload:
                raise ServiceFormatError("empty certificate")
            chain.append(payload)
        elif kind is SubmitAttr.PRIVATE_KEY_DER:
            if private_key or not payload:
                raise ServiceFormatError("private key given twice or empty")
            private_key = payload
        elif kind is SubmitAttr.CIPHERSUITE:
            name = as_string(payload, "ciphersuite")
            try:
                suites.append(CipherSuite.from_name(name).iana_name)
            except ValueError as exc:
                raise ServiceFormatError(str(exc)) from None
        elif kind is SubmitAttr.REQUIRE_CLIENT_CERT:
            require_client_cert = as_u32(payload, "require-client-cert") != 0
        else:
            if kind in files:
                raise ServiceFormatError(f"{kind.name.lower()} given twice")
            path = as_string(payload, kind.name.lower())
            if not os.path.isabs(path):
                raise ServiceFormatError(f"{kind.name.lower()} must be an absolute path")
            files[kind] = path
    if not seen:
        return None
    return InlineMaterial(
        psk_keys=tuple(psks),
        certificate_chain=tuple(chain),
        private_key=private_key,
        certificate_file=files.get(SubmitAttr.CERTIFICATE_FILE),
        private_key_file=files.get(SubmitAttr.PRIVATE_KEY_FILE),
        truststore=files.get(SubmitAttr.TRUSTSTORE),
        crl=files.get(SubmitAttr.CRL),
        ciphersuites=tuple(suites),
        require_client_cert=require_client_cert,
    )


def _decode_psk(payload: bytes) -> InlinePsk:
    identity: bytes | None = None
    key: bytes | None = None
    hash_name = "sha256"
    for sub_type, sub in decode_attrs(payload):
        if sub_type == PskAttr.IDENTITY:
            identity = sub
        elif sub_type == PskAttr.KEY:
            key = sub
        elif sub_type == PskAttr.HASH:
            hash_name = as_string(sub, "psk hash")
        else:
            raise ServiceFormatError(f"unknown inline PSK attribute {sub_type}")
    if not identity or not key:
        raise ServiceFormatError("inline PSK without identity or key")
    if hash_name not in ("sha256", "sha384"):
        raise ServiceFormatError(f"inline PSK hash must be sha256 or sha384, not {hash_name!r}")
    return InlinePsk(identity=identity, key=key, hash_name=hash_name)


def encode_done_message(done: HandshakeDone, *, seq: int = 0) -> bytes:
    """Encode a DONE message; the session is sent only on success.

    If the peer's certificate chain would push the message past :data:`MAX_MESSAGE_SIZE`,
    certificates are dropped from the end of the chain (the leaf is kept whenever it fits).
    """
    kernel = encode_done(
        HandshakeDone(status=done.status, sockfd=-1, remote_auth=done.remote_auth,
                      session_id=done.session_id),
        _SESSION_ATTR_DONE,
    )
    # The kernel DONE always carries SOCKFD; the consumer has no use for the agent's fd number.
    kernel = encode_attrs(
        (t, p) for t, p in decode_attrs(kernel) if t != DoneAttr.SOCKFD
    )
    reason = " ".join(done.reason.split())[:1024]
    tail = encode_attr(DoneExtAttr.REASON, string(reason)) if reason else b""
    head = kernel + tail
    if done.status == 0 and done.session is not None:
        chain = list(done.session.peer.certificate_chain)
        overhead = 16 + 4 + len(head) + 4  # nlmsghdr, genlmsghdr, head, SESSION header
        inner = _encode_session(done.session, chain)
        while chain and overhead + len(inner) > MAX_MESSAGE_SIZE:
            chain.pop()
            inner = _encode_session(done.session, chain)
        if overhead + len(inner) > MAX_MESSAGE_SIZE:
            raise ValueError("DONE message too large")
        session = encode_attr(DoneExtAttr.SESSION, inner, nested=True)
        message = _frame(ServiceCommand.DONE, head + session, seq)
    else:
        message = _frame(ServiceCommand.DONE, head, seq)
    if len(message) > MAX_MESSAGE_SIZE:
        raise ValueError("DONE message too large")
    return message


def _encode_session(session: Session, chain: Iterable[bytes]) -> bytes:
    attrs: list[Attribute] = [
        (SessionAttr.ROLE, u32(0 if session.role is Role.CLIENT else 1)),
        (SessionAttr.SUITE, u32(session.suite.code)),
        (SessionAttr.CLIENT_SECRET, session.client_secret),
        (SessionAttr.SERVER_SECRET, session.server_secret),
        (SessionAttr.TX_SEQ, _u64(session.tx_seq)),
        (SessionAttr.RX_SEQ, _u64(session.rx_seq)),
        (SessionAttr.CLIENT_GENERATION, u32(session.client_generation)),
        (SessionAttr.SERVER_GENERATION, u32(session.server_generation)),
    ]
    peer = session.peer
    if peer.psk_identity is not None:
        attrs.append((SessionAttr.PEER_PSK_IDENTITY, peer.psk_identity))
    if peer.psk_serial is not None:
        attrs.append((SessionAttr.PEER_PSK_SERIAL, u32(peer.psk_serial)))
    attrs.extend((SessionAttr.PEER_CERTIFICATE, der) for der in chain)
    if session.group:
        attrs.append((SessionAttr.GROUP, string(session.group)))
    return encode_attrs(attrs)


def decode_done_message(data: bytes) -> tuple[int, HandshakeDone]:
    """Parse a DONE message into (seq, HandshakeDone); raises :class:`ServiceFormatError`."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise ServiceFormatError(f"message too large (> {MAX_MESSAGE_SIZE} bytes)")
    seq, attrs = _unframe(data, ServiceCommand.DONE)
    try:
        done = decode_done(attrs, _SESSION_ATTR_DONE)
        for attr_type, payload in decode_attrs(attrs):
            if attr_type == DoneExtAttr.REASON:
                done.reason = as_string(payload, "reason")
            elif attr_type == DoneExtAttr.SESSION:
                done.session = _decode_session(payload)
    except NetlinkFormatError as exc:
        raise ServiceFormatError(f"bad DONE attribute: {exc}") from None
    if done.status == 0 and done.session is None:
        raise ServiceFormatError("successful DONE without a session")
    return seq, done


def _decode_session(payload: bytes) -> Session:
    values: dict[SessionAttr, bytes] = {}
    chain: list[bytes] = []
    for sub_type, sub in decode_attrs(payload):
        try:
            kind = SessionAttr(sub_type)
        except ValueError:
            continue  # newer services may add fields
        if kind is SessionAttr.PEER_CERTIFICATE:
            chain.append(sub)
        else:
            values[kind] = sub
    required = (SessionAttr.ROLE, SessionAttr.SUITE, SessionAttr.CLIENT_SECRET,
                SessionAttr.SERVER_SECRET)
    for kind in required:
        if kind not in values:
            raise NetlinkFormatError(f"session without {kind.name.lower()}")
    role_code = as_u32(values[SessionAttr.ROLE], "role")
    if role_code not in (0, 1):
        raise NetlinkFormatError(f"session role {role_code} unknown")
    try:
        suite = CipherSuite.from_code(as_u32(values[SessionAttr.SUITE], "suite"))
    except ValueError as exc:
        raise NetlinkFormatError(str(exc)) from None
    for kind in (SessionAttr.CLIENT_SECRET, SessionAttr.SERVER_SECRET):
        if len(values[kind]) != suite.hash_length:
            raise NetlinkFormatError(f"{kind.name.lower()} has the wrong length for the suite")

    def num(kind: SessionAttr, width: int) -> int:
        if kind not in values:
            return 0
        if width == 8:
            return _as_u64(values[kind], kind.name.lower())
        return as_u32(values[kind], kind.name.lower())

    peer = PeerIdentity(
        psk_identity=values.get(SessionAttr.PEER_PSK_IDENTITY),
        psk_serial=(as_u32(values[SessionAttr.PEER_PSK_SERIAL], "psk serial")
                    if SessionAttr.PEER_PSK_SERIAL in values else None),
        certificate_chain=tuple(chain),
    )
    return Session(
        role=Role.CLIENT if role_code == 0 else Role.SERVER,
        suite=suite,
        client_secret=values[SessionAttr.CLIENT_SECRET],
        server_secret=values[SessionAttr.SERVER_SECRET],
        tx_seq=num(SessionAttr.TX_SEQ, 8),
        rx_seq=num(SessionAttr.RX_SEQ, 8),
        peer=peer,
        group=(as_string(values[SessionAttr.GROUP], "group")
               if SessionAttr.GROUP in values else None),
        client_generation=num(SessionAttr.CLIENT_GENERATION, 4),
        server_generation=num(SessionAttr.SERVER_GENERATION, 4),
    )


def encode_error_done(status: int, reason: str, *, seq: int = 0) -> bytes:
    return encode_done_message(HandshakeDone(status=status, sockfd=-1, reason=reason), seq=seq)


# --- asyncio edges -----------------------------------------------------------------------


async def recv_message(sock: socket.socket, bufsize: int = MAX_MESSAGE_SIZE,
                       ) -> tuple[bytes, list[int], int]:
    """Receive one SEQPACKET message with any passed descriptors (set close-on-exec).

    Returns (data, fds, msg_flags). ``data == b""`` with no fds means the peer closed.
    """
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(bufsize, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            waiter = loop.create_future()
            loop.add_reader(sock.fileno(), _wake, waiter)
            try:
                await waiter
            finally:
                loop.remove_reader(sock.fileno())
            continue
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(cdata) - len(cdata) % 4
                fds.extend(struct.unpack(f"={usable // 4}i", cdata[:usable]))
        return data, fds, flags


async def connect_service(path: str, *, patience: float = 2.0) -> socket.socket:
    """Connect a non-blocking SEQPACKET socket to the service at ``path``.

    A non-blocking AF_UNIX connect fails with EAGAIN (not EINPROGRESS) while the listen
    backlog is full, and asyncio's ``sock_connect`` mistakes that for a connect in progress
    and hands back an unconnected socket; so connect by hand and retry for ``patience``
    seconds. Raises the connect's OSError (ENOENT, ECONNREFUSED, EAGAIN when still full).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience
    delay = 0.001
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        conn.setblocking(False)
        try:
            conn.connect(path)
            return conn
        except BlockingIOError:
            conn.close()
            if loop.time() >= deadline:
                raise
        except BaseException:
            conn.close()
            raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def send_message(sock: socket.socket, data: bytes, fds: Iterable[int] = ()) -> None:
    """Send one SEQPACKET message, optionally passing descriptors."""
    loop = asyncio.get_running_loop()
    fd_list = list(fds)
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(fd_list)}i", *fd_list))]
    while True:
        try:
            sock.sendmsg([data], anc if fd_list else [])
            return
        except (BlockingIOError, InterruptedError):
            waiter = loop.create_future()
            loop.add_writer(sock.fileno(), _wake, waiter)
            try:
                await waiter
            finally:
                loop.remove_writer(sock.fileno())


@dataclass(frozen=True)
class PeerCredentials:
    """The consumer process, from ``SO_PEERCRED`` (and its supplementary groups from
    ``SO_PEERGROUPS``) at connect time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13 (asm-generic value)


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    try:
        # Python caps the buffer at 1024 bytes (256 groups); with more, or on an older kernel,
        # the consumer's files are read without its supplementary groups: fewer rights.
        packed = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = struct.unpack(f"{len(packed) // 4}I", packed[: len(packed) // 4 * 4])
    except OSError:
        groups = ()
    return PeerCredentials(pid, uid, gid, tuple(groups))


def default_pending_limit() -> int:
    """The kernel's per-netns limit: ``clamp(totalram / (25 * mem_unit), 3, 50)``.

    ``totalram`` counts ``mem_unit``-sized units (pages), so on any real machine this is 50.
    """
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 50
    return max(3, min(50, pages // 25))


class _State(enum.Enum):
    WAITING = "waiting"  # connected, SUBMIT not yet received
    QUEUED = "queued"
    IN_FLIGHT = "in flight"
    FINISHED = "finished"


@dataclass(eq=False)
class ServiceRequest:
    """A request submitted through the service: the :class:`~ktlsd.request.PendingRequest`.

    ``cancelled`` is set when the consumer disconnects (or breaks protocol) before DONE;
    the agent may await it to abort the handshake. ``done()`` must be called exactly once
    for every request taken from :meth:`HandshakeService.requests`.
    """

    request: HandshakeRequest
    credentials: PeerCredentials
    source_name: str = "service"
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    _service: HandshakeService | None = field(default=None, repr=False)
    _conn: socket.socket | None = field(default=None, repr=False)
    _seq: int = 0
    _identity: tuple[int, int] = (0, 0)
    _state: _State = _State.QUEUED
    _watcher: asyncio.Task[None] | None = field(default=None, repr=False)

    async def done(self, answer: HandshakeDone) -> None:
        """Close the agent's descriptor and send DONE (a no-op after cancellation)."""
        if self._state is _State.FINISHED:
            log.warning("service: done() called twice for a request of pid %d",
                        self.credentials.pid)
            return
        assert self._service is not None
        await self._service._finish(self, answer)


class _RequestStream:
    """The agent's view of the queue; while one is open the service has a consumer."""

    def __init__(self, service: HandshakeService) -> None:
        self._service = service
        self._open = True
        service._consumers += 1

    def __aiter__(self) -> _RequestStream:
        return self

    async def __anext__(self) -> ServiceRequest:
        service = self._service
        while self._open:
            if service._queue:
                item = service._queue.popleft()
                item._state = _State.IN_FLIGHT
                service._in_flight.add(item)
                return item
            if service._closing:
                break
            service._wakeup.clear()
            await service._wakeup.wait()
        self._release()
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._open:
            self._open = False
            self._service._consumers -= 1

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self._release()


class HandshakeService:
    """Listen on an AF_UNIX SEQPACKET socket and queue handshake requests for the agent.

    Use as ``async with HandshakeService(path) as service:`` (or ``await start()`` /
    ``await close()``) and consume :meth:`requests`.

    ``mode``/``group``: permissions of the socket file (who may submit); ``pending_limit``:
    requests queued but not yet taken before EAGAIN (default: the kernel's);
    ``submit_wait``: seconds a new connection may stay silent; ``max_connections``: open
    consumer connections beyond which new ones are closed at once.
    """

    name = "service"

    def __init__(
        self,
        path: str | os.PathLike[str] = DEFAULT_SERVICE_PATH,
        *,
        mode: int = 0o660,
        group: int | str | None = None,
        pending_limit: int | None = None,
        submit_wait: float = SUBMIT_WAIT_SECONDS,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.path = os.fspath(path)
        self.mode = mode
        self.group = group
        self.pending_limit = pending_limit if pending_limit is not None else default_pending_limit()
        if self.pending_limit < 1:
            raise ValueError("pending limit must be at least 1")
        self.submit_wait = submit_wait
        self.max_connections = max_connections
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._queue: collections.deque[ServiceRequest] = collections.deque()
        self._in_flight: set[ServiceRequest] = set()
        self._by_socket: dict[tuple[int, int], ServiceRequest] = {}
        self._connections: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._consumers = 0
        self._closing = False
        self.counters: collections.Counter[str] = collections.Counter()

    # -- public state ----------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Requests submitted but not yet taken by the agent."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Requests taken by the agent and not yet answered with done()."""
        return len(self._in_flight)

    @property
    def serving(self) -> bool:
        return self._listener is not None and not self._closing

    # -- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> HandshakeService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind the socket (atomically replacing a stale one) and start accepting."""
        if self._listener is not None:
            raise RuntimeError("service already started")
        directory = os.path.dirname(self.path) or "."
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._check_not_served()
        temp = f"{self.path}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            listener.bind(temp)
            # Permissions are set on the temporary name, then the socket is renamed into
            # place: no moment exists where the public path is more open than ``mode``.
            os.chmod(temp, self.mode)
            if self.group is not None:
                os.chown(temp, -1, _group_id(self.group))
            listener.listen(socket.SOMAXCONN)
            listener.setblocking(False)
            os.rename(temp, self.path)
        except BaseException:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        self._listener = listener
        self._inode = os.stat(self.path).st_ino
        self._accept_task = asyncio.create_task(self._accept_loop(), name="ktlsd-service-accept")
        log.info("service: listening on %s (mode %o, pending limit %d)",
                 self.path, self.mode, self.pending_limit)

    def _check_not_served(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(self.path)
        except OSError:
            return  # stale: replaced by the rename in start()
        finally:
            probe.close()
        raise FileExistsError(f"another handshake service is already listening on {self.path}")

    def requests(self) -> AsyncIterator[ServiceRequest]:
        """Requests in submission order. While the returned iterator is open (from this
        call until it ends or is closed), the service counts as served; with no open
        iterator every submit gets ESRCH, as the kernel answers when nobody listens."""
        return _RequestStream(self)

    async def close(self) -> None:
        """Stop accepting (new submits: ESRCH), answer queued requests ESRCH, end
        :meth:`requests`. In-flight requests keep their connections and get their DONE."""
        if self._closing:
            return
        self._closing = True
        if self._listener is not None:
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            self._listener.close()
        if self._accept_task is not None:
            self._accept_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accept_task
        while self._queue:
            item = self._queue.popleft()
            await self._answer_and_release(
                item, HandshakeDone(errno.ESRCH, -1, reason="handshake service is shutting down")
            )
        self._wakeup.set()
        log.info("service: closed (%d in flight)", len(self._in_flight))

    async def wait_closed(self) -> None:
        """After :meth:`close`, wait until every in-flight request has been answered."""
        while self._in_flight or self._connections:
            self._idle.clear()
            await self._idle.wait()

    # -- connections ------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while True:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if self._closing:
                    return
                log.warning("service: accept failed: %s", exc.strerror or exc)
                await asyncio.sleep(0.05)  # EMFILE and friends: do not spin
                continue
            conn.setblocking(False)
            if len(self._connections) >= self.max_connections:
                self.counters["overloaded"] += 1
                log.warning("service: too many connections, dropping one")
                conn.close()
                continue
            task = asyncio.create_task(self._serve(conn))
            self._connections.add(task)
            task.add_done_callback(self._connection_ended)

    def _connection_ended(self, task: asyncio.Task[None]) -> None:
        self._connections.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("service: connection handler failed: %r", task.exception())
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self._in_flight and not self._connections:
            self._idle.set()

    async def _serve(self, conn: socket.socket) -> None:
        """One consumer connection: receive SUBMIT, admit or refuse, then watch for EOF.

        This task owns ``conn`` and closes it when it ends; once a request is queued,
        answering it (or cancelling it) ends the task.
        """
        fds: list[int] = []
        try:
            try:
                creds = peer_credentials(conn)
            except OSError:
                creds = PeerCredentials(0, -1, -1)
            try:
                data, fds, flags = await asyncio.wait_for(recv_message(conn), self.submit_wait)
            except (TimeoutError, OSError):
                log.info("service: pid %d uid %d sent no request", creds.pid, creds.uid)
                return
            if not data and not fds:
                return  # connected and left
            seq = struct.unpack_from("=I", data, 8)[0] if len(data) >= 12 else 0
            try:
                self._check_envelope(data, fds, flags)
                seq, request = decode_submit(data, fds[0])
                identity = _socket_identity(fds[0])
            except ServiceFormatError as exc:
                self.counters["invalid"] += 1
                log.warning("service: pid %d uid %d: rejected request: %s",
                            creds.pid, creds.uid, exc)
                await _try_send(conn, encode_error_done(exc.status, str(exc), seq=seq))
                return
            refusal = self._admission(identity)
            if refusal is not None:
                status, reason = refusal
                self.counters[errno.errorcode[status]] += 1
                log.info("service: pid %d uid %d: %s (%s)", creds.pid, creds.uid,
                         errno.errorcode[status], reason)
                await _try_send(conn, encode_error_done(status, reason, seq=seq))
                return
            item = ServiceRequest(request=request, credentials=creds, _service=self,
                                  _conn=conn, _seq=seq, _identity=identity,
                                  _watcher=asyncio.current_task())
            fds = []  # the descriptor now belongs to the request (released by _release)
            self._by_socket[identity] = item
            self._queue.append(item)
            self.counters["queued"] += 1
            log.info("service: pid %d uid %d gid %d submitted a %s %s request",
                     creds.pid, creds.uid, creds.gid, request.message_type.name.lower(),
                     request.auth_mode.name.lower())
            self._wakeup.set()
            await self._watch(item)
        finally:
            for fd in fds:
                _close_fd(fd)
            conn.close()

    def _check_envelope(self, data: bytes, fds: list[int], flags: int) -> None:
        """Size and descriptor checks before any attribute is parsed."""
        if flags & socket.MSG_TRUNC or len(data) > MAX_MESSAGE_SIZE:
            raise ServiceFormatError(f"message too large (> {MAX_MESSAGE_SIZE} bytes)")
        if flags & socket.MSG_CTRUNC:
            raise ServiceFormatError("too many descriptors passed")
        if not fds:
            raise ServiceFormatError("SUBMIT without a socket (pass the TCP socket as SCM_RIGHTS)")
        if len(fds) > 1:
            raise ServiceFormatError(f"SUBMIT with {len(fds)} descriptors, expected exactly one")
        try:
            probe = socket.socket(fileno=os.dup(fds[0]))
        except OSError:
            raise ServiceFormatError("the passed descriptor is not a socket") from None
        try:
            if probe.family not in (socket.AF_INET, socket.AF_INET6):
                raise ServiceFormatError("the passed socket is not an IPv4/IPv6 socket")
            proto = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PROTOCOL)
            if probe.type != socket.SOCK_STREAM or proto != socket.IPPROTO_TCP:
                raise ServiceFormatError("the passed socket is not a TCP socket")
            try:
                probe.getpeername()
            except OSError:
                raise ServiceFormatError("the passed TCP socket is not connected") from None
        finally:
            probe.close()

    def _admission(self, identity: tuple[int, int]) -> tuple[int, str] | None:
        """The kernel's order: draining/no listener, pending limit, duplicate socket."""
        if self._closing:
            return errno.ESRCH, "handshake service is shutting down"
        if len(self._queue) >= self.pending_limit:
            return errno.EAGAIN, f"too many pending handshake requests ({self.pending_limit})"
        if identity in self._by_socket:
            return errno.EBUSY, "this socket already has a handshake request"
        if self._consumers == 0:
            return errno.ESRCH, "no handshake agent is serving requests"
        return None

    async def _watch(self, item: ServiceRequest) -> None:
        """Wait for the consumer to go away; finishing the request cancels this wait."""
        assert item._conn is not None
        try:
            data, fds, _ = await recv_message(item._conn, 16)
        except asyncio.CancelledError:
            if item._state is _State.FINISHED:
                return  # answered: the normal end
            raise
        except OSError:
            data, fds = b"", []
        for fd in fds:
            _close_fd(fd)
        if item._state is _State.FINISHED:
            return
        why = "disconnected" if not data else "sent a second message"
        log.info("service: pid %d %s: request cancelled (%s)", item.credentials.pid, why,
                 item._state.value)
        self.counters["cancelled"] += 1
        item.cancelled.set()
        if item._state is _State.QUEUED:
            with contextlib.suppress(ValueError):
                self._queue.remove(item)
            self._release(item)
        # IN_FLIGHT: the agent still owns the fd; done() releases it and sends nothing.

    async def _finish(self, item: ServiceRequest, answer: HandshakeDone) -> None:
        if item._state is not _State.IN_FLIGHT:
            raise RuntimeError(f"done() on a request that is {item._state.value}")
        if item.cancelled.is_set():
            self._release(item)  # like the kernel: DONE for a cancelled request is a no-op
            return
        await self._answer_and_release(item, answer)

    async def _answer_and_release(self, item: ServiceRequest, answer: HandshakeDone) -> None:
        # Close our copy first: when the consumer reads DONE it is the socket's only owner.
        self._release(item)
        try:
            message = encode_done_message(answer, seq=item._seq)
        except ValueError as exc:
            message = encode_error_done(errno.EIO, f"cannot encode the answer: {exc}",
                                        seq=item._seq)
        if item._conn is not None:
            await _try_send(item._conn, message)
            self.counters["answered"] += 1
        # Ending the connection's task closes the connection.
        if item._watcher is not None and item._watcher is not asyncio.current_task():
            item._watcher.cancel()

    def _release(self, item: ServiceRequest) -> None:
        """Forget the request and close the agent's copy of the socket (once)."""
        if item._state is _State.FINISHED:
            return
        item._state = _State.FINISHED
        _close_fd(item.request.sockfd)
        if self._by_socket.get(item._identity) is item:
            del self._by_socket[item._identity]
        self._in_flight.discard(item)
        self._maybe_idle()


def _group_id(group: int | str) -> int:
    if isinstance(group, int):
        return group
    import grp

    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"unknown group {group!r} for the service socket") from None


def _socket_identity(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _close_fd(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


async def _try_send(conn: socket.socket, message: bytes) -> None:
    with contextlib.suppress(OSError, TimeoutError):  # a vanished consumer: nothing to tell
        await asyncio.wait_for(send_message(conn, message), 5.0)


__all__ = [
    "DEFAULT_SERVICE_PATH",
    "MAX_MESSAGE_SIZE",
    "DoneExtAttr",
    "HandshakeService",
    "PeerCredentials",
    "PskAttr",
    "ServiceCommand",
    "ServiceFormatError",
    "ServiceRequest",
    "SessionAttr",
    "SubmitAttr",
    "connect_service",
    "decode_done_message",
    "decode_submit",
    "default_pending_limit",
    "encode_done_message",
    "encode_error_done",
    "encode_submit",
    "peer_credentials",
    "recv_message",
    "send_message",
]
