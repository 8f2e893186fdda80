"""Issue 11's acceptance in the systemd-booted guest, asserted from what the guest sent back.

One QEMU process, two boots (see testbed/systemd_run.py and testbed/systemd_guest/driver.py):
``systemd-upgrade`` (tlshd serving, then the .deb built from the tree installed with apt) and
``systemd-boot`` (ktlsd.service from the package at boot). Each test asserts one part: every
check the guest recorded under that part's prefix passed, and there was at least one (a part
that never ran fails too), plus the figures that part must have produced.
"""

from __future__ import annotations

import json

import pytest


def phase(report: dict[str, object], name: str) -> dict[str, object]:
    for rec in report["scenarios"]:  # type: ignore[union-attr]
        if rec["name"] == name:
            return rec
    pytest.fail(f"no record for {name}", pytrace=False)


def explain(rec: dict[str, object], prefix: str, failed: list[str]) -> str:
    parts = [f"{rec['name']} / {prefix}: {len(failed)} check(s) failed:"]
    parts += [f"  FAIL {c}" for c in failed]
    parts += [f"  {d}" for d in rec.get("details") or []]  # type: ignore[union-attr]
    for key in ("log_tail", "console_tail"):
        if rec.get(key):
            parts += [f"--- {key.replace('_', ' ')} ---", str(rec[key])]
    return "\n".join(parts)


def assert_part(report: dict[str, object], name: str, *prefixes: str) -> dict[str, object]:
    """Every check under ``prefixes`` passed (and some ran); return the phase's figures."""
    rec = phase(report, name)
    print(f"\n{name}: {json.dumps(rec.get('figures'), sort_keys=True)}")
    for prefix in prefixes:
        mine = [c for c in rec.get("checks") or [] if str(c["check"]).startswith(f"{prefix}:")]
        failed = [str(c["check"]) for c in mine if not c["ok"]]
        if not mine:
            failed = [f"no check under '{prefix}:' ran"]
        if failed:
            pytest.fail(explain(rec, prefix, failed), pytrace=False)
    return rec["figures"]  # type: ignore[return-value]


def test_systemd_guest_ran_both_boots(systemd_report: dict[str, object]) -> None:
    assert systemd_report["guest_problem"] is None, systemd_report["guest_problem"]
    for rec in systemd_report["scenarios"]:  # type: ignore[union-attr]
        assert rec.get("checks"), f"{rec['name']}: {rec.get('details')}"
    print(f"\nqemu {systemd_report['qemu_seconds']} s for both boots, deb {systemd_report['deb']}")


def test_upgrade_from_tlshd_keeps_the_mount_and_hands_over(systemd_report) -> None:
    figures = assert_part(systemd_report, "systemd-upgrade", "before", "upgrade", "after", "new")
    assert figures["tlshd_successful_handshakes_at_boot"] >= 2
    assert any("tlshd.service disabled" in n for n in figures["postinst_notes"])
    after = figures["ktlsd_handshakes_after_upgrade"]
    assert after["nfs"] >= 2 and after["nvme"] >= 4


def test_boot_brings_up_fstab_nfs_and_nvme_autoconnect_through_ktlsd(systemd_report) -> None:
    figures = assert_part(systemd_report, "systemd-boot", "boot")
    assert figures["ktlsd_unit_type"] == "notify"  # the package's unit as shipped
    at_boot = figures["ktlsd_handshakes_at_boot"]
    assert at_boot["nfs"] >= 2 and at_boot["nvme_subsystem"] >= 2
    assert figures["ktlsd_boot_start_to_active_seconds"] > 0


def test_systemctl_reload_drops_nothing(systemd_report) -> None:
    assert_part(systemd_report, "systemd-boot", "reload")


def test_sigusr1_reloads_like_tlshd(systemd_report) -> None:
    assert_part(systemd_report, "systemd-boot", "usr1")


def test_wrong_psk_is_listed_by_journalctl_priority_warning(systemd_report) -> None:
    figures = assert_part(systemd_report, "systemd-boot", "warning")
    assert figures["journal_warning_lines"], "no warning line recorded"


def test_systemctl_stop_drains(systemd_report) -> None:
    figures = assert_part(systemd_report, "systemd-boot", "stop")
    assert figures["stop_result"]["Result"] == "success"


def test_startup_against_tlshd_in_the_same_boot(systemd_report) -> None:
    """Not a speed assertion: both agents' start-up figures exist, from the same boot."""
    figures = assert_part(systemd_report, "systemd-boot", "startup")
    rounds = figures["startup_same_boot"]
    for agent in ("tlshd", "ktlsd"):
        assert len(rounds[agent]) == 3
        assert all(r["ready_seconds"] > 0 and r["idle_rss_kib"] > 0 for r in rounds[agent])
        print(f"\n{agent}: {rounds[agent]}")
    floors = figures["startup_python_floor_same_boot"]
    for name in ("python_pass", "python_import_asyncio", "python_asyncio_notify"):
        assert len(floors[name]) == 3
        assert all(r["ready_seconds"] > 0 for r in floors[name])
    assert all(r["idle_rss_kib"] > 0 for r in floors["python_asyncio_notify"])
    print(f"\nfloor: {floors}\nratios: {figures['startup_ratios_of_medians']}")
