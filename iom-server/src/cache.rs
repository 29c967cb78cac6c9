//! Buffer cache of recently used block versions (DESIGN §2): lets the
//! "read old block" steps a1 and b3 skip the disk. CLOCK eviction within a
//! byte budget, sharded so lookups on different blocks do not contend.

use bytes::Bytes;
use common::{BlockKey, GroupKey, Version};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CacheKey {
    /// A data block version.
    Data(BlockKey, Version),
    /// A parity block version (group, parity sequence number).
    Parity(GroupKey, u64),
}

struct Shard {
    map: HashMap<CacheKey, (Bytes, bool)>,
    order: VecDeque<CacheKey>,
    bytes: usize,
}

pub struct Cache {
    shards: Vec<Mutex<Shard>>,
    budget: usize,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

const SHARDS: usize = 16;

impl Cache {
    pub fn new(budget_bytes: usize) -> Cache {
        Cache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard { map: HashMap::new(), order: VecDeque::new(), bytes: 0 }))
                .collect(),
            budget: budget_bytes / SHARDS,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    fn shard(&self, k: &CacheKey) -> &Mutex<Shard> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        k.hash(&mut h);
        &self.shards[h.finish() as usize % SHARDS]
    }

    pub fn get(&self, k: &CacheKey) -> Option<Bytes> {
        let mut s = self.shard(k).lock();
        match s.map.get_mut(k) {
            Some((b, r)) => {
                *r = true;
                self.hits.fetch_add(1, Ordering::Relaxed);
                Some(b.clone())
            }
            None => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether `k` is cached, without taking it or counting: a prefetch's look.
    pub fn has(&self, k: &CacheKey) -> bool {
        self.shard(k).lock().map.contains_key(k)
    }

    /// `n` blocks a prefetch read from the disk: misses (the reads that
    /// follow count their hits).
    pub fn missed(&self, n: u64) {
        self.misses.fetch_add(n, Ordering::Relaxed);
    }

    /// Whether the cache keeps anything (`cache_mib` > 0).
    pub fn enabled(&self) -> bool {
        self.budget > 0
    }

    pub fn put(&self, k: CacheKey, v: Bytes) {
        if self.budget == 0 || v.len() > self.budget {
            return;
        }
        let mut s = self.shard(&k).lock();
        let len = v.len();
        if let Some((old, _)) = s.map.insert(k, (v, false)) {
            s.bytes -= old.len();
        } else {
            s.order.push_back(k);
        }
        s.bytes += len;
        let mut spins = s.order.len() * 2 + 1;
        while s.bytes > self.budget && spins > 0 {
            spins -= 1;
            let Some(victim) = s.order.pop_front() else {
                break;
            };
            let referenced = match s.map.get_mut(&victim) {
                None => continue,
                Some((_, r)) => std::mem::replace(r, false),
            };
            if referenced && victim != k {
                s.order.push_back(victim);
            } else if let Some((b, _)) = s.map.remove(&victim) {
                s.bytes -= b.len();
            }
        }
    }

    pub fn remove(&self, k: &CacheKey) {
        let mut s = self.shard(k).lock();
        if let Some((b, _)) = s.map.remove(k) {
            s.bytes -= b.len();
        }
    }

    /// Keeps only the entries `keep` accepts.
    pub fn retain(&self, keep: impl Fn(&CacheKey) -> bool) {
        for s in &self.shards {
            let mut s = s.lock();
            let mut dropped = 0;
            s.map.retain(|k, (b, _)| {
                let k2 = keep(k);
                if !k2 {
                    dropped += b.len();
                }
                k2
            });
            s.bytes -= dropped;
        }
    }

    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.lock().bytes as u64).sum()
    }

    /// Drops every entry (nothing depends on one being here: a miss reads
    /// the disk); returns the bytes they held.
    pub fn clear(&self) -> u64 {
        let before = self.bytes();
        self.retain(|_| false);
        for s in &self.shards {
            s.lock().order.clear();
        }
        before
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::{BlockNo, ObjectId};

    fn key(i: u64) -> CacheKey {
        CacheKey::Data(BlockKey { object: ObjectId(1), block: BlockNo(i) }, Version(1))
    }

    #[test]
    fn stays_within_budget() {
        let c = Cache::new(SHARDS * 1000);
        for i in 0..1000 {
            c.put(key(i), Bytes::from(vec![0u8; 100]));
        }
        assert!(c.bytes() <= (SHARDS * 1000) as u64);
        assert!(c.get(&key(999)).is_some());
        c.remove(&key(999));
        assert!(c.get(&key(999)).is_none());
    }
}
