"""ktlsd's configuration: tlshd's configuration file, read unchanged, plus a ``[ktlsd]`` section.

ktlsd is a drop-in replacement for tlshd, so it reads the file tlshd reads, with tlshd's
syntax (a GLib "key file") and tlshd's keys::

    [debug]                 loglevel, tls, nl (integers), delay_done (seconds)
    [authenticate]          keyrings = name-or-serial;name-or-serial;...
    [authenticate.client]   x509.truststore, x509.crl, x509.certificate, x509.private_key,
                            x509.pq.certificate, x509.pq.private_key
    [authenticate.server]   the same, plus x509.client_auth (bool), x509.client_allowed_sans

ktlsd's own settings live in the same file under ``[ktlsd]`` (tlshd ignores sections it does
not know, so one file serves both). See docs/configuration.md for every key.

:meth:`AgentConfig.agent_settings` maps a configuration to the agent's
:class:`~ktlsd.settings.AgentSettings`. Defaults come from :mod:`ktlsd.settings`; this module
imports nothing of the agent, the TLS engine or the upcall sources.

Which file (:func:`find_config`): an explicit path; else ``$KTLSD_CONFIG``; else, like tlshd,
the legacy ``/etc/tlshd.conf`` when it exists, then ``/etc/tlshd/config``; else no file at all
(built-in defaults -- ktlsd, unlike tlshd, runs without a configuration file).

Errors: a line that is not a comment, group or ``key=value``, a key before any group, bad
UTF-8, a bad escape or a bad value in ``[ktlsd]`` raise :class:`ConfigError`, whose message
is one line: ``<file>:<line>: <what is wrong>``. Unknown groups and keys are warned about and
ignored (tlshd's configuration keeps growing). ``x509.pq.certificate`` /
``x509.pq.private_key`` (an ML-DSA chain) are read here and used where the system OpenSSL has
ML-DSA (:mod:`ktlsd.material`; the agent warns at start where it has not).

:data:`TLSHD_KEYS` is the one table of tlshd's keys: per key, which tlshd reads it and what
ktlsd does with it (:class:`KeyBehaviour`: supported, or ignored -- then logged when set to
something that would matter); :func:`config_keys` adds the ``[ktlsd]`` keys.
docs/configuration.md ("Every key") shows the same rows; tests/test_config_keys.py holds the
two equal and the tlshd 1.4 rows equal to ktls-utils 1.4.0's list. tlshd's own
``[debug]`` integers are read as GLib reads them (:func:`glib_integer`: ``loglevel=2 # two`` is
2), and an unparsable one counts as 0, as for tlshd (with a warning).
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from ktlsd.log_output import NOTICE
from ktlsd.pkcs11_uri import is_pkcs11_uri, parse_pkcs11_uri, redact
from ktlsd.settings import (
    DEFAULT_LEGACY_PSK_SHA384,
    DEFAULT_MAX_CONSUMER_TIMEOUT_MS,
    DEFAULT_MAX_FILE_BYTES,
    DEFAULT_MAX_KEPT_SESSIONS,
    DEFAULT_RECORD_SIZE_LIMIT,
    DEFAULT_SERVICE_MAX_CONNECTIONS,
    DEFAULT_SERVICE_MODE,
    DEFAULT_SERVICE_PATH,
    DEFAULT_SESSION_LIFETIME,
    DEFAULT_SUBMIT_TIMEOUT_MS,
    DEFAULT_TAGS_DIRECTORY,
    DEFAULT_TIMEOUT_MS,
    DEFAULT_UID_MAX_CONNECTIONS,
    DEFAULT_UID_MAX_IN_FLIGHT,
    DEFAULT_UID_MAX_KEPT_SESSIONS,
    DEFAULT_UID_MAX_PENDING,
    DEFAULT_WORKERS,
    LEGACY_PSK_SHA384_MODES,
    MAX_RECORD_SIZE_LIMIT,
    MIN_RECORD_SIZE_LIMIT,
    AgentSettings,
    LegacyPskSha384,
    ServiceLimits,
    X509Files,
    parse_workers,
)

log = logging.getLogger("ktlsd.config")

CONFIG_PATH = "/etc/tlshd/config"
LEGACY_CONFIG_PATH = "/etc/tlshd.conf"
ENV_CONFIG = "KTLSD_CONFIG"
SEARCH_PATHS: tuple[str, ...] = (LEGACY_CONFIG_PATH, CONFIG_PATH)
"""tlshd's order: the legacy file wins when it exists (tlshd then asks to relocate it)."""

_T = TypeVar("_T")

LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_CONFIG_BYTES = 1 << 20


class ConfigError(ValueError):
    """A configuration file cannot be used; ``str()`` is ``<file>:<line>: <reason>``."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = " ".join(reason.split())
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {self.reason}")


# --- the key-file syntax -----------------------------------------------------------------


@dataclass(frozen=True)
class KeyValue:
    """One ``key=value`` as written (value still escaped), with its line number."""

    value: str
    line: int


@dataclass
class KeyFile:
    """A parsed GLib key file: groups of keys, in file order, duplicates merged (last wins)."""

    path: str
    groups: dict[str, dict[str, KeyValue]] = field(default_factory=dict)
    group_lines: dict[str, int] = field(default_factory=dict)


def _valid_group_name(name: str) -> bool:
    return bool(name) and not any(c in "[]" or ord(c) < 0x20 or c == "\x7f" for c in name)


def parse_key_file(text: str, path: str = "<config>") -> KeyFile:
    """Parse GLib key-file syntax the way ``g_key_file_load_from_file()`` accepts it.

    Leading whitespace on a line is ignored; ``#`` starts a comment line; ``[group]`` opens a
    group (repeated groups merge); ``key=value`` with whitespace around ``=`` ignored. Keys
    with a locale suffix (``key[de]``) are accepted and ignored, as ktlsd has nothing to
    localise. One deliberate leniency: trailing whitespace of a value is dropped too (GLib
    keeps it, which only ever breaks a path); write ``\\s`` for a significant trailing space.
    """
    result = KeyFile(path=path)
    current: str | None = None
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.lstrip().rstrip("\r")
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            stripped = line.rstrip()
            if not stripped.endswith("]"):
                raise ConfigError(path, number, f"unterminated group header {stripped!r}")
            name = stripped[1:-1]
            if not _valid_group_name(name):
                raise ConfigError(path, number, f"invalid group name {name!r}")
            current = name
            result.groups.setdefault(name, {})
            result.group_lines.setdefault(name, number)
            continue
        if "=" not in line:
            raise ConfigError(
                path, number, f"{line.strip()!r} is not a key=value pair, group or comment"
            )
        key, _, value = line.partition("=")
        key = key.rstrip()
        if not key:
            raise ConfigError(path, number, "empty key name")
        if current is None:
            raise ConfigError(path, number, f"key {key!r} before any [group]")
        if "[" in key or "]" in key:
            base, bracket, rest = key.partition("[")
            if not base or not bracket or not rest.endswith("]") or "[" in rest[:-1]:
                raise ConfigError(path, number, f"invalid key name {key!r}")
            continue  # a localised value: nothing for ktlsd to use
        group = result.groups[current]
        if key in group:
            log.warning("%s:%d: [%s] %s set again (line %d); the later value wins",
                        path, number, current, key, group[key].line)
        group[key] = KeyValue(value.strip(), number)
    return result


_ESCAPES = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(value: str, *, separator: str | None = ";") -> str:
    """Resolve GLib escapes (``\\s \\n \\t \\r \\\\`` and an escaped list separator)."""
    out: list[str] = []
    chars = iter(value)
    for char in chars:
        if char != "\\":
            out.append(char)
            continue
        following = next(chars, None)
        if following is None:
            raise ValueError("value ends with a lone backslash")
        if following in _ESCAPES:
            out.append(_ESCAPES[following])
        elif separator is not None and following == separator:
            out.append(following)
        else:
            raise ValueError(f"invalid escape sequence \\{following}")
    return "".join(out)


def split_list(value: str, separator: str = ";") -> list[str]:
    """A GLib string list: split on unescaped separators, unescape each item.

    A trailing separator is allowed (``a;b;``); blank items are dropped, and whitespace around
    items is ignored (``a; b`` means ``a`` and ``b``).
    """
    items: list[str] = []
    current: list[str] = []
    escaped = False
    for char in value:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    items.append("".join(current))
    out = [unescape(item, separator=separator).strip() for item in items]
    return [item for item in out if item]


# --- the settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class X509Settings:
    """One role's x509 material from ``[authenticate.client]`` or ``[authenticate.server]``.

    Paths are kept as written; files are read when a handshake needs them (like tlshd), so a
    certificate renewed on disk is picked up without a restart.
    """

    truststore: str | None = None
    crl: str | None = None
    certificate: str | None = None
    private_key: str | None = None
    pq_certificate: str | None = None
    pq_private_key: str | None = None
    client_auth: bool | None = None  # server only: require a client certificate
    # server only: the DNS/IP SANs a client certificate must carry one of (kernel requests;
    # implies client_auth; see ktlsd.tls.allowed_sans)
    client_allowed_sans: tuple[str, ...] = ()

    def __repr__(self) -> str:  # a pkcs11: private key may carry a pin-value
        shown = {name: getattr(self, name) for name in self.__dataclass_fields__}
        if shown["private_key"]:
            shown["private_key"] = redact(shown["private_key"])
        return "X509Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


@dataclass(frozen=True)
class AgentConfig:
    """Everything ktlsd reads from its configuration file (frozen: reload builds a new one).

    tlshd's keys: ``debug_loglevel``/``debug_tls``/``debug_nl``/``delay_done`` ([debug]),
    ``keyrings`` ([authenticate]; names or serial numbers, as written), ``client``/``server``
    ([authenticate.client]/[authenticate.server]).

    ktlsd's keys ([ktlsd]): ``service_socket`` (user-space handshake service path; ``None``
    disables the service), ``service_mode``, ``service_group`` (name or gid), ``kernel``
    ("auto": serve the kernel's handshake family when it exists; "yes": failing to is fatal;
    "no"),
    ``max_concurrent`` (0 = sized to the CPUs by the agent), ``pending_limit`` (0 = the
    kernel's rule), ``default_timeout_ms`` (for requests that carry no timeout),
    ``session_lifetime`` (seconds kept session state lives in the keyring; 0 keeps none),
    ``keep_kernel_sessions``, ``max_kept_sessions``, ``uid_max_kept_sessions`` (which sessions
    are kept, how many), ``max_consumer_timeout_ms``, ``submit_timeout_ms``,
    ``service_max_connections``, ``uid_max_connections``, ``uid_max_pending``,
    ``uid_max_in_flight`` (each local user's share of the service; docs/service.md, "Limits"),
    ``max_file_bytes`` (largest certificate/key/truststore/CRL file read), ``workers``
    (handshake worker processes: ``auto`` = one per CPU, stored as ``WORKERS_AUTO``; 0 or 1
    = none, handshakes run in the agent's process; read at start only),
    ``log_level``, ``groups`` (TLS key-exchange groups, colon-separated, as OpenSSL spells them),
    ``legacy_psk_sha384`` ("refuse"/"accept"/"offer": SHA-384 PSKs bound to SHA-256 the way
    tlshd 1.0 does them; see docs/configuration.md), ``record_size_limit`` (the RFC 8449
    limit the agent advertises: the largest record it takes, 64..16385), ``tags_directory``
    (TLS session tag files; tlshd reads the fixed /etc/tlshd/tags.d and has no key for it),
    ``pkcs11_module`` (the PKCS#11 module for ``x509.private_key = pkcs11:...`` URIs; None:
    the library's default, p11-kit's proxy), ``key_log_file`` (an absolute path:
    write every handshake's TLS secrets there, NSS key log format, for debugging; off unless
    set).
    """

    path: str | None = None
    debug_loglevel: int = 0
    debug_tls: int = 0
    debug_nl: int = 0
    delay_done: int = 0
    keyrings: tuple[str, ...] = ()
    client: X509Settings = field(default_factory=X509Settings)
    server: X509Settings = field(default_factory=X509Settings)
    service_socket: str | None = DEFAULT_SERVICE_PATH
    service_mode: int = DEFAULT_SERVICE_MODE
    service_group: str | int | None = None
    kernel: str = "auto"
    max_concurrent: int = 0
    pending_limit: int = 0
    default_timeout_ms: int = DEFAULT_TIMEOUT_MS
    session_lifetime: int = DEFAULT_SESSION_LIFETIME
    keep_kernel_sessions: bool = False
    max_kept_sessions: int = DEFAULT_MAX_KEPT_SESSIONS
    uid_max_kept_sessions: int = DEFAULT_UID_MAX_KEPT_SESSIONS
    max_consumer_timeout_ms: int = DEFAULT_MAX_CONSUMER_TIMEOUT_MS
    submit_timeout_ms: int = DEFAULT_SUBMIT_TIMEOUT_MS
    service_max_connections: int = DEFAULT_SERVICE_MAX_CONNECTIONS
    uid_max_connections: int = DEFAULT_UID_MAX_CONNECTIONS
    uid_max_pending: int = DEFAULT_UID_MAX_PENDING
    uid_max_in_flight: int = DEFAULT_UID_MAX_IN_FLIGHT
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    log_level: str | None = None
    groups: str | None = None
    legacy_psk_sha384: LegacyPskSha384 = DEFAULT_LEGACY_PSK_SHA384
    workers: int = DEFAULT_WORKERS
    record_size_limit: int = DEFAULT_RECORD_SIZE_LIMIT
    tags_directory: str = DEFAULT_TAGS_DIRECTORY
    pkcs11_module: str | None = None
    key_log_file: str | None = None

    @property
    def effective_log_level(self) -> str:
        """``[ktlsd] log_level`` if set; else "debug" when tlshd's ``[debug] loglevel`` > 0."""
        if self.log_level is not None:
            return self.log_level
        return "debug" if self.debug_loglevel > 0 else "info"

    def agent_settings(self) -> AgentSettings:
        """The :class:`~ktlsd.settings.AgentSettings` for this configuration.

        ``session_lifetime`` 0 means "keep no session state" (key updates then need a new
        handshake): state that never expired would pile up for kernel sessions, which have
        no teardown upcall.
        """

        def files(x: X509Settings) -> X509Files:
            return X509Files(truststore=x.truststore, crl=x.crl, certificate=x.certificate,
                             private_key=x.private_key,
                             require_client_cert=bool(x.client_auth),
                             pq_certificate=x.pq_certificate,
                             pq_private_key=x.pq_private_key,
                             pkcs11_module=self.pkcs11_module,
                             client_allowed_sans=x.client_allowed_sans)

        return AgentSettings(
            client_x509=files(self.client),
            server_x509=files(self.server),
            keyrings=self.keyrings,
            max_concurrent=self.max_concurrent,
            groups=self.groups,
            keep_sessions=self.session_lifetime > 0,
            session_lifetime=self.session_lifetime,
            default_timeout_ms=self.default_timeout_ms,
            legacy_psk_sha384=self.legacy_psk_sha384,
            record_size_limit=self.record_size_limit,
            max_consumer_timeout_ms=self.max_consumer_timeout_ms,
            max_file_bytes=self.max_file_bytes,
            keep_kernel_sessions=self.keep_kernel_sessions,
            max_kept_sessions=self.max_kept_sessions,
            uid_max_kept_sessions=self.uid_max_kept_sessions,
            service_limits=ServiceLimits(
                pending_limit=self.pending_limit,
                max_connections=self.service_max_connections,
                submit_timeout_ms=self.submit_timeout_ms,
                uid_max_connections=self.uid_max_connections,
                uid_max_pending=self.uid_max_pending,
                uid_max_in_flight=self.uid_max_in_flight,
            ),
            tags_directory=self.tags_directory,
            key_log_file=self.key_log_file,
        )


class KeyBehaviour(enum.Enum):
    """What ktlsd does with a configuration key (docs/configuration.md, "Every key")."""

    SUPPORTED = "supported"
    """Read and used, with tlshd's meaning (or, for ``[ktlsd]``, ktlsd's own)."""
    IGNORED = "ignored with a warning"
    """Accepted without effect; a value that would matter (not empty, not 0) is logged: a
    warning, or a notice for tlshd's debug levels (they only change what tlshd logs)."""
    KTLSD_ONLY = "ktlsd-only"
    """A ``[ktlsd]`` key: tlshd never reads that section."""


@dataclass(frozen=True)
class ConfigKey:
    """One configuration key: its group, which tlshd reads it, and what ktlsd does with it.

    ``tlshd``: ``1.4`` (ktls-utils 1.4.0 reads it), ``0.x`` (only the first tlshd.conf's
    ``[main]`` had it), ``proposed`` (an unreleased ktls-utils change; tlshd 1.4 ignores it)
    or ``-`` (ktlsd's own). ``kind``: int, path, bool, list or value. ``why``: the warning's
    reason for an ignored key.
    """

    group: str
    key: str
    tlshd: str
    behaviour: KeyBehaviour
    kind: str = "value"
    why: str = ""


_SUPPORTED, _IGNORED = KeyBehaviour.SUPPORTED, KeyBehaviour.IGNORED

TLSHD_KEYS: tuple[ConfigKey, ...] = (
    # One row per key (docs/configuration.md has the same table; tests/test_config_keys.py
    # holds them equal, and the tlshd 1.4 rows equal to ktls-utils 1.4.0's list).
    ConfigKey("debug", "loglevel", "1.4", _SUPPORTED, "int"),
    ConfigKey("debug", "tls", "1.4", _IGNORED, "int",
              "tlshd's TLS library debug level; ktlsd never logs TLS library internals"),
    ConfigKey("debug", "nl", "1.4", _IGNORED, "int",
              "tlshd's netlink library debug level; ktlsd has no such log"),
    ConfigKey("debug", "delay_done", "1.4", _IGNORED, "int",
              "tlshd's test knob that delays DONE is not implemented"),
    ConfigKey("authenticate", "keyrings", "1.4", _SUPPORTED, "list"),
    ConfigKey("authenticate.client", "x509.truststore", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.client", "x509.crl", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.client", "x509.certificate", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.client", "x509.private_key", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.client", "x509.pq.certificate", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.client", "x509.pq.private_key", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.server", "x509.truststore", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.server", "x509.crl", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.server", "x509.certificate", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.server", "x509.private_key", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.server", "x509.pq.certificate", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.server", "x509.pq.private_key", "1.4", _SUPPORTED, "path"),
    ConfigKey("authenticate.server", "x509.client_auth", "proposed", _SUPPORTED, "bool"),
    ConfigKey("authenticate.server", "x509.client_allowed_sans", "proposed", _SUPPORTED, "list"),
    # The original tlshd.conf (ktls-utils 0.x) used [main] debug/tlsdebug/nl_debug/keyrings.
    ConfigKey("main", "debug", "0.x", _SUPPORTED, "int"),
    ConfigKey("main", "tlsdebug", "0.x", _IGNORED, "int",
              "tlshd's TLS library debug level; ktlsd never logs TLS library internals"),
    ConfigKey("main", "nl_debug", "0.x", _IGNORED, "int",
              "tlshd's netlink library debug level; ktlsd has no such log"),
    ConfigKey("main", "keyrings", "0.x", _SUPPORTED, "list"),
)
"""Every key of tlshd's groups ktlsd knows; the reader warns about the others."""

# Known keys per group: name -> kind (from TLSHD_KEYS).
_TLSHD_KEYS: dict[str, dict[str, str]] = {}
for _row in TLSHD_KEYS:
    _TLSHD_KEYS.setdefault(_row.group, {})[_row.key] = _row.kind
_TLSHD_KEY_ROWS = {(row.group, row.key): row for row in TLSHD_KEYS}

_KTLSD_KEYS = (
    "service_socket", "service_mode", "service_group", "kernel", "max_concurrent",
    "pending_limit", "default_timeout_ms", "session_lifetime", "log_level", "groups",
    "legacy_psk_sha384",
    "keep_kernel_sessions", "max_kept_sessions", "uid_max_kept_sessions",
    "max_consumer_timeout_ms", "submit_timeout_ms", "service_max_connections",
    "uid_max_connections", "uid_max_pending", "uid_max_in_flight", "max_file_bytes",
    "workers", "record_size_limit", "tags_directory", "pkcs11_module", "key_log_file",
)
_KTLSD_INTEGERS: dict[str, tuple[int, int | None]] = {
    # key: (minimum, maximum or None); the defaults are AgentConfig's (from ktlsd.settings)
    "max_concurrent": (0, 100_000),
    "pending_limit": (0, 100_000),
    "default_timeout_ms": (1, 3_600_000),
    "session_lifetime": (0, None),
    "max_kept_sessions": (1, None),
    "uid_max_kept_sessions": (1, None),
    "max_consumer_timeout_ms": (1, 3_600_000),
    "submit_timeout_ms": (1, 600_000),
    "service_max_connections": (1, 1_000_000),
    "uid_max_connections": (1, None),
    "uid_max_pending": (1, None),
    "uid_max_in_flight": (1, None),
    "max_file_bytes": (4096, 64 << 20),
    "record_size_limit": (MIN_RECORD_SIZE_LIMIT, MAX_RECORD_SIZE_LIMIT),
}
"""The ``[ktlsd]`` keys that are integers, with their ranges: each is an AgentConfig field."""


def config_keys() -> tuple[ConfigKey, ...]:
    """Every key ktlsd reads, one row each: tlshd's (:data:`TLSHD_KEYS`) and ``[ktlsd]``'s
    (docs/configuration.md lists the same rows)."""
    ours = tuple(ConfigKey("ktlsd", key, "-", KeyBehaviour.KTLSD_ONLY) for key in _KTLSD_KEYS)
    return TLSHD_KEYS + ours


_KTLSD_KEYS_RETIRED = {
    "record_layer": "user-space consumers choose their record layer themselves "
                    "(ktlsd.client, record_layer=...); kernel consumers always get kTLS",
}


_GLIB_INTEGER = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)(?:[ \t\n\f\r]|\Z)")
_GINT_MIN, _GINT_MAX = -(1 << 31), (1 << 31) - 1


def glib_integer(raw: str) -> int:
    """An integer value as ``g_key_file_get_integer()`` reads it (GLib 2.74, checked against
    the library itself).

    GLib takes the value as written (no unescaping), converts the leading decimal number with
    ``strtol(value, &end, 10)`` and accepts it when at least one digit was read and the first
    character after the number is the end of the value or ASCII whitespace (space, tab,
    newline, form feed, carriage return); whatever follows that whitespace is ignored. So
    ``2 # two`` and ``2 3`` are 2, while ``2# two``, ``2abc``, ``0x10``, ``2.5`` and ``2\\s``
    are errors; ``010`` is 10. The number must fit a 32-bit ``gint``. Raises ValueError.
    """
    match = _GLIB_INTEGER.match(raw)
    if match is None:
        raise ValueError(f"{raw!r} is not an integer")
    value = int(match.group(1), 10)
    if not _GINT_MIN <= value <= _GINT_MAX:
        raise ValueError(f"{raw!r} is out of range for an integer")
    return value


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not a boolean (true/false, 1/0)")


def _int(text: str, *, minimum: int | None = None, maximum: int | None = None,
         base: int = 10) -> int:
    try:
        value = int(text.strip(), base)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{value} is below the minimum {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{value} is above the maximum {maximum}")
    return value


def _choice(text: str, choices: Sequence[str]) -> str:
    lowered = text.strip().lower()
    if lowered not in choices:
        raise ValueError(f"{text!r} is not one of {', '.join(choices)}")
    return lowered


def _legacy_mode(text: str) -> LegacyPskSha384:
    lowered = _choice(text, LEGACY_PSK_SHA384_MODES)
    for mode in LEGACY_PSK_SHA384_MODES:  # narrow the str to the Literal
        if mode == lowered:
            return mode
    raise AssertionError("unreachable")


class _Reader:
    """Turns a :class:`KeyFile` into typed values, reporting problems with file and line."""

    def __init__(self, keyfile: KeyFile) -> None:
        self.keyfile = keyfile

    def get(self, group: str, key: str) -> KeyValue | None:
        return self.keyfile.groups.get(group, {}).get(key)

    def string(self, group: str, key: str) -> str | None:
        entry = self.get(group, key)
        if entry is None:
            return None
        try:
            return unescape(entry.value)
        except ValueError as exc:
            raise ConfigError(self.keyfile.path, entry.line, f"[{group}] {key}: {exc}") from None

    def path(self, group: str, key: str) -> str | None:
        value = self.string(group, key)
        if not value:
            return None
        entry = self.get(group, key)
        assert entry is not None
        if not os.path.exists(value):
            log.warning("%s:%d: [%s] %s: %s does not exist (yet)",
                        self.keyfile.path, entry.line, group, key, value)
        return value

    def private_key(self, group: str, key: str) -> str | None:
        """A key file (:meth:`path`) or a ``pkcs11:`` URI (RFC 7512; checked here, loaded when a
        handshake needs it: :mod:`ktlsd.hardware_key`)."""
        value = self.string(group, key)
        if not is_pkcs11_uri(value):
            return self.path(group, key)
        assert value is not None
        entry = self.get(group, key)
        assert entry is not None
        try:
            uri = parse_pkcs11_uri(value)
        except ValueError as exc:
            raise ConfigError(self.keyfile.path, entry.line, f"[{group}] {key}: {exc}") from None
        if uri.pin_value is not None and _others_may_read(self.keyfile.path):
            log.warning("%s:%d: [%s] %s: pin-value in a file others can read; use "
                        "pin-source=file:<a file only root reads> instead",
                        self.keyfile.path, entry.line, group, key)
        return value

    def tlshd_int(self, group: str, key: str) -> int | None:
        """tlshd's integers, read as g_key_file_get_integer() reads them; failing counts as 0."""
        entry = self.get(group, key)
        if entry is None:
            return None
        try:
            return glib_integer(entry.value)
        except ValueError as exc:
            log.warning("%s:%d: [%s] %s: %s; using 0 as tlshd does",
                        self.keyfile.path, entry.line, group, key, exc)
            return 0

    def strings(self, group: str, key: str) -> tuple[str, ...] | None:
        entry = self.get(group, key)
        if entry is None:
            return None
        try:
            return tuple(split_list(entry.value))
        except ValueError as exc:
            raise ConfigError(self.keyfile.path, entry.line, f"[{group}] {key}: {exc}") from None

    def typed(self, group: str, key: str, convert: Callable[[str], _T]) -> _T | None:
        """A [ktlsd] value: bad values are errors (this is our section; be strict)."""
        text = self.string(group, key)
        if text is None:
            return None
        try:
            return convert(text)
        except ValueError as exc:
            entry = self.get(group, key)
            assert entry is not None
            raise ConfigError(self.keyfile.path, entry.line, f"[{group}] {key}: {exc}") from None

    def warn_unknown(self) -> None:
        for group, keys in self.keyfile.groups.items():
            line = self.keyfile.group_lines.get(group, 0)
            if group == "ktlsd":
                known: Sequence[str] = _KTLSD_KEYS
            elif group in _TLSHD_KEYS:
                known = tuple(_TLSHD_KEYS[group])
            else:
                log.warning("%s:%d: unknown group [%s] ignored", self.keyfile.path, line, group)
                continue
            for key, entry in keys.items():
                row = _TLSHD_KEY_ROWS.get((group, key))
                if row is not None and row.behaviour is KeyBehaviour.IGNORED:
                    if _matters(row, entry.value):
                        # tlshd's debug levels only change how much is logged: a notice;
                        # anything else an admin expects to take effect: a warning.
                        level = NOTICE if row.kind == "int" else logging.WARNING
                        log.log(level, "%s:%d: [%s] %s ignored: %s", self.keyfile.path,
                                entry.line, group, key, row.why)
                elif group == "ktlsd" and key in _KTLSD_KEYS_RETIRED:
                    log.warning("%s:%d: [%s] %s is no longer read: %s", self.keyfile.path,
                                entry.line, group, key, _KTLSD_KEYS_RETIRED[key])
                elif key not in known:
                    log.warning("%s:%d: unknown key %s in [%s] ignored",
                                self.keyfile.path, entry.line, key, group)


def _matters(row: ConfigKey, raw: str) -> bool:
    """Whether an ignored key's value would make a difference to tlshd: not empty, and for
    its integers not 0 (an unparsable one is 0 to tlshd, and warned about as such)."""
    text = raw.strip()
    if row.kind != "int":
        return bool(text)
    try:
        return glib_integer(text) != 0
    except ValueError:
        return False


def _x509(reader: _Reader, group: str) -> X509Settings:
    client_auth = None
    sans: tuple[str, ...] = ()
    if group == "authenticate.server":
        client_auth = reader.typed(group, "x509.client_auth", _bool)
        sans = reader.strings(group, "x509.client_allowed_sans") or ()
        _check_allowed_sans(reader, group, sans, client_auth)
    certificate = reader.path(group, "x509.certificate")
    private_key = reader.private_key(group, "x509.private_key")
    return X509Settings(
        truststore=reader.path(group, "x509.truststore"),
        crl=reader.path(group, "x509.crl"),
        certificate=certificate,
        private_key=private_key,
        pq_certificate=reader.path(group, "x509.pq.certificate"),
        pq_private_key=reader.path(group, "x509.pq.private_key"),
        client_auth=client_auth,
        client_allowed_sans=sans,
    )


_SAN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._*")


def san_entry_problem(entry: str) -> str | None:
    """Why an ``x509.client_allowed_sans`` entry can never match a client certificate's DNS
    or IP SAN (ktlsd.tls.allowed_sans has the matching rules), or None."""
    try:
        ipaddress.ip_address(entry)
        return None
    except ValueError:
        pass
    if entry.lower().startswith(("dns:", "ip:")):
        return "write the name or address alone, without a DNS:/IP: prefix"
    if "/" in entry:
        return "address ranges are not supported: list each address"
    if not set(entry) <= _SAN_CHARS:
        return "neither a DNS name nor an IP address"
    return None


def _check_allowed_sans(reader: _Reader, group: str, sans: tuple[str, ...],
                        client_auth: bool | None) -> None:
    """Say what a ``x509.client_allowed_sans`` list will do where it may surprise: entries
    that can never match, a list that names nothing, a list without ``x509.client_auth``."""
    entry = reader.get(group, "x509.client_allowed_sans")
    if entry is None:
        return
    where = f"{reader.keyfile.path}:{entry.line}: [{group}] x509.client_allowed_sans"
    if not sans:
        if entry.value.strip():
            log.warning("%s names no SAN: every client certificate the truststore verifies "
                        "is accepted", where)
        return
    for name in sans:
        problem = san_entry_problem(name)
        if problem is not None:
            log.warning("%s: %r can never match a client certificate: %s", where, name, problem)
    if not client_auth:
        # tlshd reads the list only with x509.client_auth = true and would let any client in
        # here; ktlsd does not let an allow list be silently void.
        log.warning("%s is set but x509.client_auth is not true: ktlsd requires a client "
                    "certificate carrying one of these SANs anyway (tlshd would ignore the "
                    "list); set x509.client_auth = true to say so", where)


def config_from_keyfile(keyfile: KeyFile) -> AgentConfig:
    """Build an :class:`AgentConfig` from a parsed key file (pure apart from warnings)."""
    reader = _Reader(keyfile)
    reader.warn_unknown()

    def first(*values: int | None) -> int:
        return next((v for v in values if v is not None), 0)

    keyrings = reader.strings("authenticate", "keyrings")
    if keyrings is None:
        keyrings = reader.strings("main", "keyrings")
    k = "ktlsd"
    socket_path = reader.string(k, "service_socket")
    service_socket: str | None = DEFAULT_SERVICE_PATH
    if socket_path is not None:
        service_socket = None if socket_path.strip().lower() in ("", "none", "off") \
            else socket_path.strip()
    defaults = AgentConfig()

    def pick(value: _T | None, default: _T) -> _T:
        return default if value is None else value

    tags_directory: str | None = reader.typed(k, "tags_directory", _absolute_path)
    config = AgentConfig(
        path=keyfile.path,
        debug_loglevel=first(reader.tlshd_int("debug", "loglevel"),
                             reader.tlshd_int("main", "debug")),
        debug_tls=first(reader.tlshd_int("debug", "tls"), reader.tlshd_int("main", "tlsdebug")),
        debug_nl=first(reader.tlshd_int("debug", "nl"), reader.tlshd_int("main", "nl_debug")),
        delay_done=max(0, first(reader.tlshd_int("debug", "delay_done"))),
        keyrings=keyrings or (),
        client=_x509(reader, "authenticate.client"),
        server=_x509(reader, "authenticate.server"),
        service_socket=service_socket,
        service_mode=pick(
            reader.typed(k, "service_mode", lambda t: _int(t, minimum=0, maximum=0o777, base=8)),
            defaults.service_mode),
        service_group=_group(reader.string(k, "service_group")),
        kernel=pick(reader.typed(k, "kernel", lambda t: _kernel_mode(t)), defaults.kernel),
        keep_kernel_sessions=pick(reader.typed(k, "keep_kernel_sessions", _bool),
                                  defaults.keep_kernel_sessions),
        log_level=reader.typed(k, "log_level", lambda t: _choice(t, LOG_LEVELS)),
        groups=reader.string(k, "groups") or None,
        legacy_psk_sha384=pick(
            reader.typed(k, "legacy_psk_sha384",
                         lambda t: _legacy_mode(t)),
            defaults.legacy_psk_sha384),
        workers=pick(reader.typed(k, "workers", parse_workers), defaults.workers),
        tags_directory=tags_directory or defaults.tags_directory,
        pkcs11_module=reader.typed(k, "pkcs11_module", _absolute_path),
        key_log_file=reader.typed(k, "key_log_file", _absolute_path),
    )
    numbers: dict[str, Any] = {}
    for key, (minimum, maximum) in _KTLSD_INTEGERS.items():
        value = reader.typed(k, key, functools.partial(_int, minimum=minimum, maximum=maximum))
        if value is not None:
            numbers[key] = value
    config = replace(config, **numbers)
    _check_pairs(keyfile, config)
    return config


def _absolute_path(text: str) -> str | None:
    """An optional absolute path (``pkcs11_module``: empty is the library's default;
    ``key_log_file``: empty is off; ``tags_directory``: empty is tlshd's directory)."""
    value = text.strip()
    if not value:
        return None
    if not os.path.isabs(value):
        raise ValueError(f"{value!r} is not an absolute path")
    return value


def _others_may_read(path: str) -> bool:
    try:
        return bool(os.stat(path).st_mode & 0o004)
    except OSError:
        return False


def _group(text: str | None) -> str | int | None:
    """A group name, or a numeric gid."""
    if text is None or not text.strip():
        return None
    return int(text) if text.strip().isdigit() else text.strip()


def _kernel_mode(text: str) -> str:
    lowered = text.strip().lower()
    if lowered == "auto":
        return "auto"
    try:
        return "yes" if _bool(lowered) else "no"
    except ValueError:
        raise ValueError(f"{text!r} is not one of auto, yes, no") from None


def _check_pairs(keyfile: KeyFile, config: AgentConfig) -> None:
    """A certificate without its private key (or the reverse) cannot work: say so now."""
    for group, x509 in (("authenticate.client", config.client),
                        ("authenticate.server", config.server)):
        for cert, key, cert_name, key_name in (
            (x509.certificate, x509.private_key, "x509.certificate", "x509.private_key"),
            (x509.pq_certificate, x509.pq_private_key, "x509.pq.certificate",
             "x509.pq.private_key"),
        ):
            if bool(cert) != bool(key):
                present = cert_name if cert else key_name
                missing = key_name if cert else cert_name
                entry = keyfile.groups[group][present]
                raise ConfigError(keyfile.path, entry.line,
                                  f"[{group}] {present} is set but {missing} is not")


# --- loading -----------------------------------------------------------------------------------


def find_config(path: str | None = None,
                search: Sequence[str] | None = None) -> str | None:
    """The file to read: ``path``, else ``$KTLSD_CONFIG``, else the first of ``search``
    (default :data:`SEARCH_PATHS`) that exists, else None (no file: built-in defaults).

    Reading the legacy file is logged at notice level (where it should live depends on the
    tlshd version still installed: 1.0 reads only the legacy name).
    """
    if path:
        return path
    from_env = os.environ.get(ENV_CONFIG)
    if from_env:
        return from_env
    for candidate in SEARCH_PATHS if search is None else search:
        if os.path.exists(candidate):
            if candidate == LEGACY_CONFIG_PATH:
                # Not "please move it": Debian 13's tlshd 1.0 reads only the legacy name, so
                # moving it would break tlshd on a host that still has it.
                log.log(NOTICE, "reading the legacy %s (newer tlshd releases read %s; move it "
                        "there once no tlshd 1.0 on this host needs the old name)",
                        LEGACY_CONFIG_PATH, CONFIG_PATH)
            return candidate
    return None


def load_config(path: str | None = None, *,
                search: Sequence[str] | None = None) -> AgentConfig:
    """Read the configuration (see :func:`find_config` for which file).

    An explicitly named file (argument or ``$KTLSD_CONFIG``) must exist; when no file is
    found by the search, the built-in defaults apply. Raises :class:`ConfigError`.
    """
    chosen = find_config(path, search)
    if chosen is None:
        log.debug("no configuration file found; using built-in defaults")
        return AgentConfig()
    try:
        with open(chosen, "rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(chosen, None, f"cannot read: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(chosen, None, f"larger than {MAX_CONFIG_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(chosen, line, "not valid UTF-8") from None
    return config_from_keyfile(parse_key_file(text, chosen))
