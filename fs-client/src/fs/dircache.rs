//! The directory-listing cache: names of directories this client listed
//! recently ([`DirNames`]), which answer lookups — positively and
//! negatively — without a round trip to the namespace, and the operations
//! that change entries (create, unlink, rmdir, rename, link) and keep those
//! listings exact.
//!
//! Invariants: a listing is used for no longer than the entry TTL the
//! kernel uses for its own dentries (the same staleness towards other
//! clients as a dentry); every entry change by this client first bumps
//! `dir_gen` (so a listing taken meanwhile is not kept), then either
//! applies its result to the listing or, when it failed or its result is
//! unknown, drops the listing.

use super::{wrong_reply, Inner, R};
use common::meta::*;
use common::Ino;
use fuser::Errno;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Names of a directory this client listed (positive entries only).
#[derive(Default)]
pub(super) struct DirNames {
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

impl Inner {
    /// Lookup: from a fresh listing of the directory if there is one, else
    /// from the namespace (listing the directory first when lookups in it
    /// come in a run).
    pub(super) async fn lookup(&self, parent: Ino, nm: Vec<u8>) -> R<Attr> {
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
            _ => Err(wrong_reply()),
        }
    }

    /// The answer of a fresh listing of `parent` for `nm`: its attributes,
    /// or ENOENT when the listing lacks it (the same staleness towards
    /// other clients as a negative dentry cached for the entry TTL; this
    /// client's own changes keep the listing exact). None: no listing.
    pub(super) fn listed_attr(&self, parent: Ino, nm: &[u8], ttl: Duration) -> Option<R<Attr>> {
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

    pub(super) async fn create(&self, parent: Ino, nm: Vec<u8>, node: NewNode, caller: Caller, open: bool) -> R<Attr> {
        let NewNode { kind, perm, rdev, target } = node;
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
            _ => Err(wrong_reply()),
        }
    }

    /// unlink(2) of `nm` in `parent`.
    pub(super) async fn unlink(&self, parent: Ino, nm: Vec<u8>) -> R<()> {
        self.remove(parent, MetaReq::Unlink { parent, name: nm.clone() }, &nm).await
    }

    /// rmdir(2) of `nm` in `parent`.
    pub(super) async fn rmdir(&self, parent: Ino, nm: Vec<u8>) -> R<()> {
        self.remove(parent, MetaReq::Rmdir { parent, name: nm.clone() }, &nm).await
    }

    /// Removes the entry `nm` of `parent` with `req` (an unlink or rmdir).
    async fn remove(&self, parent: Ino, req: MetaReq, nm: &[u8]) -> R<()> {
        if self.o.read_only {
            return Err(Errno::EROFS);
        }
        self.dir_begin();
        let r = self.meta(req).await.map(|_| ());
        match r {
            Ok(()) => self.dir_set(parent, nm, None),
            Err(_) => self.dir_drop(parent),
        }
        r
    }

    /// rename(2), with the kernel's `RENAME_*` flags.
    pub(super) async fn rename(&self, p: Ino, nm: Vec<u8>, np: Ino, newname: Vec<u8>, flags: u32) -> R<()> {
        if self.o.read_only {
            return Err(Errno::EROFS);
        }
        self.dir_begin();
        let moved = self.listed_ino(p, &nm);
        let req = MetaReq::Rename { parent: p, name: nm.clone(), new_parent: np, new_name: newname.clone(), flags };
        let r = self.meta(req).await.map(|_| ());
        match (&r, moved) {
            (Ok(()), Some(ino)) if flags & libc::RENAME_EXCHANGE == 0 => {
                self.dir_set(p, &nm, None);
                self.dir_set(np, &newname, Some(ino));
            }
            _ => {
                self.dir_drop(p);
                self.dir_drop(np);
            }
        }
        r
    }

    /// link(2): `ino` gets the name `nm` in `new_parent`.
    pub(super) async fn link(&self, ino: Ino, new_parent: Ino, nm: Vec<u8>) -> R<Attr> {
        let req = MetaReq::Link { ino, new_parent, new_name: nm.clone() };
        self.dir_begin();
        let res = self.meta(req).await;
        match &res {
            Ok(MetaResp::Attr(a)) => self.dir_set(new_parent, &nm, Some(a.ino)),
            _ => self.dir_drop(new_parent),
        }
        match res {
            Ok(MetaResp::Attr(a)) => Ok(self.remember(&a)),
            Ok(_) => Err(wrong_reply()),
            Err(e) => Err(e),
        }
    }

    /// Up to `max` entries of `dir` after `cookie`, for the kernel's
    /// readdir (`plus`: with their attributes).
    pub(super) async fn read_dir(&self, dir: Ino, cookie: u64, max: u32, plus: bool) -> R<Vec<DirEntry>> {
        match self.meta(MetaReq::ReadDir { ino: dir, cookie, max, plus }).await? {
            MetaResp::Entries(es) => Ok(es),
            _ => Err(wrong_reply()),
        }
    }

    /// The attributes to give the kernel with a readdirplus entry: those it
    /// came with (remembered), else what this client knows (none: skip it).
    pub(super) fn entry_attr(&self, e: &DirEntry) -> Option<Attr> {
        match &e.attr {
            Some(a) => Some(self.remember(a)),
            None => self.node(e.ino).map(|n| n.merged()),
        }
    }

    /// fsyncdir(2): every namespace change is made durable.
    pub(super) async fn sync_dir(&self) -> R<()> {
        self.meta(MetaReq::Sync).await.map(|_| ())
    }
}
