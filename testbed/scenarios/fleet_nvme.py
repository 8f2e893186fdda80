"""fleet-nvme: NVMe/TCP TLS between ktlsd and tlshd, each agent on its own "machine".

Three network namespaces (see fleet.py): tlshd (Debian's ktls-utils) in one, ktlsd in
another, a second ktlsd as the reference peer in a third, joined by veth pairs. The kernel
sends each handshake to the agent of the namespace its socket lives in, so the host's
upcalls (``nvme connect`` run in the host's namespace) go to one agent and the target's
(the nvmet port enabled from the target's namespace) to the other. Every case runs in
both directions and is named by its pairing, host first: ``tlshd>ktlsd`` is a tlshd host
talking to a ktlsd target.

Cases (each with its own subsystem NQN, hence its own PSK in ``.nvme``):

- ``nvme-sha256``: a SHA-256 retained PSK (``nvme gen-tls-key --hmac=1``), both cross
  directions and ktlsd>ktlsd; 16 MiB random O_DIRECT write, read back byte-exact and found
  on the target's ram disk.
- ``nvme-sha384``: a SHA-384 retained PSK. ktlsd>ktlsd must be spec-correct
  (TLS_AES_256_GCM_SHA384, 48-byte binder). The cross cases follow :data:`SHA384_CROSS`:
  tlshd 1.0 on GnuTLS 3.8.9 binds a SHA-384 PSK to SHA-256 (32-byte binder, SHA-256 suite),
  which ktlsd meets according to ``[ktlsd] legacy_psk_sha384`` -- set on the ktlsd end by
  rewriting its configuration and SIGHUP between the rows.
- ``nvme-concat``: ``nvme connect --concat`` (DH-HMAC-CHAP with a DH group on a port that
  allows TLS; the host authenticates over plain TCP, both ends insert the generated
  ``NVMe1G`` PSK, the admin queue reconnects with TLS): 1 MiB byte-exact, every TLS hello on
  the wire carries an ``NVMe1G`` identity. Its own host NQN, because a DH-HMAC-CHAP key on
  the main host entry would make every other case authenticate.
- ``nvme-wrong-psk``: the host uses a different key under the same identity (private
  keyring, ``--tls_key``): ``nvme connect`` fails within :data:`PROMPT_SECONDS`, the kernel
  got a DONE with an error (not its own timeout), and the status each end reports is kept.

For every case the hellos are read off the wire (tls_wire.Capture on the ktlsd end's veth):
suite, binder size and hash, and the PSK hash the NVMe identity names; a case's record says
what was negotiated, so a "SHA-384" case that ran a SHA-256 suite is labelled as such.
The scenario passes when every case met its expectation; the records are in the figure
``cases`` (also when some failed), one line each in ``pairing_table``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import Agent, Scenario, modprobe, write_tlshd_conf
from testbed.scenarios.fleet import (
    ALL_SIDES,
    CROSS,
    REFERENCE,
    SIDES,
    Fleet,
    agent_of,
    package_versions,
    pairing_name,
    report,
)
from testbed.scenarios.nvme_failures import psk_description
from testbed.scenarios.nvme_keys import io_roundtrip
from testbed.scenarios.nvme_tls import (
    DATA_BYTES,
    NVMET,
    controller_for,
    direct_io,
    find_block_device,
    gen_key,
    write_attr,
)
from testbed.scenarios.tls_wire import describe, legacy_binding, suite_hash

HMAC = {"sha256": 1, "sha384": 2}
#: A failure must be reported well before the kernel's (and the agents') 10 s handshake timeout.
PROMPT_SECONDS = 6.0
RAMDEV = "/dev/ram0"
NQN = "nqn.2026-12.io.ktlsd:fleet"

#: The SHA-384 cross cases and what each must do:
#: (``legacy_psk_sha384`` of the ktlsd end, host side, target side) -> expected outcome.
#: ``pass-legacy``: connects, 16 MiB byte-exact, and the wire shows the SHA-384 PSK bound to
#: SHA-256 (32-byte binder, SHA-256 suite) -- all tlshd 1.0 can do -- and ktlsd logged it
#: naming the setting. ``fail``: refused within PROMPT_SECONDS, DONE with an error, and
#: ktlsd's log line names the setting (or, as a host, points at ``offer``).
#: ``accept`` is the default (no setting written): a ktlsd target takes the old binding; a
#: ktlsd host needs ``offer`` to reach a tlshd 1.0 target; ``refuse`` is strict both ways.
SHA384_CROSS: dict[tuple[str, str, str], str] = {
    ("accept", "tlshd", "ktlsd"): "pass-legacy",
    ("accept", "ktlsd", "tlshd"): "fail",
    ("offer", "ktlsd", "tlshd"): "pass-legacy",
    ("refuse", "tlshd", "ktlsd"): "fail",
    ("refuse", "ktlsd", "tlshd"): "fail",
}

#: (host side, target side) -> (port id, TCP port) for TLS-required ports; --concat ports
#: (TLS allowed, not required) use id + 10 and TCP port + 10.
PORTS = {("tlshd", "ktlsd"): ("30", 4430), ("ktlsd", "tlshd"): ("31", 4431),
         ("ktlsd2", "ktlsd"): ("32", 4432),
         ("newtlshd", "ktlsd"): ("33", 4433), ("ktlsd", "newtlshd"): ("34", 4434)}  # fmt: skip


class Target:
    """nvmet configuration: ports enabled from the target's namespace, per-case subsystems."""

    def __init__(self, sc: Scenario, fleet: Fleet) -> None:
        self.sc, self.fleet = sc, fleet
        self.ports: dict[tuple[str, str, bool], tuple[Path, int]] = {}
        self.hosts_made: list[Path] = []
        sc.cleanup(self.teardown, "nvmet ports and hosts")

    def host(self, hostnqn: str) -> Path:
        host = NVMET / "hosts" / hostnqn
        if not host.exists():
            host.mkdir()
            self.hosts_made.append(host)
        return host

    def port(self, host: str, target: str, concat: bool) -> tuple[Path, int]:
        key = (host, target, concat)
        if key not in self.ports:
            pid, svc = PORTS[(host, target)]
            if concat:
                pid, svc = str(int(pid) + 10), svc + 10
            p = NVMET / "ports" / pid
            p.mkdir()
            self.ports[key] = (p, svc)
            write_attr(p / "addr_trtype", "tcp")
            write_attr(p / "addr_adrfam", "ipv4")
            write_attr(p / "addr_traddr", self.fleet.address(target, host))
            write_attr(p / "addr_trsvcid", str(svc))
            write_attr(p / "addr_tsas", "tls1.3")  # implies treq=required ...
            if concat:  # ... --concat's first, authenticating connection is plain TCP
                write_attr(p / "addr_treq", "not required")
        return self.ports[key]

    def subsystem(self, subnqn: str, hostnqn: str, host: str, target: str, concat: bool):
        """A subsystem on RAMDEV for ``hostnqn``, linked to its port *from the target's
        namespace* (the link enables the port, whose listener lives where the link came
        from). Returns its teardown."""
        port, _svc = self.port(host, target, concat)
        sub = NVMET / "subsystems" / subnqn
        sub.mkdir()
        write_attr(sub / "attr_allow_any_host", "0")
        allowed = sub / "allowed_hosts" / hostnqn
        allowed.symlink_to(self.host(hostnqn))
        ns = sub / "namespaces" / "1"
        ns.mkdir()
        write_attr(ns / "device_path", RAMDEV)
        write_attr(ns / "enable", "1")
        plink = port / "subsystems" / subnqn
        self.sc.sh(self.fleet.namespaces[target].cmd(["ln", "-s", str(sub), str(plink)]))

        def teardown() -> None:
            plink.unlink(missing_ok=True)
            write_attr(ns / "enable", "0")
            ns.rmdir()
            allowed.unlink(missing_ok=True)
            sub.rmdir()

        return teardown

    def teardown(self) -> None:
        for port, _svc in self.ports.values():
            for link in (port / "subsystems").iterdir():
                link.unlink()
            port.rmdir()
        for host in self.hosts_made:
            host.rmdir()


# -- kernel log --------------------------------------------------------------------------------


def dmesg() -> list[str]:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()


def kernel_status(lines: list[str]) -> dict[str, object]:
    """What the kernel said about TLS handshakes: DONE statuses and its own timeouts."""
    done = [ln for ln in lines if "handshake complete, error" in ln]
    return {
        "done_status": sorted({ln.rsplit("error ", 1)[1].strip() for ln in done}),
        "kernel_timeouts": [ln.split("] ", 1)[-1] for ln in lines
                            if "TLS handshake failed" in ln or "handshake timeout" in ln],
    }  # fmt: skip


def agent_status(agent: Agent, since: int) -> str:
    """The status an agent reported for the case's failed handshakes (one short line)."""
    lines = agent.failure_lines(since)
    if not lines:
        return "(no failure logged)"
    line = lines[-1]
    if agent.name == "ktlsd":
        m = re.search(r"status=(-?\d+ \(\w+\))(?:.*?reason=(.*))?", line)
        if m:
            return f"status {m.group(1)}" + (f": {m.group(2)[:160]}" if m.group(2) else "")
    return re.sub(r"^.*?tlshd\[\d+\]:\s*", "", line)[:200]


# -- one case ----------------------------------------------------------------------------------


class Cases:
    """Runs the cases and keeps one record per case in the figure ``cases``."""

    def __init__(self, sc: Scenario, fleet: Fleet, target: Target, hostnqn: str) -> None:
        self.sc, self.fleet, self.target, self.hostnqn = sc, fleet, target, hostnqn
        self.records: dict[str, dict[str, object]] = {}
        self.setting = "accept"  # the ktlsd end's legacy_psk_sha384 (accept = default)
        self.setting_known = True

    # recording -----------------------------------------------------------------------------
    def record(self, case_id: str, rec: dict[str, object], problems: list[str]) -> None:
        rec.setdefault("outcome", "error")
        rec["ok"] = not problems
        if problems:
            rec["why"] = "; ".join(problems)
        self.records[case_id] = rec
        self.sc.figures["cases"] = self.records
        verdict = "as expected" if rec["ok"] else f"NOT as expected: {rec['why']}"
        print(f"case {case_id}: {rec['outcome']} (expected {rec['expected']}) {verdict}",
              flush=True)  # fmt: skip

    def base(self, kind: str, host: str, target: str, expected: str) -> dict[str, object]:
        return {
            "kind": kind,
            "pairing": f"host {agent_of(host)} ({ALL_SIDES[host][1]}) -> "
                       f"target {agent_of(target)} ({ALL_SIDES[target][1]})",
            "host": agent_of(host),
            "target": agent_of(target),
            "expected": expected,
        }  # fmt: skip

    def ktlsd_ends(self, host: str, target: str) -> list[str]:
        return [side for side in (host, target) if agent_of(side) == "ktlsd"]

    def run_connect(self, host: str, argv: list[str], secrets: tuple[str, ...] = ()):
        """``argv`` in the host's namespace: (exit, seconds, last output line)."""
        full = self.fleet.namespaces[host].cmd(argv)
        shown = [("<redacted>" if a in secrets else a) for a in full]
        print(f"$ {shlex.join(shown)}", flush=True)
        t0 = time.monotonic()
        proc = subprocess.run(full, capture_output=True, text=True, timeout=90)
        seconds = round(time.monotonic() - t0, 2)
        out = (proc.stdout + proc.stderr).strip()
        for secret in secrets:
            out = out.replace(secret, "<redacted>")
        if out:
            print(out, flush=True)
        return proc.returncode, seconds, (out.splitlines() or [""])[-1]

    def wire_checks(
        self, rec: dict[str, object], summaries: list[dict[str, object]], want: str,
        problems: list[str], marks: dict[str, int], host: str, target: str,
    ) -> None:  # fmt: skip
        """``want``: ``spec`` (suite hash = binder hash = PSK hash), ``legacy`` (SHA-384 PSK
        bound to SHA-256), ``spec-sha384`` (spec, and TLS_AES_256_GCM_SHA384), ``NVMe1G``."""
        rec["wire"] = describe(summaries)
        rec["handshakes_on_wire"] = len(summaries)
        if summaries:
            first = summaries[0]
            rec["suite"], rec["binder"] = first.get("suite"), first.get("binder_hash")
            rec["binder_bytes"] = first.get("binder_bytes")
        if len(summaries) < 2:
            problems.append(f"{len(summaries)} TLS handshakes seen on the wire (admin + I/O: >= 2)")
        for s in summaries:
            suite = str(s.get("suite"))
            if s.get("error"):
                problems.append(f"unreadable hello: {s['error']}")
            elif want == "legacy":
                if not (legacy_binding(s) and suite_hash(suite) == "SHA-256"):
                    problems.append(f"not the legacy binding: {describe([s])}")
            elif want == "NVMe1G":
                if not str(s.get("identity_kind") or "").startswith("NVMe1G"):
                    problems.append(f"not a generated (NVMe1G) PSK: {describe([s])}")
            else:
                hashes = {s.get("binder_hash"), s.get("psk_hash"), suite_hash(suite)}
                if len(hashes) != 1:
                    problems.append(f"suite, binder and PSK hashes differ: {describe([s])}")
                if want == "spec-sha384" and suite != "TLS_AES_256_GCM_SHA384":
                    problems.append(f"expected TLS_AES_256_GCM_SHA384: {describe([s])}")
        # ktlsd's own log line names the suite: it must be what the wire shows.
        for side in self.ktlsd_ends(host, target):
            ok_lines = self.fleet.agents[side].successful_handshakes(marks[side])
            if not ok_lines:
                problems.append(f"{side} logged no successful handshake")
            elif summaries and not all(f"suite={s.get('suite')}" in " ".join(ok_lines)
                                       for s in summaries):  # fmt: skip
                problems.append(f"{side}'s logged suite differs from the wire")

    def failure_checks(
        self, rec: dict[str, object], rc: int, seconds: float, subnqn: str, marks: dict[str, int],
        dmesg_mark: int, host: str, target: str, problems: list[str],
    ) -> None:  # fmt: skip
        status = kernel_status(dmesg()[dmesg_mark:])
        rec["status"] = {
            "host kernel (DONE status)": status["done_status"],
            f"host agent {agent_of(host)}": agent_status(self.fleet.agents[host], marks[host]),
            f"target agent {agent_of(target)}": agent_status(
                self.fleet.agents[target], marks[target]),
        }  # fmt: skip
        if rc == 0 or controller_for(subnqn) is not None:
            problems.append("connected although it must fail")
        if seconds > PROMPT_SECONDS:
            problems.append(f"failure took {seconds} s (> {PROMPT_SECONDS} s: not prompt)")
        if not status["done_status"]:
            problems.append("the host kernel got no DONE with an error")
        if status["kernel_timeouts"]:
            problems.append(f"kernel-side timeout: {status['kernel_timeouts'][-1]}")
        if not self.fleet.agents[host].failure_lines(marks[host]):
            problems.append(f"host agent {agent_of(host)} logged no failure")

    # the cases -----------------------------------------------------------------------------
    def tls(
        self, psk: str, host: str, target: str, expected: str, want: str,
        legacy_log: bool = True,
    ) -> None:  # fmt: skip
        """NVMe/TCP TLS with a retained PSK of hash ``psk``: connect, 16 MiB, disconnect.
        ``legacy_log=False``: a spec-correct SHA-384 cross case, where ktlsd has no legacy
        binding to log (the case is still labelled with the setting in force)."""
        setting = f" [{self.setting}]" if psk == "sha384" and host != REFERENCE[0] else ""
        case_id = f"nvme-{psk} {pairing_name(host, target)}{setting}"
        subnqn = f"{NQN}-{psk}-{host}-{target}-{self.setting}"
        rec = self.base(f"nvme-{psk}", host, target, expected)
        if setting:
            rec["legacy_psk_sha384"] = self.setting
        problems: list[str] = []
        teardown = None
        try:
            gen_key(self.sc, self.hostnqn, subnqn, HMAC[psk])
            teardown = self.target.subsystem(subnqn, self.hostnqn, host, target, concat=False)
            _port, svc = self.target.port(host, target, False)
            marks, dmesg_mark = self.fleet.marks(), len(dmesg())
            with self.fleet.capture(host, target, {svc}) as cap:
                rc, seconds, last = self.run_connect(host, [
                    "nvme", "connect", "-t", "tcp", "-a", self.fleet.address(target, host),
                    "-s", str(svc), "-n", subnqn, f"--hostnqn={self.hostnqn}", "--tls",
                    "--ctrl-loss-tmo=0"])  # fmt: skip
            summaries = cap.summaries()
            rec["connect_seconds"] = seconds
            rec["outcome"] = "pass" if rc == 0 else "fail"
            if expected == "fail":
                rec["wire"] = describe(summaries)
                self.failure_checks(rec, rc, seconds, subnqn, marks, dmesg_mark, host, target,
                                    problems)  # fmt: skip
            elif rc != 0:
                problems.append(f"nvme connect failed (exit {rc}): {last}")
                self.failure_checks(rec, rc, seconds, subnqn, marks, dmesg_mark, host, target, [])
                rec["wire"] = describe(summaries)
            else:
                self.wire_checks(rec, summaries, want, problems, marks, host, target)
                rec["bytes_verified"] = self.io(subnqn, problems)
            if setting and legacy_log:
                # The legacy binding, taken, refused or offered, is named in ktlsd's log.
                side = "ktlsd"
                hits = [ln for ln in self.fleet.agents[side].lines()[marks[side]:]
                        if "legacy_psk_sha384" in ln]  # fmt: skip
                rec["ktlsd_log"] = hits[-1][-220:] if hits else "(nothing)"
                if not hits:
                    problems.append("ktlsd logged no line naming legacy_psk_sha384")
        except Exception as exc:  # one broken case must not hide the others' results
            problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.end_case(subnqn, teardown)
        self.record(case_id, rec, problems)

    def io(self, subnqn: str, problems: list[str]) -> int:
        dev = find_block_device(subnqn)
        data = os.urandom(DATA_BYTES)
        direct_io(dev, data)
        back, _ = direct_io(dev, None)
        on_target, _ = direct_io(Path(RAMDEV), None)
        if back != data:
            problems.append("16 MiB read-back differs")
        if on_target != data:
            problems.append(f"the data is not on the target's {RAMDEV}")
        return 2 * DATA_BYTES if back == data and on_target == data else 0

    def concat(self, host: str, target: str, chost: str, chostid: str, secret: str) -> None:
        case_id = f"nvme-concat {pairing_name(host, target)}"
        subnqn = f"{NQN}-concat-{host}-{target}"
        rec = self.base("nvme-concat", host, target, "pass")
        problems: list[str] = []
        teardown = None
        try:
            teardown = self.target.subsystem(subnqn, chost, host, target, concat=True)
            _port, svc = self.target.port(host, target, True)
            marks = self.fleet.marks()
            with self.fleet.capture(host, target, {svc}) as cap:
                rc, seconds, last = self.run_connect(
                    host,
                    ["nvme", "connect", "-t", "tcp", "-a", self.fleet.address(target, host),
                     "-s", str(svc), "-n", subnqn, f"--hostnqn={chost}", f"--hostid={chostid}",
                     f"--dhchap-secret={secret}", "--concat", "--ctrl-loss-tmo=0"],
                    secrets=(f"--dhchap-secret={secret}", secret),
                )  # fmt: skip
            rec["connect_seconds"] = seconds
            rec["outcome"] = "pass" if rc == 0 else "fail"
            summaries = cap.summaries()
            if rc != 0:
                problems.append(f"nvme connect --concat failed (exit {rc}): {last}")
                rec["wire"] = describe(summaries)
            else:
                self.wire_checks(rec, summaries, "NVMe1G", problems, marks, host, target)
                for side in self.ktlsd_ends(host, target):
                    nvme1g = [ln for ln in self.fleet.agents[side].successful_handshakes(
                        marks[side]) if "NVMe1G" in ln]  # fmt: skip
                    if not nvme1g:
                        problems.append(f"{side} logged no NVMe1G handshake")
                ok = io_roundtrip(find_block_device(subnqn))
                rec["bytes_verified"] = 2 * 1024 * 1024 if ok else 0
                if not ok:
                    problems.append("1 MiB read-back differs")
        except Exception as exc:  # one broken case must not hide the others' results
            problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.end_case(subnqn, teardown)
        self.record(case_id, rec, problems)

    def wrong_psk(self, host: str, target: str) -> None:
        """The host offers a different key under the target's identity: prompt failure."""
        case_id = f"nvme-wrong-psk {pairing_name(host, target)}"
        subnqn = f"{NQN}-wrong-{host}-{target}"
        rec = self.base("nvme-wrong-psk", host, target, "fail")
        problems: list[str] = []
        teardown = None
        try:
            gen_key(self.sc, self.hostnqn, subnqn, 1)
            teardown = self.target.subsystem(subnqn, self.hostnqn, host, target, concat=False)
            self._wrong_psk(rec, subnqn, host, target, problems)
        except Exception as exc:  # one broken case must not hide the others' results
            problems.append(f"{type(exc).__name__}: {exc}")
        finally:
            self.end_case(subnqn, teardown)
        self.record(case_id, rec, problems)

    def _wrong_psk(
        self, rec: dict[str, object], subnqn: str, host: str, target: str, problems: list[str]
    ) -> None:
        desc = psk_description(self.hostnqn, subnqn)
        _port, svc = self.target.port(host, target, False)
        argv = ["nvme", "connect", "-t", "tcp", "-a", self.fleet.address(target, host),
                "-s", str(svc), "-n", subnqn, f"--hostnqn={self.hostnqn}", "--tls",
                "--ctrl-loss-tmo=0", "--keyring=ktlsd-wrong"]  # fmt: skip
        # A private keyring in a fresh session holds a random key under the same description;
        # --tls_key names it (the key's serial is only known inside that session).
        script = (
            "ring=$(keyctl newring ktlsd-wrong @s) && "
            f"key=$(head -c 32 /dev/urandom | keyctl padd psk '{desc}' \"$ring\") && "
            'keyctl setperm "$key" 0x3f030000 && ' + shlex.join(argv) + ' --tls_key="$key"'
        )
        marks, dmesg_mark = self.fleet.marks(), len(dmesg())
        with self.fleet.capture(host, target, {svc}) as cap:
            rc, seconds, _last = self.run_connect(
                host, ["keyctl", "session", "-", "sh", "-c", script]
            )
        rec["connect_seconds"] = seconds
        rec["outcome"] = "pass" if rc == 0 else "fail"
        rec["wire"] = describe(cap.summaries())
        time.sleep(0.2)  # let the target's agent finish its log line
        self.failure_checks(rec, rc, seconds, subnqn, marks, dmesg_mark, host, target, problems)

    def end_case(self, subnqn: str, teardown: object) -> None:
        """Disconnect a controller a case left behind, remove the case's subsystem."""
        if controller_for(subnqn) is not None:
            self.sc.sh(["nvme", "disconnect", "-n", subnqn], check=False, timeout=30)
        if teardown is not None:
            teardown()  # type: ignore[operator]

    def set_legacy(self, setting: str) -> None:
        """Rewrite the ktlsd end's configuration with ``legacy_psk_sha384 = setting``, SIGHUP."""
        write_tlshd_conf(self.fleet.configs["ktlsd"], keyrings=".nvme",
                         ktlsd={"legacy_psk_sha384": setting})  # fmt: skip
        line = self.fleet.agents["ktlsd"].reload()
        known = "legacy_psk_sha384" in line
        self.sc.figures.setdefault("legacy_psk_sha384_reloads", {})[setting] = line[-160:]  # type: ignore[index]
        if not known:
            self.setting_known = False
            self.sc.detail(
                f"ktlsd did not take legacy_psk_sha384 = {setting} ({line.strip()[-120:]}): "
                "this ktlsd has no such setting yet, so the SHA-384 cross rows cannot meet "
                "the table until the legacy-PSK feature is merged"
            )
        self.setting = setting


def dhchap_host(sc: Scenario, target: Target) -> tuple[str, str, str]:
    """For --concat: a host NQN of its own with a SHA-256 DH-HMAC-CHAP secret (never logged),
    allowed on ``target``; returns (host NQN, host id, secret)."""
    chostid = str(uuid.uuid4())
    chost = f"nqn.2014-08.org.nvmexpress:uuid:{chostid}"
    proc = subprocess.run(["nvme", "gen-dhchap-key", "--hmac=1", f"--nqn={chost}"],
                          capture_output=True, text=True)  # fmt: skip
    secret = proc.stdout.strip()
    sc.check(proc.returncode == 0 and secret.startswith("DHHC-1:01:"),
             "nvme gen-dhchap-key made a SHA-256 DH-HMAC-CHAP secret (not shown)")  # fmt: skip
    entry = target.host(chost)
    write_attr(entry / "dhchap_key", secret)
    write_attr(entry / "dhchap_hash", "hmac(sha256)")
    write_attr(entry / "dhchap_dhgroup", "ffdhe2048")
    return chost, chostid, secret


def main() -> None:
    with Scenario() as sc:
        modprobe(sc, "tls", "nvme-keyring", "nvmet", "nvmet-tcp", "nvme-tcp", "nvme-fabrics")
        if not Path(RAMDEV).exists():
            sc.sh(["modprobe", "brd", "rd_nr=8", f"rd_size={DATA_BYTES * 2 // 1024}"])
        package_versions(sc)
        fleet = Fleet.create(sc)
        configs = {
            side: write_tlshd_conf(Path(f"/tmp/fleet-nvme-{side}.conf"), keyrings=".nvme")
            for side in SIDES
        }
        fleet.start_agents(sc, configs)
        hostnqn = Path("/etc/nvme/hostnqn").read_text().strip()
        target = Target(sc, fleet)
        cases = Cases(sc, fleet, target, hostnqn)
        sc.figure("sha384_cross_table", {f"{h}>{t} [{s}]": e for (s, h, t), e in
                                         SHA384_CROSS.items()})  # fmt: skip

        for host, tgt in (*CROSS, REFERENCE):
            cases.tls("sha256", host, tgt, "pass", "spec")
        cases.tls("sha384", *REFERENCE, "pass", "spec-sha384")

        chost, chostid, secret = dhchap_host(sc, target)
        for host, tgt in (*CROSS, REFERENCE):
            cases.concat(host, tgt, chost, chostid, secret)
        for host, tgt in (*CROSS, REFERENCE):
            cases.wrong_psk(host, tgt)

        for (setting, host, tgt), expected in SHA384_CROSS.items():
            if setting != cases.setting:
                cases.set_legacy(setting)
            want = "legacy" if expected == "pass-legacy" else "spec"
            cases.tls("sha384", host, tgt, expected, want)

        hint = "" if cases.setting_known else " (this ktlsd has no legacy_psk_sha384)"
        report(sc, cases.records, hint)


if __name__ == "__main__":
    main()
