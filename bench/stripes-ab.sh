#!/usr/bin/env bash
# Client stripes on and off, side by side on one local 5-IOM cluster: two
# mounts of the same cluster, one whose client was started with
# `client_stripes = false`, sequential 1 MiB writes of a new 512 MiB file
# (dd, conv=fsync) alternating between them. Prints MiB/s and the whole
# machine's CPU seconds per GiB written for each run, then the medians.
# Usage: bench/stripes-ab.sh [RUNS] [MiB]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
mib=${2:-512}
bin=target/release
t=$(mktemp -d /var/tmp/iomfs-stripes-ab.XXXXXX)
cleanup() {
  umount "$t/off" 2>/dev/null || true
  "$bin/iomfs" local stop --dir "$t/d" >/dev/null 2>&1 || true
  rm -rf "$t"
}
trap cleanup EXIT
mkdir -p "$t/on" "$t/off"
"$bin/iomfs" init --dir "$t/d" >/dev/null
"$bin/iomfs" local --dir "$t/d" --mount "$t/on" --detach >/dev/null
cp "$t/d/cluster.toml" "$t/cluster.toml.on"
sed -i 's/^\[tuning\]/[tuning]\nclient_stripes = false/' "$t/d/cluster.toml"
"$bin/iomfs" mount --dir "$t/d" "$t/off" --detach >/dev/null
cp "$t/cluster.toml.on" "$t/d/cluster.toml"
head -c "${mib}M" /dev/urandom >"$t/src"
busy() { head -1 /proc/stat | awk '{print $2+$3+$4+$7+$8}'; }
for i in $(seq 1 "$runs"); do
  for m in on off; do
    rm -f "$t/$m/f"
    sync
    sleep 1
    c0=$(busy)
    s=$(date +%s.%N)
    dd if="$t/src" of="$t/$m/f" bs=1M conv=fsync 2>/dev/null
    e=$(date +%s.%N)
    c1=$(busy)
    python3 -c "print('$m', 'run', $i, round($mib/($e-$s),1), 'MiB/s', round(($c1-$c0)/100/($mib/1024),2), 'CPU-s/GiB')"
  done
done | tee "$t/out"
python3 - "$t/out" <<'PY'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
for m in ("on", "off"):
    r = [float(x[3]) for x in rows if x[0] == m]
    c = [float(x[5]) for x in rows if x[0] == m]
    print(f"stripes {m}: median {statistics.median(r):.1f} MiB/s, {statistics.median(c):.2f} CPU-s/GiB over {len(r)} runs")
PY
