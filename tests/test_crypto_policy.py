"""The system crypto policy: ktlsd offers what the OpenSSL configuration allows and kTLS carries.

The library reads its configuration once per process, so every test of a custom policy runs
ktlsd in a child process with ``OPENSSL_CONF`` naming a real OpenSSL configuration file in a
temporary directory (a ``system_default`` section with ``Ciphersuites``/``Groups``). What
ktlsd offers is read on the wire: a plain TCP listener takes ``ktlsd connect``'s ClientHello,
and ``openssl s_server``/``s_client`` (with the machine's own configuration) negotiate with
ktlsd or fail to.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from ktlsd.tls import policy
from ktlsd.tls.session import CipherSuite
from tests.cli_peers import Proc, ktlsd
from tests.peers import openssl_client, openssl_server
from tests.pki import self_signed

AES128, AES256, CHACHA = (CipherSuite.TLS_AES_128_GCM_SHA256, CipherSuite.TLS_AES_256_GCM_SHA384,
                          CipherSuite.TLS_CHACHA20_POLY1305_SHA256)
SECP384R1, X25519 = 0x0018, 0x001D


def openssl_conf(tmp: Path, **commands: str) -> Path:
    """A real OpenSSL configuration file whose system_default section holds ``commands``."""
    path = tmp / "openssl.cnf"
    lines = ["openssl_conf = openssl_init", "", "[openssl_init]", "ssl_conf = ssl_sect", "",
             "[ssl_sect]", "system_default = system_default_sect", "",
             "[system_default_sect]", *(f"{key} = {value}" for key, value in commands.items())]
    path.write_text("\n".join(lines) + "\n")
    return path


def with_conf(conf: Path, argv: list[str]) -> list[str]:
    return ["env", f"OPENSSL_CONF={conf}", *argv]


def run_ktlsd(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(with_conf(conf, ktlsd(*args)), capture_output=True, text=True,
                          timeout=60, check=False, stdin=subprocess.DEVNULL)


def offered_by_connect(conf: Path, *args: str) -> policy.ClientHelloLists:
    """The ClientHello ``ktlsd connect`` sends under ``conf``, as a TCP listener reads it."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(30)
        port = listener.getsockname()[1]
        proc = Proc(with_conf(conf, ktlsd("connect", f"127.0.0.1:{port}", "--no-verify",
                                          *args)), name="ktlsd-connect", stdin=False)
        with proc:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(30)
                data = b""
                while len(data) < 5 or len(data) < 5 + int.from_bytes(data[3:5], "big"):
                    chunk = conn.recv(65536)
                    assert chunk, "ktlsd closed before its ClientHello was complete"
                    data += chunk
            assert proc.wait_exit() == 1  # we closed on it
    return policy.parse_client_hello(data[: 5 + int.from_bytes(data[3:5], "big")])


def tls13(hello: policy.ClientHelloLists) -> tuple[int, ...]:
    """The TLS 1.3 suites of a ClientHello (OpenSSL adds the renegotiation SCSV, 0x00FF)."""
    return tuple(code for code in hello.suites if code >> 8 == 0x13)


# --- pure: the intersections -------------------------------------------------------------


def test_suites_are_the_systems_that_ktls_carries_in_ktlsd_order() -> None:
    # The library's order (AES-256 first) does not matter; what it allows does.
    assert policy.choose_suites(None, (0x1302, 0x1303, 0x1301)).effective == (
        AES128, AES256, CHACHA)
    # CCM is allowed by the system but kTLS (here) does not carry it.
    choice = policy.choose_suites(None, (0x1304, 0x1303))
    assert choice.carried == choice.effective == (CHACHA,)
    # A request narrows in its own order and cannot widen.
    choice = policy.choose_suites((CHACHA, AES128, AES256), (0x1301, 0x1303))
    assert choice.effective == (CHACHA, AES128)
    assert choice.refused == (AES256,)


def test_empty_intersections_are_one_line_errors() -> None:
    with pytest.raises(policy.CryptoPolicyError) as raised:
        policy.effective_suites(None, (0x1304, 0x1305))
    assert str(raised.value) == (
        "no usable TLS 1.3 cipher suite: the system crypto policy (OpenSSL configuration) "
        "allows TLS_AES_128_CCM_SHA256:TLS_AES_128_CCM_8_SHA256, kTLS carries "
        "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256")
    with pytest.raises(policy.CryptoPolicyError) as raised:
        policy.effective_suites((AES256,), (0x1303,))
    assert str(raised.value) == (
        "no usable TLS 1.3 cipher suite: TLS_AES_256_GCM_SHA384 requested, the system crypto "
        "policy allows TLS_CHACHA20_POLY1305_SHA256 (OpenSSL configuration)")


def test_the_systems_lists_come_from_the_library() -> None:
    """In this process: the machine's own configuration. The suites are what a default
    context lists; the groups what its ClientHello offers, the key share among them."""
    suites = policy.system_suites()
    assert suites and all(code >> 8 == 0x13 for code in suites)
    groups, shares = policy.system_groups()
    assert groups and shares and set(shares) <= set(groups)
    # Left unconfigured, groups are not touched at all (the library keeps its default list,
    # with ML-KEM hybrids where it has them).
    assert policy.effective_groups(None) is None
    choice = policy.choose_groups(None)
    assert choice.effective == groups and choice.setting is None
    # A configured list the system allows entirely goes to OpenSSL as written.
    assert policy.effective_groups(f"{groups[-1]}:{groups[0]}") == f"{groups[-1]}:{groups[0]}"
    with pytest.raises(policy.CryptoPolicyError, match="OpenSSL refuses them"):
        policy.effective_groups("no-such-group")


def test_client_hello_parser_is_bounds_checked() -> None:
    with pytest.raises(ValueError):
        policy.parse_client_hello(b"\x16\x03\x01\x00\x05\x01\x00\x00\x09\x03")
    with pytest.raises(ValueError):
        policy.parse_client_hello(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")


# --- on the wire, with a custom OPENSSL_CONF ---------------------------------------------


def test_narrowing_the_system_suites_narrows_what_connect_offers(tmp_path: Path) -> None:
    default = offered_by_connect(openssl_conf(tmp_path))
    assert tls13(default) == (AES128.code, AES256.code, CHACHA.code)
    assert set(default.suites) - set(tls13(default)) == {0x00FF}  # the renegotiation SCSV
    narrow = tmp_path / "narrow"
    narrow.mkdir()
    conf = openssl_conf(narrow, Ciphersuites="TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_CCM_SHA256")
    assert tls13(offered_by_connect(conf)) == (CHACHA.code,)
    # --ciphers narrows within the policy, and what the policy forbids is an error.
    wide = tmp_path / "wide"
    wide.mkdir()
    conf2 = openssl_conf(wide, Ciphersuites="TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256")
    assert tls13(offered_by_connect(conf2, "--ciphers",
                                    "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
                                    )) == (CHACHA.code,)
    refused = run_ktlsd(conf, "connect", "127.0.0.1:9", "--ciphers", "TLS_AES_128_GCM_SHA256")
    assert refused.returncode == 1
    assert refused.stderr == (
        "ktlsd: no usable TLS 1.3 cipher suite: TLS_AES_128_GCM_SHA256 requested, the system "
        "crypto policy allows TLS_CHACHA20_POLY1305_SHA256 (OpenSSL configuration)\n")


def test_connect_and_listen_negotiate_within_the_policy_with_openssl(tmp_path: Path) -> None:
    """openssl s_server / s_client run with the machine's configuration (all suites)."""
    conf = openssl_conf(tmp_path, Ciphersuites="TLS_CHACHA20_POLY1305_SHA256")
    cert, key = self_signed(tmp_path)
    # A server that takes AES-128 only: ktlsd offers no suite it has.
    with openssl_server("-cert", cert, "-key", key, "-ciphersuites",
                        "TLS_AES_128_GCM_SHA256", "-naccept", "1") as server:
        failed = run_ktlsd(conf, "connect", f"127.0.0.1:{server.port}", "--no-verify")
        assert failed.returncode == 1
        assert "handshake failed" in failed.stderr
    # A server with every suite: ChaCha20 is what ktlsd offered, so it is chosen.
    with openssl_server("-cert", cert, "-key", key, "-naccept", "1") as server:
        ok = subprocess.run(with_conf(conf, ktlsd("connect", f"127.0.0.1:{server.port}",
                                                  "--no-verify")),
                            input="", capture_output=True, text=True, timeout=60, check=False)
        assert "suite=TLS_CHACHA20_POLY1305_SHA256" in ok.stderr, ok.stderr
    # ktlsd listen under the policy: a client offering AES-128 only is refused; ChaCha20 works.
    for client_suites, works in (("TLS_AES_128_GCM_SHA256", False),
                                 ("TLS_CHACHA20_POLY1305_SHA256", True)):
        listen = Proc(with_conf(conf, ktlsd("listen", "127.0.0.1:0", "--cert", cert, "--key",
                                            key)), name="ktlsd-listen", stdin=False)
        with listen:
            port = int(listen.wait_stderr(r"listening on \S+:(\d+)\n").group(1))
            with openssl_client(port, "-ciphersuites", client_suites) as client:
                if works:
                    client.wait_for("TLS_CHACHA20_POLY1305_SHA256")
                    listen.wait_stderr(r"handshake ok: suite=TLS_CHACHA20_POLY1305_SHA256")
                else:
                    assert listen.wait_exit() == 1
                    assert "handshake failed" in listen.stderr_text




def test_narrowing_the_system_groups_narrows_what_connect_offers(tmp_path: Path) -> None:
    conf = openssl_conf(tmp_path, Groups="P-384:X25519")
    hello = offered_by_connect(conf)
    assert hello.groups == (SECP384R1, X25519)
    assert hello.key_shares == (SECP384R1,)
    # --groups narrows to the allowed part; a list with nothing allowed is an error.
    assert offered_by_connect(conf, "--groups", "P-256:X25519").groups == (X25519,)
    refused = run_ktlsd(conf, "connect", "127.0.0.1:9", "--groups", "P-256")
    assert refused.returncode == 1
    assert refused.stderr == (
        "ktlsd: no usable key-exchange group: P-256 configured, the system crypto policy "
        "(OpenSSL configuration) allows secp384r1:x25519\n")


def test_an_empty_intersection_stops_run_and_check(tmp_path: Path) -> None:
    conf = openssl_conf(tmp_path, Ciphersuites="TLS_AES_128_CCM_SHA256")
    config = tmp_path / "ktlsd.conf"
    config.write_text("[ktlsd]\n")
    expected = ("no usable TLS 1.3 cipher suite: the system crypto policy (OpenSSL "
                "configuration) allows TLS_AES_128_CCM_SHA256, kTLS carries "
                "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256")
    check = run_ktlsd(conf, "run", "--check", "-c", str(config))
    assert check.returncode == 1
    assert check.stderr == f"ktlsd: {expected}\n"
    start = run_ktlsd(conf, "run", "-s", "-c", str(config), "--kernel", "no",
                      "--socket", str(tmp_path / "sock"))
    assert start.returncode == 1
    assert expected in start.stderr
    assert not (tmp_path / "sock").exists()
    connect = run_ktlsd(conf, "connect", "127.0.0.1:9")
    assert (connect.returncode, connect.stderr) == (1, f"ktlsd: {expected}\n")
    # [ktlsd] groups outside the system's groups: the same at start.
    groups_conf = tmp_path / "groups"
    groups_conf.mkdir()
    conf2 = openssl_conf(groups_conf, Groups="X25519")
    config.write_text("[ktlsd]\ngroups = P-256:P-384\n")
    check = run_ktlsd(conf2, "run", "--check", "-c", str(config))
    assert check.returncode == 1
    assert check.stderr == (
        "ktlsd: [ktlsd] groups: no usable key-exchange group: P-256:P-384 configured, the "
        "system crypto policy (OpenSSL configuration) allows x25519\n")
    config.write_text("[ktlsd]\ngroups = P-256:X25519\n")
    assert run_ktlsd(conf2, "run", "--check", "-c", str(config)).returncode == 0


def test_doctor_shows_the_effective_lists_and_why(tmp_path: Path) -> None:
    conf = openssl_conf(tmp_path, Ciphersuites="TLS_CHACHA20_POLY1305_SHA256:"
                        "TLS_AES_128_CCM_SHA256", Groups="P-384:X25519")
    config = tmp_path / "ktlsd.conf"
    config.write_text("[ktlsd]\ngroups = P-256:X25519\n")
    out = run_ktlsd(conf, "doctor", "--config", str(config)).stdout.splitlines()
    assert (f"INFO    OpenSSL configuration: {conf} [system_default_sect]: Ciphersuites = "
            "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_CCM_SHA256, Groups = P-384:X25519") in out
    assert ("OK      TLS 1.3 suites: TLS_CHACHA20_POLY1305_SHA256 (system policy allows "
            "TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_CCM_SHA256; kTLS carries "
            "TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256; a "
            "service request or --ciphers may narrow further)") in out
    assert ("OK      key-exchange groups: x25519 ([ktlsd] groups = P-256:X25519; not allowed "
            "by the system policy: secp256r1; system policy allows secp384r1:x25519)") in out
    # Without [ktlsd] groups: the system's, with its key share.
    config.write_text("[ktlsd]\n")
    out = run_ktlsd(conf, "doctor", "--config", str(config)).stdout.splitlines()
    assert ("OK      key-exchange groups: secp384r1:x25519 (system policy, key share "
            "secp384r1; [ktlsd] groups not set; kTLS does not depend on the group)") in out
    # Nothing usable: MISSING, and --strict fails.
    empty = tmp_path / "empty"
    empty.mkdir()
    conf3 = openssl_conf(empty, Ciphersuites="TLS_AES_128_CCM_SHA256")
    strict = run_ktlsd(conf3, "doctor", "--strict", "--config", str(config))
    assert strict.returncode == 1
    assert any(line.startswith("MISSING TLS 1.3 suites: none usable (system policy allows "
                               "TLS_AES_128_CCM_SHA256;") for line in strict.stdout.splitlines())


def test_doctor_without_a_system_default_section(tmp_path: Path) -> None:
    conf = tmp_path / "plain.cnf"
    conf.write_text("HOME = .\n")
    out = run_ktlsd(conf, "doctor").stdout.splitlines()
    assert (f"INFO    OpenSSL configuration: {conf}: no system_default section: the "
            "library's defaults") in out
