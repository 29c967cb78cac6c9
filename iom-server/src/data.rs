//! `DataSide`: the data role of one IOM — writes (a1–a14, `write_path`),
//! reads with self-healing, the durability barrier and drops
//! (`read_path`).
//!
//! It holds the storage, the block locks, the parity links, the in-flight
//! table, the recovery fence, the group (reconstruction for self-healing
//! reads) and the workers; never the node. Invariants: a block's writes
//! apply in arrival order under its lock (a1–a8); a fenced block is neither
//! read nor written until recovery settles it; a version whose bytes fail
//! their checksum is never returned — it is rebuilt from its group and
//! checked against the checksum it was written with, or the read fails.

use crate::failpoint::At;
use crate::fence::Fence;
use crate::group::Group;
use crate::inflight::Inflight;
use crate::links::Links;
use crate::locks::KeyLocks;
use crate::storage::Storage;
use crate::timeouts::Timeouts;
use crate::workers::Workers;
use common::{BlockKey, IomId, Layout};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

pub struct DataSide {
    pub(crate) me: IomId,
    pub(crate) layout: Layout,
    pub(crate) block_size: u32,
    /// Repaired read errors after which the IOM stops itself.
    pub(crate) disk_errors_before_stop: u64,
    pub(crate) storage: Arc<Storage>,
    pub(crate) locks: Arc<KeyLocks<BlockKey>>,
    pub(crate) links: Arc<Links>,
    pub(crate) inflight: Arc<Inflight>,
    pub(crate) fence: Arc<Fence>,
    pub(crate) group: Arc<Group>,
    pub(crate) workers: Arc<Workers>,
    pub(crate) timeouts: Timeouts,
    /// The data directory (where a crash point leaves its marker).
    dir: std::path::PathBuf,
    /// Data block versions rebuilt from their group because their slot
    /// could not be read (self-healing reads).
    pub repairs: AtomicU64,
    /// Failed reads of this IOM's own disk (errors and checksum mismatches).
    pub disk_errors: AtomicU64,
}

/// What the data role is built from (see [`DataSide::new`]).
pub struct Handles {
    pub me: IomId,
    pub layout: Layout,
    pub block_size: u32,
    pub disk_errors_before_stop: u64,
    pub storage: Arc<Storage>,
    pub locks: Arc<KeyLocks<BlockKey>>,
    pub links: Arc<Links>,
    pub inflight: Arc<Inflight>,
    pub fence: Arc<Fence>,
    pub group: Arc<Group>,
    pub workers: Arc<Workers>,
    pub timeouts: Timeouts,
    pub dir: std::path::PathBuf,
}

impl DataSide {
    pub fn new(h: Handles) -> DataSide {
        DataSide {
            me: h.me,
            layout: h.layout,
            block_size: h.block_size,
            disk_errors_before_stop: h.disk_errors_before_stop,
            storage: h.storage,
            locks: h.locks,
            links: h.links,
            inflight: h.inflight,
            fence: h.fence,
            group: h.group,
            workers: h.workers,
            timeouts: h.timeouts,
            dir: h.dir,
            repairs: AtomicU64::new(0),
            disk_errors: AtomicU64::new(0),
        }
    }
}

impl At for DataSide {
    fn iom(&self) -> IomId {
        self.me
    }
    fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}
