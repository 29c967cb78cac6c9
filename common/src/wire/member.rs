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
}
