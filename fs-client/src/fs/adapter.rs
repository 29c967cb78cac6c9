//! The FUSE adapter: `impl Filesystem for IomFs`, like fuser's
//! `examples/simple.rs` — each request is decoded (kernel types to iomfs
//! types), handed to an operation of [`Inner`] on the tokio runtime, and
//! its result or errno is the reply.
//!
//! Invariants: the session threads never wait on the cluster (everything
//! that needs a round trip is spawned; only answers the tables already
//! hold are given in place); the errnos decided here are only those of the
//! request itself (a mknod of a directory or symlink, a fallocate mode, an
//! xattr buffer too small, any ioctl); every error from the cluster arrives
//! already translated (see `fs::errno`).

use super::{xattr, Inner, IomFs, R};
use bytes::Bytes;
use common::meta::*;
use common::Ino;
use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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

fn file_attr(a: &Attr) -> FileAttr {
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

fn xattr_reply(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if (size as usize) < data.len() {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

impl IomFs {
    /// Runs the request `op` on the runtime; its time from here to the
    /// reply (which the future sends) is recorded for the metrics.
    fn spawn<F, Fut>(&self, op: &'static str, f: F)
    where
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let t0 = std::time::Instant::now();
        let fut = f(self.inner.clone());
        self.inner.tasks.spawn_on(
            async move {
                fut.await;
                metrics::histogram!("iomfs_client_fuse_request_duration_seconds", "op" => op)
                    .record(t0.elapsed().as_secs_f64());
            },
            &self.rt,
        );
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
            | InitFlags::FUSE_CACHE_SYMLINKS
            // Setuid, setgid and capabilities are dropped here on write,
            // truncate and chown (`drop_privs_for_write`, `setattr`): the
            // kernel then no longer asks for `security.capability` before
            // every write (one FUSE round trip per write()).
            | InitFlags::FUSE_HANDLE_KILLPRIV_V2;
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
        self.spawn("lookup", move |fs| async move {
            let r = fs.lookup(Ino(parent.0), nm).await;
            entry(reply, ttl, r)
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let ttl = self.inner.o.attr_ttl;
        if let Some((a, left)) = self.inner.fresh_attr(Ino(ino.0)) {
            return reply.attr(&left.min(ttl), &file_attr(&a));
        }
        self.spawn("getattr", move |fs| async move {
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
            // FUSE_HANDLE_KILLPRIV_V2: the kernel leaves to the filesystem
            // what Linux does on a chown (setuid and setgid cleared, whoever
            // calls) and on a truncate by a caller without CAP_FSETID (the
            // kernel's FATTR_KILL_SUIDGID, which fuser does not pass on:
            // a non-root caller stands for it). The namespace applies it to
            // files only, and drops their capabilities on either.
            kill_suid: uid.is_some() || gid.is_some() || (size.is_some() && req.uid() != 0),
        };
        let c = caller(req);
        let ttl = self.inner.o.attr_ttl;
        self.spawn("setattr", move |fs| async move {
            match fs.setattr(Ino(ino.0), set, c).await {
                Ok(a) => reply.attr(&ttl, &file_attr(&a)),
                Err(e) => reply.error(e),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.spawn("readlink", move |fs| async move {
            match fs.readlink(Ino(ino.0)).await {
                Ok(d) => reply.data(&d),
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
        self.spawn("mknod", move |fs| async move {
            let r = fs.create(Ino(parent.0), nm, NewNode { kind: k, perm, rdev, target: None }, c, false).await;
            entry(reply, ttl, r)
        });
    }

    fn mkdir(&self, req: &Request, parent: INodeNo, nm: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        let (nm, c, ttl) = (name(nm), caller(req), self.inner.o.entry_ttl);
        let perm = (mode & !umask & 0o7777) as u16;
        self.spawn("mkdir", move |fs| async move {
            let r = fs
                .create(Ino(parent.0), nm, NewNode { kind: FileKind::Directory, perm, rdev: 0, target: None }, c, false)
                .await;
            entry(reply, ttl, r)
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, nm: &OsStr, reply: ReplyEmpty) {
        let nm = name(nm);
        self.spawn("unlink", move |fs| async move { empty(reply, fs.unlink(Ino(parent.0), nm).await) });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, nm: &OsStr, reply: ReplyEmpty) {
        let nm = name(nm);
        self.spawn("rmdir", move |fs| async move { empty(reply, fs.rmdir(Ino(parent.0), nm).await) });
    }

    fn symlink(&self, req: &Request, parent: INodeNo, link: &OsStr, target: &Path, reply: ReplyEntry) {
        let (nm, c, ttl) = (name(link), caller(req), self.inner.o.entry_ttl);
        let t = target.as_os_str().as_bytes().to_vec();
        self.spawn("symlink", move |fs| async move {
            let r = fs
                .create(
                    Ino(parent.0),
                    nm,
                    NewNode { kind: FileKind::Symlink, perm: 0o777, rdev: 0, target: Some(t) },
                    c,
                    false,
                )
                .await;
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
        self.spawn("rename", move |fs| async move {
            empty(reply, fs.rename(Ino(parent.0), nm, Ino(newparent.0), newname, flags).await)
        });
    }

    fn link(&self, _req: &Request, ino: INodeNo, newparent: INodeNo, newname: &OsStr, reply: ReplyEntry) {
        let (nm, ttl) = (name(newname), self.inner.o.entry_ttl);
        self.spawn("link", move |fs| async move { entry(reply, ttl, fs.link(Ino(ino.0), Ino(newparent.0), nm).await) });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.spawn("open", move |fs| async move {
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
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.spawn("read", move |fs| async move {
            match fs.read(Ino(ino.0), fh.0, offset, size).await {
                Ok(b) => reply.data(&b),
                Err(e) => reply.error(e),
            }
        });
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        wf: WriteFlags,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let data = Bytes::copy_from_slice(data);
        let kill = wf.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let c = caller(req);
        self.spawn("write", move |fs| async move {
            match fs.write(Ino(ino.0), fh.0, offset, data, kill, c).await {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            }
        });
    }

    fn flush(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        // close(2): buffered bytes are sent, their error (if any) reported.
        self.spawn("flush", move |fs| async move { empty(reply, fs.publish_and_report(Ino(ino.0)).await) });
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
        self.spawn("release", move |fs| async move { empty(reply, fs.release(fh.0).await) });
    }

    fn fsync(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, datasync: bool, reply: ReplyEmpty) {
        self.spawn("fsync", move |fs| async move { empty(reply, fs.fsync(Ino(ino.0), datasync).await) });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.spawn("readdir", move |fs| async move {
            match fs.read_dir(Ino(ino.0), offset, 512, false).await {
                Ok(es) => {
                    for e in es {
                        if reply.add(INodeNo(e.ino.0), e.cookie, kind(e.kind), OsStr::from_bytes(&e.name)) {
                            break;
                        }
                    }
                    reply.ok()
                }
                Err(e) => reply.error(e),
            }
        });
    }

    fn readdirplus(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let ttl = self.inner.o.entry_ttl;
        self.spawn("readdirplus", move |fs| async move {
            match fs.read_dir(Ino(ino.0), offset, 256, true).await {
                Ok(es) => {
                    for e in es {
                        let Some(a) = fs.entry_attr(&e) else { continue };
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
                Err(e) => reply.error(e),
            }
        });
    }

    fn fsyncdir(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        self.spawn("fsyncdir", move |fs| async move { empty(reply, fs.sync_dir().await) });
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        self.spawn("statfs", move |fs| async move {
            match fs.statfs().await {
                Ok(s) => {
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
        if let Err(e) = xattr::check_set(&nm, value) {
            return reply.error(e);
        }
        let value = value.to_vec();
        self.spawn("setxattr", move |fs| async move {
            empty(reply, fs.setxattr(Ino(ino.0), nm, value, flags as u32).await)
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, nm: &OsStr, size: u32, reply: ReplyXattr) {
        let nm = name(nm);
        if self.inner.caps_known_absent(Ino(ino.0), &nm) {
            return reply.error(Errno::ENODATA);
        }
        self.spawn("getxattr", move |fs| async move {
            match fs.getxattr(Ino(ino.0), &nm).await {
                Ok(v) => xattr_reply(reply, size, &v),
                Err(e) => reply.error(e),
            }
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.spawn("listxattr", move |fs| async move {
            match fs.listxattr(Ino(ino.0)).await {
                Ok(buf) => xattr_reply(reply, size, &buf),
                Err(e) => reply.error(e),
            }
        });
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, nm: &OsStr, reply: ReplyEmpty) {
        let nm = name(nm);
        if let Err(e) = xattr::check_remove(&nm) {
            return reply.error(e);
        }
        self.spawn("removexattr", move |fs| async move { empty(reply, fs.removexattr(Ino(ino.0), nm).await) });
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
        self.spawn("create", move |fs| async move {
            match fs.create_open(Ino(parent.0), nm, perm, c, flags).await {
                Ok((a, fh)) => reply.created(&ttl, &file_attr(&a), Generation(0), fh, FopenFlags::empty()),
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
        self.spawn(
            "fallocate",
            move |fs| async move { empty(reply, fs.fallocate(Ino(ino.0), offset, length, c).await) },
        );
    }
}
