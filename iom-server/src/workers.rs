//! Every task an IOM runs, named and tracked, so that a stop can join them
//! in order and name the ones that did not end.
//!
//! A task belongs to a [`Tier`]; `Iom::stop` ends the tiers in the order
//! they are declared here, each within a deadline, and logs by name every
//! task still running when its tier's deadline passes (a straggler is a
//! bug to fix, never a hang: the process exits after the last tier). No
//! code of the IOM calls `tokio::spawn` itself (clippy's
//! `disallowed-methods` holds that), so there is no task whose handle is
//! dropped and forgotten.

use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The groups of tasks, in the order a stop ends them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Tier {
    /// Accepts connections (new work from outside).
    Intake,
    /// Heartbeats, failure detection, map reactions, join/rejoin/recovery,
    /// rebuild, stand-in activation, checkpoints, the namespace's GC and
    /// mirror: they stop first, so peers stop hearing this IOM at once.
    Background,
    /// The second half of write transactions (a8–a14) and the parity
    /// side's batches and links: drained before the journal closes, so
    /// nothing acknowledged is left half done.
    Protocol,
    /// Connections and their streams (requests, parity channels, mirror
    /// streams): acknowledgements keep flowing while the tiers above
    /// drain; they end when the endpoint closes.
    Connections,
}

const TIERS: usize = 4;

fn index(t: Tier) -> usize {
    match t {
        Tier::Intake => 0,
        Tier::Background => 1,
        Tier::Protocol => 2,
        Tier::Connections => 3,
    }
}

type Live = Arc<Mutex<BTreeMap<&'static str, usize>>>;

struct TierState {
    tracker: TaskTracker,
    stop: CancellationToken,
    live: Live,
}

/// Counts a running task under its name for as long as it lives (also when
/// it panics or is dropped unfinished).
struct LiveGuard {
    live: Live,
    name: &'static str,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        let mut l = self.live.lock();
        if let Some(n) = l.get_mut(self.name) {
            *n -= 1;
            if *n == 0 {
                l.remove(self.name);
            }
        }
    }
}

/// The tracker of every task of one IOM.
pub struct Workers {
    tiers: [TierState; TIERS],
}

impl Default for Workers {
    fn default() -> Self {
        Workers::new()
    }
}

impl Workers {
    /// One tracker and one stop token per tier.
    pub fn new() -> Workers {
        let tier = || TierState { tracker: TaskTracker::new(), stop: CancellationToken::new(), live: Live::default() };
        Workers { tiers: [tier(), tier(), tier(), tier()] }
    }

    /// Runs `f` as a task named `name` in `tier`.
    pub fn spawn<F>(&self, tier: Tier, name: &'static str, f: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let t = &self.tiers[index(tier)];
        *t.live.lock().entry(name).or_default() += 1;
        let guard = LiveGuard { live: t.live.clone(), name };
        t.tracker.spawn(async move {
            let _guard = guard;
            f.await
        })
    }

    /// The token cancelled when `tier` is told to stop.
    pub fn token(&self, tier: Tier) -> CancellationToken {
        self.tiers[index(tier)].stop.clone()
    }

    /// Whether `tier` has been told to stop.
    pub fn stopping(&self, tier: Tier) -> bool {
        self.tiers[index(tier)].stop.is_cancelled()
    }

    /// Tells `tier` to stop and waits up to `within` for its tasks to end;
    /// returns the names (and counts) of those still running.
    pub async fn stop_tier(&self, tier: Tier, within: Duration) -> Vec<(&'static str, usize)> {
        let t = &self.tiers[index(tier)];
        t.stop.cancel();
        self.join_tier(tier, within).await
    }

    /// Waits up to `within` for the tasks of `tier` to end without telling
    /// them to (they end by themselves: a drained queue, a closed
    /// connection); returns those still running.
    pub async fn join_tier(&self, tier: Tier, within: Duration) -> Vec<(&'static str, usize)> {
        let t = &self.tiers[index(tier)];
        t.tracker.close();
        let _ = tokio::time::timeout(within, t.tracker.wait()).await;
        t.live.lock().iter().map(|(n, c)| (*n, *c)).collect()
    }

    /// Names and counts of the tasks running now, by tier.
    #[cfg(test)]
    fn running(&self) -> Vec<(Tier, &'static str, usize)> {
        let all = [Tier::Intake, Tier::Background, Tier::Protocol, Tier::Connections];
        all.iter()
            .flat_map(|tier| {
                let l = self.tiers[index(*tier)].live.lock();
                l.iter().map(|(n, c)| (*tier, *n, *c)).collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn tiers_stop_in_order_and_stragglers_are_named() {
        let w = Workers::new();
        // A background task that obeys its token, one that ignores it.
        let tok = w.token(Tier::Background);
        w.spawn(Tier::Background, "obeys", async move { tok.cancelled().await });
        w.spawn(Tier::Background, "ignores", std::future::pending());
        let proto = w.token(Tier::Protocol);
        w.spawn(Tier::Protocol, "protocol", async move { proto.cancelled().await });
        assert_eq!(w.running().len(), 3);
        // Stopping Background leaves Protocol running.
        let left = w.stop_tier(Tier::Background, Duration::from_millis(100)).await;
        assert_eq!(left, vec![("ignores", 1)]);
        assert!(!w.token(Tier::Protocol).is_cancelled());
        assert!(w.running().iter().any(|(t, n, _)| *t == Tier::Protocol && *n == "protocol"));
        assert!(w.stop_tier(Tier::Protocol, Duration::from_secs(5)).await.is_empty());
        assert!(w.stopping(Tier::Protocol) && !w.stopping(Tier::Connections));
    }

    #[tokio::test]
    async fn a_task_that_panics_is_not_counted_as_running() {
        let w = Workers::new();
        w.spawn(Tier::Protocol, "panics", async { panic!("test") });
        assert!(w.join_tier(Tier::Protocol, Duration::from_secs(5)).await.is_empty());
    }
}
