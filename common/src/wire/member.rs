//! Membership, handover and recovery between IOMs.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ballot {
    pub epoch: Epoch,
    pub proposer: IomId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberReq {
    Ping {
        from: IomId,
        epoch: Epoch,
    },
    GetMap,
    /// Proposes `map` (epoch = ballot.epoch); voters check their own view of `changed`.
    Propose {
        ballot: Ballot,
        map: ClusterMap,
        changed: IomId,
    },
    Commit {
        map: ClusterMap,
    },
    /// Unfinished transactions this IOM has with failed IOM `about`
    /// (published to its proxy when it takes over).
    Unfinished {
        about: IomId,
    },
    /// Asks a stand-in for everything it marked for rebuild of `about`.
    RebuildMarks {
        about: IomId,
    },
    /// Recovery: what the receiver knows of a transaction, as its data IOM
    /// (`parity_side == false`, about block `key`) or as its parity IOM.
    TxStatus {
        tx: TxRef,
        key: BlockKey,
        parity_side: bool,
    },
    /// Recovery: the parity IOM forgets a received update that was rolled back.
    DiscardTx {
        tx: TxRef,
    },
    /// Recovery: the data IOM rebuilds block `key` at `version` from its group
    /// (the parity IOM applied a write the data IOM lost).
    RebuildBlock {
        key: BlockKey,
        version: Version,
    },
    /// The rejoining IOM `about` rebuilt these marks; the stand-in forgets them.
    ClearMarks {
        about: IomId,
        marks: RebuildMarks,
    },
    /// Handover: the stand-in stops serving `about`'s role and answers with its last marks.
    Freeze {
        about: IomId,
    },
    /// Handover abandoned: the stand-in serves `about`'s role again.
    Unfreeze {
        about: IomId,
    },
    /// The highest transaction id of data IOM `of` whose completion this
    /// IOM has seen (answered `DoneSeen`): a start-up check that `of`'s
    /// store is not older than what it acknowledged.
    DoneSeen {
        of: IomId,
    },
}

/// A parity IOM's view of one transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParityTxState {
    None,
    /// b1 journaled, parity not switched.
    Received,
    /// b11 journaled: parity includes the delta.
    Completed,
}

/// Answer to [`MemberReq::TxStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxView {
    /// From the data IOM: is the transaction still open there, and the block's versions.
    Data { open: bool, pointer: Version, head: Version },
    /// From the parity IOM (or its stand-in, which keeps no parity), with
    /// the version of the block its parity covers.
    Parity { state: ParityTxState, standin: bool, covers: Version },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberResp {
    Pong {
        epoch: Epoch,
        reachable: Vec<IomId>,
    },
    Map(ClusterMap),
    Vote {
        granted: bool,
        map: ClusterMap,
    },
    Ack,
    /// Blocks of the failed IOM with unfinished transactions here, at the version parity covers.
    Unfinished(Vec<(BlockKey, Version)>),
    Marks(RebuildMarks),
    TxStatus(TxView),
    DoneSeen {
        tx: u64,
    },
}

/// What a stand-in recorded for a failed IOM while it stood in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildMarks {
    /// Data blocks written (through parity) while it was down: rebuild at this version or later.
    pub blocks: Vec<(BlockKey, Version)>,
    /// Parity groups updated while it was down: recompute their parity.
    pub groups: Vec<GroupKey>,
    /// Objects dropped while it was down: drop its blocks of them too.
    pub drops: Vec<(ObjectId, GroupNo)>,
    /// The stand-in has stopped serving the role (handover in progress).
    pub frozen: bool,
}
