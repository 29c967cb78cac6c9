//! `HandoverState`: which failed IOMs' roles this stand-in serves now, and
//! the handshake of handing one back (DESIGN §6).
//!
//! - A stand-in becomes *active* for failed IOM `i` once the other IOMs
//!   published their unfinished transactions with `i` (`activate`); reads
//!   and writes for `i` wait for that, a bounded time (`wait_active`).
//! - A handover *freezes* `i`: from then on no new stand-in read or write
//!   for `i` starts, and the freeze waits until the running stand-in
//!   writes have finished (`drain`) before it answers with the marks left.
//!   A write counts itself (`op`) *before* its second frozen check, so a
//!   freeze either sees it counted or the write sees the freeze.
//!
//! - Group marks carry no version, so a rebuild round's `ClearMarks` could
//!   erase the mark of a write that came after the round computed the
//!   group's parity. The stand-in therefore remembers, per failed IOM, the
//!   groups written since it last handed out marks (`touched`,
//!   `handed_out`), and clears only the others (`clearable`). A write
//!   counts as "since" until its data IOM says it completed (a13): the
//!   stand-in holds each parity update it acknowledged as open
//!   (`parity_opened`) until then (`parity_closed`), touching the group
//!   again at that point; a freeze drains them too.
//!
//! No I/O here: the marks themselves live in the map (see `standin`).

use crate::Error;
use common::wire::{ErrorCode, WireError};
use common::{GroupKey, IomId, TxRef};
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Duration;
use tokio::sync::watch;

pub struct HandoverState {
    frozen: Mutex<HashSet<IomId>>,
    /// Stand-in writes running, per failed IOM (a freeze of one waits for
    /// its own only: another's write may wait for a stopped cluster, which
    /// only this handover can end).
    ops: watch::Sender<HashMap<IomId, u64>>,
    /// Failed IOMs whose stand-in is active.
    active: watch::Sender<BTreeSet<IomId>>,
    /// Per failed IOM, how many times it came back (`forget`): a
    /// publication begun before it came back must not activate a later
    /// stand-in for it, whose own publication has not run.
    eras: Mutex<HashMap<IomId, u64>>,
    /// Per failed IOM: groups written since its marks were last handed out.
    touched: Mutex<HashMap<IomId, Touched>>,
    /// Parity updates for failed IOMs' groups acknowledged by this stand-in
    /// whose a13 has not arrived: (failed IOM, group).
    parity_open: watch::Sender<HashMap<TxRef, (IomId, GroupKey)>>,
}

/// What `clearable` needs about one failed IOM.
#[derive(Default)]
struct Touched {
    /// Marks were handed out since this IOM started (before that, what a
    /// round computed is not known: nothing is clearable).
    handed: bool,
    groups: HashSet<GroupKey>,
}

impl Default for HandoverState {
    fn default() -> Self {
        HandoverState {
            frozen: Mutex::default(),
            ops: watch::Sender::new(HashMap::new()),
            active: watch::Sender::new(BTreeSet::new()),
            eras: Mutex::default(),
            touched: Mutex::default(),
            parity_open: watch::Sender::new(HashMap::new()),
        }
    }
}

impl HandoverState {
    pub fn is_frozen(&self, i: IomId) -> bool {
        self.frozen.lock().contains(&i)
    }

    /// `Err` (not serving: `i` is taking its role back) once `i` is frozen.
    pub fn check(&self, i: IomId) -> Result<(), Error> {
        if self.is_frozen(i) {
            return Err(Error::Wire(WireError::new(ErrorCode::NotServing, format!("IOM {i} is taking its role back"))));
        }
        Ok(())
    }

    /// Freezes `i` if `rebuilding()` says `i` is rebuilding with this IOM as
    /// its proxy. Asked under the lock `unfreeze` takes: a map that declares
    /// `i` down again (after which the watcher unfreezes it) is either seen
    /// here, or its unfreeze comes after this freeze. A stand-in frozen for
    /// an IOM that is not rebuilding would refuse its writes for good.
    pub fn freeze_if(&self, i: IomId, rebuilding: impl FnOnce() -> bool) -> bool {
        let mut f = self.frozen.lock();
        if !rebuilding() {
            return false;
        }
        f.insert(i);
        true
    }

    /// Runs `mark` (a stand-in's journaled mark for `i`) only while this
    /// IOM serves `i`'s role: `serving()` (the map says so) and not frozen,
    /// both asked under the lock a freeze takes. A mark made is therefore
    /// in the marks a freeze hands out, or the write sees the freeze (or,
    /// once `i` is back and forgotten, the map) and changes nothing. The
    /// freeze's drain of running writes has a deadline, so a write counted
    /// before the freeze but slow to mark (rebuilding its old block while
    /// the cluster was stopped) could otherwise mark after the hand-out and
    /// move the parity past a block the returning IOM never rebuilt.
    pub fn mark_if_serving<T>(
        &self,
        i: IomId,
        serving: impl FnOnce() -> bool,
        mark: impl FnOnce() -> T,
    ) -> Result<T, Error> {
        let f = self.frozen.lock();
        if f.contains(&i) || !serving() {
            return Err(Error::Wire(WireError::new(
                ErrorCode::NotServing,
                format!("IOM {i} is taking its role back or is back"),
            )));
        }
        Ok(mark())
    }

    pub fn unfreeze(&self, i: IomId) {
        self.frozen.lock().remove(&i);
    }

    /// Counts one running stand-in write for failed IOM `i` for as long as
    /// the guard lives (also when its future is dropped unfinished).
    pub fn op(&self, i: IomId) -> StandinOp<'_> {
        self.ops.send_modify(|m| *m.entry(i).or_default() += 1);
        StandinOp(&self.ops, i)
    }

    /// Waits until no stand-in write for `i` runs, until `deadline`; false
    /// if some still ran then.
    pub async fn drain(&self, i: IomId, deadline: tokio::time::Instant) -> bool {
        let mut ops = self.ops.subscribe();
        let idle = ops.wait_for(|m| m.get(&i).copied().unwrap_or(0) == 0);
        let drained = tokio::time::timeout_at(deadline, idle).await.is_ok();
        drained
    }

    /// Which stand-in period for `i` this is (see `activate`).
    pub fn era(&self, i: IomId) -> u64 {
        self.eras.lock().get(&i).copied().unwrap_or(0)
    }

    /// The stand-in for `i` is active, if `i` has not come back since
    /// `era` (its publication, begun then, would not cover a later
    /// failure); whether it was activated. Decided under the lock `forget`
    /// takes to end the period.
    pub fn activate(&self, i: IomId, era: u64) -> bool {
        let mut done = false;
        self.active.send_if_modified(|s| {
            done = self.era(i) == era;
            done && s.insert(i)
        });
        done
    }

    /// Waits until the stand-in for `i` is active, at most `within`;
    /// whether it is.
    pub async fn wait_active(&self, i: IomId, within: Duration) -> bool {
        let mut rx = self.active.subscribe();
        let active = tokio::time::timeout(within, rx.wait_for(|s| s.contains(&i))).await.is_ok();
        active
    }

    /// `i` is up again: neither frozen nor stood in for.
    pub fn forget(&self, i: IomId) {
        self.frozen.lock().remove(&i);
        self.active.send_if_modified(|s| {
            *self.eras.lock().entry(i).or_default() += 1;
            s.remove(&i)
        });
        self.touched.lock().remove(&i);
        self.parity_open.send_if_modified(|m| {
            let n = m.len();
            m.retain(|_, (owner, _)| *owner != i);
            m.len() != n
        });
    }

    /// Group `g` of failed IOM `i` was written through this stand-in.
    pub fn touched(&self, i: IomId, g: GroupKey) {
        self.touched.lock().entry(i).or_default().groups.insert(g);
    }

    /// `i`'s marks are being handed out: what was touched before is in them.
    pub fn handed_out(&self, i: IomId) {
        let mut t = self.touched.lock();
        let e = t.entry(i).or_default();
        e.handed = true;
        e.groups.clear();
    }

    /// Whether a round that `i` computed from the marks last handed out
    /// may clear the mark of group `g`.
    pub fn clearable(&self, i: IomId, g: &GroupKey) -> bool {
        self.touched.lock().get(&i).is_some_and(|t| t.handed && !t.groups.contains(g))
    }

    /// A parity update `tx` for group `g` of failed IOM `i` is acknowledged
    /// by this stand-in; open until `parity_closed`. Registered before the
    /// caller's frozen check, so a freeze either drains it or it sees the
    /// freeze (and calls `parity_closed` itself).
    pub fn parity_opened(&self, tx: TxRef, i: IomId, g: GroupKey) {
        self.parity_open.send_modify(|m| {
            m.insert(tx, (i, g));
        });
    }

    /// `tx` was refused after `parity_opened` (frozen, or not a stand-in):
    /// it wrote nothing.
    pub fn parity_refused(&self, tx: TxRef) {
        self.parity_open.send_if_modified(|m| m.remove(&tx).is_some());
    }

    /// `tx`'s a13 arrived: the group it wrote, touched again, if it was a
    /// stand-in's parity update.
    pub fn parity_closed(&self, tx: TxRef) -> Option<(IomId, GroupKey)> {
        // Every a13 a parity IOM receives asks: a shared borrow while no
        // stand-in update is open (the common case), no write lock.
        if self.parity_open.borrow().is_empty() {
            return None;
        }
        let mut out = None;
        self.parity_open.send_if_modified(|m| {
            out = m.remove(&tx);
            out.is_some()
        });
        if let Some((i, g)) = out {
            self.touched(i, g);
        }
        out
    }

    /// Waits until no acknowledged parity update for `i` is open, until
    /// `deadline`; false if some still were.
    pub async fn drain_parity(&self, i: IomId, deadline: tokio::time::Instant) -> bool {
        let mut rx = self.parity_open.subscribe();
        let idle = rx.wait_for(|m| m.values().all(|(owner, _)| *owner != i));
        let drained = tokio::time::timeout_at(deadline, idle).await;
        drained.is_ok()
    }
}

/// One running stand-in write (see [`HandoverState::op`]).
pub struct StandinOp<'a>(&'a watch::Sender<HashMap<IomId, u64>>, IomId);

impl Drop for StandinOp<'_> {
    fn drop(&mut self) {
        let i = self.1;
        self.0.send_modify(|m| {
            if let Some(n) = m.get_mut(&i) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&i);
                }
            }
        });
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // plain tasks in a unit test
mod tests {
    use super::*;
    use std::sync::Arc;

    const LONG: Duration = Duration::from_secs(5);

    fn soon(ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_millis(ms)
    }

    #[tokio::test]
    async fn a_freeze_waits_for_running_writes_and_refuses_new_ones() {
        let h = Arc::new(HandoverState::default());
        let i = IomId(2);
        assert!(h.check(i).is_ok());
        let op = h.op(i);
        let other = h.op(IomId(3));
        assert!(!h.freeze_if(i, || false), "an IOM that is not rebuilding is never frozen");
        assert!(h.check(i).is_ok());
        assert!(h.freeze_if(i, || true));
        assert!(h.check(i).is_err(), "a frozen role refuses new stand-in work");
        assert!(!h.drain(i, soon(30)).await, "a running write keeps the drain waiting");
        let h2 = h.clone();
        let waiter = tokio::spawn(async move { h2.drain(i, soon(5000)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(op);
        assert!(waiter.await.unwrap(), "the drain ends when the write ends, another IOM's still running");
        assert!(!h.drain(IomId(3), soon(30)).await);
        drop(other);
        assert!(h.drain(IomId(3), soon(30)).await);
        h.unfreeze(i);
        assert!(h.check(i).is_ok());
    }

    #[tokio::test]
    async fn waiting_for_activation_ends_when_activated_and_forget_clears_both() {
        let h = Arc::new(HandoverState::default());
        let i = IomId(3);
        let h2 = h.clone();
        let t = tokio::spawn(async move {
            let start = std::time::Instant::now();
            h2.wait_active(i, LONG).await;
            start.elapsed()
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(h.activate(i, h.era(i)));
        assert!(t.await.unwrap() < Duration::from_secs(2));
        // Already active: returns at once.
        assert!(h.wait_active(i, LONG).await);
        assert!(h.freeze_if(i, || true));
        h.forget(i);
        assert!(!h.is_frozen(i));
        let start = std::time::Instant::now();
        assert!(!h.wait_active(i, Duration::from_millis(30)).await, "forgotten: no longer active");
        assert!(start.elapsed() >= Duration::from_millis(30), "forgotten: no longer active");
        // A publication begun before `i` came back activates nothing.
        let before = 0;
        assert!(!h.activate(i, before), "a stale publication");
        assert!(!h.wait_active(i, Duration::from_millis(1)).await);
        assert!(h.activate(i, h.era(i)));
    }

    fn g(n: u64) -> GroupKey {
        GroupKey { object: common::ObjectId(n), group: common::GroupNo(0) }
    }

    fn tx(n: u64) -> TxRef {
        TxRef { iom: IomId(0), tx: common::TxId(n) }
    }

    #[test]
    fn a_group_written_after_its_marks_were_handed_out_is_not_cleared() {
        let h = HandoverState::default();
        let i = IomId(2);
        h.touched(i, g(1));
        assert!(!h.clearable(i, &g(1)), "nothing handed out since start: nothing clearable");
        assert!(!h.clearable(i, &g(2)));
        h.handed_out(i);
        assert!(h.clearable(i, &g(1)), "touched before the hand-out: in the marks the round computed");
        h.touched(i, g(1));
        assert!(!h.clearable(i, &g(1)), "touched after the hand-out");
        assert!(h.clearable(i, &g(2)));
        assert!(!h.clearable(IomId(3), &g(2)), "another failed IOM's marks were never handed out");
        h.handed_out(i);
        assert!(h.clearable(i, &g(1)));
        h.forget(i);
        assert!(!h.clearable(i, &g(1)), "forgotten: as after a restart");
    }

    #[tokio::test]
    async fn an_open_parity_update_touches_its_group_again_when_it_completes_and_holds_a_freeze() {
        let h = Arc::new(HandoverState::default());
        let i = IomId(2);
        h.handed_out(i);
        h.parity_opened(tx(1), i, g(1));
        h.parity_opened(tx(2), IomId(4), g(9));
        h.parity_opened(tx(3), i, g(3));
        h.parity_refused(tx(3));
        assert!(h.clearable(i, &g(3)), "a refused update wrote nothing");
        assert!(!h.drain_parity(i, soon(30)).await, "an open update holds the drain");
        let h2 = h.clone();
        let waiter = tokio::spawn(async move { h2.drain_parity(i, soon(5000)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(h.parity_closed(tx(1)), Some((i, g(1))));
        assert!(waiter.await.unwrap(), "drained once its a13 came, the other IOM's update apart");
        assert!(!h.clearable(i, &g(1)), "its data is in place only now: recompute again");
        assert_eq!(h.parity_closed(tx(1)), None, "closed once");
        assert!(h.clearable(i, &g(9)));
    }
}
