#!/usr/bin/env bash
# Builds the Debian package `braid` from the binaries cargo built: the daemons and tools,
# a systemd unit template per role (braid-ROLE@NAME.service reads
# /etc/braid/ROLE-NAME.toml), commented example configs in /etc/braid, and a system user
# `braid`; the install makes /etc/braid/braid.env with random secrets.
#
# Usage: ops/package/build-deb.sh [--profile release|debug] [--out DIR]
#   (release, the default, builds first with `cargo build --release --bins`; debug takes
#   what is in target/debug, for tests.)
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=release
out=target/deb
while (($#)); do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        *) echo "usage: $0 [--profile release|debug] [--out DIR]" >&2; exit 2 ;;
    esac
done
bins=(braid-reflector braid-entrypoint braid-control braid-capture braid-client braid-ctl)
if [[ $profile == release ]]; then
    cargo build --release --bins
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
install -d "$root/DEBIAN" "$root/usr/bin" "$root/lib/systemd/system" "$root/etc/braid" \
    "$root/usr/share/braid" "$root/usr/share/doc/braid"
for b in "${bins[@]}"; do
    # Without debug information: the package carries what runs.
    install -m 0755 --strip "target/$profile/$b" "$root/usr/bin/$b"
done
install -m 0644 ops/package/systemd/*.service "$root/lib/systemd/system/"
install -m 0644 ops/package/etc/*.toml "$root/etc/braid/"
install -m 0644 ops/package/etc/braid.env.in "$root/usr/share/braid/braid.env.in"
# The player page's hls.js (the control server's default --hls-js), when npm installed it.
hlsjs=player/node_modules/hls.js/dist/hls.min.js
if [[ -f $hlsjs ]]; then
    install -m 0644 "$hlsjs" "$root/usr/share/braid/hls.min.js"
else
    echo "build-deb: no $hlsjs (npm ci --prefix player): the package's player page cannot play" >&2
fi
install -m 0644 README.md docs/SECURITY.md docs/PROTOCOL.md docs/ARCHITECTURE.md \
    "$root/usr/share/doc/braid/"
(cd "$root" && find etc -type f -printf '/%p\n') > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/control" <<CONTROL
Package: braid
Version: $version
Architecture: $arch
Maintainer: Braid developers <braid@example.invalid>
Section: net
Priority: optional
Depends: adduser, systemd
Description: live-stream reflector network
 Braid carries live streams from a capture over entry points, set reflectors and
 edges to many viewers, over several paths, losslessly. One package for every role:
 start the units braid-reflector@, braid-entrypoint@, braid-control@ and
 braid-capture@ with a config of that name in /etc/braid.
CONTROL
cat > "$root/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    if ! getent passwd braid >/dev/null; then
        adduser --system --group --quiet --no-create-home --home /nonexistent braid
    fi
    env=/etc/braid/braid.env
    if [ ! -e "$env" ]; then
        secret() { head -c 24 /dev/urandom | base64 | tr -d '/+=' ; }
        umask 027
        sed -e "s|@NETWORK_KEY@|$(secret)|" -e "s|@TOKEN_SECRET@|$(secret)|" \
            -e "s|@OPERATOR_TOKEN@|$(secret)|" -e "s|@STREAM_KEY@|$(secret)|" \
            /usr/share/braid/braid.env.in > "$env"
        chown root:braid "$env"
        chmod 0640 "$env"
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload >/dev/null || true
    fi
fi
POSTINST
cat > "$root/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ "$1" = purge ]; then
    rm -f /etc/braid/braid.env
    rmdir /etc/braid 2>/dev/null || true
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null || true
fi
POSTRM
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/postrm"
mkdir -p "$out"
deb="$out/braid_${version}_${arch}.deb"
# Debug binaries are large: no compression for them (tests), xz for a release.
if [[ $profile == release ]]; then z=(-Zxz); else z=(-Znone); fi
dpkg-deb --root-owner-group "${z[@]}" --build "$root" "$deb" >/dev/null
echo "$deb"
