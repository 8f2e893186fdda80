"""One post-handshake key state: advance_session, used by TlsConnection and the agent alike."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from ktlsd.keyupdate import plan_key_update
from ktlsd.request import KeyUpdateType, MessageType
from ktlsd.tls.connection import SendRecord, SwitchTxKey, TlsConnection
from ktlsd.tls.keyschedule import advance_session, next_traffic_secret
from ktlsd.tls.protocol import ContentType
from ktlsd.tls.record import UserRecordLayer
from ktlsd.tls.session import CipherSuite, Role, Session


def _pair(suite: CipherSuite) -> tuple[Session, Session]:
    c, s = os.urandom(suite.hash_length), os.urandom(suite.hash_length)
    return (
        Session(Role.CLIENT, suite, c, s, tx_seq=9, rx_seq=4, client_generation=2),
        Session(Role.SERVER, suite, c, s, tx_seq=4, rx_seq=9, client_generation=2),
    )


@pytest.mark.parametrize("role", list(Role))
def test_advance_moves_only_the_chosen_direction(role: Role) -> None:
    suite = CipherSuite.TLS_AES_256_GCM_SHA384
    client, server = _pair(suite)
    state = client if role is Role.CLIENT else server
    sent = advance_session(state, tx=True)
    assert sent.tx_secret == next_traffic_secret(suite, state.tx_secret)
    assert sent.tx_generation == state.tx_generation + 1 and sent.tx_seq == 0
    assert (sent.rx_secret, sent.rx_generation, sent.rx_seq) == (
        state.rx_secret,
        state.rx_generation,
        state.rx_seq,
    )
    read = advance_session(state, rx=True)
    assert read.rx_secret == next_traffic_secret(suite, state.rx_secret)
    assert read.rx_generation == state.rx_generation + 1 and read.rx_seq == 0
    assert (read.tx_secret, read.tx_seq) == (state.tx_secret, state.tx_seq)
    both = advance_session(state, tx=True, rx=True)
    assert (both.tx_secret, both.rx_secret) == (sent.tx_secret, read.rx_secret)


def test_advance_without_a_direction_is_refused() -> None:
    client, _ = _pair(CipherSuite.TLS_AES_128_GCM_SHA256)
    with pytest.raises(ValueError, match="tx, rx or both"):
        advance_session(client)


def test_the_two_ends_stay_in_lock_step() -> None:
    client, server = _pair(CipherSuite.TLS_CHACHA20_POLY1305_SHA256)
    after_client_sends = advance_session(client, tx=True)
    after_server_reads = advance_session(server, rx=True)
    assert after_client_sends.client_secret == after_server_reads.client_secret
    assert after_client_sends.client_generation == after_server_reads.client_generation == 3


def test_connection_and_agent_plan_reach_the_same_state() -> None:
    """A program's own KeyUpdate and the agent's plan for a kept session end up identical."""
    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    c, s = os.urandom(suite.hash_length), os.urandom(suite.hash_length)
    client, server = Session(Role.CLIENT, suite, c, s), Session(Role.SERVER, suite, c, s)
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    with a, b:
        sender = TlsConnection(UserRecordLayer(a, client), client)
        receiver = TlsConnection(UserRecordLayer(b, server), server)
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(receiver.recv()))
        reader.start()
        sender.key_update(request_peer=False)
        sender.send(b"after")
        reader.join(10)
        assert got == [b"after"]
        planned = plan_key_update(client, MessageType.CLIENTKEYUPDATE, KeyUpdateType.SEND)
        assert sender.session.client_secret == planned.new_state.client_secret
        assert sender.session.client_generation == planned.new_state.client_generation == 1
        read = plan_key_update(server, MessageType.SERVERKEYUPDATE, KeyUpdateType.RECEIVED)
        assert receiver.session.client_secret == read.new_state.client_secret
        assert receiver.session.client_generation == 1 and receiver.key_updates_received == 1


def test_actions_and_sessions_keep_secrets_out_of_repr() -> None:
    client, _ = _pair(CipherSuite.TLS_AES_256_GCM_SHA384)
    advanced = advance_session(client, tx=True, rx=True)
    for state in (client, advanced):
        text = repr(state)
        for secret in (state.client_secret, state.server_secret):
            assert secret.hex() not in text and repr(secret) not in text
    payload = b"application secret \x00\x01"
    action = SendRecord(ContentType.APPLICATION_DATA, payload)
    assert repr(action) == f"SendRecord(APPLICATION_DATA, <{len(payload)} bytes>)"
    assert repr(SwitchTxKey(True)) == "SwitchTxKey(request_peer=True)"
