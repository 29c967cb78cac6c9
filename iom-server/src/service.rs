//! QUIC service: accepts connections (mutual TLS is enforced by the
//! endpoint's TLS config), runs the Hello exchange, and dispatches every
//! stream's request to its handler. A malformed or oversized frame ends
//! that stream with an error; the connection and the server go on.

use crate::data::DataSide;
use crate::failover::Failover;
use crate::group::Group;
use crate::membership::Membership;
use crate::namespace::Namespace;
use crate::parity::ParitySide;
use crate::recovery_exec::Recovery;
use crate::rejoin::Rejoin;
use crate::standin::handover::HandoverState;
use crate::standin::StandIn;
use crate::storage::Storage;
use crate::timeouts::Timeouts;
use crate::workers::{Tier, Workers};
use crate::write_path::Op;
use crate::Error;
use bytes::Bytes;
use common::cluster::IomState;
use common::toughness::Toughness;
use common::wire::{
    AdminReq, AdminResp, DataReq, DataResp, ErrorCode, HandoverReq, HandoverResp, HelloOk, IomStats, MemberReq,
    MemberResp, PeerKind, RecoveryReq, RecoveryResp, Reply, Request, Route, WireError, WritePiece, MAX_DROP_OBJECTS,
    MAX_PIECES,
};
use common::{BlockKey, GroupKey, GroupNo, IomId, ObjectId, Version};
use net::frame::{read_frame, write_frame, write_frame_chunks};
use net::NetError;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::sync::OnceLock;

/// The router: every role a request can reach, and the little the router
/// itself answers from (the cluster id for the handshake, the stats). It
/// routes by message family to the role's `handle_*`; a call this IOM
/// makes to a role it serves itself comes here too, directly (see
/// `caller::LocalRoles`), never through the network.
pub struct Router {
    pub me: IomId,
    pub cluster_id: String,
    pub block_size: u32,
    pub member: Arc<Membership>,
    pub rejoin: Arc<Rejoin>,
    pub data: Arc<DataSide>,
    pub standin: Arc<StandIn>,
    pub group: Arc<Group>,
    pub parity: Arc<ParitySide>,
    pub handover: Arc<HandoverState>,
    pub failover: Arc<Failover>,
    pub recovery: Arc<Recovery>,
    pub namespace: Arc<Namespace>,
    /// For the stats only.
    pub storage: Arc<Storage>,
    pub timeouts: Timeouts,
    pub workers: Arc<Workers>,
    /// The last cluster scrub this IOM was told of.
    pub scrubs: crate::scrub_book::ScrubBook,
    /// Forwards relayed client requests.
    pub caller: Arc<crate::caller::RoleCaller>,
    /// The IOMs heard running with a store (see `birth`).
    pub seen: Arc<crate::seen::Seen>,
}

struct ConnState {
    /// Who the peer said it is, and the protocol version the connection
    /// runs at (set by a Hello that was accepted).
    peer: OnceLock<(PeerKind, u32)>,
    /// Whom the peer's certificate names (checked by the TLS handshake
    /// against the cluster CA): what it may ask is decided from this, not
    /// from what its Hello says it is.
    cert: Option<net::tls::CertRole>,
}

/// Accepts connections until shutdown.
pub async fn serve(router: Arc<Router>, endpoint: quinn::Endpoint) {
    let intake = router.workers.token(Tier::Intake);
    loop {
        let incoming = tokio::select! {
            _ = intake.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let me = router.clone();
        router.workers.spawn(Tier::Connections, "conn", async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_conn(me, conn).await,
                // A peer without a certificate of this cluster ends here.
                Err(e) => tracing::info!(%remote, "refused connection: {e}"),
            }
        });
    }
}

async fn serve_conn(router: Arc<Router>, conn: quinn::Connection) {
    let cert = net::tls::peer_role(&conn, router.member.width());
    let state = Arc::new(ConnState { peer: OnceLock::new(), cert });
    net::log_conn_stats(&conn, format!("in@{}<-{}", router.me, conn.remote_address()));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let (me, state) = (router.clone(), state.clone());
        router.workers.spawn(Tier::Connections, "stream", async move { serve_stream(me, state, send, recv).await });
    }
}

async fn reply(send: &mut quinn::SendStream, r: Reply, payload: Bytes) {
    if write_frame(send, &r, payload).await.is_ok() {
        let _ = send.finish();
    }
}

async fn reply_chunks(send: &mut quinn::SendStream, r: Reply, payload: Vec<Bytes>) {
    if write_frame_chunks(send, &r, payload).await.is_ok() {
        let _ = send.finish();
    }
}

fn err(code: ErrorCode, detail: impl Into<String>) -> Reply {
    Reply::Error(WireError::new(code, detail))
}

async fn serve_stream(
    router: Arc<Router>,
    state: Arc<ConnState>,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let (req, payload) = match read_frame::<Request>(&mut recv).await {
        Ok(Some(x)) => x,
        Ok(None) => return,
        Err(NetError::TooLarge(n)) => {
            reply(&mut send, err(ErrorCode::TooLarge, format!("frame of {n} bytes refused")), Bytes::new()).await;
            let _ = recv.stop(1u32.into());
            return;
        }
        Err(e) => {
            tracing::debug!(iom = router.me.0, "malformed request: {e}");
            reply(&mut send, err(ErrorCode::Malformed, e.to_string()), Bytes::new()).await;
            let _ = recv.stop(1u32.into());
            return;
        }
    };
    if let Request::Hello(h) = &req {
        let r = answer_hello(router.me, &router.cluster_id, || router.member.current(), h, state.cert, &state.peer);
        reply(&mut send, r, Bytes::new()).await;
        return;
    }
    let Some(&(_, speaks)) = state.peer.get() else {
        reply(&mut send, err(ErrorCode::NoHello, "a connection must start with Hello"), Bytes::new()).await;
        return;
    };
    if req.since() > speaks {
        // What an IOM of that version would answer: it cannot decode it.
        let (family, op) = req.name();
        let why = format!("{family} {op} needs protocol {}; this connection runs at {speaks}", req.since());
        reply(&mut send, err(ErrorCode::Malformed, why), Bytes::new()).await;
        return;
    }
    if !matches!(state.cert, Some(net::tls::CertRole::Iom(_))) && !client_may_ask(&req) {
        let (family, op) = req.name();
        tracing::warn!(iom = router.me.0, family, op, "refused an IOM-only request from a client certificate");
        let why = format!("{family} {op} is for IOMs only: a client certificate may not ask it");
        reply(&mut send, err(ErrorCode::Invalid, why), Bytes::new()).await;
        return;
    }
    // Only an IOM's own certificate speaks for it: a heartbeat or a parity
    // channel (a data IOM writing, perhaps before its first heartbeat got
    // here) shows that IOM runs with a store (`birth`), and only the
    // proposer may release its votes.
    let cert_iom = match state.cert {
        Some(net::tls::CertRole::Iom(i)) => Some(IomId(i)),
        _ => None,
    };
    match &req {
        Request::Member(MemberReq::Ping { from, .. }) | Request::ParityChannel { from, .. }
            if cert_iom == Some(*from) && router.seen.note(*from) =>
        {
            let (seen, who) = (router.seen.clone(), *from);
            router.workers.spawn(Tier::Background, "seen-persist", async move {
                let keep = seen.clone();
                let r = crate::fsutil::off_loop("record a heard IOM", move || keep.persist()).await;
                if let Err(e) = r {
                    tracing::warn!("cannot record that IOM {who} was heard: {e}; noted again at its next heartbeat");
                    seen.forget(who);
                }
            });
        }
        Request::Member(MemberReq::Release { ballot, .. }) if cert_iom != Some(ballot.proposer) => {
            let why = format!("only IOM {} may release its ballot", ballot.proposer);
            reply(&mut send, err(ErrorCode::Invalid, why), Bytes::new()).await;
            return;
        }
        _ => {}
    }
    let serves_data =
        matches!(req, Request::Data(_) | Request::Meta(_) | Request::ParityChannel { .. } | Request::MetaMirror { .. });
    if serves_data && !*router.rejoin.ready.borrow() {
        reply(
            &mut send,
            err(
                ErrorCode::NotServing,
                format!("IOM {} is starting and does not know the current cluster map yet", router.me),
            ),
            Bytes::new(),
        )
        .await;
        return;
    }
    match req {
        Request::ParityChannel { from, .. } => {
            crate::parity::run_channel(router.parity.clone(), from, send, recv).await;
        }
        Request::MetaMirror { from, .. } => {
            router.namespace.clone().serve_mirror(from, send, recv).await;
        }

        other => {
            let (family, op) = other.name();
            let t0 = std::time::Instant::now();
            let inbound = payload.len() as u64;
            let (r, p) = match dispatch(&router, other, payload).await {
                Ok(x) => x,
                Err(e) => {
                    metrics::counter!("iomfs_iom_request_errors_total", "family" => family, "op" => op).increment(1);
                    (Reply::Error(e.to_wire()), Vec::new())
                }
            };
            if family == "data" {
                let outbound: usize = p.iter().map(|b| b.len()).sum();
                metrics::counter!("iomfs_iom_data_received_bytes_total").increment(inbound);
                metrics::counter!("iomfs_iom_data_sent_bytes_total").increment(outbound as u64);
            }
            reply_chunks(&mut send, r, p).await;
            metrics::counter!("iomfs_iom_requests_total", "family" => family, "op" => op).increment(1);
            metrics::histogram!("iomfs_iom_request_duration_seconds", "family" => family, "op" => op)
                .record(t0.elapsed().as_secs_f64());
        }
    }
}

/// The answer to a Hello on a connection whose certificate names `cert`;
/// an accepted one records the peer and the agreed version in `agreed`.
/// (Also the answer of an IOM still deciding whether it may create its
/// store: `birth`.)
pub(crate) fn answer_hello(
    me: IomId,
    cluster_id: &str,
    map: impl FnOnce() -> common::cluster::ClusterMap,
    h: &common::wire::Hello,
    cert: Option<net::tls::CertRole>,
    agreed: &OnceLock<(PeerKind, u32)>,
) -> Reply {
    if let Some(why) = hello_mismatch(h.peer, cert) {
        tracing::warn!(iom = me.0, remote = ?cert, "refused a Hello: {why}");
        err(ErrorCode::Invalid, why)
    } else if h.cluster_id != cluster_id {
        err(ErrorCode::WrongCluster, format!("IOM {me} belongs to cluster '{cluster_id}'"))
    } else if let Some(v) = common::wire::negotiate(h.protocol) {
        match agreed.get() {
            Some(&(_, was)) if was != v => err(
                ErrorCode::Invalid,
                format!("this connection already runs at protocol {was}: open a new one for {v}"),
            ),
            _ => {
                let _ = agreed.set((h.peer, v));
                Reply::Hello(HelloOk { protocol: v, iom: me, map: map() })
            }
        }
    } else {
        err(
            ErrorCode::VersionMismatch,
            format!(
                "IOM {me} speaks protocol versions {} to {}, the peer {}",
                common::wire::PROTOCOL_OLDEST,
                common::wire::protocol_max(),
                h.protocol
            ),
        )
    }
}

/// Why a Hello's claim does not match the certificate (`None`: it does).
/// An IOM certificate speaks only for its own IOM; a client certificate
/// only as a client.
fn hello_mismatch(said: PeerKind, cert: Option<net::tls::CertRole>) -> Option<String> {
    use net::tls::CertRole;
    match (said, cert) {
        (PeerKind::Iom(i), Some(CertRole::Iom(j))) if i.0 == j => None,
        (PeerKind::Client | PeerKind::Admin, Some(_)) => None,
        (PeerKind::Iom(i), c) => Some(format!("the peer says it is IOM {i} but its certificate names {c:?}")),
        (PeerKind::Client | PeerKind::Admin, None) => {
            Some("the peer's certificate names neither an IOM nor a client".into())
        }
    }
}

/// What a client certificate may ask: data and namespace requests, the
/// map, and the operator's stats and cache drop. Votes, commits, parity
/// channels, the namespace mirror, handovers and recovery are between IOMs.
fn client_may_ask(req: &Request) -> bool {
    match req {
        Request::Hello(_) | Request::Data(_) | Request::Meta(_) | Request::Admin(_) => true,
        Request::Member(m) => matches!(m, MemberReq::GetMap | MemberReq::Ping { .. }),
        Request::Relay { req, .. } => relayable(req),
        Request::Handover(_) | Request::Recovery(_) | Request::ParityChannel { .. } | Request::MetaMirror { .. } => {
            false
        }
    }
}

/// How long a relaying IOM waits for the answer it forwards.
const RELAY_WAIT: std::time::Duration = std::time::Duration::from_secs(25);

/// What an IOM forwards for a client (`Relay`): what the client may ask
/// itself, one hop only, and no stream. The IOM it is forwarded to sees the
/// relaying IOM's certificate, so nothing only an IOM may ask goes through,
/// whoever asks for the relay.
fn relayable(req: &Request) -> bool {
    !matches!(
        req,
        Request::Hello(_) | Request::Relay { .. } | Request::ParityChannel { .. } | Request::MetaMirror { .. }
    ) && client_may_ask(req)
}

/// A request's reply and its payload (buffers sent one after another).
async fn dispatch(router: &Arc<Router>, req: Request, payload: Bytes) -> Result<(Reply, Vec<Bytes>), Error> {
    match req {
        Request::Data(d) => handle_data(router, d, payload).await.map(|(r, p)| (Reply::Data(r), p)),
        Request::Member(m) => handle_member(router, m).await.map(|r| (Reply::Member(r), Vec::new())),
        Request::Handover(h) => handle_handover(router, h).await.map(|r| (Reply::Handover(r), Vec::new())),
        Request::Recovery(q) => handle_recovery(router, q).await.map(|r| (Reply::Recovery(r), Vec::new())),
        Request::Admin(AdminReq::Stats) => Ok((Reply::Admin(AdminResp::Stats(router.stats())), Vec::new())),
        Request::Admin(AdminReq::DropCache) => {
            Ok((Reply::Admin(AdminResp::CacheDropped { bytes: router.drop_cache() }), Vec::new()))
        }
        Request::Admin(AdminReq::ScrubReport(s)) => {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            if s.finished_unix > now + 86_400 {
                return Err(Error::Wire(WireError::new(
                    ErrorCode::Invalid,
                    format!(
                        "a scrub that finished at {} s after 1970 is a day or more ahead of IOM {}'s clock ({now}): \
                         check the reporting host's clock",
                        s.finished_unix, router.me
                    ),
                )));
            }
            tracing::info!(iom = router.me.0, problems = s.problems, groups = s.groups, "told of a cluster scrub");
            router.scrubs.keep(s)?;
            Ok((Reply::Admin(AdminResp::ScrubKept), Vec::new()))
        }
        Request::Admin(AdminReq::LastScrub) => {
            Ok((Reply::Admin(AdminResp::LastScrub(router.scrubs.last())), Vec::new()))
        }
        Request::Meta(call) => router.namespace.handle(call).await.map(|r| (Reply::Meta(r), Vec::new())),
        Request::Relay { to, req } => router.relay(to, *req, payload).await,
        Request::Hello(_) | Request::ParityChannel { .. } | Request::MetaMirror { .. } => {
            unreachable!("handled by serve_stream")
        }
    }
}

/// Which role answers a data request, decided once per request from its
/// route: this IOM's own blocks, or a failed IOM's as its stand-in.
#[derive(Clone, Copy)]
enum Plane {
    Own,
    StandIn(IomId),
}

impl Plane {
    /// Checks that this IOM serves `route` now (with a quorum) and says
    /// as what.
    fn of(router: &Router, route: &Route) -> Result<Plane, Error> {
        router.member.check_route(route)?;
        Ok(if route.target == router.me { Plane::Own } else { Plane::StandIn(route.target) })
    }

    async fn read(self, router: &Arc<Router>, key: BlockKey, offset: u32, len: u32) -> Result<(Version, Bytes), Error> {
        match self {
            Plane::Own => router.data.read_block(key, offset, len).await,
            Plane::StandIn(owner) => router.standin.read(owner, key, offset, len).await,
        }
    }

    async fn write(
        self,
        router: &Arc<Router>,
        key: BlockKey,
        op: Op,
        t: Toughness,
        hint: u8,
        stripe: Option<u64>,
    ) -> Result<Version, Error> {
        match self {
            Plane::Own => router.data.write_block(key, op, t, hint, stripe).await,
            Plane::StandIn(owner) => router.standin.write(owner, key, op, t, hint).await,
        }
    }

    async fn drop_object(self, router: &Arc<Router>, object: ObjectId, from: GroupNo) -> Result<(), Error> {
        match self {
            Plane::Own => router.data.drop_object(object, from).await,
            Plane::StandIn(owner) => router.standin.drop_object(owner, object, from),
        }
    }

    async fn read_version(self, router: &Arc<Router>, key: BlockKey, version: Version) -> Result<Bytes, Error> {
        match self {
            Plane::Own => router.data.read_version(key, version).await,
            Plane::StandIn(_) => {
                let (v, b) = router.group.reconstruct(key, Some(version)).await?;
                debug_assert_eq!(v, version);
                Ok(b)
            }
        }
    }

    /// A stand-in keeps no parity for the failed IOM.
    fn own_parity(self, group: GroupKey, what: &str) -> Result<(), Error> {
        match self {
            Plane::Own => Ok(()),
            Plane::StandIn(owner) => Err(Error::Wire(WireError::new(
                ErrorCode::Unavailable,
                format!("the parity of {group:?} lives on failed IOM {owner}: {what}"),
            ))),
        }
    }
}

/// `DropObjects`: the data of these objects goes, on this IOM's own role or
/// on the failed IOM's it stands in for (also called directly by this
/// IOM's namespace garbage collection, see `caller`).
pub(crate) async fn handle_drop_objects(
    router: &Arc<Router>,
    route: Route,
    objects: Vec<ObjectId>,
) -> Result<(), Error> {
    let plane = Plane::of(router, &route)?;
    if objects.len() > MAX_DROP_OBJECTS {
        return Err(Error::BadRequest(format!("drop of {} objects: at most {MAX_DROP_OBJECTS}", objects.len())));
    }
    for o in objects {
        plane.drop_object(router, o, GroupNo(0)).await?;
    }
    Ok(())
}

/// `ReadVersion`: one version of a block (rebuilt from its group by a
/// stand-in).
pub(crate) async fn handle_read_version(
    router: &Arc<Router>,
    route: Route,
    key: BlockKey,
    version: Version,
) -> Result<Bytes, Error> {
    Plane::of(router, &route)?.read_version(router, key, version).await
}

/// `ReadParity`: a group's parity with the member versions it covers.
pub(crate) async fn handle_read_parity(
    router: &Arc<Router>,
    route: Route,
    group: GroupKey,
) -> Result<(Vec<Version>, Bytes), Error> {
    Plane::of(router, &route)?.own_parity(group, "it is rebuilt when that IOM comes back")?;
    router.parity.read_parity(group).await
}

async fn handle_data(router: &Arc<Router>, req: DataReq, payload: Bytes) -> Result<(DataResp, Vec<Bytes>), Error> {
    match req {
        DataReq::ReadMany { route, pieces } => {
            let plane = Plane::of(router, &route)?;
            let bs = router.block_size as u64;
            if pieces.len() > MAX_PIECES || pieces.iter().any(|p| p.offset as u64 + p.len as u64 > bs) {
                return Err(Error::BadRequest(format!(
                    "multi-block read of {} pieces: at most {MAX_PIECES}, each inside a {bs}-byte block",
                    pieces.len()
                )));
            }
            if matches!(plane, Plane::Own) && pieces.len() > 1 {
                router.data.prefetch(pieces.iter().map(|p| p.key)).await;
            }
            let reads = pieces
                .into_iter()
                .map(|p| async move { Ok::<Bytes, Error>(plane.read(router, p.key, p.offset, p.len).await?.1) });
            let parts = futures::future::try_join_all(reads).await?;
            let lens = parts.iter().map(|b| b.len() as u32).collect();
            Ok((DataResp::ReadAll { lens }, parts))
        }
        DataReq::DropObjects { route, objects } => {
            handle_drop_objects(router, route, objects).await?;
            Ok((DataResp::Dropped, Vec::new()))
        }
        other => handle_data_one(router, other, payload)
            .await
            .map(|(r, p)| (r, if p.is_empty() { Vec::new() } else { vec![p] })),
    }
}

/// One block's transaction in a `WriteMany`: its parts, group hint and stripe.
type BlockWrite = (BlockKey, Vec<(u32, Bytes)>, u8, Option<u64>);

/// `WriteMany` and `WriteStriped`: the pieces of one client write that
/// this IOM holds, one transaction per block; `stripes[i]` (if given) names
/// piece i's client stripe (0: none), used only for this IOM's own blocks.
async fn handle_write_many(
    router: &Arc<Router>,
    route: Route,
    pieces: Vec<WritePiece>,
    toughness: Toughness,
    stripes: Vec<u64>,
    payload: Bytes,
) -> Result<(DataResp, Bytes), Error> {
    let plane = Plane::of(router, &route)?;
    let total: u64 = pieces.iter().map(|p| p.len as u64).sum();
    let bs = router.block_size as u64;
    let fits = pieces.iter().all(|p| p.len > 0 && p.offset as u64 + p.len as u64 <= bs);
    if total != payload.len() as u64 || pieces.len() > MAX_PIECES || !fits {
        return Err(Error::BadRequest(format!(
            "multi-block write of {} pieces ({total} bytes, payload {}): at most {MAX_PIECES} pieces, \
             each non-empty and inside a {bs}-byte block, adding up to the payload",
            pieces.len(),
            payload.len()
        )));
    }
    // The pieces of one block go as one transaction (one new version),
    // in the order sent; a block in a stripe is written whole, by one piece.
    let mut blocks: Vec<BlockWrite> = Vec::new();
    let mut unstriped = std::collections::HashMap::<BlockKey, usize>::new();
    let mut at = 0usize;
    for (i, p) in pieces.into_iter().enumerate() {
        let data = payload.slice(at..at + p.len as usize);
        at += p.len as usize;
        let stripe = stripes.get(i).copied().filter(|&s| s != 0);
        match (stripe, unstriped.get(&p.key)) {
            (None, Some(&b)) => blocks[b].1.push((p.offset, data)),
            _ => {
                if stripe.is_none() {
                    unstriped.insert(p.key, blocks.len());
                }
                blocks.push((p.key, vec![(p.offset, data)], p.group_hint, stripe));
            }
        }
    }
    let writes = blocks
        .into_iter()
        .map(|(key, parts, hint, stripe)| plane.write(router, key, Op::from_parts(parts), toughness, hint, stripe));
    futures::future::try_join_all(writes).await?;
    Ok((DataResp::WrittenAll, Bytes::new()))
}

async fn handle_data_one(router: &Arc<Router>, req: DataReq, payload: Bytes) -> Result<(DataResp, Bytes), Error> {
    match req {
        DataReq::Read { route, key, offset, len } => {
            let (version, b) = Plane::of(router, &route)?.read(router, key, offset, len).await?;
            Ok((DataResp::Read { version }, b))
        }
        DataReq::Write { route, key, offset, toughness, group_hint } => {
            let plane = Plane::of(router, &route)?;
            let op = Op::Write { offset, data: payload };
            let v = plane.write(router, key, op, toughness, group_hint, None).await?;
            Ok((DataResp::Written { version: v }, Bytes::new()))
        }
        DataReq::WriteMany { route, pieces, toughness } => {
            handle_write_many(router, route, pieces, toughness, Vec::new(), payload).await
        }
        DataReq::WriteStriped { route, pieces, toughness, stripes } => {
            if stripes.len() != pieces.len() {
                return Err(Error::BadRequest(format!(
                    "striped write of {} pieces names {} stripes",
                    pieces.len(),
                    stripes.len()
                )));
            }
            handle_write_many(router, route, pieces, toughness, stripes, payload).await
        }
        DataReq::StripeParity { route, group, stripe, crcs } => {
            // A stand-in keeps no parity for its failed IOM: nothing to take.
            if let Plane::Own = Plane::of(router, &route)? {
                router.parity.take_piece(group, stripe, crcs, payload)?;
            }
            Ok((DataResp::StripeTaken, Bytes::new()))
        }
        DataReq::Truncate { route, key, keep, toughness } => {
            let v = Plane::of(router, &route)?.write(router, key, Op::Truncate { keep }, toughness, 1, None).await?;
            Ok((DataResp::Written { version: v }, Bytes::new()))
        }
        DataReq::Flush { route } => {
            router.member.check_route(&route)?;
            router.data.flush().await?;
            Ok((DataResp::Flushed, Bytes::new()))
        }
        DataReq::DropObject { route, object, from } => {
            Plane::of(router, &route)?.drop_object(router, object, from).await?;
            Ok((DataResp::Dropped, Bytes::new()))
        }
        DataReq::ReadVersion { route, key, version } => {
            let b = handle_read_version(router, route, key, version).await?;
            Ok((DataResp::Version { version }, b))
        }
        DataReq::ReadParity { route, group } => {
            let (versions, b) = handle_read_parity(router, route, group).await?;
            Ok((DataResp::Parity { versions }, b))
        }
        DataReq::RecomputeParity { route, group } => {
            Plane::of(router, &route)?.own_parity(group, "it can only be recomputed while all its IOMs are up")?;
            if !router.group.is_whole(group) {
                return Err(Error::Wire(WireError::new(
                    ErrorCode::Unavailable,
                    format!("the parity of {group:?} can only be recomputed while all its IOMs are up"),
                )));
            }
            tracing::warn!(
                iom = router.me.0,
                object = group.object.0,
                group = group.group.0,
                "recomputing parity (scrub --repair)"
            );
            router.parity.recompute(group).await?;
            Ok((DataResp::Recomputed, Bytes::new()))
        }
        DataReq::ListBlocks { after, limit } => {
            Ok((DataResp::Blocks(router.data.list_blocks(after, limit)), Bytes::new()))
        }
        DataReq::ListGroups { after, limit } => {
            Ok((DataResp::Groups(router.data.list_groups(after, limit)), Bytes::new()))
        }
        DataReq::ReadMany { .. } | DataReq::DropObjects { .. } => unreachable!("handled by data()"),
    }
}

/// `Member`: heartbeats, map fetches, votes and commits.
async fn handle_member(router: &Arc<Router>, req: MemberReq) -> Result<MemberResp, Error> {
    match req {
        MemberReq::Ping { .. } => {
            if let Some(d) = crate::fsutil::disk_stalled(router.timeouts.failure_timeout) {
                return Err(Error::Wire(WireError::new(
                    ErrorCode::NotServing,
                    format!("IOM {}'s disk has finished nothing for {d:?}", router.me),
                )));
            }
            // Not counted as hearing the sender: only an answer to this
            // IOM's own ping is (`Failover::heartbeat_worker`). With loss one way, the
            // side that only receives would otherwise count peers that
            // never hear it: a quorum lease that outlives its takeover
            // (stale reads), or an IOM nobody declares down while it
            // refuses everything.
            Ok(MemberResp::Pong { epoch: router.member.epoch(), reachable: Vec::new() })
        }
        MemberReq::Propose { ballot, map, changed } => {
            let (granted, map) = router.failover.handle_propose(ballot, 0, map, changed);
            Ok(MemberResp::Vote { granted, map })
        }
        MemberReq::ProposeRound { ballot, round, map, changed } => {
            let (granted, map) = router.failover.handle_propose(ballot, round, map, changed);
            Ok(MemberResp::Vote { granted, map })
        }
        MemberReq::Commit { map } => {
            router.member.install(map);
            Ok(MemberResp::Ack)
        }
        MemberReq::GetMap => Ok(MemberResp::Map(router.member.current())),
        MemberReq::Release { ballot, round } => {
            router.member.release(ballot, round);
            Ok(MemberResp::Ack)
        }
        MemberReq::StoreState { from } => {
            Ok(MemberResp::StoreState { has_store: true, seen_you: router.seen.has(from) })
        }
    }
}

/// `Handover`: the stand-in's side of a failed IOM's return.
async fn handle_handover(router: &Arc<Router>, req: HandoverReq) -> Result<HandoverResp, Error> {
    match req {
        HandoverReq::RebuildMarks { about } => Ok(HandoverResp::Marks(router.standin.rebuild_marks(about))),
        HandoverReq::ClearMarks { about, marks } => {
            router.standin.clear_marks(about, marks);
            Ok(HandoverResp::Ack)
        }
        HandoverReq::Freeze { about } => {
            let rebuilding =
                || matches!(router.member.current().state(about), IomState::Rebuilding { proxy } if proxy == router.me);
            Ok(HandoverResp::Marks(router.standin.freeze(about, rebuilding).await?))
        }
        HandoverReq::Unfreeze { about } => {
            router.handover.unfreeze(about);
            Ok(HandoverResp::Ack)
        }
    }
}

/// `Recovery`: what this IOM knows of a transaction, and the repairs a
/// peer's recovery asks of it (also called directly for this IOM's own
/// questions, see `caller`).
pub(crate) async fn handle_recovery(router: &Arc<Router>, req: RecoveryReq) -> Result<RecoveryResp, Error> {
    match req {
        RecoveryReq::Unfinished { about } => Ok(RecoveryResp::Unfinished(router.parity.unfinished_about(about).await)),
        RecoveryReq::TxStatus { tx, key, parity_side } => {
            Ok(RecoveryResp::TxStatus(router.recovery.tx_status(tx, key, parity_side).await?))
        }
        RecoveryReq::DoneSeen { of } => Ok(RecoveryResp::DoneSeen { tx: router.recovery.done_seen(of) }),
        RecoveryReq::DiscardTx { tx } => {
            router.recovery.discard_tx(tx);
            Ok(RecoveryResp::Ack)
        }
        RecoveryReq::RebuildBlock { key, version } => {
            router.recovery.rebuild_block(key, version).await?;
            Ok(RecoveryResp::Ack)
        }
    }
}

impl Router {
    /// `Relay`: forwards a client's request to IOM `to` and returns its
    /// answer as is (an error answer included). An IOM that cannot reach
    /// `to` either answers `Unavailable`, which the client retries.
    async fn relay(&self, to: IomId, req: Request, payload: Bytes) -> Result<(Reply, Vec<Bytes>), Error> {
        let invalid = |why: String| Err(Error::Wire(WireError::new(ErrorCode::Invalid, why)));
        if !relayable(&req) {
            let (family, op) = req.name();
            return invalid(format!("{family} {op} is not relayed: only what a client may ask, one hop"));
        }
        if to == self.me || to.0 >= self.member.width() {
            return invalid(format!("IOM {} does not relay to IOM {to}", self.me));
        }
        let (family, op) = req.name();
        metrics::counter!("iomfs_iom_relayed_total", "family" => family, "op" => op).increment(1);
        // As long as the client waits for it (20 s) and a little more: a
        // relay that gave up earlier would have the client send the request
        // again while the first copy may still be carried out.
        match self.caller.call_peer(to, &req, payload, RELAY_WAIT).await {
            Ok((r, p)) => Ok((r, vec![p])),
            Err(NetError::Remote(w)) => Ok((Reply::Error(w), Vec::new())),
            Err(e) => Err(Error::Wire(WireError::new(
                ErrorCode::Unavailable,
                format!("IOM {} cannot reach IOM {to} either: {e}", self.me),
            ))),
        }
    }

    /// `Stats`: what `iomfs status` and the metrics show of this IOM.
    /// `DropCache`: the block cache emptied, the block file's clean pages
    /// handed back to the kernel; returns the bytes the cache held.
    pub fn drop_cache(&self) -> u64 {
        let bytes = self.storage.cache.clear();
        self.storage.store.drop_page_cache();
        tracing::info!(iom = self.me.0, bytes, "block cache dropped");
        bytes
    }

    /// Publishes `stats` and this IOM's view of the cluster map as gauges
    /// and counters for the metrics endpoint, every second.
    pub async fn metrics_worker(self: Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.publish_metrics();
        }
    }

    fn publish_metrics(&self) {
        use metrics::{counter, gauge};
        let s = self.stats();
        gauge!("iomfs_iom_epoch").set(s.epoch as f64);
        gauge!("iomfs_iom_serving").set(if s.serving { 1.0 } else { 0.0 });
        gauge!("iomfs_iom_block_size_bytes").set(s.block_size as f64);
        gauge!("iomfs_iom_slots_used").set(s.slots_used as f64);
        gauge!("iomfs_iom_slots_total").set(s.slots_total as f64);
        gauge!("iomfs_iom_data_blocks").set(s.data_blocks as f64);
        gauge!("iomfs_iom_parity_blocks").set(s.parity_blocks as f64);
        counter!("iomfs_iom_journal_records_total").absolute(s.journal_records);
        counter!("iomfs_iom_journal_flushes_total").absolute(s.journal_flushes);
        gauge!("iomfs_iom_journal_bytes").set(s.journal_bytes as f64);
        gauge!("iomfs_iom_cache_bytes").set(s.cache_bytes as f64);
        counter!("iomfs_iom_cache_hits_total").absolute(s.cache_hits);
        counter!("iomfs_iom_cache_misses_total").absolute(s.cache_misses);
        counter!("iomfs_iom_parity_writes_total").absolute(s.parity_writes);
        counter!("iomfs_iom_parity_deltas_total").absolute(s.parity_deltas);
        gauge!("iomfs_iom_rss_bytes").set(s.rss_bytes as f64);
        gauge!("iomfs_iom_open_transactions").set(s.open_txs as f64);
        gauge!("iomfs_iom_open_parity_transactions").set(s.open_parity_txs as f64);
        gauge!("iomfs_iom_rebuild_done_blocks").set(s.rebuild_done as f64);
        gauge!("iomfs_iom_rebuild_total_blocks").set(s.rebuild_total as f64);
        gauge!("iomfs_iom_rebuild_bytes_per_second").set(s.rebuild_bytes_per_s as f64);
        counter!("iomfs_iom_repaired_blocks_total").absolute(s.repaired_blocks);
        counter!("iomfs_iom_repaired_parity_total").absolute(s.repaired_parity);
        counter!("iomfs_iom_disk_errors_total").absolute(s.disk_errors);
        gauge!("iomfs_iom_room_bytes").set(s.room_bytes as f64);
        gauge!("iomfs_iom_disk_bytes").set(s.disk_bytes as f64);
        if let Some(sc) = self.scrubs.last() {
            gauge!("iomfs_scrub_last_finished_timestamp_seconds").set(sc.finished_unix as f64);
            gauge!("iomfs_scrub_last_duration_seconds").set(sc.millis as f64 / 1000.0);
            gauge!("iomfs_scrub_last_groups").set(sc.groups as f64);
            gauge!("iomfs_scrub_last_blocks").set(sc.blocks as f64);
            gauge!("iomfs_scrub_last_problems").set(sc.problems as f64);
            gauge!("iomfs_scrub_last_repaired").set(sc.repaired as f64);
            gauge!("iomfs_scrub_last_healed_blocks").set(sc.healed as f64);
        }
        gauge!("iomfs_iom_protocol_version").set(common::wire::protocol_max() as f64);
        let map = self.member.current();
        for (i, st) in map.states.iter().enumerate() {
            let now = match st {
                common::cluster::IomState::Up => "up",
                common::cluster::IomState::Down { .. } => "down",
                common::cluster::IomState::Rebuilding { .. } => "rebuilding",
            };
            for state in ["up", "down", "rebuilding"] {
                gauge!("iomfs_cluster_iom_state", "member" => i.to_string(), "state" => state).set(if state == now {
                    1.0
                } else {
                    0.0
                });
            }
        }
        gauge!("iomfs_cluster_health").set(match map.health() {
            common::cluster::Health::Healthy => 0.0,
            common::cluster::Health::Degraded => 1.0,
            common::cluster::Health::Stopped => 2.0,
        });
    }

    pub fn stats(&self) -> IomStats {
        let (used, total) = self.storage.store.usage();
        let (room, disk) = self.storage.store.space();
        // The journals' runways still to be zero-filled will take this much.
        let runways = self.storage.journal.runway_to_come() + self.namespace.runway_to_come();
        let (d, p) = self.storage.map.counts();
        let js = &self.storage.journal.stats;
        // Taken before the literal: a lock guard made inside it would live
        // to its end, and `eta_secs` takes the same lock (a self-deadlock
        // that froze the IOM on its first status call).
        let started = *self.rejoin.progress.started.lock();
        let rebuild_elapsed_ms = started.map(|t| t.elapsed().as_millis() as u64).unwrap_or(0);
        let rebuild_eta_s = self.rejoin.progress.eta_secs();
        IomStats {
            iom: self.me.0,
            epoch: self.member.epoch().0,
            block_size: self.block_size,
            slots_used: used,
            slots_total: total,
            data_blocks: d,
            parity_blocks: p,
            journal_records: js.records.load(Ordering::Relaxed),
            journal_flushes: js.flushes.load(Ordering::Relaxed),
            journal_bytes: js.bytes.load(Ordering::Relaxed),
            cache_bytes: self.storage.cache.bytes(),
            cache_hits: self.storage.cache.hits.load(Ordering::Relaxed),
            cache_misses: self.storage.cache.misses.load(Ordering::Relaxed),
            parity_writes: self.parity.writes.load(Ordering::Relaxed),
            parity_deltas: self.parity.deltas.load(Ordering::Relaxed),
            rss_bytes: rss_bytes(),
            open_txs: self.storage.map.dtx.lock().len() as u64,
            open_parity_txs: self.storage.map.ptx.lock().len() as u64,
            rebuild_done: self.rejoin.progress.done.load(Ordering::Relaxed),
            rebuild_total: self.rejoin.progress.total.load(Ordering::Relaxed),
            rebuild_bytes_per_s: self.rejoin.progress.rate(),
            serving: *self.rejoin.ready.borrow(),
            repaired_blocks: self.data.repairs.load(Ordering::Relaxed),
            disk_errors: self.data.disk_errors.load(Ordering::Relaxed),
            repaired_parity: self.parity.repairs.load(Ordering::Relaxed),
            room_bytes: room.saturating_sub(runways),
            disk_bytes: disk,
            fs_id: self.storage.store.fs_id(),
            shared_room_bytes: self.storage.store.shared_room().saturating_sub(runways).min(room),
            version: env!("CARGO_PKG_VERSION").to_string(),
            rebuild_bytes: self.rejoin.progress.bytes.load(Ordering::Relaxed),
            rebuild_elapsed_ms,
            rebuild_eta_s,
        }
    }
}

/// The local side of [`crate::caller::RoleCaller`]: a call to a role this
/// IOM serves runs the same handler as a request from the network.
impl crate::caller::LocalRoles for Router {
    fn read_parity(
        self: Arc<Self>,
        route: Route,
        g: GroupKey,
    ) -> crate::caller::BoxFut<'static, Result<(Vec<Version>, Bytes), Error>> {
        Box::pin(async move { handle_read_parity(&self, route, g).await })
    }

    fn read_version(
        self: Arc<Self>,
        route: Route,
        key: BlockKey,
        v: Version,
    ) -> crate::caller::BoxFut<'static, Result<Bytes, Error>> {
        Box::pin(async move { handle_read_version(&self, route, key, v).await })
    }

    fn drop_objects(
        self: Arc<Self>,
        route: Route,
        objects: Vec<ObjectId>,
    ) -> crate::caller::BoxFut<'static, Result<(), Error>> {
        Box::pin(async move { handle_drop_objects(&self, route, objects).await })
    }

    fn recovery(self: Arc<Self>, req: RecoveryReq) -> crate::caller::BoxFut<'static, Result<RecoveryResp, Error>> {
        Box::pin(async move { handle_recovery(&self, req).await })
    }

    fn stats(&self) -> common::wire::IomStats {
        Router::stats(self)
    }
}

/// This process's resident set, in bytes (0 if /proc cannot tell).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|x| x.parse::<u64>().ok()))
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}
