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
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli_peers import (
    Exchange,
    Proc,
    RawTlsPeer,
    digit_data,
    exchange,
    ktlsd,
    start_ktlsd_listen,
    text_data,
    tlslite_echo,
)
from tests.peers import free_port
from tests.pki import Authority, Issued
from tests.waiting import wait_listening

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
needs_gnutls = pytest.mark.skipif(shutil.which("gnutls-cli") is None, reason="needs gnutls-bin")

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


@needs_gnutls
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


@needs_gnutls
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


@needs_gnutls
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


@needs_gnutls
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_psk_sha384_listen_for_tlslite() -> None:
    args = ["--psk-identity", SHA384_IDENTITY, "--psk", SHA384_KEY.hex(),
            "--psk-hash", "sha384", "--record-layer", "user"]  # fmt: skip
    k, port = start_ktlsd_listen(*args)
    with k, tlslite_echo("client", port, SHA384_IDENTITY.encode(), SHA384_KEY, "sha384") as peer:
        ex = exchange(k, peer, echo=True)
        check_ktlsd_done(k, ex, suite="TLS_AES_256_GCM_SHA384", peer=f"psk:{SHA384_IDENTITY}")
        assert peer.wait_exit() == 0, peer.stderr_text


# --- KeyUpdate -----------------------------------------------------------------------------

KEY_UPDATE_EVERY = 64 * 1024


def key_update_counts(proc: Proc) -> tuple[int, int]:
    s = stats(proc)
    return int(s["key_updates_sent"]), int(s["key_updates_received"])


def check_key_update_counts(proc: Proc, *, at_least: int) -> None:
    """ktlsd sent at least ``at_least`` KeyUpdates (all update_requested); the peer answered.

    Each side of a 1 MiB exchange counts: our own updates every N bytes sent, plus requests
    when the peer's key has carried more than N bytes to us; the peer may answer several
    requests read together with one KeyUpdate. So: at_least <= sent, and 1 <= received <= sent.
    """
    sent, received = key_update_counts(proc)
    assert sent >= at_least, proc.stderr_text
    assert 1 <= received <= sent, proc.stderr_text


def test_key_updates_by_ktlsd_client_with_openssl_server(pkis: dict[str, Pki]) -> None:
    """ktlsd sends a KeyUpdate with update_requested after every 64 KiB; s_server answers each.

    1 MiB in 64 KiB steps is at least 15 updates (none before the first byte). ktlsd also asks
    the peer to update once the peer's key has protected more than 64 KiB towards it, so the
    exact count depends on how the two 1 MiB streams interleave; never below 15, and every
    KeyUpdate we send requests one back. OpenSSL answers (several requests read before it
    writes get one answer, as RFC 8446 §4.6.3 allows), so it sent between 1 and as many as we
    did, and both directions stay byte-exact across all those keys.
    """
    pki = pkis["rsa-server-only"]
    port = free_port()
    argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3", "-quiet",
            "-naccept", "1", "-cert", str(pki.server.cert_path),
            "-key", str(pki.server.key_path)]  # fmt: skip
    with Proc(argv, name="s_server") as peer:
        wait_listening(port, proc=peer)
        args = _ktlsd_x509_client_args(pki, "TLS_AES_256_GCM_SHA384")
        args += ["--key-update-every", "64k"]
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args)) as k:
            ex = exchange(k, peer, rounds=8)
            check_ktlsd_done(k, ex, suite="TLS_AES_256_GCM_SHA384",
                             peer="x509:CN=server,O=ktlsd tests")  # fmt: skip
            check_key_update_counts(k, at_least=15)
            assert peer.wait_exit() == 0, peer.stderr_text


@needs_gnutls
def test_key_updates_by_ktlsd_server_with_gnutls_client(
    pkis: dict[str, Pki], tmp_path: Path
) -> None:
    """ktlsd as server updates every 256 KiB it sends; GnuTLS follows and answers.

    Not more often: GnuTLS (3.7 and later, lib/tls13/key_update.c) fails the connection with
    "Too many handshake packets have been received" when it receives more than 8 KeyUpdates
    within one second — found here with 64 KiB steps, which gave up after 512 KiB.
    """
    pki = pkis["rsa-server-only"]
    k, port = start_ktlsd_listen(
        *_ktlsd_x509_server_args(pki, "TLS_CHACHA20_POLY1305_SHA256"),
        "--key-update-every", "256k",
    )
    argv = ["gnutls-cli", "-p", str(port), "--priority", gnutls_priority(),
            "--x509cafile", str(pki.ca), "--logfile", str(tmp_path / "gnutls.log"),
            "127.0.0.1"]  # fmt: skip
    with k, Proc(argv, name="gnutls-cli") as peer:
        ex = exchange(k, peer, rounds=4)
        check_ktlsd_done(k, ex, suite="TLS_CHACHA20_POLY1305_SHA256", peer="anonymous")
        check_key_update_counts(k, at_least=3)
        assert peer.wait_exit() == 0, peer.stderr_text


def test_key_updates_by_ktlsd_with_tlslite() -> None:
    """tlslite-ng (independent) follows ktlsd's SHA-384 KeyUpdates and answers the requests.

    256 KiB (pure-Python AES-GCM is slow; the 1 MiB SHA-384 relays are the tests above).
    """
    args = ["--psk-identity", SHA384_IDENTITY, "--psk", SHA384_KEY.hex(), "--psk-hash",
            "sha384", "--record-layer", "user", "--key-update-every", "64k"]  # fmt: skip
    k, port = start_ktlsd_listen(*args)
    with k, tlslite_echo("client", port, SHA384_IDENTITY.encode(), SHA384_KEY, "sha384") as peer:
        ex = exchange(k, peer, echo=True, rounds=4, size=256 * 1024)
        check_ktlsd_done(k, ex, suite="TLS_AES_256_GCM_SHA384", peer=f"psk:{SHA384_IDENTITY}")
        check_key_update_counts(k, at_least=3)
        assert peer.wait_exit() == 0, peer.stderr_text


def _key_update_reports(peer: Proc) -> int:
    """How often s_client ("KEYUPDATE" on stderr) or s_server (its printf) did a KeyUpdate."""
    both = peer.out + peer.err
    return both.count(b"KEYUPDATE") + both.count(b"SSL_do_handshake -> 1")


def _typed_key_updates(k: Proc, peer: Proc, rounds: str) -> tuple[bytes, bytes]:
    """Alternate 64 KiB of data each way with s_client/s_server commands typed on stdin.

    ``rounds`` is a string of command letters ("K": KeyUpdate with update_requested, "k":
    without). Each command is typed alone once the peer has sent everything before it, so
    that it starts a read of its own (OpenSSL looks at the first byte of each read); the peer
    reports when it acts on it (see :func:`_key_update_reports`). Returns all bytes sent each way.
    """
    to_ktlsd = to_peer = b""
    for letter in rounds:
        a, b = digit_data(64 * 1024), digit_data(64 * 1024)
        to_ktlsd += a
        to_peer += b
        k.feed(b)
        peer.type(a)
        k.wait_stdout_bytes(len(to_ktlsd))
        peer.wait_stdout(b)  # s_client's stdout also holds its status output
        before = _key_update_reports(peer)
        peer.type(letter.encode() + b"\n")
        peer.wait_for(lambda n=before: _key_update_reports(peer) > n, "did a KeyUpdate")
    a = digit_data(64 * 1024)  # and data after the last update, under the newest keys
    to_ktlsd += a
    peer.type(a)
    k.wait_stdout_bytes(len(to_ktlsd))
    k.feed(b"last words\n")
    peer.wait_stdout(b"last words\n")
    assert bytes(k.out) == to_ktlsd
    return to_ktlsd, to_peer + b"last words\n"


def test_key_updates_typed_into_openssl_client(pkis: dict[str, Pki]) -> None:
    """``s_client`` sends KeyUpdates on typed "K"/"k"; ktlsd follows, and answers each "K"."""
    pki = pkis["rsa-server-only"]
    k, port = start_ktlsd_listen(*_ktlsd_x509_server_args(pki, "TLS_AES_128_GCM_SHA256"))
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
            "-CAfile", str(pki.ca), "-verify_return_error"]  # fmt: skip
    with k, Proc(argv, name="s_client") as peer:
        _typed_key_updates(k, peer, "KkKkK")
        peer.close_stdin()  # s_client closes the connection at the end of its stdin
        k.close_stdin()
        assert k.wait_exit() == 0, k.stderr_text
        assert key_update_counts(k) == (3, 5)  # three answers, five updates followed


def test_key_updates_typed_into_openssl_server(pkis: dict[str, Pki]) -> None:
    """``s_server`` does the same on typed "K"/"k", after its NewSessionTickets."""
    pki = pkis["ecdsa-mutual"]
    port = free_port()
    # s_server reports a typed command with printf(): stdbuf makes that line-buffered, or it
    # would sit in stdio's pipe buffer until exit and the test could not wait for it.
    argv = ["stdbuf", "-oL", "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3",
            "-naccept", "1", "-cert", str(pki.server.cert_path),
            "-key", str(pki.server.key_path)]  # fmt: skip
    with Proc(argv, name="s_server") as peer:
        wait_listening(port, proc=peer)
        args = _ktlsd_x509_client_args(pki, "TLS_CHACHA20_POLY1305_SHA256")
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args)) as k:
            peer.wait_stdout(b"CIPHER is")  # handshake done: typed data goes to the client
            _typed_key_updates(k, peer, "kKKk")
            k.close_stdin()  # close_notify: s_server ends the connection and answers in kind
            assert k.wait_exit() == 0, k.stderr_text
            assert key_update_counts(k) == (2, 4)


# --- fatal errors (RFC 8446 §6) ------------------------------------------------------------
#
# The peer is tlslite-ng for the handshake, then raw records (tests.cli_peers.RawTlsPeer), so
# it can send what no TLS library would and see every record that comes back. ktlsd's stdin
# stays open throughout: it must end at once, not wait for it.

RAW_IDENTITY = b"raw-peer"
RAW_KEY = bytes(range(32))  # throwaway, tests only
RAW_ARGS = ["--psk-identity", RAW_IDENTITY.decode(), "--psk", RAW_KEY.hex(),
            "--record-layer", "user"]  # fmt: skip

ALERT = {"unexpected_message": 10, "bad_record_mac": 20, "record_overflow": 22,
         "illegal_parameter": 47, "decode_error": 50}  # fmt: skip


def _tampered(peer: RawTlsPeer) -> bytes:
    wire = bytearray(peer.seal(23, b"GET / HTTP/1.0\r\n\r\n"))
    wire[-1] ^= 0x01  # the tag no longer matches
    return bytes(wire)


#: name -> (what the peer puts on the wire, the alert ktlsd must send, text of its error line)
BAD_RECORDS = {
    "oversized record": (
        lambda p: b"\x17\x03\x03" + (2**14 + 257).to_bytes(2, "big") + bytes(64),
        "record_overflow", "exceeds 2^14+256",
    ),
    "too much plaintext with padding": (
        lambda p: p.seal(23, b"x" * (2**14 - 8), padding=9), "record_overflow", "2^14+1",
    ),
    "failed authentication": (_tampered, "bad_record_mac", "bad_record_mac"),
    "change_cipher_spec after the handshake": (
        lambda p: b"\x14\x03\x03\x00\x01\x01", "unexpected_message", "outer record type 20",
    ),
    "record without content type": (
        lambda p: p.seal(0, b""), "unexpected_message", "no content type",
    ),
    "malformed alert": (lambda p: p.seal(21, b"\x02"), "decode_error", "malformed TLS alert"),
    "handshake message after the handshake": (
        lambda p: p.seal(22, b"\x01\x00\x00\x00"), "unexpected_message", "ClientHello",
    ),
    "KeyUpdate with a bad request_update": (
        lambda p: p.seal(22, b"\x18\x00\x00\x01\x07"), "illegal_parameter", "0 or 1",
    ),
    "KeyUpdate of the wrong length": (
        lambda p: p.seal(22, b"\x18\x00\x00\x02\x00\x00"), "decode_error", "KeyUpdate of 2",
    ),
}


def _raw_pair(role: str) -> tuple[Proc, RawTlsPeer]:
    """ktlsd (``role``: connect or listen) and a RawTlsPeer, handshake done, record layer up."""
    if role == "listen":
        k, port = start_ktlsd_listen(*RAW_ARGS)
        peer = RawTlsPeer.connect(port, RAW_IDENTITY, RAW_KEY)
    else:
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            port = listener.getsockname()[1]
            k = Proc(ktlsd("connect", f"127.0.0.1:{port}", *RAW_ARGS))
            peer = RawTlsPeer.accept(listener, RAW_IDENTITY, RAW_KEY)
    k.wait_stderr("record layer: user")
    return k, peer


def _check_failed_alone(k: Proc, cause: str) -> None:
    """ktlsd exited 1 with one failure line naming ``cause`` — its stdin never closed."""
    assert k.wait_exit() == 1, k.stderr_text
    failures = [line for line in k.stderr_text.splitlines() if "failed" in line]
    assert len(failures) == 1, k.stderr_text
    assert failures[0].startswith("ktlsd: connection failed: "), k.stderr_text
    assert cause in failures[0], k.stderr_text
    assert "Traceback" not in k.stderr_text
    assert "closed:" not in k.stderr_text


@pytest.mark.parametrize("role", ["connect", "listen"])
@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_gets_one_fatal_alert_and_no_close_notify(role: str, case: str) -> None:
    """A bad record after the handshake: exactly the matching fatal alert, then TCP EOF.

    Nothing follows the alert (no close_notify, which would tell the peer the stream ended
    cleanly), and ktlsd exits 1 at once with one line, although its stdin is still open.
    """
    make_wire, alert, cause = BAD_RECORDS[case]
    k, peer = _raw_pair(role)
    with k, peer:
        peer.send_raw(make_wire(peer))
        assert peer.read_records() == [(21, bytes((2, ALERT[alert])))]
        peer.close()
        _check_failed_alone(k, cause)


@pytest.mark.parametrize("role", ["connect", "listen"])
def test_fatal_alert_from_the_peer_ends_without_close_notify(role: str) -> None:
    """The peer's fatal alert: ktlsd sends nothing back (RFC 8446 §6.2) and exits 1 at once."""
    k, peer = _raw_pair(role)
    with k, peer:
        peer.send(21, bytes((2, 80)))  # internal_error
        assert peer.read_records() == []
        peer.close()
        _check_failed_alone(k, "peer sent TLS alert internal_error")


def test_fatal_error_after_data_relayed() -> None:
    """Mid-stream: what arrived before the bad record is printed, then the alert, then exit 1."""
    k, peer = _raw_pair("listen")
    with k, peer:
        peer.send(23, b"before the error\n")
        k.wait_stdout(b"before the error\n")
        peer.send_raw(_tampered(peer))
        assert peer.read_records() == [(21, bytes((2, ALERT["bad_record_mac"])))]
        peer.close()
        _check_failed_alone(k, "bad_record_mac")
        assert bytes(k.out) == b"before the error\n"


# --- listen --www ----------------------------------------------------------------------------


def test_www_answers_an_openssl_client_and_closes_cleanly(pkis: dict[str, Pki]) -> None:
    """``listen --www``: openssl s_client's GET gets a page; both sides end cleanly."""
    pki = pkis["rsa-server-only"]
    k, port = start_ktlsd_listen(
        "--www", "--cert", str(pki.server.cert_path), "--key", str(pki.server.key_path),
        "--record-layer", "user",
    )  # fmt: skip
    argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-quiet",
            "-CAfile", str(pki.ca), "-verify_return_error"]  # fmt: skip
    with k, Proc(argv, name="s_client") as peer:
        peer.feed(b"GET / HTTP/1.0\r\n\r\n")  # stdin stays open: the server ends it
        assert k.wait_exit() == 0, k.stderr_text
        assert peer.wait_exit() == 0, peer.stderr_text
        head, _, body = bytes(peer.out).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK\r\n"), peer.out
        assert b"Content-Type: text/plain" in head
        length = re.search(rb"Content-Length: (\d+)", head)
        assert length and int(length.group(1)) == len(body)
        assert b"protocol=TLSv1.3 suite=TLS_AES_256_GCM_SHA384" in body  # OpenSSL's pick
        assert stats(k)["received"] == "18"


def test_www_answer_is_one_record_then_close_notify() -> None:
    """The request may come in pieces; the answer is one record, then close_notify, then EOF
    (what tlsfuzzer expects of an ``s_server -www``-like server)."""
    k, port = start_ktlsd_listen("--www", *RAW_ARGS)
    with k, RawTlsPeer.connect(port, RAW_IDENTITY, RAW_KEY) as peer:
        for piece in (b"GET /", b"", b"index.html HTTP/1.0\r\n", b"Host: x\r\n", b"\r\n"):
            peer.send(23, piece)
        records = peer.read_records()
        assert [r[0] for r in records] == [23, 21], records
        assert records[0][1].startswith(b"HTTP/1.0 200 OK\r\n")
        assert records[1] == (21, b"\x01\x00")  # close_notify
        peer.send(21, b"\x01\x00")
        peer.close()
        assert k.wait_exit() == 0, k.stderr_text


def test_www_refuses_what_is_not_a_get() -> None:
    k, port = start_ktlsd_listen("--www", *RAW_ARGS)
    with k, RawTlsPeer.connect(port, RAW_IDENTITY, RAW_KEY) as peer:
        peer.send(23, b"BREW /pot HTTP/1.0\r\n\r\n")
        records = peer.read_records()
        assert records[0][1].startswith(b"HTTP/1.0 400 Bad Request\r\n"), records
        peer.close()
        assert k.wait_exit() == 0, k.stderr_text
