"""``ktlsd doctor``: what this machine offers ktlsd, and what is missing, one line each.

Every check prints ``OK``, ``MISSING`` or ``INFO`` and a one-line reason, and no check can
stop the others: a check that fails unexpectedly reports MISSING with the error. Nothing
here changes the system (the kTLS probe uses a throwaway loopback connection and a random
throwaway key; the keyring checks only look keys up). The exit code is 0 unless
``--strict`` is given, in which case anything MISSING makes it 1 -- handy in provisioning
scripts that must fail on a machine that cannot serve kernel consumers.

MISSING is for what a correctly set-up host has; what depends on the kernel build or on
modules loaded later is INFO when absent, so ``--strict`` passes on such a host: DONE
attribute 4 is either the KeyUpdate session id or a TLS session tag (two kernel series use
the same attribute number, so one of them is always absent), and the consumers' keyrings
(``.nvme``, ``.nfs``, ``.nfsd``) appear only when their modules are loaded.

Session tags (tls-session-tags(7)): the tag files read from ``tags_directory``, one line per
problem in them (MISSING when it drops the rest of a file, as tlshd does), one INFO line per
tag defined, and whether the running kernel's DONE takes tags (INFO when it does not).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import enum
import importlib
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ktlsd.upcall.kernel import KernelCapabilities

NVME_MIN_KERNEL = (6, 5)


class Status(enum.Enum):
    OK = "OK"
    MISSING = "MISSING"
    INFO = "INFO"


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    status: Status
    detail: str

    def line(self) -> str:
        detail = " ".join(self.detail.split())
        return f"{self.status.value:<8}{self.name}: {detail}"


def _ok(name: str, detail: str) -> Check:
    return Check(name, Status.OK, detail)


def _missing(name: str, detail: str) -> Check:
    return Check(name, Status.MISSING, detail)


def _info(name: str, detail: str) -> Check:
    return Check(name, Status.INFO, detail)


# --- individual checks ---------------------------------------------------------------------


def parse_kernel_release(release: str) -> tuple[int, int]:
    """``6.18.44-fc-v769`` -> (6, 18); unparsable parts count as 0."""
    parts = release.split("-")[0].split(".")
    numbers: list[int] = []
    for part in parts[:2]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits) if digits else 0)
    while len(numbers) < 2:
        numbers.append(0)
    return numbers[0], numbers[1]


def check_kernel() -> list[Check]:
    release = platform.release()
    version = parse_kernel_release(release)
    detail = f"Linux {release} ({platform.machine()})"
    if version < NVME_MIN_KERNEL:
        return [_missing("kernel", f"{detail}: the handshake upcall needs Linux >= 6.5")]
    return [_ok("kernel", detail)]


def check_ktls(import_module: Callable[[str], Any] = importlib.import_module) -> list[Check]:
    """kTLS, kTLS rekey and the kTLS counters, from ``ktlsd.tls.ktls.probe()`` when available."""
    try:
        ktls = import_module("ktlsd.tls.ktls")
        support = ktls.probe()
    except Exception as exc:  # the module is being written in parallel; degrade
        reason = f"cannot probe ({type(exc).__name__}: {exc})"
        return [_missing("kTLS", reason), _missing("kTLS rekey", reason)]
    reasons: dict[str, str] = dict(getattr(support, "reasons", {}) or {})
    checks = []
    if support.ulp:
        checks.append(_ok("kTLS", "the tls ULP attaches and TX/RX keys install"))
    else:
        checks.append(_missing("kTLS", reasons.get("ulp", "the tls ULP is unusable")))
    if support.rekey:
        checks.append(_ok("kTLS rekey", "a second TLS_TX key installs (KeyUpdate in kernel)"))
    elif not support.ulp:
        checks.append(_missing("kTLS rekey", "needs kTLS first"))
    else:
        checks.append(_missing("kTLS rekey", reasons.get("rekey", "needs Linux >= 6.14")))
    if getattr(support, "tls_stat", False):
        checks.append(_ok("kTLS counters", "/proc/net/tls_stat readable"))
    else:
        checks.append(_missing("kTLS counters",
                               reasons.get("tls_stat", "/proc/net/tls_stat unreadable")))
    return checks


DONE_OPTIONAL = ("DONE remote-auth", "DONE session-id (KeyUpdate)", "DONE tag")


def check_handshake_family() -> list[Check]:
    """The ``handshake`` netlink family and the optional DONE attributes it declares."""
    from ktlsd.upcall.kernel import KernelSourceError, probe_kernel_policy

    try:
        caps = probe_kernel_policy()
    except KernelSourceError as exc:
        checks = [_missing("handshake family", str(exc))]
        checks.extend(_missing(name, "no handshake family") for name in DONE_OPTIONAL)
        return checks
    except OSError as exc:
        reason = f"cannot query generic netlink: {exc.strerror or exc}"
        return [_missing("handshake family", reason)]
    return family_checks(caps)


def family_checks(caps: KernelCapabilities) -> list[Check]:
    """The report for a kernel whose family declares ``caps``."""
    from ktlsd.upcall.netlink import DoneAttr4

    optional = DONE_OPTIONAL
    family = caps.family
    groups = ", ".join(f"{n}={i}" for n, i in sorted(family.mcast_groups.items())) or "-"
    checks = [_ok("handshake family",
                  f"id {family.family_id}, version {family.version}, groups {groups}")]
    if "tlshd" not in family.mcast_groups:
        checks.append(_missing("handshake group", "no 'tlshd' multicast group"))
    if not caps.policy_known:
        checks.extend(
            _info(name, "policy dump unavailable; DONE sends status, sockfd, remote-auth")
            for name in optional
        )
        return checks
    attr4 = caps.done_attr4
    if caps.done_remote_auth:
        checks.append(_ok(optional[0], "peer identity serials reach the consumer"))
    else:
        checks.append(_missing(optional[0], "not declared by the DONE policy"))
    # Attribute 4 is the session id (KeyUpdate series) or a tag (tags series), never both.
    if attr4 is DoneAttr4.SESSION_ID:
        checks.append(_ok(optional[1], "DONE attribute 4 is a u32 session id"))
        checks.append(_info(optional[2], "not in this kernel: DONE attribute 4 is the "
                            "KeyUpdate session id here"))
    elif attr4 is DoneAttr4.TAG:
        checks.append(_info(optional[1], "not in this kernel (DONE attribute 4 is a tag "
                            "here): a key update needs a new handshake"))
        checks.append(_ok(optional[2], "DONE attribute 4 is a string tag"))
    else:
        checks.append(_info(optional[1], "the KeyUpdate series is not in this kernel: a key "
                            "update needs a new handshake"))
        checks.append(_info(optional[2], "TLS session tags are not in this kernel"))
    checks.append(_info(
        "ACCEPT reply attributes",
        "peername, keyring, key-update-request, session-id are parsed when the kernel "
        "sends them (reply attributes are not in any policy dump)",
    ))
    return checks


def check_net_admin() -> list[Check]:
    from ktlsd.upcall.kernel import has_net_admin

    if has_net_admin():
        return [_ok("CAP_NET_ADMIN", "ACCEPT on the handshake family is allowed")]
    return [_missing("CAP_NET_ADMIN", "ACCEPT needs it: run ktlsd as root")]


def check_keyrings() -> list[Check]:
    try:
        from ktlsd import keyring
    except Exception as exc:
        return [_missing("keyrings", f"cannot load the keyring module: {exc}")]
    try:
        serial = keyring.get_keyring_id(keyring.KEY_SPEC_SESSION_KEYRING)
    except Exception as exc:
        return [_missing("keyctl", f"key management syscalls unusable: {exc}")]
    checks = [_ok("keyctl", f"session keyring {serial}")]
    for name, who in ((".nvme", "NVMe/TCP (nvme_tcp, nvmet_tcp)"), (".nfs", "the NFS client"),
                      (".nfsd", "the NFS server")):
        try:
            found = keyring.find_keyring(name)
        except Exception:
            checks.append(_info(f"keyring {name}", f"absent until {who} is loaded"))
            continue
        checks.append(_ok(f"keyring {name}", f"serial {found}"))
    return checks


def openssl_version(library: str = "libssl.so.3") -> str:
    """``OpenSSL_version(OPENSSL_VERSION)`` from the system libssl (OSError if absent)."""
    lib = ctypes.CDLL(library)
    version = lib.OpenSSL_version
    version.restype = ctypes.c_char_p
    version.argtypes = [ctypes.c_int]
    text = version(0)
    return text.decode("ascii", "replace") if text else "unknown"


def check_libssl() -> list[Check]:
    try:
        return [_ok("libssl", openssl_version())]
    except (OSError, AttributeError) as exc:
        return [_missing("libssl", f"libssl.so.3 not usable: {exc}")]


def check_config(path: str | None = None) -> list[Check]:
    from ktlsd.config import ConfigError, load_config

    try:
        config = load_config(path)
    except ConfigError as exc:
        return [_missing("configuration", str(exc))]
    if config.path is None:
        return [_info("configuration", "no file (/etc/tlshd.conf, /etc/tlshd/config): defaults")]
    from ktlsd.hardware_key import configured_key_problems

    settings = config.agent_settings()
    problems = configured_key_problems(settings.client_x509, settings.server_x509)
    return [_ok("configuration", config.path)] + [_missing("pkcs11 key", p) for p in problems]


def check_session_tags(config_path: str | None = None,
                       caps: KernelCapabilities | None = None) -> list[Check]:
    """The TLS session tag files read (the configuration's ``tags_directory``), each problem
    in them, each tag defined, and whether tags reach the kernel (its DONE policy)."""
    from ktlsd.config import ConfigError, load_config
    from ktlsd.session_tags import load_tags_directory
    from ktlsd.settings import DEFAULT_TAGS_DIRECTORY

    try:
        directory = load_config(config_path).tags_directory
    except ConfigError:
        directory = DEFAULT_TAGS_DIRECTORY
    tags = load_tags_directory(directory)
    checks: list[Check] = []
    if tags.note:
        absent = not tags.listed and not os.path.lexists(directory)
        checks.append((_info if absent else _missing)("session tags", tags.note))
    elif not tags.files:
        checks.append(_info("session tags", f"no tag files (*.yml, *.yaml) in {directory}"))
    else:
        files = ", ".join(os.path.basename(f) for f in tags.files)
        checks.append(_ok("session tags", f"{tags.summary()}; read {files}"))
    for problem in tags.problems:
        checks.append((_missing if problem.rest_ignored else _info)("tag file", str(problem)))
    for tag in tags.tags.values():
        terms = [*tag.filters, *(f"not {f}" for f in tag.inverted)]
        detail = " and ".join(
            f"{t} ({tags.filters[t.removeprefix('not ')].describe()})" for t in terms
        ) or "no filters: every server x509 session"
        checks.append(_info(f"tag {tag.name}", f"{detail} [{os.path.basename(tag.path)}]"))
    checks.append(_tags_to_kernel(caps))
    return checks


def _tags_to_kernel(caps: KernelCapabilities | None) -> Check:
    """Whether DONE can carry tags on this kernel (INFO when not: it depends on the build)."""
    name = "session tags to kernel"
    if caps is None:
        from ktlsd.upcall.kernel import KernelSourceError, probe_kernel_policy

        try:
            caps = probe_kernel_policy()
        except (KernelSourceError, OSError) as exc:
            return _info(name, f"not sent: {exc}")
    line = caps.session_tags_line()
    if caps.done_tags:
        return _ok(name, line)
    return _info(name, line + "; service consumers still get them")


def check_crypto_policy(path: str | None = None) -> list[Check]:
    """The effective TLS 1.3 suites and groups and why: what the system crypto policy (the
    OpenSSL configuration) allows, what kTLS carries, what ktlsd's configuration narrows."""
    from ktlsd.config import ConfigError, load_config
    from ktlsd.tls import policy

    system = policy.read_system_policy()
    checks: list[Check] = []
    where = system.config_file or "none"
    if system.config_error is not None:
        checks.append(_info("OpenSSL configuration",
                            f"{system.config_error}: the library's built-in defaults apply"))
    elif system.section is None:
        checks.append(_info("OpenSSL configuration",
                            f"{where}: no system_default section: the library's defaults"))
    else:
        said = [f"{key} = {value}" for key, value in (
            ("Ciphersuites", system.configured_suites), ("Groups", system.configured_groups))
            if value is not None] or ["neither Ciphersuites nor Groups"]
        checks.append(_info("OpenSSL configuration",
                            f"{where} [{system.section}]: {', '.join(said)}"))
    choice = policy.choose_suites(None, system.suites)
    allowed = ":".join(system.suite_names) or "none"
    why = (f"system policy allows {allowed}; kTLS carries "
           f"{':'.join(s.iana_name for s in policy.KTLS_SUITES)}; a service request or "
           "--ciphers may narrow further")
    if choice.effective:
        checks.append(_ok("TLS 1.3 suites",
                          f"{':'.join(s.iana_name for s in choice.effective)} ({why})"))
    else:
        checks.append(_missing("TLS 1.3 suites", f"none usable ({why})"))
    groups: str | None = None
    with contextlib.suppress(ConfigError):  # the configuration line reports it
        groups = load_config(path).groups
    system_groups = ":".join(system.groups) or "none"
    shares = ":".join(system.key_shares) or "none"
    try:
        picked = policy.choose_groups(groups)
    except policy.CryptoPolicyError as exc:
        checks.append(_missing("key-exchange groups", f"[ktlsd] groups: {exc}"))
        return checks
    if groups is None:
        detail = (f"{system_groups} (system policy, key share {shares}; [ktlsd] groups not "
                  "set; kTLS does not depend on the group)")
    else:
        refused = (f"; not allowed by the system policy: {':'.join(picked.refused)}"
                   if picked.refused else "")
        detail = (f"{':'.join(picked.effective)} ([ktlsd] groups = {groups}{refused}; system "
                  f"policy allows {system_groups})")
    checks.append(_ok("key-exchange groups", detail))
    return checks


CHECKS: tuple[Callable[[], list[Check]], ...] = (
    check_kernel,
    check_ktls,
    check_handshake_family,
    check_net_admin,
    check_keyrings,
    check_libssl,
)


def run_checks(config_path: str | None = None) -> list[Check]:
    """Run every check; an unexpected failure in one becomes its MISSING line."""
    results: list[Check] = []
    checks: tuple[Callable[[], list[Check]], ...] = (
        *CHECKS, lambda: check_config(config_path), lambda: check_session_tags(config_path),
        lambda: check_crypto_policy(config_path),
    )
    for check in checks:
        try:
            results.extend(check())
        except Exception as exc:
            name = getattr(check, "__name__", "check").removeprefix("check_")
            results.append(_missing(name, f"check failed: {type(exc).__name__}: {exc}"))
    return results


def main(args: argparse.Namespace) -> int:
    checks = run_checks(getattr(args, "config", None))
    for check in checks:
        print(check.line())
    missing = sum(1 for c in checks if c.status is Status.MISSING)
    print(f"{len(checks)} checks, {missing} missing")
    return 1 if args.strict and missing else 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "doctor",
        help="report what this machine supports (kTLS, handshake family, keyrings, libssl)",
        description="Report, one line each, what this machine offers ktlsd and what is "
        "missing. Exit code 0 unless --strict and something is missing.",
    )
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when anything is MISSING")
    parser.add_argument("--config", metavar="PATH",
                        help="configuration file to check (default: the search order)")
    parser.set_defaults(func=main)
