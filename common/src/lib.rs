//! Shared vocabulary of iomfs: identifiers, placement math, toughness,
//! the cluster map, namespace types, the wire protocol and its codec, and the
//! cluster configuration.
//!
//! Invariants: nothing here does I/O on sockets or depends on an async
//! runtime (no tokio, quinn or fuser); placement is a pure function of
//! (object, block) and the cluster width; every wire and disk encoding goes
//! through [`codec`], and every enum that is encoded is append-only.

pub mod cluster;
pub mod codec;
pub mod config;
pub mod ids;
pub mod layout;
pub mod meta;
pub mod toughness;
pub mod wire;

pub use cluster::{ClusterMap, Health, IomState};
pub use ids::*;
pub use layout::Layout;
pub use toughness::Toughness;
