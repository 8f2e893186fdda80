"""The system crypto policy: which TLS 1.3 cipher suites and key-exchange groups ktlsd may use.

tlshd starts from GnuTLS's system priority; ktlsd starts from the system OpenSSL configuration
the same way. Each list is an intersection, narrowed step by step:

1. **The system policy**: what the library's default ``SSL_CTX`` ends up with after OpenSSL has
   loaded its configuration file (``$OPENSSL_CONF``, else ``OPENSSLDIR/openssl.cnf``) and
   applied its ``system_default`` section (``Ciphersuites``, ``Groups``/``Curves``). ktlsd
   asks the library, it does not parse the file: the suites come from ``SSL_CTX_get_ciphers``
   on a fresh context; the groups from the ``supported_groups`` extension of a ClientHello
   that context writes into a memory BIO (OpenSSL 3.0 has no getter for a context's own
   group list -- ``SSL_get1_groups`` returns the *peer's* list -- and 3.5's
   ``SSL_CTX_get0_implemented_groups`` lists what is implemented, not what is configured;
   the ClientHello is what the library really offers, in its order, on either version).
   The configuration file is read too, with the library's own parser (``NCONF_load``), but
   only to *show* what the ``system_default`` section says (``ktlsd doctor``).
2. **What kTLS can carry**: AES-128-GCM, AES-256-GCM, ChaCha20-Poly1305
   (:class:`~ktlsd.tls.session.CipherSuite`). Groups do not matter to kTLS.
3. **ktlsd's configuration**: a request's or a command line's suite list (a service
   consumer's ``ciphersuites``, ``connect/listen --ciphers``) and ``[ktlsd] groups`` /
   ``--groups`` may narrow further, never widen: what the system policy forbids is dropped.

The suites are offered in ktlsd's order (AES-128-GCM first, the cheapest for kTLS) unless the
configuration lists its own order. Groups left at the system policy are not touched at all
(the context keeps the library's default list, ML-KEM hybrids included where the library has
them); a configured list is passed on as written when the system allows all of it, else as
the allowed groups only. An empty intersection is a :class:`CryptoPolicyError` with a
one-line reason: a configuration error at ``ktlsd run`` start and ``--check``, never a silent
fallback.

The library reads its configuration once per process, so the system policy is read once per
process too (:func:`system_suites`, :func:`system_groups` are cached).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from ktlsd.tls import _openssl as ossl
from ktlsd.tls.client_hello import ClientHelloLists, parse_client_hello
from ktlsd.tls.session import CipherSuite

__all__ = [
    "KTLS_SUITES",
    "ClientHelloLists",
    "CryptoPolicyError",
    "GroupChoice",
    "SuiteChoice",
    "SystemPolicy",
    "choose_groups",
    "choose_suites",
    "effective_groups",
    "effective_suites",
    "parse_client_hello",
    "read_system_policy",
    "system_groups",
    "system_suites",
]

KTLS_SUITES: tuple[CipherSuite, ...] = tuple(CipherSuite)
"""The TLS 1.3 suites kTLS can carry, in ktlsd's order of preference."""

_TLS13_SUITE_NAMES = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0x1304: "TLS_AES_128_CCM_SHA256",
    0x1305: "TLS_AES_128_CCM_8_SHA256",
}
_SUITES_BY_CODE = {suite.code: suite for suite in CipherSuite}


class CryptoPolicyError(ValueError):
    """Nothing is left of a suite or group list after the system policy; ``str()`` says why
    in one line."""


# --- what the library ends up with -----------------------------------------------------------


@functools.cache
def system_suites() -> tuple[int, ...]:
    """The TLS 1.3 suites (IANA codes) of a default ``SSL_CTX``, in the library's order."""
    ctx = ossl.SslContext(server=False)
    try:
        return tuple(c for c in ctx.cipher_codes() if c >> 8 == 0x13)
    finally:
        ctx.free()


def _probe(groups: str | None) -> tuple[ClientHelloLists, dict[int, str]]:
    """Let the library write a ClientHello with its default context (``groups`` set on it
    when given); return its lists and the library's names of its groups."""
    ctx = ossl.SslContext(server=False)
    conn: ossl.SslConnection | None = None
    try:
        if groups is not None:
            ctx.set_groups(groups)
        conn = ossl.SslConnection(ctx, ossl.ConnectionHooks(), server=False)
        step, hello, _unread = conn.step(None)
        if step == ossl.HandshakeStep.FAILED or not hello:
            raise ossl.OpenSSLError("cannot write a ClientHello",
                                    [e.reason for e in conn.errors])
        lists = parse_client_hello(hello)
        names = {code: conn.group_name_for_code(code) or f"0x{code:04x}"
                 for code in lists.groups}
        return lists, names
    finally:
        if conn is not None:
            conn.free()
        ctx.free()


@functools.cache
def system_groups() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The groups a default context offers (names, in order) and those it sends key shares
    for."""
    try:
        lists, names = _probe(None)
    except (ossl.OpenSSLError, ValueError):
        return (), ()  # the library offers no TLS 1.3 group at all: nothing is usable
    return (tuple(names[c] for c in lists.groups),
            tuple(names.get(c, f"0x{c:04x}") for c in lists.key_shares))


@functools.lru_cache(maxsize=16)
def _configured_groups(groups: str) -> tuple[tuple[int, ...], dict[int, str]]:
    try:
        lists, names = _probe(groups)
    except ossl.OpenSSLError as exc:
        reason = "; ".join(exc.reasons) or "no group usable with TLS 1.3"
        raise CryptoPolicyError(f"groups {groups}: OpenSSL refuses them: {reason}") from None
    return lists.groups, names


@functools.cache
def _system_group_codes() -> tuple[int, ...]:
    try:
        return _probe(None)[0].groups
    except (ossl.OpenSSLError, ValueError):
        return ()


# --- the configuration file, shown by doctor --------------------------------------------------


@dataclass(frozen=True)
class SystemPolicy:
    """What the OpenSSL configuration says and what the library makes of it.

    ``config_file`` is the file the library reads; ``config_error`` why it could not be read
    (then the library's built-in defaults apply); ``section`` the ``system_default`` section's
    name (None: the file has none); ``configured_suites``/``configured_groups`` its
    ``Ciphersuites`` and ``Groups`` (or ``Curves``) values as written. ``suites``, ``groups``
    and ``key_shares`` are what a default context really has (see the module docstring).
    """

    config_file: str | None
    config_error: str | None
    section: str | None
    configured_suites: str | None
    configured_groups: str | None
    suites: tuple[int, ...]
    groups: tuple[str, ...]
    key_shares: tuple[str, ...]

    @property
    def suite_names(self) -> tuple[str, ...]:
        return tuple(_TLS13_SUITE_NAMES.get(c, f"0x{c:04x}") for c in self.suites)


def _lookup(pairs: list[tuple[str, str]] | None, key: str) -> str | None:
    """The last value of ``key`` (ignoring case, as the library's SSL_CONF commands do)."""
    found = None
    for name, value in pairs or ():
        if name.lower() == key.lower():
            found = value
    return found


def _system_default_section(
    path: str,
) -> tuple[str | None, str | None, str | None, str | None]:
    """(error, section, Ciphersuites, Groups) of the ``system_default`` section that
    ``openssl_conf`` -> ``ssl_conf`` -> ``system_default`` lead to in ``path``."""
    try:
        conf = ossl.ConfigFile(path)
    except ossl.OpenSSLError as exc:
        return str(exc), None, None, None
    with conf:
        init = _exact(conf.section("default"), "openssl_conf")
        ssl = _exact(conf.section(init), "ssl_conf") if init else None
        name = _exact(conf.section(ssl), "system_default") if ssl else None
        if name is None:
            return None, None, None, None
        pairs = conf.section(name)
        groups = _lookup(pairs, "Groups") or _lookup(pairs, "Curves")
        return None, name, _lookup(pairs, "Ciphersuites"), groups


def _exact(pairs: list[tuple[str, str]] | None, key: str) -> str | None:
    found = None
    for name, value in pairs or ():
        if name == key:
            found = value
    return found


def read_system_policy() -> SystemPolicy:
    """The system policy with what the configuration file says about it (for doctor)."""
    path = ossl.default_config_file()
    error = section = suites_text = groups_text = None
    if path is not None:
        error, section, suites_text, groups_text = _system_default_section(path)
    groups, shares = system_groups()
    return SystemPolicy(
        config_file=path, config_error=error, section=section,
        configured_suites=suites_text, configured_groups=groups_text,
        suites=system_suites(), groups=groups, key_shares=shares,
    )


# --- the intersections ------------------------------------------------------------------------


@dataclass(frozen=True)
class SuiteChoice:
    """How the effective suite list came about: the system's TLS 1.3 suites (codes), those
    kTLS can carry, the configuration's list (None: not narrowed) and the result."""

    system: tuple[int, ...]
    carried: tuple[CipherSuite, ...]
    requested: tuple[CipherSuite, ...] | None
    effective: tuple[CipherSuite, ...]

    @property
    def refused(self) -> tuple[CipherSuite, ...]:
        """Suites the configuration asked for that the system policy does not allow."""
        return tuple(s for s in self.requested or () if s not in self.carried)


def choose_suites(
    requested: Sequence[CipherSuite] | None = None, system: Sequence[int] | None = None
) -> SuiteChoice:
    """The suites to use: the system's (``system``, default :func:`system_suites`) that kTLS
    can carry, narrowed to ``requested`` (in its order) when given. Never raises."""
    codes = tuple(system_suites() if system is None else system)
    carried = tuple(s for s in KTLS_SUITES if s.code in codes)
    if requested is None:
        return SuiteChoice(codes, carried, None, carried)
    wanted = tuple(dict.fromkeys(requested))
    return SuiteChoice(codes, carried, wanted, tuple(s for s in wanted if s in carried))


def _names(suites: Sequence[CipherSuite]) -> str:
    return ":".join(s.iana_name for s in suites) or "none"


def effective_suites(
    requested: Sequence[CipherSuite] | None = None, system: Sequence[int] | None = None
) -> tuple[CipherSuite, ...]:
    """:func:`choose_suites`' result; :class:`CryptoPolicyError` when it is empty."""
    choice = choose_suites(requested, system)
    if choice.effective:
        return choice.effective
    allowed = ":".join(_TLS13_SUITE_NAMES.get(c, f"0x{c:04x}") for c in choice.system) or "none"
    if choice.requested is not None and choice.carried:
        raise CryptoPolicyError(
            f"no usable TLS 1.3 cipher suite: {_names(choice.requested)} requested, the "
            f"system crypto policy allows {_names(choice.carried)} (OpenSSL configuration)"
        )
    raise CryptoPolicyError(
        f"no usable TLS 1.3 cipher suite: the system crypto policy (OpenSSL configuration) "
        f"allows {allowed}, kTLS carries {_names(KTLS_SUITES)}"
    )


def default_suites() -> tuple[CipherSuite, ...]:
    """The suites a :class:`~ktlsd.tls.handshake.TlsConfig` gets when none are given."""
    return effective_suites()


@dataclass(frozen=True)
class GroupChoice:
    """How the groups came about: the system's (names), the configured list as written
    (None: not narrowed), the configured groups the system allows and refuses (names), and
    the list to hand to OpenSSL (None: leave the library's default)."""

    system: tuple[str, ...]
    configured: str | None
    allowed: tuple[str, ...]
    refused: tuple[str, ...]
    setting: str | None

    @property
    def effective(self) -> tuple[str, ...]:
        return self.allowed if self.configured is not None else self.system


def choose_groups(configured: str | None) -> GroupChoice:
    """The groups for a configured list (``[ktlsd] groups``, ``--groups``; None or empty:
    the system's). Raises :class:`CryptoPolicyError` when OpenSSL rejects the list or the
    system policy allows none of it."""
    system_names, _shares = system_groups()
    if not configured:
        return GroupChoice(system_names, None, system_names, (), None)
    codes, names = _configured_groups(configured)
    system = set(_system_group_codes())
    allowed = tuple(c for c in codes if c in system)
    refused = tuple(names[c] for c in codes if c not in system)
    if not allowed:
        raise CryptoPolicyError(
            f"no usable key-exchange group: {configured} configured, the system crypto policy "
            f"(OpenSSL configuration) allows {':'.join(system_names) or 'none'}"
        )
    setting = configured if not refused else ":".join(names[c] for c in allowed)
    return GroupChoice(system_names, configured, tuple(names[c] for c in allowed), refused,
                       setting)


def effective_groups(configured: str | None) -> str | None:
    """The groups list to hand to OpenSSL for ``configured`` (see :func:`choose_groups`);
    None (the library's default, which is the system's) when nothing is configured."""
    if not configured:
        return None
    return choose_groups(configured).setting

