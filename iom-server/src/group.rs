//! `Group`: reconstruction from a parity group — a block's bytes from the
//! parity XOR the other members, or a parity's bytes from its members.
//!
//! It reads only through [`RoleCaller`] (whoever serves each member's role
//! now, this IOM included) and owns no state: what it returns is installed
//! by the caller (`Storage::install_data`, `Storage::install_parity`).
//! Invariant: a reconstruction never mixes versions — every member is read
//! at the version the parity covers (or, for a parity, at the version each
//! data role's map points at), so the XOR is of one consistent stripe.

use crate::caller::RoleCaller;
use crate::membership::Membership;
use crate::timeouts::Timeouts;
use crate::Error;
use bytes::{Bytes, BytesMut};
use common::wire::{ErrorCode, RecoveryReq, RecoveryResp, TxView, WireError};
use common::{BlockKey, GroupKey, IomId, Layout, TxId, TxRef, Version};
use std::sync::Arc;

pub use common::layout::xor_into;

/// XORs `b` into `acc`, growing `acc` with zeros to `b`'s length.
fn xor_grow(acc: &mut BytesMut, b: &[u8]) {
    if acc.len() < b.len() {
        acc.resize(b.len(), 0);
    }
    xor_into(&mut acc[..b.len()], b);
}

pub struct Group {
    layout: Layout,
    caller: Arc<RoleCaller>,
    member: Arc<Membership>,
    timeouts: Timeouts,
}

impl Group {
    pub fn new(layout: Layout, caller: Arc<RoleCaller>, member: Arc<Membership>, timeouts: Timeouts) -> Group {
        Group { layout, caller, member, timeouts }
    }

    /// Whether every IOM of group `g` (data and parity) is up: only then
    /// can one of its blocks be rebuilt from the others.
    pub fn is_whole(&self, g: GroupKey) -> bool {
        let map = self.member.current();
        let (data, p) = self.layout.group_ioms(g.object, g.group);
        data.iter().chain(std::iter::once(&p)).all(|&i| map.state(i) == common::IomState::Up)
    }

    /// Rebuilds the bytes of block `key` from its group: parity XOR the
    /// other members, each at the version the parity covers. With `want`,
    /// waits until the parity covers exactly that version of the block.
    pub async fn reconstruct(&self, key: BlockKey, want: Option<Version>) -> Result<(Version, Bytes), Error> {
        let g = self.layout.group_key(key);
        let j = self.layout.index_in_group(key.block) as usize;
        let (data, p) = self.layout.group_ioms(g.object, g.group);
        let mut last = String::new();
        let t = &self.timeouts;
        for attempt in 0..t.reconstruct_attempts {
            if attempt > 0 {
                tokio::time::sleep((t.reconstruct_step * attempt).min(t.reconstruct_cap)).await;
            }
            let (versions, parity) = match self.caller.rpc_read_parity(p, g).await {
                Ok(x) => x,
                Err(e) => {
                    last = e.to_string();
                    continue;
                }
            };
            let v = versions.get(j).copied().unwrap_or(Version(0));
            if let Some(w) = want {
                if v < w {
                    last = format!("parity covers version {} of block {}, waiting for {}", v.0, key.block, w.0);
                    continue;
                }
                if v > w {
                    return Err(Error::VersionGone(format!("parity already covers version {} > {}", v.0, w.0)));
                }
            }
            let mut acc = BytesMut::from(&parity[..]);
            let mut complete = true;
            for (k, d) in data.iter().enumerate() {
                let vk = versions.get(k).copied().unwrap_or(Version(0));
                if k == j || vk == Version(0) {
                    continue;
                }
                let kk = BlockKey { object: key.object, block: self.layout.member_block(g.group, k as u32) };
                match self.caller.rpc_read_version(*d, kk, vk).await {
                    Ok(b) => xor_grow(&mut acc, &b),
                    Err(e) => {
                        last = e.to_string();
                        complete = false;
                        break;
                    }
                }
            }
            if complete {
                let mut n = acc.len();
                while n > 0 && acc[n - 1] == 0 {
                    n -= 1;
                }
                acc.truncate(n);
                return Ok((v, acc.freeze()));
            }
        }
        Err(Error::Wire(WireError::new(
            ErrorCode::Unavailable,
            format!("cannot rebuild object {} block {}: {last}", key.object, key.block),
        )))
    }

    /// The parity of group `g` computed from its members: the version each
    /// data role's map points at, and the XOR of those versions' bytes.
    pub async fn gather(&self, g: GroupKey) -> Result<(Vec<Version>, Bytes), Error> {
        let (data, _) = self.layout.group_ioms(g.object, g.group);
        let mut members = Vec::with_capacity(data.len());
        let mut acc = BytesMut::new();
        for (k, d) in data.iter().enumerate() {
            let key = BlockKey { object: g.object, block: self.layout.member_block(g.group, k as u32) };
            let view = self.caller.rpc_recovery_role(*d, pointer_question(*d, key)).await?;
            let RecoveryResp::TxStatus(TxView::Data { pointer, .. }) = view else {
                return Err(Error::UnexpectedReply(format!("{view:?}")));
            };
            if pointer != Version(0) {
                let b = self.caller.rpc_read_version(*d, key, pointer).await?;
                xor_grow(&mut acc, &b);
            }
            members.push(pointer);
        }
        Ok((members, acc.freeze()))
    }
}

/// Asks data role `d` where its map points for `key` (a `TxStatus` about
/// no transaction).
fn pointer_question(d: IomId, key: BlockKey) -> RecoveryReq {
    RecoveryReq::TxStatus { tx: TxRef { iom: d, tx: TxId(0) }, key, parity_side: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_into_works_on_odd_lengths() {
        let mut a = vec![0xffu8; 13];
        xor_into(&mut a, &[0x0f; 13]);
        assert!(a.iter().all(|&x| x == 0xf0));
    }

    #[test]
    fn xor_grow_extends_with_zeros_and_xors_the_overlap() {
        let mut acc = BytesMut::from(&[0xffu8; 3][..]);
        xor_grow(&mut acc, &[0x0f; 5]);
        assert_eq!(&acc[..], &[0xf0, 0xf0, 0xf0, 0x0f, 0x0f]);
        xor_grow(&mut acc, &[0x0f; 2]);
        assert_eq!(&acc[..], &[0xff, 0xff, 0xf0, 0x0f, 0x0f]);
    }
}
