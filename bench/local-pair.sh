#!/bin/bash
# One side-by-side benchmark run of the binaries in directory $1 (holding
# `iomfs` and `iom-server`), labelled $2: a fresh local 5-IOM cluster,
# `iomfs bench` (256 MiB sequential, 2000 random 4 KiB ops per toughness),
# then 2000 creates + `rm -rf` through the mount, timed together. Output in
# $1.$2.bench (one "name value unit" per line). Alternate old and new:
#   for r in 1 2 3; do bench/local-pair.sh /tmp/old $r; bench/local-pair.sh /tmp/new $r; done
set -u
. "$(dirname "$0")/pair-lib.sh"
pair_up pair "$@"
"$B/iomfs" bench --dir "$D" --size 256M --random-ops 2000 > "$B.$R.bench" 2>&1
s=$(date +%s.%N); mkdir "$M/t"; for i in $(seq 1 2000); do : > "$M/t/f$i"; done; rm -rf "$M/t"; e=$(date +%s.%N)
echo "creates+rm $(echo "$e - $s" | bc) s" >> "$B.$R.bench"
pair_down
