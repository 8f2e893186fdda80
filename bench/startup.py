#!/usr/bin/env python3
"""Start-up cost of ``ktlsd``: CPU, wall time and memory, next to bare Python and tlshd.

Cases, each run once per round, rounds interleaved (so a busy moment hits every case alike):

* ``python -c pass`` and ``python -c "import asyncio"`` -- the floor any Python daemon pays;
* the same two interpreters idling for one second: their RSS is the memory floor;
* ``ktlsd --help`` and ``ktlsd --version``;
* ``ktlsd run`` until ready: started with a temporary configuration and service socket and a
  real ``$NOTIFY_SOCKET``; "ready" is its ``READY=1``, sent once it takes requests from every
  source (the service socket answers; the kernel's handshake family is served when the
  kernel has one). The child is then killed at once, so ``wait4()`` gives the CPU (user +
  sys) it spent until ready;
* ``ktlsd run`` idle: the same start, one second of idling, then its RSS (``VmRSS``);
* ``tlshd`` until ready, when it is installed and the kernel has the handshake family:
  "ready" is its generic netlink socket joining a multicast group (polled from
  ``/proc/net/netlink``; tlshd sends no readiness), then killed and reaped likewise; its
  idle RSS likewise after one second.

Figures are the median of the rounds with the range beside it; ratio lines compare medians.
CPU is the child's user+sys from ``os.wait4()``; wall is from ``fork`` to exit or to ready.

Run it where nothing else expects handshakes from the agent (with the kernel family present,
the ``ktlsd run``/``tlshd`` children join the handshake multicast group for a moment).

Usage: python bench/startup.py [--rounds 7] [--python PYTHON] [--ktlsd "CMD ..."]
       [--tlshd PATH]

``--python`` is the interpreter of the baselines and of ``ktlsd`` (default: this one, with
the tree on ``PYTHONPATH``); ``--ktlsd`` runs an installed command instead (e.g.
``/usr/sbin/ktlsd``). A package install runs ``/usr/bin/python3`` with no virtualenv, so
``/usr/bin/python3 bench/startup.py`` is the figure closest to it.
"""

from __future__ import annotations

import argparse
import os
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
READY_LIMIT = 60.0  # seconds: only turns a daemon that never gets ready into an error


@dataclass
class Sample:
    cpu: float  # seconds, user + sys
    wall: float  # seconds
    rss_kb: int | None = None  # idle VmRSS (daemons) or ru_maxrss (one-shot commands)


@dataclass
class Case:
    name: str
    measure: Callable[[], Sample]
    samples: list[Sample] = field(default_factory=list)


def reap(pid: int) -> tuple[int, float, int]:
    """wait4(): (status, user+sys seconds, ru_maxrss KiB)."""
    _, status, usage = os.wait4(pid, 0)
    return status, usage.ru_utime + usage.ru_stime, usage.ru_maxrss


def one_shot(argv: Sequence[str], env: dict[str, str]) -> Sample:
    """A command that exits by itself. (Its ``ru_maxrss`` is not reported: on Linux it
    includes the forking parent's image, so it says nothing about the command.)"""
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    status, cpu, _ = reap(proc.pid)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} failed with status {proc.returncode}")
    return Sample(cpu, wall)


def idle_python(python: str, imports: str, env: dict[str, str]) -> Sample:
    """The RSS of an interpreter that imported ``imports`` and idles for one second (the
    baseline for the daemon's idle RSS)."""
    code = f"import sys\n{imports}\nprint(flush=True)\nsys.stdin.read()"
    started = time.monotonic()
    proc = subprocess.Popen([python, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None and proc.stdin is not None
    proc.stdout.readline()
    wall = time.monotonic() - started
    time.sleep(1.0)
    rss = vm_rss_kb(proc.pid)
    proc.stdin.close()
    _, cpu, _ = reap(proc.pid)
    proc.returncode = 0
    proc.stdout.close()
    return Sample(cpu, wall, rss)


def vm_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def kill_and_reap(proc: subprocess.Popen[bytes]) -> float:
    proc.send_signal(signal.SIGKILL)
    _, cpu, _ = reap(proc.pid)
    proc.returncode = -signal.SIGKILL
    return cpu


class KtlsdRun:
    """``ktlsd run`` in a temporary directory, ready when ``READY=1`` arrives."""

    def __init__(self, command: Sequence[str], env: dict[str, str]) -> None:
        self.command = list(command)
        self.env = env

    def start(self, tmp: Path) -> tuple[subprocess.Popen[bytes], float]:
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify_path = tmp / "notify"
        notify.bind(str(notify_path))
        config = tmp / "config"
        config.write_text("[ktlsd]\nlog_level = warning\n")
        env = {**self.env, "NOTIFY_SOCKET": str(notify_path)}
        argv = [*self.command, "run", "-c", str(config), "--socket", str(tmp / "hs.sock")]
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env=env)
        try:
            while True:
                readable, _, _ = select.select([notify], [], [], READY_LIMIT)
                if not readable:
                    raise SystemExit(f"{shlex.join(argv)}: no READY=1 in {READY_LIMIT:g} s")
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    break
        finally:
            notify.close()
        return proc, time.monotonic() - started

    def ready(self) -> Sample:
        with tempfile.TemporaryDirectory(prefix="ktlsd-bench-") as tmp:
            proc, wall = self.start(Path(tmp))
            return Sample(kill_and_reap(proc), wall)

    def idle(self) -> Sample:
        with tempfile.TemporaryDirectory(prefix="ktlsd-bench-") as tmp:
            proc, wall = self.start(Path(tmp))
            time.sleep(1.0)
            rss = vm_rss_kb(proc.pid)
            proc.send_signal(signal.SIGTERM)
            _, cpu, _ = reap(proc.pid)
            proc.returncode = 0
            return Sample(cpu, wall, rss)


def netlink_inodes_with_groups(pid: int) -> bool:
    """True once a generic netlink socket of ``pid`` has joined a multicast group."""
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/netlink").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 10 and fields[1] == "16" and fields[9] in inodes and int(fields[3], 16):
            return True
    return False


class TlshdRun:
    """tlshd with an empty configuration, ready when it has joined the multicast group."""

    def __init__(self, path: str) -> None:
        self.path = path

    def start(self, tmp: Path) -> tuple[subprocess.Popen[bytes], float]:
        config = tmp / "tlshd.conf"
        config.write_text("[debug]\nloglevel=0\n")
        argv = [self.path, "-c", str(config)]
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = started + READY_LIMIT
        while not netlink_inodes_with_groups(proc.pid):
            if proc.poll() is not None:
                raise SystemExit(f"{self.path} exited with {proc.returncode} before joining")
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"{self.path}: not ready in {READY_LIMIT:g} s")
            time.sleep(0.001)
        return proc, time.monotonic() - started

    def ready(self) -> Sample:
        with tempfile.TemporaryDirectory(prefix="tlshd-bench-") as tmp:
            proc, wall = self.start(Path(tmp))
            return Sample(kill_and_reap(proc), wall)

    def idle(self) -> Sample:
        with tempfile.TemporaryDirectory(prefix="tlshd-bench-") as tmp:
            proc, wall = self.start(Path(tmp))
            time.sleep(1.0)
            rss = vm_rss_kb(proc.pid)
            proc.send_signal(signal.SIGTERM)
            _, cpu, _ = reap(proc.pid)
            proc.returncode = 0
            return Sample(cpu, wall, rss)


def handshake_family_present() -> bool:
    sys.path.insert(0, str(REPO))
    from ktlsd.upcall.kernel import KernelSourceError, probe_kernel_policy

    try:
        probe_kernel_policy()
    except (KernelSourceError, OSError):
        return False
    return True


def find_tlshd(explicit: str | None) -> tuple[str | None, str]:
    """tlshd's path, or None and why it is not measured."""
    path = explicit or shutil.which("tlshd") or (
        "/usr/sbin/tlshd" if os.path.exists("/usr/sbin/tlshd") else None)
    if path is None:
        return None, "tlshd not installed"
    if not handshake_family_present():
        return None, "tlshd installed but not measured: the kernel has no handshake family " \
                     "(tlshd exits at once without it)"
    if os.geteuid() != 0:
        return None, "tlshd not measured: needs root"
    return path, f"tlshd: {path}"


def fmt_range(values: list[float], scale: float, unit: str, digits: int) -> str:
    med = statistics.median(values) * scale
    return (f"{med:.{digits}f} {unit} ({min(values) * scale:.{digits}f}-"
            f"{max(values) * scale:.{digits}f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (>= 5)")
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter for the baselines and for ktlsd")
    parser.add_argument("--ktlsd", help="an installed ktlsd command (default: "
                        "PYTHON -m ktlsd from this tree)")
    parser.add_argument("--tlshd", help="tlshd's path (default: from PATH or /usr/sbin)")
    args = parser.parse_args()
    if args.rounds < 5:
        parser.error("--rounds must be at least 5")

    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM", "KTLSD_CONFIG", "PYTHONSTARTUP")}
    if args.ktlsd:
        ktlsd = shlex.split(args.ktlsd)
    else:
        ktlsd = [args.python, "-m", "ktlsd"]
        env["PYTHONPATH"] = str(REPO)
    python = args.python
    daemon = KtlsdRun(ktlsd, env)
    cases = [
        Case("python -c pass", lambda: one_shot([python, "-c", "pass"], env)),
        Case("python -c 'import asyncio'", lambda: one_shot([python, "-c", "import asyncio"],
                                                            env)),
        Case("python idle", lambda: idle_python(python, "pass", env)),
        Case("python 'import asyncio' idle", lambda: idle_python(python, "import asyncio", env)),
        Case("ktlsd --help", lambda: one_shot([*ktlsd, "--help"], env)),
        Case("ktlsd --version", lambda: one_shot([*ktlsd, "--version"], env)),
        Case("ktlsd run: ready", daemon.ready),
        Case("ktlsd run: idle 1 s", daemon.idle),
    ]
    tlshd_path, tlshd_note = find_tlshd(args.tlshd)
    if tlshd_path is not None:
        tlshd = TlshdRun(tlshd_path)
        cases += [Case("tlshd: ready", tlshd.ready), Case("tlshd: idle 1 s", tlshd.idle)]

    version = subprocess.run([*ktlsd, "--version"], capture_output=True, text=True,
                             env=env, check=True).stdout.strip()
    print(f"{version}; {python} (Python {sys.version.split()[0]} for this script); "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}; {args.rounds} rounds")
    print(tlshd_note)
    for _ in range(args.rounds):
        for case in cases:
            case.samples.append(case.measure())

    print(f"\n{'case':32} {'CPU (median, range)':28} {'wall (to exit or ready)':28} memory")
    by_name = {c.name: c for c in cases}
    for case in cases:
        cpu = fmt_range([s.cpu for s in case.samples], 1000, "ms", 0)
        wall = fmt_range([s.wall for s in case.samples], 1000, "ms", 0)
        rss = [s.rss_kb for s in case.samples if s.rss_kb is not None]
        memory = ""
        if rss:
            memory = f"idle RSS {fmt_range([float(r) for r in rss], 1 / 1024, 'MiB', 1)}"
        if "idle" in case.name:
            cpu, wall = "-", "-"
        print(f"{case.name:32} {cpu:28} {wall:28} {memory}")

    def med(name: str, attr: str) -> float:
        return float(statistics.median(float(getattr(s, attr)) for s in by_name[name].samples))

    print()
    ratios = [
        ("ktlsd --help CPU / python -c pass CPU", "ktlsd --help", "python -c pass", "cpu"),
        ("ktlsd run ready CPU / python import asyncio CPU", "ktlsd run: ready",
         "python -c 'import asyncio'", "cpu"),
        ("ktlsd run idle RSS / python 'import asyncio' idle RSS", "ktlsd run: idle 1 s",
         "python 'import asyncio' idle", "rss_kb"),
    ]
    if tlshd_path is not None:
        ratios += [
            ("ktlsd run ready CPU / tlshd ready CPU", "ktlsd run: ready", "tlshd: ready", "cpu"),
            ("ktlsd run ready wall / tlshd ready wall", "ktlsd run: ready", "tlshd: ready",
             "wall"),
            ("ktlsd idle RSS / tlshd idle RSS", "ktlsd run: idle 1 s", "tlshd: idle 1 s",
             "rss_kb"),
        ]
    for label, top, bottom, attr in ratios:
        denominator = med(bottom, attr)
        ratio = med(top, attr) / denominator if denominator else float("inf")
        print(f"ratio {label}: {ratio:.2f}")
    targets = [("ktlsd run ready CPU <= 0.5 s", med("ktlsd run: ready", "cpu") <= 0.5),
               ("ktlsd --help CPU <= 0.15 s", med("ktlsd --help", "cpu") <= 0.15),
               ("ktlsd run idle RSS <= 25 MB (10^6 bytes)",
                med("ktlsd run: idle 1 s", "rss_kb") * 1024 <= 25_000_000)]
    for label, met in targets:
        print(f"target {label}: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
