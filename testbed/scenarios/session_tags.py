"""session-tags: do TLS session tags reach the guest kernel? (tls-session-tags(7), issue 14)

Records what the guest kernel's ``handshake`` family declares for DONE (ktlsd's policy probe:
the CTRL_CMD_GETPOLICY dump), what ktlsd concludes for session tags (sent in DONE only where
attribute 4 is declared as a string, the nfsd tree's ``tag``), and ``ktlsd doctor``'s session
tag lines for a tags directory holding tls-session-tags(7)'s example. Checks that the
conclusion follows the declared type; it does not mount anything: a kernel without the
attribute has no consumer that reads tags.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from testbed.scenarios.common import PROJECT, Scenario, modprobe

EXAMPLE = """\
filters:
  monsters-university: {type: x509.tbs.issuer, pattern: "*,O=Monsters University,*"}
  fear-tech: {type: x509.tbs.issuer, pattern: "*,O=Fear Technology Institute,*"}
  fraternity-ror: {type: x509.tbs.subject, pattern: "*,OU=Roar Omega Roar,*"}
tags:
  ror-mu-chapter: {filter: [monsters-university, not fear-tech, fraternity-ror]}
"""


def main() -> None:
    with Scenario() as sc:
        modprobe(sc, "tls")
        from ktlsd.upcall.kernel import probe_kernel_policy
        from ktlsd.upcall.netlink import DoneAttr4

        caps = probe_kernel_policy()
        declared = {attr: policy.kind.name if hasattr(policy.kind, "name") else str(policy.kind)
                    for attr, policy in sorted(caps.done_attrs.items())}
        sc.figure("done_policy", declared)
        sc.figure("done_attr4", caps.done_attr4.value)
        line = caps.session_tags_line()
        sc.detail(line)
        sc.check(caps.policy_known, "the DONE policy could be dumped")
        sc.check(caps.done_tags == (caps.done_attr4 is DoneAttr4.TAG),
                 "session tags are sent exactly when DONE attribute 4 is a string")
        sc.check(("are sent" in line) == caps.done_tags, "the start-up line says which")
        directory = Path(tempfile.mkdtemp(prefix="tags.d-"))
        (directory / "example.yml").write_text(EXAMPLE)
        config = directory.parent / "ktlsd-tags.conf"
        config.write_text(f"[ktlsd]\ntags_directory={directory}\n")
        doctor = sc.sh(["env", f"PYTHONPATH={PROJECT}", sys.executable, "-m", "ktlsd", "doctor",
                        "--config", str(config)], check=False)
        tag_lines = [text for text in doctor.stdout.splitlines() if "tag" in text.split(":")[0]]
        for text in tag_lines:
            sc.detail(text)
        sc.figure("doctor_tag_lines", tag_lines)
        sc.check(any("session tags to kernel" in text for text in tag_lines),
                 "doctor reports whether tags reach the kernel")


if __name__ == "__main__":
    main()
