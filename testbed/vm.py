"""Boot the test-bed guest under QEMU with a hard wall-clock limit.

Every boot uses ``-snapshot``, so the root image is never modified and each run starts from
the same state. The project tree is shared read-only over virtio-9p (tag ``ktlsd``, mounted
at /ktlsd in the guest) and a per-run host directory is shared writable (tag ``results``,
mounted at /results): the host writes the plan there and the guest writes results back.
The serial console goes to a log file; its tail is what a failure report shows.

KVM is tried first with a cheap probe boot (initramfs only, powers off at once): on some
hypervisors /dev/kvm exists but every vCPU fails ("failed to set MSR"). The probe's answer
is reused for the rest of the process. ``KTLSD_VM_ACCEL=kvm|tcg`` skips the probe.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from testbed.build import GuestImage

QEMU = "qemu-system-x86_64"
TCG_ACCEL = ["-accel", "tcg,thread=multi", "-cpu", "max"]
KVM_ACCEL = ["-accel", "kvm", "-cpu", "host"]
PROBE_TIMEOUT = 20.0
#: vCPUs of a normal boot; ``python -m testbed.run --vcpus N`` (or KTLSD_VM_VCPUS) for more.
DEFAULT_CPUS = 2
#: Guest RAM of a normal boot (QEMU ``-m``); ``--memory`` / KTLSD_VM_MEMORY for more.
DEFAULT_MEMORY = "2G"

_accel_choice: str | None = None


@dataclass(frozen=True)
class BootResult:
    """What happened to one boot."""

    accel: str
    returncode: int | None
    timed_out: bool
    seconds: float
    console_log: Path

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no console log)"
        return "\n".join(text.rstrip().splitlines()[-lines:])


def qemu_command(
    image: GuestImage,
    accel: str,
    console_log: Path,
    *,
    project_dir: Path | None = None,
    results_dir: Path | None = None,
    extra_cmdline: str = "",
    memory: str = DEFAULT_MEMORY,
    cpus: int = DEFAULT_CPUS,
    allow_reboot: bool = False,
) -> list[str]:
    """The QEMU command line for one boot (no network, serial console to a file).

    ``allow_reboot``: a guest reboot resets the machine instead of ending QEMU. The
    ``snapshot=on`` overlay lives as long as the QEMU process, so what the guest wrote before
    rebooting is still there after (the systemd flavour's two boots rely on this); a panic
    (``panic=-1``) reboots too, so such a guest must bound its own boot count.
    """
    cmdline = f"console=ttyS0 loglevel=4 panic=-1 rw {extra_cmdline}".strip()
    cmd = [
        QEMU,
        "-machine", "q35",
        *(KVM_ACCEL if accel == "kvm" else TCG_ACCEL),
        "-smp", str(cpus),
        "-m", memory,
        "-display", "none",
        "-monitor", "none",
        "-serial", f"file:{console_log}",
        *([] if allow_reboot else ["-no-reboot"]),
        "-nic", "none",
        "-device", "virtio-rng-pci",
        "-kernel", str(image.kernel),
        "-initrd", str(image.initramfs),
        "-append", cmdline,
        "-drive", f"file={image.rootfs},format=raw,if=virtio,snapshot=on",
    ]  # fmt: skip
    if project_dir is not None:
        cmd += [
            "-virtfs",
            f"local,path={project_dir},mount_tag=ktlsd,security_model=none,readonly=on",
        ]
    if results_dir is not None:
        cmd += ["-virtfs", f"local,path={results_dir},mount_tag=results,security_model=none"]
    return cmd


def _run_qemu(cmd: list[str], timeout: float, accel: str, console_log: Path) -> BootResult:
    started = time.monotonic()
    stderr_log = console_log.with_suffix(".qemu-stderr")
    with open(stderr_log, "wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        try:
            rc: int | None = proc.wait(timeout=timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc, timed_out = None, True
    seconds = time.monotonic() - started
    qemu_err = stderr_log.read_text(errors="replace").strip()
    if qemu_err:
        with open(console_log, "a") as f:
            f.write(f"\n[qemu stderr] {qemu_err}\n")
    return BootResult(accel, rc, timed_out, seconds, console_log)


def probe_kvm(image: GuestImage, workdir: Path) -> bool:
    """True if a KVM guest reaches the initramfs and powers off cleanly within a few seconds."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    log = workdir / "kvm-probe.log"
    log.unlink(missing_ok=True)
    cmd = qemu_command(image, "kvm", log, extra_cmdline="ktlsd.probe=1", memory="512M", cpus=1)
    result = _run_qemu(cmd, PROBE_TIMEOUT, "kvm", log)
    return (
        not result.timed_out
        and result.returncode == 0
        and "KTLSD-PROBE-OK" in log.read_text(errors="replace")
    )


def choose_accel(image: GuestImage, workdir: Path) -> str:
    """``kvm`` if it works here, else ``tcg``; decided once per process."""
    global _accel_choice
    forced = os.environ.get("KTLSD_VM_ACCEL")
    if forced in ("kvm", "tcg"):
        return forced
    if _accel_choice is None:
        _accel_choice = "kvm" if probe_kvm(image, workdir) else "tcg"
    return _accel_choice


def boot(
    image: GuestImage,
    project_dir: Path,
    results_dir: Path,
    timeout: float,
    console_log: Path,
    *,
    extra_cmdline: str = "",
    allow_reboot: bool = False,
    cpus: int = DEFAULT_CPUS,
    memory: str = DEFAULT_MEMORY,
) -> BootResult:
    """Boot once; the guest runs ``testbed/guest_runner.py`` on ``results_dir/plan.json``
    (or, with ``ktlsd.systemd=1`` in ``extra_cmdline``, the systemd flavour).

    ``cpus`` is the guest's vCPU count; under TCG (``thread=multi``) each vCPU is a host
    thread, so more vCPUs than host cores still run in parallel on every host core.
    ``memory`` (QEMU ``-m``) also sets the kernel's limit of queued handshake requests
    (total RAM / 100 MiB, 3..50: 4 with 2 GiB), which a reset storm runs into."""
    accel = choose_accel(image, results_dir)
    console_log.unlink(missing_ok=True)
    cmd = qemu_command(
        image, accel, console_log, project_dir=project_dir, results_dir=results_dir,
        extra_cmdline=extra_cmdline, allow_reboot=allow_reboot, cpus=cpus, memory=memory,
    )  # fmt: skip
    return _run_qemu(cmd, timeout, accel, console_log)
