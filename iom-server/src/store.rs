//! The block file of one IOM and its allocator.
//!
//! Block versions are never overwritten in place: every write goes to a
//! freshly allocated slot (a2) and the old slot is freed only when the
//! protocol says so (a14/b13), after the record that makes the change
//! permanent is durable. Slot 0 holds the file header.

use crate::format::{Format, HeaderError};
use crate::Error;
use common::DiskAddr;
use parking_lot::Mutex;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

pub const BLOCK_FILE: &str = "blocks.dat";
pub const STORE_FORMAT_VERSION: u32 = 1;
const STORE_FORMAT: Format = Format { magic: b"IOMFSBLK", version: STORE_FORMAT_VERSION, oldest: STORE_FORMAT_VERSION };

/// Free-slot bookkeeping. Addresses start at 1 (slot 0 is the header).
#[derive(Debug, Default)]
pub struct Allocator {
    /// One past the highest slot ever handed out.
    high: u64,
    /// Freed slots below `high` whose disk blocks the file still has.
    free: BTreeSet<u64>,
    /// Freed slots below `high` whose disk blocks went back to the
    /// filesystem (`Store::punch_free`; none of them is in `free`): room the
    /// filesystem counts already, and a slot that must be backed again
    /// before use.
    holes: BTreeSet<u64>,
    capacity: u64,
    used: u64,
}

impl Allocator {
    pub fn new(capacity: u64) -> Allocator {
        Allocator { high: 1, free: BTreeSet::new(), holes: BTreeSet::new(), capacity, used: 0 }
    }

    /// Rebuilds the allocator from the set of live addresses (map plus
    /// unfinished journal records): everything else below the highest live
    /// slot is free. No allocated-but-unjournaled slot leaks.
    pub fn from_live(capacity: u64, live: impl IntoIterator<Item = DiskAddr>) -> Allocator {
        let mut live: Vec<u64> = live.into_iter().map(|a| a.0).filter(|&a| a >= 1).collect();
        live.sort_unstable();
        live.dedup();
        let high = live.last().map(|&a| a + 1).unwrap_or(1);
        let mut free = BTreeSet::new();
        let mut it = live.iter().peekable();
        for a in 1..high {
            if it.peek() == Some(&&a) {
                it.next();
            } else {
                free.insert(a);
            }
        }
        Allocator { high, free, holes: BTreeSet::new(), capacity: capacity.max(high), used: live.len() as u64 }
    }

    pub fn alloc(&mut self) -> Option<DiskAddr> {
        self.alloc_slot().map(|(a, _)| a)
    }

    /// A free slot, and whether it is a hole (`holes`): a slot the file
    /// still backs first, then a hole, then one past `high`.
    pub fn alloc_slot(&mut self) -> Option<(DiskAddr, bool)> {
        let (a, hole) = if let Some(a) = self.free.pop_first() {
            (a, false)
        } else if let Some(a) = self.holes.pop_first() {
            (a, true)
        } else if self.high < self.capacity {
            self.high += 1;
            (self.high - 1, false)
        } else {
            return None;
        };
        self.used += 1;
        Some((DiskAddr(a), hole))
    }

    /// A slot `alloc_slot` handed out as a hole goes back unused.
    fn unalloc_hole(&mut self, a: DiskAddr) {
        if self.holes.insert(a.0) {
            self.used -= 1;
        }
    }

    /// The filesystem has room for `capacity` slots now (more than at the
    /// start): `alloc_slot` may go up to it.
    pub fn grow_capacity(&mut self, capacity: u64) {
        self.capacity = self.capacity.max(capacity);
    }

    /// Moves free slots to `holes` (their blocks went back).
    fn punched(&mut self, from: u64, to: u64) {
        for x in from..to {
            if self.free.remove(&x) {
                self.holes.insert(x);
            }
        }
    }

    pub fn free(&mut self, a: DiskAddr) {
        debug_assert!(a.0 >= 1 && a.0 < self.high, "free of never-allocated slot {a:?}");
        if a.0 >= 1 && a.0 < self.high && !self.holes.contains(&a.0) && self.free.insert(a.0) {
            self.used -= 1;
        }
    }

    pub fn used(&self) -> u64 {
        self.used
    }
    pub fn capacity(&self) -> u64 {
        self.capacity.saturating_sub(1)
    }
    pub fn is_free(&self, a: DiskAddr) -> bool {
        a.0 >= self.high || self.free.contains(&a.0) || self.holes.contains(&a.0)
    }
}

pub struct Store {
    file: Arc<File>,
    block_size: u32,
    alloc: Mutex<Allocator>,
    prealloc: Arc<Prealloc>,
    dir: std::path::PathBuf,
    /// Last `statvfs` of the store's filesystem: (when, available, total bytes).
    fs_seen: Mutex<Option<(std::time::Instant, u64, u64)>>,
    /// The allocator's capacity follows the filesystem (none configured):
    /// see `alloc_slot`.
    grows: std::sync::atomic::AtomicBool,
}

/// How long a `statvfs` of the store's filesystem is trusted.
const FS_CHECK_EVERY: std::time::Duration = std::time::Duration::from_millis(50);
/// Share of the filesystem kept for what must never fail for lack of
/// space: parity of writes already admitted (b5), journal records,
/// recovery and rebuild. Client writes that need a new slot (a2) stop
/// when less than this is left. At least `RESERVE_MIN_BLOCKS` blocks.
const RESERVE_PERCENT: u64 = 2;
const RESERVE_MIN_BLOCKS: u64 = 128;

/// Space reserved ahead of the allocator's high-water mark with
/// `fallocate`: a write into a fresh part of the file then needs no block
/// allocation on the write path (ext4 wrote a fresh 1 GiB file at
/// 470 MiB/s and a preallocated one at 1460 MiB/s here). The reservation
/// grows by doubling (16 MiB up to 512 MiB a step) in a background thread
/// once the mark passes half of it, so small clusters reserve little.
#[derive(Default)]
struct Prealloc {
    /// End of the reserved region, in bytes.
    end: std::sync::atomic::AtomicU64,
    running: std::sync::atomic::AtomicBool,
    /// fallocate failed (no space, or not supported): stop trying.
    failed: std::sync::atomic::AtomicBool,
    /// The filesystem had less than four reserves free at the last look
    /// (`give_back_tail`): freed slots go back to it (`punch_free`).
    near_full: std::sync::atomic::AtomicBool,
    /// The tail was given back (`give_back_tail`): no new one until the
    /// filesystem has eight reserves free again, so tails do not come and
    /// go around the four-reserve mark.
    gave_back: std::sync::atomic::AtomicBool,
}

/// A slot taken by [`Store::reserve_slot`]: given back when dropped,
/// unless [`Slot::take`] hands it to the version written into it.
pub struct Slot {
    addr: DiskAddr,
    store: Arc<Store>,
    used: bool,
}

impl Slot {
    /// The slot, now owned by the caller (who frees it with the version).
    pub fn take(mut self) -> DiskAddr {
        self.used = true;
        self.addr
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.used {
            self.store.free(self.addr);
        }
    }
}

const PREALLOC_MIN: u64 = 16 << 20;
/// Slots past the highest in use a tail keeps when given back.
const TAIL_CUSHION: u64 = 16;
const PREALLOC_MAX_STEP: u64 = 512 << 20;

impl Store {
    /// Opens (or creates) the block file, checking its header.
    pub fn open(dir: &Path, block_size: u32, iom: u32, cluster_id: &str) -> Result<(Store, bool), Error> {
        let path = dir.join(BLOCK_FILE);
        let fresh = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let header = Header { block_size, iom, cluster_id: cluster_id.to_string() };
        if fresh {
            file.write_all_at(&header.encode(), 0)
                .and_then(|_| file.sync_all())
                .map_err(|e| Error::io(format!("write header of {}", path.display()), e))?;
        } else {
            let mut buf = vec![0u8; 512];
            let n = file.read_at(&mut buf, 0).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
            let found = Header::decode(&buf[..n]).map_err(|m| Error::Damaged(format!("{}: {m}", path.display())))?;
            if found.block_size != block_size || found.iom != iom || found.cluster_id != cluster_id {
                return Err(Error::Damaged(format!(
                    "{} belongs to IOM {} of cluster '{}' with {}-byte blocks, not IOM {iom} of '{cluster_id}' with {block_size}-byte blocks",
                    path.display(),
                    found.iom,
                    found.cluster_id,
                    found.block_size
                )));
            }
        }
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let prealloc = Prealloc { end: len.into(), ..Default::default() };
        let store = Store {
            file: Arc::new(file),
            block_size,
            alloc: Mutex::new(Allocator::new(u64::MAX)),
            prealloc: Arc::new(prealloc),
            dir: dir.to_path_buf(),
            fs_seen: Mutex::new(None),
            grows: false.into(),
        };
        Ok((store, fresh))
    }

    /// Installs the allocator derived from the live addresses after replay;
    /// with `grows`, its capacity is the filesystem's room at the start and
    /// grows with it (`alloc_slot`), else it is fixed (configured).
    pub fn set_allocator(&self, a: Allocator, grows: bool) {
        *self.alloc.lock() = a;
        self.grows.store(grows, std::sync::atomic::Ordering::Release);
    }

    /// A slot from the allocator (see `Allocator::alloc_slot`). When it has
    /// none left and its capacity follows the filesystem, the capacity is
    /// taken anew from the filesystem first: room made there since the
    /// start (freed by other IOMs sharing it, by the operator, or a grown
    /// filesystem) is used. Before, an IOM started on a full disk stayed
    /// full until its next restart, whatever was freed.
    fn alloc_slot(&self) -> Option<(DiskAddr, bool)> {
        if let Some(x) = self.alloc.lock().alloc_slot() {
            return Some(x);
        }
        if !self.grows.load(std::sync::atomic::Ordering::Acquire) {
            return None;
        }
        let (avail, _) = self.fs_space(true);
        let len = self.file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut a = self.alloc.lock();
        a.grow_capacity((avail + len) / self.block_size as u64 + 1);
        a.alloc_slot()
    }

    pub fn file(&self) -> Arc<File> {
        self.file.clone()
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// a2 / b5: a new disk address.
    pub fn alloc(&self) -> Result<DiskAddr, Error> {
        let (a, hole) = self.alloc_slot().ok_or(Error::NoSpace)?;
        // A hole, or a slot past the preallocated end (the capacity taken
        // from `statvfs` counts a tail given back as room, and the file's
        // length still covers it), gets its disk blocks first: a write
        // into it then cannot fail for lack of space.
        let end = self.prealloc.end.load(std::sync::atomic::Ordering::Acquire);
        if hole || self.offset(a) + self.block_size as u64 > end {
            self.back_hole(a)?;
        }
        self.reserve_ahead(self.offset(a) + self.block_size as u64);
        Ok(a)
    }

    /// A hole handed out (`Allocator::alloc_slot`) gets its disk blocks
    /// back before use: a write into it then cannot fail for lack of space
    /// (a parity IOM stops when its b8 write fails). No room: the slot
    /// stays a hole and the caller gets `NoSpace`.
    fn back_hole(&self, a: DiskAddr) -> Result<(), Error> {
        if self.fallocate(0, self.offset(a), self.block_size as u64).is_err_and(is_enospc) {
            self.alloc.lock().unalloc_hole(a);
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    /// `fallocate(2)` on the block file: mode 0 backs `len` bytes at
    /// `from` with disk blocks, `PUNCH_HOLE | KEEP_SIZE` gives them back.
    fn fallocate(&self, mode: libc::c_int, from: u64, len: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; no memory is passed.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, from as libc::off_t, len as libc::off_t) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// (available, total) bytes of the store's filesystem, at most
    /// `FS_CHECK_EVERY` old, or fresh when `fresh`.
    fn fs_space(&self, fresh: bool) -> (u64, u64) {
        let mut seen = self.fs_seen.lock();
        if let Some((t, avail, total)) = *seen {
            if !fresh && t.elapsed() < FS_CHECK_EVERY {
                return (avail, total);
            }
        }
        let (avail, total) = crate::fsutil::fs_space(&self.dir).unwrap_or((u64::MAX / 4, u64::MAX / 4));
        *seen = Some((std::time::Instant::now(), avail, total));
        (avail, total)
    }

    /// Bytes kept back from client writes (see `RESERVE_PERCENT`).
    fn reserve_bytes(&self) -> u64 {
        let (_, total) = self.fs_space(false);
        (total / 100 * RESERVE_PERCENT).max(RESERVE_MIN_BLOCKS * self.block_size as u64)
    }

    /// Bytes client writes may still take: free space of the filesystem,
    /// freed slots inside the block file and its fallocated tail past the
    /// highest slot, less the reserve. (Preallocation grows the tail by at
    /// most a quarter of what is free above the reserve at a time, so on a
    /// filesystem several IOMs share no tail outgrows its peers' room for
    /// parity by much.)
    fn client_room(&self, fresh: bool) -> u64 {
        use std::sync::atomic::Ordering;
        let (avail, _) = self.fs_space(fresh);
        let bs = self.block_size as u64;
        let (high, free) = {
            let a = self.alloc.lock();
            (a.high, a.free.len() as u64)
        };
        let tail = self.prealloc.end.load(Ordering::Acquire).saturating_sub(high * bs);
        avail.saturating_add(free * bs).saturating_add(tail).saturating_sub(self.reserve_bytes())
    }

    /// For status: the part of `space`'s room that is the filesystem's free
    /// space less the reserve (shared with whatever else uses that
    /// filesystem, other IOMs included); the rest is this IOM's own (freed
    /// slots inside the block file and its preallocated tail).
    pub fn shared_room(&self) -> u64 {
        let (avail, _) = self.fs_space(false);
        avail.saturating_sub(self.reserve_bytes())
    }

    /// The id of the filesystem holding the block file (see `fsutil::fs_id`).
    pub fn fs_id(&self) -> u64 {
        crate::fsutil::fs_id(&self.dir)
    }

    /// For status: bytes client writes may still take, and the size of the
    /// filesystem holding the block file.
    pub fn space(&self) -> (u64, u64) {
        let (_, total) = self.fs_space(false);
        (self.client_room(false), total)
    }

    /// a2 for a client write: a new address, unless that would eat into
    /// the reserve (`NoSpace`, which the client reports as ENOSPC).
    pub fn alloc_for_client(&self) -> Result<DiskAddr, Error> {
        let bs = self.block_size as u64;
        let mut room = self.client_room(false);
        if room < 4 * self.reserve_bytes() {
            // Near full: a figure up to 50 ms old is not good enough.
            self.give_back_tail();
            room = self.client_room(true);
        }
        if room < bs {
            return Err(Error::NoSpace);
        }
        self.alloc()
    }

    /// Once the filesystem's free space is below four reserves (where
    /// preallocation stops), the preallocated tail past the highest slot in
    /// use, but for a cushion of `TAIL_CUSHION` slots, goes back to the
    /// filesystem: IOMs sharing it may need the room more, and a tail no
    /// other IOM can use would make the cluster full while space is left.
    pub fn give_back_tail(&self) {
        self.give_back_tail_keeping(TAIL_CUSHION)
    }

    /// At a start on a (nearly) full disk: the free slots and the whole
    /// preallocated tail go back to the filesystem before the start needs
    /// room in it (its start counter, the journal's new segment).
    pub fn give_back_at_start(&self) {
        self.give_back_tail_keeping(0)
    }

    fn give_back_tail_keeping(&self, cushion: u64) {
        use std::sync::atomic::Ordering;
        let bs = self.block_size as u64;
        let (avail, _) = self.fs_space(true);
        let near_full = avail < 4 * self.reserve_bytes();
        if near_full && !self.prealloc.near_full.swap(true, Ordering::AcqRel) {
            // Slots freed before it got this full go back too.
            let free: Vec<DiskAddr> = self.alloc.lock().free.iter().map(|&x| DiskAddr(x)).collect();
            self.punch_free(&free);
        } else if !near_full {
            self.prealloc.near_full.store(false, Ordering::Release);
        }
        if !near_full || self.prealloc.running.load(Ordering::Acquire) {
            return;
        }
        // Under the allocator's lock: no slot past `high` is handed out
        // while its blocks go.
        let a = self.alloc.lock();
        let keep = (a.high + cushion) * bs;
        let end = self.prealloc.end.load(Ordering::Acquire);
        if end <= keep {
            return;
        }
        // The range holds no slot in use.
        if self.fallocate(PUNCH, keep, end - keep).is_ok() {
            self.prealloc.end.store(keep, Ordering::Release);
            self.prealloc.gave_back.store(true, Ordering::Release);
            *self.fs_seen.lock() = None;
            tracing::info!(bytes = end - keep, "near full: preallocated block-file tail given back to the filesystem");
        }
        drop(a);
    }

    /// b1: a slot for a parity update's new version, taken before the
    /// update is accepted and backed by real disk blocks (`fallocate`), so
    /// that b5/b8 cannot fail for lack of space even when other IOMs share
    /// the filesystem. `NoSpace` when the disk cannot back it, or when
    /// less than a quarter of the reserve is left (the rest of the reserve
    /// is the journal's and recovery's). The slot goes back to the
    /// allocator when the [`Slot`] is dropped unused.
    pub fn reserve_slot(self: &Arc<Self>) -> Result<Slot, Error> {
        let (a, hole) = self.alloc_slot().ok_or(Error::NoSpace)?;
        // Refused: a hole goes back as a hole, any other slot as free.
        let refuse = || {
            if hole {
                self.alloc.lock().unalloc_hole(a);
            } else {
                self.free(a);
            }
            Err(Error::NoSpace)
        };
        let (from, len) = (self.offset(a), self.block_size as u64);
        // Always asked of the filesystem (about a microsecond when the slot
        // is backed already): a slot below the preallocated end or inside
        // the file may still be a hole (a write that failed for lack of
        // space, a region skipped by preallocation, a restart, a punched
        // slot).
        // Taking new disk blocks in the last quarter of the reserve is
        // refused (growing the file, or a punched slot); a slot inside the
        // file, freed by an overwrite, is still taken.
        let (avail, _) = self.fs_space(false);
        if avail < self.reserve_bytes() / 4 {
            let (avail, _) = self.fs_space(true);
            let inside = !hole && self.file.metadata().is_ok_and(|m| from + len <= m.len());
            if avail < self.reserve_bytes() / 4 && !inside {
                return refuse();
            }
        }
        // Not supported here (not ENOSPC): the slot is taken unreserved.
        if self.fallocate(0, from, len).is_err_and(is_enospc) {
            return refuse();
        }
        Ok(Slot { addr: a, store: self.clone(), used: false })
    }

    /// Extends the reserved region in the background once `used_end`
    /// passes half of it, never into the reserve of the filesystem (other
    /// IOMs on the same filesystem need it for their parity).
    fn reserve_ahead(&self, used_end: u64) {
        use std::sync::atomic::Ordering;
        let p = &self.prealloc;
        let end = p.end.load(Ordering::Acquire);
        if used_end.saturating_mul(2) < end.max(PREALLOC_MIN) || p.failed.load(Ordering::Relaxed) {
            return;
        }
        if p.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let bs = self.block_size as u64;
        let (avail, _) = self.fs_space(false);
        // Never within four reserves of full (see `give_back_tail`), nor
        // within eight once a tail was given back.
        if p.gave_back.load(Ordering::Acquire) {
            if avail < self.reserve_bytes() * 8 {
                p.running.store(false, Ordering::Release);
                return;
            }
            p.gave_back.store(false, Ordering::Release);
        }
        let spare = avail.saturating_sub(self.reserve_bytes() * 4) / 4 / bs * bs;
        let step = used_end.clamp(PREALLOC_MIN, PREALLOC_MAX_STEP).min(spare);
        if step == 0 {
            p.running.store(false, Ordering::Release);
            return;
        }
        let (from, len) = (end.max(used_end), step);
        let (file, pa) = (self.file.clone(), self.prealloc.clone());
        let spawned = std::thread::Builder::new().name("prealloc".into()).spawn(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid open descriptor; mode 0 reserves and extends.
            let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, from as libc::off_t, len as libc::off_t) };
            if r == 0 {
                pa.end.fetch_max(from + len, Ordering::AcqRel);
            } else {
                let e = std::io::Error::last_os_error();
                tracing::debug!("block file preallocation stopped: {e}");
                pa.failed.store(true, Ordering::Relaxed);
            }
            pa.running.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            p.running.store(false, Ordering::Release);
        }
    }

    /// Asks the kernel to drop the block file's clean cached pages
    /// (`posix_fadvise(DONTNEED)`; dirty ones stay until written back).
    pub fn drop_page_cache(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor; advice only, no memory involved.
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }

    pub fn free(&self, a: DiskAddr) {
        self.alloc.lock().free(a);
        if self.prealloc.near_full.load(std::sync::atomic::Ordering::Acquire) {
            self.punch_free(&[a]);
        }
    }

    /// Frees slots; near full, their disk blocks go back at once, a run of
    /// adjacent slots at a time (`punch_free`).
    pub fn free_many(&self, mut slots: Vec<DiskAddr>) {
        {
            let mut a = self.alloc.lock();
            for s in &slots {
                a.free(*s);
            }
        }
        if self.prealloc.near_full.load(std::sync::atomic::Ordering::Acquire) {
            slots.sort_unstable();
            slots.dedup();
            self.punch_free(&slots);
        }
    }

    /// Near full, the disk blocks of free slots go back to the filesystem
    /// (`FALLOC_FL_PUNCH_HOLE`), one run of adjacent slots at a time: the
    /// journal's segments and checkpoints, and other IOMs on the same
    /// filesystem, need filesystem space, and a slot freed inside the block
    /// file gives none. Without it a disk filled to the last byte stayed
    /// full after its files were deleted: the journal could not grow, so
    /// every write was refused. A slot taken again is backed again
    /// (`reserve_slot` allocates it; a data write into a hole allocates as
    /// it writes, or fails with ENOSPC). Slots still free only.
    fn punch_free(&self, slots: &[DiskAddr]) {
        let mut a = self.alloc.lock();
        let todo: Vec<DiskAddr> = slots.iter().copied().filter(|x| a.free.contains(&x.0)).collect();
        let mut punched = 0u64;
        for run in adjacent_runs(todo, |x| *x, usize::MAX) {
            let (first, n) = (run[0].0, run.len() as u64);
            // Free slots only, under the allocator's lock: none is handed
            // out meanwhile.
            if self.fallocate(PUNCH, self.offset(run[0]), n * self.block_size as u64).is_err() {
                break;
            }
            a.punched(first, first + n);
            punched += n;
        }
        drop(a);
        if punched > 0 {
            *self.fs_seen.lock() = None;
            tracing::debug!(slots = punched, "near full: freed slots given back to the filesystem");
        }
    }

    pub fn usage(&self) -> (u64, u64) {
        let a = self.alloc.lock();
        (a.used(), a.capacity())
    }

    fn offset(&self, a: DiskAddr) -> u64 {
        a.0 * self.block_size as u64
    }

    /// a4 / b8: writes a block version (its stored length) at `a`.
    /// Writes a version into slot `a`. Out of space is the caller's error
    /// (`ENOSPC` for the writer); any other write error means the disk
    /// lost a write it was given, and the IOM stops (exit 70) like on a
    /// failed fdatasync: its proxy takes over, nothing it acknowledged
    /// depended on the failed write.
    pub fn write(&self, a: DiskAddr, data: &[u8]) -> Result<(), Error> {
        debug_assert!(data.len() <= self.block_size as usize);
        let op = crate::fsutil::DiskOp::start();
        let r = match crate::disk_fault!("store::pwrite") {
            Some(e) => Err(e),
            None if power_loss::on() => {
                power_loss::stash(self.offset(a), data);
                Ok(())
            }
            None => self.file.write_all_at(data, self.offset(a)),
        };
        drop(op);
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(Error::io(format!("write slot {}", a.0), e)),
            Err(e) => crate::fsutil::fail_stop(&format!("block file write of slot {}", a.0), &e),
        }
    }

    /// Starts writing a version just written at `a` to the disk without
    /// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), for a write
    /// someone will soon wait to be durable: the block file's fdatasync
    /// before its record then finds the write done or under way, and the
    /// disk works while the protocol's messages travel. Advisory: an
    /// error here is the later fdatasync's to report.
    pub fn start_writeback(&self, a: DiskAddr, len: usize) {
        if power_loss::on() || len == 0 {
            return;
        }
        use std::os::fd::AsRawFd;
        // Counted as a disk operation: it can block on a full queue.
        let _op = crate::fsutil::DiskOp::start();
        // SAFETY: a plain system call on a file descriptor this store owns.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                self.offset(a) as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Reads `len` bytes of the version at `a`. An error is the caller's:
    /// reads heal from the group (`read_path::Iom::heal_block`).
    pub fn read(&self, a: DiskAddr, len: u32) -> Result<Vec<u8>, Error> {
        let op = crate::fsutil::DiskOp::start();
        let r = match crate::disk_fault!("store::pread") {
            Some(e) => Err(e),
            None => {
                let mut buf = vec![0u8; if power_loss::on() { len as usize } else { 0 }];
                if power_loss::lookup(self.offset(a), &mut buf) {
                    Ok(buf)
                } else {
                    crate::fsutil::pread_exact(&self.file, len as usize, self.offset(a))
                }
            }
        };
        drop(op);
        r.map_err(|e| Error::io(format!("read slot {}", a.0), e))
    }

    /// Reads `len` bytes from the start of slot `a` on, across adjacent
    /// slots: one disk read for a run of blocks. `None` in power-loss test
    /// mode, where unsynced writes live in memory per slot.
    pub fn read_span(&self, a: DiskAddr, len: usize) -> Result<Option<Vec<u8>>, Error> {
        if power_loss::on() {
            return Ok(None);
        }
        let op = crate::fsutil::DiskOp::start();
        let r = match crate::disk_fault!("store::pread") {
            Some(e) => Err(e),
            None => crate::fsutil::pread_exact(&self.file, len, self.offset(a)),
        };
        drop(op);
        r.map(Some).map_err(|e| Error::io(format!("read slots from {}", a.0), e))
    }

    /// Makes every completed write durable (a10 / b9). The journal writer
    /// calls this before writing records that depend on data being durable.
    pub fn sync(&self) -> Result<(), Error> {
        power_loss::flush(&self.file).map_err(|e| Error::io("write block file", e))?;
        let _op = crate::fsutil::DiskOp::sync();
        self.file.sync_data().map_err(|e| Error::io("fdatasync block file", e))
    }
}

/// Power-loss test mode (`failpoints` builds with `IOMFS_TEST_POWER_LOSS=1`):
/// block writes stay in memory until the next fdatasync of the block file
/// (the journal keeps its records in memory until its own fdatasync the
/// same way), so a crash of the process loses every write since the last
/// sync, as a power cut loses the page cache. `kill -9` alone never tests
/// what `durable` promises: the kernel keeps the page cache.
pub mod power_loss {
    #[cfg(feature = "failpoints")]
    mod imp {
        use std::collections::BTreeMap;
        use std::os::unix::fs::FileExt;
        use std::sync::OnceLock;

        static ON: OnceLock<bool> = OnceLock::new();
        static UNSYNCED: parking_lot::Mutex<BTreeMap<u64, Vec<u8>>> = parking_lot::Mutex::new(BTreeMap::new());

        pub fn on() -> bool {
            *ON.get_or_init(|| std::env::var("IOMFS_TEST_POWER_LOSS").is_ok_and(|v| v == "1"))
        }
        pub fn stash(offset: u64, data: &[u8]) {
            UNSYNCED.lock().insert(offset, data.to_vec());
        }
        pub fn lookup(offset: u64, buf: &mut [u8]) -> bool {
            if !on() {
                return false;
            }
            let u = UNSYNCED.lock();
            let Some(d) = u.get(&offset) else { return false };
            let n = d.len().min(buf.len());
            buf[..n].copy_from_slice(&d[..n]);
            buf[n..].fill(0);
            true
        }
        pub fn flush(file: &std::fs::File) -> std::io::Result<()> {
            if !on() {
                return Ok(());
            }
            let pending = std::mem::take(&mut *UNSYNCED.lock());
            for (off, d) in pending {
                file.write_all_at(&d, off)?;
            }
            Ok(())
        }
    }
    #[cfg(not(feature = "failpoints"))]
    mod imp {
        pub fn on() -> bool {
            false
        }
        pub fn stash(_: u64, _: &[u8]) {}
        pub fn lookup(_: u64, _: &mut [u8]) -> bool {
            false
        }
        pub fn flush(_: &std::fs::File) -> std::io::Result<()> {
            Ok(())
        }
    }
    pub use imp::*;
}

struct Header {
    block_size: u32,
    iom: u32,
    cluster_id: String,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(64);
        STORE_FORMAT.put_head(&mut v);
        v.extend_from_slice(&self.block_size.to_le_bytes());
        v.extend_from_slice(&self.iom.to_le_bytes());
        v.extend_from_slice(&(self.cluster_id.len() as u32).to_le_bytes());
        v.extend_from_slice(self.cluster_id.as_bytes());
        v
    }
    fn decode(b: &[u8]) -> Result<Header, String> {
        STORE_FORMAT.check_head(b, 24).map_err(|e| match e {
            HeaderError::Version(version) => {
                format!("block file format version {version}; this build reads version {STORE_FORMAT_VERSION}")
            }
            // (The block file header has no checksum: check_head never says Checksum.)
            HeaderError::Short | HeaderError::Magic | HeaderError::Checksum => {
                "not an iomfs block file (bad magic)".to_string()
            }
        })?;
        let u = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let n = u(20) as usize;
        let id = b.get(24..24 + n).ok_or("truncated header")?;
        Ok(Header { block_size: u(12), iom: u(16), cluster_id: String::from_utf8_lossy(id).into_owned() })
    }
}

/// `fallocate` mode giving disk blocks back without changing the size.
const PUNCH: libc::c_int = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

fn is_enospc(e: std::io::Error) -> bool {
    e.raw_os_error() == Some(libc::ENOSPC)
}

/// `items`, sorted by slot, cut into runs of adjacent slots of at most
/// `max` items each.
pub(crate) fn adjacent_runs<T>(items: Vec<T>, slot: impl Fn(&T) -> DiskAddr, max: usize) -> Vec<Vec<T>> {
    let mut runs: Vec<Vec<T>> = Vec::new();
    for t in items {
        match runs.last_mut() {
            Some(r) if r.len() < max && r.last().is_some_and(|l| slot(l).0 + 1 == slot(&t).0) => r.push(t),
            _ => runs.push(vec![t]),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn backed_free_slots_go_before_holes_and_holes_before_growing() {
        let mut a = Allocator::from_live(10, [1, 2, 3].map(DiskAddr));
        a.free(DiskAddr(2));
        a.free(DiskAddr(3));
        a.punched(2, 3);
        assert_eq!((a.free.len(), a.holes.len(), a.used()), (1, 1, 1));
        // A hole freed again stays one slot, counted once.
        a.free(DiskAddr(2));
        assert_eq!((a.free.len(), a.holes.len(), a.used()), (1, 1, 1));
        assert_eq!(a.alloc_slot(), Some((DiskAddr(3), false)));
        assert_eq!(a.alloc_slot(), Some((DiskAddr(2), true)));
        a.unalloc_hole(DiskAddr(2));
        assert!(a.is_free(DiskAddr(2)));
        assert_eq!(a.used(), 2);
        assert_eq!(a.alloc_slot(), Some((DiskAddr(2), true)));
        assert_eq!(a.alloc_slot(), Some((DiskAddr(4), false)));
        assert_eq!(a.used(), 4);
    }

    proptest! {
        /// The allocator never hands out an address that is live, whether
        /// it was built fresh or derived from a live set, under any
        /// interleaving of allocations, frees and punched slots; holes are
        /// handed out only when no backed free slot is left.
        #[test]
        fn never_hands_out_a_live_address(
            initial in proptest::collection::btree_set(1u64..200, 0..60),
            ops in proptest::collection::vec((any::<bool>(), any::<u16>()), 0..400),
        ) {
            let mut a = Allocator::from_live(300, initial.iter().map(|&x| DiskAddr(x)));
            let mut live: BTreeSet<u64> = initial.clone();
            prop_assert_eq!(a.used(), live.len() as u64);
            for (is_alloc, pick) in ops {
                if pick % 5 == 0 {
                    // Slots go back to the filesystem (`punch_free`), some
                    // of them not free at all: those must stay as they are.
                    let from = pick as u64 % 300;
                    a.punched(from, from + 1 + pick as u64 % 7);
                    prop_assert!(a.holes.is_disjoint(&a.free));
                    prop_assert!(a.holes.iter().all(|h| !live.contains(h)), "a live slot became a hole");
                } else if is_alloc || live.is_empty() {
                    let backed_free = !a.free.is_empty();
                    match a.alloc_slot() {
                        Some((d, hole)) => {
                            prop_assert!(d.0 >= 1);
                            prop_assert!(live.insert(d.0), "handed out live address {}", d.0);
                            prop_assert!(!(hole && backed_free), "a hole handed out before a backed free slot");
                            if hole {
                                // Sometimes it could not be backed and goes back.
                                if pick % 3 == 0 {
                                    live.remove(&d.0);
                                    a.unalloc_hole(d);
                                }
                            }
                        }
                        None => prop_assert_eq!(live.len() as u64, a.capacity()),
                    }
                } else {
                    let idx = pick as usize % live.len();
                    let x = *live.iter().nth(idx).unwrap();
                    live.remove(&x);
                    a.free(DiskAddr(x));
                }
                prop_assert_eq!(a.used(), live.len() as u64);
            }
        }
    }

    /// The block file header as written today: magic, format version,
    /// block size, IOM, length of the cluster id, the id. The on-disk
    /// format must not change.
    #[test]
    fn golden_block_file_header() {
        let d = tempfile::tempdir().unwrap();
        drop(Store::open(d.path(), 4096, 2, "clu").unwrap());
        let b = std::fs::read(d.path().join(BLOCK_FILE)).unwrap();
        let want: &[u8] = b"IOMFSBLK\x01\x00\x00\x00\x00\x10\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00clu";
        assert_eq!(&b[..want.len()], want);
        assert!(b[want.len()..].iter().all(|&x| x == 0));
        let h = Header { block_size: 4096, iom: 2, cluster_id: "clu".into() };
        assert_eq!(h.encode(), want);
    }

    /// What a bad block file header gives, as today.
    #[test]
    fn bad_block_file_headers() {
        let good = Header { block_size: 4096, iom: 2, cluster_id: "clu".into() }.encode();
        let h = Header::decode(&good).unwrap();
        assert_eq!((h.block_size, h.iom, h.cluster_id.as_str()), (4096, 2, "clu"));
        for n in 0..24 {
            assert_eq!(Header::decode(&good[..n]).err().unwrap(), "not an iomfs block file (bad magic)");
        }
        for n in 24..good.len() {
            assert_eq!(Header::decode(&good[..n]).err().unwrap(), "truncated header");
        }
        let mut m = good.clone();
        m[7] ^= 1;
        assert_eq!(Header::decode(&m).err().unwrap(), "not an iomfs block file (bad magic)");
        for ver in [0u32, 2, u32::MAX] {
            let mut v = good.clone();
            v[8..12].copy_from_slice(&ver.to_le_bytes());
            assert_eq!(
                Header::decode(&v).err().unwrap(),
                format!("block file format version {ver}; this build reads version 1")
            );
        }
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(BLOCK_FILE), b"IOMFSBLX").unwrap();
        let e = Store::open(d.path(), 4096, 2, "clu").err().unwrap().to_string();
        assert_eq!(e, format!("{}: not an iomfs block file (bad magic)", d.path().join(BLOCK_FILE).display()));
    }

    #[test]
    fn header_checks() {
        let d = tempfile::tempdir().unwrap();
        let (s, fresh) = Store::open(d.path(), 4096, 2, "c").unwrap();
        assert!(fresh);
        s.set_allocator(Allocator::new(100), false);
        let a = s.alloc().unwrap();
        assert_eq!(a, DiskAddr(1));
        s.write(a, b"hello").unwrap();
        assert_eq!(s.read(a, 5).unwrap(), b"hello");
        drop(s);
        let (_, fresh) = Store::open(d.path(), 4096, 2, "c").unwrap();
        assert!(!fresh);
        let e = Store::open(d.path(), 8192, 2, "c").err().unwrap().to_string();
        assert!(e.contains("8192-byte blocks"), "{e}");
        let e = Store::open(d.path(), 4096, 3, "c").err().unwrap().to_string();
        assert!(e.contains("not IOM 3"), "{e}");
    }
}
