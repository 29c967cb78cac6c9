//! The stand-in: how a proxy IOM serves the role of a failed IOM (DESIGN §6).
//!
//! - Reads of the failed IOM's blocks are rebuilt from the group (parity
//!   XOR the other members at the versions the parity covers).
//! - Writes to its blocks rebuild the old block the same way, send the delta
//!   to the group's parity IOM (which keeps parity right, so the new data is
//!   recoverable), and mark the block, in a journaled record kept for the
//!   failed IOM, as needing rebuild.
//! - Parity updates for groups whose parity lived on the failed IOM only
//!   mark the group (its parity is recomputed when the IOM comes back).
//! - When it takes over, the other IOMs publish their unfinished
//!   transactions with the failed IOM; every block they touch is marked.
//!
//! Which roles are stood in for, frozen or handed back: `handover`.

pub mod handover;

use crate::caller::RoleCaller;
use crate::group::Group;
use crate::journal::Wait;
use crate::links::Links;
use crate::locks::KeyLocks;
use crate::membership::Membership;
use crate::parity::ParitySide;
use crate::records::Record;
use crate::storage::Storage;
use crate::timeouts::Timeouts;
use crate::write_path::{build_new, Op};
use crate::Error;
use bytes::Bytes;
use common::wire::{ErrorCode, ParityUpdate, RebuildMarks, RecoveryReq, RecoveryResp, Reply, Request, WireError};
use common::{BlockKey, GroupNo, IomId, Layout, ObjectId, Toughness, TxRef, Version};
use handover::HandoverState;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// The stand-in role: serves the roles of failed IOMs this one is the
/// proxy of. Holds the storage (marks), the group (degraded reads and the
/// old block of degraded writes), the block locks, the parity links, the
/// parity side (its unfinished transactions with a failed IOM), the
/// handover state, the caller and the membership (whether this IOM still
/// stands in for an IOM); never the node.
pub struct StandIn {
    pub(crate) me: IomId,
    pub(crate) width: u32,
    pub(crate) layout: Layout,
    pub(crate) storage: Arc<Storage>,
    pub(crate) group: Arc<Group>,
    pub(crate) locks: Arc<KeyLocks<BlockKey>>,
    pub(crate) links: Arc<Links>,
    pub(crate) parity: Arc<ParitySide>,
    pub(crate) handover: Arc<HandoverState>,
    pub(crate) caller: Arc<RoleCaller>,
    pub(crate) member: Arc<Membership>,
    pub(crate) timeouts: Timeouts,
    /// The IOM's directory (crash points' markers).
    pub(crate) dir: std::path::PathBuf,
    /// Cancelled when the IOM's background work stops.
    pub(crate) stop: CancellationToken,
}

/// Crash points of the stand-in are hit "at" this IOM.
impl crate::failpoint::At for StandIn {
    fn iom(&self) -> IomId {
        self.me
    }
    fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl StandIn {
    /// Takes over for failed IOM `i`: the other IOMs publish the unfinished
    /// transactions they had with it — parity IOMs first apply every delta
    /// from it they hold, so degraded reads see its acknowledged writes.
    /// Nothing is marked for them: when `i` returns, its own journal and the
    /// recovery rules settle them; marks are only for what changes while it
    /// is away.
    /// `era` is `HandoverState::era(i)` when the map named this IOM `i`'s
    /// proxy: if `i` came back since, nothing is activated.
    pub async fn activate(self: Arc<Self>, i: IomId, era: u64) {
        let w = self.width;
        let mut todo: Vec<IomId> = (0..w).map(IomId).filter(|&j| j != i).collect();
        let mut open = 0usize;
        for _ in 0..20 {
            let mut left = Vec::new();
            for j in todo {
                let r = if j == self.me {
                    Ok(self.parity.unfinished_about(i).await)
                } else {
                    match self
                        .caller
                        .call_peer(
                            j,
                            &Request::Recovery(RecoveryReq::Unfinished { about: i }),
                            Bytes::new(),
                            self.timeouts.peer_call,
                        )
                        .await
                    {
                        Ok((Reply::Recovery(RecoveryResp::Unfinished(v)), _)) => Ok(v),
                        Ok((r, _)) => Err(format!("unexpected {r:?}")),
                        Err(e) => Err(e.to_string()),
                    }
                };
                match r {
                    Ok(blocks) => open += blocks.len(),
                    Err(e) => {
                        tracing::debug!(iom = self.me.0, peer = j.0, "unfinished transactions not collected yet: {e}");
                        left.push(j);
                    }
                }
            }
            todo = left;
            if todo.is_empty() || self.stop.is_cancelled() {
                break;
            }
            tokio::time::sleep(self.timeouts.collect_pause).await;
        }
        if !self.handover.activate(i, era) {
            tracing::info!(iom = self.me.0, failed = i.0, "IOM came back before its stand-in was active");
            return;
        }
        tracing::warn!(iom = self.me.0, failed = i.0, unfinished = open, unreachable_peers = ?todo, "stand-in active");
    }

    /// `Ok` while this IOM serves failed IOM `owner`'s role: the current
    /// map calls `owner` down or rebuilding with this IOM as its proxy, and
    /// no handover has frozen the role. Otherwise `NotServing`: the client
    /// fetches the newest map and sends the request to the role's server.
    fn serving(&self, owner: IomId) -> Result<(), Error> {
        if !self.member.is_standin_for(owner) {
            return Err(Error::Wire(WireError::new(
                ErrorCode::NotServing,
                format!("IOM {} no longer stands in for IOM {owner}", self.me),
            )));
        }
        self.handover.check(owner)
    }

    /// Waits until the stand-in for `owner` is active (its peers published
    /// their unfinished transactions with it), at most `standin_ready_max`;
    /// `Unavailable` (the client retries) if it is not by then: a degraded
    /// read or write before that could miss one of `owner`'s acknowledged
    /// writes whose delta a parity IOM holds but has not applied yet.
    async fn ready(&self, owner: IomId) -> Result<(), Error> {
        if self.handover.wait_active(owner, self.timeouts.standin_ready_max).await {
            return Ok(());
        }
        Err(Error::Wire(WireError::new(
            ErrorCode::Unavailable,
            format!("the stand-in for IOM {owner} is not ready: its peers have not all said what they had in flight with it"),
        )))
    }

    /// The failed IOM `i` is up again: forget what was kept for it.
    pub fn done(&self, i: IomId) {
        self.handover.forget(i);
        if self.storage.map.marks.lock().contains_key(&i) {
            self.storage.commit(&Record::MarksCleared { owner: i }, false, Wait::Nothing);
        }
    }

    /// Degraded read of a block of failed IOM `owner`.
    pub async fn read(
        self: &Arc<Self>,
        owner: IomId,
        key: BlockKey,
        offset: u32,
        len: u32,
    ) -> Result<(Version, Bytes), Error> {
        self.serving(owner)?;
        self.ready(owner).await?;
        self.serving(owner)?;
        let (v, b) = self.group.reconstruct(key, None).await?;
        let start = (offset as usize).min(b.len());
        let end = (offset as usize + len as usize).min(b.len());
        Ok((v, b.slice(start..end)))
    }

    /// Degraded write of a block of failed IOM `owner`: parity carries it.
    pub async fn write(
        self: &Arc<Self>,
        owner: IomId,
        key: BlockKey,
        op: Op,
        toughness: Toughness,
        hint: u8,
    ) -> Result<Version, Error> {
        self.serving(owner)?;
        self.ready(owner).await?;
        crate::crash_point!(self, "standin::write-ready");
        let _op = self.handover.op(owner);
        // Counted, then checked again: a freeze that began meanwhile either
        // sees this write counted (and waits for it) or this check sees it;
        // and a write that waited while `owner` took its role back and the
        // map called it up sees that here (it would change parity behind
        // the owner's back, with a mark nobody fetches any more).
        self.serving(owner)?;
        self.write_inner(owner, key, op, toughness, hint).await
    }

    async fn write_inner(
        self: &Arc<Self>,
        owner: IomId,
        key: BlockKey,
        op: Op,
        toughness: Toughness,
        hint: u8,
    ) -> Result<Version, Error> {
        let _g = self.locks.lock(key).await;
        // The old block, as the group knows it.
        let (v, old) = self.group.reconstruct(key, None).await?;
        let (new, delta_offset, delta) = build_new(&old, &op);
        let next = v.next();
        let tx = self.storage.map.next_tx();
        let group = self.layout.group_key(key);
        let parity = self.layout.parity_iom(key.object, group.group);
        let wait = if toughness == Toughness::Durable { Wait::Durable } else { Wait::Written };
        crate::crash_point!(self, "standin::before-mark");
        // Marked only while still serving `owner` (see `mark_if_serving`):
        // nothing below runs for a role taken back meanwhile. The mark it
        // replaces is what a refused write puts back, at least at `v`
        // (no other stand-in write of this block runs: it is locked).
        let (before, mark) = self.handover.mark_if_serving(
            owner,
            || self.member.is_standin_for(owner),
            || {
                let before = self.storage.map.marks.lock().get(&owner).and_then(|m| m.blocks.get(&key).copied());
                (before, self.storage.commit(&Record::Marked { owner, key, version: next }, false, wait))
            },
        )?;
        let upd = ParityUpdate {
            tx: TxRef { iom: self.me, tx },
            group,
            index: self.layout.index_in_group(key.block),
            old: v,
            new: next,
            delta_offset,
            hint,
            data_iom: owner,
            durable: toughness == Toughness::Durable,
        };
        let (held, done) = self.links.send_update(parity, upd, delta, None);
        if let Some(m) = mark {
            let _ = m.await;
        }
        let unavailable = || Error::Wire(WireError::new(ErrorCode::Unavailable, "parity IOM unreachable"));
        if let Err(refused) = held.await.map_err(|_| unavailable())? {
            // No room for the parity: nothing changed, so the mark goes
            // back to what it was. Left asking for `next`, a version the
            // parity never reaches, it would keep every rebuild round of
            // the owner from clearing it, and the owner from coming back.
            self.links.rolled_back(parity, (group, self.layout.index_in_group(key.block)));
            if refused.discard {
                let _ = self.links.discard(parity, TxRef { iom: self.me, tx }).await;
            }
            // Back to a version the parity holds (`v`, or the mark
            // before if higher), never to no mark: a returning IOM that
            // fetched its marks meanwhile rolled back its own open write
            // of this block, trusting the rebuild to install what the
            // parity covers. Only a block never written (`v` 0, no mark
            // before) has nothing to rebuild.
            let back_to = match before {
                None if v == Version(0) => None,
                b => Some(b.map_or(v, |b| b.max(v))),
            };
            let undo = Record::MarkUndone { owner, key, version: next, back_to };
            if let Some(u) = self.storage.commit(&undo, false, Wait::Written) {
                let _ = u.await;
            }
            return Err(Error::NoSpace);
        }
        // Keep the block locked until the parity covers the new version, so
        // the next write of this block rebuilds it right.
        done.await.map_err(|_| unavailable())?;
        if !new.is_empty() {
            self.storage.cache.put(crate::cache::CacheKey::Data(key, next), new);
        }
        self.links.send_write_done(parity, TxRef { iom: self.me, tx });
        Ok(next)
    }

    /// A failed IOM's blocks of `object` in groups >= `from` were dropped.
    pub fn drop_object(&self, owner: IomId, object: ObjectId, from: GroupNo) -> Result<(), Error> {
        // Counted like a write, so a freeze hands this mark out with the others.
        let _op = self.handover.op(owner);
        self.handover.mark_if_serving(
            owner,
            || self.member.is_standin_for(owner),
            || self.storage.commit(&Record::MarkedDrop { owner, object, from }, false, Wait::Written),
        )?;
        Ok(())
    }

    /// `RebuildMarks`.
    pub fn rebuild_marks(&self, i: IomId) -> RebuildMarks {
        self.handover.handed_out(i);
        let frozen = self.handover.is_frozen(i);
        match self.storage.map.marks.lock().get(&i) {
            Some(m) => RebuildMarks {
                blocks: m.blocks.iter().map(|(k, v)| (*k, *v)).collect(),
                groups: m.groups.iter().copied().collect(),
                drops: m.drops.iter().copied().collect(),
                frozen,
            },
            None => RebuildMarks { frozen, ..Default::default() },
        }
    }

    /// `ClearMarks`: the rejoining IOM rebuilt these. Blocks carry the
    /// version rebuilt; a group is cleared only if nothing wrote it since
    /// the marks were handed out (see `HandoverState`).
    pub fn clear_marks(&self, i: IomId, mut m: RebuildMarks) {
        m.groups.retain(|g| self.handover.clearable(i, g));
        self.storage.commit(
            &Record::MarksDone { owner: i, blocks: m.blocks, groups: m.groups, drops: m.drops },
            false,
            Wait::Written,
        );
    }

    /// `Freeze`: stop serving `i`'s role, let running stand-in writes finish,
    /// and answer with the marks left; refused unless `rebuilding()` (the
    /// current map says `i` is rebuilding with this IOM as its proxy).
    pub async fn freeze(self: &Arc<Self>, i: IomId, rebuilding: impl FnOnce() -> bool) -> Result<RebuildMarks, Error> {
        if !self.handover.freeze_if(i, rebuilding) {
            return Err(Error::Wire(WireError::new(
                ErrorCode::NotServing,
                format!("IOM {i} is not rebuilding with IOM {} as its proxy in this IOM's map", self.me),
            )));
        }
        // One deadline for both drains; the rejoining IOM's call waits
        // longer (`Timeouts::handover_call`), so a drain that gives up is
        // still answered.
        let deadline = tokio::time::Instant::now() + self.timeouts.freeze_drain_max;
        if !self.handover.drain(i, deadline).await {
            tracing::warn!(iom = self.me.0, failed = i.0, "handover goes on with stand-in writes still running");
        }
        // Parity updates acknowledged for `i`'s groups whose data IOMs have
        // not said they completed: their a13 marks the group again.
        if !self.handover.drain_parity(i, deadline).await {
            tracing::warn!(
                iom = self.me.0,
                failed = i.0,
                "handover goes on with parity updates for its groups not completed by their data IOMs"
            );
        }
        self.storage.journal.flush().await;
        Ok(self.rebuild_marks(i))
    }
}
