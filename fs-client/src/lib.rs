//! The iomfs client: a library that reads and writes byte ranges of objects
//! on a cluster ([`cluster`]), the operator tools built on it (`init`,
//! `scrub`, the block-level load generator) and the `iomfs` CLI.
//!
//! Invariants: placement is computed locally and never looked up; every
//! request carries the role it addresses and the client's epoch, and a
//! refused or timed-out request is retried at the role's current server, so
//! a single IOM failure costs latency, never an error or wrong data.

pub mod bench;
pub mod cluster;
pub mod fs;
pub mod fsck;
pub mod init;
pub mod local;
pub mod mount;
pub mod scrub;

pub use cluster::{ClientError, ClusterClient};
