//! Toughness: when a write is acknowledged (DESIGN §4).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// When a write is answered. Ordered from weakest to strongest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
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
}

/// The extended attribute that carries a file's (or a directory's default) toughness.
pub const TOUGHNESS_XATTR: &str = "user.iomfs.toughness";
/// Read-only extended attribute describing a file's placement.
pub const LAYOUT_XATTR: &str = "user.iomfs.layout";

impl Toughness {
    pub const ALL: [Toughness; 3] = [Toughness::Fast, Toughness::Atomic, Toughness::Durable];

    pub fn as_str(self) -> &'static str {
        match self {
            Toughness::Fast => "fast",
            Toughness::Atomic => "atomic",
            Toughness::Durable => "durable",
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
            other => Err(format!("unknown toughness '{other}': expected fast, atomic or durable")),
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
        assert!(Toughness::Fast < Toughness::Atomic && Toughness::Atomic < Toughness::Durable);
    }
}
