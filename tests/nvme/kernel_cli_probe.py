"""Guest-side probe: ``ktlsd nvme`` against the guest's nvme-cli and the kernel's ``.nvme``.

Not a pytest module (it needs the nvme-keyring module, i.e. the VM test bed). For fixed
keys and NQNs it runs nvme-cli and ktlsd side by side and compares:

* ``gen-tls-key -s``, ``gen-dhchap-key`` and ``check-tls-key`` (identity) output; nvme-cli
  older than 2.16 derives with the pre-1.16 libnvme label, so ktlsd runs with ``--compat``
  for it (and the spec variant is recorded as differing);
* ``check-tls-key --insert`` into ``.nvme`` with key type ``psk``: the key nvme-cli inserted
  and the one ktlsd inserted must have the same description and the same TLS PSK.

Usage: ``python3 kernel_cli_probe.py RESULT.json``; exit status 0 when everything matched.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ktlsd import keyring
from ktlsd.nvme import cli as nvme_cli

HOST = "nqn.2014-08.org.nvmexpress:uuid:3d2c1b0a-ktlsd-cli-probe"
SUBSYS = "nqn.2026-01.io.ktlsd:cli-probe"
K32 = "5512DBB6737D0106F65975B773DFB011FFC344BCF442E2DD6D8BC4870B5D5B03"
K48 = K32 + "FFC344BCF442E2DD6D8BC4870B5D5B03"


def ktlsd_nvme(*argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="ktlsd")
    nvme_cli.register(parser.add_subparsers())
    args = parser.parse_args(["nvme", *argv])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = args.func(args)
    return rc, out.getvalue(), err.getvalue()


def nvme(*argv: str) -> tuple[int, str, str]:
    proc = subprocess.run(["nvme", *argv], capture_output=True, text=True, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def nvme_cli_version() -> tuple[int, ...]:
    out = nvme("version")[1]
    m = re.search(r"nvme version (\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def main() -> int:
    out_path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/results/cli-probe.out")
    checks: list[dict[str, object]] = []
    info: dict[str, object] = {}
    try:
        subprocess.run(["modprobe", "nvme-keyring"], check=False)
        subprocess.run(["modprobe", "nvme-tcp"], check=False)
        version = nvme_cli_version()
        info["nvme_cli"] = nvme("version")[1].strip()
        compat = ["-C"] if version < (2, 16) else []
        info["ktlsd_variant_used"] = "compat" if compat else "spec"

        def compare(name: str, theirs: list[str], ours: list[str]) -> None:
            t, o = nvme(*theirs), ktlsd_nvme(*ours)
            checks.append(
                {
                    "check": name,
                    "nvme_cli": t[1].strip() or t[2].strip(),
                    "ktlsd": o[1].strip() or o[2].strip(),
                    "passed": t[0] == 0 and o[0] == 0 and t[1] == o[1],
                }
            )

        compare("gen-tls-key 32", ["gen-tls-key", "-s", K32], ["gen-tls-key", "-s", K32])
        compare(
            "gen-tls-key 48",
            ["gen-tls-key", "-s", K48, "-m", "2"],
            ["gen-tls-key", "-s", K48, "-m", "2"],
        )
        for hmac_id in (0, 1, 3):
            argv = [
                "gen-dhchap-key",
                "-s",
                K32 + K32 if hmac_id == 3 else K32,
                "-m",
                str(hmac_id),
                "-n",
                HOST,
            ]
            compare(f"gen-dhchap-key hmac {hmac_id}", argv, argv)
        keys = {
            "01": ktlsd_nvme("gen-tls-key", "-s", K32)[1].strip(),
            "02": ktlsd_nvme("gen-tls-key", "-s", K48, "-m", "2")[1].strip(),
        }
        for hh, key in keys.items():
            for ident in ("0", "1"):
                base = ["check-tls-key", "-d", key, "-n", HOST, "-c", SUBSYS, "-I", ident]
                compare(f"check-tls-key {hh} v{ident}", base, base + compat)
                if compat:  # record that the spec derivation really differs (v1 only)
                    spec = ktlsd_nvme(*base)[1].strip()
                    info[f"spec_identity_{hh}_v{ident}"] = spec
        ring = keyring.find_keyring(".nvme")
        info["nvme_keyring"] = f"{ring:08x}"
        # Possess .nvme (as nvme-cli does) so that we may read the keys nvme-cli inserts.
        keyring.link_key(ring, keyring.KEY_SPEC_SESSION_KEYRING)
        for hh, key in keys.items():
            for ident in ("0", "1"):
                base = [
                    "check-tls-key",
                    "-d",
                    key,
                    "-n",
                    HOST,
                    "-c",
                    SUBSYS,
                    "-I",
                    ident,
                    "--insert",
                ]
                rc, out, err = nvme(*base)
                theirs_serial = int(out.split()[-1], 16) if rc == 0 else 0
                theirs = keyring.read_key(theirs_serial) if theirs_serial else b""
                theirs_desc = (
                    keyring.describe_key(theirs_serial).description if theirs_serial else ""
                )
                rc2, out2, err2 = ktlsd_nvme(*base, *compat)
                ours_serial = int(out2.split()[-1], 16) if rc2 == 0 else 0
                ours = keyring.read_key(ours_serial) if ours_serial else b""
                ours_info = keyring.describe_key(ours_serial) if ours_serial else None
                checks.append(
                    {
                        "check": f"insert {hh} v{ident}",
                        "nvme_cli": out.strip() or err.strip(),
                        "ktlsd": out2.strip() or err2.strip(),
                        "description": theirs_desc,
                        "key_type": ours_info.type if ours_info else None,
                        "passed": bool(theirs)
                        and theirs == ours
                        and ours_info is not None
                        and ours_info.type == "psk"
                        and ours_info.description == theirs_desc,
                    }
                )
    except Exception:
        checks.append({"check": "probe", "error": traceback.format_exc(), "passed": False})
    passed = bool(checks) and all(c["passed"] for c in checks)
    report = {"passed": passed, "info": info, "checks": checks}
    out_path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
