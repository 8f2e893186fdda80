"""Network namespaces joined by veth pairs: several "machines" in one guest (stdlib only).

Each kernel consumer acts in the network namespace of the process that set it up: a
handshake request goes to the agent listening in the namespace of the consumer's socket;
an nvmet port lives in the namespace of the process whose configfs write enabled it; the
nvme host's queues follow ``nvme connect``; an NFS client follows ``mount``; nfsd runs where
``rpc.nfsd`` started it. So a command is put into a namespace with ``nsenter --net`` only
(:meth:`Netns.cmd`): the mount namespace stays the guest's, and a mount made there (an NFS
client's) is visible to the scenario. :meth:`Netns.socket` makes a socket inside the
namespace (a socket keeps the namespace it was created in), for packet captures.

Keys are *not* per namespace: every agent sees the same ``.nvme`` keyring.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

NETNS_DIR = Path("/run/netns")


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@dataclass(frozen=True)
class Netns:
    name: str

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` run in this network namespace (nothing else changes)."""
        return ["nsenter", f"--net={self.path}", *argv]

    def inode(self) -> int:
        return os.stat(self.path).st_ino

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Switch the calling thread into this namespace for the ``with`` body."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(self.path, os.O_RDONLY)
        try:
            os.setns(target, os.CLONE_NEWNET)  # type: ignore[attr-defined]  # python >= 3.12
            try:
                yield
            finally:
                os.setns(own, os.CLONE_NEWNET)  # type: ignore[attr-defined]
        finally:
            os.close(own)
            os.close(target)

    def socket(self, family: int, kind: int, proto: int = 0) -> socket.socket:
        with self.entered():
            return socket.socket(family, kind, proto)

    def pid_inside(self, pid: int) -> bool:
        """True once process ``pid`` runs in this namespace (nsenter has done its setns)."""
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == self.inode()
        except FileNotFoundError:
            return False


def create(name: str) -> Netns:
    """A fresh namespace with its loopback up (an old one of that name is removed first)."""
    if (NETNS_DIR / name).exists():
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    _ip("netns", "add", name)
    ns = Netns(name)
    _ip("-n", name, "link", "set", "lo", "up")
    return ns


def delete(ns: Netns) -> None:
    subprocess.run(["ip", "netns", "del", ns.name], capture_output=True)


def link(a: Netns, a_if: str, a_addr: str, b: Netns, b_if: str, b_addr: str, prefix: int = 24):
    """A veth pair: ``a_if`` (``a_addr``) in ``a``, ``b_if`` (``b_addr``) in ``b``, both up."""
    _ip("link", "add", a_if, "type", "veth", "peer", "name", b_if)
    for ns, ifname, addr in ((a, a_if, a_addr), (b, b_if, b_addr)):
        _ip("link", "set", ifname, "netns", ns.name)
        _ip("-n", ns.name, "addr", "add", f"{addr}/{prefix}", "dev", ifname)
        _ip("-n", ns.name, "link", "set", ifname, "up")


def netlink_group_members_of(pid: int, group: int) -> int:
    """Generic netlink sockets that joined ``group``, as seen in the namespace of ``pid``."""
    count = 0
    try:
        text = Path(f"/proc/{pid}/net/netlink").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1] == "16" and int(fields[3], 16) & (1 << (group - 1)):
            count += 1
    return count
