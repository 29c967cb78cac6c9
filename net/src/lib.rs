//! Transport of iomfs: the cluster PKI, mutual-TLS QUIC endpoints tuned for
//! datacentre links, frames on streams and pooled RPC connections.
//!
//! Invariants: every connection is TLS 1.3 with a certificate signed by the
//! cluster CA on both ends; a connection is usable only after its Hello
//! exchange agreed on protocol version and cluster id; frames larger than
//! the protocol limits are refused before any allocation of their size.

pub mod frame;
pub mod metrics;
pub mod pki;
pub mod pool;
pub mod tls;

pub use pool::Pool;

use common::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("connecting to {addr}: {msg}")]
    Connect { addr: String, msg: String },
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("encode: {0}")]
    Codec(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("frame of {0} bytes is larger than the protocol allows")]
    TooLarge(usize),
    #[error("no reply within {0:?}")]
    Timeout(std::time::Duration),
    #[error("handshake refused: {0}")]
    Handshake(String),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    #[error("{0}")]
    Remote(#[from] WireError),
    #[error("IOM {iom} speaks protocol {speaks}, and {what} needs protocol {needs}: upgrade IOM {iom}")]
    PeerTooOld { iom: u32, speaks: u32, what: String, needs: u32 },
}

impl NetError {
    /// Whether the failure says nothing about the request itself (the peer
    /// may be down or restarting): refresh the map and retry.
    pub fn is_transport(&self) -> bool {
        matches!(
            self,
            NetError::Connect { .. }
                | NetError::Connection(_)
                | NetError::Write(_)
                | NetError::Read(_)
                | NetError::Closed(_)
                | NetError::Timeout(_)
                // This peer cannot carry the request (a relay restarted at an
                // older version): another may.
                | NetError::PeerTooOld { .. }
        )
    }
    pub fn remote(&self) -> Option<&WireError> {
        match self {
            NetError::Remote(e) => Some(e),
            _ => None,
        }
    }
}

/// Debugging aid: with `IOMFS_CONN_STATS=1` in the environment, logs the
/// connection's packet and frame counters every 5 s.
pub fn log_conn_stats(conn: &quinn::Connection, label: String) {
    if std::env::var_os("IOMFS_CONN_STATS").is_none() {
        return;
    }
    let conn = conn.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            if conn.close_reason().is_some() {
                return;
            }
            let s = conn.stats();
            eprintln!(
                "connstats {label}: tx dgrams {} bytes {} ios {} | rx dgrams {} bytes {} ios {} | tx frames acks {} stream {} max_data {} max_stream_data {} max_streams {} ping {} | rx frames acks {} stream {} | mtu {} rtt {:?} cwnd {} lost {}",
                s.udp_tx.datagrams, s.udp_tx.bytes, s.udp_tx.ios, s.udp_rx.datagrams, s.udp_rx.bytes, s.udp_rx.ios,
                s.frame_tx.acks, s.frame_tx.stream, s.frame_tx.max_data, s.frame_tx.max_stream_data,
                s.frame_tx.max_streams_bidi, s.frame_tx.ping, s.frame_rx.acks, s.frame_rx.stream,
                s.path.current_mtu, s.path.rtt, s.path.cwnd, s.path.lost_packets
            );
        }
    });
}
