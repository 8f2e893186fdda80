"""The TLS 1.3 protocol numbers in ktlsd.tls.protocol, checked against RFC 8446 and tlslite-ng."""

from __future__ import annotations

import pytest
from tlslite.constants import AlertDescription as TlsliteAlert
from tlslite.constants import ContentType as TlsliteContentType
from tlslite.constants import HandshakeType as TlsliteHandshakeType

from ktlsd.tls.keyschedule import decode_key_update, encode_key_update
from ktlsd.tls.protocol import (
    KEY_UPDATE_LENGTH,
    MAX_CIPHERTEXT,
    MAX_PLAINTEXT,
    AlertDescription,
    ContentType,
    HandshakeType,
    KeyUpdateRequest,
    alert_name,
)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(ContentType, TlsliteContentType), (AlertDescription, TlsliteAlert)],
)
def test_numbers_agree_with_an_independent_implementation(ours: type, theirs: type) -> None:
    for member in ours:
        assert getattr(theirs, member.name.lower()) == member.value, member


def test_handshake_types_agree_with_tlslite() -> None:
    for member in HandshakeType:
        assert getattr(TlsliteHandshakeType, member.name.lower()) == member.value, member


def test_names_for_messages_and_unknown_values() -> None:
    assert alert_name(AlertDescription.DECODE_ERROR) == "decode_error"
    assert alert_name(255) == "alert 255"
    assert HandshakeType.describe(13) == "CertificateRequest"
    assert HandshakeType.describe(4) == "NewSessionTicket"
    assert HandshakeType.describe(254) == "message_hash"
    assert HandshakeType.describe(3) == "type 3"


def test_sizes_and_key_update_message() -> None:
    assert (MAX_PLAINTEXT, MAX_CIPHERTEXT) == (16384, 16640)
    for request in KeyUpdateRequest:
        message = encode_key_update(request is KeyUpdateRequest.UPDATE_REQUESTED)
        assert message == bytes((24, 0, 0, 1, request.value))
        assert len(message) == KEY_UPDATE_LENGTH
        assert decode_key_update(message) is (request is KeyUpdateRequest.UPDATE_REQUESTED)
