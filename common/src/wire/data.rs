//! The data path: block reads and writes, listings, scrub repair.

use super::*;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
pub enum DataReq {
    /// Read `len` bytes at `offset` of the current version of a block.
    Read { route: Route, key: BlockKey, offset: u32, len: u32 },
    /// Write the payload at `offset` of a block (a1–a14).
    /// `group_hint`: how many blocks of this block's group the same client
    /// request writes, so the parity IOM can coalesce their deltas.
    Write { route: Route, key: BlockKey, offset: u32, toughness: Toughness, group_hint: u8 },
    /// Keep bytes `[0, keep)` of a block; `keep == 0` deletes it. Same protocol as a write.
    Truncate { route: Route, key: BlockKey, keep: u32, toughness: Toughness },
    /// Durability barrier: every write answered so far by this IOM is on stable storage.
    Flush { route: Route },
    /// Drop every data and parity block of `object` in groups >= `from` (GC of dead objects).
    DropObject { route: Route, object: ObjectId, from: GroupNo },
    /// A specific version of a block (for reconstruction and scrub).
    ReadVersion { route: Route, key: BlockKey, version: Version },
    /// The parity block of a group with the member versions it covers.
    ReadParity { route: Route, group: GroupKey },
    /// Data blocks held, in key order after `after` (scrub).
    ListBlocks { after: Option<BlockKey>, limit: u32 },
    /// Parity blocks held, in key order after `after` (scrub).
    ListGroups { after: Option<GroupKey>, limit: u32 },
    /// Several block writes to one IOM in one request (the pieces of one
    /// client write that IOM holds); the payload is their bytes in order.
    /// Answered `WrittenAll` when every piece reached its toughness point.
    WriteMany { route: Route, pieces: Vec<WritePiece>, toughness: Toughness },
    /// Several block reads from one IOM in one request (the blocks of one
    /// client read that IOM holds). Answered `ReadAll`.
    ReadMany { route: Route, pieces: Vec<ReadPiece> },
    /// `DropObject` of several objects (from group 0), in one request.
    DropObjects { route: Route, objects: Vec<ObjectId> },
    /// `iomfs scrub --repair`: recompute a group's parity from its data
    /// blocks (the parity disagrees with blocks whose checksums hold).
    RecomputeParity { route: Route, group: GroupKey },
    /// `WriteMany` whose pieces may belong to client-computed stripes
    /// (protocol 10): `stripes[i]` names piece i's stripe (0: none). A
    /// piece of a stripe that writes a whole block over an absent one
    /// sends its parity IOM a reference (`ParityMsg::StripeUpdate`)
    /// instead of a delta: the client sent that IOM the XOR of the
    /// stripe's blocks (`StripeParity`). Any other piece goes as usual.
    WriteStriped { route: Route, pieces: Vec<WritePiece>, toughness: Toughness, stripes: Vec<u64> },
    /// The XOR of a stripe's new blocks, for the group's parity IOM (the
    /// payload): the sum of the deltas of the stripe's members, whose
    /// blocks were absent. `crcs[j]`: the checksum of member j's new
    /// block, which each member's reference must match. Answered
    /// `StripeTaken` at once; the members' writes wait for the stripe.
    StripeParity { route: Route, group: GroupKey, stripe: u64, crcs: Vec<u32> },
}

/// One block's part of a `ReadMany`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadPiece {
    pub key: BlockKey,
    pub offset: u32,
    pub len: u32,
}

/// One block's part of a `WriteMany`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WritePiece {
    pub key: BlockKey,
    pub offset: u32,
    pub len: u32,
    pub group_hint: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockInfo {
    pub key: BlockKey,
    pub version: Version,
    pub len: u32,
    pub crc: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub key: GroupKey,
    pub versions: Vec<Version>,
    pub len: u32,
    pub crc: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataResp {
    /// Payload: the stored bytes of the range; bytes past the payload are zeros.
    Read {
        version: Version,
    },
    Written {
        version: Version,
    },
    Flushed,
    Dropped,
    /// Payload: the block's stored bytes at that version (zeros past it).
    Version {
        version: Version,
    },
    /// Payload: the parity block's stored bytes; `versions[j]` is the version of member j it covers.
    Parity {
        versions: Vec<Version>,
    },
    Blocks(Vec<BlockInfo>),
    Groups(Vec<GroupInfo>),
    WrittenAll,
    /// Payload: the pieces' stored bytes one after another, `lens[i]` bytes
    /// for piece i (bytes of a piece past its part are zeros).
    ReadAll {
        lens: Vec<u32>,
    },
    Recomputed,
    StripeTaken,
}
