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
