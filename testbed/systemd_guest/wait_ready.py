"""TEMPORARY readiness wait for ktlsd.service (see temporary-type-simple.conf).

Exits 0 once some socket has joined the handshake family's ``tlshd`` multicast group and
``/run/ktlsd/handshake.sock`` exists; 1 after 120 s. Runs inside the unit's sandbox
(AF_UNIX and AF_NETLINK only, read-only file system), like ExecStart.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import handshake_group_id, netlink_group_members

SOCKET = Path("/run/ktlsd/handshake.sock")


def main() -> int:
    deadline = time.monotonic() + 120
    group = None
    while time.monotonic() < deadline:
        try:
            group = group or handshake_group_id()
        except Exception:  # the family exists once the kernel is up; retry anyway
            group = None
        if group and netlink_group_members(group) > 0 and SOCKET.exists():
            return 0
        time.sleep(0.05)
    print("wait_ready: ktlsd did not join the handshake group within 120 s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
