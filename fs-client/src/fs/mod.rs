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
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            toughness: Toughness::Atomic,
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            read_only: false,
            buffer: BufferCaps::default(),
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
            }),
        }
    }

    /// Starts the background work of the filesystem (call once, inside the runtime's reach).
    pub fn start(&self) {
        let i = &self.inner;
        i.tasks.spawn_on(i.clone().release_worker(), &self.rt);
        i.tasks.spawn_on(i.clone().renew_worker(), &self.rt);
        i.tasks.spawn_on(i.clone().age_worker(), &self.rt);
    }

    pub fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }
}

impl Inner {
    async fn meta(&self, req: MetaReq) -> R<MetaResp> {
        match self.c.meta(req).await.map_err(errno)? {
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
}
