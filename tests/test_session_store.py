"""Kept session state in a real kernel keyring."""

from __future__ import annotations

import errno
import os

import pytest

from ktlsd import keyring
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.session_store import POSSESSOR_ONLY, SessionStore, decode_state, encode_state
from ktlsd.tls.keyschedule import advance_session, next_traffic_secret
from ktlsd.tls.session import CipherSuite, Role, Session


@pytest.fixture
def store(private_session_keyring: int) -> SessionStore:
    return SessionStore(lifetime=60)  # in a private, empty session keyring for this test


def _session(suite: CipherSuite = CipherSuite.TLS_AES_256_GCM_SHA384) -> Session:
    n = suite.hash_length
    return Session(Role.SERVER, suite, os.urandom(n), os.urandom(n), client_generation=3)


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_state_round_trip(suite: CipherSuite) -> None:
    s = _session(suite)
    back, owner = decode_state(encode_state(s, owner=1000))
    assert owner == 1000
    assert (back.role, back.suite, back.client_generation) == (s.role, s.suite, 3)
    assert back.client_secret == s.client_secret and back.server_secret == s.server_secret


def test_corrupt_state_is_rejected_without_echoing_it() -> None:
    raw = encode_state(_session())
    for bad in (raw[:-1], raw + b"x", b"KTLSD-S9" + raw[8:], raw[:20]):
        with pytest.raises(ValueError) as info:
            decode_state(bad)
        assert raw[-48:].hex() not in str(info.value)


def test_save_load_update_drop(store: SessionStore) -> None:
    s = _session()
    sid = store.save(s)
    info = keyring.describe_key(sid)
    assert info.perm == POSSESSOR_ONLY
    assert store.load(sid).server_secret == s.server_secret
    nxt = advance_session(s, tx=True)  # s is kept as the server's: tx is the server direction
    assert nxt.server_secret == next_traffic_secret(s.suite, s.server_secret)
    assert nxt.server_generation == 1 and nxt.client_secret == s.client_secret
    store.update(sid, nxt)
    assert store.load(sid).server_secret == nxt.server_secret
    store.drop(sid)
    with pytest.raises(HandshakeError) as info2:
        store.load(sid)
    assert info2.value.cause is FailureCause.MISSING_MATERIAL
    assert info2.value.errno == errno.ENOKEY


def test_a_session_is_only_served_to_its_owner(store: SessionStore) -> None:
    sid = store.save(_session(), owner=1000)
    assert store.load(sid, owner=1000).suite is CipherSuite.TLS_AES_256_GCM_SHA384
    for other in (1001, 0, 0xFFFFFFFF):
        with pytest.raises(HandshakeError) as info:
            store.load(sid, owner=other)
        assert info.value.errno == errno.ENOKEY


def test_unknown_or_foreign_ids_give_enokey(store: SessionStore) -> None:
    other = keyring.add_key("user", "not-ours", b"data", keyring.KEY_SPEC_SESSION_KEYRING)
    for sid in (0, other, 0x7FFFFFF0):
        with pytest.raises(HandshakeError) as info:
            store.load(sid)
        assert info.value.errno == errno.ENOKEY
