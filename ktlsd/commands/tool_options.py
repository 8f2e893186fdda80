"""The options of ``ktlsd connect`` and ``ktlsd listen``, and the :class:`TlsConfig` they describe.

:func:`add_tls_options` adds the options both commands share (PSK, x509, session), and
:func:`add_listen_options` those only ``listen`` has; :func:`parse_address` and
:func:`build_config` turn the parsed namespace into an address and the engine's
:class:`~ktlsd.tls.handshake.TlsConfig`. Bad values raise :class:`UsageError`, whose message is
the one line shown (exit status 2); a PSK given with ``--psk-file`` is read here, and neither
it nor any other key is ever part of a message. Nothing here opens a socket or runs a
handshake (that is :mod:`ktlsd.commands.tools`).
"""

from __future__ import annotations

import argparse

from ktlsd.credentials import X509Credentials
from ktlsd.material import psk_hash_for
from ktlsd.pkcs11_uri import is_pkcs11_uri, redact
from ktlsd.settings import DEFAULT_RECORD_SIZE_LIMIT, MAX_RECORD_SIZE_LIMIT, MIN_RECORD_SIZE_LIMIT
from ktlsd.tls import policy
from ktlsd.tls.handshake import ClientAuth, HashName, PskKey, TlsConfig
from ktlsd.tls.session import CipherSuite, Role

__all__ = [
    "DEFAULT_IDLE_TIMEOUT",
    "UsageError",
    "add_listen_options",
    "add_tls_options",
    "build_config",
    "parse_address",
]

#: Default ``listen --idle-timeout``: seconds with nothing received or sent on a connection.
DEFAULT_IDLE_TIMEOUT = 300.0


class UsageError(Exception):
    """A bad option value; reported in one line with exit status 2."""


# --- options -------------------------------------------------------------------------------


def add_tls_options(p: argparse.ArgumentParser, *, server: bool) -> None:
    g = p.add_argument_group("PSK")
    g.add_argument("--psk-identity", metavar="ID", help="PSK identity to offer / accept")
    g.add_argument(
        "--psk", metavar="KEY",
        help="PSK as hex, or an NVMe 'NVMeTLSkey-1:hh:...:' interchange string (then the "
        "identity and TLS PSK are derived from --hostnqn/--subsysnqn unless --psk-identity "
        "is given)",
    )
    g.add_argument(
        "--psk-file", metavar="PATH",
        help="read the PSK (hex or an NVMe interchange string) from PATH instead of the command "
        "line, where `ps` and shell history would show it",
    )
    g.add_argument("--psk-hash", choices=("sha256", "sha384"), help="hash the PSK is bound to")
    g.add_argument("--hostnqn", help="host NQN, for an NVMe interchange PSK")
    g.add_argument("--subsysnqn", help="subsystem NQN, for an NVMe interchange PSK")
    g.add_argument(
        "--identity-version", type=int, choices=(0, 1), default=1,
        help="NVMe PSK identity version for a derived identity (default 1)",
    )
    g.add_argument(
        "--compat", action="store_true",
        help="derive NVMe keys like libnvme < 1.16 (nvme-cli < 2.16)",
    )
    g = p.add_argument_group("x509")
    g.add_argument("--cert", help="our certificate chain (PEM, leaf first)")
    g.add_argument(
        "--pq-cert", metavar="PEM",
        help="a second chain of another key type, normally ML-DSA (tlshd's "
        "x509.pq.certificate): the peer's signature_algorithms choose which one is sent",
    )
    g.add_argument("--pq-key", metavar="PEM", help="the private key of --pq-cert (PEM)")
    g.add_argument(
        "--key",
        help="our private key: a PEM file, or a pkcs11: URI (RFC 7512) of a key held by a "
        "PKCS#11 token, PIN from its pin-source=FILE (or pin-value=)",
    )
    g.add_argument(
        "--pkcs11-module", metavar="PATH",
        help="the PKCS#11 module for a pkcs11: --key (default: the library's, p11-kit's proxy)",
    )
    g.add_argument("--ca", help="trusted CA file or directory (default: the system's)")
    g.add_argument("--crl", help="CRL file (PEM or DER) to check the peer against")
    g.add_argument(
        "--peername",
        help="name (DNS or IP) the peer's certificate must carry"
        + ("" if server else " (default: HOST)"),
    )
    g.add_argument("--no-verify", action="store_true", help="accept any peer certificate")
    if server:
        g.add_argument(
            "--require-client-cert", action="store_true", help="refuse clients without one"
        )
        g.add_argument(
            "--request-client-cert", action="store_true",
            help="ask for a client certificate but accept clients without one",
        )
    g = p.add_argument_group("session")
    g.add_argument(
        "--ciphers", metavar="LIST",
        help="colon-separated TLS 1.3 suites (default: those of the system crypto policy, "
        "the OpenSSL configuration, that kTLS carries; this list can only narrow them)",
    )
    g.add_argument("--groups", metavar="LIST", help="key-exchange groups, e.g. X25519:P-256")
    g.add_argument(
        "--record-size-limit", metavar="BYTES", type=_record_size_limit,
        default=DEFAULT_RECORD_SIZE_LIMIT,
        help="the RFC 8449 record_size_limit to advertise: the largest record we take, "
        f"content type included, {MIN_RECORD_SIZE_LIMIT}..{MAX_RECORD_SIZE_LIMIT} "
        "(default %(default)s)",
    )
    g.add_argument(
        "--record-layer", choices=("auto", "kernel", "user"), default="auto",
        help="kTLS (kernel), ktlsd's user-space record layer, or kTLS when available (auto)",
    )
    g.add_argument(
        "--key-update-every", metavar="BYTES", type=_size,
        help="send a KeyUpdate (update_requested) after every BYTES sent",
    )
    g.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS",
        help="handshake timeout (default 10)",
    )
    g.add_argument("-q", "--quiet", action="store_true", help="no status lines on stderr")


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    try:
        value = int(t[:-1] if t[-1:] in units else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return value


def _record_size_limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not MIN_RECORD_SIZE_LIMIT <= value <= MAX_RECORD_SIZE_LIMIT:
        raise argparse.ArgumentTypeError(
            f"must be {MIN_RECORD_SIZE_LIMIT}..{MAX_RECORD_SIZE_LIMIT} (RFC 8449, TLS 1.3)"
        )
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError("must be a finite number >= 0")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def add_listen_options(p: argparse.ArgumentParser) -> None:
    """The options only ``listen`` has: how many connections, ``--www``, the idle timeout."""
    p.add_argument(
        "--count", type=_count, default=1, help="connections to serve (default 1)"
    )
    p.add_argument("--forever", action="store_true", help="keep serving connections")
    p.add_argument(
        "--www", action="store_true",
        help="answer each connection's HTTP request with a small page and close (like "
        "openssl s_server -www); stdin is not read",
    )
    p.add_argument(
        "--idle-timeout", type=_seconds, default=DEFAULT_IDLE_TIMEOUT, metavar="SECONDS",
        help="end a connection on which nothing was received or sent for SECONDS "
        f"(default {DEFAULT_IDLE_TIMEOUT:g}; 0: never)",
    )


def parse_address(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        if default_host is None:
            raise UsageError(f"address {text!r} needs HOST:PORT")
        host, port = default_host, text
    host = host.strip("[]") or (default_host or "")
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"bad port in {text!r}") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"port {number} out of range")
    return host, number


# --- configuration -------------------------------------------------------------------------


def _psk_text(args: argparse.Namespace) -> str | None:
    if args.psk and args.psk_file:
        raise UsageError("--psk and --psk-file exclude each other")
    if args.psk_file:
        try:
            with open(args.psk_file, encoding="ascii") as f:
                return f.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not ASCII text"
            raise UsageError(f"--psk-file {args.psk_file}: {reason}") from None
    psk: str | None = args.psk
    return psk


def _psk_key(args: argparse.Namespace) -> PskKey | None:
    psk_text = _psk_text(args)
    if not psk_text:
        if args.psk_identity:
            raise UsageError("--psk-identity needs --psk or --psk-file")
        return None
    text = psk_text.strip()
    if text.startswith("NVMeTLSkey-1:"):
        from ktlsd.nvme import keys as nvme_keys

        try:
            parsed = nvme_keys.parse_interchange(text)
        except nvme_keys.KeyFormatError as exc:
            raise UsageError(f"--psk: {exc}") from None
        if args.psk_identity:
            identity, key = args.psk_identity, parsed.key
        else:
            if not (args.hostnqn and args.subsysnqn):
                raise UsageError(
                    "an NVMe interchange --psk needs --hostnqn and --subsysnqn "
                    "(or an explicit --psk-identity)"
                )
            variant = nvme_keys.Variant.COMPAT if args.compat else nvme_keys.Variant.SPEC
            derived = nvme_keys.derive_nvme_tls_key(
                parsed.key, parsed.hash_id, args.hostnqn, args.subsysnqn,
                version=args.identity_version, variant=variant,
            )
            identity, key = str(derived.identity), derived.tls_psk
    else:
        if not args.psk_identity:
            raise UsageError("--psk needs --psk-identity")
        try:
            key = bytes.fromhex(text)
        except ValueError:
            raise UsageError("--psk is neither hex nor an NVMeTLSkey-1 string") from None
        identity = args.psk_identity
        if not key:
            raise UsageError("--psk is empty")
    bound_to = args.psk_hash or psk_hash_for(identity, len(key))  # "sha256" or "sha384"
    hash_name: HashName = "sha384" if bound_to == "sha384" else "sha256"
    return PskKey(identity=identity.encode(), key=key, hash_name=hash_name)


def _second_credentials(args: argparse.Namespace) -> X509Credentials | None:
    """``--pq-cert``/``--pq-key``, parsed by the system OpenSSL (it knows ML-DSA where the
    Python ``cryptography`` package may not). Ignored with a warning on stderr where the
    library has no ML-DSA and cannot parse the key (OpenSSL 3.0)."""
    if not (args.pq_cert or args.pq_key):
        return None
    if not (args.pq_cert and args.pq_key):
        raise UsageError("--pq-cert and --pq-key go together")
    from ktlsd.errors import HandshakeError
    from ktlsd.files import read_file
    from ktlsd.tls.handshake import (
        credentials_parsed_by_openssl,
        library_has_ml_dsa,
        library_version,
    )

    try:
        cert_data = read_file(args.pq_cert, "certificate file")
        key_data = read_file(args.pq_key, "private key file")
    except HandshakeError as exc:
        raise UsageError(f"--pq-cert: {exc.reason}") from None
    try:
        return credentials_parsed_by_openssl(
            cert_data, key_data, cert_name=args.pq_cert, key_name=args.pq_key
        )[0]
    except HandshakeError as exc:
        if not library_has_ml_dsa():
            import sys

            print(f"ktlsd: warning: --pq-cert ignored: the system library ({library_version()}) "
                  f"has no ML-DSA and cannot use it ({exc.reason})", file=sys.stderr)
            return None
        raise UsageError(f"--pq-cert: {exc.reason}") from None


def _credentials(cert: str, key: str, module: str | None) -> X509Credentials:
    """``--cert``/``--key``: PEM files, or a certificate file and a token key (HandshakeError
    with a one-line reason when either is unusable)."""
    if not is_pkcs11_uri(key):
        return X509Credentials.from_pem_files(cert, key)
    from ktlsd import hardware_key
    from ktlsd.files import AGENT, read_file

    cert_data = read_file(cert, "certificate file", AGENT)
    token_key = hardware_key.token_key(key, module)
    return X509Credentials.from_pem_and_token_key(
        cert_data, token_key, cert_name=cert, key_name=redact(key)
    )


def build_config(args: argparse.Namespace, role: Role, host: str | None) -> TlsConfig:
    """The engine's configuration. The suites and groups are the system crypto policy's,
    narrowed by ``--ciphers``/``--groups`` (:class:`~ktlsd.tls.policy.CryptoPolicyError`
    when nothing is left)."""
    requested = None
    if args.ciphers:
        try:
            requested = tuple(CipherSuite.from_name(n) for n in args.ciphers.split(":") if n)
        except ValueError as exc:
            raise UsageError(f"--ciphers: {exc}") from None
    suites = policy.effective_suites(requested)
    groups = policy.effective_groups(args.groups)
    credentials = None
    if args.cert or args.key:
        if not (args.cert and args.key):
            raise UsageError("--cert and --key go together")
        credentials = _credentials(args.cert, args.key, getattr(args, "pkcs11_module", None))
    second = _second_credentials(args)
    if credentials is None:
        credentials, second = second, None
    psk = _psk_key(args)
    common: dict[str, object] = {
        "role": role,
        "credentials": credentials,
        "second_credentials": second,
        "truststore": args.ca,
        "crl": args.crl,
        "verify_peer": not args.no_verify,
        "ciphersuites": suites,
        "groups": groups,
        "record_size_limit": args.record_size_limit,
    }
    if role is Role.CLIENT:
        peername = args.peername or (host if not psk else None)
        return TlsConfig(psk_keys=(psk,) if psk else (), peername=peername, **common)  # type: ignore[arg-type]
    if psk is None and credentials is None:
        raise UsageError("listen needs --psk/--psk-identity or --cert/--key")
    client_auth: ClientAuth = (
        "require" if args.require_client_cert
        else "request" if args.request_client_cert else "none"
    )

    def lookup(identity: bytes) -> PskKey | None:
        import hmac

        if psk is not None and hmac.compare_digest(identity, psk.identity):
            return psk
        return None

    return TlsConfig(
        psk_lookup=lookup if psk else None, client_auth=client_auth,
        peername=args.peername, **common,  # type: ignore[arg-type]
    )

