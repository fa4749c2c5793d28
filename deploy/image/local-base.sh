#!/usr/bin/env bash
# Makes the runtime base image of the Containerfile on a machine that reaches
# no image registry, only Debian's package mirror: a root filesystem with what
# the `countersign` binary links against (libc6, libgcc-s1; see `ldd`), the
# Mozilla CA bundle and a `nonroot` user (65532), like
# gcr.io/distroless/cc-debian12:nonroot, made with mmdebstrap and imported
# into podman. No shell, no package manager.
#
#   deploy/image/local-base.sh            # prints the image's name
#   podman build --build-arg RUNTIME_IMAGE=localhost/countersign-runtime-base:bookworm ...
#
# Cached: nothing is done when the image exists and was made by this version
# of this script (a label holds the script's hash). Needs root, mmdebstrap
# and podman (Debian: apt-get install mmdebstrap podman). The mirror is
# $DEBIAN_MIRROR, else http://deb.debian.org/debian.
set -euo pipefail

image=${COUNTERSIGN_BASE_IMAGE:-localhost/countersign-runtime-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
for tool in mmdebstrap podman; do
  command -v "$tool" >/dev/null || {
    echo "$0: $tool is not installed (Debian: apt-get install mmdebstrap podman runc; .ci/run installs them)" >&2
    exit 1
  }
done

script_hash=$(sha256sum "$0" | cut -d' ' -f1)
if [[ $(podman image inspect --format '{{index .Labels "dev.countersign.base-script"}}' "$image" 2>/dev/null) == "$script_hash" ]]; then
  echo "$image"
  exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs

# Only the packages the binary needs, unpacked (no maintainer scripts run:
# nothing in the image could run them).
mmdebstrap --quiet --variant=extract --include=libc6,libgcc-s1 \
  "$suite" "$rootfs" "$mirror" </dev/null
# The CA bundle, as update-ca-certificates writes it, from Debian's package.
mmdebstrap --quiet --variant=extract --include=ca-certificates \
  "$suite" "$work/ca" "$mirror" </dev/null
mkdir -p "$rootfs/etc/ssl/certs"
cat "$work"/ca/usr/share/ca-certificates/mozilla/*.crt >"$rootfs/etc/ssl/certs/ca-certificates.crt"

# What mmdebstrap leaves for apt and dpkg, device nodes (the runtime makes
# its own) and documentation.
rm -rf "$rootfs"/dev/* "$rootfs"/var/lib/apt "$rootfs"/var/cache/* "$rootfs"/var/log/* \
  "$rootfs"/var/lib/dpkg "$rootfs"/usr/share/doc "$rootfs"/usr/share/lintian \
  "$rootfs"/etc/apt
cat >"$rootfs/etc/passwd" <<'PASSWD'
root:x:0:0:root:/root:/sbin/nologin
nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
PASSWD
cat >"$rootfs/etc/group" <<'GROUP'
root:x:0:
nogroup:x:65534:
nonroot:x:65532:
GROUP
install -d -m 0700 "$rootfs/root"
install -d -m 0700 -o 65532 -g 65532 "$rootfs/home/nonroot"
chmod 1777 "$rootfs/tmp"

tar --numeric-owner -C "$rootfs" -c . |
  podman import --quiet \
    --change "LABEL dev.countersign.base-script=$script_hash" \
    --change "LABEL org.opencontainers.image.description=libc6 and libgcc-s1 of Debian $suite, CA certificates, user nonroot (65532)" \
    --change "ENV PATH=/usr/local/bin:/usr/bin:/bin" \
    - "$image" >/dev/null
echo "$image"
