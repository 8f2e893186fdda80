"""Kept session state between requests, held in a Linux keyring key, never on disk.

A later KeyUpdate request (possibly minutes after the handshake, in a separate upcall) needs
the suite and the current traffic secrets of both directions. kTLS never gives a traffic
secret back (``getsockopt`` returns only the derived key), so the agent keeps them itself:

* in a ``user`` key in the agent's own session keyring, with possessor-only permissions
  (no other process, not even one of the same uid, can read it: only processes possessing
  the agent's session keyring can);
* with a timeout (the configured lifetime), so state of connections that ended silently
  disappears on its own;
* updated in place on every key update (same serial), revoked when the connection ends.

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

import contextlib
import errno
import secrets
import struct
from dataclasses import dataclass

from ktlsd import keyring
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.tls.session import CipherSuite, Role, Session

KEY_TYPE = "user"
DESCRIPTION_PREFIX = "ktlsd:session:"
MAGIC = b"KTLSD-S1"
DEFAULT_LIFETIME = 24 * 3600

# Possessor: view, read, write, search, setattr. Nobody else: nothing.
POSSESSOR_ONLY = 0x01_00_00_00 * (0x01 | 0x02 | 0x04 | 0x08 | 0x20)

KERNEL_OWNER = 0xFFFFFFFF

_HEADER = struct.Struct(">8sIBHII")


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


@dataclass(frozen=True)
class SessionStore:
    """Save, load, update and drop kept session states in one keyring."""

    keyring_id: int = keyring.KEY_SPEC_SESSION_KEYRING
    lifetime: int = DEFAULT_LIFETIME

    def save(self, session: Session, owner: int = KERNEL_OWNER) -> int:
        """Keep a new session's state; return its session id (the key's serial)."""
        description = DESCRIPTION_PREFIX + secrets.token_hex(8)
        # Create empty, lock the permissions down, only then write the secrets.
        serial = keyring.add_key(KEY_TYPE, description, b"\0", self.keyring_id)
        try:
            keyring.set_perm(serial, POSSESSOR_ONLY)
            keyring.add_key(KEY_TYPE, description, encode_state(session, owner), self.keyring_id)
            if self.lifetime:
                keyring.set_timeout(serial, self.lifetime)
        except BaseException:
            self.drop(serial)
            raise
        return serial

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
            self.drop(serial)
            raise keyring.KeyringError(errno.ENOKEY, "update session", session_id)
        if self.lifetime:
            keyring.set_timeout(session_id, self.lifetime)

    def drop(self, session_id: int) -> None:
        """Forget a session (connection ended); unknown ids are ignored."""
        try:
            keyring.invalidate_key(session_id)
        except keyring.KeyringError:
            with contextlib.suppress(keyring.KeyringError):
                keyring.revoke_key(session_id)


def _short(exc: Exception) -> str:
    if isinstance(exc, keyring.KeyringError):
        return errno.errorcode.get(exc.errno or 0, "error")
    return str(exc)

