"""nfs-tls-AGENT: NFS v4.2 over TLS (RPC-with-TLS), server and client in one guest.

Proves: nfsd exporting with ``xprtsec=tls`` and with ``xprtsec=mtls`` and the kernel NFS
client mounting 127.0.0.1 with the same option both complete their TLS handshakes through
AGENT's netlink upcalls, using x509 certificates made here with the openssl CLI (a CA, a
server certificate with SAN IP:127.0.0.1, a client certificate for mtls); a file written
through the mount reads back byte-exact after a remount (so it came back from the server,
not the client's page cache) and is present in the exported directory. A plain mount
without TLS is refused by the TLS-only export. Figures: mount time per mode, bytes verified,
handshakes in the agent's log.
"""

from __future__ import annotations

import hashlib
import os
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

PKI = Path("/tmp/nfs-pki")
DATA_BYTES = 4 * 1024 * 1024


def make_pki(
    sc: Scenario, pki: Path = PKI, server_ips: tuple[str, ...] = ("127.0.0.1",),
    key_args: tuple[str, ...] = (),
    label: str = "",
) -> dict[str, Path]:
    """CA + server cert (SAN IP:127.0.0.1, or ``server_ips``) + client cert, EC P-256 (or
    ``openssl req`` ``key_args``, e.g. ``-newkey ML-DSA-65 -nodes``), via the openssl CLI, in
    ``pki``. ``label`` is appended to the three common names (two PKIs side by side)."""
    pki.mkdir(exist_ok=True)
    san = ",".join(f"IP:{ip}" for ip in server_ips)
    p = {n: pki / n for n in ("ca.key", "ca.pem", "srv.key", "srv.pem", "cli.key", "cli.pem")}
    if p["cli.pem"].exists():
        return p
    ec = list(key_args) or ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    sc.sh(["openssl", "req", "-x509", *ec, "-keyout", str(p["ca.key"]), "-out", str(p["ca.pem"]),
           "-days", "2", "-subj", f"/CN=ktlsd testbed CA{label}",
           "-addext", "basicConstraints=critical,CA:TRUE",
           "-addext", "keyUsage=critical,keyCertSign"])  # fmt: skip
    for who, cn, eku in (("srv", "127.0.0.1", "serverAuth"), ("cli", "ktlsd-client", "clientAuth")):
        csr = pki / f"{who}.csr"
        sc.sh(["openssl", "req", "-new", *ec, "-keyout", str(p[f"{who}.key"]), "-out", str(csr),
               "-subj", f"/CN={cn}{label}"])  # fmt: skip
        ext = pki / f"{who}.ext"
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={eku}\n")
        sc.sh(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(p["ca.pem"]),
               "-CAkey", str(p["ca.key"]), "-CAcreateserial", "-days", "2",
               "-extfile", str(ext), "-out", str(p[f"{who}.pem"])])  # fmt: skip
    for k in ("ca.key", "srv.key", "cli.key"):
        p[k].chmod(0o600)
    return p


def start_nfsd(sc: Scenario, exports: dict[str, str]) -> None:
    modprobe(sc, "tls", "nfsd", "nfs", "nfsv4")
    if not Path("/proc/fs/nfsd/threads").exists():
        sc.sh(["mount", "-t", "nfsd", "nfsd", "/proc/fs/nfsd"])
    # nfs.conf's pipefs-directory; nfsdcld talks to nfsd through it. Without nfsdcld, nfsd
    # waits ~20 s for client-recovery tracking and then refuses to end the grace period.
    pipefs = Path("/run/rpc_pipefs")
    pipefs.mkdir(parents=True, exist_ok=True)
    if not (pipefs / "nfsd").exists() and not (pipefs / "nfs").exists():
        sc.sh(["mount", "-t", "rpc_pipefs", "sunrpc", str(pipefs)])
    Path("/var/lib/nfs/nfsdcld").mkdir(parents=True, exist_ok=True)
    if sc.sh(["pgrep", "-x", "nfsdcld"], check=False).returncode != 0:
        sc.sh(["nfsdcld"])
    lines = []
    for path, opts in exports.items():
        Path(path).mkdir(parents=True, exist_ok=True)
        lines.append(f"{path} 127.0.0.1({opts})")
    Path("/etc/exports").write_text("\n".join(lines) + "\n")
    if sc.sh(["pgrep", "-x", "rpcbind"], check=False).returncode != 0:
        sc.sh(["rpcbind", "-w"], check=False)
    sc.sh(["exportfs", "-ra"])
    if sc.sh(["pgrep", "-x", "rpc.mountd"], check=False).returncode != 0:
        sc.sh(["rpc.mountd", "-N", "2", "-N", "3"])
    if Path("/proc/fs/nfsd/threads").read_text().strip() in ("", "0"):
        # Short grace/lease times bound the wait if ending the grace period early fails.
        sc.sh(["rpc.nfsd", "-N", "3", "-G", "10", "-L", "10", "4"])
        # End the grace period now or the first OPEN waits it out.
        try:
            Path("/proc/fs/nfsd/v4_end_grace").write_text("Y\n")
        except OSError as exc:
            sc.detail(f"could not end the grace period early ({exc.strerror}); waiting 10 s")
            time.sleep(10)


def mount_and_check(sc: Scenario, mode: str, export: str, label: str) -> int:
    mnt = Path(f"/mnt/{label}")
    mnt.mkdir(parents=True, exist_ok=True)
    opts = f"vers=4.2,xprtsec={mode},proto=tcp,timeo=50,retrans=1"
    t0 = time.monotonic()
    sc.sh(["mount", "-t", "nfs", "-o", opts, f"127.0.0.1:{export}", str(mnt)], timeout=90)
    sc.figure(f"mount_seconds_{mode}", round(time.monotonic() - t0, 3))
    mounted = True

    def umount() -> None:
        if mounted:
            sc.sh(["umount", "-f", str(mnt)], check=False, timeout=30)

    sc.cleanup(umount, f"umount {mnt}")
    mountinfo = Path("/proc/self/mountinfo").read_text()
    line = next((ln for ln in mountinfo.splitlines() if f" {mnt} " in ln), "")
    sc.check(f"xprtsec={mode}" in line, f"{mode}: mount shows xprtsec={mode}")
    data = os.urandom(DATA_BYTES)
    (mnt / "payload.bin").write_bytes(data)
    os.sync()
    sc.sh(["umount", str(mnt)], timeout=30)
    mounted = False
    sc.sh(["mount", "-t", "nfs", "-o", opts, f"127.0.0.1:{export}", str(mnt)], timeout=90)
    mounted = True
    back = (mnt / "payload.bin").read_bytes()
    sc.check(hashlib.sha256(back).digest() == hashlib.sha256(data).digest(),
             f"{mode}: 4 MiB read back after remount matches")  # fmt: skip
    sc.check((Path(export) / "payload.bin").read_bytes() == data,
             f"{mode}: file present in the exported directory")  # fmt: skip
    sc.sh(["umount", str(mnt)], timeout=30)
    mounted = False
    return 2 * DATA_BYTES


def explain_tls_refusal(sc: Scenario, agent_log: str) -> None:
    """Name the usual cause of EPERM on an xprtsec=tls mount whose handshakes succeeded.

    The NFS client asks for an anonymous (``unauth``) client handshake with xprtsec=tls. If
    the agent presents a client certificate anyway, nfsd marks the transport as
    peer-authenticated, and an export that allows only ``xprtsec=tls`` (not mtls) refuses it.
    """
    server_saw_cert = [
        ln for ln in agent_log.splitlines()
        if "role=server" in ln and "identity=x509:" in ln and "status=0" in ln
    ]  # fmt: skip
    if server_saw_cert:
        sc.detail(
            "likely cause: the client side presented a certificate on an anonymous (unauth) "
            "request, so nfsd saw a peer-authenticated transport, which an xprtsec=tls-only "
            f"export refuses; server-side log: {server_saw_cert[-1][:200]}"
        )


def main() -> None:
    with Scenario() as sc:
        agent = sc.agent
        pki = make_pki(sc)
        exports = {
            f"/srv/nfs-{agent}-tls": "rw,sync,no_subtree_check,no_root_squash,xprtsec=tls",
            f"/srv/nfs-{agent}-mtls": "rw,sync,no_subtree_check,no_root_squash,xprtsec=mtls",
        }
        start_nfsd(sc, exports)
        conf = write_tlshd_conf(
            Path(f"/tmp/{agent}-nfs.conf"),
            keyrings=".nfs;.nfsd",
            client={
                "x509.truststore": str(pki["ca.pem"]),
                "x509.certificate": str(pki["cli.pem"]),
                "x509.private_key": str(pki["cli.key"]),
            },
            server={
                "x509.truststore": str(pki["ca.pem"]),
                "x509.certificate": str(pki["srv.pem"]),
                "x509.private_key": str(pki["srv.key"]),
            },
        )
        handle = start_agent(sc, agent, conf, "nfs")
        verified = 0
        failures: list[str] = []
        for mode in ("tls", "mtls"):  # both modes run even if one fails: more to learn
            try:
                verified += mount_and_check(sc, mode, f"/srv/nfs-{agent}-{mode}", f"{agent}-{mode}")
            except ScenarioFailed as exc:
                failures.append(f"{mode}: {exc}")
                if mode == "tls":
                    explain_tls_refusal(sc, handle.output())
        sc.figure("bytes_verified", verified)
        # A TLS-only export must refuse a mount without TLS (proves TLS was not optional).
        mnt = Path(f"/mnt/{agent}-plain")
        mnt.mkdir(parents=True, exist_ok=True)
        plain = sc.sh(
            ["mount", "-t", "nfs", "-o", "vers=4.2,proto=tcp,timeo=50,retrans=1,retry=0",
             f"127.0.0.1:/srv/nfs-{agent}-tls", str(mnt)],
            check=False, timeout=60,
        )  # fmt: skip
        if plain.returncode == 0:
            sc.sh(["umount", str(mnt)], check=False)
        sc.check(plain.returncode != 0, "mount without xprtsec is refused by the TLS export")
        if failures:
            raise ScenarioFailed("; ".join(failures))
        time.sleep(0.2)
        ok_lines = handle.successful_handshakes()
        sc.figure("agent_successful_handshakes_logged", len(ok_lines))
        sc.check(len(ok_lines) >= 4, "the agent logged client and server handshakes")


if __name__ == "__main__":
    main()
