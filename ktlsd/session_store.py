"""Kept session state between requests, held in a Linux keyring key, never on disk.

A later KeyUpdate request (possibly minutes after the handshake, in a separate upcall) needs
the suite and the current traffic secrets of both directions. kTLS never gives a traffic
secret back (``getsockopt`` returns only the derived key), so the agent keeps them itself:

* in a ``user`` key in the agent's own session keyring, with possessor-only permissions
  (no other process, not even one of the same uid, can read it: only processes possessing
  the agent's session keyring can);
* with a timeout (the configured lifetime), so state of connections that ended silently
  disappears on its own;
* updated in place on every key update (same serial), dropped when the connection ends;
* bounded: at most ``max_per_owner`` sessions per consumer uid and ``max_sessions`` in all
  (never more than a quarter of the running user's key quota, :func:`quota_capacity`).
  Keeping one more first evicts the owner's oldest when the owner is at its cap, then, at the
  total, the oldest session of the consumer uid keeping the most (the kernel's sessions go
  only when no consumer has any left; a consumer's session is then not kept at all). An
  evicted session id answers like an unknown one (ENOKEY).

Dropping and evicting *unlink* the key from the store's keyring (it has no other link, so the
kernel destroys it): the kernel gives a keyring link's quota bytes back on an explicit unlink,
but not when its garbage collector removes an invalidated or expired key.

Quota arithmetic (measured with ``/proc/key-users``): one kept session costs one key and
:data:`SESSION_QUOTA_BYTES` (156) bytes of its owner's quota -- the description
("ktlsd:session:" + 16 hex digits + NUL, 31 bytes), the payload (121 bytes for a SHA-384 suite,
89 for SHA-256) and 4 bytes for the keyring link.

The key's serial is the *session id* handed to the consumer (DONE's ``session-id`` where the
kernel accepts it, and to user-space consumers) and echoed back in key-update requests.

Payload layout (version 1, big-endian)::

    "KTLSD-S1" | owner u32 | role u8 | suite u16 | client_generation u32
               | server_generation u32 | len u8 | client_secret | len u8 | server_secret

``owner`` is who may use the session later: :data:`KERNEL_OWNER` for kernel consumers, else
the uid of the user-space consumer. A request from anyone else is told the session does not
exist (ENOKEY), so session ids cannot be used to fish for another connection's secrets.

Storage only: this module keeps and returns :class:`~ktlsd.tls.session.Session` values as they
are given. Moving a session to its next keys is :func:`ktlsd.tls.keyschedule.advance_session`
(called by :mod:`ktlsd.keyupdate`). Record sequence numbers are not kept: the kernel holds them
for a kTLS socket, and a user-space consumer reports its own with each key-update request.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import os
import struct
from dataclasses import dataclass, field

from ktlsd import keyring
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.settings import (
    DEFAULT_MAX_KEPT_SESSIONS,
    DEFAULT_SESSION_LIFETIME,
    DEFAULT_UID_MAX_KEPT_SESSIONS,
)
from ktlsd.tls.session import CipherSuite, Role, Session

KEY_TYPE = "user"
DESCRIPTION_PREFIX = "ktlsd:session:"
_DESCRIPTION_HEX = 16
MAGIC = b"KTLSD-S1"
DEFAULT_LIFETIME = DEFAULT_SESSION_LIFETIME

# Possessor: view, read, write, search, setattr. Nobody else: nothing.
POSSESSOR_ONLY = 0x01_00_00_00 * (0x01 | 0x02 | 0x04 | 0x08 | 0x20)

KERNEL_OWNER = 0xFFFFFFFF

_HEADER = struct.Struct(">8sIBHII")
_KEYRING_LINK_BYTES = 4  # the kernel's KEYQUOTA_LINK_BYTES

SESSION_QUOTA_BYTES = (
    len(DESCRIPTION_PREFIX) + _DESCRIPTION_HEX + 1  # description with its NUL
    + _HEADER.size + 2 + 2 * max(suite.hash_length for suite in CipherSuite)  # payload
    + _KEYRING_LINK_BYTES
)
"""Key quota bytes one kept session costs at most (SHA-384 suites)."""

QUOTA_SHARE = 4
"""Kept sessions take at most 1/QUOTA_SHARE of the key quota (keys and bytes); the rest stays
free for everything else root keeps in keys (NVMe PSKs, the kernel's keyrings, ...)."""


def quota_capacity() -> int | None:
    """How many sessions fit in 1/:data:`QUOTA_SHARE` of this user's key quota (root's
    ``root_maxkeys``/``root_maxbytes``, else ``maxkeys``/``maxbytes``); None if unknown."""
    prefix = "root_" if os.geteuid() == 0 else ""
    try:
        values = []
        for name in ("maxkeys", "maxbytes"):
            with open(f"/proc/sys/kernel/keys/{prefix}{name}", "rb") as handle:
                values.append(int(handle.read(64)))
    except (OSError, ValueError):
        return None
    keys, quota_bytes = values
    return max(1, min(keys // QUOTA_SHARE, quota_bytes // QUOTA_SHARE // SESSION_QUOTA_BYTES))


def encode_state(session: Session, owner: int = KERNEL_OWNER) -> bytes:
    """Serialize what a key update needs (suite, both secrets, generations, role, owner)."""
    role = 0 if session.role is Role.CLIENT else 1
    return (
        _HEADER.pack(
            MAGIC, owner, role, session.suite.code, session.client_generation,
            session.server_generation,
        )
        + bytes([len(session.client_secret)]) + session.client_secret
        + bytes([len(session.server_secret)]) + session.server_secret
    )


def decode_state(payload: bytes) -> tuple[Session, int]:
    """Parse a kept state into (session, owner); ``ValueError`` (secret-free) when not ours."""
    if len(payload) < _HEADER.size + 2:
        raise ValueError("session state too short")
    magic, owner, role, code, client_gen, server_gen = _HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise ValueError("not a ktlsd session state")
    suite = CipherSuite.from_code(code)
    offset = _HEADER.size
    secrets_: list[bytes] = []
    for _ in range(2):
        length = payload[offset]
        value = payload[offset + 1 : offset + 1 + length]
        if length != suite.hash_length or len(value) != length:
            raise ValueError("session state has a secret of the wrong length")
        secrets_.append(value)
        offset += 1 + length
    if offset != len(payload) or role not in (0, 1):
        raise ValueError("malformed session state")
    session = Session(
        role=Role.CLIENT if role == 0 else Role.SERVER,
        suite=suite,
        client_secret=secrets_[0],
        server_secret=secrets_[1],
        client_generation=client_gen,
        server_generation=server_gen,
    )
    return session, owner


@dataclass(eq=False)
class SessionStore:
    """Save, load, update and drop kept session states in one keyring, within caps.

    The store remembers which sessions it keeps for whom, oldest first (it is the only
    writer of its keys); :meth:`configure` changes the lifetime and the caps of a store in
    use (SIGHUP).
    """

    keyring_id: int = keyring.KEY_SPEC_SESSION_KEYRING
    lifetime: int = DEFAULT_LIFETIME
    max_sessions: int = DEFAULT_MAX_KEPT_SESSIONS
    max_per_owner: int = DEFAULT_UID_MAX_KEPT_SESSIONS
    evicted: int = field(default=0, init=False)
    """Sessions evicted to make room, since the store was made (for the logs and tests)."""
    _kept: dict[int, collections.OrderedDict[int, None]] = field(
        default_factory=dict, init=False, repr=False)
    _owner_of: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    _quota: int | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.configure()

    def configure(self, *, lifetime: int | None = None, max_sessions: int | None = None,
                  max_per_owner: int | None = None) -> None:
        """New lifetime (for sessions kept or updated from now on) and caps (applied at the
        next save); the key quota is read again."""
        if lifetime is not None:
            self.lifetime = lifetime
        if max_sessions is not None:
            self.max_sessions = max_sessions
        if max_per_owner is not None:
            self.max_per_owner = max_per_owner
        if self.max_sessions < 1 or self.max_per_owner < 1:
            raise ValueError("kept-session caps must be at least 1")
        self._quota = quota_capacity()

    @property
    def capacity(self) -> int:
        """Sessions kept at most: ``max_sessions``, or fewer when the key quota is small."""
        if self._quota is None:
            return self.max_sessions
        return min(self.max_sessions, self._quota)

    @property
    def kept(self) -> int:
        """Sessions this store keeps now (expired ones count until evicted or dropped)."""
        return len(self._owner_of)

    def kept_by(self, owner: int) -> int:
        return len(self._kept.get(owner, ()))

    def save(self, session: Session, owner: int = KERNEL_OWNER) -> int:
        """Keep a new session's state; return its session id (the key's serial).

        Evicts as the module docstring says; raises :class:`~ktlsd.keyring.KeyringError`
        (EDQUOT) when a consumer's session cannot be kept without evicting the kernel's.
        """
        self._make_room(owner)
        import secrets  # here, not at the top: hmac/random/hashlib stay out of the ready set

        description = DESCRIPTION_PREFIX + secrets.token_hex(_DESCRIPTION_HEX // 2)
        # Create empty, lock the permissions down, only then write the secrets.
        serial = keyring.add_key(KEY_TYPE, description, b"\0", self.keyring_id)
        try:
            keyring.set_perm(serial, POSSESSOR_ONLY)
            keyring.add_key(KEY_TYPE, description, encode_state(session, owner), self.keyring_id)
            if self.lifetime:
                keyring.set_timeout(serial, self.lifetime)
        except BaseException:
            self._destroy(serial)
            raise
        self._kept.setdefault(owner, collections.OrderedDict())[serial] = None
        self._owner_of[serial] = owner
        return serial

    def _make_room(self, owner: int) -> None:
        if owner != KERNEL_OWNER:
            while self.kept_by(owner) >= self.max_per_owner:
                self._evict_oldest(owner)
        while self.kept >= self.capacity:
            victim = self._largest_consumer()
            if victim is None:
                if owner != KERNEL_OWNER:
                    raise keyring.KeyringError(
                        errno.EDQUOT, "keep session", detail=": every kept session is the "
                        "kernel's")
                victim = KERNEL_OWNER
            self._evict_oldest(victim)

    def _largest_consumer(self) -> int | None:
        sizes = [(len(kept), owner) for owner, kept in self._kept.items()
                 if owner != KERNEL_OWNER and kept]
        return max(sizes)[1] if sizes else None

    def _evict_oldest(self, owner: int) -> None:
        serial = next(iter(self._kept[owner]))
        self._forget(serial)
        self._destroy(serial)
        self.evicted += 1

    def _forget(self, serial: int) -> None:
        owner = self._owner_of.pop(serial, None)
        if owner is None:
            return
        kept = self._kept[owner]
        del kept[serial]
        if not kept:
            del self._kept[owner]

    def load(self, session_id: int, owner: int = KERNEL_OWNER) -> Session:
        """The kept state; ``HandshakeError(MISSING_MATERIAL)`` (ENOKEY) when it is gone or
        belongs to someone other than ``owner``."""
        if session_id <= 0:
            raise HandshakeError(FailureCause.MISSING_MATERIAL, "request carries no session id")
        try:
            info = keyring.describe_key(session_id)
            if info.type != KEY_TYPE or not info.description.startswith(DESCRIPTION_PREFIX):
                raise keyring.KeyringError(errno.ENOKEY, "load session", session_id)
            session, kept_owner = decode_state(keyring.read_key(session_id))
            if kept_owner != owner:
                raise keyring.KeyringError(errno.ENOKEY, "load session", session_id)
            return session
        except (keyring.KeyringError, ValueError) as exc:
            raise HandshakeError(
                FailureCause.MISSING_MATERIAL,
                f"session {session_id:#x} unknown or expired ({_short(exc)})",
            ) from None

    def update(self, session_id: int, session: Session, owner: int = KERNEL_OWNER) -> None:
        """Replace the kept state of ``session_id`` (same serial) and renew its lifetime."""
        info = keyring.describe_key(session_id)
        serial = keyring.add_key(
            KEY_TYPE, info.description, encode_state(session, owner), self.keyring_id
        )
        if serial != session_id:
            # The kept key expired or was dropped between describe and add: add_key made a
            # fresh key, without our permissions or lifetime. Never leave secrets in it.
            self._destroy(serial)
            raise keyring.KeyringError(errno.ENOKEY, "update session", session_id)
        if self.lifetime:
            keyring.set_timeout(session_id, self.lifetime)

    def drop(self, session_id: int) -> None:
        """Forget a session (connection ended); unknown ids are ignored."""
        self._forget(session_id)
        self._destroy(session_id)

    def _destroy(self, serial: int) -> None:
        """Unlink the key (its only link: the kernel destroys it and returns every quota byte);
        invalidate or revoke it when it cannot be unlinked."""
        try:
            keyring.unlink_key(serial, self.keyring_id)
            return
        except keyring.KeyringError:
            pass
        try:
            keyring.invalidate_key(serial)
        except keyring.KeyringError:
            with contextlib.suppress(keyring.KeyringError):
                keyring.revoke_key(serial)


def _short(exc: Exception) -> str:
    if isinstance(exc, keyring.KeyringError):
        return errno.errorcode.get(exc.errno or 0, "error")
    return str(exc)

