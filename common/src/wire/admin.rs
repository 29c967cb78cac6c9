//! Administration: statistics, cache drop.

use super::*;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
pub enum AdminReq {
    Stats,
    /// Empty the IOM's own block cache and ask the kernel to drop the
    /// clean pages of its block file (`iomfs cache drop`: a read measured
    /// afterwards comes from the disk, as on a system without such a cache).
    DropCache,
    /// Protocol 8: the result of a scrub of the whole cluster, kept by
    /// every IOM (for `iomfs status` on any host and the metrics).
    ScrubReport(ScrubSummary),
    /// Protocol 8: the last scrub result this IOM was told of.
    LastScrub,
}

/// What a scrub of the whole cluster found, and when.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubSummary {
    /// Seconds since the Unix epoch when it finished.
    pub finished_unix: u64,
    pub millis: u64,
    pub groups: u64,
    pub blocks: u64,
    /// Problems found by the last pass.
    pub problems: u64,
    /// Problems repaired (`--repair`) before that pass.
    pub repaired: u64,
    /// Damaged blocks rebuilt from their groups while the scrub read them.
    pub healed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IomStats {
    pub iom: u32,
    pub epoch: u64,
    pub block_size: u32,
    pub slots_used: u64,
    pub slots_total: u64,
    pub data_blocks: u64,
    pub parity_blocks: u64,
    pub journal_records: u64,
    pub journal_flushes: u64,
    pub journal_bytes: u64,
    pub cache_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub parity_writes: u64,
    pub parity_deltas: u64,
    pub rss_bytes: u64,
    pub open_txs: u64,
    pub open_parity_txs: u64,
    pub rebuild_done: u64,
    pub rebuild_total: u64,
    pub rebuild_bytes_per_s: u64,
    /// Whether the IOM has learnt the current map and serves requests (an
    /// IOM that just started answers admin calls before it does).
    pub serving: bool,
    /// Data block versions rebuilt from their group after a failed read.
    pub repaired_blocks: u64,
    /// Failed reads of the IOM's own disk since it started.
    pub disk_errors: u64,
    /// Parity blocks recomputed from their data after a failed read.
    pub repaired_parity: u64,
    /// Bytes client writes may still take on this IOM (free space less its
    /// reserve).
    pub room_bytes: u64,
    /// Size of the filesystem holding its block file.
    pub disk_bytes: u64,
    /// Id of that filesystem (`statvfs` `f_fsid`; 0 when unknown): IOMs
    /// with the same id share its space.
    pub fs_id: u64,
    /// Of `room_bytes`, the filesystem's free space less the reserve (shared
    /// by the IOMs on it); the rest is the IOM's own (freed slots in its
    /// block file, its preallocated tail).
    pub shared_room_bytes: u64,
    /// The IOM's software version (`iom-server --version`).
    pub version: String,
    /// Bytes rebuilt since this IOM started, and for how long it has been
    /// rebuilding (ms; 0 before its first rebuild).
    pub rebuild_bytes: u64,
    pub rebuild_elapsed_ms: u64,
    /// Seconds the rebuild still needs at its pace of the last ten
    /// seconds (blocks and groups rebuilt per second); None when unknown.
    pub rebuild_eta_s: Option<u64>,
}

/// How much more each of the IOMs sharing a filesystem can store when each
/// stores the same amount: each first fills its own room (`own`, freed
/// slots and preallocated tail, no use to the others), then takes from the
/// `shared` free space (water filling).
fn per_iom(shared: u64, own: &[u64]) -> u128 {
    let mut o: Vec<u128> = own.iter().map(|&x| x as u128).collect();
    o.sort_unstable();
    let mut sum = 0u128;
    for j in 0..o.len() {
        sum += o[j];
        // The j + 1 IOMs with the least own room draw on the shared space.
        let x = (shared as u128 + sum) / (j as u128 + 1);
        if j + 1 == o.len() || x <= o[j + 1] {
            return x;
        }
    }
    shared as u128
}

impl IomStats {
    /// What users can still store, and the capacity, in bytes of file data,
    /// given every answering IOM's stats and N (data blocks per group).
    /// Each IOM holds 1/N of the bytes users store (its share of data and
    /// parity); a filesystem shared by k IOMs therefore takes k/N of them,
    /// and the filesystem that fills first bounds the cluster, less 1/32 of
    /// the capacity kept back for versions in flight. On a filesystem, each
    /// IOM first uses its own room, then the shared free space (counted
    /// once; see `per_iom`). IOMs whose filesystem is unknown (`fs_id` 0)
    /// count as alone on theirs.
    pub fn usable(all: &[IomStats], n: u32) -> (u64, u64) {
        // Per filesystem: (shared room, each IOM's own room, size).
        let mut by_fs: std::collections::BTreeMap<(u64, u32), (u64, Vec<u64>, u64)> = Default::default();
        for s in all {
            let key = if s.fs_id == 0 { (0, s.iom) } else { (s.fs_id, 0) };
            let shared = s.shared_room_bytes.min(s.room_bytes);
            let e = by_fs.entry(key).or_insert((u64::MAX, Vec::new(), 0));
            e.0 = e.0.min(shared);
            e.1.push(s.room_bytes - shared);
            e.2 = e.2.max(s.disk_bytes);
        }
        let n = n.max(1) as u128;
        let times_n = |x: u128| (x * n).min(u64::MAX as u128) as u64;
        let free = by_fs.values().map(|(shared, own, _)| times_n(per_iom(*shared, own))).min().unwrap_or(0);
        let total =
            by_fs.values().map(|(_, own, disk)| times_n(*disk as u128 / own.len().max(1) as u128)).min().unwrap_or(0);
        // Kept back, like ZFS's slop space (1/32), and 16 blocks per IOM
        // (the cushion of a given-back tail): versions in flight (a write's
        // new block before its old one is freed, parity versions between
        // batches) and the figure's own age.
        let cushions: u64 = all.iter().map(|s| 16 * s.block_size as u64).sum();
        (free.min(total).saturating_sub(total / 32 + cushions), total)
    }
}

// A reply lives for one call: boxing the stats would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResp {
    Stats(IomStats),
    /// The block cache held this many bytes before `DropCache`.
    CacheDropped {
        bytes: u64,
    },
    /// Answer to `ScrubReport`.
    ScrubKept,
    /// Answer to `LastScrub`: none before the first report.
    LastScrub(Option<ScrubSummary>),
}
