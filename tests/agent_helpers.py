"""Helpers for the agent-level tests: the real ``ktlsd run`` process, an in-process agent,
TCP pairs, a gated relay (a deliberately slow network) and a secret scanner for logs.

Everything here drives real components: a child ``python -m ktlsd run`` whose stderr is
collected line by line, the real :class:`~ktlsd.agent.Agent` over the real
:class:`~ktlsd.upcall.service.HandshakeService`, loopback TCP sockets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import select
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

from ktlsd.agent import Agent
from ktlsd.request import ConsumerCredentials, HandshakeDone, HandshakeRequest, KeyDelivery
from ktlsd.session_store import SessionStore
from ktlsd.settings import AgentSettings, ServiceLimits
from ktlsd.upcall.service import HandshakeService
from tests.processes import ChildProcess

REPO = Path(__file__).resolve().parent.parent
HANDSHAKE_LINE = re.compile(r"ktlsd: \w+ handshake (?P<fields>.*)$")
FIELD = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A connected loopback TCP pair (client end, server end)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def parse_handshake_line(line: str) -> dict[str, str]:
    """The ``key=value`` fields of one agent ``handshake ...`` log line (status as a number)."""
    match = HANDSHAKE_LINE.search(line)
    if match is None:
        raise ValueError(f"not a handshake log line: {line!r}")
    fields = {}
    for key, value in FIELD.findall(match.group("fields")):
        if value.startswith('"'):
            value = value[1:-1].encode("ascii").decode("unicode_escape")
        fields[key] = value
    return fields


class AgentProcess(ChildProcess):
    """``python -m ktlsd run`` as a child process, its stderr collected line by line.

    :meth:`wait_for` blocks until a line matching a pattern has been printed (readiness by
    the agent's own log, never by sleeping). :meth:`stop` sends SIGTERM and reaps.
    """

    def __init__(self, tmp: Path, config: str = "", *, extra: Iterable[str] = (),
                 env: dict[str, str] | None = None,
                 python_options: Iterable[str] = ()) -> None:
        self.socket_path = str(tmp / "handshake.sock")
        self.config_path = tmp / "ktlsd.conf"
        self.config_path.write_text(config)
        self.lines: list[str] = []
        self._partial = b""
        argv = [sys.executable, *python_options, "-m", "ktlsd", "run",
                "--socket", self.socket_path, "-c", str(self.config_path), "--kernel", "no",
                *extra]
        # The suite's own service manager and journal are not the agent's ($NOTIFY_SOCKET,
        # $JOURNAL_STREAM): only what the test passes in ``env``.
        inherited = {k: v for k, v in os.environ.items()
                     if k not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
        env = {**inherited, "PYTHONPATH": str(REPO), **(env or {})}
        super().__init__(argv, name="agent", stdin=subprocess.DEVNULL, env=env, cwd=str(tmp))

    def _received(self, buf: bytearray, chunk: bytes) -> None:
        super()._received(buf, chunk)
        if buf is not self.err:
            return
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        if not chunk and self._partial:  # end of stream: the last line had no newline
            complete.append(self._partial)
            self._partial = b""
        self.lines += [raw.decode("utf-8", "replace") for raw in complete]

    @property
    def stdout(self) -> bytes:
        with self._cond:
            return bytes(self.out)

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def matching(self, pattern: str) -> list[str]:
        with self._cond:
            return [line for line in self.lines if re.search(pattern, line)]

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list[str]:
        """Wait until ``count`` lines match ``pattern``; return them."""
        regex = re.compile(pattern)
        found: list[str] = []

        def enough() -> bool:
            found[:] = [line for line in self.lines if regex.search(line)]
            return len(found) >= count

        self.wait_output(
            enough,
            lambda: (f"agent printed {len(found)} of {count} lines matching {pattern!r}; "
                     f"log:\n" + "\n".join(self.lines)),
            timeout,
        )
        return list(found)

    async def await_for(self, pattern: str, count: int = 1, timeout: float = 20.0) -> list[str]:
        return await asyncio.to_thread(self.wait_for, pattern, count, timeout)

    def wait_ready(self) -> None:
        self.wait_for(r"ktlsd agent running")

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return super().wait_exit(timeout)

    def stop(self, grace: float = 30.0) -> int:
        """SIGTERM; the agent drains its requests in flight (up to ``grace`` s), then exits."""
        return super().stop(grace)

    def __enter__(self) -> AgentProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self


ONE_UID_FOR_ALL = ServiceLimits(uid_max_connections=10_000, uid_max_pending=10_000,
                                uid_max_in_flight=10_000)
"""Service limits for tests whose many consumers all run as the test's own uid (standing for
many local programs): no per-uid share applies."""

ONE_UID_FOR_ALL_CONFIG = ("uid_max_connections = 10000\nuid_max_pending = 10000\n"
                          "uid_max_in_flight = 10000\n")
"""The same as ``[ktlsd]`` configuration lines, for :class:`AgentProcess`."""


@contextlib.asynccontextmanager
async def running_agent(path: str, settings: AgentSettings | None = None, *,
                        store: SessionStore | None = None,
                        **service_args: Any) -> AsyncIterator[Agent]:
    """The real agent serving the real handshake service at ``path``, in this process (with
    :data:`ONE_UID_FOR_ALL` limits unless ``limits`` is given)."""
    service_args.setdefault("limits", ONE_UID_FOR_ALL)
    service = HandshakeService(path, **service_args)
    await service.start()
    agent = Agent(settings or AgentSettings(), [service], store=store)
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        await agent.stop()
        await asyncio.wait_for(task, 30)


class GatedRelay:
    """A TCP relay that holds every byte until :meth:`open` — a peer that answers late.

    ``connect()`` returns (client end, server end) like :func:`tcp_pair`, but the bytes each
    end sends reach the other only after the gate is opened, so handshakes on them start,
    send their first flight and then wait, deterministically, for as long as the test wants.
    """

    def __init__(self, *, opened: bool = False) -> None:
        self.gate = asyncio.Event()
        if opened:
            self.gate.set()
        # Every byte that went through, per direction ("c2s": client end to server end).
        self.captured: dict[str, bytearray] = {"c2s": bytearray(), "s2c": bytearray()}
        self._tasks: list[asyncio.Task[None]] = []
        self._keep: list[socket.socket] = []

    async def connect(self) -> tuple[socket.socket, socket.socket]:
        client, relay_a = tcp_pair()
        relay_b, server = tcp_pair()
        for sock in (client, server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for sock in (relay_a, relay_b):
            # Forward at once: with Nagle, a small segment waits for the peer's delayed ACK.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            self._keep.append(sock)
        self._tasks.append(asyncio.create_task(self._pump(relay_a, relay_b, "c2s")))
        self._tasks.append(asyncio.create_task(self._pump(relay_b, relay_a, "s2c")))
        return client, server

    async def _pump(self, source: socket.socket, sink: socket.socket, direction: str) -> None:
        loop = asyncio.get_running_loop()
        held = b""
        reading = asyncio.ensure_future(loop.sock_recv(source, 65536))
        gate = asyncio.ensure_future(self.gate.wait())
        try:
            while True:
                await asyncio.wait({reading, gate}, return_when=asyncio.FIRST_COMPLETED)
                if reading.done():
                    try:
                        data = reading.result()
                    except OSError:
                        data = b""
                    if not data:
                        await self.gate.wait()
                        await loop.sock_sendall(sink, held)
                        with contextlib.suppress(OSError):
                            sink.shutdown(socket.SHUT_WR)
                        return
                    held += data
                    self.captured[direction] += data
                    reading = asyncio.ensure_future(loop.sock_recv(source, 65536))
                if self.gate.is_set() and held:
                    await loop.sock_sendall(sink, held)
                    held = b""
        finally:
            reading.cancel()
            gate.cancel()

    def open(self) -> None:
        self.gate.set()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        for sock in self._keep:
            sock.close()


def secret_forms(secret: bytes) -> set[str]:
    """Every spelling of ``secret`` a log could carry: hex (both cases) and base64.

    Base64 of the secret embedded in a longer blob depends on its alignment, so the secret is
    encoded from each of the three byte offsets, keeping only the characters that do not
    depend on the neighbouring bytes.
    """
    forms = {secret.hex(), secret.hex().upper()}
    for shift in range(3):
        part = secret[shift:]
        usable = len(part) - len(part) % 3
        if usable >= 12:
            forms.add(base64.b64encode(part[:usable]).decode())
            forms.add(base64.urlsafe_b64encode(part[:usable]).decode())
    return forms


def find_secrets(text: str, secrets: dict[str, bytes]) -> list[str]:
    """Names of the secrets that appear in ``text`` in any of their spellings."""
    found = []
    for name, secret in secrets.items():
        if any(form in text for form in secret_forms(secret)):
            found.append(name)
    return found


class LogLines(logging.Handler):
    """Collects the ``ktlsd`` logger's records (with ``propagate`` untouched)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def handshake_lines(self) -> list[str]:
        return [m for m in self.messages if m.startswith("handshake ")]

    @contextlib.contextmanager
    def attached(self, logger: str = "ktlsd") -> Any:
        log = logging.getLogger(logger)
        previous = log.level
        log.addHandler(self)
        log.setLevel(logging.DEBUG)
        try:
            yield self
        finally:
            log.removeHandler(self)
            log.setLevel(previous)


class DirectRequest:
    """A pending request handed to ``Agent.serve`` directly, as another upcall source would
    (the kernel's family and the service both feed one agent). ``credentials`` None is the
    kernel (trusted); ``delivery`` INSTALL_KTLS is a kernel consumer's (kTLS installed, no
    secrets in DONE); ``source_name`` is only the log label."""

    def __init__(self, request: HandshakeRequest, *, source_name: str = "service",
                 credentials: ConsumerCredentials | None = None,
                 delivery: KeyDelivery = KeyDelivery.RETURN_SECRETS) -> None:
        self.request = request
        self.source_name = source_name
        self.credentials = credentials
        self.delivery = delivery
        self.cancelled = asyncio.Event()
        self.answers: list[HandshakeDone] = []

    async def done(self, answer: HandshakeDone) -> None:
        self.answers.append(answer)
        os.close(self.request.sockfd)


class NotifyListener:
    """The service manager's end of sd_notify: a real ``AF_UNIX`` datagram socket.

    ``address`` is what ``$NOTIFY_SOCKET`` should say: a path in ``tmp`` or, with
    ``abstract=True``, ``@name`` (an abstract socket). :meth:`receive` returns the next
    message as a dict of its ``VARIABLE=value`` lines; its timeout only turns a hang into a
    failure.
    """

    def __init__(self, tmp: Path, *, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        if abstract:
            name = f"ktlsd-test-notify-{os.getpid()}-{id(self):x}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            path = str(tmp / "notify.sock")
            self.sock.bind(path)
            self.address = path
        self.messages: list[dict[str, str]] = []

    def receive(self, timeout: float = 20.0) -> dict[str, str]:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            raise AssertionError(f"no sd_notify message within {timeout:g} s "
                                 f"(so far: {self.messages})")
        data = self.sock.recv(65536)
        message = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
        self.messages.append(message)
        return message

    def pending(self) -> list[dict[str, str]]:
        """Messages already sent and not yet received (without waiting)."""
        out = []
        while select.select([self.sock], [], [], 0)[0]:
            out.append(self.receive(0))
        return out

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NotifyListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
