"""The systemd flavour's checks for one boot; run by ktlsd-testbed-driver.service.

``driver.py RESULTS`` waits until systemd reports the boot finished, then runs the phase
prepare.py recorded for this boot and writes ``RESULTS/systemd-<phase>.json`` (the
scenarios' format: passed, figures, details, checks). ``driver.py --next-boot RESULTS`` is
the unit's ExecStopPost: it completes the result record (a failure if the checks wrote
none), saves this boot's journal to ``RESULTS/journal-<phase>.txt``, and reboots into the
next phase or powers off.

Phase ``upgrade`` (boot 1, tlshd enabled as ktls-utils installs it):
  the fstab NFS mount (``xprtsec=tls``) and the NVMe/TCP controller from nvme-cli's
  ``nvmf-autoconnect.service`` came up served by tlshd; then ``apt-get install`` of the
  ``.deb`` built from the tree: ktlsd.service enabled and running, tlshd.service stopped and
  disabled; the same mount (same mount id) keeps working, the controller stays live; new
  handshakes (the mount's connection cut and re-established, a controller reset) are
  served by ktlsd and none by tlshd.

Phase ``boot`` (boot 2, ktlsd from the package, tlshd disabled):
  ``boot``: ktlsd.service active before the mount and before nvme-cli's connects, the fstab
  mount and the TLS controller up with no manual step, ktlsd's journal holding their
  handshakes (NFS client and server, NVMe PSK both ends, discovery included);
  ``reload``/``usr1``: ``systemctl reload`` and ``kill -USR1`` each reread the configuration
  (a changed value is named in the journal) with a handshake in flight across it that
  completes, same main PID, no restart, the mount and the controller still working and a
  new handshake served after it; ``warning``: a wrong-PSK ``nvme connect`` fails and its
  handshakes are listed by ``journalctl -p warning -u ktlsd``, which lists no successful
  one; ``stop``: ``systemctl stop`` with a handshake in flight lets it complete, then the
  unit ends cleanly and its runtime directory is gone; ``startup``: tlshd.service and
  ktlsd.service started in turn in this boot, time from the main process's start to the
  multicast group joined (what consumers wait for), CPU time by then, idle RSS.

Independent sections: one failing does not stop the others; the phase fails if any check
failed. No key material is logged: PSKs live in /etc/nvme/tls-keys and the keyrings only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import platform
import re
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import (
    Scenario,
    ScenarioFailed,
    handshake_group_id,
    netlink_group_members,
)
from testbed.scenarios.nvme_tls import find_block_device
from testbed.systemd_guest import names

IO_BYTES = 1024 * 1024
STARTUP_ROUNDS = 3
HANDSHAKE_LINE = re.compile(
    r"handshake source=(?P<source>\S+) .*role=(?P<role>\S+) auth=(?P<auth>\S+) "
    r".*status=(?P<status>-?\d+)"
)


def log(text: str) -> None:
    print(f"[{time.monotonic():9.3f}] {text}", flush=True)


def run(argv: list[str], *, check: bool = False, timeout: float = 120,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    log("$ " + " ".join(argv))
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    out = (proc.stdout + proc.stderr).strip()
    if out:
        print("\n".join(out.splitlines()[-30:]), flush=True)
    if check and proc.returncode != 0:
        last = out.splitlines()[-1] if out else ""
        raise ScenarioFailed(f"{' '.join(argv)} exited {proc.returncode}: {last}")
    return proc


# -- systemd and the journal -------------------------------------------------------------


def props(unit: str, *keys: str) -> dict[str, str]:
    out = subprocess.run(
        ["systemctl", "show", unit, *(f"--property={k}" for k in keys)],
        capture_output=True, text=True,
    ).stdout  # fmt: skip
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def seconds(value: str) -> float:
    """A ``*TimestampMonotonic`` property (microseconds) in seconds; 0 when unset."""
    return int(value or 0) / 1e6


def now_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def wait_for(what: str, predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    log(f"timed out after {timeout:.0f} s waiting for {what}")
    return False


def active_state(unit: str) -> str:
    return props(unit, "ActiveState")["ActiveState"]


def journal(unit: str, since: int = 0, priority: str | None = None) -> list[tuple[int, int, str]]:
    """(monotonic usec, priority, message) of this boot's entries for ``unit`` since ``since``."""
    subprocess.run(["journalctl", "--sync"], capture_output=True)
    argv = ["journalctl", "-b", "-u", unit, "-o", "json", "--no-pager"]
    if priority:
        argv += ["-p", priority]
    entries = []
    for line in subprocess.run(argv, capture_output=True, text=True).stdout.splitlines():
        entry = json.loads(line)
        message = entry.get("MESSAGE", "")
        if isinstance(message, list):  # journald's form for non-UTF-8 messages
            message = bytes(message).decode("utf-8", "replace")
        mono = int(entry.get("__MONOTONIC_TIMESTAMP", 0))
        if mono >= since:
            entries.append((mono, int(entry.get("PRIORITY", 6)), str(message)))
    return entries


def ktlsd_handshakes(entries: list[tuple[int, int, str]], ok: bool | None = None) -> list[dict]:
    """ktlsd's one-line-per-handshake records in ``entries`` (successful/failed/all)."""
    found = []
    for mono, prio, message in entries:
        m = HANDSHAKE_LINE.search(message)
        if m and (ok is None or (m["status"] == "0") == ok):
            found.append({"mono": mono, "priority": prio, "line": message, **m.groupdict()})
    return found


def tlshd_successes(entries: list[tuple[int, int, str]]) -> list[str]:
    return [m for _, _, m in entries if "was successful" in m]


# -- NFS ------------------------------------------------------------------------------------


def mount_info(path: Path) -> dict[str, str] | None:
    """Mount id and options of the mount at ``path`` (None if nothing is mounted there)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4] == str(path):
            return {"id": fields[0], "line": line}
    return None


def call_with_timeout(fn: Callable[[], object], timeout: float, what: str) -> object:
    """Run ``fn`` in a thread: a hard NFS mount that lost its server blocks forever."""
    box: dict[str, object] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise ScenarioFailed(f"{what}: no answer within {timeout:.0f} s")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box.get("value")


def nfs_roundtrip(sc: Scenario, label: str, mnt: Path, export: str, name: str) -> None:
    """1 MiB written through ``mnt``, found in the export, read back over NFS after the
    client's page cache was dropped."""
    data = os.urandom(IO_BYTES)

    def write() -> None:
        with open(mnt / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    call_with_timeout(write, 60, f"{label}: write through {mnt}")
    sc.check((Path(export) / name).read_bytes() == data,
             f"{label}: 1 MiB written through {mnt} is in the export {export}")  # fmt: skip
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    back = call_with_timeout(lambda: (mnt / name).read_bytes(), 60, f"{label}: read {mnt}")
    sc.check(back == data, f"{label}: read back through {mnt} matches")


# -- NVMe -----------------------------------------------------------------------------------


def controller(subnqn: str) -> Path | None:
    for ctrl in sorted(Path("/sys/class/nvme").glob("nvme*")):
        f = ctrl / "subsysnqn"
        if f.exists() and f.read_text().strip() == subnqn:
            return ctrl
    return None


def ctrl_attr(ctrl: Path, name: str) -> str:
    try:
        return (ctrl / name).read_text().strip()
    except OSError:
        return ""


def psk_keys() -> dict[int, str]:
    """Serial -> description of the psk keys in /proc/keys (descriptions hold no secret)."""
    keys = {}
    for line in Path("/proc/keys").read_text().splitlines():
        m = re.match(r"([0-9a-f]+) .* psk\s+(NVMe\S+ \S+ \S+(?: \S+)?): ", line)
        if m:
            keys[int(m.group(1), 16)] = m.group(2)
    return keys


def nvme_io(sc: Scenario, label: str) -> None:
    """1 MiB O_DIRECT write + read-back on the namespace, also found on the target's RAM disk."""
    dev = find_block_device(names.SUBNQN)
    data = os.urandom(IO_BYTES)
    buf = mmap.mmap(-1, IO_BYTES)  # page-aligned for O_DIRECT

    def io() -> bytes:
        buf.seek(0)
        buf.write(data)
        fd = os.open(dev, os.O_RDWR | os.O_DIRECT)
        try:
            os.pwrite(fd, buf, 0)
            os.fsync(fd)
            buf.seek(0)
            buf.write(bytes(IO_BYTES))
            os.preadv(fd, [buf], 0)
        finally:
            os.close(fd)
        return bytes(buf)

    back = call_with_timeout(io, 60, f"{label}: NVMe I/O on {dev}")
    sc.check(back == data, f"{label}: 1 MiB O_DIRECT write + read-back on {dev} matches")
    fd = os.open(names.RAMDISK, os.O_RDONLY | os.O_DIRECT)
    try:
        os.preadv(fd, [buf], 0)
    finally:
        os.close(fd)
    sc.check(bytes(buf) == data, f"{label}: the data is on the target's {names.RAMDISK}")
    buf.close()


def reset_controller(sc: Scenario, label: str) -> None:
    """A controller reset: the kernel reconnects every queue, each with a new handshake."""
    ctrl = controller(names.SUBNQN)
    if ctrl is None:
        raise ScenarioFailed(f"{label}: no controller for {names.SUBNQN}")
    call_with_timeout(lambda: (ctrl / "reset_controller").write_text("1\n"), 90,
                      f"{label}: reset {ctrl.name}")  # fmt: skip
    live = wait_for(f"{ctrl.name} live", lambda: ctrl_attr(ctrl, "state") == "live", 60)
    sc.check(live, f"{label}: {ctrl.name} live again after a reset (new TLS handshakes)")


# -- a handshake in flight through ktlsd's service -------------------------------------------


class InflightHandshake:
    """A client handshake through ktlsd's service socket whose server answers when told.

    The client side is ``ktlsd.client.submit`` (x509, trusting the test bed's CA) on a TCP
    socket to a local listener; the server side is Python's ssl with the test bed's server
    certificate and starts only in :meth:`finish`, so the request stays in flight (the
    ClientHello sent, the agent waiting) for as long as the caller wants.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.client = socket.create_connection(self.listener.getsockname())
        self.server, _ = self.listener.accept()
        self.result: dict[str, object] = {}
        self.thread = threading.Thread(target=self._client, daemon=True)
        self.thread.start()

    def _client(self) -> None:
        from ktlsd import client

        try:
            done = asyncio.run(client.submit(
                self.client, role="client", auth="x509", truststore=str(names.CA),
                peername="127.0.0.1", timeout=60,
            ))  # fmt: skip
            self.result.update(status=done.status, reason=done.reason or "")
        except Exception as exc:
            self.result.update(status=-1, reason=f"{type(exc).__name__}: {exc}")

    def client_hello_sent(self, timeout: float = 60) -> bool:
        """True once the agent has sent its ClientHello (the request is in flight)."""
        ready, _, _ = select.select([self.server], [], [], timeout)
        return bool(ready)

    def finish(self, timeout: float = 60) -> dict[str, object]:
        """Run the server side of the handshake; return the client's DONE status/reason."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(names.SERVER_CERT, names.SERVER_KEY)
        self.server.settimeout(timeout)
        try:
            tls = ctx.wrap_socket(self.server, server_side=True)
            tls.close()
        except (OSError, ssl.SSLError) as exc:
            self.result.setdefault("server_error", f"{type(exc).__name__}: {exc}")
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.result.setdefault("status", "no answer")
        for s in (self.client, self.server, self.listener):
            with contextlib.suppress(OSError):
                s.close()
        return self.result


# -- agents ---------------------------------------------------------------------------------


def agent_pid(unit: str) -> int:
    return int(props(unit, "MainPID")["MainPID"] or 0)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# The floor of any Python daemon, measured beside the agents: the guest's python3 running
# nothing, importing asyncio, and a minimal asyncio daemon (AF_UNIX listener, then READY=1 to
# systemd by the sd_notify protocol, then idle), each as a transient unit.
FLOOR_NOTIFY_PROGRAM = """\
import asyncio, os, socket
async def main():
    server = await asyncio.start_unix_server(lambda r, w: w.close(), path="\\0ktlsd-floor")
    target = os.environ["NOTIFY_SOCKET"]
    target = "\\0" + target[1:] if target.startswith("@") else target
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", target)
    async with server:
        await asyncio.Event().wait()
asyncio.run(main())
"""
FLOOR_PROGRAMS: dict[str, tuple[str, ...]] = {
    "python_pass": ("python3", "-c", "pass"),
    "python_import_asyncio": ("python3", "-c", "import asyncio"),
    # The same two without the interpreter's teardown (under TCG a large share of start -> exit).
    "python_pass_no_teardown": ("python3", "-c", "import os; os._exit(0)"),
    "python_import_asyncio_no_teardown": ("python3", "-c", "import asyncio, os; os._exit(0)"),
    "python_asyncio_notify": ("python3", "-c", FLOOR_NOTIFY_PROGRAM),
}


def floor_round(name: str, argv: tuple[str, ...], unit: str) -> dict[str, float]:
    """One transient unit: main process start -> exit (or -> READY=1), CPU, idle RSS."""
    notify = name == "python_asyncio_notify"
    python = run(["sh", "-c", "command -v python3"]).stdout.strip() or "/usr/bin/python3"
    kind = ["-p", "Type=notify"] if notify else ["-p", "Type=exec", "-p", "RemainAfterExit=yes"]
    run(["systemd-run", f"--unit={unit}", "--quiet", "-p", "CPUAccounting=yes", *kind,
         python, *argv[1:]], check=True, timeout=120)  # fmt: skip
    if notify:
        p = props(unit, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
                  "MainPID")  # fmt: skip
        pid = int(p["MainPID"] or 0)
        end = seconds(p["ActiveEnterTimestampMonotonic"])
        cpu = cpu_seconds(pid) if pid else 0.0
        time.sleep(2)  # idle, as the agents
        rss = rss_kib(pid) if pid else 0
    else:
        wait_for(f"{unit} exited",
                 lambda: seconds(props(unit, "ExecMainExitTimestampMonotonic")
                                 ["ExecMainExitTimestampMonotonic"]) > 0, 90)  # fmt: skip
        p = props(unit, "ExecMainStartTimestampMonotonic", "ExecMainExitTimestampMonotonic",
                  "CPUUsageNSec")  # fmt: skip
        end = seconds(p["ExecMainExitTimestampMonotonic"])
        usage = p.get("CPUUsageNSec", "")
        cpu = int(usage) / 1e9 if usage.isdigit() else 0.0
        rss = 0
    start = seconds(p["ExecMainStartTimestampMonotonic"])
    run(["systemctl", "stop", unit], timeout=60)
    run(["systemctl", "reset-failed", unit], timeout=60)
    return {"ready_seconds": round(end - start, 3), "cpu_seconds": round(cpu, 3),
            "idle_rss_kib": rss}  # fmt: skip


def median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def set_default_timeout(value: int) -> None:
    """Change ``[ktlsd] default_timeout_ms`` in the configuration both agents read."""
    text = names.AGENT_CONF.read_text()
    names.AGENT_CONF.write_text(
        re.sub(r"(?m)^default_timeout_ms=\d+$", f"default_timeout_ms={value}", text)
    )


def blame(units: tuple[str, ...]) -> dict[str, str]:
    out = run(["systemd-analyze", "blame", "--no-pager"]).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-1] in units:
            found[parts[-1]] = " ".join(parts[:-1])
    return found


def wait_boot_finished(sc: Scenario) -> None:
    proc = run(["systemctl", "is-system-running", "--wait"], timeout=300)
    state = proc.stdout.strip()
    sc.figure("system_state", state)
    sc.figure("uptime_at_checks", float(Path("/proc/uptime").read_text().split()[0]))
    failed = run(["systemctl", "--failed", "--plain", "--no-legend"]).stdout.split("\n")
    sc.figure("failed_units", [ln.split()[0] for ln in failed if ln.strip()])
    sc.detail("systemd-analyze time: " + run(["systemd-analyze", "time"]).stdout.strip())


def section(sc: Scenario, name: str, fn: Callable[[], None]) -> None:
    """Run one independent part; a failure is recorded and the next part still runs."""
    log(f"--- {name} ---")
    try:
        fn()
    except ScenarioFailed as exc:
        failed = [c["check"] for c in sc.checks if not c["ok"]]
        if not failed or failed[-1] != str(exc):  # raised without a check: record one
            sc.check(False, f"{name}: {exc}", fatal=False)
        sc.detail(f"{name}: stopped at: {exc}")
    except Exception as exc:
        sc.check(False, f"{name}: {type(exc).__name__}: {exc}", fatal=False)
        import traceback

        traceback.print_exc()


def check(sc: Scenario, ok: bool, what: str) -> bool:
    """A check that fails the phase but lets the section go on."""
    return sc.check(ok, what, fatal=False)


# -- phase 1: upgrade from tlshd -------------------------------------------------------------


def phase_upgrade(sc: Scenario, plan: dict[str, object]) -> None:
    state: dict[str, object] = {}

    def before() -> None:
        check(sc, run(["dpkg-query", "-W", "ktlsd"]).returncode != 0, "before: ktlsd not installed")
        tlshd = props("tlshd.service", "ActiveState", "UnitFileState")
        check(sc, tlshd == {"ActiveState": "active", "UnitFileState": "enabled"},
              f"before: tlshd.service enabled and active ({tlshd})")  # fmt: skip
        info = mount_info(names.FSTAB_MOUNT)
        sc.check(
            info is not None and "xprtsec=tls" in info["line"],
            f"before: {names.FSTAB_MOUNT} mounted at boot from fstab with xprtsec=tls",
        )
        state["mount_id"] = info["id"]  # type: ignore[index]
        nfs_roundtrip(sc, "before", names.FSTAB_MOUNT, names.NFS_EXPORT, "before-upgrade.bin")
        ctrl = controller(names.SUBNQN)
        check(
            sc,
            ctrl is not None and ctrl_attr(ctrl, "state") == "live",
            f"before: nvmf-autoconnect connected {names.SUBNQN} (live)",
        )
        if ctrl is not None:
            key = int(ctrl_attr(ctrl, "tls_key") or "0", 16)
            check(
                sc,
                names.SUBNQN in psk_keys().get(key, ""),
                f"before: {ctrl.name} uses the retained PSK imported into .nvme",
            )
        ok = tlshd_successes(journal("tlshd.service"))
        sc.figure("tlshd_successful_handshakes_at_boot", len(ok))
        check(sc, len(ok) >= 2, "before: tlshd's journal shows the boot's handshakes")
        sc.figure(
            "boot_blame",
            blame(
                (
                    "tlshd.service",
                    "nvmf-autoconnect.service",
                    "nfs-server.service",
                    "mnt-nfs\\x2dtls.mount",
                )
            ),
        )

    def upgrade() -> None:
        deb = Path("/results") / str(plan["deb"])
        local = Path("/root") / deb.name
        local.write_bytes(deb.read_bytes())
        state["mark"] = now_usec()
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        t0 = time.monotonic()
        proc = run(["apt-get", "install", "-y", "--no-install-recommends", str(local)],
                   env=env, timeout=300)  # fmt: skip
        sc.figure("apt_install_seconds", round(time.monotonic() - t0, 1))
        notes = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("ktlsd:")]
        sc.figure("postinst_notes", notes)
        sc.check(proc.returncode == 0, f"upgrade: apt-get install ./{deb.name} succeeds")
        status = run(["dpkg-query", "-W", "-f=${Status} ${Version}", "ktlsd"]).stdout
        check(sc, status.startswith("install ok installed"), f"upgrade: dpkg says {status!r}")
        ktlsd = props(
            "ktlsd.service",
            "ActiveState",
            "UnitFileState",
            "ExecMainStartTimestampMonotonic",
            "ActiveEnterTimestampMonotonic",
        )
        check(sc, ktlsd["ActiveState"] == "active" and ktlsd["UnitFileState"] == "enabled",
              f"upgrade: ktlsd.service enabled and active ({ktlsd['UnitFileState']}, "
              f"{ktlsd['ActiveState']})")  # fmt: skip
        sc.figure("ktlsd_start_to_active_seconds", round(
            seconds(ktlsd["ActiveEnterTimestampMonotonic"])
            - seconds(ktlsd["ExecMainStartTimestampMonotonic"]), 2))  # fmt: skip
        tlshd = props("tlshd.service", "ActiveState", "UnitFileState")
        check(sc, tlshd == {"ActiveState": "inactive", "UnitFileState": "disabled"},
              f"upgrade: tlshd.service stopped and disabled ({tlshd})")  # fmt: skip
        group = handshake_group_id()
        check(sc, netlink_group_members(group) == 1, "upgrade: one agent listens (ktlsd)")

    def after() -> None:
        info = mount_info(names.FSTAB_MOUNT)
        check(
            sc,
            info is not None and info["id"] == state.get("mount_id"),
            f"after: {names.FSTAB_MOUNT} is the same mount as before (no remount)",
        )
        back = call_with_timeout(
            lambda: (names.FSTAB_MOUNT / "before-upgrade.bin").read_bytes(), 60, "after: read"
        )
        check(
            sc,
            back == Path(names.NFS_EXPORT, "before-upgrade.bin").read_bytes(),
            "after: the file written before the upgrade reads back through the mount",
        )
        nfs_roundtrip(sc, "after", names.FSTAB_MOUNT, names.NFS_EXPORT, "after-upgrade.bin")
        ctrl = controller(names.SUBNQN)
        check(
            sc,
            ctrl is not None and ctrl_attr(ctrl, "state") == "live",
            "after: the NVMe/TCP controller is still live",
        )
        nvme_io(sc, "after")

    def new_handshakes() -> None:
        mark = int(state["mark"])  # type: ignore[call-overload]
        # The mount's TCP connection is cut (the kernel's socket, as an admin's "ss -K"
        # would): the NFS client reconnects with a new TLS handshake on the next request,
        # and nfsd's side of the new connection has one too. (A second NFS mount of the
        # same server is no way to get new handshakes: the client shares the connection,
        # and an xprtsec=mtls mount next to an xprtsec=tls one is refused, see
        # docs/testbed.md.)
        killed = run(["ss", "-K", "-t", "-n", "dst", "127.0.0.1", "dport", "=", ":2049"])
        sc.figure("nfs_connection_cut", killed.stdout.count("127.0.0.1:2049"))
        check(sc, "127.0.0.1:2049" in killed.stdout, "new: the NFS mount's connection was cut")
        nfs_roundtrip(sc, "new", names.FSTAB_MOUNT, names.NFS_EXPORT, "reconnected.bin")
        reset_controller(sc, "new")
        nvme_io(sc, "new")
        done = ktlsd_handshakes(journal("ktlsd.service", since=mark), ok=True)
        nfs = [h for h in done if h["auth"] != "psk"]
        psk = [h for h in done if h["auth"] == "psk"]
        sc.figure("ktlsd_handshakes_after_upgrade", {"nfs": len(nfs), "nvme": len(psk)})
        check(
            sc,
            {h["role"] for h in nfs} >= {"client", "server"},
            "new: ktlsd's journal shows the NFS reconnect's client and server handshakes",
        )
        check(
            sc,
            len({h["role"] for h in psk}) == 2 and len(psk) >= 4,
            "new: ktlsd's journal shows the controller reset's PSK handshakes (both ends)",
        )
        late = tlshd_successes(journal("tlshd.service", since=mark))
        check(sc, not late, f"new: tlshd served nothing after the upgrade ({len(late)})")

    section(sc, "before", before)
    section(sc, "upgrade", upgrade)
    section(sc, "after", after)
    section(sc, "new", new_handshakes)


# -- phase 2: boot with ktlsd ----------------------------------------------------------------


def phase_boot(sc: Scenario, plan: dict[str, object]) -> None:
    group = handshake_group_id()
    mount_unit = "mnt-nfs\\x2dtls.mount"

    def at_boot() -> None:
        ktlsd = props("ktlsd.service", "ActiveState", "UnitFileState", "MainPID",
                      "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
                      "InactiveExitTimestampMonotonic", "NRestarts", "Type")  # fmt: skip
        sc.figure("ktlsd_unit_type", ktlsd["Type"])
        sc.check(ktlsd["ActiveState"] == "active" and ktlsd["UnitFileState"] == "enabled",
                 f"boot: ktlsd.service enabled and active ({ktlsd['UnitFileState']}, "
                 f"{ktlsd['ActiveState']})")  # fmt: skip
        check(
            sc,
            ktlsd["NRestarts"] == "0",
            f"boot: ktlsd.service never restarted ({ktlsd['NRestarts']})",
        )
        tlshd = props("tlshd.service", "ActiveState", "UnitFileState")
        check(sc, tlshd == {"ActiveState": "inactive", "UnitFileState": "disabled"},
              f"boot: tlshd.service disabled and not running ({tlshd})")  # fmt: skip
        ready = seconds(ktlsd["ActiveEnterTimestampMonotonic"])
        started = seconds(ktlsd["ExecMainStartTimestampMonotonic"])
        sc.figure("ktlsd_boot_start_seconds", round(started, 2))
        sc.figure("ktlsd_boot_start_to_active_seconds", round(ready - started, 2))
        sc.figure(
            "boot_blame",
            blame(("ktlsd.service", "nvmf-autoconnect.service", "nfs-server.service", mount_unit)),
        )
        mount = props(mount_unit, "ActiveState", "ActiveEnterTimestampMonotonic",
                      "InactiveExitTimestampMonotonic")  # fmt: skip
        auto = props("nvmf-autoconnect.service", "Result", "ExecMainStartTimestampMonotonic")
        info = mount_info(names.FSTAB_MOUNT)
        sc.check(mount["ActiveState"] == "active" and info is not None
                 and "xprtsec=tls" in info["line"],
                 f"boot: {names.FSTAB_MOUNT} mounted from fstab with xprtsec=tls")  # fmt: skip
        check(
            sc,
            ready <= seconds(mount["InactiveExitTimestampMonotonic"]),
            "boot: ktlsd.service was active before the NFS mount started",
        )
        check(sc, auto["Result"] == "success", f"boot: nvmf-autoconnect.service {auto['Result']}")
        check(
            sc,
            ready <= seconds(auto["ExecMainStartTimestampMonotonic"]),
            "boot: ktlsd.service was active before nvme connect-all started",
        )
        ctrl = controller(names.SUBNQN)
        sc.check(
            ctrl is not None and ctrl_attr(ctrl, "state") == "live",
            f"boot: nvmf-autoconnect connected {names.SUBNQN} over TLS (live)",
        )
        key = int(ctrl_attr(ctrl, "tls_key") or "0", 16)  # type: ignore[arg-type]
        check(
            sc,
            names.SUBNQN in psk_keys().get(key, ""),
            "boot: the controller uses the retained PSK imported into .nvme at boot",
        )
        entries = journal("ktlsd.service")
        linked = [m for _, _, m in entries if "keyrings linked:" in m]
        sc.figure("ktlsd_keyrings_linked_at_start", linked[0] if linked else None)
        done = ktlsd_handshakes(entries, ok=True)
        nfs = [h for h in done if h["auth"] != "psk"]
        psk = [h for h in done if h["auth"] == "psk"]
        sc.figure("ktlsd_handshakes_at_boot", {
            "nfs": len(nfs), "nvme": len(psk),
            "nvme_subsystem": sum(names.SUBNQN in h["line"] for h in psk),
            "nvme_discovery": sum(names.DISCOVERY_NQN in h["line"] for h in psk),
            "failed": len(ktlsd_handshakes(entries, ok=False)),
        })  # fmt: skip
        check(
            sc,
            {h["role"] for h in nfs} >= {"client", "server"},
            "boot: ktlsd's journal shows the NFS mount's client and server handshakes",
        )
        check(
            sc,
            any(names.SUBNQN in h["line"] for h in psk) and len({h["role"] for h in psk}) == 2,
            "boot: ktlsd's journal shows the NVMe/TCP PSK handshakes (host and target)",
        )
        check(
            sc,
            all(h["mono"] / 1e6 >= ready for h in done),
            "boot: no handshake was logged before ktlsd.service was active",
        )
        nfs_roundtrip(sc, "boot", names.FSTAB_MOUNT, names.NFS_EXPORT, "boot.bin")
        back = call_with_timeout(
            lambda: (names.FSTAB_MOUNT / "after-upgrade.bin").read_bytes(), 60, "boot: read"
        )
        check(
            sc,
            back == Path(names.NFS_EXPORT, "after-upgrade.bin").read_bytes(),
            "boot: the file written in the previous boot reads back",
        )
        nvme_io(sc, "boot")

    def reload_with(label: str, new_timeout: int, trigger: Callable[[int], None]) -> None:
        before = props("ktlsd.service", "MainPID", "NRestarts")
        pid = int(before["MainPID"])
        set_default_timeout(new_timeout)
        mark = now_usec()
        inflight = InflightHandshake()
        check(sc, inflight.client_hello_sent(), f"{label}: a service handshake is in flight")
        trigger(pid)
        reloaded = wait_for("the reload's journal line", lambda: any(
            "configuration reloaded" in m and f"-> {new_timeout}" in m
            for _, _, m in journal("ktlsd.service", since=mark)), 30)  # fmt: skip
        check(
            sc,
            reloaded,
            f"{label}: the journal says the configuration was reloaded "
            f"(default_timeout_ms -> {new_timeout})",
        )
        result = inflight.finish()
        check(
            sc,
            result.get("status") == 0,
            f"{label}: the handshake in flight across the reload completed ({result})",
        )
        after = props("ktlsd.service", "MainPID", "NRestarts", "ActiveState")
        check(
            sc,
            after["MainPID"] == str(pid)
            and after["NRestarts"] == before["NRestarts"]
            and after["ActiveState"] == "active",
            f"{label}: same main process, no restart, still active ({after})",
        )
        nfs_roundtrip(sc, label, names.FSTAB_MOUNT, names.NFS_EXPORT, f"{label}.bin")
        ctrl = controller(names.SUBNQN)
        check(
            sc,
            ctrl is not None and ctrl_attr(ctrl, "state") == "live",
            f"{label}: the NVMe/TCP controller is still live",
        )
        reset_controller(sc, label)
        nvme_io(sc, label)
        new = ktlsd_handshakes(journal("ktlsd.service", since=mark), ok=True)
        check(
            sc,
            sum(h["auth"] == "psk" for h in new) >= 2,
            f"{label}: handshakes after the reload are served",
        )

    def systemctl_reload(pid: int) -> None:
        run(["systemctl", "reload", "ktlsd.service"], check=True, timeout=60)

    def usr1(pid: int) -> None:
        os.kill(pid, signal.SIGUSR1)

    def wrong_psk() -> None:
        mark = now_usec()
        hostnqn = Path("/etc/nvme/hostnqn").read_text().strip()
        desc = next((d for d in psk_keys().values()
                     if d.startswith("NVMe1R01") and f" {names.SUBNQN} " in d), None)  # fmt: skip
        sc.check(desc is not None, "warning: the subsystem's retained PSK is in .nvme")
        # The host looks its PSK up in a private keyring holding a random key under the very
        # same description (and is told to use it), so the two ends' binders cannot agree.
        connect = (f"nvme connect -t tcp -a {names.NVME_ADDR} -s {names.NVME_PORT} "
                   f"-n {names.SUBNQN} --hostnqn={hostnqn} --tls --ctrl-loss-tmo=0 "
                   "--duplicate-connect --keyring=ktlsd-wrong")  # fmt: skip
        script = (
            "ring=$(keyctl newring ktlsd-wrong @s) && "
            f"key=$(head -c 32 /dev/urandom | keyctl padd psk '{desc}' \"$ring\") && "
            'keyctl setperm "$key" 0x3f030000 && ' + connect + ' --tls_key="$key"'
        )
        controllers = set(Path("/sys/class/nvme").glob("nvme*"))
        proc = run(["keyctl", "session", "-", "sh", "-c", script], timeout=120)
        new_ctrls = set(Path("/sys/class/nvme").glob("nvme*")) - controllers
        check(
            sc,
            proc.returncode != 0 and not new_ctrls,
            "warning: the wrong-PSK nvme connect fails and leaves no controller",
        )
        time.sleep(0.5)
        warned = journal("ktlsd.service", since=mark, priority="warning")
        failed = ktlsd_handshakes(warned, ok=False)
        sc.figure("journal_warning_lines", [m[:160] for _, _, m in warned][-4:])
        check(
            sc,
            bool(failed),
            "warning: journalctl -p warning -u ktlsd lists the failed handshake(s)",
        )
        ok_warned = ktlsd_handshakes(journal("ktlsd.service", priority="warning"), ok=True)
        check(
            sc,
            not ok_warned,
            "warning: journalctl -p warning -u ktlsd lists no successful "
            f"handshake ({len(ok_warned)})",
        )
        ctrl = controller(names.SUBNQN)
        check(
            sc,
            ctrl is not None and ctrl_attr(ctrl, "state") == "live",
            "warning: the good controller is still live",
        )

    def stop() -> None:
        mark = now_usec()
        inflight = InflightHandshake()
        check(sc, inflight.client_hello_sent(), "stop: a service handshake is in flight")
        run(["systemctl", "stop", "--no-block", "ktlsd.service"], check=True)
        draining = wait_for("ktlsd draining", lambda: active_state("ktlsd.service")
                            in ("deactivating", "inactive", "failed"), 30)  # fmt: skip
        check(sc, draining, "stop: systemctl stop began stopping ktlsd.service")
        result = inflight.finish()
        check(
            sc,
            result.get("status") == 0,
            f"stop: the handshake in flight when the stop began completed ({result})",
        )
        stopped = wait_for("ktlsd inactive", lambda: active_state("ktlsd.service")
                           in ("inactive", "failed"), 60)  # fmt: skip
        final = props("ktlsd.service", "ActiveState", "Result", "ExecMainCode",
                      "ExecMainStatus")  # fmt: skip
        sc.figure("stop_result", final)
        check(
            sc,
            stopped and final["ActiveState"] == "inactive" and final["Result"] == "success",
            f"stop: ktlsd.service stopped cleanly ({final})",
        )
        lines = [m for _, _, m in journal("ktlsd.service", since=mark)]
        check(
            sc,
            any(re.search(r"no new requests; finishing [1-9]\d* in flight", m) for m in lines),
            "stop: the journal says it drained the request in flight",
        )
        check(sc, not Path("/run/ktlsd").exists(), "stop: /run/ktlsd removed")
        check(sc, netlink_group_members(group) == 0, "stop: no agent listens any more")
        # Established TLS sessions live in the kernel: the mount works without an agent.
        nfs_roundtrip(sc, "stop", names.FSTAB_MOUNT, names.NFS_EXPORT, "stopped.bin")

    def startup() -> None:
        """tlshd and ktlsd started in turn in this boot: start -> multicast group joined.

        Each round also runs the Python floor (:data:`FLOOR_PROGRAMS`): start -> exit, or
        start -> ``READY=1`` for the minimal asyncio daemon."""
        figures: dict[str, list[dict[str, float]]] = {"tlshd": [], "ktlsd": []}
        floors: dict[str, list[dict[str, float]]] = {name: [] for name in FLOOR_PROGRAMS}
        for unit in ("ktlsd.service", "tlshd.service"):
            run(["systemctl", "stop", unit], timeout=60)
        for _ in range(STARTUP_ROUNDS):
            for agent in ("tlshd", "ktlsd"):
                unit = f"{agent}.service"
                sc.check(
                    wait_for("no agent", lambda: netlink_group_members(group) == 0, 30),
                    f"startup: no agent listens before {unit} starts",
                )
                run(["systemctl", "start", "--no-block", unit], check=True)
                joined = wait_for(f"{unit} joined", lambda: netlink_group_members(group) > 0, 90)
                at_join = time.monotonic()
                pid = agent_pid(unit)
                cpu = cpu_seconds(pid) if pid else 0.0
                sc.check(joined, f"startup: {unit} joined the handshake multicast group")
                wait_for(f"{unit} active", lambda u=unit: active_state(u) == "active", 90)
                p = props(unit, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
                start = seconds(p["ExecMainStartTimestampMonotonic"])
                time.sleep(2)  # idle: start-up allocations settled
                figures[agent].append({
                    "ready_seconds": round(at_join - start, 3),
                    "active_seconds": round(seconds(p["ActiveEnterTimestampMonotonic"]) - start, 3),
                    "cpu_seconds": round(cpu, 3),
                    "idle_rss_kib": rss_kib(pid) if pid else 0,
                })  # fmt: skip
                run(["systemctl", "stop", unit], check=True, timeout=60)
            for name, argv in FLOOR_PROGRAMS.items():
                unit = f"ktlsd-floor-{name.replace('_', '-')}-{len(floors[name])}.service"
                floors[name].append(floor_round(name, argv, unit))
                sc.check(floors[name][-1]["ready_seconds"] > 0,
                         f"startup: {name} measured as {unit}")  # fmt: skip
        sc.figure("startup_same_boot", figures)
        sc.figure("startup_python_floor_same_boot", floors)
        medians = {agent: median([r["ready_seconds"] for r in rows])
                   for agent, rows in {**figures, **floors}.items()}  # fmt: skip
        for agent, value in medians.items():
            sc.figure(f"startup_{agent}_ready_seconds_median", value)
        floor = medians["python_asyncio_notify"]
        sc.figure("startup_ratios_of_medians", {
            "ktlsd_over_tlshd": round(medians["ktlsd"] / medians["tlshd"], 2),
            "ktlsd_over_asyncio_notify_floor": round(medians["ktlsd"] / floor, 2),
            "asyncio_notify_floor_over_tlshd": round(floor / medians["tlshd"], 2),
            "python_pass_over_tlshd": round(medians["python_pass"] / medians["tlshd"], 2),
            "import_asyncio_over_tlshd":
                round(medians["python_import_asyncio"] / medians["tlshd"], 2),
        })  # fmt: skip
        run(["systemctl", "start", "ktlsd.service"], timeout=120)

    section(sc, "boot", at_boot)
    section(sc, "reload", lambda: reload_with("reload", 12000, systemctl_reload))
    section(sc, "usr1", lambda: reload_with("usr1", 14000, usr1))
    section(sc, "warning", wrong_psk)
    section(sc, "stop", stop)
    section(sc, "startup", startup)


# -- entry points ---------------------------------------------------------------------------


def current_phase() -> str:
    return (names.STATE_DIR / "phase").read_text().strip()


def result_path(results: Path, phase: str) -> Path:
    return results / f"{names.RESULT_NAMES[phase]}.json"


def main(results: Path) -> int:
    phase = current_phase()
    plan = json.loads((results / names.PLAN_NAME).read_text())
    log(f"phase {phase}")
    started = time.monotonic()
    with Scenario(str(result_path(results, phase))) as sc:
        wait_boot_finished(sc)
        {"upgrade": phase_upgrade, "boot": phase_boot}[phase](sc, plan)
        failed = [c["check"] for c in sc.checks if not c["ok"]]
        if failed:
            raise ScenarioFailed(f"{len(failed)} check(s) failed, first: {failed[0]}")
    record = json.loads(result_path(results, phase).read_text())
    record.update(name=names.RESULT_NAMES[phase], kernel=platform.release(),
                  seconds=round(time.monotonic() - started, 1))  # fmt: skip
    result_path(results, phase).write_text(json.dumps(record, indent=2) + "\n")
    return 0


def next_boot(results: Path) -> int:
    """ExecStopPost: complete the record, keep the journal, reboot or power off."""
    phase = current_phase()
    path = result_path(results, phase)
    if not path.exists():
        why = (
            f"the checks wrote no result (service result {os.environ.get('SERVICE_RESULT')}, "
            f"exit {os.environ.get('EXIT_CODE')}/{os.environ.get('EXIT_STATUS')})"
        )
        path.write_text(json.dumps({
            "name": names.RESULT_NAMES[phase], "passed": False, "figures": {},
            "details": [why], "checks": [], "kernel": platform.release(),
        }, indent=2) + "\n")  # fmt: skip
    with open(results / f"journal-{phase}.txt", "w") as f:
        subprocess.run(["journalctl", "-b", "-o", "short-monotonic", "--no-pager"],
                       stdout=f, stderr=subprocess.STDOUT)  # fmt: skip
    os.sync()
    action = "reboot" if phase == "upgrade" else "poweroff"
    log(f"phase {phase} done: {action}")
    # "systemctl reboot" would ask logind first (no D-Bus here) and say so before falling
    # back to this.
    subprocess.run(["systemctl", "--no-block", "--job-mode=replace-irreversibly",
                    "start", f"{action}.target"])  # fmt: skip
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--next-boot":
        sys.exit(next_boot(Path(sys.argv[2])))
    sys.exit(main(Path(sys.argv[1])))
