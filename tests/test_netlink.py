"""The handshake family codec against byte vectors written out by hand from the kernel spec."""

from __future__ import annotations

import struct

import pytest

from ktlsd.request import (
    AuthMode,
    HandlerClass,
    HandshakeDone,
    HandshakeRequest,
    KeyUpdateType,
    MessageType,
)
from ktlsd.upcall.netlink import (
    DoneAttr4,
    DoneAttributes,
    decode_accept_reply,
    decode_done,
    decode_ready,
    encode_accept_command,
    encode_accept_reply,
    encode_done,
)
from ktlsd.upcall.nlattr import NetlinkFormatError, decode_genl, encode_genl


def nla(attr_type: int, payload: bytes) -> bytes:
    """An nlattr written out longhand: u16 len, u16 type, payload, zero pad to 4."""
    raw = struct.pack("<HH", 4 + len(payload), attr_type) + payload
    return raw + b"\0" * (-len(raw) % 4)


U32 = lambda v: struct.pack("<I", v)  # noqa: E731
S32 = lambda v: struct.pack("<i", v)  # noqa: E731

# An ACCEPT reply for a PSK client: sockfd 7, clienthello, 5 s, psk, two identities, peername.
ACCEPT_PSK_CLIENT = (
    nla(1, S32(7))
    + nla(3, U32(1))
    + nla(4, U32(5000))
    + nla(5, U32(2))
    + nla(6, U32(0x1234))
    + nla(6, U32(0x5678))
    + nla(8, b"nvme-target.example\0")
)

# An x509 server request with certificate serials nested under attribute 7 (NLA_F_NESTED).
ACCEPT_X509_SERVER = (
    nla(1, S32(9))
    + nla(3, U32(2))
    + nla(5, U32(3))
    + nla(7 | 0x8000, nla(1, S32(0x11)) + nla(2, S32(0x22)))
    + nla(9, U32(0x99))
)


def test_ready_and_accept_command() -> None:
    assert decode_ready(nla(2, U32(1))) is HandlerClass.TLSHD
    assert encode_accept_command() == nla(2, U32(1))
    with pytest.raises(NetlinkFormatError, match="without handler-class"):
        decode_ready(b"")


def test_decode_psk_client_request() -> None:
    req = decode_accept_reply(ACCEPT_PSK_CLIENT)
    assert req.sockfd == 7
    assert req.message_type is MessageType.CLIENTHELLO
    assert req.auth_mode is AuthMode.PSK
    assert req.timeout_ms == 5000
    assert req.peer_identities == (0x1234, 0x5678)
    assert req.peername == "nvme-target.example"
    assert req.certificate == 0 and req.keyring == 0


def test_decode_x509_server_request_with_nested_certificate() -> None:
    req = decode_accept_reply(ACCEPT_X509_SERVER)
    assert req.message_type is MessageType.SERVERHELLO
    assert req.auth_mode is AuthMode.X509
    assert (req.certificate, req.private_key) == (0x11, 0x22)
    assert req.keyring == 0x99
    assert req.effective_timeout_ms == 10_000  # no TIMEOUT attribute: the default


def test_accept_reply_round_trip_with_every_attribute() -> None:
    req = HandshakeRequest(
        sockfd=3, message_type=MessageType.SERVERKEYUPDATE, auth_mode=AuthMode.PSK,
        timeout_ms=1500, peer_identities=(1, 2, 3), certificate=4, private_key=5,
        peername="host", keyring=6, key_update_type=KeyUpdateType.RECEIVED_REQUEST_UPDATE,
        session_id=77,
    )
    assert decode_accept_reply(encode_accept_reply(req)) == req
    assert encode_accept_reply(
        HandshakeRequest(sockfd=7, message_type=MessageType.CLIENTHELLO, auth_mode=AuthMode.PSK,
                         timeout_ms=5000, peer_identities=(0x1234, 0x5678),
                         peername="nvme-target.example")
    ) == ACCEPT_PSK_CLIENT


def test_unknown_attributes_are_ignored_but_bad_lengths_are_not() -> None:
    assert decode_accept_reply(ACCEPT_PSK_CLIENT + nla(42, b"future")).sockfd == 7
    with pytest.raises(NetlinkFormatError, match="sockfd: expected 4 bytes"):
        decode_accept_reply(nla(1, b"\x01\x02"))
    with pytest.raises(NetlinkFormatError, match="bad length"):
        decode_accept_reply(ACCEPT_PSK_CLIENT + struct.pack("<HH", 0xFF, 8) + b"abcd")
    with pytest.raises(NetlinkFormatError, match="without sockfd"):
        decode_accept_reply(nla(3, U32(1)))
    with pytest.raises(NetlinkFormatError, match="auth-mode: unknown value 9"):
        decode_accept_reply(nla(1, S32(1)) + nla(5, U32(9)))
    with pytest.raises(NetlinkFormatError, match="truncated attribute header"):
        decode_accept_reply(ACCEPT_PSK_CLIENT + b"\x08\x00")
    with pytest.raises(NetlinkFormatError, match="more than 5"):
        decode_accept_reply(nla(1, S32(1)) + nla(6, U32(1)) * 6)


def test_done_always_carries_status_and_only_declared_attributes() -> None:
    done = HandshakeDone(status=0, sockfd=7, remote_auth=(0xABC,), session_id=0x55)
    plain = encode_done(done)
    assert plain == nla(1, U32(0)) + nla(2, S32(7)) + nla(3, U32(0xABC))
    with_sid = encode_done(done, DoneAttributes(DoneAttr4.SESSION_ID))
    assert with_sid == plain + nla(4, U32(0x55))
    # A kernel whose attribute 4 is the nfsd "tag" string never gets our u32 session id.
    assert encode_done(done, DoneAttributes(DoneAttr4.TAG)) == plain
    assert decode_done(with_sid, DoneAttributes(DoneAttr4.SESSION_ID)) == done
    assert decode_done(nla(1, U32(13)) + nla(2, S32(7)) + nla(4, b"nfs\0"),
                       DoneAttributes(DoneAttr4.TAG)).extra == {"tag": "nfs"}
    failed = encode_done(HandshakeDone(status=110, sockfd=7))
    assert failed == nla(1, U32(110)) + nla(2, S32(7))
    with pytest.raises(ValueError):
        encode_done(HandshakeDone(status=-5, sockfd=7))


def test_genl_framing() -> None:
    msg = encode_genl(0x1A, 3, nla(1, U32(0)), flags=0x5, seq=9, pid=0)
    assert msg[:20] == struct.pack("<IHHIIBBH", 28, 0x1A, 5, 9, 0, 3, 1, 0)
    parsed = decode_genl(msg)
    assert (parsed.msg_type, parsed.cmd, parsed.seq) == (0x1A, 3, 9)
    assert parsed.attributes() == [(1, U32(0))]
    with pytest.raises(NetlinkFormatError):
        decode_genl(msg[:10])
