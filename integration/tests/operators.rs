//! What operators run iomfs with (issue 16): the Prometheus endpoints of
//! the IOMs and of a mount, and the Grafana dashboard that reads them.

use integration::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::process::Command;
use std::time::Duration;

/// A first port of `n` consecutive TCP ports free on 127.0.0.1 now.
fn free_ports(n: u16) -> u16 {
    let mut rng = Rng(std::process::id() as u64 ^ 0x5eed);
    loop {
        let base = 20000 + rng.below(40000) as u16;
        let held: Vec<_> = (0..n).map_while(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).ok()).collect();
        if held.len() == n as usize {
            return base;
        }
    }
}

/// `GET /metrics` from `addr`: the body of a 200 answer.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to metrics at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "metrics at {addr} answered {head}");
    body.to_string()
}

/// Names of the series in a scrape (`name{labels} value` lines).
fn names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
        .collect()
}

/// Sum of the values of series `name` whose labels contain every one of `with`.
fn value(text: &str, name: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .map(|l| l.rsplit(' ').next().unwrap_or("0").parse::<f64>().expect("a number"))
        .sum()
}

#[test]
fn metrics_endpoints_count_the_traffic_and_serve_every_series_the_dashboard_reads() {
    let _g = serial();
    let base = free_ports(6);
    let mut c = Cluster::init_with(5, &["--metrics-port", &base.to_string()]);
    let cfg = std::fs::read_to_string(c.dir.join("cluster.toml")).expect("config");
    assert!(cfg.contains(&format!("metrics_addr = \"127.0.0.1:{}\"", base + 4)), "{cfg}");
    c.start_all();
    let client_addr = format!("127.0.0.1:{}", base + 5);
    let m = c.mount("m", &[&format!("metrics={client_addr}")]);

    let mut rng = Rng(7);
    let data = rng.bytes(4 << 20);
    std::fs::write(m.join("f"), &data).expect("write");
    assert!(std::fs::read(m.join("f")).expect("read") == data, "read back");
    assert_eq!(std::fs::metadata(m.join("missing")).expect_err("no such file").kind(), std::io::ErrorKind::NotFound);
    // The IOMs publish their gauges every second.
    std::thread::sleep(Duration::from_millis(2500));

    let client = scrape(&client_addr);
    let ioms: Vec<String> = (0..5).map(|i| scrape(&format!("127.0.0.1:{}", base + i))).collect();
    let all = ioms.iter().fold(client.clone(), |a, t| a + t);

    // What the mount counted.
    let mount_label = format!("mount=\"{}\"", m.display());
    assert!(value(&client, "iomfs_client_written_bytes_total", &[&mount_label]) >= data.len() as f64, "{client}");
    assert!(value(&client, "iomfs_client_read_bytes_total", &[]) >= data.len() as f64, "{client}");
    assert!(value(&client, "iomfs_client_fuse_request_duration_seconds_count", &["op=\"write\""]) >= 4.0);
    assert!(value(&client, "iomfs_client_rpc_duration_seconds_count", &["family=\"data\""]) >= 4.0);
    assert!(value(&client, "iomfs_client_rpc_errors_total", &["op=\"Lookup\"", "kind=\"answer\""]) >= 1.0);
    // What the IOMs counted: the file's bytes arrived at the data IOMs
    // (client writes only; parity deltas go over the parity channel).
    let received: f64 = ioms.iter().map(|t| value(t, "iomfs_iom_data_received_bytes_total", &[])).sum();
    assert!(received >= data.len() as f64, "IOMs received {received} bytes of data");
    assert!(value(&all, "iomfs_iom_request_errors_total", &["family=\"meta\"", "op=\"Lookup\""]) >= 1.0);
    for (i, t) in ioms.iter().enumerate() {
        let me = format!("iom=\"{i}\"");
        assert_eq!(value(t, "iomfs_iom_serving", &[&me]), 1.0, "IOM {i}:\n{t}");
        assert!(value(t, "iomfs_iom_epoch", &[&me]) >= 1.0);
        assert_eq!(value(t, "iomfs_cluster_health", &[]), 0.0, "IOM {i} sees the cluster healthy");
        assert_eq!(value(t, "iomfs_cluster_iom_state", &["state=\"up\""]), 5.0, "IOM {i} sees 5 IOMs up");
        assert!(value(t, "iomfs_iom_journal_records_total", &[]) > 0.0);
        assert!(value(t, "iomfs_iom_disk_bytes", &[]) > 0.0);
    }

    // Every series the dashboard's queries name exists.
    let dash = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/grafana-iomfs.json"))
        .expect("docs/grafana-iomfs.json");
    let mut wanted = BTreeSet::new();
    for (i, _) in dash.match_indices("iomfs_") {
        let name: String =
            dash[i..].chars().take_while(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || *ch == '_').collect();
        wanted.insert(name);
    }
    assert!(wanted.len() >= 25, "the dashboard names only {} series: {wanted:?}", wanted.len());
    let have = names(&all);
    let missing: Vec<_> = wanted.iter().filter(|n| !have.contains(*n)).collect();
    assert!(missing.is_empty(), "the dashboard reads series no endpoint serves: {missing:?}");
}

#[test]
fn a_metrics_address_in_use_fails_the_mount_with_the_fix_and_leaves_an_iom_serving() {
    let _g = serial();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").port();
    let mut c = Cluster::init(3);
    // IOM 0's endpoint cannot start: it says so and serves on.
    let p = c.dir.join("cluster.toml");
    let cfg = std::fs::read_to_string(&p).expect("config");
    let cfg = cfg.replacen("[[iom]]\nid = 0\n", &format!("[[iom]]\nid = 0\nmetrics_addr = \"127.0.0.1:{port}\"\n"), 1);
    assert!(cfg.contains("metrics_addr"), "{cfg}");
    std::fs::write(&p, cfg).expect("write config");
    c.start_all();
    let mnt = c.tmp.path().join("m");
    std::fs::create_dir_all(&mnt).expect("mount point");
    let out = Command::new(bin("iomfs"))
        .args(["mount", "--dir", c.dir.to_str().expect("utf8"), mnt.to_str().expect("utf8"), "--detach"])
        .args(["-o", &format!("metrics=127.0.0.1:{port}")])
        .output()
        .expect("run iomfs mount");
    c.track_mount(&mnt);
    let err = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "mounted although its metrics address is taken: {err}");
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("-o metrics="), "{err}");
    assert!(!is_mounted(&mnt));
    let out = Command::new(bin("iomfs"))
        .args(["mount", "--dir", c.dir.to_str().expect("utf8"), mnt.to_str().expect("utf8"), "--detach"])
        .args(["-o", "metrics=localhost"])
        .output()
        .expect("run iomfs mount");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not an IP address and port"), "{err}");
    // The cluster serves, IOM 0 included.
    let m = c.mount("m2", &[]);
    std::fs::write(m.join("f"), b"still serving").expect("write");
    assert_eq!(std::fs::read(m.join("f")).expect("read"), b"still serving");
    assert!(c.log(0).contains("no metrics endpoint"), "{}", c.log(0));
    drop(taken);
}
