#!/usr/bin/env bash
# Install ktlsd and what it needs on a Debian 12 machine (run as root), into ./.venv.
#   scripts/install.sh          runtime: OpenSSL's libssl, keyutils, then ktlsd itself
#   scripts/install.sh --test   also the test peers (openssl, gnutls-bin, tlslite-ng), the
#                               package checkers (lintian, groff) and the VM test bed's host
#                               tools (QEMU, debootstrap, busybox-static)
# Never adds another Debian suite to the host's apt sources.
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[ "${1:-}" = "--test" ] && want_test=1

pkgs=(libssl3 openssl keyutils python3-venv)
if [ "$want_test" = 1 ]; then
    # nvme-cli: its DH-HMAC-CHAP key output is compared with ours;
    # lintian, groff: tests/test_packaging.py checks the .deb and the man pages;
    # tshark: tests/test_keylog.py decrypts a captured session with the key log;
    # softhsm2, opensc, libengine-pkcs11-openssl: tests/test_pkcs11.py (keys in a token)
    pkgs+=(gnutls-bin nvme-cli lintian groff-base tshark softhsm2 opensc libengine-pkcs11-openssl)
    bash testbed/install-host-deps.sh  # QEMU, debootstrap, busybox-static ... for the VM tests
fi

missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "install.sh: need root to apt-get install: ${missing[*]}" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    # tshark's wireshark-common asks whether non-root users may capture: no.
    echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
extras=""
[ "$want_test" = 1 ] && extras="[test]"
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".${extras}"
echo "install.sh: ktlsd installed in $(pwd)/.venv ($(.venv/bin/python --version))"
