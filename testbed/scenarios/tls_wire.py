"""What two TLS 1.3 peers really negotiated, read off the wire (stdlib only, guest and host).

The agents' own logs differ (tlshd does not log its suite at all), so the test bed looks at
the handshake's first two messages, which travel in clear text: the client's ClientHello
(offered suites, and in its ``pre_shared_key`` extension the PSK identities with one binder
each -- the binder's length is the hash the client bound the PSK to: 32 bytes SHA-256,
48 bytes SHA-384) and the server's ServerHello (the suite chosen, the PSK selected).

:class:`Capture` reads IPv4 packets from an ``AF_PACKET`` socket bound to one interface (the
loopback device, or a veth end inside a network namespace: the socket keeps the namespace it
was made in), keeps the TCP segments to or from the given server ports, and after it is
stopped reassembles each connection's first bytes in both directions. Data packets after
the hellos are ignored; stop the capture before bulk I/O starts. Nothing secret is on the
wire at this point: the hellos are public, the identities are key *names*.

:func:`parse_client_hello` / :func:`parse_server_hello` are the pure parsers; they take the
bytes a TCP stream starts with (TLS records) and raise :class:`WireError` on anything that
is not a well-formed hello.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

SUITES = {
    0x1301: "TLS_AES_128_GCM_SHA256",
    0x1302: "TLS_AES_256_GCM_SHA384",
    0x1303: "TLS_CHACHA20_POLY1305_SHA256",
    0x1304: "TLS_AES_128_CCM_SHA256",
    0x1305: "TLS_AES_128_CCM_8_SHA256",
}
BINDER_HASH = {32: "SHA-256", 48: "SHA-384"}
#: NVMe TLS PSK identities ("NVMe<v><R|G><hh> ...") name the PSK's hash: 01 SHA-256, 02 SHA-384.
NVME_PSK_HASH = {"01": "SHA-256", "02": "SHA-384"}
EXT_PRE_SHARED_KEY = 41
EXT_SUPPORTED_VERSIONS = 43
EXT_KEY_SHARE = 51
#: Key exchange groups by code point (IANA TLS Supported Groups), as OpenSSL names them.
GROUPS = {
    0x0017: "secp256r1", 0x0018: "secp384r1", 0x0019: "secp521r1", 0x001D: "x25519",
    0x001E: "x448", 0x11EB: "SecP256r1MLKEM768", 0x11EC: "X25519MLKEM768",
    0x11ED: "SecP384r1MLKEM1024", 0x0200: "MLKEM512", 0x0201: "MLKEM768", 0x0202: "MLKEM1024",
}
X25519MLKEM768 = 0x11EC
#: ServerHello.random of a HelloRetryRequest (RFC 8446 4.1.3).
HRR_RANDOM = bytes.fromhex("cf21ad74e59a6111be1d8c021e65b891c2a211167abb8c5e079e09e2c8a8339c")
ETH_P_IP = 0x0800
#: A packet socket bound to one protocol sees only packets coming in; the hellos a namespace
#: *sends* are seen by an ETH_P_ALL socket only.
ETH_P_ALL = 0x0003


class WireError(ValueError):
    """The bytes are not the TLS hello they should be."""


def suite_name(code: int) -> str:
    return SUITES.get(code, f"0x{code:04x}")


def suite_hash(name: str) -> str:
    """``TLS_AES_256_GCM_SHA384`` -> ``SHA-384``."""
    return "SHA-384" if name.endswith("SHA384") else "SHA-256" if name.endswith("SHA256") else "?"


def psk_hash_of_identity(identity: str) -> str | None:
    """The PSK hash an NVMe identity names (``NVMe0R02 ...`` -> SHA-384), else None."""
    head = identity.split(" ", 1)[0]
    if len(head) == 8 and head.startswith("NVMe") and head[5] in "RG":
        return NVME_PSK_HASH.get(head[6:8])
    return None


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise WireError(f"{self.what}: truncated at byte {self.pos} (wanted {n} more)")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack("!H", self.take(2))[0])

    def u24(self) -> int:
        return int.from_bytes(self.take(3), "big")

    def vec(self, length_bytes: int) -> bytes:
        n = {1: self.u8, 2: self.u16, 3: self.u24}[length_bytes]()
        return self.take(n)

    def done(self) -> bool:
        return self.pos == len(self.data)


def first_handshake_message(stream: bytes, what: str) -> tuple[int, bytes]:
    """(type, body) of the first handshake message in a stream of TLS records.

    The message may span several handshake records; anything else first is an error.
    """
    collected = b""
    pos = 0
    while True:
        if len(collected) >= 4:
            need = 4 + int.from_bytes(collected[1:4], "big")
            if len(collected) >= need:
                return collected[0], collected[4:need]
        if pos + 5 > len(stream):
            raise WireError(f"{what}: stream ends inside the first handshake message")
        ctype, _version, length = struct.unpack("!BHH", stream[pos : pos + 5])
        if ctype != 22:
            raise WireError(f"{what}: first record has content type {ctype}, not handshake (22)")
        if pos + 5 + length > len(stream):
            raise WireError(f"{what}: stream ends inside a record")
        collected += stream[pos + 5 : pos + 5 + length]
        pos += 5 + length


def _extensions(r: _Reader) -> dict[int, bytes]:
    if r.done():
        return {}
    ext = _Reader(r.vec(2), r.what + " extensions")
    out: dict[int, bytes] = {}
    while not ext.done():
        etype = ext.u16()
        out[etype] = ext.vec(2)
    return out


@dataclass(frozen=True)
class ClientHello:
    offered_suites: tuple[str, ...]
    psk_identities: tuple[str, ...]
    binder_lengths: tuple[int, ...]
    tls13: bool
    #: The groups of the key_share extension's entries, in order (code points).
    key_share_groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class ServerHello:
    suite: str
    selected_identity: int | None
    hello_retry: bool
    tls13: bool
    #: The group of the server's key_share (a HelloRetryRequest names the group it wants).
    key_share_group: int | None = None


def parse_client_hello(stream: bytes) -> ClientHello:
    htype, body = first_handshake_message(stream, "ClientHello")
    if htype != 1:
        raise WireError(f"ClientHello: handshake type {htype}, not client_hello (1)")
    r = _Reader(body, "ClientHello")
    r.take(2 + 32)  # legacy_version, random
    r.vec(1)  # legacy_session_id
    raw = r.vec(2)
    suites = tuple(suite_name(c) for (c,) in struct.iter_unpack("!H", raw) if c & 0x0F0F != 0x0A0A)
    r.vec(1)  # compression methods
    ext = _extensions(r)
    identities: list[str] = []
    binders: list[int] = []
    if EXT_PRE_SHARED_KEY in ext:
        psk = _Reader(ext[EXT_PRE_SHARED_KEY], "pre_shared_key")
        ids = _Reader(psk.vec(2), "PskIdentity list")
        while not ids.done():
            identities.append(ids.vec(2).decode("utf-8", "replace"))
            ids.take(4)  # obfuscated_ticket_age
        bl = _Reader(psk.vec(2), "PskBinderEntry list")
        while not bl.done():
            binders.append(len(bl.vec(1)))
        if len(identities) != len(binders):
            raise WireError(f"pre_shared_key: {len(identities)} identities, {len(binders)} binders")
    versions = ext.get(EXT_SUPPORTED_VERSIONS, b"")
    tls13 = b"\x03\x04" in [versions[i : i + 2] for i in range(1, len(versions), 2)]
    shares: list[int] = []
    if EXT_KEY_SHARE in ext:
        entries = _Reader(_Reader(ext[EXT_KEY_SHARE], "key_share").vec(2), "KeyShareEntry list")
        while not entries.done():
            shares.append(entries.u16())
            entries.vec(2)  # key_exchange
    return ClientHello(suites, tuple(identities), tuple(binders), tls13, tuple(shares))


def parse_server_hello(stream: bytes) -> ServerHello:
    htype, body = first_handshake_message(stream, "ServerHello")
    if htype != 2:
        raise WireError(f"ServerHello: handshake type {htype}, not server_hello (2)")
    r = _Reader(body, "ServerHello")
    r.take(2)
    random = r.take(32)
    r.vec(1)
    suite = suite_name(r.u16())
    r.u8()
    ext = _extensions(r)
    selected = None
    if EXT_PRE_SHARED_KEY in ext and len(ext[EXT_PRE_SHARED_KEY]) == 2:
        selected = int(struct.unpack("!H", ext[EXT_PRE_SHARED_KEY])[0])
    tls13 = ext.get(EXT_SUPPORTED_VERSIONS) == b"\x03\x04"
    share = ext.get(EXT_KEY_SHARE)
    group = int(struct.unpack("!H", share[:2])[0]) if share and len(share) >= 2 else None
    return ServerHello(suite, selected, random == HRR_RANDOM, tls13, group)


@dataclass
class Handshake:
    """One TCP connection's hellos (either may be missing if the peer never sent it)."""

    client: str
    server: str
    client_hello: ClientHello | None = None
    server_hello: ServerHello | None = None
    error: str | None = None

    @property
    def binder_bytes(self) -> int | None:
        ch, sh = self.client_hello, self.server_hello
        if ch is None or not ch.binder_lengths:
            return None
        index = sh.selected_identity if sh and sh.selected_identity is not None else 0
        return ch.binder_lengths[min(index, len(ch.binder_lengths) - 1)]

    @property
    def identity(self) -> str | None:
        ch = self.client_hello
        return ch.psk_identities[0] if ch and ch.psk_identities else None

    def summary(self) -> dict[str, object]:
        """Suite, binder size and hash, PSK hash (from an NVMe identity), in words."""
        sh = self.server_hello
        binder = self.binder_bytes
        ident = self.identity
        out: dict[str, object] = {
            "suite": sh.suite if sh else None,
            "binder_bytes": binder,
            "binder_hash": BINDER_HASH.get(binder or 0) if binder else None,
            "psk_hash": psk_hash_of_identity(ident) if ident else None,
            "identity_kind": ident.split(" ", 1)[0] if ident else None,
        }
        if sh and sh.hello_retry:
            out["hello_retry"] = True
        if self.error:
            out["error"] = self.error
        return out


def describe(summaries: list[dict[str, object]]) -> str:
    """One line for a set of handshake summaries: ``3 x TLS_AES_256_GCM_SHA384, 48-byte
    binder (SHA-384), PSK NVMe0R02 (SHA-384)``; several kinds are joined with ``; ``."""
    groups: dict[str, int] = {}
    for s in summaries:
        parts = [str(s.get("suite") or "no ServerHello")]
        if s.get("binder_bytes"):
            parts.append(f"{s['binder_bytes']}-byte binder ({s.get('binder_hash') or '?'})")
        if s.get("identity_kind"):
            parts.append(f"PSK {s['identity_kind']} ({s.get('psk_hash') or '?'})")
        key = ", ".join(parts)
        groups[key] = groups.get(key, 0) + 1
    return "; ".join(f"{n} x {k}" for k, n in groups.items()) or "no TLS handshake seen"


def legacy_binding(summary: dict[str, object]) -> bool:
    """A SHA-384 PSK bound to SHA-256 (the tlshd 1.0 / GnuTLS < 3.8.11 way)."""
    return summary.get("psk_hash") == "SHA-384" and summary.get("binder_hash") == "SHA-256"


# -- packets -> streams ----------------------------------------------------------------------


@dataclass
class _Flow:
    isn: int | None = None
    segments: dict[int, bytes] = field(default_factory=dict)

    def stream(self, limit: int = 1 << 16) -> bytes:
        if not self.segments:
            return b""
        start = self.isn if self.isn is not None else min(self.segments)
        out = bytearray()
        # Walk segments in sequence order; overlaps (retransmissions) are trimmed.
        for seq in sorted(self.segments, key=lambda s: (s - start) & 0xFFFFFFFF):
            offset = (seq - start) & 0xFFFFFFFF
            data = self.segments[seq]
            if offset > len(out):
                break  # a hole: keep what is contiguous
            out += data[len(out) - offset :]
            if len(out) >= limit:
                break
        return bytes(out)


def skip_rpc_records(stream: bytes, limit: int = 4) -> bytes:
    """``stream`` after the ONC RPC records (RFC 5531 record marking) it starts with.

    RPC-with-TLS (RFC 9289) opens with a clear-text NULL call carrying AUTH_TLS and its
    reply; the TLS handshake follows on the same connection.
    """
    for _ in range(limit):
        if not stream or stream[0] == 22 or len(stream) < 4:
            break
        marker = int(struct.unpack("!I", stream[:4])[0])
        stream = stream[4 + (marker & 0x7FFFFFFF) :]
    return stream


class TcpStreams:
    """Reassembles the first bytes of each direction of each TCP connection from IPv4
    packets (no link-layer header), keeping only connections to ``server_ports``.
    ``rpc``: the TLS handshake follows clear-text RPC records (NFS), skip them."""

    def __init__(self, server_ports: set[int], rpc: bool = False) -> None:
        self.server_ports = server_ports
        self.rpc = rpc
        self.flows: dict[tuple[str, int, str, int], _Flow] = {}
        self.order: list[tuple[str, int, str, int]] = []

    def add_ipv4(self, packet: bytes) -> None:
        if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != 6:
            return
        ihl = (packet[0] & 0x0F) * 4
        total = int(struct.unpack("!H", packet[2:4])[0]) or len(packet)
        src, dst = socket.inet_ntoa(packet[12:16]), socket.inet_ntoa(packet[16:20])
        tcp = packet[ihl:total]
        if len(tcp) < 20:
            return
        sport, dport, seq = struct.unpack("!HHI", tcp[:8])
        if sport not in self.server_ports and dport not in self.server_ports:
            return
        flags = tcp[13]
        data = tcp[(tcp[12] >> 4) * 4 :]
        key = (src, sport, dst, dport)
        flow = self.flows.get(key)
        if flow is None:
            flow = self.flows[key] = _Flow()
            self.order.append(key)
        if flags & 0x02:  # SYN: data starts at seq + 1
            flow.isn = (seq + 1) & 0xFFFFFFFF
        if data and len(flow.segments) < 64:
            flow.segments.setdefault(seq, data)

    def handshakes(self) -> list[Handshake]:
        out: list[Handshake] = []
        for key in self.order:
            src, sport, dst, dport = key
            if dport not in self.server_ports:
                continue  # handled from the client's direction
            hs = Handshake(client=f"{src}:{sport}", server=f"{dst}:{dport}")
            up = self.flows[key].stream()
            back_flow = self.flows.get((dst, dport, src, sport))
            back = back_flow.stream() if back_flow is not None else b""
            if self.rpc:
                up, back = skip_rpc_records(up), skip_rpc_records(back)
            if not up or up[0] != 22:
                continue  # not a TLS connection (NVMe --concat's first, plain admin queue)
            try:
                hs.client_hello = parse_client_hello(up)
                if back:
                    hs.server_hello = parse_server_hello(back)
            except WireError as exc:
                hs.error = str(exc)
            out.append(hs)
        return out


class Capture:
    """Capture the TLS hellos of TCP connections to ``ports`` on interface ``ifname``.

    ``sock`` may be given already made (e.g. inside another network namespace); otherwise an
    ``AF_PACKET`` datagram socket for IPv4 is opened here. Use as a context manager around
    the connects; :meth:`handshakes` after it is left.
    """

    def __init__(
        self, ifname: str, ports: set[int], sock: socket.socket | None = None, rpc: bool = False
    ) -> None:
        self.streams = TcpStreams(ports, rpc)
        if sock is None:
            sock = packet_socket(ifname)
        self.sock = sock
        self.sock.settimeout(0.1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"capture-{ifname}", daemon=True)
        self.packets = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                packet, address = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if address[1] != ETH_P_IP:
                continue
            self.packets += 1
            self.streams.add_ipv4(packet)

    def __enter__(self) -> Capture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.05)  # let the last segments in the socket buffer be read
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()

    def handshakes(self) -> list[Handshake]:
        return self.streams.handshakes()

    def summaries(self) -> list[dict[str, object]]:
        return [h.summary() for h in self.handshakes()]


def packet_socket(ifname: str, make: object = None) -> socket.socket:
    """A datagram ``AF_PACKET`` socket seeing every packet in and out of ``ifname`` (needs
    CAP_NET_RAW). ``make(family, type, proto)`` creates the socket (default:
    ``socket.socket``; e.g. ``Netns.socket`` to capture inside a network namespace).
    Packets out *and* in: on ``lo`` each is seen twice, which reassembly ignores."""
    factory = make or socket.socket
    sock: socket.socket = factory(  # type: ignore[operator]
        socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL)
    )
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((ifname, ETH_P_ALL))
    return sock


# -- pcap files (tcpdump -w) -------------------------------------------------------------------

_PCAP_LINK_HEADER = {1: 14, 113: 16, 228: 0, 101: 0}  # Ethernet, Linux cooked, raw IPv4, raw


def pcap_ipv4_packets(data: bytes) -> list[bytes]:
    """The IPv4 packets of a classic pcap file (what ``tcpdump -w`` writes), link-layer
    header removed: Ethernet (``lo`` on Linux), Linux cooked capture (``-i any``) or raw IP.
    Raises :class:`WireError` for other formats and truncated files."""
    if len(data) < 24:
        raise WireError("pcap: shorter than its file header")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        endian = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        endian = ">"
    else:
        raise WireError(f"pcap: unknown magic {magic.hex()} (pcapng is not read here)")
    linktype = int(struct.unpack(endian + "I", data[20:24])[0]) & 0x0FFFFFFF
    if linktype not in _PCAP_LINK_HEADER:
        raise WireError(f"pcap: link type {linktype} not supported")
    skip = _PCAP_LINK_HEADER[linktype]
    packets: list[bytes] = []
    pos = 24
    while pos < len(data):
        if pos + 16 > len(data):
            raise WireError(f"pcap: truncated record header at byte {pos}")
        captured = int(struct.unpack(endian + "I", data[pos + 8 : pos + 12])[0])
        frame = data[pos + 16 : pos + 16 + captured]
        if len(frame) != captured:
            raise WireError(f"pcap: truncated packet at byte {pos}")
        pos += 16 + captured
        ethertype = b"\x08\x00"
        if linktype == 1:
            ethertype = frame[12:14]
        elif linktype == 113:
            ethertype = frame[14:16]
        if ethertype == b"\x08\x00" and len(frame) > skip:
            packets.append(frame[skip:])
    return packets


_RECORD_HEADER = struct.Struct(">BHH")


def record_list(stream: bytes) -> list[tuple[int, int]]:
    """(content type, length) of every TLS record in a captured stream; :class:`WireError` if
    the stream does not end on a record boundary."""
    out = []
    offset = 0
    while offset < len(stream):
        if len(stream) - offset < _RECORD_HEADER.size:
            raise WireError(f"captured stream ends inside a record header at {offset}")
        kind, _version, length = _RECORD_HEADER.unpack_from(stream, offset)
        offset += _RECORD_HEADER.size + length
        if offset > len(stream):
            raise WireError("captured stream ends inside a record")
        out.append((kind, length))
    return out


class RecordingRelay:
    """Two connected TCP ends, ``near_end`` and ``far_end``, joined through a relay that keeps
    every byte each way (``from_near``, ``from_far``): what went on the wire between them."""

    def __init__(self) -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        self.near_end = socket.create_connection(listener.getsockname())
        near, _ = listener.accept()
        self.far_end = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
        listener.close()
        self._sockets = [near, far]
        self.from_near = bytearray()
        self.from_far = bytearray()
        self._threads = [
            threading.Thread(target=self._pump, args=(near, far, self.from_near), daemon=True),
            threading.Thread(target=self._pump, args=(far, near, self.from_far), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, copy: bytearray) -> None:
        try:
            while data := src.recv(65536):
                copy += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in (self.near_end, self.far_end):
            sock.close()
        for thread in self._threads:
            thread.join(10)
        for sock in self._sockets:
            sock.close()
