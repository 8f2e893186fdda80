"""Thin edge over the Linux key management calls, through libkeyutils (``libkeyutils.so.1``).

Implementation choice: libkeyutils' one-call wrappers (``add_key``, ``request_key``,
``keyctl_read``, ``keyctl_search``, ...) through ctypes, each with its C prototype declared.
The library is built for the machine it is installed on, so it knows that architecture's
system call numbers and calling convention: ktlsd carries no per-architecture table and runs
wherever Debian ships libkeyutils1. Each wrapper is a single ``syscall(2)`` that returns -1
with the kernel's errno, which :class:`KeyringError` carries untouched. The only libkeyutils
behaviour we need beyond single calls, finding a keyring by name the way
``find_key_by_type_and_desc()`` does (nvme-cli uses it to find ``.nvme``), is reproduced in
:func:`find_keyring`, so its errors stay ours.

The library is loaded on the first keyring call, not at import: ``ktlsd --version`` and the
``ktlsd nvme`` commands that touch no keyring work on a machine without it. When it cannot be
loaded, every call raises :class:`KeyutilsMissing` (a :class:`KeyringError` with errno
``ELIBACC``) whose one-line message names the library and the Debian package.

Payloads are secrets: nothing in this module logs, formats or stores them, and errors
name only the operation, the serial and the errno.
"""

from __future__ import annotations

import ctypes
import errno as errno_mod
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "KEY_SPEC_PROCESS_KEYRING",
    "KEY_SPEC_SESSION_KEYRING",
    "KEY_SPEC_THREAD_KEYRING",
    "KEY_SPEC_USER_KEYRING",
    "KEY_SPEC_USER_SESSION_KEYRING",
    "LIBRARY",
    "KeyInfo",
    "KeyringError",
    "KeyutilsMissing",
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

LIBRARY = "libkeyutils.so.1"
"""The soname ktlsd loads (Debian package ``libkeyutils1``, pulled in by ``keyutils``)."""

KEY_SPEC_THREAD_KEYRING = -1
KEY_SPEC_PROCESS_KEYRING = -2
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_USER_SESSION_KEYRING = -5

_SPECIAL_NAMES = {
    KEY_SPEC_THREAD_KEYRING: "@t",
    KEY_SPEC_PROCESS_KEYRING: "@p",
    KEY_SPEC_SESSION_KEYRING: "@s",
    KEY_SPEC_USER_KEYRING: "@u",
    KEY_SPEC_USER_SESSION_KEYRING: "@us",
}

_serial_t = ctypes.c_int32  # key_serial_t
_char_p = ctypes.c_char_p
_buffer_p = ctypes.c_void_p  # char * or key_serial_t * buffers the kernel fills

# libkeyutils' prototypes (keyutils.h): name -> (return type, argument types).
_PROTOTYPES: dict[str, tuple[type[ctypes._SimpleCData[Any]], tuple[Any, ...]]] = {
    "add_key": (_serial_t, (_char_p, _char_p, ctypes.c_void_p, ctypes.c_size_t, _serial_t)),
    "request_key": (_serial_t, (_char_p, _char_p, _char_p, _serial_t)),
    "keyctl_get_keyring_ID": (_serial_t, (_serial_t, ctypes.c_int)),
    "keyctl_join_session_keyring": (_serial_t, (_char_p,)),
    "keyctl_revoke": (ctypes.c_long, (_serial_t,)),
    "keyctl_setperm": (ctypes.c_long, (_serial_t, ctypes.c_uint32)),
    "keyctl_describe": (ctypes.c_long, (_serial_t, _buffer_p, ctypes.c_size_t)),
    "keyctl_link": (ctypes.c_long, (_serial_t, _serial_t)),
    "keyctl_unlink": (ctypes.c_long, (_serial_t, _serial_t)),
    "keyctl_search": (ctypes.c_long, (_serial_t, _char_p, _char_p, _serial_t)),
    "keyctl_read": (ctypes.c_long, (_serial_t, _buffer_p, ctypes.c_size_t)),
    "keyctl_set_timeout": (ctypes.c_long, (_serial_t, ctypes.c_uint)),
    "keyctl_invalidate": (ctypes.c_long, (_serial_t,)),
}


class KeyringError(OSError):
    """A key management call failed; ``errno`` is the kernel's error number.

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


class KeyutilsMissing(KeyringError):
    """libkeyutils cannot be loaded, so no keyring call can be made; ``errno`` is ``ELIBACC``.

    ``str()`` is one line: ``"<operation>: <loader's reason>; ktlsd needs libkeyutils.so.1
    (Debian package libkeyutils1)"``.
    """

    def __init__(self, operation: str, reason: str) -> None:
        OSError.__init__(
            self,
            errno_mod.ELIBACC,
            f"{operation}: {' '.join(reason.split())}; "
            f"ktlsd needs {LIBRARY} (Debian package libkeyutils1)",
        )
        self.operation = operation
        self.serial = None


def _serial_text(serial: int) -> str:
    return _SPECIAL_NAMES.get(serial, f"{serial & 0xFFFFFFFF:08x}")


_functions: dict[str, Callable[..., int]] = {}
_load_lock = threading.Lock()


def _function(name: str, operation: str) -> Callable[..., int]:
    """libkeyutils' ``name``, loading the library on first use (a failure is not cached)."""
    found = _functions.get(name)
    if found is not None:
        return found
    with _load_lock:
        if not _functions:
            try:
                lib = ctypes.CDLL(LIBRARY, use_errno=True)
                bound: dict[str, Callable[..., int]] = {}
                for symbol, (restype, argtypes) in _PROTOTYPES.items():
                    func = getattr(lib, symbol)
                    func.restype = restype
                    func.argtypes = argtypes
                    bound[symbol] = func
            except (OSError, AttributeError) as exc:
                raise KeyutilsMissing(operation, str(exc)) from None
            _functions.update(bound)
    return _functions[name]


def _call(
    name: str,
    operation: str,
    serial: int | None,
    *args: int | bytes | ctypes.Array[Any] | None,
    detail: str = "",
) -> int:
    """Call libkeyutils' ``name``; a negative result raises with the kernel's errno."""
    res = _function(name, operation)(*args)
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
    return _call(
        "add_key",
        f"add {key_type!r} {description!r} to keyring",
        keyring,
        _c_str(key_type),
        _c_str(description),
        data,
        len(data) if data is not None else 0,
        keyring,
    )


def get_keyring_id(special: int, create: bool = False) -> int:
    """Resolve a special keyring id (``KEY_SPEC_*``) to its real serial."""
    return _call("keyctl_get_keyring_ID", "resolve", special, special, int(create))


def read_key(serial: int) -> bytes:
    """The payload of a key (a secret: never log it)."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = _call("keyctl_read", "read", serial, serial, buf, size)
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
        n = _call("keyctl_describe", "describe", serial, serial, buf, size)
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
    return _call(
        "keyctl_search",
        "search keyring",
        keyring,
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
        n = _call("keyctl_read", "list", keyring, keyring, buf, size)
        if n <= size:
            return [int(buf[i]) for i in range(n // 4)]
        size = n


def link_key(serial: int, keyring: int) -> None:
    _call("keyctl_link", "link", serial, serial, keyring, detail=f" into {_serial_text(keyring)}")


def unlink_key(serial: int, keyring: int) -> None:
    _call(
        "keyctl_unlink", "unlink", serial, serial, keyring, detail=f" from {_serial_text(keyring)}"
    )


def revoke_key(serial: int) -> None:
    _call("keyctl_revoke", "revoke", serial, serial)


def invalidate_key(serial: int) -> None:
    _call("keyctl_invalidate", "invalidate", serial, serial)


def set_timeout(serial: int, seconds: int) -> None:
    """Expire the key ``seconds`` from now (0 = never)."""
    _call("keyctl_set_timeout", "set timeout on", serial, serial, seconds)


def set_perm(serial: int, perm: int) -> None:
    _call("keyctl_setperm", "set permissions on", serial, serial, perm)


def join_session_keyring(name: str | None = None) -> int:
    """Join (or create) a named session keyring; ``None`` makes a fresh anonymous one."""
    arg = _c_str(name) if name is not None else None
    return _call("keyctl_join_session_keyring", "join session keyring", None, arg)


def _request_key(key_type: str, description: str) -> int:
    return _call(
        "request_key",
        f"request {key_type!r} {description!r}",
        None,
        _c_str(key_type),
        _c_str(description),
        None,
        0,
    )


def find_keyring(name: str) -> int:
    """Find a keyring by description, e.g. ``".nvme"``.

    Like libkeyutils' ``find_key_by_type_and_desc()``: first ``request_key`` (which
    searches the keyrings this process possesses), then a scan of ``/proc/keys`` for a
    keyring with that exact description that we may view. Kernel-owned keyrings such as
    ``.nvme`` are not linked into any process keyring and are found by the scan.
    Raises :class:`KeyringError` with ENOKEY when there is none (and
    :class:`KeyutilsMissing`, never ENOKEY, when libkeyutils cannot be loaded).
    """
    try:
        return _request_key("keyring", name)
    except KeyutilsMissing:
        raise  # not a lookup result: say what is missing, never "not found"
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
        except KeyutilsMissing:
            raise
        except KeyringError:
            continue
        if info.type == "keyring" and info.description == name:
            return serial
    raise KeyringError(errno_mod.ENOKEY, f"find keyring {name!r}")
