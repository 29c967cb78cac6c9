//! Membership between IOMs: heartbeats, map fetches, votes and commits
//! (handover and recovery questions are their own families, in
//! `handover.rs` and `recovery.rs`).

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ballot {
    pub epoch: Epoch,
    pub proposer: IomId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
pub enum MemberReq {
    Ping {
        from: IomId,
        epoch: Epoch,
    },
    GetMap,
    /// Proposes `map` (epoch = ballot.epoch); voters check their own view of `changed`.
    Propose {
        ballot: Ballot,
        map: ClusterMap,
        changed: IomId,
    },
    Commit {
        map: ClusterMap,
    },
    /// Asked by an IOM that starts with no store and no `store.new`
    /// marker (since 9): does the asker's cluster already run, and has the
    /// answering IOM seen the asker serve? See `iom-server/src/birth.rs`.
    StoreState {
        from: IomId,
    },
    /// The proposer of `ballot` lost its round `round` and will never
    /// commit it (since 9): a voter whose vote is for exactly that round is
    /// free to vote again in its epoch. Without it, votes split between
    /// three proposals of one epoch stayed pinned and no map of that epoch
    /// could ever be committed.
    Release {
        ballot: Ballot,
        round: u64,
    },
    /// `Propose` naming its round (since 9): a proposer tries one ballot in
    /// rounds, one after another, each with a new number, so a `Release`
    /// of a lost round never frees a vote given to a later one.
    ProposeRound {
        ballot: Ballot,
        round: u64,
        map: ClusterMap,
        changed: IomId,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberResp {
    Pong {
        epoch: Epoch,
        reachable: Vec<IomId>,
    },
    Map(ClusterMap),
    Vote {
        granted: bool,
        map: ClusterMap,
    },
    /// Also the first answer on a parity channel and a mirror stream.
    Ack,
    /// The answer to `StoreState`: whether this IOM holds a store, and
    /// whether it has heard the asker's heartbeats since it has one (so
    /// the asker held a store of this cluster before).
    StoreState {
        has_store: bool,
        seen_you: bool,
    },
}
