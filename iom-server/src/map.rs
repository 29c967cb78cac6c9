//! The block map of one IOM: (object, block) → data versions and
//! (object, group) → parity versions, plus the tables of unfinished
//! transactions on both sides.
//!
//! All changes go through [`BlockMap::apply`] with a journal [`Record`]: the
//! live path applies a record to memory and then appends it to the journal,
//! and replay applies the same records in the same way, so the map after a
//! restart is the map before it. `apply` is idempotent, so records also
//! covered by a checkpoint can be replayed again.

use crate::format::{Format, HeaderError};
use crate::records::{PVerRef, Record, VerRef};
use crate::Error;
use common::codec;
use common::{BlockKey, DiskAddr, GroupKey, IomId, Layout, TxId, TxRef, Version};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

const SHARDS: usize = 64;
pub const SNAPSHOT_FILE: &str = "map.snap";
/// 2: followed by the per-IOM `done_seen` (version 1 files still load).
pub const SNAPSHOT_FORMAT_VERSION: u32 = 2;
const SNAP_FORMAT: Format = Format { magic: b"IOMFSMAP", version: SNAPSHOT_FORMAT_VERSION, oldest: 1 };

/// Versions of one data block that are still referenced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataEntry {
    /// The version the map points at (switched, a11).
    pub pointer: Version,
    /// Live versions, ascending; the last is the newest written (head).
    pub versions: Vec<VerRef>,
}

impl DataEntry {
    fn new(base: VerRef) -> DataEntry {
        DataEntry { pointer: base.version, versions: vec![base] }
    }
    pub fn head(&self) -> VerRef {
        *self.versions.last().expect("entry has a version")
    }
    pub fn get(&self, v: Version) -> Option<VerRef> {
        self.versions.iter().find(|x| x.version == v).copied()
    }
    pub fn pointed(&self) -> VerRef {
        self.get(self.pointer).unwrap_or_else(|| self.head())
    }
    fn insert(&mut self, v: VerRef) {
        match self.versions.binary_search_by_key(&v.version, |x| x.version) {
            Ok(_) => {}
            Err(i) => self.versions.insert(i, v),
        }
    }
    fn remove(&mut self, v: Version) -> Option<VerRef> {
        let i = self.versions.iter().position(|x| x.version == v)?;
        if self.versions.len() == 1 {
            return None;
        }
        Some(self.versions.remove(i))
    }
}

/// Parity versions of one group: the head and older ones awaiting b13.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParityEntry {
    pub head: PVerRef,
    pub old: Vec<PVerRef>,
}

/// Transactions found open in the journal at start-up.
pub struct OpenTxs {
    pub data: Vec<(TxId, DTx)>,
    pub parity: Vec<(TxRef, PTx)>,
}

/// A data-side transaction between a5 and a14.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DTx {
    pub key: BlockKey,
    pub old: VerRef,
    pub new: VerRef,
    pub parity: IomId,
    pub switched: bool,
}

/// A parity-side transaction between b1 and b13.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PTx {
    pub group: GroupKey,
    pub index: u32,
    pub old: Version,
    pub new: Version,
    /// Set once applied (b11): the parity seq freed when its batch completes.
    pub applied: Option<u64>,
}

/// Rebuild marks of one failed IOM as stored in a checkpoint.
type SnapMarks = (IomId, Vec<(BlockKey, Version)>, Vec<GroupKey>, Vec<(common::ObjectId, common::GroupNo)>);

#[derive(Serialize, Deserialize)]
struct Snapshot {
    replay_from: u64,
    next_tx: u64,
    next_pseq: u64,
    data: Vec<(BlockKey, DataEntry)>,
    parity: Vec<(GroupKey, ParityEntry)>,
    dtx: Vec<(TxId, DTx)>,
    ptx: Vec<(TxRef, PTx)>,
    awaiting: Vec<((GroupKey, u64), Vec<TxRef>)>,
    marks: Vec<SnapMarks>,
}

/// A map checkpoint copied out of the map, not yet written.
pub struct SnapshotCut {
    snap: Snapshot,
    seen: Vec<(IomId, u64)>,
}

impl SnapshotCut {
    /// Encodes the copy and replaces the checkpoint file with it (fsync'd).
    pub fn write(self, dir: &Path) -> Result<(), Error> {
        let body = codec::encode_large(&(self.snap, self.seen))?;
        crate::fsutil::write_atomic(&dir.join(SNAPSHOT_FILE), &SNAP_FORMAT.seal(&body))
    }
}

/// Blocks and groups a stand-in marked for rebuild of a failed IOM.
#[derive(Clone, Debug, Default)]
pub struct Marks {
    pub blocks: BTreeMap<BlockKey, Version>,
    pub groups: BTreeSet<GroupKey>,
    pub drops: BTreeSet<(common::ObjectId, common::GroupNo)>,
}

pub struct BlockMap {
    layout: Layout,
    data: Vec<Mutex<BTreeMap<BlockKey, DataEntry>>>,
    parity: Vec<Mutex<BTreeMap<GroupKey, ParityEntry>>>,
    pub dtx: Mutex<BTreeMap<TxId, DTx>>,
    pub ptx: Mutex<HashMap<TxRef, PTx>>,
    /// Parity batches waiting for "write completed" from their data IOMs.
    pub awaiting: Mutex<HashMap<(GroupKey, u64), BTreeSet<TxRef>>>,
    pub marks: Mutex<BTreeMap<IomId, Marks>>,
    /// Per data IOM, the highest transaction id whose "write completed"
    /// (a13) this parity IOM has freed the batch of: the data IOM had made
    /// that transaction's a14 durable. A store of that IOM whose ids start
    /// at or below it is older than what it acknowledged (a backup put back).
    pub done_seen: Mutex<BTreeMap<IomId, u64>>,
    next_tx: AtomicU64,
    next_pseq: AtomicU64,
    /// Fired when a record closes a transaction (data side: completed or
    /// rolled back; parity side: applied or discarded).
    pub txs_closed: tokio::sync::Notify,
}

fn shard_of<K: Hash>(k: &K) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    k.hash(&mut h);
    h.finish() as usize % SHARDS
}

impl BlockMap {
    pub fn new(layout: Layout) -> BlockMap {
        BlockMap {
            layout,
            data: (0..SHARDS).map(|_| Mutex::new(BTreeMap::new())).collect(),
            parity: (0..SHARDS).map(|_| Mutex::new(BTreeMap::new())).collect(),
            txs_closed: tokio::sync::Notify::new(),
            dtx: Mutex::new(BTreeMap::new()),
            ptx: Mutex::new(HashMap::new()),
            awaiting: Mutex::new(HashMap::new()),
            marks: Mutex::new(BTreeMap::new()),
            done_seen: Mutex::new(BTreeMap::new()),
            next_tx: AtomicU64::new(1),
            next_pseq: AtomicU64::new(1),
        }
    }

    pub fn next_tx(&self) -> TxId {
        TxId(self.next_tx.fetch_add(1, Ordering::Relaxed))
    }
    /// Starts transaction ids of this incarnation above every id ever used.
    /// The id the next transaction gets (not taken).
    pub fn peek_next_tx(&self) -> u64 {
        self.next_tx.load(Ordering::Relaxed)
    }
    pub fn start_incarnation(&self, incarnation: u64) {
        self.next_tx.fetch_max((incarnation << 40) | 1, Ordering::Relaxed);
    }

    pub fn next_pseq(&self) -> u64 {
        self.next_pseq.fetch_add(1, Ordering::Relaxed)
    }

    /// The newest version of a block (what reads return).
    pub fn head(&self, key: &BlockKey) -> VerRef {
        self.data[shard_of(key)].lock().get(key).map(|e| e.head()).unwrap_or(VerRef::ABSENT)
    }

    pub fn entry(&self, key: &BlockKey) -> Option<DataEntry> {
        self.data[shard_of(key)].lock().get(key).cloned()
    }

    pub fn version(&self, key: &BlockKey, v: Version) -> Option<VerRef> {
        if v == Version(0) {
            return Some(VerRef::ABSENT);
        }
        self.data[shard_of(key)].lock().get(key).and_then(|e| e.get(v))
    }

    pub fn parity_head(&self, g: &GroupKey) -> PVerRef {
        self.parity[shard_of(g)]
            .lock()
            .get(g)
            .map(|e| e.head.clone())
            .unwrap_or_else(|| PVerRef::empty(self.layout.n()))
    }

    pub fn parity_entry(&self, g: &GroupKey) -> Option<ParityEntry> {
        self.parity[shard_of(g)].lock().get(g).cloned()
    }

    pub fn counts(&self) -> (u64, u64) {
        let d = self.data.iter().map(|s| s.lock().len() as u64).sum();
        let p = self.parity.iter().map(|s| s.lock().len() as u64).sum();
        (d, p)
    }

    /// Data blocks in key order after `after`, at most `limit`.
    pub fn list_data(&self, after: Option<BlockKey>, limit: usize) -> Vec<(BlockKey, DataEntry)> {
        let mut all = Vec::new();
        for s in &self.data {
            let s = s.lock();
            let it: Box<dyn Iterator<Item = (&BlockKey, &DataEntry)>> = match after {
                Some(a) => Box::new(s.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))),
                None => Box::new(s.iter()),
            };
            all.extend(it.take(limit).map(|(k, v)| (*k, v.clone())));
        }
        all.sort_by_key(|(k, _)| *k);
        all.truncate(limit);
        all
    }

    pub fn list_parity(&self, after: Option<GroupKey>, limit: usize) -> Vec<(GroupKey, ParityEntry)> {
        let mut all = Vec::new();
        for s in &self.parity {
            let s = s.lock();
            let it: Box<dyn Iterator<Item = (&GroupKey, &ParityEntry)>> = match after {
                Some(a) => Box::new(s.range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded))),
                None => Box::new(s.iter()),
            };
            all.extend(it.take(limit).map(|(k, v)| (*k, v.clone())));
        }
        all.sort_by_key(|(k, _)| *k);
        all.truncate(limit);
        all
    }

    /// Applies one record to memory; returns the disk addresses it frees.
    /// Idempotent: applying a record twice has the effect of applying it once.
    pub fn apply(&self, rec: &Record) -> Vec<DiskAddr> {
        let freed = self.apply_inner(rec);
        if matches!(
            rec,
            Record::Completed { .. }
                | Record::RolledBack { .. }
                | Record::ParityDone { .. }
                | Record::Discarded { .. }
                | Record::Dropped { .. }
        ) {
            self.txs_closed.notify_waiters();
        }
        freed
    }

    fn apply_inner(&self, rec: &Record) -> Vec<DiskAddr> {
        let mut freed = Vec::new();
        match rec {
            Record::Issued { tx, key, old, new, parity } => {
                self.bump_tx(*tx);
                let mut s = self.data[shard_of(key)].lock();
                if old.version != Version(0) && !s.contains_key(key) {
                    // The block was dropped (file deleted or truncated)
                    // between this write's a1 and a5: its old version is
                    // freed already and the write is moot. Only its new
                    // slot is this record's to give back.
                    freed.extend(new.addr);
                    return freed;
                }
                self.dtx.lock().entry(*tx).or_insert(DTx {
                    key: *key,
                    old: *old,
                    new: *new,
                    parity: *parity,
                    switched: false,
                });
                let e = s.entry(*key).or_insert_with(|| DataEntry::new(*old));
                e.insert(*old);
                e.insert(*new);
            }
            Record::Switched { tx } => {
                let key_new = self.dtx.lock().get_mut(tx).map(|t| {
                    t.switched = true;
                    (t.key, t.new.version)
                });
                if let Some((key, v)) = key_new {
                    if let Some(e) = self.data[shard_of(&key)].lock().get_mut(&key) {
                        e.pointer = e.pointer.max(v);
                    }
                }
            }
            Record::Completed { tx } => {
                if let Some(t) = self.dtx.lock().remove(tx) {
                    let mut s = self.data[shard_of(&t.key)].lock();
                    if let Some(e) = s.get_mut(&t.key) {
                        e.pointer = e.pointer.max(t.new.version);
                        if t.old.version < e.pointer {
                            if let Some(o) = e.remove(t.old.version) {
                                freed.extend(o.addr);
                            }
                        }
                    }
                }
            }
            Record::RolledBack { tx } => {
                if let Some(t) = self.dtx.lock().remove(tx) {
                    let mut s = self.data[shard_of(&t.key)].lock();
                    if let Some(e) = s.get_mut(&t.key) {
                        if let Some(n) = e.remove(t.new.version) {
                            freed.extend(n.addr);
                        }
                        if e.pointer >= t.new.version {
                            e.pointer = t.old.version;
                        }
                        if e.versions.len() == 1 && e.head().addr.is_none() && e.head().version == Version(0) {
                            s.remove(&t.key);
                        }
                    }
                }
            }
            Record::Received { tx, group, index, old, new } => {
                self.ptx.lock().entry(*tx).or_insert(PTx {
                    group: *group,
                    index: *index,
                    old: *old,
                    new: *new,
                    applied: None,
                });
            }
            Record::ParityDone { group, old, new, txs } => {
                self.bump_pseq(new.seq);
                if !txs.is_empty() && {
                    let p = self.ptx.lock();
                    !txs.iter().any(|t| p.contains_key(t))
                } {
                    // Its group was dropped while the batch was applied (the
                    // drop forgot the transactions and freed the old parity):
                    // only the new parity slot is left to give back.
                    freed.extend(new.addr);
                    return freed;
                }
                {
                    let mut s = self.parity[shard_of(group)].lock();
                    let e = s.entry(*group).or_insert_with(|| ParityEntry { head: old.clone(), old: Vec::new() });
                    if e.head.seq < new.seq {
                        let prev = std::mem::replace(&mut e.head, new.clone());
                        if prev.addr.is_some() && !e.old.iter().any(|o| o.seq == prev.seq) {
                            e.old.push(prev);
                        }
                    }
                }
                let mut p = self.ptx.lock();
                for t in txs {
                    if let Some(x) = p.get_mut(t) {
                        x.applied = Some(old.seq);
                    }
                }
                drop(p);
                self.awaiting.lock().entry((*group, old.seq)).or_default().extend(txs.iter().copied());
            }
            Record::ParityFreed { group, seq } => {
                let txs = self.awaiting.lock().remove(&(*group, *seq)).unwrap_or_default();
                {
                    let mut seen = self.done_seen.lock();
                    for t in &txs {
                        let e = seen.entry(t.iom).or_insert(0);
                        *e = (*e).max(t.tx.0);
                    }
                }
                let mut p = self.ptx.lock();
                for t in &txs {
                    p.remove(t);
                }
                p.retain(|_, x| !(x.group == *group && x.applied == Some(*seq)));
                drop(p);
                let mut s = self.parity[shard_of(group)].lock();
                if let Some(e) = s.get_mut(group) {
                    if let Some(i) = e.old.iter().position(|o| o.seq == *seq) {
                        freed.extend(e.old.remove(i).addr);
                    }
                }
            }
            Record::Discarded { tx } => {
                self.ptx.lock().remove(tx);
            }
            Record::Dropped { object, from } => {
                let n = self.layout.n() as u64;
                for s in &self.data {
                    let mut s = s.lock();
                    let keys: Vec<BlockKey> = s
                        .range(BlockKey { object: *object, block: common::BlockNo(from.0 * n) }..)
                        .take_while(|(k, _)| k.object == *object)
                        .map(|(k, _)| *k)
                        .collect();
                    for k in keys {
                        if let Some(e) = s.remove(&k) {
                            freed.extend(e.versions.iter().filter_map(|v| v.addr));
                        }
                    }
                }
                for s in &self.parity {
                    let mut s = s.lock();
                    let keys: Vec<GroupKey> = s
                        .range(GroupKey { object: *object, group: *from }..)
                        .take_while(|(k, _)| k.object == *object)
                        .map(|(k, _)| *k)
                        .collect();
                    for k in keys {
                        if let Some(e) = s.remove(&k) {
                            freed.extend(e.head.addr);
                            freed.extend(e.old.iter().filter_map(|o| o.addr));
                        }
                    }
                }
                // Transactions still open on what was dropped are moot: their
                // versions were freed above, so their later records (a11,
                // a14, b9–b13, a roll-back) must find nothing to free again.
                let gone_block = |k: &BlockKey| k.object == *object && k.block.0 >= from.0 * n;
                let gone_group = |g: &GroupKey| g.object == *object && g.group >= *from;
                self.dtx.lock().retain(|_, t| !gone_block(&t.key));
                self.ptx.lock().retain(|_, t| !gone_group(&t.group));
                self.awaiting.lock().retain(|(g, _), _| !gone_group(g));
                self.marks.lock().values_mut().for_each(|m| {
                    m.blocks.retain(|k, _| !(k.object == *object && k.block.0 >= from.0 * n));
                    m.groups.retain(|g| !(g.object == *object && g.group >= *from));
                });
            }
            Record::DataSet { key, ver, .. } => {
                let mut s = self.data[shard_of(key)].lock();
                let e = s.entry(*key).or_insert_with(|| DataEntry::new(*ver));
                let pinned: BTreeSet<Version> = self
                    .dtx
                    .lock()
                    .values()
                    .filter(|t| t.key == *key)
                    .flat_map(|t| [t.old.version, t.new.version])
                    .collect();
                for v in std::mem::take(&mut e.versions) {
                    if v.version == ver.version || pinned.contains(&v.version) {
                        continue;
                    }
                    freed.extend(v.addr);
                }
                e.versions = vec![*ver];
                e.pointer = ver.version;
            }
            Record::ParitySet { group, ver, .. } => {
                self.bump_pseq(ver.seq);
                let mut s = self.parity[shard_of(group)].lock();
                match s.get_mut(group) {
                    Some(e) if e.head.seq != ver.seq => {
                        let prev = std::mem::replace(&mut e.head, ver.clone());
                        freed.extend(prev.addr);
                    }
                    Some(_) => {}
                    None => {
                        s.insert(*group, ParityEntry { head: ver.clone(), old: Vec::new() });
                    }
                }
            }
            Record::Repaired { key, bad, good } => {
                let mut s = self.data[shard_of(key)].lock();
                if let Some(v) = s.get_mut(key).and_then(|e| e.versions.iter_mut().find(|v| **v == *bad)) {
                    *v = *good;
                    freed.extend(bad.addr);
                }
                drop(s);
                for t in self.dtx.lock().values_mut().filter(|t| t.key == *key) {
                    if t.old == *bad {
                        t.old = *good;
                    }
                    if t.new == *bad {
                        t.new = *good;
                    }
                }
            }
            Record::Marked { owner, key, version } => {
                let mut m = self.marks.lock();
                let e = m.entry(*owner).or_default().blocks.entry(*key).or_insert(*version);
                *e = (*e).max(*version);
            }
            Record::MarkUndone { owner, key, version, back_to } => {
                let mut m = self.marks.lock();
                if let Some(mk) = m.get_mut(owner) {
                    if mk.blocks.get(key) == Some(version) {
                        match back_to {
                            Some(v) => mk.blocks.insert(*key, *v),
                            None => mk.blocks.remove(key),
                        };
                    }
                    if mk.blocks.is_empty() && mk.groups.is_empty() && mk.drops.is_empty() {
                        m.remove(owner);
                    }
                }
            }
            Record::MarkedGroup { owner, group } => {
                self.marks.lock().entry(*owner).or_default().groups.insert(*group);
            }
            Record::MarksCleared { owner } => {
                self.marks.lock().remove(owner);
            }
            Record::MarkedDrop { owner, object, from } => {
                self.marks.lock().entry(*owner).or_default().drops.insert((*object, *from));
            }
            Record::MarksDone { owner, blocks, groups, drops } => {
                let mut m = self.marks.lock();
                if let Some(mk) = m.get_mut(owner) {
                    for (k, v) in blocks {
                        if mk.blocks.get(k).is_some_and(|have| have <= v) {
                            mk.blocks.remove(k);
                        }
                    }
                    for g in groups {
                        mk.groups.remove(g);
                    }
                    for d in drops {
                        mk.drops.remove(d);
                    }
                    if mk.blocks.is_empty() && mk.groups.is_empty() && mk.drops.is_empty() {
                        m.remove(owner);
                    }
                }
            }
        }
        freed
    }

    fn bump_tx(&self, tx: TxId) {
        self.next_tx.fetch_max(tx.0 + 1, Ordering::Relaxed);
    }
    fn bump_pseq(&self, seq: u64) {
        self.next_pseq.fetch_max(seq + 1, Ordering::Relaxed);
    }

    /// Every disk address referenced by the map or an unfinished transaction.
    pub fn live_addrs(&self) -> Vec<DiskAddr> {
        let mut v = Vec::new();
        for s in &self.data {
            for e in s.lock().values() {
                v.extend(e.versions.iter().filter_map(|x| x.addr));
            }
        }
        for s in &self.parity {
            for e in s.lock().values() {
                v.extend(e.head.addr);
                v.extend(e.old.iter().filter_map(|o| o.addr));
            }
        }
        for t in self.dtx.lock().values() {
            v.extend(t.old.addr);
            v.extend(t.new.addr);
        }
        v
    }

    /// A checkpoint's content — the whole map plus unfinished transactions,
    /// valid for replay from journal segment `replay_from` — copied out of
    /// the map as it is now, to be written by [`SnapshotCut::write`]
    /// (off the event loop: encoding and fsync of a large map take long).
    /// Taken together with the journal's rotation to `replay_from`, with no
    /// `.await` between them, it is a consistent cut: every record in the
    /// segments before it is in the copy.
    pub fn snapshot_cut(&self, replay_from: u64) -> SnapshotCut {
        let snap = Snapshot {
            replay_from,
            next_tx: self.next_tx.load(Ordering::Relaxed),
            next_pseq: self.next_pseq.load(Ordering::Relaxed),
            data: self
                .data
                .iter()
                .flat_map(|s| s.lock().iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>())
                .collect(),
            parity: self
                .parity
                .iter()
                .flat_map(|s| s.lock().iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>())
                .collect(),
            dtx: self.dtx.lock().iter().map(|(k, v)| (*k, v.clone())).collect(),
            ptx: self.ptx.lock().iter().map(|(k, v)| (*k, v.clone())).collect(),
            awaiting: self.awaiting.lock().iter().map(|(k, v)| (*k, v.iter().copied().collect())).collect(),
            marks: self
                .marks
                .lock()
                .iter()
                .map(|(o, m)| {
                    (
                        *o,
                        m.blocks.iter().map(|(k, v)| (*k, *v)).collect(),
                        m.groups.iter().copied().collect(),
                        m.drops.iter().copied().collect(),
                    )
                })
                .collect(),
        };
        let seen: Vec<(IomId, u64)> = self.done_seen.lock().iter().map(|(k, v)| (*k, *v)).collect();
        SnapshotCut { snap, seen }
    }

    /// Loads a checkpoint if there is one; returns the journal segment to replay from.
    pub fn load_snapshot(&self, dir: &Path) -> Result<u64, Error> {
        let path = dir.join(SNAPSHOT_FILE);
        let buf = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
        };
        let bad = |m: String| Error::Damaged(format!("{}: {m}", path.display()));
        let (ver, body) = SNAP_FORMAT.unseal(&buf).map_err(|e| {
            bad(match e {
                HeaderError::Short | HeaderError::Magic => "not an iomfs map checkpoint".into(),
                HeaderError::Version(v) => {
                    format!("format version {v}; this build reads 1 and {SNAPSHOT_FORMAT_VERSION}")
                }
                HeaderError::Checksum => "checksum mismatch".into(),
            })
        })?;
        let (s, seen): (Snapshot, Vec<(IomId, u64)>) = if ver == 1 {
            (codec::decode_large(body).map_err(|e| bad(e.to_string()))?, Vec::new())
        } else {
            codec::decode_large(body).map_err(|e| bad(e.to_string()))?
        };
        self.done_seen.lock().extend(seen);
        self.next_tx.store(s.next_tx, Ordering::Relaxed);
        self.next_pseq.store(s.next_pseq, Ordering::Relaxed);
        for (k, e) in s.data {
            self.data[shard_of(&k)].lock().insert(k, e);
        }
        for (k, e) in s.parity {
            self.parity[shard_of(&k)].lock().insert(k, e);
        }
        *self.dtx.lock() = s.dtx.into_iter().collect();
        *self.ptx.lock() = s.ptx.into_iter().collect();
        *self.awaiting.lock() = s.awaiting.into_iter().map(|(k, v)| (k, v.into_iter().collect())).collect();
        *self.marks.lock() = s
            .marks
            .into_iter()
            .map(|(o, b, g, d)| {
                (
                    o,
                    Marks {
                        blocks: b.into_iter().collect(),
                        groups: g.into_iter().collect(),
                        drops: d.into_iter().collect(),
                    },
                )
            })
            .collect();
        Ok(s.replay_from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use common::{BlockNo, GroupNo, ObjectId};

    fn layout() -> Layout {
        Layout::new(5, 4096).unwrap()
    }
    fn key(b: u64) -> BlockKey {
        BlockKey { object: ObjectId(1), block: BlockNo(b) }
    }
    fn ver(v: u64, a: u64) -> VerRef {
        VerRef { version: Version(v), addr: Some(DiskAddr(a)), len: 10, crc: v as u32 }
    }

    fn write_cycle(m: &BlockMap, tx: u64, k: BlockKey, old: VerRef, new: VerRef) -> Vec<Record> {
        vec![
            Record::Issued { tx: TxId(tx), key: k, old, new, parity: IomId(0) },
            Record::Switched { tx: TxId(tx) },
            Record::Completed { tx: TxId(tx) },
        ]
        .into_iter()
        .inspect(|r| {
            m.apply(r);
        })
        .collect()
    }

    #[test]
    fn replay_of_a_clean_history_rebuilds_the_map() {
        let m = BlockMap::new(layout());
        let mut log = Vec::new();
        log.extend(write_cycle(&m, 1, key(0), VerRef::ABSENT, ver(1, 10)));
        log.extend(write_cycle(&m, 2, key(0), ver(1, 10), ver(2, 11)));
        log.extend(write_cycle(&m, 3, key(5), VerRef::ABSENT, ver(1, 12)));
        let g = GroupKey { object: ObjectId(1), group: GroupNo(0) };
        let t = TxRef { iom: IomId(2), tx: TxId(9) };
        for r in [
            Record::Received { tx: t, group: g, index: 1, old: Version(0), new: Version(1) },
            Record::ParityDone {
                group: g,
                old: PVerRef::empty(4),
                new: PVerRef {
                    seq: 1,
                    addr: Some(DiskAddr(13)),
                    len: 10,
                    crc: 0,
                    members: vec![Version(0), Version(1), Version(0), Version(0)],
                },
                txs: vec![t],
            },
            Record::ParityFreed { group: g, seq: 0 },
        ] {
            m.apply(&r);
            log.push(r);
        }
        assert_eq!(m.head(&key(0)), ver(2, 11));
        assert!(m.dtx.lock().is_empty() && m.ptx.lock().is_empty());

        // replay twice (idempotence) into a fresh map
        let m2 = BlockMap::new(layout());
        for r in log.iter().chain(log.iter()) {
            m2.apply(r);
        }
        assert_eq!(m2.head(&key(0)), ver(2, 11));
        assert_eq!(m2.entry(&key(0)).unwrap().versions.len(), 1);
        assert_eq!(m2.head(&key(5)), ver(1, 12));
        assert_eq!(m2.parity_head(&g).addr, Some(DiskAddr(13)));
        let mut live = m2.live_addrs();
        live.sort();
        assert_eq!(live, vec![DiskAddr(11), DiskAddr(12), DiskAddr(13)]);

        // snapshot round trip
        let d = tempfile::tempdir().unwrap();
        m2.snapshot_cut(7).write(d.path()).unwrap();
        let m3 = BlockMap::new(layout());
        assert_eq!(m3.load_snapshot(d.path()).unwrap(), 7);
        assert_eq!(m3.head(&key(0)), ver(2, 11));
        assert_eq!(m3.parity_head(&g), m2.parity_head(&g));
        assert!(m3.next_tx().0 >= 4);
    }

    /// The checkpoint header as written today: magic, format version,
    /// crc32c of the body, then the body. The on-disk format must not change.
    #[test]
    fn golden_snapshot_header() {
        let d = tempfile::tempdir().unwrap();
        BlockMap::new(layout()).snapshot_cut(5).write(d.path()).unwrap();
        let b = std::fs::read(d.path().join(SNAPSHOT_FILE)).unwrap();
        assert_eq!(&b[..12], b"IOMFSMAP\x02\x00\x00\x00");
        assert_eq!(b[12..16], crc32c::crc32c(&b[16..]).to_le_bytes());
        let cut = BlockMap::new(layout()).snapshot_cut(5);
        assert_eq!(&b[16..], &codec::encode_large(&(cut.snap, cut.seen)).unwrap()[..]);
    }

    /// What a bad checkpoint header gives, as today: errors naming the file.
    #[test]
    fn bad_snapshot_headers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(SNAPSHOT_FILE);
        BlockMap::new(layout()).snapshot_cut(5).write(d.path()).unwrap();
        let good = std::fs::read(&p).unwrap();
        let load = |b: &[u8]| {
            std::fs::write(&p, b).unwrap();
            BlockMap::new(layout()).load_snapshot(d.path()).map_err(|e| e.to_string())
        };
        assert_eq!(load(&good), Ok(5));
        let name = p.display().to_string();
        for n in 0..16 {
            assert_eq!(load(&good[..n]), Err(format!("{name}: not an iomfs map checkpoint")), "{n}");
        }
        let mut m = good.clone();
        m[3] ^= 1;
        assert_eq!(load(&m), Err(format!("{name}: not an iomfs map checkpoint")));
        for ver in [0u32, 3, u32::MAX] {
            let mut v = good.clone();
            v[8..12].copy_from_slice(&ver.to_le_bytes());
            assert_eq!(load(&v), Err(format!("{name}: format version {ver}; this build reads 1 and 2")));
        }
        let mut c = good.clone();
        c[14] ^= 1;
        assert_eq!(load(&c), Err(format!("{name}: checksum mismatch")));
        let mut c = good.clone();
        *c.last_mut().unwrap() ^= 1;
        assert_eq!(load(&c), Err(format!("{name}: checksum mismatch")));
    }

    #[test]
    fn unfinished_tx_keeps_both_versions_and_rollback_restores_old() {
        let m = BlockMap::new(layout());
        m.apply(&Record::Issued { tx: TxId(1), key: key(0), old: VerRef::ABSENT, new: ver(1, 5), parity: IomId(0) });
        m.apply(&Record::Switched { tx: TxId(1) });
        m.apply(&Record::Completed { tx: TxId(1) });
        m.apply(&Record::Issued { tx: TxId(2), key: key(0), old: ver(1, 5), new: ver(2, 6), parity: IomId(0) });
        m.apply(&Record::Switched { tx: TxId(2) });
        let e = m.entry(&key(0)).unwrap();
        assert_eq!(e.pointer, Version(2));
        assert_eq!(e.versions.len(), 2);
        let mut live = m.live_addrs();
        live.sort();
        live.dedup();
        assert_eq!(live, vec![DiskAddr(5), DiskAddr(6)]);
        let freed = m.apply(&Record::RolledBack { tx: TxId(2) });
        assert_eq!(freed, vec![DiskAddr(6)]);
        assert_eq!(m.head(&key(0)), ver(1, 5));
        assert_eq!(m.entry(&key(0)).unwrap().pointer, Version(1));
    }

    /// Applies `recs` in order; returns every slot they free, in order.
    fn apply_all(m: &BlockMap, recs: &[Record]) -> Vec<DiskAddr> {
        recs.iter().flat_map(|r| m.apply(r)).collect()
    }

    fn assert_each_freed_once(freed: &[DiskAddr]) {
        let mut f = freed.to_vec();
        f.sort();
        let n = f.len();
        f.dedup();
        assert_eq!(f.len(), n, "a slot was freed twice: {freed:?}");
    }

    #[test]
    fn transactions_open_across_a_drop_free_each_slot_once_and_leak_none() {
        let g = GroupKey { object: ObjectId(1), group: GroupNo(0) };
        let drop = Record::Dropped { object: ObjectId(1), from: GroupNo(0) };
        // Data side: a write issued before the drop finishes after it.
        let m = BlockMap::new(layout());
        write_cycle(&m, 1, key(0), VerRef::ABSENT, ver(1, 5));
        let freed = apply_all(
            &m,
            &[
                Record::Issued { tx: TxId(2), key: key(0), old: ver(1, 5), new: ver(2, 6), parity: IomId(0) },
                drop.clone(),
                Record::Switched { tx: TxId(2) },
                Record::Completed { tx: TxId(2) },
            ],
        );
        assert_each_freed_once(&freed);
        assert!(m.live_addrs().is_empty() && m.dtx.lock().is_empty());
        // A write that read its old version before the drop and journals
        // "issued" after it: the old slot is freed by the drop, the new by
        // the record; nothing is resurrected.
        let m = BlockMap::new(layout());
        write_cycle(&m, 1, key(0), VerRef::ABSENT, ver(1, 5));
        let mut freed = apply_all(&m, std::slice::from_ref(&drop));
        freed.extend(apply_all(
            &m,
            &[
                Record::Issued { tx: TxId(2), key: key(0), old: ver(1, 5), new: ver(2, 6), parity: IomId(0) },
                Record::Switched { tx: TxId(2) },
                Record::Completed { tx: TxId(2) },
            ],
        ));
        assert_each_freed_once(&freed);
        assert_eq!(freed.len(), 2, "{freed:?}");
        assert!(m.live_addrs().is_empty() && m.entry(&key(0)).is_none());
        // Parity side: a batch being applied when its group is dropped.
        let m = BlockMap::new(layout());
        let t1 = TxRef { iom: IomId(2), tx: TxId(1) };
        let t2 = TxRef { iom: IomId(2), tx: TxId(2) };
        let p = |seq: u64, a: u64, v: u64| PVerRef {
            seq,
            addr: Some(DiskAddr(a)),
            len: 10,
            crc: 0,
            members: vec![Version(v), Version(0), Version(0), Version(0)],
        };
        let freed = apply_all(
            &m,
            &[
                Record::Received { tx: t1, group: g, index: 0, old: Version(0), new: Version(1) },
                Record::ParityDone { group: g, old: PVerRef::empty(4), new: p(1, 20, 1), txs: vec![t1] },
                Record::ParityFreed { group: g, seq: 0 },
                Record::Received { tx: t2, group: g, index: 0, old: Version(1), new: Version(2) },
                drop,
                Record::ParityDone { group: g, old: p(1, 20, 1), new: p(2, 21, 2), txs: vec![t2] },
                Record::ParityFreed { group: g, seq: 1 },
            ],
        );
        assert_each_freed_once(&freed);
        assert_eq!(freed.len(), 2, "{freed:?}");
        assert!(m.live_addrs().is_empty() && m.ptx.lock().is_empty() && m.awaiting.lock().is_empty());
    }

    #[test]
    fn a_repaired_version_moves_to_its_new_slot_once() {
        let m = BlockMap::new(layout());
        write_cycle(&m, 1, key(0), VerRef::ABSENT, ver(1, 5));
        m.apply(&Record::Issued { tx: TxId(2), key: key(0), old: ver(1, 5), new: ver(2, 6), parity: IomId(0) });
        let rep = Record::Repaired { key: key(0), bad: ver(1, 5), good: ver(1, 7) };
        assert_eq!(m.apply(&rep), vec![DiskAddr(5)]);
        assert!(m.apply(&rep).is_empty(), "applied twice, freed twice");
        // The open write's a14 frees the repaired slot, not the bad one again.
        m.apply(&Record::Switched { tx: TxId(2) });
        assert_eq!(m.apply(&Record::Completed { tx: TxId(2) }), vec![DiskAddr(7)]);
        assert_eq!(m.head(&key(0)), ver(2, 6));
    }

    /// A refused stand-in write puts its block's mark back as it was, and
    /// only if the mark still asks for that write's version.
    #[test]
    fn an_undone_mark_goes_back_to_what_it_was() {
        let m = BlockMap::new(layout());
        let (owner, v) = (IomId(2), Version);
        let mark = |k, x| m.apply(&Record::Marked { owner, key: key(k), version: v(x) });
        let undo = |k, x, back| m.apply(&Record::MarkUndone { owner, key: key(k), version: v(x), back_to: back });
        let marks = || m.marks.lock().get(&owner).map(|mk| mk.blocks.clone());
        mark(0, 1);
        mark(0, 2);
        undo(0, 2, Some(v(1)));
        assert_eq!(marks().unwrap().get(&key(0)), Some(&v(1)));
        // A later mark is not undone by an earlier write's refusal.
        mark(0, 3);
        undo(0, 2, Some(v(1)));
        assert_eq!(marks().unwrap().get(&key(0)), Some(&v(3)));
        // A block that had no mark has none again; the owner's entry goes
        // once nothing is left in it.
        mark(1, 1);
        undo(1, 1, None);
        assert_eq!(marks().unwrap().get(&key(1)), None);
        undo(0, 3, None);
        assert!(marks().is_none(), "{:?}", marks());
    }

    #[test]
    fn dropped_removes_object_tail() {
        let m = BlockMap::new(layout());
        for b in 0..12 {
            write_cycle(&m, b + 1, key(b), VerRef::ABSENT, ver(1, 100 + b));
        }
        let freed = m.apply(&Record::Dropped { object: ObjectId(1), from: GroupNo(1) });
        assert_eq!(freed.len(), 8);
        assert_eq!(m.counts().0, 4);
        assert_eq!(m.head(&key(7)), VerRef::ABSENT);
    }
}
