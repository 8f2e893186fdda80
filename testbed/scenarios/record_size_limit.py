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

import hashlib
import os
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import Scenario, ScenarioFailed, modprobe
from testbed.scenarios.tls_wire import RecordingRelay, record_list

SMALL_LIMIT = 256
PAYLOAD = 64 * 1024
TAG = 16
IDENTITY = b"record-size-limit"


def handshake_pair(
    relay: RecordingRelay, *, kernel_role: str, peer_limit: int | None
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
            result["peer"] = handshake_blocking(relay.far_end, config(peer, **extra), timeout=20)
        except BaseException as exc:
            result["peer_error"] = exc

    thread = threading.Thread(target=run_peer)
    thread.start()
    mine = handshake_blocking(relay.near_end, config(kernel), timeout=20)
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


def check_wire(sc: Scenario, label: str, relay: RecordingRelay, limit: int) -> int:
    """Check every protected record the kTLS end sent; return the largest inner plaintext."""
    protected = [length for kind, length in record_list(bytes(relay.from_near)) if kind == 23]
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
    relay = RecordingRelay()
    sc.cleanup(relay.close)
    mine, theirs = handshake_pair(relay, kernel_role="client", peer_limit=peer_limit)
    sc.check(mine.peer_record_size_limit == expected,
             f"{label}: session reports the peer's limit {expected}")  # fmt: skip
    sender = TlsConnection(KernelRecordLayer(relay.near_end, mine), mine)
    cap = ktls.read_tx_max_payload(relay.near_end)
    receiver = TlsConnection(UserRecordLayer(relay.far_end, theirs), theirs)
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

    relay = RecordingRelay()
    sc.cleanup(relay.close)
    mine, theirs = handshake_pair(relay, kernel_role="server", peer_limit=SMALL_LIMIT)
    sc.check(mine.peer_record_size_limit == SMALL_LIMIT,
             "agent-install: session reports the client's limit")  # fmt: skip
    _install_ktls(relay.near_end, mine)
    cap = ktls.read_tx_max_payload(relay.near_end)
    receiver = TlsConnection(UserRecordLayer(relay.far_end, theirs), theirs)
    data = os.urandom(PAYLOAD)
    out: dict[str, object] = {}
    reader = threading.Thread(target=receive_all, args=(receiver, PAYLOAD, out))
    reader.start()
    relay.near_end.sendall(data)  # what a kernel consumer does: plain writes on kTLS
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
