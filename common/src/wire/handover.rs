//! Handover between a failed IOM's stand-in and the IOM coming back:
//! the marks of what changed while it was down, the freeze that stops the
//! stand-in serving the role, and the unfreeze that gives it back.

use super::*;

/// Asked of the stand-in (the proxy) by the rejoining IOM `about`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, strum::IntoStaticStr)]
pub enum HandoverReq {
    /// Everything the stand-in marked for rebuild of `about`.
    RebuildMarks { about: IomId },
    /// `about` rebuilt these marks; the stand-in forgets them.
    ClearMarks { about: IomId, marks: RebuildMarks },
    /// The stand-in stops serving `about`'s role and answers with its last marks.
    Freeze { about: IomId },
    /// Handover abandoned: the stand-in serves `about`'s role again.
    Unfreeze { about: IomId },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HandoverResp {
    Marks(RebuildMarks),
    Ack,
}

/// What a stand-in recorded for a failed IOM while it stood in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildMarks {
    /// Data blocks written (through parity) while it was down: rebuild at this version or later.
    pub blocks: Vec<(BlockKey, Version)>,
    /// Parity groups updated while it was down: recompute their parity.
    pub groups: Vec<GroupKey>,
    /// Objects dropped while it was down: drop its blocks of them too.
    pub drops: Vec<(ObjectId, GroupNo)>,
    /// The stand-in has stopped serving the role (handover in progress).
    pub frozen: bool,
}
