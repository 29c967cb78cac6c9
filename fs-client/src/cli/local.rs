//! `iomfs local`: a whole cluster on this machine, one `iom-server`
//! process per IOM, plus a mount; `iomfs replace`; and `iomfs status`.
//!
//! Invariant: a process is signalled only after its pid (from a pid file or
//! the local state file) is found alive with the expected command line.

use super::mount;
use anyhow::{bail, Context, Result};
use bytes::Bytes;
use common::cluster::{ClusterMap, Health, IomState};
use common::config::{ClusterConfig, ClusterPaths};
use common::wire::{AdminReq, AdminResp, IomStats, MemberReq, MemberResp, Reply, Request};
use common::IomId;
use fs_client::ClusterClient;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What `iomfs local --detach` started, for `iomfs local stop`.
#[derive(Serialize, Deserialize, Default)]
struct LocalState {
    mount: Option<PathBuf>,
    mount_pid: Option<u32>,
}

fn load_state(p: &ClusterPaths) -> LocalState {
    std::fs::read_to_string(p.local_state()).ok().and_then(|s| toml::from_str(&s).ok()).unwrap_or_default()
}

fn save_state(p: &ClusterPaths, s: &LocalState) -> Result<()> {
    std::fs::write(p.local_state(), toml::to_string(s)?).with_context(|| format!("write {}", p.local_state().display()))
}

/// Whether `pid` is a live process whose command line mentions `what`.
pub fn alive(pid: u32, what: &str) -> bool {
    // SAFETY: kill with signal 0 only checks the process exists.
    if unsafe { libc::kill(pid as i32, 0) } != 0 {
        return false;
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    if status.split_whitespace().nth(2) == Some("Z") {
        return false;
    }
    std::fs::read(format!("/proc/{pid}/cmdline")).map(|c| String::from_utf8_lossy(&c).contains(what)).unwrap_or(false)
}

/// The pid of IOM `id` if it is running (from its pid file).
pub fn iom_pid(p: &ClusterPaths, id: IomId) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(p.pid(id)).ok()?.trim().parse().ok()?;
    alive(pid, "iom-server").then_some(pid)
}

fn server_binary() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        let b = exe.with_file_name("iom-server");
        if b.exists() {
            return b;
        }
    }
    PathBuf::from("iom-server")
}

/// Starts IOM `id` of the cluster in `dir` as a background process.
pub fn start_iom(dir: &Path, id: IomId) -> Result<u32> {
    let p = ClusterPaths::new(dir);
    let cfg = ClusterConfig::load(dir)?;
    cfg.iom(id)?;
    if let Some(pid) = iom_pid(&p, id) {
        return Ok(pid);
    }
    let _ = std::fs::remove_file(p.pid(id));
    let log_path = p.log(id);
    let (log, start_len) = super::open_log(&log_path)?;
    let mut cmd = Command::new(server_binary());
    cmd.arg("--dir").arg(dir).arg("--id").arg(id.0.to_string()).arg("--log-file").arg(&log_path);
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    super::detach(&mut cmd);
    let mut child = cmd.spawn().context("start iom-server (is it installed next to iomfs?)")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(pid) = iom_pid(&p, id) {
            return Ok(pid);
        }
        if let Ok(Some(st)) = child.try_wait() {
            let log = super::mount::read_from(&log_path, start_len);
            let last = log.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string();
            bail!("IOM {id} exited at start ({st}): {last}");
        }
        if Instant::now() > deadline {
            bail!("IOM {id} did not start within 30 s (log: {})", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `iomfs replace`: IOM `id`'s disk was lost and an empty one is in its
/// place. Allows the IOM to create an empty store marked as a replacement
/// and starts it; it declares itself down, rebuilds everything it held
/// from the other IOMs, then takes its role back.
pub fn replace_iom(dir: &Path, id: IomId) -> Result<u32> {
    let p = ClusterPaths::new(dir);
    let cfg = ClusterConfig::load(dir)?;
    let icfg = cfg.iom(id)?;
    if let Some(pid) = iom_pid(&p, id) {
        bail!("IOM {id} is running (pid {pid}): stop it before replacing its disk");
    }
    let data = p.data_dir(icfg);
    // The IOM's block file (iom-server's store::BLOCK_FILE).
    if data.join("blocks.dat").exists() {
        bail!(
            "{} still holds a store (blocks.dat): `iomfs replace` is for an empty disk in place of a lost one. \
             If this is the IOM's own store, start it with `iomfs local start-iom --dir {} --id {id}`; to \
             replace it anyway, move everything in that directory away first except node.pem and node.key",
            data.display(),
            dir.display()
        );
    }
    for f in [p.node_cert(id), p.node_key(id)] {
        if !f.exists() {
            bail!(
                "{} is missing: copy IOM {id}'s node.pem and node.key (made by `iomfs init`) into {} first",
                f.display(),
                p.iom_dir(id).display()
            );
        }
    }
    std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    let marker = p.new_store_marker(id);
    std::fs::write(&marker, "replace\n").with_context(|| format!("write {}", marker.display()))?;
    start_iom(dir, id)
}

/// Stops every running IOM of the cluster (SIGTERM, then SIGKILL after 20 s).
pub fn stop_ioms(dir: &Path) -> Result<()> {
    let p = ClusterPaths::new(dir);
    let cfg = ClusterConfig::load(dir)?;
    let mut pids = Vec::new();
    for i in 0..cfg.width() {
        if let Some(pid) = iom_pid(&p, IomId(i)) {
            // SAFETY: signalling a process we identified as our IOM.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            pids.push((i, pid));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while pids.iter().any(|(_, pid)| alive(*pid, "iom-server")) {
        if Instant::now() > deadline {
            for (i, pid) in &pids {
                if alive(*pid, "iom-server") {
                    eprintln!("iomfs: IOM {i} (pid {pid}) did not stop on SIGTERM; killing it");
                    // SAFETY: as above.
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                }
            }
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn ensure_cluster(dir: &Path, ioms: u32) -> Result<()> {
    let p = ClusterPaths::new(dir);
    if !p.config().exists() {
        let cfg = super::init::init(
            dir,
            &super::init::InitOptions {
                ioms,
                block_size: 65536,
                addrs: None,
                host: "127.0.0.1".into(),
                base_port: 0,
                meta_home: 0,
                transport: common::config::TransportProfile::Loopback,
                metrics_port: None,
            },
        )?;
        println!("initialised cluster {} in {} ({} IOMs)", cfg.cluster_id, dir.display(), cfg.width());
    }
    Ok(())
}

/// `iomfs local --dir D --mount MNT [--ioms W] [--detach]`.
pub fn up(dir: &Path, mnt: &Path, ioms: u32, detach: bool, opts: &[String]) -> Result<()> {
    let (fso, debug) = mount::parse_options(opts)?;
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    std::fs::create_dir_all(mnt).with_context(|| format!("create {}", mnt.display()))?;
    ensure_cluster(dir, ioms)?;
    let cfg = ClusterConfig::load(dir)?;
    for i in 0..cfg.width() {
        let pid = start_iom(dir, IomId(i))?;
        println!("IOM {i} running (pid {pid}) at {}", cfg.ioms[i as usize].addr);
    }
    let p = ClusterPaths::new(dir);
    if detach {
        let pid = mount::mount_detached(dir, mnt, opts, None)?;
        let mnt = std::fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_path_buf());
        save_state(&p, &LocalState { mount: Some(mnt.clone()), mount_pid: Some(pid) })?;
        println!(
            "mounted at {} (client pid {pid}); stop with: iomfs local stop --dir {}",
            mnt.display(),
            dir.display()
        );
        return Ok(());
    }
    save_state(&p, &LocalState { mount: Some(mnt.to_path_buf()), mount_pid: Some(std::process::id()) })?;
    println!("mounting at {}; Ctrl-C unmounts and stops the cluster", mnt.display());
    let r = mount::mount_foreground(dir, mnt, fso, debug);
    stop_ioms(dir)?;
    let _ = std::fs::remove_file(p.local_state());
    r
}

/// `iomfs local stop --dir D`: unmount, stop the mount process and the IOMs.
pub fn stop(dir: &Path) -> Result<()> {
    let p = ClusterPaths::new(dir);
    ClusterConfig::load(dir)?;
    let st = load_state(&p);
    if let Some(m) = &st.mount {
        if fs_client::mount::is_mounted(m) && !fs_client::mount::fusermount_u(m) {
            bail!("cannot unmount {}: is a process using it? (fuser -m {})", m.display(), m.display());
        }
    }
    if let Some(pid) = st.mount_pid {
        if pid != std::process::id() && alive(pid, "iomfs") {
            // SAFETY: the mount process we started.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid, "iomfs") && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    stop_ioms(dir)?;
    let _ = std::fs::remove_file(p.local_state());
    Ok(())
}

/// `42% (55 of 131 blocks and groups, 3.4 MiB at 1.0 MiB/s), ETA 7s`.
pub fn rebuild_progress(s: &IomStats) -> String {
    let (d, t) = (s.rebuild_done, s.rebuild_total.max(s.rebuild_done));
    let pct = if t == 0 { 0.0 } else { 100.0 * d as f64 / t as f64 };
    let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
    // The IOM's own measure: its pace of the last ten seconds, counted in
    // blocks and groups (a group's parity costs reads of N blocks).
    let eta = s.rebuild_eta_s.map(|e| format!(", ETA {}", humantime::format_duration(Duration::from_secs(e))));
    format!(
        "{pct:.0}% ({d} of {t} blocks and groups, {:.1} MiB at {:.1} MiB/s){}",
        mib(s.rebuild_bytes),
        mib(s.rebuild_bytes_per_s),
        eta.unwrap_or_default()
    )
}

/// One IOM as `iomfs status` sees it.
pub struct IomStatus {
    pub id: IomId,
    pub addr: String,
    pub pid: Option<u32>,
    pub stats: Option<IomStats>,
    /// The protocol version the connection to it runs at.
    pub protocol: Option<u32>,
}

pub struct Status {
    pub map: ClusterMap,
    pub ioms: Vec<IomStatus>,
    /// The cluster directory the status was taken from (for the actions).
    pub dir: std::path::PathBuf,
    /// Data blocks per parity group.
    pub n: u32,
    /// The newest scrub recorded: in this cluster directory or by any IOM.
    pub last_scrub: Option<fs_client::scrub::LastScrub>,
}

/// What `iomfs status` concludes, and its exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Every IOM serves its own role.
    Healthy,
    /// One IOM down, starting, unreachable or rebuilding: served through
    /// its proxy.
    Degraded,
    /// More than one IOM out: no I/O until enough come back.
    Stopped,
    /// No IOM answered.
    Unreachable,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Healthy => "healthy",
            Verdict::Degraded => "degraded",
            Verdict::Stopped => "stopped",
            Verdict::Unreachable => "unreachable",
        }
    }

    /// 0 healthy, 1 degraded, 2 stopped, 3 unreachable.
    pub fn exit_code(self) -> u8 {
        match self {
            Verdict::Healthy => 0,
            Verdict::Degraded => 1,
            Verdict::Stopped => 2,
            Verdict::Unreachable => 3,
        }
    }
}

impl Status {
    pub fn verdict(&self) -> Verdict {
        if self.ioms.iter().all(|i| i.stats.is_none()) {
            return Verdict::Unreachable;
        }
        match self.health() {
            Health::Healthy => Verdict::Healthy,
            Health::Degraded => Verdict::Degraded,
            Health::Stopped => Verdict::Stopped,
        }
    }

    /// IOM `i`'s state as a word (and its proxy, when one stands in).
    fn iom_state(&self, i: &IomStatus) -> (&'static str, Option<IomId>) {
        match self.map.state(i.id) {
            IomState::Up if i.stats.is_none() => ("unreachable", None),
            IomState::Up if i.stats.as_ref().is_some_and(|s| !s.serving) => ("starting", None),
            IomState::Up => ("up", None),
            IomState::Down { proxy } => ("down", Some(proxy)),
            IomState::Rebuilding { proxy } => ("rebuilding", Some(proxy)),
        }
    }

    /// (what writers can still store, what the cluster holds in all) over
    /// the IOMs that answered (`IomStats::usable`, as `df` on a mount).
    pub fn capacity(&self) -> Option<(u64, u64)> {
        let all: Vec<IomStats> = self.ioms.iter().filter_map(|i| i.stats.clone()).collect();
        (!all.is_empty()).then(|| IomStats::usable(&all, self.n))
    }

    /// What the operator should do, one line each (ZFS's `action:`).
    pub fn actions(&self) -> Vec<String> {
        let d = self.dir.display();
        let mut a = Vec::new();
        if self.verdict() == Verdict::Unreachable {
            a.push(format!(
                "no IOM answers: start them (`iomfs local start-iom --dir {d} --id I`, or `systemctl start \
                 iom-server@I`), or check the addresses in {d}/cluster.toml and the network"
            ));
            return a;
        }
        for i in &self.ioms {
            let id = i.id.0;
            match self.iom_state(i) {
                ("down", Some(p)) => a.push(format!(
                    "IOM {id} is down (IOM {} serves its blocks): restart it (`iomfs local start-iom --dir {d} --id \
                     {id}` or `systemctl start iom-server@{id}`); if its disk is lost, put in a new one and run \
                     `iomfs replace --dir {d} --id {id}`",
                    p.0
                )),
                ("unreachable", _) => a.push(format!(
                    "IOM {id} does not answer at {}: check that it runs (its pid file, its log) and that the \
                     network reaches it",
                    i.addr
                )),
                ("starting", _) => a.push(format!("none for IOM {id}: it is starting (replaying its journal)")),
                ("rebuilding", _) => {
                    let (dn, t) = i.stats.as_ref().map(|s| (s.rebuild_done, s.rebuild_total)).unwrap_or((0, 0));
                    a.push(format!(
                        "none for IOM {id}: it rebuilds what it missed ({dn} of {t} blocks); the cluster is \
                         degraded until it is done"
                    ))
                }
                _ => {}
            }
        }
        if self.verdict() == Verdict::Stopped {
            a.insert(
                0,
                "the cluster is stopped (more than one IOM out): bring the IOMs below back; I/O resumes \
                 once all but one serve"
                    .to_string(),
            );
        }
        if !self.fill().is_empty() {
            a.push("free space: delete files, or give the full IOMs' filesystems more room".to_string());
        }
        a
    }

    /// The status as JSON (schema in docs/operations.md, "Status").
    pub fn json(&self) -> serde_json::Value {
        use serde_json::json;
        let ioms: Vec<serde_json::Value> = self
            .ioms
            .iter()
            .map(|i| {
                let (state, proxy) = self.iom_state(i);
                let rebuild = i.stats.as_ref().filter(|_| state == "rebuilding").map(|s| {
                    json!({
                        "done_blocks": s.rebuild_done,
                        "total_blocks": s.rebuild_total,
                        "bytes": s.rebuild_bytes,
                        "elapsed_seconds": s.rebuild_elapsed_ms as f64 / 1000.0,
                        "bytes_per_second": s.rebuild_bytes_per_s,
                        "eta_seconds": s.rebuild_eta_s,
                    })
                });
                json!({
                    "id": i.id.0,
                    "addr": i.addr,
                    "pid": i.pid,
                    "state": state,
                    "proxy": proxy.map(|p| p.0),
                    "version": i.stats.as_ref().map(|s| s.version.clone()),
                    "protocol": i.protocol,
                    "epoch": i.stats.as_ref().map(|s| s.epoch),
                    "disk_bytes": i.stats.as_ref().map(|s| s.disk_bytes),
                    "room_bytes": i.stats.as_ref().map(|s| s.room_bytes),
                    "errors": i.stats.as_ref().map(|s| json!({
                        "disk": s.disk_errors,
                        "repaired_blocks": s.repaired_blocks,
                        "repaired_parity": s.repaired_parity,
                    })),
                    "rebuild": rebuild,
                    "stats": i.stats,
                })
            })
            .collect();
        let fill = self.fill();
        let capacity = self.capacity().map(|(free, total)| {
            json!({
                "usable_bytes": total,
                "free_bytes": free,
                "used_bytes": total.saturating_sub(free),
                "nearfull": fill.iter().any(|(_, _, full)| !full),
                "full": fill.iter().any(|(_, _, full)| *full),
            })
        });
        json!({
            "schema": 1,
            "state": self.verdict().name(),
            "exit_code": self.verdict().exit_code(),
            "epoch": self.map.epoch.0,
            "ioms": ioms,
            "capacity": capacity,
            "warnings": self.warnings(),
            "actions": self.actions(),
            "last_scrub": self.last_scrub,
        })
    }
    pub fn health(&self) -> Health {
        let h = self.map.health();
        // An IOM the map calls up but that does not answer, or that has not
        // learnt the map yet, serves nothing: the cluster is not healthy.
        let unreachable = self
            .ioms
            .iter()
            .filter(|i| self.map.state(i.id) == IomState::Up && !i.stats.as_ref().is_some_and(|s| s.serving))
            .count();
        let down = self.map.not_up().len() + unreachable;
        match (h, down) {
            (Health::Stopped, _) => Health::Stopped,
            (_, 0) => Health::Healthy,
            (_, 1) => Health::Degraded,
            _ => Health::Stopped,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        for i in &self.ioms {
            let state = match (self.iom_state(i), &i.stats) {
                (("rebuilding", Some(p)), Some(s)) => {
                    format!("rebuilding {} (proxied by {})", rebuild_progress(s), p.0)
                }
                ((word, Some(p)), _) => format!("{word} (proxied by {})", p.0),
                ((word, None), _) => word.to_string(),
            };
            let pid = i.pid.map(|p| format!("pid {p}")).unwrap_or_else(|| "pid -".into());
            let version = i.stats.as_ref().map(|s| format!("  v{}", s.version)).unwrap_or_default();
            let version = match i.protocol {
                Some(p) => format!("{version} protocol {p}"),
                None => version,
            };
            out.push_str(&format!("IOM {:<3} {:<22} {:<10} {state}{version}\n", i.id.0, i.addr, pid));
        }
        for w in self.warnings() {
            out.push_str(&format!("warning: {w}\n"));
        }
        if let Some((free, total)) = self.capacity() {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            let used = if total == 0 { 0.0 } else { 100.0 * total.saturating_sub(free) as f64 / total as f64 };
            out.push_str(&format!(
                "capacity: {:.1} GiB usable, {:.1} GiB free ({used:.0}% used)\n",
                gib(total),
                gib(free)
            ));
        }
        if let Some(s) = &self.last_scrub {
            out.push_str(&format!("last scrub: {}\n", s.summary()));
        }
        out.push_str(&format!("epoch {}\n", self.map.epoch.0));
        out.push_str(&format!("cluster: {}\n", self.verdict().name()));
        for a in self.actions() {
            out.push_str(&format!("action: {a}\n"));
        }
        out
    }

    /// What an operator should act on although the cluster serves: disks
    /// nearly full (less than 10 % of the filesystem left for writes, the
    /// point where Ceph says `nearfull`) or full (writes get ENOSPC).
    pub fn warnings(&self) -> Vec<String> {
        let mib = |b: u64| b >> 20;
        self.fill()
            .into_iter()
            .map(|(id, s, full)| {
                if full {
                    format!(
                        "IOM {} disk full: writes get ENOSPC (filesystem {} MiB); delete files or add space",
                        id.0,
                        mib(s.disk_bytes)
                    )
                } else {
                    format!(
                        "IOM {} disk nearly full: {} MiB of {} MiB left for writes",
                        id.0,
                        mib(s.room_bytes),
                        mib(s.disk_bytes)
                    )
                }
            })
            .chain(self.older_protocols())
            .collect()
    }

    /// IOMs that speak an older protocol than the newest one in the
    /// cluster: an upgrade half done (features of the newer version wait).
    fn older_protocols(&self) -> Vec<String> {
        let newest = self.ioms.iter().filter_map(|i| i.protocol).max().unwrap_or(0);
        self.ioms
            .iter()
            .filter_map(|i| i.protocol.filter(|&p| p < newest).map(|p| (i.id, p)))
            .map(|(id, p)| {
                format!(
                    "IOM {} speaks protocol {p}, others {newest}: finish the upgrade (docs/operations.md, Upgrades)",
                    id.0
                )
            })
            .collect()
    }

    /// The IOMs past nearfull, each with whether it is full (less room
    /// than a block).
    fn fill(&self) -> Vec<(IomId, &IomStats, bool)> {
        self.ioms
            .iter()
            .filter_map(|i| i.stats.as_ref().map(|s| (i.id, s)))
            .filter_map(|(id, s)| {
                let full = s.room_bytes < self.block_size();
                (full || s.disk_bytes > 0 && s.room_bytes < s.disk_bytes / 10).then_some((id, s, full))
            })
            .collect()
    }

    fn block_size(&self) -> u64 {
        self.ioms.iter().filter_map(|i| i.stats.as_ref()).map(|s| s.block_size as u64).next().unwrap_or(65536)
    }
}

pub async fn status(c: &ClusterClient) -> Status {
    let p = &c.paths;
    let calls = (0..c.cfg.width()).map(|i| async move {
        let stats = match c
            .pool()
            .call_timeout(IomId(i), &Request::Admin(AdminReq::Stats), Bytes::new(), Duration::from_millis(1500))
            .await
        {
            Ok((Reply::Admin(AdminResp::Stats(s)), _)) => Some(s),
            _ => None,
        };
        let map = if stats.is_some() {
            match c
                .pool()
                .call_timeout(IomId(i), &Request::Member(MemberReq::GetMap), Bytes::new(), Duration::from_millis(1500))
                .await
            {
                Ok((Reply::Member(MemberResp::Map(m)), _)) => Some(m),
                _ => None,
            }
        } else {
            None
        };
        let protocol = if stats.is_some() { c.pool().version(IomId(i)).await.ok() } else { None };
        let addr = c.cfg.ioms[i as usize].addr.clone();
        (IomStatus { id: IomId(i), addr, pid: iom_pid(p, IomId(i)), stats, protocol }, map)
    });
    let mut map = c.map();
    let mut ioms = Vec::new();
    for (s, m) in futures::future::join_all(calls).await {
        if let Some(m) = m {
            if m.epoch > map.epoch {
                map = m;
            }
        }
        ioms.push(s);
    }
    let here = fs_client::scrub::LastScrub::load(&c.paths.dir);
    let kept = fs_client::scrub::last_from_ioms(c).await;
    let last_scrub = here.into_iter().chain(kept).max_by_key(|s| s.finished_unix);
    Status { map, ioms, dir: c.paths.dir.clone(), n: c.layout.n(), last_scrub }
}

/// `iomfs status --watch`: on a terminal, redraws every second, with a
/// progress bar (blocks and groups, rate, ETA) only while an IOM rebuilds;
/// into a pipe or a file, prints the whole status, a timestamp first,
/// every 5 s. Ends on Ctrl-C.
pub async fn watch(c: &ClusterClient) {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stdout());
    let idle =
        indicatif::ProgressStyle::with_template("{msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let busy = indicatif::ProgressStyle::with_template("{msg}rebuild {wide_bar} {pos}/{len} blocks and groups")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    loop {
        let s = status(c).await;
        if tty {
            let rebuilding: Vec<&IomStats> = s
                .ioms
                .iter()
                .filter(|i| matches!(s.map.state(i.id), IomState::Rebuilding { .. }))
                .filter_map(|i| i.stats.as_ref())
                .collect();
            if rebuilding.is_empty() {
                bar.set_style(idle.clone());
            } else {
                let (done, total) =
                    rebuilding.iter().fold((0, 0), |(d, t), st| (d + st.rebuild_done, t + st.rebuild_total));
                bar.set_style(busy.clone());
                bar.set_length(total.max(done));
                bar.set_position(done);
            }
            bar.set_message(s.render());
        } else {
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
            println!("{now}\n{}", s.render());
        }
        let pause = if tty { Duration::from_secs(1) } else { Duration::from_secs(5) };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    bar.finish();
}
