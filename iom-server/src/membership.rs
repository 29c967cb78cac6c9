//! The cluster map as this IOM knows it, heartbeats, and the routing checks
//! made with it.
//!
//! Every IOM pings every other one each `heartbeat_ms`. An IOM silent for
//! `failure_timeout_ms` is *suspected*; the first live IOM after it in ring
//! order (its proxy) proposes a new map — it down, proxied by the proposer —
//! under the next epoch, and the map is committed only when a majority of
//! all IOMs voted for it, each voter checking that it suspects that IOM
//! too. An IOM that has not heard from a majority for half the failure
//! timeout refuses writes (`NoQuorum`), so by the time others take its role
//! over it has stopped changing anything: two IOMs never serve the same
//! blocks. A returning IOM proposes its own way back (rebuilding, then up),
//! which voters grant when they can reach it.

use crate::Error;
use common::cluster::{ClusterMap, IomState};
use common::wire::{Ballot, ErrorCode, Route, WireError};
use common::{Epoch, IomId};
use parking_lot::{Mutex, RwLock};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub struct Membership {
    me: IomId,
    map: RwLock<ClusterMap>,
    changes: watch::Sender<Epoch>,
    last_seen: Mutex<Vec<Option<Instant>>>,
    /// When this IOM's own liveness loops last ran, and when they last
    /// resumed after running late (this process or the whole machine
    /// stalled): see `accusable_silence`.
    ticks: Mutex<(Instant, Option<Instant>)>,
    voted: Mutex<Option<Ballot>>,
    started: Instant,
    pub heartbeat: Duration,
    pub failure_timeout: Duration,
    dir: PathBuf,
}

impl Membership {
    pub fn new(me: IomId, map: ClusterMap, dir: PathBuf, heartbeat: Duration, failure_timeout: Duration) -> Membership {
        let (changes, _) = watch::channel(map.epoch);
        let w = map.width() as usize;
        Membership {
            me,
            map: RwLock::new(map),
            changes,
            last_seen: Mutex::new(vec![None; w]),
            ticks: Mutex::new((Instant::now(), None)),
            voted: Mutex::new(None),
            started: Instant::now(),
            heartbeat,
            failure_timeout,
            dir,
        }
    }

    pub fn me(&self) -> IomId {
        self.me
    }

    pub fn current(&self) -> ClusterMap {
        self.map.read().clone()
    }

    pub fn epoch(&self) -> Epoch {
        self.map.read().epoch
    }

    pub fn width(&self) -> u32 {
        self.map.read().width()
    }

    /// Installs a newer map (and keeps it on disk); older or equal epochs are ignored.
    pub fn install(&self, m: ClusterMap) -> bool {
        {
            let mut cur = self.map.write();
            if m.epoch <= cur.epoch || m.width() != cur.width() {
                return false;
            }
            if let Err(e) = crate::membership_state::save(&self.dir, &m) {
                tracing::error!("cannot persist cluster map: {e}");
            }
            tracing::warn!(iom = self.me.0, epoch = m.epoch.0, states = ?m.states, meta_home = m.meta_home.0, "new cluster map");
            *cur = m;
        }
        let e = self.epoch();
        let _ = self.changes.send(e);
        true
    }

    pub fn subscribe(&self) -> watch::Receiver<Epoch> {
        self.changes.subscribe()
    }

    /// Who serves requests for `role` now.
    pub fn server_for(&self, role: IomId) -> Option<IomId> {
        self.map.read().server_for(role)
    }

    // ------------------------------------------------------------- liveness

    pub fn seen(&self, j: IomId) {
        if let Some(s) = self.last_seen.lock().get_mut(j.0 as usize) {
            *s = Some(Instant::now());
        }
    }

    /// Time since `j` last answered a heartbeat (since start-up if never).
    pub fn silence(&self, j: IomId) -> Duration {
        match self.last_seen.lock().get(j.0 as usize).copied().flatten() {
            Some(t) => t.elapsed(),
            None => self.started.elapsed(),
        }
    }

    /// Called by the heartbeat and detector loops each time they run. A gap
    /// well beyond the heartbeat period means this IOM itself was not
    /// running (a stalled process, a paused or overloaded machine): the
    /// silence it then sees from its peers is its own, so it gives them a
    /// fresh `failure_timeout` before accusing any of them.
    pub fn tick(&self) {
        let now = Instant::now();
        let mut t = self.ticks.lock();
        if now.duration_since(t.0) > self.heartbeat + self.failure_timeout / 4 {
            tracing::warn!(
                iom = self.me.0,
                late_ms = (now.duration_since(t.0) - self.heartbeat).as_millis() as u64,
                "this IOM ran late: peers get a full failure timeout before being suspected"
            );
            t.1 = Some(now);
        }
        t.0 = now;
    }

    /// Silence of `j` that counts against it: not longer than the time since
    /// this IOM last resumed from a stall of its own. Only accusations use
    /// it; the quorum lease (`has_quorum`) keeps the plain silence, so a
    /// stalled IOM still stops writing before others take its role.
    pub fn accusable_silence(&self, j: IomId) -> Duration {
        let s = self.silence(j);
        match self.ticks.lock().1 {
            Some(resumed) => s.min(resumed.elapsed()),
            None => s,
        }
    }

    pub fn suspects(&self, j: IomId) -> bool {
        j != self.me && self.accusable_silence(j) > self.failure_timeout
    }

    pub fn majority(&self) -> usize {
        self.width() as usize / 2 + 1
    }

    /// Whether this IOM heard from a majority (itself included) recently.
    pub fn has_quorum(&self) -> bool {
        let lease = self.failure_timeout / 2;
        if self.started.elapsed() < self.failure_timeout {
            return true;
        }
        let w = self.width();
        let heard = (0..w).filter(|&j| IomId(j) != self.me && self.silence(IomId(j)) < lease).count();
        heard + 1 >= self.majority()
    }

    // --------------------------------------------------------------- voting

    /// Records a vote for `b` if it is newer than any vote given; the caller
    /// checked the proposal makes sense.
    pub fn vote(&self, b: Ballot) -> bool {
        if b.epoch <= self.epoch() {
            return false;
        }
        let mut v = self.voted.lock();
        match *v {
            Some(prev) if prev.epoch >= b.epoch && prev != b => false,
            _ => {
                *v = Some(b);
                true
            }
        }
    }

    /// Whether this IOM agrees with `proposer`'s proposed change of
    /// `changed`'s state.
    pub fn agrees(&self, proposed: &ClusterMap, changed: IomId, proposer: IomId) -> bool {
        match proposed.state(changed) {
            // An IOM may always declare itself down (a replacement whose
            // store is not rebuilt yet).
            IomState::Down { .. } if proposer == changed => true,
            // Declaring another down: it must be silent to us too (half the
            // timeout: heartbeats from different IOMs are not in step).
            IomState::Down { .. } => changed != self.me && self.accusable_silence(changed) > self.failure_timeout / 2,
            // It comes back: we must hear it.
            IomState::Up | IomState::Rebuilding { .. } => {
                changed == self.me || self.silence(changed) < self.failure_timeout
            }
        }
    }

    /// Checks that this IOM serves `route.target` in its current map; writes
    /// also need a quorum.
    pub fn check_route(&self, route: &Route, write: bool) -> Result<(), WireError> {
        let m = self.map.read();
        match m.server_for(route.target) {
            None => Err(WireError::new(ErrorCode::ClusterStopped, "more than one IOM is down: the cluster is stopped")),
            Some(s) if s == self.me => {
                if write && !self.has_quorum() {
                    return Err(WireError::new(
                        ErrorCode::NoQuorum,
                        format!("IOM {} cannot reach a majority of the cluster and refuses writes", self.me),
                    ));
                }
                Ok(())
            }
            Some(s) => Err(WireError::new(
                ErrorCode::NotServing,
                format!(
                    "IOM {} does not serve IOM {}'s blocks in epoch {} (IOM {s} does)",
                    self.me, route.target, m.epoch
                ),
            )),
        }
    }

    /// Whether this IOM stands in for `role` (as its proxy) rather than being it.
    pub fn is_standin_for(&self, role: IomId) -> bool {
        role != self.me
            && matches!(self.map.read().state(role), IomState::Down { proxy } | IomState::Rebuilding { proxy } if proxy == self.me)
    }

    /// The IOM that proposes a change about `j`: the first live one after it.
    pub fn proposer_for(&self, j: IomId) -> Option<IomId> {
        let m = self.map.read();
        let w = m.width();
        (1..w).map(|d| IomId((j.0 + d) % w)).find(|&k| m.state(k) == IomState::Up && !self.suspects(k))
    }
}

/// Errors of membership operations (logged, then retried).
pub fn stopped() -> Error {
    Error::Wire(WireError::new(ErrorCode::ClusterStopped, "cluster stopped"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(hb: u64, timeout: u64) -> Membership {
        let dir = std::env::temp_dir().join(format!("iomfs-member-{}", std::process::id()));
        Membership::new(
            IomId(0),
            ClusterMap::initial(5, IomId(0)),
            dir,
            Duration::from_millis(hb),
            Duration::from_millis(timeout),
        )
    }

    /// Ticks every heartbeat until `j` is suspected; false if it never is
    /// within 5 s (a loaded test machine may oversleep a tick now and then,
    /// which restarts the grace, so no fixed count of ticks is assumed).
    fn ticks_until_suspected(m: &Membership, j: IomId) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            std::thread::sleep(m.heartbeat);
            m.tick();
            if m.suspects(j) {
                return true;
            }
        }
        false
    }

    #[test]
    fn silence_seen_after_a_stall_of_our_own_is_not_held_against_peers() {
        let m = member(20, 400);
        m.seen(IomId(1));
        m.tick();
        // This IOM does not run for 3 timeouts (a stalled process or VM).
        std::thread::sleep(Duration::from_millis(1200));
        assert!(m.silence(IomId(1)) > m.failure_timeout);
        m.tick();
        assert!(!m.suspects(IomId(1)), "accused a peer for our own stall");
        let down = {
            let mut p = m.current();
            p.epoch = Epoch(2);
            p.states[1] = IomState::Down { proxy: IomId(2) };
            p
        };
        assert!(!m.agrees(&down, IomId(1), IomId(2)), "voted a peer down for our own stall");
        // An IOM declaring itself down (a replacement) is always believed.
        assert!(m.agrees(&down, IomId(1), IomId(1)));
        // The quorum lease still sees the plain silence: a stalled IOM
        // refuses writes until it hears the majority again.
        assert!(!m.has_quorum());
        // Peers that stay silent a full timeout after we resumed are suspected.
        assert!(ticks_until_suspected(&m, IomId(1)));
        assert!(m.agrees(&down, IomId(1), IomId(2)));
    }

    #[test]
    fn regular_ticks_leave_silence_as_it_is() {
        let m = member(20, 400);
        m.seen(IomId(1));
        assert!(ticks_until_suspected(&m, IomId(1)));
        assert!(!m.suspects(IomId(0)), "an IOM never suspects itself");
    }
}
