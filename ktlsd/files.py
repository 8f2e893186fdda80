"""Reading a file on someone's behalf: with their rights, once, bounded, off the event loop.

The agent runs as root and reads files that consumers name (certificate, private key,
truststore, CRL) as well as the files its own configuration names. Every such read goes
through :func:`read_file`, which returns the bytes of one regular file or raises
:class:`FileRefused` (a :class:`~ktlsd.errors.HandshakeError` with a one-line reason that
names the file, never its contents). The contract:

* **With the reader's rights.** :class:`FileAccess` says whose rights: a service consumer's
  uid, gid and supplementary groups (:meth:`FileAccess.of_consumer`), or the agent's own
  (:data:`AGENT`) for files from its configuration or a tool's command line. The kernel
  makes every decision — each directory on the way, symlinks, the file's mode, ACLs, group
  membership, LSMs — exactly as it would for the consumer itself.
* **Once.** The path is looked up exactly once, by ``open(O_PATH)`` under those rights (with
  ``openat2(RESOLVE_NO_MAGICLINKS)``: ``/proc/self/fd/N`` and the like are refused). The
  type check is ``fstat`` on that descriptor, and the file is then opened for reading
  through ``/proc/self/fd/N``, i.e. the same inode (the kernel checks read permission there,
  again with the reader's rights; ``fstat`` on the reading descriptor must show the same
  inode). No second lookup of the path means nothing to race: flipping a symlink only changes
  what the single lookup finds, and that lookup ran with the consumer's rights.
* **Regular files only, never blocking.** A FIFO, socket, device or directory is refused
  from the ``O_PATH`` descriptor, so it is never really opened: no blocking ``open()`` of a
  FIFO, no side effects of opening a device. The reading descriptor is opened
  ``O_RDONLY|O_NONBLOCK|O_NOCTTY|O_CLOEXEC`` anyway.
* **Bounded.** Files larger than ``max_bytes`` (:data:`DEFAULT_MAX_FILE_BYTES`, 1 MiB; the
  ``max_file_bytes`` setting) are refused by their size; at most ``min(size, max_bytes) + 1``
  bytes are read, and a file that yields more than its size says (it grew, or it is a
  pseudo-file such as ``/proc/self/environ``, which reports size 0) is refused too.
* **Off the event loop, bounded in time.** The agent reads from its material threads
  (:mod:`ktlsd.material`, one per request, awaited by the event loop with a timeout). A call
  from the main thread (an event loop's, a command-line tool's) runs in a thread of its own
  and waits at most ``timeout``.

How the rights are taken — and why threads, not a helper process
------------------------------------------------------------------
Linux credentials belong to a thread, not to a process. The reading thread sets its own
supplementary groups, fsgid and fsuid before the lookup and always restores its own in a
``finally``; each value is read back and compared after every change (``setfsuid`` with an
invalid id changes nothing and returns the current one; ``getgroups``), and a read that cannot
take exactly the requested rights is refused. With an fsuid other than 0 the kernel drops the
thread's filesystem capabilities (``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``, ...), so the
thread really is the consumer for every filesystem check, while other threads of the agent are
untouched. The main thread never switches: an event loop (or a signal handler) must never run
with a consumer's rights. Groups are set with the raw ``setgroups`` system call: the C
library's ``setgroups()`` (and ``os.setgroups``) change every thread of the process, which would
hand the consumer's groups to the event loop. ``setfsuid``/``setfsgid`` go through the C
library, whose wrappers (glibc, musl) are plain per-thread system calls and pick the right
variant for the architecture; only ``setgroups`` needs a number (:data:`_SETGROUPS_SYSCALL`; on
other architectures consumer reads are refused with a clear reason, the agent's own still
work). Reads with the agent's own rights switch nothing.

A short-lived helper process per read would isolate the rights just as well and could be
SIGKILLed when stuck, but it costs a fork of a multi-threaded process (unsafe) or an exec of a
fresh interpreter (tens of milliseconds per handshake). A thread costs a few system calls per
read. What a thread cannot do is give up a read the kernel never finishes (a hung NFS or FUSE
server — and a local user can mount FUSE): its waiter stops waiting after the timeout, the
thread stays blocked until the kernel returns. So that stuck reads cannot pile up, reads in
flight are capped — stuck ones included — at :data:`MAX_READS_PER_UID` per consumer uid,
:data:`MAX_CONSUMER_READS` for all consumers together and :data:`MAX_AGENT_READS` for the agent's
own files; a read beyond a cap waits for room within its timeout. One uid's stuck reads
therefore hold only that uid, and never the agent's (kernel consumers') own files.

``/proc`` must be mounted (the reopen goes through ``/proc/self/fd``); without it every read is
refused with a reason that says so.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import os
import platform
import stat
import struct
import threading
import time
from dataclasses import dataclass

from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.settings import DEFAULT_MAX_FILE_BYTES

__all__ = [
    "AGENT",
    "DEFAULT_READ_TIMEOUT",
    "FileAccess",
    "FileIdentity",
    "FileRefused",
    "read_file",
    "read_file_identified",
]

FileIdentity = tuple[int, int, int, int, int]
"""What a read found, from ``fstat`` on the descriptor it read: ``(st_dev, st_ino,
st_mtime_ns, st_size, st_ctime_ns)``. Equal identities mean the same inode, unchanged as far
as its timestamps tell (a cache of parsed contents may key on it; :mod:`ktlsd.material` also
compares the bytes, since timestamps have a clock tick's granularity)."""

DEFAULT_READ_TIMEOUT = 5.0  # seconds a read may wait (for admission, or as a whole)
MAX_READS_PER_UID = 4  # a consumer uid's reads in flight, stuck ones included
MAX_CONSUMER_READS = 12  # all consumers' reads in flight
MAX_AGENT_READS = 16  # reads of the agent's own files in flight
OVERFLOW_ID = 65534  # the kernel's overflowuid/overflowgid: "nobody" when a gid is unknown

# SYS_setgroups taking 32-bit gid_t, by (machine, pointer size). From the kernel's syscall
# tables: x86_64 syscall_64.tbl; the generic table (asm-generic/unistd.h) for aarch64, riscv64
# and loongarch64; setgroups32 for 32-bit x86 and arm; powerpc and s390x tables.
_SETGROUPS_SYSCALL: dict[tuple[str, int], int] = {
    ("x86_64", 8): 116,
    ("aarch64", 8): 159,
    ("riscv64", 8): 159,
    ("loongarch64", 8): 159,
    ("ppc64le", 8): 81,
    ("ppc64", 8): 81,
    ("s390x", 8): 206,
    ("i386", 4): 206,
    ("i686", 4): 206,
    ("armv7l", 4): 206,
    ("armv8l", 4): 206,
}
_INVALID_ID = 0xFFFFFFFF  # (uid_t)-1: setfsuid/setfsgid change nothing, return the current id
_SYS_OPENAT2 = 437  # the same number on every architecture (Linux >= 5.6)
_AT_FDCWD = -100
_RESOLVE_NO_MAGICLINKS = 0x02


class _OpenHow(ctypes.Structure):
    _fields_ = [
        ("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)
    ]

_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


class FileRefused(HandshakeError):
    """A file could not be read. ``file_type`` says what it was when it was not a regular
    file (``"a directory"``, ``"a FIFO"``, ...), else None."""

    def __init__(self, cause: FailureCause, reason: str, file_type: str | None = None) -> None:
        super().__init__(cause, reason)
        self.file_type = file_type


@dataclass(frozen=True)
class FileAccess:
    """Whose rights a file is read with: ``uid``/``gid``/``groups``, or the agent's own
    (``uid`` None, :data:`AGENT`)."""

    uid: int | None = None
    gid: int = OVERFLOW_ID
    groups: tuple[int, ...] = ()

    @classmethod
    def of_consumer(cls, uid: int, gid: int | None, groups: tuple[int, ...] = ()) -> FileAccess:
        """A consumer's rights. A consumer with the agent's own uid can do whatever the agent
        can already: its reads use the agent's rights (no switch, no capabilities needed)."""
        if uid == os.geteuid():
            return AGENT
        valid_gid = gid if gid is not None and gid >= 0 else OVERFLOW_ID
        return cls(uid=uid, gid=valid_gid, groups=tuple(sorted(set(groups))))

    @property
    def is_agent(self) -> bool:
        return self.uid is None

    def describe(self) -> str:
        return "the agent" if self.uid is None else f"uid {self.uid}"


AGENT = FileAccess()


# --- per-thread credentials ------------------------------------------------------------------
class _Credentials:
    """The system calls: one thread's filesystem credentials (see the module docstring), and
    the path lookup."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._setfsuid = libc.setfsuid
        self._setfsgid = libc.setfsgid
        for fn in (self._setfsuid, self._setfsgid):
            fn.argtypes = [ctypes.c_uint]
            fn.restype = ctypes.c_int
        key = (platform.machine(), struct.calcsize("P"))
        self.setgroups_nr = _SETGROUPS_SYSCALL.get(key)
        self.machine = f"{key[0]} ({8 * key[1]}-bit)"
        self._openat2 = True

    def open_path(self, path: str) -> int:
        """``open(path, O_PATH)`` that follows ordinary symlinks but no ``/proc`` magic link
        (``/proc/self/fd/N``, ``/proc/PID/root``...): through those a consumer could reach a
        file the agent has open whose directories are closed to it. Linux < 5.6 has no
        ``openat2``: a plain open then."""
        encoded = os.fsencode(path)
        if b"\0" in encoded:
            raise ValueError("embedded NUL")
        if self._openat2:
            how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, _RESOLVE_NO_MAGICLINKS)
            fd = int(self._syscall(
                ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(_AT_FDCWD), ctypes.c_char_p(encoded),
                ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
            ))
            if fd >= 0:
                return fd
            err = ctypes.get_errno()
            if err != errno.ENOSYS:
                raise OSError(err, os.strerror(err), path)
            self._openat2 = False
        return os.open(path, os.O_PATH | os.O_CLOEXEC)

    def fsuid(self) -> int:
        return int(self._setfsuid(_INVALID_ID)) & 0xFFFFFFFF

    def fsgid(self) -> int:
        return int(self._setfsgid(_INVALID_ID)) & 0xFFFFFFFF

    def become(self, uid: int, gid: int, groups: tuple[int, ...]) -> None:
        """Give this thread exactly these filesystem rights, or raise OSError."""
        if tuple(sorted(set(os.getgroups()))) != groups:
            self._setgroups(groups)
        if self.fsgid() != gid:
            self._setfsgid(gid)
            if self.fsgid() != gid:
                raise PermissionError(errno.EPERM, f"setfsgid({gid}) did not take effect")
        if self.fsuid() != uid:
            self._setfsuid(uid)
            if self.fsuid() != uid:
                raise PermissionError(errno.EPERM, f"setfsuid({uid}) did not take effect")

    def _setgroups(self, groups: tuple[int, ...]) -> None:
        if self.setgroups_nr is None:
            raise OSError(errno.ENOSYS, f"no setgroups system call number for {self.machine}")
        array = (ctypes.c_uint32 * len(groups))(*groups) if groups else None
        ret = self._syscall(
            ctypes.c_long(self.setgroups_nr), ctypes.c_long(len(groups)), array
        )
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setgroups: {os.strerror(err)}")
        if tuple(sorted(set(os.getgroups()))) != groups:
            raise PermissionError(errno.EPERM, "setgroups did not take effect")


# --- admission: a cap on reads in flight, stuck ones included --------------------------------
class _Admission:
    """Reads in flight, per uid and in total; a read waits for room within its deadline."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._per_uid: dict[int | None, int] = {}
        self._consumers = 0

    def _has_room(self, access: FileAccess) -> bool:
        if access.is_agent:
            return self._per_uid.get(None, 0) < MAX_AGENT_READS
        return (
            self._per_uid.get(access.uid, 0) < MAX_READS_PER_UID
            and self._consumers < MAX_CONSUMER_READS
        )

    def enter(self, access: FileAccess, what: str, path: str, deadline: float) -> None:
        with self._cond:
            while not self._has_room(access):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise FileRefused(
                        FailureCause.TIMEOUT,
                        f"cannot read {what} {path}: earlier file reads for "
                        f"{access.describe()} are still pending",
                    )
                self._cond.wait(remaining)
            self._per_uid[access.uid] = self._per_uid.get(access.uid, 0) + 1
            if not access.is_agent:
                self._consumers += 1

    def leave(self, access: FileAccess) -> None:
        with self._cond:
            count = self._per_uid.get(access.uid, 0) - 1
            if count > 0:
                self._per_uid[access.uid] = count
            else:
                self._per_uid.pop(access.uid, None)
            if not access.is_agent:
                self._consumers -= 1
            self._cond.notify_all()


_admission = _Admission()
_credentials: _Credentials | None = None
_credentials_lock = threading.Lock()


def _thread_credentials() -> _Credentials:
    global _credentials
    with _credentials_lock:
        if _credentials is None:
            _credentials = _Credentials()
        return _credentials


def _read_admitted(
    path: str, what: str, access: FileAccess, max_bytes: int
) -> tuple[bytes, FileIdentity]:
    """Read in the calling thread (never the main thread when ``access`` is a consumer's):
    take the rights, read, always give this thread's own rights back."""
    if access.uid is None:
        return _read_regular_file(path, what, access, max_bytes)
    creds = _thread_credentials()
    own = (creds.fsuid(), creds.fsgid(), tuple(sorted(set(os.getgroups()))))
    try:
        try:
            creds.become(access.uid, access.gid, access.groups)
        except OSError as exc:
            raise FileRefused(
                FailureCause.MISSING_MATERIAL,
                f"cannot read {what} {path} with the rights of {access.describe()}: "
                f"{exc.strerror or exc}",
            ) from None
        return _read_regular_file(path, what, access, max_bytes)
    finally:
        # Cannot fail while the thread has CAP_SETUID/CAP_SETGID, which it just used; if it
        # ever did, the error propagates and the thread is left with fewer rights, not more.
        creds.become(*own)


# --- reading ----------------------------------------------------------------------------------
def _refused(what: str, path: str, reason: str, file_type: str | None = None) -> FileRefused:
    return FileRefused(
        FailureCause.MISSING_MATERIAL, f"cannot read {what} {path}: {reason}", file_type
    )


def _kind(mode: int) -> str:
    for test, name in _FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def _closed_directory(path: str) -> str | None:
    """The first directory on ``path`` this thread may not search (for the error message
    only; the decision was the kernel's)."""
    parts = os.path.normpath(path).split(os.sep)
    for end in range(1, len(parts)):
        directory = os.sep.join(parts[:end]) or os.sep
        try:
            os.stat(os.path.join(directory, "."))
        except PermissionError:
            return directory
        except OSError:
            return None
    return None


def _denied(what: str, path: str, access: FileAccess, *, lookup: bool) -> FileRefused:
    if access.is_agent:
        return _refused(what, path, "permission denied")
    reason = f"{what} {path} is not readable by {access.describe()}"
    closed = _closed_directory(path) if lookup else None
    if closed is not None:
        reason += f" (directory {closed} is closed to it)"
    return FileRefused(FailureCause.MISSING_MATERIAL, reason)


def _read_regular_file(
    path: str, what: str, access: FileAccess, max_bytes: int
) -> tuple[bytes, FileIdentity]:
    try:
        handle = _thread_credentials().open_path(path)
    except PermissionError:
        raise _denied(what, path, access, lookup=True) from None
    except OSError as exc:
        raise _refused(what, path, exc.strerror or str(exc)) from None
    except ValueError:  # an embedded NUL
        raise FileRefused(
            FailureCause.INVALID_REQUEST, f"{what} path contains a NUL byte"
        ) from None
    try:
        found = os.fstat(handle)
        if not stat.S_ISREG(found.st_mode):
            kind = _kind(found.st_mode)
            raise _refused(what, path, f"it is {kind}, not a regular file", kind)
        if found.st_size > max_bytes:
            raise _refused(what, path, f"it is larger than {max_bytes} bytes")
        try:
            fd = os.open(
                f"/proc/self/fd/{handle}",
                os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
            )
        except PermissionError:
            raise _denied(what, path, access, lookup=False) from None
        except FileNotFoundError:
            if not os.path.isdir("/proc/self/fd"):
                raise _refused(what, path, "/proc is not mounted") from None
            raise _refused(what, path, "it disappeared while being opened") from None
        except OSError as exc:
            raise _refused(what, path, exc.strerror or str(exc)) from None
        try:
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino):
                raise _refused(what, path, "it changed while being opened")
            size = opened.st_size
            identity = (opened.st_dev, opened.st_ino, opened.st_mtime_ns, size,
                        opened.st_ctime_ns)
            if size > max_bytes:
                raise _refused(what, path, f"it is larger than {max_bytes} bytes")
            data = _read_at_most(fd, size + 1)
        finally:
            os.close(fd)
    finally:
        os.close(handle)
    if len(data) > size:
        raise _refused(what, path, "it yields more bytes than its size (it changed while "
                                   "being read, or it is not a plain file)")
    return data, identity


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        try:
            chunk = os.read(fd, min(limit - total, 1 << 16))
        except InterruptedError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def read_file(
    path: str,
    what: str,
    access: FileAccess = AGENT,
    *,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    timeout: float = DEFAULT_READ_TIMEOUT,
) -> bytes:
    """:func:`read_file_identified` without the identity."""
    return read_file_identified(path, what, access, max_bytes=max_bytes, timeout=timeout)[0]


def read_file_identified(
    path: str,
    what: str,
    access: FileAccess = AGENT,
    *,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
    timeout: float = DEFAULT_READ_TIMEOUT,
) -> tuple[bytes, FileIdentity]:
    """Read the regular file ``path`` with ``access``'s rights: its bytes and the
    :data:`FileIdentity` of what was read. ``what`` names it in errors ("certificate file").
    Raises :class:`FileRefused`.

    Waiting for room under the caps is bounded by ``timeout``. Called from the main thread (an
    event loop's, a tool's), the read then runs in a thread of its own and the caller waits at
    most the rest of ``timeout``. Called from another thread (the agent's material threads), it
    runs right there, bounded only by the kernel: the caller's caller bounds the whole
    (:func:`ktlsd.material.build_tls_config` waits with a timeout).
    """
    deadline = time.monotonic() + timeout
    _admission.enter(access, what, path, deadline)
    if threading.get_ident() != threading.main_thread().ident:
        try:
            return _read_admitted(path, what, access, max_bytes)
        finally:
            _admission.leave(access)
    future: concurrent.futures.Future[tuple[bytes, FileIdentity]] = (
        concurrent.futures.Future()
    )

    def run() -> None:
        try:
            future.set_result(_read_admitted(path, what, access, max_bytes))
        except BaseException as exc:
            future.set_exception(exc)
        finally:
            _admission.leave(access)  # only now: a stuck read keeps holding its place

    threading.Thread(target=run, name="ktlsd-file-reader", daemon=True).start()
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        raise FileRefused(
            FailureCause.TIMEOUT, f"reading {what} {path} did not finish within {timeout:g} s"
        ) from None
