"""DH-HMAC-CHAP: secrets, RFC 7919 groups, message layouts, host <-> controller runs."""

from __future__ import annotations

import errno
import hashlib
import hmac
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_parameters
from hypothesis import given
from hypothesis import strategies as st

from ktlsd import keyring
from ktlsd.nvme import keys as nvme_keys
from ktlsd.nvme.dhchap import Authenticated, DhchapController, DhchapHost, Failed
from ktlsd.nvme.dhchap_crypto import (
    DhchapSecret,
    DhGroup,
    HashFunction,
    KeyringPskStore,
    augmented_challenge,
    derive_generated_tls_key,
    ffdhe_prime,
)
from ktlsd.nvme.dhchap_messages import (
    Challenge,
    Failure,
    FailureReason,
    MessageError,
    Negotiate,
    Reply,
    SecureChannel,
    Success1,
    Success2,
    decode_message,
)

HOSTNQN = "nqn.2014-08.org.nvmexpress:uuid:0f7a54c4-4ab4-4a3c-9f3e-1a0cf2b7c001"
SUBSYSNQN = "nqn.2026-01.io.ktlsd:subsys1"

# SHA-256 of each prime's upper-case hex, taken from OpenSSL 3.0's built-in ffdhe groups.
FFDHE_SHA256 = {
    DhGroup.FFDHE2048: "c95b44c4ecbac608a36b76f87272a2d54f8ff5d0b440bf461dac0612c4ae48af",
    DhGroup.FFDHE3072: "0222522aef2c6e5df477186eab4295d782649cb98b0cccdee596a22438dab97a",
    DhGroup.FFDHE4096: "8c770ab0061d5af2efc079f735c71c1b5ccfbfba331a1ecbbfed8958ec98cfd1",
    DhGroup.FFDHE6144: "649060de9f7c56b19cb4388bf64b0502469858bf0eaa3e055d1bc4151f574504",
    DhGroup.FFDHE8192: "d5fd376dd0099b81d41350ce4ad6578e02d15bd553c56d36bc789c80368ddad5",
}


# ----------------------------------------------------------------------------- groups


@pytest.mark.parametrize("group", list(FFDHE_SHA256))
def test_ffdhe_prime(group: DhGroup) -> None:
    p = ffdhe_prime(group)
    assert p.bit_length() == group.bits
    assert hashlib.sha256(format(p, "X").encode()).hexdigest() == FFDHE_SHA256[group]
    # RFC 7919: the top and bottom 64 bits are all ones, and p is a safe prime.
    assert p >> (group.bits - 64) == 2**64 - 1
    assert p & (2**64 - 1) == 2**64 - 1
    q = (p - 1) // 2
    # One Fermat base each keeps the 8192-bit case to a few seconds; OpenSSL's copy and the
    # SHA-256 above pin the exact value anyway.
    assert pow(3, p - 1, p) == 1
    assert pow(2, q - 1, q) == 1


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
@pytest.mark.parametrize("group", list(FFDHE_SHA256))
def test_ffdhe_prime_matches_openssl(group: DhGroup) -> None:
    pem = subprocess.run(
        [
            "openssl",
            "genpkey",
            "-genparam",
            "-algorithm",
            "DH",
            "-pkeyopt",
            f"group:{group.name.lower()}",
        ],
        check=True,
        capture_output=True,
    ).stdout
    numbers = load_pem_parameters(pem).parameter_numbers()
    assert numbers.p == ffdhe_prime(group)
    assert numbers.g == 2


# ---------------------------------------------------------------------------- secrets

KEY32 = bytes.fromhex("5512DBB6737D0106F65975B773DFB011FFC344BCF442E2DD6D8BC4870B5D5B03")


def test_secret_round_trip_and_repr() -> None:
    secret = DhchapSecret(0, KEY32)
    text = secret.format()
    assert text == "DHHC-1:00:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:"
    assert DhchapSecret.parse(text) == secret
    assert KEY32.hex() not in repr(secret).lower()


def test_transform_matches_nvme_cli() -> None:
    # `nvme gen-dhchap-key -s <KEY32> -m 1 -n nqn.host` (nvme-cli 2.3 and 2.16) prints the
    # secret transformed with the NQN.
    transformed = DhchapSecret(1, KEY32).transform("nqn.host")
    assert (
        DhchapSecret(1, transformed).format()
        == "DHHC-1:01:su0Fo4HvTrpQ+/Oju+03XT9EUBNarHzI5o+9IYV/GNi43RAE:"
    )
    assert transformed == hmac.new(KEY32, b"nqn.hostNVMe-over-Fabrics", "sha256").digest()
    assert DhchapSecret(0, KEY32).transform("nqn.host") == KEY32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("DHHC-2:00:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:", "prefix"),
        ("DHHC-1:04:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:", "unknown hash"),
        ("DHHC-1:00:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrY:", "CRC-32"),
        ("DHHC-1:02:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ:", "does not match hash"),
        ("DHHC-1:00:VRLbtnN9AQb2WXW3c9+wEf/DRLz0QuLdbYvEhwtdWwNf9LrZ", "not a DH-HMAC-CHAP"),
        ("DHHC-1:00:%%%%:", "base64"),
    ],
)
def test_bad_secrets(text: str, expected: str) -> None:
    with pytest.raises(nvme_keys.KeyFormatError, match=expected) as info:
        DhchapSecret.parse(text)
    assert "VRLbtnN9" not in str(info.value)


@given(st.sampled_from([(0, 32), (0, 48), (0, 64), (1, 32), (2, 48), (3, 64)]), st.data())
def test_secret_property_round_trip(spec: tuple[int, int], data: st.DataObject) -> None:
    hash_id, length = spec
    key = data.draw(st.binary(min_size=length, max_size=length))
    assert DhchapSecret.parse(DhchapSecret(hash_id, key).format()) == DhchapSecret(hash_id, key)


# --------------------------------------------------------------------------- messages


def test_negotiate_layout() -> None:
    raw = Negotiate(0x1234, SecureChannel.NEWTLSPSK, (1, 2), (0, 1, 5)).encode()
    assert len(raw) == 72
    assert raw[:8] == bytes([0x00, 0x00, 0, 0, 0x34, 0x12, 0x02, 0x01])
    assert raw[8:12] == bytes([0x01, 0x00, 2, 3])  # authid, rsvd, halen, dhlen
    assert raw[12:14] == bytes([1, 2]) and raw[14:42] == bytes(28)
    assert raw[42:45] == bytes([0, 1, 5]) and raw[45:72] == bytes(27)
    assert decode_message(raw) == Negotiate(0x1234, 2, (1, 2), (0, 1, 5))


def test_challenge_layout() -> None:
    msg = Challenge(7, 2, 1, 0xA1B2C3D4, b"c" * 48, b"d" * 256)
    raw = msg.encode()
    assert raw[:16] == bytes([1, 1, 0, 0, 7, 0, 48, 0, 2, 1]) + struct.pack("<HI", 256, 0xA1B2C3D4)
    assert raw[16:64] == b"c" * 48 and raw[64:] == b"d" * 256
    assert decode_message(raw) == msg


def test_reply_layout() -> None:
    msg = Reply(3, b"r" * 32, 0x01020304, b"2" * 32, b"v" * 256)
    raw = msg.encode()
    assert raw[:16] == bytes([1, 2, 0, 0, 3, 0, 32, 0, 1, 0]) + struct.pack("<HI", 256, 0x01020304)
    assert raw[16:48] == b"r" * 32 and raw[48:80] == b"2" * 32 and raw[80:] == b"v" * 256
    assert decode_message(raw) == msg
    plain = Reply(3, b"r" * 32).encode()
    assert len(plain) == 16 + 64 and plain[8] == 0  # C2 slot present but cvalid = 0
    assert decode_message(plain) == Reply(3, b"r" * 32, 0, None, b"")


def test_success_and_failure_layouts() -> None:
    s1 = Success1(9, 64, b"x" * 64).encode()
    assert s1[:16] == bytes([1, 3, 0, 0, 9, 0, 64, 0, 1]) + bytes(7) and s1[16:] == b"x" * 64
    assert decode_message(Success1(9, 32).encode()) == Success1(9, 32, None)
    assert Success2(9).encode() == bytes([1, 4, 0, 0, 9, 0]) + bytes(10)
    f1 = Failure(9, FailureReason.CONCAT_MISMATCH, from_controller=True).encode()
    assert f1 == bytes([0, 0xF1, 0, 0, 9, 0, 1, 3])
    f2 = Failure(9, FailureReason.FAILED, from_controller=False).encode()
    assert f2 == bytes([0, 0xF0, 0, 0, 9, 0, 1, 1])
    assert decode_message(f1) == Failure(9, 3, True, 1)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01",
        b"\x01\x09" + bytes(14),
        b"\x01\x01" + bytes(14)[:-1],
        bytes([1, 1]) + bytes(4) + bytes([32]) + bytes(9),
    ],
)
def test_bad_messages(raw: bytes) -> None:
    with pytest.raises(MessageError):
        decode_message(raw)


# --------------------------------------------------------------------- state machines


def run(host: DhchapHost, ctrl: DhchapController, sc: SecureChannel | None = None):
    """Carry messages (as bytes) between the two sides until neither has anything to send."""
    host_events, ctrl_events = [], []
    message = host.start(sc)
    while message is not None:
        out = ctrl.receive(decode_message(message.encode()))
        ctrl_events += out.events
        if out.send is None:
            break
        back = host.receive(decode_message(out.send.encode()))
        host_events += back.events
        message = back.send
    return host_events, ctrl_events


def secrets_for(hash_fn: HashFunction) -> tuple[DhchapSecret, DhchapSecret]:
    return DhchapSecret.generate(hash_fn.value), DhchapSecret.generate(0, 48)


MATRIX = [(h, g) for h in HashFunction for g in DhGroup]  # every hash x every group


@pytest.mark.parametrize(("hash_fn", "group"), MATRIX)
def test_bidirectional_every_hash_and_group(hash_fn: HashFunction, group: DhGroup) -> None:
    host_secret, ctrl_secret = secrets_for(hash_fn)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, host_secret, ctrl_secret, hash_ids=[hash_fn])
    ctrl = DhchapController(
        SUBSYSNQN, HOSTNQN, host_secret, ctrl_secret, hash_ids=[3, 2, 1], dh_groups=[group]
    )
    host_events, ctrl_events = run(host, ctrl)
    expected = Authenticated(hash_fn, group, True, None)
    assert host_events == [expected]
    assert ctrl_events == [expected]
    assert ctrl.authenticated


def test_unidirectional_has_no_success2() -> None:
    host_secret = DhchapSecret.generate(2)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, host_secret)
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, host_secret, dh_groups=[1])
    negotiate = host.start()
    challenge = ctrl.receive(negotiate).send
    reply = host.receive(challenge).send
    assert isinstance(reply, Reply) and reply.challenge is None and reply.seqnum == 0
    out = ctrl.receive(reply)
    assert isinstance(out.send, Success1) and out.send.response is None
    assert out.events == [Authenticated(HashFunction.SHA256, DhGroup.FFDHE2048, False)]
    final = host.receive(out.send)
    assert final.send is None and isinstance(final.events[0], Authenticated)


def test_wrong_host_secret_fails_on_controller() -> None:
    ctrl_side = DhchapSecret.generate(1)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, DhchapSecret.generate(1))
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, ctrl_side, dh_groups=[1])
    host_events, ctrl_events = run(host, ctrl)
    assert ctrl_events == [Failed(FailureReason.FAILED, detected_locally=True)]
    assert host_events == [Failed(FailureReason.FAILED, detected_locally=False)]
    assert not ctrl.authenticated


def test_wrong_host_nqn_fails() -> None:
    secret = DhchapSecret.generate(3)
    host = DhchapHost(HOSTNQN + "x", SUBSYSNQN, secret)
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, secret)
    _, ctrl_events = run(host, ctrl)
    assert ctrl_events == [Failed(FailureReason.FAILED, True)]


def test_wrong_controller_secret_fails_on_host() -> None:
    host_secret = DhchapSecret.generate(1)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, host_secret, DhchapSecret.generate(1))
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, host_secret, DhchapSecret.generate(1))
    negotiate = host.start()
    reply = host.receive(ctrl.receive(negotiate).send).send
    success1 = ctrl.receive(reply).send
    assert isinstance(success1, Success1) and success1.response is not None
    out = host.receive(success1)
    assert out.send == Failure(negotiate.t_id, FailureReason.FAILED, from_controller=False)
    assert out.events == [Failed(FailureReason.FAILED, True)]
    ctrl_out = ctrl.receive(out.send)
    assert ctrl_out.events == [Failed(FailureReason.FAILED, False)]
    assert not ctrl.authenticated


def test_controller_without_ctrl_secret_refuses_bidirectional() -> None:
    host_secret = DhchapSecret.generate(1)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, host_secret, DhchapSecret.generate(1))
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, host_secret)
    host_events, ctrl_events = run(host, ctrl)
    assert ctrl_events == [Failed(FailureReason.FAILED, True)]
    assert host_events == [Failed(FailureReason.FAILED, False)]


def test_no_common_hash_or_group() -> None:
    secret = DhchapSecret.generate(0)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, secret, hash_ids=[3])
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, secret, hash_ids=[1])
    assert run(host, ctrl)[0] == [Failed(FailureReason.HASH_UNUSABLE, False)]
    host = DhchapHost(HOSTNQN, SUBSYSNQN, secret, dh_groups=[0])
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, secret, dh_groups=[2])
    assert run(host, ctrl)[0] == [Failed(FailureReason.DHGROUP_UNUSABLE, False)]


def test_host_rejects_bad_challenges() -> None:
    secret = DhchapSecret.generate(0)
    cases = [
        (Challenge(0, 1, 0, 1, b"c" * 32, b"x"), FailureReason.INCORRECT_PAYLOAD),
        (Challenge(0, 1, 1, 1, b"c" * 32, b"\x00" * 256), FailureReason.DHGROUP_UNUSABLE),
        (Challenge(0, 1, 1, 1, b"c" * 32, b"\x05" * 10), FailureReason.DHGROUP_UNUSABLE),
        (Challenge(0, 9, 0, 1, b"c" * 32), FailureReason.HASH_UNUSABLE),
        (Challenge(0, 2, 0, 1, b"c" * 32), FailureReason.HASH_UNUSABLE),
        (Challenge(5, 1, 0, 1, b"c" * 32), FailureReason.INCORRECT_MESSAGE),
        (Success2(0), FailureReason.INCORRECT_MESSAGE),
    ]
    for challenge, reason in cases:
        host = DhchapHost(HOSTNQN, SUBSYSNQN, secret)
        t_id = host.start().t_id
        out = host.receive(challenge)
        assert out.send == Failure(t_id, reason, from_controller=False), challenge
        assert out.events == [Failed(reason, True)]


def test_controller_rejects_wrong_transaction_and_order() -> None:
    secret = DhchapSecret.generate(1)
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, secret)
    ctrl.receive(Negotiate(4))
    out = ctrl.receive(Reply(5, b"r" * 32))
    assert out.send == Failure(4, FailureReason.INCORRECT_PAYLOAD, True)
    ctrl.receive(Negotiate(6))
    out = ctrl.receive(Success2(6))
    assert out.send == Failure(6, FailureReason.INCORRECT_MESSAGE, True)


# ------------------------------------------------------ secure channel concatenation


class TrackingStore:
    """A real keyring store that also remembers what it revoked."""

    def __init__(self, ring: int) -> None:
        self.inner = KeyringPskStore(ring, key_type="user")
        self.revoked: list[int] = []

    def store(self, identity: str, tls_psk: bytes) -> int:
        return self.inner.store(identity, tls_psk)

    def revoke(self, serial: int) -> None:
        self.revoked.append(serial)
        self.inner.revoke(serial)


@pytest.mark.parametrize("hash_fn", [HashFunction.SHA256, HashFunction.SHA384])
def test_newtlspsk_then_replacetlspsk_three_times(ring: int, hash_fn: HashFunction) -> None:
    secret = DhchapSecret.generate(hash_fn.value)
    host_store = TrackingStore(ring)
    host = DhchapHost(
        HOSTNQN,
        SUBSYSNQN,
        secret,
        DhchapSecret.generate(1),
        hash_ids=[hash_fn],
        concat=True,
        psk_store=host_store,
    )
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, secret, dh_groups=[1])
    seen: list[bytes] = []
    serials: list[int] = []
    for round_no in range(4):
        expected_sc = SecureChannel.NEWTLSPSK if round_no == 0 else SecureChannel.REPLACETLSPSK
        negotiate = host.start()
        assert negotiate.sc_c == expected_sc
        reply = host.receive(ctrl.receive(negotiate).send).send
        assert isinstance(reply, Reply)
        assert reply.seqnum == 0 and reply.challenge is not None  # random C2, S2 = 0
        ctrl_out = ctrl.receive(reply)
        host_out = host.receive(ctrl_out.send)
        assert host_out.send is None  # no Success2 with concatenation
        (h_event,), (c_event,) = host_out.events, ctrl_out.events
        assert isinstance(h_event, Authenticated) and isinstance(c_event, Authenticated)
        h_psk, c_psk = h_event.generated_psk, c_event.generated_psk
        assert h_psk is not None and c_psk is not None
        assert hmac.compare_digest(h_psk.tls_psk, c_psk.tls_psk)
        assert h_psk.identity == c_psk.identity
        ident = nvme_keys.parse_identity(h_psk.identity)
        assert ident.generated and ident.version == 1 and ident.hash_id == hash_fn.value
        assert (ident.hostnqn, ident.subsysnqn) == (HOSTNQN, SUBSYSNQN)
        assert len(h_psk.tls_psk) == hash_fn.length
        assert h_psk.tls_psk not in seen
        seen.append(h_psk.tls_psk)
        # The controller keeps its key after success, so the next REPLACETLSPSK works.
        assert ctrl.has_tls_key
        # The host's key is in the keyring under the generated identity with a timeout.
        assert h_psk.serial is not None
        assert keyring.read_key(h_psk.serial) == h_psk.tls_psk
        assert keyring.describe_key(h_psk.serial).description == h_psk.identity
        line = next(
            ln
            for ln in Path("/proc/keys").read_text().splitlines()
            if int(ln.split()[0], 16) == h_psk.serial
        )
        assert line.split()[3] in ("1h", "59m")  # the 3600 s timeout the kernel host uses
        serials.append(h_psk.serial)
    assert host_store.revoked == serials[:-1]
    for old in serials[:-1]:
        with pytest.raises(keyring.KeyringError) as info:
            keyring.read_key(old)
        assert info.value.errno == errno.EKEYREVOKED
    host.teardown()
    assert host_store.revoked == serials


def test_replacetlspsk_without_key_is_concat_mismatch() -> None:
    secret = DhchapSecret.generate(1)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, secret, concat=True)
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, secret)
    host_events, ctrl_events = run(host, ctrl, SecureChannel.REPLACETLSPSK)
    assert ctrl_events == [Failed(FailureReason.CONCAT_MISMATCH, True)]
    assert host_events == [Failed(FailureReason.CONCAT_MISMATCH, False)]


def test_newtlspsk_with_key_is_concat_mismatch_and_failure_clears_key() -> None:
    secret = DhchapSecret.generate(1)
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, secret, has_tls_key=True)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, secret, concat=True)
    _, ctrl_events = run(host, ctrl, SecureChannel.NEWTLSPSK)
    assert ctrl_events == [Failed(FailureReason.CONCAT_MISMATCH, True)]
    assert not ctrl.has_tls_key  # failures drop the connection's key


def test_concat_needs_a_dh_group() -> None:
    secret = DhchapSecret.generate(1)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, secret, concat=True)
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, secret, dh_groups=[0])
    _, ctrl_events = run(host, ctrl)
    assert ctrl_events == [Failed(FailureReason.CONCAT_MISMATCH, True)]


def test_concat_with_sha512_fails_cleanly() -> None:
    secret = DhchapSecret.generate(3)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, secret, concat=True, hash_ids=[3])
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, secret)
    _, ctrl_events = run(host, ctrl)
    assert ctrl_events == [Failed(FailureReason.CONCAT_MISMATCH, True)]


def test_controller_teardown_and_later_failure_clear_key(ring: int) -> None:
    secret = DhchapSecret.generate(1)
    store = TrackingStore(ring)
    host = DhchapHost(HOSTNQN, SUBSYSNQN, secret, concat=True)
    ctrl = DhchapController(SUBSYSNQN, HOSTNQN, secret, psk_store=store)
    run(host, ctrl)
    first = ctrl.tls_key
    assert first is not None and first.serial is not None
    # A failed re-authentication (wrong secret) drops and revokes the controller's key.
    bad = DhchapHost(HOSTNQN, SUBSYSNQN, DhchapSecret.generate(1), concat=True)
    run(bad, ctrl, SecureChannel.REPLACETLSPSK)
    assert ctrl.tls_key is None and store.revoked == [first.serial]
    run(DhchapHost(HOSTNQN, SUBSYSNQN, secret, concat=True), ctrl)
    second = ctrl.tls_key
    assert second is not None
    ctrl.teardown()
    assert ctrl.tls_key is None and store.revoked == [first.serial, second.serial]


def test_generated_tls_key_matches_kernel_vector() -> None:
    n = 32
    skey = bytes(ord("A") + i for i in range(n))
    identity, tls_psk = derive_generated_tls_key(
        HashFunction.SHA256,
        skey,
        bytes(range(n)),
        bytes(0xFF - i for i in range(n)),
        "hostnqn",
        "subsysnqn",
    )
    assert identity == "NVMe1G01 hostnqn subsysnqn OldoKuTfKddMuyCznAZojkWD7P4D9/AtzDzLimtOxqI="
    assert tls_psk.hex() == "3c17da628474a04d2247c4cab47968c915388193f7c071bd9489cc3666cd7cc8"


def test_augmented_challenge_definition() -> None:
    ks, c = b"k" * 256, b"c" * 32
    expected = hmac.new(hashlib.sha256(ks).digest(), c, "sha256").digest()
    assert augmented_challenge(HashFunction.SHA256, ks, c) == expected


@given(st.binary(max_size=400))
def test_decoding_garbage_only_raises_message_error(raw: bytes) -> None:
    try:
        decode_message(raw)
    except MessageError as exc:
        assert "\n" not in str(exc)


@given(
    st.binary(min_size=2, max_size=200),
    st.sampled_from([0, 1]),
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 0xF0, 0xF1]),
)
def test_state_machines_survive_arbitrary_messages(
    body: bytes, auth_type: int, auth_id: int
) -> None:
    try:
        message = decode_message(bytes([auth_type, auth_id]) + body)
    except MessageError:
        return
    secret = DhchapSecret(1, bytes(32))
    host = DhchapHost(HOSTNQN, SUBSYSNQN, secret, dh_groups=[0])
    host.start()
    for out in (
        host.receive(message),
        DhchapController(SUBSYSNQN, HOSTNQN, secret, dh_groups=[0]).receive(message),
    ):
        assert out.send is None or isinstance(
            out.send, (Negotiate, Challenge, Reply, Success1, Success2, Failure)
        )
        for event in out.events:
            assert isinstance(event, (Authenticated, Failed))
            assert not isinstance(event, Authenticated)


def test_unknown_failure_code_is_kept() -> None:
    host = DhchapHost(HOSTNQN, SUBSYSNQN, DhchapSecret(1, bytes(32)))
    t_id = host.start().t_id
    out = host.receive(decode_message(bytes([0, 0xF1, 0, 0, t_id, 0, 1, 0x42])))
    assert out.events == [Failed(0x42, False)]


@given(st.binary(min_size=48, max_size=48), st.integers(min_value=0), st.integers(1, 127))
def test_every_corrupted_secret_is_rejected(key: bytes, where: int, flip: int) -> None:
    text = DhchapSecret(2, key).format()
    pos = where % len(text)
    corrupted = text[:pos] + chr(ord(text[pos]) ^ flip) + text[pos + 1 :]
    if corrupted[6:11] == ":00:":  # the one edit that yields another valid secret (hash 00)
        return
    with pytest.raises(nvme_keys.KeyFormatError) as info:
        DhchapSecret.parse(corrupted)
    assert text.split(":")[2] not in str(info.value)
