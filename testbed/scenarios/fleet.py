"""The mixed-fleet topology: three "machines" (network namespaces) in one guest, one agent each.

::

    fleet-tlshd (tlshd)  f-tk 10.77.0.1 ==veth== 10.77.0.2 f-kt  fleet-ktlsd (ktlsd)
    fleet-ktlsd2 (ktlsd) f-rk 10.77.1.1 ==veth== 10.77.1.2 f-kr  fleet-ktlsd

``tlshd`` is Debian's ktls-utils (1.0.0 on trixie), ``ktlsd`` this project's agent (the end
whose ``[ktlsd]`` settings a scenario changes with SIGHUP), ``ktlsd2`` a second ktlsd with
default settings, the reference peer. A *pairing* ``(client side, server side)`` is one
direction: ``("tlshd", "ktlsd")`` is the tlshd host (NFS client) talking to the ktlsd target
(NFS server). Every pairing has ``ktlsd`` at one end, so one capture point -- the veth end in
fleet-ktlsd that faces the peer -- sees every connection's hellos.

The fleet-newtlshd topology (:data:`NEW_SIDES`, :data:`NEW_LINKS`) is two machines:
``tlshd-sid`` -- Debian unstable's tlshd, run from the chroot the image carries at
:data:`SID_ROOT` -- and ``ktlsd``::

    fleet-newtlshd (tlshd-sid) f-nk 10.77.2.1 ==veth== 10.77.2.2 f-kn  fleet-ktlsd (ktlsd)

Used by ``fleet_nvme.py``, ``fleet_nfs.py`` and ``fleet_newtlshd.py`` (stdlib only, runs in
the guest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from testbed.scenarios import netns as netns_mod
from testbed.scenarios.common import Agent, Scenario, ScenarioFailed, launch_agent, wait_ready
from testbed.scenarios.netns import Netns
from testbed.scenarios.tls_wire import Capture, packet_socket

#: side -> (agent program, namespace)
SIDES: dict[str, tuple[str, str]] = {
    "tlshd": ("tlshd", "fleet-tlshd"),
    "ktlsd": ("ktlsd", "fleet-ktlsd"),
    "ktlsd2": ("ktlsd", "fleet-ktlsd2"),
}
#: (side a, interface, address), (side b, interface, address) per veth pair
LINKS = (
    (("tlshd", "f-tk", "10.77.0.1"), ("ktlsd", "f-kt", "10.77.0.2")),
    (("ktlsd2", "f-rk", "10.77.1.1"), ("ktlsd", "f-kr", "10.77.1.2")),
)
ALL_ADDRESSES = tuple(end[2] for pair in LINKS for end in pair)
CROSS = (("tlshd", "ktlsd"), ("ktlsd", "tlshd"))
REFERENCE = ("ktlsd2", "ktlsd")

#: Debian unstable's tlshd: the chroot (in the guest image, see testbed/build.py) and the
#: build's record of what it holds.
SID_ROOT = Path("/opt/sid-tlshd")
SID_RECORD = Path("/opt/sid-tlshd.json")
NEW_SIDES: dict[str, tuple[str, str]] = {
    "newtlshd": ("tlshd-sid", "fleet-newtlshd"),
    "ktlsd": ("ktlsd", "fleet-ktlsd"),
}
NEW_LINKS = ((("newtlshd", "f-nk", "10.77.2.1"), ("ktlsd", "f-kn", "10.77.2.2")),)
NEW_CROSS = (("newtlshd", "ktlsd"), ("ktlsd", "newtlshd"))
#: Every side of either topology.
ALL_SIDES: dict[str, tuple[str, str]] = {**SIDES, **NEW_SIDES}


def agent_of(side: str) -> str:
    return ALL_SIDES[side][0]


def pairing_name(client: str, server: str) -> str:
    """``tlshd>ktlsd``; the reference pairing reads ``ktlsd>ktlsd``."""
    return f"{agent_of(client)}>{agent_of(server)}"


#: The guest's packages that make up "the other agent" and the consumers' tools.
PACKAGES = ("ktls-utils", "libgnutls30t64", "nvme-cli", "nfs-kernel-server")


def package_versions(sc: Scenario) -> dict[str, str]:
    """``{package: version}`` from the guest's dpkg database (a figure of the scenario)."""
    out = sc.sh(["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *PACKAGES],
                check=False).stdout  # fmt: skip
    versions = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
    sc.figure("packages", versions)
    return versions


Link = tuple[tuple[str, str, str], tuple[str, str, str]]


@dataclass
class Fleet:
    namespaces: dict[str, Netns] = field(default_factory=dict)
    agents: dict[str, Agent] = field(default_factory=dict)
    configs: dict[str, Path] = field(default_factory=dict)
    sides: dict[str, tuple[str, str]] = field(default_factory=lambda: dict(SIDES))
    links: tuple[Link, ...] = LINKS

    @classmethod
    def create(
        cls,
        sc: Scenario,
        sides: dict[str, tuple[str, str]] = SIDES,
        links: tuple[Link, ...] = LINKS,
    ) -> Fleet:
        """Make the namespaces and veth pairs (removed when the scenario ends); the default
        topology is the three-machine one above."""
        fleet = cls(sides=dict(sides), links=links)
        for side, (_agent, name) in fleet.sides.items():
            fleet.namespaces[side] = netns_mod.create(name)
            sc.cleanup(lambda ns=fleet.namespaces[side]: netns_mod.delete(ns), f"delete {name}")
        for (a, a_if, a_addr), (b, b_if, b_addr) in links:
            netns_mod.link(fleet.namespaces[a], a_if, a_addr, fleet.namespaces[b], b_if, b_addr)
        sc.detail(
            "topology: "
            + "; ".join(f"{a}@{aa} <-veth-> {b}@{ba}" for (a, _, aa), (b, _, ba) in links)
        )
        return fleet

    def start_agents(self, sc: Scenario, configs: dict[str, Path]) -> None:
        """Start every side's agent in its namespace, all at once, and wait for each."""
        self.configs = dict(configs)
        for side, (agent, _name) in self.sides.items():
            self.agents[side] = launch_agent(
                sc, agent, configs[side], f"fleet-{side}", self.namespaces[side]
            )
        for handle in self.agents.values():
            wait_ready(sc, handle)

    def _end(self, side: str, peer: str) -> tuple[str, str, str]:
        for ends in self.links:
            by_side = {end[0]: end for end in ends}
            if side in by_side and peer in by_side:
                return by_side[side]
        raise KeyError(f"no link between {side} and {peer}")

    def address(self, side: str, peer: str) -> str:
        """``side``'s address on the link it shares with ``peer``."""
        return self._end(side, peer)[2]

    def interface(self, side: str, peer: str) -> str:
        """``side``'s interface on the link it shares with ``peer``."""
        return self._end(side, peer)[1]

    def capture(self, client: str, server: str, ports: set[int], rpc: bool = False) -> Capture:
        """A capture of the hellos between ``client`` and ``server`` on TCP ``ports``
        (``rpc``: after clear-text RPC records, as NFS does it)."""
        ifname = self.interface("ktlsd", server if client == "ktlsd" else client)
        sock = packet_socket(ifname, self.namespaces["ktlsd"].socket)
        return Capture(ifname, ports, sock, rpc)

    def marks(self) -> dict[str, int]:
        """Each agent's log length now (to look only at what a case added)."""
        return {side: len(agent.lines()) for side, agent in self.agents.items()}


def report(sc: Scenario, records: dict[str, dict[str, object]], hint: str = "") -> None:
    """The pairing table, bytes verified and cases as expected; fail on any unexpected case."""
    sc.figure("pairing_table", [
        f"{cid}: {r['outcome']} (expected {r.get('expected', 'pass')})"
        f"{' ' + str(r['connect_seconds']) + ' s' if 'connect_seconds' in r else ''}"
        f"{' mount ' + str(r['mount_seconds']) + ' s' if 'mount_seconds' in r else ''}"
        f" -- {r.get('wire', '')}{'' if r['ok'] else ' !! ' + str(r.get('why'))}"
        for cid, r in records.items()
    ])  # fmt: skip
    sc.figure("bytes_verified",
              sum(int(str(r.get("bytes_verified", 0))) for r in records.values()))
    bad = [cid for cid, r in records.items() if not r["ok"]]
    sc.figure("cases_as_expected", f"{len(records) - len(bad)}/{len(records)}")
    if bad:
        raise ScenarioFailed(f"{len(bad)} case(s) not as expected{hint}: {', '.join(bad)}")
