//! The one place that turns messages and records into bytes. Everything on
//! the wire and on disk goes through [`encode`] and [`decode`], so the
//! serialisation library can be swapped here alone.
//!
//! Encoding: bincode 2 `standard()` (varint integers, little endian) over
//! serde. Enums encode their variant index, so enums on the wire and on disk
//! are append-only: a golden-bytes test in `wire` and in the journal pins them.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Largest encoded header or record accepted when decoding (1 MiB).
pub const MAX_ENCODED: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(String),
    #[error("decode: {0}")]
    Decode(String),
    #[error("decode: {0} trailing bytes")]
    Trailing(usize),
    #[error("decode: message of {0} bytes exceeds the {MAX_ENCODED}-byte limit")]
    TooLarge(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ENCODED>()
}

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(v, config()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Appends the encoding of `v` to `out`.
pub fn encode_into<T: Serialize>(v: &T, out: &mut Vec<u8>) -> Result<(), CodecError> {
    let b = encode(v)?;
    out.extend_from_slice(&b);
    Ok(())
}

/// Decodes exactly one value; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, CodecError> {
    if b.len() > MAX_ENCODED {
        return Err(CodecError::TooLarge(b.len()));
    }
    let (v, used): (T, usize) =
        bincode::serde::decode_from_slice(b, config()).map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != b.len() {
        return Err(CodecError::Trailing(b.len() - used));
    }
    Ok(v)
}

/// Encoding for large local files written by this node itself (checkpoints):
/// same format, no size limit.
pub fn encode_large<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(v, bincode::config::standard()).map_err(|e| CodecError::Encode(e.to_string()))
}

/// Decodes a large local file (checked by its own crc before this call).
pub fn decode_large<T: DeserializeOwned>(b: &[u8]) -> Result<T, CodecError> {
    let (v, used): (T, usize) = bincode::serde::decode_from_slice(b, bincode::config::standard())
        .map_err(|e| CodecError::Decode(e.to_string()))?;
    if used != b.len() {
        return Err(CodecError::Trailing(b.len() - used));
    }
    Ok(v)
}

/// crc32c of a byte slice (Castagnoli).
pub fn crc(b: &[u8]) -> u32 {
    crc32c::crc32c(b)
}

/// crc32c of the bytes `crc` covers followed by `more`.
pub fn crc_extend(crc: u32, more: &[u8]) -> u32 {
    crc32c::crc32c_append(crc, more)
}

/// crc32c of `data` followed by `zeros` zero bytes, without materialising them.
pub fn crc_with_zeros(data: &[u8], zeros: usize) -> u32 {
    const Z: [u8; 4096] = [0; 4096];
    let mut c = crc32c::crc32c(data);
    let mut left = zeros;
    while left > 0 {
        let n = left.min(Z.len());
        c = crc32c::crc32c_append(c, &Z[..n]);
        left -= n;
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip_and_trailing() {
        let b = encode(&(7u64, "x".to_string())).unwrap();
        let v: (u64, String) = decode(&b).unwrap();
        assert_eq!(v, (7, "x".into()));
        let mut t = b.clone();
        t.push(0);
        assert!(matches!(decode::<(u64, String)>(&t), Err(CodecError::Trailing(1))));
        assert!(decode::<(u64, String)>(&b[..1]).is_err());
    }
    #[test]
    fn crc_zeros() {
        let mut v = b"abc".to_vec();
        v.resize(10000, 0);
        assert_eq!(crc(&v), crc_with_zeros(b"abc", 9997));
    }
}
