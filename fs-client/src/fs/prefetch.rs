//! Small files read with their open. A read-only open of a small file
//! starts the read of its bytes beside the namespace's `Open`, so `cat`,
//! `diff -r`, `grep -r` and `tar c` wait for one round trip per small file
//! instead of two in series (open, then read).
//!
//! Why the bytes are right:
//! - the read is sent after the open began, so everything any client had
//!   closed before the open (close-to-open) is in them;
//! - they are kept only if the `Open` answer names the object they were
//!   read from and a size they cover, and only for reads through that
//!   handle;
//! - they are served only while this client has changed no data of the
//!   file since the read was sent: every handle opened for writing and
//!   every truncation first moves the file's `changed_at` past the
//!   prefetch's generation (`data_changing`);
//! - the kernel's own pages are not in the way: a file unchanged since this
//!   client's last open keeps them (`FOPEN_KEEP_CACHE`) and is not
//!   prefetched; otherwise the kernel dropped them at the open.

use super::Inner;
use bytes::Bytes;
use common::meta::{Attr, FileKind};
use common::{Ino, ObjectId};
use futures::future::{BoxFuture, FutureExt, Shared};
use std::sync::atomic::Ordering;

/// Files of up to one block: one data IOM answers the read.
const PREFETCH_MAX: u64 = 65536;
/// Prefetched files held at once (at most 16 MiB of bytes).
const MAX_HELD: usize = 256;

#[derive(Clone)]
pub(super) struct Prefetch {
    ino: Ino,
    object: ObjectId,
    /// Bytes read: the size this client knew at the open.
    size: u64,
    /// `Inner::data_gen` when the read was sent.
    gen: u64,
    bytes: Shared<BoxFuture<'static, Option<Bytes>>>,
}

impl Inner {
    /// Starts reading the bytes of `ino` for a read-only open that is about
    /// to ask the namespace, when the file is small and this client holds
    /// nothing of its own for it.
    pub(super) fn start_prefetch(&self, ino: Ino) -> Option<Prefetch> {
        let gen = self.data_gen.load(Ordering::Acquire);
        let (object, size) = {
            let nodes = self.nodes.lock();
            let n = nodes.get(&ino)?;
            let a = &n.attr;
            if a.kind != FileKind::Regular
                || a.size == 0
                || a.size > PREFETCH_MAX
                || n.writers > 0
                || n.dirty_end > 0
                || n.changed_at > gen
                // Unchanged since this client's last open: the kernel keeps
                // its pages and may not read at all.
                || n.opened_as == Some((a.change, a.object, a.size))
            {
                return None;
            }
            (a.object, a.size)
        };
        if self.prefetched.lock().len() >= MAX_HELD {
            return None;
        }
        let (mut tx, rx) = tokio::sync::oneshot::channel();
        let c = self.c.clone();
        let stopping = self.stopping.clone();
        self.tasks.spawn(async move {
            // Not read on for a handle already closed, or past the unmount.
            tokio::select! {
                r = c.read(object, 0, size as usize) => {
                    let _ = tx.send(r.ok());
                }
                _ = tx.closed() => {}
                _ = stopping.cancelled() => {}
            }
        });
        let bytes = async move { rx.await.ok().flatten() }.boxed().shared();
        Some(Prefetch { ino, object, size, gen, bytes })
    }

    /// Keeps `p` for handle `fh` if the namespace's answer to the open
    /// (`attr`) is the file it was read for and the kernel will read.
    pub(super) fn keep_prefetch(&self, fh: u64, p: Prefetch, attr: &Attr, keep_cache: bool) {
        // A file that shrank meanwhile: its first `attr.size` bytes were
        // read after the open began, as a read after the open would be.
        if !keep_cache && attr.object == p.object && attr.size <= p.size {
            self.prefetched.lock().insert(fh, p);
        }
    }

    /// Bytes `offset..offset + len` of the file through handle `fh`, from
    /// its prefetch, if it has one and it is still right.
    pub(super) async fn prefetched(&self, fh: u64, ino: Ino, offset: u64, len: usize) -> Option<Bytes> {
        let p = self.prefetched.lock().get(&fh).cloned()?;
        let fresh = || {
            self.nodes.lock().get(&ino).is_some_and(|n| {
                n.changed_at <= p.gen && n.writers == 0 && n.dirty_end == 0 && n.attr.object == p.object
            })
        };
        if p.ino != ino || offset + len as u64 > p.size || !fresh() {
            self.drop_prefetch(fh);
            metrics::counter!("iomfs_client_prefetch_total", "outcome" => "dropped").increment(1);
            return None;
        }
        let got = p.bytes.clone().await;
        // A handle opened for writing while the read was on its way.
        let Some(b) = got.filter(|b| b.len() as u64 == p.size && fresh()) else {
            self.drop_prefetch(fh);
            metrics::counter!("iomfs_client_prefetch_total", "outcome" => "dropped").increment(1);
            return None;
        };
        metrics::counter!("iomfs_client_prefetch_total", "outcome" => "used").increment(1);
        Some(b.slice(offset as usize..offset as usize + len))
    }

    pub(super) fn drop_prefetch(&self, fh: u64) {
        self.prefetched.lock().remove(&fh);
    }

    /// This client is about to change the data of `ino` (a handle opened
    /// for writing, a truncation): no prefetch sent before now may serve
    /// it any more.
    pub(super) fn data_changing(&self, ino: Ino) {
        let g = self.data_gen.fetch_add(1, Ordering::AcqRel) + 1;
        if let Some(n) = self.nodes.lock().get_mut(&ino) {
            n.changed_at = g;
        }
    }
}
