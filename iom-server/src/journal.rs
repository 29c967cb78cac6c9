//! The write-ahead journal of one IOM, with group commit.
//!
//! An append writes its record right away, in the caller's thread (one
//! `write` under a mutex: a few microseconds), so a record is *written* —
//! it survives a process crash — when `append` returns, and the `atomic`
//! path never waits for another thread. Durability comes from a separate
//! journal-sync thread that fdatasyncs once for everyone waiting (group
//! commit): at once when a waiter is urgent (`durable` writes, fsync,
//! O_SYNC), else within `journal_flush_ms`. A record flagged
//! `after_data_sync` (a11 "map switched", b11 "parity completed") goes
//! through a data-sync stage that syncs the block file first — once for all
//! records queued — so such a record never reaches the disk before the data
//! it points at. Callbacks run once their record is durable (deferred frees).
//!
//! On disk: segments `seg-<n>.log`, each starting with a magic and format
//! version, then records `[u32 len][u32 crc32c][payload]`. Replay stops at a
//! torn tail of the last segment and truncates it.

use crate::format::{Format, HeaderError};
use crate::Error;
use common::codec;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::oneshot;

/// 2: each record also carries the offset of its segment known durable when
/// it was framed (torn tail or damage, see `parse_segment`). 1 is read.
pub const JOURNAL_FORMAT_VERSION: u32 = 2;
const SEG_FORMAT: Format = Format { magic: b"IOMFSJNL", version: JOURNAL_FORMAT_VERSION, oldest: 1 };
/// Magic, format version, four reserved zero bytes.
const SEG_HEADER: usize = 16;
/// Largest single record accepted at replay.
const MAX_RECORD: usize = 8 << 20;

/// How long an append waits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Fire and forget (ordered after earlier records).
    Nothing,
    /// Until the record is written to the OS (survives a process crash).
    Written,
    /// Until the record is on stable storage, synced at once.
    Durable,
    /// Until the record is on stable storage, synced by group commit within
    /// `journal_flush_ms` (nobody is in a hurry for it) unless the journal
    /// is hurried (an fsync waits for the transactions in flight).
    DurableLazy,
    /// Like `DurableLazy`, but never hurried: bookkeeping no client waits
    /// for (a14). It rides along with any sync that happens meanwhile.
    Background,
}

type Callback = Box<dyn FnOnce() + Send>;

#[derive(Default, Debug)]
pub struct JournalStats {
    pub records: AtomicU64,
    pub flushes: AtomicU64,
    pub data_syncs: AtomicU64,
    pub bytes: AtomicU64,
    /// Bytes appended since the last rotation (drives checkpoints).
    pub bytes_since_rotate: AtomicU64,
}

/// Something to do once the journal is durable up to a byte position.
enum OnDurable {
    Notify(oneshot::Sender<()>),
    Run(Callback),
}

enum DsCmd {
    Rec {
        bytes: Vec<u8>,
        wait: Wait,
        done: Option<oneshot::Sender<()>>,
        on_durable: Option<Callback>,
    },
    /// Durable barrier after every record queued before it.
    Flush(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
}

enum JsCmd {
    Wait(u64, OnDurable),
    /// Sync now whatever is written.
    Now,
    Stop(oneshot::Sender<()>),
}

/// Commands for a journal thread that wake it only when they must: an
/// urgent command always does; any other wakes it only while it sleeps
/// without a deadline (it then arms one). Commands that arrive while a
/// deadline is armed wait for it. With a channel every record woke the
/// thread (a context switch per record on the write path).
struct Mailbox<T> {
    st: parking_lot::Mutex<MailState<T>>,
    cv: parking_lot::Condvar,
}

struct MailState<T> {
    items: Vec<T>,
    /// An urgent command is queued.
    urgent: bool,
    /// The receiver sleeps without a deadline.
    idle: bool,
}

impl<T> Mailbox<T> {
    fn new() -> Self {
        Mailbox {
            st: parking_lot::Mutex::new(MailState { items: Vec::new(), urgent: false, idle: false }),
            cv: parking_lot::Condvar::new(),
        }
    }

    fn send(&self, item: T, urgent: bool) {
        let mut s = self.st.lock();
        s.items.push(item);
        s.urgent |= urgent;
        if urgent || s.idle {
            s.idle = false;
            self.cv.notify_one();
        }
    }

    fn send_all(&self, items: impl IntoIterator<Item = T>, urgent: bool) {
        let mut s = self.st.lock();
        s.items.extend(items);
        s.urgent |= urgent;
        if urgent || s.idle {
            s.idle = false;
            self.cv.notify_one();
        }
    }

    /// Waits until an urgent command is queued, or (without a deadline)
    /// any command, or the deadline passes; moves every queued command to
    /// `out`. Returns whether an urgent command was among them.
    fn recv(&self, deadline: Option<std::time::Instant>, out: &mut Vec<T>) -> bool {
        let mut s = self.st.lock();
        loop {
            if s.urgent || (deadline.is_none() && !s.items.is_empty()) {
                break;
            }
            match deadline {
                None => {
                    s.idle = true;
                    self.cv.wait(&mut s);
                }
                Some(d) => {
                    s.idle = false;
                    if self.cv.wait_until(&mut s, d).timed_out() {
                        break;
                    }
                }
            }
        }
        s.idle = false;
        let urgent = std::mem::take(&mut s.urgent);
        out.append(&mut s.items);
        urgent
    }

    /// Moves what is queued to `out` without waiting.
    fn drain(&self, out: &mut Vec<T>) -> bool {
        let mut s = self.st.lock();
        let urgent = std::mem::take(&mut s.urgent);
        out.append(&mut s.items);
        urgent
    }
}

struct Segment {
    file: File,
    no: u64,
    /// Bytes of the segment appended (header and records, `pending` included).
    end: u64,
    /// Records appended but not yet handed to the OS: those nobody waits
    /// to see written, only durable (a11, b11, a14). They go out with the
    /// next record that must be written at once, or before the next sync,
    /// in order, so the file always holds a prefix of the appends and a
    /// crash loses at most records whose effects nobody relied on yet.
    pending: Vec<u8>,
    /// The segment is allocated and zero-filled up to here (see `zero_ahead`).
    zeroed: u64,
    /// The journal position (`Shared::written`) where this segment began.
    base: u64,
}

impl Segment {
    fn new(file: File, no: u64, base: u64) -> Segment {
        Segment { file, no, end: SEG_HEADER as u64, pending: Vec::new(), zeroed: SEG_HEADER as u64, base }
    }

    /// The offset of this segment up to which everything is on stable
    /// storage, given the journal's synced position.
    fn durable(&self, synced: u64) -> u32 {
        (SEG_HEADER as u64 + synced.saturating_sub(self.base)).min(self.end).min(u32::MAX as u64) as u32
    }
}

/// Keep at least this much of the segment zero-filled ahead of its end...
const ZERO_MIN: u64 = 1 << 20;
/// How often a journal short of space tries its zero fill again.
const SHORT_RETRY: Duration = Duration::from_millis(200);
/// ...by filling this much at a time.
const ZERO_CHUNK: u64 = 2 << 20;

struct Shared {
    seg: parking_lot::Mutex<Segment>,
    /// The current segment, for the journal-sync thread.
    sync_file: parking_lot::Mutex<Arc<File>>,
    /// Bytes written since the journal was opened (across segments).
    written: AtomicU64,
    /// Of those, how many are known to be on stable storage.
    synced: AtomicU64,
    stats: Arc<JournalStats>,
    interval: Duration,
    dir: PathBuf,
    js: Arc<Mailbox<JsCmd>>,
    /// Until when (ms since `born`) lazy waits are treated as urgent: a
    /// flush (fsync) is waiting for work still in flight.
    hurry_until: AtomicU64,
    born: std::time::Instant,
    /// The last zero-fill ahead of the end failed (no space): less than
    /// `ZERO_MIN` of room is left for records, and the IOM takes no new
    /// writes until it is back (see [`Journal::short_of_space`]).
    short: std::sync::atomic::AtomicBool,
}

pub struct Journal {
    shared: Arc<Shared>,
    ds: Arc<Mailbox<DsCmd>>,
    pub stats: Arc<JournalStats>,
    threads: parking_lot::Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// What replay found.
pub struct Replayed {
    /// Record payloads in order.
    pub records: Vec<Vec<u8>>,
    /// Segment the writer appends to from now on.
    pub segment: u64,
}

fn fatal(what: &str, e: std::io::Error) -> ! {
    // A storage server that cannot make its journal durable must not go on
    // answering writes: stop, and let recovery replay what reached the disk.
    crate::fsutil::fail_stop(&format!("journal {what}"), &e)
}

/// `f.sync_data()`, or the fault injected at `point`.
fn sync_data(f: &File, point: &str) -> std::io::Result<()> {
    let _op = crate::fsutil::DiskOp::sync();
    let injected = match point {
        "store::fdatasync" => crate::disk_fault!("store::fdatasync"),
        _ => crate::disk_fault!("journal::fdatasync"),
    };
    let t0 = std::time::Instant::now();
    let r = match injected {
        Some(e) => Err(e),
        None => f.sync_data(),
    };
    let file = if point.starts_with("store") { "blocks" } else { "journal" };
    metrics::histogram!("iomfs_iom_fdatasync_seconds", "file" => file).record(t0.elapsed().as_secs_f64());
    r
}

impl Shared {
    /// Appends one record, handing it (and every record before it) to the
    /// OS now unless `defer`; returns the journal position after it.
    fn write_now(&self, payload: &[u8], defer: bool) -> u64 {
        let mut seg = self.seg.lock();
        let before = seg.pending.len();
        let durable = seg.durable(self.synced.load(Ordering::Acquire));
        frame(payload, durable, &mut seg.pending);
        let n = seg.pending.len() - before;
        // (In the power-loss test mode records stay in memory until a sync.)
        if (!defer || seg.pending.len() >= 256 << 10) && !crate::store::power_loss::on() {
            Self::write_pending(&mut seg);
        }
        let n = n as u64;
        seg.end += n;
        self.stats.records.fetch_add(1, Ordering::Relaxed);
        self.stats.bytes.fetch_add(n, Ordering::Relaxed);
        self.stats.bytes_since_rotate.fetch_add(n, Ordering::Relaxed);
        self.written.fetch_add(n, Ordering::AcqRel) + n
    }

    fn write_pending(seg: &mut Segment) {
        if seg.pending.is_empty() {
            return;
        }
        let Segment { file, pending, .. } = seg;
        let _op = crate::fsutil::DiskOp::start();
        let r = match crate::disk_fault!("journal::write") {
            Some(e) => Err(e),
            None => file.write_all(pending),
        };
        if let Err(e) = r {
            fatal("write", e);
        }
        pending.clear();
    }

    /// Hands deferred records to the OS (before a sync or a rotation).
    fn flush_pending(&self) {
        Self::write_pending(&mut self.seg.lock());
    }

    /// Appends a record that needs nothing synced first.
    fn append_now(&self, payload: &[u8], wait: Wait, done: Option<oneshot::Sender<()>>, on_durable: Option<Callback>) {
        let pos = self.write_now(payload, matches!(wait, Wait::DurableLazy | Wait::Background));
        match (wait, done) {
            (Wait::Durable, Some(d)) => {
                self.js.send_all([JsCmd::Wait(pos, OnDurable::Notify(d)), JsCmd::Now], true);
            }
            (Wait::DurableLazy | Wait::Background, Some(d)) => {
                self.js.send(JsCmd::Wait(pos, OnDurable::Notify(d)), false);
            }
            (_, Some(d)) => {
                let _ = d.send(());
            }
            (_, None) => {}
        }
        if let Some(cb) = on_durable {
            self.js.send(JsCmd::Wait(pos, OnDurable::Run(cb)), false);
        }
    }
}

/// Syncs the block file for records that need it (at once if any is
/// urgent, else after collecting for up to `interval`), then appends them.
fn data_sync_stage(rx: Arc<Mailbox<DsCmd>>, shared: Arc<Shared>, data_file: Arc<File>) {
    let mut batch = Vec::new();
    loop {
        // Sleep until the first command, then collect for up to `interval`
        // unless one is urgent.
        if !rx.recv(None, &mut batch) {
            let deadline = std::time::Instant::now() + shared.interval;
            rx.recv(Some(deadline), &mut batch);
        }
        if batch.iter().any(|c| matches!(c, DsCmd::Rec { .. })) {
            if let Err(e) = crate::store::power_loss::flush(&data_file) {
                fatal("block file write", e);
            }
            if let Err(e) = sync_data(&data_file, "store::fdatasync") {
                fatal("block file fdatasync", e);
            }
            shared.stats.data_syncs.fetch_add(1, Ordering::Relaxed);
        }
        for c in batch.drain(..) {
            match c {
                DsCmd::Rec { bytes, wait, done, on_durable } => shared.append_now(&bytes, wait, done, on_durable),
                DsCmd::Flush(d) => {
                    let pos = shared.written.load(Ordering::Acquire);
                    shared.js.send_all([JsCmd::Wait(pos, OnDurable::Notify(d)), JsCmd::Now], true);
                }
                DsCmd::Stop(d) => {
                    shared.js.send(JsCmd::Stop(d), true);
                    return;
                }
            }
        }
    }
}

/// Keeps the current segment allocated and zero-filled ahead of its end, so
/// that appends overwrite blocks the file already has: an `fdatasync` then
/// flushes only the data, without a file-system journal commit for the
/// growing size and new extents (about a third cheaper per sync here).
/// Replay reads a zero header as the clean end of a segment.
fn zero_ahead(shared: &Shared) {
    use std::os::unix::fs::FileExt;
    let file = {
        let mut seg = shared.seg.lock();
        if seg.zeroed >= seg.end + ZERO_MIN {
            shared.short.store(false, Ordering::Relaxed);
            return;
        }
        // Under the segment lock: no record is appended meanwhile, and the
        // fill starts at or after the end, so it never overwrites a record.
        let from = seg.zeroed.max(seg.end);
        // Not tried when the filesystem cannot hold it: a fill that fails
        // half way holds the filesystem's last bytes until it is undone,
        // and a neighbour (another IOM's start, its checkpoint) that
        // writes meanwhile gets ENOSPC.
        if crate::fsutil::fs_space(&shared.dir).is_some_and(|(avail, _)| avail < ZERO_CHUNK) {
            shared.short.store(true, Ordering::Relaxed);
            return;
        }
        let zeros = vec![0u8; ZERO_CHUNK as usize];
        if let Err(e) = seg.file.write_all_at(&zeros, from) {
            // Not fatal: appends then grow the file as they would without
            // it. Out of space, new writes are refused until it is back,
            // and the part of the fill that fitted goes back to the
            // filesystem (nothing is written past `from`): kept, it would
            // take the room a restart, a checkpoint or another IOM on the
            // filesystem needs, and a retry every `SHORT_RETRY` would take
            // each bit freed.
            if e.raw_os_error() == Some(libc::ENOSPC) {
                shared.short.store(true, Ordering::Relaxed);
                let _ = seg.file.set_len(from);
            }
            return;
        }
        shared.short.store(false, Ordering::Relaxed);
        seg.zeroed = from + ZERO_CHUNK;
        shared.sync_file.lock().clone()
    };
    // Until this completes, a sync that covers records in the new range
    // also commits its allocation: slower once, never wrong.
    if let Err(e) = file.sync_data() {
        fatal("fdatasync", e);
    }
}

/// Notes one command for the journal-sync loop.
fn take(c: JsCmd, waiters: &mut Vec<(u64, OnDurable)>, now: &mut bool, stop: &mut Option<oneshot::Sender<()>>) {
    match c {
        JsCmd::Wait(pos, w) => waiters.push((pos, w)),
        JsCmd::Now => *now = true,
        JsCmd::Stop(d) => *stop = Some(d),
    }
}

fn journal_sync_thread(rx: Arc<Mailbox<JsCmd>>, shared: Arc<Shared>) {
    let mut waiters: Vec<(u64, OnDurable)> = Vec::new();
    let mut synced = 0u64;
    let mut stop: Option<oneshot::Sender<()>> = None;
    let mut now = false;
    // When the oldest record not yet synced must be synced by: commands
    // arriving meanwhile do not push it back.
    let mut deadline: Option<std::time::Instant> = None;
    let mut cmds = Vec::new();
    loop {
        let unsynced = shared.written.load(Ordering::Acquire) > synced;
        if !now && stop.is_none() {
            let d = if unsynced || !waiters.is_empty() {
                Some(*deadline.get_or_insert_with(|| std::time::Instant::now() + shared.interval))
            } else if shared.short.load(Ordering::Relaxed) {
                // Short of space: look again soon even with nothing to
                // sync, or the IOM would refuse writes for good.
                Some(std::time::Instant::now() + SHORT_RETRY)
            } else {
                None
            };
            rx.recv(d, &mut cmds);
            if shared.short.load(Ordering::Relaxed) {
                zero_ahead(&shared);
            }
            for c in cmds.drain(..) {
                take(c, &mut waiters, &mut now, &mut stop);
            }
            let due = d.is_some_and(|d| std::time::Instant::now() >= d);
            if !now && stop.is_none() && !due {
                continue;
            }
        }
        now = false;
        deadline = None;
        let target = shared.written.load(Ordering::Acquire);
        if target > synced {
            shared.flush_pending();
            let f = shared.sync_file.lock().clone();
            if let Err(e) = sync_data(&f, "journal::fdatasync") {
                fatal("fdatasync", e);
            }
            shared.stats.flushes.fetch_add(1, Ordering::Relaxed);
            synced = target;
            shared.synced.store(synced, Ordering::Release);
            zero_ahead(&shared);
        }
        let mut keep = Vec::with_capacity(waiters.len());
        for (pos, w) in waiters.drain(..) {
            if pos <= synced {
                match w {
                    OnDurable::Notify(t) => {
                        let _ = t.send(());
                    }
                    OnDurable::Run(cb) => cb(),
                }
            } else {
                keep.push((pos, w));
            }
        }
        waiters = keep;
        // Anything that arrived while syncing and is urgent: go again.
        rx.drain(&mut cmds);
        for c in cmds.drain(..) {
            take(c, &mut waiters, &mut now, &mut stop);
        }
        if let Some(d) = stop.take() {
            if shared.written.load(Ordering::Acquire) <= synced && waiters.is_empty() {
                let _ = d.send(());
                return;
            }
            stop = Some(d);
        }
    }
}

fn seg_name(n: u64) -> String {
    format!("seg-{n:016}.log")
}

fn parse_seg(name: &str) -> Option<u64> {
    name.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()
}

fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let mut v = Vec::new();
    let rd = fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    for e in rd.flatten() {
        if let Some(n) = parse_seg(&e.file_name().to_string_lossy()) {
            v.push((n, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

fn new_segment(dir: &Path, n: u64) -> Result<File, Error> {
    let p = dir.join(seg_name(n));
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&p)
        .map_err(|e| Error::io(format!("create {}", p.display()), e))?;
    if let Err(e) = f.write_all(&segment_header()).and_then(|_| f.sync_all()) {
        // A segment without its whole header must not stay: once a later
        // one exists it would be a sealed segment damaged at offset 0, and
        // the store would not open again (a start or rotation on a full
        // disk left one).
        drop(f);
        let _ = fs::remove_file(&p);
        return Err(Error::io(format!("write {}", p.display()), e));
    }
    crate::fsutil::sync_dir(dir)?;
    Ok(f)
}

/// The header a segment starts with ([`SEG_HEADER`] bytes).
fn segment_header() -> Vec<u8> {
    let mut h = Vec::with_capacity(SEG_HEADER);
    SEG_FORMAT.put_head(&mut h);
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

/// Frames one record: length, checksum (of what follows it), the offset of
/// its segment known durable when it was framed, the payload.
pub fn frame(payload: &[u8], durable: u32, out: &mut Vec<u8>) {
    let d = durable.to_le_bytes();
    let crc = codec::crc_extend(codec::crc(&d), payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&d);
    out.extend_from_slice(payload);
}

/// One framed record at `pos` of a segment of format `ver`: (payload,
/// durable offset, bytes it takes), or `None` if it is not a whole,
/// intact record. `Some(Err(()))`: zeros (no record is empty).
#[allow(clippy::type_complexity)]
fn record_at(buf: &[u8], pos: usize, ver: u32) -> Option<Result<(&[u8], u32, usize), ()>> {
    let head = if ver == 1 { 8 } else { 12 };
    if buf.len() - pos < head {
        return None;
    }
    let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().expect("4 bytes"));
    if len == 0 {
        return Some(Err(()));
    }
    if len > MAX_RECORD || buf.len() - pos - head < len {
        return None;
    }
    let payload = &buf[pos + head..pos + head + len];
    let (want, durable) = if ver == 1 {
        (codec::crc(payload), 0)
    } else {
        let d = &buf[pos + 8..pos + 12];
        (codec::crc_extend(codec::crc(d), payload), u32::from_le_bytes(d.try_into().expect("4 bytes")))
    };
    (want == crc).then_some(Ok((payload, durable, head + len)))
}

/// Parses the records of one segment; returns them and the offset after the
/// last whole record (`None` for the offset when the segment is intact).
///
/// A record that is not whole ends the segment as a torn tail (a crash
/// while appending) — unless a later intact record says that the segment
/// was durable beyond it when it was written: then the bad record had
/// reached stable storage and was damaged since, and replaying without it
/// would silently lose an acknowledged update, so that is an error.
fn parse_segment(buf: &[u8], path: &Path) -> Result<(Vec<Vec<u8>>, Option<usize>), Error> {
    let ver = match SEG_FORMAT.check_head(buf, SEG_HEADER) {
        Ok(ver) => ver,
        // Crash while creating the segment: nothing was ever appended to it.
        Err(HeaderError::Short) => return Ok((Vec::new(), Some(0))),
        // (A segment header has no checksum: check_head never says Checksum.)
        Err(HeaderError::Magic | HeaderError::Checksum) => {
            return Err(Error::Damaged(format!("{}: not an iomfs journal segment", path.display())))
        }
        Err(HeaderError::Version(ver)) => {
            return Err(Error::Damaged(format!(
                "{}: journal format version {ver}; this build reads versions 1 to {JOURNAL_FORMAT_VERSION}",
                path.display()
            )))
        }
    };
    let mut pos = SEG_HEADER;
    let mut out = Vec::new();
    while pos < buf.len() {
        match record_at(buf, pos, ver) {
            Some(Ok((payload, _, n))) => {
                out.push(payload.to_vec());
                pos += n;
            }
            // Zeros to the end are the space filled ahead of the last
            // record: a clean end.
            Some(Err(())) if buf[pos..].iter().all(|&b| b == 0) => return Ok((out, None)),
            // Anything else that is not a whole record — a zeroed length
            // field with bytes after it included — is a torn tail, unless
            // a later record proves it was durable.
            _ => {
                if let Some(after) = durable_after(buf, pos, ver) {
                    return Err(damaged(path, pos, after));
                }
                return Ok((out, Some(pos)));
            }
        }
    }
    Ok((out, None))
}

fn damaged(path: &Path, pos: usize, after: u32) -> Error {
    Error::Damaged(format!(
        "{}: damaged record at offset {pos}, though a later record says the segment was durable up to {after}: \
         it was on stable storage and has been damaged since (restore this IOM's disk with `iomfs replace`)",
        path.display()
    ))
}

/// After a bad record at `bad`: the durable offset named by an intact
/// record found after it, if that offset lies beyond `bad` — proof that the
/// bad record had reached stable storage.
///
/// The bad record's own length field may be what was damaged (zeroed, or
/// a flipped bit), so this does not skip by it: it resynchronises, trying
/// every later byte offset. A candidate must name a durable offset in
/// `(bad, p]` (a record is framed before it is written, so the offset it
/// names never lies past itself) before its checksum is computed; the two
/// together leave a chance of a false match far below a disk's own error
/// rate. In a torn tail (a crash while appending) every record after the
/// tear was framed when the journal was durable only up to before it, so
/// none qualifies.
fn durable_after(buf: &[u8], bad: usize, ver: u32) -> Option<u32> {
    if ver == 1 {
        return None;
    }
    let mut p = bad + 1;
    while p + 12 <= buf.len() {
        let durable = u32::from_le_bytes(buf[p + 8..p + 12].try_into().expect("4 bytes")) as usize;
        if durable > bad && durable <= p {
            if let Some(Ok((_, d, _))) = record_at(buf, p, ver) {
                return Some(d);
            }
        }
        p += 1;
    }
    None
}

impl Journal {
    /// Replays the segments numbered `from` and later, removes older ones,
    /// truncates a torn tail, and starts appending to a fresh segment.
    pub fn open(
        dir: &Path,
        from: u64,
        data_file: Arc<File>,
        flush_interval: Duration,
    ) -> Result<(Journal, Replayed), Error> {
        let replayed = Journal::replay(dir, from)?;
        let journal = Journal::start(dir, replayed.segment, data_file, flush_interval)?;
        Ok((journal, replayed))
    }

    /// The first half of [`Journal::open`]: reads the records of segments
    /// `from` on (dropping older ones, truncating a torn tail) and writes
    /// nothing new, so a store on a full disk can give space back
    /// (`Store::give_back_at_start`) before [`Journal::start`] needs some.
    pub fn replay(dir: &Path, from: u64) -> Result<Replayed, Error> {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        if from > u64::MAX / 2 {
            return Err(Error::Damaged(format!("{}: checkpoint names journal segment {from}", dir.display())));
        }
        let segs = segments(dir)?;
        let mut records = Vec::new();
        let mut last = from.saturating_sub(1);
        let n = segs.len();
        for (i, (num, path)) in segs.into_iter().enumerate() {
            if num < from {
                let _ = fs::remove_file(&path);
                continue;
            }
            let buf = fs::read(&path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
            if buf.len() < SEG_HEADER && i + 1 != n {
                // Created and never completed (no room for its header), with
                // a later segment after it: it never held a record (the
                // header is synced before any is appended).
                tracing::warn!(segment = %path.display(), "journal: segment without its header removed");
                let _ = fs::remove_file(&path);
                continue;
            }
            let (recs, torn) = parse_segment(&buf, &path)?;
            if let Some(off) = torn {
                if i + 1 != n {
                    return Err(Error::Damaged(format!(
                        "{}: damaged record at offset {off} in a sealed journal segment",
                        path.display()
                    )));
                }
                tracing::warn!(segment = %path.display(), offset = off, "journal: torn tail truncated");
                let f = OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
                f.set_len(off as u64)
                    .and_then(|_| f.sync_all())
                    .map_err(|e| Error::io(format!("truncate {}", path.display()), e))?;
            }
            records.extend(recs);
            last = last.max(num);
        }
        Ok(Replayed { records, segment: last + 1 })
    }

    /// The second half of [`Journal::open`]: a new segment `segment` and
    /// the journal's threads.
    pub fn start(dir: &Path, segment: u64, data_file: Arc<File>, flush_interval: Duration) -> Result<Journal, Error> {
        let file = new_segment(dir, segment)?;
        let sync_file = Arc::new(file.try_clone().map_err(|e| Error::io("clone journal segment handle", e))?);
        let stats = Arc::new(JournalStats::default());
        let js = Arc::new(Mailbox::new());
        let ds = Arc::new(Mailbox::new());
        let shared = Arc::new(Shared {
            seg: parking_lot::Mutex::new(Segment::new(file, segment, 0)),
            sync_file: parking_lot::Mutex::new(sync_file),
            written: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            stats: stats.clone(),
            interval: flush_interval,
            dir: dir.to_path_buf(),
            js: js.clone(),
            hurry_until: AtomicU64::new(0),
            born: std::time::Instant::now(),
            short: std::sync::atomic::AtomicBool::new(false),
        });
        let mut threads = Vec::new();
        {
            let sh = shared.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("journal-sync".into())
                    .spawn(move || journal_sync_thread(js, sh))
                    .map_err(|e| Error::io("spawn journal-sync thread", e))?,
            );
            let (sh, ds) = (shared.clone(), ds.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("journal-datasync".into())
                    .spawn(move || data_sync_stage(ds, sh, data_file))
                    .map_err(|e| Error::io("spawn data-sync thread", e))?,
            );
        }
        Ok(Journal { shared, ds, stats, threads: parking_lot::Mutex::new(threads) })
    }

    /// Appends an encoded record. The returned receiver (none when there is
    /// nothing to wait for: the record is already written) fires when the
    /// record reached the requested level.
    pub fn append(
        &self,
        payload: Vec<u8>,
        after_data_sync: bool,
        wait: Wait,
        on_durable: Option<Callback>,
    ) -> Option<oneshot::Receiver<()>> {
        let wait = if wait == Wait::DurableLazy && self.hurried() { Wait::Durable } else { wait };
        let needs_waiter = matches!(wait, Wait::Durable | Wait::DurableLazy | Wait::Background)
            || (after_data_sync && wait == Wait::Written);
        let (done, rx) = if needs_waiter {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        } else {
            (None, None)
        };
        if after_data_sync {
            self.ds.send(DsCmd::Rec { bytes: payload, wait, done, on_durable }, wait == Wait::Durable);
        } else {
            self.shared.append_now(&payload, wait, done, on_durable);
        }
        rx
    }

    /// For the next `d`, records appended with [`Wait::DurableLazy`] are
    /// synced at once: someone (fsync) waits for the transactions in flight.
    pub fn hurry(&self, d: Duration) {
        let until = (self.shared.born.elapsed() + d).as_millis() as u64;
        self.shared.hurry_until.fetch_max(until, Ordering::AcqRel);
    }

    fn hurried(&self) -> bool {
        (self.shared.born.elapsed().as_millis() as u64) < self.shared.hurry_until.load(Ordering::Acquire)
    }

    /// Like [`Journal::flush`], without borrowing the journal while waiting.
    pub fn flush_request(&self) -> oneshot::Receiver<()> {
        let (t, r) = oneshot::channel();
        self.ds.send(DsCmd::Flush(t), true);
        r
    }

    /// Where the journal ends now; see [`Journal::durable_at`].
    pub fn position(&self) -> u64 {
        self.shared.written.load(Ordering::Acquire)
    }

    /// Fires once every record written before `pos` is on stable storage,
    /// syncing at once if it is not yet (no sync at all if it already is).
    /// Unlike [`Journal::flush_request`], records still waiting for a data
    /// sync are not covered.
    pub fn durable_at(&self, pos: u64) -> Option<oneshot::Receiver<()>> {
        if self.shared.synced.load(Ordering::Acquire) >= pos {
            return None;
        }
        let (t, r) = oneshot::channel();
        self.shared.js.send_all([JsCmd::Wait(pos, OnDurable::Notify(t)), JsCmd::Now], true);
        Some(r)
    }

    /// Waits until everything appended so far is durable.
    pub async fn flush(&self) {
        let _ = self.flush_request().await;
    }

    /// Bytes the journal's zero-filled runway may still take from the disk
    /// (up to `ZERO_MIN + ZERO_CHUNK` ahead of its end, see `zero_ahead`):
    /// what `df` must not promise to users.
    pub fn runway_to_come(&self) -> u64 {
        let seg = self.shared.seg.lock();
        (ZERO_MIN + ZERO_CHUNK).saturating_sub(seg.zeroed.saturating_sub(seg.end))
    }

    /// Whether the disk is too full for this journal's runway (see
    /// `zero_ahead`): writes that would add records are refused (ENOSPC)
    /// so that the records of those already running always fit.
    pub fn short_of_space(&self) -> bool {
        self.shared.short.load(Ordering::Relaxed)
    }

    /// Seals the current segment and starts a new one; returns its number.
    /// Every record appended before this call lies in an older segment
    /// (records still waiting for a data sync may land in the new one).
    /// With no space for a new segment, nothing changes and the current
    /// segment takes the next records (`NoSpace`; a later rotation retries).
    pub fn rotate_now(&self) -> Result<u64, Error> {
        let mut seg = self.shared.seg.lock();
        Shared::write_pending(&mut seg);
        if let Err(e) = seg.file.sync_data() {
            fatal("fdatasync", e);
        }
        let no = seg.no + 1;
        let f = match new_segment(&self.shared.dir, no) {
            Ok(f) => f,
            Err(Error::Io { err, .. }) if err.raw_os_error() == Some(libc::ENOSPC) => {
                let _ = fs::remove_file(self.shared.dir.join(seg_name(no)));
                return Err(Error::NoSpace);
            }
            Err(e) => fatal("segment rotation", std::io::Error::other(e.to_string())),
        };
        let sync = f.try_clone().unwrap_or_else(|e| fatal("segment rotation", e));
        *self.shared.sync_file.lock() = Arc::new(sync);
        *seg = Segment::new(f, no, self.shared.written.load(Ordering::Acquire));
        self.shared.stats.bytes_since_rotate.store(0, Ordering::Relaxed);
        Ok(no)
    }

    /// Flushes and stops the journal's threads; the receiver fires when done.
    pub fn stop_request(&self) -> oneshot::Receiver<()> {
        let (t, r) = oneshot::channel();
        self.ds.send(DsCmd::Stop(t), true);
        r
    }

    /// Flushes and stops the journal's threads.
    pub async fn stop(&self) {
        let _ = self.stop_request().await;
        for h in self.threads.lock().drain(..) {
            let _ = h.join();
        }
    }

    /// Deletes sealed segments older than `keep_from` (after a checkpoint).
    pub fn remove_before(dir: &Path, keep_from: u64) -> Result<(), Error> {
        for (n, p) in segments(dir)? {
            if n < keep_from {
                fs::remove_file(&p).map_err(|e| Error::io(format!("remove {}", p.display()), e))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config { cases: 2000, failure_persistence: None, ..Default::default() })]
        /// A damaged segment (bytes flipped, cut, length fields inflated)
        /// replays as an error or a shorter record list, never a panic, and
        /// every record that passes its crc decodes or is an error.
        #[test]
        fn damaged_segments_never_panic(
            edits in proptest::collection::vec((0u8..3, proptest::prelude::any::<u16>(), proptest::prelude::any::<u8>()), 0..6),
        ) {
            use crate::records::Record;
            let mut b = segment_header();
            for tx in 0..4u64 {
                frame(&codec::encode(&Record::Completed { tx: common::TxId(tx * 1000) }).unwrap(), 0, &mut b);
                frame(&codec::encode(&Record::Switched { tx: common::TxId(tx) }).unwrap(), 0, &mut b);
            }
            for (kind, at, x) in edits {
                let i = at as usize % b.len().max(1);
                match kind {
                    0 if b.is_empty() => {}
                    0 => b[i] ^= x | 1,
                    1 => b.truncate(i),
                    _ => b.splice(i..i, [0xff, 0xff, 0xff, 0x7f]).for_each(drop),
                }
            }
            if let Ok((recs, _)) = parse_segment(&b, Path::new("seg")) {
                for r in recs {
                    let _ = codec::decode::<Record>(&r);
                }
            }
        }
    }

    /// A segment left without its whole header (its creation ran out of
    /// space) before a later one does not make the journal unreadable.
    #[test]
    fn a_headerless_segment_before_the_last_is_dropped_not_called_damaged() {
        let d = tempfile::tempdir().unwrap();
        drop(new_segment(d.path(), 1).unwrap());
        fs::write(d.path().join(seg_name(2)), b"IOMFS").unwrap();
        drop(new_segment(d.path(), 3).unwrap());
        let r = Journal::replay(d.path(), 0).expect("replays");
        assert_eq!((r.records.len(), r.segment), (0, 4));
        assert!(!d.path().join(seg_name(2)).exists());
    }

    /// The segment header as written today: magic, format version, four
    /// reserved zero bytes. The on-disk format must not change.
    #[test]
    fn golden_segment_header() {
        let d = tempfile::tempdir().unwrap();
        drop(new_segment(d.path(), 3).unwrap());
        let b = fs::read(d.path().join(seg_name(3))).unwrap();
        assert_eq!(b, b"IOMFSJNL\x02\x00\x00\x00\x00\x00\x00\x00");
        assert_eq!(b.len(), SEG_HEADER);
    }

    /// What a bad segment header gives, as today: a short segment is empty
    /// (a crash while creating it), a wrong magic and an unknown version are
    /// errors naming the file; versions 1 and 2 read.
    #[test]
    fn bad_segment_headers() {
        let p = Path::new("dir/seg-7.log");
        let good = b"IOMFSJNL\x02\x00\x00\x00\x00\x00\x00\x00".to_vec();
        for n in 0..SEG_HEADER {
            let (recs, end) = parse_segment(&good[..n], p).unwrap();
            assert!(recs.is_empty() && end == Some(0), "{n}");
        }
        let (recs, end) = parse_segment(&good, p).unwrap();
        assert!(recs.is_empty() && end.is_none());
        let mut v1 = good.clone();
        v1[8] = 1;
        assert!(parse_segment(&v1, p).unwrap().0.is_empty());
        let mut m = good.clone();
        m[0] = b'X';
        let e = parse_segment(&m, p).unwrap_err().to_string();
        assert_eq!(e, "dir/seg-7.log: not an iomfs journal segment");
        for ver in [0u32, 3, u32::MAX] {
            let mut v = good.clone();
            v[8..12].copy_from_slice(&ver.to_le_bytes());
            let e = parse_segment(&v, p).unwrap_err().to_string();
            assert_eq!(e, format!("dir/seg-7.log: journal format version {ver}; this build reads versions 1 to 2"));
        }
    }

    fn open(d: &Path, from: u64) -> (Journal, Replayed) {
        let data = Arc::new(tempfile::tempfile().unwrap());
        Journal::open(d, from, data, Duration::from_millis(5)).unwrap()
    }

    /// A record damaged after it was durable (a later record says so) is an
    /// error naming the segment; damage in the last record, which nothing
    /// after it vouches for, is a torn tail as before. Segments of format 1
    /// still replay.
    #[tokio::test]
    async fn a_damaged_durable_record_stops_the_replay_but_a_torn_tail_does_not() {
        let d = tempfile::tempdir().unwrap();
        let (j, r) = open(d.path(), 0);
        for rec in [&b"first record"[..], b"second", b"third"] {
            j.append(rec.to_vec(), false, Wait::Durable, None).unwrap().await.unwrap();
        }
        j.stop().await;
        let p = d.path().join(seg_name(r.segment));
        let good = fs::read(&p).unwrap();
        let flip = |at: usize| {
            let mut b = good.clone();
            b[at] ^= 0x40;
            fs::write(&p, &b).unwrap();
        };
        // The first record's payload (after the 12-byte frame head).
        flip(SEG_HEADER + 12 + 3);
        let e = Journal::open(d.path(), 0, Arc::new(tempfile::tempfile().unwrap()), Duration::from_millis(5));
        let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("damaged since") && msg.contains(&seg_name(r.segment)), "{msg}");
        // The first record's length field zeroed, or with a bit flipped:
        // the same damage, though the record can no longer be skipped.
        let set_len = |len: u32| {
            let mut b = good.clone();
            b[SEG_HEADER..SEG_HEADER + 4].copy_from_slice(&len.to_le_bytes());
            fs::write(&p, &b).unwrap();
        };
        for len in [0u32, 12 ^ (1 << 20), 13] {
            set_len(len);
            let e = Journal::open(d.path(), 0, Arc::new(tempfile::tempfile().unwrap()), Duration::from_millis(5));
            let msg = e.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains("damaged since"), "length {len}: {msg}");
        }
        // The last record's length zeroed: nothing vouches for it, a torn tail.
        let third = good.windows(5).position(|w| w == b"third").unwrap() - 12;
        let mut b = good.clone();
        b[third..third + 4].fill(0);
        let dz = tempfile::tempdir().unwrap();
        fs::write(dz.path().join(seg_name(r.segment)), &b).unwrap();
        let (j1, r1) = open(dz.path(), 0);
        assert_eq!(r1.records, vec![b"first record".to_vec(), b"second".to_vec()]);
        j1.stop().await;
        // The last record's payload: a torn tail, truncated.
        let last = good.len() - good.iter().rev().take_while(|&&b| b == 0).count() - 1;
        flip(last);
        let (j2, r2) = open(d.path(), 0);
        assert_eq!(r2.records, vec![b"first record".to_vec(), b"second".to_vec()]);
        j2.stop().await;
        // Format 1 (8-byte frame heads, no durable offsets) replays.
        let d1 = tempfile::tempdir().unwrap();
        let mut b = segment_header();
        b[8..12].copy_from_slice(&1u32.to_le_bytes());
        for rec in [&b"old"[..], b"format"] {
            b.extend_from_slice(&(rec.len() as u32).to_le_bytes());
            b.extend_from_slice(&codec::crc(rec).to_le_bytes());
            b.extend_from_slice(rec);
        }
        fs::write(d1.path().join(seg_name(1)), &b).unwrap();
        let (j3, r3) = open(d1.path(), 0);
        assert_eq!(r3.records, vec![b"old".to_vec(), b"format".to_vec()]);
        j3.stop().await;
    }

    #[tokio::test]
    async fn replays_in_order_and_truncates_torn_tail() {
        let d = tempfile::tempdir().unwrap();
        let (j, r) = open(d.path(), 0);
        assert!(r.records.is_empty());
        let seg = r.segment;
        for i in 0..100u32 {
            j.append(i.to_le_bytes().to_vec(), i % 7 == 0, Wait::Nothing, None);
        }
        j.append(b"last".to_vec(), false, Wait::Durable, None).unwrap().await.unwrap();
        j.stop().await;
        assert!(j.stats.flushes.load(Ordering::Relaxed) >= 1);
        // torn tail: half a record
        let p = d.path().join(seg_name(seg));
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[50, 0, 0, 0, 1, 2, 3]).unwrap();
        drop(f);
        let (j2, r2) = open(d.path(), 0);
        assert_eq!(r2.records.len(), 101);
        // Every record is there; those not waiting for a data sync keep their order.
        let mut ids: Vec<u32> = r2
            .records
            .iter()
            .filter(|r| r.len() == 4 && r[..] != b"last"[..])
            .map(|r| u32::from_le_bytes(r[..].try_into().unwrap()))
            .collect();
        let plain: Vec<u32> = ids.iter().copied().filter(|i| i % 7 != 0).collect();
        assert!(plain.windows(2).all(|w| w[0] < w[1]), "plain records out of order: {plain:?}");
        ids.sort_unstable();
        assert_eq!(ids, (0..100).collect::<Vec<u32>>());
        assert!(r2.records.iter().any(|r| r == b"last"));
        assert!(r2.segment > seg);
        j2.stop().await;
        // replay from a later segment skips (and removes) older ones
        let (j3, r3) = open(d.path(), r2.segment);
        assert!(r3.records.is_empty());
        j3.stop().await;
        assert!(!p.exists());
    }

    #[tokio::test]
    async fn zero_filled_segment_tails_replay_as_clean_ends() {
        let d = tempfile::tempdir().unwrap();
        let mut expect = Vec::new();
        for round in 0..3u32 {
            let (j, r) = open(d.path(), 0);
            assert_eq!(r.records, expect, "round {round}");
            for i in 0..50u32 {
                let rec = (round * 1000 + i).to_le_bytes().to_vec();
                j.append(rec.clone(), false, Wait::Durable, None).unwrap().await.unwrap();
                expect.push(rec);
            }
            j.stop().await;
            // The segment was filled ahead of its last record.
            let len = fs::metadata(d.path().join(seg_name(r.segment))).unwrap().len();
            assert!(len >= ZERO_CHUNK, "segment {} is {len} bytes", r.segment);
        }
    }

    #[tokio::test]
    #[allow(clippy::disallowed_methods)] // a test's own tasks
    async fn group_commit_batches_flushes() {
        let d = tempfile::tempdir().unwrap();
        let (j, _) = open(d.path(), 0);
        let j = Arc::new(j);
        let mut hs = Vec::new();
        for t in 0..8 {
            let j = j.clone();
            hs.push(tokio::spawn(async move {
                for i in 0..50u32 {
                    j.append(vec![t as u8, i as u8], false, Wait::Durable, None).unwrap().await.unwrap();
                }
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
        let recs = j.stats.records.load(Ordering::Relaxed);
        let flushes = j.stats.flushes.load(Ordering::Relaxed);
        assert_eq!(recs, 400);
        assert!(flushes < recs, "no batching: {flushes} flushes for {recs} records");
        j.stop().await;
    }

    #[tokio::test]
    async fn damaged_sealed_segment_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        let (j, r) = open(d.path(), 0);
        j.append(b"abc".to_vec(), false, Wait::Durable, None).unwrap().await.unwrap();
        j.stop().await;
        let (j2, _) = open(d.path(), 0);
        j2.append(b"def".to_vec(), false, Wait::Durable, None).unwrap().await.unwrap();
        j2.stop().await;
        // damage the first segment, which is now sealed (a newer one follows)
        let p = d.path().join(seg_name(r.segment));
        let mut b = fs::read(&p).unwrap();
        let n = b.len();
        b[n - 1] ^= 0xff;
        fs::write(&p, b).unwrap();
        let data = Arc::new(tempfile::tempfile().unwrap());
        let e = Journal::open(d.path(), 0, data, Duration::from_millis(5)).err().expect("must refuse");
        assert!(e.to_string().contains("sealed journal segment"), "{e}");
    }
}
