//! The cluster map as this IOM knows it, and the routing checks made with it.

use common::cluster::{ClusterMap, IomState};
use common::wire::{ErrorCode, Route, WireError};
use common::{Epoch, IomId};
use parking_lot::RwLock;
use tokio::sync::watch;

pub struct Membership {
    me: IomId,
    map: RwLock<ClusterMap>,
    changes: watch::Sender<Epoch>,
}

impl Membership {
    pub fn new(me: IomId, map: ClusterMap) -> Membership {
        let (changes, _) = watch::channel(map.epoch);
        Membership { me, map: RwLock::new(map), changes }
    }

    pub fn current(&self) -> ClusterMap {
        self.map.read().clone()
    }

    pub fn epoch(&self) -> Epoch {
        self.map.read().epoch
    }

    /// Installs a newer map; older or equal epochs are ignored.
    pub fn install(&self, m: ClusterMap) -> bool {
        let mut cur = self.map.write();
        if m.epoch <= cur.epoch {
            return false;
        }
        let e = m.epoch;
        *cur = m;
        drop(cur);
        let _ = self.changes.send(e);
        true
    }

    pub fn subscribe(&self) -> watch::Receiver<Epoch> {
        self.changes.subscribe()
    }

    /// Who serves requests for `role` now.
    pub fn server_for(&self, role: IomId) -> Option<IomId> {
        self.map.read().server_for(role)
    }

    /// Checks that this IOM serves `route.target` in its current map.
    pub fn check_route(&self, route: &Route) -> Result<(), WireError> {
        let m = self.map.read();
        match m.server_for(route.target) {
            None => Err(WireError::new(ErrorCode::ClusterStopped, "more than one IOM is down")),
            Some(s) if s == self.me => Ok(()),
            Some(s) => Err(WireError::new(
                ErrorCode::NotServing,
                format!(
                    "IOM {} does not serve IOM {}'s blocks in epoch {} (IOM {s} does)",
                    self.me, route.target, m.epoch
                ),
            )),
        }
    }

    /// Whether this IOM stands in for `role` (as its proxy) rather than being it.
    pub fn is_standin_for(&self, role: IomId) -> bool {
        role != self.me
            && matches!(self.map.read().state(role), IomState::Down { proxy } | IomState::Rebuilding { proxy } if proxy == self.me)
    }
}
