#!/bin/bash
# One run of small writes through a fresh local 5-IOM mount with the binaries in $1, label $2.
set -u
B=$1; R=$2; D=/var/tmp/fp-$(basename $B); M=$D-mnt
rm -rf "$D" "$M"; mkdir -p "$M"
export IOMFS_BIN_DIR=$B PATH=$B:$PATH
iomfs local --dir "$D" --mount "$M" --detach >/dev/null 2>&1 || { echo "start failed"; exit 1; }
out=$B.$R.fuse; : > $out
mkdir $M/b $M/a; setfattr -n user.iomfs.toughness -v buffered $M/b; setfattr -n user.iomfs.toughness -v atomic $M/a
t() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1; local e=$(date +%s.%N); echo "$(echo "$e - $s" | bc)"; }
echo "buffered_seq4k_64MiB_s $(t dd if=/dev/zero of=$M/b/f bs=4k count=16384)" >> $out
echo "buffered_rand4k_16k_s $(t fio --name=r --filename=$M/b/g --size=64M --bs=4k --rw=randwrite --ioengine=psync --number_ios=16384 --end_fsync=0)" >> $out
echo "atomic_seq4k_3000_s $(t dd if=/dev/zero of=$M/a/f bs=4k count=3000)" >> $out
iomfs local stop --dir "$D" >/dev/null 2>&1 || fusermount3 -u "$M"
sleep 1; rm -rf "$D" "$M"
