"""fleet-newtlshd-nfs: NFS v4.2 over TLS between ktlsd and Debian unstable's tlshd.

The two-machine topology of fleet-newtlshd (fleet.py :data:`NEW_SIDES`): ``tlshd-sid`` (the
sid chroot's tlshd, GnuTLS >= 3.8.11) in fleet-newtlshd, ktlsd in fleet-ktlsd. The NFS
plumbing is fleet-nfs's (:class:`fleet_nfs.NfsServer`, :func:`fleet_nfs.nfs_case`): nfsd in
the server's namespace, the client mounting from its own. Both directions, ``xprtsec=tls``
and ``mtls``: mount, 4 MiB written, read back byte-exact after a remount, found in the
export, each agent logged a success, the suite read off the wire.

The PKI lives inside the chroot (/opt/sid-tlshd/etc/tlshd/pki): the sid tlshd reads it by
its chroot path, ktlsd by the full one.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import Scenario, modprobe, write_tlshd_conf
from testbed.scenarios.fleet import (
    NEW_CROSS,
    NEW_LINKS,
    NEW_SIDES,
    SID_ROOT,
    Fleet,
    package_versions,
)
from testbed.scenarios.fleet_newtlshd import bind_mounts, sid_versions
from testbed.scenarios.fleet_nfs import MODES, export_path, run_cases
from testbed.scenarios.nfs_tls import make_pki

PKI = SID_ROOT / "etc/tlshd/pki"
EXPORTS = Path("/etc/exports.d/fleet-newtlshd.exports")


def x509(pki: dict[str, Path], inside_chroot: bool) -> dict[str, dict[str, str]]:
    def path(name: str) -> str:
        full = pki[name]
        return "/" + str(full.relative_to(SID_ROOT)) if inside_chroot else str(full)

    return {
        "client": {"x509.truststore": path("ca.pem"), "x509.certificate": path("cli.pem"),
                   "x509.private_key": path("cli.key")},
        "server": {"x509.truststore": path("ca.pem"), "x509.certificate": path("srv.pem"),
                   "x509.private_key": path("srv.key")},
    }  # fmt: skip


def main() -> None:
    with Scenario() as sc:
        modprobe(sc, "tls", "nfsd", "nfs", "nfsv4")
        package_versions(sc)
        sid_versions(sc)
        bind_mounts(sc)
        addresses = tuple(end[2] for pair in NEW_LINKS for end in pair)
        pki = make_pki(sc, PKI, addresses)
        EXPORTS.parent.mkdir(parents=True, exist_ok=True)
        lines = []
        for client, server in NEW_CROSS:
            for mode in MODES:
                path = export_path(client, server, mode)
                path.mkdir(parents=True, exist_ok=True)
                opts = f"rw,sync,no_subtree_check,no_root_squash,xprtsec={mode}"
                lines.append(f"{path} 10.77.0.0/16({opts})")
        EXPORTS.write_text("\n".join(lines) + "\n")
        sc.cleanup(lambda: EXPORTS.unlink(missing_ok=True), "remove fleet-newtlshd exports")

        fleet = Fleet.create(sc, NEW_SIDES, NEW_LINKS)
        new, old = x509(pki, inside_chroot=True), x509(pki, inside_chroot=False)
        configs = {
            "newtlshd": write_tlshd_conf(SID_ROOT / "etc/tlshd/fleet-newtlshd-nfs.conf",
                                         keyrings=".nfs;.nfsd", client=new["client"],
                                         server=new["server"]),
            "ktlsd": write_tlshd_conf(Path("/tmp/fleet-newtlshd-nfs-ktlsd.conf"),
                                      keyrings=".nfs;.nfsd", client=old["client"],
                                      server=old["server"]),
        }  # fmt: skip
        fleet.start_agents(sc, configs)
        run_cases(sc, fleet, NEW_CROSS)

if __name__ == "__main__":
    main()
