"""``ktlsd nvme ...`` output against nvme-cli's (derived from libnvme's vectors and, where
the host has it, the real ``nvme`` binary), and its keyring steps against real keyrings."""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import stat
import subprocess
import sys
import uuid

import pytest

from ktlsd import keyring
from ktlsd.nvme import cli as nvme_cli
from ktlsd.nvme import keys as nvme_keys

K32 = "5512DBB6737D0106F65975B773DFB011FFC344BCF442E2DD6D8BC4870B5D5B03"
K48 = K32 + "FFC344BCF442E2DD6D8BC4870B5D5B03"
I32 = "NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:"
I48 = "NVMeTLSkey-1:02:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwP/w0S89ELi3W2LxIcLXVsDn8kXZQ==:"
HOST, SUBSYS = "nqn.psk-test-host", "nqn.psk-test-subsys"


def ktlsd_nvme(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="ktlsd")
    nvme_cli.register(parser.add_subparsers())
    args = parser.parse_args(["nvme", *argv])
    return args.func(args)


@pytest.fixture
def ring(ring: int) -> str:
    """The shared ``ring`` fixture's keyring, by name (as the command line takes it)."""
    return keyring.describe_key(ring).description


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["gen-tls-key", "-s", K32], I32 + "\n"),
        (["gen-tls-key", "--secret", K48, "--hmac", "2"], I48 + "\n"),
        (
            ["check-tls-key", "-d", I32, "-n", HOST, "-c", SUBSYS, "-I", "1"],
            "NVMe1R01 nqn.psk-test-host nqn.psk-test-subsys "
            "iSbjiStwJ/1TrTvDlt2fjFmzvsytOJelidNnA+X5lEU=\n",
        ),
        (
            [
                "check-tls-key",
                "--keydata",
                I32,
                "--hostnqn",
                HOST,
                "--subsysnqn",
                SUBSYS,
                "--identity",
                "1",
                "--compat",
            ],
            "NVMe1R01 nqn.psk-test-host nqn.psk-test-subsys "
            "66GuqV08TsAGII39teWUfwQwizjv06Jy8jOcX3NAAzM=\n",
        ),
        (
            ["check-tls-key", "-d", I48, "-n", HOST, "-c", SUBSYS, "-I", "1"],
            "NVMe1R02 nqn.psk-test-host nqn.psk-test-subsys "
            "QhW2+Rp6RzHlNtCslyRxMnwJ11tKKhz8JCAQpQ+XUD8f9td1VeH5h53yz2wKJG1a\n",
        ),
        (
            ["check-tls-key", "-d", I48, "-n", HOST, "-c", SUBSYS, "-I", "1", "-C"],
            "NVMe1R02 nqn.psk-test-host nqn.psk-test-subsys "
            "RsKmYJ3nAn1ApjjMloJFbAkLPivONDAX/xW327YBUsn2eGShXSjCZvBaOxscLqmz\n",
        ),
        (["check-tls-key", "-d", I32, "-n", HOST, "-c", SUBSYS], f"NVMe0R01 {HOST} {SUBSYS}\n"),
        (
            ["gen-dhchap-key", "-s", K32, "-n", "nqn.host"],
            "DHHC-1:00:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:\n",
        ),
        (
            ["gen-dhchap-key", "--secret", K32, "--hmac", "1", "--nqn", "nqn.host"],
            "DHHC-1:01:su0Fo4HvTrpQ+/Oju+03XT9EUBNarHzI5o+9IYV/GNi43RAE:\n",
        ),
        (
            ["gen-dhchap-key", "-s", K48, "-m", "2", "-n", "nqn.host"],
            "DHHC-1:02:V4dPgmj53Sdjm34xoyj4qkQTOzO0ccTXIkDFeOBU1Q6IE/exF4iunmeWGJqjoPVXgSu8Ww==:\n",
        ),
        (
            ["gen-dhchap-key", "-s", K32 + K32, "-m", "3", "-n", "nqn.host"],
            "DHHC-1:03:E20v7ns4xCYyK1TR51/x3YgG8K2BJA27XRG1hOVp+CxHJQYE80UJYsYJZGEHtzbLCom7M"
            "yzYC8Afoj0QhdBz5fBNOwo=:\n",
        ),
        (
            [
                "check-dhchap-key",
                "-k",
                "DHHC-1:00:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:",
            ],
            "Key is valid (HMAC 0, length 32, CRC d9baf45f)\n",
        ),
    ],
)
def test_output_matches_nvme_cli(argv: list[str], expected: str, capsys) -> None:
    # The gen-dhchap-key/check-dhchap-key lines were produced by nvme-cli 2.3 (Debian 12)
    # and agree with 2.16's code; the TLS lines are libnvme's test/psk.c vectors, which is
    # what nvme-cli 2.16 prints for these inputs.
    assert ktlsd_nvme(*argv) == 0
    out = capsys.readouterr()
    assert out.out == expected
    assert out.err == ""


NVME = shutil.which("nvme")


@pytest.mark.skipif(NVME is None, reason="nvme-cli not installed")
@pytest.mark.parametrize(
    "argv",
    [
        ["gen-dhchap-key", "-s", K32, "-n", "nqn.2014-08.org.nvmexpress:uuid:abc"],
        ["gen-dhchap-key", "-s", K32, "-m", "1", "-n", "nqn.x"],
        ["gen-dhchap-key", "-s", K48, "-m", "2", "-n", "nqn.x"],
        ["gen-dhchap-key", "-s", K48, "-l", "48", "-n", "nqn.x"],
        ["check-dhchap-key", "-k", "DHHC-1:01:su0Fo4HvTrpQ+/Oju+03XT9EUBNarHzI5o+9IYV/GNi43RAE:"],
    ],
)
def test_same_output_as_installed_nvme_cli(argv: list[str], capsys) -> None:
    theirs = subprocess.run([NVME, *argv], capture_output=True, text=True, check=True).stdout
    assert ktlsd_nvme(*argv) == 0
    assert capsys.readouterr().out == theirs


def test_random_keys_are_valid(capsys) -> None:
    assert ktlsd_nvme("gen-tls-key", "-m", "2") == 0
    key = nvme_keys.parse_interchange(capsys.readouterr().out)
    assert key.hash_id == 2 and len(key.key) == 48
    assert ktlsd_nvme("gen-dhchap-key", "-m", "3", "-n", "nqn.h") == 0
    assert capsys.readouterr().out.startswith("DHHC-1:03:")


def test_excess_secret_bytes_are_skipped(capsys) -> None:
    assert ktlsd_nvme("gen-tls-key", "-s", K48) == 0
    out = capsys.readouterr()
    assert out.out == I32 + "\n"
    assert out.err == "Skipping excess secret bytes\n"


def test_hostnqn_from_environment(monkeypatch, capsys) -> None:
    monkeypatch.setenv("LIBNVME_HOSTNQN", HOST)
    assert ktlsd_nvme("check-tls-key", "-d", I32, "-c", SUBSYS) == 0
    assert capsys.readouterr().out == f"NVMe0R01 {HOST} {SUBSYS}\n"
    monkeypatch.setenv("LIBNVME_HOSTNQN", "")
    monkeypatch.setattr(nvme_cli, "HOSTNQN_FILE", "/nonexistent/hostnqn")
    assert ktlsd_nvme("check-tls-key", "-d", I32, "-c", SUBSYS) == 1
    assert capsys.readouterr().err == "Failed to read host NQN\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check-tls-key", "-c", SUBSYS, "-n", HOST], "No key data"),
        (["check-tls-key", "-d", I32, "-n", HOST], "Need to specify a subsystem NQN"),
        (["check-tls-key", "-d", I32[:-3] + "X:", "-n", HOST, "-c", SUBSYS], "Key decoding failed"),
        (["check-tls-key", "-d", I32, "-n", HOST, "-c", SUBSYS, "-I", "2"], "Invalid TLS identity"),
        (["gen-tls-key", "-m", "3"], "Invalid HMAC identifier 3"),
        (["gen-tls-key", "-s", K32[:-2]], "Invalid key length (31 bytes)"),
        (["gen-tls-key", "-s", "zz" + K32[2:]], "Invalid secret"),
        (["gen-tls-key", "-i"], "No subsystem NQN specified"),
        (
            ["gen-dhchap-key", "-m", "1", "-l", "48", "-n", "x"],
            "Invalid key length 48 for SHA(256)",
        ),
        (["gen-dhchap-key", "-l", "40", "-n", "x"], "Invalid key length 40"),
        (["gen-dhchap-key", "-m", "4", "-n", "x"], "Invalid HMAC identifier 4"),
        (["check-dhchap-key", "-k", "DHHC-1:00:AAAA:"], "Invalid key"),
    ],
)
def test_errors_are_one_line(argv: list[str], message: str, capsys) -> None:
    assert ktlsd_nvme(*argv) == 1
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err.count("\n") == 1 and message in out.err
    assert "VRLbtnN9" not in out.err and K32[4:] not in out.err


def test_check_tls_key_insert(ring: str, capsys) -> None:
    base = ["check-tls-key", "-d", I32, "-n", HOST, "-c", SUBSYS, "-k", ring, "-t", "user"]
    assert ktlsd_nvme(*base, "-I", "1", "--insert") == 0
    out = capsys.readouterr().out
    assert out.startswith("Inserted TLS key ") and len(out) == len("Inserted TLS key ") + 9
    serial = int(out.split()[-1], 16)
    spec = nvme_keys.derive_nvme_tls_key(bytes.fromhex(K32), 1, HOST, SUBSYS, 1)
    info = keyring.describe_key(serial)
    assert info.type == "user" and info.description == str(spec.identity)
    assert keyring.read_key(serial) == spec.tls_psk
    # Inserting the same identity again revokes the old key (libnvme's nvme_update_key).
    assert ktlsd_nvme(*base, "-I", "1", "-i") == 0
    second = int(capsys.readouterr().out.split()[-1], 16)
    assert second != serial
    assert keyring.list_keyring(keyring.find_keyring(ring)) == [second]
    with pytest.raises(keyring.KeyringError) as exc:
        keyring.read_key(serial)
    # Revoked, and no longer possessed once unlinked, so EACCES is also what we may see.
    assert exc.value.errno in (errno.EKEYREVOKED, errno.EACCES)
    # The compat variant gives a different identity (version 1) and TLS PSK.
    assert ktlsd_nvme(*base, "-I", "1", "-i", "-C") == 0
    compat_serial = int(capsys.readouterr().out.split()[-1], 16)
    compat = nvme_keys.derive_nvme_tls_key(
        bytes.fromhex(K32), 1, HOST, SUBSYS, 1, nvme_keys.Variant.COMPAT
    )
    assert keyring.read_key(compat_serial) == compat.tls_psk != spec.tls_psk


def test_gen_tls_key_insert_with_keyfile(ring: str, tmp_path, capsys) -> None:
    keyfile = tmp_path / "tls.keys"
    argv = [
        "gen-tls-key",
        "-s",
        K48,
        "-m",
        "2",
        "-n",
        HOST,
        "-c",
        SUBSYS,
        "-k",
        ring,
        "-t",
        "user",
        "-i",
        "-f",
        str(keyfile),
    ]
    assert ktlsd_nvme(*argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == I48
    serial = int(lines[1].removeprefix("Inserted TLS key "), 16)
    derived = nvme_keys.derive_nvme_tls_key(bytes.fromhex(K48), 2, HOST, SUBSYS, 0)
    assert keyring.read_key(serial) == derived.tls_psk
    text = keyfile.read_text()
    assert text.count("\n") == 1
    assert text.startswith(f"NVMe0R02 {HOST} {SUBSYS} NVMeTLSkey-1:02:")
    exported = text.split(" ")[-1].strip()
    assert nvme_keys.parse_interchange(exported).key == derived.tls_psk
    assert stat.S_IMODE(os.stat(keyfile).st_mode) == 0o600


def test_list_and_revoke(ring: str, capsys) -> None:
    base = ["-n", HOST, "-c", SUBSYS, "-k", ring, "-t", "user", "-i"]
    assert ktlsd_nvme("check-tls-key", "-d", I32, *base) == 0
    serial = int(capsys.readouterr().out.split()[-1], 16)
    assert ktlsd_nvme("list-keys", "-k", ring, "-t", "user") == 0
    assert capsys.readouterr().out == f"{serial:08x} NVMe0R01 {HOST} {SUBSYS}\n"
    assert ktlsd_nvme("revoke-key", "-k", ring, "-t", "user", f"NVMe0R01 {HOST} {SUBSYS}") == 0
    with pytest.raises(keyring.KeyringError):
        keyring.read_key(serial)
    assert ktlsd_nvme("revoke-key", "-k", ring, "-t", "user", "NVMe0R01 nope nope") == 1
    assert "Failed to revoke key" in capsys.readouterr().err


def test_missing_keyring_is_reported(capsys) -> None:
    name = f"ktlsd-absent-{uuid.uuid4().hex[:8]}"
    argv = ["check-tls-key", "-d", I32, "-n", HOST, "-c", SUBSYS, "-k", name, "-i"]
    assert ktlsd_nvme(*argv) == 1
    assert capsys.readouterr().err == f"Failed to insert key: keyring '{name}' not found\n"


def test_default_key_type_psk_needs_kernel_support(ring: str, capsys) -> None:
    """The host kernel has no "psk" key type (nvme-keyring not loaded): a clear error."""
    argv = ["check-tls-key", "-d", I32, "-n", HOST, "-c", SUBSYS, "-k", ring, "-i"]
    rc = ktlsd_nvme(*argv)
    if rc == 0:  # a kernel with nvme-keyring loaded
        assert capsys.readouterr().out.startswith("Inserted TLS key ")
        return
    err = capsys.readouterr().err
    assert err.startswith("Failed to insert key: add 'psk' ") and "ENODEV" in err


def test_no_subcommand_prints_help() -> None:
    assert ktlsd_nvme() == 2


def test_through_the_ktlsd_entry_point() -> None:
    """``python -m ktlsd nvme ...`` (skipped while other command modules are missing)."""
    try:
        from ktlsd import cli as top

        top.build_parser()
    except ImportError as exc:
        pytest.skip(f"ktlsd's top-level parser cannot be built yet: {exc}")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ktlsd",
            "nvme",
            "gen-dhchap-key",
            "-s",
            K32,
            "-m",
            "1",
            "-n",
            "nqn.host",
        ],
        capture_output=True,
        text=True,
        check=False,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "DHHC-1:01:su0Fo4HvTrpQ+/Oju+03XT9EUBNarHzI5o+9IYV/GNi43RAE:\n"
