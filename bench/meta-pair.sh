#!/bin/bash
# One side-by-side run of metadata-heavy work with the binaries in $1
# (holding `iomfs` and `iom-server`), labelled $2: a fresh local 5-IOM
# cluster and mount; 2000 files of 4 KiB created with `cp`, listed with
# `ls -l` after the kernel's caches are dropped (a readdirplus per 1024
# names, two getxattr round trips per file), then removed with `rm -rf`. Output in $1.$2.meta ("create_per_s",
# "stat_per_s", "delete_per_s"). Alternate old and new:
#   for r in 1 2 3; do bench/meta-pair.sh /tmp/old $r; bench/meta-pair.sh /tmp/new $r; done
set -u
. "$(dirname "$0")/pair-lib.sh"
pair_up mp "$@"
mkdir "$M/t"
head -c 4096 /dev/urandom > /tmp/mp-4k
out=$B.$R.meta; : > "$out"
rate() { echo "$1 $(echo "2000 / ($3 - $2)" | bc)" >> "$out"; }
s=$(date +%s.%N); for i in $(seq 1 2000); do cp /tmp/mp-4k "$M/t/f$i"; done; e=$(date +%s.%N); rate create_per_s "$s" "$e"
sync; echo 3 > /proc/sys/vm/drop_caches
s=$(date +%s.%N); ls -l "$M/t" > /dev/null; e=$(date +%s.%N); rate stat_per_s "$s" "$e"
s=$(date +%s.%N); rm -rf "$M/t"; e=$(date +%s.%N); rate delete_per_s "$s" "$e"
pair_down
