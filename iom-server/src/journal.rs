//! The write-ahead journal of one IOM, with group commit.
//!
//! Records are appended by any task and written by one writer thread, which
//! batches everything queued into one `write` and one `fdatasync` (group
//! commit). Each append can wait until its record is *written* (in the OS:
//! survives a process crash) or *durable* (on stable storage: survives a
//! power cut), or register a callback run once it is durable (deferred
//! frees). A record flagged `after_data_sync` is written only after the
//! block file has been synced, so "map switched"/"parity completed" never
//! reach the disk before the data they point at.
//!
//! On disk: segments `seg-<n>.log`, each starting with a magic and format
//! version, then records `[u32 len][u32 crc32c][payload]`. Replay stops at a
//! torn tail of the last segment and truncates it.

use crate::Error;
use common::codec;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub const JOURNAL_FORMAT_VERSION: u32 = 1;
const SEG_MAGIC: &[u8; 8] = b"IOMFSJNL";
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
    /// Until the record is on stable storage.
    Durable,
}

type Callback = Box<dyn FnOnce() + Send>;

enum Cmd {
    Append {
        bytes: Vec<u8>,
        after_data_sync: bool,
        wait: Wait,
        done: Option<oneshot::Sender<()>>,
        on_durable: Option<Callback>,
    },
    Flush(oneshot::Sender<()>),
    Rotate(oneshot::Sender<u64>),
    Stop(oneshot::Sender<()>),
}

#[derive(Default, Debug)]
pub struct JournalStats {
    pub records: AtomicU64,
    pub flushes: AtomicU64,
    pub data_syncs: AtomicU64,
    pub bytes: AtomicU64,
    /// Bytes appended since the last rotation (drives checkpoints).
    pub bytes_since_rotate: AtomicU64,
}

pub struct Journal {
    tx: mpsc::Sender<Cmd>,
    pub stats: Arc<JournalStats>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// What replay found.
pub struct Replayed {
    /// Record payloads in order.
    pub records: Vec<Vec<u8>>,
    /// Segment the writer appends to from now on.
    pub segment: u64,
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
    let mut h = Vec::with_capacity(SEG_HEADER);
    h.extend_from_slice(SEG_MAGIC);
    h.extend_from_slice(&JOURNAL_FORMAT_VERSION.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    f.write_all(&h).and_then(|_| f.sync_all()).map_err(|e| Error::io(format!("write {}", p.display()), e))?;
    crate::fsutil::sync_dir(dir)?;
    Ok(f)
}

/// Frames one record.
pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&codec::crc(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Parses the records of one segment; returns them and the offset after the
/// last whole record (`None` for the offset when the segment is intact).
fn parse_segment(buf: &[u8], path: &Path) -> Result<(Vec<Vec<u8>>, Option<usize>), Error> {
    if buf.len() < SEG_HEADER || &buf[..8] != SEG_MAGIC {
        if buf.len() < SEG_HEADER {
            // Crash while creating the segment: nothing was ever appended to it.
            return Ok((Vec::new(), Some(0)));
        }
        return Err(Error::Format(format!("{}: not an iomfs journal segment", path.display())));
    }
    let ver = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if ver != JOURNAL_FORMAT_VERSION {
        return Err(Error::Format(format!(
            "{}: journal format version {ver}; this build reads version {JOURNAL_FORMAT_VERSION}",
            path.display()
        )));
    }
    let mut pos = SEG_HEADER;
    let mut out = Vec::new();
    while pos < buf.len() {
        let good = pos;
        if buf.len() - pos < 8 {
            return Ok((out, Some(good)));
        }
        let len = u32::from_le_bytes(buf[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(buf[pos + 4..pos + 8].try_into().expect("4 bytes"));
        if len > MAX_RECORD || buf.len() - pos - 8 < len {
            return Ok((out, Some(good)));
        }
        let payload = &buf[pos + 8..pos + 8 + len];
        if codec::crc(payload) != crc {
            return Ok((out, Some(good)));
        }
        out.push(payload.to_vec());
        pos += 8 + len;
    }
    Ok((out, None))
}

impl Journal {
    /// Replays the segments numbered `from` and later, removes older ones,
    /// truncates a torn tail, and starts a writer on a fresh segment.
    pub fn open(
        dir: &Path,
        from: u64,
        data_file: Arc<File>,
        flush_interval: Duration,
    ) -> Result<(Journal, Replayed), Error> {
        fs::create_dir_all(dir).map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        if from > u64::MAX / 2 {
            return Err(Error::Format(format!("{}: checkpoint names journal segment {from}", dir.display())));
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
            let (recs, torn) = parse_segment(&buf, &path)?;
            if let Some(off) = torn {
                if i + 1 != n {
                    return Err(Error::Format(format!(
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
        let segment = last + 1;
        let file = new_segment(dir, segment)?;
        let stats = Arc::new(JournalStats::default());
        let (tx, rx) = mpsc::channel();
        let w = Writer {
            rx,
            seg: file,
            seg_no: segment,
            dir: dir.to_path_buf(),
            data_file,
            interval: flush_interval,
            stats: stats.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || w.run())
            .map_err(|e| Error::io("spawn journal writer", e))?;
        Ok((Journal { tx, stats, thread: parking_lot::Mutex::new(Some(thread)) }, Replayed { records, segment }))
    }

    fn send(&self, c: Cmd) {
        // The writer only stops at shutdown; a send after that is a no-op.
        let _ = self.tx.send(c);
    }

    /// Appends an encoded record. The returned receiver (unless `Wait::Nothing`)
    /// fires when the record reached the requested level.
    pub fn append(
        &self,
        payload: Vec<u8>,
        after_data_sync: bool,
        wait: Wait,
        on_durable: Option<Callback>,
    ) -> Option<oneshot::Receiver<()>> {
        let (done, rx) = if wait == Wait::Nothing {
            (None, None)
        } else {
            let (t, r) = oneshot::channel();
            (Some(t), Some(r))
        };
        self.send(Cmd::Append { bytes: payload, after_data_sync, wait, done, on_durable });
        rx
    }

    /// Like [`Journal::flush`], without borrowing the journal while waiting.
    pub fn flush_request(&self) -> oneshot::Receiver<()> {
        let (t, r) = oneshot::channel();
        self.send(Cmd::Flush(t));
        r
    }

    /// Like [`Journal::rotate`], without borrowing the journal while waiting.
    pub fn rotate_request(&self) -> oneshot::Receiver<u64> {
        let (t, r) = oneshot::channel();
        self.send(Cmd::Rotate(t));
        r
    }

    /// Flushes and stops the writer; the receiver fires when it stopped.
    pub fn stop_request(&self) -> oneshot::Receiver<()> {
        let (t, r) = oneshot::channel();
        self.send(Cmd::Stop(t));
        r
    }

    /// Waits until everything appended so far is durable.
    pub async fn flush(&self) {
        let (t, r) = oneshot::channel();
        self.send(Cmd::Flush(t));
        let _ = r.await;
    }

    /// Seals the current segment and starts a new one; returns its number.
    /// Every record appended before this call lies in an older segment.
    pub async fn rotate(&self) -> u64 {
        let (t, r) = oneshot::channel();
        self.send(Cmd::Rotate(t));
        r.await.unwrap_or(0)
    }

    /// Flushes and stops the writer.
    pub async fn stop(&self) {
        let (t, r) = oneshot::channel();
        self.send(Cmd::Stop(t));
        let _ = r.await;
        if let Some(h) = self.thread.lock().take() {
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

struct Writer {
    rx: mpsc::Receiver<Cmd>,
    seg: File,
    seg_no: u64,
    dir: PathBuf,
    data_file: Arc<File>,
    interval: Duration,
    stats: Arc<JournalStats>,
}

fn fatal(what: &str, e: std::io::Error) -> ! {
    // A storage server that cannot make its journal durable must not go on
    // answering writes: stop, and let recovery replay what reached the disk.
    tracing::error!("journal: {what} failed: {e}; stopping this IOM");
    eprintln!("iom-server: journal {what} failed: {e}; stopping");
    std::process::exit(70);
}

impl Writer {
    fn run(mut self) {
        let mut unsynced = false;
        let mut last_sync = Instant::now();
        let mut durable_waiters: Vec<oneshot::Sender<()>> = Vec::new();
        let mut callbacks: Vec<Callback> = Vec::new();
        let mut stop: Option<oneshot::Sender<()>> = None;
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        loop {
            let pending = unsynced || !callbacks.is_empty();
            let first = if pending {
                let wait = (last_sync + self.interval).saturating_duration_since(Instant::now());
                match self.rx.recv_timeout(wait) {
                    Ok(c) => Some(c),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            } else {
                match self.rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            };
            let mut cmds = Vec::new();
            if let Some(c) = first {
                cmds.push(c);
                while cmds.len() < 8192 {
                    match self.rx.try_recv() {
                        Ok(c) => cmds.push(c),
                        Err(_) => break,
                    }
                }
            }
            let mut written: Vec<oneshot::Sender<()>> = Vec::new();
            let mut force = false;
            let mut data_synced = false;
            for c in cmds {
                match c {
                    Cmd::Append { bytes, after_data_sync, wait, done, on_durable } => {
                        if after_data_sync && !data_synced {
                            // Data written before this record was queued must
                            // be durable before the record can reach the disk.
                            self.write_buf(&mut buf, &mut unsynced);
                            if let Err(e) = self.data_file.sync_data() {
                                fatal("block file fdatasync", e);
                            }
                            self.stats.data_syncs.fetch_add(1, Ordering::Relaxed);
                            data_synced = true;
                        }
                        frame(&bytes, &mut buf);
                        self.stats.records.fetch_add(1, Ordering::Relaxed);
                        match (wait, done) {
                            (Wait::Written, Some(d)) => written.push(d),
                            (Wait::Durable, Some(d)) => {
                                durable_waiters.push(d);
                                force = true;
                            }
                            _ => {}
                        }
                        if let Some(cb) = on_durable {
                            callbacks.push(cb);
                        }
                    }
                    Cmd::Flush(d) => {
                        durable_waiters.push(d);
                        force = true;
                    }
                    Cmd::Rotate(d) => {
                        self.write_buf(&mut buf, &mut unsynced);
                        self.sync(&mut unsynced, &mut last_sync, &mut durable_waiters, &mut callbacks);
                        self.seg_no += 1;
                        match new_segment(&self.dir, self.seg_no) {
                            Ok(f) => self.seg = f,
                            Err(e) => fatal("segment rotation", std::io::Error::other(e.to_string())),
                        }
                        self.stats.bytes_since_rotate.store(0, Ordering::Relaxed);
                        let _ = d.send(self.seg_no);
                    }
                    Cmd::Stop(d) => {
                        force = true;
                        stop = Some(d);
                    }
                }
            }
            self.write_buf(&mut buf, &mut unsynced);
            for w in written {
                let _ = w.send(());
            }
            if force || (unsynced || !callbacks.is_empty()) && last_sync.elapsed() >= self.interval {
                self.sync(&mut unsynced, &mut last_sync, &mut durable_waiters, &mut callbacks);
            }
            if let Some(d) = stop.take() {
                let _ = d.send(());
                return;
            }
        }
    }

    fn write_buf(&mut self, buf: &mut Vec<u8>, unsynced: &mut bool) {
        if buf.is_empty() {
            return;
        }
        if let Err(e) = self.seg.write_all(buf) {
            fatal("write", e);
        }
        self.stats.bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.stats.bytes_since_rotate.fetch_add(buf.len() as u64, Ordering::Relaxed);
        buf.clear();
        *unsynced = true;
    }

    fn sync(
        &mut self,
        unsynced: &mut bool,
        last_sync: &mut Instant,
        waiters: &mut Vec<oneshot::Sender<()>>,
        callbacks: &mut Vec<Callback>,
    ) {
        if *unsynced {
            if let Err(e) = self.seg.sync_data() {
                fatal("fdatasync", e);
            }
            self.stats.flushes.fetch_add(1, Ordering::Relaxed);
            *unsynced = false;
        }
        *last_sync = Instant::now();
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
        for cb in callbacks.drain(..) {
            cb();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(d: &Path, from: u64) -> (Journal, Replayed) {
        let data = Arc::new(tempfile::tempfile().unwrap());
        Journal::open(d, from, data, Duration::from_millis(5)).unwrap()
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
        assert_eq!(r2.records[5], 5u32.to_le_bytes());
        assert_eq!(r2.records[100], b"last");
        assert!(r2.segment > seg);
        j2.stop().await;
        // replay from a later segment skips (and removes) older ones
        let (j3, r3) = open(d.path(), r2.segment);
        assert!(r3.records.is_empty());
        j3.stop().await;
        assert!(!p.exists());
    }

    #[tokio::test]
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
