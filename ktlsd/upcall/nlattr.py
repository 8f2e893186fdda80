"""Netlink attributes (``struct nlattr``) and generic netlink framing, as pure byte functions.

Both upcall sources speak this encoding: the kernel's ``handshake`` family over
NETLINK_GENERIC, and ktlsd's user-space handshake service over AF_UNIX (which reuses the
same attribute numbers so a request is decoded by one code path).

Layout (``include/uapi/linux/netlink.h``)::

    struct nlmsghdr   { u32 len; u16 type; u16 flags; u32 seq; u32 pid; }
    struct genlmsghdr { u8 cmd; u8 version; u16 reserved; }
    struct nlattr     { u16 nla_len; u16 nla_type; }   payload, padded to 4 bytes

All integers are host byte order (little-endian on the machines we run on; ``struct``'s
``=`` format follows the host). Decoders are strict: a truncated or overlong attribute
raises :class:`NetlinkFormatError` with a one-line message instead of reading past the end.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

NLA_HDRLEN = 4
NLMSG_HDRLEN = 16
GENL_HDRLEN = 4
NLA_F_NESTED = 1 << 15
NLA_F_NET_BYTEORDER = 1 << 14
NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF

_NLMSGHDR = struct.Struct("=IHHII")
_GENLMSGHDR = struct.Struct("=BBH")
_NLATTR = struct.Struct("=HH")


class NetlinkFormatError(ValueError):
    """Malformed netlink bytes."""


def align4(length: int) -> int:
    return (length + 3) & ~3


Attribute = tuple[int, bytes]
"""An attribute as (type without flag bits, payload)."""


def encode_attr(attr_type: int, payload: bytes, *, nested: bool = False) -> bytes:
    length = NLA_HDRLEN + len(payload)
    if length > 0xFFFF:
        raise NetlinkFormatError(f"attribute {attr_type} too long ({len(payload)} bytes)")
    flags = NLA_F_NESTED if nested else 0
    pad = b"\0" * (align4(length) - length)
    return _NLATTR.pack(length, attr_type | flags) + payload + pad


def encode_attrs(attrs: Iterable[Attribute]) -> bytes:
    return b"".join(encode_attr(t, p) for t, p in attrs)


def decode_attrs(data: bytes) -> list[Attribute]:
    """Split a run of attributes; the type is returned without the NESTED/BYTEORDER flags."""
    out: list[Attribute] = []
    offset = 0
    view = memoryview(data)
    while offset < len(data):
        if len(data) - offset < NLA_HDRLEN:
            raise NetlinkFormatError(f"truncated attribute header at offset {offset}")
        length, attr_type = _NLATTR.unpack_from(view, offset)
        if length < NLA_HDRLEN or offset + length > len(data):
            raise NetlinkFormatError(
                f"attribute type {attr_type & NLA_TYPE_MASK} at offset {offset} has bad length "
                f"{length} ({len(data) - offset} bytes left)"
            )
        out.append((attr_type & NLA_TYPE_MASK, bytes(view[offset + NLA_HDRLEN : offset + length])))
        offset += align4(length)
    return out


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def s32(value: int) -> bytes:
    return struct.pack("=i", value)


def u16(value: int) -> bytes:
    return struct.pack("=H", value)


def string(value: str) -> bytes:
    """A NUL-terminated string payload (NLA_NUL_STRING / NLA_STRING as the kernel sends them)."""
    return value.encode() + b"\0"


def nested(attrs: Iterable[Attribute]) -> bytes:
    return encode_attrs(attrs)


def as_u32(payload: bytes, name: str = "attribute") -> int:
    if len(payload) != 4:
        raise NetlinkFormatError(f"{name}: expected 4 bytes, got {len(payload)}")
    return int(struct.unpack("=I", payload)[0])


def as_s32(payload: bytes, name: str = "attribute") -> int:
    if len(payload) != 4:
        raise NetlinkFormatError(f"{name}: expected 4 bytes, got {len(payload)}")
    return int(struct.unpack("=i", payload)[0])


def as_u16(payload: bytes, name: str = "attribute") -> int:
    if len(payload) != 2:
        raise NetlinkFormatError(f"{name}: expected 2 bytes, got {len(payload)}")
    return int(struct.unpack("=H", payload)[0])


def as_string(payload: bytes, name: str = "attribute") -> str:
    """Decode a string attribute; a trailing NUL is optional, an embedded one is an error."""
    raw = payload[:-1] if payload.endswith(b"\0") else payload
    if b"\0" in raw:
        raise NetlinkFormatError(f"{name}: embedded NUL in string")
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise NetlinkFormatError(f"{name}: not valid UTF-8") from exc


@dataclass(frozen=True)
class GenlMessage:
    """One generic netlink message, header fields and raw attributes."""

    msg_type: int
    flags: int
    seq: int
    pid: int
    cmd: int
    version: int
    attrs: bytes

    def attributes(self) -> list[Attribute]:
        return decode_attrs(self.attrs)


def encode_genl(
    msg_type: int, cmd: int, attrs: bytes, *, flags: int = 0, seq: int = 0, pid: int = 0,
    version: int = 1,
) -> bytes:
    """Frame ``attrs`` as a complete generic netlink message (nlmsghdr + genlmsghdr)."""
    length = NLMSG_HDRLEN + GENL_HDRLEN + len(attrs)
    return (
        _NLMSGHDR.pack(length, msg_type, flags, seq, pid)
        + _GENLMSGHDR.pack(cmd, version, 0)
        + attrs
    )


def decode_genl(data: bytes) -> GenlMessage:
    """Parse one complete generic netlink message (strict about lengths)."""
    if len(data) < NLMSG_HDRLEN + GENL_HDRLEN:
        raise NetlinkFormatError(f"message too short ({len(data)} bytes)")
    length, msg_type, flags, seq, pid = _NLMSGHDR.unpack_from(data, 0)
    if length < NLMSG_HDRLEN + GENL_HDRLEN or length > len(data):
        raise NetlinkFormatError(f"bad nlmsg_len {length} for {len(data)} bytes")
    cmd, version, _ = _GENLMSGHDR.unpack_from(data, NLMSG_HDRLEN)
    attrs = bytes(data[NLMSG_HDRLEN + GENL_HDRLEN : length])
    return GenlMessage(msg_type, flags, seq, pid, cmd, version, attrs)
