//! Test harness: a cluster of real `iom-server` processes in a temporary
//! directory, started through the CLI contract and killed for real. Every
//! process (and mount) it starts is killed (unmounted) when the harness is
//! dropped, also when a test fails.

pub mod firewall;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Directory holding the `iomfs` and `iom-server` binaries of this build.
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("IOMFS_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir").to_path_buf();
    for b in ["iomfs", "iom-server"] {
        assert!(
            dir.join(b).exists(),
            "{} not found in {}: build the binaries first (`cargo build --workspace --bins`, same profile as the tests)",
            b,
            dir.display()
        );
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    bin_dir().join(name)
}

/// Serialises heavy tests inside one test binary (the machine has 2 cores).
pub fn serial() -> parking_lot::MutexGuard<'static, ()> {
    static LOCK: parking_lot::Mutex<()> = parking_lot::Mutex::new(());
    LOCK.lock()
}

pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub dir: PathBuf,
    pub width: u32,
    procs: Vec<Option<Child>>,
    /// Extra environment for IOM processes (e.g. FAILPOINTS), per IOM.
    pub env: Vec<Vec<(String, String)>>,
    pub server_bin: PathBuf,
    mounts: Vec<PathBuf>,
    children: Vec<Child>,
}

impl Cluster {
    /// `iomfs init` of a fresh cluster of `width` IOMs.
    pub fn init(width: u32) -> Cluster {
        Self::init_with(width, &[])
    }

    pub fn init_with(width: u32, extra: &[&str]) -> Cluster {
        Self::init_at(&test_root(), width, extra)
    }

    /// A cluster whose directory (and so every IOM's store) lives under `root`.
    pub fn init_at(root: &Path, width: u32, extra: &[&str]) -> Cluster {
        let tmp = tempfile::Builder::new().prefix("iomfs-test-").tempdir_in(root).expect("tempdir");
        let dir = tmp.path().join("cluster");
        let mut args = vec!["init", "--dir", dir.to_str().expect("utf8"), "--ioms"];
        let w = width.to_string();
        args.push(&w);
        args.extend_from_slice(extra);
        let out = Command::new(bin("iomfs")).args(&args).output().expect("run iomfs init");
        assert!(out.status.success(), "iomfs init failed: {}", String::from_utf8_lossy(&out.stderr));
        Cluster {
            tmp,
            dir,
            width,
            procs: (0..width).map(|_| None).collect(),
            env: (0..width).map(|_| Vec::new()).collect(),
            server_bin: bin("iom-server"),
            mounts: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Sets `[tuning] key = value` in the cluster config (before starting IOMs).
    pub fn set_tuning(&self, key: &str, value: u64) {
        let p = self.dir.join("cluster.toml");
        let text = std::fs::read_to_string(&p).expect("config");
        let mut out = String::new();
        let mut done = false;
        for line in text.lines() {
            if line.trim_start().starts_with(&format!("{key} =")) {
                out.push_str(&format!("{key} = {value}\n"));
                done = true;
            } else {
                out.push_str(line);
                out.push('\n');
            }
        }
        assert!(done, "no tuning key {key} in the config");
        std::fs::write(&p, out).expect("write config");
    }

    pub fn pid_file(&self, i: u32) -> PathBuf {
        self.dir.join(format!("iom-{i}/pid"))
    }

    pub fn log_path(&self, i: u32) -> PathBuf {
        self.tmp.path().join(format!("iom{i}.log"))
    }

    /// Starts IOM `i` as `iom-server --dir D --id i` and waits for its pid file.
    pub fn start(&mut self, i: u32) {
        let _ = std::fs::remove_file(self.pid_file(i));
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(i)).expect("log file");
        let mut cmd = Command::new(&self.server_bin);
        cmd.args(["--dir", self.dir.to_str().expect("utf8"), "--id", &i.to_string()])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .env("IOMFS_LOG", std::env::var("IOMFS_LOG").unwrap_or_else(|_| "info".into()));
        for (k, v) in &self.env[i as usize] {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn iom-server");
        self.procs[i as usize] = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.pid_file(i).exists() {
            if let Some(c) = self.procs[i as usize].as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("iom-server {i} exited with {st} at start:\n{}", self.log(i));
                }
            }
            assert!(Instant::now() < deadline, "iom-server {i} did not write its pid file:\n{}", self.log(i));
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn start_all(&mut self) {
        for i in 0..self.width {
            self.start(i);
        }
    }

    pub fn log(&self, i: u32) -> String {
        std::fs::read_to_string(self.log_path(i)).unwrap_or_default()
    }

    pub fn pid(&self, i: u32) -> Option<u32> {
        self.procs[i as usize].as_ref().map(|c| c.id())
    }

    /// SIGKILL, like a crash or a pulled plug of that server process.
    pub fn kill(&mut self, i: u32) {
        if let Some(mut c) = self.procs[i as usize].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status success.
    pub fn stop(&mut self, i: u32) -> bool {
        if let Some(mut c) = self.procs[i as usize].take() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if let Ok(Some(st)) = c.try_wait() {
                    return st.success();
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    return false;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        true
    }

    /// Stops every IOM (all of them, even after one fails); true when all stopped cleanly.
    pub fn stop_all(&mut self) -> bool {
        let mut ok = true;
        for i in 0..self.width {
            ok &= self.stop(i);
        }
        ok
    }

    /// Waits for a child that is expected to die (e.g. at a failpoint).
    pub fn wait_exit(&mut self, i: u32, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.procs[i as usize].as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.procs[i as usize] = None;
                    return Some(st);
                }
            } else {
                return None;
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn is_running(&mut self, i: u32) -> bool {
        match self.procs[i as usize].as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Runs `iomfs ARGS --dir D`.
    pub fn iomfs(&self, args: &[&str]) -> Output {
        let mut a: Vec<&str> = args.to_vec();
        a.push("--dir");
        a.push(self.dir.to_str().expect("utf8"));
        Command::new(bin("iomfs")).args(&a).stdin(Stdio::null()).output().expect("run iomfs")
    }

    /// `iomfs scrub`; panics with its output unless clean.
    pub fn must_scrub_clean(&self) -> String {
        let out = self.iomfs(&["scrub"]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "scrub not clean:\n{text}");
        text
    }

    /// Blocks stored, from the summary line of a clean `iomfs scrub`.
    pub fn scrubbed_blocks(&self) -> u64 {
        let text = self.must_scrub_clean();
        let line = text.lines().find(|l| l.starts_with("scrub:")).unwrap_or_else(|| panic!("no summary:\n{text}"));
        let n = line.split(',').nth(1).and_then(|p| p.split_whitespace().next()).and_then(|n| n.parse().ok());
        n.unwrap_or_else(|| panic!("no block count in '{line}'"))
    }

    /// `iomfs fsck` must find the namespace and its objects consistent.
    pub fn must_fsck_clean(&self) -> String {
        let out = self.iomfs(&["fsck"]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "fsck not clean:\n{text}");
        text
    }

    pub async fn client(&self) -> Arc<fs_client::ClusterClient> {
        fs_client::ClusterClient::connect(&self.dir).await.expect("client connects")
    }

    /// `iomfs mount --dir D MNT --detach -o OPTS`: a real FUSE mount of this
    /// cluster, unmounted when the harness is dropped.
    pub fn mount(&mut self, name: &str, opts: &[&str]) -> PathBuf {
        let mnt = self.tmp.path().join(name);
        std::fs::create_dir_all(&mnt).expect("mount point");
        let mut args: Vec<String> = vec![
            "mount".into(),
            "--dir".into(),
            self.dir.to_string_lossy().into(),
            mnt.to_string_lossy().into(),
            "--detach".into(),
        ];
        for o in opts {
            args.push("-o".into());
            args.push(o.to_string());
        }
        self.mounts.push(mnt.clone());
        let out = Command::new(bin("iomfs")).args(&args).output().expect("run iomfs mount");
        assert!(
            out.status.success(),
            "iomfs mount failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(is_mounted(&mnt), "{} not mounted", mnt.display());
        mnt
    }

    /// The warnings and errors of every mount's log (`iomfs mount
    /// --detach` writes `D/mount_*.log`), the last `n` lines: what a failed
    /// assertion about a client should show.
    pub fn mount_warnings(&self, n: usize) -> String {
        let mut lines = Vec::new();
        for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("mount_") && name.ends_with(".log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                lines.extend(
                    text.lines()
                        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
                        .map(|l| format!("{name}: {l}")),
                );
            }
        }
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Registers a mount point to unmount on drop.
    pub fn track_mount(&mut self, m: &Path) {
        self.mounts.push(m.to_path_buf());
    }

    /// Registers a child process (e.g. a FUSE client) to kill on drop.
    pub fn track_child(&mut self, c: Child) {
        self.children.push(c);
    }
}

pub fn unmount(m: &Path) {
    for _ in 0..50 {
        let st = Command::new("fusermount3").arg("-u").arg(m).stderr(Stdio::null()).status();
        if matches!(st, Ok(s) if s.success()) || !is_mounted(m) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = Command::new("umount").arg("-l").arg(m).status();
}

/// The pid of the `iomfs mount` process serving `mnt`.
pub fn mount_pid(mnt: &Path) -> u32 {
    let want = mnt.to_string_lossy().to_string();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let args: Vec<String> = cmd.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).to_string()).collect();
        if args.iter().any(|a| a == "mount") && args.iter().any(|a| a == &want) && args[0].ends_with("iomfs") {
            return pid;
        }
    }
    panic!("no iomfs mount process for {want}");
}

pub fn is_mounted(m: &Path) -> bool {
    fs_client::mount::is_mounted(m)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in self.mounts.clone() {
            if is_mounted(&m) {
                unmount(&m);
            }
        }
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 0..self.width {
            self.kill(i);
        }
        // Processes started by the CLI (iomfs local) record their pids here.
        for i in 0..self.width {
            if let Ok(p) = std::fs::read_to_string(self.pid_file(i)) {
                if let Ok(pid) = p.trim().parse::<i32>() {
                    // SAFETY: plain kill of a pid we started.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        if std::env::var("IOMFS_KEEP_TEST_DIRS").is_ok() {
            let p = std::mem::replace(&mut self.tmp, tempfile::tempdir().expect("tmp")).keep();
            eprintln!("kept test directory {}", p.display());
        }
    }
}

/// Where test clusters live (a real disk, not tmpfs, so fsync is real).
pub fn test_root() -> PathBuf {
    let p = std::env::var("IOMFS_TEST_ROOT").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/var/tmp"));
    std::fs::create_dir_all(&p).expect("test root");
    p
}

/// A small deterministic PRNG for test data.
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// A real small filesystem (tmpfs) for full-disk tests, unmounted when
/// dropped (drop it after the cluster that lives on it).
pub struct Tmpfs {
    pub dir: tempfile::TempDir,
}

impl Tmpfs {
    pub fn new(size_mib: u32) -> Tmpfs {
        let dir = tempfile::Builder::new().prefix("iomfs-tmpfs-").tempdir_in(test_root()).expect("tempdir");
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(st.success(), "mount -t tmpfs failed (needs root)");
        Tmpfs { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for _ in 0..50 {
            if Command::new("umount").arg(self.dir.path()).status().map(|s| s.success()).unwrap_or(false) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// A first port of `n` consecutive TCP ports free on 127.0.0.1 now.
pub fn free_ports(n: u16) -> u16 {
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
pub fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to metrics at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    std::io::Write::write_fmt(
        &mut s,
        format_args!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .expect("send");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).expect("read answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "metrics at {addr} answered {head}");
    body.to_string()
}

/// Names of the series in a scrape (`name{labels} value` lines).
pub fn names(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| l.split(['{', ' ']).next().unwrap_or("").to_string())
        .collect()
}

/// Sum of the values of series `name` whose labels contain every one of `with`.
pub fn value(text: &str, name: &str, with: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| with.iter().all(|w| l.contains(w)))
        .map(|l| l.rsplit(' ').next().unwrap_or("0").parse::<f64>().expect("a number"))
        .sum()
}
