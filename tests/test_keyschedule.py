"""Key schedule tests against RFC 8448 §3 (Simple 1-RTT Handshake) and tlslite-ng.

The vectors below were typed in from RFC 8448; every one is an AES-128-GCM/SHA-256 value.
SHA-384 has no RFC 8448 trace, so it is cross-checked against tlslite-ng's independent
HKDF-Expand-Label.
"""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tlslite.utils.cryptomath import HKDF_expand_label as tlslite_expand_label

from ktlsd.tls.keyschedule import (
    TrafficKeys,
    decode_key_update,
    encode_key_update,
    hkdf_expand_label,
    next_traffic_secret,
    record_nonce,
    traffic_keys,
)
from ktlsd.tls.session import CipherSuite


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


# RFC 8448 §3, {server} extract secret "handshake" and the ServerHello transcript hash.
HANDSHAKE_SECRET = h("1dc826e93606aa6fdc0aadc12f741b01046aa6b99f691ed221a9f0ca043fbeac")
HELLO_HASH = h("860c06edc07858ee8e78f0e7428c58edd6b43f2ca3e6e95f02ed063cf0e1cad8")
C_HS_TRAFFIC = h("b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21")
S_HS_TRAFFIC = h("b67b7d690cc16c4e75e54213cb2d37b4e9c912bcded9105d42befd59d391ad38")
# {server} extract secret "master" and the transcript hash through server Finished.
MASTER_SECRET = h("18df06843d13a08bf2a449844c5f8a478001bc4d4c627984d5a41da8d0402919")
FINISHED_HASH = h("9608102a0f1ccc6db6250b7b7e417b1a000eaada3daae4777a7686c9ff83df13")
C_AP_TRAFFIC = h("9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5")
S_AP_TRAFFIC = h("a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643")

KEY_VECTORS = [
    # (secret, write key, write iv)
    (S_HS_TRAFFIC, h("3fce516009c21727d0f2e4e86ee403bc"), h("5d 31 3e b2 67 12 76 ee 13 00 0b 30")),
    (C_HS_TRAFFIC, h("dbfaa693d1762c5b666af5d950258d01"), h("5b d3 c7 1b 83 6e 0b 76 bb 73 26 5f")),
    (S_AP_TRAFFIC, h("9f02283b6c9c07efc26bb9f2ac92e356"), h("cf 78 2b 88 dd 83 54 9a ad f1 e9 84")),
    (C_AP_TRAFFIC, h("17422dda596ed5d9acd890e3c63f5051"), h("5b 78 92 3d ee 08 57 90 33 e5 23 d9")),
]  # fmt: skip

# RFC 8448 §3 {client} send application_data record (client application key, seq 0).
CLIENT_APP_RECORD = h(
    "17 03 03 00 43 a2 3f 70 54 b6 2c 94 d0 af fa fe 82 28 ba 55 cb ef ac ea 42 f9 14 aa 66 bc"
    "ab 3f 2b 98 19 a8 a5 b4 6b 39 5b d5 4a 9a 20 44 1e 2b 62 97 4e 1f 5a 62 92 a2 97 70 14 bd"
    "1e 3d ea e6 3a ee bb 21 69 49 15 e4"
)

AES128 = CipherSuite.TLS_AES_128_GCM_SHA256
AES256 = CipherSuite.TLS_AES_256_GCM_SHA384
CHACHA = CipherSuite.TLS_CHACHA20_POLY1305_SHA256


@pytest.mark.parametrize(
    ("label", "expected"),
    [(b"c hs traffic", C_HS_TRAFFIC), (b"s hs traffic", S_HS_TRAFFIC)],
)
def test_derive_handshake_traffic_secrets(label: bytes, expected: bytes) -> None:
    assert hkdf_expand_label("sha256", HANDSHAKE_SECRET, label, HELLO_HASH, 32) == expected


@pytest.mark.parametrize(
    ("label", "expected"),
    [(b"c ap traffic", C_AP_TRAFFIC), (b"s ap traffic", S_AP_TRAFFIC)],
)
def test_derive_application_traffic_secrets(label: bytes, expected: bytes) -> None:
    assert hkdf_expand_label("sha256", MASTER_SECRET, label, FINISHED_HASH, 32) == expected


@pytest.mark.parametrize(("secret", "key", "iv"), KEY_VECTORS)
def test_traffic_keys_match_rfc8448(secret: bytes, key: bytes, iv: bytes) -> None:
    keys = traffic_keys(AES128, secret)
    assert keys.key == key
    assert keys.iv == iv


def test_rfc8448_client_application_record_seals_with_derived_key_and_nonce() -> None:
    keys = traffic_keys(AES128, C_AP_TRAFFIC)
    inner = bytes(range(0x32)) + b"\x17"
    sealed = AESGCM(keys.key).encrypt(record_nonce(keys.iv, 0), inner, CLIENT_APP_RECORD[:5])
    assert CLIENT_APP_RECORD[:5] + sealed == CLIENT_APP_RECORD


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_next_traffic_secret_matches_tlslite(suite: CipherSuite) -> None:
    secret = os.urandom(suite.hash_length)
    ours = next_traffic_secret(suite, secret)
    theirs = tlslite_expand_label(secret, b"traffic upd", b"", suite.hash_length, suite.hash_name)
    assert ours == bytes(theirs)
    assert len(ours) == suite.hash_length
    assert ours != secret


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_traffic_keys_lengths_and_tlslite_agreement(suite: CipherSuite) -> None:
    secret = os.urandom(suite.hash_length)
    keys = traffic_keys(suite, secret)
    assert len(keys.key) == suite.key_length
    assert len(keys.iv) == 12
    expected_key = tlslite_expand_label(secret, b"key", b"", suite.key_length, suite.hash_name)
    assert keys.key == bytes(expected_key)


def test_sha384_label_derivation_matches_tlslite() -> None:
    secret = os.urandom(48)
    context = os.urandom(48)
    ours = hkdf_expand_label("sha384", secret, b"s ap traffic", context, 48)
    assert ours == bytes(tlslite_expand_label(secret, b"s ap traffic", context, 48, "sha384"))


def test_traffic_keys_repr_hides_material() -> None:
    keys = traffic_keys(AES128, C_AP_TRAFFIC)
    text = repr(keys) + str(keys)
    assert keys.key.hex() not in text
    assert keys.iv.hex() not in text
    assert "16 bytes" in text
    assert isinstance(keys, TrafficKeys)


def test_wrong_secret_length_is_a_one_line_error() -> None:
    with pytest.raises(ValueError, match="must be 48 bytes, got 32") as info:
        traffic_keys(AES256, C_AP_TRAFFIC)
    assert "\n" not in str(info.value)
    assert C_AP_TRAFFIC.hex() not in str(info.value)
    with pytest.raises(ValueError, match="must be 32 bytes"):
        next_traffic_secret(CHACHA, b"\x00" * 48)


def test_unknown_hash_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported hash"):
        hkdf_expand_label("md5", b"x" * 16, b"key", b"", 16)


def test_record_nonce_xors_sequence_into_low_bytes() -> None:
    iv = bytes(range(12))
    assert record_nonce(iv, 0) == iv
    assert record_nonce(iv, 1) == iv[:11] + bytes([iv[11] ^ 1])
    assert record_nonce(iv, 0x0102030405060708) == iv[:4] + bytes(
        a ^ b for a, b in zip(iv[4:], range(1, 9), strict=True)
    )
    assert record_nonce(b"\xff" * 12, 2**64 - 1) == b"\xff" * 4 + b"\x00" * 8
    with pytest.raises(ValueError, match="outside"):
        record_nonce(iv, 2**64)
    with pytest.raises(ValueError, match="outside"):
        record_nonce(iv, -1)


def test_encode_key_update() -> None:
    assert encode_key_update(True) == b"\x18\x00\x00\x01\x01"
    assert encode_key_update(False) == b"\x18\x00\x00\x01\x00"


def test_decode_key_update_round_trip() -> None:
    assert decode_key_update(encode_key_update(True)) is True
    assert decode_key_update(encode_key_update(False)) is False


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (b"", "truncated"),
        (b"\x18\x00\x00", "truncated"),
        (b"\x04\x00\x00\x01\x00", "not a KeyUpdate"),
        (b"\x18\x00\x00\x02\x00\x00", "body must be 1 byte"),
        (b"\x18\x00\x00\x01", "must be 5 bytes"),
        (b"\x18\x00\x00\x01\x00\x00", "must be 5 bytes"),
        (b"\x18\x00\x00\x01\x02", "must be 0 or 1"),
        (b"\x18\x00\x00\x01\xff", "must be 0 or 1"),
    ],
)
def test_decode_key_update_is_strict(msg: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        decode_key_update(msg)
    assert "\n" not in str(info.value)
