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

/// (available to unprivileged writers, total) bytes of the filesystem
/// holding `dir`.
pub fn fs_space(dir: &Path) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: plain C struct filled by statvfs.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some((s.f_bavail as u64 * s.f_frsize as u64, s.f_blocks as u64 * s.f_frsize as u64))
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
