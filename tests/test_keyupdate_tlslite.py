"""KeyUpdates started by an independent implementation (tlslite-ng) towards ktlsd.

tlslite-ng is the client (SHA-384 external PSK, which only it does among our peers); ktlsd's
engine is the server and hands the session to its user-space record layer and
:class:`~ktlsd.tls.connection.TlsConnection`, which echoes everything back. tlslite-ng sends
KeyUpdates with both ``request_update`` values between data; ktlsd must follow each one, answer
exactly the ones that asked, and end with the same traffic secrets as tlslite-ng.
"""

from __future__ import annotations

import hmac
import os
import socket
import threading

from tlslite.api import HandshakeSettings, TLSConnection
from tlslite.constants import KeyUpdateMessageType

from ktlsd.tls.connection import TlsConnection
from ktlsd.tls.handshake import PskKey, TlsConfig, handshake_blocking
from ktlsd.tls.record import UserRecordLayer
from ktlsd.tls.session import CipherSuite, Role

IDENTITY = b"ktlsd-tlslite-keyupdate"
REQUESTS = [
    KeyUpdateMessageType.update_not_requested,
    KeyUpdateMessageType.update_requested,
    KeyUpdateMessageType.update_requested,
    KeyUpdateMessageType.update_not_requested,
    KeyUpdateMessageType.update_requested,
]


def test_tlslite_initiated_key_updates_with_both_request_values() -> None:
    key = os.urandom(48)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    peer: dict[str, object] = {}

    def tlslite_client() -> None:
        settings = HandshakeSettings()
        settings.minVersion = settings.maxVersion = (3, 4)
        settings.pskConfigs = [(IDENTITY, key, "sha384")]
        tls = TLSConnection(socket.create_connection(("127.0.0.1", port)))
        tls.handshakeClientCert(settings=settings)
        echoed = bytearray()
        sent = bytearray()
        for i, kind in enumerate(REQUESTS):
            before, after = os.urandom(3000 + i), os.urandom(5000 + i)
            tls.write(before)
            for _ in tls.send_keyupdate_request(kind):
                pass
            tls.write(after)
            sent += before + after
            while len(echoed) < len(sent):  # reading also processes ktlsd's answers
                echoed += tls.read(max=65536, min=1)
        peer["sent"], peer["echoed"] = bytes(sent), bytes(echoed)
        peer["secrets"] = (tls.session.cl_app_secret, tls.session.sr_app_secret)
        tls.close()

    thread = threading.Thread(target=tlslite_client)
    thread.start()
    sock, _ = listener.accept()
    listener.close()
    with sock:
        config = TlsConfig(
            role=Role.SERVER,
            psk_lookup=lambda offered: (
                PskKey(IDENTITY, key, "sha384") if offered == IDENTITY else None
            ),
        )
        session = handshake_blocking(sock, config, timeout=10)
        assert session.suite is CipherSuite.TLS_AES_256_GCM_SHA384
        conn = TlsConnection(UserRecordLayer(sock, session), session)
        while data := conn.recv(65536):
            conn.send(data)
        thread.join(30)
        assert not thread.is_alive()
        assert peer["echoed"] == peer["sent"]
        assert conn.key_updates_received == len(REQUESTS)
        requested = sum(k == KeyUpdateMessageType.update_requested for k in REQUESTS)
        assert conn.key_updates_sent == requested  # exactly the ones that asked got an answer
        mine = conn.session
        theirs_client, theirs_server = peer["secrets"]  # type: ignore[misc]
        assert mine.client_generation == len(REQUESTS) and mine.server_generation == requested
        assert hmac.compare_digest(mine.client_secret, theirs_client)
        assert hmac.compare_digest(mine.server_secret, theirs_server)
