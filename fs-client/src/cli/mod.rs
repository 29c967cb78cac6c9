//! The `iomfs` commands that live only in the binary: making a cluster
//! directory, running a local cluster, mounting, and the load generator.
//! They report errors with `anyhow` (a message and its context, printed
//! once by `main`); the library they call uses typed errors only.

pub mod bench;
pub mod init;
pub mod local;
pub mod mount;
