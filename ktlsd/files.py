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
* **Once.** The path is looked up exactly once, by ``open(O_PATH)`` under those rights. The
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
* **Off the event loop, with a timeout.** Reads run in a small dedicated thread pool; the
  caller waits at most ``timeout`` seconds (``TIMEOUT`` cause after that). Material building
  (:mod:`ktlsd.material`) runs in its own threads and calls :func:`read_file` from there.

How the rights are taken — and why threads, not a helper process
------------------------------------------------------------------
Linux credentials belong to a thread, not to a process. A worker of the private pool sets its
own supplementary groups, fsgid and fsuid before the lookup and always restores the agent's in
a ``finally``; each value is read back and compared after every change (``setfsuid`` with an
invalid id changes nothing and returns the current one; ``getgroups``), and a job that cannot
establish exactly the requested rights is refused. With an fsuid other than 0 the kernel drops
the thread's filesystem capabilities (``CAP_DAC_OVERRIDE``, ``CAP_DAC_READ_SEARCH``, ...), so
the thread really is the consumer for every filesystem check, while other threads of the agent
are untouched. Groups are set with the raw ``setgroups`` system call: the C library's
``setgroups()`` (and ``os.setgroups``) change every thread of the process, which would hand the
consumer's groups to the event loop. ``setfsuid``/``setfsgid`` go through the C library, whose
wrappers (glibc, musl) are plain per-thread system calls and pick the right variant for the
architecture; only ``setgroups`` needs a number (:data:`_SETGROUPS_SYSCALL`; on other
architectures consumer reads are refused with a clear reason, the agent's own still work).

A short-lived helper process per read would isolate the rights just as well and could be
SIGKILLed when stuck, but it costs a fork of a multi-threaded process (unsafe) or an exec of a
fresh interpreter (tens of milliseconds per handshake). The threads cost a few system calls per
read. What a thread cannot do is give up a read the kernel never finishes (a hung NFS or FUSE
server — and a local user can mount FUSE): the caller stops waiting after ``timeout``, the
worker stays blocked until the kernel returns, then restores its rights and is reused. So that
stuck reads cannot pile up, each uid has at most :data:`MAX_READS_PER_UID` reads in flight
(stuck ones included; further reads of that uid wait, within their own timeout) and consumer
reads together leave :data:`RESERVED_FOR_AGENT` workers free for the agent's own files, so the
kernel's requests are never starved by a consumer.

``/proc`` must be mounted (the reopen goes through ``/proc/self/fd``); without it every read is
refused with a reason that says so.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import errno
import os
import platform
import queue
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ktlsd.errors import FailureCause, HandshakeError

__all__ = [
    "AGENT",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_READ_TIMEOUT",
    "FileAccess",
    "FileRefused",
    "read_file",
]

DEFAULT_MAX_FILE_BYTES = 1 << 20  # the max_file_bytes setting
DEFAULT_READ_TIMEOUT = 5.0  # seconds one read may take, queueing included
READER_THREADS = 16
MAX_READS_PER_UID = 4
RESERVED_FOR_AGENT = 4
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
    """The calls that change one thread's filesystem credentials (see the module docstring)."""

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


# --- the pool ---------------------------------------------------------------------------------
_Job = tuple["concurrent.futures.Future[bytes]", Callable[[], bytes]]


class _Readers:
    """The worker threads and their admission: per-uid and consumer-wide in-flight caps.

    Workers are daemon threads started on demand (up to :data:`READER_THREADS`) and kept: a
    worker stuck in the kernel must not hold up the agent's exit, which a
    ``ThreadPoolExecutor`` (joined at exit) would.
    """

    def __init__(self) -> None:
        self.credentials = _Credentials()
        # The agent's own rights, taken in the thread that reads first (never a worker).
        self.agent = (os.geteuid(), os.getegid(), tuple(sorted(set(os.getgroups()))))
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._threads = 0
        self._idle = 0  # workers waiting for a job that no submitter has claimed yet
        self._backlog = 0  # jobs queued while every worker was busy
        self._per_uid: dict[int | None, int] = {}
        self._consumers = 0

    def submit(
        self, path: str, what: str, access: FileAccess, max_bytes: int, deadline: float
    ) -> concurrent.futures.Future[bytes]:
        self._admit(access, what, path, deadline)
        future: concurrent.futures.Future[bytes] = concurrent.futures.Future()
        future.add_done_callback(lambda _f: self._release(access))
        with self._cond:
            if self._idle > 0:
                self._idle -= 1
            elif self._threads < READER_THREADS:
                self._threads += 1
                threading.Thread(
                    target=self._work, name=f"ktlsd-file-reader-{self._threads}", daemon=True
                ).start()
            else:
                self._backlog += 1
            self._jobs.put((future, lambda: self._job(path, what, access, max_bytes)))
        return future

    def _work(self) -> None:
        while True:
            future, job = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:
                    future.set_exception(exc)
            with self._cond:
                if self._backlog > 0:
                    self._backlog -= 1
                else:
                    self._idle += 1

    def _admit(self, access: FileAccess, what: str, path: str, deadline: float) -> None:
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

    def _has_room(self, access: FileAccess) -> bool:
        if access.is_agent:
            return True  # the queue itself orders the agent's reads
        return (
            self._per_uid.get(access.uid, 0) < MAX_READS_PER_UID
            and self._consumers < READER_THREADS - RESERVED_FOR_AGENT
        )

    def _release(self, access: FileAccess) -> None:
        with self._cond:
            count = self._per_uid.get(access.uid, 0) - 1
            if count > 0:
                self._per_uid[access.uid] = count
            else:
                self._per_uid.pop(access.uid, None)
            if not access.is_agent:
                self._consumers -= 1
            self._cond.notify_all()

    def _job(self, path: str, what: str, access: FileAccess, max_bytes: int) -> bytes:
        """Runs in a worker: take the rights, read, always give the agent's rights back."""
        creds = self.credentials
        target = self.agent if access.uid is None else (access.uid, access.gid, access.groups)
        try:
            try:
                creds.become(*target)
            except OSError as exc:
                raise FileRefused(
                    FailureCause.MISSING_MATERIAL,
                    f"cannot read {what} {path} with the rights of {access.describe()}: "
                    f"{exc.strerror or exc}",
                ) from None
            return _read_regular_file(path, what, access, max_bytes)
        finally:
            # Raises (and fails this job) if it ever could not; the next job sets its own
            # rights from scratch either way, so nothing stale is ever used.
            creds.become(*self.agent)


_readers: _Readers | None = None
_readers_lock = threading.Lock()


def _pool() -> _Readers:
    global _readers
    with _readers_lock:
        if _readers is None:
            _readers = _Readers()
        return _readers


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


def _read_regular_file(path: str, what: str, access: FileAccess, max_bytes: int) -> bytes:
    try:
        handle = os.open(path, os.O_PATH | os.O_CLOEXEC)
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
    return data


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
    """Read the regular file ``path`` with ``access``'s rights; ``what`` names it in errors
    ("certificate file"). Blocks the calling thread for at most ``timeout`` seconds; never call
    it on an event loop thread. Raises :class:`FileRefused`."""
    readers = _pool()
    deadline = time.monotonic() + timeout
    future = readers.submit(path, what, access, max_bytes, deadline)
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        future.cancel()  # if still queued; a read already in the kernel finishes on its own
        raise FileRefused(
            FailureCause.TIMEOUT, f"reading {what} {path} did not finish within {timeout:g} s"
        ) from None
