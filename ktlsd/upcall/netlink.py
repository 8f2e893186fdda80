"""The ``handshake`` generic netlink family: attribute numbers and pure message codecs.

Facts from ``Documentation/netlink/specs/handshake.yaml`` (Linux 6.5+; ``peername`` 6.6+,
``keyring`` 6.17+) and the proposed KeyUpdate series (``key-update-request``,
``session-id``). This module turns attribute bytes into a :class:`~ktlsd.request.HandshakeRequest`
and a :class:`~ktlsd.request.HandshakeDone` into attribute bytes; it does no I/O. The
kernel transport lives in :mod:`ktlsd.upcall.kernel` (generic netlink itself in
:mod:`ktlsd.upcall.genl`); the user-space handshake service's protocol
(:mod:`ktlsd.upcall.wire`) uses the same codecs for its messages.

DONE attribute 4 is claimed twice: ``session-id`` (u32, KeyUpdate series) and ``tag``
(string, "TLS session tags" in the nfsd tree). :class:`DoneAttributes` records which one
the running kernel means, learned from the policy dump's attribute *type*; a DONE never
carries an attribute the kernel did not declare. Where it is ``tag``
(``Documentation/netlink/specs/handshake.yaml`` in the nfsd tree: ``type: string``,
``multi-attr: true``; ``NLA_STRING`` in its genl.c; tlshd 1.4's ``HANDSHAKE_A_DONE_TAG`` = 4),
a successful DONE carries one attribute per session tag (:mod:`ktlsd.session_tags`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ktlsd.request import (
    MAX_PEER_IDENTITIES,
    MAX_REMOTE_AUTH,
    AuthMode,
    HandlerClass,
    HandshakeDone,
    HandshakeRequest,
    KeyUpdateType,
    MessageType,
)
from ktlsd.upcall.nlattr import (
    Attribute,
    NetlinkFormatError,
    as_s32,
    as_string,
    as_u32,
    decode_attrs,
    encode_attr,
    encode_attrs,
    s32,
    string,
    u32,
)

FAMILY_NAME = "handshake"
FAMILY_VERSION = 1
MCGRP_TLSHD = "tlshd"


class Command(enum.IntEnum):
    READY = 1
    ACCEPT = 2
    DONE = 3


class X509Attr(enum.IntEnum):
    CERT = 1
    PRIVKEY = 2


class AcceptAttr(enum.IntEnum):
    SOCKFD = 1
    HANDLER_CLASS = 2
    MESSAGE_TYPE = 3
    TIMEOUT = 4
    AUTH_MODE = 5
    PEER_IDENTITY = 6
    CERTIFICATE = 7
    PEERNAME = 8
    KEYRING = 9
    KEY_UPDATE_REQUEST = 10  # proposed
    SESSION_ID = 11  # proposed


class DoneAttr(enum.IntEnum):
    STATUS = 1
    SOCKFD = 2
    REMOTE_AUTH = 3
    SESSION_ID_OR_TAG = 4  # see module docstring: the meaning depends on the kernel


class DoneAttr4(enum.Enum):
    """What DONE attribute 4 means on the running kernel."""

    ABSENT = "absent"
    SESSION_ID = "session-id"  # u32
    TAG = "tag"  # string


@dataclass(frozen=True)
class DoneAttributes:
    """The DONE attributes the running kernel accepts (from its policy dump).

    The default is what every kernel with the family accepts: status, sockfd, remote-auth.
    """

    attr4: DoneAttr4 = DoneAttr4.ABSENT

    @property
    def session_id(self) -> bool:
        return self.attr4 is DoneAttr4.SESSION_ID

    @property
    def tag(self) -> bool:
        """DONE takes TLS session tags (attribute 4, a NUL-terminated string, repeated)."""
        return self.attr4 is DoneAttr4.TAG


# --- READY -------------------------------------------------------------------------------


def decode_ready(attrs: bytes) -> HandlerClass:
    """READY carries the handler class (attribute 2, as in ACCEPT) that has work queued."""
    for attr_type, payload in decode_attrs(attrs):
        if attr_type == AcceptAttr.HANDLER_CLASS:
            value = as_u32(payload, "handler-class")
            try:
                return HandlerClass(value)
            except ValueError:
                raise NetlinkFormatError(f"READY: unknown handler class {value}") from None
    raise NetlinkFormatError("READY without handler-class")


def encode_ready(handler_class: HandlerClass = HandlerClass.TLSHD) -> bytes:
    return encode_attrs([(AcceptAttr.HANDLER_CLASS, u32(handler_class))])


def encode_accept_command(handler_class: HandlerClass = HandlerClass.TLSHD) -> bytes:
    """The attributes of the agent's ACCEPT command."""
    return encode_attrs([(AcceptAttr.HANDLER_CLASS, u32(handler_class))])


# --- ACCEPT reply ------------------------------------------------------------------------


def _enum(kind: type[enum.IntEnum], value: int, name: str) -> enum.IntEnum:
    try:
        return kind(value)
    except ValueError:
        raise NetlinkFormatError(f"{name}: unknown value {value}") from None


def decode_accept_reply(attrs: bytes) -> HandshakeRequest:
    """Parse the kernel's ACCEPT reply into a :class:`HandshakeRequest`.

    Unknown attributes are ignored (newer kernels add some); a missing SOCKFD, a bad length
    or an out-of-range enum raises :class:`NetlinkFormatError`.
    """
    sockfd: int | None = None
    message_type = MessageType.UNSPEC
    auth_mode = AuthMode.UNSPEC
    handler_class = HandlerClass.TLSHD
    timeout_ms = 0
    peer_identities: list[int] = []
    certificate = private_key = 0
    peername: str | None = None
    keyring = 0
    key_update_type = KeyUpdateType.UNSPEC
    session_id = 0
    for attr_type, payload in decode_attrs(attrs):
        if attr_type == AcceptAttr.SOCKFD:
            sockfd = as_s32(payload, "sockfd")
        elif attr_type == AcceptAttr.HANDLER_CLASS:
            handler_class = HandlerClass(_enum(HandlerClass, as_u32(payload), "handler-class"))
        elif attr_type == AcceptAttr.MESSAGE_TYPE:
            message_type = MessageType(_enum(MessageType, as_u32(payload), "message-type"))
        elif attr_type == AcceptAttr.TIMEOUT:
            timeout_ms = as_u32(payload, "timeout")
        elif attr_type == AcceptAttr.AUTH_MODE:
            auth_mode = AuthMode(_enum(AuthMode, as_u32(payload), "auth-mode"))
        elif attr_type == AcceptAttr.PEER_IDENTITY:
            if len(peer_identities) >= MAX_PEER_IDENTITIES:
                raise NetlinkFormatError(
                    f"more than {MAX_PEER_IDENTITIES} peer-identity attributes"
                )
            peer_identities.append(as_u32(payload, "peer-identity"))
        elif attr_type == AcceptAttr.CERTIFICATE:
            for sub_type, sub in decode_attrs(payload):
                if sub_type == X509Attr.CERT:
                    certificate = as_s32(sub, "certificate.cert")
                elif sub_type == X509Attr.PRIVKEY:
                    private_key = as_s32(sub, "certificate.privkey")
        elif attr_type == AcceptAttr.PEERNAME:
            peername = as_string(payload, "peername") or None
        elif attr_type == AcceptAttr.KEYRING:
            keyring = as_u32(payload, "keyring")
        elif attr_type == AcceptAttr.KEY_UPDATE_REQUEST:
            key_update_type = KeyUpdateType(
                _enum(KeyUpdateType, as_u32(payload), "key-update-request")
            )
        elif attr_type == AcceptAttr.SESSION_ID:
            session_id = as_u32(payload, "session-id")
    if sockfd is None:
        raise NetlinkFormatError("ACCEPT reply without sockfd")
    if sockfd < 0:
        raise NetlinkFormatError(f"ACCEPT reply with invalid sockfd {sockfd}")
    return HandshakeRequest(
        sockfd=sockfd,
        message_type=message_type,
        auth_mode=auth_mode,
        handler_class=handler_class,
        timeout_ms=timeout_ms,
        peer_identities=tuple(peer_identities),
        certificate=certificate,
        private_key=private_key,
        peername=peername,
        keyring=keyring,
        key_update_type=key_update_type,
        session_id=session_id,
    )


def encode_accept_reply(request: HandshakeRequest) -> bytes:
    """Encode a request the way the kernel's ``tls_handshake_accept()`` does.

    Used by the user-space handshake service and by tests; optional attributes are sent
    only when set, as the kernel does.
    """
    attrs: list[Attribute] = [
        (AcceptAttr.SOCKFD, s32(request.sockfd)),
        (AcceptAttr.MESSAGE_TYPE, u32(request.message_type)),
    ]
    if request.timeout_ms:
        attrs.append((AcceptAttr.TIMEOUT, u32(request.timeout_ms)))
    attrs.append((AcceptAttr.AUTH_MODE, u32(request.auth_mode)))
    attrs.extend((AcceptAttr.PEER_IDENTITY, u32(serial)) for serial in request.peer_identities)
    out = encode_attrs(attrs)
    if request.certificate or request.private_key:
        out += encode_attr(
            AcceptAttr.CERTIFICATE,
            encode_attrs(
                [(X509Attr.CERT, s32(request.certificate)),
                 (X509Attr.PRIVKEY, s32(request.private_key))]
            ),
            nested=True,
        )
    tail: list[Attribute] = []
    if request.peername:
        tail.append((AcceptAttr.PEERNAME, string(request.peername)))
    if request.keyring:
        tail.append((AcceptAttr.KEYRING, u32(request.keyring)))
    if request.key_update_type:
        tail.append((AcceptAttr.KEY_UPDATE_REQUEST, u32(request.key_update_type)))
    if request.session_id:
        tail.append((AcceptAttr.SESSION_ID, u32(request.session_id)))
    return out + encode_attrs(tail)


# --- DONE --------------------------------------------------------------------------------


def encode_done(done: HandshakeDone, accepted: DoneAttributes = DoneAttributes()) -> bytes:
    """Encode DONE. STATUS is always present (without it the kernel reports -EIO)."""
    if done.status < 0:
        raise ValueError("DONE status must be a positive errno or 0")
    attrs: list[Attribute] = [
        (DoneAttr.STATUS, u32(done.status)),
        (DoneAttr.SOCKFD, s32(done.sockfd)),
    ]
    attrs.extend((DoneAttr.REMOTE_AUTH, u32(s)) for s in done.remote_auth[:MAX_REMOTE_AUTH])
    if done.session_id and accepted.session_id:
        attrs.append((DoneAttr.SESSION_ID_OR_TAG, u32(done.session_id)))
    if done.status == 0 and accepted.tag:
        # One attribute per tag, as tlshd's nla_put_string (the kernel nla_strdup()s each).
        attrs.extend((DoneAttr.SESSION_ID_OR_TAG, string(tag)) for tag in done.tags)
    return encode_attrs(attrs)


def decode_done(attrs: bytes, accepted: DoneAttributes = DoneAttributes()) -> HandshakeDone:
    """Parse DONE attributes (what the kernel, or the handshake service, receives)."""
    status: int | None = None
    sockfd = -1
    remote_auth: list[int] = []
    session_id = 0
    tags: list[str] = []
    extra: dict[str, object] = {}
    for attr_type, payload in decode_attrs(attrs):
        if attr_type == DoneAttr.STATUS:
            status = as_u32(payload, "status")
        elif attr_type == DoneAttr.SOCKFD:
            sockfd = as_s32(payload, "sockfd")
        elif attr_type == DoneAttr.REMOTE_AUTH:
            remote_auth.append(as_u32(payload, "remote-auth"))
        elif attr_type == DoneAttr.SESSION_ID_OR_TAG:
            if accepted.attr4 is DoneAttr4.TAG:
                extra["tag"] = as_string(payload, "tag")
                tags.append(as_string(payload, "tag"))
            else:
                session_id = as_u32(payload, "session-id")
    if status is None:
        raise NetlinkFormatError("DONE without status")
    return HandshakeDone(
        status=status,
        sockfd=sockfd,
        remote_auth=tuple(remote_auth[:MAX_REMOTE_AUTH]),
        session_id=session_id,
        extra=extra,
        tags=tuple(tags),
    )
