//! The storage role of one IOM: its block store, buffer cache, journal and
//! block map, opened and replayed together, with the one way to change
//! them (`commit`: apply to the map, then append to the journal) and the
//! checkpoint that bounds the journal. Every other role holds an
//! `Arc<Storage>`, never the stores one by one.

use crate::cache::{Cache, CacheKey};
use crate::journal::{Journal, Wait};
use crate::map::{BlockMap, OpenTxs};
use crate::records::{PVerRef, Record, VerRef};
use crate::store::{adjacent_runs, Allocator, Store};
use crate::timeouts::Timeouts;
use crate::Error;
use bytes::Bytes;
use common::config::{ClusterConfig, ClusterPaths, IomConfig};
use common::{codec, BlockKey, DiskAddr, GroupKey, IomId, Layout, Version};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

pub struct Storage {
    id: IomId,
    layout: Layout,
    data_dir: PathBuf,
    journal_dir: PathBuf,
    pub store: Arc<Store>,
    pub cache: Arc<Cache>,
    pub journal: Journal,
    pub map: BlockMap,
    /// Journal growth that triggers a checkpoint (`tuning.checkpoint_mib`).
    pub checkpoint_bytes: u64,
    /// Held while a map checkpoint is taken and written.
    checkpointing: Arc<tokio::sync::Mutex<()>>,
    /// The data directory's lock (one IOM process per store).
    _lock: File,
}

/// What opening the store found.
pub struct Opened {
    /// It replaces a lost store: a full rebuild on rejoin.
    pub replacing: bool,
    /// Transactions the journal left open, for recovery.
    pub open_txs: OpenTxs,
}

impl Storage {
    /// Opens (or, when allowed, creates) the store of IOM `id`, loads the
    /// map checkpoint and replays the journal after it.
    pub fn open(
        id: IomId,
        cfg: &ClusterConfig,
        paths: &ClusterPaths,
        icfg: &IomConfig,
        data_dir: PathBuf,
        journal_dir: PathBuf,
        timeouts: &Timeouts,
    ) -> Result<(Storage, Opened), Error> {
        let layout = cfg.layout();
        let lock = lock_dir(&data_dir)?;
        crate::fsutil::sweep_temp(&data_dir);

        let replacing = prepare_store(paths, &data_dir, id)?;
        let (store, fresh) = Store::open(&data_dir, cfg.block_size, id.0, &cfg.cluster_id)?;
        if fresh {
            // The store exists now: the marker that allowed it is spent.
            let marker = paths.new_store_marker(id);
            if let Err(e) = std::fs::remove_file(&marker) {
                tracing::warn!("cannot remove {}: {e}", marker.display());
            }
            crate::fsutil::sync_dir(&paths.iom_dir(id))?;
        }
        let store = Arc::new(store);
        let map = BlockMap::new(layout);
        // A damaged checkpoint or sealed journal segment: this store cannot
        // be trusted, and guessing would risk serving wrong data. Stop and
        // say how to get the IOM back (its proxy serves it meanwhile).
        let damaged = |e: Error| match e {
            Error::Damaged(m) => Error::Damaged(format!(
                "{m}. IOM {id}'s store is damaged and it will not start; the cluster serves its share from \
                 its proxy (degraded). If the disk is failing, or to rebuild the store: move everything in {} \
                 away except node.pem and node.key, then run `iomfs replace --dir {} --id {id}`",
                data_dir.display(),
                paths.dir.display(),
                id = id.0
            )),
            other => other,
        };
        let from = map.load_snapshot(&data_dir).map_err(damaged)?;
        let replayed = Journal::replay(&journal_dir, from).map_err(damaged)?;
        let n = replayed.records.len();
        for (i, raw) in replayed.records.iter().enumerate() {
            let rec: Record = codec::decode(raw)
                .map_err(|e| damaged(Error::Damaged(format!("journal record {i} of {n} cannot be decoded: {e}"))))?;
            map.apply(&rec);
        }
        let capacity = match icfg.capacity {
            Some(c) => c / cfg.block_size as u64,
            None => fs_capacity(&data_dir, cfg.block_size),
        };
        store.set_allocator(Allocator::from_live(capacity + 1, map.live_addrs()), icfg.capacity.is_none());
        // On a (nearly) full disk, the free slots go back to the filesystem
        // before anything below needs room in it (the journal's new
        // segment, the start counter).
        store.give_back_at_start();
        let journal = Journal::start(&journal_dir, replayed.segment, store.file(), timeouts.journal_flush)
            .map_err(|e| full_disk_hint(e, &journal_dir))?;
        // Transaction ids carry this start's incarnation, so an update sent
        // just before a crash (its a5 never journaled) can never be confused
        // with a transaction of a later start.
        let incarnation = next_incarnation(&data_dir).map_err(|e| full_disk_hint(e, &data_dir))?;
        map.start_incarnation(incarnation);
        let (open_d, open_p) = (map.dtx.lock().len(), map.ptx.lock().len());
        let open_at_start = crate::map::OpenTxs {
            data: map.dtx.lock().iter().map(|(k, v)| (*k, v.clone())).collect(),
            parity: map.ptx.lock().iter().map(|(k, v)| (*k, v.clone())).collect(),
        };
        tracing::info!(
            iom = id.0,
            fresh,
            replayed = n,
            open_data_txs = open_d,
            open_parity_txs = open_p,
            "storage opened"
        );
        let storage = Storage {
            id,
            layout,
            data_dir,
            journal_dir,
            store,
            cache: Arc::new(Cache::new((cfg.tuning.cache_mib as usize) << 20)),
            journal,
            map,
            checkpoint_bytes: cfg.checkpoint_bytes(),
            checkpointing: Arc::new(tokio::sync::Mutex::new(())),
            _lock: lock,
        };
        Ok((storage, Opened { replacing, open_txs: open_at_start }))
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
        Some(Box::new(move || store.free_many(freed)))
    }

    /// The bytes of data version `v` of block `key`: from the cache, else
    /// from the disk with its checksum checked (`Corrupt` if it does not
    /// match; the caller repairs from the group).
    pub async fn read_data(&self, key: BlockKey, v: VerRef) -> Result<Bytes, Error> {
        let what = || format!("object {} block {} version {} on IOM {}", key.object, key.block, v.version.0, self.id);
        self.read_checked(CacheKey::Data(key, v.version), v.addr, v.len, v.crc, what).await
    }

    /// Reads the blocks of `blocks` that sit in adjacent slots and are not
    /// cached with one disk read per run (at most `PREFETCH_RUN` blocks),
    /// and caches each one whose checksum matches, so the reads that follow
    /// find them there. A sequential read asks each IOM for several blocks
    /// of one object at once, and allocation is sequential, so they are
    /// often adjacent. Errors are left to those reads (nothing cached).
    pub async fn prefetch_data(&self, blocks: Vec<(BlockKey, VerRef)>) {
        const PREFETCH_RUN: usize = 64;
        if !self.cache.enabled() {
            return;
        }
        let mut todo: Vec<(DiskAddr, BlockKey, VerRef)> = blocks
            .into_iter()
            .filter_map(|(k, v)| v.addr.map(|a| (a, k, v)))
            .filter(|(_, k, v)| v.len > 0 && !self.cache.has(&CacheKey::Data(*k, v.version)))
            .collect();
        todo.sort_by_key(|(a, _, _)| a.0);
        todo.dedup_by_key(|(a, _, _)| a.0);
        let runs = adjacent_runs(todo, |t| t.0, PREFETCH_RUN);
        let bs = self.store.block_size() as usize;
        let reads = runs.into_iter().filter(|r| r.len() > 1).map(|run| {
            let store = self.store.clone();
            async move {
                let len = (run.len() - 1) * bs + run.last().map_or(0, |l| l.2.len as usize);
                let first = run[0].0;
                let span = tokio::task::spawn_blocking(move || store.read_span(first, len)).await;
                let Ok(Ok(Some(span))) = span else { return };
                let span = Bytes::from(span);
                self.cache.missed(run.len() as u64);
                for (i, (_, key, v)) in run.iter().enumerate() {
                    let b = span.slice(i * bs..i * bs + v.len as usize);
                    if codec::crc(&b) == v.crc {
                        self.cache.put(CacheKey::Data(*key, v.version), b);
                    }
                }
            }
        });
        futures::future::join_all(reads).await;
    }

    /// The bytes of parity version `p` of group `g`, like [`Storage::read_data`].
    pub async fn read_parity(&self, g: GroupKey, p: &PVerRef) -> Result<Bytes, Error> {
        let what = || format!("parity of object {} group {} on IOM {}", g.object, g.group, self.id);
        self.read_checked(CacheKey::Parity(g, p.seq), p.addr, p.len, p.crc, what).await
    }

    /// Cache, else disk (on the blocking pool) with the checksum checked;
    /// what is read from disk is cached. No slot: an empty block.
    async fn read_checked(
        &self,
        ck: CacheKey,
        addr: Option<DiskAddr>,
        len: u32,
        crc: u32,
        what: impl FnOnce() -> String,
    ) -> Result<Bytes, Error> {
        let Some(addr) = addr else {
            return Ok(Bytes::new());
        };
        if let Some(b) = self.cache.get(&ck) {
            return Ok(b);
        }
        let store = self.store.clone();
        let buf = tokio::task::spawn_blocking(move || store.read(addr, len))
            .await
            .map_err(|e| Error::TaskFailed(format!("read task: {e}")))??;
        if codec::crc(&buf) != crc {
            return Err(Error::Corrupt(format!("{} (slot {})", what(), addr.0)));
        }
        let b = Bytes::from(buf);
        self.cache.put(ck, b.clone());
        Ok(b)
    }

    /// Writes `bytes` as version `version` of block `key` (rebuilt or
    /// copied, not written by a client) and points the map at it, durably.
    pub async fn install_data(&self, key: BlockKey, version: Version, bytes: Bytes) -> Result<(), Error> {
        let addr = if bytes.is_empty() { None } else { Some(self.store.alloc()?) };
        if let Some(a) = addr {
            if let Err(e) = self.store.write(a, &bytes) {
                self.store.free(a);
                return Err(e);
            }
        }
        let ver = VerRef { version, addr, len: bytes.len() as u32, crc: codec::crc(&bytes) };
        if addr.is_some() {
            self.cache.put(CacheKey::Data(key, version), bytes);
        }
        let prev = self.map.entry(&key).map(|e| e.head());
        if let Some(d) = self.commit(&Record::DataSet { key, ver, prev }, true, Wait::Durable) {
            let _ = d.await;
        }
        Ok(())
    }

    /// Installs `bytes` as the parity of group `g` covering member versions
    /// `members` (recomputed from the group), durably.
    pub async fn install_parity(&self, g: GroupKey, members: Vec<Version>, bytes: Bytes) -> Result<(), Error> {
        let prev = self.map.parity_head(&g);
        let addr = if bytes.is_empty() { None } else { Some(self.store.alloc()?) };
        if let Some(a) = addr {
            if let Err(e) = self.store.write(a, &bytes) {
                self.store.free(a);
                return Err(e);
            }
        }
        let ver =
            PVerRef { seq: self.map.next_pseq(), addr, len: bytes.len() as u32, crc: codec::crc(&bytes), members };
        if addr.is_some() {
            self.cache.put(CacheKey::Parity(g, ver.seq), bytes);
        }
        if let Some(d) = self.commit(&Record::ParitySet { group: g, ver, prev: Some(prev) }, true, Wait::Durable) {
            let _ = d.await;
        }
        Ok(())
    }

    /// Records that the parity group `g` of failed IOM `owner` must be recomputed.
    pub fn mark_group(&self, owner: IomId, g: GroupKey) {
        let known = self.map.marks.lock().get(&owner).is_some_and(|m| m.groups.contains(&g));
        if !known {
            self.commit(&Record::MarkedGroup { owner, group: g }, false, Wait::Written);
        }
    }

    /// Background: checkpoint when the journal has grown by
    /// `checkpoint_bytes`, until `stop`.
    pub async fn checkpoint_worker(self: Arc<Self>, stop: CancellationToken, poll: Duration) {
        // Near full, an unused preallocated tail goes back to the filesystem
        // within `TAIL_POLL` even if no write comes here any more: another
        // IOM on the same filesystem may be out of room meanwhile.
        const TAIL_POLL: Duration = Duration::from_millis(100);
        let mut next_checkpoint = tokio::time::Instant::now() + poll;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(TAIL_POLL.min(poll)) => {}
            }
            self.store.give_back_tail();
            if tokio::time::Instant::now() < next_checkpoint {
                continue;
            }
            next_checkpoint = tokio::time::Instant::now() + poll;
            if self.journal.stats.bytes_since_rotate.load(Ordering::Relaxed) > self.checkpoint_bytes {
                if let Err(e) = self.checkpoint().await {
                    tracing::error!(iom = self.id.0, "checkpoint failed: {e}");
                }
            }
        }
    }

    /// Flushes and closes the journal (the last step of a stop).
    pub async fn close(&self) {
        self.journal.flush().await;
        self.journal.stop().await;
    }

    /// Writes a checkpoint of the map and drops the journal segments it covers.
    /// The cut (rotation and the copy of the map, with no `.await`
    /// between them) is taken on the event loop; encoding, writing and
    /// fsyncing it and removing the old segments run off it. One
    /// checkpoint at a time, so an older cut never replaces a newer one.
    pub async fn checkpoint(&self) -> Result<(), Error> {
        // Owned, and moved into the writer: held until the write is done
        // even if this future were dropped.
        let one = self.checkpointing.clone().lock_owned().await;
        let seg = self.journal.rotate_now()?;
        let cut = self.map.snapshot_cut(seg);
        let (data_dir, journal_dir) = (self.data_dir.clone(), self.journal_dir.clone());
        let site = crate::failpoint::Site { id: self.id, dir: self.data_dir.clone() };
        crate::fsutil::off_loop("map checkpoint", move || {
            let _one = one;
            crate::crash_point_sync!(&site, "checkpoint::write");
            cut.write(&data_dir)?;
            Journal::remove_before(&journal_dir, seg)
        })
        .await?;
        tracing::info!(iom = self.id.0, segment = seg, "checkpoint written");
        Ok(())
    }
}

/// Whether a failed read of a stored version may be answered by
/// rebuilding it from its group: damaged bytes or a read error of the
/// disk; a full disk is not a damaged block.
pub fn healable(e: &Error) -> bool {
    match e {
        Error::Corrupt(_) => true,
        Error::Io { err, .. } => err.raw_os_error() != Some(libc::ENOSPC),
        _ => false,
    }
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
        return Err(Error::Damaged(format!(
            "{} is locked: another iom-server is already running on this directory",
            dir.display()
        )));
    }
    Ok(f)
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
            return Err(Error::Damaged(format!(
                "IOM {id}'s store in {} is empty (no {}) and {} is missing, so this IOM will not start: on a \
                 disk that lost its data it would answer reads with zeros. If its disk was replaced, run `iomfs replace --dir {} --id {id}`: it joins as a \
                 replacement and rebuilds everything from the other IOMs (the cluster stays degraded until then). \
                 If its files were moved, put them back.",
                data_dir.display(),
                crate::store::BLOCK_FILE,
                marker.display(),
                paths.dir.display(),
            )))
        }
        Err(e) => return Err(Error::io(format!("read {}", marker.display()), e)),
    };
    // Before the store exists: an empty set of IOMs heard (so a block file
    // without it is a store older than the set, `seen`), and a record on
    // the configuration's filesystem that this IOM had a store (so a data
    // disk that is missing for now is not taken for a new one: `birth`).
    if kind == "new" || kind == "replace" {
        crate::fsutil::write_atomic(&data_dir.join(crate::seen::SEEN_FILE), b"")?;
        crate::fsutil::write_atomic(&paths.iom_dir(id).join(crate::seen::BORN_FILE), b"a store was created here\n")?;
    }
    match kind.as_str() {
        "new" => Ok(false),
        "replace" => {
            // Recorded before the store exists, so a crash between the two
            // can never leave an empty store that looks like a normal one.
            crate::fsutil::write_atomic(&replacing, b"full rebuild pending\n")?;
            Ok(true)
        }
        other => {
            Err(Error::Damaged(format!("{}: unknown content '{other}' (expected new or replace)", marker.display())))
        }
    }
}

/// A start that found no room says where and what to do.
fn full_disk_hint(e: Error, dir: &std::path::Path) -> Error {
    match e {
        Error::Io { err, what } if err.raw_os_error() == Some(libc::ENOSPC) => Error::Io {
            what: format!(
                "{what}: the filesystem holding {} is full ({} bytes free, or no inodes left), after this IOM gave \
                 back what it could of its block file; free space on that filesystem (other programs' files there; \
                 where other IOMs share it, deleting files through a mount frees theirs) and start the IOM again \
                 (its proxy serves its share meanwhile)",
                dir.display(),
                crate::fsutil::fs_space(dir).map_or(0, |(a, _)| a)
            ),
            err,
        },
        other => other,
    }
}

/// The start counter's file in the data directory.
pub const INCARNATION_FILE: &str = "incarnation";

/// Bumps and returns the start counter kept in `D/iom-I/incarnation`.
fn next_incarnation(dir: &std::path::Path) -> Result<u64, Error> {
    let p = dir.join(INCARNATION_FILE);
    let cur = match std::fs::read_to_string(&p) {
        Ok(s) => s.trim().parse::<u64>().map_err(|e| Error::Damaged(format!("{}: {e}", p.display())))?,
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
    let p = dir.join(INCARNATION_FILE);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_slots_make_runs_no_longer_than_the_limit() {
        let runs = |slots: &[u64], max| {
            adjacent_runs(slots.iter().map(|&s| DiskAddr(s)).collect(), |a| *a, max)
                .into_iter()
                .map(|r| r.into_iter().map(|a| a.0).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        };
        assert_eq!(runs(&[], 4), Vec::<Vec<u64>>::new());
        assert_eq!(runs(&[7], 4), vec![vec![7]]);
        assert_eq!(runs(&[1, 2, 3, 5, 6, 9], 4), vec![vec![1, 2, 3], vec![5, 6], vec![9]]);
        assert_eq!(runs(&[1, 2, 3, 4, 5], 2), vec![vec![1, 2], vec![3, 4], vec![5]]);
    }
}
