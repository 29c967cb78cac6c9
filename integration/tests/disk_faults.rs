//! Disk faults other than a full disk, injected with the `failpoints`
//! build's error actions (`store::pread=3*return(eio)`, …) into real IOM
//! processes: what the client sees, that nothing acknowledged is lost, and
//! how the cluster gets back to healthy.
//!
//! Needs `iom-server-failpoints` (built by scripts/test).

use bytes::Bytes;
use common::{BlockNo, ObjectId, Toughness};
use integration::{bin, serial, Cluster, Rng};
use std::time::{Duration, Instant};

const BS: usize = 65536;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn status(c: &Cluster) -> (bool, String) {
    let o = c.iomfs(&["status"]);
    (o.status.success(), String::from_utf8_lossy(&o.stdout).to_string())
}

fn wait_status(c: &Cluster, want: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, s) = status(c);
        if s.contains(want) {
            return;
        }
        assert!(Instant::now() < deadline, "no '{want}' in {timeout:?}:\n{s}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn cluster() -> Cluster {
    let mut c = Cluster::init(5);
    c.server_bin = bin("iom-server-failpoints");
    c
}

/// Writes `data` as object `obj`, durably.
fn write(c: &Cluster, obj: ObjectId, data: &[u8]) {
    rt().block_on(async {
        let client = c.client().await;
        client.write(obj, 0, Bytes::from(data.to_vec()), Toughness::Durable).await.unwrap();
        client.close();
    });
}

fn read(c: &Cluster, obj: ObjectId, len: usize) -> Result<Vec<u8>, String> {
    read_at(c, obj, 0, len)
}

fn read_at(c: &Cluster, obj: ObjectId, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    rt().block_on(async {
        let client = c.client().await;
        let r = client.read(obj, offset, len).await.map(|b| b.to_vec()).map_err(|e| e.to_string());
        client.close();
        r
    })
}

/// Restarts IOM `i` with `FAILPOINTS` set to `fp` (empty: none). A restart
/// also empties its buffer cache, so reads reach the disk.
fn restart_with(c: &mut Cluster, i: u32, fp: &str) {
    assert!(c.stop(i), "IOM {i} did not stop cleanly:\n{}", c.log(i));
    c.env[i as usize] = if fp.is_empty() { vec![] } else { vec![("FAILPOINTS".into(), fp.into())] };
    c.start(i);
    wait_status(c, "cluster: healthy", Duration::from_secs(30));
}

#[test]
fn read_errors_are_served_from_the_group_and_repaired() {
    let _g = serial();
    let mut c = cluster();
    c.start_all();
    let obj = ObjectId(777);
    let data = Rng(41).bytes(32 * BS);
    write(&c, obj, &data);
    let victim = common::Layout::new(5, BS as u32).unwrap().data_iom(obj, BlockNo(0)).0;
    restart_with(&mut c, victim, "store::pread=3*return(eio)");
    // Block by block: a multi-block read first reads runs of adjacent
    // slots at once, and a failed run read is only a missed prefetch (the
    // blocks are then read one by one), which would blur the count.
    let by_block: Vec<u8> =
        (0..32).flat_map(|b| read_at(&c, obj, (b * BS) as u64, BS).expect("read over three disk errors")).collect();
    assert!(by_block == data, "wrong bytes");
    let log = c.log(victim);
    assert_eq!(log.matches("block repaired from its group").count(), 3, "{log}");
    assert!(c.is_running(victim), "three read errors stopped the IOM (limit 10):\n{log}");
    c.must_scrub_clean();
    // The repaired copies are on the disk: without the fault, after a
    // restart (cache empty), every block reads right with no new repair.
    restart_with(&mut c, victim, "");
    assert!(read(&c, obj, data.len()).unwrap() == data);
    assert_eq!(c.log(victim).matches("block repaired from its group").count(), 3);
    // A multi-block read over disk errors (run reads and block reads
    // alike) still returns the right bytes.
    restart_with(&mut c, victim, "store::pread=3*return(eio)");
    assert!(read(&c, obj, data.len()).expect("a multi-block read over three disk errors") == data, "wrong bytes");
    assert!(c.is_running(victim), "{}", c.log(victim));
    c.must_scrub_clean();
}

#[test]
fn a_disk_that_keeps_failing_reads_stops_its_iom_and_the_data_stays_readable() {
    let _g = serial();
    let mut c = cluster();
    c.set_tuning("disk_errors_before_stop", 4);
    c.start_all();
    let obj = ObjectId(778);
    let data = Rng(42).bytes(64 * BS);
    write(&c, obj, &data);
    let victim = common::Layout::new(5, BS as u32).unwrap().data_iom(obj, BlockNo(0)).0;
    restart_with(&mut c, victim, "store::pread=return(eio)");
    // Every read of its disk fails: the first are rebuilt from their
    // groups, the fourth stops the IOM, the rest come from its proxy.
    assert!(read(&c, obj, data.len()).expect("read with a failing disk") == data, "wrong bytes");
    let st = c.wait_exit(victim, Duration::from_secs(20)).expect("the failing IOM did not stop");
    assert_eq!(st.code(), Some(70), "{st}");
    assert!(c.log(victim).contains("replace the disk"), "{}", c.log(victim));
    wait_status(&c, "cluster: degraded", Duration::from_secs(15));
    assert!(read(&c, obj, data.len()).unwrap() == data, "wrong bytes from the proxy");
    // The disk "fixed": it restarts, rejoins, and the cluster is whole.
    c.env[victim as usize].clear();
    c.start(victim);
    wait_status(&c, "cluster: healthy", Duration::from_secs(60));
    c.must_scrub_clean();
    assert!(read(&c, obj, data.len()).unwrap() == data);
}

/// A failed write or sync of the block file or the journal stops the IOM
/// (exit 70); writers go on through its proxy, and nothing they were told
/// is written is lost.
#[test]
fn a_failed_disk_write_or_sync_stops_the_iom_and_loses_no_acknowledged_write() {
    let _g = serial();
    for point in ["store::pwrite", "store::fdatasync", "journal::write", "journal::fdatasync"] {
        let mut c = cluster();
        let victim = 2u32;
        c.env[victim as usize] = vec![("FAILPOINTS".into(), format!("{point}=20*off->return(eio)"))];
        c.start_all();
        wait_status(&c, "cluster: healthy", Duration::from_secs(30));
        let data = Rng(43).bytes(4 * 4 * BS);
        let objs: Vec<ObjectId> = (0..16).map(|i| ObjectId(900 + i)).collect();
        rt().block_on(async {
            let client = c.client().await;
            for o in &objs {
                let w = client.write(*o, 0, Bytes::from(data.clone()), Toughness::Durable);
                match tokio::time::timeout(Duration::from_secs(60), w).await {
                    Ok(r) => r.unwrap_or_else(|e| panic!("{point}: a write failed: {e}")),
                    Err(_) => panic!("{point}: a write hung"),
                }
            }
            client.close();
        });
        let st = c.wait_exit(victim, Duration::from_secs(20));
        assert_eq!(st.and_then(|s| s.code()), Some(70), "{point}: IOM {victim} did not stop:\n{}", c.log(victim));
        for o in &objs {
            assert!(read(&c, *o, data.len()).unwrap() == data, "{point}: object {o} lost or wrong");
        }
        c.env[victim as usize].clear();
        c.start(victim);
        wait_status(&c, "cluster: healthy", Duration::from_secs(60));
        c.must_scrub_clean();
        for o in &objs {
            assert!(read(&c, *o, data.len()).unwrap() == data, "{point}: object {o} wrong after the rejoin");
        }
        eprintln!("{point}: stopped with 70, nothing lost");
    }
}

/// A disk that takes longer than the failure timeout for one write stalls
/// its IOM like a silent one: it is declared down, its proxy takes the
/// writes, and it rejoins by itself once the disk answers again.
#[test]
fn a_disk_slower_than_the_failure_timeout_gets_its_iom_declared_down_and_writes_go_on() {
    slow_disk(0);
}

/// The same with several runtime threads: the IOM's event loop would go on
/// answering heartbeats while its writes wait for the disk; the slow-disk
/// watchdog (no disk read or write finished for a failure timeout while
/// one waits) makes it fall silent instead.
#[test]
fn a_slow_disk_is_declared_down_with_several_runtime_threads_too() {
    slow_disk(2);
}

fn slow_disk(threads: u64) {
    let _g = serial();
    let mut c = cluster();
    if threads > 0 {
        c.set_tuning("iom_threads", threads);
    }
    let victim = 2u32;
    // With several threads the watchdog waits a failure timeout before the
    // IOM falls silent, then the cluster waits one more: a longer stall.
    let stall = if threads > 0 { 9000 } else { 6000 };
    c.env[victim as usize] = vec![("FAILPOINTS".into(), format!("store::pwrite=40*off->1*sleep({stall})"))];
    c.start_all();
    wait_status(&c, "cluster: healthy", Duration::from_secs(30));
    let data = Rng(44).bytes(4 * 4 * BS);
    let objs: Vec<ObjectId> = (0..24).map(|i| ObjectId(1900 + i)).collect();
    let mut slowest = Duration::ZERO;
    rt().block_on(async {
        let client = c.client().await;
        for o in &objs {
            let t = Instant::now();
            let w = client.write(*o, 0, Bytes::from(data.clone()), Toughness::Durable);
            match tokio::time::timeout(Duration::from_secs(30), w).await {
                Ok(r) => r.unwrap_or_else(|e| panic!("a write failed: {e}")),
                Err(_) => panic!("a write hung behind the slow disk"),
            }
            slowest = slowest.max(t.elapsed());
        }
        client.close();
    });
    eprintln!("slowest write {slowest:?}");
    assert!(slowest < Duration::from_millis(stall), "a write waited for the slow disk ({slowest:?})");
    wait_status(&c, "cluster: healthy", Duration::from_secs(90));
    assert!(c.log(victim).contains("declared down by the cluster"), "{}", c.log(victim));
    if threads > 0 {
        assert!(c.log(victim).contains("disk has finished no operation"), "{}", c.log(victim));
    }
    c.must_scrub_clean();
    for o in &objs {
        assert!(read(&c, *o, data.len()).unwrap() == data, "object {o} lost or wrong");
    }
}

/// A map checkpoint whose write is held on the disk for three failure
/// timeouts (paused in the `checkpoint::write` failpoint, inside the
/// writer) does not hold up the IOM's event loop: its heartbeats go on, so
/// nobody declares it down and the epoch stays, and reads and writes of
/// its blocks are answered meanwhile, each well within a second. With the
/// checkpoint written on the event loop (one runtime thread, the default)
/// the loop would stall and the IOM would be declared down after 2 s.
#[test]
fn a_checkpoint_held_on_the_disk_does_not_stop_the_heartbeats() {
    let _g = serial();
    let mut c = cluster();
    c.set_tuning("checkpoint_mib", 1);
    let victim = 1u32;
    c.env[victim as usize] = vec![("FAILPOINTS".into(), "checkpoint::write=1*return(pause)".into())];
    c.start_all();
    wait_status(&c, "cluster: healthy", Duration::from_secs(30));
    let epoch = |c: &Cluster| {
        let (_, s) = status(c);
        s.lines().find(|l| l.starts_with("epoch ")).map(str::to_string).unwrap_or_else(|| panic!("no epoch in:\n{s}"))
    };
    let epoch0 = epoch(&c);
    let marker = c.dir.join(format!("iom-{victim}/failpoint-hit"));
    let layout = common::Layout::new(5, BS as u32).unwrap();
    // An object whose block 0 is on the victim, for the reads and writes
    // during the stall.
    let probe = (1..).map(ObjectId).find(|&o| layout.data_iom(o, BlockNo(0)).0 == victim).unwrap();
    let small = Rng(7).bytes(4096);
    rt().block_on(async {
        let client = c.client().await;
        // Small writes until the victim's journal passes 1 MiB and its
        // checkpoint starts (and pauses in its writer).
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut n = 0u64;
        while !marker.exists() {
            assert!(Instant::now() < deadline, "no checkpoint began after {n} writes:\n{}", c.log(victim));
            let writes = (0..64u64).map(|k| {
                let client = client.clone();
                let b = Bytes::from(small.clone());
                let obj = ObjectId(10_000 + (n + k) % 500);
                let off = ((n + k) / 500 % 64) * 4096;
                async move { client.write(obj, off, b, Toughness::Atomic).await }
            });
            for r in futures::future::join_all(writes).await {
                r.expect("write before the checkpoint");
            }
            n += 64;
        }
        // The checkpoint is held. For three failure timeouts, the victim
        // answers: a write and a read of its block, each timed.
        let held = Instant::now();
        let mut worst = Duration::ZERO;
        let mut rounds = 0;
        while held.elapsed() < Duration::from_secs(6) {
            let body = Rng(rounds).bytes(BS);
            let t = Instant::now();
            client.write(probe, 0, Bytes::from(body.clone()), Toughness::Atomic).await.expect("write while held");
            let got = client.read(probe, 0, BS).await.expect("read while held");
            worst = worst.max(t.elapsed());
            assert!(got == body, "wrong bytes while the checkpoint was held");
            rounds += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(marker.exists(), "the checkpoint was not held the whole time");
        assert!(worst < Duration::from_secs(1), "a write + read took {worst:?} while the checkpoint was held");
        assert!(rounds >= 20, "only {rounds} rounds in 6 s");
        client.close();
    });
    let (_, s) = status(&c);
    assert!(s.contains("cluster: healthy"), "not healthy while a checkpoint was held:\n{s}");
    assert_eq!(epoch(&c), epoch0, "the epoch moved (someone was declared down) while a checkpoint was held:\n{s}");
    std::fs::remove_file(&marker).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !c.log(victim).contains("checkpoint written") {
        assert!(Instant::now() < deadline, "the checkpoint did not finish once released:\n{}", c.log(victim));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(c.stop(victim), "IOM {victim} did not stop cleanly:\n{}", c.log(victim));
    c.start(victim);
    wait_status(&c, "cluster: healthy", Duration::from_secs(30));
    c.must_scrub_clean();
}
