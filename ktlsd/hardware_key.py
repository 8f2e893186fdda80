"""Private keys that never leave a PKCS#11 token: ``x509.private_key = pkcs11:...``.

:func:`token_key` turns a configured ``pkcs11:`` URI (:mod:`ktlsd.pkcs11_uri`) into a
:class:`~ktlsd.tls._openssl.TokenKey` -- an OpenSSL key whose signatures the token makes --
through the PKCS#11 support of the system OpenSSL (:func:`ktlsd.tls._openssl.load_token_key`:
the ``pkcs11`` provider where OpenSSL >= 3.2 has it, else libp11's ``pkcs11`` ENGINE).

Who may use it. Only the agent's own configuration and an operator's command line
(``ktlsd connect/listen --key``): :mod:`ktlsd.material` refuses a ``pkcs11:`` key from any
service consumer (EINVAL), so no local user can make the root agent load a module or sign
with the administrator's token keys.

The module is the administrator's ``[ktlsd] pkcs11_module`` (``--pkcs11-module``), else the
library's default (p11-kit's proxy, which loads the modules registered under
``/usr/share/p11-kit/modules``); one per process, loaded at the first token key.

The PIN: ``pin-value`` in the URI, or ``pin-source`` naming a file (read by
:func:`ktlsd.files.read_file` with the agent's rights, a regular file of at most
:data:`MAX_PIN_FILE_BYTES`, which others may not read; one trailing newline dropped). No PIN:
no login (a token whose keys need none). Nothing ever prompts.

Caching. A loaded key is kept per configuration (the :class:`~ktlsd.settings.X509Files`
object the agent holds until a reload replaces it) and URI: the token is logged in to once,
not per handshake, and a SIGHUP reload loads the key again (and re-reads the PIN file). A PIN
the token refused is remembered the same way, so a wrong PIN costs one failed login per
configuration, never one per handshake (tokens lock after a few). Other failures (no such
object, token absent) are not remembered: the next handshake tries again.

Errors. Every failure is ``HandshakeError(MISSING_MATERIAL)`` (ENOKEY), like an unreadable key
file: for the consumer the handshake cannot start because our private key is unusable. The
one-line reason says which: ``the token refused the PIN``, ``no such private key``,
``cannot load PKCS#11 module``, ``no PKCS#11 support in this OpenSSL``. PINs never appear.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import weakref
from dataclasses import dataclass

from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.files import AGENT, DEFAULT_READ_TIMEOUT, read_file
from ktlsd.pkcs11_uri import Pkcs11Uri, is_pkcs11_uri, parse_pkcs11_uri, redact
from ktlsd.settings import X509Files
from ktlsd.tls import _openssl as ossl

__all__ = [
    "MAX_PIN_FILE_BYTES",
    "check_token_key",
    "configured_key_problems",
    "is_pkcs11_uri",
    "token_key",
]

MAX_PIN_FILE_BYTES = 256
log = logging.getLogger("ktlsd.hardware_key")


def _missing(uri: object, reason: str) -> HandshakeError:
    return HandshakeError(FailureCause.MISSING_MATERIAL, f"pkcs11 key {uri}: {reason}")


def parse(text: str) -> Pkcs11Uri:
    """The URI, or ``HandshakeError(MISSING_MATERIAL)`` naming what is wrong with it."""
    try:
        return parse_pkcs11_uri(text)
    except ValueError as exc:
        raise _missing(redact(text), str(exc)) from None


def read_pin(uri: Pkcs11Uri, *, timeout: float = DEFAULT_READ_TIMEOUT) -> bytes | None:
    """The PIN the URI gives (``pin-value``, or the ``pin-source`` file's first line)."""
    if uri.pin_value is not None:
        return uri.pin_value.encode()
    path = uri.pin_file()
    if path is None:
        return None
    data = read_file(path, "PIN file", AGENT, max_bytes=MAX_PIN_FILE_BYTES, timeout=timeout)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise _missing(uri, f"PIN file {path}: {exc.strerror}") from None
    if mode & (stat.S_IROTH | stat.S_IWOTH):
        raise _missing(uri, f"PIN file {path} is readable or writable by others "
                            f"(mode {stat.S_IMODE(mode):04o}): chmod o-rw {path}")
    pin = data.split(b"\n", 1)[0].removesuffix(b"\r")
    if not pin:
        raise _missing(uri, f"PIN file {path} is empty")
    return pin


def _check_module(module: str | None) -> None:
    """A configured module must be an existing regular file (the loader would otherwise just
    print dlopen's complaint on stderr)."""
    if module is None:
        return
    try:
        mode = os.stat(module).st_mode
    except OSError as exc:
        raise HandshakeError(FailureCause.MISSING_MATERIAL,
                             f"cannot load PKCS#11 module {module}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise HandshakeError(FailureCause.MISSING_MATERIAL,
                             f"cannot load PKCS#11 module {module}: not a regular file")


def _load(uri: Pkcs11Uri, module: str | None, timeout: float) -> ossl.TokenKey:
    _check_module(module)
    pin = read_pin(uri, timeout=timeout)
    try:
        return ossl.load_token_key(uri.for_openssl(), pin, module)
    except ossl.TokenKeyError as exc:
        detail = "; ".join(dict.fromkeys(exc.reasons))
        if exc.kind == "pin":
            reason = f"the token refused the PIN ({detail})"
        elif exc.kind == "not_found":
            reason = "no such private key"
            if detail and detail != reason:
                reason += f" ({detail})"
            if pin is None:
                reason += " (no PIN given: a private key may need pin-source or pin-value)"
        elif exc.kind in ("module", "unsupported"):
            reason = str(exc)
        else:
            reason = f"cannot load ({detail})"
        raise _missing(uri, reason) from None


@dataclass(frozen=True)
class _RefusedPin:
    """A login the token refused, remembered so the PIN is not tried again (see above)."""

    error: HandshakeError


_Entry = ossl.TokenKey | _RefusedPin
_lock = threading.Lock()  # guards _cache and _loading; never held across token I/O
# (id(owner), uri digest, module) -> the lock of the one load of that key in progress
_loading: dict[tuple[int, str, str | None], threading.Lock] = {}
# id(owner) -> (weak reference to the owner, {(uri, module): key or refusal})
_cache: dict[int, tuple[weakref.ref[object], dict[tuple[str, str | None], _Entry]]] = {}


def _entries_of(owner: object) -> dict[tuple[str, str | None], _Entry]:
    """The cache of one configuration object (caller holds the lock); it goes with it."""
    key = id(owner)
    held = _cache.get(key)
    if held is not None and held[0]() is owner:
        return held[1]
    entries: dict[tuple[str, str | None], _Entry] = {}

    def forget(_ref: weakref.ref[object], key: int = key) -> None:
        # Runs wherever the old configuration is freed, the event loop included: it takes no
        # lock (another thread may hold one across token I/O) and only drops the entry if it
        # is still this owner's (dict operations are atomic).
        current = _cache.get(key)
        if current is not None and current[0] is _ref:
            _cache.pop(key, None)

    _cache[key] = (weakref.ref(owner, forget), entries)
    return entries


def token_key(
    text: str,
    module: str | None,
    owner: object | None = None,
    *,
    timeout: float = DEFAULT_READ_TIMEOUT,
) -> ossl.TokenKey:
    """The token key ``text`` (a ``pkcs11:`` URI) names, loaded through ``module``.

    ``owner`` is the configuration object the key belongs to (the agent's ``X509Files``):
    the key is kept as long as it lives, so a reload (a new object) loads it afresh. None:
    no caching (a tool that loads once). Blocks (token I/O): never on the event loop.
    Raises ``HandshakeError(MISSING_MATERIAL)`` with a one-line, PIN-free reason.
    """
    uri = parse(text)
    if owner is None:
        return _load(uri, module, timeout)
    # The URI as configured, PIN included, is the key (two PINs are two logins); only a
    # digest of it is kept, so the cache holds no PIN.
    cache_key = (hashlib.sha256(text.encode()).hexdigest(), module)
    with _lock:  # never held across token I/O
        entries = _entries_of(owner)
        found = entries.get(cache_key)
        if found is None:
            loading = _loading.setdefault((id(owner), *cache_key), threading.Lock())
    if found is None:
        # One login per key at a time: concurrent first handshakes wait for it (in their
        # worker threads), then share the key.
        with loading:
            with _lock:
                found = entries.get(cache_key)
            if found is None:
                try:
                    key = _load(uri, module, timeout)
                except HandshakeError as exc:
                    if "refused the PIN" in exc.reason:
                        with _lock:
                            entries[cache_key] = _RefusedPin(exc)
                    raise
                finally:
                    with _lock:
                        if _loading.get((id(owner), *cache_key)) is loading:
                            del _loading[(id(owner), *cache_key)]
                with _lock:
                    entries[cache_key] = key
                log.info("pkcs11 key %s loaded through the pkcs11 %s (module %s)", uri,
                         key.backend, module or "p11-kit proxy")
                return key
    if isinstance(found, _RefusedPin):
        raise found.error
    return found


def check_token_key(text: str, module: str | None) -> str | None:
    """For ``ktlsd run --check`` and ``ktlsd doctor``: None when the key loads, else the
    one-line reason (a check logs in to the token once; it never caches)."""
    try:
        token_key(text, module)
    except HandshakeError as exc:
        return exc.reason
    return None


def configured_key_problems(client: X509Files, server: X509Files) -> list[str]:
    """One line per configured ``pkcs11:`` key that cannot be loaded now (``ktlsd run
    --check``, ``ktlsd doctor``); file keys are not looked at here."""
    problems: list[str] = []
    for group, files in (("authenticate.client", client), ("authenticate.server", server)):
        if is_pkcs11_uri(files.private_key):
            assert files.private_key is not None
            reason = check_token_key(files.private_key, files.pkcs11_module)
            if reason is not None:
                problems.append(f"[{group}] x509.private_key: {reason}")
    return problems
