//! Mount points as the kernel lists them: whether a path is mounted now
//! (`/proc/mounts`) and unmounting one (`fusermount3 -u`). Mounting itself
//! is the `iomfs mount` command's (the binary's `cli::mount`).
//!
//! Invariant: a path is looked up canonicalized, against the entries of
//! `/proc/mounts` with their octal escapes decoded.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Log file of the `iomfs mount` process for `mnt`, in the cluster
/// directory `dir` (one per mount point).
pub fn mount_log(dir: &Path, mnt: &Path) -> PathBuf {
    let canon = std::fs::canonicalize(mnt).unwrap_or_else(|_| mnt.to_path_buf());
    let tag: String =
        canon.to_string_lossy().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    dir.join(format!("mount{tag}.log"))
}

/// Whether `m` is a mount point now.
pub fn is_mounted(m: &Path) -> bool {
    let canon = std::fs::canonicalize(m).unwrap_or_else(|_| m.to_path_buf());
    std::fs::read("/proc/mounts")
        .map(|s| {
            s.split(|&b| b == b'\n')
                .filter_map(|l| l.split(|&b| b == b' ').nth(1))
                .any(|p| Path::new(std::ffi::OsStr::from_bytes(&unescape_mount_path(p))) == canon)
        })
        .unwrap_or(false)
}

/// Decodes a path as `/proc/mounts` writes it: the kernel escapes space,
/// tab, newline, backslash (and `#` on newer kernels) as a backslash and
/// three octal digits (`\040` for a space). Hand-written: `procfs`'s
/// decoder (0.18) leaves `\040` as it is, and glibc's `getmntent` would
/// need unsafe FFI for ten lines of work.
fn unescape_mount_path(p: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(p.len());
    let mut i = 0;
    while i < p.len() {
        let oct = |b: u8| (b'0'..=b'7').contains(&b);
        if p[i] == b'\\' && i + 3 < p.len() && oct(p[i + 1]) && oct(p[i + 2]) && oct(p[i + 3]) {
            let v = (p[i + 1] - b'0') as u32 * 64 + (p[i + 2] - b'0') as u32 * 8 + (p[i + 3] - b'0') as u32;
            if v <= 0xff {
                out.push(v as u8);
                i += 4;
                continue;
            }
        }
        out.push(p[i]);
        i += 1;
    }
    out
}

pub fn fusermount_u(mnt: &Path) -> bool {
    for _ in 0..50 {
        let ok = Command::new("fusermount3")
            .arg("-u")
            .arg(mnt)
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok || !is_mounted(mnt) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[cfg(test)]
mod mount_path_tests {
    use super::unescape_mount_path;

    #[test]
    fn proc_mounts_escapes_are_decoded() {
        assert_eq!(unescape_mount_path(br"/tmp/m\040x"), b"/tmp/m x");
        assert_eq!(unescape_mount_path(br"/a\011b\012c\134d\043e"), b"/a\tb\nc\\d#e");
        // A backslash not followed by three octal digits is kept as it is.
        assert_eq!(unescape_mount_path(br"/a\b\04"), br"/a\b\04");
        assert_eq!(unescape_mount_path(br"/x\777"), br"/x\777");
        assert_eq!(unescape_mount_path(b"/plain"), b"/plain");
    }
}
