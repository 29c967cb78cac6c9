//! Every IOM's counters (`iomfs stats`; the load generator `iomfs bench`
//! is the binary's `cli::bench`).
//!
//! Invariant: an IOM that does not answer is left out, not waited for
//! beyond the client's own retries.

use crate::cluster::ClusterClient;
use bytes::Bytes;
use common::wire::{AdminReq, AdminResp, IomStats, Reply, Request};
use common::IomId;

/// The counters of every IOM that answers, in IOM order.
pub async fn stats(c: &ClusterClient) -> Vec<IomStats> {
    let mut v = Vec::new();
    for i in 0..c.cfg.width() {
        if let Ok((Reply::Admin(AdminResp::Stats(s)), _)) =
            c.call_iom(IomId(i), &Request::Admin(AdminReq::Stats), Bytes::new()).await
        {
            v.push(s);
        }
    }
    v
}
