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
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("IOMFS_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        // A log line that cannot be written (the log's disk is full) is
        // dropped: the default reports it with `eprintln!`, which panics
        // when stderr cannot be written either, killing whatever task
        // logged (a parity worker, a write in flight) half way.
        .log_internal_errors(false)
        .init();
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
