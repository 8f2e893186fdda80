"""The consumer API of the user-space handshake service.

A program with a connected TCP socket asks the ktlsd agent for a TLS 1.3 handshake and gets
back a connection ready for application data::

    conn = await ktlsd.client.handshake(sock, role="client", auth="x509",
                                        peername="storage.example", truststore="/etc/ca.pem")
    await conn.asend(b"hello")

This is the user-space twin of what the kernel's ``tls_client_hello_x509()`` and friends do:
the socket is lent to the agent (passed over the service socket; :mod:`ktlsd.upcall.wire`
specifies the protocol), the agent runs the handshake on it, and the answer comes back as a
:class:`~ktlsd.request.HandshakeDone` with the status the kernel would report (``EAGAIN``,
``EBUSY``, ``ESRCH``, ``EACCES``, ``EKEYREJECTED``, ``ETIMEDOUT``, ``EIO``, ``ENOKEY``, ...).
On success the DONE carries the :class:`~ktlsd.tls.session.Session`, from which
:func:`handshake` builds the record layer (kTLS where it works, else the user-space one).
The session also carries the peer's RFC 8449 record size limit
(``session.peer_record_size_limit``, None when it sent none) and ours when negotiated
(``session.record_size_limit``): the record layer :func:`handshake` builds honours both (kTLS
gets ``TLS_TX_MAX_PAYLOAD_LEN``); a program that installs the secrets itself must cap its
records at ``session.max_send_fragment`` bytes (:func:`ktlsd.tls.ktls.apply_record_size_limit`).

While a request is outstanding the caller must not touch the socket. Cancelling the
awaiting task closes the service connection, which cancels the request (the agent stops
using the socket); a socket whose handshake was cancelled midway is of no further use.

:func:`submit` is the lower level: it returns the DONE (whatever its status) and never
raises for a refused or failed handshake. A missing or refusing service socket is answered
like the kernel answers when no agent listens: ``ESRCH``.

What to ask for is one :class:`HandshakeOptions` value. :func:`build_request`,
:func:`submit` and :func:`handshake` take it as ``options`` (positional after the socket, or
by keyword), or its fields as keywords (``role=..., auth=..., peername=...``), or both:
keywords then override the value's fields. This module imports the protocol
(:mod:`ktlsd.upcall.wire`), never the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, TypedDict, Unpack

from ktlsd.request import (
    AuthMode,
    HandshakeDone,
    HandshakeRequest,
    InlineMaterial,
    InlinePsk,
    KeyUpdateType,
    MessageType,
)
from ktlsd.settings import DEFAULT_SERVICE_PATH, DEFAULT_TIMEOUT_MS
from ktlsd.tls.session import Role
from ktlsd.upcall.wire import (
    ServiceFormatError,
    connect_service,
    decode_done_message,
    encode_submit,
    recv_message,
    send_message,
)

if TYPE_CHECKING:
    from ktlsd.tls.connection import TlsConnection

ANSWER_GRACE_SECONDS = 5.0
"""How much longer than the handshake timeout the consumer waits for DONE (queueing,
agent start-up, log writes) before giving up with ETIMEDOUT."""

RoleName = Literal["client", "server"]
AuthName = Literal["psk", "x509", "unauth"]
PskSpec = tuple[bytes | str, bytes] | tuple[bytes | str, bytes, str]
"""(identity, key) or (identity, key, hash); hash is "sha256" (default) or "sha384"."""
PathLike = str | os.PathLike[str]


class HandshakeFailed(OSError):
    """The handshake did not succeed; ``errno`` is the DONE status, ``reason`` its explanation.

    ``errno_name`` spells the status (``"EAGAIN"``, ``"ESRCH"``, ...). It is an
    :class:`OSError`, so ``except OSError`` and ``exc.errno == errno.EBUSY`` both work.
    """

    def __init__(self, status: int, reason: str = "") -> None:
        self.reason = " ".join(reason.split()) or os.strerror(status)
        super().__init__(status, self.reason)

    @property
    def status(self) -> int:
        return int(self.errno or 0)

    @property
    def errno_name(self) -> str:
        return errno.errorcode.get(self.status, str(self.status))

    def __str__(self) -> str:
        return f"handshake failed: {self.errno_name}: {self.reason}"


def default_service_path() -> str:
    """``$KTLSD_SERVICE_PATH`` if set, else :data:`~ktlsd.settings.DEFAULT_SERVICE_PATH`."""
    return os.environ.get("KTLSD_SERVICE_PATH") or DEFAULT_SERVICE_PATH


def _role(role: RoleName | Role) -> Role:
    try:
        return role if isinstance(role, Role) else Role(role)
    except ValueError:
        raise ValueError(f"role must be 'client' or 'server', not {role!r}") from None


def _auth(auth: AuthName | AuthMode) -> AuthMode:
    if isinstance(auth, AuthMode):
        mode = auth
    else:
        try:
            mode = AuthMode[str(auth).upper()]
        except KeyError:
            raise ValueError(f"auth must be 'psk', 'x509' or 'unauth', not {auth!r}") from None
    if mode is AuthMode.UNSPEC:
        raise ValueError("auth must be 'psk', 'x509' or 'unauth'")
    return mode


def _psk(spec: PskSpec) -> InlinePsk:
    if len(spec) == 2:
        identity, key = spec
        hash_name = "sha256"
    elif len(spec) == 3:
        identity, key, hash_name = spec
    else:
        raise ValueError("a PSK is (identity, key) or (identity, key, hash)")
    raw_identity = identity.encode() if isinstance(identity, str) else bytes(identity)
    if not raw_identity or not key:
        raise ValueError("a PSK needs a non-empty identity and key")
    if hash_name not in ("sha256", "sha384"):
        raise ValueError(f"PSK hash must be sha256 or sha384, not {hash_name!r}")
    return InlinePsk(identity=raw_identity, key=bytes(key), hash_name=hash_name)


def _path(value: PathLike | None) -> str | None:
    # The agent runs elsewhere (another cwd): relative names would resolve against its cwd.
    # A pkcs11: URI goes as it is, for the agent to refuse it with a clear reason.
    if isinstance(value, str) and value[:7].lower() == "pkcs11:":
        return value
    return os.path.abspath(os.fspath(value)) if value is not None else None


@dataclass(frozen=True, kw_only=True, eq=False)
class HandshakeOptions:
    """What a consumer asks the agent for: one handshake's parameters.

    ``certificate``/``private_key``/``truststore``/``crl`` are PEM files the agent reads
    (made absolute against the current directory when the request is built);
    ``certificate_chain``/``private_key_der`` pass DER directly; the ``*_serial`` arguments
    and ``psk_serials`` name keys in a keyring the agent can read; ``keyring`` is a keyring
    for the agent to link. ``timeout`` is in seconds (None: the agent's default, 10 s; the
    agent caps it, by default at 30 s). ``psk`` is a list of ``(identity, key)`` or
    ``(identity, key, "sha256"/"sha384")``. ``keep_session`` asks the agent to keep the
    session's state for later :func:`key_update` requests (DONE's ``session_id``); without it
    nothing is kept and ``session_id`` is 0.

    Values are checked when the request is built (:meth:`to_request`), with a
    :class:`ValueError` that never quotes a key. The keys (``psk``, ``private_key_der``) are
    left out of ``repr()``; options do not compare equal by value (no secret comparisons).
    """

    role: RoleName | Role
    auth: AuthName | AuthMode
    psk: Sequence[PskSpec] | None = field(default=None, repr=False)
    psk_serials: Sequence[int] = ()
    peername: str | None = None
    certificate: PathLike | None = None
    private_key: PathLike | None = None
    certificate_chain: Sequence[bytes] = ()
    private_key_der: bytes = field(default=b"", repr=False)
    certificate_serial: int = 0
    private_key_serial: int = 0
    truststore: PathLike | None = None
    crl: PathLike | None = None
    ciphersuites: Sequence[str] = ()
    require_client_cert: bool = False
    keyring: int = 0
    timeout: float | None = None
    keep_session: bool = False

    def to_request(self) -> HandshakeRequest:
        """The :class:`HandshakeRequest` that :func:`submit` sends (``sockfd`` still -1)."""
        mode = _auth(self.auth)
        which = _role(self.role)
        timeout = self.timeout
        if timeout is not None and not 0 < timeout <= 0xFFFFFFFF / 1000:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        inline = InlineMaterial(
            psk_keys=tuple(_psk(p) for p in (self.psk or ())),
            certificate_chain=tuple(bytes(c) for c in self.certificate_chain),
            private_key=bytes(self.private_key_der),
            certificate_file=_path(self.certificate),
            private_key_file=_path(self.private_key),
            truststore=_path(self.truststore),
            crl=_path(self.crl),
            ciphersuites=tuple(self.ciphersuites),
            require_client_cert=self.require_client_cert,
        )
        return HandshakeRequest(
            sockfd=-1,
            message_type=(MessageType.CLIENTHELLO if which is Role.CLIENT
                          else MessageType.SERVERHELLO),
            auth_mode=mode,
            timeout_ms=round(timeout * 1000) if timeout is not None else 0,
            peer_identities=tuple(self.psk_serials),
            certificate=self.certificate_serial,
            private_key=self.private_key_serial,
            peername=self.peername,
            keyring=self.keyring,
            inline=inline if inline != InlineMaterial() else None,
            keep_session=self.keep_session,
        )


class HandshakeFields(TypedDict, total=False):
    """:class:`HandshakeOptions`' fields as keyword arguments (the type of ``**fields``).

    mypy checks that every key here is a field of :class:`HandshakeOptions` with the same
    type (it checks ``HandshakeOptions(**fields)``); role and auth are required unless an
    options value is given, which is checked at run time.
    """

    role: RoleName | Role
    auth: AuthName | AuthMode
    psk: Sequence[PskSpec] | None
    psk_serials: Sequence[int]
    peername: str | None
    certificate: PathLike | None
    private_key: PathLike | None
    certificate_chain: Sequence[bytes]
    private_key_der: bytes
    certificate_serial: int
    private_key_serial: int
    truststore: PathLike | None
    crl: PathLike | None
    ciphersuites: Sequence[str]
    require_client_cert: bool
    keyring: int
    timeout: float | None
    keep_session: bool


def _merge(options: HandshakeOptions | None, fields: HandshakeFields) -> HandshakeOptions:
    """``options`` with ``fields`` replaced, or new options from ``fields`` (which must then
    name role and auth: :class:`TypeError` otherwise)."""
    if options is None:
        missing = [name for name in ("role", "auth") if name not in fields]
        if missing:
            raise TypeError(f"handshake options need {' and '.join(missing)} "
                            "(or a HandshakeOptions value)")
        return HandshakeOptions(**fields)
    return replace(options, **fields) if fields else options


def build_request(
    options: HandshakeOptions | None = None, **fields: Unpack[HandshakeFields]
) -> HandshakeRequest:
    """The :class:`HandshakeRequest` that :func:`submit` sends (``sockfd`` still -1), from
    ``options`` and/or its fields as keywords (which override ``options``' fields)."""
    return _merge(options, fields).to_request()


async def submit_request(
    sock: socket.socket | int,
    request: HandshakeRequest,
    *,
    service_path: PathLike | None = None,
    answer_timeout: float | None = None,
) -> HandshakeDone:
    """Lend ``sock`` to the agent for ``request`` and wait for its DONE.

    Never raises for a refused or failed request: the status says what happened
    (``ESRCH`` when no service listens at ``service_path``; ``ETIMEDOUT`` when no answer
    came within ``answer_timeout``, default the request's timeout plus
    :data:`ANSWER_GRACE_SECONDS`). Bad arguments raise :class:`ValueError`.
    """
    fd = sock if isinstance(sock, int) else sock.fileno()
    if fd < 0:
        raise ValueError("the socket is closed")
    path = os.fspath(service_path) if service_path is not None else default_service_path()
    message = encode_submit(request)
    if answer_timeout is None:
        answer_timeout = request.effective_timeout_ms / 1000 + ANSWER_GRACE_SECONDS
    try:
        conn = await connect_service(path)
    except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
        return _failure(errno.ESRCH, f"no handshake service at {path}: {exc.strerror or exc}")
    except PermissionError as exc:
        return _failure(errno.EACCES, f"handshake service at {path}: {exc.strerror}")
    except BlockingIOError:
        return _failure(errno.EAGAIN, f"handshake service at {path} is overloaded")
    try:
        try:
            await send_message(conn, message, [fd])
        except OSError as exc:
            return _failure(errno.ESRCH, f"handshake service at {path} went away: "
                            f"{exc.strerror or exc}")
        try:
            data, fds, _ = await asyncio.wait_for(recv_message(conn), answer_timeout)
        except TimeoutError:
            return _failure(errno.ETIMEDOUT,
                            f"no answer from the handshake service within {answer_timeout:g} s")
        except OSError as exc:
            data, fds = b"", []
            reason = f"handshake service connection failed: {exc.strerror or exc}"
        else:
            reason = "the handshake service closed the connection without answering"
        for extra in fds:  # the service never passes descriptors back
            with contextlib.suppress(OSError):
                os.close(extra)
        if not data:
            return _failure(errno.EIO, reason)
        try:
            _, done = decode_done_message(data)
        except ServiceFormatError as exc:
            return _failure(errno.EIO, f"unreadable answer from the handshake service: {exc}")
        done.sockfd = fd
        return done
    finally:
        conn.close()


def _failure(status: int, reason: str) -> HandshakeDone:
    return HandshakeDone(status=status, sockfd=-1, reason=reason)


async def submit(
    sock: socket.socket | int,
    options: HandshakeOptions | None = None,
    *,
    service_path: PathLike | None = None,
    **fields: Unpack[HandshakeFields],
) -> HandshakeDone:
    """Ask the agent for a handshake on ``sock``; return its DONE, whatever the status.

    What to ask for: ``options`` and/or its fields as keywords (as for
    :func:`build_request`). ``done.session`` is set on success, with the peer's record size
    limit in ``done.session.peer_record_size_limit`` (see the module docstring).
    """
    request = _merge(options, fields).to_request()
    return await submit_request(sock, request, service_path=service_path)


async def handshake(
    sock: socket.socket,
    options: HandshakeOptions | None = None,
    *,
    service_path: PathLike | None = None,
    record_layer: Literal["auto", "kernel", "user"] = "auto",
    **fields: Unpack[HandshakeFields],
) -> TlsConnection:
    """Run a TLS 1.3 handshake on ``sock`` through the agent; return the connection.

    What to ask for: ``options`` and/or its fields as keywords (as for
    :func:`build_request`). Raises :class:`HandshakeFailed` (an :class:`OSError` whose
    ``errno`` is the DONE status) when the handshake is refused or fails. ``record_layer``
    picks kTLS (``"kernel"``), the user-space layer (``"user"``) or whichever works here
    (``"auto"``). The socket is left non-blocking, as the connection's asyncio methods need.
    """
    done = await submit(sock, _merge(options, fields), service_path=service_path)
    return connection_from_done(sock, done, record_layer=record_layer)


def connection_from_done(
    sock: socket.socket, done: HandshakeDone, *, record_layer: str = "auto"
) -> TlsConnection:
    """Raise :class:`HandshakeFailed` for a failed DONE, else wrap ``sock`` in a connection."""
    if done.status != 0:
        raise HandshakeFailed(done.status, done.reason)
    if done.session is None:
        raise HandshakeFailed(errno.EIO, "the handshake service sent no session")
    from ktlsd.tls.connection import TlsConnection
    from ktlsd.tls.record import open_record_layer

    sock.setblocking(False)
    layer = open_record_layer(sock, done.session, record_layer)
    return TlsConnection(layer, done.session)


def _session_request(
    role: RoleName | Role, session_id: int, timeout: float | None, **fields: Any
) -> HandshakeRequest:
    """A request about a kept session (key update or forget), as the proposed kernel
    ``clientkeyupdate``/``serverkeyupdate`` upcall carries it."""
    if session_id <= 0:
        raise ValueError("session_id must be the positive id returned by the handshake")
    return HandshakeRequest(
        sockfd=-1,
        message_type=(MessageType.CLIENTKEYUPDATE if _role(role) is Role.CLIENT
                      else MessageType.SERVERKEYUPDATE),
        auth_mode=AuthMode.PSK,
        timeout_ms=round(timeout * 1000) if timeout is not None else DEFAULT_TIMEOUT_MS,
        session_id=session_id,
        **fields,
    )


async def key_update(
    sock: socket.socket | int,
    *,
    role: RoleName | Role,
    session_id: int,
    key_update_type: KeyUpdateType = KeyUpdateType.SEND,
    request_peer_update: bool = False,
    record_seqs: tuple[int, int] | None = None,
    timeout: float | None = None,
    service_path: PathLike | None = None,
) -> HandshakeDone:
    """Ask the agent to run a KeyUpdate on a session it kept (``done.session_id`` of a
    handshake that asked for it with ``keep_session=True``), as the proposed kernel
    key-update upcall does. For a user-space record layer
    pass its ``record_seqs`` (next tx, rx record numbers); the DONE's session carries the
    new secrets to install."""
    request = _session_request(
        role, session_id, timeout, key_update_type=key_update_type,
        request_peer_update=request_peer_update, record_seqs=record_seqs,
    )
    return await submit_request(sock, request, service_path=service_path)


async def forget_session(
    sock: socket.socket | int,
    *,
    role: RoleName | Role,
    session_id: int,
    timeout: float | None = None,
    service_path: PathLike | None = None,
) -> HandshakeDone:
    """Tell the agent the connection of ``session_id`` is ending: it drops the session's kept
    secrets at once instead of at the end of their lifetime. Call it before closing ``sock``
    (the request travels with the socket, like every request). Status 0, or ENOKEY when the
    session was already gone."""
    request = _session_request(role, session_id, timeout, forget_session=True)
    return await submit_request(sock, request, service_path=service_path)


__all__ = [
    "HandshakeFailed",
    "HandshakeFields",
    "HandshakeOptions",
    "build_request",
    "connection_from_done",
    "default_service_path",
    "forget_session",
    "handshake",
    "key_update",
    "submit",
    "submit_request",
]
