#!/bin/bash
# One side-by-side run of small-file reads with the binaries in $1 (holding
# `iomfs` and `iom-server`), labelled $2: a fresh local 5-IOM cluster and
# mount, 2000 files of 4 KiB written, then three timed `cat` of all of
# them, each after `iomfs cache drop` and the kernel's drop_caches (so
# every open and read goes to the cluster). Output in $1.$2.smallread
# ("files_per_s N" per pass). Alternate old and new:
#   for r in 1 2 3; do bench/smallread-pair.sh /tmp/old $r; bench/smallread-pair.sh /tmp/new $r; done
set -u
. "$(dirname "$0")/pair-lib.sh"
pair_up sr "$@"
mkdir "$M/t"
head -c 4096 /dev/urandom > /tmp/sr-4k
for i in $(seq 1 2000); do cp /tmp/sr-4k "$M/t/f$i"; done
out=$B.$R.smallread; : > "$out"
for pass in 1 2 3; do
  "$B/iomfs" cache drop --dir "$D" >/dev/null 2>&1; sync; echo 3 > /proc/sys/vm/drop_caches
  s=$(date +%s.%N); (cd "$M/t" && cat f* > /dev/null); e=$(date +%s.%N)
  echo "files_per_s $(echo "2000 / ($e - $s)" | bc)" >> "$out"
done
pair_down
