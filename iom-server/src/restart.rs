//! An IOM the cluster declared down while it was in fact running (it was
//! silent to the majority for longer than `failure_timeout_ms`: a stalled
//! process, an overloaded machine, a network blip) restarts itself, so it
//! replays its journal and rejoins like any IOM coming back (DESIGN §6),
//! instead of leaving the cluster degraded until an operator notices.
//!
//! It re-executes its own binary with the same arguments (same pid, so the
//! pid file stays right; every descriptor is close-on-exec, so the directory
//! lock and the UDP port are free for the new image). Losing what was in
//! memory is the same as a crash, which the journal is built for. Like a
//! Ceph OSD "wrongly marked down", it does this at most `MAX_MARKDOWNS`
//! times in `MARKDOWN_PERIOD`; after that it exits with status 3 and says
//! why, because an IOM that keeps being declared down needs an operator.

use common::{Epoch, IomId};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Environment variable carrying the times (Unix seconds) this IOM was
/// declared down before, across its restarts.
const MARKDOWNS_ENV: &str = "IOMFS_MARKDOWNS";
pub const MAX_MARKDOWNS: usize = 5;
pub const MARKDOWN_PERIOD: Duration = Duration::from_secs(600);

/// The earlier declarations still inside the period, plus `now`.
pub fn recent_markdowns(previous: Option<&str>, now: u64) -> Vec<u64> {
    let mut v: Vec<u64> = previous
        .unwrap_or("")
        .split(',')
        .filter_map(|t| t.trim().parse::<u64>().ok())
        .filter(|&t| t <= now && now - t < MARKDOWN_PERIOD.as_secs())
        .collect();
    v.push(now);
    v
}

/// Restarts this process to rejoin the cluster; never returns.
pub fn rejoin_by_restart(id: IomId, epoch: Epoch) -> ! {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let times = recent_markdowns(std::env::var(MARKDOWNS_ENV).ok().as_deref(), now);
    if times.len() > MAX_MARKDOWNS {
        eprintln!(
            "iom-server {id}: declared down by the cluster in epoch {epoch}, the {}th time in {} s; \
             not restarting again: check this machine's load and network, or raise failure_timeout_ms \
             in cluster.toml, then start this IOM",
            times.len(),
            MARKDOWN_PERIOD.as_secs()
        );
        std::process::exit(3);
    }
    let exe = match std::env::current_exe() {
        // The binary was replaced on disk since start-up: run the new one,
        // as a restart by hand would.
        Ok(p) => match p.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(s) => std::path::PathBuf::from(s),
            None => p,
        },
        Err(e) => {
            eprintln!("iom-server {id}: declared down in epoch {epoch}; cannot find own binary to restart ({e}): exiting, start it again to rejoin");
            std::process::exit(3);
        }
    };
    let list: Vec<String> = times.iter().map(|t| t.to_string()).collect();
    eprintln!(
        "iom-server {id}: declared down by the cluster in epoch {epoch}; restarting ({} of {} allowed in {} s) to rejoin",
        times.len(),
        MAX_MARKDOWNS,
        MARKDOWN_PERIOD.as_secs()
    );
    let err = std::os::unix::process::CommandExt::exec(
        std::process::Command::new(&exe).args(std::env::args_os().skip(1)).env(MARKDOWNS_ENV, list.join(",")),
    );
    eprintln!("iom-server {id}: restart of {} failed ({err}): exiting, start it again to rejoin", exe.display());
    std::process::exit(3);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdowns_outside_the_period_or_malformed_are_forgotten() {
        assert_eq!(recent_markdowns(None, 1000), vec![1000]);
        assert_eq!(recent_markdowns(Some(""), 1000), vec![1000]);
        assert_eq!(recent_markdowns(Some("100,x,500,999"), 1000), vec![500, 999, 1000]);
        // A time in the future (clock stepped back) is not counted.
        assert_eq!(recent_markdowns(Some("2000"), 1000), vec![1000]);
        let many = "1,2,3,4,5";
        assert_eq!(recent_markdowns(Some(many), 10).len(), MAX_MARKDOWNS + 1);
    }
}
