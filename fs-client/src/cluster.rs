//! Client library: reads and writes byte ranges of objects on a cluster.
//!
//! Placement is computed locally from (object, block); every request names
//! the role it addresses and the client's epoch. When an IOM fails, the
//! request is refused or times out; the client refreshes its cluster map and
//! retries at the role's new server (its proxy), so one failure costs
//! latency, not an error. A stopped cluster is waited on up to
//! `tuning.stopped_wait_s`, then the call fails.

use bytes::{Bytes, BytesMut};
use common::cluster::{ClusterMap, IomState};
use common::config::{ClusterConfig, ClusterPaths};
use common::meta::{MetaReq, MetaResp};
use common::wire::{
    AdminReq, AdminResp, DataReq, DataResp, ErrorCode, Hello, MemberReq, MemberResp, MetaCall, PeerKind, ReadPiece,
    Reply, Request, Route, WireError, WritePiece, MAX_PIECES,
};
use common::{BlockKey, BlockNo, GroupNo, IomId, Layout, ObjectId, Toughness};
use net::{NetError, Pool};
use parking_lot::RwLock;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] common::config::ConfigError),
    #[error("TLS identity: {0}")]
    Tls(String),
    #[error("cannot open a UDP endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("{0}")]
    Remote(WireError),
    #[error("{0}")]
    Net(NetError),
    #[error("the cluster is stopped (more than one IOM down) and did not come back within {0:?}")]
    Stopped(Duration),
    #[error("no IOM of the cluster answers: {0}")]
    Unreachable(String),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
}

impl ClientError {
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Remote(w) => Some(w.code),
            _ => None,
        }
    }

    /// The errno a filesystem call reports for this error: the one place
    /// a client error or wire error code becomes an errno value (the
    /// filesystem's `fs::errno` only logs and wraps it). Every code is
    /// named, so a new one needs a decision here.
    pub fn errno(&self) -> i32 {
        let Some(code) = self.code() else {
            return libc::EIO;
        };
        match code {
            ErrorCode::NotFound => libc::ENOENT,
            ErrorCode::Exists => libc::EEXIST,
            ErrorCode::NotEmpty => libc::ENOTEMPTY,
            ErrorCode::NotDir => libc::ENOTDIR,
            ErrorCode::IsDir => libc::EISDIR,
            ErrorCode::NameTooLong => libc::ENAMETOOLONG,
            ErrorCode::Invalid => libc::EINVAL,
            ErrorCode::NoData => libc::ENODATA,
            ErrorCode::Range => libc::ERANGE,
            ErrorCode::Perm => libc::EPERM,
            ErrorCode::Access => libc::EACCES,
            ErrorCode::Stale => libc::ESTALE,
            ErrorCode::Unsupported => libc::EOPNOTSUPP,
            ErrorCode::TooBig => libc::EFBIG,
            ErrorCode::TooManyLinks => libc::EMLINK,
            ErrorCode::CrossDevice => libc::EXDEV,
            ErrorCode::NoSpace => libc::ENOSPC,
            // Transport, cluster-state and storage failures the client
            // could not retry away.
            ErrorCode::VersionMismatch
            | ErrorCode::WrongCluster
            | ErrorCode::Malformed
            | ErrorCode::TooLarge
            | ErrorCode::NoHello
            | ErrorCode::NotServing
            | ErrorCode::ClusterStopped
            | ErrorCode::NoQuorum
            | ErrorCode::Unavailable
            | ErrorCode::Corrupt
            | ErrorCode::VersionGone
            | ErrorCode::Io
            | ErrorCode::Internal
            | ErrorCode::Shutdown => libc::EIO,
        }
    }
}

impl From<NetError> for ClientError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Remote(w) => ClientError::Remote(w),
            other => ClientError::Net(other),
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// A connection to every IOM of one cluster.
pub struct ClusterClient {
    pub cfg: ClusterConfig,
    pub layout: Layout,
    pub paths: ClusterPaths,
    pool: Arc<Pool>,
    map: Arc<RwLock<ClusterMap>>,
    /// Longest a single RPC may take before the IOM is treated as unreachable.
    pub rpc_timeout: Duration,
    /// This client's id for namespace requests (duplicate-request cache key).
    client_id: u64,
    seq: std::sync::atomic::AtomicU64,
    /// Bytes of file data this client has sent (`write`), for estimating
    /// the cluster's room between two looks at it.
    pub written: std::sync::atomic::AtomicU64,
    /// IOMs this client cannot reach although the map says they serve (a
    /// network fault between the two alone), each with the IOM its
    /// requests go through meanwhile (`Request::Relay`).
    relays: parking_lot::Mutex<std::collections::HashMap<IomId, Relay>>,
    /// Numbers this client's stripes (with its id: `stripes_for`).
    stripe_seq: std::sync::atomic::AtomicU64,
}

/// One IOM role's part of a write: its pieces, their bytes, their stripes.
type RoleWrite = (IomId, Vec<WritePiece>, Vec<Bytes>, Vec<u64>);

/// A whole parity group written as a client stripe.
struct Stripe {
    group: GroupNo,
    id: u64,
    /// Each member's new block's checksum, in member order.
    crcs: Vec<u32>,
    /// The XOR of the members' new blocks.
    piece: Bytes,
}

/// Requests for an IOM this client cannot reach go through `via`; the
/// direct path is tried again at `probe_at`.
#[derive(Clone, Copy, Debug)]
struct Relay {
    via: IomId,
    probe_at: Instant,
}

/// How long requests go through a relay before the direct path is tried again.
const RELAY_PROBE: Duration = Duration::from_secs(5);

/// Fraction of the lease a client trusts its session for after a renewal
/// (the rest is margin for delays and clock rates).
pub const LEASE_TRUST: f64 = 0.8;

/// [`ClusterClient::patience`] for a longest round trip of `rtt`.
fn probe_patience(rtt: Option<Duration>) -> Duration {
    (rtt.unwrap_or_default() * 4 + Duration::from_millis(100)).clamp(Duration::from_millis(500), Duration::from_secs(5))
}

fn is_retryable(e: &NetError) -> bool {
    e.is_transport() || e.remote().is_some_and(|w| w.is_retryable())
}

impl ClusterClient {
    /// Loads the cluster config and client certificate from `dir` and opens an endpoint.
    pub async fn connect(dir: &Path) -> Result<Arc<ClusterClient>> {
        Self::connect_from(dir, None).await
    }

    /// [`ClusterClient::connect`] with the endpoint bound to local address
    /// `from` (any port) instead of the unspecified address.
    pub async fn connect_from(dir: &Path, from: Option<std::net::IpAddr>) -> Result<Arc<ClusterClient>> {
        let cfg = ClusterConfig::load(dir)?;
        let paths = ClusterPaths::new(dir);
        let ident = net::tls::Identity::load_client(&paths).map_err(|e| ClientError::Tls(e.to_string()))?;
        let cc = net::tls::client_config(&ident, cfg.transport).map_err(|e| ClientError::Tls(e.to_string()))?;
        let any_v6 = cfg.ioms.iter().any(|i| i.addr.starts_with('['));
        let bind: std::net::SocketAddr = match from {
            Some(ip) => std::net::SocketAddr::new(ip, 0),
            None => if any_v6 { "[::]:0" } else { "0.0.0.0:0" }.parse().expect("valid addr"),
        };
        let endpoint = net::tls::make_endpoint(bind, None, cfg.transport).map_err(ClientError::Endpoint)?;
        let pool = Arc::new(Pool::new(
            endpoint,
            cc,
            Hello {
                protocol: common::wire::protocol_max(),
                cluster_id: cfg.cluster_id.clone(),
                peer: PeerKind::Client,
            },
            cfg.ioms.iter().map(|i| i.addr.clone()).collect(),
        ));
        let map = Arc::new(RwLock::new(ClusterMap::initial(cfg.width(), IomId(cfg.meta_home))));
        let m2 = map.clone();
        pool.set_map_hook(Arc::new(move |m: &ClusterMap| {
            let mut cur = m2.write();
            if m.epoch > cur.epoch {
                *cur = m.clone();
            }
        }));
        let c = Arc::new(ClusterClient {
            layout: cfg.layout(),
            cfg,
            paths,
            pool,
            map,
            rpc_timeout: Duration::from_secs(20),
            client_id: rand::random::<u64>() | 1,
            stripe_seq: std::sync::atomic::AtomicU64::new(1),
            seq: std::sync::atomic::AtomicU64::new(1),
            written: std::sync::atomic::AtomicU64::new(0),
            relays: parking_lot::Mutex::default(),
        });
        Ok(c)
    }

    pub fn map(&self) -> ClusterMap {
        self.map.read().clone()
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Asks the IOMs for their maps and keeps the newest. Returns how many
    /// answered; does not wait long for IOMs that do not answer.
    pub async fn refresh_map(&self) -> usize {
        let calls = (0..self.cfg.width()).map(|i| {
            let pool = self.pool.clone();
            async move {
                pool.call_timeout(
                    IomId(i),
                    &Request::Member(MemberReq::GetMap),
                    Bytes::new(),
                    Duration::from_millis(200),
                )
                .await
            }
        });
        let mut answered = 0;
        for r in futures::future::join_all(calls).await {
            if let Ok((Reply::Member(MemberResp::Map(m)), _)) = r {
                answered += 1;
                let mut cur = self.map.write();
                if m.epoch > cur.epoch {
                    *cur = m;
                }
            }
        }
        answered
    }

    /// One request to whoever serves `role`, following map changes.
    pub async fn call_role(
        &self,
        role: IomId,
        make: impl Fn(Route) -> Request,
        payload: Bytes,
    ) -> Result<(Reply, Bytes)> {
        self.call_target(|_| role, make, vec![payload]).await
    }

    /// One request to whoever serves the role `pick` names in the current
    /// map. A request that takes long makes the client look for a newer map;
    /// if the role moved (its IOM failed), the request goes to the new
    /// server at once instead of waiting for a timeout.
    async fn call_target(
        &self,
        pick: impl Fn(&ClusterMap) -> IomId,
        make: impl Fn(Route) -> Request,
        payload: Vec<Bytes>,
    ) -> Result<(Reply, Bytes)> {
        let start = Instant::now();
        let stopped_wait = Duration::from_secs(self.cfg.tuning.stopped_wait_s);
        let mut delay = Duration::from_millis(20);
        let mut warned = false;
        loop {
            let map = self.map();
            let role = pick(&map);
            let Some(server) = map.server_for(role) else {
                if start.elapsed() > stopped_wait {
                    return Err(ClientError::Stopped(stopped_wait));
                }
                if !warned {
                    tracing::warn!(
                        epoch = map.epoch.0,
                        "cluster stopped: more than one IOM is down; waiting up to {}s for recovery",
                        stopped_wait.as_secs()
                    );
                    warned = true;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.refresh_map().await;
                continue;
            };
            let req = make(Route { epoch: map.epoch, target: role });
            let (family, op) = req.name();
            let sent = Instant::now();
            let via = self.relay_via(server).await;
            let relayed;
            let (to, msg) = match via {
                Some(v) => {
                    relayed = Request::Relay { to: server, req: Box::new(req.clone()) };
                    metrics::counter!("iomfs_client_relayed_total", "family" => family, "op" => op).increment(1);
                    (v, &relayed)
                }
                None => (server, &req),
            };
            let call = self.pool.call_chunks_timeout(to, msg, payload.clone(), self.rpc_timeout);
            tokio::pin!(call);
            let mut probe = tokio::time::interval_at(
                tokio::time::Instant::now() + Duration::from_millis(300),
                Duration::from_millis(200),
            );
            let r = loop {
                tokio::select! {
                    r = &mut call => break Some(r),
                    _ = probe.tick() => {
                        self.refresh_map().await;
                        let m = self.map();
                        if m.server_for(pick(&m)) != Some(server) {
                            break None;
                        }
                    }
                }
            };
            let Some(r) = r else { continue };
            metrics::histogram!("iomfs_client_rpc_duration_seconds", "family" => family, "op" => op)
                .record(sent.elapsed().as_secs_f64());
            match r {
                Ok(r) => return Ok(r),
                Err(e) if is_retryable(&e) => {
                    metrics::counter!("iomfs_client_rpc_retries_total", "family" => family, "op" => op).increment(1);
                    let give_up = stopped_wait.max(Duration::from_secs(30));
                    if start.elapsed() > give_up {
                        return Err(e.into());
                    }
                    if !warned && start.elapsed() > Duration::from_secs(2) {
                        tracing::warn!(role = role.0, server = server.0, "IOM not answering ({e}); retrying");
                        warned = true;
                    }
                    if e.is_transport() {
                        self.pool.drop_conn(to);
                        // The map says `server` serves, but this client
                        // does not reach it (or its relay): go through
                        // another IOM until the direct path is back.
                        let now = self.map();
                        if now.server_for(pick(&now)) == Some(server) {
                            self.start_relay(server, via).await;
                        }
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(250));
                    self.refresh_map().await;
                }
                Err(e) => {
                    let e = ClientError::from(e);
                    // "io": the request failed (EIO: an IOM's disk, a
                    // cluster stopped too long); "answer": an IOM answered
                    // with an error such as ENOENT or EEXIST.
                    let kind = if e.errno() == libc::EIO { "io" } else { "answer" };
                    metrics::counter!("iomfs_client_rpc_errors_total", "family" => family, "op" => op, "kind" => kind)
                        .increment(1);
                    return Err(e);
                }
            }
        }
    }

    /// How long a probe of a path may take: a new connection, its Hello
    /// and one request are three round trips, so four of the longest
    /// round trip to any IOM this client reaches, and at least 500 ms (at
    /// most 5 s). With a fixed 500 ms a client whose IOMs were more than
    /// about 170 ms away could never end a relay.
    fn patience(&self) -> Duration {
        probe_patience(self.pool.max_rtt())
    }

    /// The IOM requests for `server` go through now, if any. Once per
    /// `RELAY_PROBE` one caller asks `server` directly first (briefly), and
    /// the relay ends when it answers.
    async fn relay_via(&self, server: IomId) -> Option<IomId> {
        let (via, probe) = {
            let mut relays = self.relays.lock();
            let r = relays.get_mut(&server)?;
            let probe = Instant::now() >= r.probe_at;
            if probe {
                r.probe_at = Instant::now() + RELAY_PROBE;
            }
            (r.via, probe)
        };
        if probe {
            let ask = Request::Member(MemberReq::GetMap);
            if self.pool.call_timeout(server, &ask, Bytes::new(), self.patience()).await.is_ok() {
                self.relays.lock().remove(&server);
                tracing::warn!(iom = server.0, "IOM {server} answers this client again: no longer relayed");
                return None;
            }
        }
        Some(via)
    }

    /// After a transport failure towards `server` (directly, or through
    /// `failed_via`): picks another IOM the map calls up, that this client
    /// reaches and that relays (protocol 8), to relay through. Without one,
    /// requests go on being retried directly.
    async fn start_relay(&self, server: IomId, failed_via: Option<IomId>) {
        let map = self.map();
        let w = self.cfg.width();
        let start = failed_via.map(|v| v.0).unwrap_or(server.0);
        let candidates: Vec<IomId> = (1..w)
            .map(|k| IomId((start + k) % w))
            .filter(|&v| v != server && Some(v) != failed_via && map.state(v) == IomState::Up)
            .collect();
        // Asked side by side (each at most `patience`); the first in
        // rotation order that relays (protocol 8) is taken.
        let patience = self.patience();
        let speaks =
            futures::future::join_all(candidates.iter().map(|&v| tokio::time::timeout(patience, self.pool.version(v))))
                .await;
        let pick = candidates
            .iter()
            .zip(speaks)
            .find(|(_, r)| matches!(r, Ok(Ok(p)) if *p >= common::wire::SINCE_RELAY))
            .map(|(v, _)| *v);
        let mut relays = self.relays.lock();
        match pick {
            Some(v) => {
                if relays.get(&server).map(|r| r.via) != Some(v) {
                    tracing::warn!(
                        iom = server.0,
                        via = v.0,
                        "IOM {server} does not answer this client: relaying through IOM {v}"
                    );
                }
                relays.insert(server, Relay { via: v, probe_at: Instant::now() + RELAY_PROBE });
            }
            None => {
                relays.remove(&server);
            }
        }
    }

    /// Calls one IOM directly (admin, scrub), without role routing. A
    /// refusal that passes (an IOM still starting says `NotServing`) is
    /// retried for up to 10 s; anything else, an unreachable IOM included,
    /// is the caller's answer at once.
    pub async fn call_iom(&self, iom: IomId, req: &Request, payload: Bytes) -> Result<(Reply, Bytes)> {
        let start = Instant::now();
        let mut delay = Duration::from_millis(20);
        loop {
            match self.pool.call_timeout(iom, req, payload.clone(), self.rpc_timeout).await {
                Err(e) if e.remote().is_some_and(|w| w.is_retryable()) && start.elapsed() < Duration::from_secs(10) => {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(250));
                }
                r => return Ok(r?),
            }
        }
    }

    async fn data(&self, role: IomId, make: impl Fn(Route) -> DataReq, payload: Bytes) -> Result<(DataResp, Bytes)> {
        self.data_chunks(role, make, vec![payload]).await
    }

    async fn data_chunks(
        &self,
        role: IomId,
        make: impl Fn(Route) -> DataReq,
        payload: Vec<Bytes>,
    ) -> Result<(DataResp, Bytes)> {
        match self.call_target(|_| role, |r| Request::Data(make(r)), payload).await? {
            (Reply::Data(d), p) => Ok((d, p)),
            (other, _) => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Reads `len` bytes of an object at `offset`; holes read as zeros.
    /// The blocks of the range are read from their IOMs in parallel, one
    /// request per IOM.
    pub async fn read(&self, object: ObjectId, offset: u64, len: usize) -> Result<Bytes> {
        metrics::counter!("iomfs_client_read_bytes_total").increment(len as u64);
        let pieces = self.layout.split(offset, len);
        // Pieces per IOM role, with their index in `pieces`.
        let mut per_role: Vec<(IomId, Vec<usize>)> = Vec::new();
        for (i, p) in pieces.iter().enumerate() {
            let role = self.layout.data_iom(object, p.block);
            match per_role.iter_mut().find(|(r, _)| *r == role) {
                Some((_, v)) => v.push(i),
                None => per_role.push((role, vec![i])),
            }
        }
        let reads = per_role.into_iter().map(|(role, idx)| {
            let pieces = &pieces;
            async move {
                let rp: Vec<ReadPiece> = idx
                    .iter()
                    .map(|&i| ReadPiece {
                        key: BlockKey { object, block: pieces[i].block },
                        offset: pieces[i].offset,
                        len: pieces[i].len,
                    })
                    .collect();
                let (resp, b) =
                    self.data(role, |route| DataReq::ReadMany { route, pieces: rp.clone() }, Bytes::new()).await?;
                let DataResp::ReadAll { lens } = resp else {
                    return Err::<_, ClientError>(ClientError::Unexpected(format!("{resp:?}")));
                };
                let total: u64 = lens.iter().map(|&l| l as u64).sum();
                if lens.len() != idx.len() || total != b.len() as u64 {
                    return Err(ClientError::Unexpected(format!(
                        "read of {} pieces answered with {} lengths and {} bytes",
                        idx.len(),
                        lens.len(),
                        b.len()
                    )));
                }
                let mut at = 0usize;
                let mut out = Vec::with_capacity(idx.len());
                for (&i, &l) in idx.iter().zip(&lens) {
                    out.push((i, b.slice(at..at + l as usize)));
                    at += l as usize;
                }
                Ok(out)
            }
        });
        let parts: Vec<(usize, Bytes)> = futures::future::try_join_all(reads).await?.into_iter().flatten().collect();
        if parts.len() == 1 && parts[0].1.len() == len {
            return Ok(parts.into_iter().next().expect("one part").1);
        }
        // The pieces tile the range in order: append each (zeros for a
        // hole or a short block) instead of zero-filling the whole buffer
        // first and copying over it.
        let mut by_piece: Vec<Option<Bytes>> = vec![None; pieces.len()];
        for (i, b) in parts {
            by_piece[i] = Some(b);
        }
        let mut out = BytesMut::with_capacity(len);
        for (p, b) in pieces.iter().zip(by_piece) {
            debug_assert_eq!(out.len(), p.buf_offset);
            let b = b.unwrap_or_default();
            let n = b.len().min(p.len as usize);
            out.extend_from_slice(&b[..n]);
            out.resize(p.buf_offset + p.len as usize, 0);
        }
        Ok(out.freeze())
    }

    /// Writes `data` at `offset` of an object; returns when every block's
    /// write reached the point `toughness` names.
    pub async fn write(&self, object: ObjectId, offset: u64, data: Bytes, toughness: Toughness) -> Result<()> {
        self.write_from(object, offset, data, toughness, u64::MAX).await
    }

    /// `write`, told that the object's blocks from byte `fresh_from` on are
    /// probably absent (its size as this client knows it): each whole
    /// parity group of the write past it goes as a stripe, its parity
    /// delta computed here and sent to the parity IOM, so no data IOM
    /// sends it one (`parity::stripes` on the IOMs). A data IOM whose
    /// block was not absent after all sends its delta as usual.
    pub async fn write_from(
        &self,
        object: ObjectId,
        offset: u64,
        data: Bytes,
        toughness: Toughness,
        fresh_from: u64,
    ) -> Result<()> {
        self.write_runs(object, &[(offset, data)], toughness, fresh_from).await
    }

    /// `write_from` of several runs `(offset, bytes)` of one object (the
    /// runs of a `buffered` flush), as one client write: one request per
    /// IOM role for all of them, so the pieces of one block that several
    /// runs touch reach its data IOM together, which writes them as one
    /// new version of the block (`handle_write_many` on the IOMs). The runs
    /// must not overlap.
    pub async fn write_runs(
        &self,
        object: ObjectId,
        runs: &[(u64, Bytes)],
        toughness: Toughness,
        fresh_from: u64,
    ) -> Result<()> {
        let bytes: u64 = runs.iter().map(|(_, d)| d.len() as u64).sum();
        self.written.fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("iomfs_client_written_bytes_total").increment(bytes);
        let mut stripes = Vec::new();
        let mut split = Vec::with_capacity(runs.len());
        for (offset, data) in runs {
            let pieces = self.layout.split(*offset, data.len());
            stripes.extend(self.stripes_for(&pieces, data, fresh_from).await);
            split.push((pieces, data));
        }
        // The group hint counts the blocks of each group the write
        // touches: a block's pieces in one request are one transaction on
        // the IOMs (an older IOM, or pieces split between two requests,
        // send more deltas than that: the parity IOM then waits less).
        let mut blocks = std::collections::BTreeSet::new();
        for (pieces, _) in &split {
            blocks.extend(pieces.iter().map(|p| p.block));
        }
        let mut per_group = std::collections::HashMap::<GroupNo, u8>::new();
        for b in blocks {
            let n = per_group.entry(self.layout.group_of(b)).or_default();
            *n = n.saturating_add(1);
        }
        // One request per IOM role: the pieces it holds, their bytes in
        // order, and each piece's stripe (0: none).
        // At most `MAX_PIECES` pieces in one request: a role with more
        // gets several (a block's pieces split between two requests are
        // two transactions, which is only slower).
        let mut per_role: Vec<RoleWrite> = Vec::new();
        for (pieces, data) in &split {
            for p in pieces {
                let role = self.layout.data_iom(object, p.block);
                let group = self.layout.group_of(p.block);
                let piece = WritePiece {
                    key: BlockKey { object, block: p.block },
                    offset: p.offset,
                    len: p.len,
                    group_hint: per_group[&group],
                };
                let stripe = stripes.iter().find(|s| s.group == group).map_or(0, |s| s.id);
                let bytes = data.slice(p.buf_offset..p.buf_offset + p.len as usize);
                match per_role.iter_mut().rev().find(|(r, ps, _, _)| *r == role && ps.len() < MAX_PIECES) {
                    Some((_, ps, bs, ss)) => {
                        ps.push(piece);
                        bs.push(bytes);
                        ss.push(stripe);
                    }
                    None => per_role.push((role, vec![piece], vec![bytes], vec![stripe])),
                }
            }
        }
        // The pieces first: they reach their parity IOMs about when the
        // data IOMs' references do. A piece that is lost costs only time:
        // its stripe's data IOMs are then asked for their deltas.
        let parity_pieces = stripes.into_iter().map(|s| async move {
            let group = common::GroupKey { object, group: s.group };
            let parity = self.layout.parity_iom(object, s.group);
            let (stripe, crcs) = (s.id, s.crcs);
            // Not waited for longer than the IOMs wait for it: the write's
            // answer does not depend on it.
            let send =
                self.data(parity, |route| DataReq::StripeParity { route, group, stripe, crcs: crcs.clone() }, s.piece);
            match tokio::time::timeout(Duration::from_secs(2), send).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::debug!(object = object.0, group = s.group.0, "stripe piece not taken: {e}"),
                Err(_) => tracing::debug!(object = object.0, group = s.group.0, "stripe piece not answered within 2 s"),
            }
        });
        let pieces_sent = futures::future::join_all(parity_pieces);
        let writes = per_role.into_iter().map(|(role, ps, mut bs, ss)| async move {
            if ss.iter().any(|&s| s != 0) {
                return self
                    .data_chunks(
                        role,
                        |route| DataReq::WriteStriped { route, pieces: ps.clone(), toughness, stripes: ss.clone() },
                        bs,
                    )
                    .await;
            }
            if ps.len() == 1 {
                let p = ps[0];
                let payload = bs.pop().expect("one piece, one payload");
                return self
                    .data(
                        role,
                        |route| DataReq::Write {
                            route,
                            key: p.key,
                            offset: p.offset,
                            toughness,
                            group_hint: p.group_hint,
                        },
                        payload,
                    )
                    .await;
            }
            self.data_chunks(role, |route| DataReq::WriteMany { route, pieces: ps.clone(), toughness }, bs).await
        });
        let (_, written) = futures::future::join(pieces_sent, futures::future::try_join_all(writes)).await;
        written?;
        Ok(())
    }

    /// The whole parity groups of a write (`pieces` of `data`) that go as
    /// stripes: every member written whole, the group past `fresh_from`,
    /// stripes on in the config, every IOM up in the map, reached
    /// directly and speaking protocol 10.
    async fn stripes_for(&self, pieces: &[common::layout::Piece], data: &Bytes, fresh_from: u64) -> Vec<Stripe> {
        let n = self.layout.n() as usize;
        let bs = self.layout.block_size();
        if !self.cfg.tuning.client_stripes || fresh_from == u64::MAX || pieces.len() < n {
            return Vec::new();
        }
        let mut out = Vec::new();
        for run in pieces.chunk_by(|a, b| self.layout.group_of(a.block) == self.layout.group_of(b.block)) {
            let group = self.layout.group_of(run[0].block);
            let start = self.layout.member_block(group, 0).0 * bs as u64;
            if run.len() != n || start < fresh_from || run.iter().any(|p| p.offset != 0 || p.len != bs) {
                continue;
            }
            out.push((group, run));
        }
        if out.is_empty() {
            return Vec::new();
        }
        let map = self.map();
        if (0..self.cfg.width()).any(|i| map.state(IomId(i)) != IomState::Up) || !self.relays.lock().is_empty() {
            return Vec::new();
        }
        for i in 0..self.cfg.width() {
            if !matches!(self.pool.version(IomId(i)).await, Ok(v) if v >= common::wire::SINCE_STRIPE) {
                return Vec::new();
            }
        }
        out.into_iter()
            .map(|(group, run)| {
                let mut piece = BytesMut::zeroed(bs as usize);
                let mut crcs = Vec::with_capacity(n);
                for p in run {
                    let b = &data[p.buf_offset..p.buf_offset + p.len as usize];
                    crcs.push(common::codec::crc(b));
                    common::layout::xor_into(&mut piece, b);
                }
                let id = (self.client_id.rotate_left(29)
                    ^ self.stripe_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
                .max(1);
                Stripe { group, id, crcs, piece: piece.freeze() }
            })
            .collect()
    }

    /// Cuts an object to `size` bytes: the block holding `size` keeps its
    /// head, the rest of its group is deleted block by block (parity kept
    /// right), whole groups past it are dropped.
    pub async fn truncate(&self, object: ObjectId, old_size: u64, size: u64, toughness: Toughness) -> Result<()> {
        if size >= old_size {
            return Ok(());
        }
        let bs = self.layout.block_size() as u64;
        let first_block = size / bs;
        let keep = (size % bs) as u32;
        let group = self.layout.group_of(BlockNo(first_block));
        let group_end = self.layout.member_block(group, self.layout.n()).0;
        let last_block = self.layout.blocks_for(old_size).min(group_end);
        let cuts = (first_block..last_block).map(|b| {
            let key = BlockKey {
                object,
                block: BlockNo(b),
            };
            let role = self.layout.data_iom(object, key.block);
            let keep = if b == first_block { keep } else { 0 };
            async move {
                self.data(
                    role,
                    |route| DataReq::Truncate {
                        route,
                        key,
                        keep,
                        toughness,
                    },
                    Bytes::new(),
                )
                .await
            }
        });
        futures::future::try_join_all(cuts).await?;
        if old_size > group_end * bs {
            self.drop_object(object, GroupNo(group.0 + 1)).await?;
        }
        Ok(())
    }

    /// What users can still store and the capacity, in bytes of file data
    /// (`IomStats::usable` over every IOM that answers within a second).
    pub async fn usable_space(&self) -> Option<(u64, u64)> {
        let calls = (0..self.cfg.width()).map(|i| async move {
            match self
                .pool
                .call_timeout(IomId(i), &Request::Admin(AdminReq::Stats), Bytes::new(), Duration::from_secs(1))
                .await
            {
                Ok((Reply::Admin(AdminResp::Stats(s)), _)) => Some(s),
                _ => None,
            }
        });
        let all: Vec<_> = futures::future::join_all(calls).await.into_iter().flatten().collect();
        if all.is_empty() {
            return None;
        }
        Some(common::wire::IomStats::usable(&all, self.layout.n()))
    }

    /// Drops an object's blocks and parity in groups >= `from` on every IOM.
    pub async fn drop_object(&self, object: ObjectId, from: GroupNo) -> Result<()> {
        let calls = (0..self.cfg.width()).map(|i| async move {
            self.data(IomId(i), |route| DataReq::DropObject { route, object, from }, Bytes::new()).await
        });
        futures::future::try_join_all(calls).await?;
        Ok(())
    }

    /// Durability barrier on every IOM: all writes answered so far are on stable storage.
    pub async fn flush(&self) -> Result<()> {
        let calls = (0..self.cfg.width())
            .map(|i| async move { self.data(IomId(i), |route| DataReq::Flush { route }, Bytes::new()).await });
        futures::future::try_join_all(calls).await?;
        Ok(())
    }

    /// The IOM roles holding a byte range of an object or the parity of its
    /// groups, as a bit set (bit i = role i): the IOMs a write of the range
    /// touches.
    pub fn write_roles(&self, object: ObjectId, offset: u64, len: usize) -> u64 {
        self.layout.split(offset, len).iter().fold(0u64, |m, p| {
            let parity = self.layout.parity_iom(object, self.layout.group_of(p.block));
            m | 1 << self.layout.data_iom(object, p.block).0 | 1 << parity.0
        })
    }

    /// Durability barrier on the IOM roles in the bit set `roles`: every
    /// write they answered so far (and its parity) is on stable storage.
    pub async fn flush_roles(&self, roles: u64) -> Result<()> {
        let calls = (0..self.cfg.width())
            .filter(|i| roles & (1 << i) != 0)
            .map(|i| async move { self.data(IomId(i), |route| DataReq::Flush { route }, Bytes::new()).await });
        futures::future::try_join_all(calls).await?;
        Ok(())
    }

    /// One namespace request to the metadata server.
    pub async fn meta(&self, req: MetaReq) -> Result<MetaResp> {
        let call =
            MetaCall { client: self.client_id, seq: self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed), req };
        match self.call_target(|m| m.meta_home, |_| Request::Meta(call.clone()), Vec::new()).await? {
            (Reply::Meta(m), _) => Ok(m),
            (other, _) => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub fn close(&self) {
        self.pool.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_probe_waits_for_a_few_round_trips_of_the_slowest_path_within_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(probe_patience(None), ms(500));
        assert_eq!(probe_patience(Some(ms(1))), ms(500));
        // 200 ms away: a handshake, the Hello and the request fit.
        assert_eq!(probe_patience(Some(ms(200))), ms(900));
        assert_eq!(probe_patience(Some(Duration::from_secs(3))), Duration::from_secs(5));
    }

    /// Every wire error code, in declaration order, with the errno a
    /// filesystem call answers for it.
    const PINNED: &[(ErrorCode, i32)] = &[
        (ErrorCode::VersionMismatch, libc::EIO),
        (ErrorCode::WrongCluster, libc::EIO),
        (ErrorCode::Malformed, libc::EIO),
        (ErrorCode::TooLarge, libc::EIO),
        (ErrorCode::NoHello, libc::EIO),
        (ErrorCode::NotServing, libc::EIO),
        (ErrorCode::ClusterStopped, libc::EIO),
        (ErrorCode::NoQuorum, libc::EIO),
        (ErrorCode::Unavailable, libc::EIO),
        (ErrorCode::Corrupt, libc::EIO),
        (ErrorCode::VersionGone, libc::EIO),
        (ErrorCode::NoSpace, libc::ENOSPC),
        (ErrorCode::Io, libc::EIO),
        (ErrorCode::Internal, libc::EIO),
        (ErrorCode::Shutdown, libc::EIO),
        (ErrorCode::NotFound, libc::ENOENT),
        (ErrorCode::Exists, libc::EEXIST),
        (ErrorCode::NotEmpty, libc::ENOTEMPTY),
        (ErrorCode::NotDir, libc::ENOTDIR),
        (ErrorCode::IsDir, libc::EISDIR),
        (ErrorCode::NameTooLong, libc::ENAMETOOLONG),
        (ErrorCode::Invalid, libc::EINVAL),
        (ErrorCode::NoData, libc::ENODATA),
        (ErrorCode::Range, libc::ERANGE),
        (ErrorCode::Perm, libc::EPERM),
        (ErrorCode::Access, libc::EACCES),
        (ErrorCode::Stale, libc::ESTALE),
        (ErrorCode::Unsupported, libc::EOPNOTSUPP),
        (ErrorCode::TooBig, libc::EFBIG),
        (ErrorCode::TooManyLinks, libc::EMLINK),
        (ErrorCode::CrossDevice, libc::EXDEV),
    ];

    /// Its place in `PINNED`; stops compiling when `ErrorCode` gains a
    /// variant, so the new code gets a pinned errno.
    fn pinned_at(c: ErrorCode) -> usize {
        match c {
            ErrorCode::VersionMismatch => 0,
            ErrorCode::WrongCluster => 1,
            ErrorCode::Malformed => 2,
            ErrorCode::TooLarge => 3,
            ErrorCode::NoHello => 4,
            ErrorCode::NotServing => 5,
            ErrorCode::ClusterStopped => 6,
            ErrorCode::NoQuorum => 7,
            ErrorCode::Unavailable => 8,
            ErrorCode::Corrupt => 9,
            ErrorCode::VersionGone => 10,
            ErrorCode::NoSpace => 11,
            ErrorCode::Io => 12,
            ErrorCode::Internal => 13,
            ErrorCode::Shutdown => 14,
            ErrorCode::NotFound => 15,
            ErrorCode::Exists => 16,
            ErrorCode::NotEmpty => 17,
            ErrorCode::NotDir => 18,
            ErrorCode::IsDir => 19,
            ErrorCode::NameTooLong => 20,
            ErrorCode::Invalid => 21,
            ErrorCode::NoData => 22,
            ErrorCode::Range => 23,
            ErrorCode::Perm => 24,
            ErrorCode::Access => 25,
            ErrorCode::Stale => 26,
            ErrorCode::Unsupported => 27,
            ErrorCode::TooBig => 28,
            ErrorCode::TooManyLinks => 29,
            ErrorCode::CrossDevice => 30,
        }
    }

    #[test]
    fn every_error_code_maps_to_its_errno() {
        for (i, &(code, want)) in PINNED.iter().enumerate() {
            assert_eq!(pinned_at(code), i, "{code:?} listed once, in order");
            let e = ClientError::Remote(WireError::new(code, "detail"));
            assert_eq!(e.errno(), want, "{code:?}");
        }
        // Errors that never reached an IOM's answer are I/O errors.
        assert_eq!(ClientError::Stopped(Duration::from_secs(1)).errno(), libc::EIO);
        assert_eq!(ClientError::Unreachable("x".into()).errno(), libc::EIO);
        assert_eq!(ClientError::Unexpected("x".into()).errno(), libc::EIO);
    }
}
