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
//! No I/O here: the marks themselves live in the map (see `standin`).

use crate::Error;
use common::wire::{ErrorCode, WireError};
use common::IomId;
use parking_lot::Mutex;
use std::collections::{BTreeSet, HashSet};
use std::time::Duration;
use tokio::sync::watch;

pub struct HandoverState {
    frozen: Mutex<HashSet<IomId>>,
    /// Stand-in writes running.
    ops: watch::Sender<u64>,
    /// Failed IOMs whose stand-in is active.
    active: watch::Sender<BTreeSet<IomId>>,
}

impl Default for HandoverState {
    fn default() -> Self {
        HandoverState {
            frozen: Mutex::default(),
            ops: watch::Sender::new(0),
            active: watch::Sender::new(BTreeSet::new()),
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

    pub fn unfreeze(&self, i: IomId) {
        self.frozen.lock().remove(&i);
    }

    /// Counts one running stand-in write for as long as the guard lives
    /// (also when its future is dropped unfinished).
    pub fn op(&self) -> StandinOp<'_> {
        self.ops.send_modify(|n| *n += 1);
        StandinOp(&self.ops)
    }

    /// Waits until no stand-in write runs, at most `within`; false if some
    /// still ran then.
    pub async fn drain(&self, within: Duration) -> bool {
        let mut ops = self.ops.subscribe();
        let drained = tokio::time::timeout(within, ops.wait_for(|n| *n == 0)).await.is_ok();
        drained
    }

    /// The stand-in for `i` is active.
    pub fn activate(&self, i: IomId) {
        self.active.send_modify(|s| {
            s.insert(i);
        });
    }

    /// Waits until the stand-in for `i` is active, at most `within`.
    pub async fn wait_active(&self, i: IomId, within: Duration) {
        let mut rx = self.active.subscribe();
        let _ = tokio::time::timeout(within, rx.wait_for(|s| s.contains(&i))).await;
    }

    /// `i` is up again: neither frozen nor stood in for.
    pub fn forget(&self, i: IomId) {
        self.frozen.lock().remove(&i);
        self.active.send_if_modified(|s| s.remove(&i));
    }
}

/// One running stand-in write (see [`HandoverState::op`]).
pub struct StandinOp<'a>(&'a watch::Sender<u64>);

impl Drop for StandinOp<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // plain tasks in a unit test
mod tests {
    use super::*;
    use std::sync::Arc;

    const LONG: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn a_freeze_waits_for_running_writes_and_refuses_new_ones() {
        let h = Arc::new(HandoverState::default());
        let i = IomId(2);
        assert!(h.check(i).is_ok());
        let op = h.op();
        assert!(!h.freeze_if(i, || false), "an IOM that is not rebuilding is never frozen");
        assert!(h.check(i).is_ok());
        assert!(h.freeze_if(i, || true));
        assert!(h.check(i).is_err(), "a frozen role refuses new stand-in work");
        assert!(!h.drain(Duration::from_millis(30)).await, "a running write keeps the drain waiting");
        let h2 = h.clone();
        let waiter = tokio::spawn(async move { h2.drain(LONG).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(op);
        assert!(waiter.await.unwrap(), "the drain ends when the write ends");
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
        h.activate(i);
        assert!(t.await.unwrap() < Duration::from_secs(2));
        // Already active: returns at once.
        h.wait_active(i, LONG).await;
        assert!(h.freeze_if(i, || true));
        h.forget(i);
        assert!(!h.is_frozen(i));
        let start = std::time::Instant::now();
        h.wait_active(i, Duration::from_millis(30)).await;
        assert!(start.elapsed() >= Duration::from_millis(30), "forgotten: no longer active");
    }
}
