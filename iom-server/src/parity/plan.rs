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
    /// How many deltas of this group its writer sent together (a
    /// full-stripe write): worth waiting once for the rest.
    pub hint: u8,
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
pub fn plan_batch(queue: &[Queued], head: &[Version]) -> (Vec<Version>, Vec<Fate>) {
    let mut members = head.to_vec();
    let fates = queue
        .iter()
        .map(|d| {
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
        Queued { index, old: Version(old), new: Version(new), hint: 1 }
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
