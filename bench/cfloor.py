"""Build the C reference programs in bench/c/ at run time (``cc`` against the system OpenSSL).

The benchmarks compare ktlsd with a small C program doing the same work through the same
libssl/libcrypto, built fresh on the machine that runs the benchmark so that both figures share
the library, the compiler's idea of the CPU and the load of the moment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = Path(__file__).resolve().parent / "c"


def build(name: str) -> Path:
    """Compile ``bench/c/<name>.c`` (cached by source hash in the temp dir); return the binary."""
    source = SOURCES / f"{name}.c"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("bench: no C compiler (cc) for the C reference; install gcc")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / f"ktlsd-bench-{os.getuid()}"
    out_dir.mkdir(mode=0o700, exist_ok=True)
    binary = out_dir / f"{name}-{digest}"
    if not binary.exists():
        partial = binary.with_suffix(".partial")
        command = [compiler, "-O2", "-Wall", "-pthread", "-o", str(partial), str(source),
                   "-lssl", "-lcrypto"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(
                f"bench: cannot build {source.name} (need libssl-dev):\n{done.stderr.strip()}"
            )
        partial.rename(binary)
    return binary


def run_floor(binary: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, float]:
    """Run a C reference (``env``: extra environment); parse its line of ``key value`` pairs."""
    line = subprocess.run(
        [str(binary), *args], capture_output=True, text=True, check=True, timeout=600,
        env={**os.environ, **(env or {})},
    ).stdout.split()
    return {key: float(value) for key, value in zip(line[::2], line[1::2], strict=True)}
