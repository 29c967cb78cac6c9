//! The iomfs client: a library that reads and writes byte ranges of objects
//! on a cluster ([`cluster`]), the FUSE filesystem on it ([`fs`]), the
//! checks built on it ([`scrub`], [`fsck`]), every IOM's counters
//! ([`bench::stats`]) and mount-point helpers ([`mount`]). The `iomfs` CLI
//! is the binary (`src/main.rs`, `src/cli/`).
//!
//! Invariants: placement is computed locally and never looked up; every
//! request carries the role it addresses and the client's epoch, and a
//! refused or timed-out request is retried at the role's current server, so
//! a single IOM failure costs latency, never an error or wrong data. Errors
//! are typed (`thiserror` enums); `anyhow` belongs to the binary.

pub mod bench;
pub mod cluster;
pub mod fs;
pub mod fsck;
pub mod mount;
pub mod scrub;

pub use cluster::{ClientError, ClusterClient};
