//! `iomfs scrub`: checks every parity group of a running cluster (parity ==
//! XOR of its data blocks, at the member versions the parity covers) and
//! every block's checksum (verified by the IOM on each read).

use crate::cluster::{ClientError, ClusterClient, Result};
use bytes::Bytes;
use common::wire::{BlockInfo, DataReq, DataResp, ErrorCode, GroupInfo, Reply, Request, Route};
use common::{BlockKey, GroupKey, GroupNo, IomId, ObjectId, Version};
use futures::StreamExt;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub object: ObjectId,
    pub group: GroupNo,
    pub iom: IomId,
    pub what: String,
    /// What `scrub --repair` does about it, when it can.
    pub fix: Option<Fix>,
}

/// A repair `iomfs scrub --repair` can ask an IOM for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fix {
    /// Read the block: its IOM rebuilds a damaged version from the group.
    Block(BlockKey),
    /// Recompute the group's parity from its data blocks (checksums hold,
    /// parity disagrees).
    Parity(GroupKey),
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "object {} group {} IOM {}: {}", self.object, self.group, self.iom, self.what)
    }
}

/// The last scrub run from a cluster directory (`D/last-scrub.json`),
/// which `iomfs status` shows: when it finished, how long it took and
/// what it found.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LastScrub {
    /// Seconds since the Unix epoch when it finished.
    pub finished_unix: u64,
    pub seconds: f64,
    pub groups: u64,
    pub blocks: u64,
    /// Problems found by the last pass.
    pub problems: u64,
    /// Problems repaired (`--repair`) before that pass.
    pub repaired: u64,
    /// Damaged blocks rebuilt from their groups while the scrub read them.
    pub healed: u64,
}

impl LastScrub {
    pub fn path(dir: &std::path::Path) -> std::path::PathBuf {
        dir.join("last-scrub.json")
    }

    pub fn save(&self, dir: &std::path::Path) -> std::io::Result<()> {
        let tmp = dir.join("last-scrub.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, Self::path(dir))
    }

    /// None when no scrub was recorded (or the record is unreadable).
    pub fn load(dir: &std::path::Path) -> Option<LastScrub> {
        serde_json::from_slice(&std::fs::read(Self::path(dir)).ok()?).ok()
    }

    pub fn to_wire(&self) -> common::wire::ScrubSummary {
        common::wire::ScrubSummary {
            finished_unix: self.finished_unix,
            millis: (self.seconds * 1000.0) as u64,
            groups: self.groups,
            blocks: self.blocks,
            problems: self.problems,
            repaired: self.repaired,
            healed: self.healed,
        }
    }

    pub fn from_wire(s: &common::wire::ScrubSummary) -> LastScrub {
        LastScrub {
            finished_unix: s.finished_unix,
            seconds: s.millis as f64 / 1000.0,
            groups: s.groups,
            blocks: s.blocks,
            problems: s.problems,
            repaired: s.repaired,
            healed: s.healed,
        }
    }

    pub fn summary(&self) -> String {
        // A record from a host whose clock was far off must not break the
        // status: a time outside what RFC 3339 can show is printed raw.
        let when = std::time::UNIX_EPOCH
            .checked_add(std::time::Duration::from_secs(self.finished_unix))
            .filter(|_| self.finished_unix < 253_402_300_800);
        let (at, ago) = match when {
            Some(w) => {
                let ago = std::time::SystemTime::now().duration_since(w).unwrap_or_default();
                let ago = humantime::format_duration(std::time::Duration::from_secs(ago.as_secs()));
                (humantime::format_rfc3339_seconds(w).to_string(), format!("{ago} ago"))
            }
            None => (format!("{} s after 1970", self.finished_unix), "clock far off".to_string()),
        };
        format!(
            "{at} ({ago}), {:.1} s, {} groups, {} blocks, {} problems{}{}",
            self.seconds,
            self.groups,
            self.blocks,
            self.problems,
            if self.repaired > 0 { format!(", {} repaired", self.repaired) } else { String::new() },
            if self.healed > 0 { format!(", {} blocks healed", self.healed) } else { String::new() },
        )
    }
}

#[derive(Debug, Default)]
pub struct Report {
    pub groups: u64,
    pub blocks: u64,
    pub problems: Vec<Problem>,
    /// Problems of objects whose drop was still under way, set aside
    /// (`set_aside_dropping`).
    pub dropping: u64,
}

/// Most dead objects asked of the namespace (a reply well under
/// `codec::MAX_ENCODED`).
const DEAD_ASKED: u32 = 50_000;

/// Sets aside the problems of objects the namespace holds as dead, whose
/// drop is under way on the IOMs (one IOM may have dropped a block or a
/// group another still holds, for as long as that one waits for a
/// transaction on the object — up to a minute); returns how many. An
/// object whose drop finished is no longer in that set, so a group that
/// outlived its object (docs/architecture.md, "Nothing remembers a drop")
/// is still reported.
async fn set_aside_dropping(c: &ClusterClient, problems: &mut Vec<Problem>) -> u64 {
    let dead = match c.meta(common::meta::MetaReq::DeadObjects { max: DEAD_ASKED }).await {
        Ok(common::meta::MetaResp::Dead(d)) => d.into_iter().collect::<BTreeSet<ObjectId>>(),
        Ok(r) => {
            tracing::warn!("dead objects: unexpected reply {r:?}; every problem is reported");
            return 0;
        }
        Err(e) => {
            tracing::warn!("dead objects not known ({e}); every problem is reported");
            return 0;
        }
    };
    let before = problems.len();
    problems.retain(|p| !dead.contains(&p.object));
    (before - problems.len()) as u64
}

/// One page of a listing. A listing only reads, so a connection lost on
/// the way (an IOM that restarted since the last look) is asked again, for
/// up to 10 s, instead of failing the whole scrub.
async fn list_call(c: &ClusterClient, iom: IomId, req: &Request) -> Result<(Reply, Bytes)> {
    let start = std::time::Instant::now();
    loop {
        match c.call_iom(iom, req, Bytes::new()).await {
            Err(ClientError::Net(e)) if e.is_transport() && start.elapsed() < Duration::from_secs(10) => {
                tracing::debug!("listing IOM {iom} again after: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            r => return r,
        }
    }
}

pub(crate) async fn list_all(c: &ClusterClient, iom: IomId) -> Result<(Vec<BlockInfo>, Vec<GroupInfo>)> {
    let mut blocks = Vec::new();
    let mut after = None;
    loop {
        let (r, _) = list_call(c, iom, &Request::Data(DataReq::ListBlocks { after, limit: 5000 })).await?;
        let Reply::Data(DataResp::Blocks(b)) = r else {
            return Err(ClientError::Unexpected(format!("{r:?}")));
        };
        let done = b.len() < 5000;
        after = b.last().map(|x| x.key);
        blocks.extend(b);
        if done {
            break;
        }
    }
    let mut groups = Vec::new();
    let mut after = None;
    loop {
        let (r, _) = list_call(c, iom, &Request::Data(DataReq::ListGroups { after, limit: 5000 })).await?;
        let Reply::Data(DataResp::Groups(g)) = r else {
            return Err(ClientError::Unexpected(format!("{r:?}")));
        };
        let done = g.len() < 5000;
        after = g.last().map(|x| x.key);
        groups.extend(g);
        if done {
            break;
        }
    }
    Ok((blocks, groups))
}

fn xor_into(dst: &mut Vec<u8>, src: &[u8]) {
    if dst.len() < src.len() {
        dst.resize(src.len(), 0);
    }
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

fn trim(mut v: Vec<u8>) -> Vec<u8> {
    while v.last() == Some(&0) {
        v.pop();
    }
    v
}

enum Outcome {
    Ok,
    Retry(String),
    Problem(Problem),
}

async fn check_group(c: &ClusterClient, g: GroupKey, heads: &BTreeMap<BlockKey, Version>) -> Outcome {
    let layout = c.layout;
    let (data_ioms, p) = layout.group_ioms(g.object, g.group);
    let prob =
        |iom: IomId, what: String| Outcome::Problem(Problem { object: g.object, group: g.group, iom, what, fix: None });
    let fixable = |iom: IomId, what: String, fix: Fix| {
        Outcome::Problem(Problem { object: g.object, group: g.group, iom, what, fix: Some(fix) })
    };
    let (versions, parity) =
        match c.call_role(p, |route: Route| Request::Data(DataReq::ReadParity { route, group: g }), Bytes::new()).await
        {
            Ok((Reply::Data(DataResp::Parity { versions }), b)) => (versions, b),
            Ok((r, _)) => return prob(p, format!("unexpected reply {r:?}")),
            Err(e) if e.code() == Some(ErrorCode::Corrupt) => return prob(p, format!("parity block damaged: {e}")),
            Err(e) => return Outcome::Retry(format!("parity read from IOM {p}: {e}")),
        };
    let mut acc = parity.to_vec();
    for (j, d) in data_ioms.iter().enumerate() {
        let key = BlockKey { object: g.object, block: layout.member_block(g.group, j as u32) };
        let v = versions.get(j).copied().unwrap_or(Version(0));
        let head = heads.get(&key).copied().unwrap_or(Version(0));
        if head != v {
            return Outcome::Retry(format!(
                "block {} is at version {} on IOM {d} but parity covers version {}",
                key.block, head.0, v.0
            ));
        }
        if v == Version(0) {
            continue;
        }
        match c
            .call_role(*d, |route| Request::Data(DataReq::ReadVersion { route, key, version: v }), Bytes::new())
            .await
        {
            Ok((_, b)) => xor_into(&mut acc, &b),
            Err(e) if e.code() == Some(ErrorCode::Corrupt) => {
                return fixable(*d, format!("block {} checksum mismatch: {e}", key.block), Fix::Block(key))
            }
            Err(e) => return Outcome::Retry(format!("block {} on IOM {d}: {e}", key.block)),
        }
    }
    if trim(acc).is_empty() {
        Outcome::Ok
    } else {
        fixable(p, "parity is not the XOR of the group's data blocks".into(), Fix::Parity(g))
    }
}

/// Scrubs the whole cluster.
pub async fn scrub(c: &ClusterClient, mut progress: impl FnMut(u64, u64)) -> Result<Report> {
    let layout = c.layout;
    let mut report = Report::default();
    let mut heads = BTreeMap::new();
    let mut groups = BTreeSet::new();
    for i in 0..c.cfg.width() {
        let iom = IomId(i);
        let (blocks, pgroups) = list_all(c, iom).await?;
        for b in blocks {
            let g = layout.group_key(b.key);
            if layout.data_iom(b.key.object, b.key.block) != iom {
                report.problems.push(Problem {
                    object: b.key.object,
                    group: g.group,
                    iom,
                    what: format!("holds block {} that placement puts elsewhere", b.key.block),
                    fix: None,
                });
            }
            heads.insert(b.key, b.version);
            groups.insert(g);
            report.blocks += 1;
        }
        for g in pgroups {
            if layout.parity_iom(g.key.object, g.key.group) != iom {
                report.problems.push(Problem {
                    object: g.key.object,
                    group: g.key.group,
                    iom,
                    what: "holds parity that placement puts elsewhere".into(),
                    fix: None,
                });
            }
            groups.insert(g.key);
        }
    }
    let total = groups.len() as u64;
    let heads = &heads;
    let mut checks = futures::stream::iter(groups.into_iter().map(|g| async move {
        let mut last = String::new();
        for attempt in 0..20 {
            match check_group(c, g, heads).await {
                Outcome::Ok => return None,
                Outcome::Problem(p) if attempt >= 3 => return Some(p),
                Outcome::Problem(p) => last = p.to_string(),
                Outcome::Retry(why) => last = why,
            }
            // In-flight writes settle within milliseconds; look again.
            tokio::time::sleep(Duration::from_millis(50 * (attempt + 1))).await;
            if attempt == 5 {
                // The listing may be older than the data: refresh this group's heads.
                return check_fresh(c, g).await;
            }
        }
        let (_, p) = c.layout.group_ioms(g.object, g.group);
        Some(Problem { object: g.object, group: g.group, iom: p, what: last, fix: None })
    }))
    .buffer_unordered(32);
    let mut done = 0;
    while let Some(r) = checks.next().await {
        done += 1;
        report.groups += 1;
        if let Some(p) = r {
            report.problems.push(p);
        }
        progress(done, total);
    }
    if !report.problems.is_empty() {
        report.dropping = set_aside_dropping(c, &mut report.problems).await;
    }
    Ok(report)
}

/// Tells every IOM what the scrub found, so `iomfs status` on any host and
/// the IOMs' metrics show it. Returns a note for each IOM not told: one
/// that speaks an older protocol (it does not keep scrub results until it
/// is upgraded) or does not answer.
pub async fn report_to_ioms(c: &ClusterClient, s: &LastScrub) -> Vec<String> {
    let calls = (0..c.cfg.width()).map(|i| async move {
        let iom = IomId(i);
        match c.pool().version(iom).await {
            Ok(v) if v < common::wire::SINCE_SCRUB_REPORT => Some(format!(
                "IOM {iom} speaks protocol {v} and does not keep scrub results; upgrade it (docs/operations.md, Upgrades)"
            )),
            Ok(_) => {
                let req = Request::Admin(common::wire::AdminReq::ScrubReport(s.to_wire()));
                match c.pool().call_timeout(iom, &req, Bytes::new(), Duration::from_secs(5)).await {
                    Ok(_) => None,
                    Err(e) => Some(format!("IOM {iom} was not told of this scrub: {e}")),
                }
            }
            Err(e) => Some(format!("IOM {iom} was not told of this scrub: {e}")),
        }
    });
    futures::future::join_all(calls).await.into_iter().flatten().collect()
}

/// The newest scrub any IOM keeps (protocol 8 and later), or None.
pub async fn last_from_ioms(c: &ClusterClient) -> Option<LastScrub> {
    let calls = (0..c.cfg.width()).map(|i| async move {
        let iom = IomId(i);
        if c.pool().version(iom).await.ok()? < common::wire::SINCE_SCRUB_REPORT {
            return None;
        }
        let req = Request::Admin(common::wire::AdminReq::LastScrub);
        match c.pool().call_timeout(iom, &req, Bytes::new(), Duration::from_millis(1500)).await {
            Ok((Reply::Admin(common::wire::AdminResp::LastScrub(s)), _)) => s,
            _ => None,
        }
    });
    let all = futures::future::join_all(calls).await;
    all.into_iter().flatten().max_by_key(|s| s.finished_unix).map(|s| LastScrub::from_wire(&s))
}

/// Re-checks a group with head versions read fresh from the data IOMs.
async fn check_fresh(c: &ClusterClient, g: GroupKey) -> Option<Problem> {
    let layout = c.layout;
    let (data_ioms, p) = layout.group_ioms(g.object, g.group);
    let mut last = String::new();
    'attempts: for attempt in 0..10 {
        let mut heads = BTreeMap::new();
        for (j, d) in data_ioms.iter().enumerate() {
            let key = BlockKey { object: g.object, block: layout.member_block(g.group, j as u32) };
            match c
                .call_role(*d, |route| Request::Data(DataReq::Read { route, key, offset: 0, len: 0 }), Bytes::new())
                .await
            {
                Ok((Reply::Data(DataResp::Read { version }), _)) => {
                    heads.insert(key, version);
                }
                Ok(_) => {}
                Err(e) if e.code() == Some(ErrorCode::Corrupt) => {
                    return Some(Problem {
                        object: g.object,
                        group: g.group,
                        iom: *d,
                        what: format!("checksum mismatch: {e}"),
                        fix: Some(Fix::Block(key)),
                    })
                }
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
                    continue 'attempts;
                }
            }
        }
        match check_group(c, g, &heads).await {
            Outcome::Ok => return None,
            Outcome::Problem(pr) => return Some(pr),
            Outcome::Retry(why) => last = why,
        }
        tokio::time::sleep(Duration::from_millis(100 * (attempt + 1))).await;
    }
    Some(Problem { object: g.object, group: g.group, iom: p, what: last, fix: None })
}

/// `scrub --repair`: carries out each problem's fix. Returns, per problem
/// with a fix, whether its IOM reported it done (the caller scrubs again
/// to confirm).
pub async fn repair(c: &ClusterClient, problems: &[Problem]) -> Vec<(Problem, Result<()>)> {
    let mut out = Vec::new();
    for p in problems {
        let Some(fix) = p.fix else { continue };
        let r = match fix {
            Fix::Block(key) => {
                let role = c.layout.data_iom(key.object, key.block);
                c.call_role(role, |route| Request::Data(DataReq::Read { route, key, offset: 0, len: 0 }), Bytes::new())
                    .await
                    .map(|_| ())
            }
            Fix::Parity(group) => {
                let role = c.layout.parity_iom(group.object, group.group);
                c.call_role(role, |route| Request::Data(DataReq::RecomputeParity { route, group }), Bytes::new())
                    .await
                    .map(|_| ())
            }
        };
        out.push((p.clone(), r));
    }
    out
}

/// Blocks and parity blocks the IOMs have rebuilt from their groups since
/// they started (self-healing reads), summed over the IOMs that answer.
pub async fn repairs_so_far(c: &ClusterClient) -> u64 {
    use common::wire::{AdminReq, AdminResp};
    let mut n = 0;
    for i in 0..c.cfg.width() {
        if let Ok((Reply::Admin(AdminResp::Stats(s)), _)) = c
            .pool()
            .call_timeout(IomId(i), &Request::Admin(AdminReq::Stats), Bytes::new(), Duration::from_secs(2))
            .await
        {
            n += s.repaired_blocks + s.repaired_parity;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_from_a_clock_far_off_is_shown_not_a_panic() {
        let s =
            |t| LastScrub { finished_unix: t, seconds: 1.5, groups: 2, blocks: 3, problems: 0, repaired: 0, healed: 0 };
        assert!(s(1_700_000_000).summary().starts_with("2023-11-14T22:13:20Z ("), "{}", s(1_700_000_000).summary());
        for t in [253_402_300_800, u64::MAX] {
            assert!(s(t).summary().contains("clock far off"), "{}", s(t).summary());
        }
    }
}
