"""SHA-384 PSKs and the old tlshd binding (``[ktlsd] legacy_psk_sha384``), against real peers.

tlshd 1.0 on GnuTLS < 3.8.11 binds a SHA-384 PSK to SHA-256: a 32-byte binder for the 48-byte
key and a SHA-256 suite. Three independent implementations here do the same when told to, and
serve as "legacy" peers: tlslite-ng with the 48-byte key configured as ``sha256``,
``openssl s_client``/``s_server -psk`` (which always bind a ``-psk`` key to SHA-256) and
GnuTLS 3.7's ``gnutls-cli``/``gnutls-serv`` (GnuTLS binds every external PSK to SHA-256).
Spec-conformant peers: tlslite-ng with the key as ``sha384``, and openssl with a
``-psk_session`` whose suite is TLS_AES_256_GCM_SHA384 (a DER SSL_SESSION built here).

Every successful handshake is proved end to end (an echoed record under keys derived from the
reported secrets, or the peer's key log), and every failure must be a prompt refusal with a
reason that names the cause, never a timeout. The ``pre_shared_key`` parser gets hostile input
of every malformed shape, directly and through the engine.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from peers import (
    GNUTLS_TLS13_PSK,
    Peer,
    gnutls_client,
    gnutls_server,
    openssl_client,
    openssl_server,
    tlslite_client,
    tlslite_server,
)
from tls13_records import read_application_data, seal

from ktlsd import config as config_module
from ktlsd.agent import Agent, AgentSettings
from ktlsd.config import ConfigError, config_from_keyfile, parse_key_file
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.material import build_tls_config_blocking as build_tls_config
from ktlsd.request import AuthMode, HandshakeRequest, InlineMaterial, InlinePsk, MessageType
from ktlsd.settings import LEGACY_PSK_SHA384_MODES, X509Files
from ktlsd.tls.client_hello import (
    MalformedPskExtension,
    OfferedPsk,
    parse_pre_shared_key,
)
from ktlsd.tls.handshake import (
    PskKey,
    TlsConfig,
    TlsHandshake,
    handshake_blocking,
    perform_handshake,
)
from ktlsd.tls.session import CipherSuite, Role, Session
from tests.agent_helpers import DirectRequest, LogLines

IDENTITY = b"nvme-sha384-host"
KEY48 = bytes(range(100, 148))
TIMEOUT = 5.0  # generous: every failure below must come from a refusal, never from this
PSK = PskKey(IDENTITY, KEY48, "sha384", serial=0x384)


def client_config(mode: str = "accept", **kw: object) -> TlsConfig:
    return TlsConfig(
        role=Role.CLIENT, psk_keys=(PSK,), legacy_psk_sha384=mode, **kw  # type: ignore[arg-type]
    )


def server_config(mode: str = "accept", **kw: object) -> TlsConfig:
    keys = {IDENTITY: PSK}
    return TlsConfig(
        role=Role.SERVER, psk_lookup=keys.get, legacy_psk_sha384=mode,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


# --- helpers ----------------------------------------------------------------------------------
def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x81, n]) if n < 0x100 else (
        bytes([0x82]) + n.to_bytes(2, "big"))
    return bytes([tag]) + length + body


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def psk_session_pem(path: Path, key: bytes, suite: CipherSuite) -> Path:
    """An OpenSSL ``SSL_SESSION`` (ssl/ssl_asn1.c layout) holding an external TLS 1.3 PSK
    bound to ``suite``: what ``s_client``/``s_server -psk_session`` read. Only the fields a
    PSK needs: version 1, TLS 1.3, the suite, an empty session id, the key, time, timeout."""
    body = (
        _der_int(1) + _der_int(0x0304) + _der(0x04, suite.code.to_bytes(2, "big"))
        + _der(0x04, b"") + _der(0x04, key)
        + _der(0xA1, _der_int(int(time.time()))) + _der(0xA2, _der_int(86400))
    )
    text = base64.encodebytes(_der(0x30, body)).decode()
    path.write_text(
        "-----BEGIN SSL SESSION PARAMETERS-----\n" + text
        + "-----END SSL SESSION PARAMETERS-----\n"
    )
    return path


def keylog_secrets(path: Path) -> dict[str, bytes]:
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        found = {}
        if path.exists():
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 3 and parts[0].endswith("TRAFFIC_SECRET_0"):
                    found[parts[0]] = bytes.fromhex(parts[2])
        if len(found) == 2:
            return found
        time.sleep(0.02)
    raise AssertionError(f"no traffic secrets in {path}")


def client_hello_psks(record: bytes) -> tuple[OfferedPsk, ...]:
    """The offered PSKs of a ClientHello record (a small, test-only walk of its layout)."""
    body = record[5 + 4 :]  # record header, handshake header
    pos = 2 + 32
    pos += 1 + body[pos]  # legacy_session_id
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher_suites
    pos += 1 + body[pos]  # compression methods
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    while pos < end:
        ext_type = int.from_bytes(body[pos : pos + 2], "big")
        length = int.from_bytes(body[pos + 2 : pos + 4], "big")
        if ext_type == 41:
            return parse_pre_shared_key(body[pos + 4 : pos + 4 + length])
        pos += 4 + length
    raise AssertionError("ClientHello without pre_shared_key")


def psk_extension_span(record: bytes) -> tuple[int, int]:
    """Where the pre_shared_key extension body sits in a ClientHello record: (start, end)."""
    body_start = 5 + 4
    body = record[body_start:]
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 2
    while pos < end:
        ext_type = int.from_bytes(body[pos : pos + 2], "big")
        length = int.from_bytes(body[pos + 2 : pos + 4], "big")
        if ext_type == 41:
            return body_start + pos + 4, body_start + pos + 4 + length
        pos += 4 + length
    raise AssertionError("ClientHello without pre_shared_key")


@dataclass(frozen=True)
class PeerKind:
    """One external peer: how to start it and how to prove the session's keys with it."""

    name: str
    start: Callable[[int, Path], Peer]  # (port for a client / unused for a server, tmp dir)
    proof: str  # "echo-upper" (tlslite), "echo" (gnutls-serv), "keylog"
    refusal_text: str = ""  # what the peer prints when our server refuses it


def prove_keys(kind: PeerKind, session: Session, sock: socket.socket, tmp: Path) -> None:
    if kind.proof == "keylog":
        logged = keylog_secrets(tmp / "keys")
        assert logged["CLIENT_TRAFFIC_SECRET_0"] == session.client_secret
        assert logged["SERVER_TRAFFIC_SECRET_0"] == session.server_secret
        return
    sock.sendall(seal(session.suite, session.tx_secret, 0, b"nvme data\n"))
    data, _, _ = read_application_data(sock, session.suite, session.rx_secret, 0)
    assert data == (b"NVME DATA\n" if kind.proof == "echo-upper" else b"nvme data\n")


def _passwd(tmp: Path) -> str:
    path = tmp / "psk.passwd"
    path.write_text(f"{IDENTITY.decode()}:{KEY48.hex()}\n")
    return str(path)


LEGACY_CLIENTS = [
    PeerKind("tlslite", lambda port, tmp: tlslite_client(port, IDENTITY, KEY48, "sha256"),
             "echo-upper", "handshake_failure"),
    PeerKind("openssl", lambda port, tmp: openssl_client(
        port, "-psk_identity", IDENTITY.decode(), "-psk", KEY48.hex(),
        "-ciphersuites", "TLS_AES_128_GCM_SHA256", "-keylogfile", str(tmp / "keys")),
        "keylog", "alert handshake failure"),
    PeerKind("gnutls", lambda port, tmp: gnutls_client(
        port, "--pskusername", IDENTITY.decode(), "--pskkey", KEY48.hex(),
        "--priority", GNUTLS_TLS13_PSK, env={"SSLKEYLOGFILE": str(tmp / "keys")}),
        "keylog", "Handshake failed"),
]
SPEC_CLIENTS = [
    PeerKind("tlslite", lambda port, tmp: tlslite_client(port, IDENTITY, KEY48, "sha384"),
             "echo-upper"),
    PeerKind("openssl", lambda port, tmp: openssl_client(
        port, "-psk_identity", IDENTITY.decode(),
        "-psk_session", str(psk_session_pem(tmp / "s.pem", KEY48,
                                            CipherSuite.TLS_AES_256_GCM_SHA384)),
        "-keylogfile", str(tmp / "keys")), "keylog"),
]
LEGACY_SERVERS = [
    PeerKind("tlslite", lambda _, tmp: tlslite_server(IDENTITY, KEY48, "sha256"), "echo-upper"),
    PeerKind("openssl", lambda _, tmp: openssl_server(
        "-nocert", "-psk_identity", IDENTITY.decode(), "-psk", KEY48.hex(),
        "-ciphersuites", "TLS_AES_128_GCM_SHA256", "-keylogfile", str(tmp / "keys")), "keylog"),
    PeerKind("gnutls", lambda _, tmp: gnutls_server(
        "--pskpasswd", _passwd(tmp), "--priority", GNUTLS_TLS13_PSK), "echo"),
]
SPEC_SERVERS = [
    PeerKind("tlslite", lambda _, tmp: tlslite_server(IDENTITY, KEY48, "sha384"), "echo-upper"),
    PeerKind("openssl", lambda _, tmp: openssl_server(
        "-nocert", "-psk_identity", IDENTITY.decode(),
        "-psk_session", str(psk_session_pem(tmp / "s.pem", KEY48,
                                            CipherSuite.TLS_AES_256_GCM_SHA384)),
        "-keylogfile", str(tmp / "keys")), "keylog"),
]


def _ids(kinds: list[PeerKind]) -> list[str]:
    return [k.name for k in kinds]


@pytest.fixture
def engine_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="ktlsd.tls.handshake")
    return caplog


def legacy_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and "legacy_psk_sha384" in r.getMessage()]


def serve_one(config: TlsConfig, kind: PeerKind, tmp: Path) -> tuple[Session, socket.socket, Peer]:
    """Start ``kind`` as a client against a fresh listener; run ktlsd's server handshake."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.settimeout(TIMEOUT)
        peer = kind.start(lsock.getsockname()[1], tmp)
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


def serve_one_failing(config: TlsConfig, kind: PeerKind, tmp: Path) -> tuple[HandshakeError, Peer]:
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.settimeout(TIMEOUT)
        peer = kind.start(lsock.getsockname()[1], tmp)
        sock, _ = lsock.accept()
    with sock, pytest.raises(HandshakeError) as info:
        handshake_blocking(sock, config, timeout=TIMEOUT)
    return info.value, peer


def connect(kind: PeerKind, config: TlsConfig, tmp: Path) -> tuple[Session, socket.socket, Peer]:
    peer = kind.start(0, tmp)
    sock = socket.create_connection(("127.0.0.1", peer.port), timeout=TIMEOUT)  # type: ignore
    sock.settimeout(None)
    try:
        return handshake_blocking(sock, config, timeout=TIMEOUT), sock, peer
    except BaseException:
        sock.close()
        peer.close()
        raise


def connect_failing(kind: PeerKind, config: TlsConfig, tmp: Path) -> HandshakeError:
    with kind.start(0, tmp) as peer:
        sock = socket.create_connection(("127.0.0.1", peer.port), timeout=TIMEOUT)  # type: ignore
        sock.settimeout(None)
        with sock, pytest.raises(HandshakeError) as info:
            handshake_blocking(sock, config, timeout=TIMEOUT)
    return info.value


def assert_prompt_refusal(err: HandshakeError, *words: str) -> None:
    text = str(err)
    assert err.cause is not FailureCause.TIMEOUT, text
    assert "\n" not in text
    for word in words:
        assert word in text, text
    assert KEY48.hex() not in text


# --- ktlsd as server --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["accept", "offer"])
@pytest.mark.parametrize("kind", LEGACY_CLIENTS, ids=_ids(LEGACY_CLIENTS))
def test_server_accepts_a_legacy_client_as_sha256(
    kind: PeerKind, mode: str, tmp_path: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    session, sock, peer = serve_one(server_config(mode), kind, tmp_path)
    with sock, peer:
        assert session.suite.hash_name == "sha256"  # the truth: a SHA-256 suite
        assert session.psk_binder_hash == "sha256" and session.legacy_psk_binding
        assert session.peer.psk_identity == IDENTITY and session.peer.psk_serial == 0x384
        prove_keys(kind, session, sock, tmp_path)
    warnings = legacy_warnings(engine_log)
    assert len(warnings) == 1, warnings
    assert "127.0.0.1:" in warnings[0] and IDENTITY.decode() in warnings[0]
    assert f"legacy_psk_sha384 = {mode}" in warnings[0]


@pytest.mark.parametrize("kind", LEGACY_CLIENTS, ids=_ids(LEGACY_CLIENTS))
def test_server_refuses_a_legacy_client_promptly(kind: PeerKind, tmp_path: Path) -> None:
    err, peer = serve_one_failing(server_config("refuse"), kind, tmp_path)
    with peer:
        assert err.cause is FailureCause.PEER_REJECTED
        assert_prompt_refusal(err, "legacy_psk_sha384 = refuse", "SHA-256", "127.0.0.1:",
                              IDENTITY.decode())
        peer.wait_for(kind.refusal_text)  # the client was told (a handshake_failure alert)


@pytest.mark.parametrize("mode", LEGACY_PSK_SHA384_MODES)
@pytest.mark.parametrize("kind", SPEC_CLIENTS, ids=_ids(SPEC_CLIENTS))
def test_server_takes_a_spec_client_as_sha384(
    kind: PeerKind, mode: str, tmp_path: Path, engine_log: pytest.LogCaptureFixture
) -> None:
    session, sock, peer = serve_one(server_config(mode), kind, tmp_path)
    with sock, peer:
        assert session.suite is CipherSuite.TLS_AES_256_GCM_SHA384
        assert session.psk_binder_hash == "sha384" and not session.legacy_psk_binding
        prove_keys(kind, session, sock, tmp_path)
    assert legacy_warnings(engine_log) == []


# --- ktlsd as client --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", LEGACY_SERVERS, ids=_ids(LEGACY_SERVERS))
def test_offering_client_reaches_a_legacy_server(kind: PeerKind, tmp_path: Path) -> None:
    session, sock, peer = connect(kind, client_config("offer"), tmp_path)
    with sock, peer:
        assert session.suite.hash_name == "sha256"
        assert session.psk_binder_hash == "sha256" and session.legacy_psk_binding
        assert session.peer.psk_identity == IDENTITY
        prove_keys(kind, session, sock, tmp_path)


@pytest.mark.parametrize("mode", ["accept", "refuse"])
@pytest.mark.parametrize("kind", LEGACY_SERVERS, ids=_ids(LEGACY_SERVERS))
def test_spec_client_fails_promptly_against_a_legacy_server(
    kind: PeerKind, mode: str, tmp_path: Path
) -> None:
    err = connect_failing(kind, client_config(mode), tmp_path)
    assert_prompt_refusal(err, "tlshd 1.0", "legacy_psk_sha384 = offer sends")


@pytest.mark.parametrize("kind", SPEC_SERVERS, ids=_ids(SPEC_SERVERS))
def test_offering_client_fails_promptly_against_a_spec_server(
    kind: PeerKind, tmp_path: Path
) -> None:
    err = connect_failing(kind, client_config("offer"), tmp_path)
    assert_prompt_refusal(err, "legacy_psk_sha384 = offer", "spec-conformant server refuses")


@pytest.mark.parametrize("mode", ["accept", "refuse"])
@pytest.mark.parametrize("kind", SPEC_SERVERS, ids=_ids(SPEC_SERVERS))
def test_spec_client_reaches_a_spec_server_with_sha384(
    kind: PeerKind, mode: str, tmp_path: Path
) -> None:
    session, sock, peer = connect(kind, client_config(mode), tmp_path)
    with sock, peer:
        assert session.suite is CipherSuite.TLS_AES_256_GCM_SHA384
        assert session.psk_binder_hash == "sha384" and not session.legacy_psk_binding
        prove_keys(kind, session, sock, tmp_path)


# --- ktlsd with itself --------------------------------------------------------------------------
def first_flight(config: TlsConfig) -> bytes:
    with TlsHandshake(config) as hs:
        return hs.start()


@pytest.mark.parametrize("mode", LEGACY_PSK_SHA384_MODES)
def test_client_hello_binder_size(mode: str) -> None:
    """What goes on the wire: a 48-byte binder, except with ``offer`` (32, tlshd 1.0's)."""
    (offered,) = client_hello_psks(first_flight(client_config(mode)))
    assert offered.identity == IDENTITY
    assert offered.binder_length == (32 if mode == "offer" else 48)


def pair(client: TlsConfig, server: TlsConfig) -> tuple[object, object]:
    async def run() -> list[object]:
        a, b = socket.socketpair()
        with a, b:
            return await asyncio.gather(
                perform_handshake(a, client, timeout=TIMEOUT),
                perform_handshake(b, server, timeout=TIMEOUT),
                return_exceptions=True,
            )

    cs, ss = asyncio.run(run())
    return cs, ss


@pytest.mark.parametrize("server_mode", LEGACY_PSK_SHA384_MODES)
@pytest.mark.parametrize("client_mode", ["accept", "refuse"])
def test_ktlsd_pair_negotiates_spec_sha384(client_mode: str, server_mode: str) -> None:
    cs, ss = pair(client_config(client_mode), server_config(server_mode))
    assert isinstance(cs, Session) and isinstance(ss, Session), (cs, ss)
    for session in (cs, ss):
        assert session.suite is CipherSuite.TLS_AES_256_GCM_SHA384
        assert session.psk_binder_hash == "sha384" and not session.legacy_psk_binding
    assert cs.client_secret == ss.client_secret and len(cs.client_secret) == 48


@pytest.mark.parametrize("server_mode", ["accept", "offer"])
def test_ktlsd_offer_client_with_accepting_server(server_mode: str) -> None:
    cs, ss = pair(client_config("offer"), server_config(server_mode))
    assert isinstance(cs, Session) and isinstance(ss, Session), (cs, ss)
    for session in (cs, ss):
        assert session.suite.hash_name == "sha256" and session.legacy_psk_binding
        assert session.psk_binder_hash == "sha256"
    assert cs.client_secret == ss.client_secret and len(cs.client_secret) == 32


def test_ktlsd_offer_client_with_refusing_server() -> None:
    cs, ss = pair(client_config("offer"), server_config("refuse"))
    assert isinstance(cs, HandshakeError) and isinstance(ss, HandshakeError), (cs, ss)
    assert ss.cause is FailureCause.PEER_REJECTED
    assert_prompt_refusal(ss, "legacy_psk_sha384 = refuse")
    assert cs.cause is FailureCause.PEER_REJECTED
    assert_prompt_refusal(cs, "handshake failure", "legacy_psk_sha384 = offer")


def test_silent_close_after_our_client_hello_names_the_setting() -> None:
    """GnuTLS 3.8.9 (tlshd 1.0) as server closes without an alert when a client binds a
    SHA-384 PSK to SHA-384. A server that reads our ClientHello and closes does the same here:
    our client reports the close at once, with the hint."""
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        sock = socket.create_connection(lsock.getsockname())
        server_end, _ = lsock.accept()
    server_end.setblocking(False)
    with sock, server_end:

        async def run() -> Session:
            task = asyncio.ensure_future(perform_handshake(sock, client_config(), timeout=TIMEOUT))
            loop = asyncio.get_running_loop()
            hello = await loop.sock_recv(server_end, 65536)
            assert hello[0] == 22  # a handshake record: our ClientHello
            server_end.close()
            return await task

        with pytest.raises(HandshakeError) as info:
            asyncio.run(run())
    assert info.value.cause is FailureCause.PEER_CLOSED
    assert_prompt_refusal(info.value, "legacy_psk_sha384 = offer sends")


def test_legacy_binding_survives_a_hello_retry_request(
    engine_log: pytest.LogCaptureFixture,
) -> None:
    """The client-hello callback runs for both ClientHellos of an HRR: the decision and the
    warning stay single."""
    client = client_config("offer", groups="X25519:P-256")
    server = server_config("accept", groups="P-256")
    cs, ss = pair(client, server)
    assert isinstance(cs, Session) and isinstance(ss, Session), (cs, ss)
    assert "256" in (ss.group or "") and ss.legacy_psk_binding and cs.legacy_psk_binding
    assert ss.suite.hash_name == "sha256" and cs.client_secret == ss.client_secret
    assert len(legacy_warnings(engine_log)) == 1


def test_binder_for_the_wrong_hash_is_a_clear_refusal() -> None:
    """A SHA-256 PSK offered with a 48-byte binder is no legacy case: refused, and said so."""
    key = bytes(range(32))
    client = TlsConfig(role=Role.CLIENT, psk_keys=(PskKey(IDENTITY, key, "sha384"),))
    server = TlsConfig(role=Role.SERVER, psk_lookup={IDENTITY: PskKey(IDENTITY, key)}.get)
    cs, ss = pair(client, server)
    assert isinstance(ss, HandshakeError) and isinstance(cs, HandshakeError), (cs, ss)
    assert ss.cause is FailureCause.PEER_REJECTED
    assert_prompt_refusal(ss, "48-byte binder for SHA-256 PSK")


def test_sha384_only_suites_keep_offer_spec() -> None:
    """``offer`` needs SHA-256 suites; when only TLS_AES_256_GCM_SHA384 is allowed the
    client stays spec-conformant instead of failing."""
    config = client_config("offer", ciphersuites=(CipherSuite.TLS_AES_256_GCM_SHA384,))
    (offered,) = client_hello_psks(first_flight(config))
    assert offered.binder_length == 48


# --- malformed pre_shared_key extensions -----------------------------------------------------
def encode_psk_extension(identities: list[bytes], binders: list[bytes]) -> bytes:
    ids = b"".join(len(i).to_bytes(2, "big") + i + bytes(4) for i in identities)
    bnd = b"".join(bytes([len(b)]) + b for b in binders)
    return len(ids).to_bytes(2, "big") + ids + len(bnd).to_bytes(2, "big") + bnd


VALID = encode_psk_extension([b"first", b"second-id"], [bytes(32), bytes(range(48))])


def test_parser_reads_identities_and_binder_sizes() -> None:
    offered = parse_pre_shared_key(VALID)
    assert [o.identity for o in offered] == [b"first", b"second-id"]
    assert [o.binder_length for o in offered] == [32, 48]
    assert [o.binder_hash for o in offered] == ["sha256", "sha384"]
    assert parse_pre_shared_key(encode_psk_extension([b"x"], [bytes(40)]))[0].binder_hash is None


@pytest.mark.parametrize("cut", range(len(VALID)))
def test_parser_rejects_every_truncation(cut: int) -> None:
    with pytest.raises(MalformedPskExtension):
        parse_pre_shared_key(VALID[:cut])


@pytest.mark.parametrize(
    "data, words",
    [
        (encode_psk_extension([], [bytes(32)]), "identities list is shorter"),
        (encode_psk_extension([b"a"], []), "binders list is shorter"),
        (encode_psk_extension([b"", b"abc"], [bytes(32)] * 2), "empty PSK identity"),
        (encode_psk_extension([b"a", b"b"], [bytes(31), bytes(32)]), "binder of 31 bytes"),
        (encode_psk_extension([b"a", b"b"], [bytes(32)]), "2 identities but 1 binders"),
        (encode_psk_extension([b"a"], [bytes(32), bytes(32)]), "1 identities but 2 binders"),
        (VALID + b"\x00", "1 bytes after the binders"),
        (b"\xff\xff" + VALID[2:], "needs 65535 bytes"),
        (b"\x00\x07\xff\xff" + bytes(5) + b"\x00\x21\x20" + bytes(32),
         "a PSK identity needs 65535"),
        (bytes(0x10000), "more than an extension can hold"),
        (b"", "needs 2 bytes, only 0 left"),
    ],
    ids=["zero-identities", "zero-binders", "empty-identity", "short-binder", "fewer-binders",
         "more-binders", "trailing", "identities-overlong", "identity-oversize",
         "extension-oversize", "empty"],
)
def test_parser_rejects_malformed_shapes(data: bytes, words: str) -> None:
    with pytest.raises(MalformedPskExtension, match=words):
        parse_pre_shared_key(data)


def test_parser_fails_safely_on_mutations() -> None:
    """Seeded random corruption: the parser returns a consistent result or raises
    MalformedPskExtension, never anything else."""
    rng = random.Random(41)
    outcomes = {"parsed": 0, "malformed": 0}
    for _ in range(3000):
        data = bytearray(VALID)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data) + 1)] + bytes(rng.randrange(8))
        try:
            offered = parse_pre_shared_key(bytes(data))
        except MalformedPskExtension:
            outcomes["malformed"] += 1
            continue
        outcomes["parsed"] += 1
        assert offered and all(o.identity and o.binder_length >= 32 for o in offered)
        assert encode_psk_extension(
            [o.identity for o in offered], [bytes(o.binder_length) for o in offered]
        ).__len__() == len(data)
    assert outcomes["parsed"] and outcomes["malformed"]


def _corrupt(record: bytes, start: int, end: int, how: str) -> bytes:
    ext = bytearray(record[start:end])
    ids_len = int.from_bytes(ext[0:2], "big")
    if how == "binder-length":
        ext[2 + ids_len + 2] -= 1  # the binder claims one byte less: one byte left over
    elif how == "identities-overlong":
        ext[0:2] = (ids_len + 1).to_bytes(2, "big")
    elif how == "identity-oversize":
        ext[2:4] = b"\xff\xff"
    elif how == "zero-identities":
        ext[0:2] = b"\x00\x00"
    return record[:start] + bytes(ext) + record[end:]


@pytest.mark.parametrize(
    "how", ["binder-length", "identities-overlong", "identity-oversize", "zero-identities"]
)
def test_engine_fails_safely_on_a_malformed_extension(how: str) -> None:
    """A real ClientHello whose pre_shared_key body is corrupted (sizes of the record and the
    extension unchanged): our server answers decode_error and reports a protocol error."""
    record = first_flight(client_config())
    start, end = psk_extension_span(record)
    hostile = _corrupt(record, start, end, how)
    with TlsHandshake(server_config(), peer="192.0.2.1:4420") as hs:
        assert hs.start() == b""
        out = hs.receive_record(hostile)
        assert hs.failure is not None and not hs.complete
        assert hs.failure.cause is FailureCause.PROTOCOL_ERROR
        assert "malformed pre_shared_key" in str(hs.failure)
        assert "192.0.2.1:4420" in str(hs.failure)
    assert out == bytes([21, 3, 3, 0, 2, 2, 50])  # fatal decode_error alert, in the clear


def with_psk_extension(record: bytes, extension: bytes) -> bytes:
    """``record`` (our ClientHello, pre_shared_key last) with that extension's body replaced
    and every enclosing length fixed up."""
    start, end = psk_extension_span(record)
    assert end == len(record)  # pre_shared_key is the last extension
    grow = len(extension) - (end - start)
    out = bytearray(record[:start] + extension)
    out[start - 2 : start] = len(extension).to_bytes(2, "big")
    body = out[9:]
    pos = 2 + 32
    pos += 1 + body[pos]
    pos += 2 + int.from_bytes(body[pos : pos + 2], "big")
    pos += 1 + body[pos]
    ext_total = int.from_bytes(body[pos : pos + 2], "big") + grow
    out[9 + pos : 9 + pos + 2] = ext_total.to_bytes(2, "big")
    out[6:9] = (len(out) - 9).to_bytes(3, "big")  # handshake length
    out[3:5] = (len(out) - 5).to_bytes(2, "big")  # record length
    return bytes(out)


def test_engine_looks_up_a_bounded_number_of_identities() -> None:
    """A hostile client offering 200 identities costs at most 16 lookups, and the failure
    reason names a few of them, not all."""
    looked_up: list[bytes] = []

    def lookup(identity: bytes) -> PskKey | None:
        looked_up.append(identity)
        return None

    ext = encode_psk_extension([b"id%d" % i for i in range(200)], [bytes(32)] * 200)
    hostile = with_psk_extension(first_flight(client_config()), ext)
    with TlsHandshake(TlsConfig(role=Role.SERVER, psk_lookup=lookup)) as hs:
        hs.start()
        out = hs.receive_record(hostile)
        assert hs.failure is not None
    assert out == bytes([21, 3, 3, 0, 2, 2, 115])  # unknown_psk_identity
    assert looked_up == [b"id%d" % i for i in range(16)]
    reason = str(hs.failure)
    assert "'id0', 'id1', 'id2', 'id3' and 196 more" in reason and "id4" not in reason


# --- the setting: configuration file, agent, material -------------------------------------------
def test_config_key_parses_and_reaches_the_agent_settings() -> None:
    assert config_module.LEGACY_PSK_SHA384_MODES == LEGACY_PSK_SHA384_MODES
    default = config_from_keyfile(parse_key_file("[ktlsd]\n", "t.conf"))
    assert default.legacy_psk_sha384 == "accept"
    assert default.agent_settings().legacy_psk_sha384 == "accept"
    for mode in LEGACY_PSK_SHA384_MODES:
        text = f"[ktlsd]\nlegacy_psk_sha384 = {mode.upper()}\n"
        parsed = config_from_keyfile(parse_key_file(text, "t.conf"))
        assert parsed.legacy_psk_sha384 == mode
        assert parsed.agent_settings().legacy_psk_sha384 == mode


def test_config_key_rejects_other_values() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_keyfile(parse_key_file("[ktlsd]\n\nlegacy_psk_sha384 = maybe\n", "t.conf"))
    assert str(info.value) == (
        "t.conf:3: [ktlsd] legacy_psk_sha384: 'maybe' is not one of refuse, accept, offer"
    )
    with pytest.raises(ValueError, match="legacy_psk_sha384"):
        TlsConfig(role=Role.SERVER, psk_lookup=dict().get, legacy_psk_sha384="maybe")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", LEGACY_PSK_SHA384_MODES)
def test_build_tls_config_carries_the_setting(mode: str) -> None:
    inline = InlineMaterial(psk_keys=(InlinePsk(IDENTITY, KEY48, "sha384"),))
    for message_type in (MessageType.CLIENTHELLO, MessageType.SERVERHELLO):
        request = HandshakeRequest(sockfd=0, message_type=message_type, auth_mode=AuthMode.PSK,
                                   inline=inline)
        config = build_tls_config(request, x509_files=X509Files(),
                                  legacy_psk_sha384=mode)  # type: ignore[arg-type]
        assert config.legacy_psk_sha384 == mode


@pytest.mark.parametrize("mode", ["accept", "refuse"])
def test_agent_applies_the_setting_to_a_legacy_gnutls_client(mode: str, tmp_path: Path) -> None:
    """The whole path: AgentSettings -> build_tls_config -> engine, against gnutls-cli (GnuTLS
    binds the 48-byte key to SHA-256, as tlshd 1.0 does)."""
    kind = LEGACY_CLIENTS[2]

    async def main() -> None:
        logs = LogLines()
        agent = Agent(AgentSettings(keep_sessions=False, legacy_psk_sha384=mode), [])  # type: ignore[arg-type]
        with socket.create_server(("127.0.0.1", 0)) as lsock, \
                kind.start(lsock.getsockname()[1], tmp_path) as peer:
            lsock.setblocking(False)
            sock, _ = await asyncio.get_running_loop().sock_accept(lsock)
            with sock, logs.attached():
                request = HandshakeRequest(
                    sockfd=sock.detach(), message_type=MessageType.SERVERHELLO,
                    auth_mode=AuthMode.PSK,
                    inline=InlineMaterial(psk_keys=(InlinePsk(IDENTITY, KEY48, "sha384"),)),
                )
                answer = await agent.serve(DirectRequest(request))
            if mode == "accept":
                assert answer.status == 0, answer.reason
                assert answer.session is not None and answer.session.legacy_psk_binding
                peer.wait_for("Handshake was completed")
            else:
                assert answer.status != 0 and "legacy_psk_sha384 = refuse" in answer.reason
                peer.wait_for(kind.refusal_text)
        (line,) = logs.handshake_lines()
        if mode == "accept":
            assert re.search(r"suite=TLS_\w+_SHA256 ", line), line
            assert any("legacy_psk_sha384 = accept" in m for m in logs.messages)
        else:
            assert "status=13 (EACCES)" in line

    asyncio.run(asyncio.wait_for(main(), 60))
