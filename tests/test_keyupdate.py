"""Issue 5 acceptance on the host: KeyUpdate end to end through the handshake service.

Two parts:

* Two consumers get their sessions from the real agent and run the user-space record layer
  (``TlsConnection``). 1,000 KeyUpdates, initiated and requested, crossed, interleaved with
  data both ways, go through a relay that captures every byte. The test then decrypts both
  captured streams with keys it derives itself (``cryptography``'s HKDFExpand and AEADs, not
  ktlsd's key schedule), which proves byte-exactness and that both ends moved in lock step.
* The kernel-message path (the proposed ``clientkeyupdate``/``serverkeyupdate`` upcall):
  a consumer that behaves like nvme-tcp with a user-space record layer asks the agent for
  SEND / RECEIVED / RECEIVED_REQUEST_UPDATE updates by session id and installs the secrets
  DONE returns; the other end is a plain ``TlsConnection``.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import os
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from ktlsd import keyring
from ktlsd.client import connection_from_done, key_update, submit
from ktlsd.request import (
    AuthMode,
    ConsumerCredentials,
    HandshakeDone,
    HandshakeRequest,
    KeyUpdateType,
    MessageType,
)
from ktlsd.session_store import SessionStore
from ktlsd.settings import AgentSettings
from ktlsd.tls.connection import TlsConnection
from ktlsd.tls.record import UserRecordLayer
from ktlsd.tls.session import Session
from tests.agent_helpers import DirectRequest, GatedRelay, LogLines, running_agent, tcp_pair
from tests.waiting import run

PSK_256 = bytes.fromhex("7e" * 32)
PSK_384 = bytes.fromhex("e7" * 48)


@pytest.fixture
def store(ring: int) -> SessionStore:
    """Kept sessions in a keyring of the test's own (``ring``), revoked afterwards."""
    return SessionStore(keyring_id=ring, lifetime=120)


# --- an independent TLS 1.3 record decryptor (RFC 8446 §7.1, §7.2, §7.3, §5.2) ----------------


SUITES = {
    # IANA name: (hash, AEAD, key length)
    "TLS_AES_128_GCM_SHA256": (hashes.SHA256, AESGCM, 16),
    "TLS_AES_256_GCM_SHA384": (hashes.SHA384, AESGCM, 32),
    "TLS_CHACHA20_POLY1305_SHA256": (hashes.SHA256, ChaCha20Poly1305, 32),
}


def expand_label(suite: str, secret: bytes, label: str, length: int) -> bytes:
    """HKDF-Expand-Label(secret, label, "", length) written out from RFC 8446 §7.1."""
    full = b"tls13 " + label.encode()
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(SUITES[suite][0](), length, info).derive(secret)


def next_secret(suite: str, secret: bytes) -> bytes:
    return expand_label(suite, secret, "traffic upd", len(secret))


def same(a: bytes, b: bytes) -> bool:
    """Secrets compared in constant time; a failing assert never prints them."""
    return hmac.compare_digest(a, b)


def secret_at(suite: str, secret: bytes, generation: int) -> bytes:
    for _ in range(generation):
        secret = next_secret(suite, secret)
    return secret


@dataclass
class Decrypted:
    """What one direction of a captured connection carried, as the test decrypts it."""

    application: bytearray = field(default_factory=bytearray)
    key_updates: list[int] = field(default_factory=list)  # request_update value of each
    records: int = 0
    generation: int = 0


def decrypt_stream(suite: str, secret: bytes, wire: bytes) -> Decrypted:
    """Decrypt one direction from the handshake's first application traffic secret on.

    Records before the first one that opens under that secret belong to the handshake (plain
    hellos, records under handshake keys the test does not have) and are skipped; from there
    on every record must open, and each KeyUpdate moves to the next secret, sequence 0.
    """
    _, aead_type, key_length = SUITES[suite]
    out = Decrypted()

    def keys(current: bytes) -> tuple[Any, bytes]:
        return (aead_type(expand_label(suite, current, "key", key_length)),
                expand_label(suite, current, "iv", 12))

    aead, iv = keys(secret)
    seq = 0
    started = False
    pos = 0
    while pos < len(wire):
        assert len(wire) - pos >= 5, "truncated record header"
        header = wire[pos : pos + 5]
        length = int.from_bytes(header[3:5], "big")
        body = wire[pos + 5 : pos + 5 + length]
        assert len(body) == length, "truncated record"
        pos += 5 + length
        if header[0] != 23:
            assert not started, f"plaintext record of type {header[0]} after the handshake"
            continue
        nonce = bytes(a ^ b for a, b in zip(iv, seq.to_bytes(12, "big"), strict=True))
        try:
            inner = aead.decrypt(nonce, body, header)
        except InvalidTag:
            assert not started, f"record {seq} of generation {out.generation} does not open"
            continue
        started = True
        seq += 1
        out.records += 1
        stripped = inner.rstrip(b"\x00")
        content_type, plain = stripped[-1], stripped[:-1]
        if content_type == 23:
            out.application += plain
        elif content_type == 22 and plain[:1] == b"\x18":
            assert len(plain) == 5 and plain[1:4] == b"\x00\x00\x01", plain.hex()
            out.key_updates.append(plain[4])
            secret = next_secret(suite, secret)
            out.generation += 1
            aead, iv = keys(secret)
            seq = 0
        elif content_type == 22 and plain[:1] == b"\x04":
            pass  # NewSessionTicket
        else:
            raise AssertionError(f"unexpected record type {content_type} after the handshake")
    assert started, "no record opened under the first application traffic secret"
    return out


def test_the_independent_decryptor_matches_rfc_8448() -> None:
    """RFC 8448 §3: the server's first application traffic secret gives this key and IV."""
    secret = bytes.fromhex("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")
    assert expand_label("TLS_AES_128_GCM_SHA256", secret, "key", 16) == bytes.fromhex(
        "9f02283b6c9c07efc26bb9f2ac92e356")
    assert expand_label("TLS_AES_128_GCM_SHA256", secret, "iv", 12) == bytes.fromhex(
        "cf782b88dd83549aadf1e984")


# --- part 1: 1,000 KeyUpdates between two user-space record layers --------------------------


async def read_exactly(conn: TlsConnection, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = await conn.arecv()
        assert chunk, "unexpected end of stream"
        data += chunk
    return data


def assert_lock_step(a: TlsConnection, b: TlsConnection) -> None:
    sa, sb = a.session, b.session
    assert (sa.client_generation, sa.server_generation) == (
        sb.client_generation, sb.server_generation)
    assert same(sa.client_secret, sb.client_secret) and same(sa.server_secret, sb.server_secret)


@pytest.mark.parametrize(
    ("psk", "suites", "target"),
    [((PSK_384, "sha384"), (), 1000),
     ((PSK_256, "sha256"), ("TLS_CHACHA20_POLY1305_SHA256",), 200)],
    ids=["aes256-1000", "chacha-200"],
)
def test_key_updates_interleaved_with_data_through_the_service(
    sock_path: str, psk: tuple[bytes, str], suites: tuple[str, ...], target: int,
) -> None:
    async def main() -> None:
        relay = GatedRelay(opened=True)
        async with running_agent(sock_path, AgentSettings(keep_sessions=False)):
            a, b = await relay.connect()
            try:
                spec = [("lock-step", psk[0], psk[1])]
                da, db = await asyncio.gather(
                    submit(a, role="client", auth="psk", psk=spec, ciphersuites=suites,
                           service_path=sock_path),
                    submit(b, role="server", auth="psk", psk=spec, ciphersuites=suites,
                           service_path=sock_path),
                )
                assert (da.status, da.reason, db.status, db.reason) == (0, "", 0, "")
                assert da.session is not None
                suite = da.session.suite.iana_name
                first = da.session
                client = connection_from_done(a, da, record_layer="user")
                server = connection_from_done(b, db, record_layer="user")
                sent = {"c2s": bytearray(), "s2c": bytearray()}

                async def send(conn: TlsConnection, data: bytes) -> None:
                    await conn.asend(data)
                    sent["c2s" if conn is client else "s2c"] += data

                def total() -> int:
                    return client.key_updates_sent + server.key_updates_sent

                rounds = 0
                while total() < target:
                    rounds += 1
                    one, other = (client, server) if rounds % 2 else (server, client)
                    size = 1 + (rounds * 7919) % 3000
                    msg1 = os.urandom(size)
                    msg2 = os.urandom(size // 2 + 1)
                    if rounds % 11 == 0:  # both ask at once: the KeyUpdates cross
                        await one.akey_update(request_peer=True)
                        await other.akey_update(request_peer=True)
                        await send(one, msg1)
                        await send(other, msg2)
                        assert await read_exactly(other, len(msg1)) == msg1
                        assert await read_exactly(one, len(msg2)) == msg2
                    else:
                        await one.akey_update(request_peer=rounds % 3 == 0)
                        await send(one, msg1)
                        assert await read_exactly(other, len(msg1)) == msg1
                        await send(other, msg2)
                        assert await read_exactly(one, len(msg2)) == msg2
                    assert_lock_step(client, server)
                    if rounds % 5 == 0:  # a big write split over several records
                        big = os.urandom(40_000)
                        await send(other, big)
                        assert await read_exactly(one, len(big)) == big
                # Every requested update was answered and nothing is left in flight.
                await send(client, b"end")
                assert await read_exactly(server, 3) == b"end"
                await send(server, b"END")
                assert await read_exactly(client, 3) == b"END"
                assert_lock_step(client, server)
                final = client.session
                assert total() >= target
                assert final.client_generation == client.key_updates_sent
                assert final.server_generation == server.key_updates_sent
                requested = sum(1 for r in range(1, rounds + 1) if r % 3 == 0 or r % 11 == 0)
                # Each request was answered exactly once (crossed requests answer each other).
                assert total() == rounds + requested
                # Independent derivation of the final secrets from the handshake's.
                assert same(final.client_secret, secret_at(  # type: ignore[union-attr]
                    suite, first.client_secret, final.client_generation))
                assert same(final.server_secret, secret_at(  # type: ignore[union-attr]
                    suite, first.server_secret, final.server_generation))
                # Decrypt what went over the wire, both directions, with our own keys.
                c2s = decrypt_stream(suite, first.client_secret, bytes(relay.captured["c2s"]))
                s2c = decrypt_stream(suite, first.server_secret, bytes(relay.captured["s2c"]))
                assert c2s.application == sent["c2s"] and s2c.application == sent["s2c"]
                assert (c2s.generation, s2c.generation) == (
                    final.client_generation, final.server_generation)
                assert len(c2s.key_updates) == client.key_updates_sent
                assert len(s2c.key_updates) == server.key_updates_sent
                assert 1 in c2s.key_updates and 0 in c2s.key_updates
                assert 1 in s2c.key_updates and 0 in s2c.key_updates
            finally:
                a.close()
                b.close()
                await relay.aclose()

    run(main(), limit=60)


# --- part 2: the kernel-message path (proposed clientkeyupdate/serverkeyupdate) ------------


@dataclass
class KernelStyleConsumer:
    """What nvme-tcp would do with a user-space record layer: records itself, KeyUpdates
    through the agent by session id, secrets from DONE installed into its layer."""

    sock: socket.socket
    layer: UserRecordLayer
    session_id: int
    path: str
    role: str = "client"
    state: Session | None = None

    async def update(self, kind: KeyUpdateType, *, request_peer: bool = False,
                     install: bool = True) -> HandshakeDone:
        done = await key_update(self.sock, role=self.role, session_id=self.session_id,
                                key_update_type=kind, request_peer_update=request_peer,
                                record_seqs=self.layer.sequence_numbers(),
                                service_path=self.path)
        if done.status == 0 and install:
            self.install(kind, done)
        return done

    def install(self, kind: KeyUpdateType, done: HandshakeDone) -> None:
        assert done.session is not None
        new = done.session
        if kind in (KeyUpdateType.RECEIVED, KeyUpdateType.RECEIVED_REQUEST_UPDATE):
            self.layer.install_rx_key(new.rx_secret, 0)
        if kind in (KeyUpdateType.SEND, KeyUpdateType.RECEIVED_REQUEST_UPDATE):
            self.layer.install_tx_key(new.tx_secret, 0)
        self.state = new


@dataclass
class KernelStylePair:
    consumer: KernelStyleConsumer
    peer: TlsConnection
    first: Session
    suite: str


async def kernel_style_pair(path: str, a: socket.socket, b: socket.socket,
                            role: str = "client") -> KernelStylePair:
    """Handshake through the agent; ``a`` becomes the kernel-style consumer in ``role``."""
    psk = [("kernel-style", PSK_256)]
    other = "server" if role == "client" else "client"
    da, db = await asyncio.gather(
        submit(a, role=role, auth="psk", psk=psk, service_path=path, keep_session=True),
        submit(b, role=other, auth="psk", psk=psk, service_path=path),
    )
    assert (da.status, da.reason, db.status, db.reason) == (0, "", 0, "")
    assert da.session is not None and da.session_id > 0
    for sock in (a, b):
        # A KeyUpdate record and the data record after it are two writes; with Nagle the
        # second waits for the peer's delayed ACK (40 ms on Linux) every time.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    a.setblocking(False)
    consumer = KernelStyleConsumer(a, UserRecordLayer(a, da.session), da.session_id, path,
                                   role, da.session)
    peer = connection_from_done(b, db, record_layer="user")
    return KernelStylePair(consumer, peer, da.session, da.session.suite.iana_name)


async def expect_key_update_then_expired(layer: UserRecordLayer) -> int:
    """Read the peer's KeyUpdate record; the next read must fail with EKEYEXPIRED (the
    kernel's rule). Returns the record's request_update value."""
    record = await layer.arecv()
    assert record.content_type == 22 and record.data[:1] == b"\x18", record
    with pytest.raises(OSError) as info:
        await layer.arecv()
    assert info.value.errno == errno.EKEYEXPIRED
    return record.data[4]


def generations(state: Session | None) -> tuple[int, int]:
    assert state is not None
    return state.client_generation, state.server_generation


@pytest.mark.parametrize("request_peer", [False, True], ids=["not-requested", "requested"])
def test_send_emits_a_key_update_the_peer_processes(
    sock_path: str, store: SessionStore, request_peer: bool
) -> None:
    async def main() -> None:
        async with running_agent(sock_path, store=store):
            a, b = tcp_pair()
            with a, b:
                pair = await kernel_style_pair(sock_path, a, b)
                me, peer = pair.consumer, pair.peer
                done = await me.update(KeyUpdateType.SEND, request_peer=request_peer)
                assert done.status == 0, done.reason
                assert done.session_id == me.session_id
                assert generations(me.state) == (1, 0)
                assert same(me.state.client_secret, secret_at(  # type: ignore[union-attr]
                    pair.suite, pair.first.client_secret, 1))
                assert same(me.state.server_secret, pair.first.server_secret)  # type: ignore[union-attr]
                await me.layer.asend(b"under generation 1")
                assert await peer.arecv() == b"under generation 1"
                assert peer.key_updates_received == 1
                assert same(peer.session.client_secret, me.state.client_secret)  # type: ignore[union-attr]
                await peer.asend(b"reply")
                if request_peer:
                    # The peer answered the request with its own update_not_requested update.
                    assert await expect_key_update_then_expired(me.layer) == 0
                    done = await me.update(KeyUpdateType.RECEIVED)
                    assert done.status == 0, done.reason
                    assert generations(me.state) == (1, 1)
                    assert peer.key_updates_sent == 1
                assert (await me.layer.arecv()).data == b"reply"
                assert generations(me.state) == generations(peer.session)
                kept = store.load(me.session_id, owner=os.getuid())
                assert generations(kept) == generations(me.state)

    run(main())


def test_received_installs_the_next_rx_key_and_reads_resume(
    sock_path: str, store: SessionStore
) -> None:
    async def main() -> None:
        async with running_agent(sock_path, store=store):
            a, b = tcp_pair()
            with a, b:
                pair = await kernel_style_pair(sock_path, a, b, role="server")
                me, peer = pair.consumer, pair.peer
                await peer.akey_update(request_peer=False)
                await peer.asend(b"after the peer's update")
                assert await expect_key_update_then_expired(me.layer) == 0
                with pytest.raises(OSError):  # still paused: nothing installed yet
                    await me.layer.arecv()
                done = await me.update(KeyUpdateType.RECEIVED)
                assert done.status == 0, done.reason
                # The consumer is the server here: the client's (peer's) secret advanced.
                assert generations(me.state) == (1, 0)
                assert same(me.state.client_secret, secret_at(  # type: ignore[union-attr]
                    pair.suite, pair.first.client_secret, 1))
                assert (await me.layer.arecv()).data == b"after the peer's update"
                await me.layer.asend(b"tx key unchanged")
                assert await peer.arecv() == b"tx key unchanged"

    run(main())


def test_received_request_update_moves_both_directions(
    sock_path: str, store: SessionStore
) -> None:
    async def main() -> None:
        async with running_agent(sock_path, store=store):
            a, b = tcp_pair()
            with a, b:
                pair = await kernel_style_pair(sock_path, a, b)
                me, peer = pair.consumer, pair.peer
                await peer.akey_update(request_peer=True)
                await peer.asend(b"please update")
                assert await expect_key_update_then_expired(me.layer) == 1
                done = await me.update(KeyUpdateType.RECEIVED_REQUEST_UPDATE)
                assert done.status == 0, done.reason
                assert generations(me.state) == (1, 1)
                assert (await me.layer.arecv()).data == b"please update"
                await me.layer.asend(b"updated both")
                assert await peer.arecv() == b"updated both"
                # The peer saw our KeyUpdate, and it said update_not_requested: the peer
                # sends data without another KeyUpdate of its own.
                assert peer.key_updates_received == 1 and peer.key_updates_sent == 1
                await peer.asend(b"no second update")
                record = await me.layer.arecv()
                assert (record.content_type, record.data) == (23, b"no second update")
                assert peer.key_updates_sent == 1
                assert generations(peer.session) == (1, 1)
                assert same(peer.session.client_secret, me.state.client_secret)  # type: ignore[union-attr]
                assert same(peer.session.server_secret, me.state.server_secret)  # type: ignore[union-attr]

    run(main())


def test_a_hundred_kernel_style_updates_each_advance_exactly_once(
    sock_path: str, store: SessionStore
) -> None:
    """Cycles of SEND (both request values), RECEIVED and RECEIVED_REQUEST_UPDATE; after each
    the consumer's secrets equal the independent derivation at the expected generations."""

    async def main() -> None:
        async with running_agent(sock_path, store=store):
            a, b = tcp_pair()
            with a, b:
                pair = await kernel_style_pair(sock_path, a, b)
                me, peer = pair.consumer, pair.peer
                expected = [0, 0]
                for i in range(100):
                    step = i % 4
                    if step in (0, 1):
                        done = await me.update(KeyUpdateType.SEND, request_peer=step == 1)
                        expected[0] += 1
                        await me.layer.asend(b"c%d" % i)
                        assert await peer.arecv() == b"c%d" % i
                        await peer.asend(b"s%d" % i)
                        if step == 1:
                            assert await expect_key_update_then_expired(me.layer) == 0
                            done = await me.update(KeyUpdateType.RECEIVED)
                            expected[1] += 1
                    else:
                        await peer.akey_update(request_peer=step == 3)
                        await peer.asend(b"s%d" % i)
                        assert await expect_key_update_then_expired(me.layer) == (step == 3)
                        kind = (KeyUpdateType.RECEIVED_REQUEST_UPDATE if step == 3
                                else KeyUpdateType.RECEIVED)
                        done = await me.update(kind)
                        expected[1] += 1
                        expected[0] += step == 3
                        await me.layer.asend(b"c%d" % i)
                        assert await peer.arecv() == b"c%d" % i
                    assert done.status == 0, done.reason
                    assert (await me.layer.arecv()).data == b"s%d" % i
                    assert list(generations(me.state)) == expected
                    state = me.state
                    assert state is not None
                    assert same(state.client_secret, secret_at(  # type: ignore[union-attr]
                        pair.suite, pair.first.client_secret, expected[0]))
                    assert same(state.server_secret, secret_at(  # type: ignore[union-attr]
                        pair.suite, pair.first.server_secret, expected[1]))
                    assert generations(peer.session) == tuple(expected)
                assert expected == [75, 75]

    run(main())


def test_unknown_expired_dropped_and_foreign_session_ids_get_enokey(
    sock_path: str, store: SessionStore
) -> None:
    async def main() -> None:
        logs = LogLines()
        async with running_agent(sock_path, store=store):
            a, b = tcp_pair()
            with a, b:
                pair = await kernel_style_pair(sock_path, a, b)
                me = pair.consumer
                not_a_session = keyring.add_key("user", "ktlsd:session:forged", b"KTLSD-S1xx",
                                                store.keyring_id)
                other_key = keyring.add_key("user", "some other key", b"x", store.keyring_id)
                with logs.attached():
                    for session_id in (0x7FFF_FFF0, not_a_session, other_key):
                        done = await key_update(a, role="client", session_id=session_id,
                                                record_seqs=me.layer.sequence_numbers(),
                                                service_path=sock_path)
                        assert done.status == errno.ENOKEY, (session_id, done.reason)
                        assert "unknown or expired" in done.reason
                    # A client-side session asked for as a server's is refused too.
                    done = await key_update(a, role="server", session_id=me.session_id,
                                            record_seqs=me.layer.sequence_numbers(),
                                            service_path=sock_path)
                    assert done.status == errno.EINVAL, done.reason
                    # Expired: the key's lifetime ran out (1 s, the keyring's smallest).
                    keyring.set_timeout(me.session_id, 1)
                    while True:
                        try:
                            keyring.describe_key(me.session_id)
                        except keyring.KeyringError:
                            break
                        await asyncio.sleep(0.05)
                    done = await me.update(KeyUpdateType.SEND)
                    assert done.status == errno.ENOKEY, done.reason
                lines = logs.handshake_lines()
                assert len(lines) == 5 and all("status=0" not in line for line in lines)
                # Dropped (the connection ended): a second pair's session, dropped by the agent.
            c, d = tcp_pair()
            with c, d:
                other = await kernel_style_pair(sock_path, c, d)
                store.drop(other.consumer.session_id)
                done = await other.consumer.update(KeyUpdateType.SEND)
                assert done.status == errno.ENOKEY, done.reason
                # The connection itself is unharmed: no KeyUpdate was sent.
                await other.consumer.layer.asend(b"still generation 0")
                assert await other.peer.arecv() == b"still generation 0"

    run(main())


async def until_not_busy(work: Any) -> HandshakeDone:
    """What a consumer does with EBUSY (its socket already has a request): ask again once the
    other request is answered."""
    while True:
        done = await work()
        if done.status != errno.EBUSY:
            return done
        await asyncio.sleep(0.005)


def check_both_took_effect(first: HandshakeDone, second: HandshakeDone, rounds: int) -> Session:
    """One update ran first and moved one direction; the other started from its result."""
    gens = sorted([generations(first.session), generations(second.session)])
    assert gens[-1] == (rounds, rounds), gens
    assert gens[0] in ((rounds, rounds - 1), (rounds - 1, rounds)), gens
    last = first if generations(first.session) == gens[-1] else second
    assert last.session is not None
    return last.session


def test_concurrent_send_and_received_through_the_service_both_take_effect(
    sock_path: str, store: SessionStore
) -> None:
    """The service, like the kernel, holds one request per socket (the second gets EBUSY and
    is asked again); both updates take effect, each direction exactly once."""

    async def main() -> None:
        async with running_agent(sock_path, store=store):
            a, b = tcp_pair()
            with a, b:
                pair = await kernel_style_pair(sock_path, a, b)
                me, peer = pair.consumer, pair.peer
                for rounds in range(1, 6):
                    await peer.akey_update(request_peer=False)
                    await peer.asend(b"peer %d" % rounds)
                    assert await expect_key_update_then_expired(me.layer) == 0
                    send, received = await asyncio.gather(
                        until_not_busy(lambda: me.update(KeyUpdateType.SEND, install=False)),
                        until_not_busy(lambda: me.update(KeyUpdateType.RECEIVED,
                                                         install=False)),
                    )
                    assert (send.status, received.status) == (0, 0), (send.reason,
                                                                      received.reason)
                    last = check_both_took_effect(send, received, rounds)
                    assert generations(store.load(me.session_id, owner=os.getuid())) == (
                        rounds, rounds)
                    me.layer.install_tx_key(last.client_secret, 0)
                    me.layer.install_rx_key(last.server_secret, 0)
                    assert (await me.layer.arecv()).data == b"peer %d" % rounds
                    await me.layer.asend(b"me %d" % rounds)
                    assert await peer.arecv() == b"me %d" % rounds
                    assert generations(peer.session) == (rounds, rounds)
                    assert same(peer.session.client_secret, secret_at(  # type: ignore[union-attr]
                        pair.suite, pair.first.client_secret, rounds))

    run(main())


def test_updates_of_one_session_arriving_at_once_are_serialised_by_the_agent(
    sock_path: str, store: SessionStore
) -> None:
    """SEND and RECEIVED for one session from two requests at the same time (no per-socket
    limit in the way): both complete, each direction advances exactly once."""

    async def main() -> None:
        async with running_agent(sock_path, store=store) as agent:
            a, b = tcp_pair()
            with a, b:
                pair = await kernel_style_pair(sock_path, a, b)
                me, peer = pair.consumer, pair.peer
                creds = ConsumerCredentials(os.getpid(), os.getuid(), os.getgid())
                for rounds in range(1, 6):
                    await peer.akey_update(request_peer=False)
                    await peer.asend(b"peer %d" % rounds)
                    assert await expect_key_update_then_expired(me.layer) == 0
                    requests = [
                        DirectRequest(HandshakeRequest(
                            sockfd=os.dup(a.fileno()), message_type=MessageType.CLIENTKEYUPDATE,
                            auth_mode=AuthMode.PSK, key_update_type=kind,
                            session_id=me.session_id,
                            record_seqs=me.layer.sequence_numbers()), credentials=creds)
                        for kind in (KeyUpdateType.SEND, KeyUpdateType.RECEIVED)
                    ]
                    answers = await asyncio.gather(*(agent.serve(r) for r in requests))
                    assert [r.answers for r in requests] == [[x] for x in answers]
                    assert [x.status for x in answers] == [0, 0], [x.reason for x in answers]
                    last = check_both_took_effect(answers[0], answers[1], rounds)
                    me.layer.install_tx_key(last.client_secret, 0)
                    me.layer.install_rx_key(last.server_secret, 0)
                    assert (await me.layer.arecv()).data == b"peer %d" % rounds
                    await me.layer.asend(b"me %d" % rounds)
                    assert await peer.arecv() == b"me %d" % rounds
                    assert generations(peer.session) == (rounds, rounds)

    run(main())


def test_a_session_dropped_while_its_update_waits_still_gets_the_new_secrets(
    sock_path: str, store: SessionStore
) -> None:
    """The KeyUpdate record waits for room on the socket; meanwhile the kept state is
    dropped. The update still succeeds (the record went out, the consumer needs its new key),
    DONE's session id is 0 ("not kept"), no stray key with the new secrets is left behind,
    and the next update gets ENOKEY."""

    async def main() -> None:
        logs = LogLines()
        async with running_agent(sock_path, store=store) as agent:
            a, b = tcp_pair()
            with a, b, logs.attached():
                pair = await kernel_style_pair(sock_path, a, b)
                me, peer = pair.consumer, pair.peer
                b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                filled = bytearray()
                quiet = 0
                while quiet < 10:  # until the zero window holds
                    try:
                        filled += b"\0" * a.send(b"\0" * 4096)
                        quiet = 0
                    except BlockingIOError:
                        quiet += 1
                        await asyncio.sleep(0.02)
                seqs = me.layer.sequence_numbers()
                request = DirectRequest(HandshakeRequest(
                    sockfd=os.dup(a.fileno()), message_type=MessageType.CLIENTKEYUPDATE,
                    auth_mode=AuthMode.PSK, key_update_type=KeyUpdateType.SEND,
                    session_id=me.session_id, record_seqs=seqs),
                    credentials=ConsumerCredentials(os.getpid(), os.getuid(), os.getgid()))
                def taken() -> int:
                    return sum(m.startswith("request taken") for m in logs.messages)

                earlier = taken()  # the handshakes'
                serving = asyncio.create_task(agent.serve(request))
                while taken() == earlier:  # serve() runs to its first real wait at once
                    await asyncio.sleep(0)
                assert not serving.done()  # parked: the socket has no room
                before = set(keyring.list_keyring(store.keyring_id))
                store.drop(me.session_id)
                drained = 0
                b.setblocking(False)
                loop = asyncio.get_running_loop()
                while drained < len(filled):
                    drained += len(await loop.sock_recv(b, 65536))
                done = await asyncio.wait_for(serving, 10)
                assert done.status == 0 and done.session_id == 0, done.reason
                assert done.session is not None and generations(done.session) == (1, 0)
                assert set(keyring.list_keyring(store.keyring_id)) <= before - {me.session_id}
                assert any("not kept" in m for m in logs.messages)
                me.install(KeyUpdateType.SEND, done)
                await me.layer.asend(b"after")
                assert await peer.arecv() == b"after"  # the KeyUpdate reached the peer
                assert peer.key_updates_received == 1
                again = await me.update(KeyUpdateType.SEND)
                assert again.status == errno.ENOKEY

    run(main())


def test_a_consumer_can_forget_its_session_when_the_connection_ends(
    sock_path: str, store: SessionStore
) -> None:
    """forget_session drops the kept secrets at once (not after the lifetime); only the
    session's owner may do it, and afterwards the id is unknown (ENOKEY)."""
    from ktlsd.client import forget_session

    async def main() -> None:
        async with running_agent(sock_path, store=store):
            a, b = tcp_pair()
            with a, b:
                pair = await kernel_style_pair(sock_path, a, b)
                sid = pair.consumer.session_id
                assert keyring.describe_key(sid).description.startswith("ktlsd:session:")
                done = await forget_session(a, role="client", session_id=sid,
                                            service_path=sock_path)
                assert done.status == 0, done.reason
                with pytest.raises(keyring.KeyringError):
                    keyring.describe_key(sid)
                again = await forget_session(a, role="client", session_id=sid,
                                             service_path=sock_path)
                assert again.status == errno.ENOKEY
                done = await pair.consumer.update(KeyUpdateType.SEND)
                assert done.status == errno.ENOKEY, done.reason

    run(main())
