//! Pooled connections to the IOMs of a cluster: one QUIC connection per
//! peer, opened lazily, checked by a Hello exchange, replaced when it dies.
//! Each call runs on its own bidirectional stream.

use crate::frame::{read_frame, write_frame, write_frame_chunks};
use crate::NetError;
use bytes::Bytes;
use common::cluster::ClusterMap;
use common::wire::{ErrorCode, Hello, Reply, Request, PROTOCOL_OLDEST};
use common::IomId;
use parking_lot::{Mutex, RwLock};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

type MapHook = Arc<dyn Fn(&ClusterMap) + Send + Sync>;

struct Slot {
    cur: RwLock<Option<quinn::Connection>>,
    connecting: tokio::sync::Mutex<()>,
    /// When the last connect failed, and why (calls within the back-off
    /// fail fast with that reason).
    last_failure: Mutex<Option<(Instant, String)>>,
    /// The protocol version the current connection runs at (0: none yet).
    version: AtomicU32,
}

pub struct Pool {
    endpoint: quinn::Endpoint,
    client_cfg: quinn::ClientConfig,
    hello: Hello,
    addrs: Vec<String>,
    slots: Vec<Slot>,
    on_map: RwLock<Option<MapHook>>,
    pub connect_timeout: Duration,
    /// After a failed connect, calls fail fast for this long.
    pub retry_backoff: Duration,
}

/// Opens a bi stream, sends one request frame, finishes, reads one reply frame.
pub async fn call_on(conn: &quinn::Connection, req: &Request, payload: Bytes) -> Result<(Reply, Bytes), NetError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, req, payload).await?;
    send.finish()?;
    read_reply(&mut recv).await
}

/// Like [`call_on`] with a payload made of several buffers (not copied).
pub async fn call_on_chunks(
    conn: &quinn::Connection,
    req: &Request,
    payload: Vec<Bytes>,
) -> Result<(Reply, Bytes), NetError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame_chunks(&mut send, req, payload).await?;
    send.finish()?;
    read_reply(&mut recv).await
}

async fn read_reply(recv: &mut quinn::RecvStream) -> Result<(Reply, Bytes), NetError> {
    match read_frame::<Reply>(recv).await? {
        Some((Reply::Error(e), _)) => Err(NetError::Remote(e)),
        Some((r, p)) => Ok((r, p)),
        None => Err(NetError::Malformed("stream ended without a reply".into())),
    }
}

impl Pool {
    pub fn new(endpoint: quinn::Endpoint, client_cfg: quinn::ClientConfig, hello: Hello, addrs: Vec<String>) -> Pool {
        let slots = addrs
            .iter()
            .map(|_| Slot {
                cur: RwLock::new(None),
                connecting: tokio::sync::Mutex::new(()),
                last_failure: Mutex::new(None),
                version: AtomicU32::new(0),
            })
            .collect();
        Pool {
            endpoint,
            client_cfg,
            hello,
            addrs,
            slots,
            on_map: RwLock::new(None),
            connect_timeout: Duration::from_secs(2),
            retry_backoff: Duration::from_millis(100),
        }
    }

    /// Called with the cluster map every peer reports in its Hello reply.
    pub fn set_map_hook(&self, hook: MapHook) {
        *self.on_map.write() = Some(hook);
    }

    pub fn width(&self) -> u32 {
        self.addrs.len() as u32
    }

    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.endpoint
    }

    fn slot(&self, iom: IomId) -> Result<&Slot, NetError> {
        self.slots.get(iom.0 as usize).ok_or_else(|| NetError::Connect {
            addr: format!("iom {iom}"),
            msg: "no such IOM in the cluster config".into(),
        })
    }

    /// The live connection to `iom`, connecting if needed.
    pub async fn conn(&self, iom: IomId) -> Result<quinn::Connection, NetError> {
        let slot = self.slot(iom)?;
        if let Some(c) = slot.cur.read().as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let _guard = slot.connecting.lock().await;
        if let Some(c) = slot.cur.read().as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let addr = &self.addrs[iom.0 as usize];
        if let Some((t, why)) = slot.last_failure.lock().as_ref() {
            if t.elapsed() < self.retry_backoff {
                return Err(NetError::Connect { addr: addr.clone(), msg: why.clone() });
            }
        }
        match tokio::time::timeout(self.connect_timeout, self.connect(iom, addr)).await {
            Ok(Ok(c)) => {
                crate::log_conn_stats(&c, format!("out->{iom}"));
                *slot.last_failure.lock() = None;
                *slot.cur.write() = Some(c.clone());
                Ok(c)
            }
            Ok(Err(e)) => {
                let why = match &e {
                    NetError::Connect { msg, .. } => msg.clone(),
                    other => other.to_string(),
                };
                *slot.last_failure.lock() = Some((Instant::now(), why));
                Err(e)
            }
            Err(_) => {
                let why = format!(
                    "no answer within {:?}: is IOM {iom} running, and does the network reach it?",
                    self.connect_timeout
                );
                *slot.last_failure.lock() = Some((Instant::now(), why.clone()));
                Err(NetError::Connect { addr: addr.clone(), msg: why })
            }
        }
    }

    async fn connect(&self, iom: IomId, addr: &str) -> Result<quinn::Connection, NetError> {
        let err = |msg: String| NetError::Connect { addr: addr.to_string(), msg };
        let unresolved = |e: String| {
            err(format!("the host does not resolve ({e}): check IOM {iom}'s addr in cluster.toml and the DNS"))
        };
        let sa = tokio::net::lookup_host(addr)
            .await
            .map_err(|e| unresolved(e.to_string()))?
            .next()
            .ok_or_else(|| unresolved("no address".into()))?;
        let name = crate::pki::iom_server_name(iom.0);
        let conn = self
            .endpoint
            .connect_with(self.client_cfg.clone(), sa, &name)
            .map_err(|e| err(e.to_string()))?
            .await
            .map_err(|e| err(e.to_string()))?;
        // The newest version both sides speak: ours first, then older ones
        // while the peer answers that it does not speak the one offered.
        let mut want = self.hello.protocol;
        loop {
            let hello = Hello { protocol: want, ..self.hello.clone() };
            match call_on(&conn, &Request::Hello(hello), Bytes::new()).await {
                Ok((Reply::Hello(ok), _)) if ok.protocol == want && ok.iom == iom => {
                    if let Some(h) = self.on_map.read().as_ref() {
                        h(&ok.map);
                    }
                    if let Ok(slot) = self.slot(iom) {
                        slot.version.store(want, Ordering::Relaxed);
                    }
                    return Ok(conn);
                }
                Ok((Reply::Hello(ok), _)) => {
                    return Err(NetError::Handshake(format!(
                        "{addr} answered as IOM {} protocol {} (expected IOM {iom} protocol {want})",
                        ok.iom, ok.protocol
                    )))
                }
                Err(NetError::Remote(w)) if w.code == ErrorCode::VersionMismatch && want > PROTOCOL_OLDEST => {
                    tracing::info!("{addr} does not speak protocol {want} ({}): offering {}", w.detail, want - 1);
                    want -= 1;
                }
                Err(NetError::Remote(w)) if w.code == ErrorCode::VersionMismatch => {
                    return Err(NetError::Handshake(format!(
                        "{addr}: {} (this side speaks protocol versions {PROTOCOL_OLDEST} to {}): upgrade the \
                         older side, see docs/operations.md, Upgrades",
                        w.detail, self.hello.protocol
                    )))
                }
                Ok((other, _)) => return Err(NetError::Handshake(format!("{addr}: unexpected hello reply {other:?}"))),
                // The connection failed under the Hello (the peer stalled or
                // restarted): a transport failure the caller retries, not a
                // refusal (which would end a client's write with EIO).
                Err(e) if e.is_transport() => return Err(err(format!("lost during the Hello: {e}"))),
                Err(e) => return Err(NetError::Handshake(format!("{addr}: {e}"))),
            }
        }
    }

    /// The protocol version of the connection to `iom`, connecting if needed.
    pub async fn version(&self, iom: IomId) -> Result<u32, NetError> {
        self.conn(iom).await?;
        Ok(self.slot(iom)?.version.load(Ordering::Relaxed))
    }

    /// The longest smoothed round-trip time among the live connections
    /// (`None` without one): how far away the peers are, for time limits
    /// that must cover a few round trips on a slow network.
    pub fn max_rtt(&self) -> Option<Duration> {
        self.slots
            .iter()
            .filter_map(|s| s.cur.read().as_ref().filter(|c| c.close_reason().is_none()).map(|c| c.rtt()))
            .max()
    }

    /// Forgets a connection that failed, so the next call reconnects.
    pub fn drop_conn(&self, iom: IomId) {
        if let Ok(slot) = self.slot(iom) {
            if let Some(c) = slot.cur.write().take() {
                c.close(0u32.into(), b"reset");
            }
        }
    }

    /// One request/reply with `iom`.
    pub async fn call(&self, iom: IomId, req: &Request, payload: Bytes) -> Result<(Reply, Bytes), NetError> {
        self.call_chunks(iom, req, vec![payload]).await
    }

    /// One request/reply with `iom`, the payload in several buffers.
    pub async fn call_chunks(
        &self,
        iom: IomId,
        req: &Request,
        payload: Vec<Bytes>,
    ) -> Result<(Reply, Bytes), NetError> {
        let conn = self.conn(iom).await?;
        let speaks = self.slot(iom)?.version.load(Ordering::Relaxed);
        if req.since() > speaks {
            // The peer could not decode it: never sent (callers check first).
            let (family, op) = req.name();
            return Err(NetError::PeerTooOld {
                iom: iom.0,
                speaks,
                what: format!("{family} {op}"),
                needs: req.since(),
            });
        }
        let r = call_on_chunks(&conn, req, payload).await;
        if let Err(e) = &r {
            if matches!(e, NetError::Connection(_)) {
                self.drop_conn(iom);
            }
        }
        r
    }

    /// Like [`Pool::call`] with a deadline.
    pub async fn call_timeout(
        &self,
        iom: IomId,
        req: &Request,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<(Reply, Bytes), NetError> {
        self.call_chunks_timeout(iom, req, vec![payload], timeout).await
    }

    /// Like [`Pool::call_chunks`] with a deadline.
    pub async fn call_chunks_timeout(
        &self,
        iom: IomId,
        req: &Request,
        payload: Vec<Bytes>,
        timeout: Duration,
    ) -> Result<(Reply, Bytes), NetError> {
        match tokio::time::timeout(timeout, self.call_chunks(iom, req, payload)).await {
            Ok(r) => r,
            Err(_) => Err(NetError::Timeout(timeout)),
        }
    }

    pub fn close(&self) {
        for s in &self.slots {
            if let Some(c) = s.cur.write().take() {
                c.close(0u32.into(), b"bye");
            }
        }
    }
}
