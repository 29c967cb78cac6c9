//! Recovery rules (DESIGN §5): what to do with a write transaction that a
//! crash left unfinished, decided from the data IOM's and the parity IOM's
//! journal records plus whether the new data version is intact.
//!
//! [`decide`] is a pure function; `tests` check it exhaustively against a
//! naive model of the protocol crashed at every step. The code that carries
//! the decisions out lives in `recovery_exec`.

use common::Version;

/// What the data IOM's journal says about a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DSide {
    /// No record (never journaled, or forgotten after completion).
    None,
    /// a5 "write issued".
    Issued,
    /// a11 "map switched" (still not completed).
    Switched,
    /// a14 "write completed".
    Completed,
}

/// What the parity IOM's journal says about a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PSide {
    /// No record.
    None,
    /// b1 "update parity received", parity not switched.
    Received,
    /// b11 "update parity completed" (parity includes the delta).
    Completed,
}

/// What recovery does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Nothing was recorded anywhere.
    Nothing,
    /// Keep old data and old parity: the data map points back at the old
    /// version, the new one is freed; the parity IOM forgets the update.
    RollBack,
    /// The new data version is intact: finish the protocol (the parity IOM
    /// applies the delta if it has not), keep new data and new parity.
    RollForward,
    /// The parity IOM completed but the new data is lost: new data = old
    /// data XOR (old parity XOR new parity), rebuilt from the group.
    RebuildData,
    /// Parity does not match the data the data IOM kept (it lacks a
    /// completed write, or holds the delta of a write the data IOM never
    /// recorded): recompute parity from the data.
    RecomputeParity,
    /// Both sides completed: finish the pending frees (b13).
    FinishFrees,
}

/// The recovery table. Rows of DESIGN §5 and how they map:
///
/// | D | P | DESIGN | here |
/// | --- | --- | --- | --- |
/// | none | none | nothing | `Nothing` |
/// | issued | none | keep old (roll back) | `RollBack`, or `RollForward` if the new data is intact |
/// | issued | received | keep old (roll back both) | `RollBack`, or `RollForward` if the new data is intact |
/// | completed | completed | keep new, finish frees | `FinishFrees` |
/// | completed | not completed | roll forward parity | `RecomputeParity` |
/// | issued | completed | roll forward data | `RollForward` if intact, else `RebuildData` |
/// | none | received | (not in DESIGN) | `RollBack` (the parity IOM forgets it) |
/// | none | completed | (not in DESIGN) | `RebuildData` (parity holds the new value) |
///
/// Rolling forward when the new data is intact (instead of back) keeps
/// acknowledged `fast` and `atomic` writes across a crash of either side
/// alone, which DESIGN §6 requires ("a single failure costs latency, never
/// lost data"); groups end consistent either way.
pub fn decide(d: DSide, p: PSide, new_intact: bool) -> Action {
    match (d, p) {
        (DSide::None, PSide::None) => Action::Nothing,
        (DSide::None, PSide::Received) => Action::RollBack,
        // The parity IOM applied a delta the data IOM no longer knows of (its
        // a5 record or its data was lost): parity holds the new value.
        (DSide::None, PSide::Completed) => Action::RebuildData,
        (DSide::Issued | DSide::Switched, PSide::None | PSide::Received) => {
            if new_intact {
                Action::RollForward
            } else {
                Action::RollBack
            }
        }
        (DSide::Issued | DSide::Switched, PSide::Completed) => {
            if new_intact {
                Action::RollForward
            } else {
                Action::RebuildData
            }
        }
        (DSide::Completed, PSide::Completed) => Action::FinishFrees,
        (DSide::Completed, PSide::None | PSide::Received) => Action::RecomputeParity,
    }
}

/// The parity side of a data transaction, from the parity IOM's answer to
/// `TxStatus`: its journal's state, unless the parity it holds already
/// covers the new version (or a later one) — then the update was applied,
/// whatever records the parity IOM still keeps. A stand-in's answer has no
/// parity to judge by (it keeps none for the failed IOM).
pub fn pside_from(state: common::wire::ParityTxState, covers: Version, standin: bool, new: Version) -> PSide {
    use common::wire::ParityTxState;
    match state {
        _ if !standin && covers >= new => PSide::Completed,
        ParityTxState::None => PSide::None,
        ParityTxState::Received => PSide::Received,
        ParityTxState::Completed => PSide::Completed,
    }
}

/// The data side of a parity transaction, from the data IOM's answer
/// (when it no longer has the transaction open): completed if its map
/// points at the new version or later, else nothing recorded.
pub fn dside_from(pointer: Version, new: Version) -> DSide {
    if pointer >= new {
        DSide::Completed
    } else {
        DSide::None
    }
}

/// The action for an unfinished data transaction, with the override of a
/// recovery that must roll back (`force_back`: an earlier transaction of the
/// same block was rolled back, so this one, built on it, cannot stand
/// unless the parity already holds it).
pub fn decide_data(d: DSide, p: PSide, new_intact: bool, force_back: bool) -> Action {
    if force_back && p != PSide::Completed {
        Action::RollBack
    } else {
        decide(d, p, new_intact)
    }
}

#[cfg(test)]
mod answer_tests {
    use super::*;
    use common::wire::ParityTxState as S;

    #[test]
    fn a_parity_that_covers_the_version_counts_as_completed_unless_it_is_a_stand_in() {
        let v = Version;
        for state in [S::None, S::Received, S::Completed] {
            assert_eq!(pside_from(state, v(5), false, v(5)), PSide::Completed);
            assert_eq!(pside_from(state, v(6), false, v(5)), PSide::Completed);
        }
        assert_eq!(pside_from(S::None, v(4), false, v(5)), PSide::None);
        assert_eq!(pside_from(S::Received, v(4), false, v(5)), PSide::Received);
        assert_eq!(pside_from(S::Completed, v(4), false, v(5)), PSide::Completed);
        // A stand-in says `None` and covers nothing it could vouch for.
        assert_eq!(pside_from(S::None, v(9), true, v(5)), PSide::None);
    }

    #[test]
    fn the_data_side_of_a_parity_transaction_follows_the_map_pointer() {
        assert_eq!(dside_from(Version(5), Version(5)), DSide::Completed);
        assert_eq!(dside_from(Version(7), Version(5)), DSide::Completed);
        assert_eq!(dside_from(Version(4), Version(5)), DSide::None);
    }

    #[test]
    fn force_back_rolls_back_everything_but_what_the_parity_holds() {
        for d in [DSide::Issued, DSide::Switched] {
            for intact in [false, true] {
                assert_eq!(decide_data(d, PSide::None, intact, true), Action::RollBack);
                assert_eq!(decide_data(d, PSide::Received, intact, true), Action::RollBack);
                assert_eq!(decide_data(d, PSide::Completed, intact, true), decide(d, PSide::Completed, intact));
                assert_eq!(decide_data(d, PSide::Received, intact, false), decide(d, PSide::Received, intact));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! A naive model: one block A of a group on data IOM D (another member
    //! B on a third IOM never changes), its parity on P. One write changes
    //! A from `old` to `new`. Every event of the protocol is run in order up
    //! to a crash point; the crash keeps what the crash mode keeps; the
    //! facts the IOMs can see are fed to `decide`; the action is carried out
    //! on the model; the group must then be consistent, A must be old or
    //! new, and every acknowledged promise must hold.

    use super::*;

    const OLD: u8 = 0x11;
    const NEW: u8 = 0x5a;
    const B: u8 = 0x33;

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Ev {
        /// a4: new data written (OS page cache).
        DDataWritten,
        /// a5 record written.
        DIssued,
        /// b1 record written.
        PReceived,
        /// b4 reached D with a5 written: `atomic` acknowledged.
        AckAtomic,
        /// b8: new parity written (page cache).
        PParityWritten,
        /// b9 + b11: block file synced, then ParityDone written and synced.
        PDone,
        /// a10 + a11: block file synced, then Switched written and synced.
        DSwitched,
        /// b12 reached D (with a11 durable): `durable` acknowledged.
        AckDurable,
        /// a14 record durable.
        DCompleted,
        /// b13 record written.
        PFreed,
    }

    /// Orders the two IOMs' steps can run in (D's a10/a11 races P's b8–b11).
    fn orders() -> Vec<Vec<Ev>> {
        use Ev::*;
        vec![
            vec![
                DDataWritten,
                DIssued,
                PReceived,
                AckAtomic,
                PParityWritten,
                PDone,
                DSwitched,
                AckDurable,
                DCompleted,
                PFreed,
            ],
            vec![
                DDataWritten,
                DIssued,
                PReceived,
                AckAtomic,
                DSwitched,
                PParityWritten,
                PDone,
                AckDurable,
                DCompleted,
                PFreed,
            ],
            vec![
                DDataWritten,
                PReceived,
                DIssued,
                AckAtomic,
                PParityWritten,
                DSwitched,
                PDone,
                AckDurable,
                DCompleted,
                PFreed,
            ],
            // D's a5 record still in flight when P received and applied the update (a `fast` write)
            vec![
                DDataWritten,
                PReceived,
                PParityWritten,
                PDone,
                DIssued,
                AckAtomic,
                DSwitched,
                AckDurable,
                DCompleted,
                PFreed,
            ],
        ]
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Crash {
        D,
        P,
        Both,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Mode {
        /// Process killed: what reached the OS survives.
        Process,
        /// Power lost: only what was synced survives.
        Power,
    }

    fn run(order: &[Ev], upto: usize, crash: Crash, mode: Mode) {
        let done = &order[..upto];
        let has = |e: Ev| done.contains(&e);
        let d_crashed = crash != Crash::P;
        let p_crashed = crash != Crash::D;
        let d_keeps_written = !d_crashed || mode == Mode::Process;
        let p_keeps_written = !p_crashed || mode == Mode::Process;

        // D's journal after the crash.
        let dside = if has(Ev::DCompleted) {
            DSide::Completed
        } else if has(Ev::DSwitched) {
            DSide::Switched
        } else if has(Ev::DIssued) && d_keeps_written || !d_crashed && has(Ev::DDataWritten) {
            // A live D knows the transaction from memory (the map applies a5
            // before the record is written).
            DSide::Issued
        } else {
            DSide::None
        };
        // The new data block survives if it was written and the OS kept it, or it was synced.
        let new_intact = has(Ev::DDataWritten) && (d_keeps_written || has(Ev::DSwitched));
        // P's journal after the crash. A live P with the delta finishes b5–b12
        // before it answers recovery (it holds the delta in memory).
        let p_live_finishes = !p_crashed && has(Ev::PReceived);
        let pside = if has(Ev::PDone) || p_live_finishes {
            PSide::Completed
        } else if has(Ev::PReceived) && p_keeps_written {
            PSide::Received
        } else {
            PSide::None
        };
        // Values on disk as the map sees them.
        let mut a = match dside {
            DSide::Completed | DSide::Switched => NEW,
            _ => OLD,
        };
        let mut parity = if pside == PSide::Completed { NEW ^ B } else { OLD ^ B };

        let action = decide(dside, pside, new_intact);
        match action {
            Action::Nothing | Action::FinishFrees => {}
            Action::RollBack => {
                a = OLD;
                assert!(pside != PSide::Completed, "roll back with parity completed");
            }
            Action::RollForward => {
                assert!(new_intact);
                a = NEW;
                parity = NEW ^ B;
            }
            Action::RebuildData => {
                assert_eq!(pside, PSide::Completed);
                a = parity ^ B;
                assert!(a == NEW, "rebuilt data is not the new version: {dside:?}");
            }
            Action::RecomputeParity => {
                parity = a ^ B;
            }
        }
        let ctx = format!(
            "order {order:?} upto {upto} crash {crash:?} mode {mode:?}: {dside:?}/{pside:?}/{new_intact} -> {action:?}"
        );
        assert_eq!(parity, a ^ B, "group inconsistent: {ctx}");
        assert!(a == OLD || a == NEW, "block is neither old nor new: {ctx}");
        if has(Ev::AckDurable) {
            assert_eq!(a, NEW, "durable write lost: {ctx}");
        }
        // atomic: all-or-nothing always; kept across any process crash and
        // across the loss of either IOM alone.
        if has(Ev::AckAtomic) && (mode == Mode::Process || crash != Crash::Both) {
            assert_eq!(a, NEW, "atomic write lost: {ctx}");
        }
        // fast: kept when only P crashed (D has it and resends).
        if has(Ev::DDataWritten) && crash == Crash::P {
            assert_eq!(a, NEW, "fast write lost with only P crashed: {ctx}");
        }
    }

    #[test]
    fn every_crash_point_leaves_a_consistent_group_and_keeps_promises() {
        let mut n = 0;
        for order in orders() {
            for upto in 0..=order.len() {
                for crash in [Crash::D, Crash::P, Crash::Both] {
                    for mode in [Mode::Process, Mode::Power] {
                        run(&order, upto, crash, mode);
                        n += 1;
                    }
                }
            }
        }
        assert_eq!(n, 4 * 11 * 3 * 2);
    }

    #[test]
    fn table_rows_of_design() {
        assert_eq!(decide(DSide::None, PSide::None, false), Action::Nothing);
        assert_eq!(decide(DSide::Issued, PSide::None, false), Action::RollBack);
        assert_eq!(decide(DSide::Issued, PSide::Received, false), Action::RollBack);
        assert_eq!(decide(DSide::Completed, PSide::Completed, true), Action::FinishFrees);
        assert_eq!(decide(DSide::Completed, PSide::Received, true), Action::RecomputeParity);
        assert_eq!(decide(DSide::Switched, PSide::Completed, false), Action::RebuildData);
        assert_eq!(decide(DSide::Issued, PSide::Completed, true), Action::RollForward);
    }

    #[test]
    fn decide_is_total() {
        for d in [DSide::None, DSide::Issued, DSide::Switched, DSide::Completed] {
            for p in [PSide::None, PSide::Received, PSide::Completed] {
                for i in [false, true] {
                    let a = decide(d, p, i);
                    if a == Action::RollForward {
                        assert!(i, "roll forward needs intact data");
                    }
                }
            }
        }
    }
}
