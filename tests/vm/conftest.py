"""Session fixtures for the real-kernel tests: ONE build, ONE boot for all scenarios, and one
more boot for the systemd flavour (tests/vm/test_systemd_guest.py).

Every test under tests/vm/ is marked ``vm`` automatically, so ``pytest -m "not vm"`` leaves
them out and ``pytest -m vm tests/vm`` runs only them. If the guest cannot be built (no
network, missing host tools, not root) the tests FAIL with the reason -- they never skip:
a test bed that silently does nothing would hide exactly the regressions it exists for.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# testbed/ is not part of the installed package: import it from the repository itself.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from testbed import build, run, systemd_run

#: Scenarios booted together by the session fixture. ``KTLSD_VM_SCENARIOS`` (comma-separated)
#: overrides the list, e.g. to add the ``-ktlsd`` variants once ``ktlsd run`` exists.
SCENARIOS = [
    s
    for s in os.environ.get("KTLSD_VM_SCENARIOS", ",".join(run.default_scenarios())).split(",")
    if s
]


#: Host-only tests of the test bed's own plumbing: fast, no guest, part of the default suite.
HOST_ONLY = {"test_testbed_host.py"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        path = Path(item.fspath)
        if here in path.parents and path.name not in HOST_ONLY:
            item.add_marker(pytest.mark.vm)


@pytest.fixture(scope="session")
def vm_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Build (cached) and boot the guest once; return the report of testbed.run.run()."""
    results = tmp_path_factory.mktemp("vm-results")
    try:
        report = run.run(SCENARIOS, results_dir=results)
    except build.BuildError as exc:
        pytest.fail(f"cannot build the test-bed guest: {exc}", pytrace=False)
    (results / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + run.format_report(report))
    _REPORTS.append(run.format_report(report))
    return report


_REPORTS: list[str] = []


@pytest.fixture(scope="session")
def systemd_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The systemd flavour: one QEMU process, two guest boots (testbed.systemd_run)."""
    results = tmp_path_factory.mktemp("vm-systemd")
    try:
        report = systemd_run.run(results_dir=results)
    except build.BuildError as exc:
        pytest.fail(f"cannot build the test-bed guest or the .deb: {exc}", pytrace=False)
    (results / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = run.format_report(report)
    print("\n" + text)
    _REPORTS.append(text)
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Show the test bed's table (kernel, per-scenario results and figures) even without -s."""
    for text in _REPORTS:
        terminalreporter.section("real-kernel test bed report")
        terminalreporter.write_line(text)


@pytest.fixture
def scenario(vm_report: dict[str, object], request: pytest.FixtureRequest):
    """Look up one scenario's result by the test's ``scenario_name`` parameter."""

    def get(name: str) -> dict[str, object]:
        for rec in vm_report["scenarios"]:  # type: ignore[union-attr]
            if rec["name"] == name:
                return rec
        pytest.fail(f"scenario {name!r} was not run (scenarios: {SCENARIOS})", pytrace=False)

    return get
