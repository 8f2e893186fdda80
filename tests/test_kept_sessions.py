"""Kept sessions are bounded: only when asked for, at most a cap per owner and in total.

Real keyrings throughout: the store's keys are counted by listing its keyring and in root's
line of ``/proc/key-users``. 100,000 saves from one uid leave exactly its cap of keys; the
total cap evicts the oldest session of the uid keeping the most and protects the kernel's;
dropping gives every quota byte back; through the service, a few hundred handshakes that ask
to keep their session leave the cap, and an evicted session id answers ENOKEY to a key
update. Before the caps every service handshake kept its key for 24 h.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ktlsd import keyring
from ktlsd.client import key_update, submit
from ktlsd.errors import HandshakeError
from ktlsd.session_store import (
    KERNEL_OWNER,
    QUOTA_SHARE,
    SESSION_QUOTA_BYTES,
    SessionStore,
    quota_capacity,
)
from ktlsd.settings import DEFAULT_MAX_KEPT_SESSIONS, DEFAULT_UID_MAX_KEPT_SESSIONS, AgentSettings
from ktlsd.tls.session import CipherSuite, Role, Session
from tests.agent_helpers import running_agent, tcp_pair
from tests.waiting import run, wait_until

PSK = bytes.fromhex("4b" * 32)
SESSION = Session(Role.CLIENT, CipherSuite.TLS_AES_256_GCM_SHA384, b"c" * 48, b"s" * 48)


def key_user(uid: int) -> tuple[int, int]:
    """(keys, bytes) charged to ``uid`` in /proc/key-users."""
    with open("/proc/key-users") as handle:
        for line in handle:
            fields = line.split()
            if fields[0] == f"{uid}:":
                return int(fields[3].split("/")[0]), int(fields[4].split("/")[0])
    return 0, 0


@pytest.fixture
def quiet_ring(ring: int) -> Iterator[int]:
    """The test's keyring, with every key the test leaves in it gone afterwards."""
    yield ring
    for serial in keyring.list_keyring(ring):
        keyring.unlink_key(serial, ring)


def test_a_hundred_thousand_saves_from_one_uid_keep_exactly_its_cap(quiet_ring: int) -> None:
    store = SessionStore(keyring_id=quiet_ring, lifetime=600)
    cap = DEFAULT_UID_MAX_KEPT_SESSIONS
    first = store.save(SESSION, 1000)
    most = 0
    for i in range(1, 100_000):
        store.save(SESSION, 1000)
        if i % 5000 == 0:
            most = max(most, len(keyring.list_keyring(quiet_ring)))
    assert len(keyring.list_keyring(quiet_ring)) == cap
    assert most == cap
    assert store.kept == store.kept_by(1000) == cap and store.evicted == 100_000 - cap
    with pytest.raises(HandshakeError) as info:
        store.load(first, 1000)
    assert info.value.errno == errno.ENOKEY


def test_the_total_cap_evicts_from_the_largest_consumer_and_spares_the_kernel(
    quiet_ring: int
) -> None:
    store = SessionStore(keyring_id=quiet_ring, lifetime=600, max_sessions=10, max_per_owner=6)
    big = [store.save(SESSION, 1000) for _ in range(6)]
    small = [store.save(SESSION, 1001) for _ in range(3)]
    kernel = store.save(SESSION, KERNEL_OWNER)
    assert store.kept == 10
    newest = store.save(SESSION, 1001)  # at the total: uid 1000 keeps the most
    assert (store.kept_by(1000), store.kept_by(1001), store.kept_by(KERNEL_OWNER)) == (5, 4, 1)
    for serial, alive in [(big[0], False), (big[1], True), (small[0], True), (newest, True),
                          (kernel, True)]:
        owner = 1000 if serial in big else KERNEL_OWNER if serial == kernel else 1001
        if alive:
            assert store.load(serial, owner) is not None
        else:
            with pytest.raises(HandshakeError):
                store.load(serial, owner)
    # The kernel's sessions push consumers' out; a consumer never pushes the kernel's out.
    kernel_ids = [store.save(SESSION, KERNEL_OWNER) for _ in range(9)]
    assert store.kept_by(KERNEL_OWNER) == 10 and store.kept == 10
    with pytest.raises(keyring.KeyringError) as refused:
        store.save(SESSION, 1002)
    assert refused.value.errno == errno.EDQUOT
    assert store.load(kernel_ids[-1]) is not None
    assert len(keyring.list_keyring(quiet_ring)) == 10


QUOTA_UID = 54321  # a uid of this test's own: its line in /proc/key-users is nobody else's


def in_child_as(uid: int, work: Callable[[], None]) -> None:
    """Run ``work`` in a forked child under ``uid`` (real, effective and saved), in a new
    session keyring; its AssertionError comes back as this test's failure."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 0
        try:
            os.close(read_end)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            keyring.join_session_keyring(None)
            work()
        except BaseException as exc:
            os.write(write_end, f"{type(exc).__name__}: {exc}".encode()[:4000])
            status = 1
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        message = reader.read().decode()
    _, wait_status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(wait_status) == 0 and not message, message


def settled(expected: tuple[int, int], uid: int) -> None:
    wait_until(lambda: key_user(uid) == expected,
               lambda: f"uid {uid} key quota use {key_user(uid)}, {expected} expected")


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run as a uid of its own")
def test_the_quota_holds_the_cap_and_dropping_gives_every_byte_back() -> None:
    """A uid with the ordinary user key quota (200 keys, 20,000 bytes by default): the store
    keeps at most a quarter of it, each kept session costs exactly SESSION_QUOTA_BYTES, and
    dropping returns every byte (the store unlinks: an invalidated key's 4 link bytes would
    stay charged to the keyring)."""

    def work() -> None:
        before = key_user(QUOTA_UID)
        store = SessionStore(lifetime=600)  # in the child's own session keyring
        capacity = quota_capacity()
        assert capacity is not None and store.capacity == capacity < DEFAULT_MAX_KEPT_SESSIONS
        full = (before[0] + capacity, before[1] + capacity * SESSION_QUOTA_BYTES)
        ids: list[int] = []
        for _ in range(5):  # rounds of evictions; the kernel destroys unlinked keys lazily
            ids += [store.save(SESSION, 1000) for _ in range(capacity)]
            assert store.kept == capacity
            settled(full, QUOTA_UID)
        for serial in ids:
            store.drop(serial)
        settled(before, QUOTA_UID)

    in_child_as(QUOTA_UID, work)


def test_the_default_cap_fits_well_inside_the_key_quota() -> None:
    capacity = quota_capacity()
    assert capacity is not None
    store = SessionStore()
    assert store.capacity == min(DEFAULT_MAX_KEPT_SESSIONS, capacity)
    prefix = "root_" if os.geteuid() == 0 else ""
    maxbytes = int(Path(f"/proc/sys/kernel/keys/{prefix}maxbytes").read_text())
    maxkeys = int(Path(f"/proc/sys/kernel/keys/{prefix}maxkeys").read_text())
    assert store.capacity * SESSION_QUOTA_BYTES <= maxbytes // QUOTA_SHARE
    assert store.capacity <= maxkeys // QUOTA_SHARE


def test_hundreds_of_service_handshakes_keep_at_most_the_cap(quiet_ring: int) -> None:
    """300 handshakes (150 pairs, both ends ask to keep) of one uid with a cap of 8; 20 more
    that do not ask keep nothing. An evicted session id answers ENOKEY to a key update; the
    newest still updates."""
    store = SessionStore(keyring_id=quiet_ring, lifetime=600, max_per_owner=8)

    async def pair(path: str, keep: bool) -> tuple[int, int, object, object]:
        a, b = tcp_pair()
        psk = [("kept", PSK)]
        da, db = await asyncio.gather(
            submit(a, role="client", auth="psk", psk=psk, service_path=path, keep_session=keep),
            submit(b, role="server", auth="psk", psk=psk, service_path=path, keep_session=keep),
        )
        assert (da.status, db.status) == (0, 0), (da.reason, db.reason)
        return da.session_id, db.session_id, a, b

    async def main(path: str) -> None:
        async with running_agent(path, AgentSettings(max_concurrent=16), store=store):
            first_a, _, a0, b0 = await pair(path, True)
            held = [a0, b0]
            for _ in range(149 // 10 + 1):
                batch = await asyncio.gather(*(pair(path, True) for _ in range(10)))
                for _, _, a, b in batch:
                    a.close()  # type: ignore[attr-defined]
                    b.close()  # type: ignore[attr-defined]
            assert len(keyring.list_keyring(quiet_ring)) == 8
            unkept = await asyncio.gather(*(pair(path, False) for _ in range(10)))
            assert {(ida, idb) for ida, idb, _, _ in unkept} == {(0, 0)}
            for _, _, a, b in unkept:
                a.close()  # type: ignore[attr-defined]
                b.close()  # type: ignore[attr-defined]
            last_a, _, a1, b1 = await pair(path, True)
            held += [a1, b1]
            assert len(keyring.list_keyring(quiet_ring)) == 8
            done = await key_update(a0, role="client", session_id=first_a,
                                    record_seqs=(0, 0), service_path=path)
            assert done.status == errno.ENOKEY, done.reason
            done = await key_update(a1, role="client", session_id=last_a,
                                    record_seqs=(0, 0), service_path=path)
            assert done.status == 0, done.reason
            for sock in held:
                sock.close()  # type: ignore[attr-defined]

    run(main(str(Path(os.environ.get("TMPDIR", "/tmp")) / f"ktlsd-kept-{os.getpid()}.sock")),
        120)


def test_keep_session_travels_as_submit_attribute_112() -> None:
    from ktlsd.client import build_request
    from ktlsd.upcall.nlattr import decode_attrs, decode_genl, u32
    from ktlsd.upcall.wire import SubmitAttr, decode_submit, encode_submit

    for keep in (False, True):
        request = build_request(role="client", auth="psk", psk=[("id", PSK)], keep_session=keep)
        message = encode_submit(request)
        attrs = decode_attrs(decode_genl(message).attrs)
        assert ((SubmitAttr.KEEP_SESSION, u32(1)) in attrs) is keep
        assert SubmitAttr.KEEP_SESSION == 112
        assert decode_submit(message, sockfd=3)[1].keep_session is keep
