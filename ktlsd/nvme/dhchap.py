"""DH-HMAC-CHAP host and controller state machines (NVMe in-band authentication), sans I/O.

The NVMe Base specification's DH-HMAC-CHAP protocol runs over Authentication Send/Receive
commands on a queue; this module knows nothing about commands or queues.
:class:`DhchapHost` and :class:`DhchapController` take decoded messages
(:mod:`ktlsd.nvme.dhchap_messages`) and return an :class:`Output`: at most one message to send,
plus events (:class:`Authenticated`, :class:`Failed`). What they compute (responses, DH, the
generated PSK) is :mod:`ktlsd.nvme.dhchap_crypto`; with it they interoperate with the Linux
host and target.

With secure channel concatenation the host sends a random C2 with S2 = 0 (no controller
response), a DH group is mandatory, and both sides derive the generated TLS PSK and hand it
to their :class:`~ktlsd.nvme.dhchap_crypto.PskStore`.

NEWTLSPSK is only valid on a connection without a TLS key and REPLACETLSPSK only on one
with a key; the controller answers anything else with CONCAT_MISMATCH. The controller keeps
its TLS key after a *successful* authentication (so the next REPLACETLSPSK works again; the
upstream target got this wrong until 2026); failures and :meth:`DhchapController.teardown`
clear it.

Responses are compared in constant time; secrets never appear in reprs or messages.
"""

from __future__ import annotations

import hmac
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

from ktlsd.nvme.dhchap_crypto import (
    DhchapSecret,
    DhExchange,
    DhGroup,
    GeneratedPsk,
    HashFunction,
    PskStore,
    augmented_challenge,
    controller_response,
    derive_generated_tls_key,
    host_response,
)
from ktlsd.nvme.dhchap_messages import (
    Challenge,
    Failure,
    FailureReason,
    Message,
    Negotiate,
    Reply,
    SecureChannel,
    Success1,
    Success2,
)

__all__ = [
    "Authenticated",
    "DhchapController",
    "DhchapHost",
    "Event",
    "Failed",
    "Output",
]


@dataclass(frozen=True)
class Authenticated:
    """Authentication succeeded; ``generated_psk`` is set when a channel was concatenated."""

    hash_fn: HashFunction
    dh_group: DhGroup
    bidirectional: bool
    generated_psk: GeneratedPsk | None = None


@dataclass(frozen=True)
class Failed:
    """Authentication failed with ``reason``; ``detected_locally`` tells who noticed.

    ``reason`` is a plain int only when a peer sent a code this module does not know.
    """

    reason: FailureReason | int
    detected_locally: bool


def _reason(code: int) -> FailureReason | int:
    try:
        return FailureReason(code)
    except ValueError:
        return code


Event = Authenticated | Failed


@dataclass
class Output:
    """What a state machine step produced: at most one message to send, and events."""

    send: Message | None = None
    events: list[Event] = field(default_factory=list)


def _seqnum() -> int:
    """A random non-zero 32-bit sequence number (0 means "no bidirectional auth")."""
    return secrets.randbelow(0xFFFFFFFF) + 1


class _Base:
    def __init__(self, hostnqn: str, subsysnqn: str, psk_store: PskStore | None) -> None:
        self.hostnqn = hostnqn
        self.subsysnqn = subsysnqn
        self.psk_store = psk_store
        self.tls_key: GeneratedPsk | None = None

    def _install_generated(
        self, hash_fn: HashFunction, session_key: bytes, c1: bytes, c2: bytes
    ) -> GeneratedPsk:
        identity, tls_psk = derive_generated_tls_key(
            hash_fn, session_key, c1, c2, self.hostnqn, self.subsysnqn
        )
        serial = self.psk_store.store(identity, tls_psk) if self.psk_store else None
        previous = self.tls_key
        if previous is not None and previous.serial is not None and self.psk_store:
            self.psk_store.revoke(previous.serial)
        self.tls_key = GeneratedPsk(identity, tls_psk, serial)
        return self.tls_key


class DhchapHost(_Base):
    """The host side of DH-HMAC-CHAP on one queue.

    Drive it with :meth:`start` (returns AUTH_Negotiate), then feed each message received
    via Authentication Receive to :meth:`receive` and send what it returns. ``concat``
    requests secure channel concatenation: NEWTLSPSK while the host holds no TLS key,
    REPLACETLSPSK once it does (``secure_channel`` forces a value, for testing peers).
    """

    def __init__(
        self,
        hostnqn: str,
        subsysnqn: str,
        host_secret: DhchapSecret,
        ctrl_secret: DhchapSecret | None = None,
        *,
        hash_ids: Sequence[int] = (1, 2, 3),
        dh_groups: Sequence[int] = (0, 1, 2, 3, 4, 5),
        concat: bool = False,
        psk_store: PskStore | None = None,
        tls_key: GeneratedPsk | None = None,
    ) -> None:
        super().__init__(hostnqn, subsysnqn, psk_store)
        self.host_secret = host_secret
        self.ctrl_secret = ctrl_secret
        self.hash_ids = tuple(hash_ids)
        self.dh_groups = tuple(dh_groups)
        self.concat = concat
        self.tls_key = tls_key
        self._transaction = 0
        self._state = "idle"
        self._t_id = 0
        self._sc_c = 0

    def start(self, secure_channel: SecureChannel | None = None) -> Negotiate:
        """Begin a new transaction and return the AUTH_Negotiate to send."""
        self._t_id = self._transaction
        self._transaction = (self._transaction + 1) & 0xFFFF
        if secure_channel is not None:
            self._sc_c = secure_channel
        elif not self.concat:
            self._sc_c = SecureChannel.NOSC
        else:
            self._sc_c = SecureChannel.REPLACETLSPSK if self.tls_key else SecureChannel.NEWTLSPSK
        self._state = "challenge"
        self._session_key = b""
        return Negotiate(self._t_id, self._sc_c, self.hash_ids, self.dh_groups)

    def _fail(self, reason: FailureReason) -> Output:
        self._state = "done"
        return Output(Failure(self._t_id, reason, from_controller=False), [Failed(reason, True)])

    def receive(self, message: Message) -> Output:
        if isinstance(message, Failure) and message.from_controller:
            self._state = "done"
            return Output(None, [Failed(_reason(message.explanation), False)])
        if self._state == "challenge" and isinstance(message, Challenge):
            return self._on_challenge(message)
        if self._state == "success1" and isinstance(message, Success1):
            return self._on_success1(message)
        return self._fail(FailureReason.INCORRECT_MESSAGE)

    def _on_challenge(self, msg: Challenge) -> Output:
        if msg.t_id != self._t_id:
            return self._fail(FailureReason.INCORRECT_MESSAGE)
        if msg.hash_id not in self.hash_ids or msg.hash_id not in (1, 2, 3):
            return self._fail(FailureReason.HASH_UNUSABLE)
        hash_fn = HashFunction(msg.hash_id)
        if len(msg.challenge) != hash_fn.length:
            return self._fail(FailureReason.HASH_UNUSABLE)
        if msg.dh_group not in self.dh_groups or msg.dh_group not in DhGroup._value2member_map_:
            return self._fail(FailureReason.DHGROUP_UNUSABLE)
        group = DhGroup(msg.dh_group)
        if group is DhGroup.NULL and msg.dh_value:
            return self._fail(FailureReason.INCORRECT_PAYLOAD)
        if self._sc_c != SecureChannel.NOSC and group is DhGroup.NULL:
            return self._fail(FailureReason.CONCAT_MISMATCH)
        c1 = msg.challenge
        host_value = b""
        if group is not DhGroup.NULL:
            exchange = DhExchange(group)
            try:
                self._session_key = exchange.session_key(msg.dh_value)
            except ValueError:
                return self._fail(FailureReason.DHGROUP_UNUSABLE)
            host_value = exchange.public_value
            c1 = augmented_challenge(hash_fn, self._session_key, msg.challenge)
        r1 = host_response(
            hash_fn,
            self.host_secret.transform(self.hostnqn),
            c1,
            msg.seqnum,
            self._t_id,
            self._sc_c,
            self.hostnqn,
            self.subsysnqn,
        )
        self._hash_fn, self._group, self._c1 = hash_fn, group, msg.challenge
        concat = self._sc_c != SecureChannel.NOSC
        self._bidirectional = self.ctrl_secret is not None and not concat
        self._c2 = os.urandom(hash_fn.length) if (self.ctrl_secret or concat) else None
        self._s2 = _seqnum() if self._bidirectional else 0
        self._state = "success1"
        return Output(Reply(self._t_id, r1, self._s2, self._c2, host_value))

    def _on_success1(self, msg: Success1) -> Output:
        if msg.t_id != self._t_id:
            return self._fail(FailureReason.INCORRECT_MESSAGE)
        if msg.hash_length != self._hash_fn.length:
            return self._fail(FailureReason.HASH_UNUSABLE)
        send: Message | None = None
        if self._bidirectional:
            assert self.ctrl_secret is not None and self._c2 is not None
            if msg.response is None:
                return self._fail(FailureReason.FAILED)
            c2 = self._c2
            if self._group is not DhGroup.NULL:
                c2 = augmented_challenge(self._hash_fn, self._session_key, c2)
            expected = controller_response(
                self._hash_fn,
                self.ctrl_secret.transform(self.subsysnqn),
                c2,
                self._s2,
                self._t_id,
                self.hostnqn,
                self.subsysnqn,
            )
            if not hmac.compare_digest(expected, msg.response):
                return self._fail(FailureReason.FAILED)
            send = Success2(self._t_id)
        generated = None
        if self._sc_c != SecureChannel.NOSC:
            assert self._c2 is not None
            try:
                generated = self._install_generated(
                    self._hash_fn, self._session_key, self._c1, self._c2
                )
            except ValueError:
                return self._fail(FailureReason.CONCAT_MISMATCH)
        self._state = "done"
        event = Authenticated(self._hash_fn, self._group, self._bidirectional, generated)
        return Output(send, [event])

    def teardown(self) -> None:
        """Forget the connection's generated key (revoking it in the store)."""
        if self.tls_key and self.tls_key.serial is not None and self.psk_store:
            self.psk_store.revoke(self.tls_key.serial)
        self.tls_key = None


class DhchapController(_Base):
    """The controller side of DH-HMAC-CHAP on one queue (admin queue for concatenation).

    Feed each message received via Authentication Send to :meth:`receive`; the returned
    message is what the next Authentication Receive hands to the host. ``tls_key`` is the
    connection's current TLS key (``has_tls_key=True`` stands for a configured one).
    """

    def __init__(
        self,
        subsysnqn: str,
        hostnqn: str,
        host_secret: DhchapSecret,
        ctrl_secret: DhchapSecret | None = None,
        *,
        hash_ids: Sequence[int] = (1, 2, 3),
        dh_groups: Sequence[int] = (0, 1, 2, 3, 4, 5),
        has_tls_key: bool = False,
        psk_store: PskStore | None = None,
    ) -> None:
        super().__init__(hostnqn, subsysnqn, psk_store)
        self.host_secret = host_secret
        self.ctrl_secret = ctrl_secret
        self.hash_ids = tuple(hash_ids)
        self.dh_groups = tuple(dh_groups)
        self._configured_key = has_tls_key
        self._state = "negotiate"
        self._t_id = 0
        self.authenticated = False

    @property
    def has_tls_key(self) -> bool:
        return self._configured_key or self.tls_key is not None

    def _fail(self, reason: FailureReason) -> Output:
        """Failure1 to the host; failures drop the connection's TLS key."""
        self._state = "negotiate"
        self.authenticated = False
        self._clear_key()
        return Output(Failure(self._t_id, reason, from_controller=True), [Failed(reason, True)])

    def _clear_key(self) -> None:
        if self.tls_key and self.tls_key.serial is not None and self.psk_store:
            self.psk_store.revoke(self.tls_key.serial)
        self.tls_key = None
        self._configured_key = False

    def teardown(self) -> None:
        """The queue goes away: drop its TLS key."""
        self._clear_key()
        self.authenticated = False
        self._state = "negotiate"

    def receive(self, message: Message) -> Output:
        if isinstance(message, Negotiate):
            return self._on_negotiate(message)
        if isinstance(message, Failure) and not message.from_controller:
            self._state = "negotiate"
            self.authenticated = False
            self._clear_key()
            return Output(None, [Failed(_reason(message.explanation), False)])
        if getattr(message, "t_id", None) != self._t_id:
            return self._fail(FailureReason.INCORRECT_PAYLOAD)
        if self._state == "reply" and isinstance(message, Reply):
            return self._on_reply(message)
        if self._state == "success2" and isinstance(message, Success2):
            return self._on_success2()
        return self._fail(FailureReason.INCORRECT_MESSAGE)

    def _on_negotiate(self, msg: Negotiate) -> Output:
        self._t_id = msg.t_id
        self._sc_c = msg.sc_c
        if msg.sc_c != SecureChannel.NOSC:
            if msg.sc_c == SecureChannel.NEWTLSPSK and self.has_tls_key:
                return self._fail(FailureReason.CONCAT_MISMATCH)
            if msg.sc_c == SecureChannel.REPLACETLSPSK and not self.has_tls_key:
                return self._fail(FailureReason.CONCAT_MISMATCH)
            if msg.sc_c not in (SecureChannel.NEWTLSPSK, SecureChannel.REPLACETLSPSK):
                return self._fail(FailureReason.CONCAT_MISMATCH)
        hash_id = next((h for h in self.hash_ids if h in msg.hash_ids), None)
        if hash_id is None:
            return self._fail(FailureReason.HASH_UNUSABLE)
        offered = [g for g in self.dh_groups if g in msg.dh_groups]
        if msg.sc_c != SecureChannel.NOSC:
            offered = [g for g in offered if g != DhGroup.NULL]
            if not offered:
                return self._fail(FailureReason.CONCAT_MISMATCH)
        if not offered:
            return self._fail(FailureReason.DHGROUP_UNUSABLE)
        self._hash_fn = HashFunction(hash_id)
        self._group = DhGroup(offered[0])
        self._s1 = _seqnum()
        self._c1 = os.urandom(self._hash_fn.length)
        self._exchange = DhExchange(self._group) if self._group is not DhGroup.NULL else None
        value = self._exchange.public_value if self._exchange else b""
        self._state = "reply"
        return Output(Challenge(self._t_id, hash_id, self._group, self._s1, self._c1, value))

    def _on_reply(self, msg: Reply) -> Output:
        hl = self._hash_fn.length
        if len(msg.response) != hl:
            return self._fail(FailureReason.INCORRECT_PAYLOAD)
        session_key = b""
        c1 = self._c1
        if self._exchange is not None:
            try:
                session_key = self._exchange.session_key(msg.dh_value)
            except ValueError:
                return self._fail(FailureReason.DHGROUP_UNUSABLE)
            c1 = augmented_challenge(self._hash_fn, session_key, c1)
        elif msg.dh_value:
            return self._fail(FailureReason.INCORRECT_PAYLOAD)
        expected = host_response(
            self._hash_fn,
            self.host_secret.transform(self.hostnqn),
            c1,
            self._s1,
            self._t_id,
            self._sc_c,
            self.hostnqn,
            self.subsysnqn,
        )
        if not hmac.compare_digest(expected, msg.response):
            return self._fail(FailureReason.FAILED)
        concat = self._sc_c != SecureChannel.NOSC
        if concat and msg.challenge is None:
            return self._fail(FailureReason.FAILED)
        if msg.seqnum == 0 or msg.challenge is None:
            # Unidirectional (or concatenation, which never authenticates the controller):
            # the host is authenticated now and Success1 carries no response.
            generated = None
            if concat:
                assert msg.challenge is not None
                try:
                    generated = self._install_generated(
                        self._hash_fn, session_key, self._c1, msg.challenge
                    )
                except ValueError:
                    return self._fail(FailureReason.CONCAT_MISMATCH)
            self.authenticated = True
            self._state = "negotiate"
            return Output(
                Success1(self._t_id, hl, None),
                [Authenticated(self._hash_fn, self._group, False, generated)],
            )
        if self.ctrl_secret is None:
            return self._fail(FailureReason.FAILED)
        c2 = msg.challenge
        if self._exchange is not None:
            c2 = augmented_challenge(self._hash_fn, session_key, c2)
        r2 = controller_response(
            self._hash_fn,
            self.ctrl_secret.transform(self.subsysnqn),
            c2,
            msg.seqnum,
            self._t_id,
            self.hostnqn,
            self.subsysnqn,
        )
        self._state = "success2"
        return Output(Success1(self._t_id, hl, r2))

    def _on_success2(self) -> Output:
        self.authenticated = True
        self._state = "negotiate"
        return Output(None, [Authenticated(self._hash_fn, self._group, True, None)])
