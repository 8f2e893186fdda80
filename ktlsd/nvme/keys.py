"""NVMe/TCP TLS pre-shared keys: interchange format, retained PSK, identities, TLS PSK.

Everything here is pure computation on bytes and strings (no keyring, no I/O), so it can be
checked against the upstream test vectors: the kernel's KUnit "nvme-auth" suite (generated
PSK, digest, TLS PSK) and libnvme's ``test/psk.c`` (interchange strings and identities).

The derivations follow the NVMe/TCP transport specification (§3.6.1):

* configured PSK -> retained PSK:
  ``HKDF-Expand-Label(HKDF-Extract(0, configured), "HostNQN", hostnqn, len(configured))``
  (hash 00 means "use the configured key as is");
* retained or generated PSK -> TLS PSK:
  ``HKDF-Expand-Label(HKDF-Extract(0, psk), "nvme-tls-psk", context, L)`` where context is
  the whole identity for version 0 and ``"%02d %s" % (hash, digest)`` for version 1.

libnvme before 1.16 (nvme-cli before 2.16) serialised the HKDF label wrongly: the length
was little-endian and the label/context went in without their length-prefix bytes. Keys
inserted by those tools carry TLS PSKs derived that way, so :class:`Variant.COMPAT` computes
the same wrong values and deployments keep working. :class:`Variant.SPEC` is the default.

HKDF is assembled from ``cryptography``'s primitives: Extract is one HMAC, Expand is
``HKDFExpand`` with the info bytes built here (the compat info is simply a different byte
string, not a different primitive).
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os
import struct
import zlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

from ktlsd.tls import keyschedule

__all__ = [
    "HashId",
    "InterchangeKey",
    "KeyFormatError",
    "PskIdentity",
    "Variant",
    "derive_nvme_tls_key",
    "derive_retained_psk",
    "derive_tls_psk",
    "format_interchange",
    "generate_configured_psk",
    "generated_identity",
    "hkdf_expand_label",
    "hkdf_extract",
    "parse_identity",
    "parse_interchange",
    "psk_digest",
    "psk_lookup_prefixes",
    "retained_identity",
]

INTERCHANGE_PREFIX = "NVMeTLSkey-1"
DIGEST_SEED = b"NVMe-over-Fabrics"


class KeyFormatError(ValueError):
    """A key string or key parameter is malformed. The message never contains key bytes."""


class HashId(enum.IntEnum):
    """The ``hh`` field of the PSK interchange format and of identities (NVMe/TCP 3.6.1)."""

    NONE = 0
    SHA256 = 1
    SHA384 = 2

    @property
    def hash_name(self) -> str:
        if self is HashId.NONE:
            raise KeyFormatError("hash 00 has no hash function")
        return "sha256" if self is HashId.SHA256 else "sha384"

    @property
    def length(self) -> int:
        """The hash output length, which is also the key length the hash goes with."""
        return 32 if self is HashId.SHA256 else 48

    @classmethod
    def for_key_length(cls, length: int) -> HashId:
        """The hash a key of ``length`` bytes goes with (libnvme's ``default_hmac``)."""
        if length == 32:
            return cls.SHA256
        if length == 48:
            return cls.SHA384
        raise KeyFormatError(f"invalid key length {length} (need 32 or 48 bytes)")


class Variant(enum.Enum):
    """Which HKDF-Expand-Label serialisation to use."""

    SPEC = "spec"  # RFC 8446 HkdfLabel, as the NVMe/TCP spec requires
    COMPAT = "compat"  # libnvme < 1.16: little-endian length, no length prefixes


def _hash_algorithm(hash_id: HashId) -> hashes.HashAlgorithm:
    return hashes.SHA256() if hash_id is HashId.SHA256 else hashes.SHA384()


def hkdf_extract(hash_id: HashId, ikm: bytes, salt: bytes = b"") -> bytes:
    """RFC 5869 HKDF-Extract; an empty salt means HashLen zero bytes."""
    return hmac.new(salt or bytes(hash_id.length), ikm, hash_id.hash_name).digest()


def hkdf_expand_label(
    hash_id: HashId,
    prk: bytes,
    label: str,
    context: bytes,
    length: int,
    variant: Variant = Variant.SPEC,
) -> bytes:
    """TLS 1.3 HKDF-Expand-Label (RFC 8446 §7.1), or libnvme's pre-1.16 rendition of it.

    The spec variant is :func:`ktlsd.tls.keyschedule.hkdf_expand_label`. The compat variant
    reproduces the old libnvme bug: a little-endian length and no length prefixes before the
    label and the context.
    """
    if variant is Variant.SPEC:
        try:
            return keyschedule.hkdf_expand_label(
                hash_id.hash_name, prk, label.encode(), context, length
            )
        except ValueError as exc:
            raise KeyFormatError(str(exc)) from None
    info = struct.pack("<H", length) + b"tls13 " + label.encode() + context
    return HKDFExpand(_hash_algorithm(hash_id), length, info).derive(prk)


# ---------------------------------------------------------------------------------------
# Interchange format


@dataclass(frozen=True)
class InterchangeKey:
    """A decoded ``NVMeTLSkey-1:hh:...:`` string. ``repr`` hides the key."""

    hash_id: HashId
    key: bytes

    def __repr__(self) -> str:
        return f"InterchangeKey(hash_id={self.hash_id.name}, key=<{len(self.key)} bytes>)"


def _check_key_for_hash(hash_id: HashId, length: int) -> None:
    allowed = (32, 48) if hash_id is HashId.NONE else (hash_id.length,)
    if length not in allowed:
        want = " or ".join(str(n) for n in allowed)
        raise KeyFormatError(
            f"key length {length} does not match hash {hash_id.value:02d} (need {want} bytes)"
        )


def format_interchange(key: bytes, hash_id: HashId | int | None = None) -> str:
    """Encode ``key`` as ``NVMeTLSkey-1:hh:base64(key || crc32le(key)):``.

    ``hash_id`` defaults to the hash matching the key length, as nvme-cli's
    ``nvme_export_tls_key`` does.
    """
    hid = HashId.for_key_length(len(key)) if hash_id is None else HashId(hash_id)
    _check_key_for_hash(hid, len(key))
    crc = zlib.crc32(key) & 0xFFFFFFFF
    blob = base64.b64encode(key + struct.pack("<I", crc)).decode()
    return f"{INTERCHANGE_PREFIX}:{hid.value:02x}:{blob}:"


def parse_interchange(text: str) -> InterchangeKey:
    """Decode and verify a PSK interchange string.

    Raises :class:`KeyFormatError` with a one-line message naming what is wrong (prefix,
    hash field, length, base64, CRC). The key material is never echoed.
    """
    text = text.strip()
    parts = text.split(":")
    if len(parts) != 4 or parts[3] != "":
        raise KeyFormatError(
            "not a PSK interchange string (expected 'NVMeTLSkey-1:<hh>:<base64>:')"
        )
    prefix, hh, blob, _ = parts
    if prefix != INTERCHANGE_PREFIX:
        raise KeyFormatError(f"unsupported key prefix (expected '{INTERCHANGE_PREFIX}')")
    if len(hh) != 2 or not all(c in "0123456789abcdefABCDEF" for c in hh):
        raise KeyFormatError("invalid hash field (expected two hex digits: 00, 01 or 02)")
    try:
        hid = HashId(int(hh, 16))
    except ValueError:
        raise KeyFormatError(f"unknown hash {hh} (expected 00, 01 or 02)") from None
    try:
        raw = base64.b64decode(blob.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise KeyFormatError("key data is not valid base64") from None
    if len(raw) not in (36, 52):
        raise KeyFormatError(
            f"key data decodes to {len(raw)} bytes (expected 36 or 52: key plus CRC-32)"
        )
    key, crc_bytes = raw[:-4], raw[-4:]
    _check_key_for_hash(hid, len(key))
    if not hmac.compare_digest(struct.pack("<I", zlib.crc32(key) & 0xFFFFFFFF), crc_bytes):
        raise KeyFormatError("CRC-32 mismatch: the key string is corrupted")
    if base64.b64encode(raw).decode() != blob:
        raise KeyFormatError("key data is not in canonical base64 form")
    return InterchangeKey(hid, key)


def generate_configured_psk(hash_id: HashId | int = HashId.SHA256) -> bytes:
    """A fresh random configured PSK of the length ``hash_id`` goes with."""
    return os.urandom(HashId(hash_id).length)


# ---------------------------------------------------------------------------------------
# Derivations


def derive_retained_psk(
    configured: bytes, hash_id: HashId | int, hostnqn: str, variant: Variant = Variant.SPEC
) -> bytes:
    """Retained PSK from a configured PSK (hash 00: the configured key itself)."""
    hid = HashId(hash_id)
    if hid is HashId.NONE:
        return bytes(configured)
    prk = hkdf_extract(hid, configured)
    return hkdf_expand_label(hid, prk, "HostNQN", hostnqn.encode(), len(configured), variant)


def psk_digest(psk: bytes, hash_id: HashId | int, hostnqn: str, subsysnqn: str) -> str:
    """base64(HMAC-hash(psk, hostnqn + " " + subsysnqn + " NVMe-over-Fabrics"))."""
    hid = HashId(hash_id)
    msg = hostnqn.encode() + b" " + subsysnqn.encode() + b" " + DIGEST_SEED
    return base64.b64encode(hmac.new(psk, msg, hid.hash_name).digest()).decode()


def derive_tls_psk(
    psk: bytes,
    hash_id: HashId | int,
    context: str,
    version: int = 1,
    variant: Variant = Variant.SPEC,
    length: int | None = None,
) -> bytes:
    """TLS PSK from a retained or generated PSK.

    ``context`` is the whole identity for version 0 and the PSK digest for version 1 (the
    ``"%02d "`` hash prefix is added here). ``length`` defaults to the hash length.
    """
    hid = HashId(hash_id)
    if version == 0:
        ctx = context
    elif version == 1:
        ctx = f"{hid.value:02d} {context}"
    else:
        raise KeyFormatError(f"invalid identity version {version} (expected 0 or 1)")
    prk = hkdf_extract(hid, psk)
    return hkdf_expand_label(hid, prk, "nvme-tls-psk", ctx.encode(), length or hid.length, variant)


@dataclass(frozen=True)
class PskIdentity:
    """A parsed NVMe TLS PSK identity ``NVMe<v><R|G><hh> <hostnqn> <subsysnqn>[ <digest>]``."""

    version: int
    generated: bool
    hash_id: HashId
    hostnqn: str
    subsysnqn: str
    digest: str | None = None

    def __str__(self) -> str:
        kind = "G" if self.generated else "R"
        text = f"NVMe{self.version}{kind}{self.hash_id.value:02d} {self.hostnqn} {self.subsysnqn}"
        return f"{text} {self.digest}" if self.version == 1 else text


def parse_identity(text: str) -> PskIdentity:
    """Parse a PSK identity string; raises :class:`KeyFormatError` on anything else."""
    fields = text.split(" ")
    head = fields[0]
    if len(head) != 8 or not head.startswith("NVMe") or head[5] not in "RG":
        raise KeyFormatError("not an NVMe PSK identity (expected 'NVMe<v><R|G><hh> ...')")
    if head[4] not in "01" or not head[6:].isdigit():
        raise KeyFormatError("invalid identity version or hash field")
    version = int(head[4])
    try:
        hid = HashId(int(head[6:]))
    except ValueError:
        raise KeyFormatError(f"unknown identity hash {head[6:]}") from None
    if hid is HashId.NONE:
        raise KeyFormatError("identity hash 00 is invalid")
    want = 3 if version == 0 else 4
    if len(fields) != want or not all(fields[1:]):
        raise KeyFormatError(f"identity version {version} needs {want - 1} fields after the tag")
    return PskIdentity(
        version, head[5] == "G", hid, fields[1], fields[2], fields[3] if version else None
    )


def _identity(
    generated: bool, version: int, hid: HashId, hostnqn: str, subsysnqn: str, digest: str | None
) -> PskIdentity:
    if version not in (0, 1):
        raise KeyFormatError(f"invalid identity version {version} (expected 0 or 1)")
    return PskIdentity(version, generated, hid, hostnqn, subsysnqn, digest if version else None)


def retained_identity(
    hash_id: HashId | int,
    hostnqn: str,
    subsysnqn: str,
    version: int = 1,
    retained: bytes | None = None,
) -> PskIdentity:
    """The identity of a retained PSK; version 1 needs ``retained`` for the digest."""
    hid = HashId(hash_id)
    digest = None
    if version == 1:
        if retained is None:
            raise KeyFormatError("a version 1 identity needs the PSK for its digest")
        digest = psk_digest(retained, hid, hostnqn, subsysnqn)
    return _identity(False, version, hid, hostnqn, subsysnqn, digest)


def generated_identity(
    hash_id: HashId | int, hostnqn: str, subsysnqn: str, digest: str
) -> PskIdentity:
    """The identity of a PSK generated by DH-HMAC-CHAP secure channel concatenation."""
    return _identity(True, 1, HashId(hash_id), hostnqn, subsysnqn, digest)


def psk_lookup_prefixes(hostnqn: str, subsysnqn: str) -> list[str]:
    """Identity prefixes in the order Linux's ``nvme_tls_psk_default`` tries them.

    Retained before generated keys, version 1 before version 0, SHA-384 before SHA-256.
    The kernel matches descriptions by prefix (a version 1 identity ends in a digest the
    looker-up cannot know), with exactly these strings and no trailing separator.
    """
    return [
        f"NVMe{version}{kind}{hid.value:02d} {hostnqn} {subsysnqn}"
        for kind in ("R", "G")
        for version in (1, 0)
        for hid in (HashId.SHA384, HashId.SHA256)
    ]


@dataclass(frozen=True)
class DerivedTlsKey:
    """What goes into the keyring: description = ``identity``, payload = ``tls_psk``."""

    identity: PskIdentity
    tls_psk: bytes

    def __repr__(self) -> str:
        size = len(self.tls_psk)
        return f"DerivedTlsKey(identity={str(self.identity)!r}, tls_psk=<{size} bytes>)"


def derive_nvme_tls_key(
    configured: bytes,
    hash_id: HashId | int,
    hostnqn: str,
    subsysnqn: str,
    version: int = 0,
    variant: Variant = Variant.SPEC,
) -> DerivedTlsKey:
    """Configured PSK -> (identity, TLS PSK), exactly as libnvme's ``derive_nvme_keys``.

    ``hash_id`` is the retained-key transform (00 = none); the identity's hash is the
    transform hash, or for 00 the hash matching the key length.
    """
    hid = HashId(hash_id)
    _check_key_for_hash(hid, len(configured))
    if not hostnqn or not subsysnqn:
        raise KeyFormatError("host NQN and subsystem NQN must not be empty")
    retained = derive_retained_psk(configured, hid, hostnqn, variant)
    cipher = HashId.for_key_length(len(configured)) if hid is HashId.NONE else hid
    identity = retained_identity(cipher, hostnqn, subsysnqn, version, retained)
    context = str(identity) if version == 0 else identity.digest
    assert context is not None
    tls_psk = derive_tls_psk(retained, cipher, context, version, variant, len(configured))
    return DerivedTlsKey(identity, tls_psk)


def sha256_hex(data: bytes) -> str:
    """Convenience for tests and logs of non-secret values."""
    return hashlib.sha256(data).hexdigest()
