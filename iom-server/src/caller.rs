//! `RoleCaller`: every outgoing call of an IOM, one typed function per
//! kind of request (`rpc_*`), plus the plain peer calls of membership
//! (`call_peer`, `conn`).
//!
//! A role call goes to whoever serves the role in the current map. When
//! that is this IOM, it goes straight to the local handler — the same
//! functions the router runs for a request from the network, with the
//! same routing check (own role or stand-in) — and no request is built,
//! encoded or dispatched. The local side is reached through the
//! [`LocalRoles`] trait, bound once the node is built (`bind_local`), so
//! this module imports no role and no role needs the node to call another
//! IOM. (Futures are boxed: reconstruction reads parity, whose repair
//! reads versions, whose stand-in path reconstructs — a recursion the
//! compiler must size.)

use crate::membership::Membership;
use crate::timeouts::Timeouts;
use crate::Error;
use bytes::Bytes;
use common::wire::{DataReq, DataResp, ErrorCode, RecoveryReq, RecoveryResp, Reply, Request, Route, WireError};
use common::{BlockKey, GroupKey, IomId, ObjectId, Version};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The handlers of the roles this IOM serves, as the caller reaches them
/// for a call that stays local (implemented by the router).
pub trait LocalRoles: Send + Sync {
    fn read_parity(self: Arc<Self>, route: Route, g: GroupKey)
        -> BoxFut<'static, Result<(Vec<Version>, Bytes), Error>>;
    fn read_version(self: Arc<Self>, route: Route, key: BlockKey, v: Version) -> BoxFut<'static, Result<Bytes, Error>>;
    fn drop_objects(self: Arc<Self>, route: Route, objects: Vec<ObjectId>) -> BoxFut<'static, Result<(), Error>>;
    fn recovery(self: Arc<Self>, req: RecoveryReq) -> BoxFut<'static, Result<RecoveryResp, Error>>;
    /// This IOM's own figures (`AdminReq::Stats` answered locally).
    fn stats(&self) -> common::wire::IomStats;
}

pub struct RoleCaller {
    me: IomId,
    pool: net::Pool,
    member: Arc<Membership>,
    timeouts: Timeouts,
    local: OnceLock<Weak<dyn LocalRoles>>,
}

fn unexpected(r: Reply) -> Error {
    match r {
        Reply::Error(e) => Error::Wire(e),
        other => Error::UnexpectedReply(format!("{other:?}")),
    }
}

impl RoleCaller {
    pub fn new(me: IomId, pool: net::Pool, member: Arc<Membership>, timeouts: Timeouts) -> RoleCaller {
        RoleCaller { me, pool, member, timeouts, local: OnceLock::new() }
    }

    /// Binds the local roles (once, after the node is built).
    pub fn bind_local(&self, local: Weak<dyn LocalRoles>) {
        let _already = self.local.set(local);
    }

    fn local(&self) -> Result<Arc<dyn LocalRoles>, Error> {
        self.local
            .get()
            .and_then(Weak::upgrade)
            .ok_or_else(|| Error::Wire(WireError::new(ErrorCode::NotServing, format!("IOM {} is stopping", self.me))))
    }

    /// The IOM serving `role` in the current map, and the route naming it.
    fn route_to(&self, role: IomId) -> Result<(IomId, Route), Error> {
        let map = self.member.current();
        let server = map
            .server_for(role)
            .ok_or_else(|| Error::Wire(WireError::new(ErrorCode::ClusterStopped, "more than one IOM is down")))?;
        Ok((server, Route { epoch: map.epoch, target: role }))
    }

    /// The parity of group `g` (b3's read) from its parity role.
    pub async fn rpc_read_parity(&self, role: IomId, g: GroupKey) -> Result<(Vec<Version>, Bytes), Error> {
        let (server, route) = self.route_to(role)?;
        if server == self.me {
            return self.local()?.read_parity(route, g).await;
        }
        let req = Request::Data(DataReq::ReadParity { route, group: g });
        match self.pool.call_timeout(server, &req, Bytes::new(), self.timeouts.role_call).await? {
            (Reply::Data(DataResp::Parity { versions }), b) => Ok((versions, b)),
            (r, _) => Err(unexpected(r)),
        }
    }

    /// Version `version` of block `key` from its data role (or its stand-in,
    /// which rebuilds it from the group).
    pub async fn rpc_read_version(&self, role: IomId, key: BlockKey, version: Version) -> Result<Bytes, Error> {
        let (server, route) = self.route_to(role)?;
        if server == self.me {
            return self.local()?.read_version(route, key, version).await;
        }
        let req = Request::Data(DataReq::ReadVersion { route, key, version });
        match self.pool.call_timeout(server, &req, Bytes::new(), self.timeouts.role_call).await? {
            (Reply::Data(DataResp::Version { .. }), b) => Ok(b),
            (r, _) => Err(unexpected(r)),
        }
    }

    /// Drops `objects` on role `role` (the namespace's garbage collection),
    /// waiting at most `within` for a remote server.
    pub async fn rpc_drop_objects(&self, role: IomId, objects: Vec<ObjectId>, within: Duration) -> Result<(), Error> {
        let (server, route) = self.route_to(role)?;
        if server == self.me {
            return self.local()?.drop_objects(route, objects).await;
        }
        let req = Request::Data(DataReq::DropObjects { route, objects });
        match self.pool.call_timeout(server, &req, Bytes::new(), within).await? {
            (Reply::Data(DataResp::Dropped), _) => Ok(()),
            (r, _) => Err(unexpected(r)),
        }
    }

    /// A recovery question for whoever serves `role` now.
    pub async fn rpc_recovery_role(&self, role: IomId, req: RecoveryReq) -> Result<RecoveryResp, Error> {
        let (server, _) = self.route_to(role)?;
        if server == self.me {
            return self.local()?.recovery(req).await;
        }
        match self.pool.call_timeout(server, &Request::Recovery(req), Bytes::new(), self.timeouts.role_call).await? {
            (Reply::Recovery(m), _) => Ok(m),
            (r, _) => Err(unexpected(r)),
        }
    }

    /// This IOM's own figures, as a peer would get them from `Stats`;
    /// `None` once the node is gone.
    pub fn local_stats(&self) -> Option<common::wire::IomStats> {
        self.local().ok().map(|l| l.stats())
    }

    /// A recovery question for IOM `role`: asked of that IOM itself when it
    /// runs (also while the map calls it down, or the cluster stopped —
    /// recovery is what gets a stopped cluster going again), else of
    /// whoever serves its role.
    pub async fn rpc_recovery(&self, role: IomId, req: RecoveryReq) -> Result<RecoveryResp, Error> {
        if role == self.me {
            return self.rpc_recovery_role(role, req).await;
        }
        match self.pool.call_timeout(role, &Request::Recovery(req.clone()), Bytes::new(), self.timeouts.peer_call).await
        {
            Ok((Reply::Recovery(m), _)) => Ok(m),
            Ok((r, _)) => Err(unexpected(r)),
            Err(e) if e.is_transport() => self.rpc_recovery_role(role, req).await,
            Err(e) => Err(e.into()),
        }
    }

    /// A call to IOM `to` itself, whatever the map says of it (heartbeats,
    /// votes, map fetches, handover questions to a named proxy).
    pub async fn call_peer(
        &self,
        to: IomId,
        req: &Request,
        payload: Bytes,
        within: Duration,
    ) -> Result<(Reply, Bytes), net::NetError> {
        self.pool.call_timeout(to, req, payload, within).await
    }

    /// The connection to IOM `to` (for long-lived streams: parity links,
    /// the namespace mirror).
    pub async fn conn(&self, to: IomId) -> Result<quinn::Connection, net::NetError> {
        self.pool.conn(to).await
    }

    /// The protocol version of the connection to IOM `to`.
    pub async fn version(&self, to: IomId) -> Result<u32, net::NetError> {
        self.pool.version(to).await
    }

    /// Closes every connection (the node's stop).
    pub fn close(&self) {
        self.pool.close()
    }
}
