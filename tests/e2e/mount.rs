//! `brickbox mount`: the real binary serving a real FUSE mount.
//!
//! Needs `/dev/fuse` and root (or `fusermount3`); the FUSE tests skip with a message otherwise.

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;

/// Whether this machine can mount FUSE file systems.
fn fuse_available() -> bool {
    if !Path::new("/dev/fuse").exists() {
        eprintln!("skipping: /dev/fuse does not exist");
        return false;
    }
    let has_fusermount =
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()));
    if !is_root() && !has_fusermount {
        eprintln!("skipping: not root and no fusermount3");
        return false;
    }
    true
}

/// Whether `path` (canonical) is a mount point according to the kernel.
fn is_mounted(path: &Path) -> bool {
    let text = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = path.to_str().unwrap();
    text.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

/// A `brickbox mount` running in the background; unmounted and stopped on drop.
struct Mount {
    child: Option<Child>,
    dir: PathBuf,
    stderr: PathBuf,
}

impl Mount {
    /// Starts `brickbox mount DIR ARGS` and waits until the file system answers.
    fn start(env: &Env, dir: &Path, extra: &[std::ffi::OsString]) -> Mount {
        let dir = fs::canonicalize(dir).unwrap();
        let stderr = env.path().join(format!("mount-{}.stderr", dir.file_name().unwrap().to_string_lossy()));
        let mut a = args!["mount", &dir];
        a.extend_from_slice(extra);
        let mut c = env.cmd(&a);
        c.stdout(Stdio::null()).stderr(File::create(&stderr).unwrap());
        let child = c.spawn().unwrap();
        let mut m = Mount { child: Some(child), dir, stderr };
        let start = Instant::now();
        loop {
            if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
                m.child = None;
                panic!("brickbox mount exited early ({status}): {}", m.stderr_text());
            }
            if is_mounted(&m.dir) && m.dir.join("versions").is_dir() {
                return m;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "mount not ready after 60 s: {}", m.stderr_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stderr_text(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Path of a version folder's copy of the absolute source path `src`.
    fn version_path(&self, folder: &str, src: &Path) -> PathBuf {
        self.dir.join("versions").join(folder).join(src.strip_prefix("/").unwrap())
    }

    /// Waits for the mount process to exit; returns its exit code.
    fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("mount process");
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            assert!(start.elapsed() < limit, "mount process still running after {limit:?}: {}", self.stderr_text());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("mount process").id() as i32;
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            // SAFETY: signalling our own child.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if child.try_wait().ok().flatten().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.dir) {
            let c = std::ffi::CString::new(self.dir.to_str().unwrap()).unwrap();
            // SAFETY: a valid path; detaching a mount this test made.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            let _ = std::process::Command::new("fusermount3").arg("-u").arg("-z").arg(&self.dir).output();
        }
    }
}

/// Folder names the mount gives versions (oldest first), from `versions --json` (newest first).
fn folder_names(env: &Env) -> Vec<String> {
    let mut vs = env.versions();
    vs.reverse();
    let mut names: Vec<String> = Vec::new();
    for v in vs {
        let ns = v["time_ns"].as_i64().unwrap();
        let base = chrono::DateTime::from_timestamp_nanos(ns).format("%Y-%m-%dT%H.%M.%S").to_string();
        let mut name = base.clone();
        let mut n = 2;
        while names.contains(&name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        names.push(name);
    }
    names
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// A small tree with a few kinds of entries and modes.
fn build_source(src: &Path) {
    fs::create_dir_all(src.join("docs/deep/er")).unwrap();
    fs::create_dir_all(src.join("empty")).unwrap();
    fs::write(src.join("docs/changing.txt"), b"state one\n").unwrap();
    fs::write(src.join("docs/other.txt"), text_bytes(11, 40_000)).unwrap();
    fs::write(src.join("docs/deep/er/steady.log"), text_bytes(12, 300_000)).unwrap();
    fs::write(src.join("empty.txt"), b"").unwrap();
    fs::write(src.join("private.key"), b"secret\n").unwrap();
    chmod(&src.join("private.key"), 0o600);
    fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    chmod(&src.join("run.sh"), 0o755);
    write_random(&src.join("big.bin"), 21, 3 * MIB + 777);
    std::os::unix::fs::symlink("docs/other.txt", src.join("link")).unwrap();
}

#[test]
fn mount_shows_every_version_and_file_history() {
    if !fuse_available() {
        return;
    }
    let env = Env::with_box();
    let src = env.mkdir("src");
    build_source(&src);
    stamp_mtimes(&src, 1_700_000_000_000_000_000);
    let mut snaps = vec![snapshot(&src, true)];
    env.backup(&args![&src]);

    // v2: one file changes, one is added, one removed.
    fs::write(src.join("docs/changing.txt"), b"state two, a little longer\n").unwrap();
    fs::write(src.join("added.txt"), b"new in v2\n").unwrap();
    fs::remove_file(src.join("empty.txt")).unwrap();
    set_mtime(&src.join("docs/changing.txt"), 1_710_000_000_123_456_789);
    set_mtime(&src.join("added.txt"), 1_710_000_001_987_654_321);
    snaps.push(snapshot(&src, true));
    env.backup(&args![&src]);

    // v3: only another file changes (the first one keeps its v2 state).
    fs::write(src.join("docs/other.txt"), text_bytes(13, 50_000)).unwrap();
    set_mtime(&src.join("docs/other.txt"), 1_720_000_000_000_000_000);
    snaps.push(snapshot(&src, true));
    env.backup(&args![&src]);

    let names = folder_names(&env);
    assert_eq!(names.len(), 3);
    let mnt = env.mkdir("mnt");
    let mut m = Mount::start(&env, &mnt, &[]);

    // versions/: one folder per version plus latest -> newest.
    let mut want: Vec<String> = names.clone();
    want.push("latest".into());
    want.sort();
    assert_eq!(listing(&m.dir.join("versions")), want);
    assert_eq!(fs::read_link(m.dir.join("versions/latest")).unwrap(), PathBuf::from(&names[2]));
    assert_eq!(listing(&m.dir), ["history", "versions"]);

    // Every entry of every version: kind, content, size, mode, owner, mtime, symlink target.
    for (name, snap) in names.iter().zip(&snaps) {
        let root = m.version_path(name, &src);
        let got = snapshot(&root, false);
        assert_snapshot_matches(snap, &src, &got, &root, Compare::ALL);
    }
    let latest_root = m.dir.join("versions/latest").join(src.strip_prefix("/").unwrap());
    assert_snapshot_matches(&snaps[2], &src, &snapshot(&latest_root, false), &latest_root, Compare::ALL);

    // history/: exactly the distinct states of each file, named like the version folders.
    let hist = m.dir.join("history").join(src.strip_prefix("/").unwrap());
    assert_eq!(listing(&hist.join("docs/changing.txt")), [names[0].clone(), names[1].clone()]);
    assert_eq!(listing(&hist.join("docs/other.txt")), [names[0].clone(), names[2].clone()]);
    assert_eq!(listing(&hist.join("docs/deep/er/steady.log")), [names[0].clone()]);
    assert_eq!(listing(&hist.join("added.txt")), [names[1].clone()]);
    assert_eq!(fs::read(hist.join("docs/changing.txt").join(&names[0])).unwrap(), b"state one\n");
    assert_eq!(fs::read(hist.join("docs/changing.txt").join(&names[1])).unwrap(), b"state two, a little longer\n");
    // history/ lists what any version had, so empty.txt (deleted in v2) is still there.
    assert_eq!(listing(&hist), ["added.txt", "big.bin", "docs", "empty", "empty.txt", "link", "private.key", "run.sh"]);
    assert_eq!(listing(&hist.join("empty.txt")), [names[0].clone()]);

    // It is read-only.
    let e = fs::write(m.version_path(&names[2], &src).join("added.txt"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    // `brickbox umount` ends the mount process cleanly.
    env.ok(&args!["umount", &m.dir]);
    assert_eq!(m.wait_exit(Duration::from_secs(20)), Some(0), "{}", m.stderr_text());
    assert!(!is_mounted(&m.dir));
    assert!(listing(&m.dir).is_empty());
}

#[test]
fn mount_reads_in_parallel_sees_new_versions_and_stops_on_sigterm() {
    if !fuse_available() {
        return;
    }
    let env = Env::with_box();
    let src = env.mkdir("src");
    let size = 24 * MIB + 4321;
    write_random(&src.join("big.bin"), 77, size);
    fs::write(src.join("note.txt"), b"version one\n").unwrap();
    env.backup(&args![&src]);
    let data = Arc::new(fs::read(src.join("big.bin")).unwrap());

    let mnt = env.mkdir("mnt");
    let mut m = Mount::start(&env, &mnt, &args!["--cache-size", "8MiB"]);
    let first = folder_names(&env)[0].clone();
    let big = m.version_path(&first, &src).join("big.bin");

    // Sequential read through the page cache, timed.
    let t = Instant::now();
    assert!(same_content(&src.join("big.bin"), &big), "sequential read differs");
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "mount: sequential read of {} MiB in {secs:.2} s ({:.0} MiB/s)",
        size / MIB,
        size as f64 / MIB as f64 / secs
    );

    // Eight threads reading random ranges (opened with O_DIRECT-free pread on separate fds).
    std::thread::scope(|s| {
        for t in 0..8u64 {
            let data = data.clone();
            let big = big.clone();
            s.spawn(move || {
                let f = File::open(&big).unwrap();
                let mut x = 0x9E37_79B9_7F4A_7C15u64.wrapping_mul(t + 1);
                for _ in 0..40 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = x % size;
                    let len = ((x >> 33) % (1 << 20)) as usize + 1;
                    let mut buf = vec![0u8; len];
                    let mut got = 0;
                    while got < len {
                        let n = f.read_at(&mut buf[got..], off + got as u64).unwrap();
                        if n == 0 {
                            break;
                        }
                        got += n;
                    }
                    let end = (off as usize + len).min(data.len());
                    assert_eq!(got, end - off as usize);
                    assert!(buf[..got] == data[off as usize..end], "thread {t}: bytes differ at {off}+{len}");
                }
            });
        }
    });

    // A second mount on the same directory is refused.
    let r = env.run(&args!["mount", &m.dir]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("already a mount point") || r.stderr.contains("not empty"), "{}", r.stderr);

    // A backup made while mounted shows up without remounting.
    fs::write(src.join("note.txt"), b"version two\n").unwrap();
    env.backup(&args![&src]);
    let names = folder_names(&env);
    assert_eq!(names.len(), 2);
    let start = Instant::now();
    loop {
        let l = listing(&m.dir.join("versions"));
        if l.contains(&names[1]) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(15), "new version not visible after 15 s: {l:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let start = Instant::now();
    while fs::read_link(m.dir.join("versions/latest")).unwrap() != Path::new(&names[1]) {
        assert!(start.elapsed() < Duration::from_secs(15), "latest does not point to the new version");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(fs::read(m.version_path(&names[1], &src).join("note.txt")).unwrap(), b"version two\n");
    assert_eq!(fs::read(m.version_path(&names[0], &src).join("note.txt")).unwrap(), b"version one\n");

    // SIGTERM unmounts and exits cleanly.
    m.signal(libc::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(20)), Some(0), "{}", m.stderr_text());
    assert!(!is_mounted(&m.dir), "still mounted after SIGTERM");
    assert!(listing(&m.dir).is_empty());
}

/// `cp -r` and `tar` copy a version out of the mount as it was backed up. A directory's
/// entries number in listing order (GNU cp reads a directory in inode order), and the copy
/// is served mostly by read-ahead.
#[test]
fn cp_and_tar_copy_a_version_out_of_the_mount_in_listing_order() {
    if !fuse_available() {
        return;
    }
    let env = Env::with_box();
    let src = env.mkdir("src");
    for d in 0..4u64 {
        let dir = src.join(format!("dir{d}"));
        fs::create_dir_all(dir.join("sub")).unwrap();
        for i in 0..25u64 {
            fs::write(dir.join(format!("f{i:02}.txt")), text_bytes(100 * d + i, 10_000 + 97 * i as usize)).unwrap();
        }
        fs::write(dir.join("sub/inner.txt"), text_bytes(900 + d, 5_000)).unwrap();
    }
    write_random(&src.join("dir2/large.bin"), 77, 3 * MIB + 5);
    std::os::unix::fs::symlink("dir0/f00.txt", src.join("link")).unwrap();
    env.backup(&args![&src]);
    let folder = folder_names(&env).pop().unwrap();
    let mnt = env.mkdir("mnt");
    let mut m = Mount::start(&env, &mnt, &args!["-v"]);
    let root = m.version_path(&folder, &src);

    // Inode numbers rise in listing order (names sorted bytewise).
    use std::os::unix::fs::DirEntryExt;
    let mut entries: Vec<(Vec<u8>, u64)> = fs::read_dir(root.join("dir1"))
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().into_encoded_bytes(), e.ino())
        })
        .collect();
    entries.sort();
    assert_eq!(entries.len(), 26);
    assert!(entries.windows(2).all(|w| w[0].1 < w[1].1), "not in listing order: {entries:?}");

    let copies = env.mkdir("copies");
    let cp = std::process::Command::new("cp").arg("-r").arg(&root).arg(copies.join("by-cp")).status().unwrap();
    assert!(cp.success());
    fs::create_dir(copies.join("by-tar")).unwrap();
    let tar = std::process::Command::new("sh")
        .arg("-c")
        .arg("tar -cf - -C \"$1\" . | tar -xf - -C \"$2\"")
        .arg("sh")
        .arg(&root)
        .arg(copies.join("by-tar"))
        .status()
        .unwrap();
    assert!(tar.success());
    for copy in ["by-cp", "by-tar"] {
        let copy = copies.join(copy);
        assert_eq!(walk(&src).len(), walk(&copy).len(), "{}", copy.display());
        for p in walk(&src) {
            let rel = p.strip_prefix(&src).unwrap();
            if p.is_symlink() {
                assert_eq!(fs::read_link(&p).unwrap(), fs::read_link(copy.join(rel)).unwrap());
            } else if p.is_file() {
                assert!(same_content(&p, &copy.join(rel)), "{} differs in {}", rel.display(), copy.display());
            }
        }
    }

    m.signal(libc::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(20)), Some(0));
    let text = m.stderr_text();
    let line = text.lines().find(|l| l.starts_with("blocks: ")).unwrap_or_else(|| panic!("no stats in: {text}"));
    let ahead: u64 = line
        .split(" by read-ahead")
        .next()
        .and_then(|head| head.rsplit('(').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no read-ahead count in: {line}"));
    assert!(ahead >= 80, "the copy was not read ahead: {line}");
}

#[test]
fn mount_refuses_unusable_mount_points() {
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::write(src.join("a.txt"), b"a").unwrap();
    env.backup(&args![&src]);

    let full = env.mkdir("full");
    fs::write(full.join("keep.txt"), b"do not hide me").unwrap();
    let r = env.run(&args!["mount", &full]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("is not empty"), "{}", r.stderr);
    assert_eq!(fs::read(full.join("keep.txt")).unwrap(), b"do not hide me");

    let r = env.run(&args!["mount", env.path().join("nowhere")]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("does not exist"), "{}", r.stderr);

    let r = env.run(&args!["mount", src.join("a.txt")]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not a directory"), "{}", r.stderr);

    let r = env.run(&args!["umount", &full]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("not mounted"), "{}", r.stderr);
}

/// The statistics line `brickbox -v mount` prints when it stops: (ranged reads, disk-cache hits,
/// blocks written to the disk cache).
fn mount_stats(stderr: &str) -> (u64, u64, u64) {
    let line = stderr.lines().find(|l| l.starts_with("blocks: ")).unwrap_or_else(|| panic!("no stats in: {stderr}"));
    let num_before = |what: &str| -> u64 {
        let head = &line[..line.find(what).unwrap_or_else(|| panic!("no '{what}' in: {line}"))];
        head.trim_end().rsplit(' ').next().unwrap().trim_start_matches('(').parse().unwrap()
    };
    (num_before(" ranged reads"), num_before(" from the disk cache"), num_before(" written to it"))
}

/// Reads every regular file below `root` (through the mount) and compares it with `src`.
fn assert_reads_like(src: &Path, root: &Path) {
    for p in walk(src) {
        if p.is_file() {
            let rel = p.strip_prefix(src).unwrap();
            assert!(same_content(&p, &root.join(rel)), "{} differs through the mount", rel.display());
        }
    }
}

#[test]
fn mount_disk_cache_serves_a_remount_without_the_box_and_o_options() {
    if !fuse_available() {
        return;
    }
    let env = Env::with_box();
    let src = env.mkdir("src");
    write_random(&src.join("big.bin"), 5, 6 * MIB + 123);
    fs::create_dir(src.join("docs")).unwrap();
    for i in 0..20 {
        fs::write(src.join(format!("docs/note-{i}.txt")), format!("PLAINTEXT-MARKER note {i}\n").repeat(50)).unwrap();
    }
    env.backup(&args![&src]);
    let folder = folder_names(&env).pop().unwrap();
    let cache = env.path().join("dcache");

    // Unsafe, unknown and malformed -o options are refused before anything is mounted.
    let mnt = env.mkdir("mnt");
    for (opt, why) in
        [("rw", "read-only"), ("suid", "unsafe"), ("dev", "unsafe"), ("max_read=1", "unknown mount option")]
    {
        let r = env.run(&args!["mount", &mnt, "-o", opt]);
        assert_eq!(r.code, 1, "-o {opt}: {r:?}");
        assert!(r.stderr.contains(why) && r.stderr.contains(opt), "-o {opt}: {}", r.stderr);
    }

    // First mount: reads fill the disk cache; -o options reach the mount table.
    let mut m = Mount::start(&env, &mnt, &args!["-v", "--disk-cache", &cache, "-o", "fsname=bb-e2e,allow_root"]);
    let table = fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = table.lines().find(|l| l.split(' ').nth(4) == m.dir.to_str()).expect("mount table line");
    assert!(line.contains(" - fuse") && line.contains(" bb-e2e "), "{line}");
    assert_reads_like(&src, &m.version_path(&folder, &src));
    m.signal(libc::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(20)), Some(0));
    let (reads, _, written) = mount_stats(&m.stderr_text());
    assert!(reads > 0 && written > 0, "{}", m.stderr_text());

    // The cache holds only sealed bytes: no plaintext of the files.
    let cached = walk(&cache).into_iter().filter(|p| p.is_file()).collect::<Vec<_>>();
    assert!(cached.len() as u64 >= written, "{cached:?}");
    for p in &cached {
        let bytes = fs::read(p).unwrap();
        assert!(!bytes.windows(16).any(|w| w == b"PLAINTEXT-MARKER"), "plaintext in {}", p.display());
    }

    // Second mount with the box's data volumes gone: everything still reads, from the cache.
    let data = env.repo.join("data");
    let away = env.path().join("data-away");
    fs::rename(&data, &away).unwrap();
    let mut m = Mount::start(&env, &mnt, &args!["-v", "--disk-cache", &cache]);
    assert_reads_like(&src, &m.version_path(&folder, &src));
    m.signal(libc::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(20)), Some(0));
    let (reads, hits, _) = mount_stats(&m.stderr_text());
    assert_eq!(reads, 0, "a remount must not read the box: {}", m.stderr_text());
    assert!(hits > 0, "{}", m.stderr_text());
    fs::rename(&away, &data).unwrap();

    // A damaged cache file is caught by authentication and fetched again from the box.
    let biggest = cached.iter().max_by_key(|p| fs::metadata(p).unwrap().len()).unwrap();
    let mut bytes = fs::read(biggest).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    fs::write(biggest, bytes).unwrap();
    let mut m = Mount::start(&env, &mnt, &args!["-v", "--disk-cache", &cache]);
    assert_reads_like(&src, &m.version_path(&folder, &src));
    m.signal(libc::SIGTERM);
    assert_eq!(m.wait_exit(Duration::from_secs(20)), Some(0));
    let (reads, _, written) = mount_stats(&m.stderr_text());
    assert!(reads >= 1 && written >= 1, "the damaged block must be fetched again: {}", m.stderr_text());
}

#[test]
fn mount_history_keeps_deleted_paths_shares_hard_link_inodes_and_filters_versions() {
    if !fuse_available() {
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let env = Env::with_box();
    let src = env.mkdir("src");
    fs::create_dir_all(src.join("docs")).unwrap();
    fs::create_dir_all(src.join("olddir/sub")).unwrap();
    fs::create_dir_all(src.join("other")).unwrap();
    fs::write(src.join("docs/keep.txt"), b"keep v1\n").unwrap();
    fs::write(src.join("docs/gone.txt"), b"deleted after v1\n").unwrap();
    fs::write(src.join("olddir/sub/inner.txt"), b"inner v1\n").unwrap();
    fs::write(src.join("docs/linked.txt"), b"one inode, three names\n").unwrap();
    fs::hard_link(src.join("docs/linked.txt"), src.join("docs/linked-too.txt")).unwrap();
    fs::hard_link(src.join("docs/linked.txt"), src.join("other/linked-far.txt")).unwrap();
    env.backup(&args![&src, "--tag", "daily"]);

    fs::write(src.join("docs/keep.txt"), b"keep v2, longer\n").unwrap();
    fs::remove_file(src.join("docs/gone.txt")).unwrap();
    fs::remove_dir_all(src.join("olddir")).unwrap();
    env.backup(&args![&src, "--tag", "weekly"]);

    fs::write(src.join("docs/keep.txt"), b"keep v3, longer still\n").unwrap();
    env.backup(&args![&src, "--tag", "daily"]);
    let names = folder_names(&env);
    assert_eq!(names.len(), 3);

    let mnt = env.mkdir("mnt");
    let mut m = Mount::start(&env, &mnt, &[]);
    let hist = m.dir.join("history").join(src.strip_prefix("/").unwrap());
    // Deleted files and directories are still in history/, with their states.
    assert_eq!(listing(&hist), ["docs", "olddir", "other"]);
    assert_eq!(
        listing(&hist.join("docs")),
        ["gone.txt", "keep.txt", "linked-too.txt", "linked.txt"],
        "history/ must list the union of all versions"
    );
    assert_eq!(listing(&hist.join("docs/gone.txt")), [names[0].clone()]);
    assert_eq!(fs::read(hist.join("docs/gone.txt").join(&names[0])).unwrap(), b"deleted after v1\n");
    assert_eq!(listing(&hist.join("olddir/sub/inner.txt")), [names[0].clone()]);
    assert_eq!(fs::read(hist.join("olddir/sub/inner.txt").join(&names[0])).unwrap(), b"inner v1\n");
    assert_eq!(listing(&hist.join("docs/keep.txt")), names);

    // Hard links of one version share an inode and count their names.
    let v = m.version_path(&names[2], &src);
    let a = fs::metadata(v.join("docs/linked.txt")).unwrap();
    let b = fs::metadata(v.join("docs/linked-too.txt")).unwrap();
    let c = fs::metadata(v.join("other/linked-far.txt")).unwrap();
    assert_eq!((a.ino(), a.nlink()), (b.ino(), 3));
    assert_eq!((c.ino(), c.nlink()), (a.ino(), 3));
    assert_eq!(fs::read(v.join("other/linked-far.txt")).unwrap(), b"one inode, three names\n");
    assert_eq!(fs::metadata(v.join("docs/keep.txt")).unwrap().nlink(), 1);
    let older = fs::metadata(m.version_path(&names[0], &src).join("docs/linked.txt")).unwrap();
    assert_ne!(older.ino(), a.ino(), "each version has its own inodes");
    env.ok(&args!["umount", &m.dir]);
    assert_eq!(m.wait_exit(Duration::from_secs(20)), Some(0));

    // --versions shows only the matching versions, in versions/ and in history/.
    let mut m = Mount::start(&env, &mnt, &args!["--versions", "tag:daily"]);
    assert_eq!(listing(&m.dir.join("versions")), [names[0].clone(), names[2].clone(), "latest".into()]);
    assert_eq!(fs::read_link(m.dir.join("versions/latest")).unwrap(), PathBuf::from(&names[2]));
    let hist = m.dir.join("history").join(src.strip_prefix("/").unwrap());
    assert_eq!(listing(&hist.join("docs/keep.txt")), [names[0].clone(), names[2].clone()]);
    env.ok(&args!["umount", &m.dir]);
    assert_eq!(m.wait_exit(Duration::from_secs(20)), Some(0));

    let mut m = Mount::start(&env, &mnt, &args!["--versions", &format!("path:{}/docs,last:1", src.display())]);
    assert_eq!(listing(&m.dir.join("versions")), [names[2].clone(), "latest".into()]);
    env.ok(&args!["umount", &m.dir]);
    assert_eq!(m.wait_exit(Duration::from_secs(20)), Some(0));

    // Filters that match nothing, or cannot be read, are errors.
    let r = env.run(&args!["mount", &mnt, "--versions", "tag:nope"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("no version matches") && r.stderr.contains("daily, weekly"), "{}", r.stderr);
    let r = env.run(&args!["mount", &mnt, "--versions", "colour:red"]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("unknown kind 'colour'") && r.stderr.contains("tag:T"), "{}", r.stderr);
    assert!(listing(&mnt).is_empty());
}

#[test]
fn mount_follows_blocks_that_a_compaction_moved() {
    if !fuse_available() {
        return;
    }
    let env = Env::with_box();
    let src = env.mkdir("src");
    write_random(&src.join("keep.bin"), 31, 2 * MIB + 99);
    write_random(&src.join("gone.bin"), 32, 6 * MIB);
    env.backup(&args![&src]);
    fs::remove_file(src.join("gone.bin")).unwrap();
    env.backup(&args![&src]);
    let newest = folder_names(&env)[1].clone();

    // Mounted before the compaction: the mount's catalog places keep.bin's blocks in the first
    // volume, which a compaction run elsewhere (another machine: another catalog) repacks and
    // deletes.
    let elsewhere = env.path().join("elsewhere.sqlite");
    fs::copy(&env.db, &elsewhere).unwrap();
    let mnt = env.mkdir("mnt");
    let m = Mount::start(&env, &mnt, &args!["--cache-size", "1MiB"]);
    let keep = m.version_path(&newest, &src).join("keep.bin");
    assert!(keep.is_file(), "{}", m.stderr_text());
    let out = env.run_with_db(&elsewhere, &args!["forget", "--keep-last", "1", "--json"]).expect_code(0).json();
    assert!(out["compact"]["volumes_deleted"].as_u64().unwrap() >= 1, "nothing was repacked: {out:#}");

    assert!(same_content(&src.join("keep.bin"), &keep), "keep.bin read wrong after compaction: {}", m.stderr_text());
}
