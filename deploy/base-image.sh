#!/usr/bin/env bash
# Build a Python 3.11 base image from Debian packages, for machines that cannot pull
# python:3.11-slim-bookworm from a registry (make images does this by itself when the pull fails).
#
#   deploy/base-image.sh [TAG]        default TAG: novelcrafter/python-base:3.11-bookworm
#
# Debian bookworm's python3 (3.11), venv and CA certificates, from debootstrap (needs root and
# Debian's debootstrap package), trimmed the way the official slim images are (no docs, man
# pages, locales or apt lists), imported with `docker import`. Certificates the host trusts
# beyond Debian's (/usr/local/share/ca-certificates, e.g. a TLS-inspecting proxy's) are
# trusted inside too, and pip is pointed at the system bundle, so builds reach PyPI from here.
set -euo pipefail

tag=${1:-novelcrafter/python-base:3.11-bookworm}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

fail() { echo "error: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "building the base image needs root (debootstrap); run: sudo $0 $tag"
command -v debootstrap >/dev/null || fail "debootstrap not found: apt-get install debootstrap"
command -v docker >/dev/null || fail "docker not found: this script imports the base into Docker"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

echo "base image: debootstrap $suite from $mirror (about a minute)"
debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
    "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; fail "debootstrap failed (log above)"; }

# What the host trusts beyond Debian's bundle.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
    chroot "$root" update-ca-certificates >/dev/null 2>&1
fi

# As Debian's docker images do: later apt installs skip docs, and apt keeps no caches.
cat >"$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
EOF
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/locale/* \
    "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/*.log "$root"/tmp/*

tar -C "$root" --numeric-owner -c . | docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' \
    --message "NovelCrafter Python 3.11 base: debootstrap $suite" \
    - "$tag" >/dev/null
echo "base image: $tag ($(docker run --rm "$tag" python --version))"
