"""record-size-limit: the peer's RFC 8449 record_size_limit applied to real kTLS.

Every connection runs a real handshake between two ktlsd engines over loopback TCP, through a
relay thread that forwards the bytes and keeps a copy of each direction, so the record lengths
checked below are read off the wire, not taken from either end's word. The "small peer" is
ktlsd's user-space end configured to advertise a record_size_limit of 256; the other end is
ktlsd on kTLS with the default (16,385). Three connections:

* ``kernel-layer``: the kTLS end is the client, its record layer is
  :class:`~ktlsd.tls.record.KernelRecordLayer`; it must set ``TLS_TX_MAX_PAYLOAD_LEN`` to 255
  (read back with ``getsockopt``) and send 64 KiB through :class:`TlsConnection`; every
  protected record on the wire from it carries at most 256 bytes of inner plaintext (record
  length <= 272), and the data arrives byte-exact at the small peer, whose user-space layer
  would fail the connection with record_overflow on a larger record.
* ``agent-install``: the kTLS end is the server and is installed the way the agent does it for
  a kernel consumer (``ktlsd.agent._install_ktls``); then 64 KiB go out with a plain
  ``sendall`` on the socket, as NVMe or NFS would send them: same checks.
* ``control``: the same as ``kernel-layer`` with a peer that advertises the default limit
  (16,385): kTLS keeps its 2^14 (``getsockopt``) and full-size records appear on the wire --
  the check above can fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import struct
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import Scenario, ScenarioFailed, modprobe

SMALL_LIMIT = 256
PAYLOAD = 64 * 1024
TAG = 16
IDENTITY = b"record-size-limit"
HEADER = struct.Struct(">BHH")


class Relay:
    """Forward bytes between two TCP connections and keep what went each way."""

    def __init__(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.kernel_end = socket.create_connection(listener.getsockname())
        self._near, _ = listener.accept()
        self.user_end = socket.create_connection(listener.getsockname())
        self._far, _ = listener.accept()
        listener.close()
        self.from_kernel = bytearray()
        self.from_user = bytearray()
        self._threads = [
            threading.Thread(target=self._pump, args=(self._near, self._far, self.from_kernel)),
            threading.Thread(target=self._pump, args=(self._far, self._near, self.from_user)),
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, copy: bytearray) -> None:
        try:
            while data := src.recv(65536):
                copy += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in (self.kernel_end, self.user_end):
            sock.close()
        for thread in self._threads:
            thread.join(10)
        for sock in (self._near, self._far):
            sock.close()


def records(stream: bytes) -> list[tuple[int, int]]:
    """(content type, length) of every record in ``stream``; raises if it does not parse."""
    out = []
    offset = 0
    while offset < len(stream):
        if len(stream) - offset < HEADER.size:
            raise ScenarioFailed(f"captured stream ends inside a record header at {offset}")
        kind, _version, length = HEADER.unpack_from(stream, offset)
        offset += HEADER.size + length
        if offset > len(stream):
            raise ScenarioFailed("captured stream ends inside a record")
        out.append((kind, length))
    return out


def handshake_pair(
    relay: Relay, *, kernel_role: str, peer_limit: int | None
):  # type: ignore[no-untyped-def]
    """Handshake between the kTLS end (default limit) and the small peer (``peer_limit``)."""
    from ktlsd.tls.handshake import PskKey, TlsConfig, handshake_blocking
    from ktlsd.tls.session import Role

    key = os.urandom(32)
    psk = PskKey(IDENTITY, key)
    extra = {} if peer_limit is None else {"record_size_limit": peer_limit}

    def config(role: Role, **kw: object) -> TlsConfig:
        if role is Role.CLIENT:
            return TlsConfig(role=role, psk_keys=(psk,), **kw)  # type: ignore[arg-type]
        return TlsConfig(
            role=role, psk_lookup=lambda i: psk if i == IDENTITY else None, **kw  # type: ignore[arg-type]
        )

    kernel = Role.CLIENT if kernel_role == "client" else Role.SERVER
    peer = Role.SERVER if kernel is Role.CLIENT else Role.CLIENT
    result: dict[str, object] = {}

    def run_peer() -> None:
        try:
            result["peer"] = handshake_blocking(relay.user_end, config(peer, **extra), timeout=20)
        except BaseException as exc:
            result["peer_error"] = exc

    thread = threading.Thread(target=run_peer)
    thread.start()
    mine = handshake_blocking(relay.kernel_end, config(kernel), timeout=20)
    thread.join(30)
    if "peer_error" in result:
        raise ScenarioFailed(f"small peer's handshake failed: {result['peer_error']}")
    return mine, result["peer"]


def receive_all(conn, nbytes: int, out: dict[str, object]) -> None:  # type: ignore[no-untyped-def]
    got = bytearray()
    try:
        while len(got) < nbytes:
            data = conn.recv(65536)
            if not data:
                break
            got += data
    except OSError as exc:
        out["error"] = exc
    out["data"] = bytes(got)


def check_wire(sc: Scenario, label: str, relay: Relay, limit: int) -> int:
    """Check every protected record the kTLS end sent; return the largest inner plaintext."""
    protected = [length for kind, length in records(bytes(relay.from_kernel)) if kind == 23]
    largest = max(protected) - TAG
    sc.figure(f"{label}_records_from_ktls", len(protected))
    sc.figure(f"{label}_largest_inner_plaintext", largest)
    sc.check(len(protected) >= PAYLOAD // (limit - 1),
             f"{label}: {len(protected)} protected records for {PAYLOAD} bytes")  # fmt: skip
    return largest


def kernel_layer(sc: Scenario, *, peer_limit: int | None) -> tuple[int, int]:
    from ktlsd.tls import ktls
    from ktlsd.tls.connection import TlsConnection
    from ktlsd.tls.record import KernelRecordLayer, UserRecordLayer

    label = "kernel_layer" if peer_limit else "control"
    expected = peer_limit or 2**14 + 1
    relay = Relay()
    sc.cleanup(relay.close)
    mine, theirs = handshake_pair(relay, kernel_role="client", peer_limit=peer_limit)
    sc.check(mine.peer_record_size_limit == expected,
             f"{label}: session reports the peer's limit {expected}")  # fmt: skip
    sender = TlsConnection(KernelRecordLayer(relay.kernel_end, mine), mine)
    cap = ktls.read_tx_max_payload(relay.kernel_end)
    receiver = TlsConnection(UserRecordLayer(relay.user_end, theirs), theirs)
    data = os.urandom(PAYLOAD)
    out: dict[str, object] = {}
    reader = threading.Thread(target=receive_all, args=(receiver, PAYLOAD, out))
    reader.start()
    sender.send(data)
    reader.join(60)
    if "error" in out:
        raise ScenarioFailed(f"{label}: small peer failed: {out['error']}")
    sc.check(hashlib.sha256(out["data"]).digest() == hashlib.sha256(data).digest(),  # type: ignore[arg-type]
             f"{label}: {PAYLOAD} bytes arrived byte-exact")  # fmt: skip
    sender.close()
    receiver.close()
    return cap, check_wire(sc, label, relay, expected)


def agent_install(sc: Scenario) -> tuple[int, int]:
    from ktlsd.agent import _install_ktls
    from ktlsd.tls import ktls
    from ktlsd.tls.connection import TlsConnection
    from ktlsd.tls.record import UserRecordLayer

    relay = Relay()
    sc.cleanup(relay.close)
    mine, theirs = handshake_pair(relay, kernel_role="server", peer_limit=SMALL_LIMIT)
    sc.check(mine.peer_record_size_limit == SMALL_LIMIT,
             "agent-install: session reports the client's limit")  # fmt: skip
    _install_ktls(relay.kernel_end, mine)
    cap = ktls.read_tx_max_payload(relay.kernel_end)
    receiver = TlsConnection(UserRecordLayer(relay.user_end, theirs), theirs)
    data = os.urandom(PAYLOAD)
    out: dict[str, object] = {}
    reader = threading.Thread(target=receive_all, args=(receiver, PAYLOAD, out))
    reader.start()
    relay.kernel_end.sendall(data)  # what a kernel consumer does: plain writes on kTLS
    reader.join(60)
    if "error" in out:
        raise ScenarioFailed(f"agent-install: small peer failed: {out['error']}")
    sc.check(hashlib.sha256(out["data"]).digest() == hashlib.sha256(data).digest(),  # type: ignore[arg-type]
             f"agent-install: {PAYLOAD} bytes arrived byte-exact")  # fmt: skip
    return cap, check_wire(sc, "agent_install", relay, SMALL_LIMIT)


def main() -> None:
    with Scenario() as sc:
        modprobe(sc, "tls")
        cap, largest = kernel_layer(sc, peer_limit=SMALL_LIMIT)
        sc.figure("kernel_layer_tx_max_payload", cap)
        sc.check(cap == SMALL_LIMIT - 1, f"kernel layer: TLS_TX_MAX_PAYLOAD_LEN reads back {cap}")
        sc.check(largest <= SMALL_LIMIT, f"kernel layer: largest record carries {largest} bytes")
        cap, largest = agent_install(sc)
        sc.figure("agent_install_tx_max_payload", cap)
        sc.check(cap == SMALL_LIMIT - 1, f"agent install: TLS_TX_MAX_PAYLOAD_LEN reads back {cap}")
        sc.check(largest <= SMALL_LIMIT, f"agent install: largest record carries {largest} bytes")
        cap, largest = kernel_layer(sc, peer_limit=None)
        sc.figure("control_tx_max_payload", cap)
        sc.check(cap == 2**14, f"control: TLS_TX_MAX_PAYLOAD_LEN stays {cap}")
        sc.check(largest == 2**14 + 1, f"control: full records ({largest} bytes) without a limit")


if __name__ == "__main__":
    main()
