"""ktls-cli: ``ktlsd listen``/``ktlsd connect`` with kTLS on one end, the user layer on the other.

Proves, end to end through ktlsd's own handshake engine (system libssl) and its tools, that
a connection whose one end uses ``--record-layer kernel`` (kTLS) and whose other end uses
``--record-layer user`` carries 1 MiB each way byte-exact for each of the three TLS 1.3
suites (PSK bound to the suite's hash), with ``--key-update-every`` making both ends send
KeyUpdates (update_requested) throughout; the kernel end alternates between server and
client; /proc/net/tls_stat's rekey counters move by exactly the KeyUpdates the kernel end
reports having sent and received, with no rekey errors.

The PSK is random per run and passed on the command line of processes inside the guest;
the commands are logged with it redacted.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import PROJECT, Scenario, ScenarioFailed, modprobe, tls_stat

DATA = 1024 * 1024
KEY_UPDATE_EVERY = "256k"
WORK = Path("/tmp/ktls-cli")
CLOSED = re.compile(r"key_updates_sent=(\d+) key_updates_received=(\d+)")


def ktlsd(args: list[str], stdout: Path, stderr: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    with open(stdout, "wb") as o, open(stderr, "wb") as e:
        return subprocess.Popen([sys.executable, "-m", "ktlsd", *args], stdin=subprocess.PIPE,
                                stdout=o, stderr=e, env=env, cwd="/tmp")  # fmt: skip


def feed(proc: subprocess.Popen[bytes], data: bytes, received: Path) -> threading.Thread:
    """Write ``data`` to the tool's stdin; close stdin only once its peer's data has all arrived.

    The tools stop relaying when the peer's close_notify arrives (no half-close), so an end
    that finished sending early must not close before the other end has sent everything.
    """

    def run() -> None:
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.write(data)
            proc.stdin.flush()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if received.exists() and received.stat().st_size >= DATA:
                    break
                time.sleep(0.02)
        with contextlib.suppress(BrokenPipeError, OSError):
            proc.stdin.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def redacted(argv: list[str]) -> str:
    out = list(argv)
    for i, a in enumerate(out[:-1]):
        if a == "--psk":
            out[i + 1] = "<redacted>"
    return " ".join(out)


def wait_listening(log: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "listening on" in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise ScenarioFailed(f"ktlsd listen exited early: {log.read_text()[-300:]}")
        time.sleep(0.05)
    raise ScenarioFailed("ktlsd listen did not start listening")


def run_pair(sc: Scenario, suite_name: str, hash_name: str, hash_len: int, kernel_end: str,
             port: int) -> tuple[int, int]:  # fmt: skip
    """One connection; returns the kernel end's (key_updates_sent, key_updates_received)."""
    WORK.mkdir(exist_ok=True)
    psk = os.urandom(hash_len).hex()
    common = ["--psk", psk, "--psk-identity", f"ktlsd-testbed-{hash_name}",
              "--psk-hash", hash_name, "--ciphers", suite_name,
              "--key-update-every", KEY_UPDATE_EVERY]  # fmt: skip
    layer = {"server": "kernel" if kernel_end == "server" else "user"}
    layer["client"] = "user" if layer["server"] == "kernel" else "kernel"
    inputs = {end: os.urandom(DATA) for end in ("server", "client")}
    files = {end: hashlib.sha256(data).digest() for end, data in inputs.items()}
    s_args = ["listen", f"127.0.0.1:{port}", *common, "--record-layer", layer["server"]]
    c_args = ["connect", f"127.0.0.1:{port}", *common, "--record-layer", layer["client"]]
    print(f"$ ktlsd {redacted(s_args)}\n$ ktlsd {redacted(c_args)}", flush=True)
    logs = {end: WORK / f"{end}.err" for end in ("server", "client")}
    server = ktlsd(s_args, WORK / "server.out", logs["server"])
    sc.cleanup(server.kill)
    wait_listening(logs["server"], server)
    t0 = time.monotonic()
    client = ktlsd(c_args, WORK / "client.out", logs["client"])
    sc.cleanup(client.kill)
    feeders = [feed(server, inputs["server"], WORK / "server.out"),
               feed(client, inputs["client"], WORK / "client.out")]  # fmt: skip
    rc = {"client": client.wait(timeout=120), "server": server.wait(timeout=120)}
    seconds = time.monotonic() - t0
    for t in feeders:
        t.join(timeout=5)
    for end in ("server", "client"):
        print(f"--- {end} ({layer[end]}) stderr ---\n{logs[end].read_text(errors='replace')}")
    label = f"{suite_name} kernel={kernel_end}"
    sc.check(rc == {"client": 0, "server": 0}, f"{label}: both ends exit 0 ({rc})")
    sc.check(hashlib.sha256((WORK / "server.out").read_bytes()).digest() == files["client"],
             f"{label}: 1 MiB client -> server byte-exact")  # fmt: skip
    sc.check(hashlib.sha256((WORK / "client.out").read_bytes()).digest() == files["server"],
             f"{label}: 1 MiB server -> client byte-exact")  # fmt: skip
    kernel_log = logs[kernel_end].read_text(errors="replace")
    sc.check("record layer: kernel" in kernel_log, f"{label}: kernel end used kTLS")
    m = CLOSED.search(kernel_log)
    sc.check(m is not None, f"{label}: kernel end reported its KeyUpdate counts")
    sent, received = int(m.group(1)), int(m.group(2))  # type: ignore[union-attr]
    sc.check(sent > 0 and received > 0, f"{label}: KeyUpdates went both ways ({sent}/{received})")
    sc.figure(f"seconds_{suite_name}_{kernel_end}", round(seconds, 2))
    return sent, received


def main() -> None:
    with Scenario() as sc:
        from ktlsd.tls.session import CipherSuite

        modprobe(sc, "tls")
        before = tls_stat()
        tx = rx = 0
        for i, suite in enumerate(CipherSuite):
            kernel_end = "server" if i % 2 == 0 else "client"
            sent, received = run_pair(sc, suite.iana_name, suite.hash_name, suite.hash_length,
                                      kernel_end, 4433 + i)  # fmt: skip
            tx, rx = tx + sent, rx + received
        after = tls_stat()
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if "Rekey" in k}
        sc.figure("tls_stat_rekey_delta", delta)
        sc.figure("kernel_end_key_updates", {"sent": tx, "received": rx})
        sc.figure("bytes_verified", 2 * DATA * len(CipherSuite))
        sc.check(delta.get("TlsTxRekeyOk") == tx, f"TlsTxRekeyOk moved by exactly {tx}")
        sc.check(delta.get("TlsRxRekeyOk") == rx, f"TlsRxRekeyOk moved by exactly {rx}")
        sc.check(delta.get("TlsRxRekeyReceived") == rx, f"TlsRxRekeyReceived moved by {rx}")
        sc.check(delta.get("TlsTxRekeyError", 0) == 0 and delta.get("TlsRxRekeyError", 0) == 0,
                 "no rekey errors counted")  # fmt: skip


if __name__ == "__main__":
    main()
