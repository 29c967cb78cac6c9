//! Mutual TLS 1.3 configurations and tuned quinn transport settings.

use crate::pki::{self, PkiError};
use common::config::{ClusterPaths, TransportProfile};
use common::wire::ALPN;
use common::IomId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("TLS setup: {0}")]
    Verifier(String),
    #[error("QUIC crypto setup: {0}")]
    Quic(String),
}

/// A node's certificate chain and key plus the cluster CA it trusts.
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: Vec<CertificateDer<'static>>,
}

impl Identity {
    pub fn load_iom(paths: &ClusterPaths, id: IomId) -> Result<Identity, TlsError> {
        Ok(Identity {
            certs: pki::load_certs(&paths.node_cert(id))?,
            key: pki::load_key(&paths.node_key(id))?,
            ca: pki::load_certs(&paths.ca_cert())?,
        })
    }
    pub fn load_client(paths: &ClusterPaths) -> Result<Identity, TlsError> {
        Ok(Identity {
            certs: pki::load_certs(&paths.client_cert())?,
            key: pki::load_key(&paths.client_key())?,
            ca: pki::load_certs(&paths.ca_cert())?,
        })
    }
}

/// ring provider with AES-128-GCM preferred (about 15 % cheaper than AES-256 here).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

fn roots(id: &Identity) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in &id.ca {
        roots.add(c.clone())?;
    }
    Ok(Arc::new(roots))
}

/// Server side: only peers with a certificate signed by the cluster CA get in.
pub fn server_config(id: &Identity, profile: TransportProfile) -> Result<quinn::ServerConfig, TlsError> {
    let p = provider();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots(id)?, p.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(p)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.certs.clone(), id.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(transport(profile));
    sc.migration(false);
    Ok(sc)
}

/// Client side: presents this node's certificate, trusts only the cluster CA.
pub fn client_config(id: &Identity, profile: TransportProfile) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(id)?)
        .with_client_auth_cert(id.certs.clone(), id.key.clone_key())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    cc.transport_config(transport(profile));
    Ok(cc)
}

/// A client config that presents no certificate (tests: must be refused).
pub fn anonymous_client_config(ca: &[CertificateDer<'static>]) -> Result<quinn::ClientConfig, TlsError> {
    let mut r = rustls::RootCertStore::empty();
    for c in ca {
        r.add(c.clone())?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(r)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Quic(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Transport settings per profile. Loopback: 64 KB packets (initial MTU
/// 16383, the largest quinn accepts, discovery up to 65527), big windows,
/// GSO off (quinn would batch sends over the kernel's 64 KB limit), a 1 MiB
/// initial congestion window. See LIMITS.md for the measurements.
/// Loopback and LAN assume a 10 ms round trip before the first sample
/// (quinn's default is the RFC's 333 ms, made for the internet): a first
/// handshake packet lost to a peer that was not listening yet (IOMs
/// starting together) is sent again after ~30 ms instead of ~1 s.
pub fn transport(profile: TransportProfile) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(quinn::VarInt::from_u32(4096));
    t.max_concurrent_uni_streams(quinn::VarInt::from_u32(64));
    t.keep_alive_interval(Some(Duration::from_millis(500)));
    t.max_idle_timeout(Some(quinn::VarInt::from_u32(5_000).into()));
    match profile {
        TransportProfile::Loopback => {
            t.initial_rtt(Duration::from_millis(10));
            t.initial_mtu(16383).min_mtu(16383);
            let mut mtud = quinn::MtuDiscoveryConfig::default();
            mtud.upper_bound(65527);
            t.mtu_discovery_config(Some(mtud));
            let mut cubic = quinn::congestion::CubicConfig::default();
            cubic.initial_window(1 << 20);
            t.congestion_controller_factory(Arc::new(cubic));
            t.enable_segmentation_offload(false);
            t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
            t.receive_window(quinn::VarInt::from_u32(64 << 20));
            t.send_window(64 << 20);
        }
        TransportProfile::Lan => {
            t.initial_rtt(Duration::from_millis(10));
            let mut mtud = quinn::MtuDiscoveryConfig::default();
            mtud.upper_bound(8952);
            t.mtu_discovery_config(Some(mtud));
            t.stream_receive_window(quinn::VarInt::from_u32(16 << 20));
            t.receive_window(quinn::VarInt::from_u32(64 << 20));
            t.send_window(64 << 20);
        }
        TransportProfile::Wan => {}
    }
    Arc::new(t)
}

/// Endpoint settings matching the transport profile.
///
/// `reset_secret` is a server's long-lived secret (an IOM's private key).
/// The stateless-reset key (RFC 9000 §10.3) is derived from it instead of
/// drawn at random, so an IOM restarted on the same address can answer a
/// packet of a connection its previous run held with a reset that peer
/// accepts: peers notice the restart at their next packet (a keep-alive
/// goes every 500 ms) instead of after the 5 s idle timeout, and writes
/// waiting on the old connection resume at once. Without a secret (the
/// client) the key is random, as quinn's default.
pub fn endpoint_config(profile: TransportProfile, reset_secret: Option<&[u8]>) -> quinn::EndpointConfig {
    let mut e = match reset_secret {
        Some(secret) => {
            use ring::hmac;
            let root = hmac::Key::new(hmac::HMAC_SHA256, secret);
            let reset = hmac::sign(&root, b"iomfs stateless-reset key v1");
            let mut e = quinn::EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, reset.as_ref())));
            // The connection ids must validate across the restart too, or
            // the packet is dropped before a reset is considered.
            let cid = hmac::sign(&root, b"iomfs connection-id key v1");
            let cid_key = u64::from_le_bytes(cid.as_ref()[..8].try_into().expect("8 bytes of a 32-byte tag"));
            e.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
            e
        }
        None => quinn::EndpointConfig::default(),
    };
    if profile == TransportProfile::Loopback {
        e.max_udp_payload_size(65527).expect("valid payload size");
    }
    e
}

/// Binds a UDP socket with large buffers and makes a quinn endpoint on it.
/// A server passes its identity: its stateless-reset key is derived from
/// the private key (see [`endpoint_config`]).
pub fn make_endpoint(
    bind: std::net::SocketAddr,
    server: Option<(quinn::ServerConfig, &Identity)>,
    profile: TransportProfile,
) -> std::io::Result<quinn::Endpoint> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = sock.set_recv_buffer_size(8 << 20);
    let _ = sock.set_send_buffer_size(8 << 20);
    sock.bind(&bind.into())?;
    let udp: std::net::UdpSocket = sock.into();
    let secret = server.as_ref().map(|(_, id)| id.key.secret_der());
    let config = endpoint_config(profile, secret);
    quinn::Endpoint::new(config, server.map(|(sc, _)| sc), udp, Arc::new(quinn::TokioRuntime))
}

/// Whom a peer's certificate (verified against the cluster CA by the TLS
/// handshake) names: IOM `i` (`iom-I`) or a client (`client`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertRole {
    Iom(u32),
    Client,
}

/// The role the peer certificate of `conn` was issued for, among IOMs
/// `0..width` and the client; `None` if it names neither (or there is none).
pub fn peer_role(conn: &quinn::Connection, width: u32) -> Option<CertRole> {
    let any = conn.peer_identity()?;
    let certs = any.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    let ee = webpki::EndEntityCert::try_from(certs.first()?).ok()?;
    let names = |n: &str| {
        rustls::pki_types::ServerName::try_from(n.to_string())
            .ok()
            .is_some_and(|s| ee.verify_is_valid_for_subject_name(&s).is_ok())
    };
    if let Some(i) = (0..width).find(|&i| names(&crate::pki::iom_server_name(i))) {
        return Some(CertRole::Iom(i));
    }
    names("client").then_some(CertRole::Client)
}
