//! What a certificate lets its holder ask (DESIGN §8). Every certificate
//! is signed by the cluster CA, so mutual TLS alone lets a client in; what
//! it may ask then follows from whom its certificate names: a client's
//! may read, write and look, never vote, commit a cluster map, drive a
//! handover or recovery, or speak for an IOM.

use bytes::Bytes;
use common::cluster::{ClusterMap, IomState};
use common::wire::{ErrorCode, MemberReq, RecoveryReq, Reply, Request};
use common::{Epoch, IomId, TxId, TxRef};
use integration::{serial, Cluster};

#[test]
fn a_client_certificate_cannot_commit_a_map_or_drive_recovery() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let client = rt.block_on(c.client());
    // A map that would declare IOM 1 down, proxied by IOM 2, far ahead.
    let mut bogus = ClusterMap::initial(5, IomId(0));
    bogus.epoch = Epoch(99);
    bogus.states[1] = IomState::Down { proxy: IomId(2) };
    let commit = Request::Member(MemberReq::Commit { map: bogus.clone() });
    let asks = [
        commit.clone(),
        Request::Recovery(RecoveryReq::DiscardTx { tx: TxRef { iom: IomId(1), tx: TxId(1) } }),
        // Nor through a relay, where the IOM it lands on would see the
        // relaying IOM's certificate.
        Request::Relay { to: IomId(2), req: Box::new(commit.clone()) },
        Request::Relay { to: IomId(2), req: Box::new(Request::Relay { to: IomId(3), req: Box::new(commit) }) },
    ];
    for req in asks {
        for i in 0..5 {
            let r = rt.block_on(client.call_iom(IomId(i), &req, Bytes::new()));
            let code = r.as_ref().err().and_then(|e| e.code());
            assert_eq!(code, Some(ErrorCode::Invalid), "IOM {i} answered {:?} to a client's {}", r, req.name().1);
        }
    }
    // Nothing changed: every IOM still has the first map, all up.
    for i in 0..5 {
        let r = rt.block_on(client.call_iom(IomId(i), &Request::Member(MemberReq::GetMap), Bytes::new()));
        let Ok((Reply::Member(common::wire::MemberResp::Map(m)), _)) = r else {
            panic!("IOM {i}: GetMap answered {r:?}");
        };
        assert!(m.epoch < Epoch(99) && m.states.iter().all(|s| *s == IomState::Up), "IOM {i} took the map: {m:?}");
    }
    // A relay of what a client may ask works.
    let relayed = Request::Relay { to: IomId(2), req: Box::new(Request::Member(MemberReq::GetMap)) };
    let r = rt.block_on(client.call_iom(IomId(4), &relayed, Bytes::new()));
    assert!(matches!(r, Ok((Reply::Member(common::wire::MemberResp::Map(_)), _))), "a relayed GetMap: {r:?}");
    // What a client is for still works.
    let data = Bytes::from(vec![7u8; 5000]);
    let obj = common::ObjectId(1 << 40);
    rt.block_on(client.write(obj, 0, data.clone(), common::Toughness::Atomic)).expect("write");
    assert_eq!(rt.block_on(client.read(obj, 0, 5000)).expect("read"), data);
    client.close();
    c.must_scrub_clean();
}
