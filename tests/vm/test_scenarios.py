"""Real-kernel scenarios, asserted from the results the guest sent back.

Each test reads one scenario's record from the session's single boot (see conftest.py) and
fails with the scenario's own reason, its log tail (including the agent's log) and the
console tail. Figures are printed, so a CI log run with ``-s`` carries them.
"""

from __future__ import annotations

import json

import pytest

AGENTS = ["tlshd", "ktlsd"]


def explain(rec: dict[str, object]) -> str:
    parts = [f"scenario {rec['name']} failed on kernel {rec.get('kernel')}:"]
    parts += [f"  {d}" for d in rec.get("details") or []]  # type: ignore[union-attr]
    if rec.get("log_tail"):
        parts += ["--- scenario log tail ---", str(rec["log_tail"])]
    if rec.get("console_tail"):
        parts += ["--- console tail ---", str(rec["console_tail"])]
    return "\n".join(parts)


def assert_passed(rec: dict[str, object]) -> dict[str, object]:
    print(f"\n{rec['name']}: {json.dumps(rec.get('figures'), sort_keys=True)}")
    if not rec.get("passed"):
        pytest.fail(explain(rec), pytrace=False)
    return rec["figures"]  # type: ignore[return-value]


def test_guest_booted_a_rekey_capable_kernel(vm_report: dict[str, object]) -> None:
    assert vm_report["guest_problem"] is None, vm_report["guest_problem"]
    major, minor = (int(x) for x in str(vm_report["kernel"]).split("-")[0].split(".")[:2])
    assert (major, minor) >= (6, 14), f"kernel {vm_report['kernel']} has no kTLS rekey"
    print(
        f"\nkernel {vm_report['kernel']} ({vm_report['kernel_package']}), "
        f"accel {vm_report['accel']}, boot {vm_report['boot_seconds']} s, "
        f"wall {vm_report['wall_seconds']} s"
    )


def test_kernel_facts(scenario) -> None:
    figures = assert_passed(scenario("kernel-facts"))
    assert figures["ktls_tx_rekey"] == "ok"
    assert figures["ktls_rx_after_keyupdate"] == "EKEYEXPIRED"
    assert figures["tls_stat_rekey_delta"]["TlsRxRekeyOk"] == 1
    assert "tlshd" in figures["handshake_family"]["mcast_groups"]


def test_ktls_python_kernel_vs_user_record_layer(scenario) -> None:
    figures = assert_passed(scenario("ktls-python"))
    rekeys = figures["rekeys_per_direction"]
    assert rekeys > 0
    assert figures["tls_stat_rekey_delta"]["TlsTxRekeyOk"] == rekeys
    assert figures["tls_stat_rekey_delta"]["TlsRxRekeyOk"] == rekeys


def test_record_size_limit_caps_ktls_records_on_the_wire(scenario) -> None:
    figures = assert_passed(scenario("record-size-limit"))
    for end in ("kernel_layer", "agent_install"):
        assert figures[f"{end}_tx_max_payload"] == 255  # getsockopt: the peer's 256 - 1
        assert figures[f"{end}_largest_inner_plaintext"] <= 256
        assert figures[f"{end}_records_from_ktls"] >= 64 * 1024 // 255
    assert figures["control_tx_max_payload"] == 2**14
    assert figures["control_largest_inner_plaintext"] == 2**14 + 1  # the check can fail


def test_ktls_cli_kernel_vs_user_end_to_end(scenario) -> None:
    figures = assert_passed(scenario("ktls-cli"))
    updates = figures["kernel_end_key_updates"]
    assert updates["sent"] > 0 and updates["received"] > 0
    assert figures["tls_stat_rekey_delta"]["TlsTxRekeyOk"] == updates["sent"]
    assert figures["bytes_verified"] == 3 * 2 * 1024 * 1024


@pytest.mark.parametrize("agent", AGENTS)
def test_nvme_tls(scenario, agent: str) -> None:
    figures = assert_passed(scenario(f"nvme-tls-{agent}"))
    assert figures["bytes_verified"] == 2 * 2 * 16 * 1024 * 1024
    assert figures["connect_seconds_sha256"] > 0 and figures["connect_seconds_sha384"] > 0


@pytest.mark.parametrize("agent", AGENTS)
def test_nvme_failure_paths(scenario, agent: str) -> None:
    figures = assert_passed(scenario(f"nvme-failures-{agent}"))
    assert figures["wrong_psk_done_status"], "no DONE status seen for the wrong PSK"
    assert "hung" not in figures["storm_exit_codes"]


@pytest.mark.parametrize("agent", AGENTS)
def test_nfs_tls(scenario, agent: str) -> None:
    figures = assert_passed(scenario(f"nfs-tls-{agent}"))
    assert figures["bytes_verified"] == 2 * 2 * 4 * 1024 * 1024


def test_nfs_mtls_with_private_keys_in_a_pkcs11_token(scenario) -> None:
    """ktlsd's client and server keys stay in SoftHSM2 (pkcs11-provider, OpenSSL 3.5)."""
    figures = assert_passed(scenario("nfs-pkcs11"))
    assert figures["bytes_verified"] == 2 * 4 * 1024 * 1024
    assert figures["pkcs11_route"] == ["provider"]
    assert figures["agent_successful_handshakes_logged"] >= 2
    assert "refused the PIN" in figures["connect_error_PIN"]
    assert "no such private key" in figures["connect_error_key"]


def test_connect_times_side_by_side(vm_report: dict[str, object]) -> None:
    """Not a speed assertion: both agents' figures must exist so CI logs can compare them."""
    comparison = vm_report["comparison"]
    print("\n" + "\n".join(f"{k}: {v}" for k, v in comparison.items()))  # type: ignore[union-attr]
    for key in ("nvme-tls:connect_seconds_sha256", "nvme-tls:connect_seconds_sha384"):
        assert key in comparison, f"{key} missing: both nvme-tls runs must report it"


def test_keyupdate_through_the_agent_on_ktls(scenario) -> None:
    figures = assert_passed(scenario("keyupdate-agent"))
    counts = figures["consumer_counts"]
    assert counts["tx_rekeys"] > 0 and counts["rx_rekeys"] > 0
    delta = figures["tls_stat_rekey_delta"]
    assert delta["TlsTxRekeyOk"] == counts["tx_rekeys"]
    assert delta["TlsRxRekeyOk"] == counts["rx_rekeys"]
    assert delta["TlsRxRekeyReceived"] == counts["keyupdates_read"]
    assert figures["unknown_session_status"] == "ENOKEY"


@pytest.mark.parametrize("probe", ["dhchap", "host", "cli"])
def test_nvme_toolkit_probe(scenario, probe: str) -> None:
    figures = assert_passed(scenario(f"{probe}-probe"))
    done, total = (int(x) for x in str(figures["cases_passed"]).split("/"))
    assert total > 0 and done == total


def test_nvme_keys_made_by_ktlsd_work_with_the_kernel(scenario) -> None:
    figures = assert_passed(scenario("nvme-keys"))
    assert len(figures["connect_seconds"]) == 4
    assert figures["bytes_verified"] == 4 * 2 * 1024 * 1024
    comparison = figures["nvme_cli_comparison"]
    assert all("compat same" in v for k, v in comparison.items() if k.endswith("identity"))
    assert all("DIFFERENT" not in v for k, v in comparison.items() if k.endswith("insert"))


def test_nvme_concat_with_ktlsd(scenario) -> None:
    figures = assert_passed(scenario("nvme-concat"))
    assert figures["agent_nvme1g_handshakes_first"] >= 2
    assert figures["agent_nvme1g_handshakes_reconnect"] >= 2


@pytest.mark.parametrize("agent", AGENTS)
def test_nvme_tls_labels_what_was_negotiated(scenario, agent: str) -> None:
    """The "SHA-384" case says which suite and binder really ran (tlshd 1.0: SHA-256 ones)."""
    figures = assert_passed(scenario(f"nvme-tls-{agent}"))
    for label in ("sha256", "sha384"):
        negotiated = figures[f"negotiated_{label}"]
        assert negotiated["binder_bytes"] in (32, 48), negotiated
        assert str(negotiated["suite"]).startswith("TLS_"), negotiated
    sha384 = figures["negotiated_sha384"]
    if agent == "ktlsd":
        assert sha384["suite"] == "TLS_AES_256_GCM_SHA384" and sha384["binder_bytes"] == 48
    if sha384["binder_bytes"] == 32:  # the PSK was bound to SHA-256: the label must say so
        assert "bound to SHA-256" in figures["label_sha384"], figures["label_sha384"]
    assert figures["negotiated_sha256"]["binder_bytes"] == 32


# -- mixed fleet: ktlsd and tlshd in separate network namespaces --------------------------------

MIB = 1024 * 1024


def fleet_cases(rec: dict[str, object], expected_ids: set[str]) -> dict[str, dict[str, object]]:
    """The scenario's records of the cases ``expected_ids``; fails (with the scenario's log)
    unless each of them ran and met its expectation. Judged per case, so one kind's failure
    does not hide another's result."""
    figures = rec.get("figures") or {}
    print(f"\n{rec['name']}:\n" + "\n".join(figures.get("pairing_table") or []))
    every = figures.get("cases") or {}
    cases = {k: v for k, v in every.items() if k in expected_ids}
    problems = [f"case {cid} did not run" for cid in sorted(expected_ids - set(cases))]
    problems += [f"{cid}: {c.get('why')}" for cid, c in cases.items() if not c.get("ok")]
    if problems:
        pytest.fail("\n".join(problems) + "\n" + explain(rec), pytrace=False)
    return cases


PAIRINGS = {"tlshd>ktlsd", "ktlsd>tlshd", "ktlsd>ktlsd"}
#: The rows the scenario's SHA384_CROSS table must hold (ktlsd setting, host, target).
FLEET_SHA384_TABLE = {
    ("accept", "tlshd", "ktlsd"), ("accept", "ktlsd", "tlshd"), ("offer", "ktlsd", "tlshd"),
    ("refuse", "tlshd", "ktlsd"), ("refuse", "ktlsd", "tlshd"),
}  # fmt: skip


def test_fleet_nvme_sha256_both_directions_and_reference(scenario) -> None:
    cases = fleet_cases(scenario("fleet-nvme"), {f"nvme-sha256 {p}" for p in PAIRINGS})
    for case in cases.values():
        assert case["outcome"] == "pass" and case["bytes_verified"] == 2 * 16 * MIB
        assert case["binder_bytes"] == 32 and str(case["suite"]).endswith("SHA256")


def test_fleet_nvme_sha384_ktlsd_with_ktlsd_is_spec_correct(scenario) -> None:
    cases = fleet_cases(scenario("fleet-nvme"), {"nvme-sha384 ktlsd>ktlsd"})
    reference = cases["nvme-sha384 ktlsd>ktlsd"]
    assert reference["suite"] == "TLS_AES_256_GCM_SHA384" and reference["binder_bytes"] == 48
    assert reference["bytes_verified"] == 2 * 16 * MIB


def test_fleet_nvme_sha384_cross_follows_legacy_psk_sha384(scenario) -> None:
    """Needs ``[ktlsd] legacy_psk_sha384``: until it is in the tree these rows fail."""
    ids = {f"nvme-sha384 {h}>{t} [{s}]" for s, h, t in FLEET_SHA384_TABLE}
    cases = fleet_cases(scenario("fleet-nvme"), ids)
    for cid, case in cases.items():
        if case["expected"] == "pass-legacy":  # the old binding, and it carried the data
            assert case["binder_bytes"] == 32 and str(case["suite"]).endswith("SHA256"), cid
            assert case["bytes_verified"] == 2 * 16 * MIB, cid
        else:  # refused at once, and the log says why
            assert case["expected"] == "fail", cid
            assert case["outcome"] == "fail" and case["connect_seconds"] < 6, cid
            assert "legacy_psk_sha384" in case["ktlsd_log"], cid
    assert cases["nvme-sha384 tlshd>ktlsd [accept]"]["outcome"] == "pass"  # default setting
    assert cases["nvme-sha384 ktlsd>tlshd [offer]"]["outcome"] == "pass"


def test_fleet_nvme_concat_both_directions(scenario) -> None:
    cases = fleet_cases(scenario("fleet-nvme"), {f"nvme-concat {p}" for p in PAIRINGS})
    for case in cases.values():
        assert case["outcome"] == "pass" and case["bytes_verified"] == 2 * MIB
        assert "NVMe1G" in case["wire"]


def test_fleet_nvme_wrong_psk_fails_promptly_both_directions(scenario) -> None:
    cases = fleet_cases(scenario("fleet-nvme"), {f"nvme-wrong-psk {p}" for p in PAIRINGS})
    for cid, case in cases.items():
        assert case["outcome"] == "fail" and case["connect_seconds"] < 6, cid
        assert case["status"]["host kernel (DONE status)"], cid
        print(f"{cid}: {case['status']}")


@pytest.mark.parametrize("mode", ["tls", "mtls"])
def test_fleet_nfs_both_directions(scenario, mode: str) -> None:
    cases = fleet_cases(scenario("fleet-nfs"), {f"nfs-{mode} {p}" for p in PAIRINGS})
    for case in cases.values():
        assert case["outcome"] == "pass" and case["bytes_verified"] == 2 * 4 * MIB
        assert str(case["suite"]).startswith("TLS_")


# -- the newest tlshd (Debian unstable, GnuTLS >= 3.8.11) against ktlsd -------------------------

NEW_PAIRINGS = {"tlshd-sid>ktlsd", "ktlsd>tlshd-sid"}


def test_fleet_newtlshd_is_built_against_gnutls_3_8_11(scenario) -> None:
    rec = scenario("fleet-newtlshd")  # the finding holds whatever the cases did
    figures = rec.get("figures") or {}
    assert "sid_tlshd" in figures, explain(rec)
    sid = figures["sid_tlshd"]
    print(f"sid tlshd: {sid}")
    gnutls = str(sid["packages"]["libgnutls30t64"]).split("-")[0].split(".")
    assert tuple(int(x) for x in gnutls[:3]) >= (3, 8, 11), sid
    assert "libgnutls.so.30" in sid["tlshd_gnutls_ldd"], sid


def test_fleet_newtlshd_nvme_sha256_both_directions(scenario) -> None:
    cases = fleet_cases(scenario("fleet-newtlshd"), {f"nvme-sha256 {p}" for p in NEW_PAIRINGS})
    for cid, case in cases.items():
        assert case["outcome"] == "pass" and case["bytes_verified"] == 2 * 16 * MIB, cid
        assert case["binder_bytes"] == 32 and str(case["suite"]).endswith("SHA256"), cid


def test_fleet_newtlshd_nvme_sha384_spec_correct_with_refuse(scenario) -> None:
    """The new tlshd binds a SHA-384 PSK as such: it works with ktlsd set to ``refuse``."""
    ids = {f"nvme-sha384 {p} [refuse]" for p in NEW_PAIRINGS}
    cases = fleet_cases(scenario("fleet-newtlshd"), ids)
    for cid, case in cases.items():
        assert case["legacy_psk_sha384"] == "refuse", cid
        assert case["outcome"] == "pass" and case["bytes_verified"] == 2 * 16 * MIB, cid
        assert case["suite"] == "TLS_AES_256_GCM_SHA384" and case["binder_bytes"] == 48, cid


def test_fleet_newtlshd_nvme_concat_and_wrong_psk(scenario) -> None:
    ids = {f"nvme-{kind} {p}" for kind in ("concat", "wrong-psk") for p in NEW_PAIRINGS}
    cases = fleet_cases(scenario("fleet-newtlshd"), ids)
    for cid, case in cases.items():
        if cid.startswith("nvme-concat"):
            assert case["outcome"] == "pass" and case["bytes_verified"] == 2 * MIB, cid
            assert "NVMe1G" in case["wire"], cid
        else:
            assert case["outcome"] == "fail" and case["connect_seconds"] < 6, cid
            assert case["status"]["host kernel (DONE status)"], cid


@pytest.mark.parametrize("mode", ["tls", "mtls"])
def test_fleet_newtlshd_nfs_both_directions(scenario, mode: str) -> None:
    cases = fleet_cases(scenario("fleet-newtlshd-nfs"), {f"nfs-{mode} {p}" for p in NEW_PAIRINGS})
    for cid, case in cases.items():
        assert case["outcome"] == "pass" and case["bytes_verified"] == 2 * 4 * MIB, cid
        assert str(case["suite"]).startswith("TLS_"), cid


def test_pq_mldsa_nfs_mtls_and_openssl_peers(scenario) -> None:
    """Issue 14 item 2: ML-DSA-65 chains chosen by the peer's signature_algorithms and
    X25519MLKEM768, in NFS mtls between ktlsd ends (log and capture) and against openssl."""
    rec = scenario("pq-mldsa")
    figures = assert_passed(rec)
    assert figures["bytes_verified"] == 2 * 4 * MIB
    assert figures["agent_successful_handshakes_logged"] >= 4
    assert figures["hellos_captured"] >= 2
    checks = {c["check"]: c["ok"] for c in rec["checks"]}  # type: ignore[union-attr]
    for needle in ("group=X25519MLKEM768", "0x11EC", "s_server with ML-DSA chain only",
                   "s_server with classic chain only", "-client_sigalgs mldsa65",
                   "-client_sigalgs ecdsa_secp256r1_sha256", "s_client -sigalgs mldsa65",
                   "s_client -sigalgs ecdsa_secp256r1_sha256"):
        matching = [ok for name, ok in checks.items() if needle in name]
        assert matching and all(matching), f"no passing check mentions {needle!r}"
