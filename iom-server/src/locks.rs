//! Per-key FIFO async locks: writes to one block are applied in arrival order.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

const SHARDS: usize = 64;

pub struct KeyLocks<K> {
    shards: Vec<Mutex<HashMap<K, Arc<AsyncMutex<()>>>>>,
}

pub struct KeyGuard<'a, K: Hash + Eq + Copy> {
    locks: &'a KeyLocks<K>,
    key: K,
    guard: Option<OwnedMutexGuard<()>>,
}

impl<K: Hash + Eq + Copy> Default for KeyLocks<K> {
    fn default() -> Self {
        KeyLocks { shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

impl<K: Hash + Eq + Copy> KeyLocks<K> {
    fn shard(&self, k: &K) -> &Mutex<HashMap<K, Arc<AsyncMutex<()>>>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        &self.shards[h.finish() as usize % SHARDS]
    }

    /// Waits for the key's lock; tokio's mutex is fair, so waiters are served in arrival order.
    pub async fn lock(&self, key: K) -> KeyGuard<'_, K> {
        let m = self.shard(&key).lock().entry(key).or_default().clone();
        let guard = m.lock_owned().await;
        KeyGuard { locks: self, key, guard: Some(guard) }
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Hash + Eq + Copy> Drop for KeyGuard<'_, K> {
    fn drop(&mut self) {
        self.guard.take();
        let mut s = self.locks.shard(&self.key).lock();
        if let Some(m) = s.get(&self.key) {
            // Only the map holds it: nobody waits, forget the lock.
            if Arc::strong_count(m) == 1 {
                s.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[tokio::test]
    #[allow(clippy::disallowed_methods)] // a test's own tasks
    async fn fifo_and_cleanup() {
        let l = Arc::new(KeyLocks::<u64>::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let g = l.lock(1).await;
        let mut hs = Vec::new();
        for i in 0..5 {
            let (l, o) = (l.clone(), order.clone());
            hs.push(tokio::spawn(async move {
                let _g = l.lock(1).await;
                o.lock().push(i);
            }));
            tokio::task::yield_now().await;
        }
        drop(g);
        for h in hs {
            h.await.unwrap();
        }
        assert_eq!(*order.lock(), vec![0, 1, 2, 3, 4]);
        assert!(l.is_empty());
    }
}
