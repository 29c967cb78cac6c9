//! Client sessions of the namespace server: a lease per client and the
//! handles it holds open, which decide when an unlinked file can go.
//!
//! Every request from a client renews its lease; an idle client renews it
//! with `MetaReq::Renew` every third of the lease. A client not heard from
//! for a whole lease loses its session: its handles stop counting, so the
//! files it alone held open after their last unlink are reclaimed (a
//! `kill -9`ed mount leaves no garbage behind). The client side keeps the
//! other half of the promise: it trusts its handles only within 80 % of a
//! lease after a renewal the namespace answered (after it, the namespace
//! keeps every listed file for at least a lease, even across its own
//! restart: the grace below); otherwise it renews first, and a handle
//! whose file is gone answers ESTALE.
//!
//! Sessions live only in the serving replica's memory. Whenever a replica
//! starts serving (start-up, failover, handover) it knows no sessions: the
//! files that were unlinked-but-open then are kept for one whole lease
//! (the grace, as an NFSv4 server keeps one after its restart), during
//! which every live client re-claims its handles with its next `Renew`
//! (which lists them), and files unlinked meanwhile are kept too; after
//! the grace, those nobody claimed are reclaimed. A namespace created by
//! this start has no grace: no client can hold anything from before.
//! Pure state: every method takes `now`.

use common::Ino;
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Expired client ids remembered, to tell a client that comes back that it
/// had lost its session.
const EXPIRED_KEPT: usize = 4096;

/// Request numbers of a client's counted opens remembered, so that a
/// retried `Open` (its answer lost, the same request sent again) is not
/// counted twice. Retries come within seconds; a client has far fewer
/// opens than this in flight.
const OPENS_REMEMBERED: usize = 1024;

#[derive(Debug)]
struct Session {
    last: Instant,
    opens: HashMap<Ino, u32>,
    /// Request numbers (`MetaCall::seq`) of the opens counted, newest last.
    counted: VecDeque<u64>,
    counted_set: HashSet<u64>,
    /// Took its client's list of open handles (a `Renew`) since this
    /// replica began serving.
    claimed: bool,
}

#[derive(Debug)]
pub struct Sessions {
    lease: Duration,
    serving: bool,
    /// When this replica began serving (start of the grace).
    since: Instant,
    /// No grace in this serving period: the namespace was created by this
    /// start, so no client can hold anything from before.
    no_grace: bool,
    /// The namespace is new (see `no_grace`) until it first serves.
    fresh: bool,
    /// Unlinked files that were open when serving began: kept for the
    /// grace, whoever holds them.
    inherited: HashSet<Ino>,
    map: HashMap<u64, Session>,
    expired: VecDeque<u64>,
    expired_set: HashSet<u64>,
}

impl Sessions {
    pub fn new(lease: Duration, now: Instant) -> Sessions {
        Sessions {
            lease,
            serving: false,
            since: now,
            no_grace: false,
            fresh: false,
            inherited: HashSet::new(),
            map: HashMap::new(),
            expired: VecDeque::new(),
            expired_set: HashSet::new(),
        }
    }

    /// The namespace was created just now: its first serving period needs
    /// no grace.
    pub fn fresh(mut self) -> Sessions {
        self.fresh = true;
        self
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Called with whether this replica serves the namespace now. On a
    /// change to serving, sessions of an earlier serving period are dropped
    /// (their clients' releases may have gone elsewhere since) and the
    /// grace begins for `orphans` (the unlinked files existing now).
    pub fn set_serving(&mut self, serving: bool, now: Instant, orphans: impl FnOnce() -> Vec<Ino>) {
        if serving && !self.serving {
            self.map.clear();
            // Expiries seen in an earlier serving period are stale: a client
            // told now that it was evicted would drop bytes it buffered
            // under a session another replica served meanwhile.
            self.expired.clear();
            self.expired_set.clear();
            self.since = now;
            self.no_grace = std::mem::take(&mut self.fresh);
            self.inherited = orphans().into_iter().collect();
        }
        self.serving = serving;
    }

    /// Within one lease of this replica beginning to serve.
    pub fn in_grace(&self, now: Instant) -> bool {
        !self.no_grace && now.saturating_duration_since(self.since) < self.lease
    }

    /// Files unlinked during the grace: kept until it is over, like those
    /// unlinked before (a client that has not claimed yet may hold them).
    pub fn keep_for_grace(&mut self, inos: impl IntoIterator<Item = Ino>) {
        self.inherited.extend(inos);
    }

    /// A request from `client` renews its lease (client 0: the IOMs' own
    /// requests, which hold no handles).
    pub fn touch(&mut self, client: u64, now: Instant) {
        if client == 0 {
            return;
        }
        self.map.entry(client).and_modify(|s| s.last = now).or_insert_with(|| Session {
            last: now,
            opens: HashMap::new(),
            counted: VecDeque::new(),
            counted_set: HashSet::new(),
            claimed: false,
        });
    }

    /// Whether any session holds a handle on `ino`.
    pub fn is_open(&self, ino: Ino) -> bool {
        self.map.values().any(|s| s.opens.get(&ino).is_some_and(|n| *n > 0))
    }

    /// Whether an unlinked `ino` may be reclaimed now.
    pub fn reclaimable(&self, ino: Ino, now: Instant) -> bool {
        let kept_for_grace = self.inherited.contains(&ino) && self.in_grace(now);
        !self.is_open(ino) && !kept_for_grace
    }

    /// Counts one handle of `client` on `ino`, opened by its request `seq`
    /// (`MetaCall::seq`): a retry of a request already counted (its answer
    /// was lost, and the client sent it again) counts nothing.
    pub fn open(&mut self, client: u64, seq: u64, ino: Ino, now: Instant) {
        if client == 0 {
            return;
        }
        self.touch(client, now);
        if let Some(s) = self.map.get_mut(&client) {
            if !s.counted_set.insert(seq) {
                return;
            }
            s.counted.push_back(seq);
            if s.counted.len() > OPENS_REMEMBERED {
                if let Some(old) = s.counted.pop_front() {
                    s.counted_set.remove(&old);
                }
            }
            *s.opens.entry(ino).or_default() += 1;
        }
    }

    /// Closes one handle per entry of `inos`; returns the inodes whose last
    /// handle this was (candidates to reclaim if unlinked).
    pub fn release(&mut self, client: u64, inos: &[Ino], now: Instant) -> Vec<Ino> {
        self.touch(client, now);
        if let Some(s) = self.map.get_mut(&client) {
            for ino in inos {
                if let Some(n) = s.opens.get_mut(ino) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        s.opens.remove(ino);
                    }
                }
            }
        }
        let mut seen = HashSet::new();
        inos.iter().copied().filter(|i| seen.insert(*i) && self.reclaimable(*i, now)).collect()
    }

    /// A lease renewal with the client's open handles: taken into a session
    /// that has not claimed yet (counts merged by maximum: an `Open`
    /// answered meanwhile is already in the session; the client lists the
    /// handles it closed but has not reported yet, whose `ReleaseMany`
    /// follows, and sends renewals and releases one at a time). Returns
    /// whether the client's previous session had expired.
    pub fn renew(&mut self, client: u64, opens: &[(Ino, u32)], now: Instant) -> bool {
        self.touch(client, now);
        if let Some(s) = self.map.get_mut(&client) {
            if !s.claimed {
                for (ino, n) in opens {
                    let c = s.opens.entry(*ino).or_default();
                    *c = (*c).max(*n);
                }
                s.claimed = true;
            }
        }
        if self.expired_set.remove(&client) {
            self.expired.retain(|c| *c != client);
            return true;
        }
        false
    }

    /// Ends the sessions whose lease ran out and the grace once it is over;
    /// returns the inodes that may now be reclaimed (if unlinked).
    pub fn expire(&mut self, now: Instant) -> Vec<Ino> {
        let lease = self.lease;
        let gone: Vec<u64> =
            self.map.iter().filter(|(_, s)| now.saturating_duration_since(s.last) > lease).map(|(c, _)| *c).collect();
        let mut freed = Vec::new();
        for c in gone {
            if let Some(s) = self.map.remove(&c) {
                if !s.opens.is_empty() {
                    tracing::warn!(
                        client = format_args!("{c:016x}"),
                        handles = s.opens.values().sum::<u32>(),
                        "client lease expired: its open handles no longer keep files"
                    );
                }
                freed.extend(s.opens.into_keys());
            }
            if self.expired_set.insert(c) {
                self.expired.push_back(c);
                if self.expired.len() > EXPIRED_KEPT {
                    if let Some(old) = self.expired.pop_front() {
                        self.expired_set.remove(&old);
                    }
                }
            }
        }
        if !self.in_grace(now) && !self.inherited.is_empty() {
            freed.extend(std::mem::take(&mut self.inherited));
        }
        let mut seen = HashSet::new();
        freed.retain(|i| seen.insert(*i) && self.reclaimable(*i, now));
        freed
    }

    /// Inodes held open by some session, with their objects looked up by
    /// the caller (fsck).
    pub fn held(&self) -> HashSet<Ino> {
        let mut h: HashSet<Ino> = self.map.values().flat_map(|s| s.opens.keys().copied()).collect();
        h.extend(self.inherited.iter().copied());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Duration = Duration::from_secs(10);

    fn serving(now: Instant, orphans: Vec<Ino>) -> Sessions {
        let mut s = Sessions::new(L, now);
        s.set_serving(true, now, || orphans);
        s
    }

    #[test]
    fn a_file_goes_with_its_last_handle_across_clients() {
        let t = Instant::now();
        let mut s = serving(t, vec![]);
        s.open(1, 1, Ino(5), t);
        s.open(2, 2, Ino(5), t);
        s.open(2, 3, Ino(5), t);
        assert!(s.release(1, &[Ino(5)], t).is_empty(), "client 2 still holds it");
        assert!(s.release(2, &[Ino(5)], t).is_empty());
        assert_eq!(s.release(2, &[Ino(5)], t), vec![Ino(5)]);
        // A release of a handle the session never had changes nothing.
        s.open(1, 4, Ino(6), t);
        assert!(s.release(2, &[Ino(6)], t).is_empty());
    }

    #[test]
    fn a_retried_open_counts_once() {
        let t = Instant::now();
        let mut s = serving(t, vec![]);
        s.open(1, 40, Ino(5), t);
        s.open(1, 40, Ino(5), t);
        assert_eq!(s.release(1, &[Ino(5)], t), vec![Ino(5)], "one handle, one release");
        // The same request number from another client is another open.
        s.open(1, 41, Ino(6), t);
        s.open(2, 41, Ino(6), t);
        assert!(s.release(1, &[Ino(6)], t).is_empty());
        assert_eq!(s.release(2, &[Ino(6)], t), vec![Ino(6)]);
    }

    #[test]
    fn a_silent_client_loses_its_handles_after_one_lease_and_is_told_so() {
        let t = Instant::now();
        let mut s = serving(t, vec![]);
        s.open(1, 5, Ino(5), t);
        s.open(2, 6, Ino(7), t);
        assert!(s.expire(t + L / 2).is_empty());
        s.touch(2, t + L / 2);
        assert_eq!(s.expire(t + L + Duration::from_millis(1)), vec![Ino(5)]);
        assert!(s.is_open(Ino(7)), "client 2 renewed");
        assert!(!s.is_open(Ino(5)));
        // Client 1 comes back: a new session, and it hears that it expired.
        assert!(s.renew(1, &[(Ino(5), 1)], t + 2 * L));
        assert!(!s.renew(1, &[], t + 2 * L), "said once");
    }

    #[test]
    fn after_a_takeover_orphans_wait_one_lease_for_their_clients_to_claim_them() {
        let t = Instant::now();
        let mut s = serving(t, vec![Ino(5), Ino(6)]);
        // A release from a client that has not claimed yet must not reclaim.
        assert!(s.release(9, &[Ino(5)], t).is_empty());
        assert!(!s.reclaimable(Ino(6), t + L / 2));
        // Client 1 claims ino 6 with two handles; an Open answered before the
        // claim arrived is kept (maximum, not sum).
        s.open(1, 7, Ino(8), t);
        assert!(!s.renew(1, &[(Ino(6), 2), (Ino(8), 1)], t + L / 3));
        // A second list is not taken: the session already claimed.
        s.renew(1, &[(Ino(6), 5)], t + L / 2);
        let freed = s.expire(t + L + Duration::from_millis(1));
        assert_eq!(freed, vec![Ino(5)], "ino 6 is claimed");
        assert!(s.release(1, &[Ino(6)], t + L).is_empty());
        assert_eq!(s.release(1, &[Ino(6)], t + L), vec![Ino(6)]);
        assert_eq!(s.release(1, &[Ino(8)], t + L), vec![Ino(8)]);
    }

    #[test]
    fn serving_again_forgets_old_sessions_and_starts_a_new_grace() {
        let t = Instant::now();
        let mut s = serving(t, vec![]);
        s.open(1, 8, Ino(5), t);
        s.set_serving(false, t + L, Vec::new);
        s.set_serving(true, t + 2 * L, || vec![Ino(5)]);
        assert!(!s.is_open(Ino(5)));
        assert!(!s.reclaimable(Ino(5), t + 2 * L));
        assert!(s.reclaimable(Ino(5), t + 3 * L + Duration::from_millis(1)));
        // The IOMs' own requests (client 0) hold no session.
        s.touch(0, t);
        assert!(s.map.is_empty());
    }

    #[test]
    fn a_namespace_made_by_this_start_has_no_grace_but_its_next_serving_period_does() {
        let t = Instant::now();
        let mut s = Sessions::new(L, t).fresh();
        s.set_serving(true, t, Vec::new);
        assert!(!s.in_grace(t));
        s.set_serving(false, t, Vec::new);
        s.set_serving(true, t, Vec::new);
        assert!(s.in_grace(t));
    }
}
