//! Which peers this IOM hears, as a pure state machine: every method takes
//! `now` (like quinn-proto's `poll_transmit(now, …)`), so its rules are
//! tested with made-up instants instead of sleeps. `Membership` owns one
//! behind a lock and passes `Instant::now()`.
//!
//! The rules: a peer silent for the failure timeout is *suspected*, but a
//! silence that began while this IOM itself was not running (a stalled
//! process or machine, seen as a tick that came late) is not held against
//! peers: they get a full failure timeout from the moment this IOM resumed.
//! The quorum lease does not get that grace: an IOM that has not heard a
//! majority for half the failure timeout refuses writes, so by the time the
//! others take its role over it has stopped changing anything.

use common::cluster::IomState;
use common::IomId;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Liveness {
    me: IomId,
    heartbeat: Duration,
    failure_timeout: Duration,
    started: Instant,
    last_seen: Vec<Option<Instant>>,
    /// When this IOM's own liveness loops last ran.
    last_tick: Instant,
    /// When they last resumed after running late.
    resumed: Option<Instant>,
}

impl Liveness {
    pub fn new(me: IomId, width: u32, heartbeat: Duration, failure_timeout: Duration, now: Instant) -> Liveness {
        Liveness {
            me,
            heartbeat,
            failure_timeout,
            started: now,
            last_seen: vec![None; width as usize],
            last_tick: now,
            resumed: None,
        }
    }

    fn majority(&self) -> usize {
        self.last_seen.len() / 2 + 1
    }

    /// `j` answered a heartbeat (or sent one) at `now`.
    pub fn seen(&mut self, j: IomId, now: Instant) {
        if let Some(s) = self.last_seen.get_mut(j.0 as usize) {
            *s = Some(now);
        }
    }

    /// Time since `j` was last heard (since start-up if never).
    pub fn silence(&self, j: IomId, now: Instant) -> Duration {
        let since = self.last_seen.get(j.0 as usize).copied().flatten().unwrap_or(self.started);
        now.saturating_duration_since(since)
    }

    /// Called by the heartbeat and detector loops each time they run. A gap
    /// well beyond the heartbeat period means this IOM itself was not
    /// running: returns by how much it was late, and from now on peers get
    /// a fresh failure timeout before being accused.
    pub fn tick(&mut self, now: Instant) -> Option<Duration> {
        let gap = now.saturating_duration_since(self.last_tick);
        self.last_tick = now;
        if gap > self.heartbeat + self.failure_timeout / 4 {
            self.resumed = Some(now);
            return Some(gap - self.heartbeat);
        }
        None
    }

    /// Silence of `j` that counts against it: not longer than the time
    /// since this IOM last resumed from a stall of its own.
    pub fn accusable_silence(&self, j: IomId, now: Instant) -> Duration {
        let s = self.silence(j, now);
        match self.resumed {
            Some(r) => s.min(now.saturating_duration_since(r)),
            None => s,
        }
    }

    pub fn suspects(&self, j: IomId, now: Instant) -> bool {
        j != self.me && self.accusable_silence(j, now) > self.failure_timeout
    }

    /// Whether this IOM heard from a majority (itself included) within the
    /// quorum lease (half the failure timeout); always within the first
    /// failure timeout after start-up.
    pub fn has_quorum(&self, now: Instant) -> bool {
        if now.saturating_duration_since(self.started) < self.failure_timeout {
            return true;
        }
        let lease = self.failure_timeout / 2;
        let heard = (0..self.last_seen.len() as u32)
            .map(IomId)
            .filter(|&j| j != self.me && self.silence(j, now) < lease)
            .count();
        heard + 1 >= self.majority()
    }

    /// Whether this IOM's view of `changed` supports a proposal (by
    /// `proposer`) that puts it in state `to`.
    pub fn agrees(&self, to: IomState, changed: IomId, proposer: IomId, now: Instant) -> bool {
        match to {
            // An IOM may always declare itself down (a replacement whose
            // store is not rebuilt yet).
            IomState::Down { .. } if proposer == changed => true,
            // Declaring another down: it must be silent to us too (half the
            // timeout: heartbeats from different IOMs are not in step).
            IomState::Down { .. } => {
                changed != self.me && self.accusable_silence(changed, now) > self.failure_timeout / 2
            }
            // It comes back: we must hear it.
            IomState::Up | IomState::Rebuilding { .. } => {
                changed == self.me || self.silence(changed, now) < self.failure_timeout
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HB: Duration = Duration::from_millis(20);
    const FT: Duration = Duration::from_millis(400);

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Ticks every heartbeat from `from` until `j` is suspected; returns
    /// when, or None within 100 heartbeats.
    fn suspected_at(l: &mut Liveness, j: IomId, from: Instant) -> Option<Instant> {
        (1..=100).map(|k| from + HB * k).find(|&t| {
            l.tick(t);
            l.suspects(j, t)
        })
    }

    #[test]
    fn a_silent_peer_is_suspected_after_the_failure_timeout_and_never_oneself() {
        let t0 = Instant::now();
        let mut l = Liveness::new(IomId(0), 5, HB, FT, t0);
        l.seen(IomId(1), t0);
        let at = suspected_at(&mut l, IomId(1), t0).expect("suspected");
        assert!(at - t0 > FT && at - t0 <= FT + HB, "suspected {:?} after its last answer", at - t0);
        assert!(!l.suspects(IomId(0), at + FT * 10), "an IOM never suspects itself");
        // A peer heard again is no longer suspected.
        l.seen(IomId(1), at);
        assert!(!l.suspects(IomId(1), at + HB));
    }

    #[test]
    fn silence_seen_after_a_stall_of_our_own_is_not_held_against_peers() {
        let t0 = Instant::now();
        let mut l = Liveness::new(IomId(0), 5, HB, FT, t0);
        l.seen(IomId(1), t0);
        assert_eq!(l.tick(t0 + HB), None);
        // This IOM does not run for 3 timeouts (a stalled process or VM).
        let back = t0 + HB + FT * 3;
        assert_eq!(l.tick(back), Some(FT * 3 - HB), "the stall is reported with its length");
        assert!(l.silence(IomId(1), back) > FT);
        assert!(!l.suspects(IomId(1), back), "accused a peer for our own stall");
        let down = IomState::Down { proxy: IomId(2) };
        assert!(!l.agrees(down, IomId(1), IomId(2), back), "voted a peer down for our own stall");
        // An IOM declaring itself down (a replacement) is always believed.
        assert!(l.agrees(down, IomId(1), IomId(1), back));
        // The quorum lease still sees the plain silence: a stalled IOM
        // refuses writes until it hears the majority again.
        assert!(!l.has_quorum(back));
        // Peers that stay silent a full timeout after we resumed are suspected.
        let at = suspected_at(&mut l, IomId(1), back).expect("suspected after the grace");
        assert!(at - back > FT && at - back <= FT + HB);
        assert!(l.agrees(down, IomId(1), IomId(2), at));
    }

    #[test]
    fn regular_ticks_leave_silence_as_it_is() {
        let t0 = Instant::now();
        let mut l = Liveness::new(IomId(0), 5, HB, FT, t0);
        for k in 1..=10 {
            assert_eq!(l.tick(t0 + HB * k), None);
        }
        // A tick late by less than a quarter of the failure timeout is not a stall.
        assert_eq!(l.tick(t0 + HB * 10 + HB + ms(99)), None);
        assert_eq!(l.silence(IomId(3), t0 + ms(500)), ms(500), "never heard: silent since start-up");
    }

    #[test]
    fn quorum_needs_a_majority_heard_within_half_the_timeout() {
        let t0 = Instant::now();
        let mut l = Liveness::new(IomId(0), 5, HB, FT, t0);
        assert!(l.has_quorum(t0 + ms(10)), "the first failure timeout after start-up");
        let t = t0 + FT * 2;
        assert!(!l.has_quorum(t), "heard nobody");
        l.seen(IomId(1), t);
        assert!(!l.has_quorum(t), "2 of 5 is no majority");
        l.seen(IomId(4), t);
        assert!(l.has_quorum(t));
        assert!(l.has_quorum(t + FT / 2 - ms(1)));
        assert!(!l.has_quorum(t + FT / 2), "the lease ran out");
    }

    #[test]
    fn a_returning_iom_must_be_heard() {
        let t0 = Instant::now();
        let mut l = Liveness::new(IomId(0), 5, HB, FT, t0);
        let t = t0 + FT * 3;
        assert!(!l.agrees(IomState::Up, IomId(2), IomId(2), t));
        l.seen(IomId(2), t);
        assert!(l.agrees(IomState::Rebuilding { proxy: IomId(3) }, IomId(2), IomId(2), t + ms(1)));
        assert!(l.agrees(IomState::Up, IomId(0), IomId(1), t), "this IOM hears itself");
        // Declaring another down needs half a timeout of silence here.
        assert!(!l.agrees(IomState::Down { proxy: IomId(3) }, IomId(2), IomId(3), t + FT / 2 - ms(1)));
        assert!(l.agrees(IomState::Down { proxy: IomId(3) }, IomId(2), IomId(3), t + FT / 2 + ms(1)));
    }
}
