"""The command line: what each command imports, tlshd's flags on ``ktlsd run``, ``--check``.

Imports are read off the real interpreter: ``sys.modules`` after the command ran, or
``python -X importtime`` lines of a real ``ktlsd run`` up to the moment it is ready.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktlsd import __version__, config
from ktlsd.cli import COMMANDS, build_parser, chosen_command, main
from ktlsd.client import submit
from tests.agent_helpers import REPO, AgentProcess, tcp_pair
from tests.waiting import run

# What a lean start must not import: the TLS engine, x509 parsing, the NVMe toolkit, the
# other commands.
HEAVY = ("ktlsd.tls.handshake", "ktlsd.tls._openssl", "ktlsd.material", "ktlsd.credentials",
         "ktlsd.keyupdate", "ktlsd.tls.record", "ktlsd.tls.keyschedule", "cryptography",
         "cryptography.x509", "ktlsd.nvme", "ktlsd.nvme.dhchap", "ktlsd.commands.demo",
         "ktlsd.commands.tools", "ktlsd.commands.doctor")
# Standard modules nothing needs before ready: shutil (with bz2/lzma, what argparse imports
# for the terminal width) and secrets (with hmac/random/hashlib, for session-key names).
NOT_BEFORE_READY = ("shutil", "bz2", "lzma", "_compression", "secrets", "hmac", "random",
                    "hashlib")


def ktlsd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ktlsd", *args], capture_output=True,
                          text=True, timeout=60, check=False, cwd=REPO, env=env)


def modules_after(argv: list[str]) -> set[str]:
    """The modules loaded once ``ktlsd <argv>`` has run (it may exit through argparse)."""
    code = (
        "import sys\n"
        "from ktlsd.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('MODULES', ' '.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=True, cwd=REPO)
    line = next(x for x in result.stdout.splitlines() if x.startswith("MODULES "))
    return set(line.split()[1:])


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["run", "-v"]])
def test_help_and_version_import_no_command_module(argv: list[str]) -> None:
    loaded = modules_after(argv)
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))
    assert "ktlsd.agent" not in loaded and "asyncio" not in loaded
    assert not loaded & set(NOT_BEFORE_READY), sorted(loaded & set(NOT_BEFORE_READY))


def test_a_command_imports_its_own_module_only() -> None:
    loaded = modules_after(["nvme", "--help"])
    assert "ktlsd.nvme.cli" in loaded
    others = {"ktlsd.daemon", "ktlsd.agent", "ktlsd.commands.demo", "ktlsd.commands.tools",
              "ktlsd.commands.doctor", "ktlsd.tls.handshake", "cryptography.x509"}
    assert not loaded & others, sorted(loaded & others)


def test_run_is_ready_without_the_engine_and_loads_it_for_the_first_handshake(
    tmp_path: Path,
) -> None:
    agent = AgentProcess(tmp_path, python_options=["-X", "importtime"])
    with agent:
        ready_at = next(i for i, line in enumerate(agent.lines) if "ktlsd agent running" in line)
        imported = {line.rsplit("|", 1)[1].strip() for line in agent.lines[:ready_at]
                    if line.startswith("import time:") and "|" in line}
        assert "ktlsd.agent" in imported and "ktlsd.upcall.service" in imported
        assert not imported & set(HEAVY), sorted(imported & set(HEAVY))
        assert not imported & set(NOT_BEFORE_READY), sorted(imported & set(NOT_BEFORE_READY))

        run(_one_psk_handshake(agent.socket_path))
        assert agent.matching(r"import time:.*\| +ktlsd\.tls\.handshake$")
    assert agent.wait_exit() == 0


async def _one_psk_handshake(path: str) -> None:
    a, b = tcp_pair()
    psk = [("lean", bytes(range(32)), "sha256")]
    with a, b:
        da, db = await asyncio.gather(
            submit(a, role="client", auth="psk", psk=psk, service_path=path),
            submit(b, role="server", auth="psk", psk=psk, service_path=path),
        )
    assert (da.status, db.status) == (0, 0), (da.reason, db.reason)


def test_every_command_is_listed_with_its_modules_own_summary() -> None:
    parser = build_parser()  # the full parser: every module imported
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    registered = {action.dest: action.help for action in subparsers._choices_actions}
    assert registered == {c.name: c.summary for c in COMMANDS}
    lean = build_parser(["--help"])
    lean_actions = next(a for a in lean._actions if isinstance(a, argparse._SubParsersAction))
    assert [a.dest for a in lean_actions._choices_actions] == [c.name for c in COMMANDS]


def test_the_chosen_command_is_the_first_word() -> None:
    assert chosen_command(["run", "-c", "x"]) == "run"
    assert chosen_command(["--version"]) is None
    assert chosen_command(["-h", "nvme", "gen-tls-key"]) == "nvme"
    assert chosen_command([]) is None
    assert chosen_command(["--", "run"]) is None


# --- tlshd's flags on ``ktlsd run`` ----------------------------------------------------------


@pytest.mark.parametrize("flag", ["-v", "--version"])
def test_run_v_is_the_version_as_in_tlshd(flag: str) -> None:
    result = ktlsd("run", flag)
    assert result.returncode == 0
    assert result.stdout.strip() == f"ktlsd {__version__}"


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_run_help_states_the_flags_and_the_real_search_order(flag: str) -> None:
    result = ktlsd("run", flag)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for option in ("-c FILE, --config FILE", "-s, --stderr", "-v, --version", "--debug",
                   "--check", "--syslog"):
        assert option in text
    order = (f"-c FILE; else ${config.ENV_CONFIG}; else {config.LEGACY_CONFIG_PATH} when it "
             f"exists (tlshd's legacy name, logged at notice), then "
             f"{config.CONFIG_PATH}; else built-in defaults")
    assert order in text
    assert config.SEARCH_PATHS == (config.LEGACY_CONFIG_PATH, config.CONFIG_PATH)


def test_tlshd_flags_and_long_options_parse(tmp_path: Path) -> None:
    parser = build_parser(["run"])
    args = parser.parse_args(["run", "-c", "/etc/x", "-s"])
    assert (args.config, args.stderr, args.debug, args.syslog) == ("/etc/x", True, False, False)
    args = parser.parse_args(["run", "--config=/etc/y", "--stderr", "--verbose", "--syslog"])
    assert (args.config, args.stderr, args.debug, args.syslog) == ("/etc/y", True, True, True)
    assert parser.parse_args(["run", "--debug"]).debug is True
    # -s with a configuration check: accepted, and the check runs
    good = tmp_path / "config"
    good.write_text("[debug]\nloglevel=0\n")
    result = ktlsd("run", "-s", "-c", str(good), "--check")
    assert result.returncode == 0, result.stderr
    # A short option tlshd does not have is refused (ktlsd's own options are long only).
    refused = ktlsd("run", "-x")
    assert refused.returncode == 2 and "unrecognized arguments: -x" in refused.stderr


# --- ``ktlsd run --check`` -------------------------------------------------------------------


def test_check_reports_a_configuration_error_in_one_line_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "config"
    bad.write_text("[debug]\nloglevel=1\n[ktlsd]\nmax_concurrent = many\n")
    result = ktlsd("run", "--check", "-c", str(bad))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"ktlsd: {bad}:4: [ktlsd] max_concurrent: 'many' is not an integer"
    ]
    assert result.stdout == ""


def test_check_accepts_a_good_file_and_shows_its_warnings(tmp_path: Path) -> None:
    good = tmp_path / "config"
    good.write_text("[debug]\nloglevel = 2 # two\n[future]\nkey=1\n")
    result = ktlsd("run", "--check", "-c", str(good), "--socket", str(tmp_path / "s.sock"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"ktlsd: configuration OK: {good}; service socket {tmp_path / 's.sock'}; kernel auto; "
        "log level debug"
    ]
    assert f"ktlsd: WARNING {good}:3: unknown group [future] ignored" in result.stderr


def test_check_refuses_what_would_stop_the_service(tmp_path: Path) -> None:
    conf = tmp_path / "config"
    conf.write_text(f"[ktlsd]\nservice_socket = {tmp_path}/absent/hs.sock\n"
                    "service_group = no-such-group-here\n")
    result = ktlsd("run", "--check", "-c", str(conf))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "ktlsd: [ktlsd] service_group: unknown group 'no-such-group-here'",
        f"ktlsd: [ktlsd] service_socket: directory {tmp_path}/absent does not exist (ktlsd "
        "creates only the runtime directory, $RUNTIME_DIRECTORY or /run/ktlsd)",
    ]
    # The same socket path inside the runtime directory systemd names is fine.
    inside = ktlsd("run", "--check", "-c", str(conf), "--socket",
                   str(tmp_path / "runtime" / "hs.sock"),
                   env={"RUNTIME_DIRECTORY": str(tmp_path / "runtime"), "PATH": "/usr/bin:/bin"})
    assert "service_socket" not in inside.stderr


@pytest.fixture
def ktlsd_logger() -> Iterator[None]:
    """``main()`` in this process configures the ``ktlsd`` logger: put it back afterwards."""
    logger = logging.getLogger("ktlsd")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


def test_the_legacy_file_notice_is_logged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capfd: pytest.CaptureFixture[str],
                                          ktlsd_logger: None) -> None:
    """``run`` sets up logging before it reads the configuration, so the notice that the
    legacy file is read (tlshd: "Please relocate ...") reaches the log."""
    legacy = tmp_path / "tlshd.conf"
    legacy.write_text("[debug]\nloglevel=0\n")
    monkeypatch.delenv("KTLSD_CONFIG", raising=False)
    monkeypatch.setattr(config, "LEGACY_CONFIG_PATH", str(legacy))
    monkeypatch.setattr(config, "SEARCH_PATHS", (str(legacy), str(tmp_path / "config")))
    assert main(["run", "--check", "--socket", "none"]) == 0
    out, err = capfd.readouterr()
    assert (f"ktlsd: NOTICE reading the legacy {legacy} (newer tlshd releases read "
            f"{config.CONFIG_PATH}; move it there once no tlshd 1.0 on this host needs the old "
            f"name)") in err.splitlines()
    assert re.search(rf"configuration OK: {re.escape(str(legacy))};", out)


def test_nothing_is_written_next_to_the_code_at_run_time(tmp_path: Path) -> None:
    """A byte-compiled copy of the package (what a package install ships) is left exactly as
    it was by --help, --version, ``run`` and its first handshake (the engine's lazy import)."""
    import shutil

    code = tmp_path / "code"
    shutil.copytree(REPO / "ktlsd", code / "ktlsd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(code / "ktlsd")], check=True)

    def tree() -> dict[str, float]:
        return {str(p.relative_to(code)): p.stat().st_mtime for p in code.rglob("*")}

    before = tree()
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
           "PYTHONPATH": str(code)}
    where = subprocess.run([sys.executable, "-c", "import ktlsd; print(ktlsd.__file__)"],
                           env=env, capture_output=True, text=True, check=True, cwd=tmp_path)
    assert where.stdout.strip() == str(code / "ktlsd" / "__init__.py")
    for argv in (["--help"], ["--version"], ["run", "--help"]):
        subprocess.run([sys.executable, "-m", "ktlsd", *argv], env=env, cwd=tmp_path,
                       capture_output=True, check=True)
    workdir = tmp_path / "agent"
    workdir.mkdir()
    with AgentProcess(workdir, env={"PYTHONPATH": str(code)}) as agent:
        run(_one_psk_handshake(agent.socket_path))
    assert agent.wait_exit() == 0
    assert tree() == before
