"""Private keys held by a PKCS#11 token (``pkcs11:`` URIs), with real components.

A SoftHSM2 token in a temporary directory (``SOFTHSM2_CONF``, one per test session: SoftHSM
reads it once per process) holds EC P-256 keys generated inside it by ``pkcs11-tool``
(sensitive, never extractable: the token's own listing says so). Their certificates come from
CSRs that ``openssl req`` signs through libp11's ``pkcs11`` engine, issued by a test CA. Then:
``ktlsd listen``/``connect`` and the agent (the real ``ktlsd run`` process, through the
handshake service) do x509 handshakes as server and as client against ``openssl s_client`` and
``s_server``; a wrong PIN, a missing object and a missing module are one-line errors with
ENOKEY (agent) or exit status 1 (tools) while the agent keeps serving; a ``pkcs11:`` URI from
a service consumer is refused (EINVAL); PINs appear in no output.

On this host (Debian 12, OpenSSL 3.0) the route is the engine (libengine-pkcs11-openssl); the
Debian 13 guest's pkcs11-provider route is proven by the ``nfs-pkcs11`` test bed scenario.
Everything skips, with the reason, when SoftHSM2, OpenSC's pkcs11-tool or the engine is absent
(``scripts/install.sh --test`` installs them).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from ktlsd.client import submit, submit_request
from ktlsd.pkcs11_uri import parse_pkcs11_uri, redact
from ktlsd.request import AuthMode, HandshakeRequest, InlineMaterial, MessageType
from ktlsd.settings import X509Files
from tests.agent_helpers import AgentProcess, parse_handshake_line
from tests.peers import free_port, openssl_client, openssl_server
from tests.pki import Authority
from tests.waiting import run

PIN = "314159"
WRONG_PIN = "271828"
MODULES = ("/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so")


def _missing_components() -> str | None:
    for tool in ("softhsm2-util", "pkcs11-tool", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/install.sh --test)"
    if not any(Path(m).exists() for m in MODULES):
        return "SoftHSM2's PKCS#11 module is not installed"
    engine = subprocess.run(["openssl", "engine", "-t", "pkcs11"], capture_output=True, text=True)
    if engine.returncode != 0 or "available" not in engine.stdout:
        return "OpenSSL's pkcs11 engine (libengine-pkcs11-openssl) is not installed"
    return None


pytestmark = pytest.mark.skipif(
    (reason := _missing_components()) is not None, reason=reason or ""
)


@dataclass
class Token:
    """The session's SoftHSM2 token, its module, the test CA and the token keys' certificates."""

    module: str
    label: str
    directory: Path
    ca: Authority
    pin_file: Path
    wrong_pin_file: Path
    certs: dict[str, Path]

    def uri(self, label: str, *, pin_file: Path | None = None, pin: str | None = None) -> str:
        uri = f"pkcs11:token={self.label};object={label};type=private"
        if pin_file is not None:
            return f"{uri}?pin-source=file:{pin_file}"
        return f"{uri}?pin-value={pin}" if pin is not None else uri

    def tool(self, *args: str) -> str:
        argv = ["pkcs11-tool", "--module", self.module, "--token-label", self.label,
                "--login", "--pin", PIN, *args]
        return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def _csr_through_the_engine(
    token: Token, label: str, cn: str, out: Path
) -> x509.CertificateSigningRequest:
    subprocess.run(
        ["openssl", "req", "-new", "-engine", "pkcs11", "-keyform", "engine",
         "-key", token.uri(label, pin=PIN), "-subj", f"/CN={cn}", "-out", str(out)],
        check=True, capture_output=True, text=True,
    )
    return x509.load_pem_x509_csr(out.read_bytes())


def _certify(token: Token, label: str, *, server: bool) -> Path:
    """A certificate for token key ``label``: the token signs the CSR (through the engine),
    the test CA the certificate."""
    csr = _csr_through_the_engine(token, label, label, token.directory / f"{label}.csr")
    assert csr.is_signature_valid  # made by the key inside the token
    ca = token.ca
    import datetime
    import ipaddress

    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(ca.cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.ExtendedKeyUsage(
            [x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server
             else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    path = token.directory / f"{label}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture(scope="session")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Token]:
    directory = tmp_path_factory.mktemp("softhsm")
    (directory / "tokens").mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {directory / 'tokens'}\n"
                    "objectstore.backend = file\nlog.level = ERROR\n")
    saved = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)  # this process and every child
    try:
        label = "ktlsd-test"
        subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                        "--pin", PIN, "--so-pin", "8642"], check=True, capture_output=True)
        module = next(m for m in MODULES if Path(m).exists())
        pin_file = directory / "user.pin"
        pin_file.write_text(PIN + "\n")
        pin_file.chmod(0o600)
        wrong_pin_file = directory / "wrong.pin"
        wrong_pin_file.write_text(WRONG_PIN + "\n")
        wrong_pin_file.chmod(0o600)
        tok = Token(module, label, directory, Authority.create(directory / "ca"), pin_file,
                    wrong_pin_file, {})
        # Distinct ids: libp11 pairs a private key with its public key by CKA_ID.
        for key_id, key_label in (("01", "tls-server"), ("02", "tls-client")):
            tok.tool("--keypairgen", "--key-type", "EC:prime256v1", "--label", key_label,
                     "--id", key_id, "--usage-sign")
        tok.certs["tls-server"] = _certify(tok, "tls-server", server=True)
        tok.certs["tls-client"] = _certify(tok, "tls-client", server=False)
        yield tok
    finally:
        if saved is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = saved


def _access_flags(listing: str) -> set[str]:
    access = next(line for line in listing.splitlines() if "Access:" in line)
    return {flag.strip() for flag in access.split(":", 1)[1].split(",")}


def test_the_keys_were_generated_in_the_token_and_cannot_leave_it(token: Token) -> None:
    for label in ("tls-server", "tls-client"):
        flags = _access_flags(token.tool("--list-objects", "--type", "privkey", "--label", label))
        # CKA_SENSITIVE true; CKA_EXTRACTABLE false ("extractable" would be listed), and
        # never was; CKA_LOCAL: generated on the token.
        assert {"sensitive", "always sensitive", "never extractable", "local"} <= flags
        assert "extractable" not in flags


# --- the URI rules (pure) ---------------------------------------------------------------------


def test_uri_parsing_keeps_the_pin_out_of_openssl_and_of_every_text() -> None:
    uri = parse_pkcs11_uri("pkcs11:token=t;object=k;type=private?pin-value=12%3434")
    assert uri.pin_value == "12434"
    assert uri.for_openssl() == "pkcs11:token=t;object=k;type=private"
    for text in (str(uri), repr(uri)):
        assert "12434" not in text and "12%3434" not in text
    redacted = redact("pkcs11:object=k?pin-value=9999&x-a=b")
    assert redacted == "pkcs11:object=k?pin-value=<redacted>&x-a=b"
    files = X509Files(private_key="pkcs11:object=k?pin-value=9999")
    assert "9999" not in repr(files)
    with_source = parse_pkcs11_uri("pkcs11:object=k?pin-source=file:///etc/pin")
    assert with_source.pin_file() == "/etc/pin"


def test_freeing_a_configuration_never_waits_for_a_token_login(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reload frees the old configuration wherever its last request ends (the event loop
    too): that must not wait for another configuration's token login in a worker thread."""
    import gc
    import threading
    import types

    from ktlsd import hardware_key

    in_login, release = threading.Event(), threading.Event()
    logins: list[str] = []

    def login(uri: object, module: object, timeout: float) -> object:
        logins.append(str(uri))
        if len(logins) > 1:  # the new configuration's login hangs (a slow token)
            in_login.set()
            release.wait(30)
        return types.SimpleNamespace(backend="test")  # stands for an ossl.TokenKey

    monkeypatch.setattr(hardware_key, "_load", login)
    text = "pkcs11:object=k;type=private"
    held = [X509Files(private_key=text)]  # the old configuration, referenced only here
    new = X509Files(private_key=text)
    first = hardware_key.token_key(text, None, held[0])
    assert hardware_key.token_key(text, None, held[0]) is first  # cached: one login
    loader = threading.Thread(target=hardware_key.token_key, args=(text, None, new))
    loader.start()
    try:
        assert in_login.wait(10)
        # Freed on another thread, which must come back while the login still hangs.
        freeing = threading.Thread(target=lambda: (held.clear(), gc.collect()))
        freeing.start()
        freeing.join(10)
        assert not freeing.is_alive(), "freeing the old configuration waited for a login"
        # Its cache entry went with it; the new configuration's (being loaded) stays.
        assert all(ref() is not None for ref, _ in hardware_key._cache.values())
        assert len(logins) == 2 and not release.is_set()
    finally:
        release.set()
        loader.join(10)


@pytest.mark.parametrize("text", [
    "pkcs11:object=k;type=private?pin-value =2468",  # the parser takes spaces around "="
    "pkcs11:object=k?pin-value=24?68",  # the query splits on "&" only: "?" is in the PIN
    "pkcs11:object=k;pin-value=2468;token=t",  # in the path, as some tools write it
    "pkcs11:object=k?x-a=b&PIN-VALUE=2468&x-c=d",
])
def test_every_pin_the_parser_accepts_is_redacted(text: str) -> None:
    pin = parse_pkcs11_uri(text).pin_value
    assert pin and pin.replace("?", "") == "2468"
    for shown in (redact(text), repr(X509Files(private_key=text)), str(parse_pkcs11_uri(text))):
        assert "2468" not in shown.replace("?", "") and "24?68" not in shown


@pytest.mark.parametrize(("text", "words"), [
    ("pkcs11:object=k?module-path=/tmp/evil.so", "module-path is not accepted"),
    ("pkcs11:object=k?module-name=evil", "module-name is not accepted"),
    ("pkcs11:token=t", "name the key with object= or id="),
    ("pkcs11:object=k;type=cert", "does not name a private key"),
    ("pkcs11:object=k?pin-source=relative/pin", "absolute"),
    ("pkcs11:object=k?pin-value=1&pin-source=/p", "not both"),
    ("pkcs11:object=k;bogus=1", "unknown attribute"),
    ("pkcs11:object=k?pin-value4321", "is not name=value"),
])
def test_bad_uris_are_refused_with_a_reason(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words) as caught:
        parse_pkcs11_uri(text)
    assert "\n" not in str(caught.value) and "4321" not in str(caught.value)


def test_config_refuses_a_module_path_in_the_uri_and_reads_pkcs11_module(tmp_path: Path) -> None:
    from ktlsd.config import ConfigError, config_from_keyfile, parse_key_file

    bad = ("[authenticate.client]\nx509.certificate=/c.pem\n"
           "x509.private_key=pkcs11:object=k?module-path=/tmp/evil.so\n")
    with pytest.raises(ConfigError, match="module-path is not accepted"):
        config_from_keyfile(parse_key_file(bad, "t.conf"))
    good = ("[authenticate.server]\nx509.certificate=/c.pem\n"
            "x509.private_key=pkcs11:token=t;object=k?pin-source=/etc/pin\n"
            "[ktlsd]\npkcs11_module=/usr/lib/softhsm/libsofthsm2.so\n")
    loaded = config_from_keyfile(parse_key_file(good.replace(
        "pin-source=/etc/pin", "pin-value=97531"), "t.conf"))
    assert "97531" not in repr(loaded) and "97531" not in repr(loaded.agent_settings())
    settings = config_from_keyfile(parse_key_file(good, "t.conf")).agent_settings()
    assert settings.server_x509.private_key == "pkcs11:token=t;object=k?pin-source=/etc/pin"
    assert settings.server_x509.pkcs11_module == "/usr/lib/softhsm/libsofthsm2.so"
    with pytest.raises(ConfigError, match="not an absolute path"):
        config_from_keyfile(parse_key_file("[ktlsd]\npkcs11_module=lib.so\n", "t.conf"))


# --- ktlsd listen / connect -------------------------------------------------------------------


def _ktlsd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ktlsd", *args]


def test_listen_serves_with_a_token_key_to_openssl_s_client(token: Token) -> None:
    port = free_port()
    listen = subprocess.Popen(
        _ktlsd("listen", f"127.0.0.1:{port}", "--cert", str(token.certs["tls-server"]),
               "--key", token.uri("tls-server", pin_file=token.pin_file),
               "--pkcs11-module", token.module, "--www"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert listen.stderr is not None
        line = listen.stderr.readline()
        assert "listening on" in line, line
        client = openssl_client(port, "-CAfile", str(token.ca.cert_path), "-verify_return_error",
                                "-servername", "localhost")
        with client:
            client.send(b"GET / HTTP/1.0\r\n\r\n")
            assert client.wait_exit(20) == 0
            out = client.output()
        assert "Verify return code: 0 (ok)" in out
        assert "Peer signature type: ECDSA" in out
        assert listen.wait(20) == 0
    finally:
        if listen.poll() is None:
            listen.kill()
            listen.wait()


def test_connect_authenticates_with_a_token_key_to_openssl_s_server(token: Token) -> None:
    server = token.ca.issue_server()
    with openssl_server("-cert", str(server.cert_path), "-key", str(server.key_path),
                        "-Verify", "1", "-verify_return_error", "-CAfile",
                        str(token.ca.cert_path)) as peer:
        done = subprocess.run(
            _ktlsd("connect", f"127.0.0.1:{peer.port}", "--ca", str(token.ca.cert_path),
                   "--peername", "localhost", "--cert", str(token.certs["tls-client"]),
                   "--key", token.uri("tls-client", pin_file=token.pin_file),
                   "--pkcs11-module", token.module),
            input="hello from a token key\n", capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert "handshake ok" in done.stderr
        out = peer.wait_for("hello from a token key")
        assert "CN = tls-client" in out or "CN=tls-client" in out


@pytest.mark.parametrize(("key", "words"), [
    ("wrong-pin", "the token refused the PIN"),
    ("no-object", "no such private key"),
    ("no-module", "cannot load PKCS#11 module"),
])
def test_connect_with_an_unusable_token_key_is_one_line_and_exit_1(
    token: Token, key: str, words: str
) -> None:
    uri = {
        "wrong-pin": token.uri("tls-client", pin=WRONG_PIN),
        "no-object": token.uri("no-such-key", pin_file=token.pin_file),
        "no-module": token.uri("tls-client", pin_file=token.pin_file),
    }[key]
    module = "/nonexistent/pkcs11.so" if key == "no-module" else token.module
    done = subprocess.run(
        _ktlsd("connect", "127.0.0.1:9", "--cert", str(token.certs["tls-client"]),
               "--key", uri, "--pkcs11-module", module),
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], done.stderr
    assert lines[0].startswith("ktlsd: missing material: ")
    assert WRONG_PIN not in done.stderr + done.stdout and PIN not in done.stderr + done.stdout


# --- the agent ------------------------------------------------------------------------------------


def _agent_config(token: Token, *, client_pin: Path | None = None,
                  server_object: str = "tls-server", module: str | None = None) -> str:
    return (
        "[authenticate.client]\n"
        f"x509.truststore={token.ca.cert_path}\n"
        f"x509.certificate={token.certs['tls-client']}\n"
        f"x509.private_key={token.uri('tls-client', pin_file=client_pin or token.pin_file)}\n"
        "[authenticate.server]\n"
        f"x509.truststore={token.ca.cert_path}\n"
        f"x509.certificate={token.certs['tls-server']}\n"
        f"x509.private_key={token.uri(server_object, pin_file=token.pin_file)}\n"
        "[ktlsd]\n"
        f"pkcs11_module={module or token.module}\n"
    )


needs_root = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="the agent's configured material serves privileged consumers only (run as root)",
)


async def _client_to_s_server(token: Token, sock_path: str) -> tuple[int, str, str]:
    server = token.ca.issue_server()
    with openssl_server("-cert", str(server.cert_path), "-key", str(server.key_path),
                        "-Verify", "1", "-verify_return_error", "-CAfile",
                        str(token.ca.cert_path)) as peer:
        sock = socket.create_connection(("127.0.0.1", peer.port))
        with sock:
            done = await submit(sock, role="client", auth="x509", peername="localhost",
                                service_path=sock_path, timeout=10)
            if done.status == 0:  # s_server prints the client's subject after the handshake
                await asyncio.to_thread(peer.wait_for, "tls-client")
        return done.status, done.reason, peer.output()


async def _server_for_s_client(sock_path: str, token: Token) -> tuple[int, str, str]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        client = openssl_client(port, "-CAfile", str(token.ca.cert_path),
                                "-verify_return_error", "-servername", "localhost")
        with client:
            loop = asyncio.get_running_loop()
            listener.setblocking(False)
            sock, _ = await loop.sock_accept(listener)
            with sock:
                done = await submit(sock, role="server", auth="x509",
                                    service_path=sock_path, timeout=10)
                if done.status == 0:  # s_client prints its summary after the handshake
                    await asyncio.to_thread(client.wait_for, "Verify return code")
            return done.status, done.reason, client.output()


@needs_root
@pytest.mark.parametrize("workers", [1, 2])
def test_agent_serves_client_and_server_handshakes_with_token_keys(
    token: Token, tmp_path: Path, workers: int
) -> None:
    config = _agent_config(token) + f"workers={workers}\n"
    with AgentProcess(tmp_path, config) as agent:
        async def main() -> None:
            for _ in range(2):  # twice: the key is loaded (and the token logged in to) once
                status, reason, out = await _client_to_s_server(token, agent.socket_path)
                assert (status, reason) == (0, "")
                assert "CN = tls-client" in out or "CN=tls-client" in out
                status, reason, out = await _server_for_s_client(agent.socket_path, token)
                assert (status, reason) == (0, ""), reason
                assert "Verify return code: 0 (ok)" in out
                assert "Peer signature type: ECDSA" in out

        run(main())
        lines = agent.wait_for(r"handshake source=service .*status=0", count=4)
        roles = sorted(parse_handshake_line(line)["role"] for line in lines)
        assert roles == ["client", "client", "server", "server"]
        loaded = agent.matching(r"pkcs11 key .* loaded through the pkcs11 engine")
        # One per role's configuration in each process that ran handshakes, not per handshake.
        assert 2 <= len(loaded) <= 2 * workers, agent.text
        assert PIN not in agent.text


@needs_root
def test_wrong_pin_and_missing_object_are_enokey_and_the_agent_keeps_serving(
    token: Token, tmp_path: Path
) -> None:
    config = _agent_config(token, client_pin=token.wrong_pin_file, server_object="gone")
    with AgentProcess(tmp_path, config) as agent:
        async def main() -> None:
            for _ in range(2):  # the refused PIN is remembered: the same answer, no new login
                status, reason, _out = await _client_to_s_server(token, agent.socket_path)
                assert status == errno.ENOKEY
                assert "\n" not in reason and "the token refused the PIN" in reason
            status, reason, _out = await _server_for_s_client(agent.socket_path, token)
            assert status == errno.ENOKEY
            assert "no such private key" in reason and "object=gone" in reason

        run(main())
        failed = agent.wait_for(rf"handshake source=service .*status={errno.ENOKEY}", count=3)
        assert all("reason=" in line for line in failed)
        assert PIN not in agent.text and WRONG_PIN not in agent.text
        # Fix the PIN file, reload: the key is loaded afresh and the client handshake works.
        token.wrong_pin_file.write_text(PIN + "\n")
        try:
            agent.signal(signal.SIGHUP)
            agent.wait_for(r"configuration reloaded")

            async def after_reload() -> None:
                status, reason, _out = await _client_to_s_server(token, agent.socket_path)
                assert (status, reason) == (0, "")

            run(after_reload())
        finally:
            token.wrong_pin_file.write_text(WRONG_PIN + "\n")


def test_a_consumer_cannot_name_a_pkcs11_key(token: Token, tmp_path: Path) -> None:
    """Not even a privileged consumer: the agent would load a module or use the admin's keys."""
    with AgentProcess(tmp_path, "") as agent:
        async def main() -> None:
            uri = token.uri("tls-client", pin=PIN)
            for inline in (
                InlineMaterial(certificate_file=str(token.certs["tls-client"]),
                               private_key_file=uri),
                InlineMaterial(certificate_file=str(token.certs["tls-client"]),
                               private_key_file=uri.replace("?", "?module-path=/tmp/x.so&")),
            ):
                server = socket.create_server(("127.0.0.1", 0))
                with server:
                    sock = socket.create_connection(server.getsockname())
                    with sock:
                        request = HandshakeRequest(
                            sockfd=-1, message_type=MessageType.CLIENTHELLO,
                            auth_mode=AuthMode.X509, timeout_ms=5000, inline=inline)
                        done = await submit_request(sock, request, service_path=agent.socket_path)
                assert done.status == errno.EINVAL
                assert "accepted only in the agent's configuration" in done.reason
            # The consumer library passes the URI through unchanged, and gets the same answer.
            server = socket.create_server(("127.0.0.1", 0))
            with server, socket.create_connection(server.getsockname()) as sock:
                done = await submit(sock, role="client", auth="x509", peername="localhost",
                                    certificate=token.certs["tls-client"], private_key=uri,
                                    service_path=agent.socket_path, timeout=5)
            assert done.status == errno.EINVAL, done.reason

        run(main())
        assert PIN not in agent.text
        assert not agent.matching("loaded through the pkcs11")


def test_check_and_doctor_report_a_token_key_that_cannot_be_loaded(
    token: Token, tmp_path: Path
) -> None:
    conf = tmp_path / "ktlsd.conf"
    conf.write_text(_agent_config(token, client_pin=token.wrong_pin_file))
    check = subprocess.run(_ktlsd("run", "--check", "-c", str(conf)),
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 1
    problem = [ln for ln in check.stderr.splitlines() if "x509.private_key" in ln]
    assert len(problem) == 1 and "[authenticate.client]" in problem[0]
    assert "the token refused the PIN" in problem[0]
    doctor = subprocess.run(_ktlsd("doctor", "--config", str(conf)),
                            capture_output=True, text=True, timeout=120)
    assert any(line.startswith("MISSING") and "pkcs11 key" in line
               and "refused the PIN" in line for line in doctor.stdout.splitlines()), doctor.stdout
    conf.write_text(_agent_config(token))
    good = subprocess.run(_ktlsd("run", "--check", "-c", str(conf)),
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    for out in (check, doctor, good):
        assert PIN not in out.stdout + out.stderr and WRONG_PIN not in out.stdout + out.stderr


def test_a_pin_file_others_can_read_is_refused(token: Token, tmp_path: Path) -> None:
    loose = tmp_path / "loose.pin"
    loose.write_text(PIN + "\n")
    loose.chmod(0o644)
    done = subprocess.run(
        _ktlsd("connect", "127.0.0.1:9", "--cert", str(token.certs["tls-client"]),
               "--key", token.uri("tls-client", pin_file=loose), "--pkcs11-module", token.module),
        capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    assert "readable or writable by others" in done.stderr and PIN not in done.stderr


@needs_root
def test_a_reload_that_changes_the_module_keeps_the_loaded_one(
    token: Token, tmp_path: Path
) -> None:
    """One PKCS#11 module per process: a reload naming another keeps the module the agent
    started with, says so, and token keys keep working."""
    with AgentProcess(tmp_path, _agent_config(token)) as agent:
        async def client_handshake() -> None:
            status, reason, _out = await _client_to_s_server(token, agent.socket_path)
            assert (status, reason) == (0, "")

        run(client_handshake())
        agent.config_path.write_text(_agent_config(token, module="/nonexistent/other-p11.so"))
        agent.signal(signal.SIGHUP)
        agent.wait_for(r"SIGHUP: \[ktlsd\] pkcs11_module takes effect at the next start")
        agent.wait_for(r"configuration reloaded")
        run(client_handshake())
        assert "/nonexistent/other-p11.so" not in "".join(
            agent.matching(r"handshake source=service"))
