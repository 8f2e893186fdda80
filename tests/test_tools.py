"""``ktlsd connect`` / ``ktlsd listen``: ktlsd at both ends, NVMe PSK strings, refusals, usage.

The tools run as a user runs them (``python -m ktlsd ...`` subprocesses over loopback).
Interop with other TLS implementations is in :mod:`tests.test_tools_interop`.

Every refusal must end the process with a non-zero status and a single line on stderr that
names the cause, without a traceback; every stderr line of the tools starts with "ktlsd: ".
"""

from __future__ import annotations

import os
import pty
import re
import socket
import threading
from pathlib import Path

import pytest

from ktlsd.nvme import keys as nvme_keys
from ktlsd.tls import ktls
from tests.cli_peers import MIB, Proc, exchange, ktlsd, start_ktlsd_listen
from tests.pki import Authority, Issued

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:5a1e0b3c-7e61-4c5e-9f0a-2b44d2f3c001"
SUBSYSNQN = "nqn.2014-08.org.example:nvme-target-1"
PSK_HEX = "0f1e2d3c4b5a6978" * 4  # throwaway, tests only
OTHER_HEX = "8796a5b4c3d2e1f0" * 4


class Certs:
    """One PKI for the whole module: a CA, good and expired leaves, and a foreign CA."""

    def __init__(self, root: Path) -> None:
        self.ca = Authority.create(root / "ca", "ecdsa")
        self.other_ca = Authority.create(root / "other", "ecdsa")
        self.server = self.ca.issue_server()
        self.expired_server = self.ca.issue_server("old-server", expired=True)
        self.client = self.ca.issue_client("host1")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs(tmp_path_factory.mktemp("pki"))


def cert_args(issued: Issued) -> list[str]:
    return ["--cert", str(issued.cert_path), "--key", str(issued.key_path)]


def status(proc: Proc) -> dict[str, str]:
    text = proc.stderr_text
    found = dict(re.findall(r"\b(\w+)=(\S+)", text))
    if m := re.search(r"record layer: (\w+)", text):
        found["record_layer"] = m.group(1)
    if m := re.search(r"handshake ok: .* peer=(.*)$", text, re.MULTILINE):
        found["peer"] = m.group(1)
    return found


def assert_clean_failure(proc: Proc, cause: str, *, rc: int = 1) -> str:
    """``proc`` exited with ``rc`` and one line naming ``cause``; returns that line."""
    assert proc.wait_exit() == rc, proc.stderr_text
    text = proc.stderr_text
    assert "Traceback" not in text, text
    lines = text.splitlines()
    assert lines, "nothing on stderr"
    assert all(line.startswith("ktlsd: ") for line in lines), text
    failures = [
        line for line in lines
        if not re.match(r"ktlsd: (listening on|connected to|connection from|handshake ok|"
                        r"record layer)", line)
    ]  # fmt: skip
    assert len(failures) == 1, text
    assert cause in failures[0], text
    return failures[0]


def run_pair(
    listen_args: list[str], connect_args: list[str], *, data: bool = False
) -> tuple[Proc, Proc]:
    """A ``listen`` and a ``connect`` to it; with ``data`` they relay 1 MiB each way."""
    server, port = start_ktlsd_listen(*listen_args)
    client = Proc(ktlsd("connect", f"127.0.0.1:{port}", *connect_args), name="ktlsd-connect")
    if data:
        exchange(client, server)  # closes the client's stdin: close_notify to the server
        server.close_stdin()  # the server's direction ends when its own input does
    else:
        client.close_stdin()
        server.close_stdin()
    return server, client


# --- ktlsd <-> ktlsd ---------------------------------------------------------------------


def test_x509_mutual_user_record_layer(certs: Certs) -> None:
    """Mutual x509 between two ktlsd ends: 1 MiB each way, identities and status lines."""
    server, client = run_pair(
        [*cert_args(certs.server), "--ca", str(certs.ca.cert_path), "--require-client-cert",
         "--record-layer", "user"],
        [*cert_args(certs.client), "--ca", str(certs.ca.cert_path), "--record-layer", "user"],
        data=True,
    )  # fmt: skip
    with server, client:
        assert client.wait_exit() == 0, client.stderr_text
        assert server.wait_exit() == 0, server.stderr_text
        s, c = status(server), status(client)
        assert s["peer"] == "x509:CN=host1,O=ktlsd tests"
        assert c["peer"] == "x509:CN=server,O=ktlsd tests"
        for st in (s, c):
            assert st["suite"] == "TLS_AES_128_GCM_SHA256"  # OpenSSL's first choice
            assert st["record_layer"] == "user"
            assert int(st["sent"]) == int(st["received"]) == MIB
            assert st["key_updates_sent"] == st["key_updates_received"] == "0"


def test_key_updates_from_both_ends(certs: Certs) -> None:
    """Both ends update every 64 KiB they send and ask the other to follow; data stays exact.

    Each side sends at least 15 KeyUpdates for 1 MiB; what one sent the other received.
    """
    server, port = start_ktlsd_listen(
        *cert_args(certs.server), "--record-layer", "user", "--key-update-every", "64KiB",
        "--ciphers", "TLS_AES_256_GCM_SHA384",
    )  # fmt: skip
    args = ["--ca", str(certs.ca.cert_path), "--record-layer", "user", "--key-update-every", "64k"]
    client = Proc(ktlsd("connect", f"127.0.0.1:{port}", *args), name="ktlsd-connect")
    with server, client:
        exchange(client, server, rounds=4)
        server.close_stdin()
        assert client.wait_exit() == 0, client.stderr_text
        assert server.wait_exit() == 0, server.stderr_text
        s, c = status(server), status(client)
        assert s["suite"] == c["suite"] == "TLS_AES_256_GCM_SHA384"
        assert int(s["key_updates_sent"]) >= 15 and int(c["key_updates_sent"]) >= 15
        assert s["key_updates_sent"] == c["key_updates_received"]
        assert c["key_updates_sent"] == s["key_updates_received"]


@pytest.mark.parametrize(
    ("hash_id", "suite"),
    [(1, "TLS_AES_128_GCM_SHA256"), (2, "TLS_AES_256_GCM_SHA384")],
)
def test_nvme_interchange_psk(hash_id: int, suite: str) -> None:
    """``--psk NVMeTLSkey-1:0h:...:`` with NQNs: both ends derive the same identity and key.

    The identity expected is computed here with :mod:`ktlsd.nvme.keys` (checked against
    nvme-cli's vectors in its own tests); 02 keys bind the PSK to SHA-384.
    """
    configured = nvme_keys.generate_configured_psk(hash_id)
    text = nvme_keys.format_interchange(configured, hash_id)
    derived = nvme_keys.derive_nvme_tls_key(configured, hash_id, HOSTNQN, SUBSYSNQN, version=1)
    args = ["--psk", text, "--hostnqn", HOSTNQN, "--subsysnqn", SUBSYSNQN, "--record-layer", "user"]
    server, client = run_pair(args, args, data=True)
    with server, client:
        assert client.wait_exit() == 0, client.stderr_text
        assert server.wait_exit() == 0, server.stderr_text
        for proc in (server, client):
            st = status(proc)
            assert st["suite"] == suite
            assert st["peer"] == f"psk:{derived.identity}"
            assert str(derived.identity).startswith(f"NVMe1R0{hash_id} ")
            assert text.split(":")[2] not in proc.stderr_text  # the key is never printed


@pytest.mark.skipif(ktls.cached_probe().usable, reason="this kernel has kTLS")
def test_kernel_record_layer_without_ktls_fails_cleanly(certs: Certs) -> None:
    """``--record-layer kernel`` on a kernel without kTLS: the handshake succeeds, then both
    ends stop with one line saying there is no kTLS, and exit 1."""
    server, client = run_pair(
        [*cert_args(certs.server), "--record-layer", "kernel"],
        ["--ca", str(certs.ca.cert_path), "--record-layer", "kernel"],
    )
    with server, client:
        for proc in (server, client):
            line = assert_clean_failure(proc, "no kTLS")
            assert line.startswith("ktlsd: connection failed:")
            assert "handshake ok" in proc.stderr_text


def test_listen_count_two(certs: Certs) -> None:
    """``listen --count 2`` serves two connections one after the other, then exits 0."""
    server, port = start_ktlsd_listen(
        *cert_args(certs.server), "--record-layer", "user", "--count", "2"
    )
    with server:
        server.close_stdin()  # nothing to send: each connection ends when the client's does
        for n in (1, 2):
            args = ["--ca", str(certs.ca.cert_path), "--record-layer", "user"]
            with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args), name="client") as client:
                client.feed(b"hello %d\n" % n, close=True)
                assert client.wait_exit() == 0, client.stderr_text
            server.wait_for(lambda n=n: server.out.count(b"hello") == n, f"served client {n}")
        assert server.wait_exit() == 0, server.stderr_text
        assert bytes(server.out) == b"hello 1\nhello 2\n"
        assert server.stderr_text.count("handshake ok") == 2
        assert server.stderr_text.count("closed: sent=0 received=8") == 2


def test_listen_count_two_typing_at_a_terminal(certs: Certs) -> None:
    """With a terminal as stdin, what is typed during the second connection reaches it.

    When a peer closes, ``listen`` closes too if stdin is a terminal, while the read of the
    terminal is still pending. That read must serve the next connection: a reader per
    connection once swallowed the first line typed for the second client.
    """
    master, slave = pty.openpty()
    try:
        server = Proc(ktlsd("listen", "127.0.0.1:0", *cert_args(certs.server), "--record-layer",
                            "user", "--count", "2"), name="listen", stdin=slave)  # fmt: skip
        os.close(slave)
        slave = -1
        with server:
            port = int(server.wait_stderr(r"listening on \S+:(\d+)\n").group(1))
            for n in (1, 2):
                args = ["--ca", str(certs.ca.cert_path), "--record-layer", "user"]
                with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args)) as client:
                    client.wait_stderr("record layer")
                    server.wait_for(lambda n=n: server.err.count(b"record layer") == n,
                                    f"handed connection {n} over")  # fmt: skip
                    os.write(master, b"typed for client %d\n" % n)
                    client.wait_stdout(b"typed for client %d\n" % n, timeout=10)
                    client.close_stdin()
                    assert client.wait_exit() == 0, client.stderr_text
                    assert bytes(client.out) == b"typed for client %d\n" % n
            assert server.wait_exit() == 0, server.stderr_text
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)


@pytest.mark.skipif(ktls.cached_probe().usable, reason="this kernel has kTLS")
def test_auto_record_layer_is_user_space_without_ktls(certs: Certs) -> None:
    """The default ``--record-layer auto`` falls back to user space here, and says so."""
    server, client = run_pair(cert_args(certs.server), ["--ca", str(certs.ca.cert_path)])
    with server, client:
        for proc in (server, client):
            assert proc.wait_exit() == 0, proc.stderr_text
            assert status(proc)["record_layer"] == "user"


def test_ipv6_loopback(certs: Certs) -> None:
    """``[::1]:PORT`` on both ends; the client checks the server's IP SAN ::1."""
    server = Proc(ktlsd("listen", "[::1]:0", *cert_args(certs.server), "--record-layer", "user"))
    with server:
        port = int(server.wait_stderr(r"listening on \S+:(\d+)\n").group(1))
        args = ["--ca", str(certs.ca.cert_path), "--record-layer", "user"]
        with Proc(ktlsd("connect", f"[::1]:{port}", *args)) as client:
            client.feed(b"over v6\n", close=True)
            server.wait_stdout(b"over v6\n")
            server.close_stdin()
            assert client.wait_exit() == 0, client.stderr_text
            assert server.wait_exit() == 0, server.stderr_text
            assert status(client)["peer"] == "x509:CN=server,O=ktlsd tests"


def test_dns_name_checked_by_default(certs: Certs) -> None:
    """``connect localhost:PORT`` checks the server certificate's DNS SAN "localhost"."""
    server, port = start_ktlsd_listen(*cert_args(certs.server))
    with server:
        server.close_stdin()
        with Proc(ktlsd("connect", f"localhost:{port}", "--ca", str(certs.ca.cert_path))) as c:
            c.close_stdin()
            assert c.wait_exit() == 0, c.stderr_text
            assert "peer=x509:CN=server" in c.stderr_text


def test_quiet_hides_status_but_not_failures(certs: Certs) -> None:
    server, client = run_pair(
        cert_args(certs.server), ["--ca", str(certs.other_ca.cert_path), "-q"]
    )
    with server, client:
        line = assert_clean_failure(client, "untrusted certificate")
        assert client.stderr_text == line + "\n"  # nothing but the failure


# --- refusals ------------------------------------------------------------------------------


def test_wrong_psk(certs: Certs) -> None:
    server, client = run_pair(
        ["--psk-identity", "host1", "--psk", PSK_HEX],
        ["--psk-identity", "host1", "--psk", OTHER_HEX],
    )
    with server, client:
        assert_clean_failure(server, "handshake failed: peer rejected")
        assert_clean_failure(client, "handshake failed: peer rejected")


def test_unknown_psk_identity() -> None:
    server, client = run_pair(
        ["--psk-identity", "host1", "--psk", PSK_HEX],
        ["--psk-identity", "host2", "--psk", PSK_HEX],
    )
    with server, client:
        assert "host2" in assert_clean_failure(server, "unknown psk identity")
        assert_clean_failure(client, "unknown psk identity")


def test_untrusted_ca(certs: Certs) -> None:
    server, client = run_pair(
        cert_args(certs.server), ["--ca", str(certs.other_ca.cert_path)]
    )
    with server, client:
        assert_clean_failure(client, "untrusted certificate")
        assert_clean_failure(server, "handshake failed")


def test_wrong_peer_name(certs: Certs) -> None:
    server, client = run_pair(
        cert_args(certs.server),
        ["--ca", str(certs.ca.cert_path), "--peername", "other.example"],
    )
    with server, client:
        assert_clean_failure(client, "untrusted certificate")
        assert_clean_failure(server, "handshake failed")


def test_expired_certificate(certs: Certs) -> None:
    server, client = run_pair(
        cert_args(certs.expired_server), ["--ca", str(certs.ca.cert_path)]
    )
    with server, client:
        assert "expired" in assert_clean_failure(client, "untrusted certificate")
        assert_clean_failure(server, "handshake failed")


def test_revoked_certificate(certs: Certs, tmp_path: Path) -> None:
    crl = certs.ca.write_crl([certs.server], name="revoked-server.crl")
    server, client = run_pair(
        cert_args(certs.server), ["--ca", str(certs.ca.cert_path), "--crl", str(crl)]
    )
    with server, client:
        assert "revoked" in assert_clean_failure(client, "untrusted certificate")
        assert_clean_failure(server, "handshake failed")


def test_client_without_certificate_when_required(certs: Certs) -> None:
    """In TLS 1.3 the client's handshake completes first; the refusal (certificate_required)
    arrives as the first record after it and must still read as a refusal."""
    server, client = run_pair(
        [*cert_args(certs.server), "--ca", str(certs.ca.cert_path), "--require-client-cert"],
        ["--ca", str(certs.ca.cert_path)],
    )
    with server, client:
        assert_clean_failure(server, "handshake failed: peer rejected")
        line = assert_clean_failure(client, "handshake failed: peer rejected")
        assert "certificate_required" in line


def test_peer_that_never_answers() -> None:
    """A TCP server that accepts and never writes: ``--timeout`` ends the handshake."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        accepted: list[socket.socket] = []
        t = threading.Thread(target=lambda: accepted.append(listener.accept()[0]), daemon=True)
        t.start()
        args = ["--psk-identity", "host1", "--psk", PSK_HEX, "--timeout", "0.5"]
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args), name="client") as client:
            assert_clean_failure(client, "handshake failed: timeout")
        t.join(5)
        for s in accepted:
            s.close()


def test_client_that_never_speaks(certs: Certs) -> None:
    """``listen`` facing a client that connects and sends nothing times out as well."""
    server, port = start_ktlsd_listen(*cert_args(certs.server), "--timeout", "0.5")
    with server, socket.create_connection(("127.0.0.1", port)):
        assert_clean_failure(server, "handshake failed: timeout")


def test_unreadable_certificate_file(tmp_path: Path, certs: Certs) -> None:
    missing = tmp_path / "nowhere.pem"
    with Proc(ktlsd("listen", "127.0.0.1:0", "--cert", str(missing), "--key",
                    str(certs.server.key_path)), name="listen") as proc:  # fmt: skip
        assert "nowhere.pem" in assert_clean_failure(proc, "missing material")


@pytest.mark.parametrize(
    ("psk", "message"),
    [
        ("xyz", "neither hex nor an NVMeTLSkey-1 string"),
        ("NVMeTLSkey-1:01:AAAA:", "--psk:"),
        ("", "--psk-identity needs --psk or --psk-file"),
    ],
)
def test_bad_psk_string(psk: str, message: str) -> None:
    args = ["--psk-identity", "host1"] + (["--psk", psk] if psk else [])
    with Proc(ktlsd("connect", "127.0.0.1:9", *args), name="connect") as proc:
        assert_clean_failure(proc, message, rc=2)


def test_psk_from_a_file(tmp_path: Path) -> None:
    """--psk-file keeps the key off the command line (ps, shell history); hex or NVMe string."""
    hexfile = tmp_path / "psk.hex"
    hexfile.write_text(PSK_HEX + "\n")
    nvmefile = tmp_path / "psk.nvme"
    nvmefile.write_text(nvme_keys.format_interchange(bytes.fromhex(PSK_HEX), 1) + "\n")
    nvme = ["--hostnqn", HOSTNQN, "--subsysnqn", SUBSYSNQN]
    for key_args in (["--psk-identity", "host1", "--psk-file", str(hexfile)],
                     ["--psk-file", str(nvmefile), *nvme]):
        server, client = run_pair(key_args, key_args, data=True)
        with server, client:
            assert client.wait_exit() == 0, client.stderr_text
            assert server.wait_exit() == 0, server.stderr_text
            assert int(status(client)["received"]) == MIB
    with Proc(ktlsd("connect", "127.0.0.1:9", "--psk-file", str(tmp_path / "absent")),
              name="connect") as proc:
        assert_clean_failure(proc, "--psk-file", rc=2)
    with Proc(ktlsd("connect", "127.0.0.1:9", "--psk", PSK_HEX, "--psk-file", str(hexfile)),
              name="connect") as proc:
        assert_clean_failure(proc, "exclude each other", rc=2)


def test_nvme_psk_without_nqns() -> None:
    text = nvme_keys.format_interchange(bytes(32), 1)
    with Proc(ktlsd("connect", "127.0.0.1:9", "--psk", text), name="connect") as proc:
        assert_clean_failure(proc, "needs --hostnqn and --subsysnqn", rc=2)


def test_nothing_listening() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        args = ["--psk-identity", "host1", "--psk", PSK_HEX]
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args), name="connect") as proc:
            line = assert_clean_failure(proc, f"cannot connect to 127.0.0.1:{port}")
            assert "refused" in line.lower()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["connect", "nohostport"], "needs HOST:PORT"),
        (["connect", "localhost:http"], "bad port"),
        (["listen", "70000", "--psk-identity", "a", "--psk", PSK_HEX], "out of range"),
        (["listen", "0"], "listen needs --psk/--psk-identity or --cert/--key"),
        (["connect", "127.0.0.1:9", "--cert", "x.pem"], "--cert and --key go together"),
        (["connect", "127.0.0.1:9", "--ciphers", "TLS_RC4"], "unknown TLS 1.3 cipher suite"),
    ],
)
def test_usage_errors(argv: list[str], message: str) -> None:
    with Proc(ktlsd(*argv), name="ktlsd") as proc:
        assert_clean_failure(proc, message, rc=2)


def test_count_must_be_positive() -> None:
    with Proc(ktlsd("listen", "0", "--psk-identity", "a", "--psk", PSK_HEX, "--count", "0")) as p:
        assert p.wait_exit() == 2
        assert "--count: must be at least 1" in p.stderr_text


def test_listen_forever(certs: Certs) -> None:
    """``--forever`` keeps serving after connections end, failed ones included."""
    server, port = start_ktlsd_listen(*cert_args(certs.server), "--forever")
    with server:
        server.close_stdin()
        for n in range(3):
            args = ["--ca", str((certs.other_ca if n == 1 else certs.ca).cert_path)]
            with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args)) as client:
                client.close_stdin()
                assert client.wait_exit() == (1 if n == 1 else 0), client.stderr_text
        server.wait_for(lambda: server.err.count(b"closed:") == 2, "served two clients")
        assert server.stderr_text.count("connection from") == 3
        assert server.proc.poll() is None  # still serving


def test_listen_forever_serves_others_while_a_peer_is_silent(certs: Certs) -> None:
    """Connections are served concurrently: a peer that connects and never speaks (its
    handshake would time out only after a minute) holds up nobody, and neither does one
    that went silent after its handshake."""
    server, port = start_ktlsd_listen(
        *cert_args(certs.server), "--forever", "--timeout", "60", "--record-layer", "user"
    )
    with server, socket.create_connection(("127.0.0.1", port)) as silent:
        server.close_stdin()
        server.wait_stderr("connection from")
        args = ["--ca", str(certs.ca.cert_path), "--record-layer", "user"]
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args), name="first") as first:
            first.wait_stderr("record layer")  # handshake done; it stays connected, silent
            with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args), name="second") as second:
                second.feed(b"hello\n", close=True)
                assert second.wait_exit() == 0, second.stderr_text
            server.wait_stdout(b"hello\n")
            server.wait_for(lambda: server.err.count(b"closed:") == 1, "closed the second")
            assert first.proc.poll() is None  # still connected
            first.close_stdin()
            assert first.wait_exit() == 0, first.stderr_text
        server.wait_for(lambda: server.err.count(b"closed:") == 2, "closed the first")
        assert "handshake failed" not in server.stderr_text  # the silent one is still waiting
        assert silent.fileno() >= 0
        assert server.proc.poll() is None


def test_idle_timeout_ends_a_silent_connection(certs: Certs) -> None:
    """``--idle-timeout``: a peer that stops sending and reading is dropped with one line,
    and the server keeps serving."""
    server, port = start_ktlsd_listen(
        *cert_args(certs.server), "--forever", "--idle-timeout", "0.5", "--record-layer", "user"
    )
    with server:
        args = ["--ca", str(certs.ca.cert_path), "--record-layer", "user"]
        with Proc(ktlsd("connect", f"127.0.0.1:{port}", *args), name="silent") as silent:
            # Neither side has anything to send: the client's stdin and the server's stay open.
            line = server.wait_stderr(r"ktlsd: connection failed: (.*)\n").group(1)
            assert line == "idle for 0.5 s: nothing received or sent"
            silent.close_stdin()  # the server closed cleanly; the client's direction ends now
            assert silent.wait_exit() == 0, silent.stderr_text
        assert server.proc.poll() is None


@pytest.mark.parametrize("value", ["-1", "soon", "nan", "inf"])
def test_idle_timeout_must_be_a_number_of_seconds(value: str) -> None:
    argv = ["listen", "0", "--psk-identity", "a", "--psk", PSK_HEX, "--idle-timeout", value]
    with Proc(ktlsd(*argv)) as p:
        assert p.wait_exit() == 2
        assert "--idle-timeout" in p.stderr_text
        assert "Traceback" not in p.stderr_text


def test_bad_size_is_an_argparse_error() -> None:
    with Proc(ktlsd("connect", "127.0.0.1:9", "--key-update-every", "lots")) as proc:
        assert proc.wait_exit() == 2
        assert "not a size: 'lots'" in proc.stderr_text
        assert "Traceback" not in proc.stderr_text


def test_secrets_not_printed() -> None:
    """Neither the PSK nor anything derived from it shows up in status or failure lines."""
    server, client = run_pair(
        ["--psk-identity", "host1", "--psk", PSK_HEX],
        ["--psk-identity", "host1", "--psk", PSK_HEX, "--record-layer", "user"],
    )
    with server, client:
        client.wait_exit()
        server.wait_exit()
        for proc in (server, client):
            assert PSK_HEX not in proc.stderr_text.lower()
            assert "psk:host1" in proc.stderr_text
