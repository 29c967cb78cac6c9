//! Small files read with their open. A read-only open of a small file
//! starts the read of its bytes beside the namespace's `Open`, so `cat`,
//! `diff -r`, `grep -r` and `tar c` wait for one round trip per small file
//! instead of two in series (open, then read).
//!
//! Why the bytes are right:
//! - the read is sent after the open began, so everything any client had
//!   closed before the open (close-to-open) is in them;
//! - they are kept only if the `Open` answer names the object they were
//!   read from, a size they cover and the change counter this client knew
//!   when it sent the read (else another client's close may lie between
//!   the read and the answer, and the pages filled from them would be
//!   older than the `opened_as` the next open compares with), and only for
//!   reads through that handle;
//! - they are served only while the file's attributes as this client knows
//!   them still carry that change counter (`attr.change` never goes back:
//!   `remember` keeps no older answer, and a namespace failover that does
//!   lower it moves `changed_at`, below). A later
//!   open, here or through another handle, that saw a newer counter ends
//!   them: the kernel's pages are shared by every handle, and an old
//!   handle must not refill them with old bytes;
//! - and only while this client has changed no data of the file since the
//!   read was sent: every handle opened for writing and every truncation
//!   (before it and again once it is done) moves the file's `changed_at`
//!   past the prefetch's generation, under the nodes lock the prefetch
//!   reads both under;
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
    /// The file's change counter as this client knew it then.
    change: u64,
    bytes: Shared<BoxFuture<'static, Option<Bytes>>>,
}

impl Inner {
    /// Starts reading the bytes of `ino` for a read-only open that is about
    /// to ask the namespace, when the file is small and this client holds
    /// nothing of its own for it.
    pub(super) fn start_prefetch(&self, ino: Ino) -> Option<Prefetch> {
        let (object, size, change, gen) = {
            let nodes = self.nodes.lock();
            let gen = self.data_gen.load(Ordering::Acquire);
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
            (a.object, a.size, a.change, gen)
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
        Some(Prefetch { ino, object, size, gen, change, bytes })
    }

    /// Keeps `p` for handle `fh` if the namespace's answer to the open
    /// (`attr`) is the file it was read for and the kernel will read.
    pub(super) fn keep_prefetch(&self, fh: u64, p: Prefetch, attr: &Attr, keep_cache: bool) {
        // A file that shrank meanwhile: its first `attr.size` bytes were
        // read after the open began, as a read after the open would be.
        if keep_cache || attr.object != p.object || attr.size > p.size || attr.change != p.change {
            return;
        }
        // Not if this client has seen a newer change already (another
        // open's answer, applied before this one).
        if self.nodes.lock().get(&p.ino).is_none_or(|n| n.attr.change != p.change) {
            return;
        }
        let mut held = self.prefetched.lock();
        if held.len() < MAX_HELD {
            held.insert(fh, p);
        }
    }

    /// Bytes `offset..offset + len` of the file through handle `fh`, from
    /// its prefetch, if it has one and it is still right.
    pub(super) async fn prefetched(&self, fh: u64, ino: Ino, offset: u64, len: usize) -> Option<Bytes> {
        let p = self.prefetched.lock().get(&fh).cloned()?;
        let fresh = || {
            self.nodes.lock().get(&ino).is_some_and(|n| {
                n.changed_at <= p.gen
                    && n.writers == 0
                    && n.dirty_end == 0
                    && n.attr.object == p.object
                    && n.attr.change == p.change
            })
        };
        let usable = if p.ino == ino && offset + len as u64 <= p.size && fresh() {
            // Fresh again once the bytes are here: a handle opened for
            // writing while the read was on its way ends them too.
            p.bytes.clone().await.filter(|b| b.len() as u64 == p.size && fresh())
        } else {
            None
        };
        let Some(b) = usable else {
            self.drop_prefetch(fh);
            metrics::counter!("iomfs_client_prefetch_total", "outcome" => "dropped").increment(1);
            return None;
        };
        metrics::counter!("iomfs_client_prefetch_total", "outcome" => "used").increment(1);
        if offset + len as u64 == p.size {
            // Read to the end (`cat` reads a small file at once): its slot
            // is free for another file; a later read goes to the IOMs.
            self.drop_prefetch(fh);
        }
        Some(b.slice(offset as usize..offset as usize + len))
    }

    pub(super) fn drop_prefetch(&self, fh: u64) {
        self.prefetched.lock().remove(&fh);
    }

    /// This client is about to change the data of `ino` (a handle opened
    /// for writing, a truncation): no prefetch sent before now may serve
    /// it any more.
    pub(super) fn data_changing(&self, ino: Ino) {
        let mut nodes = self.nodes.lock();
        let g = self.next_data_gen();
        if let Some(n) = nodes.get_mut(&ino) {
            n.changed_at = g;
        }
    }

    /// The next data generation; call with the nodes lock held.
    pub(super) fn next_data_gen(&self) -> u64 {
        self.data_gen.fetch_add(1, Ordering::AcqRel) + 1
    }
}
