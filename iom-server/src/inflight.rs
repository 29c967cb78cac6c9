//! The data side's transactions in flight (a1–a14), for the durability
//! barrier (`flush` waits for `Durable`), the parity links (they end only
//! once nothing is in flight) and an orderly stop (writes drain).
//!
//! Invariant: a transaction is in the table from a4 until it is `Done` or
//! `Failed`, and its progress only moves forward.

use crate::Error;
use common::TxId;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use tokio::sync::watch;

/// How far a data-side transaction has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Progress {
    /// a4 done (data write issued).
    Issued,
    /// a5 written and b4 received: the parity IOM holds the delta.
    Held,
    /// a11 durable and b12 received: new data and parity on stable storage.
    Durable,
    /// a14 done.
    Done,
    /// The transaction cannot finish here (peer lost); recovery owns it.
    Failed,
    /// The parity IOM had no room for it: rolled back, the writer gets ENOSPC.
    NoSpace,
}

/// Data-side transactions in flight, for durability barriers and shutdown.
#[derive(Default)]
pub struct Inflight {
    txs: Mutex<BTreeMap<TxId, watch::Receiver<Progress>>>,
    /// Fired when a transaction leaves the table.
    removed: tokio::sync::Notify,
}

impl Inflight {
    pub(crate) fn register(&self, tx: TxId) -> watch::Sender<Progress> {
        let (s, r) = watch::channel(Progress::Issued);
        self.txs.lock().insert(tx, r);
        s
    }
    pub(crate) fn remove(&self, tx: TxId) {
        self.txs.lock().remove(&tx);
        self.removed.notify_waiters();
    }
    pub fn len(&self) -> usize {
        self.txs.lock().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until every transaction in flight now is durable (or failed).
    pub async fn wait_durable(&self) -> Result<(), Error> {
        let now: Vec<_> = self.txs.lock().values().cloned().collect();
        for mut r in now {
            let res = r.wait_for(|p| *p >= Progress::Durable).await.map(|g| *g);
            let p = res.unwrap_or_else(|_| *r.borrow());
            if p == Progress::Failed {
                return Err(Error::Wire(common::wire::WireError::new(
                    common::wire::ErrorCode::Unavailable,
                    "a write could not reach its parity IOM; it will be resolved by recovery",
                )));
            }
        }
        Ok(())
    }

    /// Waits until nothing is in flight.
    pub async fn wait_all(&self) {
        loop {
            // Armed before the look, so a removal in between is not missed.
            let removed = self.removed.notified();
            let now: Vec<_> = self.txs.lock().values().cloned().collect();
            if now.is_empty() {
                return;
            }
            for mut r in now {
                // Done, failed, or its sender gone: either way, what is
                // left is the removal from the table.
                let _ = r.wait_for(|p| *p >= Progress::Done).await;
            }
            // Every one of them reached its end; wait for (at least) one to
            // leave the table rather than look again at once.
            removed.await;
        }
    }
}
