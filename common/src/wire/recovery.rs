//! Recovery between IOMs: what each side of a transaction knows of it,
//! and the two repairs recovery may ask of a peer.

use super::*;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
pub enum RecoveryReq {
    /// Unfinished transactions this IOM has with failed IOM `about`
    /// (published to its proxy when it takes over).
    Unfinished { about: IomId },
    /// What the receiver knows of a transaction, as its data IOM
    /// (`parity_side == false`, about block `key`) or as its parity IOM.
    TxStatus { tx: TxRef, key: BlockKey, parity_side: bool },
    /// The parity IOM forgets a received update that was rolled back.
    DiscardTx { tx: TxRef },
    /// The data IOM rebuilds block `key` at `version` from its group
    /// (the parity IOM applied a write the data IOM lost).
    RebuildBlock { key: BlockKey, version: Version },
    /// The highest transaction id of data IOM `of` whose completion this
    /// IOM has seen (answered `DoneSeen`): a start-up check that `of`'s
    /// store is not older than what it acknowledged.
    DoneSeen { of: IomId },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecoveryResp {
    /// Blocks of the failed IOM with unfinished transactions here, at the version parity covers.
    Unfinished(Vec<(BlockKey, Version)>),
    TxStatus(TxView),
    DoneSeen {
        tx: u64,
    },
    Ack,
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

/// Answer to [`RecoveryReq::TxStatus`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxView {
    /// From the data IOM: is the transaction still open there, and the block's versions.
    Data { open: bool, pointer: Version, head: Version },
    /// From the parity IOM (or its stand-in, which keeps no parity), with
    /// the version of the block its parity covers.
    Parity { state: ParityTxState, standin: bool, covers: Version },
}
