"""Guest-side probe: the Linux nvme host (``nvme connect --dhchap-secret``) against
ktlsd's :class:`DhchapController`, behind a minimal NVMe/TCP target written here.

Not a pytest module (root and the nvme-tcp module are needed: the VM test bed). The target
answers ICReq, Fabrics Connect (asking for authentication), Authentication Send/Receive via
the controller state machine, and refuses everything after that, so ``nvme connect`` itself
fails; what counts is what happened during authentication: the controller's events, and
for ``--concat`` the generated key the kernel host put into ``.nvme`` (same description,
i.e. same digest of the generated PSK, and where readable the same TLS PSK). Measured on
Debian's 7.3.4 kernel: every case passes (~25 s under TCG).

Usage: ``python3 kernel_host_probe.py RESULT.json``; exit status 0 when every case passed.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from ktlsd import keyring
from ktlsd.nvme.dhchap import Authenticated, DhchapController, Failed
from ktlsd.nvme.dhchap_crypto import DhchapSecret
from ktlsd.nvme.dhchap_messages import decode_message

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:9a8b7c6d-ktlsd-host-probe"
HOSTID = "9a8b7c6d-0000-4000-8000-000000000001"
SUBNQN = "nqn.2026-01.io.ktlsd:host-probe"


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("host closed the connection")
        buf += chunk
    return buf


def cqe(cid: int, status: int = 0, result: int = 0) -> bytes:
    body = struct.pack("<QHHHH", result, 0, 0, cid, status << 1)
    return struct.pack("<BBBBI", 0x05, 0, 24, 0, 24) + body


class Target:
    """Serves connections on one port until stopped; one DhchapController per connection."""

    def __init__(self, make_controller) -> None:  # type: ignore[no-untyped-def]
        self.make_controller = make_controller
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.events: list[object] = []
        self.log: list[str] = []
        self.controllers: list[DhchapController] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            try:
                self._session(conn)
            except Exception as exc:
                self.log.append(f"session ended: {exc!r}")
            finally:
                conn.close()

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        ch = recv_exact(conn, 8)
        if ch[0] != 0x00:
            self.log.append(f"first PDU type {ch[0]:#x} (not ICReq)")
            return
        recv_exact(conn, struct.unpack_from("<I", ch, 4)[0] - 8)
        icresp = struct.pack("<BBBBIHBBI", 0x01, 0, 128, 0, 128, 0, 0, 0, 0x20000)
        conn.sendall(icresp.ljust(128, b"\0"))
        ctrl = self.make_controller()
        self.controllers.append(ctrl)
        pending = None
        while True:
            ch = recv_exact(conn, 8)
            rest = recv_exact(conn, struct.unpack_from("<I", ch, 4)[0] - 8)
            if ch[0] != 0x04:
                self.log.append(f"unexpected PDU type {ch[0]:#x}")
                return
            sqe = rest[:64]
            pdo = ch[3]
            data = rest[pdo - 8 :] if pdo else b""
            opcode, cid, fctype = sqe[0], struct.unpack_from("<H", sqe, 2)[0], sqe[4]
            if opcode != 0x7F:
                self.log.append(f"admin opcode {opcode:#x}: refused")
                conn.sendall(cqe(cid, 0x4001))  # invalid opcode, DNR
                return
            if fctype == 0x01:  # Connect
                self.log.append("connect")
                conn.sendall(cqe(cid, 0, 1 | (1 << 17)))  # cntlid 1, AUTHREQ ATR
            elif fctype == 0x05:  # Authentication Send
                out = ctrl.receive(decode_message(data))
                self.events += out.events
                pending = out.send
                self.log.append(f"auth send {type(decode_message(data)).__name__}")
                conn.sendall(cqe(cid))
            elif fctype == 0x06:  # Authentication Receive
                al = struct.unpack_from("<I", sqe, 44)[0]
                payload = (pending.encode() if pending else b"").ljust(al, b"\0")[:al]
                self.log.append(f"auth receive -> {type(pending).__name__}")
                pending = None
                c2h = struct.pack("<BBBBIHHIII", 0x07, 0x04, 24, 24, 24 + al, cid, 0, 0, al, 0)
                conn.sendall(c2h + payload + cqe(cid))
            else:
                self.log.append(f"fabrics command {fctype:#x}: refused")
                conn.sendall(cqe(cid, 0x4001))
                return

    def stop(self) -> None:
        self.listener.close()


def proc_keys() -> list[str]:
    return Path("/proc/keys").read_text().splitlines()


def run_case(
    name: str,
    hash_id: int,
    group: int,
    bidirectional: bool,
    concat: bool = False,
    wrong_secret: bool = False,
) -> dict[str, object]:
    host_secret = DhchapSecret.generate(hash_id)
    ctrl_secret = DhchapSecret.generate(0, 48) if bidirectional else None
    expected_host = DhchapSecret.generate(hash_id) if wrong_secret else host_secret
    target = Target(
        lambda: DhchapController(
            SUBNQN, HOSTNQN, expected_host, ctrl_secret, hash_ids=[hash_id], dh_groups=[group]
        )
    )
    cmd = [
        "nvme",
        "connect",
        "-t",
        "tcp",
        "-a",
        "127.0.0.1",
        "-s",
        str(target.port),
        "-n",
        SUBNQN,
        "--hostnqn",
        HOSTNQN,
        "--hostid",
        HOSTID,
        "--dhchap-secret",
        host_secret.format(),
        "--ctrl-loss-tmo",
        "0",
    ]
    if ctrl_secret:
        cmd += ["--dhchap-ctrl-secret", ctrl_secret.format()]
    if concat:
        cmd += ["--concat"]
    record: dict[str, object] = {"case": name}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    target.stop()
    record["nvme_connect"] = (proc.returncode, (proc.stdout + proc.stderr).strip()[-300:])
    record["log"] = target.log[-12:]
    record["events"] = [repr(e) for e in target.events]
    auth = [e for e in target.events if isinstance(e, Authenticated)]
    failed = [e for e in target.events if isinstance(e, Failed)]
    if wrong_secret:
        record["passed"] = not auth and [int(e.reason) for e in failed] == [1]
        return record
    ok = len(auth) >= 1 and not failed
    if bidirectional:
        ok = ok and auth[0].bidirectional  # the host accepted our response (sent Success2)
    if concat:
        gen = auth[0].generated_psk if auth else None
        record["our_identity"] = gen.identity if gen else None
        lines = [ln for ln in proc_keys() if gen and gen.identity in ln]
        record["kernel_key_lines"] = lines
        ok = ok and bool(lines)
        if lines and gen:
            try:  # the host's key grants read to its owner (root): compare the TLS PSK too
                payload = keyring.read_key(int(lines[0].split()[0], 16))
                record["kernel_tls_psk_matches"] = payload == gen.tls_psk
                ok = ok and payload == gen.tls_psk
            except keyring.KeyringError as exc:
                record["kernel_key_read_error"] = str(exc)
    record["passed"] = ok
    return record


def main() -> int:
    out_path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/results/host-probe.out")
    results: list[dict[str, object]] = []
    for mod in ("nvme-tcp", "nvme-keyring"):
        subprocess.run(["modprobe", mod], check=False)
    cases = [
        ("sha256-null-uni", 1, 0, False),
        ("sha256-2048-bi", 1, 1, True),
        ("sha384-4096-bi", 2, 3, True),
        ("sha512-8192-bi", 3, 5, True),
        ("wrong-host-secret", 1, 1, False, False, True),
        ("concat-sha256", 1, 1, False, True),
        ("concat-sha384", 2, 2, False, True),
    ]
    for case in cases:
        try:
            results.append(run_case(*case))  # type: ignore[arg-type]
        except Exception:
            results.append({"case": case[0], "error": traceback.format_exc(), "passed": False})
    passed = all(r.get("passed") for r in results)
    report = {"passed": passed, "cases": results}
    out_path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
