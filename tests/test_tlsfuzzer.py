"""tlsfuzzer's TLS 1.3 server scripts against ``ktlsd listen --www`` and ``openssl s_server -www``.

tlsfuzzer (the TLS conformance suite of the tlsfuzzer project, pinned and vendored next to the
repository in ``../shared/vendor/tlsfuzzer``) plays a scripted, often deliberately broken TLS
1.3 client and checks every answer of the server, alerts included. Each script below runs once
against ktlsd and once against OpenSSL's own server, both at the same time, with the same
random seed so that both see the very same cases. The verdict: **ktlsd passes every case
OpenSSL passes**, apart from the exceptions listed in :data:`KTLSD_EXCEPTIONS` with their
reasons. Cases OpenSSL fails too are reported, not asserted.

Both servers get the same RSA certificate (the scripts offer RSA signature schemes only) and
the same external PSK (for ``test-tls13-psk_dhe_ke``). ktlsd runs with ``--record-layer user``:
the user-space record layer has the kTLS semantics and behaves the same on every machine; the
kernel layer is exercised by the VM tests.

Where tlsfuzzer lives: ``../shared/vendor/tlsfuzzer`` relative to the repository root, or the
directory named by ``KTLSD_TLSFUZZER_DIR``. When it (or the pinned ``tlslite-ng``) is missing,
the test fails in CI (``CI=true``) with a clear message and is skipped elsewhere.

Select with ``-m tlsfuzzer``; it takes about a minute on an idle 2-core machine.
"""

from __future__ import annotations

import ast
import concurrent.futures
import importlib.metadata
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cli_peers import Proc, start_ktlsd_listen
from tests.peers import free_port
from tests.pki import Authority
from tests.waiting import wait_listening

pytestmark = pytest.mark.tlsfuzzer

REPO_ROOT = Path(__file__).resolve().parents[1]
TLSFUZZER_DIR = Path(
    os.environ.get("KTLSD_TLSFUZZER_DIR") or REPO_ROOT.parent / "shared" / "vendor" / "tlsfuzzer"
)
TLSLITE_VERSION = "0.9.0b2"  # what the vendored tlsfuzzer needs; pinned in pyproject.toml

PSK_IDENTITY = "tlsfuzzer"
PSK_HEX = "5a" * 32  # throwaway, tests only
#: Same seed for both runs of a script: the cases a script generates and samples at random
#: (e.g. "invalid message_type - 172, in KeyUpdate msg") come out the same for both servers.
SEED = 20240601
#: Per script: at most this long (a script that hangs fails the test instead of CI).
SCRIPT_TIMEOUT = 300

#: Script -> extra options. ``-n 0`` runs every case the script has: all of them together
#: take well under the budget, so nothing is sampled away.
SCRIPTS: dict[str, list[str]] = {
    "test-tls13-conversation": [],
    "test-tls13-finished": ["-n", "0"],
    "test-tls13-record-layer-limits": ["-n", "0"],
    "test-tls13-keyupdate": ["-n", "0"],
    "test-tls13-ccs": ["-n", "0"],
    "test-tls13-zero-length-data": ["-n", "0"],
    "test-tls13-invalid-ciphers": ["-n", "0"],
    "test-tls13-signature-algorithms": ["-n", "0"],
    "test-tls13-hrr": ["-n", "0"],
    "test-tls13-psk_dhe_ke": ["-n", "0", "--psk", PSK_HEX, "--psk-iden", PSK_IDENTITY],
}

#: Cases run against ktlsd only (then ktlsd must pass them), with the reason.
OPENSSL_EXCLUDED: dict[tuple[str, str], str] = {
    ("test-tls13-keyupdate", "multiple KeyUpdate messages"): (
        "OpenSSL 3.0's s_server needs about a minute for it (the script waits out timeouts), "
        "a quarter of the whole budget; ktlsd answers it at once"
    ),
}

_KEY_UPDATE_ALONE = (
    "ktlsd follows a KeyUpdate only when it is alone in its record. kTLS stops receiving after "
    "any record that starts with a KeyUpdate byte (tls_check_pending_rekey) and resumes only "
    "with the next key, so a KeyUpdate split over records cannot be followed on kTLS; ktlsd "
    "refuses the first fragment with unexpected_message, on both record layers alike"
)

#: Cases ktlsd may fail although OpenSSL passes them, with the reason.
KTLSD_EXCEPTIONS: dict[tuple[str, str], str] = {
    ("test-tls13-keyupdate", "fragmented keyupdate msg"): _KEY_UPDATE_ALONE,
    (
        "test-tls13-keyupdate",
        "two KeyUpdates, first fragmented, second fragment under new keys together with "
        "second KeyUpdate",
    ): _KEY_UPDATE_ALONE + " (the script expects bad_record_mac for the second fragment)",
}


# --- finding the suite ----------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _missing(reason: str) -> None:
    message = f"tlsfuzzer cannot run: {reason}"
    if _in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _check_prerequisites() -> None:
    if not (TLSFUZZER_DIR / "tlsfuzzer" / "_apps").is_dir():
        _missing(
            f"no tlsfuzzer in {TLSFUZZER_DIR} (expected ../shared/vendor/tlsfuzzer next to the "
            "repository, or set KTLSD_TLSFUZZER_DIR)"
        )
    try:
        version = importlib.metadata.version("tlslite-ng")
    except importlib.metadata.PackageNotFoundError:
        version = None
    if version != TLSLITE_VERSION:
        _missing(
            f"tlsfuzzer needs tlslite-ng=={TLSLITE_VERSION}, found {version or 'none'} "
            "(pip install -e '.[test]')"
        )
    if shutil.which("openssl") is None:
        _missing("no openssl command to compare with")


# --- running scripts and reading their verdicts ---------------------------------------------


@dataclass
class ScriptRun:
    """One script against one server: every case's verdict (a case may run twice: sanity)."""

    script: str
    server: str
    passed: set[str] = field(default_factory=set)
    failed: set[str] = field(default_factory=set)
    output: str = ""

    @property
    def cases(self) -> set[str]:
        return self.passed | self.failed

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


_CASE_START = re.compile(r"^(\S.*) \.\.\.$")


def parse_results(script: str, server: str, output: str) -> ScriptRun:
    """Per-case verdicts from a script's output, checked against its own summary.

    A case starts with a ``<name> ...`` line, followed by ``OK`` or by the error report
    (``Error ...``); the summary at the end gives the totals and the ``FAILED:`` names (as
    Python literals). Both must agree, or the output is not understood and the test fails.
    """
    run = ScriptRun(script, server, output=output)
    lines = output.splitlines()
    started: list[str] = []
    for line, following in itertools.pairwise(lines):
        m = _CASE_START.match(line)
        if m and (following == "OK" or following.startswith("Error")):
            started.append(m.group(1))
    totals = dict(re.findall(r"^(TOTAL|PASS|FAIL|XFAIL|XPASS): (\d+)$", output, re.MULTILINE))
    if "Test end" not in output or not totals:
        raise AssertionError(f"{script} against {server} did not finish:\n{run.tail()}")
    failed: list[str] = []
    if "FAILED:\n" in output:
        for line in output.split("FAILED:\n", 1)[1].splitlines():
            if not line.startswith("\t"):
                break
            failed.append(ast.literal_eval(line.strip()))
    if len(started) != int(totals["TOTAL"]) or len(failed) != int(totals["FAIL"]):
        raise AssertionError(
            f"cannot read {script}'s output against {server}: {len(started)} cases started, "
            f"{len(failed)} failed, summary {totals}:\n{run.tail()}"
        )
    run.failed = set(failed)
    run.passed = set(started) - run.failed
    return run


def run_script(script: str, server: str, port: int, excluded: list[str]) -> ScriptRun:
    module = "tlsfuzzer._apps." + script.replace("-", "_")
    argv = [script, "-h", "127.0.0.1", "-p", str(port), *SCRIPTS[script]]
    for name in excluded:
        argv += ["-e", name]
    # Seed tlsfuzzer's random choices, then run the script as its own entry point would.
    code = (
        "import random, runpy, sys\n"
        f"random.seed({SEED})\n"
        f"sys.argv = {argv!r}\n"
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(TLSFUZZER_DIR), "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True,
            timeout=SCRIPT_TIMEOUT, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else str(exc.stdout)
        raise AssertionError(
            f"{script} against {server} ran over {SCRIPT_TIMEOUT} s:\n{out[-3000:]}"
        ) from None
    return parse_results(script, server, done.stdout + done.stderr)


# --- the two servers ------------------------------------------------------------------------


@dataclass
class Servers:
    ktlsd: Proc
    ktlsd_port: int
    openssl: Proc
    openssl_port: int


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    _check_prerequisites()
    server = Authority.create(tmp_path_factory.mktemp("tlsfuzzer-pki"), "rsa").issue_server()
    credentials = ["--cert", str(server.cert_path), "--key", str(server.key_path)]
    ktlsd_proc, ktlsd_port = start_ktlsd_listen(
        "--www", "--forever", *credentials, "--psk-identity", PSK_IDENTITY, "--psk", PSK_HEX,
        "--record-layer", "user", "--timeout", "5", "--idle-timeout", "10",
        name="ktlsd-www",
    )  # fmt: skip
    openssl_port = free_port()
    openssl_proc = Proc(
        ["openssl", "s_server", "-www", "-tls1_3", "-quiet", "-accept",
         f"127.0.0.1:{openssl_port}", "-cert", str(server.cert_path), "-key",
         str(server.key_path), "-psk_identity", PSK_IDENTITY, "-psk", PSK_HEX],
        name="openssl-s_server", stdin=False,
    )  # fmt: skip
    try:
        wait_listening(openssl_port, proc=openssl_proc)
        yield Servers(ktlsd_proc, ktlsd_port, openssl_proc, openssl_port)
    finally:
        ktlsd_proc.close()
        openssl_proc.close()


@pytest.fixture(scope="module")
def results(servers: Servers) -> dict[str, tuple[ScriptRun, ScriptRun]]:
    """Every script against both servers: ktlsd's runs and OpenSSL's in two parallel streams."""

    def against_ktlsd() -> list[ScriptRun]:
        return [run_script(s, "ktlsd", servers.ktlsd_port, []) for s in SCRIPTS]

    def against_openssl() -> list[ScriptRun]:
        runs = []
        for script in SCRIPTS:
            excluded = [case for (s, case) in OPENSSL_EXCLUDED if s == script]
            runs.append(run_script(script, "openssl", servers.openssl_port, excluded))
        return runs

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        ktlsd_runs = pool.submit(against_ktlsd)
        openssl_runs = pool.submit(against_openssl)
        pairs = zip(ktlsd_runs.result(), openssl_runs.result(), strict=True)
    for proc in (servers.ktlsd, servers.openssl):
        assert proc.proc.poll() is None, f"{proc.name} died:\n{proc.stderr_text[-3000:]}"
    return {k.script: (k, o) for k, o in pairs}


# --- the verdict ----------------------------------------------------------------------------


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_ktlsd_passes_what_openssl_passes(
    script: str, results: dict[str, tuple[ScriptRun, ScriptRun]]
) -> None:
    ktlsd_run, openssl_run = results[script]
    only_ktlsd = {case for (s, case) in OPENSSL_EXCLUDED if s == script}
    assert "sanity" in openssl_run.passed, (
        f"OpenSSL fails {script}'s sanity case: the comparison would prove nothing\n"
        f"{openssl_run.tail()}"
    )
    assert ktlsd_run.cases == openssl_run.cases | only_ktlsd, (
        "the two servers were not given the same cases: "
        f"{sorted(ktlsd_run.cases ^ (openssl_run.cases | only_ktlsd))[:10]}"
    )
    must_pass = (openssl_run.passed | only_ktlsd) - {
        case for (s, case) in KTLSD_EXCEPTIONS if s == script
    }
    regressions = sorted(must_pass & ktlsd_run.failed)
    assert not regressions, (
        f"ktlsd fails {len(regressions)} case(s) of {script} that OpenSSL passes: "
        f"{regressions}\n{_failure_reports(ktlsd_run, regressions)}"
    )
    # Reported, not asserted: what both fail, and what only ktlsd passes.
    print(
        f"{script}: {len(ktlsd_run.cases)} cases; ktlsd passes {len(ktlsd_run.passed)}, "
        f"openssl {len(openssl_run.passed)}; both fail "
        f"{len(ktlsd_run.failed & openssl_run.failed)}; only ktlsd passes "
        f"{sorted(ktlsd_run.passed & openssl_run.failed)}"
    )


def _failure_reports(run: ScriptRun, cases: list[str], limit: int = 3) -> str:
    """The script's error report for the first few failed cases."""
    reports = []
    for case in cases[:limit]:
        start = run.output.find(f"\n{case} ...\n")
        if start >= 0:
            reports.append(run.output[start : start + 2500])
    return "\n".join(reports)


def test_exceptions_are_still_needed(results: dict[str, tuple[ScriptRun, ScriptRun]]) -> None:
    """Every listed exception names a case that exists, and ktlsd still fails it.

    When ktlsd learns to pass one, the exception must go (and the case is then asserted).
    """
    for (script, case), reason in KTLSD_EXCEPTIONS.items():
        ktlsd_run, _ = results[script]
        assert reason
        assert case in ktlsd_run.cases, f"{script} has no case {case!r} any more"
        assert case in ktlsd_run.failed, f"ktlsd passes {case!r} now: drop the exception"
