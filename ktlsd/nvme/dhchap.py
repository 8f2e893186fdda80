"""NVMe in-band authentication (DH-HMAC-CHAP) and secure channel concatenation, sans I/O.

The NVMe Base specification's DH-HMAC-CHAP protocol runs over Authentication Send/Receive
commands on a queue; this module knows nothing about commands or queues. It provides:

* :class:`DhchapSecret`: the ``DHHC-1:hh:base64(key || crc32le):`` secret representation
  (parse with CRC check, format, generate, and the NQN transform);
* message classes with exact byte layouts (``struct nvmf_auth_dhchap_*`` in the kernel's
  ``include/linux/nvme.h``) and :func:`decode_message`;
* :class:`DhchapHost` and :class:`DhchapController`: state machines that take decoded
  messages and return what to send plus events (:class:`Authenticated`, :class:`Failed`).

The computations match the Linux host (``drivers/nvme/host/auth.c``) and target
(``drivers/nvme/target/fabrics-cmd-auth.c``, ``auth.c``) so the two can interoperate:

* host response = HMAC-H(Kh', C1' || S1 (le32) || T_ID (le16) || SC_C || "HostHost" ||
  HostNQN || 0x00 || SubsysNQN), controller response = HMAC-H(Kc', C2' || S2 || T_ID ||
  0x00 || "Controller" || SubsysNQN || 0x00 || HostNQN); Kh'/Kc' are the secrets transformed
  with the host/subsystem NQN, and with a DH group C' = HMAC-H(H(KS), C) (the "augmented
  challenge"), KS being the DH shared secret left-padded to the group size;
* with secure channel concatenation the host sends a random C2 with S2 = 0 (no
  controller response), a DH group is mandatory, and both sides derive
  generated PSK = HMAC-H(KS, C1 || C2) -> digest -> TLS PSK, stored under the identity
  ``NVMe1G<hh> <hostnqn> <subsysnqn> <digest>``.

NEWTLSPSK is only valid on a connection without a TLS key and REPLACETLSPSK only on one
with a key; the controller answers anything else with CONCAT_MISMATCH. The controller keeps
its TLS key after a *successful* authentication (so the next REPLACETLSPSK works again; the
upstream target got this wrong until 2026); failures and :meth:`DhchapController.teardown`
clear it.

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
import secrets
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import ClassVar, Protocol

from cryptography.hazmat.primitives.asymmetric import dh

from ktlsd.nvme import keys as nvme_keys

__all__ = [
    "AuthMessageId",
    "Authenticated",
    "Challenge",
    "DhGroup",
    "DhchapController",
    "DhchapHost",
    "DhchapSecret",
    "Failed",
    "Failure",
    "FailureReason",
    "GeneratedPsk",
    "HashFunction",
    "MessageError",
    "Negotiate",
    "Reply",
    "SecureChannel",
    "Success1",
    "Success2",
    "decode_message",
]

NVME_AUTH_COMMON_MESSAGES = 0x00
NVME_AUTH_DHCHAP_MESSAGES = 0x01
NVME_AUTH_DHCHAP_AUTH_ID = 0x01
NVME_AUTH_DHCHAP_FAILURE_REASON_FAILED = 0x01
GENERATED_PSK_TIMEOUT = 3600  # seconds, as the Linux host uses for generated keys


class MessageError(ValueError):
    """A message could not be decoded (truncated, wrong type, inconsistent lengths)."""


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


class AuthMessageId(enum.IntEnum):
    NEGOTIATE = 0x00
    CHALLENGE = 0x01
    REPLY = 0x02
    SUCCESS1 = 0x03
    SUCCESS2 = 0x04
    FAILURE2 = 0xF0
    FAILURE1 = 0xF1


class SecureChannel(enum.IntEnum):
    """SC_C of AUTH_Negotiate (secure channel concatenation)."""

    NOSC = 0
    SC = 1
    NEWTLSPSK = 2
    REPLACETLSPSK = 3


class FailureReason(enum.IntEnum):
    """Reason code explanations of DH-HMAC-CHAP_Failure1/2."""

    FAILED = 0x01
    NOT_USABLE = 0x02
    CONCAT_MISMATCH = 0x03
    HASH_UNUSABLE = 0x04
    DHGROUP_UNUSABLE = 0x05
    INCORRECT_PAYLOAD = 0x06
    INCORRECT_MESSAGE = 0x07


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


class _DhExchange:
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
        return f"_DhExchange({self.group.name})"


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


# ---------------------------------------------------------------------------------------
# Messages


_HDR = struct.Struct("<BBHH")  # auth_type, auth_id, rsvd, t_id


@dataclass(frozen=True)
class Negotiate:
    """AUTH_Negotiate with one DH-HMAC-CHAP protocol descriptor."""

    t_id: int
    sc_c: int = SecureChannel.NOSC
    hash_ids: tuple[int, ...] = (1, 2, 3)
    dh_groups: tuple[int, ...] = (0, 1, 2, 3, 4, 5)

    def encode(self) -> bytes:
        if len(self.hash_ids) > 30 or len(self.dh_groups) > 30:
            raise MessageError("too many hash or DH group identifiers")
        idlist = bytes(self.hash_ids).ljust(30, b"\0") + bytes(self.dh_groups).ljust(30, b"\0")
        return (
            _HDR.pack(NVME_AUTH_COMMON_MESSAGES, AuthMessageId.NEGOTIATE, 0, self.t_id)
            + bytes([self.sc_c, 1])
            + bytes([NVME_AUTH_DHCHAP_AUTH_ID, 0, len(self.hash_ids), len(self.dh_groups)])
            + idlist
        )

    @classmethod
    def decode(cls, data: bytes) -> Negotiate:
        if len(data) < 8 + 64:
            raise MessageError("AUTH_Negotiate too short")
        _, _, _, t_id = _HDR.unpack_from(data)
        sc_c, napd = data[6], data[7]
        if napd != 1:
            raise MessageError(f"AUTH_Negotiate with {napd} protocol descriptors (need 1)")
        authid, _, halen, dhlen = data[8:12]
        if authid != NVME_AUTH_DHCHAP_AUTH_ID:
            raise MessageError("AUTH_Negotiate descriptor is not DH-HMAC-CHAP")
        if halen > 30 or dhlen > 30:
            raise MessageError("AUTH_Negotiate identifier lists too long")
        idlist = data[12:72]
        return cls(t_id, sc_c, tuple(idlist[:halen]), tuple(idlist[30 : 30 + dhlen]))


@dataclass(frozen=True)
class Challenge:
    """DH-HMAC-CHAP_Challenge: hash, DH group, S1, C1 and the controller's DH value."""

    t_id: int
    hash_id: int
    dh_group: int
    seqnum: int
    challenge: bytes
    dh_value: bytes = b""

    def encode(self) -> bytes:
        return (
            _HDR.pack(NVME_AUTH_DHCHAP_MESSAGES, AuthMessageId.CHALLENGE, 0, self.t_id)
            + struct.pack(
                "<BBBBHI",
                len(self.challenge),
                0,
                self.hash_id,
                self.dh_group,
                len(self.dh_value),
                self.seqnum,
            )
            + self.challenge
            + self.dh_value
        )

    @classmethod
    def decode(cls, data: bytes) -> Challenge:
        if len(data) < 16:
            raise MessageError("DH-HMAC-CHAP_Challenge too short")
        _, _, _, t_id = _HDR.unpack_from(data)
        hl, _, hash_id, dh_group, dhvlen, seqnum = struct.unpack_from("<BBBBHI", data, 6)
        if len(data) < 16 + hl + dhvlen:
            raise MessageError("DH-HMAC-CHAP_Challenge shorter than its lengths say")
        return cls(
            t_id, hash_id, dh_group, seqnum, data[16 : 16 + hl], data[16 + hl : 16 + hl + dhvlen]
        )


@dataclass(frozen=True)
class Reply:
    """DH-HMAC-CHAP_Reply: R1, optional C2 (cvalid), S2 and the host's DH value."""

    t_id: int
    response: bytes
    seqnum: int = 0
    challenge: bytes | None = None
    dh_value: bytes = b""

    def encode(self) -> bytes:
        hl = len(self.response)
        c2 = self.challenge if self.challenge is not None else bytes(hl)
        if len(c2) != hl:
            raise MessageError("C2 length differs from the response length")
        return (
            _HDR.pack(NVME_AUTH_DHCHAP_MESSAGES, AuthMessageId.REPLY, 0, self.t_id)
            + struct.pack(
                "<BBBBHI",
                hl,
                0,
                1 if self.challenge is not None else 0,
                0,
                len(self.dh_value),
                self.seqnum,
            )
            + self.response
            + c2
            + self.dh_value
        )

    @classmethod
    def decode(cls, data: bytes) -> Reply:
        if len(data) < 16:
            raise MessageError("DH-HMAC-CHAP_Reply too short")
        _, _, _, t_id = _HDR.unpack_from(data)
        hl, _, cvalid, _, dhvlen, seqnum = struct.unpack_from("<BBBBHI", data, 6)
        if len(data) < 16 + 2 * hl + dhvlen:
            raise MessageError("DH-HMAC-CHAP_Reply shorter than its lengths say")
        rval = data[16 : 16 + hl]
        c2 = data[16 + hl : 16 + 2 * hl] if cvalid & 1 else None
        return cls(t_id, rval, seqnum, c2, data[16 + 2 * hl : 16 + 2 * hl + dhvlen])


@dataclass(frozen=True)
class Success1:
    """DH-HMAC-CHAP_Success1: hash length and, for bidirectional auth, R2 (rvalid)."""

    t_id: int
    hash_length: int
    response: bytes | None = None

    def encode(self) -> bytes:
        rval = self.response or b""
        return (
            _HDR.pack(NVME_AUTH_DHCHAP_MESSAGES, AuthMessageId.SUCCESS1, 0, self.t_id)
            + bytes([self.hash_length, 0, 1 if self.response is not None else 0])
            + bytes(7)
            + rval
        )

    @classmethod
    def decode(cls, data: bytes) -> Success1:
        if len(data) < 16:
            raise MessageError("DH-HMAC-CHAP_Success1 too short")
        _, _, _, t_id = _HDR.unpack_from(data)
        hl, rvalid = data[6], data[8]
        if rvalid & 1:
            if len(data) < 16 + hl:
                raise MessageError("DH-HMAC-CHAP_Success1 response truncated")
            return cls(t_id, hl, data[16 : 16 + hl])
        return cls(t_id, hl, None)


@dataclass(frozen=True)
class Success2:
    """DH-HMAC-CHAP_Success2: the host accepted the controller's response."""

    t_id: int

    def encode(self) -> bytes:
        return _HDR.pack(NVME_AUTH_DHCHAP_MESSAGES, AuthMessageId.SUCCESS2, 0, self.t_id) + bytes(
            10
        )

    @classmethod
    def decode(cls, data: bytes) -> Success2:
        if len(data) < 16:
            raise MessageError("DH-HMAC-CHAP_Success2 too short")
        return cls(_HDR.unpack_from(data)[3])


@dataclass(frozen=True)
class Failure:
    """AUTH_Failure1 (controller -> host) or AUTH_Failure2 (host -> controller)."""

    t_id: int
    explanation: int
    from_controller: bool
    reason_code: int = NVME_AUTH_DHCHAP_FAILURE_REASON_FAILED

    @property
    def message_id(self) -> AuthMessageId:
        return AuthMessageId.FAILURE1 if self.from_controller else AuthMessageId.FAILURE2

    def encode(self) -> bytes:
        return _HDR.pack(NVME_AUTH_COMMON_MESSAGES, self.message_id, 0, self.t_id) + bytes(
            [self.reason_code, self.explanation]
        )

    @classmethod
    def decode(cls, data: bytes) -> Failure:
        if len(data) < 8:
            raise MessageError("AUTH_Failure too short")
        _, auth_id, _, t_id = _HDR.unpack_from(data)
        return cls(t_id, data[7], auth_id == AuthMessageId.FAILURE1, data[6])


Message = Negotiate | Challenge | Reply | Success1 | Success2 | Failure

_DECODERS: dict[tuple[int, int], Callable[[bytes], Message]] = {
    (NVME_AUTH_COMMON_MESSAGES, AuthMessageId.NEGOTIATE): Negotiate.decode,
    (NVME_AUTH_DHCHAP_MESSAGES, AuthMessageId.CHALLENGE): Challenge.decode,
    (NVME_AUTH_DHCHAP_MESSAGES, AuthMessageId.REPLY): Reply.decode,
    (NVME_AUTH_DHCHAP_MESSAGES, AuthMessageId.SUCCESS1): Success1.decode,
    (NVME_AUTH_DHCHAP_MESSAGES, AuthMessageId.SUCCESS2): Success2.decode,
    (NVME_AUTH_COMMON_MESSAGES, AuthMessageId.FAILURE1): Failure.decode,
    (NVME_AUTH_COMMON_MESSAGES, AuthMessageId.FAILURE2): Failure.decode,
}


def decode_message(data: bytes) -> Message:
    """Decode any authentication message by its auth_type/auth_id header."""
    if len(data) < 2:
        raise MessageError("authentication message too short")
    decoder = _DECODERS.get((data[0], data[1]))
    if decoder is None:
        raise MessageError(f"unknown authentication message {data[0]:02x}/{data[1]:02x}")
    return decoder(data)


# ---------------------------------------------------------------------------------------
# Events and state machines


@dataclass(frozen=True)
class Authenticated:
    """Authentication succeeded; ``generated_psk`` is set when a channel was concatenated."""

    hash_fn: HashFunction
    dh_group: DhGroup
    bidirectional: bool
    generated_psk: GeneratedPsk | None = None


@dataclass(frozen=True)
class Failed:
    """Authentication failed with ``reason``; ``detected_locally`` tells who noticed.

    ``reason`` is a plain int only when a peer sent a code this module does not know.
    """

    reason: FailureReason | int
    detected_locally: bool


def _reason(code: int) -> FailureReason | int:
    try:
        return FailureReason(code)
    except ValueError:
        return code


Event = Authenticated | Failed


@dataclass
class Output:
    """What a state machine step produced: at most one message to send, and events."""

    send: Message | None = None
    events: list[Event] = field(default_factory=list)


def _seqnum() -> int:
    """A random non-zero 32-bit sequence number (0 means "no bidirectional auth")."""
    return secrets.randbelow(0xFFFFFFFF) + 1


class _Base:
    def __init__(self, hostnqn: str, subsysnqn: str, psk_store: PskStore | None) -> None:
        self.hostnqn = hostnqn
        self.subsysnqn = subsysnqn
        self.psk_store = psk_store
        self.tls_key: GeneratedPsk | None = None

    def _install_generated(
        self, hash_fn: HashFunction, session_key: bytes, c1: bytes, c2: bytes
    ) -> GeneratedPsk:
        identity, tls_psk = derive_generated_tls_key(
            hash_fn, session_key, c1, c2, self.hostnqn, self.subsysnqn
        )
        serial = self.psk_store.store(identity, tls_psk) if self.psk_store else None
        previous = self.tls_key
        if previous is not None and previous.serial is not None and self.psk_store:
            self.psk_store.revoke(previous.serial)
        self.tls_key = GeneratedPsk(identity, tls_psk, serial)
        return self.tls_key


class DhchapHost(_Base):
    """The host side of DH-HMAC-CHAP on one queue.

    Drive it with :meth:`start` (returns AUTH_Negotiate), then feed each message received
    via Authentication Receive to :meth:`receive` and send what it returns. ``concat``
    requests secure channel concatenation: NEWTLSPSK while the host holds no TLS key,
    REPLACETLSPSK once it does (``secure_channel`` forces a value, for testing peers).
    """

    def __init__(
        self,
        hostnqn: str,
        subsysnqn: str,
        host_secret: DhchapSecret,
        ctrl_secret: DhchapSecret | None = None,
        *,
        hash_ids: Sequence[int] = (1, 2, 3),
        dh_groups: Sequence[int] = (0, 1, 2, 3, 4, 5),
        concat: bool = False,
        psk_store: PskStore | None = None,
        tls_key: GeneratedPsk | None = None,
    ) -> None:
        super().__init__(hostnqn, subsysnqn, psk_store)
        self.host_secret = host_secret
        self.ctrl_secret = ctrl_secret
        self.hash_ids = tuple(hash_ids)
        self.dh_groups = tuple(dh_groups)
        self.concat = concat
        self.tls_key = tls_key
        self._transaction = 0
        self._state = "idle"
        self._t_id = 0
        self._sc_c = 0

    def start(self, secure_channel: SecureChannel | None = None) -> Negotiate:
        """Begin a new transaction and return the AUTH_Negotiate to send."""
        self._t_id = self._transaction
        self._transaction = (self._transaction + 1) & 0xFFFF
        if secure_channel is not None:
            self._sc_c = secure_channel
        elif not self.concat:
            self._sc_c = SecureChannel.NOSC
        else:
            self._sc_c = SecureChannel.REPLACETLSPSK if self.tls_key else SecureChannel.NEWTLSPSK
        self._state = "challenge"
        self._session_key = b""
        return Negotiate(self._t_id, self._sc_c, self.hash_ids, self.dh_groups)

    def _fail(self, reason: FailureReason) -> Output:
        self._state = "done"
        return Output(Failure(self._t_id, reason, from_controller=False), [Failed(reason, True)])

    def receive(self, message: Message) -> Output:
        if isinstance(message, Failure) and message.from_controller:
            self._state = "done"
            return Output(None, [Failed(_reason(message.explanation), False)])
        if self._state == "challenge" and isinstance(message, Challenge):
            return self._on_challenge(message)
        if self._state == "success1" and isinstance(message, Success1):
            return self._on_success1(message)
        return self._fail(FailureReason.INCORRECT_MESSAGE)

    def _on_challenge(self, msg: Challenge) -> Output:
        if msg.t_id != self._t_id:
            return self._fail(FailureReason.INCORRECT_MESSAGE)
        if msg.hash_id not in self.hash_ids or msg.hash_id not in (1, 2, 3):
            return self._fail(FailureReason.HASH_UNUSABLE)
        hash_fn = HashFunction(msg.hash_id)
        if len(msg.challenge) != hash_fn.length:
            return self._fail(FailureReason.HASH_UNUSABLE)
        if msg.dh_group not in self.dh_groups or msg.dh_group not in DhGroup._value2member_map_:
            return self._fail(FailureReason.DHGROUP_UNUSABLE)
        group = DhGroup(msg.dh_group)
        if group is DhGroup.NULL and msg.dh_value:
            return self._fail(FailureReason.INCORRECT_PAYLOAD)
        if self._sc_c != SecureChannel.NOSC and group is DhGroup.NULL:
            return self._fail(FailureReason.CONCAT_MISMATCH)
        c1 = msg.challenge
        host_value = b""
        if group is not DhGroup.NULL:
            exchange = _DhExchange(group)
            try:
                self._session_key = exchange.session_key(msg.dh_value)
            except ValueError:
                return self._fail(FailureReason.DHGROUP_UNUSABLE)
            host_value = exchange.public_value
            c1 = augmented_challenge(hash_fn, self._session_key, msg.challenge)
        r1 = host_response(
            hash_fn,
            self.host_secret.transform(self.hostnqn),
            c1,
            msg.seqnum,
            self._t_id,
            self._sc_c,
            self.hostnqn,
            self.subsysnqn,
        )
        self._hash_fn, self._group, self._c1 = hash_fn, group, msg.challenge
        concat = self._sc_c != SecureChannel.NOSC
        self._bidirectional = self.ctrl_secret is not None and not concat
        self._c2 = os.urandom(hash_fn.length) if (self.ctrl_secret or concat) else None
        self._s2 = _seqnum() if self._bidirectional else 0
        self._state = "success1"
        return Output(Reply(self._t_id, r1, self._s2, self._c2, host_value))

    def _on_success1(self, msg: Success1) -> Output:
        if msg.t_id != self._t_id:
            return self._fail(FailureReason.INCORRECT_MESSAGE)
        if msg.hash_length != self._hash_fn.length:
            return self._fail(FailureReason.HASH_UNUSABLE)
        send: Message | None = None
        if self._bidirectional:
            assert self.ctrl_secret is not None and self._c2 is not None
            if msg.response is None:
                return self._fail(FailureReason.FAILED)
            c2 = self._c2
            if self._group is not DhGroup.NULL:
                c2 = augmented_challenge(self._hash_fn, self._session_key, c2)
            expected = controller_response(
                self._hash_fn,
                self.ctrl_secret.transform(self.subsysnqn),
                c2,
                self._s2,
                self._t_id,
                self.hostnqn,
                self.subsysnqn,
            )
            if not hmac.compare_digest(expected, msg.response):
                return self._fail(FailureReason.FAILED)
            send = Success2(self._t_id)
        generated = None
        if self._sc_c != SecureChannel.NOSC:
            assert self._c2 is not None
            try:
                generated = self._install_generated(
                    self._hash_fn, self._session_key, self._c1, self._c2
                )
            except ValueError:
                return self._fail(FailureReason.CONCAT_MISMATCH)
        self._state = "done"
        event = Authenticated(self._hash_fn, self._group, self._bidirectional, generated)
        return Output(send, [event])

    def teardown(self) -> None:
        """Forget the connection's generated key (revoking it in the store)."""
        if self.tls_key and self.tls_key.serial is not None and self.psk_store:
            self.psk_store.revoke(self.tls_key.serial)
        self.tls_key = None


class DhchapController(_Base):
    """The controller side of DH-HMAC-CHAP on one queue (admin queue for concatenation).

    Feed each message received via Authentication Send to :meth:`receive`; the returned
    message is what the next Authentication Receive hands to the host. ``tls_key`` is the
    connection's current TLS key (``has_tls_key=True`` stands for a configured one).
    """

    def __init__(
        self,
        subsysnqn: str,
        hostnqn: str,
        host_secret: DhchapSecret,
        ctrl_secret: DhchapSecret | None = None,
        *,
        hash_ids: Sequence[int] = (1, 2, 3),
        dh_groups: Sequence[int] = (0, 1, 2, 3, 4, 5),
        has_tls_key: bool = False,
        psk_store: PskStore | None = None,
    ) -> None:
        super().__init__(hostnqn, subsysnqn, psk_store)
        self.host_secret = host_secret
        self.ctrl_secret = ctrl_secret
        self.hash_ids = tuple(hash_ids)
        self.dh_groups = tuple(dh_groups)
        self._configured_key = has_tls_key
        self._state = "negotiate"
        self._t_id = 0
        self.authenticated = False

    @property
    def has_tls_key(self) -> bool:
        return self._configured_key or self.tls_key is not None

    def _fail(self, reason: FailureReason) -> Output:
        """Failure1 to the host; failures drop the connection's TLS key."""
        self._state = "negotiate"
        self.authenticated = False
        self._clear_key()
        return Output(Failure(self._t_id, reason, from_controller=True), [Failed(reason, True)])

    def _clear_key(self) -> None:
        if self.tls_key and self.tls_key.serial is not None and self.psk_store:
            self.psk_store.revoke(self.tls_key.serial)
        self.tls_key = None
        self._configured_key = False

    def teardown(self) -> None:
        """The queue goes away: drop its TLS key."""
        self._clear_key()
        self.authenticated = False
        self._state = "negotiate"

    def receive(self, message: Message) -> Output:
        if isinstance(message, Negotiate):
            return self._on_negotiate(message)
        if isinstance(message, Failure) and not message.from_controller:
            self._state = "negotiate"
            self.authenticated = False
            self._clear_key()
            return Output(None, [Failed(_reason(message.explanation), False)])
        if getattr(message, "t_id", None) != self._t_id:
            return self._fail(FailureReason.INCORRECT_PAYLOAD)
        if self._state == "reply" and isinstance(message, Reply):
            return self._on_reply(message)
        if self._state == "success2" and isinstance(message, Success2):
            return self._on_success2()
        return self._fail(FailureReason.INCORRECT_MESSAGE)

    def _on_negotiate(self, msg: Negotiate) -> Output:
        self._t_id = msg.t_id
        self._sc_c = msg.sc_c
        if msg.sc_c != SecureChannel.NOSC:
            if msg.sc_c == SecureChannel.NEWTLSPSK and self.has_tls_key:
                return self._fail(FailureReason.CONCAT_MISMATCH)
            if msg.sc_c == SecureChannel.REPLACETLSPSK and not self.has_tls_key:
                return self._fail(FailureReason.CONCAT_MISMATCH)
            if msg.sc_c not in (SecureChannel.NEWTLSPSK, SecureChannel.REPLACETLSPSK):
                return self._fail(FailureReason.CONCAT_MISMATCH)
        hash_id = next((h for h in self.hash_ids if h in msg.hash_ids), None)
        if hash_id is None:
            return self._fail(FailureReason.HASH_UNUSABLE)
        offered = [g for g in self.dh_groups if g in msg.dh_groups]
        if msg.sc_c != SecureChannel.NOSC:
            offered = [g for g in offered if g != DhGroup.NULL]
            if not offered:
                return self._fail(FailureReason.CONCAT_MISMATCH)
        if not offered:
            return self._fail(FailureReason.DHGROUP_UNUSABLE)
        self._hash_fn = HashFunction(hash_id)
        self._group = DhGroup(offered[0])
        self._s1 = _seqnum()
        self._c1 = os.urandom(self._hash_fn.length)
        self._exchange = _DhExchange(self._group) if self._group is not DhGroup.NULL else None
        value = self._exchange.public_value if self._exchange else b""
        self._state = "reply"
        return Output(Challenge(self._t_id, hash_id, self._group, self._s1, self._c1, value))

    def _on_reply(self, msg: Reply) -> Output:
        hl = self._hash_fn.length
        if len(msg.response) != hl:
            return self._fail(FailureReason.INCORRECT_PAYLOAD)
        session_key = b""
        c1 = self._c1
        if self._exchange is not None:
            try:
                session_key = self._exchange.session_key(msg.dh_value)
            except ValueError:
                return self._fail(FailureReason.DHGROUP_UNUSABLE)
            c1 = augmented_challenge(self._hash_fn, session_key, c1)
        elif msg.dh_value:
            return self._fail(FailureReason.INCORRECT_PAYLOAD)
        expected = host_response(
            self._hash_fn,
            self.host_secret.transform(self.hostnqn),
            c1,
            self._s1,
            self._t_id,
            self._sc_c,
            self.hostnqn,
            self.subsysnqn,
        )
        if not hmac.compare_digest(expected, msg.response):
            return self._fail(FailureReason.FAILED)
        concat = self._sc_c != SecureChannel.NOSC
        if concat and msg.challenge is None:
            return self._fail(FailureReason.FAILED)
        if msg.seqnum == 0 or msg.challenge is None:
            # Unidirectional (or concatenation, which never authenticates the controller):
            # the host is authenticated now and Success1 carries no response.
            generated = None
            if concat:
                assert msg.challenge is not None
                try:
                    generated = self._install_generated(
                        self._hash_fn, session_key, self._c1, msg.challenge
                    )
                except ValueError:
                    return self._fail(FailureReason.CONCAT_MISMATCH)
            self.authenticated = True
            self._state = "negotiate"
            return Output(
                Success1(self._t_id, hl, None),
                [Authenticated(self._hash_fn, self._group, False, generated)],
            )
        if self.ctrl_secret is None:
            return self._fail(FailureReason.FAILED)
        c2 = msg.challenge
        if self._exchange is not None:
            c2 = augmented_challenge(self._hash_fn, session_key, c2)
        r2 = controller_response(
            self._hash_fn,
            self.ctrl_secret.transform(self.subsysnqn),
            c2,
            msg.seqnum,
            self._t_id,
            self.hostnqn,
            self.subsysnqn,
        )
        self._state = "success2"
        return Output(Success1(self._t_id, hl, r2))

    def _on_success2(self) -> Output:
        self.authenticated = True
        self._state = "negotiate"
        return Output(None, [Authenticated(self._hash_fn, self._group, True, None)])
