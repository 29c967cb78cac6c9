//! Error codes that cross the wire.

use super::*;

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
