//! Extended attributes: the namespace's, plus the two iomfs gives meaning
//! to — the toughness attribute (settable; read back as the mount default
//! when none is set) and the read-only layout attribute (computed here
//! from the cluster's layout, never stored) — and the shortcut for
//! `security.capability`, which the kernel asks about before every write.
//!
//! Invariants: the layout attribute can be neither set nor removed
//! (EPERM); only `user.`, `trusted.` and `security.` names are stored; a
//! toughness value is checked before it is sent; "this inode has no
//! capability" is trusted only while the inode's change counter is the one
//! it was seen at, and forgotten around every change of its attributes
//! by this client.

use super::{wrong_reply, Inner, R};
use common::meta::*;
use common::toughness::{LAYOUT_XATTR, TOUGHNESS_XATTR};
use common::{Ino, Toughness};
use fuser::Errno;

/// The capability attribute the kernel looks up before every write.
const CAPS_XATTR: &[u8] = b"security.capability";

/// Setting it (any value, on any inode) sends every buffered byte of this
/// mount and publishes the sizes: what `iomfs sync MNT` does, as
/// `sync(1)` and `syncfs(2)` do not reach a FUSE daemon on this kernel.
pub const SYNC_XATTR: &str = "user.iomfs.sync";

fn xattr_allowed(nm: &[u8]) -> bool {
    nm.starts_with(b"user.") || nm.starts_with(b"trusted.") || nm.starts_with(b"security.")
}

impl Inner {
    /// This client changes the inode's extended attributes: ask the
    /// namespace about `security.capability` again.
    pub(super) fn forget_caps(&self, ino: Ino) {
        if let Some(n) = self.nodes.lock().get_mut(&ino) {
            n.no_caps = None;
            n.fresh_until = None;
        }
    }

    fn layout_value(&self, a: &Attr) -> Vec<u8> {
        let l = self.c.layout;
        let (data, parity) = l.group_ioms(a.object, common::GroupNo(0));
        let data: Vec<String> = data.iter().map(|i| i.0.to_string()).collect();
        format!(
            "object={} block_size={} ioms={} data_ioms={} parity_iom={}",
            a.object.0,
            l.block_size(),
            l.width(),
            data.join(","),
            parity.0
        )
        .into_bytes()
    }

    pub(super) async fn getxattr(&self, ino: Ino, nm: &[u8]) -> R<Vec<u8>> {
        if nm == LAYOUT_XATTR.as_bytes() {
            let a = self.attr_of(ino).await?;
            if a.kind != FileKind::Regular {
                return Err(Errno::ENODATA);
            }
            return Ok(self.layout_value(&a));
        }
        let caps = nm == CAPS_XATTR;
        let seen = if caps {
            let nodes = self.nodes.lock();
            match nodes.get(&ino) {
                Some(n) if n.no_caps == Some(n.attr.change) => return Err(Errno::ENODATA),
                Some(n) => Some(n.attr.change),
                None => None,
            }
        } else {
            None
        };
        match self.meta(MetaReq::GetXattr { ino, name: nm.to_vec() }).await {
            Ok(MetaResp::Data(v)) => Ok(v),
            Ok(_) => Err(wrong_reply()),
            Err(e) if e == Errno::ENODATA && caps => {
                if let (Some(change), Some(n)) = (seen, self.nodes.lock().get_mut(&ino)) {
                    n.no_caps = Some(change);
                }
                Err(e)
            }
            // The level in force when none is set on the file: the mount default.
            Err(e) if e == Errno::ENODATA && nm == TOUGHNESS_XATTR.as_bytes() => {
                Ok(self.o.toughness.as_str().as_bytes().to_vec())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether the kernel's question for `nm` is answered ENODATA right
    /// away: it asks for `security.capability` of an inode known to have none.
    pub(super) fn caps_known_absent(&self, ino: Ino, nm: &[u8]) -> bool {
        nm == CAPS_XATTR && self.node(ino).is_some_and(|n| n.no_caps == Some(n.attr.change))
    }

    pub(super) async fn setxattr(&self, ino: Ino, nm: Vec<u8>, value: Vec<u8>, flags: u32) -> R<()> {
        if nm == SYNC_XATTR.as_bytes() {
            return self.sync_all().await;
        }
        let is_t = nm == TOUGHNESS_XATTR.as_bytes();
        self.forget_caps(ino);
        let r = self.meta(MetaReq::SetXattr { ino, name: nm, value: value.clone(), flags }).await.map(|_| ());
        self.forget_caps(ino);
        if r.is_ok() && is_t {
            if let Some(n) = self.nodes.lock().get_mut(&ino) {
                n.attr.toughness = Toughness::parse_xattr(&value);
                n.changed_locally();
            }
        }
        r
    }

    pub(super) async fn listxattr(&self, ino: Ino) -> R<Vec<u8>> {
        match self.meta(MetaReq::ListXattr { ino }).await? {
            MetaResp::Names(ns) => {
                let mut buf = Vec::new();
                for n in ns {
                    buf.extend_from_slice(&n);
                    buf.push(0);
                }
                Ok(buf)
            }
            _ => Err(wrong_reply()),
        }
    }

    /// What the kernel leaves to the filesystem under
    /// FUSE_HANDLE_KILLPRIV_V2, before a write: a writer without
    /// CAP_FSETID (`kill_suid`, the kernel's FUSE_WRITE_KILL_SUIDGID)
    /// clears setuid, and setgid when the group may execute; any write drops
    /// `security.capability`. Nothing is asked of the namespace when the
    /// bits are clear and the capability is known to be absent (the usual
    /// case, answered from memory), where the kernel used to ask for the
    /// capability before every write.
    pub(super) async fn drop_privs_for_write(&self, ino: Ino, perm: u16, kill_suid: bool, caller: Caller) -> R<()> {
        if kill_suid && (perm & 0o4000 != 0 || perm & 0o2010 == 0o2010) {
            let set = SetAttr { kill_suid: true, ..Default::default() };
            self.setattr(ino, set, caller).await?;
        }
        if !self.caps_known_absent(ino, CAPS_XATTR) {
            match self.getxattr(ino, CAPS_XATTR).await {
                Ok(_) => self.removexattr(ino, CAPS_XATTR.to_vec()).await.or_else(|e| {
                    // Removed meanwhile by someone else: gone either way.
                    if e == Errno::ENODATA {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })?,
                Err(e) if e == Errno::ENODATA => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    pub(super) async fn removexattr(&self, ino: Ino, nm: Vec<u8>) -> R<()> {
        let is_t = nm == TOUGHNESS_XATTR.as_bytes();
        self.forget_caps(ino);
        let r = self.meta(MetaReq::RemoveXattr { ino, name: nm }).await.map(|_| ());
        self.forget_caps(ino);
        if r.is_ok() && is_t {
            if let Some(n) = self.nodes.lock().get_mut(&ino) {
                n.attr.toughness = None;
                n.changed_locally();
            }
        }
        r
    }
}

/// The checks setxattr makes before anything is sent.
pub(super) fn check_set(nm: &[u8], value: &[u8]) -> R<()> {
    check_remove(nm)?;
    if !xattr_allowed(nm) {
        return Err(Errno::EOPNOTSUPP);
    }
    if nm == TOUGHNESS_XATTR.as_bytes() && Toughness::parse_xattr(value).is_none() {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// The check removexattr makes before anything is sent.
pub(super) fn check_remove(nm: &[u8]) -> R<()> {
    if nm == LAYOUT_XATTR.as_bytes() {
        return Err(Errno::EPERM);
    }
    Ok(())
}
