"""``ktlsd demo`` — the README's first command — really runs both sessions and says so."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_x509_and_psk_sessions_with_key_update() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ktlsd", "demo", "--record-layer", "user"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith(("x509", "psk"))]
    assert [(r[0], r[1]) for r in rows] == [
        ("x509", "server"), ("x509", "client"), ("psk", "server"), ("psk", "client"),
    ]
    assert all(r[-1] == "ok" for r in rows)
    assert all(r[-3] == "1" and r[-2] == "1" for r in rows)  # one KeyUpdate each way
    suites = {r[0]: r[2] for r in rows}
    assert suites["psk"] == "TLS_AES_256_GCM_SHA384"  # the SHA-384 NVMe PSK forced its suite
    assert "all checks passed" in proc.stdout
    assert "Traceback" not in proc.stderr
