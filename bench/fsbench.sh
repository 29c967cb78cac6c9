#!/bin/bash
# Vendored unchanged (except this line) from the shared peers kit so that
# bench/run measures iomfs with exactly the workload the peers ran.
# fsbench.sh MOUNTPOINT LABEL
# Small, fixed filesystem benchmark (fio + python + cp/diff). Each fio job is
# bounded to <= 30 s. Prints one machine-readable line per metric:
#     LABEL metric value unit
# on stdout (progress/notes go to stderr). Raw fio JSON is kept under
# ${FSBENCH_LOG:-/var/tmp/peers/fsbench-logs}/LABEL-<time>/.
#   a) seq write 1 GiB, bs=1M, psync, end_fsync=1
#   b) seq read of it, bs=1M (after drop_caches)
#   c) rand 4k write, 256 MiB file, 20 s: with fsync=1 and without (end_fsync=1)
#   d) rand 4k read, same file, 20 s (after drop_caches)
#   e) 2000 x 4 KiB files: create, stat, read, delete (python, timed per phase)
#   f) cp -a of a real source tree into the mount, then diff -r (timed)
# Needs: fio, python3, root (for drop_caches; skipped with a note otherwise).
# FSBENCH_ONLY="a b f" runs only those parts (b needs a, d needs c).
set -u
want() { [ -z "${FSBENCH_ONLY:-}" ] || [[ " $FSBENCH_ONLY " == *" $1 "* ]]; }
MNT=${1:?usage: fsbench.sh MOUNTPOINT LABEL}
LABEL=${2:?usage: fsbench.sh MOUNTPOINT LABEL}
[ -d "$MNT" ] || { echo "fsbench: $MNT is not a directory" >&2; exit 1; }
command -v fio >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null 2>&1
command -v fio >/dev/null || { echo "fsbench: fio missing (apt-get install fio)" >&2; exit 1; }
LOGD=${FSBENCH_LOG:-/var/tmp/peers/fsbench-logs}/$LABEL-$(date +%Y%m%d-%H%M%S)
mkdir -p "$LOGD"
D=$MNT/fsbench.$$
mkdir -p "$D" || { echo "fsbench: cannot mkdir $D" >&2; exit 1; }
trap 'rm -rf "$D" 2>/dev/null' EXIT

# Fixed source tree for (f): a frozen copy of the cargo registry sources (or
# /usr/share/doc), so every peer/run copies exactly the same bytes.
TREE=/var/tmp/peers/tree-src
if [ ! -d "$TREE" ]; then
  if [ -d /root/.cargo/registry/src ]; then cp -a /root/.cargo/registry/src "$TREE"
  else cp -a /usr/share/doc "$TREE"; fi
fi

out() { echo "$LABEL $1 $2 $3"; }
# FSBENCH_DROP_HOOK: a command that also empties the system's own user-space caches (run after the kernel drop)
drop() { sync; if echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then :; else echo "fsbench: drop_caches not permitted" >&2; fi
  [ -n "${FSBENCH_DROP_HOOK:-}" ] && { sh -c "$FSBENCH_DROP_HOOK" >/dev/null 2>&1 || echo "fsbench: drop hook failed: $FSBENCH_DROP_HOOK" >&2; }; return 0; }

FIO="fio --ioengine=psync --direct=0 --output-format=json --group_reporting"
# fjson FILE rw  -> prints "bw_MiBps iops clat_mean_us clat_p99_us fsync_lat_p99_us"
fjson() { python3 - "$1" "$2" <<'PY'
import json,sys
t=open(sys.argv[1]).read(); t=t[t.index('{'):]
j=json.loads(t)['jobs'][0][sys.argv[2]]
cl=j.get('clat_ns') or {}
p=cl.get('percentile',{})
p99=p.get('99.000000', 0)
sl=(json.loads(t)['jobs'][0].get('sync') or {}).get('lat_ns') or {}
sp99=(sl.get('percentile') or {}).get('99.000000', 0)
print("%.1f %.0f %.1f %.1f %.1f" % (j['bw_bytes']/1048576.0, j['iops'], cl.get('mean',0)/1000.0, p99/1000.0, sp99/1000.0))
PY
}

if want a; then
echo "fsbench: [$LABEL] a) seq write 1GiB" >&2
$FIO --name=seqw --filename="$D/seq.dat" --rw=write --bs=1M --size=1G --end_fsync=1 --runtime=30 > "$LOGD/a-seqwrite.json" 2>&1
read bw iops lat p99 sp99 < <(fjson "$LOGD/a-seqwrite.json" write) && out seqwrite_1M "$bw" MiB/s

fi
if want b; then
echo "fsbench: [$LABEL] b) seq read" >&2
drop
$FIO --name=seqr --filename="$D/seq.dat" --rw=read --bs=1M --size=1G --runtime=30 > "$LOGD/b-seqread.json" 2>&1
read bw iops lat p99 sp99 < <(fjson "$LOGD/b-seqread.json" read) && out seqread_1M "$bw" MiB/s
rm -f "$D/seq.dat"

fi
if want c; then
echo "fsbench: [$LABEL] c) rand 4k write fsync=1" >&2
# lay the 256 MiB file out first so both variants overwrite existing data
$FIO --name=lay --filename="$D/rand.dat" --rw=write --bs=1M --size=256M --end_fsync=1 > "$LOGD/c0-layout.json" 2>&1
$FIO --name=rwsync --filename="$D/rand.dat" --rw=randwrite --bs=4k --size=256M --time_based --runtime=20 --fsync=1 --randrepeat=0 > "$LOGD/c1-randwrite-fsync.json" 2>&1
read bw iops lat p99 sp99 < <(fjson "$LOGD/c1-randwrite-fsync.json" write) && { out randwrite_4k_fsync "$iops" IOPS; out randwrite_4k_fsync_fsynclat_p99 "$sp99" us; }
echo "fsbench: [$LABEL] c) rand 4k write no fsync" >&2
$FIO --name=rwnosync --filename="$D/rand.dat" --rw=randwrite --bs=4k --size=256M --time_based --runtime=20 --end_fsync=1 --randrepeat=0 > "$LOGD/c2-randwrite.json" 2>&1
read bw iops lat p99 sp99 < <(fjson "$LOGD/c2-randwrite.json" write) && out randwrite_4k_nofsync "$iops" IOPS

fi
if want d; then
echo "fsbench: [$LABEL] d) rand 4k read" >&2
drop
$FIO --name=rr --filename="$D/rand.dat" --rw=randread --bs=4k --size=256M --time_based --runtime=20 --randrepeat=0 > "$LOGD/d-randread.json" 2>&1
read bw iops lat p99 sp99 < <(fjson "$LOGD/d-randread.json" read) && { out randread_4k "$iops" IOPS; out randread_4k_clat_p99 "$p99" us; }
rm -f "$D/rand.dat"

fi
if want e; then
echo "fsbench: [$LABEL] e) 2000 small files" >&2
mkdir -p "$D/small"
python3 - "$D/small" "$LABEL" <<'PY'
import os,sys,time,subprocess
d,label=sys.argv[1],sys.argv[2]
N=2000; buf=os.urandom(4096)
names=[os.path.join(d,"f%05d"%i) for i in range(N)]
def drop():
    os.sync()
    try: open('/proc/sys/vm/drop_caches','w').write('3')
    except OSError: pass
    if os.environ.get('FSBENCH_DROP_HOOK'):
        subprocess.run(os.environ['FSBENCH_DROP_HOOK'], shell=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
t=time.monotonic()
for n in names:
    with open(n,'wb') as f: f.write(buf)
tc=time.monotonic()-t
drop()
t=time.monotonic()
for n in names: os.stat(n)
ts=time.monotonic()-t
t=time.monotonic(); bad=0
for n in names:
    with open(n,'rb') as f:
        if f.read()!=buf: bad+=1
tr=time.monotonic()-t
t=time.monotonic()
for n in names: os.unlink(n)
tu=time.monotonic()-t
for k,v in (("create",tc),("stat",ts),("read",tr),("delete",tu)):
    print("%s small_%s_2000x4k %.3f s" % (label,k,v))
    print("%s small_%s_rate %.0f files/s" % (label,k,N/v if v>0 else 0))
print("%s small_read_verify %s -" % (label, "ok" if bad==0 else "FAIL(%d)"%bad))
PY

fi
if want f; then
echo "fsbench: [$LABEL] f) cp -a tree + diff -r" >&2
SZ=$(du -sm "$TREE" | cut -f1); NF=$(find "$TREE" | wc -l)
t0=$(date +%s.%N); cp -a "$TREE" "$D/tree"; rc=$?; t1=$(date +%s.%N)
sync; t2=$(date +%s.%N)
drop
t3=$(date +%s.%N); diff -r "$TREE" "$D/tree" > "$LOGD/f-diff.txt" 2>&1; drc=$?; t4=$(date +%s.%N)
out cp_a_tree_${SZ}MiB_${NF}entries "$(awk "BEGIN{printf \"%.2f\", $t2-$t0}")" s
out diff_r_tree "$(awk "BEGIN{printf \"%.2f\", $t4-$t3}")" s
out cp_diff_verify "$([ $rc = 0 ] && [ $drc = 0 ] && echo ok || echo "FAIL(cp=$rc,diff=$drc)")" -
t0=$(date +%s.%N); rm -rf "$D/tree"; t1=$(date +%s.%N)
out rm_rf_tree "$(awk "BEGIN{printf \"%.2f\", $t1-$t0}")" s
fi
echo "fsbench: [$LABEL] done, logs in $LOGD" >&2
