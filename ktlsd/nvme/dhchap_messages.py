"""DH-HMAC-CHAP messages: exact byte layouts, encoded and decoded, no state.

One frozen dataclass per message of the NVMe in-band authentication protocol with the
DH-HMAC-CHAP protocol: AUTH_Negotiate (with one DH-HMAC-CHAP protocol descriptor),
DH-HMAC-CHAP_Challenge, _Reply, _Success1, _Success2, and AUTH_Failure1/2, laid out like
``struct nvmf_auth_*`` in the kernel's ``include/linux/nvme.h``. ``encode()`` gives the bytes
an Authentication Send/Receive command carries; :func:`decode_message` picks the class by the
auth_type/auth_id header and raises :class:`MessageError` on unknown, truncated or
inconsistent input. Also the wire's code points: :class:`AuthMessageId`,
:class:`SecureChannel` (SC_C) and :class:`FailureReason`.

Fields are carried as plain ints and bytes and not checked against each other or against a
transaction here; what a message means is the state machines' business
(:mod:`ktlsd.nvme.dhchap`).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "AuthMessageId",
    "Challenge",
    "Failure",
    "FailureReason",
    "Message",
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


class MessageError(ValueError):
    """A message could not be decoded (truncated, wrong type, inconsistent lengths)."""


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
