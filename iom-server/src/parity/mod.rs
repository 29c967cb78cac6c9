//! The parity side of a write: steps b1–b13 of DESIGN §3, run on the IOM
//! that holds a group's parity block.
//!
//! Deltas for one group are queued; one worker per busy group takes every
//! delta that can be applied (each member's updates in version order) and
//! folds them into one new parity version — so deltas of a stripe written
//! together by several data IOMs cost one parity write. Every transaction is
//! still journaled (b1) on its own.

pub mod plan;
pub mod stripes;

use crate::cache::CacheKey;
use crate::crash_point;
use crate::group::xor_into;
use crate::group::Group;
use crate::journal::Wait;
use crate::membership::Membership;
use crate::records::{PVerRef, Record};
use crate::standin::handover::HandoverState;
use crate::storage::Storage;
use crate::store::Slot;
use crate::timeouts::Timeouts;
use crate::workers::Tier;
use crate::workers::Workers;
use crate::Error;
use bytes::{Bytes, BytesMut};
use common::wire::{ErrorCode, MemberResp, ParityAck, ParityMsg, ParityUpdate, Reply, WireError};
use common::{codec, BlockKey, GroupKey, IomId, Layout, TxRef, Version};
use net::frame::{read_frame, write_frame};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

type AckTx = mpsc::UnboundedSender<ParityAck>;

/// How long a given-up reference's b1 slot waits for its resend.
const PARKED_SLOT_KEPT: std::time::Duration = std::time::Duration::from_secs(30);

struct Delta {
    upd: ParityUpdate,
    delta: Bytes,
    acks: AckTx,
    /// The slot reserved at b1 for a new parity version (none for an
    /// update held again after a restart): a batch writes into one of its
    /// deltas' slots, the others go back when the deltas are dropped.
    slot: Option<Slot>,
    /// A reference to this client stripe (`stripes`): its delta comes
    /// with the stripe's piece.
    stripe: Option<u64>,
    /// The stripe is complete: applicable (one of its references carries
    /// the piece as its delta).
    ready: bool,
    /// A reference's b1 record being written: "held" waits for it.
    written: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Delta {
    fn new(upd: ParityUpdate, delta: Bytes, acks: AckTx, slot: Option<Slot>) -> Delta {
        Delta { upd, delta, acks, slot, stripe: None, ready: false, written: None }
    }
}

#[derive(Default)]
struct GroupQueue {
    queue: Vec<Delta>,
    busy: bool,
    /// The transactions of the batch being applied (out of `queue`).
    running: Vec<TxRef>,
}

enum Next {
    Wait,
    Idle,
    Batch(PVerRef, Vec<common::Version>, Vec<Delta>),
}

/// The parity role: receives updates (b1–b4), applies them in batches
/// (b3–b12), frees old parity (b13), recomputes a group's parity from its
/// members. Holds the storage, the membership (stand-in checks), the
/// handover state, the group (reconstruction) and the workers; never the
/// node.
pub struct ParitySide {
    me: IomId,
    layout: Layout,
    block_size: u32,
    storage: Arc<Storage>,
    member: Arc<Membership>,
    handover: Arc<HandoverState>,
    group: Arc<Group>,
    workers: Arc<Workers>,
    timeouts: Timeouts,
    /// The data directory (where a crash point leaves its marker).
    dir: std::path::PathBuf,
    groups: Mutex<HashMap<GroupKey, GroupQueue>>,
    /// Parity versions written (b8).
    pub writes: AtomicU64,
    /// Deltas received (b1).
    pub deltas: AtomicU64,
    /// Parity versions recomputed from the data because b3 could not read them.
    pub repairs: AtomicU64,
    /// Updates refused because this IOM's disk could not hold their parity.
    pub no_space: AtomicU64,
    /// Client stripes waiting for their piece or references.
    stripes: Mutex<stripes::Stripes>,
    /// The b1 slots of references whose stripes were given up, kept for
    /// their resends (which come with their deltas) for `PARKED_SLOT_KEPT`.
    parked: Mutex<HashMap<TxRef, (std::time::Instant, Slot)>>,
    /// Fired whenever a group's queue or busy flag may have changed (each
    /// batch taken, a group idle, a delta dropped): `pause` and
    /// `wait_unqueued` wait on it.
    changed: tokio::sync::Notify,
}

/// What the parity role is built from (see [`ParitySide::new`]).
pub struct Handles {
    pub me: IomId,
    pub layout: Layout,
    pub block_size: u32,
    pub storage: Arc<Storage>,
    pub member: Arc<Membership>,
    pub handover: Arc<HandoverState>,
    pub group: Arc<Group>,
    pub workers: Arc<Workers>,
    pub timeouts: Timeouts,
    pub dir: std::path::PathBuf,
}

impl crate::failpoint::At for ParitySide {
    fn iom(&self) -> IomId {
        self.me
    }
    fn dir(&self) -> &std::path::Path {
        &self.dir
    }
}

impl ParitySide {
    pub fn new(h: Handles) -> ParitySide {
        ParitySide {
            me: h.me,
            layout: h.layout,
            block_size: h.block_size,
            storage: h.storage,
            member: h.member,
            handover: h.handover,
            group: h.group,
            workers: h.workers,
            timeouts: h.timeouts,
            dir: h.dir,
            groups: Mutex::default(),
            writes: AtomicU64::new(0),
            deltas: AtomicU64::new(0),
            repairs: AtomicU64::new(0),
            no_space: AtomicU64::new(0),
            stripes: Mutex::default(),
            parked: Mutex::default(),
            changed: tokio::sync::Notify::new(),
        }
    }

    /// Whether the delta of `tx` waits in group `g`'s queue or is in the
    /// batch being applied (`ptx` says `applied` before it leaves
    /// `running`).
    pub fn is_queued(&self, g: GroupKey, tx: TxRef) -> bool {
        self.groups.lock().get(&g).is_some_and(|q| q.running.contains(&tx) || q.queue.iter().any(|d| d.upd.tx == tx))
    }

    /// Takes stripe `stripe`'s references out of a group's queue (whose
    /// lock the caller holds); the slot each reserved at b1 is kept for its
    /// resend (`parked`), before anyone can send it.
    fn take_stripe(&self, q: &mut GroupQueue, stripe: u64) -> Vec<Delta> {
        let (mut gone, kept): (Vec<Delta>, Vec<Delta>) =
            std::mem::take(&mut q.queue).into_iter().partition(|d| d.stripe == Some(stripe));
        q.queue = kept;
        let mut parked = self.parked.lock();
        for d in gone.iter_mut() {
            if let Some(slot) = d.slot.take() {
                parked.insert(d.upd.tx, (std::time::Instant::now(), slot));
            }
        }
        gone
    }

    /// Frees parked slots whose resends did not come within `PARKED_SLOT_KEPT`.
    fn prune_parked(&self) {
        let mut parked = self.parked.lock();
        if !parked.is_empty() {
            parked.retain(|_, (at, _)| at.elapsed() < PARKED_SLOT_KEPT);
        }
    }

    /// Recovery asks about `tx`: if it is a stripe reference still queued
    /// (not in the batch being applied, so not held), its stripe is given
    /// up (its references, this one too, leave the queue and are asked for
    /// their deltas), so the answer cannot be overtaken by the stripe.
    pub fn give_up_blocked(self: &Arc<Self>, g: GroupKey, tx: TxRef) {
        let mut groups = self.groups.lock();
        let Some(q) = groups.get_mut(&g) else { return };
        let Some(stripe) = q.queue.iter().find(|d| d.upd.tx == tx).and_then(|d| d.stripe) else {
            return;
        };
        let deltas = self.take_stripe(q, stripe);
        drop(groups);
        self.gave_up(g, stripe, deltas);
    }

    /// Drops a held delta (its write was rolled back).
    /// A stripe reference takes its whole stripe out with it (none of it
    /// is held yet: `stripes`), whose other members are asked for deltas.
    pub fn unqueue(self: &Arc<Self>, tx: TxRef) {
        self.parked.lock().remove(&tx);
        let mut gone = Vec::new();
        for (g, q) in self.groups.lock().iter_mut() {
            if let Some(s) = self.unqueue_locked(q, tx) {
                gone.push((*g, s, self.take_stripe(q, s)));
            }
        }
        self.changed.notify_waiters();
        for (g, s, deltas) in gone {
            self.gave_up(g, s, deltas);
        }
    }

    /// Takes `tx`'s delta out of a group's queue (whose lock the caller
    /// holds); returns its stripe if it was a stripe reference (the caller
    /// takes the rest of the stripe out too).
    fn unqueue_locked(&self, q: &mut GroupQueue, tx: TxRef) -> Option<u64> {
        let stripe = q.queue.iter().find(|d| d.upd.tx == tx).and_then(|d| d.stripe);
        q.queue.retain(|d| d.upd.tx != tx);
        stripe
    }

    /// For `TxStatus` (recovery asks before it decides): waits, at most
    /// `max`, for the delta of `tx` to be applied; one still queued then is
    /// taken out of the queue, as a restart would lose it, under the lock
    /// the group's worker plans under, and its b1 slot is kept for a resend
    /// (`parked`). "Received" then means journaled and not held, and
    /// nothing can apply the delta between this answer and the decision (a
    /// roll forward sends it again, a roll back discards it). Before, a
    /// delta queued behind a slow predecessor was answered "received" and
    /// could still be applied before the roll back's `DiscardTx` came:
    /// parity with the delta of a write that was undone. A delta in the
    /// batch being applied is waited for, up to `max` more; `false` when it
    /// is still being applied (the asker asks again).
    pub async fn settle_for_status(self: &Arc<Self>, g: GroupKey, tx: TxRef, max: std::time::Duration) -> bool {
        self.wait_unqueued(g, tx, max).await;
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let changed = self.changed.notified();
            let gone = {
                let mut groups = self.groups.lock();
                let Some(q) = groups.get_mut(&g) else { return true };
                if q.running.contains(&tx) {
                    None
                } else {
                    let at = q.queue.iter().position(|d| d.upd.tx == tx);
                    Some(match at.map(|i| (i, q.queue[i].stripe)) {
                        None => None,
                        // A stripe reference (its stripe completed after
                        // `give_up_blocked`): the whole stripe goes, every
                        // slot parked.
                        Some((_, Some(stripe))) => Some((Some(stripe), self.take_stripe(q, stripe))),
                        Some((i, None)) => {
                            let mut d = q.queue.remove(i);
                            if let Some(slot) = d.slot.take() {
                                self.parked.lock().insert(tx, (std::time::Instant::now(), slot));
                            }
                            Some((None, Vec::new()))
                        }
                    })
                }
            };
            match gone {
                None => {
                    if tokio::time::timeout_at(deadline, changed).await.is_err() {
                        return false;
                    }
                }
                Some(None) => return true,
                Some(Some((stripe, deltas))) => {
                    tracing::info!(iom = self.me.0, ?tx, group = ?g, "a delta still queued when recovery asked: set aside");
                    self.changed.notify_waiters();
                    if let Some(s) = stripe {
                        self.gave_up(g, s, deltas);
                    }
                    return true;
                }
            }
        }
    }

    /// Stops applying deltas to group `g` (waits for a running batch).
    pub async fn pause(&self, g: GroupKey) {
        loop {
            // Armed before the check: `notify_waiters` reaches a
            // `Notified` from its creation on.
            let changed = self.changed.notified();
            {
                let mut groups = self.groups.lock();
                let q = groups.entry(g).or_default();
                if !q.busy {
                    q.busy = true;
                    return;
                }
            }
            changed.await;
        }
    }

    /// Waits (at most `max`) until the delta of `tx` is neither queued in
    /// group `g` nor in a batch being applied; returns whether it is.
    pub async fn wait_unqueued(&self, g: GroupKey, tx: TxRef, max: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let changed = self.changed.notified();
            if !self.is_queued(g, tx) {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    /// Applies deltas to group `g` again.
    pub fn resume(self: &Arc<Self>, g: GroupKey) {
        let mut groups = self.groups.lock();
        let Some(q) = groups.get_mut(&g) else { return };
        if q.queue.is_empty() {
            groups.remove(&g);
            drop(groups);
            self.changed.notify_waiters();
            return;
        }
        let me = self.clone();
        self.workers.spawn(Tier::Protocol, "parity-group", async move { me.group_worker(g).await });
    }

    /// Recomputes the parity of group `g` from its members' map versions
    /// and installs it (recovery, rebuild of a parity block, repair), with
    /// the group's batches paused meanwhile.
    pub async fn recompute(self: &Arc<Self>, g: GroupKey) -> Result<(), Error> {
        self.pause(g).await;
        let r = self.recompute_paused(g).await;
        self.resume(g);
        r
    }

    /// `recompute` for a caller that holds the group paused.
    async fn recompute_paused(&self, g: GroupKey) -> Result<(), Error> {
        let (members, bytes) = self.group.gather(g).await?;
        self.storage.install_parity(g, members, bytes).await
    }
}

/// Serves one parity channel opened by data IOM `from`.
pub async fn run_channel(
    parity: Arc<ParitySide>,
    from: IomId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    if write_frame(&mut send, &Reply::Member(MemberResp::Ack), Bytes::new()).await.is_err() {
        return;
    }
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<ParityAck>();
    let writer = parity.workers.spawn(Tier::Connections, "parity-ack-writer", async move {
        while let Some(a) = ack_rx.recv().await {
            if write_frame(&mut send, &a, Bytes::new()).await.is_err() {
                return;
            }
        }
    });
    loop {
        match read_frame::<ParityMsg>(&mut recv).await {
            Ok(Some((ParityMsg::Update(u), delta))) => {
                if let Err(e) = parity.receive_update(u.clone(), delta, ack_tx.clone(), None) {
                    let _ = ack_tx.send(ParityAck::Failed { tx: u.tx, error: e.to_wire() });
                }
            }
            Ok(Some((ParityMsg::StripeUpdate { upd: u, stripe, crc, with_delta }, delta))) => {
                // A member whose block was not absent sent its delta: the
                // stripe's piece cannot be used.
                if with_delta {
                    parity.abandon_stripe((u.group, stripe));
                }
                let reference = (!with_delta).then_some((stripe, crc));
                if let Err(e) = parity.receive_update(u.clone(), delta, ack_tx.clone(), reference) {
                    let _ = ack_tx.send(ParityAck::Failed { tx: u.tx, error: e.to_wire() });
                }
            }
            Ok(Some((ParityMsg::WriteDone { tx }, _))) => parity.write_done(tx),
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(iom = parity.me.0, from = from.0, "parity channel closed: {e}");
                break;
            }
        }
    }
    drop(ack_tx);
    let _ = writer.await;
}

impl ParitySide {
    /// The parity block of a group and the member versions it covers. A
    /// parity block that cannot be read is recomputed from the group's data
    /// blocks first, when all of them can be read.
    pub async fn read_parity(self: &Arc<Self>, g: GroupKey) -> Result<(Vec<Version>, Bytes), Error> {
        let head = self.storage.map.parity_head(&g);
        match self.storage.read_parity(g, &head).await {
            Ok(b) => Ok((head.members, b)),
            Err(e) if crate::storage::healable(&e) && self.group.is_whole(g) => {
                tracing::error!(
                    iom = self.me.0,
                    object = g.object.0,
                    group = g.group.0,
                    "parity unreadable ({e}); recomputing it from the group's data blocks"
                );
                self.recompute(g).await?;
                self.repairs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(iom = self.me.0, object = g.object.0, group = g.group.0, "parity recomputed");
                let head = self.storage.map.parity_head(&g);
                let b = self.storage.read_parity(g, &head).await?;
                Ok((head.members, b))
            }
            Err(e) => Err(e),
        }
    }

    /// `Unfinished`: this IOM's parity-side transactions from failed IOM `i`,
    /// after applying every delta from it still held in memory. Returns the
    /// blocks with the version the parity now covers.
    pub async fn unfinished_about(self: &Arc<Self>, i: IomId) -> Vec<(BlockKey, Version)> {
        let mine: Vec<(TxRef, crate::map::PTx)> = self
            .storage
            .map
            .ptx
            .lock()
            .iter()
            .filter(|(t, p)| {
                t.iom == i
                    || self.layout.data_iom(p.group.object, self.layout.member_block(p.group.group, p.index)) == i
            })
            .map(|(t, p)| (*t, p.clone()))
            .collect();
        // All at once: a stand-in's activation waits for this answer, and
        // one after another it took up to `held_delta_wait` per transaction.
        let wait = self.timeouts.held_delta_wait;
        futures::future::join_all(mine.iter().map(|(tx, p)| self.wait_unqueued(p.group, *tx, wait))).await;
        mine.into_iter()
            .map(|(_, p)| {
                let key = BlockKey { object: p.group.object, block: self.layout.member_block(p.group.group, p.index) };
                let covers =
                    self.storage.map.parity_head(&p.group).members.get(p.index as usize).copied().unwrap_or(Version(0));
                (key, covers)
            })
            .collect()
    }

    /// b1–b4: journal the update, hold its delta, confirm receipt.
    /// Answers `Held` and `Done` for `tx` once what the journal holds is
    /// written (an update already covered, or marked by a stand-in).
    fn ack_done_after_flush(self: &Arc<Self>, tx: TxRef, acks: AckTx) {
        let me = self.clone();
        self.workers.spawn(Tier::Protocol, "parity-ack", async move {
            me.storage.journal.flush().await;
            let _ = acks.send(ParityAck::Held { tx });
            let _ = acks.send(ParityAck::Done { tx });
        });
    }

    /// A resend of an update whose delta is in the batch being applied:
    /// answered once that batch is done, from what is known then: applied
    /// (after a flush), or queued again by a repair (held). Never queued a
    /// second time here: a delta `settle_for_status` set aside or a failed
    /// repair dropped meanwhile must not come back behind a decision; the
    /// sender hears "unavailable" and sends it again later.
    fn answer_after_running(self: &Arc<Self>, u: ParityUpdate, acks: AckTx) {
        let me = self.clone();
        self.workers.spawn(Tier::Protocol, "parity-resend-wait", async move {
            let tx = u.tx;
            let queued = loop {
                let changed = me.changed.notified();
                {
                    let groups = me.groups.lock();
                    let q = groups.get(&u.group);
                    if !q.is_some_and(|q| q.running.contains(&tx)) {
                        break q.is_some_and(|q| q.queue.iter().any(|d| d.upd.tx == tx));
                    }
                }
                changed.await;
            };
            let applied = me.storage.map.ptx.lock().get(&tx).is_some_and(|p| p.applied.is_some());
            if applied {
                me.ack_done_after_flush(tx, acks);
            } else if queued {
                let _ = acks.send(ParityAck::Held { tx });
            } else {
                let error =
                    WireError::new(ErrorCode::Unavailable, "the parity update's batch did not complete; send it again");
                let _ = acks.send(ParityAck::Failed { tx, error });
            }
        });
    }

    /// `reference`: `Some((stripe, crc))` for a `StripeUpdate` without its
    /// delta, which comes with the stripe's piece (`stripes`).
    fn receive_update(
        self: &Arc<Self>,
        u: ParityUpdate,
        delta: Bytes,
        acks: AckTx,
        reference: Option<(u64, u32)>,
    ) -> Result<(), Error> {
        let n = self.layout.n();
        let role = self.layout.parity_iom(u.group.object, u.group.group);
        if role != self.me {
            // Open before the frozen check: a handover's freeze either
            // waits for this update's a13 or this update sees the freeze.
            self.handover.parity_opened(u.tx, role, u.group);
            if !self.member.is_standin_for(role) || self.handover.is_frozen(role) {
                self.handover.parity_refused(u.tx);
                return Err(Error::Wire(WireError::new(
                    ErrorCode::NotServing,
                    format!("IOM {} does not hold parity of group {:?}", self.me, u.group),
                )));
            }
            // Stand-in for a failed parity IOM: the group's parity will be
            // recomputed when it comes back; remember that, durably.
            self.handover.touched(role, u.group);
            self.storage.mark_group(role, u.group);
            self.ack_done_after_flush(u.tx, acks);
            return Ok(());
        }
        if u.index >= n || u.new != u.old.next() || u.delta_offset as usize + delta.len() > self.block_size as usize {
            return Err(Error::BadRequest(format!("malformed parity update {u:?}")));
        }
        self.deltas.fetch_add(1, Ordering::Relaxed);

        self.prune_parked();
        if reference.is_some() && (u.delta_offset != 0 || !delta.is_empty()) {
            return Err(Error::BadRequest(format!("stripe reference with a delta {u:?}")));
        }
        // A resent update: answer from what is known.
        let known = self.storage.map.ptx.lock().get(&u.tx).cloned();
        if let Some(pt) = known {
            if pt.applied.is_some() {
                self.ack_done_after_flush(u.tx, acks);
                return Ok(());
            }
            if reference.is_some() {
                // References are sent once; a resend carries its delta.
                let _ = acks.send(ParityAck::NeedDelta { tx: u.tx });
                return Ok(());
            }
            let mut groups = self.groups.lock();
            let q = groups.entry(u.group).or_default();
            if let Some(d) = q.queue.iter_mut().find(|d| d.upd.tx == u.tx) {
                if let Some(stripe) = d.stripe {
                    // A stripe reference sent again with its delta (its
                    // channel broke): it holds its own delta from now on,
                    // and its stripe is given up under this lock, so that
                    // no completion can slip in between (none of it is
                    // held yet); the other members are asked for theirs.
                    d.delta = delta;
                    d.stripe = None;
                    d.ready = false;
                    d.acks = acks.clone();
                    let written = d.written.take();
                    let deltas = self.take_stripe(q, stripe);
                    self.kick(q, u.group);
                    drop(groups);
                    self.gave_up(u.group, stripe, deltas);
                    self.held_after(vec![(u.tx, acks)], written.into_iter().collect());
                    return Ok(());
                }
                let _ = acks.send(ParityAck::Held { tx: u.tx });
                return Ok(());
            }
            if q.running.contains(&u.tx) {
                // In the batch being applied: answered once that batch is
                // done (applied, or put back in the queue by a repair),
                // never by a second copy queued beside it.
                drop(groups);
                self.answer_after_running(u, acks);
                return Ok(());
            }
            // Journaled before a restart but its delta was lost: hold it again.
            let _ = acks.send(ParityAck::Held { tx: u.tx });
            // A reference whose stripe was given up finds the slot it
            // reserved at b1.
            let slot = self.parked.lock().remove(&u.tx).map(|(_, s)| s);
            self.enqueue(q, u.group, Delta::new(u, delta, acks, slot));
            return Ok(());
        }

        // Before b1: the space the new parity version will take. An update
        // this IOM could not store is refused now (`NoSpace`, the writer
        // gets ENOSPC and its data IOM rolls the write back), never accepted
        // and then failed at b5. Only when a later version of the same
        // block is already held (a resend overtaken by its successor) is
        // the update taken without a slot: refusing it would undo a write
        // its writer was told succeeded.
        let reserved =
            if self.storage.journal.short_of_space() { Err(Error::NoSpace) } else { self.storage.store.reserve_slot() };
        let slot = match reserved {
            Ok(s) => Some(s),
            Err(Error::NoSpace) if !self.later_held(&u) => {
                self.no_space.fetch_add(1, Ordering::Relaxed);
                return Err(Error::NoSpace);
            }
            Err(_) => None,
        };

        // b1: journal "update parity received".
        let rec = Record::Received { tx: u.tx, group: u.group, index: u.index, old: u.old, new: u.new };
        if let Some((stripe, crc)) = reference {
            // Held only once its stripe is complete and its batch has read
            // the old parity (`apply_batch`). Journaled and queued under the
            // queue's lock: a resend sees it in the queue once b1 is in
            // the transaction table.
            let (group, index, tx) = (u.group, u.index, u.tx);
            {
                let mut groups = self.groups.lock();
                let written = self.storage.commit(&rec, false, Wait::Written);
                let q = groups.entry(group).or_default();
                let mut d = Delta::new(u, delta, acks, slot);
                d.stripe = Some(stripe);
                d.written = written;
                q.queue.push(d);
            }
            crate::crash_point_sync!(self, "parity::after-b1");
            crate::crash_point_sync!(self, "stripe::after-reference");
            let r = stripes::Ref { tx, index, crc };
            let (new, step) = self.stripes.lock().reference((group, stripe), self.layout.n(), r);
            self.stripe_step(group, stripe, new, step);
            return Ok(());
        }
        let written = self.storage.commit(&rec, false, Wait::Written);
        crate::crash_point_sync!(self, "parity::after-b1");
        // b2: the delta came with the request (pushed by D, DESIGN a8).
        // b4: hold the delta and confirm receipt once b1 is written.
        let tx = u.tx;
        match written {
            // b1 is written already (appends write in place): confirm at once.
            None => {
                let _ = acks.send(ParityAck::Held { tx });
                crate::crash_point_sync!(self, "parity::after-b4");
            }
            Some(w) => {
                let ack = acks.clone();
                let me4 = self.clone();
                self.workers.spawn(Tier::Protocol, "parity-ack", async move {
                    let _ = w.await;
                    let _ = ack.send(ParityAck::Held { tx });
                    crash_point!(&me4, "parity::after-b4");
                });
            }
        }
        let group = u.group;
        crate::crash_point_sync!(self, "parity::after-b2");
        let mut groups = self.groups.lock();
        let q = groups.entry(group).or_default();
        self.enqueue(q, group, Delta::new(u, delta, acks, slot));
        Ok(())
    }

    /// The client's piece of stripe `stripe` of group `g` (`DataReq::StripeParity`).
    pub fn take_piece(self: &Arc<Self>, g: GroupKey, stripe: u64, crcs: Vec<u32>, piece: Bytes) -> Result<(), Error> {
        if self.layout.parity_iom(g.object, g.group) != self.me {
            // A stand-in keeps no parity for its failed IOM: nothing to take.
            return Ok(());
        }
        if piece.len() > self.block_size as usize {
            return Err(Error::BadRequest(format!("stripe piece of {} bytes: more than a block", piece.len())));
        }
        let (new, step) = self.stripes.lock().piece((g, stripe), self.layout.n(), piece, crcs);
        crate::crash_point_sync!(self, "stripe::after-piece");
        self.stripe_step(g, stripe, new, step);
        Ok(())
    }

    /// Acts on what a piece or reference made of its stripe: a new stripe
    /// gets a timer, a complete one becomes applicable, an abandoned one's
    /// references are asked for their deltas.
    fn stripe_step(self: &Arc<Self>, g: GroupKey, stripe: u64, new: bool, step: stripes::Step) {
        match step {
            stripes::Step::Waiting => {
                if new {
                    let me = self.clone();
                    self.workers.spawn(Tier::Protocol, "stripe-timer", async move {
                        tokio::time::sleep(stripes::STRIPE_WAIT).await;
                        if me.stripes.lock().is_open(&(g, stripe)) {
                            tracing::debug!(iom = me.me.0, ?g, stripe, "stripe incomplete; asking for deltas");
                            me.abandon_stripe((g, stripe));
                        }
                    });
                }
            }
            stripes::Step::Complete { piece, refs } => {
                let mut groups = self.groups.lock();
                let q = groups.entry(g).or_default();
                // Applicable only if the queue holds exactly the references
                // the table counted (one may have been sent again with its
                // delta, or discarded, meanwhile): otherwise given up.
                let queued: Vec<TxRef> =
                    q.queue.iter().filter(|d| d.stripe == Some(stripe)).map(|d| d.upd.tx).collect();
                let whole = queued.len() == refs.len() && refs.iter().all(|r| queued.contains(&r.tx));
                if !whole {
                    let deltas = self.take_stripe(q, stripe);
                    drop(groups);
                    self.gave_up(g, stripe, deltas);
                    return;
                }
                let mut carrier = true;
                for d in q.queue.iter_mut().filter(|d| d.stripe == Some(stripe)) {
                    d.ready = true;
                    if carrier {
                        d.delta = piece.clone();
                        carrier = false;
                    }
                }
                self.kick(q, g);
            }
            stripes::Step::Abandoned { first, .. } => self.ask_deltas(g, stripe, first),
        }
    }

    /// Gives stripe `k` up (if open) and asks its references for their deltas.
    fn abandon_stripe(self: &Arc<Self>, k: stripes::StripeKey) {
        let step = self.stripes.lock().abandon(k);
        if let stripes::Step::Abandoned { first, .. } = step {
            self.ask_deltas(k.0, k.1, first);
        }
    }

    /// The references of an abandoned stripe leave the queue (none was held
    /// yet: held comes only with their batch) and their data IOMs are asked
    /// for their deltas once their b1 records are written; a resend is then
    /// held like one after a restart.
    /// `first`: this gave the stripe up (counted once).
    fn ask_deltas(self: &Arc<Self>, g: GroupKey, stripe: u64, first: bool) {
        if first {
            metrics::counter!("iomfs_iom_stripes_total", "outcome" => "abandoned").increment(1);
        }
        let out = {
            let mut groups = self.groups.lock();
            match groups.get_mut(&g) {
                Some(q) => {
                    let gone = self.take_stripe(q, stripe);
                    if q.queue.is_empty() && !q.busy {
                        groups.remove(&g);
                    }
                    gone
                }
                None => Vec::new(),
            }
        };
        self.need_deltas(out);
    }

    /// A stripe given up after its references were taken out of the queue
    /// (`take_stripe`, under the queue's lock): counted once, and each
    /// reference's data IOM asked for its delta.
    fn gave_up(self: &Arc<Self>, g: GroupKey, stripe: u64, deltas: Vec<Delta>) {
        if let stripes::Step::Abandoned { first: true, .. } = self.stripes.lock().abandon((g, stripe)) {
            metrics::counter!("iomfs_iom_stripes_total", "outcome" => "abandoned").increment(1);
        }
        self.need_deltas(deltas);
    }

    /// Asks the data IOMs of these references (out of the queue, none held)
    /// for their deltas, each once its b1 record is written.
    fn need_deltas(self: &Arc<Self>, deltas: Vec<Delta>) {
        self.changed.notify_waiters();
        if deltas.is_empty() {
            return;
        }
        self.workers.spawn(Tier::Protocol, "stripe-need-delta", async move {
            for d in deltas {
                if let Some(w) = d.written {
                    let _ = w.await;
                }
                let _ = d.acks.send(ParityAck::NeedDelta { tx: d.upd.tx });
            }
        });
    }

    /// Sends "held" to each `(tx, acks)` once every record in `written` is written.
    fn held_after(self: &Arc<Self>, to: Vec<(TxRef, AckTx)>, written: Vec<tokio::sync::oneshot::Receiver<()>>) {
        self.workers.spawn(Tier::Protocol, "parity-ack", async move {
            for w in written {
                let _ = w.await;
            }
            for (tx, a) in to {
                let _ = a.send(ParityAck::Held { tx });
            }
        });
    }

    /// Whether a later version of `u`'s block than `u` makes is queued here.
    fn later_held(&self, u: &ParityUpdate) -> bool {
        self.groups
            .lock()
            .get(&u.group)
            .is_some_and(|q| q.queue.iter().any(|d| d.upd.index == u.index && d.upd.old >= u.new))
    }

    fn enqueue(self: &Arc<Self>, q: &mut GroupQueue, group: GroupKey, d: Delta) {
        q.queue.push(d);
        self.kick(q, group);
    }

    /// Starts group `group`'s worker unless it runs (the queue's lock held).
    fn kick(self: &Arc<Self>, q: &mut GroupQueue, group: GroupKey) {
        if !q.busy {
            q.busy = true;
            let me = self.clone();
            self.workers.spawn(Tier::Protocol, "parity-group", async move { me.group_worker(group).await });
        }
    }

    /// b3–b12 for one group, batch after batch, until nothing can be applied.
    async fn group_worker(self: Arc<Self>, g: GroupKey) {
        let mut waited = false;
        loop {
            match self.next_batch(g, waited) {
                Next::Wait => {
                    // Deltas of one stripe usually arrive together: give the
                    // rest a moment so they share one parity write.
                    waited = true;
                    tokio::time::sleep(self.timeouts.stripe_gather).await;
                }
                Next::Idle => return,
                Next::Batch(head, members, batch) => {
                    waited = true;
                    let applied = self.apply_batch(g, head, members, batch).await;
                    if let Some(q) = self.groups.lock().get_mut(&g) {
                        q.running.clear();
                    }
                    self.changed.notify_waiters();
                    if let Err(e) = applied {
                        if matches!(e, Error::Io { .. } | Error::NoSpace) {
                            // The deltas of this batch are held (b1) but cannot
                            // be applied here: stop, like a failed fsync. The
                            // proxy takes the role over, the data IOMs resend
                            // what is unanswered to it, and a restart replays.
                            tracing::error!(
                                iom = self.me.0,
                                group = ?g,
                                "parity cannot be stored ({e}); stopping this IOM so its proxy takes over"
                            );
                            eprintln!("iom-server: parity cannot be stored ({e}); stopping");
                            std::process::exit(70);
                        }
                        tracing::error!(iom = self.me.0, group = ?g, "parity update failed: {e}");
                    }
                }
            }
        }
    }

    /// Takes every queued delta that can be applied now: each member's
    /// updates in version order, starting from the parity head.
    fn next_batch(self: &Arc<Self>, g: GroupKey, waited: bool) -> Next {
        let mut groups = self.groups.lock();
        let Some(q) = groups.get_mut(&g) else {
            return Next::Idle;
        };
        q.queue.sort_by_key(|d| (d.upd.index, d.upd.old));
        let queued: Vec<plan::Queued> = q
            .queue
            .iter()
            .map(|d| plan::Queued {
                index: d.upd.index,
                old: d.upd.old,
                new: d.upd.new,
                hint: d.upd.hint,
                stripe: d.stripe,
                blocked: d.stripe.is_some() && !d.ready,
            })
            .collect();
        if plan::should_wait(&queued, waited) {
            return Next::Wait;
        }
        let head = self.storage.map.parity_head(&g);
        let (members, fates) = plan::plan_batch(&queued, &head.members);
        let mut batch = Vec::new();
        let mut rest = Vec::new();
        let mut stale = Vec::new();
        for (d, fate) in q.queue.drain(..).zip(fates) {
            match fate {
                plan::Fate::Take => batch.push(d),
                plan::Fate::Stale => stale.push(d),
                plan::Fate::Keep => rest.push(d),
            }
        }
        q.queue = rest;
        // A stripe reference the parity already covers cannot happen (no
        // member switches before its stripe's batch holds it); should one
        // appear, the rest of its stripe cannot use the piece: taken out
        // here, under the same lock as the plan (which kept them).
        let split: Vec<u64> = stale.iter().filter_map(|d| d.stripe).collect();
        let mut given_up = Vec::new();
        for s in split {
            tracing::warn!(iom = self.me.0, group = ?g, stripe = s, "stripe reference already covered; giving it up");
            given_up.push((s, self.take_stripe(q, s)));
        }
        if batch.is_empty() {
            q.busy = false;
            if q.queue.is_empty() {
                groups.remove(&g);
            }
        } else {
            q.running = batch.iter().map(|d| d.upd.tx).collect();
        }
        drop(groups);
        self.changed.notify_waiters();
        for (s, deltas) in given_up {
            self.gave_up(g, s, deltas);
        }
        for d in stale {
            let Delta { upd, acks, .. } = d;
            if batch.iter().any(|b| b.upd.tx == upd.tx) {
                // A second copy of an update this batch applies (a resend
                // queued beside its original): answered once the batch's
                // record is durable. Answered "done" and journaled
                // `Discarded` here, a crash before that record left the
                // update discarded while its data IOM went on as if the
                // parity held it.
                self.answer_after_running(upd, acks);
                continue;
            }
            // Already covered by the parity (applied by an earlier batch,
            // or a parity recomputed from the data): answered once what
            // the journal holds is on disk.
            if self.storage.map.ptx.lock().get(&upd.tx).is_some_and(|p| p.applied.is_none()) {
                self.storage.commit(&Record::Discarded { tx: upd.tx }, false, Wait::Nothing);
            }
            self.ack_done_after_flush(upd.tx, acks);
        }
        if batch.is_empty() {
            Next::Idle
        } else {
            Next::Batch(head, members, batch)
        }
    }

    async fn apply_batch(
        self: &Arc<Self>,
        g: GroupKey,
        old: PVerRef,
        members: Vec<common::Version>,
        mut batch: Vec<Delta>,
    ) -> Result<(), Error> {
        // b3: the old parity block, from the buffer or the disk (zeros if none).
        let old_bytes = match self.storage.read_parity(g, &old).await {
            Ok(b) => b,
            Err(e) => return self.repair_parity(g, e, batch).await,
        };
        crash_point!(self, "parity::after-b3");
        // Stripe references are held from here: this batch is applied or
        // the IOM stops (see `stripes`).
        let held: Vec<(TxRef, AckTx)> =
            batch.iter().filter(|d| d.stripe.is_some()).map(|d| (d.upd.tx, d.acks.clone())).collect();
        if !held.is_empty() {
            let written = batch.iter_mut().filter_map(|d| d.written.take()).collect();
            let stripes = batch.iter().filter_map(|d| d.stripe).collect::<std::collections::HashSet<_>>().len();
            metrics::counter!("iomfs_iom_stripes_total", "outcome" => "applied").increment(stripes as u64);
            self.held_after(held, written);
            crash_point!(self, "stripe::after-held");
        }
        // b5: a new parity address (a slot reserved at b1) and buffer.
        let addr = match batch.iter_mut().find_map(|d| d.slot.take()) {
            Some(s) => s.take(),
            None => self.storage.store.alloc()?,
        };
        let len = batch
            .iter()
            .map(|d| d.upd.delta_offset as usize + d.delta.len())
            .chain(std::iter::once(old_bytes.len()))
            .max()
            .unwrap_or(0);
        let mut buf = BytesMut::zeroed(len);
        buf[..old_bytes.len()].copy_from_slice(&old_bytes);
        crash_point!(self, "parity::after-b5");
        // b6: new parity = old parity XOR every delta.
        for d in &batch {
            let off = d.upd.delta_offset as usize;
            xor_into(&mut buf[off..off + d.delta.len()], &d.delta);
        }
        crash_point!(self, "parity::after-b6");
        // b7: old-parity and delta buffers released.
        drop(old_bytes);
        let txs: Vec<TxRef> = batch.iter().map(|d| d.upd.tx).collect();
        let urgent = batch.iter().any(|d| d.upd.durable);
        let acks: Vec<(TxRef, AckTx)> = batch.into_iter().map(|d| (d.upd.tx, d.acks)).collect();
        crash_point!(self, "parity::after-b7");
        // b8: issue the write of the new parity at the new address.
        let bytes = buf.freeze();
        self.storage.store.write(addr, &bytes)?;
        if urgent {
            self.storage.store.start_writeback(addr, bytes.len());
        }
        self.writes.fetch_add(1, Ordering::Relaxed);
        crash_point!(self, "parity::after-b8");
        let new = PVerRef {
            seq: self.storage.map.next_pseq(),
            addr: Some(addr),
            len: bytes.len() as u32,
            crc: codec::crc(&bytes),
            members,
        };
        self.storage.cache.put(CacheKey::Parity(g, new.seq), bytes);
        // b9 + b10 + b11: the write completes (block file synced before the
        // record), the parity map switches, "update parity completed" is journaled.
        let rec = Record::ParityDone { group: g, old, new, txs };
        let durable = self.storage.commit(&rec, true, if urgent { Wait::Durable } else { Wait::DurableLazy });
        crash_point!(self, "parity::after-b9");
        crash_point!(self, "parity::after-b10");
        // b12: tell each data IOM, once the record is durable.
        let me = self.clone();
        self.workers.spawn(Tier::Protocol, "parity-b12", async move {
            if let Some(d) = durable {
                let _ = d.await;
            }
            crash_point!(&me, "parity::after-b11");
            for (tx, a) in acks {
                let _ = a.send(ParityAck::Done { tx });
            }
            crash_point!(&me, "parity::after-b12");
        });
        Ok(())
    }

    /// b3 failed: the group's parity cannot be read (checksum mismatch or
    /// I/O error). Its data IOMs still hold every member, so the parity is
    /// recomputed from them while this worker holds the group, and the
    /// batch goes back in the queue: deltas the new parity already covers
    /// are answered as stale, the rest are applied to it. Only when the
    /// recomputation fails too do the writers hear `Failed`: `Corrupt` when
    /// a member is damaged as well (two faults in one group; the write
    /// fails), `Unavailable` otherwise (the data IOM sends it again later).
    async fn repair_parity(self: &Arc<Self>, g: GroupKey, e: Error, batch: Vec<Delta>) -> Result<(), Error> {
        tracing::error!(
            iom = self.me.0,
            object = g.object.0,
            group = g.group.0,
            "parity unreadable ({e}); recomputing it from the group's data blocks"
        );
        match self.recompute_paused(g).await {
            Ok(()) => {
                self.repairs.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(iom = self.me.0, object = g.object.0, group = g.group.0, "parity recomputed");
                let mut groups = self.groups.lock();
                groups.entry(g).or_default().queue.extend(batch);
                Ok(())
            }
            Err(e2) => {
                // A damaged member as well: the group has lost a block, and
                // resending will not bring it back. Anything else may pass.
                let code =
                    if e2.to_wire().code == ErrorCode::Corrupt { ErrorCode::Corrupt } else { ErrorCode::Unavailable };
                let error = WireError::new(
                    code,
                    format!(
                        "parity of object {} group {} on IOM {} is unreadable ({e}) and could not be recomputed ({e2})",
                        g.object, g.group, self.me
                    ),
                );
                for d in &batch {
                    let _ = d.acks.send(ParityAck::Failed { tx: d.upd.tx, error: error.clone() });
                }
                Err(e2)
            }
        }
    }

    /// b13: a data IOM's write completed; free the old parity once every
    /// transaction of its batch has.
    pub fn write_done(self: &Arc<Self>, tx: TxRef) {
        self.prune_parked();
        if let Some((owner, g)) = self.handover.parity_closed(tx) {
            // A stand-in's update: its data is in place now. A rebuild
            // round may have cleared the group's mark after reading the
            // member's old version: mark it again (see `HandoverState`).
            self.storage.mark_group(owner, g);
            return;
        }
        let Some((g, seq)) = self.storage.map.ptx.lock().get(&tx).and_then(|p| p.applied.map(|s| (p.group, s))) else {
            return;
        };
        {
            // The data IOM made this transaction's a14 durable before a13:
            // its store holds it from now on (see `done_seen`).
            let mut seen = self.storage.map.done_seen.lock();
            let e = seen.entry(tx.iom).or_insert(0);
            *e = (*e).max(tx.tx.0);
        }
        let complete = {
            let mut a = self.storage.map.awaiting.lock();
            match a.get_mut(&(g, seq)) {
                Some(set) => {
                    set.remove(&tx);
                    set.is_empty()
                }
                None => false,
            }
        };
        if complete {
            self.storage.commit(&Record::ParityFreed { group: g, seq }, false, Wait::Nothing);
            crate::crash_point_sync!(self, "parity::after-b13");
            self.storage.cache.remove(&CacheKey::Parity(g, seq));
        }
    }
}
