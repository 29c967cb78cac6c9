//! Client stripes (issue 15): a whole parity group written over absent
//! blocks reaches its parity IOM as one client-computed piece, the data
//! IOMs send references instead of deltas. Every way a stripe can fail to
//! complete (a member whose block was there after all, a piece that never
//! comes, a piece whose checksums disagree, a piece nobody refers to) must
//! end with the data written right and parity consistent, the stripe
//! given up and the deltas sent after all.

use bytes::Bytes;
use common::wire::{DataReq, Reply, Request, Route, WritePiece};
use common::{BlockKey, GroupKey, GroupNo, ObjectId, Toughness};
use integration::*;
use std::time::{Duration, Instant};

const BS: usize = 65536;
const N: usize = 4;

fn stripes(base: u16, outcome: &str) -> f64 {
    (0..5u16).map(|i| value(&scrape(&format!("127.0.0.1:{}", base + i)), "iomfs_iom_stripes_total", &[outcome])).sum()
}

/// Sends group `g` of `object` (`data`, N whole blocks) to its data IOMs as
/// stripe `id`, as a client would, but without the piece.
async fn write_refs_only(client: &fs_client::ClusterClient, object: ObjectId, g: u64, id: u64, data: &[u8]) {
    let layout = client.layout;
    let epoch = client.map().epoch;
    let writes = (0..N as u32).map(|k| {
        let block = layout.member_block(GroupNo(g), k);
        let role = layout.data_iom(object, block);
        let piece = WritePiece { key: BlockKey { object, block }, offset: 0, len: BS as u32, group_hint: N as u8 };
        let req = Request::Data(DataReq::WriteStriped {
            route: Route { epoch, target: role },
            pieces: vec![piece],
            toughness: Toughness::Atomic,
            stripes: vec![id],
        });
        let payload = Bytes::copy_from_slice(&data[k as usize * BS..(k as usize + 1) * BS]);
        async move { client.call_iom(role, &req, payload).await }
    });
    for r in futures::future::join_all(writes).await {
        match r {
            Ok((Reply::Data(_), _)) => {}
            other => panic!("striped write: {other:?}"),
        }
    }
}

/// The piece of group `g` with the given checksums.
async fn send_piece(
    client: &fs_client::ClusterClient,
    object: ObjectId,
    g: u64,
    id: u64,
    crcs: Vec<u32>,
    piece: Bytes,
) {
    let parity = client.layout.parity_iom(object, GroupNo(g));
    let req = Request::Data(DataReq::StripeParity {
        route: Route { epoch: client.map().epoch, target: parity },
        group: GroupKey { object, group: GroupNo(g) },
        stripe: id,
        crcs,
    });
    match client.call_iom(parity, &req, piece).await {
        Ok((Reply::Data(_), _)) => {}
        other => panic!("stripe piece: {other:?}"),
    }
}

fn xor_of(data: &[u8]) -> (Vec<u32>, Bytes) {
    let mut p = vec![0u8; BS];
    let mut crcs = Vec::new();
    for k in 0..N {
        let b = &data[k * BS..(k + 1) * BS];
        crcs.push(common::codec::crc(b));
        for (x, y) in p.iter_mut().zip(b) {
            *x ^= y;
        }
    }
    (crcs, Bytes::from(p))
}

#[test]
fn whole_groups_over_absent_blocks_go_as_stripes_and_every_other_case_falls_back_to_deltas() {
    let _g = serial();
    let base = free_ports(5);
    let mut c = Cluster::init_with(5, &["--metrics-port", &base.to_string()]);
    c.start_all();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut rng = Rng(15);
    let object = ObjectId(1 << 40);
    let group = N * BS;
    rt.block_on(async {
        let client = c.client().await;
        let check = |at: u64, want: Vec<u8>| {
            let client = client.clone();
            async move {
                let got = client.read(object, at, want.len()).await.expect("read");
                assert!(got[..] == want[..], "bytes at {at} differ from what was written");
            }
        };

        // Four whole groups over nothing: four stripes, no delta asked for.
        let first = rng.bytes(4 * group);
        client.write_from(object, 0, Bytes::from(first.clone()), Toughness::Atomic, 0).await.expect("write");
        check(0, first.clone()).await;
        assert_eq!((stripes(base, "applied"), stripes(base, "abandoned")), (4.0, 0.0), "stripes after a fresh write");

        // The client wrongly believes the groups absent: each data IOM finds
        // its block and sends its delta, and the stripes are given up.
        let second = rng.bytes(4 * group);
        client.write_from(object, 0, Bytes::from(second.clone()), Toughness::Atomic, 0).await.expect("overwrite");
        check(0, second).await;
        assert_eq!((stripes(base, "applied"), stripes(base, "abandoned")), (4.0, 4.0), "after an overwrite");

        // References whose piece never comes (a client that died after its
        // data requests): the data IOMs are asked for their deltas.
        let g4 = rng.bytes(group);
        let t = Instant::now();
        write_refs_only(&client, object, 4, 0x4444, &g4).await;
        let took = t.elapsed();
        check(4 * group as u64, g4).await;
        assert!(took < Duration::from_secs(10), "a stripe without its piece took {took:?}");
        assert_eq!(stripes(base, "abandoned"), 5.0, "after a stripe without its piece");

        // A piece whose checksums disagree with the members' blocks.
        let g5 = rng.bytes(group);
        let (mut crcs, piece) = xor_of(&g5);
        crcs[2] ^= 1;
        send_piece(&client, object, 5, 0x5555, crcs, piece).await;
        write_refs_only(&client, object, 5, 0x5555, &g5).await;
        check(5 * group as u64, g5).await;

        // A piece nobody refers to (the client died before its data
        // requests), and a group written whole right after with a stripe.
        let g6 = rng.bytes(group);
        let (crcs, piece) = xor_of(&g6);
        send_piece(&client, object, 6, 0x6666, crcs, piece).await;
        let g7 = rng.bytes(group);
        let (crcs, piece) = xor_of(&g7);
        send_piece(&client, object, 7, 0x7777, crcs, piece).await;
        write_refs_only(&client, object, 7, 0x7777, &g7).await;
        check(7 * group as u64, g7).await;
        assert_eq!(stripes(base, "applied"), 5.0, "the stripe with its piece and every reference applies");
        // The piece of group 6 is dropped when its wait runs out.
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(stripes(base, "abandoned"), 7.0, "the checksum mismatch and the orphan piece were given up");

        // Two clients writing the same fresh group at once: whichever
        // lands second finds the first's blocks; the group holds one
        // writer's bytes per block and its parity agrees (scrub below).
        let other = c.client().await;
        let (a, b) = (rng.bytes(group), rng.bytes(group));
        let at = 8 * group as u64;
        let (ra, rb) = futures::future::join(
            client.write_from(object, at, Bytes::from(a.clone()), Toughness::Atomic, 0),
            other.write_from(object, at, Bytes::from(b.clone()), Toughness::Atomic, 0),
        )
        .await;
        ra.expect("first writer");
        rb.expect("second writer");
        let got = client.read(object, at, group).await.expect("read");
        for k in 0..N {
            let r = k * BS..(k + 1) * BS;
            assert!(got[r.clone()] == a[r.clone()] || got[r.clone()] == b[r.clone()], "block {k} is neither writer's");
        }
        other.close();
        client.close();
    });
    c.must_scrub_clean();
    // The same through a mount: 1 MiB writes of a new file are whole groups.
    let m = c.mount("m", &[]);
    let before = stripes(base, "applied");
    let data = rng.bytes(8 << 20);
    std::fs::write(m.join("f"), &data).expect("write through the mount");
    let applied = stripes(base, "applied") - before;
    assert!(std::fs::read(m.join("f")).expect("read") == data, "file read back");
    // `std::fs::write` writes in one call; the kernel hands it over in
    // max_write pieces of whole groups.
    assert!(applied >= 8.0, "only {applied} of the file's 32 groups went as stripes");
    c.must_scrub_clean();
}
