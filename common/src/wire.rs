//! The wire protocol between clients and IOMs and between IOMs.
//!
//! Every message travels on a QUIC stream as a frame:
//! `[u32 header_len][u32 payload_len][header][payload]`, little endian.
//! The header is a [`Request`], [`Reply`], [`ParityMsg`] or [`ParityAck`]
//! encoded by [`crate::codec`]; the payload carries block bytes untouched,
//! so they are never copied through the encoder. A connection starts with a
//! [`Request::Hello`] that names the protocol version and the cluster.
//!
//! All enums here are append-only: a golden-bytes test pins their encoding.

use crate::cluster::ClusterMap;
use crate::ids::{BlockKey, Epoch, GroupKey, GroupNo, IomId, ObjectId, TxRef, Version};
use crate::meta::{MetaReq, MetaResp};

use crate::toughness::Toughness;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Version of this protocol; checked by the Hello exchange on every connection.
pub const PROTOCOL_VERSION: u32 = 4;
/// TLS ALPN token of iomfs connections.
pub const ALPN: &[u8] = b"iomfs";
/// Largest frame header accepted.
pub const MAX_HEADER: usize = 1 << 20;
/// Largest frame payload accepted.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Size of the fixed frame prefix.
pub const FRAME_PREFIX: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerKind {
    Client,
    Iom(IomId),
    Admin,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    pub cluster_id: String,
    pub peer: PeerKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    pub protocol: u32,
    pub iom: IomId,
    pub map: ClusterMap,
}

/// Which role a data request addresses, under which epoch. The receiver
/// serves it if it holds that role in its current map (itself, or as proxy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub epoch: Epoch,
    pub target: IomId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Hello(Hello),
    Data(DataReq),
    /// Opens the long-lived parity channel from data IOM `from` to this IOM;
    /// [`ParityMsg`] frames follow on the stream, [`ParityAck`] frames come back.
    ParityChannel {
        from: IomId,
        epoch: Epoch,
    },
    Member(MemberReq),
    Meta(MetaCall),
    Admin(AdminReq),
    /// Opens the namespace mirror stream from the namespace server `from`;
    /// [`MirrorMsg`] frames follow, [`MirrorAck`] frames come back.
    MetaMirror {
        from: IomId,
        epoch: Epoch,
    },
}

/// A namespace request with its id: `(client, seq)` is unique, so a retried
/// request is answered from the duplicate-request cache, not applied twice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetaCall {
    pub client: u64,
    pub seq: u64,
    pub req: MetaReq,
}

/// Namespace server to mirror.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MirrorMsg {
    /// Payload: the whole namespace at `lsn` (replaces the mirror's copy).
    Snapshot { term: u64, lsn: u64 },
    /// Payload: one mutation batch with sequence number `lsn`.
    Batch { term: u64, lsn: u64 },
    /// Make everything so far durable, then answer `Synced`.
    Sync { token: u64 },
}

/// Mirror to namespace server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MirrorAck {
    /// Where the mirror stands when the stream opens.
    Position {
        term: u64,
        lsn: u64,
    },
    /// Every batch up to `lsn` is applied and written to the mirror's journal.
    Applied {
        lsn: u64,
    },
    Synced {
        token: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Hello(HelloOk),
    Data(DataResp),
    Member(MemberResp),
    Meta(MetaResp),
    Admin(AdminResp),
    Error(WireError),
}

// ---------------------------------------------------------------- data path

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
}

// ------------------------------------------------------------ parity channel

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
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParityMsg {
    Update(ParityUpdate),
    /// a13: the data IOM's write completed (map switched, data durable).
    WriteDone {
        tx: TxRef,
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
}

// ---------------------------------------------------------------- membership

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

// --------------------------------------------------------------------- admin

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminReq {
    Stats,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct IomStats {
    pub iom: u32,
    pub epoch: u64,
    pub block_size: u32,
    pub slots_used: u64,
    pub slots_total: u64,
    pub data_blocks: u64,
    pub parity_blocks: u64,
    pub journal_records: u64,
    pub journal_flushes: u64,
    pub journal_bytes: u64,
    pub cache_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub parity_writes: u64,
    pub parity_deltas: u64,
    pub rss_bytes: u64,
    pub open_txs: u64,
    pub open_parity_txs: u64,
    pub rebuild_done: u64,
    pub rebuild_total: u64,
    pub rebuild_bytes_per_s: u64,
    /// Whether the IOM has learnt the current map and serves requests (an
    /// IOM that just started answers admin calls before it does).
    pub serving: bool,
    /// Data block versions rebuilt from their group after a failed read.
    pub repaired_blocks: u64,
    /// Failed reads of the IOM's own disk since it started.
    pub disk_errors: u64,
    /// Parity blocks recomputed from their data after a failed read.
    pub repaired_parity: u64,
    /// Bytes client writes may still take on this IOM (free space less its
    /// reserve).
    pub room_bytes: u64,
    /// Size of the filesystem holding its block file.
    pub disk_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminResp {
    Stats(IomStats),
}

// -------------------------------------------------------------------- errors

/// Error codes that cross the wire. The client maps them to errno in one place.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Peer speaks another protocol version.
    VersionMismatch,
    /// Peer belongs to another cluster.
    WrongCluster,
    /// A frame could not be decoded.
    Malformed,
    /// A frame is larger than allowed.
    TooLarge,
    /// Connection must start with Hello.
    NoHello,
    /// The receiver does not serve this role in its epoch; refresh the map and retry.
    NotServing,
    /// More than one IOM is down: no I/O until recovery.
    ClusterStopped,
    /// This IOM is cut off from the majority and refuses writes.
    NoQuorum,
    /// A peer needed for the operation is unreachable; retry.
    Unavailable,
    /// Checksum mismatch: the stored data is damaged.
    Corrupt,
    /// The requested block version is gone (superseded); retry the snapshot.
    VersionGone,
    NoSpace,
    Io,
    Internal,
    Shutdown,
    // namespace errors
    NotFound,
    Exists,
    NotEmpty,
    NotDir,
    IsDir,
    NameTooLong,
    Invalid,
    NoData,
    Range,
    Perm,
    Access,
    Stale,
    Unsupported,
    TooBig,
    TooManyLinks,
    CrossDevice,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub detail: String,
}

impl WireError {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> WireError {
        WireError { code, detail: detail.into() }
    }
    /// Whether a client should refresh its map and send the same request
    /// again. `VersionGone` is not: the same request gets the same answer;
    /// the caller must take a fresh snapshot (scrub re-reads the heads).
    /// Retrying it made a scrub that raced a delete stall for a minute.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self.code,
            ErrorCode::NotServing
                | ErrorCode::ClusterStopped
                | ErrorCode::NoQuorum
                | ErrorCode::Unavailable
                | ErrorCode::Shutdown
        )
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.code, self.detail)
    }
}

impl std::error::Error for WireError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode, encode};
    use crate::ids::{BlockNo, TxId};

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    /// Golden bytes: these encodings are the protocol. If this test fails,
    /// the wire format changed: bump PROTOCOL_VERSION instead of editing it.
    #[test]
    fn golden_bytes() {
        let hello =
            Request::Hello(Hello { protocol: PROTOCOL_VERSION, cluster_id: "c".into(), peer: PeerKind::Iom(IomId(3)) });
        assert_eq!(hex(&encode(&hello).unwrap()), "000401630103");

        let w = Request::Data(DataReq::Write {
            route: Route { epoch: Epoch(2), target: IomId(1) },
            key: BlockKey { object: ObjectId(300), block: BlockNo(5) },
            offset: 4096,
            toughness: Toughness::Durable,
            group_hint: 4,
        });
        assert_eq!(hex(&encode(&w).unwrap()), "01010201fb2c0105fb00100204");

        let u = ParityMsg::Update(ParityUpdate {
            tx: TxRef { iom: IomId(1), tx: TxId(9) },
            group: GroupKey { object: ObjectId(7), group: GroupNo(2) },
            index: 3,
            old: Version(4),
            new: Version(5),
            delta_offset: 0,
            hint: 1,
            data_iom: IomId(1),
            durable: true,
        });
        assert_eq!(hex(&encode(&u).unwrap()), "000109070203040500010101");

        let e = Reply::Error(WireError::new(ErrorCode::NotServing, "x"));
        assert_eq!(hex(&encode(&e).unwrap()), "05050178");

        let a = ParityAck::Done { tx: TxRef { iom: IomId(2), tx: TxId(300) } };
        assert_eq!(hex(&encode(&a).unwrap()), "0102fb2c01");
    }

    #[test]
    fn roundtrip_all_data_requests() {
        let route = Route { epoch: Epoch(1), target: IomId(0) };
        let key = BlockKey { object: ObjectId(1), block: BlockNo(2) };
        let reqs = vec![
            DataReq::Read { route, key, offset: 1, len: 2 },
            DataReq::Truncate { route, key, keep: 0, toughness: Toughness::Fast },
            DataReq::Flush { route },
            DataReq::DropObject { route, object: ObjectId(1), from: GroupNo(0) },
            DataReq::ReadVersion { route, key, version: Version(3) },
            DataReq::ReadParity { route, group: GroupKey { object: ObjectId(1), group: GroupNo(0) } },
            DataReq::ListBlocks { after: Some(key), limit: 10 },
            DataReq::ListGroups { after: None, limit: 10 },
            DataReq::ReadMany { route, pieces: vec![ReadPiece { key, offset: 0, len: 4096 }] },
            DataReq::DropObjects { route, objects: vec![ObjectId(1), ObjectId(9)] },
        ];
        for r in reqs {
            let req = Request::Data(r);
            let back: Request = decode(&encode(&req).unwrap()).unwrap();
            assert_eq!(back, req);
        }
    }

    /// One valid encoding of each message family, to mutate.
    fn samples() -> Vec<Vec<u8>> {
        use crate::meta::{Caller, FileKind, MetaReq, MetaResp};
        let route = Route { epoch: Epoch(7), target: IomId(2) };
        let key = BlockKey { object: ObjectId(300), block: BlockNo(70_000) };
        let group = GroupKey { object: ObjectId(300), group: GroupNo(9) };
        let mut v: Vec<Vec<u8>> = vec![
            encode(&Request::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                cluster_id: "cluster-1".into(),
                peer: PeerKind::Iom(IomId(1)),
            }))
            .unwrap(),
            encode(&Request::Data(DataReq::WriteMany {
                route,
                pieces: vec![WritePiece { key, offset: 0, len: 4096, group_hint: 4 }; 3],
                toughness: Toughness::Atomic,
            }))
            .unwrap(),
            encode(&Request::Data(DataReq::ReadMany { route, pieces: vec![ReadPiece { key, offset: 1, len: 2 }] }))
                .unwrap(),
            encode(&Request::Meta(MetaCall {
                client: 1 << 40,
                seq: 12,
                req: MetaReq::Create {
                    parent: crate::ids::Ino(1),
                    name: b"a file name".to_vec(),
                    kind: FileKind::Regular,
                    perm: 0o644,
                    rdev: 0,
                    caller: Caller { uid: 1000, gid: 1000 },
                    target: Some(b"/x".to_vec()),
                    open: true,
                },
            }))
            .unwrap(),
            encode(&Request::Member(MemberReq::GetMap)).unwrap(),
            encode(&Reply::Data(DataResp::Groups(vec![GroupInfo {
                key: group,
                versions: vec![Version(1), Version(2)],
                len: 10,
                crc: 3,
            }])))
            .unwrap(),
            encode(&Reply::Meta(MetaResp::Names(vec![b"a".to_vec(), b"bc".to_vec()]))).unwrap(),
            encode(&Reply::Error(WireError::new(ErrorCode::Corrupt, "checksum mismatch"))).unwrap(),
            encode(&ParityMsg::WriteDone { tx: TxRef { iom: IomId(1), tx: TxId(5) } }).unwrap(),
            encode(&ParityAck::Failed {
                tx: TxRef { iom: IomId(1), tx: TxId(5) },
                error: WireError::new(ErrorCode::Unavailable, "x"),
            })
            .unwrap(),
            encode(&MirrorMsg::Batch { term: 3, lsn: 1 << 33 }).unwrap(),
            encode(&MirrorAck::Applied { lsn: 99 }).unwrap(),
        ];
        v.push(Vec::new());
        v
    }

    /// Decodes `b` as every type that is read from a peer.
    fn decode_all(b: &[u8]) {
        let _ = decode::<Request>(b);
        let _ = decode::<Reply>(b);
        let _ = decode::<ParityMsg>(b);
        let _ = decode::<ParityAck>(b);
        let _ = decode::<MirrorMsg>(b);
        let _ = decode::<MirrorAck>(b);
        let _ = decode::<crate::meta::MetaReq>(b);
        let _ = decode::<crate::meta::MetaResp>(b);
        let _ = decode::<ClusterMap>(b);
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(20_000),
            failure_persistence: None,
            ..Default::default()
        })]
        /// Valid encodings with bytes flipped, cut, or lengths inflated
        /// (0xfb–0xfd start 2-, 4- and 8-byte varints), and random bytes:
        /// every decoder answers with a value or an error, never a panic,
        /// and allocates nothing a length claims before checking it (the
        /// codec's 1 MiB limit). Long run: `PROPTEST_CASES=1000000 cargo
        /// test --release -p common decoders_never_panic`.
        #[test]
        fn decoders_never_panic(
            which in 0usize..13,
            edits in proptest::collection::vec((0u8..4, proptest::prelude::any::<u16>(), proptest::prelude::any::<u8>()), 0..6),
            random in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96),
        ) {
            let all = samples();
            let mut b = all[which % all.len()].clone();
            for (kind, at, byte) in edits {
                let at = if b.is_empty() { 0 } else { at as usize % b.len() };
                match kind {
                    0 if !b.is_empty() => b[at] ^= byte | 1,
                    1 => b.truncate(at),
                    2 => b.insert(at, 0xfb + byte % 3),
                    _ => b.insert(at, 0xff),
                }
            }
            decode_all(&b);
            decode_all(&random);
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for seed in 0u64..2000 {
            let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
            let len = (seed % 64) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode::<Request>(&bytes);
            let _ = decode::<ParityMsg>(&bytes);
        }
    }
}
