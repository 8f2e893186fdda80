"""``ktlsd connect`` / ``ktlsd listen`` against real TLS peers: 1 MiB each way, byte-exact.

Every test runs the CLI as a user would (``python -m ktlsd ...``) with ``--record-layer user``
on one end and a real, independent TLS 1.3 implementation on the other, and relays 1 MiB of
random bytes in each direction *after* the hand-off from the handshake engine to the record
layer. Both stdouts must hold exactly what the other side was given; then one side closes and
both must exit 0.

How each peer program is driven (found by trying; see also :mod:`tests.cli_peers`):

* ``openssl s_server -quiet -naccept 1`` and ``openssl s_client -quiet``: ``-quiet`` turns the
  one-letter stdin commands (Q, R, k, K, ...) off — in OpenSSL 3.0 they are recognised at the
  start of every *read* from stdin, not of every line, so binary data would trip them — and it
  keeps stdout for the application data alone. ``-quiet`` also hides "ACCEPT", so readiness is
  read from /proc/net/tcp (a probe connection would use up ``-naccept 1``). s_server sends two
  NewSessionTickets, which ktlsd's record layer must skip.
* ``gnutls-serv --echo`` sends back what it receives, line by line (binary data with NUL bytes
  or without newlines is not echoed, so it gets base64 text in 76-character lines): ktlsd must
  print exactly its own input,
  which proves both directions (GnuTLS decrypted our bytes and encrypted them again).
* ``gnutls-cli`` relays stdin/stdout; ``--logfile`` sends its status lines away from stdout.
* tlslite-ng (pure Python) is the only peer here that does an external PSK bound to SHA-384;
  :mod:`tests.cli_peers` runs it as an echo peer.

The x509 matrix is lean but covers every suite, both key types and both authentication shapes:
for each peer program and each ktlsd role, the three suites x {ECDSA P-256 mutual, RSA-2048
server-only}.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli_peers import (
    Exchange,
    Proc,
    exchange,
    ktlsd,
    start_ktlsd_listen,
    text_data,
    tlslite_echo,
    wait_listening,
)
from tests.peers import free_port
from tests.pki import Authority, Issued

pytestmark = [
    pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl"),
    pytest.mark.skipif(shutil.which("gnutls-cli") is None, reason="needs gnutls-bin"),
]

SUITES = ["TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"]
GNUTLS_CIPHER = {
    "TLS_AES_128_GCM_SHA256": "AES-128-GCM",
    "TLS_AES_256_GCM_SHA384": "AES-256-GCM",
    "TLS_CHACHA20_POLY1305_SHA256": "CHACHA20-POLY1305",
}
AUTHS = ["ecdsa-mutual", "rsa-server-only"]
MATRIX = [(suite, auth) for suite in SUITES for auth in AUTHS]

PSK_IDENTITY = "host1.example"
PSK_HEX = "5ab1c2d3e4f50617" * 4  # a throwaway 32-byte SHA-256 PSK, for tests only


@dataclass
class Pki:
    ca: Path
    server: Issued
    client: Issued | None  # None: server-only authentication


@pytest.fixture(scope="module")
def pkis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pki]:
    root = tmp_path_factory.mktemp("pki")
    ec_ca = Authority.create(root / "ec", "ecdsa")
    rsa_ca = Authority.create(root / "rsa", "rsa")
    return {
        "ecdsa-mutual": Pki(ec_ca.cert_path, ec_ca.issue_server(), ec_ca.issue_client("host1")),
        "rsa-server-only": Pki(rsa_ca.cert_path, rsa_ca.issue_server(), None),
    }


def gnutls_priority(suite: str | None = None, psk: bool = False) -> str:
    prio = "NORMAL:-VERS-ALL:+VERS-TLS1.3"
    if suite:
        prio += f":-CIPHER-ALL:+{GNUTLS_CIPHER[suite]}"
    if psk:
        prio += ":+ECDHE-PSK:+DHE-PSK:+PSK"
    return prio


def stats(proc: Proc) -> dict[str, str]:
    """ktlsd's status lines as one dict (suite, peer, record layer, counts)."""
    text = proc.stderr_text
    found = dict(re.findall(r"\b(\w+)=(\S+)", text))
    m = re.search(r"record layer: (\w+)", text)
    if m:
        found["record_layer"] = m.group(1)
    m = re.search(r"handshake ok: .* peer=(.*)$", text, re.MULTILINE)
    if m:
        found["peer"] = m.group(1)
    return found


def check_ktlsd_done(
    proc: Proc, ex: Exchange, *, suite: str, peer: str
) -> dict[str, str]:
    """ktlsd exited 0 and reported the suite, record layer, peer and byte counts."""
    rc = proc.wait_exit()
    assert rc == 0, proc.stderr_text
    assert "Traceback" not in proc.stderr_text
    s = stats(proc)
    assert s["suite"] == suite
    assert s["record_layer"] == "user"
    assert s["peer"] == peer, proc.stderr_text
    assert int(s["sent"]) == len(ex.to_peer)
    assert int(s["received"]) == len(ex.to_ktlsd)
    return s


def _ktlsd_x509_client_args(pki: Pki, suite: str) -> list[str]:
    args = ["--ca", str(pki.ca), "--ciphers", suite, "--record-layer", "user"]
    if pki.client:
        args += ["--cert", str(pki.client.cert_path), "--key", str(pki.client.key_path)]
    return args


def _ktlsd_x509_server_args(pki: Pki, suite: str) -> list[str]:
    args = ["--cert", str(pki.server.cert_path), "--key", str(pki.server.key_path)]
    args += ["--ciphers", suite, "--record-layer", "user"]
    if pki.client:
        args += ["--ca", str(pki.ca), "--require-client-cert"]
    return args


# --- x509 matrix ---------------------------------------------------------------------------


@pytest.mark.parametrize(("suite", "auth"), MATRIX)
def test_connect_to_openssl_server(pkis: dict[str, Pki], suite: str, auth: str) -> None:
    pki = pkis[auth]
    port = free_port()
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-quiet",
            "-naccept", "1", "-cert", str(pki.server.cert_path),
            "-key", str(pki.server.key_path), "-ciphersuites", suite]  # fmt: skip
    if pki.client:
        argv += ["-Verify", "1", "-CAfile", str(pki.ca), "-verify_return_error"]
    with Proc(argv, name="s_server") as peer:
        wait_listening(port, proc=peer)
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *_ktlsd_x509_client_args(pki, suite))) as k:
            ex = exchange(k, peer)
            check_ktlsd_done(k, ex, suite=suite, peer="x509:CN=server,O=ktlsd tests")
            assert peer.wait_exit() == 0, peer.stderr_text


@pytest.mark.parametrize(("suite", "auth"), MATRIX)
def test_listen_for_openssl_client(pkis: dict[str, Pki], suite: str, auth: str) -> None:
    pki = pkis[auth]
    k, port = start_ktlsd_listen(*_ktlsd_x509_server_args(pki, suite))
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-quiet",
            "-CAfile", str(pki.ca), "-verify_return_error", "-verify_ip", "127.0.0.1",
            "-ciphersuites", suite]  # fmt: skip
    if pki.client:
        argv += ["-cert", str(pki.client.cert_path), "-key", str(pki.client.key_path)]
    with k, Proc(argv, name="s_client") as peer:
        ex = exchange(k, peer)
        expected = "x509:CN=host1,O=ktlsd tests" if pki.client else "anonymous"
        check_ktlsd_done(k, ex, suite=suite, peer=expected)
        assert peer.wait_exit() == 0, peer.stderr_text


@pytest.mark.parametrize(("suite", "auth"), MATRIX)
def test_connect_to_gnutls_server(pkis: dict[str, Pki], suite: str, auth: str) -> None:
    pki = pkis[auth]
    port = free_port()
    argv = ["gnutls-serv", "--echo", "-p", str(port), "--priority", gnutls_priority(suite),
            "--x509certfile", str(pki.server.cert_path),
            "--x509keyfile", str(pki.server.key_path)]  # fmt: skip
    if pki.client:
        argv += ["--require-client-cert", "--verify-client-cert", "--x509cafile", str(pki.ca)]
    else:
        argv += ["--disable-client-cert"]
    with Proc(argv, name="gnutls-serv", stdin=False) as peer:
        wait_listening(port, proc=peer)
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *_ktlsd_x509_client_args(pki, suite))) as k:
            ex = exchange(k, peer, echo=True, ktlsd_data=text_data())
            check_ktlsd_done(k, ex, suite=suite, peer="x509:CN=server,O=ktlsd tests")


@pytest.mark.parametrize(("suite", "auth"), MATRIX)
def test_listen_for_gnutls_client(
    pkis: dict[str, Pki], suite: str, auth: str, tmp_path: Path
) -> None:
    pki = pkis[auth]
    k, port = start_ktlsd_listen(*_ktlsd_x509_server_args(pki, suite))
    argv = ["gnutls-cli", "-p", str(port), "--priority", gnutls_priority(suite),
            "--x509cafile", str(pki.ca), "--logfile", str(tmp_path / "gnutls.log")]  # fmt: skip
    if pki.client:
        argv += ["--x509certfile", str(pki.client.cert_path),
                 "--x509keyfile", str(pki.client.key_path)]  # fmt: skip
    argv.append("127.0.0.1")
    with k, Proc(argv, name="gnutls-cli") as peer:
        ex = exchange(k, peer)
        expected = "x509:CN=host1,O=ktlsd tests" if pki.client else "anonymous"
        check_ktlsd_done(k, ex, suite=suite, peer=expected)
        assert peer.wait_exit() == 0, peer.stderr_text


# --- external PSK --------------------------------------------------------------------------

PSK_ARGS = ["--psk-identity", PSK_IDENTITY, "--psk", PSK_HEX, "--record-layer", "user"]
PSK_PEER = f"psk:{PSK_IDENTITY}"


def test_psk_connect_to_openssl_server() -> None:
    port = free_port()
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-quiet",
            "-naccept", "1", "-nocert", "-psk", PSK_HEX, "-psk_identity", PSK_IDENTITY]  # fmt: skip
    with Proc(argv, name="s_server") as peer:
        wait_listening(port, proc=peer)
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *PSK_ARGS)) as k:
            ex = exchange(k, peer)
            check_ktlsd_done(k, ex, suite="TLS_AES_128_GCM_SHA256", peer=PSK_PEER)
            assert peer.wait_exit() == 0, peer.stderr_text


def test_psk_listen_for_openssl_client() -> None:
    k, port = start_ktlsd_listen(*PSK_ARGS, "--ciphers", "TLS_CHACHA20_POLY1305_SHA256")
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-quiet",
            "-psk", PSK_HEX, "-psk_identity", PSK_IDENTITY]  # fmt: skip
    with k, Proc(argv, name="s_client") as peer:
        ex = exchange(k, peer)
        check_ktlsd_done(k, ex, suite="TLS_CHACHA20_POLY1305_SHA256", peer=PSK_PEER)
        assert peer.wait_exit() == 0, peer.stderr_text


def test_psk_connect_to_gnutls_server(tmp_path: Path) -> None:
    passwd = tmp_path / "psk.passwd"
    passwd.write_text(f"{PSK_IDENTITY}:{PSK_HEX}\n")
    port = free_port()
    argv = ["gnutls-serv", "--echo", "-p", str(port), "--pskpasswd", str(passwd),
            "--priority", gnutls_priority(psk=True)]  # fmt: skip
    with Proc(argv, name="gnutls-serv", stdin=False) as peer:
        wait_listening(port, proc=peer)
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *PSK_ARGS)) as k:
            ex = exchange(k, peer, echo=True, ktlsd_data=text_data())
            s = check_ktlsd_done(k, ex, suite=stats(k).get("suite", "?"), peer=PSK_PEER)
            assert s["suite"] in ("TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256")


def test_psk_listen_for_gnutls_client(tmp_path: Path) -> None:
    k, port = start_ktlsd_listen(*PSK_ARGS, "--ciphers", "TLS_AES_128_GCM_SHA256")
    argv = ["gnutls-cli", "-p", str(port), "--priority", gnutls_priority(psk=True),
            "--pskusername", PSK_IDENTITY, "--pskkey", PSK_HEX,
            "--logfile", str(tmp_path / "gnutls.log"), "127.0.0.1"]  # fmt: skip
    with k, Proc(argv, name="gnutls-cli") as peer:
        ex = exchange(k, peer)
        check_ktlsd_done(k, ex, suite="TLS_AES_128_GCM_SHA256", peer=PSK_PEER)
        assert peer.wait_exit() == 0, peer.stderr_text


SHA384_IDENTITY = "NVMe1R02 nqn.2014-08.org.nvmexpress:uuid:host nqn.2014-08.org.example:subsys"
SHA384_KEY = bytes(range(48))  # throwaway, tests only


def test_psk_sha384_connect_to_tlslite() -> None:
    """tlslite-ng (independent, pure Python) as an echo server with a SHA-384 external PSK."""
    port = free_port()
    with tlslite_echo("server", port, SHA384_IDENTITY.encode(), SHA384_KEY, "sha384") as peer:
        wait_listening(port, proc=peer)
        args = ["--psk-identity", SHA384_IDENTITY, "--psk", SHA384_KEY.hex(),
                "--psk-hash", "sha384", "--record-layer", "user"]  # fmt: skip
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args)) as k:
            ex = exchange(k, peer, echo=True)
            check_ktlsd_done(k, ex, suite="TLS_AES_256_GCM_SHA384", peer=f"psk:{SHA384_IDENTITY}")
            assert peer.wait_exit() == 0, peer.stderr_text


def test_psk_sha384_listen_for_tlslite() -> None:
    args = ["--psk-identity", SHA384_IDENTITY, "--psk", SHA384_KEY.hex(),
            "--psk-hash", "sha384", "--record-layer", "user"]  # fmt: skip
    k, port = start_ktlsd_listen(*args)
    with k, tlslite_echo("client", port, SHA384_IDENTITY.encode(), SHA384_KEY, "sha384") as peer:
        ex = exchange(k, peer, echo=True)
        check_ktlsd_done(k, ex, suite="TLS_AES_256_GCM_SHA384", peer=f"psk:{SHA384_IDENTITY}")
        assert peer.wait_exit() == 0, peer.stderr_text
