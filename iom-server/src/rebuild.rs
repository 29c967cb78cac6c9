//! Coming back (DESIGN §6): an IOM declared down replays its journal,
//! collects what its stand-in marked, applies the recovery rules, rebuilds
//! every marked block in the background (throttled), then takes its role
//! back under a new epoch.

use crate::journal::Wait;
use crate::records::Record;
use crate::Iom;
use bytes::Bytes;
use common::cluster::IomState;
use common::wire::{MemberReq, MemberResp, RebuildMarks, Reply, Request};
use common::{Epoch, IomId};
use futures::StreamExt;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Progress of a rebuild, for `iomfs status`.
#[derive(Default)]
pub struct RebuildProgress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub bytes: AtomicU64,
    pub started: Mutex<Option<Instant>>,
    pub active: AtomicBool,
}

/// Blocks (and parity groups) rebuilt at once: enough to keep every peer's
/// disk and the network busy while one block waits for its members.
const REBUILD_PARALLEL: usize = 32;
impl RebuildProgress {
    pub fn rate(&self) -> u64 {
        let secs = self.started.lock().map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        if secs <= 0.0 {
            0
        } else {
            (self.bytes.load(Ordering::Relaxed) as f64 / secs) as u64
        }
    }
}

fn is_empty(m: &RebuildMarks) -> bool {
    m.blocks.is_empty() && m.groups.is_empty() && m.drops.is_empty()
}

impl Iom {
    pub fn rejoining(&self) -> bool {
        self.rejoin_flag.load(Ordering::Acquire)
    }

    async fn marks_from(&self, proxy: IomId, req: MemberReq) -> Option<RebuildMarks> {
        match self.pool.call_timeout(proxy, &Request::Member(req), Bytes::new(), Duration::from_secs(10)).await {
            Ok((Reply::Member(MemberResp::Marks(m)), _)) => Some(m),
            _ => None,
        }
    }

    /// Declared down while away: recover, rebuild, take the role back.
    pub async fn rejoin(self: Arc<Self>) {
        self.rejoin_flag.store(true, Ordering::Release);
        let me = self.id;
        let mut recovered = false;
        // Let the peers hear this IOM before it asks them to vote it back.
        tokio::time::sleep(self.member.heartbeat * 3).await;
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let map = self.member.current();
            let proxy = match map.state(me) {
                IomState::Up => break,
                IomState::Down { proxy } | IomState::Rebuilding { proxy } => proxy,
            };
            let Some(marks) = self.marks_from(proxy, MemberReq::RebuildMarks { about: me }).await else {
                tracing::warn!(iom = me.0, proxy = proxy.0, "rejoin: stand-in not reachable yet");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            };
            if !recovered {
                tracing::warn!(
                    iom = me.0,
                    proxy = proxy.0,
                    blocks = marks.blocks.len(),
                    groups = marks.groups.len(),
                    "rejoin: recovering, then rebuilding what changed while this IOM was down"
                );
                self.clone().recover_with(Some(&marks)).await;
                recovered = true;
            }
            // Tell the cluster this IOM is back and rebuilding.
            if matches!(map.state(me), IomState::Down { .. }) {
                let mut next = map.clone();
                next.epoch = Epoch(map.epoch.0 + 1);
                next.states[me.0 as usize] = IomState::Rebuilding { proxy };
                if !self.propose(next, me).await {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            }
            self.rebuild_from(proxy).await;
            // Handover: the stand-in stops serving, hands over its last marks.
            let Some(last) = self.marks_from(proxy, MemberReq::Freeze { about: me }).await else {
                continue;
            };
            if !is_empty(&last) {
                self.rebuild_marks_now(proxy, last).await;
            }
            let map = self.member.current();
            let mut next = map.clone();
            next.epoch = Epoch(map.epoch.0 + 1);
            next.states[me.0 as usize] = IomState::Up;
            if self.propose(next, me).await {
                break;
            }
            let _ = self
                .pool
                .call_timeout(
                    proxy,
                    &Request::Member(MemberReq::Unfreeze { about: me }),
                    Bytes::new(),
                    Duration::from_secs(2),
                )
                .await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        self.rebuild.active.store(false, Ordering::Release);
        self.rejoin_flag.store(false, Ordering::Release);
        tracing::warn!(iom = me.0, epoch = self.member.epoch().0, "rejoin complete: serving again");
    }

    /// Rebuilds marked blocks until the stand-in has none left.
    async fn rebuild_from(self: &Arc<Self>, proxy: IomId) {
        *self.rebuild.started.lock() = Some(Instant::now());
        self.rebuild.active.store(true, Ordering::Release);
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let Some(m) = self.marks_from(proxy, MemberReq::RebuildMarks { about: self.id }).await else {
                tokio::time::sleep(Duration::from_millis(300)).await;
                continue;
            };
            if is_empty(&m) {
                return;
            }
            self.rebuild_marks_now(proxy, m).await;
        }
    }

    /// Counts one rebuilt block or group of `n` bytes, then throttles
    /// (`rebuild_mib_s`, bytes/s in `limit`, 0 = none): keeps the average
    /// rate of this round (`bytes0` counted when it started at `started`)
    /// at or below the limit.
    async fn rebuilt_one(&self, n: u64, limit: u64, started: Instant, bytes0: u64) {
        self.rebuild.done.fetch_add(1, Ordering::Relaxed);
        self.rebuild.bytes.fetch_add(n, Ordering::Relaxed);
        if limit == 0 {
            return;
        }
        let bytes = self.rebuild.bytes.load(Ordering::Relaxed).saturating_sub(bytes0) as f64;
        let should = Duration::from_secs_f64(bytes / limit as f64);
        let el = started.elapsed();
        if should > el {
            tokio::time::sleep(should - el).await;
        }
    }

    /// Rebuilds one set of marks and tells the stand-in which are done.
    async fn rebuild_marks_now(self: &Arc<Self>, proxy: IomId, m: RebuildMarks) {
        let total = (m.blocks.len() + m.groups.len()) as u64;
        let done0 = self.rebuild.done.load(Ordering::Relaxed);
        self.rebuild.total.store(done0 + total, Ordering::Relaxed);
        for (o, from) in &m.drops {
            self.commit(&Record::Dropped { object: *o, from: *from }, false, Wait::Written);
        }
        let limit = self.cfg.tuning.rebuild_mib_s << 20;
        let started = Instant::now();
        let bytes0 = self.rebuild.bytes.load(Ordering::Relaxed);
        let me = self.clone();
        let rebuilt: Vec<_> = futures::stream::iter(m.blocks.iter().copied())
            .map(|(key, want)| {
                let me = me.clone();
                async move {
                    let g = me.locks.lock(key).await;
                    let (v, bytes) = me.reconstruct(key, None).await.ok()?;
                    if v < want {
                        return None; // parity not there yet: next round
                    }
                    let n = bytes.len() as u64;
                    me.install_version(key, v, bytes).await.ok()?;
                    drop(g);
                    me.rebuilt_one(n, limit, started, bytes0).await;
                    Some((key, v))
                }
            })
            .buffer_unordered(REBUILD_PARALLEL)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        let groups: Vec<_> = futures::stream::iter(m.groups.iter().copied())
            .map(|g| {
                let me = me.clone();
                async move {
                    me.recompute_parity(g).await.ok()?;
                    me.rebuilt_one(me.cfg.block_size as u64, limit, started, bytes0).await;
                    Some(g)
                }
            })
            .buffer_unordered(REBUILD_PARALLEL)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        let done = RebuildMarks { blocks: rebuilt, groups, drops: m.drops.clone(), frozen: false };
        let _ = self
            .pool
            .call_timeout(
                proxy,
                &Request::Member(MemberReq::ClearMarks { about: self.id, marks: done }),
                Bytes::new(),
                Duration::from_secs(5),
            )
            .await;
        self.journal.flush().await;
    }
}
