//! The crash-point matrix: at every step a1–a14 (data IOM) and b1–b13
//! (parity IOM), the data IOM, the parity IOM, or both die (abort at the
//! failpoint, or SIGKILL while the other side is paused there). The dead
//! ones restart, recovery runs, and then: the block reads as exactly its old
//! or its new contents, scrub is clean, and an acknowledged write is kept.
//!
//! Needs `iom-server-failpoints` (built by scripts/test with the
//! `failpoints` feature) next to the other binaries.

use bytes::Bytes;
use common::{BlockNo, IomId, ObjectId, Toughness};
use integration::{bin, serial, Cluster};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    Data,
    Parity,
    Both,
}

const A_STEPS: [u32; 14] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14];
const B_STEPS: [u32; 13] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13];
const BS: usize = 65536;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..BS).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// An object whose block 0 lives on IOM 1 with its parity on IOM 0 (W = 3).
fn object() -> ObjectId {
    let l = common::Layout::new(3, BS as u32).unwrap();
    (1..10_000)
        .map(ObjectId)
        .find(|&o| l.parity_iom(o, common::GroupNo(0)) == IomId(0) && l.data_iom(o, BlockNo(0)) == IomId(1))
        .unwrap()
}

fn marker(c: &Cluster, i: u32) -> std::path::PathBuf {
    c.dir.join(format!("iom-{i}/failpoint-hit"))
}

fn wait_marker(c: &Cluster, i: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if marker(c, i).exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Runs one scenario; returns a description of what happened.
fn scenario(point: &str, step_owner: Who, who: Who, toughness: Toughness) -> String {
    scenario_with(point, step_owner, who, toughness, false, false)
}

/// With `power_loss`, the IOMs run in the power-loss test mode: a crash
/// loses every block and journal write since that IOM's last fdatasync.
/// With `stripe`, the write is group 0 whole (blocks 0 and 1, on IOMs 1
/// and 2) over absent blocks, as a client stripe: each block ends old
/// (zeros) or new, and all new if the write was acknowledged.
fn scenario_with(
    point: &str,
    step_owner: Who,
    who: Who,
    toughness: Toughness,
    power_loss: bool,
    stripe: bool,
) -> String {
    let (d, p) = (1u32, 0u32);
    let mut c = Cluster::init(3);
    let base: Vec<(String, String)> =
        if power_loss { vec![("IOMFS_TEST_POWER_LOSS".into(), "1".into())] } else { Vec::new() };
    for e in c.env.iter_mut() {
        *e = base.clone();
    }
    // Restart recovery only: no failure detection (failover has its own tests).
    c.set_tuning("failure_timeout_ms", 600_000);
    c.server_bin = bin("iom-server-failpoints");
    c.start_all();
    let obj = object();
    let (old, new) =
        if stripe { (vec![0u8; 2 * BS], [pattern(2), pattern(3)].concat()) } else { (pattern(1), pattern(2)) };
    let rt = runtime();
    rt.block_on(async {
        let client = c.client().await;
        if !stripe {
            client.write(obj, 0, Bytes::from(old.clone()), Toughness::Durable).await.unwrap();
            client.write(obj, BS as u64, Bytes::from(pattern(9)), Toughness::Durable).await.unwrap();
        }
        client.close();
    });
    // Let the old writes finish completely (a13/b13 run after the answer).
    rt.block_on(async {
        let client = c.client().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let stats = fs_client::bench::stats(&client).await;
            if stats.len() == 3 && stats.iter().all(|s| s.open_txs == 0 && s.open_parity_txs == 0) {
                break;
            }
            assert!(Instant::now() < deadline, "cluster never became quiet: {stats:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.close();
    });
    // Arm the failpoint on the IOM that runs the step.
    let owner = if step_owner == Who::Data { d } else { p };
    let other = if owner == d { p } else { d };
    let action = if who == step_owner || who == Who::Both { "1*return(abort)" } else { "1*return(pause)" };
    c.stop(owner);
    let _ = std::fs::remove_file(marker(&c, owner));
    c.env[owner as usize].push(("FAILPOINTS".into(), format!("{point}={action}")));
    c.start(owner);
    c.env[owner as usize] = base.clone();

    // The write, in the background.
    let dir = c.dir.clone();
    let newc = new.clone();
    let writer = std::thread::spawn(move || {
        let wrt = runtime();
        wrt.block_on(async {
            let client = fs_client::ClusterClient::connect(&dir).await.unwrap();
            let fresh_from = if stripe { 0 } else { u64::MAX };
            let w = client.write_from(obj, 0, Bytes::from(newc), toughness, fresh_from);
            let r = tokio::time::timeout(Duration::from_secs(20), w).await;
            client.close();
            matches!(r, Ok(Ok(())))
        })
    });
    let hit = wait_marker(&c, owner, Duration::from_secs(10));
    assert!(hit, "{point}: failpoint never hit");
    let mut acked = false;
    match (who, action) {
        (_, "1*return(pause)") => {
            // The other side dies while the step's owner is paused there.
            c.kill(other);
            std::fs::remove_file(marker(&c, owner)).unwrap();
        }
        _ => {
            assert!(c.wait_exit(owner, Duration::from_secs(10)).is_some(), "{point}: IOM {owner} did not abort");
            if who == Who::Both {
                c.kill(other);
            }
        }
    }
    // Was the write acknowledged before the crash? Give it a moment, then stop waiting.
    let deadline = Instant::now() + Duration::from_millis(400);
    while Instant::now() < deadline && !writer.is_finished() {
        std::thread::sleep(Duration::from_millis(10));
    }
    if writer.is_finished() {
        acked = writer.join().unwrap();
    }
    // Restart what died; recovery runs.
    for i in [d, p] {
        if !c.is_running(i) {
            c.start(i);
        }
    }
    let got = rt.block_on(async {
        let client = c.client().await;
        let mut r = None;
        for _ in 0..100 {
            match tokio::time::timeout(Duration::from_secs(5), client.read(obj, 0, old.len())).await {
                Ok(Ok(b)) => {
                    r = Some(b);
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        client.close();
        r
    });
    let got =
        got.unwrap_or_else(|| panic!("{point} ({who:?}): block unreadable after recovery\n{}\n{}", c.log(d), c.log(p)));
    let each = |a: &[u8], b: &[u8]| a.chunks(BS).zip(b.chunks(BS)).all(|(x, y)| x == y);
    let mixed = stripe && got.chunks(BS).enumerate().all(|(k, b)| each(b, &new[k * BS..]) || each(b, &old[k * BS..]));
    let which = if got[..] == new[..] {
        "new"
    } else if got[..] == old[..] {
        "old"
    } else if mixed {
        "one block new, one old"
    } else {
        panic!("{point} ({who:?}): block is neither old nor new after recovery\n{}\n{}", c.log(d), c.log(p));
    };
    if acked && toughness >= Toughness::Atomic {
        assert_eq!(
            which,
            "new",
            "{point} ({who:?}): a write acknowledged at {toughness} was lost\n{}\n{}",
            c.log(d),
            c.log(p)
        );
    }
    // Scrub: clean once recovery has resolved everything (retry while it works).
    let mut text = String::new();
    for _ in 0..40 {
        let out = c.iomfs(&["scrub"]);
        text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            // `writer` may still be blocked on a dead IOM: the write may have been retried after restart.
            return format!("{point} {who:?} {toughness}: {which}{}", if acked { " (acked)" } else { "" });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    panic!(
        "{point} ({who:?}): scrub not clean after recovery:\n{text}\n--- IOM {d}\n{}\n--- IOM {p}\n{}",
        c.log(d),
        c.log(p)
    );
}

fn matrix(steps: &[u32], prefix: &str, owner: Who) {
    let _g = serial();
    let mut results = Vec::new();
    for &s in steps {
        let point = format!("{prefix}{s}");
        for who in [Who::Data, Who::Parity, Who::Both] {
            results.push(scenario(&point, owner, who, Toughness::Atomic));
        }
    }
    eprintln!("{}", results.join("\n"));
}

#[test]
fn crash_matrix_data_steps_a1_to_a14() {
    matrix(&A_STEPS, "write::after-a", Who::Data);
}

#[test]
fn crash_matrix_parity_steps_b1_to_b13() {
    matrix(&B_STEPS, "parity::after-b", Who::Parity);
}

#[test]
fn durable_writes_survive_crashes_after_their_acknowledgement() {
    let _g = serial();
    for (point, owner) in
        [("write::after-a14", Who::Data), ("write::after-a13", Who::Data), ("parity::after-b13", Who::Parity)]
    {
        for who in [Who::Data, Who::Parity, Who::Both] {
            let r = scenario(point, owner, who, Toughness::Durable);
            eprintln!("{r}");
        }
    }
}

/// Power loss, not only process death: a sample of the matrix with both
/// IOMs in the power-loss test mode (every write since the last fdatasync
/// is gone when an IOM dies) and both dying. A `durable` write that was
/// acknowledged survives; every block reads old or new; scrub is clean.
/// The whole matrix this way: `IOMFS_POWER_LOSS_MATRIX=all cargo test
/// --release -p integration --test crash power_loss`.
#[test]
fn power_loss_at_a_sample_of_steps_keeps_durable_writes_and_consistency() {
    let _g = serial();
    let all = std::env::var("IOMFS_POWER_LOSS_MATRIX").is_ok_and(|v| v == "all");
    let sample_a: &[u32] = if all { &A_STEPS } else { &[5, 8, 11, 14] };
    let sample_b: &[u32] = if all { &B_STEPS } else { &[1, 4, 9, 12] };
    let mut results = Vec::new();
    for &s in sample_a {
        results.push(scenario_with(
            &format!("write::after-a{s}"),
            Who::Data,
            Who::Both,
            Toughness::Durable,
            true,
            false,
        ));
    }
    for &s in sample_b {
        results.push(scenario_with(
            &format!("parity::after-b{s}"),
            Who::Parity,
            Who::Both,
            Toughness::Durable,
            true,
            false,
        ));
    }
    eprintln!("{}", results.join("\n"));
}

/// Client stripes: the parity IOM dies when a reference arrives; both die
/// when the piece arrives; once the stripe's batch holds it, the data IOM
/// dies (the write was acknowledged) or the parity IOM does; both die
/// right after a data IOM sent its reference. Stripes change where a
/// delta comes from, not what is journaled, so recovery must end every
/// case old-or-new per block and consistent. (Five rows, not the twelve
/// of every side at every point, to keep the suite's time: each row is a
/// cluster start and a restart.)
#[test]
fn crash_matrix_client_stripes() {
    let _g = serial();
    let mut results = Vec::new();
    for (point, owner, who) in [
        ("stripe::after-reference", Who::Parity, Who::Parity),
        ("stripe::after-piece", Who::Parity, Who::Both),
        ("stripe::after-held", Who::Parity, Who::Data),
        ("stripe::after-held", Who::Parity, Who::Parity),
        ("write::after-a6", Who::Data, Who::Both),
    ] {
        results.push(scenario_with(point, owner, who, Toughness::Atomic, false, true));
    }
    eprintln!("{}", results.join("\n"));
}
