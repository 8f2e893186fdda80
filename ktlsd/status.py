"""Live status of a running agent: the request counters, the status report, its renderings.

Pure (no I/O, no clock of its own beyond what the caller gives): the agent counts here, the
daemon fills a :class:`StatusReport` from the agent, its sources and its worker pool, the
service sends it as JSON (:func:`report_to_json`), and ``ktlsd status``
(:mod:`ktlsd.commands.status`) decodes it (:func:`report_from_json`) and prints it as text,
JSON or OpenMetrics (:func:`render_text`, :func:`render_openmetrics`).

Counting (:class:`RequestCounters`)
===================================

The agent calls :meth:`RequestCounters.started` when it starts serving a request and
:meth:`RequestCounters.ended` at the one place each request ends -- where its one DONE is
sent and its one log line written -- with the outcome: ``ok``, or the request's
:class:`~ktlsd.errors.FailureCause` (lower case), or ``stopping`` for a request taken from a
source but answered ESRCH because the agent was stopping. So every request is counted once,
whatever happened to it. In flight = started - ended, per source. With ``--workers N`` a
worker sends the successful DONE of a service request it read itself, but the supervisor's
agent still ends every request (it hears each worker's result) and writes every log line,
so each request is counted once, there; a reload (SIGHUP) keeps the agent and with it the
counts.

Requests a source refuses before the agent takes them (the service's EAGAIN, EBUSY,
EINVAL, ...) are the source's own business and not counted here; the service's totals of
those are in the report's ``refused`` table.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ktlsd.errors import FailureCause
from ktlsd.settings import AgentSettings

OK = "ok"
STOPPING = "stopping"
"""Outcome of a request taken from its source but refused (ESRCH) because the agent was
stopping: no :class:`~ktlsd.errors.FailureCause` fits it."""
FAILURES: tuple[str, ...] = (*(cause.name.lower() for cause in FailureCause), STOPPING)
"""Every failed outcome, in a fixed order (FailureCause's, then :data:`STOPPING`)."""

STATUS_FORMAT = 1
"""Version of the JSON report (``"format"``); a reader refuses other versions."""

DEFAULT_STATUS_PATH = "/run/ktlsd/status.sock"
"""The root-only (0600) status socket the agent opens when the service socket is disabled
(``--socket none``): in ``$RUNTIME_DIRECTORY`` when a service manager names one, else here."""

STATUS_SOCKET_NAME = "status.sock"


def outcome_of(cause: FailureCause | None) -> str:
    """``ok`` for a success, else the cause's name in lower case (``peer_rejected``)."""
    return OK if cause is None else cause.name.lower()


class RequestCounters:
    """Requests per source: started, and ended by outcome. Counts only grow."""

    def __init__(self) -> None:
        self._started: collections.Counter[str] = collections.Counter()
        self._ended: collections.Counter[tuple[str, str]] = collections.Counter()
        self._in_flight: collections.Counter[str] = collections.Counter()

    def started(self, source: str) -> None:
        """A request of ``source`` is being served from now on."""
        self._started[source] += 1
        self._in_flight[source] += 1

    def ended(self, source: str, outcome: str, *, started: bool = True) -> None:
        """A request of ``source`` got its DONE with ``outcome`` (:func:`outcome_of` or
        :data:`STOPPING`); ``started=False`` for one refused before :meth:`started`."""
        if outcome != OK and outcome not in FAILURES:
            raise ValueError(f"unknown outcome {outcome!r}")
        self._ended[(source, outcome)] += 1
        if started:
            self._in_flight[source] -= 1

    def in_flight(self, source: str) -> int:
        return self._in_flight[source]

    def by_source(self) -> dict[str, dict[str, int]]:
        """Ended requests: source -> outcome -> count (only outcomes seen)."""
        out: dict[str, dict[str, int]] = {}
        for (source, outcome), count in sorted(self._ended.items()):
            out.setdefault(source, {})[outcome] = count
        return out

    def completed(self, source: str | None = None) -> int:
        return sum(n for (s, o), n in self._ended.items()
                   if o == OK and (source is None or s == source))

    def failed(self, source: str | None = None) -> int:
        return sum(n for (s, o), n in self._ended.items()
                   if o != OK and (source is None or s == source))


# --- the report -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceStatus:
    """One upcall source: what the agent is serving from it and what waits there.

    ``pending`` is None where the queue is not visible: the kernel keeps its own (bounded by
    its pending limit) and tells nobody its length.
    """

    name: str
    endpoint: str
    in_flight: int
    pending: int | None = None
    connections: int | None = None


@dataclass(frozen=True)
class WorkerStatus:
    """``configured`` 0: handshakes run in the agent's own process (no workers)."""

    configured: int = 0
    alive: int = 0
    respawns: int = 0


@dataclass(frozen=True)
class StatusReport:
    """What ``ktlsd status`` shows (plain values only: never a secret)."""

    version: str
    pid: int
    uptime_seconds: float
    config_file: str | None
    sources: tuple[SourceStatus, ...] = ()
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    """Ended requests: source -> outcome (``ok``, a failure cause, ``stopping``) -> count."""
    refused: dict[str, int] = field(default_factory=dict)
    """Service requests refused before the agent took them, by errno name (EAGAIN, ...)."""
    kept_sessions: int = 0
    workers: WorkerStatus = field(default_factory=WorkerStatus)
    limits: dict[str, int] = field(default_factory=dict)
    """The effective limits, by their ``[ktlsd]`` key names (docs/configuration.md)."""


def effective_limits(settings: AgentSettings, *, pending_limit: int,
                     kept_sessions_capacity: int, workers: int) -> dict[str, int]:
    """The limits in force, by their configuration key names, defaults resolved: the
    per-source handshake bound, the service's pending limit (the kernel's rule applied) and
    the kept-session cap (the key quota applied)."""
    service = settings.service_limits
    return {
        "max_concurrent": settings.concurrency,
        "pending_limit": pending_limit,
        "default_timeout_ms": settings.default_timeout_ms,
        "max_consumer_timeout_ms": settings.max_consumer_timeout_ms,
        "submit_timeout_ms": service.submit_timeout_ms,
        "service_max_connections": service.max_connections,
        "uid_max_connections": service.uid_max_connections,
        "uid_max_pending": service.uid_max_pending,
        "uid_max_in_flight": service.uid_max_in_flight,
        "max_kept_sessions": kept_sessions_capacity,
        "uid_max_kept_sessions": settings.uid_max_kept_sessions,
        "session_lifetime": settings.session_lifetime if settings.keep_sessions else 0,
        "max_file_bytes": settings.max_file_bytes,
        "workers": workers,
    }


def report_to_json(report: StatusReport) -> bytes:
    """The report as compact UTF-8 JSON, with ``"format": STATUS_FORMAT``."""
    data = {"format": STATUS_FORMAT, **dataclasses.asdict(report)}
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def report_from_json(data: bytes) -> StatusReport:
    """The inverse of :func:`report_to_json`; ValueError (one line) for anything else."""
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if raw.get("format") != STATUS_FORMAT:
            raise ValueError(f"status format {raw.get('format')!r}, expected {STATUS_FORMAT}")
        sources = tuple(SourceStatus(
            name=str(s["name"]), endpoint=str(s["endpoint"]), in_flight=_int(s["in_flight"]),
            pending=_opt_int(s.get("pending")), connections=_opt_int(s.get("connections")),
        ) for s in raw["sources"])
        workers = raw["workers"]
        return StatusReport(
            version=str(raw["version"]),
            pid=_int(raw["pid"]),
            uptime_seconds=float(raw["uptime_seconds"]),
            config_file=None if raw["config_file"] is None else str(raw["config_file"]),
            sources=sources,
            requests={str(src): {str(o): _int(n) for o, n in outcomes.items()}
                      for src, outcomes in raw["requests"].items()},
            refused={str(k): _int(v) for k, v in raw["refused"].items()},
            kept_sessions=_int(raw["kept_sessions"]),
            workers=WorkerStatus(configured=_int(workers["configured"]),
                                 alive=_int(workers["alive"]),
                                 respawns=_int(workers["respawns"])),
            limits={str(k): _int(v) for k, v in raw["limits"].items()},
        )
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed status report: {type(exc).__name__}: {exc}") from None


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _opt_int(value: Any) -> int | None:
    return None if value is None else _int(value)


# --- renderings ---------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}d {text}" if days else text


def render_text(report: StatusReport) -> str:
    """For people: one fact per line."""
    lines = [
        f"ktlsd {report.version}, pid {report.pid}, up {_duration(report.uptime_seconds)}",
        f"configuration: {report.config_file or 'none (built-in defaults)'}",
    ]
    for source in report.sources:
        pending = "not visible" if source.pending is None else str(source.pending)
        extra = "" if source.connections is None else (
            f", {source.connections} connection{'' if source.connections == 1 else 's'} open")
        lines.append(f"source {source.name} ({source.endpoint}): {source.in_flight} in flight, "
                     f"{pending} pending{extra}")
    names = [s.name for s in report.sources] + [n for n in report.requests
                                                if n not in {s.name for s in report.sources}]
    for name in names:
        outcomes = report.requests.get(name, {})
        failed = {o: n for o, n in outcomes.items() if o != OK and n}
        detail = ", ".join(f"{o} {n}" for o, n in sorted(failed.items()))
        lines.append(f"requests {name}: {outcomes.get(OK, 0)} completed, "
                     f"{sum(failed.values())} failed" + (f" ({detail})" if detail else ""))
    if report.refused:
        lines.append("refused by the service: " + ", ".join(
            f"{k} {v}" for k, v in sorted(report.refused.items())))
    lines.append(f"kept sessions: {report.kept_sessions} "
                 f"(at most {report.limits.get('max_kept_sessions', '?')})")
    workers = report.workers
    if workers.configured:
        lines.append(f"workers: {workers.alive} of {workers.configured} alive, "
                     f"{workers.respawns} respawned")
    else:
        lines.append("workers: none (handshakes run in the agent's process)")
    lines.append("limits: " + ", ".join(f"{k} {v}" for k, v in report.limits.items()))
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    inner = ",".join(f'{k}="{_label(v)}"' for k, v in pairs)
    return "{" + inner + "}" if inner else ""


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value) or math.isinf(value):
        raise ValueError("status numbers are finite")
    return repr(float(value))


class _Family:
    def __init__(self, name: str, kind: str, help_text: str, unit: str = "") -> None:
        self.name, self.kind, self.help, self.unit = name, kind, help_text, unit
        self.samples: list[str] = []

    def add(self, value: float, labels: Mapping[str, str] | None = None,
            suffix: str = "") -> None:
        pairs = list((labels or {}).items())
        self.samples.append(f"{self.name}{suffix}{_labels(pairs)} {_number(value)}")

    def lines(self) -> list[str]:
        head = [f"# TYPE {self.name} {self.kind}"]
        if self.unit:
            head.append(f"# UNIT {self.name} {self.unit}")
        head.append(f"# HELP {self.name} {self.help}")
        return head + self.samples


def render_openmetrics(report: StatusReport) -> str:
    """The OpenMetrics text format (``application/openmetrics-text; version=1.0.0``), for a
    node exporter's textfile collector or a scrape: ``ktlsd_`` metrics, counters with
    ``_total``, labels ``source`` and ``cause``, ending with ``# EOF``."""
    families: list[_Family] = []

    def family(name: str, kind: str, help_text: str, unit: str = "") -> _Family:
        new = _Family(name, kind, help_text, unit)
        families.append(new)
        return new

    info = family("ktlsd_build", "info", "The running ktlsd agent.")
    info.add(1, {"version": report.version, "config_file": report.config_file or ""},
             suffix="_info")
    uptime = family("ktlsd_uptime_seconds", "gauge", "Seconds since the agent started.",
                    "seconds")
    uptime.add(round(report.uptime_seconds, 3))
    in_flight = family("ktlsd_requests_in_flight", "gauge",
                       "Requests the agent is serving now, per upcall source.")
    pending = family("ktlsd_requests_pending", "gauge",
                     "Requests queued in the source, not yet taken by the agent (the kernel's "
                     "queue is not visible).")
    for source in report.sources:
        in_flight.add(source.in_flight, {"source": source.name})
        if source.pending is not None:
            pending.add(source.pending, {"source": source.name})
    names = list(dict.fromkeys([s.name for s in report.sources] + list(report.requests)))
    completed = family("ktlsd_requests_completed", "counter",
                       "Requests answered with status 0, per upcall source.")
    failed = family("ktlsd_requests_failed", "counter",
                    "Requests answered with an error, per upcall source and failure cause.")
    for name in names:
        outcomes = report.requests.get(name, {})
        completed.add(outcomes.get(OK, 0), {"source": name}, suffix="_total")
        for cause in FAILURES:
            failed.add(outcomes.get(cause, 0), {"source": name, "cause": cause},
                       suffix="_total")
    refused = family("ktlsd_service_refused", "counter",
                     "Service requests refused before the agent took them, by status.")
    for status, count in sorted(report.refused.items()):
        refused.add(count, {"status": status}, suffix="_total")
    kept = family("ktlsd_kept_sessions", "gauge", "Session states kept for later key updates.")
    kept.add(report.kept_sessions)
    workers = family("ktlsd_workers", "gauge",
                     "Handshake worker processes configured (0: none, one process).")
    workers.add(report.workers.configured)
    alive = family("ktlsd_workers_alive", "gauge", "Handshake worker processes alive.")
    alive.add(report.workers.alive)
    respawns = family("ktlsd_worker_respawns", "counter",
                      "Handshake worker processes started again after one died.")
    respawns.add(report.workers.respawns, suffix="_total")
    limit = family("ktlsd_limit", "gauge",
                   "The effective limits, by configuration key (docs/configuration.md).")
    for key, value in report.limits.items():
        limit.add(value, {"key": key})
    lines: list[str] = []
    for item in families:
        if item.samples:
            lines += item.lines()
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


__all__ = [
    "DEFAULT_STATUS_PATH",
    "FAILURES",
    "OK",
    "STATUS_FORMAT",
    "STOPPING",
    "RequestCounters",
    "SourceStatus",
    "StatusReport",
    "WorkerStatus",
    "effective_limits",
    "outcome_of",
    "render_openmetrics",
    "render_text",
    "report_from_json",
    "report_to_json",
]
