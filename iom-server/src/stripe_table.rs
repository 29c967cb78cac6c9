//! The recovery table of the full-stripe transaction (issue 15; design in
//! docs/full-stripe.md), as pure functions with an exhaustive model test.
//! Not wired to a transaction yet: the IOM and client sides come next, on
//! top of this table.
//!
//! A full-stripe write replaces every data block of one parity group and
//! its parity at once: the client sends each of the N data members its
//! piece and the group's parity IOM (the *decider*) the parity it computed.
//! Each member writes its piece as a new version, journals it as held and
//! votes; the decider commits only with every vote and the parity in hand,
//! and journals the decision before anyone is answered. A full parity does
//! not commute with another write of the group, so the group's outcome is
//! one decision for all N + 1 pieces: all new or all old.
//!
//! [`outcome`] is that decision after a crash, from what the decider's
//! journal says (or, when the decider and its journal are lost, from what
//! every member holds); [`member_action`] is what each member then does.

/// What a member's journal (or its memory, when it did not crash) says
/// about its piece of a stripe transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MSide {
    /// No piece: never received, tombstoned (it answered "not held"), or
    /// its record was lost.
    None,
    /// The piece is written and journaled as held; no decision seen.
    Held,
    /// Commit seen: the map points at the new version.
    Switched,
    /// Abort seen: the piece was rolled back.
    RolledBack,
}

/// What the decider's journal says about the transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecSide {
    /// No decision recorded: a decider that can answer aborts the
    /// transaction now (and tombstones it, so no late vote commits it).
    Undecided,
    /// The commit record (the new parity version with the member versions
    /// it covers) is in its journal.
    Committed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    Commit,
    Abort,
}

/// The group's outcome, from the decider's journal and **every** member's
/// state for the transaction: recovery collects them all before it acts
/// (a member that asked only the decider could roll back while another
/// had switched on a commit the decider lost; docs/full-stripe.md).
///
/// A member that switched proves a commit (members switch only on the
/// decider's commit), and one that rolled back proves an abort; these
/// win, since the decider may have lost an unsynced decision in a power
/// failure. Otherwise the decider's journal decides: a decider without a
/// commit record aborts now (and tombstones the transaction, so no late
/// vote commits it; after a restart it holds no parity for it anyway).
/// `decider` is `None` when the decider's journal is lost (its disk
/// replaced): the members then commit only if every one holds its piece,
/// which agrees with whatever the lost decider decided: a commit needed
/// every vote, a member votes only once it holds its piece and drops it
/// only on an abort, which the members that saw it report. The parity is
/// rebuilt from the members' data whenever the decider's is lost or stale.
pub fn outcome(decider: Option<DecSide>, members: &[MSide]) -> Outcome {
    if members.contains(&MSide::Switched) {
        return Outcome::Commit;
    }
    if members.contains(&MSide::RolledBack) {
        return Outcome::Abort;
    }
    match decider {
        Some(DecSide::Committed) => Outcome::Commit,
        Some(DecSide::Undecided) => Outcome::Abort,
        None if members.iter().all(|m| *m == MSide::Held) => Outcome::Commit,
        None => Outcome::Abort,
    }
}

/// What one member does once the outcome is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MAction {
    Nothing,
    /// Switch the map to the held piece (its data is intact).
    RollForward,
    /// The piece is lost: rebuild the new version from the group (the new
    /// parity and the other members' new versions).
    RebuildFromGroup,
    /// Free the held piece; the map stays at the old version.
    RollBack,
}

pub fn member_action(outcome: Outcome, m: MSide, piece_intact: bool) -> MAction {
    match (outcome, m) {
        (Outcome::Commit, MSide::Switched) => MAction::Nothing,
        (Outcome::Commit, MSide::Held) if piece_intact => MAction::RollForward,
        (Outcome::Commit, MSide::Held | MSide::None | MSide::RolledBack) => MAction::RebuildFromGroup,
        (Outcome::Abort, MSide::Held | MSide::Switched) => MAction::RollBack,
        (Outcome::Abort, MSide::None | MSide::RolledBack) => MAction::Nothing,
    }
}

#[cfg(test)]
mod tests {
    //! A naive model with N = 3 members and the decider. Every event runs
    //! in one of several orders up to a crash point; the crash (of one
    //! member, of the decider, of the decider's disk, of a member and the
    //! decider, of everyone; process or power) keeps what it keeps; the
    //! facts the IOMs can see go to `outcome` and `member_action`; the
    //! model carries the actions out and checks that the group is all old
    //! or all new and consistent, and that every acknowledged promise holds.

    use super::*;

    const N: usize = 3;
    fn old(j: usize) -> u8 {
        0x10 + j as u8
    }
    fn new(j: usize) -> u8 {
        0xa0 + j as u8
    }
    fn xor(v: &[u8]) -> u8 {
        v.iter().fold(0, |a, b| a ^ b)
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Ev {
        /// Member j wrote its piece and its "held" record (to the OS) and voted.
        Held(usize),
        /// The decider wrote the client's parity into a new slot (to the OS).
        ParityWritten,
        /// The decider wrote its commit record (needs every vote and the parity).
        Decided,
        /// The decider gave up waiting (a vote or the parity missing): abort.
        Aborted,
        /// Member j saw the decision: commit (map switched, record written) or abort.
        Saw(usize),
        /// Every member answered the client after the commit: `atomic` acknowledged.
        AckAtomic,
        /// The decider synced parity and record; member j synced piece and records.
        DSynced,
        MSynced(usize),
        /// Every member and the decider synced: `durable` acknowledged.
        AckDurable,
    }

    fn orders() -> Vec<Vec<Ev>> {
        use Ev::*;
        let commit = |first: &[Ev]| {
            let mut v = first.to_vec();
            v.extend([Decided, Saw(2), Saw(0), Saw(1), AckAtomic, MSynced(1), DSynced, MSynced(0), MSynced(2)]);
            v.push(AckDurable);
            v
        };
        vec![
            commit(&[Held(0), Held(1), ParityWritten, Held(2)]),
            commit(&[ParityWritten, Held(2), Held(0), Held(1)]),
            commit(&[Held(1), Held(2), Held(0), ParityWritten]),
            // The client died before sending piece 2: the decider times out.
            vec![Held(0), ParityWritten, Held(1), Aborted, Saw(0), Saw(1), Saw(2)],
            // The client died before sending the parity.
            vec![Held(0), Held(1), Held(2), Aborted, Saw(1), Saw(0), Saw(2)],
        ]
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Crash {
        Member(usize),
        Decider,
        /// The decider's disk is replaced: its journal and parity are gone.
        DeciderDisk,
        MemberAndDecider(usize),
        All,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Mode {
        Process,
        /// Power lost: only what was synced survives.
        Power,
        /// Power lost, and of what was not synced the journal records
        /// reached the disk but the block writes did not (no order is
        /// promised without a sync).
        PowerRecordsOnly,
    }

    fn run(order: &[Ev], upto: usize, crash: Crash, mode: Mode) {
        let done = &order[..upto];
        let has = |e: Ev| done.contains(&e);
        let member_crashed =
            |j: usize| matches!(crash, Crash::Member(k) | Crash::MemberAndDecider(k) if k == j) || crash == Crash::All;
        let decider_crashed = matches!(crash, Crash::Decider | Crash::MemberAndDecider(_) | Crash::All);
        // What survives on a node: everything if it lives or only its
        // process died; what it synced if it lost power.
        let m_keeps = |j: usize, e: Ev| has(e) && (!member_crashed(j) || mode == Mode::Process || has(Ev::MSynced(j)));
        let d_keeps = |e: Ev| {
            has(e) && crash != Crash::DeciderDisk && (!decider_crashed || mode == Mode::Process || has(Ev::DSynced))
        };
        let records_only = mode == Mode::PowerRecordsOnly;
        let m_keeps_record = |j: usize, e: Ev| m_keeps(j, e) || records_only && has(e);
        let d_keeps_record = |e: Ev| d_keeps(e) || records_only && has(e) && crash != Crash::DeciderDisk;
        let committed = has(Ev::Decided);

        let sides: Vec<MSide> = (0..N)
            .map(|j| {
                if m_keeps_record(j, Ev::Saw(j)) {
                    if committed {
                        MSide::Switched
                    } else {
                        MSide::RolledBack
                    }
                } else if m_keeps_record(j, Ev::Held(j)) {
                    MSide::Held
                } else {
                    MSide::None
                }
            })
            .collect();
        let intact: Vec<bool> = (0..N).map(|j| m_keeps(j, Ev::Held(j))).collect();
        let decider = match crash {
            Crash::DeciderDisk => None,
            _ if d_keeps_record(Ev::Decided) => Some(DecSide::Committed),
            _ => Some(DecSide::Undecided),
        };
        let parity_intact = d_keeps(Ev::ParityWritten);
        let out = outcome(decider, &sides);
        let ctx =
            format!("order {order:?} upto {upto} crash {crash:?} mode {mode:?}: {sides:?} {decider:?} -> {out:?}");

        // The decider's parity: the new one if it committed with the
        // parity intact, the old one if it aborted, recomputed from the
        // data when lost.
        let mut values: Vec<Option<u8>> = vec![None; N];
        let actions: Vec<MAction> = (0..N).map(|j| member_action(out, sides[j], intact[j])).collect();
        for j in 0..N {
            values[j] = match actions[j] {
                // A switched member whose new version did not reach its
                // disk (records only) finds it damaged on the first read
                // and rebuilds it from the group, as for a lost piece.
                MAction::Nothing if sides[j] == MSide::Switched => intact[j].then_some(new(j)),
                MAction::Nothing => Some(old(j)),
                MAction::RollForward => {
                    assert!(intact[j], "roll forward of a lost piece: {ctx}");
                    Some(new(j))
                }
                MAction::RollBack => Some(old(j)),
                MAction::RebuildFromGroup => None,
            };
        }
        let parity_new = out == Outcome::Commit && decider == Some(DecSide::Committed) && parity_intact;
        let rebuild: Vec<usize> = (0..N).filter(|&j| values[j].is_none()).collect();
        if !rebuild.is_empty() {
            // Only one lost piece can come back, and only from the new parity.
            if rebuild.len() == 1 && parity_new {
                let j = rebuild[0];
                let others: Vec<u8> = (0..N).filter(|&k| k != j).map(|k| values[k].expect("settled")).collect();
                values[j] = Some(xor(&[&others[..], &[xor(&(0..N).map(new).collect::<Vec<_>>())]].concat()));
            } else {
                // Beyond what the group can rebuild: allowed only where no
                // promise is made (two nodes lost power, or nothing acked).
                assert!(
                    mode != Mode::Process && matches!(crash, Crash::All | Crash::MemberAndDecider(_)),
                    "pieces {rebuild:?} cannot be rebuilt: {ctx}"
                );
                assert!(!has(Ev::AckDurable), "a durable write cannot be rebuilt: {ctx}");
                return;
            }
        }
        let values: Vec<u8> = values.into_iter().map(|v| v.expect("settled")).collect();
        // Parity after recovery: kept when it matches the decision, else
        // recomputed from the members (a lost or stale parity).
        let parity = if parity_new || out == Outcome::Abort && crash != Crash::DeciderDisk {
            if out == Outcome::Commit {
                xor(&(0..N).map(new).collect::<Vec<_>>())
            } else {
                xor(&(0..N).map(old).collect::<Vec<_>>())
            }
        } else {
            xor(&values)
        };
        let all_new = (0..N).all(|j| values[j] == new(j));
        let all_old = (0..N).all(|j| values[j] == old(j));
        assert!(all_new || all_old, "torn group {values:x?}: {ctx}");
        assert_eq!(parity, xor(&values), "parity does not match the data: {ctx}");
        assert_eq!(all_new, out == Outcome::Commit, "the outcome was not carried out: {ctx}");
        if has(Ev::AckDurable) {
            assert!(all_new, "durable write lost: {ctx}");
        }
        // atomic: any process crash, any single node's loss (power or disk).
        let single = matches!(crash, Crash::Member(_) | Crash::Decider | Crash::DeciderDisk);
        if has(Ev::AckAtomic) && (mode == Mode::Process || single) {
            assert!(all_new, "atomic write lost: {ctx}");
        }
        // Never committed where a member never held its piece.
        if !(0..N).all(|j| has(Ev::Held(j))) {
            assert!(all_old, "committed without every piece: {ctx}");
        }
    }

    #[test]
    fn every_crash_point_leaves_the_group_all_old_or_all_new_and_keeps_promises() {
        let crashes = [
            Crash::Member(0),
            Crash::Member(2),
            Crash::Decider,
            Crash::DeciderDisk,
            Crash::MemberAndDecider(1),
            Crash::All,
        ];
        let mut n = 0;
        for order in orders() {
            for upto in 0..=order.len() {
                for crash in crashes {
                    for mode in [Mode::Process, Mode::Power, Mode::PowerRecordsOnly] {
                        run(&order, upto, crash, mode);
                        n += 1;
                    }
                }
            }
        }
        assert!(n > 500, "{n} cases");
    }

    #[test]
    fn rows_of_the_table() {
        use MSide::*;
        assert_eq!(outcome(Some(DecSide::Committed), &[None, Held, Switched]), Outcome::Commit);
        assert_eq!(outcome(Some(DecSide::Undecided), &[Held, Held, Held]), Outcome::Abort);
        assert_eq!(outcome(Option::None, &[Held, Switched, Held]), Outcome::Commit);
        assert_eq!(outcome(Option::None, &[Held, RolledBack, Held]), Outcome::Abort);
        assert_eq!(outcome(Option::None, &[Held, None, Held]), Outcome::Abort);
        // A decision the decider lost (unsynced, power) shows at a member that saw it.
        assert_eq!(outcome(Some(DecSide::Undecided), &[Switched, Held, None]), Outcome::Commit);
        assert_eq!(member_action(Outcome::Commit, Held, true), MAction::RollForward);
        assert_eq!(member_action(Outcome::Commit, Held, false), MAction::RebuildFromGroup);
        assert_eq!(member_action(Outcome::Commit, None, false), MAction::RebuildFromGroup);
        assert_eq!(member_action(Outcome::Abort, Held, true), MAction::RollBack);
        assert_eq!(member_action(Outcome::Abort, None, false), MAction::Nothing);
    }
}
