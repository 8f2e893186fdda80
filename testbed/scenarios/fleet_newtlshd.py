"""fleet-newtlshd: NVMe/TCP TLS between ktlsd and the newest tlshd Debian ships (unstable).

tlshd 1.0 on GnuTLS 3.8.9 (trixie) cannot use a SHA-384 retained PSK as such (it binds it to
SHA-256; see fleet_nvme.py). GnuTLS 3.8.11 fixed that, and Debian unstable's ktls-utils is
built against it. The guest image carries a sid ``minbase`` chroot with that ktls-utils at
/opt/sid-tlshd (testbed/build.py, which records the versions and the GnuTLS ``ldd`` finds in
/opt/sid-tlshd.json). Here its tlshd runs as agent ``tlshd-sid`` -- ``chroot /opt/sid-tlshd
/usr/sbin/tlshd`` started in its own network namespace (the chroot keeps the namespace, so
it serves that namespace's handshake upcalls; keyrings are kernel-wide; /proc, /dev and /sys
are bind-mounted into the chroot for the scenario's lifetime) -- facing ktlsd in another::

    fleet-newtlshd (tlshd-sid) f-nk 10.77.2.1 ==veth== 10.77.2.2 f-kn  fleet-ktlsd (ktlsd)

ktlsd runs with ``[ktlsd] legacy_psk_sha384 = refuse`` (spec-strict both ways), set by SIGHUP
before the first case, so a SHA-384 case can only pass with a spec-correct binding. Cases,
both directions each (host first: ``tlshd-sid>ktlsd`` is a sid-tlshd host, ktlsd target):

- ``nvme-sha256``: SHA-256 retained PSK, 16 MiB O_DIRECT write, read back byte-exact, found
  on the target's ram disk; suite, binder and PSK hash agree on the wire.
- ``nvme-sha384 ... [refuse]``: SHA-384 retained PSK (identity ``NVMe1R02``/``NVMe0R02``:
  hash field 02 is what makes the new tlshd pick SHA-384), the same 16 MiB, and the wire
  must show TLS_AES_256_GCM_SHA384 with a 48-byte (SHA-384) binder.
- ``nvme-concat``: ``nvme connect --concat`` (generated ``NVMe1G`` PSK), 1 MiB byte-exact.
- ``nvme-wrong-psk``: a different key under the target's identity fails within 6 s.

The versions found (sid chroot and guest) are figures; the scenario fails up front, saying
so with the versions, if the chroot's tlshd is not linked against GnuTLS >= 3.8.11.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import Scenario, ScenarioFailed, modprobe, write_tlshd_conf
from testbed.scenarios.fleet import (
    NEW_CROSS,
    NEW_LINKS,
    NEW_SIDES,
    SID_RECORD,
    SID_ROOT,
    Fleet,
    package_versions,
    report,
)
from testbed.scenarios.fleet_nvme import RAMDEV, Cases, Target, dhchap_host
from testbed.scenarios.nvme_tls import DATA_BYTES

#: Bind-mounted into the chroot while the scenario runs (tlshd reads /proc/keys to find its
#: keyrings by name; GnuTLS may open /dev/urandom).
CHROOT_MOUNTS = ("proc", "dev", "sys")


def sid_versions(sc: Scenario) -> dict[str, object]:
    """What the build recorded about the sid chroot, checked against the chroot itself."""
    if not SID_RECORD.exists():
        raise ScenarioFailed(f"no {SID_RECORD}: the guest image predates the sid chroot "
                             "(rebuild with python -m testbed.build)")  # fmt: skip
    record: dict[str, object] = json.loads(SID_RECORD.read_text())
    if "error" in record or not (SID_ROOT / "usr/sbin/tlshd").exists():
        sc.figure("sid_tlshd", record)
        raise ScenarioFailed(f"the image has no sid tlshd: {str(record.get('error'))[:300]}")
    live = sc.sh(["chroot", str(SID_ROOT), "dpkg-query", "-W", "-f", "${Package} ${Version}\\n",
                  "ktls-utils", "libgnutls30t64"]).stdout  # fmt: skip
    versions = dict(line.split(" ", 1) for line in live.splitlines() if " " in line)
    sc.figure("sid_tlshd", {**record, "packages": versions})
    sc.check(versions == record.get("packages"),
             f"the sid chroot holds what the build recorded: {versions}")  # fmt: skip
    sc.check(bool(record.get("gnutls_at_least_3_8_11")),
             f"sid tlshd is built against GnuTLS >= 3.8.11 (libgnutls30t64 "
             f"{versions.get('libgnutls30t64')}; ktls-utils Depends: "
             f"{record.get('ktls_utils_depends')})")  # fmt: skip
    return record


def bind_mounts(sc: Scenario) -> None:
    for name in CHROOT_MOUNTS:
        where = SID_ROOT / name
        sc.sh(["mount", "--bind", f"/{name}", str(where)])
        sc.cleanup(lambda w=where: subprocess.run(["umount", "-l", str(w)], capture_output=True),
                   f"umount {where}")  # fmt: skip


def main() -> None:
    with Scenario() as sc:
        modprobe(sc, "tls", "nvme-keyring", "nvmet", "nvmet-tcp", "nvme-tcp", "nvme-fabrics")
        if not Path(RAMDEV).exists():
            sc.sh(["modprobe", "brd", "rd_nr=8", f"rd_size={DATA_BYTES * 2 // 1024}"])
        package_versions(sc)
        sid_versions(sc)
        bind_mounts(sc)
        fleet = Fleet.create(sc, NEW_SIDES, NEW_LINKS)
        configs = {
            "newtlshd": write_tlshd_conf(SID_ROOT / "etc/tlshd/fleet-newtlshd.conf",
                                         keyrings=".nvme"),
            "ktlsd": write_tlshd_conf(Path("/tmp/fleet-newtlshd-ktlsd.conf"), keyrings=".nvme"),
        }  # fmt: skip
        fleet.start_agents(sc, configs)
        version = subprocess.run(["chroot", str(SID_ROOT), "/usr/sbin/tlshd", "--version"],
                                 capture_output=True, text=True)  # fmt: skip
        sc.figure("sid_tlshd_version", (version.stdout + version.stderr).strip()[:120])
        hostnqn = Path("/etc/nvme/hostnqn").read_text().strip()
        target = Target(sc, fleet)
        cases = Cases(sc, fleet, target, hostnqn)
        cases.set_legacy("refuse")
        sc.check(cases.setting_known, "ktlsd took legacy_psk_sha384 = refuse (SIGHUP)")

        for host, tgt in NEW_CROSS:
            cases.tls("sha256", host, tgt, "pass", "spec")
        for host, tgt in NEW_CROSS:
            cases.tls("sha384", host, tgt, "pass", "spec-sha384", legacy_log=False)

        chost, chostid, secret = dhchap_host(sc, target)
        for host, tgt in NEW_CROSS:
            cases.concat(host, tgt, chost, chostid, secret)
        for host, tgt in NEW_CROSS:
            cases.wrong_psk(host, tgt)

        report(sc, cases.records)


if __name__ == "__main__":
    main()
