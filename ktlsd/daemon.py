"""``ktlsd run``: the agent as a long-running service, a drop-in for tlshd.

Start-up, in order:

1. read the configuration (tlshd's file, ``[ktlsd]`` section for our own settings);
2. join a fresh session keyring of our own and link ``.nvme``, ``.nfs``, ``.nfsd`` and the
   configured keyrings into it, as tlshd does (kept session state also lives there, so only
   this process can read it);
3. open the upcall sources: the kernel's ``handshake`` family (``kernel = auto|yes|no``) and the
   user-space handshake service (``service_socket``);
4. serve until SIGTERM/SIGINT, which stop taking new requests and let requests in flight
   finish within their own timeouts; SIGHUP re-reads the configuration.

Logging goes to stderr (journald adds the timestamps): one line per handshake from the agent,
plus start-up and error lines. Never a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from dataclasses import replace

from ktlsd import keyring
from ktlsd.agent import Agent, link_keyrings
from ktlsd.config import AgentConfig, ConfigError, load_config
from ktlsd.request import UpcallSource
from ktlsd.settings import DEFAULT_LINKED_KEYRINGS

log = logging.getLogger("ktlsd")


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser(
        "run", help="run the handshake agent (kernel upcalls and the user-space service)",
        description="Serve TLS handshake requests from the kernel's 'handshake' netlink family "
        "and from user-space programs through the local handshake service.",
    )
    p.add_argument("-c", "--config", help="configuration file (default: /etc/tlshd/config, "
                   "then /etc/tlshd.conf)")
    p.add_argument("--socket", help="user-space service socket path ('none' disables it)")
    p.add_argument("--kernel", choices=("auto", "yes", "no"),
                   help="serve the kernel's handshake family (default from config: auto)")
    p.add_argument("--max-concurrent", type=int, help="handshakes run at once")
    p.add_argument("--pending-limit", type=int, help="service requests queued at most")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-s", "--stderr", action="store_true",
                   help="log to stderr (always on; accepted for tlshd compatibility)")
    p.set_defaults(func=run_command)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ktlsd: %(levelname)s %(message)s"))
    root = logging.getLogger("ktlsd")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def _apply_overrides(config: AgentConfig, args: argparse.Namespace) -> AgentConfig:
    """The command line wins over the configuration file."""
    if args.socket is not None:
        config = replace(config, service_socket=None if args.socket == "none" else args.socket)
    if args.kernel is not None:
        config = replace(config, kernel=args.kernel)
    if args.max_concurrent is not None:
        config = replace(config, max_concurrent=args.max_concurrent)
    if args.pending_limit is not None:
        config = replace(config, pending_limit=args.pending_limit)
    if args.verbose:
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
        except OSError as exc:
            raise SystemExit(
                f"ktlsd: cannot start the handshake service on {config.service_socket}: "
                f"{exc.strerror or exc}"
            ) from None
        sources.append(service)
    if not sources:
        raise SystemExit("ktlsd: nothing to serve (no kernel handshake family, service disabled)")
    return sources


def prepare_keyrings(config: AgentConfig) -> None:
    """A private session keyring with the consumers' keyrings linked in (as tlshd does)."""
    keyring.join_session_keyring(None)
    relink_keyrings(config)


def relink_keyrings(config: AgentConfig) -> None:
    """Link ``.nvme``, ``.nfs``, ``.nfsd`` and the configured keyrings into our session keyring.

    Linking again is harmless, so SIGHUP calls this too: keyrings added to the configuration,
    and kernel keyrings that appeared after start-up (nvme or nfsd loaded later), become
    searchable without a restart.
    """
    names = list(DEFAULT_LINKED_KEYRINGS) + [k for k in config.keyrings if k]
    linked = link_keyrings(names)
    log.info("keyrings linked: %s", ", ".join(linked) if linked else "none")


async def serve(config: AgentConfig, args: argparse.Namespace | None = None) -> int:
    prepare_keyrings(config)
    sources = await open_sources(config)
    agent = Agent(config.agent_settings(), sources)
    loop = asyncio.get_running_loop()

    stopping: list[asyncio.Task[None]] = []

    def terminate(signame: str) -> None:
        log.info("%s: no new requests; finishing %d in flight", signame, len(agent.in_flight))
        stopping.append(asyncio.ensure_future(agent.stop()))

    def reload() -> None:
        try:
            fresh = load_config(config.path)
            if args is not None:
                fresh = _apply_overrides(fresh, args)
        except ConfigError as exc:
            log.error("SIGHUP: configuration not reloaded: %s", exc)
            return
        setup_logging(fresh.effective_log_level)
        relink_keyrings(fresh)
        agent.reload(fresh.agent_settings())

    for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "SIGINT")):
        loop.add_signal_handler(sig, terminate, name)
    loop.add_signal_handler(signal.SIGHUP, reload)
    log.info("ktlsd agent running (max %d handshakes at once)", agent.settings.concurrency)
    try:
        await agent.run()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for source in sources:
            with contextlib.suppress(Exception):
                await source.close()
    log.info("stopped: %d handshakes completed, %d failed", agent.completed, agent.failed)
    return 0


def run_command(args: argparse.Namespace) -> int:
    try:
        config = _apply_overrides(load_config(args.config), args)
    except ConfigError as exc:
        print(f"ktlsd: {exc}", file=sys.stderr)
        return 1
    setup_logging(config.effective_log_level)
    try:
        return asyncio.run(serve(config, args))
    except keyring.KeyringError as exc:
        print(f"ktlsd: keyrings: {exc}", file=sys.stderr)
        return 1
