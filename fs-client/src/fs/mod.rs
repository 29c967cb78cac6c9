//! The FUSE filesystem: POSIX operations on the cluster's namespace and
//! objects.
//!
//! Every request is answered from a task on the tokio runtime, so the FUSE
//! session threads only read and dispatch and many requests are in flight at
//! once. Writes go straight to the data IOMs at the file's toughness, but
//! for `buffered` files, whose writes wait in this client's own buffer
//! ([`writeback`]) until a flush; the kernel's write-back cache is not
//! used, as it would delay the files of every level alike. Sizes
//! grown by writes are kept locally while a file is open and published on
//! `flush`/`fsync`/`release` (close-to-open); `open` fetches fresh attributes
//! and keeps the kernel's page cache only if the file did not change.
//!
//! This module owns the shared state ([`Inner`]: the mount options, the
//! cluster client and the tables below) and the way a [`ClientError`], or a
//! reply of the wrong kind, becomes the errno a request answers ([`errno`],
//! [`wrong_reply`]: both over [`ClientError::errno`], the one mapping).
//! The parts:
//! - [`adapter`]: the `impl Filesystem`, which decodes kernel requests, calls
//!   the operations here and replies; it decides only the errnos of its own
//!   request checks;
//! - [`inodes`]: the inode table with the sizes, mtimes and times of this
//!   client's writes not yet published, and the data path (read, write,
//!   setattr, fsync);
//! - [`dircache`]: the directory listings that answer lookups, and the
//!   entry-changing operations that keep them exact;
//! - [`handles`]: the open handles and the session (lease) at the namespace
//!   that keeps their files alive;
//! - [`xattr`]: extended attributes, with the toughness and layout
//!   attributes, the `security.capability` shortcut and `user.iomfs.sync`
//!   (what `iomfs sync` sets: every buffered byte is flushed);
//! - [`writeback`]: the `buffered` level's buffer.
//!
//! Invariant: each table of [`Inner`] is behind its own lock, and none of
//! those locks is held across an `.await` (only `session`, an async mutex,
//! is: it orders renewals and releases).

mod adapter;
mod dircache;
mod handles;
mod inodes;
mod prefetch;
mod writeback;
mod xattr;

use crate::cluster::{ClientError, ClusterClient};
use common::meta::{FsStats, MetaReq, MetaResp};
use common::{Ino, Toughness};
use dircache::DirNames;
use fuser::Errno;
use handles::Handle;
use inodes::Node;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The cluster's room as last seen: when, (free, capacity) in bytes of file
/// data, and this client's `written` counter then.
type SpaceSeen = (Instant, (u64, u64), u64);

/// How old the cluster's room may be when a `buffered` write checks it.
const SPACE_MAX_AGE: Duration = Duration::from_secs(1);
pub use writeback::BufferCaps;
pub use xattr::SYNC_XATTR;

/// Mount-wide settings (`-o` options).
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Toughness of files and directories with none set.
    pub toughness: Toughness,
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    pub read_only: bool,
    /// Limits of the `buffered` level's buffer.
    pub buffer: BufferCaps,
    /// Where the mount's Prometheus endpoint listens (`-o metrics=`);
    /// none: no endpoint.
    pub metrics: Option<std::net::SocketAddr>,
    /// The local address the mount's QUIC endpoint binds (`-o bind=`), so
    /// a host with several addresses sends from the one its firewall and
    /// the IOMs' expect; the unspecified address when `None`.
    pub bind: Option<std::net::IpAddr>,
    /// `-o allow_root` (or `noallow_other`): only the mounting user and
    /// root reach the mount. By default every user does (`allow_other`,
    /// with the kernel checking permissions), as ceph-fuse does.
    pub allow_root_only: bool,
    /// `-o nosuid`, `-o nodev`, `-o noexec`: the kernel ignores set-id
    /// bits, device files, execution on this mount.
    pub nosuid: bool,
    pub nodev: bool,
    pub noexec: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            toughness: Toughness::Atomic,
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            read_only: false,
            buffer: BufferCaps::default(),
            metrics: None,
            bind: None,
            allow_root_only: false,
            nosuid: false,
            nodev: false,
            noexec: false,
        }
    }
}

pub struct Inner {
    pub c: Arc<ClusterClient>,
    pub o: FsOptions,
    nodes: Mutex<HashMap<Ino, Node>>,
    /// Lookup answers from recent directory listings, kept no longer than
    /// the entry TTL the kernel uses for its own dentries; this client's
    /// unlink/rmdir/rename remove the names they touch at once, and bump
    /// `dir_gen` so a listing taken meanwhile is not kept.
    dirs: Mutex<HashMap<Ino, DirNames>>,
    dir_gen: AtomicU64,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// Closed handles not yet reported to the namespace: sent together
    /// (`ReleaseMany`) a moment later. The kernel does not wait for a
    /// release, and the namespace only needs the count of open handles to
    /// keep unlinked files until their last close, which a short delay
    /// merely prolongs.
    releases: Mutex<Vec<Ino>>,
    release_kick: tokio::sync::Notify,
    /// The session at the namespace (its lease). Renewals, which list this
    /// client's open handles, and releases go out one at a time, so the
    /// namespace never takes a list older than a release it already had.
    session: tokio::sync::Mutex<()>,
    /// When the latest renewal the namespace answered was sent: from then
    /// on it counts every handle listed, and keeps counting them for at
    /// least a lease even if it restarts or fails over meanwhile (the
    /// grace), so they are trusted for `LEASE_TRUST` of a lease after it.
    claimed: Mutex<Option<Instant>>,
    /// Files whose handles are stale: the namespace reclaimed them while
    /// this client's session had lapsed.
    stale: Mutex<std::collections::HashSet<Ino>>,
    /// Every task of this mount: the release and renewal workers and one
    /// task per FUSE request. `stop` ends the workers and joins them all.
    tasks: tokio_util::task::TaskTracker,
    /// Bytes of `buffered` files not yet sent to the IOMs.
    wb: writeback::WriteBack,
    /// Told to stop when the mount ends (the workers watch it).
    stopping: tokio_util::sync::CancellationToken,
    /// The cluster's room (free, capacity) as the IOMs last reported it,
    /// when, and this client's `written` counter then: `buffered` writes
    /// that grow files check it (`room_for`).
    space: Mutex<Option<SpaceSeen>>,
    /// A `buffered` write looked at `space` since the last refresh.
    space_wanted: std::sync::atomic::AtomicBool,
    /// Small files' bytes read beside their read-only open, per handle
    /// (`prefetch`).
    prefetched: Mutex<HashMap<u64, prefetch::Prefetch>>,
    /// Counts this client's data changes (handles opened for writing,
    /// truncations); a node's `changed_at` is its value at the last one.
    data_gen: AtomicU64,
    /// Ticks at every namespace request sent and answer installed: orders
    /// answers against the requests in flight when they came (`settle`).
    meta_clock: AtomicU64,
}

pub struct IomFs {
    rt: tokio::runtime::Handle,
    inner: Arc<Inner>,
}

type R<T> = Result<T, Errno>;

/// The errno a request answers when a cluster call failed. Which errno is
/// [`ClientError::errno`]'s choice alone; here it is only logged when it
/// is an I/O error.
fn errno(e: ClientError) -> Errno {
    let n = e.errno();
    if e.code().is_none() || n == libc::EIO {
        tracing::warn!("I/O error: {e}");
    }
    Errno::from_i32(n)
}

/// The errno when the namespace answered a request with another kind of
/// reply than it asks for: what [`ClientError::Unexpected`] maps to (an
/// I/O error), without its log line.
fn wrong_reply() -> Errno {
    Errno::from_i32(ClientError::Unexpected(String::new()).errno())
}

impl IomFs {
    pub fn new(rt: tokio::runtime::Handle, c: Arc<ClusterClient>, o: FsOptions) -> IomFs {
        IomFs {
            rt,
            inner: Arc::new(Inner {
                c,
                o,
                nodes: Mutex::new(HashMap::new()),
                dirs: Mutex::new(HashMap::new()),
                dir_gen: AtomicU64::new(0),
                handles: Mutex::new(HashMap::new()),
                next_fh: AtomicU64::new(1),
                releases: Mutex::new(Vec::new()),
                release_kick: tokio::sync::Notify::new(),
                session: tokio::sync::Mutex::new(()),
                claimed: Mutex::new(None),
                stale: Mutex::new(Default::default()),
                tasks: tokio_util::task::TaskTracker::new(),
                wb: Default::default(),
                stopping: tokio_util::sync::CancellationToken::new(),
                space: Mutex::new(None),
                space_wanted: std::sync::atomic::AtomicBool::new(false),
                prefetched: Mutex::new(HashMap::new()),
                data_gen: AtomicU64::new(0),
                meta_clock: AtomicU64::new(1),
            }),
        }
    }

    /// Starts the background work of the filesystem (call once, inside the runtime's reach).
    pub fn start(&self) {
        let i = &self.inner;
        i.tasks.spawn_on(i.clone().release_worker(), &self.rt);
        i.tasks.spawn_on(i.clone().renew_worker(), &self.rt);
        i.tasks.spawn_on(i.clone().age_worker(), &self.rt);
        i.tasks.spawn_on(i.clone().space_worker(), &self.rt);
        if i.o.metrics.is_some() {
            i.tasks.spawn_on(i.clone().metrics_worker(), &self.rt);
        }
    }

    pub fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }
}

impl Inner {
    async fn meta(&self, req: MetaReq) -> R<MetaResp> {
        // A change to an inode's namespace state that is not synced with it:
        // the next fsync of the inode must make the namespace durable.
        let changes = match &req {
            MetaReq::SetAttr { ino, .. }
            | MetaReq::SetXattr { ino, .. }
            | MetaReq::RemoveXattr { ino, .. }
            | MetaReq::Link { ino, .. }
            | MetaReq::Written { ino, .. }
            | MetaReq::Publish { ino, sync: false, .. }
            | MetaReq::Open { ino, truncate: true } => Some(*ino),
            _ => None,
        };
        if let Some(ino) = changes {
            if let Some(n) = self.nodes.lock().get_mut(&ino) {
                n.synced_change = None;
                n.meta_changes += 1;
            }
        }
        let sent = self.meta_tick();
        let resp = self.c.meta(req).await.map_err(errno)?;
        self.settle(&resp, sent);
        match resp {
            MetaResp::WithDirs { reply, dirs } => {
                let until = Instant::now() + self.o.attr_ttl;
                for a in &dirs {
                    self.remember(a);
                    if let Some(n) = self.nodes.lock().get_mut(&a.ino) {
                        n.fresh_until = Some(until);
                    }
                }
                Ok(*reply)
            }
            r => Ok(r),
        }
    }

    async fn statfs(&self) -> R<FsStats> {
        match self.meta(MetaReq::StatFs).await? {
            MetaResp::StatFs(s) => Ok(s),
            _ => Err(wrong_reply()),
        }
    }

    /// A `buffered` write is acknowledged before the cluster has stored it,
    /// so one that would grow a file is refused here, at `write()`, with
    /// ENOSPC once the cluster is past nearfull: when what users can still
    /// store (asked of the IOMs about every `SPACE_MAX_AGE / 2`, less what
    /// this client has sent since) is less than `bytes` (what it holds unsent,
    /// this write included) plus a margin of 1/64 of the capacity. A
    /// cluster whose figures cannot be had is not refused here (the flush
    /// reports what fails, at fsync or close).
    ///
    /// The figure is refreshed in the background (`space_worker`, while
    /// `buffered` writes come) so a writer never waits for the IOMs' answers
    /// (a down IOM takes its time out); only a write that finds no figure
    /// younger than `4 × SPACE_MAX_AGE` (the first, or after a pause) asks
    /// inline.
    pub(super) async fn room_for(&self, bytes: u64) -> R<()> {
        use std::sync::atomic::Ordering;
        self.space_wanted.store(true, Ordering::Relaxed);
        let cached = *self.space.lock();
        let (free, total, at) = match cached {
            Some((t, (free, total), at)) if t.elapsed() < 4 * SPACE_MAX_AGE => (free, total, at),
            _ => {
                self.refresh_space().await;
                match *self.space.lock() {
                    Some((_, (free, total), at)) => (free, total, at),
                    None => return Ok(()),
                }
            }
        };
        let sent_since = self.c.written.load(Ordering::Relaxed).saturating_sub(at);
        if total > 0 && free.saturating_sub(sent_since) < bytes {
            return Err(Errno::ENOSPC);
        }
        Ok(())
    }

    /// Asks the IOMs for their room now (see `room_for`).
    async fn refresh_space(&self) {
        let at = self.c.written.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(space) = self.c.usable_space().await {
            *self.space.lock() = Some((Instant::now(), space, at));
        }
    }

    /// Background task: keeps the cluster's room at most `SPACE_MAX_AGE`
    /// old while `buffered` writes that grow files come.
    /// Publishes the buffer's use for the metrics endpoint every second.
    async fn metrics_worker(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.stopping.cancelled() => return,
            }
            metrics::gauge!("iomfs_client_buffered_bytes").set(self.wb.total() as f64);
            metrics::gauge!("iomfs_client_buffer_cap_bytes").set(self.o.buffer.total as f64);
        }
    }

    async fn space_worker(self: Arc<Self>) {
        use std::sync::atomic::Ordering;
        loop {
            tokio::select! {
                _ = tokio::time::sleep(SPACE_MAX_AGE / 2) => {}
                _ = self.stopping.cancelled() => return,
            }
            let stale = self.space.lock().is_none_or(|(t, _, _)| t.elapsed() >= SPACE_MAX_AGE / 2);
            if stale && self.space_wanted.swap(false, Ordering::Relaxed) {
                self.refresh_space().await;
            }
        }
    }
}
