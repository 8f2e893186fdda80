"""Generic netlink: the control family (``nlctrl``), its policy dumps, and a netlink channel.

Everything here is about generic netlink as such, not about the ``handshake`` family (that
codec is :mod:`ktlsd.upcall.netlink`; the upcall source built on both is
:mod:`ktlsd.upcall.kernel`):

* framing of whole netlink datagrams (:func:`split_messages`, :class:`RawMessage`) and of
  ``NLMSG_ERROR`` answers with extended ACKs (:func:`decode_error`);
* the control family's GETFAMILY reply (:func:`parse_family_reply` -> :class:`FamilyInfo`:
  id, version, multicast groups) and its GETPOLICY dump (:func:`parse_policy_dump` ->
  :class:`FamilyPolicy`: what each command's handler validates);
* :class:`NetlinkChannel`, the one I/O piece: a non-blocking socket that sends a request and
  collects the answers carrying its sequence number, blocking (``transact_sync``, used while
  starting up) or on the running asyncio loop (``transact``).

The parsers are pure functions of bytes and raise
:class:`~ktlsd.upcall.nlattr.NetlinkFormatError` with a one-line message on malformed input;
a negative errno from the kernel becomes :class:`NetlinkError`. Attributes are decoded with
:mod:`ktlsd.upcall.nlattr`, the same strict codec the handshake family uses.

Design note: no pyroute2. ktlsd used it for the constants below and for one GETFAMILY decode;
its socket classes cannot serve here (0.9's synchronous sockets drive an event loop of their
own and fail inside a running asyncio loop; its asynchronous ones own the descriptor and its
reader), the control family's replies are a handful of attributes that :mod:`~ktlsd.upcall.nlattr`
already decodes, and importing it cost ktlsd more start-up time than everything else in the
kernel source together. The constants are copied from the uapi headers named next to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from ktlsd.upcall.nlattr import (
    GENL_HDRLEN,
    NLMSG_HDRLEN,
    NetlinkFormatError,
    as_string,
    as_u16,
    as_u32,
    decode_attrs,
    encode_attr,
    encode_genl,
    string,
    u16,
    u32,
)

log = logging.getLogger("ktlsd.upcall.genl")

# --- constants ---------------------------------------------------------------------------------

# include/uapi/linux/netlink.h
NETLINK_GENERIC = 16  # the protocol of socket(AF_NETLINK, SOCK_RAW, ...)
NLM_F_REQUEST = 0x01  # nlmsghdr.flags: a request
NLM_F_ACK = 0x04  # ... that wants an ACK (NLMSG_ERROR with error 0)
NLM_F_DUMP = 0x300  # ... that wants every object (NLM_F_ROOT | NLM_F_MATCH)
NLM_F_CAPPED = 0x100  # in NLMSG_ERROR: the echoed request was cut to its header
NLM_F_ACK_TLVS = 0x200  # in NLMSG_ERROR: extended-ACK attributes follow
NLMSG_ERROR = 0x2  # nlmsghdr.type of an error or ACK (struct nlmsgerr)
NLMSG_DONE = 0x3  # nlmsghdr.type ending a dump
NLMSGERR_ATTR_MSG = 1  # enum nlmsgerr_attrs: the extended ACK's message string
NETLINK_ADD_MEMBERSHIP = 1  # setsockopt(SOL_NETLINK, ...): join a multicast group
NETLINK_CAP_ACK = 10  # ... errors do not echo the request's payload
NETLINK_EXT_ACK = 11  # ... errors carry NLMSGERR_ATTR_* explanations

# include/linux/socket.h
SOL_NETLINK = 270

# include/uapi/linux/genetlink.h
GENL_ID_CTRL = 0x10  # nlmsghdr.type of the control family (NLMSG_MIN_TYPE)
CTRL_CMD_NEWFAMILY = 1  # the answer to GETFAMILY
CTRL_CMD_GETFAMILY = 3
CTRL_CMD_GETPOLICY = 10

TRANSACTION_TIMEOUT = 5.0
"""Seconds to wait for the kernel's answer to one request. Generic netlink answers before
``send`` returns, so this only guards against a wedged socket."""

_RECV_SIZE = 1 << 16
_NLMSGHDR = struct.Struct("=IHHII")


class NetlinkError(OSError):
    """The kernel answered a request with a negative errno (``NLMSG_ERROR``)."""

    def __init__(self, code: int, message: str = "") -> None:
        self.message = message
        text = os.strerror(code) + (f" ({message})" if message else "")
        super().__init__(code, text)


# --- control family attributes (include/uapi/linux/genetlink.h, netlink.h) -----------------


class CtrlAttr(enum.IntEnum):
    FAMILY_ID = 1
    FAMILY_NAME = 2
    VERSION = 3
    HDRSIZE = 4
    MAXATTR = 5
    OPS = 6
    MCAST_GROUPS = 7
    POLICY = 8
    OP_POLICY = 9
    OP = 10


class CtrlMcastGroupAttr(enum.IntEnum):
    """``CTRL_ATTR_MCAST_GRP_*``: one entry of CTRL_ATTR_MCAST_GROUPS (genetlink.h)."""

    NAME = 1
    ID = 2


class CtrlPolicyAttr(enum.IntEnum):
    DO = 1
    DUMP = 2


class AttrKind(enum.IntEnum):
    """``enum netlink_attribute_type`` (include/uapi/linux/netlink.h)."""

    INVALID = 0
    FLAG = 1
    U8 = 2
    U16 = 3
    U32 = 4
    U64 = 5
    S8 = 6
    S16 = 7
    S32 = 8
    S64 = 9
    BINARY = 10
    STRING = 11
    NUL_STRING = 12
    NESTED = 13
    NESTED_ARRAY = 14
    BITFIELD32 = 15
    SINT = 16
    UINT = 17

    @property
    def is_string(self) -> bool:
        return self in (AttrKind.STRING, AttrKind.NUL_STRING)


class PolicyTypeAttr(enum.IntEnum):
    """``enum netlink_policy_type_attr`` (include/uapi/linux/netlink.h)."""

    TYPE = 1
    MIN_VALUE_S = 2
    MAX_VALUE_S = 3
    MIN_VALUE_U = 4
    MAX_VALUE_U = 5
    MIN_LENGTH = 6
    MAX_LENGTH = 7
    POLICY_IDX = 8
    POLICY_MAXTYPE = 9
    BITFIELD32_MASK = 10
    PAD = 11
    MASK = 12


# --- pure parsers ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RawMessage:
    """One netlink message: header fields and the payload after ``struct nlmsghdr``."""

    msg_type: int
    flags: int
    seq: int
    pid: int
    payload: bytes

    @property
    def genl_cmd(self) -> int:
        if len(self.payload) < GENL_HDRLEN:
            raise NetlinkFormatError("generic netlink message without genlmsghdr")
        return self.payload[0]

    @property
    def genl_attrs(self) -> bytes:
        if len(self.payload) < GENL_HDRLEN:
            raise NetlinkFormatError("generic netlink message without genlmsghdr")
        return self.payload[GENL_HDRLEN:]

    def encode(self) -> bytes:
        """The whole message again, header included (tests and stand-in peers use it)."""
        return (
            _NLMSGHDR.pack(NLMSG_HDRLEN + len(self.payload), self.msg_type, self.flags,
                           self.seq, self.pid)
            + self.payload
        )


def split_messages(data: bytes) -> list[RawMessage]:
    """Split one datagram into its netlink messages (strict about lengths)."""
    out: list[RawMessage] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < NLMSG_HDRLEN:
            raise NetlinkFormatError(f"truncated netlink header at offset {offset}")
        length, msg_type, flags, seq, pid = _NLMSGHDR.unpack_from(data, offset)
        if length < NLMSG_HDRLEN or offset + length > len(data):
            raise NetlinkFormatError(
                f"netlink message at offset {offset} has bad length {length}"
            )
        out.append(RawMessage(msg_type, flags, seq, pid,
                              bytes(data[offset + NLMSG_HDRLEN : offset + length])))
        offset += (length + 3) & ~3
    return out


def decode_error(message: RawMessage) -> tuple[int, str]:
    """Decode ``struct nlmsgerr``: (positive errno, 0 for an ACK; extended-ACK message).

    The echoed request is skipped whether or not the kernel capped it (NETLINK_CAP_ACK);
    the message text comes from the NLMSGERR_ATTR_MSG TLV when NETLINK_EXT_ACK is on.
    """
    payload = message.payload
    if len(payload) < 4 + NLMSG_HDRLEN:
        raise NetlinkFormatError(f"NLMSG_ERROR too short ({len(payload)} bytes)")
    (code,) = struct.unpack_from("=i", payload, 0)
    offset = 4 + NLMSG_HDRLEN
    if not message.flags & NLM_F_CAPPED:
        (echoed_len,) = struct.unpack_from("=I", payload, 4)
        offset = 4 + max(echoed_len, NLMSG_HDRLEN)
    text = ""
    if message.flags & NLM_F_ACK_TLVS and offset <= len(payload):
        with contextlib.suppress(NetlinkFormatError):
            for attr_type, value in decode_attrs(payload[(offset + 3) & ~3 :]):
                if attr_type == NLMSGERR_ATTR_MSG:
                    text = as_string(value, "extack message")
    return -code, text


@dataclass(frozen=True)
class FamilyInfo:
    """A generic netlink family as the control family describes it."""

    name: str
    family_id: int
    version: int
    mcast_groups: dict[str, int] = field(default_factory=dict)


def parse_family_reply(message: RawMessage) -> FamilyInfo:
    """Decode a CTRL_CMD_NEWFAMILY message (the answer to GETFAMILY).

    ``genl_ctrl_fill_info()`` sends FAMILY_ID (u16), FAMILY_NAME (string), VERSION (u32),
    HDRSIZE, MAXATTR, OPS and MCAST_GROUPS, a nest of numbered nests
    ``{ MCAST_GRP_NAME (string), MCAST_GRP_ID (u32) }``. Attributes not needed are skipped.
    """
    if message.genl_cmd != CTRL_CMD_NEWFAMILY:
        raise NetlinkFormatError(f"GETFAMILY answered with control command {message.genl_cmd}")
    family_id: int | None = None
    name = ""
    version = 0
    groups: dict[str, int] = {}
    for attr_type, payload in decode_attrs(message.genl_attrs):
        if attr_type == CtrlAttr.FAMILY_ID:
            family_id = as_u16(payload, "family id")
        elif attr_type == CtrlAttr.FAMILY_NAME:
            name = as_string(payload, "family name")
        elif attr_type == CtrlAttr.VERSION:
            version = as_u32(payload, "family version")
        elif attr_type == CtrlAttr.MCAST_GROUPS:
            for _, entry in decode_attrs(payload):
                fields = dict(decode_attrs(entry))
                group_name = fields.get(CtrlMcastGroupAttr.NAME)
                group_id = fields.get(CtrlMcastGroupAttr.ID)
                if group_name is not None and group_id is not None:
                    groups[as_string(group_name, "group name")] = as_u32(group_id, "group id")
    if family_id is None:
        raise NetlinkFormatError("GETFAMILY reply without CTRL_ATTR_FAMILY_ID")
    return FamilyInfo(name=name, family_id=family_id, version=version, mcast_groups=groups)


@dataclass(frozen=True)
class AttrPolicy:
    """How the kernel validates one attribute of one command (one NL_POLICY_TYPE_ATTR_* nest).

    ``kind`` is an :class:`AttrKind` when known, else the raw number (newer kernels).
    """

    attr_type: int
    kind: AttrKind | int
    min_value: int | None = None
    max_value: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    nested_policy: int | None = None
    nested_maxtype: int | None = None

    @property
    def is_u32(self) -> bool:
        return self.kind in (AttrKind.U32, AttrKind.UINT)

    @property
    def is_string(self) -> bool:
        return isinstance(self.kind, AttrKind) and self.kind.is_string


@dataclass(frozen=True)
class OpPolicy:
    """Which policy index a command's ``do`` and ``dump`` handlers validate against."""

    do: int | None = None
    dump: int | None = None


@dataclass(frozen=True)
class FamilyPolicy:
    """A parsed CTRL_CMD_GETPOLICY dump: per-command policy indices and the policies."""

    family_id: int | None
    ops: dict[int, OpPolicy]
    policies: dict[int, dict[int, AttrPolicy]]

    def do_policy(self, cmd: int) -> dict[int, AttrPolicy]:
        """The attributes ``cmd``'s doit accepts ({} when the command has no policy)."""
        op = self.ops.get(cmd)
        if op is None or op.do is None:
            return {}
        return self.policies.get(op.do, {})


def _policy_int(payload: bytes, name: str) -> int:
    """Policy values come as u32 or u64/s64 depending on the field."""
    if len(payload) == 4:
        return as_u32(payload, name)
    if len(payload) == 8:
        return int(struct.unpack("=q" if name.endswith("_s") else "=Q", payload)[0])
    raise NetlinkFormatError(f"{name}: expected 4 or 8 bytes, got {len(payload)}")


def parse_attr_policy(attr_type: int, nest: bytes) -> AttrPolicy:
    """Parse one attribute's ``NL_POLICY_TYPE_ATTR_*`` nest."""
    values: dict[int, bytes] = dict(decode_attrs(nest))
    if PolicyTypeAttr.TYPE not in values:
        raise NetlinkFormatError(f"policy for attribute {attr_type} has no type")
    raw_kind = as_u32(values[PolicyTypeAttr.TYPE], "policy type")
    try:
        kind: AttrKind | int = AttrKind(raw_kind)
    except ValueError:
        kind = raw_kind

    def get(key: PolicyTypeAttr, name: str) -> int | None:
        return _policy_int(values[key], name) if key in values else None

    min_value = get(PolicyTypeAttr.MIN_VALUE_U, "min_value_u")
    max_value = get(PolicyTypeAttr.MAX_VALUE_U, "max_value_u")
    if min_value is None:
        min_value = get(PolicyTypeAttr.MIN_VALUE_S, "min_value_s")
    if max_value is None:
        max_value = get(PolicyTypeAttr.MAX_VALUE_S, "max_value_s")
    return AttrPolicy(
        attr_type=attr_type,
        kind=kind,
        min_value=min_value,
        max_value=max_value,
        min_length=get(PolicyTypeAttr.MIN_LENGTH, "min_length"),
        max_length=get(PolicyTypeAttr.MAX_LENGTH, "max_length"),
        nested_policy=get(PolicyTypeAttr.POLICY_IDX, "policy_idx"),
        nested_maxtype=get(PolicyTypeAttr.POLICY_MAXTYPE, "policy_maxtype"),
    )


def parse_policy_dump(messages: Iterable[bytes]) -> FamilyPolicy:
    """Parse the attribute payloads (after the genl header) of a GETPOLICY dump.

    The kernel (``ctrl_dumppolicy()``) sends one message per command
    (``CTRL_ATTR_OP_POLICY { cmd { POLICY_DO: idx, POLICY_DUMP: idx } }``) and then one per
    attribute of every policy (``CTRL_ATTR_POLICY { idx { attr { NL_POLICY_TYPE_ATTR_* } } }``),
    each also carrying ``CTRL_ATTR_FAMILY_ID``. Unknown attributes are ignored.
    """
    family_id: int | None = None
    ops: dict[int, OpPolicy] = {}
    policies: dict[int, dict[int, AttrPolicy]] = {}
    for attrs in messages:
        for attr_type, payload in decode_attrs(attrs):
            if attr_type == CtrlAttr.FAMILY_ID:
                family_id = as_u16(payload, "family id")
            elif attr_type == CtrlAttr.OP_POLICY:
                for cmd, nest in decode_attrs(payload):
                    entry = dict(decode_attrs(nest))
                    do = entry.get(CtrlPolicyAttr.DO)
                    dump = entry.get(CtrlPolicyAttr.DUMP)
                    ops[cmd] = OpPolicy(
                        do=as_u32(do, "policy do") if do is not None else None,
                        dump=as_u32(dump, "policy dump") if dump is not None else None,
                    )
            elif attr_type == CtrlAttr.POLICY:
                for index, nest in decode_attrs(payload):
                    table = policies.setdefault(index, {})
                    for policy_attr, type_nest in decode_attrs(nest):
                        table[policy_attr] = parse_attr_policy(policy_attr, type_nest)
    return FamilyPolicy(family_id=family_id, ops=ops, policies=policies)


# --- the netlink socket edge ------------------------------------------------------------------


class NetlinkChannel:
    """A non-blocking generic netlink socket with request/answer matching by sequence number.

    ``sock`` may be any datagram socket that carries netlink messages (the kernel's
    ``AF_NETLINK``; tests use an ``AF_UNIX`` datagram pair talking to a stand-in peer).
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._seq = int(time.time()) & 0x7FFFFFFF
        self._lock = asyncio.Lock()

    @classmethod
    def open(cls) -> NetlinkChannel:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_GENERIC
        )
        try:
            sock.bind((0, 0))
            for option in (NETLINK_EXT_ACK, NETLINK_CAP_ACK):
                with contextlib.suppress(OSError):  # extended ACKs are a nicety
                    sock.setsockopt(SOL_NETLINK, option, 1)
        except OSError:
            sock.close()
            raise
        return cls(sock)

    def fileno(self) -> int:
        return self.sock.fileno()

    @property
    def busy(self) -> bool:
        """An asynchronous exchange is in progress."""
        return self._lock.locked()

    def close(self) -> None:
        self.sock.close()

    def join_group(self, group_id: int) -> None:
        self.sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group_id)

    def next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def read_available(self) -> list[RawMessage]:
        """Everything queued now (non-blocking); malformed datagrams are logged and dropped."""
        out: list[RawMessage] = []
        netlink = self.sock.family == socket.AF_NETLINK
        while True:
            try:
                data, sender = self.sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return out
            if not data:
                return out
            if netlink and sender and sender[0] != 0:
                # Only the kernel (port 0) speaks for the handshake family.
                log.debug("dropped a netlink datagram from user port %d", sender[0])
                continue
            try:
                out.extend(split_messages(data))
            except NetlinkFormatError as exc:
                log.warning("dropped a malformed netlink datagram: %s", exc)

    def _build(self, msg_type: int, cmd: int, attrs: bytes, flags: int, version: int
               ) -> tuple[int, bytes]:
        seq = self.next_seq()
        return seq, encode_genl(msg_type, cmd, attrs, flags=NLM_F_REQUEST | flags, seq=seq,
                                version=version)

    @staticmethod
    def _collect(seq: int, messages: Iterable[RawMessage], into: list[RawMessage],
                 dump: bool) -> bool:
        """Add the answers to ``seq``; True once the exchange is complete (raises on error)."""
        for message in messages:
            if message.seq != seq:
                log.debug("ignoring netlink message with stale seq %d", message.seq)
                continue
            if message.msg_type == NLMSG_ERROR:
                code, text = decode_error(message)
                if code:
                    raise NetlinkError(code, text)
                return True  # the ACK ends a non-dump exchange
            if message.msg_type == NLMSG_DONE:
                if len(message.payload) >= 4:
                    (code,) = struct.unpack_from("=i", message.payload, 0)
                    if code < 0:
                        raise NetlinkError(-code)
                return True
            into.append(message)
        return False

    def transact_sync(self, msg_type: int, cmd: int, attrs: bytes, *, dump: bool = False,
                      version: int = 1, timeout: float = TRANSACTION_TIMEOUT
                      ) -> list[RawMessage]:
        """Send one request and wait (blocking) for its complete answer."""
        seq, msg = self._build(msg_type, cmd, attrs, NLM_F_DUMP if dump else NLM_F_ACK, version)
        self.sock.send(msg)
        answers: list[RawMessage] = []
        deadline = time.monotonic() + timeout
        while True:
            if self._collect(seq, self.read_available(), answers, dump):
                return answers
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no answer from the kernel")
            select.select([self.sock], [], [], remaining)

    async def transact(self, msg_type: int, cmd: int, attrs: bytes, *, dump: bool = False,
                       version: int = 1, timeout: float = TRANSACTION_TIMEOUT
                       ) -> list[RawMessage]:
        """Send one request and await its complete answer on the running loop."""
        loop = asyncio.get_running_loop()
        async with self._lock:
            seq, msg = self._build(msg_type, cmd, attrs,
                                   NLM_F_DUMP if dump else NLM_F_ACK, version)
            self.sock.send(msg)
            answers: list[RawMessage] = []
            async with asyncio.timeout(timeout):
                while True:
                    if self._collect(seq, self.read_available(), answers, dump):
                        return answers
                    readable: asyncio.Future[None] = loop.create_future()
                    loop.add_reader(self.sock.fileno(), _set_once, readable)
                    try:
                        await readable
                    finally:
                        loop.remove_reader(self.sock.fileno())


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)



def lookup_family(channel: NetlinkChannel, name: str) -> FamilyInfo:
    """GETFAMILY ``name``: :class:`NetlinkError` ENOENT when the kernel has no such family."""
    answers = channel.transact_sync(
        GENL_ID_CTRL, CTRL_CMD_GETFAMILY, encode_attr(CtrlAttr.FAMILY_NAME, string(name))
    )
    if not answers:
        raise NetlinkFormatError(f"no answer describing netlink family {name!r}")
    return parse_family_reply(answers[0])


def dump_policy(channel: NetlinkChannel, family: FamilyInfo, cmd: int | None = None
                ) -> FamilyPolicy:
    """CTRL_CMD_GETPOLICY for ``family`` (restricted to one command when ``cmd`` is given)."""
    attrs = encode_attr(CtrlAttr.FAMILY_ID, u16(family.family_id))
    if cmd is not None:
        attrs += encode_attr(CtrlAttr.OP, u32(cmd))
    answers = channel.transact_sync(GENL_ID_CTRL, CTRL_CMD_GETPOLICY, attrs, dump=True)
    return parse_policy_dump(m.genl_attrs for m in answers)


def probe_family_policy(name: str, cmd: int | None = None) -> tuple[FamilyInfo, FamilyPolicy]:
    """Look ``name`` up and dump its policy (any family; tests ask about nlctrl)."""
    channel = NetlinkChannel.open()
    try:
        family = lookup_family(channel, name)
        return family, dump_policy(channel, family, cmd)
    finally:
        channel.close()
