#!/bin/sh
# Install the host packages the ktlsd test bed needs to build and boot its guest.
# Idempotent: packages already present are left alone and nothing is upgraded.
# Uses only the host's own configured Debian suite (never adds another suite).
set -eu
PKGS="qemu-system-x86 debootstrap busybox-static e2fsprogs cpio xz-utils zstd gzip debian-archive-keyring"
missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -z "$missing" ]; then
    echo "install-host-deps: all present ($PKGS)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-host-deps: need root to install:$missing" >&2
    exit 1
fi
echo "install-host-deps: installing$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends --no-upgrade $missing
