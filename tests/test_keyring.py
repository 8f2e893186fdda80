"""ktlsd.keyring against this machine's real kernel keyrings.

Each test joins a fresh anonymous session keyring and works in a keyring of its own
(names starting with "." are reserved for the kernel, so tests never touch ".nvme").
"""

from __future__ import annotations

import errno
import os
import time
import uuid

import pytest

from ktlsd import keyring


def test_add_read_describe(ring: int) -> None:
    payload = os.urandom(32)
    serial = keyring.add_key("user", "NVMe0R01 host subsys", payload, ring)
    assert serial > 0
    assert keyring.read_key(serial) == payload
    info = keyring.describe_key(serial)
    assert info.type == "user"
    assert info.description == "NVMe0R01 host subsys"
    assert info.uid == os.getuid()
    assert info.perm & 0x3F0000  # possessor rights are set
    assert keyring.list_keyring(ring) == [serial]


def test_large_payload_read(ring: int) -> None:
    payload = os.urandom(3000)
    serial = keyring.add_key("user", "big", payload, ring)
    assert keyring.read_key(serial) == payload


def test_search_and_find_keyring(ring: int) -> None:
    serial = keyring.add_key("user", "needle", b"x", ring)
    assert keyring.search_keyring(ring, "user", "needle") == serial
    assert keyring.search_keyring(keyring.KEY_SPEC_SESSION_KEYRING, "user", "needle") == serial
    name = keyring.describe_key(ring).description
    assert keyring.find_keyring(name) == ring
    with pytest.raises(keyring.KeyringError) as info:
        keyring.search_keyring(ring, "user", "absent")
    assert info.value.errno == errno.ENOKEY


def test_find_keyring_by_proc_keys_scan(ring: int) -> None:
    """A keyring not reachable from our session is still found via /proc/keys."""
    name = f"ktlsd-detached-{uuid.uuid4().hex[:8]}"
    detached = keyring.add_key("keyring", name, None, keyring.KEY_SPEC_USER_KEYRING)
    try:
        assert keyring.find_keyring(name) == detached
    finally:
        keyring.unlink_key(detached, keyring.KEY_SPEC_USER_KEYRING)


def test_find_keyring_missing() -> None:
    with pytest.raises(keyring.KeyringError) as info:
        keyring.find_keyring(f"ktlsd-missing-{uuid.uuid4().hex}")
    assert info.value.errno == errno.ENOKEY
    assert "ENOKEY" in str(info.value)


def test_link_unlink(ring: int) -> None:
    other = keyring.add_key("keyring", "ktlsd-other", None, keyring.KEY_SPEC_SESSION_KEYRING)
    serial = keyring.add_key("user", "linked", b"x", ring)
    keyring.link_key(serial, other)
    assert serial in keyring.list_keyring(other)
    keyring.unlink_key(serial, other)
    assert serial not in keyring.list_keyring(other)


def test_revoke_gives_ekeyrevoked(ring: int) -> None:
    serial = keyring.add_key("user", "revoked", b"secret-bytes", ring)
    keyring.revoke_key(serial)
    with pytest.raises(keyring.KeyringError) as info:
        keyring.read_key(serial)
    err = info.value
    assert err.errno == errno.EKEYREVOKED
    assert str(err) == f"read key {serial:08x}: EKEYREVOKED (Key has been revoked)"
    assert "secret" not in str(err)


def test_invalidate(ring: int) -> None:
    serial = keyring.add_key("user", "invalid", b"x", ring)
    keyring.invalidate_key(serial)
    with pytest.raises(keyring.KeyringError) as info:
        keyring.describe_key(serial)
    assert info.value.errno in (errno.ENOKEY, errno.EKEYREVOKED)


def test_timeout_expires_key(ring: int) -> None:
    serial = keyring.add_key("user", "expiring", b"x", ring)
    keyring.set_timeout(serial, 1)
    deadline = time.monotonic() + 5
    while True:
        try:
            keyring.read_key(serial)
        except keyring.KeyringError as exc:
            assert exc.errno in (errno.EKEYEXPIRED, errno.ENOKEY)
            break
        assert time.monotonic() < deadline, "key did not expire"
        time.sleep(0.1)


def test_set_perm_denies_read(ring: int) -> None:
    # Possessor: view, write, link, setattr (no read, no search: a possessed searchable
    # key stays readable); user: view. Root gets no override for key permissions.
    serial = keyring.add_key("user", "noread", b"x", ring)
    keyring.set_perm(serial, 0x35010000)
    assert keyring.describe_key(serial).perm == 0x35010000
    with pytest.raises(keyring.KeyringError) as info:
        keyring.read_key(serial)
    assert info.value.errno == errno.EACCES


def test_unknown_key_type_is_clear(ring: int) -> None:
    with pytest.raises(keyring.KeyringError) as info:
        keyring.add_key("no-such-type", "x", b"x", ring)
    assert info.value.errno == errno.ENODEV
    assert "no-such-type" in str(info.value)


def test_bad_serial() -> None:
    with pytest.raises(keyring.KeyringError) as info:
        keyring.read_key(0x7FFFFFF0)
    assert info.value.errno == errno.ENOKEY
    assert "7ffffff0" in str(info.value)


def test_special_ids_resolve() -> None:
    session = keyring.join_session_keyring(None)
    assert keyring.get_keyring_id(keyring.KEY_SPEC_SESSION_KEYRING) == session
    assert keyring.get_keyring_id(keyring.KEY_SPEC_USER_KEYRING) > 0


def test_named_session_keyring_is_joined() -> None:
    name = f"ktlsd-sess-{uuid.uuid4().hex[:8]}"
    serial = keyring.join_session_keyring(name)
    assert keyring.describe_key(serial).description == name
    assert keyring.get_keyring_id(keyring.KEY_SPEC_SESSION_KEYRING) == serial
