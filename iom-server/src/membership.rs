//! The cluster map as this IOM knows it, heartbeats, and the routing checks
//! made with it.
//!
//! Every IOM pings every other one each `heartbeat_ms`. An IOM silent for
//! `failure_timeout_ms` is *suspected*; the first live IOM after it in ring
//! order (its proxy) proposes a new map — it down, proxied by the proposer —
//! under the next epoch, and the map is committed only when a majority of
//! all IOMs voted for it, each voter checking that it suspects that IOM
//! too. An IOM that has not heard from a majority for half the failure
//! timeout refuses reads and writes (`NoQuorum`), so by the time others
//! take its role over it has stopped changing and serving anything: two
//! IOMs never serve the same blocks, and nobody reads a block the stand-in
//! has written anew from the IOM cut off. A returning IOM proposes its own way back (rebuilding, then up),
//! which voters grant when they can reach it.

use crate::liveness::Liveness;
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
    /// Whom this IOM hears (a pure machine; see `liveness`).
    live: Mutex<Liveness>,
    /// The ballot this IOM voted for last, with the round of it (0: a
    /// proposer of protocol 7/8, which names no rounds).
    voted: Mutex<Option<(Ballot, u64)>>,
    /// The highest round released of a ballot of the next epoch: a
    /// proposal of that round or an earlier one arriving late is refused
    /// (it would bind this voter to a round its proposer gave up).
    released: Mutex<Option<(Ballot, u64)>>,
    dir: PathBuf,
}

impl Membership {
    pub fn new(me: IomId, map: ClusterMap, dir: PathBuf, heartbeat: Duration, failure_timeout: Duration) -> Membership {
        let (changes, _) = watch::channel(map.epoch);
        let live = Liveness::new(me, map.width(), heartbeat, failure_timeout, Instant::now());
        // The vote given before a restart still binds (kept on disk).
        let voted = crate::membership_state::load_vote(&dir);
        Membership {
            me,
            map: RwLock::new(map),
            changes,
            live: Mutex::new(live),
            voted: Mutex::new(voted),
            released: Mutex::new(None),
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
            // A map this IOM cannot keep is not adopted: after a restart it
            // would come back at the older epoch (and, as the proposer,
            // could commit another map of this one).
            if let Err(e) = crate::membership_state::save(&self.dir, &m) {
                tracing::error!("cannot persist cluster map of epoch {}: {e}; not adopted", m.epoch.0);
                return false;
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
        self.live.lock().seen(j, Instant::now());
    }

    /// Time since `j` last answered a heartbeat (since start-up if never).
    pub fn silence(&self, j: IomId) -> Duration {
        self.live.lock().silence(j, Instant::now())
    }

    /// Called by the heartbeat and detector loops each time they run (see
    /// `Liveness::tick`).
    pub fn tick(&self) {
        let late = self.live.lock().tick(Instant::now());
        if let Some(late) = late {
            tracing::warn!(
                iom = self.me.0,
                late_ms = late.as_millis() as u64,
                "this IOM ran late: peers get a full failure timeout before being suspected"
            );
        }
    }

    pub fn suspects(&self, j: IomId) -> bool {
        self.live.lock().suspects(j, Instant::now())
    }

    pub fn majority(&self) -> usize {
        self.width() as usize / 2 + 1
    }

    /// Whether this IOM heard from a majority (itself included) recently.
    pub fn has_quorum(&self) -> bool {
        self.live.lock().has_quorum(Instant::now())
    }

    // --------------------------------------------------------------- voting

    /// Records a vote for round `round` of `b` if it is newer than any vote
    /// given; the caller checked the proposal makes sense. A later round of
    /// the same ballot takes the vote over (its proposer tries one round at
    /// a time and gave the earlier one up); an earlier or released round
    /// does not (it arrived late). The vote is on disk before it counts.
    pub fn vote(&self, b: Ballot, round: u64) -> bool {
        if b.epoch <= self.epoch() {
            return false;
        }
        if self.released.lock().is_some_and(|(rb, rr)| rb == b && round <= rr) {
            return false;
        }
        let mut v = self.voted.lock();
        match *v {
            Some((prev, _)) if prev.epoch >= b.epoch && prev != b => false,
            Some((prev, r)) if prev == b && round < r => false,
            _ => {
                if let Err(e) = crate::membership_state::save_vote(&self.dir, b, round) {
                    tracing::error!("cannot keep a vote on disk: {e}; not voting");
                    return false;
                }
                *v = Some((b, round));
                true
            }
        }
    }

    /// A peer's proposal of `map` under round `round` of `ballot`: granted
    /// when its epoch is newer than this IOM's map, this IOM's view
    /// supports the change and it has not voted for another proposal of
    /// that epoch.
    pub fn grant(&self, ballot: Ballot, round: u64, map: &ClusterMap, changed: IomId) -> bool {
        ballot.epoch > self.epoch() && self.agrees(map, changed, ballot.proposer) && self.vote(ballot, round)
    }

    /// Round `round` of `ballot` was lost and its proposer will never
    /// commit it: a vote for exactly that round no longer binds. (A
    /// proposal is committed only by its own proposer, after it counted a
    /// majority in that round; a vote since given to a later round of the
    /// ballot stays.)
    pub fn release(&self, ballot: Ballot, round: u64) {
        if ballot.epoch <= self.epoch() {
            return;
        }
        {
            let mut rel = self.released.lock();
            if !rel.is_some_and(|(rb, rr)| rb == ballot && rr >= round) {
                *rel = Some((ballot, round));
            }
        }
        let mut v = self.voted.lock();
        if *v == Some((ballot, round)) {
            // On disk the vote stays; after a restart it binds until the
            // epoch passes, as a vote whose release was lost does.
            *v = None;
        }
    }

    /// Whether this IOM agrees with `proposer`'s proposed change of
    /// `changed`'s state.
    pub fn agrees(&self, proposed: &ClusterMap, changed: IomId, proposer: IomId) -> bool {
        self.live.lock().agrees(proposed.state(changed), changed, proposer, Instant::now())
    }

    /// Checks that this IOM serves `route.target` in its current map and
    /// hears a majority (the quorum lease: reads too, or an IOM cut off
    /// would serve what its stand-in has overwritten since).
    pub fn check_route(&self, route: &Route) -> Result<(), WireError> {
        let m = self.map.read();
        match m.server_for(route.target) {
            None => Err(WireError::new(ErrorCode::ClusterStopped, "more than one IOM is down: the cluster is stopped")),
            Some(s) if s == self.me => {
                if !self.has_quorum() {
                    return Err(WireError::new(
                        ErrorCode::NoQuorum,
                        format!("IOM {} cannot reach a majority of the cluster and serves nothing", self.me),
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

/// What a new cluster map asks of this IOM, compared with the one before:
/// the map watcher's reactions, as a pure function of the two maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// IOM `j` was declared down and this IOM is its proxy: stand in.
    StandInFor(IomId),
    /// IOM `j`, which this IOM stood in for, is up again: duty over.
    StandInOver(IomId),
    /// IOM `j` was rebuilding with this IOM as its proxy and was declared
    /// down again (it fell silent, perhaps while this stand-in was frozen
    /// for its handover): serve its role again, keep marking.
    HandoverAborted(IomId),
    /// This IOM was declared down although it runs (it was silent to the
    /// majority): it must restart and rejoin.
    DeclaredDown,
    /// This IOM became the namespace home (took the namespace over).
    NamespaceHome,
}

/// The reactions `cur` asks of IOM `me` after `prev`, in IOM order, the
/// namespace last.
pub fn transitions(prev: &ClusterMap, cur: &ClusterMap, me: IomId) -> Vec<Transition> {
    let mut out = Vec::new();
    for j in (0..cur.width()).map(IomId) {
        let (was, now) = (prev.state(j), cur.state(j));
        if was == now {
            continue;
        }
        match now {
            IomState::Down { proxy } if proxy == me && was == (IomState::Rebuilding { proxy }) => {
                out.push(Transition::HandoverAborted(j))
            }
            IomState::Down { proxy } if proxy == me && !matches!(was, IomState::Down { .. }) => {
                out.push(Transition::StandInFor(j))
            }
            IomState::Up => {
                if let IomState::Down { proxy } | IomState::Rebuilding { proxy } = was {
                    if proxy == me && j != me {
                        out.push(Transition::StandInOver(j));
                    }
                }
            }
            _ => {}
        }
        if j == me && now != IomState::Up && was == IomState::Up {
            out.push(Transition::DeclaredDown);
        }
    }
    if cur.meta_home == me && prev.meta_home != me {
        out.push(Transition::NamespaceHome);
    }
    out
}

/// The failed IOMs `me` stands in for in `map` (at start-up: it restarted
/// while a peer was down or rebuilding).
pub fn standing_in_for(map: &ClusterMap, me: IomId) -> Vec<IomId> {
    (0..map.width())
        .map(IomId)
        .filter(|&j| {
            j != me && matches!(map.state(j), IomState::Down { proxy } | IomState::Rebuilding { proxy } if proxy == me)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(base: &ClusterMap, changes: &[(u32, IomState)], home: u32) -> ClusterMap {
        let mut m = base.clone();
        m.epoch = Epoch(m.epoch.0 + 1);
        for (j, st) in changes {
            m.states[*j as usize] = *st;
        }
        m.meta_home = IomId(home);
        m
    }

    #[test]
    fn map_changes_become_the_reactions_of_each_iom() {
        let m0 = ClusterMap::initial(5, IomId(0));
        let down2 = IomState::Down { proxy: IomId(3) };
        let m1 = with(&m0, &[(2, down2)], 0);
        assert_eq!(transitions(&m0, &m1, IomId(3)), vec![Transition::StandInFor(IomId(2))]);
        assert_eq!(transitions(&m0, &m1, IomId(2)), vec![Transition::DeclaredDown]);
        assert!(transitions(&m0, &m1, IomId(4)).is_empty(), "not its business");
        // Rebuilding, then up: the stand-in's duty ends only at up.
        let m2 = with(&m1, &[(2, IomState::Rebuilding { proxy: IomId(3) })], 0);
        assert!(transitions(&m1, &m2, IomId(3)).is_empty());
        // Rebuilding, then down again (silent during its rebuild): the
        // stand-in serves again; the rebuilding IOM's own loop goes on.
        let m2b = with(&m2, &[(2, down2)], 0);
        assert_eq!(transitions(&m2, &m2b, IomId(3)), vec![Transition::HandoverAborted(IomId(2))]);
        assert!(transitions(&m2, &m2b, IomId(2)).is_empty(), "not a restart: its rejoin is still running");
        let m3 = with(&m2, &[(2, IomState::Up)], 0);
        assert_eq!(transitions(&m2, &m3, IomId(3)), vec![Transition::StandInOver(IomId(2))]);
        assert!(transitions(&m2, &m3, IomId(2)).is_empty(), "its own return is no reaction");
        // The namespace home fails: its mirror (and proxy) takes over.
        let m4 = with(&m3, &[(0, IomState::Down { proxy: IomId(1) })], 1);
        assert_eq!(transitions(&m3, &m4, IomId(1)), vec![Transition::StandInFor(IomId(0)), Transition::NamespaceHome]);
        // A down IOM that stays down with another proxy is no new duty.
        let m5 = with(&m4, &[(0, IomState::Down { proxy: IomId(2) })], 1);
        assert!(transitions(&m4, &m5, IomId(2)).is_empty());
    }

    #[test]
    fn a_restarted_proxy_finds_whom_it_stands_in_for() {
        let m = with(
            &ClusterMap::initial(5, IomId(0)),
            &[(1, IomState::Down { proxy: IomId(2) }), (4, IomState::Rebuilding { proxy: IomId(2) })],
            0,
        );
        assert_eq!(standing_in_for(&m, IomId(2)), vec![IomId(1), IomId(4)]);
        assert!(standing_in_for(&m, IomId(3)).is_empty());
    }

    /// Issue 17's "stopped for good after a partition healed": IOMs 3 and 4,
    /// both rebuilding with proxy 0, each propose to be up while proxy 0,
    /// which briefly stopped hearing 3, proposes 3 down again, all at epoch
    /// 9. In this interleaving the votes split 2-2-1, and before `release`
    /// every voter stayed bound to the proposal it had granted: every later
    /// try of epoch 9 was refused, no map of it could ever be committed,
    /// and the cluster stayed stopped with both IOMs rebuilding. Now each
    /// losing proposer releases its votes and a retry wins; no two maps of
    /// one epoch are ever installed.
    #[test]
    fn three_proposals_of_one_epoch_that_split_the_votes_do_not_pin_it_for_ever() {
        let ft = Duration::from_secs(2);
        let dirs: Vec<_> = (0..5).map(|_| tempfile::tempdir().unwrap()).collect();
        let base = ClusterMap {
            epoch: Epoch(8),
            states: vec![
                IomState::Up,
                IomState::Up,
                IomState::Up,
                IomState::Rebuilding { proxy: IomId(0) },
                IomState::Rebuilding { proxy: IomId(0) },
            ],
            ..ClusterMap::initial(5, IomId(0))
        };
        let ioms: Vec<Membership> = (0..5u32)
            .map(|i| Membership::new(IomId(i), base.clone(), dirs[i as usize].path().into(), ft / 20, ft))
            .collect();
        // Everybody hears everybody, then IOMs 0 and 1 stop hearing 3 for
        // more than half the failure timeout (enough to agree that it is
        // down; not enough for a proposal of it up to be refused).
        let hear = |skip: &[(u32, u32)]| {
            for a in 0..5u32 {
                for b in 0..5u32 {
                    if !skip.contains(&(a, b)) {
                        ioms[a as usize].seen(IomId(b));
                    }
                }
            }
        };
        hear(&[]);
        std::thread::sleep(ft * 5 / 8);
        hear(&[(0, 3), (1, 3)]);

        let change = |who: u32, st: IomState| {
            let mut m = base.clone();
            m.epoch = Epoch(9);
            m.states[who as usize] = st;
            m
        };
        // (proposer, the IOM it changes, the map)
        let proposals = [
            (0u32, 3u32, change(3, IomState::Down { proxy: IomId(0) })),
            (3, 3, change(3, IomState::Up)),
            (4, 4, change(4, IomState::Up)),
        ];
        let ballot = |p: u32| Ballot { epoch: Epoch(9), proposer: IomId(p) };
        // One round of every proposal, the votes asked in `order` (proposal,
        // voter); a proposal with a majority is installed everywhere, as
        // `Failover::propose` commits it; a losing one is released, as
        // `Failover::propose` does.
        let round = |order: &[(usize, u32)], r: u64| -> Option<usize> {
            let mut votes = [0usize; 3];
            for &(k, v) in order {
                let (p, changed, map) = &proposals[k];
                let granted = if v == *p {
                    ioms[v as usize].agrees(map, IomId(*changed), IomId(*p)) && ioms[v as usize].vote(ballot(*p), r)
                } else {
                    ioms[v as usize].grant(ballot(*p), r, map, IomId(*changed))
                };
                votes[k] += granted as usize;
            }
            let winner = (0..3).find(|&k| votes[k] >= 3);
            for (k, (p, _, map)) in proposals.iter().enumerate() {
                if Some(k) == winner {
                    for m in &ioms {
                        m.install(map.clone());
                    }
                } else {
                    for m in &ioms {
                        m.release(ballot(*p), r);
                    }
                }
            }
            winner
        };
        // Each proposer votes for itself first, then its first voter is
        // asked: 1 grants 0's, 2 grants 3's; every other ask finds the
        // voter bound already.
        let first: Vec<(usize, u32)> = vec![
            (0, 0),
            (0, 1),
            (1, 3),
            (1, 2),
            (2, 4),
            (0, 2),
            (0, 3),
            (0, 4),
            (1, 0),
            (1, 1),
            (1, 4),
            (2, 0),
            (2, 1),
            (2, 2),
            (2, 3),
        ];
        assert_eq!(round(&first, 1), None, "the interleaving splits the votes 2-2-1");
        // The proposers try again, in the same order, each asking every
        // voter in turn.
        let proposers: Vec<u32> = proposals.iter().map(|p| p.0).collect();
        let mut again: Vec<(usize, u32)> = Vec::new();
        for (k, &p) in proposers.iter().enumerate() {
            again.push((k, p));
            again.extend((0..5).filter(|&v| v != p).map(|v| (k, v)));
        }
        let winner = (2..5).find_map(|r| round(&again, r));
        let winner = winner.expect("no map of epoch 9 was ever committed: the votes stayed bound");
        let epochs: Vec<ClusterMap> = ioms.iter().map(|m| m.current()).collect();
        assert!(epochs.iter().all(|m| *m == proposals[winner].2), "one map of epoch 9 everywhere: {epochs:?}");
    }

    /// A release names the round it ends: one that arrives late, after the
    /// proposer's next round of the same ballot got the vote, frees nothing
    /// (else that later round, perhaps committed, and another proposal of
    /// the epoch could both win).
    #[test]
    fn a_late_release_of_a_lost_round_does_not_free_a_vote_for_a_later_one() {
        let dir = tempfile::tempdir().unwrap();
        let m = Membership::new(
            IomId(1),
            ClusterMap::initial(5, IomId(0)),
            dir.path().into(),
            Duration::from_millis(100),
            Duration::from_secs(2),
        );
        let e = Epoch(m.epoch().0 + 1);
        let p = Ballot { epoch: e, proposer: IomId(0) };
        let q = Ballot { epoch: e, proposer: IomId(3) };
        assert!(m.vote(p, 1));
        assert!(m.vote(p, 2), "the next round of the same ballot takes the vote");
        m.release(p, 1);
        assert!(!m.vote(q, 1), "a late release of round 1 freed the vote of round 2");
        m.release(p, 2);
        assert!(m.vote(q, 1), "the release of the round voted for frees the vote");
        // A round of q that arrives after the vote moved on, or after its
        // release, binds nothing.
        assert!(m.vote(q, 5));
        assert!(!m.vote(q, 3), "an earlier round of the held ballot took the vote back");
        m.release(q, 5);
        assert!(!m.vote(q, 5), "a proposal that arrived after its release bound the voter again");
        assert!(m.vote(q, 6), "the proposer's next round is granted");
    }

    /// A vote outlives a restart: a voter that granted one proposal of an
    /// epoch and restarted before its commit must not grant another.
    #[test]
    fn a_vote_survives_a_restart_of_the_voter() {
        let dir = tempfile::tempdir().unwrap();
        let open = || {
            Membership::new(
                IomId(1),
                ClusterMap::initial(5, IomId(0)),
                dir.path().into(),
                Duration::from_millis(100),
                Duration::from_secs(2),
            )
        };
        let m = open();
        let e = Epoch(m.epoch().0 + 1);
        let p = Ballot { epoch: e, proposer: IomId(0) };
        let q = Ballot { epoch: e, proposer: IomId(3) };
        assert!(m.vote(p, 4));
        drop(m);
        let m = open();
        assert!(!m.vote(q, 1), "a restarted voter granted a second proposal of the epoch");
        assert!(m.vote(p, 4), "the same round again is the same vote");
    }
}
