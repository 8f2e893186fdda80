"""The test bed's host-side plumbing, checked without building or booting anything.

These run in the default suite (they are not marked ``vm``): they guard the parts whose
mistakes would otherwise only show up as a confusing failed boot in CI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from testbed import build, guest_runner, run, systemd_run, vm
from testbed.scenarios import common
from testbed.systemd_guest import driver as systemd_driver
from testbed.systemd_guest import names


def fake_image(tmp_path: Path) -> build.GuestImage:
    meta = {"kernel_release": "7.3.4+deb13-amd64", "kernel_package": "linux-image-x",
            "kernel_package_version": "1"}  # fmt: skip
    (tmp_path / "build.json").write_text(json.dumps(meta))
    return build.GuestImage.load(tmp_path)


def test_recipe_hash_is_stable_and_follows_the_mirror(monkeypatch: pytest.MonkeyPatch) -> None:
    first = build.recipe_hash()
    assert first == build.recipe_hash() and len(first) == 16
    monkeypatch.setattr(build, "MIRROR", "http://mirror.example/debian")
    assert build.recipe_hash() != first


def test_cache_dir_honours_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KTLSD_VM_CACHE", str(tmp_path))
    assert build.cache_dir() == tmp_path / build.recipe_hash()


def test_modules_dep_resolution_orders_dependencies_first(tmp_path: Path) -> None:
    moddir = tmp_path / "usr/lib/modules/7.3.4+deb13-amd64"
    moddir.mkdir(parents=True)
    (moddir / "modules.dep").write_text(
        "kernel/fs/ext4/ext4.ko.xz: kernel/fs/jbd2/jbd2.ko.xz kernel/fs/mbcache.ko.xz\n"
        "kernel/fs/jbd2/jbd2.ko.xz:\n"
        "kernel/fs/mbcache.ko.xz:\n"
        "kernel/drivers/block/virtio_blk.ko.xz:\n"
    )
    deps = build._modules_dep(tmp_path, "7.3.4+deb13-amd64")
    assert deps["ext4"] == (
        "kernel/fs/ext4/ext4.ko.xz",
        ["kernel/fs/jbd2/jbd2.ko.xz", "kernel/fs/mbcache.ko.xz"],
    )
    assert deps["virtio_blk"][1] == []


def test_qemu_command_is_snapshot_readonly_share_and_no_network(tmp_path: Path) -> None:
    image = fake_image(tmp_path)
    cmd = vm.qemu_command(image, "tcg", tmp_path / "console.log",
                          project_dir=Path("/src"), results_dir=tmp_path)  # fmt: skip
    text = " ".join(cmd)
    assert "snapshot=on" in text
    assert "path=/src,mount_tag=ktlsd,security_model=none,readonly=on" in text
    assert f"path={tmp_path},mount_tag=results" in text
    assert "tcg,thread=multi" in text and "-nic none" in text
    assert "kvm" not in text
    assert "-cpu host" in " ".join(vm.qemu_command(image, "kvm", tmp_path / "c.log"))


def test_scenario_names_map_to_scripts_and_agents() -> None:
    script, env = guest_runner.resolve("nvme-tls-ktlsd")
    assert script.name == "nvme_tls.py" and env == {"AGENT": "ktlsd"}
    script, env = guest_runner.resolve("kernel-facts")
    assert script.name == "kernel_facts.py" and env == {}
    with pytest.raises(FileNotFoundError):
        guest_runner.resolve("nvme-tls-openssl")
    assert all(run.scenario_exists(n) for n in run.default_scenarios())
    with pytest.raises(ValueError, match="unknown scenario"):
        run.run(["no-such-scenario"])


def test_debian_versions_compare_by_their_upstream_numbers() -> None:
    """The sid chroot's GnuTLS is judged >= 3.8.11 from its Debian version."""
    assert build._version_tuple("3.8.13-1") == (3, 8, 13)
    assert build._version_tuple("3.8.9-3+deb13u4") == (3, 8, 9)
    assert build._version_tuple("1:3.8.11~rc1-1") == (3, 8, 11)
    assert build._version_tuple("3.8.9-3+deb13u4") < build.SID_MIN_GNUTLS
    assert build._version_tuple("3.8.11-1") >= build.SID_MIN_GNUTLS


def test_sid_tlshd_agent_runs_in_the_chroot_with_a_chroot_relative_config() -> None:
    conf = Path(common.SID_TLSHD_ROOT) / "etc/tlshd/x.conf"
    argv = common.agent_command("tlshd-sid", conf)
    assert argv == ["chroot", common.SID_TLSHD_ROOT, "/usr/sbin/tlshd", "-s", "-c",
                    "/etc/tlshd/x.conf"]  # fmt: skip
    with pytest.raises(ValueError):  # a config outside the chroot cannot be read by it
        common.agent_command("tlshd-sid", Path("/tmp/x.conf"))
    assert "fleet-newtlshd" in run.default_scenarios()
    assert "fleet-newtlshd-nfs" in run.default_scenarios()


def test_compare_agents_pairs_timing_figures() -> None:
    per = [
        {"name": "nvme-tls-tlshd", "figures": {"connect_seconds_sha256": 0.4, "bytes": 1,
                                               "scenario_seconds": 9}},
        {"name": "nvme-tls-ktlsd", "figures": {"connect_seconds_sha256": 0.5}},
        {"name": "kernel-facts", "figures": {"x_seconds": 1}},
    ]  # fmt: skip
    assert run.compare_agents(per) == {
        "nvme-tls:connect_seconds_sha256": {"tlshd": 0.4, "ktlsd": 0.5}
    }


def test_format_report_shows_failure_reasons_and_console() -> None:
    report = {
        "kernel": "7.3.4", "kernel_package": "p 1", "accel": "tcg", "build_seconds": 0,
        "boot_seconds": 8, "qemu_seconds": 20, "wall_seconds": 21, "passed": False,
        "guest_problem": None, "boots": [], "comparison": {},
        "scenarios": [{"name": "nfs-tls-ktlsd", "passed": False, "seconds": 3,
                       "figures": {}, "details": ["FAILED: mount refused"],
                       "log_tail": "mount.nfs: Operation not permitted",
                       "console_tail": "KTLSD-GUEST-DONE rc=1"}],
    }  # fmt: skip
    text = run.format_report(report)
    assert "FAIL nfs-tls-ktlsd" in text
    assert "! FAILED: mount refused" in text
    assert "Operation not permitted" in text and "KTLSD-GUEST-DONE" in text


def test_netlink_group_membership_parser(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    table = tmp_path / "netlink"
    table.write_text(
        "sk               Eth Pid        Groups   Rmem     Wmem     Dump  Locks    Drops    Inode\n"
        "ffff000000000001 16  100        00004000 0        0        0     2        0        11\n"
        "ffff000000000002 16  101        00000000 0        0        0     2        0        12\n"
        "ffff000000000003 0   102        00004000 0        0        0     2        0        13\n"
    )
    real_path = Path

    def fake_path(p: str) -> Path:
        return table if p == "/proc/net/netlink" else real_path(p)

    monkeypatch.setattr(common, "Path", fake_path)
    assert common.netlink_group_members(15) == 1  # bit 14 set, generic netlink only
    assert common.netlink_group_members(14) == 0


def test_secret_output_is_withheld(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret_file = tmp_path / "key.txt"  # a throwaway secret, made by the test
    secret_file.write_text("NVMeTLSkey-1:01:c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0:\n")
    sc = common.Scenario(str(tmp_path / "r.json"))
    proc = sc.sh(["cat", str(secret_file)], secret_output=True)
    assert "NVMeTLSkey-1" in proc.stdout  # the caller still gets it ...
    assert "NVMeTLSkey-1" not in capsys.readouterr().out  # ... the log never does


# -- tls_wire: the hellos the fleet scenarios read off the wire --------------------------------


def _tlslite_exchange(identity: bytes, key: bytes, hash_name: str) -> tuple[bytes, bytes]:
    """A real tlslite-ng PSK handshake through a relay; the bytes each way (client first)."""
    import socket
    import threading

    from tlslite.api import HandshakeSettings, TLSConnection

    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    settings.pskConfigs = [(identity, key, hash_name)]
    settings.ticket_count = 0
    server_listener = socket.create_server(("127.0.0.1", 0))
    relay_listener = socket.create_server(("127.0.0.1", 0))
    recorded = {"up": bytearray(), "down": bytearray()}
    errors: list[BaseException] = []

    def server() -> None:
        sock, _ = server_listener.accept()
        try:
            TLSConnection(sock).handshakeServer(settings=settings)
        except BaseException as exc:  # reported by the test
            errors.append(exc)
        finally:
            sock.close()

    def pump(src: socket.socket, dst: socket.socket, into: bytearray) -> None:
        while data := src.recv(65536):
            into += data
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)

    def relay() -> None:
        down_sock, _ = relay_listener.accept()
        up_sock = socket.create_connection(server_listener.getsockname())
        pumps = [
            threading.Thread(target=pump, args=(down_sock, up_sock, recorded["up"])),
            threading.Thread(target=pump, args=(up_sock, down_sock, recorded["down"])),
        ]
        for t in pumps:
            t.start()
        for t in pumps:
            t.join()
        down_sock.close()
        up_sock.close()

    threads = [threading.Thread(target=server), threading.Thread(target=relay)]
    for t in threads:
        t.start()
    client = TLSConnection(socket.create_connection(relay_listener.getsockname()))
    client.handshakeClientCert(settings=settings)
    client.sock.shutdown(socket.SHUT_WR)
    for t in threads:
        t.join(timeout=10)
    client.sock.close()
    server_listener.close()
    relay_listener.close()
    assert not errors, errors
    return bytes(recorded["up"]), bytes(recorded["down"])


IDENT_384 = b"NVMe0R02 nqn.2014-08.org.nvmexpress:uuid:h nqn.2026-12.io.ktlsd:s"


@pytest.mark.parametrize(
    ("hash_name", "binder", "suite", "legacy"),
    [("sha384", 48, "TLS_AES_256_GCM_SHA384", False),
     ("sha256", 32, "TLS_AES_128_GCM_SHA256", True)],
)  # fmt: skip
def test_hello_parsers_read_binder_and_suite_of_a_real_handshake(
    hash_name: str, binder: int, suite: str, legacy: bool
) -> None:
    """A SHA-384-named NVMe identity bound to SHA-384 (spec) and to SHA-256 (as tlshd 1.0)."""
    from testbed.scenarios import tls_wire

    up, down = _tlslite_exchange(IDENT_384, bytes(range(48)), hash_name)
    hello = tls_wire.parse_client_hello(up)
    assert hello.psk_identities == (IDENT_384.decode(),) and hello.tls13
    assert hello.binder_lengths == (binder,)
    answer = tls_wire.parse_server_hello(down)
    assert answer.suite == suite and answer.selected_identity == 0 and not answer.hello_retry
    hs = tls_wire.Handshake("c:1", "s:2", hello, answer)
    summary = hs.summary()
    assert summary["binder_hash"] == tls_wire.suite_hash(suite)
    assert summary["psk_hash"] == "SHA-384" and summary["identity_kind"] == "NVMe0R02"
    assert tls_wire.legacy_binding(summary) is legacy
    assert tls_wire.describe([summary, summary]).startswith(f"2 x {suite}, {binder}-byte binder")
    with pytest.raises(tls_wire.WireError):
        tls_wire.parse_client_hello(down)  # a ServerHello is not a ClientHello
    with pytest.raises(tls_wire.WireError):
        tls_wire.parse_client_hello(up[:60])  # truncated


def _ipv4_tcp(src: str, sport: int, dst: str, dport: int, seq: int, data: bytes,
              syn: bool = False) -> bytes:  # fmt: skip
    import socket
    import struct

    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, 0, 5 << 4, 0x02 if syn else 0x18,
                      65535, 0, 0) + data  # fmt: skip
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    return ip + tcp


@pytest.mark.parametrize("rpc", [False, True])
def test_tcp_streams_reassemble_the_hellos_from_packets(rpc: bool) -> None:
    """Segments out of order and duplicated, a plain connection and RPC records skipped."""
    from testbed.scenarios import tls_wire

    up, down = _tlslite_exchange(IDENT_384, bytes(48), "sha384")
    if rpc:  # RFC 9289: a clear-text AUTH_TLS NULL call and its reply come first
        up = (0x80000000 | 40).to_bytes(4, "big") + bytes(40) + up
        down = (0x80000000 | 24).to_bytes(4, "big") + bytes(24) + down
    streams = tls_wire.TcpStreams({2049}, rpc=rpc)
    streams.add_ipv4(_ipv4_tcp("10.0.0.1", 5000, "10.0.0.2", 2049, 99, b"", syn=True))
    streams.add_ipv4(_ipv4_tcp("10.0.0.2", 2049, "10.0.0.1", 5000, 7, b"", syn=True))
    chunks = [(100 + i, up[i : i + 90]) for i in range(0, len(up), 90)]
    for seq, data in [*reversed(chunks), chunks[0]]:  # reversed, one retransmitted
        streams.add_ipv4(_ipv4_tcp("10.0.0.1", 5000, "10.0.0.2", 2049, seq, data))
    streams.add_ipv4(_ipv4_tcp("10.0.0.2", 2049, "10.0.0.1", 5000, 8, down))
    # another connection that never speaks TLS, and traffic to another port: both ignored
    streams.add_ipv4(_ipv4_tcp("10.0.0.1", 5001, "10.0.0.2", 2049, 1, b"\x00\x01plain"))
    streams.add_ipv4(_ipv4_tcp("10.0.0.1", 5002, "10.0.0.2", 22, 1, up))
    handshakes = streams.handshakes()
    assert [(h.client, h.server) for h in handshakes] == [("10.0.0.1:5000", "10.0.0.2:2049")]
    summary = handshakes[0].summary()
    assert summary["suite"] == "TLS_AES_256_GCM_SHA384" and summary["binder_bytes"] == 48


def test_compare_agents_labels_pairs_that_negotiated_different_suites() -> None:
    legacy = {"suite": "TLS_CHACHA20_POLY1305_SHA256", "binder_bytes": 32}
    spec = {"suite": "TLS_AES_256_GCM_SHA384", "binder_bytes": 48}
    per = [
        {"name": "nvme-tls-tlshd", "figures": {"connect_seconds_sha384": 1.3,
                                               "negotiated_sha384": legacy}},
        {"name": "nvme-tls-ktlsd", "figures": {"connect_seconds_sha384": 0.5,
                                               "negotiated_sha384": spec}},
    ]  # fmt: skip
    pair = run.compare_agents(per)["nvme-tls:connect_seconds_sha384"]
    assert pair["comparable"] is False
    assert pair["tlshd_negotiated"] == "TLS_CHACHA20_POLY1305_SHA256, 32-byte binder"
    report = {
        "kernel": "7.3.4", "kernel_package": "p 1", "accel": "tcg", "build_seconds": 0,
        "boot_seconds": 8, "qemu_seconds": 20, "wall_seconds": 21, "passed": True,
        "guest_problem": None, "boots": [], "scenarios": [],
        "comparison": run.compare_agents(per),
    }  # fmt: skip
    assert "NOT like for like" in run.format_report(report)


# -- the systemd flavour (testbed/systemd_run.py, testbed/systemd_guest/) --------------------


def test_qemu_lets_only_the_systemd_flavour_reboot(tmp_path: Path) -> None:
    image = fake_image(tmp_path)
    plain = vm.qemu_command(image, "tcg", tmp_path / "c.log")
    rebooting = vm.qemu_command(image, "tcg", tmp_path / "c.log", allow_reboot=True,
                                extra_cmdline=systemd_run.CMDLINE)  # fmt: skip
    assert "-no-reboot" in plain and "-no-reboot" not in rebooting
    assert "ktlsd.systemd=1" in rebooting[rebooting.index("-append") + 1]
    # The guest's init hands PID 1 to systemd only when the command line says so.
    init = (Path(build.GUEST_DIR) / "ktlsd-guest-init").read_text()
    assert "ktlsd.systemd=1" in init and "exec /usr/lib/systemd/systemd" in init


def test_systemd_flavour_phases_and_plan() -> None:
    assert systemd_run.PHASES == ("systemd-upgrade", "systemd-boot")
    assert names.PHASES == {1: "upgrade", 2: "boot"}
    plan = systemd_run.plan(Path("/x/ktlsd_0.1.0_all.deb"))
    assert plan == {"deb": "ktlsd_0.1.0_all.deb", "phases": systemd_run.PHASES}


def test_systemd_flavour_files_agree_on_names() -> None:
    """The target script, the units and names.py must name the same subsystem and port."""
    guest = Path(systemd_driver.__file__).parent
    script = (guest / "ktlsd-testbed-nvmet").read_text()
    assert f"sub={names.SUBNQN}\n" in script
    assert f"echo {names.NVME_PORT} > " in script and f"echo {names.NVME_ADDR} > " in script
    assert f"echo {names.RAMDISK} > " in script
    units = {u.name: u.read_text() for u in (guest / "units").glob("*.service")}
    assert set(units) == {"ktlsd-testbed-driver.service", "ktlsd-testbed-nvme-psk.service",
                          "ktlsd-testbed-nvmet.service"}  # fmt: skip
    assert f"--keyfile={names.TLS_KEYFILE}" in units["ktlsd-testbed-nvme-psk.service"]
    assert "Before=nvmf-autoconnect.service" in units["ktlsd-testbed-nvmet.service"]
    assert "driver.py --next-boot" in units["ktlsd-testbed-driver.service"]


def test_driver_parses_the_agents_handshake_lines() -> None:
    entries = [
        (5, 6, "handshake source=kernel peer=127.0.0.1:2049 peername=127.0.0.1 role=client "
               "auth=unauth identity=x509:CN=127.0.0.1 suite=TLS_AES_128_GCM_SHA256 "
               "duration=308.8ms status=0 (ok)"),
        (6, 4, 'handshake source=kernel peer=127.0.0.1:4420 peername=- role=server auth=psk '
               'identity="psk:NVMe1R01 h s d" suite=- duration=20.1ms status=-13 (EACCES) '
               "reason=x"),
        (7, 6, "keyrings linked: .nvme"),
    ]  # fmt: skip
    ok = systemd_driver.ktlsd_handshakes(entries, ok=True)
    assert [(h["role"], h["auth"]) for h in ok] == [("client", "unauth")]
    failed = systemd_driver.ktlsd_handshakes(entries, ok=False)
    assert [(h["role"], h["auth"], h["priority"]) for h in failed] == [("server", "psk", 4)]
    assert len(systemd_driver.ktlsd_handshakes(entries)) == 2


def test_a_kernel_crash_counts_only_before_the_deliberate_power_off() -> None:
    """Both flavours retry a boot only for a guest kernel crash (the rare TCG int3 Oops)."""
    kernel_crashed, POWER_OFF = run.kernel_crashed, systemd_run.POWER_OFF
    crash = "[ 26.04] Oops: int3: 0000 [#1] SMP NOPTI\n[ 26.05] Kernel panic - not syncing\n"
    assert kernel_crashed("boot\n" + crash + "KTLSD-GUEST-READY\n" + POWER_OFF, POWER_OFF)
    assert not kernel_crashed("boot\nall fine\n" + POWER_OFF + "\n" + crash, POWER_OFF)
    assert not kernel_crashed("boot\nsysrq: Power Off\n" + crash, "sysrq: Power Off")
    assert kernel_crashed("boot\n" + crash, "sysrq: Power Off")  # never powered off
