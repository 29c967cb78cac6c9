//! The IOMs this IOM heard running with a store since its own store
//! exists (`seen-iom` in the data directory): the evidence `birth` asks
//! for before an IOM with an empty disk may create a store.
//!
//! The file holds one IOM id per line, or `all`: a store older than the
//! file (made before protocol 9) cannot tell whom it heard, so it counts
//! every IOM as heard, and an IOM of that cluster that lost its disk is
//! refused as before rather than taken for a new one.

use crate::Error;
use common::IomId;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// File in the data directory listing the IOMs heard since the store exists.
pub const SEEN_FILE: &str = "seen-iom";
/// File in the IOM's own directory (`D/iom-I`, with its certificate)
/// written when its store is created: evidence of a store even when the
/// data directory is another filesystem that is missing for now.
pub const BORN_FILE: &str = "store.born";

/// The IOMs whose heartbeats (or parity channels) this IOM heard since its
/// store exists. Noted in memory at once; kept on disk by [`Seen::persist`].
pub struct Seen {
    path: PathBuf,
    /// `None`: every IOM (a store older than the file).
    ids: parking_lot::Mutex<Option<BTreeSet<u32>>>,
    /// Held while the file is written, so writes land in order.
    writing: parking_lot::Mutex<()>,
}

impl Seen {
    /// Opens the set kept in `data_dir`. `storage::prepare_store` writes
    /// an empty file before it creates a store, so a store without the
    /// file predates it: it counts every IOM as heard (written so at once).
    pub fn open(data_dir: &Path) -> Result<Seen, Error> {
        let path = data_dir.join(SEEN_FILE);
        let ids = match std::fs::read_to_string(&path) {
            Ok(s) if s.trim() == "all" => None,
            Ok(s) => Some(
                s.lines()
                    .filter(|l| !l.trim().is_empty())
                    .map(|l| l.trim().parse::<u32>())
                    .collect::<Result<BTreeSet<u32>, _>>()
                    .map_err(|e| Error::Damaged(format!("{}: {e} (one IOM id per line, or `all`)", path.display())))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::fsutil::write_atomic(&path, text(&None).as_bytes())?;
                None
            }
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        Ok(Seen { path, ids: parking_lot::Mutex::new(ids), writing: parking_lot::Mutex::new(()) })
    }

    pub fn has(&self, iom: IomId) -> bool {
        self.ids.lock().as_ref().is_none_or(|ids| ids.contains(&iom.0))
    }

    /// Records in memory that `iom` was heard; true when that is new and
    /// the set should be persisted ([`Seen::persist`], off the runtime).
    pub fn note(&self, iom: IomId) -> bool {
        match self.ids.lock().as_mut() {
            Some(ids) => ids.insert(iom.0),
            None => false,
        }
    }

    /// Takes back a note whose [`Seen::persist`] failed, so that the next
    /// heartbeat notes (and persists) it again.
    pub fn forget(&self, iom: IomId) {
        if let Some(ids) = self.ids.lock().as_mut() {
            ids.remove(&iom.0);
        }
    }

    /// Writes the set as it is now (blocking: file and directory syncs).
    pub fn persist(&self) -> Result<(), Error> {
        let _one = self.writing.lock();
        let now = self.ids.lock().clone();
        crate::fsutil::write_atomic(&self.path, text(&now).as_bytes())
    }
}

fn text(ids: &Option<BTreeSet<u32>>) -> String {
    match ids {
        None => "all\n".into(),
        Some(ids) => ids.iter().map(|i| format!("{i}\n")).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_survives_a_restart_and_rejects_garbage() {
        let d = tempfile::tempdir().unwrap();
        // As `storage::prepare_store` leaves it before a new store.
        std::fs::write(d.path().join(SEEN_FILE), "").unwrap();
        let s = Seen::open(d.path()).unwrap();
        assert!(!s.has(IomId(3)));
        assert!(s.note(IomId(3)));
        assert!(s.note(IomId(1)));
        assert!(!s.note(IomId(3)), "noted once");
        s.persist().unwrap();
        let again = Seen::open(d.path()).unwrap();
        assert!(again.has(IomId(3)) && again.has(IomId(1)) && !again.has(IomId(2)));
        std::fs::write(d.path().join(SEEN_FILE), "x\n").unwrap();
        assert!(matches!(Seen::open(d.path()), Err(Error::Damaged(_))));
    }

    #[test]
    fn a_store_older_than_the_file_counts_every_iom_as_heard_for_good() {
        let d = tempfile::tempdir().unwrap();
        let s = Seen::open(d.path()).unwrap();
        assert!(s.has(IomId(4)), "an upgraded store cannot tell whom it heard");
        assert!(!s.note(IomId(4)));
        let again = Seen::open(d.path()).unwrap();
        assert!(again.has(IomId(0)) && again.has(IomId(4)));
    }
}
