//! Failure detection and cluster map changes (DESIGN §6).
//!
//! `heartbeat_worker` pings every peer; `detector_worker` proposes "IOM j is
//! down, proxied by me" when this IOM is the first live one after a silent
//! j; `propose` runs one round of voting and commits the map when a
//! majority agreed; `map_watcher` reacts to every new map (stand-in
//! activation, namespace takeover, end of a stand-in's duty). `join` is the
//! start-up path: learn the current map, then recover (still up) or rejoin
//! (declared down meanwhile).

use crate::membership::Transition;
use crate::workers::Tier;
use crate::Iom;
use bytes::Bytes;
use common::cluster::{ClusterMap, IomState};
use common::wire::{Ballot, MemberReq, MemberResp, Reply, Request};
use common::{Epoch, IomId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

impl Iom {
    /// Pings every peer every heartbeat; learns newer maps from their answers.
    pub async fn heartbeat_worker(self: Arc<Self>) {
        let hb = self.timeouts.heartbeat;
        let mut stalled_said = false;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
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
            for j in 0..self.cfg.width() {
                let j = IomId(j);
                if j == self.id {
                    continue;
                }
                let me = self.clone();
                self.workers.spawn(Tier::Background, "ping", async move {
                    let req = Request::Member(MemberReq::Ping { from: me.id, epoch: me.member.epoch() });
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
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.timeouts.heartbeat) => {}
            }
            self.member.tick();
            let map = self.member.current();
            if map.state(self.id) != IomState::Up {
                continue;
            }
            for j in (0..map.width()).map(IomId) {
                if j == self.id || !self.member.suspects(j) {
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
                if proposer != Some(self.id) {
                    continue;
                }
                if last_try.get(&j).is_some_and(|t| t.elapsed() < self.timeouts.failure_timeout) {
                    continue;
                }
                last_try.insert(j, Instant::now());
                let mut next = map.clone();
                next.epoch = Epoch(map.epoch.0 + 1);
                next.states[j.0 as usize] = IomState::Down { proxy: self.id };
                if map.meta_home == j {
                    if self.namespace.holds_replica() {
                        // The namespace mirror (this IOM) takes the namespace over.
                        next.meta_home = self.id;
                    } else {
                        tracing::error!(
                            iom = self.id.0,
                            home = j.0,
                            "the namespace home failed and this IOM holds no copy of it: the namespace stays unavailable until IOM {} returns",
                            j.0
                        );
                    }
                }
                tracing::warn!(
                    iom = self.id.0,
                    suspect = j.0,
                    silent_ms = self.member.silence(j).as_millis() as u64,
                    "IOM silent: proposing it down"
                );
                let ok = self.propose(next, j).await;
                if !ok {
                    tracing::warn!(iom = self.id.0, suspect = j.0, "proposal not accepted; will retry");
                }
                break;
            }
        }
    }

    /// One voting round for `next` (a change of `changed`); commits it on a majority.
    pub async fn propose(self: &Arc<Self>, next: ClusterMap, changed: IomId) -> bool {
        let ballot = Ballot { epoch: next.epoch, proposer: self.id };
        if !self.member.agrees(&next, changed, self.id) || !self.member.vote(ballot) {
            return false;
        }
        let w = self.cfg.width();
        let declaring_down = matches!(next.state(changed), IomState::Down { .. });
        let mut calls: futures::stream::FuturesUnordered<_> = (0..w)
            .map(IomId)
            .filter(|&j| j != self.id && !(declaring_down && j == changed))
            .map(|j| {
                let me = self.clone();
                let req = Request::Member(MemberReq::Propose { ballot, map: next.clone(), changed });
                async move { me.caller.call_peer(j, &req, Bytes::new(), me.timeouts.vote_call).await }
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
        }
        if votes < self.member.majority() {
            tracing::warn!(
                iom = self.id.0,
                epoch = next.epoch.0,
                votes,
                needed = self.member.majority(),
                "map proposal lost"
            );
            return false;
        }
        self.member.install(next.clone());
        for j in (0..w).map(IomId).filter(|&j| j != self.id) {
            let me = self.clone();
            let req = Request::Member(MemberReq::Commit { map: next.clone() });
            self.workers.spawn(Tier::Background, "map-commit", async move {
                let _ = me.caller.call_peer(j, &req, Bytes::new(), me.timeouts.probe_call).await;
            });
        }
        true
    }

    /// `Propose` from a peer.
    pub fn handle_propose(&self, ballot: Ballot, map: ClusterMap, changed: IomId) -> (bool, ClusterMap) {
        let granted = ballot.epoch > self.member.epoch()
            && self.member.agrees(&map, changed, ballot.proposer)
            && self.member.vote(ballot);
        (granted, self.member.current())
    }

    fn spawn_standin_activate(self: &Arc<Self>, j: IomId) {
        let me = self.clone();
        self.workers.spawn(Tier::Background, "standin-activate", async move { me.standin.clone().activate(j).await });
    }

    /// Reacts to every new cluster map.
    pub async fn map_watcher(self: Arc<Self>) {
        let mut rx = self.member.subscribe();
        let mut prev = self.member.current();
        // Standing in already (this IOM restarted while a peer was down).
        for j in crate::membership::standing_in_for(&prev, self.id) {
            self.spawn_standin_activate(j);
        }
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
            let cur = self.member.current();
            for t in crate::membership::transitions(&prev, &cur, self.id) {
                match t {
                    Transition::StandInFor(j) => {
                        tracing::warn!(
                            iom = self.id.0,
                            failed = j.0,
                            epoch = cur.epoch.0,
                            "standing in for failed IOM"
                        );
                        self.spawn_standin_activate(j);
                    }
                    Transition::StandInOver(j) => {
                        tracing::warn!(
                            iom = self.id.0,
                            back = j.0,
                            epoch = cur.epoch.0,
                            "IOM back: stand-in duty over"
                        );
                        self.standin.done(j);
                    }
                    Transition::HandoverAborted(j) => {
                        tracing::warn!(
                            iom = self.id.0,
                            failed = j.0,
                            epoch = cur.epoch.0,
                            "rebuilding IOM declared down again: serving its role again"
                        );
                        self.handover.unfreeze(j);
                    }
                    Transition::DeclaredDown if !self.rejoining() => {
                        tracing::error!(
                            iom = self.id.0,
                            epoch = cur.epoch.0,
                            "this IOM was declared down by the cluster (it was silent to the majority); restarting to rejoin"
                        );
                        crate::restart::rejoin_by_restart(self.id, cur.epoch);
                    }
                    Transition::DeclaredDown => {}
                    Transition::NamespaceHome => {
                        tracing::warn!(iom = self.id.0, epoch = cur.epoch.0, "taking the namespace over");
                        self.namespace.promote(cur.epoch.0);
                    }
                }
            }
            prev = cur;
        }
    }

    /// A replacement whose map still says it is up (it came back before its
    /// predecessor was declared down) declares itself down, so its proxy
    /// serves its role until the full rebuild is done. Peers accept a
    /// down-declaration from the IOM itself without waiting for silence.
    async fn stand_aside(self: &Arc<Self>) {
        loop {
            let map = self.member.current();
            if map.state(self.id) != IomState::Up {
                return;
            }
            let proxy = map.proxy_of(self.id);
            let mut next = map.clone();
            next.epoch = Epoch(map.epoch.0 + 1);
            next.states[self.id.0 as usize] = IomState::Down { proxy };
            if map.meta_home == self.id {
                // The mirror (the home's proxy) takes the namespace over.
                next.meta_home = proxy;
            }
            tracing::warn!(
                iom = self.id.0,
                proxy = proxy.0,
                "replacement: declaring this IOM down until it is rebuilt"
            );
            if self.propose(next, self.id).await {
                return;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.timeouts.retry_pause) => {}
            }
        }
    }

    /// Stops this IOM (exit 78) if another IOM has seen it complete a write
    /// its store knows nothing of: the store is older than what this IOM
    /// acknowledged (a backup or snapshot put back, a stale copy of the
    /// disk), and serving it would return old bytes as current ones.
    /// Transaction ids rise with every start (`start_incarnation`), so a
    /// store that is the latest one always starts above every id a peer saw.
    fn refuse_a_stale_store(&self, seen: Option<(IomId, u64)>) {
        let mine = self.storage.map.peek_next_tx();
        let Some((j, tx)) = seen else { return };
        if tx < mine {
            return;
        }
        let msg = format!(
            "the store of IOM {me} in {data} is older than what IOM {me} acknowledged: IOM {j} saw it complete \
             write transaction {tx:#x}, and this store's transactions start at {mine:#x} (a backup or snapshot \
             put back, or a stale copy of the disk). Serving it would return old data as current, so this IOM \
             will not start. Move everything in {data} away except node.pem and node.key, then run \
             `iomfs replace --dir {dir} --id {me}`: it rebuilds this IOM's share from the others",
            me = self.id.0,
            data = self.data_dir.display(),
            dir = self.paths.dir.display(),
        );
        tracing::error!("{msg}");
        eprintln!("iom-server: {msg}");
        std::process::exit(78);
    }

    /// The highest transaction id of this IOM whose completion a peer has
    /// seen, and that peer (peers that do not answer within 1 s are skipped).
    async fn done_seen_by_peers(&self) -> Option<(IomId, u64)> {
        let w = self.cfg.width();
        let asks = (0..w).map(IomId).filter(|&j| j != self.id).map(|j| async move {
            let r = self
                .caller
                .call_peer(
                    j,
                    &Request::Member(MemberReq::DoneSeen { of: self.id }),
                    Bytes::new(),
                    self.timeouts.probe_call,
                )
                .await;
            match r {
                Ok((Reply::Member(MemberResp::DoneSeen { tx }), _)) => Some((j, tx)),
                _ => None,
            }
        });
        let seen = futures::future::join_all(asks).await;
        tracing::debug!(iom = self.id.0, ?seen, "store age check: completed writes peers saw");
        seen.into_iter().flatten().filter(|(_, tx)| *tx > 0).max_by_key(|(_, tx)| *tx)
    }

    /// Start-up: learn the cluster's current map, then recover (this IOM is
    /// still up) or rejoin (it was declared down while it was away).
    pub async fn join(self: Arc<Self>) {
        // Until the current map is known, a map saying this IOM is down is
        // news to act on (rejoin), not a reason to stop.
        self.rejoin_flag.store(true, std::sync::atomic::Ordering::Release);
        let w = self.cfg.width();
        let fetches = (0..w).map(IomId).filter(|&j| j != self.id).map(|j| {
            let me = self.clone();
            async move { me.fetch_map(j).await }
        });
        futures::future::join_all(fetches).await;
        let seen = self.done_seen_by_peers().await;
        if self.replacing.load(std::sync::atomic::Ordering::Acquire) {
            if let Some((_, tx)) = seen {
                // Transaction ids of the new store start above the old one's.
                let inc = (tx >> 40) + 1;
                if let Err(e) = crate::storage::raise_incarnation(&self.data_dir, inc) {
                    tracing::error!(iom = self.id.0, "cannot raise the start counter: {e}");
                }
                self.storage.map.start_incarnation(inc);
            }
        } else {
            self.refuse_a_stale_store(seen);
        }
        if self.replacing.load(std::sync::atomic::Ordering::Acquire) {
            // Serve nothing while the map still gives this IOM its role:
            // its store does not hold that role's blocks yet.
            self.stand_aside().await;
            if self.shutdown.is_cancelled() {
                return;
            }
        }
        self.ready.send_replace(true);
        let map = self.member.current();
        tracing::info!(iom = self.id.0, epoch = map.epoch.0, state = ?map.state(self.id), "joined the cluster map");
        match map.state(self.id) {
            IomState::Up => {
                self.rejoin_flag.store(false, std::sync::atomic::Ordering::Release);
                self.recovery.clone().recover().await
            }
            IomState::Down { .. } | IomState::Rebuilding { .. } => self.rejoin().await,
        }
    }
}
