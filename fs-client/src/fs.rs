//! The FUSE filesystem: POSIX operations on the cluster's namespace and
//! objects.
//!
//! Every request is answered from a task on the tokio runtime, so the FUSE
//! session threads only read and dispatch and many requests are in flight at
//! once. Writes go straight to the data IOMs at the file's toughness (no
//! write-back cache: the toughness names when `write()` may return). Sizes
//! grown by writes are kept locally while a file is open and published on
//! `flush`/`fsync`/`release` (close-to-open); `open` fetches fresh attributes
//! and keeps the kernel's page cache only if the file did not change.

use crate::cluster::{ClientError, ClusterClient};
use bytes::Bytes;
use common::meta::*;
use common::toughness::{LAYOUT_XATTR, TOUGHNESS_XATTR};
use common::{Ino, ObjectId, Toughness};
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Mount-wide settings (`-o` options).
#[derive(Clone, Debug)]
pub struct FsOptions {
    /// Toughness of files and directories with none set.
    pub toughness: Toughness,
    pub attr_ttl: Duration,
    pub entry_ttl: Duration,
    pub read_only: bool,
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            toughness: Toughness::Atomic,
            attr_ttl: Duration::from_secs(1),
            entry_ttl: Duration::from_secs(1),
            read_only: false,
        }
    }
}

/// What this client knows of an inode.
#[derive(Clone, Debug)]
struct Node {
    /// Last attributes from the namespace.
    attr: Attr,
    /// End of data written through this client and not yet published.
    dirty_end: u64,
    dirty_mtime: Option<Timestamp>,
    /// Open handles with write access.
    writers: u32,
    opens: u32,
    /// IOM roles (bit i = role i) that writes through this client touched
    /// (data and parity) since the last fsync: the only IOMs an fsync must
    /// flush.
    unsynced: u64,
    /// The inode had no `security.capability` when its `attr.change` was
    /// this: the kernel asks before every write (to drop a capability on
    /// write), and is answered here while the inode has not changed.
    no_caps: Option<u64>,
    /// `attr` is the state right after a change this client made (a
    /// directory whose entries it changed): the kernel's next getattr is
    /// answered from it until then.
    fresh_until: Option<Instant>,
    /// Times set with utimens while this client had the file open for
    /// writing, published with its size on close (like the mtime of writes).
    atime_set: Option<Timestamp>,
    mtime_set: Option<Timestamp>,
    /// When times were last set that way (the inode's change time).
    times_ctime: Option<Timestamp>,
    /// (change, object, size) the file had at this client's last open: the
    /// kernel's page cache of it is kept at the next open only if they are
    /// still the same. Not the attributes after this client's own publish:
    /// another client's writes may have landed between this client's
    /// writes and its close, and the pages this client cached would hide
    /// them (close-to-open).
    opened_as: Option<(u64, ObjectId, u64)>,
}

impl Node {
    fn merged(&self) -> Attr {
        let mut a = self.attr.clone();
        if self.dirty_end > a.size {
            a.size = self.dirty_end;
        }
        if let Some(m) = self.dirty_mtime {
            a.mtime = a.mtime.max(m);
            a.ctime = a.ctime.max(m);
        }
        if let Some(t) = self.atime_set {
            a.atime = t;
        }
        if let Some(t) = self.mtime_set {
            a.mtime = t;
        }
        if let Some(t) = self.times_ctime {
            a.ctime = a.ctime.max(t);
        }
        a
    }
    fn is_dirty(&self) -> bool {
        self.dirty_mtime.is_some() || self.unsynced != 0 || self.has_times()
    }
    fn has_times(&self) -> bool {
        self.atime_set.is_some() || self.mtime_set.is_some()
    }
}

struct Handle {
    ino: Ino,
    write: bool,
    /// O_SYNC / O_DSYNC: every write is durable.
    sync: bool,
}

/// Names of a directory this client listed (positive entries only).
#[derive(Default)]
struct DirNames {
    /// When the listing was asked for (none: no listing, only counting).
    listed: Option<Instant>,
    names: HashMap<Vec<u8>, Ino>,
    /// Lookups sent to the namespace since `since`.
    misses: u32,
    since: Option<Instant>,
}

/// A directory gets listed once this many lookups in it missed within one
/// entry TTL (a run of lookups: stat of every file, `rm -r`, `diff -r`).
const LIST_AFTER: u32 = 8;
/// Directories larger than this are never listed for lookups.
const LIST_MAX: usize = 8192;

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
}

pub struct IomFs {
    rt: tokio::runtime::Handle,
    inner: Arc<Inner>,
}

type R<T> = Result<T, Errno>;

fn errno(e: ClientError) -> Errno {
    if e.code().is_none() || e.errno() == libc::EIO {
        tracing::warn!("I/O error: {e}");
    }
    Errno::from_i32(e.errno())
}

fn time(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nsecs)
    } else {
        UNIX_EPOCH - Duration::new((-t.secs) as u64, 0) + Duration::new(0, t.nsecs)
    }
}

fn stamp(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp { secs: d.as_secs() as i64, nsecs: d.subsec_nanos() },
        Err(e) => {
            let d = e.duration();
            let (mut s, mut n) = (-(d.as_secs() as i64), d.subsec_nanos());
            if n > 0 {
                s -= 1;
                n = 1_000_000_000 - n;
            }
            Timestamp { secs: s, nsecs: n }
        }
    }
}

fn kind(k: FileKind) -> FileType {
    match k {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
    }
}

pub fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino.0),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.crtime),
        kind: kind(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 65536,
        flags: 0,
    }
}

fn caller(req: &Request) -> Caller {
    Caller { uid: req.uid(), gid: req.gid() }
}

fn name(n: &OsStr) -> Vec<u8> {
    n.as_bytes().to_vec()
}

impl Inner {
    /// Stores attributes fresh from the namespace; returns what to tell the kernel.
    fn remember(&self, a: &Attr) -> Attr {
        let mut nodes = self.nodes.lock();
        match nodes.get_mut(&a.ino) {
            Some(n) => {
                n.attr = a.clone();
                n.merged()
            }
            None => {
                if nodes.len() > 200_000 {
                    nodes.retain(|_, n| n.opens > 0 || n.is_dirty());
                }
                nodes.insert(
                    a.ino,
                    Node {
                        attr: a.clone(),
                        dirty_end: 0,
                        dirty_mtime: None,
                        writers: 0,
                        opens: 0,
                        unsynced: 0,
                        no_caps: None,
                        fresh_until: None,
                        atime_set: None,
                        mtime_set: None,
                        times_ctime: None,
                        opened_as: None,
                    },
                );
                a.clone()
            }
        }
    }

    /// Lookup: from a fresh listing of the directory if there is one, else
    /// from the namespace (listing the directory first when lookups in it
    /// come in a run).
    async fn lookup(&self, parent: Ino, nm: Vec<u8>) -> R<Attr> {
        let ttl = self.o.entry_ttl;
        if !ttl.is_zero() {
            if let Some(a) = self.listed_attr(parent, &nm, ttl) {
                return a;
            }
            let list = {
                let mut dirs = self.dirs.lock();
                if dirs.len() > 4096 {
                    dirs.retain(|_, d| d.listed.is_some_and(|t| t.elapsed() < ttl));
                }
                let d = dirs.entry(parent).or_default();
                if d.listed.is_some_and(|t| t.elapsed() < ttl) {
                    false
                } else {
                    if d.since.is_none_or(|t| t.elapsed() > ttl) {
                        d.since = Some(Instant::now());
                        d.misses = 0;
                    }
                    d.misses += 1;
                    d.misses == LIST_AFTER
                }
            };
            if list {
                self.list_dir(parent).await;
                if let Some(a) = self.listed_attr(parent, &nm, ttl) {
                    return a;
                }
            }
        }
        match self.meta(MetaReq::Lookup { parent, name: nm }).await? {
            MetaResp::Attr(a) => Ok(self.remember(&a)),
            _ => Err(Errno::EIO),
        }
    }

    /// The answer of a fresh listing of `parent` for `nm`: its attributes,
    /// or ENOENT when the listing lacks it (the same staleness towards
    /// other clients as a negative dentry cached for the entry TTL; this
    /// client's own changes keep the listing exact). None: no listing.
    fn listed_attr(&self, parent: Ino, nm: &[u8], ttl: Duration) -> Option<R<Attr>> {
        let ino = {
            let dirs = self.dirs.lock();
            let d = dirs.get(&parent)?;
            if d.listed.is_none_or(|t| t.elapsed() >= ttl) {
                return None;
            }
            match d.names.get(nm) {
                Some(i) => *i,
                None => return Some(Err(Errno::ENOENT)),
            }
        };
        self.node(ino).map(|n| Ok(n.merged()))
    }

    /// Lists a directory for lookups (attributes refreshed on the way).
    async fn list_dir(&self, dir: Ino) {
        let gen = self.dir_gen.load(Ordering::Acquire);
        let asked = Instant::now();
        let mut names = HashMap::new();
        let mut cookie = 0;
        loop {
            let Ok(MetaResp::Entries(es)) =
                self.meta(MetaReq::ReadDir { ino: dir, cookie, max: 1024, plus: true }).await
            else {
                return;
            };
            let Some(last) = es.last() else { break };
            cookie = last.cookie;
            for e in es {
                if let (Some(a), false) = (&e.attr, e.name == b"." || e.name == b"..") {
                    self.remember(a);
                    names.insert(e.name, e.ino);
                }
            }
            if names.len() > LIST_MAX {
                return;
            }
        }
        let mut dirs = self.dirs.lock();
        if self.dir_gen.load(Ordering::Acquire) != gen {
            return;
        }
        let d = dirs.entry(dir).or_default();
        d.listed = Some(asked);
        d.names = names;
    }

    /// This client is about to change entries of a directory: a listing
    /// taken meanwhile is not kept.
    fn dir_begin(&self) {
        self.dir_gen.fetch_add(1, Ordering::AcqRel);
    }

    /// This client changed the entry `nm` of `dir`: it now names `ino`
    /// (none: removed).
    fn dir_set(&self, dir: Ino, nm: &[u8], ino: Option<Ino>) {
        let mut dirs = self.dirs.lock();
        self.dir_gen.fetch_add(1, Ordering::AcqRel);
        if let Some(d) = dirs.get_mut(&dir) {
            match ino {
                Some(i) => {
                    d.names.insert(nm.to_vec(), i);
                }
                None => {
                    d.names.remove(nm);
                }
            }
        }
    }

    /// The entries of `dir` are not known exactly any more (a change
    /// failed, or its result is unknown): drop its listing.
    fn dir_drop(&self, dir: Ino) {
        let mut dirs = self.dirs.lock();
        self.dir_gen.fetch_add(1, Ordering::AcqRel);
        if let Some(d) = dirs.get_mut(&dir) {
            d.listed = None;
            d.names.clear();
        }
    }

    /// The inode a fresh listing of `dir` has for `nm`.
    fn listed_ino(&self, dir: Ino, nm: &[u8]) -> Option<Ino> {
        self.dirs.lock().get(&dir).filter(|d| d.listed.is_some()).and_then(|d| d.names.get(nm).copied())
    }

    fn node(&self, ino: Ino) -> Option<Node> {
        self.nodes.lock().get(&ino).cloned()
    }

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

    /// Attributes this client knows exactly (right after its own change),
    /// with how long they stay exact.
    fn fresh_attr(&self, ino: Ino) -> Option<(Attr, Duration)> {
        let nodes = self.nodes.lock();
        let n = nodes.get(&ino)?;
        let left = n.fresh_until?.checked_duration_since(Instant::now())?;
        Some((n.merged(), left))
    }

    async fn attr_of(&self, ino: Ino) -> R<Attr> {
        match self.meta(MetaReq::GetAttr { ino }).await? {
            MetaResp::Attr(a) => Ok(self.remember(&a)),
            _ => Err(Errno::EIO),
        }
    }

    /// The node of an inode, fetching it if this client does not know it.
    async fn known(&self, ino: Ino) -> R<Node> {
        if let Some(n) = self.node(ino) {
            return Ok(n);
        }
        self.attr_of(ino).await?;
        self.node(ino).ok_or(Errno::ESTALE)
    }

    /// Publishes size and mtime of writes made through this client.
    async fn publish(&self, ino: Ino) -> R<()> {
        self.publish_and(ino, false).await
    }

    /// Publishes, and with `sync` makes every namespace change durable in
    /// the same round trip (fsync).
    async fn publish_and(&self, ino: Ino, sync: bool) -> R<()> {
        // The local size stays in force until the namespace has the new one:
        // a getattr answered meanwhile must not report the old, smaller size
        // (the kernel would drop the file's tail from its page cache).
        let dirty = self.nodes.lock().get(&ino).and_then(|n| {
            (n.dirty_mtime.is_some() || n.has_times()).then_some((n.dirty_end, n.dirty_mtime, n.atime_set, n.mtime_set))
        });
        let (end, mtime, atime_set, mtime_set) = match dirty {
            Some(d) => d,
            None if sync => return self.meta(MetaReq::Sync).await.map(|_| ()),
            None => return Ok(()),
        };
        let req = match mtime {
            Some(mtime) if atime_set.is_none() && mtime_set.is_none() => {
                if sync {
                    MetaReq::WrittenSync { ino, end, mtime }
                } else {
                    MetaReq::Written { ino, end, mtime }
                }
            }
            _ => MetaReq::Publish { ino, end, mtime, atime_set, mtime_set, sync },
        };
        let r = self.meta(req).await;
        if let Ok(MetaResp::Attr(a)) = &r {
            let mut nodes = self.nodes.lock();
            if let Some(n) = nodes.get_mut(&ino) {
                // This publication is the only change since the inode was
                // known to have no capability: it still has none.
                if n.no_caps == Some(n.attr.change) && a.change == n.attr.change + 1 {
                    n.no_caps = Some(a.change);
                }
                n.attr = a.clone();
                // Clean unless this client wrote more meanwhile (published next time).
                if n.dirty_mtime == mtime && n.dirty_end <= end {
                    n.dirty_mtime = None;
                    n.dirty_end = 0;
                }
                if n.atime_set == atime_set && n.mtime_set == mtime_set {
                    n.atime_set = None;
                    n.mtime_set = None;
                    n.times_ctime = None;
                }
            }
        }
        // On an error it stays dirty, so a later flush tries again.
        r.map(|_| ())
    }

    /// This client changes the inode's extended attributes: ask the
    /// namespace about `security.capability` again.
    fn forget_caps(&self, ino: Ino) {
        if let Some(n) = self.nodes.lock().get_mut(&ino) {
            n.no_caps = None;
            n.fresh_until = None;
        }
    }

    fn mark_unsynced(&self, ino: Ino, roles: u64) {
        if let Some(n) = self.nodes.lock().get_mut(&ino) {
            n.unsynced |= roles;
        }
    }

    fn toughness_of(&self, n: &Node) -> Toughness {
        n.attr.toughness.unwrap_or(self.o.toughness)
    }

    fn new_handle(&self, ino: Ino, write: bool, sync: bool) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle { ino, write, sync });
        let mut nodes = self.nodes.lock();
        if let Some(n) = nodes.get_mut(&ino) {
            n.opens += 1;
            if write {
                n.writers += 1;
            }
        }
        FileHandle(fh)
    }

    async fn write(&self, ino: Ino, fh: u64, offset: u64, data: Bytes) -> R<u32> {
        let sync = self.handles.lock().get(&fh).map(|h| h.sync).unwrap_or(false);
        let n = self.known(ino).await?;
        if n.attr.kind != FileKind::Regular {
            return Err(Errno::EINVAL);
        }
        let t = if sync { Toughness::Durable } else { self.toughness_of(&n) };
        let len = data.len() as u32;
        let end = offset + data.len() as u64;
        if end > i64::MAX as u64 {
            return Err(Errno::EFBIG);
        }
        let roles = self.c.write_roles(n.attr.object, offset, data.len());
        self.session_ok(ino).await?;
        self.c.write(n.attr.object, offset, data, t).await.map_err(errno)?;
        self.session_ok(ino).await?;
        // Noted once answered: an fsync that started earlier need not cover it.
        self.mark_unsynced(ino, roles);
        let grew = {
            let mut nodes = self.nodes.lock();
            match nodes.get_mut(&ino) {
                Some(n) => {
                    n.dirty_end = n.dirty_end.max(end);
                    n.dirty_mtime = Some(Timestamp::now());
                    n.mtime_set = None;
                    end > n.attr.size
                }
                None => false,
            }
        };
        if t == Toughness::Durable && grew {
            // The data is durable; its new size must be too.
            self.publish_and(ino, true).await?;
        }
        Ok(len)
    }

    async fn read(&self, ino: Ino, offset: u64, size: u32) -> R<Bytes> {
        let n = self.known(ino).await?;
        let a = n.merged();
        if offset >= a.size {
            return Ok(Bytes::new());
        }
        let len = (a.size - offset).min(size as u64) as usize;
        self.session_ok(ino).await?;
        let b = self.c.read(a.object, offset, len).await.map_err(errno)?;
        self.session_ok(ino).await?;
        Ok(b)
    }

    async fn open(&self, ino: Ino, flags: i32) -> R<(FileHandle, FopenFlags)> {
        let acc = flags & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if write && self.o.read_only {
            return Err(Errno::EROFS);
        }
        let truncate = flags & libc::O_TRUNC != 0 && write;
        let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        if truncate {
            if let Some(n) = self.nodes.lock().get_mut(&ino) {
                n.dirty_end = 0;
                n.dirty_mtime = None;
                n.mtime_set = None;
            }
        } else {
            self.publish(ino).await?;
        }
        let before = self.node(ino).and_then(|n| n.opened_as);
        let attr = match self.meta(MetaReq::Open { ino, truncate }).await? {
            MetaResp::Opened { attr, .. } => attr,
            _ => return Err(Errno::EIO),
        };
        let now_as = (attr.change, attr.object, attr.size);
        let keep = before == Some(now_as) && !truncate;
        self.remember(&attr);
        if let Some(n) = self.nodes.lock().get_mut(&ino) {
            n.opened_as = Some(now_as);
        }
        let fh = self.new_handle(ino, write, sync);
        Ok((fh, if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() }))
    }

    async fn release(&self, fh: u64) -> R<()> {
        // The handle leaves `handles` and joins `releases` in one step: a
        // renewal lists it in one of the two, never in neither.
        let Some(h) = ({
            let mut handles = self.handles.lock();
            let h = handles.remove(&fh);
            if let Some(h) = &h {
                self.releases.lock().push(h.ino);
            }
            h
        }) else {
            return Ok(());
        };
        let last_writer = {
            let mut nodes = self.nodes.lock();
            match nodes.get_mut(&h.ino) {
                Some(n) => {
                    n.opens = n.opens.saturating_sub(1);
                    if h.write {
                        n.writers = n.writers.saturating_sub(1);
                    }
                    n.writers == 0
                }
                None => true,
            }
        };
        let published = if last_writer { self.publish(h.ino).await } else { Ok(()) };
        self.release_kick.notify_one();
        published
    }

    /// Sends the releases queued so far.
    pub async fn send_releases(&self) {
        let _turn = self.session.lock().await;
        let inos = std::mem::take(&mut *self.releases.lock());
        if inos.is_empty() {
            return;
        }
        if let Err(e) = self.meta(MetaReq::ReleaseMany { inos: inos.clone() }).await {
            // Kept for the next batch: a release lost would keep its file
            // for as long as this mount lives.
            tracing::warn!("release of closed handles not recorded by the namespace (retried): {e:?}");
            let mut r = self.releases.lock();
            let later = std::mem::replace(&mut *r, inos);
            r.extend(later);
        }
    }

    /// Background task: releases go out in batches.
    async fn release_worker(self: Arc<Self>) {
        loop {
            // A kick, or once a second (releases kept after a failure).
            tokio::select! {
                _ = self.release_kick.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            // Collect the releases of a burst of closes.
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.send_releases().await;
        }
    }

    /// Background task: renews the lease every third of it, whether or not
    /// other requests did (sooner after a failure).
    async fn renew_worker(self: Arc<Self>) {
        loop {
            let every = self.c.cfg.client_lease() / 3;
            let wait = match self.renew().await {
                Ok(()) => every,
                Err(e) => {
                    tracing::debug!("lease renewal failed: {e:?}");
                    every.min(Duration::from_secs(1))
                }
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Renews the lease with this client's open handles — those closed but
    /// not yet reported count too, as their release follows (and subtracts
    /// them). The namespace takes the list into a session it does not know
    /// yet (after its own restart or failover, or the session's expiry);
    /// handles of files it names as gone become stale.
    async fn renew(&self) -> R<()> {
        let _turn = self.session.lock().await;
        let mut opens: HashMap<Ino, u32> = HashMap::new();
        {
            let handles = self.handles.lock();
            let releases = self.releases.lock();
            for ino in handles.values().map(|h| h.ino).chain(releases.iter().copied()) {
                *opens.entry(ino).or_default() += 1;
            }
        }
        let opens: Vec<(Ino, u32)> = opens.into_iter().collect();
        let sent = Instant::now();
        let (expired, missing) = match self.c.meta(MetaReq::Renew { opens }).await.map_err(errno)? {
            MetaResp::Renewed { expired, missing, .. } => (expired, missing),
            _ => return Err(Errno::EIO),
        };
        if expired || !missing.is_empty() {
            tracing::error!(
                stale = missing.len(),
                "this client's session at the namespace had expired (no contact for a whole lease); \
                 files it held open after their unlink were reclaimed, and their handles now answer ESTALE"
            );
        }
        self.stale.lock().extend(missing);
        let mut c = self.claimed.lock();
        *c = Some(c.map_or(sent, |t| t.max(sent)));
        Ok(())
    }

    /// Before and after a handle's data is used: only within `LEASE_TRUST`
    /// of a lease after a renewal is the file surely kept for this client
    /// (else it may have been reclaimed, and its blocks may be another
    /// file's by now); otherwise renew first.
    async fn session_ok(&self, ino: Ino) -> R<()> {
        let trust = self.c.cfg.client_lease().mul_f64(crate::cluster::LEASE_TRUST);
        if !self.claimed.lock().is_some_and(|t| t.elapsed() < trust) {
            self.renew().await?;
        }
        if self.stale.lock().contains(&ino) {
            return Err(Errno::ESTALE);
        }
        Ok(())
    }

    async fn setattr(&self, ino: Ino, set: SetAttr, caller: Caller) -> R<Attr> {
        let times_only = set.mode.is_none()
            && set.uid.is_none()
            && set.gid.is_none()
            && set.size.is_none()
            && !set.kill_suid
            && (set.atime.is_some() || set.mtime.is_some());
        if times_only {
            // utimens of a file this client has open for writing: kept with
            // the size and mtime of its writes and published with them on
            // close (one round trip less per file for `cp -a`, `tar`, `rsync`).
            let mut nodes = self.nodes.lock();
            if let Some(n) = nodes.get_mut(&ino).filter(|n| n.writers > 0 && n.attr.kind == FileKind::Regular) {
                let at = |t: TimeSet| match t {
                    TimeSet::Now => Timestamp::now(),
                    TimeSet::At(x) => x,
                };
                if let Some(t) = set.atime {
                    n.atime_set = Some(at(t));
                }
                if let Some(t) = set.mtime {
                    n.mtime_set = Some(at(t));
                }
                n.times_ctime = Some(Timestamp::now());
                return Ok(n.merged());
            }
        }
        if let Some(size) = set.size {
            if self.o.read_only {
                return Err(Errno::EROFS);
            }
            self.publish(ino).await?;
            let n = self.known(ino).await?;
            if n.attr.kind == FileKind::Directory {
                return Err(Errno::EISDIR);
            }
            let cur = n.attr.size;
            if size > 0 && size < cur {
                self.c.truncate(n.attr.object, cur, size, self.toughness_of(&n)).await.map_err(errno)?;
                self.mark_unsynced(ino, u64::MAX);
            }
        }
        if self.node(ino).is_some_and(|n| n.has_times()) {
            // Times kept back go first, so this change applies after them.
            self.publish(ino).await?;
        }
        let resp = self.meta(MetaReq::SetAttr { ino, set: set.clone(), caller }).await?;
        let MetaResp::Attr(a) = resp else { return Err(Errno::EIO) };
        if set.size.is_some() {
            if let Some(n) = self.nodes.lock().get_mut(&ino) {
                n.dirty_end = 0;
                n.dirty_mtime = None;
            }
        }
        Ok(self.remember(&a))
    }

    async fn fsync(&self, ino: Ino) -> R<()> {
        let n = self.known(ino).await?;
        // Data and metadata are made durable side by side: nothing is
        // promised until both are done.
        let data = async {
            // Only the IOMs this client's writes to the file touched since
            // the last fsync (their data and parity IOMs).
            let roles = self.nodes.lock().get_mut(&ino).map(|n| std::mem::take(&mut n.unsynced)).unwrap_or(0);
            if n.attr.kind == FileKind::Regular && roles != 0 {
                if let Err(e) = self.c.flush_roles(roles).await {
                    self.mark_unsynced(ino, roles);
                    return Err(errno(e));
                }
            }
            Ok(())
        };
        let meta = self.publish_and(ino, true);
        futures::future::try_join(data, meta).await.map(|_| ())
    }

    async fn create(
        &self,
        parent: Ino,
        nm: Vec<u8>,
        kind: FileKind,
        perm: u16,
        rdev: u32,
        caller: Caller,
        target: Option<Vec<u8>>,
        open: bool,
    ) -> R<Attr> {
        if self.o.read_only {
            return Err(Errno::EROFS);
        }
        self.dir_begin();
        let r = self.meta(MetaReq::Create { parent, name: nm.clone(), kind, perm, rdev, caller, target, open }).await;
        match &r {
            Ok(MetaResp::Created { attr, .. }) => self.dir_set(parent, &nm, Some(attr.ino)),
            _ => self.dir_drop(parent),
        }
        match r? {
            MetaResp::Created { attr, .. } => {
                let a = self.remember(&attr);
                // A new inode has no extended attributes.
                if let Some(n) = self.nodes.lock().get_mut(&attr.ino) {
                    n.no_caps = Some(attr.change);
                }
                Ok(a)
            }
            _ => Err(Errno::EIO),
        }
    }

    fn layout_value(&self, a: &Attr) -> Vec<u8> {
        let l = self.c.layout;
        let (data, parity) = l.group_ioms(a.object, common::GroupNo(0));
        let data: Vec<String> = data.iter().map(|i| i.0.to_string()).collect();
        format!(
            "object={} block_size={} ioms={} data_ioms={} parity_iom={}",
            a.object.0,
            l.block_size(),
            l.width(),
            data.join(","),
            parity.0
        )
        .into_bytes()
    }

    async fn getxattr(&self, ino: Ino, nm: &[u8]) -> R<Vec<u8>> {
        if nm == LAYOUT_XATTR.as_bytes() {
            let a = self.attr_of(ino).await?;
            if a.kind != FileKind::Regular {
                return Err(Errno::ENODATA);
            }
            return Ok(self.layout_value(&a));
        }
        let caps = nm == CAPS_XATTR;
        let seen = if caps {
            let nodes = self.nodes.lock();
            match nodes.get(&ino) {
                Some(n) if n.no_caps == Some(n.attr.change) => return Err(Errno::ENODATA),
                Some(n) => Some(n.attr.change),
                None => None,
            }
        } else {
            None
        };
        match self.meta(MetaReq::GetXattr { ino, name: nm.to_vec() }).await {
            Ok(MetaResp::Data(v)) => Ok(v),
            Ok(_) => Err(Errno::EIO),
            Err(e) if e == Errno::ENODATA && caps => {
                if let (Some(change), Some(n)) = (seen, self.nodes.lock().get_mut(&ino)) {
                    n.no_caps = Some(change);
                }
                Err(e)
            }
            // The level in force when none is set on the file: the mount default.
            Err(e) if e == Errno::ENODATA && nm == TOUGHNESS_XATTR.as_bytes() => {
                Ok(self.o.toughness.as_str().as_bytes().to_vec())
            }
            Err(e) => Err(e),
        }
    }
}

fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

/// The capability attribute the kernel looks up before every write.
const CAPS_XATTR: &[u8] = b"security.capability";

fn xattr_allowed(nm: &[u8]) -> bool {
    nm.starts_with(b"user.") || nm.starts_with(b"trusted.") || nm.starts_with(b"security.")
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
            }),
        }
    }

    /// Starts the background work of the filesystem (call once, inside the runtime's reach).
    pub fn start(&self) {
        self.rt.spawn(self.inner.clone().release_worker());
        self.rt.spawn(self.inner.clone().renew_worker());
    }

    pub fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }

    fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        self.rt.spawn(f(self.inner.clone()));
    }
}

fn entry(reply: ReplyEntry, ttl: Duration, r: R<Attr>) {
    match r {
        Ok(a) => reply.entry(&ttl, &file_attr(&a), Generation(0)),
        Err(e) => reply.error(e),
    }
}

fn empty(reply: ReplyEmpty, r: R<()>) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(e),
    }
}

fn done(r: R<MetaResp>) -> R<()> {
    r.map(|_| ())
}

impl Filesystem for IomFs {
    fn init(&mut self, _req: &Request, cfg: &mut KernelConfig) -> std::io::Result<()> {
        let _ = cfg.set_max_write(1 << 20);
        let _ = cfg.set_max_readahead(1 << 20);
        let _ = cfg.set_max_background(64);
        let _ = cfg.set_congestion_threshold(48);
        // No FUSE_ATOMIC_O_TRUNC: with it the kernel zeroes the file's size
        // and drops its page cache on open(O_TRUNC) before the VFS checks
        // write access, so an open(O_RDONLY|O_TRUNC) that then fails with
        // ETXTBSY has already pulled the pages from under a running
        // executable (it dies with SIGBUS/SIGSEGV). Without it the kernel
        // truncates through setattr(size = 0) after that check.
        let want = InitFlags::FUSE_DO_READDIRPLUS
            | InitFlags::FUSE_READDIRPLUS_AUTO
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_MAX_PAGES
            | InitFlags::FUSE_CACHE_SYMLINKS;
        let have = cfg.capabilities();
        let _ = cfg.add_capabilities(want & have);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, nm: &OsStr, reply: ReplyEntry) {
        let nm = name(nm);
        let ttl = self.inner.o.entry_ttl;
        // Answered from a listing right here when it can be (no hop to the runtime).
        if !ttl.is_zero() {
            if let Some(r) = self.inner.listed_attr(Ino(parent.0), &nm, ttl) {
                return entry(reply, ttl, r);
            }
        }
        self.spawn(move |fs| async move {
            let r = fs.lookup(Ino(parent.0), nm).await;
            entry(reply, ttl, r)
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.inner.o.attr_ttl;
        if let Some((a, left)) = self.inner.fresh_attr(Ino(ino.0)) {
            return reply.attr(&left.min(ttl), &file_attr(&a));
        }
        self.spawn(move |fs| async move {
            // Fresh from the namespace, with the size of unpublished local writes on top.
            match fs.attr_of(Ino(ino.0)).await {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let ts = |t: TimeOrNow| match t {
            TimeOrNow::Now => TimeSet::Now,
            TimeOrNow::SpecificTime(s) => TimeSet::At(stamp(s)),
        };
        let set = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(ts),
            mtime: mtime.map(ts),
            ctime: ctime.map(stamp),
            kill_suid: false,
        };
        let c = caller(req);
        let ttl = self.inner.o.attr_ttl;
        self.spawn(move |fs| async move {
            match fs.setattr(Ino(ino.0), set, c).await {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn(move |fs| async move {
            match fs.meta(MetaReq::ReadLink { ino: Ino(ino.0) }).await {
                Ok(MetaResp::Data(d)) => reply.data(&d),
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
        });
    }

    fn mknod(&self, req: &Request, parent: INodeNo, nm: &OsStr, mode: u32, umask: u32, rdev: u32, reply: ReplyEntry) {
        let (nm, c, ttl) = (name(nm), caller(req), self.inner.o.entry_ttl);
        let Some(k) = FileKind::from_mode(mode) else { return reply.error(Errno::EINVAL) };
        if k == FileKind::Directory || k == FileKind::Symlink {
            return reply.error(Errno::EINVAL);
        }
        let perm = (mode & !umask & 0o7777) as u16;
        self.spawn(move |fs| async move {
            let r = fs.create(Ino(parent.0), nm, k, perm, rdev, c, None, false).await;
            entry(reply, ttl, r)
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, nm: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (nm, c, ttl) = (name(nm), caller(req), self.inner.o.entry_ttl);
        let perm = (mode & !umask & 0o7777) as u16;
        self.spawn(move |fs| async move {
            let r = fs.create(Ino(parent.0), nm, FileKind::Directory, perm, 0, c, None, false).await;
            entry(reply, ttl, r)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, nm: &OsStr, reply: ReplyEmpty) {
        let nm = name(nm);
        self.spawn(move |fs| async move {
            let r = if fs.o.read_only {
                Err(Errno::EROFS)
            } else {
                fs.dir_begin();
                let r = done(fs.meta(MetaReq::Unlink { parent: Ino(parent.0), name: nm.clone() }).await);
                match r {
                    Ok(()) => fs.dir_set(Ino(parent.0), &nm, None),
                    Err(_) => fs.dir_drop(Ino(parent.0)),
                }
                r
            };
            empty(reply, r)
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, nm: &OsStr, reply: ReplyEmpty) {
        let nm = name(nm);
        self.spawn(move |fs| async move {
            let r = if fs.o.read_only {
                Err(Errno::EROFS)
            } else {
                fs.dir_begin();
                let r = done(fs.meta(MetaReq::Rmdir { parent: Ino(parent.0), name: nm.clone() }).await);
                match r {
                    Ok(()) => fs.dir_set(Ino(parent.0), &nm, None),
                    Err(_) => fs.dir_drop(Ino(parent.0)),
                }
                r
            };
            empty(reply, r)
        });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link: &OsStr, target: &Path, reply: ReplyEntry) {
        let (nm, c, ttl) = (name(link), caller(req), self.inner.o.entry_ttl);
        let t = target.as_os_str().as_bytes().to_vec();
        self.spawn(move |fs| async move {
            let r = fs.create(Ino(parent.0), nm, FileKind::Symlink, 0o777, 0, c, Some(t), false).await;
            entry(reply, ttl, r)
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        nm: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let (nm, newname) = (name(nm), name(newname));
        let flags = flags.bits();
        self.spawn(move |fs| async move {
            let r = if fs.o.read_only {
                Err(Errno::EROFS)
            } else {
                let (p, np) = (Ino(parent.0), Ino(newparent.0));
                fs.dir_begin();
                let moved = fs.listed_ino(p, &nm);
                let req =
                    MetaReq::Rename { parent: p, name: nm.clone(), new_parent: np, new_name: newname.clone(), flags };
                let r = done(fs.meta(req).await);
                match (&r, moved) {
                    (Ok(()), Some(ino)) if flags & libc::RENAME_EXCHANGE == 0 => {
                        fs.dir_set(p, &nm, None);
                        fs.dir_set(np, &newname, Some(ino));
                    }
                    _ => {
                        fs.dir_drop(p);
                        fs.dir_drop(np);
                    }
                }
                r
            };
            empty(reply, r)
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let (nm, ttl) = (name(newname), self.inner.o.entry_ttl);
        self.spawn(move |fs| async move {
            let req = MetaReq::Link { ino: Ino(ino.0), new_parent: Ino(newparent.0), new_name: nm.clone() };
            fs.dir_begin();
            let res = fs.meta(req).await;
            match &res {
                Ok(MetaResp::Attr(a)) => fs.dir_set(Ino(newparent.0), &nm, Some(a.ino)),
                _ => fs.dir_drop(Ino(newparent.0)),
            }
            let r = match res {
                Ok(MetaResp::Attr(a)) => Ok(fs.remember(&a)),
                Ok(_) => Err(Errno::EIO),
                Err(e) => Err(e),
            };
            entry(reply, ttl, r)
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.spawn(move |fs| async move {
            match fs.open(Ino(ino.0), flags.0).await {
                Ok((fh, f)) => reply.opened(fh, f),
                Err(e) => reply.error(e),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn(move |fs| async move {
            match fs.read(Ino(ino.0), offset, size).await {
                Ok(b) => reply.data(&b),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = Bytes::copy_from_slice(data);
        self.spawn(move |fs| async move {
            match fs.write(Ino(ino.0), fh.0, offset, data).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        self.spawn(move |fs| async move { empty(reply, fs.publish(Ino(ino.0)).await) });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn(move |fs| async move { empty(reply, fs.release(fh.0).await) });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.spawn(move |fs| async move { empty(reply, fs.fsync(Ino(ino.0)).await) });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.spawn(move |fs| async move {
            match fs.meta(MetaReq::ReadDir { ino: Ino(ino.0), cookie: offset, max: 512, plus: false }).await {
                Ok(MetaResp::Entries(es)) => {
                    for e in es {
                        if reply.add(INodeNo(e.ino.0), e.cookie, kind(e.kind), OsStr::from_bytes(&e.name)) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let ttl = self.inner.o.entry_ttl;
        self.spawn(move |fs| async move {
            match fs.meta(MetaReq::ReadDir { ino: Ino(ino.0), cookie: offset, max: 256, plus: true }).await {
                Ok(MetaResp::Entries(es)) => {
                    for e in es {
                        let a = match &e.attr {
                            Some(a) => fs.remember(a),
                            None => match fs.node(e.ino) {
                                Some(n) => n.merged(),
                                None => continue,
                            },
                        };
                        if reply.add(
                            INodeNo(e.ino.0),
                            e.cookie,
                            OsStr::from_bytes(&e.name),
                            &ttl,
                            &file_attr(&a),
                            Generation(0),
                        ) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
        });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.spawn(move |fs| async move { empty(reply, done(fs.meta(MetaReq::Sync).await)) });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn(move |fs| async move {
            match fs.meta(MetaReq::StatFs).await {
                Ok(MetaResp::StatFs(s)) => {
                    let bs = 4096u64;
                    reply.statfs(
                        s.total_bytes / bs,
                        s.free_bytes / bs,
                        s.free_bytes / bs,
                        s.files,
                        u32::MAX as u64,
                        bs as u32,
                        NAME_MAX as u32,
                        bs as u32,
                    )
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
        });
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        nm: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        let nm = name(nm);
        if nm == LAYOUT_XATTR.as_bytes() {
            return reply.error(Errno::EPERM);
        }
        if !xattr_allowed(&nm) {
            return reply.error(Errno::EOPNOTSUPP);
        }
        if nm == TOUGHNESS_XATTR.as_bytes() && Toughness::parse_xattr(value).is_none() {
            return reply.error(Errno::EINVAL);
        }
        let value = value.to_vec();
        self.spawn(move |fs| async move {
            let ino = Ino(ino.0);
            let is_t = nm == TOUGHNESS_XATTR.as_bytes();
            fs.forget_caps(ino);
            let r = done(fs.meta(MetaReq::SetXattr { ino, name: nm, value: value.clone(), flags: flags as u32 }).await);
            fs.forget_caps(ino);
            if r.is_ok() && is_t {
                if let Some(n) = fs.nodes.lock().get_mut(&ino) {
                    n.attr.toughness = Toughness::parse_xattr(&value);
                }
            }
            empty(reply, r)
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, nm: &OsStr, size: u32, reply: ReplyXattr) {
        let nm = name(nm);
        if nm == CAPS_XATTR && self.inner.node(Ino(ino.0)).is_some_and(|n| n.no_caps == Some(n.attr.change)) {
            return reply.error(Errno::ENODATA);
        }
        self.spawn(move |fs| async move {
            match fs.getxattr(Ino(ino.0), &nm).await {
                Ok(v) => xattr_reply(reply, size, &v),
                Err(e) => reply.error(e),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn(move |fs| async move {
            match fs.meta(MetaReq::ListXattr { ino: Ino(ino.0) }).await {
                Ok(MetaResp::Names(ns)) => {
                    let mut buf = Vec::new();
                    for n in ns {
                        buf.extend_from_slice(&n);
                        buf.push(0);
                    }
                    xattr_reply(reply, size, &buf)
                }
                Ok(_) => reply.error(Errno::EIO),
                Err(e) => reply.error(e),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, nm: &OsStr, reply: ReplyEmpty) {
        let nm = name(nm);
        if nm == LAYOUT_XATTR.as_bytes() {
            return reply.error(Errno::EPERM);
        }
        self.spawn(move |fs| async move {
            let ino = Ino(ino.0);
            let is_t = nm == TOUGHNESS_XATTR.as_bytes();
            fs.forget_caps(ino);
            let r = done(fs.meta(MetaReq::RemoveXattr { ino, name: nm }).await);
            fs.forget_caps(ino);
            if r.is_ok() && is_t {
                if let Some(n) = fs.nodes.lock().get_mut(&ino) {
                    n.attr.toughness = None;
                }
            }
            empty(reply, r)
        });
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        nm: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (nm, c) = (name(nm), caller(req));
        let (ttl, perm) = (self.inner.o.entry_ttl, (mode & !umask & 0o7777) as u16);
        self.spawn(move |fs| async move {
            match fs.create(Ino(parent.0), nm, FileKind::Regular, perm, 0, c, None, true).await {
                Ok(a) => {
                    let acc = flags & libc::O_ACCMODE;
                    let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
                    let fh = fs.new_handle(a.ino, write, flags & (libc::O_SYNC | libc::O_DSYNC) != 0);
                    reply.created(&ttl, &file_attr(&a), Generation(0), fh, FopenFlags::empty())
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if mode != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        let c = caller(req);
        self.spawn(move |fs| async move {
            let ino = Ino(ino.0);
            let r = async {
                fs.publish(ino).await?;
                let n = fs.known(ino).await?;
                let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
                let set = if end > n.attr.size {
                    SetAttr { size: Some(end), ..Default::default() }
                } else {
                    SetAttr { ctime: Some(Timestamp::now()), ..Default::default() }
                };
                fs.setattr(ino, set, c).await.map(|_| ())
            }
            .await;
            empty(reply, r)
        });
    }
}
