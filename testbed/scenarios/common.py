"""Shared plumbing for guest-side scenarios (stdlib only: runs on the guest's python3).

A scenario script does::

    with Scenario() as sc:
        sc.figure("connect_seconds", 0.41)
        sc.check(data == expected, "read-back matches")

and :class:`Scenario` writes ``{"passed", "figures", "details", "checks"}`` to the path
given as ``argv[1]``. Any exception fails the scenario with a one-line reason; ``check``
records every assertion, so a passing result also says what was verified.

:func:`start_agent` is the single place that knows how to start a handshake agent, so each
scenario runs unchanged with ``AGENT=tlshd`` or ``AGENT=ktlsd``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

PROJECT = Path(__file__).resolve().parents[2]  # /ktlsd in the guest


class ScenarioFailed(Exception):
    """A check that must hold did not; the message is the one-line reason."""


class Scenario:
    """Collects figures, details and checks; writes the result file on exit."""

    def __init__(self, result_path: str | None = None) -> None:
        self.result_path = Path(result_path or sys.argv[1])
        self.figures: dict[str, object] = {}
        self.details: list[str] = []
        self.checks: list[dict[str, object]] = []
        self.agent = os.environ.get("AGENT", "tlshd")
        self._cleanups: list[tuple[str, object]] = []

    # -- recording -------------------------------------------------------------------------
    def figure(self, name: str, value: object) -> None:
        self.figures[name] = value
        print(f"figure {name} = {value}", flush=True)

    def detail(self, text: str) -> None:
        self.details.append(text)
        print(f"detail: {text}", flush=True)

    def check(self, ok: bool, what: str, fatal: bool = True) -> bool:
        self.checks.append({"check": what, "ok": bool(ok)})
        print(f"check {'ok  ' if ok else 'FAIL'} {what}", flush=True)
        if not ok and fatal:
            raise ScenarioFailed(what)
        return bool(ok)

    def cleanup(self, fn: object, label: str = "") -> None:
        """Run ``fn()`` when the scenario ends (last registered first)."""
        self._cleanups.append((label, fn))

    # -- commands --------------------------------------------------------------------------
    def sh(
        self,
        cmd: str | list[str],
        *,
        check: bool = True,
        timeout: float = 60,
        input: str = "",
        secret_output: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command, echo it and its output to the scenario log; fail on non-zero exit.

        ``secret_output=True`` for commands that print key material (``nvme gen-tls-key``):
        their output is neither logged nor put into a failure message.
        """
        argv = shlex.split(cmd) if isinstance(cmd, str) else cmd
        print(f"$ {shlex.join(argv)}", flush=True)
        proc = subprocess.run(
            argv, text=True, capture_output=True, timeout=timeout, input=input or None
        )
        out = (proc.stdout + proc.stderr).rstrip()
        if secret_output:
            out = f"(output withheld: may contain key material; exit {proc.returncode})"
        if out:
            print(out, flush=True)
        if check and proc.returncode != 0:
            last = out.splitlines()[-1] if out else ""
            raise ScenarioFailed(f"{shlex.join(argv)} exited {proc.returncode}: {last}")
        return proc

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> Scenario:
        self.started = time.monotonic()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        passed = exc is None
        if exc is not None:
            reason = str(exc) if isinstance(exc, ScenarioFailed) else f"{exc_type.__name__}: {exc}"
            self.details.append(f"FAILED: {reason}")
            if not isinstance(exc, ScenarioFailed):
                import traceback

                traceback.print_exception(exc)
        for label, fn in reversed(self._cleanups):
            try:
                fn()  # type: ignore[operator]
            except Exception as cexc:
                print(f"cleanup {label} failed: {cexc}", flush=True)
        self.figures.setdefault("scenario_seconds", round(time.monotonic() - self.started, 2))
        result = {
            "passed": passed,
            "agent": self.agent if "AGENT" in os.environ else None,
            "figures": self.figures,
            "details": self.details,
            "checks": self.checks,
        }
        self.result_path.write_text(json.dumps(result, indent=2) + "\n")
        return True  # the result file carries the failure; exit status stays 0


# -- agents ----------------------------------------------------------------------------------


class Agent:
    """A running handshake agent whose combined output goes to a log file."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def write_tlshd_conf(
    path: Path,
    *,
    keyrings: str = ".nvme",
    client: dict[str, str] | None = None,
    server: dict[str, str] | None = None,
) -> Path:
    """tlshd.conf: debug logging, the keyrings to search, optional x509 material per side."""
    lines = ["[debug]", "loglevel=2", "tls=0", "nl=0", "", "[authenticate]"]
    lines.append(f"keyrings={keyrings}")
    for section, items in (("client", client), ("server", server)):
        lines += ["", f"[authenticate.{section}]"]
        for key, value in (items or {}).items():
            lines.append(f"{key}={value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_command(agent: str, config: Path) -> list[str]:
    """The command that runs ``agent`` in the foreground, logging to stderr.

    ``tlshd``: ktls-utils' daemon (``-s`` logs to stderr). ``ktlsd``: this project's agent,
    run from the shared tree; it reads the same tlshd.conf-style file (drop-in replacement).
    """
    if agent == "tlshd":
        return ["tlshd", "-s", "-c", str(config)]
    if agent == "ktlsd":
        return [sys.executable, "-m", "ktlsd", "run", "--config", str(config)]
    raise ValueError(f"unknown agent {agent!r} (expected tlshd or ktlsd)")


def start_agent(sc: Scenario, agent: str, config: Path, tag: str = "") -> Agent:
    """Start ``agent`` with ``config``; wait until it has joined the handshake multicast group.

    The agent is stopped when the scenario ends. Readiness is checked by the process still
    running after a short settle time; a kernel consumer with no listener fails with ESRCH,
    which the scenarios would report clearly anyway.
    """
    log = Path(f"/tmp/agent-{agent}{'-' + tag if tag else ''}.log")
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    out = open(log, "wb")  # noqa: SIM115 - owned by the child's lifetime
    proc = subprocess.Popen(
        agent_command(agent, config), stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/tmp"
    )
    handle = Agent(agent, proc, log)
    sc.cleanup(handle.stop, f"stop {agent}")
    time.sleep(0.5)
    if proc.poll() is not None:
        raise ScenarioFailed(
            f"{agent} exited at start ({proc.returncode}): {handle.output().strip()[-300:]}"
        )
    return handle


def tls_stat() -> dict[str, int]:
    """/proc/net/tls_stat as a dict (empty if the tls module is not loaded)."""
    try:
        text = Path("/proc/net/tls_stat").read_text()
    except FileNotFoundError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}


def modprobe(sc: Scenario, *modules: str) -> None:
    for m in modules:
        sc.sh(["modprobe", m])
