//! Reads, snapshot reads for reconstruction and scrub, durability barriers
//! and dropping the data of dead objects.

use crate::cache::CacheKey;
use crate::data::DataSide;
use crate::journal::Wait;
use crate::records::{Record, VerRef};
use crate::storage::healable;
use crate::Error;
use bytes::Bytes;
use common::wire::{BlockInfo, GroupInfo};
use common::{codec, BlockKey, GroupKey, GroupNo, ObjectId, Version};
use std::sync::Arc;

impl DataSide {
    /// The newest version of a block, `[offset, offset+len)`; bytes past
    /// the returned payload are zeros. Never touches parity.
    pub async fn read_block(self: &Arc<Self>, key: BlockKey, offset: u32, len: u32) -> Result<(Version, Bytes), Error> {
        // A block whose unfinished transaction recovery has not resolved may
        // still roll back: do not show its new version yet.
        self.fence.wait(&key).await;
        let mut tries = 0;
        loop {
            let head = self.storage.map.head(&key);
            match self.storage.read_data(key, head).await {
                Ok(b) => {
                    let start = (offset as usize).min(b.len());
                    let end = (offset as usize + len as usize).min(b.len());
                    return Ok((head.version, b.slice(start..end)));
                }
                // The version may have been superseded and its slot reused
                // while we read it: try again with the new head.
                Err(Error::Corrupt(m)) if tries < 3 && self.storage.map.head(&key).version != head.version => {
                    tries += 1;
                    tracing::debug!("read raced a write: {m}");
                }
                Err(e) if healable(&e) && tries < 3 => {
                    tries += 1;
                    let _g = self.locks.lock(key).await;
                    if self.storage.map.head(&key) != head {
                        continue;
                    }
                    let b = self.heal_block(key, head, e).await?;
                    let start = (offset as usize).min(b.len());
                    let end = (offset as usize + len as usize).min(b.len());
                    return Ok((head.version, b.slice(start..end)));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Before a multi-block read: the newest versions of `keys` read from
    /// disk together where their slots are adjacent (`Storage::prefetch_data`).
    pub async fn prefetch(&self, keys: impl Iterator<Item = BlockKey>) {
        let blocks = keys.map(|k| (k, self.storage.map.head(&k))).collect();
        self.storage.prefetch_data(blocks).await;
    }

    /// A specific version of a block, if it is still kept.
    pub async fn read_version(&self, key: BlockKey, v: Version) -> Result<Bytes, Error> {
        let Some(vr) = self.storage.map.version(&key, v) else {
            return Err(Error::VersionGone(format!("object {} block {} version {}", key.object, key.block, v.0)));
        };
        self.storage.read_data(key, vr).await
    }

    /// Self-healing read (the caller holds the block's lock): version `bad`
    /// of `key` failed its checksum or could not be read from this IOM's
    /// disk. Its bytes are rebuilt from the group (parity XOR the other
    /// members at the versions the parity covers), checked against the
    /// checksum the version was written with, written to a new slot and
    /// journaled (`Repaired`) before they are returned. Without a whole
    /// group, or when the rebuilt bytes do not match, the original error
    /// stands: a wrong byte is never returned.
    pub(crate) async fn heal_block(self: &Arc<Self>, key: BlockKey, bad: VerRef, why: Error) -> Result<Bytes, Error> {
        let errors = self.disk_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let r = self.heal_block_now(key, bad, why).await;
        let limit = self.disk_errors_before_stop;
        if limit > 0 && errors >= limit {
            // The answer is ready (rebuilt, or the error): the journal has
            // the repairs. A disk failing this often is retired, not
            // patched: the proxy serves its role until it is replaced.
            self.storage.journal.flush().await;
            let e = std::io::Error::other(format!(
                "{errors} read errors or checksum mismatches (tuning.disk_errors_before_stop = {limit}); \
                 replace the disk with `iomfs replace`"
            ));
            crate::fsutil::fail_stop("this IOM's disk", &e);
        }
        r
    }

    async fn heal_block_now(self: &Arc<Self>, key: BlockKey, bad: VerRef, why: Error) -> Result<Bytes, Error> {
        let g = self.layout.group_key(key);
        if !self.group.is_whole(g) {
            return Err(why);
        }
        tracing::error!(
            iom = self.me.0,
            object = key.object.0,
            block = key.block.0,
            version = bad.version.0,
            "block unreadable ({why}); rebuilding it from its group"
        );
        let (v, rebuilt) = match self.group.reconstruct(key, Some(bad.version)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(iom = self.me.0, object = key.object.0, block = key.block.0, "cannot rebuild: {e}");
                return Err(why);
            }
        };
        let mut bytes = rebuilt.to_vec();
        if v != bad.version || bytes.len() > bad.len as usize {
            return Err(why);
        }
        bytes.resize(bad.len as usize, 0);
        if codec::crc(&bytes) != bad.crc {
            tracing::error!(
                iom = self.me.0,
                object = key.object.0,
                block = key.block.0,
                "the block rebuilt from its group does not match its checksum: not repaired"
            );
            return Err(why);
        }
        let bytes = Bytes::from(bytes);
        let addr = self.storage.store.alloc()?;
        if let Err(e) = self.storage.store.write(addr, &bytes) {
            self.storage.store.free(addr);
            return Err(e);
        }
        let good = VerRef { addr: Some(addr), ..bad };
        if let Some(d) = self.storage.commit(&Record::Repaired { key, bad, good }, true, Wait::Durable) {
            let _ = d.await;
        }
        self.storage.cache.put(CacheKey::Data(key, bad.version), bytes.clone());
        self.repairs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::warn!(
            iom = self.me.0,
            object = key.object.0,
            block = key.block.0,
            version = bad.version.0,
            "block repaired from its group"
        );
        Ok(bytes)
    }

    /// Durability barrier: every write answered so far is on stable storage.
    pub async fn flush(&self) -> Result<(), Error> {
        // Transactions in flight would wait for lazy syncs (a11 here, b11 of
        // parity batches) up to the flush interval: for the next moments
        // they are synced at once. Everything answered so far is either a
        // record written before `pos` or a transaction in flight, durable
        // once it reaches `Durable` (its a11 synced, the parity IOM reported
        // b12). The syncs on the way usually cover `pos` already, so the
        // last step rarely costs a sync of its own.
        self.storage.journal.hurry(self.timeouts.flush_hurry);
        let pos = self.storage.journal.position();
        // Parity batches already queued lazily (b11) are synced now.
        drop(self.storage.journal.flush_request());
        self.inflight.wait_durable().await?;
        if let Some(d) = self.storage.journal.durable_at(pos) {
            let _ = d.await;
        }
        Ok(())
    }

    /// Drops this IOM's data and parity blocks of `object` in groups >= `from`.
    pub async fn drop_object(self: &Arc<Self>, object: ObjectId, from: GroupNo) -> Result<(), Error> {
        // Let transactions on the object finish first: their writers get
        // their answers. The map forgets any still open when the drop is
        // applied (their later records free nothing twice), so a
        // transaction that cannot finish (a peer down) delays the drop by
        // at most a minute, never for ever.
        let first = from.0 * self.layout.n() as u64;
        let deadline = tokio::time::Instant::now() + self.timeouts.drop_wait_max;
        loop {
            // Armed before the check, so a transaction closing in between
            // is not missed.
            let closed = self.storage.map.txs_closed.notified();
            let busy = self.storage.map.dtx.lock().values().any(|t| t.key.object == object && t.key.block.0 >= first)
                || self
                    .storage
                    .map
                    .ptx
                    .lock()
                    .values()
                    .any(|t| t.group.object == object && t.group.group >= from && t.applied.is_none());
            if !busy || tokio::time::timeout_at(deadline, closed).await.is_err() {
                break;
            }
        }
        let w = self.storage.commit(&Record::Dropped { object, from }, false, Wait::Written);
        if let Some(w) = w {
            let _ = w.await;
        }
        Ok(())
    }

    pub fn list_blocks(&self, after: Option<BlockKey>, limit: u32) -> Vec<BlockInfo> {
        self.storage
            .map
            .list_data(after, limit.min(common::wire::MAX_LIST_ENTRIES) as usize)
            .into_iter()
            .map(|(key, e)| {
                let h = e.head();
                BlockInfo { key, version: h.version, len: h.len, crc: h.crc }
            })
            .collect()
    }

    pub fn list_groups(&self, after: Option<GroupKey>, limit: u32) -> Vec<GroupInfo> {
        self.storage
            .map
            .list_parity(after, limit.min(common::wire::MAX_LIST_ENTRIES) as usize)
            .into_iter()
            .map(|(key, e)| GroupInfo { key, versions: e.head.members, len: e.head.len, crc: e.head.crc })
            .collect()
    }
}
