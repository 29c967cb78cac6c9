//! Carrying out the recovery rules after a restart.
//!
//! An IOM that starts with unfinished transactions in its journal resolves
//! each of them before the blocks involved are served again (they are
//! fenced): as data IOM it asks the parity role what it knows
//! (`TxStatus`), checks whether its new data version is intact, and applies
//! [`recovery::decide`]; as parity IOM it asks the data IOM. Rolling forward
//! re-drives the normal protocol (the update is sent again and the parity
//! side ignores what it already applied), so no separate code path writes
//! parity for recovery except [`crate::parity::ParitySide::recompute`]
//! (which installs what [`crate::group::Group::gather`] computes).

use crate::caller::RoleCaller;
use crate::data::DataSide;
use crate::fence::Fence;
use crate::group::xor_into;
use crate::group::Group;
use crate::journal::Wait;
use crate::locks::KeyLocks;
use crate::map::{DTx, OpenTxs, PTx};
use crate::parity::ParitySide;
use crate::records::{Record, VerRef};
use crate::recovery::{self, decide, Action, DSide, PSide};
use crate::storage::Storage;
use crate::timeouts::Timeouts;
use crate::Error;
use bytes::BytesMut;
use common::wire::{ErrorCode, ParityTxState, ParityUpdate, RecoveryReq, RecoveryResp, TxView, WireError};
use common::{codec, BlockKey, GroupKey, TxId, TxRef, Version};
use common::{IomId, Layout};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Counters for the recovery log line.
#[derive(Default, Debug)]
struct Tally {
    forward: u32,
    back: u32,
    rebuilt: u32,
    recomputed: u32,
    freed: u32,
    left_to_data: u32,
}

/// The recovery executor: resolves the transactions this IOM's journal
/// left open (as data side and as parity side) by asking the other side
/// and applying [`recovery::decide`], and answers the other IOMs'
/// recovery questions (`TxStatus`, `DiscardTx`, `RebuildBlock`). Holds
/// the storage, the data and parity sides, the group, the caller, the
/// fence and the block locks; never the node.
pub struct Recovery {
    pub(crate) me: IomId,
    pub(crate) layout: Layout,
    pub(crate) storage: Arc<Storage>,
    pub(crate) data: Arc<DataSide>,
    pub(crate) parity: Arc<ParitySide>,
    pub(crate) group: Arc<Group>,
    pub(crate) caller: Arc<RoleCaller>,
    pub(crate) fence: Arc<Fence>,
    pub(crate) locks: Arc<KeyLocks<BlockKey>>,
    pub(crate) timeouts: Timeouts,
    /// Cancelled when the IOM's background work stops.
    pub(crate) stop: CancellationToken,
    /// Transactions the journal left open at start-up, taken by the first
    /// recovery.
    pub(crate) startup_open: parking_lot::Mutex<Option<OpenTxs>>,
    /// Parity-side transactions recovery could not ask about while the
    /// cluster was stopped: settled by `deferred_worker` once it is not.
    pub(crate) deferred: parking_lot::Mutex<Vec<TxRef>>,
}

impl Recovery {
    /// `DoneSeen`: the highest transaction id of data IOM `of` whose
    /// completion this IOM has seen (0: none).
    pub fn done_seen(&self, of: IomId) -> u64 {
        self.storage.map.done_seen.lock().get(&of).copied().unwrap_or(0)
    }

    /// `RebuildBlock`: installs version `version` of block `key`, rebuilt from its group.
    pub async fn rebuild_block(self: &Arc<Self>, key: BlockKey, version: Version) -> Result<(), Error> {
        let _g = self.locks.lock(key).await;
        if self.storage.map.head(&key).version >= version {
            return Ok(());
        }
        let (_, bytes) = self.group.reconstruct(key, Some(version)).await?;
        self.storage.install_data(key, version, bytes).await
    }

    /// `TxStatus`: what this IOM knows of a transaction (`Unavailable`
    /// while its delta is still being applied here: ask again).
    pub async fn tx_status(self: &Arc<Self>, tx: TxRef, key: BlockKey, parity_side: bool) -> Result<TxView, Error> {
        if parity_side {
            let g = self.layout.group_key(key);
            let role = self.layout.parity_iom(g.object, g.group);
            if role != self.me {
                // A stand-in keeps no parity for the failed IOM: the group
                // will be recomputed when it comes back.
                self.storage.mark_group(role, g);
                return Ok(TxView::Parity { state: ParityTxState::None, standin: true, covers: Version(0) });
            }
            // A stripe reference not yet complete is no held delta: its
            // stripe is given up now (nothing of it is held yet), so this
            // answer cannot be overtaken by the stripe completing.
            self.parity.give_up_blocked(g, tx);
            // A delta held in memory is applied before the answer, or set
            // aside (`settle_for_status`).
            if !self.parity.settle_for_status(g, tx, self.timeouts.held_delta_wait).await {
                return Err(Error::Wire(WireError::new(
                    ErrorCode::Unavailable,
                    format!("the delta of {tx:?} is being applied on IOM {}; ask again", self.me),
                )));
            }
            let state = match self.storage.map.ptx.lock().get(&tx) {
                Some(p) if p.applied.is_some() => ParityTxState::Completed,
                Some(_) => ParityTxState::Received,
                None => ParityTxState::None,
            };
            let j = self.layout.index_in_group(key.block) as usize;
            let covers = self.storage.map.parity_head(&g).members.get(j).copied().unwrap_or(Version(0));
            Ok(TxView::Parity { state, standin: false, covers })
        } else {
            // Open: a data-side transaction of this IOM, or the update of a
            // stand-in write of this IOM that still runs (it keeps no
            // data-side record: its parity link holds the update).
            let open = tx.iom == self.me
                && (self.storage.map.dtx.lock().contains_key(&tx.tx) || self.data.links.is_pending(tx.tx));
            let (pointer, head) = match self.storage.map.entry(&key) {
                Some(e) => (e.pointer, e.head().version),
                None => (Version(0), Version(0)),
            };
            Ok(TxView::Data { open, pointer, head })
        }
    }

    /// `DiscardTx`: forget a received update whose write was rolled back.
    pub fn discard_tx(self: &Arc<Self>, tx: TxRef) {
        self.parity.unqueue(tx);
        let known = self.storage.map.ptx.lock().get(&tx).map(|p| p.applied.is_none());
        if known == Some(true) {
            self.storage.commit(&Record::Discarded { tx }, false, Wait::Nothing);
        }
    }

    /// Whether the bytes of a data version on disk match its checksum.
    async fn intact(&self, key: BlockKey, v: VerRef) -> bool {
        match v.addr {
            None => true,
            Some(_) => self.storage.read_data(key, v).await.is_ok(),
        }
    }

    /// Sends a data transaction's update again and finishes it normally.
    async fn redrive(self: &Arc<Self>, tx: TxId, t: &DTx) -> Result<(), Error> {
        let old = self.storage.read_data(t.key, t.old).await?;
        let new = self.storage.read_data(t.key, t.new).await?;
        let mut delta = BytesMut::zeroed(old.len().max(new.len()));
        delta[..old.len()].copy_from_slice(&old);
        xor_into(&mut delta[..new.len()], &new);
        let group = self.layout.group_key(t.key);
        let upd = ParityUpdate {
            tx: TxRef { iom: self.me, tx },
            group,
            index: self.layout.index_in_group(t.key.block),
            old: t.old.version,
            new: t.new.version,
            delta_offset: 0,
            hint: 1,
            data_iom: self.me,
            durable: true,
        };
        self.data.resume(tx, t, upd, delta.freeze());
        Ok(())
    }

    /// Resolves one unfinished data-side transaction. `force_back`: an
    /// earlier transaction of the same block was rolled back.
    async fn resolve_data_tx(
        self: &Arc<Self>,
        tx: TxId,
        t: &DTx,
        force_back: bool,
        tally: &mut Tally,
    ) -> Result<bool, Error> {
        let intact = self.intact(t.key, t.new).await;
        let view = self
            .caller
            .rpc_recovery(
                t.parity,
                RecoveryReq::TxStatus { tx: TxRef { iom: self.me, tx }, key: t.key, parity_side: true },
            )
            .await?;
        let RecoveryResp::TxStatus(TxView::Parity { state, covers, standin }) = view else {
            return Err(Error::UnexpectedReply(format!("{view:?}")));
        };
        let pside = recovery::pside_from(state, covers, standin, t.new.version);
        let dside = if t.switched { DSide::Switched } else { DSide::Issued };
        let action = recovery::decide_data(dside, pside, intact, force_back);
        tracing::info!(
            iom = self.me.0,
            tx = tx.0,
            object = t.key.object.0,
            block = t.key.block.0,
            ?dside,
            ?pside,
            intact,
            ?action,
            "recovery: data transaction"
        );
        match action {
            Action::RollForward => {
                self.redrive(tx, t).await?;
                tally.forward += 1;
                Ok(false)
            }
            Action::RebuildData => {
                let (_, bytes) = self.group.reconstruct(t.key, Some(t.new.version)).await?;
                if codec::crc(&bytes) != t.new.crc && t.new.addr.is_some() {
                    return Err(Error::Corrupt(format!(
                        "rebuilt object {} block {} does not match its recorded checksum",
                        t.key.object, t.key.block
                    )));
                }
                if let Some(a) = t.new.addr {
                    // The new version's own slot: written again with the rebuilt bytes.
                    let mut b = BytesMut::from(&bytes[..]);
                    b.resize(t.new.len as usize, 0);
                    self.storage.store.write(a, &b)?;
                    self.storage.cache.put(crate::cache::CacheKey::Data(t.key, t.new.version), b.freeze());
                }
                self.redrive(tx, t).await?;
                tally.rebuilt += 1;
                Ok(false)
            }
            Action::RollBack => {
                if let Some(d) = self.storage.commit(&Record::RolledBack { tx }, false, Wait::Durable) {
                    let _ = d.await;
                }
                self.storage.cache.remove(&crate::cache::CacheKey::Data(t.key, t.new.version));
                if pside == PSide::Received {
                    self.caller
                        .rpc_recovery(t.parity, RecoveryReq::DiscardTx { tx: TxRef { iom: self.me, tx } })
                        .await?;
                }
                tally.back += 1;
                Ok(true)
            }
            Action::Nothing | Action::FinishFrees | Action::RecomputeParity => Ok(false),
        }
    }

    /// Resolves one unfinished parity-side transaction; `Ok(false)` when the
    /// data IOM still has it open (it resolves it itself).
    async fn resolve_parity_tx(self: &Arc<Self>, tx: TxRef, p: &PTx, tally: &mut Tally) -> Result<bool, Error> {
        let key = BlockKey { object: p.group.object, block: self.layout.member_block(p.group.group, p.index) };
        let role = self.layout.data_iom(key.object, key.block);
        // An update a stand-in (`tx.iom`) sent for a failed IOM's block is
        // asked of the stand-in: it knows whether its write still runs,
        // while the block's role may not be served at all (a stopped
        // cluster: asking it would wait for ever).
        let standin = tx.iom != role;
        let asked = if standin { tx.iom } else { role };
        let view = self.caller.rpc_recovery(asked, RecoveryReq::TxStatus { tx, key, parity_side: false }).await?;
        let RecoveryResp::TxStatus(TxView::Data { open, pointer, .. }) = view else {
            return Err(Error::UnexpectedReply(format!("{view:?}")));
        };
        if open {
            // Its writer resends the update (handled like a new one, b1–b13).
            return Ok(false);
        }
        if standin {
            // The stand-in's write either completed (the parity applied the
            // update: finish it; the stand-in's mark has the failed IOM
            // rebuild the block from this parity) or failed before the
            // parity applied it (no client was told it succeeded: discard).
            tracing::info!(iom = self.me.0, tx = ?tx, group = ?p.group, applied = p.applied.is_some(), "recovery: a stand-in's parity transaction");
            if p.applied.is_some() {
                self.parity.write_done(tx);
                tally.freed += 1;
            } else {
                self.discard_tx(tx);
                tally.back += 1;
            }
            return Ok(true);
        }
        let dside = recovery::dside_from(pointer, p.new);
        let pside = if p.applied.is_some() { PSide::Completed } else { PSide::Received };
        let action = decide(dside, pside, false);
        tracing::info!(iom = self.me.0, tx = ?tx, group = ?p.group, ?dside, ?pside, ?action, "recovery: parity transaction");
        match action {
            Action::FinishFrees => {
                self.parity.write_done(tx);
                tally.freed += 1;
            }
            Action::RollBack => {
                self.discard_tx(tx);
                tally.back += 1;
            }
            Action::RecomputeParity => {
                self.parity.recompute(p.group).await?;
                self.finish_ptx(tx, p);
                tally.recomputed += 1;
            }
            Action::RebuildData => {
                self.caller.rpc_recovery(role, RecoveryReq::RebuildBlock { key, version: p.new }).await?;
                self.finish_ptx(tx, p);
                tally.rebuilt += 1;
            }
            Action::Nothing | Action::RollForward => {}
        }
        Ok(true)
    }

    fn finish_ptx(self: &Arc<Self>, tx: TxRef, p: &PTx) {
        if p.applied.is_some() {
            self.parity.write_done(tx);
        } else {
            self.storage.commit(&Record::Discarded { tx }, false, Wait::Nothing);
        }
    }

    /// Settles the parity-side transactions recovery left while the
    /// cluster was stopped (`deferred`), once their data role is served
    /// again: a data IOM whose write completed does not ask about it after
    /// its own restart, so without this the old parity version would stay
    /// allocated until this IOM's next restart.
    pub async fn deferred_worker(self: Arc<Self>) {
        let mut tally = Tally::default();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(self.timeouts.recovery_backoff_max) => {}
            }
            let todo = std::mem::take(&mut *self.deferred.lock());
            for tx in todo {
                let Some(p) = self.storage.map.ptx.lock().get(&tx).cloned() else { continue };
                match self.resolve_parity_tx(tx, &p, &mut tally).await {
                    // Settled, or open at its data IOM (which resends it).
                    Ok(_) => {
                        tracing::info!(iom = self.me.0, tx = ?tx, "recovery: a deferred parity transaction settled")
                    }
                    Err(e) => {
                        tracing::debug!(iom = self.me.0, tx = ?tx, "recovery: deferred transaction waits: {e}");
                        self.deferred.lock().push(tx);
                    }
                }
            }
        }
    }

    /// Resolves every transaction the journal left unfinished (after a
    /// restart). Blocks with open data-side transactions stay fenced until
    /// theirs are resolved; peers that are not reachable yet are asked again.
    pub async fn recover(self: Arc<Self>) {
        self.recover_with(None).await
    }

    /// Like [`Recovery::recover`] for an IOM coming back after its stand-in marked
    /// blocks and groups of it: transactions on those are settled by the
    /// rebuild (the rebuilt version is the one parity holds), not here.
    pub async fn recover_with(self: Arc<Self>, marks: Option<&common::wire::RebuildMarks>) {
        // Only what the journal left open: transactions started since are live.
        let Some(OpenTxs { data: mut dtx, parity: mut ptx }) = self.startup_open.lock().take() else { return };
        if let Some(m) = marks {
            // Objects dropped while this IOM was away go first: the drop
            // forgets their open transactions (filtered out below). Settled
            // here, a write left open on one found its parity IOM knowing
            // nothing of it (that IOM dropped the group), was rolled
            // forward, and its update made the dropped group anew there;
            // the rebuild then dropped the block (scrub: a block at
            // version 0 under a parity covering version 1). The rebuild
            // commits these drops again, which changes nothing more.
            for (o, from) in &m.drops {
                self.storage.commit(&Record::Dropped { object: *o, from: *from }, false, Wait::Written);
            }
        }
        dtx.retain(|(tx, _)| self.storage.map.dtx.lock().contains_key(tx));
        ptx.retain(|(tx, _)| self.storage.map.ptx.lock().contains_key(tx));
        if let Some(m) = marks {
            let blocks: HashSet<BlockKey> = m.blocks.iter().map(|(k, _)| *k).collect();
            let groups: HashSet<GroupKey> = m.groups.iter().copied().collect();
            for (tx, t) in dtx.iter().filter(|(_, t)| blocks.contains(&t.key)) {
                self.storage.commit(&Record::RolledBack { tx: *tx }, false, Wait::Written);
                self.storage.cache.remove(&crate::cache::CacheKey::Data(t.key, t.new.version));
            }
            for (tx, p) in ptx.iter().filter(|(_, p)| groups.contains(&p.group)) {
                self.finish_ptx(*tx, p);
            }
            dtx.retain(|(_, t)| !blocks.contains(&t.key));
            ptx.retain(|(_, p)| !groups.contains(&p.group));
        }
        if dtx.is_empty() && ptx.is_empty() {
            return;
        }
        tracing::warn!(
            iom = self.me.0,
            data_side = dtx.len(),
            parity_side = ptx.len(),
            "recovery: resolving unfinished transactions"
        );
        self.fence.set(dtx.iter().map(|(_, t)| t.key));
        let mut tally = Tally::default();
        // Data side: per block, in transaction order.
        let mut by_key: BTreeMap<BlockKey, Vec<(TxId, DTx)>> = BTreeMap::new();
        for (tx, t) in dtx {
            by_key.entry(t.key).or_default().push((tx, t));
        }
        let mut delay = self.timeouts.recovery_backoff_min;
        while !by_key.is_empty() && !self.stop.is_cancelled() {
            let mut left = BTreeMap::new();
            for (key, txs) in std::mem::take(&mut by_key) {
                let mut rolled_back = false;
                let mut rest = Vec::new();
                for (i, (tx, t)) in txs.iter().enumerate() {
                    match self.resolve_data_tx(*tx, t, rolled_back, &mut tally).await {
                        Ok(back) => rolled_back |= back,
                        Err(e) => {
                            tracing::debug!(iom = self.me.0, tx = tx.0, "recovery waits: {e}");
                            rest = txs[i..].to_vec();
                            break;
                        }
                    }
                }
                if rest.is_empty() {
                    self.fence.clear(&key);
                } else {
                    left.insert(key, rest);
                }
            }
            by_key = left;
            if !by_key.is_empty() {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(self.timeouts.recovery_backoff_max);
            }
        }
        // Parity side.
        let mut pending: Vec<TxRef> = ptx.into_iter().map(|(t, _)| t).collect();
        let mut delay = self.timeouts.recovery_backoff_min;
        while !pending.is_empty() && !self.stop.is_cancelled() {
            let mut left = Vec::new();
            for tx in pending {
                let Some(p) = self.storage.map.ptx.lock().get(&tx).cloned() else { continue };
                match self.resolve_parity_tx(tx, &p, &mut tally).await {
                    Ok(true) => {}
                    // The data IOM still has it open: it resends the update
                    // (a resent update is handled like a new one, b1–b13),
                    // perhaps only once this IOM serves again — waiting for it
                    // here would deadlock a stopped cluster's restart.
                    Ok(false) => tally.left_to_data += 1,
                    // Its data IOM does not run and, the cluster being
                    // stopped, nobody serves its role: that IOM's own
                    // recovery settles the transaction with this one when it
                    // returns (as a resent update, or by asking). Waiting
                    // here could wait for ever: this IOM's return may be
                    // what ends the stop.
                    Err(Error::Wire(w)) if w.code == ErrorCode::ClusterStopped => {
                        tracing::warn!(iom = self.me.0, tx = ?tx, "recovery: a parity transaction asked about again once the cluster runs");
                        self.deferred.lock().push(tx);
                        tally.left_to_data += 1;
                    }
                    Err(e) => {
                        tracing::debug!(iom = self.me.0, tx = ?tx, "recovery waits: {e}");
                        left.push(tx);
                    }
                }
            }
            pending = left;
            if !pending.is_empty() {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(self.timeouts.recovery_backoff_max);
            }
        }
        tracing::warn!(
            iom = self.me.0,
            rolled_forward = tally.forward,
            rolled_back = tally.back,
            rebuilt = tally.rebuilt,
            parity_recomputed = tally.recomputed,
            frees_finished = tally.freed,
            left_to_data_iom = tally.left_to_data,
            "recovery: done"
        );
    }
}
