//! The cluster map: which IOMs are up, which are down and who stands in for
//! them, under which epoch. Pure data plus routing decisions.

use crate::ids::{Epoch, IomId};
use serde::{Deserialize, Serialize};
use std::fmt;

/// State of one IOM in a cluster map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum IomState {
    /// Serving its own blocks.
    Up,
    /// Failed; `proxy` stands in for it (degraded reads, writes marked for rebuild).
    Down { proxy: IomId },
    /// Back and rebuilding the blocks marked while it was down; `proxy` still serves its role.
    Rebuilding { proxy: IomId },
}

/// Whether the filesystem serves I/O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Health {
    Healthy,
    /// One IOM down or rebuilding: served through its proxy.
    Degraded,
    /// More than one IOM down: no I/O until enough come back.
    Stopped,
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
            Health::Stopped => "stopped",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMap {
    pub epoch: Epoch,
    pub states: Vec<IomState>,
    /// Configured home of the namespace.
    pub meta_home: IomId,
}

impl ClusterMap {
    pub fn initial(width: u32, meta_home: IomId) -> ClusterMap {
        ClusterMap { epoch: Epoch(1), states: vec![IomState::Up; width as usize], meta_home }
    }

    pub fn width(&self) -> u32 {
        self.states.len() as u32
    }

    /// The default proxy of IOM `i`: the next IOM in ring order.
    pub fn proxy_of(&self, i: IomId) -> IomId {
        IomId((i.0 + 1) % self.width())
    }

    pub fn state(&self, i: IomId) -> IomState {
        self.states.get(i.0 as usize).copied().unwrap_or(IomState::Up)
    }

    /// IOMs not serving their own role.
    pub fn not_up(&self) -> Vec<IomId> {
        (0..self.width()).map(IomId).filter(|&i| self.state(i) != IomState::Up).collect()
    }

    pub fn down(&self) -> Vec<IomId> {
        (0..self.width()).map(IomId).filter(|&i| matches!(self.state(i), IomState::Down { .. })).collect()
    }

    pub fn health(&self) -> Health {
        match self.not_up().len() {
            0 => Health::Healthy,
            1 => Health::Degraded,
            _ => Health::Stopped,
        }
    }

    /// Which IOM serves requests addressed to `role`, or `None` when the
    /// cluster is stopped.
    pub fn server_for(&self, role: IomId) -> Option<IomId> {
        if self.health() == Health::Stopped {
            return None;
        }
        match self.state(role) {
            IomState::Up => Some(role),
            IomState::Down { proxy } | IomState::Rebuilding { proxy } => Some(proxy),
        }
    }

    /// Which IOM serves the namespace: its home, or the home's proxy (the mirror).
    pub fn meta_server(&self) -> Option<IomId> {
        self.server_for(self.meta_home)
    }

    /// The namespace mirror: the proxy of whoever serves the namespace,
    /// skipping IOMs that are not up.
    pub fn meta_mirror(&self) -> Option<IomId> {
        let server = self.meta_server()?;
        let mut m = self.proxy_of(server);
        for _ in 0..self.width() {
            if m != server && self.state(m) == IomState::Up {
                return Some(m);
            }
            m = self.proxy_of(m);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn routing() {
        let mut m = ClusterMap::initial(5, IomId(0));
        assert_eq!(m.health(), Health::Healthy);
        assert_eq!(m.server_for(IomId(2)), Some(IomId(2)));
        assert_eq!(m.meta_mirror(), Some(IomId(1)));
        m.states[0] = IomState::Down { proxy: IomId(1) };
        assert_eq!(m.health(), Health::Degraded);
        assert_eq!(m.server_for(IomId(0)), Some(IomId(1)));
        assert_eq!(m.meta_server(), Some(IomId(1)));
        assert_eq!(m.meta_mirror(), Some(IomId(2)));
        m.states[3] = IomState::Down { proxy: IomId(4) };
        assert_eq!(m.health(), Health::Stopped);
        assert_eq!(m.server_for(IomId(2)), None);
    }
}
