//! `iomfs install-units`: systemd units for the IOMs of a cluster on this
//! host (`iom-server@.service`, instance = IOM id, `Type=notify`) and, with
//! `--mount`, a mount unit for a client of it (`Type=fuse.iomfs`, through
//! the mount helper that `scripts/install` puts in /sbin).

use anyhow::{bail, Context, Result};
use common::config::ClusterConfig;
use std::path::{Path, PathBuf};

pub struct UnitOptions {
    /// Where the unit files go (`/etc/systemd/system`).
    pub out: PathBuf,
    /// Where `iom-server` is installed.
    pub bin_dir: PathBuf,
    /// A mount point for a mount unit, and its `-o` options.
    pub mount: Option<PathBuf>,
    pub options: Vec<String>,
}

/// systemd's escaping of a path into a unit name (`systemd-escape --path`):
/// `/mnt/iomfs data` → `mnt-iomfs\x20data`.
pub fn escape_path(p: &Path) -> String {
    let s = p.to_string_lossy();
    let t = s.trim_matches('/');
    if t.is_empty() {
        return "-".into();
    }
    let mut out = String::new();
    for (i, b) in t.bytes().enumerate() {
        match b {
            b'/' => out.push('-'),
            b'.' if i == 0 => out.push_str("\\x2e"),
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b':' | b'_' | b'.' => out.push(b as char),
            _ => out.push_str(&format!("\\x{b:02x}")),
        }
    }
    out
}

/// The unit files for cluster `dir`: (file name, contents).
pub fn units(dir: &Path, cfg: &ClusterConfig, o: &UnitOptions) -> Result<Vec<(String, String)>> {
    let dir = std::fs::canonicalize(dir).with_context(|| format!("cluster directory {}", dir.display()))?;
    let d = dir.display();
    let server = o.bin_dir.join("iom-server");
    let mut out = vec![(
        "iom-server@.service".to_string(),
        format!(
            "# iomfs IOM %i of the cluster in {d} (written by `iomfs install-units`).\n\
             # Start one per IOM on this host: systemctl enable --now iom-server@ID\n\
             [Unit]\n\
             Description=iomfs IOM %i ({d})\n\
             Documentation=file://{d}/cluster.toml\n\
             Wants=network-online.target\n\
             After=network-online.target local-fs.target\n\
             \n\
             [Service]\n\
             Type=notify\n\
             NotifyAccess=main\n\
             ExecStart={} --dir {d} --id %i\n\
             # SIGTERM: an orderly stop (writes in flight finish, journal closed).\n\
             KillSignal=SIGTERM\n\
             TimeoutStopSec=90\n\
             Restart=on-failure\n\
             RestartSec=2\n\
             # Exit 3: declared down and restarted itself too often in 10 minutes;\n\
             # exit 70: a bug stopped it. Both are logged; systemd restarts after RestartSec.\n\
             LimitNOFILE=65536\n\
             \n\
             [Install]\n\
             WantedBy=multi-user.target\n",
            server.display()
        ),
    )];
    if let Some(m) = &o.mount {
        if !m.is_absolute() {
            bail!("--mount {}: a mount unit needs an absolute path", m.display());
        }
        let mut opts = vec!["_netdev".to_string()];
        opts.extend(o.options.iter().flat_map(|s| s.split(',')).filter(|s| !s.is_empty()).map(String::from));
        crate::cli::mount::parse_options(&opts)?;
        let local: Vec<String> = (0..cfg.width()).map(|i| format!("iom-server@{i}.service")).collect();
        out.push((
            format!("{}.mount", escape_path(m)),
            format!(
                "# The iomfs cluster in {d} mounted at {} (written by `iomfs install-units`).\n\
                 # Needs the mount helper /sbin/mount.fuse.iomfs (scripts/install).\n\
                 [Unit]\n\
                 Description=iomfs at {}\n\
                 Wants=network-online.target\n\
                 After=network-online.target {}\n\
                 \n\
                 [Mount]\n\
                 What={d}\n\
                 Where={}\n\
                 Type=fuse.iomfs\n\
                 Options={}\n\
                 \n\
                 [Install]\n\
                 WantedBy=remote-fs.target\n",
                m.display(),
                m.display(),
                local.join(" "),
                m.display(),
                opts.join(",")
            ),
        ));
    }
    Ok(out)
}

/// Writes the units into `o.out`; returns their paths.
pub fn install(dir: &Path, o: &UnitOptions) -> Result<Vec<PathBuf>> {
    let cfg = ClusterConfig::load(dir)?;
    let server = o.bin_dir.join("iom-server");
    if !server.is_file() {
        bail!(
            "{} does not exist: install the binaries first (scripts/install), or name their directory with --bin-dir",
            server.display()
        );
    }
    std::fs::create_dir_all(&o.out).with_context(|| format!("create {}", o.out.display()))?;
    let mut written = Vec::new();
    for (name, text) in units(dir, &cfg, o)? {
        let p = o.out.join(&name);
        std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_escape_as_systemd_escape_does() {
        assert_eq!(escape_path(Path::new("/mnt/iomfs")), "mnt-iomfs");
        assert_eq!(escape_path(Path::new("/mnt/my data/x-y/")), "mnt-my\\x20data-x\\x2dy");
        assert_eq!(escape_path(Path::new("/.hidden")), "\\x2ehidden");
        assert_eq!(escape_path(Path::new("/")), "-");
    }
}
