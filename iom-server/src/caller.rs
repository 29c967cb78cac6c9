//! Outgoing calls to whoever serves a role now, one typed function per
//! kind of request (`rpc_*`). A call to a role this IOM serves itself goes
//! straight to the local handler — the same functions the router runs for
//! a request from the network, with the same routing check (own role or
//! stand-in) — and no request is built, encoded or dispatched for it.
//! (Boxed: reconstruction reads parity, whose repair reads versions, whose
//! stand-in path reconstructs — a recursion the compiler must size.)

use crate::{service, Error, Iom};
use bytes::Bytes;
use common::wire::{DataReq, DataResp, ErrorCode, MemberReq, MemberResp, Reply, Request, Route, WireError};
use common::{BlockKey, GroupKey, IomId, ObjectId, Version};
use std::sync::Arc;
use std::time::Duration;

fn unexpected(r: Reply) -> Error {
    match r {
        Reply::Error(e) => Error::Wire(e),
        other => Error::Format(format!("unexpected reply {other:?}")),
    }
}

impl Iom {
    /// The IOM serving `role` in the current map, and the route naming it.
    fn route_to(&self, role: IomId) -> Result<(IomId, Route), Error> {
        let map = self.member.current();
        let server = map
            .server_for(role)
            .ok_or_else(|| Error::Wire(WireError::new(ErrorCode::ClusterStopped, "more than one IOM is down")))?;
        Ok((server, Route { epoch: map.epoch, target: role }))
    }

    /// The parity of group `g` (b3's read) from its parity role.
    pub async fn rpc_read_parity(self: &Arc<Self>, role: IomId, g: GroupKey) -> Result<(Vec<Version>, Bytes), Error> {
        let (server, route) = self.route_to(role)?;
        if server == self.id {
            return Box::pin(service::read_parity(self, route, g)).await;
        }
        let req = Request::Data(DataReq::ReadParity { route, group: g });
        match self.pool.call_timeout(server, &req, Bytes::new(), self.timeouts.role_call).await? {
            (Reply::Data(DataResp::Parity { versions }), b) => Ok((versions, b)),
            (r, _) => Err(unexpected(r)),
        }
    }

    /// Version `version` of block `key` from its data role (or its stand-in,
    /// which rebuilds it from the group).
    pub async fn rpc_read_version(
        self: &Arc<Self>,
        role: IomId,
        key: BlockKey,
        version: Version,
    ) -> Result<Bytes, Error> {
        let (server, route) = self.route_to(role)?;
        if server == self.id {
            return Box::pin(service::read_version(self, route, key, version)).await;
        }
        let req = Request::Data(DataReq::ReadVersion { route, key, version });
        match self.pool.call_timeout(server, &req, Bytes::new(), self.timeouts.role_call).await? {
            (Reply::Data(DataResp::Version { .. }), b) => Ok(b),
            (r, _) => Err(unexpected(r)),
        }
    }

    /// Drops `objects` on role `role` (the namespace's garbage collection),
    /// waiting at most `within` for a remote server.
    pub async fn rpc_drop_objects(
        self: &Arc<Self>,
        role: IomId,
        objects: Vec<ObjectId>,
        within: Duration,
    ) -> Result<(), Error> {
        let (server, route) = self.route_to(role)?;
        if server == self.id {
            return Box::pin(service::drop_objects(self, route, objects)).await;
        }
        let req = Request::Data(DataReq::DropObjects { route, objects });
        match self.pool.call_timeout(server, &req, Bytes::new(), within).await? {
            (Reply::Data(DataResp::Dropped), _) => Ok(()),
            (r, _) => Err(unexpected(r)),
        }
    }

    /// A membership, handover or recovery question for whoever serves
    /// `role` now.
    pub async fn rpc_member(self: &Arc<Self>, role: IomId, req: MemberReq) -> Result<MemberResp, Error> {
        let (server, _) = self.route_to(role)?;
        if server == self.id {
            return Box::pin(service::member(self, req)).await;
        }
        match self.pool.call_timeout(server, &Request::Member(req), Bytes::new(), self.timeouts.role_call).await? {
            (Reply::Member(m), _) => Ok(m),
            (r, _) => Err(unexpected(r)),
        }
    }
}
