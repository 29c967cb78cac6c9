//! The parity channel (a6–a13 / b1–b13).

use super::*;

/// "Update parity" (a6) with its delta (a8) as payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParityUpdate {
    pub tx: TxRef,
    pub group: GroupKey,
    /// Member index of the block inside its group.
    pub index: u32,
    pub old: Version,
    pub new: Version,
    /// Offset of the delta payload inside the block (bytes outside are zero).
    pub delta_offset: u32,
    /// Deltas of this group expected together from one client request.
    pub hint: u8,
    /// The data IOM whose block this is, when a proxy sends on its behalf.
    pub data_iom: IomId,
    /// A `durable` write waits for "parity completed": sync it at once
    /// (otherwise group commit within the flush interval is enough).
    pub durable: bool,
}

/// Data IOM to parity IOM, on the parity channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
pub enum ParityMsg {
    Update(ParityUpdate),
    /// a13: the data IOM's write completed (map switched, data durable).
    WriteDone {
        tx: TxRef,
    },
    /// a6 of a block written as part of client stripe `stripe` (protocol
    /// 10). `with_delta == false`: the block was absent and is written
    /// whole, so its delta is its new bytes, whose checksum is `crc`; the
    /// stripe's parity piece carries the sum of such deltas and this
    /// message none. `with_delta == true`: the block was not absent; the
    /// delta is the payload as in `Update`, and the stripe's piece is of
    /// no use (the parity IOM asks the stripe's other members for theirs).
    StripeUpdate {
        upd: ParityUpdate,
        stripe: u64,
        crc: u32,
        with_delta: bool,
    },
}

/// Parity IOM to data IOM, on the parity channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParityAck {
    /// b4: the delta is held and "update parity received" journaled.
    Held {
        tx: TxRef,
    },
    /// b12: parity update completed (new parity durable, journaled).
    Done {
        tx: TxRef,
    },
    Failed {
        tx: TxRef,
        error: WireError,
    },
    /// A `StripeUpdate` reference could not be served from a stripe piece
    /// (the piece never came, did not match, or another member sent a
    /// delta): send the update again with its delta.
    NeedDelta {
        tx: TxRef,
    },
}
