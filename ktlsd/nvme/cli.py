"""``ktlsd nvme ...``: nvme-cli's key commands, so admins can switch without relearning.

Option names, short options, defaults and standard output follow nvme-cli 2.16
(``gen-tls-key``, ``check-tls-key``, ``gen-dhchap-key``, ``check-dhchap-key``); the keyring
steps follow libnvme's ``nvme_insert_tls_key_versioned``: find the keyring by name, link it
into the session keyring, revoke an existing key with the same description, add the new
one. ``list-keys`` and ``revoke-key`` are small extras (nvme-cli spells them
``tls-key --export`` / ``tls-key --revoke``).

Deliberate differences from nvme-cli: errors are one clear line on stderr and never repeat
secret input (nvme-cli echoes an invalid ``--secret``), and all failures exit with 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from collections.abc import Callable

from ktlsd import keyring
from ktlsd.nvme import dhchap_crypto
from ktlsd.nvme import keys as nvme_keys

HOSTNQN_FILE = "/etc/nvme/hostnqn"


class CommandError(Exception):
    """A one-line error for stderr."""


def _int(text: str) -> int:
    """Integers as nvme-cli's argconfig takes them (decimal, 0x hex, 0 octal)."""
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number '{text}'") from None


def host_nqn_from_file() -> str | None:
    """libnvme's ``nvmf_hostnqn_from_file``: $LIBNVME_HOSTNQN, else /etc/nvme/hostnqn."""
    env = os.environ.get("LIBNVME_HOSTNQN")
    if env is not None:
        return env or None
    try:
        with open(HOSTNQN_FILE, encoding="utf-8") as f:
            text = f.read(256)
    except OSError:
        return None
    nqn = text.split("\n", 1)[0]
    return nqn or None


def _parse_hex_secret(secret: str, key_len: int, *, allow_excess: bool) -> bytes:
    """Hex ``--secret`` parsing as nvme-cli does it, without echoing the secret on error."""
    out = bytearray()
    for i in range(0, len(secret), 2):
        pair = secret[i : i + 2]
        if not all(c in "0123456789abcdefABCDEF" for c in pair):
            raise CommandError("Invalid secret (expected hexadecimal characters)")
        if allow_excess and i >= key_len * 2:
            print("Skipping excess secret bytes", file=sys.stderr)
            break
        out.append(int(pair, 16))
    if len(out) != key_len:
        raise CommandError(f"Invalid key length ({len(out)} bytes)")
    return bytes(out)


def _insert(
    keyring_name: str,
    key_type: str,
    derived: nvme_keys.DerivedTlsKey,
) -> int:
    try:
        ring = keyring.find_keyring(keyring_name)
    except keyring.KeyutilsMissing as exc:
        raise CommandError(f"Failed to insert key: {exc}") from exc
    except keyring.KeyringError as exc:
        raise CommandError(f"Failed to insert key: keyring '{keyring_name}' not found") from exc
    try:
        keyring.link_key(ring, keyring.KEY_SPEC_SESSION_KEYRING)
        identity = str(derived.identity)
        try:
            old = keyring.search_keyring(ring, key_type, identity)
        except keyring.KeyringError:
            old = 0
        if old > 0:
            keyring.revoke_key(old)
        return keyring.add_key(key_type, identity, derived.tls_psk, ring)
    except keyring.KeyringError as exc:
        raise CommandError(f"Failed to insert key: {exc}") from exc


def _append_keyfile(path: str, derived: nvme_keys.DerivedTlsKey) -> None:
    """Append ``<identity> <TLS PSK in interchange format>`` as nvme-cli's --keyfile does."""
    exported = nvme_keys.format_interchange(derived.tls_psk, derived.identity.hash_id)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, f"{derived.identity} {exported}\n".encode())
    finally:
        os.close(fd)


def _variant(args: argparse.Namespace) -> nvme_keys.Variant:
    return nvme_keys.Variant.COMPAT if args.compat else nvme_keys.Variant.SPEC


def cmd_gen_tls_key(args: argparse.Namespace) -> int:
    if args.hmac < 1 or args.hmac > 2:
        raise CommandError(f"Invalid HMAC identifier {args.hmac}")
    if args.identity > 1:
        raise CommandError(f"Invalid TLS identity version {args.identity}")
    hostnqn = args.hostnqn
    if args.insert:
        if not args.subsysnqn:
            raise CommandError("No subsystem NQN specified")
        hostnqn = hostnqn or host_nqn_from_file()
        if not hostnqn:
            raise CommandError("Failed to read host NQN")
    key_len = 48 if args.hmac == 2 else 32
    if args.secret is None:
        raw = os.urandom(key_len)
    else:
        raw = _parse_hex_secret(args.secret, key_len, allow_excess=True)
    print(nvme_keys.format_interchange(raw))
    if args.insert:
        derived = nvme_keys.derive_nvme_tls_key(
            raw, args.hmac, hostnqn, args.subsysnqn, args.identity, _variant(args)
        )
        serial = _insert(args.keyring, args.keytype, derived)
        print(f"Inserted TLS key {serial & 0xFFFFFFFF:08x}")
        if args.keyfile:
            _append_keyfile(args.keyfile, derived)
    return 0


def cmd_check_tls_key(args: argparse.Namespace) -> int:
    if not args.keydata:
        raise CommandError("No key data")
    if args.identity > 1:
        raise CommandError(f"Invalid TLS identity version {args.identity}")
    try:
        key = nvme_keys.parse_interchange(args.keydata)
    except nvme_keys.KeyFormatError as exc:
        raise CommandError(f"Key decoding failed: {exc}") from None
    if not args.subsysnqn:
        raise CommandError("Need to specify a subsystem NQN")
    hostnqn = args.hostnqn or host_nqn_from_file()
    if not hostnqn:
        raise CommandError("Failed to read host NQN")
    derived = nvme_keys.derive_nvme_tls_key(
        key.key, key.hash_id, hostnqn, args.subsysnqn, args.identity, _variant(args)
    )
    if args.insert:
        serial = _insert(args.keyring, args.keytype, derived)
        print(f"Inserted TLS key {serial & 0xFFFFFFFF:08x}")
        if args.keyfile:
            _append_keyfile(args.keyfile, derived)
    else:
        print(derived.identity)
    return 0


def cmd_gen_dhchap_key(args: argparse.Namespace) -> int:
    hmac_id, key_len = args.hmac, args.key_length
    if hmac_id > 3 or hmac_id < 0:
        raise CommandError(f"Invalid HMAC identifier {hmac_id}")
    if hmac_id > 0:
        want = dhchap_crypto.HashFunction(hmac_id).length
        if not key_len:
            key_len = want
        elif key_len != want:
            raise CommandError(f"Invalid key length {key_len} for SHA({want * 8})")
    elif not key_len:
        key_len = 32
    if key_len not in (32, 48, 64):
        raise CommandError(f"Invalid key length {key_len}")
    if args.secret is None:
        raw = os.urandom(key_len)
    else:
        raw = _parse_hex_secret(args.secret, key_len, allow_excess=False)
    nqn = args.nqn or host_nqn_from_file()
    if not nqn:
        raise CommandError("Could not read host NQN")
    # nvme-cli prints the secret already transformed with the NQN (libnvme's
    # nvme_gen_dhchap_key); we reproduce that so outputs match byte for byte.
    key = dhchap_crypto.DhchapSecret(hmac_id, raw).transform(nqn)
    print(dhchap_crypto.DhchapSecret(hmac_id, key).format())
    return 0


def cmd_check_dhchap_key(args: argparse.Namespace) -> int:
    if not args.key:
        raise CommandError("Key not specified")
    try:
        secret = dhchap_crypto.DhchapSecret.parse(args.key)
    except nvme_keys.KeyFormatError as exc:
        raise CommandError(f"Invalid key: {exc}") from None
    crc = zlib.crc32(secret.key) & 0xFFFFFFFF
    print(f"Key is valid (HMAC {secret.hash_id}, length {len(secret.key)}, CRC {crc:08x})")
    return 0


def _find_ring(name: str) -> int:
    try:
        return keyring.find_keyring(name)
    except keyring.KeyutilsMissing as exc:
        raise CommandError(str(exc)) from exc
    except keyring.KeyringError as exc:
        raise CommandError(f"Invalid keyring '{name}'") from exc


def cmd_list_keys(args: argparse.Namespace) -> int:
    ring = _find_ring(args.keyring)
    try:
        serials = keyring.list_keyring(ring)
    except keyring.KeyringError as exc:
        raise CommandError(str(exc)) from exc
    for serial in serials:
        try:
            info = keyring.describe_key(serial)
        except keyring.KeyringError:
            continue
        if info.type == args.keytype and info.description.startswith("NVMe"):
            print(f"{serial & 0xFFFFFFFF:08x} {info.description}")
    return 0


def cmd_revoke_key(args: argparse.Namespace) -> int:
    ring = _find_ring(args.keyring)
    try:
        serial = keyring.search_keyring(ring, args.keytype, args.identity)
        keyring.revoke_key(serial)
    except keyring.KeyringError as exc:
        raise CommandError(f"Failed to revoke key: {exc}") from exc
    return 0


def _wrap(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the one-line errors of a command into stderr output and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(func(args))
        except CommandError as exc:
            print(exc, file=sys.stderr)
            return 1
        except nvme_keys.KeyFormatError as exc:
            print(exc, file=sys.stderr)
            return 1

    return run


def _keyring_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("-k", "--keyring", default=".nvme", help="keyring for the retained key")
    p.add_argument("-t", "--keytype", default="psk", help="key type of the retained key")


def _tls_opts(p: argparse.ArgumentParser) -> None:
    _keyring_opts(p)
    p.add_argument("-n", "--hostnqn", help="host NQN for the retained key")
    p.add_argument("-c", "--subsysnqn", help="subsystem NQN for the retained key")
    p.add_argument("-f", "--keyfile", help="append the derived TLS PSK to this key file")
    p.add_argument("-I", "--identity", type=_int, default=0, help="TLS identity version (0 or 1)")
    p.add_argument("-i", "--insert", action="store_true", help="insert the key into the keyring")
    p.add_argument(
        "-C",
        "--compat",
        action="store_true",
        help="use the pre-2.16 (non-RFC 8446) HKDF label for older implementations",
    )


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    nvme = subparsers.add_parser("nvme", help="NVMe/TCP TLS PSK and DH-HMAC-CHAP key tools")
    sub = nvme.add_subparsers(dest="nvme_command", metavar="SUBCOMMAND")

    def usage(_args: argparse.Namespace) -> int:
        nvme.print_help(sys.stderr)
        return 2

    nvme.set_defaults(func=usage)

    p = sub.add_parser("gen-tls-key", help="generate a TLS key in NVMe PSK interchange format")
    _tls_opts(p)
    p.add_argument("-s", "--secret", help="secret (hex) to use instead of a random key")
    p.add_argument(
        "-m", "--hmac", type=_int, default=1, help="retained key hash (1 = SHA-256, 2 = SHA-384)"
    )
    p.set_defaults(func=_wrap(cmd_gen_tls_key))

    p = sub.add_parser("check-tls-key", help="check a TLS key; print its identity or insert it")
    _tls_opts(p)
    p.add_argument("-d", "--keydata", help="TLS key in PSK interchange format")
    p.set_defaults(func=_wrap(cmd_check_tls_key))

    p = sub.add_parser("gen-dhchap-key", help="generate a DH-HMAC-CHAP secret (DHHC-1)")
    p.add_argument("-s", "--secret", help="secret (hex) to use instead of a random key")
    p.add_argument(
        "-l", "--key-length", type=_int, default=0, help="key length (32, 48 or 64 bytes)"
    )
    p.add_argument("-n", "--nqn", help="host NQN for the key transformation")
    p.add_argument(
        "-m",
        "--hmac",
        type=_int,
        default=0,
        help="transformation hash (0 = none, 1 = SHA-256, 2 = SHA-384, 3 = SHA-512)",
    )
    p.set_defaults(func=_wrap(cmd_gen_dhchap_key))

    p = sub.add_parser("check-dhchap-key", help="check a DH-HMAC-CHAP secret")
    p.add_argument("-k", "--key", help="DHHC-1 secret to check")
    p.set_defaults(func=_wrap(cmd_check_dhchap_key))

    p = sub.add_parser("list-keys", help="list NVMe TLS keys in a keyring")
    _keyring_opts(p)
    p.set_defaults(func=_wrap(cmd_list_keys))

    p = sub.add_parser("revoke-key", help="revoke the NVMe TLS key with this identity")
    _keyring_opts(p)
    p.add_argument("identity", help="PSK identity (the key description)")
    p.set_defaults(func=_wrap(cmd_revoke_key))
