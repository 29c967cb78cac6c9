//! `iomfs bench`: a block-level load generator — sequential full-stripe
//! writes, random 4 KiB writes at each toughness, sequential and random
//! reads, straight through the client library (no FUSE) — and failover
//! measurements on a local cluster.
//!
//! Invariant: it touches only objects numbered from the `object_base` it is
//! given (the CLI picks a random base from 2^62 up and drops those objects
//! afterwards), never a file's.

use super::local::{iom_pid, start_iom, status};
use bytes::Bytes;
use common::{IomId, ObjectId, Toughness};
use fs_client::bench::stats;
use fs_client::ClusterClient;
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
    // 4 KiB writes one at a time (latency), each level twice, after a warm-up.
    for t in [Toughness::Atomic, Toughness::Fast, Toughness::Atomic, Toughness::Fast, Toughness::Durable] {
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

/// Failover measurements on a local cluster (kills IOM `victim` through its pid file).
pub async fn failover(
    c: Arc<ClusterClient>,
    victim: IomId,
    size: u64,
    base: u64,
    mut out: impl FnMut(Line),
) -> anyhow::Result<()> {
    let mut line = |name: &str, value: f64, unit: &'static str| out(Line { name: name.into(), value, unit });
    let stripe = c.layout.group_bytes() as usize;
    let chunk = (1usize << 20).div_ceil(stripe) * stripe;
    let data = Bytes::from((0..chunk).map(|i| (i * 7 + 3) as u8).collect::<Vec<u8>>());
    let n = (size as usize).div_ceil(chunk);
    let seq_write = |obj: ObjectId| {
        let (c, data) = (c.clone(), data.clone());
        async move {
            let start = Instant::now();
            let mut s = futures::stream::iter((0..n).map(|i| {
                let (c, d) = (c.clone(), data.clone());
                async move { c.write(obj, (i * chunk) as u64, d, Toughness::Atomic).await }
            }))
            .buffer_unordered(4);
            while let Some(r) = s.next().await {
                r?;
            }
            anyhow::Ok(start.elapsed().as_secs_f64())
        }
    };
    let seq_read = |obj: ObjectId| {
        let c = c.clone();
        async move {
            let start = Instant::now();
            let mut s = futures::stream::iter((0..n).map(|i| {
                let c = c.clone();
                async move { c.read(obj, (i * chunk) as u64, chunk).await }
            }))
            .buffer_unordered(4);
            while let Some(r) = s.next().await {
                r?;
            }
            anyhow::Ok((n * chunk) as f64 / start.elapsed().as_secs_f64() / 1048576.0)
        }
    };
    let wait_healthy = || {
        let c = c.clone();
        async move {
            let start = Instant::now();
            loop {
                let s = status(&c).await;
                if s.health() == common::Health::Healthy {
                    return start.elapsed().as_secs_f64();
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    let kill = |v: IomId| {
        let pid = iom_pid(&c.paths, v).ok_or_else(|| anyhow::anyhow!("IOM {v} is not running (no live pid file)"))?;
        // SAFETY: SIGKILL of the IOM process named by its pid file.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        anyhow::Ok(Instant::now())
    };
    let (a, b, d) = (ObjectId(base), ObjectId(base + 1), ObjectId(base + 2));
    seq_write(a).await?;
    line("healthy_seq_read", seq_read(a).await?, "MiB/s");

    // Pause: a writer keeps writing blocks held by the victim; the kill lands between writes.
    let victim_blocks: Vec<u64> = (0..10_000u64)
        .filter(|&b| c.layout.data_iom(ObjectId(base + 3), common::BlockNo(b)) == victim)
        .take(64)
        .collect();
    let small = data.slice(0..4096);
    for &b in victim_blocks.iter().take(4) {
        c.write(ObjectId(base + 3), b * c.layout.block_size() as u64, small.clone(), Toughness::Atomic).await?;
    }
    let killed = kill(victim)?;
    let vb = victim_blocks[4 % victim_blocks.len()];
    c.write(ObjectId(base + 3), vb * c.layout.block_size() as u64, small.clone(), Toughness::Atomic).await?;
    let pause = killed.elapsed().as_secs_f64();
    line("failover_pause_kill_to_next_write", pause * 1000.0, "ms");
    line("degraded_seq_read", seq_read(a).await?, "MiB/s");
    // Writes while down: the rebuild has to restore them.
    let t = seq_write(b).await?;
    line("degraded_seq_write", (n * chunk) as f64 / t / 1048576.0, "MiB/s");
    let marked_bytes = (n * chunk) as f64 / c.layout.width() as f64 * (1.0 + 1.0 / c.layout.n() as f64);
    start_iom(&c.paths.dir, victim)?;
    let secs = wait_healthy().await;
    line("rebuild_idle_time_to_healthy", secs, "s");
    line("rebuild_idle_rate", marked_bytes / secs / 1048576.0, "MiB/s");
    // Again, with a client writing while the victim rebuilds.
    kill(victim)?;
    let _ = wait_healthy_not(&c).await;
    seq_write(b).await?;
    start_iom(&c.paths.dir, victim)?;
    let load = tokio::spawn(seq_write(d));
    let secs = wait_healthy().await;
    line("rebuild_under_load_time_to_healthy", secs, "s");
    line("rebuild_under_load_rate", marked_bytes / secs / 1048576.0, "MiB/s");
    if let Ok(Ok(t)) = load.await {
        line("client_write_during_rebuild", (n * chunk) as f64 / t / 1048576.0, "MiB/s");
    }
    for o in [a, b, d, ObjectId(base + 3)] {
        let _ = c.drop_object(o, common::GroupNo(0)).await;
    }
    Ok(())
}

/// Waits until the cluster reports it is not healthy (a kill was noticed).
async fn wait_healthy_not(c: &ClusterClient) -> f64 {
    let start = Instant::now();
    while status(c).await.health() == common::Health::Healthy && start.elapsed().as_secs() < 20 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    start.elapsed().as_secs_f64()
}
