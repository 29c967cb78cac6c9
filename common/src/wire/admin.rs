//! Administration: statistics, cache drop.

use super::*;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminReq {
    Stats,
    /// Empty the IOM's own block cache and ask the kernel to drop the
    /// clean pages of its block file (`iomfs cache drop`: a read measured
    /// afterwards comes from the disk, as on a system without such a cache).
    DropCache,
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
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResp {
    Stats(IomStats),
    /// The block cache held this many bytes before `DropCache`.
    CacheDropped {
        bytes: u64,
    },
}
