//! The `iomfs` commands that live only in the binary: making a cluster
//! directory, running a local cluster, mounting, and the load generator.
//! They report errors with `anyhow` (a message and its context, printed
//! once by `main`); the library they call uses typed errors only.

pub mod bench;
pub mod init;
pub mod local;
pub mod mount;
pub mod units;

/// Makes `cmd`'s child leave our session (`setsid` before exec), so it
/// outlives the terminal and the shell that started `iomfs`.
fn detach(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe; it runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

/// Opens `path` for appending (logs are kept across runs) and returns it
/// with its length now: where this run's lines start.
fn open_log(path: &std::path::Path) -> anyhow::Result<(std::fs::File, u64)> {
    use anyhow::Context;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((f, len))
}
