//! Storage core end to end: five real `iom-server` processes on loopback,
//! the client library, real QUIC with mutual TLS.

use bytes::Bytes;
use common::{ObjectId, Toughness};
use integration::{serial, Cluster, Rng};
use std::sync::Arc;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// The final bytes of one block after a wave of concurrent writes must be
/// what some serial order of the writes touching it produces.
fn block_matches_some_order(before: &[u8], after: &[u8], writes: &[(usize, Vec<u8>)], lo: usize, hi: usize) -> bool {
    let touching: Vec<&(usize, Vec<u8>)> = writes.iter().filter(|(o, d)| *o < hi && o + d.len() > lo).collect();
    fn perms(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in perms(n - 1) {
            for i in 0..=p.len() {
                let mut q = p.clone();
                q.insert(i, n - 1);
                out.push(q);
            }
        }
        out
    }
    perms(touching.len()).into_iter().any(|order| {
        let mut m = before[lo..hi].to_vec();
        for i in order {
            let (o, d) = touching[i];
            for (k, b) in d.iter().enumerate() {
                let pos = o + k;
                if pos >= lo && pos < hi {
                    m[pos - lo] = *b;
                }
            }
        }
        m == after[lo..hi]
    })
}

#[test]
fn writes_match_a_reference_model_at_every_toughness_and_survive_restart() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let rt = rt();
    let bs = 65536usize;
    let size = 3 * 4 * bs + 12345; // three groups and a bit
    let mut models = Vec::new();
    rt.block_on(async {
        let client = c.client().await;
        for (k, t) in Toughness::ALL.into_iter().enumerate() {
            let obj = ObjectId(1000 + k as u64);
            let mut model = vec![0u8; size];
            let mut rng = Rng(0xfeed + k as u64);
            // sequential random-offset, partial-block writes (some crossing blocks and groups)
            for _ in 0..60 {
                let off = rng.below(size as u64 - 1) as usize;
                let len = 1 + rng.below((size - off).min(3 * bs) as u64) as usize;
                let data = rng.bytes(len);
                client.write(obj, off as u64, Bytes::from(data.clone()), t).await.unwrap();
                model[off..off + len].copy_from_slice(&data);
            }
            // sparse hole in a fresh object reads as zeros
            let got = client.read(obj, 0, size).await.unwrap();
            assert!(got[..] == model[..], "toughness {t}: read back differs from the model");
            // concurrent overlapping writes, in waves
            for wave in 0..8 {
                let before = client.read(obj, 0, size).await.unwrap().to_vec();
                let mut writes = Vec::new();
                for _ in 0..4 {
                    let base = (wave * 7919 * 13) % (size - 2 * bs);
                    let off = base + rng.below(bs as u64) as usize;
                    let len = 1 + rng.below(bs as u64 + 1000) as usize;
                    writes.push((off, rng.bytes(len)));
                }
                let futs = writes.iter().map(|(o, d)| {
                    let client = client.clone();
                    let d = Bytes::from(d.clone());
                    let o = *o as u64;
                    async move { client.write(obj, o, d, t).await }
                });
                futures::future::try_join_all(futs).await.unwrap();
                let after = client.read(obj, 0, size).await.unwrap().to_vec();
                for b in 0..size.div_ceil(bs) {
                    let (lo, hi) = (b * bs, ((b + 1) * bs).min(size));
                    assert!(
                        block_matches_some_order(&before, &after, &writes, lo, hi),
                        "toughness {t}, wave {wave}: block {b} is not any serial order of the concurrent writes"
                    );
                }
                model = after;
            }
            client.flush().await.unwrap();
            models.push((obj, model));
        }
        // reads of every kind of range
        let (obj, model) = &models[1];
        let mut rng = Rng(7);
        for _ in 0..50 {
            let off = rng.below(size as u64 + 1000) as usize;
            let len = rng.below(200_000) as usize;
            let got = client.read(*obj, off as u64, len).await.unwrap();
            let mut want = vec![0u8; len];
            for (i, w) in want.iter_mut().enumerate() {
                if off + i < model.len() {
                    *w = model[off + i];
                }
            }
            assert!(got[..] == want[..], "range read at {off}+{len} differs");
        }
        // far offsets (beyond 4 GiB) and holes
        let far = 5u64 << 30;
        client.write(ObjectId(2000), far, Bytes::from_static(b"far away"), Toughness::Durable).await.unwrap();
        assert_eq!(&client.read(ObjectId(2000), far - 3, 11).await.unwrap()[..], b"\0\0\0far away");
        assert!(client.read(ObjectId(2000), 1 << 20, 4096).await.unwrap().iter().all(|&b| b == 0));
        client.close();
    });
    c.must_scrub_clean();

    // Restart all five (clean SIGTERM): every byte is still there.
    assert!(c.stop_all(), "an IOM did not stop cleanly on SIGTERM");
    c.start_all();
    rt.block_on(async {
        let client = c.client().await;
        for (obj, model) in &models {
            let got = client.read(*obj, 0, size).await.unwrap();
            assert!(got[..] == model[..], "object {obj} differs after restart");
        }
        // and it keeps working after restart
        let (obj, model) = &models[2];
        client.write(*obj, 10, Bytes::from_static(b"again"), Toughness::Durable).await.unwrap();
        let got = client.read(*obj, 0, 20).await.unwrap();
        assert_eq!(&got[10..15], b"again");
        assert_eq!(got[..10], model[..10]);
        client.close();
    });
    c.must_scrub_clean();
}

#[test]
fn truncate_and_drop_keep_parity_consistent() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    rt().block_on(async {
        let client = c.client().await;
        let obj = ObjectId(77);
        let size = 10 * 65536 + 100;
        let data: Vec<u8> = Rng(3).bytes(size);
        client.write(obj, 0, Bytes::from(data.clone()), Toughness::Atomic).await.unwrap();
        client.truncate(obj, size as u64, 70000, Toughness::Atomic).await.unwrap();
        let got = client.read(obj, 0, size).await.unwrap();
        assert_eq!(got[..70000], data[..70000]);
        assert!(got[70000..].iter().all(|&b| b == 0), "bytes past a truncate must read as zeros");
        // extend again after the truncate: old bytes must not come back
        client.write(obj, 9 * 65536, Bytes::from_static(b"x"), Toughness::Atomic).await.unwrap();
        let got = client.read(obj, 0, size).await.unwrap();
        assert!(got[70000..9 * 65536].iter().all(|&b| b == 0));
        client.drop_object(ObjectId(77), common::GroupNo(0)).await.unwrap();
        assert!(client.read(obj, 0, size).await.unwrap().iter().all(|&b| b == 0));
        let o2 = ObjectId(78);
        client.write(o2, 0, Bytes::from(data.clone()), Toughness::Fast).await.unwrap();
        client.flush().await.unwrap();
        client.close();
    });
    c.must_scrub_clean();
}

#[test]
fn a_client_without_a_cluster_certificate_is_refused() {
    let _g = serial();
    let mut c = Cluster::init(3);
    c.start(0);
    let cfg = common::config::ClusterConfig::load(&c.dir).unwrap();
    let addr: std::net::SocketAddr = cfg.ioms[0].addr.parse().unwrap();
    let ca = net::pki::load_certs(&c.dir.join("ca.pem")).unwrap();
    rt().block_on(async {
        // 1. no client certificate at all
        let cc = net::tls::anonymous_client_config(&ca).unwrap();
        let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let r = async {
            let conn = ep.connect_with(cc, addr, "iom-0")?.await?;
            let (mut s, mut r) = conn.open_bi().await?;
            s.write_all(b"hello").await?;
            s.finish()?;
            let v = r.read_to_end(1024).await?;
            anyhow::Ok(v)
        }
        .await;
        assert!(r.is_err(), "a client without certificate got an answer: {r:?}");

        // 2. a certificate from another cluster's CA
        let other = Cluster::init(3);
        let ident = net::tls::Identity::load_client(&common::config::ClusterPaths::new(&other.dir)).unwrap();
        let mixed = net::tls::Identity { certs: ident.certs, key: ident.key, ca: ca.clone() };
        let cc = net::tls::client_config(&mixed, common::config::TransportProfile::Loopback).unwrap();
        let r = async {
            let conn = ep.connect_with(cc, addr, "iom-0")?.await?;
            let (mut s, mut r) = conn.open_bi().await?;
            s.write_all(b"hello").await?;
            s.finish()?;
            let v = r.read_to_end(1024).await?;
            anyhow::Ok(v)
        }
        .await;
        assert!(r.is_err(), "a client with a foreign certificate got an answer: {r:?}");
    });
    assert!(c.is_running(0), "the IOM died after refusing strangers");
    assert!(c.log(0).contains("refused connection"), "no log line for the refused peer:\n{}", c.log(0));
}

#[test]
fn garbage_messages_end_their_stream_and_the_server_keeps_serving() {
    let _g = serial();
    let mut c = Cluster::init(3);
    c.start_all();
    let cfg = common::config::ClusterConfig::load(&c.dir).unwrap();
    rt().block_on(async {
        let ident = net::tls::Identity::load_client(&common::config::ClusterPaths::new(&c.dir)).unwrap();
        let cc = net::tls::client_config(&ident, cfg.transport).unwrap();
        let ep = net::tls::make_endpoint("127.0.0.1:0".parse().unwrap(), None, cfg.transport).unwrap();
        let conn = ep.connect_with(cc, cfg.ioms[1].addr.parse().unwrap(), "iom-1").unwrap().await.unwrap();
        let cases: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            vec![0xff; 64],
            {
                // a frame claiming a 2 GiB header
                let mut v = (2u32 << 30).to_le_bytes().to_vec();
                v.extend_from_slice(&0u32.to_le_bytes());
                v
            },
            {
                // a well-framed header that does not decode
                let mut v = 5u32.to_le_bytes().to_vec();
                v.extend_from_slice(&0u32.to_le_bytes());
                v.extend_from_slice(&[9, 9, 9, 9, 9]);
                v
            },
            vec![],
        ];
        for garbage in cases {
            let (mut s, mut r) = conn.open_bi().await.unwrap();
            let _ = s.write_all(&garbage).await;
            let _ = s.finish();
            let reply = r.read_to_end(1 << 20).await;
            if let Ok(bytes) = reply {
                if !bytes.is_empty() {
                    let body = &bytes[8..];
                    let rep: common::wire::Reply = common::codec::decode(body).unwrap();
                    assert!(matches!(rep, common::wire::Reply::Error(_)), "garbage got a non-error reply {rep:?}");
                }
            }
        }
        // The server still serves proper clients.
        let client = c.client().await;
        client.write(ObjectId(5), 0, Bytes::from_static(b"still here"), Toughness::Durable).await.unwrap();
        assert_eq!(&client.read(ObjectId(5), 0, 10).await.unwrap()[..], b"still here");
        // A multi-block write whose pieces do not add up to its payload is refused.
        let piece = |block, len| common::wire::WritePiece {
            key: common::BlockKey { object: ObjectId(6), block: common::BlockNo(block) },
            offset: 0,
            len,
            group_hint: 1,
        };
        let route = common::wire::Route { epoch: client.map().epoch, target: common::IomId(1) };
        for (pieces, payload) in [(vec![piece(0, 10), piece(3, 10)], 15usize), (vec![piece(0, 0), piece(3, 5)], 5)] {
            let req = common::wire::Request::Data(common::wire::DataReq::WriteMany {
                route,
                pieces,
                toughness: Toughness::Atomic,
            });
            let r = client.call_iom(common::IomId(1), &req, Bytes::from(vec![1u8; payload])).await;
            assert!(r.is_err(), "a bad multi-block write was accepted: {r:?}");
        }
        client.close();
    });
    for i in 0..3 {
        assert!(c.is_running(i), "IOM {i} died after garbage");
    }
}

#[test]
fn cli_errors_name_the_problem() {
    let _g = serial();
    let c = Cluster::init(3);
    let run = |args: &[&str]| {
        let o = std::process::Command::new(integration::bin("iom-server")).args(args).output().unwrap();
        (o.status.success(), String::from_utf8_lossy(&o.stderr).to_string())
    };
    let dir = c.dir.to_str().unwrap();
    // missing config
    let (ok, e) = run(&["--dir", "/nonexistent/cluster", "--id", "0"]);
    assert!(!ok && e.contains("no cluster config"), "{e}");
    // unknown IOM id
    let (ok, e) = run(&["--dir", dir, "--id", "9"]);
    assert!(!ok && e.contains("IOM 9"), "{e}");
    // port in use
    let cfg = common::config::ClusterConfig::load(&c.dir).unwrap();
    let hog = std::net::UdpSocket::bind(&cfg.ioms[0].addr).unwrap();
    let (ok, e) = run(&["--dir", dir, "--id", "0"]);
    assert!(!ok && e.contains("in use"), "{e}");
    drop(hog);
    // a cluster directory of another format version
    let path = c.dir.join("cluster.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("format_version = 1", "format_version = 2")).unwrap();
    let (ok, e) = run(&["--dir", dir, "--id", "0"]);
    assert!(!ok && e.contains("format version 2"), "{e}");
    // tuning out of range (a zero heartbeat was accepted once)
    std::fs::write(&path, text.replace("heartbeat_ms = 100", "heartbeat_ms = 0")).unwrap();
    let (ok, e) = run(&["--dir", dir, "--id", "0"]);
    assert!(!ok && e.contains("tuning.heartbeat_ms 0 is out of range"), "{e}");
    // an unresolvable IOM address is named as such by the client
    std::fs::write(&path, text.replacen(&cfg.ioms[0].addr, "no-such-host.invalid:7000", 1)).unwrap();
    let out = c.iomfs(&["stats"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("the host does not resolve"), "{e}");
    std::fs::write(&path, &text).unwrap();
    // sizes too large for 64 bits are refused, not wrapped
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(integration::bin("iomfs"))
        .args(["init", "--dir", &tmp.path().join("c").to_string_lossy(), "--block-size", "17179869184G"])
        .output()
        .unwrap();
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("too large"), "{e}");
    // a broken config
    std::fs::write(&path, "this is [not toml").unwrap();
    let (ok, e) = run(&["--dir", dir, "--id", "0"]);
    assert!(!ok && e.contains("bad cluster config"), "{e}");
    // init refuses to overwrite
    let out = c.iomfs(&["init"]);
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("refusing to overwrite") || e.contains("already"), "{e}");
    let _ = Arc::new(());
}

/// A version that is gone (here: its object was dropped) is answered at
/// once; the client library must not resend the same request until its
/// give-up time (it did: 60 s, which stalled any scrub that raced a delete).
#[test]
fn a_read_of_a_version_that_is_gone_fails_at_once() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    rt().block_on(async {
        let client = c.client().await;
        let obj = ObjectId(91);
        client.write(obj, 0, Bytes::from(Rng(5).bytes(65536)), Toughness::Atomic).await.unwrap();
        client.drop_object(obj, common::GroupNo(0)).await.unwrap();
        let layout = common::Layout::new(5, 65536).unwrap();
        let key = common::BlockKey { object: obj, block: common::BlockNo(0) };
        let role = layout.data_iom(obj, key.block);
        let t = std::time::Instant::now();
        let r = client
            .call_role(
                role,
                |route| {
                    common::wire::Request::Data(common::wire::DataReq::ReadVersion {
                        route,
                        key,
                        version: common::Version(1),
                    })
                },
                Bytes::new(),
            )
            .await;
        let e = r.expect_err("a dropped block's version was read");
        assert_eq!(e.code(), Some(common::wire::ErrorCode::VersionGone), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(3), "answered after {:?}", t.elapsed());
        client.close();
    });
}

#[test]
fn a_damaged_block_is_named_by_scrub_and_rebuilt_from_its_group() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let layout = common::Layout::new(5, 65536).unwrap();
    let a = ObjectId(4242);
    let victim = layout.data_iom(a, common::BlockNo(0));
    // Three one-block objects whose block lives on the victim: one healed
    // by a read, one by a write over part of it, one by `scrub --repair`.
    let objs: Vec<ObjectId> =
        (4242..).map(ObjectId).filter(|&o| layout.data_iom(o, common::BlockNo(0)) == victim).take(3).collect();
    let mut data: Vec<Vec<u8>> = (0..3).map(|i| Rng(11 + i).bytes(65536)).collect();
    rt().block_on(async {
        let client = c.client().await;
        for (o, d) in objs.iter().zip(&data) {
            client.write(*o, 0, Bytes::from(d.clone()), Toughness::Durable).await.unwrap();
        }
        client.close();
    });
    assert!(c.stop(victim.0));
    // Flip bytes in every slot of the victim's block file (past the header slot).
    let path = c.dir.join(format!("iom-{}/blocks.dat", victim.0));
    let mut f = std::fs::read(&path).unwrap();
    for b in f.iter_mut().skip(65536) {
        *b ^= 0x5a;
    }
    std::fs::write(&path, f).unwrap();
    c.start(victim.0);
    // Scrub reads without repairing: it names every damaged block.
    let out = c.iomfs(&["scrub"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(!out.status.success(), "scrub passed over a damaged block:\n{text}");
    for o in &objs {
        assert!(
            text.contains(&format!("object {} group 0 IOM {}", o.0, victim.0)),
            "scrub did not name object, group and IOM:\n{text}"
        );
    }
    rt().block_on(async {
        let client = c.client().await;
        let got = client.read(objs[0], 0, 65536).await.expect("a damaged block is rebuilt, not an error");
        assert!(got[..] == data[0][..], "a damaged block was returned as data");
        client.write(objs[1], 100, Bytes::from_static(b"0123456789"), Toughness::Durable).await.unwrap();
        data[1][100..110].copy_from_slice(b"0123456789");
        client.close();
    });
    assert!(c.log(victim.0).contains("block repaired from its group"), "{}", c.log(victim.0));
    let out = c.iomfs(&["scrub", "--repair"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "scrub --repair left problems:\n{text}");
    assert!(text.contains(&format!("repaired: object {} group 0 IOM {}", objs[2].0, victim.0)), "{text}");
    // The repairs are on the disk, not only in the cache: restart and check.
    assert!(c.stop(victim.0));
    c.start(victim.0);
    c.must_scrub_clean();
    rt().block_on(async {
        let client = c.client().await;
        for (o, d) in objs.iter().zip(&data) {
            assert!(client.read(*o, 0, 65536).await.unwrap()[..] == d[..], "object {o} wrong after repair");
        }
        client.close();
    });
}

#[test]
fn a_damaged_parity_block_is_recomputed_when_a_write_needs_it() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let obj = ObjectId(4343);
    let layout = common::Layout::new(5, 65536).unwrap();
    let p = layout.parity_iom(obj, common::GroupNo(0)).0;
    // One full group: four data blocks on the other IOMs, its parity on `p`.
    let mut data: Vec<u8> = Rng(12).bytes(4 * 65536);
    rt().block_on(async {
        let client = c.client().await;
        client.write(obj, 0, Bytes::from(data.clone()), Toughness::Durable).await.unwrap();
        client.close();
    });
    assert!(c.stop(p));
    // `p` holds only this group's parity: damage every slot past the header.
    let path = c.dir.join(format!("iom-{p}/blocks.dat"));
    let mut f = std::fs::read(&path).unwrap();
    for b in f.iter_mut().skip(65536) {
        *b ^= 0x5a;
    }
    std::fs::write(&path, f).unwrap();
    c.start(p);
    let new: Vec<u8> = Rng(13).bytes(65536);
    data[..65536].copy_from_slice(&new);
    rt().block_on(async {
        let client = c.client().await;
        // b3 cannot read the old parity: the write must still finish (the
        // parity recomputed from the data), not wait for ever.
        let w = client.write(obj, 0, Bytes::from(new.clone()), Toughness::Durable);
        match tokio::time::timeout(std::time::Duration::from_secs(30), w).await {
            Ok(r) => r.expect("write over a damaged parity"),
            Err(_) => panic!("a write whose group's parity is damaged did not finish in 30 s:\n{}", c.log(p)),
        }
        client.close();
    });
    assert!(c.log(p).contains("parity recomputed"), "no repair logged:\n{}", c.log(p));
    c.must_scrub_clean();
    // The parity is right: with block 1's IOM gone its bytes come from it.
    let d1 = layout.data_iom(obj, common::BlockNo(1));
    c.kill(d1.0);
    rt().block_on(async {
        let client = c.client().await;
        let got = client.read(obj, 0, 4 * 65536).await.expect("degraded read");
        assert!(got[..] == data[..], "a degraded read over the recomputed parity returned wrong bytes");
        client.close();
    });
}

/// `iomfs cache drop` empties every IOM's block cache (`iomfs stats`
/// shows none left), exits 0, and what was cached reads back the same from
/// the disks, a cache miss each.
#[test]
fn cache_drop_empties_every_iom_cache_and_reads_come_from_the_disks() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let rt = rt();
    let client = rt.block_on(c.client());
    let data = Bytes::from(Rng(90).bytes(4 << 20));
    let object = ObjectId(1 << 52);
    rt.block_on(client.write(object, 0, data.clone(), Toughness::Atomic)).unwrap();
    let stats = |rt: &tokio::runtime::Runtime| rt.block_on(fs_client::bench::stats(&client));
    let cached: u64 = stats(&rt).iter().map(|s| s.cache_bytes).sum();
    assert!(cached >= 4 << 20, "a 4 MiB write left {cached} bytes in the IOMs' caches");
    let out = c.iomfs(&["cache", "drop"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "iomfs cache drop failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    for i in 0..5 {
        assert!(text.contains(&format!("IOM {i}: cache dropped")), "{text}");
    }
    let after = stats(&rt);
    assert_eq!(after.len(), 5);
    assert!(after.iter().all(|s| s.cache_bytes == 0), "cache left after the drop: {after:?}");
    let misses: u64 = after.iter().map(|s| s.cache_misses).sum();
    let got = rt.block_on(client.read(object, 0, data.len())).unwrap();
    assert!(got == data, "the data read back after the drop differs");
    let misses_after: u64 = stats(&rt).iter().map(|s| s.cache_misses).sum();
    assert!(
        misses_after >= misses + 64,
        "64 blocks read after the drop but only {} cache misses",
        misses_after - misses
    );
    client.close();
}

/// An IOM killed and restarted at once (a crash and its supervisor's
/// restart) is noticed by the connections its previous run held at their
/// next packet: its endpoint answers them with a stateless reset whose key
/// it derives from its private key, so a client's read and a data IOM's
/// parity update go on at once. Before, both waited for QUIC's 5 s idle
/// timeout (the reset key was random per run, so peers ignored it).
#[test]
fn a_restarted_iom_is_noticed_at_once_by_the_connections_of_its_previous_run() {
    let _g = serial();
    let mut c = Cluster::init(3);
    // A restart, not a failover: no failure detection in the way.
    c.set_tuning("failure_timeout_ms", 600_000);
    c.start_all();
    let layout = common::Layout::new(3, 65536).unwrap();
    let bs = 65536u64;
    // Block 0's parity is on IOM 0; block `own` is stored on IOM 0.
    let obj =
        (1..10_000).map(ObjectId).find(|&o| layout.parity_iom(o, common::GroupNo(0)) == common::IomId(0)).unwrap();
    let own = (0..64).find(|&b| layout.data_iom(obj, common::BlockNo(b)) == common::IomId(0)).unwrap();
    let rt = rt();
    let client = rt.block_on(async {
        let client = c.client().await;
        client.write(obj, 0, Bytes::from(Rng(1).bytes(65536)), Toughness::Durable).await.unwrap();
        client.write(obj, own * bs, Bytes::from(Rng(2).bytes(65536)), Toughness::Durable).await.unwrap();
        client
    });
    c.kill(0);
    c.start(0);
    rt.block_on(async {
        let t = std::time::Instant::now();
        let got = tokio::time::timeout(std::time::Duration::from_secs(30), client.read(obj, own * bs, 65536))
            .await
            .expect("read never answered")
            .unwrap();
        assert_eq!(&got[..], &Rng(2).bytes(65536)[..]);
        let read = t.elapsed();
        let t = std::time::Instant::now();
        let new = Rng(3).bytes(65536);
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            client.write(obj, 0, Bytes::from(new.clone()), Toughness::Atomic),
        )
        .await
        .expect("write never answered")
        .unwrap();
        let write = t.elapsed();
        assert!(
            read < std::time::Duration::from_millis(2500) && write < std::time::Duration::from_millis(2500),
            "after IOM 0 restarted, a read from it took {read:?} and a write whose parity it holds {write:?}"
        );
        assert_eq!(&client.read(obj, 0, 65536).await.unwrap()[..], &new[..]);
        client.close();
    });
    c.must_scrub_clean();
}

/// A file deleted while one IOM still holds a write on it open: that IOM's
/// drop waits for the write (up to a minute) while the others have dropped
/// their parts. A scrub meanwhile sets the object aside instead of
/// reporting the difference (it reported "block 0 is at version 1 on IOM …
/// but parity covers version 0", and a scrub right after a delete in a
/// test or a cron job turned red), and is clean once the drop is done.
#[test]
fn a_scrub_sets_aside_an_object_whose_drop_is_under_way() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.server_bin = integration::bin("iom-server-failpoints");
    // The one block's data IOM stops after a11 (its client answered, its
    // transaction open); the other IOMs never write a data block here.
    for i in 0..5 {
        c.env[i] = vec![("FAILPOINTS".into(), "write::after-a11=1*return(pause)".into())];
    }
    c.start_all();
    let m = c.mount("mnt", &[]);
    std::fs::write(m.join("f"), Rng(41).bytes(65536)).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let paused = loop {
        if let Some(i) = (0..5).find(|i| c.dir.join(format!("iom-{i}/failpoint-hit")).exists()) {
            break i;
        }
        assert!(std::time::Instant::now() < deadline, "no write reached its crash point");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    std::fs::remove_file(m.join("f")).unwrap();
    // Garbage collection runs every namespace tick; the other IOMs drop at once.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let out = c.must_scrub_clean();
    assert!(out.contains("set aside"), "the drop under way on IOM {paused} was not seen:\n{out}");
    std::fs::remove_file(c.dir.join(format!("iom-{paused}/failpoint-hit"))).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let out = c.must_scrub_clean();
        if !out.contains("set aside") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the drop never finished:\n{out}");
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// Block versions held by every IOM of `c` (5 IOMs), by block number of `obj`.
async fn versions(client: &fs_client::ClusterClient, obj: ObjectId) -> std::collections::HashMap<u64, u64> {
    use common::wire::{DataReq, DataResp, Reply, Request};
    let mut out = std::collections::HashMap::new();
    for i in 0..5 {
        let req = Request::Data(DataReq::ListBlocks { after: None, limit: 100_000 });
        let (r, _) = client.call_iom(common::IomId(i), &req, Bytes::new()).await.unwrap();
        let Reply::Data(DataResp::Blocks(blocks)) = r else { panic!("listing of IOM {i}: {r:?}") };
        out.extend(blocks.into_iter().filter(|b| b.key.object == obj).map(|b| (b.key.block.0, b.version.0)));
    }
    out
}

/// Scattered runs over `[0, size)`: sorted, not overlapping, of any length
/// and alignment, several in most blocks, some crossing block boundaries.
fn scattered(rng: &mut Rng, size: usize) -> Vec<(u64, Bytes)> {
    let mut runs = Vec::new();
    let mut at = rng.below(5000) as usize;
    while at < size {
        let len = (1 + rng.below(9000) as usize).min(size - at);
        runs.push((at as u64, Bytes::from(rng.bytes(len))));
        at += len + 1 + rng.below(12_000) as usize;
    }
    runs
}

/// A `buffered` flush sends the scattered runs it holds as one write
/// (`ClusterClient::write_runs`): the pieces of one block reach its data
/// IOM in one request and are written there as one new version of the
/// block, over blocks present and absent, and by a stand-in for a failed
/// IOM too; the bytes, the parity and the rebuild stay right.
#[test]
fn the_pieces_one_write_sends_to_a_block_become_one_version_of_it_there_and_at_a_stand_in() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let rt = rt();
    let bs = 65536usize;
    let size = 8 * 4 * bs;
    let obj = ObjectId(3000);
    let mut model = vec![0u8; size];
    let mut rng = Rng(0x5ca7);
    let client = rt.block_on(async {
        let client = c.client().await;
        // Every other block present before the runs come.
        for b in (0..size / bs).step_by(2) {
            let d = rng.bytes(bs - 100 * (b % 3));
            client.write(obj, (b * bs) as u64, Bytes::from(d.clone()), Toughness::Atomic).await.unwrap();
            model[b * bs..b * bs + d.len()].copy_from_slice(&d);
        }
        let before = versions(&client, obj).await;
        let runs = scattered(&mut rng, size);
        let pieces = pieces_and_model(&runs, &mut model);
        assert!(pieces.values().filter(|&&n| n > 1).count() > 20, "the runs must put several pieces in blocks");
        client.write_runs(obj, &runs, Toughness::Atomic, u64::MAX).await.unwrap();
        one_version_more(&before, &versions(&client, obj).await, &pieces, "");
        assert!(client.read(obj, 0, size).await.unwrap()[..] == model[..], "read back differs from the model");
        client
    });
    c.must_scrub_clean();

    // IOM 2 down: its stand-in merges the pieces of its blocks too (the
    // versions it wrote are those IOM 2 is rebuilt at).
    let before = rt.block_on(versions(&client, obj));
    c.kill(2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !String::from_utf8_lossy(&c.iomfs(&["status"]).stdout).contains("down (proxied") {
        assert!(std::time::Instant::now() < deadline, "IOM 2 never declared down");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let pieces = rt.block_on(async {
        client.refresh_map().await;
        let runs = scattered(&mut rng, size);
        let pieces = pieces_and_model(&runs, &mut model);
        client.write_runs(obj, &runs, Toughness::Atomic, u64::MAX).await.unwrap();
        assert!(client.read(obj, 0, size).await.unwrap()[..] == model[..], "degraded read back differs");
        pieces
    });
    c.start(2);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !c.iomfs(&["status"]).status.success() {
        assert!(std::time::Instant::now() < deadline, "IOM 2 never came back");
        std::thread::sleep(std::time::Duration::from_millis(250));
    }
    rt.block_on(async {
        assert!(client.read(obj, 0, size).await.unwrap()[..] == model[..], "read back after the rebuild differs");
        one_version_more(&before, &versions(&client, obj).await, &pieces, " (IOM 2's through its stand-in)");
        client.close();
    });
    c.must_scrub_clean();
}

/// How many pieces of `runs` each 64 KiB block gets; `model` updated.
fn pieces_and_model(runs: &[(u64, Bytes)], model: &mut [u8]) -> std::collections::HashMap<u64, u32> {
    let bs = 65536;
    let mut pieces = std::collections::HashMap::new();
    for (o, d) in runs {
        for b in *o as usize / bs..=(*o as usize + d.len() - 1) / bs {
            *pieces.entry(b as u64).or_default() += 1;
        }
        model[*o as usize..*o as usize + d.len()].copy_from_slice(d);
    }
    pieces
}

/// Every block the write's pieces touched went up exactly one version.
fn one_version_more(
    before: &std::collections::HashMap<u64, u64>,
    after: &std::collections::HashMap<u64, u64>,
    pieces: &std::collections::HashMap<u64, u32>,
    what: &str,
) {
    for (b, n) in pieces {
        let was = before.get(b).copied().unwrap_or(0);
        assert_eq!(after.get(b).copied(), Some(was + 1), "block {b}{what}, written by {n} pieces of one write");
    }
}
