"""nvme-storm: a benchmark (prints figures, asserts little): tlshd against ktlsd serving a
connect and a reset storm of many NVMe/TCP TLS controllers, in one guest boot.

Not in the default scenario list; run on demand with more RAM and as many vCPUs as the host
has free cores, e.g. ``python -m testbed.run --scenario nvme-storm --vcpus 2 --memory 16G
--scenario-timeout 1500 --timeout 1600`` on a 2-core host. Under TCG a vCPU whose host thread
is descheduled still counts as busy in the guest, so more vCPUs than host cores inflate the CPU
of whichever agent runs more at once (tlshd's forked children, ktlsd's workers). Guest RAM
sets the kernel's cap on queued handshake requests (see
:func:`pending_max`): at the default 2 GiB a storm measures mostly the kernel's refusals and
the controllers' 10 s reconnect delay, not the agent. Figures: docs/benchmarks.md.

Set-up (once): an nvmet port on 127.0.0.1 with TLS required and ``CONTROLLERS`` subsystems,
each on its own small ram disk and with its own retained PSK (``nvme gen-tls-key --insert``
into ``.nvme``). Both ends of every handshake (nvme host and nvmet) are served by the one
agent under test.

Agents: ``tlshd``; ``ktlsd`` as one process; ``ktlsd-workers`` (``--workers N``, N = vCPUs)
only if this tree's ``ktlsd run`` has ``--workers``. Then ``ROUNDS`` interleaved rounds (the
order rotates each round); in each, per agent:

1. start the agent alone, in its own cgroup v2 (so its CPU and memory include every child:
   tlshd forks per handshake; ktlsd's workers, if the tree has ``--workers``);
2. **connect**: ``nvme connect`` to every subsystem one after the other (the kernel
   serialises connects anyway): wall time and agent CPU (cgroup ``cpu.stat`` usage_usec);
3. **reset storm**: ``reset_controller`` written for every controller at the same moment
   (one thread each): wall time until every controller's state is ``live`` again, agent CPU;
4. failed handshakes (agent log lines reporting a failure, kernel log lines about a failed
   TLS handshake), successful handshakes logged, peak memory of the agent's cgroup
   (``memory.peak``: every process of the agent together, page cache included);
5. disconnect all, stop the agent (the cgroup is killed and removed).

Figures: one row per (round, agent), the ratios to tlshd of wall and CPU per round and their
medians, and a printed table. Under TCG absolute numbers mean little; only ratios of the
same boot do. The scenario fails only if the set-up fails or a phase does not finish.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import (
    PROJECT,
    Agent,
    Scenario,
    ScenarioFailed,
    handshake_group_id,
    modprobe,
    netlink_group_members,
    wait_ready,
    write_tlshd_conf,
)
from testbed.scenarios.nvme_tls import gen_key, setup_target

CONTROLLERS = 16
ROUNDS = 3
PORT_ID, TRSVCID = "9", "4430"
RAMDISK_KIB = 4096
CGROUP_ROOT = Path("/sys/fs/cgroup")
LIVE_TIMEOUT = 120.0
#: Kernel log: an upcall the kernel refused to queue (``-11``: its per-namespace limit of
#: pending handshake requests was reached), and a handshake the agent answered with an error.
KERNEL_REFUSED = re.compile(r"failed to start TLS")
KERNEL_FAILED = re.compile(r"TLS handshake complete, error|handshake.*(failed|timed? ?out)")


# -- cgroup v2 ---------------------------------------------------------------------------------


def mount_cgroup2(sc: Scenario) -> None:
    """cgroup2 on /sys/fs/cgroup (the guest's init does not mount it) with memory enabled."""
    if not (CGROUP_ROOT / "cgroup.controllers").exists():
        CGROUP_ROOT.mkdir(parents=True, exist_ok=True)
        sc.sh(["mount", "-t", "cgroup2", "cgroup2", str(CGROUP_ROOT)])
    controllers = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    wanted = [c for c in ("memory", "cpu") if c in controllers]
    (CGROUP_ROOT / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in wanted))
    sc.detail(f"cgroup2 controllers enabled for agents: {' '.join(wanted) or 'none'}")


def cpu_usec(cg: Path) -> int:
    """CPU time (user + system, µs) of every process that ever ran in ``cg``, reaped
    children included."""
    for line in (cg / "cpu.stat").read_text().splitlines():
        key, value = line.split()
        if key == "usage_usec":
            return int(value)
    raise ScenarioFailed(f"no usage_usec in {cg}/cpu.stat")


def memory_peak(cg: Path) -> int | None:
    f = cg / "memory.peak"
    return int(f.read_text()) if f.exists() else None


def remove_cgroup(cg: Path) -> None:
    if not cg.exists():
        return
    if (cg / "cgroup.kill").exists():
        (cg / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + 10
    while (cg / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    cg.rmdir()


# -- agents --------------------------------------------------------------------------------------


def ktlsd_workers_option() -> bool:
    """True if this tree's ``ktlsd run`` has ``--workers``."""
    out = subprocess.run(
        [sys.executable, "-m", "ktlsd", "run", "--help"], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=str(PROJECT)), cwd="/tmp", timeout=120,
    )  # fmt: skip
    return "--workers" in out.stdout


def agent_argv(variant: str, config: Path, workers: int) -> list[str]:
    """``tlshd``; ``ktlsd`` (one process); ``ktlsd-workers`` (``--workers N``)."""
    if variant == "tlshd":
        return ["tlshd", "-s", "-c", str(config)]
    argv = [sys.executable, "-m", "ktlsd", "run", "--config", str(config),
            "--kernel", "yes", "--socket", "none", "--verbose"]  # fmt: skip
    if not workers:  # a tree without --workers: the agent is one process anyway
        return argv
    # With the option, the default may be "auto": say 0 (no workers) explicitly.
    return [*argv, "--workers", str(workers if variant == "ktlsd-workers" else 0)]


def start_in_cgroup(sc: Scenario, agent: str, argv: list[str], tag: str) -> tuple[Agent, Path]:
    """Start ``argv`` as the only process of a fresh cgroup; wait until it serves upcalls."""
    cg = CGROUP_ROOT / f"storm-{tag}"
    remove_cgroup(cg)
    cg.mkdir()
    log = Path(f"/tmp/agent-{tag}.log")
    group = handshake_group_id()
    before = netlink_group_members(group)
    # The shell moves itself into the cgroup, then execs the agent: nothing of the agent
    # ever runs outside it.
    wrapped = ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *argv]
    out = open(log, "wb")  # noqa: SIM115 - owned by the child's lifetime
    started = time.monotonic()
    proc = subprocess.Popen(wrapped, stdout=out, stderr=subprocess.STDOUT, cwd="/tmp",
                            env=dict(os.environ, PYTHONPATH=str(PROJECT)))  # fmt: skip
    handle = Agent(agent, proc, log)
    handle.group, handle.before, handle.started, handle.tag = group, before, started, tag
    sc.agents.append(handle)
    sc.cleanup(lambda: (handle.stop(), remove_cgroup(cg)), f"stop {tag}")
    wait_ready(sc, handle, timeout=120)
    return handle, cg


# -- nvme ----------------------------------------------------------------------------------------


def controllers() -> list[Path]:
    return sorted(Path("/sys/class/nvme").glob("nvme*"))


def states() -> dict[str, str]:
    out = {}
    for ctrl in controllers():
        try:
            out[ctrl.name] = (ctrl / "state").read_text().strip()
        except OSError:
            out[ctrl.name] = "gone"
    return out


def wait_all_live(count: int, timeout: float = LIVE_TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = states()
        if len(st) >= count and all(s == "live" for s in st.values()):
            return True
        time.sleep(0.02)
    return False


def pending_max() -> int:
    """The kernel's limit of queued (not yet accepted) handshake requests per network
    namespace, by net/handshake's rule: total RAM pages / (25 * page size), clamped to 3..50.
    With a 2 GiB guest that is 4: a storm then gets upcalls refused (-EAGAIN) and the
    controllers retry after their reconnect delay (10 s)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            pages = int(line.split()[1]) // 4
            return max(3, min(50, pages // (25 * 4096)))
    return 0


def kernel_log() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()


def reset_storm() -> tuple[float, list[str]]:
    """Write reset_controller of every controller at the same moment; wall until all live."""
    ctrls = controllers()
    errors: list[str] = []
    go = threading.Barrier(len(ctrls) + 1)

    def reset(ctrl: Path) -> None:
        go.wait()
        try:
            (ctrl / "reset_controller").write_text("1\n")
        except OSError as exc:  # a reset that fails to reconnect reports here
            errors.append(f"{ctrl.name}: {exc.strerror}")

    threads = [threading.Thread(target=reset, args=(c,), daemon=True) for c in ctrls]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.monotonic()
    for t in threads:
        t.join(LIVE_TIMEOUT)
    if not wait_all_live(len(ctrls)):
        raise ScenarioFailed(f"reset storm: not all controllers live again: {states()}")
    return time.monotonic() - t0, errors


def connect_all(sc: Scenario, subnqns: list[str], hostnqn: str) -> int:
    failed = 0
    for subnqn in subnqns:
        proc = sc.sh(
            ["nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", TRSVCID, "-n", subnqn,
             f"--hostnqn={hostnqn}", "--tls"],
            check=False, timeout=120,
        )  # fmt: skip
        failed += proc.returncode != 0
    return failed


def disconnect_all(sc: Scenario) -> None:
    sc.sh(["nvme", "disconnect-all"], check=False, timeout=120)
    deadline = time.monotonic() + 30
    while controllers() and time.monotonic() < deadline:
        time.sleep(0.1)


# -- one measured run ----------------------------------------------------------------------------


def one_run(
    sc: Scenario,
    variant: str,
    rnd: int,
    conf: Path,
    workers: int,
    subnqns: list[str],
    hostnqn: str,
) -> dict[str, object]:
    tag = f"{variant}-r{rnd}"
    agent = variant.split("-")[0]  # the log wording: tlshd's or ktlsd's
    handle, cg = start_in_cgroup(sc, agent, agent_argv(variant, conf, workers), tag)
    row: dict[str, object] = {"round": rnd, "agent": variant}
    kmark = len(kernel_log())
    cpu0, t0 = cpu_usec(cg), time.monotonic()
    failed_connects = connect_all(sc, subnqns, hostnqn)
    row["connect_wall_s"] = round(time.monotonic() - t0, 3)
    cpu1 = cpu_usec(cg)
    row["connect_cpu_s"] = round((cpu1 - cpu0) / 1e6, 3)
    row["failed_connects"] = failed_connects
    if failed_connects or not wait_all_live(len(subnqns), 30):
        raise ScenarioFailed(f"{tag}: {failed_connects} connects failed; states {states()}")
    ok_after_connect = len(handle.successful_handshakes())
    lines_after_connect = len(handle.lines())
    storm_wall, reset_errors = reset_storm()
    cpu2 = cpu_usec(cg)
    row["storm_wall_s"] = round(storm_wall, 3)
    row["storm_cpu_s"] = round((cpu2 - cpu1) / 1e6, 3)
    row["reset_write_errors"] = len(reset_errors)
    time.sleep(0.3)  # let the agent's last log lines land
    row["handshakes_ok_connect"] = ok_after_connect
    row["handshakes_ok_storm"] = len(handle.successful_handshakes(lines_after_connect))
    row["failed_handshakes_agent_log"] = len(handle.failure_lines())
    klog = kernel_log()[kmark:]
    row["failed_handshakes_kernel_log"] = sum(1 for ln in klog if KERNEL_FAILED.search(ln))
    row["upcalls_refused_kernel_log"] = sum(1 for ln in klog if KERNEL_REFUSED.search(ln))
    peak = memory_peak(cg)
    row["peak_memory_MiB"] = round(peak / 2**20, 1) if peak is not None else None
    disconnect_all(sc)
    handle.stop()
    remove_cgroup(cg)
    if reset_errors:
        sc.detail(f"{tag}: reset_controller errors: {', '.join(reset_errors)}")
    return row


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def main() -> None:
    with Scenario() as sc:
        vcpus = os.cpu_count() or 1
        sc.figure("vcpus", vcpus)
        sc.figure("kernel_pending_handshakes_max", pending_max())
        modprobe(sc, "tls", "nvme-keyring", "nvmet", "nvmet-tcp", "nvme-tcp", "nvme-fabrics")
        if not Path(f"/dev/ram{CONTROLLERS - 1}").exists():
            sc.sh(["rmmod", "brd"], check=False)
            sc.sh(["modprobe", "brd", f"rd_nr={CONTROLLERS}", f"rd_size={RAMDISK_KIB}"])
        mount_cgroup2(sc)
        hostnqn = Path("/etc/nvme/hostnqn").read_text().strip()
        subnqns = [f"nqn.2026-12.io.ktlsd:storm-{i:02d}" for i in range(CONTROLLERS)]
        for subnqn in subnqns:
            gen_key(sc, hostnqn, subnqn, 1)
        setup_target(sc, hostnqn, {s: f"/dev/ram{i}" for i, s in enumerate(subnqns)},
                     PORT_ID, TRSVCID)  # fmt: skip
        sc.cleanup(lambda: disconnect_all(sc), "disconnect all")
        conf = write_tlshd_conf(Path("/tmp/storm.conf"), keyrings=".nvme")
        # ktlsd runs as one process, and also with --workers N (N = vCPUs) if the tree has it.
        workers = vcpus if ktlsd_workers_option() else 0
        sc.figure("ktlsd_workers", workers or "no --workers in this tree: one process only")
        variants = ["tlshd", "ktlsd"] + (["ktlsd-workers"] if workers else [])
        rows: list[dict[str, object]] = []
        for rnd in range(ROUNDS):
            # Interleaved, order rotated each round so a drift of the host hits all alike.
            order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
            for variant in order:
                row = one_run(sc, variant, rnd, conf, workers, subnqns, hostnqn)
                print(f"row {row}", flush=True)
                rows.append(row)
        sc.figure("rows", rows)
        by = {(r["round"], r["agent"]): r for r in rows}
        for variant in variants[1:]:
            for key in ("connect_wall_s", "connect_cpu_s", "storm_wall_s", "storm_cpu_s"):
                values = [
                    ratio(float(by[(n, variant)][key]), float(by[(n, "tlshd")][key]))  # type: ignore[arg-type]
                    for n in range(ROUNDS)
                ]
                sc.figure(f"ratio_{variant}_vs_tlshd_{key}", values)
                known = [v for v in values if v is not None]
                if known:
                    sc.figure(
                        f"ratio_{variant}_vs_tlshd_{key}_median", round(statistics.median(known), 3)
                    )
        cols = ["round", "agent", "connect_wall_s", "connect_cpu_s", "storm_wall_s",
                "storm_cpu_s", "handshakes_ok_storm", "failed_handshakes_agent_log",
                "failed_handshakes_kernel_log", "upcalls_refused_kernel_log",
                "peak_memory_MiB"]  # fmt: skip
        table = [" | ".join(cols)] + [" | ".join(str(r.get(c)) for c in cols) for r in rows]
        sc.figure("table", table)
        sc.check(len(rows) == len(variants) * ROUNDS, "every round ran every agent to the end")


if __name__ == "__main__":
    main()
