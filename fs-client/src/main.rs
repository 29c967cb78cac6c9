//! `iomfs`: the operator CLI and FUSE client of iomfs.

mod cli;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use cli::{bench, init, local, mount};
use common::config::TransportProfile;
use fs_client::{scrub, ClusterClient};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "iomfs", version, about = "iomfs: a distributed POSIX filesystem with data+parity striping")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Make a new cluster directory: config, CA, certificates, one iom-<id>/ per IOM.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Number of IOMs (W = N data + 1 parity).
        #[arg(long, default_value_t = 5)]
        ioms: u32,
        /// Block size (power of two, 4K..4M).
        #[arg(long, default_value = "64K")]
        block_size: String,
        /// Comma-separated host:port of every IOM (multi-host clusters).
        #[arg(long, value_delimiter = ',')]
        addrs: Option<Vec<String>>,
        /// Host for generated addresses.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// First UDP port for generated addresses (default: pick free ports).
        #[arg(long, default_value_t = 0)]
        base_port: u16,
        /// IOM that is home of the namespace.
        #[arg(long, default_value_t = 0)]
        meta_home: u32,
        /// Transport tuning: loopback, lan or wan.
        #[arg(long, default_value = "loopback")]
        transport: String,
        /// Give IOM i a Prometheus endpoint on 127.0.0.1:(PORT + i)
        /// (`metrics_addr` in cluster.toml; edit it for another address).
        /// Default: no endpoint.
        #[arg(long)]
        metrics_port: Option<u16>,
    },
    /// Check every parity group and checksum of a running cluster.
    Scrub {
        #[arg(long)]
        dir: PathBuf,
        /// Repair what can be repaired (a damaged block is rebuilt from its
        /// group, a parity that disagrees with its data is recomputed), then
        /// scrub again.
        #[arg(long)]
        repair: bool,
    },
    /// Check the namespace (reachability, link counts, entries) and the data
    /// objects the IOMs hold against it (orphans, blocks past a file's size).
    Fsck {
        #[arg(long)]
        dir: PathBuf,
        /// Fix what can be fixed without a choice (entries naming missing
        /// inodes, link counts, unreachable files into /lost+found,
        /// counters) and turn orphan objects into garbage the GC drops.
        #[arg(long)]
        repair: bool,
    },
    /// Block-level load generator (no FUSE): MB/s and IOPS per toughness.
    Bench {
        #[arg(long)]
        dir: PathBuf,
        /// Bytes per sequential test.
        #[arg(long, default_value = "256M")]
        size: String,
        /// Requests in flight.
        #[arg(long, default_value_t = 16)]
        depth: usize,
        /// Random 4 KiB operations per toughness.
        #[arg(long, default_value_t = 4000)]
        random_ops: u64,
        /// Instead: failover measurements, killing this IOM of a local cluster.
        #[arg(long)]
        failover: Option<u32>,
    },
    /// Mount the cluster whose config is in DIR at MNT (foreground unless --detach).
    Mount {
        #[arg(long)]
        dir: PathBuf,
        /// Mount point.
        mnt: PathBuf,
        /// Mount options: toughness=buffered|fast|atomic|durable, attr_timeout=S, entry_timeout=S, ro,
        /// buffer_mb=N, buffer_file_mb=N, buffer_age=S (the buffered level's buffer).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
        /// Return once mounted, leaving the client running in the background.
        #[arg(long)]
        detach: bool,
        /// Log to this file, rotated at 16 MiB (FILE.1 ... FILE.5 kept);
        /// with `--detach` and no `--log-file`, D/mount_<path>.log.
        #[arg(long, value_name = "FILE")]
        log_file: Option<PathBuf>,
    },
    /// Write systemd units for this host: iom-server@.service (one instance
    /// per IOM id, Type=notify) and, with --mount, a mount unit for a client.
    InstallUnits {
        #[arg(long)]
        dir: PathBuf,
        /// Where to write the unit files.
        #[arg(long, default_value = "/etc/systemd/system")]
        out: PathBuf,
        /// Directory holding the installed iom-server (scripts/install).
        #[arg(long, default_value = "/usr/local/bin")]
        bin_dir: PathBuf,
        /// Also write a mount unit mounting the cluster here.
        #[arg(long)]
        mount: Option<PathBuf>,
        /// The mount unit's options (as `iomfs mount -o`).
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
    /// Print a shell completion script: `iomfs completions bash >
    /// /usr/share/bash-completion/completions/iomfs` (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page iomfs(1) in roff: `iomfs man > /usr/local/share/man/man1/iomfs.1`.
    Man,
    /// Send every buffered write of the mount at MNT to the IOMs (sync(1) does not reach a FUSE mount).
    Sync {
        /// Mount point.
        mnt: PathBuf,
    },
    /// Run a whole cluster on this machine and mount it (or: local stop, local start-iom).
    #[command(args_conflicts_with_subcommands = true)]
    Local {
        #[command(subcommand)]
        action: Option<LocalAction>,
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        mount: Option<PathBuf>,
        /// IOMs of a new cluster.
        #[arg(long, default_value_t = 5)]
        ioms: u32,
        /// Return once mounted.
        #[arg(long)]
        detach: bool,
        #[arg(short = 'o', value_name = "OPTIONS")]
        options: Vec<String>,
    },
    /// One line per IOM, capacity, the cluster state and what to do; exit
    /// 0 healthy, 1 degraded, 2 stopped, 3 unreachable.
    Status {
        #[arg(long)]
        dir: PathBuf,
        /// Redraw every second (with progress while a rebuild runs).
        #[arg(long)]
        watch: bool,
        /// Print the status as JSON (schema in docs/operations.md).
        #[arg(long, conflicts_with = "watch")]
        json: bool,
    },
    /// Put an empty disk in place of IOM ID's lost one: start the IOM as a
    /// replacement that rebuilds everything it held from the other IOMs
    /// (like `zpool replace`). The cluster stays degraded until that is done.
    Replace {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: u32,
    },
    /// Print every IOM's counters (one `name value` line each, or JSON);
    /// exit 3 when no IOM answers, 1 when some do not.
    Stats {
        #[arg(long)]
        dir: PathBuf,
        /// One JSON array of the IOMs' counters.
        #[arg(long)]
        json: bool,
    },
    /// Caches of a running cluster.
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
}

#[derive(Subcommand, Debug)]
enum CacheAction {
    /// Empty every IOM's block cache and drop its block file's cached pages,
    /// so that reads measured next come from the disks. For benchmarks: run
    /// it after `sync; echo 3 > /proc/sys/vm/drop_caches`, which empties the
    /// kernel's caches (a mount's page cache included; the client holds no
    /// data cache of its own). Exits 1 if an IOM could not be asked.
    Drop {
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum LocalAction {
    /// Unmount and stop the local cluster.
    Stop {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Start one IOM of a local cluster again (after a crash).
    StartIom {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        id: u32,
    },
}

fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let helper = mount::helper_args(&args);
    let cli = if helper.is_some() { None } else { Some(Cli::parse()) };
    if let Err(e) = common::wire::protocol_max_from_env() {
        eprintln!("iomfs: {e}");
        return std::process::ExitCode::from(2);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("IOMFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A log line that cannot be written (the log's disk is full) is
    // dropped: the default reports it with `eprintln!`, which panics when
    // stderr cannot be written either, killing whatever task logged (a
    // parity worker, a write in flight) half way.
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).log_internal_errors(false);
    match cli.as_ref().and_then(|c| match &c.cmd {
        Cmd::Mount { log_file: Some(p), .. } => Some(p.clone()),
        _ => None,
    }) {
        Some(p) => b
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file_rotate::FileRotate::new(
                p,
                file_rotate::suffix::AppendCount::new(5),
                file_rotate::ContentLimit::BytesSurpassed(16 << 20),
                file_rotate::compression::Compression::None,
                None,
            )))
            .init(),
        None => b.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_writer(std::io::stderr).init(),
    }
    let r = match (cli, helper) {
        (Some(cli), _) => run(cli),
        (None, Some(h)) => mount::run_helper(&h).map(|()| 0),
        (None, None) => unreachable!("either a command line or a helper's"),
    };
    match r {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("iomfs: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("start async runtime")
}

fn run(cli: Cli) -> Result<u8> {
    match cli.cmd {
        Cmd::Init { dir, ioms, block_size, addrs, host, base_port, meta_home, transport, metrics_port } => {
            let block_size = init::parse_size(&block_size)?;
            let transport = match transport.as_str() {
                "loopback" => TransportProfile::Loopback,
                "lan" => TransportProfile::Lan,
                "wan" => TransportProfile::Wan,
                other => anyhow::bail!("--transport {other}: expected loopback, lan or wan"),
            };
            let cfg = init::init(
                &dir,
                &init::InitOptions {
                    ioms,
                    block_size: u32::try_from(block_size).context("--block-size too large")?,
                    addrs,
                    host,
                    base_port,
                    meta_home,
                    transport,
                    metrics_port,
                },
            )?;
            println!(
                "initialised cluster {} in {}: {} IOMs ({} data + 1 parity), {}-byte blocks",
                cfg.cluster_id,
                dir.display(),
                cfg.ioms.len(),
                cfg.ioms.len() - 1,
                cfg.block_size
            );
            for i in &cfg.ioms {
                println!("  IOM {} at {}", i.id, i.addr);
            }
            Ok(0)
        }
        Cmd::Scrub { dir, repair } => runtime()?.block_on(async {
            let c = ClusterClient::connect(&dir).await?;
            let run = |c: std::sync::Arc<ClusterClient>| async move {
                // On a terminal a bar; into a pipe or a log, a line every 10 s.
                let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
                let bar = indicatif::ProgressBar::hidden();
                if tty {
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                    if let Ok(st) = indicatif::ProgressStyle::with_template(
                        "scrub {wide_bar} {pos}/{len} groups ({percent}%, {per_sec}, ETA {eta})",
                    ) {
                        bar.set_style(st);
                    }
                }
                let before = scrub::repairs_so_far(&c).await;
                let (t0, mut said) = (std::time::Instant::now(), std::time::Instant::now());
                let r = scrub::scrub(&c, |d, t| {
                    bar.set_length(t);
                    bar.set_position(d);
                    if !tty && said.elapsed() >= std::time::Duration::from_secs(10) && t > 0 {
                        said = std::time::Instant::now();
                        let rate = d as f64 / t0.elapsed().as_secs_f64().max(0.001);
                        let eta = if rate > 0.0 { format!("{:.0}s", (t - d.min(t)) as f64 / rate) } else { "?".into() };
                        eprintln!(
                            "scrub: {d}/{t} groups ({:.0}%), {rate:.0} groups/s, ETA {eta}",
                            100.0 * d as f64 / t as f64
                        );
                    }
                })
                .await;
                bar.finish_and_clear();
                let r = r.map_err(|e| {
                    anyhow::anyhow!(
                        "scrub stopped: {e}\n(scrub needs every IOM up; `iomfs status --dir D` shows which is not and \
                         its log says why: an IOM stops itself after `disk_errors_before_stop` errors of its disk, \
                         which then needs `iomfs replace`)"
                    )
                })?;
                for p in &r.problems {
                    println!("problem: {p}");
                }
                let healed = scrub::repairs_so_far(&c).await.saturating_sub(before);
                if healed > 0 {
                    println!("scrub: {healed} damaged blocks were rebuilt from their groups while it read them");
                }
                if r.dropping > 0 {
                    println!(
                        "scrub: {} differences in objects being deleted set aside (their drop is under way)",
                        r.dropping
                    );
                }
                println!("scrub: {} groups checked, {} blocks, {} problems", r.groups, r.blocks, r.problems.len());
                Ok::<_, anyhow::Error>(r)
            };
            let started = std::time::Instant::now();
            let before = scrub::repairs_so_far(&c).await;
            let mut repaired = 0u64;
            let mut r = run(c.clone()).await?;
            if repair && !r.problems.is_empty() {
                for (p, done) in scrub::repair(&c, &r.problems).await {
                    match done {
                        Ok(()) => {
                            repaired += 1;
                            println!("repaired: {p}")
                        }
                        Err(e) => println!("not repaired: {p}: {e}"),
                    }
                }
                let left = r.problems.iter().filter(|p| p.fix.is_none()).count();
                if left > 0 {
                    println!("scrub: {left} problems have no automatic repair (see docs/operations.md)");
                }
                println!("scrub: checking again");
                r = run(c.clone()).await?;
            }
            let record = scrub::LastScrub {
                finished_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
                seconds: started.elapsed().as_secs_f64(),
                groups: r.groups,
                blocks: r.blocks,
                problems: r.problems.len() as u64,
                repaired,
                healed: scrub::repairs_so_far(&c).await.saturating_sub(before),
            };
            if let Err(e) = record.save(&dir) {
                eprintln!("scrub: cannot record this scrub in {}: {e}", scrub::LastScrub::path(&dir).display());
            }
            for note in scrub::report_to_ioms(&c, &record).await {
                eprintln!("scrub: {note}");
            }
            c.close();
            Ok(if r.problems.is_empty() { 0 } else { 1 })
        }),
        Cmd::Fsck { dir, repair } => runtime()?.block_on(async {
            let c = ClusterClient::connect(&dir).await?;
            let mut r = fs_client::fsck::fsck(&c).await?;
            let show = |r: &fs_client::fsck::Report| {
                for p in &r.problems {
                    println!("problem: {p}");
                }
                for (o, n) in &r.orphans {
                    println!("orphan: object {o} ({n} blocks) belongs to no file");
                }
                println!(
                    "fsck: {} files, {} blocks, {} problems, {} orphan objects",
                    r.files,
                    r.blocks,
                    r.problems.len(),
                    r.orphans.len()
                );
            };
            show(&r);
            if repair && !r.problems.is_empty() {
                // The namespace first: a file linked back into lost+found
                // is no orphan.
                for f in fs_client::fsck::repair_namespace(&c).await? {
                    println!("repaired: {f}");
                }
                r = fs_client::fsck::fsck(&c).await?;
                show(&r);
            }
            if repair && !r.orphans.is_empty() {
                fs_client::fsck::reclaim(&c, &r.orphans).await?;
                println!("fsck: {} orphan objects handed to the garbage collector; checking again", r.orphans.len());
                tokio::time::sleep(std::time::Duration::from_secs(3)).await;
                r = fs_client::fsck::fsck(&c).await?;
                show(&r);
            }
            if !r.problems.is_empty() {
                println!(
                    "fsck: {} problems need a decision (see \"Checking the namespace\" in docs/operations.md)",
                    r.problems.len()
                );
            }
            c.close();
            Ok(if r.is_clean() { 0 } else { 1 })
        }),
        Cmd::Bench { dir, size, depth, random_ops, failover } => runtime()?.block_on(async {
            let c = ClusterClient::connect(&dir).await?;
            let size = init::parse_size(&size)?;
            let base = 1u64 << 62 | (rand::random::<u32>() as u64) << 8;
            if let Some(v) = failover {
                bench::failover(c.clone(), common::IomId(v), size, base, |l| {
                    println!("{:<44} {:>12.1} {}", l.name, l.value, l.unit)
                })
                .await?;
                c.close();
                return Ok(0);
            }
            bench::run(c.clone(), bench::BenchOptions { size, depth, random_ops, object_base: base }, |l| {
                println!("{:<44} {:>12.1} {}", l.name, l.value, l.unit)
            })
            .await?;
            for i in 0..c.cfg.width() {
                let _ = c.drop_object(common::ObjectId(base + i as u64), common::GroupNo(0)).await;
            }
            c.close();
            Ok(0)
        }),
        Cmd::Mount { dir, mnt, options, detach, log_file } => {
            if detach {
                let pid = mount::mount_detached(&dir, &mnt, &options, log_file.as_deref())?;
                println!("mounted {} at {} (client pid {pid})", dir.display(), mnt.display());
            } else {
                let (fso, debug) = mount::parse_options(&options)?;
                mount::mount_foreground(&dir, &mnt, fso, debug)?;
            }
            Ok(0)
        }
        Cmd::InstallUnits { dir, out, bin_dir, mount, options } => {
            let o = cli::units::UnitOptions { out, bin_dir, mount, options };
            for p in cli::units::install(&dir, &o)? {
                println!("wrote {}", p.display());
            }
            println!(
                "now: systemctl daemon-reload; systemctl enable --now iom-server@ID for each IOM of this host{}",
                if o.mount.is_some() { "; systemctl enable --now the .mount unit" } else { "" }
            );
            Ok(0)
        }
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "iomfs", &mut std::io::stdout());
            Ok(0)
        }
        Cmd::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(cmd).render(&mut std::io::stdout()).context("write the manual page")?;
            Ok(0)
        }
        Cmd::Sync { mnt } => {
            mount::sync(&mnt)?;
            Ok(0)
        }
        Cmd::Local { action: Some(LocalAction::Stop { dir }), .. } => {
            local::stop(&dir)?;
            println!("stopped the local cluster in {}", dir.display());
            Ok(0)
        }
        Cmd::Local { action: Some(LocalAction::StartIom { dir, id }), .. } => {
            let pid = local::start_iom(&dir, common::IomId(id))?;
            println!("IOM {id} running (pid {pid})");
            Ok(0)
        }
        Cmd::Replace { dir, id } => {
            let pid = local::replace_iom(&dir, common::IomId(id))?;
            println!(
                "IOM {id} started as a replacement (pid {pid}): it rebuilds everything it held from the other IOMs \
                 while its proxy serves its blocks; the cluster is degraded until then. \
                 Watch it with `iomfs status --dir {} --watch`.",
                dir.display()
            );
            Ok(0)
        }
        Cmd::Local { action: None, dir, mount, ioms, detach, options } => {
            let dir = dir.context("--dir is required")?;
            let mnt = mount.context("--mount is required")?;
            local::up(&dir, &mnt, ioms, detach, &options)?;
            Ok(0)
        }
        Cmd::Status { dir, watch, json } => runtime()?.block_on(async {
            let c = ClusterClient::connect(&dir).await?;
            if watch {
                local::watch(&c).await;
                c.close();
                return Ok(0);
            }
            let s = local::status(&c).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&s.json()).expect("json"));
            } else {
                print!("{}", s.render());
            }
            c.close();
            Ok(s.verdict().exit_code())
        }),
        Cmd::Cache { action: CacheAction::Drop { dir } } => runtime()?.block_on(async {
            let c = ClusterClient::connect(&dir).await?;
            let mut failed = false;
            for (i, r) in fs_client::bench::drop_caches(&c).await {
                match r {
                    Ok(b) => println!("IOM {i}: cache dropped ({:.1} MiB)", b as f64 / (1 << 20) as f64),
                    Err(e) => {
                        failed = true;
                        println!("IOM {i}: not dropped: {e}");
                    }
                }
            }
            c.close();
            Ok(if failed { 1 } else { 0 })
        }),
        Cmd::Stats { dir, json } => runtime()?.block_on(async {
            let c = ClusterClient::connect(&dir).await?;
            let answers = fs_client::bench::stats_or_why(&c).await;
            c.close();
            let all: Vec<_> = answers.iter().filter_map(|(_, r)| r.as_ref().ok().cloned()).collect();
            if json {
                println!("{}", serde_json::to_string_pretty(&all).expect("json"));
            } else {
                for s in &all {
                    let v = serde_json::to_value(s).expect("json");
                    for (k, x) in v.as_object().into_iter().flatten() {
                        let x = x.as_str().map(String::from).unwrap_or_else(|| x.to_string());
                        println!("iom {} {k} {x}", s.iom);
                    }
                }
            }
            for (i, r) in &answers {
                if let Err(e) = r {
                    eprintln!("iomfs stats: IOM {i} did not answer: {e}");
                }
            }
            if all.is_empty() {
                eprintln!(
                    "iomfs stats: no IOM of {} answers: start them, or check the addresses in its cluster.toml",
                    dir.display()
                );
                return Ok(3);
            }
            Ok(if all.len() < answers.len() { 1 } else { 0 })
        }),
    }
}
