"""Configure the systemd flavour's boot; runs under the test bed's init, before systemd.

``python3 prepare.py RESULTS`` (called by /sbin/ktlsd-guest-init when the kernel command
line has ``ktlsd.systemd=1``). Exit 0: PID 1 becomes systemd. Anything else: the guest
powers off.

It counts the boots of this QEMU process on the guest's disk (the ``snapshot=on`` overlay
survives a guest reboot, not QEMU's exit) and records the phase for the driver: boot 1 is
``upgrade``, boot 2 ``boot``; a third boot (after a kernel panic, say) is refused, so a
crashing guest cannot loop until the host's time limit.

On boot 1 it writes what an admin would have set up before: an x509 CA with server and
client certificates and tlshd's configuration file (which ktlsd reads too); NFS exports
with ``xprtsec=tls``/``mtls`` and an ``/etc/fstab`` line mounting the TLS one at boot; two
retained NVMe/TCP TLS PSKs (for the subsystem and for the discovery controller) in
``/etc/nvme/tls-keys``, as ``nvme gen-tls-key --keyfile`` writes them; ``discovery.conf``
for nvme-cli's ``nvmf-autoconnect.service``; and the test bed's own units (PSK import,
NVMe target, driver). tlshd.service is left enabled as ktls-utils installs it. Key material
never reaches the console or the results.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.systemd_guest import names

HERE = Path(__file__).resolve().parent
UNITS = HERE / "units"
SYSTEMD_DIR = Path("/etc/systemd/system")


def log(message: str) -> None:
    print(f"[systemd_guest.prepare] {message}", flush=True)


def run(argv: list[str], *, secret_output: bool = False) -> str:
    """Run a command; raise with its output tail on failure (withheld if it may hold keys)."""
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "(output withheld)" if secret_output else (proc.stdout + proc.stderr)[-400:]
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {proc.returncode}: {tail}")
    return "" if secret_output else proc.stdout


def count_boot() -> int:
    names.STATE_DIR.mkdir(parents=True, exist_ok=True)
    counter = names.STATE_DIR / "boots"
    boots = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(f"{boots}\n")
    return boots


def make_pki() -> None:
    """CA, server certificate (SAN IP:127.0.0.1) and client certificate, EC P-256."""
    names.PKI_DIR.mkdir(parents=True, exist_ok=True)
    work = Path("/run/ktlsd-testbed-pki")
    work.mkdir(exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ca_key = work / "ca.key"
    run(["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(names.CA),
         "-days", "30", "-subj", "/CN=ktlsd test bed CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign"])  # fmt: skip
    for cert, key, cn, eku in (
        (names.SERVER_CERT, names.SERVER_KEY, "127.0.0.1", "serverAuth"),
        (names.CLIENT_CERT, names.CLIENT_KEY, "ktlsd-testbed-client", "clientAuth"),
    ):
        csr, ext = work / f"{cert.stem}.csr", work / f"{cert.stem}.ext"
        run(["openssl", "req", "-new", *ec, "-keyout", str(key), "-out", str(csr),
             "-subj", f"/CN={cn}"])  # fmt: skip
        ext.write_text(f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={eku}\n")
        run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(names.CA),
             "-CAkey", str(ca_key), "-CAcreateserial", "-days", "30",
             "-extfile", str(ext), "-out", str(cert)])  # fmt: skip
        key.chmod(0o600)
    shutil.rmtree(work)  # the CA key is not needed again


def write_agent_conf() -> None:
    """tlshd's configuration file, which ktlsd reads unchanged (its own keys in [ktlsd])."""
    names.AGENT_CONF.write_text(
        "# Written by the ktlsd test bed (testbed/systemd_guest/prepare.py). Read by tlshd\n"
        "# (ktls-utils) and by ktlsd; tlshd ignores the [ktlsd] group.\n"
        "[debug]\n"
        "# tlshd logs each successful handshake only with loglevel > 0.\n"
        "loglevel=1\ntls=0\nnl=0\n\n"
        "[authenticate]\nkeyrings=.nvme\n\n"
        "[authenticate.client]\n"
        f"x509.truststore={names.CA}\n"
        f"x509.certificate={names.CLIENT_CERT}\n"
        f"x509.private_key={names.CLIENT_KEY}\n\n"
        "[authenticate.server]\n"
        f"x509.truststore={names.CA}\n"
        f"x509.certificate={names.SERVER_CERT}\n"
        f"x509.private_key={names.SERVER_KEY}\n\n"
        "[ktlsd]\n"
        "# tlshd's loglevel > 0 would make ktlsd log at debug level: keep one line per handshake.\n"
        "log_level=info\n"
        "# The driver changes this value before each reload to see the reload take effect.\n"
        "default_timeout_ms=10000\n"
    )


def write_nfs() -> None:
    Path(names.NFS_EXPORT).mkdir(parents=True, exist_ok=True)
    Path("/etc/exports").write_text(f"{names.NFS_EXPORT} 127.0.0.1({names.NFS_EXPORT_OPTIONS})\n")
    conf_d = Path("/etc/nfs.conf.d")
    conf_d.mkdir(exist_ok=True)
    # The v4 grace period after nfsd starts (90 s by default) would hold the first OPEN.
    (conf_d / "ktlsd-testbed.conf").write_text("[nfsd]\ngrace-time=10\nlease-time=10\n")
    names.FSTAB_MOUNT.mkdir(parents=True, exist_ok=True)
    # The mount waits for the local NFS server (x-systemd.after); _netdev makes it a remote
    # mount (remote-fs.target, after remote-fs-pre.target, which the agents are before).
    Path("/etc/fstab").write_text(
        "# ktlsd test bed (systemd flavour): the root is mounted by the initramfs.\n"
        f"127.0.0.1:{names.NFS_EXPORT} {names.FSTAB_MOUNT} nfs "
        "vers=4.2,xprtsec=tls,_netdev,x-systemd.after=nfs-server.service 0 0\n"
    )


def write_nvme() -> None:
    """Retained PSKs in /etc/nvme/tls-keys, discovery.conf for nvmf-autoconnect.service."""
    hostnqn = Path("/etc/nvme/hostnqn").read_text().strip()
    run(["modprobe", "nvme-tcp"])  # brings the .nvme keyring (nvme-keyring)
    names.TLS_KEYFILE.unlink(missing_ok=True)
    for subnqn in (names.SUBNQN, names.DISCOVERY_NQN):
        # SHA-256: tlshd 1.0 mishandles SHA-384 retained PSKs (docs/testbed.md). Identity
        # version 1: nvme-cli 2.13 writes a version-0 key into the keyfile as
        # "NVMeTLSkey-0:..." and its own "tls-key --import" then refuses it (it accepts
        # version 1 only), so the file is usable at boot only with --identity=1.
        run(["nvme", "gen-tls-key", f"--hostnqn={hostnqn}", f"--subsysnqn={subnqn}",
             "--hmac=1", "--identity=1", "--insert", f"--keyfile={names.TLS_KEYFILE}"],
            secret_output=True)  # fmt: skip
    names.TLS_KEYFILE.chmod(0o600)
    # connect-all discovers over TLS (the port requires it), then connects every subsystem
    # the log page lists with TLS (libnvme sets --tls for a TLS sectype).
    Path("/etc/nvme/discovery.conf").write_text(
        "# ktlsd test bed: nvmf-autoconnect.service runs nvme connect-all at boot\n"
        f"--transport=tcp --traddr={names.NVME_ADDR} --trsvcid={names.NVME_PORT} --tls\n"
    )


def install_units() -> None:
    sbin = Path("/usr/local/sbin")
    sbin.mkdir(parents=True, exist_ok=True)
    target = sbin / "ktlsd-testbed-nvmet"
    shutil.copyfile(HERE / "ktlsd-testbed-nvmet", target)
    target.chmod(0o755)
    for unit in sorted(UNITS.glob("*.service")):
        shutil.copyfile(unit, SYSTEMD_DIR / unit.name)
    run(["systemctl", "enable", *(u.name for u in sorted(UNITS.glob("*.service")))])


def main() -> int:
    results = Path(sys.argv[1] if len(sys.argv) > 1 else "/results")
    boots = count_boot()
    phase = names.PHASES.get(boots)
    if phase is None:
        message = f"boot {boots} of one run: refusing (a guest reboots twice at most)"
        log(message)
        (results / "systemd-guard.txt").write_text(message + "\n")
        return 1
    (names.STATE_DIR / "phase").write_text(phase + "\n")
    log(f"boot {boots}: phase {phase}")
    if boots == 1:
        make_pki()
        write_agent_conf()
        write_nfs()
        write_nvme()
        install_units()
        os.sync()
        log("configured: fstab NFS mount, NVMe target + autoconnect, tlshd.service enabled")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as exc:  # PID 1 powers off on failure: say why on the console
        log(f"FAILED: {type(exc).__name__}: {exc}")
        sys.exit(1)
