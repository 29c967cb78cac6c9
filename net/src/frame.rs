//! Frames on QUIC streams: `[u32 header_len][u32 payload_len][header][payload]`.

use crate::NetError;
use bytes::{BufMut, Bytes, BytesMut};
use common::codec;
use common::wire::{FRAME_PREFIX, MAX_HEADER, MAX_PAYLOAD};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes prefix and header into one buffer (the payload goes separately).
pub fn encode_head<H: Serialize>(h: &H, payload_len: usize) -> Result<Bytes, NetError> {
    let head = codec::encode(h).map_err(|e| NetError::Codec(e.to_string()))?;
    if head.len() > MAX_HEADER || payload_len > MAX_PAYLOAD {
        return Err(NetError::TooLarge(head.len().max(payload_len)));
    }
    let mut b = BytesMut::with_capacity(FRAME_PREFIX + head.len());
    b.put_u32_le(head.len() as u32);
    b.put_u32_le(payload_len as u32);
    b.put_slice(&head);
    Ok(b.freeze())
}

/// Writes one frame. The payload `Bytes` are handed to quinn without copying.
pub async fn write_frame<H: Serialize>(s: &mut quinn::SendStream, h: &H, payload: Bytes) -> Result<(), NetError> {
    let head = encode_head(h, payload.len())?;
    if payload.is_empty() {
        s.write_chunk(head).await?;
    } else {
        s.write_all_chunks(&mut [head, payload]).await?;
    }
    Ok(())
}

/// Writes one frame whose payload is several buffers one after another,
/// handed to quinn without copying.
pub async fn write_frame_chunks<H: Serialize>(
    s: &mut quinn::SendStream,
    h: &H,
    payload: Vec<Bytes>,
) -> Result<(), NetError> {
    let len = payload.iter().map(|b| b.len()).sum();
    let head = encode_head(h, len)?;
    let mut chunks = Vec::with_capacity(payload.len() + 1);
    chunks.push(head);
    chunks.extend(payload.into_iter().filter(|b| !b.is_empty()));
    s.write_all_chunks(&mut chunks).await?;
    Ok(())
}

/// Reads one frame; `Ok(None)` when the peer finished the stream cleanly
/// before a new frame began.
pub async fn read_frame<H: DeserializeOwned>(r: &mut quinn::RecvStream) -> Result<Option<(H, Bytes)>, NetError> {
    let mut prefix = [0u8; FRAME_PREFIX];
    match r.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(n)) => {
            return Err(NetError::Malformed(format!("stream ended inside a frame prefix ({n} bytes)")))
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let hlen = u32::from_le_bytes(prefix[0..4].try_into().expect("4 bytes")) as usize;
    let plen = u32::from_le_bytes(prefix[4..8].try_into().expect("4 bytes")) as usize;
    if hlen > MAX_HEADER || plen > MAX_PAYLOAD {
        return Err(NetError::TooLarge(hlen.max(plen)));
    }
    let mut head = vec![0u8; hlen];
    read_exact(r, &mut head).await?;
    let h: H = codec::decode(&head).map_err(|e| NetError::Malformed(e.to_string()))?;
    let payload = read_payload(r, plen).await?;
    Ok(Some((h, payload)))
}

async fn read_exact(r: &mut quinn::RecvStream, buf: &mut [u8]) -> Result<(), NetError> {
    match r.read_exact(buf).await {
        Ok(()) => Ok(()),
        Err(quinn::ReadExactError::FinishedEarly(_)) => Err(NetError::Malformed("stream ended inside a frame".into())),
        Err(quinn::ReadExactError::ReadError(e)) => Err(e.into()),
    }
}

/// Reads `len` payload bytes; zero-copy when quinn hands them over in one chunk.
async fn read_payload(r: &mut quinn::RecvStream, len: usize) -> Result<Bytes, NetError> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let first = match r.read_chunk(len, true).await? {
        Some(c) => c.bytes,
        None => return Err(NetError::Malformed("stream ended before the payload".into())),
    };
    if first.len() == len {
        return Ok(first);
    }
    let mut buf = BytesMut::with_capacity(len);
    buf.extend_from_slice(&first);
    while buf.len() < len {
        match r.read_chunk(len - buf.len(), true).await? {
            Some(c) => buf.extend_from_slice(&c.bytes),
            None => return Err(NetError::Malformed("stream ended inside a payload".into())),
        }
    }
    Ok(buf.freeze())
}
