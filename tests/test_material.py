"""Resolving a request's material: keyring serials, inline material, configured files, and the
privilege boundary for unprivileged user-space consumers. Real keyrings, real files."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from ktlsd import keyring
from ktlsd.errors import HandshakeError
from ktlsd.material import Consumer, psk_from_keyring, psk_hash_for
from ktlsd.material import build_tls_config_blocking as build_tls_config
from ktlsd.request import AuthMode, HandshakeRequest, InlineMaterial, InlinePsk, MessageType
from ktlsd.settings import X509Files
from ktlsd.tls.session import Role
from tests.pki import Authority

UNPRIVILEGED = Consumer(uid=4242)


pytestmark = pytest.mark.usefixtures("private_session_keyring")


def _request(mt: MessageType, auth: AuthMode, **kw: object) -> HandshakeRequest:
    return HandshakeRequest(sockfd=0, message_type=mt, auth_mode=auth, **kw)  # type: ignore[arg-type]


def _psk_key(identity: str, size: int = 32) -> int:
    return keyring.add_key("user", identity, os.urandom(size), keyring.KEY_SPEC_SESSION_KEYRING)


def _code(exc: pytest.ExceptionInfo[HandshakeError]) -> int:
    return exc.value.errno


def test_psk_hash_follows_nvme_identity_then_length() -> None:
    assert psk_hash_for("NVMe1R02 host subsys digest", 32) == "sha384"
    assert psk_hash_for("NVMe0R01 host subsys", 48) == "sha256"
    assert psk_hash_for("plain", 48) == "sha384"
    assert psk_hash_for("plain", 32) == "sha256"


def test_client_psk_serials_in_order() -> None:
    a, b = _psk_key("first"), _psk_key("second", 48)
    config = build_tls_config(
        _request(MessageType.CLIENTHELLO, AuthMode.PSK, peer_identities=(a, b)),
        x509_files=X509Files(),
    )
    assert config.role is Role.CLIENT
    assert [(k.identity, k.hash_name, k.serial) for k in config.psk_keys] == [
        (b"first", "sha256", a), (b"second", "sha384", b),
    ]


@pytest.mark.parametrize("damage", ["missing", "revoked", "wrong-type"])
def test_bad_psk_serials_are_missing_material(damage: str) -> None:
    serial = _psk_key("doomed")
    if damage == "missing":
        keyring.invalidate_key(serial)
    elif damage == "revoked":
        keyring.revoke_key(serial)
    else:
        serial = keyring.add_key("keyring", "not-a-psk", None, keyring.KEY_SPEC_SESSION_KEYRING)
    with pytest.raises(HandshakeError) as info:
        build_tls_config(
            _request(MessageType.CLIENTHELLO, AuthMode.PSK, peer_identities=(serial,)),
            x509_files=X509Files(),
        )
    assert _code(info) == errno.ENOKEY
    assert f"{serial:#x}" in str(info.value) and "\n" not in str(info.value)


def test_server_lookup_searches_our_keyrings_for_the_offered_identity() -> None:
    serial = _psk_key("NVMe0R01 hostnqn subsysnqn")
    config = build_tls_config(
        _request(MessageType.SERVERHELLO, AuthMode.PSK, peer_identities=(0,)),
        x509_files=X509Files(),
    )
    assert config.psk_lookup is not None
    found = config.psk_lookup(b"NVMe0R01 hostnqn subsysnqn")
    assert found is not None and found.serial == serial
    assert config.psk_lookup(b"NVMe0R01 someone else") is None


def test_unprivileged_consumer_cannot_use_agent_keyrings_or_keys() -> None:
    serial = _psk_key("NVMe0R01 hostnqn subsysnqn")  # owned by root, the agent's
    server = build_tls_config(
        _request(MessageType.SERVERHELLO, AuthMode.PSK), x509_files=X509Files(),
        consumer=UNPRIVILEGED,
    )
    assert server.psk_lookup is not None
    assert server.psk_lookup(b"NVMe0R01 hostnqn subsysnqn") is None
    with pytest.raises(HandshakeError) as info:
        build_tls_config(
            _request(MessageType.CLIENTHELLO, AuthMode.PSK, peer_identities=(serial,)),
            x509_files=X509Files(), consumer=UNPRIVILEGED,
        )
    assert _code(info) == errno.ENOKEY and "does not belong to uid 4242" in str(info.value)
    # Inline keys are the consumer's own: fine.
    inline = InlineMaterial(psk_keys=(InlinePsk(b"mine", os.urandom(32)),))
    config = build_tls_config(
        _request(MessageType.CLIENTHELLO, AuthMode.PSK, inline=inline),
        x509_files=X509Files(), consumer=UNPRIVILEGED,
    )
    assert config.psk_keys[0].identity == b"mine"


def test_unprivileged_consumer_never_gets_the_host_certificate(tmp_path: Path) -> None:
    ca = Authority.create(tmp_path, "ecdsa")
    server = ca.issue_server(dns=("localhost",))
    files = X509Files(certificate=str(server.cert_path), private_key=str(server.key_path))
    req = _request(MessageType.SERVERHELLO, AuthMode.X509)
    assert build_tls_config(req, x509_files=files).credentials is not None
    with pytest.raises(HandshakeError) as info:
        build_tls_config(req, x509_files=files, consumer=UNPRIVILEGED)
    assert _code(info) == errno.ENOKEY
    # A private key file it does not own is refused even when named inline.
    os.chmod(server.key_path, 0o600)
    inline = InlineMaterial(certificate_file=str(server.cert_path),
                            private_key_file=str(server.key_path))
    with pytest.raises(HandshakeError) as info:
        build_tls_config(_request(MessageType.SERVERHELLO, AuthMode.X509, inline=inline),
                         x509_files=X509Files(), consumer=UNPRIVILEGED)
    assert "not readable by uid 4242" in str(info.value)


def test_x509_problems_are_missing_material(tmp_path: Path) -> None:
    req = _request(MessageType.SERVERHELLO, AuthMode.X509)
    with pytest.raises(HandshakeError) as info:
        build_tls_config(req, x509_files=X509Files())
    assert _code(info) == errno.ENOKEY
    with pytest.raises(HandshakeError) as info:
        build_tls_config(req, x509_files=X509Files(certificate=str(tmp_path / "absent.pem"),
                                                   private_key=str(tmp_path / "absent.key")))
    assert _code(info) == errno.ENOKEY and "absent.pem" in str(info.value)
    with pytest.raises(HandshakeError) as info:
        build_tls_config(_request(MessageType.SERVERHELLO, AuthMode.X509, certificate=5),
                         x509_files=X509Files())
    assert "together" in str(info.value)


def test_unsupported_message_type_and_auth_mode() -> None:
    with pytest.raises(HandshakeError) as info:
        build_tls_config(_request(MessageType.UNSPEC, AuthMode.PSK), x509_files=X509Files())
    assert _code(info) == errno.EOPNOTSUPP
    with pytest.raises(HandshakeError) as info:
        build_tls_config(_request(MessageType.CLIENTHELLO, AuthMode.UNSPEC),
                         x509_files=X509Files())
    assert _code(info) == errno.EINVAL


def test_keyring_psk_is_read_from_the_payload() -> None:
    key = os.urandom(48)
    serial = keyring.add_key("user", "NVMe1R02 h s d", key, keyring.KEY_SPEC_SESSION_KEYRING)
    psk = psk_from_keyring(serial)
    assert psk.key == key and psk.hash_name == "sha384" and "key=" not in repr(psk).lower()


def test_unauth_client_is_anonymous_but_verifies_the_server(tmp_path: Path) -> None:
    """NFS xprtsec=tls: no client certificate even when one is configured (nfsd would treat the
    transport as peer-authenticated and refuse a tls-only export), server still verified."""
    ca = Authority.create(tmp_path, "ecdsa")
    client = ca.issue_client("host1")
    files = X509Files(truststore=str(ca.cert_path), certificate=str(client.cert_path),
                      private_key=str(client.key_path))
    unauth = build_tls_config(
        _request(MessageType.CLIENTHELLO, AuthMode.UNAUTH, peername="nfs.example"),
        x509_files=files,
    )
    assert unauth.credentials is None
    assert unauth.verify_peer and unauth.truststore == str(ca.cert_path)
    assert unauth.peername == "nfs.example"
    mutual = build_tls_config(
        _request(MessageType.CLIENTHELLO, AuthMode.X509, peername="nfs.example"),
        x509_files=files,
    )
    assert mutual.credentials is not None


def test_server_asks_for_client_certificates_only_for_x509(tmp_path: Path) -> None:
    ca = Authority.create(tmp_path, "ecdsa")
    server = ca.issue_server(dns=("localhost",))
    files = X509Files(certificate=str(server.cert_path), private_key=str(server.key_path),
                      truststore=str(ca.cert_path))
    modes = {
        mode: build_tls_config(_request(MessageType.SERVERHELLO, mode), x509_files=files)
        for mode in (AuthMode.UNAUTH, AuthMode.X509)
    }
    assert modes[AuthMode.UNAUTH].client_auth == "none"
    assert modes[AuthMode.X509].client_auth == "request"
    required = build_tls_config(
        _request(MessageType.SERVERHELLO, AuthMode.X509),
        x509_files=X509Files(certificate=str(server.cert_path),
                             private_key=str(server.key_path), require_client_cert=True),
    )
    assert required.client_auth == "require"


def test_unprivileged_consumer_path_must_be_reachable() -> None:
    """A world-readable file inside a root-only directory is still out of the consumer's reach."""
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="ktlsd-reach-", dir="/tmp"))
    try:
        top.chmod(0o755)
        private = top / "private"
        private.mkdir(mode=0o700)
        secret = private / "cert.pem"
        secret.write_text("not really a cert")
        secret.chmod(0o644)
        with pytest.raises(HandshakeError) as info:
            UNPRIVILEGED.check_file(str(secret), "certificate file")
        assert f"directory {private} is closed to it" in str(info.value)
        private.chmod(0o755)
        UNPRIVILEGED.check_file(str(secret), "certificate file")  # it could read it itself now
        secret.chmod(0o600)
        with pytest.raises(HandshakeError):
            UNPRIVILEGED.check_file(str(secret), "certificate file")
    finally:
        shutil.rmtree(top)


def _server_files_request(cert: Path, key: Path) -> HandshakeRequest:
    inline = InlineMaterial(certificate_file=str(cert), private_key_file=str(key))
    return _request(MessageType.SERVERHELLO, AuthMode.X509, inline=inline)


def test_parsed_chains_are_reused_until_the_files_change(tmp_path: Path) -> None:
    """The same files give the same parsed credentials (no second parse); a rewritten
    certificate or key file is parsed anew; a reload forgets them all."""
    from ktlsd.agent import forget_parsed_material
    from ktlsd.material import material_cache_stats

    ca = Authority.create(tmp_path, "ecdsa")
    first, second = ca.issue_server(cn="first"), ca.issue_server(cn="second")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(first.cert_path.read_bytes())
    key.write_bytes(first.key_path.read_bytes())
    request = _server_files_request(cert, key)
    built = build_tls_config(request, x509_files=X509Files())
    hits = material_cache_stats()[0]
    again = build_tls_config(request, x509_files=X509Files())
    assert again.credentials is built.credentials
    assert material_cache_stats()[0] == hits + 1
    # Another certificate and key, same names (written in place: same inode, and possibly
    # within one timestamp tick of the first write).
    cert.write_bytes(second.cert_path.read_bytes())
    key.write_bytes(second.key_path.read_bytes())
    changed = build_tls_config(request, x509_files=X509Files())
    assert changed.credentials is not None and built.credentials is not None
    assert changed.credentials is not built.credentials
    assert changed.credentials.describe().startswith("CN=second,")
    # Only the key changed: a key that does not match the cached certificate is refused.
    key.write_bytes(first.key_path.read_bytes())
    with pytest.raises(HandshakeError, match="does not match"):
        build_tls_config(request, x509_files=X509Files())
    key.write_bytes(second.key_path.read_bytes())
    kept = build_tls_config(request, x509_files=X509Files()).credentials
    forget_parsed_material()
    assert material_cache_stats()[2] == 0
    assert build_tls_config(request, x509_files=X509Files()).credentials is not kept


def test_a_cached_chain_is_still_refused_to_a_consumer_that_cannot_read_it() -> None:
    """Files parsed for one consumer are opened again, with its own rights, for the next:
    uid 4243 cannot read uid 4242's 0600 key, cached or not."""
    import shutil
    import tempfile

    from ktlsd.material import material_cache_stats

    top = Path(tempfile.mkdtemp(prefix="ktlsd-cache-", dir="/tmp"))
    try:
        top.chmod(0o755)
        ca = Authority.create(top / "ca", "ecdsa")
        server = ca.issue_server()
        cert, key = top / "cert.pem", top / "key.pem"
        cert.write_bytes(server.cert_path.read_bytes())
        key.write_bytes(server.key_path.read_bytes())
        for path in (cert, key):
            os.chown(path, 4242, 4242)
            path.chmod(0o600)
        request = _server_files_request(cert, key)
        owner, other = Consumer(uid=4242, gid=4242), Consumer(uid=4243, gid=4243)
        assert build_tls_config(request, x509_files=X509Files(), consumer=owner).credentials
        assert build_tls_config(request, x509_files=X509Files(), consumer=owner).credentials
        hits = material_cache_stats()[0]
        with pytest.raises(HandshakeError) as info:
            build_tls_config(request, x509_files=X509Files(), consumer=other)
        assert _code(info) == errno.ENOKEY and "not readable by uid 4243" in str(info.value)
        assert material_cache_stats()[0] == hits
    finally:
        shutil.rmtree(top)


def test_parsed_chain_cache_is_bounded(tmp_path: Path) -> None:
    """More distinct chains than the cache holds: it never grows past its size, and the
    oldest are parsed anew."""
    from ktlsd.material import PARSED_CREDENTIALS_CACHE_SIZE, material_cache_stats

    ca = Authority.create(tmp_path, "ecdsa")
    issued = [ca.issue_server(cn=f"s{i}") for i in range(PARSED_CREDENTIALS_CACHE_SIZE + 3)]
    builds = []
    for item in issued:
        inline = InlineMaterial(certificate_chain=(item.cert.public_bytes(Encoding.DER),),
                                private_key=item.key.private_bytes(
                                    Encoding.DER, PrivateFormat.PKCS8, NoEncryption()))
        request = _request(MessageType.SERVERHELLO, AuthMode.X509, inline=inline)
        builds.append(request)
        build_tls_config(request, x509_files=X509Files())
        assert material_cache_stats()[2] <= PARSED_CREDENTIALS_CACHE_SIZE
    assert material_cache_stats()[2] == PARSED_CREDENTIALS_CACHE_SIZE
    misses = material_cache_stats()[1]
    build_tls_config(builds[0], x509_files=X509Files())  # evicted: parsed again
    assert material_cache_stats()[1] == misses + 1
    hits = material_cache_stats()[0]
    build_tls_config(builds[-1], x509_files=X509Files())  # the newest: still there
    assert material_cache_stats()[0] == hits + 1
