"""nvme-concat: kernel ``nvme connect --concat`` (secure channel concatenation), ktlsd as agent.

Issue 6's VM acceptance, part 2. nvmet is configured for DH-HMAC-CHAP (configfs host entry:
``dhchap_key`` made by ``ktlsd nvme gen-dhchap-key``, ``dhchap_hash`` hmac(sha256),
``dhchap_dhgroup`` ffdhe2048 -- concatenation needs a DH group) on a port that *allows* TLS
without requiring it (``addr_tsas=tls1.3`` then ``addr_treq="not required"``): the host's
first admin connection is plain TCP, authenticates with sc_c=NEWTLSPSK, both ends derive the
generated PSK and insert a ``NVMe1G01 <hostnqn> <subnqn> <digest>`` key into ``.nvme``, and
the host reconnects with TLS using it. Both ends' TLS handshakes are upcalls that ktlsd
serves (``common.start_agent("ktlsd")``).

Proves: connect succeeds, 1 MiB O_DIRECT read-back byte-exact, the agent logged successful
handshakes with an ``NVMe1G`` identity, the key is in ``.nvme``. Then what the kernel lets us
trigger is tried and reported: a second ``nvme connect --concat`` after a disconnect (a fresh
NEWTLSPSK and handshakes with the new generated key), and re-authentication of the live
controller by writing its ``dhchap_secret`` sysfs attribute (REPLACETLSPSK on a TLS queue),
recorded with the kernel's messages whatever the outcome.

The DH-HMAC-CHAP secret is generated in the guest and never logged (commands carrying it are
echoed with ``<redacted>``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import Scenario, modprobe, start_agent, write_tlshd_conf
from testbed.scenarios.nvme_keys import KTLSD, io_roundtrip, quiet
from testbed.scenarios.nvme_tls import NVMET, controller_for, find_block_device, write_attr

PORT_ID, TRSVCID = "6", "4426"
SUBNQN = "nqn.2026-11.io.ktlsd:nvme-concat"
RAMDEV = "/dev/ram4"


def setup_target(sc: Scenario, hostnqn: str, secret: str) -> None:
    host = NVMET / "hosts" / hostnqn
    created = not host.exists()
    host.mkdir(exist_ok=True)
    write_attr(host / "dhchap_key", secret)
    write_attr(host / "dhchap_hash", "hmac(sha256)")
    write_attr(host / "dhchap_dhgroup", "ffdhe2048")
    sub = NVMET / "subsystems" / SUBNQN
    sub.mkdir()
    write_attr(sub / "attr_allow_any_host", "0")
    allowed = sub / "allowed_hosts" / hostnqn
    allowed.symlink_to(host)
    ns = sub / "namespaces" / "1"
    ns.mkdir()
    write_attr(ns / "device_path", RAMDEV)
    write_attr(ns / "enable", "1")
    port = NVMET / "ports" / PORT_ID
    port.mkdir()
    write_attr(port / "addr_trtype", "tcp")
    write_attr(port / "addr_adrfam", "ipv4")
    write_attr(port / "addr_traddr", "127.0.0.1")
    write_attr(port / "addr_trsvcid", TRSVCID)
    write_attr(port / "addr_tsas", "tls1.3")  # implies treq=required ...
    write_attr(port / "addr_treq", "not required")  # ... concat's first connection is plain
    sc.detail(
        f"port {PORT_ID}: tsas={(port / 'addr_tsas').read_text().strip()} "
        f"treq={(port / 'addr_treq').read_text().strip()}"
    )
    plink = port / "subsystems" / SUBNQN
    plink.symlink_to(sub)

    def teardown() -> None:
        plink.unlink(missing_ok=True)
        port.rmdir()
        write_attr(ns / "enable", "0")
        ns.rmdir()
        allowed.unlink(missing_ok=True)
        sub.rmdir()
        if created:
            host.rmdir()

    sc.cleanup(teardown, "nvmet teardown")


def generated_keys() -> list[int]:
    """Serials of the generated NVMe TLS keys for our subsystem (from ``/proc/keys``)."""
    lines = Path("/proc/keys").read_text().splitlines()
    return [int(ln.split()[0], 16) for ln in lines if "NVMe1G" in ln and SUBNQN in ln]


def kernel_messages(since: int) -> list[str]:
    out = subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines()
    return [ln for ln in out[since:] if "nvme" in ln.lower()]


def dmesg_length() -> int:
    return len(subprocess.run(["dmesg"], capture_output=True, text=True).stdout.splitlines())


def connect(sc: Scenario, hostnqn: str, secret: str, label: str) -> float:
    t0 = time.monotonic()
    mark = dmesg_length()
    rc, _ = quiet(
        [
            "nvme",
            "connect",
            "-t",
            "tcp",
            "-a",
            "127.0.0.1",
            "-s",
            TRSVCID,
            "-n",
            SUBNQN,
            f"--hostnqn={hostnqn}",
            f"--dhchap-secret={secret}",
            "--concat",
        ],
        secrets=(f"--dhchap-secret={secret}",),
    )
    seconds = round(time.monotonic() - t0, 2)
    if rc != 0:
        for line in kernel_messages(mark)[-8:]:
            sc.detail(f"dmesg: {line}")
    sc.check(rc == 0, f"{label}: nvme connect --concat succeeded (exit {rc})")
    return seconds


def main() -> None:
    with Scenario() as sc:
        modprobe(sc, "tls", "nvme-keyring", "nvmet", "nvmet-tcp", "nvme-tcp", "nvme-fabrics")
        if not Path("/dev/ram0").exists():
            sc.sh(["modprobe", "brd", "rd_nr=8", "rd_size=32768"])
        hostnqn = Path("/etc/nvme/hostnqn").read_text().strip()
        rc, out = quiet([*KTLSD, "gen-dhchap-key", "--hmac=1", f"--nqn={hostnqn}"])
        secret = out.strip()
        sc.check(
            rc == 0 and secret.startswith("DHHC-1:01:"),
            "ktlsd nvme gen-dhchap-key made a SHA-256 DHHC-1 secret",
        )
        setup_target(sc, hostnqn, secret)
        conf = write_tlshd_conf(Path("/tmp/ktlsd-nvme-concat.conf"), keyrings=".nvme")
        agent = start_agent(sc, "ktlsd", conf, "nvme-concat")

        sc.figure("connect_seconds", connect(sc, hostnqn, secret, "first connect"))
        dev = find_block_device(SUBNQN)
        sc.check(io_roundtrip(dev), "1 MiB O_DIRECT read-back byte-exact over the concat TLS")
        ctrl = controller_for(SUBNQN)
        attrs = {}
        if ctrl is not None:
            for name in ("tls_key", "tls_configured_key", "tls_keyring"):
                f = ctrl / name
                if f.exists():
                    attrs[name] = f.read_text().strip()
        sc.figure("controller_tls_attrs", attrs)
        keys = generated_keys()
        sc.figure("generated_keys_after_first_connect", len(keys))
        sc.check(bool(keys), "a NVMe1G key for the subsystem is in the keyring")
        ident = [ln for ln in agent.successful_handshakes() if "NVMe1G" in ln]
        sc.figure("agent_nvme1g_handshakes_first", len(ident))
        sc.check(len(ident) >= 2, f"agent logged {len(ident)} successful NVMe1G handshakes")
        if "tls_key" in attrs:
            used = int(attrs["tls_key"], 16)
            sc.check(
                used in keys,
                f"controller's tls_key {used:08x} is the generated key",
            )

        # Re-authentication of the live controller: REPLACETLSPSK on the TLS admin queue.
        reauth = "no dhchap_secret attribute"
        if ctrl is not None and (ctrl / "dhchap_secret").exists():
            mark = dmesg_length()
            before = set(generated_keys())
            before_hs = len(agent.successful_handshakes())
            try:
                (ctrl / "dhchap_secret").write_text(secret + "\n")
                time.sleep(3)
                msgs = kernel_messages(mark)
                after = set(generated_keys())
                key_now = (ctrl / "tls_key").read_text().strip() if "tls_key" in attrs else "?"
                reauth = (
                    f"written; new generated keys: {len(after - before)}; "
                    f"controller tls_key {attrs.get('tls_key')} -> {key_now}; "
                    f"kernel: {' | '.join(m.split('] ', 1)[-1] for m in msgs[-4:])}"
                )
            except OSError as exc:
                reauth = f"write refused: {exc.strerror}"
            sc.detail(f"re-authentication: {reauth}")
            sc.figure("reauth_handshakes", len(agent.successful_handshakes()) - before_hs)
            sc.check(io_roundtrip(dev), "I/O still byte-exact after the re-authentication")
        sc.figure("reauth", reauth)
        sc.sh(["nvme", "disconnect", "-n", SUBNQN], timeout=30)

        # A second connection: a fresh NEWTLSPSK, new generated key, new handshakes.
        before_hs = len(agent.successful_handshakes())
        sc.figure("reconnect_seconds", connect(sc, hostnqn, secret, "reconnect"))
        dev = find_block_device(SUBNQN)
        sc.check(io_roundtrip(dev), "1 MiB read-back byte-exact after the reconnect")
        new_hs = [ln for ln in agent.successful_handshakes()[before_hs:] if "NVMe1G" in ln]
        sc.figure("agent_nvme1g_handshakes_reconnect", len(new_hs))
        sc.check(len(new_hs) >= 2, "the reconnect's handshakes used a NVMe1G identity")
        sc.figure("generated_keys_at_end", len(generated_keys()))
        sc.sh(["nvme", "disconnect", "-n", SUBNQN], timeout=30)
        os.sync()


if __name__ == "__main__":
    main()
