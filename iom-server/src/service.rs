//! QUIC service: accepts connections (mutual TLS is enforced by the
//! endpoint's TLS config), runs the Hello exchange, and dispatches every
//! stream's request to its handler. A malformed or oversized frame ends
//! that stream with an error; the connection and the server go on.

use crate::workers::Tier;
use crate::write_path::Op;
use crate::{Error, Iom};
use bytes::Bytes;
use common::wire::{
    AdminReq, AdminResp, DataReq, DataResp, ErrorCode, HelloOk, MemberReq, MemberResp, PeerKind, Reply, Request,
    WireError, PROTOCOL_VERSION,
};
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
            let iom = me;
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => serve_conn(iom, conn).await,
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
    if serves_data && !*iom.ready.borrow() {
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
            crate::parity::run_channel(iom, from, send, recv).await;
        }
        Request::MetaMirror { from, .. } => {
            crate::namespace::Namespace::serve_mirror(iom, from, send, recv).await;
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

/// Serves one request in-process (used by an IOM calling a role it serves itself).
pub async fn handle(iom: &Arc<Iom>, req: Request, payload: Bytes) -> Result<(Reply, Bytes), Error> {
    let (r, mut p) = dispatch(iom, req, payload).await?;
    let p = match p.len() {
        0 => Bytes::new(),
        1 => p.pop().expect("one chunk"),
        _ => Bytes::from(p.concat()),
    };
    Ok((r, p))
}

/// A request's reply and its payload (buffers sent one after another).
async fn dispatch(iom: &Arc<Iom>, req: Request, payload: Bytes) -> Result<(Reply, Vec<Bytes>), Error> {
    match req {
        Request::Data(d) => data(iom, d, payload).await.map(|(r, p)| (Reply::Data(r), p)),
        Request::Member(m) => member(iom, m).await.map(|r| (Reply::Member(r), Vec::new())),
        Request::Admin(AdminReq::Stats) => Ok((Reply::Admin(AdminResp::Stats(iom.stats())), Vec::new())),
        Request::Meta(call) => iom.namespace.handle(iom, call).await.map(|r| (Reply::Meta(r), Vec::new())),
        Request::Hello(_) | Request::ParityChannel { .. } | Request::MetaMirror { .. } => {
            unreachable!("handled by serve_stream")
        }
    }
}

async fn data(iom: &Arc<Iom>, req: DataReq, payload: Bytes) -> Result<(DataResp, Vec<Bytes>), Error> {
    match req {
        DataReq::ReadMany { route, pieces } => {
            iom.member.check_route(&route, false)?;
            let bs = iom.cfg.block_size as u64;
            if pieces.len() > 1024 || pieces.iter().any(|p| p.offset as u64 + p.len as u64 > bs) {
                return Err(Error::BadRequest(format!(
                    "multi-block read of {} pieces: at most 1024, each inside a {bs}-byte block",
                    pieces.len()
                )));
            }
            let reads = pieces.into_iter().map(|p| async move {
                let (_, b) = if route.target != iom.id {
                    iom.standin_read(route.target, p.key, p.offset, p.len).await?
                } else {
                    iom.read_block(p.key, p.offset, p.len).await?
                };
                Ok::<Bytes, Error>(b)
            });
            let parts = futures::future::try_join_all(reads).await?;
            let lens = parts.iter().map(|b| b.len() as u32).collect();
            Ok((DataResp::ReadAll { lens }, parts))
        }
        DataReq::DropObjects { route, objects } => {
            iom.member.check_route(&route, true)?;
            if objects.len() > 4096 {
                return Err(Error::BadRequest(format!("drop of {} objects: at most 4096", objects.len())));
            }
            for o in objects {
                if route.target != iom.id {
                    iom.standin_drop(route.target, o, common::GroupNo(0))?;
                } else {
                    iom.drop_object(o, common::GroupNo(0)).await?;
                }
            }
            Ok((DataResp::Dropped, Vec::new()))
        }
        other => data_one(iom, other, payload).await.map(|(r, p)| (r, if p.is_empty() { Vec::new() } else { vec![p] })),
    }
}

async fn data_one(iom: &Arc<Iom>, req: DataReq, payload: Bytes) -> Result<(DataResp, Bytes), Error> {
    // Requests for a failed IOM's role go to the stand-in functions.
    let standin = |route: &common::wire::Route| route.target != iom.id;
    match req {
        DataReq::Read { route, key, offset, len } => {
            iom.member.check_route(&route, false)?;
            let (version, b) = if standin(&route) {
                iom.standin_read(route.target, key, offset, len).await?
            } else {
                iom.read_block(key, offset, len).await?
            };
            Ok((DataResp::Read { version }, b))
        }
        DataReq::Write { route, key, offset, toughness, group_hint } => {
            iom.member.check_route(&route, true)?;
            let op = Op::Write { offset, data: payload };
            let v = if standin(&route) {
                iom.standin_write(route.target, key, op, toughness, group_hint).await?
            } else {
                iom.write_block(key, op, toughness, group_hint).await?
            };
            Ok((DataResp::Written { version: v }, Bytes::new()))
        }
        DataReq::WriteMany { route, pieces, toughness } => {
            iom.member.check_route(&route, true)?;
            let total: u64 = pieces.iter().map(|p| p.len as u64).sum();
            let bs = iom.cfg.block_size as u64;
            let fits = pieces.iter().all(|p| p.len > 0 && p.offset as u64 + p.len as u64 <= bs);
            if total != payload.len() as u64 || pieces.len() > 1024 || !fits {
                return Err(Error::BadRequest(format!(
                    "multi-block write of {} pieces ({total} bytes, payload {}): pieces must be non-empty, \
                     fit a {bs}-byte block and add up to the payload",
                    pieces.len(),
                    payload.len()
                )));
            }
            let mut at = 0usize;
            let writes = pieces.into_iter().map(|p| {
                let op = Op::Write { offset: p.offset, data: payload.slice(at..at + p.len as usize) };
                at += p.len as usize;
                let iom = iom.clone();
                async move {
                    if standin(&route) {
                        iom.standin_write(route.target, p.key, op, toughness, p.group_hint).await
                    } else {
                        iom.write_block(p.key, op, toughness, p.group_hint).await
                    }
                }
            });
            futures::future::try_join_all(writes).await?;
            Ok((DataResp::WrittenAll, Bytes::new()))
        }
        DataReq::Truncate { route, key, keep, toughness } => {
            iom.member.check_route(&route, true)?;
            let op = Op::Truncate { keep };
            let v = if standin(&route) {
                iom.standin_write(route.target, key, op, toughness, 1).await?
            } else {
                iom.write_block(key, op, toughness, 1).await?
            };
            Ok((DataResp::Written { version: v }, Bytes::new()))
        }
        DataReq::Flush { route } => {
            iom.member.check_route(&route, false)?;
            iom.flush().await?;
            Ok((DataResp::Flushed, Bytes::new()))
        }
        DataReq::DropObject { route, object, from } => {
            iom.member.check_route(&route, true)?;
            if standin(&route) {
                iom.standin_drop(route.target, object, from)?;
            } else {
                iom.drop_object(object, from).await?;
            }
            Ok((DataResp::Dropped, Bytes::new()))
        }
        DataReq::ReadVersion { route, key, version } => {
            iom.member.check_route(&route, false)?;
            let b = if standin(&route) {
                let (v, b) = iom.reconstruct(key, Some(version)).await?;
                debug_assert_eq!(v, version);
                b
            } else {
                iom.read_version(key, version).await?
            };
            Ok((DataResp::Version { version }, b))
        }
        DataReq::ReadParity { route, group } => {
            iom.member.check_route(&route, false)?;
            if standin(&route) {
                return Err(Error::Wire(WireError::new(
                    ErrorCode::Unavailable,
                    format!("the parity of {group:?} lives on failed IOM {}", route.target),
                )));
            }
            let (versions, b) = iom.read_parity(group).await?;
            Ok((DataResp::Parity { versions }, b))
        }
        DataReq::RecomputeParity { route, group } => {
            iom.member.check_route(&route, true)?;
            if standin(&route) || !iom.group_is_whole(group) {
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
            iom.recompute_parity(group).await?;
            Ok((DataResp::Recomputed, Bytes::new()))
        }
        DataReq::ListBlocks { after, limit } => Ok((DataResp::Blocks(iom.list_blocks(after, limit)), Bytes::new())),
        DataReq::ListGroups { after, limit } => Ok((DataResp::Groups(iom.list_groups(after, limit)), Bytes::new())),
        DataReq::ReadMany { .. } | DataReq::DropObjects { .. } => unreachable!("handled by data()"),
    }
}

async fn member(iom: &Arc<Iom>, req: MemberReq) -> Result<MemberResp, Error> {
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
            let (granted, map) = iom.handle_propose(ballot, map, changed);
            Ok(MemberResp::Vote { granted, map })
        }
        MemberReq::Commit { map } => {
            iom.member.install(map);
            Ok(MemberResp::Ack)
        }
        MemberReq::Unfinished { about } => Ok(MemberResp::Unfinished(iom.unfinished_about(about).await)),
        MemberReq::RebuildMarks { about } => Ok(MemberResp::Marks(iom.rebuild_marks(about))),
        MemberReq::ClearMarks { about, marks } => {
            iom.clear_marks(about, marks);
            Ok(MemberResp::Ack)
        }
        MemberReq::Freeze { about } => Ok(MemberResp::Marks(iom.freeze(about).await)),
        MemberReq::Unfreeze { about } => {
            iom.unfreeze(about);
            Ok(MemberResp::Ack)
        }
        MemberReq::GetMap => Ok(MemberResp::Map(iom.member.current())),
        MemberReq::TxStatus { tx, key, parity_side } => {
            Ok(MemberResp::TxStatus(iom.tx_status(tx, key, parity_side).await))
        }
        MemberReq::DoneSeen { of } => {
            Ok(MemberResp::DoneSeen { tx: iom.storage.map.done_seen.lock().get(&of).copied().unwrap_or(0) })
        }
        MemberReq::DiscardTx { tx } => {
            iom.discard_tx(tx);
            Ok(MemberResp::Ack)
        }
        MemberReq::RebuildBlock { key, version } => {
            iom.rebuild_block(key, version).await?;
            Ok(MemberResp::Ack)
        }
    }
}
