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

/// A path as one word of a unit file's word list (`ExecStart=`,
/// `RequiresMountsFor=`): `%` doubled (systemd expands specifiers there),
/// and the whole word in double quotes with `\` and `"` escaped when it
/// holds anything but plain characters (the list is split at spaces, then
/// unquoted).
fn unit_path(p: &Path) -> String {
    let s = p.to_string_lossy().replace('%', "%%");
    if s.chars().all(|c| c.is_ascii_alphanumeric() || "/-_.:+@%".contains(c)) {
        return s;
    }
    let mut out = String::from("\"");
    for c in s.chars() {
        if c == '\\' || c == '"' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// `file://` and the path, bytes other than unreserved ones and `/`
/// percent-encoded.
fn file_url(p: &Path) -> String {
    let mut out = String::from("file://");
    for b in p.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The unit files for cluster `dir`: (file name, contents; a name with a
/// `/` is a drop-in in its unit's `.d` directory).
pub fn units(dir: &Path, cfg: &ClusterConfig, o: &UnitOptions) -> Result<Vec<(String, String)>> {
    let dir = std::fs::canonicalize(dir).with_context(|| format!("cluster directory {}", dir.display()))?;
    let d = dir.display();
    // Each value as its setting takes it: `dm`, a word of a command line or
    // path list; `dp`, a plain value (specifiers expanded); `url`, a URL.
    let dm = unit_path(&dir);
    let dp = d.to_string().replace('%', "%%");
    let url = file_url(&dir.join("cluster.toml")).replace('%', "%%");
    let server = unit_path(&o.bin_dir.join("iom-server"));
    let mut out = vec![(
        "iom-server@.service".to_string(),
        format!(
            "# iomfs IOM %i of the cluster in {d} (written by `iomfs install-units`).\n\
             # Start one per IOM on this host: systemctl enable --now iom-server@ID\n\
             [Unit]\n\
             Description=iomfs IOM %i ({dp})\n\
             Documentation={url}\n\
             Wants=network-online.target\n\
             After=network-online.target local-fs.target\n\
             # The configuration and certificates; each IOM's data and journal\n\
             # directories are in its drop-in iom-server@ID.service.d/iomfs-dirs.conf.\n\
             RequiresMountsFor={dm}\n\
             \n\
             [Service]\n\
             Type=notify\n\
             NotifyAccess=main\n\
             ExecStart={server} --dir {dm} --id %i\n\
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
        ),
    )];
    // Per IOM: its data and journal directories may be disks of their own
    // (`data_dir`, `journal_dir`). An IOM started before its disk is
    // mounted would find an empty directory (and refuse it as an empty
    // disk); systemd orders it after those mounts instead. A drop-in per
    // instance, so that one IOM's missing disk holds up only that IOM.
    let paths = common::config::ClusterPaths::new(&dir);
    for i in &cfg.ioms {
        let mut dirs = vec![paths.data_dir(i)];
        let j = paths.journal_dir(i);
        if !j.starts_with(&dirs[0]) {
            dirs.push(j);
        }
        let list: Vec<String> = dirs.iter().map(|p| unit_path(p)).collect();
        out.push((
            format!("iom-server@{}.service.d/iomfs-dirs.conf", i.id),
            format!(
                "# IOM {} of the cluster in {d}: its store and journal (written by `iomfs install-units`).\n\
                 [Unit]\n\
                 RequiresMountsFor={}\n",
                i.id,
                list.join(" ")
            ),
        ));
    }
    if let Some(m) = &o.mount {
        if !m.is_absolute() {
            bail!("--mount {}: a mount unit needs an absolute path", m.display());
        }
        let mut opts = vec!["_netdev".to_string()];
        opts.extend(o.options.iter().flat_map(|s| s.split(',')).filter(|s| !s.is_empty()).map(String::from));
        crate::cli::mount::parse_options(&opts)?;
        let mp = m.display().to_string().replace('%', "%%");
        let local: Vec<String> = (0..cfg.width()).map(|i| format!("iom-server@{i}.service")).collect();
        out.push((
            format!("{}.mount", escape_path(m)),
            format!(
                "# The iomfs cluster in {d} mounted at {} (written by `iomfs install-units`).\n\
                 # Needs the mount helper /sbin/mount.fuse.iomfs (scripts/install).\n\
                 [Unit]\n\
                 Description=iomfs at {mp}\n\
                 Wants=network-online.target\n\
                 After=network-online.target {}\n\
                 # The client's configuration and certificates.\n\
                 RequiresMountsFor={dm}\n\
                 \n\
                 [Mount]\n\
                 What={dp}\n\
                 Where={mp}\n\
                 Type=fuse.iomfs\n\
                 Options={}\n\
                 \n\
                 [Install]\n\
                 WantedBy=remote-fs.target\n",
                m.display(),
                local.join(" "),
                opts.join(",").replace('%', "%%")
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
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("create {}", parent.display()))?;
        }
        std::fs::write(&p, text).with_context(|| format!("write {}", p.display()))?;
        written.push(p);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_for_requires_mounts_for() {
        assert_eq!(unit_path(Path::new("/srv/iomfs/iom-0")), "/srv/iomfs/iom-0");
        assert_eq!(unit_path(Path::new("/srv/my disk")), "\"/srv/my disk\"");
        assert_eq!(unit_path(Path::new("/srv/50%")), "/srv/50%%");
        assert_eq!(file_url(Path::new("/srv/my disk/50%")), "file:///srv/my%20disk/50%25");
        assert_eq!(unit_path(Path::new("/a\"b\\c")), "\"/a\\\"b\\\\c\"");
    }

    #[test]
    fn paths_escape_as_systemd_escape_does() {
        assert_eq!(escape_path(Path::new("/mnt/iomfs")), "mnt-iomfs");
        assert_eq!(escape_path(Path::new("/mnt/my data/x-y/")), "mnt-my\\x20data-x\\x2dy");
        assert_eq!(escape_path(Path::new("/.hidden")), "\\x2ehidden");
        assert_eq!(escape_path(Path::new("/")), "-");
    }
}
