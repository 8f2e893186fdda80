"""Names shared by the systemd flavour's prepare step, driver and host side (stdlib only)."""

from __future__ import annotations

from pathlib import Path

STATE_DIR = Path("/var/lib/ktlsd-testbed")
PLAN_NAME = "systemd-plan.json"
#: Boot number -> phase. A third boot (a kernel panic reboots the guest) powers off at once.
PHASES = {1: "upgrade", 2: "boot"}
#: The result file of each phase in the results directory, and the name the host reports.
RESULT_NAMES = {"upgrade": "systemd-upgrade", "boot": "systemd-boot"}
GUEST_LOG = "systemd-guest.log"

PKI_DIR = Path("/etc/tlshd")
CA = PKI_DIR / "ca.pem"
SERVER_CERT, SERVER_KEY = PKI_DIR / "server.pem", PKI_DIR / "server.key"
CLIENT_CERT, CLIENT_KEY = PKI_DIR / "client.pem", PKI_DIR / "client.key"
#: The configuration file both agents read (tlshd 1.0's path; first in ktlsd's search order).
AGENT_CONF = Path("/etc/tlshd.conf")

NFS_EXPORT = "/srv/nfs-tls"
NFS_EXPORT_OPTIONS = "rw,sync,no_subtree_check,no_root_squash,xprtsec=tls"
#: The fstab mount that must come up at boot.
FSTAB_MOUNT = Path("/mnt/nfs-tls")

SUBNQN = "nqn.2026-11.io.ktlsd:testbed-boot"
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"
NVME_ADDR, NVME_PORT = "127.0.0.1", "4420"
TLS_KEYFILE = Path("/etc/nvme/tls-keys")
RAMDISK = "/dev/ram0"
