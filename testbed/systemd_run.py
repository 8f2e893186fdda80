"""Boot the test-bed guest with systemd as PID 1 and the ``.deb`` built from the tree.

``python -m testbed.systemd_run [--json REPORT] [--timeout SECONDS] [--results-dir DIR]``

Issue 11's acceptance on a real kernel. Same image as :mod:`testbed.run` (cached by recipe),
booted with ``ktlsd.systemd=1``: the guest's init runs ``testbed/systemd_guest/prepare.py``
and hands PID 1 to systemd. One QEMU process, two guest boots (QEMU resets the machine on a
guest reboot and the ``snapshot=on`` overlay survives it):

1. ``systemd-upgrade``: tlshd.service serves the boot's fstab NFS mount and nvme-cli's
   autoconnect controller; the ``.deb`` (built here by packaging/build-deb.sh into the
   results directory, shared with the guest) is installed with ``apt-get``; the mount and
   the controller keep working and new handshakes are served by ktlsd.
2. ``systemd-boot``: the boot with ktlsd.service from the package: mount and controller up
   with no manual step, served by ktlsd; reload, SIGUSR1, wrong PSK under
   ``journalctl -p warning``, draining stop, and ktlsd's start-up against tlshd's.

What each phase checks: the docstring of ``testbed/systemd_guest/driver.py``. The report has
the shape of :func:`testbed.run.run`'s, one record per phase, so
:func:`testbed.run.format_report` prints it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed import build as build_mod
from testbed import vm
from testbed.run import BOOT_RETRIES, format_report, kernel_crashed
from testbed.systemd_guest import names

PROJECT = Path(__file__).resolve().parent.parent
CMDLINE = "ktlsd.systemd=1"
PHASES: tuple[str, ...] = tuple(names.RESULT_NAMES[p] for p in names.PHASES.values())
DEFAULT_TIMEOUT = 1200.0
#: The console line of the guest's final, deliberate power-off (systemd's).
POWER_OFF = "reboot: Power down"


class DebBuildError(build_mod.BuildError):
    """packaging/build-deb.sh failed; the message has its output tail."""


def build_deb(out_dir: Path) -> Path:
    """The .deb of the tree under test, built by packaging/build-deb.sh into ``out_dir``."""
    proc = subprocess.run(
        ["bash", str(PROJECT / "packaging" / "build-deb.sh"), str(out_dir)],
        capture_output=True, text=True, cwd=PROJECT,
    )  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines or not lines[-1].endswith(".deb"):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
        raise DebBuildError(f"packaging/build-deb.sh failed (exit {proc.returncode}):\n{tail}")
    return Path(lines[-1])


def plan(deb: Path) -> dict[str, object]:
    """What the guest reads from ``systemd-plan.json``."""
    return {"deb": deb.name, "phases": PHASES}


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-lines:])
    except FileNotFoundError:
        return ""


def _clear(results: Path, *patterns: str) -> None:
    """Remove what an earlier run (or attempt) left: phase results, guard, guest log."""
    for pattern in (*patterns, "*.json", "*.txt"):
        for old in results.glob(pattern):
            old.unlink(missing_ok=True)
    (results / names.GUEST_LOG).unlink(missing_ok=True)


def run(*, timeout: float = DEFAULT_TIMEOUT, results_dir: Path | None = None) -> dict[str, object]:
    """Build (if needed) the image and the .deb, boot once (two guest boots), report."""
    wall = time.monotonic()
    t0 = time.monotonic()
    image = build_mod.build()
    build_seconds = time.monotonic() - t0
    results = Path(results_dir or tempfile.mkdtemp(prefix="ktlsd-vm-systemd-"))
    results.mkdir(parents=True, exist_ok=True)
    _clear(results, "*.deb")
    deb = build_deb(results)
    boots: list[dict[str, object]] = []
    for attempt in range(1 + BOOT_RETRIES):
        # A fresh QEMU each time: the snapshot overlay of a crashed run is gone, so the two
        # guest boots start again from the image (the upgrade needs tlshd's boot first).
        _clear(results)
        (results / names.PLAN_NAME).write_text(json.dumps(plan(deb), indent=2) + "\n")
        console = results / ("console.log" if attempt == 0 else f"console-retry{attempt}.log")
        boot = vm.boot(image, PROJECT, results, timeout, console,
                       extra_cmdline=CMDLINE, allow_reboot=True)  # fmt: skip
        text = console.read_text(errors="replace") if console.exists() else ""
        problem: str | None = None
        if boot.timed_out:
            problem = f"QEMU killed after the {timeout:.0f} s wall-clock limit"
        elif "KTLSD-GUEST-READY" not in text:
            problem = "the guest never reached its init"
        elif (results / "systemd-guard.txt").exists():
            problem = (results / "systemd-guard.txt").read_text().strip()
        # A guest kernel crash (the rare TCG int3 Oops, docs/testbed.md) reboots the guest
        # into the next phase with the previous one unfinished: run both boots again once.
        crashed = kernel_crashed(text, POWER_OFF)
        boots.append({"accel": boot.accel, "seconds": round(boot.seconds, 1),
                      "problem": problem, "kernel_crash": crashed, "console": str(console),
                      "scenarios": list(PHASES)})  # fmt: skip
        if not crashed or boot.timed_out:
            break
    per: list[dict[str, object]] = []
    for name in PHASES:
        path = results / f"{name}.json"
        if path.exists():
            rec = json.loads(path.read_text())
        else:
            rec = {
                "name": name,
                "passed": False,
                "figures": {},
                "details": [f"no result: {problem or 'the guest did not reach this phase'}"],
            }
        rec["name"] = name
        if not rec.get("passed"):
            rec["log_tail"] = _tail(results / names.GUEST_LOG, 40)
            rec["console_tail"] = boot.console_tail()
        per.append(rec)
    return {
        "comparison": {},
        "kernel": next((r.get("kernel") for r in per if r.get("kernel")), image.kernel_release),
        "kernel_package": f"{image.kernel_package} {image.kernel_package_version}",
        "accel": boot.accel,
        "build_seconds": round(build_seconds, 1),
        "boot_seconds": None,
        "qemu_seconds": round(boot.seconds, 1),
        "wall_seconds": round(time.monotonic() - wall, 1),
        "qemu_returncode": boot.returncode,
        "boots": boots,
        "guest_problem": problem,
        "results_dir": str(results),
        "deb": deb.name,
        "passed": all(r.get("passed") for r in per) and problem is None,
        "scenarios": per,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.systemd_run",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help="QEMU wall-clock limit for both boots",
    )
    parser.add_argument("--results-dir", type=Path, help="keep guest results, logs, journals")
    args = parser.parse_args(argv)
    try:
        report = run(timeout=args.timeout, results_dir=args.results_dir)
    except build_mod.BuildError as exc:
        print(f"testbed.systemd_run: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
