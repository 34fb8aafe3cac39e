#!/usr/bin/env bash
# Installs, upgrades, removes and purges the edge-agent Debian package in a
# Debian chroot, checking at each step what a Debian user expects.
#
#   cross/test-deb.sh OLD.deb NEW.deb
#
# OLD and NEW are two versions of the package, both for the same
# architecture (cross/build.sh --deb amd64 builds one; `cargo deb
# --deb-version ...` another). The chroot (Debian SUITE, default bookworm,
# with systemd installed but not running, as on a device before boot) is
# kept in DEB_TEST_ROOT (default /var/tmp/edge-agent-deb-root, with
# -<arch> appended for a foreign architecture) and reused; each run starts
# from a purged package. Needs root (debootstrap, chroot).
#
# A package for another architecture (arm64, armhf) is installed into a
# Debian of that architecture: its dpkg, maintainer scripts and the agent
# itself run under qemu-user (Debian's qemu-user-static, registered with the
# kernel's binfmt_misc when it is not already).
# shellcheck disable=SC2016 # dpkg-query formats are not shell expansions
set -euo pipefail
cd "$(dirname "$0")/.."

[ $# -eq 2 ] || { sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2; }
old=$1 new=$2
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

fail() { echo "test-deb: FAIL: $*" >&2; exit 1; }
ok() { echo "test-deb: ok: $*"; }
in_root() { chroot "$ROOT" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "$@"; }

[ "$(id -u)" = 0 ] || fail "needs root (debootstrap, chroot)"
arch=$(dpkg-deb -f "$new" Architecture)
[ "$(dpkg-deb -f "$old" Architecture)" = "$arch" ] ||
  fail "$old and $new are for different architectures"
host=$(dpkg --print-architecture)
if [ "$arch" = "$host" ]; then
  ROOT=${DEB_TEST_ROOT:-/var/tmp/edge-agent-deb-root}
  foreign=()
else
  ROOT=${DEB_TEST_ROOT:-/var/tmp/edge-agent-deb-root-$arch}
  foreign=(--arch="$arch" --foreign)
  case $arch in
    arm64) q=aarch64 ;;
    armhf) q=arm ;;
    *) fail "no qemu-user mapping for $arch" ;;
  esac
  [ -e /usr/lib/binfmt.d/qemu-$q.conf ] ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-user-static ||
    fail "cannot install qemu-user-static"
  [ -e /proc/sys/fs/binfmt_misc/register ] ||
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc ||
    fail "binfmt_misc is not available: $arch programs cannot run here"
  # The F flag makes the kernel open the interpreter now, so it also works
  # inside the chroot, which has no qemu of its own.
  [ -e "/proc/sys/fs/binfmt_misc/qemu-$q" ] ||
    cat "/usr/lib/binfmt.d/qemu-$q.conf" >/proc/sys/fs/binfmt_misc/register ||
    fail "cannot register qemu-$q with binfmt_misc"
  echo "test-deb: $arch programs run under $(sed 's/.*:\(\/[^:]*\):[A-Z]*$/\1/' "/usr/lib/binfmt.d/qemu-$q.conf")"
fi
if [ ! -e "$ROOT/.edge-agent-ready" ]; then
  rm -rf "$ROOT"
  debootstrap "${foreign[@]}" --variant=minbase --include=systemd "$SUITE" "$ROOT" "$MIRROR"
  if [ ${#foreign[@]} -gt 0 ]; then
    chroot "$ROOT" /debootstrap/debootstrap --second-stage
  fi
  touch "$ROOT/.edge-agent-ready"
fi
echo "test-deb: $arch package in a $SUITE $arch root ($(in_root uname -m))"
mount -t proc proc "$ROOT/proc"
trap 'umount "$ROOT/proc"' EXIT
in_root dpkg --purge edge-agent >/dev/null 2>&1 || true
cp "$old" "$ROOT/tmp/old.deb"
cp "$new" "$ROOT/tmp/new.deb"
version() { in_root dpkg-query -W -f '${Version}' edge-agent; }

echo "test-deb: install $(basename "$old")"
in_root dpkg -i /tmp/old.deb
in_root getent passwd edge-agent | grep -q ':/var/lib/edge-agent:/usr/sbin/nologin$' ||
  fail "no system user edge-agent with home /var/lib/edge-agent and no login shell"
[ "$(in_root stat -c '%U:%G %a' /var/lib/edge-agent)" = "edge-agent:edge-agent 750" ] ||
  fail "/var/lib/edge-agent is $(in_root stat -c '%U:%G %a' /var/lib/edge-agent)"
[ -s "$ROOT/var/lib/edge-agent/models/nab-machine-temp/model.onnx" ] || fail "example model not installed"
in_root dpkg-query -W -f '${Conffiles}\n' edge-agent | grep -q '^ /etc/edge-agent/agent.toml ' ||
  fail "agent.toml is not a conffile"
unit=$(in_root dpkg -L edge-agent | grep 'systemd/system/edge-agent.service$') || fail "no unit in the package"
[ -L "$ROOT/etc/systemd/system/multi-user.target.wants/edge-agent.service" ] || fail "unit not enabled"
[ -e "$ROOT/usr/lib/sysusers.d/edge-agent.conf" ] || fail "no sysusers.d file"
in_root /usr/bin/edge-agent --version >/dev/null || fail "edge-agent --version"
ok "installed: user, state dir, example model, conffile, $unit enabled"

# The default config wants a token: exit 78 naming the key, as the service user.
set +e
msg=$(in_root runuser -u edge-agent -- edge-agent check-config /etc/edge-agent/agent.toml 2>&1)
code=$?
set -e
if [ "$code" != 78 ] || ! grep -q 'sync.token_file' <<<"$msg"; then
  fail "check-config without token: $code $msg"
fi
in_root sh -c 'umask 0027 && echo 0123abcd > /etc/edge-agent/token && chgrp edge-agent /etc/edge-agent/token'
in_root runuser -u edge-agent -- edge-agent check-config /etc/edge-agent/agent.toml >/dev/null ||
  fail "check-config with the token, as edge-agent"
ok "default config: exit 78 naming sync.token_file without a token, valid with one (read as edge-agent)"

# Operator edits and state that an upgrade must keep.
sed -i 's/^device_id = "edge-0001"/device_id = "pi-kitchen"/' "$ROOT/etc/edge-agent/agent.toml"
echo state > "$ROOT/var/lib/edge-agent/buffer.db"
echo "test-deb: upgrade to $(basename "$new")"
before=$(version)
in_root dpkg -i /tmp/new.deb
[ "$(version)" != "$before" ] || fail "version did not change on upgrade ($before)"
grep -q '^device_id = "pi-kitchen"' "$ROOT/etc/edge-agent/agent.toml" || fail "upgrade lost the config edit"
[ "$(cat "$ROOT/var/lib/edge-agent/buffer.db")" = state ] || fail "upgrade touched the buffer"
[ -e "$ROOT/etc/edge-agent/token" ] || fail "upgrade removed the token"
ok "upgraded $before -> $(version): config edit, token and state kept"

in_root dpkg --remove edge-agent
[ ! -e "$ROOT/usr/bin/edge-agent" ] || fail "remove left the binary"
[ -e "$ROOT/etc/edge-agent/agent.toml" ] || fail "remove deleted the config"
[ -e "$ROOT/var/lib/edge-agent/buffer.db" ] || fail "remove deleted the state"
[ ! -e "$ROOT/etc/systemd/system/multi-user.target.wants/edge-agent.service" ] || fail "remove left the unit enabled"
ok "removed: binary and unit gone; config, token and state kept"

in_root dpkg --purge edge-agent
[ ! -e "$ROOT/etc/edge-agent" ] || fail "purge left /etc/edge-agent: $(ls -A "$ROOT/etc/edge-agent")"
[ ! -e "$ROOT/var/lib/edge-agent" ] || fail "purge left /var/lib/edge-agent"
in_root getent passwd edge-agent >/dev/null || fail "purge removed the system user"
ok "purged: config, token and state gone; the system user stays (Debian practice)"
