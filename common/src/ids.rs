//! Newtype identifiers. Never pass bare `u64`s across modules.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id {
    ($(#[$m:meta])* $name:ident($t:ty)) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
        pub struct $name(pub $t);
        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({})"), self.0)
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }
    };
}

id!(
    /// The data of one file. Object ids are never reused.
    ObjectId(u64)
);
id!(
    /// Block number inside an object (byte offset / block size).
    BlockNo(u64)
);
id!(
    /// Parity group number inside an object (block / N).
    GroupNo(u64)
);
id!(
    /// One storage server of the cluster, 0..W.
    IomId(u32)
);
id!(
    /// A slot in one IOM's block file.
    DiskAddr(u64)
);
id!(
    /// A transaction id, unique per issuing IOM.
    TxId(u64)
);
id!(
    /// Cluster configuration epoch; increases on every membership change.
    Epoch(u64)
);
id!(
    /// Version of one block: 0 = never written, +1 per write transaction.
    Version(u64)
);
id!(
    /// Inode number in the namespace (1 = root).
    Ino(u64)
);

impl Ino {
    pub const ROOT: Ino = Ino(1);
}

impl Version {
    pub fn next(self) -> Version {
        Version(self.0 + 1)
    }
}

/// A transaction named cluster-wide: issuing IOM plus its local id.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct TxRef {
    pub iom: IomId,
    pub tx: TxId,
}

impl fmt::Debug for TxRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tx{}@{}", self.tx.0, self.iom.0)
    }
}

/// (object, block): the key of a data block.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct BlockKey {
    pub object: ObjectId,
    pub block: BlockNo,
}

/// (object, group): the key of a parity block.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Debug)]
pub struct GroupKey {
    pub object: ObjectId,
    pub group: GroupNo,
}
