//! Block-level load generator: sequential full-stripe writes, random 4 KiB
//! writes at each toughness, sequential and random reads, straight through
//! the client library (no FUSE).

use crate::cluster::ClusterClient;
use bytes::Bytes;
use common::wire::{AdminReq, AdminResp, IomStats, Reply, Request};
use common::{IomId, ObjectId, Toughness};
use futures::StreamExt;
use std::sync::Arc;
use std::time::Instant;

pub struct BenchOptions {
    /// Bytes per sequential test.
    pub size: u64,
    /// Operations in flight.
    pub depth: usize,
    /// Random 4 KiB operations per toughness.
    pub random_ops: u64,
    pub object_base: u64,
}

#[derive(Debug, Clone)]
pub struct Line {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
}

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

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

pub async fn run(c: Arc<ClusterClient>, o: BenchOptions, mut out: impl FnMut(Line)) -> anyhow::Result<()> {
    let stripe = c.layout.group_bytes() as usize;
    let chunk = (1usize << 20).div_ceil(stripe) * stripe; // whole stripes, about 1 MiB
    let data = Bytes::from((0..chunk).map(|i| (i * 31 + 7) as u8).collect::<Vec<u8>>());
    let mut line = |name: String, value: f64, unit: &'static str| out(Line { name, value, unit });

    // Round trip of one small request (qd 1).
    let ping = common::wire::Request::Member(common::wire::MemberReq::Ping { from: IomId(0), epoch: common::Epoch(0) });
    for _ in 0..200 {
        c.call_iom(IomId(1), &ping, Bytes::new()).await?;
    }
    let start = Instant::now();
    for _ in 0..2000 {
        c.call_iom(IomId(1), &ping, Bytes::new()).await?;
    }
    line("rpc_round_trip_qd1".into(), start.elapsed().as_secs_f64() / 2000.0 * 1e6, "us");
    // 4 KiB writes one at a time (latency).
    for t in Toughness::ALL {
        let obj = ObjectId(o.object_base + 7);
        let small = data.slice(0..4096);
        let start = Instant::now();
        for i in 0..500u64 {
            c.write(obj, (i % 64) * 65536, small.clone(), t).await?;
        }
        line(format!("write_4k_{t}_latency_qd1"), start.elapsed().as_secs_f64() / 500.0 * 1e6, "us");
    }
    for (k, t) in Toughness::ALL.iter().enumerate() {
        let obj = ObjectId(o.object_base + k as u64);
        let n = (o.size as usize).div_ceil(chunk);
        let before = stats(&c).await;
        let start = Instant::now();
        let mut s = futures::stream::iter((0..n).map(|i| {
            let (c, d) = (c.clone(), data.clone());
            async move { c.write(obj, (i * chunk) as u64, d, *t).await }
        }))
        .buffer_unordered(o.depth.clamp(1, 8));
        while let Some(r) = s.next().await {
            r?;
        }
        c.flush().await?;
        let secs = start.elapsed().as_secs_f64();
        line(format!("seq_write_{t}"), (n * chunk) as f64 / secs / 1048576.0, "MiB/s");
        let after = stats(&c).await;
        let recs: u64 = after.iter().zip(&before).map(|(a, b)| a.journal_records - b.journal_records).sum();
        let fl: u64 = after.iter().zip(&before).map(|(a, b)| a.journal_flushes - b.journal_flushes).sum();
        line(format!("seq_write_{t}_journal_records_per_flush"), recs as f64 / fl.max(1) as f64, "ratio");
        line(format!("seq_write_{t}_journal_flushes_per_s"), fl as f64 / secs, "1/s");
        line(format!("seq_write_{t}_journal_records_per_s"), recs as f64 / secs, "1/s");
    }
    // Random 4 KiB writes into the atomic object, at each toughness.
    let span = o.size / 4096;
    for t in Toughness::ALL {
        let obj = ObjectId(o.object_base + 1);
        let mut seed = 0x9e3779b97f4a7c15u64 ^ t as u64;
        let offs: Vec<u64> = (0..o.random_ops).map(|_| (rng(&mut seed) % span) * 4096).collect();
        let small = data.slice(0..4096);
        let start = Instant::now();
        let mut s = futures::stream::iter(offs.into_iter().map(|off| {
            let (c, d) = (c.clone(), small.clone());
            async move { c.write(obj, off, d, t).await }
        }))
        .buffer_unordered(o.depth);
        while let Some(r) = s.next().await {
            r?;
        }
        let secs = start.elapsed().as_secs_f64();
        line(format!("rand_write_4k_{t}_qd{}", o.depth), o.random_ops as f64 / secs, "IOPS");
        line(
            format!("rand_write_4k_{t}_qd{}_MiBps", o.depth),
            o.random_ops as f64 * 4096.0 / secs / 1048576.0,
            "MiB/s",
        );
    }
    c.flush().await?;
    // Sequential read of the fast object.
    let obj = ObjectId(o.object_base);
    let n = (o.size as usize).div_ceil(chunk);
    let start = Instant::now();
    let mut s = futures::stream::iter((0..n).map(|i| {
        let c = c.clone();
        async move { c.read(obj, (i * chunk) as u64, chunk).await }
    }))
    .buffer_unordered(o.depth.clamp(1, 8));
    while let Some(r) = s.next().await {
        let b = r?;
        anyhow::ensure!(b.len() == chunk && b[1] == data[1], "sequential read returned wrong data");
    }
    let secs = start.elapsed().as_secs_f64();
    line("seq_read".into(), (n * chunk) as f64 / secs / 1048576.0, "MiB/s");
    // Random 4 KiB reads.
    let mut seed = 12345u64;
    let offs: Vec<u64> = (0..o.random_ops).map(|_| (rng(&mut seed) % span) * 4096).collect();
    let start = Instant::now();
    let mut s = futures::stream::iter(offs.into_iter().map(|off| {
        let c = c.clone();
        async move { c.read(obj, off, 4096).await }
    }))
    .buffer_unordered(o.depth);
    while let Some(r) = s.next().await {
        r?;
    }
    let secs = start.elapsed().as_secs_f64();
    line(format!("rand_read_4k_qd{}", o.depth), o.random_ops as f64 / secs, "IOPS");
    for s in stats(&c).await {
        line(format!("iom{}_rss", s.iom), s.rss_bytes as f64 / 1048576.0, "MiB");
    }
    Ok(())
}
