//! The cluster map this IOM last accepted, kept durably in its data directory.

use crate::Error;
use common::cluster::ClusterMap;
use common::codec;
use std::path::Path;

const FILE: &str = "cluster.state";

pub fn load(dir: &Path) -> Result<Option<ClusterMap>, Error> {
    let p = dir.join(FILE);
    match std::fs::read(&p) {
        Ok(b) => codec::decode(&b).map(Some).map_err(|e| Error::Format(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("read {}", p.display()), e)),
    }
}

pub fn save(dir: &Path, m: &ClusterMap) -> Result<(), Error> {
    let b = codec::encode(m).map_err(|e| Error::Format(e.to_string()))?;
    crate::fsutil::write_atomic(&dir.join(FILE), &b)
}
