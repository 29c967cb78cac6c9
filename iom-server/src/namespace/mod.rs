//! The namespace service (DESIGN §7): inodes, directory entries,
//! attributes and xattrs, served by the namespace home IOM and mirrored
//! synchronously to its proxy.
//!
//! A mutation is planned and applied under one lock ([`state`]), appended
//! to this replica's own journal, and streamed in order to the mirror; the
//! client is answered once the mirror has applied and journaled it (two
//! servers hold it, so any single failure keeps it). Stable storage follows
//! by group commit within milliseconds; `Sync` (fsync, fsyncdir, durable
//! writes) waits for it on both. Without a mirror (degraded), the answer
//! waits for the local journal to be durable instead.

pub mod sessions;
pub mod state;

use crate::caller::RoleCaller;
use crate::format::{Format, HeaderError};
use crate::journal::{Journal, Wait};
use crate::membership::Membership;
use crate::storage::Storage;
use crate::timeouts::Timeouts;
use crate::workers::Tier;
use crate::workers::Workers;
use crate::Error;
use bytes::Bytes;
use common::meta::*;
use common::wire::{
    AdminReq, AdminResp, ErrorCode, MemberResp, MetaCall, MirrorAck, MirrorMsg, Reply, Request, WireError,
};
use common::{codec, Ino, IomId, ObjectId};
use net::frame::{read_frame, write_frame};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sessions::Sessions;
use state::{NsError, NsRec, NsState, Plan};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

pub const META_DIR: &str = "meta";
const SNAP_FILE: &str = "meta.snap";
const SNAP_VERSION: u32 = 1;
const SNAP_FORMAT: Format = Format { magic: b"IOMFSNSP", version: SNAP_VERSION, oldest: SNAP_VERSION };
/// Batches kept in memory for a mirror that falls briefly behind.
const RECENT: usize = 4096;

/// One journal entry of the namespace: a batch with its sequence number.
#[derive(Serialize, Deserialize)]
struct Entry {
    term: u64,
    lsn: u64,
    recs: Vec<NsRec>,
}

#[derive(Serialize, Deserialize)]
struct Snap {
    term: u64,
    lsn: u64,
    replay_from: u64,
    state: NsState,
}

struct Replica {
    state: NsState,
    term: u64,
    lsn: u64,
    journal: Journal,
    dir: PathBuf,
    sessions: Sessions,
    recent: VecDeque<(u64, Bytes)>,
    mirror: Option<(u64, mpsc::UnboundedSender<(MirrorMsg, Bytes)>)>,
}

/// This IOM's copy of the namespace, if it holds one (home or mirror).
pub struct Namespace {
    rep: Mutex<Option<Replica>>,
    /// (mirror stream generation, highest lsn it acknowledged).
    acked: watch::Sender<(u64, u64)>,
    next_gen: AtomicU64,
    syncs: Mutex<HashMap<u64, oneshot::Sender<()>>>,
    next_token: AtomicU64,
    fs_stats: Mutex<(FsStats, Option<std::time::Instant>)>,
    /// The mirror's room for client writes at the last `refresh_stats`
    /// (`u64::MAX`: not known): see `room_to_grow`.
    mirror_room: AtomicU64,
    /// Held while a checkpoint is taken and written, and by `install`.
    checkpointing: Arc<tokio::sync::Mutex<()>>,
    /// Fired when a replica is installed (the mirror worker waits on it).
    installed: tokio::sync::Notify,
    /// What the service needs of the rest of the IOM.
    links: NsLinks,
}

/// The narrow handles the namespace service holds: membership (who serves
/// the namespace, quorum), the caller (mirror streams, statfs figures, GC
/// drops), storage (its block file, the checkpoint size), the workers and
/// the `ready` flag of the join; never the node.
pub struct NsLinks {
    pub me: IomId,
    pub width: u32,
    pub block_size: u32,
    pub client_lease: Duration,
    pub data_dir: PathBuf,
    pub storage: Arc<Storage>,
    pub member: Arc<Membership>,
    pub caller: Arc<RoleCaller>,
    pub workers: Arc<Workers>,
    pub timeouts: Timeouts,
    /// Set once start-up learned the cluster's current map.
    pub ready: watch::Receiver<bool>,
    /// Cancelled when the IOM's background work stops.
    pub stop: CancellationToken,
}

impl Replica {
    /// Closes one handle of `client` per entry of `inos` (an inode may come
    /// several times); returns the records that reap unlinked files whose
    /// last handle this closed.
    fn release(&mut self, client: u64, inos: &[Ino], now: Instant) -> Vec<NsRec> {
        let freed = self.sessions.release(client, inos, now);
        self.reap(&freed)
    }

    /// Records that remove those of `inos` that are unlinked (`reap` only
    /// plans: each inode comes once).
    fn reap(&self, inos: &[Ino]) -> Vec<NsRec> {
        inos.iter().filter_map(|i| self.state.reap(*i)).flatten().collect()
    }

    /// Tells the sessions whether this replica serves now (a change to
    /// serving starts the grace for the unlinked files that exist).
    fn serving(&mut self, serving: bool, now: Instant) {
        let state = &self.state;
        self.sessions.set_serving(serving, now, || state.orphans());
    }
}

impl Namespace {
    fn new(links: NsLinks) -> Self {
        Namespace {
            rep: Mutex::new(None),
            acked: watch::channel((0, 0)).0,
            next_gen: AtomicU64::new(1),
            syncs: Mutex::new(HashMap::new()),
            next_token: AtomicU64::new(1),
            fs_stats: Mutex::new((FsStats::default(), None)),
            mirror_room: AtomicU64::new(u64::MAX),
            checkpointing: Arc::new(tokio::sync::Mutex::new(())),
            installed: tokio::sync::Notify::new(),
            links,
        }
    }
}

fn nserr(e: NsError) -> Error {
    Error::Wire(WireError::new(e.0, e.1))
}

fn encode_entry(term: u64, lsn: u64, recs: &[NsRec]) -> Vec<u8> {
    #[derive(Serialize)]
    struct EntryRef<'a> {
        term: u64,
        lsn: u64,
        recs: &'a [NsRec],
    }
    codec::encode_large(&EntryRef { term, lsn, recs }).expect("namespace entries encode")
}

fn write_snap(dir: &Path, s: &Snap) -> Result<(), Error> {
    let body = codec::encode_large(s)?;
    crate::fsutil::write_atomic(&dir.join(SNAP_FILE), &SNAP_FORMAT.seal(&body))
}

fn read_snap(dir: &Path) -> Result<Option<Snap>, Error> {
    let p = dir.join(SNAP_FILE);
    let b = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("read {}", p.display()), e)),
    };
    let bad = |m: String| Error::Damaged(format!("{}: {m}", p.display()));
    let (_, body) = SNAP_FORMAT.unseal(&b).map_err(|e| {
        bad(match e {
            HeaderError::Short | HeaderError::Magic => "not an iomfs namespace checkpoint".into(),
            HeaderError::Version(v) => format!("format version {v}; this build reads {SNAP_VERSION}"),
            HeaderError::Checksum => "checksum mismatch".into(),
        })
    })?;
    codec::decode_large(body).map(Some).map_err(|e| bad(e.to_string()))
}

impl Namespace {
    /// Opens this IOM's namespace replica if it has one on disk; the
    /// configured home makes a fresh namespace when none exists.
    pub fn open(links: NsLinks, is_home: bool) -> Result<Namespace, Error> {
        let dir = links.data_dir.join(META_DIR);
        let (block_file, flush, lease) = (links.storage.store.file(), links.timeouts.journal_flush, links.client_lease);
        let ns = Namespace::new(links);
        let snap = read_snap(&dir)?;
        let has_journal = dir.exists() && std::fs::read_dir(&dir).map(|mut r| r.next().is_some()).unwrap_or(false);
        if snap.is_none() && !has_journal && !is_home {
            return Ok(ns);
        }
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let fresh = snap.is_none();
        let (mut state, mut term, mut lsn, from) = match snap {
            Some(s) => (s.state, s.term, s.lsn, s.replay_from),
            None => (NsState::new(Timestamp::now()), 1, 0, 0),
        };
        let (journal, replayed) = Journal::open(&dir, from, block_file, flush)?;
        let mut n = 0;
        for raw in &replayed.records {
            let e: Entry = codec::decode_large(raw).map_err(|e| Error::Damaged(format!("namespace journal: {e}")))?;
            if e.lsn > lsn {
                state.apply(&e.recs);
                lsn = e.lsn;
                term = term.max(e.term);
                n += 1;
            }
        }
        if fresh {
            write_snap(&dir, &Snap { term, lsn, replay_from: replayed.segment, state: state.clone() })?;
        }
        tracing::info!(inodes = state.inodes.len(), lsn, replayed = n, "namespace replica opened");
        *ns.rep.lock() = Some(Replica {
            state,
            term,
            lsn,
            journal,
            dir,
            sessions: if fresh {
                Sessions::new(lease, Instant::now()).fresh()
            } else {
                Sessions::new(lease, Instant::now())
            },
            recent: VecDeque::new(),
            mirror: None,
        });
        Ok(ns)
    }

    /// This IOM becomes the namespace server (its proxy failed over to it):
    /// a new term, so replicas of the old server's term resynchronise.
    pub fn promote(&self, term: u64) {
        if let Some(r) = self.rep.lock().as_mut() {
            r.term = r.term.max(term);
        } else {
            tracing::error!("namespace takeover, but this IOM holds no namespace replica");
        }
    }

    fn l(&self) -> &NsLinks {
        &self.links
    }

    pub fn holds_replica(&self) -> bool {
        self.rep.lock().is_some()
    }

    pub fn position(&self) -> (u64, u64) {
        self.rep.lock().as_ref().map(|r| (r.term, r.lsn)).unwrap_or((0, 0))
    }

    /// Writes a checkpoint and drops the journal segments it covers.
    pub async fn checkpoint(&self) -> Result<(), Error> {
        // One at a time, and never beside an `install` (an older copy
        // must not replace a newer one).
        let one = self.checkpointing.clone().lock_owned().await;
        // Rotation and the copy of the state happen under one lock: the
        // checkpoint covers exactly the segments before the new one.
        let (snap, dir, seg) = {
            let g = self.rep.lock();
            let Some(r) = g.as_ref() else { return Ok(()) };
            let seg = r.journal.rotate_now()?;
            (Snap { term: r.term, lsn: r.lsn, replay_from: seg, state: r.state.clone() }, r.dir.clone(), seg)
        };
        // Encoding and fsync off the event loop.
        crate::fsutil::off_loop("namespace checkpoint", move || {
            let _one = one;
            write_snap(&dir, &snap)?;
            Journal::remove_before(&dir, seg)
        })
        .await
    }

    pub async fn stop(&self) {
        let _ = self.checkpoint().await;
        let j = {
            let g = self.rep.lock();
            g.as_ref().map(|r| r.journal.stop_request())
        };
        if let Some(j) = j {
            let _ = j.await;
        }
    }

    /// See `Journal::runway_to_come` (0 when no replica is loaded here).
    pub fn runway_to_come(&self) -> u64 {
        self.rep.lock().as_ref().map(|r| r.journal.runway_to_come()).unwrap_or(0)
    }

    pub fn journal_bytes(&self) -> u64 {
        self.rep.lock().as_ref().map(|r| r.journal.stats.bytes_since_rotate.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// Applies a planned mutation; returns (lsn, mirror generation or 0).
    fn commit(r: &mut Replica, mut recs: Vec<NsRec>, client: u64, seq: u64, reply: &MetaResp) -> (u64, u64) {
        if client != 0 {
            recs.push(NsRec::Done { client, seq, reply: Box::new(reply.clone()) });
        }
        r.lsn += 1;
        r.state.apply(&recs);
        let bytes = Bytes::from(encode_entry(r.term, r.lsn, &recs));
        r.journal.append(bytes.to_vec(), false, Wait::Nothing, None);
        r.recent.push_back((r.lsn, bytes.clone()));
        while r.recent.len() > RECENT {
            r.recent.pop_front();
        }
        let mut gen = 0;
        if let Some((g, tx)) = &r.mirror {
            if tx.send((MirrorMsg::Batch { term: r.term, lsn: r.lsn }, bytes)).is_ok() {
                gen = *g;
            } else {
                r.mirror = None;
            }
        }
        (r.lsn, gen)
    }

    /// `NoSpace` (the client's ENOSPC) for a mutation that makes the
    /// namespace bigger (a new inode or name, an xattr) once client writes
    /// get no room on this IOM or its mirror, or a namespace or block
    /// journal here cannot keep its runway. What is left is the reserve,
    /// which deletes, truncates, size publications and the data path's
    /// journals need. Before, creates went on into the reserve until the
    /// namespace journal's write failed and the home stopped, on a
    /// filesystem so full that no other IOM could keep a vote: the cluster
    /// served nothing, deletes included.
    fn room_to_grow(&self, r: &Replica) -> Result<(), Error> {
        let l = self.l();
        let bs = l.block_size as u64;
        let full = r.journal.short_of_space()
            || l.storage.journal.short_of_space()
            || l.storage.store.space().0 < bs
            || self.mirror_room.load(Ordering::Relaxed) < bs;
        if full {
            return Err(Error::NoSpace);
        }
        Ok(())
    }

    /// Waits until a committed batch is held by two servers (mirror applied
    /// it), or durable locally when there is no mirror.
    async fn settle(&self, lsn: u64) {
        let l = self.l();
        let mut rx = self.acked.subscribe();
        let deadline = tokio::time::Instant::now() + l.timeouts.mirror_ack_wait;
        loop {
            let (g, a) = *rx.borrow_and_update();
            if g != 0 && a >= lsn {
                // Held by two servers; stable storage follows by group commit.
                return;
            }
            if l.member.current().meta_mirror().is_none() {
                // No mirror can exist (degraded): one copy, made durable now.
                break;
            }
            // A mirror is expected: wait for it to attach and catch up.
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                tracing::warn!(
                    lsn,
                    "namespace mirror has not acknowledged within 5 s; making the change durable locally"
                );
                break;
            }
        }
        self.flush_local().await;
    }

    async fn flush_local(&self) {
        let f = {
            let g = self.rep.lock();
            g.as_ref().map(|r| r.journal.flush_request())
        };
        if let Some(f) = f {
            let _ = f.await;
        }
    }

    /// Serves one namespace request on the namespace server.
    pub async fn handle(&self, call: MetaCall) -> Result<MetaResp, Error> {
        let MetaCall { client, seq, req } = call;
        if let MetaReq::Publish { ino, end, mtime, atime_set, mtime_set, sync: true } = req {
            let mut synced = false;
            let req = MetaReq::Publish { ino, end, mtime, atime_set, mtime_set, sync: false };
            let r = self.handle_one(MetaCall { client, seq, req }, Some(&mut synced)).await?;
            if !synced {
                self.sync().await;
            }
            return Ok(r);
        }
        if let MetaReq::WrittenSync { ino, end, mtime } = req {
            let mut synced = false;
            let call = MetaCall { client, seq, req: MetaReq::Written { ino, end, mtime } };
            let r = self.handle_one(call, Some(&mut synced)).await?;
            if !synced {
                self.sync().await;
            }
            return Ok(r);
        }
        #[cfg(feature = "failpoints")]
        let getattr = matches!(req, MetaReq::GetAttr { .. });
        let r = self.handle_one(MetaCall { client, seq, req }, None).await;
        // `namespace::getattr-answered=return(MS)`: a regular file's
        // attributes are answered MS ms after they were read (an answer
        // overtaken by a later change of the file, as a slow network makes).
        #[cfg(feature = "failpoints")]
        if let (true, Ok(MetaResp::Attr(a))) = (getattr, &r) {
            let ms = (|| {
                fail::fail_point!("namespace::getattr-answered", |a| a);
                None::<String>
            })();
            if let (FileKind::Regular, Some(ms)) = (a.kind, ms.and_then(|m| m.parse::<u64>().ok())) {
                tracing::warn!(iom = self.l().me.0, ino = a.ino.0, ms, "failpoint namespace::getattr-answered");
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
        }
        r
    }

    /// One request; with `sync`, a change it commits is also made durable
    /// on both replicas (the sync travels right behind the change, so both
    /// are waited for together) and `sync` is set.
    async fn handle_one(&self, call: MetaCall, sync: Option<&mut bool>) -> Result<MetaResp, Error> {
        let l = self.l();
        let map = l.member.current();
        if map.meta_server() != Some(l.me) {
            if let Some(r) = self.rep.lock().as_mut() {
                r.serving(false, Instant::now());
            }
            return Err(Error::Wire(WireError::new(
                ErrorCode::NotServing,
                format!("IOM {} does not serve the namespace in epoch {}", l.me, map.epoch),
            )));
        }
        let now = Timestamp::now();
        let MetaCall { client, seq, req } = call;
        // Reads too: once cut off from the majority, the mirror may have
        // taken the namespace over and changed it.
        if !l.member.has_quorum() {
            return Err(Error::Wire(WireError::new(
                ErrorCode::NoQuorum,
                format!("IOM {} cannot reach a majority of the cluster and serves no namespace request", l.me),
            )));
        }
        if matches!(req, MetaReq::Sync) {
            self.sync().await;
            return Ok(MetaResp::Done);
        }
        if matches!(req, MetaReq::StatFs) {
            let fresh = self.fs_stats.lock().1.is_some_and(|t| t.elapsed() < l.timeouts.statfs_max_age);
            if !fresh {
                self.refresh_stats().await;
            }
        }
        // The mirror's room is refreshed every ~2 s; a figure that says
        // full is asked again before a create is refused for it (room made
        // since, e.g. by a delete, must not get ENOSPC).
        let grows = matches!(req, MetaReq::Create { .. } | MetaReq::Link { .. } | MetaReq::SetXattr { .. });
        if grows && self.mirror_room.load(Ordering::Relaxed) < l.block_size as u64 {
            self.refresh_stats().await;
        }
        // Directories whose entries this request changes: their attributes
        // go back with the reply.
        let dirs: Vec<Ino> = match &req {
            MetaReq::Create { parent, .. } | MetaReq::Unlink { parent, .. } | MetaReq::Rmdir { parent, .. } => {
                vec![*parent]
            }
            MetaReq::Rename { parent, new_parent, .. } if parent == new_parent => vec![*parent],
            MetaReq::Rename { parent, new_parent, .. } => vec![*parent, *new_parent],
            MetaReq::Link { new_parent, .. } => vec![*new_parent],
            _ => Vec::new(),
        };
        let (reply, lsn, gen) = {
            let mut g = self.rep.lock();
            let Some(r) = g.as_mut() else {
                return Err(Error::Wire(WireError::new(ErrorCode::NotServing, "namespace replica not loaded")));
            };
            let at = Instant::now();
            r.serving(true, at);
            r.sessions.touch(client, at);
            if let Some(prev) = r.state.drc.get(&(client, seq)) {
                return Ok(prev.clone());
            }
            let grows = match &req {
                // A name that exists: the plan's EEXIST, not ENOSPC.
                MetaReq::Create { parent, name, .. } => r.state.lookup(*parent, name).is_err(),
                MetaReq::Link { new_parent, new_name, .. } => r.state.lookup(*new_parent, new_name).is_err(),
                MetaReq::SetXattr { .. } => true,
                _ => false,
            };
            if grows {
                self.room_to_grow(r)?;
            }
            let s = &r.state;
            let sessions = &r.sessions;
            // In the grace after this replica began serving, a client that
            // has not claimed its handles yet may hold any file: every
            // unlinked file is kept until the grace is over.
            let grace = sessions.in_grace(at);
            let is_open = |i: Ino| grace || sessions.is_open(i);
            let plan: Result<Plan, NsError> = match req {
                // ----- reads
                MetaReq::Lookup { parent, name } => return s.lookup(parent, &name).map(MetaResp::Attr).map_err(nserr),
                MetaReq::GetAttr { ino } => return s.inode(ino).map(|i| MetaResp::Attr(i.attr.clone())).map_err(nserr),
                MetaReq::ReadDir { ino, cookie, max, plus } => {
                    return s
                        .readdir(ino, cookie, max.min(common::wire::MAX_READDIR_ENTRIES), plus)
                        .map(MetaResp::Entries)
                        .map_err(nserr)
                }
                MetaReq::ReadLink { ino } => {
                    let i = s.inode(ino).map_err(nserr)?;
                    return i
                        .target
                        .clone()
                        .map(MetaResp::Data)
                        .ok_or_else(|| Error::Wire(WireError::new(ErrorCode::Invalid, "not a symbolic link")));
                }
                MetaReq::GetXattr { ino, name } => return s.get_xattr(ino, &name).map(MetaResp::Data).map_err(nserr),
                MetaReq::ListXattr { ino } => return s.list_xattr(ino).map(MetaResp::Names).map_err(nserr),
                MetaReq::StatFs => {
                    let mut st = self.fs_stats.lock().0;
                    st.files = s.inodes.len() as u64;
                    return Ok(MetaResp::StatFs(st));
                }
                MetaReq::DeadObjects { max } => {
                    return Ok(MetaResp::Dead(s.dead.iter().take(max as usize).copied().collect()))
                }
                MetaReq::Renew { opens } => {
                    let expired = r.sessions.renew(client, &opens, at);
                    let missing = opens.iter().map(|(i, _)| *i).filter(|i| !r.state.inodes.contains_key(i)).collect();
                    let lease_ms = r.sessions.lease().as_millis() as u64;
                    return Ok(MetaResp::Renewed { lease_ms, expired, missing });
                }
                MetaReq::Check => {
                    let open = sessions.held().iter().filter_map(|i| s.inodes.get(i)).map(|i| i.attr.object).collect();
                    return Ok(MetaResp::Check {
                        problems: s.check(),
                        objects: s.objects(),
                        open,
                        dead: s.dead.iter().copied().collect(),
                    });
                }
                // ----- mutations
                MetaReq::SetAttr { ino, set, .. } => s.setattr(ino, &set, now),
                MetaReq::Create { parent, name, kind, perm, rdev, caller, target, open } => {
                    let p = s.create(parent, &name, NewNode { kind, perm, rdev, target }, caller, now);
                    if open {
                        if let Ok(Plan { reply: MetaResp::Created { attr, .. }, .. }) = &p {
                            r.sessions.open(client, seq, attr.ino, at);
                        }
                    }
                    p
                }
                MetaReq::Unlink { parent, name } => s.unlink(parent, &name, is_open, now),
                MetaReq::Rmdir { parent, name } => s.rmdir(parent, &name, now),
                MetaReq::Rename { parent, name, new_parent, new_name, flags } => {
                    s.rename((parent, &name), (new_parent, &new_name), flags, is_open, now)
                }
                MetaReq::Link { ino, new_parent, new_name } => s.link(ino, new_parent, &new_name, now),
                MetaReq::SetXattr { ino, name, value, flags } => s.set_xattr(ino, &name, &value, flags, now),
                MetaReq::RemoveXattr { ino, name } => s.remove_xattr(ino, &name, now),
                MetaReq::Written { ino, end, mtime } => s.written(ino, end, mtime),
                MetaReq::Publish { ino, end, mtime, atime_set, mtime_set, .. } => {
                    s.publish(ino, end, mtime, atime_set, mtime_set, now)
                }
                MetaReq::Open { ino, truncate } => {
                    let (p, attr) = s.open(ino, truncate, now).map_err(nserr)?;
                    let t = attr.toughness;
                    r.sessions.open(client, seq, ino, at);
                    match p {
                        None => return Ok(MetaResp::Opened { attr, toughness: t }),
                        Some(p) => Ok(Plan { recs: p.recs, reply: MetaResp::Opened { attr, toughness: t } }),
                    }
                }
                MetaReq::Release { ino } => Ok(Plan { recs: r.release(client, &[ino], at), reply: MetaResp::Done }),
                MetaReq::ReleaseMany { inos } => Ok(Plan { recs: r.release(client, &inos, at), reply: MetaResp::Done }),
                MetaReq::ForgetDead { objects } => {
                    Ok(Plan { recs: vec![NsRec::Forget(objects)], reply: MetaResp::Done })
                }
                MetaReq::Reclaim { objects } => {
                    let used: std::collections::HashSet<ObjectId> = s.objects().into_iter().map(|(o, _)| o).collect();
                    let recs = objects
                        .into_iter()
                        .filter(|o| o.0 != 0 && !used.contains(o) && !s.dead.contains(o))
                        .map(NsRec::Dead)
                        .collect();
                    Ok(Plan { recs, reply: MetaResp::Done })
                }
                MetaReq::RepairNamespace => {
                    let (recs, fixed) = s.repair(now);
                    for f in &fixed {
                        tracing::warn!("fsck --repair: {f}");
                    }
                    Ok(Plan { recs, reply: MetaResp::Repaired { fixed } })
                }
                MetaReq::SetSize { ino, size } => {
                    s.setattr(ino, &SetAttr { size: Some(size), ..Default::default() }, now)
                }
                MetaReq::Sync | MetaReq::WrittenSync { .. } => unreachable!("handled before taking the lock"),
            };
            let plan = plan.map_err(nserr)?;
            if plan.recs.is_empty() {
                return Ok(plan.reply);
            }
            if grace {
                r.sessions.keep_for_grace(plan.recs.iter().filter_map(|rec| match rec {
                    NsRec::PutInode(i) if i.attr.nlink == 0 => Some(i.attr.ino),
                    _ => None,
                }));
            }
            let (lsn, gen) = Self::commit(r, plan.recs, client, seq, &plan.reply);
            let dir_attrs: Vec<Attr> =
                dirs.iter().filter_map(|d| r.state.inode(*d).ok().map(|i| i.attr.clone())).collect();
            let reply = if dir_attrs.is_empty() {
                plan.reply
            } else {
                MetaResp::WithDirs { reply: Box::new(plan.reply), dirs: dir_attrs }
            };
            (reply, lsn, gen)
        };
        let _ = gen;
        match sync {
            Some(done) => {
                futures::join!(self.settle(lsn), self.sync());
                *done = true;
            }
            None => self.settle(lsn).await,
        }
        Ok(reply)
    }

    /// Durability of the namespace on both replicas.
    pub async fn sync(&self) {
        let (flush, mirror) = {
            let g = self.rep.lock();
            let Some(r) = g.as_ref() else { return };
            let flush = r.journal.flush_request();
            let mirror = r.mirror.as_ref().and_then(|(_, tx)| {
                let token = self.next_token.fetch_add(1, Ordering::Relaxed);
                let (t, rx) = oneshot::channel();
                self.syncs.lock().insert(token, t);
                tx.send((MirrorMsg::Sync { token }, Bytes::new())).ok().map(|_| rx)
            });
            (flush, mirror)
        };
        let _ = flush.await;
        if let Some(m) = mirror {
            let _ = tokio::time::timeout(self.links.timeouts.mirror_sync_wait, m).await;
        }
    }

    // ---------------------------------------------------------------- mirror

    /// Namespace server side: keeps a mirror stream open to the mirror IOM.
    pub async fn mirror_worker(self: Arc<Self>) {
        let l = self.l();
        let mut epochs = l.member.subscribe();
        let mut ready_rx = l.ready.clone();
        loop {
            if l.stop.is_cancelled() {
                return;
            }
            // Armed before the checks: a change in between wakes the wait.
            let installed = self.installed.notified();
            let ready = *ready_rx.borrow_and_update();
            let map = l.member.current();
            let target =
                if ready && map.meta_server() == Some(l.me) && self.holds_replica() { map.meta_mirror() } else { None };
            match target {
                None => {
                    tokio::select! {
                        _ = epochs.changed() => {}
                        _ = ready_rx.changed() => {}
                        _ = installed => {}
                        _ = l.stop.cancelled() => return,
                    }
                }
                Some(m) => {
                    if let Err(e) = self.run_mirror_stream(m, &mut epochs).await {
                        tracing::debug!(iom = l.me.0, mirror = m.0, "namespace mirror stream: {e}");
                        tokio::time::sleep(l.timeouts.mirror_retry).await;
                    }
                }
            }
        }
    }

    async fn run_mirror_stream(
        self: &Arc<Self>,
        m: IomId,
        epochs: &mut watch::Receiver<common::Epoch>,
    ) -> Result<(), String> {
        let ns = self;
        let l = self.l();
        let conn = l.caller.conn(m).await.map_err(|e| e.to_string())?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_frame(&mut send, &Request::MetaMirror { from: l.me, epoch: l.member.epoch() }, Bytes::new())
            .await
            .map_err(|e| e.to_string())?;
        match read_frame::<Reply>(&mut recv).await.map_err(|e| e.to_string())? {
            Some((Reply::Member(MemberResp::Ack), _)) => {}
            other => return Err(format!("mirror refused: {other:?}")),
        }
        let (mterm, mlsn) = match read_frame::<MirrorAck>(&mut recv).await.map_err(|e| e.to_string())? {
            Some((MirrorAck::Position { term, lsn }, _)) => (term, lsn),
            other => return Err(format!("unexpected mirror hello {other:?}")),
        };
        let gen = ns.next_gen.fetch_add(1, Ordering::Relaxed);
        let (tx, mut rx) = mpsc::unbounded_channel::<(MirrorMsg, Bytes)>();
        {
            let mut g = ns.rep.lock();
            let Some(r) = g.as_mut() else { return Err("no replica".into()) };
            let have_tail = mterm == r.term
                && mlsn <= r.lsn
                && (mlsn == r.lsn || r.recent.front().is_some_and(|(l, _)| *l <= mlsn + 1));
            if have_tail {
                for (l, b) in r.recent.iter().filter(|(l, _)| *l > mlsn) {
                    let _ = tx.send((MirrorMsg::Batch { term: r.term, lsn: *l }, b.clone()));
                }
            } else {
                let body = codec::encode_large(&r.state).map_err(|e| e.to_string())?;
                let _ = tx.send((MirrorMsg::Snapshot { term: r.term, lsn: r.lsn }, Bytes::from(body)));
            }
            r.mirror = Some((gen, tx));
            ns.acked.send_replace((gen, 0));
            let _ = mterm;
        }
        tracing::info!(iom = l.me.0, mirror = m.0, from_lsn = mlsn, "namespace mirror attached");
        let writer = l.workers.spawn(Tier::Background, "ns-mirror-writer", async move {
            while let Some((msg, payload)) = rx.recv().await {
                if write_frame(&mut send, &msg, payload).await.is_err() {
                    return;
                }
            }
        });
        let res = loop {
            tokio::select! {
                f = read_frame::<MirrorAck>(&mut recv) => match f {
                    Ok(Some((MirrorAck::Applied { lsn }, _))) => {
                        ns.acked.send_modify(|(g, a)| if *g == gen { *a = (*a).max(lsn) });
                    }
                    Ok(Some((MirrorAck::Synced { token }, _))) => {
                        if let Some(t) = ns.syncs.lock().remove(&token) {
                            let _ = t.send(());
                        }
                    }
                    Ok(Some((other, _))) => break Err(format!("unexpected {other:?}")),
                    Ok(None) => break Err("mirror closed".into()),
                    Err(e) => break Err(e.to_string()),
                },
                _ = epochs.changed() => {
                    let map = l.member.current();
                    if map.meta_server() != Some(l.me) || map.meta_mirror() != Some(m) {
                        break Ok(());
                    }
                }
                _ = l.stop.cancelled() => break Ok(()),
            }
        };
        {
            let mut g = ns.rep.lock();
            if let Some(r) = g.as_mut() {
                if r.mirror.as_ref().is_some_and(|(g2, _)| *g2 == gen) {
                    r.mirror = None;
                }
            }
        }
        // No mirror until the next stream attaches.
        ns.acked.send_modify(|(g, a)| {
            if *g == gen {
                *g = 0;
                *a = 0;
            }
        });
        writer.abort();
        res
    }

    /// Mirror side of a mirror stream.
    pub async fn serve_mirror(self: Arc<Self>, from: IomId, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
        let ns = &self;
        let l = self.l();
        let map = l.member.current();
        if map.meta_server() != Some(from) || map.meta_mirror() != Some(l.me) {
            let e = WireError::new(
                ErrorCode::NotServing,
                format!(
                    "in epoch {} IOM {from} is not the namespace server with IOM {} as its mirror",
                    map.epoch, l.me
                ),
            );
            tracing::warn!(iom = l.me.0, from = from.0, "refused a namespace mirror stream: {e}");
            let _ = write_frame(&mut send, &Reply::Error(e), Bytes::new()).await;
            return;
        }
        if write_frame(&mut send, &Reply::Member(MemberResp::Ack), Bytes::new()).await.is_err() {
            return;
        }
        let (term, lsn) = ns.position();
        if write_frame(&mut send, &MirrorAck::Position { term, lsn }, Bytes::new()).await.is_err() {
            return;
        }
        let (ack_tx, mut ack_rx) = mpsc::unbounded_channel::<MirrorAck>();
        let writer = l.workers.spawn(Tier::Connections, "ns-mirror-ack-writer", async move {
            while let Some(a) = ack_rx.recv().await {
                if write_frame(&mut send, &a, Bytes::new()).await.is_err() {
                    return;
                }
            }
        });
        loop {
            match read_frame::<MirrorMsg>(&mut recv).await {
                Ok(Some((MirrorMsg::Batch { term, lsn }, payload))) => {
                    let written = {
                        let mut g = ns.rep.lock();
                        let Some(r) = g.as_mut() else { break };
                        if lsn <= r.lsn {
                            let _ = ack_tx.send(MirrorAck::Applied { lsn });
                            continue;
                        }
                        if term < r.term {
                            tracing::error!(
                                lsn,
                                term,
                                have_term = r.term,
                                "namespace mirror: batch of an older term refused"
                            );
                            break;
                        }
                        if lsn != r.lsn + 1 {
                            tracing::warn!(lsn, have = r.lsn, "namespace mirror: gap in the stream; resyncing");
                            break;
                        }
                        let e: Entry = match codec::decode_large(&payload) {
                            Ok(e) => e,
                            Err(err) => {
                                tracing::error!("namespace mirror: undecodable batch: {err}");
                                break;
                            }
                        };
                        r.state.apply(&e.recs);
                        r.lsn = lsn;
                        r.term = r.term.max(term);
                        r.recent.push_back((lsn, payload.clone()));
                        while r.recent.len() > RECENT {
                            r.recent.pop_front();
                        }
                        r.journal.append(payload.to_vec(), false, Wait::Written, None)
                    };
                    let ack = ack_tx.clone();
                    l.workers.spawn(Tier::Connections, "ns-mirror-ack", async move {
                        if let Some(w) = written {
                            let _ = w.await;
                        }
                        let _ = ack.send(MirrorAck::Applied { lsn });
                    });
                }
                Ok(Some((MirrorMsg::Snapshot { term, lsn }, payload))) => {
                    if term < ns.position().0 {
                        tracing::error!(
                            iom = l.me.0,
                            from = from.0,
                            term,
                            "refused a namespace snapshot of an older term"
                        );
                        break;
                    }
                    let state: NsState = match codec::decode_large(&payload) {
                        Ok(s) => s,
                        Err(err) => {
                            tracing::error!("namespace mirror: undecodable snapshot: {err}");
                            break;
                        }
                    };
                    if let Err(e) = ns.install(state, term, lsn).await {
                        tracing::error!("namespace mirror: cannot install snapshot: {e}");
                        break;
                    }
                    tracing::info!(iom = l.me.0, from = from.0, lsn, "namespace mirror: snapshot installed");
                    let _ = ack_tx.send(MirrorAck::Applied { lsn });
                }
                Ok(Some((MirrorMsg::Sync { token }, _))) => {
                    let ack = ack_tx.clone();
                    let f = {
                        let g = ns.rep.lock();
                        g.as_ref().map(|r| r.journal.flush_request())
                    };
                    l.workers.spawn(Tier::Connections, "ns-mirror-ack", async move {
                        if let Some(f) = f {
                            let _ = f.await;
                        }
                        let _ = ack.send(MirrorAck::Synced { token });
                    });
                }
                Ok(None) | Err(_) => break,
            }
        }
        drop(ack_tx);
        let _ = writer.await;
    }

    /// Replaces this replica with a copy received from the namespace server.
    async fn install(&self, state: NsState, term: u64, lsn: u64) -> Result<(), Error> {
        let l = self.l();
        let _one = self.checkpointing.lock().await;
        let dir = l.data_dir.join(META_DIR);
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let old = self.rep.lock().take();
        if let Some(r) = old {
            r.journal.stop().await;
        }
        // The received copy replaces everything this replica had.
        Journal::remove_before(&dir, u64::MAX)?;
        let (journal, replayed) = Journal::open(&dir, 0, l.storage.store.file(), l.timeouts.journal_flush)?;
        write_snap(&dir, &Snap { term, lsn, replay_from: replayed.segment, state: state.clone() })?;
        *self.rep.lock() = Some(Replica {
            state,
            term,
            lsn,
            journal,
            dir,
            sessions: Sessions::new(l.client_lease, Instant::now()),
            recent: VecDeque::new(),
            mirror: None,
        });
        self.installed.notify_waiters();
        Ok(())
    }

    // ------------------------------------------------------- background work

    /// On the namespace server: drops the data of dead objects on every IOM,
    /// keeps capacity figures for statfs, checkpoints the namespace journal.
    pub async fn worker(self: Arc<Self>) {
        let l = self.l();
        let mut tick = 0u64;
        loop {
            tokio::select! {
                _ = l.stop.cancelled() => return,
                _ = tokio::time::sleep(l.timeouts.namespace_tick) => {}
            }
            tick += 1;
            let serving = l.member.current().meta_server() == Some(l.me);
            if let Some(r) = self.rep.lock().as_mut() {
                r.serving(serving, Instant::now());
            }
            if !serving {
                continue;
            }
            if tick % 8 == 1 {
                self.refresh_stats().await;
            }
            if tick.is_multiple_of(4) {
                self.expire_sessions().await;
            }
            self.collect_garbage().await;
            if self.journal_bytes() > l.storage.checkpoint_bytes {
                if let Err(e) = self.checkpoint().await {
                    tracing::error!("namespace checkpoint failed: {e}");
                }
            }
        }
    }

    async fn refresh_stats(&self) {
        let l = self.l();
        let w = l.width as u64;
        let calls = (0..l.width).map(|i| async move {
            if IomId(i) == l.me {
                return l.caller.local_stats();
            }
            match l
                .caller
                .call_peer(IomId(i), &Request::Admin(AdminReq::Stats), Bytes::new(), l.timeouts.probe_call)
                .await
            {
                Ok((Reply::Admin(AdminResp::Stats(s)), _)) => Some(s),
                _ => None,
            }
        });
        let all: Vec<_> = futures::future::join_all(calls).await.into_iter().flatten().collect();
        let mirror = l.member.current().meta_mirror();
        let room = mirror.and_then(|m| all.iter().find(|s| s.iom == m.0)).map(|s| s.room_bytes);
        self.mirror_room.store(room.unwrap_or(u64::MAX), Ordering::Relaxed);
        // Users see what they can store: the filesystem that fills first
        // bounds it, one shared by several IOMs counted once.
        let (free, total) = common::wire::IomStats::usable(&all, (w - 1) as u32);
        let st = FsStats { total_bytes: total, free_bytes: free, files: 0, block_size: l.block_size };
        *self.fs_stats.lock() = (st, Some(std::time::Instant::now()));
    }

    /// Ends the sessions of clients silent for a whole lease: the unlinked
    /// files only they held open are reclaimed.
    async fn expire_sessions(&self) {
        let l = self.l();
        if !l.member.has_quorum() {
            // Cut off from the majority: clients may be renewing with the
            // server the others chose; nothing here may be reclaimed.
            return;
        }
        let lsn = {
            let mut g = self.rep.lock();
            let Some(r) = g.as_mut() else { return };
            let freed = r.sessions.expire(Instant::now());
            let recs = r.reap(&freed);
            if recs.is_empty() {
                return;
            }
            let files = recs.iter().filter(|r| matches!(r, NsRec::DelInode(_))).count();
            tracing::info!(files, "reclaiming unlinked files no live client holds open");
            Self::commit(r, recs, 0, 0, &MetaResp::Done).0
        };
        self.settle(lsn).await;
    }

    async fn collect_garbage(&self) {
        let l = self.l();
        let dead: Vec<ObjectId> = {
            let g = self.rep.lock();
            match g.as_ref() {
                Some(r) => r.state.dead.iter().take(64).copied().collect(),
                None => return,
            }
        };
        if dead.is_empty() {
            return;
        }
        // One request per IOM (or its stand-in) for the whole batch.
        let calls = (0..l.width).map(|i| {
            let objects = dead.clone();
            async move { l.caller.rpc_drop_objects(IomId(i), objects, l.timeouts.gc_drop_call).await.is_ok() }
        });
        let done = if futures::future::join_all(calls).await.into_iter().all(|x| x) { dead } else { Vec::new() };
        if done.is_empty() {
            return;
        }
        let (lsn, gen) = {
            let mut g = self.rep.lock();
            let Some(r) = g.as_mut() else { return };
            Self::commit(r, vec![NsRec::Forget(done)], 0, 0, &MetaResp::Done)
        };
        let _ = gen;
        self.settle(lsn).await;
    }
}

impl crate::failover::NamespaceTakeover for Namespace {
    fn holds_replica(&self) -> bool {
        Namespace::holds_replica(self)
    }
    fn promote(&self, term: u64) {
        Namespace::promote(self, term)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snap {
        Snap { term: 3, lsn: 9, replay_from: 2, state: NsState::default() }
    }

    /// The checkpoint header as written today: magic, format version,
    /// crc32c of the body, then the body. The on-disk format must not change.
    #[test]
    fn golden_snapshot_header() {
        let d = tempfile::tempdir().unwrap();
        write_snap(d.path(), &snap()).unwrap();
        let b = std::fs::read(d.path().join(SNAP_FILE)).unwrap();
        let body = codec::encode_large(&snap()).unwrap();
        assert_eq!(&b[..12], b"IOMFSNSP\x01\x00\x00\x00");
        assert_eq!(b[12..16], crc32c::crc32c(&body).to_le_bytes());
        assert_eq!(&b[16..], &body[..]);
    }

    /// What a bad checkpoint header gives, as today: errors naming the file.
    #[test]
    fn bad_snapshot_headers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join(SNAP_FILE);
        write_snap(d.path(), &snap()).unwrap();
        let good = std::fs::read(&p).unwrap();
        let read = |b: &[u8]| {
            std::fs::write(&p, b).unwrap();
            read_snap(d.path()).map(|s| s.map(|s| (s.term, s.lsn, s.replay_from))).map_err(|e| e.to_string())
        };
        assert_eq!(read(&good), Ok(Some((3, 9, 2))));
        let name = p.display().to_string();
        for n in 0..16 {
            assert_eq!(read(&good[..n]), Err(format!("{name}: not an iomfs namespace checkpoint")), "{n}");
        }
        let mut m = good.clone();
        m[5] ^= 1;
        assert_eq!(read(&m), Err(format!("{name}: not an iomfs namespace checkpoint")));
        for ver in [0u32, 2, u32::MAX] {
            let mut v = good.clone();
            v[8..12].copy_from_slice(&ver.to_le_bytes());
            assert_eq!(read(&v), Err(format!("{name}: format version {ver}; this build reads 1")));
        }
        let mut c = good.clone();
        c[13] ^= 1;
        assert_eq!(read(&c), Err(format!("{name}: checksum mismatch")));
        let mut c = good.clone();
        *c.last_mut().unwrap() ^= 1;
        assert_eq!(read(&c), Err(format!("{name}: checksum mismatch")));
    }
}
