"""The kernel upcall source.

Three layers, each with real parts where this machine has them:

* the pure parsers (netlink framing, NLMSG_ERROR, GETFAMILY replies, GETPOLICY dumps) against
  byte vectors
  written out by hand from include/uapi/linux/netlink.h and genetlink.h, and against bytes
  captured from Linux 7.3.4's handshake family in the VM test bed;
* the control-family request path against the running kernel (nlctrl answers GETPOLICY
  about itself), and the clean failure when the ``handshake`` family is absent;
* the READY -> ACCEPT drain -> DONE logic of :class:`KernelSource` on a real asyncio loop,
  with a stand-in for the kernel on the far end of AF_UNIX datagram sockets (this machine
  has no handshake family; the real kernel path is proven in the VM test bed). The stand-in
  answers the way ``handshake_nl_accept_doit()``/``handshake_nl_done_doit()`` do.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct

import pytest

from ktlsd.request import AuthMode, HandshakeDone, MessageType
from ktlsd.upcall.genl import (
    AttrKind,
    FamilyInfo,
    NetlinkChannel,
    NetlinkError,
    RawMessage,
    decode_error,
    parse_family_reply,
    parse_policy_dump,
    probe_family_policy,
    split_messages,
)
from ktlsd.upcall.kernel import (
    KernelCapabilities,
    KernelSource,
    KernelSourceError,
    capabilities_from_policies,
    has_capability,
    probe_kernel_policy,
    resolve_family,
)
from ktlsd.upcall.netlink import DoneAttr4, decode_done

# --- byte-vector helpers, written longhand ------------------------------------------------


def nla(attr_type: int, payload: bytes, nested: bool = False) -> bytes:
    raw = struct.pack("<HH", 4 + len(payload), attr_type | (0x8000 if nested else 0)) + payload
    return raw + b"\0" * (-len(raw) % 4)


def U16(v: int) -> bytes:
    return struct.pack("<H", v)


def U32(v: int) -> bytes:
    return struct.pack("<I", v)


def S32(v: int) -> bytes:
    return struct.pack("<i", v)


def U64(v: int) -> bytes:
    return struct.pack("<Q", v)


def nlmsg(msg_type: int, flags: int, seq: int, pid: int, payload: bytes) -> bytes:
    return struct.pack("<IHHII", 16 + len(payload), msg_type, flags, seq, pid) + payload


def genl(cmd: int, attrs: bytes, version: int = 1) -> bytes:
    return bytes([cmd, version, 0, 0]) + attrs


# NL_POLICY_TYPE_ATTR_*: TYPE=1 MIN_VALUE_U=4 MAX_VALUE_U=5 MAX_LENGTH=7 PAD=11
def policy_attr(index: int, attr: int, kind: int, *extra: bytes) -> bytes:
    """One GETPOLICY policy message body: CTRL_ATTR_FAMILY_ID + CTRL_ATTR_POLICY nest."""
    inner = nla(1, U32(kind)) + b"".join(extra)
    return nla(1, U16(0x1D)) + nla(8, nla(index, nla(attr, inner, True), True), True)


def op_policy(cmd: int, do: int | None, dump: int | None = None) -> bytes:
    body = (nla(1, U32(do)) if do is not None else b"") + (
        nla(2, U32(dump)) if dump is not None else b""
    )
    return nla(1, U16(0x1D)) + nla(9, nla(cmd, body, True), True)


# The DONE policy of a 6.5-era kernel (handshake_done_nl_policy): status u32, sockfd s32,
# remote-auth u32.
DONE_BASE = [
    op_policy(3, 0),
    policy_attr(0, 1, 4),
    policy_attr(0, 2, 8),
    policy_attr(0, 3, 4),
]
# The ACCEPT policy: handler-class NLA_POLICY_MAX(NLA_U32, 2) -> min/max as u64 with a PAD.
ACCEPT_POLICY = [
    op_policy(2, 0),
    policy_attr(0, 2, 4, nla(11, b""), nla(4, U64(0)), nla(5, U64(2))),
]


# --- framing and errors -------------------------------------------------------------------


def test_split_messages_and_alignment() -> None:
    first = nlmsg(0x1D, 0, 7, 0, genl(1, nla(2, U32(1))))
    odd = nlmsg(0x1D, 0, 8, 0, b"\x01\x01\x00\x00\xaa")  # 21 bytes, padded to 24
    data = first + odd + b"\0" * 3 + nlmsg(3, 2, 9, 0, S32(0))
    messages = split_messages(data)
    assert [m.seq for m in messages] == [7, 8, 9]
    assert messages[0].genl_cmd == 1
    assert messages[1].payload.endswith(b"\xaa")
    assert messages[2].msg_type == 3


@pytest.mark.parametrize(
    "data",
    [b"\x10\0\0", struct.pack("<IHHII", 40, 0x1D, 0, 1, 0), struct.pack("<IHHII", 8, 2, 0, 1, 0)],
)
def test_split_messages_rejects_bad_lengths(data: bytes) -> None:
    from ktlsd.upcall.nlattr import NetlinkFormatError

    with pytest.raises(NetlinkFormatError):
        split_messages(data)


def test_decode_error_capped_with_extack_message() -> None:
    # struct nlmsgerr: s32 error, then the request's nlmsghdr (capped: no payload), then TLVs.
    echoed = struct.pack("<IHHII", 40, 0x1D, 5, 42, 1234)
    tlvs = nla(1, b"missing attribute: handler-class\0") + nla(2, U32(20))
    message = split_messages(nlmsg(2, 0x100 | 0x200, 42, 0, S32(-22) + echoed + tlvs))[0]
    assert decode_error(message) == (errno.EINVAL, "missing attribute: handler-class")


def test_decode_error_uncapped_skips_echoed_request_and_ack_is_zero() -> None:
    request = nlmsg(0x1D, 5, 43, 0, genl(2, nla(2, U32(1))))
    message = split_messages(nlmsg(2, 0, 43, 0, S32(-11) + request))[0]
    assert decode_error(message) == (errno.EAGAIN, "")
    ack = split_messages(nlmsg(2, 0x100, 44, 0, S32(0) + request[:16]))[0]
    assert decode_error(ack) == (0, "")


# --- GETFAMILY ----------------------------------------------------------------------------

# The control family describing itself, as Linux 6.18 sent it (CTRL_CMD_GETFAMILY "nlctrl" on
# the development host): the genl header (cmd 1 = NEWFAMILY, version 2), then FAMILY_NAME,
# FAMILY_ID, VERSION, HDRSIZE, MAXATTR, OPS (two ops) and MCAST_GROUPS (one: "notify" = 16).
LINUX_6_18_NLCTRL_FAMILY = (
    "010200000b0002006e6c6374726c000006000100100000000800030002000000080004000000000008000500"
    "000000002c000600140001000800010003000000080002000e00000014000200080001000a00000008000200"
    "0c0000001c0007001800010008000200100000000b0001006e6f746966790000"
)


def test_parse_family_reply_from_a_real_kernel() -> None:
    message = RawMessage(0x10, 0, 1, 0, bytes.fromhex(LINUX_6_18_NLCTRL_FAMILY))
    assert parse_family_reply(message) == FamilyInfo("nlctrl", 0x10, 2, {"notify": 0x10})


def test_parse_family_reply_handshake_family_longhand() -> None:
    # genl_ctrl_fill_info() for the handshake family: id, name, version 1, hdrsize 0,
    # maxattr, the ops (skipped), and MCAST_GROUPS { 1 { ID 0x20, NAME "tlshd" } }.
    group = nla(1, nla(2, U32(0x20)) + nla(1, b"tlshd\0"), True)
    attrs = (
        nla(1, U16(0x1D)) + nla(2, b"handshake\0") + nla(3, U32(1)) + nla(4, U32(0))
        + nla(5, U32(11)) + nla(6, nla(1, nla(1, U32(2)) + nla(2, U32(0xE)), True), True)
        + nla(7, group, True)
    )
    message = split_messages(nlmsg(0x10, 0, 5, 0, genl(1, attrs)))[0]
    assert parse_family_reply(message) == FamilyInfo("handshake", 0x1D, 1, {"tlshd": 0x20})


def test_parse_family_reply_rejects_other_commands_and_missing_id() -> None:
    from ktlsd.upcall.nlattr import NetlinkFormatError

    with pytest.raises(NetlinkFormatError, match="control command 3"):
        parse_family_reply(RawMessage(0x10, 0, 1, 0, genl(3, nla(2, b"x\0"))))
    with pytest.raises(NetlinkFormatError, match="without CTRL_ATTR_FAMILY_ID"):
        parse_family_reply(RawMessage(0x10, 0, 1, 0, genl(1, nla(2, b"x\0"))))
    with pytest.raises(NetlinkFormatError, match="family id"):
        parse_family_reply(RawMessage(0x10, 0, 1, 0, genl(1, nla(1, U32(0x1D)))))


def test_the_kernel_source_needs_no_pyroute2() -> None:
    """The generic netlink layer is ktlsd's own: importing the source loads no pyroute2."""
    import subprocess
    import sys

    code = ("import sys, ktlsd.upcall.kernel\n"
            "print(any(m.split('.')[0] == 'pyroute2' for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True)
    assert result.stdout.strip() == "False"


# --- GETPOLICY --------------------------------------------------------------------------


def test_parse_policy_dump_base_done_and_accept() -> None:
    done = parse_policy_dump(DONE_BASE)
    assert done.family_id == 0x1D
    attrs = done.do_policy(3)
    assert {a: p.kind for a, p in attrs.items()} == {
        1: AttrKind.U32, 2: AttrKind.S32, 3: AttrKind.U32,
    }
    accept = parse_policy_dump(ACCEPT_POLICY)
    handler = accept.do_policy(2)[2]
    assert (handler.kind, handler.min_value, handler.max_value) == (AttrKind.U32, 0, 2)
    caps = capabilities_from_policies(FamilyInfo("handshake", 0x1D, 1), accept, done)
    assert caps.policy_known and caps.done_remote_auth
    assert caps.done_attr4 is DoneAttr4.ABSENT
    assert caps.handler_class_max == 2
    assert caps.done_attributes.session_id is False


def test_done_attribute_4_is_told_apart_by_type() -> None:
    family = FamilyInfo("handshake", 0x1D, 1)
    accept = parse_policy_dump(ACCEPT_POLICY)
    with_session_id = parse_policy_dump([*DONE_BASE, policy_attr(0, 4, 4)])
    with_tag = parse_policy_dump([*DONE_BASE, policy_attr(0, 4, 12, nla(7, U32(31)))])
    with_string_tag = parse_policy_dump([*DONE_BASE, policy_attr(0, 4, 11)])
    assert capabilities_from_policies(family, accept, with_session_id).done_attr4 is (
        DoneAttr4.SESSION_ID
    )
    assert capabilities_from_policies(family, accept, with_tag).done_attr4 is DoneAttr4.TAG
    assert capabilities_from_policies(family, accept, with_string_tag).done_attr4 is (
        DoneAttr4.TAG
    )
    assert with_tag.do_policy(3)[4].max_length == 31


def test_policy_dump_unknown_kind_and_ops_without_policy() -> None:
    dump = parse_policy_dump([op_policy(3, 1), policy_attr(1, 9, 99)])
    assert dump.do_policy(3)[9].kind == 99
    assert dump.do_policy(2) == {}  # no such op in the dump
    assert parse_policy_dump([op_policy(5, None, 0)]).do_policy(5) == {}


def test_policy_dump_rejects_a_policy_without_type() -> None:
    from ktlsd.upcall.nlattr import NetlinkFormatError

    body = nla(1, U16(0x1D)) + nla(8, nla(0, nla(1, nla(7, U32(4)), True), True), True)
    with pytest.raises(NetlinkFormatError, match="no type"):
        parse_policy_dump([body])


def test_capabilities_default_when_policy_unknown() -> None:
    caps = KernelCapabilities(family=FamilyInfo("handshake", 0x1D, 1))
    assert caps.done_remote_auth and caps.done_attr4 is DoneAttr4.ABSENT
    assert "unavailable" in caps.describe()[0]


def test_has_capability_reads_capeff() -> None:
    status = "Name:\tx\nCapPrm:\t0000000000000000\nCapEff:\t0000000000001000\n"
    assert has_capability(12, status)
    assert not has_capability(21, status)
    assert not has_capability(12, "CapEff:\t0000000000000000\n")


# --- vectors captured from a real kernel ------------------------------------------------------
# Linux 7.3.4 (Debian trixie-backports) in the VM test bed, handshake family id 0x23: the
# GETPOLICY dumps for ACCEPT (cmd 2) and DONE (cmd 3) as they came off the socket (attributes
# after the genl header), a READY, and the ACCEPT reply for an NVMe/TCP host's TLS PSK request.
LINUX_7_3_ACCEPT_POLICY = [
    "0600010023000000100009800c0002800800010000000000",
    "06000100230000002c00088028000080240002800c00040000000000000000000c0005000200000000000000"
    "0800010004000000",
]
LINUX_7_3_DONE_POLICY = [
    "0600010023000000100009800c0003800800010000000000",
    "06000100230000002c00088028000080240001800c00040000000000000000000c000500ff0f000000000000"
    "0800010004000000",
    "06000100230000002c00088028000080240002800c00020000000080ffffffff0c000300ffffff7f00000000"
    "0800010008000000",
    "06000100230000002c00088028000080240003800c00040000000000000000000c000500ffffffff00000000"
    "0800010004000000",
]
LINUX_7_3_READY = "010100000800020001000000"
LINUX_7_3_ACCEPT_REPLY = (
    "080001000a000000080003000100000008000400102700000800090023605f03080005000200000008000600"
    "e613861b"
)


def test_real_kernel_policy_dump() -> None:
    accept = parse_policy_dump(bytes.fromhex(m) for m in LINUX_7_3_ACCEPT_POLICY)
    done = parse_policy_dump(bytes.fromhex(m) for m in LINUX_7_3_DONE_POLICY)
    assert accept.family_id == done.family_id == 0x23
    caps = capabilities_from_policies(FamilyInfo("handshake", 0x23, 1), accept, done)
    assert caps.handler_class_max == 2
    assert {a: (p.kind, p.min_value, p.max_value) for a, p in caps.done_attrs.items()} == {
        1: (AttrKind.U32, 0, 4095),  # status: a positive errno
        2: (AttrKind.S32, -(2**31), 2**31 - 1),  # sockfd
        3: (AttrKind.U32, 0, 2**32 - 1),  # remote-auth
    }
    assert caps.done_remote_auth and caps.done_attr4 is DoneAttr4.ABSENT
    assert caps.describe() == [
        "DONE accepts: status, sockfd, remote-auth", "ACCEPT command accepts: handler-class",
    ]


def test_real_kernel_ready_and_accept_reply() -> None:
    from ktlsd.request import HandlerClass
    from ktlsd.upcall.netlink import decode_accept_reply, decode_ready

    ready = bytes.fromhex(LINUX_7_3_READY)
    assert ready[0] == 1 and decode_ready(ready[4:]) is HandlerClass.TLSHD
    request = decode_accept_reply(bytes.fromhex(LINUX_7_3_ACCEPT_REPLY))
    assert request.sockfd == 10 and request.message_type is MessageType.CLIENTHELLO
    assert request.auth_mode is AuthMode.PSK and request.timeout_ms == 10_000
    assert request.peer_identities == (0x1B8613E6,) and request.keyring == 0x035F6023
    assert request.peername is None


# --- the live control family -------------------------------------------------------------


def test_live_getpolicy_dump_of_nlctrl() -> None:
    """nlctrl's GETFAMILY takes FAMILY_ID (u16) and FAMILY_NAME (NUL string, GENL_NAMSIZ-1)."""
    family, policy = probe_family_policy("nlctrl", 3)  # CTRL_CMD_GETFAMILY
    assert family.family_id == 0x10 and family.name == "nlctrl"
    assert "notify" in family.mcast_groups
    attrs = policy.do_policy(3)
    assert attrs[1].kind is AttrKind.U16
    assert attrs[2].kind is AttrKind.NUL_STRING and attrs[2].max_length == 15


def test_live_missing_family_is_a_clean_error() -> None:
    channel = NetlinkChannel.open()
    try:
        with pytest.raises(KernelSourceError, match="no 'ktlsd-nofamily'"):
            resolve_family(channel, "ktlsd-nofamily")
    finally:
        channel.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _handshake_family_exists() -> bool:
    channel = NetlinkChannel.open()
    try:
        resolve_family(channel, "handshake")
        return True
    except KernelSourceError:
        return False
    finally:
        channel.close()


def test_live_probe_and_open_without_the_family() -> None:
    if _handshake_family_exists():
        caps = probe_kernel_policy()  # the VM guest: the positive path
        assert caps.family.name == "handshake" and "tlshd" in caps.family.mcast_groups
        assert {1, 2} <= set(caps.done_attrs)
        return
    before = _open_fds()
    message = (
        "kernel has no 'handshake' netlink family "
        "(Linux >= 6.5 with CONFIG_NET_HANDSHAKE needed)"
    )
    with pytest.raises(KernelSourceError) as probe_error:
        probe_kernel_policy()
    assert str(probe_error.value) == message
    with pytest.raises(KernelSourceError) as open_error:
        KernelSource.open()
    assert str(open_error.value) == message
    assert "\n" not in str(open_error.value)
    assert _open_fds() == before  # nothing leaked on the failure path


def test_live_without_cap_net_admin() -> None:
    """Dropping CAP_NET_ADMIN (setpriv) is seen; on a kernel with the family, open() says why."""
    import shutil
    import subprocess
    import sys

    if shutil.which("setpriv") is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to drop a capability")
    code = (
        "from ktlsd.upcall.kernel import KernelSource, KernelSourceError, has_net_admin\n"
        "print(has_net_admin())\n"
        "try:\n    KernelSource.open()\nexcept KernelSourceError as e:\n    print(e)\n"
    )
    result = subprocess.run(
        ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin",
         sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=True,
    )
    lines = result.stdout.splitlines()
    assert lines[0] == "False"
    if _handshake_family_exists():
        assert lines[1] == "the handshake family's ACCEPT needs CAP_NET_ADMIN (run ktlsd as root)"
    else:
        assert lines[1].startswith("kernel has no 'handshake' netlink family")


# --- KernelSource against a stand-in kernel --------------------------------------------------

FAMILY_ID = 0x1D


class StandInKernel:
    """Answers ACCEPT/DONE like net/handshake/netlink.c, over AF_UNIX datagram sockets.

    ``queue`` holds ACCEPT reply attribute blobs still pending; ACCEPT on an empty queue
    answers -EAGAIN. DONE records the decoded attributes (looked up by sockfd).
    """

    def __init__(self) -> None:
        self.requests_far, requests_near = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_far, notify_near = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.requests_far.setblocking(False)
        self.requests_channel = NetlinkChannel(requests_near)
        self.notify_channel = NetlinkChannel(notify_near)
        self.queue: list[bytes] = []
        self.accepts = 0
        self.dones: list[tuple[bytes, bool]] = []  # (DONE attrs, fd still open at DONE)
        self.done_error = 0

    def serve(self) -> None:
        """Called from the loop whenever the far end is readable."""
        while True:
            try:
                data = self.requests_far.recv(65536)
            except BlockingIOError:
                return
            for message in split_messages(data):
                self._answer(message)

    def _answer(self, message: RawMessage) -> None:
        cmd = message.genl_cmd
        seq = message.seq
        if cmd == 2:  # ACCEPT
            self.accepts += 1
            if not self.queue:
                self._error(seq, -errno.EAGAIN)
                return
            reply = self.queue.pop(0)
            self.requests_far.send(nlmsg(FAMILY_ID, 0, seq, 99, genl(2, reply)))
            self._error(seq, 0)
        elif cmd == 3:  # DONE
            attrs = message.genl_attrs
            fd = decode_done(attrs).sockfd
            try:
                os.fstat(fd)
                still_open = True
            except OSError:
                still_open = False
            self.dones.append((attrs, still_open))
            self._error(seq, -self.done_error if self.done_error else 0)

    def _error(self, seq: int, code: int) -> None:
        echoed = struct.pack("<IHHII", 20, FAMILY_ID, 5, seq, 99)
        self.requests_far.send(nlmsg(2, 0x100, seq, 0, S32(code) + echoed))

    def ready(self, handler_class: int = 1) -> None:
        self.notify_far.send(nlmsg(FAMILY_ID, 0, 0, 0, genl(1, nla(2, U32(handler_class)))))

    def source(self, caps: KernelCapabilities | None = None) -> KernelSource:
        family = FamilyInfo("handshake", FAMILY_ID, 1, {"tlshd": 0x20})
        if caps is None:
            done = parse_policy_dump(DONE_BASE)
            caps = capabilities_from_policies(family, parse_policy_dump(ACCEPT_POLICY), done)
        return KernelSource(self.requests_channel, self.notify_channel, caps)

    def close(self) -> None:
        self.requests_far.close()
        self.notify_far.close()


def accept_reply(fd: int, peername: str = "target.example") -> bytes:
    return (
        nla(1, S32(fd)) + nla(3, U32(1)) + nla(4, U32(5000)) + nla(5, U32(2))
        + nla(6, U32(0x1234)) + nla(8, peername.encode() + b"\0")
    )


def _fresh_fd() -> tuple[int, socket.socket]:
    """A real socket fd as the kernel would install it; keep the far end alive."""
    a, b = socket.socketpair()
    fd = os.dup(a.fileno())
    a.close()
    return fd, b


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


async def _next(iterator, timeout: float = 5.0):  # type: ignore[no-untyped-def]
    return await asyncio.wait_for(iterator.__anext__(), timeout)


def test_source_drains_on_ready_and_answers_done() -> None:
    async def scenario() -> None:
        kernel = StandInKernel()
        loop = asyncio.get_running_loop()
        loop.add_reader(kernel.requests_far.fileno(), kernel.serve)
        fd1, keep1 = _fresh_fd()
        fd2, keep2 = _fresh_fd()
        kernel.queue = [accept_reply(fd1), accept_reply(fd2, "second.example")]
        source = kernel.source()
        requests = source.requests().__aiter__()
        try:
            # The initial drain takes both queued requests without any READY.
            first = await _next(requests)
            second = await _next(requests)
            assert first.request.sockfd == fd1
            assert first.request.message_type is MessageType.CLIENTHELLO
            assert first.request.auth_mode is AuthMode.PSK
            assert first.request.peer_identities == (0x1234,)
            assert second.request.peername == "second.example"
            assert source.seen_reply_attrs >= {1, 3, 4, 5, 6, 8}

            # Nothing left: the next pull ends on EAGAIN and waits for READY.
            waiter = asyncio.ensure_future(_next(requests))
            await asyncio.sleep(0.05)
            assert not waiter.done()
            assert kernel.accepts == 3

            # A READY for another handler class is ignored, a malformed one is logged.
            kernel.ready(handler_class=0)
            kernel.notify_far.send(b"\x05\0\0")
            await asyncio.sleep(0.05)
            assert not waiter.done()

            fd3, keep3 = _fresh_fd()
            kernel.queue = [accept_reply(fd3)]
            kernel.ready()
            third = await asyncio.wait_for(waiter, 5)
            assert third.request.sockfd == fd3

            # DONE: status first, the fd still open while the kernel looks it up, then closed.
            await first.done(HandshakeDone(status=0, sockfd=fd1, remote_auth=(0x1234,)))
            await second.done(HandshakeDone(status=errno.EACCES, sockfd=fd2,
                                            remote_auth=(7,)))
            await third.done(HandshakeDone(status=0, sockfd=fd3, session_id=55))
            attrs, was_open = kernel.dones[0]
            assert was_open and not _fd_open(fd1)
            assert attrs == nla(1, U32(0)) + nla(2, S32(fd1)) + nla(3, U32(0x1234))
            # remote-auth only on success; session-id never when the kernel lacks it
            assert kernel.dones[1][0] == nla(1, U32(errno.EACCES)) + nla(2, S32(fd2))
            assert kernel.dones[2][0] == nla(1, U32(0)) + nla(2, S32(fd3))
            assert not _fd_open(fd2) and not _fd_open(fd3)

            # A second done() is ignored, not sent twice.
            await first.done(HandshakeDone(status=0, sockfd=fd1))
            assert len(kernel.dones) == 3
            keep1.close(), keep2.close(), keep3.close()
        finally:
            await source.close()
            loop.remove_reader(kernel.requests_far.fileno())
            kernel.close()

    asyncio.run(scenario())


def test_source_sends_session_id_when_declared_and_survives_bad_replies() -> None:
    async def scenario() -> None:
        kernel = StandInKernel()
        loop = asyncio.get_running_loop()
        loop.add_reader(kernel.requests_far.fileno(), kernel.serve)
        family = FamilyInfo("handshake", FAMILY_ID, 1, {"tlshd": 0x20})
        caps = capabilities_from_policies(
            family,
            parse_policy_dump(ACCEPT_POLICY),
            parse_policy_dump([*DONE_BASE, policy_attr(0, 4, 4)]),
        )
        source = kernel.source(caps)
        bad_fd, keep_bad = _fresh_fd()
        good_fd, keep_good = _fresh_fd()
        # An undecodable reply (auth-mode 9) that still carries an fd, then a good one.
        kernel.queue = [
            nla(1, S32(bad_fd)) + nla(3, U32(1)) + nla(5, U32(9)),
            accept_reply(good_fd),
        ]
        requests = source.requests().__aiter__()
        try:
            pending = await _next(requests)
            assert pending.request.sockfd == good_fd
            # The malformed request was handed back with EINVAL and its fd closed.
            assert kernel.dones[0][0] == nla(1, U32(errno.EINVAL)) + nla(2, S32(bad_fd))
            assert not _fd_open(bad_fd)

            kernel.done_error = errno.EBUSY  # the consumer cancelled meanwhile
            await pending.done(HandshakeDone(status=0, sockfd=good_fd, session_id=77))
            assert kernel.dones[1][0] == (
                nla(1, U32(0)) + nla(2, S32(good_fd)) + nla(4, U32(77))
            )
            assert not _fd_open(good_fd)
            keep_bad.close(), keep_good.close()
        finally:
            await source.close()
            loop.remove_reader(kernel.requests_far.fileno())
            kernel.close()

    asyncio.run(scenario())


def test_source_close_ends_iteration_and_keeps_done_working() -> None:
    async def scenario() -> None:
        kernel = StandInKernel()
        loop = asyncio.get_running_loop()
        loop.add_reader(kernel.requests_far.fileno(), kernel.serve)
        fd, keep = _fresh_fd()
        kernel.queue = [accept_reply(fd)]
        source = kernel.source()
        requests = source.requests().__aiter__()
        pending = await _next(requests)
        waiter = asyncio.ensure_future(_next(requests))
        await asyncio.sleep(0.02)
        await source.close()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(waiter, 5)
        # In-flight requests still get their DONE after close(); a negative errno from a
        # careless caller goes out positive, as the kernel expects.
        await pending.done(HandshakeDone(status=-errno.ETIMEDOUT, sockfd=fd))
        assert kernel.dones == [(nla(1, U32(errno.ETIMEDOUT)) + nla(2, S32(fd)), True)]
        assert not _fd_open(fd)
        assert source._requests.sock.fileno() == -1  # closed once nothing is owed
        loop.remove_reader(kernel.requests_far.fileno())
        kernel.close()
        keep.close()

    asyncio.run(scenario())


def test_channel_error_carries_errno() -> None:
    async def scenario() -> None:
        kernel = StandInKernel()
        loop = asyncio.get_running_loop()
        loop.add_reader(kernel.requests_far.fileno(), kernel.serve)
        try:
            with pytest.raises(NetlinkError) as error:
                await kernel.requests_channel.transact(FAMILY_ID, 2, nla(2, U32(1)))
            assert error.value.errno == errno.EAGAIN
        finally:
            loop.remove_reader(kernel.requests_far.fileno())
            kernel.requests_channel.close()
            kernel.notify_channel.close()
            kernel.close()

    asyncio.run(scenario())
