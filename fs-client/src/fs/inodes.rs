//! The inode table: what this client knows of each inode ([`Node`]) — the
//! namespace's last attributes plus what this client changed and has not
//! published yet (the end and mtime of its writes, times set while the
//! file is open for writing, the IOMs its writes touched since the last
//! fsync) — and the data path that keeps it: read, write, setattr, fsync
//! and publishing.
//!
//! Invariants: the kernel is told [`Node::merged`], never the namespace's
//! attributes alone, so a size grown by this client's writes never shrinks
//! before the namespace has it (the kernel would drop the file's tail from
//! its page cache); unpublished state is cleared only by a publish that
//! covered it (on an error it stays, and the next flush tries again); a
//! node with open handles or unpublished state is never evicted.

use super::{errno, wrong_reply, Inner, R};
use bytes::Bytes;
use common::meta::*;
use common::{Ino, ObjectId, Toughness};
use fuser::Errno;
use std::time::{Duration, Instant};

/// What this client knows of an inode.
#[derive(Clone, Debug)]
pub(super) struct Node {
    /// Last attributes from the namespace.
    pub(super) attr: Attr,
    /// End of data written through this client and not yet published.
    pub(super) dirty_end: u64,
    pub(super) dirty_mtime: Option<Timestamp>,
    /// Open handles with write access.
    pub(super) writers: u32,
    pub(super) opens: u32,
    /// IOM roles (bit i = role i) that writes through this client touched
    /// (data and parity) since the last fsync: the only IOMs an fsync must
    /// flush.
    pub(super) unsynced: u64,
    /// The inode had no `security.capability` when its `attr.change` was
    /// this: the kernel asks before every write (to drop a capability on
    /// write), and is answered here while the inode has not changed.
    pub(super) no_caps: Option<u64>,
    /// `attr` is the state right after a change this client made (a
    /// directory whose entries it changed): the kernel's next getattr is
    /// answered from it until then.
    pub(super) fresh_until: Option<Instant>,
    /// Times set with utimens while this client had the file open for
    /// writing, published with its size on close (like the mtime of writes).
    pub(super) atime_set: Option<Timestamp>,
    pub(super) mtime_set: Option<Timestamp>,
    /// When times were last set that way (the inode's change time).
    pub(super) times_ctime: Option<Timestamp>,
    /// (change, object, size) the file had at this client's last open: the
    /// kernel's page cache of it is kept at the next open only if they are
    /// still the same. Not the attributes after this client's own publish:
    /// another client's writes may have landed between this client's
    /// writes and its close, and the pages this client cached would hide
    /// them (close-to-open).
    pub(super) opened_as: Option<(u64, ObjectId, u64)>,
    /// The inode's change counter (`attr.change`) when this client last
    /// made the namespace durable with it (a synced publication, or a
    /// `Sync` sent after it): while `attr.change` is still this, an fsync
    /// has no namespace state of this file to make durable.
    pub(super) synced_change: Option<u64>,
    /// Namespace changes of this inode this client sent unsynced: a synced
    /// publication counts as making the state durable only if none was
    /// sent while it was on its way.
    pub(super) meta_changes: u64,
    /// `Inner::data_gen` at this client's last change of the file's data
    /// (at least its value when the node was made): a prefetch sent before
    /// it is stale.
    pub(super) changed_at: u64,
    /// `Inner::meta_clock` when `attr` was installed: an answer to a
    /// request sent before it may be older than `attr` (`settle`).
    pub(super) attr_at: u64,
}

impl Node {
    /// The namespace holds this inode's state durably as this client knows
    /// it (no change since a synced publication or `Sync`).
    fn meta_durable(&self) -> bool {
        self.synced_change == Some(self.attr.change)
    }

    /// A synced publication or `Sync` answered with change counter
    /// `change`; `gen` is `meta_changes` when it was sent: it made the
    /// state durable only if no unsynced change was sent meanwhile.
    fn note_synced(&mut self, gen: u64, change: u64) {
        if self.meta_changes == gen {
            self.synced_change = Some(change);
        }
    }

    /// This client applied its own namespace change to `attr` (the answer
    /// carried no attributes): the namespace counted it too, so an answer
    /// read before the change, carrying the counter `attr` had, is older
    /// and must not undo it (`remember`).
    pub(super) fn changed_locally(&mut self) {
        self.attr.change += 1;
    }

    pub(super) fn merged(&self) -> Attr {
        let mut a = self.attr.clone();
        if self.dirty_end > a.size {
            a.size = self.dirty_end;
        }
        if let Some(m) = self.dirty_mtime {
            a.mtime = a.mtime.max(m);
            a.ctime = a.ctime.max(m);
        }
        if let Some(t) = self.atime_set {
            a.atime = t;
        }
        if let Some(t) = self.mtime_set {
            a.mtime = t;
        }
        if let Some(t) = self.times_ctime {
            a.ctime = a.ctime.max(t);
        }
        a
    }
    pub(super) fn is_dirty(&self) -> bool {
        self.dirty_mtime.is_some() || self.unsynced != 0 || self.has_times()
    }
    pub(super) fn has_times(&self) -> bool {
        self.atime_set.is_some() || self.mtime_set.is_some()
    }
}

impl Inner {
    /// Stores attributes fresh from the namespace; returns what to tell the kernel.
    ///
    /// Answers are applied out of order (each FUSE request is its own
    /// task), so an answer older than the attributes held (a lower change
    /// counter) is not installed: a getattr read before this client's
    /// truncate to 0 and answered after it would otherwise bring back the
    /// file's dropped data object, and the writes that follow would go to
    /// it. A lower counter that is not a reordering (a namespace that failed
    /// over without the newest change) was installed by `settle` already.
    pub(super) fn remember(&self, a: &Attr) -> Attr {
        let mut nodes = self.nodes.lock();
        match nodes.get_mut(&a.ino) {
            Some(n) => {
                self.install(n, a);
                n.merged()
            }
            None => {
                if nodes.len() > 200_000 {
                    nodes.retain(|_, n| n.opens > 0 || n.is_dirty());
                }
                nodes.insert(
                    a.ino,
                    Node {
                        attr: a.clone(),
                        dirty_end: 0,
                        dirty_mtime: None,
                        writers: 0,
                        opens: 0,
                        unsynced: 0,
                        no_caps: None,
                        fresh_until: None,
                        atime_set: None,
                        mtime_set: None,
                        times_ctime: None,
                        opened_as: None,
                        synced_change: None,
                        meta_changes: 0,
                        changed_at: self.data_gen.load(std::sync::atomic::Ordering::Acquire),
                        attr_at: self.meta_tick(),
                    },
                );
                a.clone()
            }
        }
    }

    /// `a` into `n` unless it is older than what `n` holds (`remember`):
    /// `attr.change` never goes back but through `settle`.
    fn install(&self, n: &mut Node, a: &Attr) {
        if a.change >= n.attr.change {
            n.attr = a.clone();
            n.attr_at = self.meta_tick();
        } else {
            metrics::counter!("iomfs_client_stale_answers_total").increment(1);
        }
    }

    /// The next tick of `meta_clock`.
    pub(super) fn meta_tick(&self) -> u64 {
        self.meta_clock.fetch_add(1, std::sync::atomic::Ordering::AcqRel)
    }

    /// An answer to a namespace request sent at `sent` (`meta_clock`):
    /// attributes in it with a lower change counter than those held, from a
    /// request sent after those were installed, are not a reordering but
    /// the namespace's state as it is now (it failed over without the change
    /// this client had seen): installed here, so `remember` keeps them.
    pub(super) fn settle(&self, resp: &MetaResp, sent: u64) {
        let attrs: Vec<&Attr> = match resp {
            MetaResp::Attr(a) | MetaResp::Opened { attr: a, .. } | MetaResp::Created { attr: a, .. } => vec![a],
            MetaResp::Entries(es) => es.iter().filter_map(|e| e.attr.as_ref()).collect(),
            MetaResp::WithDirs { reply, dirs } => {
                self.settle(reply, sent);
                dirs.iter().collect()
            }
            _ => return,
        };
        let mut nodes = self.nodes.lock();
        for a in attrs {
            if let Some(n) = nodes.get_mut(&a.ino) {
                if a.change < n.attr.change && sent > n.attr_at {
                    tracing::warn!(
                        ino = a.ino.0,
                        held = n.attr.change,
                        now = a.change,
                        "the namespace answered an older state of an inode than this client had seen (it failed over \
                         without that change): taking its answer"
                    );
                    n.attr = a.clone();
                    n.attr_at = self.meta_tick();
                    // A prefetch sent before read the state this replaces.
                    n.changed_at = self.next_data_gen();
                }
            }
        }
    }

    pub(super) fn node(&self, ino: Ino) -> Option<Node> {
        self.nodes.lock().get(&ino).cloned()
    }

    /// Attributes this client knows exactly (right after its own change),
    /// with how long they stay exact.
    pub(super) fn fresh_attr(&self, ino: Ino) -> Option<(Attr, Duration)> {
        let nodes = self.nodes.lock();
        let n = nodes.get(&ino)?;
        let left = n.fresh_until?.checked_duration_since(Instant::now())?;
        Some((n.merged(), left))
    }

    pub(super) async fn attr_of(&self, ino: Ino) -> R<Attr> {
        match self.meta(MetaReq::GetAttr { ino }).await? {
            MetaResp::Attr(a) => Ok(self.remember(&a)),
            _ => Err(wrong_reply()),
        }
    }

    /// The node of an inode, fetching it if this client does not know it.
    pub(super) async fn known(&self, ino: Ino) -> R<Node> {
        if let Some(n) = self.node(ino) {
            return Ok(n);
        }
        self.attr_of(ino).await?;
        self.node(ino).ok_or(Errno::ESTALE)
    }

    /// Publishes size and mtime of writes made through this client.
    pub(super) async fn publish(&self, ino: Ino) -> R<()> {
        self.publish_and(ino, false).await
    }

    /// Publishes, and with `sync` makes every namespace change durable in
    /// the same round trip (fsync).
    pub(super) async fn publish_and(&self, ino: Ino, sync: bool) -> R<()> {
        self.publish_inner(ino, sync, true).await
    }

    /// `publish_and`; without `send_first` the buffered bytes of `ino` are
    /// not sent before unless they grow the file (an fsync sends them side
    /// by side with this: an mtime may go ahead of its bytes, a size never).
    async fn publish_inner(&self, ino: Ino, sync: bool, send_first: bool) -> R<()> {
        // A size is never published ahead of its bytes.
        if send_first {
            self.send_buffered(ino).await;
        }
        // The local size stays in force until the namespace has the new one:
        // a getattr answered meanwhile must not report the old, smaller size
        // (the kernel would drop the file's tail from its page cache).
        let dirty_of = || {
            self.nodes.lock().get(&ino).and_then(|n| {
                (n.dirty_mtime.is_some() || n.has_times()).then_some((
                    n.dirty_end,
                    n.dirty_mtime,
                    n.atime_set,
                    n.mtime_set,
                    n.attr.size,
                ))
            })
        };
        let mut dirty = dirty_of();
        if !send_first && dirty.is_some_and(|d| d.0 > d.4) {
            self.send_buffered(ino).await;
            dirty = dirty_of();
        }
        let dirty = dirty.map(|(end, mtime, atime_set, mtime_set, _)| (end, mtime, atime_set, mtime_set));
        let (end, mtime, atime_set, mtime_set) = match dirty {
            Some(d) => d,
            None if sync => {
                let known = self.nodes.lock().get(&ino).map(|n| (n.attr.change, n.meta_changes, n.meta_durable()));
                if known.is_some_and(|(_, _, durable)| durable) {
                    // Nothing of this file changed at the namespace since
                    // this client last made it durable there.
                    return Ok(());
                }
                self.meta(MetaReq::Sync).await?;
                if let (Some(n), Some((change, gen, _))) = (self.nodes.lock().get_mut(&ino), known) {
                    n.note_synced(gen, change);
                }
                return Ok(());
            }
            None => return Ok(()),
        };
        let req = match mtime {
            Some(mtime) if atime_set.is_none() && mtime_set.is_none() => {
                if sync {
                    MetaReq::WrittenSync { ino, end, mtime }
                } else {
                    MetaReq::Written { ino, end, mtime }
                }
            }
            _ => MetaReq::Publish { ino, end, mtime, atime_set, mtime_set, sync },
        };
        let gen = self.nodes.lock().get(&ino).map(|n| n.meta_changes);
        let r = self.meta(req).await;
        if let Ok(MetaResp::Attr(a)) = &r {
            let mut nodes = self.nodes.lock();
            if let Some(n) = nodes.get_mut(&ino) {
                // This publication is the only change since the inode was
                // known to have no capability: it still has none.
                if n.no_caps == Some(n.attr.change) && a.change == n.attr.change + 1 {
                    n.no_caps = Some(a.change);
                }
                self.install(n, a);
                if let (true, Some(gen)) = (sync, gen) {
                    n.note_synced(gen, a.change);
                }
                // Clean unless this client wrote more meanwhile (published next time).
                if n.dirty_mtime == mtime && n.dirty_end <= end {
                    n.dirty_mtime = None;
                    n.dirty_end = 0;
                }
                if n.atime_set == atime_set && n.mtime_set == mtime_set {
                    n.atime_set = None;
                    n.mtime_set = None;
                    n.times_ctime = None;
                }
            }
        }
        // On an error it stays dirty, so a later flush tries again.
        r.map(|_| ())
    }

    pub(super) fn mark_unsynced(&self, ino: Ino, roles: u64) {
        if let Some(n) = self.nodes.lock().get_mut(&ino) {
            n.unsynced |= roles;
        }
    }

    pub(super) fn toughness_of(&self, n: &Node) -> Toughness {
        n.attr.toughness.unwrap_or(self.o.toughness)
    }

    pub(super) async fn write(
        &self,
        ino: Ino,
        fh: u64,
        offset: u64,
        data: Bytes,
        kill_suid: bool,
        caller: Caller,
    ) -> R<u32> {
        let sync = self.handles.lock().get(&fh).map(|h| h.sync).unwrap_or(false);
        let n = self.known(ino).await?;
        if n.attr.kind != FileKind::Regular {
            return Err(Errno::EINVAL);
        }
        self.drop_privs_for_write(ino, n.attr.perm, kill_suid, caller).await?;
        let t = if sync { Toughness::Durable } else { self.toughness_of(&n) };
        let len = data.len() as u32;
        let end = offset + data.len() as u64;
        if end > i64::MAX as u64 {
            return Err(Errno::EFBIG);
        }
        if t == Toughness::Buffered {
            self.session_ok(ino).await?;
            if end > n.attr.size.max(n.dirty_end) {
                self.room_for(self.wb.total() as u64 + data.len() as u64).await?;
            }
            self.make_room(ino, data.len()).await;
            self.wb.put(ino, n.attr.object, offset, data);
            if let Some(n) = self.nodes.lock().get_mut(&ino) {
                n.dirty_end = n.dirty_end.max(end);
                n.dirty_mtime = Some(Timestamp::now());
                n.mtime_set = None;
            }
            return Ok(len);
        }
        // Bytes buffered earlier (the file's level changed, or an O_SYNC
        // handle writes) go first: they are older than this write.
        self.send_buffered(ino).await;
        let roles = self.c.write_roles(n.attr.object, offset, data.len());
        self.session_ok(ino).await?;
        // Blocks past what this client knows of the file are probably
        // absent: whole parity groups there go as client stripes.
        let fresh_from = n.attr.size.max(n.dirty_end);
        self.c.write_from(n.attr.object, offset, data, t, fresh_from).await.map_err(errno)?;
        self.session_ok(ino).await?;
        // Noted once answered: an fsync that started earlier need not cover it.
        self.mark_unsynced(ino, roles);
        let grew = {
            let mut nodes = self.nodes.lock();
            match nodes.get_mut(&ino) {
                Some(n) => {
                    n.dirty_end = n.dirty_end.max(end);
                    n.dirty_mtime = Some(Timestamp::now());
                    n.mtime_set = None;
                    end > n.attr.size
                }
                None => false,
            }
        };
        if t == Toughness::Durable && grew {
            // The data is durable; its new size must be too.
            self.publish_and(ino, true).await?;
        }
        Ok(len)
    }

    pub(super) async fn read(&self, ino: Ino, fh: u64, offset: u64, size: u32) -> R<Bytes> {
        let n = self.known(ino).await?;
        let a = n.merged();
        if offset >= a.size {
            return Ok(Bytes::new());
        }
        let len = (a.size - offset).min(size as u64) as usize;
        if let Some(b) = self.prefetched(fh, ino, offset, len).await {
            self.session_ok(ino).await?;
            return Ok(self.wb.read_over(ino, offset, b));
        }
        self.session_ok(ino).await?;
        let b = self.c.read(a.object, offset, len).await.map_err(errno)?;
        self.session_ok(ino).await?;
        Ok(self.wb.read_over(ino, offset, b))
    }

    pub(super) async fn setattr(&self, ino: Ino, set: SetAttr, caller: Caller) -> R<Attr> {
        let truncation = set.size.is_some();
        let r = self.setattr_now(ino, set, caller).await;
        if truncation {
            // Again once the data changed (or failed half-way): a prefetch
            // sent while the truncation ran has seen neither state surely.
            self.data_changing(ino);
        }
        r
    }

    async fn setattr_now(&self, ino: Ino, set: SetAttr, caller: Caller) -> R<Attr> {
        let times_only = set.mode.is_none()
            && set.uid.is_none()
            && set.gid.is_none()
            && set.size.is_none()
            && !set.kill_suid
            && (set.atime.is_some() || set.mtime.is_some());
        if times_only {
            // utimens of a file this client has open for writing: kept with
            // the size and mtime of its writes and published with them on
            // close (one round trip less per file for `cp -a`, `tar`, `rsync`).
            let mut nodes = self.nodes.lock();
            if let Some(n) = nodes.get_mut(&ino).filter(|n| n.writers > 0 && n.attr.kind == FileKind::Regular) {
                let at = |t: TimeSet| match t {
                    TimeSet::Now => Timestamp::now(),
                    TimeSet::At(x) => x,
                };
                if let Some(t) = set.atime {
                    n.atime_set = Some(at(t));
                }
                if let Some(t) = set.mtime {
                    n.mtime_set = Some(at(t));
                }
                n.times_ctime = Some(Timestamp::now());
                return Ok(n.merged());
            }
        }
        if let Some(size) = set.size {
            if self.o.read_only {
                return Err(Errno::EROFS);
            }
            self.data_changing(ino);
            self.publish(ino).await?;
            let n = self.known(ino).await?;
            if n.attr.kind == FileKind::Directory {
                return Err(Errno::EISDIR);
            }
            let cur = n.attr.size;
            if size > 0 && size < cur {
                self.c.truncate(n.attr.object, cur, size, self.toughness_of(&n)).await.map_err(errno)?;
                self.mark_unsynced(ino, u64::MAX);
            }
        }
        if self.node(ino).is_some_and(|n| n.has_times()) {
            // Times kept back go first, so this change applies after them.
            self.publish(ino).await?;
        }
        let resp = self.meta(MetaReq::SetAttr { ino, set: set.clone(), caller }).await?;
        let MetaResp::Attr(a) = resp else { return Err(wrong_reply()) };
        if set.size.is_some() {
            if let Some(n) = self.nodes.lock().get_mut(&ino) {
                n.dirty_end = 0;
                n.dirty_mtime = None;
            }
        }
        Ok(self.remember(&a))
    }

    /// fsync(2), or fdatasync(2) with `datasync`: the file's data, and
    /// of its metadata what a later read needs (its size; for fsync also
    /// its times), durable. An fdatasync of overwrites that did not grow
    /// the file costs no namespace round trip once the file's namespace
    /// state is durable (its new mtime is published later, at close or
    /// the next fsync).
    pub(super) async fn fsync(&self, ino: Ino, datasync: bool) -> R<()> {
        // Buffered bytes that do not grow the file go as `durable` writes
        // (no flush of their IOMs after them), side by side with the
        // namespace's part; bytes that grow it go first, as `atomic`, as a
        // size is never published ahead of its bytes.
        let overwrites = self.wb.holds(ino) && self.nodes.lock().get(&ino).is_some_and(|n| n.dirty_end <= n.attr.size);
        if !overwrites {
            self.flush_buffered(ino).await?;
        }
        let n = self.known(ino).await?;
        // Data and metadata are made durable side by side: nothing is
        // promised until both are done.
        let data = async {
            if overwrites {
                self.flush_buffered_at(ino, Toughness::Durable).await?;
            }
            // Only the IOMs this client's writes to the file touched since
            // the last fsync (their data and parity IOMs). Taken after the
            // send above, which waited for any flush of the file under way
            // (its IOMs are counted by then).
            let roles = self.nodes.lock().get_mut(&ino).map(|n| std::mem::take(&mut n.unsynced)).unwrap_or(0);
            if n.attr.kind == FileKind::Regular && roles != 0 {
                if let Err(e) = self.c.flush_roles(roles).await {
                    self.mark_unsynced(ino, roles);
                    return Err(errno(e));
                }
            }
            Ok(())
        };
        let meta = async {
            let only_mtime = self
                .nodes
                .lock()
                .get(&ino)
                .is_some_and(|n| n.dirty_end <= n.attr.size && n.meta_durable() && !n.has_times());
            if datasync && only_mtime {
                return Ok(());
            }
            self.publish_inner(ino, true, !overwrites).await
        };
        // Both run to their end: a failed publish must not drop the data
        // side with its bytes half sent or its IOMs taken from `unsynced`.
        let (data, meta) = futures::future::join(data, meta).await;
        data.and(meta)
    }

    /// posix_fallocate(3) (mode 0 only): the file grows to `offset + length`
    /// if it is shorter; blocks are not reserved.
    pub(super) async fn fallocate(&self, ino: Ino, offset: u64, length: u64, c: Caller) -> R<()> {
        self.publish(ino).await?;
        let n = self.known(ino).await?;
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        let set = if end > n.attr.size {
            SetAttr { size: Some(end), ..Default::default() }
        } else {
            SetAttr { ctime: Some(Timestamp::now()), ..Default::default() }
        };
        self.setattr(ino, set, c).await.map(|_| ())
    }

    pub(super) async fn readlink(&self, ino: Ino) -> R<Vec<u8>> {
        match self.meta(MetaReq::ReadLink { ino }).await? {
            MetaResp::Data(d) => Ok(d),
            _ => Err(wrong_reply()),
        }
    }
}

/// A flush whose future is dropped before its end (its caller was
/// cancelled) still ends: its bytes leave the buffer's count and the file
/// keeps EIO for its next fsync or close, as after any failed flush (some
/// of its writes may have reached the IOMs, some not).
struct SendEnd<'a> {
    wb: &'a super::writeback::WriteBack,
    ino: Ino,
    ended: bool,
}

impl Drop for SendEnd<'_> {
    fn drop(&mut self) {
        if !self.ended {
            tracing::error!(
                ino = self.ino.0,
                "a flush of buffered writes was cancelled; the file's next fsync or close reports EIO"
            );
            self.wb.sent(self.ino, Some(libc::EIO));
        }
    }
}

/// The `buffered` level: flushes of the write-back buffer (`writeback`).
impl Inner {
    /// Sends the buffered bytes of `ino` to the IOMs as `atomic` writes,
    /// one flush of a file at a time. An error is kept for the file's next
    /// fsync or close ([`Inner::flush_buffered`]) and its bytes dropped.
    pub(super) async fn send_buffered(&self, ino: Ino) {
        self.send_buffered_at(ino, Toughness::Atomic).await
    }

    /// `send_buffered` at `toughness`: `durable` for an fsync, whose
    /// bytes then need no flush of their IOMs afterwards.
    async fn send_buffered_at(&self, ino: Ino, toughness: Toughness) {
        if !self.wb.holds(ino) {
            return;
        }
        let gate = self.wb.gate(ino);
        let _one = gate.lock().await;
        let Some(b) = self.wb.take(ino) else { return };
        let mut ending = SendEnd { wb: &self.wb, ino, ended: false };
        let roles = b.runs.iter().fold(0u64, |m, (o, _, len)| m | self.c.write_roles(b.object, *o, *len));
        let mut sent = Ok(());
        let fresh_from = self.nodes.lock().get(&ino).map_or(u64::MAX, |n| n.attr.size);
        for wave in super::writeback::waves(b.runs) {
            sent = self.send_wave(b.session, b.object, &wave, fresh_from, toughness).await;
            if sent.is_err() {
                break;
            }
        }
        ending.ended = true;
        match sent {
            Ok(()) => {
                if toughness != Toughness::Durable {
                    self.mark_unsynced(ino, roles);
                }
                self.wb.sent(ino, None);
            }
            Err(e) => {
                tracing::error!(
                    ino = ino.0,
                    bytes = b.bytes,
                    "buffered writes could not be sent and are dropped; the file's next fsync or close \
                     reports it: {}",
                    std::io::Error::from_raw_os_error(e)
                );
                self.wb.sent(ino, Some(e));
            }
        }
    }

    /// One wave of a flush, sent only while the lease is trusted: if the
    /// trust runs out with the wave in flight, the wave is stopped on this
    /// side (so the client sends nothing more after the namespace could
    /// evict it), the lease renewed, and the wave sent again (the same
    /// bytes at the same offsets). An eviction meanwhile ends it with EIO,
    /// and so does a wave not done within the retries a write has
    /// (`stopped_wait_s`, at least 30 s), as any failed write.
    async fn send_wave(
        &self,
        session: u64,
        object: common::ObjectId,
        wave: &[(u64, bytes::Bytes)],
        fresh_from: u64,
        toughness: Toughness,
    ) -> Result<(), i32> {
        let give_up =
            Instant::now() + Duration::from_secs(self.c.cfg.tuning.stopped_wait_s).max(Duration::from_secs(30));
        loop {
            self.flush_lease(session).await?;
            let writes = self.c.write_runs(object, wave, toughness, fresh_from);
            let until = (Instant::now() + self.lease_left()).min(give_up);
            match tokio::time::timeout_at(until.into(), writes).await {
                Ok(r) => return r.map_err(|e| e.errno()),
                Err(_) if Instant::now() >= give_up => {
                    tracing::warn!("buffered writes not done within the writes' retries");
                    return Err(libc::EIO);
                }
                Err(_) => tracing::warn!(
                    "the lease's trust ran out with buffered writes in flight: stopped them, renewing before \
                     sending them again"
                ),
            }
        }
    }

    /// What a close does for `ino`: publishes its size (after its
    /// buffered bytes) and reports a flush error not reported yet.
    pub(super) async fn publish_and_report(&self, ino: Ino) -> R<()> {
        self.publish(ino).await?;
        self.flush_buffered(ino).await
    }

    /// Sends the buffered bytes of `ino` and reports the error of this or
    /// any earlier flush of it not reported yet (fsync, close).
    pub(super) async fn flush_buffered(&self, ino: Ino) -> R<()> {
        self.flush_buffered_at(ino, Toughness::Atomic).await
    }

    /// `flush_buffered`, sending at `toughness`.
    async fn flush_buffered_at(&self, ino: Ino, toughness: Toughness) -> R<()> {
        self.send_buffered_at(ino, toughness).await;
        match self.wb.take_error(ino) {
            Some(e) => Err(Errno::from_i32(e)),
            None => Ok(()),
        }
    }

    /// Before `len` more bytes of `ino` are buffered: flushes the file at
    /// its cap, and the largest files while the whole buffer is at its
    /// cap; the writer waits for those flushes.
    pub(super) async fn make_room(&self, ino: Ino, len: usize) {
        let caps = self.o.buffer;
        if self.wb.file_bytes(ino) + len > caps.per_file {
            self.send_buffered(ino).await;
        }
        while self.wb.total() + len > caps.total {
            match self.wb.largest() {
                Some(i) => self.send_buffered(i).await,
                // Only flushes under way fill it: wait for one to end.
                None => {
                    let _ = tokio::time::timeout(Duration::from_millis(100), self.wb.room.notified()).await;
                }
            }
        }
    }

    /// Sends and publishes every buffered file (`iomfs sync`, and the
    /// mount's stop); the first error is returned, after all were tried.
    pub async fn sync_all(&self) -> R<()> {
        let mut first = Ok(());
        for ino in self.wb.all() {
            let r = self.publish(ino).await;
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Background task: sends (and publishes) the files whose oldest
    /// buffered byte is older than the buffer's age limit.
    pub(super) async fn age_worker(self: std::sync::Arc<Self>) {
        let age = self.o.buffer.age;
        let every = (age / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = self.stopping.cancelled() => return,
            }
            for ino in self.wb.aged(age) {
                if let Err(e) = self.publish(ino).await {
                    tracing::debug!(ino = ino.0, "age flush: {e:?}");
                }
            }
        }
    }
}
