//! Namespace types and requests (DESIGN §7): inodes, directory entries,
//! attributes and xattrs, served by the metadata-home IOM.

use crate::ids::{Ino, ObjectId};
use crate::toughness::Toughness;
use serde::{Deserialize, Serialize};

/// What a new inode is to be (the arguments of a create that are not
/// where or by whom): its kind, permission bits, device number and, for a
/// symlink, its target. Not a wire type: `MetaReq::Create` carries the
/// same fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewNode {
    pub kind: FileKind,
    pub perm: u16,
    pub rdev: u32,
    pub target: Option<Vec<u8>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    Regular,
    Directory,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    /// The S_IFMT bits of this kind.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::Regular => 0o100000,
            FileKind::Directory => 0o040000,
            FileKind::Symlink => 0o120000,
            FileKind::Fifo => 0o010000,
            FileKind::Socket => 0o140000,
            FileKind::CharDevice => 0o020000,
            FileKind::BlockDevice => 0o060000,
        }
    }
    pub fn from_mode(mode: u32) -> Option<FileKind> {
        Some(match mode & 0o170000 {
            0o100000 | 0 => FileKind::Regular,
            0o040000 => FileKind::Directory,
            0o120000 => FileKind::Symlink,
            0o010000 => FileKind::Fifo,
            0o140000 => FileKind::Socket,
            0o020000 => FileKind::CharDevice,
            0o060000 => FileKind::BlockDevice,
            _ => return None,
        })
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub struct Timestamp {
    pub secs: i64,
    pub nsecs: u32,
}

impl Timestamp {
    pub fn now() -> Timestamp {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Timestamp { secs: d.as_secs() as i64, nsecs: d.subsec_nanos() }
    }
}

/// Attributes of one inode as the namespace stores them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    /// Permission bits including setuid/setgid/sticky (mode & 0o7777).
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u32,
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// The data object of a regular file (new one after a truncate to 0).
    pub object: ObjectId,
    /// Explicit `user.iomfs.toughness` of this inode, if set.
    pub toughness: Option<Toughness>,
    /// Changes on every mutation of this inode; lets clients see change.
    pub change: u64,
}

/// What the caller of a namespace operation is (for ownership of new inodes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeSet {
    Now,
    At(Timestamp),
}

/// Fields of a setattr; `None` leaves the field alone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
    pub ctime: Option<Timestamp>,
    /// Clear setuid, and setgid where the group may execute, of a
    /// non-directory (a chown; a write or truncate by a caller without
    /// CAP_FSETID).
    pub kill_suid: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
    /// Cookie to continue after this entry.
    pub cookie: u64,
    /// Attributes, for readdirplus.
    pub attr: Option<Attr>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FsStats {
    pub total_bytes: u64,
    pub free_bytes: u64,
    pub files: u64,
    pub block_size: u32,
}

/// Rename flags (Linux values).
pub const RENAME_NOREPLACE: u32 = 1;
pub const RENAME_EXCHANGE: u32 = 2;
/// setxattr flags (Linux values).
pub const XATTR_CREATE: u32 = 1;
pub const XATTR_REPLACE: u32 = 2;

/// Longest name of one directory entry.
pub const NAME_MAX: usize = 255;
/// Longest symlink target.
pub const PATH_MAX: usize = 4096;
/// Largest xattr value.
pub const XATTR_SIZE_MAX: usize = 65536;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
pub enum MetaReq {
    Lookup {
        parent: Ino,
        name: Vec<u8>,
    },
    GetAttr {
        ino: Ino,
    },
    SetAttr {
        ino: Ino,
        set: SetAttr,
        caller: Caller,
    },
    /// Creates a regular file, directory, symlink, FIFO, socket or device.
    Create {
        parent: Ino,
        name: Vec<u8>,
        kind: FileKind,
        perm: u16,
        rdev: u32,
        caller: Caller,
        target: Option<Vec<u8>>,
        /// Also open it (create with a file handle): counts as an open handle.
        open: bool,
    },
    Unlink {
        parent: Ino,
        name: Vec<u8>,
    },
    Rmdir {
        parent: Ino,
        name: Vec<u8>,
    },
    Rename {
        parent: Ino,
        name: Vec<u8>,
        new_parent: Ino,
        new_name: Vec<u8>,
        flags: u32,
    },
    Link {
        ino: Ino,
        new_parent: Ino,
        new_name: Vec<u8>,
    },
    ReadDir {
        ino: Ino,
        cookie: u64,
        max: u32,
        plus: bool,
    },
    ReadLink {
        ino: Ino,
    },
    SetXattr {
        ino: Ino,
        name: Vec<u8>,
        value: Vec<u8>,
        flags: u32,
    },
    GetXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    ListXattr {
        ino: Ino,
    },
    RemoveXattr {
        ino: Ino,
        name: Vec<u8>,
    },
    StatFs,
    /// Open: fresh attributes (close-to-open); `truncate` gives the file a
    /// new, empty object (O_TRUNC).
    Open {
        ino: Ino,
        truncate: bool,
    },
    /// A handle on `ino` was closed.
    Release {
        ino: Ino,
    },
    /// Data written through a handle: grow size to at least `end`, set mtime.
    Written {
        ino: Ino,
        end: u64,
        mtime: Timestamp,
    },
    /// Make every namespace mutation so far durable (fsync/fsyncdir/sync).
    Sync,
    /// Objects whose data is garbage (unlinked files, truncated-away objects).
    DeadObjects {
        max: u32,
    },
    /// The data of these dead objects has been dropped on every IOM.
    ForgetDead {
        objects: Vec<ObjectId>,
    },
    /// Truncation of data is done (set size after the data went).
    SetSize {
        ino: Ino,
        size: u64,
    },
    /// `Written`, then `Sync` (fsync in one round trip).
    WrittenSync {
        ino: Ino,
        end: u64,
        mtime: Timestamp,
    },
    /// Handles on these inodes were closed (an inode once per handle):
    /// `Release` of several, sent together.
    ReleaseMany {
        inos: Vec<Ino>,
    },
    /// What a client kept back while it had the file open for writing,
    /// published in one request (close, fsync): the end and mtime of its
    /// writes (`mtime` none: no writes) and the times set with `utimens`
    /// since (applied after the writes); with `sync`, then `Sync`.
    Publish {
        ino: Ino,
        end: u64,
        mtime: Option<Timestamp>,
        atime_set: Option<Timestamp>,
        mtime_set: Option<Timestamp>,
        sync: bool,
    },
    /// `iomfs fsck`: check the namespace (answered `Check`).
    Check,
    /// `iomfs fsck --repair`: data objects that no file refers to become
    /// garbage (dropped by the GC); objects a file does refer to are kept.
    Reclaim {
        objects: Vec<ObjectId>,
    },
    /// A client's lease renewal (sent every third of the lease; any other
    /// request renews too), with the inodes it holds open and how many
    /// handles of each. The namespace takes the list only into a session
    /// it does not know yet (its own restart, a failover, or after the
    /// client's session expired); answered `Renewed`.
    Renew {
        opens: Vec<(Ino, u32)>,
    },
    /// `iomfs fsck --repair`: fix the namespace problems that can be fixed
    /// without a choice (answered `Repaired`).
    RepairNamespace,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetaResp {
    Attr(Attr),
    Entries(Vec<DirEntry>),
    Data(Vec<u8>),
    Names(Vec<Vec<u8>>),
    StatFs(FsStats),
    Done,
    /// Open result: attributes plus the effective toughness (inherited).
    Opened {
        attr: Attr,
        toughness: Option<Toughness>,
    },
    /// Created entry: attributes plus the toughness inherited from its directory.
    Created {
        attr: Attr,
        toughness: Option<Toughness>,
    },
    Dead(Vec<ObjectId>),
    /// The reply to a change of directory entries, with the attributes of
    /// the directories it changed as they are right after it (the client
    /// answers the kernel's next getattr of them from these).
    WithDirs {
        reply: Box<MetaResp>,
        dirs: Vec<Attr>,
    },
    /// The namespace check: its problems, every regular file's data object
    /// with its published size, the objects of files open now (their size
    /// may not be published yet) and the objects waiting to be dropped.
    Check {
        problems: Vec<String>,
        objects: Vec<(ObjectId, u64)>,
        open: Vec<ObjectId>,
        dead: Vec<ObjectId>,
    },
    /// The lease renewed: its length, whether this client's previous session
    /// had expired (it had lost its claim on the files it held open), and
    /// the listed inodes that no longer exist (their handles are stale).
    Renewed {
        lease_ms: u64,
        expired: bool,
        missing: Vec<Ino>,
    },
    /// What `RepairNamespace` fixed, a line each.
    Repaired {
        fixed: Vec<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Golden bytes of namespace requests and replies (they cross the wire
    /// and are kept in the namespace journal's duplicate-request cache):
    /// if this fails, the format changed; bump PROTOCOL_VERSION and the
    /// namespace journal's format version instead of editing it.
    #[test]
    fn golden_bytes() {
        let l = MetaReq::Lookup { parent: Ino(1), name: b"ab".to_vec() };
        assert_eq!(hex(&encode(&l).unwrap()), "0001026162");
        assert_eq!(decode::<MetaReq>(&encode(&l).unwrap()).unwrap(), l);
        let u = MetaReq::Unlink { parent: Ino(300), name: b"x".to_vec() };
        assert_eq!(hex(&encode(&u).unwrap()), "04fb2c010178");
        let d = MetaResp::Dead(vec![ObjectId(7), ObjectId(1 << 20)]);
        assert_eq!(hex(&encode(&d).unwrap()), "080207fc00001000");
        assert_eq!(hex(&encode(&MetaResp::Done).unwrap()), "05");
    }
}
