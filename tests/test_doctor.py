"""``ktlsd doctor``: run for real on this machine, plus its fallbacks."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from ktlsd.commands import doctor
from ktlsd.commands.doctor import (
    Status,
    check_config,
    check_ktls,
    openssl_version,
    parse_kernel_release,
)
from ktlsd.upcall.genl import AttrKind, AttrPolicy, FamilyInfo
from ktlsd.upcall.kernel import KernelCapabilities
from ktlsd.upcall.netlink import DoneAttr

LINE = re.compile(r"^(OK|MISSING|INFO) +[^:]+: \S.*$")


def run_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ktlsd", "doctor", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )


def _family_present() -> bool:
    from ktlsd.upcall.kernel import KernelSourceError, probe_kernel_policy

    try:
        probe_kernel_policy()
        return True
    except KernelSourceError:
        return False


def test_doctor_reports_one_line_per_check() -> None:
    result = run_doctor()
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    body, summary = lines[:-1], lines[-1]
    assert all(LINE.match(line) for line in body), body
    names = {line.split(":")[0].split(None, 1)[1] for line in body}
    assert {"kernel", "kTLS", "kTLS rekey", "handshake family", "CAP_NET_ADMIN", "keyctl",
            "keyring .nvme", "keyring .nfs", "keyring .nfsd", "libssl",
            "configuration"} <= names
    missing = sum(1 for line in body if line.startswith("MISSING"))
    assert summary == f"{len(body)} checks, {missing} missing"
    libssl = next(line for line in body if " libssl: " in line)
    assert libssl.startswith("OK") and "OpenSSL 3." in libssl
    family = next(line for line in body if " handshake family: " in line)
    if _family_present():
        assert family.startswith("OK") and "groups" in family
    else:
        assert family == (
            "MISSING handshake family: kernel has no 'handshake' netlink family "
            "(Linux >= 6.5 with CONFIG_NET_HANDSHAKE needed)"
        )
        assert "MISSING DONE session-id (KeyUpdate): no handshake family" in body
    assert "secret" not in result.stdout.lower()


def test_strict_exit_code_follows_missing_lines() -> None:
    result = run_doctor("--strict")
    missing = any(line.startswith("MISSING") for line in result.stdout.splitlines())
    assert result.returncode == (1 if missing else 0)


def test_bad_configuration_is_reported_not_fatal(tmp_path: Path) -> None:
    bad = tmp_path / "config"
    bad.write_text("[ktlsd]\nkernel = warp\n")
    result = run_doctor("--config", str(bad))
    assert result.returncode == 0
    assert (
        f"MISSING configuration: {bad}:2: [ktlsd] kernel: 'warp' is not one of "
        "auto, yes, no"
    ) in result.stdout.splitlines()
    good = tmp_path / "good"
    good.write_text("[debug]\nloglevel=0\n")
    assert [c.status for c in check_config(str(good))] == [Status.OK]


def test_ktls_check_degrades_without_the_module() -> None:
    def absent(name: str) -> types.ModuleType:
        raise ImportError(f"No module named {name!r}")

    checks = check_ktls(absent)
    assert [(c.name, c.status) for c in checks] == [
        ("kTLS", Status.MISSING), ("kTLS rekey", Status.MISSING),
    ]
    assert "cannot probe (ImportError" in checks[0].detail


def test_ktls_check_reports_partial_support() -> None:
    ktls = pytest.importorskip("ktlsd.tls.ktls")
    support = ktls.KtlsSupport(
        ulp=True, rekey=False, tls_stat=True,
        reasons={"rekey": "kernel cannot rekey kTLS (needs Linux >= 6.14)"},
    )
    module = types.SimpleNamespace(probe=lambda: support)
    checks = check_ktls(lambda name: module)
    assert [c.line() for c in checks] == [
        "OK      kTLS: the tls ULP attaches and TX/RX keys install",
        "MISSING kTLS rekey: kernel cannot rekey kTLS (needs Linux >= 6.14)",
        "OK      kTLS counters: /proc/net/tls_stat readable",
    ]


def test_a_crashing_check_does_not_stop_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> list[doctor.Check]:
        raise RuntimeError("boom")

    broken.__name__ = "check_broken"
    monkeypatch.setattr(doctor, "CHECKS", (broken, doctor.check_libssl))
    checks = doctor.run_checks()
    assert checks[0].line() == "MISSING broken: check failed: RuntimeError: boom"
    assert checks[1].name == "libssl" and checks[2].name == "configuration"


def test_kernel_release_parsing() -> None:
    assert parse_kernel_release("6.18.44-fc-v769") == (6, 18)
    assert parse_kernel_release("6.5.0-rc3") == (6, 5)
    assert parse_kernel_release("5.15") == (5, 15)
    assert parse_kernel_release("weird") == (0, 0)


def test_openssl_version_matches_the_cli() -> None:
    cli = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True)
    # "OpenSSL 3.0.19 27 Jan 2026 (Library: OpenSSL 3.0.19 27 Jan 2026)": the library part
    library = cli.stdout.strip()
    if "(Library: " in library:
        library = library.split("(Library: ", 1)[1].rstrip(")")
    assert openssl_version() == library
    with pytest.raises(OSError):
        openssl_version("libssl-does-not-exist.so.9")


def _kernel(attr4_kind: AttrKind | None) -> KernelCapabilities:
    """The capabilities a kernel's policy dump yields, DONE attribute 4 typed ``attr4_kind``."""
    done: dict[int, AttrPolicy] = {
        DoneAttr.STATUS: AttrPolicy(DoneAttr.STATUS, AttrKind.U32),
        DoneAttr.SOCKFD: AttrPolicy(DoneAttr.SOCKFD, AttrKind.S32),
        DoneAttr.REMOTE_AUTH: AttrPolicy(DoneAttr.REMOTE_AUTH, AttrKind.U32),
    }
    if attr4_kind is not None:
        done[DoneAttr.SESSION_ID_OR_TAG] = AttrPolicy(DoneAttr.SESSION_ID_OR_TAG, attr4_kind)
    family = FamilyInfo("handshake", 23, 1, {"none": 5, "tlshd": 6})
    return KernelCapabilities(family=family, done_attrs=done, policy_known=True)


@pytest.mark.parametrize(("attr4", "present"), [
    (AttrKind.U32, "DONE session-id (KeyUpdate)"),
    (AttrKind.NUL_STRING, "DONE tag"),
    (None, None),
])
def test_a_correct_kernel_has_nothing_missing_whichever_series_it_carries(
    attr4: AttrKind | None, present: str | None
) -> None:
    """Session id and tag share DONE attribute 4: one of them is always absent, and that must
    not make ``--strict`` fail on a correctly set-up host."""
    checks = doctor.family_checks(_kernel(attr4))
    assert [c for c in checks if c.status is Status.MISSING] == []
    by_name = {c.name: c.status for c in checks}
    assert by_name["handshake family"] is Status.OK
    for name in ("DONE session-id (KeyUpdate)", "DONE tag"):
        assert by_name[name] is (Status.OK if name == present else Status.INFO)


def test_strict_passes_when_every_check_is_ok_or_info(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str],
                                                      tmp_path: Path) -> None:
    good = tmp_path / "config"
    good.write_text("[debug]\nloglevel=0\n")
    monkeypatch.setattr(doctor, "CHECKS", (lambda: doctor.family_checks(_kernel(AttrKind.U32)),
                                           doctor.check_libssl))
    args = argparse.Namespace(strict=True, config=str(good))
    assert doctor.main(args) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith(" checks, 0 missing")
    # ... and fails on a configuration error
    bad = tmp_path / "bad"
    bad.write_text("[ktlsd]\nkernel = warp\n")
    assert doctor.main(argparse.Namespace(strict=True, config=str(bad))) == 1


def test_absent_consumer_keyrings_are_info_not_missing() -> None:
    """.nvme/.nfs/.nfsd exist only once their modules are loaded: normal, not a fault."""
    for check in doctor.check_keyrings():
        if check.name.startswith("keyring "):
            assert check.status in (Status.OK, Status.INFO), check.line()
            if check.status is Status.INFO:
                assert check.detail.startswith("absent until ")
