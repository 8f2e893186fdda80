"""kernel-facts: what the guest kernel offers ktlsd, checked rather than assumed.

Proves: the kernel version; kTLS is available (/proc/net/tls_stat after ``modprobe tls``);
the ``handshake`` generic netlink family exists (looked up through the genl controller
with pyroute2, with its multicast groups and commands); kTLS rekey works on a loopback
TCP pair -- a KeyUpdate record sent under the old key, then TLS_TX set a second time, is
delivered as a handshake record, reads then fail with EKEYEXPIRED until TLS_RX is set a
second time -- and /proc/net/tls_stat's rekey counters move by exactly one; which key
types the kernel knows (psk for NVMe, asymmetric for x509 peers).
"""

from __future__ import annotations

import errno
import os
import platform
import socket
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import Scenario, genl_family, modprobe, tls_stat

SOL_TLS = 282
TCP_ULP = 31
TLS_TX, TLS_RX = 1, 2
TLS_SET_RECORD_TYPE, TLS_GET_RECORD_TYPE = 1, 2
TLS_1_3_VERSION = 0x0304
TLS_CIPHER_AES_GCM_128 = 51
KEY_UPDATE_NOT_REQUESTED = b"\x18\x00\x00\x01\x00"


def crypto_info_aes128(key: bytes, iv12: bytes) -> bytes:
    """tls12_crypto_info_aes_gcm_128 for TLS 1.3: salt = iv[:4], iv = iv[4:], rec_seq 0."""
    return struct.pack("=HH", TLS_1_3_VERSION, TLS_CIPHER_AES_GCM_128) + (
        iv12[4:] + key + iv12[:4] + bytes(8)
    )


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    lsock = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lsock.getsockname())
    b, _ = lsock.accept()
    lsock.close()
    return a, b


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("peer closed")
        buf += chunk
    return buf


def ktls_rekey(sc: Scenario) -> None:
    before = tls_stat()
    a, b = tcp_pair()
    sc.cleanup(a.close)
    sc.cleanup(b.close)
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, TCP_ULP, b"tls")
    key1, iv1, key2, iv2 = os.urandom(16), os.urandom(12), os.urandom(16), os.urandom(12)
    a.setsockopt(SOL_TLS, TLS_TX, crypto_info_aes128(key1, iv1))
    b.setsockopt(SOL_TLS, TLS_RX, crypto_info_aes128(key1, iv1))
    payload1 = os.urandom(64 * 1024)
    a.sendall(payload1)
    sc.check(
        recv_exact(b, len(payload1)) == payload1, "64 KiB sent with kTLS TX decrypted by kTLS RX"
    )

    # KeyUpdate goes out under the OLD key, then the new TX key is installed.
    a.sendmsg([KEY_UPDATE_NOT_REQUESTED], [(SOL_TLS, TLS_SET_RECORD_TYPE, bytes([22]))])
    try:
        a.setsockopt(SOL_TLS, TLS_TX, crypto_info_aes128(key2, iv2))
        tx_rekey = "ok"
    except OSError as exc:
        tx_rekey = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    sc.figure("ktls_tx_rekey", tx_rekey)
    sc.check(tx_rekey == "ok", "second TLS_TX (rekey) accepted")
    payload2 = os.urandom(64 * 1024)
    a.sendall(payload2)

    data, anc, _flags, _addr = b.recvmsg(64, socket.CMSG_SPACE(1))
    rtype = next((c[2][0] for c in anc if c[0] == SOL_TLS and c[1] == TLS_GET_RECORD_TYPE), None)
    sc.check(
        rtype == 22 and data == KEY_UPDATE_NOT_REQUESTED, "KeyUpdate arrives as record type 22"
    )
    try:
        b.recv(1, socket.MSG_DONTWAIT)
        paused = "no error"
    except OSError as exc:
        paused = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    sc.figure("ktls_rx_after_keyupdate", paused)
    sc.check(paused == "EKEYEXPIRED", "RX pauses with EKEYEXPIRED until the new key is set")
    b.setsockopt(SOL_TLS, TLS_RX, crypto_info_aes128(key2, iv2))
    sc.check(recv_exact(b, len(payload2)) == payload2, "64 KiB under the new key decrypted")

    after = tls_stat()
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if "Rekey" in k}
    sc.figure("tls_stat_rekey_delta", delta)
    sc.check(delta.get("TlsTxRekeyOk") == 1, "TlsTxRekeyOk moved by exactly 1")
    sc.check(delta.get("TlsRxRekeyOk") == 1, "TlsRxRekeyOk moved by exactly 1")
    sc.check(delta.get("TlsRxRekeyReceived") == 1, "TlsRxRekeyReceived moved by exactly 1")
    sc.check(
        delta.get("TlsTxRekeyError", 0) == 0 and delta.get("TlsRxRekeyError", 0) == 0,
        "no rekey errors counted",
    )


def key_types(sc: Scenario) -> dict[str, bool]:
    """Which key types exist: adding a key of an unknown type fails with ENODEV."""
    known = {}
    for ktype in ("user", "logon", "psk", "asymmetric"):
        proc = sc.sh(["keyctl", "add", ktype, "ktlsd:probe", "x", "@s"], check=False)
        text = proc.stdout + proc.stderr
        known[ktype] = not ("No such device" in text or "ENODEV" in text)
        if proc.returncode == 0:
            sc.sh(["keyctl", "unlink", proc.stdout.strip(), "@s"], check=False)
    return known


def main() -> None:
    with Scenario() as sc:
        release = platform.release()
        sc.figure("kernel", release)
        major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
        sc.check((major, minor) >= (6, 14), f"kernel {release} >= 6.14 (kTLS rekey)")
        modprobe(sc, "tls", "nvme-keyring")
        sc.check(Path("/proc/net/tls_stat").exists(), "/proc/net/tls_stat present")
        fam = genl_family("handshake")
        sc.figure("handshake_family", fam)
        sc.check("tlshd" in fam["mcast_groups"], "handshake family has the tlshd group")
        # READY is a kernel-to-agent notification, so only ACCEPT (2) and DONE (3) are ops.
        sc.check({2, 3} <= set(fam["commands"]), "handshake family has ACCEPT and DONE")
        ktls_rekey(sc)
        types = key_types(sc)
        sc.figure("key_types", types)
        sc.check(types["psk"], "key type psk registered (nvme-keyring)")
        sc.figure("nvme_keyring_visible", " .nvme:" in Path("/proc/keys").read_text())


if __name__ == "__main__":
    main()
