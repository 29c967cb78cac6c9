//! Toughness: when a write is acknowledged (DESIGN §4).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// When a write is answered. Ordered from weakest to strongest
/// (`Buffered` < `Fast` < `Atomic` < `Durable`; `Buffered` is declared
/// last so the encodings of the three older levels, on the wire and in the
/// namespace's files, stay what they were).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Toughness {
    /// Answered once the data write is issued on the data IOM (a4).
    /// Never torn after recovery; may be lost in a crash.
    Fast,
    /// Answered once the parity IOM holds the delta and both journal
    /// records are written (a8/b4). Data and parity change all-or-nothing;
    /// survives any process crash and any single IOM failure.
    Atomic,
    /// Answered once new data and new parity are on stable storage
    /// (a10/a11 and b9–b12). Survives any crash and any single failure.
    Durable,
    /// Answered once the client holds the bytes in its own memory; sent
    /// as `Atomic` by a flush (on close, fsync, the buffer's caps and age,
    /// and before the file's size, truncation or toughness changes). A
    /// client crash loses what was not flushed; never torn. A client-side
    /// level: the IOMs treat it as `Atomic` should one reach them.
    Buffered,
}

impl Toughness {
    fn rank(self) -> u8 {
        match self {
            Toughness::Buffered => 0,
            Toughness::Fast => 1,
            Toughness::Atomic => 2,
            Toughness::Durable => 3,
        }
    }
}

impl PartialOrd for Toughness {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Toughness {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.rank().cmp(&other.rank())
    }
}

/// The extended attribute that carries a file's (or a directory's default) toughness.
pub const TOUGHNESS_XATTR: &str = "user.iomfs.toughness";
/// Read-only extended attribute describing a file's placement.
pub const LAYOUT_XATTR: &str = "user.iomfs.layout";

impl Toughness {
    /// The levels the IOMs implement (a write request carries one of them).
    pub const ALL: [Toughness; 3] = [Toughness::Fast, Toughness::Atomic, Toughness::Durable];

    pub fn as_str(self) -> &'static str {
        match self {
            Toughness::Fast => "fast",
            Toughness::Atomic => "atomic",
            Toughness::Durable => "durable",
            Toughness::Buffered => "buffered",
        }
    }

    /// Parses an xattr value; tolerates one trailing NUL or newline, as
    /// `setfattr` and shell `echo` produce.
    pub fn parse_xattr(v: &[u8]) -> Option<Toughness> {
        let v = v.strip_suffix(b"\0").unwrap_or(v);
        let v = v.strip_suffix(b"\n").unwrap_or(v);
        std::str::from_utf8(v).ok()?.parse().ok()
    }
}

impl fmt::Display for Toughness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Toughness {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fast" => Ok(Toughness::Fast),
            "atomic" => Ok(Toughness::Atomic),
            "durable" => Ok(Toughness::Durable),
            "buffered" => Ok(Toughness::Buffered),
            other => Err(format!("unknown toughness '{other}': expected buffered, fast, atomic or durable")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parse() {
        assert_eq!(Toughness::parse_xattr(b"durable"), Some(Toughness::Durable));
        assert_eq!(Toughness::parse_xattr(b"fast\n"), Some(Toughness::Fast));
        assert_eq!(Toughness::parse_xattr(b"atomic\0"), Some(Toughness::Atomic));
        assert_eq!(Toughness::parse_xattr(b"Durable"), None);
        assert_eq!(Toughness::parse_xattr(b"bogus"), None);
        assert_eq!(Toughness::parse_xattr(b"buffered\n"), Some(Toughness::Buffered));
        assert!(Toughness::Fast < Toughness::Atomic && Toughness::Atomic < Toughness::Durable);
        assert!(Toughness::Buffered < Toughness::Fast);
    }

    /// The three IOM levels keep their encodings (namespace files and the
    /// wire hold them); `buffered` comes after them.
    #[test]
    fn encodings() {
        let enc = |t: Toughness| crate::codec::encode(&t).unwrap();
        assert_eq!(enc(Toughness::Fast), vec![0]);
        assert_eq!(enc(Toughness::Atomic), vec![1]);
        assert_eq!(enc(Toughness::Durable), vec![2]);
        assert_eq!(enc(Toughness::Buffered), vec![3]);
    }
}
