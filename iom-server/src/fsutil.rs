//! Durable file replacement: temp file, fsync, rename, fsync the directory.

use crate::Error;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

const TMP_SUFFIX: &str = ".tmp";

pub fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))
}

/// Replaces `path` with `data` so that after a crash it holds either the old
/// or the new contents, never a mix.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = path.with_extension(format!("{}{TMP_SUFFIX}", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let res = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    res.map_err(|e| Error::io(format!("replace {}", path.display()), e))?;
    sync_dir(dir)
}

/// Small state kept in place (the cluster map, the vote): the file holds
/// two slots of `SLOT` bytes, each `IOMFSSLT`, a sequence number (u64 LE),
/// the body's length (u32 LE), crc32c of those and the body (u32 LE), then
/// the body. A write goes over the slot not holding the newest copy and is
/// made durable with `fdatasync`: a torn write spoils only that slot, and
/// the other still holds the copy before it. Unlike [`write_atomic`] it
/// needs no new room on the filesystem once the file exists (on a
/// filesystem that does not copy on write), so a vote or a map change is
/// still kept when another tenant took every byte (`write_atomic` needs a
/// new file, which a full filesystem refuses: no IOM could vote).
const SLOT: usize = 16 << 10;
const SLOT_MAGIC: &[u8; 8] = b"IOMFSSLT";
const SLOT_HEAD: usize = 24;

/// The sequence number and body of a valid slot.
fn slot_parse(b: &[u8]) -> Option<(u64, &[u8])> {
    if b.len() < SLOT_HEAD || &b[..8] != SLOT_MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let len = u32::from_le_bytes(b[16..20].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b[20..24].try_into().ok()?);
    let body = b.get(SLOT_HEAD..SLOT_HEAD.checked_add(len)?)?;
    (common::codec::crc_extend(common::codec::crc(&b[8..20]), body) == crc).then_some((seq, body))
}

fn slot_image(seq: u64, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(SLOT_HEAD + body.len());
    v.extend_from_slice(SLOT_MAGIC);
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = common::codec::crc_extend(common::codec::crc(&v[8..20]), body);
    v.extend_from_slice(&crc.to_le_bytes());
    v.extend_from_slice(body);
    v
}

/// The newest copy in a file written by [`write_in_place`]: `None` if the
/// file does not exist; a file of any other size is an older format, read
/// whole (written by `write_atomic`); `Damaged` if neither slot is valid.
pub fn read_in_place(path: &Path) -> Result<Option<Vec<u8>>, Error> {
    let b = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("read {}", path.display()), e)),
    };
    if b.len() != 2 * SLOT {
        return Ok(Some(b));
    }
    match (slot_parse(&b[..SLOT]), slot_parse(&b[SLOT..])) {
        (Some((s0, b0)), Some((s1, b1))) => Ok(Some(if s0 >= s1 { b0 } else { b1 }.to_vec())),
        (Some((_, body)), None) | (None, Some((_, body))) => Ok(Some(body.to_vec())),
        (None, None) => Err(Error::Damaged(format!("{}: both copies are damaged", path.display()))),
    }
}

/// Whether `path` is a file written by [`write_in_place`].
pub fn is_in_place(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.len() == 2 * SLOT as u64)
}

/// Keeps `body` in `path` (see `SLOT`): over the older slot in place, or,
/// when the file is missing or of an older format, as a new file of two
/// slots (`write_atomic`, the one write that needs room).
pub fn write_in_place(path: &Path, body: &[u8]) -> Result<(), Error> {
    use std::os::unix::fs::FileExt;
    if SLOT_HEAD + body.len() > SLOT {
        return Err(Error::Damaged(format!("{}: {} bytes do not fit a {SLOT}-byte slot", path.display(), body.len())));
    }
    let err = |e| Error::io(format!("write {}", path.display()), e);
    if let Ok(f) = OpenOptions::new().read(true).write(true).open(path) {
        if f.metadata().map_err(err)?.len() == 2 * SLOT as u64 {
            let mut b = vec![0u8; 2 * SLOT];
            f.read_exact_at(&mut b, 0).map_err(err)?;
            let s0 = slot_parse(&b[..SLOT]).map(|(s, _)| s);
            let s1 = slot_parse(&b[SLOT..]).map(|(s, _)| s);
            let newest = s0.max(s1).unwrap_or(0);
            // Over the slot that is not the newest valid copy.
            let at = if s0.is_some() && s0 >= s1 { SLOT } else { 0 };
            f.write_all_at(&slot_image(newest + 1, body), at as u64).map_err(err)?;
            return f.sync_data().map_err(err);
        }
    }
    let mut whole = slot_image(1, body);
    whole.resize(2 * SLOT, 0);
    write_atomic(path, &whole)
}

/// Runs `f` (file writes, fsyncs) on tokio's blocking pool, so the event
/// loop that answers heartbeats is never held up by the disk.
pub async fn off_loop<T: Send + 'static>(
    what: &'static str,
    f: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(Error::TaskFailed(format!("{what}: the blocking task failed: {e}"))),
    }
}

/// Removes temp files left by a crash during [`write_atomic`].
pub fn sweep_temp(dir: &Path) {
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().ends_with(TMP_SUFFIX) {
                let _ = fs::remove_file(e.path());
            }
        }
    }
}

/// Reads exactly `len` bytes of `file` at `offset` into a new buffer that
/// is not zero-filled first (`pread` writes into its spare capacity): a
/// block read is a copy out of the page cache, and filling the buffer with
/// zeros before it cost a tenth of an IOM's CPU on sequential reads.
pub fn pread_exact(file: &fs::File, len: usize, offset: u64) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd;
    let mut buf = Vec::<u8>::with_capacity(len);
    let mut done = 0usize;
    while done < len {
        // SAFETY: the destination is the vector's unused capacity from
        // `done` to `len` (allocated above); pread only writes into it, and
        // no reference to uninitialised bytes is made.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(done).cast(),
                len - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "failed to fill whole buffer"));
        }
        done += n as usize;
    }
    // SAFETY: pread initialised every byte up to `len`.
    unsafe { buf.set_len(len) };
    Ok(buf)
}

/// `statvfs` of the filesystem holding `dir`.
fn statvfs(dir: &Path) -> Option<libc::statvfs> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: plain C struct filled by statvfs.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    (unsafe { libc::statvfs(c.as_ptr(), &mut s) } == 0).then_some(s)
}

/// (available to unprivileged writers, total) bytes of the filesystem
/// holding `dir`.
pub fn fs_space(dir: &Path) -> Option<(u64, u64)> {
    let s = statvfs(dir)?;
    Some((s.f_bavail * s.f_frsize, s.f_blocks * s.f_frsize))
}

/// The id of the filesystem holding `dir` (`statvfs`'s `f_fsid`: derived
/// from the filesystem's UUID on ext4 and xfs, distinct per tmpfs), so that
/// IOMs sharing one filesystem count its space once. 0 when unknown.
pub fn fs_id(dir: &Path) -> u64 {
    statvfs(dir).map_or(0, |s| s.f_fsid)
}

/// Stops the IOM because its disk failed a write or a sync: it must never
/// acknowledge again on a disk that lost data it was given. Exit status 70
/// (EX_SOFTWARE): the proxy takes the role over; a restart (systemd, or the
/// operator once the disk is fixed) replays the journal and rejoins.
pub fn fail_stop(what: &str, e: &std::io::Error) -> ! {
    tracing::error!("{what} failed: {e}; stopping this IOM (its proxy takes over; restart it once the disk is fixed)");
    eprintln!("iom-server: {what} failed: {e}; stopping");
    std::process::exit(70);
}

/// Disk operations started and finished: the slow-disk watchdog's only
/// cost on the I/O path. Reads and writes (block file, journal) apart from
/// syncs, which may take long on a healthy disk (flushing much dirty data).
struct OpCount {
    started: std::sync::atomic::AtomicU64,
    done: std::sync::atomic::AtomicU64,
    /// (operations done when last seen changing, since when).
    watch: parking_lot::Mutex<Option<(u64, std::time::Instant)>>,
}

static IO_OPS: OpCount = OpCount::new();
static SYNC_OPS: OpCount = OpCount::new();

impl OpCount {
    const fn new() -> OpCount {
        OpCount {
            started: std::sync::atomic::AtomicU64::new(0),
            done: std::sync::atomic::AtomicU64::new(0),
            watch: parking_lot::Mutex::new(None),
        }
    }

    /// How long nothing has finished while something waits.
    fn stalled(&self, now: std::time::Instant) -> std::time::Duration {
        use std::sync::atomic::Ordering::Relaxed;
        let done = self.done.load(Relaxed);
        let started = self.started.load(Relaxed);
        let mut w = self.watch.lock();
        match *w {
            Some((d, since)) if d == done && started > done => now.saturating_duration_since(since),
            _ => {
                *w = Some((done, now));
                std::time::Duration::ZERO
            }
        }
    }
}

/// Held for the length of one disk operation.
pub struct DiskOp(&'static OpCount);

impl DiskOp {
    /// A read or write.
    pub fn start() -> DiskOp {
        Self::of(&IO_OPS)
    }
    /// An fdatasync.
    pub fn sync() -> DiskOp {
        Self::of(&SYNC_OPS)
    }
    fn of(c: &'static OpCount) -> DiskOp {
        c.started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        DiskOp(c)
    }
}

impl Drop for DiskOp {
    fn drop(&mut self) {
        self.0.done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The slow-disk watchdog, asked every heartbeat: how long the disk has
/// gone without finishing a read or write while one waited, if `limit` or
/// longer (syncs: four times `limit`). An IOM whose disk is stalled stops
/// answering and sending heartbeats, so the cluster declares it down like
/// a silent one — with several runtime threads (`iom_threads > 0`) its
/// event loop would otherwise go on answering pings while every write
/// waits for the disk.
pub fn disk_stalled(limit: std::time::Duration) -> Option<std::time::Duration> {
    let now = std::time::Instant::now();
    let io = IO_OPS.stalled(now);
    let sync = SYNC_OPS.stalled(now);
    if io >= limit {
        Some(io)
    } else if sync >= limit * 4 {
        Some(sync)
    } else {
        None
    }
}

/// An injected disk fault (`failpoints` builds only), TiKV-style:
/// `FAILPOINTS="store::pread=3*return(eio)"` makes the next three reads
/// fail with EIO; `return(enospc)` gives ENOSPC; the `fail` crate's own
/// `sleep(ms)` makes the disk slow. Points: `store::pread`, `store::pwrite`,
/// `store::fdatasync`, `journal::write`, `journal::fdatasync`.
#[macro_export]
macro_rules! disk_fault {
    ($name:literal) => {{
        #[cfg(feature = "failpoints")]
        {
            (|| {
                fail::fail_point!($name, |a: Option<String>| Some(a.unwrap_or_default()));
                None::<String>
            })()
            .map(|a| $crate::fsutil::injected_error(&a))
        }
        #[cfg(not(feature = "failpoints"))]
        {
            None::<std::io::Error>
        }
    }};
}

/// The error an injected fault stands for: `enospc`, else EIO.
pub fn injected_error(arg: &str) -> std::io::Error {
    match arg {
        "enospc" => std::io::Error::from_raw_os_error(libc::ENOSPC),
        _ => std::io::Error::from_raw_os_error(libc::EIO),
    }
}

#[cfg(test)]
mod tests {
    /// In-place state: each write goes over the older slot, a torn write
    /// leaves the copy before it, an older-format file reads whole, and
    /// only two damaged slots are an error.
    #[test]
    fn in_place_slots_alternate_and_a_torn_write_keeps_the_copy_before() {
        use super::{read_in_place, write_in_place, SLOT};
        use std::os::unix::fs::{FileExt, MetadataExt};
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state");
        assert_eq!(read_in_place(&p).unwrap(), None);
        std::fs::write(&p, b"old format").unwrap();
        assert_eq!(read_in_place(&p).unwrap().unwrap(), b"old format");
        write_in_place(&p, b"one").unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 2 * SLOT as u64);
        let ino = std::fs::metadata(&p).unwrap().ino();
        for body in [&b"two"[..], b"", b"three"] {
            write_in_place(&p, body).unwrap();
            assert_eq!(read_in_place(&p).unwrap().unwrap(), body);
        }
        // In place: the same file, never a new one.
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino);
        // Spoil the slot holding the newest copy, "three".
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut b = vec![0u8; 2 * SLOT];
        f.read_exact_at(&mut b, 0).unwrap();
        let newest = if super::slot_parse(&b[..SLOT]).is_some_and(|(_, x)| x == b"three") { 0 } else { SLOT };
        f.write_all_at(b"torn", (newest + 10) as u64).unwrap();
        assert_eq!(read_in_place(&p).unwrap().unwrap(), b"", "a torn newest copy must give the one before");
        // The next write goes over the spoilt slot.
        write_in_place(&p, b"four").unwrap();
        assert_eq!(read_in_place(&p).unwrap().unwrap(), b"four");
        f.write_all_at(b"torn", 10).unwrap();
        f.write_all_at(b"torn", (SLOT + 10) as u64).unwrap();
        assert!(read_in_place(&p).is_err(), "two damaged slots read as {:?}", read_in_place(&p));
        assert!(write_in_place(&p, &vec![0u8; SLOT]).is_err(), "a body larger than a slot was taken");
    }

    #[test]
    fn replace() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("snap.bin");
        super::write_atomic(&p, b"one").unwrap();
        super::write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        std::fs::write(d.path().join("x.bin.tmp"), b"junk").unwrap();
        super::sweep_temp(d.path());
        assert!(!d.path().join("x.bin.tmp").exists());
    }
}
