"""What the agent runs with, and the one copy of every built-in default.

This module is the bottom of ktlsd's import graph: it imports nothing from ktlsd, so the
configuration reader (:mod:`ktlsd.config`), the agent, the upcall sources and the consumer
library can all take their defaults from here without pulling each other in.

* :class:`AgentSettings` is everything the agent reads from the configuration, as plain values
  (paths, numbers, names; never secrets, so it may be logged). :mod:`ktlsd.config` builds it
  from the configuration file; :mod:`ktlsd.daemon` hands it to the agent, again on SIGHUP.
* :class:`X509Files` is one role's configured certificate files (tlshd's
  ``[authenticate.client]`` / ``[authenticate.server]``); files are read when a handshake needs
  them, so a renewed certificate is picked up without a restart.
* The ``DEFAULT_*`` constants are the only place a default is written; every other module,
  and docs/configuration.md, follows them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_TIMEOUT_MS = 10_000
"""Handshake and key-update timeout for requests that carry none
(``[ktlsd] default_timeout_ms``)."""

DEFAULT_SESSION_LIFETIME = 24 * 3600
"""Seconds a kept session state lives in the keyring (``[ktlsd] session_lifetime``)."""

DEFAULT_SERVICE_PATH = "/run/ktlsd/handshake.sock"
"""Where the user-space handshake service listens (``[ktlsd] service_socket``; consumers:
``$KTLSD_SERVICE_PATH``)."""

DEFAULT_SERVICE_MODE = 0o660
"""Permissions of the service socket file: who may submit requests (``[ktlsd] service_mode``)."""

DEFAULT_LINKED_KEYRINGS = (".nvme", ".nfs", ".nfsd")
"""The kernel consumers' keyrings, always linked into the agent's session keyring (as tlshd)."""

LegacyPskSha384 = Literal["refuse", "accept", "offer"]
LEGACY_PSK_SHA384_MODES: tuple[LegacyPskSha384, ...] = ("refuse", "accept", "offer")
DEFAULT_LEGACY_PSK_SHA384: LegacyPskSha384 = "accept"
"""How SHA-384 PSKs bound to SHA-256 (tlshd 1.0 on GnuTLS < 3.8.11) are treated
(``[ktlsd] legacy_psk_sha384``; see docs/configuration.md)."""

MIN_CONCURRENCY = 4
HANDSHAKES_PER_CPU = 8
"""``max_concurrent = 0`` sizes the bound to ``max(MIN_CONCURRENCY, HANDSHAKES_PER_CPU x CPUs)``:
handshakes mostly wait on the network, so several per CPU keep the CPUs busy."""


@dataclass(frozen=True)
class X509Files:
    """Configured x509 files for one role (tlshd's ``[authenticate.client]``/``.server``)."""

    truststore: str | None = None
    crl: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    require_client_cert: bool = False  # server: tlshd's x509.client_auth


@dataclass(frozen=True)
class AgentSettings:
    """What the agent needs from the configuration, in one place (frozen: reload replaces it).

    ``max_concurrent`` 0 sizes the bound to the CPUs (:attr:`concurrency`); ``keep_sessions``
    keeps each session's traffic secrets for later key updates, for ``session_lifetime``
    seconds (0: no expiry); ``default_timeout_ms`` applies to requests that carry no timeout.
    """

    client_x509: X509Files = field(default_factory=X509Files)
    server_x509: X509Files = field(default_factory=X509Files)
    keyrings: tuple[str, ...] = ()
    max_concurrent: int = 0
    groups: str | None = None
    keep_sessions: bool = True
    session_lifetime: int = DEFAULT_SESSION_LIFETIME
    default_timeout_ms: int = DEFAULT_TIMEOUT_MS
    legacy_psk_sha384: LegacyPskSha384 = DEFAULT_LEGACY_PSK_SHA384

    @property
    def concurrency(self) -> int:
        """Handshakes the agent runs at once."""
        if self.max_concurrent > 0:
            return self.max_concurrent
        return max(MIN_CONCURRENCY, (os.cpu_count() or 1) * HANDSHAKES_PER_CPU)
