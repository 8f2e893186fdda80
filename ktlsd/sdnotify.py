"""The service manager's notification protocol (sd_notify), in a few lines of the stdlib.

A service started with ``Type=notify`` (or ``notify-reload``) finds ``$NOTIFY_SOCKET`` in its
environment: an ``AF_UNIX`` datagram socket, named by an absolute path or, when the name
starts with ``@``, in the abstract namespace (the ``@`` stands for the leading NUL byte).
Each datagram is newline-separated ``VARIABLE=value`` assignments (sd_notify(3)). ktlsd sends:

* ``READY=1`` with a ``STATUS=`` line once it serves every upcall source it opened;
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` (CLOCK_MONOTONIC, microseconds) when a reload
  starts, then ``READY=1`` again when it is over (systemd >= 253 waits for it);
* ``STOPPING=1`` when it stops taking requests and drains the ones in flight.

Without ``$NOTIFY_SOCKET`` (not started by a service manager) :func:`notify` does nothing
and returns False. A notification that cannot be sent is not an error for the daemon: it
returns False and the caller goes on (a service manager that went away cannot be helped).
Nothing here blocks: the datagram socket is non-blocking, created and closed per message.
"""

from __future__ import annotations

import os
import socket
import time

ENV_NOTIFY_SOCKET = "NOTIFY_SOCKET"


def notify_address(value: str | None = None) -> str | bytes | None:
    """The address ``$NOTIFY_SOCKET`` (or ``value``) names, or None when unusable.

    ``/path`` is a file-system socket; ``@name`` is the abstract socket ``\\0name``. Anything
    else (a relative path, an empty value, ``vsock:`` addresses) is not for this daemon.
    """
    if value is None:
        value = os.environ.get(ENV_NOTIFY_SOCKET)
    if not value:
        return None
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def notify(*assignments: str, address: str | bytes | None = None) -> bool:
    """Send ``VARIABLE=value`` lines as one datagram; True if it was sent.

    ``address`` defaults to ``$NOTIFY_SOCKET`` (read on every call, as sd_notify does).
    Values must not contain newlines (each is one line of the message).
    """
    target = address if address is not None else notify_address()
    if target is None or not assignments:
        return False
    for item in assignments:
        if "\n" in item or "=" not in item:
            raise ValueError(f"not a VARIABLE=value line: {item!r}")
    message = "\n".join(assignments).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.setblocking(False)
        try:
            sock.sendto(message, target)
        except OSError:
            return False
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the ``MONOTONIC_USEC=`` of a ``RELOADING=1``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def status_line(text: str) -> str:
    """A ``STATUS=`` assignment, flattened to one line."""
    return "STATUS=" + " ".join(text.split())


def ready(status: str) -> bool:
    return notify("READY=1", status_line(status))


def reloading() -> bool:
    return notify("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}",
                  status_line("reloading the configuration"))


def stopping(status: str) -> bool:
    return notify("STOPPING=1", status_line(status))
