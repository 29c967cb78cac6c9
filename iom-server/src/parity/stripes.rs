//! Client-computed stripes, parity side (protocol 10).
//!
//! A client that writes a whole parity group over absent blocks sends the
//! group's parity IOM the XOR of the new blocks (the *piece*) while each
//! data IOM sends, instead of its delta, a reference to the stripe: a
//! block that was absent has its new bytes as its delta, so the piece is
//! the sum of the stripe's deltas. The data cross the network once.
//!
//! Every member's write is still its own a1–a14 / b1–b13 transaction,
//! journaled as always, so recovery is unchanged: after any crash the
//! data IOMs send their updates again with their deltas. What this table
//! adds is where a reference's delta comes from while the IOMs run:
//!
//! - a reference sits in the group's queue *blocked* (the planner never
//!   applies it) until the stripe is *complete*: the piece and a
//!   reference from every member, each reference's checksum equal to the
//!   one the client gave for that member;
//! - a complete stripe's references are applied in one batch or not at
//!   all (`plan::plan_batch`), the piece as the delta of one of them;
//! - a reference is *held* (b4: its writer may be answered, its data IOM
//!   switches its map) only once its batch has read the old parity (b3),
//!   from where the batch is applied or the IOM stops. Until then no
//!   member has switched, so a parity recomputed meanwhile covers every
//!   member at its old version and the stripe still applies, and a
//!   stripe can still be given up without breaking a promise;
//! - a stripe that cannot complete (the piece or a reference missing after
//!   `STRIPE_WAIT`, a checksum that differs, a member that sent a delta
//!   because its block was not absent, a reference sent again) is
//!   *abandoned*: its blocked references leave the queue and their data
//!   IOMs are asked for their deltas (`ParityAck::NeedDelta`); a later
//!   reference to it is answered the same way at once.
//!
//! Invariant: the parity never takes a piece unless every delta it sums
//! belongs to a reference in the same batch.

use bytes::Bytes;
use common::{GroupKey, TxRef};
use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

/// How long a stripe may take to complete before its references are
/// answered `NeedDelta` (its pieces arrive within a round trip of each
/// other; this only bounds a client or member that failed mid-send).
pub const STRIPE_WAIT: Duration = Duration::from_secs(2);
/// How long an abandoned stripe is remembered, so a late reference to it
/// is answered at once instead of after `STRIPE_WAIT`.
const ABANDONED_KEPT: Duration = Duration::from_secs(30);
/// Most piece bytes held at once (beyond it pieces are refused and their
/// stripes go through deltas).
pub const MAX_PIECE_BYTES: usize = 64 << 20;

pub type StripeKey = (GroupKey, u64);

/// One reference: the transaction, the member index, its block's checksum.
#[derive(Clone, Copy, Debug)]
pub struct Ref {
    pub tx: TxRef,
    pub index: u32,
    pub crc: u32,
}

#[derive(Default)]
struct Open {
    piece: Option<(Bytes, Vec<u32>)>,
    refs: Vec<Ref>,
}

/// What a new piece or reference made of its stripe.
pub enum Step {
    /// Still waiting for the rest.
    Waiting,
    /// Every member's reference and the piece are in and agree.
    Complete { piece: Bytes, refs: Vec<Ref> },
    /// The stripe cannot complete: ask these references for their deltas.
    /// `first`: this gave the stripe up (it was not given up before).
    Abandoned { refs: Vec<Ref>, first: bool },
}

#[derive(Default)]
pub struct Stripes {
    open: HashMap<StripeKey, Open>,
    abandoned: HashSet<StripeKey>,
    abandoned_order: VecDeque<(Instant, StripeKey)>,
    piece_bytes: usize,
}

impl Stripes {
    /// Whether `k` is open (a timer watches it).
    pub fn is_open(&self, k: &StripeKey) -> bool {
        self.open.contains_key(k)
    }

    /// The client's piece for stripe `k` of a group of `n` members. Returns
    /// whether the stripe was new (the caller starts its timer), and the
    /// step.
    pub fn piece(&mut self, k: StripeKey, n: u32, bytes: Bytes, crcs: Vec<u32>) -> (bool, Step) {
        self.prune();
        if self.abandoned.contains(&k) {
            return (false, Step::Waiting);
        }
        if crcs.len() != n as usize || self.piece_bytes + bytes.len() > MAX_PIECE_BYTES {
            return (false, self.abandon(k));
        }
        let new = !self.open.contains_key(&k);
        let o = self.open.entry(k).or_default();
        if o.piece.is_some() {
            return (new, self.abandon(k));
        }
        self.piece_bytes += bytes.len();
        o.piece = Some((bytes, crcs));
        (new, self.check(k, n))
    }

    /// A member's reference to stripe `k`.
    pub fn reference(&mut self, k: StripeKey, n: u32, r: Ref) -> (bool, Step) {
        self.prune();
        let new = !self.open.contains_key(&k);
        if self.abandoned.contains(&k) {
            return (false, Step::Abandoned { refs: vec![r], first: false });
        }
        let o = self.open.entry(k).or_default();
        let dup = o.refs.iter().any(|x| x.index == r.index || x.tx == r.tx);
        o.refs.push(r);
        if dup || r.index >= n {
            return (new, self.abandon(k));
        }
        (new, self.check(k, n))
    }

    /// Gives up on stripe `k` (a member sent a delta, a reference was sent
    /// again, the timer ran out).
    pub fn abandon(&mut self, k: StripeKey) -> Step {
        let o = self.open.remove(&k).unwrap_or_default();
        if let Some((b, _)) = &o.piece {
            self.piece_bytes -= b.len();
        }
        let first = self.abandoned.insert(k);
        if first {
            self.abandoned_order.push_back((Instant::now(), k));
        }
        Step::Abandoned { refs: o.refs, first }
    }

    fn check(&mut self, k: StripeKey, n: u32) -> Step {
        let o = &self.open[&k];
        let Some((_, crcs)) = &o.piece else { return Step::Waiting };
        if o.refs.iter().any(|r| crcs.get(r.index as usize) != Some(&r.crc)) {
            return self.abandon(k);
        }
        if o.refs.len() < n as usize {
            return Step::Waiting;
        }
        let o = self.open.remove(&k).expect("checked above");
        let (piece, _) = o.piece.expect("checked above");
        self.piece_bytes -= piece.len();
        Step::Complete { piece, refs: o.refs }
    }

    fn prune(&mut self) {
        while let Some((at, k)) = self.abandoned_order.front().copied() {
            if at.elapsed() < ABANDONED_KEPT {
                break;
            }
            self.abandoned_order.pop_front();
            self.abandoned.remove(&k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::{GroupNo, IomId, ObjectId, TxId};

    fn k() -> StripeKey {
        (GroupKey { object: ObjectId(1), group: GroupNo(0) }, 7)
    }
    fn r(index: u32, crc: u32) -> Ref {
        Ref { tx: TxRef { iom: IomId(index), tx: TxId(1) }, index, crc }
    }

    #[test]
    fn a_stripe_completes_with_its_piece_and_every_reference_in_any_order() {
        let mut s = Stripes::default();
        assert!(matches!(s.reference(k(), 2, r(1, 11)), (true, Step::Waiting)));
        assert!(matches!(s.piece(k(), 2, Bytes::from_static(b"xy"), vec![10, 11]), (false, Step::Waiting)));
        match s.reference(k(), 2, r(0, 10)) {
            (false, Step::Complete { piece, refs, .. }) => {
                assert_eq!(&piece[..], b"xy");
                assert_eq!(refs.len(), 2);
            }
            _ => panic!("not complete"),
        }
        assert!(!s.is_open(&k()));
        assert_eq!(s.piece_bytes, 0);
    }

    #[test]
    fn a_checksum_that_differs_abandons_the_stripe_and_later_references_hear_it_at_once() {
        let mut s = Stripes::default();
        s.piece(k(), 2, Bytes::from_static(b"xy"), vec![10, 11]);
        assert!(matches!(s.reference(k(), 2, r(0, 99)), (_, Step::Abandoned { refs, .. }) if refs.len() == 1));
        assert!(matches!(s.reference(k(), 2, r(1, 11)), (false, Step::Abandoned { refs, .. }) if refs.len() == 1));
        assert_eq!(s.piece_bytes, 0);
    }

    #[test]
    fn a_second_reference_of_one_member_or_a_second_piece_abandons_it() {
        let mut s = Stripes::default();
        s.reference(k(), 2, r(0, 10));
        assert!(matches!(s.reference(k(), 2, r(0, 10)), (_, Step::Abandoned { refs, .. }) if refs.len() == 2));
        let k2 = (k().0, 8);
        s.piece(k2, 2, Bytes::from_static(b"a"), vec![1, 2]);
        assert!(matches!(s.piece(k2, 2, Bytes::from_static(b"a"), vec![1, 2]), (_, Step::Abandoned { .. })));
        assert_eq!(s.piece_bytes, 0);
    }

    #[test]
    fn pieces_beyond_the_cap_are_refused() {
        let mut s = Stripes::default();
        let big = Bytes::from(vec![0u8; MAX_PIECE_BYTES]);
        assert!(matches!(s.piece(k(), 1, big, vec![0]), (true, Step::Waiting)));
        assert!(matches!(s.piece((k().0, 9), 1, Bytes::from_static(b"a"), vec![0]), (false, Step::Abandoned { .. })));
    }
}
