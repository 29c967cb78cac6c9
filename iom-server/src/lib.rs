//! The IOM: one storage server of an iomfs cluster.
//!
//! Each IOM owns its slice of storage: a block file whose slots are never
//! overwritten in place ([`store`]), a buffer cache ([`cache`]), a
//! write-ahead journal with group commit ([`journal`]) and a block map with
//! the unfinished transactions of both protocol sides ([`map`]), opened
//! together as [`storage::Storage`]. Its roles are types that hold only
//! the handles they need: the data side of a write (a1–a14,
//! [`data::DataSide`], code in [`write_path`] and [`read_path`]), the parity
//! side (b1–b13, [`parity::ParitySide`]), the parity channels
//! ([`links::Links`]), reconstruction ([`group::Group`]), the stand-in
//! ([`standin::StandIn`]), recovery ([`recovery`] pure, executor
//! [`recovery_exec::Recovery`]), failure detection and votes
//! ([`failover::Failover`]), join and rejoin ([`rejoin::Rejoin`]), and
//! every outgoing call ([`caller::RoleCaller`]). The node
//! ([`server::Iom`]) opens storage, builds the roles, routes requests to
//! them ([`service`]) and runs the workers; the namespace service
//! ([`namespace::Namespace`]) is opened with the handles it needs
//! ([`namespace::NsLinks`]).
//! `tests/house.rs` keeps the room graph.
//!
//! Invariants: a block version's slot is freed only after the record that
//! makes its successor permanent is durable; every in-memory change of the
//! map is made by applying a journal record, before that record is
//! appended, so replay reproduces the map; records that point at data
//! (a11, b11) reach the disk only after that data.

pub mod birth;
pub mod cache;
pub mod caller;
pub mod data;
pub mod failover;
pub mod failpoint;
pub mod fence;
pub mod format;
pub mod fsutil;
pub mod group;
pub mod inflight;
pub mod journal;
pub mod links;
pub mod liveness;
pub mod locks;
pub mod map;
pub mod membership;
pub mod membership_state;
pub mod namespace;
pub mod parity;
pub mod read_path;
pub mod records;
pub mod recovery;
pub mod recovery_exec;
pub mod rejoin;
pub mod restart;
pub mod scrub_book;
pub mod seen;
pub mod server;
pub mod service;
pub mod standin;
pub mod storage;
pub mod store;
pub mod stripe_table;
pub mod timeouts;
pub mod workers;
pub mod write_path;

pub use server::{Iom, StartOptions};

use common::config::ConfigError;
use common::wire::{ErrorCode, WireError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: {err}")]
    Io { what: String, err: std::io::Error },
    /// An on-disk file (journal segment, checkpoint, block-file header,
    /// store marker, membership or namespace file) is not what it must be.
    #[error("{0}")]
    Damaged(String),
    /// A record or snapshot could not be encoded.
    #[error(transparent)]
    Codec(#[from] common::codec::CodecError),
    /// The IOM cannot start where its config puts it (address, TLS
    /// identity, port); the message names the fix.
    #[error("{0}")]
    Startup(String),
    /// A peer answered with a message that does not answer the question.
    #[error("unexpected answer from a peer: {0}")]
    UnexpectedReply(String),
    /// A blocking task ended without an answer (it panicked or was cancelled).
    #[error("{0}")]
    TaskFailed(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("the disk of this IOM is full (only its reserve for parity, journal and recovery is left): delete files or add space")]
    NoSpace,
    #[error("checksum mismatch: {0}")]
    Corrupt(String),
    #[error("block version gone: {0}")]
    VersionGone(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("{0}")]
    Wire(WireError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("shutting down")]
    Shutdown,
}

impl Error {
    pub fn io(what: impl Into<String>, err: std::io::Error) -> Error {
        Error::Io { what: what.into(), err }
    }

    pub fn to_wire(&self) -> WireError {
        let code = match self {
            Error::Io { err, .. } if err.raw_os_error() == Some(libc::ENOSPC) => ErrorCode::NoSpace,
            Error::Io { .. } => ErrorCode::Io,
            Error::Damaged(_)
            | Error::Codec(_)
            | Error::Startup(_)
            | Error::UnexpectedReply(_)
            | Error::TaskFailed(_)
            | Error::Config(_) => ErrorCode::Internal,
            Error::NoSpace => ErrorCode::NoSpace,
            Error::Corrupt(_) => ErrorCode::Corrupt,
            Error::VersionGone(_) => ErrorCode::VersionGone,
            Error::BadRequest(_) => ErrorCode::Invalid,
            Error::Wire(w) => return w.clone(),
            Error::Net(n) => match n.remote() {
                Some(w) => return w.clone(),
                None => ErrorCode::Unavailable,
            },
            Error::Shutdown => ErrorCode::Shutdown,
        };
        WireError::new(code, self.to_string())
    }
}

impl From<WireError> for Error {
    fn from(w: WireError) -> Error {
        Error::Wire(w)
    }
}
