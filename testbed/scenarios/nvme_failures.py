"""nvme-failures-AGENT: NVMe/TCP TLS failure paths, served by AGENT.

Proves:
- wrong PSK: the host looks its PSK up in a private keyring holding a different key for
  the same identity than the target's ``.nvme`` keyring, so the two ends' binders cannot
  agree; ``nvme connect`` fails (no controller is left behind), the agent's log names the
  failure, and the kernel does not hang (the command returns; its duration is a figure);
- no agent: with no agent listening, ``nvme connect --tls`` fails fast (the kernel's upcall
  has no listener) rather than waiting for a handshake timeout;
- agent killed mid-storm: several connects run in parallel while the agent is killed with
  SIGKILL; every one of them returns (success or failure, no hang); after the agent is
  restarted a new connect succeeds and 1 MiB of O_DIRECT I/O reads back byte-exact.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import (
    Scenario,
    ScenarioFailed,
    modprobe,
    start_agent,
    write_tlshd_conf,
)
from testbed.scenarios.nvme_tls import find_block_device, gen_key, setup_target

PORT_ID = {"tlshd": "3", "ktlsd": "4"}
TRSVCID = {"tlshd": "4422", "ktlsd": "4423"}
STORM = 4
IO_BYTES = 1024 * 1024


def connect_cmd(subnqn: str, hostnqn: str, svc: str, *extra: str) -> list[str]:
    return ["nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", svc, "-n", subnqn,
            f"--hostnqn={hostnqn}", "--tls", "--ctrl-loss-tmo=0", *extra]  # fmt: skip


def connected(subnqn: str) -> bool:
    for ctrl in Path("/sys/class/nvme").glob("nvme*"):
        f = ctrl / "subsysnqn"
        if f.exists() and f.read_text().strip() == subnqn:
            return True
    return False


def psk_description(hostnqn: str, subnqn: str) -> str:
    """The description ("NVMe0R01 <hostnqn> <subnqn>") of the PSK nvme-cli put into .nvme."""
    for line in Path("/proc/keys").read_text().splitlines():
        m = re.search(r" psk\s+(NVMe\S+ (\S+) (\S+)): \d+$", line)
        if m and m.group(2) == hostnqn and m.group(3) == subnqn:
            return m.group(1)
    raise ScenarioFailed(f"no psk key for {subnqn} visible in /proc/keys")


def timed(sc: Scenario, argv: list[str], timeout: float = 90) -> tuple[int, float, str]:
    t0 = time.monotonic()
    proc = sc.sh(argv, check=False, timeout=timeout)
    return proc.returncode, time.monotonic() - t0, (proc.stdout + proc.stderr).strip()


def main() -> None:
    with Scenario() as sc:
        agent = sc.agent
        modprobe(sc, "tls", "nvme-keyring", "nvmet", "nvmet-tcp", "nvme-tcp", "nvme-fabrics")
        if not Path("/dev/ram0").exists():
            sc.sh(["modprobe", "brd", "rd_nr=8", "rd_size=32768"])
        hostnqn = Path("/etc/nvme/hostnqn").read_text().strip()
        base = f"nqn.2026-11.io.ktlsd:failures-{agent}"
        wrong, storm = f"{base}-wrong", f"{base}-storm"
        first = 4 if agent == "tlshd" else 6  # nvme-tls-* uses ram0..3
        subsystems = {wrong: f"/dev/ram{first}", storm: f"/dev/ram{first + 1}"}
        # The target (and a plain --tls host) finds these keys in .nvme.
        for subnqn in subsystems:
            gen_key(sc, hostnqn, subnqn, 1)
        setup_target(sc, hostnqn, subsystems, PORT_ID[agent], TRSVCID[agent])
        svc = TRSVCID[agent]

        # --- no agent: the upcall has no listener ---------------------------------------
        rc, secs, out = timed(sc, connect_cmd(storm, hostnqn, svc))
        sc.figure("no_agent_connect_seconds", round(secs, 2))
        sc.detail(f"no agent: nvme connect exit {rc}: {out.splitlines()[-1] if out else ''}")
        sc.check(rc != 0 and not connected(storm), "no agent: nvme connect fails")

        # --- wrong PSK: host keyring with a different key for the same identity ----------
        # The retained PSK nvme-cli put into .nvme for `wrong` is what the target will use.
        # The host gets a private keyring (in a fresh session keyring, so its processes
        # possess it) holding a random key under the very same description; `nvme connect
        # --keyring` makes the kernel host look there, so the two ends' PSKs differ.
        desc = psk_description(hostnqn, wrong)
        conf = write_tlshd_conf(Path(f"/tmp/{agent}-failures.conf"), keyrings=".nvme")
        handle = start_agent(sc, agent, conf, "failures")
        argv = connect_cmd(wrong, hostnqn, svc, "--keyring=ktlsd-wrong")
        # --tls_key names the wrong key explicitly (otherwise the kernel may still find the
        # right one in .nvme); the key's serial is only known inside the session.
        script = (
            "ring=$(keyctl newring ktlsd-wrong @s) && "
            f"key=$(head -c 32 /dev/urandom | keyctl padd psk '{desc}' \"$ring\") && "
            # owner (root, like the agent) may read it, as nvme-cli's keys allow
            'keyctl setperm "$key" 0x3f030000 && ' + " ".join(argv) + ' --tls_key="$key"'
        )
        dmesg_before = len(sc.sh(["dmesg"], check=False).stdout.splitlines())
        rc, secs, out = timed(sc, ["keyctl", "session", "-", "sh", "-c", script])
        sc.figure("wrong_psk_connect_seconds", round(secs, 2))
        sc.detail(f"wrong PSK: nvme connect exit {rc}: {out.splitlines()[-1] if out else ''}")
        if rc == 0 or connected(wrong):
            keys = {c.name: (c / "tls_key").read_text().strip() for c in
                    Path("/sys/class/nvme").glob("nvme*") if (c / "tls_key").exists()}  # fmt: skip
            sc.detail(f"wrong PSK connected anyway; controller tls_key: {keys}")
            sc.detail("agent log: " + " | ".join(handle.output().splitlines()[-12:]))
            sc.sh(["grep", "psk", "/proc/keys"], check=False)
        sc.check(rc != 0 and not connected(wrong), "wrong PSK: nvme connect fails cleanly")
        time.sleep(0.3)
        failure_lines = [
            ln for ln in handle.output().splitlines()
            if any(w in ln.lower() for w in ("fail", "error", "denied", "reject", "alert"))
        ]  # fmt: skip
        sc.figure("wrong_psk_agent_log", failure_lines[-4:])
        sc.check(bool(failure_lines), "wrong PSK: the agent logged the failure")
        dmesg = sc.sh(["dmesg"], check=False).stdout.splitlines()[dmesg_before:]
        done_lines = [ln for ln in dmesg if "handshake complete, error" in ln]
        sc.figure("wrong_psk_kernel_log", [ln for ln in dmesg if "nvme" in ln][-4:])
        # nvme-tcp logs "TLS handshake complete, error -N" when DONE arrives (N = the agent's
        # status) and "TLS handshake failed" when it gave up waiting (no DONE in time).
        statuses = sorted({ln.rsplit("error ", 1)[1] for ln in done_lines})
        sc.figure("wrong_psk_done_status", statuses)
        sc.check(bool(done_lines), "wrong PSK: the kernel got DONE with a failure status")
        sc.check(not any("TLS handshake failed" in ln for ln in dmesg),
                 "wrong PSK: no kernel-side handshake timeout")  # fmt: skip

        # --- storm, agent killed, restarted -------------------------------------------------
        storm_procs = [
            subprocess.Popen(
                connect_cmd(storm, hostnqn, svc, "--duplicate-connect"),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
            for _ in range(STORM)
        ]
        time.sleep(0.3)
        handle.kill()
        sc.detail(f"agent killed with SIGKILL 0.3 s into a storm of {STORM} connects")
        outcomes = []
        for p in storm_procs:
            try:
                p.wait(timeout=90)
                outcomes.append(p.returncode)
            except subprocess.TimeoutExpired:
                p.kill()
                outcomes.append("hung")
        sc.figure("storm_exit_codes", outcomes)
        sc.check("hung" not in outcomes, "every storm connect returned (no hang)")
        sc.sh(["nvme", "disconnect", "-n", storm], check=False)
        handle = start_agent(sc, agent, conf, "failures-restarted")
        t0 = time.monotonic()
        sc.sh(connect_cmd(storm, hostnqn, svc), timeout=90)
        sc.figure("after_restart_connect_seconds", round(time.monotonic() - t0, 3))
        dev = find_block_device(storm)
        data = os.urandom(IO_BYTES)
        fd = os.open(dev, os.O_RDWR | os.O_SYNC)
        try:
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        sc.sh(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=False)
        fd = os.open(dev, os.O_RDONLY)
        try:
            back = os.pread(fd, IO_BYTES, 0)
        finally:
            os.close(fd)
        sc.check(back == data, "after restart: 1 MiB written and read back matches")
        out = sc.sh(["nvme", "disconnect", "-n", storm]).stdout
        sc.check("disconnected" in out, "after restart: disconnect is clean")
        sc.figure("bytes_verified", 2 * IO_BYTES)


if __name__ == "__main__":
    main()
