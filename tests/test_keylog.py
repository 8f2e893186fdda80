"""Key logs (``SSLKEYLOGFILE``, ``[ktlsd] key_log_file``): Wireshark decrypts what ktlsd logged.

The proof is a real capture: ``dumpcap`` records a loopback session between ``ktlsd connect``
and ``openssl s_server`` exchanging known payloads, and ``tshark`` decodes the capture with the
key log ktlsd wrote (the application data shows in plaintext) and without it (it does not).
Capturing on ``lo`` needs root (or dumpcap's capabilities), as the test bed runs; elsewhere
those two tests skip. The file itself: created 0600, appended to, never through a symbolic
link, refused when it is not a regular file we alone can read; the agent writes it only when
its configuration says so, and warns at start and in every handshake's log line.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ktlsd.client import submit
from ktlsd.config import ConfigError, config_from_keyfile, parse_key_file
from ktlsd.tls.keylog import KeyLogError, KeyLogFile, key_log_from_environment
from tests.agent_helpers import AgentProcess, find_secrets, parse_handshake_line, tcp_pair
from tests.cli_peers import Proc, ktlsd
from tests.peers import free_port
from tests.pki import self_signed
from tests.processes import ChildProcess
from tests.waiting import run, wait_listening, wait_until

LABELS = {"CLIENT_HANDSHAKE_TRAFFIC_SECRET", "SERVER_HANDSHAKE_TRAFFIC_SECRET",
          "CLIENT_TRAFFIC_SECRET_0", "SERVER_TRAFFIC_SECRET_0", "EXPORTER_SECRET"}
LINE = re.compile(rb"^([A-Z_0-9]+) ([0-9a-f]{64}) ([0-9a-f]{64}|[0-9a-f]{96})$")
CLIENT_PAYLOAD = b"client says: the quick brown fox 4711\n"
SERVER_PAYLOAD = b"server says: jumps over the lazy dog 0815\n"
PSK_256 = bytes.fromhex("5a17" * 16)




def _connect(port: int, key_log: Path | None, *args: str) -> Proc:
    env = ["env", f"SSLKEYLOGFILE={key_log}"] if key_log is not None else ["env", "-u",
                                                                          "SSLKEYLOGFILE"]
    return Proc([*env, *ktlsd("connect", f"127.0.0.1:{port}", *args)], name="ktlsd-connect")


def _parse(path: Path) -> list[tuple[bytes, bytes, bytes]]:
    lines = path.read_bytes().splitlines()
    parsed = []
    for line in lines:
        match = LINE.match(line)
        assert match, f"not an NSS key log line: {line[:40]!r}..."
        parsed.append((match.group(1), match.group(2), match.group(3)))
    return parsed


# --- the capture: ktlsd connect <-> openssl s_server on lo, decoded by tshark -----------------


def _can_capture() -> str | None:
    if shutil.which("dumpcap") is None or shutil.which("tshark") is None:
        return "tshark/dumpcap not installed (scripts/install.sh --test installs tshark)"
    if os.geteuid() != 0:
        return "capturing on lo needs root"
    return None


class Capture:
    """A finished capture of one session and the key log of it."""

    def __init__(self, pcap: Path, key_log: Path) -> None:
        self.pcap = pcap
        self.key_log = key_log

    def decode(self, key_log: Path | None) -> list[list[str]]:
        """tshark's TLS records: content type, decrypted data (hex), encrypted data (hex)."""
        result = subprocess.run(
            ["tshark", "-n", "-r", str(self.pcap),
             "-o", f"tls.keylog_file:{key_log if key_log is not None else ''}",
             "-d", f"tcp.port=={self.port},tls", "-Y", "tls", "-T", "fields",
             "-E", "separator=|", "-e", "tls.record.content_type", "-e", "data.data",
             "-e", "tls.app_data"],
            capture_output=True, text=True, timeout=120, check=True,
        )  # fmt: skip
        return [line.split("|") for line in result.stdout.splitlines()]

    port = 0


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Capture:
    reason = _can_capture()
    if reason:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("capture")
    cert, key = self_signed(tmp)
    port = free_port()
    pcap, key_log = tmp / "session.pcapng", tmp / "keys.log"
    dumpcap = ChildProcess(
        ["dumpcap", "-i", "lo", "-f", f"tcp port {port}", "-w", str(pcap)],
        name="dumpcap", stdin=subprocess.DEVNULL,
    )
    with dumpcap:
        dumpcap.wait_output(lambda: b"Capturing on" in dumpcap.err,
                            lambda: f"dumpcap did not start: {dumpcap.snapshot(dumpcap.err)}",
                            30.0)
        server = Proc(["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3",
                       "-cert", cert, "-key", key, "-naccept", "1", "-quiet"], name="s_server")
        with server:
            wait_listening(port, proc=server)
            client = _connect(port, key_log, "--ca", cert, "--peername", "localhost")
            with client:
                client.feed(CLIENT_PAYLOAD)
                server.feed(SERVER_PAYLOAD)
                client.wait_stdout(SERVER_PAYLOAD)
                server.wait_stdout(CLIENT_PAYLOAD)
                client.close_stdin()
                assert client.wait_exit() == 0, client.stderr_text
                server.wait_exit()
        # libpcap hands packets over in blocks: wait until the file holds both FINs (the
        # session's end) before stopping dumpcap, or the last block would be lost.
        wait_until(lambda: _fins(pcap) >= 2, "dumpcap never wrote the session's FINs", 60.0,
                   interval=0.5)
        dumpcap.proc.send_signal(signal.SIGINT)  # dumpcap finishes the file and exits
        dumpcap.wait_exit(30.0)
    result = Capture(pcap, key_log)
    result.port = port
    return result


def _fins(pcap: Path) -> int:
    """TCP segments with FIN in the capture so far (dumpcap flushes what it wrote)."""
    if not pcap.exists():
        return 0
    result = subprocess.run(["tshark", "-n", "-r", str(pcap), "-Y", "tcp.flags.fin==1"],
                            capture_output=True, text=True, timeout=60, check=False)
    return len(result.stdout.splitlines())


def test_tshark_decrypts_the_session_with_the_key_log(capture: Capture) -> None:
    records = capture.decode(capture.key_log)
    decrypted = {bytes.fromhex(data) for _type, data, _app in records if data}
    assert CLIENT_PAYLOAD in decrypted, records
    assert SERVER_PAYLOAD in decrypted, records
    # The key log: the five secrets of this one session, one client random.
    parsed = _parse(capture.key_log)
    assert {label.decode() for label, _r, _s in parsed} == LABELS
    assert len({random for _l, random, _s in parsed}) == 1
    assert stat.S_IMODE(capture.key_log.stat().st_mode) == 0o600


def test_without_the_key_log_tshark_sees_no_plaintext(capture: Capture) -> None:
    records = capture.decode(None)
    assert any(app for _type, _data, app in records), "no encrypted application data seen"
    assert not any(data for _type, data, _app in records), records
    raw = capture.pcap.read_bytes()
    assert CLIENT_PAYLOAD not in raw and SERVER_PAYLOAD not in raw


# --- connect/listen: the file ---------------------------------------------------------------


def test_listen_and_connect_both_log_and_key_updates_add_generations(tmp_path: Path) -> None:
    """Both ends log the same session (same client random and secrets); the client's 3
    KeyUpdates (each asking the server to update too) add the _1.._3 lines."""
    cert, key = self_signed(tmp_path)
    server_log, client_log = tmp_path / "server.keys", tmp_path / "client.keys"
    listen = Proc(["env", f"SSLKEYLOGFILE={server_log}",
                   *ktlsd("listen", "127.0.0.1:0", "--cert", cert, "--key", key)],
                  name="ktlsd-listen")
    with listen:
        port = int(listen.wait_stderr(r"listening on \S+:(\d+)\n").group(1))
        assert listen.wait_stderr(r"warning: SSLKEYLOGFILE is set: TLS secrets are written to "
                                  + re.escape(str(server_log)))
        client = _connect(port, client_log, "--ca", cert, "--peername", "localhost",
                          "--key-update-every", str(len(CLIENT_PAYLOAD) // 3))
        with client:
            client.feed(CLIENT_PAYLOAD)
            listen.feed(SERVER_PAYLOAD)
            client.wait_stdout(SERVER_PAYLOAD)
            listen.wait_stdout(CLIENT_PAYLOAD)
            client.close_stdin()
            listen.close_stdin()
            assert client.wait_exit() == 0, client.stderr_text
            assert listen.wait_exit() == 0, listen.stderr_text
    server_lines, client_lines = _parse(server_log), _parse(client_log)
    first = {label: secret for label, _r, secret in server_lines if label.decode() in LABELS}
    assert {label.decode() for label in first} == LABELS
    assert {(label, secret) for label, _r, secret in client_lines} >= set(first.items())
    sent = int(re.search(r"key_updates_sent=(\d+)", client.stderr_text).group(1))
    assert sent >= 3
    generations = {label for label, _r, _s in client_lines} - set(first)
    assert {f"CLIENT_TRAFFIC_SECRET_{n}".encode() for n in range(1, sent + 1)} <= generations
    # The next generations follow RFC 8446 7.2 from _0 (what Wireshark would derive).
    from ktlsd.tls.keyschedule import next_traffic_secret
    from ktlsd.tls.session import CipherSuite

    suite = CipherSuite.TLS_AES_128_GCM_SHA256
    secret = bytes.fromhex(first[b"CLIENT_TRAFFIC_SECRET_0"].decode())
    by_label = {label: s for label, _r, s in client_lines}
    for n in range(1, sent + 1):
        secret = next_traffic_secret(suite, secret)
        assert by_label[f"CLIENT_TRAFFIC_SECRET_{n}".encode()] == secret.hex().encode()
    # Secrets never reach the status lines.
    secrets = {label.decode(): bytes.fromhex(s.decode()) for label, _r, s in client_lines}
    assert not find_secrets(client.stderr_text + listen.stderr_text, secrets)


def test_a_symbolic_link_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"")
    target.chmod(0o600)
    link = tmp_path / "keys.log"
    link.symlink_to(target)
    with pytest.raises(KeyLogError, match="is a symbolic link"):
        KeyLogFile(str(link)).check()
    with pytest.raises(KeyLogError, match="is a symbolic link"):
        KeyLogFile(str(link)).write([b"CLIENT_RANDOM x y"])
    assert target.read_bytes() == b""
    # A dangling link is not followed to create its target either.
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "created-through-link")
    with pytest.raises(KeyLogError, match="is a symbolic link"):
        KeyLogFile(str(dangling)).check()
    assert not (tmp_path / "created-through-link").exists()
    # connect refuses at start, in one line, before connecting anywhere.
    proc = _connect(free_port(), link, "--no-verify")
    with proc:
        assert proc.wait_exit() == 1
        assert proc.stderr_text == (
            f"ktlsd: key log file {link} is a symbolic link (not followed)\n")


def test_created_0600_whatever_the_umask_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "keys.log"
    old = os.umask(0)
    try:
        KeyLogFile(str(path)).write([b"A 00 11"])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    KeyLogFile(str(path)).write([b"B 22 33", b"C 44 55"])
    assert path.read_bytes() == b"A 00 11\nB 22 33\nC 44 55\n"


@pytest.mark.parametrize("kind", ["readable by group", "directory", "fifo", "hard link",
                                  "other owner"])
def test_unsafe_files_are_refused(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "keys.log"
    expected = {"readable by group": r"has mode 0640: others may read it",
                "directory": "is not a regular file", "fifo": "is not a regular file",
                "hard link": "has 2 links", "other owner": "belongs to uid 65534"}[kind]
    if kind == "readable by group":
        path.write_bytes(b"")
        path.chmod(0o640)
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path, 0o600)  # no reader: opening it for writing must not block
    elif kind == "hard link":
        path.write_bytes(b"")
        path.chmod(0o600)
        os.link(path, tmp_path / "second-name")
    else:
        if os.geteuid() != 0:
            pytest.skip("needs root to give the file to another uid")
        path.write_bytes(b"")
        path.chmod(0o600)
        os.chown(path, 65534, 65534)
    with pytest.raises(KeyLogError, match=expected) as raised:
        KeyLogFile(str(path)).write([b"CLIENT_RANDOM 00 11"])
    assert "\n" not in str(raised.value)
    if kind in ("readable by group", "hard link", "other owner"):
        assert path.read_bytes() == b""


def test_the_environment_variable() -> None:
    assert key_log_from_environment({}) is None
    assert key_log_from_environment({"SSLKEYLOGFILE": ""}) is None
    found = key_log_from_environment({"SSLKEYLOGFILE": "/tmp/k"})
    assert found is not None and found.path == "/tmp/k"
    assert repr(found) == "KeyLogFile('/tmp/k')"


# --- the agent: only when its configuration says so ------------------------------------------


def _config(text: str) -> object:
    return config_from_keyfile(parse_key_file(text, "/etc/tlshd/config"))


def test_agent_key_log_is_a_ktlsd_key_with_an_absolute_path() -> None:
    config = _config("[ktlsd]\nkey_log_file = /var/tmp/ktlsd.keys\n")
    assert config.key_log_file == "/var/tmp/ktlsd.keys"  # type: ignore[attr-defined]
    assert config.agent_settings().key_log_file == "/var/tmp/ktlsd.keys"  # type: ignore[attr-defined]
    assert _config("[ktlsd]\n").agent_settings().key_log_file is None  # type: ignore[attr-defined]
    assert _config("[ktlsd]\nkey_log_file =\n").key_log_file is None  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match=r"config:2: \[ktlsd\] key_log_file: 'keys' is not an "
                                          "absolute path"):
        _config("[ktlsd]\nkey_log_file = keys\n")


def test_agent_writes_the_key_log_only_when_configured_and_warns(tmp_path: Path) -> None:
    key_log = tmp_path / "agent.keys"

    async def pair(path: str, identity: str) -> tuple[object, object]:
        a, b = tcp_pair()
        with a, b:
            psk = [(identity, PSK_256, "sha256")]
            return await asyncio.gather(
                submit(a, role="client", auth="psk", psk=psk, service_path=path),
                submit(b, role="server", auth="psk", psk=psk, service_path=path),
            )

    # Not configured: no file, handshake lines at info level, no key_log field.
    off = tmp_path / "off"
    off.mkdir()
    with AgentProcess(off, "[ktlsd]\n") as agent:
        done = run(pair(agent.socket_path, "quiet"))
        assert all(d.status == 0 for d in done)  # type: ignore[attr-defined]
        lines = agent.wait_for(r"handshake source=service", 2)
        assert all(" info handshake " in line or "key_log" not in line for line in lines)
        assert not agent.matching(r"key_log=|key_log_file")
    assert not key_log.exists()

    on = tmp_path / "on"
    on.mkdir()
    with AgentProcess(on, f"[ktlsd]\nkey_log_file = {key_log}\n") as agent:
        start = agent.matching(r"key_log_file: the TLS secrets of every handshake are written")
        assert len(start) == 1 and str(key_log) in start[0]
        assert "warning" in start[0].lower()
        done = run(pair(agent.socket_path, "logged"))
        assert all(d.status == 0 for d in done)  # type: ignore[attr-defined]
        lines = agent.wait_for(r"handshake source=service", 2)
        for line in lines:
            assert "warning" in line.lower(), line
            assert parse_handshake_line(line)["key_log"] == str(key_log)
        log_text = agent.text
    parsed = _parse(key_log)
    assert stat.S_IMODE(key_log.stat().st_mode) == 0o600
    # Both ends of the one session were served by the agent: two handshakes, one random.
    assert len({random for _l, random, _s in parsed}) == 1
    assert sorted(label.decode() for label, _r, _s in parsed) == sorted([*LABELS, *LABELS])
    secrets = {label.decode(): bytes.fromhex(s.decode()) for label, _r, s in parsed}
    assert not find_secrets(log_text, secrets)


def test_agent_refuses_to_start_with_an_unusable_key_log(tmp_path: Path) -> None:
    link = tmp_path / "keys.log"
    link.symlink_to(tmp_path / "elsewhere")
    config = tmp_path / "ktlsd.conf"
    config.write_text(f"[ktlsd]\nkey_log_file = {link}\n")
    check = subprocess.run([sys.executable, "-m", "ktlsd", "run", "--check", "-c", str(config)],
                           capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 1
    assert (f"ktlsd: [ktlsd] key_log_file: key log file {link} is a symbolic link "
            "(not followed)") in check.stderr.splitlines()
    agent = subprocess.run(
        [sys.executable, "-m", "ktlsd", "run", "-s", "-c", str(config), "--kernel", "no",
         "--socket", str(tmp_path / "sock")],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert agent.returncode == 1
    assert "is a symbolic link (not followed)" in agent.stderr
    assert not (tmp_path / "elsewhere").exists()
