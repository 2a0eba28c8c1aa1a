#!/usr/bin/env bash
# Make sure the Dockerfile's base image, python:3.11-slim, is in the local engine.
#
#   tests/engine/base-image.sh        # used by .ci/run and tests/integration/test_engine.py
#
# In order: already present (cache: built or pulled once) -> `docker pull` -> a local stand-in
# for machines that reach Debian's mirror and PyPI but no container registry: a Debian
# bookworm minbase rootfs (python3 3.11, pip, venv, ca-certificates) from the host's configured
# mirror, with the host's extra CA certificates so that pip inside `docker build` reaches the
# package index the host reaches, imported with `docker import` under the same tag.
set -euo pipefail

IMAGE=python:3.11-slim
LABEL=org.xenpv.base-image=debootstrap-bookworm

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base-image: $IMAGE present"
    exit 0
fi
if timeout 300 docker pull -q "$IMAGE" >/dev/null 2>&1; then
    echo "base-image: $IMAGE pulled"
    exit 0
fi
echo "base-image: cannot pull $IMAGE; building a local stand-in with debootstrap"

command -v debootstrap >/dev/null || {
    echo "base-image: debootstrap missing (apt-get install debootstrap)" >&2
    exit 1
}
# The host's Debian mirror (deb822 or one-line sources), else Debian's default.
mirror=$({
    { grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
      grep -hE '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } \
        | grep -v security | head -n 1
} || true)
mirror=${mirror:-http://deb.debian.org/debian}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 || {
    tail -n 20 "$work/debootstrap.log" >&2
    exit 1
}
# The host's extra CAs (a TLS-inspecting egress, a corporate CA) into the image's trust store.
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
    chroot "$rootfs" update-ca-certificates >/dev/null
fi
# Behave like the official image: `python` and `pip` on PATH, pip installs system-wide.
rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL $LABEL" \
    --change 'CMD ["python3"]' \
    - "$IMAGE" >/dev/null
echo "base-image: $IMAGE built locally (label $LABEL)"
