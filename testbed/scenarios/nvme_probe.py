"""Shared runner for the NVMe toolkit's guest-side probes (tests/nvme/kernel_*_probe.py).

Each probe is a standalone script written for the test bed: it takes an output path, writes a
JSON report (``passed`` and per-case entries) there and exits non-zero on failure. The
``dhchap-probe``, ``host-probe`` and ``cli-probe`` scenarios run one each through
:func:`run_probe`, which turns the probe's report into scenario figures and checks: the
scenario passes only if the probe exited 0 *and* its report says passed, and every case
shows up as a check so a failure names the case. A failed case also gets a detail line
made of the whitelisted, non-secret fields in :data:`SHOWN_FIELDS` and the class name of
its exception (never the message, never other fields: the reports may hold secrets).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import PROJECT, Scenario

#: Case fields safe to copy into the scenario result: names, statuses, reason codes, flags.
SHOWN_FIELDS = (
    "connect_status",
    "cntlid",
    "auth_send_status",
    "auth_receive_status",
    "authenticated",
    "failed",
    "closed_during",
    "property_get_status",
    "target_failure1",
    "target_fatal_error",
    "target_response_mismatch",
    "failure_seen_as",
    "target_key_found",
    "target_key_matches",
)


def case_summary(entry: dict[str, object]) -> str:
    """The non-secret fields of one case record, ``key=value`` separated by spaces."""
    parts = [f"{key}={entry[key]!r}" for key in SHOWN_FIELDS if key in entry]
    error = entry.get("error")
    if isinstance(error, str) and error.strip():
        last = error.strip().splitlines()[-1]
        parts.append(f"error={last.split(':', 1)[0].strip()}")  # exception class only
    return " ".join(parts)


def run_probe(probe: str) -> None:
    """Run ``tests/nvme/kernel_<probe>_probe.py`` and report its result as this scenario's."""
    with Scenario() as sc:
        script = PROJECT / "tests" / "nvme" / f"kernel_{probe}_probe.py"
        out = sc.result_path.with_suffix(".out")
        out.unlink(missing_ok=True)
        started = time.monotonic()
        # Output withheld from the log: the probes' reports may hold generated secrets (they
        # stay in the guest's results directory, thrown away with the run).
        proc = sc.sh(
            [sys.executable, str(script), str(out)], check=False, timeout=170, secret_output=True
        )
        sc.figure("probe_seconds", round(time.monotonic() - started, 2))
        sc.figure("probe_exit", proc.returncode)
        sc.check(out.exists(), f"{script.name} wrote its report")
        report = json.loads(out.read_text())
        entries = report.get("cases") or report.get("checks") or []
        passed = [e for e in entries if e.get("passed")]
        sc.figure("cases_passed", f"{len(passed)}/{len(entries)}")
        for key, value in (report.get("info") or {}).items():
            if key in ("nvme_cli", "ktlsd_variant_used"):
                sc.figure(key, " / ".join(str(value).splitlines()))
        for e in entries:
            name = e.get("case") or e.get("check")
            sc.check(bool(e.get("passed")), f"probe case {name}", fatal=False)
            if not e.get("passed"):
                sc.detail(f"probe case {name}: {case_summary(e)}")
        seen = {str(e.get("case")): e["failure_seen_as"] for e in entries if "failure_seen_as" in e}
        if seen:
            sc.figure("expected_failures_seen_as", ", ".join(f"{k}: {v}" for k, v in seen.items()))
        sc.check(bool(entries), "the probe reported at least one case")
        sc.check(
            report.get("passed") is True and proc.returncode == 0,
            f"{script.name}: report passed and exit 0 (exit {proc.returncode})",
        )
