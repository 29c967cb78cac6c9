//! The open-handle table and the session at the namespace that keeps the
//! handles' files alive: open, release (batched to the namespace as
//! `ReleaseMany`), and the lease renewals that list this client's open
//! handles.
//!
//! Invariants: a closed handle leaves `handles` and joins `releases` in one
//! step, so a renewal always lists it in one of the two; renewals and
//! releases go out one at a time (the `session` lock), so the namespace
//! never takes a list older than a release it already had; a handle's data
//! is used only within `LEASE_TRUST` of a lease after a renewal the
//! namespace answered, and a file the namespace reclaimed while the session
//! had lapsed answers ESTALE.

use super::{errno, wrong_reply, Inner, R};
use common::meta::*;
use common::Ino;
use fuser::{Errno, FileHandle, FopenFlags};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub(super) struct Handle {
    pub(super) ino: Ino,
    pub(super) write: bool,
    /// O_SYNC / O_DSYNC: every write is durable.
    pub(super) sync: bool,
}

impl Inner {
    fn new_handle(&self, ino: Ino, write: bool, sync: bool) -> FileHandle {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        self.handles.lock().insert(fh, Handle { ino, write, sync });
        let mut nodes = self.nodes.lock();
        // A writer's count and the data change it announces go together,
        // under the lock a prefetch looks at both under (`prefetch`).
        let changed = write.then(|| self.next_data_gen());
        if let Some(n) = nodes.get_mut(&ino) {
            n.opens += 1;
            if let Some(g) = changed {
                n.writers += 1;
                n.changed_at = g;
            }
        }
        FileHandle(fh)
    }

    pub(super) async fn open(&self, ino: Ino, flags: i32) -> R<(FileHandle, FopenFlags)> {
        let acc = flags & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        if write && self.o.read_only {
            return Err(Errno::EROFS);
        }
        let truncate = flags & libc::O_TRUNC != 0 && write;
        let sync = flags & (libc::O_SYNC | libc::O_DSYNC) != 0;
        if truncate {
            // Writes buffered before the truncation land before it.
            self.send_buffered(ino).await;
            if let Some(n) = self.nodes.lock().get_mut(&ino) {
                n.dirty_end = 0;
                n.dirty_mtime = None;
                n.mtime_set = None;
            }
        } else {
            self.publish(ino).await?;
        }
        let before = self.node(ino).and_then(|n| n.opened_as);
        let pre = if write { None } else { self.start_prefetch(ino) };
        let attr = match self.meta(MetaReq::Open { ino, truncate }).await? {
            MetaResp::Opened { attr, .. } => attr,
            _ => return Err(wrong_reply()),
        };
        let now_as = (attr.change, attr.object, attr.size);
        let keep = before == Some(now_as) && !truncate;
        self.remember(&attr);
        if let Some(n) = self.nodes.lock().get_mut(&ino) {
            n.opened_as = Some(now_as);
        }
        let fh = self.new_handle(ino, write, sync);
        if let Some(p) = pre {
            self.keep_prefetch(fh.0, p, &attr, keep);
        }
        let mut f = if keep { FopenFlags::FOPEN_KEEP_CACHE } else { FopenFlags::empty() };
        if !write {
            // A read-only descriptor has nothing of its own to send at
            // close: no FLUSH round trip for it (one per file for `cat`,
            // `diff -r`, `tar c`), and a flush error of a writer of this
            // file stays for that writer's own close or fsync to report.
            f |= FopenFlags::FOPEN_NOFLUSH;
        }
        Ok((fh, f))
    }

    pub(super) async fn release(&self, fh: u64) -> R<()> {
        self.drop_prefetch(fh);
        // Buffered bytes go before the release is queued: once the
        // namespace has the release, an unlinked file's object may be
        // dropped, and bytes sent after that would land nowhere.
        let writer = self.handles.lock().get(&fh).filter(|h| h.write).map(|h| h.ino);
        if let Some(ino) = writer {
            self.send_buffered(ino).await;
        }
        // The handle leaves `handles` and joins `releases` in one step: a
        // renewal lists it in one of the two, never in neither.
        let Some(h) = ({
            let mut handles = self.handles.lock();
            let h = handles.remove(&fh);
            if let Some(h) = &h {
                self.releases.lock().push(h.ino);
            }
            h
        }) else {
            return Ok(());
        };
        let last_writer = {
            let mut nodes = self.nodes.lock();
            match nodes.get_mut(&h.ino) {
                Some(n) => {
                    n.opens = n.opens.saturating_sub(1);
                    if h.write {
                        n.writers = n.writers.saturating_sub(1);
                    }
                    n.writers == 0
                }
                None => true,
            }
        };
        let published = if last_writer { self.publish_and_report(h.ino).await } else { Ok(()) };
        self.release_kick.notify_one();
        published
    }

    /// Sends the releases queued so far.
    pub async fn send_releases(&self) {
        let _turn = self.session.lock().await;
        let inos = std::mem::take(&mut *self.releases.lock());
        if inos.is_empty() {
            return;
        }
        if let Err(e) = self.meta(MetaReq::ReleaseMany { inos: inos.clone() }).await {
            // Kept for the next batch: a release lost would keep its file
            // for as long as this mount lives.
            tracing::warn!("release of closed handles not recorded by the namespace (retried): {e:?}");
            let mut r = self.releases.lock();
            let later = std::mem::replace(&mut *r, inos);
            r.extend(later);
        }
    }

    /// Ends the mount's background work (after the unmount): the workers
    /// stop, every task still answering a request finishes, then the
    /// releases still queued go out. False if some task was still running
    /// after `within`.
    pub async fn stop(&self, within: Duration) -> bool {
        if tokio::time::timeout(within, self.sync_all()).await.is_err() {
            tracing::error!("stopping with buffered writes not sent");
        }
        self.stopping.cancel();
        self.tasks.close();
        let joined = tokio::time::timeout(within, self.tasks.wait()).await.is_ok();
        if !joined {
            tracing::warn!(tasks = self.tasks.len(), "stopping with tasks still running");
        }
        let _ = tokio::time::timeout(within, self.send_releases()).await;
        joined
    }

    /// Background task: releases go out in batches.
    pub(super) async fn release_worker(self: Arc<Self>) {
        loop {
            // A kick, or once a second (releases kept after a failure).
            // Stopping only here, between batches: a batch taken from the
            // queue is sent whole (`stop` sends what is left).
            tokio::select! {
                _ = self.release_kick.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.stopping.cancelled() => return,
            }
            // Collect the releases of a burst of closes.
            tokio::time::sleep(Duration::from_millis(2)).await;
            self.send_releases().await;
        }
    }

    /// Background task: renews the lease every third of it, whether or not
    /// other requests did (sooner after a failure).
    pub(super) async fn renew_worker(self: Arc<Self>) {
        loop {
            let every = self.c.cfg.client_lease() / 3;
            let wait = match self.renew().await {
                Ok(()) => every,
                Err(e) => {
                    tracing::debug!("lease renewal failed: {e:?}");
                    every.min(Duration::from_secs(1))
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.stopping.cancelled() => return,
            }
        }
    }

    /// Renews the lease with this client's open handles — those closed but
    /// not yet reported count too, as their release follows (and subtracts
    /// them). The namespace takes the list into a session it does not know
    /// yet (after its own restart or failover, or the session's expiry);
    /// handles of files it names as gone become stale.
    async fn renew(&self) -> R<()> {
        self.renew_unless(false).await
    }

    /// [`Inner::renew`]; with `if_stale`, nothing if another renewal made
    /// the lease trusted while this one waited its turn.
    async fn renew_unless(&self, if_stale: bool) -> R<()> {
        let _turn = self.session.lock().await;
        if if_stale && !self.lease_left().is_zero() {
            return Ok(());
        }
        let mut opens: HashMap<Ino, u32> = HashMap::new();
        {
            let handles = self.handles.lock();
            let releases = self.releases.lock();
            for ino in handles.values().map(|h| h.ino).chain(releases.iter().copied()) {
                *opens.entry(ino).or_default() += 1;
            }
        }
        let opens: Vec<(Ino, u32)> = opens.into_iter().collect();
        let sent = Instant::now();
        let (expired, missing) = match self.c.meta(MetaReq::Renew { opens }).await.map_err(errno)? {
            MetaResp::Renewed { expired, missing, .. } => (expired, missing),
            _ => return Err(wrong_reply()),
        };
        if expired || !missing.is_empty() {
            tracing::error!(
                stale = missing.len(),
                "this client's session at the namespace had expired (no contact for a whole lease); \
                 files it held open after their unlink were reclaimed, and their handles now answer ESTALE"
            );
        }
        // The last renewal this client saw answered was sent more than a
        // lease before this one: whichever replica served the namespace
        // meanwhile may have ended the session, and a replica that took the
        // namespace over since (a failover during the cut) knows no
        // sessions and cannot say so. Bytes buffered under it are treated
        // as after an eviction either way.
        let lapsed =
            self.claimed.lock().is_some_and(|t| sent.saturating_duration_since(t) >= self.c.cfg.client_lease());
        if lapsed && !expired {
            tracing::error!(
                lease_s = self.c.cfg.client_lease().as_secs(),
                "no renewal of this client's lease was answered for longer than the lease: its session may have \
                 been ended by a namespace server that has failed over since"
            );
        }
        if expired || lapsed {
            // Evicted: other clients may have written since, and bytes
            // buffered under the lapsed session must not overwrite theirs.
            let (files, bytes) = self.wb.evicted(libc::EIO);
            if files > 0 {
                tracing::error!(
                    files,
                    bytes,
                    "buffered bytes not sent before this client was evicted are dropped; each file's next \
                     fsync or close reports EIO"
                );
            }
        }
        self.stale.lock().extend(missing);
        let mut c = self.claimed.lock();
        *c = Some(c.map_or(sent, |t| t.max(sent)));
        Ok(())
    }

    /// How long the lease is still trusted (zero when it is not).
    pub(super) fn lease_left(&self) -> Duration {
        let trust = self.c.cfg.client_lease().mul_f64(crate::cluster::LEASE_TRUST);
        self.claimed.lock().map_or(Duration::ZERO, |t| trust.saturating_sub(t.elapsed()))
    }

    /// Before buffered bytes taken under session `session` (see
    /// `WriteBack::session`) are sent: the lease must be trusted (renewed
    /// first if not) and the session the same. EIO otherwise: the
    /// namespace may have evicted this client, or did. A renewal that fails
    /// has been retried for `stopped_wait_s` (the namespace unreachable that
    /// long, past any lease): the bytes are dropped like after any flush
    /// that failed past its retries.
    pub(super) async fn flush_lease(&self, session: u64) -> Result<(), i32> {
        if self.lease_left().is_zero() {
            self.renew_unless(true).await.map_err(|e| {
                tracing::warn!("lease not renewed before a flush of buffered bytes: {e:?}");
                libc::EIO
            })?;
        }
        if self.wb.session() != session {
            return Err(libc::EIO);
        }
        Ok(())
    }

    /// Before and after a handle's data is used: only within `LEASE_TRUST`
    /// of a lease after a renewal is the file surely kept for this client
    /// (else it may have been reclaimed, and its blocks may be another
    /// file's by now); otherwise renew first.
    pub(super) async fn session_ok(&self, ino: Ino) -> R<()> {
        let trust = self.c.cfg.client_lease().mul_f64(crate::cluster::LEASE_TRUST);
        if !self.claimed.lock().is_some_and(|t| t.elapsed() < trust) {
            self.renew().await?;
        }
        if self.stale.lock().contains(&ino) {
            return Err(Errno::ESTALE);
        }
        Ok(())
    }

    /// create(2): a new regular file, opened with the open(2) `flags`.
    pub(super) async fn create_open(
        &self,
        parent: Ino,
        nm: Vec<u8>,
        perm: u16,
        caller: Caller,
        flags: i32,
    ) -> R<(Attr, FileHandle)> {
        let a = self
            .create(parent, nm, NewNode { kind: FileKind::Regular, perm, rdev: 0, target: None }, caller, true)
            .await?;
        let acc = flags & libc::O_ACCMODE;
        let write = acc == libc::O_WRONLY || acc == libc::O_RDWR;
        let fh = self.new_handle(a.ino, write, flags & (libc::O_SYNC | libc::O_DSYNC) != 0);
        Ok((a, fh))
    }
}
