//! Wiring of one IOM: start-up (replay, allocator), the shared state every
//! handler uses, checkpoints and orderly shutdown.

use crate::cache::{Cache, CacheKey};
use crate::journal::{Journal, Wait};
use crate::links::Links;
use crate::locks::KeyLocks;
use crate::map::BlockMap;
use crate::membership::Membership;
use crate::namespace::Namespace;
use crate::parity::ParitySide;
use crate::records::Record;
use crate::store::{Allocator, Store};
use crate::timeouts::Timeouts;
use crate::workers::{Tier, Workers};
use crate::write_path::Inflight;
use crate::Error;
use common::cluster::ClusterMap;
use common::config::{ClusterConfig, ClusterPaths};
use common::wire::{Hello, IomStats, PeerKind, PROTOCOL_VERSION};
use common::{codec, BlockKey, DiskAddr, IomId, Layout};
use std::fs::File;
use std::net::SocketAddr;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// Journal bytes since the last checkpoint that trigger a new one.
const CHECKPOINT_BYTES: u64 = 64 << 20;

pub struct StartOptions {
    pub dir: PathBuf,
    pub id: IomId,
    /// Overrides the config's journal directory (NVRAM case).
    pub journal_dir: Option<PathBuf>,
}

pub struct Iom {
    pub id: IomId,
    pub cfg: ClusterConfig,
    pub paths: ClusterPaths,
    pub layout: Layout,
    pub data_dir: PathBuf,
    pub journal_dir: PathBuf,
    pub store: Arc<Store>,
    pub cache: Arc<Cache>,
    pub journal: Journal,
    pub map: BlockMap,
    pub locks: KeyLocks<BlockKey>,
    pub pool: net::Pool,
    pub links: Links,
    pub parity: ParitySide,
    pub inflight: Inflight,
    pub fence: crate::recovery_exec::Fence,
    /// Failed IOMs whose role this stand-in is handing back.
    pub frozen: parking_lot::Mutex<std::collections::HashSet<IomId>>,
    /// Stand-in writes running (a handover waits for them).
    pub standin_ops: std::sync::atomic::AtomicU64,
    /// Failed IOMs this one stands in for, once their unfinished work is published.
    pub activated: parking_lot::Mutex<std::collections::HashSet<IomId>>,
    pub activation: tokio::sync::Notify,
    pub rejoin_flag: std::sync::atomic::AtomicBool,
    /// This IOM's store replaced a lost one (`iomfs replace`): it rejoins
    /// by rebuilding everything it held, not only what changed meanwhile.
    pub replacing: std::sync::atomic::AtomicBool,
    /// Set once start-up learned the cluster's current map: until then this
    /// IOM serves nothing (its own map on disk may be stale).
    pub ready: std::sync::atomic::AtomicBool,
    /// Data block versions rebuilt from their group because their slot
    /// could not be read (self-healing reads).
    pub repairs: std::sync::atomic::AtomicU64,
    /// Failed reads of this IOM's own disk (errors and checksum mismatches).
    pub disk_errors: std::sync::atomic::AtomicU64,
    pub rebuild: crate::rebuild::RebuildProgress,
    /// Transactions the journal left open at start-up, for recovery.
    pub startup_open: parking_lot::Mutex<Option<crate::recovery_exec::OpenTxs>>,
    pub member: Membership,
    /// Every time limit, from `[tuning]` (see `timeouts`).
    pub timeouts: Timeouts,
    pub namespace: Namespace,
    /// Told to stop when this IOM's background tasks must end (the
    /// Background tier's token of `workers`).
    pub shutdown: CancellationToken,
    /// Every task this IOM runs, named and tracked (see `workers`).
    pub workers: Workers,
    /// Held while a map checkpoint is taken and written.
    checkpointing: tokio::sync::Mutex<()>,
    pub endpoint: quinn::Endpoint,
    _lock: File,
}

fn lock_dir(dir: &std::path::Path) -> Result<File, Error> {
    let p = dir.join("lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&p)
        .map_err(|e| Error::io(format!("open {}", p.display()), e))?;
    // SAFETY: flock on a valid descriptor we own.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(Error::Format(format!(
            "{} is locked: another iom-server is already running on this directory",
            dir.display()
        )));
    }
    Ok(f)
}

impl Iom {
    /// Opens storage, replays the journal and binds the QUIC endpoint.
    pub async fn start(opts: StartOptions) -> Result<Arc<Iom>, Error> {
        let cfg = ClusterConfig::load(&opts.dir)?;
        let timeouts = Timeouts::from_tuning(&cfg.tuning);
        let paths = ClusterPaths::new(&opts.dir);
        let icfg = cfg.iom(opts.id)?.clone();
        let layout = cfg.layout();
        let data_dir = paths.data_dir(&icfg);
        let journal_dir = opts.journal_dir.clone().unwrap_or_else(|| paths.journal_dir(&icfg));
        std::fs::create_dir_all(&data_dir).map_err(|e| Error::io(format!("create {}", data_dir.display()), e))?;
        let lock = lock_dir(&data_dir)?;
        crate::fsutil::sweep_temp(&data_dir);

        let replacing = prepare_store(&paths, &data_dir, opts.id)?;
        let (store, fresh) = Store::open(&data_dir, cfg.block_size, opts.id.0, &cfg.cluster_id)?;
        if fresh {
            // The store exists now: the marker that allowed it is spent.
            let marker = paths.new_store_marker(opts.id);
            if let Err(e) = std::fs::remove_file(&marker) {
                tracing::warn!("cannot remove {}: {e}", marker.display());
            }
            crate::fsutil::sync_dir(&paths.iom_dir(opts.id))?;
        }
        let store = Arc::new(store);
        let map = BlockMap::new(layout);
        // A damaged checkpoint or sealed journal segment: this store cannot
        // be trusted, and guessing would risk serving wrong data. Stop and
        // say how to get the IOM back (its proxy serves it meanwhile).
        let damaged = |e: Error| match e {
            Error::Format(m) => Error::Format(format!(
                "{m}. IOM {id}'s store is damaged and it will not start; the cluster serves its share from \
                 its proxy (degraded). If the disk is failing, or to rebuild the store: move everything in {} \
                 away except node.pem and node.key, then run `iomfs replace --dir {} --id {id}`",
                data_dir.display(),
                opts.dir.display(),
                id = opts.id.0
            )),
            other => other,
        };
        let from = map.load_snapshot(&data_dir).map_err(damaged)?;
        let (journal, replayed) =
            Journal::open(&journal_dir, from, store.file(), timeouts.journal_flush).map_err(damaged)?;
        let n = replayed.records.len();
        for (i, raw) in replayed.records.iter().enumerate() {
            let rec: Record = codec::decode(raw)
                .map_err(|e| damaged(Error::Format(format!("journal record {i} of {n} cannot be decoded: {e}"))))?;
            map.apply(&rec);
        }
        let capacity = match icfg.capacity {
            Some(c) => c / cfg.block_size as u64,
            None => fs_capacity(&data_dir, cfg.block_size),
        };
        store.set_allocator(Allocator::from_live(capacity + 1, map.live_addrs()));
        // Transaction ids carry this start's incarnation, so an update sent
        // just before a crash (its a5 never journaled) can never be confused
        // with a transaction of a later start.
        let incarnation = next_incarnation(&data_dir)?;
        map.start_incarnation(incarnation);
        let (open_d, open_p) = (map.dtx.lock().len(), map.ptx.lock().len());
        let open_at_start = crate::recovery_exec::OpenTxs {
            data: map.dtx.lock().iter().map(|(k, v)| (*k, v.clone())).collect(),
            parity: map.ptx.lock().iter().map(|(k, v)| (*k, v.clone())).collect(),
        };
        tracing::info!(
            iom = opts.id.0,
            fresh,
            replayed = n,
            open_data_txs = open_d,
            open_parity_txs = open_p,
            "storage opened"
        );

        let namespace = Namespace::open(
            &data_dir,
            store.file(),
            // A replacement holds no namespace: it gets a copy from the
            // namespace server when it becomes the mirror again.
            cfg.meta_home == opts.id.0 && !replacing,
            timeouts.journal_flush,
            cfg.client_lease(),
        )?;
        let state_map = crate::membership_state::load(&data_dir)?
            .unwrap_or_else(|| ClusterMap::initial(cfg.width(), IomId(cfg.meta_home)));
        let member =
            Membership::new(opts.id, state_map, data_dir.clone(), timeouts.heartbeat, timeouts.failure_timeout);

        let bind: SocketAddr = tokio::net::lookup_host(&icfg.addr)
            .await
            .map_err(|e| Error::Format(format!("IOM {} address '{}' does not resolve: {e}", opts.id, icfg.addr)))?
            .next()
            .ok_or_else(|| Error::Format(format!("IOM {} address '{}' does not resolve", opts.id, icfg.addr)))?;
        let ident = net::tls::Identity::load_iom(&paths, opts.id).map_err(|e| Error::Format(e.to_string()))?;
        let sc = net::tls::server_config(&ident, cfg.transport).map_err(|e| Error::Format(e.to_string()))?;
        let cc = net::tls::client_config(&ident, cfg.transport).map_err(|e| Error::Format(e.to_string()))?;
        let endpoint = net::tls::make_endpoint(bind, Some(sc), cfg.transport).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                Error::Format(format!(
                    "UDP port {bind} is in use: is IOM {} already running, or another program on that port?",
                    opts.id
                ))
            } else {
                Error::io(format!("bind {bind}"), e)
            }
        })?;
        let pool = net::Pool::new(
            endpoint.clone(),
            cc,
            Hello { protocol: PROTOCOL_VERSION, cluster_id: cfg.cluster_id.clone(), peer: PeerKind::Iom(opts.id) },
            cfg.ioms.iter().map(|i| i.addr.clone()).collect(),
        );
        let cache = Arc::new(Cache::new((cfg.tuning.cache_mib as usize) << 20));
        let workers = Workers::new();
        let iom = Arc::new(Iom {
            id: opts.id,
            links: Links::new(cfg.width()),
            parity: ParitySide::default(),
            inflight: Inflight::default(),
            fence: Default::default(),
            frozen: Default::default(),
            standin_ops: Default::default(),
            activated: Default::default(),
            activation: Default::default(),
            rejoin_flag: Default::default(),
            replacing: std::sync::atomic::AtomicBool::new(replacing),
            ready: Default::default(),
            repairs: Default::default(),
            disk_errors: Default::default(),
            rebuild: Default::default(),
            startup_open: parking_lot::Mutex::new(Some(open_at_start)),
            locks: KeyLocks::default(),
            shutdown: workers.token(Tier::Background),
            workers,
            checkpointing: tokio::sync::Mutex::new(()),
            cfg,
            paths,
            layout,
            data_dir,
            journal_dir,
            store,
            cache,
            journal,
            map,
            pool,
            member,
            timeouts,
            namespace,
            endpoint,
            _lock: lock,
        });
        Ok(iom)
    }

    /// Applies `rec` to the map, then appends it to the journal (the order
    /// checkpoints rely on). Slots the record frees return to the allocator
    /// once it is durable.
    pub fn commit(&self, rec: &Record, after_data_sync: bool, wait: Wait) -> Option<oneshot::Receiver<()>> {
        let freed = self.map.apply(rec);
        self.uncache(rec);
        let payload = codec::encode(rec).expect("journal records encode");
        let cb = self.free_on_durable(freed);
        self.journal.append(payload, after_data_sync, wait, cb)
    }

    fn uncache(&self, rec: &Record) {
        if let Record::Issued { key, new, .. } = rec {
            if self.map.entry(key).is_none() {
                // A write that raced a drop (the map ignored it): its new
                // bytes must not outlive it in the cache, where a later
                // incarnation of the block (versions restart at 1) could
                // find them.
                self.cache.remove(&CacheKey::Data(*key, new.version));
            }
        }
        if let Record::Dropped { object, from } = rec {
            // Versions of a dropped block restart at 1: forget cached ones.
            let first = from.0 * self.layout.n() as u64;
            let (o, g) = (*object, *from);
            self.cache.retain(|k| match k {
                CacheKey::Data(b, _) => !(b.object == o && b.block.0 >= first),
                CacheKey::Parity(p, _) => !(p.object == o && p.group >= g),
            });
        }
    }

    pub fn free_on_durable(&self, freed: Vec<DiskAddr>) -> Option<Box<dyn FnOnce() + Send>> {
        if freed.is_empty() {
            return None;
        }
        let store = self.store.clone();
        Some(Box::new(move || {
            for a in freed {
                store.free(a);
            }
        }))
    }

    /// Makes a cache key for a data version.
    pub fn data_cache_key(key: BlockKey, v: common::Version) -> CacheKey {
        CacheKey::Data(key, v)
    }

    /// Writes a checkpoint of the map and drops the journal segments it covers.
    /// The cut (rotation and the copy of the map, with no `.await`
    /// between them) is taken on the event loop; encoding, writing and
    /// fsyncing it and removing the old segments run off it. One
    /// checkpoint at a time, so an older cut never replaces a newer one.
    pub async fn checkpoint(&self) -> Result<(), Error> {
        let _one = self.checkpointing.lock().await;
        let seg = self.journal.rotate_now();
        let cut = self.map.snapshot_cut(seg);
        let (data_dir, journal_dir) = (self.data_dir.clone(), self.journal_dir.clone());
        crate::fsutil::off_loop("map checkpoint", move || {
            cut.write(&data_dir)?;
            Journal::remove_before(&journal_dir, seg)
        })
        .await?;
        tracing::info!(iom = self.id.0, segment = seg, "checkpoint written");
        Ok(())
    }

    /// Background: checkpoint when the journal has grown enough.
    pub async fn checkpoint_worker(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.timeouts.checkpoint_poll) => {}
            }
            if self.journal.stats.bytes_since_rotate.load(Ordering::Relaxed) > CHECKPOINT_BYTES {
                if let Err(e) = self.checkpoint().await {
                    tracing::error!(iom = self.id.0, "checkpoint failed: {e}");
                }
            }
        }
    }

    /// Starts the IOM's long-lived tasks: the acceptor, joining the
    /// cluster (then recovery or rejoin), heartbeats, failure detection,
    /// map reactions, checkpoints and the namespace's mirror and GC.
    pub fn start_workers(self: &Arc<Self>) {
        let w = &self.workers;
        w.spawn(Tier::Intake, "acceptor", crate::service::serve(self.clone()));
        w.spawn(Tier::Background, "join", self.clone().join());
        w.spawn(Tier::Background, "heartbeat", self.clone().heartbeat_worker());
        w.spawn(Tier::Background, "detector", self.clone().detector_worker());
        w.spawn(Tier::Background, "map-watcher", self.clone().map_watcher());
        w.spawn(Tier::Background, "checkpointer", self.clone().checkpoint_worker());
        w.spawn(Tier::Background, "ns-mirror", Namespace::mirror_worker(self.clone()));
        w.spawn(Tier::Background, "ns-worker", Namespace::worker(self.clone()));
    }

    /// Orderly stop, tier by tier (`workers::Tier`): no new connections
    /// or writes; background work ends (peers stop hearing heartbeats);
    /// write transactions drain (bounded) and the parity side's batches
    /// and links end; checkpoint, journal flushed and closed; connections
    /// closed. Each tier gets a deadline; tasks still running past it are
    /// named in the log (the process exits after the last tier anyway).
    pub async fn stop(&self) {
        let t = &self.timeouts;
        self.endpoint.set_server_config(None);
        let mut left = self.workers.stop_tier(Tier::Intake, t.stop_tier).await;
        left.extend(self.workers.stop_tier(Tier::Background, t.stop_tier).await);
        let drained = tokio::time::timeout(t.shutdown_drain, self.inflight.wait_all()).await.is_ok();
        if !drained {
            tracing::warn!(iom = self.id.0, "stopping with unfinished writes; recovery will finish them");
        }
        left.extend(self.workers.stop_tier(Tier::Protocol, t.stop_tier).await);
        if let Err(e) = self.checkpoint().await {
            tracing::error!(iom = self.id.0, "final checkpoint failed: {e}");
        }
        self.namespace.stop().await;
        self.journal.flush().await;
        self.journal.stop().await;
        self.pool.close();
        self.endpoint.close(0u32.into(), b"shutdown");
        left.extend(self.workers.stop_tier(Tier::Connections, t.stop_tier).await);
        for (name, n) in left {
            tracing::warn!(iom = self.id.0, task = name, count = n, "task still running at stop");
        }
    }

    pub fn stats(&self) -> IomStats {
        let (used, total) = self.store.usage();
        let (room, disk) = self.store.space();
        let (d, p) = self.map.counts();
        let js = &self.journal.stats;
        IomStats {
            iom: self.id.0,
            epoch: self.member.epoch().0,
            block_size: self.cfg.block_size,
            slots_used: used,
            slots_total: total,
            data_blocks: d,
            parity_blocks: p,
            journal_records: js.records.load(Ordering::Relaxed),
            journal_flushes: js.flushes.load(Ordering::Relaxed),
            journal_bytes: js.bytes.load(Ordering::Relaxed),
            cache_bytes: self.cache.bytes(),
            cache_hits: self.cache.hits.load(Ordering::Relaxed),
            cache_misses: self.cache.misses.load(Ordering::Relaxed),
            parity_writes: self.parity.writes.load(Ordering::Relaxed),
            parity_deltas: self.parity.deltas.load(Ordering::Relaxed),
            rss_bytes: rss_bytes(),
            open_txs: self.map.dtx.lock().len() as u64,
            open_parity_txs: self.map.ptx.lock().len() as u64,
            rebuild_done: self.rebuild.done.load(Ordering::Relaxed),
            rebuild_total: self.rebuild.total.load(Ordering::Relaxed),
            rebuild_bytes_per_s: self.rebuild.rate(),
            serving: self.ready.load(Ordering::Acquire),
            repaired_blocks: self.repairs.load(Ordering::Relaxed),
            disk_errors: self.disk_errors.load(Ordering::Relaxed),
            repaired_parity: self.parity.repairs.load(Ordering::Relaxed),
            room_bytes: room,
            disk_bytes: disk,
        }
    }
}

/// Marker in the data directory while a replacement's full rebuild is not
/// finished (it survives restarts, so a crash mid-rebuild continues it).
pub const REPLACING_MARKER: &str = "replacing";

/// Checks that this IOM may open its store. A store that exists is opened
/// (its header names cluster and IOM). A missing one may only be created
/// when `iomfs init` or `iomfs replace` left the marker allowing it: an IOM
/// that comes up on an empty disk without it would answer every read of
/// the blocks it held with zeros. Returns whether this store replaces a
/// lost one (full rebuild on rejoin).
fn prepare_store(paths: &ClusterPaths, data_dir: &std::path::Path, id: IomId) -> Result<bool, Error> {
    let replacing = data_dir.join(REPLACING_MARKER);
    if data_dir.join(crate::store::BLOCK_FILE).exists() {
        return Ok(replacing.exists());
    }
    let marker = paths.new_store_marker(id);
    let kind = match std::fs::read_to_string(&marker) {
        Ok(k) => k.trim().to_string(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Format(format!(
                "IOM {id}'s store in {} is empty (no {}), but this IOM held data for the cluster: its disk was \
                 replaced or its files were moved. Serving from an empty store would return zeros, so this IOM \
                 will not start. If the disk was replaced, run `iomfs replace --dir {} --id {id}`: it joins as a \
                 replacement and rebuilds everything from the other IOMs (the cluster stays degraded until then). \
                 If the files were moved, put them back.",
                data_dir.display(),
                crate::store::BLOCK_FILE,
                paths.dir.display(),
            )))
        }
        Err(e) => return Err(Error::io(format!("read {}", marker.display()), e)),
    };
    match kind.as_str() {
        "new" => Ok(false),
        "replace" => {
            // Recorded before the store exists, so a crash between the two
            // can never leave an empty store that looks like a normal one.
            crate::fsutil::write_atomic(&replacing, b"full rebuild pending\n")?;
            Ok(true)
        }
        other => {
            Err(Error::Format(format!("{}: unknown content '{other}' (expected new or replace)", marker.display())))
        }
    }
}

/// Bumps and returns the start counter kept in `D/iom-I/incarnation`.
fn next_incarnation(dir: &std::path::Path) -> Result<u64, Error> {
    let p = dir.join("incarnation");
    let cur = match std::fs::read_to_string(&p) {
        Ok(s) => s.trim().parse::<u64>().map_err(|e| Error::Format(format!("{}: {e}", p.display())))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(Error::io(format!("read {}", p.display()), e)),
    };
    let next = cur + 1;
    crate::fsutil::write_atomic(&p, format!("{next}\n").as_bytes())?;
    Ok(next)
}

/// Raises the start counter in `D/iom-I/incarnation` to at least `at_least`
/// (a replacement store starts above every transaction id its IOM's lost
/// store used, so the store-age check never mistakes it for a stale one).
pub fn raise_incarnation(dir: &std::path::Path, at_least: u64) -> Result<(), Error> {
    let p = dir.join("incarnation");
    let cur = std::fs::read_to_string(&p).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    if cur < at_least {
        crate::fsutil::write_atomic(&p, format!("{at_least}\n").as_bytes())?;
    }
    Ok(())
}

/// Slots the filesystem under `dir` can hold (free space plus what the block file uses).
fn fs_capacity(dir: &std::path::Path, block_size: u32) -> u64 {
    let Some((free, _)) = crate::fsutil::fs_space(dir) else { return 1 << 24 };
    let used = std::fs::metadata(dir.join(crate::store::BLOCK_FILE)).map(|m| m.len()).unwrap_or(0);
    (free + used) / block_size as u64
}

pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|x| x.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}
