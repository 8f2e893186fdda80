#!/usr/bin/env python3
"""CPU per TLS 1.3 handshake: ktlsd's engine next to OpenSSL's C floor, same machine, same run.

Both ends run in one process in both programs, over TCP loopback connections made beforehand
(connecting and closing are outside the measured spans):

* ktlsd: ``perform_handshake`` for the client and the server end, one asyncio task each, on
  one event loop, one connection at a time; CPU is getrusage (user + system) of the process;
* the C floor: bench/c/handshake_floor.c, built here with ``cc`` against the same libssl,
  calling ``SSL_do_handshake`` on both ends in turn (no callbacks, no keylog): what the
  handshake costs OpenSSL itself;
* the C floor+keylog: the same program with a keylog callback that keeps the two application
  traffic secrets -- what any kTLS agent on OpenSSL 3.0 must do to get them (OpenSSL formats
  every secret as hex for that callback; there is no other way in 3.0).

Cases: x509 (ECDSA P-256 server certificate; the client verifies chain and name) and external
PSK (SHA-256, with (EC)DHE). The rounds interleave ktlsd and C (each in its own child process,
the order alternating) so that the load of a shared machine hits both; the summary prints
each figure's median and range and two ratio lines per case, ``ktlsd/C-floor <case>`` and
``ktlsd/C-floor+keylog <case>``, the medians of the per-round ratios.

    python bench/handshake_rate.py [--rounds 3] [--count 1000] [--cases x509,psk]
    python bench/handshake_rate.py --inflight 64        # also ktlsd with 64 handshakes at once
    python bench/handshake_rate.py --profile psk        # cProfile: top functions per handshake
    python bench/handshake_rate.py --breakdown          # where ktlsd's CPU goes, see below
    python bench/handshake_rate.py --per-end            # each end against the C floor's other
    python bench/handshake_rate.py --rss 2000           # leak check: RSS over N handshakes

``--breakdown`` measures, per case and round: ktlsd's CPU inside ``SSL_do_handshake`` (thread
CPU time around each call; the keylog/PSK callbacks, which run in there, separately), the C
floor with the keylog callback (what OpenSSL spends formatting the secrets ktlsd needs),
the C floor's own time inside ``SSL_do_handshake``, and an asyncio floor: both ends doing what
the driver does (a future, a timer, a reader registration, peek and consume, send) for three
flights of the real handshake's sizes, without TLS. Timing the calls costs a little CPU of its
own, so these figures are a breakdown, not the headline.

``--per-end`` runs one end in ktlsd and the other in the C floor program (its own process),
then the other way round: ktlsd's client against the C server, the C client against ktlsd's
server. Each process counts its own CPU per handshake (connecting and closing included), so
each of ktlsd's ends stands next to the C floor's same end.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cfloor
from pki import Authority

from ktlsd.credentials import X509Credentials
from ktlsd.errors import HandshakeError
from ktlsd.tls.handshake import PskKey, TlsConfig, TlsHandshake, perform_handshake
from ktlsd.tls.session import Role

CASES = ("x509", "psk")
BATCH = 100  # connections made (and later closed) outside the measured span at a time
PSK = PskKey(b"bench-host", bytes(range(32)))  # the same identity and key as the C floor


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Material:
    """A throwaway CA and ECDSA P-256 server certificate, and the configurations per case."""

    def __init__(self, directory: Path) -> None:
        ca = Authority.create(directory, "ecdsa", "Bench CA")
        server = ca.issue_server()
        self.ca_file = ca.cert_path
        self.cert_file, self.key_file = server.cert_path, server.key_path
        credentials = X509Credentials.from_pem_files(str(server.cert_path), str(server.key_path))
        self.configs: dict[str, tuple[TlsConfig, TlsConfig]] = {
            "x509": (
                TlsConfig(role=Role.CLIENT, truststore=str(ca.cert_path), peername="localhost"),
                TlsConfig(role=Role.SERVER, credentials=credentials),
            ),
            "psk": (
                TlsConfig(role=Role.CLIENT, psk_keys=(PSK,)),
                TlsConfig(role=Role.SERVER, psk_lookup={PSK.identity: PSK}.get),
            ),
            "failing": (  # unknown PSK identity, for the leak check
                TlsConfig(role=Role.CLIENT, psk_keys=(PskKey(b"stranger", bytes(32)),)),
                TlsConfig(role=Role.SERVER, psk_lookup={PSK.identity: PSK}.get),
            ),
        }

    def floor_args(self, case: str, count: int) -> list[str]:
        if case == "x509":
            return ["x509", str(count), str(self.cert_file), str(self.key_file), str(self.ca_file)]
        return ["psk", str(count)]


def connect_pairs(listener: socket.socket, count: int) -> list[tuple[socket.socket, socket.socket]]:
    pairs = []
    for _ in range(count):
        client = socket.socket()
        client.connect(listener.getsockname())
        server, _ = listener.accept()
        pairs.append((client, server))
    return pairs


async def cpu_in_batches(
    listener: socket.socket,
    count: int,
    batch: Callable[[list[tuple[socket.socket, socket.socket]]], Awaitable[None]],
) -> float:
    """CPU seconds ``batch`` spends over ``count`` connection pairs, made (and closed) up to
    :data:`BATCH` at a time outside the measured spans."""
    spent = 0.0
    done = 0
    while done < count:
        pairs = connect_pairs(listener, min(BATCH, count - done))
        before = cpu_seconds()
        await batch(pairs)
        spent += cpu_seconds() - before
        for a, b in pairs:
            a.close()
            b.close()
        done += len(pairs)
    return spent


async def handshake_pairs(
    pairs: list[tuple[socket.socket, socket.socket]],
    client: TlsConfig,
    server: TlsConfig,
    *,
    inflight: int = 1,
    strict: bool = True,
) -> None:
    async def both(pair: tuple[socket.socket, socket.socket]) -> None:
        # The server end in a task of its own, the client end in this one: the least
        # scaffolding that runs both at once (the agent runs each request in a task anyway).
        server_end = asyncio.ensure_future(perform_handshake(pair[1], server, timeout=30))
        try:
            await perform_handshake(pair[0], client, timeout=30)
        except HandshakeError:
            if strict:
                raise
        finally:
            try:
                await server_end
            except HandshakeError:
                if strict:
                    raise

    if inflight == 1:
        for pair in pairs:
            await both(pair)
    else:
        for start in range(0, len(pairs), inflight):
            await asyncio.gather(*(both(p) for p in pairs[start : start + inflight]))


def measure_ktlsd(
    material: Material,
    case: str,
    count: int,
    *,
    inflight: int = 1,
    spans: cProfile.Profile | None = None,
) -> float:
    """CPU microseconds per handshake (both ends) over ``count`` handshakes."""
    client, server = material.configs[case]
    strict = case != "failing"
    spent = 0.0
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(BATCH)

        async def main() -> None:
            nonlocal spent
            warm_up = connect_pairs(listener, 20)
            await handshake_pairs(warm_up, client, server, strict=strict)
            for a, b in warm_up:
                a.close()
                b.close()

            async def batch(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
                if spans is not None:
                    spans.enable()
                await handshake_pairs(pairs, client, server, inflight=inflight, strict=strict)
                if spans is not None:
                    spans.disable()

            spent = await cpu_in_batches(listener, count, batch)

        asyncio.run(main())
    return spent * 1e6 / count


class _FlightEnd:
    """One end of a handshake without TLS: the driver's event-loop work for given flights."""

    def __init__(self, sock: socket.socket, sends: list[bytes], expects: list[int]) -> None:
        self.loop = asyncio.get_running_loop()
        self.sock, self.fd = sock, sock.fileno()
        self.sends, self.expects = sends, expects
        self.buf = memoryview(bytearray(1 << 15))
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.timer = self.loop.call_later(30, self.done.cancel)
        self.reading = False

    def start(self, send_first: bool) -> None:
        if send_first:
            self.sock.send(self.sends.pop(0), socket.MSG_DONTWAIT)
        else:
            self.on_readable()
        if not self.done.done() and not self.reading:
            self.reading = True
            self.loop.add_reader(self.fd, self.on_readable)

    def on_readable(self) -> None:
        try:
            size = self.sock.recv_into(self.buf, 1 << 15, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        if size < self.expects[0]:
            return
        self.sock.recv_into(self.buf, self.expects.pop(0), socket.MSG_DONTWAIT)
        if self.sends:
            self.sock.send(self.sends.pop(0), socket.MSG_DONTWAIT)
        if not self.expects:
            self.timer.cancel()
            if self.reading:
                self.loop.remove_reader(self.fd)
            self.done.set_result(None)


def flight_sizes(material: Material, case: str) -> tuple[int, int, int]:
    """Bytes of the ClientHello, of the server's flight and of the client's last flight."""
    client_config, server_config = material.configs[case]
    with TlsHandshake(client_config) as client, TlsHandshake(server_config) as server:
        hello = client.start()
        flight = server.receive(hello)[1]
        last = client.receive(flight)[1]
        return len(hello), len(flight), len(last)


def measure_asyncio_floor(material: Material, case: str, count: int) -> float:
    """CPU microseconds per pseudo-handshake: the two ends' event-loop and socket work."""
    hello, flight, last = flight_sizes(material, case)
    spent = 0.0
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(BATCH)

        async def both(pair: tuple[socket.socket, socket.socket]) -> None:
            client = _FlightEnd(pair[0], [bytes(hello), bytes(last)], [flight])
            server = _FlightEnd(pair[1], [bytes(flight)], [hello, last])
            client.start(send_first=True)

            async def serve() -> None:
                server.start(send_first=False)
                await server.done

            server_end = asyncio.ensure_future(serve())
            await client.done
            await server_end

        async def main() -> None:
            nonlocal spent

            async def batch(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
                for pair in pairs:
                    await both(pair)

            spent = await cpu_in_batches(listener, count, batch)

        asyncio.run(main())
    return spent * 1e6 / count


def child_inside(case: str, count: int) -> None:
    """ktlsd's CPU inside SSL_do_handshake and in the Python callbacks (fresh process: the
    callbacks are wrapped before any context installs them)."""
    from time import thread_time

    from ktlsd.tls import _openssl as ossl

    spent = {"inside": 0.0, "callbacks": 0.0}
    do_handshake = ossl.SSL_do_handshake

    def timed_do_handshake(ssl: int) -> int:
        before = thread_time()
        try:
            return int(do_handshake(ssl))
        finally:
            spent["inside"] += thread_time() - before

    def timed(callback, c_type):  # type: ignore[no-untyped-def]
        def wrapper(*args):  # type: ignore[no-untyped-def]
            before = thread_time()
            try:
                return callback(*args)
            finally:
                spent["callbacks"] += thread_time() - before

        return c_type(wrapper)

    ossl.SSL_do_handshake = timed_do_handshake
    ossl._KEYLOG = timed(ossl._keylog_cb, ossl.KEYLOG_CB)
    ossl._PSK_USE = timed(ossl._psk_use_cb, ossl.PSK_USE_CB)
    ossl._PSK_FIND = timed(ossl._psk_find_cb, ossl.PSK_FIND_CB)
    ossl._CLIENT_HELLO = timed(ossl._client_hello_cb, ossl.CLIENT_HELLO_CB)
    with tempfile.TemporaryDirectory() as directory:
        material = Material(Path(directory))
        measure_ktlsd(material, case, 20)
        spent["inside"] = spent["callbacks"] = 0.0
        total = measure_ktlsd(material, case, count)
        asyncio_floor = measure_asyncio_floor(material, case, count)
    print(f"total {total:.1f} inside {spent['inside'] * 1e6 / count:.1f} "
          f"callbacks {spent['callbacks'] * 1e6 / count:.1f} asyncio_floor {asyncio_floor:.1f}")


def breakdown(material: Material, cases: list[str], rounds: int, count: int) -> None:
    floor = cfloor.build("handshake_floor")
    print(f"Where the CPU per handshake goes (both ends, us), {count} handshakes per figure, "
          f"{rounds} rounds; load average {os.getloadavg()[0]:.1f}")
    for case in cases:
        rows: dict[str, list[float]] = {}
        for _ in range(rounds):
            out = subprocess.run(
                [sys.executable, __file__, "--child-inside", case, "--count", str(count)],
                capture_output=True, text=True, check=True, timeout=900,
            ).stdout.split()
            ktlsd = {k: float(v) for k, v in zip(out[::2], out[1::2], strict=True)}
            args = material.floor_args(case, count)
            plain = cfloor.run_floor(floor, *args)["cpu_us_per_handshake"]
            keylog = cfloor.run_floor(floor, *args, env={"KTLSD_FLOOR_KEYLOG": "1"})
            inside = cfloor.run_floor(floor, *args, env={"KTLSD_FLOOR_INSIDE": "1"})
            for name, value in (
                ("ktlsd, total (timed calls included)", ktlsd["total"]),
                ("ktlsd, inside SSL_do_handshake", ktlsd["inside"]),
                ("  of which Python callbacks (keylog, PSK)", ktlsd["callbacks"]),
                ("ktlsd, outside SSL_do_handshake", ktlsd["total"] - ktlsd["inside"]),
                ("asyncio floor (both ends, no TLS)", ktlsd["asyncio_floor"]),
                ("C floor", plain),
                ("C floor with the keylog callback", keylog["cpu_us_per_handshake"]),
                ("C floor, inside SSL_do_handshake", inside["inside_us_per_handshake"]),
            ):
                rows.setdefault(name, []).append(value)
        print(f"{case}:")
        for name, values in rows.items():
            print(f"  {name:<44} {spread(values):>24}")
        inside_ratio = [
            k / c for k, c in zip(rows["ktlsd, inside SSL_do_handshake"], rows["C floor"],
                                  strict=True)
        ]
        print(f"  ktlsd inside SSL_do_handshake / C floor: {statistics.median(inside_ratio):.2f}")


async def _ktlsd_end(role: Role, config: TlsConfig, count: int, port: int,
                     listener: socket.socket | None) -> float:
    """ktlsd's end of ``count`` (+20 warm-up) handshakes against the C floor's process."""
    loop = asyncio.get_running_loop()
    before = 0.0
    for i in range(count + 20):
        if i == 20:
            before = cpu_seconds()
        if listener is not None:
            sock, _ = await loop.sock_accept(listener)
        else:
            sock = socket.socket()
            sock.connect(("127.0.0.1", port))
        with sock:
            await perform_handshake(sock, config, timeout=30)
    return (cpu_seconds() - before) * 1e6 / count


def per_end(material: Material, cases: list[str], rounds: int, count: int) -> None:
    floor = cfloor.build("handshake_floor")
    print(f"CPU per handshake of each end alone (us), ktlsd against the C floor's other end, "
          f"{count} handshakes per figure, {rounds} rounds; load average "
          f"{os.getloadavg()[0]:.1f}")
    for case in cases:
        client_config, server_config = material.configs[case]
        figures: dict[str, list[float]] = {}
        for _ in range(rounds):
            # ktlsd's server, the C floor's client
            with socket.socket() as listener:
                listener.bind(("127.0.0.1", 0))
                listener.listen(64)
                listener.setblocking(False)
                port = listener.getsockname()[1]
                c_client = subprocess.Popen(
                    [str(floor), *material.floor_args(case, count)],
                    env={**os.environ, "KTLSD_FLOOR_END": f"client:{port}"},
                    stdout=subprocess.PIPE, text=True,
                )
                ours = asyncio.run(_ktlsd_end(Role.SERVER, server_config, count, port, listener))
                out, _ = c_client.communicate(timeout=600)
            figures.setdefault("ktlsd server", []).append(ours)
            figures.setdefault("C server", [])
            figures.setdefault("C client", []).append(float(out.split()[1]))
            # ktlsd's client, the C floor's server
            c_server = subprocess.Popen(
                [str(floor), *material.floor_args(case, count)],
                env={**os.environ, "KTLSD_FLOOR_END": "server"},
                stdout=subprocess.PIPE, text=True,
            )
            assert c_server.stdout is not None
            port = int(c_server.stdout.readline().split()[1])
            ours = asyncio.run(_ktlsd_end(Role.CLIENT, client_config, count, port, None))
            out, _ = c_server.communicate(timeout=600)
            figures.setdefault("ktlsd client", []).append(ours)
            figures["C server"].append(float(out.split()[1]))
        print(f"{case}: client: ktlsd {spread(figures['ktlsd client'])}, C floor "
              f"{spread(figures['C client'])}; server: ktlsd {spread(figures['ktlsd server'])}, "
              f"C floor {spread(figures['C server'])}")
        for end in ("client", "server"):
            ratios = [k / c for k, c in zip(figures[f"ktlsd {end}"], figures[f"C {end}"],
                                            strict=True)]
            print(f"  ktlsd/C-floor {case} {end} end: {statistics.median(ratios):.2f} "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)})")


def child(case: str, count: int, inflight: int) -> None:
    """Measure ktlsd in this (fresh) process; print the figure like the C floor does."""
    with tempfile.TemporaryDirectory() as directory:
        material = Material(Path(directory))
        cpu = measure_ktlsd(material, case, count, inflight=inflight)
    print(f"cpu_us_per_handshake {cpu:.1f}")


def run_child(case: str, count: int, inflight: int = 1) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--child", case, "--count", str(count),
         "--inflight", str(inflight)],
        capture_output=True, text=True, check=True, timeout=900,
    ).stdout.split()
    return float(out[1])


def spread(values: list[float], fmt: str = "{:.0f}") -> str:
    low, high = min(values), max(values)
    return f"{fmt.format(statistics.median(values))} (range {fmt.format(low)}-{fmt.format(high)})"


FLOORS = {"C floor": {}, "C floor+keylog": {"KTLSD_FLOOR_KEYLOG": "1"}}


def compare(material: Material, cases: list[str], rounds: int, count: int, inflight: int) -> None:
    floor = cfloor.build("handshake_floor")
    results: dict[str, dict[str, list[float]]] = {
        c: {"ktlsd": [], **{name: [] for name in FLOORS}, "inflight": []} for c in cases
    }
    print(f"CPU per handshake, both ends in one process, TCP loopback; {count} handshakes per "
          f"figure, {rounds} interleaved rounds; load average {os.getloadavg()[0]:.1f}")
    programs = ("ktlsd", *FLOORS)
    for r in range(rounds):
        for case in cases:
            measured: dict[str, float] = {}
            # Each program first, middle and last in turn, so that a change in load falls on
            # all of them.
            order = programs[r % 3:] + programs[:r % 3]
            for who in order:
                if who == "ktlsd":
                    measured[who] = run_child(case, count)
                else:
                    args = material.floor_args(case, count)
                    measured[who] = cfloor.run_floor(floor, *args, env=FLOORS[who])[
                        "cpu_us_per_handshake"]
            for who, value in measured.items():
                results[case][who].append(value)
            line = (f"round {r + 1} {case:>5}: ktlsd {measured['ktlsd']:6.0f} us, "
                    f"C floor {measured['C floor']:6.0f} us (ratio "
                    f"{measured['ktlsd'] / measured['C floor']:.2f}), C floor+keylog "
                    f"{measured['C floor+keylog']:6.0f} us (ratio "
                    f"{measured['ktlsd'] / measured['C floor+keylog']:.2f})")
            if inflight > 1:
                results[case]["inflight"].append(run_child(case, count, inflight))
                line += f"; ktlsd {inflight} in flight {results[case]['inflight'][-1]:.0f} us"
            print(line, flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print()
    for case in cases:
        figures = results[case]
        print(f"{case}: ktlsd {spread(figures['ktlsd'])} us, "
              f"C floor {spread(figures['C floor'])} us, "
              f"C floor+keylog {spread(figures['C floor+keylog'])} us per handshake (both ends)")
        if figures["inflight"]:
            print(f"{case}: ktlsd with {inflight} in flight {spread(figures['inflight'])} us")
    # The first line: against OpenSSL alone. The second: against OpenSSL plus the keylog
    # callback that any kTLS agent on OpenSSL 3.0 needs for the traffic secrets.
    for name in FLOORS:
        for case in cases:
            ratios = [k / c for k, c in zip(results[case]["ktlsd"], results[case][name],
                                            strict=True)]
            label = "ktlsd/C-floor" if name == "C floor" else "ktlsd/C-floor+keylog"
            print(f"{label} {case}: {statistics.median(ratios):.2f} "
                  f"(range {min(ratios):.2f}-{max(ratios):.2f}; rounds: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)})")


def profile(material: Material, case: str, count: int, top: int) -> None:
    """cProfile ``count`` handshakes; print the top functions by own time, per handshake.

    cProfile slows Python code down several times, so read the shares, not the microseconds;
    time spent inside C functions called through ctypes (SSL_do_handshake) is counted as the
    calling Python function's own time.
    """
    profiler = cProfile.Profile()
    measure_ktlsd(material, case, count, spans=profiler)
    stats = pstats.Stats(profiler)
    rows = stats.stats  # type: ignore[attr-defined]
    total = sum(tt for _, _, tt, _, _ in rows.values())
    print(f"cProfile, {case}, {count} handshakes, both ends: "
          f"{total * 1e6 / count:.0f} us per handshake under the profiler")
    print(f"{'own %':>6} {'calls/hs':>9} {'cum %':>6}  function")
    ranked = sorted(rows.items(), key=lambda item: item[1][2], reverse=True)[:top]
    for (filename, line, name), (_, calls, own, cumulative, _) in ranked:
        where = f"{Path(filename).name}:{line}" if line else filename
        print(f"{own / total:6.1%} {calls / count:9.1f} {cumulative / total:6.1%}  "
              f"{name} ({where})")


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_check(material: Material, count: int) -> None:
    print(f"RSS check: {count} handshakes per kind")
    for case in ("x509", "psk", "failing"):
        measure_ktlsd(material, case, 50)
        start = rss_mb()
        marks = []
        step = max(count // 4, 1)
        for _ in range(0, count, step):
            measure_ktlsd(material, case, step)
            marks.append(f"{rss_mb():.1f}")
        print(f"  {case}: RSS after warm-up {start:.1f} MB; then {' -> '.join(marks)} MB")


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--count", type=int, default=1000, help="handshakes per figure")
    ap.add_argument("--cases", default=",".join(CASES), help="x509,psk")
    ap.add_argument("--inflight", type=int, default=1,
                    help="also measure ktlsd with this many handshakes at once")
    ap.add_argument("--profile", choices=CASES, help="cProfile one case instead")
    ap.add_argument("--top", type=int, default=15, help="functions shown by --profile")
    ap.add_argument("--rss", type=int, default=0, help="leak check over N handshakes per kind")
    ap.add_argument("--breakdown", action="store_true", help="where the CPU goes, per case")
    ap.add_argument("--per-end", action="store_true", help="each end against the C floor's")
    ap.add_argument("--child", choices=(*CASES, "failing"), help=argparse.SUPPRESS)
    ap.add_argument("--child-inside", choices=CASES, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        child(args.child, args.count, args.inflight)
        return 0
    if args.child_inside:
        child_inside(args.child_inside, args.count)
        return 0
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := set(cases) - set(CASES):
        ap.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    with tempfile.TemporaryDirectory() as directory:
        material = Material(Path(directory))
        if args.profile:
            profile(material, args.profile, args.count, args.top)
        elif args.rss:
            rss_check(material, args.rss)
        elif args.breakdown:
            breakdown(material, cases, args.rounds, args.count)
        elif args.per_end:
            per_end(material, cases, args.rounds, args.count)
        else:
            compare(material, cases, args.rounds, args.count, args.inflight)
    return 0


if __name__ == "__main__":
    sys.exit(main())
