//! The FUSE mount end to end: five real IOM processes, a real mount, ordinary tools.

use integration::{mount_pid, serial, Cluster, Rng};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

fn sh(cmd: &str) -> (bool, String) {
    let o = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn must(cmd: &str) -> String {
    let (ok, out) = sh(cmd);
    assert!(ok, "`{cmd}` failed:\n{out}");
    out
}

fn up() -> (Cluster, std::path::PathBuf) {
    let mut c = Cluster::init(5);
    c.start_all();
    let m = c.mount("mnt", &[]);
    (c, m)
}

fn getx(p: &Path, name: &str) -> Option<String> {
    let o = Command::new("getfattr").args(["--absolute-names", "--only-values", "-n", name]).arg(p).output().unwrap();
    o.status.success().then(|| String::from_utf8_lossy(&o.stdout).to_string())
}

#[test]
fn cp_a_of_a_real_tree_then_diff() {
    let _g = serial();
    let (c, m) = up();
    let src = "/usr/share/doc";
    must(&format!("cp -a {src} '{}/tree'", m.display()));
    must(&format!("diff -r --no-dereference {src} '{}/tree'", m.display()));
    // metadata preserved by cp -a
    let a = fs::symlink_metadata(src).unwrap();
    let b = fs::symlink_metadata(m.join("tree")).unwrap();
    assert_eq!(a.mode(), b.mode());
    assert_eq!(a.mtime(), b.mtime());
    // tar and rsync-like reading of the tree
    must(&format!("cd '{}' && tar cf - tree | tar tf - > /dev/null", m.display()));
    c.must_scrub_clean();
}

#[test]
fn a_1_gib_file_reads_back_with_the_same_checksum() {
    let _g = serial();
    let (c, m) = up();
    let path = m.join("big");
    let mut rng = Rng(99);
    let mut f = File::create(&path).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    let mut crc = 0u32;
    for _ in 0..1024 {
        for w in chunk.chunks_mut(8) {
            w.copy_from_slice(&rng.next_u64().to_le_bytes());
        }
        crc = crc32(crc, &chunk);
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::metadata(&path).unwrap().len(), 1 << 30);
    let mut f = File::open(&path).unwrap();
    let mut back = 0u32;
    let mut n = 0usize;
    loop {
        let k = f.read(&mut chunk).unwrap();
        if k == 0 {
            break;
        }
        back = crc32(back, &chunk[..k]);
        n += k;
    }
    assert_eq!(n, 1 << 30);
    assert_eq!(back, crc, "1 GiB file read back with a different checksum");
    c.must_scrub_clean();
}

fn crc32(c: u32, b: &[u8]) -> u32 {
    crc32c::crc32c_append(c, b)
}

#[test]
fn append_overwrite_truncate_extend_sparse() {
    let _g = serial();
    let (c, m) = up();
    let p = m.join("f");
    let mut model: Vec<u8> = Vec::new();
    let mut f = OpenOptions::new().create(true).append(true).open(&p).unwrap();
    for i in 0..50 {
        let d = vec![i as u8 + 1; 3000 + i * 17];
        f.write_all(&d).unwrap();
        model.extend_from_slice(&d);
    }
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), model, "appends");
    // overwrite in the middle, crossing a block boundary
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    let d = vec![0xabu8; 70000];
    f.write_all_at(&d, 60000).unwrap();
    model.resize(model.len().max(130000), 0);
    model[60000..130000].copy_from_slice(&d);
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), model, "overwrite");
    // truncate down, then extend: the cut bytes read as zeros
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(70001).unwrap();
    model.truncate(70001);
    assert_eq!(fs::read(&p).unwrap(), model, "truncate down");
    f.set_len(200000).unwrap();
    model.resize(200000, 0);
    assert_eq!(fs::read(&p).unwrap(), model, "extend");
    f.write_all_at(b"tail", 199996).unwrap();
    model[199996..].copy_from_slice(b"tail");
    drop(f);
    assert_eq!(fs::read(&p).unwrap(), model);
    // truncate to zero and rewrite (O_TRUNC)
    fs::write(&p, b"short").unwrap();
    assert_eq!(fs::read(&p).unwrap(), b"short");
    // sparse file far past 4 GiB: holes read as zeros
    let s = m.join("sparse");
    let f = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&s).unwrap();
    let far = 6u64 << 30;
    f.write_all_at(b"end", far).unwrap();
    f.write_all_at(b"mid", 1 << 32).unwrap();
    assert_eq!(fs::metadata(&s).unwrap().len(), far + 3);
    let mut buf = vec![1u8; 8192];
    f.read_exact_at(&mut buf, (1 << 32) - 4096).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0), "hole before 4 GiB is not zeros");
    assert_eq!(&buf[4096..4099], b"mid");
    f.read_exact_at(&mut buf[..3], far).unwrap();
    assert_eq!(&buf[..3], b"end");
    let mut g = File::open(&s).unwrap();
    g.seek(SeekFrom::Start(12345)).unwrap();
    let mut z = vec![9u8; 100000];
    g.read_exact(&mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    // fallocate extends
    must(&format!("fallocate -l 300000 '{}'", m.join("fa").display()));
    assert_eq!(fs::metadata(m.join("fa")).unwrap().len(), 300000);
    // unlink while open: the data stays readable through the descriptor
    fs::write(m.join("gone"), b"still here").unwrap();
    let h = File::open(m.join("gone")).unwrap();
    fs::remove_file(m.join("gone")).unwrap();
    let mut s = String::new();
    (&h).read_to_string(&mut s).unwrap();
    assert_eq!(s, "still here");
    drop(h);
    // O_SYNC and fsync work
    let mut f = OpenOptions::new().write(true).create(true).custom_flags(libc::O_SYNC).open(m.join("sync")).unwrap();
    f.write_all(b"synced").unwrap();
    f.sync_all().unwrap();
    drop(f);
    assert_eq!(fs::read(m.join("sync")).unwrap(), b"synced");
    c.must_scrub_clean();
}

/// A program copied into the mount runs from it, and a failed
/// open(O_RDONLY|O_TRUNC) of the running binary (ETXTBSY) leaves it intact
/// (with FUSE_ATOMIC_O_TRUNC the kernel dropped its pages first and it died).
#[test]
fn executables_run_and_etxtbsy_leaves_them_running() {
    let _g = serial();
    let (_c, m) = up();
    let sleep =
        String::from_utf8(Command::new("sh").args(["-c", "command -v sleep"]).output().unwrap().stdout).unwrap();
    for i in 0..20 {
        let exe = m.join(format!("sleep{i}"));
        fs::copy(sleep.trim(), &exe).unwrap();
        fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
        let mut child = Command::new(&exe).arg("10").spawn().unwrap();
        for (flags, what) in [(libc::O_WRONLY, "O_WRONLY"), (libc::O_RDONLY | libc::O_TRUNC, "O_RDONLY|O_TRUNC")] {
            let e = OpenOptions::new()
                .read(flags & libc::O_ACCMODE == libc::O_RDONLY)
                .write(flags & libc::O_ACCMODE == libc::O_WRONLY)
                .custom_flags(flags & libc::O_TRUNC)
                .open(&exe)
                .map(|_| ())
                .unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::ETXTBSY), "{what} open of a running binary (round {i})");
        }
        std::thread::sleep(Duration::from_millis(50));
        let st = child.try_wait().unwrap();
        assert!(st.is_none(), "the binary run from the mount died: {st:?} (round {i})");
        child.kill().unwrap();
        child.wait().unwrap();
        fs::remove_file(&exe).unwrap();
    }
}

#[test]
fn rename_link_symlink_unlink_cases() {
    let _g = serial();
    let (c, m) = up();
    fs::create_dir(m.join("a")).unwrap();
    fs::create_dir(m.join("b")).unwrap();
    fs::write(m.join("a/f"), b"F").unwrap();
    fs::write(m.join("b/g"), b"G").unwrap();
    // replace across directories
    fs::rename(m.join("a/f"), m.join("b/g")).unwrap();
    assert_eq!(fs::read(m.join("b/g")).unwrap(), b"F");
    assert!(!m.join("a/f").exists());
    // RENAME_NOREPLACE and RENAME_EXCHANGE
    fs::write(m.join("a/x"), b"X").unwrap();
    let cs = |p: &Path| std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cs(&m.join("a/x")).as_ptr(),
            libc::AT_FDCWD,
            cs(&m.join("b/g")).as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    assert_eq!(r, -1);
    assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EEXIST));
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cs(&m.join("a/x")).as_ptr(),
            libc::AT_FDCWD,
            cs(&m.join("b/g")).as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
    assert_eq!(fs::read(m.join("a/x")).unwrap(), b"F");
    assert_eq!(fs::read(m.join("b/g")).unwrap(), b"X");
    // directory renames: into itself is refused, over a non-empty dir too
    assert!(fs::rename(m.join("a"), m.join("a/sub")).is_err());
    fs::create_dir(m.join("c")).unwrap();
    fs::write(m.join("c/keep"), b"").unwrap();
    let e = fs::rename(m.join("a"), m.join("c")).unwrap_err();
    assert!(matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)), "{e}");
    fs::rename(m.join("a"), m.join("b/moved")).unwrap();
    assert_eq!(fs::read(m.join("b/moved/x")).unwrap(), b"F");
    assert_eq!(fs::metadata(m.join("b")).unwrap().nlink(), 3);
    // hard links
    fs::hard_link(m.join("b/g"), m.join("b/g2")).unwrap();
    assert_eq!(fs::metadata(m.join("b/g")).unwrap().nlink(), 2);
    fs::remove_file(m.join("b/g")).unwrap();
    assert_eq!(fs::read(m.join("b/g2")).unwrap(), b"X");
    assert_eq!(fs::metadata(m.join("b/g2")).unwrap().nlink(), 1);
    // symlinks
    std::os::unix::fs::symlink("moved/x", m.join("b/ln")).unwrap();
    assert_eq!(fs::read_link(m.join("b/ln")).unwrap(), Path::new("moved/x"));
    assert_eq!(fs::read(m.join("b/ln")).unwrap(), b"F");
    // rmdir of a non-empty directory
    let e = fs::remove_dir(m.join("c")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    fs::remove_file(m.join("c/keep")).unwrap();
    fs::remove_dir(m.join("c")).unwrap();
    // readdir sees exactly what is there, with concurrent changes
    for i in 0..300 {
        fs::write(m.join(format!("b/moved/n{i:03}")), b"").unwrap();
    }
    let mut names: Vec<String> =
        fs::read_dir(m.join("b/moved")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    assert_eq!(names.len(), 301);
    let mut it = fs::read_dir(m.join("b/moved")).unwrap();
    let mut seen = 0;
    for (k, e) in it.by_ref().enumerate() {
        let e = e.unwrap();
        if k == 10 {
            fs::write(m.join("b/moved/late"), b"").unwrap();
            fs::remove_file(m.join("b/moved/n299")).ok();
        }
        let _ = e.file_name();
        seen += 1;
    }
    assert!(seen >= 299, "readdir lost entries under concurrent change: {seen}");
    // names too long
    let long = "x".repeat(256);
    let e = fs::write(m.join(&long), b"").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENAMETOOLONG));
    // permissions and ownership round trip
    fs::set_permissions(m.join("b/g2"), fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(fs::metadata(m.join("b/g2")).unwrap().mode() & 0o7777, 0o640);
    std::os::unix::fs::chown(m.join("b/g2"), Some(1234), Some(5678)).unwrap();
    let md = fs::metadata(m.join("b/g2")).unwrap();
    assert_eq!((md.uid(), md.gid()), (1234, 5678));
    // mkfifo
    must(&format!("mkfifo '{}'", m.join("fifo").display()));
    assert!(fs::metadata(m.join("fifo")).unwrap().file_type().is_fifo_like());
    c.must_scrub_clean();
}

trait FifoLike {
    fn is_fifo_like(&self) -> bool;
}
impl FifoLike for fs::FileType {
    fn is_fifo_like(&self) -> bool {
        use std::os::unix::fs::FileTypeExt;
        self.is_fifo()
    }
}

#[test]
fn xattrs_and_toughness_semantics() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let m = c.mount("mnt", &[]);
    let f = m.join("f");
    fs::write(&f, b"x").unwrap();
    must(&format!("setfattr -n user.color -v blue '{}'", f.display()));
    assert_eq!(getx(&f, "user.color").as_deref(), Some("blue"));
    let list = must(&format!("getfattr -d '{}'", f.display()));
    assert!(list.contains("user.color=\"blue\""), "{list}");
    let (ok, out) = sh(&format!("getfattr -n user.nope '{}'", f.display()));
    assert!(!ok && out.contains("No such attribute"), "{out}");
    must(&format!("setfattr -x user.color '{}'", f.display()));
    assert!(getx(&f, "user.color").is_none());
    // XATTR_CREATE / XATTR_REPLACE and ERANGE through the syscalls
    let cs = std::ffi::CString::new(f.to_str().unwrap()).unwrap();
    let n = std::ffi::CString::new("user.k").unwrap();
    unsafe {
        assert_eq!(libc::setxattr(cs.as_ptr(), n.as_ptr(), b"v".as_ptr().cast(), 1, libc::XATTR_REPLACE), -1);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ENODATA));
        assert_eq!(libc::setxattr(cs.as_ptr(), n.as_ptr(), b"v1".as_ptr().cast(), 2, libc::XATTR_CREATE), 0);
        assert_eq!(libc::setxattr(cs.as_ptr(), n.as_ptr(), b"v2".as_ptr().cast(), 2, libc::XATTR_CREATE), -1);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::EEXIST));
        let mut small = [0u8; 1];
        assert_eq!(libc::getxattr(cs.as_ptr(), n.as_ptr(), small.as_mut_ptr().cast(), 1), -1);
        assert_eq!(std::io::Error::last_os_error().raw_os_error(), Some(libc::ERANGE));
        assert_eq!(libc::getxattr(cs.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0), 2);
    }
    // toughness: the mount default is in force; directory default is inherited
    assert_eq!(getx(&f, "user.iomfs.toughness").as_deref(), Some("atomic"));
    let d = m.join("d");
    fs::create_dir(&d).unwrap();
    must(&format!("setfattr -n user.iomfs.toughness -v durable '{}'", d.display()));
    fs::write(d.join("in"), b"y").unwrap();
    fs::create_dir(d.join("sub")).unwrap();
    fs::write(d.join("sub/deep"), b"z").unwrap();
    assert_eq!(getx(&d.join("in"), "user.iomfs.toughness").as_deref(), Some("durable"));
    assert_eq!(getx(&d.join("sub/deep"), "user.iomfs.toughness").as_deref(), Some("durable"));
    must(&format!("setfattr -n user.iomfs.toughness -v fast '{}'", d.join("in").display()));
    assert_eq!(getx(&d.join("in"), "user.iomfs.toughness").as_deref(), Some("fast"));
    let (ok, out) = sh(&format!("setfattr -n user.iomfs.toughness -v bogus '{}'", d.join("in").display()));
    assert!(!ok && out.contains("Invalid argument"), "{out}");
    assert_eq!(
        getx(&d.join("in"), "user.iomfs.toughness").as_deref(),
        Some("fast"),
        "a refused value changed the level"
    );
    // writes at every level work and read back
    for (name, t) in [("wf", "fast"), ("wa", "atomic"), ("wd", "durable")] {
        let p = m.join(name);
        fs::write(&p, b"").unwrap();
        must(&format!("setfattr -n user.iomfs.toughness -v {t} '{}'", p.display()));
        let data: Vec<u8> = Rng(t.len() as u64).bytes(300_000);
        fs::write(&p, &data).unwrap();
        assert_eq!(fs::read(&p).unwrap(), data);
    }
    // the layout xattr is read-only and names object, block size and IOMs
    let l = getx(&f, "user.iomfs.layout").unwrap();
    assert!(l.contains("object=") && l.contains("block_size=65536") && l.contains("parity_iom="), "{l}");
    let (ok, _) = sh(&format!("setfattr -n user.iomfs.layout -v x '{}'", f.display()));
    assert!(!ok);
    // a mount with another default
    let m2 = c.mount("mnt2", &["toughness=durable"]);
    assert_eq!(getx(&m2.join("f"), "user.iomfs.toughness").as_deref(), Some("durable"));
    assert_eq!(getx(&m2.join("d/in"), "user.iomfs.toughness").as_deref(), Some("fast"));
    // statfs reports real capacity
    let st = nix_statvfs(&m);
    assert!(st.0 > 0 && st.1 > 0 && st.1 <= st.0, "statfs {st:?}");
    c.must_scrub_clean();
}

fn nix_statvfs(p: &Path) -> (u64, u64) {
    let cs = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(cs.as_ptr(), &mut s) }, 0);
    (s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize)
}

#[test]
fn two_mounts_see_each_other_close_to_open() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let a = c.mount("a", &[]);
    let b = c.mount("b", &[]);
    fs::write(a.join("shared"), b"version one").unwrap();
    assert_eq!(fs::read(b.join("shared")).unwrap(), b"version one");
    // rewrite and grow on A, close; B's open sees all of it
    let data: Vec<u8> = Rng(5).bytes(1_000_000);
    fs::write(a.join("shared"), &data).unwrap();
    assert_eq!(fs::read(b.join("shared")).unwrap(), data, "B did not see A's closed file whole");
    // B appends; A sees it on open
    let mut f = OpenOptions::new().append(true).open(b.join("shared")).unwrap();
    f.write_all(b"+tail").unwrap();
    drop(f);
    let back = fs::read(a.join("shared")).unwrap();
    assert_eq!(back.len(), data.len() + 5);
    assert_eq!(&back[data.len()..], b"+tail");
    // rename and unlink on A are seen by B (after the entry cache time)
    fs::rename(a.join("shared"), a.join("renamed")).unwrap();
    fs::write(a.join("doomed"), b"x").unwrap();
    assert!(b.join("doomed").exists());
    fs::remove_file(a.join("doomed")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!b.join("shared").exists(), "B still sees the old name after A's rename");
    assert!(b.join("renamed").exists());
    assert!(!b.join("doomed").exists(), "B still sees a file A unlinked");
    c.must_scrub_clean();
}

#[test]
fn lookups_from_a_directory_listing_follow_changes() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let a = c.mount("a", &[]);
    let b = c.mount("b", &[]);
    fs::create_dir(a.join("d")).unwrap();
    for i in 0..40 {
        fs::write(a.join(format!("d/f{i}")), format!("{i}")).unwrap();
    }
    // A run of lookups on B, which never saw these names: B lists the directory.
    for i in 0..40 {
        assert!(b.join(format!("d/f{i}")).exists(), "B does not see d/f{i}");
    }
    // B's own changes are seen by B at once.
    fs::remove_file(b.join("d/f10")).unwrap();
    assert!(!b.join("d/f10").exists(), "B still finds a name it unlinked");
    fs::rename(b.join("d/f11"), b.join("d/g11")).unwrap();
    assert!(!b.join("d/f11").exists(), "B still finds the old name of a rename");
    assert_eq!(fs::read(b.join("d/g11")).unwrap(), b"11");
    fs::remove_file(b.join("d/f12")).unwrap();
    fs::write(b.join("d/f12"), b"new").unwrap();
    assert_eq!(fs::read(b.join("d/f12")).unwrap(), b"new");
    // A's changes reach B within the entry time.
    fs::remove_file(a.join("d/f20")).unwrap();
    fs::rename(a.join("d/f21"), a.join("d/g21")).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!b.join("d/f20").exists(), "B still sees a file A unlinked");
    assert!(!b.join("d/f21").exists(), "B still sees the old name of A's rename");
    assert_eq!(fs::read(b.join("d/g21")).unwrap(), b"21");
    for i in 30..40 {
        assert_eq!(fs::read(b.join(format!("d/f{i}"))).unwrap(), format!("{i}").as_bytes());
    }
    // Names a fresh listing lacks are answered absent by B; B's own
    // creations (file, directory, symlink, hard link, rename target) are
    // found at once, and A's creations once the entry time has passed.
    for i in 0..20 {
        assert!(!b.join(format!("d/new{i}")).exists());
    }
    fs::write(b.join("d/new0"), b"n0").unwrap();
    fs::create_dir(b.join("d/new1")).unwrap();
    std::os::unix::fs::symlink("new0", b.join("d/new2")).unwrap();
    fs::hard_link(b.join("d/new0"), b.join("d/new3")).unwrap();
    fs::rename(b.join("d/f30"), b.join("d/new4")).unwrap();
    assert_eq!(fs::read(b.join("d/new0")).unwrap(), b"n0");
    assert!(b.join("d/new1").is_dir());
    assert_eq!(fs::read(b.join("d/new2")).unwrap(), b"n0", "symlink not found");
    assert_eq!(fs::read(b.join("d/new3")).unwrap(), b"n0", "hard link not found");
    assert_eq!(fs::read(b.join("d/new4")).unwrap(), b"30", "rename target not found");
    assert!(!b.join("d/f30").exists());
    // A create that fails (the name exists) leaves nothing stale behind.
    assert!(fs::create_dir(b.join("d/new1")).is_err());
    assert!(b.join("d/new1").is_dir());
    fs::write(a.join("d/froma"), b"a").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fs::read(b.join("d/froma")).unwrap(), b"a", "B does not see A's new file after the entry time");
}

#[test]
fn times_set_on_an_open_file_are_published_on_close() {
    use std::os::unix::fs::MetadataExt;
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let a = c.mount("a", &[]);
    let b = c.mount("b", &[]);
    let p = a.join("timed");
    let f = OpenOptions::new().create(true).write(true).truncate(true).open(&p).unwrap();
    (&f).write_all(b"some bytes").unwrap();
    let t = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
    f.set_times(fs::FileTimes::new().set_accessed(t).set_modified(t)).unwrap();
    // Seen at once through this mount, while the file is still open.
    let m = fs::metadata(&p).unwrap();
    assert_eq!((m.mtime(), m.atime()), (1_000_000_000, 1_000_000_000));
    assert!(m.ctime() > 1_000_000_000, "ctime not updated by utimens");
    drop(f);
    // Published with the size on close: another mount sees both.
    let m = fs::metadata(b.join("timed")).unwrap();
    assert_eq!((m.len(), m.mtime(), m.atime()), (10, 1_000_000_000, 1_000_000_000));
    // A write after the times were set gives the file a new mtime.
    let f = OpenOptions::new().write(true).open(&p).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(t)).unwrap();
    (&f).write_all(b"X").unwrap();
    drop(f);
    std::thread::sleep(Duration::from_millis(1100));
    let m = fs::metadata(b.join("timed")).unwrap();
    assert!(m.mtime() > 1_000_000_000, "a write after utimens kept the old mtime");
    assert_eq!(fs::read(b.join("timed")).unwrap(), b"Xome bytes");
}

#[test]
fn local_cluster_stop_and_start_keeps_everything() {
    let _g = serial();
    let tmp = tempfile::Builder::new().prefix("iomfs-local-").tempdir_in(integration::test_root()).unwrap();
    let dir = tmp.path().join("cluster");
    let mnt = tmp.path().join("mnt");
    let iomfs = integration::bin("iomfs");
    struct Down<'a>(&'a Path, &'a Path, &'a Path);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = Command::new(self.0).args(["local", "stop", "--dir"]).arg(self.1).output();
            if integration::is_mounted(self.2) {
                integration::unmount(self.2);
            }
        }
    }
    let _down = Down(&iomfs, &dir, &mnt);
    let local_up = || {
        let o = Command::new(&iomfs)
            .args(["local", "--dir"])
            .arg(&dir)
            .arg("--mount")
            .arg(&mnt)
            .arg("--detach")
            .output()
            .unwrap();
        assert!(o.status.success(), "iomfs local: {}", String::from_utf8_lossy(&o.stderr));
        assert!(integration::is_mounted(&mnt));
    };
    local_up();
    fs::create_dir(mnt.join("d")).unwrap();
    let data: Vec<u8> = Rng(77).bytes(5_000_000);
    fs::write(mnt.join("d/file"), &data).unwrap();
    std::os::unix::fs::symlink("file", mnt.join("d/link")).unwrap();
    must(&format!("setfattr -n user.iomfs.toughness -v durable '{}'", mnt.join("d").display()));
    let st = Command::new(&iomfs).args(["status", "--dir"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&st.stdout);
    assert!(st.status.success() && text.contains("cluster: healthy"), "{text}");
    assert_eq!(text.lines().filter(|l| l.starts_with("IOM ")).count(), 5, "{text}");
    let o = Command::new(&iomfs).args(["local", "stop", "--dir"]).arg(&dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!integration::is_mounted(&mnt), "still mounted after local stop");
    let st = Command::new(&iomfs).args(["status", "--dir"]).arg(&dir).output().unwrap();
    assert!(!st.status.success(), "status says healthy with every IOM stopped");
    local_up();
    assert_eq!(fs::read(mnt.join("d/file")).unwrap(), data);
    assert_eq!(fs::read_link(mnt.join("d/link")).unwrap(), Path::new("file"));
    assert_eq!(getx(&mnt.join("d"), "user.iomfs.toughness").as_deref(), Some("durable"));
    let o = Command::new(&iomfs).args(["scrub", "--dir"]).arg(&dir).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

/// Deleted files give their blocks back: at once when nobody has them open
/// (dropped in batches by the namespace), after the last close otherwise
/// (closes reported in batches too).
#[test]
fn deleted_files_give_their_blocks_back_after_the_last_close() {
    let _g = serial();
    let (c, m) = up();
    let kept = Rng(3).bytes(1 << 20);
    fs::write(m.join("kept"), &kept).unwrap();
    let baseline = c.scrubbed_blocks();
    for i in 0..20 {
        fs::write(m.join(format!("gone{i}")), Rng(i).bytes(300_000)).unwrap();
    }
    let open_data = Rng(99).bytes(2 << 20);
    fs::write(m.join("open"), &open_data).unwrap();
    let mut f = File::open(m.join("open")).unwrap();
    for i in 0..20 {
        fs::remove_file(m.join(format!("gone{i}"))).unwrap();
    }
    fs::remove_file(m.join("open")).unwrap();
    let wait_for = |want: &dyn Fn(u64) -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let n = c.scrubbed_blocks();
            if want(n) {
                return n;
            }
            assert!(std::time::Instant::now() < deadline, "block count stuck at {n} (baseline {baseline})");
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    // The unlinked files nobody holds are dropped; the open one is kept.
    let with_open = wait_for(&|n| n < baseline + 2 * 32);
    assert!(with_open > baseline, "the open, unlinked file lost its blocks ({with_open} <= {baseline})");
    let mut back = Vec::new();
    f.read_to_end(&mut back).unwrap();
    assert!(back == open_data, "the open, unlinked file reads back wrong");
    drop(f);
    wait_for(&|n| n == baseline);
    assert!(fs::read(m.join("kept")).unwrap() == kept);
}

/// A mount point whose path holds characters `/proc/mounts` escapes (a
/// space is `\040` there, a backslash `\134`) mounts, serves and unmounts.
#[test]
fn a_mount_point_with_a_space_and_a_backslash_works() {
    let _g = serial();
    let mut c = Cluster::init(5);
    c.start_all();
    let m = c.mount("m x\\y", &[]);
    assert!(integration::is_mounted(&m), "not reported as mounted");
    let data = Rng(8).bytes(200_000);
    fs::write(m.join("f"), &data).unwrap();
    assert!(fs::read(m.join("f")).unwrap() == data);
    assert!(fs_client::mount::fusermount_u(&m), "unmount failed");
    assert!(!integration::is_mounted(&m), "still reported as mounted after unmount");
}

/// Writes `chunk` to a new file `p` again and again until a write fails
/// (at most 200 MiB: the tests' disks are smaller); the bytes acknowledged
/// and the error.
fn fill_until_error(p: &Path, chunk: &[u8]) -> (usize, std::io::Error) {
    let mut f = File::create(p).unwrap();
    let mut acked = 0usize;
    loop {
        match f.write_all(chunk) {
            Ok(()) => acked += chunk.len(),
            Err(e) => return (acked, e),
        }
        assert!(acked < 200 << 20, "wrote 200 MiB into a smaller disk without an error");
    }
}

/// Writes `data` to `p` once the disk has room again: ENOSPC is retried
/// for up to 15 s (deletes free their space in the background); any other
/// error, or ENOSPC past that, fails with `what`.
fn write_once_room_is_back(p: &Path, data: &[u8], what: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        match fs::write(p, data) {
            Ok(()) => return,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// A real full disk: a 3-IOM cluster on a 96 MiB tmpfs. A writer that
/// fills it gets ENOSPC (not EIO, and at once, not after a stall); what
/// was written before reads right; an unlink works at 100 % full; the space
/// comes back and writing works again; the cluster stays healthy and the
/// scrub is clean. (Before: the parity IOM's pwrite failed, nobody was
/// answered, and the writer got EIO after 60 s.)
#[test]
fn a_full_disk_gives_enospc_and_deleting_makes_room_again() {
    let _g = serial();
    let disk = integration::Tmpfs::new(96);
    let mut c = Cluster::init_at(disk.path(), 3, &[]);
    c.start_all();
    let m = c.mount("mnt", &[]);
    let early = Rng(31).bytes(8 << 20);
    fs::write(m.join("early"), &early).unwrap();

    let t = std::time::Instant::now();
    let chunk = Rng(32).bytes(1 << 20);
    let (acked, err) = fill_until_error(&m.join("fill"), &chunk);
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "a full disk gave {err} instead of ENOSPC");
    assert!(t.elapsed() < Duration::from_secs(20), "ENOSPC came only after {:?}", t.elapsed());
    // 96 MiB raw over 3 IOMs hold 64 MiB of data, less reserve, journals and
    // the 8 MiB file: 35-46 MiB fit here; far less means space is lost.
    assert!(acked >= 16 << 20, "only {acked} bytes fitted before ENOSPC");
    eprintln!("fitted {} MiB before ENOSPC", acked >> 20);
    let back = fs::read(m.join("fill")).unwrap();
    assert!(back.len() >= acked, "acknowledged bytes lost: {} < {acked}", back.len());
    for (i, piece) in back[..acked].chunks(1 << 20).enumerate() {
        assert!(piece == &chunk[..piece.len()], "MiB {i} of the filled file reads back wrong");
    }
    assert!(fs::read(m.join("early")).unwrap() == early, "a file written before the disk filled reads wrong");
    // The operator is told, although the cluster still serves.
    let st = c.iomfs(&["status"]);
    let text = String::from_utf8_lossy(&st.stdout).to_string();
    assert!(text.contains("warning: IOM") && text.contains("disk"), "status says nothing of the full disk:\n{text}");

    // At 100 % full an unlink works, and its space comes back.
    fs::remove_file(m.join("early")).unwrap();
    let again = Rng(33).bytes(4 << 20);
    write_once_room_is_back(&m.join("again"), &again, "writing after a delete freed space");
    assert!(fs::read(m.join("again")).unwrap() == again);
    let st = c.iomfs(&["status"]);
    assert!(st.status.success(), "not healthy after the disk filled:\n{}", String::from_utf8_lossy(&st.stdout));
    c.must_scrub_clean();
}

/// A burst of writes in flight at once into a nearly full disk: 3 IOMs on
/// one 96 MiB tmpfs, eight 2 MiB `atomic` writes at a time through the
/// client library. The burst gets ENOSPC; every IOM keeps running and the
/// cluster stays healthy; every write that succeeded reads back, the
/// refused ones left nothing behind (scrub clean); and once the object is
/// deleted the same disk takes writes again. The IOMs' logs are on the
/// same disk. Before parity slots were reserved at b1, the parity IOM
/// found no room at b8 and stopped itself (2 runs of 2, with 8 MiB
/// writes); before log lines
/// that cannot be written were dropped, a task that logged on the full
/// disk panicked and left a group's parity behind its data (scrub, about
/// 1 run in 3).
#[test]
fn a_burst_of_writes_into_a_nearly_full_disk_gets_enospc_and_every_iom_keeps_running() {
    let _g = serial();
    let disk = integration::Tmpfs::new(96);
    let mut c = Cluster::init_at(disk.path(), 3, &[]);
    c.start_all();
    let warnings = |c: &Cluster| -> String {
        (0..3)
            .map(|i| {
                let l = c.log(i);
                let w: Vec<&str> = l.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
                format!("IOM {i}: {} warnings, last:\n{}\n", w.len(), w[w.len().saturating_sub(8)..].join("\n"))
            })
            .collect()
    };
    const CHUNK: u64 = 2 << 20;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let client = rt.block_on(c.client());
    let chunk = bytes::Bytes::from(Rng(70).bytes(CHUNK as usize));
    let object = common::ObjectId(1 << 51);
    let (ok, err) = rt.block_on(async {
        let (mut ok, mut err) = (Vec::new(), None);
        for round in 0..32u64 {
            let writes = (0..8u64).map(|k| {
                let off = (round * 8 + k) * CHUNK;
                let w = client.write(object, off, chunk.clone(), common::Toughness::Atomic);
                async move { (off, w.await) }
            });
            for (off, r) in futures::future::join_all(writes).await {
                match r {
                    Ok(()) => ok.push(off),
                    Err(e) => err = Some(e),
                }
            }
            if err.is_some() {
                break;
            }
        }
        (ok, err)
    });
    let e = err.unwrap_or_else(|| panic!("512 MiB went into a 96 MiB disk without an error\n{}", warnings(&c)));
    for i in 0..3 {
        assert!(c.is_running(i), "IOM {i} stopped when the disk filled ({e}):\n{}", warnings(&c));
    }
    assert_eq!(e.errno(), libc::ENOSPC, "a full disk gave {e} instead of ENOSPC\n{}", warnings(&c));
    assert!(!ok.is_empty(), "no write succeeded before the disk was full");
    // A second burst into the full disk, of bigger writes: each is refused
    // with ENOSPC in good time (or, if it found room, reads back).
    let t = std::time::Instant::now();
    let big = bytes::Bytes::from(Rng(71).bytes(4 * CHUNK as usize));
    let again = rt.block_on(async {
        let writes = (0..8u64).map(|k| {
            let off = (64 + 4 * k) * CHUNK;
            let w = client.write(object, off, big.clone(), common::Toughness::Atomic);
            async move { (off, w.await) }
        });
        futures::future::join_all(writes).await
    });
    assert!(t.elapsed() < std::time::Duration::from_secs(10), "ENOSPC took {:?}\n{}", t.elapsed(), warnings(&c));
    let mut big_ok = Vec::new();
    for (off, r) in again {
        match r {
            Ok(()) => big_ok.push(off),
            Err(e) => assert_eq!(e.errno(), libc::ENOSPC, "a full disk gave {e} instead of ENOSPC\n{}", warnings(&c)),
        }
    }
    rt.block_on(async {
        for (offs, data) in [(&ok, &chunk), (&big_ok, &big)] {
            for off in offs {
                let got = client.read(object, *off, data.len()).await.unwrap();
                assert!(got == *data, "the write at {off} succeeded but reads back different bytes");
            }
        }
    });
    let st = c.iomfs(&["status"]);
    assert!(st.status.success(), "not healthy after the disk filled:\n{}", String::from_utf8_lossy(&st.stdout));
    c.must_scrub_clean();
    // The object deleted, the space comes back for new writes.
    rt.block_on(async {
        client.drop_object(object, common::GroupNo(0)).await.unwrap();
        let mut last = None;
        for _ in 0..50 {
            match client.write(object, 0, chunk.clone(), common::Toughness::Atomic).await {
                Ok(()) => return,
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        // Failed once in a full suite run (not reproduced alone): every
        // IOM's last lines and the cluster's view, to find out why.
        let tails: String = (0..3)
            .map(|i| {
                let l = c.log(i);
                let lines: Vec<&str> = l.lines().collect();
                format!("--- IOM {i}, last lines:\n{}\n", lines[lines.len().saturating_sub(40)..].join("\n"))
            })
            .collect();
        let st = c.iomfs(&["status"]);
        panic!(
            "no write succeeded within 10 s of freeing the disk: {last:?}\n{}{tails}--- iomfs status:\n{}",
            warnings(&c),
            String::from_utf8_lossy(&st.stdout)
        );
    });
    client.close();
}

#[test]
fn fsck_finds_an_orphan_object_and_repair_gives_its_blocks_back() {
    let _g = serial();
    let (c, m) = up();
    must(&format!("cp -a /usr/share/doc/bash '{}/tree' 2>/dev/null || mkdir -p '{}/tree'", m.display(), m.display()));
    fs::write(m.join("tree/file"), Rng(61).bytes(300_000)).unwrap();
    let out = c.must_fsck_clean();
    assert!(out.contains("0 problems, 0 orphan objects"), "{out}");
    // Blocks of an object no file refers to (as a crash between a data
    // write and its create could leave): fsck names it, --repair frees it.
    let orphan = common::ObjectId(1 << 50);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let client = c.client().await;
        client
            .write(orphan, 0, bytes::Bytes::from(Rng(62).bytes(512 * 1024)), common::Toughness::Durable)
            .await
            .unwrap();
        client.close();
    });
    let o = c.iomfs(&["fsck"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(!o.status.success(), "fsck passed over an orphan object:\n{text}");
    assert!(text.contains(&format!("orphan: object {orphan} (8 blocks)")), "{text}");
    let o = c.iomfs(&["fsck", "--repair"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "fsck --repair left problems:\n{text}");
    c.must_fsck_clean();
    c.must_scrub_clean();
}

/// A child process and its process group, killed when dropped (also
/// when the test fails).
struct Group(std::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: signalling the child's own process group.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// SIGTERM ends an IOM while a writer runs through the mount, and then
/// the mount itself, each within a bounded time and with every task
/// joined: the IOM's tiers stop in order with no task left
/// (`task still running at stop` never logged), the mount's workers and
/// request tasks are joined (`stopped cleanly: every task joined`), and
/// the mount point is gone. The writer never sees an error; the stopped
/// IOM comes back and the cluster scrubs clean.
#[test]
fn sigterm_stops_an_iom_and_a_mount_in_bounded_time_with_every_task_joined() {
    let _g = serial();
    let (mut c, m) = up();
    // The writer in its own process group, so it and its `dd` end together.
    let mut writer = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "i=0; while [ $i -lt 100000 ]; do dd if=/dev/zero of={m}/f$((i % 16)) bs=64k count=8 conv=fsync 2>/dev/null \
             || exit 1; i=$((i+1)); done",
            m = m.display()
        ))
        .process_group(0)
        .spawn()
        .map(Group)
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let t = std::time::Instant::now();
    assert!(c.stop(2), "IOM 2 did not stop cleanly on SIGTERM:\n{}", c.log(2));
    let took = t.elapsed();
    let log = c.log(2);
    assert!(took < Duration::from_secs(8), "IOM 2 took {took:?} to stop:\n{log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(!log.contains("task still running at stop"), "a task of IOM 2 outlived its tier:\n{log}");
    // The writer goes on through the stand-in.
    std::thread::sleep(Duration::from_secs(2));
    assert!(writer.0.try_wait().unwrap().is_none(), "the writer failed while IOM 2 was stopped");
    drop(writer);
    std::thread::sleep(Duration::from_millis(200));
    let pid = mount_pid(&m);
    let t = std::time::Instant::now();
    // SAFETY: signalling the mount process found above.
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(t.elapsed() < Duration::from_secs(15), "the mount process did not end within 15 s of SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!integration::is_mounted(&m), "still mounted after the mount process ended");
    let mlog = fs::read_to_string(fs_client::mount::mount_log(&c.dir, &m)).unwrap_or_default();
    assert!(mlog.contains("stopped cleanly: every task joined"), "mount log:\n{mlog}");
    c.start(2);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !String::from_utf8_lossy(&c.iomfs(&["status"]).stdout).contains("cluster: healthy") {
        assert!(std::time::Instant::now() < deadline, "not healthy again after IOM 2 restarted");
        std::thread::sleep(Duration::from_millis(250));
    }
    c.must_scrub_clean();
}

/// Writes, truncates and chowns drop setuid, setgid and file capabilities
/// as Linux does on a local filesystem: a write or truncate by a user
/// without CAP_FSETID clears setuid, and setgid when the group may
/// execute; one by root keeps them; a chown clears them whoever calls it;
/// any write drops `security.capability`. (With FUSE_HANDLE_KILLPRIV_V2
/// the client does this itself, so the kernel need not ask for the
/// capability xattr before every write.)
#[test]
fn writes_truncates_and_chowns_drop_setuid_setgid_and_capabilities() {
    let _g = serial();
    let (_c, m) = up();
    let f = |n: &str| m.join(n);
    let mode = |n: &str| fs::metadata(f(n)).unwrap().permissions().mode() & 0o7777;
    let nobody = |cmd: &str| must(&format!("setpriv --reuid=65534 --regid=65534 --clear-groups sh -c '{cmd}'"));
    let make = |n: &str, perm: u32| {
        fs::write(f(n), b"0123456789").unwrap();
        fs::set_permissions(f(n), fs::Permissions::from_mode(perm)).unwrap();
        assert_eq!(mode(n), perm);
    };
    make("w-user", 0o6777);
    nobody(&format!("printf x >> {}", f("w-user").display()));
    assert_eq!(mode("w-user"), 0o0777, "a write by a user kept setuid/setgid");
    make("w-user-sgid-noexec", 0o2767);
    nobody(&format!("printf x >> {}", f("w-user-sgid-noexec").display()));
    assert_eq!(mode("w-user-sgid-noexec"), 0o2767, "setgid without group execute is not a privilege");
    make("w-root", 0o6777);
    must(&format!("printf x >> {}", f("w-root").display()));
    assert_eq!(mode("w-root"), 0o6777, "a write by root dropped setuid/setgid");
    make("t-user", 0o4777);
    nobody(&format!("truncate -s 3 {}", f("t-user").display()));
    assert_eq!(mode("t-user"), 0o0777, "a truncate by a user kept setuid");
    make("t-root", 0o4777);
    must(&format!("truncate -s 3 {}", f("t-root").display()));
    assert_eq!(mode("t-root"), 0o4777, "a truncate by root dropped setuid");
    make("chown", 0o6755);
    std::os::unix::fs::chown(f("chown"), Some(65534), None).unwrap();
    assert_eq!(mode("chown"), 0o0755, "a chown kept setuid/setgid");
    make("caps", 0o0755);
    must(&format!("setcap cap_net_raw+ep {}", f("caps").display()));
    assert!(must(&format!("getcap {}", f("caps").display())).contains("cap_net_raw"));
    must(&format!("printf x >> {}", f("caps").display()));
    let left = must(&format!("getcap {}", f("caps").display()));
    assert!(!left.contains("cap_net_raw"), "a write kept the file's capabilities: {left}");
    assert_eq!(fs::read(f("w-user")).unwrap(), b"0123456789x");
    assert_eq!(fs::read(f("t-user")).unwrap(), b"012");
}

/// A disk left with no free byte at all (another tenant of the filesystem
/// took the rest): once data is deleted, the slots it frees go back to
/// the filesystem, so the journals can grow and the writes that follow
/// succeed for as long as they fit. Before, freed slots stayed allocated
/// inside the block file: once a journal had used the room it had filled
/// ahead, every write was refused with ENOSPC for good (what made the
/// full-disk test above fail now and then).
#[test]
fn space_freed_on_a_disk_with_no_free_byte_comes_back_for_new_writes() {
    let _g = serial();
    let disk = integration::Tmpfs::new(96);
    let mut c = Cluster::init_at(disk.path(), 3, &[]);
    c.start_all();
    const CHUNK: u64 = 2 << 20;
    const BS: usize = 65536;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let client = rt.block_on(c.client());
    let object = common::ObjectId(1 << 51);
    let chunk = |k: u64| bytes::Bytes::from(Rng(80 + k).bytes(CHUNK as usize));
    rt.block_on(async {
        let mut off = 0;
        let e = loop {
            match client.write(object, off, chunk(0), common::Toughness::Atomic).await {
                Ok(()) => off += CHUNK,
                Err(e) => break e,
            }
            assert!(off < 512 << 20, "512 MiB went into a 96 MiB disk without an error");
        };
        assert_eq!(e.errno(), libc::ENOSPC, "a full disk gave {e}");
    });
    // Another tenant takes every byte left.
    let mut filler = File::create(disk.path().join("filler")).unwrap();
    let block = vec![7u8; 64 << 10];
    while filler.write_all(&block).is_ok() {}
    let _ = filler.sync_all();
    rt.block_on(async {
        client.drop_object(object, common::GroupNo(0)).await.unwrap();
        // Overwrites of single blocks in 16 MiB, over and over, 16 at a
        // time: each frees what the one before it took, but every one adds
        // journal records (about 5 MiB on each IOM in all).
        let t = std::time::Instant::now();
        let block = |k: u64| bytes::Bytes::from(vec![(k % 251) as u8; BS]);
        let tasks = (0..16u64).map(|w| {
            let client = &client;
            async move {
                for r in 0..1000u64 {
                    let k = r * 16 + w;
                    let off = (k % 256) * BS as u64;
                    let mut tries = 0;
                    while let Err(e) = client.write(object, off, block(k), common::Toughness::Atomic).await {
                        tries += 1;
                        if tries == 25 {
                            return Err(format!("write {k} refused for 5 s ({:?} in): {e}", t.elapsed()));
                        }
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Ok(())
            }
        });
        for r in futures::future::join_all(tasks).await {
            if let Err(e) = r {
                panic!("{e}\n{}", (0..3).map(|i| c.log(i)).collect::<Vec<_>>().join("\n----\n"));
            }
        }
        eprintln!("16000 overwrites in {:?}", t.elapsed());
        for k in 15744..16000u64 {
            let got = client.read(object, (k % 256) * BS as u64, BS).await.unwrap();
            assert!(got == block(k), "the last write of block {} reads back different bytes", k % 256);
        }
    });
    client.close();
    c.must_scrub_clean();
}

/// Metadata alone filling a full disk: 3 IOMs on a 64 MiB tmpfs filled
/// with file data until ENOSPC, then files created with 3 KB xattrs each.
/// The creates must get ENOSPC promptly while the reserve is left, every
/// IOM keeps running, deletes work, and once a file is deleted creates
/// work again. Before, the namespace took creates into the reserve until
/// its journal's write failed: the namespace home stopped itself after
/// about 1 300 files, no other IOM could keep its vote on the full disk to
/// fail over, and every request got EIO after two minutes, `rm` included.
#[test]
fn creates_on_a_full_disk_get_enospc_and_the_namespace_keeps_serving() {
    let _g = serial();
    let disk = integration::Tmpfs::new(64);
    let mut c = Cluster::init_at(disk.path(), 3, &[]);
    c.start_all();
    let m = c.mount("mnt", &[]);
    fs::create_dir(m.join("d")).unwrap();
    let (_, err) = fill_until_error(&m.join("fill"), &Rng(95).bytes(1 << 20));
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "filling the disk gave {err}");
    let value = vec![b'a'; 3000];
    let name = std::ffi::CString::new("user.big").unwrap();
    let t = std::time::Instant::now();
    let mut made = 0;
    let err = loop {
        let p = m.join(format!("d/m{made}"));
        let r = File::create(&p).and_then(|_| {
            let cp = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: valid C strings and a buffer of the length given.
            let rc = unsafe { libc::setxattr(cp.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
        match r {
            Ok(()) => made += 1,
            Err(e) => break e,
        }
        assert!(made < 20_000, "20 000 files with 3 KB xattrs went into a full 64 MiB disk");
    };
    eprintln!("{made} files created before {err} in {:?}", t.elapsed());
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "a create on a full disk gave {err} after {made} files");
    assert!(t.elapsed() < Duration::from_secs(30), "ENOSPC came only after {:?}", t.elapsed());
    for i in 0..3 {
        assert!(c.is_running(i), "IOM {i} stopped when metadata filled the disk:\n{}", c.log(i));
    }
    // Deletes work, and make room for creates again.
    fs::remove_dir_all(m.join("d")).unwrap();
    fs::remove_file(m.join("fill")).unwrap();
    write_once_room_is_back(&m.join("after"), b"room again", "a create after deleting");
    let st = c.iomfs(&["status"]);
    assert!(
        st.status.success(),
        "not healthy after metadata filled the disk:\n{}",
        String::from_utf8_lossy(&st.stdout)
    );
    c.must_scrub_clean();
}

/// IOMs that start on a nearly full disk take what room there is as their
/// capacity; room made on the disk after their start (here: another
/// tenant's file deleted) must be used without a restart, as an operator
/// who frees or grows a filesystem expects. Before, each IOM's allocator
/// kept the capacity it saw at its start, and writes got ENOSPC for good.
#[test]
fn room_made_on_the_disk_after_the_ioms_started_is_used() {
    let _g = serial();
    let disk = integration::Tmpfs::new(96);
    let mut c = Cluster::init_at(disk.path(), 3, &[]);
    // Another tenant takes all but 6 MiB before the IOMs start.
    let mut ballast = File::create(disk.path().join("ballast")).unwrap();
    let block = vec![7u8; 1 << 20];
    while ballast.write_all(&block).is_ok() {}
    drop(ballast);
    let len = fs::metadata(disk.path().join("ballast")).unwrap().len();
    let f = OpenOptions::new().write(true).open(disk.path().join("ballast")).unwrap();
    f.set_len(len.saturating_sub(6 << 20)).unwrap();
    drop(f);
    c.start_all();
    let m = c.mount("mnt", &[]);
    // The tenant goes; 24 MiB of data (36 MiB with parity) must now fit.
    fs::remove_file(disk.path().join("ballast")).unwrap();
    let data = Rng(90).bytes(24 << 20);
    let mut f = File::create(m.join("big")).unwrap();
    for (i, piece) in data.chunks(1 << 20).enumerate() {
        if let Err(e) = f.write_all(piece) {
            panic!("MiB {i} refused after the disk had room again: {e}");
        }
    }
    f.sync_all().unwrap();
    drop(f);
    assert!(fs::read(m.join("big")).unwrap() == data, "the file reads back wrong");
    c.must_scrub_clean();
}
