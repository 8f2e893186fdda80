"""``ktlsd status``: the counters, the STATUS exchange, the renderings, real agents.

* The counters and the report (pure): each request counted once by source and outcome; the
  JSON round trip; the OpenMetrics text checked by prometheus_client's strict OpenMetrics
  parser and by a stricter checker of our own (names, ``_total``, TYPE/HELP/UNIT before the
  samples, ``# EOF`` last).
* Real ``python -m ktlsd run`` processes, asked by the real ``python -m ktlsd status``:
  counts after real successful and failed handshakes, by cause; a non-root asker (uid 65534)
  gets the one-line refusal and costs nothing; counts survive SIGHUP, the limits shown
  follow it; ``--output`` replaces its file atomically; with ``--workers 2`` the causes
  come back from the workers intact (EACCES alone would not tell an untrusted certificate
  from a rejecting peer) and a killed worker shows as a respawn.
* The root-only status socket of an agent without the service (``StatusListener``).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from ktlsd.client import submit
from ktlsd.errors import FailureCause
from ktlsd.status import (
    FAILURES,
    OK,
    STOPPING,
    RequestCounters,
    SourceStatus,
    StatusReport,
    WorkerStatus,
    outcome_of,
    render_openmetrics,
    render_text,
    report_from_json,
    report_to_json,
)
from ktlsd.upcall.service import StatusListener
from ktlsd.upcall.wire import (
    ServiceFormatError,
    decode_status_answer,
    decode_status_request,
    encode_status_answer,
    encode_status_request,
    encode_submit,
    is_status_request,
)
from tests.agent_helpers import REPO, AgentProcess, tcp_pair
from tests.pki import Authority
from tests.test_admission import NOBODY, SYSTEM_PYTHON, public_dir
from tests.waiting import await_until, run

__all__ = ["public_dir"]  # the fixture

PSK = bytes.fromhex("3d" * 32)
OTHER_PSK = bytes.fromhex("4e" * 32)
OPEN_CONFIG = "[ktlsd]\nservice_mode = 0666\n"
"""Everyone may connect: the refusal tested is the agent's uid check, not the file mode."""

needs_nobody = pytest.mark.skipif(
    not os.access(SYSTEM_PYTHON, os.X_OK) or os.getuid() != 0,
    reason="needs root and a system python3 that uid 65534 can run")


# --- counters and report (pure) ------------------------------------------------------------


def test_each_request_is_counted_once_by_source_and_outcome() -> None:
    counters = RequestCounters()
    for _ in range(3):
        counters.started("service")
    counters.started("kernel")
    assert (counters.in_flight("service"), counters.in_flight("kernel")) == (3, 1)
    counters.ended("service", outcome_of(None))
    counters.ended("service", outcome_of(FailureCause.UNTRUSTED_CERTIFICATE))
    counters.ended("kernel", outcome_of(FailureCause.TIMEOUT))
    counters.ended("service", STOPPING, started=False)  # taken, never started
    assert counters.in_flight("service") == 1
    assert counters.in_flight("kernel") == 0
    assert counters.by_source() == {
        "kernel": {"timeout": 1},
        "service": {"ok": 1, "stopping": 1, "untrusted_certificate": 1},
    }
    assert (counters.completed(), counters.failed(), counters.failed("service")) == (1, 3, 2)
    with pytest.raises(ValueError, match="unknown outcome"):
        counters.ended("service", "exploded")
    # Every FailureCause has its own outcome (EACCES's two causes stay apart).
    assert len({outcome_of(c) for c in FailureCause}) == len(FailureCause)
    assert set(FAILURES) == {outcome_of(c) for c in FailureCause} | {STOPPING}


def sample_report() -> StatusReport:
    return StatusReport(
        version="0.1.0", pid=4242, uptime_seconds=93784.25, config_file='/etc/tl"shd/config',
        sources=(SourceStatus("kernel", "handshake family", 2),
                 SourceStatus("service", "/run/ktlsd/handshake.sock", 1, pending=3,
                              connections=5)),
        requests={"kernel": {"ok": 10, "timeout": 2},
                  "service": {"ok": 7, "untrusted_certificate": 1, "peer_rejected": 4}},
        refused={"EAGAIN": 6, "EINVAL": 1},
        kept_sessions=9,
        workers=WorkerStatus(configured=2, alive=1, respawns=3),
        limits={"max_concurrent": 16, "pending_limit": 50, "uid_max_pending": 8},
    )


def test_the_report_survives_json_and_rejects_anything_else() -> None:
    report = sample_report()
    assert report_from_json(report_to_json(report)) == report
    data = json.loads(report_to_json(report))
    assert data["format"] == 1
    for bad in (b"[]", b"{", b'{"format": 2}', b'{"format": 1}', b"\xff",
                report_to_json(report).replace(b'"pid":4242', b'"pid":"4242"')):
        with pytest.raises(ValueError):
            report_from_json(bad)


def test_text_rendering_says_each_fact() -> None:
    text = render_text(sample_report())
    assert "pid 4242, up 1d 02:03:04" in text
    assert "source kernel (handshake family): 2 in flight, not visible pending" in text
    assert "source service (/run/ktlsd/handshake.sock): 1 in flight, 3 pending, " \
           "5 connections open" in text
    assert "requests service: 7 completed, 5 failed (peer_rejected 4, " \
           "untrusted_certificate 1)" in text
    assert "requests kernel: 10 completed, 2 failed (timeout 2)" in text
    assert "workers: 1 of 2 alive, 3 respawned" in text
    assert "refused by the service: EAGAIN 6, EINVAL 1" in text


METRIC_LINE = re.compile(r'^(ktlsd_[a-z_]+)(\{[^}]*\})? (-?[0-9.e+]+)$')


def check_openmetrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """A strict reading of our OpenMetrics output; the samples by (name, labels)."""
    assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    lines = text[:-1].split("\n")
    assert lines[-1] == "# EOF"
    types: dict[str, str] = {}
    helped: set[str] = set()
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    current = ""
    for line in lines[:-1]:
        if line.startswith("# "):
            kind, name, rest = line[2:].split(" ", 2)
            assert name.startswith("ktlsd_"), line
            if kind == "TYPE":
                assert name not in types, f"family {name} twice"
                types[name] = rest
                current = name
            else:
                assert name == current, f"{kind} of {name} outside its family"
                if kind == "HELP":
                    helped.add(name)
                else:
                    assert kind == "UNIT" and name.endswith("_" + rest), line
            continue
        match = METRIC_LINE.match(line)
        assert match is not None, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        assert name.startswith(current), f"{name} outside its family {current}"
        kind = types[current]
        suffix = name[len(current):]
        assert suffix == {"counter": "_total", "info": "_info"}.get(kind, ""), line
        pairs = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
        key = (name, pairs)
        assert key not in samples, f"sample twice: {line}"
        samples[key] = float(value)
    assert set(types) == helped, "every family has HELP"
    return samples


def test_openmetrics_is_valid_and_complete() -> None:
    text = render_openmetrics(sample_report())
    samples = check_openmetrics(text)
    families = {f.name: f for f in text_string_to_metric_families(text)}  # strict parser
    assert families["ktlsd_requests_failed"].type == "counter"
    assert families["ktlsd_uptime_seconds"].unit == "seconds"
    assert families["ktlsd_build"].type == "info"

    def value(name: str, **labels: str) -> float:
        return samples[(name, frozenset(labels.items()))]

    assert value("ktlsd_requests_completed_total", source="service") == 7
    assert value("ktlsd_requests_failed_total", source="service", cause="peer_rejected") == 4
    assert value("ktlsd_requests_failed_total", source="kernel", cause="timeout") == 2
    # Every cause has a series for every source from the start (zero until it happens).
    for cause in FAILURES:
        assert ("ktlsd_requests_failed_total",
                frozenset({("source", "kernel"), ("cause", cause)})) in samples
    assert value("ktlsd_requests_in_flight", source="kernel") == 2
    assert value("ktlsd_requests_pending", source="service") == 3
    assert not [k for k in samples if k[0] == "ktlsd_requests_pending"
                and ("source", "kernel") in k[1]]  # not visible: no sample, not a false 0
    assert value("ktlsd_service_refused_total", status="EAGAIN") == 6
    assert value("ktlsd_worker_respawns_total") == 3
    assert value("ktlsd_limit", key="uid_max_pending") == 8
    assert value("ktlsd_uptime_seconds") == 93784.25
    info = families["ktlsd_build"].samples[0]
    assert info.labels["config_file"] == '/etc/tl"shd/config'  # escaped, read back intact


def test_status_messages_codec() -> None:
    request = encode_status_request(seq=9)
    assert is_status_request(request) and decode_status_request(request) == 9
    submit_message = encode_submit(client_psk_request())
    assert not is_status_request(submit_message)
    with pytest.raises(ServiceFormatError, match="no attributes"):
        decode_status_request(_with_attribute(request))
    with pytest.raises(ServiceFormatError):
        decode_status_request(submit_message)
    answer = encode_status_answer(0, report=b'{"a":1}', seq=9)
    assert decode_status_answer(answer) == (9, 0, "", b'{"a":1}')
    refusal = encode_status_answer(errno.EACCES, reason="no\nway", seq=9)
    assert decode_status_answer(refusal) == (9, errno.EACCES, "no way", b"")
    with pytest.raises(ValueError, match=r"too (large|long)"):
        encode_status_answer(0, report=b"x" * 70_000)


def _with_attribute(message: bytes) -> bytes:
    extra = b"\x08\x00\x01\x00\x00\x00\x00\x00"
    longer = message + extra
    return len(longer).to_bytes(4, sys.byteorder) + longer[4:]


def client_psk_request() -> Any:
    from ktlsd.client import build_request

    return build_request(role="client", auth="psk", psk=[("x", PSK)])


# --- real agents ----------------------------------------------------------------------------


def ktlsd_status(path: str, *args: str,
                 as_nobody: bool = False) -> subprocess.CompletedProcess[str]:
    """``python -m ktlsd status --socket PATH ...`` (as uid 65534 with the system python)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if as_nobody:
        return subprocess.run([SYSTEM_PYTHON, "-m", "ktlsd", "status", "--socket", path, *args],
                              capture_output=True, text=True, env=env, cwd="/", user=NOBODY,
                              group=NOBODY, extra_groups=[], timeout=60)
    return subprocess.run([sys.executable, "-m", "ktlsd", "status", "--socket", path, *args],
                          capture_output=True, text=True, env=env, timeout=60)


def status_json(path: str) -> dict[str, Any]:
    result = ktlsd_status(path, "--json")
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


async def psk_pair(path: str, client_psk: tuple[str, bytes],
                   server_psk: tuple[str, bytes]) -> tuple[Any, Any]:
    a, b = tcp_pair()
    with a, b:
        return await asyncio.gather(
            submit(a, role="client", auth="psk", psk=[client_psk], service_path=path,
                   timeout=20),
            submit(b, role="server", auth="psk", psk=[server_psk], service_path=path,
                   timeout=20))


def errnos_of(outcomes: dict[str, int]) -> list[int]:
    """The DONE statuses the counted failures stand for."""
    out: list[int] = []
    for outcome, count in outcomes.items():
        if outcome != OK:
            out += [FailureCause[outcome.upper()].errno] * count
    return sorted(out)


@needs_nobody
def test_counts_of_real_handshakes_refusal_sighup_and_output(public_dir: Path) -> None:
    with AgentProcess(public_dir, OPEN_CONFIG) as agent:
        agent.wait_ready()
        path = agent.socket_path

        async def traffic() -> list[Any]:
            dones: list[Any] = []
            for i in range(2):
                dones += await psk_pair(path, (f"good-{i}", PSK), (f"good-{i}", PSK))
            dones += await psk_pair(path, ("wrong-key", PSK), ("wrong-key", OTHER_PSK))
            dones += await psk_pair(path, ("unknown", PSK), ("someone-else", PSK))
            return dones

        dones = run(traffic())
        assert [d.status for d in dones[:4]] == [0, 0, 0, 0]
        failed = sorted(d.status for d in dones[4:])
        assert all(failed), dones[4:]
        agent.wait_for(r"handshake source=service", 8)

        report = status_json(path)
        outcomes = dict(report["requests"]["service"])
        assert outcomes.pop("ok") == 4
        assert sum(outcomes.values()) == 4
        assert errnos_of(outcomes) == failed  # each failure counted under its own cause
        service = report["sources"][0]
        assert (service["name"], service["in_flight"], service["pending"]) == ("service", 0, 0)
        assert report["config_file"] == str(agent.config_path)
        assert report["workers"] == {"configured": 0, "alive": 0, "respawns": 0}
        assert report["limits"]["uid_max_pending"] == 8
        assert report["pid"] == agent.proc.pid

        # Not root: one line, and the agent computes nothing for it.
        refused = ktlsd_status(path, as_nobody=True)
        assert refused.returncode == 1
        assert refused.stdout == ""
        assert refused.stderr.strip() == (f"ktlsd status: {path}: ktlsd status is for root "
                                          "only (uid 65534) (EACCES)")

        # SIGHUP: counts stay, the limits shown follow the new configuration.
        agent.config_path.write_text(OPEN_CONFIG + "uid_max_pending = 5\n")
        agent.signal(signal.SIGHUP)
        agent.wait_for(r"configuration reloaded: .*uid_max_pending")
        after = status_json(path)
        assert after["requests"] == report["requests"]
        assert after["limits"]["uid_max_pending"] == 5
        run(psk_pair(path, ("later", PSK), ("later", PSK)))
        agent.wait_for(r"handshake source=service", 10)
        assert status_json(path)["requests"]["service"]["ok"] == 6

        # --output: the whole new file or the old one, never a mix; readable by a collector.
        target = public_dir / "ktlsd.prom"
        target.write_text("old\n")
        old_inode = target.stat().st_ino
        written = ktlsd_status(path, "--openmetrics", "--output", str(target))
        assert written.returncode == 0 and written.stdout == "", written.stderr
        text = target.read_text()
        samples = check_openmetrics(text)
        list(text_string_to_metric_families(text))
        assert samples[("ktlsd_requests_completed_total",
                         frozenset({("source", "service")}))] == 6
        assert target.stat().st_ino != old_inode  # renamed into place, not rewritten
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert not [p for p in public_dir.iterdir() if p.name.endswith(".tmp")]
        text_result = ktlsd_status(path)
        assert "requests service: 6 completed, 4 failed" in text_result.stdout
    assert agent.wait_exit() == 0


def test_workers_report_causes_and_respawns(tmp_path: Path) -> None:
    """With two workers an untrusted certificate is counted as such (the worker passes the
    cause; EACCES alone would read as a rejecting peer), and a killed worker as a respawn."""
    ca = Authority.create(tmp_path / "pki")
    stranger = Authority.create(tmp_path / "other")
    server_cert = ca.issue_server()
    with AgentProcess(tmp_path, "[ktlsd]\nworkers = 2\n", extra=["--verbose"]) as agent:
        agent.wait_ready()
        path = agent.socket_path

        async def traffic() -> list[Any]:
            a, b = tcp_pair()
            with a, b:
                x509 = await asyncio.gather(
                    submit(a, role="client", auth="x509", peername="localhost",
                           truststore=stranger.cert_path, service_path=path, timeout=20),
                    submit(b, role="server", auth="x509", certificate=server_cert.cert_path,
                           private_key=server_cert.key_path, service_path=path, timeout=20))
            return [*x509, *await psk_pair(path, ("w", PSK), ("w", PSK))]

        dones = run(traffic())
        assert [d.status for d in dones[2:]] == [0, 0]
        assert dones[0].status == errno.EACCES
        agent.wait_for(r"handshake source=service", 4)
        report = status_json(path)
        outcomes = dict(report["requests"]["service"])
        assert outcomes.pop("ok") == 2
        assert outcomes.get("untrusted_certificate") == 1, report["requests"]
        assert errnos_of(outcomes) == sorted(d.status for d in dones[:2])
        assert report["workers"] == {"configured": 2, "alive": 2, "respawns": 0}
        assert report["limits"]["workers"] == 2

        victim = int(agent.wait_for(r"worker 0 \(pid (\d+)\) started")[0].split("pid ")[1]
                     .split(")")[0])
        os.kill(victim, signal.SIGKILL)
        agent.wait_for(r"worker 0 \(pid \d+\) started", 2)
        again = status_json(path)
        assert again["workers"] == {"configured": 2, "alive": 2, "respawns": 1}
        assert again["requests"] == report["requests"]
    assert agent.wait_exit() == 0


def exchange(path: str, message: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(10)
        conn.connect(path)
        conn.send(message)
        return conn.recv(65536)


@needs_nobody
def test_status_socket_without_the_service_is_root_only(public_dir: Path) -> None:
    """An agent without the service answers STATUS on a 0600 socket; even when its mode is
    opened up, a non-root asker is refused by uid before the report is made."""
    path = str(public_dir / "status.sock")
    made: list[int] = []

    def provider() -> bytes:
        made.append(1)
        return report_to_json(sample_report())

    async def main() -> None:
        listener = StatusListener(path, provider)
        await listener.start()
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            report = await asyncio.to_thread(ktlsd_status, path, "--json")
            assert report.returncode == 0, report.stderr
            assert report_from_json(report.stdout.strip().encode()) == sample_report()
            assert made == [1]
            denied = await asyncio.to_thread(ktlsd_status, path, as_nobody=True)
            assert denied.returncode == 1
            assert "Permission denied (ktlsd status is for root only)" in denied.stderr
            os.chmod(path, 0o666)  # the uid check holds on its own
            refused = await asyncio.to_thread(ktlsd_status, path, as_nobody=True)
            assert refused.returncode == 1
            assert "ktlsd status is for root only (uid 65534) (EACCES)" in refused.stderr
            assert made == [1]  # nothing was made for the refused askers
            # A SUBMIT (or anything but STATUS) gets EINVAL here.
            _, status, reason, _ = decode_status_answer(
                await asyncio.to_thread(exchange, path, encode_submit(client_psk_request())))
            assert status == errno.EINVAL and "STATUS requests only" in reason
        finally:
            await listener.close()
        assert not os.path.exists(path)

    run(main())


def exchange_with_fd(path: str, message: bytes, fd: int) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(10)
        conn.connect(path)
        conn.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  fd.to_bytes(4, sys.byteorder))])
        return conn.recv(65536)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@needs_nobody
def test_service_status_costs_a_refused_asker_nothing(public_dir: Path) -> None:
    """On the service socket (open to everyone here): uid 65534 is refused without the
    report being made; root gets it; a STATUS with a descriptor is EINVAL and the
    descriptor is closed; the handshake requests around it are not disturbed."""
    from ktlsd.upcall.service import HandshakeService

    path = str(public_dir / "handshake.sock")
    made: list[int] = []

    def provider() -> bytes:
        made.append(1)
        return report_to_json(sample_report())

    async def main() -> None:
        service = HandshakeService(path, mode=0o666)
        service.status_provider = provider
        await service.start()
        try:
            refused = await asyncio.to_thread(ktlsd_status, path, as_nobody=True)
            assert refused.returncode == 1
            assert "for root only (uid 65534) (EACCES)" in refused.stderr
            assert made == []
            answered = await asyncio.to_thread(ktlsd_status, path)
            assert answered.returncode == 0, answered.stderr
            assert "pid 4242" in answered.stdout and made == [1]
            before = open_fds()
            a, b = tcp_pair()
            with a, b:
                answer = await asyncio.to_thread(exchange_with_fd, path,
                                                 encode_status_request(), a.fileno())
            _, status, reason, _ = decode_status_answer(answer)
            assert (status, reason) == (errno.EINVAL, "a STATUS request carries no descriptor")
            assert made == [1]
            # The connection's task closes what it received once it has answered.
            await await_until(lambda: open_fds() == before,
                              lambda: f"descriptors left open: {open_fds() - before}")
            assert service.refused() == {} and service.counters["queued"] == 0
        finally:
            await service.close()

    run(main())


def test_workers_refuse_a_status_request_with_a_descriptor(tmp_path: Path) -> None:
    """With ``--workers 2`` a worker reads the STATUS and passes it on with what came with
    it: a STATUS carrying a descriptor is EINVAL, as without workers, and nobody keeps the
    descriptor; a plain one gets the report."""
    with AgentProcess(tmp_path, "[ktlsd]\nworkers = 2\n") as agent:
        a, b = tcp_pair()
        with a, b:
            answer = exchange_with_fd(agent.socket_path, encode_status_request(), a.fileno())
            _, status, reason, _ = decode_status_answer(answer)
            assert (status, reason) == (errno.EINVAL, "a STATUS request carries no descriptor")
            a.close()
            b.settimeout(30)
            assert b.recv(16) == b""  # every copy of the passed socket is closed
        report = status_json(agent.socket_path)
        assert report["workers"]["configured"] == 2
    assert agent.wait_exit() == 0
