//! QUIC service: accepts connections (mutual TLS is enforced by the
//! endpoint's TLS config), runs the Hello exchange, and dispatches every
//! stream's request to its handler. A malformed or oversized frame ends
//! that stream with an error; the connection and the server go on.

use crate::workers::Tier;
use crate::write_path::Op;
use crate::{Error, Iom};
use bytes::Bytes;
use common::cluster::IomState;
use common::toughness::Toughness;
use common::wire::{
    AdminReq, AdminResp, DataReq, DataResp, ErrorCode, HelloOk, MemberReq, MemberResp, PeerKind, Reply, Request, Route,
    WireError, MAX_DROP_OBJECTS, MAX_PIECES, PROTOCOL_VERSION,
};
use common::{BlockKey, GroupKey, GroupNo, IomId, ObjectId, Version};
use net::frame::{read_frame, write_frame, write_frame_chunks};
use net::NetError;
use std::sync::Arc;
use std::sync::OnceLock;

struct ConnState {
    peer: OnceLock<PeerKind>,
}

/// Accepts connections until shutdown.
pub async fn serve(iom: Arc<Iom>) {
    let intake = iom.workers.token(Tier::Intake);
    loop {
        let incoming = tokio::select! {
            _ = intake.cancelled() => return,
            i = iom.endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            },
        };
        let me = iom.clone();
        iom.workers.spawn(Tier::Connections, "conn", async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_conn(me, conn).await,
                // A peer without a certificate of this cluster ends here.
                Err(e) => tracing::info!(%remote, "refused connection: {e}"),
            }
        });
    }
}

async fn serve_conn(iom: Arc<Iom>, conn: quinn::Connection) {
    let state = Arc::new(ConnState { peer: OnceLock::new() });
    net::log_conn_stats(&conn, format!("in@{}<-{}", iom.id, conn.remote_address()));
    loop {
        let (send, recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let (me, state) = (iom.clone(), state.clone());
        iom.workers.spawn(Tier::Connections, "stream", async move { serve_stream(me, state, send, recv).await });
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

async fn serve_stream(iom: Arc<Iom>, state: Arc<ConnState>, mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let (req, payload) = match read_frame::<Request>(&mut recv).await {
        Ok(Some(x)) => x,
        Ok(None) => return,
        Err(NetError::TooLarge(n)) => {
            reply(&mut send, err(ErrorCode::TooLarge, format!("frame of {n} bytes refused")), Bytes::new()).await;
            let _ = recv.stop(1u32.into());
            return;
        }
        Err(e) => {
            tracing::debug!(iom = iom.id.0, "malformed request: {e}");
            reply(&mut send, err(ErrorCode::Malformed, e.to_string()), Bytes::new()).await;
            let _ = recv.stop(1u32.into());
            return;
        }
    };
    if let Request::Hello(h) = &req {
        let r = if h.protocol != PROTOCOL_VERSION {
            err(
                ErrorCode::VersionMismatch,
                format!("IOM {} speaks protocol {PROTOCOL_VERSION}, peer speaks {}", iom.id, h.protocol),
            )
        } else if h.cluster_id != iom.cfg.cluster_id {
            err(ErrorCode::WrongCluster, format!("IOM {} belongs to cluster '{}'", iom.id, iom.cfg.cluster_id))
        } else {
            let _ = state.peer.set(h.peer);
            Reply::Hello(HelloOk { protocol: PROTOCOL_VERSION, iom: iom.id, map: iom.member.current() })
        };
        reply(&mut send, r, Bytes::new()).await;
        return;
    }
    if state.peer.get().is_none() {
        reply(&mut send, err(ErrorCode::NoHello, "a connection must start with Hello"), Bytes::new()).await;
        return;
    }
    let serves_data =
        matches!(req, Request::Data(_) | Request::Meta(_) | Request::ParityChannel { .. } | Request::MetaMirror { .. });
    if serves_data && !*iom.rejoin.ready.borrow() {
        reply(
            &mut send,
            err(
                ErrorCode::NotServing,
                format!("IOM {} is starting and does not know the current cluster map yet", iom.id),
            ),
            Bytes::new(),
        )
        .await;
        return;
    }
    match req {
        Request::ParityChannel { from, .. } => {
            crate::parity::run_channel(iom.parity.clone(), from, send, recv).await;
        }
        Request::MetaMirror { from, .. } => {
            iom.namespace.clone().serve_mirror(from, send, recv).await;
        }

        other => {
            let (r, p) = match dispatch(&iom, other, payload).await {
                Ok(x) => x,
                Err(e) => (Reply::Error(e.to_wire()), Vec::new()),
            };
            reply_chunks(&mut send, r, p).await;
        }
    }
}

/// A request's reply and its payload (buffers sent one after another).
async fn dispatch(iom: &Arc<Iom>, req: Request, payload: Bytes) -> Result<(Reply, Vec<Bytes>), Error> {
    match req {
        Request::Data(d) => handle_data(iom, d, payload).await.map(|(r, p)| (Reply::Data(r), p)),
        Request::Member(m) => handle_member(iom, m).await.map(|r| (Reply::Member(r), Vec::new())),
        Request::Admin(AdminReq::Stats) => Ok((Reply::Admin(AdminResp::Stats(iom.stats())), Vec::new())),
        Request::Meta(call) => iom.namespace.handle(call).await.map(|r| (Reply::Meta(r), Vec::new())),
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
    /// Checks that this IOM serves `route` now (writes need a quorum too)
    /// and says as what.
    fn of(iom: &Iom, route: &Route, write: bool) -> Result<Plane, Error> {
        iom.member.check_route(route, write)?;
        Ok(if route.target == iom.id { Plane::Own } else { Plane::StandIn(route.target) })
    }

    async fn read(self, iom: &Arc<Iom>, key: BlockKey, offset: u32, len: u32) -> Result<(Version, Bytes), Error> {
        match self {
            Plane::Own => iom.data.read_block(key, offset, len).await,
            Plane::StandIn(owner) => iom.standin.read(owner, key, offset, len).await,
        }
    }

    async fn write(self, iom: &Arc<Iom>, key: BlockKey, op: Op, t: Toughness, hint: u8) -> Result<Version, Error> {
        match self {
            Plane::Own => iom.data.write_block(key, op, t, hint).await,
            Plane::StandIn(owner) => iom.standin.write(owner, key, op, t, hint).await,
        }
    }

    async fn drop_object(self, iom: &Arc<Iom>, object: ObjectId, from: GroupNo) -> Result<(), Error> {
        match self {
            Plane::Own => iom.data.drop_object(object, from).await,
            Plane::StandIn(owner) => iom.standin.drop_object(owner, object, from),
        }
    }

    async fn read_version(self, iom: &Arc<Iom>, key: BlockKey, version: Version) -> Result<Bytes, Error> {
        match self {
            Plane::Own => iom.data.read_version(key, version).await,
            Plane::StandIn(_) => {
                let (v, b) = iom.group.reconstruct(key, Some(version)).await?;
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
pub(crate) async fn handle_drop_objects(iom: &Arc<Iom>, route: Route, objects: Vec<ObjectId>) -> Result<(), Error> {
    let plane = Plane::of(iom, &route, true)?;
    if objects.len() > MAX_DROP_OBJECTS {
        return Err(Error::BadRequest(format!("drop of {} objects: at most {MAX_DROP_OBJECTS}", objects.len())));
    }
    for o in objects {
        plane.drop_object(iom, o, GroupNo(0)).await?;
    }
    Ok(())
}

/// `ReadVersion`: one version of a block (rebuilt from its group by a
/// stand-in).
pub(crate) async fn handle_read_version(
    iom: &Arc<Iom>,
    route: Route,
    key: BlockKey,
    version: Version,
) -> Result<Bytes, Error> {
    Plane::of(iom, &route, false)?.read_version(iom, key, version).await
}

/// `ReadParity`: a group's parity with the member versions it covers.
pub(crate) async fn handle_read_parity(
    iom: &Arc<Iom>,
    route: Route,
    group: GroupKey,
) -> Result<(Vec<Version>, Bytes), Error> {
    Plane::of(iom, &route, false)?.own_parity(group, "it is rebuilt when that IOM comes back")?;
    iom.parity.read_parity(group).await
}

async fn handle_data(iom: &Arc<Iom>, req: DataReq, payload: Bytes) -> Result<(DataResp, Vec<Bytes>), Error> {
    match req {
        DataReq::ReadMany { route, pieces } => {
            let plane = Plane::of(iom, &route, false)?;
            let bs = iom.cfg.block_size as u64;
            if pieces.len() > MAX_PIECES || pieces.iter().any(|p| p.offset as u64 + p.len as u64 > bs) {
                return Err(Error::BadRequest(format!(
                    "multi-block read of {} pieces: at most {MAX_PIECES}, each inside a {bs}-byte block",
                    pieces.len()
                )));
            }
            let reads = pieces
                .into_iter()
                .map(|p| async move { Ok::<Bytes, Error>(plane.read(iom, p.key, p.offset, p.len).await?.1) });
            let parts = futures::future::try_join_all(reads).await?;
            let lens = parts.iter().map(|b| b.len() as u32).collect();
            Ok((DataResp::ReadAll { lens }, parts))
        }
        DataReq::DropObjects { route, objects } => {
            handle_drop_objects(iom, route, objects).await?;
            Ok((DataResp::Dropped, Vec::new()))
        }
        other => handle_data_one(iom, other, payload)
            .await
            .map(|(r, p)| (r, if p.is_empty() { Vec::new() } else { vec![p] })),
    }
}

async fn handle_data_one(iom: &Arc<Iom>, req: DataReq, payload: Bytes) -> Result<(DataResp, Bytes), Error> {
    match req {
        DataReq::Read { route, key, offset, len } => {
            let (version, b) = Plane::of(iom, &route, false)?.read(iom, key, offset, len).await?;
            Ok((DataResp::Read { version }, b))
        }
        DataReq::Write { route, key, offset, toughness, group_hint } => {
            let plane = Plane::of(iom, &route, true)?;
            let op = Op::Write { offset, data: payload };
            let v = plane.write(iom, key, op, toughness, group_hint).await?;
            Ok((DataResp::Written { version: v }, Bytes::new()))
        }
        DataReq::WriteMany { route, pieces, toughness } => {
            let plane = Plane::of(iom, &route, true)?;
            let total: u64 = pieces.iter().map(|p| p.len as u64).sum();
            let bs = iom.cfg.block_size as u64;
            let fits = pieces.iter().all(|p| p.len > 0 && p.offset as u64 + p.len as u64 <= bs);
            if total != payload.len() as u64 || pieces.len() > MAX_PIECES || !fits {
                return Err(Error::BadRequest(format!(
                    "multi-block write of {} pieces ({total} bytes, payload {}): at most {MAX_PIECES} pieces, \
                     each non-empty and inside a {bs}-byte block, adding up to the payload",
                    pieces.len(),
                    payload.len()
                )));
            }
            let mut at = 0usize;
            let writes = pieces.into_iter().map(|p| {
                let op = Op::Write { offset: p.offset, data: payload.slice(at..at + p.len as usize) };
                at += p.len as usize;
                plane.write(iom, p.key, op, toughness, p.group_hint)
            });
            futures::future::try_join_all(writes).await?;
            Ok((DataResp::WrittenAll, Bytes::new()))
        }
        DataReq::Truncate { route, key, keep, toughness } => {
            let v = Plane::of(iom, &route, true)?.write(iom, key, Op::Truncate { keep }, toughness, 1).await?;
            Ok((DataResp::Written { version: v }, Bytes::new()))
        }
        DataReq::Flush { route } => {
            iom.member.check_route(&route, false)?;
            iom.data.flush().await?;
            Ok((DataResp::Flushed, Bytes::new()))
        }
        DataReq::DropObject { route, object, from } => {
            Plane::of(iom, &route, true)?.drop_object(iom, object, from).await?;
            Ok((DataResp::Dropped, Bytes::new()))
        }
        DataReq::ReadVersion { route, key, version } => {
            let b = handle_read_version(iom, route, key, version).await?;
            Ok((DataResp::Version { version }, b))
        }
        DataReq::ReadParity { route, group } => {
            let (versions, b) = handle_read_parity(iom, route, group).await?;
            Ok((DataResp::Parity { versions }, b))
        }
        DataReq::RecomputeParity { route, group } => {
            Plane::of(iom, &route, true)?.own_parity(group, "it can only be recomputed while all its IOMs are up")?;
            if !iom.group.is_whole(group) {
                return Err(Error::Wire(WireError::new(
                    ErrorCode::Unavailable,
                    format!("the parity of {group:?} can only be recomputed while all its IOMs are up"),
                )));
            }
            tracing::warn!(
                iom = iom.id.0,
                object = group.object.0,
                group = group.group.0,
                "recomputing parity (scrub --repair)"
            );
            iom.parity.recompute(group).await?;
            Ok((DataResp::Recomputed, Bytes::new()))
        }
        DataReq::ListBlocks { after, limit } => {
            Ok((DataResp::Blocks(iom.data.list_blocks(after, limit)), Bytes::new()))
        }
        DataReq::ListGroups { after, limit } => {
            Ok((DataResp::Groups(iom.data.list_groups(after, limit)), Bytes::new()))
        }
        DataReq::ReadMany { .. } | DataReq::DropObjects { .. } => unreachable!("handled by data()"),
    }
}

/// A membership, handover or recovery request (also called directly for
/// this IOM's own questions, see `caller`).
pub(crate) async fn handle_member(iom: &Arc<Iom>, req: MemberReq) -> Result<MemberResp, Error> {
    match req {
        MemberReq::Ping { from, .. } => {
            if let Some(d) = crate::fsutil::disk_stalled(iom.timeouts.failure_timeout) {
                return Err(Error::Wire(WireError::new(
                    ErrorCode::NotServing,
                    format!("IOM {}'s disk has finished nothing for {d:?}", iom.id),
                )));
            }
            iom.member.seen(from);
            Ok(MemberResp::Pong { epoch: iom.member.epoch(), reachable: Vec::new() })
        }
        MemberReq::Propose { ballot, map, changed } => {
            let (granted, map) = iom.failover.handle_propose(ballot, map, changed);
            Ok(MemberResp::Vote { granted, map })
        }
        MemberReq::Commit { map } => {
            iom.member.install(map);
            Ok(MemberResp::Ack)
        }
        MemberReq::Unfinished { about } => Ok(MemberResp::Unfinished(iom.parity.unfinished_about(about).await)),
        MemberReq::RebuildMarks { about } => Ok(MemberResp::Marks(iom.standin.rebuild_marks(about))),
        MemberReq::ClearMarks { about, marks } => {
            iom.standin.clear_marks(about, marks);
            Ok(MemberResp::Ack)
        }
        MemberReq::Freeze { about } => {
            let rebuilding =
                || matches!(iom.member.current().state(about), IomState::Rebuilding { proxy } if proxy == iom.id);
            Ok(MemberResp::Marks(iom.standin.freeze(about, rebuilding).await?))
        }
        MemberReq::Unfreeze { about } => {
            iom.handover.unfreeze(about);
            Ok(MemberResp::Ack)
        }
        MemberReq::GetMap => Ok(MemberResp::Map(iom.member.current())),
        MemberReq::TxStatus { tx, key, parity_side } => {
            Ok(MemberResp::TxStatus(iom.recovery.tx_status(tx, key, parity_side).await))
        }
        MemberReq::DoneSeen { of } => {
            Ok(MemberResp::DoneSeen { tx: iom.storage.map.done_seen.lock().get(&of).copied().unwrap_or(0) })
        }
        MemberReq::DiscardTx { tx } => {
            iom.recovery.discard_tx(tx);
            Ok(MemberResp::Ack)
        }
        MemberReq::RebuildBlock { key, version } => {
            iom.recovery.rebuild_block(key, version).await?;
            Ok(MemberResp::Ack)
        }
    }
}

/// The local side of [`crate::caller::RoleCaller`]: a call to a role this
/// IOM serves runs the same handler as a request from the network.
impl crate::caller::LocalRoles for Iom {
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

    fn member(self: Arc<Self>, req: MemberReq) -> crate::caller::BoxFut<'static, Result<MemberResp, Error>> {
        Box::pin(async move { handle_member(&self, req).await })
    }

    fn stats(&self) -> common::wire::IomStats {
        Iom::stats(self)
    }
}
