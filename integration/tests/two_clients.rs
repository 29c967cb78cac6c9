//! Two FUSE clients of one cluster at once under load: creates, renames,
//! unlinks and writes in the same directories, concurrently. Afterwards
//! scrub is clean, every file published by rename holds exactly what one
//! client wrote (close-to-open), and a file both clients overwrote holds,
//! block by block, what one of them wrote.

use integration::{free_ports, scrape, serial, value, Cluster, Rng};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const BS: usize = 65536;
const SHARED_BLOCKS: u64 = 16;

/// The bytes client `c` writes for file `n`: a header naming both, then
/// bytes derived from them, so any file can be checked on its own.
fn content(c: u8, n: u64) -> Vec<u8> {
    let len = 1000 + (n as usize * 7919) % (3 * BS);
    let mut v = format!("client {c} file {n}\n").into_bytes();
    v.extend(Rng(((c as u64) << 32) | n).bytes(len));
    v
}

fn parse_header(b: &[u8]) -> Option<(u8, u64)> {
    let end = b.iter().position(|&x| x == b'\n')?;
    let s = std::str::from_utf8(&b[..end]).ok()?;
    let mut it = s.split(' ');
    (it.next()? == "client").then_some(())?;
    let c = it.next()?.parse().ok()?;
    (it.next()? == "file").then_some(())?;
    Some((c, it.next()?.parse().ok()?))
}

/// One block of the shared file as client `c` writes it in round `r`.
fn shared_block(c: u8, r: u64, b: u64) -> Vec<u8> {
    let mut v = vec![0u8; BS];
    v[..24].copy_from_slice(&[c, (r >> 8) as u8, r as u8, b as u8].repeat(6));
    let tail = Rng(((c as u64) << 48) | (r << 16) | b).bytes(BS - 24);
    v[24..].copy_from_slice(&tail);
    v
}

fn worker(c: u8, m: PathBuf, until: Instant) -> u64 {
    let mut rng = Rng(1000 + c as u64);
    let mut n = 0u64;
    let shared = m.join("shared");
    while Instant::now() < until {
        n += 1;
        let dir = m.join(format!("d{}", rng.below(3)));
        match rng.below(10) {
            // Publish a file: write a temp file, fsync, rename over a name
            // the other client may be publishing to at the same moment.
            0..=4 => {
                let tmp = dir.join(format!(".tmp-{c}-{n}"));
                let mut f = fs::File::create(&tmp).expect("create temp");
                f.write_all(&content(c, n)).expect("write temp");
                f.sync_all().expect("fsync temp");
                drop(f);
                fs::rename(&tmp, dir.join(format!("f{}", rng.below(20)))).expect("rename");
            }
            // Remove a published file (it may be gone already).
            5 | 6 => match fs::remove_file(dir.join(format!("f{}", rng.below(20)))) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("client {c}: unlink: {e}"),
            },
            // Read a published file: whole, and what one client wrote.
            7 => match fs::read(dir.join(format!("f{}", rng.below(20)))) {
                Ok(b) => {
                    let (wc, wn) = parse_header(&b).unwrap_or_else(|| panic!("client {c}: a file without a header"));
                    assert!(b == content(wc, wn), "client {c} read a torn or mixed file (client {wc} file {wn})");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("client {c}: read: {e}"),
            },
            // Overwrite whole blocks of the shared file.
            _ => {
                let f = OpenOptions::new().write(true).open(&shared).expect("open shared");
                for _ in 0..4 {
                    let b = rng.below(SHARED_BLOCKS);
                    f.write_all_at(&shared_block(c, n & 0xffff, b), b * BS as u64).expect("write shared");
                }
            }
        }
    }
    n
}

fn check_tree(m: &Path) -> usize {
    let mut files = 0;
    for d in 0..3 {
        for e in fs::read_dir(m.join(format!("d{d}"))).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with(".tmp-") {
                continue;
            }
            let b = fs::read(e.path()).unwrap();
            let (c, n) = parse_header(&b).unwrap_or_else(|| panic!("{name}: no header"));
            assert!(b == content(c, n), "{name}: not exactly what client {c} wrote as file {n}");
            files += 1;
        }
    }
    files
}

#[test]
fn two_clients_at_once_keep_every_file_whole_and_parity_consistent() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let m1 = c.mount("m1", &[]);
    let m2 = c.mount("m2", &[]);
    for d in 0..3 {
        fs::create_dir(m1.join(format!("d{d}"))).unwrap();
    }
    let init: Vec<u8> = (0..SHARED_BLOCKS).flat_map(|b| shared_block(0, 0, b)).collect();
    fs::write(m1.join("shared"), &init).unwrap();
    let secs = std::env::var("IOMFS_TWO_CLIENT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(30);
    let until = Instant::now() + Duration::from_secs(secs);
    let (a, b) = (m1.clone(), m2.clone());
    let t1 = std::thread::spawn(move || worker(1, a, until));
    let t2 = std::thread::spawn(move || worker(2, b, until));
    let n1 = t1.join().expect("client 1 failed");
    let n2 = t2.join().expect("client 2 failed");
    eprintln!("operations: client 1 {n1}, client 2 {n2}");
    // Both clients see the same tree, and every file is whole.
    std::thread::sleep(Duration::from_millis(1200)); // entry_timeout
    let f1 = check_tree(&m1);
    let f2 = check_tree(&m2);
    assert_eq!(f1, f2, "the two clients see different trees");
    let shared = fs::read(m2.join("shared")).unwrap();
    assert_eq!(shared.len(), SHARED_BLOCKS as usize * BS);
    for (b, blk) in shared.chunks(BS).enumerate() {
        let (wc, r) = (blk[0], ((blk[1] as u64) << 8) | blk[2] as u64);
        // `r` is the low 16 bits of the round: enough within one run.
        assert!(
            (wc == 0 && blk == &shared_block(0, 0, b as u64)[..])
                || ((wc == 1 || wc == 2) && blk == &shared_block(wc, r, b as u64)[..]),
            "block {b} of the shared file is not what one client wrote"
        );
    }
    c.must_scrub_clean();
    c.must_fsck_clean();
}

/// Reads `len` bytes at 0 through a descriptor opened with `O_DIRECT`, so
/// that the read reaches the client and not the kernel's page cache.
fn read_direct(f: &fs::File, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len + 8192];
    let skip = (4096 - buf.as_ptr() as usize % 4096) % 4096;
    let want = len.div_ceil(4096) * 4096;
    let n = f.read_at(&mut buf[skip..skip + want], 0).expect("read");
    buf[skip..skip + n.min(len)].to_vec()
}

/// A read-only open of a small file reads its bytes beside the open
/// (`fs::prefetch`). Those bytes must never be older than the open (another
/// client's write closed before it) nor than this client's own write
/// through another handle after it, and an old handle must not refill the
/// kernel's pages with them after a newer open; and the mechanism must
/// really be used (its counter moves), or this test would test nothing.
#[test]
fn small_files_read_with_their_open_are_never_older_than_the_open_or_this_clients_writes() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let port = free_ports(1);
    let addr = format!("127.0.0.1:{port}");
    let a = c.mount("a", &[]);
    let b = c.mount("b", &[&format!("metrics={addr}")]);
    // Close-to-open: each version A closed is what B's next open reads.
    for round in 0..24u64 {
        let name = format!("f{}", round % 3);
        let data = Rng(round + 1).bytes(1 + (round as usize * 9973) % 65536);
        fs::write(a.join(&name), &data).expect("write on A");
        // As `cat *`, `diff -r` and `grep -r` do: list, then open.
        assert_eq!(fs::read_dir(&b).expect("list on B").count(), 3.min(round as usize + 1));
        let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(b.join(&name)).expect("open on B");
        let got = read_direct(&f, data.len());
        assert!(got == data, "round {round}: B read {} bytes, not the {} A closed", got.len(), data.len());
    }
    let used = value(&scrape(&addr), "iomfs_client_prefetch_total", &["outcome=\"used\""]);
    assert!(used >= 20.0, "prefetched bytes served {used} times in 24 opens");
    // This client's own write after a read-only open: the read through the
    // earlier handle sees it, not the bytes read beside the open.
    let p = b.join("own");
    fs::write(&p, vec![1u8; 4096]).expect("write");
    let r = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p).expect("open");
    let w = OpenOptions::new().write(true).open(&p).expect("open for writing");
    w.write_all_at(&[2u8; 4096], 0).expect("overwrite");
    drop(w);
    assert!(read_direct(&r, 4096) == vec![2u8; 4096], "a read after this client's own write returned older bytes");
    // And a truncation by this client.
    let r = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p).expect("open");
    OpenOptions::new().write(true).open(&p).expect("open").set_len(100).expect("truncate");
    assert!(read_direct(&r, 4096) == vec![2u8; 100], "a read after this client's own truncation returned older bytes");
    // An old handle must not put its open's bytes back into the kernel's
    // pages (shared by every handle) after a newer open on this client
    // saw another client's close: that newer open, and every open after
    // it that keeps the pages, would read them.
    let name = "pages";
    let (v1, v2) = (vec![7u8; 8192], vec![8u8; 8192]);
    fs::write(a.join(name), &v1).expect("write on A");
    assert!(fs::read_dir(&b).expect("list on B").count() >= 4);
    let r1 = fs::File::open(b.join(name)).expect("first open on B");
    let w = OpenOptions::new().write(true).open(a.join(name)).expect("open on A");
    w.write_all_at(&v2, 0).expect("overwrite on A");
    drop(w);
    let r2 = fs::File::open(b.join(name)).expect("second open on B");
    let mut got = vec![0u8; 8192];
    r1.read_exact_at(&mut got, 0).expect("read through the first handle");
    r2.read_exact_at(&mut got, 0).expect("read through the second handle");
    assert!(got == v2, "an open after another client's close read the bytes from before it");
    let r3 = fs::File::open(b.join(name)).expect("third open on B");
    r3.read_exact_at(&mut got, 0).expect("read through the third handle");
    assert!(got == v2, "a later open read the bytes from before another client's close");
    let dropped = value(&scrape(&addr), "iomfs_client_prefetch_total", &["outcome=\"dropped\""]);
    assert!(dropped >= 1.0, "no prefetch was found stale: {dropped}");
    c.must_scrub_clean();
}

/// A namespace answer overtaken by this client's own later change of the
/// file (a getattr read before an ftruncate to 0 and answered after it)
/// must not bring the file's old data object back: the writes that follow
/// would go to the dropped object, and every client would read zeros where
/// they were acknowledged. The `failpoints` build answers every regular
/// file's getattr 800 ms after reading it.
#[test]
fn an_answer_overtaken_by_a_truncate_does_not_send_later_writes_to_the_old_object() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.server_bin = integration::bin("iom-server-failpoints");
    for e in c.env.iter_mut() {
        e.push(("FAILPOINTS".into(), "namespace::getattr-answered=return(800)".into()));
    }
    c.start_all();
    // No kernel attribute cache: the fstat below reaches the client.
    let addr = format!("127.0.0.1:{}", free_ports(1));
    let a = c.mount("a", &["attr_timeout=0", &format!("metrics={addr}")]);
    let b = c.mount("b", &[]);
    let p = a.join("f");
    fs::write(&p, vec![b'o'; 3 * BS]).expect("write");
    let f = OpenOptions::new().read(true).write(true).open(&p).expect("open");
    let g = f.try_clone().expect("dup");
    let stat = std::thread::spawn(move || g.metadata().map(|m| m.len()));
    // The getattr has been read (its answer waits); the truncate overtakes it.
    std::thread::sleep(Duration::from_millis(300));
    f.set_len(0).expect("truncate");
    let seen = stat.join().expect("fstat thread").expect("fstat");
    assert!(seen == 0 || seen == 3 * BS as u64, "fstat saw {seen} bytes");
    let data = Rng(99).bytes(BS + 100);
    f.write_all_at(&data, 0).expect("write after the truncate");
    f.sync_all().expect("fsync");
    drop(f);
    let got = fs::read(b.join("f")).expect("read on B");
    assert!(
        got == data,
        "the other client read {} bytes ({} zero) where {} were written after the truncate",
        got.len(),
        got.iter().filter(|&&x| x == 0).count(),
        data.len()
    );
    let f = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&p).expect("open");
    assert!(read_direct(&f, data.len()) == data, "the writing client reads other bytes than it wrote");
    // The overtaken answer did come (else this test tested nothing).
    let stale = value(&scrape(&addr), "iomfs_client_stale_answers_total", &[]);
    assert!(stale >= 1.0, "no answer was overtaken ({stale}): the getattr was not answered after the truncate");
}
