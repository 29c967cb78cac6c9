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

/// Newest protocol version this build speaks; announced in its Hello.
///
/// A connection runs at one version, agreed by the Hello exchange (see
/// [`negotiate`]): the caller announces its newest, a peer that does not
/// speak it answers `VersionMismatch` and the caller tries the next older
/// one it speaks. So nodes of two neighbouring releases talk, and a
/// cluster is upgraded one node at a time (docs/operations.md, Upgrades).
///
/// Rules for changing the protocol:
/// - an addition (a new enum variant at the end, used only towards peers
///   at the new version: [`Request::since`]) raises `PROTOCOL_VERSION`;
/// - a change to the encoding of anything an older version sends (a field
///   added to a struct, a variant reordered) breaks those peers: it raises
///   `PROTOCOL_OLDEST` too, or is made as an addition instead. The
///   golden-bytes test pins the encodings of the oldest version spoken.
///
/// History: 5 (2026-12-06) split membership, handover and recovery into
/// three request families; 6 added `AdminReq::DropCache`; 7 added fields
/// to `IomStats`; 8 (2026-12-07) speaks 7 as well and adds
/// `AdminReq::ScrubReport` / `AdminReq::LastScrub` and `Request::Relay`;
/// 9 adds `MemberReq::StoreState` (a first start without `store.new`),
/// `MemberReq::ProposeRound` and `MemberReq::Release` (a lost round of a
/// proposal frees its votes); 10 adds client-computed stripes
/// (`DataReq::WriteStriped`, `DataReq::StripeParity`,
/// `ParityMsg::StripeUpdate`, `ParityAck::NeedDelta`).
pub const PROTOCOL_VERSION: u32 = 10;
/// Oldest protocol version this build still speaks.
pub const PROTOCOL_OLDEST: u32 = 7;
/// First version with `AdminReq::ScrubReport` and `AdminReq::LastScrub`.
pub const SINCE_SCRUB_REPORT: u32 = 8;
/// First version with `Request::Relay`.
pub const SINCE_RELAY: u32 = 8;
/// First version with `MemberReq::StoreState`, `ProposeRound` and `Release`.
pub const SINCE_STORE_STATE: u32 = 9;
/// First version with client-computed stripes (`DataReq::WriteStriped`,
/// `DataReq::StripeParity`, `ParityMsg::StripeUpdate`, `ParityAck::NeedDelta`).
pub const SINCE_STRIPE: u32 = 10;
/// Environment variable that makes a process announce an older version
/// than it could (rehearsing a mixed-version cluster before an upgrade).
pub const PROTOCOL_MAX_ENV: &str = "IOMFS_PROTOCOL_MAX";

/// The newest version this process speaks: [`PROTOCOL_VERSION`], or the
/// lower one `IOMFS_PROTOCOL_MAX` names. An unusable value is an error
/// naming the range (the binaries check it at start-up).
pub fn protocol_max_from_env() -> Result<u32, String> {
    match std::env::var(PROTOCOL_MAX_ENV) {
        Err(_) => Ok(PROTOCOL_VERSION),
        Ok(v) => match v.trim().parse::<u32>() {
            Ok(n) if (PROTOCOL_OLDEST..=PROTOCOL_VERSION).contains(&n) => Ok(n),
            _ => Err(format!(
                "{PROTOCOL_MAX_ENV}={v:?}: this build speaks protocol versions {PROTOCOL_OLDEST} to \
                 {PROTOCOL_VERSION}; set a number in that range or unset it"
            )),
        },
    }
}

/// [`protocol_max_from_env`], read once; an unusable value counts as unset.
pub fn protocol_max() -> u32 {
    static MAX: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| protocol_max_from_env().unwrap_or(PROTOCOL_VERSION))
}

/// The version a connection runs at when the peer announces `theirs`:
/// `None` when this process does not speak it.
pub fn negotiate(theirs: u32) -> Option<u32> {
    (PROTOCOL_OLDEST..=protocol_max()).contains(&theirs).then_some(theirs)
}
/// TLS ALPN token of iomfs connections.
pub const ALPN: &[u8] = b"iomfs";
/// Largest frame header accepted.
pub const MAX_HEADER: usize = 1 << 20;
/// Largest frame payload accepted.
pub const MAX_PAYLOAD: usize = 16 << 20;
/// Size of the fixed frame prefix.
pub const FRAME_PREFIX: usize = 8;
/// Most pieces in one `ReadMany` or `WriteMany`.
pub const MAX_PIECES: usize = 1024;
/// Most objects in one `DropObjects` (and in one `MetaReq::Reclaim`).
pub const MAX_DROP_OBJECTS: usize = 4096;
/// Most entries in one `ListBlocks` or `ListGroups` answer.
pub const MAX_LIST_ENTRIES: u32 = 10_000;
/// Most entries in one `ReadDir` answer.
pub const MAX_READDIR_ENTRIES: u32 = 4096;

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

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
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
    Handover(HandoverReq),
    Recovery(RecoveryReq),
    /// Protocol 8: a client that cannot reach IOM `to` (a network fault
    /// between the two alone) sends the request through another IOM, which
    /// forwards it and passes the reply (and its payload) back. Only
    /// requests a client may send itself are relayed.
    Relay {
        to: IomId,
        req: Box<Request>,
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
    /// Kept at this index across protocol versions, so a peer of another
    /// version still decodes the `VersionMismatch` answer to its Hello.
    Error(WireError),
    Handover(HandoverResp),
    Recovery(RecoveryResp),
}

mod admin;
mod data;
mod error;
mod handover;
mod member;
mod parity;
mod recovery;
#[cfg(test)]
mod tests;

pub use admin::*;
pub use data::*;
pub use error::*;
pub use handover::*;
pub use member::*;
pub use parity::*;
pub use recovery::*;

impl Request {
    /// (family, operation) naming this request in metrics and traces, such
    /// as `("data", "WriteMany")` or `("meta", "Create")`.
    /// The oldest protocol version that has this request: it is sent only
    /// on connections running at that version or newer.
    // Not inlined: rustc 1.95's LLVM folded `since() == PROTOCOL_OLDEST`
    // wrongly for this match over nested enums (false for requests whose
    // since() is 7; rust-lang/rust#159035 is the enum-discriminant
    // miscompile fixed in 1.97.1). Called once per request.
    #[inline(never)]
    pub fn since(&self) -> u32 {
        match self {
            Request::Admin(a) => a.since(),
            Request::Member(m) => m.since(),
            Request::Relay { req, .. } => req.since().max(SINCE_RELAY),
            Request::Data(d) => d.since(),
            _ => PROTOCOL_OLDEST,
        }
    }

    pub fn name(&self) -> (&'static str, &'static str) {
        match self {
            Request::Data(d) => ("data", d.into()),
            Request::Meta(c) => ("meta", (&c.req).into()),
            Request::Member(m) => ("member", m.into()),
            Request::Admin(a) => ("admin", a.into()),
            Request::Handover(h) => ("handover", h.into()),
            Request::Recovery(r) => ("recovery", r.into()),
            Request::Relay { req, .. } => ("relay", req.name().0),
            other => ("stream", other.into()),
        }
    }
}

impl AdminReq {
    /// The oldest protocol version that has this request (see [`Request::since`]).
    pub fn since(&self) -> u32 {
        match self {
            AdminReq::ScrubReport(_) | AdminReq::LastScrub => SINCE_SCRUB_REPORT,
            _ => PROTOCOL_OLDEST,
        }
    }
}

impl DataReq {
    /// The oldest protocol version that has this request (see [`Request::since`]).
    #[inline(never)]
    pub fn since(&self) -> u32 {
        match self {
            DataReq::WriteStriped { .. } | DataReq::StripeParity { .. } => SINCE_STRIPE,
            _ => PROTOCOL_OLDEST,
        }
    }
}

impl MemberReq {
    /// The oldest protocol version that has this request (see [`Request::since`]).
    pub fn since(&self) -> u32 {
        match self {
            MemberReq::StoreState { .. } | MemberReq::Release { .. } | MemberReq::ProposeRound { .. } => {
                SINCE_STORE_STATE
            }
            _ => PROTOCOL_OLDEST,
        }
    }
}
