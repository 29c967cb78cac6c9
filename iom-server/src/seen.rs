//! The IOMs this IOM heard running with a store since its own store
//! exists (`seen-iom` in the data directory): the evidence `birth` asks
//! for before an IOM with an empty disk may create a store.

use crate::Error;
use common::IomId;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// File in the data directory listing the IOMs heard since the store exists.
pub const SEEN_FILE: &str = "seen-iom";

/// The IOMs whose heartbeats this IOM heard since its store exists; kept
/// on disk (a line per IOM id), written once per IOM.
pub struct Seen {
    path: PathBuf,
    ids: parking_lot::Mutex<BTreeSet<u32>>,
}

impl Seen {
    /// Loads the set kept in `data_dir` (empty when there is none).
    pub fn load(data_dir: &Path) -> Result<Seen, Error> {
        let path = data_dir.join(SEEN_FILE);
        let ids = match std::fs::read_to_string(&path) {
            Ok(s) => s
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(|l| l.trim().parse::<u32>())
                .collect::<Result<BTreeSet<u32>, _>>()
                .map_err(|e| Error::Damaged(format!("{}: {e} (one IOM id per line)", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        Ok(Seen { path, ids: parking_lot::Mutex::new(ids) })
    }

    pub fn has(&self, iom: IomId) -> bool {
        self.ids.lock().contains(&iom.0)
    }

    /// Records that `iom` was heard (durably, the first time). A failure
    /// is logged and tried again at the next heartbeat.
    pub fn note(&self, iom: IomId) {
        let mut ids = self.ids.lock();
        if ids.contains(&iom.0) {
            return;
        }
        let mut next = ids.clone();
        next.insert(iom.0);
        let text: String = next.iter().map(|i| format!("{i}\n")).collect();
        match crate::fsutil::write_atomic(&self.path, text.as_bytes()) {
            Ok(()) => *ids = next,
            Err(e) => tracing::warn!("cannot record that IOM {iom} was heard: {e}"),
        }
    }
}
