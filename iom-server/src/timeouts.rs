//! Every time limit of an IOM, in one value derived once from the
//! cluster's `[tuning]` (issue 14, step 1: this replaces the inline
//! `Duration` literals that were spread over the roles).
//!
//! Four kinds, named by what they bound:
//! - **config**: straight from `cluster.toml`, with the floors the code
//!   always applied;
//! - **derived**: fixed multiples of the heartbeat;
//! - **RPC deadlines** and **retry pauses** between peers, and **bounded
//!   waits** for local state. These stay absolute on purpose: the crash
//!   tests run with `failure_timeout_ms = 600 000`, and deadlines scaled
//!   from it would stretch to minutes;
//! - **periodic** ticks of the background workers.
//!
//! At the default tuning every value equals the literal it replaced
//! (`tests::defaults_are_the_old_literals`), except `handover_call`
//! (15 s, was 10 s: see it). Membership keeps its own
//! arithmetic on `heartbeat` and `failure_timeout` (lease, accusation),
//! which it receives from here.

use std::time::Duration;

use common::config::Tuning;

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn s(n: u64) -> Duration {
    Duration::from_secs(n)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    // config
    pub heartbeat: Duration,
    pub failure_timeout: Duration,
    pub journal_flush: Duration,
    // derived
    /// Deadline of a heartbeat ping.
    pub ping_call: Duration,
    /// How long a rejoining IOM waits for its peers to see it up.
    pub rejoin_grace: Duration,
    // RPC deadlines
    /// A short probe of a peer: GetMap, Commit, DoneSeen, Stats.
    pub probe_call: Duration,
    /// A vote on a proposed map.
    pub vote_call: Duration,
    /// A peer's answer about its own state: TxStatus, Unfinished, Unfreeze.
    pub peer_call: Duration,
    /// A call to a role another IOM serves (data, parity, ClearMarks).
    pub role_call: Duration,
    /// RebuildMarks and Freeze: longer than `freeze_drain_max`, so a freeze
    /// that drained to its limit (then flushed its journal) is still
    /// answered. (Equal, as before, a stand-in write stuck in a stopped
    /// cluster made every freeze time out at the caller: the handover that
    /// would have ended the stop never finished.)
    pub handover_call: Duration,
    /// One page of a peer's block or group listing.
    pub listing_call: Duration,
    /// The namespace GC's drop of a batch of objects.
    pub gc_drop_call: Duration,
    // retry pauses
    pub retry_pause: Duration,
    pub unreachable_pause: Duration,
    pub collect_pause: Duration,
    pub link_backoff_min: Duration,
    pub link_backoff_max: Duration,
    pub mirror_retry: Duration,
    pub recovery_backoff_min: Duration,
    pub recovery_backoff_max: Duration,
    // bounded waits
    /// In-flight writes drained at SIGTERM.
    pub shutdown_drain: Duration,
    /// Each tier of tasks (`workers::Tier`) ends within this at a stop.
    pub stop_tier: Duration,
    /// A parity update the parity IOM refused for a passing reason
    /// (`Failed`) is sent again after this.
    pub link_resend_after_failed: Duration,
    /// Rebuilding a block from its group: the pause grows by this per
    /// attempt, up to `reconstruct_cap`, for `reconstruct_attempts` attempts.
    pub reconstruct_step: Duration,
    pub reconstruct_cap: Duration,
    pub reconstruct_attempts: u32,
    /// A delta held in memory applied before a peer is answered about it.
    pub held_delta_wait: Duration,
    /// Running stand-in writes finished before a handover goes on.
    pub freeze_drain_max: Duration,
    /// A stand-in write waits for the stand-in to be active.
    pub standin_ready_max: Duration,
    pub mirror_ack_wait: Duration,
    pub mirror_sync_wait: Duration,
    /// Open transactions on an object before it is dropped anyway.
    pub drop_wait_max: Duration,
    /// The journal's flush when a reader waits on it.
    pub flush_hurry: Duration,
    /// A parity group worker's pause for the rest of a stripe's deltas,
    /// so they share one parity write.
    pub stripe_gather: Duration,
    // periodic
    pub checkpoint_poll: Duration,
    pub namespace_tick: Duration,
    pub statfs_max_age: Duration,
}

impl Timeouts {
    pub fn from_tuning(t: &Tuning) -> Timeouts {
        let heartbeat = ms(t.heartbeat_ms.max(10));
        Timeouts {
            heartbeat,
            failure_timeout: ms(t.failure_timeout_ms.max(100)),
            journal_flush: ms(t.journal_flush_ms.max(1)),
            ping_call: heartbeat * 4,
            rejoin_grace: heartbeat * 3,
            probe_call: s(1),
            vote_call: ms(700),
            peer_call: s(2),
            role_call: s(5),
            handover_call: s(15),
            listing_call: s(10),
            gc_drop_call: s(30),
            retry_pause: ms(300),
            unreachable_pause: ms(500),
            collect_pause: ms(250),
            link_backoff_min: ms(20),
            link_backoff_max: ms(500),
            mirror_retry: ms(200),
            recovery_backoff_min: ms(100),
            recovery_backoff_max: s(2),
            shutdown_drain: s(3),
            stop_tier: s(1),
            link_resend_after_failed: ms(500),
            reconstruct_step: ms(10),
            reconstruct_cap: ms(200),
            reconstruct_attempts: 50,
            held_delta_wait: s(2),
            freeze_drain_max: s(10),
            standin_ready_max: s(10),
            mirror_ack_wait: s(5),
            mirror_sync_wait: s(3),
            drop_wait_max: s(60),
            flush_hurry: ms(100),
            stripe_gather: ms(1),
            checkpoint_poll: s(2),
            namespace_tick: ms(250),
            statfs_max_age: s(2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins every value at the default tuning to the literal it replaced,
    /// so a typo in this table cannot change a timeout unnoticed.
    #[test]
    fn defaults_are_the_old_literals() {
        let t = Timeouts::from_tuning(&Tuning::default());
        assert_eq!(t.reconstruct_attempts, 50);
        let want = [
            (t.heartbeat, 100),
            (t.ping_call, 400),
            (t.rejoin_grace, 300),
            (t.probe_call, 1000),
            (t.vote_call, 700),
            (t.peer_call, 2000),
            (t.role_call, 5000),
            (t.handover_call, 15_000),
            (t.listing_call, 10_000),
            (t.gc_drop_call, 30_000),
            (t.retry_pause, 300),
            (t.unreachable_pause, 500),
            (t.collect_pause, 250),
            (t.link_backoff_min, 20),
            (t.link_backoff_max, 500),
            (t.mirror_retry, 200),
            (t.recovery_backoff_min, 100),
            (t.recovery_backoff_max, 2000),
            (t.shutdown_drain, 3000),
            (t.stop_tier, 1000),
            (t.link_resend_after_failed, 500),
            (t.reconstruct_step, 10),
            (t.reconstruct_cap, 200),
            (t.held_delta_wait, 2000),
            (t.freeze_drain_max, 10_000),
            (t.standin_ready_max, 10_000),
            (t.mirror_ack_wait, 5000),
            (t.mirror_sync_wait, 3000),
            (t.drop_wait_max, 60_000),
            (t.flush_hurry, 100),
            (t.stripe_gather, 1),
            (t.checkpoint_poll, 2000),
            (t.namespace_tick, 250),
            (t.statfs_max_age, 2000),
        ];
        for (i, (got, ms)) in want.iter().enumerate() {
            assert_eq!(*got, Duration::from_millis(*ms), "entry {i}");
        }
        assert_eq!(t.failure_timeout, Duration::from_millis(Tuning::default().failure_timeout_ms));
        assert_eq!(t.journal_flush, Duration::from_millis(Tuning::default().journal_flush_ms));
    }

    /// The floors the code always applied to the configured values, and
    /// that the RPC deadlines do not scale with a huge failure timeout.
    #[test]
    fn floors_hold_and_deadlines_stay_absolute() {
        let t = Timeouts::from_tuning(&Tuning {
            heartbeat_ms: 1,
            failure_timeout_ms: 600_000,
            journal_flush_ms: 0,
            ..Tuning::default()
        });
        assert_eq!(t.heartbeat, Duration::from_millis(10));
        assert_eq!(t.ping_call, Duration::from_millis(40));
        assert_eq!(t.journal_flush, Duration::from_millis(1));
        assert_eq!(t.failure_timeout, Duration::from_secs(600));
        assert_eq!(t.role_call, Duration::from_secs(5));
        let t = Timeouts::from_tuning(&Tuning { failure_timeout_ms: 5, ..Tuning::default() });
        assert_eq!(t.failure_timeout, Duration::from_millis(100));
    }
}
