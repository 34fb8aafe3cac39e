#!/usr/bin/env bash
# Cross-builds the device agent for Raspberry Pi, checks its size, and
# optionally runs its unit tests under qemu-user and builds Debian packages.
#
#   cross/build.sh [--setup] [--test] [--deb] [TARGET...]
#
# TARGET: aarch64 (aarch64-unknown-linux-gnu: 64-bit Raspberry Pi OS, Pi 3,
#         4, 5, Zero 2 W), armv7 (armv7-unknown-linux-gnueabihf: 32-bit
#         Raspberry Pi OS, Pi 2 and later) or amd64 (x86_64-unknown-linux-gnu,
#         on an x86-64 host: for the amd64 package). Default: aarch64 armv7.
# --setup Install what is missing, on Debian or Ubuntu (as root, or with
#         sudo): the cross gcc packages (for SQLite and ring's C code and the
#         final link), qemu-user, and the Rust standard library for each
#         target: `rustup target add`, or with RUST_TOOLCHAIN=debian Debian's
#         libstd-rust-dev:<arch>, which must be the same version as rustc.
# --test  Also build the agent's unit tests (`cargo test -p edge-agent
#         --lib`: config, decoders, buffer on real SQLite with its property
#         tests, quota, feature windows, tract on the shipped model) for each
#         target and run them under qemu-user.
# --deb   Also build the Debian package for each target with cargo-deb
#         (`cargo install cargo-deb`), into <target dir>/cross-artifacts/.
#
# The binary is built with the `dist` profile (fat LTO, one codegen unit,
# stripped) and without the demo. Its size is reported and must stay at or
# under SIZE_LIMIT_BYTES (default 25 MB = 25000000 bytes). Artifacts land in
# <target dir>/cross-artifacts/ (target/, or CARGO_TARGET_DIR). The Rust toolchain must be >= rust-version in the
# workspace Cargo.toml (1.91); see cross/README.md when it cannot be had.
set -euo pipefail
cd "$(dirname "$0")/.."

SIZE_LIMIT_BYTES=${SIZE_LIMIT_BYTES:-25000000}
# The newest glibc symbol version the binary may require: Raspberry Pi OS
# bookworm ships glibc 2.36. Weak references (resolved at run time when
# present, such as std's pidfd_spawnp) do not count.
GLIBC_MAX=${GLIBC_MAX:-2.36}
RUST_TOOLCHAIN=${RUST_TOOLCHAIN:-rustup}
TARGET_DIR=${CARGO_TARGET_DIR:-target}
OUT=$TARGET_DIR/cross-artifacts

setup=false test=false deb=false targets=()
for arg in "$@"; do
  case $arg in
    --setup) setup=true ;;
    --test) test=true ;;
    --deb) deb=true ;;
    aarch64 | aarch64-unknown-linux-gnu) targets+=(aarch64-unknown-linux-gnu) ;;
    armv7 | armv7-unknown-linux-gnueabihf) targets+=(armv7-unknown-linux-gnueabihf) ;;
    amd64 | x86_64 | x86_64-unknown-linux-gnu) targets+=(x86_64-unknown-linux-gnu) ;;
    -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

fail() { echo "build.sh: $*" >&2; exit 1; }
say() { echo "build.sh: $*"; }

# Per target: Debian architecture, gcc prefix, qemu binary (none: native).
debarch() { case $1 in aarch64-*) echo arm64 ;; armv7-*) echo armhf ;; x86_64-*) echo amd64 ;; esac; }
gccprefix() { case $1 in aarch64-*) echo aarch64-linux-gnu ;; armv7-*) echo arm-linux-gnueabihf ;; x86_64-*) echo x86_64-linux-gnu ;; esac; }
qemu() { case $1 in aarch64-*) echo qemu-aarch64 ;; armv7-*) echo qemu-arm ;; esac; }
native() { [ "$(uname -m)" = "${1%%-*}" ]; }
# CARGO_TARGET_<TRIPLE>_... and CC_<triple> spellings.
upper() { echo "$1" | tr 'a-z-' 'A-Z_'; }
lower() { echo "$1" | tr '-' '_'; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if $setup; then
  pkgs=(qemu-user file)
  for t in "${targets[@]}"; do
    native "$t" && continue
    pkgs+=("gcc-$(gccprefix "$t")" "libc6-dev-$(debarch "$t")-cross")
  done
  if [ "$RUST_TOOLCHAIN" = debian ]; then
    for t in "${targets[@]}"; do
      native "$t" && continue
      as_root dpkg --add-architecture "$(debarch "$t")"
      pkgs+=("libstd-rust-dev:$(debarch "$t")")
    done
    pkgs+=(rustc cargo)
  fi
  say "installing ${pkgs[*]}"
  as_root apt-get update
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${pkgs[@]}"
  if [ "$RUST_TOOLCHAIN" = rustup ]; then
    command -v rustup >/dev/null || fail "rustup not found (or set RUST_TOOLCHAIN=debian)"
    rustup target add "${targets[@]}"
  fi
fi

say "$(rustc --version), $(cargo --version)"
sysroot=$(rustc --print sysroot)
for t in "${targets[@]}"; do
  [ -d "$sysroot/lib/rustlib/$t/lib" ] ||
    fail "no Rust standard library for $t in $sysroot (run with --setup; see cross/README.md)"
  command -v "$(gccprefix "$t")-gcc" >/dev/null ||
    fail "$(gccprefix "$t")-gcc not found (run with --setup)"
  if [ "$RUST_TOOLCHAIN" = debian ] && ! native "$t"; then
    # Debian's rustc only links against the libstd package of its own version.
    want=$(dpkg-query -W -f '${Version}' rustc)
    have=$(dpkg-query -W -f '${Version}' "libstd-rust-dev:$(debarch "$t")" 2>/dev/null || true)
    [ "$want" = "$have" ] || fail "rustc is $want but libstd-rust-dev:$(debarch "$t") is ${have:-missing}"
  fi
done

mkdir -p "$OUT"
for t in "${targets[@]}"; do
  prefix=$(gccprefix "$t") T=$(upper "$t") l=$(lower "$t")
  if ! native "$t"; then
    export "CARGO_TARGET_${T}_LINKER=$prefix-gcc"
    # Design: LD_LIBRARY_PATH makes the guest use the cross libc (the one
    # linked against) even where a multiarch libc of another version exists.
    export "CARGO_TARGET_${T}_RUNNER=$(qemu "$t") -L /usr/$prefix -E LD_LIBRARY_PATH=/usr/$prefix/lib"
    export "CC_$l=$prefix-gcc" "AR_$l=$prefix-ar"
  fi

  say "building edge-agent for $t (profile dist, no demo)"
  started=$(date +%s)
  cargo build --locked -p edge-agent --no-default-features --profile dist --target "$t"
  bin=$TARGET_DIR/$t/dist/edge-agent
  say "built $bin in $(( $(date +%s) - started )) s"
  file "$bin" 2>/dev/null || true
  # The profile strips; strip again with the target's binutils so the
  # number below is the stripped size whatever the toolchain did.
  cp "$bin" "$OUT/edge-agent-$t"
  "$prefix-strip" "$OUT/edge-agent-$t"
  size=$(stat -c %s "$OUT/edge-agent-$t")
  say "size: $OUT/edge-agent-$t is $size bytes stripped ($(( size / 1024 )) KiB; limit $SIZE_LIMIT_BYTES)"
  [ "$size" -le "$SIZE_LIMIT_BYTES" ] || fail "$t binary is $size bytes, over the $SIZE_LIMIT_BYTES byte budget"
  if command -v "$prefix-objdump" >/dev/null; then
    need=$("$prefix-objdump" -T "$OUT/edge-agent-$t" | awk '$2 != "w"' |
      grep -o 'GLIBC_2\.[0-9]*' | sort -uV | tail -1 | sed 's/GLIBC_//')
    newest=$(printf '%s\n%s\n' "$need" "$GLIBC_MAX" | sort -V | tail -1)
    say "glibc: needs $need at most (limit $GLIBC_MAX)"
    [ "$newest" = "$GLIBC_MAX" ] || {
      "$prefix-objdump" -T "$OUT/edge-agent-$t" | awk '$2 != "w"' | grep -F "(GLIBC_$need)" | head -5 >&2
      fail "$t binary needs glibc $need, newer than $GLIBC_MAX (link against an older libc; see cross/README.md)"
    }
  fi
  if native "$t"; then
    say "runs: $("$OUT/edge-agent-$t" --version)"
  elif command -v "$(qemu "$t")" >/dev/null; then
    say "runs under $(qemu "$t"): $("$(qemu "$t")" -L "/usr/$prefix" -E "LD_LIBRARY_PATH=/usr/$prefix/lib" "$OUT/edge-agent-$t" --version)"
  fi

  if $test; then
    if native "$t"; then how=natively; else how="under $(qemu "$t")"; fi
    say "unit tests for $t $how"
    started=$(date +%s)
    cargo test --locked -p edge-agent --no-default-features --lib --target "$t"
    say "unit tests for $t passed in $(( $(date +%s) - started )) s"
  fi

  if $deb; then
    command -v cargo-deb >/dev/null || fail "cargo-deb not found (cargo install cargo-deb)"
    cargo deb -p edge-agent --target "$t" --profile dist --no-build --no-strip \
      --output "$OUT/"
  fi
done
ls -l "$OUT"
