//! `iomfs init`: makes a cluster directory (config, CA, certificates, one
//! `iom-<id>/` per IOM).
//!
//! Invariants: an existing cluster directory is never overwritten; the
//! config is written last, so its presence marks a complete directory.

use anyhow::{bail, Context, Result};
use common::config::{ClusterConfig, ClusterPaths, IomConfig, TransportProfile, Tuning, CLUSTER_FORMAT_VERSION};
use common::IomId;
use net::pki::{self, Ca};
use std::path::Path;

pub struct InitOptions {
    pub ioms: u32,
    pub block_size: u32,
    /// Explicit addresses (host:port), one per IOM.
    pub addrs: Option<Vec<String>>,
    /// Host for generated addresses (default 127.0.0.1).
    pub host: String,
    /// First UDP port for generated addresses; 0 picks free ports.
    pub base_port: u16,
    pub meta_home: u32,
    pub transport: TransportProfile,
    /// IOM i's Prometheus endpoint on 127.0.0.1:(port + i); none: off.
    pub metrics_port: Option<u16>,
}

/// Parses sizes like `64K`, `64KiB`, `1M`, `65536` (common's parser).
pub fn parse_size(s: &str) -> Result<u64> {
    common::config::parse_size(s).map_err(anyhow::Error::msg)
}

fn free_udp_ports(host: &str, n: u32) -> Result<Vec<u16>> {
    // Hold all sockets until every port is chosen so they are distinct.
    let socks: Vec<std::net::UdpSocket> = (0..n)
        .map(|_| std::net::UdpSocket::bind((host, 0)).with_context(|| format!("cannot bind a UDP port on {host}")))
        .collect::<Result<_>>()?;
    Ok(socks.iter().map(|s| s.local_addr().map(|a| a.port()).unwrap_or(0)).collect())
}

pub fn init(dir: &Path, o: &InitOptions) -> Result<ClusterConfig> {
    let paths = ClusterPaths::new(dir);
    if paths.config().exists() {
        bail!(
            "{} already holds an iomfs cluster ({} exists); refusing to overwrite it",
            dir.display(),
            paths.config().display()
        );
    }
    if !(common::layout::MIN_WIDTH..=common::layout::MAX_WIDTH).contains(&o.ioms) {
        bail!("--ioms {}: a cluster needs 3 to 64 IOMs (N data + 1 parity, N >= 2)", o.ioms);
    }
    if common::Layout::new(o.ioms, o.block_size).is_none() {
        bail!("--block-size {}: must be a power of two from 4K to 4M", o.block_size);
    }
    if let Some(p) = o.metrics_port {
        if p as u32 + o.ioms > 65536 || p == 0 {
            bail!("--metrics-port {p}: the {} IOMs need ports {p} to {} (1 to 65535)", o.ioms, p as u32 + o.ioms - 1);
        }
    }
    if o.meta_home >= o.ioms {
        bail!("--meta-home {} is not an IOM id (0..{})", o.meta_home, o.ioms);
    }
    let addrs = match &o.addrs {
        Some(a) => {
            if a.len() != o.ioms as usize {
                bail!("--addrs lists {} addresses for {} IOMs", a.len(), o.ioms);
            }
            a.clone()
        }
        None if o.base_port != 0 => (0..o.ioms).map(|i| format!("{}:{}", o.host, o.base_port as u32 + i)).collect(),
        None => free_udp_ports(&o.host, o.ioms)?.into_iter().map(|p| format!("{}:{p}", o.host)).collect(),
    };
    for d in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if d.file_name().to_string_lossy().starts_with("iom-") {
            bail!("{} holds {} from an earlier cluster; use an empty directory", dir.display(), d.path().display());
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let cluster_id: String = (0..8).map(|_| format!("{:02x}", rand::random::<u8>())).collect();
    let cfg = ClusterConfig {
        format_version: CLUSTER_FORMAT_VERSION,
        cluster_id: cluster_id.clone(),
        block_size: o.block_size,
        meta_home: o.meta_home,
        transport: o.transport,
        tuning: Tuning::default(),
        ioms: addrs
            .iter()
            .enumerate()
            .map(|(i, a)| IomConfig {
                id: i as u32,
                addr: a.clone(),
                data_dir: None,
                journal_dir: None,
                capacity: None,
                metrics_addr: o.metrics_port.map(|p| format!("127.0.0.1:{}", p as u32 + i as u32)),
            })
            .collect(),
    };
    cfg.validate(&paths.config())?;

    let ca = Ca::generate(&cluster_id)?;
    pki::write_pem(&paths.ca_cert(), &ca.cert_pem, false)?;
    pki::write_pem(&paths.ca_key(), &ca.key_pem, true)?;
    for i in 0..o.ioms {
        let id = IomId(i);
        std::fs::create_dir_all(paths.iom_dir(id))
            .with_context(|| format!("create {}", paths.iom_dir(id).display()))?;
        let host = addrs[i as usize].rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or("localhost");
        let mut names = vec![pki::iom_server_name(i), "localhost".to_string()];
        if host.parse::<std::net::IpAddr>().is_err() && host != "localhost" {
            names.push(host.to_string());
        }
        let c = ca.issue(&format!("iomfs IOM {i}"), &names)?;
        pki::write_pem(&paths.node_cert(id), &c.cert_pem, false)?;
        pki::write_pem(&paths.node_key(id), &c.key_pem, true)?;
        let marker = paths.new_store_marker(id);
        std::fs::write(&marker, "new\n").with_context(|| format!("write {}", marker.display()))?;
    }
    let c = ca.issue("iomfs client", &["client".to_string()])?;
    pki::write_pem(&paths.client_cert(), &c.cert_pem, false)?;
    pki::write_pem(&paths.client_key(), &c.key_pem, true)?;
    // The config is written last: its presence marks a complete cluster directory.
    let tmp = paths.config().with_extension("toml.tmp");
    std::fs::write(&tmp, cfg.to_toml()).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, paths.config()).with_context(|| format!("write {}", paths.config().display()))?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("big").is_err());
    }

    #[test]
    fn init_and_refuse_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let o = InitOptions {
            ioms: 5,
            block_size: 65536,
            addrs: None,
            host: "127.0.0.1".into(),
            base_port: 0,
            meta_home: 0,
            transport: TransportProfile::Loopback,
            metrics_port: None,
        };
        let cfg = init(d.path(), &o).unwrap();
        assert_eq!(cfg.ioms.len(), 5);
        assert!(d.path().join("iom-4/node.pem").exists());
        let again = init(d.path(), &o).unwrap_err().to_string();
        assert!(again.contains("refusing to overwrite"), "{again}");
        let loaded = ClusterConfig::load(d.path()).unwrap();
        assert_eq!(loaded, cfg);
        let bad = InitOptions { ioms: 2, ..o };
        let e = init(tempfile::tempdir().unwrap().path(), &bad).unwrap_err().to_string();
        assert!(e.contains("3 to 64"), "{e}");
    }
}
