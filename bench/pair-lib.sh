# Sourced by the *-pair.sh benchmarks: `pair_up NAME "$@"` takes the
# binaries' directory ($1, holding `iomfs` and `iom-server`) and the run
# label ($2), sets B (the binaries), R (the label), D (the cluster
# directory /var/tmp/NAME-<binaries' dir name>) and M (its mount point), and
# starts a fresh local 5-IOM cluster mounted at M; `pair_down` stops it and
# removes both.
pair_up() {
  local name=$1; shift
  B=$(cd "$1" && pwd); R=$2
  D=/var/tmp/$name-$(basename "$B"); M=$D-mnt
  rm -rf "$D" "$M"; mkdir -p "$M"
  export IOMFS_BIN_DIR=$B PATH=$B:$PATH
  "$B/iomfs" local --dir "$D" --mount "$M" --detach >/dev/null 2>&1 || { echo "start failed"; exit 1; }
}

pair_down() {
  "$B/iomfs" local stop --dir "$D" >/dev/null 2>&1 || fusermount3 -u "$M"
  sleep 1; rm -rf "$D" "$M"
}
