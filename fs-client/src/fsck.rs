//! `iomfs fsck`: the namespace checked against itself (every inode
//! reachable, link counts, entries naming inodes that exist, ...) and
//! against the blocks the IOMs hold: a data object no file refers to
//! (an orphan: space nothing will free) and blocks past a closed file's
//! size. Runs on a live cluster: what changes between two passes a second
//! apart (writes in flight) is not reported.

use crate::cluster::{ClientError, ClusterClient, Result};
use common::meta::{MetaReq, MetaResp};
use common::{IomId, ObjectId};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// One line per problem.
    pub problems: Vec<String>,
    /// Orphan objects with the number of blocks the IOMs hold of each.
    pub orphans: BTreeMap<ObjectId, u64>,
    pub files: u64,
    pub blocks: u64,
}

impl Report {
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty() && self.orphans.is_empty()
    }
}

async fn one_pass(c: &ClusterClient) -> Result<Report> {
    let MetaResp::Check { problems, objects, open, dead } = c.meta(MetaReq::Check).await? else {
        return Err(ClientError::Unexpected("answer to Check".into()));
    };
    let sizes: HashMap<ObjectId, u64> = objects.iter().copied().collect();
    let open: HashSet<ObjectId> = open.into_iter().collect();
    let dead: HashSet<ObjectId> = dead.into_iter().collect();
    let mut r = Report { problems, files: objects.len() as u64, ..Default::default() };
    let bs = c.layout.block_size() as u64;
    let mut beyond: BTreeMap<ObjectId, (u64, u64)> = BTreeMap::new();
    for i in 0..c.cfg.width() {
        let (blocks, _) = crate::scrub::list_all(c, IomId(i)).await?;
        for b in blocks {
            r.blocks += 1;
            let o = b.key.object;
            if dead.contains(&o) || b.len == 0 {
                continue;
            }
            match sizes.get(&o) {
                None => *r.orphans.entry(o).or_default() += 1,
                Some(&size) if !open.contains(&o) && b.key.block.0 * bs >= size.max(1) => {
                    let e = beyond.entry(o).or_insert((b.key.block.0, size));
                    e.0 = e.0.max(b.key.block.0);
                }
                Some(_) => {}
            }
        }
    }
    for (o, (block, size)) in beyond {
        r.problems.push(format!("object {o}: blocks up to {block} lie beyond the file's size {size}"));
    }
    Ok(r)
}

/// Checks the namespace and its objects; see the module comment.
pub async fn fsck(c: &ClusterClient) -> Result<Report> {
    let first = one_pass(c).await?;
    if first.is_clean() {
        return Ok(first);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let second = one_pass(c).await?;
    let keep: BTreeSet<&String> = first.problems.iter().collect();
    let problems = second.problems.iter().filter(|p| keep.contains(p)).cloned().collect();
    let orphans = second.orphans.iter().filter(|(o, _)| first.orphans.contains_key(o)).map(|(o, n)| (*o, *n)).collect();
    Ok(Report { problems, orphans, files: second.files, blocks: second.blocks })
}

/// `fsck --repair`: the namespace fixes what it can (see
/// `NsState::repair` on the IOM); returns a line per fix.
pub async fn repair_namespace(c: &ClusterClient) -> Result<Vec<String>> {
    match c.meta(MetaReq::RepairNamespace).await? {
        MetaResp::Repaired { fixed } => Ok(fixed),
        MetaResp::Done => Ok(Vec::new()),
        other => Err(ClientError::Unexpected(format!("answer to RepairNamespace: {other:?}"))),
    }
}

/// `fsck --repair`: orphan objects become garbage, which the namespace's
/// GC drops from every IOM.
pub async fn reclaim(c: &ClusterClient, orphans: &BTreeMap<ObjectId, u64>) -> Result<()> {
    let objects: Vec<ObjectId> = orphans.keys().copied().collect();
    for chunk in objects.chunks(common::wire::MAX_DROP_OBJECTS) {
        c.meta(MetaReq::Reclaim { objects: chunk.to_vec() }).await?;
    }
    Ok(())
}
