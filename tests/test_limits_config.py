"""The admission and kept-session limits come from ``[ktlsd]``, and a reload applies them."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct

import pytest

from ktlsd.agent import Agent
from ktlsd.config import ConfigError, config_from_keyfile, parse_key_file
from ktlsd.settings import (
    DEFAULT_MAX_CONSUMER_TIMEOUT_MS,
    DEFAULT_MAX_KEPT_SESSIONS,
    DEFAULT_SUBMIT_TIMEOUT_MS,
    DEFAULT_UID_MAX_CONNECTIONS,
    DEFAULT_UID_MAX_IN_FLIGHT,
    DEFAULT_UID_MAX_KEPT_SESSIONS,
    DEFAULT_UID_MAX_PENDING,
    AgentSettings,
    ServiceLimits,
)
from ktlsd.upcall.service import HandshakeService
from ktlsd.upcall.wire import connect_service, decode_done_message, encode_submit
from tests.agent_helpers import tcp_pair
from tests.test_service import client_request
from tests.waiting import await_until, run

LIMITS = """[ktlsd]
pending_limit = 20
keep_kernel_sessions = yes
max_kept_sessions = 500
uid_max_kept_sessions = 7
max_consumer_timeout_ms = 4000
submit_timeout_ms = 750
service_max_connections = 300
uid_max_connections = 9
uid_max_pending = 2
uid_max_in_flight = 3
"""


def settings_of(text: str) -> AgentSettings:
    return config_from_keyfile(parse_key_file(text, "test.conf")).agent_settings()


def test_every_limit_has_a_key_and_one_default() -> None:
    defaults = settings_of("")
    assert defaults.service_limits == ServiceLimits()
    assert (defaults.max_consumer_timeout_ms, defaults.keep_kernel_sessions,
            defaults.max_kept_sessions, defaults.uid_max_kept_sessions) == (
        DEFAULT_MAX_CONSUMER_TIMEOUT_MS, False, DEFAULT_MAX_KEPT_SESSIONS,
        DEFAULT_UID_MAX_KEPT_SESSIONS)
    assert (ServiceLimits().submit_timeout_ms, ServiceLimits().uid_max_connections,
            ServiceLimits().uid_max_pending, ServiceLimits().uid_max_in_flight) == (
        DEFAULT_SUBMIT_TIMEOUT_MS, DEFAULT_UID_MAX_CONNECTIONS, DEFAULT_UID_MAX_PENDING,
        DEFAULT_UID_MAX_IN_FLIGHT)
    configured = settings_of(LIMITS)
    assert configured.service_limits == ServiceLimits(
        pending_limit=20, max_connections=300, submit_timeout_ms=750, uid_max_connections=9,
        uid_max_pending=2, uid_max_in_flight=3)
    assert (configured.max_consumer_timeout_ms, configured.keep_kernel_sessions,
            configured.max_kept_sessions, configured.uid_max_kept_sessions) == (
        4000, True, 500, 7)


@pytest.mark.parametrize("line", ["uid_max_pending = 0", "uid_max_in_flight = many",
                                  "max_consumer_timeout_ms = 0", "keep_kernel_sessions = 2",
                                  "max_kept_sessions = -1"])
def test_bad_limits_are_errors_with_file_and_line(line: str) -> None:
    with pytest.raises(ConfigError, match=r"test\.conf:2: \[ktlsd\] "):
        settings_of(f"[ktlsd]\n{line}\n")


def test_reload_applies_the_service_limits_and_the_store_caps(sock_path: str) -> None:
    """A reload lowers the uid's pending share from 5 to 1: the second queued request of the
    uid is refused at once; the agent's own store takes the new caps."""

    async def main() -> None:
        service = HandshakeService(sock_path, limits=ServiceLimits(uid_max_pending=5))
        await service.start()
        agent = Agent(AgentSettings(), [service])  # not running: only its reload is used
        conns, pairs = [], [tcp_pair() for _ in range(3)]
        try:
            agent.reload(settings_of(LIMITS.replace("uid_max_pending = 2",
                                                    "uid_max_pending = 1")))
            assert service.limits.uid_max_pending == 1
            assert (agent.store.max_sessions, agent.store.max_per_owner) == (500, 7)
            stream = service.requests()  # an agent that takes nothing yet
            for consumer, _ in pairs[:2]:
                conn = await connect_service(sock_path)
                conn.sendmsg([encode_submit(client_request())], [(
                    socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", consumer.fileno()))])
                conns.append(conn)
            await await_until(lambda: service.counters["EAGAIN"] == 1, "the second refused")
            assert service.pending_of(os.getuid()) == 1
            _, answer = decode_done_message(
                await asyncio.get_running_loop().sock_recv(conns[1], 65536))
            assert answer.status == errno.EAGAIN
            assert f"pending handshake requests of uid {os.getuid()} (1)" in answer.reason
            await stream.aclose()  # type: ignore[attr-defined]
        finally:
            for conn in conns:
                conn.close()
            for a, b in pairs:
                a.close()
                b.close()
            await service.close()

    run(main())
