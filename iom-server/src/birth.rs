//! A store's birth: may an IOM that starts with no store create one?
//!
//! An IOM whose store (`blocks.dat`) is missing either starts for the
//! first time or lost its disk. Created blindly, an empty store would
//! answer every read of the blocks it held with zeros while the cluster
//! says `healthy`. `iomfs init` and `iomfs replace` leave a marker
//! (`iom-I/store.new`) that settles it; without one (a host set up with
//! only its config and certificate, as docs/operations.md says) the IOM
//! asks the other IOMs before it creates anything ([`decide`]):
//!
//! - every IOM that runs with a store keeps the set of IOMs whose
//!   heartbeats it heard since it has one (`seen::Seen`, `seen-iom` in its
//!   data directory); an IOM that heard the asker says so, and the asker
//!   refuses to start (its disk lost its data: `iomfs replace`);
//! - an IOM that has no store yet answers "no store" ([`respond`], run on
//!   the endpoint before the store exists, so IOMs started together can
//!   answer each other);
//! - once every other IOM answered, or a majority of the cluster answered
//!   from stores of their own, and none heard the asker, it creates its
//!   store and starts as any IOM does: an IOM nobody heard never held a block, so an empty store is
//!   its true state. In a new cluster that is all; a host that first
//!   starts after the others began serving finds itself declared down and
//!   rejoins as any returning IOM does, rebuilding what its proxy marked
//!   (every write meant for it). A full rebuild (`replace`) would be
//!   correct too but slower, and on a new cluster whose namespace home and
//!   mirror both came late it would have handed the namespace to a mirror
//!   that never held one (seen in the first multi-host runs).
//!
//! Why that is enough: every IOM that ran with a store while the asker
//! ran heard its heartbeats (they go to every IOM each second, and only
//! an IOM's own certificate counts for it), so a lost store is taken for
//! a new one only if every IOM that heard it lost its store too. A store
//! made before protocol 9 counts every IOM as heard (`seen`). Leftovers of
//! an earlier life in the data directory (a cluster state, a start
//! counter, a journal) refuse the start whatever the others say.

use crate::Error;
use bytes::Bytes;
use common::config::ClusterPaths;
use common::wire::{ErrorCode, MemberReq, MemberResp, PeerKind, Reply, Request, WireError};
use common::IomId;
use net::frame::{read_frame, write_frame};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// What a store leaves in its data directory or journal besides its block
/// file, if any is there: evidence that a store existed.
fn earlier_life(iom_dir: &Path, data_dir: &Path, journal_dir: &Path) -> Option<std::path::PathBuf> {
    let mut files: Vec<std::path::PathBuf> = [
        crate::membership_state::FILE,
        crate::membership_state::VOTE_FILE,
        crate::storage::INCARNATION_FILE,
        crate::seen::SEEN_FILE,
        crate::map::SNAPSHOT_FILE,
    ]
    .map(|f| data_dir.join(f))
    .into();
    files.push(iom_dir.join(crate::seen::BORN_FILE));
    if let Some(f) = files.into_iter().find(|f| f.exists()) {
        return Some(f);
    }
    std::fs::read_dir(journal_dir).ok()?.flatten().next().map(|_| journal_dir.to_path_buf())
}

/// Whether the store (its block file) exists in `data_dir`.
pub fn has_store(data_dir: &Path) -> bool {
    data_dir.join(crate::store::BLOCK_FILE).exists()
}

/// Whether IOM `id` must ask the others before it opens its store: the
/// store is missing and no marker says what to do.
pub fn needs_asking(paths: &ClusterPaths, data_dir: &Path, id: IomId) -> bool {
    !has_store(data_dir) && !paths.new_store_marker(id).exists()
}

/// What the other IOMs' answers allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nobody that answered heard this IOM: its first start. `late`: others
    /// run with stores already (it starts after them).
    Fresh { late: bool },
    /// These IOMs heard this IOM run with a store: its disk lost it.
    Lost(Vec<IomId>),
    /// Not enough answers yet.
    Wait,
}

/// One IOM's answer to `StoreState`, or why there was none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    NoStore,
    Store { seen_you: bool },
    Silent(String),
}

/// The verdict from every other IOM's answer (pure: tested below):
/// refused if any heard the asker; created once every other IOM answered
/// (a new cluster, or a start together with IOMs that just created
/// theirs), or once a majority of the cluster answered from stores of
/// their own (a running cluster that never heard it: its first start,
/// later than theirs). "No store" answers alone never make a majority:
/// disks that are only missing for now (a mount that failed after a power
/// loss) must not outvote the stores that are still replaying.
pub fn verdict(width: u32, answers: &[(IomId, Answer)]) -> Verdict {
    let lost: Vec<IomId> =
        answers.iter().filter(|(_, a)| matches!(a, Answer::Store { seen_you: true })).map(|(i, _)| *i).collect();
    if !lost.is_empty() {
        return Verdict::Lost(lost);
    }
    let answered = answers.iter().filter(|(_, a)| !matches!(a, Answer::Silent(_))).count() as u32;
    let stores = answers.iter().filter(|(_, a)| matches!(a, Answer::Store { .. })).count() as u32;
    if answered + 1 >= width || stores > width / 2 {
        Verdict::Fresh { late: stores > 0 }
    } else {
        Verdict::Wait
    }
}

/// Asks every other IOM until the answers allow a verdict other than
/// `Wait`; says every 10 s whom it waits for.
pub async fn decide(me: IomId, width: u32, pool: &net::Pool) -> Verdict {
    let mut said: Option<Instant> = None;
    loop {
        let peers: Vec<IomId> = (0..width).map(IomId).filter(|&p| p != me).collect();
        let asks = peers.iter().map(|&p| async move {
            let ask = Request::Member(MemberReq::StoreState { from: me });
            let a = match pool.call_timeout(p, &ask, Bytes::new(), Duration::from_secs(3)).await {
                Ok((Reply::Member(MemberResp::StoreState { has_store: false, .. }), _)) => Answer::NoStore,
                Ok((Reply::Member(MemberResp::StoreState { has_store: true, seen_you }), _)) => {
                    Answer::Store { seen_you }
                }
                Ok((other, _)) => Answer::Silent(format!("unexpected answer {other:?}")),
                Err(e) => Answer::Silent(e.to_string()),
            };
            (p, a)
        });
        let answers = futures::future::join_all(asks).await;
        let v = verdict(width, &answers);
        if v != Verdict::Wait {
            return v;
        }
        if said.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            let silent: Vec<String> = answers
                .iter()
                .filter_map(|(p, a)| match a {
                    Answer::Silent(why) => Some(format!("IOM {p} ({why})")),
                    _ => None,
                })
                .collect();
            tracing::warn!(
                iom = me.0,
                "IOM {me} has no store and no store.new marker: it creates one once every other IOM, or a \
                 majority of the {width} with stores, has said it never heard IOM {me}; waiting for {}",
                silent.join(", ")
            );
            said = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Answers on `endpoint` while this IOM has no store: a Hello, and
/// `StoreState` with "no store"; anything else is refused as "starting"
/// (callers retry). Runs until dropped; every connection it accepted is
/// kept in `conns` so that they can be closed then (their callers
/// reconnect to the IOM that serves next).
async fn respond(
    me: IomId,
    initial: common::cluster::ClusterMap,
    cluster_id: String,
    endpoint: quinn::Endpoint,
    conns: Arc<parking_lot::Mutex<Vec<quinn::Connection>>>,
) {
    use futures::StreamExt;
    let width = initial.width();
    let serve = |incoming: quinn::Incoming| {
        let (cluster_id, initial, conns) = (cluster_id.clone(), initial.clone(), conns.clone());
        async move {
            let Ok(conn) = incoming.await else { return };
            conns.lock().push(conn.clone());
            let cert = net::tls::peer_role(&conn, width);
            let agreed = OnceLock::new();
            while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                let Ok(Some((req, _))) = read_frame::<Request>(&mut recv).await else { continue };
                let r = match &req {
                    Request::Hello(h) => {
                        crate::service::answer_hello(me, &cluster_id, || initial.clone(), h, cert, &agreed)
                    }
                    Request::Member(MemberReq::StoreState { .. })
                        if matches!(cert, Some(net::tls::CertRole::Iom(_)))
                            && matches!(agreed.get(), Some((PeerKind::Iom(_), _))) =>
                    {
                        Reply::Member(MemberResp::StoreState { has_store: false, seen_you: false })
                    }
                    _ => Reply::Error(WireError::new(
                        ErrorCode::NotServing,
                        format!(
                            "IOM {me} is starting: it has no store yet and asks the other IOMs whether the \
                             cluster already runs"
                        ),
                    )),
                };
                if write_frame(&mut send, &r, Bytes::new()).await.is_ok() {
                    let _ = send.finish();
                }
            }
        }
    };
    let mut serving = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            i = endpoint.accept() => match i {
                Some(i) => serving.push(serve(i)),
                None => std::future::pending::<()>().await,
            },
            Some(()) = serving.next(), if !serving.is_empty() => {}
        }
    }
}

/// Runs the whole check for IOM `me` before its store is opened (when
/// [`needs_asking`]): answers others meanwhile, then writes the marker
/// that lets the store be created (`new`) or refuses with the way out.
#[allow(clippy::too_many_arguments)]
pub async fn settle(
    me: IomId,
    initial: common::cluster::ClusterMap,
    cluster_id: &str,
    paths: &ClusterPaths,
    data_dir: &Path,
    journal_dir: &Path,
    endpoint: &quinn::Endpoint,
    pool: &net::Pool,
) -> Result<(), Error> {
    if let Some(left) = earlier_life(&paths.iom_dir(me), data_dir, journal_dir) {
        return Err(Error::Damaged(format!(
            "IOM {me}'s store ({}) is missing, but {} is still there: the store was moved or deleted, so this \
             IOM will not start (it would answer reads with zeros). Put the store back; if its disk was \
             replaced, move what is left away except node.pem and node.key and run `iomfs replace --dir {} \
             --id {me}`.",
            data_dir.join(crate::store::BLOCK_FILE).display(),
            left.display(),
            paths.dir.display()
        )));
    }
    let width = initial.width();
    let conns: Arc<parking_lot::Mutex<Vec<quinn::Connection>>> = Arc::default();
    let v = tokio::select! {
        v = decide(me, width, pool) => v,
        () = respond(me, initial, cluster_id.to_string(), endpoint.clone(), conns.clone()) => Verdict::Wait,
    };
    for c in conns.lock().drain(..) {
        c.close(0u32.into(), b"the IOM now has a store");
    }
    let marker = paths.new_store_marker(me);
    match v {
        Verdict::Fresh { late: false } => {
            tracing::info!(
                iom = me.0,
                "no IOM of this cluster has a store yet: IOM {me} creates its store (first start)"
            );
            crate::fsutil::write_atomic(&marker, b"new\n")
        }
        Verdict::Fresh { late: true } => {
            tracing::warn!(
                iom = me.0,
                "IOMs of this cluster already have stores and none heard IOM {me}: its first start; it creates its \
                 store and joins, rebuilding what its proxy served for it if it was declared down"
            );
            crate::fsutil::write_atomic(&marker, b"new\n")
        }
        Verdict::Lost(by) => {
            let by: Vec<String> = by.iter().map(|i| i.to_string()).collect();
            Err(Error::Damaged(format!(
                "IOM {me}'s store is empty (no {}), but IOM(s) {} heard IOM {me} run with a store: its disk was \
                 replaced or wiped, or its files were moved, so this IOM will not start (it would answer reads with \
                 zeros). If the disk was replaced, run `iomfs replace --dir {} --id {me}`: it joins as a \
                 replacement and rebuilds everything from the other IOMs (the cluster stays degraded until then). \
                 If its files were moved, put them back.",
                crate::store::BLOCK_FILE,
                by.join(", "),
                paths.dir.display(),
            )))
        }
        Verdict::Wait => Err(Error::Startup(format!("IOM {me}'s endpoint closed while it asked the other IOMs"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(list: &[(u32, Answer)]) -> Vec<(IomId, Answer)> {
        list.iter().map(|(i, a)| (IomId(*i), a.clone())).collect()
    }
    fn silent() -> Answer {
        Answer::Silent("timed out".into())
    }

    #[test]
    fn a_store_that_heard_the_asker_refuses_it_whatever_else_answers() {
        let ans =
            a(&[(1, Answer::NoStore), (2, Answer::NoStore), (3, Answer::Store { seen_you: true }), (4, silent())]);
        assert_eq!(verdict(5, &ans), Verdict::Lost(vec![IomId(3)]));
    }

    #[test]
    fn a_new_cluster_needs_every_answer_and_missing_disks_never_outvote_silent_stores() {
        let all = a(&[(1, Answer::NoStore), (2, Answer::NoStore), (3, Answer::NoStore), (4, Answer::NoStore)]);
        assert_eq!(verdict(5, &all), Verdict::Fresh { late: false });
        // Three disks missing after a power loss, the two stores still
        // replaying their journals (silent): wait for them.
        let ans = a(&[(1, Answer::NoStore), (2, Answer::NoStore), (3, silent()), (4, silent())]);
        assert_eq!(verdict(5, &ans), Verdict::Wait);
        // Started together: some just created their stores.
        let ans = a(&[
            (1, Answer::Store { seen_you: false }),
            (2, Answer::NoStore),
            (3, Answer::NoStore),
            (4, Answer::NoStore),
        ]);
        assert_eq!(verdict(5, &ans), Verdict::Fresh { late: true });
    }

    #[test]
    fn a_majority_of_stores_that_never_heard_the_asker_let_it_start_late() {
        let store = || Answer::Store { seen_you: false };
        let ans = a(&[(0, store()), (1, store()), (2, store()), (4, silent())]);
        assert_eq!(verdict(5, &ans), Verdict::Fresh { late: true });
        let ans = a(&[(0, store()), (1, store()), (2, silent()), (4, silent())]);
        assert_eq!(verdict(5, &ans), Verdict::Wait, "two stores are not a majority of five");
    }

    #[test]
    fn with_three_ioms_two_stores_are_a_majority() {
        let store = || Answer::Store { seen_you: false };
        assert_eq!(verdict(3, &a(&[(1, Answer::NoStore), (2, silent())])), Verdict::Wait);
        assert_eq!(verdict(3, &a(&[(1, store()), (2, store())])), Verdict::Fresh { late: true });
        assert_eq!(verdict(3, &a(&[(1, Answer::NoStore), (2, Answer::NoStore)])), Verdict::Fresh { late: false });
    }
}
