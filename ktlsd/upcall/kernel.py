"""The kernel upcall source: the ``handshake`` generic netlink family, served on asyncio.

How a kernel consumer's request reaches us (``net/handshake/netlink.c``)::

    kernel                                   ktlsd
    ------                                   -----
    READY(handler-class) ── multicast ──►    group "tlshd": something is queued
                         ◄── ACCEPT(handler-class=tlshd)
    reply(sockfd, ...)   ──────────────►     a HandshakeRequest; the fd is now ours
         ... or an error: -EAGAIN (nothing queued, or another agent took it)
                         ◄── DONE(status, sockfd, remote-auth, ...)
                                             close our copy of the fd

The kernel sends one READY per submitted request, but a READY may be lost (a full socket
buffer) or answer a request another agent already took, so READY is only a *hint*: on each
hint the source ACCEPTs until the kernel answers EAGAIN. Requests are ACCEPTed lazily, when
the agent asks for the next one, so requests beyond the agent's concurrency stay queued in
the kernel, where the kernel's pending limit protects the system.

Two netlink sockets are used: one joined to the multicast group that only ever receives
READY, and one for the ACCEPT/DONE exchanges, whose answers the kernel queues before
``send`` returns (generic netlink runs the command handler in the sender's context).

What the running kernel accepts in DONE is learned from the control family's per-command
policy dump (``CTRL_CMD_GETPOLICY``), never from the kernel version: a kernel with strict
validation rejects a DONE carrying an attribute its policy does not declare, and DONE
attribute 4 means ``session-id`` (u32, proposed KeyUpdate series) on some trees and ``tag``
(a string, nfsd tree) on others. The ACCEPT *reply* attributes (peername, keyring,
key-update-request, session-id) are not part of any input policy -- the kernel only
declares what it *receives* -- so the source simply parses whatever arrives and records
which reply attributes it has seen (:attr:`KernelSource.seen_reply_attrs`).

Design note: pyroute2 is used for the netlink constants and for decoding the control
family's GETFAMILY reply (:class:`pyroute2.netlink.ctrlmsg`). Its socket classes are not
used: pyroute2 0.9's synchronous sockets drive an event loop of their own and fail inside a
running asyncio loop, and its asynchronous sockets own the descriptor and its reader. A plain
non-blocking ``AF_NETLINK`` socket on ``loop.add_reader`` with the handshake codec of
:mod:`ktlsd.upcall.netlink` keeps this edge thin and every byte visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field, replace

from pyroute2.netlink import (
    CTRL_CMD_GETFAMILY,
    CTRL_CMD_GETPOLICY,
    GENL_ID_CTRL,
    NETLINK_ADD_MEMBERSHIP,
    NETLINK_EXT_ACK,
    NETLINK_GENERIC,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    SOL_NETLINK,
    ctrlmsg,
)

from ktlsd.request import (
    ConsumerCredentials,
    HandlerClass,
    HandshakeDone,
    HandshakeRequest,
    KeyDelivery,
)
from ktlsd.upcall.netlink import (
    FAMILY_NAME,
    MCGRP_TLSHD,
    AcceptAttr,
    Command,
    DoneAttr,
    DoneAttr4,
    DoneAttributes,
    decode_accept_reply,
    decode_ready,
    encode_accept_command,
    encode_done,
)
from ktlsd.upcall.nlattr import (
    GENL_HDRLEN,
    NLMSG_HDRLEN,
    NetlinkFormatError,
    as_s32,
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

log = logging.getLogger("ktlsd.upcall.kernel")

NETLINK_CAP_ACK = 10  # not exported by pyroute2: error messages omit the echoed request
NLM_F_CAPPED = 0x100
NLM_F_ACK_TLVS = 0x200
NLMSGERR_ATTR_MSG = 1
CAP_NET_ADMIN = 12

TRANSACTION_TIMEOUT = 5.0
"""Seconds to wait for the kernel's answer to one request. Generic netlink answers before
``send`` returns, so this only guards against a wedged socket."""

_RECV_SIZE = 1 << 16
_NLMSGHDR = struct.Struct("=IHHII")


class KernelSourceError(RuntimeError):
    """The kernel source cannot be used here; ``str()`` is one line saying why."""


class NetlinkError(OSError):
    """The kernel answered a request with a negative errno (``NLMSG_ERROR``)."""

    def __init__(self, code: int, message: str = "") -> None:
        self.message = message
        text = os.strerror(code) + (f" ({message})" if message else "")
        super().__init__(code, text)


# --- control family constants (include/uapi/linux/genetlink.h) ---------------------------


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


# --- pure parsers --------------------------------------------------------------------------


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
        """Re-frame (used by tests and by pyroute2's decoder, which wants the whole message)."""
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
    """Decode a CTRL_CMD_NEWFAMILY reply (the answer to GETFAMILY) with pyroute2's ctrlmsg."""
    msg = ctrlmsg(message.encode())
    try:
        msg.decode()
    except Exception as exc:  # pyroute2 raises assorted types on garbage
        raise NetlinkFormatError(f"undecodable GETFAMILY reply: {exc}") from None
    family_id = msg.get_attr("CTRL_ATTR_FAMILY_ID")
    if family_id is None:
        raise NetlinkFormatError("GETFAMILY reply without CTRL_ATTR_FAMILY_ID")
    groups: dict[str, int] = {}
    for group in msg.get_attr("CTRL_ATTR_MCAST_GROUPS") or []:
        name = group.get_attr("CTRL_ATTR_MCAST_GRP_NAME")
        group_id = group.get_attr("CTRL_ATTR_MCAST_GRP_ID")
        if name is not None and group_id is not None:
            groups[str(name)] = int(group_id)
    return FamilyInfo(
        name=str(msg.get_attr("CTRL_ATTR_FAMILY_NAME") or ""),
        family_id=int(family_id),
        version=int(msg.get_attr("CTRL_ATTR_VERSION") or 0),
        mcast_groups=groups,
    )


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


@dataclass(frozen=True)
class KernelCapabilities:
    """What the running kernel's ``handshake`` family declares.

    ``accept_attrs``/``done_attrs`` are the input policies of the ACCEPT and DONE commands
    (what the kernel will accept from us). ``policy_known`` is False when the policy could
    not be dumped; the conservative defaults then apply (status, sockfd, remote-auth).
    """

    family: FamilyInfo
    accept_attrs: dict[int, AttrPolicy] = field(default_factory=dict)
    done_attrs: dict[int, AttrPolicy] = field(default_factory=dict)
    policy_known: bool = False

    @property
    def done_attr4(self) -> DoneAttr4:
        """DONE attribute 4 by its declared *type*: u32 = session-id, string = tag."""
        policy = self.done_attrs.get(DoneAttr.SESSION_ID_OR_TAG)
        if policy is None:
            return DoneAttr4.ABSENT
        if policy.is_u32:
            return DoneAttr4.SESSION_ID
        if policy.is_string:
            return DoneAttr4.TAG
        return DoneAttr4.ABSENT

    @property
    def done_attributes(self) -> DoneAttributes:
        return DoneAttributes(attr4=self.done_attr4)

    @property
    def done_remote_auth(self) -> bool:
        """Every kernel with the family has remote-auth; trust the policy when we have it."""
        return DoneAttr.REMOTE_AUTH in self.done_attrs if self.policy_known else True

    @property
    def handler_class_max(self) -> int | None:
        policy = self.accept_attrs.get(AcceptAttr.HANDLER_CLASS)
        return policy.max_value if policy is not None else None

    def describe(self) -> list[str]:
        """Short human-readable facts, one per line (for logs and ``ktlsd doctor``)."""
        if not self.policy_known:
            return ["policy dump unavailable: assuming status, sockfd, remote-auth"]
        names = {1: "status", 2: "sockfd", 3: "remote-auth", 4: self.done_attr4.value}
        done = ", ".join(names.get(a, f"attr {a}") for a in sorted(self.done_attrs))
        lines = [f"DONE accepts: {done or '-'}"]
        accept = ", ".join(
            AcceptAttr(a).name.lower().replace("_", "-") if a in AcceptAttr._value2member_map_
            else f"attr {a}"
            for a in sorted(self.accept_attrs)
        )
        lines.append(f"ACCEPT command accepts: {accept or '-'}")
        return lines


def capabilities_from_policies(
    family: FamilyInfo, accept: FamilyPolicy | None, done: FamilyPolicy | None
) -> KernelCapabilities:
    if accept is None or done is None:
        return KernelCapabilities(family=family)
    return KernelCapabilities(
        family=family,
        accept_attrs=dict(accept.do_policy(Command.ACCEPT)),
        done_attrs=dict(done.do_policy(Command.DONE)),
        policy_known=True,
    )


def has_capability(capability: int, proc_status: str) -> bool:
    """Whether ``CapEff`` in a /proc/<pid>/status text includes ``capability``."""
    for line in proc_status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> capability & 1)
    return False


def has_net_admin() -> bool:
    """Whether this process may ACCEPT (the ACCEPT command is GENL_ADMIN_PERM)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return has_capability(CAP_NET_ADMIN, status.read())
    except OSError:
        return os.geteuid() == 0


# --- the netlink socket edge ---------------------------------------------------------------


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


def resolve_family(channel: NetlinkChannel, name: str) -> FamilyInfo:
    """Ask the control family about ``name``; KernelSourceError when it does not exist."""
    try:
        answers = channel.transact_sync(
            GENL_ID_CTRL, CTRL_CMD_GETFAMILY, encode_attr(CtrlAttr.FAMILY_NAME, string(name))
        )
    except NetlinkError as exc:
        if exc.errno == errno.ENOENT:
            raise KernelSourceError(f"kernel has no {name!r} netlink family") from None
        raise KernelSourceError(f"cannot look up netlink family {name!r}: {exc}") from None
    except (OSError, TimeoutError) as exc:
        raise KernelSourceError(f"cannot look up netlink family {name!r}: {exc}") from None
    if not answers:
        raise KernelSourceError(f"no answer describing netlink family {name!r}")
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
    """Resolve ``name`` and dump its policy (any family; used for nlctrl in tests)."""
    channel = NetlinkChannel.open()
    try:
        family = resolve_family(channel, name)
        return family, dump_policy(channel, family, cmd)
    finally:
        channel.close()


_NO_FAMILY = (
    f"kernel has no {FAMILY_NAME!r} netlink family "
    "(Linux >= 6.5 with CONFIG_NET_HANDSHAKE needed)"
)


def _probe_with(channel: NetlinkChannel) -> KernelCapabilities:
    try:
        family = resolve_family(channel, FAMILY_NAME)
    except KernelSourceError as exc:
        if "has no" in str(exc):
            raise KernelSourceError(_NO_FAMILY) from None
        raise
    try:
        accept = dump_policy(channel, family, Command.ACCEPT)
        done = dump_policy(channel, family, Command.DONE)
    except (NetlinkError, NetlinkFormatError, TimeoutError) as exc:
        log.warning("handshake family policy dump failed (%s); using defaults", exc)
        return capabilities_from_policies(family, None, None)
    return capabilities_from_policies(family, accept, done)


def _open_channel() -> NetlinkChannel:
    try:
        return NetlinkChannel.open()
    except OSError as exc:
        raise KernelSourceError(
            f"cannot open a generic netlink socket: {exc.strerror or exc}"
        ) from None


def probe_kernel_policy() -> KernelCapabilities:
    """Learn what the running kernel's ``handshake`` family declares.

    Raises :class:`KernelSourceError` (one line) when the family does not exist.
    """
    channel = _open_channel()
    try:
        return _probe_with(channel)
    finally:
        channel.close()


# --- the upcall source -----------------------------------------------------------------------


class _Malformed:
    """Marker: an ACCEPT reply was undecodable and has been answered with EINVAL."""


_MALFORMED = _Malformed()


class KernelRequest:
    """One ACCEPTed request; :meth:`done` sends DONE and closes the agent's descriptor.

    The kernel is the consumer: trusted (no credentials), it owns the session kept for later
    key updates, and it gets kTLS installed rather than secrets. It has no way to withdraw an
    accepted request, so ``cancelled`` is never set.
    """

    source_name = "kernel"
    credentials: ConsumerCredentials | None = None
    delivery = KeyDelivery.INSTALL_KTLS

    def __init__(self, source: KernelSource, request: HandshakeRequest) -> None:
        self.request = request
        self.cancelled = asyncio.Event()
        self._source = source
        self._answered = False

    @property
    def answered(self) -> bool:
        return self._answered

    async def done(self, answer: HandshakeDone) -> None:
        if self._answered:
            log.warning("DONE for fd %d already sent; ignoring a second one",
                        self.request.sockfd)
            return
        self._answered = True
        await self._source._send_done(self.request.sockfd, answer)


class KernelSource:
    """The :class:`~ktlsd.request.UpcallSource` for kernel consumers (NVMe/TCP, NFS).

    Build it with :meth:`open`; iterate :meth:`requests` on an asyncio loop.
    """

    name = "kernel"

    def __init__(
        self,
        requests_channel: NetlinkChannel,
        notify_channel: NetlinkChannel,
        capabilities: KernelCapabilities,
        handler_class: HandlerClass = HandlerClass.TLSHD,
    ) -> None:
        self.capabilities = capabilities
        self.handler_class = handler_class
        self.seen_reply_attrs: set[int] = set()
        self._requests = requests_channel
        self._notify = notify_channel
        self._wakeup: asyncio.Event | None = None
        self._closed = False
        self._reader_installed = False
        self._in_flight = 0
        self._refused_logged = False

    @classmethod
    def open(cls, handler_class: HandlerClass = HandlerClass.TLSHD) -> KernelSource:
        """Resolve the family, learn its policy and join the ``tlshd`` multicast group.

        Raises :class:`KernelSourceError` with a one-line reason when the kernel has no
        ``handshake`` family, when we lack CAP_NET_ADMIN (ACCEPT requires it) or when the
        multicast group cannot be joined.
        """
        requests_channel = _open_channel()
        notify_channel: NetlinkChannel | None = None
        try:
            capabilities = _probe_with(requests_channel)
            if not has_net_admin():
                raise KernelSourceError(
                    "the handshake family's ACCEPT needs CAP_NET_ADMIN (run ktlsd as root)"
                )
            group = capabilities.family.mcast_groups.get(MCGRP_TLSHD)
            if group is None:
                raise KernelSourceError(
                    f"the handshake family has no {MCGRP_TLSHD!r} multicast group"
                )
            notify_channel = _open_channel()
            try:
                notify_channel.join_group(group)
            except OSError as exc:
                raise KernelSourceError(
                    f"cannot join multicast group {MCGRP_TLSHD!r}: {exc.strerror or exc}"
                ) from None
        except BaseException:
            requests_channel.close()
            if notify_channel is not None:
                notify_channel.close()
            raise
        for line in capabilities.describe():
            log.info("handshake family: %s", line)
        return cls(requests_channel, notify_channel, capabilities, handler_class)

    # -- READY ------------------------------------------------------------------------------

    def _on_notify_readable(self) -> None:
        try:
            messages = self._notify.read_available()
        except OSError as exc:
            # ENOBUFS: READYs were dropped -- drain anyway; anything else: same, and log it.
            log.warning("handshake notifications: %s; polling the kernel", exc.strerror or exc)
            messages = []
            self._wake()
        for message in messages:
            if message.msg_type != self.capabilities.family.family_id:
                continue
            try:
                if message.genl_cmd != Command.READY:
                    continue
                if decode_ready(message.genl_attrs) is self.handler_class:
                    self._wake()
            except NetlinkFormatError as exc:
                log.warning("malformed READY ignored: %s", exc)

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # -- ACCEPT -----------------------------------------------------------------------------

    async def requests(self) -> AsyncIterator[KernelRequest]:
        """Accepted requests, ACCEPTed one at a time as the consumer asks for them."""
        loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._wakeup.set()  # drain whatever was queued before we listened
        if not self._closed:
            loop.add_reader(self._notify.fileno(), self._on_notify_readable)
            self._reader_installed = True
        try:
            while not self._closed:
                await self._wakeup.wait()
                self._wakeup.clear()
                while not self._closed:
                    request = await self._accept_one()
                    if request is None:
                        break
                    if request is _MALFORMED:
                        continue  # answered EINVAL; the kernel may have more
                    assert isinstance(request, KernelRequest)
                    yield request
        finally:
            self._remove_reader()
            self._maybe_close_requests()

    async def _accept_one(self) -> KernelRequest | _Malformed | None:
        """ACCEPT once: a request, or None when the kernel has nothing (more) for us."""
        family_id = self.capabilities.family.family_id
        try:
            answers = await self._requests.transact(
                family_id, Command.ACCEPT, encode_accept_command(self.handler_class),
                version=self.capabilities.family.version or 1,
            )
        except NetlinkError as exc:
            if exc.errno in (errno.EAGAIN, errno.ENOENT):
                return None
            if exc.errno in (errno.EPERM, errno.EACCES):
                if not self._refused_logged:
                    log.error("ACCEPT refused (%s): ktlsd needs CAP_NET_ADMIN", exc.strerror)
                    self._refused_logged = True
                return None
            log.warning("ACCEPT failed: %s", exc.strerror)
            return None
        except (OSError, TimeoutError, NetlinkFormatError) as exc:
            log.warning("ACCEPT failed: %s", exc)
            return None
        replies = [m for m in answers if m.msg_type == family_id]
        if not replies:
            log.warning("ACCEPT answered without a request")
            return None
        attrs = replies[0].genl_attrs
        try:
            request = decode_accept_reply(attrs)
        except NetlinkFormatError as exc:
            await self._reject_malformed(attrs, exc)
            return _MALFORMED
        with contextlib.suppress(NetlinkFormatError):
            self.seen_reply_attrs.update(t for t, _ in decode_attrs(attrs))
        self._in_flight += 1
        return KernelRequest(self, request)

    async def _reject_malformed(self, attrs: bytes, exc: NetlinkFormatError) -> None:
        """An undecodable reply still handed us a socket: give it back with EINVAL."""
        sockfd: int | None = None
        with contextlib.suppress(NetlinkFormatError):
            for attr_type, payload in decode_attrs(attrs):
                if attr_type == AcceptAttr.SOCKFD:
                    sockfd = as_s32(payload, "sockfd")
        if sockfd is None or sockfd < 0:
            log.warning("malformed ACCEPT reply ignored: %s", exc)
            return
        log.warning("malformed ACCEPT reply for fd %d: %s; answering EINVAL", sockfd, exc)
        self._in_flight += 1
        await self._send_done(sockfd, HandshakeDone(status=errno.EINVAL, sockfd=sockfd))

    # -- DONE -------------------------------------------------------------------------------

    async def _send_done(self, sockfd: int, answer: HandshakeDone) -> None:
        caps = self.capabilities
        status = answer.status
        if status < 0:  # a negative errno slipped through: the kernel wants it positive
            log.warning("DONE for fd %d: negative status %d sent as %d", sockfd, status,
                        -status)
            status = -status
        answer = replace(
            answer,
            status=status,
            sockfd=sockfd,
            remote_auth=answer.remote_auth if answer.status == 0 and caps.done_remote_auth
            else (),
            session=None,
        )
        try:
            await self._requests.transact(
                caps.family.family_id, Command.DONE, encode_done(answer, caps.done_attributes),
                version=caps.family.version or 1,
            )
        except NetlinkError as exc:
            if exc.errno == errno.EBUSY:
                log.info("DONE for fd %d: request no longer pending (cancelled by the "
                         "consumer)", sockfd)
            else:
                log.warning("DONE for fd %d failed: %s", sockfd, exc.strerror)
        except (OSError, TimeoutError) as exc:
            log.warning("DONE for fd %d failed: %s", sockfd, exc)
        finally:
            with contextlib.suppress(OSError):
                os.close(sockfd)
            self._in_flight -= 1
            self._maybe_close_requests()

    # -- shutdown ---------------------------------------------------------------------------

    def _remove_reader(self) -> None:
        if self._reader_installed:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._notify.fileno())
            self._reader_installed = False

    async def close(self) -> None:
        """Stop accepting; requests already ACCEPTed still get their DONE."""
        if self._closed:
            return
        self._closed = True
        self._remove_reader()
        self._notify.close()
        self._wake()
        self._maybe_close_requests()

    def _maybe_close_requests(self) -> None:
        """Close the ACCEPT/DONE socket once closed, idle and no DONE is owed."""
        if self._closed and self._in_flight <= 0 and not self._requests.busy:
            self._requests.close()
