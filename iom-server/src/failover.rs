//! Failure detection and cluster map changes (DESIGN §6).
//!
//! `heartbeat_worker` pings every peer; `detector_worker` proposes "IOM j is
//! down, proxied by me" when this IOM is the first live one after a silent
//! j, or j's proxy if j is rebuilding (so a role frozen for j's handover is
//! served again when j dies or stalls in it); `propose` runs one round of voting and commits the map when a
//! majority agreed; `map_watcher` reacts to every new map (stand-in
//! activation, namespace takeover, end of a stand-in's duty, the end of an
//! aborted handover, the restart of an IOM declared down while it ran).
//! The start-up path (`join`) and coming back (`rejoin`) are in `rejoin`.

use crate::caller::RoleCaller;
use crate::membership::{Membership, Transition};
use crate::standin::handover::HandoverState;
use crate::standin::StandIn;
use crate::timeouts::Timeouts;
use crate::workers::{Tier, Workers};
use bytes::Bytes;
use common::cluster::{ClusterMap, IomState};
use common::wire::{Ballot, MemberReq, MemberResp, Reply, Request};
use common::{Epoch, IomId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The membership role's moving half: heartbeats, failure detection,
/// voting and the reactions to each new map. Holds the membership state,
/// the caller, the stand-in (activation, end of duty), the handover state,
/// the namespace (takeover) and the rejoin flag; never the node.
pub struct Failover {
    pub(crate) me: IomId,
    pub(crate) width: u32,
    pub(crate) member: Arc<Membership>,
    pub(crate) caller: Arc<RoleCaller>,
    pub(crate) workers: Arc<Workers>,
    pub(crate) timeouts: Timeouts,
    pub(crate) standin: Arc<StandIn>,
    pub(crate) handover: Arc<HandoverState>,
    pub(crate) namespace: Arc<dyn NamespaceTakeover>,
    /// Set while this IOM rejoins (shared with `rejoin::Rejoin`): a map
    /// that calls it down is then no reason to restart.
    pub(crate) rejoining: Arc<AtomicBool>,
    /// Cancelled when the IOM's background work stops.
    pub(crate) stop: CancellationToken,
    /// One proposal round at a time (the detector and the rejoin both
    /// propose), numbered: the rounds of one ballot never overlap, so a
    /// vote moved to a later round and a `Release` of an earlier one never
    /// meet a round still being counted. Holds the last round's number.
    pub(crate) proposing: tokio::sync::Mutex<u64>,
}

/// What failover asks of the namespace service: whether this IOM holds a
/// copy (it may take a failed home's namespace over) and the takeover.
/// Implemented by `namespace::Namespace`; a trait because the namespace
/// uses failover's takeover, so failover cannot import the namespace.
pub trait NamespaceTakeover: Send + Sync {
    fn holds_replica(&self) -> bool;
    fn promote(&self, term: u64);
}

impl Failover {
    pub fn rejoining(&self) -> bool {
        self.rejoining.load(Ordering::Acquire)
    }

    /// Pings every peer every heartbeat; learns newer maps from their answers.
    pub async fn heartbeat_worker(self: Arc<Self>) {
        let hb = self.timeouts.heartbeat;
        let mut stalled_said = false;
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(hb) => {}
            }
            self.member.tick();
            // A stalled disk: fall silent, so the cluster declares this IOM
            // down and its proxy serves (see `fsutil::disk_stalled`).
            if let Some(d) = crate::fsutil::disk_stalled(self.timeouts.failure_timeout) {
                if !stalled_said {
                    tracing::error!(
                        stalled = ?d,
                        "this IOM's disk has finished no operation for {d:?}: not answering heartbeats, so the \
                         cluster declares it down and its proxy takes over"
                    );
                    stalled_said = true;
                }
                continue;
            }
            stalled_said = false;
            for j in 0..self.width {
                let j = IomId(j);
                if j == self.me {
                    continue;
                }
                let me = self.clone();
                self.workers.spawn(Tier::Background, "ping", async move {
                    let req = Request::Member(MemberReq::Ping { from: me.me, epoch: me.member.epoch() });
                    if let Ok((Reply::Member(MemberResp::Pong { epoch, .. }), _)) =
                        me.caller.call_peer(j, &req, Bytes::new(), me.timeouts.ping_call).await
                    {
                        me.member.seen(j);
                        if epoch > me.member.epoch() {
                            me.fetch_map(j).await;
                        }
                    }
                });
            }
        }
    }

    /// Installs `j`'s map if it is newer.
    pub async fn fetch_map(&self, j: IomId) {
        if let Ok((Reply::Member(MemberResp::Map(m)), _)) =
            self.caller.call_peer(j, &Request::Member(MemberReq::GetMap), Bytes::new(), self.timeouts.probe_call).await
        {
            self.member.install(m);
        }
    }

    /// Declares silent IOMs down when this IOM is the one to propose it.
    pub async fn detector_worker(self: Arc<Self>) {
        let mut last_try: HashMap<IomId, Instant> = HashMap::new();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(self.timeouts.heartbeat) => {}
            }
            self.member.tick();
            let map = self.member.current();
            if map.state(self.me) != IomState::Up {
                continue;
            }
            for j in (0..map.width()).map(IomId) {
                if j == self.me || !self.member.suspects(j) {
                    continue;
                }
                // An up IOM is declared down by the first live IOM after it;
                // a rebuilding one by its proxy, which keeps its marks and
                // may be frozen for its handover: the proxy serves again.
                let proposer = match map.state(j) {
                    IomState::Up => self.member.proposer_for(j),
                    IomState::Rebuilding { proxy } => Some(proxy),
                    IomState::Down { .. } => None,
                };
                if proposer != Some(self.me) {
                    continue;
                }
                if last_try.get(&j).is_some_and(|t| t.elapsed() < self.timeouts.failure_timeout) {
                    continue;
                }
                last_try.insert(j, Instant::now());
                let mut next = map.clone();
                next.epoch = Epoch(map.epoch.0 + 1);
                next.states[j.0 as usize] = IomState::Down { proxy: self.me };
                if map.meta_home == j {
                    if self.namespace.holds_replica() {
                        // The namespace mirror (this IOM) takes the namespace over.
                        next.meta_home = self.me;
                    } else {
                        tracing::error!(
                            iom = self.me.0,
                            home = j.0,
                            "the namespace home failed and this IOM holds no copy of it: the namespace stays unavailable until IOM {} returns",
                            j.0
                        );
                    }
                }
                tracing::warn!(
                    iom = self.me.0,
                    suspect = j.0,
                    silent_ms = self.member.silence(j).as_millis() as u64,
                    "IOM silent: proposing it down"
                );
                let ok = self.propose(next, j).await;
                if !ok {
                    tracing::warn!(iom = self.me.0, suspect = j.0, "proposal not accepted; will retry");
                }
                break;
            }
        }
    }

    /// One voting round for `next` (a change of `changed`); commits it on a majority.
    pub async fn propose(self: &Arc<Self>, next: ClusterMap, changed: IomId) -> bool {
        let mut last = self.proposing.lock().await;
        // Distinct across restarts too (a voter may still hold a vote of a
        // round from before this IOM's restart): the clock, in nanoseconds.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        let round = (*last + 1).max(now);
        *last = round;
        let ballot = Ballot { epoch: next.epoch, proposer: self.me };
        if !self.member.agrees(&next, changed, self.me) || !self.member.vote(ballot, round) {
            return false;
        }
        let w = self.width;
        let declaring_down = matches!(next.state(changed), IomState::Down { .. });
        let mut calls: futures::stream::FuturesUnordered<_> = (0..w)
            .map(IomId)
            .filter(|&j| j != self.me && !(declaring_down && j == changed))
            .map(|j| {
                let me = self.clone();
                let req = Request::Member(MemberReq::ProposeRound { ballot, round, map: next.clone(), changed });
                let old = Request::Member(MemberReq::Propose { ballot, map: next.clone(), changed });
                async move {
                    match me.caller.call_peer(j, &req, Bytes::new(), me.timeouts.vote_call).await {
                        // A voter of protocol 7/8 (a rolling upgrade): the
                        // round-less proposal; it is never sent a release.
                        Err(net::NetError::PeerTooOld { .. }) => {
                            me.caller.call_peer(j, &old, Bytes::new(), me.timeouts.vote_call).await
                        }
                        r => r,
                    }
                }
            })
            .collect();
        let mut votes = 1usize;
        // Stop at a majority: a silent voter must not delay the commit.
        while votes < self.member.majority() {
            let Some(r) = futures::StreamExt::next(&mut calls).await else { break };
            if let Ok((Reply::Member(MemberResp::Vote { granted, map }), _)) = r {
                if granted {
                    votes += 1;
                } else if map.epoch >= next.epoch {
                    self.member.install(map);
                }
            }
            if self.member.epoch() >= next.epoch {
                // A map of this epoch (or later) is committed already: this
                // round cannot be.
                break;
            }
        }
        if votes < self.member.majority() || self.member.epoch() >= next.epoch {
            tracing::warn!(
                iom = self.me.0,
                epoch = next.epoch.0,
                votes,
                needed = self.member.majority(),
                "map proposal lost"
            );
            // This round is never committed now: the votes it got are free
            // again, or proposals of this epoch that split the votes would
            // stay refused for ever (`MemberReq::Release`). The release
            // names the round, so one that arrives after a later round of
            // this ballot got a vote frees nothing.
            drop(calls);
            self.member.release(ballot, round);
            for j in (0..w).map(IomId).filter(|&j| j != self.me) {
                let me = self.clone();
                let req = Request::Member(MemberReq::Release { ballot, round });
                self.workers.spawn(Tier::Background, "vote-release", async move {
                    let _ = me.caller.call_peer(j, &req, Bytes::new(), me.timeouts.probe_call).await;
                });
            }
            return false;
        }
        if !self.member.install(next.clone()) {
            // Not kept (the disk refused it): not committed, and it is not
            // released either (a majority holds it; their votes pass with
            // the epoch).
            return false;
        }
        for j in (0..w).map(IomId).filter(|&j| j != self.me) {
            let me = self.clone();
            let req = Request::Member(MemberReq::Commit { map: next.clone() });
            self.workers.spawn(Tier::Background, "map-commit", async move {
                let _ = me.caller.call_peer(j, &req, Bytes::new(), me.timeouts.probe_call).await;
            });
        }
        true
    }

    /// `Propose` from a peer.
    /// `round` is 0 from a proposer of protocol 7/8 (`Propose`).
    pub fn handle_propose(&self, ballot: Ballot, round: u64, map: ClusterMap, changed: IomId) -> (bool, ClusterMap) {
        (self.member.grant(ballot, round, &map, changed), self.member.current())
    }

    fn spawn_standin_activate(self: &Arc<Self>, j: IomId) {
        let me = self.clone();
        // Taken here, in the task that also ends stand-in periods (`done`).
        let era = self.handover.era(j);
        self.workers.spawn(
            Tier::Background,
            "standin-activate",
            async move { me.standin.clone().activate(j, era).await },
        );
    }

    /// Reacts to every new cluster map.
    pub async fn map_watcher(self: Arc<Self>) {
        let mut rx = self.member.subscribe();
        let mut prev = self.member.current();
        // Standing in already (this IOM restarted while a peer was down).
        for j in crate::membership::standing_in_for(&prev, self.me) {
            self.spawn_standin_activate(j);
        }
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let cur = self.member.current();
            for t in crate::membership::transitions(&prev, &cur, self.me) {
                match t {
                    Transition::StandInFor(j) => {
                        tracing::warn!(
                            iom = self.me.0,
                            failed = j.0,
                            epoch = cur.epoch.0,
                            "standing in for failed IOM"
                        );
                        self.spawn_standin_activate(j);
                    }
                    Transition::StandInOver(j) => {
                        tracing::warn!(
                            iom = self.me.0,
                            back = j.0,
                            epoch = cur.epoch.0,
                            "IOM back: stand-in duty over"
                        );
                        self.standin.done(j);
                    }
                    Transition::HandoverAborted(j) => {
                        tracing::warn!(
                            iom = self.me.0,
                            failed = j.0,
                            epoch = cur.epoch.0,
                            "rebuilding IOM declared down again: serving its role again"
                        );
                        self.handover.unfreeze(j);
                    }
                    Transition::DeclaredDown if !self.rejoining() => {
                        tracing::error!(
                            iom = self.me.0,
                            epoch = cur.epoch.0,
                            "this IOM was declared down by the cluster (it was silent to the majority); restarting to rejoin"
                        );
                        crate::restart::rejoin_by_restart(self.me, cur.epoch);
                    }
                    Transition::DeclaredDown => {}
                    Transition::NamespaceHome => {
                        tracing::warn!(iom = self.me.0, epoch = cur.epoch.0, "taking the namespace over");
                        self.namespace.promote(cur.epoch.0);
                    }
                }
            }
            prev = cur;
        }
    }
}
