#!/usr/bin/env bash
# Build ktlsd_<version>_all.deb (Debian 13 "trixie") from this source tree.
#   packaging/build-deb.sh [OUTPUT_DIR]        default OUTPUT_DIR: dist/
# Needs dpkg-deb, gzip and python3 (no debhelper, no setuptools): it stages the installed
# tree and the control files and packs them with dpkg-deb. The package's version is
# ktlsd/__init__.py's __version__ (a native Debian version). Reproducible: every time stamp is
# SOURCE_DATE_EPOCH, by default the last commit's time. Maintainer: $KTLSD_DEB_MAINTAINER,
# by default the project's. Prints the path of the .deb on stdout. Layout and maintainer
# scripts: docs/packaging.md.
set -euo pipefail
umask 022
cd "$(dirname "$0")/.."
top=$(pwd)
out=${1:-dist}
mkdir -p "$out"
out=$(cd "$out" && pwd)

die() { echo "build-deb.sh: $*" >&2; exit 1; }
for tool in dpkg-deb gzip python3; do
    command -v "$tool" >/dev/null || die "$tool not found (apt-get install dpkg gzip python3)"
done

version=$(python3 - <<'EOF'
import ast
tree = ast.parse(open("ktlsd/__init__.py", encoding="utf-8").read())
for node in tree.body:
    if isinstance(node, ast.Assign) and [getattr(t, "id", "") for t in node.targets] == ["__version__"]:
        print(node.value.value)
EOF
)
[[ "$version" =~ ^[0-9][0-9A-Za-z.+~]*$ ]] || die "ktlsd/__init__.py: __version__ '$version' is not a native Debian version"

if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$top" log -1 --format=%ct 2>/dev/null || date +%s)
fi
export SOURCE_DATE_EPOCH
maintainer=${KTLSD_DEB_MAINTAINER:-"ktlsd maintainers <maintainers@users.noreply.h-seed-f52ccf7f.example>"}

stage=$(mktemp -d "${TMPDIR:-/tmp}/ktlsd-deb.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root=$stage/ktlsd
pylib=$root/usr/lib/python3/dist-packages
doc=$root/usr/share/doc/ktlsd
unitdir=$root/usr/lib/systemd/system

install -d "$root/DEBIAN" "$pylib" "$root/usr/sbin" "$doc/examples" "$unitdir" \
    "$unitdir/nvmf-connect@.service.d" "$root/etc/default" \
    "$root/usr/share/man/man5" "$root/usr/share/man/man7" "$root/usr/share/man/man8"

# The modules: every .py and py.typed under ktlsd/, nothing compiled (postinst runs
# py3compile, prerm py3clean, as for every Debian Python package).
while IFS= read -r -d '' file; do
    install -D -m 0644 "$file" "$pylib/$file"
done < <(find ktlsd \( -name __pycache__ -prune \) -o -type f \( -name '*.py' -o -name py.typed \) -print0 | sort -z)

# The program, where tlshd is (/usr/sbin). -I: no PYTHONPATH, user site or script directory.
cat > "$root/usr/sbin/ktlsd" <<'EOF'
#!/usr/bin/python3 -I
"""ktlsd: TLS handshake agent for in-kernel TLS consumers; see ktlsd(8)."""

import sys

from ktlsd.cli import main

sys.exit(main())
EOF
chmod 0755 "$root/usr/sbin/ktlsd"

install -m 0644 packaging/ktlsd.service "$unitdir/ktlsd.service"
install -m 0644 packaging/nvmf-connect@.service.d/ktlsd.conf "$unitdir/nvmf-connect@.service.d/ktlsd.conf"
install -m 0644 packaging/debian/default "$root/etc/default/ktlsd"
install -m 0644 packaging/debian/copyright "$doc/copyright"
install -m 0644 packaging/debian/README.Debian "$doc/README.Debian"
install -m 0644 packaging/debian/config.example "$doc/examples/config"
gzip -9n -c man/ktlsd.8 > "$root/usr/share/man/man8/ktlsd.8.gz"
gzip -9n -c man/ktlsd.conf.5 > "$root/usr/share/man/man5/ktlsd.conf.5.gz"
gzip -9n -c man/ktlsd-service.7 > "$root/usr/share/man/man7/ktlsd-service.7.gz"

# The Debian changelog of a native package, from the version and the commit time.
changelog_date=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
{
    echo "ktlsd ($version) trixie; urgency=medium"
    echo
    echo "  * Built from the ktlsd source tree at version $version; the changes are in"
    echo "    the project's history."
    echo
    echo " -- $maintainer  $changelog_date"
} | gzip -9n > "$doc/changelog.gz"

# Control area.
for script in postinst prerm postrm; do
    install -m 0755 "packaging/debian/$script" "$root/DEBIAN/$script"
done
echo /etc/default/ktlsd > "$root/DEBIAN/conffiles"
chmod 0644 "$root/DEBIAN/conffiles"
installed_size=$(du -k -s --apparent-size --exclude=DEBIAN "$root" | cut -f1)
VERSION=$version MAINTAINER=$maintainer INSTALLED_SIZE=$installed_size python3 -c '
import os, sys
text = open("packaging/debian/control.in", encoding="utf-8").read()
for key in ("VERSION", "MAINTAINER", "INSTALLED_SIZE"):
    text = text.replace(f"@{key}@", os.environ[key])
sys.stdout.write(text)' > "$root/DEBIAN/control"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
    | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"

find "$root" -depth -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
deb=$out/ktlsd_${version}_all.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
echo "$deb"
