"""Packaging: the .deb built from this tree, its unit, man pages and metadata, and what the
program needs at run time.

The package is built once per module by ``packaging/build-deb.sh`` (skipped only where
``dpkg-deb`` is missing) and inspected with the real tools: ``dpkg-deb``, ``lintian`` (no
errors allowed), ``systemd-analyze verify`` and ``security`` on the unpacked tree, ``groff``
on the man pages. The unpacked tree's program runs under the system ``python3 -I``. The
keyring portability check hides libkeyutils in a private mount namespace (``unshare -m``):
``ktlsd --version`` and the NVMe key tools must still work, and a keyring call must fail
with one line naming the library.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import ktlsd
from ktlsd import config

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "packaging" / "build-deb.sh"
UNIT = ROOT / "packaging" / "ktlsd.service"
MAN_PAGES = ("ktlsd.8", "ktlsd.conf.5", "ktlsd-service.7")
SYSTEM_PYTHON = "/usr/bin/python3"
FIXED_SECRET = "00" * 32  # gives a known NVMe interchange key, no randomness


@dataclass(frozen=True)
class Package:
    deb: Path
    tree: Path  # the data archive, unpacked
    control: Path  # the control archive, unpacked


def _run(*args: str | Path, check: bool = True, env: dict[str, str] | None = None,
         cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=check,
                          timeout=300, env=env, cwd=cwd)


def _build(out: Path, epoch: str = "1700000000") -> Path:
    env = {**os.environ, "SOURCE_DATE_EPOCH": epoch}
    result = _run("bash", BUILD, out, env=env)
    deb = Path(result.stdout.strip())
    assert deb.is_file(), result.stderr
    return deb


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Package]:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    base = tmp_path_factory.mktemp("deb")
    deb = _build(base / "out")
    tree, control = base / "tree", base / "control"
    _run("dpkg-deb", "-x", deb, tree)
    _run("dpkg-deb", "-e", deb, control)
    yield Package(deb, tree, control)


def _field(package: Package, name: str) -> str:
    return _run("dpkg-deb", "-f", package.deb, name).stdout.strip()


# --- the package -----------------------------------------------------------------------


def test_control_fields(package: Package) -> None:
    assert package.deb.name == f"ktlsd_{ktlsd.__version__}_all.deb"
    assert _field(package, "Package") == "ktlsd"
    assert _field(package, "Version") == ktlsd.__version__
    assert _field(package, "Architecture") == "all"
    depends = [d.strip() for d in _field(package, "Depends").split(",")]
    assert depends == [
        "python3 (>= 3.11)",
        "python3-cryptography (>= 41)",
        "libssl3t64 | libssl3",
        "libkeyutils1",
        "keyutils",
    ]
    assert re.fullmatch(r".+ <[^@\s]+@[^@\s]+>", _field(package, "Maintainer"))
    assert int(_field(package, "Installed-Size")) > 0
    info = _run("dpkg-deb", "-I", package.deb).stdout
    for member in ("control", "conffiles", "md5sums", "postinst", "prerm", "postrm"):
        assert re.search(rf"\s{member}\s", info), member


def test_files_and_modes(package: Package) -> None:
    listing = _run("dpkg-deb", "-c", package.deb).stdout.splitlines()
    entries = {}
    for line in listing:
        mode, owner, _size, _date, _time, path = line.split(None, 5)
        entries[path.removeprefix("./").rstrip("/")] = (mode, owner)
    assert {owner for _, owner in entries.values()} == {"root/root"}
    assert entries["usr/sbin/ktlsd"][0] == "-rwxr-xr-x"
    for path in (
        "usr/lib/systemd/system/ktlsd.service",
        "usr/lib/systemd/system/nvmf-connect@.service.d/ktlsd.conf",
        "etc/default/ktlsd",
        "usr/share/man/man8/ktlsd.8.gz",
        "usr/share/man/man5/ktlsd.conf.5.gz",
        "usr/share/man/man7/ktlsd-service.7.gz",
        "usr/share/doc/ktlsd/copyright",
        "usr/share/doc/ktlsd/changelog.gz",
        "usr/share/doc/ktlsd/README.Debian",
        "usr/share/doc/ktlsd/examples/config",
    ):
        assert entries[path][0] == "-rw-r--r--", path
    # Every module of the tree, and nothing compiled (postinst byte-compiles on the target).
    source = {str(p.relative_to(ROOT)) for p in (ROOT / "ktlsd").rglob("*.py")
              if "__pycache__" not in p.parts}
    packaged = {p.removeprefix("usr/lib/python3/dist-packages/") for p in entries
                if p.startswith("usr/lib/python3/dist-packages/") and p.endswith(".py")}
    assert packaged == source
    assert "usr/lib/python3/dist-packages/ktlsd/py.typed" in entries
    assert not [p for p in entries if p.endswith(".pyc") or "__pycache__" in p]


def test_conffiles_and_md5sums(package: Package) -> None:
    assert (package.control / "conffiles").read_text().split() == ["/etc/default/ktlsd"]
    sums = {}
    for line in (package.control / "md5sums").read_text().splitlines():
        digest, path = line.split(None, 1)
        sums[path] = digest
    files = {str(p.relative_to(package.tree)) for p in package.tree.rglob("*") if p.is_file()}
    assert set(sums) == files
    for path, digest in sums.items():
        assert hashlib.md5((package.tree / path).read_bytes()).hexdigest() == digest, path


def test_maintainer_scripts_are_posix_sh(package: Package) -> None:
    for script in ("postinst", "prerm", "postrm"):
        path = package.control / script
        assert os.access(path, os.X_OK)
        assert path.read_text().startswith("#!/bin/sh\n")
        _run("sh", "-n", path)
    postinst = (package.control / "postinst").read_text()
    assert "py3compile -p ktlsd" in postinst
    assert "deb-systemd-helper disable tlshd.service" in postinst
    assert "py3clean -p ktlsd" in (package.control / "prerm").read_text()


def test_build_is_reproducible(package: Package, tmp_path: Path) -> None:
    again = _build(tmp_path)
    assert again.read_bytes() == package.deb.read_bytes()


def test_lintian_reports_no_errors(package: Package) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian not installed")
    result = _run("lintian", "--no-cfg", "--pedantic", "-I", package.deb, check=False)
    tags = result.stdout.splitlines()
    errors = [t for t in tags if t.startswith("E:")]
    assert not errors, "\n".join(tags)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the unit ----------------------------------------------------------------------------


def _unit_root(package: Package, tmp_path: Path) -> Path:
    """The unpacked package plus what the unit's commands name outside it."""
    root = tmp_path / "root"
    shutil.copytree(package.tree, root, symlinks=True)
    kill = shutil.which("kill") or "/bin/kill"
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy(kill, root / "bin" / "kill")
    return root


def test_unit_verifies(package: Package, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    root = _unit_root(package, tmp_path)
    # The drop-in for nvme-cli's template needs the template: a stand-in with its name.
    (root / "usr/lib/systemd/system/nvmf-connect@.service").write_text(
        "[Unit]\nDescription=stand-in\nDefaultDependencies=no\n"
        "[Service]\nType=oneshot\nExecStart=/bin/kill -0 1\n")
    env = {**os.environ, "MANPATH": str(root / "usr/share/man")}
    for unit in ("ktlsd.service", "nvmf-connect@nvme0.service"):
        result = _run("systemd-analyze", "verify", f"--root={root}", unit, env=env, check=False)
        assert result.returncode == 0 and not result.stderr.strip(), (unit, result.stderr)
    security = _run("systemd-analyze", "security", "--offline=yes", f"--root={root}",
                    "--threshold=30", "ktlsd.service", check=False)
    assert security.returncode == 0, security.stdout + security.stderr
    exposure = re.search(r"Overall exposure level for ktlsd.service: (\d+\.\d+)", security.stdout)
    assert exposure is not None and float(exposure.group(1)) <= 3.0, security.stdout


def _unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_orders_and_confines_like_a_boot_time_agent() -> None:
    unit = _unit_settings()
    assert unit["DefaultDependencies"] == ["no"]
    before = " ".join(unit["Before"]).split()
    for name in ("remote-fs-pre.target", "nvmf-autoconnect.service", "nvmf-connect-nbft.service",
                 "nbft-boot-connect.service", "shutdown.target"):
        assert name in before
    assert set(" ".join(unit["Conflicts"]).split()) == {"tlshd.service", "shutdown.target"}
    assert unit["Type"] == ["notify"]
    assert unit["ExecStart"] == ["/usr/sbin/ktlsd run"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["RuntimeDirectory"] == ["ktlsd"]
    assert set(unit["CapabilityBoundingSet"][0].split()) == {
        "CAP_NET_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN"}
    assert unit["NoNewPrivileges"] == ["yes"]
    assert unit["ProtectSystem"] == ["strict"]
    assert set(unit["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_NETLINK"}
    # /proc/keys must stay visible: find_keyring() scans it for kernel keyrings like .nvme.
    assert "ProcSubset" not in unit
    assert unit["WantedBy"] == ["remote-fs.target"]


# --- what is installed runs --------------------------------------------------------------


def _packaged_ktlsd(package: Package, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the packaged /usr/sbin/ktlsd with the system python3, the packaged modules first."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        pytest.skip("no system python3")
    launcher = (
        "import runpy, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "script = sys.argv[2]\n"
        "sys.argv = ['ktlsd'] + sys.argv[3:]\n"
        "runpy.run_path(script, run_name='__main__')\n"
    )
    return _run(SYSTEM_PYTHON, "-I", "-c", launcher,
                package.tree / "usr/lib/python3/dist-packages",
                package.tree / "usr/sbin/ktlsd", *args, check=False, cwd="/")


def test_packaged_program_runs(package: Package) -> None:
    script = (package.tree / "usr/sbin/ktlsd").read_text()
    assert script.startswith("#!/usr/bin/python3 -I\n")
    version = _packaged_ktlsd(package, "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"ktlsd {ktlsd.__version__}"
    key = _packaged_ktlsd(package, "nvme", "gen-tls-key", "--hostnqn", "h", "--subsysnqn", "s",
                          "--secret", FIXED_SECRET)
    expected = _run(sys.executable, "-m", "ktlsd", "nvme", "gen-tls-key", "--hostnqn", "h",
                    "--subsysnqn", "s", "--secret", FIXED_SECRET, cwd=ROOT)
    assert key.returncode == 0, key.stderr
    assert key.stdout == expected.stdout
    assert key.stdout.startswith("NVMeTLSkey-1:01:")


# --- man pages and documentation ----------------------------------------------------------


@pytest.mark.parametrize("page", MAN_PAGES)
def test_man_page_renders_without_warnings(page: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff not installed")
    path = ROOT / "man" / page
    result = _run("groff", "-man", "-ww", "-z", "-Tutf8", path, check=False)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    name, section = page.rsplit(".", 1)
    title = re.escape(name.upper()).replace(r"\-", r"\\?-")
    assert re.search(rf"^\.TH {title} {section} ", path.read_text(), re.M)


def test_every_ktlsd_setting_is_documented_and_valid(caplog: pytest.LogCaptureFixture,
                                                      tmp_path: Path) -> None:
    """The example configuration and ktlsd.conf(5) name every [ktlsd] key config.py knows,
    and the example, with every value uncommented, loads without an unknown key."""
    keys = config._KTLSD_KEYS
    example = (ROOT / "packaging/debian/config.example").read_text()
    page = (ROOT / "man/ktlsd.conf.5").read_text().replace("\\_", "_")
    for key in keys:
        assert re.search(rf"^#{key}=", example, re.M), f"{key} missing from the example"
        assert re.search(rf"^\.B[RI]? {key}=", page, re.M), f"{key} missing from ktlsd.conf(5)"
    active = tmp_path / "config"
    active.write_text(re.sub(r"^#(\w[\w.]*=)", r"\1", example, flags=re.M).replace(
        "service_group=\n", "").replace("x509.crl=\n", ""))
    with caplog.at_level(logging.WARNING, logger="ktlsd.config"):
        loaded = config.load_config(str(active))
    assert not [r.getMessage() for r in caplog.records if "unknown" in r.getMessage()]
    assert loaded.path == str(active)
    # The example shows the defaults (except where it shows an example value).
    defaults = config.AgentConfig()
    for key in ("service_socket", "service_mode", "kernel", "max_concurrent", "pending_limit",
                "default_timeout_ms", "session_lifetime", "legacy_psk_sha384"):
        assert getattr(loaded, key) == getattr(defaults, key), key


def test_project_metadata_has_one_version_and_the_declared_license() -> None:
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "GPL-2.0-only"
    assert "version" in meta["project"]["dynamic"] and "version" not in meta["project"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "ktlsd.__version__"}
    text = (ROOT / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in text and "Version 2, June 1991" in text
    from importlib.metadata import version
    assert version("ktlsd") == ktlsd.__version__


# --- keyrings without libkeyutils ----------------------------------------------------------


def _libkeyutils_file() -> str:
    ctypes.CDLL("libkeyutils.so.1")
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "libkeyutils.so" in line:
                return os.path.realpath(line.split()[-1])
    raise AssertionError("libkeyutils.so.1 loaded but not mapped")


def _without_libkeyutils(*command: str) -> subprocess.CompletedProcess[str]:
    """Run ``command`` in a mount namespace where libkeyutils is an empty file."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    library = _libkeyutils_file()
    probe = _run("unshare", "-m", "true", check=False)
    if probe.returncode != 0:
        pytest.skip(f"unshare -m not permitted here: {probe.stderr.strip()}")
    return _run("unshare", "-m", "sh", "-c", 'mount --bind /dev/null "$0" && exec "$@"',
                library, *command, check=False, cwd=ROOT)


def test_commands_without_keyrings_work_without_libkeyutils() -> None:
    version = _without_libkeyutils(sys.executable, "-m", "ktlsd", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"ktlsd {ktlsd.__version__}"
    key = _without_libkeyutils(sys.executable, "-m", "ktlsd", "nvme", "gen-tls-key",
                               "--hostnqn", "h", "--subsysnqn", "s", "--secret", FIXED_SECRET)
    assert key.returncode == 0, key.stderr
    assert key.stdout.startswith("NVMeTLSkey-1:01:")


def test_keyring_calls_without_libkeyutils_fail_with_one_clear_line() -> None:
    program = (
        "import errno\n"
        "from ktlsd import keyring\n"
        "try:\n"
        "    keyring.find_keyring('.nvme')\n"
        "except keyring.KeyutilsMissing as exc:\n"
        "    assert exc.errno == errno.ELIBACC, exc.errno\n"
        "    print(exc)\n"
    )
    result = _without_libkeyutils(sys.executable, "-c", program)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    assert "libkeyutils.so.1" in lines[0] and "libkeyutils1" in lines[0]
    insert = _without_libkeyutils(sys.executable, "-m", "ktlsd", "nvme", "gen-tls-key",
                                  "--hostnqn", "h", "--subsysnqn", "s", "--insert")
    assert insert.returncode == 1
    assert "not found" not in insert.stderr
    assert "libkeyutils1" in insert.stderr and len(insert.stderr.strip().splitlines()) == 1
