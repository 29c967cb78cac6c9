//! `iomfs mount`: parses the `-o` options and mounts a cluster with FUSE,
//! in the foreground or detached (a background `iomfs mount` whose log is
//! in the cluster directory).
//!
//! Invariant: a detached mount returns only once the mount point is listed
//! in `/proc/mounts`, and fails (with the tail of the mount's log) if the
//! mount process exits first.

use anyhow::{bail, Context, Result};
use common::meta::MetaReq;
use common::{Ino, Toughness};
use fs_client::fs::{FsOptions, IomFs};
use fs_client::mount::{fusermount_u, is_mounted};
use fs_client::ClusterClient;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Parses `-o a,b=c` options into filesystem settings.
pub fn parse_options(opts: &[String]) -> Result<(FsOptions, bool)> {
    let mut o = FsOptions::default();
    let mut debug = false;
    let mut file_share_given = false;
    for raw in opts.iter().flat_map(|s| s.split(',')).filter(|s| !s.is_empty()) {
        let (k, v) = raw.split_once('=').map(|(k, v)| (k, Some(v))).unwrap_or((raw, None));
        let secs = |v: Option<&str>| -> Result<Duration> {
            let v = v.with_context(|| format!("-o {k} needs a value in seconds"))?;
            let f: f64 = v.parse().with_context(|| format!("-o {k}={v}: not a number of seconds"))?;
            anyhow::ensure!((0.0..=3600.0).contains(&f), "-o {k}={v}: out of range");
            Ok(Duration::from_secs_f64(f))
        };
        let mib = |v: Option<&str>| -> Result<usize> {
            let v = v.with_context(|| format!("-o {k} needs a size in MiB"))?;
            let n: usize = v.parse().with_context(|| format!("-o {k}={v}: not a whole number of MiB"))?;
            anyhow::ensure!((1..=65536).contains(&n), "-o {k}={v}: out of range (1 to 65536 MiB)");
            Ok(n << 20)
        };
        match k {
            "buffer_mb" => o.buffer.total = mib(v)?,
            "buffer_file_mb" => {
                o.buffer.per_file = mib(v)?;
                file_share_given = true;
            }
            "buffer_age" => o.buffer.age = secs(v)?,
            "toughness" => {
                let v = v.context("-o toughness needs a value: buffered, fast, atomic or durable")?;
                o.toughness = v.parse::<Toughness>().map_err(|e| anyhow::anyhow!("-o toughness={v}: {e}"))?;
            }
            "attr_timeout" => o.attr_ttl = secs(v)?,
            "entry_timeout" => o.entry_ttl = secs(v)?,
            "metrics" => {
                let v = v.context("-o metrics needs an address, such as metrics=127.0.0.1:9410")?;
                o.metrics = Some(net::metrics::parse_addr("-o metrics", v).map_err(anyhow::Error::msg)?);
            }
            "bind" => {
                let v = v.context("-o bind needs a local IP address, such as bind=10.0.0.5")?;
                o.bind = Some(v.parse().map_err(|_| anyhow::anyhow!("-o bind={v}: not an IP address"))?);
            }
            "ro" => o.read_only = true,
            "rw" => o.read_only = false,
            "debug" => debug = true,
            "nosuid" => o.nosuid = true,
            "suid" => o.nosuid = false,
            "nodev" => o.nodev = true,
            "dev" => o.nodev = false,
            "noexec" => o.noexec = true,
            "exec" => o.noexec = false,
            "allow_other" => o.allow_root_only = false,
            "allow_root" | "noallow_other" => o.allow_root_only = true,
            // Always in force: the kernel checks permissions for every
            // user of the mount.
            "default_permissions" | "noatime" => {}
            // fstab's and systemd's, not the filesystem's (mount(8) and
            // mount.fuse3 may pass them on).
            "defaults" | "auto" | "noauto" | "nofail" | "_netdev" | "user" | "users" | "nouser" | "owner" | "group" => {
            }
            k if k.starts_with("x-") || k == "comment" || k == "subtype" || k == "fsname" => {}
            other => bail!(
                "unknown mount option '{other}' (known: toughness=, attr_timeout=, entry_timeout=, ro, rw, \
                 buffer_mb=, buffer_file_mb=, buffer_age=, metrics=, bind=, nosuid, nodev, noexec, allow_other, \
                 allow_root (noallow_other); fstab's defaults, \
                 noauto, nofail, _netdev, user, x-* are ignored)"
            ),
        }
    }
    // The default share of one file is at most the whole buffer asked for.
    if !file_share_given {
        o.buffer.per_file = o.buffer.per_file.min(o.buffer.total);
    }
    anyhow::ensure!(
        o.buffer.per_file <= o.buffer.total,
        "-o buffer_file_mb ({} MiB) is more than buffer_mb ({} MiB): a file's share cannot exceed the whole buffer",
        o.buffer.per_file >> 20,
        o.buffer.total >> 20
    );
    Ok((o, debug))
}

/// Makes the kernel read ahead more than its default 128 KiB on this mount,
/// so sequential reads keep several 1 MiB requests in flight.
fn tune_readahead(mnt: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(mnt) else { return };
    let dev = md.dev();
    let (maj, min) = (libc::major(dev), libc::minor(dev));
    let p = format!("/sys/class/bdi/{maj}:{min}/read_ahead_kb");
    if let Err(e) = std::fs::write(&p, "4096") {
        tracing::debug!("cannot raise readahead ({p}): {e}");
    }
}

/// Mounts in this process and serves until unmounted or signalled.
pub fn mount_foreground(dir: &Path, mnt: &Path, fso: FsOptions, debug: bool) -> Result<()> {
    if !mnt.is_dir() {
        bail!("mount point {} is not a directory", mnt.display());
    }
    if is_mounted(mnt) {
        bail!("{} is already a mount point", mnt.display());
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("iomfs")
        .enable_all()
        .build()
        .context("start async runtime")?;
    if let Some(addr) = fso.metrics {
        let _in_rt = rt.enter();
        let label = mnt.display().to_string();
        net::metrics::serve(addr, &[("mount", label)])
            .map_err(|e| anyhow::anyhow!("{e}: choose another address with -o metrics=IP:PORT"))?;
    }
    let client = rt.block_on(ClusterClient::connect_from(dir, fso.bind))?;
    // Fail early and clearly when the cluster does not answer.
    let probe = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(20), client.meta(MetaReq::GetAttr { ino: Ino::ROOT })).await
    });
    match probe {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => bail!("cluster in {} does not serve its namespace: {e}", dir.display()),
        Err(_) => bail!("no answer from the cluster in {} within 20 s: are its IOMs running?", dir.display()),
    }
    let cluster_id = client.cfg.cluster_id.clone();
    let fs = IomFs::new(rt.handle().clone(), client.clone(), fso.clone());
    fs.start();
    let inner = fs.inner();
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(format!("iomfs:{cluster_id}")),
        fuser::MountOption::Subtype("iomfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoAtime,
        if fso.nodev { fuser::MountOption::NoDev } else { fuser::MountOption::Dev },
        if fso.nosuid { fuser::MountOption::NoSuid } else { fuser::MountOption::Suid },
        if fso.noexec { fuser::MountOption::NoExec } else { fuser::MountOption::Exec },
        fuser::MountOption::AutoUnmount,
        if fso.read_only { fuser::MountOption::RO } else { fuser::MountOption::RW },
    ];
    // Without allow_other, the kernel still gets allow_other (auto_unmount
    // needs it) and fuser answers only the mounting user and root.
    cfg.acl = if fso.allow_root_only { fuser::SessionACL::RootAndOwner } else { fuser::SessionACL::All };
    cfg.n_threads = Some(2);
    cfg.clone_fd = true;
    let _ = debug;
    let session = fuser::Session::new(fs, mnt, &cfg).map_err(|e| {
        let hint = if e.to_string().contains("/dev/fuse") {
            "\n(FUSE is not open to this user: mount as root, or make /dev/fuse usable by the user \
             (`ls -l /dev/fuse`; Debian's fuse3 makes it 0666) and set `user_allow_other` in /etc/fuse.conf, \
             as every iomfs mount uses allow_other)"
        } else if e.to_string().contains("allow_other") {
            "\n(set `user_allow_other` in /etc/fuse.conf: every iomfs mount uses allow_other)"
        } else {
            ""
        };
        anyhow::anyhow!("mount at {}: {e}{hint}", mnt.display())
    })?;
    let bg = session.spawn().context("start FUSE session")?;
    tune_readahead(mnt);
    tracing::info!(mount = %mnt.display(), "mounted");

    let (tx, rx) = std::sync::mpsc::channel::<&'static str>();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        let _ = bg.join();
        let _ = tx2.send("unmounted");
    });
    rt.spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal");
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("signal");
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        let _ = tx.send("signal");
    });
    let why = rx.recv().unwrap_or("unmounted");
    if why == "signal" {
        tracing::info!(mount = %mnt.display(), "signal: unmounting");
        fusermount_u(mnt);
        let _ = rx.recv_timeout(Duration::from_secs(10));
    }
    // Every task joined; closed handles still queued reach the namespace
    // before we go.
    let joined = rt.block_on(inner.stop(Duration::from_secs(5)));
    client.close();
    rt.shutdown_timeout(Duration::from_secs(2));
    if joined {
        tracing::info!(mount = %mnt.display(), "stopped cleanly: every task joined");
    }
    Ok(())
}

/// What `path` holds past byte `from` (at most its last 64 KiB).
pub fn read_from(path: &Path, from: u64) -> String {
    use std::io::{Read, Seek};
    let Ok(mut f) = std::fs::File::open(path) else { return String::new() };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let at = if len < from { 0 } else { from.max(len.saturating_sub(64 << 10)) };
    let mut out = Vec::new();
    let _ = f.seek(std::io::SeekFrom::Start(at)).and_then(|_| f.read_to_end(&mut out));
    String::from_utf8_lossy(&out).to_string()
}

/// Starts `iomfs mount` for `mnt` as a background process and returns its
/// pid once the mount is up. It logs to `log_file`, by default
/// D/mount_<path>.log.
pub fn mount_detached(dir: &Path, mnt: &Path, opts: &[String], log_file: Option<&Path>) -> Result<u32> {
    if !mnt.is_dir() {
        bail!("mount point {} is not a directory", mnt.display());
    }
    if is_mounted(mnt) {
        bail!("{} is already a mount point", mnt.display());
    }
    parse_options(opts)?;
    let exe = std::env::current_exe().context("locate the iomfs binary")?;
    let log_path = log_file.map(Path::to_path_buf).unwrap_or_else(|| fs_client::mount::mount_log(dir, mnt));
    // Kept across mounts (appended, rotated by size by the mount process).
    let (log, start_len) = super::open_log(&log_path)?;
    let mut cmd = Command::new(exe);
    cmd.arg("mount").arg("--dir").arg(dir).arg(mnt).arg("--log-file").arg(&log_path);
    for o in opts {
        cmd.arg("-o").arg(o);
    }
    cmd.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    if std::env::var_os("IOMFS_LOG").is_none() {
        cmd.env("IOMFS_LOG", "info");
    }
    super::detach(&mut cmd);
    let mut child = cmd.spawn().context("start the mount process")?;
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if is_mounted(mnt) {
            return Ok(child.id());
        }
        if let Ok(Some(st)) = child.try_wait() {
            let log = read_from(&log_path, start_len);
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            bail!("mount process exited ({st}):\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("{} did not appear as a mount within 40 s (log: {})", mnt.display(), log_path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `iomfs sync MNT`: the mount sends every buffered byte and publishes the
/// sizes (it watches for the `user.iomfs.sync` attribute being set).
pub fn sync(mnt: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    if !is_mounted(mnt) {
        bail!("{} is not a mount point", mnt.display());
    }
    let path = std::ffi::CString::new(mnt.as_os_str().as_bytes()).context("mount point path")?;
    let name = std::ffi::CString::new(fs_client::fs::SYNC_XATTR).expect("no NUL");
    // SAFETY: both strings are NUL-terminated and live across the call;
    // the value is one byte from a live slice.
    let r = unsafe { libc::setxattr(path.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        bail!("sync of {}: {e} (is it an iomfs mount?)", mnt.display());
    }
    Ok(())
}

/// `iomfs` called as a mount helper: as `mount.iomfs` or
/// `mount.fuse.iomfs` by mount(8) (`mount -t iomfs`, `-t fuse.iomfs`), or
/// as `iomfs SOURCE MOUNTPOINT -o OPTIONS` by mount.fuse3 (fuse3's helper
/// for `-t fuse.iomfs` when no `mount.fuse.iomfs` is installed). Returns
/// None when the arguments are an ordinary `iomfs` command line.
pub fn helper_args(args: &[std::ffi::OsString]) -> Option<Vec<String>> {
    let argv0 = args.first().map(|a| Path::new(a).file_name().unwrap_or_default().to_string_lossy().to_string())?;
    let rest: Vec<String> = args.iter().skip(1).map(|a| a.to_string_lossy().to_string()).collect();
    if argv0.starts_with("mount.") {
        return Some(rest);
    }
    // mount.fuse3's form: the first argument is a cluster directory.
    let first = rest.first()?;
    (!first.starts_with('-') && rest.len() >= 2 && Path::new(first).join(common::config::CONFIG_FILE).is_file())
        .then_some(rest)
}

/// Runs a mount helper's command line (`SOURCE MOUNTPOINT [-sfnv] [-N
/// NAMESPACE] [-o OPTIONS] [-t TYPE]`, see mount(8) "External helpers"):
/// mounts the cluster in SOURCE at MOUNTPOINT and returns once the mount is
/// up; prints nothing on success, as mount helpers do.
pub fn run_helper(args: &[String]) -> Result<()> {
    let mut pos = Vec::new();
    let mut opts = Vec::new();
    let mut fake = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "-o" => opts.push(it.next().context("mount helper: -o needs options")?.clone()),
            "-t" | "-N" => {
                it.next();
            }
            f if f.starts_with("-o") && f.len() > 2 => opts.push(f[2..].to_string()),
            f if f.starts_with('-') && f.len() > 1 && f[1..].chars().all(|c| "sfnvi".contains(c)) => {
                fake |= f.contains('f');
            }
            f if f.starts_with('-') => bail!("mount helper: unknown flag {f}"),
            p => pos.push(p.to_string()),
        }
    }
    let [src, mnt] = pos.as_slice() else {
        bail!("usage: mount.iomfs CLUSTER_DIR MOUNTPOINT [-o OPTIONS] (got {} paths)", pos.len());
    };
    parse_options(&opts)?;
    if fake {
        return Ok(());
    }
    mount_detached(Path::new(src), Path::new(mnt), &opts, None)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(s: &str) -> Result<FsOptions> {
        parse_options(&[s.to_string()]).map(|(o, _)| o)
    }

    #[test]
    fn a_smaller_buffer_takes_the_default_file_share_down_but_an_explicit_one_must_fit() {
        let (o, _) = parse_options(&["buffer_mb=32".to_string()]).unwrap();
        assert_eq!((o.buffer.total, o.buffer.per_file), (32 << 20, 32 << 20));
        let (o, _) = parse_options(&[String::new()]).unwrap();
        assert!(o.buffer.per_file < o.buffer.total);
        let e = parse_options(&["buffer_mb=32,buffer_file_mb=64".to_string()]).unwrap_err().to_string();
        assert!(e.contains("buffer_file_mb (64 MiB) is more than buffer_mb (32 MiB)"), "{e}");
    }

    #[test]
    fn bind_takes_an_ip_address_and_names_a_bad_one() {
        assert_eq!(opts("bind=127.0.0.100").unwrap().bind, Some("127.0.0.100".parse().unwrap()));
        assert_eq!(opts("bind=::1").unwrap().bind, Some("::1".parse().unwrap()));
        assert_eq!(opts("ro").unwrap().bind, None);
        let e = opts("bind=10.0.0.300").unwrap_err().to_string();
        assert!(e.contains("-o bind=10.0.0.300: not an IP address"), "{e}");
        let e = opts("bind").unwrap_err().to_string();
        assert!(e.contains("-o bind needs a local IP address"), "{e}");
    }
}
