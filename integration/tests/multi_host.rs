//! The multi-host layout on one machine (issue 17): each IOM is a "host"
//! of its own — its own loopback address (127.0.0.11–15, one port), its
//! own directory holding only what docs/operations.md ("Several hosts")
//! says to copy there (the config, the CA certificate, its own node
//! certificate and key; no first-start marker: the IOMs settle among
//! themselves that the cluster is new) — and the client runs from
//! 127.0.0.100 with only the client files. The transport is the real networks' (`lan`). A
//! firewall rule on one host's address then cuts that host off, clients
//! included, as a host whose network fails.

use integration::firewall::Firewall;
use integration::{bin, is_mounted, serial, test_root, unmount, Rng};
use std::fs;
use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const HOSTS: u8 = 5;

fn host_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 11 + i)
}

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 100);

/// The IOM processes and the mount, stopped and removed on drop.
struct Hosts {
    root: PathBuf,
    /// (host, its IOM process), in the order started.
    ioms: Vec<(u8, Child)>,
    mnt: PathBuf,
}

impl Drop for Hosts {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            unmount(&self.mnt);
        }
        for (_, c) in &mut self.ioms {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var("IOMFS_KEEP_TEST_DIRS").is_ok() {
            eprintln!("kept test directory {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

/// A UDP port free on every host address.
fn free_port() -> u16 {
    for _ in 0..100 {
        let port = 20_000 + rand::random::<u16>() % 40_000;
        if (0..HOSTS).all(|i| UdpSocket::bind((host_ip(i), port)).is_ok()) {
            return port;
        }
    }
    panic!("no UDP port free on 127.0.0.11-15");
}

fn iomfs(args: &[&str]) -> Output {
    Command::new(bin("iomfs")).args(args).output().expect("run iomfs")
}

fn must(out: Output, what: &str) -> String {
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed:\n{text}");
    text
}

fn copy(from: &Path, to: &Path) {
    fs::copy(from, to).unwrap_or_else(|e| panic!("copy {} to {}: {e}", from.display(), to.display()));
}

fn status(client: &Path) -> String {
    let out = iomfs(&["status", "--dir", &client.to_string_lossy()]);
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn wait_status(client: &Path, want: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let s = status(client);
        if s.contains(want) {
            return s;
        }
        assert!(Instant::now() < deadline, "status never said '{want}':\n{s}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A small tree of files, directories and a symlink under `dir`.
fn make_tree(dir: &Path) {
    let mut rng = Rng(7);
    for d in 0..6 {
        let sub = dir.join(format!("d{d}")).join("inner");
        fs::create_dir_all(&sub).expect("mkdir");
        for f in 0..12 {
            let len = (rng.next_u64() % 200_000) as usize;
            fs::write(sub.join(format!("f{f}")), Rng(d * 100 + f).bytes(len)).expect("write");
        }
    }
    std::os::unix::fs::symlink("d0/inner/f0", dir.join("link")).expect("symlink");
}

/// Five hosts started from one `iomfs init` as docs/operations.md says,
/// each with only its own files, and a client directory; returns once the
/// cluster is healthy.
fn start_hosts(tag: &str) -> (Hosts, PathBuf) {
    let (mut hosts, client) = start_some_hosts(tag, 0..HOSTS);
    wait_status(&client, "cluster: healthy", Duration::from_secs(60));
    for i in 0..HOSTS {
        hosts.assert_runs(i);
    }
    (hosts, client)
}

impl Hosts {
    /// Starts host `i`'s IOM from its own directory (made and filled as
    /// docs/operations.md says when it does not exist yet), logging to
    /// `root/iom-I.log`.
    fn start(&mut self, i: u8) {
        self.start_with(i, false)
    }

    /// [`Hosts::start`]; `marker`: with `iom-I/store.new` too (a host
    /// started while another is missing: docs/operations.md).
    fn start_with(&mut self, i: u8, marker: bool) {
        let init = self.root.join("init");
        let h = self.root.join(format!("host-{i}"));
        if !h.exists() {
            // What docs/operations.md says to copy: cluster.toml, ca.pem,
            // and its own iom-I/node.pem and node.key. Nothing else (no
            // store.new: the IOMs settle that the cluster is new).
            fs::create_dir_all(h.join(format!("iom-{i}"))).expect("host dir");
            copy(&init.join("cluster.toml"), &h.join("cluster.toml"));
            copy(&init.join("ca.pem"), &h.join("ca.pem"));
            for f in ["node.pem", "node.key"] {
                copy(&init.join(format!("iom-{i}/{f}")), &h.join(format!("iom-{i}/{f}")));
            }
            if marker {
                copy(&init.join(format!("iom-{i}/store.new")), &h.join(format!("iom-{i}/store.new")));
            }
        }
        let log =
            fs::OpenOptions::new().create(true).append(true).open(self.root.join(format!("iom-{i}.log"))).expect("log");
        let child = Command::new(bin("iom-server"))
            .args(["--dir", &h.to_string_lossy(), "--id", &i.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start iom-server");
        self.ioms.push((i, child));
    }

    fn log(&self, i: u8) -> String {
        fs::read_to_string(self.root.join(format!("iom-{i}.log"))).unwrap_or_default()
    }

    /// Host `i`'s IOM process, started last.
    fn child(&mut self, i: u8) -> &mut Child {
        &mut self.ioms.iter_mut().rev().find(|(h, _)| *h == i).expect("host started").1
    }

    fn assert_runs(&mut self, i: u8) {
        let exited = self.child(i).try_wait().expect("wait");
        assert!(exited.is_none(), "IOM {i} exited ({exited:?}):\n{}", self.log(i));
    }
}

/// `iomfs init` for five hosts, then the IOMs of `which` started and a
/// client directory made; does not wait for them. With fewer than five,
/// each gets its first-start marker (a new cluster without one starts
/// once every host answers).
fn start_some_hosts(tag: &str, which: impl IntoIterator<Item = u8>) -> (Hosts, PathBuf) {
    let root = tempfile::Builder::new().prefix(&format!("iomfs-{tag}-")).tempdir_in(test_root()).expect("tmp").keep();
    let mut hosts = Hosts { root: root.clone(), ioms: Vec::new(), mnt: root.join("mnt") };
    let port = free_port();
    let addrs: Vec<String> = (0..HOSTS).map(|i| format!("{}:{port}", host_ip(i))).collect();
    let init = root.join("init");
    must(
        iomfs(&[
            "init",
            "--dir",
            &init.to_string_lossy(),
            "--ioms",
            "5",
            "--addrs",
            &addrs.join(","),
            "--transport",
            "lan",
        ]),
        "iomfs init --addrs",
    );
    let which: Vec<u8> = which.into_iter().collect();
    for &i in &which {
        hosts.start_with(i, which.len() < HOSTS as usize);
    }
    let client = root.join("client");
    fs::create_dir_all(&client).expect("client dir");
    for f in ["cluster.toml", "ca.pem", "client.pem", "client.key"] {
        copy(&init.join(f), &client.join(f));
    }
    (hosts, client)
}

/// Mounts the cluster from the client's address, logging to `root/mount.log`.
fn mount_from_client(hosts: &Hosts, client: &Path) -> PathBuf {
    fs::create_dir_all(&hosts.mnt).expect("mount point");
    let m = hosts.mnt.clone();
    must(
        iomfs(&[
            "mount",
            "--dir",
            &client.to_string_lossy(),
            &m.to_string_lossy(),
            "--detach",
            "--log-file",
            &hosts.root.join("mount.log").to_string_lossy(),
            "-o",
            &format!("bind={CLIENT_IP}"),
        ]),
        "iomfs mount -o bind=",
    );
    assert!(is_mounted(&m));
    m
}

#[test]
fn five_hosts_on_their_own_addresses_with_only_their_own_files() {
    let _g = serial();
    let (hosts, client) = start_hosts("hosts");
    let root = hosts.root.clone();
    let fw = Firewall::new("hosts");
    fw.count_from(CLIENT_IP);
    let m = mount_from_client(&hosts, &client);
    let src = root.join("src");
    make_tree(&src);
    let cp = Command::new("cp").arg("-a").arg(&src).arg(m.join("tree")).status().expect("cp");
    assert!(cp.success(), "cp -a onto the mount failed");
    let diff = Command::new("diff").arg("-r").arg("--no-dereference").arg(&src).arg(m.join("tree")).output();
    let diff = diff.expect("diff");
    assert!(diff.status.success(), "diff -r: {}", String::from_utf8_lossy(&diff.stdout));
    let big = Rng(99).bytes(32 << 20);
    fs::write(m.join("big"), &big).expect("write a large file");
    assert!(fs::read(m.join("big")).expect("read it") == big, "the large file reads back different");
    let from_client = fw.matched();
    assert!(from_client > 0, "no packet came from the client's address {CLIENT_IP}");

    // Host 2's network fails: its address is cut off from every other,
    // the client's too. The cluster stands in for it and the mount goes on.
    fw.isolate(host_ip(2));
    wait_status(&client, "down (proxied by 3)", Duration::from_secs(30));
    let during = Rng(5).bytes(8 << 20);
    fs::write(m.join("during"), &during).expect("write while host 2 is cut off");
    assert!(fs::read(m.join("big")).expect("degraded read") == big, "a degraded read differs");
    assert!(fw.matched() > from_client, "the rule cutting host 2 off matched nothing");
    fw.heal();
    let s = wait_status(&client, "cluster: healthy", Duration::from_secs(90));
    eprintln!("healthy again:\n{s}");
    assert!(fs::read(m.join("during")).expect("read back") == during, "the file written while cut off differs");
    let diff = Command::new("diff").arg("-r").arg("--no-dereference").arg(&src).arg(m.join("tree")).output();
    assert!(diff.expect("diff").status.success(), "the tree differs after the heal");
    let scrub = must(iomfs(&["scrub", "--dir", &client.to_string_lossy()]), "scrub from the client's directory");
    assert!(scrub.contains("scrub:"), "{scrub}");
    for i in 0..HOSTS {
        let h = root.join(format!("host-{i}"));
        assert!(!h.join("ca.key").exists() && !h.join("client.key").exists(), "host {i} holds keys it must not");
    }
}

/// The network between the client and one host fails, and only that path:
/// the IOMs still hear each other, so nobody is declared down. The client
/// sends that host's requests through another IOM (`Request::Relay`) and
/// goes on with every byte right; once the path heals it talks directly
/// again. Before relays, every request for that host failed with EIO
/// after the client's retries (30 s).
#[test]
fn a_client_cut_off_from_one_host_alone_reaches_it_through_another() {
    let _g = serial();
    let (hosts, client) = start_hosts("relay");
    let root = hosts.root.clone();
    let m = mount_from_client(&hosts, &client);
    let before: Vec<Vec<u8>> = (0..12u64).map(|i| Rng(300 + i).bytes((i as usize * 131_071) % 2_000_000 + 1)).collect();
    for (i, d) in before.iter().enumerate() {
        fs::write(m.join(format!("b{i}")), d).expect("write before the cut");
    }

    let fw = Firewall::new("relay");
    fw.cut_addrs(CLIENT_IP, host_ip(2));
    let t0 = Instant::now();
    // Blocks and parity on host 2, and namespace records it holds or mirrors, all written and read.
    let during: Vec<Vec<u8>> = (0..12u64).map(|i| Rng(400 + i).bytes((i as usize * 171_013) % 2_000_000 + 1)).collect();
    for (i, d) in during.iter().enumerate() {
        fs::write(m.join(format!("d{i}")), d)
            .unwrap_or_else(|e| panic!("write d{i} with host 2 cut off from the client: {e}"));
    }
    for (i, d) in before.iter().enumerate() {
        assert!(fs::read(m.join(format!("b{i}"))).expect("read while cut off") == *d, "b{i} differs while cut off");
    }
    for (i, d) in during.iter().enumerate() {
        assert!(fs::read(m.join(format!("d{i}"))).expect("read while cut off") == *d, "d{i} differs while cut off");
    }
    let took = t0.elapsed();
    assert!(fw.matched() > 0, "the rule between the client and host 2 matched nothing");
    let s = status(&client);
    assert!(s.contains("cluster: healthy"), "a path between one client and one host is no IOM failure:\n{s}");
    let log = fs::read_to_string(root.join("mount.log")).unwrap_or_default();
    assert!(log.contains("relaying through IOM"), "the client never relayed:\n{log}");
    eprintln!("24 files written and read with host 2 cut off from the client in {took:?}");

    fw.heal();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = fs::read_to_string(root.join("mount.log")).unwrap_or_default();
        if log.contains("no longer relayed") {
            break;
        }
        assert!(Instant::now() < deadline, "the client still relays 30 s after the heal:\n{log}");
        // Requests for host 2 (two parity groups of data: every IOM holds some).
        let name = format!("after-{}", t0.elapsed().as_millis());
        fs::write(m.join(&name), Rng(9).bytes(2 << 20)).expect("write after the heal");
        std::thread::sleep(Duration::from_millis(500));
    }
    for (i, d) in during.iter().enumerate() {
        assert!(fs::read(m.join(format!("d{i}"))).expect("read after the heal") == *d, "d{i} differs after the heal");
    }
    must(iomfs(&["scrub", "--dir", &client.to_string_lossy()]), "scrub after the heal");
}

/// A host whose IOM first starts after the others began serving (its
/// machine was late: the others were started with their markers) has no
/// store and no marker: the others never heard it, so it creates its
/// store and rejoins like any IOM that was down, with no operator step. The same
/// host after its disk is wiped is refused, naming `iomfs replace`: the
/// others heard it run.
#[test]
fn a_host_that_starts_late_joins_by_itself_and_a_wiped_one_is_refused() {
    let _g = serial();
    let (mut hosts, client) = start_some_hosts("late", 0..4);
    wait_status(&client, "down (proxied by 0)", Duration::from_secs(60));
    let m = mount_from_client(&hosts, &client);
    let files: Vec<Vec<u8>> = (0..10u64).map(|i| Rng(700 + i).bytes((i as usize * 377_777) % 3_000_000 + 1)).collect();
    for (i, d) in files.iter().enumerate() {
        fs::write(m.join(format!("f{i}")), d).expect("write with host 4 not started");
    }
    hosts.start(4);
    let s = wait_status(&client, "cluster: healthy", Duration::from_secs(90));
    hosts.assert_runs(4);
    assert!(hosts.log(4).contains("none heard IOM 4"), "host 4 did not say it starts late:\n{}", hosts.log(4));
    eprintln!("healthy with the late host:\n{s}");
    for (i, d) in files.iter().enumerate() {
        assert!(fs::read(m.join(format!("f{i}"))).expect("read") == *d, "f{i} differs after the late host joined");
    }
    let scrub = must(iomfs(&["scrub", "--dir", &client.to_string_lossy()]), "scrub with the late host");
    assert!(scrub.contains("scrub:"), "{scrub}");

    // Its disk is wiped: only its certificate and key are left.
    let c = hosts.child(4);
    let _ = c.kill();
    let _ = c.wait();
    let disk = hosts.root.join("host-4/iom-4");
    for e in fs::read_dir(&disk).expect("host 4's dir").flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        if n != "node.pem" && n != "node.key" {
            let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
        }
    }
    let before = hosts.log(4).len();
    hosts.start(4);
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(st) = hosts.child(4).try_wait().expect("wait") {
            break st;
        }
        assert!(Instant::now() < deadline, "an IOM on a wiped disk did not refuse to start:\n{}", hosts.log(4));
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = hosts.log(4)[before..].to_string();
    assert!(
        !exit.success() && log.contains("heard IOM 4 run with a store") && log.contains("iomfs replace"),
        "refused without saying why and the way out ({exit}):\n{log}"
    );
    assert!(!disk.join("blocks.dat").exists(), "the refused IOM created a store");
    for (i, d) in files.iter().enumerate() {
        assert!(fs::read(m.join(format!("f{i}"))).expect("read") == *d, "f{i} differs with host 4 refused");
    }
}
