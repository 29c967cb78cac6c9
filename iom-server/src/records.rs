//! Journal records: every request and command an IOM receives or issues.
//! Each record carries old and new addresses so recovery can tell which
//! version the map points at (DESIGN §5). Append-only enum: a golden-bytes
//! test pins the encoding.

use common::{BlockKey, DiskAddr, GroupKey, GroupNo, IomId, ObjectId, TxId, TxRef, Version};
use serde::{Deserialize, Serialize};

/// One version of a data block: where it lives and what it holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerRef {
    pub version: Version,
    /// `None`: the block is absent at this version (reads as zeros).
    pub addr: Option<DiskAddr>,
    /// Stored length; bytes past it read as zeros.
    pub len: u32,
    pub crc: u32,
}

impl VerRef {
    /// Version 0: the block was never written.
    pub const ABSENT: VerRef = VerRef { version: Version(0), addr: None, len: 0, crc: 0 };
    pub fn absent(version: Version) -> VerRef {
        VerRef { version, addr: None, len: 0, crc: 0 }
    }
}

/// One version of a parity block, with the member versions it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PVerRef {
    /// Local sequence number of this parity version (cache key, free bookkeeping).
    pub seq: u64,
    pub addr: Option<DiskAddr>,
    pub len: u32,
    pub crc: u32,
    /// `members[j]`: version of data block j of the group included in this parity.
    pub members: Vec<Version>,
}

impl PVerRef {
    pub fn empty(n: u32) -> PVerRef {
        PVerRef { seq: 0, addr: None, len: 0, crc: 0, members: vec![Version(0); n as usize] }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// a5: data write issued at `new`; `old` stays until a14.
    Issued { tx: TxId, key: BlockKey, old: VerRef, new: VerRef, parity: IomId },
    /// a11: map switched to the new version (its data is durable).
    Switched { tx: TxId },
    /// a14: parity completed; the old version is freed.
    Completed { tx: TxId },
    /// b1: update parity received from a data IOM.
    Received { tx: TxRef, group: GroupKey, index: u32, old: Version, new: Version },
    /// b11: parity switched from `old` to `new` (durable), covering `txs`.
    ParityDone { group: GroupKey, old: PVerRef, new: PVerRef, txs: Vec<TxRef> },
    /// b13: every data IOM of the batch completed; old parity `seq` freed.
    ParityFreed { group: GroupKey, seq: u64 },
    /// Recovery rolled a data write back: map at `old`, `new` freed.
    RolledBack { tx: TxId },
    /// Recovery: a received parity update that was never applied is dropped.
    Discarded { tx: TxRef },
    /// The object's data and parity in groups >= `from` were dropped.
    Dropped { object: ObjectId, from: GroupNo },
    /// Recovery or rebuild installed a data version outside the write protocol.
    DataSet { key: BlockKey, ver: VerRef, prev: Option<VerRef> },
    /// Recovery or rebuild installed a parity version (e.g. recomputed from data).
    ParitySet { group: GroupKey, ver: PVerRef, prev: Option<PVerRef> },
    /// A stand-in marked a block of a failed IOM as needing rebuild.
    Marked { owner: IomId, key: BlockKey, version: Version },
    /// A stand-in marked a parity group of a failed IOM as needing rebuild.
    MarkedGroup { owner: IomId, group: GroupKey },
    /// Rebuild marks for `owner` up to this point were handed over and cleared.
    MarksCleared { owner: IomId },
    /// A stand-in recorded that `owner`'s blocks of `object` in groups >= `from` were dropped.
    MarkedDrop { owner: IomId, object: ObjectId, from: GroupNo },
    /// The rejoining `owner` rebuilt these marks (versions up to the one given).
    MarksDone { owner: IomId, blocks: Vec<(BlockKey, Version)>, groups: Vec<GroupKey>, drops: Vec<(ObjectId, GroupNo)> },
    /// A version whose slot was unreadable (checksum mismatch, I/O error)
    /// was rebuilt from its group into a new slot: `bad` is freed, the map
    /// and any open transaction refer to `good` (same version and bytes).
    Repaired { key: BlockKey, bad: VerRef, good: VerRef },
    /// A stand-in's write of `owner`'s block `key` to `version` was refused
    /// (no room for its parity) and changed nothing: the block's mark goes
    /// back to what it was before the write (`back_to`; `None`: no mark),
    /// if it still asks for `version`.
    MarkUndone { owner: IomId, key: BlockKey, version: Version, back_to: Option<Version> },
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::codec::{decode, encode};
    use common::{BlockNo, GroupNo, ObjectId};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Golden bytes of the journal format: changing them breaks replay of
    /// existing journals; bump JOURNAL_FORMAT_VERSION instead.
    #[test]
    fn golden_bytes() {
        let r = Record::Issued {
            tx: TxId(7),
            key: BlockKey { object: ObjectId(9), block: BlockNo(2) },
            old: VerRef::ABSENT,
            new: VerRef { version: Version(1), addr: Some(DiskAddr(5)), len: 4096, crc: 0xdeadbeef },
            parity: IomId(3),
        };
        let b = encode(&r).unwrap();
        assert_eq!(hex(&b), "0007090200000000010105fb0010fcefbeadde03");
        assert_eq!(decode::<Record>(&b).unwrap(), r);

        let p = Record::ParityDone {
            group: GroupKey { object: ObjectId(9), group: GroupNo(0) },
            old: PVerRef::empty(2),
            new: PVerRef { seq: 1, addr: Some(DiskAddr(3)), len: 10, crc: 1, members: vec![Version(1), Version(0)] },
            txs: vec![TxRef { iom: IomId(1), tx: TxId(7) }],
        };
        let b = encode(&p).unwrap();
        assert_eq!(hex(&b), "040900000000000200000101030a01020100010107");
        assert_eq!(decode::<Record>(&b).unwrap(), p);

        assert_eq!(hex(&encode(&Record::Completed { tx: TxId(300) }).unwrap()), "02fb2c01");
        // The newest kind: appended, so every older record keeps its tag.
        let u = Record::MarkUndone {
            owner: IomId(2),
            key: BlockKey { object: ObjectId(9), block: BlockNo(2) },
            version: Version(3),
            back_to: Some(Version(1)),
        };
        let b = encode(&u).unwrap();
        assert_eq!(hex(&b), "11020902030101");
        assert_eq!(decode::<Record>(&b).unwrap(), u);
    }
}
