"""``ktlsd run``: the agent as a long-running service, a drop-in for tlshd.

Start-up, in order:

1. logging (:mod:`ktlsd.log_output`: the journal, syslog or stderr) and the configuration
   (tlshd's file, ``[ktlsd]`` section for our own settings); a start-up line with the version;
2. join a fresh session keyring of our own and link ``.nvme``, ``.nfs``, ``.nfsd`` and the
   configured keyrings into it, as tlshd does (kept session state also lives there, so only
   this process can read it);
3. open the upcall sources: the kernel's ``handshake`` family (``kernel = auto|yes|no``; the
   multicast group is joined when it opens) and the user-space handshake service
   (``service_socket``);
4. once the agent takes requests from every source, tell the service manager ``READY=1``
   (:mod:`ktlsd.sdnotify`; nothing without ``$NOTIFY_SOCKET``) and log "ktlsd agent running";
5. serve. SIGHUP and SIGUSR1 (tlshd 1.4 reloads on both) re-read the configuration, between
   ``RELOADING=1`` and ``READY=1``; requests in flight keep the settings they started with.
   SIGTERM and SIGINT send ``STOPPING=1``, stop taking new requests and let the requests in
   flight finish within their own timeouts.

Status: ``ktlsd status`` (:mod:`ktlsd.commands.status`) asks the running agent over the
service socket (root only); with the service disabled, over a root-only ``status.sock`` in the
runtime directory. :func:`status_report` builds the answer; the request counters belong to
the agent, which a reload keeps, so they survive SIGHUP.

Command line: every tlshd flag with tlshd's meaning (``-c/--config FILE``, ``-s/--stderr``,
``-h/--help``, ``-v/--version``); ktlsd's own options have long names only. ``--check`` reads
the configuration, reports every problem and exits 1 on an error, 0 otherwise.

Imports: only what ``run`` needs, when it needs it. Registering the sub-command imports
nothing beyond argparse; serving imports the agent, whose TLS engine loads with the first
handshake. Never a secret in a log line.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ktlsd.agent import Agent
    from ktlsd.config import AgentConfig
    from ktlsd.request import UpcallSource
    from ktlsd.workers import WorkerPool

log = logging.getLogger("ktlsd")

def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from ktlsd import __version__
    from ktlsd.config import CONFIG_PATH, ENV_CONFIG, LEGACY_CONFIG_PATH

    p = subparsers.add_parser(
        "run", help="run the handshake agent (kernel upcalls and the user-space service)",
        description="Serve TLS handshake requests from the kernel's 'handshake' netlink family "
        "and from user-space programs through the local handshake service. Accepts tlshd's "
        "flags with tlshd's meaning (-c, -s, -h, -v); ktlsd's own options are long only.",
        epilog=f"Configuration file: -c FILE; else ${ENV_CONFIG}; else {LEGACY_CONFIG_PATH} "
        f"when it exists (tlshd's legacy name, logged at notice), then {CONFIG_PATH}; "
        "else built-in defaults. Logging: with --syslog to syslog (facility auth, as tlshd), "
        "plus stderr with -s; else to the journal when stderr is the journal (each line with "
        "its priority); else to stderr, unless stderr is closed or /dev/null (then syslog). "
        "SIGHUP or SIGUSR1 reloads the configuration; SIGTERM or SIGINT drains and exits.",
    )
    p.add_argument("-c", "--config", metavar="FILE",
                   help="configuration file (default: the search order below)")
    p.add_argument("-s", "--stderr", action="store_true",
                   help="log to stderr (also to syslog when --syslog is given), as tlshd -s")
    p.add_argument("-v", "--version", action="version", version=f"ktlsd {__version__}",
                   help="print the version and exit, as tlshd -v (debug logging: --debug)")
    p.add_argument("--syslog", action="store_true",
                   help="log to syslog(3), facility auth like tlshd, ident ktlsd")
    p.add_argument("--debug", "--verbose", dest="debug", action="store_true",
                   help="debug logging (overrides the configuration's log level)")
    p.add_argument("--check", action="store_true",
                   help="read the configuration, report problems, exit 1 on an error")
    p.add_argument("--socket", metavar="PATH",
                   help="user-space service socket path ('none' disables it)")
    p.add_argument("--kernel", choices=("auto", "yes", "no"),
                   help="serve the kernel's handshake family (default from config: auto)")
    p.add_argument("--max-concurrent", type=int, metavar="N", help="handshakes run at once")
    p.add_argument("--pending-limit", type=int, metavar="N",
                   help="service requests queued at most")
    p.add_argument("--workers", type=_workers_option, metavar="N|auto",
                   help="handshake worker processes (default from config: auto = one per "
                   "CPU; 0 or 1: handshakes run in the agent's own process)")
    p.set_defaults(func=run_command)


def _workers_option(text: str) -> int:
    from ktlsd.settings import parse_workers

    try:
        return parse_workers(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


async def start_workers(config: AgentConfig) -> WorkerPool | None:
    """The handshake worker processes ``workers`` asks for, started after the session keyring
    is ours (they inherit it); None when handshakes run in this process."""
    from ktlsd.settings import worker_processes

    count = worker_processes(config.workers)
    if count == 0:
        return None
    from ktlsd.workers import WorkerPool, WorkerStartError

    pool = WorkerPool(count)
    try:
        await pool.start()
    except (WorkerStartError, OSError) as exc:
        raise SystemExit(f"ktlsd: handshake workers: {exc}") from None
    return pool


def setup_logging(level: str) -> None:
    """Plain stderr logging at ``level`` (for the other commands, e.g. ``ktlsd demo``)."""
    from ktlsd import log_output

    log_output.configure(level, destinations=[log_output.Destination.STDERR])


def _apply_overrides(config: AgentConfig, args: argparse.Namespace) -> AgentConfig:
    """The command line wins over the configuration file."""
    from dataclasses import replace

    if args.socket is not None:
        config = replace(config, service_socket=None if args.socket == "none" else args.socket)
    if args.kernel is not None:
        config = replace(config, kernel=args.kernel)
    if args.max_concurrent is not None:
        config = replace(config, max_concurrent=args.max_concurrent)
    if args.pending_limit is not None:
        config = replace(config, pending_limit=args.pending_limit)
    if getattr(args, "workers", None) is not None:
        config = replace(config, workers=args.workers)
    if getattr(args, "debug", False):
        config = replace(config, log_level="debug")
    return config


async def open_sources(config: AgentConfig) -> list[UpcallSource]:
    """The upcall sources the configuration asks for; a clear error when a required one fails."""
    sources: list[UpcallSource] = []
    if config.kernel != "no":
        from ktlsd.upcall.kernel import KernelSource, KernelSourceError

        try:
            sources.append(KernelSource.open())
            log.info("serving the kernel's handshake family")
        except (KernelSourceError, OSError) as exc:
            if config.kernel == "yes":
                raise SystemExit(f"ktlsd: {exc}") from None
            log.info("kernel upcalls not served: %s", exc)
    if config.service_socket:
        from ktlsd.upcall.service import HandshakeService

        service = HandshakeService(
            config.service_socket,
            mode=config.service_mode,
            group=config.service_group,
            limits=config.agent_settings().service_limits,
        )
        try:
            await service.start()
        except (OSError, ValueError) as exc:
            for source in sources:
                await source.close()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise SystemExit(
                f"ktlsd: cannot start the handshake service on {config.service_socket}: "
                f"{reason}"
            ) from None
        sources.append(service)
    if not sources:
        raise SystemExit("ktlsd: nothing to serve (no kernel handshake family, service disabled)")
    return sources


def prepare_keyrings(config: AgentConfig) -> None:
    """A private session keyring with the consumers' keyrings linked in (as tlshd does)."""
    from ktlsd import keyring

    keyring.join_session_keyring(None)
    relink_keyrings(config)


def relink_keyrings(config: AgentConfig) -> None:
    """Link ``.nvme``, ``.nfs``, ``.nfsd`` and the configured keyrings into our session keyring.

    Linking again is harmless, so a reload calls this too: keyrings added to the
    configuration, and kernel keyrings that appeared after start-up (nvme or nfsd loaded
    later), become searchable without a restart.
    """
    from ktlsd.agent import link_keyrings
    from ktlsd.settings import DEFAULT_LINKED_KEYRINGS

    names = list(DEFAULT_LINKED_KEYRINGS) + [k for k in config.keyrings if k]
    linked = link_keyrings(names)
    log.info("keyrings linked: %s", ", ".join(linked) if linked else "none")


def release_startup_memory() -> None:
    """Give the heap that start-up freed (argument and configuration parsing, imports) back to
    the kernel: glibc's ``malloc_trim(0)``, about 1 MiB of idle RSS. Nothing elsewhere."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)


def status_report(agent: Agent, sources: list[UpcallSource], pool: WorkerPool | None,
                  config: AgentConfig, started: float) -> bytes:
    """The ``ktlsd status`` report (:mod:`ktlsd.status`) as JSON: names and numbers only."""
    import os
    import time

    from ktlsd import __version__
    from ktlsd.status import (
        SourceStatus,
        StatusReport,
        WorkerStatus,
        effective_limits,
        report_to_json,
    )
    from ktlsd.upcall.service import HandshakeService, default_pending_limit

    settings = agent.settings
    counters = agent.counters
    pending_limit = settings.service_limits.pending_limit or default_pending_limit()
    refused: dict[str, int] = {}
    states: list[SourceStatus] = []
    for source in sources:
        if isinstance(source, HandshakeService):
            pending_limit = source.pending_limit
            refused = source.refused()
            states.append(SourceStatus(source.name, source.path, counters.in_flight(source.name),
                                       pending=source.pending, connections=source.connections))
        else:
            states.append(SourceStatus(source.name, "handshake family",
                                       counters.in_flight(source.name)))
    workers = WorkerStatus() if pool is None else WorkerStatus(
        configured=pool.count, alive=len(pool.pids), respawns=pool.respawned)
    report = StatusReport(
        version=__version__,
        pid=os.getpid(),
        uptime_seconds=time.monotonic() - started,
        config_file=config.path,
        sources=tuple(states),
        requests=counters.by_source(),
        refused=refused,
        kept_sessions=agent.store.kept,
        workers=workers,
        limits=effective_limits(settings, pending_limit=pending_limit,
                                kept_sessions_capacity=agent.store.capacity,
                                workers=workers.configured),
    )
    return report_to_json(report)


def status_socket_path() -> str:
    """Where the root-only status socket goes when the service is disabled: the runtime
    directory's ``status.sock`` (``$RUNTIME_DIRECTORY``'s first entry, else /run/ktlsd)."""
    import os

    from ktlsd.status import DEFAULT_STATUS_PATH, STATUS_SOCKET_NAME

    roots = [r for r in os.environ.get("RUNTIME_DIRECTORY", "").split(":") if r]
    return os.path.join(roots[0], STATUS_SOCKET_NAME) if roots else DEFAULT_STATUS_PATH


def serving_status(sources: list[UpcallSource]) -> str:
    """What the agent serves, for ``STATUS=`` and the log: names only, never secrets."""
    parts = []
    for source in sources:
        path = getattr(source, "path", None)
        parts.append(f"{source.name} {path}" if path else f"{source.name} handshake family")
    return "serving " + ", ".join(parts)


async def serve(config: AgentConfig, args: argparse.Namespace | None = None) -> int:
    import asyncio
    import dataclasses
    import signal
    import time

    from ktlsd import log_output, sdnotify
    from ktlsd.agent import Agent
    from ktlsd.config import ConfigError, load_config
    from ktlsd.upcall.service import HandshakeService, StatusListener

    started = time.monotonic()
    prepare_keyrings(config)
    pool = await start_workers(config)  # None: handshakes run in this process
    sources = await open_sources(config)
    if pool is not None:  # the workers read and run the service's requests themselves
        pool.serve_sources(sources)
    agent: Agent = Agent(config.agent_settings(), sources, runner=pool)
    loop = asyncio.get_running_loop()
    current = [config]  # the configuration in use (a reload replaces it)

    def report() -> bytes:
        return status_report(agent, sources, pool, current[0], started)

    status_listener: StatusListener | None = None
    services = [s for s in sources if isinstance(s, HandshakeService)]
    for service in services:
        service.status_provider = report
    if not services:  # no service socket: status on a root-only socket of its own
        status_listener = StatusListener(status_socket_path(), report)
        try:
            await status_listener.start()
        except (OSError, ValueError) as exc:
            log.warning("ktlsd status unavailable: cannot listen on %s: %s",
                        status_listener.path, getattr(exc, "strerror", None) or exc)
            status_listener = None
    status = serving_status(sources)
    stopping: list[asyncio.Task[None]] = []
    exit_code = 0

    def terminate(signame: str) -> None:
        sdnotify.stopping(f"draining {len(agent.in_flight)} handshakes")
        log.info("%s: no new requests; finishing %d in flight", signame, len(agent.in_flight))
        stopping.append(asyncio.ensure_future(agent.stop()))

    def reload(signame: str) -> None:
        # The service manager hears of reloads only between READY=1 and STOPPING=1.
        announce = agent.serving.is_set() and not stopping
        if announce:
            sdnotify.reloading()
        try:
            try:
                fresh = load_config(config.path)
                if args is not None:
                    fresh = _apply_overrides(fresh, args)
            except ConfigError as exc:
                log.error("%s: configuration not reloaded: %s", signame, exc)
                return
            refused = startup_problems(fresh)
            if refused:
                log.error("%s: configuration not reloaded: %s", signame, "; ".join(refused))
                return
            warning = key_log_warning(fresh)
            if warning:
                log.warning("%s: %s", signame, warning)
            if fresh.pkcs11_module != config.pkcs11_module:
                # A process loads one PKCS#11 module for good (a loaded module stays while
                # keys from it live): keep the one it started with.
                log.warning("%s: [ktlsd] pkcs11_module takes effect at the next start",
                            signame)
                fresh = dataclasses.replace(fresh, pkcs11_module=config.pkcs11_module)
            log_output.set_level(fresh.effective_log_level)
            relink_keyrings(fresh)
            agent.reload(fresh.agent_settings())
            current[0] = fresh
            if fresh.workers != config.workers:
                log.warning("%s: [ktlsd] workers takes effect at the next start", signame)
        finally:
            if announce:
                sdnotify.ready(status)

    handled = {signal.SIGTERM: terminate, signal.SIGINT: terminate,
               signal.SIGHUP: reload, signal.SIGUSR1: reload}
    for sig, handler in handled.items():
        loop.add_signal_handler(sig, handler, sig.name)
    running = asyncio.ensure_future(agent.run())
    try:
        serving = asyncio.ensure_future(agent.serving.wait())
        await asyncio.wait({running, serving}, return_when=asyncio.FIRST_COMPLETED)
        serving.cancel()
        if agent.serving.is_set():
            release_startup_memory()
            sdnotify.ready(status)
            log.info("ktlsd agent running (max %d handshakes at once; %s)",
                     agent.settings.concurrency, status)
            refused = crypto_policy_problems(config)
            if refused:
                for problem in refused:
                    log.error("%s", problem)
                sdnotify.stopping("no usable TLS 1.3 cipher suite or group")
                exit_code = 1
                await agent.stop()
        await running
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        if status_listener is not None:
            await status_listener.close()
        for source in sources:
            try:
                await source.close()
            except Exception as exc:  # closing is best effort; say what failed
                log.debug("closing %s: %s", source.name, exc)
        if pool is not None:
            await pool.close()
    log.log(log_output.NOTICE, "stopped: %d handshakes completed, %d failed",
            agent.completed, agent.failed)
    return exit_code


def check_config(config: AgentConfig) -> int:
    """``ktlsd run --check``: what ``run`` would be refused for, beyond the file itself."""
    import sys

    from ktlsd.hardware_key import configured_key_problems

    settings = config.agent_settings()
    problems = service_socket_problems(config) + startup_problems(config)
    problems += configured_key_problems(settings.client_x509, settings.server_x509)
    for problem in problems:
        print(f"ktlsd: {problem}", file=sys.stderr)
    if problems:
        return 1
    warning = key_log_warning(config)
    if warning:
        print(f"ktlsd: warning: {warning}", file=sys.stderr)
    where = config.path or "no file (built-in defaults)"
    socket_text = config.service_socket or "disabled"
    print(f"ktlsd: configuration OK: {where}; service socket {socket_text}; "
          f"kernel {config.kernel}; log level {config.effective_log_level}")
    return 0


def startup_problems(config: AgentConfig) -> list[str]:
    """What ``--check`` reports and a reload refuses to apply: :func:`key_log_problems` and
    :func:`crypto_policy_problems`."""
    return key_log_problems(config) + crypto_policy_problems(config)


def key_log_problems(config: AgentConfig) -> list[str]:
    """A ``[ktlsd] key_log_file`` that cannot be used (``run`` refuses to start)."""
    if not config.key_log_file:
        return []
    from ktlsd.tls.keylog import KeyLogError, KeyLogFile

    try:
        KeyLogFile(config.key_log_file).check()
    except KeyLogError as exc:
        return [f"[ktlsd] key_log_file: {exc}"]
    return []


def crypto_policy_problems(config: AgentConfig) -> list[str]:
    """What the system crypto policy leaves unusable: no suite, no group (see
    :mod:`ktlsd.tls.policy`). This loads the TLS engine, so ``run`` checks it right after it
    became ready (the agent gets ready without the engine) and stops at once with the
    one-line error."""
    from ktlsd.material import crypto_policy_problems as problems

    return problems(config.groups)


def key_log_warning(config: AgentConfig) -> str | None:
    """The warning ``run`` logs at start (and reload) while ``[ktlsd] key_log_file`` is set."""
    if not config.key_log_file:
        return None
    return (f"[ktlsd] key_log_file: the TLS secrets of every handshake are written to "
            f"{config.key_log_file}: anyone who can read it can decrypt those sessions "
            "(for debugging only; remove the setting when done)")


def service_socket_problems(config: AgentConfig) -> list[str]:
    """What would stop the service socket from being created: its group, its directory."""
    import os

    problems: list[str] = []
    if config.service_group is not None and isinstance(config.service_group, str):
        import grp

        try:
            grp.getgrnam(config.service_group)
        except KeyError:
            problems.append(f"[ktlsd] service_group: unknown group {config.service_group!r}")
    if config.service_socket:
        from ktlsd.upcall.service import creatable_directory

        directory = os.path.dirname(os.path.abspath(config.service_socket))
        if not os.path.isdir(directory) and not creatable_directory(directory):
            problems.append(
                f"[ktlsd] service_socket: directory {directory} does not exist (ktlsd creates "
                "only the runtime directory, $RUNTIME_DIRECTORY or /run/ktlsd)"
            )
    return problems


def _note_pq_chains(config: AgentConfig) -> None:
    """Say once, at start and in ``--check``, what the configured ML-DSA chains will do
    (ignored with a warning where the system OpenSSL has no ML-DSA). Without PQ keys the
    TLS engine is not loaded here (the agent is ready before it loads it)."""
    if not (config.client.pq_certificate or config.server.pq_certificate):
        return
    from ktlsd.material import pq_configuration_notes

    settings = config.agent_settings()
    for level, message in pq_configuration_notes({
        "authenticate.client": settings.client_x509,
        "authenticate.server": settings.server_x509,
    }):
        log.log(level, "%s", message)


def run_command(args: argparse.Namespace) -> int:
    """Logging first (so that what reading the configuration says is seen), then the
    configuration; ``--check`` stops there, otherwise serve."""
    import sys

    from ktlsd import __version__, log_output
    from ktlsd.config import ConfigError, load_config

    if args.check:
        log_output.configure("info", destinations=[log_output.Destination.STDERR])
    else:
        log_output.configure("debug" if args.debug else "info",
                             want_stderr=args.stderr, want_syslog=args.syslog)
    try:
        config = _apply_overrides(load_config(args.config), args)
    except ConfigError as exc:
        if args.check:
            print(f"ktlsd: {exc}", file=sys.stderr)
        else:
            log.error("%s", exc)
        return 1
    _note_pq_chains(config)
    if args.check:
        return check_config(config)
    log_output.set_level(config.effective_log_level)
    refused = key_log_problems(config)
    if refused:
        for problem in refused:
            log.error("%s", problem)
        return 1
    warning = key_log_warning(config)
    if warning:
        log.warning("%s", warning)
    log.log(log_output.NOTICE, "ktlsd %s starting (configuration: %s)", __version__,
            config.path or "none, built-in defaults")
    import asyncio

    from ktlsd import keyring

    try:
        return asyncio.run(serve(config, args))
    except keyring.KeyringError as exc:
        log.error("keyrings: %s", exc)
        return 1
    except SystemExit as exc:
        if isinstance(exc.code, str):
            log.error("%s", exc.code.removeprefix("ktlsd: "))
            return 1
        raise
