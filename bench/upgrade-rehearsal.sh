#!/usr/bin/env bash
# A rolling upgrade with real binaries of the previous release: a 5-IOM
# cluster where IOM 2 (and a second client) run OLD_BIN_DIR's binaries and
# everything else this checkout's; files written and read across both, a
# scrub, status from the old client; then IOM 2 is upgraded (SIGTERM, start
# the new binary) and everything is checked again.
#   bench/upgrade-rehearsal.sh OLD_BIN_DIR     (e.g. a `cargo build --release`
#   of the previous release in another worktree; needs FUSE, run as root)
set -euo pipefail
OLD=${1:?usage: $0 OLD_BIN_DIR}
NEW=$(cd "$(dirname "$0")/.." && pwd)/target/release
T=$(mktemp -d /var/tmp/iomfs-upgrade-XXXXXX)
D=$T/c; M=$T/mnt; mkdir -p "$M"
pids=()
cleanup() { mountpoint -q "$M" && umount -l "$M"; for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$T"; }
trap cleanup EXIT
start() { "$1/iom-server" --dir "$D" --id "$2" >>"$T/iom$2.log" 2>&1 & pids[$2]=$!; }
healthy() { for _ in $(seq 1 120); do "$NEW/iomfs" status --dir "$D" >/dev/null 2>&1 && return 0; sleep 0.5; done; "$NEW/iomfs" status --dir "$D"; return 1; }
"$NEW/iomfs" init --dir "$D" --ioms 5 >/dev/null
for i in 0 1 3 4; do start "$NEW" $i; done
start "$OLD" 2
healthy
echo "== mixed: IOM 2 runs $("$OLD/iom-server" --version)"
"$NEW/iomfs" status --dir "$D" | grep -E "^IOM|warning|cluster:"
"$NEW/iomfs" mount --dir "$D" "$M" --detach >/dev/null
for i in $(seq 1 20); do head -c $((i * 150001)) /dev/urandom >"$T/src$i"; cp "$T/src$i" "$M/f$i"; done
for i in $(seq 1 20); do cmp -s "$T/src$i" "$M/f$i" || { echo "f$i differs (mixed versions)"; exit 1; }; done
echo "20 files written and read back through the new client"
"$NEW/iomfs" scrub --dir "$D" 2>&1 | tail -2
echo "== the previous release's client against the mixed cluster"
"$OLD/iomfs" status --dir "$D" | grep -E "cluster:"
"$OLD/iomfs" scrub --dir "$D" 2>&1 | tail -1
echo "== upgrade IOM 2"
kill -TERM "${pids[2]}"; wait "${pids[2]}" || true
start "$NEW" 2
healthy
"$NEW/iomfs" status --dir "$D" | grep -E "^IOM|warning|cluster:"
for i in $(seq 1 20); do cmp -s "$T/src$i" "$M/f$i" || { echo "f$i differs after the upgrade"; exit 1; }; done
"$NEW/iomfs" scrub --dir "$D" 2>&1 | tail -1
echo "ok: mixed versions served, IOM 2 upgraded with one restart, every byte intact"
