//! The decision half of the parity side's batching (b3–b8): which queued
//! deltas of one group can be applied now, as a pure function of the queue
//! and the parity head, tested on its own. `ParitySide` (the apply half)
//! takes what it says.
//!
//! Deltas of one member must be applied in version order, each starting
//! from the version the parity covers: a delta whose `old` is the covered
//! version is taken (and the covered version moves to its `new`, so the
//! member's next delta can follow in the same batch); one whose `old` is
//! older is stale (the parity already covers it: a resend, or a parity
//! recomputed from the data) and is acknowledged without applying; one
//! whose `old` is newer waits for the deltas before it.

use common::Version;

/// What the planner needs of one queued delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Queued {
    /// The member (block of the group) it changes.
    pub index: u32,
    pub old: Version,
    pub new: Version,
    /// How many blocks of this group its writer wrote together (a
    /// full-stripe write): worth waiting once for the rest. (Each is one
    /// delta, unless a block's pieces came in two requests: then more
    /// deltas come than the hint says, and the wait is only shorter.)
    pub hint: u8,
    /// The client stripe whose piece carries this delta (`stripes`): a
    /// stripe's deltas are applied in one batch or not at all.
    pub stripe: Option<u64>,
    /// A stripe reference whose stripe is not complete: never applied.
    pub blocked: bool,
}

/// What to do with each queued delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Applied in this batch.
    Take,
    /// Already covered by the parity: acknowledged, not applied.
    Stale,
    /// Stays queued: deltas before it have not arrived.
    Keep,
}

/// Whether to wait (once) for more deltas before planning a batch: the
/// writers' hints say more of this stripe is on its way.
pub fn should_wait(queue: &[Queued], waited: bool) -> bool {
    let want = queue.iter().map(|d| d.hint.max(1) as usize).max().unwrap_or(1);
    !waited && queue.len() < want
}

/// Plans one batch over `queue`, which must be sorted by `(index, old)`,
/// from the parity head's member versions `head`. Returns the member
/// versions the new parity covers and each delta's fate (same order).
/// A blocked delta is kept, and so is every later delta of its member;
/// a stripe some of whose deltas cannot be taken is kept whole.
pub fn plan_batch(queue: &[Queued], head: &[Version]) -> (Vec<Version>, Vec<Fate>) {
    let mut blocked: Vec<bool> = queue.iter().map(|d| d.blocked).collect();
    loop {
        let (members, fates) = plan_unblocked(queue, head, &blocked);
        let split: std::collections::HashSet<u64> = queue
            .iter()
            .zip(&fates)
            .filter(|(d, f)| d.stripe.is_some() && **f != Fate::Take)
            .filter_map(|(d, _)| d.stripe)
            .collect();
        let newly: Vec<usize> = (0..queue.len())
            .filter(|&i| !blocked[i] && queue[i].stripe.is_some_and(|s| split.contains(&s)) && fates[i] == Fate::Take)
            .collect();
        if newly.is_empty() {
            return (members, fates);
        }
        for i in newly {
            blocked[i] = true;
        }
    }
}

fn plan_unblocked(queue: &[Queued], head: &[Version], blocked: &[bool]) -> (Vec<Version>, Vec<Fate>) {
    let mut members = head.to_vec();
    let fates = queue
        .iter()
        .zip(blocked)
        .map(|(d, &blocked)| {
            if blocked {
                return Fate::Keep;
            }
            let Some(cur) = members.get_mut(d.index as usize) else {
                // Not a member of this group: never applicable.
                return Fate::Keep;
            };
            if d.old == *cur {
                *cur = d.new;
                Fate::Take
            } else if d.old < *cur {
                Fate::Stale
            } else {
                Fate::Keep
            }
        })
        .collect();
    (members, fates)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(index: u32, old: u64, new: u64) -> Queued {
        Queued { index, old: Version(old), new: Version(new), hint: 1, stripe: None, blocked: false }
    }

    fn s(index: u32, old: u64, stripe: u64, blocked: bool) -> Queued {
        Queued { stripe: Some(stripe), blocked, ..q(index, old, old + 1) }
    }

    #[test]
    fn a_blocked_stripe_reference_holds_back_its_member_but_not_the_others() {
        let queue = [s(0, 0, 7, true), q(0, 1, 2), q(1, 0, 1)];
        let (members, fates) = plan_batch(&queue, &v(&[0, 0]));
        assert_eq!(fates, vec![Fate::Keep, Fate::Keep, Fate::Take]);
        assert_eq!(members, v(&[0, 1]));
    }

    #[test]
    fn a_complete_stripe_goes_whole_with_what_its_members_chain_after_it() {
        let queue = [s(0, 0, 7, false), q(0, 1, 2), s(1, 0, 7, false)];
        let (members, fates) = plan_batch(&queue, &v(&[0, 0]));
        assert_eq!(fates, vec![Fate::Take, Fate::Take, Fate::Take]);
        assert_eq!(members, v(&[2, 1]));
    }

    #[test]
    fn a_stripe_one_of_whose_members_must_wait_is_kept_whole() {
        // Member 1's reference builds on version 3, which has not arrived:
        // member 0's reference must not go alone (the piece sums both).
        let queue = [s(0, 0, 7, false), q(0, 1, 2), s(1, 3, 7, false)];
        let (members, fates) = plan_batch(&queue, &v(&[0, 2]));
        assert_eq!(fates, vec![Fate::Keep, Fate::Keep, Fate::Keep]);
        assert_eq!(members, v(&[0, 2]));
        // A stale member (the parity recomputed past it) keeps it too.
        let queue = [s(0, 0, 8, false), s(1, 1, 8, false)];
        let (members, fates) = plan_batch(&queue, &v(&[0, 2]));
        assert_eq!(fates, vec![Fate::Keep, Fate::Stale]);
        assert_eq!(members, v(&[0, 2]));
    }

    fn v(x: &[u64]) -> Vec<Version> {
        x.iter().map(|&n| Version(n)).collect()
    }

    #[test]
    fn a_members_deltas_chain_in_version_order_within_one_batch() {
        let queue = [q(0, 3, 4), q(0, 4, 5), q(2, 1, 2)];
        let (members, fates) = plan_batch(&queue, &v(&[3, 7, 1, 0]));
        assert_eq!(members, v(&[5, 7, 2, 0]));
        assert_eq!(fates, vec![Fate::Take, Fate::Take, Fate::Take]);
    }

    #[test]
    fn a_delta_that_arrived_before_its_predecessor_waits() {
        let queue = [q(1, 8, 9)];
        let (members, fates) = plan_batch(&queue, &v(&[0, 7, 0, 0]));
        assert_eq!(members, v(&[0, 7, 0, 0]), "nothing applied");
        assert_eq!(fates, vec![Fate::Keep]);
        // Once the missing one is queued too, both go in order.
        let (members, fates) = plan_batch(&[q(1, 7, 8), q(1, 8, 9)], &v(&[0, 7, 0, 0]));
        assert_eq!(members, v(&[0, 9, 0, 0]));
        assert_eq!(fates, vec![Fate::Take, Fate::Take]);
    }

    #[test]
    fn deltas_the_parity_already_covers_are_stale() {
        // A resend of 4→5 after the parity moved to 6; and a gap after it.
        let queue = [q(0, 4, 5), q(0, 6, 7), q(0, 9, 10), q(3, 2, 3)];
        let (members, fates) = plan_batch(&queue, &v(&[6, 0, 0, 2]));
        assert_eq!(fates, vec![Fate::Stale, Fate::Take, Fate::Keep, Fate::Take]);
        assert_eq!(members, v(&[7, 0, 0, 3]));
    }

    #[test]
    fn a_delta_for_no_member_is_never_taken() {
        let (members, fates) = plan_batch(&[q(9, 0, 1)], &v(&[0, 0]));
        assert_eq!(fates, vec![Fate::Keep]);
        assert_eq!(members, v(&[0, 0]));
    }

    #[test]
    fn a_full_stripe_hint_waits_once_for_the_rest() {
        let mut queue = vec![Queued { hint: 4, ..q(0, 0, 1) }, Queued { hint: 4, ..q(1, 0, 1) }];
        assert!(should_wait(&queue, false), "2 of 4 arrived");
        assert!(!should_wait(&queue, true), "waited once already");
        queue.extend([Queued { hint: 4, ..q(2, 0, 1) }, Queued { hint: 4, ..q(3, 0, 1) }]);
        assert!(!should_wait(&queue, false), "all 4 here");
        assert!(!should_wait(&[q(0, 0, 1)], false), "a lone write does not wait");
        assert!(should_wait(&[], false), "an empty queue waits once too, then goes idle");
    }
}
