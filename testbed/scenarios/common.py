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
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from testbed.scenarios.netns import Netns, netlink_group_members_of

PROJECT = Path(__file__).resolve().parents[2]  # /ktlsd in the guest
#: The sid chroot with the newest tlshd (agent ``tlshd-sid``), made by testbed/build.py.
SID_TLSHD_ROOT = "/opt/sid-tlshd"


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
        self.agents: list[Agent] = []

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
            # stdout is where key material goes; stderr only carries diagnostics.
            err = proc.stderr.strip() if proc.returncode != 0 else ""
            out = f"(stdout withheld: may contain key material; exit {proc.returncode}) {err}"
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
        if not passed:
            for agent in self.agents:
                print(f"--- {agent.name} log ({agent.log.name}) tail ---", flush=True)
                print("\n".join(agent.output().splitlines()[-25:]), flush=True)
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
        self.netns: Netns | None = None
        self.group = 0
        self.before = 0
        self.started = time.monotonic()
        self.tag = ""

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.output().splitlines()

    def successful_handshakes(self, since: int = 0) -> list[str]:
        """Log lines reporting a completed handshake, in each agent's own wording (from
        line ``since`` of the log on)."""
        # tlshd 1.0 says "... was successful", later ones "Handshake ... succeeded".
        if self.name.startswith("tlshd"):
            markers: tuple[str, ...] = ("was successful", "succeeded")
        else:
            markers = ("status=0 (ok)",)
        return [ln for ln in self.lines()[since:] if any(m in ln for m in markers)]

    def failure_lines(self, since: int = 0) -> list[str]:
        """Log lines (from line ``since`` on) that report a failed or refused handshake."""
        words = ("fail", "error", "denied", "reject", "alert", "refus")
        return [
            ln for ln in self.lines()[since:]
            if any(w in ln.lower() for w in words)
            or (" handshake " in ln and "status=" in ln and "status=0 " not in ln)
        ]  # fmt: skip

    def reload(self, timeout: float = 20.0) -> str:
        """SIGHUP (ktlsd re-reads its configuration); return ktlsd's log line about it."""
        import signal

        mark = len(self.lines())
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines()[mark:]:
                if "configuration reloaded" in line or "not reloaded" in line:
                    return line
            time.sleep(0.05)
        raise ScenarioFailed(f"{self.name}: no reload logged {timeout:.0f} s after SIGHUP")

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
    ktlsd: dict[str, str] | None = None,
) -> Path:
    """tlshd.conf: debug logging, the keyrings to search, optional x509 material per side,
    and optionally ktlsd's own ``[ktlsd]`` group (tlshd ignores it; only give it to ktlsd)."""
    lines = ["[debug]", "loglevel=2", "tls=0", "nl=0", "", "[authenticate]"]
    lines.append(f"keyrings={keyrings}")
    for section, items in (("client", client), ("server", server)):
        lines += ["", f"[authenticate.{section}]"]
        for key, value in (items or {}).items():
            lines.append(f"{key}={value}")
    if ktlsd:
        lines += ["", "[ktlsd]"] + [f"{key}={value}" for key, value in ktlsd.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def agent_command(agent: str, config: Path) -> list[str]:
    """The command that runs ``agent`` in the foreground, logging to stderr.

    ``tlshd``: ktls-utils' daemon (``-s`` logs to stderr). ``ktlsd``: this project's agent,
    run from the shared tree; it reads the same tlshd.conf-style file (drop-in replacement).
    """
    if agent == "tlshd":
        return ["tlshd", "-s", "-c", str(config)]
    if agent == "tlshd-sid":
        # Debian unstable's tlshd in the image's chroot; ``config`` must lie inside it. The
        # chroot keeps the caller's network namespace (netlink) and the kernel's keyrings.
        root = Path(SID_TLSHD_ROOT)
        return ["chroot", str(root), "/usr/sbin/tlshd", "-s", "-c",
                "/" + str(config.relative_to(root))]  # fmt: skip
    if agent == "ktlsd":
        # Kernel upcalls only (fail loudly if the family is missing), no user-space service.
        return [
            sys.executable, "-m", "ktlsd", "run", "--config", str(config),
            "--kernel", "yes", "--socket", "none", "--verbose",
        ]  # fmt: skip
    raise ValueError(f"unknown agent {agent!r} (expected tlshd, tlshd-sid or ktlsd)")


def start_agent(
    sc: Scenario, agent: str, config: Path, tag: str = "", netns: Netns | None = None
) -> Agent:
    """Start ``agent`` with ``config``; return once it listens on the handshake family.

    Readiness is observed, not guessed: the agent is ready when some generic netlink socket
    has joined the family's ``tlshd`` multicast group (/proc/net/netlink). Until then the
    kernel's upcall has no listener and consumers fail with ESRCH. The agent is stopped when
    the scenario ends; its log is shown if the scenario fails. With ``netns`` the agent runs
    in that network namespace and serves the consumers whose sockets live there.
    """
    return wait_ready(sc, launch_agent(sc, agent, config, tag, netns))


def launch_agent(
    sc: Scenario, agent: str, config: Path, tag: str = "", netns: Netns | None = None
) -> Agent:
    """Start ``agent`` without waiting (see :func:`start_agent`; then :func:`wait_ready`):
    lets several agents import their code at the same time."""
    log = Path(f"/tmp/agent-{agent}{'-' + tag if tag else ''}.log")
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    group = handshake_group_id()
    before = 0 if netns is not None else netlink_group_members(group)
    argv = agent_command(agent, config)
    out = open(log, "wb")  # noqa: SIM115 - owned by the child's lifetime
    started = time.monotonic()
    proc = subprocess.Popen(
        netns.cmd(argv) if netns else argv, stdout=out, stderr=subprocess.STDOUT, env=env,
        cwd="/tmp",
    )  # fmt: skip
    handle = Agent(agent, proc, log)
    handle.group, handle.netns, handle.tag = group, netns, tag
    handle.before, handle.started = before, started
    sc.cleanup(handle.stop, f"stop {agent}{' in ' + netns.name if netns else ''}")
    sc.agents.append(handle)
    return handle


def wait_ready(sc: Scenario, handle: Agent, timeout: float = 60) -> Agent:
    """Wait until ``handle``'s agent has joined the handshake multicast group."""
    proc, netns = handle.proc, handle.netns

    def members() -> int:
        if netns is None:
            return netlink_group_members(handle.group)
        # A fresh namespace has no other member: count the agent's once nsenter is in.
        if not netns.pid_inside(proc.pid):
            return 0
        return netlink_group_members_of(proc.pid, handle.group)

    deadline = handle.started + timeout
    while members() <= handle.before:
        if proc.poll() is not None:
            raise ScenarioFailed(
                f"{handle.name} exited at start ({proc.returncode}): "
                f"{handle.output().strip()[-300:]}"
            )
        if time.monotonic() > deadline:
            raise ScenarioFailed(
                f"{handle.name} did not join the handshake multicast group in {timeout:.0f} s"
            )
        time.sleep(0.05)
    tag = handle.tag or handle.name
    sc.figure(f"agent_ready_seconds_{tag}", round(time.monotonic() - handle.started, 2))
    return handle


def genl_family(name: str) -> dict[str, object]:
    """Look a generic netlink family up through the controller (pyroute2)."""
    from pyroute2.netlink import CTRL_CMD_GETFAMILY, GENL_ID_CTRL, NLM_F_REQUEST, ctrlmsg
    from pyroute2.netlink.generic import GenericNetlinkSocket

    sock = GenericNetlinkSocket()
    try:
        sock.marshal.msg_map[GENL_ID_CTRL] = ctrlmsg
        msg = ctrlmsg()
        msg["cmd"] = CTRL_CMD_GETFAMILY
        msg["version"] = 1
        msg["attrs"].append(["CTRL_ATTR_FAMILY_NAME", name])
        replies = list(sock.nlm_request(msg, msg_type=GENL_ID_CTRL, msg_flags=NLM_F_REQUEST))
        reply = replies[0]
        groups = reply.get_attr("CTRL_ATTR_MCAST_GROUPS") or []
        ops = reply.get_attr("CTRL_ATTR_OPS") or []
        return {
            "id": reply.get_attr("CTRL_ATTR_FAMILY_ID"),
            "version": reply.get_attr("CTRL_ATTR_VERSION"),
            "mcast_groups": {
                g.get_attr("CTRL_ATTR_MCAST_GRP_NAME"): g.get_attr("CTRL_ATTR_MCAST_GRP_ID")
                for g in groups
            },
            "commands": sorted(o.get_attr("CTRL_ATTR_OP_ID") for o in ops),
        }
    finally:
        sock.close()


def handshake_group_id() -> int:
    """The id of the handshake family's ``tlshd`` multicast group (dynamic, per boot)."""
    return int(genl_family("handshake")["mcast_groups"]["tlshd"])  # type: ignore[index]


def netlink_group_members(group: int) -> int:
    """How many generic netlink sockets have joined ``group`` (ids <= 32 are visible)."""
    count = 0
    for line in Path("/proc/net/netlink").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) > 3 and fields[1] == "16" and int(fields[3], 16) & (1 << (group - 1)):
            count += 1
    return count


def tls_stat() -> dict[str, int]:
    """/proc/net/tls_stat as a dict (empty if the tls module is not loaded)."""
    try:
        text = Path("/proc/net/tls_stat").read_text()
    except FileNotFoundError:
        return {}
    return {k: int(v) for k, v in (line.split() for line in text.splitlines() if line.strip())}


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now. Scenarios share one boot, and
    some leave kernel listeners behind (an nvmet port stays bound until its configfs entry
    goes), so a fixed port number can be taken by an earlier scenario."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def modprobe(sc: Scenario, *modules: str) -> None:
    for m in modules:
        sc.sh(["modprobe", m])
