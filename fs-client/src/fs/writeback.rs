//! The `buffered` level's write-back buffer: `write()` of a `buffered`
//! file returns once its bytes are here; a flush sends them to the IOMs as
//! `atomic` writes (an fsync sends bytes that do not grow the file as
//! `durable` ones), all the runs of a wave as one write
//! (`ClusterClient::write_runs`: a block's pieces are one transaction).
//!
//! A file's bytes are flushed before anything that would let another
//! client or the kernel see past them: before its size is published
//! (close, fsync, the age flush — see `inodes::publish_and`), before a
//! write at another level, a truncation or an `open(O_TRUNC)` of it; when
//! the file or the whole buffer reaches its cap (the writer waits for that
//! flush); and when the oldest unsent byte is `age` old. Only the ranges
//! the application wrote are kept and sent, never bytes read from the
//! cluster, so a flush cannot overwrite another client's newer data
//! outside them.
//!
//! Invariants: the ranges of a file never overlap (a newer write replaces
//! the bytes it covers); a read sees, over the cluster's bytes, first the
//! ranges being sent and then the unsent ones (newest last), so a read
//! never goes back to older bytes while a flush is on its way; one flush
//! per file at a time (its `gate`), so an older flush never lands after a
//! newer one; an error of a flush nobody waited for (age, cap, another
//! file's cap) is kept and returned by the file's next fsync or close,
//! after which its bytes are dropped (as the kernel's page cache does after
//! a writeback error).

use bytes::{Bytes, BytesMut};
use common::{Ino, ObjectId};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The buffer's limits (mount options `buffer_mb`, `buffer_file_mb`,
/// `buffer_age`).
#[derive(Clone, Copy, Debug)]
pub struct BufferCaps {
    /// Unsent bytes of every file together.
    pub total: usize,
    /// Unsent bytes of one file.
    pub per_file: usize,
    /// The oldest unsent byte of a file is sent within this.
    pub age: Duration,
}

impl Default for BufferCaps {
    fn default() -> Self {
        BufferCaps { total: 256 << 20, per_file: 96 << 20, age: Duration::from_secs(1) }
    }
}

/// Largest run of contiguous bytes sent in one cluster write.
const RUN_MAX: usize = 4 << 20;
/// A flush sends its runs in waves of at most this many bytes (and
/// `WAVE_RUNS` runs) in flight at once, a wave after the one before: small
/// scattered runs go in parallel (one at a time they would run at network
/// latency), while a burst of many MiB in flight could outrun the IOMs'
/// space reserve on a nearly full disk (docs/architecture.md, "A nearly
/// full disk under a burst").
const WAVE_BYTES: usize = 4 << 20;
const WAVE_RUNS: usize = 256;

#[derive(Default)]
struct FileBuf {
    object: Option<ObjectId>,
    /// Unsent bytes by offset; never overlapping.
    dirty: BTreeMap<u64, Bytes>,
    dirty_bytes: usize,
    /// Taken by the flush under way: still overlaid on reads until the
    /// cluster has them.
    sending: BTreeMap<u64, Bytes>,
    sending_bytes: usize,
    /// When the oldest unsent byte was written.
    since: Option<Instant>,
    /// The errno of a flush nobody waited for.
    error: Option<i32>,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl FileBuf {
    fn is_empty(&self) -> bool {
        self.dirty.is_empty() && self.sending.is_empty() && self.error.is_none()
    }
}

/// What a flush must send: contiguous runs, not joined yet (`waves`).
pub(super) struct Batch {
    pub(super) object: ObjectId,
    pub(super) runs: Vec<Run>,
    pub(super) bytes: usize,
    /// The session the bytes were buffered under (`WriteBack::session`).
    pub(super) session: u64,
}

#[derive(Default)]
pub(super) struct WriteBack {
    /// The files, and how many times this client was evicted (its
    /// session at the namespace ended): bytes taken for a flush carry the
    /// count, read and raised (`evicted`) only under the `files` lock,
    /// so bytes buffered before an eviction are never sent after it.
    files: Mutex<HashMap<Ino, FileBuf>>,
    session: std::sync::atomic::AtomicU64,
    /// Unsent and sending bytes of every file.
    total: Mutex<usize>,
    pub(super) room: tokio::sync::Notify,
}

/// Puts `data` at `off` into `map`, replacing the bytes it covers; returns
/// the change in the map's byte count.
fn insert(map: &mut BTreeMap<u64, Bytes>, off: u64, data: Bytes) -> isize {
    let end = off + data.len() as u64;
    let mut delta = data.len() as isize;
    // Ranges that start before `end` and end after `off` overlap.
    let overlapping: Vec<u64> =
        map.range(..end).rev().take_while(|(&o, b)| o + b.len() as u64 > off).map(|(&o, _)| o).collect();
    for o in overlapping {
        let b = map.remove(&o).expect("listed");
        delta -= b.len() as isize;
        let b_end = o + b.len() as u64;
        if o < off {
            let head = b.slice(..(off - o) as usize);
            delta += head.len() as isize;
            map.insert(o, head);
        }
        if b_end > end {
            let tail = b.slice((end - o) as usize..);
            delta += tail.len() as isize;
            map.insert(end, tail);
        }
    }
    map.insert(off, data);
    delta
}

/// Copies the parts of `map` inside `[off, off + out.len())` over `out`.
fn overlay(map: &BTreeMap<u64, Bytes>, off: u64, out: &mut [u8]) {
    let end = off + out.len() as u64;
    let first = map.range(..=off).next_back().map(|(&o, _)| o).unwrap_or(off);
    for (&o, b) in map.range(first..end) {
        let (s, e) = (o.max(off), (o + b.len() as u64).min(end));
        if s < e {
            out[(s - off) as usize..(e - off) as usize].copy_from_slice(&b[(s - o) as usize..(e - o) as usize]);
        }
    }
}

/// A run before its parts are joined: its offset, its parts in order, and
/// its length.
pub(super) type Run = (u64, Vec<Bytes>, usize);

/// Cuts the contiguous ranges of `map` into runs of at most `RUN_MAX`
/// (nothing copied: the parts are shared).
fn runs(map: BTreeMap<u64, Bytes>) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for (o, b) in map {
        match out.last_mut() {
            Some((start, parts, len)) if *start + *len as u64 == o && *len + b.len() <= RUN_MAX => {
                *len += b.len();
                parts.push(b);
            }
            _ => out.push((o, vec![b.clone()], b.len())),
        }
    }
    out
}

/// A run's parts as one buffer (copied only when there are several).
fn join((o, parts, len): Run) -> (u64, Bytes) {
    if parts.len() == 1 {
        return (o, parts.into_iter().next().expect("one"));
    }
    let mut m = BytesMut::with_capacity(len);
    for p in parts {
        m.extend_from_slice(&p);
    }
    (o, m.freeze())
}

/// Splits a flush's runs into waves (see `WAVE_BYTES`), each joined only
/// when the flush reaches it: a flush holds the joined copies of one wave
/// at a time, not of everything it sends (whose parts the buffer keeps
/// anyway, for reads, until the flush ends).
pub(super) fn waves(runs: Vec<Run>) -> impl Iterator<Item = Vec<(u64, Bytes)>> {
    let mut out: Vec<Vec<Run>> = Vec::new();
    let mut bytes = 0;
    for r in runs {
        let fits = out.last().is_some_and(|w| w.len() < WAVE_RUNS && bytes + r.2 <= WAVE_BYTES);
        if !fits {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += r.2;
        out.last_mut().expect("a wave").push(r);
    }
    out.into_iter().map(|w| w.into_iter().map(join).collect())
}

impl WriteBack {
    /// Unsent and sending bytes of every file.
    pub(super) fn total(&self) -> usize {
        *self.total.lock()
    }

    /// Unsent bytes of `ino`.
    pub(super) fn file_bytes(&self, ino: Ino) -> usize {
        self.files.lock().get(&ino).map_or(0, |f| f.dirty_bytes)
    }

    /// Whether `ino` has bytes not yet on the IOMs (or an error to report).
    pub(super) fn holds(&self, ino: Ino) -> bool {
        self.files.lock().get(&ino).is_some_and(|f| !f.is_empty())
    }

    /// Keeps `data` at `off` of `ino` (whose object is `object`).
    pub(super) fn put(&self, ino: Ino, object: ObjectId, off: u64, data: Bytes) {
        let mut files = self.files.lock();
        let f = files.entry(ino).or_default();
        f.object = Some(object);
        let d = insert(&mut f.dirty, off, data);
        f.dirty_bytes = (f.dirty_bytes as isize + d) as usize;
        f.since.get_or_insert_with(Instant::now);
        let mut t = self.total.lock();
        *t = (*t as isize + d) as usize;
    }

    /// `buf` (the cluster's bytes at `off` of `ino`) with this client's
    /// unsent and sending bytes over them.
    pub(super) fn read_over(&self, ino: Ino, off: u64, buf: Bytes) -> Bytes {
        let files = self.files.lock();
        let Some(f) = files.get(&ino).filter(|f| !f.dirty.is_empty() || !f.sending.is_empty()) else {
            return buf;
        };
        let end = off + buf.len() as u64;
        let touches = |m: &BTreeMap<u64, Bytes>| {
            let first = m.range(..=off).next_back().map(|(&o, _)| o).unwrap_or(off);
            m.range(first..end).any(|(&o, b)| o + b.len() as u64 > off)
        };
        if !touches(&f.sending) && !touches(&f.dirty) {
            return buf;
        }
        let mut out = BytesMut::from(&buf[..]);
        overlay(&f.sending, off, &mut out);
        overlay(&f.dirty, off, &mut out);
        out.freeze()
    }

    /// The per-file flush gate of `ino`.
    pub(super) fn gate(&self, ino: Ino) -> Arc<tokio::sync::Mutex<()>> {
        self.files.lock().entry(ino).or_default().gate.clone()
    }

    /// Takes the unsent bytes of `ino` for a flush (call holding its gate).
    pub(super) fn take(&self, ino: Ino) -> Option<Batch> {
        let mut files = self.files.lock();
        let session = self.session.load(std::sync::atomic::Ordering::SeqCst);
        let f = files.get_mut(&ino)?;
        if f.dirty.is_empty() {
            return None;
        }
        let object = f.object?;
        let map = std::mem::take(&mut f.dirty);
        let bytes = std::mem::take(&mut f.dirty_bytes);
        f.since = None;
        f.sending = map.clone();
        f.sending_bytes = bytes;
        Some(Batch { object, runs: runs(map), bytes, session })
    }

    /// A flush of `ino` ended: its sending bytes leave the buffer (sent,
    /// or dropped after an error, which is kept when `keep_error`).
    pub(super) fn sent(&self, ino: Ino, error: Option<i32>) {
        let freed = {
            let mut files = self.files.lock();
            let Some(f) = files.get_mut(&ino) else { return };
            f.sending.clear();
            if let Some(e) = error {
                f.error.get_or_insert(e);
            }
            std::mem::take(&mut f.sending_bytes)
        };
        *self.total.lock() -= freed;
        self.room.notify_waiters();
    }

    /// The client was evicted: drops every file's unsent bytes (not those
    /// a flush is sending: it ends them itself, as its session is now
    /// stale) and keeps `error` for each such file's next fsync or close.
    /// Returns how many files and bytes.
    pub(super) fn evicted(&self, error: i32) -> (usize, usize) {
        let (files, bytes) = {
            let mut all = self.files.lock();
            self.session.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut n = (0, 0);
            for f in all.values_mut().filter(|f| !f.dirty.is_empty()) {
                f.dirty.clear();
                n.0 += 1;
                n.1 += std::mem::take(&mut f.dirty_bytes);
                f.since = None;
                f.error.get_or_insert(error);
            }
            n
        };
        *self.total.lock() -= bytes;
        self.room.notify_waiters();
        (files, bytes)
    }

    /// The current session (see `files`).
    pub(super) fn session(&self) -> u64 {
        self.session.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The error kept for `ino`, taken (the next fsync or close reports it once).
    pub(super) fn take_error(&self, ino: Ino) -> Option<i32> {
        let mut files = self.files.lock();
        let e = files.get_mut(&ino).and_then(|f| f.error.take());
        if files.get(&ino).is_some_and(|f| f.is_empty() && Arc::strong_count(&f.gate) == 1) {
            files.remove(&ino);
        }
        e
    }

    /// Files whose oldest unsent byte is older than `age`.
    pub(super) fn aged(&self, age: Duration) -> Vec<Ino> {
        let now = Instant::now();
        self.files
            .lock()
            .iter()
            .filter(|(_, f)| f.since.is_some_and(|s| now.duration_since(s) >= age))
            .map(|(&i, _)| i)
            .collect()
    }

    /// The file with the most unsent bytes (the one a full buffer flushes).
    pub(super) fn largest(&self) -> Option<Ino> {
        self.files.lock().iter().filter(|(_, f)| f.dirty_bytes > 0).max_by_key(|(_, f)| f.dirty_bytes).map(|(&i, _)| i)
    }

    /// Every file with unsent bytes.
    pub(super) fn all(&self) -> Vec<Ino> {
        self.files.lock().iter().filter(|(_, f)| !f.dirty.is_empty()).map(|(&i, _)| i).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map_of(m: &BTreeMap<u64, Bytes>) -> Vec<(u64, Vec<u8>)> {
        m.iter().map(|(&o, b)| (o, b.to_vec())).collect()
    }

    #[test]
    fn a_newer_write_replaces_the_bytes_it_covers() {
        let mut m = BTreeMap::new();
        assert_eq!(insert(&mut m, 10, Bytes::from_static(b"aaaaaaaaaa")), 10);
        assert_eq!(insert(&mut m, 14, Bytes::from_static(b"bb")), 0);
        assert_eq!(map_of(&m), vec![(10, b"aaaa".to_vec()), (14, b"bb".to_vec()), (16, b"aaaa".to_vec())]);
        // Covers the tail of one range and the head of the next.
        assert_eq!(insert(&mut m, 15, Bytes::from_static(b"ccc")), 0);
        assert_eq!(
            map_of(&m),
            vec![(10, b"aaaa".to_vec()), (14, b"b".to_vec()), (15, b"ccc".to_vec()), (18, b"aa".to_vec())]
        );
        // Covers everything and more.
        assert_eq!(insert(&mut m, 0, Bytes::from(vec![b'd'; 30])), 20);
        assert_eq!(map_of(&m), vec![(0, vec![b'd'; 30])]);
        // Adjacent, not overlapping.
        assert_eq!(insert(&mut m, 30, Bytes::from_static(b"e")), 1);
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn reads_see_sending_then_unsent_bytes_over_the_cluster() {
        let w = WriteBack::default();
        let (ino, obj) = (Ino(5), ObjectId(9));
        w.put(ino, obj, 2, Bytes::from_static(b"xxxx"));
        let _batch = w.take(ino).expect("bytes to send");
        w.put(ino, obj, 4, Bytes::from_static(b"yy"));
        let got = w.read_over(ino, 0, Bytes::from_static(b"........"));
        assert_eq!(&got[..], b"..xxyy..");
        assert_eq!(w.total(), 6);
        w.sent(ino, None);
        assert_eq!(w.total(), 2);
        assert_eq!(&w.read_over(ino, 0, Bytes::from_static(b"........"))[..], b"....yy..");
        assert_eq!(w.file_bytes(ino), 2);
        // A read that touches no buffered byte gets the cluster's bytes as they are.
        let far = Bytes::from_static(b"........");
        assert_eq!(w.read_over(ino, 100, far.clone()).as_ptr(), far.as_ptr());
    }

    #[test]
    fn an_eviction_drops_unsent_bytes_keeps_the_error_and_marks_a_flush_in_progress_stale() {
        let w = WriteBack::default();
        let obj = ObjectId(9);
        w.put(Ino(1), obj, 0, Bytes::from_static(b"sending"));
        let b = w.take(Ino(1)).expect("a flush took them");
        w.put(Ino(1), obj, 100, Bytes::from_static(b"unsent"));
        w.put(Ino(2), obj, 0, Bytes::from_static(b"other file"));
        let before = w.session();
        assert_eq!(w.evicted(libc::EIO), (2, 16));
        assert_eq!(w.session(), before + 1);
        assert_eq!(w.total(), 7, "the bytes being sent stay until their flush ends");
        assert!(w.all().is_empty());
        assert_eq!(w.take_error(Ino(2)), Some(libc::EIO));
        assert_ne!(b.session, w.session(), "the flush in progress sees its bytes are from the old session");
        w.sent(Ino(1), None);
        assert_eq!(w.total(), 0);
        assert_eq!(w.take_error(Ino(1)), Some(libc::EIO));
    }

    #[test]
    fn contiguous_ranges_go_as_one_run() {
        let mut m = BTreeMap::new();
        insert(&mut m, 0, Bytes::from_static(b"ab"));
        insert(&mut m, 2, Bytes::from_static(b"cd"));
        insert(&mut m, 10, Bytes::from_static(b"z"));
        let r: Vec<(u64, Bytes)> = runs(m).into_iter().map(join).collect();
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].0, &r[0].1[..]), (0, &b"abcd"[..]));
        assert_eq!((r[1].0, &r[1].1[..]), (10, &b"z"[..]));
    }

    #[test]
    fn waves_hold_at_most_four_mib_or_256_runs() {
        let run = |o: u64, len: usize| -> Run { (o, vec![Bytes::from(vec![0u8; len])], len) };
        let small: Vec<Run> = (0..600u64).map(|i| run(i * 8192, 4096)).collect();
        let w: Vec<_> = waves(small).collect();
        assert_eq!(w.iter().map(Vec::len).collect::<Vec<_>>(), vec![256, 256, 88]);
        let big: Vec<Run> = (0..5u64).map(|i| run(i << 23, 3 << 20)).collect();
        assert!(waves(big).all(|w| w.len() == 1));
        assert!(waves(Vec::new()).next().is_none());
        // A run of several parts is joined when its wave is reached.
        let parts = vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")];
        let w: Vec<_> = waves(vec![(7, parts, 4)]).collect();
        assert_eq!((w[0][0].0, &w[0][0].1[..]), (7, &b"abcd"[..]));
    }

    #[test]
    fn a_failed_flush_is_reported_once() {
        let w = WriteBack::default();
        w.put(Ino(1), ObjectId(1), 0, Bytes::from_static(b"a"));
        let _ = w.take(Ino(1));
        w.sent(Ino(1), Some(libc::ENOSPC));
        assert_eq!(w.total(), 0);
        assert!(w.holds(Ino(1)));
        assert_eq!(w.take_error(Ino(1)), Some(libc::ENOSPC));
        assert_eq!(w.take_error(Ino(1)), None);
        assert!(!w.holds(Ino(1)));
    }
}
