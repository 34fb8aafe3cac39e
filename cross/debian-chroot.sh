#!/usr/bin/env bash
# Runs cross/build.sh with Debian's own Rust toolchain inside a Debian
# chroot, for machines where rustup cannot add targets (no access to the
# Rust project's download server) and the Debian release's rustc is older
# than the workspace's rust-version (bookworm ships 1.63).
#
#   cross/debian-chroot.sh [build.sh arguments...]
#
# Debian unstable ships rustc and cargo >= 1.91 together with
# libstd-rust-dev for arm64 and armhf of the same version, the cross gcc
# packages and qemu-user: everything comes from Debian's archive. Needs
# root (debootstrap, chroot, bind mounts). The chroot is kept in CHROOT
# (default /var/tmp/edge-agent-sid) and reused; crate downloads are shared
# with the host's cargo home; builds go to target/debian-chroot-<SYSROOT_SUITE>/
# (or EDGE_ARM_TARGET_DIR).
#
# Binaries linked against unstable's glibc need the GLIBC symbol versions
# the script prints (2.34 or older was seen: Raspberry Pi OS bookworm has
# 2.36).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

CHROOT=${CHROOT:-/var/tmp/edge-agent-sid}
SUITE=${SUITE:-sid}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CARGO_HOME_HOST=${CARGO_HOME:-$HOME/.cargo}

fail() { echo "debian-chroot: $*" >&2; exit 1; }
# Exit 75 (EX_TEMPFAIL): Debian's archive could not give us the toolchain
# (network, or unstable momentarily uninstallable); nothing was built or
# tested. Build, size and test failures exit 1.
unavailable() { echo "debian-chroot: toolchain unavailable: $*" >&2; exit 75; }
say() { echo "debian-chroot: $*"; }

[ "$(id -u)" = 0 ] || fail "needs root (debootstrap, chroot, mount)"
if ! command -v debootstrap >/dev/null; then
  { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y debootstrap; } ||
    unavailable "cannot install debootstrap"
fi

packages=(rustc cargo libstd-rust-dev:arm64 libstd-rust-dev:armhf
  gcc-aarch64-linux-gnu gcc-arm-linux-gnueabihf qemu-user
  libc6-dev-arm64-cross libc6-dev-armhf-cross
  binutils-aarch64-linux-gnu binutils-arm-linux-gnueabihf
  ca-certificates file git)

if [ ! -e "$CHROOT/.edge-agent-ready" ]; then
  started=$(date +%s)
  if [ ! -x "$CHROOT/usr/bin/apt-get" ]; then
    say "creating a Debian $SUITE chroot in $CHROOT"
    rm -rf "$CHROOT"
    debootstrap --variant=minbase "$SUITE" "$CHROOT" "$MIRROR" ||
      { rm -rf "$CHROOT"; unavailable "debootstrap $SUITE from $MIRROR failed"; }
  fi
  chroot "$CHROOT" dpkg --add-architecture arm64
  chroot "$CHROOT" dpkg --add-architecture armhf
  # Design: a mirror snapshot older than the machine's clock serves an
  # expired Release file; the packages are still signed and verified.
  chroot "$CHROOT" apt-get -o Acquire::Check-Valid-Until=false update ||
    unavailable "apt-get update in the chroot failed"
  chroot "$CHROOT" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${packages[@]}" ||
    unavailable "the toolchain packages did not install (${packages[*]})"
  touch "$CHROOT/.edge-agent-ready"
  say "chroot ready in $(( $(date +%s) - started )) s"
fi

# The binaries must run on the oldest supported Raspberry Pi OS (bookworm,
# glibc 2.36), not only on unstable: linked against unstable's libc they need
# GLIBC_2.43 (new versions of log10f, acosf, ...). So each cross libc of
# unstable is overlaid with the same packages from SYSROOT_SUITE during the
# build (headers, crt files, libc.so), and the tests run on that libc too.
SYSROOT_SUITE=${SYSROOT_SUITE:-bookworm}
for pair in arm64:aarch64-linux-gnu armhf:arm-linux-gnueabihf; do
  arch=${pair%%:*} prefix=${pair#*:}
  xroot=$CHROOT/opt/xroot-$SYSROOT_SUITE-$arch
  [ -e "$xroot/.ready" ] && continue
  say "overlaying $prefix's libc with $SYSROOT_SUITE's (libc6-$arch-cross)"
  echo "deb $MIRROR $SYSROOT_SUITE main" >"$CHROOT/etc/apt/sources.list.d/sysroot-$SYSROOT_SUITE.list"
  chroot "$CHROOT" apt-get -q -o Acquire::Check-Valid-Until=false update >/dev/null ||
    unavailable "apt-get update for $SYSROOT_SUITE failed"
  rm -rf "$xroot" "$CHROOT/tmp/xroot-debs"
  mkdir -p "$xroot/usr" "$CHROOT/tmp/xroot-debs"
  chroot "$CHROOT" sh -c "cd /tmp/xroot-debs && apt-get -q download \
    libc6-$arch-cross/$SYSROOT_SUITE libc6-dev-$arch-cross/$SYSROOT_SUITE \
    linux-libc-dev-$arch-cross/$SYSROOT_SUITE" ||
    unavailable "$SYSROOT_SUITE's libc6-dev-$arch-cross could not be downloaded"
  cp -a "$CHROOT/usr/$prefix" "$xroot/usr/"
  for deb in "$CHROOT"/tmp/xroot-debs/*.deb; do dpkg-deb -x "$deb" "$xroot"; done
  touch "$xroot/.ready"
done

mounts=()
cleanup() {
  for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount "${mounts[i]}" 2>/dev/null || true; done
}
trap cleanup EXIT
bind() {
  mkdir -p "$2"
  mount --bind "$1" "$2"
  mounts+=("$2")
}
mount -t proc proc "$CHROOT/proc" && mounts+=("$CHROOT/proc")
bind /dev "$CHROOT/dev"
cp /etc/resolv.conf "$CHROOT/etc/resolv.conf"
# Design: the host may reach crates.io through a TLS-intercepting proxy whose
# CA only the host trusts; cargo in the chroot uses the host's bundle.
cainfo=
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp /etc/ssl/certs/ca-certificates.crt "$CHROOT/etc/ssl/host-ca-certificates.crt"
  cainfo=/etc/ssl/host-ca-certificates.crt
fi
bind "$repo" "$CHROOT/src"
# Builds go to EDGE_ARM_TARGET_DIR when set (CI keeps it outside the clone so
# the next run reuses the compiled dependencies; the sources are always at
# /src inside, so a new clone looks the same to cargo).
target_host=${EDGE_ARM_TARGET_DIR:-$repo/target/debian-chroot-$SYSROOT_SUITE}
mkdir -p "$target_host"
bind "$target_host" "$CHROOT/target"
bind "$CHROOT/opt/xroot-$SYSROOT_SUITE-arm64/usr/aarch64-linux-gnu" "$CHROOT/usr/aarch64-linux-gnu"
bind "$CHROOT/opt/xroot-$SYSROOT_SUITE-armhf/usr/arm-linux-gnueabihf" "$CHROOT/usr/arm-linux-gnueabihf"
mkdir -p "$CARGO_HOME_HOST/registry"
bind "$CARGO_HOME_HOST/registry" "$CHROOT/root/.cargo/registry"

# shellcheck disable=SC2016 # expanded by the shell inside the chroot
chroot "$CHROOT" env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin \
  CARGO_TARGET_DIR=/target RUST_TOOLCHAIN=debian \
  CARGO_TERM_COLOR=never ${cainfo:+CARGO_HTTP_CAINFO=$cainfo SSL_CERT_FILE=$cainfo} \
  bash -c 'cd /src && cross/build.sh "$@" &&
    for b in /target/cross-artifacts/edge-agent-*; do
      [ -f "$b" ] || continue
      echo "debian-chroot: $b needs glibc symbols up to $(grep -ao "GLIBC_2\.[0-9]*" "$b" | sort -uV | tail -1)"
    done' build "$@"
say "artifacts (host side): $target_host/cross-artifacts"
