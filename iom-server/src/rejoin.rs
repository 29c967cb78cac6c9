//! Joining and coming back (DESIGN §6). `join` is the start-up path:
//! learn the current map, refuse a store older than what this IOM
//! acknowledged, stand aside if this is a replacement, then recover (still
//! up) or rejoin. `rejoin`: an IOM declared down replays its journal,
//! collects what its stand-in marked, applies the recovery rules, rebuilds
//! every marked block in the background (throttled), then takes its role
//! back under a new epoch in the handover.

use crate::caller::RoleCaller;
use crate::failover::Failover;
use crate::group::Group;
use crate::journal::Wait;
use crate::locks::KeyLocks;
use crate::membership::Membership;
use crate::parity::ParitySide;
use crate::records::Record;
use crate::recovery_exec::Recovery;
use crate::storage::Storage;
use crate::timeouts::Timeouts;
use bytes::Bytes;
use common::cluster::IomState;
use common::config::Tuning;
use common::wire::{
    DataReq, DataResp, HandoverReq, HandoverResp, RebuildMarks, RecoveryReq, RecoveryResp, Reply, Request,
};
use common::Layout;
use common::{BlockKey, Epoch, GroupKey, IomId, Version};
use futures::StreamExt;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Progress of a rebuild, for `iomfs status`.
#[derive(Default)]
pub struct RebuildProgress {
    pub done: AtomicU64,
    pub total: AtomicU64,
    pub bytes: AtomicU64,
    pub started: Mutex<Option<Instant>>,
    pub active: AtomicBool,
    /// Bytes the throttle has let through (counted before its pause, where
    /// `bytes` is counted after: up to `REBUILD_PARALLEL` rebuilds finish
    /// at once, and counting them as done before their pauses made the
    /// first second look several times faster than the limit).
    throttled: AtomicU64,
    /// (when, done, bytes) about every half second over the last ten: the
    /// recent rate, which the first unthrottled moments do not inflate.
    window: Mutex<std::collections::VecDeque<(Instant, u64, u64)>>,
}

/// Blocks (and parity groups) rebuilt at once: enough to keep every peer's
/// disk and the network busy while one block waits for its members.
const REBUILD_PARALLEL: usize = 32;
/// Entries per listing request of a replacement's full rebuild.
const LIST_PAGE: u32 = 5000;
/// Rebuild rounds while the stand-in is frozen before giving the role back
/// to it and trying the handover again later.
const HANDOVER_ROUNDS: usize = 3;
/// Marks few enough to rebuild while the stand-in is frozen (its writes
/// for this role wait meanwhile): two parallel batches.
const HANDOVER_TAIL: usize = 2 * REBUILD_PARALLEL;
impl RebuildProgress {
    /// Notes the counters in the rate window (at most every half second).
    fn sample(&self) {
        let now = Instant::now();
        let mut w = self.window.lock();
        if w.back().is_none_or(|(t, _, _)| now.duration_since(*t) >= Duration::from_millis(500)) {
            w.push_back((now, self.done.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed)));
            while w.len() > 2 && w.front().is_some_and(|(t, _, _)| now.duration_since(*t) > Duration::from_secs(10)) {
                w.pop_front();
            }
        }
    }

    /// (blocks and groups per second, bytes per second) over the last ten
    /// seconds; over the whole rebuild while it is younger than one.
    fn recent(&self) -> (f64, f64) {
        let (done, bytes) = (self.done.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed));
        // One lock at a time (the window's guard ends with this statement).
        let from = self.window.lock().front().copied().filter(|(t, _, _)| t.elapsed() >= Duration::from_secs(1));
        let (secs, d0, b0) = match from {
            Some((t, d, b)) => (t.elapsed().as_secs_f64(), d, b),
            None => (self.started.lock().map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0), 0, 0),
        };
        if secs <= 0.0 {
            return (0.0, 0.0);
        }
        (done.saturating_sub(d0) as f64 / secs, bytes.saturating_sub(b0) as f64 / secs)
    }

    /// Bytes per second rebuilt lately.
    pub fn rate(&self) -> u64 {
        self.recent().1 as u64
    }

    /// Seconds left at the recent pace; None before anything was rebuilt.
    pub fn eta_secs(&self) -> Option<u64> {
        let (per_s, _) = self.recent();
        let left = self.total.load(Ordering::Relaxed).saturating_sub(self.done.load(Ordering::Relaxed));
        (per_s > 0.0).then(|| (left as f64 / per_s).ceil() as u64)
    }
}

fn is_empty(m: &RebuildMarks) -> bool {
    count(m) == 0
}

fn count(m: &RebuildMarks) -> usize {
    m.blocks.len() + m.groups.len() + m.drops.len()
}

/// The rejoin role: start-up's join, rejoin, rebuild and the rejoining
/// side of the handover. Holds the storage, the block locks, the group,
/// the parity side (recompute), the caller, the membership state, recovery
/// and failover (its votes); never the node.
pub struct Rejoin {
    pub(crate) me: IomId,
    pub(crate) width: u32,
    pub(crate) layout: Layout,
    pub(crate) tuning: Tuning,
    /// The cluster directory (named in the stale-store message).
    pub(crate) cluster_dir: PathBuf,
    pub(crate) data_dir: PathBuf,
    pub(crate) storage: Arc<Storage>,
    pub(crate) locks: Arc<KeyLocks<BlockKey>>,
    pub(crate) group: Arc<Group>,
    pub(crate) parity: Arc<ParitySide>,
    pub(crate) caller: Arc<RoleCaller>,
    pub(crate) member: Arc<Membership>,
    pub(crate) recovery: Arc<Recovery>,
    pub(crate) failover: Arc<Failover>,
    pub(crate) timeouts: Timeouts,
    /// Progress of a rebuild, for `iomfs status`.
    pub progress: RebuildProgress,
    /// This IOM's store replaced a lost one (`iomfs replace`): it rejoins
    /// by rebuilding everything it held, not only what changed meanwhile.
    pub(crate) replacing: AtomicBool,
    /// Set while rejoining (shared with `Failover`).
    pub(crate) rejoining: Arc<AtomicBool>,
    /// Set once start-up learned the cluster's current map: until then this
    /// IOM serves nothing (its own map on disk may be stale).
    pub ready: tokio::sync::watch::Sender<bool>,
    /// Cancelled when the IOM's background work stops.
    pub(crate) stop: CancellationToken,
}

/// Crash points of the rejoin are hit "at" this IOM.
impl crate::failpoint::At for Rejoin {
    fn iom(&self) -> IomId {
        self.me
    }
    fn dir(&self) -> &std::path::Path {
        &self.data_dir
    }
}

impl Rejoin {
    async fn propose(&self, next: common::ClusterMap, changed: IomId) -> bool {
        self.failover.propose(next, changed).await
    }

    async fn marks_from(&self, proxy: IomId, req: HandoverReq) -> Option<RebuildMarks> {
        match self.caller.call_peer(proxy, &Request::Handover(req), Bytes::new(), self.timeouts.handover_call).await {
            Ok((Reply::Handover(HandoverResp::Marks(m)), _)) => Some(m),
            _ => None,
        }
    }

    /// Declared down while away: recover, rebuild, take the role back.
    pub async fn rejoin(self: Arc<Self>) {
        self.rejoining.store(true, Ordering::Release);
        let me = self.me;
        let mut recovered = false;
        // Let the peers hear this IOM before it asks them to vote it back.
        tokio::time::sleep(self.timeouts.rejoin_grace).await;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let map = self.member.current();
            let proxy = match map.state(me) {
                IomState::Up => break,
                IomState::Down { proxy } | IomState::Rebuilding { proxy } => proxy,
            };
            let Some(marks) = self.marks_from(proxy, HandoverReq::RebuildMarks { about: me }).await else {
                tracing::warn!(iom = me.0, proxy = proxy.0, "rejoin: stand-in not reachable yet");
                tokio::time::sleep(self.timeouts.unreachable_pause).await;
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
                self.recovery.clone().recover_with(Some(&marks)).await;
                recovered = true;
            }
            // Tell the cluster this IOM is back and rebuilding.
            if matches!(map.state(me), IomState::Down { .. }) {
                let mut next = map.clone();
                next.epoch = Epoch(map.epoch.0 + 1);
                next.states[me.0 as usize] = IomState::Rebuilding { proxy };
                if !self.propose(next, me).await {
                    tokio::time::sleep(self.timeouts.retry_pause).await;
                    continue;
                }
            }
            if self.replacing.load(Ordering::Acquire) {
                self.full_rebuild(proxy).await;
            }
            self.rebuild_from(proxy).await;
            // Handover: the stand-in stops serving, hands over its last
            // marks. The map is taken before the freeze, and the proposal
            // to be up again is made from it: if the cluster moved on
            // meanwhile (this IOM was declared down again because it fell
            // silent while frozen, and the stand-in unfroze and went on
            // marking), the proposal's epoch is stale and no voter grants it.
            let frozen_in = self.member.current();
            let Some(last) = self.marks_from(proxy, HandoverReq::Freeze { about: me }).await else {
                // Unreachable, or its map does not show this IOM rebuilding yet.
                tokio::time::sleep(self.timeouts.retry_pause).await;
                continue;
            };
            crate::crash_point!(&self, "rejoin::after-freeze");
            // No stand-in write runs now: a round or two rebuilds the rest
            // (a block whose parity was still on its way waits one round).
            // `None`: the marks left are not known.
            let mut left = Some(last);
            for _ in 0..HANDOVER_ROUNDS {
                match left.take() {
                    Some(m) if !is_empty(&m) => {
                        // Unthrottled: the role's writes wait meanwhile.
                        self.rebuild_marks_now(proxy, m, false).await;
                        left = self.marks_from(proxy, HandoverReq::RebuildMarks { about: me }).await;
                    }
                    m => {
                        left = m;
                        break;
                    }
                }
            }
            if left.as_ref().is_some_and(is_empty) && matches!(frozen_in.state(me), IomState::Rebuilding { .. }) {
                let mut next = frozen_in.clone();
                next.epoch = Epoch(frozen_in.epoch.0 + 1);
                next.states[me.0 as usize] = IomState::Up;
                if self.propose(next, me).await {
                    break;
                }
            } else {
                tracing::warn!(
                    iom = me.0,
                    proxy = proxy.0,
                    blocks = left.as_ref().map(|m| m.blocks.len()),
                    groups = left.as_ref().map(|m| m.groups.len()),
                    "rejoin: marks left after the handover's rounds; the stand-in serves again, trying later"
                );
            }
            let _ = self
                .caller
                .call_peer(
                    proxy,
                    &Request::Handover(HandoverReq::Unfreeze { about: me }),
                    Bytes::new(),
                    self.timeouts.peer_call,
                )
                .await;
            tokio::time::sleep(self.timeouts.retry_pause).await;
        }
        self.progress.active.store(false, Ordering::Release);
        if self.replacing.swap(false, Ordering::AcqRel) {
            let m = self.data_dir.join(crate::storage::REPLACING_MARKER);
            if let Err(e) = std::fs::remove_file(&m)
                .map_err(|e| e.to_string())
                .and_then(|_| crate::fsutil::sync_dir(&self.data_dir).map_err(|e| e.to_string()))
            {
                tracing::error!("cannot remove {}: {e}", m.display());
            }
            tracing::warn!(iom = me.0, "replacement complete: every block and parity group rebuilt");
        }
        self.rejoining.store(false, Ordering::Release);
        tracing::warn!(iom = me.0, epoch = self.member.epoch().0, "rejoin complete: serving again");
    }

    /// A replacement (`iomfs replace`): rebuilds every data block and parity
    /// group this IOM holds, found by listing the other IOMs once, until
    /// each is here at the version that listing named (or newer). Writes
    /// meanwhile go to the stand-in, which marks them; the marks rounds that
    /// follow bring those up to date, as for any rejoin.
    async fn full_rebuild(self: &Arc<Self>, proxy: IomId) {
        self.progress.started.lock().get_or_insert_with(Instant::now);
        self.progress.active.store(true, Ordering::Release);
        let (mut blocks, mut groups) = loop {
            if self.stop.is_cancelled() {
                return;
            }
            match self.held_elsewhere().await {
                Ok(x) => break x,
                Err(e) => {
                    tracing::warn!(iom = self.me.0, "replacement: cannot list the other IOMs yet: {e}");
                    tokio::time::sleep(self.timeouts.unreachable_pause).await;
                }
            }
        };
        tracing::warn!(
            iom = self.me.0,
            blocks = blocks.len(),
            groups = groups.len(),
            "replacement: rebuilding everything this IOM held from the other IOMs"
        );
        for pass in 0u32.. {
            blocks.retain(|(k, want)| self.storage.map.head(k).version < *want);
            groups.retain(|(g, want)| {
                let have = self.storage.map.parity_head(g).members;
                want.iter().enumerate().any(|(k, w)| have.get(k).copied().unwrap_or_default() < *w)
            });
            if blocks.is_empty() && groups.is_empty() || self.stop.is_cancelled() {
                return;
            }
            if pass > 0 {
                tracing::warn!(
                    iom = self.me.0,
                    pass,
                    blocks = blocks.len(),
                    groups = groups.len(),
                    "replacement: some blocks could not be rebuilt yet; trying again"
                );
                tokio::time::sleep(self.timeouts.unreachable_pause).await;
            }
            let m = RebuildMarks {
                blocks: blocks.clone(),
                groups: groups.iter().map(|(g, _)| *g).collect(),
                drops: Vec::new(),
                frozen: false,
            };
            self.rebuild_marks_now(proxy, m, true).await;
        }
    }

    /// What the other IOMs say this IOM holds: its data blocks (from the
    /// parity IOMs' groups, with the member version each parity covers) and
    /// its parity groups (from the data IOMs' blocks, with their heads).
    #[allow(clippy::type_complexity)]
    async fn held_elsewhere(&self) -> Result<(Vec<(BlockKey, Version)>, Vec<(GroupKey, Vec<Version>)>), String> {
        let (me, layout) = (self.me, self.layout);
        let n = layout.n() as usize;
        let mut blocks = Vec::new();
        let mut groups: BTreeMap<GroupKey, Vec<Version>> = BTreeMap::new();
        for j in (0..self.width).map(IomId).filter(|&j| j != me) {
            let listed = self
                .list_pages(
                    j,
                    |after| DataReq::ListBlocks { after, limit: LIST_PAGE },
                    |r| match r {
                        DataResp::Blocks(b) => Some(b),
                        _ => None,
                    },
                    |b| b.key,
                )
                .await?;
            for x in listed {
                let g = layout.group_key(x.key);
                if layout.parity_iom(g.object, g.group) == me {
                    groups.entry(g).or_insert_with(|| vec![Version(0); n])[(x.key.block.0 % n as u64) as usize] =
                        x.version;
                }
            }
            let listed = self
                .list_pages(
                    j,
                    |after| DataReq::ListGroups { after, limit: LIST_PAGE },
                    |r| match r {
                        DataResp::Groups(g) => Some(g),
                        _ => None,
                    },
                    |g| g.key,
                )
                .await?;
            for g in listed {
                for (k, v) in g.versions.iter().enumerate() {
                    let key = BlockKey { object: g.key.object, block: layout.member_block(g.key.group, k as u32) };
                    if *v > Version(0) && layout.data_iom(key.object, key.block) == me {
                        blocks.push((key, *v));
                    }
                }
            }
        }
        Ok((blocks, groups.into_iter().collect()))
    }

    /// Every entry of one of IOM `j`'s listings (`ListBlocks`, `ListGroups`),
    /// page by page.
    async fn list_pages<K: Copy, T>(
        &self,
        j: IomId,
        req: impl Fn(Option<K>) -> DataReq,
        entries: impl Fn(DataResp) -> Option<Vec<T>>,
        key: impl Fn(&T) -> K,
    ) -> Result<Vec<T>, String> {
        let (mut all, mut after) = (Vec::new(), None);
        loop {
            let page = match self
                .caller
                .call_peer(j, &Request::Data(req(after)), Bytes::new(), self.timeouts.listing_call)
                .await
            {
                Ok((Reply::Data(r), _)) => {
                    entries(r).ok_or_else(|| format!("IOM {j} answered a listing with another reply"))?
                }
                Ok((r, _)) => return Err(format!("IOM {j} answered a listing with {r:?}")),
                Err(e) => return Err(format!("listing of IOM {j}: {e}")),
            };
            after = page.last().map(&key);
            let done = page.len() < LIST_PAGE as usize;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// Rebuilds marked blocks until the stand-in has none left.
    async fn rebuild_from(self: &Arc<Self>, proxy: IomId) {
        self.progress.started.lock().get_or_insert_with(Instant::now);
        self.progress.active.store(true, Ordering::Release);
        let mut before = usize::MAX;
        loop {
            if self.stop.is_cancelled() {
                return;
            }
            let Some(m) = self.marks_from(proxy, HandoverReq::RebuildMarks { about: self.me }).await else {
                tokio::time::sleep(self.timeouts.retry_pause).await;
                continue;
            };
            // Rounds go on while they shrink the marks; a short tail, or
            // one that writers keep marking again (a hot block or group is
            // never done while writes go on), is left to the handover,
            // where no writes run.
            let n = count(&m);
            if n == 0 || n <= HANDOVER_TAIL || n >= before {
                return;
            }
            before = n;
            self.rebuild_marks_now(proxy, m, true).await;
        }
    }

    /// Counts one rebuilt block or group of `n` bytes, then throttles
    /// (`rebuild_mib_s`, bytes/s in `limit`, 0 = none): keeps the average
    /// rate of this round (`bytes0` counted when it started at `started`)
    /// at or below the limit.
    async fn rebuilt_one(&self, n: u64, limit: u64, started: Instant, bytes0: u64) {
        let through = self.progress.throttled.fetch_add(n, Ordering::Relaxed) + n;
        if limit > 0 {
            let bytes = through.saturating_sub(bytes0) as f64;
            let should = Duration::from_secs_f64(bytes / limit as f64);
            let el = started.elapsed();
            if should > el {
                tokio::time::sleep(should - el).await;
            }
        }
        self.progress.done.fetch_add(1, Ordering::Relaxed);
        self.progress.bytes.fetch_add(n, Ordering::Relaxed);
        self.progress.sample();
    }

    /// Rebuilds one set of marks and tells the stand-in which are done;
    /// at `rebuild_mib_s` if `throttled`.
    async fn rebuild_marks_now(self: &Arc<Self>, proxy: IomId, m: RebuildMarks, throttled: bool) {
        let total = (m.blocks.len() + m.groups.len()) as u64;
        let done0 = self.progress.done.load(Ordering::Relaxed);
        self.progress.total.store(done0 + total, Ordering::Relaxed);
        for (o, from) in &m.drops {
            self.storage.commit(&Record::Dropped { object: *o, from: *from }, false, Wait::Written);
        }
        let limit = if throttled { self.tuning.rebuild_mib_s << 20 } else { 0 };
        let started = Instant::now();
        let bytes0 = self.progress.throttled.load(Ordering::Relaxed);
        let me = self.clone();
        let rebuilt: Vec<_> = futures::stream::iter(m.blocks.iter().copied())
            .map(|(key, want)| {
                let me = me.clone();
                async move {
                    let g = me.locks.lock(key).await;
                    let (v, bytes) = match me.group.reconstruct(key, None).await {
                        Ok(x) => x,
                        Err(e) => {
                            tracing::debug!(iom = me.me.0, ?key, "rebuild: block not rebuilt this round: {e}");
                            return None;
                        }
                    };
                    if v < want {
                        // Parity not there yet: next round.
                        tracing::debug!(
                            iom = me.me.0,
                            ?key,
                            have = v.0,
                            want = want.0,
                            "rebuild: parity behind the mark"
                        );
                        return None;
                    }
                    let n = bytes.len() as u64;
                    if let Err(e) = me.storage.install_data(key, v, bytes).await {
                        tracing::debug!(iom = me.me.0, ?key, "rebuild: cannot install a rebuilt block: {e}");
                        return None;
                    }
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
                    if let Err(e) = me.parity.recompute(g).await {
                        tracing::debug!(iom = me.me.0, group = ?g, "rebuild: group not recomputed this round: {e}");
                        return None;
                    }
                    me.rebuilt_one(me.layout.block_size() as u64, limit, started, bytes0).await;
                    Some(g)
                }
            })
            .buffer_unordered(REBUILD_PARALLEL)
            .filter_map(|x| async move { x })
            .collect()
            .await;
        let done = RebuildMarks { blocks: rebuilt, groups, drops: m.drops.clone(), frozen: false };
        crate::crash_point!(self, "rebuild::before-clear-marks");
        let _ = self
            .caller
            .call_peer(
                proxy,
                &Request::Handover(HandoverReq::ClearMarks { about: self.me, marks: done }),
                Bytes::new(),
                self.timeouts.role_call,
            )
            .await;
        self.storage.journal.flush().await;
    }

    /// A replacement whose map still says it is up (it came back before its
    /// predecessor was declared down) declares itself down, so its proxy
    /// serves its role until the full rebuild is done. Peers accept a
    /// down-declaration from the IOM itself without waiting for silence.
    async fn stand_aside(self: &Arc<Self>) {
        loop {
            let map = self.member.current();
            if map.state(self.me) != IomState::Up {
                return;
            }
            let proxy = map.proxy_of(self.me);
            let mut next = map.clone();
            next.epoch = Epoch(map.epoch.0 + 1);
            next.states[self.me.0 as usize] = IomState::Down { proxy };
            if map.meta_home == self.me {
                // The mirror (the home's proxy) takes the namespace over.
                next.meta_home = proxy;
            }
            tracing::warn!(
                iom = self.me.0,
                proxy = proxy.0,
                "replacement: declaring this IOM down until it is rebuilt"
            );
            if self.propose(next, self.me).await {
                return;
            }
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(self.timeouts.retry_pause) => {}
            }
        }
    }

    /// Stops this IOM (exit 78) if another IOM has seen it complete a write
    /// its store knows nothing of: the store is older than what this IOM
    /// acknowledged (a backup or snapshot put back, a stale copy of the
    /// disk), and serving it would return old bytes as current ones.
    /// Transaction ids rise with every start (`start_incarnation`), so a
    /// store that is the latest one always starts above every id a peer saw.
    fn refuse_a_stale_store(&self, seen: Option<(IomId, u64)>) {
        let mine = self.storage.map.peek_next_tx();
        let Some((j, tx)) = seen else { return };
        if tx < mine {
            return;
        }
        let msg = format!(
            "the store of IOM {me} in {data} is older than what IOM {me} acknowledged: IOM {j} saw it complete \
             write transaction {tx:#x}, and this store's transactions start at {mine:#x} (a backup or snapshot \
             put back, or a stale copy of the disk). Serving it would return old data as current, so this IOM \
             will not start. Move everything in {data} away except node.pem and node.key, then run \
             `iomfs replace --dir {dir} --id {me}`: it rebuilds this IOM's share from the others",
            me = self.me.0,
            data = self.data_dir.display(),
            dir = self.cluster_dir.display(),
        );
        tracing::error!("{msg}");
        eprintln!("iom-server: {msg}");
        std::process::exit(78);
    }

    /// The highest transaction id of this IOM whose completion a peer has
    /// seen, and that peer (peers that do not answer within 1 s are skipped).
    async fn done_seen_by_peers(&self) -> Option<(IomId, u64)> {
        let w = self.width;
        let asks = (0..w).map(IomId).filter(|&j| j != self.me).map(|j| async move {
            let r = self
                .caller
                .call_peer(
                    j,
                    &Request::Recovery(RecoveryReq::DoneSeen { of: self.me }),
                    Bytes::new(),
                    self.timeouts.probe_call,
                )
                .await;
            match r {
                Ok((Reply::Recovery(RecoveryResp::DoneSeen { tx }), _)) => Some((j, tx)),
                _ => None,
            }
        });
        let seen = futures::future::join_all(asks).await;
        tracing::debug!(iom = self.me.0, ?seen, "store age check: completed writes peers saw");
        seen.into_iter().flatten().filter(|(_, tx)| *tx > 0).max_by_key(|(_, tx)| *tx)
    }

    /// Start-up: learn the cluster's current map, then recover (this IOM is
    /// still up) or rejoin (it was declared down while it was away).
    pub async fn join(self: Arc<Self>) {
        // Until the current map is known, a map saying this IOM is down is
        // news to act on (rejoin), not a reason to stop.
        self.rejoining.store(true, Ordering::Release);
        let w = self.width;
        let fetches = (0..w).map(IomId).filter(|&j| j != self.me).map(|j| {
            let me = self.clone();
            async move { me.failover.fetch_map(j).await }
        });
        futures::future::join_all(fetches).await;
        let seen = self.done_seen_by_peers().await;
        if self.replacing.load(Ordering::Acquire) {
            if let Some((_, tx)) = seen {
                // Transaction ids of the new store start above the old one's.
                let inc = (tx >> 40) + 1;
                if let Err(e) = crate::storage::raise_incarnation(&self.data_dir, inc) {
                    tracing::error!(iom = self.me.0, "cannot raise the start counter: {e}");
                }
                self.storage.map.start_incarnation(inc);
            }
        } else {
            self.refuse_a_stale_store(seen);
        }
        if self.replacing.load(Ordering::Acquire) {
            // Serve nothing while the map still gives this IOM its role:
            // its store does not hold that role's blocks yet.
            self.stand_aside().await;
            if self.stop.is_cancelled() {
                return;
            }
        }
        self.ready.send_replace(true);
        let map = self.member.current();
        tracing::info!(iom = self.me.0, epoch = map.epoch.0, state = ?map.state(self.me), "joined the cluster map");
        match map.state(self.me) {
            IomState::Up => {
                self.rejoining.store(false, Ordering::Release);
                self.recovery.clone().recover().await
            }
            IomState::Down { .. } | IomState::Rebuilding { .. } => self.rejoin().await,
        }
    }
}
