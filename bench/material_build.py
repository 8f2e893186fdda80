#!/usr/bin/env python3
"""CPU per request to build a handshake's material, with and without the parsed-chain cache.

What the agent does for every x509 request before the handshake starts
(:func:`ktlsd.material.build_tls_config_blocking` in a material thread): read the files with
the reader's rights (:mod:`ktlsd.files`), parse the certificate chain and key, build the
configuration. Cases: an x509 server whose certificate and key are files (the configuration's,
read with the agent's rights, and a consumer's, named inline and read with its uid's rights),
and an x509 server whose chain and key come inline as DER. Each is measured with the cache as
the agent has it ("cached") and with the cache emptied before every build ("parsed"), in
interleaved rounds; CPU is the thread's own (``time.thread_time``).

    python bench/material_build.py [--rounds 5] [--count 2000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from pki import Authority  # noqa: E402

from ktlsd.material import (  # noqa: E402
    Consumer,
    build_tls_config_blocking,
    clear_material_cache,
)
from ktlsd.request import AuthMode, HandshakeRequest, InlineMaterial, MessageType  # noqa: E402
from ktlsd.settings import X509Files  # noqa: E402

CONSUMER_UID = 4242


def cases(directory: Path) -> dict[str, Callable[[], object]]:
    ca = Authority.create(directory / "ca", "ecdsa", "Bench CA")
    issued = ca.issue_server()
    server = HandshakeRequest(sockfd=0, message_type=MessageType.SERVERHELLO,
                              auth_mode=AuthMode.X509)
    files = X509Files(certificate=str(issued.cert_path), private_key=str(issued.key_path))
    found: dict[str, Callable[[], object]] = {
        "configured files": lambda: build_tls_config_blocking(server, x509_files=files),
    }
    inline_der = HandshakeRequest(
        sockfd=0, message_type=MessageType.SERVERHELLO, auth_mode=AuthMode.X509,
        inline=InlineMaterial(certificate_chain=issued.chain_der, private_key=issued.key_der))
    found["inline DER"] = lambda: build_tls_config_blocking(inline_der, x509_files=X509Files())
    if os.geteuid() == 0:  # a consumer's files, read with its own uid's rights
        directory.chmod(0o755)
        cert, key = directory / "cert.pem", directory / "key.pem"
        shutil.copy(issued.cert_path, cert)
        shutil.copy(issued.key_path, key)
        for path in (cert, key):
            os.chown(path, CONSUMER_UID, CONSUMER_UID)
            path.chmod(0o600)
        named = HandshakeRequest(
            sockfd=0, message_type=MessageType.SERVERHELLO, auth_mode=AuthMode.X509,
            inline=InlineMaterial(certificate_file=str(cert), private_key_file=str(key)))
        consumer = Consumer(uid=CONSUMER_UID, gid=CONSUMER_UID)
        found[f"consumer's files (uid {CONSUMER_UID})"] = lambda: build_tls_config_blocking(
            named, x509_files=X509Files(), consumer=consumer)
    return found


def measure(build: Callable[[], object], count: int, cached: bool) -> float:
    """Microseconds of this thread's CPU per build, in a thread as the agent builds."""
    result: list[float] = []

    def run() -> None:
        for _ in range(50):
            build()
        spent = 0.0
        for _ in range(count):
            if not cached:
                clear_material_cache()
            start = time.thread_time()
            build()
            spent += time.thread_time() - start
        result.append(spent * 1e6 / count)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(dir="/tmp") as directory:
        builds = cases(Path(directory))
        figures: dict[tuple[str, bool], list[float]] = {}
        for round_ in range(args.rounds):
            for name, build in builds.items():
                for cached in ((True, False) if round_ % 2 == 0 else (False, True)):
                    figures.setdefault((name, cached), []).append(
                        measure(build, args.count, cached))
        for name in builds:
            parsed, cached = figures[(name, False)], figures[(name, True)]
            ratios = [c / p for c, p in zip(cached, parsed, strict=True)]
            print(f"{name}: parsed {statistics.median(parsed):.0f} us "
                  f"({min(parsed):.0f}-{max(parsed):.0f}), cached "
                  f"{statistics.median(cached):.0f} us ({min(cached):.0f}-{max(cached):.0f}) "
                  f"per build; cached/parsed {statistics.median(ratios):.2f}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
