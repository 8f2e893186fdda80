"""Boot ONE guest, run a list of scenarios in it, collect per-scenario results.

``python -m testbed.run [--scenario NAME ...] [--json REPORT] [--timeout SECONDS]
[--vcpus N] [--memory SIZE] [--scenario-timeout SECONDS]``

Builds the guest first if the recipe's cache entry is missing (see :mod:`testbed.build`).
One boot serves all scenarios: booting costs seconds under TCG, a scenario often less.
The report (printed as a table, optionally written as JSON) has the kernel version, the
accelerator used, build/boot/wall times, and for each scenario: passed, seconds, figures,
details, and -- on failure -- the scenario's log tail and the console tail. A scenario with
no result (guest crashed, timed out) is reported failed with the reason, never dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from testbed import build as build_mod
from testbed import vm

PROJECT = Path(__file__).resolve().parent.parent
SCENARIO_DIR = PROJECT / "testbed" / "scenarios"

#: Extra boots allowed after a guest kernel crash (reported in the report's ``boots``).
BOOT_RETRIES = 1

#: Every scenario, in run order. The list is fixed: a scenario is never dropped because a
#: file moved (an earlier version sniffed the tree for modules and would have).
DEFAULT_SCENARIOS: tuple[str, ...] = (
    "kernel-facts",
    "nvme-tls-tlshd",
    "nvme-failures-tlshd",
    "nfs-tls-tlshd",
    "ktls-python",
    "ktls-cli",
    "record-size-limit",
    "nvme-tls-ktlsd",
    "nvme-failures-ktlsd",
    "nfs-tls-ktlsd",
    "keyupdate-agent",
    "nvme-keys",
    "nvme-concat",
    "dhchap-probe",
    "host-probe",
    "cli-probe",
    "fleet-nvme",
    "fleet-nfs",
    "fleet-newtlshd",
    "fleet-newtlshd-nfs",
    "pq-mldsa",
    "nfs-pkcs11",
)


def default_scenarios() -> list[str]:
    """The scenarios a plain run boots for (all of them)."""
    return list(DEFAULT_SCENARIOS)


def scenario_exists(name: str) -> bool:
    """True if the guest runner can map ``name`` to a script (same rule as in the guest)."""
    from testbed.guest_runner import resolve

    try:
        resolve(name)
    except FileNotFoundError:
        return False
    return True


def kernel_crashed(console: str, power_off: str) -> bool:
    """Whether the guest kernel crashed before the deliberate power-off (``power_off``: the
    console line that marks it). Only such a crash counts: once the machine is powered down,
    PID 1 can no longer exec and its exit panics harmlessly."""
    before_poweroff = console.split(power_off, 1)[0]
    return any(m in before_poweroff for m in ("Kernel panic", "Oops:", "BUG:"))


def run(
    scenarios: list[str],
    *,
    timeout: float = 960.0,
    scenario_timeout: float = 180.0,
    results_dir: Path | None = None,
    vcpus: int | None = None,
    memory: str | None = None,
) -> dict[str, object]:
    """Build (if needed), boot once, return the report dict (see module docstring)."""
    unknown = [n for n in scenarios if not scenario_exists(n)]
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)} (see testbed/scenarios/)")
    cpus = vcpus or int(os.environ.get("KTLSD_VM_VCPUS") or vm.DEFAULT_CPUS)
    ram = memory or os.environ.get("KTLSD_VM_MEMORY") or vm.DEFAULT_MEMORY
    wall = time.monotonic()
    t0 = time.monotonic()
    image = build_mod.build()
    build_seconds = time.monotonic() - t0
    results = Path(results_dir or tempfile.mkdtemp(prefix="ktlsd-vm-results-"))
    results.mkdir(parents=True, exist_ok=True)
    for old in results.glob("*.json"):
        old.unlink()
    console = results / "console.log"
    boots: list[dict[str, object]] = []
    pending = list(scenarios)
    boot = None
    guest_problem: str | None = None
    runner: dict[str, object] = {}
    for attempt in range(1 + BOOT_RETRIES):
        plan = {"scenarios": pending, "scenario_timeout": scenario_timeout}
        (results / "plan.json").write_text(json.dumps(plan))
        log = console if attempt == 0 else results / f"console-retry{attempt}.log"
        boot = vm.boot(image, PROJECT, results, timeout, log, cpus=cpus, memory=ram)
        text = log.read_text(errors="replace") if log.exists() else ""
        if (results / "runner.json").exists():
            runner = json.loads((results / "runner.json").read_text())
        guest_problem = None
        if boot.timed_out:
            guest_problem = f"QEMU killed after the {timeout:.0f} s wall-clock limit"
        elif "KTLSD-GUEST-READY" not in text:
            guest_problem = "the guest never reached the scenario runner"
        elif "KTLSD-GUEST-DONE" not in text:
            guest_problem = "the guest died while running scenarios"
        crashed = kernel_crashed(text, "sysrq: Power Off")
        boots.append(
            {"accel": boot.accel, "seconds": round(boot.seconds, 1), "problem": guest_problem,
             "kernel_crash": crashed, "console": str(log), "scenarios": pending}
        )  # fmt: skip
        pending = [n for n in pending if not (results / f"{n}.json").exists()]
        # Retry only a guest-level crash (seen under TCG: a rare int3 Oops while the kernel
        # live-patches its text on another vCPU); scenario failures and hangs are reported.
        if not pending or boot.timed_out or not crashed:
            break
    assert boot is not None
    per: list[dict[str, object]] = []
    for name in scenarios:
        path = results / f"{name}.json"
        if path.exists():
            rec = json.loads(path.read_text())
        else:
            rec = {
                "name": name,
                "passed": False,
                "figures": {},
                "details": [f"no result: {guest_problem or 'guest runner did not reach it'}"],
            }
        if not rec.get("passed"):
            rec["console_tail"] = boot.console_tail()
        per.append(rec)
    return {
        "comparison": compare_agents(per),
        "kernel": runner.get("kernel") or image.kernel_release,
        "kernel_package": f"{image.kernel_package} {image.kernel_package_version}",
        "accel": boot.accel,
        "vcpus": cpus,
        "memory": ram,
        "build_seconds": round(build_seconds, 1),
        "boot_seconds": runner.get("uptime_at_start"),
        "qemu_seconds": round(boot.seconds, 1),
        "wall_seconds": round(time.monotonic() - wall, 1),
        "qemu_returncode": boot.returncode,
        "boots": boots,
        "guest_problem": guest_problem,
        "results_dir": str(results),
        "passed": all(r.get("passed") for r in per) and guest_problem is None,
        "scenarios": per,
    }


def compare_agents(per: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    """Side-by-side timing figures of the ``BASE-tlshd`` and ``BASE-ktlsd`` runs of a scenario."""
    by_name = {str(r["name"]): r for r in per}
    out: dict[str, dict[str, object]] = {}
    for name, rec in by_name.items():
        if not name.endswith("-tlshd") or name.replace("-tlshd", "-ktlsd") not in by_name:
            continue
        base = name.removesuffix("-tlshd")
        other = by_name[f"{base}-ktlsd"]
        mine_f = rec.get("figures") or {}
        theirs_f = other.get("figures") or {}
        for key, value in mine_f.items():  # type: ignore[union-attr]
            if "seconds" in key and key != "scenario_seconds":
                theirs = theirs_f.get(key)  # type: ignore[union-attr]
                pair: dict[str, object] = {"tlshd": value, "ktlsd": theirs}
                # What each run negotiated (nvme-tls: connect_seconds_X <-> negotiated_X):
                # a "SHA-384" pair that ran different suites is not a like-for-like comparison.
                label = key.rsplit("_", 1)[-1]
                ours_n = mine_f.get(f"negotiated_{label}")  # type: ignore[union-attr]
                theirs_n = theirs_f.get(f"negotiated_{label}")  # type: ignore[union-attr]
                if isinstance(ours_n, dict) and isinstance(theirs_n, dict):
                    pair["tlshd_negotiated"] = negotiated_text(ours_n)
                    pair["ktlsd_negotiated"] = negotiated_text(theirs_n)
                    pair["comparable"] = all(
                        ours_n.get(k) == theirs_n.get(k) for k in ("suite", "binder_bytes")
                    )
                out[f"{base}:{key}"] = pair
    return out


def negotiated_text(n: dict[str, object]) -> str:
    """``TLS_AES_256_GCM_SHA384, 48-byte binder`` from a ``negotiated_X`` figure."""
    return f"{n.get('suite')}, {n.get('binder_bytes')}-byte binder"


def format_report(report: dict[str, object]) -> str:
    lines = [
        f"kernel {report['kernel']} ({report['kernel_package']}), accel {report['accel']}, "
        f"{report.get('vcpus', vm.DEFAULT_CPUS)} vCPUs, "
        f"{report.get('memory', vm.DEFAULT_MEMORY)} RAM, "
        f"build {report['build_seconds']} s, boot {report['boot_seconds']} s, "
        f"qemu {report['qemu_seconds']} s, wall {report['wall_seconds']} s",
    ]
    for i, b in enumerate(report.get("boots") or []):  # type: ignore[union-attr]
        if b.get("problem") or b.get("kernel_crash"):
            lines.append(f"boot {i + 1}: {b.get('problem')} (crash: {b.get('kernel_crash')}), "
                         f"console {b.get('console')}")  # fmt: skip
    if report.get("comparison"):
        lines.append("tlshd vs ktlsd (same boot):")
        for key, pair in report["comparison"].items():  # type: ignore[union-attr]
            line = f"    {key}: tlshd {pair['tlshd']} s, ktlsd {pair['ktlsd']} s"
            if "comparable" in pair:
                line += (
                    f" (tlshd ran {pair['tlshd_negotiated']}; ktlsd {pair['ktlsd_negotiated']}"
                    f"{'' if pair['comparable'] else ': NOT like for like'})"
                )
            lines.append(line)
    if report.get("guest_problem"):
        lines.append(f"GUEST PROBLEM: {report['guest_problem']}")
    for rec in report["scenarios"]:  # type: ignore[union-attr]
        status = "PASS" if rec.get("passed") else "FAIL"
        lines.append(f"{status} {rec['name']} ({rec.get('seconds', '?')} s)")
        for key, value in (rec.get("figures") or {}).items():
            if key == "cases":
                continue  # shown line by line in pairing_table
            if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
                lines.append(f"    {key}:")
                lines += [f"        {v}" for v in value]
                continue
            lines.append(f"    {key}: {value}")
        if not rec.get("passed"):
            for d in rec.get("details") or []:
                lines.append(f"    ! {d}")
            if rec.get("log_tail"):
                lines.append("    --- scenario log tail ---")
                lines += ["    " + ln for ln in str(rec["log_tail"]).splitlines()[-20:]]
    if not report.get("passed"):
        tail = next(
            (r.get("console_tail") for r in report["scenarios"] if r.get("console_tail")), ""
        )  # type: ignore[union-attr]
        if tail:
            lines.append("--- console tail ---")
            lines += str(tail).splitlines()[-25:]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.run", description=__doc__)
    parser.add_argument(
        "--scenario", action="append", dest="scenarios", metavar="NAME",
        help="scenario to run (repeatable); default: " + ", ".join(default_scenarios()),
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--timeout", type=float, default=960.0, help="QEMU wall-clock limit")
    parser.add_argument("--results-dir", type=Path, help="keep guest results and logs here")
    parser.add_argument(
        "--vcpus", type=int, metavar="N",
        help=f"guest vCPUs (default: KTLSD_VM_VCPUS or {vm.DEFAULT_CPUS}); "
        "the nvme-storm benchmark wants more so ktlsd --workers matters",
    )  # fmt: skip
    parser.add_argument(
        "--memory", metavar="SIZE",
        help=f"guest RAM, QEMU -m syntax (default: KTLSD_VM_MEMORY or {vm.DEFAULT_MEMORY})",
    )  # fmt: skip
    parser.add_argument(
        "--scenario-timeout", type=float, default=180.0, metavar="SECONDS",
        help="limit per scenario in the guest (nvme-storm needs ~900)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.vcpus is not None and args.vcpus < 1:
        parser.error("--vcpus must be at least 1")
    try:
        report = run(args.scenarios or default_scenarios(), timeout=args.timeout,
                     scenario_timeout=args.scenario_timeout, results_dir=args.results_dir,
                     vcpus=args.vcpus, memory=args.memory)  # fmt: skip
    except build_mod.BuildError as exc:
        print(f"testbed.run: cannot build the guest: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"testbed.run: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
