"""nvme-keys: TLS PSKs made by ``ktlsd nvme`` work with the kernel's nvme host and nvmet.

Issue 6's VM acceptance, part 1. Four subsystems on one TLS-required nvmet port (the setup of
:mod:`nvme_tls`), each with its own retained PSK so the key the kernel picks is unambiguous:

====  =======================================  ======  ======  ========
 #    made by                                  hash    HKDF    identity
====  =======================================  ======  ======  ========
 1    ``ktlsd nvme gen-tls-key --insert``      SHA-256 spec    v0
 2    ``ktlsd nvme gen-tls-key --insert``      SHA-384 compat  v1
 3    ``ktlsd nvme check-tls-key --insert``    SHA-384 spec    v1
 4    ``ktlsd nvme check-tls-key --insert``    SHA-256 compat  v0
====  =======================================  ======  ======  ========

ktlsd serves both ends' handshakes (``common.start_agent("ktlsd")``). For each: ``nvme
connect --tls``, the controller's ``tls_key`` is the serial ktlsd printed, 1 MiB O_DIRECT
write + read-back byte-exact, disconnect. Then the guest's nvme-cli (2.13: derives like
``--compat``) is given the same key data: ``check-tls-key`` must print the same identity as
ktlsd with ``--compat``, and ``check-tls-key --insert`` must land on the same key (same
serial: same description) with the same TLS PSK (compared with hmac.compare_digest).

Key material never reaches the log: commands carrying it are echoed with ``<redacted>``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import shlex
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
from testbed.scenarios.nvme_tls import controller_for, find_block_device, setup_target

PORT_ID, TRSVCID = "5", "4425"
DATA_BYTES = 1024 * 1024
KTLSD = ["ktlsd", "nvme"]  # run in-process by quiet()
#: (label, tool, hmac, compat, identity version)
CASES = (
    ("gen-sha256-spec-v0", "gen-tls-key", 1, False, 0),
    ("gen-sha384-compat-v1", "gen-tls-key", 2, True, 1),
    ("check-sha384-spec-v1", "check-tls-key", 2, False, 1),
    ("check-sha256-compat-v0", "check-tls-key", 1, True, 0),
)


def quiet(argv: list[str], secrets: tuple[str, ...] = (), timeout: float = 60) -> tuple[int, str]:
    """Run ``argv``; echo it with ``secrets`` redacted; return (exit, stdout) unlogged.

    ``ktlsd nvme ...`` runs in this process (a new python costs seconds under TCG), through
    the same argparse registry as ``python3 -m ktlsd``.
    """
    shown = [("<redacted>" if a in secrets else a) for a in argv]
    print(f"$ {shlex.join(shown)} (output withheld)", flush=True)
    if argv[: len(KTLSD)] == KTLSD:
        rc, out, err = ktlsd_nvme(argv[len(KTLSD) :])
    else:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    if rc != 0:
        last = err.strip().splitlines()[-1:] or [""]
        print(f"exit {rc}: {last[0]}", flush=True)
    return rc, out


def ktlsd_nvme(argv: list[str]) -> tuple[int, str, str]:
    """``ktlsd nvme ARGV`` in-process: (exit status, stdout, stderr)."""
    import argparse
    import contextlib
    import io

    from ktlsd.nvme import cli as nvme_cli

    parser = argparse.ArgumentParser(prog="ktlsd")
    nvme_cli.register(parser.add_subparsers())
    args = parser.parse_args(["nvme", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = int(args.func(args))
    return rc, out.getvalue(), err.getvalue()


def inserted_serial(rc: int, out: str) -> int:
    """The serial from ``Inserted TLS key <hex>`` (nvme-cli may print it with ``0x``)."""
    m = re.search(r"Inserted TLS key (?:0x)?([0-9a-fA-F]+)", out)
    return int(m.group(1), 16) if rc == 0 and m else 0


def io_roundtrip(device: Path) -> bool:
    import mmap

    data = os.urandom(DATA_BYTES)
    buf = mmap.mmap(-1, DATA_BYTES)
    buf.write(data)
    fd = os.open(device, os.O_RDWR | os.O_DIRECT)
    try:
        if os.pwrite(fd, buf, 0) != DATA_BYTES:
            raise ScenarioFailed(f"short O_DIRECT write to {device}")
        os.fsync(fd)
        buf.seek(0)
        buf.write(bytes(DATA_BYTES))
        if os.preadv(fd, [buf], 0) != DATA_BYTES:
            raise ScenarioFailed(f"short O_DIRECT read from {device}")
        return hashlib.sha256(buf[:]).digest() == hashlib.sha256(data).digest()
    finally:
        os.close(fd)
        buf.close()


def main() -> None:
    with Scenario() as sc:
        from ktlsd import keyring

        modprobe(sc, "tls", "nvme-keyring", "nvmet", "nvmet-tcp", "nvme-tcp", "nvme-fabrics")
        if not Path("/dev/ram0").exists():
            sc.sh(["modprobe", "brd", "rd_nr=8", "rd_size=32768"])
        hostnqn = Path("/etc/nvme/hostnqn").read_text().strip()
        subsystems = {
            f"nqn.2026-11.io.ktlsd:nvme-keys-{label}": f"/dev/ram{4 + i}"
            for i, (label, *_rest) in enumerate(CASES)
        }
        ring = keyring.find_keyring(".nvme")
        # Possess .nvme (as nvme-cli does) so the inserted keys' payloads can be compared.
        keyring.link_key(ring, keyring.KEY_SPEC_SESSION_KEYRING)
        keys: dict[str, tuple[str, int]] = {}
        for (label, tool, hmac_id, compat, version), subnqn in zip(CASES, subsystems, strict=True):
            common = [f"--hostnqn={hostnqn}", f"--subsysnqn={subnqn}", f"--identity={version}"]
            common += ["--insert"] + (["--compat"] if compat else [])
            if tool == "gen-tls-key":
                rc, out = quiet([*KTLSD, "gen-tls-key", f"--hmac={hmac_id}", *common])
                keydata = next((ln for ln in out.split() if ln.startswith("NVMeTLSkey-1:")), "")
            else:
                rc, out = quiet([*KTLSD, "gen-tls-key", f"--hmac={hmac_id}"])
                keydata = out.strip()
                sc.check(
                    rc == 0 and keydata.startswith(f"NVMeTLSkey-1:0{hmac_id}:"),
                    f"{label}: gen-tls-key made a {hmac_id} key",
                )
                rc, out = quiet(
                    [*KTLSD, "check-tls-key", f"--keydata={keydata}", *common],
                    secrets=(f"--keydata={keydata}",),
                )
            serial = inserted_serial(rc, out)
            sc.check(
                serial != 0 and keydata != "",
                f"{label}: ktlsd nvme {tool} --insert printed the inserted key",
            )
            desc = keyring.describe_key(serial)
            kind = "R"
            want = f"NVMe{version}{kind}0{hmac_id} {hostnqn} {subnqn}"
            sc.check(
                desc.type == "psk" and desc.description.startswith(want),
                f"{label}: key {serial:08x} is a psk named {want}...",
            )
            keys[label] = (keydata, serial)
        setup_target(sc, hostnqn, subsystems, PORT_ID, TRSVCID)
        conf = write_tlshd_conf(Path("/tmp/ktlsd-nvme-keys.conf"), keyrings=".nvme")
        agent = start_agent(sc, "ktlsd", conf, "nvme-keys")
        connects: dict[str, float] = {}
        verified = 0
        for (label, *_r), subnqn in zip(CASES, subsystems, strict=True):
            t0 = time.monotonic()
            sc.sh(
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
                    subnqn,
                    f"--hostnqn={hostnqn}",
                    "--tls",
                ],
                timeout=60,
            )
            connects[label] = round(time.monotonic() - t0, 2)
            dev = find_block_device(subnqn)
            ctrl = controller_for(subnqn)
            if ctrl is not None and (ctrl / "tls_key").exists():
                used = int((ctrl / "tls_key").read_text().strip(), 16)
                sc.check(used == keys[label][1], f"{label}: controller uses key {used:08x}")
            sc.check(io_roundtrip(dev), f"{label}: 1 MiB O_DIRECT read-back byte-exact over TLS")
            verified += 2 * DATA_BYTES
            sc.sh(["nvme", "disconnect", "-n", subnqn], timeout=30)
        sc.figure("connect_seconds", connects)
        sc.figure("bytes_verified", verified)
        handshakes = len(agent.successful_handshakes())
        sc.figure("agent_handshakes", handshakes)
        sc.check(handshakes >= 2 * len(CASES), f"agent logged {handshakes} successful handshakes")

        # nvme-cli 2.13 for the same inputs (it derives like --compat).
        comparison: dict[str, str] = {}
        for (label, _tool, _h, compat, version), subnqn in zip(CASES, subsystems, strict=True):
            keydata, serial = keys[label]
            secret = (f"--keydata={keydata}",)
            base = [
                "check-tls-key",
                f"--keydata={keydata}",
                f"--hostnqn={hostnqn}",
                f"--subsysnqn={subnqn}",
                f"--identity={version}",
            ]
            rc_t, theirs = quiet(["nvme", *base], secrets=secret)
            rc_c, ours_compat = quiet([*KTLSD, *base, "--compat"], secrets=secret)
            rc_s, ours_spec = quiet([*KTLSD, *base], secrets=secret)
            same_compat = rc_t == rc_c == 0 and theirs == ours_compat
            same_spec = rc_t == rc_s == 0 and theirs == ours_spec
            comparison[f"{label} identity"] = (
                f"compat {'same' if same_compat else 'DIFFERENT'}, "
                f"spec {'same' if same_spec else 'different'}"
            )
            sc.check(same_compat, f"{label}: nvme-cli check-tls-key == ktlsd --compat")
            sc.detail(f"{label}: nvme-cli identity {theirs.strip()!r}")
            if not compat:
                continue
            # Same inputs, --insert by nvme-cli: the same description and TLS PSK.
            ours_psk = keyring.read_key(serial)
            ours_desc = keyring.describe_key(serial).description
            rc, out = quiet(["nvme", *base, "--insert"], secrets=secret)
            theirs_serial = inserted_serial(rc, out)
            theirs_psk = keyring.read_key(theirs_serial) if theirs_serial else b""
            theirs_desc = keyring.describe_key(theirs_serial) if theirs_serial else None
            same_desc = theirs_desc is not None and theirs_desc.description == ours_desc
            same_psk = hmac.compare_digest(ours_psk, theirs_psk)
            # Same serial means nvme-cli's add_key updated our key in place; a new serial
            # (with the same description) means the kernel made a new key and relinked it.
            comparison[f"{label} insert"] = (
                f"{'same' if same_desc else 'DIFFERENT'} description, "
                f"{'same' if same_psk else 'DIFFERENT'} TLS PSK, "
                f"{'same key' if theirs_serial == serial else 'new key'} "
                f"({serial:08x} -> {theirs_serial:08x})"
            )
            sc.detail(f"{label}: nvme-cli --insert: {comparison[f'{label} insert']}")
            sc.check(
                same_desc and same_psk,
                f"{label}: nvme-cli --insert makes the same key (description and TLS PSK)",
            )
        sc.figure("nvme_cli_comparison", comparison)
        sc.detail(sc.sh(["nvme", "version"]).stdout.strip().splitlines()[0])


if __name__ == "__main__":
    main()
