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
(a string, nfsd tree; TLS session tags, sent when declared: one attribute per tag) on
others. The ACCEPT *reply* attributes (peername, keyring,
key-update-request, session-id) are not part of any input policy -- the kernel only
declares what it *receives* -- so the source simply parses whatever arrives and records
which reply attributes it has seen (:attr:`KernelSource.seen_reply_attrs`).

Layers: the handshake family's attribute codec is :mod:`ktlsd.upcall.netlink`; generic
netlink itself (control family lookups, policy dumps and the
:class:`~ktlsd.upcall.genl.NetlinkChannel` socket; no pyroute2) is :mod:`ktlsd.upcall.genl`.
This module holds what is specific to the handshake family: its capabilities and the upcall
source. Its I/O is two plain non-blocking ``AF_NETLINK`` sockets on ``loop.add_reader``, so
every byte stays visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace

from ktlsd.request import (
    ConsumerCredentials,
    HandlerClass,
    HandshakeDone,
    HandshakeRequest,
    KeyDelivery,
)
from ktlsd.upcall.genl import (
    AttrPolicy,
    FamilyInfo,
    FamilyPolicy,
    NetlinkChannel,
    NetlinkError,
    dump_policy,
    lookup_family,
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
from ktlsd.upcall.nlattr import NetlinkFormatError, as_s32, decode_attrs

log = logging.getLogger("ktlsd.upcall.kernel")

CAP_NET_ADMIN = 12  # include/uapi/linux/capability.h


class KernelSourceError(RuntimeError):
    """The kernel source cannot be used here; ``str()`` is one line saying why."""


# --- what the handshake family declares ----------------------------------------------------


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
    def done_tags(self) -> bool:
        """DONE takes TLS session tags: attribute 4 declared as a string (the nfsd tree's
        ``HANDSHAKE_A_DONE_TAG``, what tlshd 1.4 probes for)."""
        return self.done_attributes.tag

    def session_tags_line(self) -> str:
        """Whether session tags reach this kernel, with the evidence (one line, for the
        start-up log and ``ktlsd doctor``)."""
        if not self.policy_known:
            return "session tags are not sent: the DONE policy could not be dumped"
        if self.done_tags:
            return "session tags are sent in DONE (attribute 4 is a string: tag)"
        names = {1: "status", 2: "sockfd", 3: "remote-auth", 4: self.done_attr4.value}
        done = ", ".join(names.get(a, f"attr {a}") for a in sorted(self.done_attrs))
        return f"session tags are not sent: DONE declares no tag attribute (DONE accepts: {done})"

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


# --- probing the running kernel ------------------------------------------------------------


def resolve_family(channel: NetlinkChannel, name: str) -> FamilyInfo:
    """Ask the control family about ``name``; KernelSourceError when it does not exist."""
    try:
        return lookup_family(channel, name)
    except NetlinkError as exc:
        if exc.errno == errno.ENOENT:
            raise KernelSourceError(f"kernel has no {name!r} netlink family") from None
        raise KernelSourceError(f"cannot look up netlink family {name!r}: {exc}") from None
    except (OSError, TimeoutError, NetlinkFormatError) as exc:
        raise KernelSourceError(f"cannot look up netlink family {name!r}: {exc}") from None


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

    @property
    def accepts_session_tags(self) -> bool:
        """Whether DONE can carry TLS session tags on this kernel (the policy probe)."""
        return self.capabilities.done_tags

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
        log.info("handshake family: %s", capabilities.session_tags_line())
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
            # Tags only in a successful DONE and only where attribute 4 is the tag string.
            tags=answer.tags if answer.status == 0 and caps.done_tags else (),
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
