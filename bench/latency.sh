#!/usr/bin/env bash
# Throughput with network latency added between every pair of hosts
# (issue 17): five IOMs as hosts on 127.0.0.11-15 (the multi-host layout,
# `lan` transport), and `udp-delay` (integration/src/bin/udp-delay.rs)
# standing in for netem, which this kernel lacks: each IOM i is also
# reached at 127.0.0.(31+i) through the relay, which delays every datagram
# by D microseconds each way. The client's cluster.toml and every other
# IOM's name the relay addresses, so client-IOM and IOM-IOM traffic both
# cross it; each IOM binds its own address.
#
# For each one-way delay (`direct` = no relay at all), a fresh cluster;
# for each toughness level (a directory with user.iomfs.toughness), a
# 128 MiB sequential write (dd bs=1M conv=fsync) and 300 small files
# (4 KiB, create + write + close), then those files read back with `cat`
# after `iomfs cache drop` and drop_caches. Prints a markdown table, and the round
# trip measured through the relay with UDP pings.
#
# usage: bench/latency.sh [DELAY ...]    (default: direct 0 100 500)
# IOMFS_BENCH_STRIPES=0 starts the client with `client_stripes = false`.
# needs: release binaries (cargo build --release --workspace --bins), root
# (FUSE), python3, attr (setfattr).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${IOMFS_BIN_DIR:-$PWD/target/release}
DELAYS=("$@")
[ ${#DELAYS[@]} -eq 0 ] && DELAYS=(direct 0 100 500)
LEVELS=(fast atomic durable buffered)
ROOT=$(mktemp -d /var/tmp/iomfs-latency-XXXXXX)
PIDS=()
MNT=$ROOT/mnt
cleanup() {
  mountpoint -q "$MNT" 2>/dev/null && { fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT"; }
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$ROOT"
}
trap cleanup EXIT
PORT=$((20000 + RANDOM % 30000))
head -c 128M /dev/urandom >"$ROOT/seq.src"

ping_rtt() { # $1: one-way delay in us; prints the median UDP round trip through udp-delay, in us
  local echo_port=$((PORT + 1))
  python3 - "$echo_port" <<'EOF' &
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("127.0.0.40", int(sys.argv[1])))
while True:
    d, a = s.recvfrom(2048); s.sendto(d, a)
EOF
  local echo=$!
  "$BIN/udp-delay" "$1" "127.0.0.41:$echo_port=127.0.0.40:$echo_port" & local relay=$!
  sleep 0.3
  python3 - "$echo_port" <<'EOF'
import socket, sys, time, statistics
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1)
rtts = []
for _ in range(200):
    t = time.perf_counter(); s.sendto(b"x" * 1200, ("127.0.0.41", int(sys.argv[1]))); s.recvfrom(2048)
    rtts.append((time.perf_counter() - t) * 1e6)
print(int(statistics.median(rtts)))
EOF
  kill $echo $relay 2>/dev/null || true
}

start_cluster() { # $1: delay or "direct"
  local d=$1 c=$ROOT/c-$1
  local addrs
  addrs=$(for i in 0 1 2 3 4; do printf '127.0.0.1%s:%s,' $((1 + i)) $PORT; done)
  "$BIN/iomfs" init --dir "$c/init" --ioms 5 --addrs "${addrs%,}" --transport lan >/dev/null
  for i in 0 1 2 3 4; do
    local h=$c/host-$i
    mkdir -p "$h/iom-$i"
    cp "$c/init/ca.pem" "$h/"
    cp "$c/init/iom-$i"/node.* "$h/iom-$i/"
    if [ "$d" = direct ]; then
      cp "$c/init/cluster.toml" "$h/"
    else
      # Every other IOM through its relay address; its own as it binds.
      python3 - "$c/init/cluster.toml" "$h/cluster.toml" "$i" <<'EOF'
import re, sys
src, dst, me = sys.argv[1], sys.argv[2], int(sys.argv[3])
n = [-1]
def sub(m):
    n[0] += 1
    return m.group(0) if n[0] == me else m.group(0).replace(f"127.0.0.{11 + n[0]}:", f"127.0.0.{31 + n[0]}:")
open(dst, "w").write(re.sub(r'addr = "127\.0\.0\.\d+:\d+"', sub, open(src).read()))
EOF
    fi
  done
  mkdir -p "$c/client"
  cp "$c/init/ca.pem" "$c/init"/client.* "$c/client/"
  if [ "$d" = direct ]; then
    cp "$c/init/cluster.toml" "$c/client/"
  else
    sed -E 's/127\.0\.0\.1([1-5]):/127.0.0.3\1:/' "$c/init/cluster.toml" >"$c/client/cluster.toml"
    local pairs=()
    for i in 0 1 2 3 4; do pairs+=("127.0.0.$((31 + i)):$PORT=127.0.0.$((11 + i)):$PORT"); done
    "$BIN/udp-delay" "$d" "${pairs[@]}" 2>"$ROOT/relay-$d.log" & PIDS+=($!)
  fi
  if [ "${IOMFS_BENCH_STRIPES:-1}" = 0 ]; then
    sed -i 's/^\[tuning\]/[tuning]\nclient_stripes = false/' "$c/client/cluster.toml"
  fi
  for i in 0 1 2 3 4; do
    setsid "$BIN/iom-server" --dir "$c/host-$i" --id $i >"$ROOT/iom-$d-$i.log" 2>&1 </dev/null & PIDS+=($!)
  done
  for _ in $(seq 1 120); do
    "$BIN/iomfs" status --dir "$c/client" 2>/dev/null | grep -q "cluster: healthy" && break
    sleep 0.5
  done
  mkdir -p "$MNT"
  "$BIN/iomfs" mount --dir "$c/client" "$MNT" --detach --log-file "$ROOT/mount-$d.log" >/dev/null
}

stop_cluster() {
  fusermount3 -u "$MNT" 2>/dev/null || umount -l "$MNT"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 1
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  PIDS=()
}

now() { date +%s.%N; }

echo "| one-way delay | UDP round trip (median) | level | seq write 128 MiB (MiB/s) | small files, 4 KiB (files/s) | read back after cache drops (files/s) |"
echo "| --- | ---: | --- | ---: | ---: | ---: |"
for d in "${DELAYS[@]}"; do
  if [ "$d" = direct ]; then rtt="-"; else rtt="$(ping_rtt "$d") µs"; fi
  start_cluster "$d"
  c_dir=$ROOT/c-$d/client
  for l in "${LEVELS[@]}"; do
    mkdir -p "$MNT/$l"
    setfattr -n user.iomfs.toughness -v "$l" "$MNT/$l"
    t0=$(now)
    dd if="$ROOT/seq.src" of="$MNT/$l/seq" bs=1M conv=fsync status=none
    t1=$(now)
    python3 - "$MNT/$l/small" <<'EOF'
import os, sys
d = sys.argv[1]; os.mkdir(d); data = os.urandom(4096)
for i in range(300):
    with open(os.path.join(d, f"f{i}"), "wb") as f:
        f.write(data)
EOF
    t2=$(now)
    # The same files read back, every cache dropped first (each open and
    # read goes to the cluster).
    "$BIN/iomfs" cache drop --dir "$c_dir" >/dev/null 2>&1 || true
    sync; echo 3 >/proc/sys/vm/drop_caches
    t3=$(now)
    (cd "$MNT/$l/small" && cat f* >/dev/null)
    t4=$(now)
    seq=$(python3 -c "print(round(128 / ($t1 - $t0), 1))")
    small=$(python3 -c "print(round(300 / ($t2 - $t1)))")
    sread=$(python3 -c "print(round(300 / ($t4 - $t3)))")
    echo "| ${d} µs | $rtt | $l | $seq | $small | $sread |" | sed 's/| direct µs |/| direct (no relay) |/'
  done
  stop_cluster
done
