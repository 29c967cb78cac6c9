//! What operators run iomfs with (issue 16): the Prometheus endpoints of
//! the IOMs and of a mount, and the Grafana dashboard that reads them.

use integration::*;
use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

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
    // A scrub's result is kept by every IOM (the dashboard shows it).
    c.must_scrub_clean();
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
        assert_eq!(value(t, "iomfs_scrub_last_problems", &[]), 0.0, "IOM {i} keeps the clean scrub");
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

/// `iomfs status --json`, parsed.
fn status_json(c: &Cluster) -> (i32, serde_json::Value) {
    let out = c.iomfs(&["status", "--json"]);
    let code = out.status.code().unwrap_or(-1);
    let text = String::from_utf8_lossy(&out.stdout);
    let j: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {text}{}", String::from_utf8_lossy(&out.stderr)));
    (code, j)
}

/// Polls `status --json` until its exit code is `code` (20 s at most).
fn wait_status(c: &Cluster, code: i32) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (rc, j) = status_json(c);
        if rc == code {
            return j;
        }
        assert!(Instant::now() < deadline, "status stayed at exit {rc}, not {code}: {j:#}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn status_json_exit_codes_capacity_actions_and_the_last_scrub_follow_the_cluster() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let j = wait_status(&c, 0);
    assert_eq!(j["state"], "healthy", "{j:#}");
    assert_eq!(j["schema"], 1);
    let cap = &j["capacity"];
    assert!(cap["usable_bytes"].as_u64().unwrap_or(0) > 0, "{j:#}");
    assert!(cap["free_bytes"].as_u64() <= cap["usable_bytes"].as_u64(), "{j:#}");
    // Nothing to do, unless the test machine's own disk is nearly full.
    let nearfull = cap["nearfull"] == true;
    let actions: Vec<&str> = j["actions"].as_array().expect("actions").iter().filter_map(|a| a.as_str()).collect();
    assert!(actions.iter().all(|a| nearfull && a.starts_with("free space")), "{j:#}");
    for (i, iom) in j["ioms"].as_array().expect("ioms").iter().enumerate() {
        assert_eq!(iom["id"], i as u64);
        assert_eq!(iom["state"], "up", "{iom:#}");
        assert_eq!(iom["version"], env!("CARGO_PKG_VERSION"), "{iom:#}");
        assert_eq!(iom["errors"]["disk"], 0);
    }
    assert!(j["last_scrub"].is_null(), "{j:#}");
    // A scrub is recorded and shown.
    c.must_scrub_clean();
    let (_, j) = status_json(&c);
    assert_eq!(j["last_scrub"]["problems"], 0, "{j:#}");
    assert!(j["last_scrub"]["groups"].as_u64().is_some(), "{j:#}");
    let text = String::from_utf8_lossy(&c.iomfs(&["status"]).stdout).to_string();
    for want in ["capacity: ", "GiB usable", "last scrub: ", "cluster: healthy", "  v"] {
        assert!(text.contains(want), "no '{want}' in:\n{text}");
    }

    let out = c.iomfs(&["stats", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("stats --json");
    assert_eq!(v.as_array().map(|a| a.len()), Some(5), "{v:#}");
    assert!(v[4]["journal_records"].as_u64().is_some(), "{v:#}");

    // One IOM down: degraded, exit 1, and the action names the fix.
    c.kill(1);
    // First unreachable (the map still says up), then declared down.
    let deadline = Instant::now() + Duration::from_secs(20);
    let j = loop {
        let (rc, j) = status_json(&c);
        if j["ioms"][1]["state"] == "down" {
            assert_eq!(rc, 1, "{j:#}");
            break j;
        }
        assert!(Instant::now() < deadline, "IOM 1 not declared down: {j:#}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(j["state"], "degraded", "{j:#}");
    assert_eq!(j["ioms"][1]["state"], "down", "{j:#}");
    assert_eq!(j["ioms"][1]["proxy"], 2, "{j:#}");
    let actions = j["actions"].to_string();
    assert!(actions.contains("IOM 1 is down") && actions.contains("iomfs replace"), "{actions}");
    let text = String::from_utf8_lossy(&c.iomfs(&["status"]).stdout).to_string();
    assert!(text.contains("cluster: degraded") && text.contains("action: IOM 1 is down"), "{text}");

    // Two: stopped, exit 2.
    c.kill(3);
    let j = wait_status(&c, 2);
    assert_eq!(j["state"], "stopped", "{j:#}");
    assert!(j["actions"][0].as_str().unwrap_or("").contains("the cluster is stopped"), "{j:#}");

    // None answers: unreachable, exit 3.
    for i in [0, 2, 4] {
        c.kill(i);
    }
    let j = wait_status(&c, 3);
    assert_eq!(j["state"], "unreachable", "{j:#}");
    assert!(j["actions"][0].as_str().unwrap_or("").contains("no IOM answers"), "{j:#}");
    assert!(j["capacity"].is_null(), "{j:#}");
    let out = c.iomfs(&["stats"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(3) && err.contains("no IOM"), "{err}");
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn toughness_of(p: &std::path::Path) -> String {
    let out = Command::new("getfattr").args(["--only-values", "-n", "user.iomfs.toughness"]).arg(p).output();
    let out = out.expect("getfattr");
    assert!(out.status.success(), "getfattr {}: {}", p.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn mount_options_of(m: &std::path::Path) -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("/proc/mounts");
    let m = m.to_string_lossy().to_string();
    mounts.lines().find(|l| l.split(' ').nth(1) == Some(m.as_str())).map(|l| l.to_string()).unwrap_or_default()
}

/// `/sbin/mount.fuse.iomfs` pointing at the binary under test while it
/// lives (what `scripts/install` leaves in place): mount(8) runs helpers
/// from /sbin with a fixed PATH, so a test cannot point it elsewhere. An
/// installed helper is moved aside and put back.
struct SbinHelper {
    path: std::path::PathBuf,
    aside: Option<std::path::PathBuf>,
}

impl SbinHelper {
    fn install() -> SbinHelper {
        let path = std::path::PathBuf::from("/sbin/mount.fuse.iomfs");
        let aside = std::fs::symlink_metadata(&path).is_ok().then(|| {
            let a = path.with_extension(format!("iomfs.test-aside-{}", std::process::id()));
            std::fs::rename(&path, &a).expect("move the installed helper aside");
            a
        });
        std::os::unix::fs::symlink(bin("iomfs"), &path).expect("link /sbin/mount.fuse.iomfs");
        SbinHelper { path, aside }
    }
}

impl Drop for SbinHelper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        if let Some(a) = &self.aside {
            let _ = std::fs::rename(a, &self.path);
        }
    }
}

#[test]
fn mount_t_fuse_iomfs_an_fstab_line_and_the_mount_iomfs_helper_mount_the_cluster() {
    let _g = serial();
    let mut c = Cluster::init(3);
    c.start_all();
    let d = c.dir.to_string_lossy().to_string();
    let path = std::env::var("PATH").unwrap_or_default();
    let _helper = SbinHelper::install();

    // mount(8) → /sbin/mount.fuse.iomfs D MNT -o ...
    let m1 = c.tmp.path().join("m1");
    std::fs::create_dir_all(&m1).expect("mkdir");
    c.track_mount(&m1);
    run_ok(
        Command::new("mount")
            .env("PATH", &path)
            .args(["-t", "fuse.iomfs", &d])
            .arg(&m1)
            .args(["-o", "toughness=durable,_netdev,nosuid,nofail"]),
    );
    assert!(is_mounted(&m1), "mount -t fuse.iomfs returned with nothing mounted");
    std::fs::write(m1.join("a"), b"through mount(8)").expect("write");
    assert_eq!(toughness_of(&m1.join("a")), "durable");
    let opts = mount_options_of(&m1);
    assert!(opts.contains("fuse.iomfs") && opts.contains("nosuid"), "{opts}");
    let pid = mount_pid(&m1);
    run_ok(Command::new("umount").arg(&m1));
    assert!(!is_mounted(&m1));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        assert!(Instant::now() < deadline, "the client (pid {pid}) outlived umount");
        std::thread::sleep(Duration::from_millis(50));
    }

    // An fstab line, with fstab's and systemd's options beside iomfs's.
    let m2 = c.tmp.path().join("m2");
    std::fs::create_dir_all(&m2).expect("mkdir");
    c.track_mount(&m2);
    let fstab = c.tmp.path().join("fstab");
    std::fs::write(
        &fstab,
        format!(
            "# test fstab\n{d} {} fuse.iomfs noauto,nofail,_netdev,x-systemd.automount,toughness=fast 0 0\n",
            m2.display()
        ),
    )
    .expect("fstab");
    run_ok(Command::new("mount").env("PATH", &path).arg("-T").arg(&fstab).arg(&m2));
    assert!(is_mounted(&m2), "mount -T FSTAB MNT returned with nothing mounted");
    assert_eq!(std::fs::read(m2.join("a")).expect("read"), b"through mount(8)");
    std::fs::write(m2.join("b"), b"x").expect("write");
    assert_eq!(toughness_of(&m2.join("b")), "fast");
    run_ok(Command::new("umount").arg(&m2));

    // Called as mount.iomfs (what /sbin/mount.iomfs is after scripts/install).
    let helper = c.tmp.path().join("mount.iomfs");
    std::os::unix::fs::symlink(bin("iomfs"), &helper).expect("symlink");
    let m3 = c.tmp.path().join("m3");
    std::fs::create_dir_all(&m3).expect("mkdir");
    c.track_mount(&m3);
    run_ok(Command::new(&helper).arg(&d).arg(&m3).args(["-f", "-o", "ro"]));
    assert!(!is_mounted(&m3), "-f (fake) mounted");
    run_ok(Command::new(&helper).arg(&d).arg(&m3).args(["-n", "-o", "ro,defaults"]));
    assert!(is_mounted(&m3));
    assert_eq!(std::fs::read(m3.join("b")).expect("read"), b"x");
    let e = std::fs::write(m3.join("c"), b"no").expect_err("ro mount");
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    run_ok(Command::new("umount").arg(&m3));

    // A wrong option is named, and nothing is mounted.
    let out = Command::new("mount")
        .env("PATH", &path)
        .args(["-t", "fuse.iomfs", &d])
        .arg(&m3)
        .args(["-o", "toughnes=fast"])
        .output()
        .expect("mount");
    let err = String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && err.contains("unknown mount option 'toughnes'"), "{err}");
    assert!(!is_mounted(&m3));
}

#[test]
fn iom_server_tells_systemd_it_is_ready_only_once_it_serves_and_that_it_stops_on_sigterm() {
    let _g = serial();
    let mut c = Cluster::init(3);
    let sock_path = c.tmp.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).expect("notify socket");
    let mut buf = [0u8; 4096];
    // IOM 0 is declared down; started again it must rejoin (take its role
    // back from its proxy) before it serves: READY=1 only then.
    c.start_all();
    wait_status(&c, 0);
    c.kill(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_json(&c).1["ioms"][0]["state"] != "down" {
        assert!(Instant::now() < deadline, "IOM 0 not declared down");
        std::thread::sleep(Duration::from_millis(200));
    }
    c.env[0].push(("NOTIFY_SOCKET".into(), sock_path.to_string_lossy().into()));
    c.start(0);
    sock.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let n = sock.recv(&mut buf).expect("READY=1 within 30 s");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "READY=1"), "{msg}");
    let (_, j) = status_json(&c);
    assert_eq!(j["ioms"][0]["stats"]["serving"], true, "READY=1 came before IOM 0 serves: {j:#}");
    assert!(c.stop(0), "IOM 0 did not stop cleanly on SIGTERM");
    let n = sock.recv(&mut buf).expect("STOPPING=1 on SIGTERM");
    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(msg.lines().any(|l| l == "STOPPING=1"), "{msg}");

    // The units `iomfs install-units` writes pass systemd's own check.
    let out = c.tmp.path().join("units");
    let mnt = c.tmp.path().join("mnt");
    let o = run_ok(
        Command::new(bin("iomfs"))
            .args(["install-units", "--dir", &c.dir.to_string_lossy(), "--out", &out.to_string_lossy()])
            .args([
                "--bin-dir",
                &bin_dir().to_string_lossy(),
                "--mount",
                &mnt.to_string_lossy(),
                "-o",
                "toughness=durable",
            ]),
    );
    let service = std::fs::read_to_string(out.join("iom-server@.service")).expect("service unit");
    assert!(service.contains("Type=notify") && service.contains("--id %i"), "{service}");
    // Started only once the disks it needs are mounted: the cluster
    // directory for every IOM, each IOM's store in its own drop-in.
    let canon = std::fs::canonicalize(&c.dir).expect("cluster dir");
    assert!(service.contains(&format!("RequiresMountsFor={}\n", canon.display())), "{service}");
    for i in 0..c.width {
        let dropin = out.join(format!("iom-server@{i}.service.d/iomfs-dirs.conf"));
        let text = std::fs::read_to_string(&dropin).unwrap_or_else(|e| panic!("{}: {e}", dropin.display()));
        let want = format!("RequiresMountsFor={}\n", canon.join(format!("iom-{i}")).display());
        assert!(text.contains("[Unit]") && text.contains(&want), "{text}");
    }
    let mount_unit = std::fs::read_dir(&out)
        .expect("units")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "mount"))
        .unwrap_or_else(|| panic!("no .mount unit: {o}"));
    let text = std::fs::read_to_string(&mount_unit).expect("mount unit");
    assert!(text.contains("Type=fuse.iomfs") && text.contains("toughness=durable"), "{text}");
    assert!(text.contains(&format!("RequiresMountsFor={}\n", canon.display())), "{text}");
    if Command::new("systemd-analyze").arg("--version").output().is_ok_and(|o| o.status.success()) {
        let instance = out.join("iom-server@0.service");
        let mut with_dropin = std::fs::read_to_string(out.join("iom-server@.service")).expect("template");
        with_dropin
            .push_str(&std::fs::read_to_string(out.join("iom-server@0.service.d/iomfs-dirs.conf")).expect("drop-in"));
        std::fs::write(&instance, with_dropin).expect("instance");
        let v = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&instance)
            .arg(&mount_unit)
            .output()
            .expect("systemd-analyze");
        let err = String::from_utf8_lossy(&v.stderr).to_string();
        let ours: Vec<&str> = err.lines().filter(|l| l.contains("iom-server@") || l.contains(".mount")).collect();
        assert!(ours.is_empty(), "systemd-analyze verify: {err}");
    }
}

/// Stops an `iomfs local` cluster when dropped, even if the test failed.
struct LocalCluster(std::path::PathBuf);

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let _ = Command::new(bin("iomfs")).args(["local", "stop", "--dir"]).arg(&self.0).output();
    }
}

#[test]
fn logs_of_iom_and_mount_are_kept_across_restarts_and_named_in_their_files() {
    let _g = serial();
    let tmp = tempfile::Builder::new().prefix("iomfs-test-").tempdir_in(test_root()).expect("tempdir");
    let d = tmp.path().join("c");
    let m = tmp.path().join("m");
    std::fs::create_dir_all(&m).expect("mkdir");
    let _stop = LocalCluster(d.clone());
    let start = || {
        run_ok(
            Command::new(bin("iomfs"))
                .env("IOMFS_BIN_DIR", bin_dir())
                .args(["local", "--ioms", "3", "--detach", "--dir"])
                .arg(&d)
                .arg("--mount")
                .arg(&m),
        )
    };
    let stop = || run_ok(Command::new(bin("iomfs")).args(["local", "stop", "--dir"]).arg(&d));
    start();
    stop();
    start();
    stop();
    let iom_log = std::fs::read_to_string(d.join("iom-0/iom.log")).expect("iom log");
    assert_eq!(iom_log.matches(" serving iom=0").count(), 2, "both runs in the IOM's log:\n{iom_log}");
    let mount_log = std::fs::read_dir(&d)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("mount")))
        .expect("a mount log");
    let text = std::fs::read_to_string(&mount_log).expect("mount log");
    assert_eq!(text.matches(" mounted ").count(), 2, "both mounts in {}:\n{text}", mount_log.display());
}

#[test]
fn a_throttled_rebuild_reports_an_eta_that_comes_true_and_watch_into_a_pipe_prints_lines() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.set_tuning("rebuild_mib_s", 1);
    c.start_all();
    let m = c.mount("m", &[]);
    c.kill(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while status_json(&c).1["ioms"][2]["state"] != "down" {
        assert!(Instant::now() < deadline, "IOM 2 not declared down");
        std::thread::sleep(Duration::from_millis(200));
    }
    // About 8 MiB for IOM 2 to rebuild: some 8 s at 1 MiB/s.
    let data = Rng(3).bytes(32 << 20);
    std::fs::write(m.join("f"), &data).expect("write while IOM 2 is down");
    c.start(2);
    let started = Instant::now();
    let mut predicted = None;
    loop {
        let (_, j) = status_json(&c);
        let iom = &j["ioms"][2];
        if iom["state"] == "up" {
            break;
        }
        let r = &iom["rebuild"];
        let (done, total) = (r["done_blocks"].as_u64().unwrap_or(0), r["total_blocks"].as_u64().unwrap_or(0));
        // The ETA once a quarter is done: when the rebuild should end.
        if predicted.is_none() && total > 0 && done * 4 >= total {
            if let Some(eta) = r["eta_seconds"].as_u64() {
                assert!(
                    r["bytes"].as_u64().unwrap_or(0) > 0 && r["bytes_per_second"].as_u64().unwrap_or(0) > 0,
                    "{r:#}"
                );
                predicted = Some((started.elapsed(), Duration::from_secs(eta)));
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "rebuild did not end: {j:#}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let took = started.elapsed();
    let (at, eta) = predicted.expect("an ETA was shown during the rebuild");
    let actual = took.saturating_sub(at);
    assert!(
        actual.as_secs_f64() >= 0.6 * eta.as_secs_f64() - 2.0 && actual.as_secs_f64() <= 1.5 * eta.as_secs_f64() + 2.0,
        "ETA {eta:?} at {at:?}, but the rebuild ended {actual:?} later"
    );
    assert_eq!(std::fs::read(m.join("f")).expect("read"), data);

    // --watch into a pipe: plain status blocks, a timestamp first.
    let mut w = Command::new(bin("iomfs"))
        .args(["status", "--watch", "--dir", &c.dir.to_string_lossy()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("watch");
    std::thread::sleep(Duration::from_secs(7));
    let _ = w.kill();
    let out = w.wait_with_output().expect("watch output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.matches("cluster: healthy").count() >= 2, "{text}");
    assert!(text.contains("Z\n") && !text.contains("0/0"), "{text}");
}

/// Protocol version of each IOM as `status --json` reports it.
fn protocols(j: &serde_json::Value) -> Vec<u64> {
    j["ioms"].as_array().expect("ioms").iter().map(|i| i["protocol"].as_u64().unwrap_or(0)).collect()
}

/// A rolling upgrade, rehearsed: IOM 2 announces only the previous
/// protocol version (as the previous release does), the others and the
/// mount the current one. The cluster serves across both; the newer
/// version's additions (scrub results kept by the IOMs) skip the older IOM
/// and say so; upgrading it is one restart.
#[test]
fn an_iom_of_the_previous_protocol_serves_beside_current_ones_until_a_restart_upgrades_it() {
    use common::wire::{PROTOCOL_OLDEST, PROTOCOL_VERSION};
    let _g = serial();
    const { assert!(PROTOCOL_OLDEST < PROTOCOL_VERSION, "this build speaks the previous version too") };
    let (old, new) = (PROTOCOL_OLDEST as u64, PROTOCOL_VERSION as u64);
    let base = free_ports(5);
    let mut c = Cluster::init_with(5, &["--metrics-port", &base.to_string()]);
    c.env[2].push(("IOMFS_PROTOCOL_MAX".into(), old.to_string()));
    c.start_all();
    let j = wait_status(&c, 0);
    assert_eq!(protocols(&j), vec![new, new, old, new, new], "{j:#}");
    let warnings = j["warnings"].to_string();
    assert!(warnings.contains(&format!("IOM 2 speaks protocol {old}")), "{j:#}");

    // Every IOM holds data, parity and namespace records of some of these.
    let m = c.mount("mnt", &[]);
    let files: Vec<Vec<u8>> = (0..24u64).map(|i| Rng(40 + i).bytes((i as usize * 97_003) % 900_000 + 1)).collect();
    for (i, d) in files.iter().enumerate() {
        std::fs::create_dir_all(m.join(format!("d{}", i % 4))).unwrap();
        std::fs::write(m.join(format!("d{}/f{i}", i % 4)), d).unwrap();
    }
    for (i, d) in files.iter().enumerate() {
        assert!(std::fs::read(m.join(format!("d{}/f{i}", i % 4))).unwrap() == *d, "f{i} differs across versions");
    }

    // A scrub checks everything and tells the IOMs that keep scrub results.
    let out = c.iomfs(&["scrub"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{}{err}", String::from_utf8_lossy(&out.stdout));
    assert!(err.contains(&format!("IOM 2 speaks protocol {old}")) && err.contains("upgrade it"), "{err}");
    let scrape_of = |i: u16| scrape(&format!("127.0.0.1:{}", base + i));
    let wait_series = |i: u16, name: &str| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let t = scrape_of(i);
            if names(&t).contains(name) {
                return t;
            }
            assert!(Instant::now() < deadline, "IOM {i} has no {name}:\n{t}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let t0 = wait_series(0, "iomfs_scrub_last_problems");
    assert_eq!(value(&t0, "iomfs_scrub_last_problems", &[]), 0.0);
    assert!(value(&t0, "iomfs_scrub_last_groups", &[]) > 0.0, "{t0}");
    let t2 = wait_series(2, "iomfs_iom_protocol_version");
    assert_eq!(value(&t2, "iomfs_iom_protocol_version", &[]), old as f64);
    assert!(!names(&t2).contains("iomfs_scrub_last_problems"), "IOM 2 was sent a request it cannot decode:\n{t2}");

    // A client of the previous version talks to every IOM, the new ones included.
    let out = Command::new(bin("iomfs"))
        .args(["status", "--json", "--dir", c.dir.to_str().expect("utf8")])
        .env("IOMFS_PROTOCOL_MAX", old.to_string())
        .output()
        .expect("run iomfs");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json");
    assert_eq!(out.status.code(), Some(0), "{j:#}");
    assert_eq!(protocols(&j), vec![old; 5], "{j:#}");
    // One outside the range this build speaks is refused with the range.
    let out = Command::new(bin("iomfs"))
        .args(["status", "--dir", c.dir.to_str().expect("utf8")])
        .env("IOMFS_PROTOCOL_MAX", (old - 1).to_string())
        .output()
        .expect("run iomfs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && err.contains(&format!("versions {old} to {new}")), "{err}");

    // The upgrade: IOM 2 stops and comes back as the current version.
    assert!(c.stop(2), "IOM 2 stops cleanly on SIGTERM");
    c.env[2].clear();
    c.start(2);
    let deadline = Instant::now() + Duration::from_secs(60);
    let j = loop {
        let (rc, j) = status_json(&c);
        if rc == 0 && protocols(&j) == vec![new; 5] {
            break j;
        }
        assert!(Instant::now() < deadline, "IOM 2 did not come back at protocol {new}: {j:#}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(!j["warnings"].to_string().contains("speaks protocol"), "{j:#}");
    for (i, d) in files.iter().enumerate() {
        assert!(std::fs::read(m.join(format!("d{}/f{i}", i % 4))).unwrap() == *d, "f{i} differs after the upgrade");
    }
    let out = c.iomfs(&["scrub"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success() && !err.contains("speaks protocol"), "{err}");
    let t2 = wait_series(2, "iomfs_scrub_last_problems");
    assert_eq!(value(&t2, "iomfs_scrub_last_problems", &[]), 0.0);
    // The IOMs keep the result: status on a host without this directory's record shows it.
    std::fs::remove_file(c.dir.join("last-scrub.json")).expect("the local record");
    let (_, j) = status_json(&c);
    assert_eq!(j["last_scrub"]["problems"], 0, "{j:#}");
}

/// fdatasync of overwrites (the file not grown) needs no namespace round
/// trip once the file's namespace state is durable: counted on the mount's
/// metrics endpoint. fsync still publishes the new mtime each time, and
/// the mtime of the fdatasync'd writes is published at close.
#[test]
fn fdatasync_of_overwrites_costs_no_namespace_round_trip_and_fsync_still_publishes_mtime() {
    let _g = serial();
    let base = free_ports(1);
    let mut c = Cluster::init(5);
    c.start_all();
    let addr = format!("127.0.0.1:{base}");
    let m = c.mount("m", &[&format!("metrics={addr}")]);
    let f = m.join("db");
    std::fs::write(&f, Rng(1).bytes(1 << 20)).expect("write");
    let meta_rpcs = || {
        std::thread::sleep(Duration::from_millis(1200));
        value(&scrape(&addr), "iomfs_client_rpc_duration_seconds_count", &["family=\"meta\""])
    };
    let run = |call: &str| {
        let script = format!(
            "import os,sys\nfd=os.open(sys.argv[1], os.O_WRONLY)\nfor i in range(50):\n    \
             os.pwrite(fd, os.urandom(4096), (i * 7919 % 256) * 4096)\n    os.{call}(fd)\nos.close(fd)\n"
        );
        let out = Command::new("python3").arg("-c").arg(script).arg(&f).output().expect("python3");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let mtime = || std::fs::metadata(&f).expect("stat").modified().expect("mtime");
    // One synced publication makes the file's namespace state durable.
    run("fsync");
    let before = meta_rpcs();
    let t0 = mtime();
    std::thread::sleep(Duration::from_millis(20));
    run("fdatasync");
    let datasync = meta_rpcs() - before;
    // The close published the writes' mtime.
    assert!(mtime() > t0, "the mtime of the fdatasync'd writes was never published");
    let before = meta_rpcs();
    run("fsync");
    let fsync = meta_rpcs() - before;
    assert!(datasync < 10.0, "50 fdatasyncs of overwrites cost {datasync} namespace requests");
    assert!(fsync >= 50.0, "50 fsyncs cost only {fsync} namespace requests: the mtime must be durable");
    // What was written is there, and the cluster is consistent.
    c.must_scrub_clean();
}

/// `-o allow_root` keeps other users out of the mount; by default every
/// user reaches it and the kernel checks permissions (allow_other).
#[test]
fn allow_root_keeps_other_users_out_and_the_default_lets_them_in() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let _g = serial();
    let mut c = Cluster::init(3);
    c.start_all();
    // Other users must be able to reach the mount points at all.
    for p in [c.tmp.path(), c.dir.as_path()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let open = c.mount("open", &[]);
    let closed = c.mount("closed", &["allow_root"]);
    std::fs::write(open.join("f"), b"x").expect("write");
    std::fs::set_permissions(open.join("f"), std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let as_nobody =
        |p: &std::path::Path| Command::new("cat").arg(p).uid(65534).gid(65534).output().expect("run cat as nobody");
    let out = as_nobody(&open.join("f"));
    assert!(out.status.success(), "nobody cannot read through the default mount: {out:?}");
    assert_eq!(out.stdout, b"x");
    let out = as_nobody(&closed.join("f"));
    assert!(!out.status.success(), "nobody read through an allow_root mount: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{err}");
    assert_eq!(std::fs::read(closed.join("f")).expect("root reads"), b"x");
}
