"""One handshake request, whichever upcall source it came from, and its DONE answer.

The kernel's ``handshake`` generic netlink family and ktlsd's user-space handshake
service both produce a :class:`HandshakeRequest` (the ACCEPT reply) and take a
:class:`HandshakeDone` back. The enum values are the kernel's
(``Documentation/netlink/specs/handshake.yaml``), plus the proposed KeyUpdate additions.

The contract between an upcall source and the agent is :class:`PendingRequest`: besides the
request itself it declares everything the agent must know about who asked and what they get
back, as typed attributes, so the agent never has to know which source a request came from:

* :attr:`PendingRequest.credentials`: the consumer process (:class:`ConsumerCredentials`), or
  None when the kernel itself asked. It decides which material the request may use (see
  :class:`ktlsd.material.Consumer`) and who owns the session kept for later key updates (the
  kernel, or the consumer's uid);
* :attr:`PendingRequest.delivery`: how the session keys reach the consumer's record layer
  (:class:`KeyDelivery`): installed into kTLS by the agent, with no secrets in DONE, or handed
  back in DONE;
* :attr:`PendingRequest.cancelled`: set when the consumer withdraws the request; the agent then
  gives up on the handshake. A source whose consumers cannot withdraw never sets it;
* :attr:`PendingRequest.source_name`: a label for the logs, nothing more.

A consumer's request may ask for its session to be kept for later key updates
(:attr:`HandshakeRequest.keep_session`); the kernel's sessions are kept when the agent is
configured to. A source with limits of its own (the service's per-uid shares) is a
:class:`ConfigurableSource`: the agent hands it new settings on reload.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ktlsd.settings import DEFAULT_TIMEOUT_MS, AgentSettings
from ktlsd.tls.session import Session


class HandlerClass(enum.IntEnum):
    NONE = 0
    TLSHD = 1


class MessageType(enum.IntEnum):
    """What the consumer asks for (``handshake-msg-type``)."""

    UNSPEC = 0
    CLIENTHELLO = 1  # we are the TLS client
    SERVERHELLO = 2  # we are the TLS server
    CLIENTKEYUPDATE = 3  # proposed: key update on a client-side session
    SERVERKEYUPDATE = 4  # proposed: key update on a server-side session

    @property
    def is_key_update(self) -> bool:
        return self in (MessageType.CLIENTKEYUPDATE, MessageType.SERVERKEYUPDATE)


class AuthMode(enum.IntEnum):
    """How the peer is to be authenticated (``handshake-auth``)."""

    UNSPEC = 0
    UNAUTH = 1
    PSK = 2
    X509 = 3


class KeyUpdateType(enum.IntEnum):
    """Proposed ``key-update-type``: which KeyUpdate the consumer asks the agent to run."""

    UNSPEC = 0
    SEND = 1
    RECEIVED = 2
    RECEIVED_REQUEST_UPDATE = 3


MAX_PEER_IDENTITIES = 5
MAX_REMOTE_AUTH = 5


@dataclass(frozen=True)
class InlinePsk:
    """A PSK handed over directly by a user-space consumer (instead of a key serial)."""

    identity: bytes
    key: bytes = field(repr=False)
    hash_name: str = "sha256"


@dataclass(frozen=True)
class InlineMaterial:
    """Authentication material a user-space consumer sends with its request.

    The kernel only ever sends key serials; programs using the handshake service may instead
    pass keys and certificates directly, or name files the agent should read. Everything
    here is optional; whatever is absent falls back to serials and then to configuration.
    """

    psk_keys: tuple[InlinePsk, ...] = ()
    certificate_chain: tuple[bytes, ...] = ()  # DER, leaf first
    private_key: bytes = field(default=b"", repr=False)  # DER
    certificate_file: str | None = None  # PEM
    private_key_file: str | None = None  # PEM
    truststore: str | None = None
    crl: str | None = None
    ciphersuites: tuple[str, ...] = ()
    require_client_cert: bool = False


@dataclass
class HandshakeRequest:
    """The parameters of an accepted handshake request (the ACCEPT reply).

    ``sockfd`` is a file descriptor owned by the agent until DONE. ``peer_identities``
    are key serials: PSKs to offer (client, in order) or, for a server, one serial or 0
    meaning "look the identity up yourself". ``certificate``/``private_key`` are key
    serials of DER blobs; 0 means "use the configured files".
    """

    sockfd: int
    message_type: MessageType
    auth_mode: AuthMode
    handler_class: HandlerClass = HandlerClass.TLSHD
    timeout_ms: int = 0
    peer_identities: tuple[int, ...] = ()
    certificate: int = 0
    private_key: int = 0
    peername: str | None = None
    keyring: int = 0
    key_update_type: KeyUpdateType = KeyUpdateType.UNSPEC
    session_id: int = 0
    inline: InlineMaterial | None = None  # user-space service only
    # Key updates requested through the user-space service by a consumer that runs the
    # user-space record layer (emulating kTLS): ask the peer to update too (SEND), and the
    # consumer's current record numbers (tx, rx) so the agent can protect the KeyUpdate.
    request_peer_update: bool = False
    record_seqs: tuple[int, int] | None = None
    # The consumer's connection ended: forget the kept session ``session_id`` (service only;
    # the kernel has no teardown upcall, so kernel sessions end with their lifetime).
    forget_session: bool = False
    # Keep the session's state for later key updates through the agent (service only: a
    # consumer asks; kernel sessions are kept when the agent is configured to keep them).
    keep_session: bool = False

    def timeout_ms_or(self, default_ms: int) -> int:
        """The request's timeout, or ``default_ms`` when it carries none (the agent passes
        its configured ``default_timeout_ms``)."""
        return self.timeout_ms if self.timeout_ms > 0 else default_ms

    @property
    def effective_timeout_ms(self) -> int:
        """The timeout under the built-in default (what a consumer can count on)."""
        return self.timeout_ms_or(DEFAULT_TIMEOUT_MS)


@dataclass
class HandshakeDone:
    """The agent's answer (DONE). ``status`` is a positive errno, 0 on success.

    ``session`` is returned only to user-space consumers that run the user-space record
    layer themselves (it carries traffic secrets); it is never sent to the kernel.
    ``reason`` is a one-line, secret-free explanation of a failure for the consumer's logs.
    ``tags`` are the TLS session tags the peer earned (:mod:`ktlsd.session_tags`; success only).
    """

    status: int
    sockfd: int
    remote_auth: tuple[int, ...] = ()
    session_id: int = 0
    session: Session | None = None
    reason: str = ""
    extra: dict[str, object] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConsumerCredentials:
    """The consumer process behind a request, as the kernel vouched for it (``SO_PEERCRED``).

    ``groups`` are its supplementary groups when the source learnt them (``SO_PEERGROUPS``);
    empty otherwise.
    """

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


class KeyDelivery(enum.Enum):
    """How the session keys of a successful handshake (or key update) reach the consumer."""

    INSTALL_KTLS = "install kTLS"
    """A kernel consumer: the agent installs the keys into kTLS on the socket before DONE;
    DONE carries no secrets (the kernel owns the encrypted connection from then on)."""

    RETURN_SECRETS = "return secrets"
    """A user-space consumer: DONE carries the :class:`~ktlsd.tls.session.Session` with its
    traffic secrets; the consumer installs kTLS itself or runs the user-space record layer."""


class PendingRequest(Protocol):
    """An accepted request: the agent owns ``request.sockfd`` until it calls :meth:`done`.

    ``done`` must be called exactly once; it hands the socket back (the source closes the
    agent's descriptor) and delivers the answer to the consumer. The attributes are read-only
    for the agent; the module docstring says what each one decides.
    """

    @property
    def request(self) -> HandshakeRequest: ...

    @property
    def source_name(self) -> str:
        """Where the request came from ("kernel", "service", ...), for the logs only."""
        ...

    @property
    def credentials(self) -> ConsumerCredentials | None:
        """The consumer process; None when the kernel itself asked (trusted; it owns the
        sessions kept for its requests)."""
        ...

    @property
    def delivery(self) -> KeyDelivery: ...

    @property
    def cancelled(self) -> asyncio.Event:
        """Set when the consumer withdraws the request (never, for sources that cannot)."""
        ...

    async def done(self, answer: HandshakeDone) -> None: ...


class UpcallSource(Protocol):
    """Where handshake requests come from: the kernel's netlink family or the local service."""

    name: str

    def requests(self) -> AsyncIterator[PendingRequest]:
        """Accepted requests, as they arrive; ends when the source is closed."""
        ...

    async def close(self) -> None:
        """Stop accepting new requests (in-flight ones still get their DONE)."""
        ...


@runtime_checkable
class ConfigurableSource(Protocol):
    """An upcall source with limits of its own (the service's per-uid shares): the agent
    hands it the new settings on reload (SIGHUP)."""

    def configure(self, settings: AgentSettings) -> None: ...
