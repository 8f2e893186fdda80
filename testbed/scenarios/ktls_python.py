"""ktls-python: ktlsd's kernel record layer (kTLS) against its user-space record layer.

Proves, on a real kTLS kernel, that :class:`ktlsd.tls.record.KernelRecordLayer` and
:class:`ktlsd.tls.record.UserRecordLayer` interoperate byte-exact for each of the three TLS 1.3
suites: 1 MiB each way over a loopback TCP pair (kernel on one end, user layer on the
other), then KeyUpdates in both directions (KeyUpdate record under the old key, new key
via ``install_tx_key``/``install_rx_key`` -- on the kernel side that is kTLS rekey), with
256 KiB each way under every new generation; the kernel side's reads fail with EKEYEXPIRED
between the KeyUpdate and the new RX key; and /proc/net/tls_stat's rekey counters move by
exactly the number of rekeys done (no errors). The secrets are random per run and never
printed. No handshake is involved: this isolates the record layers (the agent-level
scenarios cover handshakes).
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import Scenario, ScenarioFailed, modprobe, tls_stat

BULK = 1024 * 1024
AFTER_REKEY = 256 * 1024
ROUNDS = 2  # KeyUpdates per direction per suite
CHUNK = 16 * 1024


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    # Plain blocking sockets, no timeout: with a timeout Python polls before recvmsg, and
    # after a KeyUpdate the kernel reports no input (instead of EKEYEXPIRED) until the new RX
    # key is set -- the read would just wait. The guest runner's timeout bounds any hang.
    for s in (a, b):
        s.settimeout(None)
    return a, b


def transfer(sender, receiver, nbytes: int) -> bool:  # type: ignore[no-untyped-def]
    """Send ``nbytes`` random bytes from one layer to the other; True if byte-exact."""
    data = os.urandom(nbytes)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            for off in range(0, nbytes, CHUNK):
                sender.send(data[off : off + CHUNK])
        except BaseException as exc:  # reported by the receiving side
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    got = bytearray()
    while len(got) < nbytes:
        rec = receiver.recv()
        if rec.content_type != 23 or not rec.data:
            raise ScenarioFailed(f"unexpected record type {rec.content_type} mid-transfer")
        got += rec.data
    t.join()
    if errors:
        raise ScenarioFailed(f"sender failed: {errors[0]}")
    return hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


def key_update(
    sc: Scenario,
    label: str,
    sender,
    receiver,
    secrets: dict[str, bytes],  # type: ignore[no-untyped-def]
    direction: str,
    suite,
) -> None:  # type: ignore[no-untyped-def]
    """One KeyUpdate from ``sender`` to ``receiver`` and data under the new generation."""
    from ktlsd.tls.keyschedule import decode_key_update, encode_key_update, next_traffic_secret

    sender.send(encode_key_update(False), 22)
    secrets[direction] = next_traffic_secret(suite, secrets[direction])
    sender.install_tx_key(secrets[direction])
    rec = receiver.recv()
    sc.check(rec.content_type == 22 and decode_key_update(rec.data) is False,
             f"{label}: KeyUpdate delivered as a handshake record")  # fmt: skip
    try:
        receiver.recv()
        outcome = "no error"
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno or 0, str(exc))
    sc.check(outcome == "EKEYEXPIRED", f"{label}: reads fail with EKEYEXPIRED until the new key")
    receiver.install_rx_key(secrets[direction])
    sc.check(transfer(sender, receiver, AFTER_REKEY), f"{label}: 256 KiB under the new key")


def main() -> None:
    with Scenario() as sc:
        from ktlsd.tls.record import KernelRecordLayer, UserRecordLayer
        from ktlsd.tls.session import CipherSuite, Role, Session

        modprobe(sc, "tls")
        before = tls_stat()
        rekeys = 0
        verified = 0
        for suite in CipherSuite:
            name = suite.iana_name
            secrets = {
                "c2s": os.urandom(suite.hash_length),
                "s2c": os.urandom(suite.hash_length),
            }
            a, b = tcp_pair()
            sc.cleanup(a.close)
            sc.cleanup(b.close)
            kernel = KernelRecordLayer(
                a, Session(Role.CLIENT, suite, secrets["c2s"], secrets["s2c"])
            )
            user = UserRecordLayer(b, Session(Role.SERVER, suite, secrets["c2s"], secrets["s2c"]))
            sc.check(transfer(kernel, user, BULK), f"{name}: 1 MiB kernel -> user")
            sc.check(transfer(user, kernel, BULK), f"{name}: 1 MiB user -> kernel")
            verified += 2 * BULK
            for r in range(ROUNDS):
                key_update(sc, f"{name} kernel->user #{r + 1}", kernel, user, secrets, "c2s", suite)
                key_update(sc, f"{name} user->kernel #{r + 1}", user, kernel, secrets, "s2c", suite)
                rekeys += 1
                verified += 2 * AFTER_REKEY
        after = tls_stat()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if "Rekey" in k}
        sc.figure("tls_stat_rekey_delta", delta)
        sc.figure("bytes_verified", verified)
        sc.figure("rekeys_per_direction", rekeys)
        for counter in ("TlsTxRekeyOk", "TlsRxRekeyOk", "TlsRxRekeyReceived"):
            sc.check(delta.get(counter) == rekeys, f"{counter} moved by exactly {rekeys}")
        sc.check(delta.get("TlsTxRekeyError", 0) == 0 and delta.get("TlsRxRekeyError", 0) == 0,
                 "no rekey errors counted")  # fmt: skip


if __name__ == "__main__":
    main()
