"""Post-quantum readiness on the host's OpenSSL (issue 14 item 2).

The host's OpenSSL (3.0) has no ML-DSA and no ML-KEM, so what runs here is everything around
them, against real peers: two certificate chains of different key types (ECDSA and RSA, the
mechanism an ML-DSA chain uses next to a classic one on OpenSSL 3.5) between which the peer's
signature_algorithms choose, as a server (``openssl s_client -sigalgs``) and as a client
(``openssl s_server -client_sigalgs``: the CertificateRequest's list); tlshd's
``x509.pq.*`` keys ignored with one warning where the library has no ML-DSA; the negotiated
group (chosen by ``[ktlsd] groups``) and the signature schemes in the agent's handshake line.
The ML-DSA and X25519MLKEM768 proof itself is the guest's ``pq-mldsa`` scenario.
"""

from __future__ import annotations

import os
import re
import socket
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ktlsd.agent import Agent
from ktlsd.credentials import X509Credentials
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.material import build_tls_config_blocking, pq_configuration_notes
from ktlsd.request import AuthMode, HandshakeRequest, KeyDelivery, MessageType
from ktlsd.settings import AgentSettings, X509Files
from ktlsd.tls.handshake import (
    TlsConfig,
    TlsHandshake,
    credentials_parsed_by_openssl,
    library_has_ml_dsa,
)
from ktlsd.tls.session import CipherSuite, PeerIdentity, Role, Session
from ktlsd.upcall import wire
from tests.agent_helpers import REPO, DirectRequest, LogLines, parse_handshake_line
from tests.cli_peers import Proc, ktlsd, start_ktlsd_listen
from tests.peers import openssl_server
from tests.pki import Authority, Issued
from tests.waiting import run

HAS_ML_DSA = library_has_ml_dsa()


@dataclass
class Chains:
    ca: Authority
    server_ec: Issued
    server_rsa: Issued
    client_ec: Issued
    client_rsa: Issued


@pytest.fixture(scope="module")
def chains(tmp_path_factory: pytest.TempPathFactory) -> Chains:
    ca = Authority.create(tmp_path_factory.mktemp("pq-pki"), "ecdsa")
    return Chains(
        ca=ca,
        server_ec=ca.issue_server("server-ec", key_type="ecdsa"),
        server_rsa=ca.issue_server("server-rsa", key_type="rsa"),
        client_ec=ca.issue_client("client-ec", key_type="ecdsa"),
        client_rsa=ca.issue_client("client-rsa", key_type="rsa"),
    )


def s_client(port: int, ca: Path, *args: str) -> str:
    """One ``openssl s_client`` connection (an HTTP request for ``listen --www``); its output."""
    proc = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3", "-CAfile", str(ca),
         "-verify_return_error", *args],
        input=b"GET / HTTP/1.0\r\n\r\n", capture_output=True, timeout=30,
    )  # fmt: skip
    return proc.stdout.decode(errors="replace").replace(" = ", "=")


@pytest.mark.parametrize(("sigalgs", "scheme", "openssl_says", "subject"), [
    ("ecdsa_secp256r1_sha256", "ecdsa_secp256r1_sha256", "ECDSA", "CN=server-ec"),
    ("rsa_pss_rsae_sha256", "rsa_pss_sha256", "RSA-PSS", "CN=server-rsa"),
    ("rsa_pss_rsae_sha256:ecdsa_secp256r1_sha256", "rsa_pss_sha256", "RSA-PSS", "CN=server-rsa"),
    ("ecdsa_secp256r1_sha256:rsa_pss_rsae_sha256", "ecdsa_secp256r1_sha256", "ECDSA",
     "CN=server-ec"),
])  # fmt: skip
def test_listen_with_two_chains_sends_the_one_the_clients_sigalgs_prefer(
    chains: Chains, sigalgs: str, scheme: str, openssl_says: str, subject: str
) -> None:
    listen, port = start_ktlsd_listen(
        "--www", "--count", "1",
        "--cert", str(chains.server_ec.cert_path), "--key", str(chains.server_ec.key_path),
        "--pq-cert", str(chains.server_rsa.cert_path),
        "--pq-key", str(chains.server_rsa.key_path),
    )  # fmt: skip
    with listen:
        said = s_client(port, chains.ca.cert_path, "-sigalgs", sigalgs)
        assert listen.wait_exit() == 0, listen.stderr_text
    assert f"Peer signature type: {openssl_says}" in said, said
    assert f"subject={subject}" in said.replace("O=ktlsd tests, ", ""), said
    assert "Verify return code: 0 (ok)" in said
    assert f"sig={scheme} " in listen.stderr_text, listen.stderr_text


@pytest.mark.parametrize(("client_sigalgs", "scheme", "subject"), [
    ("ecdsa_secp256r1_sha256", "ecdsa_secp256r1_sha256", "client-ec"),
    ("rsa_pss_rsae_sha256", "rsa_pss_sha256", "client-rsa"),
])  # fmt: skip
def test_connect_with_two_chains_sends_the_one_the_certificate_request_names(
    chains: Chains, client_sigalgs: str, scheme: str, subject: str
) -> None:
    with openssl_server(
        "-cert", str(chains.server_ec.cert_path), "-key", str(chains.server_ec.key_path),
        "-Verify", "1", "-CAfile", str(chains.ca.cert_path), "-verify_return_error",
        "-client_sigalgs", client_sigalgs, "-naccept", "1",
    ) as server:  # fmt: skip
        connect = Proc(ktlsd(
            "connect", f"127.0.0.1:{server.port}", "--ca", str(chains.ca.cert_path),
            "--cert", str(chains.client_ec.cert_path), "--key", str(chains.client_ec.key_path),
            "--pq-cert", str(chains.client_rsa.cert_path),
            "--pq-key", str(chains.client_rsa.key_path),
        ), name="ktlsd-connect")  # fmt: skip
        with connect:
            connect.wait_stderr(r"handshake ok: .*\n")
            connect.close_stdin()
            assert connect.wait_exit() == 0, connect.stderr_text
        server.wait_exit()
        seen = server.output().replace(" = ", "=")
    line = re.search(r"handshake ok: (.*)", connect.stderr_text)
    assert line is not None
    assert f"sig={scheme} " in line.group(1), line.group(1)
    assert "peer_sig=ecdsa_secp256r1_sha256 " in line.group(1), line.group(1)
    assert f"CN={subject}" in seen, seen  # what s_server verified and printed
    other = "client-rsa" if subject == "client-ec" else "client-ec"
    assert f"CN={other}" not in seen


def test_two_chains_of_one_key_type_are_refused(chains: Chains) -> None:
    first = X509Credentials.from_pem_files(str(chains.server_ec.cert_path),
                                           str(chains.server_ec.key_path))
    second = X509Credentials.from_pem_files(str(chains.client_ec.cert_path),
                                            str(chains.client_ec.key_path))
    config = TlsConfig(role=Role.SERVER, credentials=first, second_credentials=second)
    with pytest.raises(HandshakeError) as caught:
        TlsHandshake(config)
    assert caught.value.cause is FailureCause.MISSING_MATERIAL
    assert "key type (EC) is the first chain's" in caught.value.reason
    with pytest.raises(ValueError, match="needs a first one"):
        TlsConfig(role=Role.SERVER, second_credentials=second)


def test_credentials_parsed_by_openssl_match_cryptographys(chains: Chains) -> None:
    issued = chains.server_rsa
    ours, key_type = credentials_parsed_by_openssl(
        issued.cert_path.read_bytes(), issued.key_path.read_bytes(),
        cert_name="c.pem", key_name="k.pem",
    )
    reference = X509Credentials.from_pem_files(str(issued.cert_path), str(issued.key_path))
    assert key_type == "RSA"
    assert ours.chain == reference.chain
    assert ours.private_key == reference.private_key
    with pytest.raises(HandshakeError, match="does not match the certificate") as caught:
        credentials_parsed_by_openssl(
            issued.cert_path.read_bytes(), chains.server_ec.key_path.read_bytes(),
            cert_name="c.pem", key_name="k.pem",
        )
    assert caught.value.cause is FailureCause.MISSING_MATERIAL


def pq_files(chains: Chains) -> X509Files:
    """A role's files with x509.pq.* naming an RSA chain (not ML-DSA)."""
    return X509Files(
        truststore=str(chains.ca.cert_path),
        certificate=str(chains.server_ec.cert_path),
        private_key=str(chains.server_ec.key_path),
        pq_certificate=str(chains.server_rsa.cert_path),
        pq_private_key=str(chains.server_rsa.key_path),
    )


def test_pq_keys_without_ml_dsa_in_the_library_serve_the_classic_chain(chains: Chains) -> None:
    request = HandshakeRequest(sockfd=-1, message_type=MessageType.SERVERHELLO,
                               auth_mode=AuthMode.X509)
    if HAS_ML_DSA:  # OpenSSL 3.5: the chain is used, and must be ML-DSA as tlshd wants it
        with pytest.raises(HandshakeError, match="holds a RSA key, not ML-DSA"):
            build_tls_config_blocking(request, x509_files=pq_files(chains))
        return
    config = build_tls_config_blocking(request, x509_files=pq_files(chains))
    assert config.second_credentials is None
    assert config.credentials is not None
    assert config.credentials.chain[0] == chains.server_ec.cert_der
    notes = pq_configuration_notes({"authenticate.server": pq_files(chains)})
    assert len(notes) == 1
    level, message = notes[0]
    assert level == 30  # logging.WARNING
    assert "[authenticate.server] x509.pq.certificate is ignored" in message
    assert "has no ML-DSA" in message and "OpenSSL 3." in message


def test_run_check_warns_once_about_pq_keys_the_library_cannot_use(
    chains: Chains, tmp_path: Path
) -> None:
    conf = tmp_path / "tlshd.conf"
    conf.write_text(
        "[authenticate.server]\n"
        f"x509.certificate={chains.server_ec.cert_path}\n"
        f"x509.private_key={chains.server_ec.key_path}\n"
        f"x509.pq.certificate={chains.server_rsa.cert_path}\n"
        f"x509.pq.private_key={chains.server_rsa.key_path}\n"
        "[ktlsd]\nservice_socket=none\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "ktlsd", "run", "--check", "--config", str(conf)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    if HAS_ML_DSA:
        assert proc.stderr.count("not ML-DSA") == 1, proc.stderr
    else:
        assert proc.stderr.count("x509.pq.certificate is ignored") == 1, proc.stderr
        assert "has no ML-DSA" in proc.stderr
    assert "configuration OK" in proc.stdout


@pytest.mark.parametrize(("groups", "expected"), [("X25519", "x25519"), ("P-256", "secp256r1")])
def test_agent_line_carries_the_group_and_signature_schemes(
    chains: Chains, groups: str, expected: str
) -> None:
    """The agent as an x509 server (a kernel-style request) for ``openssl s_client``: the
    group its ``[ktlsd] groups`` chose, the scheme it signed with (which chain) and the
    client's, in the one handshake line."""
    settings = AgentSettings(
        keep_sessions=False, groups=groups,
        server_x509=X509Files(
            truststore=str(chains.ca.cert_path),
            certificate=str(chains.server_ec.cert_path),
            private_key=str(chains.server_ec.key_path), require_client_cert=True,
        ),
    )  # fmt: skip

    async def main() -> list[str]:
        logs = LogLines()
        agent = Agent(settings, [])
        with socket.create_server(("127.0.0.1", 0)) as listener, logs.attached():
            port = listener.getsockname()[1]
            client = subprocess.Popen(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
                 "-CAfile", str(chains.ca.cert_path), "-cert", str(chains.client_rsa.cert_path),
                 "-key", str(chains.client_rsa.key_path), "-sigalgs",
                 "ecdsa_secp256r1_sha256:rsa_pss_rsae_sha256"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )  # fmt: skip
            try:
                listener.settimeout(20)
                conn, _ = listener.accept()
                with conn:
                    request = HandshakeRequest(
                        sockfd=os.dup(conn.fileno()), message_type=MessageType.SERVERHELLO,
                        auth_mode=AuthMode.X509,
                    )
                    pending = DirectRequest(request, source_name="kernel",
                                            delivery=KeyDelivery.RETURN_SECRETS)
                    answer = await agent.serve(pending)
                    assert answer.status == 0, answer.reason
            finally:
                client.kill()
                client.wait()
        return logs.handshake_lines()

    lines = run(main())
    assert len(lines) == 1
    fields = parse_handshake_line("ktlsd: I " + lines[0])
    assert fields["group"] == expected
    assert fields["sig"] == "ecdsa_secp256r1_sha256"
    assert fields["peer_sig"] == "rsa_pss_sha256"
    assert fields["identity"].startswith("x509:CN=client-rsa,")


def test_signature_schemes_cross_the_service_wire() -> None:
    session = Session(
        role=Role.CLIENT, suite=CipherSuite.TLS_AES_128_GCM_SHA256,
        client_secret=b"\x01" * 32, server_secret=b"\x02" * 32,
        peer=PeerIdentity(), group="X25519MLKEM768",
        signature_scheme="mldsa65", peer_signature_scheme="ecdsa_secp256r1_sha256",
    )  # fmt: skip
    from ktlsd.request import HandshakeDone

    message = wire.encode_done_message(HandshakeDone(status=0, sockfd=-1, session=session))
    _, done = wire.decode_done_message(message)
    assert done.session is not None
    assert done.session.group == "X25519MLKEM768"
    assert done.session.signature_scheme == "mldsa65"
    assert done.session.peer_signature_scheme == "ecdsa_secp256r1_sha256"
    bare = wire.encode_done_message(HandshakeDone(
        status=0, sockfd=-1, session=Session(role=Role.CLIENT, suite=session.suite,
                                             client_secret=b"\x01" * 32,
                                             server_secret=b"\x02" * 32)))  # fmt: skip
    _, done = wire.decode_done_message(bare)
    assert done.session is not None
    assert (done.session.signature_scheme, done.session.peer_signature_scheme) == (None, None)


def _pcap(segments: list[tuple[int, int, bytes]]) -> bytes:
    """A classic pcap file (Ethernet link type, as ``tcpdump -i lo -w`` writes it) holding
    one TCP segment per (source port, destination port, payload), 127.0.0.1 both ways."""
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    seqs: dict[tuple[int, int], int] = {}
    for sport, dport, payload in segments:
        seq = seqs.get((sport, dport), 1000)
        seqs[(sport, dport)] = seq + len(payload)
        tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x18, 65535, 0, 0)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp) + len(payload), 0, 0, 64, 6,
                         0, bytes([127, 0, 0, 1]), bytes([127, 0, 0, 1]))  # fmt: skip
        frame = bytes(12) + b"\x08\x00" + ip + tcp + payload
        out.append(struct.pack("<IIII", 0, 0, len(frame), len(frame)) + frame)
    return b"".join(out)


@pytest.mark.parametrize(("groups", "code"), [("P-256:X25519", 0x0017), ("X25519", 0x001D)])
def test_a_capture_of_real_hellos_names_the_key_share_groups(
    chains: Chains, groups: str, code: int
) -> None:
    """The guest scenario's capture check (tls_wire: pcap reader, key_share parser) on hellos
    OpenSSL really made: the ClientHello's first key share and the ServerHello's are the
    configured group's code point (0x11EC for X25519MLKEM768 in the guest)."""
    from testbed.scenarios.tls_wire import GROUPS, TcpStreams, WireError, pcap_ipv4_packets

    server_config = TlsConfig(
        role=Role.SERVER, groups=groups,
        credentials=X509Credentials.from_pem_files(str(chains.server_ec.cert_path),
                                                   str(chains.server_ec.key_path)),
    )  # fmt: skip
    client_config = TlsConfig(role=Role.CLIENT, groups=groups, verify_peer=False)
    with TlsHandshake(client_config) as client, TlsHandshake(server_config) as server:
        hello = client.start()
        _, flight = server.receive(hello)
    streams = TcpStreams({2049})
    packets = pcap_ipv4_packets(_pcap([(700, 2049, hello), (2049, 700, flight)]))
    assert len(packets) == 2
    for packet in packets:
        streams.add_ipv4(packet)
    (seen,) = streams.handshakes()
    assert seen.client_hello is not None and seen.server_hello is not None
    assert seen.client_hello.key_share_groups == (code,)
    assert seen.server_hello.key_share_group == code
    assert GROUPS[code] in ("secp256r1", "x25519")
    with pytest.raises(WireError, match="pcapng"):
        pcap_ipv4_packets(b"\x0a\x0d\x0d\x0a" + bytes(40))


def test_config_pq_keys_reach_the_agent_settings_of_each_role(tmp_path: Path) -> None:
    from ktlsd.config import config_from_keyfile, parse_key_file

    text = ("[authenticate.client]\nx509.pq.certificate=/c/pq.pem\nx509.pq.private_key=/c/pq.key\n"
            "[authenticate.server]\nx509.certificate=/s/ec.pem\nx509.private_key=/s/ec.key\n"
            "x509.pq.certificate=/s/pq.pem\nx509.pq.private_key=/s/pq.key\n")
    settings = config_from_keyfile(parse_key_file(text, "t.conf")).agent_settings()
    assert (settings.client_x509.pq_certificate, settings.client_x509.pq_private_key) == (
        "/c/pq.pem", "/c/pq.key")
    assert (settings.server_x509.pq_certificate, settings.server_x509.pq_private_key) == (
        "/s/pq.pem", "/s/pq.key")
    assert settings.server_x509.certificate == "/s/ec.pem"
