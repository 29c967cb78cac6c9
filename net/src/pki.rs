//! The cluster certificate authority and per-node certificates (rcgen),
//! made at `iomfs init`, stored as PEM in the cluster directory.

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose as Eku, IsCa, Issuer, KeyPair,
    KeyUsagePurpose as Ku,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Gen(#[from] rcgen::Error),
    #[error("cannot read {path}: {err}")]
    Read { path: String, err: String },
    #[error("cannot write {path}: {err}")]
    Write { path: String, err: std::io::Error },
}

/// A freshly made CA, able to sign node certificates.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A signed certificate and its private key, PEM encoded.
pub struct NodeCert {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The TLS server name every IOM certificate carries for IOM `id`.
pub fn iom_server_name(id: u32) -> String {
    format!("iom-{id}")
}

impl Ca {
    pub fn generate(cluster_id: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![Ku::KeyCertSign, Ku::CrlSign, Ku::DigitalSignature];
        params.distinguished_name.push(DnType::CommonName, format!("iomfs cluster {cluster_id} CA"));
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Ca { issuer: Issuer::new(params, key), cert_pem: cert.pem(), key_pem })
    }

    /// A certificate usable both as TLS server and client (IOMs talk both ways).
    pub fn issue(&self, common_name: &str, dns_names: &[String]) -> Result<NodeCert, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params.distinguished_name.push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![Eku::ServerAuth, Eku::ClientAuth];
        params.key_usages = vec![Ku::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(NodeCert { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }
}

/// Writes a PEM file readable only by its owner when it is a key.
pub fn write_pem(path: &Path, pem: &str, secret: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true).mode(if secret { 0o600 } else { 0o644 });
    let mut f = o.open(path).map_err(|err| PkiError::Write { path: path.display().to_string(), err })?;
    f.write_all(pem.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|err| PkiError::Write { path: path.display().to_string(), err })
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let rd = |e: String| PkiError::Read { path: path.display().to_string(), err: e };
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| rd(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| rd(e.to_string()))?;
    if certs.is_empty() {
        return Err(rd("no certificate in file".into()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    // Keys are readable by their owner only (0600): say so rather than
    // leave a bare "Permission denied".
    if let Err(e) = std::fs::File::open(path) {
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            return Err(PkiError::Read {
                path: path.display().to_string(),
                err: format!(
                    "{e}: the cluster's keys are readable by their owner only; run as root or as the owner \
                     of the cluster directory"
                ),
            });
        }
    }
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| PkiError::Read { path: path.display().to_string(), err: e.to_string() })
}
