//! The `buffered` level end to end (issue 15): `write()` returns once the
//! client holds the bytes; they reach the IOMs on close, fsync, the age
//! limit, the buffer's caps, `iomfs sync` and before the file's size or
//! truncation changes. A second mount of the same cluster is the witness:
//! it reads what the IOMs hold (an overwrite within the published size
//! needs no size change to be seen).

use integration::{mount_pid, serial, Cluster, Rng};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const MIB: usize = 1 << 20;

fn set_toughness(p: &Path, t: &str) {
    let out = Command::new("setfattr").args(["-n", "user.iomfs.toughness", "-v", t]).arg(p).output().unwrap();
    assert!(out.status.success(), "setfattr {t} on {}: {}", p.display(), String::from_utf8_lossy(&out.stderr));
}

/// Drops this client's kernel page cache of `f`, so the next read asks the
/// FUSE daemon.
fn drop_pages(f: &File) {
    // SAFETY: an open descriptor; advice only.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Up to `len` bytes at `off` of `p`, read through a fresh open
/// (close-to-open); shorter if the file is.
fn read_at(p: &Path, off: u64, len: usize) -> Vec<u8> {
    let f = File::open(p).unwrap();
    drop_pages(&f);
    let mut b = vec![0u8; len];
    let mut got = 0;
    while got < len {
        match f.read_at(&mut b[got..], off + got as u64).unwrap() {
            0 => break,
            n => got += n,
        }
    }
    b.truncate(got);
    b
}

/// A file of `len` bytes written and closed at the mount's level before
/// the test: what the witness reads until the buffered bytes arrive.
fn old_file(p: &Path, len: usize, seed: u64) -> Vec<u8> {
    let old = Rng(seed).bytes(len);
    fs::write(p, &old).unwrap();
    old
}

/// Reads what the IOMs hold right now, as the witness mount `w` sees it,
/// until `want` or the deadline.
fn witness_sees(p: &Path, want: &[u8], within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if read_at(p, 0, want.len()) == want {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn buffered_writes_wait_in_the_client_are_read_back_there_and_reach_the_cluster_at_close() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let a = c.mount("a", &["toughness=buffered,buffer_age=60"]);
    let w = c.mount("w", &[]);
    let old = old_file(&a.join("f"), 3 * MIB + 12345, 1);
    let new = Rng(2).bytes(old.len());

    let mut f = OpenOptions::new().write(true).read(true).open(a.join("f")).unwrap();
    f.write_all(&new).unwrap();
    // Not on the IOMs yet: the witness reads the old bytes.
    assert!(read_at(&w.join("f"), 0, old.len()) == old, "a buffered write reached the IOMs before any flush");
    // The writer reads its own bytes, also once its kernel cache is gone.
    drop_pages(&f);
    let mut back = vec![0u8; new.len()];
    f.read_exact_at(&mut back, 0).unwrap();
    assert!(back == new, "the writing mount does not read back its buffered bytes");
    // A partial overwrite of buffered bytes: the newest bytes win.
    f.write_all_at(b"NEWEST", 100).unwrap();
    let mut expect = new.clone();
    expect[100..106].copy_from_slice(b"NEWEST");
    drop(f); // close: sent and published before close returns
    assert!(read_at(&w.join("f"), 0, expect.len()) == expect, "after close the witness does not read the new bytes");

    // A new file grown by buffered writes: size and bytes arrive together at close.
    let grown = Rng(3).bytes(5 * MIB + 7);
    fs::write(a.join("g"), &grown).unwrap();
    assert!(fs::read(w.join("g")).unwrap() == grown, "a new buffered file is not whole after close");
    c.must_scrub_clean();
}

#[test]
fn a_buffered_file_and_an_atomic_file_on_one_mount_each_keep_their_promise() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    // An atomic mount with a buffered file, a buffered mount with an atomic file.
    let at = c.mount("atomic", &["buffer_age=60"]);
    let bu = c.mount("buffered", &["toughness=buffered,buffer_age=60"]);
    let w = c.mount("w", &[]);
    fs::create_dir(at.join("d")).unwrap();
    let old_b = old_file(&at.join("d/buffered"), MIB, 10);
    let old_a = old_file(&at.join("d/atomic"), MIB, 11);
    set_toughness(&at.join("d/buffered"), "buffered");
    set_toughness(&at.join("d/atomic"), "atomic");
    let (new_b, new_a) = (Rng(12).bytes(MIB), Rng(13).bytes(MIB));

    for m in [&at, &bu] {
        let fb = OpenOptions::new().write(true).open(m.join("d/buffered")).unwrap();
        let fa = OpenOptions::new().write(true).open(m.join("d/atomic")).unwrap();
        fb.write_all_at(&new_b, 0).unwrap();
        fa.write_all_at(&new_a, 0).unwrap();
        // The atomic write is on the IOMs when write() returns; the buffered one is not.
        assert!(
            read_at(&w.join("d/atomic"), 0, MIB) == new_a,
            "{}: an atomic write was not on the IOMs when it returned",
            m.display()
        );
        assert!(
            read_at(&w.join("d/buffered"), 0, MIB) == old_b,
            "{}: a buffered write reached the IOMs before a flush",
            m.display()
        );
        fb.sync_all().unwrap();
        assert!(
            read_at(&w.join("d/buffered"), 0, MIB) == new_b,
            "{}: fsync did not send the buffered bytes",
            m.display()
        );
        // Back to the old bytes for the other mount's round.
        drop((fa, fb));
        fs::write(at.join("d/buffered"), &old_b).unwrap();
        fs::write(at.join("d/atomic"), &old_a).unwrap();
    }
}

#[test]
fn the_age_limit_the_caps_and_iomfs_sync_send_buffered_bytes() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let aged = c.mount("aged", &["toughness=buffered,buffer_age=0.5"]);
    let capped = c.mount("capped", &["toughness=buffered,buffer_age=60,buffer_mb=2,buffer_file_mb=1"]);
    let synced = c.mount("synced", &["toughness=buffered,buffer_age=60"]);
    let w = c.mount("w", &[]);

    // Age: sent (and the size published) within the limit, without a close.
    let new = Rng(20).bytes(2 * MIB + 99);
    let mut f = File::create(aged.join("a")).unwrap();
    f.write_all(&new).unwrap();
    assert!(witness_sees(&w.join("a"), &new, Duration::from_secs(5)), "the age limit did not send the bytes");
    drop(f);

    // Caps: a writer of 6 MiB with a 1 MiB file cap leaves at most 1 MiB
    // unsent, and the whole buffer never holds more than its 2 MiB.
    let old = old_file(&capped.join("c"), 6 * MIB, 21);
    let new = Rng(22).bytes(6 * MIB);
    let f = OpenOptions::new().write(true).open(capped.join("c")).unwrap();
    for (i, chunk) in new.chunks(256 << 10).enumerate() {
        f.write_all_at(chunk, (i * (256 << 10)) as u64).unwrap();
    }
    let seen = read_at(&w.join("c"), 0, 6 * MIB);
    let same = seen.iter().zip(&new).take_while(|(a, b)| a == b).count();
    assert!(same >= 5 * MIB, "only {same} bytes reached the IOMs with a 1 MiB file cap");
    assert!(
        seen[same..] == old[same..] || seen[same..] == new[same..],
        "the witness reads a mix past the flushed part"
    );
    drop(f);

    // iomfs sync: everything buffered goes now.
    let new = Rng(23).bytes(3 * MIB);
    let mut f = File::create(synced.join("s")).unwrap();
    f.write_all(&new).unwrap();
    let out = Command::new(integration::bin("iomfs")).arg("sync").arg(&synced).output().unwrap();
    assert!(out.status.success(), "iomfs sync: {}", String::from_utf8_lossy(&out.stderr));
    assert!(read_at(&w.join("s"), 0, new.len()) == new, "iomfs sync did not send the buffered bytes");
    drop(f);
    c.must_scrub_clean();
}

#[test]
fn truncate_rename_and_a_killed_client_after_close_keep_buffered_bytes_right() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let a = c.mount("a", &["toughness=buffered,buffer_age=60"]);
    let w = c.mount("w", &[]);

    // Truncate a file holding buffered bytes: the cut applies after them.
    let new = Rng(30).bytes(2 * MIB);
    let mut f = File::create(a.join("t")).unwrap();
    f.write_all(&new).unwrap();
    f.set_len(MIB as u64 + 5).unwrap();
    f.write_all_at(b"tail", MIB as u64 + 5).unwrap();
    drop(f);
    let mut expect = new[..MIB + 5].to_vec();
    expect.extend_from_slice(b"tail");
    assert!(fs::read(w.join("t")).unwrap() == expect, "truncate of a file with buffered bytes reads wrong");

    // Rename while buffered: the bytes follow the file.
    let new = Rng(31).bytes(MIB + 3);
    let mut f = File::create(a.join("r1")).unwrap();
    f.write_all(&new).unwrap();
    fs::rename(a.join("r1"), a.join("r2")).unwrap();
    drop(f);
    assert!(fs::read(w.join("r2")).unwrap() == new, "a renamed file lost its buffered bytes");

    // close() returned: a client killed right after loses nothing.
    let new = Rng(32).bytes(4 * MIB + 1);
    fs::write(a.join("k"), &new).unwrap();
    let pid = mount_pid(&a);
    // SAFETY: killing the mount process found above.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let _ = Command::new("umount").arg("-l").arg(&a).status();
    assert!(fs::read(w.join("k")).unwrap() == new, "bytes of a closed buffered file were lost with the client");
    c.must_scrub_clean();
}

/// A flush that fails is reported by fsync: 30 MiB buffered on a 96 MiB
/// disk (room for it when written), then the disk filled from outside the
/// cluster, then fsync.
#[test]
fn a_flush_that_fails_is_reported_by_fsync() {
    let _g = serial();
    let disk = integration::Tmpfs::new(96);
    let mut c = Cluster::init_at(disk.path(), 3, &[]);
    c.start_all();
    let m = c.mount("mnt", &["toughness=buffered,buffer_age=60"]);
    let chunk = Rng(40).bytes(MIB);
    let mut f = File::create(m.join("fill")).unwrap();
    for _ in 0..30 {
        f.write_all(&chunk).expect("30 MiB into a 96 MiB disk");
    }
    // Everything the disk has left, taken by a file outside the cluster.
    let filler = disk.path().join("filler");
    let mut junk = OpenOptions::new().create(true).append(true).open(&filler).unwrap();
    while junk.write_all(&[0u8; 65536]).is_ok() {}
    drop(junk);
    let t = Instant::now();
    let e = f.sync_all().expect_err("30 MiB buffered into a full disk were flushed without an error");
    eprintln!("fsync failed after {:?}: {e}", t.elapsed());
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "a full disk gave {e} instead of ENOSPC");
    drop(f);
    fs::remove_file(&filler).unwrap();
    // The mount goes on after space is freed.
    if let Err(e) = fs::remove_file(m.join("fill")) {
        let log = fs::read_to_string(fs_client::mount::mount_log(&c.dir, &m)).unwrap_or_default();
        let ioms: String = (0..3)
            .map(|i| {
                let l = c.log(i);
                format!("--- IOM {i}:\n{}\n", &l[l.len().saturating_sub(3000)..])
            })
            .collect();
        panic!("unlink of the filled file: {e}\nmount log:\n{}\n{ioms}", &log[log.len().saturating_sub(2000)..]);
    }
    let small = Rng(41).bytes(MIB);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = File::create(m.join("after")).and_then(|mut f| {
            f.write_all(&small)?;
            f.sync_all()
        });
        match r {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => panic!("writing after a delete freed space: {e}"),
        }
    }
    assert!(fs::read(m.join("after")).unwrap() == small);
}

/// Past nearfull, a `buffered` write that grows a file gets ENOSPC from
/// `write()` itself (it would otherwise be acknowledged into memory and
/// fail only at the flush), and what `df` said was available is what the
/// mount then stores: 3 IOMs on one 96 MiB tmpfs, 1 MiB writes until one
/// is refused; fsync then succeeds (everything accepted is stored), and the
/// bytes stored are within 5 % of `df`'s available space at the start.
#[test]
fn past_nearfull_a_buffered_write_gets_enospc_at_write_and_df_was_right() {
    let _g = serial();
    let disk = integration::Tmpfs::new(96);
    let mut c = Cluster::init_at(disk.path(), 3, &[]);
    c.start_all();
    let m = c.mount("mnt", &["toughness=buffered,buffer_age=60"]);
    let avail = {
        let st = nix_statvfs(&m);
        st.0 * st.1
    };
    let chunk = Rng(42).bytes(MIB);
    let mut f = File::create(m.join("fill")).unwrap();
    let mut written = 0u64;
    let err = loop {
        match f.write_all(&chunk) {
            Ok(()) => written += MIB as u64,
            Err(e) => break e,
        }
        assert!(written < 200 * MIB as u64, "200 MiB went into a 96 MiB disk without an error at write()");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "write() past nearfull gave {err}");
    f.sync_all().expect("fsync of what write() accepted past nearfull");
    drop(f);
    let stored = fs::metadata(m.join("fill")).unwrap().len();
    eprintln!("df said {} MiB available; stored {} MiB", avail >> 20, stored >> 20);
    assert!(
        stored + stored / 20 >= avail && stored <= avail,
        "df said {avail} bytes were available; the mount stored {stored}"
    );
    let back = fs::read(m.join("fill")).unwrap();
    assert!(back.chunks(MIB).all(|c| c == &chunk[..]), "the stored file reads back different bytes");
    c.must_scrub_clean();
}

/// (f_bavail, f_frsize) of the filesystem holding `p`.
fn nix_statvfs(p: &Path) -> (u64, u64) {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: plain C struct filled by statvfs.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out-pointer.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    (s.f_bavail as u64, s.f_frsize as u64)
}

/// An fsync of `buffered` overwrites sends them as `durable` writes side
/// by side with the namespace's part (no flush of their IOMs after them):
/// what it acknowledged survives a power cut of every IOM (the IOMs run
/// in the power-loss test mode: a kill loses every write not yet synced).
/// A write that grows the file is fsynced the other way (sent first), in
/// the same run (not the last round: its flush of every IOM it wrote to
/// would make the rounds before it durable too). The IOMs sync lazily
/// only every 10 s here, so nothing else makes a round durable.
#[test]
fn fsynced_buffered_overwrites_survive_a_power_cut_of_every_iom() {
    let _g = serial();
    let mut c = Cluster::init(3);
    c.server_bin = integration::bin("iom-server-failpoints");
    for e in c.env.iter_mut() {
        *e = vec![("IOMFS_TEST_POWER_LOSS".into(), "1".into())];
    }
    // Nothing made durable in the background meanwhile: only what an
    // fsync made durable survives the cut.
    c.set_tuning("journal_flush_ms", 10_000);
    c.start_all();
    let m = c.mount("mnt", &["toughness=buffered,buffer_age=60"]);
    let w = c.mount("w", &[]);
    let p = m.join("f");
    let mut want = Rng(50).bytes(2 * MIB);
    let mut f = File::create(&p).unwrap();
    f.write_all(&want).unwrap();
    f.sync_all().unwrap();
    let mut rng = Rng(51);
    for round in 0..8 {
        // Past the 100 ms in which a flush of the rounds before (the
        // create's, the growing write's) has the IOMs sync every record
        // at once (`flush_hurry`): a round's bytes are durable only if its
        // own fsync made them so.
        std::thread::sleep(Duration::from_millis(200));
        // Scattered overwrites, several in some blocks, then fsync.
        for _ in 0..24 {
            let off = rng.below((2 * MIB - 5000) as u64) as usize;
            let len = 1 + rng.below(4999) as usize;
            let data = rng.bytes(len);
            f.write_all_at(&data, off as u64).unwrap();
            want[off..off + data.len()].copy_from_slice(&data);
        }
        if round == 3 {
            // And one that grows the file.
            let tail = rng.bytes(70_000);
            f.write_all_at(&tail, want.len() as u64).unwrap();
            want.extend_from_slice(&tail);
        }
        f.sync_all().unwrap();
        assert!(fs::read(w.join("f")).unwrap() == want, "round {round}: the witness reads other bytes after fsync");
    }
    for i in 0..3 {
        c.kill(i);
    }
    drop(f);
    for mnt in [&w, &m] {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
    c.start_all();
    let m = c.mount("again", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let got = loop {
        match fs::read(m.join("f")) {
            Ok(b) => break b,
            Err(e) if Instant::now() < deadline => {
                eprintln!("read after the restart: {e}");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => panic!("read after the power cut: {e}"),
        }
    };
    assert_eq!(got.len(), want.len(), "the size fsynced was lost in the power cut");
    assert!(got == want, "bytes fsynced were lost in the power cut");
    c.must_scrub_clean();
}
