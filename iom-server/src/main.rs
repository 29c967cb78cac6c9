//! `iom-server --dir D --id I`: runs IOM I of the cluster in D.

use anyhow::Context;
use clap::Parser;
use common::IomId;
use iom_server::{Iom, StartOptions};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "iom-server", version, about = "iomfs storage server (IOM)")]
struct Args {
    /// Cluster directory made by `iomfs init`.
    #[arg(long)]
    dir: PathBuf,
    /// This IOM's id (0-based index in the cluster config).
    #[arg(long)]
    id: u32,
    /// Put the journal on a separate (faster, e.g. NVRAM) path.
    #[arg(long)]
    journal_dir: Option<PathBuf>,
    /// Log to this file instead of stderr, rotated by size: FILE.1 ...
    /// FILE.N hold the older lines (under systemd, leave it out: the
    /// journal keeps stderr).
    #[arg(long, value_name = "FILE")]
    log_file: Option<PathBuf>,
    /// Size at which the log file is rotated, MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=65536))]
    log_max_mib: u64,
    /// Rotated log files kept.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    log_keep: u64,
}

/// `iom-server --man`: the manual page iom-server(8) in roff, printed
/// before the other arguments are required.
fn print_man() -> std::process::ExitCode {
    let cmd = <Args as clap::CommandFactory>::command();
    match clap_mangen::Man::new(cmd).section("8").render(&mut std::io::stdout()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iom-server: cannot write the manual page: {e}");
            std::process::ExitCode::from(1)
        }
    }
}

/// A log file rotated when it passes `max_mib` (`file-rotate`: FILE.1 is
/// the newest older file), `keep` older files kept.
fn rotating(
    path: &std::path::Path,
    max_mib: u64,
    keep: u64,
) -> std::sync::Mutex<file_rotate::FileRotate<file_rotate::suffix::AppendCount>> {
    std::sync::Mutex::new(file_rotate::FileRotate::new(
        path,
        file_rotate::suffix::AppendCount::new(keep as usize),
        file_rotate::ContentLimit::BytesSurpassed((max_mib << 20) as usize),
        file_rotate::compression::Compression::None,
        None,
    ))
}

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("--man") {
        return print_man();
    }
    let args = Args::parse();
    if let Err(e) = common::wire::protocol_max_from_env() {
        eprintln!("iom-server: {e}");
        return std::process::ExitCode::from(2);
    }
    let filter = tracing_subscriber::EnvFilter::try_from_env("IOMFS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // A log line that cannot be written (the log's disk is full) is
    // dropped: the default reports it with `eprintln!`, which panics when
    // stderr cannot be written either, killing whatever task logged (a
    // parity worker, a write in flight) half way.
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).log_internal_errors(false);
    match &args.log_file {
        Some(p) => b.with_ansi(false).with_writer(rotating(p, args.log_max_mib, args.log_keep)).init(),
        None => b.with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())).with_writer(std::io::stderr).init(),
    }
    // A panic is a bug, and the task it ended may have held a transaction
    // half way (a parity worker's group stays busy, a write never finishes):
    // stop the whole IOM, as on a failed fsync, so its proxy takes over and
    // a restart replays the journal, rather than serve on with a dead task.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::exit(70);
    }));
    // The runtime's shape comes from the cluster config; a config that does
    // not load is reported by the start-up below with its full context.
    let threads = common::config::ClusterConfig::load(&args.dir).map(|c| c.tuning.iom_threads).unwrap_or(0);
    let mut b = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads as usize);
        b
    };
    let rt = match b.thread_name("iom").enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("iom-server: cannot start runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("iom-server: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    #[cfg(feature = "failpoints")]
    let _scenario = fail::FailScenario::setup();
    let id = IomId(args.id);
    let iom = Iom::start(StartOptions { dir: args.dir.clone(), id, journal_dir: args.journal_dir })
        .await
        .with_context(|| format!("IOM {} of cluster {}", args.id, args.dir.display()))?;
    let pid_path = iom.paths.pid(id);
    std::fs::write(&pid_path, format!("{}\n", std::process::id()))
        .with_context(|| format!("write pid file {}", pid_path.display()))?;
    tracing::info!(iom = args.id, addr = %iom.endpoint.local_addr()?, "serving");
    iom.start_workers();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // Under systemd (`Type=notify`): ready once the IOM serves requests
    // (it has learnt the cluster map and rejoined), not merely started.
    let mut ready = iom.router.rejoin.ready.subscribe();
    let mut told = false;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            r = ready.wait_for(|r| *r), if !told => {
                told = true;
                if r.is_ok() {
                    let status = format!("STATUS=IOM {} serving", args.id);
                    let _ = sd_notify::notify(
                        false,
                        &[sd_notify::NotifyState::Ready, sd_notify::NotifyState::Custom(&status)],
                    );
                }
            }
        }
    }
    tracing::info!(iom = args.id, "stopping");
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    iom.stop().await;
    let _ = std::fs::remove_file(&pid_path);
    tracing::info!(iom = args.id, "stopped cleanly");
    Ok(())
}
