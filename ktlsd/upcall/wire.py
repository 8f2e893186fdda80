"""The handshake service protocol: its specification, codec and message I/O.

This docstring is the protocol's specification (docs/service.md is the user's guide and
points here). The module holds everything a consumer needs to speak it -- the pure codec and
three small asyncio helpers -- and nothing of the server, so :mod:`ktlsd.client` imports it
without loading :mod:`ktlsd.upcall.service`. The codec functions are pure and raise
:class:`ServiceFormatError` (one-line reason, ``status`` = the errno to answer with).

Transport and lifecycle
=======================

* An ``AF_UNIX`` ``SOCK_SEQPACKET`` socket: by default :data:`DEFAULT_SERVICE_PATH`, mode
  0660 (the server may set a group); consumers use ``$KTLSD_SERVICE_PATH`` if set. The server
  logs each consumer's pid/uid/gid (``SO_PEERCRED``).
* **One connection carries one request.** The consumer connects and sends one SUBMIT with its
  connected TCP socket as the message's only ``SCM_RIGHTS`` descriptor; the service answers
  one DONE and closes the connection. The first DONE is the answer: a consumer reads one
  message (with ``--workers``, a worker that dies between sending a success DONE and
  reporting it can leave a second, EIO, behind it; see :mod:`ktlsd.workers`).
* Closing the connection before DONE cancels the request, and so does sending anything after
  SUBMIT (the service then sends nothing). A consumer that sends no SUBMIT within 2 s is
  disconnected without an answer; so is one connecting while 1,024 connections are open.
  A connection of a uid that already holds 64 open connections is answered at once with a
  DONE ``EAGAIN`` (``seq`` 0) and closed, whatever it sent. (Server defaults; every limit is
  configurable, see "Limits" below.)
* Until DONE the socket belongs to the agent: the consumer must not use it. The service
  closes its own copy of the descriptor *before* sending DONE.

Framing
=======

Every message is one datagram framed like a generic netlink message, with attributes
encoded as by :mod:`ktlsd.upcall.nlattr`::

    nlmsghdr   { u32 len = the datagram's length; u16 type = 0x4b54 ("KT");
                 u16 flags = 0; u32 seq; u32 pid = 0 }
    genlmsghdr { u8 cmd: SUBMIT = 2, DONE = 3, STATUS = 4; u8 version = 1;
                 u16 reserved = 0 }
    attributes { u16 nla_len; u16 nla_type; payload; pad to 4 } ...

Integers are host byte order (the peers share a host); u64 is 8 bytes, host order. A
message is at most :data:`MAX_MESSAGE_SIZE` (65,536) bytes in either direction. DONE echoes
SUBMIT's ``seq`` (for a SUBMIT whose header does not parse: its bytes 8..11, or 0). Strings
are UTF-8, a trailing NUL optional, an embedded NUL an error. The NESTED and BYTEORDER flag
bits of ``nla_type`` are ignored.

SUBMIT (consumer -> service)
============================

The attributes of the kernel's ACCEPT reply (``Documentation/netlink/specs/handshake.yaml``,
:class:`~ktlsd.upcall.netlink.AcceptAttr`), so :func:`~ktlsd.upcall.netlink.decode_accept_reply`
parses both, **without sockfd**:

==  ===================  ==========================================================
 #  attribute            payload
==  ===================  ==========================================================
 1  sockfd               never: the socket is the SCM_RIGHTS descriptor (EINVAL if present)
 2  handler-class        u32, optional (1 = tlshd); unused by the service
 3  message-type         u32, required: 1 clienthello (the agent is the TLS client on
                         the socket), 2 serverhello (TLS server), 3 clientkeyupdate,
                         4 serverkeyupdate (key update of a kept session)
 4  timeout              u32 milliseconds; absent or 0: the agent's default (10 s);
                         more than the agent's cap (30 s) counts as the cap
 5  auth-mode            u32: 1 unauth, 2 psk, 3 x509; required for messages 1 and 2
 6  peer-identity        u32 PSK key serial, repeated, at most 5
 7  certificate          nested { 1 cert: s32 key serial, 2 privkey: s32 key serial }
 8  peername             string: the name the peer's certificate must carry
 9  keyring              u32 keyring serial for the agent to link
10  key-update-request   u32 (messages 3, 4): 1 send, 2 received,
                         3 received and the peer asked for an update
11  session-id           u32: the kept session (required for messages 3 and 4)
==  ===================  ==========================================================

Attribute 0 is ignored, 12..99 are errors; of a single-valued attribute given twice the
last counts. Service-only attributes (:class:`SubmitAttr`; other numbers from 100 up are
errors):

===  =====================  ======================================================
  #  attribute              payload
===  =====================  ======================================================
100  INLINE_PSK             nested, repeated (at most 16): 1 identity (bytes,
                            non-empty), 2 key (bytes, non-empty), 3 hash (string
                            "sha256" or "sha384"; absent: sha256)
101  CERTIFICATE_DER        one certificate (DER, non-empty), repeated (at most 10),
                            leaf first
102  PRIVATE_KEY_DER        private key (DER, non-empty), at most once
103  CERTIFICATE_FILE       string, absolute path of a PEM file the agent reads; once
104  PRIVATE_KEY_FILE       string, absolute path of a PEM file; once
105  TRUSTSTORE             string, absolute path of a CA file; once
106  CRL                    string, absolute path of a CRL file; once
107  CIPHERSUITE            string, IANA name (TLS_AES_128_GCM_SHA256,
                            TLS_AES_256_GCM_SHA384, TLS_CHACHA20_POLY1305_SHA256;
                            case-insensitive), repeated, in preference order
108  REQUIRE_CLIENT_CERT    u32, nonzero = yes (servers: ask for a client certificate)
109  REQUEST_PEER_UPDATE    u32, nonzero = yes (key updates: ask the peer to update too)
110  RECORD_SEQS            u64 tx, u64 rx (16 bytes): the consumer's user-space record
                            layer's next record numbers (key updates)
111  FORGET_SESSION         u32, nonzero = yes (with message 3/4 and session-id: the
                            connection ended; drop the kept session, run no update)
112  KEEP_SESSION           u32, nonzero = yes (messages 1, 2: keep the session's state
                            for later key updates through the agent; absent: not kept)
===  =====================  ======================================================

A key-update request (message 3 or 4) concerns the session the agent kept after a
successful handshake that asked for it (KEEP_SESSION; DONE's session-id) and is served only
for the uid that made it. The agent keeps a bounded number of sessions per uid and in all;
keeping one more evicts the oldest (see "Limits"), whose id then answers ``ENOKEY``.

DONE (service -> consumer)
==========================

The kernel's DONE attributes (:class:`~ktlsd.upcall.netlink.DoneAttr`), attribute 4 always
meaning session-id, without sockfd, plus :class:`DoneExtAttr`:

===  =====================  ======================================================
  #  attribute              payload
===  =====================  ======================================================
  1  status                 u32, always present: 0 success, else a positive errno
  3  remote-auth            u32 key serial of the authenticated peer, repeated, at most 5:
                            the PSK's serial when it came from a keyring; never for a
                            certificate (its chain is in SESSION)
  4  session-id             u32, when the agent keeps the session for later key
                            updates (absent or 0: not kept)
100  REASON                 string, one line of at most 1,024 characters, never a
                            secret; usually present when status != 0
101  SESSION                nested, present exactly when status = 0:
                            1 role (u32: 0 client, 1 server), 2 suite (u32 IANA code),
                            3 client secret, 4 server secret (bytes, the suite's hash
                            length), 5 tx seq, 6 rx seq (u64), 7 client generation,
                            8 server generation (u32), 9 peer PSK identity (bytes),
                            10 peer PSK serial (u32), 11 peer certificate (DER,
                            repeated, leaf first), 12 group (string),
                            13 peer record size limit (u32), 14 own record size
                            limit (u32), 15 our signature scheme, 16 the peer's
                            (strings, IANA names as OpenSSL spells them: mldsa65,
                            ed25519)
102  TAG                    string, repeated, only when status = 0: a TLS session tag
                            the peer earned (tls-session-tags(7): the agent's
                            tags_directory, evaluated for server x509 handshakes on the
                            peer's leaf certificate); 1..255 characters of
                            ``[A-Za-z0-9_-]``; order has no meaning
===  =====================  ======================================================

SESSION's attributes 1..4 are required (role 0 or 1, a known suite, secrets of its hash
length), and a DONE with status 0 but no SESSION is malformed; a decoder ignores unknown
SESSION and DONE attributes (newer services may add some). When the peer's certificate chain
would make DONE exceed the size limit, certificates are dropped from the chain's end (the
leaf is kept). SESSION carries the consumer's own traffic secrets, needed to run a
user-space record layer; the socket's mode keeps other users from asking.

SESSION 13 and 14 are the RFC 8449 ``record_size_limit`` values (64..16,385; TLS 1.3 counts
the content type byte): 13 is what the peer advertised, present when it sent one; the
consumer must never send a record whose plaintext exceeds it minus one (kTLS:
``setsockopt(SOL_TLS, TLS_TX_MAX_PAYLOAD_LEN, limit - 1)``, Linux >= 6.19; the agent has done
nothing to the socket). 14 is what the agent advertised for the consumer, present when the
negotiation completed: records the peer sends are at most that large. A decoder takes a
value outside 64..16,385 as malformed. For a
FORGET_SESSION request a successful DONE carries the last kept state and no session-id.

STATUS (administrator <-> service)
==================================

``ktlsd status`` asks the running agent how it is doing. Instead of SUBMIT, the first
message on a connection is a STATUS request: command STATUS (4), no attributes, no
descriptor (any passed descriptor is closed). The service answers one STATUS message and
closes the connection:

==  =====================  ======================================================
 #  attribute (StatusAttr) payload
==  =====================  ======================================================
 1  status                 u32, always present: 0, or a positive errno
 2  reason                 string, one line, present when status != 0
 3  report                 string, present exactly when status = 0: the report as
                           JSON (:mod:`ktlsd.status`: ``"format": 1``; in-flight and
                           pending requests per source, ended requests per source and
                           outcome, service refusals, kept sessions, workers, uptime,
                           the effective limits, the configuration file)
==  =====================  ======================================================

Only root may ask: a connection whose ``SO_PEERCRED`` uid is not 0 gets status ``EACCES``
with the reason "ktlsd status is for root only" before the request is even parsed, and
nothing else is computed for it (it counts as one of the uid's connections, like any
other). ``EINVAL``: a malformed STATUS request (attributes, descriptors, a bad header);
``EOPNOTSUPP``: this listener has no status to give; ``EIO``: the report could not be
made or does not fit :data:`MAX_MESSAGE_SIZE`. A decoder ignores unknown attributes.

An agent running without the service socket (``--socket none``) answers STATUS, and
nothing else, on a root-only socket (mode 0600) named ``status.sock`` in its runtime
directory (``$RUNTIME_DIRECTORY``, else ``/run/ktlsd``: :data:`ktlsd.status.DEFAULT_STATUS_PATH`).

Status values
=============

The service itself answers, checking in the order of the kernel's
``handshake_req_submit()``:

* ``ESRCH``  -- the service is shutting down;
* ``EAGAIN`` -- the pending limit is reached (requests queued and not yet taken by the
  agent; default the kernel's ``clamp(totalram / (25 * mem_unit), 3, 50)``), or the
  consumer's uid already has its share queued (``uid_max_pending``, default 8), or holds
  its share of connections (``uid_max_connections``, default 64; answered on connecting);
* ``EBUSY``  -- the same socket (same st_dev/st_ino: dups of one socket count as one)
  already has a request queued or in flight;
* ``ESRCH``  -- no agent is taking requests;

and, before those, ``EINVAL`` for a message it cannot accept: oversized or truncated
(``MSG_TRUNC``), not exactly one descriptor, a descriptor that is not a connected IPv4/IPv6
TCP socket, a bad header (type, version, length, command), an unknown attribute, a bad
attribute length or enum value, more than the limits above, an empty PSK identity, PSK key,
certificate or private key, one of 102..106 given twice, a relative file name, an unknown
cipher suite or PSK hash, a missing message type, a missing auth mode (handshakes) or
session-id (key updates). ``EIO`` if its answer cannot be encoded.

From the agent: ``0``; the DONE status of :class:`ktlsd.errors.FailureCause` for a failed
handshake (``EACCES`` rejected or untrusted peer, ``EKEYREJECTED`` no PSK identity in
common, ``ETIMEDOUT`` timeout or peer closed, ``EIO`` protocol or internal error, ``ENOKEY``
missing key, certificate or serial, ``EOPNOTSUPP`` a request it cannot serve, ``EINVAL``
bad parameters); ``ENOKEY`` for a session-id that is unknown, expired or another uid's;
``ESRCH`` for a request taken but not started because the agent is stopping.

Limits
======

Each local user (uid, from ``SO_PEERCRED``) gets a bounded share of the service; the server
defaults, each an ``[ktlsd]`` configuration key (docs/configuration.md):

* ``uid_max_connections`` 64 open connections (waiting, queued or in flight), beyond which a
  new connection gets DONE ``EAGAIN`` and is closed; ``service_max_connections`` 1,024 in all,
  beyond which new connections are closed without an answer;
* ``submit_timeout_ms`` 2 s to send SUBMIT after connecting;
* ``uid_max_pending`` 8 requests queued (``EAGAIN`` beyond), within the service's
  ``pending_limit``;
* ``uid_max_in_flight`` 4 requests handed to the agent at once: the service hands out queued
  requests round-robin between uids, skipping a uid at this limit, so one uid's stalled
  handshakes never hold another's back;
* ``max_consumer_timeout_ms`` 30 s: a longer requested timeout counts as 30 s;
* ``uid_max_kept_sessions`` 256 kept sessions (KEEP_SESSION) per uid and
  ``max_kept_sessions`` 10,000 in all (fewer when root's key quota is small); keeping one
  more evicts the uid's oldest, or at the total the oldest of the uid keeping the most.

The kernel's requests never wait for the service's: the agent runs each upcall source with
its own ``max_concurrent`` slots.

A consumer library answers for itself when no DONE arrives (:mod:`ktlsd.client`): ``ESRCH``
no service socket, nobody listening or the SUBMIT could not be sent, ``EACCES`` no
permission to connect, ``EAGAIN`` the listen backlog stays full, ``ETIMEDOUT`` no DONE
within the request's timeout plus 5 s, ``EIO`` the connection closed without a DONE or an
unreadable DONE.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import socket
import struct
from collections.abc import Iterable

from ktlsd.request import (
    AuthMode,
    HandshakeDone,
    HandshakeRequest,
    InlineMaterial,
    InlinePsk,
    MessageType,
)
from ktlsd.settings import MAX_RECORD_SIZE_LIMIT, MIN_RECORD_SIZE_LIMIT
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

SERVICE_MSG_TYPE = 0x4B54  # "KT": marks a ktlsd service message in nlmsghdr.type
SERVICE_VERSION = 1
MAX_MESSAGE_SIZE = 64 * 1024
MAX_INLINE_PSKS = 16
MAX_CERTIFICATES = 10
MAX_REASON_LENGTH = 1024
"""Characters of DONE's REASON kept (after folding whitespace to single spaces)."""

_SESSION_ATTR_DONE = DoneAttributes(DoneAttr4.SESSION_ID)
_ANCBUF = socket.CMSG_SPACE(8 * 4)  # room to notice (and close) up to 8 passed descriptors

class ServiceCommand(enum.IntEnum):
    SUBMIT = 2  # mirrors ACCEPT: it carries the ACCEPT reply's attributes
    DONE = 3
    STATUS = 4  # ktlsd status: request (no attributes) and answer (StatusAttr)


class StatusAttr(enum.IntEnum):
    """The STATUS answer's attributes."""

    STATUS = 1
    REASON = 2
    REPORT = 3


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
    KEEP_SESSION = 112


class PskAttr(enum.IntEnum):
    IDENTITY = 1
    KEY = 2
    HASH = 3


class DoneExtAttr(enum.IntEnum):
    """Service-only DONE attributes."""

    REASON = 100
    SESSION = 101
    TAG = 102


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
    PEER_RECORD_SIZE_LIMIT = 13
    RECORD_SIZE_LIMIT = 14
    SIGNATURE_SCHEME = 15
    PEER_SIGNATURE_SCHEME = 16


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
    if request.keep_session:
        extra.append((SubmitAttr.KEEP_SESSION, u32(1)))
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

    Returns (seq, request). Raises :class:`ServiceFormatError` (EINVAL) with a one-line
    reason.
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
            elif attr_type == SubmitAttr.KEEP_SESSION:
                request.keep_session = as_u32(payload, "keep-session") != 0
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


_REQUEST_ATTRS = (SubmitAttr.REQUEST_PEER_UPDATE, SubmitAttr.RECORD_SEQS, SubmitAttr.FORGET_SESSION,
                  SubmitAttr.KEEP_SESSION)


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
            if path[:7].lower() == "pkcs11:":  # a token key: never a consumer's (see material)
                raise ServiceFormatError(
                    "pkcs11: URIs are accepted only in the agent's configuration, not from "
                    "service consumers")
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
    reason = " ".join(done.reason.split())[:MAX_REASON_LENGTH]
    tail = encode_attr(DoneExtAttr.REASON, string(reason)) if reason else b""
    if done.status == 0:
        tail += encode_attrs((DoneExtAttr.TAG, string(tag)) for tag in done.tags)
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
    if session.peer_record_size_limit is not None:
        attrs.append((SessionAttr.PEER_RECORD_SIZE_LIMIT, u32(session.peer_record_size_limit)))
    if session.record_size_limit is not None:
        attrs.append((SessionAttr.RECORD_SIZE_LIMIT, u32(session.record_size_limit)))
    if session.signature_scheme:
        attrs.append((SessionAttr.SIGNATURE_SCHEME, string(session.signature_scheme)))
    if session.peer_signature_scheme:
        attrs.append((SessionAttr.PEER_SIGNATURE_SCHEME, string(session.peer_signature_scheme)))
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
            elif attr_type == DoneExtAttr.TAG:
                done.tags += (as_string(payload, "tag"),)
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

    def record_size_limit(kind: SessionAttr) -> int | None:
        if kind not in values:
            return None
        limit = as_u32(values[kind], kind.name.lower())
        if not MIN_RECORD_SIZE_LIMIT <= limit <= MAX_RECORD_SIZE_LIMIT:
            raise NetlinkFormatError(f"{kind.name.lower()} {limit} outside 64..16385")
        return limit

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
        signature_scheme=(as_string(values[SessionAttr.SIGNATURE_SCHEME], "signature scheme")
                          if SessionAttr.SIGNATURE_SCHEME in values else None),
        peer_signature_scheme=(
            as_string(values[SessionAttr.PEER_SIGNATURE_SCHEME], "peer signature scheme")
            if SessionAttr.PEER_SIGNATURE_SCHEME in values else None),
        client_generation=num(SessionAttr.CLIENT_GENERATION, 4),
        server_generation=num(SessionAttr.SERVER_GENERATION, 4),
        peer_record_size_limit=record_size_limit(SessionAttr.PEER_RECORD_SIZE_LIMIT),
        record_size_limit=record_size_limit(SessionAttr.RECORD_SIZE_LIMIT),
    )


def encode_error_done(status: int, reason: str, *, seq: int = 0) -> bytes:
    return encode_done_message(HandshakeDone(status=status, sockfd=-1, reason=reason), seq=seq)


# --- STATUS (pure) ---------------------------------------------------------------------------


def is_status_request(data: bytes) -> bool:
    """Whether ``data`` claims to be a STATUS message (service type, command STATUS): the
    service's dispatch before any other check; :func:`decode_status_request` checks it all."""
    if len(data) < 20:
        return False
    msg_type = struct.unpack_from("=H", data, 4)[0]
    return bool(msg_type == SERVICE_MSG_TYPE and data[16] == ServiceCommand.STATUS)


def encode_status_request(*, seq: int = 0) -> bytes:
    return _frame(ServiceCommand.STATUS, b"", seq)


def decode_status_request(data: bytes) -> int:
    """Check a STATUS request strictly; its seq. Raises :class:`ServiceFormatError`."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise ServiceFormatError(f"message too large (> {MAX_MESSAGE_SIZE} bytes)")
    seq, attrs = _unframe(data, ServiceCommand.STATUS)
    if attrs:
        raise ServiceFormatError("a STATUS request carries no attributes")
    return seq


def encode_status_answer(status: int, *, reason: str = "", report: bytes = b"",
                         seq: int = 0) -> bytes:
    """The STATUS answer: ``report`` (UTF-8 JSON) on success, ``reason`` otherwise.
    ValueError when it would exceed :data:`MAX_MESSAGE_SIZE`."""
    attrs: list[Attribute] = [(StatusAttr.STATUS, u32(status))]
    if status == 0:
        attrs.append((StatusAttr.REPORT, report + b"\0"))
    else:
        attrs.append((StatusAttr.REASON, string(" ".join(reason.split())[:MAX_REASON_LENGTH])))
    message = _frame(ServiceCommand.STATUS, encode_attrs(attrs), seq)
    if len(message) > MAX_MESSAGE_SIZE:
        raise ValueError(f"status answer too large ({len(message)} > {MAX_MESSAGE_SIZE} bytes)")
    return message


def decode_status_answer(data: bytes) -> tuple[int, int, str, bytes]:
    """(seq, status, reason, report) of a STATUS answer; :class:`ServiceFormatError`."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise ServiceFormatError(f"message too large (> {MAX_MESSAGE_SIZE} bytes)")
    seq, attrs = _unframe(data, ServiceCommand.STATUS)
    status: int | None = None
    reason = ""
    report = b""
    try:
        for attr_type, payload in decode_attrs(attrs):
            if attr_type == StatusAttr.STATUS:
                status = as_u32(payload, "status")
            elif attr_type == StatusAttr.REASON:
                reason = as_string(payload, "reason")
            elif attr_type == StatusAttr.REPORT:
                report = payload[:-1] if payload.endswith(b"\0") else payload
    except NetlinkFormatError as exc:
        raise ServiceFormatError(f"bad STATUS attribute: {exc}") from None
    if status is None:
        raise ServiceFormatError("STATUS answer without a status")
    if status == 0 and not report:
        raise ServiceFormatError("successful STATUS answer without a report")
    return seq, status, reason, report


# --- message I/O (asyncio) -----------------------------------------------------------------------


def recv_message_now(sock: socket.socket, bufsize: int = MAX_MESSAGE_SIZE,
                     ) -> tuple[bytes, list[int], int] | None:
    """:func:`recv_message` on a non-blocking socket, without waiting: None when no message
    is there yet."""
    try:
        data, ancdata, flags, _ = sock.recvmsg(bufsize, _ANCBUF, socket.MSG_CMSG_CLOEXEC)
    except (BlockingIOError, InterruptedError):
        return None
    fds: list[int] = []
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(cdata) - len(cdata) % 4
            fds.extend(struct.unpack(f"={usable // 4}i", cdata[:usable]))
    return data, fds, flags


async def recv_message(sock: socket.socket, bufsize: int = MAX_MESSAGE_SIZE,
                       ) -> tuple[bytes, list[int], int]:
    """Receive one SEQPACKET message with any passed descriptors (set close-on-exec).

    Returns (data, fds, msg_flags). ``data == b""`` with no fds means the peer closed.
    """
    loop = asyncio.get_running_loop()
    while True:
        received = recv_message_now(sock, bufsize)
        if received is not None:
            return received
        waiter = loop.create_future()
        loop.add_reader(sock.fileno(), _wake, waiter)
        try:
            await waiter
        finally:
            loop.remove_reader(sock.fileno())


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


__all__ = [
    "MAX_CERTIFICATES",
    "MAX_INLINE_PSKS",
    "MAX_MESSAGE_SIZE",
    "MAX_REASON_LENGTH",
    "SERVICE_MSG_TYPE",
    "SERVICE_VERSION",
    "DoneExtAttr",
    "PskAttr",
    "ServiceCommand",
    "ServiceFormatError",
    "SessionAttr",
    "StatusAttr",
    "SubmitAttr",
    "connect_service",
    "decode_done_message",
    "decode_status_answer",
    "decode_status_request",
    "decode_submit",
    "encode_done_message",
    "encode_error_done",
    "encode_status_answer",
    "encode_status_request",
    "encode_submit",
    "is_status_request",
    "recv_message",
    "recv_message_now",
    "send_message",
]
