//! Client sessions and their leases, with real FUSE clients: one killed
//! with SIGKILL in the middle of writes and creates, one stalled with
//! SIGSTOP for longer than its lease.

use integration::{bin, serial, Cluster, Rng};
use std::fs::{self, File};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LEASE_S: u64 = 4;

/// Opens the file named by its argument, says `open`, and on each line of
/// input first reads it (answering `read N` or `errno E`), then closes it.
const HOLDER: &str = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
print("open", flush=True)
sys.stdin.readline()
try:
    print(f"read {len(os.read(fd, 1 << 20))}", flush=True)
except OSError as e:
    print(f"errno {e.errno}", flush=True)
sys.stdin.readline()
os.close(fd)
"#;

/// `iomfs mount` in the foreground: the FUSE client is the child itself,
/// so the test can kill or stop it.
fn mount_child(c: &mut Cluster, name: &str) -> (i32, PathBuf) {
    let mnt = c.tmp.path().join(name);
    fs::create_dir_all(&mnt).unwrap();
    let log = fs::File::create(c.tmp.path().join(format!("{name}.log"))).unwrap();
    let child = Command::new(bin("iomfs"))
        .args(["mount", "--dir", c.dir.to_str().unwrap(), mnt.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("iomfs mount");
    let pid = child.id() as i32;
    c.track_mount(&mnt);
    c.track_child(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !integration::is_mounted(&mnt) {
        assert!(Instant::now() < deadline, "{} did not mount", mnt.display());
        std::thread::sleep(Duration::from_millis(50));
    }
    (pid, mnt)
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: a signal to a child this test started.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Resumes a stopped client whatever happens to the test.
struct Resume(i32);
impl Drop for Resume {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

fn wait_blocks(c: &Cluster, want: u64, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    loop {
        let n = c.scrubbed_blocks();
        if n == want {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: block count stuck at {n}, want {want}");
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

/// `kill -9` of a client while it writes, creates and renames, and while it
/// holds a file open that it had unlinked: another client keeps working;
/// the tree stays consistent (fsck, scrub, every renamed-into-place file
/// whole); once the dead client's lease has run out its unlinked file is
/// reclaimed (before: kept forever, as nobody would ever close it).
#[test]
fn a_killed_client_leaves_a_consistent_tree_and_its_unlinked_open_file_is_reclaimed() {
    let _g = serial();
    let mut c = Cluster::init(3);
    c.set_tuning("client_lease_s", LEASE_S);
    c.start_all();
    let mb = c.mount("b", &[]);
    let (pa, ma) = mount_child(&mut c, "a");
    let kept = Rng(1).bytes(1 << 20);
    fs::write(mb.join("kept"), &kept).unwrap();
    fs::create_dir(mb.join("w")).unwrap();
    let baseline = c.scrubbed_blocks();

    // Client A holds an unlinked 2 MiB file open ...
    let held_data = Rng(2).bytes(2 << 20);
    fs::write(ma.join("held"), &held_data).unwrap();
    let held = File::open(ma.join("held")).unwrap();
    fs::remove_file(ma.join("held")).unwrap();
    // ... and writes files whole, then renames them into place.
    let writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}/w' && i=0; while :; do head -c 150000 /dev/urandom > t$i && mv t$i d$i || exit 0; i=$((i+1)); done",
            ma.display()
        ))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    signal(pa, libc::SIGKILL);
    let t_kill = Instant::now();
    let mut writer = writer;
    let _ = writer.kill();
    let _ = writer.wait();
    drop(held);
    integration::unmount(&ma);

    // The other client is not held up by the dead one.
    let t = Instant::now();
    fs::write(mb.join("after"), b"still working").unwrap();
    assert!(t.elapsed() < Duration::from_secs(LEASE_S), "client B was blocked {:?}", t.elapsed());
    // Every file A renamed into place is whole, as B and a new mount see it.
    let done = names(&mb.join("w"));
    assert!(done.iter().filter(|n| n.starts_with('d')).count() > 2, "the writer wrote almost nothing: {done:?}");
    for n in done.iter().filter(|n| n.starts_with('d')) {
        assert_eq!(fs::metadata(mb.join("w").join(n)).unwrap().len(), 150_000, "{n} is not whole");
    }
    let ma2 = c.mount("a2", &[]);
    assert_eq!(names(&ma2.join("w")), done, "a new mount sees another tree");
    assert!(fs::read(ma2.join("kept")).unwrap() == kept);

    // Within the lease the unlinked file is kept (A might only be slow) ...
    fs::remove_dir_all(mb.join("w")).unwrap();
    fs::remove_file(mb.join("after")).unwrap();
    if t_kill.elapsed() < Duration::from_secs(LEASE_S - 1) {
        assert!(c.scrubbed_blocks() > baseline, "the unlinked file went before its client's lease ran out");
    }
    // ... and once the lease has run out it is reclaimed.
    wait_blocks(&c, baseline, Duration::from_secs(LEASE_S + 20), "the dead client's unlinked file");
    c.must_fsck_clean();
}

/// A client stopped (SIGSTOP) for longer than its lease loses its session:
/// the unlinked file it held open is reclaimed meanwhile, and when it
/// resumes its handle of that file answers ESTALE — never zeros or another
/// file's blocks — while the mount goes on working for everything else.
#[test]
fn a_client_stalled_past_its_lease_gets_estale_for_a_reclaimed_file_and_keeps_working() {
    let _g = serial();
    let mut c = Cluster::init(3);
    c.set_tuning("client_lease_s", LEASE_S);
    c.start_all();
    let mb = c.mount("b", &[]);
    let (pc, mc) = mount_child(&mut c, "c");
    let kept = Rng(3).bytes(300_000);
    fs::write(mb.join("kept"), &kept).unwrap();
    let baseline = c.scrubbed_blocks();
    // B writes a file, C opens it (reads nothing yet, so its kernel has
    // nothing cached), B unlinks it: C's handle keeps it. The handle lives
    // in a holder process, not in this test: every close of a FUSE file
    // descriptor — even the one `exec` does in each child this test forks
    // for the CLI — waits for the (stopped) client's answer to FLUSH.
    fs::write(mb.join("h"), Rng(4).bytes(1 << 20)).unwrap();
    let mut holder = Command::new("python3")
        .arg("-c")
        .arg(HOLDER)
        .arg(mc.join("h"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut to_holder = holder.stdin.take().unwrap();
    let mut from_holder = std::io::BufReader::new(holder.stdout.take().unwrap());
    let mut line = String::new();
    from_holder.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "open", "holder: {line}");
    fs::remove_file(mb.join("h")).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(c.scrubbed_blocks() > baseline, "the open, unlinked file lost its blocks");

    signal(pc, libc::SIGSTOP);
    let resume = Resume(pc);
    // B goes on writing meanwhile; the stalled client's file is reclaimed.
    let other = Rng(5).bytes(1 << 20);
    fs::write(mb.join("other"), &other).unwrap();
    assert!(fs::read(mb.join("other")).unwrap() == other);
    fs::remove_file(mb.join("other")).unwrap();
    wait_blocks(&c, baseline, Duration::from_secs(LEASE_S + 20), "the stalled client's unlinked file");
    drop(resume);

    writeln!(to_holder).unwrap();
    line.clear();
    from_holder.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), format!("errno {}", libc::ESTALE), "a reclaimed file read through a stale handle");
    writeln!(to_holder).unwrap();
    assert!(holder.wait().unwrap().success());
    // The mount itself goes on: a new session, other files right.
    assert!(fs::read(mc.join("kept")).unwrap() == kept);
    fs::write(mc.join("new"), b"written after the stall").unwrap();
    assert_eq!(fs::read(mb.join("new")).unwrap(), b"written after the stall");
    c.must_fsck_clean();
}

/// Writes the bytes of file argv[2] to file argv[1] (created), says
/// `written`, then for each line of input: `fsync` answers `ok` or
/// `errno E`; `rewrite` writes "after the eviction" at offset 0 first.
/// The descriptor lives here, not in the test: every fork the test makes
/// (nft, the CLI) would close an inherited copy, and a close flushes.
const WRITER: &str = r#"
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.write(fd, open(sys.argv[2], "rb").read())
print("written", flush=True)
for line in sys.stdin:
    if line.strip() == "rewrite":
        os.pwrite(fd, b"after the eviction", 0)
    try:
        os.fsync(fd)
        print("ok", flush=True)
    except OSError as e:
        print(f"errno {e.errno}", flush=True)
"#;

/// A process holding a file open on a mount (see `WRITER`).
struct Writer {
    child: std::process::Child,
    to: std::process::ChildStdin,
    from: std::io::BufReader<std::process::ChildStdout>,
}

impl Writer {
    fn start(c: &Cluster, path: &Path, data: &[u8]) -> Writer {
        let src = c.tmp.path().join(format!("src-{}", data.len()));
        fs::write(&src, data).unwrap();
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(WRITER)
            .arg(path)
            .arg(&src)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let to = child.stdin.take().unwrap();
        let from = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut w = Writer { child, to, from };
        assert_eq!(w.line(), "written");
        w
    }
    fn line(&mut self) -> String {
        let mut l = String::new();
        self.from.read_line(&mut l).unwrap();
        l.trim().to_string()
    }
    fn ask(&mut self, what: &str) -> String {
        writeln!(self.to, "{what}").unwrap();
        self.line()
    }
    fn close(mut self) {
        drop(self.to);
        assert!(self.child.wait().unwrap().success());
    }
}

/// A client cut off from every IOM (its address firewalled) while it holds
/// `buffered` bytes. A cut shorter than its lease loses nothing; one longer
/// than its lease gets it evicted: after the heal, its bytes are not sent
/// over what another client wrote meanwhile, and its fsync reports the
/// loss (EIO).
#[test]
fn a_client_partitioned_past_its_lease_with_buffered_bytes_is_evicted_and_fsync_reports_it() {
    use integration::firewall::Firewall;
    let _g = serial();
    let mut c = Cluster::init(5);
    c.set_tuning("client_lease_s", LEASE_S);
    c.start_all();
    let ip = std::net::Ipv4Addr::new(127, 0, 0, 101);
    let mb = c.mount("buffered", &["toughness=buffered", "buffer_age=600", &format!("bind={ip}")]);
    let mo = c.mount("other", &[]);
    let fw = Firewall::new("evict");

    // Shorter than the lease: the bytes wait, then go out.
    let short = Rng(1).bytes(200_000);
    let mut w = Writer::start(&c, &mb.join("short"), &short);
    fw.isolate(ip);
    std::thread::sleep(Duration::from_secs(1));
    fw.heal();
    assert_eq!(w.ask("fsync"), "ok", "fsync after a cut shorter than the lease");
    w.close();
    assert!(fs::read(mo.join("short")).unwrap() == short, "bytes buffered across a short cut differ");

    // Longer than the lease: evicted.
    let mine = Rng(2).bytes(300_000);
    let mut w = Writer::start(&c, &mb.join("long"), &mine);
    fw.isolate(ip);
    let theirs = Rng(3).bytes(300_000);
    fs::write(mo.join("long"), &theirs).unwrap();
    // The namespace ends the session a lease after its last contact.
    std::thread::sleep(Duration::from_secs(LEASE_S * 2 + 2));
    assert!(fw.matched() > 0, "the rule cutting the client off matched nothing");
    fw.heal();
    assert_eq!(w.ask("fsync"), format!("errno {}", libc::EIO), "fsync of bytes buffered by an evicted client");
    // A fresh view of the cluster: the other client's bytes stand.
    let check = c.mount("check", &[]);
    assert!(fs::read(check.join("long")).unwrap() == theirs, "an evicted client's buffered bytes overwrote newer ones");
    // The mount goes on under a new session.
    assert_eq!(w.ask("rewrite"), "ok", "fsync under the new session");
    w.close();
    let got = fs::read(c.mount("check2", &[]).join("long")).unwrap();
    assert_eq!(&got[..18], b"after the eviction");

    // Longer than the lease, and the namespace home fails meanwhile: its
    // mirror takes over knowing no sessions, so it cannot tell the client
    // it was evicted. The client knows its lease lapsed, and treats its
    // bytes the same way. (Before, they were sent over the other
    // client's.)
    let mine = Rng(4).bytes(300_000);
    let mut w = Writer::start(&c, &mb.join("failover"), &mine);
    fw.isolate(ip);
    let theirs = Rng(5).bytes(300_000);
    fs::write(mo.join("failover"), &theirs).unwrap();
    c.kill(0);
    std::thread::sleep(Duration::from_secs(LEASE_S * 2 + 2));
    fw.heal();
    assert_eq!(w.ask("fsync"), format!("errno {}", libc::EIO), "fsync of bytes buffered across a lapse and a failover");
    let check = c.mount("check3", &[]);
    assert!(
        fs::read(check.join("failover")).unwrap() == theirs,
        "bytes buffered across a lapsed lease and a namespace failover overwrote newer ones"
    );
    w.close();
    c.start(0);
}
