"""DH-HMAC-CHAP cryptography: hashes, RFC 7919 groups, DHHC-1 secrets, responses, generated PSKs.

Everything DH-HMAC-CHAP computes, and nothing about messages or protocol state (the codec is
:mod:`ktlsd.nvme.dhchap_messages`, the state machines :mod:`ktlsd.nvme.dhchap`):

* :class:`HashFunction` and :class:`DhGroup`, the protocol's hash and Diffie-Hellman group
  identifiers; :func:`ffdhe_prime` and :class:`DhExchange`, one side's ephemeral key in an
  RFC 7919 group;
* :class:`DhchapSecret`: the ``DHHC-1:hh:base64(key || crc32le):`` secret representation
  (parse with CRC check, format, generate, and the NQN transform);
* the responses and the generated PSK, computed like the Linux host
  (``drivers/nvme/host/auth.c``) and target (``drivers/nvme/target/fabrics-cmd-auth.c``,
  ``auth.c``) so the two can interoperate:

  - host response = HMAC-H(Kh', C1' || S1 (le32) || T_ID (le16) || SC_C || "HostHost" ||
    HostNQN || 0x00 || SubsysNQN), controller response = HMAC-H(Kc', C2' || S2 || T_ID ||
    0x00 || "Controller" || SubsysNQN || 0x00 || HostNQN); Kh'/Kc' are the secrets
    transformed with the host/subsystem NQN, and with a DH group C' = HMAC-H(H(KS), C) (the
    "augmented challenge"), KS being the DH shared secret left-padded to the group size;
  - secure channel concatenation: generated PSK = HMAC-H(KS, C1 || C2) -> digest -> TLS PSK,
    stored under the identity ``NVMe1G<hh> <hostnqn> <subsysnqn> <digest>``
    (:func:`derive_generated_tls_key`);

* :class:`PskStore`, where generated TLS PSKs go, and :class:`KeyringPskStore`, which puts them
  in a kernel keyring with a timeout like the Linux host.

`cryptography` (50+) warns that finite-field Diffie-Hellman is deprecated; that one warning is
silenced around this module's own use of the RFC 7919 groups and nowhere else.

Secrets (DHHC-1 keys, session keys, generated PSKs) never appear in reprs or messages.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import hmac
import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import ClassVar, Protocol

from cryptography.hazmat.primitives.asymmetric import dh

from ktlsd.nvme import keys as nvme_keys

__all__ = [
    "GENERATED_PSK_TIMEOUT",
    "DhExchange",
    "DhGroup",
    "DhchapSecret",
    "GeneratedPsk",
    "HashFunction",
    "KeyringPskStore",
    "PskStore",
    "augmented_challenge",
    "controller_response",
    "derive_generated_tls_key",
    "ffdhe_prime",
    "generate_psk",
    "host_response",
]

GENERATED_PSK_TIMEOUT = 3600  # seconds, as the Linux host uses for generated keys


class HashFunction(enum.IntEnum):
    """DH-HMAC-CHAP hash identifiers (also the ``hh`` of a DHHC-1 secret, 0 = none)."""

    SHA256 = 1
    SHA384 = 2
    SHA512 = 3

    @property
    def hash_name(self) -> str:
        return {1: "sha256", 2: "sha384", 3: "sha512"}[self.value]

    @property
    def length(self) -> int:
        return {1: 32, 2: 48, 3: 64}[self.value]


class DhGroup(enum.IntEnum):
    """DH-HMAC-CHAP Diffie-Hellman group identifiers (RFC 7919 groups)."""

    NULL = 0
    FFDHE2048 = 1
    FFDHE3072 = 2
    FFDHE4096 = 3
    FFDHE6144 = 4
    FFDHE8192 = 5

    @property
    def bits(self) -> int:
        return {0: 0, 1: 2048, 2: 3072, 3: 4096, 4: 6144, 5: 8192}[self.value]

    @property
    def size(self) -> int:
        """Bytes of a public value or shared secret in this group."""
        return self.bits // 8


# ---------------------------------------------------------------------------------------
# RFC 7919 groups


# RFC 7919 defines p = 2^b - 2^(b-64) + (floor(2^(b-130) * e) + X) * 2^64 - 1 with these X.
_FFDHE_X = {2048: 560316, 3072: 2625351, 4096: 5736041, 6144: 15705020, 8192: 10965728}


def _e_fixed_point(bits: int) -> int:
    """floor(e * 2^bits) from the series sum 1/n!, with guard bits against truncation."""
    guard = 64
    term = 1 << (bits + guard)
    total, n = 0, 0
    while term:
        total += term
        n += 1
        term //= n
    return total >> guard


@cache
def ffdhe_prime(group: DhGroup) -> int:
    """The RFC 7919 prime of ``group``, computed from the RFC's defining formula.

    Computing it avoids typing 2048-8192-bit hex constants by hand; the tests compare each
    prime with the one OpenSSL ships and check primality and safety.
    """
    b = group.bits
    if b == 0:
        raise ValueError("the NULL DH group has no prime")
    # int(): typeshed types int ** int as Any (a negative exponent would give a float)
    return int(2**b - 2 ** (b - 64) + (_e_fixed_point(b - 130) + _FFDHE_X[b]) * 2**64 - 1)


@contextlib.contextmanager
def _ffdh_allowed() -> Iterator[None]:
    """DH-HMAC-CHAP is defined over the RFC 7919 finite-field groups, which `cryptography`
    (50+) marks as deprecated; silence exactly that warning around our use of them."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*Diffie-Hellman over finite fields.*", category=Warning
        )
        yield


@cache
def _dh_parameters(group: DhGroup) -> dh.DHParameters:
    p = ffdhe_prime(group)
    with _ffdh_allowed():
        return dh.DHParameterNumbers(p, 2, (p - 1) // 2).parameters()


class DhExchange:
    """One side's ephemeral key in a group; the private key stays inside this object."""

    def __init__(self, group: DhGroup) -> None:
        self.group = group
        with _ffdh_allowed():
            self._private = _dh_parameters(group).generate_private_key()
            y = self._private.public_key().public_numbers().y
        self.public_value = y.to_bytes(group.size, "big")

    def session_key(self, peer_value: bytes) -> bytes:
        """The shared secret KS, left-padded to the group size like the kernel's kpp."""
        if len(peer_value) != self.group.size:
            raise ValueError("DH public value has the wrong length for the group")
        p = ffdhe_prime(self.group)
        y = int.from_bytes(peer_value, "big")
        if not 1 < y < p - 1:
            raise ValueError("DH public value out of range")
        with _ffdh_allowed():
            numbers = dh.DHPublicNumbers(y, _dh_parameters(self.group).parameter_numbers())
            shared = self._private.exchange(numbers.public_key())
        return shared.rjust(self.group.size, b"\0")

    def __repr__(self) -> str:
        return f"DhExchange({self.group.name})"


# ---------------------------------------------------------------------------------------
# DHHC-1 secrets


@dataclass(frozen=True)
class DhchapSecret:
    """A DH-HMAC-CHAP secret ``DHHC-1:hh:base64(key || crc32le):``; repr hides the key.

    ``hash_id`` 0 means the key is used as is; 1-3 mean it is transformed with an NQN
    (:meth:`transform`) using SHA-256/384/512, and then the key length must equal the hash
    length (the kernel rejects other combinations).
    """

    hash_id: int
    key: bytes

    PREFIX: ClassVar[str] = "DHHC-1"

    def __post_init__(self) -> None:
        if self.hash_id not in (0, 1, 2, 3):
            raise nvme_keys.KeyFormatError(f"invalid DHHC-1 hash {self.hash_id:02x}")
        if len(self.key) not in (32, 48, 64):
            raise nvme_keys.KeyFormatError(
                f"invalid DHHC-1 key length {len(self.key)} (need 32, 48 or 64 bytes)"
            )
        if self.hash_id and len(self.key) != HashFunction(self.hash_id).length:
            raise nvme_keys.KeyFormatError(
                f"DHHC-1 key length {len(self.key)} does not match hash {self.hash_id:02x}"
            )

    def __repr__(self) -> str:
        return f"DhchapSecret(hash_id={self.hash_id}, key=<{len(self.key)} bytes>)"

    @classmethod
    def parse(cls, text: str) -> DhchapSecret:
        """Decode and CRC-check a DHHC-1 string; errors never echo the key."""
        parts = text.strip().split(":")
        if len(parts) != 4 or parts[3] != "":
            raise nvme_keys.KeyFormatError(
                "not a DH-HMAC-CHAP secret (expected 'DHHC-1:<hh>:<base64>:')"
            )
        if parts[0] != cls.PREFIX:
            raise nvme_keys.KeyFormatError("unsupported secret prefix (expected 'DHHC-1')")
        hh = parts[1]
        if len(hh) != 2 or not all(c in "0123456789abcdefABCDEF" for c in hh):
            raise nvme_keys.KeyFormatError("invalid hash field (expected 00, 01, 02 or 03)")
        hash_id = int(hh, 16)
        if hash_id > 3:
            raise nvme_keys.KeyFormatError(f"unknown hash {hh} (expected 00, 01, 02 or 03)")
        try:
            raw = base64.b64decode(parts[2].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise nvme_keys.KeyFormatError("secret data is not valid base64") from None
        if len(raw) not in (36, 52, 68):
            raise nvme_keys.KeyFormatError(
                f"secret data decodes to {len(raw)} bytes (expected 36, 52 or 68)"
            )
        key, crc = raw[:-4], raw[-4:]
        if not hmac.compare_digest(struct.pack("<I", zlib.crc32(key) & 0xFFFFFFFF), crc):
            raise nvme_keys.KeyFormatError("CRC-32 mismatch: the secret string is corrupted")
        if base64.b64encode(raw).decode("ascii") != parts[2]:
            # The unused low bits of the last base64 character: a corrupted string that
            # decodes to the same bytes (as the TLS PSK interchange parser rejects too).
            raise nvme_keys.KeyFormatError("secret data is not in canonical base64 form")
        return cls(hash_id, key)

    def format(self) -> str:
        crc = struct.pack("<I", zlib.crc32(self.key) & 0xFFFFFFFF)
        return f"{self.PREFIX}:{self.hash_id:02x}:{base64.b64encode(self.key + crc).decode()}:"

    @classmethod
    def generate(cls, hash_id: int = 0, length: int | None = None) -> DhchapSecret:
        if length is None:
            length = HashFunction(hash_id).length if hash_id else 32
        return cls(hash_id, os.urandom(length))

    def transform(self, nqn: str) -> bytes:
        """HMAC-hh(key, NQN || "NVMe-over-Fabrics"), or the key itself for hash 0."""
        if self.hash_id == 0:
            return self.key
        name = HashFunction(self.hash_id).hash_name
        return hmac.new(self.key, nqn.encode() + b"NVMe-over-Fabrics", name).digest()


# ---------------------------------------------------------------------------------------
# Computations


def augmented_challenge(hash_fn: HashFunction, session_key: bytes, challenge: bytes) -> bytes:
    """C' = HMAC-H(H(KS), C): binds the challenge to the DH exchange."""
    hashed_key = hashlib.new(hash_fn.hash_name, session_key).digest()
    return hmac.new(hashed_key, challenge, hash_fn.hash_name).digest()


def host_response(
    hash_fn: HashFunction,
    transformed_key: bytes,
    challenge: bytes,
    seqnum: int,
    transaction: int,
    sc_c: int,
    hostnqn: str,
    subsysnqn: str,
) -> bytes:
    """The host's response R1 to challenge C1 (already augmented if a DH group is used)."""
    msg = (
        challenge
        + struct.pack("<IHB", seqnum, transaction, sc_c)
        + b"HostHost"
        + hostnqn.encode()
        + b"\0"
        + subsysnqn.encode()
    )
    return hmac.new(transformed_key, msg, hash_fn.hash_name).digest()


def controller_response(
    hash_fn: HashFunction,
    transformed_key: bytes,
    challenge: bytes,
    seqnum: int,
    transaction: int,
    hostnqn: str,
    subsysnqn: str,
) -> bytes:
    """The controller's response R2 to challenge C2 (bidirectional authentication)."""
    msg = (
        challenge
        + struct.pack("<IHB", seqnum, transaction, 0)
        + b"Controller"
        + subsysnqn.encode()
        + b"\0"
        + hostnqn.encode()
    )
    return hmac.new(transformed_key, msg, hash_fn.hash_name).digest()


def generate_psk(hash_fn: HashFunction, session_key: bytes, c1: bytes, c2: bytes) -> bytes:
    """Generated PSK = HMAC-H(KS, C1 || C2) (NVMe Base spec, secure channel concatenation)."""
    return hmac.new(session_key, c1 + c2, hash_fn.hash_name).digest()


@dataclass(frozen=True)
class GeneratedPsk:
    """A TLS PSK produced by secure channel concatenation; repr hides the key."""

    identity: str
    tls_psk: bytes = field(repr=False)
    serial: int | None = None

    def __repr__(self) -> str:
        return f"GeneratedPsk(identity={self.identity!r}, serial={self.serial})"


def derive_generated_tls_key(
    hash_fn: HashFunction,
    session_key: bytes,
    c1: bytes,
    c2: bytes,
    hostnqn: str,
    subsysnqn: str,
) -> tuple[str, bytes]:
    """(identity, TLS PSK) for a concatenated channel; SHA-512 has no PSK identity form."""
    if hash_fn is HashFunction.SHA512:
        raise ValueError("secure channel concatenation is not defined for SHA-512")
    hid = nvme_keys.HashId(hash_fn.value)
    psk = generate_psk(hash_fn, session_key, c1, c2)
    digest = nvme_keys.psk_digest(psk, hid, hostnqn, subsysnqn)
    tls_psk = nvme_keys.derive_tls_psk(psk, hid, digest, version=1)
    identity = nvme_keys.generated_identity(hid, hostnqn, subsysnqn, digest)
    return str(identity), tls_psk


class PskStore(Protocol):
    """Where generated TLS PSKs go (the keyring in the agent, a dict in tests)."""

    def store(self, identity: str, tls_psk: bytes) -> int | None:
        """Save the key; return its serial (or None)."""
        ...

    def revoke(self, serial: int) -> None:
        """Revoke a previously stored key."""
        ...


class KeyringPskStore:
    """Stores generated PSKs as ``psk`` keys with a timeout, like the Linux host does."""

    def __init__(
        self,
        keyring: int,
        key_type: str = "psk",
        timeout: int = GENERATED_PSK_TIMEOUT,
    ) -> None:
        self.keyring = keyring
        self.key_type = key_type
        self.timeout = timeout

    def store(self, identity: str, tls_psk: bytes) -> int:
        from ktlsd import keyring

        serial = keyring.add_key(self.key_type, identity, tls_psk, self.keyring)
        if self.timeout:
            keyring.set_timeout(serial, self.timeout)
        return serial

    def revoke(self, serial: int) -> None:
        from ktlsd import keyring

        keyring.revoke_key(serial)
