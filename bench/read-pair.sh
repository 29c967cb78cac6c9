#!/bin/bash
# One run of sequential reads through a fresh local 5-IOM mount with the
# binaries in $1, label $2: a 1 GiB file written once, then read 3 times
# with `dd bs=1M` after dropping the IOMs' caches and the kernel's page
# cache. Appends "seqread_MBps <rate>" (dd's figure) and "seqread_cpu_s
# <seconds>" (CPU of the IOMs and the client during the read) lines to
# $1.$2.read.
set -u
B=$1; R=$2; D=/var/tmp/rp-$(basename $B); M=$D-mnt
rm -rf "$D" "$M"; mkdir -p "$M"
export IOMFS_BIN_DIR=$B PATH=$B:$PATH
iomfs local --dir "$D" --mount "$M" --detach >/dev/null 2>&1 || { echo "start failed"; exit 1; }
out=$B.$R.read; : > $out
[ -f /var/tmp/rp-src ] || dd if=/dev/urandom of=/var/tmp/rp-src bs=1M count=1024 status=none
cp /var/tmp/rp-src $M/f
# CPU ticks (user + system) of this cluster's IOMs and client so far.
cpu() { for p in $(pgrep -f "iom-server --dir $D |iomfs mount --dir $D "); do awk '{print $14+$15}' /proc/$p/stat; done | paste -sd+ | bc; }
for i in 1 2 3; do
  iomfs cache drop --dir "$D" >/dev/null; sync; echo 3 > /proc/sys/vm/drop_caches
  c0=$(cpu)
  r=$(dd if=$M/f of=/dev/null bs=1M 2>&1 | tail -1 | awk '{print $(NF-1)}')
  c1=$(cpu)
  echo "seqread_MBps $r" >> $out
  echo "seqread_cpu_s $(echo "scale=2; ($c1 - $c0) / $(getconf CLK_TCK)" | bc)" >> $out
done
iomfs local stop --dir "$D" >/dev/null 2>&1 || fusermount3 -u "$M"
sleep 1; rm -rf "$D" "$M"
