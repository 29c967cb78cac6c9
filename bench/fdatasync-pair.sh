#!/bin/bash
# One side-by-side run: fio random 4 KiB writes with fdatasync=1, then fsync=1,
# 12 s each, on a fresh local 5-IOM mount with the binaries in $1 (label $2).
#   for r in 1 2 3; do bench/fdatasync-pair.sh /tmp/ab/old $r; bench/fdatasync-pair.sh /tmp/ab/new $r; done
B=$1; D=/var/tmp/fds-$(basename $B); M=$D-mnt
rm -rf $D $M; mkdir -p $M
export IOMFS_BIN_DIR=$B PATH=$B:$PATH
iomfs local --dir $D --mount $M --detach >/dev/null 2>&1 || { echo start failed; exit 1; }
fio --name=lay --filename=$M/r --rw=write --bs=1M --size=64M --end_fsync=1 >/dev/null 2>&1
for mode in fdatasync fsync; do
  iops=$(fio --name=x --filename=$M/r --rw=randwrite --bs=4k --size=64M --time_based --runtime=12 --$mode=1 --ioengine=psync --output-format=json 2>/dev/null | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["jobs"][0]["write"]["iops"]))')
  echo "$(basename $B) $2 $mode $iops"
done
iomfs local stop --dir $D >/dev/null 2>&1 || fusermount3 -u $M
sleep 1; rm -rf $D $M
