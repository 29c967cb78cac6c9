//! The cluster map this IOM last accepted, kept durably in its data directory.
//!
//! Format: magic `IOMFSCST`, format version (u32 LE), crc32c of the body
//! (u32 LE), then the map in the codec's encoding. A file without the magic
//! is read as the body alone (written before the header existed).

use crate::format::{Format, HeaderError};
use crate::Error;
use common::cluster::ClusterMap;
use common::codec;
use std::path::Path;

/// The map this IOM knows, kept across restarts.
pub const FILE: &str = "cluster.state";
pub const FORMAT_VERSION: u32 = 1;
const FORMAT: Format = Format { magic: b"IOMFSCST", version: FORMAT_VERSION, oldest: FORMAT_VERSION };

pub fn load(dir: &Path) -> Result<Option<ClusterMap>, Error> {
    let p = dir.join(FILE);
    let hint = |m: String| {
        Error::Damaged(format!(
            "{}: {m}; move it away and start the IOM again: it learns the current map from the other IOMs",
            p.display()
        ))
    };
    let b = match crate::fsutil::read_in_place(&p) {
        Ok(Some(b)) => b,
        Ok(None) => return Ok(None),
        Err(Error::Damaged(m)) => return Err(hint(m)),
        Err(e) => return Err(e),
    };
    decode(&b).map(Some).map_err(hint)
}

fn decode(b: &[u8]) -> Result<ClusterMap, String> {
    match FORMAT.unseal(b) {
        Ok((_, body)) => codec::decode(body).map_err(|e| e.to_string()),
        // Written before the header existed: the body alone.
        Err(HeaderError::Short | HeaderError::Magic) => {
            codec::decode(b).map_err(|e| format!("not an iomfs cluster state ({e})"))
        }
        Err(HeaderError::Version(v)) => Err(format!("format version {v}; this build reads {FORMAT_VERSION}")),
        Err(HeaderError::Checksum) => Err("checksum mismatch".into()),
    }
}

fn encode(m: &ClusterMap) -> Result<Vec<u8>, Error> {
    let body = codec::encode(m)?;
    Ok(FORMAT.seal(&body))
}

/// Keeps the map (in place: `fsutil::write_in_place`).
pub fn save(dir: &Path, m: &ClusterMap) -> Result<(), Error> {
    crate::fsutil::write_in_place(&dir.join(FILE), &encode(m)?)
}

/// At the start, while there is room: both files in the in-place format
/// (each with what it held, else `map` and no vote), so that no
/// later vote or map change needs new room on the filesystem. A file of
/// an older format is rewritten with the same contents.
pub fn prepare(dir: &Path, map: &ClusterMap) {
    let made = (|| {
        for (f, none) in [(FILE, encode(map)?), (VOTE_FILE, Vec::new())] {
            let p = dir.join(f);
            if !crate::fsutil::is_in_place(&p) {
                let before = crate::fsutil::read_in_place(&p)?.unwrap_or(none);
                crate::fsutil::write_in_place(&p, &before)?;
            }
        }
        Ok::<_, Error>(())
    })();
    if let Err(e) = made {
        tracing::warn!(
            "cannot prepare the cluster map and vote files in {}: {e}; a vote may need room later",
            dir.display()
        );
    }
}

/// File keeping the vote this IOM gave last: `epoch proposer round`.
pub const VOTE_FILE: &str = "vote";

/// The vote kept in `dir` (`None` without one; an unreadable one is
/// reported and taken as none, as before votes were kept).
pub fn load_vote(dir: &Path) -> Option<(common::wire::Ballot, u64)> {
    let p = dir.join(VOTE_FILE);
    let b = match crate::fsutil::read_in_place(&p) {
        Ok(b) => b?,
        Err(e) => {
            tracing::error!("{e}; the vote is taken as none");
            return None;
        }
    };
    let s = String::from_utf8_lossy(&b);
    let f: Vec<u64> = s.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    match f[..] {
        // Made ahead of a first vote (`save`).
        [] if s.trim().is_empty() => None,
        [e, p_, r] if p_ <= u32::MAX as u64 => {
            Some((common::wire::Ballot { epoch: common::Epoch(e), proposer: common::IomId(p_ as u32) }, r))
        }
        _ => {
            tracing::error!("{}: not a vote ('epoch proposer round'); ignored", p.display());
            None
        }
    }
}

/// Keeps a vote on disk before it is given: a voter that restarts between
/// granting a proposal and its commit must not grant another of that epoch.
pub fn save_vote(dir: &Path, b: common::wire::Ballot, round: u64) -> Result<(), Error> {
    crate::fsutil::write_in_place(&dir.join(VOTE_FILE), format!("{} {} {round}\n", b.epoch.0, b.proposer.0).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn map() -> ClusterMap {
        let mut m = ClusterMap::initial(5, common::IomId(0));
        m.epoch = common::Epoch(7);
        m
    }

    /// Files of the format before (written whole) are read, and rewritten
    /// in slots at the start with the same contents; a vote kept after
    /// that is read back.
    #[test]
    fn files_of_the_format_before_are_kept_and_rewritten_in_place() {
        let d = tempfile::tempdir().unwrap();
        crate::fsutil::write_atomic(&d.path().join(FILE), &encode(&map()).unwrap()).unwrap();
        crate::fsutil::write_atomic(&d.path().join(VOTE_FILE), b"7 3 2\n").unwrap();
        let ballot = common::wire::Ballot { epoch: common::Epoch(7), proposer: common::IomId(3) };
        assert_eq!(load_vote(d.path()), Some((ballot, 2)));
        prepare(d.path(), &ClusterMap::initial(5, common::IomId(0)));
        for f in [FILE, VOTE_FILE] {
            assert!(crate::fsutil::is_in_place(&d.path().join(f)), "{f} not rewritten");
        }
        assert_eq!(load(d.path()).unwrap().unwrap(), map(), "prepare must keep the map it found");
        assert_eq!(load_vote(d.path()), Some((ballot, 2)));
        let next = common::wire::Ballot { epoch: common::Epoch(8), proposer: common::IomId(1) };
        save_vote(d.path(), next, 0).unwrap();
        assert_eq!(load_vote(d.path()), Some((next, 0)));
        // A fresh directory: a map, and no vote.
        let e = tempfile::tempdir().unwrap();
        prepare(e.path(), &map());
        assert_eq!(load(e.path()).unwrap().unwrap(), map());
        assert_eq!(load_vote(e.path()), None);
    }

    #[test]
    fn round_trip_and_the_headerless_format_still_reads() {
        let d = tempfile::tempdir().unwrap();
        save(d.path(), &map()).unwrap();
        assert_eq!(load(d.path()).unwrap(), Some(map()));
        std::fs::write(d.path().join(FILE), codec::encode(&map()).unwrap()).unwrap();
        assert_eq!(load(d.path()).unwrap(), Some(map()));
        let mut b = encode(&map()).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(d.path().join(FILE), b).unwrap();
        let e = load(d.path()).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch") && e.contains("move it away"), "{e}");
    }

    /// The header as written today: magic, format version, crc32c of the
    /// body, then the body. The on-disk format must not change.
    #[test]
    fn golden_header() {
        let b = encode(&map()).unwrap();
        let body = codec::encode(&map()).unwrap();
        assert_eq!(&b[..12], b"IOMFSCST\x01\x00\x00\x00");
        assert_eq!(b[12..16], crc32c::crc32c(&body).to_le_bytes());
        assert_eq!(&b[16..], &body[..]);
    }

    /// What a bad header gives, as today: without the magic the file is
    /// read as a headerless body; an unknown version and a damaged body
    /// are errors saying so.
    #[test]
    fn bad_headers() {
        let good = encode(&map()).unwrap();
        for ver in [0u32, 2, u32::MAX] {
            let mut v = good.clone();
            v[8..12].copy_from_slice(&ver.to_le_bytes());
            assert_eq!(decode(&v).unwrap_err(), format!("format version {ver}; this build reads 1"));
        }
        let mut c = good.clone();
        c[12] ^= 1;
        assert_eq!(decode(&c).unwrap_err(), "checksum mismatch");
        let mut m = good.clone();
        m[0] = b'X';
        assert!(decode(&m).unwrap_err().starts_with("not an iomfs cluster state ("));
        for n in 0..16 {
            assert!(decode(&good[..n]).unwrap_err().starts_with("not an iomfs cluster state ("), "{n}");
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(FILE), &c).unwrap();
        let e = load(d.path()).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}: checksum mismatch; move it away and start the IOM again: it learns the current map from the other IOMs",
                d.path().join(FILE).display()
            )
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]
        #[test]
        fn damaged_files_are_an_error_never_a_panic(
            edits in proptest::collection::vec((any::<u16>(), any::<u8>()), 0..6),
            cut in any::<u16>(),
        ) {
            let mut b = encode(&map()).unwrap();
            for (at, x) in edits {
                let i = at as usize % b.len();
                b[i] ^= x;
            }
            b.truncate(b.len().min(cut as usize));
            let _ = decode(&b);
            let _ = decode(&b[b.len().min(16)..]);
        }
    }
}
