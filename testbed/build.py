"""Build the test-bed guest: kernel, tiny initramfs and ext4 root image, cached by recipe.

Everything comes from Debian packages. The root is Debian 13 (trixie) ``minbase`` made by
debootstrap into a folder; the kernel comes from trixie-backports (>= 6.14, the first
version with kTLS rekey), resolved and downloaded by the *chroot's* apt so the host's apt
sources are never touched. The result lives outside the repository in
``${KTLSD_VM_CACHE:-~/.cache/ktlsd-vm}/<recipe hash>/``; the hash covers this file and the
files under ``testbed/guest/``, so editing the recipe forces a rebuild and nothing else does.
Scenario scripts are deliberately *not* part of the recipe: the guest reads them from the
shared project tree at run time.

The image also carries a second, much newer tlshd: a ``minbase`` chroot of Debian unstable
(sid) with its ktls-utils, made by debootstrap straight from the mirror into
``/opt/sid-tlshd`` (docs, locales and apt caches removed). The fleet-newtlshd scenario runs it
as a third agent in its own network namespace. What it is built from -- the package versions
and the GnuTLS it links -- is recorded in ``/opt/sid-tlshd.json`` and in ``build.json``.

Usage: ``python -m testbed.build [--force]`` (prints the cache directory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SUITE = "trixie"
BACKPORTS = "trixie-backports"
#: Default mirror: the one the host's own apt sources use (deb.debian.org). Overridable for
#: machines that sit behind a local mirror.
MIRROR = os.environ.get("KTLSD_VM_MIRROR", "http://deb.debian.org/debian")
#: The kernel must be at least this new: kTLS rekey (a second TLS_TX/TLS_RX) arrived in 6.14.
MIN_KERNEL = (6, 14)

GUEST_PACKAGES: tuple[str, ...] = (
    "python3",
    "python3-cryptography",
    # debootstrap's resolver does not pick the cffi backend on its own; name it explicitly.
    "python3-cffi-backend",
    "python3-pyroute2",
    "nvme-cli",
    "keyutils",
    "kmod",
    "iproute2",
    "nfs-kernel-server",
    "ktls-utils",
    "openssl",
    "gnutls-bin",
    "e2fsprogs",
    "procps",
    "util-linux",
    # For the systemd-booted flavour (testbed/systemd_run.py): device units (the serial
    # console's getty waits for dev-ttyS0.device), and nvme-cli's udev rules as on a real host.
    # systemd itself, systemctl and journalctl come in with nfs-kernel-server and ktls-utils.
    "udev",
    # Issue 14: keys held in a PKCS#11 token (SoftHSM2, OpenSC's pkcs11-tool to make them,
    # OpenSSL 3.5's pkcs11-provider to use them), and packet captures of guest sessions.
    "softhsm2",
    "opensc",
    "pkcs11-provider",
    "tcpdump",
)

#: The newest tlshd: Debian unstable's ktls-utils in a chroot inside the guest image.
SID_SUITE = "sid"
SID_PACKAGES: tuple[str, ...] = ("ktls-utils",)
#: Where the chroot lives in the guest (and the scenario looks for it).
SID_ROOT = "opt/sid-tlshd"
#: Packages whose versions the build records from the chroot.
SID_RECORDED: tuple[str, ...] = ("ktls-utils", "libgnutls30t64")
#: tlshd binds a SHA-384 PSK to SHA-384 (spec-correct) only with GnuTLS >= 3.8.11.
SID_MIN_GNUTLS = (3, 8, 11)

#: Modules the initramfs must load to mount an ext4 root on virtio-blk (Debian builds them as
#: modules). crc32c is loaded explicitly: ext4 wants it through the crypto API, which
#: modules.dep does not record.
INITRAMFS_MODULES: tuple[str, ...] = ("virtio_blk", "crc32c", "crc32c_generic", "ext4")

HERE = Path(__file__).resolve().parent
GUEST_DIR = HERE / "guest"
RECIPE_FILES: tuple[Path, ...] = (
    Path(__file__).resolve(),
    GUEST_DIR / "initramfs-init",
    GUEST_DIR / "ktlsd-guest-init",
)


class BuildError(RuntimeError):
    """The guest could not be built; the message says which step failed and why."""


@dataclass(frozen=True)
class GuestImage:
    """A built guest: the three files QEMU needs plus what went into them."""

    directory: Path
    kernel: Path
    initramfs: Path
    rootfs: Path
    kernel_release: str
    kernel_package: str
    kernel_package_version: str

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        meta = json.loads((directory / "build.json").read_text())
        return cls(
            directory=directory,
            kernel=directory / "vmlinuz",
            initramfs=directory / "initramfs.cpio.gz",
            rootfs=directory / "rootfs.ext4",
            kernel_release=meta["kernel_release"],
            kernel_package=meta["kernel_package"],
            kernel_package_version=meta["kernel_package_version"],
        )


def recipe_hash() -> str:
    """Hash of everything that determines the guest's content (files, packages, suite, mirror)."""
    h = hashlib.sha256()
    for path in RECIPE_FILES:
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    h.update(MIRROR.encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    env = os.environ.get("KTLSD_VM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "ktlsd-vm"


def cache_dir() -> Path:
    return cache_root() / recipe_hash()


def _log(msg: str) -> None:
    print(f"[testbed.build] {msg}", file=sys.stderr, flush=True)


def _run(cmd: list[str], step: str, **kw: object) -> subprocess.CompletedProcess[str]:
    """Run one build command; on failure raise BuildError naming the step and the output tail."""
    proc = subprocess.run(cmd, text=True, capture_output=True, **kw)  # type: ignore[call-overload]
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise BuildError(f"{step} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return proc


def _check_host_tools() -> None:
    missing = [
        t
        for t in ("debootstrap", "mke2fs", "cpio", "xz", "zstd", "chroot", "qemu-system-x86_64")
        if shutil.which(t) is None and not Path("/usr/sbin", t).exists()
    ]
    if not Path("/bin/busybox").exists():
        missing.append("busybox (busybox-static)")
    if missing:
        raise BuildError(
            f"host tools missing: {', '.join(missing)}; run testbed/install-host-deps.sh"
        )
    if os.geteuid() != 0:
        raise BuildError("building the guest needs root (debootstrap, chroot)")


def _debootstrap(root: Path) -> None:
    """Debian minbase plus the guest packages, straight from the mirror (host apt untouched)."""
    marker = root / ".ktlsd-debootstrap-done"
    if marker.exists():  # an interrupted build resumes after the slow step
        _log(f"reusing the debootstrap in {root}")
        return
    _log(f"debootstrap {SUITE} minbase from {MIRROR} into {root}")
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=" + ",".join(GUEST_PACKAGES),
            SUITE,
            str(root),
            MIRROR,
        ],
        "debootstrap",
    )
    marker.touch()


def _version_tuple(version: str) -> tuple[int, ...]:
    """``3.8.13-1`` -> (3, 8, 13): the upstream part of a Debian version, numerically."""
    upstream = version.split(":", 1)[-1].split("-", 1)[0]
    parts: list[int] = []
    for piece in upstream.split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if len(digits) < len(piece):  # "11~rc1": stop after the numeric head
            break
    return tuple(parts)


def _sid_tlshd(root: Path) -> dict[str, object]:
    """debootstrap a sid ``minbase`` chroot with ktls-utils into ``root/SID_ROOT``; return
    (and store in the image as ``/opt/sid-tlshd.json``) what it holds.

    Only debootstrap is given the suite: the host's apt sources are never touched. The record
    has the package versions, ktls-utils' Depends line and the GnuTLS ``ldd`` resolves for
    the sid tlshd, and whether that GnuTLS is >= 3.8.11 (the first to bind SHA-384 PSKs as
    such). An older GnuTLS is recorded, not fatal: it is the finding the scenario reports.
    A failed debootstrap raises BuildError; :func:`build` then goes on without the chroot.
    """
    chroot = root / SID_ROOT
    marker = chroot / ".ktlsd-debootstrap-done"
    if not marker.exists():
        if chroot.exists():
            shutil.rmtree(chroot)
        chroot.parent.mkdir(parents=True, exist_ok=True)
        _log(f"debootstrap {SID_SUITE} minbase + {','.join(SID_PACKAGES)} into /{SID_ROOT}")
        _run(
            ["debootstrap", "--variant=minbase", "--include=" + ",".join(SID_PACKAGES),
             SID_SUITE, str(chroot), MIRROR],
            f"debootstrap {SID_SUITE}",
        )  # fmt: skip
        marker.touch()
    query = _chroot(chroot, "dpkg-query", "-W", "-f", "${Package} ${Version}\\n",
                    *SID_RECORDED, step="dpkg-query in the sid chroot").stdout  # fmt: skip
    versions = dict(line.split(" ", 1) for line in query.strip().splitlines())
    depends = _chroot(chroot, "dpkg-query", "-W", "-f", "${Depends}", "ktls-utils",
                      step="dpkg-query Depends in the sid chroot").stdout.strip()  # fmt: skip
    ldd = _chroot(chroot, "ldd", "/usr/sbin/tlshd", step="ldd tlshd in the sid chroot").stdout
    gnutls_lib = next((ln.split(" (0x")[0].strip() for ln in ldd.splitlines()
                       if "libgnutls" in ln), "")  # fmt: skip
    gnutls = versions.get("libgnutls30t64", "")
    record: dict[str, object] = {
        "suite": SID_SUITE,
        "root": "/" + SID_ROOT,
        "packages": versions,
        "ktls_utils_depends": depends,
        "tlshd_gnutls_ldd": gnutls_lib,
        "gnutls_at_least_3_8_11": bool(gnutls) and _version_tuple(gnutls) >= SID_MIN_GNUTLS,
    }
    # Dead weight in a chroot that only ever runs tlshd.
    for d in ("var/lib/apt/lists", "var/cache/apt", "usr/share/doc", "usr/share/man",
              "usr/share/locale", "usr/share/info"):  # fmt: skip
        p = chroot / d
        if p.exists():
            shutil.rmtree(p)
            p.mkdir()
    (chroot / "etc/tlshd").mkdir(parents=True, exist_ok=True)
    record["size_mb"] = int(_run(["du", "-sxm", str(chroot)], "du sid chroot").stdout.split()[0])
    (root / (SID_ROOT + ".json")).write_text(json.dumps(record, indent=2) + "\n")
    _log(f"sid tlshd: {versions} (GnuTLS >= 3.8.11: {record['gnutls_at_least_3_8_11']}), "
         f"{record['size_mb']} MB")  # fmt: skip
    return record


def _chroot(root: Path, *cmd: str, step: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "DEBIAN_FRONTEND": "noninteractive",
        "LC_ALL": "C",
    }
    return _run(["chroot", str(root), *cmd], step, env=env)


def _install_kernel(root: Path) -> tuple[str, str, str]:
    """Fetch the backports kernel with the chroot's apt and unpack it into the root.

    The package is downloaded (and signature-checked) by the chroot's apt, then unpacked with
    ``dpkg-deb -x`` rather than installed: installing would drag in initramfs-tools and build
    a 40 MB initrd we never use; our own initramfs is a few hundred kilobytes.
    Returns (kernel release, package name, package version).
    """
    sources = root / "etc/apt/sources.list.d/backports.sources"
    sources.write_text(
        f"Types: deb\nURIs: {MIRROR}\nSuites: {BACKPORTS}\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
    _log(f"apt-get update in the chroot ({BACKPORTS} added to the CHROOT's sources)")
    _chroot(root, "apt-get", "update", step="chroot apt-get update")
    archives = root / "var/cache/apt/archives"
    for old in archives.glob("linux-image-*.deb"):
        old.unlink()
    _log("downloading linux-image-amd64 from backports with the chroot's apt")
    _chroot(
        root,
        "apt-get", "install", "-y", "--download-only", "--no-install-recommends",
        "-t", BACKPORTS, "linux-image-amd64",
        step="chroot apt-get --download-only linux-image-amd64",
    )  # fmt: skip
    # Newer Debian kernels split the image into linux-image-R (a small dependency hub),
    # linux-binary-R (vmlinuz), linux-modules-R and linux-base-R: unpack every package of the
    # release R; the unversioned metapackages (linux-image-amd64 ...) carry no files we need.
    hubs = [
        d for d in archives.glob("linux-image-*.deb") if not d.name.startswith("linux-image-amd64_")
    ]
    if len(hubs) != 1:
        raise BuildError(f"expected one kernel package, found {[d.name for d in hubs]}")
    fields = _run(["dpkg-deb", "-f", str(hubs[0]), "Package", "Version"], "dpkg-deb -f").stdout
    meta = dict(line.split(": ", 1) for line in fields.strip().splitlines())
    flavour = meta["Package"].removeprefix("linux-image-")
    debs = sorted(archives.glob(f"linux-*-{flavour}_*.deb"))
    _log(f"unpacking {meta['Package']} {meta['Version']}: {', '.join(d.name for d in debs)}")
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
    releases = sorted(p.name for p in (root / "usr/lib/modules").iterdir())
    if len(releases) != 1:
        raise BuildError(f"expected one kernel release under /usr/lib/modules, got {releases}")
    release = releases[0]
    major, minor = (int(x) for x in release.split("-")[0].split(".")[:2])
    if (major, minor) < MIN_KERNEL:
        raise BuildError(f"kernel {release} is older than {MIN_KERNEL}: no kTLS rekey")
    _chroot(root, "depmod", release, step="depmod")
    _chroot(root, "apt-get", "clean", step="apt-get clean")
    return release, meta["Package"], meta["Version"]


def _configure_root(root: Path) -> None:
    """Small edits that make the root usable without systemd: init script, hostname, fstab."""
    init = root / "sbin/ktlsd-guest-init"
    if (root / "sbin").is_symlink():  # trixie: /sbin -> usr/sbin
        init = root / "usr/sbin/ktlsd-guest-init"
    shutil.copyfile(GUEST_DIR / "ktlsd-guest-init", init)
    init.chmod(0o755)
    for d in ("ktlsd", "results"):
        (root / d).mkdir(exist_ok=True)
    (root / "etc/hostname").write_text("ktlsd-guest\n")
    (root / "etc/fstab").write_text("# filesystems are mounted by /sbin/ktlsd-guest-init\n")
    # Stable host NQN so nvme-cli does not complain; scenarios pass their own NQNs anyway.
    (root / "etc/nvme").mkdir(exist_ok=True)
    (root / "etc/nvme/hostnqn").write_text(
        "nqn.2014-08.org.nvmexpress:uuid:6b1f6c39-0c4c-4f4e-9d3c-5b8d6f0b9a11\n"
    )
    # apt lists and docs are dead weight in an image that is only ever booted with -snapshot.
    for d in ("var/lib/apt/lists", "usr/share/doc", "usr/share/man", "usr/share/locale"):
        p = root / d
        if p.exists():
            shutil.rmtree(p)
            p.mkdir()


def _modules_dep(root: Path, release: str) -> dict[str, tuple[str, list[str]]]:
    """Map module name -> (relative path, dependency paths) from modules.dep."""
    deps: dict[str, tuple[str, list[str]]] = {}
    text = (root / "usr/lib/modules" / release / "modules.dep").read_text()
    for line in text.splitlines():
        path, _, rest = line.partition(":")
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        deps[name] = (path, rest.split())
    return deps


def _initramfs(root: Path, release: str, out: Path, work: Path) -> list[str]:
    """Make a busybox initramfs that loads the root-disk modules and switch_roots.

    Modules are decompressed here because busybox's insmod cannot read .ko.xz/.ko.zst.
    Returns the module load order (for the build record).
    """
    tree = work / "initramfs"
    if tree.exists():
        shutil.rmtree(tree)
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib/modules"):
        (tree / d).mkdir(parents=True)
    shutil.copy2("/bin/busybox", tree / "bin/busybox")
    init = tree / "init"
    shutil.copyfile(GUEST_DIR / "initramfs-init", init)
    init.chmod(0o755)

    modroot = root / "usr/lib/modules" / release
    deps = _modules_dep(root, release)
    by_path = {path: name for name, (path, _) in deps.items()}
    order: list[str] = []

    def add(name: str) -> None:
        if name in order:
            return
        for dep_path in deps[name][1]:
            add(by_path[dep_path])
        order.append(name)

    for name in INITRAMFS_MODULES:
        if name in deps:
            add(name)
    if "ext4" not in order or "virtio_blk" not in order:
        builtin = (modroot / "modules.builtin").read_text()
        if "/ext4.ko" not in builtin and "ext4" not in order:
            raise BuildError("ext4 is neither a module nor built in")
    for name in order:
        src = modroot / deps[name][0]
        dst = tree / "lib/modules" / f"{name}.ko"
        if src.suffix in (".xz", ".zst"):
            tool = "xz" if src.suffix == ".xz" else "zstd"
            dst.write_bytes(
                subprocess.run([tool, "-dc", str(src)], capture_output=True, check=True).stdout
            )
        else:
            shutil.copyfile(src, dst)
    (tree / "modules.order").write_text("\n".join(order) + "\n")
    files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    listing = "\n".join([".", *files]) + "\n"
    cpio = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--owner=0:0", "--quiet"],
        input=listing.encode(),
        cwd=tree,
        capture_output=True,
        check=True,
    ).stdout
    gz = subprocess.run(["gzip", "-9n"], input=cpio, capture_output=True, check=True).stdout
    out.write_bytes(gz)
    return order


def _rootfs_image(root: Path, out: Path) -> int:
    """Make the ext4 image with ``mke2fs -d`` (no loop mounts, no debugfs patching)."""
    used = int(_run(["du", "-sxm", str(root)], "du").stdout.split()[0])
    size_mb = used + max(512, used // 2)  # headroom for what scenarios write (overlay anyway)
    _run(
        ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "ktlsd-root", "-d", str(root),
         str(out), f"{size_mb}M"],
        "mke2fs -d",
    )  # fmt: skip
    return size_mb


def build(force: bool = False) -> GuestImage:
    """Build the guest unless a build for the current recipe already exists; return it."""
    final = cache_dir()
    if (final / "build.json").exists() and not force:
        return GuestImage.load(final)
    _check_host_tools()
    started = time.monotonic()
    work = final.with_name(final.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    root = work / "root"
    for stale in ("out", "initramfs"):
        if (work / stale).exists():
            shutil.rmtree(work / stale)
    t0 = time.monotonic()
    _debootstrap(root)
    t_debootstrap = time.monotonic() - t0
    t0 = time.monotonic()
    release, pkg, version = _install_kernel(root)
    t_kernel = time.monotonic() - t0
    t0 = time.monotonic()
    try:
        sid = _sid_tlshd(root)
    except BuildError as exc:
        # A broken sid (it happens) must not take the whole test bed down: the image is built
        # without the chroot, and fleet-newtlshd fails saying why (the record has the error).
        _log(f"no sid tlshd in this image: {exc}")
        shutil.rmtree(root / SID_ROOT, ignore_errors=True)
        sid = {"suite": SID_SUITE, "root": "/" + SID_ROOT, "error": str(exc)[:2000]}
        (root / (SID_ROOT + ".json")).write_text(json.dumps(sid, indent=2) + "\n")
    t_sid = time.monotonic() - t0
    _configure_root(root)
    out = work / "out"
    out.mkdir()
    # Older packages put the image in /boot, the split 7.x packages next to the modules.
    candidates = [
        root / "boot" / f"vmlinuz-{release}",
        root / "usr/lib/modules" / release / "vmlinuz",
    ]
    vmlinuz = next((p for p in candidates if p.exists()), None)
    if vmlinuz is None:
        raise BuildError(f"no vmlinuz for {release} in /boot or /usr/lib/modules/{release}")
    shutil.copyfile(vmlinuz, out / "vmlinuz")
    order = _initramfs(root, release, out / "initramfs.cpio.gz", work)
    t0 = time.monotonic()
    size_mb = _rootfs_image(root, out / "rootfs.ext4")
    t_image = time.monotonic() - t0
    meta = {
        "recipe_hash": recipe_hash(),
        "suite": SUITE,
        "mirror": MIRROR,
        "kernel_release": release,
        "kernel_package": pkg,
        "kernel_package_version": version,
        "guest_packages": list(GUEST_PACKAGES),
        "sid_tlshd": sid,
        "initramfs_modules": order,
        "rootfs_size_mb": size_mb,
        "seconds": {
            "debootstrap": round(t_debootstrap, 1),
            "kernel": round(t_kernel, 1),
            "sid_tlshd": round(t_sid, 1),
            "image": round(t_image, 1),
            "total": round(time.monotonic() - started, 1),
        },
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "build.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    shutil.rmtree(work)
    _log(f"built {final} in {meta['seconds']['total']} s (kernel {release})")
    return GuestImage.load(final)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.build", description=__doc__)
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        image = build(force=args.force)
    except BuildError as exc:
        print(f"testbed.build: {exc}", file=sys.stderr)
        return 1
    print(image.directory)
    _log(
        f"ready in {time.monotonic() - started:.1f} s: kernel {image.kernel_release} "
        f"({image.kernel_package} {image.kernel_package_version})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
