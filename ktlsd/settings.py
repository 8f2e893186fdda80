"""What the agent runs with, and the one copy of every built-in default.

This module is the bottom of ktlsd's import graph: it imports nothing from ktlsd, so the
configuration reader (:mod:`ktlsd.config`), the agent, the upcall sources and the consumer
library can all take their defaults from here without pulling each other in.

* :class:`AgentSettings` is everything the agent reads from the configuration, as plain values
  (paths, numbers, names; never secrets, so it may be logged -- the one exception, a PIN in a
  ``pkcs11:`` key URI, is redacted by every repr: :func:`redact_pin_value`).
  :mod:`ktlsd.config` builds it from the configuration file; :mod:`ktlsd.daemon` hands it to
  the agent, again on SIGHUP.
* :class:`X509Files` is one role's configured certificate files (tlshd's
  ``[authenticate.client]`` / ``[authenticate.server]``); files are read when a handshake needs
  them, so a renewed certificate is picked up without a restart.
* The ``DEFAULT_*`` constants are the only place a default is written; every other module,
  and docs/configuration.md, follows them.
"""

from __future__ import annotations

import os
import re
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

MIN_RECORD_SIZE_LIMIT = 64
"""The smallest ``record_size_limit`` RFC 8449 allows (a peer's smaller value is illegal)."""
MAX_RECORD_SIZE_LIMIT = 2**14 + 1
"""The largest TLS 1.3 ``record_size_limit``: 2^14 bytes of content plus the content type."""
DEFAULT_RECORD_SIZE_LIMIT = MAX_RECORD_SIZE_LIMIT
"""The ``record_size_limit`` (RFC 8449) ktlsd advertises: the largest record it accepts,
content type included (``[ktlsd] record_size_limit``)."""

DEFAULT_MAX_FILE_BYTES = 1 << 20
"""The largest certificate, key, truststore or CRL file read for a handshake
(``[ktlsd] max_file_bytes``); bigger files are refused by their size, unread."""

DEFAULT_MAX_CONSUMER_TIMEOUT_MS = 30_000
"""The longest timeout a service consumer may ask for (``[ktlsd] max_consumer_timeout_ms``):
three times the default, ample for a TLS 1.3 handshake over any real link, and the longest a
stalled peer can hold one of its uid's slots."""

DEFAULT_SUBMIT_TIMEOUT_MS = 2_000
"""How long a new service connection may stay silent before SUBMIT (``[ktlsd]
submit_timeout_ms``); the client library sends SUBMIT right after connecting."""

DEFAULT_SERVICE_MAX_CONNECTIONS = 1024
"""Service connections open at once, all uids together (``[ktlsd] service_max_connections``)."""

DEFAULT_UID_MAX_CONNECTIONS = 64
"""Service connections one uid may hold open (``[ktlsd] uid_max_connections``)."""

DEFAULT_UID_MAX_PENDING = 8
"""Service requests of one uid queued for the agent (``[ktlsd] uid_max_pending``)."""

DEFAULT_UID_MAX_IN_FLIGHT = 4
"""Service requests of one uid the agent runs at once (``[ktlsd] uid_max_in_flight``)."""

DEFAULT_MAX_KEPT_SESSIONS = 10_000
"""Kept session states, all owners together (``[ktlsd] max_kept_sessions``): about 1.6 MB
and 10,000 keys of root's key quota (docs/service.md, "Limits")."""

DEFAULT_UID_MAX_KEPT_SESSIONS = 256
"""Kept session states of one consumer uid (``[ktlsd] uid_max_kept_sessions``)."""

DEFAULT_TAGS_DIRECTORY = "/etc/tlshd/tags.d"
"""Where TLS session tag files are read (tlshd 1.4's fixed path; ``[ktlsd] tags_directory``;
docs/configuration.md, "Session tags")."""

WORKERS_AUTO = -1
MAX_WORKERS = 256
DEFAULT_WORKERS = 1
"""Handshake worker processes (``[ktlsd] workers``, ``ktlsd run --workers N``): ``auto``
(:data:`WORKERS_AUTO`) is one per CPU; 0 or 1 runs every handshake in the agent's own process,
as a single process (see :func:`worker_processes`). The default is 1: on the 2-CPU machine
measured so far two workers were 1.43x one process for x509 but 1.17x for PSK (the hop to a
worker costs ~0.4 ms per PSK handshake), and each idle worker costs ~20 MiB
(docs/benchmarks.md, "Handshake service with workers")."""


def parse_workers(text: str) -> int:
    """``auto`` (:data:`WORKERS_AUTO`) or a number of worker processes (0 to
    :data:`MAX_WORKERS`); ValueError with a one-line reason otherwise."""
    value = text.strip().lower()
    if value == "auto":
        return WORKERS_AUTO
    if not value.isdigit():
        raise ValueError(f"{text!r} is not auto or a number of processes")
    if int(value) > MAX_WORKERS:
        raise ValueError(f"{int(value)} is above the maximum {MAX_WORKERS}")
    return int(value)


def worker_processes(workers: int) -> int:
    """How many worker processes ``workers`` starts: the CPUs for :data:`WORKERS_AUTO`, and
    none (handshakes in the agent's process) for 0 or 1, or on a machine with one CPU."""
    count = (os.cpu_count() or 1) if workers == WORKERS_AUTO else workers
    return count if count >= 2 else 0


MIN_CONCURRENCY = 4
HANDSHAKES_PER_CPU = 8
"""``max_concurrent = 0`` sizes the bound to ``max(MIN_CONCURRENCY, HANDSHAKES_PER_CPU x CPUs)``:
handshakes mostly wait on the network, so several per CPU keep the CPUs busy."""


@dataclass(frozen=True)
class X509Files:
    """Configured x509 files for one role (tlshd's ``[authenticate.client]``/``.server``).

    ``private_key`` may be a ``pkcs11:`` URI (a key held by a token, :mod:`ktlsd.hardware_key`)
    loaded through ``pkcs11_module`` (``[ktlsd] pkcs11_module``; None: the library's default);
    ``repr`` redacts a ``pin-value`` in it, so a reload's log line never shows a PIN.
    """

    truststore: str | None = None
    crl: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    require_client_cert: bool = False  # server: tlshd's x509.client_auth
    # tlshd's x509.pq.certificate / x509.pq.private_key: an ML-DSA chain served next to the
    # classic one where the library has ML-DSA (ktlsd.material).
    pq_certificate: str | None = None
    pq_private_key: str | None = None
    pkcs11_module: str | None = None
    # server: tlshd's x509.client_allowed_sans, for the kernel's requests (not set: any client
    # certificate the truststore verifies); not empty also means a certificate is required
    client_allowed_sans: tuple[str, ...] = ()

    def __repr__(self) -> str:
        shown = {name: getattr(self, name) for name in self.__dataclass_fields__}
        if shown["private_key"]:
            shown["private_key"] = redact_pin_value(shown["private_key"])
        return "X509Files(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


# A pkcs11: URI's PIN runs to the next attribute separator (the query splits on "&" only, so a
# "?" or "=" belongs to the PIN); spaces around the name and "=" are accepted by the parser.
_PIN_VALUE = re.compile(r"(pin-value\s*=)[^;&]*", re.IGNORECASE)


def redact_pin_value(text: str) -> str:
    """``text`` (a key setting, a ``pkcs11:`` URI) with every ``pin-value`` replaced: the one
    redaction (:func:`ktlsd.pkcs11_uri.redact` is this), for reprs, logs and messages."""
    return _PIN_VALUE.sub(r"\1<redacted>", text)


@dataclass(frozen=True)
class ServiceLimits:
    """What one local user may hold of the user-space handshake service (per uid), and the
    service's totals. ``pending_limit`` 0 means the kernel's rule (see
    :func:`ktlsd.upcall.service.default_pending_limit`)."""

    pending_limit: int = 0
    max_connections: int = DEFAULT_SERVICE_MAX_CONNECTIONS
    submit_timeout_ms: int = DEFAULT_SUBMIT_TIMEOUT_MS
    uid_max_connections: int = DEFAULT_UID_MAX_CONNECTIONS
    uid_max_pending: int = DEFAULT_UID_MAX_PENDING
    uid_max_in_flight: int = DEFAULT_UID_MAX_IN_FLIGHT


@dataclass(frozen=True)
class AgentSettings:
    """What the agent needs from the configuration, in one place (frozen: reload replaces it).

    ``max_concurrent`` 0 sizes the bound to the CPUs (:attr:`concurrency`); it applies to
    each upcall source separately, so service consumers never take the kernel's slots.
    ``keep_sessions`` allows keeping a session's traffic secrets for later key updates, for
    ``session_lifetime`` seconds (0: no expiry): for a service consumer when its request asks
    for it, for the kernel when ``keep_kernel_sessions`` is set; at most
    ``uid_max_kept_sessions`` per consumer uid and ``max_kept_sessions`` in all.
    ``default_timeout_ms`` applies to requests that carry no timeout; a service consumer's
    timeout is clamped to ``max_consumer_timeout_ms``. ``service_limits`` bound each uid's
    share of the handshake service. ``tags_directory`` holds the TLS session tag files
    (:mod:`ktlsd.session_tags`), read at start and on reload. ``key_log_file``
    (``[ktlsd] key_log_file``; None: off) is where every handshake's secrets are written for
    debugging (:mod:`ktlsd.tls.keylog`; the path itself is not a secret).
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
    record_size_limit: int = DEFAULT_RECORD_SIZE_LIMIT
    max_consumer_timeout_ms: int = DEFAULT_MAX_CONSUMER_TIMEOUT_MS
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    keep_kernel_sessions: bool = False
    max_kept_sessions: int = DEFAULT_MAX_KEPT_SESSIONS
    uid_max_kept_sessions: int = DEFAULT_UID_MAX_KEPT_SESSIONS
    service_limits: ServiceLimits = field(default_factory=ServiceLimits)
    tags_directory: str = DEFAULT_TAGS_DIRECTORY
    key_log_file: str | None = None

    @property
    def concurrency(self) -> int:
        """Handshakes the agent runs at once."""
        if self.max_concurrent > 0:
            return self.max_concurrent
        return max(MIN_CONCURRENCY, (os.cpu_count() or 1) * HANDSHAKES_PER_CPU)
