"""fleet-nfs: NFS v4.2 over TLS between ktlsd and tlshd, each agent on its own "machine".

The fleet topology of fleet.py (tlshd, ktlsd and a reference ktlsd, each in its own network
namespace). nfsd runs in the *server's* namespace -- started there with rpc.nfsd, with its
own nfsd filesystem, rpc_pipefs, nfsdcld, rpcbind and mountd, which need a private mount
namespace (:class:`NfsServer`); the client mounts from *its* namespace (``nsenter --net
mount``), so the client's RPC-with-TLS handshake goes to the client's agent and the server's
to the server's. Pairings are client first: ``tlshd>ktlsd`` is a tlshd client of a ktlsd
server; both cross directions and ktlsd>ktlsd for reference.

Per pairing and mode (``xprtsec=tls``: server certificate only, the client anonymous;
``xprtsec=mtls``: both certificates; a CA, a server certificate with every fleet address in
its SAN and a client certificate made with the openssl CLI): mount, 4 MiB written, read back
byte-exact after a remount, found in the export; each end's agent logged a successful
handshake; the suite is read off the wire (the TLS hellos after the clear-text RPC probe).
Records per case in the figure ``cases``, one line each in ``pairing_table``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import Scenario, ScenarioFailed, modprobe, write_tlshd_conf
from testbed.scenarios.fleet import (
    ALL_ADDRESSES,
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
from testbed.scenarios.nfs_tls import make_pki
from testbed.scenarios.tls_wire import describe

DATA_BYTES = 4 * 1024 * 1024
PKI = Path("/tmp/fleet-pki")
EXPORTS = Path("/etc/exports.d/fleet.exports")
MODES = ("tls", "mtls")
NFS_PORT = 2049


class NfsServer:
    """nfsd and its helpers in one network namespace.

    nfs-utils finds nfsd's control files at /proc/fs/nfsd and the pipes at /run/rpc_pipefs;
    both filesystems belong to the namespace of the process that mounts them. So a holder
    process enters the server's network namespace, unshares its mount namespace (slave: the
    guest's mounts stay visible, its own do not leak out), mounts a private /run, rpc_pipefs
    and nfsd there, and every server command runs with ``nsenter`` into both namespaces.
    """

    def __init__(self, sc: Scenario, fleet: Fleet, side: str) -> None:
        self.sc, self.side = sc, side
        ready = Path(f"/tmp/fleet-nfs-{side}.ready")
        ready.unlink(missing_ok=True)
        script = (
            "set -e; mount -t tmpfs tmpfs /run; mkdir -p /run/rpc_pipefs /run/lock; "
            "mount -t rpc_pipefs sunrpc /run/rpc_pipefs; mount -t nfsd nfsd /proc/fs/nfsd; "
            f"touch {ready}; exec sleep 100000"
        )
        argv = ["unshare", "--mount", "--propagation", "slave", "sh", "-c", script]
        self.holder = subprocess.Popen(fleet.namespaces[side].cmd(argv))
        self.daemons: list[subprocess.Popen[bytes]] = []
        sc.cleanup(self.stop, f"nfs server in {side}")
        deadline = time.monotonic() + 20
        while not ready.exists():
            if self.holder.poll() is not None or time.monotonic() > deadline:
                raise ScenarioFailed(f"{side}: could not set up the nfs server's namespaces")
            time.sleep(0.05)

    def cmd(self, argv: list[str]) -> list[str]:
        return ["nsenter", "-t", str(self.holder.pid), "--net", "--mount", *argv]

    def daemon(self, argv: list[str]) -> None:
        print(f"$ {' '.join(self.cmd(argv))} &", flush=True)
        log = open(f"/tmp/fleet-nfs-{self.side}-{Path(argv[0]).name}.log", "wb")  # noqa: SIM115
        self.daemons.append(subprocess.Popen(self.cmd(argv), stdout=log, stderr=log))

    def start(self) -> None:
        storage = Path(f"/var/lib/nfs/nfsdcld-{self.side}")
        storage.mkdir(parents=True, exist_ok=True)
        # nfsdcld first: without it nfsd waits for client tracking and keeps its grace period.
        self.daemon(["nfsdcld", "-F", "-p", "/run/rpc_pipefs", "-s", str(storage)])
        self.daemon(["rpcbind", "-f"])
        time.sleep(0.3)
        self.sc.sh(self.cmd(["exportfs", "-ra"]))
        self.daemon(["rpc.mountd", "-F", "-N", "2", "-N", "3"])
        self.sc.sh(self.cmd(["rpc.nfsd", "-N", "3", "-G", "10", "-L", "10", "4"]))
        # End the grace period now, or the first OPEN waits it out. With no clients on
        # record (a fresh nfsdcld store) nfsd skips it, and the write is refused.
        if self.grace_ended():
            return
        end = self.sc.sh(self.cmd(["sh", "-c", "echo Y > /proc/fs/nfsd/v4_end_grace"]), check=False)
        if end.returncode != 0:
            self.sc.detail(f"{self.side}: could not end the grace period early: "
                           f"{(end.stdout + end.stderr).strip()[-80:]}")  # fmt: skip

    def grace_ended(self) -> bool:
        out = self.sc.sh(self.cmd(["cat", "/proc/fs/nfsd/v4_end_grace"]), check=False).stdout
        return out.strip() == "Y"

    def stop(self) -> None:
        self.sc.sh(self.cmd(["rpc.nfsd", "0"]), check=False)
        self.sc.sh(self.cmd(["exportfs", "-ua"]), check=False)
        for proc in [*self.daemons, self.holder]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def export_path(client: str, server: str, mode: str) -> Path:
    return Path(f"/srv/fleet-{client}-{server}-{mode}")


def nfs_case(sc: Scenario, fleet: Fleet, client: str, server: str, mode: str) -> dict[str, object]:
    """Mount, 4 MiB write, remount, read back, unmount; the case's record."""
    rec: dict[str, object] = {
        "kind": f"nfs-{mode}",
        "pairing": f"client {agent_of(client)} ({ALL_SIDES[client][1]}) -> "
                   f"server {agent_of(server)} ({ALL_SIDES[server][1]})",
        "client": agent_of(client),
        "server": agent_of(server),
        "expected": "pass",
    }  # fmt: skip
    problems: list[str] = []
    export = export_path(client, server, mode)
    mnt = Path(f"/mnt/fleet-{client}-{server}-{mode}")
    mnt.mkdir(parents=True, exist_ok=True)
    source = f"{fleet.address(server, client)}:{export}"
    opts = f"vers=4.2,xprtsec={mode},proto=tcp,timeo=50,retrans=1"
    mount = fleet.namespaces[client].cmd(["mount", "-t", "nfs", "-o", opts, source, str(mnt)])
    marks = fleet.marks()
    mounted = False
    try:
        with fleet.capture(client, server, {NFS_PORT}, rpc=True) as cap:
            t0 = time.monotonic()
            proc = sc.sh(mount, check=False, timeout=90)
            rec["mount_seconds"] = round(time.monotonic() - t0, 2)
        mounted = proc.returncode == 0
        rec["outcome"] = "pass" if mounted else "fail"
        summaries = cap.summaries()
        rec["wire"] = describe(summaries)
        rec["suite"] = summaries[0].get("suite") if summaries else None
        if not mounted:
            last = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
            problems.append(f"mount failed (exit {proc.returncode}): {last[0]}")
        else:
            info = Path("/proc/self/mountinfo").read_text()
            line = next((ln for ln in info.splitlines() if f" {mnt} " in ln), "")
            if f"xprtsec={mode}" not in line:
                problems.append(f"mount does not show xprtsec={mode}")
            if not summaries or not all(s.get("suite") for s in summaries):
                problems.append(f"no complete TLS hello pair on the wire ({rec['wire']})")
            data = os.urandom(DATA_BYTES)
            (mnt / "payload.bin").write_bytes(data)
            os.sync()
            sc.sh(["umount", str(mnt)], timeout=30)
            mounted = False
            sc.sh(mount, timeout=90)
            mounted = True
            back = (mnt / "payload.bin").read_bytes()
            same = hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
            there = (export / "payload.bin").read_bytes() == data
            if not same:
                problems.append("4 MiB read back after remount differs")
            if not there:
                problems.append("the file is not in the exported directory")
            rec["bytes_verified"] = 2 * DATA_BYTES if same and there else 0
            for side, role in ((client, "client"), (server, "server")):
                if not fleet.agents[side].successful_handshakes(marks[side]):
                    problems.append(f"{role} agent {agent_of(side)} logged no successful handshake")
    except Exception as exc:  # one broken case must not hide the others' results
        problems.append(f"{type(exc).__name__}: {exc}")
        rec.setdefault("outcome", "error")
    finally:
        if mounted:
            sc.sh(["umount", str(mnt)], check=False, timeout=30)
    rec["ok"] = not problems
    if problems:
        rec["why"] = "; ".join(problems)
    return rec


def run_cases(sc: Scenario, fleet: Fleet, pairings: Sequence[tuple[str, str]]) -> None:
    """Start nfsd on every server side, wait out the grace periods (side by side), run every
    mode for every (client, server) pairing, and report (failing on any unexpected case)."""
    servers = [NfsServer(sc, fleet, side) for side in sorted({s for _c, s in pairings})]
    for server in servers:
        server.start()
    t0 = time.monotonic()  # the grace periods (10 s) run side by side if not ended
    while not all(server.grace_ended() for server in servers):
        if time.monotonic() - t0 > 20:
            raise ScenarioFailed("an nfs server's grace period did not end in 20 s")
        time.sleep(0.5)
    sc.figure("grace_wait_seconds", round(time.monotonic() - t0, 1))
    records: dict[str, dict[str, object]] = {}
    for client, server in pairings:
        for mode in MODES:
            case_id = f"nfs-{mode} {pairing_name(client, server)}"
            records[case_id] = nfs_case(sc, fleet, client, server, mode)
            sc.figures["cases"] = records
            r = records[case_id]
            print(f"case {case_id}: {r['outcome']} {'ok' if r['ok'] else r['why']}", flush=True)
    report(sc, records)


def main() -> None:
    with Scenario() as sc:
        modprobe(sc, "tls", "nfsd", "nfs", "nfsv4")
        pki = make_pki(sc, PKI, ALL_ADDRESSES)
        x509 = {
            "client": {"x509.truststore": str(pki["ca.pem"]),
                       "x509.certificate": str(pki["cli.pem"]),
                       "x509.private_key": str(pki["cli.key"])},
            "server": {"x509.truststore": str(pki["ca.pem"]),
                       "x509.certificate": str(pki["srv.pem"]),
                       "x509.private_key": str(pki["srv.key"])},
        }  # fmt: skip
        pairings = (*CROSS, REFERENCE)
        EXPORTS.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for client, server in pairings:
            for mode in MODES:
                path = export_path(client, server, mode)
                path.mkdir(parents=True, exist_ok=True)
                opts = f"rw,sync,no_subtree_check,no_root_squash,xprtsec={mode}"
                lines.append(f"{path} 10.77.0.0/16({opts})")
        EXPORTS.write_text("\n".join(lines) + "\n")
        sc.cleanup(lambda: EXPORTS.unlink(missing_ok=True), "remove fleet exports")

        package_versions(sc)
        fleet = Fleet.create(sc)
        configs = {
            side: write_tlshd_conf(Path(f"/tmp/fleet-nfs-{side}.conf"), keyrings=".nfs;.nfsd",
                                   client=x509["client"], server=x509["server"])
            for side in SIDES
        }  # fmt: skip
        fleet.start_agents(sc, configs)
        run_cases(sc, fleet, pairings)

if __name__ == "__main__":
    main()
