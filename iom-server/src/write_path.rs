//! The data side of a write: steps a1–a14 of DESIGN §3, run on the IOM that
//! holds the block.
//!
//! The request is answered at the point its toughness names: `fast` after
//! a4, `atomic` once the a5 record is written and the parity IOM confirmed
//! it holds the delta (b4), `durable` once a11 is durable and the parity
//! IOM completed (b12). The rest of the protocol finishes in the background.

use crate::cache::CacheKey;
use crate::crash_point;
use crate::data::DataSide;
use crate::group::xor_into;
use crate::inflight::Progress;
use crate::journal::Wait;
use crate::links::{HeldRx, Refused, StripeTag};
use crate::records::{Record, VerRef};
use crate::workers::Tier;
use crate::Error;
use bytes::{Bytes, BytesMut};
use common::wire::ParityUpdate;
use common::{codec, BlockKey, Toughness, TxId, TxRef, Version};
use std::sync::Arc;
use tokio::sync::{oneshot, watch};

/// What a data transaction does to the block.
#[derive(Clone, Debug)]
pub enum Op {
    /// Merge `data` at `offset`.
    Write { offset: u32, data: Bytes },
    /// Merge several `(offset, data)` parts, in order (a later part wins
    /// where two overlap): the pieces of one block in one `WriteMany`,
    /// written as one new version.
    Extents { parts: Vec<(u32, Bytes)> },
    /// Keep `[0, keep)`; `keep == 0` deletes the block.
    Truncate { keep: u32 },
}

impl Op {
    /// The op writing `parts` of one block: a plain write for one part.
    pub fn from_parts(mut parts: Vec<(u32, Bytes)>) -> Op {
        if parts.len() == 1 {
            let (offset, data) = parts.pop().expect("one part");
            return Op::Write { offset, data };
        }
        Op::Extents { parts }
    }

    /// The byte ranges `(offset, len)` the op writes.
    fn writes(&self) -> Vec<(u32, usize)> {
        match self {
            Op::Write { offset, data } => vec![(*offset, data.len())],
            Op::Extents { parts } => parts.iter().map(|(o, d)| (*o, d.len())).collect(),
            Op::Truncate { .. } => Vec::new(),
        }
    }
}

/// a3 + a7: the new block (old block with the request merged in) and the
/// delta (old XOR new) over the only range that can differ.
pub fn build_new(old: &Bytes, op: &Op) -> (Bytes, u32, Bytes) {
    match op {
        Op::Write { offset, data } => {
            let off = *offset as usize;
            let end = off + data.len();
            let new = if off == 0 && data.len() >= old.len() {
                data.clone()
            } else {
                let mut b = BytesMut::zeroed(old.len().max(end));
                b[..old.len()].copy_from_slice(old);
                b[off..end].copy_from_slice(data);
                b.freeze()
            };
            let delta = if off >= old.len() {
                data.clone()
            } else {
                let mut d = BytesMut::from(&data[..]);
                let o = &old[off..old.len().min(end)];
                xor_into(&mut d[..o.len()], o);
                d.freeze()
            };
            (new, *offset, delta)
        }
        Op::Extents { parts } => {
            let lo = parts.iter().map(|(o, _)| *o as usize).min().unwrap_or(0);
            let hi = parts.iter().map(|(o, d)| *o as usize + d.len()).max().unwrap_or(lo);
            let mut b = BytesMut::zeroed(old.len().max(hi));
            b[..old.len()].copy_from_slice(old);
            for (o, d) in parts {
                b[*o as usize..*o as usize + d.len()].copy_from_slice(d);
            }
            let new = b.freeze();
            // old XOR new over the span of the parts (bytes between them
            // are unchanged: their delta is zero).
            let mut delta = BytesMut::from(&new[lo..hi]);
            if lo < old.len() {
                let o = &old[lo..old.len().min(hi)];
                xor_into(&mut delta[..o.len()], o);
            }
            (new, lo as u32, delta.freeze())
        }
        Op::Truncate { keep } => {
            let keep = (*keep as usize).min(old.len());
            (old.slice(..keep), keep as u32, old.slice(keep..))
        }
    }
}

pub(crate) struct Pending {
    tx: TxId,
    key: BlockKey,
    old: VerRef,
    new: VerRef,
    progress: watch::Sender<Progress>,
    written: Option<oneshot::Receiver<()>>,
    held: HeldRx,
    done: oneshot::Receiver<()>,
    /// Someone waits for this transaction to be durable: sync at once.
    urgent: bool,
}

impl Pending {
    /// A transaction found open after a restart, its update sent again.
    pub(crate) fn resumed(
        data: &DataSide,
        tx: TxId,
        key: BlockKey,
        old: VerRef,
        new: VerRef,
        held: HeldRx,
        done: oneshot::Receiver<()>,
    ) -> Pending {
        let progress = data.inflight.register(tx);
        Pending { tx, key, old, new, progress, written: None, held, done, urgent: false }
    }
}

impl DataSide {
    /// Runs a data transaction found open in the journal through a8–a14
    /// again (recovery rolls it forward): its update is sent again.
    pub(crate) fn resume(self: &Arc<Self>, tx: TxId, t: &crate::map::DTx, upd: ParityUpdate, delta: Bytes) {
        let (held, done) = self.links.send_update(t.parity, upd, delta, None);
        let p = Pending::resumed(self, tx, t.key, t.old, t.new, held, done);
        let me = self.clone();
        self.workers.spawn(Tier::Protocol, "write-finish", async move { me.finish(p, None).await });
    }

    /// Runs one data transaction and answers at the point `toughness` names.
    #[tracing::instrument(level = "debug", skip(self, op), fields(iom = self.me.0, object = key.object.0, block = key.block.0))]
    pub async fn write_block(
        self: &Arc<Self>,
        key: BlockKey,
        op: Op,
        toughness: Toughness,
        hint: u8,
        stripe: Option<u64>,
    ) -> Result<Version, Error> {
        if self.workers.stopping(Tier::Intake) {
            return Err(Error::Shutdown);
        }
        let bs = self.block_size;
        for (offset, len) in op.writes() {
            if offset as u64 + len as u64 > bs as u64 || len == 0 {
                return Err(Error::BadRequest(format!(
                    "write of {len} bytes at offset {offset} does not fit a {bs}-byte block"
                )));
            }
        }
        self.fence.wait(&key).await;
        let guard = self.locks.lock(key).await;
        let mut p = self.issue(key, &op, hint, toughness == Toughness::Durable, stripe).await?;
        drop(guard);
        let version = p.new.version;
        let mut watch = p.progress.subscribe();
        let written = p.written.take();
        let me = self.clone();
        self.workers.spawn(Tier::Protocol, "write-finish", async move { me.finish(p, written).await });
        let want = match toughness {
            Toughness::Fast => return Ok(version),
            // A client sends its buffered bytes as atomic; one that sends
            // `buffered` itself gets what the client-side level promises at least.
            Toughness::Atomic | Toughness::Buffered => Progress::Held,
            Toughness::Durable => Progress::Durable,
        };
        let got = *watch.wait_for(|s| *s >= want).await.map_err(|_| Error::Shutdown)?;
        match got {
            Progress::Failed => Err(Error::Wire(common::wire::WireError::new(
                common::wire::ErrorCode::Unavailable,
                "parity IOM unreachable; retry after the cluster map changes",
            ))),
            Progress::NoSpace => Err(Error::NoSpace),
            _ => Ok(version),
        }
    }

    /// a1–a8 under the block's lock: from the old version to the delta on its way.
    async fn issue(
        self: &Arc<Self>,
        key: BlockKey,
        op: &Op,
        hint: u8,
        urgent: bool,
        stripe: Option<u64>,
    ) -> Result<Pending, Error> {
        // a1: the old block, from the buffer cache or the disk (zeros if it never existed).
        let old = self.storage.map.head(&key);
        let old_bytes = match self.storage.read_data(key, old).await {
            Ok(b) => b,
            Err(e) if crate::storage::healable(&e) => self.heal_block(key, old, e).await?,
            Err(e) => return Err(e),
        };
        crash_point!(self, "write::after-a1");

        // a3: the new block in a second buffer; a7's delta computed alongside.
        let (new_bytes, delta_offset, delta) = build_new(&old_bytes, op);

        // a2: a new disk address (none when the block is deleted).
        let addr = if new_bytes.is_empty() && old.addr.is_none() && matches!(op, Op::Truncate { .. }) {
            // Truncating an absent block: nothing to do, but keep the protocol uniform.
            None
        } else if new_bytes.is_empty() && matches!(op, Op::Truncate { keep: 0 }) {
            None
        } else {
            Some(self.alloc_for_client().await?)
        };
        crash_point!(self, "write::after-a2");
        crash_point!(self, "write::after-a3");
        crash_point!(self, "write::after-a7");

        // a4: issue the write of the new block at the new address.
        if let Some(a) = addr {
            if let Err(e) = self.storage.store.write(a, &new_bytes) {
                // Nothing refers to the slot yet: give it back at once.
                self.storage.store.free(a);
                return Err(e);
            }
            if urgent {
                // `durable`: the disk writes while the delta travels.
                self.storage.store.start_writeback(a, new_bytes.len());
            }
        }
        let new =
            VerRef { version: old.version.next(), addr, len: new_bytes.len() as u32, crc: codec::crc(&new_bytes) };
        if addr.is_some() {
            self.storage.cache.put(CacheKey::Data(key, new.version), new_bytes);
        }
        crash_point!(self, "write::after-a4");

        // a5: journal "write issued" with old and new addresses.
        let tx = self.storage.map.next_tx();
        let group = self.layout.group_key(key);
        let parity = self.layout.parity_iom(key.object, group.group);
        let rec = Record::Issued { tx, key, old, new, parity };
        let written = self.storage.commit(&rec, false, Wait::Written);
        let progress = self.inflight.register(tx);
        crash_point!(self, "write::after-a5");

        // a6 + a8: "update parity" to P with the delta pushed along (a7 above).
        let upd = ParityUpdate {
            tx: TxRef { iom: self.me, tx },
            group,
            index: self.layout.index_in_group(key.block),
            old: old.version,
            new: new.version,
            delta_offset,
            hint,
            data_iom: self.me,
            durable: urgent,
        };
        // A block that was absent has its new bytes as its delta: in a
        // client stripe, the parity IOM has their sum from the client and
        // gets a reference instead (`parity::stripes`).
        let stripe = stripe.map(|id| StripeTag {
            id,
            crc: new.crc,
            reference: old.addr.is_none()
                && old_bytes.is_empty()
                && delta_offset == 0
                && delta.len() == new.len as usize,
        });
        let (held, done) = self.links.send_update(parity, upd, delta, stripe);
        crash_point!(self, "write::after-a6");
        Ok(Pending { tx, key, old, new, progress, written, held, done, urgent })
    }

    /// a8 confirmation through a14, in the background.
    async fn finish(self: Arc<Self>, p: Pending, written: Option<oneshot::Receiver<()>>) {
        let Pending { tx, key, old, new, progress, held, done, urgent, .. } = p;
        let durably = if urgent { Wait::Durable } else { Wait::DurableLazy };
        let fail = |progress: &watch::Sender<Progress>| {
            progress.send_replace(Progress::Failed);
        };
        // a8: P confirms it holds the delta (b4); a5 is written by then too.
        if let Some(w) = written {
            let _ = w.await;
        }
        match held.await {
            Ok(Ok(())) => {}
            Ok(Err(refused)) => {
                self.roll_back_refused(tx, key, new, refused).await;
                progress.send_replace(Progress::NoSpace);
                self.inflight.remove(tx);
                return;
            }
            Err(_) => {
                fail(&progress);
                self.inflight.remove(tx);
                return;
            }
        }
        crash_point!(&self, "write::after-a8");
        // a9: the old-block buffer is released (dropped with the delta).
        crash_point!(&self, "write::after-a9");
        progress.send_replace(Progress::Held);

        // a10 + a11: the new block's write completes (block file synced by the
        // journal writer before this record) and the map switches to it.
        let rec = Record::Switched { tx };
        let switched = self.storage.commit(&rec, true, durably);
        if let Some(s) = switched {
            let _ = s.await;
        }
        crash_point!(&self, "write::after-a10");
        crash_point!(&self, "write::after-a11");
        // a12: the new-block buffer is released (it stays in the cache as the next write's old block).
        crash_point!(&self, "write::after-a12");

        // b12 from P: parity update completed.
        if done.await.is_err() {
            fail(&progress);
            self.inflight.remove(tx);
            return;
        }
        progress.send_replace(Progress::Durable);

        // a14: journal "write completed" and free the old address once that is
        // durable. It is made durable before a13, so a parity IOM that has
        // freed (and forgotten) a transaction implies its data IOM completed it.
        let _ = (old, new);
        if let Some(d) = self.storage.commit(&Record::Completed { tx }, false, Wait::Background) {
            let _ = d.await;
        }
        crash_point!(&self, "write::after-a14");

        // a13: tell P the write completed.
        self.links.send_write_done(new_parity_role(&self, key), TxRef { iom: self.me, tx });
        crash_point!(&self, "write::after-a13");
        progress.send_replace(Progress::Done);
        self.inflight.remove(tx);
    }
}

impl DataSide {
    /// a2 for a client write. Out of room, it asks again for up to
    /// `NO_SPACE_WAIT` before refusing (`NoSpace`): on a filesystem shared
    /// with other IOMs, their unused preallocated tails come back within
    /// `Storage::checkpoint_worker`'s tail poll.
    async fn alloc_for_client(&self) -> Result<common::DiskAddr, Error> {
        const NO_SPACE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
        let until = tokio::time::Instant::now() + NO_SPACE_WAIT;
        loop {
            // With no room left to journal more than the writes already
            // running, nothing new is taken.
            let r = if self.storage.journal.short_of_space() {
                Err(Error::NoSpace)
            } else {
                self.storage.store.alloc_for_client()
            };
            match r {
                Err(Error::NoSpace) if tokio::time::Instant::now() < until => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                r => return r,
            }
        }
    }

    /// The parity IOM had no room for this write (or for an earlier
    /// version of the block it builds on): the new version is undone
    /// (a durable "rolled back" record, so a restart does not roll it
    /// forward), its slot freed, and the writer gets ENOSPC. A parity IOM
    /// that may hold the update is told to discard it.
    async fn roll_back_refused(self: &Arc<Self>, tx: TxId, key: BlockKey, new: VerRef, refused: Refused) {
        let group = self.layout.group_key(key);
        let parity = self.layout.parity_iom(key.object, group.group);
        if let Some(d) = self.storage.commit(&Record::RolledBack { tx }, false, Wait::Durable) {
            let _ = d.await;
        }
        self.storage.cache.remove(&CacheKey::Data(key, new.version));
        self.links.rolled_back(parity, (group, self.layout.index_in_group(key.block)));
        if refused.discard {
            if let Err(e) = self.links.discard(parity, TxRef { iom: self.me, tx }).await {
                // Its recovery asks this IOM, which answers "rolled back".
                tracing::warn!(iom = self.me.0, ?tx, "a refused update's parity IOM was not told to discard it: {e}");
            }
        }
        tracing::info!(
            iom = self.me.0,
            ?tx,
            object = key.object.0,
            block = key.block.0,
            "write refused for lack of space on its parity IOM; rolled back"
        );
    }
}

fn new_parity_role(data: &DataSide, key: BlockKey) -> common::IomId {
    data.layout.parity_iom(key.object, data.layout.group_of(key.block))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xor(a: &[u8], b: &[u8]) -> Vec<u8> {
        let n = a.len().max(b.len());
        (0..n).map(|i| a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0)).collect()
    }

    #[test]
    fn merge_and_delta_agree() {
        let old = Bytes::from(vec![7u8; 100]);
        for (off, len) in [(0usize, 100usize), (0, 150), (10, 20), (90, 30), (120, 10), (0, 5)] {
            let data = Bytes::from((0..len).map(|i| (i * 13 + 1) as u8).collect::<Vec<_>>());
            let (new, doff, delta) = build_new(&old, &Op::Write { offset: off as u32, data: data.clone() });
            let mut expect = old.to_vec();
            if expect.len() < off + len {
                expect.resize(off + len, 0);
            }
            expect[off..off + len].copy_from_slice(&data);
            assert_eq!(&new[..], &expect[..]);
            // old XOR new == delta placed at doff
            let full = xor(&old, &new);
            let mut placed = vec![0u8; full.len()];
            placed[doff as usize..doff as usize + delta.len()].copy_from_slice(&delta);
            assert_eq!(full, placed, "off {off} len {len}");
        }
        let (new, doff, delta) = build_new(&old, &Op::Truncate { keep: 40 });
        assert_eq!(new.len(), 40);
        assert_eq!((doff, delta.len()), (40, 60));
        let (new, _, delta) = build_new(&Bytes::new(), &Op::Write { offset: 5, data: Bytes::from_static(b"ab") });
        assert_eq!(&new[..], b"\0\0\0\0\0ab");
        assert_eq!(&delta[..], b"ab");
    }

    #[test]
    fn parts_merged_into_one_version_equal_the_writes_one_after_another() {
        let part = |o: u32, len: usize, seed: u8| {
            (o, Bytes::from((0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect::<Vec<_>>()))
        };
        let cases: Vec<(usize, Vec<(u32, Bytes)>)> = vec![
            (100, vec![part(0, 4, 1), part(50, 10, 2)]),
            (100, vec![part(90, 4, 3), part(10, 5, 4)]),
            (100, vec![part(95, 20, 5), part(130, 3, 6)]),
            (0, vec![part(8, 4, 7), part(0, 2, 8)]),
            (30, vec![part(40, 4, 9), part(60, 4, 10)]),
            (100, vec![part(10, 20, 11), part(15, 5, 12)]),
        ];
        for (old_len, parts) in cases {
            let old = Bytes::from((0..old_len).map(|i| (i * 7 + 3) as u8).collect::<Vec<_>>());
            let mut one_by_one = old.clone();
            for (o, d) in &parts {
                one_by_one = build_new(&one_by_one, &Op::Write { offset: *o, data: d.clone() }).0;
            }
            let (new, doff, delta) = build_new(&old, &Op::Extents { parts: parts.clone() });
            assert_eq!(new, one_by_one, "{parts:?}");
            let full = xor(&old, &new);
            let mut placed = vec![0u8; full.len()];
            placed[doff as usize..doff as usize + delta.len()].copy_from_slice(&delta);
            assert_eq!(full, placed, "{parts:?}");
        }
    }
}
