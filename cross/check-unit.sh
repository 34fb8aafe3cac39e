#!/usr/bin/env bash
# Checks the packaged systemd unit and sysusers file:
#   - `systemd-analyze verify` prints nothing (warnings count as failures);
#   - `systemd-analyze security --offline=yes` scores the unit's exposure
#     at most MAX_EXPOSURE (default 2.0) and the score is reported;
#   - `systemd-sysusers` accepts the sysusers.d file and creates the user.
# Needs only systemd-analyze and systemd-sysusers (Debian package `systemd`);
# no running systemd. Everything happens in a temporary root.
set -euo pipefail
cd "$(dirname "$0")/.."

unit=cross/systemd/edge-agent.service
sysusers=cross/debian/edge-agent.sysusers
max=${MAX_EXPOSURE:-2.0}

fail() { echo "check-unit: $*" >&2; exit 1; }
for tool in systemd-analyze systemd-sysusers; do
  command -v "$tool" >/dev/null || fail "$tool not found (apt-get install systemd)"
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# A root with the system's units (for the targets the unit names) and an
# executable at the unit's ExecStart= path, which verify insists on.
mkdir -p "$root/usr/bin" "$root/usr/lib/systemd" "$root/etc/systemd/system"
cp -a /usr/lib/systemd/system "$root/usr/lib/systemd/"
printf '#!/bin/sh\nexit 0\n' > "$root/usr/bin/edge-agent"
chmod 0755 "$root/usr/bin/edge-agent"
cp "$unit" "$root/etc/systemd/system/edge-agent.service"

out=$(systemd-analyze verify --root="$root" edge-agent.service 2>&1) ||
  fail "systemd-analyze verify failed: $out"
[ -z "$out" ] || fail "systemd-analyze verify warns: $out"
echo "check-unit: systemd-analyze verify $unit: clean"

report=$(systemd-analyze security --offline=yes --no-pager "$unit" 2>&1) ||
  fail "systemd-analyze security failed: $report"
score=$(printf '%s\n' "$report" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
[ -n "$score" ] || fail "no exposure score in: $report"
if awk -v s="$score" -v m="$max" 'BEGIN { exit !(s > m) }'; then
  printf '%s\n' "$report" | grep '✗' >&2 || true
  fail "exposure $score is above $max"
fi
echo "check-unit: systemd-analyze security --offline $unit: exposure $score (limit $max)"

mkdir -p "$root/etc"
: > "$root/etc/passwd"; : > "$root/etc/group"
systemd-sysusers --root="$root" "$PWD/$sysusers" >/dev/null 2>&1 ||
  fail "systemd-sysusers rejects $sysusers"
grep -q '^edge-agent:' "$root/etc/passwd" || fail "$sysusers creates no edge-agent user"
grep -q '^edge-agent:' "$root/etc/group" || fail "$sysusers creates no edge-agent group"
echo "check-unit: $sysusers creates user and group edge-agent"
