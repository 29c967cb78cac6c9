//! The namespace as a state machine, without I/O.
//!
//! Every operation is *planned* against the current state, producing either
//! an error or a batch of physical records ([`NsRec`]) plus the reply; the
//! batch is then *applied*. The home applies a batch, journals it and
//! streams it to its mirror, which applies the same batch: both replicas go
//! through the same states.

use common::meta::*;
use common::wire::ErrorCode;
use common::{Ino, ObjectId, Toughness};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// Longest chain of hard links to one inode.
pub const LINK_MAX: u32 = 65000;
/// Cookies 1 and 2 are "." and ".."; entries start at 3.
pub const FIRST_COOKIE: u64 = 3;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inode {
    pub attr: Attr,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub target: Option<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEnt {
    pub ino: Ino,
    pub kind: FileKind,
    pub cookie: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dir {
    pub parent: Ino,
    pub entries: BTreeMap<Vec<u8>, DirEnt>,
    pub by_cookie: BTreeMap<u64, Vec<u8>>,
    pub next_cookie: u64,
}

/// One physical change. A batch of them is one atomic namespace mutation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NsRec {
    PutInode(Box<Inode>),
    DelInode(Ino),
    AddEntry {
        parent: Ino,
        name: Vec<u8>,
        ent: DirEnt,
    },
    DelEntry {
        parent: Ino,
        name: Vec<u8>,
    },
    NewDir {
        ino: Ino,
        parent: Ino,
    },
    DelDir(Ino),
    SetParent {
        dir: Ino,
        parent: Ino,
    },
    Counters {
        next_ino: u64,
        next_object: u64,
    },
    Dead(ObjectId),
    Forget(Vec<ObjectId>),
    /// The reply to request `(client, seq)`, kept for retries.
    Done {
        client: u64,
        seq: u64,
        reply: Box<MetaResp>,
    },
}

/// How many answered requests the duplicate-request cache keeps.
pub const DRC_SIZE: usize = 16384;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct NsState {
    pub inodes: HashMap<Ino, Inode>,
    pub dirs: HashMap<Ino, Dir>,
    pub next_ino: u64,
    pub next_object: u64,
    pub dead: BTreeSet<ObjectId>,
    /// Duplicate-request cache: replies of recent mutations by (client, seq).
    pub drc: HashMap<(u64, u64), MetaResp>,
    pub drc_order: std::collections::VecDeque<(u64, u64)>,
}

/// An error of a namespace operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NsError(pub ErrorCode, pub String);

pub type NsResult<T> = Result<T, NsError>;

fn e(code: ErrorCode, m: impl Into<String>) -> NsError {
    NsError(code, m.into())
}

/// A planned mutation: records to apply and the reply.
pub struct Plan {
    pub recs: Vec<NsRec>,
    pub reply: MetaResp,
}

fn check_name(name: &[u8]) -> NsResult<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(e(ErrorCode::Invalid, "invalid name"));
    }
    if name.len() > NAME_MAX {
        return Err(e(ErrorCode::NameTooLong, "name longer than 255 bytes"));
    }
    Ok(())
}

impl NsState {
    /// A fresh namespace: the root directory, owned by root, mode 0755.
    pub fn new(now: Timestamp) -> NsState {
        let mut s = NsState { next_ino: 2, next_object: 1, ..Default::default() };
        let root = Inode {
            attr: Attr {
                ino: Ino::ROOT,
                kind: FileKind::Directory,
                perm: 0o755,
                nlink: 2,
                uid: 0,
                gid: 0,
                rdev: 0,
                size: 0,
                atime: now,
                mtime: now,
                ctime: now,
                crtime: now,
                object: ObjectId(0),
                toughness: None,
                change: 1,
            },
            xattrs: BTreeMap::new(),
            target: None,
        };
        s.apply(&[NsRec::PutInode(Box::new(root)), NsRec::NewDir { ino: Ino::ROOT, parent: Ino::ROOT }]);
        s
    }

    pub fn apply(&mut self, recs: &[NsRec]) {
        for r in recs {
            match r {
                NsRec::PutInode(i) => {
                    self.next_ino = self.next_ino.max(i.attr.ino.0 + 1);
                    self.inodes.insert(i.attr.ino, (**i).clone());
                }
                NsRec::DelInode(ino) => {
                    self.inodes.remove(ino);
                }
                NsRec::AddEntry { parent, name, ent } => {
                    if let Some(d) = self.dirs.get_mut(parent) {
                        if let Some(old) = d.entries.insert(name.clone(), *ent) {
                            d.by_cookie.remove(&old.cookie);
                        }
                        d.by_cookie.insert(ent.cookie, name.clone());
                        d.next_cookie = d.next_cookie.max(ent.cookie + 1);
                    }
                }
                NsRec::DelEntry { parent, name } => {
                    if let Some(d) = self.dirs.get_mut(parent) {
                        if let Some(old) = d.entries.remove(name) {
                            d.by_cookie.remove(&old.cookie);
                        }
                    }
                }
                NsRec::NewDir { ino, parent } => {
                    self.dirs.entry(*ino).or_insert_with(|| Dir {
                        parent: *parent,
                        next_cookie: FIRST_COOKIE,
                        ..Default::default()
                    });
                }
                NsRec::DelDir(ino) => {
                    self.dirs.remove(ino);
                }
                NsRec::SetParent { dir, parent } => {
                    if let Some(d) = self.dirs.get_mut(dir) {
                        d.parent = *parent;
                    }
                }
                NsRec::Counters { next_ino, next_object } => {
                    self.next_ino = self.next_ino.max(*next_ino);
                    self.next_object = self.next_object.max(*next_object);
                }
                NsRec::Dead(o) => {
                    self.dead.insert(*o);
                }
                NsRec::Forget(os) => {
                    for o in os {
                        self.dead.remove(o);
                    }
                }
                NsRec::Done { client, seq, reply } => {
                    if self.drc.insert((*client, *seq), (**reply).clone()).is_none() {
                        self.drc_order.push_back((*client, *seq));
                    }
                    while self.drc_order.len() > DRC_SIZE {
                        if let Some(k) = self.drc_order.pop_front() {
                            self.drc.remove(&k);
                        }
                    }
                }
            }
        }
    }

    pub fn inode(&self, ino: Ino) -> NsResult<&Inode> {
        self.inodes.get(&ino).ok_or_else(|| e(ErrorCode::NotFound, format!("no inode {ino}")))
    }

    fn dir(&self, ino: Ino) -> NsResult<&Dir> {
        match self.dirs.get(&ino) {
            Some(d) => Ok(d),
            None if self.inodes.contains_key(&ino) => Err(e(ErrorCode::NotDir, "not a directory")),
            None => Err(e(ErrorCode::NotFound, format!("no directory {ino}"))),
        }
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> NsResult<Attr> {
        if name.len() > NAME_MAX {
            return Err(e(ErrorCode::NameTooLong, "name longer than 255 bytes"));
        }
        let d = self.dir(parent)?;
        let ent = d.entries.get(name).ok_or_else(|| e(ErrorCode::NotFound, "no such entry"))?;
        Ok(self.inode(ent.ino)?.attr.clone())
    }

    fn touched(&self, ino: Ino, now: Timestamp) -> NsResult<Inode> {
        let mut i = self.inode(ino)?.clone();
        i.attr.mtime = now;
        i.attr.ctime = now;
        i.attr.change += 1;
        Ok(i)
    }

    fn put(i: Inode) -> NsRec {
        NsRec::PutInode(Box::new(i))
    }

    /// Toughness a new entry of `parent` inherits.
    fn inherited(&self, parent: Ino) -> Option<Toughness> {
        self.inodes.get(&parent).and_then(|p| p.attr.toughness)
    }

    pub fn create(&self, parent: Ino, name: &[u8], node: NewNode, caller: Caller, now: Timestamp) -> NsResult<Plan> {
        let NewNode { kind, perm, rdev, target } = node;
        check_name(name)?;
        let d = self.dir(parent)?;
        if d.entries.contains_key(name) {
            return Err(e(ErrorCode::Exists, "entry exists"));
        }
        if let Some(t) = &target {
            if t.is_empty() {
                return Err(e(ErrorCode::NotFound, "empty symlink target"));
            }
            if t.len() >= PATH_MAX {
                return Err(e(ErrorCode::NameTooLong, "symlink target too long"));
            }
        }
        let p = self.inode(parent)?;
        // BSD group semantics under a setgid directory; setgid bit inherited by directories.
        let setgid_dir = p.attr.perm & 0o2000 != 0;
        let gid = if setgid_dir { p.attr.gid } else { caller.gid };
        let mut perm = perm & 0o7777;
        if kind == FileKind::Directory && setgid_dir {
            perm |= 0o2000;
        }
        if kind == FileKind::Symlink {
            perm = 0o777;
        }
        let ino = Ino(self.next_ino);
        let object = if kind == FileKind::Regular { ObjectId(self.next_object) } else { ObjectId(0) };
        let toughness = self.inherited(parent);
        let attr = Attr {
            ino,
            kind,
            perm,
            nlink: if kind == FileKind::Directory { 2 } else { 1 },
            uid: caller.uid,
            gid,
            rdev,
            size: target.as_ref().map(|t| t.len() as u64).unwrap_or(0),
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            object,
            toughness,
            change: 1,
        };
        let mut pi = self.touched(parent, now)?;
        if kind == FileKind::Directory {
            if pi.attr.nlink >= LINK_MAX {
                return Err(e(ErrorCode::TooManyLinks, "too many subdirectories"));
            }
            pi.attr.nlink += 1;
        }
        let mut recs = vec![
            NsRec::Counters {
                next_ino: ino.0 + 1,
                next_object: self.next_object + u64::from(kind == FileKind::Regular),
            },
            Self::put(Inode { attr: attr.clone(), xattrs: BTreeMap::new(), target }),
            NsRec::AddEntry { parent, name: name.to_vec(), ent: DirEnt { ino, kind, cookie: d.next_cookie } },
            Self::put(pi),
        ];
        if kind == FileKind::Directory {
            recs.push(NsRec::NewDir { ino, parent });
        }
        Ok(Plan { recs, reply: MetaResp::Created { attr, toughness } })
    }

    /// Records that drop one link of `ino` (and the inode with its data when
    /// that was the last link and nobody has it open).
    fn drop_link(&self, ino: Ino, open: bool, now: Timestamp) -> NsResult<Vec<NsRec>> {
        let mut i = self.inode(ino)?.clone();
        i.attr.nlink = i.attr.nlink.saturating_sub(1);
        i.attr.ctime = now;
        i.attr.change += 1;
        if i.attr.nlink == 0 && !open {
            let mut v = vec![NsRec::DelInode(ino)];
            if i.attr.kind == FileKind::Regular && i.attr.object.0 != 0 {
                v.push(NsRec::Dead(i.attr.object));
            }
            Ok(v)
        } else {
            Ok(vec![Self::put(i)])
        }
    }

    pub fn unlink(&self, parent: Ino, name: &[u8], is_open: impl Fn(Ino) -> bool, now: Timestamp) -> NsResult<Plan> {
        check_name(name)?;
        let d = self.dir(parent)?;
        let ent = *d.entries.get(name).ok_or_else(|| e(ErrorCode::NotFound, "no such entry"))?;
        if ent.kind == FileKind::Directory {
            return Err(e(ErrorCode::IsDir, "is a directory"));
        }
        let mut recs = vec![NsRec::DelEntry { parent, name: name.to_vec() }];
        recs.extend(self.drop_link(ent.ino, is_open(ent.ino), now)?);
        recs.push(Self::put(self.touched(parent, now)?));
        Ok(Plan { recs, reply: MetaResp::Done })
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8], now: Timestamp) -> NsResult<Plan> {
        if name == b"." {
            return Err(e(ErrorCode::Invalid, "cannot remove '.'"));
        }
        if name == b".." {
            return Err(e(ErrorCode::NotEmpty, "cannot remove '..'"));
        }
        check_name(name)?;
        let d = self.dir(parent)?;
        let ent = *d.entries.get(name).ok_or_else(|| e(ErrorCode::NotFound, "no such entry"))?;
        if ent.kind != FileKind::Directory {
            return Err(e(ErrorCode::NotDir, "not a directory"));
        }
        if !self.dir(ent.ino)?.entries.is_empty() {
            return Err(e(ErrorCode::NotEmpty, "directory not empty"));
        }
        let mut pi = self.touched(parent, now)?;
        pi.attr.nlink = pi.attr.nlink.saturating_sub(1);
        Ok(Plan {
            recs: vec![
                NsRec::DelEntry { parent, name: name.to_vec() },
                NsRec::DelDir(ent.ino),
                NsRec::DelInode(ent.ino),
                Self::put(pi),
            ],
            reply: MetaResp::Done,
        })
    }

    pub fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8], now: Timestamp) -> NsResult<Plan> {
        check_name(new_name)?;
        let mut i = self.inode(ino)?.clone();
        if i.attr.kind == FileKind::Directory {
            return Err(e(ErrorCode::Perm, "hard link to a directory"));
        }
        if i.attr.nlink == 0 {
            return Err(e(ErrorCode::NotFound, "file was removed"));
        }
        if i.attr.nlink >= LINK_MAX {
            return Err(e(ErrorCode::TooManyLinks, "too many links"));
        }
        let d = self.dir(new_parent)?;
        if d.entries.contains_key(new_name) {
            return Err(e(ErrorCode::Exists, "entry exists"));
        }
        i.attr.nlink += 1;
        i.attr.ctime = now;
        i.attr.change += 1;
        let attr = i.attr.clone();
        Ok(Plan {
            recs: vec![
                NsRec::AddEntry {
                    parent: new_parent,
                    name: new_name.to_vec(),
                    ent: DirEnt { ino, kind: attr.kind, cookie: d.next_cookie },
                },
                Self::put(i),
                Self::put(self.touched(new_parent, now)?),
            ],
            reply: MetaResp::Attr(attr),
        })
    }

    /// Whether `anc` is `ino` or one of its ancestors.
    fn is_ancestor(&self, anc: Ino, mut ino: Ino) -> bool {
        for _ in 0..100_000 {
            if ino == anc {
                return true;
            }
            match self.dirs.get(&ino) {
                Some(d) if d.parent != ino => ino = d.parent,
                _ => return false,
            }
        }
        false
    }

    /// rename(2) of `from` (directory, name) to `to`.
    pub fn rename(
        &self,
        from: (Ino, &[u8]),
        to: (Ino, &[u8]),
        flags: u32,
        is_open: impl Fn(Ino) -> bool,
        now: Timestamp,
    ) -> NsResult<Plan> {
        let ((parent, name), (new_parent, new_name)) = (from, to);
        if flags & !(RENAME_NOREPLACE | RENAME_EXCHANGE) != 0
            || flags & RENAME_NOREPLACE != 0 && flags & RENAME_EXCHANGE != 0
        {
            return Err(e(ErrorCode::Invalid, "unsupported rename flags"));
        }
        check_name(name)?;
        check_name(new_name)?;
        let src = *self.dir(parent)?.entries.get(name).ok_or_else(|| e(ErrorCode::NotFound, "no such entry"))?;
        let nd = self.dir(new_parent)?;
        let dst = nd.entries.get(new_name).copied();
        let mut recs = Vec::new();
        let touch_inode = |recs: &mut Vec<NsRec>, ino: Ino| -> NsResult<()> {
            let mut i = self.inode(ino)?.clone();
            i.attr.ctime = now;
            i.attr.change += 1;
            recs.push(Self::put(i));
            Ok(())
        };

        if flags & RENAME_EXCHANGE != 0 {
            let dst = dst.ok_or_else(|| e(ErrorCode::NotFound, "exchange target missing"))?;
            if src.kind == FileKind::Directory && self.is_ancestor(src.ino, new_parent)
                || dst.kind == FileKind::Directory && self.is_ancestor(dst.ino, parent)
            {
                return Err(e(ErrorCode::Invalid, "cannot move a directory into itself"));
            }
            recs.push(NsRec::AddEntry {
                parent,
                name: name.to_vec(),
                ent: DirEnt { ino: dst.ino, kind: dst.kind, cookie: src.cookie },
            });
            recs.push(NsRec::AddEntry {
                parent: new_parent,
                name: new_name.to_vec(),
                ent: DirEnt { ino: src.ino, kind: src.kind, cookie: dst.cookie },
            });
            if parent != new_parent {
                let sd = src.kind == FileKind::Directory;
                let dd = dst.kind == FileKind::Directory;
                if sd {
                    recs.push(NsRec::SetParent { dir: src.ino, parent: new_parent });
                }
                if dd {
                    recs.push(NsRec::SetParent { dir: dst.ino, parent });
                }
                let mut p = self.touched(parent, now)?;
                let mut q = self.touched(new_parent, now)?;
                if sd && !dd {
                    p.attr.nlink -= 1;
                    q.attr.nlink += 1;
                } else if dd && !sd {
                    p.attr.nlink += 1;
                    q.attr.nlink -= 1;
                }
                recs.push(Self::put(p));
                recs.push(Self::put(q));
            } else {
                recs.push(Self::put(self.touched(parent, now)?));
            }
            touch_inode(&mut recs, src.ino)?;
            touch_inode(&mut recs, dst.ino)?;
            return Ok(Plan { recs, reply: MetaResp::Done });
        }

        if let Some(d) = dst {
            if flags & RENAME_NOREPLACE != 0 {
                return Err(e(ErrorCode::Exists, "target exists"));
            }
            if d.ino == src.ino {
                // Two names of one inode: nothing to do.
                return Ok(Plan { recs: Vec::new(), reply: MetaResp::Done });
            }
            match (src.kind == FileKind::Directory, d.kind == FileKind::Directory) {
                (true, false) => return Err(e(ErrorCode::NotDir, "target is not a directory")),
                (false, true) => return Err(e(ErrorCode::IsDir, "target is a directory")),
                (true, true) if !self.dir(d.ino)?.entries.is_empty() => {
                    return Err(e(ErrorCode::NotEmpty, "target directory not empty"))
                }
                _ => {}
            }
        }
        if src.kind == FileKind::Directory && self.is_ancestor(src.ino, new_parent) {
            return Err(e(ErrorCode::Invalid, "cannot move a directory into itself"));
        }
        recs.push(NsRec::DelEntry { parent, name: name.to_vec() });
        recs.push(NsRec::AddEntry {
            parent: new_parent,
            name: new_name.to_vec(),
            ent: DirEnt {
                ino: src.ino,
                kind: src.kind,
                cookie: nd.next_cookie.max(if parent == new_parent { self.dir(parent)?.next_cookie } else { 0 }),
            },
        });
        let mut p = self.touched(parent, now)?;
        let mut q = if parent != new_parent { Some(self.touched(new_parent, now)?) } else { None };
        if let Some(d) = dst {
            if d.kind == FileKind::Directory {
                recs.push(NsRec::DelDir(d.ino));
                recs.push(NsRec::DelInode(d.ino));
                match q.as_mut() {
                    Some(q) => q.attr.nlink -= 1,
                    None => p.attr.nlink -= 1,
                }
            } else {
                recs.extend(self.drop_link(d.ino, is_open(d.ino), now)?);
            }
        }
        if src.kind == FileKind::Directory && parent != new_parent {
            recs.push(NsRec::SetParent { dir: src.ino, parent: new_parent });
            p.attr.nlink -= 1;
            if let Some(q) = q.as_mut() {
                q.attr.nlink += 1;
            }
        }
        recs.push(Self::put(p));
        if let Some(q) = q {
            recs.push(Self::put(q));
        }
        touch_inode(&mut recs, src.ino)?;
        Ok(Plan { recs, reply: MetaResp::Done })
    }

    pub fn readdir(&self, ino: Ino, cookie: u64, max: u32, plus: bool) -> NsResult<Vec<DirEntry>> {
        let d = self.dir(ino)?;
        let mut out = Vec::new();
        let attr_of = |i: Ino| if plus { self.inodes.get(&i).map(|x| x.attr.clone()) } else { None };
        if cookie < 1 {
            out.push(DirEntry { name: b".".to_vec(), ino, kind: FileKind::Directory, cookie: 1, attr: attr_of(ino) });
        }
        if cookie < 2 {
            out.push(DirEntry {
                name: b"..".to_vec(),
                ino: d.parent,
                kind: FileKind::Directory,
                cookie: 2,
                attr: None,
            });
        }
        for (c, name) in d.by_cookie.range(cookie.max(2) + 1..) {
            if out.len() >= max as usize {
                break;
            }
            if let Some(ent) = d.entries.get(name) {
                out.push(DirEntry {
                    name: name.clone(),
                    ino: ent.ino,
                    kind: ent.kind,
                    cookie: *c,
                    attr: attr_of(ent.ino),
                });
            }
        }
        Ok(out)
    }

    pub fn setattr(&self, ino: Ino, set: &SetAttr, now: Timestamp) -> NsResult<Plan> {
        let mut i = self.inode(ino)?.clone();
        let mut recs = Vec::new();
        if let Some(m) = set.mode {
            i.attr.perm = (m & 0o7777) as u16;
        }
        if let Some(u) = set.uid {
            i.attr.uid = u;
        }
        if let Some(g) = set.gid {
            i.attr.gid = g;
        }
        if set.kill_suid && i.attr.kind != FileKind::Directory {
            // As Linux: setuid always, setgid only where the group may
            // execute (without it, setgid marks mandatory locking).
            i.attr.perm &= !0o4000;
            if i.attr.perm & 0o010 != 0 {
                i.attr.perm &= !0o2000;
            }
        }
        if i.attr.kind == FileKind::Regular && (set.uid.is_some() || set.gid.is_some() || set.size.is_some()) {
            // A new owner or size drops the file's capabilities (Linux's
            // ATTR_KILL_PRIV on chown and truncate, whoever calls).
            i.xattrs.remove(b"security.capability".as_slice());
        }
        if let Some(size) = set.size {
            match i.attr.kind {
                FileKind::Directory => return Err(e(ErrorCode::IsDir, "is a directory")),
                FileKind::Regular => {}
                _ => return Err(e(ErrorCode::Invalid, "not a regular file")),
            }
            if size == 0 && i.attr.size > 0 {
                // O(1) truncate to zero: a fresh object; the old one is garbage.
                recs.push(NsRec::Dead(i.attr.object));
                i.attr.object = ObjectId(self.next_object);
                recs.push(NsRec::Counters { next_ino: self.next_ino, next_object: self.next_object + 1 });
            }
            i.attr.size = size;
            i.attr.mtime = now;
        }
        let ts = |t: TimeSet| match t {
            TimeSet::Now => now,
            TimeSet::At(x) => x,
        };
        if let Some(t) = set.atime {
            i.attr.atime = ts(t);
        }
        if let Some(t) = set.mtime {
            i.attr.mtime = ts(t);
        }
        i.attr.ctime = set.ctime.unwrap_or(now);
        i.attr.change += 1;
        let attr = i.attr.clone();
        recs.push(Self::put(i));
        Ok(Plan { recs, reply: MetaResp::Attr(attr) })
    }

    /// Open: fresh attributes; O_TRUNC gives the file a new empty object.
    pub fn open(&self, ino: Ino, truncate: bool, now: Timestamp) -> NsResult<(Option<Plan>, Attr)> {
        let i = self.inode(ino)?;
        if truncate && i.attr.kind == FileKind::Regular {
            let p = self.setattr(ino, &SetAttr { size: Some(0), ..Default::default() }, now)?;
            let MetaResp::Attr(a) = &p.reply else { unreachable!("setattr replies Attr") };
            let a = a.clone();
            return Ok((Some(p), a));
        }
        Ok((None, i.attr.clone()))
    }

    /// Size and mtime after writes through a handle.
    pub fn written(&self, ino: Ino, end: u64, mtime: Timestamp) -> NsResult<Plan> {
        let mut i = self.inode(ino)?.clone();
        if i.attr.kind != FileKind::Regular {
            return Err(e(ErrorCode::Invalid, "not a regular file"));
        }
        i.attr.size = i.attr.size.max(end);
        i.attr.mtime = i.attr.mtime.max(mtime);
        i.attr.ctime = i.attr.ctime.max(mtime);
        i.attr.change += 1;
        let attr = i.attr.clone();
        Ok(Plan { recs: vec![Self::put(i)], reply: MetaResp::Attr(attr) })
    }

    /// Writes (end, mtime) and then times set explicitly, in one change.
    pub fn publish(
        &self,
        ino: Ino,
        end: u64,
        mtime: Option<Timestamp>,
        atime_set: Option<Timestamp>,
        mtime_set: Option<Timestamp>,
        now: Timestamp,
    ) -> NsResult<Plan> {
        let mut i = self.inode(ino)?.clone();
        if i.attr.kind != FileKind::Regular {
            return Err(e(ErrorCode::Invalid, "not a regular file"));
        }
        i.attr.size = i.attr.size.max(end);
        if let Some(m) = mtime {
            i.attr.mtime = i.attr.mtime.max(m);
            i.attr.ctime = i.attr.ctime.max(m);
        }
        if let Some(a) = atime_set {
            i.attr.atime = a;
        }
        if let Some(m) = mtime_set {
            i.attr.mtime = m;
        }
        if atime_set.is_some() || mtime_set.is_some() {
            i.attr.ctime = i.attr.ctime.max(now);
        }
        i.attr.change += 1;
        let attr = i.attr.clone();
        Ok(Plan { recs: vec![Self::put(i)], reply: MetaResp::Attr(attr) })
    }

    pub fn set_xattr(&self, ino: Ino, name: &[u8], value: &[u8], flags: u32, now: Timestamp) -> NsResult<Plan> {
        if name.is_empty() || name.len() > 255 {
            return Err(e(ErrorCode::Range, "bad attribute name length"));
        }
        if value.len() > XATTR_SIZE_MAX {
            return Err(e(ErrorCode::TooBig, "attribute value too large"));
        }
        let mut i = self.inode(ino)?.clone();
        let is_t = name == common::toughness::TOUGHNESS_XATTR.as_bytes();
        let exists = if is_t { i.attr.toughness.is_some() } else { i.xattrs.contains_key(name) };
        if flags & XATTR_CREATE != 0 && exists {
            return Err(e(ErrorCode::Exists, "attribute exists"));
        }
        if flags & XATTR_REPLACE != 0 && !exists {
            return Err(e(ErrorCode::NoData, "no such attribute"));
        }
        if is_t {
            let t = Toughness::parse_xattr(value)
                .ok_or_else(|| e(ErrorCode::Invalid, "toughness must be fast, atomic or durable"))?;
            i.attr.toughness = Some(t);
        } else {
            i.xattrs.insert(name.to_vec(), value.to_vec());
        }
        i.attr.ctime = now;
        i.attr.change += 1;
        Ok(Plan { recs: vec![Self::put(i)], reply: MetaResp::Done })
    }

    pub fn get_xattr(&self, ino: Ino, name: &[u8]) -> NsResult<Vec<u8>> {
        let i = self.inode(ino)?;
        if name == common::toughness::TOUGHNESS_XATTR.as_bytes() {
            return i
                .attr
                .toughness
                .map(|t| t.as_str().as_bytes().to_vec())
                .ok_or_else(|| e(ErrorCode::NoData, "no such attribute"));
        }
        i.xattrs.get(name).cloned().ok_or_else(|| e(ErrorCode::NoData, "no such attribute"))
    }

    pub fn list_xattr(&self, ino: Ino) -> NsResult<Vec<Vec<u8>>> {
        let i = self.inode(ino)?;
        let mut v: Vec<Vec<u8>> = i.xattrs.keys().cloned().collect();
        if i.attr.toughness.is_some() {
            v.push(common::toughness::TOUGHNESS_XATTR.as_bytes().to_vec());
        }
        Ok(v)
    }

    pub fn remove_xattr(&self, ino: Ino, name: &[u8], now: Timestamp) -> NsResult<Plan> {
        let mut i = self.inode(ino)?.clone();
        if name == common::toughness::TOUGHNESS_XATTR.as_bytes() {
            if i.attr.toughness.take().is_none() {
                return Err(e(ErrorCode::NoData, "no such attribute"));
            }
        } else if i.xattrs.remove(name).is_none() {
            return Err(e(ErrorCode::NoData, "no such attribute"));
        }
        i.attr.ctime = now;
        i.attr.change += 1;
        Ok(Plan { recs: vec![Self::put(i)], reply: MetaResp::Done })
    }

    /// Removes an orphan (unlinked while open) once nobody has it open.
    pub fn reap(&self, ino: Ino) -> Option<Vec<NsRec>> {
        let i = self.inodes.get(&ino)?;
        if i.attr.nlink != 0 {
            return None;
        }
        let mut v = vec![NsRec::DelInode(ino)];
        if i.attr.kind == FileKind::Regular && i.attr.object.0 != 0 {
            v.push(NsRec::Dead(i.attr.object));
        }
        Some(v)
    }

    /// Inodes with no links left (orphans kept for open handles).
    pub fn orphans(&self) -> Vec<Ino> {
        self.inodes.values().filter(|i| i.attr.nlink == 0).map(|i| i.attr.ino).collect()
    }

    /// `iomfs fsck`: the namespace's own invariants. Every directory entry
    /// names an inode of its kind; every linked inode is reachable from the
    /// root; link counts match the entries (directories: 2 + subdirectories);
    /// directories and their entry tables come in pairs with the right
    /// parent; no two files share a data object; the counters are above
    /// every id in use. Returns one line per problem (none: consistent).
    pub fn check(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut links: HashMap<Ino, u32> = HashMap::new();
        let mut subdirs: HashMap<Ino, u32> = HashMap::new();
        for (dino, d) in &self.dirs {
            if !self.inodes.get(dino).is_some_and(|i| i.attr.kind == FileKind::Directory) {
                p.push(format!("entry table of {dino:?} has no directory inode"));
            }
            for (name, ent) in &d.entries {
                let shown = String::from_utf8_lossy(name);
                match self.inodes.get(&ent.ino) {
                    None => p.push(format!("{dino:?}/{shown} names missing inode {:?}", ent.ino)),
                    Some(i) if i.attr.kind != ent.kind => p.push(format!(
                        "{dino:?}/{shown} says {:?} but inode {:?} is {:?}",
                        ent.kind, ent.ino, i.attr.kind
                    )),
                    Some(_) => {}
                }
                if ent.kind == FileKind::Directory {
                    *subdirs.entry(*dino).or_default() += 1;
                    if self.dirs.get(&ent.ino).is_some_and(|c| c.parent != *dino) {
                        p.push(format!("directory {:?} is entered in {dino:?} but names another parent", ent.ino));
                    }
                } else {
                    *links.entry(ent.ino).or_default() += 1;
                }
                if d.by_cookie.get(&ent.cookie) != Some(name) {
                    p.push(format!("{dino:?}/{shown}: readdir cookie {} does not lead back to it", ent.cookie));
                }
            }
        }
        // Reachability from the root.
        let mut seen = std::collections::HashSet::from([Ino::ROOT]);
        let mut todo = vec![Ino::ROOT];
        while let Some(d) = todo.pop() {
            for ent in self.dirs.get(&d).map(|d| d.entries.values()).into_iter().flatten() {
                if seen.insert(ent.ino) && ent.kind == FileKind::Directory {
                    todo.push(ent.ino);
                }
            }
        }
        let mut objects: HashMap<ObjectId, Ino> = HashMap::new();
        for (ino, i) in &self.inodes {
            let a = &i.attr;
            if a.ino != *ino {
                p.push(format!("inode {ino:?} is stored as {:?}", a.ino));
            }
            if ino.0 >= self.next_ino {
                p.push(format!("inode {ino:?} is at or above the next inode number {}", self.next_ino));
            }
            if a.nlink > 0 && !seen.contains(ino) {
                p.push(format!("inode {ino:?} has {} links but no path from the root reaches it", a.nlink));
            }
            match a.kind {
                FileKind::Directory => {
                    let want = 2 + subdirs.get(ino).copied().unwrap_or(0);
                    if !self.dirs.contains_key(ino) {
                        p.push(format!("directory {ino:?} has no entry table"));
                    } else if a.nlink != want {
                        p.push(format!("directory {ino:?} has link count {} but {want} links", a.nlink));
                    }
                }
                _ => {
                    let want = links.get(ino).copied().unwrap_or(0);
                    if a.nlink != want {
                        p.push(format!("{:?} {ino:?} has link count {} but {want} entries", a.kind, a.nlink));
                    }
                }
            }
            if a.kind == FileKind::Regular && a.object.0 != 0 {
                if a.object.0 >= self.next_object {
                    p.push(format!("inode {ino:?}: object {} is at or above the next object number", a.object));
                }
                if self.dead.contains(&a.object) {
                    p.push(format!("inode {ino:?}: object {} is also listed as garbage", a.object));
                }
                if let Some(other) = objects.insert(a.object, *ino) {
                    p.push(format!("inodes {other:?} and {ino:?} share object {}", a.object));
                }
            }
        }
        p.sort();
        p
    }

    /// `iomfs fsck --repair`: the records that fix what [`NsState::check`] finds
    /// and can be fixed without guessing, with one line per fix. Entries
    /// naming missing inodes are removed; files with links but no entry
    /// (unreachable) are linked into `/lost+found` as `#<ino>`, as e2fsck
    /// does; link counts are set to the entries that exist; counters are
    /// raised above every id in use; an object both in use and listed as
    /// garbage is taken off the garbage list. What needs a choice (shared
    /// objects, entries of the wrong kind, directories outside the tree,
    /// damaged cookie tables) is left to [`NsState::check`] to name.
    pub fn repair(&self, now: Timestamp) -> (Vec<NsRec>, Vec<String>) {
        let mut s = self.clone();
        let mut recs = Vec::new();
        let mut fixed = Vec::new();
        let mut push = |s: &mut NsState, r: Vec<NsRec>| {
            s.apply(&r);
            recs.extend(r);
        };
        let mut gone: Vec<(Ino, Vec<u8>, Ino)> = self
            .dirs
            .iter()
            .flat_map(|(d, t)| t.entries.iter().map(move |(n, e)| (*d, n.clone(), e.ino)))
            .filter(|(_, _, i)| !self.inodes.contains_key(i))
            .collect();
        gone.sort();
        for (parent, name, ino) in gone {
            fixed.push(format!(
                "removed {parent:?}/{} (it named missing inode {ino:?})",
                String::from_utf8_lossy(&name)
            ));
            push(&mut s, vec![NsRec::DelEntry { parent, name }]);
        }
        let max_ino = self.inodes.keys().map(|i| i.0).max().unwrap_or(0);
        let max_obj = self.inodes.values().map(|i| i.attr.object.0).chain(self.dead.iter().map(|o| o.0)).max();
        let (ni, no) = (self.next_ino.max(max_ino + 1), self.next_object.max(max_obj.unwrap_or(0) + 1));
        if (ni, no) != (self.next_ino, self.next_object) {
            fixed.push(format!("raised the next inode/object numbers to {ni}/{no}"));
            push(&mut s, vec![NsRec::Counters { next_ino: ni, next_object: no }]);
        }
        let entries = |s: &NsState| {
            let mut n: HashMap<Ino, u32> = HashMap::new();
            for t in s.dirs.values() {
                for e in t.entries.values() {
                    *n.entry(e.ino).or_default() += 1;
                }
            }
            n
        };
        let have = entries(&s);
        let mut lost: Vec<Ino> = s
            .inodes
            .values()
            .filter(|i| i.attr.kind != FileKind::Directory && i.attr.nlink > 0 && !have.contains_key(&i.attr.ino))
            .map(|i| i.attr.ino)
            .collect();
        lost.sort();
        if !lost.is_empty() {
            let lf = match s.lookup(Ino::ROOT, b"lost+found") {
                Ok(a) if a.kind == FileKind::Directory => Some(a.ino),
                Ok(_) => None,
                Err(_) => {
                    let caller = Caller { uid: 0, gid: 0 };
                    match s.create(
                        Ino::ROOT,
                        b"lost+found",
                        NewNode { kind: FileKind::Directory, perm: 0o700, rdev: 0, target: None },
                        caller,
                        now,
                    ) {
                        Ok(Plan { recs: r, reply: MetaResp::Created { attr, .. } }) => {
                            push(&mut s, r);
                            Some(attr.ino)
                        }
                        _ => None,
                    }
                }
            };
            for ino in lost {
                let name = format!("#{}", ino.0);
                if let Some(Ok(p)) = lf.map(|lf| s.link(ino, lf, name.as_bytes(), now)) {
                    fixed.push(format!("linked unreachable {ino:?} as /lost+found/{name}"));
                    push(&mut s, p.recs);
                }
            }
        }
        // Link counts from the entries as they are now.
        let mut subdirs: HashMap<Ino, u32> = HashMap::new();
        for (d, t) in &s.dirs {
            for e in t.entries.values() {
                if e.kind == FileKind::Directory {
                    *subdirs.entry(*d).or_default() += 1;
                }
            }
        }
        let have = entries(&s);
        let mut counts: Vec<Inode> = Vec::new();
        for i in s.inodes.values() {
            let want = match i.attr.kind {
                FileKind::Directory if s.dirs.contains_key(&i.attr.ino) => {
                    2 + subdirs.get(&i.attr.ino).copied().unwrap_or(0)
                }
                FileKind::Directory => continue,
                _ => have.get(&i.attr.ino).copied().unwrap_or(0),
            };
            // An unlinked file kept for an open handle has no entry, rightly.
            if i.attr.nlink != want && !(want == 0 && i.attr.kind != FileKind::Directory) {
                let mut n = i.clone();
                n.attr.nlink = want;
                n.attr.ctime = now;
                n.attr.change += 1;
                counts.push(n);
            }
        }
        counts.sort_by_key(|i| i.attr.ino);
        for n in counts {
            fixed.push(format!("set the link count of {:?} to {}", n.attr.ino, n.attr.nlink));
            push(&mut s, vec![Self::put(n)]);
        }
        let mut used: Vec<ObjectId> =
            s.inodes.values().map(|i| i.attr.object).filter(|o| o.0 != 0 && s.dead.contains(o)).collect();
        used.sort();
        if !used.is_empty() {
            fixed.push(format!(
                "took {} objects in use off the garbage list (if the GC had dropped them already, their files read as holes): {used:?}",
                used.len()
            ));
            push(&mut s, vec![NsRec::Forget(used)]);
        }
        (recs, fixed)
    }

    /// Data objects of regular files with their published sizes.
    pub fn objects(&self) -> Vec<(ObjectId, u64)> {
        let mut v: Vec<(ObjectId, u64)> = self
            .inodes
            .values()
            .filter(|i| i.attr.kind == FileKind::Regular && i.attr.object.0 != 0)
            .map(|i| (i.attr.object, i.attr.size))
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp { secs: 100, nsecs: 0 }
    }
    /// A regular file with permission bits `perm`.
    fn regular(perm: u16) -> NewNode {
        NewNode { kind: FileKind::Regular, perm, rdev: 0, target: None }
    }

    fn caller() -> Caller {
        Caller { uid: 1000, gid: 1000 }
    }
    fn apply_plan(s: &mut NsState, p: NsResult<Plan>) -> MetaResp {
        let p = p.unwrap();
        s.apply(&p.recs);
        p.reply
    }
    macro_rules! run {
        ($s:ident, $e:expr) => {{
            let p = $e;
            apply_plan(&mut $s, p)
        }};
    }
    fn mk(s: &mut NsState, parent: Ino, name: &str, kind: FileKind) -> Attr {
        let p = s.create(parent, name.as_bytes(), NewNode { kind, ..regular(0o644) }, caller(), now());
        match apply_plan(s, p) {
            MetaResp::Created { attr, .. } => attr,
            r => panic!("{r:?}"),
        }
    }

    /// Golden bytes of namespace journal records: changing them breaks
    /// replay of existing namespace journals and mirrors of another
    /// version; bump the namespace journal's format version instead.
    #[test]
    fn ns_record_golden_bytes() {
        use common::codec::{decode, encode};
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let add = NsRec::AddEntry {
            parent: Ino(1),
            name: b"f".to_vec(),
            ent: DirEnt { ino: Ino(300), kind: FileKind::Regular, cookie: 3 },
        };
        assert_eq!(hex(&encode(&add).unwrap()), "02010166fb2c010003");
        assert_eq!(decode::<NsRec>(&encode(&add).unwrap()).unwrap(), add);
        assert_eq!(hex(&encode(&NsRec::Dead(ObjectId(9))).unwrap()), "0809");
        let done = NsRec::Done { client: 2, seq: 5, reply: Box::new(MetaResp::Done) };
        assert_eq!(hex(&encode(&done).unwrap()), "0a020505");
    }

    #[test]
    fn the_namespace_check_finds_what_is_broken_and_passes_what_is_not() {
        let mut s = NsState::new(now());
        let d = mk(&mut s, Ino::ROOT, "d", FileKind::Directory);
        let f = mk(&mut s, d.ino, "f", FileKind::Regular);
        run!(s, s.link(f.ino, Ino::ROOT, b"hard", now()));
        mk(&mut s, d.ino, "sub", FileKind::Directory);
        assert_eq!(s.check(), Vec::<String>::new());
        // A dangling entry, a wrong link count, an unreachable inode.
        s.apply(&[NsRec::AddEntry {
            parent: d.ino,
            name: b"ghost".to_vec(),
            ent: DirEnt { ino: Ino(999), kind: FileKind::Regular, cookie: 77 },
        }]);
        s.inodes.get_mut(&f.ino).unwrap().attr.nlink = 5;
        s.apply(&[NsRec::DelEntry { parent: Ino::ROOT, name: b"d".to_vec() }]);
        let p = s.check().join("\n");
        assert!(p.contains("names missing inode Ino(999)"), "{p}");
        assert!(p.contains("has link count 5 but"), "{p}");
        assert!(p.contains("no path from the root"), "{p}");
    }

    #[test]
    fn fsck_repair_fixes_what_needs_no_choice_and_leaves_a_consistent_namespace() {
        let mut s = NsState::new(now());
        let d = mk(&mut s, Ino::ROOT, "d", FileKind::Directory);
        let f = mk(&mut s, d.ino, "f", FileKind::Regular);
        let lone = mk(&mut s, Ino::ROOT, "lone", FileKind::Regular);
        let open = mk(&mut s, Ino::ROOT, "open", FileKind::Regular);
        run!(s, s.unlink(Ino::ROOT, b"open", |_| true, now()));
        // Damage: a dangling entry, wrong link counts (file and directory),
        // a file that lost its only entry, counters too low, an object in
        // use that is also garbage.
        s.apply(&[NsRec::AddEntry {
            parent: d.ino,
            name: b"ghost".to_vec(),
            ent: DirEnt { ino: Ino(999), kind: FileKind::Regular, cookie: 77 },
        }]);
        s.inodes.get_mut(&f.ino).unwrap().attr.nlink = 5;
        s.inodes.get_mut(&d.ino).unwrap().attr.nlink = 9;
        s.apply(&[NsRec::DelEntry { parent: Ino::ROOT, name: b"lone".to_vec() }]);
        s.next_ino = 2;
        s.dead.insert(f.object);
        assert!(s.check().len() >= 5, "{:?}", s.check());
        let (recs, fixed) = s.repair(now());
        s.apply(&recs);
        assert_eq!(s.check(), Vec::<String>::new(), "after: {fixed:#?}");
        assert!(fixed.iter().any(|f| f.contains("/lost+found/#")), "{fixed:#?}");
        let lf = s.lookup(Ino::ROOT, b"lost+found").unwrap();
        assert_eq!(s.lookup(lf.ino, format!("#{}", lone.ino.0).as_bytes()).unwrap().ino, lone.ino);
        assert_eq!(s.inode(f.ino).unwrap().attr.nlink, 1);
        assert!(!s.dead.contains(&f.object));
        // The unlinked file kept for an open handle is left as it is.
        assert_eq!(s.inode(open.ino).unwrap().attr.nlink, 0);
        // A consistent namespace needs nothing.
        assert!(s.repair(now()).0.is_empty());
    }

    #[test]
    fn create_lookup_unlink_and_gc() {
        let mut s = NsState::new(now());
        let f = mk(&mut s, Ino::ROOT, "f", FileKind::Regular);
        assert_eq!(s.lookup(Ino::ROOT, b"f").unwrap().ino, f.ino);
        assert_eq!(s.create(Ino::ROOT, b"f", regular(0), caller(), now()).err().unwrap().0, ErrorCode::Exists);
        run!(s, s.unlink(Ino::ROOT, b"f", |_| false, now()));
        assert_eq!(s.lookup(Ino::ROOT, b"f").unwrap_err().0, ErrorCode::NotFound);
        assert!(s.dead.contains(&f.object));
        // names
        assert_eq!(
            s.create(Ino::ROOT, &[b'a'; 256], regular(0), caller(), now()).err().unwrap().0,
            ErrorCode::NameTooLong
        );
        assert_eq!(s.lookup(Ino::ROOT, &[b'a'; 256]).unwrap_err().0, ErrorCode::NameTooLong);
    }

    #[test]
    fn directories_nlink_rmdir_and_setgid() {
        let mut s = NsState::new(now());
        let d = mk(&mut s, Ino::ROOT, "d", FileKind::Directory);
        assert_eq!(s.inode(Ino::ROOT).unwrap().attr.nlink, 3);
        mk(&mut s, d.ino, "x", FileKind::Regular);
        assert_eq!(s.rmdir(Ino::ROOT, b"d", now()).err().unwrap().0, ErrorCode::NotEmpty);
        run!(s, s.unlink(d.ino, b"x", |_| false, now()));
        run!(s, s.rmdir(Ino::ROOT, b"d", now()));
        assert_eq!(s.inode(Ino::ROOT).unwrap().attr.nlink, 2);
        // setgid directory: group and bit inherited
        let g = mk(&mut s, Ino::ROOT, "g", FileKind::Directory);
        let mut i = s.inode(g.ino).unwrap().clone();
        i.attr.perm |= 0o2000;
        i.attr.gid = 55;
        s.apply(&[NsRec::PutInode(Box::new(i))]);
        let sub = mk(&mut s, g.ino, "sub", FileKind::Directory);
        assert_eq!(sub.gid, 55);
        assert!(sub.perm & 0o2000 != 0);
        let f = mk(&mut s, g.ino, "f", FileKind::Regular);
        assert_eq!(f.gid, 55);
    }

    #[test]
    fn rename_cases() {
        let mut s = NsState::new(now());
        let a = mk(&mut s, Ino::ROOT, "a", FileKind::Directory);
        let b = mk(&mut s, Ino::ROOT, "b", FileKind::Directory);
        let f = mk(&mut s, a.ino, "f", FileKind::Regular);
        let g = mk(&mut s, b.ino, "g", FileKind::Regular);
        // replace across directories
        run!(s, s.rename((a.ino, b"f"), (b.ino, b"g"), 0, |_| false, now()));
        assert_eq!(s.lookup(b.ino, b"g").unwrap().ino, f.ino);
        assert!(s.inode(g.ino).is_err());
        // noreplace
        mk(&mut s, a.ino, "h", FileKind::Regular);
        assert_eq!(
            s.rename((a.ino, b"h"), (b.ino, b"g"), RENAME_NOREPLACE, |_| false, now()).err().unwrap().0,
            ErrorCode::Exists
        );
        // exchange
        run!(s, s.rename((a.ino, b"h"), (b.ino, b"g"), RENAME_EXCHANGE, |_| false, now()));
        assert_eq!(s.lookup(a.ino, b"h").unwrap().ino, f.ino);
        // dir into itself
        assert_eq!(
            s.rename((Ino::ROOT, b"a"), (a.ino, b"x"), 0, |_| false, now()).err().unwrap().0,
            ErrorCode::Invalid
        );
        // dir over file / file over dir
        assert_eq!(s.rename((Ino::ROOT, b"a"), (b.ino, b"g"), 0, |_| false, now()).err().unwrap().0, ErrorCode::NotDir);
        assert_eq!(s.rename((b.ino, b"g"), (Ino::ROOT, b"a"), 0, |_| false, now()).err().unwrap().0, ErrorCode::IsDir);
        // moving a dir fixes nlink and parent
        let c = mk(&mut s, a.ino, "c", FileKind::Directory);
        run!(s, s.rename((a.ino, b"c"), (b.ino, b"c"), 0, |_| false, now()));
        assert_eq!(s.inode(a.ino).unwrap().attr.nlink, 2);
        assert_eq!(s.inode(b.ino).unwrap().attr.nlink, 3);
        assert_eq!(s.dirs[&c.ino].parent, b.ino);
        // two names of one inode
        run!(s, s.link(f.ino, a.ino, b"f2", now()));
        run!(s, s.rename((a.ino, b"f2"), (a.ino, b"h"), 0, |_| false, now()));
        assert_eq!(s.inode(f.ino).unwrap().attr.nlink, 2);
    }

    #[test]
    fn readdir_cookies_are_stable_under_changes() {
        let mut s = NsState::new(now());
        for i in 0..10 {
            mk(&mut s, Ino::ROOT, &format!("f{i}"), FileKind::Regular);
        }
        let first = s.readdir(Ino::ROOT, 0, 5, false).unwrap();
        assert_eq!(first[0].name, b".");
        let last = first.last().unwrap().cookie;
        // remove an already-listed entry and add a new one, then continue
        run!(s, s.unlink(Ino::ROOT, b"f0", |_| false, now()));
        mk(&mut s, Ino::ROOT, "new", FileKind::Regular);
        let rest = s.readdir(Ino::ROOT, last, 100, false).unwrap();
        let mut names: Vec<_> =
            first.iter().chain(rest.iter()).map(|e| String::from_utf8_lossy(&e.name).to_string()).collect();
        names.sort();
        names.dedup();
        for i in 1..10 {
            assert!(names.contains(&format!("f{i}")), "f{i} missing from {names:?}");
        }
    }

    #[test]
    fn xattr_flags_and_toughness() {
        let mut s = NsState::new(now());
        let d = mk(&mut s, Ino::ROOT, "d", FileKind::Directory);
        assert_eq!(s.set_xattr(d.ino, b"user.a", b"1", XATTR_REPLACE, now()).err().unwrap().0, ErrorCode::NoData);
        run!(s, s.set_xattr(d.ino, b"user.a", b"1", XATTR_CREATE, now()));
        assert_eq!(s.set_xattr(d.ino, b"user.a", b"2", XATTR_CREATE, now()).err().unwrap().0, ErrorCode::Exists);
        assert_eq!(s.get_xattr(d.ino, b"user.b").unwrap_err().0, ErrorCode::NoData);
        let t = common::toughness::TOUGHNESS_XATTR.as_bytes();
        assert_eq!(s.set_xattr(d.ino, t, b"bogus", 0, now()).err().unwrap().0, ErrorCode::Invalid);
        run!(s, s.set_xattr(d.ino, t, b"durable", 0, now()));
        let f = mk(&mut s, d.ino, "f", FileKind::Regular);
        assert_eq!(f.toughness, Some(Toughness::Durable));
        assert_eq!(s.get_xattr(f.ino, t).unwrap(), b"durable");
        run!(s, s.remove_xattr(f.ino, t, now()));
        assert_eq!(s.get_xattr(f.ino, t).unwrap_err().0, ErrorCode::NoData);
    }

    #[test]
    fn open_unlinked_file_is_kept_until_reaped() {
        let mut s = NsState::new(now());
        let f = mk(&mut s, Ino::ROOT, "f", FileKind::Regular);
        run!(s, s.unlink(Ino::ROOT, b"f", |_| true, now()));
        assert_eq!(s.inode(f.ino).unwrap().attr.nlink, 0);
        assert!(!s.dead.contains(&f.object));
        let recs = s.reap(f.ino).unwrap();
        s.apply(&recs);
        assert!(s.inode(f.ino).is_err());
        assert!(s.dead.contains(&f.object));
    }

    #[test]
    fn truncate_to_zero_swaps_the_object() {
        let mut s = NsState::new(now());
        let f = mk(&mut s, Ino::ROOT, "f", FileKind::Regular);
        run!(s, s.written(f.ino, 100, now()));
        let (p, a) = s.open(f.ino, true, now()).unwrap();
        s.apply(&p.unwrap().recs);
        assert_eq!(a.size, 0);
        assert_ne!(a.object, f.object);
        assert!(s.dead.contains(&f.object));
    }
}
