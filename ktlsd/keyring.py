"""Thin edge over the Linux key management syscalls (``add_key(2)``, ``keyctl(2)``).

Implementation choice: raw ``syscall(2)`` through ctypes with the syscall numbers for
x86_64 and aarch64, rather than libkeyutils. The agent then needs no extra shared library
in the guest image, and every call returns the kernel's errno untouched. The only
libkeyutils behaviour we need beyond single syscalls, finding a keyring by name the way
``find_key_by_type_and_desc()`` does (nvme-cli uses it to find ``.nvme``), is reproduced
in :func:`find_keyring`.

Payloads are secrets: nothing in this module logs, formats or stores them, and errors
name only the operation, the serial and the errno.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import platform
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KEY_SPEC_PROCESS_KEYRING",
    "KEY_SPEC_SESSION_KEYRING",
    "KEY_SPEC_THREAD_KEYRING",
    "KEY_SPEC_USER_KEYRING",
    "KEY_SPEC_USER_SESSION_KEYRING",
    "KeyInfo",
    "KeyringError",
    "add_key",
    "describe_key",
    "find_keyring",
    "get_keyring_id",
    "invalidate_key",
    "join_session_keyring",
    "link_key",
    "list_keyring",
    "read_key",
    "revoke_key",
    "search_keyring",
    "set_perm",
    "set_timeout",
    "unlink_key",
]

KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5

# keyctl(2) operations (include/uapi/linux/keyctl.h)
_KEYCTL_GET_KEYRING_ID = 0
_KEYCTL_JOIN_SESSION_KEYRING = 1
_KEYCTL_REVOKE = 3
_KEYCTL_SETPERM = 5
_KEYCTL_DESCRIBE = 6
_KEYCTL_LINK = 8
_KEYCTL_UNLINK = 9
_KEYCTL_SEARCH = 10
_KEYCTL_READ = 11
_KEYCTL_SET_TIMEOUT = 15
_KEYCTL_INVALIDATE = 21

# (add_key, request_key, keyctl) syscall numbers per architecture.
_SYSCALLS = {
    "x86_64": (248, 249, 250),
    "aarch64": (217, 218, 219),
    "arm64": (217, 218, 219),
}

_SPECIAL_NAMES = {
    KEY_SPEC_THREAD_KEYRING: "@t",
    KEY_SPEC_PROCESS_KEYRING: "@p",
    KEY_SPEC_SESSION_KEYRING: "@s",
    KEY_SPEC_USER_KEYRING: "@u",
    KEY_SPEC_USER_SESSION_KEYRING: "@us",
}


class KeyringError(OSError):
    """A key management syscall failed; ``errno`` is the kernel's error number.

    ``str()`` is one line: ``"<operation> key <serial>: <ERRNAME> (<strerror>)"``.
    """

    def __init__(
        self, err: int, operation: str, serial: int | None = None, detail: str = ""
    ) -> None:
        name = errno_mod.errorcode.get(err, f"errno {err}")
        where = f" key {_serial_text(serial)}" if serial is not None else ""
        super().__init__(err, f"{operation}{where}{detail}: {name} ({os.strerror(err)})")
        self.operation = operation
        self.serial = serial

    def __str__(self) -> str:
        return str(self.strerror)


def _serial_text(serial: int) -> str:
    return _SPECIAL_NAMES.get(serial, f"{serial & 0xFFFFFFFF:08x}")


def _load() -> tuple[ctypes.CDLL, tuple[int, int, int]]:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise OSError(errno_mod.ENOSYS, f"keyring syscalls not mapped for {machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return libc, _SYSCALLS[machine]


_LIBC, (_NR_ADD_KEY, _NR_REQUEST_KEY, _NR_KEYCTL) = _load()


def _keyctl(
    operation: str,
    serial: int | None,
    *args: int | bytes | ctypes.Array[Any] | None,
    detail: str = "",
) -> int:
    cargs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    res = _LIBC.syscall(ctypes.c_long(_NR_KEYCTL), *cargs)
    if res < 0:
        raise KeyringError(ctypes.get_errno(), operation, serial, detail)
    return int(res)


def _c_str(text: str) -> bytes:
    data = text.encode()
    if b"\0" in data:
        raise ValueError("key type and description must not contain NUL bytes")
    return data


@dataclass(frozen=True)
class KeyInfo:
    """What ``KEYCTL_DESCRIBE`` reports about a key."""

    type: str
    uid: int
    gid: int
    perm: int
    description: str


def add_key(key_type: str, description: str, payload: bytes | None, keyring: int) -> int:
    """Create (or update) a key in ``keyring`` and return its serial."""
    data = bytes(payload) if payload is not None else None
    res = _LIBC.syscall(
        ctypes.c_long(_NR_ADD_KEY),
        _c_str(key_type),
        _c_str(description),
        data,
        ctypes.c_size_t(len(data) if data is not None else 0),
        ctypes.c_long(keyring),
    )
    if res < 0:
        raise KeyringError(
            ctypes.get_errno(), f"add {key_type!r} {description!r} to keyring", keyring
        )
    return int(res)


def get_keyring_id(special: int, create: bool = False) -> int:
    """Resolve a special keyring id (``KEY_SPEC_*``) to its real serial."""
    return _keyctl("resolve", special, _KEYCTL_GET_KEYRING_ID, special, int(create))


def read_key(serial: int) -> bytes:
    """The payload of a key (a secret: never log it)."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = _keyctl("read", serial, _KEYCTL_READ, serial, buf, size)
        if n <= size:
            data = buf.raw[:n]
            ctypes.memset(buf, 0, size)
            return data
        ctypes.memset(buf, 0, size)
        size = n


def _describe_raw(serial: int) -> str:
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = _keyctl("describe", serial, _KEYCTL_DESCRIBE, serial, buf, size)
        if n <= size:
            return buf.raw[: n - 1].decode(errors="replace")
        size = n


def describe_key(serial: int) -> KeyInfo:
    """Type, owner, permissions and description of a key."""
    raw = _describe_raw(serial)
    key_type, uid, gid, perm, description = raw.split(";", 4)
    return KeyInfo(key_type, int(uid), int(gid), int(perm, 16), description)


def search_keyring(keyring: int, key_type: str, description: str, destination: int = 0) -> int:
    """Search ``keyring`` (recursively) for a key; optionally link the hit to ``destination``."""
    return _keyctl(
        "search keyring",
        keyring,
        _KEYCTL_SEARCH,
        keyring,
        _c_str(key_type),
        _c_str(description),
        destination,
        detail=f" for {key_type!r} {description!r}",
    )


def list_keyring(keyring: int) -> list[int]:
    """Serials of the keys directly linked into ``keyring``."""
    size = 64
    while True:
        buf = (ctypes.c_int32 * (size // 4))()
        n = _keyctl("list", keyring, _KEYCTL_READ, keyring, buf, size)
        if n <= size:
            return [int(buf[i]) for i in range(n // 4)]
        size = n


def link_key(serial: int, keyring: int) -> None:
    _keyctl("link", serial, _KEYCTL_LINK, serial, keyring, detail=f" into {_serial_text(keyring)}")


def unlink_key(serial: int, keyring: int) -> None:
    _keyctl(
        "unlink", serial, _KEYCTL_UNLINK, serial, keyring, detail=f" from {_serial_text(keyring)}"
    )


def revoke_key(serial: int) -> None:
    _keyctl("revoke", serial, _KEYCTL_REVOKE, serial)


def invalidate_key(serial: int) -> None:
    _keyctl("invalidate", serial, _KEYCTL_INVALIDATE, serial)


def set_timeout(serial: int, seconds: int) -> None:
    """Expire the key ``seconds`` from now (0 = never)."""
    _keyctl("set timeout on", serial, _KEYCTL_SET_TIMEOUT, serial, seconds)


def set_perm(serial: int, perm: int) -> None:
    _keyctl("set permissions on", serial, _KEYCTL_SETPERM, serial, perm)


def join_session_keyring(name: str | None = None) -> int:
    """Join (or create) a named session keyring; ``None`` makes a fresh anonymous one."""
    arg = _c_str(name) if name is not None else None
    return _keyctl("join session keyring", None, _KEYCTL_JOIN_SESSION_KEYRING, arg)


def _request_key(key_type: str, description: str) -> int:
    res = _LIBC.syscall(
        ctypes.c_long(_NR_REQUEST_KEY), _c_str(key_type), _c_str(description), None, 0
    )
    if res < 0:
        raise KeyringError(ctypes.get_errno(), f"request {key_type!r} {description!r}")
    return int(res)


def find_keyring(name: str) -> int:
    """Find a keyring by description, e.g. ``".nvme"``.

    Like libkeyutils' ``find_key_by_type_and_desc()``: first ``request_key`` (which
    searches the keyrings this process possesses), then a scan of ``/proc/keys`` for a
    keyring with that exact description that we may view. Kernel-owned keyrings such as
    ``.nvme`` are not linked into any process keyring and are found by the scan.
    Raises :class:`KeyringError` with ENOKEY when there is none.
    """
    try:
        return _request_key("keyring", name)
    except KeyringError:
        pass  # not reachable from our keyrings (or not permitted): scan /proc/keys
    try:
        with open("/proc/keys", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split(None, 8)
        if len(fields) < 9 or fields[7] != "keyring":
            continue
        desc = fields[8].rstrip("\n")
        # /proc/keys appends ": <summary>" to the description.
        if desc.rsplit(": ", 1)[0] != name:
            continue
        serial = int(fields[0], 16)
        try:
            info = describe_key(serial)
        except KeyringError:
            continue
        if info.type == "keyring" and info.description == name:
            return serial
    raise KeyringError(errno_mod.ENOKEY, f"find keyring {name!r}")
