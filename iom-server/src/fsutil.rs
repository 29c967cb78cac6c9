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
