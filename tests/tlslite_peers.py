"""The tlslite-ng peer processes the tests start (this file run as a script).

tlslite-ng is a small TLS 1.3 implementation, independent of OpenSSL and GnuTLS, and the only
one among the test peers that does external PSKs with SHA-384. The harness that starts these
processes and waits on their output is :mod:`tests.peers` and :mod:`tests.cli_peers`; this
script imports nothing from the tests, so it runs with only tlslite-ng on the path.

* ``tlslite-server|tlslite-client PORT IDENTITY_HEX KEY_HEX HASH``: one handshake, then echo
  one application record upper-cased (lets a test prove ktlsd's traffic secrets are right).
* ``tlslite-echo server|client PORT IDENTITY_HEX KEY_HEX HASH``: echo every record until the
  peer's close_notify, then close in turn and exit 0.
"""

from __future__ import annotations

import contextlib
import socket
import sys


def _tlslite_main(argv: list[str]) -> int:
    """Entry point of the tlslite-ng peer process."""
    from tlslite.api import HandshakeSettings, TLSConnection

    mode, port_text, identity_hex, key_hex, hash_name = argv
    settings = HandshakeSettings()
    settings.minVersion = (3, 4)
    settings.maxVersion = (3, 4)
    settings.pskConfigs = [(bytes.fromhex(identity_hex), bytes.fromhex(key_hex), hash_name)]
    settings.ticket_count = 0
    if mode == "tlslite-server":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", int(port_text)))
        listener.listen(1)
        print("READY", flush=True)
        sock, _ = listener.accept()
        listener.close()
        conn = TLSConnection(sock)
        conn.handshakeServer(settings=settings)
    else:
        sock = socket.create_connection(("127.0.0.1", int(port_text)))
        conn = TLSConnection(sock)
        conn.handshakeClientCert(settings=settings)
    print("HANDSHAKE-OK", conn.getCipherName(), flush=True)
    data = conn.read(max=16384)
    print("GOT", bytes(data).hex(), flush=True)
    conn.write(bytes(data).upper())
    with contextlib.suppress(Exception):
        conn.close()
    return 0



def _tlslite_echo_main(mode: str, port: str, identity: str, key: str, hash_name: str) -> int:
    from tlslite.api import HandshakeSettings, TLSConnection

    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    settings.pskConfigs = [(bytes.fromhex(identity), bytes.fromhex(key), hash_name)]
    settings.ticket_count = 0
    if mode == "server":
        with socket.socket() as listener:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", int(port)))
            listener.listen(1)
            sock, _ = listener.accept()
        conn = TLSConnection(sock)
        conn.handshakeServer(settings=settings)
    else:
        conn = TLSConnection(socket.create_connection(("127.0.0.1", int(port))))
        conn.handshakeClientCert(settings=settings)
    print("handshake", conn.getCipherName(), file=sys.stderr, flush=True)
    total = 0
    while data := conn.read(max=65536):
        conn.write(bytes(data))
        total += len(data)
    print("echoed", total, file=sys.stderr, flush=True)
    conn.close()
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["tlslite-echo"]:
        sys.exit(_tlslite_echo_main(*sys.argv[2:]))
    if sys.argv[1:2] in (["tlslite-server"], ["tlslite-client"]):
        sys.exit(_tlslite_main(sys.argv[1:]))
    sys.exit(f"unknown mode {sys.argv[1:2]}")
