//! The last cluster scrub this IOM was told of (`AdminReq::ScrubReport`,
//! protocol 8), kept in its data directory so `iomfs status` on any host
//! and the metrics endpoint show it, across restarts.
//!
//! Format: magic `IOMFSSCR`, format version, crc32c, then the
//! `ScrubSummary` in the codec's encoding. An unreadable file is reported
//! and treated as no scrub recorded: it is a record, not data.

use crate::format::Format;
use crate::Error;
use common::codec;
use common::wire::ScrubSummary;
use parking_lot::Mutex;
use std::path::{Path, PathBuf};

const FILE: &str = "last-scrub";
const FORMAT: Format = Format { magic: b"IOMFSSCR", version: 1, oldest: 1 };

pub struct ScrubBook {
    path: PathBuf,
    last: Mutex<Option<ScrubSummary>>,
}

impl ScrubBook {
    pub fn open(dir: &Path) -> ScrubBook {
        let path = dir.join(FILE);
        let last = match std::fs::read(&path) {
            Ok(b) => match FORMAT
                .unseal(&b)
                .map_err(|e| format!("{e:?}"))
                .and_then(|(_, body)| codec::decode::<ScrubSummary>(body).map_err(|e| e.to_string()))
            {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("{}: {e}; no scrub recorded until the next one", path.display());
                    None
                }
            },
            Err(_) => None,
        };
        ScrubBook { path, last: Mutex::new(last) }
    }

    pub fn last(&self) -> Option<ScrubSummary> {
        self.last.lock().clone()
    }

    /// Keeps `s` if it is not older than the one kept.
    pub fn keep(&self, s: ScrubSummary) -> Result<(), Error> {
        let mut last = self.last.lock();
        if last.as_ref().is_some_and(|l| l.finished_unix > s.finished_unix) {
            return Ok(());
        }
        crate::fsutil::write_atomic(&self.path, &FORMAT.seal(&codec::encode(&s)?))?;
        *last = Some(s);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_survives_a_restart_and_an_older_one_does_not_replace_it() {
        let d = tempfile::tempdir().unwrap();
        let s =
            |t| ScrubSummary { finished_unix: t, millis: 5, groups: 3, blocks: 9, problems: 1, repaired: 0, healed: 0 };
        let book = ScrubBook::open(d.path());
        assert_eq!(book.last(), None);
        book.keep(s(100)).unwrap();
        book.keep(s(50)).unwrap();
        assert_eq!(ScrubBook::open(d.path()).last(), Some(s(100)));
        std::fs::write(d.path().join(FILE), b"garbage").unwrap();
        assert_eq!(ScrubBook::open(d.path()).last(), None, "a damaged record reads as none");
    }
}
