//! `Fence`: the blocks whose unfinished transactions recovery has not
//! resolved yet. Reads and writes of a fenced block wait (a block that may
//! still roll back must not show its new version), everything else goes on.
//!
//! Invariant: recovery sets the fence before this IOM serves, and clears
//! each key once its transaction is settled; a waiter arms its
//! notification before it looks, so a clear is never missed.

use common::BlockKey;
use parking_lot::Mutex;
use std::collections::HashSet;
use tokio::sync::Notify;

/// Blocks whose unfinished transactions are not resolved yet: reads and
/// writes of them wait.
#[derive(Default)]
pub struct Fence {
    keys: Mutex<HashSet<BlockKey>>,
    changed: Notify,
}

impl Fence {
    pub fn set(&self, keys: impl IntoIterator<Item = BlockKey>) {
        self.keys.lock().extend(keys);
    }
    pub fn clear(&self, key: &BlockKey) {
        if self.keys.lock().remove(key) {
            self.changed.notify_waiters();
        }
    }
    pub fn is_empty(&self) -> bool {
        self.keys.lock().is_empty()
    }
    /// Waits until `key` is not fenced.
    pub async fn wait(&self, key: &BlockKey) {
        loop {
            let n = self.changed.notified();
            if !self.keys.lock().contains(key) {
                return;
            }
            // `notify_waiters` reaches a `Notified` from its creation on,
            // so a clear between the check and here is not missed.
            n.await;
        }
    }
}
