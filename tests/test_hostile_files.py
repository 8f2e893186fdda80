"""Hostile files against the agent, each a real attack (issue 10, items 1 and 6).

The agent runs as root; the attacker is a local user (uid 65534, ``nobody``) talking to the
agent's handshake service from a separate process, with the kernel deciding what it may read:

* a symlink-flip race, thousands of tries: a directory symlink flips between a root-only
  directory (a 0600 root certificate and key) and the attacker's own one while the agent
  reads ``link/cert.pem`` and ``link/key.pem``. The agent must never present (or even read)
  the root-only material;
* a FIFO, ``/dev/zero``, a directory, ``/dev/null``, a socket and an oversize file named as
  certificate, private key, truststore and CRL: each refused in < 1 s with a non-zero status
  while a valid handshake started at the same moment completes in < 1 s, and the agent's
  resident memory grows by < 10 MB over rounds of them;
* the same files named by the agent's own configuration (read with root's rights, same rules);
* a file on a FUSE mount whose ``open`` never returns: the consumer gets ETIMEDOUT, the agent
  keeps serving, and stuck reads hold only their own uid's quota;
* malformed certificates, keys, truststores and CRLs: ENOKEY/EINVAL with one line, never EIO.

The agent is a real ``ktlsd run`` process (so a regression that blocks its event loop makes
these tests fail on their timeouts instead of hanging the test process); its RSS is read from
its ``/proc/<pid>/status``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import errno
import json
import os
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ktlsd.client import submit
from ktlsd.files import AGENT, FileAccess, FileRefused, read_file
from ktlsd.settings import DEFAULT_MAX_FILE_BYTES
from tests.agent_helpers import REPO, AgentProcess, tcp_pair
from tests.pki import Authority, Issued

SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = 65534
RACE_TRIES = 2000
ROUNDS_FOR_MEMORY = 4
PROMPT = 1.0  # the issue's bound: refused, and a concurrent handshake done, within 1 s
RSS_GROWTH_LIMIT = 10 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    os.getuid() != 0 or not os.access(SYSTEM_PYTHON, os.X_OK),
    reason="needs root (to run the agent and a consumer as uid 65534) and a system python3",
)

# The attacker's program: runs as uid 65534 under the system python, prints one JSON line.
CONSUMER = r'''
import asyncio, json, os, socket, ssl, sys, threading, time
from ktlsd.client import submit

PSK = bytes(range(32))


def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    return client, server


def tls_client(sock):
    """A plain TLS 1.3 client: the DER certificate the agent presented, or None."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    sock.settimeout(20)
    try:
        with ctx.wrap_socket(sock) as tls:
            return tls.getpeercert(binary_form=True)
    except (OSError, ssl.SSLError):
        return None


async def race(job):
    link, targets = job["link"], job["targets"]
    user, secret = bytes.fromhex(job["user_der"]), bytes.fromhex(job["secret_der"])
    stop = threading.Event()
    flips = [0]

    def flipper():
        spare = link + ".next"
        i = 0
        while not stop.is_set():
            i ^= 1
            try:
                os.unlink(spare)
            except FileNotFoundError:
                pass
            os.symlink(targets[i], spare)
            os.replace(spare, link)
            flips[0] += 1

    result = {"presented_user": 0, "presented_secret": 0, "presented_other": 0,
              "refused": 0, "reasons": {}, "statuses": {}}
    gate = asyncio.Semaphore(job["concurrency"])

    async def one():
        async with gate:
            a, b = tcp_pair()
            client = asyncio.ensure_future(asyncio.to_thread(tls_client, b))
            with a:
                done = await submit(a, role="server", auth="x509", certificate=link + "/cert.pem",
                                    private_key=link + "/key.pem", timeout=10,
                                    service_path=job["service"])
            presented = await client
        key = str(done.status)
        result["statuses"][key] = result["statuses"].get(key, 0) + 1
        if presented == secret:
            result["presented_secret"] += 1
        elif presented == user and done.status == 0:
            result["presented_user"] += 1
        elif presented is not None or done.status == 0:
            result["presented_other"] += 1
        if done.status != 0:
            result["refused"] += 1
            reason = done.reason.replace(link, "LINK")
            result["reasons"][reason] = result["reasons"].get(reason, 0) + 1

    thread = threading.Thread(target=flipper, daemon=True)
    thread.start()
    try:
        await asyncio.gather(*(one() for _ in range(job["tries"])))
    finally:
        stop.set()
        thread.join()
    result["flips"] = flips[0]
    return result


async def timed(coro):
    started = time.monotonic()
    done = await coro
    return {"status": done.status, "reason": done.reason,
            "seconds": time.monotonic() - started}


async def hostile(job):
    results = []
    for n, case in enumerate(job["cases"]):
        a, b = tcp_pair()
        c, d = tcp_pair()
        psk = [(f"valid-{n}", PSK)]
        service = job["service"]
        with a, b, c, d:
            bad, good_client, good_server = await asyncio.gather(
                timed(submit(a, timeout=10, service_path=service, **case["request"])),
                timed(submit(c, role="client", auth="psk", psk=psk, timeout=10,
                             service_path=service)),
                timed(submit(d, role="server", auth="psk", psk=psk, timeout=10,
                             service_path=service)),
            )
        results.append({"name": case["name"], "bad": bad, "good": [good_client, good_server]})
    return results


async def single(job):
    a, b = tcp_pair()
    client = asyncio.ensure_future(asyncio.to_thread(tls_client, b))
    with a:
        done = await submit(a, timeout=10, service_path=job["service"], **job["request"])
    presented = await client
    return {"status": done.status, "reason": done.reason,
            "presented": presented.hex() if presented else None}


job = json.loads(sys.argv[1])
MODES = {"race": race, "hostile": hostile, "single": single}
print(json.dumps(asyncio.run(MODES[job["mode"]](job))))
'''


@dataclass
class World:
    """Everything on disk: a CA, the attacker's own material, root-only material, hostile
    files, and a running agent whose service socket everyone may use."""

    base: Path
    ca: Authority
    user: Issued  # the attacker's own certificate and key
    secret: Issued  # root-only
    user_dir: Path
    secret_dir: Path
    attacker: Path
    hostile: dict[str, str]
    consumer: Path
    agent: AgentProcess | None = None

    @property
    def service(self) -> str:
        assert self.agent is not None
        return self.agent.socket_path


def _place(issued: Issued, directory: Path, owner: int, dir_mode: int) -> None:
    directory.mkdir(mode=dir_mode)
    directory.chmod(dir_mode)
    for source, name in ((issued.cert_path, "cert.pem"), (issued.key_path, "key.pem")):
        target = directory / name
        target.write_bytes(source.read_bytes())
        target.chmod(0o600)
        os.chown(target, owner, owner)
    os.chown(directory, owner, owner)


@pytest.fixture
def world() -> Iterator[World]:
    base = Path(tempfile.mkdtemp(prefix="ktlsd-hostile-", dir="/tmp"))
    keep: list[socket.socket] = []
    try:
        base.chmod(0o755)
        ca = Authority.create(base / "ca", "ecdsa", name="Hostile Files CA")
        (base / "ca").chmod(0o755)
        ca.cert_path.chmod(0o644)
        user = ca.issue_server("attacker.example")
        secret = ca.issue_server("root-only.example")
        attacker = base / "attacker"
        attacker.mkdir()
        os.chown(attacker, NOBODY, NOBODY)
        user_dir, secret_dir = attacker / "mine", base / "root-only"
        _place(user, user_dir, NOBODY, 0o755)
        _place(secret, secret_dir, 0, 0o700)
        fifo = attacker / "fifo.pem"
        os.mkfifo(fifo, 0o666)
        directory = attacker / "directory.pem"
        directory.mkdir()
        oversize = attacker / "oversize.pem"
        with open(oversize, "wb") as f:
            f.truncate(DEFAULT_MAX_FILE_BYTES + 1)  # sparse: no disk, but too large to read
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound.bind(str(attacker / "socket.pem"))
        keep.append(bound)
        for path in (fifo, directory, oversize, attacker / "socket.pem"):
            os.chown(path, NOBODY, NOBODY)
        consumer = base / "consumer.py"
        consumer.write_text(CONSUMER)
        consumer.chmod(0o644)
        yield World(
            base=base, ca=ca, user=user, secret=secret, user_dir=user_dir,
            secret_dir=secret_dir, attacker=attacker, consumer=consumer,
            hostile={
                "FIFO": str(fifo), "/dev/zero": "/dev/zero", "directory": str(directory),
                "/dev/null": "/dev/null", "socket": str(attacker / "socket.pem"),
                "oversize file": str(oversize),
            },
        )
    finally:
        for sock in keep:
            sock.close()
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def agent_running(world: World, config: str = "") -> Iterator[AgentProcess]:
    """``ktlsd run`` serving the service socket to everyone, keeping no sessions."""
    home = world.base / "agent"
    home.mkdir(exist_ok=True)
    home.chmod(0o755)
    settings = "[ktlsd]\nservice_mode = 0666\nsession_lifetime = 0\nmax_concurrent = 32\n"
    with AgentProcess(home, settings + config) as agent:
        world.agent = agent
        try:
            yield agent
        finally:
            world.agent = None


def as_nobody(world: World, job: dict[str, Any], *, groups: tuple[int, ...] = (),
              limit: float = 600.0) -> Any:
    """Run the attacker's program as uid 65534 and return what it printed."""
    proc = subprocess.run(
        [SYSTEM_PYTHON, str(world.consumer), json.dumps({**job, "service": world.service})],
        capture_output=True, timeout=limit, user=NOBODY, group=NOBODY, extra_groups=list(groups),
        cwd="/", env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    return json.loads(proc.stdout)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS line")


# --- 1. the symlink race ------------------------------------------------------------------------
def test_symlink_flip_race_never_presents_a_root_only_file(world: World) -> None:
    link = world.attacker / "link"
    link.symlink_to(world.user_dir)
    os.chown(link, NOBODY, NOBODY, follow_symlinks=False)
    with agent_running(world):
        result = as_nobody(world, {
            "mode": "race", "link": str(link), "tries": RACE_TRIES, "concurrency": 4,
            "targets": [str(world.user_dir), str(world.secret_dir)],
            "user_der": world.user.cert_der.hex(), "secret_der": world.secret.cert_der.hex(),
        })
    summary = json.dumps(result, indent=1)
    assert result["presented_secret"] == 0, summary
    assert result["presented_other"] == 0, summary
    # The race really ran both ways: some tries found the attacker's own files (and the agent
    # used them), some found the root-only directory (and were refused, not served).
    assert result["presented_user"] > 0 and result["refused"] > 0, summary
    assert result["presented_user"] + result["refused"] == RACE_TRIES, summary
    assert result["flips"] > RACE_TRIES, summary
    for reason in result["reasons"]:
        # Refused because the lookup (with uid 65534's rights) hit the closed directory —
        # never a key that "does not match" (which would mean one root-only file was read).
        assert "not readable by uid 65534" in reason, summary
        assert "does not match" not in reason, summary
    assert set(result["statuses"]) <= {"0", str(errno.ENOKEY)}, summary


# --- 2. hostile files named by a consumer --------------------------------------------------------
def _consumer_cases(world: World) -> list[dict[str, Any]]:
    user_cert, user_key = str(world.user_dir / "cert.pem"), str(world.user_dir / "key.pem")
    ca = str(world.ca.cert_path)
    cases = []
    for kind, path in world.hostile.items():
        for role, request in (
            ("certificate", {"role": "server", "auth": "x509", "certificate": path,
                             "private_key": user_key}),
            ("private key", {"role": "server", "auth": "x509", "certificate": user_cert,
                             "private_key": path}),
            ("truststore", {"role": "client", "auth": "x509", "truststore": path}),
            ("CRL", {"role": "client", "auth": "x509", "truststore": ca, "crl": path}),
        ):
            cases.append({"name": f"{kind} as {role}", "request": request})
    return cases


def _check_prompt(results: list[dict[str, Any]]) -> None:
    for case in results:
        bad, good = case["bad"], case["good"]
        where = f"{case['name']}: {json.dumps(case)}"
        assert bad["status"] == errno.ENOKEY, where
        assert bad["reason"] and "\n" not in bad["reason"], where
        assert bad["seconds"] < PROMPT, where
        assert [g["status"] for g in good] == [0, 0], where
        assert max(g["seconds"] for g in good) < PROMPT, where


def test_hostile_files_from_an_unprivileged_consumer_are_refused_at_once(world: World) -> None:
    cases = _consumer_cases(world)
    with agent_running(world) as agent:
        results = as_nobody(world, {"mode": "hostile", "cases": cases})  # also the warm-up
        _check_prompt(results)
        reasons = {r["name"]: r["bad"]["reason"] for r in results}
        assert "it is a FIFO, not a regular file" in reasons["FIFO as certificate"]
        assert "larger than" in reasons["oversize file as CRL"]
        assert "character device" in reasons["/dev/zero as private key"]
        assert "directory" in reasons["directory as truststore"]
        before = rss_bytes(agent.proc.pid)
        for _ in range(ROUNDS_FOR_MEMORY):
            _check_prompt(as_nobody(world, {"mode": "hostile", "cases": cases}))
        grown = rss_bytes(agent.proc.pid) - before
    assert grown < RSS_GROWTH_LIMIT, f"agent RSS grew by {grown / 1e6:.1f} MB"


# --- 3. hostile files named by the agent's own configuration ------------------------------------
def _config_cases(world: World) -> list[tuple[str, str, dict[str, Any]]]:
    user_cert, user_key = world.user_dir / "cert.pem", world.user_dir / "key.pem"
    cases = []
    for kind, path in world.hostile.items():
        cases.append((f"{kind} as x509.certificate",
                      f"[authenticate.server]\nx509.certificate = {path}\n"
                      f"x509.private_key = {user_key}\n",
                      {"role": "server", "auth": "x509"}))
        cases.append((f"{kind} as x509.private_key",
                      f"[authenticate.server]\nx509.certificate = {user_cert}\n"
                      f"x509.private_key = {path}\n",
                      {"role": "server", "auth": "x509"}))
        cases.append((f"{kind} as x509.crl",
                      f"[authenticate.client]\nx509.truststore = {world.ca.cert_path}\n"
                      f"x509.crl = {path}\n",
                      {"role": "client", "auth": "x509"}))
        if kind != "directory":  # a configured truststore directory is a hashed directory
            cases.append((f"{kind} as x509.truststore",
                          f"[authenticate.client]\nx509.truststore = {path}\n",
                          {"role": "client", "auth": "x509"}))
    return cases


async def _timed(coro: Any) -> tuple[int, str, float]:
    started = time.monotonic()
    done = await coro
    return done.status, done.reason, time.monotonic() - started


async def _hostile_and_valid(service: str, request: dict[str, Any], n: int) -> list[Any]:
    a, b = tcp_pair()
    c, d = tcp_pair()
    psk = [(f"config-{n}", bytes(range(32)))]
    with a, b, c, d:
        return list(await asyncio.wait_for(asyncio.gather(
            _timed(submit(a, timeout=10, service_path=service, **request)),
            _timed(submit(c, role="client", auth="psk", psk=psk, timeout=10,
                          service_path=service)),
            _timed(submit(d, role="server", auth="psk", psk=psk, timeout=10,
                          service_path=service)),
        ), 60))


def test_hostile_files_in_the_agent_configuration_are_refused_at_once(world: World) -> None:
    base = "[ktlsd]\nservice_mode = 0666\nsession_lifetime = 0\nmax_concurrent = 32\n"
    with agent_running(world) as agent:
        for n, (name, config, request) in enumerate(_config_cases(world)):
            reloads = len(agent.matching(r"keyrings linked"))
            agent.config_path.write_text(base + config)
            agent.signal(signal.SIGHUP)
            agent.wait_for(r"keyrings linked", count=reloads + 1)
            bad, client, server = asyncio.run(_hostile_and_valid(world.service, request, n))
            assert bad[0] == errno.ENOKEY and bad[2] < PROMPT, (name, bad)
            assert "cannot read" in bad[1], (name, bad)
            assert (client[0], server[0]) == (0, 0), (name, client, server)
            assert max(client[2], server[2]) < PROMPT, (name, client, server)


async def _served_by(service: str, request: dict[str, Any]) -> int:
    """Status of one server handshake through the service, answered by an openssl-free
    ktlsd client that does not verify (the point is that the server's file was read)."""
    a, b = tcp_pair()
    with a, b:
        server, client = await asyncio.wait_for(asyncio.gather(
            submit(a, timeout=10, service_path=service, **request),
            asyncio.to_thread(_unverified_client, b),
        ), 60)
    assert client, "the client saw no certificate"
    return server.status


def _unverified_client(sock: socket.socket) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    with context.wrap_socket(sock, do_handshake_on_connect=True) as tls:
        return tls.getpeercert(binary_form=True) is not None


# --- 4. the consumer's groups count, and only in the reading thread ------------------------------
def test_files_are_read_with_the_consumers_supplementary_groups(world: World) -> None:
    """A key readable only through a group (0640 root:4242): uid 65534 in group 4242 may use
    it (SO_PEERGROUPS reaches the reader), the same user without the group may not."""
    shared = world.base / "group-shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    for name in ("cert.pem", "key.pem"):
        target = shared / name
        target.write_bytes((world.user_dir / name).read_bytes())
        os.chown(target, 0, 4242)
        target.chmod(0o640)
    request = {"role": "server", "auth": "x509", "certificate": str(shared / "cert.pem"),
               "private_key": str(shared / "key.pem")}
    with agent_running(world):
        member = as_nobody(world, {"mode": "single", "request": request}, groups=(4242,))
        stranger = as_nobody(world, {"mode": "single", "request": request})
    assert member["status"] == 0, member
    assert member["presented"] == world.user.cert_der.hex()
    assert stranger["status"] == errno.ENOKEY, stranger
    assert "not readable by uid 65534" in stranger["reason"]


def _thread_status() -> dict[str, list[str]]:
    """Uid, Gid (real, effective, saved, filesystem) and Groups of the calling thread."""
    status: dict[str, list[str]] = {}
    for line in Path("/proc/thread-self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            status[key] = value.split()
    return status


def test_reader_rights_change_only_in_the_reading_thread(tmp_path: Path) -> None:
    """The reader's thread takes the consumer's fsuid, fsgid and groups while every other
    thread keeps root's: glibc's setgroups() would have changed them all."""
    from ktlsd.files import _Credentials

    creds = _Credentials()
    root_groups = tuple(sorted(set(os.getgroups())))
    main_before = _thread_status()
    switched = threading.Event()
    release = threading.Event()
    seen: dict[str, Any] = {}

    def worker() -> None:
        creds.become(NOBODY, NOBODY, (4242, 4343))
        try:
            seen["worker"] = _thread_status()
            switched.set()
            release.wait(30)
        finally:
            creds.become(0, 0, root_groups)
            seen["restored"] = _thread_status()

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert switched.wait(30)
        main_during = _thread_status()
    finally:
        release.set()
        thread.join(30)
    assert seen["worker"]["Uid"][3] == str(NOBODY) and seen["worker"]["Gid"][3] == str(NOBODY)
    assert seen["worker"]["Groups"] == ["4242", "4343"]
    assert seen["worker"]["Uid"][:3] == ["0", "0", "0"]  # real/effective/saved stay root
    assert main_during == main_before
    assert seen["restored"]["Uid"] == ["0"] * 4 and seen["restored"]["Groups"] == list(
        map(str, root_groups))


def test_read_file_uses_the_readers_rights_and_never_waits_for_a_fifo(world: World) -> None:
    """read_file itself: a 0600 root file is read by the agent and refused to uid 65534; a
    FIFO without a writer is refused at once, for both."""
    secret = str(world.secret_dir / "key.pem")
    nobody = FileAccess.of_consumer(NOBODY, NOBODY)
    assert read_file(secret, "private key file") == world.secret.key_path.read_bytes()
    with pytest.raises(FileRefused, match="not readable by uid 65534"):
        read_file(secret, "private key file", nobody)
    for access in (AGENT, nobody):
        with pytest.raises(FileRefused, match="FIFO") as info:
            read_file(world.hostile["FIFO"], "CRL file", access, timeout=30)
        assert info.value.errno == errno.ENOKEY


# --- 5. malformed material: ENOKEY or EINVAL with one line, never EIO ---------------------------
def _with_broken_public_key(cert_der: bytes) -> bytes:
    """The certificate with its EC public point made invalid (the signature is not checked
    when we use our own certificate, so only the key parse can notice)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    spki = x509.load_der_x509_certificate(cert_der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    at = cert_der.index(spki) + len(spki) - 3
    return cert_der[:at] + bytes([cert_der[at] ^ 0xFF]) + cert_der[at + 1:]


def _malformed_cases(world: World) -> list[tuple[str, dict[str, Any]]]:
    files = world.base / "malformed"
    files.mkdir()
    broken = _with_broken_public_key(world.user.cert_der)
    garbage_pem = b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n"
    encrypted = (b"-----BEGIN CERTIFICATE-----\nProc-Type: 4,ENCRYPTED\n"
                 b"DEK-Info: AES-128-CBC,00112233445566778899AABBCCDDEEFF\n\n"
                 b"AAAA\n-----END CERTIFICATE-----\n")
    written = {
        "broken.pem": b"-----BEGIN CERTIFICATE-----\n"
                      + base64.encodebytes(broken)
                      + b"-----END CERTIFICATE-----\n",
        "garbage.pem": garbage_pem,
        "encrypted.pem": encrypted,
        "garbage.crl": b"-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n",
        "junk.der": os.urandom(200),
        "empty.pem": b"",
    }
    for name, data in written.items():
        (files / name).write_bytes(data)
    ca = str(world.ca.cert_path)
    key = str(world.user_dir / "key.pem")
    return [
        ("inline certificate with an invalid public key",
         {"role": "server", "auth": "x509", "certificate_chain": [broken],
          "private_key_der": world.user.key_der}),
        ("inline private key of junk",
         {"role": "server", "auth": "x509", "certificate_chain": [world.user.cert_der],
          "private_key_der": os.urandom(64)}),
        ("inline private key of another certificate",
         {"role": "server", "auth": "x509", "certificate_chain": [world.user.cert_der],
          "private_key_der": world.secret.key_der}),
        ("certificate file with an invalid public key",
         {"role": "server", "auth": "x509", "certificate": str(files / "broken.pem"),
          "private_key": key}),
        ("empty certificate file",
         {"role": "server", "auth": "x509", "certificate": str(files / "empty.pem"),
          "private_key": key}),
        ("truststore of garbage PEM",
         {"role": "client", "auth": "x509", "truststore": str(files / "garbage.pem")}),
        ("truststore with an encrypted PEM block (no password prompt)",
         {"role": "client", "auth": "x509", "truststore": str(files / "encrypted.pem")}),
        ("truststore of junk DER",
         {"role": "client", "auth": "x509", "truststore": str(files / "junk.der")}),
        ("CRL of garbage PEM",
         {"role": "client", "auth": "x509", "truststore": ca, "crl": str(files / "garbage.crl")}),
        ("CRL of junk DER",
         {"role": "client", "auth": "x509", "truststore": ca, "crl": str(files / "junk.der")}),
    ]


def test_malformed_material_is_enokey_or_einval_never_eio(world: World) -> None:
    async def one(service: str, request: dict[str, Any]) -> tuple[int, str]:
        a, b = tcp_pair()
        with a, b:
            done = await asyncio.wait_for(
                submit(a, timeout=10, service_path=service, **request), 30)
        return done.status, done.reason

    with agent_running(world):
        for name, request in _malformed_cases(world):
            status, reason = asyncio.run(one(world.service, request))
            assert status in (errno.ENOKEY, errno.EINVAL), (name, status, reason)
            assert reason and "\n" not in reason and "internal error" not in reason, (name, reason)


# --- 6. a read the kernel never finishes (a FUSE server that never answers open) -----------------
class HangingFuse:
    """A real FUSE file system (raw ``/dev/fuse`` protocol, mounted ``allow_other``) with one
    regular file, ``hang.pem``, whose ``open`` is never answered: the reader's thread blocks
    in the kernel, as on a hung NFS server or a hostile user's FUSE mount. Closing the device
    aborts the connection and releases every blocked reader."""

    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self.file = str(mountpoint / "hang.pem")
        self.opens = threading.Semaphore(0)
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other"
        if self._libc.mount(b"ktlsd-test", str(mountpoint).encode(), b"fuse",
                            ctypes.c_ulong(0x2 | 0x4), options.encode()) != 0:  # nosuid nodev
            os.close(self._fd)
            pytest.skip(f"cannot mount FUSE: {os.strerror(ctypes.get_errno())}")
        self._stop = threading.Event()
        self._server = threading.Thread(target=self._serve, daemon=True)
        self._server.start()

    @staticmethod
    def _attr(ino: int, mode: int, size: int) -> bytes:
        # struct fuse_attr: ino size blocks atime mtime ctime, 3 nsec, mode nlink uid gid rdev
        # blksize flags
        return struct.pack("<6Q10I", ino, size, 0, 0, 0, 0, 0, 0, 0, mode, 1, 0, 0, 0, 4096, 0)

    def _serve(self) -> None:
        while True:
            # Poll, so that release() can close the device from this thread: a read blocked on
            # it would keep the connection alive.
            if self._stop.is_set():
                os.close(self._fd)
                return
            if not select.select([self._fd], [], [], 0.05)[0]:
                continue
            try:
                request = os.read(self._fd, (1 << 20) + 8192)
            except OSError:
                return
            _, opcode, unique, node = struct.unpack_from("<IIQQ", request)

            def reply(payload: bytes = b"", error: int = 0, unique: int = unique) -> None:
                with contextlib.suppress(OSError):
                    os.write(self._fd, struct.pack("<IiQ", 16 + len(payload), error, unique)
                             + payload)

            if opcode == 26:  # INIT: protocol 7.31, max_write 4096
                reply(struct.pack("<4I2H2I2H2I", 7, 31, 0, 0, 0, 0, 4096, 1, 0, 0, 0, 0)
                      + bytes(24))
            elif opcode == 1:  # LOOKUP
                if request[40:].split(b"\0")[0] == b"hang.pem":
                    reply(struct.pack("<4Q2I", 2, 0, 0, 0, 0, 0) + self._attr(2, 0o100644, 64))
                else:
                    reply(error=-errno.ENOENT)
            elif opcode == 3:  # GETATTR
                attr = self._attr(1, 0o40755, 0) if node == 1 else self._attr(2, 0o100644, 64)
                reply(struct.pack("<Q2I", 0, 0, 0) + attr)
            elif opcode == 14:  # OPEN: never answered
                self.opens.release()
            elif opcode not in (2, 36, 42):  # FORGET, INTERRUPT, BATCH_FORGET: no reply
                reply(error=-errno.ENOSYS)

    def release(self) -> None:
        """Abort the connection: every blocked open fails (ENOTCONN)."""
        if not self._stop.is_set():
            self._stop.set()
            self._server.join(10)
            self._libc.umount2(str(self.mountpoint).encode(), 2)  # MNT_DETACH


@pytest.fixture
def hanging_fuse(world: World) -> Iterator[HangingFuse]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    mountpoint = world.base / "fuse"
    mountpoint.mkdir(mode=0o755)
    fuse = HangingFuse(mountpoint)
    try:
        yield fuse
    finally:
        fuse.release()


def test_a_read_that_never_finishes_times_out_and_holds_only_its_own_uid(
    world: World, hanging_fuse: HangingFuse
) -> None:
    """Reads stuck in the kernel: each caller gets TIMEOUT after its timeout; once uid 65534
    has MAX_READS_PER_UID of them pending its next read waits (and times out), while another
    uid and the agent's own files are read at once. Aborting the FUSE connection frees it."""
    from ktlsd.files import MAX_READS_PER_UID

    nobody = FileAccess.of_consumer(NOBODY, NOBODY)
    other = FileAccess.of_consumer(NOBODY - 1, NOBODY - 1)
    readable = str(world.user_dir / "cert.pem")  # 0600 nobody: uid 65534's own file
    world.user_dir.joinpath("cert.pem").chmod(0o644)
    with pytest.raises(FileRefused, match="did not finish within") as info:
        read_file(hanging_fuse.file, "certificate file", nobody, timeout=0.5)
    assert info.value.cause.name == "TIMEOUT"
    assert hanging_fuse.opens.acquire(timeout=10)
    # That read is still stuck in the kernel: fill uid 65534's quota with more.
    stuck = [threading.Thread(target=_read_quietly, args=(hanging_fuse.file, nobody), daemon=True)
             for _ in range(MAX_READS_PER_UID - 1)]
    for thread in stuck:
        thread.start()
    for _ in stuck:
        assert hanging_fuse.opens.acquire(timeout=10)
    with pytest.raises(FileRefused, match="still pending"):
        read_file(readable, "certificate file", nobody, timeout=0.5)
    started = time.monotonic()
    assert read_file(readable, "certificate file", other) == world.user.cert_path.read_bytes()
    assert read_file(str(world.ca.cert_path), "truststore") == world.ca.cert_path.read_bytes()
    assert time.monotonic() - started < PROMPT
    hanging_fuse.release()
    for thread in stuck:
        thread.join(10)
    assert read_file(readable, "certificate file", nobody, timeout=10)


def _read_quietly(path: str, access: FileAccess) -> None:
    with contextlib.suppress(FileRefused):
        read_file(path, "certificate file", access, timeout=60)


async def _valid_handshakes(world: World) -> list[tuple[int, str, float]]:
    """A PSK pair and an x509 pair whose server reads certificate files and whose client
    reads a truststore file, all at once."""
    a, b = tcp_pair()
    c, d = tcp_pair()
    psk = [("while-hanging", bytes(range(32)))]
    service = world.service
    with a, b, c, d:
        return list(await asyncio.wait_for(asyncio.gather(
            _timed(submit(a, role="client", auth="psk", psk=psk, service_path=service)),
            _timed(submit(b, role="server", auth="psk", psk=psk, service_path=service)),
            _timed(submit(c, role="client", auth="x509", truststore=world.ca.cert_path,
                          peername="localhost", service_path=service)),
            _timed(submit(d, role="server", auth="x509", certificate=world.user_dir / "cert.pem",
                          private_key=world.user_dir / "key.pem", service_path=service)),
        ), 60))


def test_the_agent_keeps_serving_while_a_consumer_file_hangs(
    world: World, hanging_fuse: HangingFuse
) -> None:
    """uid 65534 names a file whose open never returns: it gets ETIMEDOUT with a one-line
    reason; meanwhile other handshakes, reading certificate files too, complete at once."""
    request = {"role": "server", "auth": "x509", "certificate": hanging_fuse.file,
               "private_key": str(world.user_dir / "key.pem")}
    with agent_running(world):
        outcome: dict[str, Any] = {}
        consumer = threading.Thread(target=lambda: outcome.update(
            as_nobody(world, {"mode": "single", "request": request})))
        consumer.start()
        try:
            assert hanging_fuse.opens.acquire(timeout=30)  # the agent's reader is stuck now
            results = asyncio.run(_valid_handshakes(world))
            consumer.join(60)
        finally:
            hanging_fuse.release()
            consumer.join(60)
    assert [r[0] for r in results] == [0, 0, 0, 0], results
    assert max(r[2] for r in results) < PROMPT, results
    assert outcome["status"] == errno.ETIMEDOUT, outcome
    assert "took longer than" in outcome["reason"] and "\n" not in outcome["reason"]


def test_proc_magic_links_do_not_lead_past_closed_directories(world: World) -> None:
    """A 0644 file in a root-only directory, open in the agent: ``/proc/self/fd/N`` would hand
    it to uid 65534 without the directory's permission. The lookup follows no magic link."""
    inside = world.secret_dir / "public-mode.pem"
    inside.write_bytes(b"world-readable mode, closed directory")
    inside.chmod(0o644)
    nobody = FileAccess.of_consumer(NOBODY, NOBODY)
    with pytest.raises(FileRefused, match="not readable by uid 65534"):
        read_file(str(inside), "certificate file", nobody)
    fd = os.open(inside, os.O_RDONLY)
    try:
        for path in (f"/proc/self/fd/{fd}", f"/proc/{os.getpid()}/fd/{fd}"):
            with pytest.raises(FileRefused) as info:
                read_file(path, "certificate file", nobody)
            assert info.value.errno == errno.ENOKEY
        # An ordinary symlink is still followed (with the reader's rights).
        link = world.attacker / "ordinary-link.pem"
        link.symlink_to(world.user_dir / "cert.pem")
        assert read_file(str(link), "certificate file", nobody) == world.user.cert_path.read_bytes()
    finally:
        os.close(fd)


# --- 5. the size cap is the configuration's -------------------------------------------------------
def test_max_file_bytes_from_the_configuration_caps_what_is_read(world: World) -> None:
    """``[ktlsd] max_file_bytes`` reaches the reader: a valid certificate file padded past a
    4 KiB cap is refused by its size; with the default cap the same file serves a handshake."""
    padded = world.base / "padded-cert.pem"
    padded.write_bytes(world.user.cert_path.read_bytes() + b"# padding\n" * 600)  # > 4 KiB
    padded.chmod(0o644)
    files = (f"[authenticate.server]\nx509.certificate = {padded}\n"
             f"x509.private_key = {world.user_dir / 'key.pem'}\n")
    request = {"role": "server", "auth": "x509"}
    with agent_running(world, "max_file_bytes = 4096\n" + files):
        bad, _, _ = asyncio.run(_hostile_and_valid(world.service, request, 900))
    assert bad[0] == errno.ENOKEY and "larger than" in bad[1], bad
    with agent_running(world, files):
        result = asyncio.run(_served_by(world.service, request))
    assert result == 0
