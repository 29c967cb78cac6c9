//! Parity channels, data side: one long-lived QUIC stream from this IOM to
//! whoever serves each parity role, carrying "update parity" with its delta
//! (a6/a8) and "write completed" (a13); "delta held" (b4) and "parity
//! completed" (b12) come back on the same stream.
//!
//! Updates stay here until the parity IOM completes them, so a broken
//! stream is reopened (to the role's current server: itself, or its proxy
//! after a failure) and everything unfinished is sent again, in transaction
//! order. The parity side ignores what it already has.

use crate::caller::RoleCaller;
use crate::inflight::Inflight;
use crate::membership::Membership;
use crate::timeouts::Timeouts;
use crate::workers::{Tier, Workers};
use bytes::Bytes;
use common::wire::{ErrorCode, MemberResp, ParityAck, ParityMsg, ParityUpdate, Reply, Request};
use common::{IomId, TxId, TxRef};
use net::frame::{read_frame, write_frame};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// An update's client stripe (`DataReq::WriteStriped`).
#[derive(Clone, Copy, Debug)]
pub struct StripeTag {
    pub id: u64,
    /// The new block's checksum.
    pub crc: u32,
    /// The block was absent: its delta is its new bytes, which the
    /// stripe's piece sums, so a reference goes instead of the delta.
    pub reference: bool,
}

struct PendingUpdate {
    upd: ParityUpdate,
    delta: Bytes,
    /// The update's stripe while it was never sent: its first send may be
    /// a reference (a channel opened after it was queued sends it too);
    /// any later send carries the delta.
    unsent_stripe: Option<StripeTag>,
    held: Option<oneshot::Sender<Result<(), Refused>>>,
    done: Option<oneshot::Sender<()>>,
    /// When it was queued (a6), for the round-trip metrics.
    sent: std::time::Instant,
}

/// The parity IOM refused an update for lack of space (b1), or refused an
/// earlier version of the same block, which this update builds on: its
/// writer gets ENOSPC and the data side rolls it back.
#[derive(Clone, Copy, Debug)]
pub struct Refused {
    /// The parity IOM may hold this update (it was sent before the refusal
    /// of its predecessor came back): tell it to discard it.
    pub discard: bool,
}

/// "Held" (b4) or refused, for one update.
pub type HeldRx = oneshot::Receiver<Result<(), Refused>>;

/// A block's place in its parity group: (group, index).
type Member = (common::GroupKey, u32);

/// A message for the stream, with its payload (the delta).
type Out = (ParityMsg, Bytes);

#[derive(Default)]
struct LinkState {
    pending: BTreeMap<TxId, PendingUpdate>,
    out: Option<mpsc::UnboundedSender<Out>>,
    /// The channel's connection speaks stripe references (protocol 10).
    stripes_ok: bool,
    /// "write completed" notices not yet sent (stream down).
    backlog: Vec<TxRef>,
    /// Blocks whose refused updates are being rolled back, with how many
    /// are left: a new update of such a block would build on a version
    /// that is going away, so it is refused here at once.
    rolling_back: std::collections::HashMap<Member, usize>,
}

#[derive(Default)]
struct Link {
    state: Mutex<LinkState>,
    started: AtomicBool,
}

/// The data side's parity channels, one per parity role. Holds the
/// membership (who serves a role), the caller (connections), the
/// in-flight table (links end after the last write) and the workers;
/// never the node.
pub struct Links {
    me: IomId,
    member: Arc<Membership>,
    caller: Arc<RoleCaller>,
    inflight: Arc<Inflight>,
    workers: Arc<Workers>,
    timeouts: Timeouts,
    links: Vec<Link>,
}

impl Links {
    pub fn new(
        me: IomId,
        width: u32,
        member: Arc<Membership>,
        caller: Arc<RoleCaller>,
        inflight: Arc<Inflight>,
        workers: Arc<Workers>,
        timeouts: Timeouts,
    ) -> Links {
        Links { me, member, caller, inflight, workers, timeouts, links: (0..width).map(|_| Link::default()).collect() }
    }

    /// a6/a8: queues an update for the parity role `role`; returns receivers
    /// for "held" (b4) and "completed" (b12). With `stripe`, the first
    /// send is a `StripeUpdate` (a reference when the tag says so) if the
    /// channel speaks it; any resend carries the delta.
    pub fn send_update(
        self: &Arc<Self>,
        role: IomId,
        upd: ParityUpdate,
        delta: Bytes,
        stripe: Option<StripeTag>,
    ) -> (HeldRx, oneshot::Receiver<()>) {
        let (ht, hr) = oneshot::channel();
        let (dt, dr) = oneshot::channel();
        let link = &self.links[role.0 as usize];
        {
            let mut s = link.state.lock();
            if let Some(n) = s.rolling_back.get_mut(&(upd.group, upd.index)) {
                *n += 1;
                let _ = ht.send(Err(Refused { discard: false }));
                return (hr, dr);
            }
            let mut unsent_stripe = stripe;
            if let Some(out) = &s.out {
                let _ = out.send(first_send(&upd, &delta, unsent_stripe.take(), s.stripes_ok));
            }
            s.pending.insert(
                upd.tx.tx,
                PendingUpdate {
                    upd,
                    delta,
                    unsent_stripe,
                    held: Some(ht),
                    done: Some(dt),
                    sent: std::time::Instant::now(),
                },
            );
        }
        self.ensure_started(role);
        (hr, dr)
    }

    /// a13: tells the parity role the write completed.
    pub fn send_write_done(self: &Arc<Self>, role: IomId, tx: TxRef) {
        let link = &self.links[role.0 as usize];
        let mut s = link.state.lock();
        s.pending.remove(&tx.tx);
        match &s.out {
            Some(out) if out.send((ParityMsg::WriteDone { tx }, Bytes::new())).is_ok() => {}
            _ => s.backlog.push(tx),
        }
        drop(s);
        self.ensure_started(role);
    }

    /// Whether this IOM's update `tx` (to any parity role) waits for its
    /// parity IOM or its a13 (a stand-in's write still runs until then).
    pub fn is_pending(&self, tx: TxId) -> bool {
        self.links.iter().any(|l| l.state.lock().pending.contains_key(&tx))
    }

    /// Updates not yet completed by the parity role (for recovery and status).
    pub fn unfinished(&self, role: IomId) -> Vec<TxRef> {
        self.links[role.0 as usize].state.lock().pending.values().map(|p| p.upd.tx).collect()
    }

    /// One refused update of `upd`'s block is rolled back: once all are,
    /// new updates of the block go out again.
    pub fn rolled_back(&self, role: IomId, upd: (common::GroupKey, u32)) {
        let mut s = self.links[role.0 as usize].state.lock();
        if let Some(n) = s.rolling_back.get_mut(&upd) {
            *n -= 1;
            if *n == 0 {
                s.rolling_back.remove(&upd);
            }
        }
    }

    /// Tells whoever serves `role` to discard update `tx` (rolled back here).
    pub async fn discard(&self, role: IomId, tx: TxRef) -> Result<(), crate::Error> {
        self.caller.rpc_recovery_role(role, common::wire::RecoveryReq::DiscardTx { tx }).await.map(|_| ())
    }

    /// Forgets updates recovery resolved another way; their waiters see failure.
    pub fn forget(&self, role: IomId, txs: &[TxId]) {
        let mut s = self.links[role.0 as usize].state.lock();
        for t in txs {
            s.pending.remove(t);
        }
    }

    fn ensure_started(self: &Arc<Self>, role: IomId) {
        let link = &self.links[role.0 as usize];
        if !link.started.swap(true, Ordering::AcqRel) {
            let me = self.clone();
            self.workers.spawn(Tier::Protocol, "parity-link", async move { supervise(me, role).await });
        }
    }
}

/// Keeps the channel to `role` open for as long as the IOM runs.
async fn supervise(l: Arc<Links>, role: IomId) {
    let mut backoff = l.timeouts.link_backoff_min;
    let mut epochs = l.member.subscribe();
    loop {
        if l.workers.stopping(Tier::Protocol) && l.inflight.is_empty() {
            return;
        }
        let Some(server) = l.member.server_for(role) else {
            // No IOM serves the role: wait for a map that names one, or a
            // stop once every write transaction has finished.
            tokio::select! {
                _ = epochs.changed() => {}
                _ = stop_after_writes(&l) => {}
            }
            continue;
        };
        match run_stream(&l, role, server, &mut epochs).await {
            Ok(()) => backoff = l.timeouts.link_backoff_min,
            Err(e) => {
                tracing::debug!(iom = l.me.0, role = role.0, server = server.0, "parity channel: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(l.timeouts.link_backoff_max);
            }
        }
    }
}

/// Completes when the links must end: the protocol tier is stopping and
/// every write transaction has finished (their a13 messages are queued).
async fn stop_after_writes(l: &Links) {
    l.workers.token(Tier::Protocol).cancelled().await;
    l.inflight.wait_all().await
}

async fn run_stream(
    l: &Arc<Links>,
    role: IomId,
    server: IomId,
    epochs: &mut tokio::sync::watch::Receiver<common::Epoch>,
) -> Result<(), String> {
    let link = &l.links[role.0 as usize];
    let conn = l.caller.conn(server).await.map_err(|e| e.to_string())?;
    let stripes_ok = l.caller.version(server).await.is_ok_and(|v| v >= common::wire::SINCE_STRIPE);
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let open = Request::ParityChannel { from: l.me, epoch: l.member.epoch() };
    write_frame(&mut send, &open, Bytes::new()).await.map_err(|e| e.to_string())?;
    match read_frame::<Reply>(&mut recv).await.map_err(|e| e.to_string())? {
        Some((Reply::Member(MemberResp::Ack), _)) => {}
        Some((Reply::Error(e), _)) => return Err(format!("refused: {e}")),
        other => return Err(format!("unexpected channel reply {other:?}")),
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    {
        let mut s = link.state.lock();
        for p in s.pending.values_mut() {
            let _ = tx.send(first_send(&p.upd, &p.delta, p.unsent_stripe.take(), stripes_ok));
        }
        for t in std::mem::take(&mut s.backlog) {
            let _ = tx.send((ParityMsg::WriteDone { tx: t }, Bytes::new()));
        }
        s.out = Some(tx);
        s.stripes_ok = stripes_ok;
    }
    let mut writer = l.workers.spawn(Tier::Protocol, "parity-link-writer", async move {
        while let Some((m, payload)) = rx.recv().await {
            if write_frame(&mut send, &m, payload).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
    // Made once, not for every acknowledgement the loop below takes.
    let stop = stop_after_writes(l);
    tokio::pin!(stop);
    let mut stopping = false;
    let result = loop {
        tokio::select! {
            f = read_frame::<ParityAck>(&mut recv) => match f {
                Ok(Some((ack, _))) => on_ack(l, role, ack),
                Ok(None) => break Err("parity IOM closed the channel".to_string()),
                Err(e) => break Err(e.to_string()),
            },
            _ = epochs.changed() => {
                if l.member.server_for(role) != Some(server) {
                    break Ok(());
                }
            }
            _ = &mut stop => {
                stopping = true;
                break Ok(());
            }
        }
    };
    link.state.lock().out = None;
    if stopping {
        // The last a13 ("write completed") messages may still be queued:
        // with the sender gone, the writer sends them and finishes.
        if tokio::time::timeout(l.timeouts.stop_tier, &mut writer).await.is_err() {
            writer.abort();
        }
    } else {
        writer.abort();
    }
    result
}

/// The message that sends an update: a `StripeUpdate` for an update of a
/// client stripe on a channel that speaks it (a reference without the
/// delta if the tag says so), an `Update` with its delta otherwise.
fn first_send(upd: &ParityUpdate, delta: &Bytes, stripe: Option<StripeTag>, stripes_ok: bool) -> Out {
    match stripe.filter(|_| stripes_ok) {
        Some(t) => (
            ParityMsg::StripeUpdate { upd: upd.clone(), stripe: t.id, crc: t.crc, with_delta: !t.reference },
            if t.reference { Bytes::new() } else { delta.clone() },
        ),
        None => (ParityMsg::Update(upd.clone()), delta.clone()),
    }
}

/// b1 refused `tx` for lack of space: its writer and the writers of every
/// later update of the same block hear it now, and the block takes no new
/// update until the data side has rolled them all back. Nothing is
/// refused (false: the refusal is handled like one that can pass, the
/// update sent again later) if this or a later update of the block was
/// already held, as a writer may have been told it succeeded.
fn refuse(s: &mut LinkState, tx: TxId) -> bool {
    let Some(p) = s.pending.get(&tx) else {
        return true;
    };
    let member = (p.upd.group, p.upd.index);
    let chain: Vec<TxId> =
        s.pending.range(tx..).filter(|(_, q)| (q.upd.group, q.upd.index) == member).map(|(t, _)| *t).collect();
    if chain.iter().any(|t| s.pending[t].held.is_none()) {
        return false;
    }
    for t in &chain {
        let q = s.pending.remove(t).expect("listed above");
        if let Some(h) = q.held {
            let _ = h.send(Err(Refused { discard: *t != tx }));
        }
    }
    *s.rolling_back.entry(member).or_default() += chain.len();
    true
}

fn on_ack(l: &Arc<Links>, role: IomId, ack: ParityAck) {
    let link = &l.links[role.0 as usize];
    let mut s = link.state.lock();
    match ack {
        ParityAck::NeedDelta { tx } => {
            // The stripe could not be used: the delta itself, at once.
            if let (Some(p), Some(out)) = (s.pending.get(&tx.tx), &s.out) {
                let _ = out.send((ParityMsg::Update(p.upd.clone()), p.delta.clone()));
            }
        }
        ParityAck::Held { tx } => {
            if let Some(p) = s.pending.get_mut(&tx.tx) {
                if let Some(h) = p.held.take() {
                    metrics::histogram!("iomfs_iom_parity_held_seconds").record(p.sent.elapsed().as_secs_f64());
                    let _ = h.send(Ok(()));
                }
            }
        }
        ParityAck::Done { tx } => {
            if let Some(p) = s.pending.get_mut(&tx.tx) {
                metrics::histogram!("iomfs_iom_parity_done_seconds").record(p.sent.elapsed().as_secs_f64());
                if let Some(h) = p.held.take() {
                    let _ = h.send(Ok(()));
                }
                if let Some(d) = p.done.take() {
                    let _ = d.send(());
                }
            }
        }
        ParityAck::Failed { tx, error }
            if matches!(error.code, ErrorCode::Invalid | ErrorCode::Malformed | ErrorCode::Corrupt) =>
        {
            // The parity IOM cannot take this update at all (a malformed
            // update, or its group lost a member and its parity both): the
            // writer hears it now; the transaction stays in the journal.
            tracing::error!(iom = l.me.0, role = role.0, tx = ?tx, "parity update rejected: {error}");
            s.pending.remove(&tx.tx);
        }
        ParityAck::Failed { tx, error } if error.code == ErrorCode::NoSpace && refuse(&mut s, tx.tx) => {
            tracing::warn!(iom = l.me.0, role = role.0, tx = ?tx, "parity update refused: {error}");
        }
        ParityAck::Failed { tx, error } => {
            // A refusal that can pass (the role moved, the parity could not
            // be read or recomputed yet): the update stays pending and is
            // sent again after a pause, like after a broken channel.
            let after = l.timeouts.link_resend_after_failed;
            tracing::warn!(iom = l.me.0, role = role.0, tx = ?tx, "parity update refused, resending in {after:?}: {error}");
            let me = l.clone();
            l.workers.spawn(Tier::Protocol, "parity-resend", async move {
                tokio::time::sleep(after).await;
                let s = me.links[role.0 as usize].state.lock();
                if let (Some(p), Some(out)) = (s.pending.get(&tx.tx), &s.out) {
                    let _ = out.send((ParityMsg::Update(p.upd.clone()), p.delta.clone()));
                }
            });
        }
    }
}
