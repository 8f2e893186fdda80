"""ktlsd.nvme.keys against the upstream vectors (libnvme test/psk.c, kernel KUnit nvme-auth)."""

from __future__ import annotations

import base64
import hmac
import struct
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ktlsd.nvme import keys

# libnvme test/psk.c
CONFIGURED_32 = bytes.fromhex("5512DBB6737D0106F65975B773DFB011FFC344BCF442E2DD6D8BC4870B5D5B03")
CONFIGURED_48 = CONFIGURED_32 + bytes.fromhex("FFC344BCF442E2DD6D8BC4870B5D5B03")
HOST, SUBSYS = "nqn.psk-test-host", "nqn.psk-test-subsys"

EXPORTED = [
    (CONFIGURED_32, 0, "NVMeTLSkey-1:00:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:"),
    (CONFIGURED_32, 1, "NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:"),
    (
        CONFIGURED_48,
        2,
        "NVMeTLSkey-1:02:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwP/w0S89ELi3W2LxIcLXVsDn8kXZQ==:",
    ),
]

IDENTITIES = [
    (
        CONFIGURED_32,
        1,
        keys.Variant.SPEC,
        "NVMe1R01 nqn.psk-test-host nqn.psk-test-subsys "
        "iSbjiStwJ/1TrTvDlt2fjFmzvsytOJelidNnA+X5lEU=",
    ),
    (
        CONFIGURED_48,
        2,
        keys.Variant.SPEC,
        "NVMe1R02 nqn.psk-test-host nqn.psk-test-subsys "
        "QhW2+Rp6RzHlNtCslyRxMnwJ11tKKhz8JCAQpQ+XUD8f9td1VeH5h53yz2wKJG1a",
    ),
    (
        CONFIGURED_32,
        1,
        keys.Variant.COMPAT,
        "NVMe1R01 nqn.psk-test-host nqn.psk-test-subsys "
        "66GuqV08TsAGII39teWUfwQwizjv06Jy8jOcX3NAAzM=",
    ),
    (
        CONFIGURED_48,
        2,
        keys.Variant.COMPAT,
        "NVMe1R02 nqn.psk-test-host nqn.psk-test-subsys "
        "RsKmYJ3nAn1ApjjMloJFbAkLPivONDAX/xW327YBUsn2eGShXSjCZvBaOxscLqmz",
    ),
]

# Linux drivers/nvme/common/tests/auth_kunit.c: skey = 'A'.., c1 = 0.., c2 = 0xff..
KUNIT = [
    (
        keys.HashId.SHA256,
        "1733c59fa7f48fcf37f5f26fc4ff0268ad4f78e030f4f3b0bfd1d47e7bb1447a",
        "OldoKuTfKddMuyCznAZojkWD7P4D9/AtzDzLimtOxqI=",
        "3c17da628474a04d2247c4cab47968c915388193f7c071bd9489cc3666cd7cc8",
    ),
    (
        keys.HashId.SHA384,
        "f14b2dd3234c459694d3bc63f8968bd6b37c2c6de849e22e118749001ce4bbe8"
        "640b9e3a748cb11ce4b1d71d359cce39",
        "cffMWk8TSS7HOQebjgYEIkrPrjWPV4JE5cdPB8WhEvY4JBW5YynKyv66XscN4A9n",
        "2774753233537b3fa50eb7d16a8e43457d85f4906c005b2236616c5d80939d08"
        "98fff15bb8b77119d2be0aac423e7590",
    ),
]


@pytest.mark.parametrize(("key", "hash_id", "text"), EXPORTED)
def test_interchange_vectors(key: bytes, hash_id: int, text: str) -> None:
    assert keys.format_interchange(key, hash_id) == text
    parsed = keys.parse_interchange(text)
    assert parsed.hash_id == hash_id
    assert hmac.compare_digest(parsed.key, key)


def test_default_hash_follows_key_length() -> None:
    assert keys.format_interchange(CONFIGURED_32).startswith("NVMeTLSkey-1:01:")
    assert keys.format_interchange(CONFIGURED_48).startswith("NVMeTLSkey-1:02:")


@pytest.mark.parametrize(("key", "hash_id", "variant", "identity"), IDENTITIES)
def test_identity_vectors(key: bytes, hash_id: int, variant: keys.Variant, identity: str) -> None:
    derived = keys.derive_nvme_tls_key(key, hash_id, HOST, SUBSYS, 1, variant)
    assert str(derived.identity) == identity
    assert keys.parse_identity(identity) == derived.identity


def test_spec_and_compat_tls_psks_differ() -> None:
    spec = keys.derive_nvme_tls_key(CONFIGURED_32, 1, HOST, SUBSYS, 0, keys.Variant.SPEC)
    compat = keys.derive_nvme_tls_key(CONFIGURED_32, 1, HOST, SUBSYS, 0, keys.Variant.COMPAT)
    assert str(spec.identity) == str(compat.identity) == f"NVMe0R01 {HOST} {SUBSYS}"
    assert spec.tls_psk != compat.tls_psk
    assert len(spec.tls_psk) == 32


@pytest.mark.parametrize(("hash_id", "psk_hex", "digest", "tls_hex"), KUNIT)
def test_kernel_kunit_generated_psk(
    hash_id: keys.HashId, psk_hex: str, digest: str, tls_hex: str
) -> None:
    n = hash_id.length
    skey = bytes(ord("A") + i for i in range(n))
    c1 = bytes(range(n))
    c2 = bytes(0xFF - i for i in range(n))
    psk = hmac.new(skey, c1 + c2, hash_id.hash_name).digest()
    assert psk.hex() == psk_hex
    assert keys.psk_digest(psk, hash_id, "hostnqn", "subsysnqn") == digest
    assert keys.derive_tls_psk(psk, hash_id, digest, version=1).hex() == tls_hex


def test_hkdf_expand_label_matches_rfc8448() -> None:
    # RFC 8448 simple 1-RTT: client_handshake_traffic_secret -> client write key.
    secret = bytes.fromhex("b3eddb126e067f35a780b3abf45e2d8f3b1a950738f52e9600746a0e27a55a21")
    key = keys.hkdf_expand_label(keys.HashId.SHA256, secret, "key", b"", 16)
    assert key.hex() == "dbfaa693d1762c5b666af5d950258d01"


def test_hash_none_uses_configured_key_and_key_length_hash() -> None:
    derived = keys.derive_nvme_tls_key(CONFIGURED_48, 0, HOST, SUBSYS, 1)
    assert str(derived.identity).startswith("NVMe1R02 ")
    digest = keys.psk_digest(CONFIGURED_48, 2, HOST, SUBSYS)
    assert derived.identity.digest == digest
    assert len(digest) == 64


def test_repr_hides_keys() -> None:
    parsed = keys.parse_interchange(EXPORTED[0][2])
    derived = keys.derive_nvme_tls_key(CONFIGURED_32, 1, HOST, SUBSYS)
    for text in (repr(parsed), repr(derived)):
        assert CONFIGURED_32.hex() not in text.lower()
        assert "bytes>" in text


BAD = [
    ("", "not a PSK interchange string"),
    ("NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ", "not a PSK interchange"),
    ("NVMeTLSkey-2:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:", "prefix"),
    ("NVMeTLSkey-1:03:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:", "unknown hash"),
    ("NVMeTLSkey-1:1:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:", "hash field"),
    ("NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9Lr!:", "base64"),
    ("NVMeTLSkey-1:01:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrY:", "CRC-32"),
    ("NVMeTLSkey-1:02:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:", "does not match hash"),
    ("NVMeTLSkey-1:01:AAAA:", "decodes to 3 bytes"),
]


@pytest.mark.parametrize(("text", "expected"), BAD)
def test_bad_interchange_strings(text: str, expected: str) -> None:
    with pytest.raises(keys.KeyFormatError) as info:
        keys.parse_interchange(text)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    blob = text.split(":")[2] if text.count(":") >= 2 else ""
    assert not blob or blob not in message


@given(st.sampled_from([0, 1, 2]), st.data())
def test_format_parse_round_trip(hash_id: int, data: st.DataObject) -> None:
    lengths = {0: [32, 48], 1: [32], 2: [48]}[hash_id]
    length = data.draw(st.sampled_from(lengths))
    key = data.draw(st.binary(min_size=length, max_size=length))
    text = keys.format_interchange(key, hash_id)
    parsed = keys.parse_interchange(text)
    assert parsed.hash_id == hash_id
    assert parsed.key == key


@given(
    st.binary(min_size=32, max_size=32),
    st.integers(min_value=0),
    st.integers(min_value=1, max_value=255),
)
def test_every_corruption_is_rejected(key: bytes, where: int, flip: int) -> None:
    text = keys.format_interchange(key, 1)
    pos = where % len(text)
    corrupted = text[:pos] + chr((ord(text[pos]) ^ flip) % 0x110000 or 1) + text[pos + 1 :]
    if corrupted == text or corrupted[12:16] == ":00:":
        return  # unchanged, or the one edit that yields another valid string (hash 00)
    with pytest.raises(keys.KeyFormatError) as info:
        keys.parse_interchange(corrupted)
    assert "\n" not in str(info.value)
    assert text.split(":")[2] not in str(info.value)


@given(st.binary(min_size=32, max_size=32), st.integers(min_value=0, max_value=35))
def test_single_byte_change_in_payload_fails_crc(key: bytes, index: int) -> None:
    raw = bytearray(key + struct.pack("<I", zlib.crc32(key)))
    raw[index] ^= 0x01
    text = f"NVMeTLSkey-1:01:{base64.b64encode(bytes(raw)).decode()}:"
    with pytest.raises(keys.KeyFormatError, match="CRC-32 mismatch"):
        keys.parse_interchange(text)


def test_parse_identity_rejects_garbage() -> None:
    for text in ("", "NVMe2R01 a b", "NVMe1X01 a b c", "NVMe1R01 a b", "NVMe0R00 a b"):
        with pytest.raises(keys.KeyFormatError):
            keys.parse_identity(text)
    ident = keys.parse_identity("NVMe1G02 host subsys digest")
    assert ident.generated and ident.hash_id is keys.HashId.SHA384
    assert str(ident) == "NVMe1G02 host subsys digest"


def test_psk_lookup_prefixes_follow_kernel_priority() -> None:
    prefixes = keys.psk_lookup_prefixes("h", "s")
    assert prefixes == [
        "NVMe1R02 h s",
        "NVMe1R01 h s",
        "NVMe0R02 h s",
        "NVMe0R01 h s",
        "NVMe1G02 h s",
        "NVMe1G01 h s",
        "NVMe0G02 h s",
        "NVMe0G01 h s",
    ]
    derived = keys.derive_nvme_tls_key(CONFIGURED_32, 1, "h", "s", 1)
    assert str(derived.identity).startswith(prefixes[1])
