"""kTLS edge tests: crypto_info byte layouts against the kernel header, and the error paths.

The layout tests compile a small C program against the system's ``<linux/tls.h>`` (when a C
compiler is present) so the sizes, offsets and filled-in bytes come from the real header, not
from our reading of it. This machine has no kTLS: the socket tests check the one-line errors
a kernel without kTLS produces; on a kTLS kernel (the VM) they check that the calls work.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from ktlsd.tls import ktls
from ktlsd.tls.keyschedule import traffic_keys
from ktlsd.tls.protocol import ContentType
from ktlsd.tls.session import CipherSuite

AES128 = CipherSuite.TLS_AES_128_GCM_SHA256
AES256 = CipherSuite.TLS_AES_256_GCM_SHA384
CHACHA = CipherSuite.TLS_CHACHA20_POLY1305_SHA256

KTLS = ktls.probe()


def test_uapi_constants() -> None:
    assert (ktls.SOL_TLS, ktls.TCP_ULP) == (282, 31)
    assert (ktls.TLS_TX, ktls.TLS_RX) == (1, 2)
    assert (ktls.TLS_SET_RECORD_TYPE, ktls.TLS_GET_RECORD_TYPE) == (1, 2)
    assert (ktls.TLS_TX_ZEROCOPY_RO, ktls.TLS_RX_EXPECT_NO_PAD, ktls.TLS_TX_MAX_PAYLOAD_LEN) == (
        3,
        4,
        5,
    )
    assert ktls.TLS_1_3_VERSION == 0x0304
    assert [s.ktls_cipher_type for s in (AES128, AES256, CHACHA)] == [51, 52, 54]


@pytest.mark.parametrize(("cipher_type", "size"), [(51, 40), (52, 56), (54, 56)])
def test_crypto_info_sizes(cipher_type: int, size: int) -> None:
    assert ktls.crypto_info_size(cipher_type) == size
    with pytest.raises(ValueError, match="unsupported kTLS cipher type 53"):
        ktls.crypto_info_size(53)


def test_aes_gcm_128_offsets() -> None:
    key = bytes(range(0x10, 0x20))
    iv = bytes(range(0xA0, 0xAC))
    info = bytes(ktls.crypto_info(AES128, key, iv, 0x0102030405060708))
    assert len(info) == 40
    assert info[0:4] == struct.pack("=HH", 0x0304, 51)
    assert info[4:12] == iv[4:]  # iv: the write IV's last 8 bytes
    assert info[12:28] == key
    assert info[28:32] == iv[:4]  # salt: the write IV's first 4 bytes
    assert info[32:40] == bytes.fromhex("0102030405060708")


def test_aes_gcm_256_offsets() -> None:
    key = os.urandom(32)
    iv = os.urandom(12)
    info = bytes(ktls.crypto_info(AES256, key, iv, 7))
    assert len(info) == 56
    assert info[0:4] == struct.pack("=HH", 0x0304, 52)
    assert info[4:12] == iv[4:]
    assert info[12:44] == key
    assert info[44:48] == iv[:4]
    assert info[48:56] == (7).to_bytes(8, "big")


def test_chacha20_poly1305_offsets() -> None:
    key = os.urandom(32)
    iv = os.urandom(12)
    info = bytes(ktls.crypto_info(CHACHA, key, iv, 2**64 - 1))
    assert len(info) == 56
    assert info[0:4] == struct.pack("=HH", 0x0304, 54)
    assert info[4:16] == iv  # whole write IV, no salt
    assert info[16:48] == key
    assert info[48:56] == b"\xff" * 8


C_PROGRAM = r"""
#include <sys/socket.h>
#include <linux/tls.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

static void hex(const void *p, size_t n) {
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) printf("%02x", b[i]);
    printf("\n");
}

int main(void) {
    unsigned char key[32], iv[12], seq[8];
    for (int i = 0; i < 32; i++) key[i] = (unsigned char)(0x40 + i);
    for (int i = 0; i < 12; i++) iv[i] = (unsigned char)(0x80 + i);
    for (int i = 0; i < 8; i++) seq[i] = (unsigned char)(0x01 + i);

    struct tls12_crypto_info_aes_gcm_128 a = {0};
    a.info.version = TLS_1_3_VERSION; a.info.cipher_type = TLS_CIPHER_AES_GCM_128;
    memcpy(a.salt, iv, 4); memcpy(a.iv, iv + 4, 8); memcpy(a.key, key, 16);
    memcpy(a.rec_seq, seq, 8);
    printf("%zu %zu %zu %zu %zu\n", sizeof a, offsetof(typeof(a), iv),
           offsetof(typeof(a), key), offsetof(typeof(a), salt), offsetof(typeof(a), rec_seq));
    hex(&a, sizeof a);

    struct tls12_crypto_info_aes_gcm_256 b = {0};
    b.info.version = TLS_1_3_VERSION; b.info.cipher_type = TLS_CIPHER_AES_GCM_256;
    memcpy(b.salt, iv, 4); memcpy(b.iv, iv + 4, 8); memcpy(b.key, key, 32);
    memcpy(b.rec_seq, seq, 8);
    printf("%zu %zu %zu %zu %zu\n", sizeof b, offsetof(typeof(b), iv),
           offsetof(typeof(b), key), offsetof(typeof(b), salt), offsetof(typeof(b), rec_seq));
    hex(&b, sizeof b);

    struct tls12_crypto_info_chacha20_poly1305 c = {0};
    c.info.version = TLS_1_3_VERSION; c.info.cipher_type = TLS_CIPHER_CHACHA20_POLY1305;
    memcpy(c.iv, iv, 12); memcpy(c.key, key, 32); memcpy(c.rec_seq, seq, 8);
    printf("%zu %zu %zu %zu %zu\n", sizeof c, offsetof(typeof(c), iv),
           offsetof(typeof(c), key), offsetof(typeof(c), salt), offsetof(typeof(c), rec_seq));
    hex(&c, sizeof c);
    printf("%d %d %d %d %d %d\n", SOL_TLS, TLS_TX, TLS_RX, TLS_SET_RECORD_TYPE,
           TLS_GET_RECORD_TYPE, TLS_RX_EXPECT_NO_PAD);
    return 0;
}
"""


@pytest.mark.skipif(
    shutil.which("cc") is None or not Path("/usr/include/linux/tls.h").exists(),
    reason="needs a C compiler and <linux/tls.h>",
)
def test_layouts_match_the_kernel_header(tmp_path: Path) -> None:
    source = tmp_path / "layout.c"
    source.write_text(C_PROGRAM)
    binary = tmp_path / "layout"
    subprocess.run(["cc", "-std=gnu11", "-o", str(binary), str(source)], check=True)
    lines = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    lines = lines.splitlines()
    key = bytes(range(0x40, 0x60))
    iv = bytes(range(0x80, 0x8C))
    seq = int.from_bytes(bytes(range(1, 9)), "big")
    expected_offsets = {AES128: [40, 4, 12, 28, 32], AES256: [56, 4, 12, 44, 48]}
    expected_offsets[CHACHA] = [56, 4, 16, 48, 48]
    for index, suite in enumerate((AES128, AES256, CHACHA)):
        assert [int(x) for x in lines[2 * index].split()] == expected_offsets[suite]
        ours = ktls.crypto_info(suite, key[: suite.key_length], iv, seq)
        assert bytes(ours).hex() == lines[2 * index + 1], suite
    assert [int(x) for x in lines[6].split()] == [282, 1, 2, 1, 2, 4]


@pytest.mark.parametrize("suite", list(CipherSuite))
def test_parse_round_trip(suite: CipherSuite) -> None:
    keys = traffic_keys(suite, os.urandom(suite.hash_length))
    parsed = ktls.parse_crypto_info(ktls.crypto_info(suite, keys.key, keys.iv, 12345))
    assert parsed.version == 0x0304
    assert parsed.cipher_type == suite.ktls_cipher_type
    assert parsed.suite is suite
    assert parsed.key == keys.key
    assert parsed.iv == keys.iv
    assert parsed.rec_seq == 12345
    text = repr(parsed)
    assert keys.key.hex() not in text and keys.iv.hex() not in text
    assert "rec_seq=12345" in text


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x04", "truncated"),
        (struct.pack("=HH", 0x0304, 53) + bytes(36), "unsupported kTLS cipher type 53"),
        (struct.pack("=HH", 0x0304, 51) + bytes(35), "must be 40 bytes, got 39"),
        (struct.pack("=HH", 0x0304, 54) + bytes(60), "must be 56 bytes, got 64"),
    ],
)
def test_parse_rejects_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ktls.parse_crypto_info(data)


def test_crypto_info_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="key must be 16 bytes"):
        ktls.crypto_info(AES128, bytes(32), bytes(12), 0)
    with pytest.raises(ValueError, match="IV must be 12 bytes"):
        ktls.crypto_info(CHACHA, bytes(32), bytes(8), 0)
    with pytest.raises(ValueError, match="outside"):
        ktls.crypto_info(AES128, bytes(16), bytes(12), 2**64)


@pytest.fixture
def tcp_pair():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


@pytest.mark.skipif(KTLS.ulp, reason="this kernel has kTLS")
def test_attach_without_ktls_is_a_clear_error(tcp_pair) -> None:
    client, _ = tcp_pair
    with pytest.raises(ktls.KtlsError) as info:
        ktls.attach_ulp(client)
    assert info.value.errno in (errno.ENOENT, errno.ENOPROTOOPT)
    assert "kernel has no kTLS (tls module not loaded?)" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(not KTLS.ulp, reason="needs a kernel with kTLS")
def test_attach_and_install_on_a_ktls_kernel(tcp_pair) -> None:
    client, _ = tcp_pair
    ktls.attach_ulp(client)
    secret = os.urandom(32)
    ktls.install_tx_key(client, AES128, secret, seq=5)
    state = ktls.read_key_state(client, ktls.TLS_TX)
    keys = traffic_keys(AES128, secret)
    assert state.key == keys.key and state.iv == keys.iv and state.rec_seq == 5


def test_attach_on_a_unix_socket_is_a_clear_error() -> None:
    a, b = socket.socketpair()
    with a, b, pytest.raises(ktls.KtlsError) as info:
        ktls.attach_ulp(a)
    assert info.value.errno in (errno.EOPNOTSUPP, errno.ENOENT, errno.ENOPROTOOPT)
    assert "\n" not in str(info.value)


def test_install_key_without_ulp_is_a_clear_error(tcp_pair) -> None:
    client, _ = tcp_pair
    secret = os.urandom(32)
    with pytest.raises(ktls.KtlsError) as info:
        ktls.install_tx_key(client, AES128, secret)
    assert info.value.errno == errno.ENOPROTOOPT
    assert "tls ULP not attached" in str(info.value)
    assert secret.hex() not in str(info.value)
    with pytest.raises(ktls.KtlsError, match="TLS_RX"):
        ktls.install_rx_key(client, AES128, secret)


def test_read_key_state_without_ulp(tcp_pair) -> None:
    client, _ = tcp_pair
    with pytest.raises(ktls.KtlsError, match="cannot read TLS_RX"):
        ktls.read_key_state(client, ktls.TLS_RX)
    with pytest.raises(ValueError, match="direction"):
        ktls.read_key_state(client, 3)


def test_read_tls_stat_parses_counters(tmp_path: Path) -> None:
    stat = tmp_path / "tls_stat"
    stat.write_text(
        "TlsCurrTxSw                     \t2\nTlsCurrRxSw                     \t1\n"
        "TlsTxRekeyOk                    \t7\nTlsRxRekeyReceived              \t3\n"
    )
    counters = ktls.read_tls_stat(str(stat))
    assert counters == {
        "TlsCurrTxSw": 2,
        "TlsCurrRxSw": 1,
        "TlsTxRekeyOk": 7,
        "TlsRxRekeyReceived": 3,
    }
    with pytest.raises(ktls.KtlsError, match=r"no .*nonexistent") as info:
        ktls.read_tls_stat(str(tmp_path / "nonexistent"))
    assert info.value.errno == errno.ENOENT


def test_probe_reports_each_missing_feature_in_one_line() -> None:
    support = ktls.probe()
    assert support.usable == support.ulp
    for feature, flag in (("ulp", support.ulp), ("rekey", support.rekey)):
        assert (feature in support.reasons) == (not flag)
    for why in support.reasons.values():
        assert why and "\n" not in why
    if not support.ulp:
        assert "no kTLS" in support.reasons["ulp"]
        assert not support.rekey
    assert "\n" not in support.reason
    assert ktls.cached_probe(refresh=True) == support


def test_send_and_recv_record_application_data_path(tcp_pair) -> None:
    client, server = tcp_pair
    ktls.send_record(client, ContentType.APPLICATION_DATA, b"hello")
    assert ktls.recv_record(server, 100) == (23, b"hello")
    client.shutdown(socket.SHUT_WR)
    assert ktls.recv_record(server, 100) == (23, b"")
    with pytest.raises(ValueError, match="content type"):
        ktls.send_record(client, 0, b"x")


@pytest.mark.parametrize(
    ("err", "text"),
    [
        (errno.EKEYEXPIRED, "install the next receive key"),
        (errno.EBADMSG, "failed authentication"),
        (errno.EMSGSIZE, "record_overflow"),
        (errno.EIO, "kTLS receive failed"),
    ],
)
def test_receive_errors_keep_errno_and_explain(err: int, text: str) -> None:
    mapped = ktls._io_error(OSError(err, os.strerror(err)), "receive")
    assert mapped.errno == err
    assert text in str(mapped)
    assert "\n" not in str(mapped)
