"""The handshake engine against real peers on loopback: openssl, gnutls, tlslite-ng and itself.

Every successful handshake is checked two ways: the traffic secrets ktlsd captured must equal
the peer's key log, and/or one application record protected with keys derived here from those
secrets (``tls13_records``, independent of ktlsd's record layer) must get through the peer, at
the sequence numbers ktlsd reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import socket
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import (
    GNUTLS_TLS13,
    GNUTLS_TLS13_PSK,
    Peer,
    gnutls_client,
    gnutls_server,
    openssl_client,
    openssl_server,
    tlslite_client,
    tlslite_server,
)
from pki import Authority, Issued
from tls13_records import NEW_SESSION_TICKET, read_application_data, recv_record, seal
from waiting import ThreadResult, wait_until

from ktlsd.credentials import X509Credentials
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.tls.handshake import (
    PskKey,
    TlsConfig,
    TlsHandshake,
    handshake_blocking,
    perform_handshake,
)
from ktlsd.tls.session import CipherSuite, Role, Session

SUITES = list(CipherSuite)
KEY_TYPES = ["ecdsa", "rsa"]
TIMEOUT = 5.0


@dataclass
class Pki:
    ca: dict[str, Authority]
    server: dict[str, Issued]
    client: dict[str, Issued]
    other_ca: Authority
    expired_server: Issued
    tmp: Path

    def creds(self, issued: Issued) -> X509Credentials:
        return X509Credentials.from_pem_files(str(issued.cert_path), str(issued.key_path))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    cas = {kt: Authority.create(tmp, kt) for kt in KEY_TYPES}  # type: ignore[arg-type]
    return Pki(
        ca=cas,
        server={kt: cas[kt].issue_server() for kt in KEY_TYPES},
        client={kt: cas[kt].issue_client(f"client-{kt}") for kt in KEY_TYPES},
        other_ca=Authority.create(tmp, "ecdsa", "Unrelated CA"),
        expired_server=cas["ecdsa"].issue_server("expired", expired=True),
        tmp=tmp,
    )


def client_config(**kw: object) -> TlsConfig:
    return TlsConfig(role=Role.CLIENT, **kw)  # type: ignore[arg-type]


def server_config(**kw: object) -> TlsConfig:
    return TlsConfig(role=Role.SERVER, **kw)  # type: ignore[arg-type]


def connect_and_handshake(port: int, config: TlsConfig, timeout: float = TIMEOUT):
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    sock.settimeout(None)
    try:
        return handshake_blocking(sock, config, timeout=timeout), sock
    except BaseException:
        sock.close()
        raise


@contextlib.contextmanager
def listener() -> Iterator[socket.socket]:
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    lsock.settimeout(TIMEOUT)
    try:
        yield lsock
    finally:
        lsock.close()


def serve_one(config: TlsConfig, start_client: Callable[[int], Peer]):
    """Start a client peer against a fresh listener; run ktlsd's server handshake on it."""
    with listener() as lsock:
        peer = start_client(lsock.getsockname()[1])
        try:
            sock, _ = lsock.accept()
        except BaseException:
            peer.close()
            raise
    sock.settimeout(None)
    try:
        return handshake_blocking(sock, config, timeout=TIMEOUT), sock, peer
    except BaseException:
        sock.close()
        peer.close()
        raise


def keylog_secrets(path: Path) -> dict[str, bytes]:
    """CLIENT/SERVER_TRAFFIC_SECRET_0 from an NSS key log file (waiting for it to appear)."""
    found: dict[str, bytes] = {}

    def both_logged() -> bool:
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0].endswith("TRAFFIC_SECRET_0"):
                    found[parts[0]] = bytes.fromhex(parts[2])
        return len(found) == 2

    wait_until(both_logged, lambda: f"no traffic secrets in {path}", TIMEOUT)
    return found


def assert_secrets_match(session: Session, path: Path) -> None:
    logged = keylog_secrets(path)
    assert logged["CLIENT_TRAFFIC_SECRET_0"] == session.client_secret
    assert logged["SERVER_TRAFFIC_SECRET_0"] == session.server_secret
    assert len(session.client_secret) == session.suite.hash_length


def assert_one_line_error(exc: HandshakeError, cause: FailureCause, *patterns: str) -> None:
    text = str(exc)
    assert exc.cause is cause, text
    assert "\n" not in text
    for pattern in patterns:
        assert re.search(pattern, text, re.IGNORECASE), text


# --- x509 interop ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mutual", [False, True], ids=["server-only", "mutual"])
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.iana_name)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_client_x509_vs_openssl_server(
    pki: Pki, tmp_path: Path, key_type: str, suite: CipherSuite, mutual: bool
) -> None:
    server = pki.server[key_type]
    args = ["-cert", str(server.cert_path), "-key", str(server.key_path)]
    args += ["-keylogfile", str(tmp_path / "keys"), "-ciphersuites", suite.iana_name]
    if mutual:
        args += ["-Verify", "2", "-CAfile", str(pki.ca[key_type].cert_path)]
    config = client_config(
        truststore=str(pki.ca[key_type].cert_path),
        peername="localhost",
        credentials=pki.creds(pki.client[key_type]) if mutual else None,
    )
    with openssl_server(*args) as peer:
        session, sock = connect_and_handshake(peer.port, config)
        with sock:
            assert session.suite is suite
            assert (session.tx_seq, session.rx_seq) == (0, 0)
            assert session.peer.certificate_chain[0] == server.cert_der
            assert session.group
            assert_secrets_match(session, tmp_path / "keys")
            sock.sendall(seal(suite, session.tx_secret, 0, b"ping from ktlsd\n"))
            peer.wait_for("ping from ktlsd")
        if mutual:
            assert "client-" + key_type in peer.wait_for("client-" + key_type)


@pytest.mark.parametrize("mutual", [False, True], ids=["server-only", "mutual"])
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.iana_name)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_server_x509_vs_openssl_client(
    pki: Pki, tmp_path: Path, key_type: str, suite: CipherSuite, mutual: bool
) -> None:
    ca = pki.ca[key_type]
    client = pki.client[key_type]
    args = ["-CAfile", str(ca.cert_path), "-verify_return_error", "-verify_ip", "127.0.0.1"]
    args += ["-keylogfile", str(tmp_path / "keys"), "-ciphersuites", suite.iana_name]
    if mutual:
        args += ["-cert", str(client.cert_path), "-key", str(client.key_path)]
    config = server_config(
        credentials=pki.creds(pki.server[key_type]),
        truststore=str(ca.cert_path),
        client_auth="require" if mutual else "none",
    )
    session, sock, peer = serve_one(config, lambda port: openssl_client(port, *args))
    with sock, peer:
        assert session.suite is suite
        assert (session.tx_seq, session.rx_seq) == (0, 0)
        # s_client sends its CA along (auto chain); the leaf comes first.
        chain = session.peer.certificate_chain
        assert (chain[0] == client.cert_der) if mutual else chain == ()
        assert_secrets_match(session, tmp_path / "keys")
        sock.sendall(seal(suite, session.tx_secret, 0, b"hello from ktlsd server\n"))
        peer.wait_for("hello from ktlsd server")
        peer.send(b"hello from s_client\n")
        data, _, skipped = read_application_data(sock, suite, session.rx_secret, 0)
        assert data == b"hello from s_client\n" and skipped == []


@pytest.mark.parametrize("mutual", [False, True], ids=["server-only", "mutual"])
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.iana_name)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_client_x509_vs_gnutls_server(
    pki: Pki, key_type: str, suite: CipherSuite, mutual: bool
) -> None:
    server = pki.server[key_type]
    args = ["--x509certfile", str(server.cert_path), "--x509keyfile", str(server.key_path)]
    args += ["--priority", GNUTLS_TLS13]
    if mutual:
        args += ["--require-client-cert", "--x509cafile", str(pki.ca[key_type].cert_path)]
    config = client_config(
        truststore=str(pki.ca[key_type].cert_path),
        peername="127.0.0.1",
        credentials=pki.creds(pki.client[key_type]) if mutual else None,
        ciphersuites=(suite,),
    )
    with gnutls_server(*args) as peer:
        session, sock = connect_and_handshake(peer.port, config)
        with sock:
            assert session.suite is suite
            assert session.peer.certificate_chain[0] == server.cert_der
            # gnutls-serv --echo sends our record back: proves both secrets and both seqs.
            sock.sendall(seal(suite, session.tx_secret, 0, b"echo me\n"))
            data, _, skipped = read_application_data(sock, suite, session.rx_secret, 0)
            assert data == b"echo me\n"
            assert set(skipped) <= {NEW_SESSION_TICKET}


@pytest.mark.parametrize("mutual", [False, True], ids=["server-only", "mutual"])
@pytest.mark.parametrize("suite", SUITES, ids=lambda s: s.iana_name)
@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_server_x509_vs_gnutls_client(
    pki: Pki, tmp_path: Path, key_type: str, suite: CipherSuite, mutual: bool
) -> None:
    ca = pki.ca[key_type]
    client = pki.client[key_type]
    args = ["--x509cafile", str(ca.cert_path), "--priority", GNUTLS_TLS13]
    if mutual:
        args += ["--x509certfile", str(client.cert_path), "--x509keyfile", str(client.key_path)]
    config = server_config(
        credentials=pki.creds(pki.server[key_type]),
        truststore=str(ca.cert_path),
        client_auth="require" if mutual else "none",
        ciphersuites=(suite,),
    )
    env = {"SSLKEYLOGFILE": str(tmp_path / "keys")}
    session, sock, peer = serve_one(config, lambda port: gnutls_client(port, *args, env=env))
    with sock, peer:
        assert session.suite is suite
        assert session.peer.certificate_chain == ((client.cert_der,) if mutual else ())
        assert_secrets_match(session, tmp_path / "keys")
        sock.sendall(seal(suite, session.tx_secret, 0, b"to gnutls-cli\n"))
        peer.wait_for("to gnutls-cli")


# --- PSK interop ----------------------------------------------------------------------------------
PSK_KEY = bytes(range(1, 33))


def test_client_psk_vs_openssl_server(tmp_path: Path) -> None:
    args = ["-nocert", "-psk_identity", "host-a", "-psk", PSK_KEY.hex()]
    config = client_config(psk_keys=(PskKey(b"host-a", PSK_KEY, serial=0x1234),))
    with openssl_server(*args, "-keylogfile", str(tmp_path / "keys")) as peer:
        session, sock = connect_and_handshake(peer.port, config)
        with sock:
            assert session.peer.psk_identity == b"host-a"
            assert session.peer.psk_serial == 0x1234
            assert session.peer.certificate_chain == ()
            assert session.suite.hash_name == "sha256"
            assert_secrets_match(session, tmp_path / "keys")


def test_server_psk_vs_openssl_client(tmp_path: Path) -> None:
    keys = {b"host-a": PskKey(b"host-a", PSK_KEY, serial=7)}
    config = server_config(psk_lookup=keys.get)
    args = ["-psk_identity", "host-a", "-psk", PSK_KEY.hex(), "-keylogfile", str(tmp_path / "k")]
    session, sock, peer = serve_one(config, lambda port: openssl_client(port, *args))
    with sock, peer:
        assert session.peer.psk_identity == b"host-a" and session.peer.psk_serial == 7
        assert_secrets_match(session, tmp_path / "k")
        peer.send(b"psk data\n")
        data, _, _ = read_application_data(sock, session.suite, session.rx_secret, 0)
        assert data == b"psk data\n"


def test_client_psk_vs_gnutls_server(tmp_path: Path) -> None:
    passwd = tmp_path / "psk.passwd"
    passwd.write_text(f"host-g:{PSK_KEY.hex()}\n")
    with gnutls_server("--pskpasswd", str(passwd), "--priority", GNUTLS_TLS13_PSK) as peer:
        config = client_config(psk_keys=(PskKey(b"host-g", PSK_KEY),))
        session, sock = connect_and_handshake(peer.port, config)
        with sock:
            assert session.peer.psk_identity == b"host-g"
            sock.sendall(seal(session.suite, session.tx_secret, 0, b"psk echo\n"))
            data, _, _ = read_application_data(sock, session.suite, session.rx_secret, 0)
            assert data == b"psk echo\n"


def test_server_psk_vs_gnutls_client(tmp_path: Path) -> None:
    keys = {b"host-g": PskKey(b"host-g", PSK_KEY)}
    args = ["--pskusername", "host-g", "--pskkey", PSK_KEY.hex(), "--priority", GNUTLS_TLS13_PSK]
    env = {"SSLKEYLOGFILE": str(tmp_path / "keys")}
    config = server_config(psk_lookup=keys.get)
    session, sock, peer = serve_one(config, lambda port: gnutls_client(port, *args, env=env))
    with sock, peer:
        assert session.peer.psk_identity == b"host-g"
        assert_secrets_match(session, tmp_path / "keys")


PSK384 = bytes(range(100, 148))


def test_client_psk_sha384_vs_tlslite() -> None:
    with tlslite_server(b"nvme-id-384", PSK384, "sha384") as peer:
        config = client_config(psk_keys=(PskKey(b"nvme-id-384", PSK384, "sha384"),))
        session, sock = connect_and_handshake(peer.port, config)
        with sock:
            assert session.suite is CipherSuite.TLS_AES_256_GCM_SHA384
            sock.sendall(seal(session.suite, session.tx_secret, 0, b"nvme"))
            data, _, _ = read_application_data(sock, session.suite, session.rx_secret, 0)
            assert data == b"NVME"


def test_server_psk_sha384_vs_tlslite() -> None:
    keys = {b"nvme-id-384": PskKey(b"nvme-id-384", PSK384, "sha384")}
    config = server_config(psk_lookup=keys.get)
    session, sock, peer = serve_one(
        config, lambda port: tlslite_client(port, b"nvme-id-384", PSK384, "sha384")
    )
    with sock, peer:
        assert session.suite is CipherSuite.TLS_AES_256_GCM_SHA384
        peer.wait_for("HANDSHAKE-OK")
        sock.sendall(seal(session.suite, session.tx_secret, 0, b"target"))
        data, _, _ = read_application_data(sock, session.suite, session.rx_secret, 0)
        assert data == b"TARGET"


# --- ktlsd <-> ktlsd ----------------------------------------------------------------------------
async def _pair(
    client: TlsConfig, server: TlsConfig, timeout: float = TIMEOUT
) -> tuple[Session | BaseException, Session | BaseException, socket.socket, socket.socket]:
    with listener() as lsock:
        csock = socket.create_connection(lsock.getsockname())
        ssock, _ = lsock.accept()
    ssock.settimeout(None)
    csock.settimeout(None)
    results = await asyncio.gather(
        perform_handshake(csock, client, timeout=timeout),
        perform_handshake(ssock, server, timeout=timeout),
        return_exceptions=True,
    )
    return results[0], results[1], csock, ssock


def pair(client: TlsConfig, server: TlsConfig, timeout: float = TIMEOUT):
    return asyncio.run(_pair(client, server, timeout))


def exchange_records(cs: Session, ss: Session, csock: socket.socket, ssock: socket.socket) -> None:
    csock.sendall(seal(cs.suite, cs.tx_secret, cs.tx_seq, b"c->s"))
    assert read_application_data(ssock, ss.suite, ss.rx_secret, ss.rx_seq)[0] == b"c->s"
    ssock.sendall(seal(ss.suite, ss.tx_secret, ss.tx_seq, b"s->c"))
    assert read_application_data(csock, cs.suite, cs.rx_secret, cs.rx_seq)[0] == b"s->c"


def test_ktlsd_pair_x509_mutual(pki: Pki) -> None:
    ca = pki.ca["ecdsa"]
    client = client_config(
        credentials=pki.creds(pki.client["ecdsa"]),
        truststore=str(ca.cert_path),
        peername="127.0.0.1",
    )
    server = server_config(
        credentials=pki.creds(pki.server["ecdsa"]),
        truststore=str(ca.cert_path),
        client_auth="require",
        peername="client-ecdsa",
    )
    cs, ss, csock, ssock = pair(client, server)
    with csock, ssock:
        assert isinstance(cs, Session) and isinstance(ss, Session), (cs, ss)
        assert cs.client_secret == ss.client_secret and cs.server_secret == ss.server_secret
        assert ss.peer.certificate_chain == (pki.client["ecdsa"].cert_der,)
        assert cs.group == ss.group
        exchange_records(cs, ss, csock, ssock)
        # Our server sends no session tickets: the client's next record is exactly seq 0.
        assert (cs.tx_seq, cs.rx_seq, ss.tx_seq, ss.rx_seq) == (0, 0, 0, 0)


def test_ktlsd_pair_anonymous_client_with_chain(pki: Pki, tmp_path: Path) -> None:
    root = Authority.create(tmp_path, "rsa")
    sub = root.intermediate()
    leaf = sub.issue_server(key_type="ecdsa")
    creds = X509Credentials.from_der(b"".join(leaf.chain_der), leaf.key_der)
    assert len(creds.chain) == 2
    client = client_config(truststore=str(root.cert_path), peername="localhost")
    server = server_config(credentials=creds, client_auth="request")
    cs, ss, csock, ssock = pair(client, server)
    with csock, ssock:
        assert isinstance(cs, Session) and isinstance(ss, Session), (cs, ss)
        assert cs.peer.certificate_chain == leaf.chain_der
        assert not ss.peer.authenticated


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
def test_ktlsd_pair_psk_selects_by_identity(hash_name: str) -> None:
    wanted = PskKey(b"second", bytes(48), hash_name, serial=22)  # type: ignore[arg-type]
    keys = {b"second": wanted, b"third": PskKey(b"third", b"\x01" * 32)}
    client = client_config(psk_keys=(wanted, PskKey(b"third", b"\x01" * 32)))
    server = server_config(psk_lookup=keys.get)
    cs, ss, csock, ssock = pair(client, server)
    with csock, ssock:
        assert isinstance(cs, Session) and isinstance(ss, Session), (cs, ss)
        assert ss.peer.psk_identity == b"second" and ss.peer.psk_serial == 22
        assert cs.suite.hash_name == hash_name
        exchange_records(cs, ss, csock, ssock)


def test_many_concurrent_handshakes_on_one_loop() -> None:
    keys = {b"id": PskKey(b"id", PSK_KEY)}

    async def run() -> list:
        return await asyncio.gather(
            *(
                _pair(client_config(psk_keys=(keys[b"id"],)), server_config(psk_lookup=keys.get))
                for _ in range(24)
            )
        )

    results = asyncio.run(run())
    for cs, ss, csock, ssock in results:
        csock.close()
        ssock.close()
        assert isinstance(cs, Session) and isinstance(ss, Session)
        assert cs.client_secret == ss.client_secret
    assert len({r[0].client_secret for r in results}) == len(results)


def test_socket_blocking_mode_untouched() -> None:
    keys = {b"id": PskKey(b"id", PSK_KEY)}
    with listener() as lsock:
        csock = socket.create_connection(lsock.getsockname())
        ssock, _ = lsock.accept()
    ssock.setblocking(False)
    csock.settimeout(None)
    flags = [fcntl.fcntl(s.fileno(), fcntl.F_GETFL) for s in (csock, ssock)]

    async def run() -> list:
        return await asyncio.gather(
            perform_handshake(csock, client_config(psk_keys=(keys[b"id"],)), timeout=TIMEOUT),
            perform_handshake(ssock, server_config(psk_lookup=keys.get), timeout=TIMEOUT),
        )

    with csock, ssock:
        asyncio.run(run())
        assert [fcntl.fcntl(s.fileno(), fcntl.F_GETFL) for s in (csock, ssock)] == flags
        assert flags[0] & os.O_NONBLOCK == 0 and flags[1] & os.O_NONBLOCK


# --- NewSessionTicket handling: sequence numbers are exact at hand-off ----------------------------
def test_openssl_server_tickets_stay_in_socket(pki: Pki) -> None:
    server = pki.server["ecdsa"]
    config = client_config(truststore=str(pki.ca["ecdsa"].cert_path), peername="localhost")
    with openssl_server("-cert", str(server.cert_path), "-key", str(server.key_path)) as peer:
        session, sock = connect_and_handshake(peer.port, config)
        with sock:
            assert session.rx_seq == 0
            peer.send(b"after the tickets\n")
            data, next_seq, skipped = read_application_data(
                sock, session.suite, session.rx_secret, session.rx_seq
            )
            # s_server sends two NewSessionTickets: they are records 0 and 1, the data is 2.
            assert skipped == [NEW_SESSION_TICKET, NEW_SESSION_TICKET]
            assert data == b"after the tickets\n" and next_seq == 3


# --- refusals -----------------------------------------------------------------------------------
def expect_failure(fn: Callable[[], object]) -> HandshakeError:
    with pytest.raises(HandshakeError) as info:
        fn()
    return info.value


def test_unknown_psk_identity_both_sides() -> None:
    keys = {b"known": PskKey(b"known", PSK_KEY)}
    cs, ss, csock, ssock = pair(
        client_config(psk_keys=(PskKey(b"stranger", PSK_KEY),)), server_config(psk_lookup=keys.get)
    )
    csock.close()
    ssock.close()
    assert isinstance(cs, HandshakeError) and isinstance(ss, HandshakeError), (cs, ss)
    assert_one_line_error(ss, FailureCause.UNKNOWN_PSK_IDENTITY, "stranger")
    assert_one_line_error(cs, FailureCause.UNKNOWN_PSK_IDENTITY, "unknown PSK identity")


def test_unknown_psk_identity_vs_openssl_client() -> None:
    keys = {b"known": PskKey(b"known", PSK_KEY)}
    args = ["-psk_identity", "stranger", "-psk", PSK_KEY.hex()]
    with listener() as lsock, openssl_client(lsock.getsockname()[1], *args) as peer:
        sock, _ = lsock.accept()
        with sock:
            err = expect_failure(
                lambda: handshake_blocking(sock, server_config(psk_lookup=keys.get), timeout=5)
            )
        assert_one_line_error(err, FailureCause.UNKNOWN_PSK_IDENTITY, "stranger")
        peer.wait_for("unknown psk identity")


def test_wrong_psk_key_both_sides() -> None:
    keys = {b"id": PskKey(b"id", PSK_KEY)}
    wrong = bytes(32)
    cs, ss, csock, ssock = pair(
        client_config(psk_keys=(PskKey(b"id", wrong),)), server_config(psk_lookup=keys.get)
    )
    csock.close()
    ssock.close()
    assert isinstance(cs, HandshakeError) and isinstance(ss, HandshakeError), (cs, ss)
    assert_one_line_error(ss, FailureCause.PEER_REJECTED, "binder")
    assert_one_line_error(cs, FailureCause.PEER_REJECTED, "refused our PSK")
    for err in (cs, ss):
        assert PSK_KEY.hex() not in str(err) and wrong.hex() not in str(err)


def test_wrong_psk_key_vs_openssl_server() -> None:
    args = ["-nocert", "-psk_identity", "id", "-psk", PSK_KEY.hex()]
    with openssl_server(*args) as peer:
        err = expect_failure(
            lambda: connect_and_handshake(
                peer.port, client_config(psk_keys=(PskKey(b"id", bytes(32)),))
            )
        )
    assert_one_line_error(err, FailureCause.PEER_REJECTED)


def test_sha384_psk_against_sha256_only_suites_is_missing_material() -> None:
    config = client_config(
        psk_keys=(PskKey(b"id", PSK384, "sha384"),),
        ciphersuites=(CipherSuite.TLS_AES_128_GCM_SHA256,),
    )
    with listener() as lsock:
        sock = socket.create_connection(lsock.getsockname())
    with sock:
        err = expect_failure(lambda: handshake_blocking(sock, config, timeout=1))
    assert_one_line_error(err, FailureCause.MISSING_MATERIAL, "hash")


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("untrusted", "unable to get local issuer certificate"),
        ("wrong-name", "hostname mismatch"),
        ("wrong-ip", "IP address mismatch"),
        ("expired", "certificate has expired"),
        ("revoked", "certificate revoked"),
    ],
)
def test_client_refuses_bad_server_certificate(
    pki: Pki, tmp_path: Path, case: str, pattern: str
) -> None:
    ca = pki.ca["ecdsa"]
    server = pki.expired_server if case == "expired" else pki.server["ecdsa"]
    kw: dict[str, object] = {"truststore": str(ca.cert_path), "peername": "localhost"}
    if case == "untrusted":
        kw["truststore"] = str(pki.other_ca.cert_path)
    elif case == "wrong-name":
        kw["peername"] = "nvme.example.com"
    elif case == "wrong-ip":
        kw["peername"] = "192.0.2.7"
    elif case == "revoked":
        victim = ca.issue_server("revoked")
        server = victim
        kw["crl"] = str(ca.write_crl([victim]))
    with openssl_server("-cert", str(server.cert_path), "-key", str(server.key_path)) as peer:
        err = expect_failure(lambda: connect_and_handshake(peer.port, client_config(**kw)))
    assert_one_line_error(err, FailureCause.UNTRUSTED_CERTIFICATE, pattern)


def test_crl_that_does_not_revoke_lets_handshake_through(pki: Pki) -> None:
    ca = pki.ca["ecdsa"]
    server = pki.server["ecdsa"]
    config = client_config(
        truststore=str(ca.cert_path), peername="localhost", crl=str(ca.write_crl([]))
    )
    with openssl_server("-cert", str(server.cert_path), "-key", str(server.key_path)) as peer:
        session, sock = connect_and_handshake(peer.port, config)
        sock.close()
    assert session.peer.certificate_chain[0] == server.cert_der


def test_server_requires_client_cert_vs_anonymous_openssl_client(pki: Pki) -> None:
    config = server_config(
        credentials=pki.creds(pki.server["rsa"]),
        truststore=str(pki.ca["rsa"].cert_path),
        client_auth="require",
    )
    with listener() as lsock, openssl_client(lsock.getsockname()[1]) as peer:
        sock, _ = lsock.accept()
        with sock:
            err = expect_failure(lambda: handshake_blocking(sock, config, timeout=TIMEOUT))
        peer.wait_for("certificate required")
    assert_one_line_error(err, FailureCause.PEER_REJECTED, "no certificate")


def test_anonymous_client_refused_by_openssl_server_requiring_cert(pki: Pki) -> None:
    server = pki.server["ecdsa"]
    ca = pki.ca["ecdsa"]
    args = [
        "-cert",
        str(server.cert_path),
        "-key",
        str(server.key_path),
        "-Verify",
        "1",
        "-CAfile",
        str(ca.cert_path),
    ]
    config = client_config(truststore=str(ca.cert_path), peername="localhost")
    with openssl_server(*args) as peer:
        session, sock = connect_and_handshake(peer.port, config)
        # TLS 1.3: the client finishes first; the server's certificate_required alert follows.
        with sock:
            record = recv_record(sock)
            assert record[0] == 21 or record[0] == 23
    assert session.rx_seq == 0


def test_server_refuses_untrusted_client_cert(pki: Pki, tmp_path: Path) -> None:
    stranger_ca = Authority.create(tmp_path, "ecdsa")
    stranger = stranger_ca.issue_client("stranger")
    ca = pki.ca["ecdsa"]
    client = client_config(
        credentials=pki.creds(stranger), truststore=str(ca.cert_path), peername="localhost"
    )
    server = server_config(
        credentials=pki.creds(pki.server["ecdsa"]),
        truststore=str(ca.cert_path),
        client_auth="require",
    )
    cs, ss, csock, ssock = pair(client, server)
    csock.close()
    ssock.close()
    assert isinstance(ss, HandshakeError), ss
    assert_one_line_error(
        ss, FailureCause.UNTRUSTED_CERTIFICATE, "client certificate", "unable to get local issuer"
    )
    # TLS 1.3 clients finish before the server judges their certificate: the client may have
    # "succeeded", and the server's alert is what its record layer will then read.
    if isinstance(cs, HandshakeError):
        assert cs.cause is FailureCause.PEER_REJECTED


def test_server_checks_client_name(pki: Pki) -> None:
    ca = pki.ca["ecdsa"]
    client = client_config(
        credentials=pki.creds(pki.client["ecdsa"]),
        truststore=str(ca.cert_path),
        peername="localhost",
    )
    server = server_config(
        credentials=pki.creds(pki.server["ecdsa"]),
        truststore=str(ca.cert_path),
        client_auth="require",
        peername="someone-else",
    )
    _, ss, csock, ssock = pair(client, server)
    csock.close()
    ssock.close()
    assert isinstance(ss, HandshakeError)
    assert_one_line_error(ss, FailureCause.UNTRUSTED_CERTIFICATE, "hostname mismatch")


def test_timeout_when_peer_never_answers() -> None:
    with listener() as lsock:
        sock = socket.create_connection(lsock.getsockname())
        with sock:
            err = expect_failure(
                lambda: handshake_blocking(
                    sock, client_config(psk_keys=(PskKey(b"id", PSK_KEY),)), timeout=0.3
                )
            )
    assert_one_line_error(err, FailureCause.TIMEOUT, "0.3 s")


def test_peer_closes_before_done() -> None:
    with listener() as lsock:
        sock = socket.create_connection(lsock.getsockname())
        peer, _ = lsock.accept()
        peer.close()
        with sock:
            err = expect_failure(
                lambda: handshake_blocking(
                    sock, client_config(psk_keys=(PskKey(b"id", PSK_KEY),)), timeout=TIMEOUT
                )
            )
    assert err.cause is FailureCause.PEER_CLOSED


@pytest.mark.parametrize(
    "garbage",
    [b"HTTP/1.1 400 Bad Request\r\n\r\n", b"\x16\x03\x03\x00\x05hello", b"\x16\x03\x03\xff\xff"],
    ids=["http", "bad-handshake-body", "oversized"],
)
def test_peer_sends_garbage(garbage: bytes) -> None:
    keys = {b"id": PskKey(b"id", PSK_KEY)}
    with listener() as lsock:
        sock = socket.create_connection(lsock.getsockname())
        server_side, _ = lsock.accept()
    with sock, server_side:
        sock.sendall(garbage)
        err = expect_failure(
            lambda: handshake_blocking(server_side, server_config(psk_lookup=keys.get), timeout=2)
        )
    assert_one_line_error(err, FailureCause.PROTOCOL_ERROR)


def test_missing_material(pki: Pki, tmp_path: Path) -> None:
    with listener() as lsock:
        sock = socket.create_connection(lsock.getsockname())
    with sock:
        err = expect_failure(lambda: handshake_blocking(sock, server_config(), timeout=1))
        assert_one_line_error(err, FailureCause.MISSING_MATERIAL, "neither")
        err = expect_failure(
            lambda: handshake_blocking(
                sock, client_config(truststore=str(tmp_path / "nope.pem")), timeout=1
            )
        )
        assert_one_line_error(err, FailureCause.MISSING_MATERIAL, "nope.pem")
    err = expect_failure(
        lambda: X509Credentials.from_pem_files(str(tmp_path / "none.crt"), str(tmp_path / "k"))
    )
    assert_one_line_error(err, FailureCause.MISSING_MATERIAL, "none.crt")
    other = pki.client["rsa"]
    err = expect_failure(
        lambda: X509Credentials.from_der(pki.server["ecdsa"].cert_der, other.key_der)
    )
    assert_one_line_error(err, FailureCause.MISSING_MATERIAL, "does not match")


def test_secrets_never_in_repr() -> None:
    psk = PskKey(b"id", PSK_KEY)
    assert PSK_KEY.hex() not in repr(psk) and repr(PSK_KEY) not in repr(psk)
    assert repr(PSK_KEY) not in repr(client_config(psk_keys=(psk,)))


# --- HelloRetryRequest, groups, options -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["x509", "psk-sha384"])
def test_hello_retry_request(pki: Pki, kind: str) -> None:
    # The client's key share is X25519 only; the server accepts P-256 only: it must send an HRR.
    if kind == "x509":
        ca = pki.ca["rsa"]
        client = client_config(
            truststore=str(ca.cert_path), peername="localhost", groups="X25519:P-256"
        )
        server = server_config(credentials=pki.creds(pki.server["rsa"]), groups="P-256")
    else:
        psk = PskKey(b"hrr", PSK384, "sha384")
        client = client_config(psk_keys=(psk,), groups="X25519:P-256")
        server = server_config(psk_lookup={b"hrr": psk}.get, groups="P-256")
    cs, ss, csock, ssock = pair(client, server)
    with csock, ssock:
        assert isinstance(cs, Session) and isinstance(ss, Session), (cs, ss)
        assert cs.group == ss.group and "256" in (cs.group or "")
        exchange_records(cs, ss, csock, ssock)


def test_hello_retry_request_vs_openssl_server(pki: Pki, tmp_path: Path) -> None:
    server = pki.server["ecdsa"]
    args = [
        "-cert",
        str(server.cert_path),
        "-key",
        str(server.key_path),
        "-groups",
        "P-384",
        "-keylogfile",
        str(tmp_path / "keys"),
    ]
    config = client_config(
        truststore=str(pki.ca["ecdsa"].cert_path), peername="::1", groups="X25519:P-384"
    )
    with openssl_server(*args) as peer:
        session, sock = connect_and_handshake(peer.port, config)
        with sock:
            assert_secrets_match(session, tmp_path / "keys")  # while s_server is alive
    assert "384" in (session.group or "")


def test_client_skips_psk_whose_hash_is_not_allowed() -> None:
    only256 = (CipherSuite.TLS_AES_128_GCM_SHA256, CipherSuite.TLS_CHACHA20_POLY1305_SHA256)
    k384 = PskKey(b"a384", PSK384, "sha384")
    k256 = PskKey(b"b256", PSK_KEY, "sha256")
    keys = {k.identity: k for k in (k384, k256)}
    cs, ss, csock, ssock = pair(
        client_config(psk_keys=(k384, k256), ciphersuites=only256),
        server_config(psk_lookup=keys.get),
    )
    with csock, ssock:
        assert isinstance(cs, Session) and isinstance(ss, Session), (cs, ss)
        assert cs.peer.psk_identity == b"b256" == ss.peer.psk_identity
        assert cs.suite in only256


def test_verify_peer_false_accepts_untrusted_server(pki: Pki) -> None:
    server = pki.expired_server
    config = client_config(truststore=str(pki.other_ca.cert_path), verify_peer=False)
    with openssl_server("-cert", str(server.cert_path), "-key", str(server.key_path)) as peer:
        session, sock = connect_and_handshake(peer.port, config)
        sock.close()
    assert session.peer.certificate_chain[0] == server.cert_der


def test_truststore_directory(pki: Pki, tmp_path: Path) -> None:
    store = tmp_path / "certs"
    store.mkdir()
    (store / "ca.pem").write_bytes(pki.ca["rsa"].cert_path.read_bytes())
    subprocess.run(["openssl", "rehash", str(store)], check=True, capture_output=True)
    server = pki.server["rsa"]
    config = client_config(truststore=str(store), peername="localhost")
    with openssl_server("-cert", str(server.cert_path), "-key", str(server.key_path)) as peer:
        session, sock = connect_and_handshake(peer.port, config)
        sock.close()
    assert session.peer.certificate_chain[0] == server.cert_der


def test_server_does_not_consume_data_sent_right_after_client_finished() -> None:
    """Drive a client with the sans-I/O core by hand and send its Finished flight and a first
    application record in ONE write: the server driver must leave that record in the socket."""
    keys = {b"id": PskKey(b"id", PSK_KEY)}
    csock, ssock = socket.socketpair()
    with csock, ssock:
        server_task = ThreadResult(
            lambda: handshake_blocking(ssock, server_config(psk_lookup=keys.get), timeout=TIMEOUT)
        )
        with TlsHandshake(client_config(psk_keys=(keys[b"id"],))) as hs:
            csock.sendall(hs.start())
            out = b""
            while hs.wants_input:
                out = hs.receive_record(recv_record(csock))
                if hs.wants_input:
                    csock.sendall(out)
            hs.check()
            cs = hs.session()
        csock.sendall(out + seal(cs.suite, cs.tx_secret, 0, b"early bird"))
        ss = server_task.result(TIMEOUT)
        assert ss.rx_seq == 0
        assert read_application_data(ssock, ss.suite, ss.rx_secret, 0)[0] == b"early bird"


def test_error_queue_is_left_empty_after_failures() -> None:
    from ktlsd.tls import _openssl

    keys = {b"known": PskKey(b"known", PSK_KEY)}
    cs, ss, csock, ssock = pair(
        client_config(psk_keys=(PskKey(b"known", bytes(32)),)), server_config(psk_lookup=keys.get)
    )
    csock.close()
    ssock.close()
    assert isinstance(cs, HandshakeError) and isinstance(ss, HandshakeError)
    assert _openssl.ERR_get_error() == 0


def test_no_secret_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    k1 = PskKey(b"first", PSK_KEY)
    k2 = PskKey(b"second", PSK384, "sha384")
    cs, ss, csock, ssock = pair(
        client_config(psk_keys=(k1, k2)), server_config(psk_lookup={b"first": k1}.get)
    )
    csock.close()
    ssock.close()
    assert isinstance(cs, Session) and isinstance(ss, Session)
    assert "offering PSK 'first' only" in caplog.text  # the multi-PSK limitation is logged
    for secret in (PSK_KEY, PSK384, cs.client_secret, cs.server_secret):
        assert secret.hex() not in caplog.text and repr(secret) not in caplog.text
        assert secret.hex() not in repr(cs) and repr(secret) not in repr(cs)


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="sha256 or sha384"):
        PskKey(b"id", PSK_KEY, "md5")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty key"):
        PskKey(b"id", b"")
    with pytest.raises(ValueError, match="client_auth"):
        server_config(client_auth="maybe")
    with pytest.raises(ValueError, match="no cipher suites"):
        client_config(ciphersuites=())


def test_credentials_from_der_accepts_traditional_keys_and_chains(pki: Pki) -> None:
    from cryptography.hazmat.primitives import serialization

    for kt in KEY_TYPES:
        issued = pki.server[kt]
        traditional = issued.key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        creds = X509Credentials.from_der(issued.cert_der + pki.ca[kt].cert_der, traditional)
        assert creds.chain == (issued.cert_der, pki.ca[kt].cert_der)
        assert creds.private_key == issued.key_der  # normalised to PKCS#8
        assert issued.key_der.hex() not in repr(creds)
    err = expect_failure(lambda: X509Credentials.from_der(b"\x30\x03abc", b"junk"))
    assert_one_line_error(err, FailureCause.MISSING_MATERIAL, "not DER")


def test_gnutls_peers_and_unknown_psk_identity(tmp_path: Path) -> None:
    # ktlsd server -> gnutls-cli: our unknown_psk_identity alert (115) reaches the client.
    keys = {b"known": PskKey(b"known", PSK_KEY)}
    args = ["--pskusername", "stranger", "--pskkey", PSK_KEY.hex(), "--priority", GNUTLS_TLS13_PSK]
    with listener() as lsock, gnutls_client(lsock.getsockname()[1], *args) as peer:
        sock, _ = lsock.accept()
        with sock:
            err = expect_failure(
                lambda: handshake_blocking(sock, server_config(psk_lookup=keys.get), timeout=5)
            )
        peer.wait_for("Received alert [115]")
    assert_one_line_error(err, FailureCause.UNKNOWN_PSK_IDENTITY, "stranger")
    # ktlsd client -> gnutls-serv: GnuTLS hides unknown identities behind illegal_parameter, so
    # the client can only tell that its PSK was refused.
    passwd = tmp_path / "psk.passwd"
    passwd.write_text(f"known:{PSK_KEY.hex()}\n")
    with gnutls_server("--pskpasswd", str(passwd), "--priority", GNUTLS_TLS13_PSK) as peer:
        config = client_config(psk_keys=(PskKey(b"stranger", PSK_KEY),))
        err = expect_failure(lambda: connect_and_handshake(peer.port, config))
    assert_one_line_error(err, FailureCause.PEER_REJECTED, "refused our PSK")


def test_psk_client_refuses_certificate_fallback(pki: Pki) -> None:
    server = pki.server["ecdsa"]
    args = [
        "-cert",
        str(server.cert_path),
        "-key",
        str(server.key_path),
        "-psk_identity",
        "other",
        "-psk",
        PSK_KEY.hex(),
    ]
    with openssl_server(*args) as peer:
        config = client_config(psk_keys=(PskKey(b"mine", PSK_KEY),))
        err = expect_failure(lambda: connect_and_handshake(peer.port, config))
    assert_one_line_error(err, FailureCause.PEER_REJECTED, "did not accept PSK 'mine'")


def split_records(data: bytes) -> list[bytes]:
    records = []
    while data:
        length = int.from_bytes(data[3:5], "big")
        records.append(data[: 5 + length])
        data = data[5 + length :]
    return records


@pytest.mark.parametrize("hash_name", ["sha256", "sha384"])
def test_sans_io_core_without_sockets(hash_name: str) -> None:
    """Two engines talking through plain byte strings: the core does no I/O of its own."""
    psk = PskKey(b"mem", PSK384[: 48 if hash_name == "sha384" else 32], hash_name)  # type: ignore[arg-type]
    with (
        TlsHandshake(client_config(psk_keys=(psk,))) as client,
        TlsHandshake(server_config(psk_lookup={b"mem": psk}.get)) as server,
    ):
        to_server = split_records(client.start())
        assert server.start() == b""
        to_client: list[bytes] = []
        last_server_out = None
        while client.wants_input or server.wants_input:
            assert to_server or to_client, "nobody has anything to say"
            for record in to_server:
                last_server_out = server.receive_record(record)
                to_client += split_records(last_server_out)
            to_server = []
            for record in to_client:
                to_server += split_records(client.receive_record(record))
            to_client = []
        client.check()
        server.check()
        cs, ss = client.session(), server.session()
    assert cs.suite.hash_name == hash_name
    assert cs.client_secret == ss.client_secret and cs.server_secret == ss.server_secret
    assert cs.peer.psk_identity == ss.peer.psk_identity == b"mem"
    assert last_server_out == b""  # nothing after the client's Finished: no tickets


def test_client_sends_sni(pki: Pki) -> None:
    server = pki.server["ecdsa"]
    config = client_config(peername="localhost", verify_peer=False)
    args = [
        "-cert",
        str(server.cert_path),
        "-key",
        str(server.key_path),
        "-servername",
        "localhost",
        "-servername_fatal",
        "-cert2",
        str(server.cert_path),
        "-key2",
        str(server.key_path),
    ]
    with openssl_server(*args) as peer:
        _, sock = connect_and_handshake(peer.port, config)
        sock.close()
        peer.wait_for('Hostname in TLS extension: "localhost"')
