//! Cluster configuration (`D/cluster.toml`) and the layout of a cluster directory.

use crate::ids::IomId;
use crate::layout::Layout;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Version of the cluster directory format written by `iomfs init`.
pub const CLUSTER_FORMAT_VERSION: u32 = 1;
pub const CONFIG_FILE: &str = "cluster.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("no cluster config at {0}: run `iomfs init --dir DIR` first, or pass the right --dir")]
    Missing(PathBuf),
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("bad cluster config {path}: {msg}")]
    Parse { path: PathBuf, msg: String },
    #[error("cluster directory {path} has format version {found}; this build of iomfs reads version {supported}")]
    Version { path: PathBuf, found: u32, supported: u32 },
    #[error("bad cluster config {path}: {msg}")]
    Invalid { path: PathBuf, msg: String },
    #[error("IOM {0} is not in this cluster's config")]
    UnknownIom(u32),
}

/// Parses a size such as `65536`, `64K`, `64k`, `64KiB`, `64KB`, `1M`,
/// `1MiB`, `2G` (binary units: K = 1024); an error names the problem and
/// shows the forms accepted. Sizes that do not fit in 64 bits are refused.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(format!("'{s}' is not a size (examples: 65536, 64K, 64KiB, 1M, 2G)")),
    };
    let n: u64 = num.parse().map_err(|_| format!("'{s}' is not a size (examples: 65536, 64K, 64KiB, 1M, 2G)"))?;
    n.checked_mul(1u64 << shift).ok_or_else(|| format!("'{s}' is too large"))
}

/// `block_size` in cluster.toml: a number of bytes or a size string
/// (`"64K"`, `"64KiB"`), as the command line takes it.
fn de_block_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        N(u64),
        S(String),
    }
    let n = match Size::deserialize(d)? {
        Size::N(n) => n,
        Size::S(s) => parse_size(&s).map_err(serde::de::Error::custom)?,
    };
    u32::try_from(n).map_err(|_| serde::de::Error::custom(format!("block_size {n} is larger than 4 MiB")))
}

/// Transport tuning profile (see docs/operations.md and LIMITS.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum TransportProfile {
    /// Loopback or jumbo-frame datacentre links: 64 KB packets, big windows, GSO off.
    #[default]
    Loopback,
    /// Ordinary 1500-byte Ethernet: MTU discovery up to 9000, big windows.
    Lan,
    /// quinn's internet defaults.
    Wan,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Tuning {
    /// IOM buffer cache, MiB.
    pub cache_mib: u64,
    /// Longest a journal record waits before a background flush, milliseconds.
    pub journal_flush_ms: u64,
    /// Heartbeat period between IOMs, milliseconds.
    pub heartbeat_ms: u64,
    /// An IOM silent this long is suspected down, milliseconds.
    pub failure_timeout_ms: u64,
    /// Background rebuild rate limit, MiB/s (0 = unlimited).
    pub rebuild_mib_s: u64,
    /// How long a client waits for a stopped cluster before EIO, seconds.
    pub stopped_wait_s: u64,
    /// IOM runtime worker threads; 0 = one thread drives everything (no
    /// cross-thread wake-ups per message: the lowest latency when several
    /// IOMs share a machine's cores). Disk syncs have their own threads
    /// either way.
    pub iom_threads: u32,
    /// Read errors and checksum mismatches of its own disk (each repaired
    /// from the group) after which an IOM stops itself, as a disk that
    /// keeps failing must be replaced rather than repaired block by block.
    pub disk_errors_before_stop: u64,
    /// A client the namespace has not heard from for this long loses its
    /// session: files it held open but had unlinked are reclaimed, and its
    /// handles of such files answer ESTALE. Seconds.
    pub client_lease_s: u64,
    /// Journal growth after which an IOM writes a checkpoint of its block
    /// map (and of the namespace, on the IOMs that hold it) and drops the
    /// journal before it, MiB. Smaller: faster restarts, more checkpoint
    /// writes.
    pub checkpoint_mib: u64,
    /// Clients send a whole parity group written over absent blocks as a
    /// stripe: the parity block's delta computed by the client and sent
    /// to the parity IOM directly, so the data cross the network once
    /// (protocol 10; `false` sends every block's delta through its data
    /// IOM). Written to cluster.toml only when turned off.
    #[serde(skip_serializing_if = "is_true")]
    pub client_stripes: bool,
}

fn is_true(b: &bool) -> bool {
    *b
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            cache_mib: 128,
            journal_flush_ms: 20,
            heartbeat_ms: 100,
            failure_timeout_ms: 2000,
            rebuild_mib_s: 0,
            stopped_wait_s: 60,
            iom_threads: 0,
            disk_errors_before_stop: 10,
            client_lease_s: 30,
            checkpoint_mib: 64,
            client_stripes: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IomConfig {
    pub id: u32,
    /// host:port (UDP) this IOM listens on.
    pub addr: String,
    /// Storage directory; default `D/iom-<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// Separate journal directory (e.g. on NVRAM); default inside data_dir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub journal_dir: Option<PathBuf>,
    /// Capacity of the block store in bytes; default: the free space of data_dir's filesystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<u64>,
    /// ip:port of this IOM's Prometheus endpoint (plain HTTP, `/metrics`);
    /// none: no endpoint. Bind it to an address only the monitoring
    /// network reaches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub format_version: u32,
    pub cluster_id: String,
    #[serde(deserialize_with = "de_block_size")]
    pub block_size: u32,
    /// The IOM that is home of the namespace; its proxy mirrors it.
    #[serde(default)]
    pub meta_home: u32,
    #[serde(default)]
    pub transport: TransportProfile,
    #[serde(default)]
    pub tuning: Tuning,
    #[serde(rename = "iom")]
    pub ioms: Vec<IomConfig>,
}

impl ClusterConfig {
    pub fn layout(&self) -> Layout {
        Layout::new(self.ioms.len() as u32, self.block_size).expect("validated at load")
    }
    pub fn width(&self) -> u32 {
        self.ioms.len() as u32
    }
    pub fn iom(&self, id: IomId) -> Result<&IomConfig, ConfigError> {
        self.ioms.get(id.0 as usize).ok_or(ConfigError::UnknownIom(id.0))
    }

    /// Checks invariants; `path` names the file in messages.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |msg: String| ConfigError::Invalid { path: path.to_path_buf(), msg };
        if self.format_version != CLUSTER_FORMAT_VERSION {
            return Err(ConfigError::Version {
                path: path.to_path_buf(),
                found: self.format_version,
                supported: CLUSTER_FORMAT_VERSION,
            });
        }
        if Layout::new(self.ioms.len() as u32, self.block_size).is_none() {
            return Err(bad(format!(
                "{} IOMs with block_size {}: need 3..=64 IOMs and a power-of-two block size from 4 KiB to 4 MiB",
                self.ioms.len(),
                self.block_size
            )));
        }
        for (i, iom) in self.ioms.iter().enumerate() {
            if iom.id as usize != i {
                return Err(bad(format!("[[iom]] entry {i} has id {}; ids must be 0,1,2,... in order", iom.id)));
            }
            if iom.addr.parse::<std::net::SocketAddr>().is_err() && !iom.addr.contains(':') {
                return Err(bad(format!("IOM {} address '{}' is not host:port", iom.id, iom.addr)));
            }
            if let Some(m) = &iom.metrics_addr {
                if let Err(e) = m.parse::<std::net::SocketAddr>() {
                    return Err(bad(format!(
                        "IOM {} metrics_addr '{m}' is not an IP address and port ({e}); \
                         write it as \"127.0.0.1:9400\", or remove the line to turn the endpoint off",
                        iom.id
                    )));
                }
            }
        }
        if self.meta_home as usize >= self.ioms.len() {
            return Err(bad(format!("meta_home {} is not an IOM id", self.meta_home)));
        }
        if self.cluster_id.is_empty() {
            return Err(bad("empty cluster_id".into()));
        }
        let t = &self.tuning;
        let ranges: [(&str, u64, u64, u64, &str); 5] = [
            ("heartbeat_ms", t.heartbeat_ms, 10, 10_000, "100"),
            ("failure_timeout_ms", t.failure_timeout_ms, 100, 600_000, "2000"),
            ("journal_flush_ms", t.journal_flush_ms, 1, 10_000, "20"),
            ("stopped_wait_s", t.stopped_wait_s, 1, 86_400, "60"),
            ("cache_mib", t.cache_mib, 0, 1 << 20, "128"),
        ];
        for (name, v, lo, hi, default) in ranges {
            if !(lo..=hi).contains(&v) {
                return Err(bad(format!("tuning.{name} {v} is out of range: {lo} to {hi} (the default is {default})")));
            }
        }
        if t.failure_timeout_ms < 3 * t.heartbeat_ms {
            return Err(bad(format!(
                "tuning.failure_timeout_ms {} is less than three heartbeats ({} ms each): a healthy IOM would be \
                 declared down; raise failure_timeout_ms or lower heartbeat_ms",
                t.failure_timeout_ms, t.heartbeat_ms
            )));
        }
        if self.tuning.iom_threads > 256 {
            return Err(bad(format!("tuning.iom_threads {} is more than 256", self.tuning.iom_threads)));
        }
        if self.tuning.client_lease_s < 2 {
            return Err(bad(format!(
                "tuning.client_lease_s {} is too short: a client's lease must outlive a namespace failover \
                 (keep it well above failure_timeout_ms; the default is 30)",
                self.tuning.client_lease_s
            )));
        }
        if self.tuning.checkpoint_mib == 0 || self.tuning.checkpoint_mib > 1 << 20 {
            return Err(bad(format!(
                "tuning.checkpoint_mib {} is out of range: 1 to 1048576 MiB of journal between checkpoints \
                 (the default is 64)",
                self.tuning.checkpoint_mib
            )));
        }
        Ok(())
    }

    /// Journal bytes between two checkpoints.
    pub fn checkpoint_bytes(&self) -> u64 {
        self.tuning.checkpoint_mib << 20
    }

    /// How long a client session lives without contact.
    pub fn client_lease(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.tuning.client_lease_s)
    }

    pub fn load(dir: &Path) -> Result<ClusterConfig, ConfigError> {
        let path = ClusterPaths::new(dir).config();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ConfigError::Missing(path)),
            Err(err) => return Err(ConfigError::Read { path, err }),
        };
        Self::parse(&text, &path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<ClusterConfig, ConfigError> {
        // Read the version first so a newer format gets a version error, not a parse error.
        #[derive(Deserialize)]
        struct VersionOnly {
            format_version: Option<u32>,
        }
        if let Ok(VersionOnly { format_version: Some(v) }) = toml::from_str::<VersionOnly>(text) {
            if v != CLUSTER_FORMAT_VERSION {
                return Err(ConfigError::Version {
                    path: path.to_path_buf(),
                    found: v,
                    supported: CLUSTER_FORMAT_VERSION,
                });
            }
        }
        let cfg: ClusterConfig =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_path_buf(), msg: e.to_string() })?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

/// Where things live inside a cluster directory D.
#[derive(Clone, Debug)]
pub struct ClusterPaths {
    pub dir: PathBuf,
}

impl ClusterPaths {
    pub fn new(dir: &Path) -> ClusterPaths {
        ClusterPaths { dir: dir.to_path_buf() }
    }
    pub fn config(&self) -> PathBuf {
        self.dir.join(CONFIG_FILE)
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn client_cert(&self) -> PathBuf {
        self.dir.join("client.pem")
    }
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client.key")
    }
    /// `D/iom-<id>`: certificates, pid file and (by default) storage of one IOM.
    pub fn iom_dir(&self, id: IomId) -> PathBuf {
        self.dir.join(format!("iom-{}", id.0))
    }
    pub fn node_cert(&self, id: IomId) -> PathBuf {
        self.iom_dir(id).join("node.pem")
    }
    pub fn node_key(&self, id: IomId) -> PathBuf {
        self.iom_dir(id).join("node.key")
    }
    pub fn pid(&self, id: IomId) -> PathBuf {
        self.iom_dir(id).join("pid")
    }
    /// Marker that lets IOM `id` create an empty store: written by `iomfs
    /// init` (content `new`) and `iomfs replace` (content `replace`), removed
    /// once the store exists. An IOM whose store is missing and that has no
    /// marker refuses to start: its disk was replaced or lost, and serving
    /// from an empty store would return zeros for everything it held.
    pub fn new_store_marker(&self, id: IomId) -> PathBuf {
        self.iom_dir(id).join("store.new")
    }
    pub fn log(&self, id: IomId) -> PathBuf {
        self.iom_dir(id).join("iom.log")
    }
    /// Storage directory of an IOM, honouring `data_dir`.
    pub fn data_dir(&self, cfg: &IomConfig) -> PathBuf {
        match &cfg.data_dir {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => self.dir.join(p),
            None => self.iom_dir(IomId(cfg.id)),
        }
    }
    pub fn journal_dir(&self, cfg: &IomConfig) -> PathBuf {
        match &cfg.journal_dir {
            Some(p) if p.is_absolute() => p.clone(),
            Some(p) => self.dir.join(p),
            None => self.data_dir(cfg).join("journal"),
        }
    }
    /// State of a local cluster started by `iomfs local` (mount point, client pid).
    pub fn local_state(&self) -> PathBuf {
        self.dir.join("local.toml")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ClusterConfig {
        ClusterConfig {
            format_version: CLUSTER_FORMAT_VERSION,
            cluster_id: "c1".into(),
            block_size: 65536,
            meta_home: 0,
            transport: TransportProfile::Loopback,
            tuning: Tuning::default(),
            ioms: (0..5)
                .map(|i| IomConfig {
                    id: i,
                    addr: format!("127.0.0.1:{}", 7000 + i),
                    data_dir: None,
                    journal_dir: None,
                    capacity: None,
                    metrics_addr: None,
                })
                .collect(),
        }
    }

    #[test]
    fn roundtrip() {
        let c = sample();
        let t = c.to_toml();
        let back = ClusterConfig::parse(&t, Path::new("x")).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn sizes_parse_in_every_usual_form_and_never_wrap() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64 KB"), Ok(65536));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("17179869184G").unwrap_err().contains("too large"));
        assert!(parse_size("big").unwrap_err().contains("not a size"));
        assert!(parse_size("-1").unwrap_err().contains("not a size"));
        assert!(parse_size("").unwrap_err().contains("not a size"));
    }

    #[test]
    fn errors_name_the_problem() {
        let p = Path::new("/d/cluster.toml");
        let e = ClusterConfig::parse("format_version = 9\n", p).unwrap_err().to_string();
        assert!(e.contains("format version 9"), "{e}");
        let e = ClusterConfig::parse("format_version = 1\nblock_size = \"x\"", p).unwrap_err().to_string();
        assert!(e.contains("/d/cluster.toml"), "{e}");
        let mut c = sample();
        c.ioms.truncate(2);
        let e = ClusterConfig::parse(&c.to_toml(), p).unwrap_err().to_string();
        assert!(e.contains("2 IOMs"), "{e}");
        let mut c = sample();
        c.ioms[3].id = 7;
        let e = ClusterConfig::parse(&c.to_toml(), p).unwrap_err().to_string();
        assert!(e.contains("ids must be"), "{e}");
        let mut c = sample();
        c.tuning.client_lease_s = 1;
        let e = ClusterConfig::parse(&c.to_toml(), p).unwrap_err().to_string();
        assert!(e.contains("client_lease_s 1 is too short"), "{e}");
        let mut c = sample();
        c.ioms[2].metrics_addr = Some("localhost:9400".into());
        let e = ClusterConfig::parse(&c.to_toml(), p).unwrap_err().to_string();
        assert!(e.contains("IOM 2 metrics_addr 'localhost:9400' is not an IP address and port"), "{e}");
        c.ioms[2].metrics_addr = Some("127.0.0.1:9402".into());
        assert_eq!(ClusterConfig::parse(&c.to_toml(), p).unwrap(), c);
        for (key, v, want) in [
            ("heartbeat_ms", 0, "tuning.heartbeat_ms 0 is out of range: 10 to 10000"),
            ("failure_timeout_ms", 0, "tuning.failure_timeout_ms 0 is out of range"),
            ("failure_timeout_ms", 250, "less than three heartbeats"),
            ("journal_flush_ms", 0, "tuning.journal_flush_ms 0 is out of range"),
        ] {
            let text = sample().to_toml().replace(&format!("{key} = "), &format!("{key} = {v} # "));
            let e = ClusterConfig::parse(&text, p).unwrap_err().to_string();
            assert!(e.contains(want), "{key} = {v}: {e}");
        }
        // block_size as the command line writes it.
        for (v, want) in [("\"64K\"", 65536), ("\"64KiB\"", 65536), ("\"1M\"", 1 << 20), ("65536", 65536)] {
            let text = sample().to_toml().replace("block_size = 65536", &format!("block_size = {v}"));
            assert_eq!(ClusterConfig::parse(&text, p).unwrap().block_size, want, "{v}");
        }
        let text = sample().to_toml().replace("block_size = 65536", "block_size = \"64X\"");
        let e = ClusterConfig::parse(&text, p).unwrap_err().to_string();
        assert!(e.contains("'64X' is not a size"), "{e}");
        let e = ClusterConfig::load(Path::new("/nonexistent-dir")).unwrap_err().to_string();
        assert!(e.contains("iomfs init"), "{e}");
    }
}
