//! Every IOM's counters (`iomfs stats`), and emptying their caches
//! (`iomfs cache drop`); the load generator `iomfs bench` is the binary's
//! `cli::bench`.
//!
//! Invariant: an IOM that does not answer is left out, not waited for
//! beyond the client's own retries.

use crate::cluster::ClusterClient;
use bytes::Bytes;
use common::wire::{AdminReq, AdminResp, IomStats, Reply, Request};
use common::IomId;

/// The counters of every IOM that answers, in IOM order.
pub async fn stats(c: &ClusterClient) -> Vec<IomStats> {
    stats_or_why(c).await.into_iter().filter_map(|(_, r)| r.ok()).collect()
}

/// Every IOM's counters, or why it could not be asked.
pub async fn stats_or_why(c: &ClusterClient) -> Vec<(IomId, Result<IomStats, String>)> {
    let mut v = Vec::new();
    for i in 0..c.cfg.width() {
        let r = match c.call_iom(IomId(i), &Request::Admin(AdminReq::Stats), Bytes::new()).await {
            Ok((Reply::Admin(AdminResp::Stats(s)), _)) => Ok(s),
            Ok((r, _)) => Err(format!("unexpected reply {r:?}")),
            Err(e) => Err(e.to_string()),
        };
        v.push((IomId(i), r));
    }
    v
}

/// `iomfs cache drop`: every IOM empties its block cache and drops its
/// block file's clean pages. Per IOM, the bytes its cache held, or why it
/// could not be asked.
pub async fn drop_caches(c: &ClusterClient) -> Vec<(IomId, Result<u64, String>)> {
    let mut v = Vec::new();
    for i in 0..c.cfg.width() {
        let r = match c.call_iom(IomId(i), &Request::Admin(AdminReq::DropCache), Bytes::new()).await {
            Ok((Reply::Admin(AdminResp::CacheDropped { bytes }), _)) => Ok(bytes),
            Ok((r, _)) => Err(format!("unexpected reply {r:?}")),
            Err(e) => Err(e.to_string()),
        };
        v.push((IomId(i), r));
    }
    v
}
