use super::*;
use crate::codec::{decode, encode};
use crate::ids::{BlockNo, TxId};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Golden bytes: these encodings are the protocol, as every version from
/// `PROTOCOL_OLDEST` on sends them. If this test fails, the wire format
/// changed under peers of an older version: make the change an addition
/// (see `PROTOCOL_VERSION`) or raise `PROTOCOL_OLDEST`, never edit this.
#[test]
fn golden_bytes() {
    assert_eq!(PROTOCOL_OLDEST, 7, "the bytes below are protocol 7's: pin the new oldest version's");
    let hello = Request::Hello(Hello { protocol: 7, cluster_id: "c".into(), peer: PeerKind::Iom(IomId(3)) });
    assert_eq!(hex(&encode(&hello).unwrap()), "000701630103");
    // Protocol 8 added `AdminReq::ScrubReport` and `AdminReq::LastScrub` at the end.
    let report =
        ScrubSummary { finished_unix: 1, millis: 2, groups: 3, blocks: 4, problems: 0, repaired: 0, healed: 0 };
    assert_eq!(hex(&encode(&Request::Admin(AdminReq::ScrubReport(report))).unwrap()), "050201020304000000");
    assert_eq!(hex(&encode(&Request::Admin(AdminReq::LastScrub)).unwrap()), "0503");
    let relay = Request::Relay { to: IomId(3), req: Box::new(Request::Admin(AdminReq::Stats)) };
    assert_eq!(hex(&encode(&relay).unwrap()), "0903".to_string() + "0500");
    // Protocol 7 added `IomStats::version`, `rebuild_bytes`, `rebuild_elapsed_ms`, `rebuild_eta_s`.
    // Protocol 6 added `AdminReq::DropCache`.
    assert_eq!(hex(&encode(&Request::Admin(AdminReq::DropCache)).unwrap()), "0501");

    let f = Request::Handover(HandoverReq::Freeze { about: IomId(3) });
    assert_eq!(hex(&encode(&f).unwrap()), "070203");
    let d = Request::Recovery(RecoveryReq::DoneSeen { of: IomId(2) });
    assert_eq!(hex(&encode(&d).unwrap()), "080402");

    let w = Request::Data(DataReq::Write {
        route: Route { epoch: Epoch(2), target: IomId(1) },
        key: BlockKey { object: ObjectId(300), block: BlockNo(5) },
        offset: 4096,
        toughness: Toughness::Durable,
        group_hint: 4,
    });
    assert_eq!(hex(&encode(&w).unwrap()), "01010201fb2c0105fb00100204");

    let u = ParityMsg::Update(ParityUpdate {
        tx: TxRef { iom: IomId(1), tx: TxId(9) },
        group: GroupKey { object: ObjectId(7), group: GroupNo(2) },
        index: 3,
        old: Version(4),
        new: Version(5),
        delta_offset: 0,
        hint: 1,
        data_iom: IomId(1),
        durable: true,
    });
    assert_eq!(hex(&encode(&u).unwrap()), "000109070203040500010101");

    let e = Reply::Error(WireError::new(ErrorCode::NotServing, "x"));
    assert_eq!(hex(&encode(&e).unwrap()), "05050178");

    let a = ParityAck::Done { tx: TxRef { iom: IomId(2), tx: TxId(300) } };
    assert_eq!(hex(&encode(&a).unwrap()), "0102fb2c01");
}

#[test]
fn roundtrip_all_data_requests() {
    let route = Route { epoch: Epoch(1), target: IomId(0) };
    let key = BlockKey { object: ObjectId(1), block: BlockNo(2) };
    let reqs = vec![
        DataReq::Read { route, key, offset: 1, len: 2 },
        DataReq::Truncate { route, key, keep: 0, toughness: Toughness::Fast },
        DataReq::Flush { route },
        DataReq::DropObject { route, object: ObjectId(1), from: GroupNo(0) },
        DataReq::ReadVersion { route, key, version: Version(3) },
        DataReq::ReadParity { route, group: GroupKey { object: ObjectId(1), group: GroupNo(0) } },
        DataReq::ListBlocks { after: Some(key), limit: 10 },
        DataReq::ListGroups { after: None, limit: 10 },
        DataReq::ReadMany { route, pieces: vec![ReadPiece { key, offset: 0, len: 4096 }] },
        DataReq::DropObjects { route, objects: vec![ObjectId(1), ObjectId(9)] },
    ];
    for r in reqs {
        let req = Request::Data(r);
        let back: Request = decode(&encode(&req).unwrap()).unwrap();
        assert_eq!(back, req);
    }
}

/// One valid encoding of each message family, to mutate.
fn samples() -> Vec<Vec<u8>> {
    use crate::meta::{Caller, FileKind, MetaReq, MetaResp};
    let route = Route { epoch: Epoch(7), target: IomId(2) };
    let key = BlockKey { object: ObjectId(300), block: BlockNo(70_000) };
    let group = GroupKey { object: ObjectId(300), group: GroupNo(9) };
    let mut v: Vec<Vec<u8>> = vec![
        encode(&Request::Hello(Hello {
            protocol: PROTOCOL_VERSION,
            cluster_id: "cluster-1".into(),
            peer: PeerKind::Iom(IomId(1)),
        }))
        .unwrap(),
        encode(&Request::Data(DataReq::WriteMany {
            route,
            pieces: vec![WritePiece { key, offset: 0, len: 4096, group_hint: 4 }; 3],
            toughness: Toughness::Atomic,
        }))
        .unwrap(),
        encode(&Request::Data(DataReq::ReadMany { route, pieces: vec![ReadPiece { key, offset: 1, len: 2 }] }))
            .unwrap(),
        encode(&Request::Meta(MetaCall {
            client: 1 << 40,
            seq: 12,
            req: MetaReq::Create {
                parent: crate::ids::Ino(1),
                name: b"a file name".to_vec(),
                kind: FileKind::Regular,
                perm: 0o644,
                rdev: 0,
                caller: Caller { uid: 1000, gid: 1000 },
                target: Some(b"/x".to_vec()),
                open: true,
            },
        }))
        .unwrap(),
        encode(&Request::Member(MemberReq::GetMap)).unwrap(),
        encode(&Request::Handover(HandoverReq::ClearMarks {
            about: IomId(2),
            marks: RebuildMarks {
                blocks: vec![(BlockKey { object: ObjectId(1), block: BlockNo(2) }, Version(3))],
                groups: vec![GroupKey { object: ObjectId(1), group: GroupNo(0) }],
                drops: vec![(ObjectId(4), GroupNo(1))],
                frozen: false,
            },
        }))
        .unwrap(),
        encode(&Reply::Recovery(RecoveryResp::TxStatus(TxView::Parity {
            state: ParityTxState::Received,
            standin: true,
            covers: Version(7),
        })))
        .unwrap(),
        encode(&Reply::Data(DataResp::Groups(vec![GroupInfo {
            key: group,
            versions: vec![Version(1), Version(2)],
            len: 10,
            crc: 3,
        }])))
        .unwrap(),
        encode(&Reply::Meta(MetaResp::Names(vec![b"a".to_vec(), b"bc".to_vec()]))).unwrap(),
        encode(&Reply::Error(WireError::new(ErrorCode::Corrupt, "checksum mismatch"))).unwrap(),
        encode(&ParityMsg::WriteDone { tx: TxRef { iom: IomId(1), tx: TxId(5) } }).unwrap(),
        encode(&ParityAck::Failed {
            tx: TxRef { iom: IomId(1), tx: TxId(5) },
            error: WireError::new(ErrorCode::Unavailable, "x"),
        })
        .unwrap(),
        encode(&MirrorMsg::Batch { term: 3, lsn: 1 << 33 }).unwrap(),
        encode(&MirrorAck::Applied { lsn: 99 }).unwrap(),
    ];
    v.push(Vec::new());
    v
}

/// Decodes `b` as every type that is read from a peer.
fn decode_all(b: &[u8]) {
    let _ = decode::<Request>(b);
    let _ = decode::<Reply>(b);
    let _ = decode::<ParityMsg>(b);
    let _ = decode::<ParityAck>(b);
    let _ = decode::<MirrorMsg>(b);
    let _ = decode::<MirrorAck>(b);
    let _ = decode::<crate::meta::MetaReq>(b);
    let _ = decode::<crate::meta::MetaResp>(b);
    let _ = decode::<ClusterMap>(b);
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(20_000),
        failure_persistence: None,
        ..Default::default()
    })]
    /// Valid encodings with bytes flipped, cut, or lengths inflated
    /// (0xfb–0xfd start 2-, 4- and 8-byte varints), and random bytes:
    /// every decoder answers with a value or an error, never a panic,
    /// and allocates nothing a length claims before checking it (the
    /// codec's 1 MiB limit). Long run: `PROPTEST_CASES=1000000 cargo
    /// test --release -p common decoders_never_panic`.
    #[test]
    fn decoders_never_panic(
        which in 0usize..15,
        edits in proptest::collection::vec((0u8..4, proptest::prelude::any::<u16>(), proptest::prelude::any::<u8>()), 0..6),
        random in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96),
    ) {
        let all = samples();
        let mut b = all[which % all.len()].clone();
        for (kind, at, byte) in edits {
            let at = if b.is_empty() { 0 } else { at as usize % b.len() };
            match kind {
                0 if !b.is_empty() => b[at] ^= byte | 1,
                1 => b.truncate(at),
                2 => b.insert(at, 0xfb + byte % 3),
                _ => b.insert(at, 0xff),
            }
        }
        decode_all(&b);
        decode_all(&random);
    }
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for seed in 0u64..2000 {
        let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let len = (seed % 64) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let _ = decode::<Request>(&bytes);
        let _ = decode::<ParityMsg>(&bytes);
    }
}

#[test]
fn usable_space_counts_a_shared_filesystem_once_and_the_fullest_bounds_it() {
    let st = |iom: u32, fs_id: u64, room: u64, disk: u64| IomStats {
        iom,
        fs_id,
        room_bytes: room,
        shared_room_bytes: room,
        disk_bytes: disk,
        ..Default::default()
    };
    // Five IOMs on one filesystem, N = 4: every user byte takes 5/4 of it.
    let one: Vec<IomStats> = (0..5).map(|i| st(i, 7, 1000, 5000)).collect();
    assert_eq!(IomStats::usable(&one, 4), (800 - 4000 / 32, 4000));
    // Five filesystems: each IOM holds 1/4 of what users store; the
    // fullest one bounds it.
    let five: Vec<IomStats> = (0..5).map(|i| st(i, 10 + i as u64, 1000 - 100 * i as u64, 5000)).collect();
    assert_eq!(IomStats::usable(&five, 4), (600 * 4 - 20000 / 32, 5000 * 4));
    // Unknown filesystems count as separate ones.
    let unknown: Vec<IomStats> = (0..5).map(|i| st(i, 0, 1000, 5000)).collect();
    assert_eq!(IomStats::usable(&unknown, 4), (4000 - 20000 / 32, 20000));
    // Two sharing one filesystem, three alone.
    let mixed = vec![
        st(0, 1, 1000, 5000),
        st(1, 1, 1000, 5000),
        st(2, 2, 900, 5000),
        st(3, 3, 1000, 5000),
        st(4, 4, 1000, 5000),
    ];
    assert_eq!(IomStats::usable(&mixed, 4), (2000 - 10000 / 32, 10000));
    assert_eq!(IomStats::usable(&[], 4), (0, 0));
    // Three IOMs on one filesystem with 600 free, each with 300 of its own
    // (a preallocated tail): each stores 300 + 200, (600 + 900) × 2 / 3.
    let tails: Vec<IomStats> = (0..3).map(|i| IomStats { shared_room_bytes: 600, ..st(i, 9, 900, 3000) }).collect();
    assert_eq!(IomStats::usable(&tails, 2), (1000 - 2000 / 32, 2000));
    // Own room is no use to the others: with 100 shared, tails of 0, 500
    // and 500 let each IOM store only 100 (the first fills the shared).
    let uneven = vec![
        IomStats { shared_room_bytes: 100, ..st(0, 9, 100, 3000) },
        IomStats { shared_room_bytes: 100, ..st(1, 9, 600, 3000) },
        IomStats { shared_room_bytes: 100, ..st(2, 9, 600, 3000) },
    ];
    assert_eq!(IomStats::usable(&uneven, 2), (200 - 2000 / 32, 2000));
    // Tails of 0, 0, 500 and 300 shared: 150 each for the first two.
    let two = vec![
        IomStats { shared_room_bytes: 300, ..st(0, 9, 300, 3000) },
        IomStats { shared_room_bytes: 300, ..st(1, 9, 300, 3000) },
        IomStats { shared_room_bytes: 300, ..st(2, 9, 800, 3000) },
    ];
    assert_eq!(IomStats::usable(&two, 2), (300 - 2000 / 32, 2000));
}

#[test]
fn a_connection_runs_at_the_version_both_speak() {
    assert_eq!(negotiate(PROTOCOL_VERSION), Some(PROTOCOL_VERSION));
    assert_eq!(negotiate(PROTOCOL_OLDEST), Some(PROTOCOL_OLDEST), "the previous version is still spoken");
    assert_eq!(negotiate(PROTOCOL_OLDEST - 1), None);
    assert_eq!(negotiate(PROTOCOL_VERSION + 1), None);
    // Only the additions of a version need it; everything else goes to the oldest.
    assert_eq!(Request::Admin(AdminReq::LastScrub).since(), SINCE_SCRUB_REPORT);
    assert_eq!(Request::Admin(AdminReq::Stats).since(), PROTOCOL_OLDEST);
    assert_eq!(Request::Member(MemberReq::GetMap).since(), PROTOCOL_OLDEST);
    let route = Route { epoch: Epoch(1), target: IomId(0) };
    let group = GroupKey { object: ObjectId(1), group: GroupNo(0) };
    assert_eq!(Request::Data(DataReq::StripeParity { route, group, stripe: 1, crcs: vec![] }).since(), SINCE_STRIPE);
    assert_eq!(Request::Data(DataReq::Flush { route }).since(), PROTOCOL_OLDEST);
    let relay = |r| Request::Relay { to: IomId(1), req: Box::new(r) };
    assert_eq!(relay(Request::Member(MemberReq::GetMap)).since(), SINCE_RELAY);
    assert_eq!(relay(Request::Admin(AdminReq::LastScrub)).since(), SINCE_SCRUB_REPORT.max(SINCE_RELAY));
}

/// rustc 1.95.0 in release mode compiled `Request::since` (one match over
/// nested enums with an or-pattern) so that `since() == PROTOCOL_OLDEST`
/// was false for requests whose `since()` printed as PROTOCOL_OLDEST: the
/// comparison was folded wrongly. `since` is split per family since; the
/// suite runs this in release, where it failed.
#[test]
fn since_compares_right_when_inlined_into_a_comparison() {
    let oldest = [
        Request::Admin(AdminReq::Stats),
        Request::Admin(AdminReq::DropCache),
        Request::Member(MemberReq::GetMap),
        Request::Member(MemberReq::Ping { from: IomId(1), epoch: Epoch(3) }),
    ];
    for r in &oldest {
        assert!(r.since() == PROTOCOL_OLDEST, "{r:?}");
        assert!(r.since() <= PROTOCOL_OLDEST, "{r:?}");
        assert!(PROTOCOL_OLDEST >= r.since(), "{r:?}");
    }
    assert!(Request::Member(MemberReq::StoreState { from: IomId(1) }).since() == SINCE_STORE_STATE);
    assert!(Request::Admin(AdminReq::LastScrub).since() == SINCE_SCRUB_REPORT);
    assert!(Request::Admin(AdminReq::Stats).since() < SINCE_STORE_STATE);
}
