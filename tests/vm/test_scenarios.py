"""Real-kernel scenarios, asserted from the results the guest sent back.

Each test reads one scenario's record from the session's single boot (see conftest.py) and
fails with the scenario's own reason, its log tail and the console tail. Figures are
printed so a CI log carries them (run with ``-s`` or look at the captured output).
"""

from __future__ import annotations

import json

import pytest

from testbed import run


def explain(rec: dict[str, object]) -> str:
    parts = [f"scenario {rec['name']} failed on kernel {rec.get('kernel')}:"]
    parts += [f"  {d}" for d in rec.get("details") or []]  # type: ignore[union-attr]
    if rec.get("log_tail"):
        parts += ["--- scenario log tail ---", str(rec["log_tail"])]
    if rec.get("console_tail"):
        parts += ["--- console tail ---", str(rec["console_tail"])]
    return "\n".join(parts)


def assert_passed(rec: dict[str, object]) -> None:
    print(f"\n{rec['name']}: {json.dumps(rec.get('figures'), sort_keys=True)}")
    if not rec.get("passed"):
        pytest.fail(explain(rec), pytrace=False)


def test_guest_booted_the_expected_kernel(vm_report: dict[str, object]) -> None:
    assert vm_report["guest_problem"] is None, vm_report["guest_problem"]
    major, minor = (int(x) for x in str(vm_report["kernel"]).split("-")[0].split(".")[:2])
    assert (major, minor) >= (6, 14), f"kernel {vm_report['kernel']} has no kTLS rekey"
    print(
        f"\nkernel {vm_report['kernel']}, accel {vm_report['accel']}, "
        f"boot {vm_report['boot_seconds']} s, wall {vm_report['wall_seconds']} s"
    )


def test_kernel_facts(scenario) -> None:
    rec = scenario("kernel-facts")
    assert_passed(rec)
    figures = rec["figures"]
    assert figures["ktls_tx_rekey"] == "ok"
    assert figures["tls_stat_rekey_delta"]["TlsRxRekeyOk"] == 1
    assert "tlshd" in figures["handshake_family"]["mcast_groups"]


@pytest.mark.parametrize("agent", ["tlshd"])
def test_nvme_tls(scenario, agent: str) -> None:
    rec = scenario(f"nvme-tls-{agent}")
    assert_passed(rec)
    figures = rec["figures"]
    assert figures["bytes_verified"] == 2 * 2 * 16 * 1024 * 1024
    assert figures["connect_seconds_sha256"] > 0 and figures["connect_seconds_sha384"] > 0


@pytest.mark.parametrize("agent", ["tlshd"])
def test_nfs_tls(scenario, agent: str) -> None:
    rec = scenario(f"nfs-tls-{agent}")
    assert_passed(rec)
    assert rec["figures"]["bytes_verified"] == 2 * 2 * 4 * 1024 * 1024


@pytest.mark.skipif(
    "ktls-python" not in run.default_scenarios(),
    reason="ktlsd/ktls.py not in the tree yet (scenario ktls-python needs it)",
)
def test_ktls_python(scenario) -> None:
    assert_passed(scenario("ktls-python"))
