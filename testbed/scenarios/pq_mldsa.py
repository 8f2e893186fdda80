"""pq-mldsa: post-quantum TLS with ktlsd on the guest's OpenSSL 3.5 (issue 14 item 2).

Proves, with certificates made here by the guest's openssl 3.5 CLI (an ML-DSA-65 CA, server
and client, and a classic ECDSA P-256 CA, server and client; ``nfs_tls.make_pki``):

* NFS v4.2 ``xprtsec=mtls`` with ktlsd serving both the NFS client's and nfsd's handshakes,
  configured tlshd-style with both chains (``x509.certificate`` ECDSA and
  ``x509.pq.certificate`` ML-DSA-65) on both sides: 4 MiB written, read back after a remount
  and found in the export; the agent's handshake lines show ``group=X25519MLKEM768``,
  ``sig=mldsa65`` and ``peer_sig=mldsa65`` for client and server; a tcpdump capture of the
  mounts (parsed here: ``tls_wire.pcap_ipv4_packets``) shows every ClientHello's key_share
  carrying X25519MLKEM768 (0x11EC) and every ServerHello's key_share choosing it.
* ``ktlsd connect`` to ``openssl s_server``: with the ML-DSA chain only, with the classic
  chain only, and with both (``-cert``/``-dcert``) where s_server's ``-sigalgs`` decides;
  ktlsd's output names the scheme and the certificate it saw (``peer_sig=``, ``peer=``).
* Client chains chosen by the server's CertificateRequest: ``ktlsd connect --cert EC
  --pq-cert ML-DSA`` to ``s_server -Verify 1 -client_sigalgs X``: ktlsd sends the chain X
  names and s_server prints that certificate's subject.
* ``ktlsd listen`` with both chains, ``openssl s_client -sigalgs X``: s_client's "Peer
  signature type" is X and its server certificate the chain X needs.

Figures: mount seconds, handshakes logged, hellos captured.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import (
    PROJECT,
    Scenario,
    free_tcp_port,
    start_agent,
    write_tlshd_conf,
)
from testbed.scenarios.nfs_tls import make_pki, mount_and_check, start_nfsd
from testbed.scenarios.tls_wire import (
    GROUPS,
    X25519MLKEM768,
    TcpStreams,
    pcap_ipv4_packets,
)

ML_DSA = ("-newkey", "ML-DSA-65", "-nodes")
EXPORT = "/srv/nfs-pq-mtls"
NFS_PORT = 2049


def handshake_fields(line: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line))


def ktlsd_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ktlsd", *args]


def run_ktlsd(sc: Scenario, *args: str, timeout: float = 30) -> str:
    """A ``ktlsd connect`` with stdin at end of file: handshake, close_notify, exit 0;
    returns its stderr (the status lines)."""
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    argv = ktlsd_cmd(*args)
    print(f"$ {' '.join(argv)}", flush=True)
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip
    print(proc.stderr.rstrip(), flush=True)
    if proc.returncode != 0:
        sc.detail(f"ktlsd {' '.join(args[:2])} exited {proc.returncode}: "
                  f"{proc.stderr.strip().splitlines()[-1:]}")  # fmt: skip
    return proc.stderr


class SServer:
    """``openssl s_server`` for exactly one connection; its output after it ended."""

    def __init__(self, port: int, *args: str) -> None:
        argv = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-tls1_3",
                "-naccept", "1", *args]  # fmt: skip
        print(f"$ {' '.join(argv)}", flush=True)
        self.log = Path(f"/tmp/s_server-{port}.log")
        self.out = open(self.log, "wb")  # noqa: SIM115 - closed in finish()
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=self.out,
                                     stderr=subprocess.STDOUT)  # fmt: skip
        deadline = time.monotonic() + 20
        while b"ACCEPT" not in self.log.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"s_server did not start: {self.log.read_text()[-300:]}")
            time.sleep(0.05)

    def finish(self) -> str:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        text = self.log.read_text(errors="replace")
        print(text[-600:], flush=True)
        return text


def the_line(stderr: str) -> dict[str, str]:
    line = next((ln for ln in stderr.splitlines() if "handshake ok:" in ln), "")
    return handshake_fields(line)


def main() -> None:
    with Scenario() as sc:
        classic = make_pki(sc, Path("/tmp/pq-classic"), label="-ec")
        pq = make_pki(sc, Path("/tmp/pq-mldsa"), key_args=ML_DSA, label="-mldsa")
        key_type = sc.sh(["openssl", "pkey", "-in", str(pq["srv.key"]), "-noout", "-text"])
        sc.check("ML-DSA-65" in key_type.stdout, "the PQ server key is ML-DSA-65")
        trust = Path("/tmp/pq-trust.pem")
        trust.write_bytes(classic["ca.pem"].read_bytes() + pq["ca.pem"].read_bytes())

        # --- (b) NFS mtls between ktlsd ends, both chains on both sides ------------------------
        start_nfsd(sc, {EXPORT: "rw,sync,no_subtree_check,no_root_squash,xprtsec=mtls"})
        side = {"x509.truststore": str(trust)}
        conf = write_tlshd_conf(
            Path("/tmp/ktlsd-pq.conf"), keyrings=".nfs;.nfsd",
            client={**side, "x509.certificate": str(classic["cli.pem"]),
                    "x509.private_key": str(classic["cli.key"]),
                    "x509.pq.certificate": str(pq["cli.pem"]),
                    "x509.pq.private_key": str(pq["cli.key"])},
            server={**side, "x509.certificate": str(classic["srv.pem"]),
                    "x509.private_key": str(classic["srv.key"]),
                    "x509.pq.certificate": str(pq["srv.pem"]),
                    "x509.pq.private_key": str(pq["srv.key"])},
        )  # fmt: skip
        check = subprocess.run(ktlsd_cmd("run", "--check", "--config", str(conf)),
                               capture_output=True, text=True, timeout=60,
                               env=dict(os.environ, PYTHONPATH=str(PROJECT)))  # fmt: skip
        print(check.stderr + check.stdout, flush=True)
        sc.check(check.returncode == 0 and "ML-DSA chain" in check.stderr
                 and "ignored" not in check.stderr,
                 "run --check: both PQ chains usable (no 'ignored' warning)")  # fmt: skip
        agent = start_agent(sc, "ktlsd", conf, "pq")
        pcap = Path("/tmp/pq-nfs.pcap")
        dump = subprocess.Popen(["tcpdump", "-i", "lo", "-U", "-s", "0", "-w", str(pcap),
                                 "tcp", "port", str(NFS_PORT)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        sc.cleanup(lambda: dump.poll() is None and dump.kill(), "stop tcpdump")
        deadline = time.monotonic() + 20
        while not pcap.exists() or pcap.stat().st_size < 24:
            if dump.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("tcpdump did not start")
            time.sleep(0.05)
        sc.figure("bytes_verified", mount_and_check(sc, "mtls", EXPORT, "pq-mtls"))
        time.sleep(0.3)
        dump.terminate()
        dump.wait(timeout=10)

        lines = agent.successful_handshakes()
        sc.figure("agent_successful_handshakes_logged", len(lines))
        fields = [handshake_fields(ln) for ln in lines]
        for role in ("client", "server"):
            mine = [f for f in fields if f.get("role") == role]
            sc.check(len(mine) >= 2, f"agent logged >= 2 successful {role} handshakes")
            sc.detail(f"{role}: " + ", ".join(sorted({
                f"group={f.get('group')} sig={f.get('sig')} peer_sig={f.get('peer_sig')}"
                for f in mine})))  # fmt: skip
            sc.check(all(f.get("group") == "X25519MLKEM768" for f in mine),
                     f"every {role} handshake line says group=X25519MLKEM768")
            sc.check(all(f.get("sig") == "mldsa65" and f.get("peer_sig") == "mldsa65"
                         for f in mine),
                     f"every {role} handshake signed with ML-DSA-65 both ways (sig, peer_sig)")
        server_ids = {f.get("identity") for f in fields if f.get("role") == "server"}
        sc.check(server_ids == {"x509:CN=ktlsd-client-mldsa"},
                 f"nfsd's agent saw the ML-DSA client certificate ({server_ids})")

        streams = TcpStreams({NFS_PORT}, rpc=True)
        for packet in pcap_ipv4_packets(pcap.read_bytes()):
            streams.add_ipv4(packet)
        hellos = [h for h in streams.handshakes() if h.client_hello is not None]
        sc.figure("hellos_captured", len(hellos))
        sc.check(len(hellos) >= 2, "the capture holds the mounts' TLS handshakes")
        offered = {tuple(GROUPS.get(g, hex(g)) for g in h.client_hello.key_share_groups)
                   for h in hellos if h.client_hello}  # fmt: skip
        chosen = {GROUPS.get(h.server_hello.key_share_group or 0, "?")
                  for h in hellos if h.server_hello}  # fmt: skip
        sc.detail(f"captured ClientHello key_shares {sorted(offered)}, ServerHello {chosen}")
        sc.check(all(h.client_hello and X25519MLKEM768 in h.client_hello.key_share_groups
                     for h in hellos),
                 "every captured ClientHello carries an X25519MLKEM768 (0x11EC) key share")
        sc.check(all(h.server_hello and h.server_hello.key_share_group == X25519MLKEM768
                     for h in hellos),
                 "every captured ServerHello chose X25519MLKEM768 (0x11EC)")

        # --- (c) ktlsd connect to openssl s_server with each chain ---------------------------
        ec_srv = ["-cert", str(classic["srv.pem"]), "-key", str(classic["srv.key"])]
        pq_srv = ["-dcert", str(pq["srv.pem"]), "-dkey", str(pq["srv.key"])]
        pq_only = ["-cert", str(pq["srv.pem"]), "-key", str(pq["srv.key"])]
        cases = (
            ("ML-DSA chain only", pq_only, "mldsa65", "CN=127.0.0.1-mldsa"),
            ("classic chain only", ec_srv, "ecdsa_secp256r1_sha256", "CN=127.0.0.1-ec"),
            ("both chains", ec_srv + pq_srv, "mldsa65", "CN=127.0.0.1-mldsa"),
            ("both chains, -sigalgs ecdsa_secp256r1_sha256",
             ec_srv + pq_srv + ["-sigalgs", "ecdsa_secp256r1_sha256"],
             "ecdsa_secp256r1_sha256", "CN=127.0.0.1-ec"),
        )
        for label, args, scheme, subject in cases:
            port = free_tcp_port()
            server = SServer(port, *args)
            out = run_ktlsd(sc, "connect", f"127.0.0.1:{port}", "--ca", str(trust))
            server.finish()
            got = the_line(out)
            sc.check(got.get("peer_sig") == scheme and got.get("peer") == f"x509:{subject}"
                     and got.get("group") == "X25519MLKEM768",
                     f"s_server with {label}: ktlsd saw {scheme} from {subject} over "
                     f"X25519MLKEM768 (got {got.get('peer_sig')}, {got.get('peer')}, "
                     f"{got.get('group')})")

        # --- the client's chain, chosen by the CertificateRequest's sigalgs --------------------
        both = ["--cert", str(classic["cli.pem"]), "--key", str(classic["cli.key"]),
                "--pq-cert", str(pq["cli.pem"]), "--pq-key", str(pq["cli.key"])]
        for scheme, subject in (("mldsa65", "ktlsd-client-mldsa"),
                                ("ecdsa_secp256r1_sha256", "ktlsd-client-ec")):
            port = free_tcp_port()
            server = SServer(port, *ec_srv, *pq_srv, "-Verify", "1", "-CAfile", str(trust),
                             "-client_sigalgs", scheme)  # fmt: skip
            out = run_ktlsd(sc, "connect", f"127.0.0.1:{port}", "--ca", str(trust), *both)
            seen = server.finish()
            got = the_line(out)
            sc.check(got.get("sig") == scheme and f"CN={subject}" in seen.replace(" = ", "="),
                     f"s_server -client_sigalgs {scheme}: ktlsd sent the {subject} chain "
                     f"(sig={got.get('sig')}) and s_server saw it")

        # --- ktlsd listen with both chains, s_client choosing ---------------------------------
        for scheme, subject in (("mldsa65", "127.0.0.1-mldsa"),
                                ("ecdsa_secp256r1_sha256", "127.0.0.1-ec")):
            port = free_tcp_port()
            env = dict(os.environ, PYTHONPATH=str(PROJECT))
            listen = subprocess.Popen(
                ktlsd_cmd("listen", f"127.0.0.1:{port}", "--www", "--count", "1",
                          "--cert", str(classic["srv.pem"]), "--key", str(classic["srv.key"]),
                          "--pq-cert", str(pq["srv.pem"]), "--pq-key", str(pq["srv.key"])),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                text=True, env=env,
            )  # fmt: skip
            sc.cleanup(lambda p=listen: p.poll() is None and p.kill(), "stop ktlsd listen")
            assert listen.stderr is not None
            first = listen.stderr.readline()
            sc.check("listening on" in first, f"ktlsd listen started ({first.strip()})")
            client = subprocess.run(
                ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_3",
                 "-CAfile", str(trust), "-sigalgs", scheme, "-verify_return_error"],
                input="GET / HTTP/1.0\r\n\r\n", capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            _, rest = listen.communicate(timeout=30)
            print(client.stdout[-800:] + first + rest, flush=True)
            said = client.stdout.replace(" = ", "=")
            sc.check(f"Peer signature type: {scheme}" in said and f"CN={subject}" in said
                     and f"sig={scheme}" in rest,
                     f"ktlsd listen with both chains, s_client -sigalgs {scheme}: "
                     f"{subject} chain sent and signed with {scheme}")


if __name__ == "__main__":
    main()
