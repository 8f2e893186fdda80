"""``x509.client_allowed_sans``: which client certificates ktlsd's server lets in by name.

Certificates are made by the openssl CLI (as an administrator would make them), with the
SANs each case needs; the handshakes are real (openssl s_client against ktlsd's engine, and
the agent serving a kernel-like request), so what is checked is what a client meets: a
listed DNS name or address gets in, anything else gets a bad_certificate alert and DONE
EACCES, with one log line naming the SANs the certificate carried.
"""

from __future__ import annotations

import asyncio
import datetime
import errno
import ipaddress
import logging
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ktlsd.agent import Agent
from ktlsd.config import AgentConfig, config_from_keyfile, parse_key_file
from ktlsd.credentials import X509Credentials
from ktlsd.errors import FailureCause, HandshakeError
from ktlsd.material import build_tls_config_blocking
from ktlsd.request import (
    AuthMode,
    ConsumerCredentials,
    HandshakeRequest,
    InlineMaterial,
    KeyDelivery,
    MessageType,
)
from ktlsd.settings import AgentSettings, X509Files
from ktlsd.tls.allowed_sans import AllowedSans
from ktlsd.tls.handshake import TlsConfig, handshake_blocking
from ktlsd.tls.session import Role
from ktlsd.workers import decode_settings, encode_settings
from tests.agent_helpers import DirectRequest, LogLines, parse_handshake_line
from tests.peers import Peer, openssl_client

TIMEOUT = 10.0
ALLOWED = ("client1.example.com", "192.0.2.7", "2001:db8::7")


@dataclass
class Cert:
    pem: Path
    key: Path

    @property
    def der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.pem.read_bytes()).public_bytes(
            serialization.Encoding.DER)


@dataclass
class OpensslPki:
    directory: Path
    ca: Path
    ca_key: Path

    def issue(self, name: str, cn: str, san: str | None) -> Cert:
        """A P-256 certificate signed by the CA; ``san`` in openssl's subjectAltName syntax."""
        key, csr, pem = (self.directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                 "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}")
        ext = self.directory / f"{name}.ext"
        ext.write_text(f"subjectAltName = {san}\n" if san else "basicConstraints = CA:FALSE\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey",
                 str(self.ca_key), "-CAcreateserial", "-days", "2", "-out", str(pem),
                 "-extfile", str(ext))
        return Cert(pem, key)


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Cert]:
    directory = tmp_path_factory.mktemp("sans-pki")
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(ca_key), "-out", str(ca), "-days", "2", "-subj", "/CN=SAN test CA")
    issuer = OpensslPki(directory, ca, ca_key)
    certs = {
        "ca": Cert(ca, ca_key),
        "server": issuer.issue("server", "server", "DNS:localhost,IP:127.0.0.1"),
        "dns": issuer.issue("dns", "client one", "DNS:client1.example.com"),
        "dns-upper": issuer.issue("dns-upper", "client one", "DNS:Client1.Example.COM"),
        "ipv4": issuer.issue("ipv4", "client seven", "IP:192.0.2.7"),
        "ipv6": issuer.issue("ipv6", "client seven v6", "IP:2001:0db8:0:0:0:0:0:0007"),
        # the CN is a listed name, the SANs are not: the CN is never consulted
        "other": issuer.issue("other", "client1.example.com",
                              "DNS:other.example.com,IP:10.9.9.9"),
        "no-san": issuer.issue("no-san", "client1.example.com", None),
        "wildcard": issuer.issue("wildcard", "wild", "DNS:*.example.com"),
        "email-uri": issuer.issue("email-uri", "mail",
                                  "email:client1@example.com,URI:https://client1.example.com"),
    }
    return certs


# --- the check itself (pure) --------------------------------------------------------------------


@pytest.mark.parametrize(("name", "matched"), [
    ("dns", "DNS:client1.example.com"),
    ("dns-upper", "DNS:Client1.Example.COM"),  # DNS names ignore ASCII case
    ("ipv4", "IP:192.0.2.7"),
    ("ipv6", "IP:2001:db8::7"),  # the same address, however it was written
])
def test_listed_names_are_allowed(pki: dict[str, Cert], name: str, matched: str) -> None:
    verdict = AllowedSans(ALLOWED).check(pki[name].der)
    assert verdict.allowed and verdict.matched == matched


@pytest.mark.parametrize(("name", "reason"), [
    ("other", "client certificate SANs DNS:other.example.com, IP:10.9.9.9 not in "
              "x509.client_allowed_sans"),
    ("no-san", "client certificate has no DNS or IP SAN (x509.client_allowed_sans is set)"),
    ("wildcard", "client certificate SAN DNS:*.example.com not in x509.client_allowed_sans"),
    ("email-uri", "client certificate has no DNS or IP SAN (x509.client_allowed_sans is set)"),
])
def test_unlisted_names_are_refused(pki: dict[str, Cert], name: str, reason: str) -> None:
    verdict = AllowedSans(ALLOWED).check(pki[name].der)
    assert not verdict.allowed
    assert verdict.reason == reason


def test_no_wildcards_either_way(pki: dict[str, Cert]) -> None:
    """A wildcard entry matches only the literal SAN; a wildcard SAN only the literal entry."""
    assert not AllowedSans(("*.example.com",)).check(pki["dns"].der).allowed
    assert AllowedSans(("*.example.com",)).check(pki["wildcard"].der).allowed
    assert not AllowedSans(("x.example.com",)).check(pki["wildcard"].der).allowed


def test_an_empty_list_allows_every_certificate(pki: dict[str, Cert]) -> None:
    assert AllowedSans(()).check(pki["no-san"].der).allowed
    assert not AllowedSans(())


def test_a_listed_address_written_as_a_dns_name_matches_that_text_only(
    pki: dict[str, Cert]
) -> None:
    """tlshd compares each entry with DNS and IP SANs alike; an address is not a DNS name
    pattern (10.9.9.9 is listed, the certificate's IP SAN 10.9.9.9 matches)."""
    assert AllowedSans(("10.9.9.9",)).check(pki["other"].der).matched == "IP:10.9.9.9"
    assert not AllowedSans(("10.9.9.8",)).check(pki["other"].der).allowed


def _cryptography_cert(names: list[x509.GeneralName]) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_an_ip_san_that_is_not_one_address_refuses_the_certificate() -> None:
    """An 8-byte iPAddress (address and mask) before a listed name: refused, as by tlshd."""
    der = _cryptography_cert([x509.IPAddress(ipaddress.ip_network("10.0.0.0/8")),
                              x509.DNSName("client1.example.com")])
    verdict = AllowedSans(ALLOWED).check(der)
    assert not verdict.allowed
    assert verdict.reason == ("client certificate refused: its IP SAN 10.0.0.0/8 is not a "
                              "single address")


def test_a_refusal_names_a_bounded_number_of_printable_sans() -> None:
    names: list[x509.GeneralName] = [x509.DNSName(f"host{i}.example.com") for i in range(40)]
    names[:0] = [x509.DNSName("x" * 200), x509.DNSName("bell\x07.example")]
    verdict = AllowedSans(ALLOWED).check(_cryptography_cert(names))
    assert not verdict.allowed
    assert verdict.reason.endswith("and 38 more not in x509.client_allowed_sans")
    assert "DNS:" + "x" * 60 + "..., " in verdict.reason and "x" * 61 not in verdict.reason
    assert "DNS:bell\\x07.example, " in verdict.reason
    assert len(verdict.reason) < 300


def test_an_unreadable_certificate_is_refused() -> None:
    verdict = AllowedSans(ALLOWED).check(b"\x30\x03\x02\x01\x00")
    assert not verdict.allowed and verdict.problem is not None


# --- real handshakes: openssl s_client against ktlsd's engine -----------------------------------


def server_config(pki: dict[str, Cert], allowed: tuple[str, ...],
                  client_auth: str = "require") -> TlsConfig:
    return TlsConfig(
        role=Role.SERVER,
        credentials=X509Credentials.from_pem_files(str(pki["server"].pem),
                                                   str(pki["server"].key)),
        truststore=str(pki["ca"].pem),
        client_auth=client_auth,  # type: ignore[arg-type]
        client_allowed_sans=allowed,
    )


def s_client(port: int, pki: dict[str, Cert], cert: str | None) -> Peer:
    args = ["-CAfile", str(pki["ca"].pem), "-verify_return_error"]
    if cert is not None:
        args += ["-cert", str(pki[cert].pem), "-key", str(pki[cert].key)]
    return openssl_client(port, *args)


def serve(config: TlsConfig, pki: dict[str, Cert], cert: str | None) -> tuple[
        HandshakeError | None, str | None, Peer]:
    """One server handshake against s_client presenting ``cert``: (failure or None, the
    peer's SAN-check identity or None, the s_client process, still running)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listener:
        peer = s_client(listener.getsockname()[1], pki, cert)
        sock, _ = listener.accept()
    with sock:
        try:
            session = handshake_blocking(sock, config, timeout=TIMEOUT)
        except HandshakeError as exc:
            return exc, None, peer
        return None, session.peer.describe(), peer


@pytest.mark.parametrize("cert", ["dns", "ipv4", "ipv6"])
def test_a_listed_client_gets_in(pki: dict[str, Cert], cert: str) -> None:
    failure, identity, peer = serve(server_config(pki, ALLOWED), pki, cert)
    with peer:
        assert failure is None, failure
        assert identity is not None and identity.startswith("x509:CN=client")
        peer.wait_for("Verify return code: 0 (ok)")


@pytest.mark.parametrize("cert", ["other", "no-san", "wildcard"])
def test_an_unlisted_client_gets_a_bad_certificate_alert(pki: dict[str, Cert], cert: str) -> None:
    failure, _, peer = serve(server_config(pki, ALLOWED), pki, cert)
    with peer:
        assert failure is not None
        assert failure.cause is FailureCause.UNTRUSTED_CERTIFICATE
        assert failure.errno == errno.EACCES
        assert "x509.client_allowed_sans" in failure.reason
        peer.wait_for("alert bad certificate")


def test_without_a_list_any_trusted_client_gets_in(pki: dict[str, Cert]) -> None:
    failure, identity, peer = serve(server_config(pki, ()), pki, "other")
    with peer:
        assert failure is None, failure
        assert identity == "x509:CN=client1.example.com"


def test_a_listed_name_does_not_let_an_untrusted_certificate_in(
    pki: dict[str, Cert], tmp_path: Path
) -> None:
    """The SAN check comes after the chain verified: a self-made certificate carrying a
    listed name is refused as untrusted."""
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(tmp_path / "self.key"), "-out", str(tmp_path / "self.pem"),
             "-days", "2", "-subj", "/CN=self", "-addext",
             "subjectAltName=DNS:client1.example.com")
    certs = {**pki, "self": Cert(tmp_path / "self.pem", tmp_path / "self.key")}
    failure, _, peer = serve(server_config(pki, ALLOWED), certs, "self")
    with peer:
        assert failure is not None and failure.cause is FailureCause.UNTRUSTED_CERTIFICATE
        assert "x509.client_allowed_sans" not in failure.reason


def test_a_client_without_a_certificate_is_refused(pki: dict[str, Cert]) -> None:
    failure, _, peer = serve(server_config(pki, ALLOWED), pki, None)
    with peer:
        assert failure is not None and failure.errno == errno.EACCES
        assert "client sent no certificate" in failure.reason


def test_a_list_needs_a_server_that_asks_for_certificates(pki: dict[str, Cert]) -> None:
    with pytest.raises(ValueError, match="client_allowed_sans"):
        server_config(pki, ALLOWED, client_auth="none")
    with pytest.raises(ValueError, match="client_allowed_sans"):
        TlsConfig(role=Role.CLIENT, client_allowed_sans=ALLOWED)


# --- the agent: kernel requests get the list, service consumers' own requests do not -----------


def _files(pki: dict[str, Cert], allowed: tuple[str, ...],
           client_auth: bool = True) -> X509Files:
    return X509Files(certificate=str(pki["server"].pem), private_key=str(pki["server"].key),
                     truststore=str(pki["ca"].pem), require_client_cert=client_auth,
                     client_allowed_sans=allowed)


def serve_with_agent(pki: dict[str, Cert], settings: AgentSettings, cert: str | None, *,
                     credentials: ConsumerCredentials | None,
                     delivery: KeyDelivery) -> tuple[int, str, dict[str, str], Peer]:
    """One SERVERHELLO x509 request served by the real agent against s_client: (DONE status,
    DONE reason, the fields of the one handshake log line, the s_client process)."""
    import socket

    async def main() -> tuple[int, str, dict[str, str], Peer]:
        logs = LogLines()
        agent = Agent(settings, [])
        loop = asyncio.get_running_loop()
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.setblocking(False)
            peer = s_client(listener.getsockname()[1], pki, cert)
            sock, _ = await asyncio.wait_for(loop.sock_accept(listener), TIMEOUT)
        inline = None
        if credentials is not None:  # a consumer names its own material
            inline = InlineMaterial(certificate_file=str(pki["server"].pem),
                                    private_key_file=str(pki["server"].key),
                                    truststore=str(pki["ca"].pem), require_client_cert=True)
        with sock, logs.attached():
            pending = DirectRequest(
                HandshakeRequest(sockfd=os.dup(sock.fileno()),
                                 message_type=MessageType.SERVERHELLO,
                                 auth_mode=AuthMode.X509, timeout_ms=int(TIMEOUT * 1000),
                                 inline=inline),
                source_name="kernel" if credentials is None else "service",
                credentials=credentials, delivery=delivery)
            answer = await agent.serve(pending)
            lines = logs.handshake_lines()
        assert pending.answers == [answer]
        assert len(lines) == 1, lines
        fields = parse_handshake_line("ktlsd: INFO " + lines[0])
        return answer.status, answer.reason or "", fields, peer

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_a_kernel_request_refuses_an_unlisted_client_with_eacces(pki: dict[str, Cert]) -> None:
    """DONE EACCES (tlshd's status), before any kTLS install; the one log line names the SANs."""
    settings = AgentSettings(server_x509=_files(pki, ALLOWED), keep_sessions=False)
    status, reason, fields, peer = serve_with_agent(
        pki, settings, "other", credentials=None, delivery=KeyDelivery.INSTALL_KTLS)
    with peer:
        assert status == errno.EACCES
        assert reason == ("client certificate SANs DNS:other.example.com, IP:10.9.9.9 not in "
                          "x509.client_allowed_sans")
        assert fields["status"] == str(errno.EACCES) and fields["source"] == "kernel"
        assert "DNS:other.example.com" in fields["reason"]
        peer.wait_for("alert bad certificate")


@pytest.mark.parametrize("cert", ["dns", "ipv4"])
def test_a_kernel_request_lets_a_listed_client_in(pki: dict[str, Cert], cert: str) -> None:
    # RETURN_SECRETS: this host's kernel has no kTLS to install into; the policy is the same.
    settings = AgentSettings(server_x509=_files(pki, ALLOWED), keep_sessions=False)
    status, reason, fields, peer = serve_with_agent(
        pki, settings, cert, credentials=None, delivery=KeyDelivery.RETURN_SECRETS)
    with peer:
        assert status == 0, reason
        assert fields["identity"].startswith("x509:CN=client")


def test_a_kernel_request_with_a_list_requires_a_certificate_even_without_client_auth(
    pki: dict[str, Cert]
) -> None:
    settings = AgentSettings(server_x509=_files(pki, ALLOWED, client_auth=False),
                             keep_sessions=False)
    status, reason, _, peer = serve_with_agent(
        pki, settings, None, credentials=None,
        delivery=KeyDelivery.RETURN_SECRETS)
    with peer:
        assert status == errno.EACCES
        assert "client sent no certificate" in reason


@pytest.mark.parametrize(("client_auth", "status"), [(True, errno.EACCES), (False, 0)],
                         ids=["client_auth-true", "client_auth-false"])
def test_client_auth_requires_a_certificate_as_tlshd_does(
    pki: dict[str, Cert], client_auth: bool, status: int
) -> None:
    """tlshd: x509.client_auth = true requires a client certificate (GNUTLS_CERT_REQUIRE, a
    client without one ends in EACCES); otherwise one is asked for but optional."""
    settings = AgentSettings(server_x509=_files(pki, (), client_auth=client_auth),
                             keep_sessions=False)
    answer, reason, fields, peer = serve_with_agent(
        pki, settings, None, credentials=None, delivery=KeyDelivery.RETURN_SECRETS)
    with peer:
        assert answer == status, reason
        assert fields["identity"] == ("-" if status else "anonymous")


def test_a_consumers_own_request_is_not_subject_to_the_hosts_list(
    pki: dict[str, Cert]
) -> None:
    """A service consumer's server brings its own policy: the host's list does not apply."""
    settings = AgentSettings(server_x509=_files(pki, ALLOWED), keep_sessions=False)
    me = ConsumerCredentials(os.getpid(), os.getuid(), os.getgid())
    status, reason, fields, peer = serve_with_agent(
        pki, settings, "other", credentials=me, delivery=KeyDelivery.RETURN_SECRETS)
    with peer:
        assert status == 0, reason
        assert fields["identity"] == "x509:CN=client1.example.com"


def test_material_sets_the_list_for_trusted_requests_only(pki: dict[str, Cert]) -> None:
    from ktlsd.material import Consumer

    request = HandshakeRequest(sockfd=-1, message_type=MessageType.SERVERHELLO,
                               auth_mode=AuthMode.X509)
    files = _files(pki, ALLOWED, client_auth=False)
    kernel = build_tls_config_blocking(request, x509_files=files)
    assert kernel.client_allowed_sans == ALLOWED and kernel.client_auth == "require"
    unauth = build_tls_config_blocking(
        HandshakeRequest(sockfd=-1, message_type=MessageType.SERVERHELLO,
                         auth_mode=AuthMode.UNAUTH), x509_files=files)
    assert unauth.client_allowed_sans == ALLOWED and unauth.client_auth == "require"
    consumer = build_tls_config_blocking(request, x509_files=files,
                                         consumer=Consumer(uid=0, gid=0))
    assert consumer.client_allowed_sans == () and consumer.client_auth == "request"
    psk = build_tls_config_blocking(
        HandshakeRequest(sockfd=-1, message_type=MessageType.SERVERHELLO,
                         auth_mode=AuthMode.PSK), x509_files=files)
    assert psk.client_allowed_sans == ()


# --- the configuration ---------------------------------------------------------------------------


def _config(text: str) -> AgentConfig:
    return config_from_keyfile(parse_key_file(text, "test.conf"))


def test_the_list_is_read_as_a_glib_string_list(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    config = _config("[authenticate.server]\nx509.client_auth = true\n"
                     "x509.client_allowed_sans = client1.example.com; 192.0.2.7;"
                     "semi\\;colon.example;2001:db8::7;\n")
    assert config.server.client_allowed_sans == (
        "client1.example.com", "192.0.2.7", "semi;colon.example", "2001:db8::7")
    files = config.agent_settings().server_x509
    assert files.client_allowed_sans == config.server.client_allowed_sans
    assert files.require_client_cert
    assert config.agent_settings().client_x509.client_allowed_sans == ()
    messages = [r.getMessage() for r in caplog.records]
    assert not any("ignored" in m for m in messages), messages
    assert [m for m in messages if "never match" in m] == [
        "test.conf:3: [authenticate.server] x509.client_allowed_sans: 'semi;colon.example' "
        "can never match a client certificate: neither a DNS name nor an IP address"]


def test_the_list_reaches_worker_processes() -> None:
    settings = _config("[authenticate.server]\nx509.client_auth = 1\n"
                       "x509.client_allowed_sans = a.example;192.0.2.1\n").agent_settings()
    decoded = decode_settings(encode_settings(settings))
    assert decoded.server_x509.client_allowed_sans == ("a.example", "192.0.2.1")


@pytest.mark.parametrize(("text", "warning"), [
    ("x509.client_allowed_sans = a.example\n",
     "test.conf:2: [authenticate.server] x509.client_allowed_sans is set but x509.client_auth "
     "is not true: ktlsd requires a client certificate carrying one of these SANs anyway "
     "(tlshd would ignore the list); set x509.client_auth = true to say so"),
    ("x509.client_auth = false\nx509.client_allowed_sans = a.example\n",
     "test.conf:3: [authenticate.server] x509.client_allowed_sans is set but x509.client_auth "
     "is not true: ktlsd requires a client certificate carrying one of these SANs anyway "
     "(tlshd would ignore the list); set x509.client_auth = true to say so"),
    ("x509.client_auth = true\nx509.client_allowed_sans = ;\n",
     "test.conf:3: [authenticate.server] x509.client_allowed_sans names no SAN: every client "
     "certificate the truststore verifies is accepted"),
    ("x509.client_auth = true\nx509.client_allowed_sans = DNS:a.example\n",
     "test.conf:3: [authenticate.server] x509.client_allowed_sans: 'DNS:a.example' can never "
     "match a client certificate: write the name or address alone, without a DNS:/IP: prefix"),
    ("x509.client_auth = true\nx509.client_allowed_sans = 192.0.2.0/24\n",
     "test.conf:3: [authenticate.server] x509.client_allowed_sans: '192.0.2.0/24' can never "
     "match a client certificate: address ranges are not supported: list each address"),
])
def test_what_may_surprise_is_warned_about(caplog: pytest.LogCaptureFixture, text: str,
                                           warning: str) -> None:
    caplog.set_level(logging.INFO)
    _config("[authenticate.server]\n" + text)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [warning]


def test_a_list_with_client_auth_is_not_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    config = _config("[authenticate.server]\nx509.client_auth = true\n"
                     "x509.client_allowed_sans = client1.example.com;2001:db8::7\n")
    assert config.server.client_allowed_sans == ("client1.example.com", "2001:db8::7")
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
