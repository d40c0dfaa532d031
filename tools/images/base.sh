#!/usr/bin/env bash
# Make the Debian base image (bookworm, minbase + python3 + python3-venv + ca-certificates) with
# debootstrap from the machine's own Debian mirror, and import it into buildah's storage.
#
# Why: no base-image registry is reachable here, so both Dockerfiles get this as BASE_IMAGE /
# PYTHON_IMAGE. With a public registry use any python3 image instead (see README).
#
# Cache: the rootfs tarball is ${KONTRAST_IMAGES_CACHE:-$HOME/.cache/kontrast/images}/base-<suite>.tar,
# made once (flock'd); the import is skipped when buildah already holds the tag.
# The last line on stdout is the image reference (localhost/kontrast-base:<suite>).
# Env: SUITE (bookworm), DEBIAN_MIRROR (default: the first URI of apt's sources), PACKAGES.
set -euo pipefail
SUITE=${SUITE:-bookworm}
PACKAGES=${PACKAGES:-python3,python3-venv,ca-certificates}
CACHE=${KONTRAST_IMAGES_CACHE:-$HOME/.cache/kontrast/images}
REF=localhost/kontrast-base:$SUITE
log() { echo "[images/base] $*" >&2; }
mkdir -p "$CACHE"
exec 9>"$CACHE/.base.lock"
flock 9

mirror() {
    if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | head -1)
    echo "${uri:-http://deb.debian.org/debian}"
}

tarball=$CACHE/base-$SUITE.tar
if [ ! -s "$tarball" ]; then
    [ "$(id -u)" = 0 ] || { log "debootstrap needs root"; exit 1; }
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    trap 'rm -rf "$rootfs" "$tarball.tmp"' EXIT
    log "debootstrap --variant=minbase $SUITE from $(mirror) (about a minute)"
    nice debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$(mirror)" >&2
    # No apt lists or caches in the image; the Dockerfiles' apt steps are skipped (python3 -m venv works).
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar --numeric-owner --xattrs -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
fi
if ! buildah inspect --type image "$REF" >/dev/null 2>&1; then
    log "importing $tarball as $REF"
    podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$tarball" "$REF" >&2
fi
echo "$REF"
