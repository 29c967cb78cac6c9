//! The header every on-disk file of an IOM starts with: an 8-byte magic,
//! then the format version (u32 LE).
//!
//! What follows depends on the file. The files written whole (cluster
//! state, map and namespace checkpoints) are *sealed*: the crc32c of the
//! body (u32 LE), then the body. A journal segment has four reserved zero
//! bytes there; the block file its own fields (block size, IOM, cluster id).
//!
//! The checks say what is wrong ([`HeaderError`]); each file turns that
//! into its own message, naming the file.

use common::codec;

/// Magic and version.
pub const HEAD: usize = 12;
/// Magic, version and checksum: where the body of a sealed file starts.
pub const SEALED_HEAD: usize = 16;

/// One on-disk format: its magic, the version written, and the oldest
/// version still read.
#[derive(Clone, Copy, Debug)]
pub struct Format {
    pub magic: &'static [u8; 8],
    pub version: u32,
    pub oldest: u32,
}

/// What is wrong with a header, in the order checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than the header needs.
    Short,
    /// Another magic: not a file of this format.
    Magic,
    /// A version this build does not read.
    Version(u32),
    /// The body does not match its checksum.
    Checksum,
}

impl Format {
    /// Whether this build reads version `v`.
    pub fn reads(&self, v: u32) -> bool {
        (self.oldest..=self.version).contains(&v)
    }

    /// Appends magic and version ([`HEAD`] bytes).
    pub fn put_head(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.magic);
        out.extend_from_slice(&self.version.to_le_bytes());
    }

    /// Checks that `b` holds at least `min_len` bytes (at least [`HEAD`]),
    /// starts with the magic and names a version this build reads;
    /// returns that version.
    pub fn check_head(&self, b: &[u8], min_len: usize) -> Result<u32, HeaderError> {
        if b.len() < min_len.max(HEAD) {
            return Err(HeaderError::Short);
        }
        if &b[..8] != self.magic {
            return Err(HeaderError::Magic);
        }
        let v = u32::from_le_bytes(b[8..HEAD].try_into().expect("4 bytes"));
        if !self.reads(v) {
            return Err(HeaderError::Version(v));
        }
        Ok(v)
    }

    /// A sealed file: magic, version, crc32c of `body`, `body`.
    pub fn seal(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(SEALED_HEAD + body.len());
        self.put_head(&mut out);
        out.extend_from_slice(&codec::crc(body).to_le_bytes());
        out.extend_from_slice(body);
        out
    }

    /// Checks a sealed file; returns its version and body.
    pub fn unseal<'a>(&self, b: &'a [u8]) -> Result<(u32, &'a [u8]), HeaderError> {
        let v = self.check_head(b, SEALED_HEAD)?;
        let body = &b[SEALED_HEAD..];
        if codec::crc(body) != u32::from_le_bytes(b[HEAD..SEALED_HEAD].try_into().expect("4 bytes")) {
            return Err(HeaderError::Checksum);
        }
        Ok((v, body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const F: Format = Format { magic: b"IOMFSTST", version: 3, oldest: 2 };

    #[test]
    fn golden_bytes() {
        let mut h = Vec::new();
        F.put_head(&mut h);
        assert_eq!(h, b"IOMFSTST\x03\x00\x00\x00");
        // crc32c("123456789") is the standard check value 0xE3069283.
        assert_eq!(F.seal(b"123456789"), b"IOMFSTST\x03\x00\x00\x00\x83\x92\x06\xe3123456789");
        assert_eq!(F.seal(b""), b"IOMFSTST\x03\x00\x00\x00\x00\x00\x00\x00");
    }

    #[test]
    fn round_trip_of_every_version_read() {
        for v in 2..=3 {
            let f = Format { version: v, ..F };
            assert_eq!(F.unseal(&f.seal(b"body")), Ok((v, &b"body"[..])));
            assert_eq!(F.check_head(&f.seal(b"body"), 20), Ok(v));
        }
        assert_eq!(F.unseal(&F.seal(b"")), Ok((3, &b""[..])));
    }

    #[test]
    fn wrong_magic() {
        let mut b = F.seal(b"body");
        b[7] ^= 1;
        assert_eq!(F.unseal(&b), Err(HeaderError::Magic));
        assert_eq!(F.check_head(&b, 0), Err(HeaderError::Magic));
        let other = Format { magic: b"IOMFSXXX", ..F };
        assert_eq!(other.unseal(&F.seal(b"body")), Err(HeaderError::Magic));
    }

    #[test]
    fn unknown_version() {
        for v in [0u32, 1, 4, u32::MAX] {
            let b = Format { version: v, ..F }.seal(b"body");
            assert_eq!(F.unseal(&b), Err(HeaderError::Version(v)));
            assert_eq!(F.check_head(&b, 0), Err(HeaderError::Version(v)));
        }
    }

    #[test]
    fn bad_checksum() {
        let good = F.seal(b"body");
        for i in HEAD..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            assert_eq!(F.unseal(&b), Err(HeaderError::Checksum), "byte {i}");
        }
        let mut b = good.clone();
        b.push(0);
        assert_eq!(F.unseal(&b), Err(HeaderError::Checksum));
        assert_eq!(F.unseal(&good[..good.len() - 1]), Err(HeaderError::Checksum));
    }

    #[test]
    fn short_input() {
        let good = F.seal(b"body");
        for n in 0..SEALED_HEAD {
            assert_eq!(F.unseal(&good[..n]), Err(HeaderError::Short), "{n} bytes");
        }
        for n in 0..HEAD {
            assert_eq!(F.check_head(&good[..n], 0), Err(HeaderError::Short), "{n} bytes");
        }
        assert_eq!(F.check_head(&good[..HEAD], 0), Ok(3));
        assert_eq!(F.check_head(&good, good.len() + 1), Err(HeaderError::Short));
        // Short is checked before the magic: a short file is short.
        assert_eq!(F.check_head(b"XX", 0), Err(HeaderError::Short));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..Default::default() })]
        /// Any bytes give a result, never a panic; a body is only returned
        /// when it matches its checksum.
        #[test]
        fn any_input_is_an_answer_never_a_panic(
            b in proptest::collection::vec(any::<u8>(), 0..40),
            min in 0usize..48,
        ) {
            let _ = F.check_head(&b, min);
            if let Ok((_, body)) = F.unseal(&b) {
                prop_assert_eq!(&F.seal(body), &b);
            }
            let mut sealed = F.seal(&b);
            sealed.truncate(min);
            let _ = F.unseal(&sealed);
        }
    }
}
