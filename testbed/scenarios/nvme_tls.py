"""nvme-tls-AGENT: NVMe/TCP with TLS 1.3 PSK over loopback, both ends served by AGENT.

Proves: the kernel nvmet target (brd-backed namespaces, TLS required on the port) and the
kernel nvme host (``nvme connect --tls``) complete their TLS handshakes through the agent's
netlink upcalls, for a retained PSK of each hash (SHA-256 and SHA-384, each bound to its own
subsystem so the key in use is unambiguous), keys made and inserted into ``.nvme`` by
nvme-cli; 16 MiB of random data written with O_DIRECT through the TLS connection reads back
byte-exact, and is also found on the target's ram disk (so it really crossed the wire);
disconnect is clean. Figures: connect time per key, throughput, bytes verified, handshakes
seen in the agent's log, kTLS session counters, and per key what was *negotiated*, read off
the wire (tls_wire.Capture on ``lo``): suite, binder size and hash. tlshd 1.0 on GnuTLS 3.8.9
binds a SHA-384 PSK to SHA-256 (32-byte binder, a SHA-256 suite); the ``sha384`` figures then
say so (``negotiated_sha384``, ``label_sha384``), and the side-by-side comparison in the
report marks the pair as not comparable.

AGENT comes from the environment (``tlshd`` or ``ktlsd``); NQNs carry the agent's name so
both variants can run in one boot.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import (
    Scenario,
    ScenarioFailed,
    modprobe,
    start_agent,
    tls_stat,
    write_tlshd_conf,
)
from testbed.scenarios.tls_wire import Capture, describe, legacy_binding, suite_hash

NVMET = Path("/sys/kernel/config/nvmet")
DATA_BYTES = 16 * 1024 * 1024
CHUNK = 1024 * 1024
HMACS = (("sha256", 1), ("sha384", 2))
PORT_ID = {"tlshd": "1", "ktlsd": "2"}
TRSVCID = {"tlshd": "4420", "ktlsd": "4421"}


def write_attr(path: Path, value: str) -> None:
    path.write_text(value + "\n")


def setup_target(sc: Scenario, hostnqn: str, subsystems: dict[str, str], port: str, svc: str):
    """Configure nvmet via configfs; register a teardown that undoes it in reverse."""
    host = NVMET / "hosts" / hostnqn
    host.mkdir(exist_ok=True)
    made: list[Path] = []
    links: list[Path] = []
    for subnqn, device in subsystems.items():
        sub = NVMET / "subsystems" / subnqn
        sub.mkdir()
        made.append(sub)
        write_attr(sub / "attr_allow_any_host", "0")
        link = sub / "allowed_hosts" / hostnqn
        link.symlink_to(host)
        links.append(link)
        ns = sub / "namespaces" / "1"
        ns.mkdir()
        made.append(ns)
        write_attr(ns / "device_path", device)
        write_attr(ns / "enable", "1")
    p = NVMET / "ports" / port
    p.mkdir()
    made.append(p)
    # trtype must be set before tsas: tsas=tls1.3 is only valid on a tcp port, and it
    # implies treq=required (plain TCP connects are refused).
    write_attr(p / "addr_trtype", "tcp")
    write_attr(p / "addr_adrfam", "ipv4")
    write_attr(p / "addr_traddr", "127.0.0.1")
    write_attr(p / "addr_trsvcid", svc)
    write_attr(p / "addr_tsas", "tls1.3")
    sc.detail(f"port {port}: treq={(p / 'addr_treq').read_text().strip()}")
    for subnqn in subsystems:  # linking the subsystem to the port enables it: do it last
        link = p / "subsystems" / subnqn
        link.symlink_to(NVMET / "subsystems" / subnqn)
        links.append(link)

    def teardown() -> None:
        for lk in reversed(links):
            lk.unlink(missing_ok=True)
        for d in reversed(made):
            if d.name == "1" and d.parent.name == "namespaces":
                write_attr(d / "enable", "0")
            d.rmdir()
        host.rmdir()

    sc.cleanup(teardown, "nvmet teardown")


def gen_key(sc: Scenario, hostnqn: str, subnqn: str, hmac: int) -> int | None:
    """``nvme gen-tls-key --insert``: a retained PSK into .nvme; returns its serial if shown."""
    out = sc.sh(
        ["nvme", "gen-tls-key", f"--hostnqn={hostnqn}", f"--subsysnqn={subnqn}",
         f"--hmac={hmac}", "--insert"],
        secret_output=True,
    )  # fmt: skip
    # The printed interchange key is a secret: keep only the serial, never the key text.
    m = re.search(r"Inserted TLS key ([0-9a-fA-F]+)", out.stdout + out.stderr)
    return int(m.group(1), 16) if m else None


def find_block_device(subnqn: str, timeout: float = 15.0) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for blk in sorted(Path("/sys/block").glob("nvme*n*")):
            # nvmeXcYnZ are hidden per-path nodes under native multipath: no /dev entry.
            if not re.fullmatch(r"nvme\d+n\d+", blk.name):
                continue
            nqn = (blk / "device").resolve() / "subsysnqn"
            if nqn.exists() and nqn.read_text().strip() == subnqn:
                return Path("/dev") / blk.name
        time.sleep(0.1)
    raise ScenarioFailed(f"no block device for {subnqn} after {timeout:.0f} s")


def controller_for(subnqn: str) -> Path | None:
    for ctrl in Path("/sys/class/nvme").glob("nvme*"):
        f = ctrl / "subsysnqn"
        if f.exists() and f.read_text().strip() == subnqn:
            return ctrl
    return None


def direct_io(device: Path, data: bytes | None) -> tuple[bytes, float]:
    """O_DIRECT write (if ``data``) or read of DATA_BYTES; returns (bytes read, seconds)."""
    buf = mmap.mmap(-1, CHUNK)  # page-aligned, as O_DIRECT requires
    flags = os.O_DIRECT | (os.O_WRONLY if data is not None else os.O_RDONLY)
    fd = os.open(device, flags)
    out = bytearray()
    started = time.monotonic()
    try:
        for off in range(0, DATA_BYTES, CHUNK):
            if data is not None:
                buf.seek(0)
                buf.write(data[off : off + CHUNK])
                if os.pwrite(fd, buf, off) != CHUNK:
                    raise ScenarioFailed(f"short O_DIRECT write at {off}")
            else:
                if os.preadv(fd, [buf], off) != CHUNK:
                    raise ScenarioFailed(f"short O_DIRECT read at {off}")
                out += buf[:]
        if data is not None:
            os.fsync(fd)
    finally:
        os.close(fd)
        buf.close()
    return bytes(out), time.monotonic() - started


def label_negotiated(
    sc: Scenario, agent: str, label: str, summaries: list[dict[str, object]]
) -> None:
    """Record what the connect's TLS handshakes negotiated, labelled for what it is."""
    sc.figure(f"wire_{label}", describe(summaries))
    sc.check(len(summaries) >= 2, f"{label}: the TLS hellos of admin and I/O queues seen on lo")
    first = summaries[0]
    sc.figure(
        f"negotiated_{label}",
        {k: first.get(k) for k in ("suite", "binder_bytes", "binder_hash", "psk_hash")},
    )
    for s in summaries:
        suite = str(s.get("suite"))
        sc.check(
            s.get("binder_hash") == suite_hash(suite),
            f"{label}: binder hash {s.get('binder_hash')} is the suite's ({suite})",
        )
    if any(legacy_binding(s) for s in summaries):
        sc.figure(
            f"label_{label}",
            f"SHA-384 PSK bound to SHA-256 by {agent} (32-byte binder): ran {first.get('suite')}, "
            "not a SHA-384 suite -- tlshd 1.0 on GnuTLS < 3.8.11 cannot use a SHA-384 PSK as such",
        )
    else:
        sc.figure(f"label_{label}", f"{first.get('suite')}, {first.get('binder_hash')} binder")
    if agent == "ktlsd":  # ktlsd with itself is spec-correct for both hashes
        sc.check(
            all(s.get("psk_hash") == s.get("binder_hash") for s in summaries),
            f"{label}: ktlsd bound the PSK to its own hash",
        )


def main() -> None:
    with Scenario() as sc:
        agent = sc.agent
        modprobe(sc, "tls", "nvme-keyring", "nvmet", "nvmet-tcp", "nvme-tcp", "nvme-fabrics")
        if not Path("/dev/ram0").exists():
            sc.sh(["modprobe", "brd", "rd_nr=8", f"rd_size={DATA_BYTES * 2 // 1024}"])
        hostnqn = Path("/etc/nvme/hostnqn").read_text().strip()
        base = 0 if agent == "tlshd" else 2
        subsystems = {
            f"nqn.2026-11.io.ktlsd:testbed-{agent}-{label}": f"/dev/ram{base + i}"
            for i, (label, _h) in enumerate(HMACS)
        }
        serials = {}
        for (label, hmac), subnqn in zip(HMACS, subsystems, strict=True):
            serials[label] = gen_key(sc, hostnqn, subnqn, hmac)
        sc.figure("psk_serials_found", {k: v is not None for k, v in serials.items()})
        setup_target(sc, hostnqn, subsystems, PORT_ID[agent], TRSVCID[agent])

        conf = write_tlshd_conf(Path(f"/tmp/{agent}-nvme.conf"), keyrings=".nvme")
        handle = start_agent(sc, agent, conf, "nvme")
        stat_before = tls_stat()
        verified = 0
        for (label, _hmac), (subnqn, ramdev) in zip(HMACS, subsystems.items(), strict=True):
            with Capture("lo", {int(TRSVCID[agent])}) as cap:
                t0 = time.monotonic()
                sc.sh(
                    ["nvme", "connect", "-t", "tcp", "-a", "127.0.0.1", "-s", TRSVCID[agent],
                     "-n", subnqn, f"--hostnqn={hostnqn}", "--tls"],
                    timeout=60,
                )  # fmt: skip
                connect_s = time.monotonic() - t0
            label_negotiated(sc, agent, label, cap.summaries())
            dev = find_block_device(subnqn)
            sc.figure(f"connect_seconds_{label}", round(connect_s, 3))
            ctrl = controller_for(subnqn)
            if ctrl is not None and (ctrl / "tls_key").exists() and serials[label]:
                used = int((ctrl / "tls_key").read_text().strip(), 16)
                sc.check(used == serials[label], f"{label}: controller uses the inserted PSK")
            data = os.urandom(DATA_BYTES)
            _, w_s = direct_io(dev, data)
            back, r_s = direct_io(dev, None)
            sc.check(
                hashlib.sha256(back).digest() == hashlib.sha256(data).digest(),
                f"{label}: 16 MiB O_DIRECT read-back over NVMe/TCP+TLS matches",
            )
            on_target, _ = direct_io(Path(ramdev), None)
            sc.check(on_target == data, f"{label}: the data is on the target's {ramdev}")
            verified += 2 * DATA_BYTES
            sc.figure(f"write_MBps_{label}", round(DATA_BYTES / w_s / 1e6, 1))
            sc.figure(f"read_MBps_{label}", round(DATA_BYTES / r_s / 1e6, 1))
            out = sc.sh(["nvme", "disconnect", "-n", subnqn]).stdout
            sc.check("disconnected 1 controller" in out, f"{label}: disconnect is clean")
        sc.figure("bytes_verified", verified)
        stat_after = tls_stat()
        sc.figure(
            "tls_stat_delta",
            {k: stat_after[k] - stat_before.get(k, 0) for k in ("TlsTxSw", "TlsRxSw")
             if k in stat_after},
        )  # fmt: skip
        time.sleep(0.2)
        ok_lines = handle.successful_handshakes()
        sc.figure("agent_successful_handshakes_logged", len(ok_lines))
        sc.check(len(ok_lines) >= 4, "the agent logged the handshakes (both ends, both keys)")


if __name__ == "__main__":
    main()
