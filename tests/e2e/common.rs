//! Helpers shared by the end-to-end tests.
//!
//! Every test gets its own [`Env`]: a temporary directory holding the box, the
//! SQLite catalog (`--db`), a private `TMPDIR` and `HOME`, so tests never share
//! state and can run in parallel.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rand::{RngCore, SeedableRng};
use serde_json::Value;

/// Password of every test box.
pub const PASSWORD: &str = "correct horse battery staple";

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// The binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_brickbox")
}

/// Builds an argument list from anything that is `AsRef<OsStr>` (strings, paths…).
macro_rules! args {
    () => {
        Vec::<::std::ffi::OsString>::new()
    };
    ($($x:expr),+ $(,)?) => {
        Vec::<::std::ffi::OsString>::from([$(::std::ffi::OsString::from(AsRef::<::std::ffi::OsStr>::as_ref(&$x))),*])
    };
}
pub(crate) use args;

/// The outcome of one command.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Stdout parsed as JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}\nstderr:\n{}", self.stdout, self.stderr))
    }

    /// Asserts the exit code, showing the output when it differs.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "unexpected exit code\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
        self
    }
}

/// A private world for one test: box, catalog, temp and home directories.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    pub db: PathBuf,
    pub tmp: PathBuf,
    pub home: PathBuf,
    pub password: String,
}

impl Env {
    /// A fresh environment (the box is not created yet).
    pub fn new() -> Env {
        let dir = tempfile::Builder::new().prefix("bbe2e-").tempdir().expect("tempdir");
        let root = dir.path().to_path_buf();
        let tmp = root.join("tmp");
        let home = root.join("home");
        fs::create_dir(&tmp).unwrap();
        fs::create_dir(&home).unwrap();
        Env { repo: root.join("box"), db: root.join("catalog.sqlite"), tmp, home, password: PASSWORD.to_string(), dir }
    }

    /// A fresh environment with an initialised box.
    pub fn with_box() -> Env {
        let env = Env::new();
        env.init();
        env
    }

    /// The temporary directory of this test.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A new directory `name` in the test directory.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// The command with a clean environment, without the box options.
    pub fn bare_cmd(&self) -> Command {
        let mut c = Command::new(bin());
        for var in [
            "BRICKBOX_REPO",
            "BRICKBOX_PASSWORD",
            "BRICKBOX_PASSWORD_FILE",
            "BRICKBOX_DB",
            "BRICKBOX_NEW_PASSWORD",
            "BRICKBOX_NEW_PASSWORD_FILE",
            "XDG_CACHE_HOME",
        ] {
            c.env_remove(var);
        }
        c.env("BRICKBOX_PASSWORD", &self.password)
            .env("TMPDIR", &self.tmp)
            .env("HOME", &self.home)
            .env("TZ", "UTC")
            .stdin(Stdio::null());
        c
    }

    /// The command with `-r BOX --db DB` before `args`.
    pub fn cmd(&self, args: &[OsString]) -> Command {
        let mut c = self.bare_cmd();
        c.arg("-r").arg(&self.repo).arg("--db").arg(&self.db).args(args);
        c
    }

    /// Runs a command (with `-r`/`--db`).
    pub fn run(&self, args: &[OsString]) -> Run {
        run_cmd(self.cmd(args))
    }

    /// Runs a command against the box with another catalog file.
    pub fn run_with_db(&self, db: &Path, args: &[OsString]) -> Run {
        let mut c = self.bare_cmd();
        c.arg("-r").arg(&self.repo).arg("--db").arg(db).args(args);
        run_cmd(c)
    }

    /// Runs a command against the box with its default catalog (no `--db`; under HOME's cache).
    pub fn run_default_catalog(&self, args: &[OsString]) -> Run {
        let mut c = self.bare_cmd();
        c.arg("-r").arg(&self.repo).args(args);
        run_cmd(c)
    }

    /// Runs a command with another password.
    pub fn run_with_password(&self, password: &str, args: &[OsString]) -> Run {
        let mut c = self.cmd(args);
        c.env("BRICKBOX_PASSWORD", password);
        run_cmd(c)
    }

    /// Runs a command that must exit 0.
    #[track_caller]
    pub fn ok(&self, args: &[OsString]) -> Run {
        let r = self.run(args);
        r.expect_code(0);
        r
    }

    /// Runs a command with `--json` that must exit 0 and returns its JSON.
    #[track_caller]
    pub fn json(&self, args: &[OsString]) -> Value {
        let mut a = args.to_vec();
        a.push("--json".into());
        self.ok(&a).json()
    }

    /// `init`, which must succeed.
    #[track_caller]
    pub fn init(&self) {
        self.ok(&args!["init"]);
    }

    /// `backup ARGS --json`, which must exit 0; returns the summary.
    #[track_caller]
    pub fn backup(&self, args: &[OsString]) -> Value {
        let mut a = args!["backup"];
        a.extend_from_slice(args);
        self.json(&a)
    }

    /// `versions --json` (newest first).
    #[track_caller]
    pub fn versions(&self) -> Vec<Value> {
        self.json(&args!["versions"]).as_array().expect("versions array").clone()
    }

    /// `restore ARGS --target TARGET`, which must exit 0.
    #[track_caller]
    pub fn restore(&self, args: &[OsString], target: &Path) -> Run {
        let mut a = args!["restore"];
        a.extend_from_slice(args);
        a.extend(args!["--target", target]);
        self.ok(&a)
    }
}

/// Runs a prepared command and collects its output.
pub fn run_cmd(mut c: Command) -> Run {
    let out = c.output().expect("cannot run brickbox");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Where `source` (an absolute path) lands when restored with `--target target`.
pub fn restored(target: &Path, source: &Path) -> PathBuf {
    target.join(source.strip_prefix("/").expect("absolute source path"))
}

/// A number from a JSON value, with a readable panic.
#[track_caller]
pub fn num(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no number '{key}' in {v:#}"))
}

/// The id of the version a backup summary reports.
#[track_caller]
pub fn version_id(summary: &Value) -> String {
    summary["version"]["id"].as_str().unwrap_or_else(|| panic!("no version id in {summary:#}")).to_string()
}

// ---------------------------------------------------------------------------
// Data generation

/// Deterministic incompressible bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    v
}

/// Writes `len` deterministic random bytes to `path`, in pieces.
pub fn write_random(path: &Path, seed: u64, len: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut f = File::create(path).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
}

/// Deterministic text that compresses well but does not repeat in long runs.
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "brick",
        "box",
        "backup",
        "restore",
        "volume",
        "block",
        "chunk",
        "index",
        "version",
        "the",
        "a",
        "of",
        "and",
        "to",
        "in",
        "is",
        "file",
        "directory",
        "data",
        "quick",
        "brown",
        "fox",
        "lazy",
        "dog",
        "error",
        "warning",
        "info",
        "debug",
        "request",
        "response",
        "user",
        "session",
        "12",
        "404",
        "2024-01-01",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 16);
    let mut line = 0u64;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        if x.is_multiple_of(11) {
            line += 1;
            out.extend_from_slice(format!("\n{line:08} ").as_bytes());
        }
        out.extend_from_slice(WORDS[(x >> 32) as usize % WORDS.len()].as_bytes());
        out.push(b' ');
    }
    out.truncate(len);
    out
}

// ---------------------------------------------------------------------------
// File system helpers

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

/// Sets atime and mtime (ns since the epoch) of the entry itself, symlinks included.
pub fn set_mtime(p: &Path, mtime_ns: i64) {
    let ts = |ns: i64| libc::timespec { tv_sec: ns.div_euclid(1_000_000_000), tv_nsec: ns.rem_euclid(1_000_000_000) };
    let times = [ts(mtime_ns - 7_000_000_123), ts(mtime_ns)];
    let c = cstr(p);
    // SAFETY: valid NUL-terminated path and two timespecs.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0, "utimensat {}: {}", p.display(), std::io::Error::last_os_error());
}

/// Creates a FIFO.
pub fn mkfifo(p: &Path, mode: u32) {
    let c = cstr(p);
    // SAFETY: valid NUL-terminated path.
    let rc = unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) };
    assert_eq!(rc, 0, "mkfifo {}: {}", p.display(), std::io::Error::last_os_error());
}

/// Sets the permission bits exactly.
pub fn chmod(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// `lchown`.
pub fn lchown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Every path below `root` (and `root` itself), children after parents, without following symlinks.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let p = out[i].clone();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            let mut kids: Vec<PathBuf> = fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()).collect();
            kids.sort();
            out.extend(kids);
        }
        i += 1;
    }
    out
}

/// Sets distinct nanosecond mtimes on every entry below `root`, children before parents.
pub fn stamp_mtimes(root: &Path, base_ns: i64) {
    let all = walk(root);
    for (i, p) in all.iter().enumerate().rev() {
        set_mtime(p, base_ns + i as i64 * 1_000_003_007 + 123_456_789);
    }
}

/// Kind of an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    Device,
}

/// What is compared of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits, `& 0o7777`.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Size for files and symlinks, 0 for directories.
    pub size: u64,
    pub mtime_ns: i64,
    /// Link count of non-directories.
    pub nlink: u64,
    pub target: Option<Vec<u8>>,
    /// `user.*` extended attributes, sorted.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// File content, when the snapshot keeps it.
    pub data: Option<Vec<u8>>,
}

/// Entries of a tree by path relative to its root (`""` is the root).
pub type Snapshot = BTreeMap<PathBuf, Entry>;

/// Reads one entry's metadata (and content when `keep_data`).
pub fn entry(p: &Path, keep_data: bool) -> Entry {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = md.file_type();
    let kind = if ft.is_symlink() {
        Kind::Symlink
    } else if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else {
        Kind::Device
    };
    let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = xattr::list(p)
        .unwrap()
        .filter(|n| n.as_bytes().starts_with(b"user."))
        .map(|n| (n.as_bytes().to_vec(), xattr::get(p, &n).unwrap().unwrap_or_default()))
        .collect();
    xattrs.sort();
    Entry {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size: if kind == Kind::Dir { 0 } else { md.size() },
        mtime_ns: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
        nlink: if kind == Kind::Dir { 0 } else { md.nlink() },
        target: (kind == Kind::Symlink).then(|| fs::read_link(p).unwrap().as_os_str().as_bytes().to_vec()),
        xattrs,
        data: (keep_data && kind == Kind::File).then(|| fs::read(p).unwrap()),
    }
}

/// Snapshot of the tree at `root`.
pub fn snapshot(root: &Path, keep_data: bool) -> Snapshot {
    walk(root)
        .into_iter()
        .map(|p| {
            let e = entry(&p, keep_data);
            (p.strip_prefix(root).unwrap().to_path_buf(), e)
        })
        .collect()
}

/// Whether two files have the same bytes (streamed, for large files).
pub fn same_content(a: &Path, b: &Path) -> bool {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let mut ba = vec![0u8; 1 << 20];
    let mut bb = vec![0u8; 1 << 20];
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        if n != m || ba[..n] != bb[..m] {
            return false;
        }
        if n == 0 {
            return true;
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> usize {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]).unwrap() {
            0 => break,
            k => n += k,
        }
    }
    n
}

/// How strictly [`assert_same_tree`] compares.
#[derive(Clone, Copy, Debug)]
pub struct Compare {
    /// Compare owners too.
    pub owners: bool,
    /// Compare link counts of non-directories.
    pub nlink: bool,
}

impl Compare {
    pub const ALL: Compare = Compare { owners: true, nlink: true };
    pub const NO_OWNERS: Compare = Compare { owners: false, nlink: true };
}

fn normalise(mut e: Entry, how: Compare) -> Entry {
    if !how.owners {
        e.uid = 0;
        e.gid = 0;
    }
    if !how.nlink {
        e.nlink = 0;
    }
    e.data = None;
    e
}

/// Asserts that `actual` holds the same entries as `expected`: kinds, modes, sizes,
/// mtimes, symlink targets, `user.*` xattrs and content (and owners if asked).
#[track_caller]
pub fn assert_same_tree(expected: &Path, actual: &Path, how: Compare) {
    let a = snapshot(expected, false);
    let b = snapshot(actual, false);
    assert_snapshot_matches(&a, expected, &b, actual, how);
}

/// Asserts that the tree at `actual` matches snapshot `expected` (whose content is either kept in the
/// snapshot or read from `expected_root`).
#[track_caller]
pub fn assert_snapshot_matches(
    expected: &Snapshot,
    expected_root: &Path,
    actual: &Snapshot,
    actual_root: &Path,
    how: Compare,
) {
    let ka: BTreeSet<&PathBuf> = expected.keys().collect();
    let kb: BTreeSet<&PathBuf> = actual.keys().collect();
    let missing: Vec<_> = ka.difference(&kb).collect();
    let extra: Vec<_> = kb.difference(&ka).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "restored tree {} differs from {}: missing {missing:?}, unexpected {extra:?}",
        actual_root.display(),
        expected_root.display()
    );
    let mut problems = Vec::new();
    for (rel, e) in expected {
        let got = &actual[rel];
        let (ne, ng) = (normalise(e.clone(), how), normalise(got.clone(), how));
        if ne != ng {
            problems.push(format!("{rel:?}:\n  expected {ne:?}\n  got      {ng:?}"));
            continue;
        }
        if e.kind == Kind::File {
            let same = match &e.data {
                Some(d) => fs::read(actual_root.join(rel)).unwrap() == *d,
                None => same_content(&expected_root.join(rel), &actual_root.join(rel)),
            };
            if !same {
                problems.push(format!("{rel:?}: content differs"));
            }
        }
    }
    assert!(problems.is_empty(), "{} entries differ:\n{}", problems.len(), problems.join("\n"));
}

/// Every file below `root` with its size and bytes: to check that a box did not change.
pub fn dir_state(root: &Path) -> BTreeMap<PathBuf, (bool, Vec<u8>)> {
    if !root.exists() {
        return BTreeMap::new();
    }
    walk(root)
        .into_iter()
        .map(|p| {
            let md = fs::symlink_metadata(&p).unwrap();
            let data = if md.is_file() { fs::read(&p).unwrap() } else { Vec::new() };
            (p.strip_prefix(root).unwrap().to_path_buf(), (md.is_dir(), data))
        })
        .collect()
}

/// Like [`dir_state`] but files only: what a box stores, without its (scratch) directories.
pub fn file_state(root: &Path) -> BTreeMap<PathBuf, (bool, Vec<u8>)> {
    dir_state(root).into_iter().filter(|(_, (is_dir, _))| !is_dir).collect()
}

/// Names of the objects in a folder of the box (e.g. `data`), sorted.
pub fn objects(repo: &Path, folder: &str) -> Vec<PathBuf> {
    let dir = repo.join(folder);
    let Ok(rd) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd.map(|e| e.unwrap().path()).filter(|p| p.is_file()).collect();
    v.sort();
    v
}

/// Sum of the sizes of files in a folder of the box.
pub fn folder_bytes(repo: &Path, folder: &str) -> u64 {
    objects(repo, folder).iter().map(|p| fs::metadata(p).unwrap().len()).sum()
}

/// A path given as raw bytes under `dir`.
pub fn raw_name(dir: &Path, name: &[u8]) -> PathBuf {
    dir.join(OsStr::from_bytes(name))
}

/// Data ranges `(offset, len, name)` of the entries of a stored zip file, from its central directory.
pub fn zip_entries(bytes: &[u8]) -> Vec<(usize, usize, String)> {
    let u16at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u32at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()) as usize;
    let eocd = (0..=bytes.len() - 22).rev().find(|&o| u32at(o) == 0x0605_4b50).expect("no end of central directory");
    let count = u16at(eocd + 10);
    let mut off = u32at(eocd + 16);
    let mut out = Vec::new();
    for _ in 0..count {
        assert_eq!(u32at(off), 0x0201_4b50, "bad central directory header");
        let size = u32at(off + 20);
        let (n, e, c) = (u16at(off + 28), u16at(off + 30), u16at(off + 32));
        let local = u32at(off + 42);
        let name = String::from_utf8_lossy(&bytes[off + 46..off + 46 + n]).into_owned();
        assert_eq!(u32at(local), 0x0403_4b50, "bad local header");
        let data = local + 30 + u16at(local + 26) + u16at(local + 28);
        out.push((data, size, name));
        off += 46 + n + e + c;
    }
    out
}

/// `diff` lines as `(mark, path)`, mark being `+`, `-` or `M`.
pub type DiffLines = BTreeSet<(char, PathBuf)>;

/// Expected `diff` lines between two snapshots of the same source root, as `(mark, path)`.
pub fn expected_diff(old: &Snapshot, new: &Snapshot, root: &Path) -> DiffLines {
    let meta = |e: &Entry| {
        let mut e = e.clone();
        e.nlink = 0;
        e
    };
    let mut out = BTreeSet::new();
    for (rel, e) in old {
        match new.get(rel) {
            None => {
                out.insert(('-', root.join(rel)));
            }
            Some(n) if meta(n) != meta(e) => {
                out.insert(('M', root.join(rel)));
            }
            Some(_) => {}
        }
    }
    for rel in new.keys() {
        if !old.contains_key(rel) {
            out.insert(('+', root.join(rel)));
        }
    }
    out
}

/// Parses `diff` text output into `(mark, path)` pairs.
pub fn parse_diff(text: &str) -> DiffLines {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mark = l.chars().next().unwrap();
            assert!(matches!(mark, '+' | '-' | 'M'), "unexpected diff line {l:?}");
            assert_eq!(&l[1..2], " ", "diff line {l:?}");
            (mark, PathBuf::from(&l[2..]))
        })
        .collect()
}

/// Splits diff lines into those inside `root` (inclusive) and the rest.
pub fn split_diff(lines: DiffLines, root: &Path) -> (DiffLines, Vec<(char, PathBuf)>) {
    let mut inside = BTreeSet::new();
    let mut outside = Vec::new();
    for l in lines {
        if l.1.starts_with(root) {
            inside.insert(l);
        } else {
            outside.push(l);
        }
    }
    (inside, outside)
}

/// Asserts that diff lines outside the source root only mark its ancestors as changed (their
/// mtimes move as other tests work in the temp dir).
#[track_caller]
pub fn assert_only_ancestors(outside: &[(char, PathBuf)], root: &Path) {
    for (mark, p) in outside {
        assert!(*mark == 'M' && root.starts_with(p), "unexpected diff line outside the source: {mark} {}", p.display());
    }
}
