#!/usr/bin/env bash
# Makes the runtime base image of the Containerfile on a machine that reaches
# no image registry, only Debian's package mirror: a root filesystem with what
# the `countersign` binary links against (libc6, libgcc-s1; see `ldd`), the
# Mozilla CA bundle and a `nonroot` user (65532), like
# gcr.io/distroless/cc-debian12:nonroot, made with mmdebstrap and imported
# into podman. No shell, no package manager.
#
#   deploy/image/local-base.sh    # prints the image's name, e.g.
#                                 # localhost/countersign-runtime-base:bookworm
#   podman build --build-arg RUNTIME_IMAGE=localhost/countersign-runtime-base:bookworm ...
#
# Cached: nothing is done when the image exists and was made by this version
# of this script (a label holds the script's hash). Needs root, mmdebstrap
# and podman (Debian: apt-get install mmdebstrap podman). The release is the
# host's ($DEBIAN_SUITE overrides; bookworm elsewhere), the mirror the one the
# host's apt uses ($DEBIAN_MIRROR overrides; else deb.debian.org).
set -euo pipefail

# The host's Debian release (a binary built here links against its glibc),
# and the mirror its apt uses.
suite=${DEBIAN_SUITE:-$(. /etc/os-release 2>/dev/null && [[ ${ID:-} == debian ]] && echo "${VERSION_CODENAME:-}" || true)}
suite=${suite:-bookworm}
host_mirror() {
  if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
    awk '$1 == "URIs:" { print $2; exit }' /etc/apt/sources.list.d/debian.sources
  elif [[ -r /etc/apt/sources.list ]]; then
    awk '$1 == "deb" && $3 == "'"$suite"'" { print $2; exit }' /etc/apt/sources.list
  fi
}
mirror=${DEBIAN_MIRROR:-$(host_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}
image=${COUNTERSIGN_BASE_IMAGE:-localhost/countersign-runtime-base:$suite}
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

stale=$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
tar --numeric-owner -C "$rootfs" -c . |
  podman import --quiet \
    --change "LABEL dev.countersign.base-script=$script_hash" \
    --change "LABEL org.opencontainers.image.description=libc6 and libgcc-s1 of Debian $suite, CA certificates, user nonroot (65532)" \
    --change "ENV PATH=/usr/local/bin:/usr/bin:/bin" \
    - "$image" >/dev/null
# The image made by an earlier version of this script, now untagged.
if [[ -n $stale ]]; then podman rmi "$stale" >/dev/null 2>&1 || true; fi
echo "$image"
